"""fp32 compile of torchvision's ResNet-18, MobileNetV2 and ResNet-50 through the command line (factory specs, fresh
seeded weights, nothing downloaded). Runs only where torchvision is installed (the ``vision`` extra); skipped
otherwise."""
from __future__ import annotations

import re

import onnx
import pytest

pytest.importorskip("torchvision")

from qcompile.cli import main  # noqa: E402

MIN_SQNR_FP32 = 80.0  # relative error <= 1e-4, the fp32 bound of the issue


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "resnet50"])
def test_torchvision_fp32(tmp_path, capsys, arch):
    out = tmp_path / f"{arch}.onnx"
    rc = main([f"torchvision.models:{arch}", "--input-shape", "1,3,224,224", "--scheme", "fp32", "-o", str(out)])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    sqnr = re.search(r"SQNR (inf|[0-9.]+)", stdout)
    assert sqnr and float(sqnr.group(1)) >= MIN_SQNR_FP32, stdout
    assert "top-1 agreement 100.00%" in stdout and "PASS" in stdout
    onnx.checker.check_model(str(out), full_check=True)


def test_swin_window_attention_projections_are_quantized():
    """torchvision's Swin passes its qkv/proj weights to the fx-wrapped ``shifted_window_attention``: decomposed,
    all 24 attention projections of Swin-T are quantized (53 weight layers in all) and the file validates."""
    import torch
    import torchvision

    import qcompile
    from qcompile.qmodules import FakeQuantize

    torch.manual_seed(0)
    model = torchvision.models.swin_t().eval()
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, x[:1], scheme="uniform", bits=8, calib=x)
    weights = [n for n, m in result.model.named_modules() if isinstance(m, FakeQuantize) and m.role == "weight"]
    assert sum(".attn.qkv" in n for n in weights) == 12 and sum(".attn.proj" in n for n in weights) == 12
    assert len(weights) == 53
    assert result.report.passed, result.report.summary()


def test_stochastic_depth_residual_adds_run_in_int8():
    """torchvision's EfficientNet and ConvNeXt add their residuals through ``StochasticDepth``, whose
    ``stochastic_depth`` call torch.fx keeps as a leaf: the int8 region did not see through it, and 7 of
    EfficientNet-B0's 9 adds ran in float between DequantizeLinear and QuantizeLinear. In eval mode it is the
    identity, and its blocks run the int8 adds of the same blocks without it."""
    import torch
    import torch.nn as nn
    from torchvision.ops import StochasticDepth

    import qcompile
    from qcompile.qmodules import Int8Add

    class Block(nn.Module):
        def __init__(self, drop: bool):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.body = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
                                      for _ in range(3))
            self.drop = nn.ModuleList(StochasticDepth(0.2, "row") if drop else nn.Identity() for _ in range(3))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

        def forward(self, x):
            x = self.stem(x)
            for body, drop in zip(self.body, self.drop):
                x = x + drop(body(x))
            return self.head(x)

    calib = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    adds = {}
    for drop in (True, False):
        torch.manual_seed(0)
        result = qcompile.compile(Block(drop).eval(), calib=calib, scheme="uniform", bits=8)
        assert result.report.passed, result.report.summary()
        assert not any("stochastic_depth" in str(n.target) for n in result.model.graph.nodes)
        adds[drop] = sum(isinstance(m, Int8Add) for m in result.model.modules())
    assert adds[True] == adds[False] == 3, adds
