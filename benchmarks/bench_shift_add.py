"""Benchmark: the shift-add lowering (``--emit shift-add``) against the standard form.

1. The bundled digits CNN at APoT 3/4/5-bit and PoT 5-bit weights (PoT 4-bit activations): file size, onnxruntime
   latency (CPU, 1 thread, batch 1 and 64, median of repeated runs), test accuracy on the 500 held-out images, and
   validation against the PyTorch simulation (activation codes that differ), standard vs lowered; the cost report.
2. torchvision ResNet-18 (random weights, seeded; BatchNorm statistics from 3 seeded random batches in train mode),
   224×224: the per-layer and total shifts/additions of the lowered form next to the multiplications of the uniform
   integer form, at APoT 5-bit, PoT 5-bit and APoT 3-bit weights (the precisions of the APoT paper's Table 3),
   file sizes, and one latency measurement (APoT 5-bit, batch 1). torchvision is not a dependency of the main
   environment: when it cannot be imported, this part re-runs itself in a separate venv (``QCOMPILE_VISION_PYTHON``,
   else ``/tmp/venv-vision6`` or ``/tmp/venv-vision``) that has torch + torchvision + qcompile (editable).

Writes ``benchmarks/results/shift_add.json``. Run from the repository root: ``python benchmarks/bench_shift_add.py``
(``--quick`` skips ResNet-18). Latencies are wall-clock on a shared machine: the load average is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import qcompile  # noqa: E402
from qcompile.cost import cost_report, format_cost_report  # noqa: E402
from qcompile.lowering import lower_shift_add  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "shift_add.json")
DIGITS_CONFIGS = {"apot3": dict(scheme="apot", bits=3), "apot4": dict(scheme="apot", bits=4),
                  "apot5": dict(scheme="apot", bits=5), "pot5": dict(scheme="pot", bits=5, abits=4)}
RESNET_CONFIGS = {"apot5": dict(scheme="apot", bits=5), "pot5": dict(scheme="pot", bits=5, abits=4),
                  "apot3": dict(scheme="apot", bits=3)}
VENVS = ("/tmp/venv-vision6", "/tmp/venv-vision")


def _session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def latency_pair_ms(models: dict, x: np.ndarray, runs: int, warmup: int = 2) -> dict:
    """Median and min wall time of ``sess.run`` on ``x`` (ms), 1 intra-op thread, for each model, the sessions
    alternating run by run: the ratio between them holds when the shared machine's load changes mid-measurement."""
    sessions = {k: _session(m) for k, m in models.items()}
    names = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    for _ in range(warmup):
        for k, sess in sessions.items():
            sess.run(None, {names[k]: x})
    times: dict = {k: [] for k in sessions}
    for _ in range(runs):
        for k, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, {names[k]: x})
            times[k].append(1000 * (time.perf_counter() - t0))
    return {k: {"median_ms": statistics.median(t), "min_ms": min(t), "runs": runs} for k, t in times.items()}


def _size(model: onnx.ModelProto) -> dict:
    return {"file_bytes": model.ByteSize(),
            "initializer_bytes": sum(t.ByteSize() for t in model.graph.initializer),
            "nodes": len(model.graph.node)}


def bench_digits() -> dict:
    from qcompile.models import digits

    x_tr, _, x_te, y_te = digits.load_split()
    calib = x_tr[:32]
    out = {}
    for name, opts in DIGITS_CONFIGS.items():
        runs = {}
        for emit in ("standard", "shift-add"):
            torch.manual_seed(0)
            result = qcompile.compile(digits.pretrained(), calib[:1], calib=calib, validation_inputs=x_te, emit=emit,
                                      **opts)
            model = result.onnx_model
            logits = _session(model).run(None, {"input": x_te.numpy()})[0]
            runs[emit] = {
                "accuracy": digits.accuracy(logits, y_te),
                "validation": {"max_abs": result.report.max_abs, "codes_differ": result.report.extra.get("codes_differ"),
                               "codes_total": result.report.extra.get("codes_total"),
                               "passed": result.report.passed},
                **_size(model),
                "model": model,
            }
        models = {emit: r["model"] for emit, r in runs.items()}
        for key, batch, n in (("latency_batch1", 1, 300), ("latency_batch64", 64, 40)):
            for emit, lat in latency_pair_ms(models, x_te[:batch].numpy(), runs=n).items():
                runs[emit][key] = lat
        std, low = runs["standard"], runs["shift-add"]
        report = cost_report(low.pop("model"))
        std.pop("model")
        out[name] = {
            "options": opts, "standard": std, "shift_add": low, "structure": _summary_from(report),
            "latency_ratio_batch1": low["latency_batch1"]["median_ms"] / std["latency_batch1"]["median_ms"],
            "latency_ratio_batch64": low["latency_batch64"]["median_ms"] / std["latency_batch64"]["median_ms"],
            "size_ratio": low["file_bytes"] / std["file_bytes"],
            "cost": report,
        }
        print(f"digits {name}: accuracy standard {100 * std['accuracy']:.1f}% / lowered {100 * low['accuracy']:.1f}%, "
              f"codes differing from the simulation {std['validation']['codes_differ']} / "
              f"{low['validation']['codes_differ']} of {std['validation']['codes_total']}; "
              f"size {std['file_bytes']} -> {low['file_bytes']} B; latency b1 "
              f"{std['latency_batch1']['median_ms']:.3f} -> {low['latency_batch1']['median_ms']:.3f} ms "
              f"(x{out[name]['latency_ratio_batch1']:.1f}), b64 {std['latency_batch64']['median_ms']:.2f} -> "
              f"{low['latency_batch64']['median_ms']:.2f} ms (x{out[name]['latency_ratio_batch64']:.1f})")
    for line in format_cost_report(out["apot4"]["cost"]):
        print(line)
    return out


def _summary_from(report: dict) -> dict:
    rows = [r for r in report["layers"] if r["lowered"]]
    return {"lowered_layers": len(rows), "accumulators": sorted({r["accumulator_dtype"] for r in rows}),
            "groups_per_layer": [r.get("groups") for r in rows], "planes_per_layer": [r.get("onnx_planes") for r in rows],
            "onnx_mask_macs_over_macs": (sum(r.get("onnx_mask_macs", 0) for r in rows)
                                         / max(1, sum(r["uniform"]["mults"] for r in rows)))}


# -- ResNet-18 -----------------------------------------------------------------------------------------------
def resnet18_seeded():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    gen = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 224, 224, generator=gen))
    return model.eval(), torch.randn(2, 3, 224, 224, generator=gen)


def _git_revision() -> str | None:
    """The commit measured (``-dirty`` when the tree had changes)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _codes(model: onnx.ModelProto, sim, x: torch.Tensor) -> dict:
    from qcompile.runtime.validation import validate_quantized

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        onnx.save(model, path)
        report = validate_quantized(path, sim, x)
    return {"passed": report.passed, "max_abs_vs_simulation": report.max_abs,
            "codes_total": report.extra.get("codes_total"), "codes_differ": report.extra.get("codes_differ"),
            "codes_differ_local": report.extra.get("codes_differ_local")}


def bench_resnet18_here() -> dict:
    import torchvision

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, calib = resnet18_seeded()
    out = {"torchvision": torchvision.__version__, "torch": torch.__version__, "input": [1, 3, 224, 224],
           "calibration": "2 seeded N(0,1) images, minmax observer (counts depend on the weight codes only)"}
    for name, opts in RESNET_CONFIGS.items():
        t0 = time.perf_counter()
        result = qcompile.compile(model, calib[:1], calib=calib, validate=False, calib_method="minmax", **opts)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lowered = lower_shift_add(result.onnx_model, check=True)
        lower_s = time.perf_counter() - t0
        report = cost_report(lowered)
        row = {"options": opts, "compile_seconds": compile_s, "lower_and_check_seconds": lower_s,
               "standard": _size(result.onnx_model), "shift_add": _size(lowered), "cost": report,
               "structure": _summary_from(report)}
        if name == "apot5":
            x = calib[:1].numpy()
            row["latency_batch1"] = latency_pair_ms({"standard": result.onnx_model, "shift_add": lowered}, x, runs=7,
                                                    warmup=1)
            a = _session(result.onnx_model).run(None, {"input": x})[0]
            b = _session(lowered).run(None, {"input": x})[0]
            row["max_abs_output_difference"] = float(np.abs(a - b).max())
            # Where that difference comes from: each file against the simulation, side by side (flips cascade
            # through the following layers) and on identical inputs (only threshold ties of the file's own
            # accumulation order), on the same image.
            row["validation_batch1"] = {kind: _codes(m, result.model, calib[:1])
                                        for kind, m in (("standard", result.onnx_model), ("shift_add", lowered))}
        out[name] = row
        t = report["totals"]
        print(f"resnet18 {name}: uniform {t['uniform']['mults'] / 1e9:.3f}G mults + {t['uniform']['adds'] / 1e9:.3f}G "
              f"adds; shift-add {t['shift_add']['mults'] / 1e9:.3f}G mults (kept) + {t['shift_add']['shifts'] / 1e6:.2f}M "
              f"shifts + {t['shift_add']['adds'] / 1e9:.3f}G adds")
    for line in format_cost_report(out["apot5"]["cost"]):
        print(line)
    return out


def bench_resnet18() -> dict:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        return bench_resnet18_here()
    candidates = [os.environ.get("QCOMPILE_VISION_PYTHON")] + [os.path.join(v, "bin", "python") for v in VENVS]
    python = next((c for c in candidates if c and os.path.exists(c)), None)
    if python is None:
        return {"skipped": "torchvision is not importable and no vision venv was found"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "resnet18.json")
        subprocess.run([python, os.path.abspath(__file__), "--resnet18-json", path], check=True, cwd=ROOT)
        with open(path) as fh:
            data = json.load(fh)
    data["python"] = python
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits only")
    parser.add_argument("--resnet18-json", metavar="FILE", help=argparse.SUPPRESS)  # the venv re-run
    args = parser.parse_args()
    if args.resnet18_json:
        with open(args.resnet18_json, "w") as fh:
            json.dump(bench_resnet18_here(), fh)
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_before": os.getloadavg(), "onnxruntime": ort.__version__, "torch": torch.__version__,
                    "latency": "onnxruntime CPU, 1 intra-op thread, median wall time of sess.run, standard and lowered sessions alternating",
                    "git": _git_revision()},
        "digits": bench_digits(),
    }
    if not args.quick:
        results["resnet18"] = bench_resnet18()
    results["machine"]["load_average_after"] = os.getloadavg()
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump(results, fh, indent=2, default=float)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
