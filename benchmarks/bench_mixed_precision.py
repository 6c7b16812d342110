"""Benchmark: automatic mixed precision (``--avg-wbits``) against the same bits in every layer, on trained models.

The three models of ``benchmarks/bench_adaptive_rounding.py`` (the bundled digits CNN, and the MobileNetV3-like and
ViT-like models trained here on the same real digits; nothing downloaded), APoT and uniform weights with 8- and 4-bit
activations (same scheme), at an average of 4 and of 3 weight bits: once with that bit-width in every layer the
default rule quantizes (``wbits``), once with per-layer bit-widths chosen by ``AllocateWeightBits`` under that
average (``avg_wbits``; the first and last layers stay 8-bit in both). Reported per row: output SQNR of the
onnxruntime file against the float model and accuracy on the 500 held-out images, the packed ideal size of the
weights (``common.ideal_size``; mixed never above fixed), the validation verdicts and the chosen bits.

Writes ``benchmarks/results/mixed_precision.json`` and prints a markdown table.
Run: ``python benchmarks/bench_mixed_precision.py`` from the repository root (about 2-3 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
from benchmarks.bench_adaptive_rounding import measure, trained_models  # noqa: E402
from qcompile.models import digits  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "mixed_precision.json")
CALIB = 32


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=RESULTS, help="JSON results file (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x_tr, y_tr, x_te, y_te = digits.load_split()
    x_cal = x_tr[:CALIB].clone()
    models = trained_models(x_tr, y_tr)
    results = {"environment": common.environment(), "calibration_images": CALIB, "test_images": len(x_te),
               "models": []}
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.onnx")
        for name, model in models.items():
            with torch.no_grad():
                ref = model(x_te).numpy()
            entry = {"model": name, "float_accuracy": float(np.mean(ref.argmax(1) == y_te.numpy())), "rows": []}
            for scheme in ("apot", "uniform"):
                for abits in (8, 4):
                    for avg in (4, 3):
                        base = {"wscheme": scheme, "ascheme": scheme if abits < 8 else "uniform", "wbits": avg,
                                "abits": abits}
                        row = {"config": f"{scheme} W{avg} / A{abits}", "options": base,
                               "fixed": measure(model, base, x_cal, x_te, y_te, ref, path),
                               "mixed": measure(model, dict(base, avg_wbits=avg), x_cal, x_te, y_te, ref, path)}
                        f, m = row["fixed"], row["mixed"]
                        row["sqnr_gain_db"] = round(m["sqnr_vs_float_db"] - f["sqnr_vs_float_db"], 2)
                        entry["rows"].append(row)
                        rows.append([name, row["config"], f"{f['sqnr_vs_float_db']:.2f} / {m['sqnr_vs_float_db']:.2f}",
                                     f"{row['sqnr_gain_db']:+.2f}",
                                     f"{100 * f['accuracy']:.1f} / {100 * m['accuracy']:.1f}",
                                     f"{f['ideal_bytes']} / {m['ideal_bytes']}",
                                     "PASS" if f["validation_passed"] and m["validation_passed"] else "FAIL"])
                        print(" | ".join(rows[-1]), flush=True)
            results["models"].append(entry)
    gains = [r["sqnr_gain_db"] for m in results["models"] for r in m["rows"]]
    results["summary"] = {
        "rows": len(gains), "sqnr_gain_db_median": float(np.median(gains)), "sqnr_gain_db_min": float(min(gains)),
        "sqnr_gain_db_max": float(max(gains)), "rows_with_gain": int(sum(g > 0 for g in gains)),
        "rows_with_loss": int(sum(g < 0 for g in gains)),
        "mixed_never_larger": all(r["mixed"]["ideal_bytes"] <= r["fixed"]["ideal_bytes"]
                                  for m in results["models"] for r in m["rows"]),
        "all_validations_passed": all(r[k]["validation_passed"] for m in results["models"] for r in m["rows"]
                                      for k in ("fixed", "mixed"))}
    common.finish(results, args.output,
                  ["model", "weights / activations", "SQNR vs float dB (fixed / mixed)", "gain",
                   "accuracy % (fixed / mixed)", "ideal bytes (fixed / mixed)", "validation"], rows, t_start)


if __name__ == "__main__":
    main()
