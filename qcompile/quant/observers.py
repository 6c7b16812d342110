"""Calibration observers: a stream of tensors -> clipping parameters for a level set and bit-width.

Every observer has ``update(x)`` (call once per batch; memory stays bounded: running statistics or a
fixed-size histogram) and ``compute_alpha(levelset)`` / ``compute_qparams(levelset)``. Per-channel
observation is chosen when the observer is made (``axis=``); ``compute_*`` take an optional ``axis`` only to
check it (``None`` means the observer's own axis).
Each observer first finds a real clipping range ``[lo, hi]`` per tensor or channel; :func:`clip_params_from_range`
turns it into ``alpha`` (symmetric: ``max(|lo|, |hi|)``; unsigned: ``hi``) or, for ``uniform_asym``, into the
range width ``alpha`` and the lecture's zero point ``Z``.

=============  ============================================================================================
name           clipping range
=============  ============================================================================================
``minmax``     observed min / max.
``ema``        exponential moving average of per-batch min / max (lecture):
               ``r_hat(t) = c r(t) + (1 - c) r_hat(t-1)``, ``c = momentum`` (0.01); the first batch sets it.
``percentile`` the ``p``-th percentile (99.99) of ``|x|`` (signed sets), of ``x`` (unsigned), or the
               ``100 - p`` / ``p`` percentiles (``uniform_asym``), from the histogram.
``mse``        ``argmin_alpha E[(x - Q_alpha(x))^2]`` for *any* level set (APoT and PoT included): a 100-point
               grid over ``(0, alpha_max]`` refined three times around the best point. The error of each
               candidate is integrated exactly over the histogram, assuming values spread uniformly inside
               each bin. ``uniform_asym`` searches a common shrink factor of ``[min(lo, 0), max(hi, 0)]``
               (the zero point of the full range) at 6-8 bits; at 2-5 bits every zero point, each with its
               own range width (a zero point fixed from the full range is too coarse there).
``kl``         TensorRT entropy calibration (Migacz 2017, lecture): for each candidate clip bin ``i`` the
               reference ``P`` = histogram of ``|x|`` (``x > 0`` for unsigned sets) cut at ``i`` with the outliers
               added to the last bin, ``Q`` = the bins merged per level of the level set (any level set, not
               only 128 uniform levels) and spread back over the non-empty bins; pick the ``i`` of least
               ``KL(P || Q)`` (empty bins smoothed with ``1e-4`` counts). ``uniform_asym`` takes the signed
               uniform set's threshold of ``|x|`` (of the long side, for a skewed tensor, keeping the short side
               whole). At 8 bits the entropy threshold clips more than the least squared error does: on digits
               CNNs 5-11 dB of output SQNR below ``minmax`` at W8A8, accuracy the same.
``laplace``    Banner et al. 2019 (lecture): fit ``b`` (``E|x|`` for a symmetric set, whose clip is centred at 0;
               ``E|x - median|`` otherwise) and clip at ``t(M) b``, where ``t`` solves
               the approximate Laplace error ``2 b^2 e^(-alpha/b) + alpha^2 / (3 * 4^M)``:
               ``t e^t = 3 * 4^M`` -> 2.83, 3.90, 5.03 for M = 2, 3, 4 bits (the lecture's 2.83b, 3.89b,
               5.03b). Unsigned sets use the one-sided variant: ``b = E[x | x > 0]`` and ``t e^t = 12 * 4^M``
               (clip error ``b^2 e^(-alpha/b)``, step ``alpha / 2^M``). ``M`` is ``levelset.bits``.
               The formula is Banner's for uniform levels; for APoT/PoT it is a heuristic, use ``mse``.
``sdq``        SDQ eq. 1-2: clip at ``k * sigma`` (``k`` is SDQ's alpha, default 3). ``sigma`` is the standard
               deviation of the data, or -- for non-negative data or unsigned sets -- of the mirrored positive
               part (``sqrt(E[x^2 | x > 0])``), as SDQ prescribes for post-ReLU activations. Pooled over the
               stream (SDQ's EMA of sigma with momentum 0.001, eq. 3, is a training-time device).
=============  ============================================================================================

Data-free: :func:`bn_range` gives ``beta +- k |gamma|`` (``k = 6``, the lecture's "mean +- 6 std from
BatchNorm"), :func:`bn_qparams` the quantizer parameters from it. ``Calibrate`` without data caps at that range and
runs the calibration method on values drawn from each channel's ``N(beta, gamma^2)`` (its positive part after a
ReLU), so the clip suits the level set as with data. ``laplace`` and ``sdq`` fit one bell to the whole tensor: on a
model input of raw features in different units (a mixture, not a bell) they clip hard even at 8 bits (raw
breast-cancer MLP at W8A8: 51.5 % and 42.7 % against 91.8 % with ``mse``); use ``mse`` or ``percentile`` there.

Histograms (``percentile``, ``mse``, ``kl``, ``laplace``) have ``bins`` bins on each side of 0 over
``[-R, R]`` with ``R`` a power of two; when data exceeds ``R`` it doubles and bins merge in pairs, which is exact,
so a stream gives the same histogram as one batch of all the data. Memory: ``channels x 2 bins`` float64.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .levels import LevelSet
from .ops import MIN_ALPHA, ClipParams, clip_params_from_range

SAMPLE_EXTREMES_MAX = 1 << 20  # values per batch up to which an observer keeps each sample's extremes


class Observer:
    """Base class: tracks count, min and max per tensor or per channel; subclasses add their statistics."""

    name = "observer"
    asymmetric_levels = True  # whether _range handles asymmetric APoT/PoT sets (LevelSet.offset)

    def __init__(self, axis: Optional[int] = None):
        self.axis = axis
        self.channels: Optional[int] = None
        self.ndim: Optional[int] = None
        self.count = None  # float64 per channel
        self.min_val = None
        self.max_val = None
        # per tensor: each sample's (leading index's) extremes, float64, where every batch had at most
        # SAMPLE_EXTREMES_MAX values (the tail headroom of passes.calibrate fits new samples' excess on them)
        self.sample_min = None
        self.sample_max = None
        self.sample_extremes = axis is None

    # -- streaming ---------------------------------------------------------------------------------------
    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32 rows ``(channels, n)``: one row per channel, or a single row per tensor."""
        x = torch.as_tensor(x).detach()
        if not torch.is_floating_point(x):
            x = x.to(torch.float32)
        x = x.to(torch.float32)
        self.ndim = max(x.dim(), 1)
        if self.axis is None:
            rows = _flat_in_memory_order(x).reshape(1, -1)
        else:
            if x.dim() == 0:
                raise ValueError("per-channel observer got a 0-d tensor")
            if not -x.dim() <= self.axis < x.dim():
                raise IndexError(f"axis {self.axis} is out of range for a tensor of {x.dim()} dimension(s)")
            axis = self.axis % x.dim()
            rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        if self.channels is None:
            self.channels = rows.shape[0]
        elif rows.shape[0] != self.channels:
            raise ValueError(f"{self.name} observer saw {self.channels} channels before, now {rows.shape[0]}")
        if rows.shape[1] == 0:
            raise ValueError(f"{self.name} observer got an empty tensor")
        return rows

    def update(self, x: torch.Tensor) -> "Observer":
        """Observe one tensor (one batch); returns ``self``."""
        rows = self._rows(x)
        if rows.shape[0] == 1:  # a whole-tensor aminmax is one fast pass; along dim=1 it is several times slower
            lo, hi = (float(t) for t in torch.aminmax(rows))  # float32 -> Python float: exact
            # amin/amax propagate NaN, and an inf is an extreme: finite extremes mean finite data (one pass fewer)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                kind = "NaN" if math.isnan(lo) or math.isnan(hi) else "inf"
                raise ValueError(f"{self.name} observer got NaN or inf values ({kind})")
            bmin = torch.tensor([lo], dtype=torch.float64)
            bmax = torch.tensor([hi], dtype=torch.float64)
        else:
            bmin, bmax = rows.amin(dim=1), rows.amax(dim=1)
            if not bool(torch.isfinite(bmin).all() and torch.isfinite(bmax).all()):
                kind = "NaN" if bool(torch.isnan(bmin).any() or torch.isnan(bmax).any()) else "inf"
                raise ValueError(f"{self.name} observer got NaN or inf values ({kind})")
            bmin, bmax = bmin.to(torch.float64), bmax.to(torch.float64)
        n = torch.full((rows.shape[0],), float(rows.shape[1]), dtype=torch.float64)
        if self.count is None:
            self.count, self.min_val, self.max_val = n, bmin, bmax
        else:
            self.count = self.count + n
            self.min_val = torch.minimum(self.min_val, bmin)
            self.max_val = torch.maximum(self.max_val, bmax)
        if self.sample_extremes:
            self._sample_extremes(x)
        self._observe(rows, bmin, bmax)
        return self

    def _sample_extremes(self, x) -> None:
        x = torch.as_tensor(x).detach()
        if x.dim() < 2 or x.numel() > SAMPLE_EXTREMES_MAX:
            self.sample_extremes, self.sample_min, self.sample_max = False, None, None
            return
        flat = x.reshape(x.shape[0], -1).to(torch.float32)
        # amin and amax, not aminmax(dim=1): the same values, 13 instead of 98 us on a (32, 2048) batch
        lo, hi = flat.amin(dim=1).to(torch.float64), flat.amax(dim=1).to(torch.float64)
        self.sample_min = lo if self.sample_min is None else torch.cat([self.sample_min, lo])
        self.sample_max = hi if self.sample_max is None else torch.cat([self.sample_max, hi])

    def _observe(self, rows: torch.Tensor, bmin: torch.Tensor, bmax: torch.Tensor) -> None:
        pass

    # -- results -----------------------------------------------------------------------------------------
    def _range(self, levelset: LevelSet):
        """Per-channel ``(lo, hi)`` float64 clipping range for ``levelset``."""
        raise NotImplementedError

    def _check(self, axis: Optional[int]) -> None:
        if self.count is None:
            raise ValueError(f"{self.name} observer has seen no data; call update() first")
        if axis is not None and (self.axis is None or axis % self.ndim != self.axis % self.ndim):
            raise ValueError(f"{self.name} observer was made with axis={self.axis}, asked for axis={axis}; "
                             f"choose per-channel observation when making it: make_observer(name, axis={axis})")

    def compute_qparams(self, levelset: LevelSet, axis: Optional[int] = None) -> ClipParams:
        """``ClipParams(alpha, zero_point, scale)``: scalars per tensor, 1-D per channel. ``axis`` (optional)
        must be the axis the observer was made with; ``None`` means that axis."""
        self._check(axis)
        if levelset.offset and not self.asymmetric_levels:
            raise ValueError(f"the {self.name} observer does not calibrate asymmetric {levelset.scheme} levels; "
                             f"use minmax, percentile or mse")
        lo, hi = self._range(levelset)
        params = clip_params_from_range(lo, hi, levelset)
        if self.axis is None:
            return ClipParams(*(t.reshape(()) for t in params))
        return params

    def compute_alpha(self, levelset: LevelSet, axis: Optional[int] = None) -> torch.Tensor:
        """The clipping value ``alpha`` (float32; for ``uniform_asym`` the range width, see ``compute_qparams``)."""
        return self.compute_qparams(levelset, axis).alpha


def _flat_in_memory_order(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a view whose order is its memory order (a per-tensor observer does not care about element order):
    a channels-last activation is not copied to NCHW first."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)
    return x


class MinMaxObserver(Observer):
    """Observed minimum and maximum."""

    name = "minmax"

    def _range(self, levelset):
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min/max (lecture, "Type 1: during training")."""

    name = "ema"

    def __init__(self, axis: Optional[int] = None, momentum: float = 0.01):
        super().__init__(axis)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.ema_min = None
        self.ema_max = None

    def _observe(self, rows, bmin, bmax):
        if self.ema_min is None:
            self.ema_min, self.ema_max = bmin, bmax
        else:
            c = self.momentum
            self.ema_min = c * bmin + (1.0 - c) * self.ema_min
            self.ema_max = c * bmax + (1.0 - c) * self.ema_max

    def _range(self, levelset):
        return self.ema_min, self.ema_max


# -- histogram ----------------------------------------------------------------------------------------------
def _pow2_ceil(v: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= v (float64), at least 2**-40."""
    v = torch.clamp(v, min=2.0 ** -40)
    mant, exp = torch.frexp(v)  # v = mant * 2**exp, mant in [0.5, 1)
    return torch.where(mant == 0.5, v, torch.ldexp(torch.ones_like(v), exp))


def _prime_at_least(n: int) -> int:
    n = max(2, n)
    while any(n % d == 0 for d in range(2, int(n ** 0.5) + 1)):
        n += 1
    return n


class HistogramObserver(Observer):
    """Streaming histogram over ``[-R, R]``, ``bins`` bins per side, ``R`` a power of two per channel."""

    name = "histogram"
    _CHUNK = 1 << 18  # elements per step of the binning loop
    _SAMPLE = 1 << 21  # values per update beyond which a strided sample is binned

    def __init__(self, axis: Optional[int] = None, bins: int = 2048):
        super().__init__(axis)
        if bins < 8 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 8, got {bins}")
        self.bins = bins
        self.hist = None  # (C, 2 * bins) float64
        self.radius = None  # (C,) float64

    def _observe(self, rows, bmin, bmax):
        nb = self.bins
        need = _pow2_ceil(torch.maximum(bmin.abs(), bmax.abs()))
        if self.hist is None:
            self.radius = need
            self.hist = torch.zeros(rows.shape[0], 2 * nb, dtype=torch.float64)
        elif bool((need > self.radius).any()):
            self._grow(torch.maximum(need, self.radius))
        width = (self.radius / nb).to(torch.float32)[:, None]  # a power of two: x / width is exact
        n_rows, n_cols = rows.shape
        weight = 1.0
        if n_rows * n_cols > self._SAMPLE:
            # a large tensor: a strided sample of about _SAMPLE values is binned, each counting for the values it
            # stands for (the range is the whole tensor's, from update()). A prime stride does not fall in step with
            # the layout's sizes. On 32 images, YOLOv8n at 320 x 320 (13 M values at its first activation):
            # calibration 2.4 -> 1.9 s, output SQNR vs float 46.52 -> 46.35 dB. Not below 2^21: with 2^19,
            # EfficientNet-B0 at 64 x 64 (1 M values) lost 1.1 dB at APoT W4A4 (37.7 against 38.8)
            k = _prime_at_least(-(-n_rows * n_cols // self._SAMPLE))
            rows = rows[:, ::k]
            weight = n_cols / rows.shape[1]
            n_cols = rows.shape[1]
        offsets = (torch.arange(n_rows, dtype=torch.int32) * (2 * nb))[:, None] if n_rows > 1 else None
        # Bin index floor(x / width) + B, clamped, in column chunks through two reused buffers: a few cache-sized
        # passes instead of full-size float and int64 temporaries (several times faster on large activations).
        step = max(1, self._CHUNK // n_rows)
        buf = torch.empty(n_rows, min(step, n_cols))
        ibuf = torch.empty(buf.shape, dtype=torch.int32)
        counts = None
        for start in range(0, n_cols, step):
            xc = rows[:, start:start + step]
            b, ib = buf[:, :xc.shape[1]], ibuf[:, :xc.shape[1]]
            torch.div(xc, width, out=b).floor_().add_(nb).clamp_(0, 2 * nb - 1)
            ib.copy_(b)  # integral values: exact
            if offsets is not None:
                ib += offsets
            part = torch.bincount(ib.reshape(-1), minlength=n_rows * 2 * nb)
            counts = part if counts is None else counts.add_(part)
        counts = counts.reshape(n_rows, 2 * nb).to(torch.float64)  # integer counts: exact in float64
        self.hist += counts if weight == 1.0 else counts.mul_(weight)

    def _grow(self, new_radius: torch.Tensor) -> None:
        """Double the range until it covers ``new_radius``: old bin ``i`` -> ``(i + (f - 1) B) // f``."""
        nb = self.bins
        k = torch.round(torch.log2(new_radius / self.radius)).to(torch.int64).clamp(0, 40)
        factor = (2 ** k)[:, None]
        i = torch.arange(2 * nb, dtype=torch.int64)[None, :]
        new_idx = (i + (factor - 1) * nb) // factor
        self.hist = torch.zeros_like(self.hist).scatter_add_(1, new_idx, self.hist)
        self.radius = self.radius * (2.0 ** k).to(torch.float64)

    # -- histogram views (numpy, float64) ----------------------------------------------------------------
    def signed_hist(self, c: int):
        """``(edges, counts)`` of channel ``c`` over ``[-R, R]``."""
        r = float(self.radius[c])
        edges = np.linspace(-r, r, 2 * self.bins + 1)
        return edges, self.hist[c].numpy()

    def abs_hist(self, c: int):
        """``(edges, counts)`` of ``|x|`` over ``[0, R]`` (fold at 0, exact: 0 is a bin edge)."""
        h = self.hist[c].numpy()
        nb = self.bins
        counts = h[nb:] + h[:nb][::-1]
        return np.linspace(0.0, float(self.radius[c]), nb + 1), counts

    def pos_hist(self, c: int):
        """``(edges, counts)`` of ``x >= 0`` over ``[0, R]``."""
        nb = self.bins
        return np.linspace(0.0, float(self.radius[c]), nb + 1), self.hist[c].numpy()[nb:].copy()


def _quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The ``q``-quantile (0..1) of a histogram, linear inside the bin."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    cum = np.cumsum(counts)
    target = q * total
    j = int(np.searchsorted(cum, target, side="left"))
    j = min(j, len(counts) - 1)
    before = cum[j] - counts[j]
    frac = 0.0 if counts[j] == 0 else (target - before) / counts[j]
    return float(edges[j] + np.clip(frac, 0.0, 1.0) * (edges[j + 1] - edges[j]))


class PercentileObserver(HistogramObserver):
    """The ``percentile``-th percentile of ``|x|`` (signed), ``x`` (unsigned) or both tails (asymmetric)."""

    name = "percentile"

    def __init__(self, axis: Optional[int] = None, percentile: float = 99.99, bins: int = 2048):
        super().__init__(axis, bins)
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def _range(self, levelset):
        p = self.percentile / 100.0
        lo, hi = [], []
        for c in range(self.channels):
            if not levelset.symmetric:  # unsigned, uniform_asym, asymmetric APoT/PoT: both tails
                edges, counts = self.signed_hist(c)
                lo.append(_quantile(edges, counts, 1.0 - p))
                hi.append(_quantile(edges, counts, p))
            else:
                edges, counts = self.abs_hist(c)
                a = _quantile(edges, counts, p)
                lo.append(-a)
                hi.append(a)
        lo = torch.maximum(torch.tensor(lo, dtype=torch.float64), self.min_val)
        hi = torch.minimum(torch.tensor(hi, dtype=torch.float64), self.max_val)
        return lo, hi


# -- MSE ----------------------------------------------------------------------------------------------------
def histogram_quant_error(edges: np.ndarray, counts: np.ndarray, level_sets: np.ndarray) -> np.ndarray:
    """Sum of ``(x - Q(x))^2`` over a histogram for each row of ``level_sets`` (``(A, K)`` sorted real levels),
    ``Q`` = nearest level, values spread uniformly inside each bin.

    Exact under that assumption and ``O(A K)`` after prefix sums: with ``M_m(t)`` the ``m``-th moment of the data
    below ``t`` (prefix sums over whole bins plus the closed-form part of the bin holding ``t``), the cell of
    level ``q`` between thresholds ``t0 < t1`` contributes ``S2 - 2 q S1 + q^2 S0``, ``S_m = M_m(t1) - M_m(t0)``.
    """
    levels_ = np.asarray(level_sets, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    left, right = edges[:-1], edges[1:]
    width = right - left
    centre = (left + right) / 2.0
    # prefix moments over whole bins; a bin's uniform spread adds width^2 / 12 to its second moment
    zero = np.zeros(1)
    p0 = np.concatenate([zero, np.cumsum(counts)])
    p1 = np.concatenate([zero, np.cumsum(counts * centre)])
    p2 = np.concatenate([zero, np.cumsum(counts * (centre ** 2 + width ** 2 / 12.0))])

    def moments_below(t):
        t = np.clip(t, edges[0], edges[-1])
        j = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(counts) - 1)
        a, n = left[j], counts[j]
        frac = n * (t - a) / width[j]
        return (p0[j] + frac, p1[j] + frac * (a + t) / 2.0, p2[j] + frac * (t * t + t * a + a * a) / 3.0)

    thr = (levels_[:, 1:] + levels_[:, :-1]) / 2.0  # (A, K-1)
    inner = moments_below(thr)
    n_rows = levels_.shape[0]
    cum = [np.concatenate([np.zeros((n_rows, 1)), m, np.full((n_rows, 1), total)], axis=1)
           for m, total in zip(inner, (p0[-1], p1[-1], p2[-1]))]
    s0, s1, s2 = (np.diff(c, axis=1) for c in cum)  # per cell: (A, K)
    return np.sum(s2 - 2.0 * levels_ * s1 + levels_ ** 2 * s0, axis=1)


def _bins_prefix(radius: np.ndarray, counts: np.ndarray) -> tuple:
    """What :func:`_symmetric_bins_error` needs of the histograms alone (bin width, radius, prefix sums of the
    counts and of the first moment, total second moment): computed once per search, not once per candidate grid."""
    n_ch, n_bins = counts.shape
    width = (2.0 * radius / n_bins)[:, None]
    r = radius[:, None]
    centre = -r + (np.arange(n_bins)[None, :] + 0.5) * width
    zero = np.zeros((n_ch, 1))
    p0 = np.concatenate([zero, np.cumsum(counts, axis=1)], axis=1)
    p1 = np.concatenate([zero, np.cumsum(counts * centre, axis=1)], axis=1)
    total2 = np.sum(counts * (centre ** 2 + width ** 2 / 12.0), axis=1)
    return width, r, p0, p1, total2


def _symmetric_bins_error(radius: np.ndarray, counts: np.ndarray, levels_: np.ndarray,
                          prefix: tuple | None = None) -> np.ndarray:
    """:func:`histogram_quant_error` for many histograms at once, each with ``N`` equal bins over
    ``[-R_c, R_c]``: ``radius`` ``(C,)``, ``counts`` ``(C, N)``, ``levels_`` ``(C, A, K)`` -> errors ``(C, A)``.
    The bin holding a threshold is found arithmetically, so everything is vectorised over channels.

    With ``t_k`` the thresholds, ``M_m`` the moments below them and ``S_m`` their differences over each level's
    cell, the error is ``M_2(∞) - 2 Σ q S_1 + Σ q² S_0`` (the second moment only in total). Not summed by parts
    (``q_{K-1} M(∞) - Σ (q_{k+1} - q_k) M(t_k)``): with levels far beyond the data (the 5-bit PoT sets shifted by
    one grid integer reach ``-α/2^30``, so a search range of ``α`` ~1e9 covers a negative value of ~1) the terms
    ``q² M_0(∞)`` reach 1e18 and cancel to nothing but rounding: errors came out negative, and calibration chose
    the worst candidate (a transformer at PoT W5A5 fell from 97 % to 33 %)."""
    width, r, p0, p1, total2 = prefix if prefix is not None else _bins_prefix(radius, counts)
    n_ch, n_bins = counts.shape
    n_alpha, n_levels = levels_.shape[1], levels_.shape[2]
    # The arithmetic of the plain expressions, in the same order, in place where a temporary can be reused, and
    # the bin lookups as 1-D ``take``: the same values bit for bit, a third less time for 100 candidates at 8 bits.
    thr = levels_[:, :, 1:] + levels_[:, :, :-1]
    thr /= 2.0
    t = thr.reshape(n_ch, -1)  # (C, A * (K-1)) thresholds, clipped to the histogram
    np.clip(t, -r, r, out=t)
    pos = t + r
    pos /= width
    np.floor(pos, out=pos)
    np.clip(pos, 0, n_bins - 1, out=pos)
    j = pos.astype(np.int64)  # the bin holding each threshold
    a = j * width
    a += -r  # the bin's left edge
    if n_ch > 1:
        j_counts = j + (np.arange(n_ch) * n_bins)[:, None]
        j_prefix = j + (np.arange(n_ch) * (n_bins + 1))[:, None]
    else:
        j_counts = j_prefix = j
    frac = counts.ravel().take(j_counts)  # counts below the threshold inside its bin
    frac *= t - a
    frac /= width
    m0 = p0.ravel().take(j_prefix)
    m0 += frac
    a += t
    frac *= a
    frac /= 2.0
    m1 = p1.ravel().take(j_prefix)
    m1 += frac
    # the moments of each cell (between consecutive thresholds; the first from -inf, the last to +inf), then the
    # error cell by cell: a cell the data does not reach has moments exactly 0 (its thresholds clip to the same
    # edge), so a level far outside the histogram adds nothing, as it should
    cells0 = np.empty((n_ch, n_alpha, n_levels))
    cells1 = np.empty((n_ch, n_alpha, n_levels))
    for cells, m, total in ((cells0, m0, p0[:, -1:]), (cells1, m1, p1[:, -1:])):
        m = m.reshape(n_ch, n_alpha, n_levels - 1)
        cells[:, :, 0] = m[:, :, 0]
        np.subtract(m[:, :, 1:], m[:, :, :-1], out=cells[:, :, 1:-1])
        np.subtract(total, m[:, :, -1], out=cells[:, :, -1])
    s1 = np.einsum("cak,cak->ca", levels_, cells1)
    s0 = np.einsum("cak,cak->ca", levels_ * levels_, cells0)
    return total2[:, None] - 2.0 * s1 + s0


def _first_useful_point(radius, counts, base, alphas, prefix) -> int:
    """The first column of the candidate grid ``alphas`` ``(C, P)`` (ascending, last column ``alpha_max``) that can
    have the least error in some row: every column before it is provably worse, in every row, than the last.

    Levels ``alpha * base[c]`` map everything beyond their ends onto the end levels, so the error of a candidate is
    at least that of the values it clips, and the whole bins beyond its ends give a lower bound from suffix (and
    prefix) sums alone: for ``t = alpha * base[c, -1]``, ``Σ_{a_j >= t} n_j (a_j - t)^2`` (``a_j`` the left edges),
    the same below ``alpha * base[c, 0]`` with the right edges. A candidate whose bound exceeds the error of
    ``alpha_max`` (plus a margin of 1e-9 of the data's second moment, far above the rounding of these sums) cannot
    be the argmin, nor tie with it; so ``argmin`` over the remaining columns picks the same candidate as over all.
    At 8 bits the bound rules out most of the grid, where clipping alone costs more than rounding (the digits
    model's activations: the lower 80-99 of 100 points)."""
    width, r, _p0, _p1, total2 = prefix
    ref = _symmetric_bins_error(radius, counts, alphas[:, -1:, None] * base[:, None, :], prefix)[:, 0]
    # on bins merged 16 to 1 (a merged bin's left edge is at most, its right edge at least, those of the bins in
    # it: still a lower bound, a little weaker), which makes the bound cheap next to the candidates it removes
    n_ch = counts.shape[0]
    merge = 16 if counts.shape[1] % 16 == 0 else 1
    counts = counts.reshape(n_ch, -1, merge).sum(axis=2)
    width = width * merge
    n_bins = counts.shape[1]
    left = -r + np.arange(n_bins)[None, :] * width  # (C, N) left edges; right edges are left + width
    zero = np.zeros((n_ch, 1))
    # suffix sums over bins j.. of n, n·a, n·a² (left edges); prefix sums over bins ..j-1 of n, n·b, n·b² (right)
    s0 = np.concatenate([np.cumsum(counts[:, ::-1], axis=1)[:, ::-1], zero], axis=1)
    s1 = np.concatenate([np.cumsum((counts * left)[:, ::-1], axis=1)[:, ::-1], zero], axis=1)
    s2 = np.concatenate([np.cumsum((counts * left * left)[:, ::-1], axis=1)[:, ::-1], zero], axis=1)
    right = left + width
    q0 = np.concatenate([zero, np.cumsum(counts, axis=1)], axis=1)
    q1 = np.concatenate([zero, np.cumsum(counts * right, axis=1)], axis=1)
    q2 = np.concatenate([zero, np.cumsum(counts * right * right, axis=1)], axis=1)
    rows = np.arange(n_ch)[:, None]
    t_hi = alphas * base[:, -1:]
    j = np.clip(np.ceil((t_hi + r) / width), 0, n_bins).astype(np.int64)  # first bin with a_j >= t_hi
    bound = s2[rows, j] - 2.0 * t_hi * s1[rows, j] + t_hi * t_hi * s0[rows, j]
    t_lo = alphas * base[:, :1]
    j = np.clip(np.floor((t_lo + r) / width), 0, n_bins).astype(np.int64)  # bins before j have b_j <= t_lo
    bound += q2[rows, j] - 2.0 * t_lo * q1[rows, j] + t_lo * t_lo * q0[rows, j]
    margin = 1e-9 * (total2[:, None] + (t_hi * t_hi + t_lo * t_lo) * q0[:, -1:])
    useful = bound <= ref[:, None] + margin
    useful[:, -1] = True
    return int(np.argmax(useful, axis=1).min())


_PRUNE_LEVELS = 128  # level sets this large (7-8 bits) skip the grid points that clip too much (_first_useful_point)


def _batched_mse_search(radius, counts, base, alpha_max, points=100, refine=3, refine_points=21):
    """Per channel, ``argmin_alpha`` of the error of levels ``alpha * base[c]`` over ``(0, alpha_max[c]]``
    a ``points`` grid, then
    ``refine`` rounds of ``refine_points`` between the neighbours of the best point, all channels at once.
    The grid points that clip too much to win (:func:`_first_useful_point`) are not evaluated: the same result."""
    top = np.maximum(alpha_max, MIN_ALPHA)[:, None]
    grid = top * (np.arange(1, points + 1) / points)[None, :]
    rows = np.arange(len(top))
    prefix = _bins_prefix(radius, counts)
    # the bound costs a few candidates' worth; it pays off for the 255-256 levels of 8 bits (a search 1.6 -> 0.6 ms)
    first = _first_useful_point(radius, counts, base, grid, prefix) if base.shape[1] >= _PRUNE_LEVELS else 0
    alphas = grid[:, first:]
    for round_ in range(refine + 1):
        err = _symmetric_bins_error(radius, counts, alphas[:, :, None] * base[:, None, :], prefix)
        best = np.argmin(err, axis=1)
        if round_ == refine:
            break
        if round_ == 0:  # the neighbours on the full grid
            g = best + first
            lo = np.where(g > 0, grid[rows, np.maximum(g - 1, 0)], grid[:, 0] / 2.0)
        else:
            lo = np.where(best > 0, alphas[rows, np.maximum(best - 1, 0)], alphas[:, 0] / 2.0)
        hi = alphas[rows, np.minimum(best + 1, alphas.shape[1] - 1)]
        alphas = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, refine_points)[None, :]
    return np.where(alpha_max > MIN_ALPHA, alphas[rows, best], MIN_ALPHA)


class MSEObserver(HistogramObserver):
    """Clipping value of least mean squared quantization error, for any level set."""

    name = "mse"
    _CHANNELS_PER_STEP = 64  # bounds the (channels x candidates x levels) temporaries

    def _search_inputs(self, levelset):
        """``(radius, counts, base, alpha_max, extra)`` of :func:`_batched_mse_search` for ``levelset``, one row per
        channel; ``extra`` is what :meth:`_range_from_alpha` needs besides the searched ``alpha``."""
        radius = self.radius.numpy()
        cmin, cmax = self.min_val.numpy(), self.max_val.numpy()
        extra = None
        if levelset.scheme == "uniform_asym":
            rlo, rhi = np.minimum(cmin, 0.0), np.maximum(cmax, 0.0)
            full = clip_params_from_range(torch.from_numpy(rlo), torch.from_numpy(rhi), levelset)
            codes = np.arange(levelset.code_min, levelset.code_max + 1)[None, :]
            base = (codes - full.zero_point.numpy().reshape(-1, 1)) / levelset.denom
            alpha_max = rhi - rlo
            extra = (rlo, rhi, alpha_max)
        else:
            base = np.broadcast_to(levelset.values[None, :], (len(radius), levelset.num_levels))
            if levelset.signed and not levelset.symmetric:  # asymmetric APoT/PoT: alpha * [v[0], 1]
                alpha_max = np.maximum(np.maximum(cmax, 0.0), np.minimum(cmin, 0.0) / levelset.values[0])
            else:
                alpha_max = np.maximum(np.abs(cmin), np.abs(cmax)) if levelset.signed else np.maximum(cmax, 0.0)
        return radius, self.hist.numpy(), base, alpha_max, extra

    @staticmethod
    def _range_from_alpha(levelset, alpha, extra):
        if levelset.scheme == "uniform_asym":
            rlo, rhi, alpha_max = extra
            shrink = alpha / np.maximum(alpha_max, MIN_ALPHA)
            lo, hi = rlo * shrink, rhi * shrink
        else:
            lo, hi = alpha * levelset.values[0], alpha  # -alpha (symmetric), 0 (unsigned) or alpha * v[0]
        return torch.from_numpy(np.asarray(lo, dtype=np.float64)), torch.from_numpy(np.asarray(hi, dtype=np.float64))

    def _range(self, levelset):
        if _searches_zero_points(levelset):
            return self._asym_range(levelset)
        radius, counts, base, alpha_max, extra = self._search_inputs(levelset)
        alpha = np.empty(len(radius))
        step = max(1, self._CHANNELS_PER_STEP * 16 // levelset.num_levels)
        for c0 in range(0, len(radius), step):
            sl = slice(c0, c0 + step)
            alpha[sl] = _batched_mse_search(radius[sl], counts[sl], base[sl], alpha_max[sl])
        return self._range_from_alpha(levelset, alpha, extra)


    def _asym_range(self, levelset):
        """``uniform_asym`` with few levels: every zero point ``Z`` of the code range, each with its own
        least-error width, and the pair of least error. With 8 levels a zero point fixed from the full range is
        too coarse: a SiLU output over [-0.28, 3.93] got ``Z = 0`` (its negative 56 % clipped to 0, 2.8x the
        squared error of ``Z = 1``; digits at W8A3: 60.6 % where ``Z = 1`` gives 95.8 %)."""
        radius, counts = self.radius.numpy(), self.hist.numpy()
        rlo, rhi = np.minimum(self.min_val.numpy(), 0.0), np.maximum(self.max_val.numpy(), 0.0)
        codes = np.arange(levelset.code_min, levelset.code_max + 1, dtype=np.float64)
        denom = float(levelset.denom)
        base = (codes[None, :] - codes[:, None]) / denom  # row z: the levels of zero point codes[z], width 1
        above, below = base[:, -1], -base[:, 0]  # per width unit, the reach above and below 0
        lo, hi = np.empty(len(radius)), np.empty(len(radius))
        for c in range(len(radius)):
            with np.errstate(divide="ignore", invalid="ignore"):  # a zero point at an end covers one side only
                need = np.fmax(np.where(above > 0, rhi[c] / above, 0.0), np.where(below > 0, -rlo[c] / below, 0.0))
            rad = np.full(len(codes), radius[c])
            cnt = np.broadcast_to(counts[c], (len(codes), counts.shape[1]))
            alpha = _batched_mse_search(rad, cnt, base, need)
            err = _symmetric_bins_error(rad, np.ascontiguousarray(cnt), (alpha[:, None] * base)[:, None, :])[:, 0]
            best = int(np.argmin(err))
            lo[c], hi[c] = alpha[best] * base[best, 0], alpha[best] * base[best, -1]
        return torch.from_numpy(lo), torch.from_numpy(hi)


_ZERO_POINT_SEARCH_LEVELS = 32  # uniform_asym at up to 5 bits: 2^b zero points, each a width search (1.5 ms at 5 bits)


def _searches_zero_points(levelset) -> bool:
    return levelset.scheme == "uniform_asym" and levelset.num_levels <= _ZERO_POINT_SEARCH_LEVELS


def compute_qparams_many(jobs) -> list:
    """``[obs.compute_qparams(levelset) for obs, levelset in jobs]``, the same parameters, faster: the searches of
    per-tensor :class:`MSEObserver` jobs with the same level set and bin count run as the rows of one
    :func:`_batched_mse_search` (a row's result does not depend on the others): fewer, larger numpy calls (the
    digits model's 8 activation searches in the pipeline: 5.6 -> 4.5 ms)."""
    results: list = [None] * len(jobs)
    groups: dict = {}
    for i, (obs, levelset) in enumerate(jobs):
        if type(obs) is MSEObserver and obs.axis is None and obs.hist is not None and not levelset.offset \
                and not _searches_zero_points(levelset):
            obs._check(None)
            groups.setdefault((id(levelset), obs.hist.shape[1]), []).append((i, obs._search_inputs(levelset)))
        else:
            results[i] = obs.compute_qparams(levelset)
    for members in groups.values():
        levelset = jobs[members[0][0]][1]
        step = max(1, MSEObserver._CHANNELS_PER_STEP * 32 // levelset.num_levels)
        for m0 in range(0, len(members), step):
            part = members[m0:m0 + step]
            radius, counts, base, alpha_max = (np.concatenate([inp[k] for _, inp in part]) for k in range(4))
            alpha = _batched_mse_search(radius, counts, base, alpha_max)
            for row, (i, inp) in enumerate(part):
                lo, hi = MSEObserver._range_from_alpha(levelset, alpha[row:row + 1], inp[4])
                params = clip_params_from_range(lo, hi, levelset)
                results[i] = ClipParams(*(t.reshape(()) for t in params))
    return results


# -- KL -----------------------------------------------------------------------------------------------------
def _kl_divergence(counts: np.ndarray, mags: np.ndarray, width: float, i: int, eps: float = 1e-4) -> float:
    """``KL(P || Q)`` for clip bin ``i`` (TensorRT, as in MXNet's ``_get_optimal_threshold``): ``P`` = bins
    ``[0, i)`` with the outliers added to bin ``i - 1``; ``Q`` = the raw bins merged per nearest level of
    ``mags * i * width`` and spread back evenly over the bins where ``P`` is non-zero. Empty bins of either get
    ``eps`` counts before normalising, so the divergence stays finite."""
    ref = counts[:i].astype(np.float64)
    ref[i - 1] += counts[i:].sum()
    raw = counts[:i]
    centers = (np.arange(i) + 0.5) * width
    mids = (mags[1:] + mags[:-1]) / 2.0 * (i * width)
    group = np.searchsorted(mids, centers, side="left")
    nonzero = ref != 0
    mass = np.bincount(group, weights=raw, minlength=len(mags))
    occupied = np.bincount(group, weights=nonzero.astype(np.float64), minlength=len(mags))
    expand = np.where(nonzero, mass[group] / np.maximum(occupied[group], 1.0), 0.0)
    p = np.where(ref == 0, eps, ref)
    q = np.where(expand == 0, eps, expand)
    p /= p.sum()
    q /= q.sum()
    return float(np.sum(p * np.log(p / q)))


def kl_threshold(edges: np.ndarray, counts: np.ndarray, magnitudes: np.ndarray, stride_target: int = 256) -> float:
    """TensorRT entropy calibration on a non-negative histogram, generalised to any level set.

    ``magnitudes``: the non-negative normalised levels (``0`` included where the set has it). Candidate clip
    bins run from ``len(magnitudes)`` (TensorRT: 128 for int8) to the last non-empty bin; they are scanned with a
    stride that keeps about ``stride_target`` evaluations, then every bin around the best one. Returns the clip
    value (an upper bin edge)."""
    nz = np.nonzero(counts)[0]
    if len(nz) == 0:
        return MIN_ALPHA
    last = int(nz[-1]) + 1
    width = float(edges[1] - edges[0])
    mags = np.asarray(magnitudes, dtype=np.float64)
    start = max(2, len(mags))
    if last <= start:
        return float(last * width)
    stride = max(1, (last - start) // stride_target)
    coarse = list(range(start, last + 1, stride))
    if coarse[-1] != last:
        coarse.append(last)
    kls = [_kl_divergence(counts, mags, width, i) for i in coarse]
    best = coarse[int(np.argmin(kls))]
    fine = range(max(start, best - stride + 1), min(last, best + stride - 1) + 1)
    candidates = {i: kl for i, kl in zip(coarse, kls)}
    for i in fine:
        if i not in candidates:
            candidates[i] = _kl_divergence(counts, mags, width, i)
    best = min(candidates, key=lambda i: (candidates[i], i))
    return float(best * width)


class KLObserver(HistogramObserver):
    """TensorRT entropy (KL-divergence) calibration.

    Symmetric and unsigned level sets: the threshold of |x| (or of x > 0) against the set's own levels.
    Asymmetric uniform levels (a signed model input, say): each side's own threshold, of ``x >= 0`` and of
    ``-x`` for ``x < 0``, against the non-negative half of the symmetric levels of the same bit-width (a skewed
    tensor keeps its short side whole, as with min/max). One threshold of |x| for both sides clipped the long side
    at the short one's mass: a standardized digit image (29 % background at -0.75, ink up to 1.75) got [-0.75,
    0.75], a quarter of its values clipped, and a residual CNN fell from 37.3 to 8.1 dB at W8A8.

    Exact zeros are left out of the histogram: every set holds 0, so they are exact whatever the threshold, and
    a ReLU output's spike of zeros in the first bin (42 % of ReLU(N(0.2, 1))) otherwise pulls the threshold down
    (there: 2.95 instead of 4.23, 40x the squared error at 8 bits; TensorRT's own calibrator flattens that bin
    for the same reason)."""

    name = "kl"
    asymmetric_levels = False

    def __init__(self, axis: Optional[int] = None, bins: int = 2048):
        super().__init__(axis, bins)
        self.zeros = None  # (C,) count of x == 0 (bins cannot tell 0 from small positives)

    def _observe(self, rows, bmin, bmax):
        super()._observe(rows, bmin, bmax)
        z = (rows == 0).sum(dim=1).to(torch.float64)
        self.zeros = z if self.zeros is None else self.zeros + z

    def _range(self, levelset):
        asym = levelset.scheme == "uniform_asym"
        ref = levelset
        if asym:
            from .levels import level_set

            ref = level_set("uniform", levelset.bits, True)
            one_sided = level_set("uniform", levelset.bits, False).values
        mags = ref.values[ref.values >= 0]
        lo, hi = [], []
        for c in range(self.channels):
            if ref.signed and self._skewed(c):
                mn, mx = float(self.min_val[c]), float(self.max_val[c])
                alpha = self._long_side_threshold(c, one_sided if asym else mags)
                if not asym:  # a symmetric signed set: the long side's threshold for both
                    lo.append(-alpha)
                    hi.append(alpha)
                else:  # the short side kept whole, as with min/max
                    lo.append(mn if mx >= -mn else max(mn, -alpha))
                    hi.append(min(mx, alpha) if mx >= -mn else mx)
                continue
            if asym:  # each side its own threshold (see the class doc), against the symmetric set's half
                lo.append(max(float(self.min_val[c]), -self._side_threshold(c, False, mags)))
                hi.append(min(float(self.max_val[c]), self._side_threshold(c, True, mags)))
                continue
            edges, counts = self.abs_hist(c) if ref.signed else self.pos_hist(c)
            counts = counts.copy()
            counts[0] = max(0.0, counts[0] - float(self.zeros[c]))  # 0 falls in bin 0 of either view
            alpha = kl_threshold(edges, counts, mags)
            lo.append(-alpha if levelset.signed else 0.0)
            hi.append(alpha)
        return torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)

    SKEW = 0.25  # a side at most this fraction of the other's extent is the short side of a one-sided tensor

    def _skewed(self, c: int) -> bool:
        mn, mx = float(self.min_val[c]), float(self.max_val[c])
        return min(max(-mn, 0.0), max(mx, 0.0)) <= self.SKEW * max(-mn, mx)

    def _side_threshold(self, c: int, positive: bool, levels) -> float:
        """The threshold of one side of channel ``c`` (``x >= 0`` or ``x < 0``, as magnitudes) alone."""
        nb = self.bins
        h = self.hist[c].numpy()
        counts = (h[nb:] if positive else h[:nb][::-1]).copy()
        if positive:  # exact zeros fall in the first non-negative bin
            counts[0] = max(0.0, counts[0] - float(self.zeros[c]))
        return kl_threshold(np.linspace(0.0, float(self.radius[c]), nb + 1), counts, levels)

    def _long_side_threshold(self, c: int, levels) -> float:
        """A one-sided tensor on signed levels (GELU/SiLU outputs: values down to -0.17 beside values up to 4.7):
        the threshold of its long side alone, against the levels that side gets (asymmetric uniform: nearly all of
        the unsigned set; a symmetric set: its non-negative half). Folded into |x|, GELU's many small negatives (71 %
        of a residual MLP's values) pulled the threshold down to about |min|: a range of 0.18 for values up to 4.7
        (logits 5 dB from float instead of 26 at APoT W4A4, 20 instead of 32 at W8A8)."""
        mn, mx = float(self.min_val[c]), float(self.max_val[c])
        nb = self.bins
        h = self.hist[c].numpy()
        counts = (h[nb:] if mx >= -mn else h[:nb][::-1]).copy()
        counts[0] = max(0.0, counts[0] - float(self.zeros[c]))
        return kl_threshold(np.linspace(0.0, float(self.radius[c]), nb + 1), counts, levels)


# -- Laplace (Banner) ---------------------------------------------------------------------------------------
def banner_laplace_ratio(bits: int, signed: bool = True) -> float:
    """``alpha / b`` minimising Banner's approximate Laplace(0, b) error for ``bits``-bit uniform levels:
    the root of ``t e^t = 3 * 4^bits`` (two-sided) or ``t e^t = 12 * 4^bits`` (one-sided, unsigned)."""
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    rhs = (3.0 if signed else 12.0) * 4.0 ** bits
    t = math.log(rhs)  # Newton on g(t) = t + ln t - ln(rhs), increasing and concave
    for _ in range(60):
        step = (t + math.log(t) - math.log(rhs)) / (1.0 + 1.0 / t)
        t -= step
        if abs(step) < 1e-14:
            break
    return t


class LaplaceObserver(HistogramObserver):
    """Banner et al.'s analytic clipping for Laplace-distributed data (lecture: 2.83b, 3.89b, 5.03b)."""

    name = "laplace"
    asymmetric_levels = False

    def __init__(self, axis: Optional[int] = None, bins: int = 2048):
        super().__init__(axis, bins)
        self.n_pos = None  # count of x > 0 (bins cannot tell 0 from small positives)
        self.sum_pos = None

    def _observe(self, rows, bmin, bmax):
        super()._observe(rows, bmin, bmax)
        if self.n_pos is None:
            self.n_pos = torch.zeros(rows.shape[0], dtype=torch.float64)
            self.sum_pos = torch.zeros(rows.shape[0], dtype=torch.float64)
        pos = rows > 0
        self.n_pos += pos.sum(dim=1).to(torch.float64)
        self.sum_pos += torch.where(pos, rows, 0.0).sum(dim=1, dtype=torch.float64)

    def laplace_b(self, c: int, signed: bool = True, about_zero: bool = False) -> float:
        """The Laplace scale: ``E|x - median|`` (two-sided), ``E|x|`` (two-sided about 0: the clip of a symmetric
        set is centred there) or ``E[x | x > 0]`` (one-sided)."""
        if not signed:
            n = float(self.n_pos[c])
            return float(self.sum_pos[c]) / n if n > 0 else 0.0
        edges, counts = self.signed_hist(c)
        med = 0.0 if about_zero else _quantile(edges, counts, 0.5)
        a, b = edges[:-1], edges[1:]
        centre = (a + b) / 2.0
        dev = np.abs(centre - med)
        inside = (a < med) & (med < b)  # the bin holding the median: exact mean of |u - med| for uniform u
        dev = np.where(inside, ((b - med) ** 2 + (med - a) ** 2) / (2.0 * (b - a)), dev)
        total = counts.sum()
        return float((counts * dev).sum() / total) if total > 0 else 0.0

    def _range(self, levelset):
        two_sided = levelset.signed or levelset.scheme == "uniform_asym"
        ratio = banner_laplace_ratio(levelset.bits, signed=two_sided)
        lo, hi = [], []
        for c in range(self.channels):
            # a symmetric set clips about 0, so the scale is measured about 0 too: about the median, data off
            # centre (N(5, 1): b ~ 0.8 for a clip at ±4, 11 dB against minmax's 23) or constant (b = 0: every value
            # became the smallest range) was clipped far inside itself
            b = self.laplace_b(c, two_sided, about_zero=levelset.signed and levelset.scheme != "uniform_asym")
            if levelset.scheme == "uniform_asym":
                edges, counts = self.signed_hist(c)
                med = _quantile(edges, counts, 0.5)
                lo.append(max(med - ratio * b, float(self.min_val[c])))
                hi.append(min(med + ratio * b, float(self.max_val[c])))
            else:  # never past the data: a clip beyond max|x| only coarsens the levels the data uses
                top = max(abs(float(self.min_val[c])), abs(float(self.max_val[c]))) if levelset.signed \
                    else max(float(self.max_val[c]), 0.0)
                clip = min(ratio * b, top) if top > 0 else ratio * b
                lo.append(-clip if levelset.signed else 0.0)
                hi.append(clip)
        return torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)


# -- SDQ ----------------------------------------------------------------------------------------------------
class SDQObserver(Observer):
    """SDQ's ``k * sigma`` clipping (eq. 1-2): ``sigma`` the spread about 0, ``sqrt(E[x²])``, of signed data (the clip
    is centred at 0) and of the mirrored positive part, ``sqrt(E[x² | x > 0])``, of non-negative data."""

    name = "sdq"
    asymmetric_levels = False

    def __init__(self, axis: Optional[int] = None, k: float = 3.0):
        super().__init__(axis)
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        self.k = k
        self.s1 = self.s2 = self.n_pos = self.s2_pos = None

    def _observe(self, rows, bmin, bmax):
        rows = rows.double()  # x² of float32 activations past ~1.8e19 is inf (clip inf, a NaN bias in the file)
        square = rows * rows
        pos = rows > 0
        stats = (rows.sum(1, dtype=torch.float64), square.sum(1, dtype=torch.float64),
                 pos.sum(1).to(torch.float64), torch.where(pos, square, 0.0).sum(1, dtype=torch.float64))
        if self.s1 is None:
            self.s1, self.s2, self.n_pos, self.s2_pos = stats
        else:
            self.s1, self.s2, self.n_pos, self.s2_pos = (a + b for a, b in
                                                         zip((self.s1, self.s2, self.n_pos, self.s2_pos), stats))

    def sigma(self, mirrored: bool, about_zero: bool = False) -> torch.Tensor:
        """σ of the mirrored positive part, about 0 (``about_zero``: the centre of a symmetric set's clip, SDQ's
        zero mean), or about the mean."""
        if mirrored:
            return torch.sqrt(self.s2_pos / self.n_pos.clamp(min=1.0))
        if about_zero:
            return torch.sqrt(self.s2 / self.count)
        mean = self.s1 / self.count
        return torch.sqrt(torch.clamp(self.s2 / self.count - mean * mean, min=0.0))

    def _range(self, levelset):
        non_negative = bool((self.min_val >= 0).all())
        mirrored = non_negative or (not levelset.signed and levelset.scheme != "uniform_asym")
        # a symmetric signed set clips about 0: σ about the mean clipped data off centre inside itself (N(-5, 1):
        # ±3, 7 dB, where its mirror image N(5, 1) got ±9 and 23 dB; a negative constant: every code 0)
        clip = self.k * self.sigma(mirrored, about_zero=levelset.signed and levelset.scheme != "uniform_asym")
        if levelset.scheme == "uniform_asym":
            mean = self.s1 / self.count
            centre = torch.zeros_like(mean) if mirrored else mean
            return torch.maximum(centre - clip, self.min_val), torch.minimum(centre + clip, self.max_val)
        # never past the data (k·σ of uniform data is 1.7x its max): a clip beyond max|x| only coarsens the levels
        top = torch.maximum(self.min_val.abs(), self.max_val.abs()) if levelset.signed \
            else self.max_val.clamp(min=0.0)
        clip = torch.where(top > 0, torch.minimum(clip, top.to(clip.dtype)), clip)
        return (-clip if levelset.signed else torch.zeros_like(clip)), clip


# -- data-free ----------------------------------------------------------------------------------------------
def bn_range(beta: torch.Tensor, gamma: torch.Tensor, k: float = 6.0):
    """Per-channel range ``(beta - k |gamma|, beta + k |gamma|)`` of a BatchNorm output (lecture, k = 6)."""
    beta = torch.as_tensor(beta, dtype=torch.float64)
    gamma = torch.as_tensor(gamma, dtype=torch.float64).abs()
    return beta - k * gamma, beta + k * gamma


def bn_qparams(beta: torch.Tensor, gamma: torch.Tensor, levelset: LevelSet, k: float = 6.0,
               per_channel: bool = False) -> ClipParams:
    """Quantizer parameters from :func:`bn_range` (per tensor: the union of the channel ranges)."""
    lo, hi = bn_range(beta, gamma, k)
    if not per_channel:
        lo, hi = lo.min(), hi.max()
    return clip_params_from_range(lo, hi, levelset)


OBSERVERS = {
    "minmax": MinMaxObserver,
    "ema": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
    "laplace": LaplaceObserver,
    "sdq": SDQObserver,
}


def make_observer(name: str, **kwargs) -> Observer:
    """A new observer by name: ``minmax``, ``ema``, ``percentile``, ``mse``, ``kl``, ``laplace``, ``sdq``."""
    try:
        cls = OBSERVERS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown calibration method {name!r}; choose one of {', '.join(OBSERVERS)}") from None
    return cls(**kwargs)
