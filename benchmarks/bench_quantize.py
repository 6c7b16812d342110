"""Time qcompile.quant on a 25M-element float32 tensor: quantize and fake_quantize (forward, and forward +
backward with the RCF gradient) to APoT, PoT and uniform levels, per tensor and per channel.

    python benchmarks/bench_quantize.py [--numel 25000000] [--repeat 7] [--threads 2]

Prints the figures as JSON and writes them to benchmarks/results/quantize.json. Each figure is the median (and
minimum) wall time over ``--repeat`` runs after one warm-up run. The load average is recorded because the
figures are only comparable on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from qcompile.quant import fake_quantize, level_set, quantize

CASES = [  # (name, scheme, bits, signed, per_channel)
    ("apot4_signed", "apot", 4, True, False),
    ("apot4_signed_per_channel", "apot", 4, True, True),
    ("apot4_unsigned", "apot", 4, False, False),
    ("apot8_unsigned", "apot", 8, False, False),
    ("pot4_signed", "pot", 4, True, False),
    ("uniform8_signed", "uniform", 8, True, False),
    ("uniform4_unsigned", "uniform", 4, False, False),
]


def _time(fn, repeat: int) -> dict:
    fn()  # warm-up: caches, thread pools, first-touch allocation
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(runs), 4), "min_s": round(min(runs), 4)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=25_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "quantize.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.numel, generator=gen)
    channels = 1000
    rows = x[: args.numel // channels * channels].reshape(channels, -1)
    alpha_rows = rows.abs().amax(dim=1) * 0.8
    load_before = os.getloadavg()
    results = {}
    for name, scheme, bits, signed, per_channel in CASES:
        ls = level_set(scheme, bits, signed)
        data = rows if per_channel else (x if signed else x.abs())
        alpha = alpha_rows if per_channel else torch.tensor(3.0)
        axis = 0 if per_channel else None
        entry = {
            "quantize": _time(lambda: quantize(data, alpha, ls, axis=axis), args.repeat),
            "fake_quantize": _time(lambda: fake_quantize(data, alpha, ls, axis=axis), args.repeat),
        }
        if not per_channel:
            xg = data.clone().requires_grad_(True)
            ag = alpha.clone().requires_grad_(True)

            def forward_backward():
                fake_quantize(xg, ag, ls, axis=axis, grad="rcf").sum().backward()

            entry["fake_quantize_fwd_bwd_rcf"] = _time(forward_backward, args.repeat)
        entry["levels"] = ls.num_levels
        results[name] = entry
    report = {
        "numel": args.numel,
        "threads": args.threads,
        "repeat": args.repeat,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
