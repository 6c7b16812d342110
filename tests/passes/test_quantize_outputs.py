"""QuantizeOutputs and BindIntegerLayers.

QuantizeOutputs adds an 8-bit output quantizer to the layers that can run on int8 kernels (8-bit uniform input,
weights on an int8 grid) unless their output (or its single ReLU) already goes only into 8-bit uniform
quantizers. BindIntegerLayers then makes the simulation compute what onnxruntime's QLinearConv / QGemm / QLinearMatMul
compute: for uniform W8A8 the ONNX file equals the simulation bit for bit (max abs error 0, no differing code).
"""
from __future__ import annotations

import collections
import operator

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcompile
from qcompile.frontend import trace
from qcompile.ir import LayerConfig
from qcompile.models import digits
from qcompile.passes.base import Pipeline, verify
from qcompile.passes.fold_bn import FoldBatchNorm
from qcompile.passes.insert_quant import InsertQuantizers
from qcompile.passes.int8_region import is_rectifier
from qcompile.passes.quantize_outputs import BindIntegerLayers, QuantizeOutputs, cell_output
from qcompile.passes.select import SelectLayers
from qcompile.qmodules import FakeQuantize, IntegerOutput, int8_conv2d, int8_linear
from qcompile.runtime.session import session
from tests.models import MLP, ResidualCNN, example_input


def cfg(wscheme, wbits, ascheme, abits) -> LayerConfig:
    return LayerConfig(action="quant", wscheme=wscheme, wbits=wbits, ascheme=ascheme, abits=abits, reason="test")


def with_quantizers(config: LayerConfig, first_last: str, factory=ResidualCNN):
    model = factory(seed=0)
    gm = trace(model, example_input(model))
    return Pipeline([FoldBatchNorm(), SelectLayers(config, first_last=first_last), InsertQuantizers()],
                    check=True)(gm).gm


def output_quantizers(gm) -> dict[str, FakeQuantize]:
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and n.target.startswith("out_fq")}


def layer_of_output_quantizer(gm, qname: str) -> str:
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == qname)
    src = node.args[0]
    while "layer" not in src.meta:  # through the ReLU the quantizer may sit behind
        src = src.args[0]
    return src.meta["layer"]


def run_pass(p, gm):
    result = p(gm)
    result.gm.recompile()
    verify(result.gm)
    return result


# --- QuantizeOutputs: where --------------------------------------------------------------------------------------


def test_w8a8_outputs_are_quantized_only_where_no_8bit_quantizer_follows():
    gm = with_quantizers(cfg("uniform", 8, "uniform", 8), first_last="quant")
    result = run_pass(QuantizeOutputs(), gm)
    assert result.modified
    outs = output_quantizers(gm)
    by_layer = {layer_of_output_quantizer(gm, q): fq for q, fq in outs.items()}
    # conv1 and layer1.conv1 feed ReLU -> 8-bit input quantizer already; the two convs before the add do not; fc
    # gives the graph output, which QGemm writes in float from its accumulator
    assert sorted(by_layer) == ["layer1.conv2", "layer1.downsample.0"]
    for name, fq in by_layer.items():
        assert (fq.bits, fq.role, fq.scheme) == (8, "activation", "uniform_asym"), name  # may be negative
    # a 2-D Linear keeps its bias (exported as Gemm, run as QGemm with the bias on the accumulator)
    fc = next(n for n in gm.graph.nodes if n.meta.get("layer") == "fc" and n.target is F.linear)
    assert fc.args[2] is not None and fc.args[2].op == "get_attr"
    assert [u.op for u in fc.users] == ["output"]


class SequenceLinear(nn.Module):
    """Linear layers on (batch, tokens, features): exported as MatMul + Add, not Gemm."""

    INPUT_SHAPE = (2, 5, 16)

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_2d_linear_keeps_its_bias_and_other_linears_are_split():
    gm = with_quantizers(cfg("uniform", 8, "uniform", 8), first_last="quant", factory=MLP)
    run_pass(QuantizeOutputs(), gm)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.linear:
            assert node.args[2] is not None, node.meta["layer"]
    # on 3-D inputs onnxruntime fuses DQ -> MatMul -> Q, not MatMul + Add: the bias moves behind the quantizer;
    # the last layer (a per-token head) becomes the 2-D Linear of its rows, keeps its bias and writes float logits
    gm = with_quantizers(cfg("uniform", 8, "uniform", 8), first_last="quant", factory=SequenceLinear)
    run_pass(QuantizeOutputs(), gm)
    assert {layer_of_output_quantizer(gm, q) for q in output_quantizers(gm)} == {"fc1"}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.linear:
            if node.meta["layer"] == "fc2":
                assert node.args[2] is not None and len(node.args[0].meta["tensor_meta"].shape) == 2
                continue
            assert len(node.args) < 3 or node.args[2] is None, node.meta["layer"]
            (q,) = node.users
            assert q.target in output_quantizers(gm)


def test_sequence_linear_w8a8_runs_on_qlinearmatmul_bit_exact(tmp_path):
    model = SequenceLinear().eval()
    calib = torch.randn(32, 5, 16, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, calib=calib, scheme="uniform", bits=8, keep_first_last="quant")
    assert_bit_exact(result.report)
    ops = optimized_op_counts(result.onnx_model, tmp_path)
    # the last layer, a per-token head, is the 2-D Linear of its rows: QGemm with float logits
    assert ops["QLinearMatMul"] == 1 and ops["QGemm"] == 1 and ops["MatMul"] == 0, ops


def test_int8_first_and_last_layers_around_apot_layers():
    gm = with_quantizers(cfg("apot", 4, "apot", 4), first_last="int8")
    run_pass(QuantizeOutputs(), gm)
    # fc gives the graph output (QGemm writes it in float); conv1's output goes through its ReLU to the APoT
    # quantizer of conv2, which decides on cells of conv1's accumulator (BindIntegerLayers): no 8-bit
    # re-quantization in between. Only the two layers the residual add reads (on 4-bit APoT inputs) get 8-bit
    # outputs: the add then sums codes (QLinearAdd) instead of running float beside two float convs
    added = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add))
    feeding = {gm.get_submodule(a.target) for a in added.args[:2] if a.op == "call_module"}
    assert set(output_quantizers(gm).values()) == feeding and len(feeding) == 2
    conv1 = next(n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("layer") == "conv1")
    fq, rect, repeat = cell_output(gm, conv1)
    assert fq.scheme == "apot" and fq.bits == 4 and is_rectifier(gm, rect)


def test_weights_off_the_int8_grid_get_no_output_quantizer():
    # 8-bit APoT weights have grid integers up to 904: no int8 kernel, nothing to do
    gm = with_quantizers(cfg("apot", 8, "uniform", 8), first_last="quant")
    code = gm.code
    result = QuantizeOutputs()(gm)
    assert result.modified is False and result.gm.code == code
    assert not output_quantizers(gm)


def test_second_run_reports_unmodified():
    gm = with_quantizers(cfg("uniform", 8, "uniform", 8), first_last="quant")
    run_pass(QuantizeOutputs(), gm)
    code = gm.code
    again = QuantizeOutputs()(gm)
    assert again.modified is False and again.gm.code == code


# --- BindIntegerLayers: bit-exact int8 layers -----------------------------------------------------------------------


def optimized_op_counts(onnx_model: onnx.ModelProto, tmp_path) -> collections.Counter:
    path = str(tmp_path / "optimized.onnx")
    session(onnx_model.SerializeToString(), optimized_model_path=path)
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


@pytest.fixture(scope="module")
def residual_w8a8():
    model = ResidualCNN(seed=0)
    calib = example_input(model, seed=1, batch=64)
    x = example_input(model, seed=2, batch=64)
    return qcompile.compile(model, calib=calib, validation_inputs=x, scheme="uniform", bits=8,
                            calib_method="minmax")


@pytest.fixture(scope="module")
def digits_w8a8():
    x_train, _, x_test, y_test = digits.load_split()
    result = qcompile.compile(digits.pretrained(), calib=x_train[:32], validation_inputs=x_test,
                              scheme="uniform", bits=8)
    return result, x_test, y_test


def assert_bit_exact(report):
    assert report.passed, report.summary()
    assert report.max_abs == 0.0
    assert report.extra["codes_total"] > 0 and report.extra["codes_differ"] == 0
    assert all(layer["codes_differ"] == 0 for layer in report.layers), report.layers


def test_residual_w8a8_onnx_equals_simulation_bit_for_bit(residual_w8a8, tmp_path):
    assert_bit_exact(residual_w8a8.report)
    ops = optimized_op_counts(residual_w8a8.onnx_model, tmp_path)
    assert ops["QLinearConv"] == 4 and ops["QGemm"] == 1, ops
    assert ops["Conv"] == 0 and ops["MatMul"] == 0 and ops["Gemm"] == 0, ops  # no layer left on float kernels


def test_digits_w8a8_onnx_equals_simulation_bit_for_bit(digits_w8a8, tmp_path):
    result, x_test, y_test = digits_w8a8
    assert result.report.samples == 500
    assert_bit_exact(result.report)
    ops = optimized_op_counts(result.onnx_model, tmp_path)
    assert ops["QLinearConv"] == 4 and ops["QGemm"] == 2, ops
    assert ops["Conv"] == 0 and ops["MatMul"] == 0 and ops["Gemm"] == 0, ops  # every layer on int8 kernels
    # same predictions, hence the same accuracy
    sess = session(result.onnx_model.SerializeToString())
    logits = sess.run(None, {"input": x_test.numpy()})[0]
    with torch.no_grad():
        sim = result.model(x_test).numpy()
    assert np.array_equal(logits, sim)
    assert digits.accuracy(logits, y_test) == digits.accuracy(sim, y_test)


def test_int8_layers_are_bound_and_a_second_run_changes_nothing(residual_w8a8):
    gm = residual_w8a8.model
    int8_fns = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function"
                                   and n.target in (int8_conv2d, int8_linear))
    assert int8_fns == {int8_conv2d: 4, int8_linear: 1}
    assert not any(n.target in (F.conv2d, F.linear) for n in gm.graph.nodes if n.op == "call_function")
    requantizing = [m for m in gm.modules() if isinstance(m, FakeQuantize) and m.requant is not None]
    assert len(requantizing) == 4  # one quantizer reads each int8 conv's accumulator
    (int_out,) = [m for m in gm.modules() if isinstance(m, IntegerOutput)]  # fc: float output from its accumulator
    assert int_out.acc_scale.numel() == 10
    code = gm.code
    again = BindIntegerLayers()(gm)
    assert again.modified is False and again.gm.code == code


def test_requantizing_simulation_is_dequantize_of_its_codes_bit_for_bit(residual_w8a8):
    """The simulation of a re-quantizer works on float codes in place; it must equal ``dequantize(quantize(y))``
    exactly, clamped ends included, for every int8 layer output."""
    from qcompile import quant

    gen = torch.Generator().manual_seed(5)
    for fq in (m for m in residual_w8a8.model.modules() if isinstance(m, FakeQuantize) and m.requant is not None):
        acc_scale, multiplier, _ = fq.requant
        channels = acc_scale.numel()
        reach = int(2 * 256 / float(multiplier.min()))  # past both ends of the code range
        acc = torch.randint(-reach, reach, (3, channels, 5, 5), generator=gen).double()
        y = acc * acc_scale.double().reshape(1, -1, 1, 1)  # integer accumulators on the S_x·S_w grid
        expected = quant.dequantize(fq.quantize(y), fq.alpha, fq.levelset, zero_point=fq.zero_point)
        codes = fq.quantize(y)
        assert int(codes.min()) == fq.levelset.code_min and int(codes.max()) == fq.levelset.code_max  # both clamps
        assert torch.equal(fq.simulate(y), expected)


class _Tailed(nn.Module):
    """A classifier whose logits reach the output through a float tail."""

    def __init__(self, tail: str):
        super().__init__()
        self.tail = tail
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 10)
        self.T = nn.Parameter(torch.tensor(1.5), requires_grad=False)

    def forward(self, x):
        lg = self.b(torch.relu(self.a(x)))
        if self.tail == "view":
            return lg.view(lg.shape[0], 10)
        if self.tail == "temperature":
            return lg / 2.0
        if self.tail == "log_softmax":
            return F.log_softmax(lg, -1)
        if self.tail == "parameter_temperature":
            return lg / self.T
        if self.tail == "scale_shift_slice":
            return (0.5 * lg + 1.0)[:, :5]
        if self.tail == "with_argmax":  # the predicted class beside the logits
            return lg, lg.argmax(1), torch.argmax(lg, dim=-1)
        if self.tail == "with_max":  # _, pred = lg.max(1); the top-3 as well
            _, pred = lg.max(1)
            return lg, pred, torch.topk(lg, 3, dim=1).indices
        return collections.namedtuple("Out", "logits hidden")(lg, x)


@pytest.mark.parametrize("tail", ["view", "temperature", "log_softmax", "namedtuple", "parameter_temperature",
                                  "scale_shift_slice", "with_argmax", "with_max"])
def test_logits_through_a_float_tail_come_out_of_qgemm_in_float(tmp_path, tail):
    """lg.view(B, 10), lg / T, log_softmax or a namedtuple after the classifier: its output got an 8-bit quantizer
    (one code per logit), 4-13 dB below the plain `return self.head(h)` file against float, validation PASS."""
    torch.manual_seed(0)
    model = _Tailed(tail).eval()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "t.onnx"
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, output=str(path), progress=False)
    assert result.report.passed
    assert not [n for n, _ in result.model.named_children() if n.startswith("out_fq")]  # no 8-bit logits
    opt = tmp_path / "opt.onnx"
    session(str(path), optimized_model_path=str(opt))
    ops = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    assert ops["QGemm"] == 2, ops


def test_a_per_token_head_runs_as_qgemm_with_float_logits(tmp_path):
    """Logits (B, T, C) of a Linear on (B, T, d), transposed for a cross-entropy over tokens: as MatMul the head
    needed an 8-bit output (per-token logits 37.3 dB against float, 46 for the same head on pooled features). It is
    now the 2-D Linear of its rows: Gemm, QGemm in onnxruntime, float logits; any batch size."""
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 5)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))).transpose(1, 2)

    torch.manual_seed(0)
    model = Tagger().eval()
    x = torch.randn(64, 7, 8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "t.onnx"
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, output=str(path), progress=False)
    assert result.report.passed
    # one 8-bit output: the first layer's, for its QLinearMatMul; none on the logits
    assert [n for n, _ in result.model.named_children() if n.startswith("out_fq")] == ["out_fq0"]
    opt = tmp_path / "opt.onnx"
    sess = session(str(path), optimized_model_path=str(opt))
    ops = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    assert ops["QGemm"] == 1, ops
    out = sess.run(None, {"input": x[:3].numpy()})[0]
    with torch.no_grad():
        ref = model(x[:3]).numpy()
    assert out.shape == (3, 5, 7)
    assert 10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()) > 30


class _WideTanh(nn.Module):
    """Half the units saturated by biases of ±100 (a Linear on raw tabular features), half in tanh's sensitive
    region: an 8-bit output over the whole span had a step of 0.8 there."""

    def __init__(self, fn: str, rank3: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.a = nn.Linear(8, 32)
        self.b = nn.Linear(32, 4)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(32, 8, generator=gen) * 0.5)
            self.a.bias.copy_(torch.cat([torch.randn(16, generator=gen), torch.tensor([100.0, -100.0]).repeat(8)]))
            self.b.weight.copy_(torch.randn(4, 32, generator=gen))
        self.fn, self.rank3 = fn, rank3

    def forward(self, x):
        if self.rank3:
            x = x.unflatten(1, (2, 4)).repeat(1, 1, 2)  # (B, 2, 8): a Linear on tokens (MatMul + bias add)
        h = self.a(x)
        h = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "hardtanh": lambda t: F.hardtanh(t, -2.0, 2.0)}[self.fn](h)
        out = self.b(h)
        return out.flatten(1) if self.rank3 else out


@pytest.mark.parametrize("fn,rank3", [("tanh", False), ("sigmoid", False), ("hardtanh", False), ("tanh", True)])
def test_an_output_feeding_tanh_is_calibrated_on_what_tanh_can_tell_apart(fn, rank3):
    """An 8-bit layer output that only tanh/sigmoid/a clip reads is calibrated on values clamped to where the
    function saturates (shifted by the bias where the bias is added after the re-quantization): the file keeps the
    function's sensitive region (a trained raw-feature wine MLP: 81.5 % -> 92.6 %, float's)."""
    from qcompile.passes.quantize_outputs import saturation_bounds

    model = _WideTanh(fn, rank3).eval()
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(12))
    result = qcompile.compile(model, x[:1], calib=x[:64], scheme="uniform", bits=8)
    assert result.report.passed
    bounds = [fq.saturation for fq in output_quantizers(result.model).values()]
    assert len(bounds) == 1 and bounds[0] is not None
    limit = {"tanh": 10.0, "sigmoid": 17.0, "hardtanh": 2.0}[fn]
    if rank3:  # the bias is added after the quantizer: the bounds move by the bias' extremes
        assert bounds[0] == pytest.approx((-limit - float(model.a.bias.max()), limit - float(model.a.bias.min())))
    else:
        assert bounds[0] == (-limit, limit)
    with torch.no_grad():
        want, got = model(x[64:]), result.model(x[64:])
    assert 10 * torch.log10(want.pow(2).sum() / (want - got).pow(2).sum()) > 34  # 19 dB (tanh) without the bounds
    # the per-quantizer report measures the output quantizer against the clamped float values (what tanh reads)
    layer = next(l for l in result.report.layers if l["quantizer"].startswith("out_fq"))
    assert layer["sqnr_vs_float_db"] > 30
    # a reader that does not saturate (a second, linear use of the same output) leaves the range alone
    gm = trace(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), torch.randn(1, 4))
    layer_node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "0")
    assert saturation_bounds(gm, layer_node) == (-10.0, 10.0)
    with gm.graph.inserting_after(layer_node):
        gm.graph.call_function(torch.add, (layer_node, layer_node))
    assert saturation_bounds(gm, layer_node) is None


def test_a_linear_read_only_by_a_layernorm_writes_float_from_qgemm(tmp_path):
    """LayerNorm divides each row by the row's own spread: after an 8-bit output with one step for the whole tensor
    (here set by offsets of ±50 that LayerNorm removes), narrow rows came out with large errors (raw breast-cancer
    MLP at W8A8: 93.6 % against 97.7 % float). The Linear now runs as QGemm writing float, as a classifier does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[0].weight[:, 0] = 50.0  # feature 0 moves each row by up to ±50, which LayerNorm takes out again
    x = torch.rand(256, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    path = tmp_path / "ln.onnx"
    # u8 weights: the same full-precision file on every CPU (auto is s8-safe on x86 without VNNI, whose wider
    # steps for the 50s cost about 3 dB here)
    result = qcompile.compile(model, x[:1], calib=x[:64], scheme="uniform", bits=8, output=str(path),
                              int8_weights="u8")
    assert result.report.passed
    assert not output_quantizers(result.model)  # neither Linear re-quantizes its output
    opt = tmp_path / "opt.onnx"
    session(str(path), optimized_model_path=str(opt))
    ops = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    assert ops["QGemm"] == 2, ops
    with torch.no_grad():
        want, got = model(x[64:]), result.model(x[64:])
    assert 10 * torch.log10(want.pow(2).sum() / (want - got).pow(2).sum()) > 22  # 10.5 dB with the 8-bit output


class _Normed(nn.Module):
    """A layer read only by a per-sample normalization: conv → InstanceNorm / GroupNorm, or a Linear on (B, T, d)
    tokens → LayerNorm; two channels (features) far narrower than the rest."""

    def __init__(self, norm: str):
        super().__init__()
        self.norm_kind = norm
        if norm == "layer3d":
            self.layer, self.norm = nn.Linear(8, 16), nn.LayerNorm(16)
        else:
            self.layer = nn.Conv2d(3, 16, 3, padding=1)
            self.norm = nn.InstanceNorm2d(16, affine=True) if norm == "instance" else nn.GroupNorm(4, 16)
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            self.layer.weight[:2] *= 0.01  # the narrow ones, which the norm scales back up

    def forward(self, x):
        y = F.relu(self.norm(self.layer(x)))
        return self.head(y.mean((2, 3)) if self.norm_kind != "layer3d" else y.mean(1))


@pytest.mark.parametrize("norm,gain", [("instance", 20.0), ("group", 2.0), ("layer3d", 1.0)])
def test_a_layer_read_only_by_a_per_sample_norm_keeps_its_output_float(norm, gain, monkeypatch):
    """An 8-bit output has one step for the whole tensor, and InstanceNorm / GroupNorm / LayerNorm divide each
    channel, group or row of each sample by its own spread: a conv before an InstanceNorm lost 8.6 dB at W8A8 (29.2
    against 37.8 dB in a sweep), a Linear on tokens before a LayerNorm 4.1 dB (only the 2-D Linear had QGemm's
    float output). Such a layer now keeps its output float, as a 2-D Linear does."""
    torch.manual_seed(0)
    model = _Normed(norm).eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(96, 6, 8, generator=gen) if norm == "layer3d" else torch.randn(96, 3, 8, 8, generator=gen)
    result = qcompile.compile(model, x[:1], calib=x[:32], scheme="uniform", bits=8, keep_first_last="quant",
                              validation_inputs=x[32:])
    assert result.report.passed, result.report.summary()
    assert not any(isinstance(m, FakeQuantize) and name.startswith("out_fq")
                   for name, m in result.model.named_modules()), "the layer before the norm re-quantizes its output"
    # measured: 53.9 / 46.2 / 45.2 dB against 29.7 / 43.5 / 43.3 with the 8-bit output (layer3d since Calibrate's
    # tail headroom, whose wider input range costs these Gaussian tokens 1-2 dB held out: 42.9 against 41.7)
    import qcompile.passes.quantize_outputs as quantize_outputs

    monkeypatch.setattr(quantize_outputs, "_normalized_only", lambda node: False)  # as before
    before = qcompile.compile(model, x[:1], calib=x[:32], scheme="uniform", bits=8, keep_first_last="quant",
                              validation_inputs=x[32:])
    assert result.report.extra["sqnr_vs_float_db"] > before.report.extra["sqnr_vs_float_db"] + gain


class PooledHead(nn.Module):
    """conv → ReLU → pool → conv → ReLU → pool → flatten → Linear: at W4A4 (first and last layers at 8 bits) the
    second conv reads 4-bit codes and its output reaches the classifier's 8-bit input through a pool and a
    flatten."""

    def __init__(self, pool: str):
        super().__init__()
        two_d = pool != "adaptive1d"
        conv = nn.Conv2d if two_d else nn.Conv1d
        self.c1 = conv(1 if two_d else 8, 8, 3, padding=1)
        self.c2 = conv(8, 16, 3, padding=1)
        self.p1 = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), "adaptive1d": nn.Identity(),
                   "adaptive2d_fn": nn.MaxPool2d(2)}[pool]
        self.p2 = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), "adaptive1d": nn.AdaptiveMaxPool1d(1),
                   "adaptive2d_fn": lambda t: F.adaptive_max_pool2d(t, 2)}[pool]
        self.fc = nn.Linear(16 * 4 if two_d else 16, 10)

    def forward(self, x):
        x = self.p1(F.relu(self.c1(x)))
        return self.fc(torch.flatten(self.p2(F.relu(self.c2(x))), 1))


@pytest.mark.parametrize("pool", ["max", "avg", "adaptive1d", "adaptive2d_fn"])
@pytest.mark.parametrize("scheme", ["uniform", "apot"])
def test_a_layer_on_sub_8_bit_codes_feeding_an_8_bit_classifier_runs_on_int8_kernels(pool, scheme, tmp_path):
    torch.manual_seed(0)
    model = PooledHead(pool).eval()
    shape = (64, 1, 8, 8) if pool != "adaptive1d" else (64, 8, 8)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, calib=x[:32], validation_inputs=x[32:], scheme=scheme, bits=4)
    assert result.report.passed, result.report.summary()
    outputs = [r for t in result.timings if t.name == "QuantizeOutputs" for r in t.report]
    assert any(r.startswith("c2") for r in outputs), outputs  # before: only the 8-bit input layer c1 had one
    ops = optimized_op_counts(result.onnx_model, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1, ops
    assert ops["Conv"] == ops["FusedConv"] == 0, ops  # c2 was a float (Fused)Conv at W4A4, a QLinearConv at W8A8


class PoolBetween(nn.Module):
    """c1 → ReLU → c2 → ReLU → max-pool → c3 → ReLU → flatten → fc: at W4A4 c2 reads 4-bit codes and its output
    reaches c3's 4-bit quantizer through the max-pool."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        return self.fc(torch.flatten(F.relu(self.c3(x)), 1))


@pytest.mark.parametrize("scheme", ["uniform", "apot"])
def test_a_layer_before_a_max_pool_and_a_sub_8_bit_quantizer_runs_on_int8_kernels(scheme, tmp_path):
    """Uniform 4-bit levels after a max-pool: the layer writes 8-bit codes that the 4-bit quantizer re-quantizes (as
    after an 8-bit-input layer); it ran as a float FusedConv. APoT levels there are decided on cells instead."""
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(PoolBetween().eval(), calib=x[:32], validation_inputs=x[32:], scheme=scheme, bits=4)
    assert result.report.passed and result.report.extra["codes_differ"] == 0, result.report.summary()
    outputs = [r for t in result.timings if t.name == "QuantizeOutputs" for r in t.report]
    assert any(r.startswith("c2") for r in outputs) == (scheme == "uniform"), outputs
    ops = optimized_op_counts(result.onnx_model, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["Conv"] == ops["FusedConv"] == 0, ops
    float_levels = qcompile.compile(PoolBetween().eval(), calib=x[:32], scheme=scheme, bits=4, int8_levels=False,
                                    validate=False)
    assert not any(r.startswith("c2") for t in float_levels.timings if t.name == "QuantizeOutputs" for r in t.report)


def test_may_have_codes_decides_each_node_once(monkeypatch):
    """Sums of shared sums (``z = z + z`` repeated) were walked once per path: 2^20 calls for 20 doublings."""
    import qcompile.passes.quantize_outputs as qo

    class Doubling(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 2, 1, 1))

        def forward(self, x):
            z = F.conv2d(x, self.w)  # the functional form the passes see after SelectLayers
            for _ in range(20):
                z = z + z
            return z

    gm = trace(Doubling().eval(), torch.randn(1, 2, 4, 4))
    calls = []
    monkeypatch.setattr(qo, "_has_codes", lambda gm, node: calls.append(node) or False)
    last = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    assert qo._may_have_codes(gm, last)  # a sum of sums of a convolution's output
    assert len(calls) <= 25, len(calls)


class Relu6Net(nn.Module):
    """conv -> ReLU6 -> conv -> hardtanh(0, 6) -> linear, with weights large enough that many outputs saturate."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)
        with torch.no_grad():
            self.c1.weight.mul_(10)
            self.c2.weight.mul_(10)

    def forward(self, x):
        x = F.relu6(self.c1(x))
        x = F.hardtanh(self.c2(x), 0.0, 6.0)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("scheme,bits", [("uniform", 2), ("uniform", 4), ("apot", 4)])
def test_relu6_left_to_saturation_gives_the_kernels_top_code(scheme, bits):
    # A ReLU6 between an int8 layer and its 8-bit output quantizer is left to the kernel's saturation; the
    # simulation clipped the exact accumulator value to 6.0 and re-rounded that onto the accumulator grid, which
    # with 2- or 4-bit inputs and weights is coarser than the output step: codes 253/254 where onnxruntime's
    # saturation gives 255 (validation FAILed on 1.1% of one quantizer's codes; here 33044 of them at W4A4)
    model = Relu6Net().eval()
    x = torch.randn(64, 3, 8, 8) * 3
    result = qcompile.compile(model, x[:1], calib=x[:32], validation_inputs=x, scheme=scheme, bits=bits)
    tops = [m.requant_top for m in result.model.modules() if isinstance(m, FakeQuantize) and m.requant is not None]
    assert 6.0 in tops
    extra = result.report.extra
    assert result.report.passed and extra["codes_differ"] == 0, result.report.summary()


class TalkingHeads(nn.Module):
    """conv → 1x1 conv over the heads → softmax → 1x1 conv, EfficientFormerV2's attention talking heads."""

    def __init__(self):
        super().__init__()
        self.c0, self.th1, self.th2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.th2(self.th1(self.c0(x)).softmax(dim=-1))


def test_a_layer_before_a_requantized_softmax_keeps_its_output_float(monkeypatch):
    # With 8-bit codes on th1's output the file held DequantizeLinear → Softmax → QuantizeLinear, which onnxruntime
    # fuses into com.microsoft.QLinearSoftmax (a table of exp, a float sum, 1 / floor(1 / S_y) as output scale):
    # not the float softmax of the simulation (timm's efficientformerv2_s0 FAILed validation on 14-19 % of the codes
    # after its softmax; here 12 % of one quantizer's codes at W8A8)
    torch.manual_seed(0)
    model = TalkingHeads().eval()
    x = torch.randn(64, 4, 8, 8) * 3
    kw = dict(calib=x[:32], validation_inputs=x[32:], scheme="uniform", bits=8)
    result = qcompile.compile(model, x[:1], **kw)
    assert result.report.passed and result.report.extra["codes_differ"] == 0, result.report.summary()
    import qcompile.passes.quantize_outputs as quantize_outputs

    monkeypatch.setattr(quantize_outputs, "_reaches_requantized_softmax", lambda gm, node: False)  # as before
    before = qcompile.compile(model, x[:1], **kw)
    assert not before.report.passed


class RadixSoftmax(nn.Module):
    """ResNeSt's split attention: the softmax over the radix weighs float features (a product), nothing
    re-quantizes it."""

    def __init__(self):
        super().__init__()
        self.c0, self.fc1 = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc2, self.out = nn.Conv2d(8, 16, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = F.relu(self.c0(x))
        a, b = x.chunk(2, 1)
        w = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(a + b, 1)))).view(x.shape[0], 2, 8, 1, 1).softmax(dim=1)
        return self.out(a * w[:, 0] + b * w[:, 1])


def test_a_layer_before_a_softmax_nothing_requantizes_keeps_its_8_bit_output():
    # DequantizeLinear → Softmax with a float reader is not fused: fc2 still runs as QLinearConv
    torch.manual_seed(0)
    x = torch.randn(64, 4, 8, 8)
    result = qcompile.compile(RadixSoftmax().eval(), x[:1], calib=x[:32], validation_inputs=x[32:],
                              scheme="uniform", bits=8)
    assert result.report.passed and result.report.extra["codes_differ"] == 0, result.report.summary()
    quantized = [n.args[0].meta.get("layer") for n in result.model.graph.nodes
                 if n.op == "call_module" and n.target.startswith("out_fq")]
    assert "fc2" in quantized, quantized
