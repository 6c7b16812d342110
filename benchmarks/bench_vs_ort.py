"""Benchmark: qcompile against onnxruntime's own static quantizer, in one run (issue 5).

Models: the bundled digits CNN (real data: 500 test images, accuracy) and, when torchvision is importable,
torchvision's ``resnet18`` and ``mobilenet_v2`` with seeded random weights and non-trivial BatchNorm statistics
(20 random batches in train mode, then ``eval()``); for those, 64 seeded random evaluation inputs and agreement with
the float model (output SQNR, top-1 agreement). Both tools calibrate on the same 32 inputs (digits: ``x_train[:32]``).

- **ours**: from a saved ``state_dict`` (``model.pt``): ``qcompile.load_model`` + ``qcompile.compile(validate=False)``
  through the written ONNX file, timed; validation (``validate_quantized`` on the 32 calibration inputs, what
  ``validate=True`` runs) timed separately. Configurations: fp32, uniform W8A8 (default int8 weights; also s8 and
  u8), W4 APoT / A8 uniform, APoT W4A4.
- **theirs**: ``torch.onnx.export`` (float, opset 17) + ``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel,
  QUInt8 activations, QInt8 weights, MinMax), timed from the same ``model.pt``.
- **latency**: onnxruntime, 2 intra-op threads, spinning off, every session in this process, interleaved round-robin
  after a warm-up; median of >= 50 runs at batch 1 and >= 20 at batch 8, each as a ratio to qcompile's fp32 file
  from the same loop (``benchmarks.common.interleaved_latency``).
- **size**: file bytes against the packed ideal (``benchmarks.common.ideal_size``); onnxruntime's file against the
  ideal of our uniform W8A8 (the same layers at 8 bits).

Writes ``benchmarks/results/vs_ort.json`` and prints a table per model and the targets. Without torchvision the run
re-executes itself with ``$QCOMPILE_VISION_PYTHON`` (default ``/tmp/venv-vision/bin/python``) when that exists,
else it measures the digits model only and says so in the JSON.
Run: ``python benchmarks/bench_vs_ort.py [--models digits,resnet18,mobilenet_v2]`` from the repository root;
``--models efficientnet_b0 --output benchmarks/results/vs_ort_efficientnet.json`` measures EfficientNet-B0 (SiLU and
squeeze-excite gates) the same way (also ``mobilenet_v3_small``); ``--models yolov8n_like --output
benchmarks/results/vs_ort_yolov8n.json`` a YOLOv8n-shaped detector at 320 x 320 (``benchmarks/yolo_like.py``: C2f's
chunks, SPPF, the PAN neck's concatenations; no torchvision needed), for which onnxruntime's ``quant_pre_process``
needs ``skip_symbolic_shape=True`` (its symbolic shape inference gives up on the chunks).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnxruntime
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import qcompile  # noqa: E402
from benchmarks import common  # noqa: E402
from qcompile.models import digits  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "vs_ort.json")
VISION_PYTHON = os.environ.get("QCOMPILE_VISION_PYTHON", "/tmp/venv-vision/bin/python")
ALL_MODELS = ("digits", "resnet18", "mobilenet_v2")  # the models: the default run
# on request (--models): SiLU / squeeze-excite networks, whose gates quantize_static runs in int8
EXTRA_MODELS = ("efficientnet_b0", "mobilenet_v3_small", "yolov8n_like")
NO_TORCHVISION = ("digits", "yolov8n_like")  # models that need no torchvision (benchmarks/yolo_like.py)
YOLO_SIZE = 320  # yolov8n_like's input: 320 x 320 (2.2 GFLOPs, about ResNet-18's at 224)
CALIB, EVAL = 32, 64
SEED = 0
OURS = {  # name -> qcompile.compile options
    "ours fp32": {"scheme": "fp32"},
    "ours uniform W8A8": {"scheme": "uniform", "bits": 8},
    "ours W4 apot / A8 uniform": {"scheme": "apot", "bits": 4, "wscheme": "apot", "wbits": 4,
                                  "ascheme": "uniform", "abits": 8},
    "ours apot W4A4": {"scheme": "apot", "bits": 4},
    # the same with --float-levels: layers before APoT activations in float, exact nearest levels (qcompile <= 0.2)
    "ours apot W4A4 float levels": {"scheme": "apot", "bits": 4, "int8_levels": False},
    "ours uniform W4A4": {"scheme": "uniform", "bits": 4},
    # the other 8-bit weight forms (the default, auto, is s8 where onnxruntime's uint8 x int8 kernels are exact,
    # else s8-safe): full-range int8 codes (saturating on x86 without VNNI, like quantize_static's file there), and
    # uint8 codes with zero point 128 (full precision, exact everywhere, the slower uint8 x uint8 kernels)
    "ours uniform W8A8 s8": {"scheme": "uniform", "bits": 8, "int8_weights": "s8"},
    "ours uniform W8A8 u8": {"scheme": "uniform", "bits": 8, "int8_weights": "u8"},
}
FLOAT_REF = "ours fp32"
THEIRS = "ort quantize_static int8"
THEIRS_FLOAT = "ort float export"
# digits: 40 µs runs, noise-bound. Vision models: 50 runs at batch 8 left +-4% between two files that are one
# (our W8A8 and W8A8 s8 files, identical here, 15.6 vs 15.4 ms on MobileNetV2)
REPS = {"digits": {1: 2000, 8: 1000}, "default": {1: 400, 8: 150}}


def have_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Case:
    name: str
    spec: str              # factory for qcompile.load_model(arch=...)
    model: torch.nn.Module  # float, eval
    calib: torch.Tensor
    inputs: torch.Tensor   # evaluation inputs
    labels: Optional[torch.Tensor] = None


def digits_case() -> Case:
    x_train, _, x_test, y_test = digits.load_split()
    return Case("digits", digits.SPEC, digits.pretrained(), x_train[:CALIB].clone(), x_test, y_test)


def vision_case(arch: str) -> Case:
    if arch == "yolov8n_like":
        from benchmarks.yolo_like import yolov8n_like

        torch.manual_seed(SEED)
        return _random_bn_case(arch, "benchmarks.yolo_like:yolov8n_like", yolov8n_like(), YOLO_SIZE)
    import torchvision

    torch.manual_seed(SEED)
    return _random_bn_case(arch, f"torchvision.models:{arch}", getattr(torchvision.models, arch)(weights=None), 224)


def _random_bn_case(name: str, spec: str, model: torch.nn.Module, size: int) -> Case:
    gen = torch.Generator().manual_seed(SEED + 1)
    model.train()
    with torch.no_grad():  # BatchNorm running statistics of real activations, not the (0, 1) defaults
        for _ in range(20):
            model(torch.randn(8, 3, size, size, generator=gen))
    model.eval()
    calib = torch.randn(CALIB, 3, size, size, generator=torch.Generator().manual_seed(SEED + 2))
    inputs = torch.randn(EVAL, 3, size, size, generator=torch.Generator().manual_seed(SEED + 3))
    return Case(name, spec, model, calib, inputs)


# -- the two tools ------------------------------------------------------------------------------------------------
def compile_ours(case: Case, weights: str, options: dict, path: str) -> dict:
    t0 = time.perf_counter()
    model = qcompile.load_model(weights, arch=case.spec)
    result = qcompile.compile(model, case.calib[:1], calib=case.calib, output=path, validate=False, **options)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    if result.options.quantized:
        from qcompile.runtime.validation import validate_quantized

        report = validate_quantized(path, result.model, case.calib, float_model=case.model)
    else:
        from qcompile.runtime.validation import validate

        report = validate(path, result.model, case.calib, min_sqnr=80.0)
    validate_seconds = time.perf_counter() - t0
    ideal = common.ideal_size(result.model)
    return {"seconds": seconds, "validate_seconds": validate_seconds, "ideal": ideal,
            "int8_weights": result.options.int8_weights,
            "pass_seconds": {t.name: round(t.seconds, 2) for t in result.timings},
            "validation": {"passed": report.passed, "failures": report.failures,
                           "code_mismatch": report.extra.get("code_mismatch"),
                           "code_mismatch_local": report.extra.get("code_mismatch_local"),
                           "sim_vs_onnx_sqnr_db": common.json_float(report.sqnr_db)}}


class _Reader:
    """onnxruntime's CalibrationDataReader over the same calibration tensor, in batches of 8."""

    def __init__(self, name: str, calib: torch.Tensor, batch: int = 8):
        self.items = iter([{name: calib[i:i + batch].numpy()} for i in range(0, len(calib), batch)])

    def get_next(self):
        return next(self.items, None)


def compile_theirs(case: Case, weights: str, folder: str) -> dict:
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path = os.path.join(folder, "ort_float.onnx")
    pre_path = os.path.join(folder, "ort_pre.onnx")
    q_path = os.path.join(folder, "ort_int8.onnx")
    t0 = time.perf_counter()
    model = qcompile.load_model(weights, arch=case.spec).eval()
    torch.onnx.export(model, (case.calib[:1],), float_path, opset_version=17, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                      dynamo=False)
    t_export = time.perf_counter() - t0
    cwd = os.getcwd()
    os.chdir(folder)  # where its symbolic shape inference fails, it leaves a copy of the weights (<uuid>.data) here
    try:
        try:
            quant_pre_process(float_path, pre_path)
            symbolic = True
        except Exception:  # noqa: BLE001 -- its symbolic shape inference gives up on the chunks of YOLOv8's C2f
            quant_pre_process(float_path, pre_path, skip_symbolic_shape=True)
            symbolic = False
    finally:
        os.chdir(cwd)
    t_pre = time.perf_counter() - t0 - t_export
    quantize_static(pre_path, q_path, _Reader("input", case.calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "export_seconds": t_export, "pre_process_seconds": t_pre,
            "symbolic_shape_inference": symbolic,
            "quantize_static_seconds": seconds - t_export - t_pre, "path": q_path, "float_path": float_path}


# -- compile time, repeated ------------------------------------------------------------------------------------
COMPILE_REPS = {"digits": 21, "default": 5}  # digits: 0.05 s compiles, one busy moment moves a median of 7; vision: 3 runs left +-10%


def compile_times(case: Case, weights: str, folder: str) -> dict:
    """Wall time of our uniform W8A8 compile and of theirs, alternated ``COMPILE_REPS`` times in this process (after
    the first compiles above, so both are warm): medians, since one run on this shared machine can be 2x off."""
    reps = COMPILE_REPS.get(case.name, COMPILE_REPS["default"])
    ours, theirs = [], []
    sub = os.path.join(folder, "timing")
    os.makedirs(sub, exist_ok=True)
    for _ in range(reps):
        ours.append(compile_ours_only(case, weights, OURS["ours uniform W8A8"], os.path.join(sub, "ours.onnx")))
        theirs.append(compile_theirs(case, weights, sub)["seconds"])
    return {"runs": reps, "ours_s": [round(t, 3) for t in ours], "theirs_s": [round(t, 3) for t in theirs],
            "ours_median_s": round(float(np.median(ours)), 3), "theirs_median_s": round(float(np.median(theirs)), 3)}


def compile_ours_only(case: Case, weights: str, options: dict, path: str) -> float:
    t0 = time.perf_counter()
    model = qcompile.load_model(weights, arch=case.spec)
    qcompile.compile(model, case.calib[:1], calib=case.calib, output=path, validate=False, **options)
    return time.perf_counter() - t0


# -- what the activations alone allow ------------------------------------------------------------------------------
def activation_ceiling(case: Case, float_out: np.ndarray) -> dict:
    """Output SQNR vs float of our W8A8 pipeline with the weight quantizers switched off: the noise of the 8-bit
    per-tensor activation quantizers alone (placed as in the int8 file: layer inputs, re-quantized layer outputs,
    residual adds and pools), which no choice of weights, weight rounding or bias correction removes. Calibrated
    with our default (MSE) and with MinMax (what ``quantize_static`` uses); and, with MSE, quantizing only the
    layers' inputs (``int8_outputs=False``: fewer rounding points, but float adds and pools, so not int8 speed).
    Built from the pass API; the passes that bind integer kernels (which read the quantized weights) are left
    out."""
    from qcompile.frontend import trace
    from qcompile.options import CompileOptions
    from qcompile.passes.base import Pipeline
    from qcompile.passes.int8_region import BindIntegerAdds, BindIntegerMuls, BindIntegerPools, BindIntegerSigmoids
    from qcompile.passes.quantize_bias import QuantizeBias
    from qcompile.passes.quantize_outputs import BindIntegerLayers
    from qcompile.pipeline import build_passes
    from qcompile.qmodules import FakeQuantize

    integer = (QuantizeBias, BindIntegerLayers, BindIntegerAdds, BindIntegerMuls, BindIntegerSigmoids, BindIntegerPools)
    out = {}
    for method, int8_outputs in (("mse", True), ("minmax", True), ("mse", False)):
        opts = CompileOptions(scheme="uniform", bits=8, calib_method=method, bias_correction=False,
                              int8_outputs=int8_outputs)
        passes = [p for p in build_passes(opts, case.calib) if not isinstance(p, integer)]
        gm = Pipeline(passes)(trace(case.model, (case.calib[:1],))).gm
        for m in gm.modules():
            if isinstance(m, FakeQuantize) and m.role == "weight":
                m.enabled = False
        with torch.no_grad():
            q = np.concatenate([gm(case.inputs[i:i + 16]).numpy() for i in range(0, len(case.inputs), 16)])
        where = "" if int8_outputs else "_layer_inputs_only"  # no re-quantized outputs, adds, pools: not int8
        out[f"activations_only_{method}{where}_db"] = round(common.sqnr_db(float_out, q), 2)
    return out


# -- one model ----------------------------------------------------------------------------------------------------
def run_case(case: Case, folder: str, configs: dict, log) -> dict:
    weights = os.path.join(folder, f"{case.name}.pt")
    torch.save(case.model.state_dict(), weights)
    with torch.no_grad():
        float_out = np.concatenate([case.model(case.inputs[i:i + 16]).numpy() for i in range(0, len(case.inputs), 16)])
    float_pred = common.top1(float_out)

    files: dict[str, dict] = {}
    for name, options in configs.items():
        path = os.path.join(folder, f"{case.name}_{len(files)}.onnx")
        info = compile_ours(case, weights, options, path)
        info.update(path=path, options=options)
        files[name] = info
        log(f"  {case.name} / {name}: compile {info['seconds']:.1f} s, validate {info['validate_seconds']:.1f} s")
    theirs = compile_theirs(case, weights, folder)
    files[THEIRS] = theirs
    files[THEIRS_FLOAT] = {"path": theirs["float_path"]}
    log(f"  {case.name} / {THEIRS}: {theirs['seconds']:.1f} s")

    u8_ideal = files["ours uniform W8A8"]["ideal"] if "ours uniform W8A8" in files else None
    rows = {}
    for name, info in files.items():
        sess = common.session(info["path"])
        out = common.run_batched(sess, case.inputs.numpy(), batch=16)
        size = os.path.getsize(info["path"])
        ideal = info.get("ideal") or (u8_ideal if name == THEIRS else None)
        if name == THEIRS_FLOAT:
            ideal = {"bytes": common.float_size(case.model)}
        row = {
            "file_bytes": size,
            "ideal_bytes": ideal["bytes"] if ideal else None,
            "size_ratio_to_ideal": round(size / ideal["bytes"], 3) if ideal else None,
            "sqnr_vs_float_db": common.json_float(round(common.sqnr_db(float_out, out), 2)),
            "top1_agreement_with_float": float(np.mean(common.top1(out) == float_pred)),
            "onnxruntime_ops": common.optimized_op_counts(info["path"]),
        }
        if case.labels is not None:
            row["accuracy"] = float(np.mean(common.top1(out) == case.labels.numpy()))
        if name == THEIRS:  # the file's own arithmetic, on onnxruntime's reference (unfused, float) kernels
            ref = common.run_batched(common.session(info["path"], level=onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL),
                                     case.inputs.numpy(), batch=16)
            row["sqnr_vs_float_db_unfused"] = common.json_float(round(common.sqnr_db(float_out, ref), 2))
        for key in ("seconds", "validate_seconds", "export_seconds", "pre_process_seconds", "quantize_static_seconds"):
            if key in info:
                row["compile_" + key if key == "seconds" else key] = round(info[key], 2)
        for key in ("options", "int8_weights", "pass_seconds", "validation"):
            if key in info:
                row[key] = info[key]
        rows[name] = row

    reps = REPS.get(case.name, REPS["default"])
    x = case.inputs.numpy()
    latency = common.interleaved_latency({name: info["path"] for name, info in files.items()},
                                         {1: x[:1], 8: x[:8]}, reps, reference=FLOAT_REF)
    for name in rows:
        rows[name]["latency"] = {f"batch{b}": latency[b][name] for b in latency}
    result = {"model": case.name, "spec": case.spec, "calibration_inputs": int(len(case.calib)),
              "evaluation_inputs": int(len(case.inputs)), "float_params": int(sum(p.numel() for p in case.model.parameters())),
              "files": rows}
    if case.labels is not None:
        result["float_accuracy"] = float(np.mean(float_pred == case.labels.numpy()))
    result["compile_time"] = compile_times(case, weights, folder)
    log(f"  {case.name}: compile time, medians: {result['compile_time']}")
    result["targets"] = targets(rows, result["compile_time"])
    result["w8a8_sqnr_ceiling"] = activation_ceiling(case, float_out)
    log(f"  {case.name}: activations alone (float weights): {result['w8a8_sqnr_ceiling']}")
    return result


def _ratio(rows, a, b, batch) -> Optional[float]:
    if a not in rows or b not in rows:
        return None
    return round(rows[a]["latency"][f"batch{batch}"]["median_ms"] / rows[b]["latency"][f"batch{batch}"]["median_ms"], 3)


def targets(rows: dict, times: Optional[dict] = None) -> list[dict]:
    out = []
    u8, apot48, w4a4 = "ours uniform W8A8", "ours W4 apot / A8 uniform", "ours apot W4A4"
    for batch in (1, 8):
        r = _ratio(rows, u8, THEIRS, batch)
        if r is not None:
            out.append({"target": f"our uniform int8 no slower than theirs, batch {batch} (<= 1.05)", "value": r,
                        "met": r <= 1.05})
        r = _ratio(rows, apot48, u8, batch)
        if r is not None:
            out.append({"target": f"APoT-4 weights / A8 at int8 speed, batch {batch} (<= 1.1x our uniform int8)",
                        "value": r, "met": r <= 1.1})
    for name in (u8, apot48, w4a4):
        if name in rows:
            r = rows[name]["size_ratio_to_ideal"]
            out.append({"target": f"{name} file within 5% of the packed ideal size", "value": r, "met": r <= 1.05})
    if u8 in rows and THEIRS in rows:
        ours_s, theirs_s = rows[u8]["compile_seconds"], rows[THEIRS]["compile_seconds"]
        runs = ""
        if times:
            ours_s, theirs_s, runs = times["ours_median_s"], times["theirs_median_s"], f", medians of {times['runs']}"
        out.append({"target": f"compile wall time (uniform W8A8, validate=False) <= theirs{runs}",
                    "value": f"{ours_s:.3g} s vs {theirs_s:.3g} s ({ours_s / theirs_s:.2f}x)", "met": ours_s <= theirs_s})
        sq_o, sq_t = rows[u8]["sqnr_vs_float_db"], rows[THEIRS]["sqnr_vs_float_db"]
        if not isinstance(sq_o, str) and not isinstance(sq_t, str):
            out.append({"target": "our W8A8 output SQNR vs float >= theirs + 6 dB",
                        "value": f"{sq_o:.1f} dB vs {sq_t:.1f} dB ({sq_o - sq_t:+.1f} dB)", "met": sq_o >= sq_t + 6.0})
        sq_r = rows[THEIRS].get("sqnr_vs_float_db_unfused")
        if not isinstance(sq_o, str) and isinstance(sq_r, (int, float)) and sq_r != sq_t:
            out.append({"target": "our W8A8 output SQNR vs float >= theirs + 6 dB, their file on exact "
                                  "(unfused) kernels",
                        "value": f"{sq_o:.1f} dB vs {sq_r:.1f} dB ({sq_o - sq_r:+.1f} dB)", "met": sq_o >= sq_r + 6.0})
    return out


# -- report -------------------------------------------------------------------------------------------------------
def table(result: dict) -> str:
    headers = ["file", "compile s", "validate s", "bytes", "/ ideal",
               "accuracy %" if "float_accuracy" in result else "top-1 = float %", "SQNR vs float dB",
               "b1 ms", "b1 / fp32", "b8 ms", "b8 / fp32"]
    body = []
    for name, r in result["files"].items():
        acc = r.get("accuracy", r["top1_agreement_with_float"])
        lat1, lat8 = r["latency"]["batch1"], r["latency"]["batch8"]
        sq = r["sqnr_vs_float_db"]
        body.append([name, r.get("compile_seconds", ""), r.get("validate_seconds", ""), r["file_bytes"],
                     "" if r["size_ratio_to_ideal"] is None else f"{r['size_ratio_to_ideal']:.3f}",
                     f"{100 * acc:.1f}", sq if isinstance(sq, str) else f"{sq:.1f}",
                     f"{lat1['median_ms']:.3f}", f"{lat1['ratio_to_' + FLOAT_REF]:.2f}",
                     f"{lat8['median_ms']:.3f}", f"{lat8['ratio_to_' + FLOAT_REF]:.2f}"])
    return common.markdown_table(headers, body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ALL_MODELS),
                        help="comma-separated: " + ", ".join(ALL_MODELS + EXTRA_MODELS))
    parser.add_argument("--no-reexec", action="store_true", help=f"never re-run under {VISION_PYTHON}")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(ALL_MODELS + EXTRA_MODELS)
    if unknown:
        parser.error(f"unknown models: {', '.join(sorted(unknown))}")

    vision = have_torchvision()
    wants_vision = any(m not in NO_TORCHVISION for m in models)
    # the child gets --no-reexec, so this runs at most once (a venv's python is a symlink: no path comparison)
    if wants_vision and not vision and not args.no_reexec and os.path.exists(VISION_PYTHON):
        print(f"torchvision is not importable here; re-running under {VISION_PYTHON}", flush=True)
        return subprocess.call([VISION_PYTHON, os.path.abspath(__file__), "--no-reexec"] + (argv or sys.argv[1:]))
    notes = []
    if wants_vision and not vision:
        notes.append("torchvision not importable in this environment: digits model only "
                     f"(install torchvision, or create {VISION_PYTHON}, to measure resnet18 and mobilenet_v2)")
        models = [m for m in models if m in NO_TORCHVISION]
        print("note: " + notes[-1], flush=True)

    started = time.perf_counter()
    doc = {"benchmark": "vs_ort", "environment": common.environment(), "torchvision_available": vision,
           "notes": notes, "models": []}
    if vision:
        import torchvision

        doc["environment"]["torchvision"] = torchvision.__version__
    with tempfile.TemporaryDirectory() as folder:
        for name in models:
            case = digits_case() if name == "digits" else vision_case(name)
            t0 = time.perf_counter()
            result = run_case(case, folder, OURS, lambda msg: print(msg, flush=True))
            result["seconds"] = round(time.perf_counter() - t0, 1)
            doc["models"].append(result)
            print(f"\n### {name}\n\n{table(result)}\n")
            for t in result["targets"]:
                print(f"- {'MET' if t['met'] else 'NOT MET'}: {t['target']}: {t['value']}")
            print(flush=True)
    doc["seconds"] = round(time.perf_counter() - started, 1)
    doc["environment"]["loadavg_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump(doc, fh, indent=2, default=common.json_float)
        fh.write("\n")
    print(f"wrote {os.path.relpath(args.output, ROOT)} in {doc['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
