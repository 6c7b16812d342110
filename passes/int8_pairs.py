"""PairSafeInt8Weights: 8-bit weight codes that no uint8 × int8 kernel can saturate, at int8 speed.

On x86 CPUs without VNNI (AVX2 and older), onnxruntime's uint8 × int8 GEMM (MLAS, behind QLinearConv, QGemm
and MatMulInteger) multiplies with ``pmaddubsw``: each pair of products a_2j·w_2j + a_2j+1·w_2j+1 is summed in a
*saturating int16* before the int32 accumulation. With uint8 activation codes up to A, the pair is exact for every
input iff

    |w_2j| + |w_2j+1| <= L = floor(32767 / A)      (L = 128 for 8-bit activations)

for pairs of the same sign (opposite signs cannot leave int16). The pairs are consecutive elements of the
reduction axis in the kernel's order, measured on onnxruntime 1.32 (``tests/test_int8_pairs.py`` checks it on
the installed onnxruntime): Linear/Gemm/MatMul: (in_2j, in_2j+1); Conv: the axis (kernel position, input channel
of the group) flattened channel-fastest, i.e. the weight [O, C/g, *k] read as [O, *k, C/g]. Depthwise convolutions
(one input channel per group) run on a separate kernel that widens to int32 and never saturates; int8 activations
run on int8 × int8 kernels that are exact (both measured).

Two ways to get there, mixed per output channel: widen the step (alpha x f, f from 1 to top / (L/2), where no pair
can exceed L: onnxruntime's ``reduce_range``, a 7-bit grid for 8-bit weights), and move the pairs that still exceed
L onto the constraint with the least squared change (the grid pair with g_a + g_b <= L nearest to the two weights;
for uniform grids the projection onto g_a + g_b = L, rounded). The pass tries 17 values of f and keeps, per
channel, the one with the least squared weight error after the projection (exact sums for short rows and non-uniform
grids; for rows of 256 or more weights, rounding counted as f²/12 per weight and the clipped weights and projected
pairs exactly, touching only the pairs that can reach L). Measured on ResNet-18, MobileNetV2 and the digits model:
about 3 dB of weight SQNR below the full grid, 3 dB above 7 bits. The moved weights are rewritten to code × unit,
so the simulation, the ONNX codes and every kernel agree; ``BiasCorrection`` after it absorbs the mean change.
Layers whose grid fits ±L/2 (APoT/PoT/uniform up to 7 bits: ±64) are untouched.

Before: ``F.conv2d(xq, weight_fq(W), b)``.  After: the same graph, W and the weight quantizer's alpha changed.
Runs after calibration (it needs the weight scales) and before bias correction. Idempotent.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from qcompile import quant
from qcompile.qmodules import FakeQuantize

from .base import Pass, PassResult, attr_value, fake_quantizer, input_quantizer, remember_float, require_calibrated
from .int8_region import _is_transparent

_LAYERS = (F.conv1d, F.conv2d, F.conv3d, F.linear)
INT16_MAX = 32767


def pair_limit(xfq: FakeQuantize) -> Optional[int]:
    """Largest |w_a| + |w_b| a uint8 × int8 kernel adds exactly for inputs from this quantizer, or None where no
    uint8 × int8 kernel runs (int8-stored activations run int8 × int8, exact)."""
    ls = xfq.levelset
    if not ls.is_uniform and ls.code_min < 0 and ls.code_max - ls.code_min <= 255:
        # APoT/PoT/log2 levels below 0: stored as uint8 grid - grid[0] (qcompile.emit.act_storage)
        return INT16_MAX // max(1, ls.code_max - ls.code_min)
    if ls.code_min < 0 or ls.code_max > 255:
        return None  # int8 activations, or codes that are no uint8 tensor (no integer kernel at all)
    return INT16_MAX // max(1, ls.code_max)  # >= 128 >= any int8 weight magnitude


def _input_quantizer(gm: torch.fx.GraphModule, node) -> Optional[FakeQuantize]:
    """The activation quantizer whose codes reach a layer (directly, or through max-pooling and reshapes)."""
    while isinstance(node, torch.fx.Node):
        fq = input_quantizer(gm, node)
        if fq is not None:
            return fq if fq.role == "activation" else None
        if not _is_transparent(gm, node) or not node.args:
            return None
        node = node.args[0]
    return None


def kernel_order(w: torch.Tensor) -> torch.Tensor:
    """View of the weight [O, C/g, *k] as [O, K] in the kernel's reduction order (kernel position major, input
    channel minor); Linear [O, I] is already in it."""
    if w.dim() <= 2:
        return w.reshape(w.shape[0], -1)
    o, c = w.shape[:2]
    return w.reshape(o, c, -1).transpose(1, 2).reshape(o, -1)


def from_kernel_order(flat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) <= 2:
        return flat.reshape(shape)
    o, c = shape[:2]
    k = flat.shape[1] // c
    return flat.reshape(o, k, c).transpose(1, 2).reshape(shape)


def split_pairs(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) elements of the kernel's pairs, each [O, P]. With an even channel count a pair is channels
    (2j, 2j+1) at one kernel position, so no transpose is needed; otherwise the kernel order is built and padded."""
    o, c = t.shape[0], t.shape[1]
    if c % 2 == 0:
        t3 = t.reshape(o, c // 2, 2, -1)
        return t3[:, :, 0].reshape(o, -1), t3[:, :, 1].reshape(o, -1)
    flat = kernel_order(t)
    flat = torch.cat([flat, flat.new_zeros(o, 1)], 1) if flat.shape[1] % 2 else flat
    return flat[:, 0::2], flat[:, 1::2]


def merge_pairs(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``split_pairs``."""
    o, c = shape[0], shape[1]
    if c % 2 == 0:
        return torch.stack([a.reshape(o, c // 2, -1), b.reshape(o, c // 2, -1)], 2).reshape(shape)
    flat = torch.stack([a, b], 2).reshape(o, -1)
    k = 1
    for d in shape[1:]:
        k *= d
    return from_kernel_order(flat[:, :k], shape)


@functools.lru_cache(maxsize=64)
def _magnitudes(grid: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted grid magnitudes available to positive and to negative weights."""
    g = torch.tensor(grid, dtype=torch.float64)
    return g[g >= 0].sort().values, (-g[g <= 0]).sort().values


@functools.lru_cache(maxsize=64)
def _is_uniform(grid: tuple) -> bool:
    return all(b - a == 1 for a, b in zip(grid, grid[1:]))


def _project_uniform(ma, mb, top: int, limit: int):
    """Integer magnitudes (a, b), a + b <= limit, 0 <= a, b <= top, nearest to (ma, mb) (closed form: the
    projection onto a + b = limit, rounded both ways). Arrays of torch or numpy."""
    xp = np if isinstance(ma, np.ndarray) else torch
    lo, hi = max(0, limit - top), min(top, limit)
    centre = xp.clip((ma - mb + limit) / 2, lo, hi)
    best_a = best_b = best_err = None
    for a in (xp.floor(centre), xp.ceil(centre)):
        a = xp.clip(a, lo, hi)
        b = limit - a
        err = (ma - a) ** 2 + (mb - b) ** 2
        if best_err is None:
            best_a, best_b, best_err = a, b, err
        else:
            better = err < best_err
            best_a, best_b, best_err = xp.where(better, a, best_a), xp.where(better, b, best_b), \
                xp.minimum(err, best_err)
    return best_a, best_b


def _project_grid(ma: torch.Tensor, mb: torch.Tensor, mags: torch.Tensor, limit: int,
                  chunk: int = 1 << 14) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``_project_uniform`` for any grid: every grid magnitude for a, the largest that fits for b."""
    cand = mags[mags <= limit]
    idx = torch.searchsorted(mags, limit - cand, right=True) - 1
    partner = mags[idx.clamp_min(0)]
    out_a, out_b = torch.empty_like(ma), torch.empty_like(mb)
    for i in range(0, len(ma), chunk):
        sa, sb = ma[i:i + chunk, None], mb[i:i + chunk, None]
        best = ((sa - cand) ** 2 + (sb - partner) ** 2).argmin(dim=1)
        out_a[i:i + chunk], out_b[i:i + chunk] = cand[best], partner[best]
    return out_a, out_b


def _violations(a: torch.Tensor, b: torch.Tensor, limit: int) -> torch.Tensor:
    """Mask of the pairs whose same-sign codes add past ``limit`` in magnitude (codes of opposite signs add to at
    most max(|a|, |b|) <= limit, so |a + b| alone decides)."""
    return (a + b).abs() > limit


def fix_pairs(a: torch.Tensor, b: torch.Tensor, va: torch.Tensor, vb: torch.Tensor, grid: tuple,
              limit: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pair codes (a, b) with every violating pair replaced by the grid pair nearest (squared change) to the float
    codes (va, vb) that keeps it within ``limit``. Returns the new codes and the number of pairs moved."""
    bad = _violations(a, b, limit)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return a, b, 0
    xa, xb = va[bad].double(), vb[bad].double()
    sign = torch.sign(a[bad]).double()
    new_a, new_b = torch.empty_like(xa), torch.empty_like(xb)
    uniform = _is_uniform(grid)
    for s, mags in zip((1.0, -1.0), _magnitudes(grid)):
        sel = sign == s
        if not bool(sel.any()):
            continue
        ma, mb = (xa[sel] * s).clamp_min(0), (xb[sel] * s).clamp_min(0)
        pa, pb = _project_uniform(ma, mb, int(mags.max()), limit) if uniform else _project_grid(ma, mb, mags, limit)
        new_a[sel], new_b[sel] = s * pa, s * pb
    a, b = a.clone(), b.clone()
    a[bad], b[bad] = new_a.to(a.dtype), new_b.to(b.dtype)
    return a, b, n_bad


# Scale candidates: alpha x f widens the step so fewer pairs reach the limit. f = top / (limit / 2) makes the grid's
# used range ±limit/2, where no pair can violate (the 7-bit grid of onnxruntime's reduce_range, for 8-bit weights).
SCALE_STEPS = 16


def _scale_factors(top: int, limit: int) -> list[float]:
    safe = top / (limit / 2)
    return [1.0 + (safe - 1.0) * i / SCALE_STEPS for i in range(SCALE_STEPS + 1)]


def pair_positions(rows, cols, shape: torch.Size):
    """Flat indices into the weight (``shape``) of the two elements of pairs (rows, cols) of ``split_pairs``;
    -1 for the zero padding of an odd reduction length. Index arrays of torch or numpy."""
    xp = np if isinstance(rows, np.ndarray) else torch
    o, c = shape[0], shape[1]
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    spatial = per_row // c
    base = rows * per_row
    if c % 2 == 0:
        j, pos = cols // spatial, cols % spatial
        first = base + 2 * j * spatial + pos
        return first, first + spatial
    out = []
    for q in (2 * cols, 2 * cols + 1):
        idx = base + (q % c) * spatial + q // c
        out.append(xp.where(q < per_row, idx, xp.full_like(idx, -1)))
    return out[0], out[1]


# The fast search below runs in numpy: it works on a few hundred pairs per layer, where each torch operation's
# fixed cost (several microseconds) was most of the time (the digits model's six layers: 10.5 -> 3 ms). The
# float32 operations are the same (IEEE division, round half to even, float64 sums), so are the codes.

def _np_round_codes(x: np.ndarray, top_lo: int, top_hi: int) -> np.ndarray:
    return np.clip(np.round(x), top_lo, top_hi)


def _estimated_errors(pa: np.ndarray, pb: np.ndarray, rows: np.ndarray, clip_rows: np.ndarray,
                      clip_vals: np.ndarray, n_rows: int, k: int, top: int, limit: int, factors: list[float],
                      values: Optional[np.ndarray] = None) -> np.ndarray:
    """[len(factors), n_rows]: per output channel (row), the squared error, in units of the f = 1 step, of
    uniform codes at step f after the pair projection. With ``values`` (the float codes at f = 1, [rows, K]) the
    rounding and clipping errors are summed exactly; without, rounding contributes f²/12 per element (a uniform
    grid's MSE for any smooth weight distribution, good for long rows) and the clipped elements (magnitudes
    ``clip_vals`` in ``clip_rows``) are counted exactly. The same-sign pairs that may reach the limit
    (magnitudes pa, pb in ``rows``, float32) are projected exactly. Every candidate is evaluated at once."""
    f = np.asarray(factors, dtype=np.float64)[:, None]  # [F, 1]
    f2 = f * f
    f32, f2_32 = f.astype(np.float32), f2.astype(np.float32)

    def rounding(x):  # squared error of codes at every step, [F, n] (float32: these only rank the candidates)
        y = x[None] / f32
        return (y - _np_round_codes(y, -top, top)) ** 2 * f2_32

    if values is not None:
        out = np.zeros((len(factors), n_rows), dtype=np.float64)
        step = max(1, (1 << 22) // max(1, values.shape[1] * len(factors)))
        for i in range(0, n_rows, step):
            out[:, i:i + step] = rounding(values[i:i + step].reshape(-1)).reshape(
                len(factors), -1, values.shape[1]).sum(-1, dtype=np.float64)
    else:
        out = np.array(np.broadcast_to(k * f2 / 12.0, (len(factors), n_rows)))  # a writable copy (one row: a view)
        if len(clip_vals):
            over = clip_vals[None] > top * f
            np.add.at(out, (slice(None), clip_rows), np.where(over, (clip_vals[None] - top * f) ** 2 - f2 / 12.0, 0.0))
    if len(rows):
        # Only the (candidate, pair) entries whose rounded codes still pass the limit change; project just those,
        # in float32 (this ranks candidates; the codes themselves come from the projection at the chosen scale).
        # Random-init layers can have a quarter of their pairs here, so a dense [F, pairs] float64 form is slow.
        xa, xb = pa[None] / f32, pb[None] / f32
        bad = np.minimum(np.round(xa), top) + np.minimum(np.round(xb), top) > limit
        fi, pi = bad.nonzero()
        if len(fi):
            sa, sb, step, step2 = xa[fi, pi], xb[fi, pi], f32[fi, 0], f2_32[fi, 0]
            qa, qb = _project_uniform(sa, sb, top, limit)
            if values is not None:
                ya, yb = pa[pi] / step, pb[pi] / step
                counted = ((ya - _np_round_codes(ya, -top, top)) ** 2 +
                           (yb - _np_round_codes(yb, -top, top)) ** 2) * step2
            else:
                counted = 2 * step2 / 12.0
            extra = ((sa - qa) ** 2 + (sb - qb) ** 2) * step2 - counted
            np.add.at(out, (fi, rows[pi]), extra.astype(np.float64))
    return out


EXACT_ROW = 256  # rows shorter than this sum their rounding errors exactly (the f²/12 estimate needs long rows)


def _safe_weights_fast(w: torch.Tensor, wfq: FakeQuantize, limit: int):
    """``safe_weights`` for a layer on a uniform grid, per output channel. A wider step never raises a code's
    magnitude, so only the pairs that exceed the limit at the calibrated scale can exceed it at any candidate: after
    one pass over the weights to find them (pairs whose float codes add to more than limit - 1, then their codes),
    everything works on those few pairs."""
    ls = wfq.levelset
    top = max(-ls.code_min, ls.code_max)
    denom = np.float32(ls.denom)
    alpha0 = wfq.alpha.detach().float().numpy()
    wd = w.detach().float().numpy()
    flat = wd.reshape(-1)
    n_rows, k = wd.shape[0], flat.size // max(wd.shape[0], 1)
    bshape = (-1,) + (1,) * (wd.ndim - 1)
    unit0 = alpha0 / denom  # quant.unit_from_alpha: float32 alpha / float32 denominator
    scaled = wd / unit0.reshape(bshape)  # float codes at the calibrated step
    va, vb = (t.numpy() for t in split_pairs(torch.from_numpy(scaled)))
    rows, cols = (np.abs(va + vb) > limit - 1).nonzero()
    ia, ib = pair_positions(rows, cols, wd.shape)
    wa, wb = (np.where(i >= 0, flat[np.maximum(i, 0)], np.float32(0)) for i in (ia, ib))

    def codes_at(alpha):
        unit = (alpha / denom)[rows]
        return _np_round_codes(wa / unit, ls.code_min, ls.code_max), _np_round_codes(wb / unit, ls.code_min,
                                                                                     ls.code_max), unit

    # a wider step never raises a magnitude code, so a pair safe at alpha0 is safe at every candidate: keep only
    # the pairs that violate at alpha0 (all of the same sign)
    ca, cb, _ = codes_at(alpha0)
    keep = np.abs(ca + cb) > limit
    if not keep.any():
        return None
    rows, cols, ia, ib, wa, wb = rows[keep], cols[keep], ia[keep], ib[keep], wa[keep], wb[keep]
    xa, xb = va[rows, cols], vb[rows, cols]
    clip_rows, clip_vals = [], []
    for v in (va, vb):
        r, c = (np.abs(v) > top).nonzero()
        clip_rows.append(r)
        clip_vals.append(np.abs(v[r, c]).astype(np.float64))
    factors = _scale_factors(top, limit)
    values = scaled.reshape(n_rows, -1) if k < EXACT_ROW else None
    est = _estimated_errors(np.abs(xa), np.abs(xb), rows, np.concatenate(clip_rows), np.concatenate(clip_vals),
                            n_rows, k, top, limit, factors, values)
    best = est.argmin(axis=0)
    alpha = alpha0 * np.asarray(factors, dtype=np.float32)[best]
    ca, cb, unit = codes_at(alpha)
    # the pairs still past the limit at the chosen step go to the nearest grid pair within it (fix_pairs, uniform)
    na, nb = ca.copy(), cb.copy()
    bad = np.abs(ca + cb) > limit
    for s, top_s in ((1.0, ls.code_max), (-1.0, -ls.code_min)):
        sel = bad & (np.sign(ca) == s)
        if sel.any():
            ma = np.maximum((wa[sel] / unit[sel]).astype(np.float64) * s, 0.0)
            mb = np.maximum((wb[sel] / unit[sel]).astype(np.float64) * s, 0.0)
            pa, pb = _project_uniform(ma, mb, int(top_s), limit)
            na[sel], nb[sel] = s * pa, s * pb
    w_new = flat.copy()
    n_moved = 0
    for idx, old, new in ((ia, ca, na), (ib, cb, nb)):
        moved = (new != old) & (idx >= 0)
        value = new[moved].astype(np.float32) * unit[moved]
        if not np.array_equal(_np_round_codes(value / unit[moved], ls.code_min, ls.code_max), new[moved]):
            raise AssertionError("moved weights do not quantize to their pair-safe codes")
        w_new[idx[moved]] = value
        n_moved += int(moved.sum())
    err = float((np.take_along_axis(est, best[None], 0)[0] * unit0.astype(np.float64) ** 2).sum())
    return (torch.from_numpy(w_new.reshape(wd.shape)).to(w.dtype), torch.from_numpy(alpha), n_moved, err)


def safe_weights(w: torch.Tensor, wfq: FakeQuantize,
                 limit: int) -> Optional[tuple[torch.Tensor, torch.Tensor, int, float]]:
    """(new float weight, new alpha, weights moved, squared quantization error) for one layer, or None if its
    codes are safe already: per output channel, the scale alpha x f (f from ``_scale_factors``) whose pair-safe
    codes are nearest to ``w``, then those codes (the error is estimated for large layers, see
    ``_estimated_errors``)."""
    ls = wfq.levelset
    grid = tuple(ls.grid)
    top = max(-ls.code_min, ls.code_max)
    per_channel = wfq.axis == 0 and wfq.alpha.dim() == 1
    factors = _scale_factors(top, limit)
    if per_channel and _is_uniform(grid):
        return _safe_weights_fast(w, wfq, limit)
    axis = 0 if per_channel else None
    alpha0 = wfq.alpha.detach().float()
    wd = w.detach().float()
    shape = [-1] + [1] * (w.dim() - 1)

    def safe_codes(alpha):
        """(unit, pair codes before, pair codes after) at ``alpha``."""
        unit = quant.unit_from_alpha(alpha, ls).float()
        unit_b = unit.reshape(shape) if per_channel else unit
        a, b = split_pairs(quant.quantize(wd, alpha, ls, axis=axis))
        va, vb = split_pairs(wd / unit_b)
        na, nb, _ = fix_pairs(a, b, va, vb, grid, limit)
        return unit_b, (a, b), (na, nb)

    a, b = split_pairs(quant.quantize(wd, alpha0, ls, axis=axis))
    if not bool(_violations(a, b, limit).any()):
        return None
    errs = []  # every scale measured on the real codes
    ea, eb = split_pairs(wd)
    for f in factors:
        unit_b, _, (na, nb) = safe_codes(alpha0 * f)
        ua, ub = split_pairs(unit_b.expand_as(wd)) if per_channel else (unit_b, unit_b)
        e = (na.float() * ua - ea) ** 2 + (nb.float() * ub - eb) ** 2
        errs.append(e.sum(1, dtype=torch.float64) if per_channel else e.sum(dtype=torch.float64).reshape(1))
    errs = torch.stack(errs)
    choice = errs.argmin(dim=0) if per_channel else errs[:, 0].argmin()
    alpha = alpha0 * torch.tensor(factors, dtype=torch.float32)[choice]
    unit_b, (a, b), (na, nb) = safe_codes(alpha)
    if bool(_violations(na, nb, limit).any()):
        raise AssertionError("pair projection left a pair past the int16 limit")
    codes, safe = merge_pairs(a, b, wd.shape), merge_pairs(na, nb, wd.shape)
    moved = safe != codes
    w_new = torch.where(moved, safe.float() * unit_b, wd)
    err = float(((safe.float() * unit_b - wd) ** 2).sum(dtype=torch.float64))
    return w_new.to(w.dtype), alpha, int(moved.sum()), err


class PairSafeInt8Weights(Pass):
    """Keep every 8-bit weight pair of a uint8 × int8 layer within int16 (see module doc)."""
    needs_quantizers = True  # before InsertQuantizers: nothing to do, and the report says so

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        require_calibrated(gm, "PairSafeInt8Weights")  # it skipped uncalibrated quantizers without a word
        from qcompile.qmodules import FakeQuantize

        changed = False
        examined = 0
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in _LAYERS or len(node.args) < 2:
                continue
            wnode = node.args[1]
            wfq = fake_quantizer(gm, wnode)
            if wfq is None or not wfq.calibrated or wfq.asymmetric or wfq.requant is not None:
                continue
            # emit's s8-safe check: this pass decided for these weights (it also knows the activations' ranges).
            # Only those it reached: after BindIntegerLayers it found no layer, marked every weight, and emit wrote
            # int8 pairs that saturate int16 under int8_weights="s8-safe"
            wfq.pair_safe_checked = True
            examined += 1
            if not (isinstance(wnode.args[0], torch.fx.Node) and wnode.args[0].op == "get_attr"):
                continue
            xfq = _input_quantizer(gm, node.args[0])
            if xfq is None:
                continue  # a float input: the layer runs on float kernels
            limit = pair_limit(xfq)
            ls = wfq.levelset
            if limit is None or ls.code_min < -128 or ls.code_max > 127:
                continue  # int8 x int8, or weights not stored in 8 bits
            if max(-ls.code_min, ls.code_max) * 2 <= limit:
                continue
            w = attr_value(gm, wnode.args[0])
            groups = 1
            if node.target is not F.linear:
                groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
                if w.shape[1] == 1 and groups == w.shape[0] > 1:
                    continue  # depthwise, one output per input channel: onnxruntime's int32 kernel, exact (a
                    # channel multiplier of 2 or more runs on the grouped uint8 x int8 GEMM, which saturates)
            with torch.no_grad():
                result = safe_weights(w, wfq, limit)
                if result is None:
                    continue  # already safe (this pass ran, or no pair reaches the limit)
                w_new, alpha, n_moved, err = result
                widen = float((alpha / wfq.alpha.clamp_min(quant.MIN_ALPHA)).mean())
                wfq.set_params(alpha, wfq.zero_point)
                remember_float(gm, str(wnode.args[0].target))
                w.copy_(w_new)
            from .calibrate import _qparams

            old_qp = wnode.meta.get("qparams")  # the widened range, as Calibrate's bias fit records its own
            wnode.meta["qparams"] = _qparams(wfq, f"{old_qp.observer if old_qp is not None else 'calibrated'}"
                                                  "+pair-safe")
            changed = True
            signal = float((w.detach().double() ** 2).sum())
            layer = node.meta.get("layer", node.name)
            self.report.append(f"{layer}: weight pairs within int16 (|a|+|b| <= {limit}): step x{widen:.3f} on "
                               f"average, {n_moved} weights moved, weight SQNR "
                               f"{10 * math.log10(signal / max(err, 1e-30)):.1f} dB")
        if not examined and any(isinstance(m, FakeQuantize) and m.role == "weight" for m in gm.modules()):
            self.report.append("no layer with fake-quantized weights to check (after BindIntegerLayers, or on a "
                               "compiled model): nothing done, and int8_weights='s8-safe' is not promised; run "
                               "PairSafeInt8Weights after Calibrate, before BindIntegerLayers, as build_passes does")
        return PassResult(gm, changed)
