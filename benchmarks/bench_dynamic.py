"""Benchmark: files with dynamic axes (``--dynamic-axes 2,3``) against files fixed to the example's size.

For each model and configuration, two files from the same model and calibration data: one fixed to the example's
size, one with its height and width symbolic. Measured: onnxruntime latency of both at the example's size (2
threads, spinning off, sessions interleaved in one process, median of many runs: the ratio dynamic / fixed), file
sizes, the compile's own check at twice the size (file vs simulation, vs float), and the dynamic file at three sizes
the compile never saw (one of them odd) against the simulation and the float model there.

Models: a small fully convolutional segmentation-like net built here (conv, BatchNorm, stride-2 conv, upsample, skip
add; 64x64), and, where torchvision imports (else re-run under ``QCOMPILE_VISION_PYTHON`` or /tmp/venv-vision),
torchvision's LR-ASPP MobileNetV3-Large (random weights, non-trivial BatchNorm statistics; 128x128).
Writes ``benchmarks/results/dynamic.json``. Run from the repository root: ``python benchmarks/bench_dynamic.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import qcompile  # noqa: E402
from benchmarks import common  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "dynamic.json")
VISION_PYTHON = os.environ.get("QCOMPILE_VISION_PYTHON", "/tmp/venv-vision/bin/python")
CONFIGS = {"uniform W8A8": dict(scheme="uniform", bits=8), "apot W4A4": dict(scheme="apot", bits=4),
           "apot W4/A8 shift-add": dict(scheme="apot", bits=4, abits=8, ascheme="uniform", emit="shift-add")}
CALIB = 16
REPS = {1: 300, 4: 100}


class SegNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(64, 32, 1), nn.BatchNorm2d(32))
        self.head = nn.Conv2d(32, classes, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.head(torch.relu(self.up(self.down(y)) + y))


def _with_statistics(model: nn.Module, size: int, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics: a few seeded random batches in train mode, then eval."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size, generator=gen))
    return model.eval()


def _output(y):
    return y["out"] if isinstance(y, dict) else y


def run_model(name: str, model: nn.Module, size: int, sizes: list, folder: str) -> list:
    gen = torch.Generator().manual_seed(1)
    calib = torch.randn(CALIB, 3, size, size, generator=gen)
    rows = []
    for config, options in CONFIGS.items():
        fixed, dyn = os.path.join(folder, "fixed.onnx"), os.path.join(folder, "dynamic.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qcompile.compile(model, calib[:1], calib=calib, output=fixed, **options)
            t0 = time.perf_counter()
            result = qcompile.compile(model, calib[:1], calib=calib, output=dyn, dynamic_axes=(2, 3), **options)
            seconds = time.perf_counter() - t0
        lat = common.interleaved_latency({"fixed": fixed, "dynamic": dyn},
                                         {b: calib[:b].numpy() for b in REPS}, REPS, reference="fixed")
        sess = common.session(dyn)
        unseen = []
        for hw in sizes:
            x = torch.randn(2, 3, *hw, generator=gen)
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            with torch.no_grad():
                sim = _output(result.model(x)).numpy()
                ref = _output(model(x)).numpy()
            unseen.append({"input": [2, 3, *hw], "output": list(got.shape),
                           "sqnr_vs_simulation_db": common.json_float(common.sqnr_db(sim, got)),
                           "sqnr_vs_float_db": common.json_float(common.sqnr_db(ref, got))})
        entry = result.summary["dynamic_axes"]
        rows.append({"model": name, "config": config, "options": options, "example": [1, 3, size, size],
                     "compile_seconds": round(seconds, 2),
                     "file_bytes": {"fixed": os.path.getsize(fixed), "dynamic": os.path.getsize(dyn)},
                     "latency": {str(b): v for b, v in lat.items()},
                     "ratio_dynamic_to_fixed": {str(b): v["dynamic"]["ratio_to_fixed"] for b, v in lat.items()},
                     "check_at_twice_the_size": {k: common.json_float(v) if isinstance(v, float) else v
                                                 for k, v in entry.items()},
                     "unseen_sizes": unseen})
        print(f"{name:14s} {config:22s} dynamic/fixed latency "
              f"{', '.join('b%s %.3f' % (b, v['dynamic']['ratio_to_fixed']) for b, v in lat.items())}; "
              f"unseen sizes vs simulation "
              f"{', '.join(str(u['sqnr_vs_simulation_db']) for u in unseen)} dB", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-vision", action="store_true", help="the in-code model only")
    parser.add_argument("--no-reexec", action="store_true")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    if not args.no_vision:
        code = common.torchvision_or_reexec(__file__, argv, args.no_reexec, VISION_PYTHON)
        if code is not None:
            return code
    started = time.perf_counter()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        rows += run_model("segnet", _with_statistics(SegNet(), 64, 0), 64, [(96, 80), (48, 112), (34, 46)], folder)  # even: its upsampled half meets the skip
        if not args.no_vision:
            import torchvision

            lraspp = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
                weights=None, weights_backbone=None, num_classes=5)
            rows += run_model("lraspp_mbv3", _with_statistics(lraspp, 128, 0), 128,
                              [(192, 160), (96, 224), (129, 97)], folder)
    ratios = [r["ratio_dynamic_to_fixed"][b] for r in rows for b in r["ratio_dynamic_to_fixed"]]
    finite = [u["sqnr_vs_simulation_db"] for r in rows for u in r["unseen_sizes"]
              if not isinstance(u["sqnr_vs_simulation_db"], str)]  # "inf" where equal
    worst_unseen = min(finite) if finite else "inf"
    results = {"benchmark": "dynamic", "environment": common.environment(), "calibration_inputs": CALIB,
               "rows": rows, "summary": {"median_latency_ratio_dynamic_to_fixed": round(float(np.median(ratios)), 3),
                                         "max_latency_ratio_dynamic_to_fixed": max(ratios),
                                         "lowest_unseen_size_sqnr_vs_simulation_db": worst_unseen}}
    table = [[r["model"], r["config"], r["file_bytes"]["fixed"], r["file_bytes"]["dynamic"],
              *(r["ratio_dynamic_to_fixed"][str(b)] for b in REPS),
              ", ".join(str(u["sqnr_vs_simulation_db"]) for u in r["unseen_sizes"])] for r in rows]
    common.finish(results, args.output, ["model", "config", "fixed bytes", "dynamic bytes",
                                         *(f"latency ratio b{b}" for b in REPS), "unseen sizes: vs simulation dB"],
                  table, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
