"""Transformer modules of torch.nn traced into, so their Linear projections are quantized (qcompile.traceable)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile.frontend import trace
from qcompile.qmodules import FakeQuantize
from qcompile.traceable import MultiheadAttention


class Encoder(nn.Module):
    """Token ids -> embedding -> nn.TransformerEncoder -> mean -> Linear."""

    def __init__(self, batch_first=True, norm_first=False, activation="relu", final_norm=False):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(40, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=norm_first,
                                           activation=activation)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32) if final_norm else None,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, tok):
        x = self.emb(tok)
        if not self.batch_first:
            x = x.transpose(0, 1)
        y = self.enc(x)
        return self.head(y.mean(1 if self.batch_first else 0))


class MaskedEncoder(Encoder):
    """Pads (token 0) masked out: a key-padding mask the traceable stand-ins do not reproduce."""

    def forward(self, tok):
        return self.head(self.enc(self.emb(tok), src_key_padding_mask=tok == 0).mean(1))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
        self.head = nn.Linear(16, 3)

    def forward(self, tgt, memory):
        return self.head(self.dec(tgt, memory))


def tokens(n=12, seed=0):
    return torch.randint(1, 40, (n, 10), generator=torch.Generator().manual_seed(seed))


def traced_alike(model, *inputs):
    """The model traced on ``inputs``, checked to compute what the model computes on them."""
    gm = trace(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    return gm


def linear_targets(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                            nn.Linear)}


@pytest.mark.parametrize("kw", [dict(), dict(batch_first=False), dict(norm_first=True, activation="gelu"),
                                dict(final_norm=True)], ids=["post-norm", "seq-first", "pre-norm-gelu", "final-norm"])
def test_encoder_is_traced_through_with_the_same_outputs(kw):
    torch.manual_seed(0)
    model = Encoder(**kw).eval()
    x = tokens()
    gm = trace(model, (x[:1],))
    expected = {f"enc.layers.{i}.{p}" for i in range(2)
                for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                          "linear1", "linear2")} | {"head"}
    assert linear_targets(gm) == expected
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_masked_encoder_is_traced_through_and_zeroes_padded_positions_as_pytorch_does():
    """With a key-padding mask the encoder stayed one opaque module (its projections float), and its eval-mode
    nested-tensor fast path writes 0 at padded positions, which the exported slow path did not: the file failed
    validation even in fp32 (5 dB)."""
    torch.manual_seed(0)
    model = MaskedEncoder().eval()
    x = tokens()
    x[:, -3:] = 0
    gm = trace(model, (x[:1],))
    assert {"enc.layers.0.self_attn.q_proj", "enc.layers.1.linear2", "head"} <= linear_targets(gm)
    assert any(n.op == "call_method" and n.target == "masked_fill" for n in gm.graph.nodes)  # the fast path's zeros
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


class TokenEncoder(nn.Module):
    """Per-token outputs of an encoder given a padding mask (bool or float) and/or an attention mask."""

    def __init__(self, nested: bool = True, batch_first: bool = True, causal: bool = False):
        super().__init__()
        self.batch_first = batch_first
        self.causal = nn.Transformer.generate_square_subsequent_mask(10) if causal else None
        self.emb = nn.Embedding(40, 16)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first),
                                         2, enable_nested_tensor=nested)
        self.head = nn.Linear(16, 3)

    def forward(self, tok, pad):
        x = self.emb(tok)
        if not self.batch_first:
            x = x.transpose(0, 1)
        y = self.enc(x, mask=self.causal, src_key_padding_mask=pad)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y)


@pytest.mark.parametrize("case", ["bool-pad", "float-pad", "no-nested", "seq-first", "causal+pad"])
def test_masked_encoders_trace_to_what_pytorch_computes(case, tmp_path):
    torch.manual_seed(1)
    model = TokenEncoder(nested=case != "no-nested", batch_first=case != "seq-first", causal=case == "causal+pad").eval()
    x = tokens(16)
    lengths = torch.randint(4, 11, (16, 1), generator=torch.Generator().manual_seed(2))
    pad = torch.arange(10)[None] >= lengths  # right padding, True = pad
    if case == "float-pad":
        pad = torch.zeros(pad.shape).masked_fill(pad, float("-inf"))
    if case == "causal+pad":
        pad = torch.zeros(pad.shape).masked_fill(pad, float("-inf"))  # the same kind as the causal mask
    inputs = (x, pad)
    gm = trace(model, (x[:1], pad[:1]))
    assert "enc.layers.1.self_attn.v_proj" in linear_targets(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    result = qcompile.compile(model, calib=inputs, scheme="uniform", bits=8, output=str(tmp_path / "m.onnx"),
                              progress=False)
    assert result.report.passed, result.report.summary()
    assert result.report.extra["sqnr_vs_float_db"] > 25


def test_decoder_is_traced_through():
    torch.manual_seed(0)
    model = Decoder().eval()
    gm = traced_alike(model, torch.randn(3, 5, 16), torch.randn(3, 7, 16))
    assert {"dec.layers.1.multihead_attn.q_proj", "dec.layers.1.linear2"} <= linear_targets(gm)


@pytest.mark.parametrize("kw", [dict(batch_first=True), dict(batch_first=False), dict(bias=False, batch_first=True),
                                dict(kdim=6, vdim=10, batch_first=True)], ids=["bf", "seq-first", "no-bias", "kdim"])
@pytest.mark.parametrize("average", [True, False])
def test_stand_in_equals_multihead_attention(kw, average):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, **kw).eval()
    ours = MultiheadAttention(mha).eval()
    g = torch.Generator().manual_seed(2)
    n, lq, lk = 3, 5, 7
    shape = (lambda length, e: (n, length, e)) if mha.batch_first else (lambda length, e: (length, n, e))
    q = torch.randn(shape(lq, 16), generator=g)
    k = torch.randn(shape(lk, kw.get("kdim", 16)), generator=g)
    v = torch.randn(shape(lk, kw.get("vdim", 16)), generator=g)
    with torch.no_grad():
        want = mha(q, k, v, need_weights=True, average_attn_weights=average)
        got = ours(q, k, v, need_weights=True, average_attn_weights=average)
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
        assert ours(q, k, v, need_weights=False)[1] is None


def test_transformer_compiles_with_quantized_projections_and_validates():
    torch.manual_seed(0)
    model = Encoder().eval()
    calib = tokens(32, seed=3)
    result = qcompile.compile(model, calib=calib, scheme="apot", bits=4)
    weight_fq = {n.rsplit(".weight_fq", 1)[0] for n, m in result.model.named_modules()
                 if isinstance(m, FakeQuantize) and n.endswith(".weight_fq")}
    assert {"enc.layers.0.self_attn.q_proj", "enc.layers.1.linear2", "enc.layers.1.self_attn.out_proj"} <= weight_fq
    assert result.report.passed, result.report.failures
    assert result.report.extra["sqnr_vs_float_db"] > 10.0  # quantized, not broken


def test_first_and_last_layers_of_a_transformer():
    """The residual stream reaches every block without crossing a layer; the first layers are still only the
    projections that read the embedding, and the last layer the head."""
    from qcompile.passes.select import SelectLayers, layer_table

    torch.manual_seed(0)
    gm = trace(Encoder().eval(), (tokens()[:1],))
    rows = {name: decision for name, _, decision in layer_table(SelectLayers()(gm).gm)}
    kept = {name for name, decision in rows.items() if "first" in decision or "last" in decision}
    assert kept == {"emb", "enc.layers.0.self_attn.q_proj", "enc.layers.0.self_attn.k_proj",
                    "enc.layers.0.self_attn.v_proj", "head"}
    assert rows["head"].endswith("(last layer)")
    # the embedding table is a first layer of its own (8-bit rows): it does not take that role from the projections
    assert rows["emb"] == "W8 uniform, weights only (first layer)"


def test_layers_inside_opaque_modules_are_listed_as_float():
    """A module the quantizer cannot reach into (an LSTM with a projection, a module holding a GRU, masked
    attention) stays opaque: the layer table says its layers stay float. A plain nn.LSTM/GRU is a layer of its own
    (weight-only quantization), not an opaque module."""
    from qcompile.passes.select import layer_table

    class Holder(nn.Module):  # kept whole (--leaf-module): its GRU is out of reach
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(16, 16, num_layers=2, batch_first=True)  # two stacked layers count as two

        def forward(self, x):
            return self.gru(x)[0]

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.LSTM(8, 16, batch_first=True, proj_size=4)  # torch.onnx cannot export the projection
            self.lstm = nn.LSTM(4, 16, batch_first=True)
            self.hold = Holder()
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.hold(self.lstm(self.proj(x)[0])[0])[:, -1])

    torch.manual_seed(0)
    gm = trace(Recurrent().eval(), (torch.randn(2, 5, 8),), leaf_modules=("hold",))
    rows = {name: decision for name, _, decision in layer_table(gm)}
    assert rows["proj"] == "float: opaque to torch.fx (1 recurrent layer(s))"
    assert rows["hold"] == "float: opaque to torch.fx (2 recurrent layer(s))"
    assert "lstm" not in rows  # a layer: listed with its decision once SelectLayers has made it
    from qcompile.passes.select import SelectLayers

    rows = {name: decision for name, _, decision in layer_table(SelectLayers()(gm).gm)}
    assert rows["lstm"] == "W8 uniform, weights only (first layer)"
    # masked attention called without example inputs (no record of the mask's kind) stays opaque
    rows = {name: decision for name, _, decision in layer_table(trace(MaskedEncoder().eval()))}
    assert rows["enc"] == "float: opaque to torch.fx (6 Conv/Linear layer(s) and 2 attention in_proj weight(s))"


def test_left_padding_and_an_all_padding_row_compute_what_pytorch_computes(tmp_path):
    """The nested path's zeros were decided on the first calibration row (no padding there): with left padding
    PyTorch never takes that path, and the file wrote 0 where the model computes values (fp32 8.5 dB, PASS). A row
    with every position padded made softmax NaN in the graph ("the model computes NaN ... on the calibration
    data") where PyTorch's output is finite."""
    torch.manual_seed(3)
    model = TokenEncoder().eval()
    x = tokens(16)
    lengths = torch.randint(4, 11, (16, 1), generator=torch.Generator().manual_seed(4))
    left = torch.arange(10)[None] < 10 - lengths  # padding first: not left-aligned
    left[0] = False                                # the example row: no padding
    right = torch.arange(10)[None] >= lengths
    right[5] = True                                # an all-padding row
    for pad in (left, right):
        with torch.no_grad():
            want = model(x, pad)
        assert torch.isfinite(want).all()
        result = qcompile.compile(model, calib=(x, pad), scheme="fp32", output=str(tmp_path / "m.onnx"),
                                  progress=False)
        assert result.report.passed
        with torch.no_grad():
            torch.testing.assert_close(result.model(x, pad), want, rtol=1e-4, atol=1e-5)


def test_transformer_subclassed_layers_and_an_encoder_called_twice_are_traced(tmp_path):
    """nn.Transformer (the all-in-one module), a layer subclass that only adds an __init__, and one encoder called
    with and without a mask stayed opaque (their layers float; the last one's file lost the nested zeros)."""
    class MyLayer(nn.TransformerEncoderLayer):
        pass

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(40, 16)
            self.enc = nn.TransformerEncoder(MyLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
            self.head = nn.Linear(16, 3)

        def forward(self, tok, pad):
            e = self.emb(tok)
            return self.head(self.enc(e, src_key_padding_mask=pad) + self.enc(e))

    torch.manual_seed(5)
    x = tokens(16)
    pad = torch.arange(10)[None] >= torch.randint(4, 11, (16, 1), generator=torch.Generator().manual_seed(6))
    model = Twice().eval()
    gm = trace(model, (x[:1], pad[:1]))
    assert "enc.layers.1.linear2" in linear_targets(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x, pad), model(x, pad), rtol=1e-4, atol=1e-5)
    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.tf = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True)

        def forward(self, src, tgt):
            return self.tf(src, tgt)

    gm = traced_alike(Seq2Seq().eval(), torch.randn(4, 7, 16), torch.randn(4, 5, 16))
    assert {"tf.encoder.layers.0.linear1", "tf.decoder.layers.0.multihead_attn.q_proj"} <= linear_targets(gm)
