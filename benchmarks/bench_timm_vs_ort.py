"""Benchmark: timm architectures against onnxruntime's ``quantize_static``, uniform W8A8, side by side.

For each model (seeded weights; BatchNorm statistics of 5 random batches in train mode, then ``eval()``): our file
(``qcompile.compile`` with validation on the 32 calibration images) and theirs (``torch.onnx.export`` opset 17,
``quant_pre_process`` -- with ``skip_symbolic_shape=True`` where its shape inference fails -- and ``quantize_static``
QDQ, per-channel, QUInt8 activations, QInt8 weights, MinMax), on the same 32 calibration images of ``--size``
(default 96). Recorded: validation verdict, the wall time of each compile (ours includes its validation of the
file on the 32 images, which theirs does not do), output SQNR of each file against the float model on 16 other images,
latency of ours / theirs at batch 1 and 8 (``benchmarks.common.interleaved_latency``: 2 threads, spinning off,
medians of 60 / 20 interleaved runs, with qcompile's fp32 file as the reference), and the float compute ops left in
each optimized session (Conv, Add, Mul, Sigmoid, Concat, MaxPool, ...: what did not become an integer kernel).

Needs timm (the torchvision environment, ``/tmp/venv-vision``, has it). Run:
``python benchmarks/bench_timm_vs_ort.py [--models a,b] [--size 96]``; writes ``benchmarks/results/timm_vs_ort.json``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import qcompile  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.bench_vs_ort import _Reader  # noqa: E402

MODELS = ("cspdarknet53", "res2net50_26w_4s", "ghostnet_100", "repvgg_a0", "mobileone_s0", "resnest14d",
          "hgnetv2_b0", "rexnet_100", "dpn68", "mixnet_s", "ese_vovnet19b_dw", "dla34", "selecsls42b",
          "xception41", "seresnext26d_32x4d", "inception_v3", "densenet121", "resnetv2_50", "ecaresnet26t", "nf_resnet26")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "timm_vs_ort.json")
FLOAT_OPS = {"Conv", "Add", "Mul", "Sigmoid", "HardSigmoid", "Concat", "MaxPool", "AveragePool", "LeakyRelu", "Relu",
             "Clip", "Gemm", "MatMul", "Softmax", "Div", "Sub", "Tanh", "Erf", "BatchNormalization"}


def _float_ops(path: str) -> dict:
    opt = path + ".opt.onnx"
    common.session(path, optimized_model_path=opt)
    counts = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    return dict(sorted((k, v) for k, v in counts.items() if k in FLOAT_OPS))


def _theirs(model, calib, folder: str) -> str:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, pre_path, q_path = (os.path.join(folder, n) for n in ("f.onnx", "pre.onnx", "theirs.onnx"))
    torch.onnx.export(model, (calib[:1],), float_path, opset_version=17, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "b"}, "output": {0: "b"}}, dynamo=False)
    cwd = os.getcwd()
    os.chdir(folder)  # a failed shape inference leaves <uuid>.data weight copies in the working directory
    try:
        try:
            quant_pre_process(float_path, pre_path)
        except Exception:  # noqa: BLE001 -- its symbolic shape inference gives up on some graphs
            quant_pre_process(float_path, pre_path, skip_symbolic_shape=True)
    finally:
        os.chdir(cwd)
    quantize_static(pre_path, q_path, _Reader("input", calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return q_path


def run_model(name: str, size: int, folder: str) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    model.train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(8, 3, size, size, generator=gen))
    model.eval()
    calib = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(2))
    inputs = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(3))
    paths = {"fp32": os.path.join(folder, "fp32.onnx"), "ours": os.path.join(folder, "ours.onnx")}
    t0 = time.perf_counter()
    result = qcompile.compile(model, calib[:1], calib=calib, output=paths["ours"], scheme="uniform", bits=8)
    ours_s = time.perf_counter() - t0
    qcompile.compile(model, calib[:1], output=paths["fp32"], scheme="fp32", validate=False)
    t0 = time.perf_counter()
    paths["theirs"] = _theirs(model, calib, folder)
    theirs_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(inputs).numpy()
    sqnr = {}
    for k in ("ours", "theirs"):
        out = common.run_batched(common.session(paths[k]), inputs.numpy(), 8)
        sqnr[k] = round(float(10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum())), 2)
    lat = common.interleaved_latency(paths, {1: inputs[:1].numpy(), 8: inputs[:8].numpy()}, {1: 60, 8: 20}, "fp32")
    return {"model": name, "validation_passed": result.report.passed, "compile_s": round(ours_s, 2),
            "theirs_s": round(theirs_s, 2), "sqnr_vs_float_db": sqnr,
            "latency_ours_over_theirs": {b: round(v["ours"]["median_ms"] / v["theirs"]["median_ms"], 3)
                                         for b, v in lat.items()},
            "latency_ms": {b: {k: round(v[k]["median_ms"], 3) for k in v} for b, v in lat.items()},
            "float_ops": {"ours": _float_ops(paths["ours"]), "theirs": _float_ops(paths["theirs"])}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    doc = {"benchmark": "timm_vs_ort", "environment": common.environment(), "size": args.size, "rows": []}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory() as folder:
            try:
                row = run_model(name, args.size, folder)
            except Exception as exc:  # noqa: BLE001 -- one model's failure is a row, not the end of the run
                row = {"model": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        doc["rows"].append(row)
        print(json.dumps(row), flush=True)
    doc["seconds"] = round(time.perf_counter() - started, 1)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    print(f"wrote {os.path.relpath(args.output, ROOT)} in {doc['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
