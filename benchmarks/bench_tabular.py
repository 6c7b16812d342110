"""Tabular models on raw features: what the per-tensor input quantizer costs, and what EqualizeInputs gives back.

For scikit-learn's wine, breast cancer and iris data (shipped with scikit-learn: nothing is downloaded), raw and
standardized, an MLP (in → 32 → 32 → classes, ReLU) is trained on 70 % of the samples (Adam, 3000 full-batch
steps, seed 0) and compiled at W8A8 (and APoT W4A4) with the first 128 training samples as calibration data. Test
accuracy and output SQNR against the float model on the other 30 %:

- ``qcompile``: the compiled file, run in onnxruntime;
- ``without EqualizeInputs``: the same pipeline with that pass left out (its simulation, which the file computes);
- ``quantize_static``: onnxruntime's own flow on the float ONNX export (QDQ, per-channel weights, MinMax).

Run: ``python benchmarks/bench_tabular.py`` from the repository root (about a minute). Writes
``benchmarks/results/tabular.json``.
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

CALIB = 128
CONFIGS = {"W8A8": dict(scheme="uniform", bits=8), "APoT W4A4": dict(scheme="apot", bits=4)}


def datasets():
    from sklearn.datasets import load_breast_cancer, load_iris, load_wine

    for name, loader in (("wine", load_wine), ("breast_cancer", load_breast_cancer), ("iris", load_iris)):
        x, y = loader(return_X_y=True)
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        train, test = perm[:int(0.7 * len(x))], perm[int(0.7 * len(x)):]
        yield f"{name} raw", x, y, train, test
        mean, std = x[train].mean(0), x[train].std(0)
        yield f"{name} standardized", (x - mean) / std, y, train, test


def train(x, y, train_idx) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, int(y.max()) + 1))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(3000):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[train_idx]), y[train_idx]).backward()
        opt.step()
    return model.eval()


def without_input_equalization(model, example, calib, options) -> torch.nn.Module:
    """The compile's simulation with the EqualizeInputs pass left out of the same pipeline."""
    from qcompile.frontend import trace
    from qcompile.options import CompileOptions, resolve_int8_weights
    from qcompile.passes.base import Pipeline
    from qcompile.passes.equalize_inputs import EqualizeInputs
    from qcompile.pipeline import build_passes

    opts = resolve_int8_weights(CompileOptions(**options))
    passes = [p for p in build_passes(opts, calib) if not isinstance(p, EqualizeInputs)]
    return Pipeline(passes)(trace(model, (example,))).gm


def theirs(model, x_calib, x_test, folder) -> np.ndarray:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    float_path, q_path = os.path.join(folder, "float.onnx"), os.path.join(folder, "ort.onnx")
    torch.onnx.export(model, (x_calib[:1],), float_path, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": x_calib.numpy()}])

        def get_next(self):
            return next(self.items, None)

    quantize_static(float_path, q_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax)
    return common.session(q_path).run(None, {"input": x_test.numpy()})[0]


def main() -> None:
    import logging

    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice to pre-process, once per model
    t0 = time.perf_counter()
    env = common.environment()  # before the run: the commit, clean until this run writes its results
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, x, y, train_idx, test_idx in datasets():
            model = train(x, y, train_idx)
            calib, test, labels = x[train_idx][:CALIB], x[test_idx], y[test_idx].numpy()
            with torch.no_grad():
                ref = model(test).numpy()
            row = {"data": name, "features": int(x.shape[1]), "test_samples": int(len(test_idx)),
                   "float_accuracy": float(np.mean(common.top1(ref) == labels))}
            for label, options in CONFIGS.items():
                path = os.path.join(folder, "ours.onnx")
                result = qcompile.compile(model, calib[:1], calib=calib, output=path, **options)
                out = common.session(path).run(None, {"input": test.numpy()})[0]
                with torch.no_grad():
                    plain = without_input_equalization(model, calib[:1], calib, options)(test).numpy()
                eq = [line for t in result.timings if t.name == "EqualizeInputs" for line in t.report]
                row[label] = {
                    "passed": result.report.passed,
                    "equalize_inputs": eq[0] if eq else None,
                    "accuracy": float(np.mean(common.top1(out) == labels)),
                    "sqnr_vs_float_db": common.json_float(round(common.sqnr_db(ref, out), 2)),
                    "without_equalize_inputs_accuracy": float(np.mean(common.top1(plain) == labels)),
                    "without_equalize_inputs_sqnr_db": common.json_float(round(common.sqnr_db(ref, plain), 2)),
                }
            out = theirs(model, calib, test, folder)
            row["quantize_static W8A8"] = {"accuracy": float(np.mean(common.top1(out) == labels)),
                                           "sqnr_vs_float_db": common.json_float(round(common.sqnr_db(ref, out), 2))}
            rows.append(row)
            w8 = row["W8A8"]
            print(f"{name:28s} float {row['float_accuracy']:.3f}  W8A8 {w8['accuracy']:.3f} ({w8['sqnr_vs_float_db']} dB)"
                  f"  without EqualizeInputs {w8['without_equalize_inputs_accuracy']:.3f} "
                  f"({w8['without_equalize_inputs_sqnr_db']} dB)  quantize_static "
                  f"{row['quantize_static W8A8']['accuracy']:.3f} ({row['quantize_static W8A8']['sqnr_vs_float_db']} dB)",
                  flush=True)
    out_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tabular.json")
    with open(out_path, "w") as f:
        json.dump({"benchmark": "tabular", "environment": env, "calibration_samples": CALIB,
                   "onnxruntime": onnxruntime.__version__, "rows": rows,
                   "seconds": round(time.perf_counter() - t0, 1)}, f, indent=1)
    print(f"wrote {out_path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
