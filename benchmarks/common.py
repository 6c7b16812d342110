"""Helpers shared by the benchmarks: SQNR, ideal file size, onnxruntime sessions and interleaved latency.

Latency is measured the one way that gives stable ratios on a small, shared machine: every session lives in the
same process (2 intra-op threads, pool spinning off), the models run round-robin (for each repetition, each model
once) after a warm-up, and each model's median is divided by the float model's median from the same loop, so load
from other processes hits all models alike.
"""
from __future__ import annotations

import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn as nn

from qcompile.qmodules import FakeQuantize
from qcompile.runtime.session import session as qc_session, u8s8_saturates

THREADS = 2


def sqnr_db(reference, test) -> float:
    """10·log10(Σ ref² / Σ (test − ref)²), ``inf`` when identical."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((np.asarray(test, dtype=np.float64) - ref) ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(float(np.sum(ref ** 2)) / noise)


def json_float(value):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    return value


def top1(logits) -> np.ndarray:
    return np.asarray(logits).argmax(axis=1)


# -- size --------------------------------------------------------------------------------------------------------
def ideal_size(gm: nn.Module) -> dict:
    """Packed ideal size of a compiled GraphModule: Σ(quantized weights × bits)/8 + Σ(float params × 4) + 4 bytes
    per scale (one per weight channel, one per activation quantizer channel).

    A parameter counts as quantized when its module owns a weight ``FakeQuantize`` (``<module>.weight_fq``)."""
    quant_bits = 0
    float_params = 0
    scales = 0
    quant_params = 0
    for mod_name, mod in gm.named_modules():
        fq = getattr(mod, "weight_fq", None)
        for p_name, p in mod.named_parameters(recurse=False):
            if p_name == "weight" and isinstance(fq, FakeQuantize):
                quant_bits += p.numel() * fq.bits
                quant_params += p.numel()
            else:
                float_params += p.numel()
        if isinstance(mod, FakeQuantize):
            scales += mod.alpha.numel()
    total = quant_bits / 8 + 4 * float_params + 4 * scales
    return {"bytes": int(math.ceil(total)), "quantized_params": int(quant_params), "float_params": int(float_params),
            "scales": int(scales)}


def float_size(model: nn.Module) -> int:
    return 4 * sum(p.numel() for p in model.parameters())


# -- onnxruntime -------------------------------------------------------------------------------------------------
def session(path: str, threads: int = THREADS, optimized_model_path: str | None = None, **kwargs):
    """qcompile's CPU session: ``threads`` intra-op threads, ``session.intra_op.allow_spinning = 0``."""
    return qc_session(path, threads=threads, spinning=False, optimized_model_path=optimized_model_path, **kwargs)


def run_batched(sess, x: np.ndarray, batch: int = 32) -> np.ndarray:
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: np.ascontiguousarray(x[i:i + batch])})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def optimized_op_counts(path: str) -> dict:
    """Op types of the graph onnxruntime actually runs (after its graph optimizations), the ones that matter."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = os.path.join(tmp, "opt.onnx")
        session(path, optimized_model_path=opt)
        counts = Counter(n.op_type for n in onnx.load(opt, load_external_data=False).graph.node)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def interleaved_latency(paths: Mapping[str, str], inputs: Mapping[int, np.ndarray], reps: Mapping[int, int],
                        reference: str, warmup: int = 5) -> dict:
    """Median latency (ms) per model and batch size, all sessions in this process, run round-robin, each round in
    a fresh seeded order. A fixed order gives each session the same predecessor every time: on the 40 µs digits
    model our W8A8 and W4/A8 files, which run the same kernels, measured 0.97 and 0.91 of float in fixed order
    (the second always ran right after the first) and 0.94-0.95 and 0.94 shuffled, three runs each.

    Returns ``{batch: {name: {"median_ms", "p10_ms", "p90_ms", "ratio_to_<reference>"}}}``."""
    sessions = {name: session(path) for name, path in paths.items()}
    feeds = {name: sess.get_inputs()[0].name for name, sess in sessions.items()}
    result = {}
    for batch, x in inputs.items():
        x = np.ascontiguousarray(x)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(warmup):
            for name, sess in sessions.items():
                sess.run(None, {feeds[name]: x})
        order = list(sessions)
        rng = random.Random(batch)
        for _ in range(reps[batch]):
            rng.shuffle(order)
            for name in order:
                sess = sessions[name]
                t0 = time.perf_counter()
                sess.run(None, {feeds[name]: x})
                times[name].append(1000.0 * (time.perf_counter() - t0))
        ref = statistics.median(times[reference])
        result[batch] = {
            name: {"median_ms": round(statistics.median(ts), 3),
                   "p10_ms": round(float(np.percentile(ts, 10)), 3),
                   "p90_ms": round(float(np.percentile(ts, 90)), 3),
                   "runs": len(ts),
                   f"ratio_to_{reference}": round(statistics.median(ts) / ref, 3)}
            for name, ts in times.items()}
    return result


def environment() -> dict:
    import onnxruntime

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    try:  # the tree changes under several engineers: record which commit (and whether it was dirty)
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        revision = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                                  text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        revision = None
    return {"git": revision, "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "loadavg_at_start": load, "threads": THREADS, "cpu": _cpu_model(),
            "u8s8_saturates": u8s8_saturates()}  # onnxruntime's uint8 x int8 kernels here (see --int8-weights)


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
    except OSError:
        return platform.processor() or None
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    return f"{name} ({', '.join(isa) or 'no avx2'})"


def torchvision_or_reexec(script: str, argv, no_reexec: bool, vision_python: str) -> int | None:
    """``None`` where torchvision imports here; else the exit code of ``script`` run again under ``vision_python``
    with ``--no-reexec`` (so at most once), or 2 with a message where that interpreter does not exist."""
    try:
        import torchvision  # noqa: F401
        return None
    except ImportError:
        pass
    if not no_reexec and os.path.exists(vision_python):
        print(f"torchvision is not importable here; re-running under {vision_python}", flush=True)
        return subprocess.call([vision_python, os.path.abspath(script), "--no-reexec"] +
                               list(argv if argv is not None else sys.argv[1:]))
    print(f"torchvision is needed (install it, or create {vision_python})", file=sys.stderr)
    return 2


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def finish(results: dict, path: str, headers: Sequence[str], rows: Sequence[Sequence], t_start: float) -> None:
    """The end of a benchmark: ``results["seconds"]`` since ``t_start``, the markdown table and the summary printed,
    the JSON written to ``path``."""
    import json

    results["seconds"] = round(time.perf_counter() - t_start, 1)
    print()
    print(markdown_table(headers, rows))
    print(json.dumps(results.get("summary")))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")
