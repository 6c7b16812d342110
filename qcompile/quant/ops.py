"""Quantize, dequantize and fake-quantize against a :class:`~qcompile.quant.levels.LevelSet`.

A quantizer is ``(LevelSet, alpha)`` -- plus an integer zero point ``Z`` for ``uniform_asym`` -- with ``alpha``
a scalar (per tensor) or a 1-D tensor along ``axis`` (per channel). All arithmetic is float32, in this order:

    unit  = float32(alpha) / float32(denom)                         (float32 division)
    real  = float32(code - Z) * unit                                 (float32 multiply; dequantize)

Uniform level sets (consecutive grid integers) quantize exactly as ONNX ``QuantizeLinear`` does::

    code = clamp(round_half_even(x / unit) + Z, code_min, code_max)  (float32 division)

Non-uniform sets (APoT, PoT, log2, binary) compare ``x`` with the float32 thresholds
``thr_j = float32(mid_j) * unit`` (``mid_j`` the half-integer midpoints of neighbouring grid integers); threshold
``j`` is passed when ``x > thr_j``, or ``x >= thr_j`` where the tie rule sends ties up (``tie_up[j]``). The
code is the grid integer of the level reached. :func:`decision_thresholds` returns exactly these constants,
so an ONNX graph of ``Greater``/``GreaterOrEqual`` against them gives identical codes. Both paths realise the
same rule: nearest level, ties to the even grid integer, else to the smaller magnitude (``levels`` module).
Clipping is implied: anything beyond the outermost threshold takes the outermost level. NaN gives the lowest
code on both paths, as onnxruntime's ``QuantizeLinear`` and a ``Greater`` graph (false for NaN) do.

Restricted signed ranges (``uniform`` signed: ``+-(2**(b-1) - 1)``) are narrower than the storage type, whose
``QuantizeLinear`` saturates at ``-2**(b-1)``: an exporter clips once more (or clips ``x`` to ``[-alpha, alpha]``).
Inputs of other float types are cast to float32; outputs are float32.

``fake_quantize`` is ``dequantize(quantize(x))`` bit for bit, with gradients:

- ``x``: the straight-through estimator (lecture; Bengio et al. 2013) inside the clipping range and zero
  outside (PACT, SDQ eq. 7): ``dy/dx = 1`` if ``lo < x < hi``, else 0, where ``lo``/``hi`` are the smallest and
  largest real levels (``-alpha, alpha`` for signed sets, ``0, alpha`` for unsigned ones). (The APoT code lets
  weight gradients through unclipped; we follow the lecture's convention for both weights and activations.)
- ``alpha``: ``grad="ste"`` is PACT's ``dy/dalpha = 1`` for ``x >= alpha`` -- generally ``(code - Z) / denom``
  outside the range (``sign(x)`` for symmetric sets), 0 inside. ``grad="rcf"`` adds the APoT paper's
  reparameterised clipping function inside the range: ``y = alpha * Pi(x / alpha)`` with STE on ``Pi`` gives
  ``dy/dalpha = Pi(x/alpha) - x/alpha = (y - x) / alpha``. The zero point gets no gradient.
"""
from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional, Union

import numpy as np
import torch

from .levels import LevelSet

TensorLike = Union[torch.Tensor, float, int, np.ndarray]

#: Smallest clipping value observers return; a zero alpha would make the unit 0.
MIN_ALPHA = 1e-8


class ClipParams(NamedTuple):
    """Calibrated parameters of one quantizer: ``alpha`` (float32), ``zero_point`` (int32), ``scale`` = unit."""

    alpha: torch.Tensor
    zero_point: torch.Tensor
    scale: torch.Tensor


# -- parameters ---------------------------------------------------------------------------------------------

def _axis(axis: int, ndim: int) -> int:
    """``axis`` in ``range(ndim)``; an axis outside ``[-ndim, ndim)`` is an IndexError, as torch's own ops raise
    (it was wrapped: axis=7 of a 4-D tensor quantized along axis 3)."""
    if not -ndim <= axis < ndim:
        raise IndexError(f"axis {axis} is out of range for a tensor of {ndim} dimension(s)")
    return axis % ndim

def unit_from_alpha(alpha: TensorLike, levelset: LevelSet) -> torch.Tensor:
    """The fine-grid unit ``float32(alpha) / float32(denom)`` (float32 division), same shape as ``alpha``."""
    a = torch.as_tensor(alpha).detach().to(torch.float32)
    return a / _denom_tensor(levelset)


@functools.lru_cache(maxsize=None)
def _denom_tensor(levelset: LevelSet) -> torch.Tensor:
    """``float32(levelset.denom)`` as a 0-d tensor (a tensor divisor: CPU division by a Python float may multiply
    by its reciprocal instead), made once per level set. Never modified in place."""
    return torch.tensor(float(levelset.denom), dtype=torch.float32)


def decision_thresholds(levelset: LevelSet, unit: TensorLike):
    """The float32 decision thresholds ``float32(mid) * unit`` and their tie flags.

    Returns ``(thr, tie_up)``: ``thr`` has shape ``unit.shape + (num_levels - 1,)``, ``tie_up`` is a bool tensor
    of length ``num_levels - 1``. Code ``grid[j + 1]`` or above is chosen when ``x > thr[j]`` (``tie_up[j]``
    False) or ``x >= thr[j]`` (``tie_up[j]`` True). Uniform level sets quantize by division instead
    (``QuantizeLinear``); their thresholds are given for reference only.
    """
    u = torch.as_tensor(unit).to(torch.float32)
    mids = torch.tensor(levelset.thresholds, dtype=torch.float32)  # exact half-integers
    thr = mids * u.unsqueeze(-1)
    return thr, torch.tensor(levelset.tie_up, dtype=torch.bool)


def _strict_boundaries(levelset: LevelSet, unit: torch.Tensor) -> torch.Tensor:
    """Boundaries ``b`` with "level index = number of b < x": a tie-up threshold ``t`` (``x >= t``) is the
    strict test ``x > nextafter(t, -inf)`` in float32."""
    thr, tie_up = decision_thresholds(levelset, unit)
    below = torch.nextafter(thr, torch.tensor(-float("inf"), dtype=torch.float32))
    return torch.where(tie_up, below, thr).contiguous()


def _check_alpha(alpha: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> Optional[int]:
    if axis is None:
        if alpha.numel() != 1:
            raise ValueError(f"per-tensor quantization needs a scalar alpha, got shape {tuple(alpha.shape)}; "
                             f"pass axis=... for per-channel alpha")
    else:
        if x.dim() == 0:
            raise ValueError("per-channel quantization needs a tensor with at least one dimension")
        axis = _axis(axis, x.dim())
        if alpha.dim() != 1 or alpha.numel() != x.shape[axis]:
            raise ValueError(f"per-channel alpha must be 1-D with {x.shape[axis]} entries (x.shape[{axis}]), "
                             f"got shape {tuple(alpha.shape)}")
    if alpha.numel() == 1:  # a Python test: the tensor reductions below cost ~15 us per call
        a = float(alpha)
        ok = math.isfinite(a) and a > 0
    else:
        ok = bool(torch.all(torch.isfinite(alpha) & (alpha > 0)))
    if not ok:
        raise ValueError("alpha must be finite and > 0; calibrate first or clamp it (e.g. to MIN_ALPHA)")
    return axis


def _bcast(t: torch.Tensor, ndim: int, axis: Optional[int]) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along ``axis`` of an ``ndim`` tensor."""
    if axis is None:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _zero_point(levelset: LevelSet, zero_point, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """The quantizer's zero point as an int32 tensor (default: ``levelset.zero_point``)."""
    if zero_point is None:
        return torch.tensor(levelset.zero_point, dtype=torch.int32)
    z = torch.as_tensor(zero_point).detach().to(torch.int32)
    if z.numel() == 1:  # the same checks in Python (tensor reductions: ~20 us per call)
        zi = int(z)
        if levelset.scheme != "uniform_asym" and zi != 0:
            raise ValueError(f"a non-zero zero point needs scheme 'uniform_asym', not {levelset.scheme!r}")
        if not levelset.code_min <= zi <= levelset.code_max:
            raise ValueError(f"zero_point must lie in the code range {levelset.code_min}..{levelset.code_max}")
        return z
    if levelset.scheme != "uniform_asym" and bool(torch.any(z != 0)):
        raise ValueError(f"a non-zero zero point needs scheme 'uniform_asym', not {levelset.scheme!r}")
    if axis is not None and z.numel() != 1 and (z.dim() != 1 or z.numel() != x.shape[axis]):
        raise ValueError(f"per-channel zero_point must be a scalar or have {x.shape[axis]} entries")
    if axis is None and z.numel() != 1:
        raise ValueError("per-tensor quantization needs a scalar zero_point")
    if bool(torch.any((z < levelset.code_min) | (z > levelset.code_max))):
        raise ValueError(f"zero_point must lie in the code range {levelset.code_min}..{levelset.code_max}")
    return z


def _as_float32(x: TensorLike) -> torch.Tensor:
    x = torch.as_tensor(x)
    if not torch.is_floating_point(x):
        x = x.to(torch.float32)
    return x.detach().to(torch.float32)


# -- non-uniform decisions ----------------------------------------------------------------------------------
# Two exact implementations of "level index = number of strict boundaries b_j < x":
#
# * a cell table (per tensor, or per channel while channels x cells stays small): with half-unit cells
#   centred on the threshold positions (2 * mid is an integer),
#   cell k = floor(x * 2 / unit + 1/2 - kmin) holds at most one threshold, at its centre, so
#   index = lo[k] if x <= b(k) else hi[k]. Float error in k (a few ulps of a cell) only matters half a cell away
#   from any threshold, where the neighbouring cell gives the same answer. Elementwise ops and three gathers,
#   all multi-threaded by torch.
# * otherwise (huge tables, units too small for the table), torch.searchsorted on blocks on worker threads.
#
# Both send NaN to the lowest level, as ONNX Greater (false for NaN) does.
# Work sizes: large enough that the number of (multi-threaded) torch calls stays small -- many short
# parallel regions cost far more than they save on a busy 2-core machine -- and small enough that the
# temporaries are reused instead of faulting in fresh pages for every full-size intermediate.
_BLOCK = 1 << 20  # elements per searchsorted task
_CHUNK = 1 << 22  # elements per step of the cell-table and uniform paths
_MAX_CELLS = 1 << 22  # channels x cells of the cell tables; beyond it, searchsorted
_POOL: Optional[ThreadPoolExecutor] = None


@functools.lru_cache(maxsize=None)
def _cell_tables(levelset: LevelSet):
    """``(kmin, cells, positions, lo, hi)``: cell ``k`` covers half-unit positions ``[k - 1/2, k + 1/2)`` above
    ``kmin = 2 * grid[0]``; ``positions[j]`` is the cell of threshold ``j``; ``lo[k]``/``hi[k]`` are the level
    indices below/above the threshold of cell ``k`` (equal where the cell has none)."""
    kmin = 2 * levelset.grid[0]
    cells = 2 * (levelset.grid[-1] - levelset.grid[0]) + 1
    positions = torch.tensor([int(round(2 * m)) - kmin for m in levelset.thresholds], dtype=torch.int64)
    has_threshold = torch.zeros(cells, dtype=torch.int32)
    has_threshold[positions] = 1
    below = torch.cumsum(has_threshold, 0) - has_threshold  # thresholds left of each cell centre
    return kmin, cells, positions, below, below + has_threshold


def _blocks(n_rows: int, n_cols: int, size: int) -> list:
    """Contiguous pieces ``(r0, r1, c0, c1)`` of a ``(rows, cols)`` array with about ``size`` elements each:
    groups of whole rows, or column ranges of one row when a row alone is larger."""
    if n_cols >= size:
        return [(r, r + 1, c, min(c + size, n_cols)) for r in range(n_rows) for c in range(0, n_cols, size)]
    step = max(1, size // max(n_cols, 1))
    return [(r, min(r + step, n_rows), 0, n_cols) for r in range(0, n_rows, step)]


def _cell_lookup(rows: torch.Tensor, levelset: LevelSet, unit: torch.Tensor, bounds: torch.Tensor,
                 values: torch.Tensor) -> torch.Tensor:
    """``values[c, level index]`` for contiguous float32 ``rows`` ``(C, M)`` through the cell table, with
    ``unit`` ``(C,)``, ``bounds`` ``(C, n)`` and ``values`` ``(C, num_levels)``; piece by piece into one output,
    reusing the temporaries."""
    kmin, cells, positions, lo, hi = _cell_tables(levelset)
    n_rows, n_cols = rows.shape
    thr = torch.full((n_rows, cells), float("inf"), dtype=torch.float32)
    thr[:, positions] = bounds
    thr = thr.reshape(-1)
    lo_values, hi_values = values.index_select(1, lo).reshape(-1), values.index_select(1, hi).reshape(-1)
    scale = (2.0 / unit.to(torch.float64)).to(torch.float32)[:, None]
    offset = (torch.arange(n_rows, dtype=torch.int32) * cells)[:, None]
    shift, zero = torch.tensor(0.5 - kmin, dtype=torch.float32), torch.tensor(0.0)
    out = torch.empty((n_rows, n_cols), dtype=values.dtype)
    blocks = _blocks(n_rows, n_cols, _CHUNK)
    size = max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in blocks)
    pos_buf, cell_buf = torch.empty(size), torch.empty(size, dtype=torch.int32)
    thr_buf, above_buf = torch.empty(size), torch.empty(size, dtype=torch.bool)
    lo_buf, hi_buf = torch.empty(size, dtype=values.dtype), torch.empty(size, dtype=values.dtype)
    for r0, r1, c0, c1 in blocks:
        xb = rows[r0:r1, c0:c1]
        m = xb.numel()
        pos, cell = pos_buf[:m].view(xb.shape), cell_buf[:m].view(xb.shape)
        torch.addcmul(shift, xb, scale[r0:r1], out=pos)
        torch.fmax(pos, zero, out=pos).clamp_(max=cells - 0.5)  # fmax also sends NaN to cell 0
        cell.copy_(pos)  # truncation = floor (pos >= 0)
        if n_rows > 1:
            cell += offset[r0:r1]
        flat = cell_buf[:m]
        torch.index_select(thr, 0, flat, out=thr_buf[:m])
        torch.gt(xb.reshape(-1), thr_buf[:m], out=above_buf[:m])
        torch.index_select(lo_values, 0, flat, out=lo_buf[:m])
        torch.index_select(hi_values, 0, flat, out=hi_buf[:m])
        torch.where(above_buf[:m], hi_buf[:m], lo_buf[:m], out=out[r0:r1, c0:c1].reshape(-1))
    return out


def _pool() -> Optional[ThreadPoolExecutor]:
    """Worker threads for the single-threaded torch.searchsorted; torch releases the GIL inside its ops."""
    global _POOL
    workers = torch.get_num_threads()
    if workers <= 1:
        return None
    if _POOL is None or _POOL._max_workers != workers:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qcompile-quant")
    return _POOL


def _lookup_rows(rows: torch.Tensor, bounds: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[c, #(bounds[c] < rows[c, i])]`` for float32 ``rows`` ``(C, M)`` (no NaN), ``bounds`` ``(C, n)``
    and ``table`` ``(C, n + 1)``, in blocks run on worker threads."""
    n_rows, n_cols = rows.shape
    width = table.shape[1]
    out = torch.empty((n_rows, n_cols), dtype=table.dtype)
    flat_table = table.reshape(-1)

    def run(block):
        r0, r1, c0, c1 = block
        if r1 - r0 == 1:
            index = torch.bucketize(rows[r0, c0:c1], bounds[r0], out_int32=True)
            torch.index_select(table[r0], 0, index, out=out[r0, c0:c1])
        else:
            index = torch.searchsorted(bounds[r0:r1], rows[r0:r1], out_int32=True)
            index += (torch.arange(r0, r1, dtype=torch.int32) * width)[:, None]
            torch.index_select(flat_table, 0, index.reshape(-1), out=out[r0:r1].reshape(-1))

    blocks = _blocks(n_rows, n_cols, _BLOCK)
    pool = _pool() if len(blocks) > 1 else None
    if pool is None:
        for block in blocks:
            run(block)
    else:
        list(pool.map(run, blocks))
    return out


def _nonuniform_lookup(x: torch.Tensor, levelset: LevelSet, unit: torch.Tensor, axis: Optional[int],
                       values: torch.Tensor) -> torch.Tensor:
    """Per element of ``x``, ``values[..., level index]`` with the level chosen by the threshold decisions.
    ``values`` is one row of ``num_levels`` entries, or (per channel) one row per channel."""
    bounds = _strict_boundaries(levelset, unit)
    if axis is None:
        moved, rows = x, x.reshape(1, -1).contiguous()
        unit, bounds = unit.reshape(1), bounds.reshape(1, -1)
    else:
        moved = x.movedim(axis, 0)
        rows = moved.reshape(moved.shape[0], -1).contiguous()
    values = values.reshape(-1, values.shape[-1]).expand(rows.shape[0], -1).contiguous()
    cells = 2 * (levelset.grid[-1] - levelset.grid[0]) + 1  # no table built yet: PoT-5 spans 2^31 cells
    if rows.shape[0] * cells <= _MAX_CELLS and bool((2.0 / unit.to(torch.float64) < 1e30).all()):
        out = _cell_lookup(rows, levelset, unit, bounds, values)
    else:
        out = _lookup_rows(torch.nan_to_num(rows, nan=-float("inf")), bounds, values)
    if axis is None:
        return out.reshape(x.shape)
    return out.reshape(moved.shape).movedim(0, axis).contiguous()


def _uniform_codes(x: torch.Tensor, levelset: LevelSet, unit: torch.Tensor, z: torch.Tensor,
                   axis: Optional[int], real: bool = False) -> torch.Tensor:
    """``clamp(round_half_even(x / unit) + Z, code_min, code_max)`` in float32 (QuantizeLinear); NaN gives
    ``code_min`` (as onnxruntime does). ``real``: return ``float32(code - Z) * unit`` instead (dequantized).
    Per tensor it runs chunk by chunk into one output buffer."""
    shift = int(z) != 0 if z.numel() == 1 else bool(torch.any(z != 0))
    if axis is not None:
        u = _bcast(unit, x.dim(), axis)
        zb = _bcast(z, x.dim(), axis if z.numel() > 1 else None).to(torch.float32)
        q = torch.round(x / u)
        if shift:
            q += zb
        q.nan_to_num_(nan=float(levelset.code_min)).clamp_(levelset.code_min, levelset.code_max)
        if not real:
            return q.to(torch.int32)
        if shift:
            q -= zb
        return q.mul_(u)
    u, zf = unit.reshape(()), float(z)
    flat = x.reshape(-1)
    if flat.numel() <= _CHUNK:  # one chunk: the same operations on a fresh tensor, without the buffer and copy
        q = torch.div(flat, u).round_()
        if shift:
            q.add_(zf)
        q.nan_to_num_(nan=float(levelset.code_min)).clamp_(levelset.code_min, levelset.code_max)
        if not real:
            return q.to(torch.int32).reshape(x.shape)
        if shift:
            q.sub_(zf)
        return q.mul_(u).reshape(x.shape)
    out = torch.empty(flat.shape, dtype=torch.float32 if real else torch.int32)
    buf = torch.empty(min(flat.numel(), _CHUNK))
    for start in range(0, flat.numel(), _CHUNK):
        xc = flat[start:start + _CHUNK]
        q = buf[:xc.numel()]
        torch.div(xc, u, out=q)
        q.round_()
        if shift:
            q.add_(zf)
        q.nan_to_num_(nan=float(levelset.code_min)).clamp_(levelset.code_min, levelset.code_max)
        if real:
            if shift:
                q.sub_(zf)
            q.mul_(u)
        out[start:start + xc.numel()].copy_(q)
    return out.reshape(x.shape)


# -- quantize / dequantize ----------------------------------------------------------------------------------
def quantize(x: TensorLike, alpha: TensorLike, levelset: LevelSet, axis: Optional[int] = None,
             zero_point: Optional[TensorLike] = None) -> torch.Tensor:
    """Integer codes (``torch.int32``, same shape as ``x``) of the nearest levels of ``alpha * levels``.

    Codes are grid integers, plus the zero point for ``uniform_asym`` (``zero_point`` defaults to
    ``levelset.zero_point``; it is the code of real 0 and may be per channel). ``x`` is cast to float32.
    NaN gives the lowest code (what onnxruntime's QuantizeLinear and a Greater-based graph give).
    """
    x = _as_float32(x)
    alpha_t = torch.as_tensor(alpha).detach().to(torch.float32)
    axis = _check_alpha(alpha_t, x, axis)
    unit = unit_from_alpha(alpha_t, levelset)
    z = _zero_point(levelset, zero_point, x, axis)
    if levelset.is_uniform:
        return _uniform_codes(x, levelset, unit, z, axis)
    return _nonuniform_lookup(x, levelset, unit, axis, _grid_tensor(levelset))


@functools.lru_cache(maxsize=None)
def _grid_tensor(levelset: LevelSet) -> torch.Tensor:
    return torch.tensor(levelset.grid, dtype=torch.int32)


def dequantize(codes: torch.Tensor, alpha: TensorLike, levelset: LevelSet, axis: Optional[int] = None,
               zero_point: Optional[TensorLike] = None) -> torch.Tensor:
    """Real values ``float32(codes - Z) * unit`` (float32)."""
    codes = torch.as_tensor(codes)
    alpha_t = torch.as_tensor(alpha).detach().to(torch.float32)
    if axis is not None and codes.dim() > 0:
        axis = _axis(axis, codes.dim())
    unit = _bcast(unit_from_alpha(alpha_t, levelset), codes.dim(), axis)
    z = _zero_point(levelset, zero_point, codes, axis)
    shifted = codes.to(torch.int32)
    if bool(torch.any(z != 0)):
        shifted = shifted - _bcast(z, codes.dim(), axis if z.numel() > 1 else None)
    return shifted.to(torch.float32) * unit


def clip_range(alpha: TensorLike, levelset: LevelSet, zero_point: Optional[TensorLike] = None):
    """The smallest and largest real levels ``(lo, hi)`` of a quantizer (float32, shaped like ``alpha``)."""
    unit = unit_from_alpha(alpha, levelset)
    z = torch.as_tensor(levelset.zero_point if zero_point is None else zero_point).to(torch.int32)
    lo = (levelset.code_min - z).to(torch.float32) * unit
    hi = (levelset.code_max - z).to(torch.float32) * unit
    return lo, hi


# -- fake quantization --------------------------------------------------------------------------------------
def _fake_values(x: torch.Tensor, alpha: torch.Tensor, levelset: LevelSet, axis: Optional[int],
                 zero_point) -> torch.Tensor:
    """``dequantize(quantize(x))`` without the integer round trip: the same float32 operations in the same
    order (``float32(code - Z) * unit``), so the result is identical bit for bit."""
    x = _as_float32(x)
    alpha_t = alpha.detach().to(torch.float32)
    axis = _check_alpha(alpha_t, x, axis)
    unit = unit_from_alpha(alpha_t, levelset)
    z = _zero_point(levelset, zero_point, x, axis)
    if levelset.is_uniform:
        return _uniform_codes(x, levelset, unit, z, axis, real=True)
    grid = _grid_tensor(levelset).to(torch.float32)
    if axis is None:
        return _nonuniform_lookup(x, levelset, unit, None, grid * unit)
    return _nonuniform_lookup(x, levelset, unit, axis, grid[None, :] * unit[:, None])


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, levelset, axis, zero_point, grad):
        xf = x.detach().to(torch.float32)
        y = _fake_values(xf, alpha, levelset, axis, zero_point)
        ctx.levelset, ctx.grad = levelset, grad
        ctx.axis = None if axis is None else _axis(axis, xf.dim())
        ctx.zero_point = zero_point
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(xf, y, alpha)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xf, y, alpha = ctx.saved_tensors
        ls, axis = ctx.levelset, ctx.axis
        alpha32 = alpha.detach().to(torch.float32)
        lo, hi = clip_range(alpha32, ls, ctx.zero_point)
        lo, hi = _bcast(lo, xf.dim(), axis), _bcast(hi, xf.dim(), axis)
        inside = (xf > lo) & (xf < hi)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(inside, grad_y, torch.zeros_like(grad_y)).to(ctx.x_dtype)
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            unit = _bcast(unit_from_alpha(alpha32, ls), xf.dim(), axis)
            # y = float32(code - Z) * unit with |code - Z| < 2**16, so y / unit rounds back to code - Z exactly
            outside = torch.round(y / unit) / float(ls.denom)  # = y / alpha at the clipped levels, exactly
            if ctx.grad == "rcf":
                local = torch.where(inside, (y - xf) / _bcast(alpha32, xf.dim(), axis), outside)
            else:
                local = torch.where(inside, torch.zeros_like(outside), outside)
            contrib = grad_y.to(torch.float32) * local
            if axis is None:
                grad_alpha = contrib.sum()
            else:
                dims = [d for d in range(xf.dim()) if d != axis]
                grad_alpha = contrib.sum(dim=dims) if dims else contrib
            grad_alpha = grad_alpha.reshape(alpha.shape).to(alpha.dtype)
        return grad_x, grad_alpha, None, None, None, None


def fake_quantize(x: torch.Tensor, alpha: TensorLike, levelset: LevelSet, axis: Optional[int] = None,
                  grad: str = "ste", zero_point: Optional[TensorLike] = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` (float32, bit for bit) with STE for ``x`` and PACT (``"ste"``) or APoT RCF
    (``"rcf"``) gradients for ``alpha`` (module docstring)."""
    if grad not in ("ste", "rcf"):
        raise ValueError(f"grad must be 'ste' or 'rcf', got {grad!r}")
    x = torch.as_tensor(x)
    if not torch.is_floating_point(x):
        x = x.to(torch.float32)
    alpha_t = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha, dtype=torch.float32)
    if not torch.is_floating_point(alpha_t):
        alpha_t = alpha_t.to(torch.float32)
    if not torch.is_grad_enabled() or not (x.requires_grad or alpha_t.requires_grad):
        # no gradient to record: the forward alone (the autograd.Function's bookkeeping was ~40 us per call)
        return _fake_values(x.detach().to(torch.float32), alpha_t, levelset, axis, zero_point)
    return _FakeQuantize.apply(x, alpha_t, levelset, axis, zero_point, grad)


# -- parameters from ranges, lecture formulas ----------------------------------------------------------------
def clip_params_from_range(lo: TensorLike, hi: TensorLike, levelset: LevelSet) -> ClipParams:
    """Quantizer parameters covering the real range ``[lo, hi]`` (per tensor or per channel).

    Symmetric signed sets: ``alpha = max(|lo|, |hi|)``; asymmetric APoT/PoT sets (levels ``alpha * v``,
    ``v[0] < 0``): ``alpha = max(hi, lo / v[0])``; unsigned sets: ``alpha = max(hi, 0)`` (negative values
    clip to 0); ``uniform_asym``: the range is widened to contain 0, ``alpha = hi - lo`` (the width) and
    ``Z = round(q_min - lo / S)`` with ``S = unit``, clamped to the code range (lecture). ``alpha`` is at least
    :data:`MIN_ALPHA`.
    """
    lo = torch.as_tensor(lo, dtype=torch.float64)
    hi = torch.as_tensor(hi, dtype=torch.float64)
    if levelset.scheme == "uniform_asym":
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        alpha = torch.clamp(hi - lo, min=MIN_ALPHA).to(torch.float32)
        scale = unit_from_alpha(alpha, levelset)
        z = torch.round(levelset.code_min - lo / scale.to(torch.float64))
        z = z.clamp(levelset.code_min, levelset.code_max).to(torch.int32)
        return ClipParams(alpha, z, scale)
    if levelset.signed and not levelset.symmetric:
        # asymmetric APoT/PoT: levels alpha * [values[0], 1] with values[0] < 0
        alpha = torch.maximum(torch.clamp(hi, min=0.0), torch.clamp(lo, max=0.0) / float(levelset.values[0]))
    elif levelset.signed:
        alpha = torch.maximum(lo.abs(), hi.abs())
    else:
        alpha = torch.clamp(hi, min=0.0)
    alpha = torch.clamp(alpha, min=MIN_ALPHA).to(torch.float32)
    return ClipParams(alpha, torch.zeros(alpha.shape, dtype=torch.int32), unit_from_alpha(alpha, levelset))


def asymmetric_qparams(rmin: TensorLike, rmax: TensorLike, bits: int, signed: bool = True):
    """The lecture's ``(S, Z)``: ``S = (r_max - r_min) / (q_max - q_min)``, ``Z = round(q_min - r_min / S)``.

    ``q`` ranges over ``[-2**(b-1), 2**(b-1) - 1]`` (``signed``, as in the lecture) or ``[0, 2**b - 1]``; the
    range is widened to contain 0 so ``Z`` is a valid code. ``S`` is float32 (computed as ``unit``), ``Z`` int32.
    Quantize with ``quantize(x, r_max - r_min, level_set("uniform_asym", bits, signed), zero_point=Z)``.
    """
    from .levels import level_set

    p = clip_params_from_range(rmin, rmax, level_set("uniform_asym", bits, signed))
    return p.scale, p.zero_point


def twn_ternarize(w: torch.Tensor, axis: Optional[int] = None):
    """Ternary Weight Networks (lecture): ``Delta = 0.7 E|w|``, ``r_t = E_{|w| > Delta} |w|``.

    Returns ``(codes, r_t, delta)``: int32 codes in {-1, 0, 1} (``+1`` for ``w > Delta``, ``-1`` for
    ``w < -Delta``, compared in float64, the comparison ``r_t`` averages over), and float32 ``r_t`` and ``Delta`` (scalars, or 1-D along ``axis``). ``dequantize(codes,
    r_t, level_set("ternary"), axis)`` reconstructs ``codes * r_t``. Note the TWN threshold ``Delta`` is not the
    nearest-level midpoint ``r_t / 2``, so ``quantize(w, r_t, ternary)`` can differ from these codes.
    """
    w = _as_float32(w)
    if axis is None:
        flat = w.reshape(1, -1)
    else:
        axis = _axis(axis, w.dim())
        flat = w.movedim(axis, 0).reshape(w.shape[axis], -1)
    mag = flat.abs().to(torch.float64)
    delta = 0.7 * mag.mean(dim=1)
    kept = mag > delta[:, None]
    n_kept = kept.sum(dim=1)
    r_t = torch.where(n_kept > 0, (mag * kept).sum(dim=1) / n_kept.clamp(min=1), torch.zeros_like(delta))
    d32 = delta.to(torch.float32)
    sign = (flat > 0).to(torch.int32) - (flat < 0).to(torch.int32)
    codes = sign * kept.to(torch.int32)  # the float64 comparison r_t averaged over (float32 Delta can round up)
    if axis is None:
        return codes.reshape(w.shape), r_t.to(torch.float32).reshape(()), d32.reshape(())
    moved_shape = w.movedim(axis, 0).shape
    return codes.reshape(moved_shape).movedim(0, axis).contiguous(), r_t.to(torch.float32), d32


def binarize(w: torch.Tensor, axis: Optional[int] = None):
    """Binary weights (lecture, BWN/XNOR-Net): codes ``sign(w)`` with ``sign(0) = +1`` and scale ``E|w|``.

    Returns ``(codes, alpha)``; the same codes as ``quantize(w, alpha, level_set("binary"))``.
    """
    w = _as_float32(w)
    if axis is None:
        alpha = w.abs().to(torch.float64).mean().to(torch.float32)
    else:
        axis = _axis(axis, w.dim())
        dims = [d for d in range(w.dim()) if d != axis]
        alpha = w.abs().to(torch.float64).mean(dim=dims).to(torch.float32)
    codes = torch.where(w >= 0, 1, -1).to(torch.int32)
    return codes, alpha
