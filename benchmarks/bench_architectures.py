"""Architecture coverage: compile torchvision models with qcompile and validate each file in onnxruntime.

For each architecture (fresh seeded weights, BatchNorm statistics from a few training-mode batches, nothing
downloaded; the video model r3d_18 takes clips of 4 frames) and each configuration (uniform W8A8, APoT W4A4):
compile from the nn.Module with 8 calibration images, run the default validation (onnxruntime against the PyTorch simulation, codes of every activation quantizer), and
record pass/fail, compile seconds, output SQNR of the file against the simulation and against the float model, and
the activation codes that differ side by side and on identical inputs (teacher-forced).

Random-weight networks make the simulation-vs-file comparison harsh: a code that flips near a threshold (float
accumulation order in a float layer such as LayerNorm or Softmax) propagates through every later layer; the local
("on identical inputs") count is the one the validation bounds. Linear layers that torchvision initialises to zero
(ViT's head) get seeded N(0, 0.02²) weights, else the output is all zeros and its SQNR and top-1 say nothing.

``--untrained``: the models exactly as torchvision builds them with ``weights=None`` (initial BatchNorm statistics,
zero heads), what a user without downloads compiles first; their activations can vanish (MobileNetV3-Large,
EfficientNet-B0 and GoogLeNet reach ±1e-10 and below), which qcompile 0.9.0 refused
(``--untrained --size 128 --archs ... --output benchmarks/results/architectures_untrained.json``).

Run: ``python benchmarks/bench_architectures.py [--archs a,b,...] [--size 64]`` from the repository root. Needs
torchvision; re-executes itself with ``$QCOMPILE_VISION_PYTHON`` (default ``/tmp/venv-vision/bin/python``) when
torchvision is not importable here. Writes ``benchmarks/results/architectures.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import qcompile  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "architectures.json")
VISION_PYTHON = os.environ.get("QCOMPILE_VISION_PYTHON", "/tmp/venv-vision/bin/python")
ARCHS = ("squeezenet1_0", "shufflenet_v2_x0_5", "mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5",
         "regnet_x_400mf", "regnet_y_400mf", "googlenet", "densenet121", "resnext50_32x4d", "convnext_tiny",
         "swin_t", "vit_b_16", "r3d_18")
VIDEO = ("r3d_18", "mc3_18", "r2plus1d_18")  # torchvision.models.video: clips of FRAMES frames (Conv3d)
FRAMES = 4
CONFIGS = {"uniform W8A8": {"scheme": "uniform", "bits": 8}, "apot W4A4": {"scheme": "apot", "bits": 4}}
CALIB = 8
SEED = 0


def build(arch: str, size: int, untrained: bool = False) -> tuple[torch.nn.Module, torch.Tensor]:
    import torchvision

    torch.manual_seed(SEED)
    kwargs = {"image_size": size} if arch.startswith("vit") else {}
    if arch in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True  # today's default, said explicitly (else torchvision warns)
    family = torchvision.models.video if arch in VIDEO else torchvision.models
    model = getattr(family, arch)(weights=None, **kwargs)
    shape = (3, FRAMES, size, size) if arch in VIDEO else (3, size, size)
    gen = torch.Generator().manual_seed(SEED + 1)
    if untrained:  # as torchvision builds it
        return model.eval(), torch.randn(CALIB, *shape, generator=torch.Generator().manual_seed(SEED + 2))
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and not mod.weight.any():  # zero-initialised head
                mod.weight.normal_(0.0, 0.02, generator=gen)
    model.train()
    with torch.no_grad():  # BatchNorm running statistics of real activations, not the (0, 1) defaults
        for _ in range(3):
            model(torch.randn(4, *shape, generator=gen))
    model.eval()
    return model, torch.randn(CALIB, *shape, generator=torch.Generator().manual_seed(SEED + 2))


def run_one(arch: str, config: dict, size: int, untrained: bool = False) -> dict:
    model, calib = build(arch, size, untrained)
    t0 = time.perf_counter()
    try:
        result = qcompile.compile(model, calib[:1], calib=calib, **config)
    except Exception as exc:  # reported, not raised: the table shows which architectures fail and why
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                "traceback_tail": traceback.format_exc()[-800:]}
    rep = result.report
    return {"ok": True, "passed": rep.passed, "failures": rep.failures,
            "compile_and_validate_s": round(time.perf_counter() - t0, 1),
            "sim_vs_onnx_sqnr_db": common.json_float(rep.sqnr_db), "max_abs": rep.max_abs,
            "onnx_vs_float_sqnr_db": common.json_float(rep.extra.get("sqnr_vs_float_db")),
            "codes_total": rep.extra.get("codes_total"), "codes_differ": rep.extra.get("codes_differ"),
            "codes_differ_local": rep.extra.get("codes_differ_local"),
            "saturating_pairs": rep.extra.get("saturating_pairs")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--untrained", action="store_true",
                        help="the models as torchvision builds them (initial BatchNorm statistics, zero heads)")
    parser.add_argument("--no-reexec", action="store_true")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    code = common.torchvision_or_reexec(__file__, argv, args.no_reexec, VISION_PYTHON)
    if code is not None:
        return code
    import torchvision
    started = time.perf_counter()
    rows = []
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        for name, config in CONFIGS.items():
            row = {"arch": arch, "config": name, **run_one(arch, config, args.size, args.untrained)}
            rows.append(row)
            status = ("PASS" if row.get("passed") else "FAIL") if row["ok"] else "ERROR " + row["error"]
            sqnr = row.get("sim_vs_onnx_sqnr_db")
            sqnr = sqnr if isinstance(sqnr, str) else f"{sqnr:.1f}"
            print(f"{arch:20s} {name:13s} {status} " + (
                f"{row['compile_and_validate_s']:6.1f} s  sim-vs-file {sqnr} dB  "
                f"codes differ {row['codes_differ']} ({row['codes_differ_local']} on identical inputs) of "
                f"{row['codes_total']}" if row["ok"] else ""), flush=True)
    env = {**common.environment(), "torchvision": torchvision.__version__}
    doc = {"benchmark": "architectures", "environment": env,
           "size": args.size, "untrained": args.untrained, "calibration_images": CALIB, "rows": rows,
           "passed": sum(1 for r in rows if r.get("passed")), "total": len(rows),
           "seconds": round(time.perf_counter() - started, 1)}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as fh:
        json.dump(doc, fh, indent=2, default=common.json_float)
        fh.write("\n")
    print(f"{doc['passed']} of {doc['total']} passed; wrote {os.path.relpath(args.output, ROOT)} "
          f"in {doc['seconds']:.0f} s")
    return 0 if doc["passed"] == doc["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
