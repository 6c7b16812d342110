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
