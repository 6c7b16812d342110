"""FoldConstantScale: products by constants folded into the layer before or the layers after, the same function,
and the products that must stay."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcompile
from qcompile.frontend import trace
from qcompile.passes.fold_scale import FoldConstantScale
from tests.passes.test_int8_region import int8_ops


def products(gm) -> list:
    return [n for n in gm.graph.nodes if (n.op == "call_function" and n.target in (operator.mul, torch.mul,
                                                                                   operator.truediv))
            or (n.op == "call_method" and n.target in ("mul", "div"))]


def fold(model: nn.Module, x: torch.Tensor):
    model.eval()
    gm = trace(model, x)
    with torch.no_grad():
        ref = model(x)
    p = FoldConstantScale()
    result = p(gm)
    with torch.no_grad():
        out = result.gm(x)
    return result, p.report, float((out - ref).abs().max() / ref.abs().max())


class _After(nn.Module):
    """A conv times a number, a conv-ReLU times a positive per-channel parameter, a Linear times a layer scale and
    divided by a number."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.k = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.fc, self.gamma = nn.Linear(8, 6), nn.Parameter(torch.randn(6))

    def forward(self, x):
        x = self.c1(x) * 0.2
        x = F.relu(self.c2(x)) * self.k
        return self.fc(x.mean((2, 3))) * self.gamma / 3.0


def test_products_after_a_layer_fold_into_its_weights_and_bias():
    torch.manual_seed(0)
    result, report, err = fold(_After(), torch.randn(2, 3, 8, 8))
    assert result.modified and not products(result.gm), result.gm.graph
    assert err < 1e-5
    assert len(report) == 4 and any("through" in line for line in report), report


class _Before(nn.Module):
    """NF-ResNet's ``relu(x) * beta`` read by a conv and, through an average pool, by a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.down = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        pre = F.relu(x) * 0.9622  # (x is read by the shortcut too: the scale cannot go into the stem)
        return self.conv(pre)[:, :, ::2, ::2] + self.down(F.avg_pool2d(pre, 2)) + x[:, :, ::2, ::2]


def test_a_positive_scale_that_only_layers_read_folds_into_their_weights():
    torch.manual_seed(0)
    result, report, err = fold(_Before(), torch.randn(2, 3, 10, 10))
    assert result.modified and not products(result.gm)
    assert err < 1e-5
    assert "conv" in report[0] and "down" in report[0], report


class _Stays(nn.Module):
    """Products that cannot fold: through a ReLU by a negative number (and read by a sum as well as a layer); a
    sum; a module called twice; a product of two activations; a constant of the wrong shape (one per column, not
    per channel)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.shared = (nn.Conv2d(4, 4, 1) for _ in range(4))
        self.cols = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        y = F.relu(self.a(x)) * -0.5
        z = self.b(y) + y
        z = z * 2.0 + z
        w = self.shared(self.shared(z) * 3.0)
        return (w * torch.sigmoid(w)) * self.cols + self.c(x).mean()


def test_products_that_cannot_fold_stay():
    torch.manual_seed(0)
    model = _Stays()
    x = torch.randn(2, 4, 6, 6)
    before = len(products(trace(model.eval(), x)))
    result, report, err = fold(model, x)
    assert len(products(result.gm)) == before and not result.modified, report
    assert err == 0.0


class _NF(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1))
                                   for _ in range(3))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for i, conv in enumerate(self.convs):
            x = conv(F.relu(x) * (1.0 - 0.02 * i)) * 0.2 + x
        return self.fc(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


def test_a_normalizer_free_network_runs_without_float_products(tmp_path):
    """nf_resnet26 kept 15 float Mul (its alpha and beta) between the int8 layers, 1.10x / 1.28x quantize_static's
    latency; with them folded into the convolutions the optimized session is int8 from the first conv to the head."""
    torch.manual_seed(0)
    ops = int8_ops(_NF(), 16, tmp_path, keep_first_last="quant")  # (validation passes, SQNR vs float > 30 dB)
    assert ops["Mul"] == ops["Relu"] == ops["Add"] == 0 and ops["QLinearAdd"] == 3, ops


@pytest.mark.parametrize("fold_bn", [True, False])
def test_the_fold_runs_with_batchnorm_folding(fold_bn):
    """``fold_bn=False`` (``--no-fold-bn``) keeps the model's layers as written: no product is folded either."""
    torch.manual_seed(0)
    model = _NF().eval()
    x = torch.randn(8, 3, 16, 16)
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, fold_bn=fold_bn, validate=False)
    folded = [t for t in result.timings if t.name == "FoldConstantScale"]
    assert bool(folded) == fold_bn
