"""Benchmark: data-free calibration (no ``--calib``) against 32 real calibration images, on trained BatchNorm CNNs.

Without calibration data, qcompile describes an activation from BatchNorm statistics: through ReLUs, max-pools,
flattens and residual adds by per-channel draws (``Calibrate``'s plans), and past everything else (SiLU, Hardswish,
squeeze-excite gates, concatenations, channel shuffles, BatchNorms before their convs, average pools, layers
without BatchNorm) by running the float model on inputs distilled from its BatchNorm statistics
(``passes/synthetic.py``, ZeroQ). Before the distillation, every model here but the digits CNN was refused
("pass --calib").

Six CNNs trained here, seeded, on the digits split of ``qcompile.models.digits`` (scikit-learn's real handwritten
digits, 8x8; nothing downloaded): the bundled digits CNN, the MobileNetV3-like CNN of ``bench_negative_activations``
(Hardswish, SiLU, squeeze-excite), and four written for this benchmark: DenseNet-like (BatchNorm-ReLU-conv layers
concatenated, a transition with an average pool), ShuffleNetV2-like (channel split, channel shuffle), EfficientNet-like
(SiLU, squeeze-excite, residual MBConv) and Inception-like (four concatenated branches, one a max-pool). Each is
compiled at uniform W8A8, APoT W4A4 and uniform W4A4 with ``keep_first_last="fp32"`` (no BatchNorm describes the
model's input, so data-free needs the first layer float; the calibrated compile takes the same option so that the
two differ only in calibration), once data-free and once with the first 32 training images; scored in onnxruntime on
the 500 held-out images: output SQNR against the float model, accuracy, compile seconds, validation verdict.

Writes ``benchmarks/results/data_free.json`` and prints a markdown table.
Run: ``python benchmarks/bench_data_free.py`` from the repository root (about 2 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import qcompile  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.bench_adaptive_rounding import trained_models  # noqa: E402
from benchmarks.bench_negative_activations import MobileNetV3Like  # noqa: E402
from qcompile.models import digits  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "data_free.json")
CALIB = 32
CONFIGS = {"uniform W8A8": {"scheme": "uniform", "bits": 8}, "apot W4A4": {"scheme": "apot", "bits": 4},
           "uniform W4A4": {"scheme": "uniform", "bits": 4}}


def _cbr(cin: int, cout: int, k: int = 3, groups: int = 1, act=nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)


class DenseNetLike(nn.Module):
    """A stem, two dense blocks of BatchNorm-ReLU-conv layers whose outputs are concatenated to their input, a
    transition (BatchNorm, ReLU, 1x1 conv, 2x2 average pool) between them, BatchNorm-ReLU, global pool, linear."""

    def __init__(self, growth: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.block1 = nn.ModuleList([self._layer(16 + i * growth, growth) for i in range(3)])
        self.trans = nn.Sequential(nn.BatchNorm2d(40), nn.ReLU(), nn.Conv2d(40, 20, 1), nn.AvgPool2d(2))
        self.block2 = nn.ModuleList([self._layer(20 + i * growth, growth) for i in range(3)])
        self.norm = nn.BatchNorm2d(44)
        self.fc = nn.Linear(44, 10)

    @staticmethod
    def _layer(cin: int, growth: int) -> nn.Sequential:
        return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, growth, 3, padding=1))

    def forward(self, x):
        x = self.stem(x)
        for layer in self.block1:
            x = torch.cat([x, layer(x)], 1)
        x = self.trans(x)
        for layer in self.block2:
            x = torch.cat([x, layer(x)], 1)
        return self.fc(F.relu(self.norm(x)).mean((2, 3)))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit with stride 1: half the channels through 1x1-dw3x3-1x1, concatenated to the other half
    unchanged, then the channels shuffled in two groups."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(_cbr(half, half, 1), _cbr(half, half, 3, groups=half, act=None),
                                    _cbr(half, half, 1))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        out = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = out.shape
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(1, 32)
        self.units = nn.Sequential(ShuffleUnit(32), ShuffleUnit(32), nn.MaxPool2d(2), ShuffleUnit(32),
                                   ShuffleUnit(32))
        self.head = _cbr(32, 64, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.head(self.units(self.stem(x))).mean((2, 3)))


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expand (SiLU), 3x3 depthwise (SiLU), squeeze-excite, 1x1 project, residual."""

    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = channels * expand
        self.expand = _cbr(channels, hidden, 1, act=nn.SiLU)
        self.dw = _cbr(hidden, hidden, 3, groups=hidden, act=nn.SiLU)
        self.se1, self.se2 = nn.Conv2d(hidden, channels // 4, 1), nn.Conv2d(channels // 4, hidden, 1)
        self.project = _cbr(hidden, channels, 1, act=None)

    def forward(self, x):
        h = self.dw(self.expand(x))
        h = h * torch.sigmoid(self.se2(F.silu(self.se1(h.mean((2, 3), keepdim=True)))))
        return x + self.project(h)


class EfficientNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(1, 24, act=nn.SiLU)
        self.blocks = nn.Sequential(MBConv(24), MBConv(24), nn.AvgPool2d(2), MBConv(24))
        self.head = _cbr(24, 64, 1, act=nn.SiLU)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class InceptionBlock(nn.Module):
    """GoogLeNet's block: 1x1; 1x1 then 3x3; 1x1 then two 3x3; 3x3 max-pool then 1x1; concatenated."""

    def __init__(self, cin: int, width: int):
        super().__init__()
        self.b1 = _cbr(cin, width, 1)
        self.b2 = nn.Sequential(_cbr(cin, width, 1), _cbr(width, width))
        self.b3 = nn.Sequential(_cbr(cin, width // 2, 1), _cbr(width // 2, width), _cbr(width, width))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), _cbr(cin, width, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class InceptionLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(1, 32)
        self.blocks = nn.Sequential(InceptionBlock(32, 16), nn.MaxPool2d(2), InceptionBlock(64, 16))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


MODELS = {"MobileNetV3-like": (MobileNetV3Like, 60, 3e-3), "DenseNet-like": (DenseNetLike, 40, 3e-3),
          "ShuffleNetV2-like": (ShuffleNetLike, 40, 3e-3), "EfficientNet-like": (EfficientNetLike, 40, 3e-3),
          "Inception-like": (InceptionLike, 40, 3e-3)}


def measure(model, options: dict, calib, x_test, y_test, ref, path: str) -> dict:
    t0 = time.perf_counter()
    try:
        result = qcompile.compile(model, x_test[:1], calib=calib, output=path, validation_inputs=x_test,
                                  keep_first_last="fp32", **options)
    except qcompile.UserError as e:
        return {"refused": str(e)}
    seconds = time.perf_counter() - t0
    out = common.session(path).run(None, {"input": x_test.numpy()})[0]
    notes = [line for t in result.timings if t.name == "Calibrate" for line in t.report]
    distilled = [line for line in notes if "distilled" in line]
    return {"sqnr_vs_float_db": round(common.sqnr_db(ref, out), 2),
            "accuracy": float(np.mean(out.argmax(1) == y_test.numpy())),
            "validation_passed": bool(result.report.passed), "compile_seconds": round(seconds, 2),
            "distilled_note": distilled[0] if distilled else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=RESULTS, help="JSON results file (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x_tr, y_tr, x_te, y_te = digits.load_split()
    x_cal = x_tr[:CALIB].clone()
    t_start = time.perf_counter()
    models = trained_models(x_tr, y_tr, MODELS)
    results = {"environment": common.environment(), "calibration_images": CALIB, "test_images": len(x_te),
               "models": []}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, model in models.items():
            with torch.no_grad():
                ref = model(x_te).numpy()
            entry = {"model": name, "float_accuracy": float(np.mean(ref.argmax(1) == y_te.numpy())), "rows": []}
            for config, options in CONFIGS.items():
                row = {"config": config, "options": options,
                       "data_free": measure(model, options, None, x_te, y_te, ref, os.path.join(folder, "f.onnx")),
                       "calibrated": measure(model, options, x_cal, x_te, y_te, ref, os.path.join(folder, "c.onnx"))}
                free, cal = row["data_free"], row["calibrated"]
                if "refused" in free or "refused" in cal:
                    row["sqnr_gap_db"] = None
                    rows.append([name, config, "refused" if "refused" in free else "", "", "", "", ""])
                else:
                    row["sqnr_gap_db"] = round(free["sqnr_vs_float_db"] - cal["sqnr_vs_float_db"], 2)
                    rows.append([name, config, f"{free['sqnr_vs_float_db']:.2f} / {cal['sqnr_vs_float_db']:.2f}",
                                 f"{row['sqnr_gap_db']:+.2f}",
                                 f"{100 * free['accuracy']:.1f} / {100 * cal['accuracy']:.1f}",
                                 "PASS" if free["validation_passed"] and cal["validation_passed"] else "FAIL",
                                 f"{free['compile_seconds']:.2f} / {cal['compile_seconds']:.2f}"])
                entry["rows"].append(row)
                print(" | ".join(rows[-1]), flush=True)
            results["models"].append(entry)
    gaps = [r["sqnr_gap_db"] for m in results["models"] for r in m["rows"] if r["sqnr_gap_db"] is not None]
    results["summary"] = {"rows": len(gaps), "refused": sum(r["sqnr_gap_db"] is None for m in results["models"]
                                                            for r in m["rows"]),
                          "sqnr_gap_db_median": float(np.median(gaps)) if gaps else None,
                          "sqnr_gap_db_min": float(min(gaps)) if gaps else None,
                          "sqnr_gap_db_max": float(max(gaps)) if gaps else None}
    common.finish(results, args.output,
                  ["model", "config", "SQNR vs float dB (data-free / 32 images)", "gap",
                   "accuracy % (data-free / 32 images)", "validation", "compile s"], rows, t_start)


if __name__ == "__main__":
    main()
