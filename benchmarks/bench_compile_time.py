"""Benchmark: compile wall time of qcompile against onnxruntime's ``quantize_static`` beyond the issue's models.

Issue 5 asks for a whole compile no slower than theirs on the digits CNN, ResNet-18 and MobileNetV2
(``bench_vs_ort.py``). This runs the same two timed flows (``bench_vs_ort.compile_ours_only`` /
``compile_theirs``: ours ``load_model`` + ``compile(validate=False)`` at uniform W8A8 from a saved ``state_dict``,
theirs ``load_model`` + ``torch.onnx.export`` + ``quant_pre_process`` + ``quantize_static`` QDQ per-channel MinMax)
on other torchvision architectures at 224 x 224, with the same 32 seeded calibration images and random weights with
BatchNorm statistics of random batches (``bench_vs_ort.vision_case``), alternated ``--reps`` times in one process
after a first (warm-up) pair: medians, and their ratio. Also our per-pass seconds of the last compile, so a slow
pass shows by name.

The architectures with large classifiers (AlexNet, VGG-11) are here because cross-layer equalization once rewrote
their 55-130 M classifier weights on every one of its 20 sweeps (AlexNet 57 s against their 14 s).

Run: ``python benchmarks/bench_compile_time.py [--archs alexnet,vgg11_bn,...] [--reps 3]`` from the repository
root. Needs torchvision (re-executes itself with ``$QCOMPILE_VISION_PYTHON``, default ``/tmp/venv-vision/bin/python``,
when torchvision is not importable here). Writes ``benchmarks/results/compile_time.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import qcompile  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.bench_vs_ort import OURS, compile_ours_only, compile_theirs, vision_case  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "compile_time.json")
VISION_PYTHON = os.environ.get("QCOMPILE_VISION_PYTHON", "/tmp/venv-vision/bin/python")
ARCHS = ("alexnet", "vgg11_bn", "resnet50", "densenet121", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf")
CONFIG = "ours uniform W8A8"


def run_arch(arch: str, reps: int, folder: str) -> dict:
    case = vision_case(arch)
    weights = os.path.join(folder, f"{arch}.pt")
    torch.save(case.model.state_dict(), weights)
    ours_path = os.path.join(folder, f"{arch}.onnx")
    compile_ours_only(case, weights, OURS[CONFIG], ours_path)  # warm-up pair: imports, allocator, caches
    compile_theirs(case, weights, folder)
    ours, theirs = [], []
    for _ in range(reps):
        ours.append(compile_ours_only(case, weights, OURS[CONFIG], ours_path))
        theirs.append(compile_theirs(case, weights, folder)["seconds"])
    model = qcompile.load_model(weights, arch=case.spec)
    result = qcompile.compile(model, case.calib[:1], calib=case.calib, output=ours_path, validate=False,
                              **OURS[CONFIG])
    passes = {t.name: round(t.seconds, 2) for t in result.timings if t.seconds >= 0.05}
    ours_m, theirs_m = float(np.median(ours)), float(np.median(theirs))
    return {"arch": arch, "params": sum(p.numel() for p in case.model.parameters()), "runs": reps,
            "ours_s": [round(t, 2) for t in ours], "theirs_s": [round(t, 2) for t in theirs],
            "ours_median_s": round(ours_m, 2), "theirs_median_s": round(theirs_m, 2),
            "ratio": round(ours_m / theirs_m, 3), "ours_pass_seconds": passes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-reexec", action="store_true")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    code = common.torchvision_or_reexec(__file__, argv, args.no_reexec, VISION_PYTHON)
    if code is not None:
        return code
    import torchvision
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's per-BatchNorm axis warnings (DenseNet)
    started = time.perf_counter()
    doc = {"benchmark": "compile_time", "environment": common.environment(), "config": CONFIG, "rows": []}
    doc["environment"]["torchvision"] = torchvision.__version__
    with tempfile.TemporaryDirectory() as folder:
        for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
            row = run_arch(arch, args.reps, folder)
            doc["rows"].append(row)
            print(f"{arch:20s} ours {row['ours_median_s']:7.2f} s  theirs {row['theirs_median_s']:7.2f} s  "
                  f"ratio {row['ratio']:.2f}  passes {row['ours_pass_seconds']}", flush=True)
    doc["at_or_below_theirs"] = sum(r["ratio"] <= 1.0 for r in doc["rows"])
    doc["seconds"] = round(time.perf_counter() - started, 1)
    doc["environment"]["loadavg_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump(doc, fh, indent=2, default=common.json_float)
        fh.write("\n")
    print(f"{doc['at_or_below_theirs']} of {len(doc['rows'])} at or below their compile time; wrote {args.output} "
          f"in {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
