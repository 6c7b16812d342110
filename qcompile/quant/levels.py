"""Level sets of every quantization scheme, as integers on a uniform fine grid.

A level set is the finite set ``Q`` that a clipped, normalised tensor is projected onto
(APoT paper, "Clipping and Projection": ``W_hat = alpha * Pi_Q(clip(W / alpha, -1, 1))``). Every set here is
stored exactly as integers ``grid`` over one denominator ``denom``::

    normalised level = grid_int / denom          (largest magnitude = 1)
    real level       = float32(grid_int * unit), unit = float32(alpha / denom)

so the export and the shift-add lowering can work on integers. ``level_set(scheme, bits, signed)`` returns a
cached, frozen :class:`LevelSet`; ``levels(...)`` its normalised values.

Schemes
-------
``apot`` -- additive powers of two (Li, Dong, Wang, ICLR 2020), identical to the authors' public
    ``build_power_value(B, additive=True)`` and its callers in ``quant_layer.py``: unsigned tensors
    (activations) use ``B = bits`` magnitude bits; signed tensors (weights) use a sign bit plus ``B = bits - 1``
    magnitude bits, levels ``{0, +-m}`` (``2**bits - 1`` levels). The authors build ``B`` bits from
    ``n = ceil(B / 2)`` additive terms of ``k = 2`` bits each (the slides' "generalized definition": n terms of
    k-bit values), one of them a 1-bit term when ``B`` is odd. Each term is 0 or one power of two; the exponents
    ``1, 2, 3, ...`` are dealt out round-robin in three rounds (rounds 0 and 1 to the 2-bit terms; in round 2 the
    1-bit term first, then the 2-bit terms). Every level is then a distinct binary fraction, so there are exactly
    ``2**B`` levels, normalised by the largest. What each bit-width means:

    ====  =========================  ==========================================  =============================
    B     authors' code              terms (exponents)                           ours
    ====  =========================  ==========================================  =============================
    1     NaN (``{0}/0``) in the     one 1-bit term (1)  -> {0, 1}               defined: {0, 1}; as signed
          CIFAR code; the ImageNet                                               2-bit weights {-1, 0, 1},
          code special-cases 2-bit                                               the ImageNet code's uniform
          weights as uniform ternary                                             ternary -- same set
    2     {0, 1/4, 1/2, 1}           a(1,2,3)                                    same (= PoT)
    3     x 1/10: {0,1,2,3,4,6,8,10} a(1,2,4) b(3)                               same
    4     x 1/48, 16 levels          a(1,3,5) b(2,4,6)                           same
    5     x 1/100, 32 levels         a(1,3,6) b(2,4,7) c(5)                      same
    6     x 1/448, 64 levels         a(1,4,7) b(2,5,8) c(3,6,9)                  same
    7     NaN (``{0}/0``)            a(1,4,8) b(2,5,9) c(3,6,10) d(7)            extension, x 1/904
    8     NaN (``{0}/0``)            a(1,5,9) b(2,6,10) c(3,7,11) d(4,8,12)      extension, x 1/3840
    ====  =========================  ==========================================  =============================

    (Older revisions raise ``NotImplementedError`` where later ones silently return NaN.) So 2-bit APoT means
    ``{-1, 0, 1}`` for weights and ``{0, 1/4, 1/2, 1}`` for activations, and 7- and 8-bit use the same
    construction continued (n = 4 terms); bits 2..8 are all defined, signed and unsigned.
``pot`` -- powers of two, the authors' ``additive=False`` sets: ``B`` magnitude bits give
    ``{0} U {2**-i : i = 0 .. 2**B - 2}`` (same ``B`` rule for signed/unsigned). The smallest level halves with
    every level added, so the integer grid needs ``2**B - 1`` bits: we support the widths whose grid fits 32 bits
    (signed 2..6 bits, unsigned 2..5 bits: the APoT paper's PoT 5/5 ablation; levels down to ``2**-30``, every one
    and every decision threshold exact in float32) and refuse wider ones (``apot`` is the scheme for more bits; an
    8-bit PoT set's smallest levels, ``2**-254``, are not even float32 numbers).
``uniform`` -- signed: the restricted symmetric range ``{-(2**(b-1) - 1) .. 2**(b-1) - 1} / (2**(b-1) - 1)``
    of the APoT code's ``uniform_quantization`` and of SDQ eq. 4 (``L_P = L_N = 2**(b-1) - 1``); unsigned:
    ``{0 .. 2**b - 1} / (2**b - 1)`` (SDQ eq. 4 with ``L_N = 0``).
``uniform_asym`` -- asymmetric linear quantization ``r = S (q - Z)`` of the lecture (Jacob et al.), with
    ``S = (r_max - r_min) / (q_max - q_min)``, ``Z = round(q_min - r_min / S)``. Stored codes ``q`` cover
    ``[-2**(b-1), 2**(b-1) - 1]`` when ``signed`` (the lecture's table) or ``[0, 2**b - 1]`` otherwise.
    Convention: ``grid = 0 .. 2**b - 1`` (normalised levels in ``[0, 1]``: the position inside
    ``[r_min, r_max]``), ``denom = 2**b - 1`` and ``LevelSet.zero_point = q_min``, so the stored code of grid
    integer ``g`` is ``g + zero_point``. The quantizer's data-dependent zero point ``Z`` (the real value 0 sits at
    code ``Z``) is a separate parameter of ``quantize``; its default ``Z = zero_point`` means the range
    ``[0, alpha]``. For this scheme ``alpha = r_max - r_min`` (the range width), so ``unit = alpha / denom = S``.
``log2`` -- SDQ base-2 logarithmic quantization (Ardakani et al., sec. 2.2, eq. 9-10): levels
    ``{0, +-2**k : k = 0 .. 2**(b-1) - 2} / L_p2`` with ``L_p2 = 2**(2**(b-1) - 2)``, e.g. 3 bits
    ``{0, +-1, +-2, +-4} / 4``. This is the same set as signed ``pot``. SDQ defines it for weights only; for
    unsigned tensors we use the analogous ``{0, 2**k : k = 0 .. 2**b - 2}`` (= unsigned ``pot``). Like ``pot``
    it is limited to grids that fit 32 bits (signed 2..6, unsigned 2..5 bits). Note: SDQ's eq. 9 rounds in the
    log domain (decision between ``2**k`` and ``2**(k+1)`` at ``2**(k + 1/2)``); we project every scheme to the
    *nearest level* (linear midpoints), which minimises the squared error of the same level set and lets all
    schemes share one decision rule. :func:`sdq_log2_reference` implements eq. 9-10 literally for comparison.
``ternary`` -- ``{-1, 0, 1}`` (TWN, Li et al. 2016; see ``ops.twn_ternarize`` for its threshold
    ``Delta = 0.7 E|w|`` and scale ``r_t``), 2-bit storage whatever ``bits`` says; signed only.
``binary`` -- ``{-1, +1}`` (BinaryConnect / XNOR-Net, ``sign(w) * E|w|``), ``bits`` is recorded as 1; signed only.

Asymmetric APoT / PoT / log2 (``level_set(scheme, bits, offset=o)``)
-------------------------------------------------------------------
The signed sets above are symmetric: on a tensor that is mostly positive but can be negative (SiLU, GELU,
Hardswish outputs: minimum -0.28 / -0.17 / -0.375) half of their levels cover a side that holds almost nothing.
Uniform levels answer that with a zero point (``uniform_asym``); the non-uniform schemes get the same idea in
integers: the unsigned ``bits``-bit set shifted down by one of its own grid integers ``o`` (``0 < o <= denom / 2``,
:func:`asymmetric_offsets`): ``grid = unsigned grid - o``, ``denom = unsigned denom - o``. Real 0 stays a level
(the grid integer 0), the dense small levels sit around it, the unsigned levels below ``o`` become the negative
ones (down to ``-o``), and every level count,
tie rule and emission form is the one of any other grid (4-bit APoT, ``o = 3``: ``{-3, -2, -1, 0, 1, 3, 5, 6, 9,
13, 15, 21, 29, 30, 33, 45} / 45``, 16 levels against the symmetric set's 15). ``alpha`` is the largest level; the
lowest is ``-alpha * o / denom``. Calibration picks ``o`` (or the symmetric set) per activation by the least
squared error on the observed histogram (``passes/calibrate.py``). The shifted positive levels are no longer sums
of powers of two; only weights need that (the shift-add lowering multiplies integer activation codes by them).

Decision rule (shared by the simulation, the ONNX export and the integer lowering)
---------------------------------------------------------------------------------
Nearest level. At an exact tie between neighbouring grid integers ``lo < hi`` (the threshold is the midpoint
``(lo + hi) / 2``), the tie goes to the *even* one; if both are even or both odd, to the one of smaller magnitude;
if even the magnitudes are equal (only ``binary``: -1 | +1 at 0) it goes up, so ``sign(0) = +1`` as in the
lecture's binarization. On consecutive integers this is round-half-to-even, what ``torch.round`` and ONNX
``QuantizeLinear`` do. ``LevelSet.thresholds`` (midpoints, exact half-integers) and ``LevelSet.tie_up``
carry the rule; ``ops.decision_thresholds`` turns them into the float32 constants that the quantizer and the
ONNX emitter compare against.

Integer grid and storage (``grid`` range; ``storage_dtype`` of the stored codes)
-------------------------------------------------------------------------------
======  ======================================  ======================================
bits    signed (weights)                        unsigned (activations)
======  ======================================  ======================================
apot    2: +-1 int2; 3: +-4 int4; 4: +-10,      2: 0..4 uint4; 3: 0..10 uint4;
        5: +-48, 6: +-100 int8;                 4: 0..48, 5: 0..100 uint8;
        7: +-448, 8: +-904 int16                6: 0..448, 7: 0..904, 8: 0..3840 uint16
pot /   2: +-1 int2; 3: +-4 int4; 4: +-64       2: 0..4 uint4; 3: 0..64 uint8;
log2    int8; 5: +-16384 int16; 6: +-2**30      4: 0..16384 uint16; 5: 0..2**30
        int32; >6 refused                       int32; >5 refused
uniform +-(2**(b-1) - 1): int2/int4/int8        0..2**b - 1: uint2/uint4/uint8
u_asym  codes -2**(b-1)..2**(b-1)-1: int*       codes 0..2**b - 1: uint*
ternary +-1 int2                                refused
binary  +-1 int2                                refused
======  ======================================  ======================================

Everything with at most 8 bits of grid fits int8/uint8; APoT at 7-8 bits (and unsigned 6), PoT/log2 at
signed 5 / unsigned 4 bits need 16-bit integers, PoT/log2 at signed 6 / unsigned 5 bits 32-bit ones (the file
dequantizes those with ``Cast`` and ``Mul``: onnxruntime has no int32 ``QuantizeLinear``, see ``qcompile.emit``). ``docs/levels.md`` prints the full table from this module.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Optional

import numpy as np

SCHEMES = ("apot", "pot", "uniform", "uniform_asym", "log2", "ternary", "binary")
MIN_BITS, MAX_BITS = 2, 8

# Storage types from small to large; ONNX (>= 1.20) has tensor types for each of them.
_STORAGE = (("int2", -2, 1), ("uint2", 0, 3), ("int4", -8, 7), ("uint4", 0, 15),
            ("int8", -128, 127), ("uint8", 0, 255), ("int16", -32768, 32767), ("uint16", 0, 65535),
            ("int32", -2 ** 31, 2 ** 31 - 1))


@dataclasses.dataclass(frozen=True)
class LevelSet:
    """A level set on an integer grid: normalised levels ``grid / denom``, largest magnitude 1.

    ``zero_point`` is 0 except for ``uniform_asym``, where it is the storage offset ``q_min``: the stored code of
    grid integer ``g`` is ``g + zero_point`` (see the module docstring).
    """

    scheme: str
    bits: int
    signed: bool
    grid: tuple  # sorted distinct ints
    denom: int
    zero_point: int = 0
    offset: int = 0  # > 0: the unsigned set shifted down by this grid integer (asymmetric APoT/PoT, see below)

    def __post_init__(self):
        if list(self.grid) != sorted(set(self.grid)) or len(self.grid) < 2:
            raise ValueError(f"grid of {self.scheme} must be sorted, distinct and have >= 2 levels")
        if max(abs(g) for g in self.grid) != self.denom:
            raise ValueError(f"grid of {self.scheme} must have largest magnitude == denom ({self.denom})")

    # -- levels ---------------------------------------------------------------------------------------------
    @functools.cached_property
    def values(self) -> np.ndarray:
        """Normalised levels (float64, sorted), ``grid / denom``."""
        out = np.asarray(self.grid, dtype=np.float64) / self.denom
        out.flags.writeable = False
        return out

    @property
    def num_levels(self) -> int:
        return len(self.grid)

    @functools.cached_property
    def is_uniform(self) -> bool:
        """Consecutive integers: quantize by ``round(x / unit)`` (ONNX ``QuantizeLinear``)."""
        return all(b - a == 1 for a, b in zip(self.grid, self.grid[1:]))

    @functools.cached_property
    def symmetric(self) -> bool:
        """Levels mirror around 0 (``grid[0] == -grid[-1]``): a signed set whose range is ``[-alpha, alpha]``."""
        return self.grid[0] == -self.grid[-1]

    @property
    def qmin(self) -> int:
        """Smallest grid integer."""
        return self.grid[0]

    @property
    def qmax(self) -> int:
        """Largest grid integer."""
        return self.grid[-1]

    @property
    def code_min(self) -> int:
        """Smallest stored code (``qmin + zero_point``)."""
        return self.grid[0] + self.zero_point

    @property
    def code_max(self) -> int:
        """Largest stored code (``qmax + zero_point``)."""
        return self.grid[-1] + self.zero_point

    @property
    def storage_dtype(self) -> str:
        """Smallest of int2/uint2/int4/uint4/int8/uint8/int16/uint16 that holds every stored code."""
        lo, hi = self.code_min, self.code_max
        for width in (2, 4, 8, 16, 32):
            order = ("int",) if width == 32 else ("int", "uint") if self.signed else ("uint", "int")
            for kind in order:
                name = f"{kind}{width}"
                _, tmin, tmax = next(s for s in _STORAGE if s[0] == name)
                if tmin <= lo and hi <= tmax:
                    return name
        raise ValueError(f"{self.scheme} {self.bits}-bit codes {lo}..{hi} do not fit 32 bits")

    # -- decisions ------------------------------------------------------------------------------------------
    @functools.cached_property
    def thresholds(self) -> np.ndarray:
        """Decision thresholds on the grid: midpoints ``(g[j] + g[j+1]) / 2`` (exact half-integers, float64)."""
        g = np.asarray(self.grid, dtype=np.float64)
        out = (g[:-1] + g[1:]) / 2.0
        out.flags.writeable = False
        return out

    @functools.cached_property
    def tie_up(self) -> np.ndarray:
        """For each threshold: True if an input exactly on it goes to the upper level (the tie rule)."""
        out = np.array([_tie_goes_up(lo, hi) for lo, hi in zip(self.grid, self.grid[1:])], dtype=bool)
        out.flags.writeable = False
        return out

    @functools.cached_property
    def requant_cells(self) -> tuple[int, np.ndarray] | None:
        """``(z, table)`` for deciding the nearest level from an integer accumulator (``BindIntegerLayers``), or
        ``None`` where the thresholds span more than 254 half-units (or the set is uniform).

        In half-units ``k = x / (unit / 2)`` every threshold is an integer ``k_j = g_j + g_j+1``. The uint8 cell
        ``c = clamp(round_half_even(k - 1/2) + z, 0, 255)`` holds the values between half-units ``c - z`` and
        ``c - z + 1``, so each threshold is a boundary between two cells, never inside one; ``z = 1 - k_0`` puts the
        values below the first threshold in cell 0. ``table[c]`` (256 grid integers) is the level of cell ``c``:
        ``grid[#{j : k_j <= c - z}]``. A value exactly on a threshold goes to the cell ``round_half_even`` picks
        (the integer kernel's rounding, not the tie rule)."""
        if self.is_uniform:
            return None
        g = np.asarray(self.grid, dtype=np.int64)
        k = g[:-1] + g[1:]
        z = int(1 - k[0])
        if not 0 <= z <= 255 or int(k[-1] - k[0]) + 1 > 255:
            return None
        cells = np.arange(256, dtype=np.int64) - z
        table = g[np.searchsorted(k, cells, side="right")]
        table.flags.writeable = False
        return z, table

    def describe(self) -> str:
        sign = "signed" if self.signed else "unsigned"
        if self.offset:
            sign = f"asymmetric (unsigned - {self.offset})"
        return (f"{self.scheme} {self.bits}-bit {sign}: {self.num_levels} levels, grid/{self.denom}, "
                f"{self.storage_dtype}")


def _tie_goes_up(lo: int, hi: int) -> bool:
    """The tie rule between neighbouring grid integers ``lo < hi``."""
    lo_even, hi_even = lo % 2 == 0, hi % 2 == 0
    if lo_even != hi_even:
        return hi_even
    if abs(lo) != abs(hi):
        return abs(hi) < abs(lo)
    return True  # -m | +m (binary at 0): sign(0) = +1


# -- constructions ------------------------------------------------------------------------------------------
def apot_terms(magnitude_bits: int) -> list:
    """Exponent lists of the additive terms for ``B`` magnitude bits (term value: 0 or ``2**-e``).

    ``n = ceil(B / 2)`` terms; 2-bit terms get one exponent in each of three rounds, the 1-bit term (odd ``B``)
    gets one at the start of round 2; exponents are handed out as ``1, 2, 3, ...``. Reproduces the authors'
    ``build_power_value`` for ``B = 2..6`` and continues it for ``B = 1, 7, 8``.
    """
    if magnitude_bits < 1:
        raise ValueError(f"APoT needs at least 1 magnitude bit, got {magnitude_bits}")
    two_bit = [[] for _ in range(magnitude_bits // 2)]
    one_bit = [] if magnitude_bits % 2 else None
    exponent = 1
    for round_ in range(3):
        if round_ == 2 and one_bit is not None:
            one_bit.append(exponent)
            exponent += 1
        for term in two_bit:
            term.append(exponent)
            exponent += 1
    return two_bit + ([one_bit] if one_bit is not None else [])


def _apot_magnitudes(magnitude_bits: int) -> tuple:
    """APoT magnitudes as integers (sums of the terms scaled by ``2**max_exponent``) and their denominator."""
    terms = apot_terms(magnitude_bits)
    top = max(e for term in terms for e in term)
    choices = [[0] + [2 ** (top - e) for e in term] for term in terms]
    sums = sorted({sum(c) for c in itertools.product(*choices)})
    if len(sums) != 2 ** magnitude_bits:  # distinct binary fractions by construction
        raise AssertionError(f"APoT B={magnitude_bits}: {len(sums)} levels, expected {2 ** magnitude_bits}")
    return _reduce(sums)


def _pot_magnitudes(magnitude_bits: int) -> tuple:
    """``{0} U {2**-i : i = 0 .. 2**B - 2}`` as integers over ``2**(2**B - 2)``."""
    smallest = 2 ** magnitude_bits - 2
    return _reduce([0] + [2 ** k for k in range(smallest + 1)])


def _reduce(mags: list) -> tuple:
    top = max(mags)
    g = functools.reduce(math.gcd, mags, top)
    return tuple(m // g for m in mags), top // g


def _mirror(mags: tuple) -> tuple:
    return tuple(sorted({-m for m in mags} | set(mags)))


def _check_bits(scheme: str, bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    bits = int(bits)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{scheme}: bits={bits} is outside {MIN_BITS}..{MAX_BITS}; choose a bit-width from 2 to 8")
    return bits


@functools.lru_cache(maxsize=None)
def _build(scheme: str, bits: int, signed: bool) -> LevelSet:
    if scheme == "apot":
        mags, denom = _apot_magnitudes(bits - 1 if signed else bits)
        return LevelSet("apot", bits, signed, _mirror(mags) if signed else mags, denom)
    if scheme in ("pot", "log2"):
        magnitude_bits = bits - 1 if signed else bits
        limit = 6 if signed else 5
        if bits > limit:
            smallest = 2 ** magnitude_bits - 2
            kind = "signed" if signed else "unsigned"
            raise ValueError(
                f"{scheme} with {bits} bits ({kind}) has levels down to 2**-{smallest}, an integer grid of "
                f"{smallest + 1} bits; use at most {limit} bits for {kind} {scheme}, or scheme 'apot' for more bits")
        mags, denom = _pot_magnitudes(magnitude_bits)
        return LevelSet(scheme, bits, signed, _mirror(mags) if signed else mags, denom)
    if scheme == "uniform":
        if signed:
            m = 2 ** (bits - 1) - 1
            return LevelSet("uniform", bits, True, tuple(range(-m, m + 1)), m)
        m = 2 ** bits - 1
        return LevelSet("uniform", bits, False, tuple(range(0, m + 1)), m)
    if scheme == "uniform_asym":
        m = 2 ** bits - 1
        qmin = -(2 ** (bits - 1)) if signed else 0
        return LevelSet("uniform_asym", bits, signed, tuple(range(0, m + 1)), m, zero_point=qmin)
    if scheme in ("ternary", "binary"):
        if not signed:
            raise ValueError(f"{scheme} levels are signed; quantize unsigned tensors (activations) with "
                             f"'uniform' or 'apot' instead")
        if scheme == "ternary":
            return LevelSet("ternary", 2, True, (-1, 0, 1), 1)
        return LevelSet("binary", 1, True, (-1, 1), 1)
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


@functools.lru_cache(maxsize=None)
def _build_shifted(scheme: str, bits: int, offset: int) -> LevelSet:
    base = _build(scheme, bits, False)
    if offset not in base.grid or not 0 < offset <= base.denom // 2:
        choices = ", ".join(str(g) for g in asymmetric_offsets(scheme, bits))
        raise ValueError(f"offset {offset} of {scheme} {bits}-bit asymmetric levels must be a level of the unsigned "
                         f"grid in 1..{base.denom // 2}: one of {choices}")
    grid = tuple(g - offset for g in base.grid)
    return LevelSet(scheme, bits, True, grid, grid[-1], offset=offset)


def asymmetric_offsets(scheme: str, bits: int) -> tuple:
    """The offsets ``o`` of the asymmetric sets of a non-uniform ``scheme``: its unsigned grid integers in
    ``1 .. denom / 2`` (the shifted set keeps its largest magnitude on the positive side)."""
    if scheme not in _ASYMMETRIC_SCHEMES or not supported(scheme, bits, False):
        return ()
    base = level_set(scheme, bits, False)
    return tuple(g for g in base.grid if 0 < g <= base.denom // 2)


_ASYMMETRIC_SCHEMES = ("apot", "pot", "log2")


def level_set(scheme: str, bits: Optional[int] = None, signed: bool = True, offset: int = 0) -> LevelSet:
    """The (cached) level set of ``scheme`` at ``bits`` (2..8), signed (weights) or unsigned (activations).

    ``ternary`` and ``binary`` ignore ``bits`` (their sets are fixed; ``LevelSet.bits`` is 2 and 1).
    ``offset > 0`` (``apot``, ``pot``, ``log2``): the *asymmetric* set, the unsigned levels shifted down by the grid
    integer ``offset`` (one of :func:`asymmetric_offsets`), ``grid = unsigned grid - offset`` over
    ``denom = unsigned denom - offset``: real 0 stays a level, the dense small levels sit around 0, and the
    unsigned levels below ``offset`` become the negative ones, down to ``-offset`` -- for activations that are mostly positive but can be negative (SiLU,
    GELU, Hardswish), as uniform's zero point does. ``signed`` is ignored there (the set is signed).
    Raises ``ValueError`` with a one-line hint for unknown schemes and unsupported combinations.
    """
    if not isinstance(scheme, str):
        raise ValueError(f"scheme must be a string, got {scheme!r}")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme in ("ternary", "binary"):
        bits = 2 if scheme == "ternary" else 1
    else:
        if bits is None:
            raise ValueError(f"{scheme} needs bits (2..8)")
        bits = _check_bits(scheme, bits)
    if offset:
        if scheme not in _ASYMMETRIC_SCHEMES:
            raise ValueError(f"offset levels are defined for {', '.join(_ASYMMETRIC_SCHEMES)}, not {scheme!r} "
                             f"(uniform levels take a zero point: scheme 'uniform_asym')")
        return _build_shifted(scheme, bits, int(offset))
    return _build(scheme, bits, bool(signed))


def levels(scheme: str, bits: Optional[int] = None, signed: bool = True) -> np.ndarray:
    """Sorted normalised levels (largest magnitude 1.0) of ``level_set(scheme, bits, signed)``."""
    return level_set(scheme, bits, signed).values


def supported(scheme: str, bits: int, signed: bool) -> bool:
    """Whether ``level_set(scheme, bits, signed)`` is defined (no exception)."""
    try:
        level_set(scheme, bits, signed)
    except ValueError:
        return False
    return True


def sdq_log2_reference(y: np.ndarray, alpha_sigma: float, bits: int) -> np.ndarray:
    """SDQ eq. 9-10 taken literally (log-domain rounding), as integers ``y_p2``; for comparison only.

    ``y_int = round(log2(|y| * L / (alpha sigma)))``, ``y_p2 = clip(sign(y) 2**y_int, -L, L)`` if ``y_int >= 0``
    else 0, with ``L = 2**(2**(b-1) - 2)``. The pipeline uses nearest-level decisions instead (module docstring).
    """
    bits = _check_bits("log2", bits)
    big_l = 2.0 ** (2 ** (bits - 1) - 2)
    y = np.asarray(y, dtype=np.float64)
    clipped = np.clip(y, -alpha_sigma, alpha_sigma)  # eq. 1
    with np.errstate(divide="ignore"):
        y_int = np.round(np.log2(np.abs(clipped) * big_l / alpha_sigma))
    out = np.where(y_int >= 0, np.clip(np.sign(clipped) * 2.0 ** np.maximum(y_int, 0), -big_l, big_l), 0.0)
    return out.astype(np.int64)


def integer_table() -> list:
    """Rows ``(scheme, bits, signed, num_levels, qmin, qmax, denom, storage_dtype)`` for every defined set;
    unsupported combinations appear with ``None`` fields (documentation and ``docs/levels.md``)."""
    rows = []
    for scheme in SCHEMES:
        for signed in (True, False):
            bit_range = [None] if scheme in ("ternary", "binary") else range(MIN_BITS, MAX_BITS + 1)
            for bits in bit_range:
                try:
                    ls = level_set(scheme, bits, signed)
                except ValueError:
                    rows.append((scheme, bits, signed, None, None, None, None, None))
                    continue
                rows.append((scheme, ls.bits, signed, ls.num_levels, ls.code_min, ls.code_max, ls.denom,
                             ls.storage_dtype))
    return rows
