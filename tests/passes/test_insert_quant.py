"""InsertQuantizers: every selected Conv/Linear becomes ``F.conv*``/``F.linear`` on FakeQuantize outputs (weights per
output channel, axis 0; one per-tensor activation quantizer per input tensor, shared by its readers; unsigned after
ReLU, signed or asymmetric otherwise), float layers are left alone, a second run changes nothing, and 8-bit uniform
quantization with calibration stays close to the float model."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompile.errors import UserError
from qcompile.frontend import trace
from qcompile.ir import LayerConfig
from qcompile.passes.base import Pipeline, verify
from qcompile.passes.calibrate import Calibrate
from qcompile.passes.fold_bn import FoldBatchNorm
from qcompile.passes.insert_quant import InsertQuantizers, is_nonnegative
from qcompile.passes.select import Override, SelectLayers
from qcompile.qmodules import FakeQuantize
from tests.models import MLP, ResidualCNN, example_input

MIN_SQNR_W8A8_DB = 30.0  # 8-bit uniform weights and activations, calibrated: output SQNR vs float

RESIDUAL_LAYERS = ["conv1", "layer1.conv1", "layer1.conv2", "layer1.downsample.0", "fc"]


def config(scheme: str, bits: int, per_channel: bool = True) -> LayerConfig:
    return LayerConfig(action="quant", wscheme=scheme, wbits=bits, ascheme=scheme, abits=bits,
                       per_channel=per_channel, reason="test")


def selected(model: nn.Module, x: torch.Tensor, cfg: LayerConfig, first_last: str = "quant", overrides=()):
    """Traced, BN-folded graph whose layer nodes carry their LayerConfig (the input of InsertQuantizers)."""
    gm = trace(model, x)
    return Pipeline([FoldBatchNorm(), SelectLayers(cfg, first_last=first_last, overrides=list(overrides))],
                    check=True)(gm).gm


def insert(gm):
    result = InsertQuantizers()(gm)
    result.gm.recompile()
    verify(result.gm)
    return result


def fq_of(gm, node) -> FakeQuantize | None:
    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, FakeQuantize):
            return mod
    return None


def quantized_layers(gm) -> dict[str, torch.fx.Node]:
    return {n.meta["layer"]: n for n in gm.graph.nodes
            if n.op == "call_function" and n.target in (F.conv1d, F.conv2d, F.linear) and "layer" in n.meta}


def count_modules(gm, kind) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind))


# --- structure ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,bits", [("apot", 4), ("pot", 3), ("uniform", 8), ("log2", 3)])
def test_every_selected_layer_reads_fake_quantized_weight_and_input(scheme, bits):
    model = ResidualCNN(seed=0)
    gm = selected(model, example_input(model), config(scheme, bits))
    result = insert(gm)
    gm = result.gm
    assert result.modified
    assert count_modules(gm, (nn.Conv2d, nn.Linear)) == 0  # every layer was rewritten
    layers = quantized_layers(gm)
    assert sorted(layers) == sorted(RESIDUAL_LAYERS)
    assert sum(n.target is F.conv2d for n in layers.values()) == 4
    assert sum(n.target is F.linear for n in layers.values()) == 1
    for name, node in layers.items():
        xfq, wfq = fq_of(gm, node.args[0]), fq_of(gm, node.args[1])
        assert xfq is not None and wfq is not None, name
        # weight quantizer: the layer's own weight, signed levels of the weight scheme, per output channel
        assert wfq is gm.get_submodule(name).weight_fq
        assert node.args[1].args[0].op == "get_attr" and node.args[1].args[0].target == f"{name}.weight"
        assert (wfq.role, wfq.scheme, wfq.bits, wfq.signed, wfq.axis) == ("weight", scheme, bits, True, 0)
        assert xfq.role == "activation" and xfq.axis is None and xfq.bits == bits
        assert not xfq.calibrated and not wfq.calibrated  # Calibrate fixes them
    # 5 weight quantizers, 4 activation quantizers (layer1.conv1 and the downsample share one)
    assert count_modules(gm, FakeQuantize) == 9


def test_layers_reading_one_tensor_share_its_quantizer():
    model = ResidualCNN(seed=0)
    gm = insert(selected(model, example_input(model), config("apot", 4))).gm
    layers = quantized_layers(gm)
    assert layers["layer1.conv1"].args[0] is layers["layer1.downsample.0"].args[0]
    assert len({layers[n].args[0] for n in RESIDUAL_LAYERS}) == 4


def test_readers_with_different_activation_bits_get_their_own_quantizer():
    model = ResidualCNN(seed=0)
    eight_bit_shortcut = Override("layer1.downsample.0", "glob", {"abits": 8})
    gm = insert(selected(model, example_input(model), config("apot", 4), overrides=[eight_bit_shortcut])).gm
    layers = quantized_layers(gm)
    a, b = layers["layer1.conv1"].args[0], layers["layer1.downsample.0"].args[0]
    assert a is not b and a.args[0] is b.args[0]  # same tensor, two quantizers
    assert (fq_of(gm, a).bits, fq_of(gm, b).bits) == (4, 8)


@pytest.mark.parametrize("scheme", ["apot", "pot", "uniform"])
def test_unsigned_after_relu_signed_or_asymmetric_otherwise(scheme):
    bits = 3 if scheme == "pot" else 4
    model = ResidualCNN(seed=0)
    gm = insert(selected(model, example_input(model), config(scheme, bits))).gm
    layers = quantized_layers(gm)
    signed_scheme = "uniform_asym" if scheme == "uniform" else scheme
    # conv1 reads the graph input (any sign)
    first = fq_of(gm, layers["conv1"].args[0])
    assert first.scheme == signed_scheme
    assert first.signed == (scheme != "uniform") and first.asymmetric == (scheme == "uniform")
    # the others read ReLU outputs, directly or through avgpool + flatten
    for name in ["layer1.conv1", "layer1.conv2", "fc"]:
        fq = fq_of(gm, layers[name].args[0])
        assert (fq.scheme, fq.signed, fq.asymmetric) == (scheme, False, False), name


def test_leaky_relu_output_is_not_treated_as_non_negative():
    model = MLP(seed=3)
    gm = insert(selected(model, example_input(model), config("uniform", 8))).gm
    layers = quantized_layers(gm)
    assert fq_of(gm, layers["fc2"].args[0]).scheme == "uniform"  # relu(bn(fc1)): unsigned
    assert fq_of(gm, layers["fc3"].args[0]).scheme == "uniform_asym"  # leaky_relu: may be negative
    assert is_nonnegative(gm, layers["fc2"].args[0].args[0])
    assert not is_nonnegative(gm, layers["fc3"].args[0].args[0])


class _PaddedTCN(nn.Module):
    """A causal TCN block: a ReLU output padded on the left (F.pad or a padding module) before the next conv."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c1 = nn.Conv1d(1, 8, 3, padding=1)
        self.c2 = nn.Conv1d(8, 8, 3)
        self.fc = nn.Linear(8, 4)
        self.pad = {"ZeroPad1d": nn.ZeroPad1d((2, 0)), "ConstantPad1d": nn.ConstantPad1d((2, 0), 0.5),
                    "ConstantPad1d_negative": nn.ConstantPad1d((2, 0), -0.5),
                    "ReplicationPad1d": nn.ReplicationPad1d((2, 0))}.get(how, nn.Identity())

    def forward(self, x):
        h = F.relu(self.c1(x))
        if self.how == "F.pad":
            h = F.pad(h, (2, 0))
        elif self.how == "F.pad_value_negative":
            h = F.pad(h, (2, 0), value=-1.0)
        elif self.how == "F.pad_reflect":
            h = F.pad(h, (2, 0), mode="reflect")
        else:
            h = self.pad(h)
        return self.fc(F.relu(self.c2(h)).mean(-1))


@pytest.mark.parametrize("how", ["F.pad", "F.pad_reflect", "ZeroPad1d", "ConstantPad1d", "ReplicationPad1d",
                                 "F.pad_value_negative", "ConstantPad1d_negative"])
def test_a_padded_relu_output_stays_unsigned(how):
    """A causal TCN's F.pad(relu(h), (k, 0)) lost the proof that the next conv's input is never negative: APoT
    W3A3 spent levels below zero (9.9 dB against 13.3 dB with the same model written with the pad inside the conv).
    Padding with a negative constant is not non-negative."""
    torch.manual_seed(0)
    model = _PaddedTCN(how).eval()
    gm = trace(model, (torch.randn(1, 1, 32),))
    conv2 = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "c2")
    assert is_nonnegative(gm, conv2.args[0]) == ("negative" not in how)


class _Pools1d3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c2 = nn.Conv1d(4, 4, 3, padding=1)
        self.c3 = nn.Conv1d(4, 4, 1)
        self.c4 = nn.Conv1d(4, 4, 1)

    def forward(self, x):
        a = F.max_pool1d(F.relu(self.c1(x)), 2)                    # 1-D functional pool of a ReLU
        b = nn.functional.adaptive_avg_pool1d(F.relu(self.c2(a)), 4)
        c = F.softplus(self.c3(b))                                 # softplus: positive
        return self.c4(c)


def test_one_and_three_d_pools_and_softplus_keep_values_non_negative():
    model = _Pools1d3d().eval()
    gm = insert(selected(model, torch.randn(2, 3, 16), config("apot", 4))).gm
    layers = quantized_layers(gm)
    for name in ("c2", "c3", "c4"):
        fq = fq_of(gm, layers[name].args[0])
        assert (fq.signed, fq.asymmetric) == (False, False), name  # the unsigned set: all levels >= 0


def test_float_layers_are_left_untouched():
    model = ResidualCNN(seed=0)
    x = example_input(model)
    gm = selected(model, x, config("apot", 4), first_last="fp32")
    conv1, fc = gm.get_submodule("conv1"), gm.get_submodule("fc")
    w_conv1, w_fc = conv1.weight.detach().clone(), fc.weight.detach().clone()
    gm = insert(gm).gm
    assert sorted(quantized_layers(gm)) == ["layer1.conv1", "layer1.conv2", "layer1.downsample.0"]
    float_calls = {n.target for n in gm.graph.nodes if n.op == "call_module"
                   and isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.Linear))}
    assert float_calls == {"conv1", "fc"}
    assert gm.get_submodule("conv1") is conv1 and gm.get_submodule("fc") is fc
    assert not hasattr(conv1, "weight_fq") and not hasattr(fc, "weight_fq")
    assert torch.equal(conv1.weight, w_conv1) and torch.equal(fc.weight, w_fc)
    assert count_modules(gm, FakeQuantize) == 3 + 2  # three weights, two inputs (one shared)


def test_per_tensor_weights_when_per_channel_is_off():
    model = ResidualCNN(seed=0)
    gm = insert(selected(model, example_input(model), config("apot", 4, per_channel=False))).gm
    for name, node in quantized_layers(gm).items():
        assert fq_of(gm, node.args[1]).axis is None, name


def test_second_run_reports_unmodified_and_keeps_the_graph():
    model = ResidualCNN(seed=0)
    gm = insert(selected(model, example_input(model), config("apot", 4))).gm
    code = gm.code
    again = InsertQuantizers()(gm)
    assert again.modified is False
    assert again.gm.code == code


def test_graph_without_selected_layers_is_unchanged():
    model = ResidualCNN(seed=0)
    everything_float = Override("*", "glob", {"action": "float"})
    gm = selected(model, example_input(model), config("apot", 4), overrides=[everything_float])
    code = gm.code
    result = InsertQuantizers()(gm)
    assert result.modified is False and result.gm.code == code
    assert count_modules(result.gm, FakeQuantize) == 0


def test_unsupported_activation_levels_are_a_user_error():
    model = ResidualCNN(seed=0)
    gm = selected(model, example_input(model), config("ternary", 2))  # ternary cannot be unsigned (after ReLU)
    with pytest.raises(UserError, match="--ascheme"):
        InsertQuantizers()(gm)


# --- numerics -------------------------------------------------------------------------------------------------


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    noise = float(((ref.double() - test.double()) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref.double() ** 2).sum()) / noise)


def test_w8a8_uniform_simulation_is_close_to_float():
    model = ResidualCNN(seed=0)
    calib = example_input(model, seed=1, batch=64)
    x = example_input(model, seed=2, batch=32)
    with torch.no_grad():
        ref = model(x)
    gm = insert(selected(model, calib[:2], config("uniform", 8))).gm
    gm = Calibrate(calib)(gm).gm
    with torch.no_grad():
        out = gm(x)
    assert sqnr_db(ref, out) >= MIN_SQNR_W8A8_DB
    assert sqnr_db(ref, out) < math.inf  # the quantizers do act


@pytest.mark.parametrize("kwargs,expected", [
    (dict(padding=1), (None, "constant", (1, 1))),
    (dict(padding="valid"), (None, "constant", (0, 0))),
    (dict(padding="same"), (None, "constant", (1, 1))),                # k=3: symmetric, the conv pads itself
    (dict(kernel_size=4, padding="same"), ([1, 2, 1, 2], "constant", (0, 0))),  # one more on the right
    (dict(padding=1, padding_mode="reflect"), ([1, 1, 1, 1], "reflect", (0, 0))),
    (dict(padding=(1, 2), padding_mode="replicate"), ([2, 2, 1, 1], "replicate", (0, 0))),
])
def test_conv_padding_is_explicit_where_the_conv_cannot_pad_itself(kwargs, expected):
    from qcompile.passes.insert_quant import conv_padding

    conv = nn.Conv2d(2, 2, **{"kernel_size": 3, **kwargs})
    assert conv_padding(conv) == expected
    x = torch.randn(1, 2, 7, 8)
    pad, mode, padding = expected
    xp = x if pad is None else torch.nn.functional.pad(x, pad, mode)
    assert torch.equal(conv(x), torch.nn.functional.conv2d(xp, conv.weight, conv.bias, conv.stride, padding))


class _PaddedFunctionalConv(nn.Module):
    """timm's Conv2dSame pattern: F.pad, then F.conv2d on the module's own parameters."""

    def __init__(self, cin: int, cout: int, gen: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3, generator=gen) * 0.2)
        self.bias = nn.Parameter(torch.randn(cout, generator=gen) * 0.1)

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, 1, 0)


class _BiaslessFunctionalLinear(nn.Module):
    def __init__(self, n: int, gen: torch.Generator):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, n, generator=gen) * 0.2)

    def forward(self, x):
        return F.linear(x, self.w)


class _FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = _PaddedFunctionalConv(8, 8, gen)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.p = _BiaslessFunctionalLinear(8, gen)
        self.h = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.c(F.relu(self.b(F.relu(self.a(x))))))
        return self.h(F.relu(self.p(x.mean((2, 3)))))


@pytest.mark.parametrize("scheme,bits", [("uniform", 8), ("apot", 4)])
def test_functional_layers_on_parameters_are_quantized(scheme, bits):
    """F.conv2d/F.linear on a module's own parameters (written in forward) get an input and a weight quantizer (a
    child of the module that owns the parameter); bias correction gives the bias-less one a bias; the file agrees
    with the simulation. They used to stay float while the layer table called them quantized."""
    import qcompile
    from qcompile.summary import layer_lines

    model = _FunctionalNet().eval()
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(12))
    result = qcompile.compile(model, x[:1], calib=x, scheme=scheme, bits=bits, keep_first_last="quant")
    gm = result.model
    assert gm.b.weight_fq.calibrated and gm.p.w_fq.calibrated
    assert isinstance(gm.p.bias, nn.Parameter) and gm.p.bias.abs().sum() > 0  # added by bias correction
    lines = "\n".join(layer_lines(gm))
    assert "_PaddedFunctionalConv" in lines and "float:" not in lines, lines
    assert result.report.passed and result.report.extra["code_mismatch"] == 0.0, result.report.extra


class _SignFlips(nn.Module):
    """Non-negative values (ReLU, sigmoid) through a negative constant, a negative alpha or a bicubic resize."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="bicubic")

    def forward(self, x):
        y = F.relu(self.c1(x))
        y = {"mul": lambda: y * -0.7, "rmul": lambda: -0.7 * y, "torch_mul": lambda: torch.mul(y, -1),
             "add": lambda: y + (-0.5), "torch_add": lambda: torch.add(y, -0.5),
             "alpha": lambda: torch.add(y, F.relu(-y), alpha=-1),
             "affine": lambda: torch.sigmoid(y) * -2.0 + 1.0,
             "interpolate": lambda: F.interpolate(y, scale_factor=2, mode="bicubic"),
             "upsample": lambda: self.up(y),
             "bilinear": lambda: F.interpolate(y, scale_factor=2, mode="bilinear"),
             "positive": lambda: y * 0.5 + 1.0}[self.kind]()
        return self.c2(y)


@pytest.mark.parametrize("kind", ["mul", "rmul", "torch_mul", "add", "torch_add", "alpha", "affine", "interpolate",
                                  "upsample", "bilinear", "positive"])
def test_constants_and_bicubic_resizes_are_part_of_the_sign_proof(kind):
    """relu(h) * -0.7, relu(h) + (-0.5), torch.add(a, b, alpha=-1), sigmoid * -2 + 1 and a bicubic resize (which
    overshoots below zero) were proven non-negative, as only tensor operands counted: the next quantizer took
    unsigned levels and clipped everything below zero (W8A8 0.9-4.3 dB against float, validation PASS)."""
    model = _SignFlips(kind).eval()
    gm = insert(selected(model, torch.randn(2, 3, 8, 8), config("uniform", 8), first_last="quant")).gm
    fq = fq_of(gm, quantized_layers(gm)["c2"].args[0])
    nonnegative = kind in ("bilinear", "positive")
    assert (fq.scheme == "uniform") == nonnegative, (kind, fq.scheme)


def test_softplus_is_non_negative_only_with_a_non_negative_threshold():
    """softplus returns x itself where x·beta > threshold: with a negative threshold, x in (threshold, 0) passes."""
    class Soft(nn.Module):
        def __init__(self, threshold):
            super().__init__()
            self.threshold = threshold
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.c2(F.softplus(self.c1(x), threshold=self.threshold))

    for threshold, unsigned in ((20.0, True), (1.0, True), (-5.0, False)):
        gm = insert(selected(Soft(threshold).eval(), torch.randn(2, 3, 8, 8), config("uniform", 8),
                             first_last="quant")).gm
        fq = fq_of(gm, quantized_layers(gm)["c2"].args[0])
        assert (fq.scheme == "uniform") == unsigned, threshold


def test_a_depthwise_transposed_conv_has_one_weight_scale_per_output_channel():
    """A depthwise ConvTranspose2d (groups = channels, weight [C, 1, k, k]) was quantized on axis 1, of size 1:
    one scale for all channels, per-tensor whatever per_channel said; after a BatchNorm fold spreading the channels
    30× the smallest channels kept no nonzero code (0 dB)."""
    import qcompile

    class Up(nn.Module):
        def __init__(self, c=8):
            super().__init__()
            self.c = nn.Conv2d(3, c, 3, padding=1)
            self.up = nn.ConvTranspose2d(c, c, 4, stride=2, padding=1, groups=c, bias=False)
            self.bn = nn.BatchNorm2d(c)
            self.h = nn.Conv2d(c, 4, 1)
            with torch.no_grad():
                self.bn.weight.copy_(torch.logspace(-1.5, 1.5, c))

        def forward(self, x):
            return self.h(torch.relu(self.bn(self.up(torch.relu(self.c(x))))))

    torch.manual_seed(1)
    model = Up().eval()
    calib = torch.randn(64, 3, 8, 8)
    result = qcompile.compile(model, calib[:1], scheme="uniform", bits=8, calib=calib)
    assert result.report.passed, result.report.summary()
    fq = result.model.up.weight_fq
    assert fq.axis == 0 and fq.alpha.shape == (8,)
    w = result.model.up.weight.detach()
    err = w - fq.simulate(w)
    per_channel_db = 10 * torch.log10(w.pow(2).flatten(1).sum(1) / err.pow(2).flatten(1).sum(1))
    assert per_channel_db.min() > 40, per_channel_db


# -- recurrent layers: weight-only ---------------------------------------------------------------------------------
class _Recurrent(nn.Module):
    """Linear -> a stacked recurrent layer -> Linear head on the last step."""

    def __init__(self, kind: str, bidirectional: bool = True, **kw):
        super().__init__()
        hidden = 24
        self.inp = nn.Linear(6, 16)
        self.rnn = getattr(nn, kind)(16, hidden, num_layers=2, batch_first=True, bidirectional=bidirectional, **kw)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), 4)

    def forward(self, x):
        return self.fc(self.rnn(torch.relu(self.inp(x)))[0][:, -1])


@pytest.mark.parametrize("kind, kw", [("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"})])
def test_recurrent_weights_are_quantized_per_row_and_the_rest_stays_float(kind, kw):
    """An nn.LSTM/GRU/RNN was an opaque module whose weights all stayed float (a 4-bit compile of an LSTM model
    wrote the float file). Its weight matrices now read through per-row quantizers of the layer's weight scheme; its
    input, states and biases stay float. The float reference (quantizers disabled) is the model itself, and the
    quantized layer computes the torch.nn layer with quantized weights."""
    from qcompile.qmodules import QuantizedRecurrent, disabled_quantizers

    torch.manual_seed(0)
    model = _Recurrent(kind, **kw).eval()
    x = torch.randn(16, 7, 6, generator=torch.Generator().manual_seed(1))
    gm = InsertQuantizers()(selected(model, x[:1], config("apot", 4))).gm
    wrapped = gm.get_submodule("rnn")
    assert isinstance(wrapped, QuantizedRecurrent)
    names = [n for n in wrapped.layer._flat_weights_names if n.startswith("weight_")]
    assert sorted(wrapped.weight_fq.keys()) == sorted(names) and len(names) == 8  # 2 layers x 2 directions x ih/hh
    assert all(fq.axis == 0 and fq.role == "weight" and (fq.scheme, fq.bits) == ("apot", 4)
               for fq in wrapped.weight_fq.values())
    gm = Calibrate(x).call(gm).gm
    assert all(fq.calibrated and fq.alpha.shape == (getattr(wrapped.layer, n).shape[0],)
               for n, fq in wrapped.weight_fq.items())
    with torch.no_grad():
        with disabled_quantizers(gm):
            assert torch.equal(gm(x), model(x))
        # the quantized layer: the torch.nn layer run on the quantized weights
        layer = getattr(nn, kind)(16, 24, num_layers=2, batch_first=True, bidirectional=True, **kw).eval()
        layer.load_state_dict(wrapped.layer.state_dict())
        for n, fq in wrapped.weight_fq.items():
            codes = fq(getattr(layer, n))
            # APoT-4: 15 levels, {0, ±1, ±2, ±3, ±4, ±6, ±8, ±10} x alpha / 10
            assert len(torch.unique(torch.round(codes / fq.alpha[:, None] * 1e4))) <= 15
            getattr(layer, n).copy_(codes)
        h = torch.relu(gm.get_submodule("inp")(x))  # inp and fc stay float in this graph (no quantizer calibrated
        want = layer(h)[0]                          # on them matters: compare the recurrent layer alone)
        assert torch.equal(wrapped(h)[0], want)
        assert not torch.equal(want, model.rnn(h)[0])  # and that is not the float layer


def test_recurrent_layers_follow_the_layer_rules():
    """First/last-layer rules, --exclude patterns and type: rules reach recurrent layers as any other layer; the
    report says weights only."""
    from qcompile.qmodules import QuantizedRecurrent

    torch.manual_seed(0)
    model = _Recurrent("GRU").eval()
    x = torch.randn(4, 7, 6)
    gm = selected(model, x[:1], config("pot", 3), first_last="int8")
    assert gm.graph.find_nodes(op="call_module", target="rnn")[0].meta["qconfig"].wbits == 3  # neither first nor last
    ins = InsertQuantizers()
    gm = ins(gm).gm
    assert any(line.startswith("rnn: W3 pot, weights only") for line in ins.report)
    assert InsertQuantizers()(gm).modified is False  # a second run changes nothing
    for rule in (Override("rnn", config_changes={"action": "float"}),
                 Override("GRU", kind="type", config_changes={"action": "float"})):
        gm = InsertQuantizers()(selected(model, x[:1], config("pot", 3), overrides=[rule])).gm
        assert not isinstance(gm.get_submodule("rnn"), QuantizedRecurrent)
    # an LSTM right after the input is the first layer: 8-bit uniform weights
    lstm = nn.Sequential(nn.LSTM(6, 8, batch_first=True))
    gm = selected(lstm, x[:1], config("apot", 4), first_last="int8")
    assert gm.graph.find_nodes(op="call_module", target="0")[0].meta["qconfig"].describe(weights_only=True) == \
        "W8 uniform, weights only (first and last layer)"


class _Tokens(nn.Module):
    """Token ids -> embedding (padding row 0) -> mean -> Linear -> ReLU -> Linear; the table tied to nothing."""

    def __init__(self, vocab: int = 200, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.l1 = nn.Linear(dim, 32)
        self.fc = nn.Linear(32, 4)

    def forward(self, ids):
        return self.fc(torch.relu(self.l1(self.emb(ids).mean(1))))


def test_embedding_tables_are_quantized_per_row_and_read_as_the_model_reads_them():
    """Embedding tables stayed float (a text model's largest weights). The table now reads through a per-row
    quantizer (weight-only: the ids are the input, the rows come out float); the lookup is F.embedding on the
    quantized table, so the float reference is the model itself."""
    from qcompile.qmodules import disabled_quantizers

    torch.manual_seed(0)
    model = _Tokens().eval()
    ids = torch.randint(0, 200, (16, 9), generator=torch.Generator().manual_seed(3))
    ins = InsertQuantizers()
    gm = ins(selected(model, ids[:1], config("apot", 4))).gm
    lookups = gm.graph.find_nodes(op="call_function", target=F.embedding)
    assert len(lookups) == 1 and lookups[0].meta["layer"] == "emb"
    fq = gm.get_submodule("emb.weight_fq")
    assert (fq.scheme, fq.bits, fq.axis, fq.role) == ("apot", 4, 0, "weight")
    assert any(line.startswith("emb: W4 apot, weights only") for line in ins.report)
    assert not any(isinstance(gm.get_submodule(n.target), FakeQuantize) and n.args[0].op == "placeholder"
                   for n in gm.graph.nodes if n.op == "call_module")  # no quantizer on the ids
    gm = Calibrate(ids).call(gm).gm
    with torch.no_grad():
        with disabled_quantizers(gm):
            assert torch.equal(gm(ids), model(ids))
        table = fq(model.emb.weight)
        assert torch.equal(table[0], torch.zeros(16))  # the padding row stays exactly 0
        assert torch.equal(table[ids], F.embedding(ids, fq(gm.get_submodule("emb").weight)))
    assert InsertQuantizers()(gm).modified is False


def test_embedding_tables_follow_the_layer_rules():
    """An embedding table is a first layer of its own (8-bit under the default rule) without taking that role from
    the layers after it; --exclude and type: rules reach it; max_norm tables stay float."""
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (4, 9))
    gm = selected(_Tokens().eval(), ids[:1], config("apot", 4), first_last="int8")
    cfg = {str(n.target): n.meta["qconfig"] for n in gm.graph.nodes if "qconfig" in n.meta}
    assert cfg["emb"].describe(weights_only=True) == "W8 uniform, weights only (first layer)"
    assert "first layer" in cfg["l1"].reason and "last layer" in cfg["fc"].reason
    for rule in (Override("emb", config_changes={"action": "float"}),
                 Override("Embedding", kind="type", config_changes={"action": "float"})):
        gm = InsertQuantizers()(selected(_Tokens().eval(), ids[:1], config("apot", 4), overrides=[rule])).gm
        assert not gm.graph.find_nodes(op="call_function", target=F.embedding)
    model = _Tokens().eval()
    model.emb.max_norm = 1.0  # renormalizes the rows it reads in forward: not a constant table
    gm = selected(model, ids[:1], config("apot", 4))
    assert all("qconfig" not in n.meta for n in gm.graph.nodes if n.target == "emb")


def test_clamp_min_at_zero_is_a_rectifier():
    """x.clamp_min(0) was not known to be non-negative nor a rectifier: its quantizers were signed and an extra
    8-bit output quantizer sat before it (W8A8 digits: 36.4 dB where the same model with ReLU gives 40.5)."""
    from qcompile.passes.int8_region import is_rectifier

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(self.a(x).clamp_min(0)) + self.b(torch.clamp_min(self.a(x), 0.0))

    gm = trace(Net(), (torch.randn(2, 8),))
    for node in gm.graph.nodes:
        if "clamp_min" in str(node.target):
            assert is_nonnegative(gm, node) and is_rectifier(gm, node), node.format_node()
