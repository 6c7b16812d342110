"""Which level set fits a model's weights: per Conv/Linear layer, the weight SQNR of APoT, PoT and uniform levels at
one bit-width, each with its own MSE-optimal per-channel clipping (what ``qcompile`` calibrates), and the weights'
kurtosis.

APoT puts more levels near zero than uniform (4 bits: {0, ±1, ±2, ±3, ±4, ±6, ±8, ±10} x alpha/10 against
15 equal steps), which suits bell-shaped weights (kurtosis ~3 and above: Gaussian, Laplace), the APoT paper's
premise. Weights that stay close to a uniform initialisation (kurtosis ~1.8, e.g. a small transformer trained
briefly) are quantized better by uniform levels; ``--wscheme uniform --ascheme apot`` keeps APoT activations.

    python examples/weight_levels.py model.pt --arch package.module:factory [--bits 4]
    python examples/weight_levels.py qcompile.models.digits:pretrained

Per-output-channel clipping is invariant to per-channel scaling, so BatchNorm folding does not change the
figures of a Conv's own weights; cross-layer equalization (which rescales input channels) can.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qcompile import load_model, quant  # noqa: E402
from qcompile.errors import UserError  # noqa: E402
from qcompile.passes.calibrate import weight_mse_alpha  # noqa: E402

SCHEMES = ("apot", "pot", "uniform")
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def weight_sqnr_db(w: torch.Tensor, scheme: str, bits: int) -> float:
    """SQNR of ``w`` quantized per output channel (axis 0) to ``scheme`` at ``bits`` with MSE-optimal clipping."""
    levels = quant.level_set(scheme, bits, signed=True)
    w = w.detach().float()
    alpha = weight_mse_alpha(w, levels, 0)
    q = quant.dequantize(quant.quantize(w, alpha, levels, axis=0), alpha, levels, axis=0)
    noise = float(((w - q) ** 2).sum())
    return math.inf if noise == 0 else 10.0 * math.log10(float((w ** 2).sum()) / noise)


def kurtosis(w: torch.Tensor) -> float:
    """Mean over output channels of E[z^4] with z the channel's standardised weights (Gaussian 3, uniform 1.8)."""
    rows = w.detach().double().reshape(w.shape[0], -1)
    z = (rows - rows.mean(1, keepdim=True)) / rows.std(1, keepdim=True).clamp_min(1e-30)
    return float((z ** 4).mean(1).mean())


def weights(model: nn.Module):
    """``(name, kind, weight)`` of every Conv/Linear, and the input projection of ``nn.MultiheadAttention`` (a
    parameter, not a Linear module; qcompile quantizes it as one)."""
    for name, mod in model.named_modules():
        if isinstance(mod, LAYERS):
            yield name, type(mod).__name__, mod.weight
        elif isinstance(mod, nn.MultiheadAttention) and mod.in_proj_weight is not None:
            yield f"{name}.in_proj", "MultiheadAttention", mod.in_proj_weight


def schemes_at(bits: int) -> tuple[str, ...]:
    """The level sets that exist at ``bits`` (signed PoT is refused past 6 bits: its grid would pass 32 bits)."""
    out = []
    for s in SCHEMES:
        try:
            quant.level_set(s, bits, signed=True)
        except ValueError:
            continue
        out.append(s)
    return tuple(out)


def table(model: nn.Module, bits: int) -> list[tuple]:
    rows = []
    schemes = schemes_at(bits)
    for name, kind, w in weights(model):
        if w.shape[0] > 1 and w[0].numel() > 1:  # a per-channel kurtosis needs more than one weight per channel
            rows.append((name, kind, kurtosis(w), {s: weight_sqnr_db(w, s, bits) for s in schemes}))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a .pt file or a package.module:factory spec (as for qcompile)")
    ap.add_argument("--arch", help="factory spec when the file holds a state_dict")
    ap.add_argument("--bits", type=int, default=4, choices=range(2, 9), metavar="2..8")
    ap.add_argument("--trust-pickle", action="store_true", help="load a full pickled model (runs its code)")
    args = ap.parse_args(argv)
    try:
        model = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle)
    except UserError as e:
        print(f"weight_levels: error: {e}", file=sys.stderr)
        return 2
    rows = table(model, args.bits)
    schemes = schemes_at(args.bits)
    print(f"| layer | type | kurtosis | {' | '.join(f'{s} W{args.bits} SQNR' for s in schemes)} | best |")
    print("|---|---|---|" + "---|" * len(schemes) + "---|")
    wins = {s: 0 for s in schemes}
    for name, kind, k, sq in rows:
        best = max(sq, key=sq.get)
        wins[best] += 1
        print(f"| {name} | {kind} | {k:.2f} | " + " | ".join(f"{sq[s]:.2f} dB" for s in schemes) + f" | {best} |")
    print(f"\n{len(rows)} layers; least weight error: " + ", ".join(f"{s} {n}" for s, n in wins.items()))
    left_out = [s for s in SCHEMES if s not in schemes]
    if left_out:
        print(f"({', '.join(left_out)} has no signed {args.bits}-bit level set: its integer grid would pass 32 bits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
