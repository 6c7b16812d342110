"""Recurrent models: weight-only quantization of ``nn.LSTM``/``nn.GRU`` on real data, against onnxruntime's own
flow for them (``quantize_dynamic``, which turns an LSTM into its int8 ``DynamicQuantizeLSTM``).

scikit-learn's handwritten digits (shipped with it: nothing is downloaded; ``qcompile.models.digits.load_split``,
500 held-out test images) read as sequences: each image's 8 pixel rows are 8 time steps of 8 features. A model
``Linear(8, 32) → ReLU → LSTM or GRU (32 → 64, batch-first) → Linear(64, 10)`` on the last step is trained on the
other 1297 images (Adam, 40 epochs of batches of 64, seed 0) and compiled with the first 32 training images as
calibration data. The recurrent layer is neither first nor last, so it gets the requested scheme and bits (its
weights only; its input, states and biases stay float); the two Linear layers stay 8-bit (the first/last rule).

For each file: test accuracy in onnxruntime, output SQNR against the float model on the test images, file size
against the float model's, and the latency at batch 1 and 8 (2 threads, sessions interleaved in one process, spinning
off) as a ratio to qcompile's float file.

Run: ``python benchmarks/bench_recurrent.py`` from the repository root (about a minute). Writes
``benchmarks/results/recurrent.json``.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import onnxruntime
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import qcompile  # noqa: E402
from qcompile.models import digits  # noqa: E402

CALIB = 32
CONFIGS = {
    "fp32": dict(scheme="fp32"),
    "uniform W8A8": dict(scheme="uniform", bits=8),
    "apot W4A4": dict(scheme="apot", bits=4),
    "uniform W4A4": dict(scheme="uniform", bits=4),
    "apot W3A3": dict(scheme="apot", bits=3),
    "uniform W3A3": dict(scheme="uniform", bits=3),
    "pot W3A3": dict(scheme="pot", bits=3),
}
REPS = {1: 400, 8: 200}


class SequenceClassifier(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.rnn = getattr(nn, kind)(32, 64, batch_first=True)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.rnn(torch.relu(self.inp(x)))[0][:, -1])


def train(kind: str, x, y) -> nn.Module:
    torch.manual_seed(0)
    model = SequenceClassifier(kind)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def theirs(float_path: str, folder: str) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = os.path.join(folder, "ort_dynamic.onnx")
    quantize_dynamic(float_path, path, weight_type=QuantType.QInt8, per_channel=True)
    return path


def main() -> None:
    import logging

    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    t0 = time.perf_counter()
    env = common.environment()  # before the run: the commit, clean until this run writes its results
    x_train, y_train, x_test, y_test = digits.load_split()
    x_train, x_test = x_train.reshape(-1, 8, 8), x_test.reshape(-1, 8, 8)
    labels = y_test.numpy()
    calib = x_train[:CALIB].clone()
    inputs = {1: x_test[:1].numpy(), 8: x_test[:8].numpy()}
    models = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("LSTM", "GRU"):
            model = train(kind, x_train, y_train)
            with torch.no_grad():
                ref = model(x_test).numpy()
            row = {"model": kind, "float_accuracy": float(np.mean(common.top1(ref) == labels)),
                   "float_params": sum(p.numel() for p in model.parameters()), "files": {}}
            paths = {}
            for label, options in CONFIGS.items():
                path = os.path.join(folder, f"{kind}_{label.replace(' ', '_')}.onnx")
                t1 = time.perf_counter()
                result = qcompile.compile(model, calib[:1], calib=calib, output=path, progress=False, **options)
                seconds = time.perf_counter() - t1
                out = common.session(path).run(None, {"input": x_test.numpy()})[0]
                rnn_row = next((r for r in qcompile.summary.layer_rows(result.model) if r[0] == "rnn"), (0, 0, "float"))
                row["files"][label] = {
                    "passed": result.report.passed, "rnn": rnn_row[2], "file_bytes": os.path.getsize(path),
                    "accuracy": float(np.mean(common.top1(out) == labels)),
                    "sqnr_vs_float_db": common.json_float(round(common.sqnr_db(ref, out), 2)),
                    "compile_seconds": round(seconds, 2)}
                paths[label] = path
            ort_path = theirs(paths["fp32"], folder)
            out = common.session(ort_path).run(None, {"input": x_test.numpy()})[0]
            row["files"]["ort quantize_dynamic int8"] = {
                "file_bytes": os.path.getsize(ort_path), "accuracy": float(np.mean(common.top1(out) == labels)),
                "sqnr_vs_float_db": common.json_float(round(common.sqnr_db(ref, out), 2)),
                "onnxruntime_ops": common.optimized_op_counts(ort_path)}
            paths["ort quantize_dynamic int8"] = ort_path
            latency = common.interleaved_latency(paths, inputs, REPS, reference="fp32")
            for label, info in row["files"].items():
                info["size_ratio_to_float"] = round(info["file_bytes"] / row["files"]["fp32"]["file_bytes"], 3)
                info["latency"] = {f"batch{b}": latency[b][label] for b in latency}
                lat = info["latency"]
                print(f"{kind} {label:28s} acc {info['accuracy']:.3f} (float {row['float_accuracy']:.3f})  "
                      f"SQNR {info['sqnr_vs_float_db']} dB  {info['file_bytes']:7d} B ({info['size_ratio_to_float']:.3f})"
                      f"  b1 x{lat['batch1']['ratio_to_fp32']:.2f}  b8 x{lat['batch8']['ratio_to_fp32']:.2f}"
                      f"  {info.get('rnn', '')}", flush=True)
            models.append(row)
    out_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "recurrent.json")
    with open(out_path, "w") as f:
        json.dump({"benchmark": "recurrent", "environment": env, "calibration_samples": CALIB,
                   "test_samples": int(len(labels)), "onnxruntime": onnxruntime.__version__, "models": models,
                   "seconds": round(time.perf_counter() - t0, 1)}, f, indent=1)
    print(f"wrote {out_path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
