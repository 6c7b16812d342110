"""Generate docs/levels.md: the 4-bit level sets of APoT, PoT and uniform quantization (as in the APoT paper's
figure), the integer grids and storage types of every scheme, and the Laplace-vs-MSE clipping comparison.

    python examples/plot_levels.py            # rewrites docs/levels.md and prints it (--out FILE: elsewhere)

Everything shown is computed by qcompile.quant; text only (no plotting dependency).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qcompile.quant import (apot_terms, asymmetric_offsets, banner_laplace_ratio, fake_quantize,  # noqa: E402
                            integer_table, level_set, make_observer)

WIDTH = 97  # characters of the number line


def number_line(values: np.ndarray, lo: float, hi: float, width: int = WIDTH) -> str:
    """One character per column: '|' for a level, a digit when several levels share a column."""
    counts = np.zeros(width, dtype=int)
    for v in values:
        counts[int(round((v - lo) / (hi - lo) * (width - 1)))] += 1
    return "".join("." if c == 0 else "|" if c == 1 else str(min(c, 9)) for c in counts)


def axis_labels(lo: float, hi: float, width: int = WIDTH) -> str:
    line = [" "] * width
    for v in np.linspace(lo, hi, 5):
        label = f"{v:g}"
        col = int(round((v - lo) / (hi - lo) * (width - 1)))
        start = min(max(col - len(label) // 2, 0), width - len(label))
        line[start:start + len(label)] = label
    return "".join(line)


def level_block(signed: bool) -> list:
    lo, hi = (-1.0, 1.0) if signed else (0.0, 1.0)
    out = ["```"]
    for scheme in ("uniform", "pot", "apot"):
        ls = level_set(scheme, 4, signed)
        out.append(f"{scheme:>8} {number_line(ls.values, lo, hi)}")
    out.append(f"{'':>8} {axis_labels(lo, hi)}")
    out.append("```")
    out.append("")
    out.append("| scheme | levels | integer grid (non-negative half) | unit |")
    out.append("|---|---|---|---|")
    for scheme in ("uniform", "pot", "apot"):
        ls = level_set(scheme, 4, signed)
        half = [g for g in ls.grid if g >= 0]
        out.append(f"| {scheme} | {ls.num_levels} | {', '.join(map(str, half))} | alpha/{ls.denom} |")
    return out


def apot_table() -> list:
    out = ["| B (magnitude bits) | terms (exponents e of 2^-e) | levels | denominator | authors' code |",
           "|---|---|---|---|---|"]
    authors = {1: "NaN ({0}/0); ImageNet code uses uniform ternary for 2-bit weights", 7: "NaN ({0}/0)",
               8: "NaN ({0}/0)"}
    for b in range(1, 9):
        terms = " + ".join("(" + ",".join(map(str, t)) + ")" for t in apot_terms(b))
        ls = level_set("apot", b, signed=False) if b >= 2 else level_set("apot", 2, signed=True)
        denom = ls.denom
        levels = 2 ** b
        out.append(f"| {b} | {terms} | {levels} | {denom} | {authors.get(b, 'same set')} |")
    return out


def storage_table() -> list:
    out = ["| scheme | bits | signed | levels | codes | unit | storage |", "|---|---|---|---|---|---|---|"]
    for scheme, bits, signed, n, cmin, cmax, denom, dtype in integer_table():
        kind = "signed" if signed else "unsigned"
        if n is None:
            if scheme in ("ternary", "binary"):
                out.append(f"| {scheme} | - | {kind} | refused (signed only) | | | |")
            else:
                out.append(f"| {scheme} | {bits} | {kind} | refused (grid > 32 bits) | | | |")
            continue
        out.append(f"| {scheme} | {bits} | {kind} | {n} | {cmin}..{cmax} | alpha/{denom} | {dtype} |")
    return out


def ternary_vs_twn() -> list:
    """Per-channel ternary and binary weights as the compile calibrates them (``weight_mse_alpha``, nearest level) against
    the lecture's closed forms (TWN: threshold 0.7 E|w|, scale the mean magnitude above it; BWN: scale E|w|), on
    64 x 576 weights of three shapes."""
    from qcompile.passes.calibrate import weight_mse_alpha
    from qcompile.quant.ops import binarize, dequantize, quantize, twn_ternarize

    gen = torch.Generator().manual_seed(0)
    u = torch.rand(64, 576, generator=gen) - 0.5
    weights = [("Gaussian", torch.randn(64, 576, generator=gen)),
               ("Laplace", -torch.sign(u) * torch.log1p(-2 * u.abs())),
               ("uniform", torch.rand(64, 576, generator=gen) * 2 - 1)]
    out = ["| weights (64 x 576, per channel) | ternary threshold / E\\|w\\| (TWN: 0.7) | codes unlike TWN's | "
           "relative squared error, qcompile / TWN | binary alpha / E\\|w\\| (BWN: 1) |",
           "|---|---|---|---|---|"]
    for name, w in weights:
        ternary, binary = level_set("ternary", 2, True), level_set("binary", 1, True)
        alpha = weight_mse_alpha(w, ternary, 0)
        codes = quantize(w, alpha, ternary, axis=0)
        twn_codes, r_t, _ = twn_ternarize(w, axis=0)
        mean_mag = w.abs().mean(dim=1)

        def rel(v):
            return float(((w - v) ** 2).sum() / (w ** 2).sum())

        ours = rel(dequantize(codes, alpha, ternary, axis=0))
        twn = rel(dequantize(twn_codes, r_t, ternary, axis=0))
        _, bwn = binarize(w, axis=0)
        b_alpha = weight_mse_alpha(w, binary, 0)
        out.append(f"| {name} | {float((alpha / 2 / mean_mag).mean()):.3f} | "
                   f"{100 * float((codes != twn_codes).float().mean()):.1f} % | {ours:.4f} / {twn:.4f} | "
                   f"{float((b_alpha / bwn).mean()):.4f} |")
    return out


def laplace_vs_mse(samples: int = 1_000_000) -> list:
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(samples, generator=gen) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, b = 1)
    out = ["| level set | Banner / lecture alpha/b | laplace observer alpha/b | mse observer alpha/b |",
           "|---|---|---|---|"]
    for scheme, bits in [("uniform", 2), ("uniform", 3), ("uniform", 4), ("uniform", 8), ("apot", 4)]:
        ls = level_set(scheme, bits, True)
        lap = make_observer("laplace").update(x).compute_alpha(ls).item()
        mse = make_observer("mse").update(x).compute_alpha(ls).item()
        out.append(f"| {scheme} {bits}-bit signed ({ls.num_levels} levels) | {banner_laplace_ratio(bits):.3f} | "
                   f"{lap:.3f} | {mse:.3f} |")
    return out


def asymmetric_block(samples: int = 200_000) -> list:
    """4-bit APoT: the symmetric signed set and a few asymmetric ones on one axis, then the MSE-calibrated error of
    each on SiLU outputs (SiLU(3 z), z ~ N(0, 1): minimum -0.28, a long positive tail)."""
    lo, hi = -1.0, 1.0
    out = ["```"]
    rows = [("signed", level_set("apot", 4, True))] + [(f"o = {o}", level_set("apot", 4, True, o)) for o in (1, 3, 6)]
    for name, ls in rows:
        out.append(f"{name:>8} {number_line(ls.values, lo, hi)}")
    out.append(f"{'':>8} {axis_labels(lo, hi)}")
    out.append("```")
    out.append("")
    z = torch.randn(samples, generator=torch.Generator().manual_seed(0))
    x = torch.nn.functional.silu(3.0 * z)
    out.append("| 4-bit level set | levels | grid | MSE-calibrated alpha | error (MSE) |")
    out.append("|---|---|---|---|---|")
    sets = [("apot signed (symmetric)", level_set("apot", 4, True), None),
            ("uniform_asym", level_set("uniform_asym", 4, False), "asym")]
    sets += [(f"apot, offset {o}", level_set("apot", 4, True, o), None) for o in asymmetric_offsets("apot", 4)[:6]]
    for name, ls, _ in sets:
        obs = make_observer("mse")
        obs.update(x)
        p = obs.compute_qparams(ls)
        err = float(((fake_quantize(x, p.alpha, ls, zero_point=p.zero_point) - x) ** 2).mean())
        grid = f"{ls.grid[0]}..{ls.grid[-1]}" if ls.is_uniform else ", ".join(map(str, ls.grid[:6])) + ", ..."
        out.append(f"| {name} | {ls.num_levels} | {grid} | {float(p.alpha):.3f} | {err:.2e} |")
    return out


def render() -> str:
    lines = [
        "# Level sets",
        "",
        "Generated by `python examples/plot_levels.py` from `qcompile.quant` (the single numeric reference: the",
        "passes, the export, the runtime and the shift-add lowering use the same level sets and decision rule).",
        "",
        "A quantizer clips to `[-alpha, alpha]` (signed) or `[0, alpha]` (unsigned) and projects onto `alpha` times",
        "a level set. Every level set is stored as integers on a fine grid: `level = integer * unit`,",
        "`unit = float32(alpha) / denom`.",
        "",
        "## 4-bit level sets, as in the APoT paper's figure",
        "",
        "Weights (signed: sign bit + 3 magnitude bits; 15 levels, normalised so alpha = 1):",
        "",
        *level_block(signed=True),
        "",
        "Activations (unsigned, 4 bits, 16 levels):",
        "",
        *level_block(signed=False),
        "",
        "Uniform levels are evenly spaced; PoT levels crowd around 0 and leave the outer half of the range with",
        "one level per side (more levels where they help least); APoT, a sum of two PoT terms, keeps a PoT-like",
        "density near 0 and resolves the tails -- a better fit to bell-shaped weights, and each level is at most",
        "two shifts and an add.",
        "",
        "## APoT at every bit-width",
        "",
        "The authors' `build_power_value(B)` forms `ceil(B/2)` additive terms of 2 bits (one of 1 bit when B is",
        "odd), with exponents dealt out round-robin. It defines B = 2..6 and returns NaN (`{0}/0`) otherwise.",
        "Weights use B = bits - 1 (plus a sign), activations B = bits. We continue the same rule for B = 1, 7, 8,",
        "so 2..8-bit weights and activations are all defined; 2-bit weights are `{-1, 0, 1}` (the authors'",
        "ImageNet code quantizes 2-bit weights to that same uniform ternary set), 2-bit activations",
        "`{0, 1/4, 1/2, 1}`.",
        "",
        *apot_table(),
        "",
        "## Integer grids and storage types",
        "",
        "Codes are grid integers; for `uniform_asym` the stored code is `grid + zero_point` with",
        "`zero_point = q_min` of the storage type, and the quantizer's own zero point `Z` (real 0 sits at code `Z`)",
        "is a separate parameter. `storage` is the smallest ONNX integer type holding the codes. PoT/log2 grids",
        "double with every level, so they are refused where the grid would exceed 32 bits (signed PoT/log2 from 7 bits,",
        "unsigned from 6); the widest ones kept, signed 6 and unsigned 5 bits (the APoT paper's PoT 5/5 ablation), halve",
        "down to 2^-30 alpha, exact in float32, and their int32 codes are dequantized with Cast and Mul.",
        "",
        "`log2` (SDQ's base-2 log quantizer, eq. 9-10) has the same levels as signed `pot` and, in qcompile, the same",
        "decisions: every scheme projects to the *nearest level* (linear midpoints, the least squared error on that level",
        "set). SDQ's eq. 9 rounds in the log domain (between 2^k and 2^(k+1) at 2^(k+½)); on N(0, 1) data 8.5-15 % of codes",
        "differ from it at 2-5 bits and fewer small weights go to 0. `sdq_log2_reference` (`from qcompile.quant.levels",
        "import sdq_log2_reference`) computes eq. 9-10 literally; for the same clipping value `--scheme log2` and",
        "`--scheme pot` quantize alike.",
        "",
        *storage_table(),
        "",
        "Binary and ternary weights take their per-channel `alpha` from the least-squared-error search every weight",
        "set gets (`weight_mse_alpha`, then the nearest level), not from the lecture's closed forms. For binary levels",
        "the search lands on BWN's `alpha = E|w|` (within its grid: 0.9998-1.0002 E|w| per channel, measured);",
        "for ternary levels it is not TWN's rule (threshold `0.7 E|w|`,",
        "`alpha` the mean magnitude above it) but the `alpha` whose nearest-level codes (threshold `alpha/2`) leave the",
        "least squared error, lower than TWN's. `qcompile.quant.ops.twn_ternarize` and `binarize` compute the",
        "closed forms:",
        "",
        *ternary_vs_twn(),
        "",
        "## Asymmetric APoT / PoT (activations that can be negative)",
        "",
        "A signed APoT set is symmetric; on a tensor that is mostly positive but reaches a little below 0 (SiLU,",
        "GELU, Hardswish) its negative half is nearly unused. `level_set(scheme, bits, offset=o)` is the unsigned",
        "set shifted down by one of its own grid integers `o` (`0 < o <= denom/2`): 0 stays a level, the dense",
        "levels sit around it, `o` grid steps lie below it. Calibration (`mse`/`percentile` observers) picks the",
        "symmetric set or the offset with the least squared error on the observed histogram, per activation.",
        "Normalised so the largest level is 1:",
        "",
        *asymmetric_block(),
        "",
        "## Decision rule",
        "",
        "Nearest level; at an exact tie between neighbouring grid integers, the even one, else the one of smaller",
        "magnitude (binary: +1 at 0). On uniform grids this is round-half-to-even: `quantize` computes exactly",
        "ONNX `QuantizeLinear` (`clamp(round(x / unit) + Z)`, float32 division). Non-uniform sets compare `x` with",
        "the float32 thresholds `float32(mid) * unit` (`>` or, where ties go up, `>=`); the ONNX emitter compares",
        "against the very same constants, so codes agree exactly (tests/quant/test_onnx_exact.py).",
        "",
        "One exception, at integer layers: an APoT/PoT activation that reads the output of a layer with uint8 input",
        "codes and int8 weights is decided on that layer's int32 accumulator (`LevelSet.requant_cells`, default;",
        "`--float-levels` keeps the rule above). Its thresholds then sit on the accumulator grid, within about one",
        "accumulator unit of the midpoints, and a value exactly on one goes where round-half-to-even puts it",
        "(`runtime/OPS.md`, \"Low-bit layers on int8 kernels\").",
        "",
        "## Laplace clipping vs the MSE search",
        "",
        "On 10^6 Laplace(0, 1) samples (so alpha/b is alpha):",
        "",
        *laplace_vs_mse(),
        "",
        "The lecture's 2.83b, 3.89b, 5.03b solve Banner et al.'s *approximate* error",
        "`2 b^2 e^(-alpha/b) + alpha^2 / (3 * 4^M)` (which assumes 2^M evenly spaced levels and a uniform rounding",
        "error inside the range); the `laplace` observer reproduces them. The `mse` observer minimises the actual",
        "error of the actual level set (2^M - 1 levels for our symmetric uniform sets, APoT's uneven spacing) on the",
        "samples, so it lands elsewhere -- that difference is expected, not a bug.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default = os.path.join(root, "docs", "levels.md")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=default, help=f"file to (re)write (default {os.path.relpath(default)})")
    path = ap.parse_args(argv).out
    text = render()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
