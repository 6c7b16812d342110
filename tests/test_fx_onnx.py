"""The direct fx -> ONNX fast path (``qcompile.fx_onnx``) against ``torch.onnx.export``: for every model it takes,
the compiled file is the one the TorchScript path gives (same nodes, attributes, initializers, metadata, inputs
and outputs; node names may differ), in every emission form; a node it does not handle falls back. The one
structural difference, bit-identical parameters read from one initializer instead of through Identity nodes, has
its own test."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

import qcompile
from qcompile import fx_onnx
from qcompile.models import digits
from tests.models import MLP, DepthwiseSeparableNet, MobileNetLike, ResidualCNN, example_input, randomize_batchnorm


class PoolsAndClips(nn.Module):
    """The layer forms the fast path handles beyond the test models: strided, dilated, grouped and bias-free
    convolutions, ReLU6 and Hardtanh (Clip), ceil-mode and padded max pooling, Conv1d, global pooling by module
    and by function, x.flatten(1), eval-mode Dropout, Identity."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.clip = nn.Hardtanh(-1.5, 2.0)
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.gap = nn.AdaptiveAvgPool2d((1, 1))
        self.drop = nn.Dropout(0.3)
        self.skip = nn.Identity()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.act(self.bn(self.c1(x)))
        y = y + F.relu(self.dw(y))
        y = self.pool(self.clip(y))
        a = self.gap(y).flatten(1)
        b = torch.flatten(F.adaptive_avg_pool2d(self.skip(y), 1), 1)
        return self.fc(self.drop(torch.add(a, b)))


class GatedNet(nn.Module):
    """Squeeze-excite gates and smooth activations: SiLU (written as Sigmoid and Mul), Hardswish, Hardsigmoid,
    sigmoid by module, function and method, and products that broadcast (a gate times its features) by operator,
    function and method. At W8A8 the gates' products and sigmoids become qcompile's Int8Mul / Int8Sigmoid."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1, self.act1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2, self.gate = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1), nn.Hardsigmoid()
        self.c2, self.bn2, self.act2 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.Hardswish()
        self.c3, self.g1, self.g2, self.sig = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Sigmoid()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.act1(self.bn1(self.c1(x)))
        y = y * self.gate(self.fc2(F.relu(self.fc1(self.pool(y)))))
        y = F.silu(self.c3(self.act2(self.bn2(self.c2(y)))))
        y = torch.mul(y, torch.sigmoid(self.g1(y)))
        y = F.hardswish(y.mul(self.sig(self.g2(y)).sigmoid()))
        return self.fc(torch.flatten(self.pool(y), 1))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(8 * 8, 3)

    def forward(self, x):
        y = F.relu(self.c1(x))
        y = self.pool(F.relu(self.c2(y)) + y)
        return self.fc(torch.flatten(y, 1))


class Branches(nn.Module):
    """Inception- and DenseNet-style concatenations along the channels: ``torch.cat`` of three branches (one behind
    a max-pool), then ``torch.concat`` of a tuple with a negative dim, reading the first cat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1, self.b2, self.b3 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 2, 1)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.grow = nn.Conv2d(12, 4, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.b1(y)), F.relu(self.b2(y)), F.relu(self.b3(self.pool(y)))], 1)
        y = torch.concat((y, F.relu(self.grow(y))), dim=-3)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class DenseLike(nn.Module):
    """A DenseNet block and transition: BatchNorms that read a concatenation (left unfolded by the passes) and
    average pools (the transition's, a padded one without the padding in its count, a ceil-mode one)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.n1, self.c1 = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.n2, self.c2 = nn.BatchNorm2d(12), nn.Conv2d(12, 4, 3, padding=1, bias=False)
        self.nt, self.ct = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)
        self.pad_pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.ceil_pool = nn.AvgPool2d(3, 2, ceil_mode=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.stem(x)
        y = torch.cat([y, self.c1(F.relu(self.n1(y)))], 1)
        y = torch.cat([y, self.c2(F.relu(self.n2(y)))], 1)
        y = self.pool(self.ct(F.relu(self.nt(y))))
        y = self.ceil_pool(self.pad_pool(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class NormedMLP(nn.Module):
    """BatchNorm1d on a (batch, features) tensor after a ReLU (no layer to fold it into before it)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.bn(F.relu(self.a(x))))


class _LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d: channels-last layer norm between two permutes."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """A ConvNeXt block as torchvision writes it: depthwise conv, ``torch.permute`` to channels-last, LayerNorm,
    Linear-GELU-Linear on the 4-D tokens, back to channels-first, a per-channel layer scale, the residual add; the
    stem's and the head's LayerNorm2d (``x.permute`` and ``F.layer_norm``), GELU by function too."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(3, 8, 2, stride=2), _LayerNorm2d(8, eps=1e-6)
        self.dw, self.norm = nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.LayerNorm(8, eps=1e-6)
        self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8).reshape(8, 1, 1))
        self.head_norm, self.head = _LayerNorm2d(8, eps=1e-6), nn.Linear(8, 5)
        with torch.no_grad():
            for norm in (self.stem_norm, self.norm, self.head_norm):  # not the ones and zeros of every other one
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        y = torch.permute(self.dw(x), [0, 2, 3, 1])
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        x = x + self.scale * torch.permute(y, [0, 3, 1, 2])
        x = self.head_norm(F.adaptive_avg_pool2d(self.act(x), 1))
        return self.head(torch.flatten(x, 1))


class BiasFreeMLP(nn.Module):
    """Linear layers without a bias: ``MatMul`` of the transposed (quantized) weight, as on 4-D tokens."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8, bias=False), nn.Linear(8, 8, bias=False), nn.Linear(8, 3)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class ViewHead(nn.Module):
    """``x.view(x.size(0), -1)``: not a fast-path node (it exports as Shape/Gather/Reshape)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))


def _canonical(model: onnx.ModelProto):
    """Everything of the file but node names and the shift-add records (which name nodes)."""
    nodes = [(n.op_type, n.domain, tuple(n.input), tuple(n.output),
              tuple(sorted((a.name, a.SerializeToString()) for a in n.attribute))) for n in model.graph.node]
    inits = {t.name: (t.data_type, numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer}
    meta = {p.key: p.value for p in model.metadata_props if p.key != "qcompile.shift_add"}
    io = [v.SerializeToString() for v in list(model.graph.input) + list(model.graph.output)]
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    return nodes, inits, meta, io, opsets, model.ir_version


def _compile_both(monkeypatch, model, x, **options):
    """Compile with the fast path and with torch.onnx.export; also whether the fast path wrote the first."""
    taken = []
    real = fx_onnx.export_fx

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(fx_onnx, "export_fx", spy)
    monkeypatch.delenv(fx_onnx.ENV_SWITCH, raising=False)
    fast = qcompile.compile(model, x[:1], calib=x, validate=False, **options)
    monkeypatch.setenv(fx_onnx.ENV_SWITCH, "torchscript")
    slow = qcompile.compile(model, x[:1], calib=x, validate=False, **options)
    monkeypatch.delenv(fx_onnx.ENV_SWITCH)
    return fast, slow, taken[0]


def _run(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    from qcompile.runtime.session import session

    sess = session(model.SerializeToString())
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


CONFIGS = {
    "uniform8": {"scheme": "uniform", "bits": 8},
    "apot4": {"scheme": "apot", "bits": 4},
    "apot4w-a8": {"scheme": "apot", "bits": 4, "wscheme": "apot", "wbits": 4, "ascheme": "uniform", "abits": 8},
    "pot4-custom": {"scheme": "pot", "bits": 4, "emit": "custom"},
    "apot4-shift-add": {"scheme": "apot", "bits": 4, "emit": "shift-add"},
    "uniform3-float-levels": {"scheme": "uniform", "bits": 3, "int8_levels": False},
}


def _digits():
    return digits.pretrained(), digits.calibration_inputs()[:16]


def _model(factory, shape=None):
    def build():
        model = randomize_batchnorm(factory(), seed=3).eval() if shape is not None else factory(seed=1).eval()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(4)) if shape is not None else \
            example_input(model, seed=2, batch=8)
        return model, x
    return build


MODELS = {
    "digits": _digits,
    "residual": _model(ResidualCNN),
    "mobilenet-like": _model(MobileNetLike),
    "depthwise": _model(DepthwiseSeparableNet),
    "mlp": _model(MLP),
    "pools-and-clips": _model(PoolsAndClips, (8, 3, 16, 16)),
    "conv1d": _model(Conv1dNet, (8, 4, 32)),
    "gated": _model(GatedNet, (8, 3, 16, 16)),
    "branches": _model(Branches, (8, 3, 16, 16)),
    "dense": _model(DenseLike, (8, 3, 16, 16)),
    "normed-mlp": _model(NormedMLP, (8, 6)),
    "convnext": _model(ConvNeXtLike, (8, 3, 16, 16)),
    "bias-free-mlp": _model(BiasFreeMLP, (8, 6)),
}


# every configuration on two models, the two main ones on the others
CASES = [(name, config) for name in MODELS for config in CONFIGS
         if name in ("digits", "pools-and-clips", "gated", "branches", "convnext") or config in ("uniform8", "apot4")]


@pytest.mark.parametrize("name,config", CASES)
def test_fast_path_writes_the_file_torch_onnx_export_gives(monkeypatch, name, config):
    model, x = MODELS[name]()
    fast, slow, taken = _compile_both(monkeypatch, model, x, **CONFIGS[config])
    assert taken, "the fast path fell back"
    assert _canonical(fast.onnx_model) == _canonical(slow.onnx_model)
    np.testing.assert_array_equal(_run(fast.onnx_model, x), _run(slow.onnx_model, x))


def test_fast_path_file_validates_against_the_simulation():
    model, x = _digits()
    result = qcompile.compile(model, x[:1], calib=x, scheme="apot", bits=4)
    assert result.report.passed, result.report.failures
    onnx.checker.check_model(result.onnx_model, full_check=True)


def test_functional_layers_are_named_after_the_module_that_owns_the_weight():
    model, x = _digits()
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, validate=False)
    names = {n.name for n in result.onnx_model.graph.node}
    # torch.onnx.export names these /Conv, /Conv_1, ..., /Gemm_1 (the int8 layers are functions in the graph)
    assert {"/conv1/Conv", "/conv2/Conv", "/down/Conv", "/fc1/Gemm", "/fc2/Gemm"} <= names, sorted(names)


@pytest.mark.parametrize("factory,shape", [(ViewHead, (4, 3, 8, 8))])
def test_other_nodes_fall_back_to_torch_onnx_export(monkeypatch, factory, shape):
    model, x = _model(factory, shape)()
    fast, slow, taken = _compile_both(monkeypatch, model, x, scheme="uniform", bits=8)
    assert not taken
    assert _canonical(fast.onnx_model) == _canonical(slow.onnx_model)


def test_fp32_with_batchnorm_falls_back_and_the_environment_switch_forces_torchscript(monkeypatch):
    model, x = _digits()
    gm = qcompile.frontend.trace(model, x[:1])
    assert fx_onnx.export_fx(gm, (x[:1],), 20) is None  # BatchNorm is left to the TorchScript exporter's folding
    mlp = nn.Sequential(nn.Linear(6, 4), nn.LeakyReLU(0.2), nn.Linear(4, 2)).eval()
    y = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    gm = qcompile.frontend.trace(mlp, y[:1])
    assert fx_onnx.export_fx(gm, (y[:1],), 20) is not None
    monkeypatch.setenv(fx_onnx.ENV_SWITCH, "torchscript")
    assert fx_onnx.export_fx(gm, (y[:1],), 20) is None


def test_two_outputs_and_a_static_batch(monkeypatch):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 2)

        def forward(self, x):
            h = F.relu(x)
            return self.a(h), self.b(h)

    model = TwoHeads().eval()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    gm = qcompile.frontend.trace(model, x)
    fast = fx_onnx.export_fx(gm, (x,), 20, dynamic_batch=False)
    assert [o.name for o in fast.graph.output] == ["output_0", "output_1"]
    assert [d.dim_value for d in fast.graph.input[0].type.tensor_type.shape.dim] == [3, 6]
    monkeypatch.setenv(fx_onnx.ENV_SWITCH, "torchscript")
    slow = qcompile.export.export_onnx(gm, (x,), dynamic_batch=False)
    assert [v.SerializeToString() for v in fast.graph.output] == [v.SerializeToString() for v in slow.graph.output]
    np.testing.assert_array_equal(_run(fast, x), _run(slow, x))


def test_bit_identical_parameters_are_stored_once(monkeypatch):
    """Layers cloned and not trained apart: the TorchScript exporter stores their weights once (the copy through an
    Identity); the fast path reads the first initializer directly. Same outputs, no larger file."""
    import copy

    class Cloned(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.b = copy.deepcopy(self.a)
            self.c = nn.Linear(64, 3)

        def forward(self, x):
            return self.c(F.relu(self.b(F.relu(self.a(x)))))

    model = Cloned().eval()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for options in ({"scheme": "fp32"}, {"scheme": "uniform", "bits": 8}):
        fast, slow, taken = _compile_both(monkeypatch, model, x, **options)
        assert taken
        assert len(fast.onnx_model.SerializeToString()) <= len(slow.onnx_model.SerializeToString()) + 16
        np.testing.assert_array_equal(_run(fast.onnx_model, x), _run(slow.onnx_model, x))
    fp32 = qcompile.compile(model, x[:1], scheme="fp32", validate=False).onnx_model
    assert sorted(t.name for t in fp32.graph.initializer) == ["a.bias", "a.weight", "c.bias", "c.weight"]


class Reused(nn.Module):
    """One conv module called twice (its weight quantizer too), one ReLU6 module shared by two layers, the same
    F.relu6 twice on one tensor (merged into one Clip), and nested blocks whose modules share attribute names."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU6()
        self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()),
                                    nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.act(self.c(x))
        y = self.act(self.c(y))
        y = F.relu6(y) + F.relu6(y)
        y = self.blocks(y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class UnusedInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x, unused):
        return self.fc(F.relu(x))


@pytest.mark.parametrize("options", [{"scheme": "fp32"}, {"scheme": "uniform", "bits": 8}, {"scheme": "apot", "bits": 4},
                                     {"scheme": "apot", "bits": 4, "emit": "shift-add"}],
                         ids=["fp32", "uniform8", "apot4", "apot4-shift-add"])
def test_reused_modules_and_merged_calls_give_the_torchscript_file(monkeypatch, options):
    model = Reused().eval()
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    fast, slow, taken = _compile_both(monkeypatch, model, x, **options)
    assert taken
    assert _canonical(fast.onnx_model) == _canonical(slow.onnx_model)  # fp32: tensor names included
    if options["scheme"] == "fp32":
        assert [n.op_type for n in fast.onnx_model.graph.node].count("Clip") == 3  # act twice, F.relu6 pair once
    else:
        assert fast.report is None and slow.report is None  # validate=False in _compile_both
        result = qcompile.compile(model, x[:1], calib=x, **options)
        assert result.report.passed, result.report.failures


def test_an_unused_input_is_dropped_as_torchscript_does(monkeypatch):
    model = UnusedInput().eval()
    x = (torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), torch.randn(4, 2))
    gm = qcompile.frontend.trace(model, tuple(t[:1] for t in x))
    fast = fx_onnx.export_fx(gm, tuple(t[:1] for t in x), 20)
    monkeypatch.setenv(fx_onnx.ENV_SWITCH, "torchscript")
    slow = qcompile.export.export_onnx(gm, tuple(t[:1] for t in x))
    assert [i.name for i in fast.graph.input] == [i.name for i in slow.graph.input] == ["x"]


class SamePadding(nn.Module):
    """``padding="same"`` (dilated, even kernel: the odd pad on the right) and ``"valid"``, which onnxruntime
    refused at run time when written as ``auto_pad = SAME_UPPER`` with a dilation ("Dilation not supported")."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding="same", dilation=2)
        self.b = nn.Conv2d(6, 6, 4, padding="same")
        self.c = nn.Conv2d(6, 4, (3, 2), padding="same", dilation=(1, 3), bias=False)
        self.d = nn.Conv2d(4, 4, 3, padding="valid")
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = F.relu(self.b(y)) + y
        y = self.d(F.relu(self.c(y)))
        return self.fc(torch.flatten(y, 1))


class SamePadding1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 4, 3, padding="same", dilation=2)

    def forward(self, x):
        return self.a(x)


@pytest.mark.parametrize("factory,shape", [(SamePadding, (4, 3, 8, 8)), (SamePadding1d, (4, 2, 16))])
@pytest.mark.parametrize("options", [{"scheme": "fp32"}, {"scheme": "uniform", "bits": 8}],
                         ids=["fp32", "uniform8"])
def test_same_padding_is_written_as_explicit_pads_on_both_paths(monkeypatch, factory, shape, options):
    model, x = _model(factory, shape)()
    fast, slow, taken = _compile_both(monkeypatch, model, x, **options)
    # quantized, "same" becomes an F.pad of the quantized input (insert_quant), which falls back
    assert taken or options["scheme"] != "fp32", "the fast path fell back"
    for result in (fast, slow):
        for node in result.onnx_model.graph.node:
            assert all(a.name != "auto_pad" for a in node.attribute), node
        onnx.checker.check_model(result.onnx_model, full_check=True)
    assert _canonical(fast.onnx_model) == _canonical(slow.onnx_model)
    got = _run(fast.onnx_model, x)  # onnxruntime raised "Dilation not supported for AutoPadType::SAME_UPPER"
    if options["scheme"] == "fp32":
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got, _run(slow.onnx_model, x))


def test_torchscript_same_pads_are_made_explicit():
    conv = onnx.helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", kernel_shape=[4, 3],
                                 dilations=[1, 2])
    lower = onnx.helper.make_node("Conv", ["x", "w"], ["z"], auto_pad="SAME_LOWER", kernel_shape=[4, 3])
    strided = onnx.helper.make_node("Conv", ["x", "w"], ["s"], auto_pad="SAME_UPPER", kernel_shape=[3, 3],
                                    strides=[2, 2])
    valid = onnx.helper.make_node("Conv", ["x", "w"], ["v"], auto_pad="VALID", kernel_shape=[3, 3])
    graph = onnx.helper.make_graph([conv, lower, strided, valid], "g", [], [])
    from qcompile.export import explicit_same_pads

    nodes = explicit_same_pads(onnx.helper.make_model(graph)).graph.node
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert "auto_pad" not in attrs[0] and attrs[0]["pads"] == [1, 2, 2, 2]  # d*(k-1) = 3, 4: odd one at the end
    assert "auto_pad" not in attrs[1] and attrs[1]["pads"] == [2, 1, 1, 1]  # SAME_LOWER: at the beginning
    assert attrs[2]["auto_pad"] == b"SAME_UPPER"  # strided: depends on the input size, left alone
    assert attrs[3] == {"kernel_shape": [3, 3]}


def test_fp32_batchnorms_the_torchscript_exporter_keeps_take_the_fast_path(monkeypatch):
    """An fp32 compile folds no BatchNorm: the TorchScript exporter folds those that alone read a Conv (the digits
    model's: the fast path falls back, above) and keeps the others (after a concatenation, or a Conv whose output
    is read twice), which the fast path writes as it does."""
    for name, norms in (("dense", 3), ("normed-mlp", 1)):
        model, x = MODELS[name]()
        fast, slow, taken = _compile_both(monkeypatch, model, x, scheme="fp32")
        assert taken, f"{name}: the fast path fell back"
        assert _canonical(fast.onnx_model) == _canonical(slow.onnx_model)
        assert sum(n.op_type == "BatchNormalization" for n in fast.onnx_model.graph.node) == norms
