"""FoldConstants: what a model computes from its parameters alone is computed once, and the layers reading it are
quantized like any other."""
from __future__ import annotations

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcompile
from qcompile.frontend import trace
from qcompile.passes import FoldConstants
from qcompile.summary import layer_lines


class StdConv2d(nn.Conv2d):
    """Weight standardization as in BiT (timm's StdConv2d): the weight is normalised in forward."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """NFNet-style: standardized weight times a learned per-channel gain."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, self.out_channels).reshape(-1, 1, 1, 1))

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var * w[0].numel() + 1e-4) * self.gain
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class GainLinear(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in) * 0.2)
        self.g = nn.Parameter(torch.rand(n_out) + 0.5)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return F.linear(x, self.w * self.g[:, None], self.b)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = StdConv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.c2 = ScaledStdConv2d(16, 32, 3, stride=2, padding=1)
        self.c3 = StdConv2d(32, 32, 1, bias=False)
        self.fc = GainLinear(32, 10)

    def forward(self, x):
        y = F.relu(self.norm(self.c1(x)))
        y = F.relu(self.c2(y))
        y = F.relu(self.c3(y)) + y
        return self.fc(y.mean((2, 3)))


def _net():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(32, 3, 16, 16)


def test_weights_computed_from_parameters_become_parameters_and_the_outputs_stay():
    model, x = _net()
    gm = trace(model, (x[:1],))
    result = FoldConstants()(gm)
    gm = result.gm
    gm.recompile()
    assert result.modified
    layers = [n for n in gm.graph.nodes if n.target in (F.conv2d, F.linear)]
    assert len(layers) == 4
    for node in layers:
        assert node.args[1].op == "get_attr", node  # the weight is now read, not computed
    targets = {str(n.args[1].target) for n in layers}
    assert targets == {"c1.weight_folded", "c2.weight_folded", "c3.weight_folded", "fc.w_folded"}
    assert not any(n.target is F.batch_norm for n in gm.graph.nodes)  # the standardization chain is gone
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    # trained parameters stay trainable (QAT trains the folded weight as it trains a BatchNorm-folded one)
    assert isinstance(gm.get_submodule("c2").weight_folded, nn.Parameter)
    assert FoldConstants()(gm).modified is False


def test_layers_with_standardized_weights_are_quantized_and_the_file_matches():
    model, x = _net()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    result = qcompile.compile(model, x[:1], calib=x, scheme="apot", bits=4)
    lines = "\n".join(layer_lines(result.model))
    assert "float:" not in lines, lines
    assert "c2" in lines and "W4 apot" in lines
    assert result.report.passed and result.report.extra["codes_differ_local"] == 0
    ops = {n.op_type for n in result.onnx_model.graph.node}
    assert "BatchNormalization" not in ops and "Sqrt" not in ops  # no weight arithmetic left in the file
    onnx.checker.check_model(result.onnx_model, full_check=True)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the user's model untouched


class _Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))
        self.register_buffer("scale", torch.full((4, 1), 2.0))

    def forward(self, x):
        noisy = self.weight + torch.randn_like(self.weight)  # a fresh draw on every call: not a constant
        scaled = self.weight * self.scale  # a constant
        n = self.weight.shape[0]  # a size: stays as the model wrote it
        cosine = F.linear(F.normalize(x), F.normalize(self.weight))  # a cosine classifier's weight: a constant
        return F.linear(x, noisy)[:, :n] + F.linear(x, scaled) + cosine


def test_random_draws_and_sizes_are_not_folded():
    torch.manual_seed(0)
    gm = trace(_Noisy().eval(), (torch.randn(2, 8),))
    gm = FoldConstants()(gm).gm
    gm.recompile()
    assert any("randn_like" in str(n.target) for n in gm.graph.nodes)
    linears = [n for n in gm.graph.nodes if n.target is F.linear]
    computed = [n for n in linears if n.args[1].op != "get_attr"]
    assert len(linears) == 3 and len(computed) == 1
    assert any("randn_like" in str(i.target) for i in computed[0].args[1].all_input_nodes)
    a = gm(torch.ones(2, 8))
    assert not torch.equal(gm(torch.ones(2, 8)), a)  # still a fresh draw on every call
    assert isinstance(gm.weight_folded, nn.Parameter)  # weight (trainable) times a buffer, stored on the root


class PositionBiasMLP(nn.Module):
    """Swin-V2's continuous position bias: an MLP (Linear, ReLU, Linear) on a constant coordinates table, added to
    what the model computes from its input."""

    def __init__(self):
        super().__init__()
        self.register_buffer("coords", torch.randn(1, 7, 7, 2))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 4, bias=False))
        self.fc = nn.Linear(16, 4 * 49)

    def forward(self, x):
        bias = 16 * torch.sigmoid(self.cpb_mlp(self.coords)).reshape(1, -1)
        return self.fc(x) + bias


def test_module_chains_on_constants_are_folded_not_quantized():
    """The MLP's layers read no model input: they are computed once into the bias they produce, and only ``fc``
    is quantized. Quantized as layers, their activation quantizer on a constant lost its zero point in the file
    (4% of the codes differed) and onnxruntime ran them on other kernels."""
    import qcompile

    torch.manual_seed(0)
    model = PositionBiasMLP().eval()
    x = torch.randn(16, 16)
    gm = trace(model, (x,))
    result = FoldConstants()(gm)
    assert result.modified
    assert not any(n.op == "call_module" and n.target.startswith("cpb_mlp") for n in result.gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(result.gm(x), model(x), rtol=0, atol=0)
    compiled = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8)
    quantized = [line for t in compiled.timings if t.name == "InsertQuantizers" for line in t.report]
    assert len(quantized) == 1 and quantized[0].startswith("fc:"), quantized
    assert compiled.report.passed and compiled.report.extra["codes_differ"] == 0, compiled.report.summary()
