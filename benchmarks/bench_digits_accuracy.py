"""Benchmark: accuracy of the bundled digits CNN quantized with APoT, PoT and uniform levels (issue 5).

Data: scikit-learn's ``load_digits`` split of ``qcompile.models.digits`` -- 500 held-out test images; calibration
on the first 32 training images (``x_train[:32]``). Configurations: APoT, PoT and uniform at 8, 5, 4 and 3 bits
(weights and activations at the same bits; default options, so the first and last layers stay 8-bit uniform as the
papers do), the W4 APoT / A8 uniform mix, and -- the ablation -- 4 and 3 bits with the first and last layers
quantized like the rest (``keep_first_last="quant"``).

For each: accuracy of the float model (PyTorch), of the simulation (``result.model`` in PyTorch) and of the
emitted file in onnxruntime; whether simulation and file predict the same class for every image; the validation's
activation-code mismatch fraction and output SQNR of the file against the float model (both on the 500 test
images); file size against the packed ideal (``benchmarks.common.ideal_size``); compile time with validation.

Writes ``benchmarks/results/digits_accuracy.json`` and prints a markdown table and the targets.
Run: ``python benchmarks/bench_digits_accuracy.py`` from the repository root (about 10-20 s on 2 cores).
"""
from __future__ import annotations

import argparse
import json
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
from qcompile.models import digits  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "digits_accuracy.json")
SCHEMES = ("apot", "pot", "uniform")
BITS = (8, 5, 4, 3)
ABLATION_BITS = (4, 3)
CALIB = 32


def configurations(ablation: bool) -> list[dict]:
    configs = [{"name": f"{s} W{b}A{b}", "scheme": s, "bits": b} for s in SCHEMES for b in BITS]
    configs.append({"name": "W4 apot / A8 uniform", "scheme": "apot", "bits": 4, "ascheme": "uniform", "abits": 8})
    if ablation:
        configs += [{"name": f"{s} W{b}A{b} all layers", "scheme": s, "bits": b, "keep_first_last": "quant"}
                    for s in SCHEMES for b in ABLATION_BITS]
    return configs


def measure(config: dict, model, x_cal, x_test, y_test, float_acc: float, folder: str) -> dict:
    options = {k: v for k, v in config.items() if k != "name"}
    path = os.path.join(folder, config["name"].replace(" ", "_").replace("/", "-") + ".onnx")
    t0 = time.perf_counter()
    try:
        result = qcompile.compile(model, x_cal[:1], calib=x_cal, output=path, validation_inputs=x_test, **options)
    except qcompile.UserError as exc:  # e.g. PoT levels wider than the grid qcompile accepts
        return {"name": config["name"], "options": options, "float_acc": float_acc, "error": str(exc)}
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        sim_logits = result.model(x_test).float().numpy()
    ort_logits = common.run_batched(common.session(path), x_test.numpy(), batch=100)
    sim_pred, ort_pred = common.top1(sim_logits), common.top1(ort_logits)
    labels = y_test.numpy()
    size = os.path.getsize(path)
    ideal = common.ideal_size(result.model)
    extra = result.report.extra
    return {
        "name": config["name"],
        "options": options,
        "describe": result.options.describe(),
        "float_acc": float_acc,
        "sim_acc": float(np.mean(sim_pred == labels)),
        "onnx_acc": float(np.mean(ort_pred == labels)),
        "sim_onnx_same_predictions": bool(np.array_equal(sim_pred, ort_pred)),
        "sim_onnx_prediction_differ": int(np.sum(sim_pred != ort_pred)),
        "code_mismatch": extra.get("code_mismatch"),
        "code_mismatch_local": extra.get("code_mismatch_local"),
        "sqnr_vs_float_db": common.json_float(extra.get("sqnr_vs_float_db")),
        "sim_vs_onnx_sqnr_db": common.json_float(result.report.sqnr_db),
        "validation_passed": result.report.passed,
        "validation_failures": list(result.report.failures),
        "file_bytes": size,
        "ideal_bytes": ideal["bytes"],
        "size_ratio_to_ideal": round(size / ideal["bytes"], 3),
        "compile_seconds_with_validation": round(seconds, 2),
    }


def evaluate_targets(rows: list[dict]) -> list[dict]:
    by_name = {r["name"]: r for r in rows if "error" not in r}
    float_acc = rows[0]["float_acc"]
    targets = []

    def pts(a: float) -> float:
        return round(100.0 * a, 2)

    for scheme in SCHEMES:
        r = by_name.get(f"{scheme} W8A8")
        if r:
            drop = pts(float_acc - r["onnx_acc"])
            targets.append({"target": f"{scheme} W8A8 within 0.3 points of float", "met": drop <= 0.3,
                            "detail": f"float {pts(float_acc)}%, file {pts(r['onnx_acc'])}% (drop {drop} points)"})
    r = by_name.get("apot W4A4")
    if r:
        drop = pts(float_acc - r["onnx_acc"])
        targets.append({"target": "apot W4A4 within 1.5 points of float", "met": drop <= 1.5,
                        "detail": f"float {pts(float_acc)}%, file {pts(r['onnx_acc'])}% (drop {drop} points)"})
    for bits in (4, 3):
        a, u = by_name.get(f"apot W{bits}A{bits}"), by_name.get(f"uniform W{bits}A{bits}")
        if a and u:
            sq_a, sq_u = a["sqnr_vs_float_db"], u["sqnr_vs_float_db"]
            targets.append({"target": f"apot W{bits}A{bits} at least as accurate as uniform W{bits}A{bits}",
                            "met": a["onnx_acc"] >= u["onnx_acc"],
                            "detail": f"apot {pts(a['onnx_acc'])}% vs uniform {pts(u['onnx_acc'])}%; "
                                      f"SQNR vs float {_db(sq_a)} vs {_db(sq_u)} dB"})
    return targets


def _db(v) -> str:
    return v if isinstance(v, str) else f"{v:.1f}"


def table_row(r: dict) -> list:
    if "error" in r:  # a configuration qcompile refuses: say why in the accuracy column
        reason = r["error"].split(";")[0].split(" (")[0]
        return [r["name"], f"{100 * r['float_acc']:.1f}", "unsupported: " + reason] + [""] * 7
    same = "yes" if r["sim_onnx_same_predictions"] else f"no ({r['sim_onnx_prediction_differ']} differ)"
    mismatch = f"{100 * r['code_mismatch']:.4f}%" if r["code_mismatch"] is not None else "n/a"
    return [r["name"], f"{100 * r['float_acc']:.1f}", f"{100 * r['sim_acc']:.1f}", f"{100 * r['onnx_acc']:.1f}",
            same, mismatch, _db(r["sqnr_vs_float_db"]), r["file_bytes"], f"{r['size_ratio_to_ideal']:.2f}",
            f"{r['compile_seconds_with_validation']:.1f}"]


def table(rows: list[dict]) -> str:
    headers = ["config", "float %", "sim %", "onnx %", "sim = onnx", "code mismatch", "SQNR vs float dB",
               "file bytes", "/ ideal", "compile+validate s"]
    return common.markdown_table(headers, [table_row(r) for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-ablation", action="store_true", help="skip the keep_first_last='quant' runs")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x_train, _, x_test, y_test = digits.load_split()
    x_cal = x_train[:CALIB].clone()
    model = digits.pretrained()
    with torch.no_grad():
        float_acc = digits.accuracy(model(x_test), y_test)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for config in configurations(not args.no_ablation):
            row = measure(config, model, x_cal, x_test, y_test, float_acc, folder)
            rows.append(row)
            if "error" in row:
                print(f"  {row['name']}: {row['error']}", flush=True)
                continue
            print(f"  {row['name']}: onnx {100 * row['onnx_acc']:.1f}%, SQNR {_db(row['sqnr_vs_float_db'])} dB, "
                  f"{row['compile_seconds_with_validation']:.1f} s", flush=True)
    targets = evaluate_targets(rows)
    doc = {
        "benchmark": "digits_accuracy",
        "model": "qcompile.models.digits (bundled pretrained DigitsCNN)",
        "data": {"test_images": int(x_test.shape[0]), "calibration": f"x_train[:{CALIB}]",
                 "source": "sklearn.datasets.load_digits, stratified split random_state=0"},
        "float_acc": float_acc,
        "environment": common.environment(),
        "seconds": round(time.perf_counter() - started, 1),
        "results": rows,
        "targets": targets,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
    print()
    print(table(rows))
    print()
    for t in targets:
        print(f"- {'MET' if t['met'] else 'NOT MET'}: {t['target']} ({t['detail']})")
    print(f"\nwrote {os.path.relpath(args.output, ROOT)} in {doc['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
