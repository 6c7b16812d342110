"""Benchmark: does EqualizeWeights help per-tensor weight quantization where the lecture says it should?

Model: ``tests.models.DepthwiseSeparableNet`` (seeded; stem → dw → pw → dw → pw → fc with ReLU), whose
per-output-channel weight ranges differ by more than 100× in every conv (300× per pair, more in the depthwise
layers), the lecture's failure case for per-tensor weight quantization.

Measure: weights quantized per tensor, symmetric uniform round-to-nearest at 4 and 8 bits
(``scale = max|W| / (2**(b-1) - 1)``); biases and activations stay float. For each layer, SQNR of its output
``10 log10(sum y^2 / sum (y_q - y)^2)`` where ``y_q`` is the layer with quantized weights applied to the layer's float
input; and the SQNR of the network output (logits) with all weights quantized. Before vs after EqualizeWeights
(after FoldBatchNorm, which is a no-op here), with per-channel quantization of the unequalized model as a
reference. A control, the bundled trained digits CNN (BatchNorm folded first; channel ranges differ only 2-4×),
shows what equalization does where the lecture's failure case is absent. Writes
``benchmarks/results/equalize.json`` and prints a table per model.

Run: ``python benchmarks/bench_equalize.py`` from the repository root.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from qcompile.frontend import trace  # noqa: E402
from qcompile.passes.base import Pipeline  # noqa: E402
from qcompile.passes.equalize import EqualizeWeights  # noqa: E402
from qcompile.passes.fold_bn import FoldBatchNorm  # noqa: E402
from tests.models import DepthwiseSeparableNet, channel_range_spread, example_input  # noqa: E402

SEED = 0
SPREAD = 300.0
BITS = (4, 8)
BATCH = 32
RESULTS = os.path.join(ROOT, "benchmarks", "results", "equalize.json")


def quantize_weight(w: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """Symmetric uniform round-to-nearest, per tensor (or per output channel), returned dequantized."""
    qmax = 2 ** (bits - 1) - 1
    if per_channel:
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).reshape((-1,) + (1,) * (w.dim() - 1))
    else:
        amax = w.abs().max()
    scale = torch.clamp(amax, min=1e-12) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    noise = float(((test - ref) ** 2).sum())
    signal = float((ref ** 2).sum())
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


def layer_modules(gm: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def run_layer(mod: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Linear):
        return F.linear(x, weight, mod.bias)
    return F.conv2d(x, weight, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)


def measure(gm: nn.Module, x: torch.Tensor, bits: int, per_channel: bool = False) -> dict:
    """Per-layer output SQNR (float input, quantized weights) and network-output SQNR (all weights quantized)."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=n: inputs.__setitem__(name, args[0].detach()))
             for n, m in layer_modules(gm)]
    with torch.no_grad():
        ref = gm(x)
    for h in hooks:
        h.remove()
    layers = {}
    with torch.no_grad():
        for name, mod in layer_modules(gm):
            y = run_layer(mod, inputs[name], mod.weight)
            yq = run_layer(mod, inputs[name], quantize_weight(mod.weight, bits, per_channel))
            layers[name] = sqnr_db(y, yq)
        qgm = copy.deepcopy(gm)
        for _, mod in layer_modules(qgm):
            mod.weight.copy_(quantize_weight(mod.weight, bits, per_channel))
        out = sqnr_db(ref, qgm(x))
    return {"layers": layers, "output": out}


def bench(label: str, model: nn.Module, x: torch.Tensor) -> dict:
    before = trace(copy.deepcopy(model), x)
    after = trace(copy.deepcopy(model), x)
    fold = FoldBatchNorm()
    before = Pipeline([FoldBatchNorm()], check=True)(before).gm  # both sides folded: compare equalization only
    eq = EqualizeWeights()
    t0 = time.perf_counter()
    after = Pipeline([fold, eq], check=True)(after).gm
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        rel = float((after(x) - before(x)).abs().max() / before(x).abs().max())
    spread = {n: {"before": channel_range_spread(m.weight), "after": channel_range_spread(after.get_submodule(n).weight)}
              for n, m in layer_modules(before)}
    results = {
        "model": label,
        "input": f"{tuple(x.shape)}",
        "quantizer": "weights only, symmetric uniform round-to-nearest, per tensor; biases/activations float",
        "equalize_seconds": seconds,
        "max_relative_output_change": rel,
        "equalize_report": eq.report,
        "channel_range_spread": spread,
        "bits": {},
    }
    for bits in BITS:
        results["bits"][str(bits)] = {
            "before": measure(before, x, bits),
            "after": measure(after, x, bits),
            "per_channel_reference": measure(before, x, bits, per_channel=True),
        }
    return results


def main() -> dict:
    torch.manual_seed(SEED)  # nothing below draws from the global RNG; set for safety
    model = DepthwiseSeparableNet(seed=SEED, spread=SPREAD)
    x = example_input(model, seed=SEED + 100, batch=BATCH)
    runs = {"depthwise_separable": bench(
        f"tests.models.DepthwiseSeparableNet(seed={SEED}, spread={SPREAD:g}), seeded N(0,1) input", model, x)}
    try:  # control: a trained model whose channel ranges differ only 2-4x (needs scikit-learn for the images)
        from qcompile.models import digits

        runs["digits_cnn"] = bench("qcompile.models.digits.pretrained() (trained, bundled), 64 training digits",
                                   digits.pretrained(), digits.calibration_inputs(64))
    except ImportError as exc:
        print(f"skipping the digits control: {exc}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump({"models": runs, "torch": torch.__version__, "python": platform.python_version()}, fh, indent=2)
    for results in runs.values():
        print_table(results)
        print()
    return runs


def print_table(results: dict) -> None:
    print(results["model"])
    print(results["quantizer"])
    print(f"EqualizeWeights: {results['equalize_seconds'] * 1e3:.1f} ms, max relative output change "
          f"{results['max_relative_output_change']:.1e}")
    names = list(results["channel_range_spread"])
    head = f"{'layer':<8}{'out-ch range spread':>21}{'after':>8}"
    for bits in results["bits"]:
        head += f"{'W' + bits + ' before':>12}{'after':>8}{'per-ch':>8}"
    print(head)
    for name in names + ["output"]:
        if name == "output":
            row = f"{'output':<8}{'':>21}{'':>8}"
        else:
            s = results["channel_range_spread"][name]
            row = f"{name:<8}{s['before']:>20.1f}×{s['after']:>7.1f}×"
        for bits, r in results["bits"].items():
            pick = (lambda d: d["output"]) if name == "output" else (lambda d, n=name: d["layers"][n])
            row += f"{pick(r['before']):>10.1f}dB{pick(r['after']):>6.1f}dB{pick(r['per_channel_reference']):>6.1f}dB"
        print(row)


if __name__ == "__main__":
    main()
