"""Quantization-aware training of the bundled digits CNN: APoT, PoT and uniform levels at W4A4, W3A3 and W2A2,
the APoT paper's Table 3 ablation (weight normalisation, RCF), and SDQ / PACT rows; every trained model is
exported to ONNX and evaluated in onnxruntime.

    python examples/qat_digits.py [--epochs 8] [--seeds 3] [--out benchmarks/results/qat_digits.json]

Real data (scikit-learn's load_digits, 500 held-out test images), CPU, seeded; a few minutes on 2 cores. QAT
starts from the bundled float weights (``qcompile.models.digits.pretrained()``); "PTQ" is the calibrated
starting point before training (MSE clipping values, no weight normalisation). First and last layers stay at
8 bits (the APoT authors' setting). Each configuration is trained with ``--seeds`` data orders; the table gives
the mean test accuracy (one test image is 0.2 points) and each run's onnxruntime accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

# idle OpenMP threads sleep instead of spinning: on a machine whose cores other processes hold, two spinning
# threads made an epoch 2-4x slower (the same numbers either way; read when torch is imported, so set before it)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qcompile import qat  # noqa: E402
from qcompile.models.digits import accuracy, load_split, pretrained  # noqa: E402
from qcompile.runtime.session import run, session  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "qat_digits.json")
LR, LR_ALPHA, BATCH = 1e-3, 1e-2, 64


def configs() -> list[dict]:
    rows = []
    for bits in (4, 3, 2):
        for scheme in ("apot", "pot", "uniform"):
            rows.append(dict(group="main", scheme=scheme, bits=bits, method="apot", weight_norm=True, rcf=True))
    for bits in (4, 3):  # Table 3 of the APoT paper: WN and RCF switched off
        for wn, rcf in ((True, False), (False, True), (False, False)):
            rows.append(dict(group="ablation", scheme="apot", bits=bits, method="apot", weight_norm=wn, rcf=rcf))
    rows.append(dict(group="baseline", scheme="uniform", bits=4, method="pact"))
    rows.append(dict(group="baseline", scheme="uniform", bits=3, method="pact"))
    rows.append(dict(group="sdq", scheme="log2", bits=3, method="sdq"))
    return rows


def label(cfg: dict) -> str:
    if cfg["method"] == "apot":
        flags = ("WN" if cfg["weight_norm"] else "no WN") + (" + RCF" if cfg["rcf"] else ", PACT grad")
        return f"{cfg['scheme']} W{cfg['bits']}A{cfg['bits']} ({flags})"
    if cfg["method"] == "sdq":
        return f"SDQ log2 W{cfg['bits']} / uniform A{cfg['bits']} (from W4, eq. 11, two-phase)"
    return f"{cfg['method'].upper()} {cfg['scheme']} W{cfg['bits']}A{cfg['bits']}"


def train(gm, data, epochs: int, seed: int, lr_alpha: float = LR_ALPHA, wd_alpha: float = 0.0) -> None:
    """AdamW with a cosine schedule; the clipping values get their own group. One-pixel random shifts."""
    x_tr, y_tr = data
    opt = torch.optim.AdamW(qat.param_groups(gm, lr_alpha=lr_alpha, wd_alpha=wd_alpha, weight_decay=0.0), lr=LR)
    steps = epochs * ((len(x_tr) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    gm.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), BATCH):
            idx = perm[i:i + BATCH]
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(x_tr[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(gm(xb), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    gm.eval()


def evaluate(gm, x) -> torch.Tensor:
    gm.eval()
    with torch.no_grad():
        return gm(x)


def train_one(cfg: dict, model, data, epochs: int, seed: int):
    """One QAT run of ``cfg`` with training seed ``seed``; returns the trained model."""
    x_tr, y_tr, x_te, _ = data
    torch.manual_seed(seed)
    calib = x_tr[:256]
    if cfg["method"] == "sdq":
        # SDQ sec. 4: train at 4 bits, re-scale alpha to 3 bits (eq. 11), train, freeze alpha and sigma, train again
        gm = qat.prepare(model, x_te[:1], scheme="log2", bits=4, method="sdq", calib=calib)
        train(gm, (x_tr, y_tr), max(1, epochs // 2), seed=seed, wd_alpha=1e-4)
        qat.change_bits(gm, wbits=cfg["bits"], abits=cfg["bits"])
        train(gm, (x_tr, y_tr), epochs, seed=seed + 100, wd_alpha=1e-4)
        qat.freeze_quantizers(gm)
        train(gm, (x_tr, y_tr), max(1, epochs // 2), seed=seed + 200)
        return gm
    options = dict(weight_norm=cfg.get("weight_norm"), rcf=cfg.get("rcf")) if cfg["method"] == "apot" else {}
    gm = qat.prepare(model, x_te[:1], scheme=cfg["scheme"], bits=cfg["bits"], method=cfg["method"], calib=calib,
                     **options)
    train(gm, (x_tr, y_tr), epochs, seed=seed, wd_alpha=1e-4 if cfg["method"] == "pact" else 0.0)
    return gm


def run_config(cfg: dict, model, data, epochs: int, seeds: int) -> dict:
    """``seeds`` QAT runs of ``cfg``, each exported and evaluated in onnxruntime on the 500 test images."""
    x_tr, _, x_te, y_te = data
    t0 = time.perf_counter()
    ptq = None
    if cfg["group"] == "main":  # the calibrated starting point, before training and weight normalisation
        start = qat.prepare(model, x_te[:1], scheme=cfg["scheme"], bits=cfg["bits"], method="ste", calib=x_tr[:256])
        ptq = accuracy(evaluate(start, x_te), y_te)
    runs = []
    for seed in range(seeds):
        gm = train_one(cfg, model, data, epochs, seed)
        sim = evaluate(gm, x_te)
        result = qat.export(gm, x_te[:1], validation_inputs=x_te)
        got = run(session(result.onnx_model.SerializeToString()), [x_te.numpy()])[0]
        runs.append({"seed": seed, "qat_top1": accuracy(sim, y_te), "onnx_top1": accuracy(got, y_te),
                     "onnx_vs_sim_top1_agreement": float(np.mean(got.argmax(1) == sim.numpy().argmax(1))),
                     "onnx_vs_sim_max_abs": float(np.max(np.abs(got - sim.numpy()))),
                     "validation_passed": bool(result.report.passed), "validation": result.report.summary()})
    mean = lambda key: float(np.mean([r[key] for r in runs]))  # noqa: E731
    return {**cfg, "label": label(cfg), "ptq_top1": ptq, "qat_top1": mean("qat_top1"),
            "onnx_top1": mean("onnx_top1"), "onnx_top1_runs": [r["onnx_top1"] for r in runs],
            "onnx_vs_sim_top1_agreement": min(r["onnx_vs_sim_top1_agreement"] for r in runs),
            "validation_passed": all(r["validation_passed"] for r in runs), "runs": runs,
            "seconds_total": round(time.perf_counter() - t0, 1)}


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def table(float_top1: float, rows: list[dict]) -> str:
    lines = [f"float: {100 * float_top1:.1f}% top-1 on the 500 test images", "",
             "| configuration | PTQ | QAT (simulation) | QAT in onnxruntime | runs (onnxruntime) | ONNX = sim | time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        runs = " / ".join(pct(v) for v in r["onnx_top1_runs"])
        lines.append(f"| {r['label']} | {pct(r['ptq_top1'])} | {pct(r['qat_top1'])} | **{pct(r['onnx_top1'])}** | "
                     f"{runs} | {100 * r['onnx_vs_sim_top1_agreement']:.1f}%"
                     f"{'' if r['validation_passed'] else ' (FAIL)'} | "
                     f"{r['seconds_total']:.0f} s |")
    lines.append("")
    lines.append("APoT − uniform (QAT in onnxruntime, mean of the runs): " + ", ".join(
        f"W{b}A{b} {100 * (_onnx(rows, 'apot', b) - _onnx(rows, 'uniform', b)):+.1f}" for b in (4, 3, 2)))
    return "\n".join(lines)


def _onnx(rows, scheme, bits) -> float:
    return next(r["onnx_top1"] for r in rows if r["group"] == "main" and r["scheme"] == scheme and r["bits"] == bits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per configuration (the mean is reported)")
    ap.add_argument("--out", default=None, help=f"results JSON (default {os.path.relpath(OUT)}; with --only, none "
                    "unless given: a partial run does not replace the full results)")
    ap.add_argument("--only", default=None, help="run the configurations whose label contains this text")
    args = ap.parse_args()

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_split()
    model = pretrained()
    float_top1 = accuracy(evaluate(model, x_te), y_te)
    rows = []
    for cfg in configs():
        if args.only and args.only not in label(cfg):
            continue
        r = run_config(cfg, model, (x_tr, y_tr, x_te, y_te), args.epochs, args.seeds)
        print(f"{r['label']:<58} PTQ {pct(r['ptq_top1']):>5}  QAT {pct(r['qat_top1']):>5}  "
              f"ONNX {pct(r['onnx_top1']):>5}  agree {100 * r['onnx_vs_sim_top1_agreement']:.1f}%  "
              f"{r['seconds_total']:.0f} s", flush=True)
        rows.append(r)
    total = time.perf_counter() - t0
    if args.only is None:
        print()
        print(table(float_top1, rows))
    print(f"\ntotal {total:.0f} s")
    out = args.out if args.out is not None else (OUT if args.only is None else None)
    if out is None:
        print("partial run (--only): no results file written; give --out FILE to write one")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump({"command": "python examples/qat_digits.py", "epochs": args.epochs, "seeds": args.seeds,
                       "only": args.only,
                       "float_top1": float_top1,
                       "test_images": len(y_te), "threads": torch.get_num_threads(), "seconds_total": round(total, 1),
                       "platform": platform.platform(), "torch": torch.__version__, "rows": rows}, fh, indent=1)
        print(f"wrote {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
