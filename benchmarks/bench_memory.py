"""Benchmark: peak memory of a compile, as a multiple of the model's float weights.

Each measurement runs in a fresh process (``--child``): the model is built and run once, the process's resident
size is taken as the baseline, and ``qcompile.compile`` (32 calibration samples, the default validation in
onnxruntime, the file written) runs; the kernel's high-water mark (``ru_maxrss``) minus the baseline is the compile's
peak. It is recorded at the end of the pass pipeline too (the pass callback), so the table shows the passes' share
and that of what follows them (export, emission, the checker, validation, the write).

Models, built here (nothing downloaded, no torchvision): ``mlp`` (1024 -> 4 x 4096 -> 10, 54M weights: the weights
dominate), ``cnn`` (a VGG-like CNN on 32 x 32 images, 9.8M weights: weights and activations), ``digits`` (the
bundled digits CNN, 0.07M weights: the fixed cost of torch, onnx and onnxruntime dominates); on request
``resnet50`` and ``mobilenet_v2`` (torchvision's, random weights with BatchNorm statistics from random batches, 32
images at 224 x 224: the activations dominate; run it with an interpreter that has torchvision). Configurations:
uniform W8A8 and APoT W4A4.

Writes ``benchmarks/results/memory.json`` and prints a markdown table.
Run: ``python benchmarks/bench_memory.py [--models mlp,cnn,digits]`` from the repository root (about a minute;
``--models resnet50,mobilenet_v2 --output benchmarks/results/memory_vision.json`` about 2 minutes more).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "memory.json")
MODELS = ("mlp", "cnn", "digits")
VISION = ("resnet50", "mobilenet_v2")  # on request (--models): torchvision's, random weights, 32 images at 224x224
CONFIGS = {"uniform W8A8": {"scheme": "uniform", "bits": 8}, "apot W4A4": {"scheme": "apot", "bits": 4}}


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _build(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        d = 4096
        model = nn.Sequential(nn.Linear(1024, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(),
                              nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 10))
        return model.eval(), torch.randn(32, 1024)
    if name == "cnn":
        layers, c_in = [], 3
        for c_out, pool in ((64, False), (128, True), (256, False), (256, True), (512, False), (512, True),
                            (512, False), (512, True)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if pool else []
            c_in = c_out
        model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * 2 * 2, 512), nn.ReLU(), nn.Linear(512, 10))
        x = torch.randn(32, 3, 32, 32)
        model.train()
        with torch.no_grad():  # BatchNorm statistics of its own activations
            model(x)
        return model.eval(), x
    if name in VISION:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        gen = torch.Generator().manual_seed(1)
        model.train()
        with torch.no_grad():  # BatchNorm statistics of real activations, not the (0, 1) defaults
            for _ in range(3):
                model(torch.randn(8, 3, 224, 224, generator=gen))
        return model.eval(), torch.randn(32, 3, 224, 224, generator=gen)
    from qcompile.models import digits

    x_train, _, _, _ = digits.load_split()
    return digits.pretrained(), x_train[:32].clone()


def child(name: str, config: str, output: str) -> dict:
    import gc

    import torch

    import qcompile

    model, x = _build(name)
    with torch.no_grad():
        model(x[:2])
    gc.collect()
    base = max(_rss_mb(), _max_rss_mb())
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    at_passes = [0.0]

    def callback(_timing):
        at_passes[0] = _max_rss_mb()

    t0 = time.perf_counter()
    result = qcompile.compile(model, x[:1], calib=x, output=output, callback=callback, **CONFIGS[config])
    seconds = time.perf_counter() - t0
    peak = _max_rss_mb() - base
    passes = at_passes[0] - base
    return {"model": name, "config": config, "float_weights_mb": round(weights, 1),
            "file_mb": round(os.path.getsize(output) / 2 ** 20, 2), "validation_passed": result.report.passed,
            "baseline_rss_mb": round(base, 1), "peak_mb": round(peak, 1), "peak_passes_mb": round(passes, 1),
            "peak_x_weights": round(peak / weights, 2), "peak_passes_x_weights": round(passes / weights, 2),
            "seconds": round(seconds, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "CONFIG", "ONNX"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    sys.path.insert(0, ROOT)
    from benchmarks import common

    t_start = time.perf_counter()
    rows, table = [], []
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            if name not in MODELS + VISION:
                raise SystemExit(f"unknown model {name!r}; one of {', '.join(MODELS + VISION)}")
            for config in CONFIGS:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, config,
                                      os.path.join(folder, "m.onnx")], capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    raise SystemExit(f"{name} / {config} failed:\n{out.stderr[-2000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                table.append([name, config, row["float_weights_mb"], row["file_mb"], row["peak_passes_mb"],
                              row["peak_mb"], f"{row['peak_passes_x_weights']:.2f}", f"{row['peak_x_weights']:.2f}",
                              "PASS" if row["validation_passed"] else "FAIL", row["seconds"]])
                print(f"{name} / {config}: peak {row['peak_mb']} MB = {row['peak_x_weights']}x float weights",
                      flush=True)
    results = {"benchmark": "memory", "environment": common.environment(), "rows": rows,
               "summary": {f"{r['model']} {r['config']}": r["peak_x_weights"] for r in rows}}
    common.finish(results, args.output, ["model", "config", "float weights MB", "file MB", "peak in passes MB",
                                         "peak MB", "passes / weights", "peak / weights", "validation",
                                         "compile s"], table, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
