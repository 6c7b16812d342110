"""Shift-add lowering: APoT/PoT layers of a standard-form file as integer shifts and additions (``--emit shift-add``).

Every APoT/PoT weight is a grid integer ``g`` (``qcompile.quant``), a sum of signed powers of two. With its digits
``g = sum_e d_e(g) 2**e``, ``d_e in {-1, 0, 1}`` (non-adjacent form by default: the fewest nonzero digits; or
``"binary"``, the APoT paper's own additive terms), a layer on integer activation codes ``x`` is::

    acc[o] = sum_{c,k} g[o,c,k] x[c,k] = sum_{(e,s)} s * ( sum_{c,k} mask_{e,s}[o,c,k] x[c,k] ) << e
    y[o]   = float(acc[o] + b[o]) * (s_w[o] s_x)                (the lecture's integer layer, one rescale)

with ``mask_{e,s} = [d_e(g) == s]`` in {0, 1}: a 0/1-mask convolution or matmul only selects and sums
activations, and ``<< e`` multiplies by a power of two. Before → After, for each matched layer::

    Conv(DQ(codes_x, s_x), DQ(Gather(lut, idx), s_w), b)
    →  Mul(Cast<float>(acc + b / (s_w s_x)), s_w s_x),   acc = region(codes_x) in integers only

The region (node names recorded in ``model.metadata_props["qcompile.shift_add"]``) is, in standard ONNX:

1. activation planes: ``x = Cast<int32>(codes) - Z``; split into non-negative parts (``x+ = Max(x, 0)``,
   ``x- = Max(-x, 0)``, only where x can be negative) and bytes (``BitShift`` right + ``BitwiseAnd 255``, only
   where |x| > 255), each a uint8 plane; the planes are stacked on the batch axis (``Concat``);
2. one ``ConvInteger`` / ``MatMulInteger`` (uint8 x uint8 -> int32) against all masks stacked on the output axis
   (the masks are ``Gather(table, idx)``: the stored 4-bit level indices look up a 0/1 table, so the file keeps
   ``bits`` per weight; ``pack_masks=False`` stores uint8 masks instead);
3. ``Reshape`` to expose (plane, group); ``Cast<uintW>``; ``BitShift`` left by ``e + 8 * byte`` (``BitShift`` is
   defined on unsigned integers: every shifted value is a sum of non-negative terms); ``Cast<intW>``;
4. ``ReduceSum`` over the positive and the negative groups, ``Sub``; the same over positive / negative planes;
   ``Reshape`` back to the layer's output shape: ``acc``.

Widths: the mask products are int32 (each is at most ``255 * fan_in``; checked). Every later intermediate is
bounded by ``B = (sum over planes of max plane * 2**(8 byte)) * max_o sum_{c,k} sum_terms 2**e`` (>= max|acc|);
``W = 32`` (uint32 shifts, int32 sums) when ``B < 2**31``, else ``W = 64``; refused beyond ``2**63``.

Bias and rescale: a bias on the accumulator grid ``float32(s_w s_x)`` (the int8 layers' biases, ``QuantizeBias``)
is added to the accumulator in integers (``Add``, the last node of the region, the record's ``output``); the rescale
is then ``Cast<float>(acc + b) * float32(s_w s_x)``, as an integer kernel writes a float output. Where the layer's
output (or its ``Relu``, or ReLU6's ``Clip`` with its bounds divided by ``s_y``) is read only by ``QuantizeLinear``
with one per-tensor scale ``s_y``, the rescale is the
kernel's requantization instead, ``QuantizeLinear(Cast<float>(acc + b) * float32(s_w s_x / s_y), 1, z_y)``: the
codes the simulation computes (``FakeQuantize._requantize``), not a float rescale and a second rounding, which put
values on a decision threshold on its other side. A bias off the grid (a layer the simulation runs in float) stays a
float ``Add`` after the rescale.

Codes dequantized as ``Mul(Cast(codes), scale)`` (32-bit codes: PoT/log2 weights at 6 bits, activations at 5) are
read as a ``DequantizeLinear`` of them would be.

Not lowered (left as in the standard form, reason recorded): layers with uniform weights (the 8-bit first/last
layers: integer multiplications are the point there), float activations or weights, a weight zero point, a
per-channel scale on an axis other than the output, Gemm with ``transA``/``alpha``/``beta`` != defaults.

:func:`verify_shift_add` states the claim as a check (see its docstring).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

REGION_KEY = "qcompile.shift_add"
PREFIX = "shift_add"
DECOMPOSITIONS = ("naf", "binary")


class ShiftAddVerificationError(RuntimeError):
    """A lowered region breaks the shift-add claim (see :func:`verify_shift_add`)."""


# -- signed power-of-two digits ------------------------------------------------------------------------------
def signed_digits(values, decomposition: str = "naf") -> np.ndarray:
    """Digits ``d[..., e]`` in {-1, 0, 1} with ``values == sum_e d[..., e] * 2**e`` (int64 array).

    ``"naf"``: non-adjacent form (no two adjacent nonzero digits), the minimal number of signed power-of-two
    terms of each integer. ``"binary"``: the bits of ``|v|`` with the sign of ``v``; for APoT grid integers these
    are exactly the paper's additive terms (their exponents are distinct by construction).
    """
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
    v = np.asarray(values, dtype=np.int64)
    mag, sign = np.abs(v), np.sign(v)
    width = int(mag.max()).bit_length() + 1 if mag.size else 1
    digits = np.zeros(v.shape + (width,), dtype=np.int64)
    if decomposition == "binary":
        for e in range(width):
            digits[..., e] = (mag >> e) & 1
    else:
        n = mag.copy()
        for e in range(width):
            d = np.where((n & 1) == 1, 2 - (n & 3), 0)  # n = 1 (mod 4) -> +1, n = 3 (mod 4) -> -1
            digits[..., e] = d
            n = (n - d) >> 1
        assert not n.any(), "NAF did not terminate"
    digits *= sign[..., None]
    return digits


# -- pattern matching on the standard form -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Activation:
    codes: object             # gs.Variable: integer codes entering the region
    zero_point: int
    lo: int                   # range of codes - zero_point
    hi: int
    scale: float              # float32 value of the activation's DequantizeLinear scale
    kind: str                 # "levels" (Gather of a level grid), "uniform" (QuantizeLinear) or "codes"


@dataclasses.dataclass(frozen=True)
class _Weight:
    index: object             # gs.Constant: stored level indices
    index_values: np.ndarray  # int64, stored layout
    lut: np.ndarray           # int64 grid integers, lut[index] = weight code
    out_axis: int             # stored axis of the output channels
    scale: np.ndarray         # float32 [O]

    @property
    def canonical_index(self) -> np.ndarray:
        """Level indices as [O, fan-in dims...]."""
        return self.index_values if self.out_axis == 0 else self.index_values.T

    @property
    def codes(self) -> np.ndarray:
        return self.lut[self.canonical_index]

    @property
    def label(self) -> str:
        """``apot<b>``/``pot<b>``: PoT when every nonzero level is a power of two; b the bits that index the levels
        (2^b - 1 signed levels, or 2^b); ``binary`` for two levels ±m (1 bit; it read ``pot2``)."""
        if len(self.lut) == 2 and not (self.lut == 0).any() and self.lut[0] == -self.lut[1]:
            return "binary"
        mags = np.unique(np.abs(self.lut[self.lut != 0]))
        kind = "pot" if all(int(m) & (int(m) - 1) == 0 for m in mags) else "apot"
        return f"{kind}{max(1, int(len(self.lut) - 1).bit_length())}"


@dataclasses.dataclass(frozen=True)
class _Match:
    node: object              # gs.Node: the Conv / Gemm / MatMul
    kind: str                 # "conv" | "matmul"
    act: _Activation
    weight: _Weight
    bias: object              # gs.Tensor or None
    positions: Optional[int]  # output positions per sample (spatial size, or rows of a MatMul); None if unknown


def _initializers(model: onnx.ModelProto) -> dict:
    return {t.name: t for t in model.graph.initializer}


def _const_array(tensor, inits: dict) -> Optional[np.ndarray]:
    """Value of a constant gs tensor, read from the ModelProto (gs would unpack 4-bit tensors and break export)."""
    import onnx_graphsurgeon as gs

    if not isinstance(tensor, gs.Constant):
        return None
    if tensor.name in inits:
        return numpy_helper.to_array(inits[tensor.name])
    return np.asarray(tensor.values)


def _producer(tensor):
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


_INT_RANGES = {np.dtype(t): (int(np.iinfo(t).min), int(np.iinfo(t).max))
               for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32)}


def _dequantizer(t, inits) -> Optional[tuple]:
    """``(codes, scale, zero point, axis)`` of the node that dequantizes ``t``: a ``DequantizeLinear``, or the
    ``Mul(Cast(codes, FLOAT), scale)`` the file writes for 32-bit codes (PoT/log2 weights at 6 bits, activations at 5;
    ``qcompile.emit._float_dequantize``), whose scale broadcasts along the channel axis, or the
    ``Mul(Cast(codes) - zp, scale)`` by which it feeds a layer on float kernels (``emit.shield_float_layers``). ``scale`` and the zero point
    are arrays (None where not constant; the zero point 0 where absent); ``axis`` is None for a per-tensor scale."""
    node = _producer(t)
    if node is not None and node.op == "DequantizeLinear":
        zp = np.zeros((), np.int64)
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            zp = _const_array(node.inputs[2], inits)
        scale = _const_array(node.inputs[1], inits)
        axis = int(node.attrs.get("axis", 1)) if scale is not None and scale.size > 1 else None
        return node.inputs[0], scale, zp, axis
    cast = _producer(node.inputs[0]) if node is not None and node.op == "Mul" and len(node.inputs) == 2 else None
    zp = np.zeros((), np.int64)
    if cast is not None and cast.op == "Sub" and len(cast.inputs) == 2:  # the float-layer shield's zero point
        zp = _const_array(cast.inputs[1], inits)
        if zp is None or zp.size != 1 or float(zp.reshape(())) != round(float(zp.reshape(()))):
            return None
        zp = np.asarray(int(round(float(zp.reshape(())))), np.int64)
        cast = _producer(cast.inputs[0])
    if cast is None or cast.op != "Cast" or int(cast.attrs.get("to", 0)) != TensorProto.FLOAT:
        return None
    scale = _const_array(node.inputs[1], inits)
    axis = None
    if scale is not None and scale.size > 1:
        big = [d for d, n in enumerate(scale.shape) if n > 1]
        if len(big) != 1:
            return None
        axis, scale = big[0], scale.reshape(-1)
    return cast.inputs[0], scale, zp, axis


def _match_activation(x, inits) -> tuple[Optional[_Activation], str]:
    found = _dequantizer(x, inits)
    if found is None:
        dq = _producer(x)
        if dq is not None and dq.op == "Pad":  # padding on codes wider than 8 bits: onnxruntime has no int16 Pad
            mode = dq.attrs.get("mode", "constant")
            mode = mode.decode() if isinstance(mode, bytes) else str(mode)
            return None, (f"the input arrives through a Pad ({mode}) of dequantized values (activation codes wider "
                          "than 8 bits, which onnxruntime cannot pad), not straight from its codes")
        if dq is not None and dq.op in ("Concat", "Slice"):  # circular padding written as Slice/Concat
            return None, f"the input arrives through {dq.op} (circular padding), not straight from its codes"
        return None, "activation is not quantized (no DequantizeLinear)"
    codes, scale, z, _ = found
    if scale is None or scale.size != 1:
        return None, "activation scale is not a per-tensor constant"
    if z is None or z.size != 1:
        return None, "activation zero point is not a scalar constant"
    zp = int(z.reshape(()))
    src = _producer(codes)
    if src is not None and src.op == "Reshape":  # emit's lookup: Reshape(GatherElements(table, flat index))
        inner = _producer(src.inputs[0])
        if inner is not None and inner.op == "GatherElements":
            src = inner
    rng, kind = None, "codes"
    if src is not None and src.op in ("Gather", "GatherElements"):
        kind = "levels"
        table = _const_array(src.inputs[0], inits)
        if table is not None and table.dtype.kind in "iu":
            rng = (int(table.min()), int(table.max()))
    elif src is not None and src.op == "Clip" and len(src.inputs) == 3:
        # the re-quantized output of an int8 layer on fewer than 8 bits: QuantizeLinear, then Clip to the levels
        lo, hi = (_const_array(t, inits) if t is not None else None for t in src.inputs[1:3])
        if lo is not None and hi is not None and lo.dtype.kind in "iu" and hi.dtype.kind in "iu":
            kind, rng = "uniform", (int(lo.reshape(())), int(hi.reshape(())))
    elif src is not None and src.op == "QuantizeLinear":
        kind = "uniform"
        if len(src.inputs) > 2 and src.inputs[2] is not None and src.inputs[2].name:
            z = _const_array(src.inputs[2], inits)
            rng = _INT_RANGES.get(z.dtype) if z is not None else None
        else:
            rng = _INT_RANGES[np.dtype(np.uint8)]
    if rng is None and codes.dtype is not None and np.dtype(codes.dtype) in _INT_RANGES:
        rng = _INT_RANGES[np.dtype(codes.dtype)]
    if rng is None:
        return None, "activation codes are not an integer tensor of known range"
    return _Activation(codes, zp, rng[0] - zp, rng[1] - zp, float(np.float32(scale.reshape(()))), kind), ""


def _match_weight(w, kind: str, out_axis: int, inits) -> tuple[Optional[_Weight], str]:
    src = _producer(w)
    if kind == "matmul" and src is not None and src.op == "Transpose":
        perm = list(src.attrs.get("perm", [1, 0]))
        if perm != [1, 0]:
            return None, f"weight Transpose perm {perm} is not [1, 0]"
        out_axis = 1 - out_axis
        src = _producer(src.inputs[0])
    found = _dequantizer(src.outputs[0], inits) if src is not None else None
    if found is None:
        return None, "weight is not quantized (no DequantizeLinear)"
    stored, scale, z, scale_axis = found
    if z is None or z.size == 0 or np.any(z != z.reshape(-1)[0]):
        return None, "weight zero points differ between channels"
    zero = int(z.reshape(-1)[0])  # uint8 storage (--int8-weights u8): lut - 128 are the grid integers
    q = _producer(stored)
    if q is None or q.op != "Gather":
        if _const_array(stored, inits) is not None:
            return None, "uniform weights (integer multiplications kept)"
        packed = q.inputs[0] if q is not None and q.op == "Cast" and q.inputs else None
        if packed is not None and packed.name in inits and inits[packed.name].data_type == onnx.TensorProto.INT4:
            return None, "uniform weights (integer multiplications kept)"  # 3-4-bit uniform codes behind a Cast
        return None, ("weight codes are not a level-table lookup (2-bit and ternary weights, {-1, 0, 1}: uniform "
                      "levels, are stored as packed INT2/UINT2 codes: integer multiplications kept)")
    lut = _const_array(q.inputs[0], inits)
    idx_t = q.inputs[1]
    cast = _producer(idx_t)
    if cast is not None and cast.op == "Cast":
        idx_t = cast.inputs[0]
    idx = _const_array(idx_t, inits)
    if lut is None or idx is None or lut.ndim != 1 or int(q.attrs.get("axis", 0)) != 0:
        return None, "weight level table or indices are not constants"
    idx = idx.astype(np.int64)
    if scale is None:
        return None, "weight scale is not a constant"
    n_out = idx.shape[out_axis]
    if scale.size == 1:
        scale = np.full(n_out, scale.reshape(()), dtype=np.float32)
    else:
        axis = scale_axis % idx.ndim
        if axis != out_axis or scale.ndim != 1:
            return None, f"per-channel weight scale on axis {axis}, not the output axis {out_axis}"
    if idx.ndim != 2 and out_axis != 0:
        return None, "weight layout not supported"
    return _Weight(idx_t, idx, lut.astype(np.int64) - zero, out_axis, scale.astype(np.float32)), ""


def _positions(node, kind: str) -> Optional[int]:
    shape = node.outputs[0].shape
    if shape is None:
        return None
    rest = shape[2:] if kind == "conv" else shape[1:-1]
    if not all(isinstance(d, int) for d in rest):
        return None
    if kind == "matmul" and not rest:  # (rows, features): a Linear on (B, T, F) runs on B·T rows
        rows = _rows_per_sample(node)
        return None if rows == _DYNAMIC_ROWS else (rows or 1)
    return int(np.prod(rest, dtype=np.int64)) if rest else 1


_PASSING = {"Add", "Sub", "Mul", "Div", "Relu", "Clip", "Cast", "QuantizeLinear", "DequantizeLinear", "Identity"}
_DYNAMIC_ROWS = -1  # _rows_per_sample: the rows come from a reshape of an axis whose size is not fixed


def _rows_per_sample(node) -> Optional[int]:
    """Rows of a 2-D Gemm/MatMul per input sample, where the layer runs on (batch · tokens, features): from the
    (batch, ...) shape of the Reshape/Flatten that made its rows, or of the Reshape that gives them back (through
    elementwise nodes and the quantizers'); ``_DYNAMIC_ROWS`` where that shape has a size that is not fixed
    (``--dynamic-axes`` on the token axis); None where nothing says. The cost table counted a lowered Linear on
    (B, 10, 6) at one row per sample (18 multiplications for 180), as cost.py once did for layers kept."""
    x, out = node.inputs[0].shape, node.outputs[0].shape
    if x is None or out is None or len(x) != 2 or not isinstance(x[-1], int) or not isinstance(out[-1], int):
        return None

    def per_sample(shape) -> Optional[int]:
        if shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape[1:]):
            return None
        return int(np.prod(shape[1:], dtype=np.int64))

    tensor = node.inputs[0]
    for _ in range(8):  # back to the Reshape/Flatten that made the rows
        src = tensor.inputs[0] if tensor.inputs else None
        if src is None:
            break
        if src.op in ("Reshape", "Flatten"):
            shape = src.inputs[0].shape
            e = per_sample(shape)
            if e is not None and e % x[-1] == 0 and e // x[-1] > 1:
                return e // x[-1]
            if e is None and shape is not None and len(shape) > 2:  # (batch, T?, F): T not fixed
                return _DYNAMIC_ROWS
            break
        if src.op not in _PASSING or not src.inputs:
            break
        tensor = src.inputs[0]
    tensor = node.outputs[0]
    for _ in range(8):  # on to the Reshape that gives the rows back their samples
        if len(tensor.outputs) != 1:
            break
        dst = tensor.outputs[0]
        if dst.op == "Reshape":
            shape = dst.outputs[0].shape
            e = per_sample(shape)
            if e is not None and e % out[-1] == 0 and e // out[-1] > 1:
                return e // out[-1]
            if e is None and shape is not None and len(shape) > 2:
                return _DYNAMIC_ROWS
            break
        if dst.op not in _PASSING:
            break
        tensor = dst.outputs[0]
    return None


def match_layers(graph, inits: dict) -> tuple[list[_Match], list[dict]]:
    """Find the lowerable layers of a gs graph. Returns ``(matches, skipped)``; ``skipped`` rows name a reason."""
    matches, skipped = [], []
    for node in graph.nodes:
        if node.op == "ConvTranspose":  # its quantized weights stay multiplied in float: say so
            skipped.append({"layer": node.name, "op": node.op, "reason": "ConvTranspose is not lowered"})
            continue
        if node.op not in ("Conv", "Gemm", "MatMul"):
            continue
        kind = "conv" if node.op == "Conv" else "matmul"
        out_axis = 0
        if node.op == "Gemm":
            if int(node.attrs.get("transA", 0)) != 0 or float(node.attrs.get("alpha", 1.0)) != 1.0 \
                    or float(node.attrs.get("beta", 1.0)) != 1.0:
                skipped.append({"layer": node.name, "op": node.op, "reason": "Gemm with transA/alpha/beta"})
                continue
            out_axis = 0 if int(node.attrs.get("transB", 0)) == 1 else 1
        elif node.op == "MatMul":
            out_axis = 1  # B is [C, O]
        weight, why = _match_weight(node.inputs[1], kind, out_axis, inits)
        act, why_act = (None, "") if weight is None else _match_activation(node.inputs[0], inits)
        if weight is None or act is None:
            skipped.append({"layer": node.name, "op": node.op, "reason": why or why_act})
            continue
        if not np.any(weight.codes):
            skipped.append({"layer": node.name, "op": node.op, "reason": "all weights are zero"})
            continue
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name else None
        matches.append(_Match(node, kind, act, weight, bias, _positions(node, kind)))
    return matches, skipped


# -- layer plan: groups, planes, widths, costs ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    groups: tuple             # ((exponent, sign), ...), positive groups first
    n_pos_groups: int
    level_table: np.ndarray   # uint8 [levels, G]: 1 where the level's digit at e_t equals s_t
    planes: tuple             # ((sign, byte, max value), ...), positive planes first
    width: int                # 32 | 64
    bound: int
    cost: dict


def _planes(act: _Activation) -> tuple:
    planes = []
    for sign, mag in ((1, max(act.hi, 0)), (-1, max(-act.lo, 0))):
        if mag == 0:
            continue
        nbytes = max(1, math.ceil(mag.bit_length() / 8))
        planes += [(sign, b, min(255, mag >> (8 * b))) for b in range(nbytes)]
    if not planes:  # a constant-zero activation: one plane of zeros keeps the graph uniform
        planes = [(1, 0, 0)]
    return tuple(planes)


def level_histogram(index: np.ndarray, n_levels: int) -> np.ndarray:
    """``hist[o, l]``: how many weights of output row ``o`` (axis 0 of ``index``) have level index ``l``."""
    rows = index.reshape(index.shape[0], -1).astype(np.int64)
    flat = (np.arange(rows.shape[0], dtype=np.int64)[:, None] * n_levels + rows).ravel()
    return np.bincount(flat, minlength=rows.shape[0] * n_levels).reshape(rows.shape[0], n_levels)


def plan_layer(m: _Match, decomposition: str = "naf") -> _Plan:
    """Groups, planes, widths and costs of one layer, from per-row level histograms (no per-weight arrays)."""
    from .cost import cost_from_histogram

    w = m.weight
    level_digits = signed_digits(w.lut, decomposition)                   # [L, E]
    hist = level_histogram(w.canonical_index, len(w.lut))                 # [O, L]
    present = hist.sum(axis=0) > 0
    used = [(e, s) for s in (1, -1) for e in range(level_digits.shape[1]) if np.any(level_digits[present, e] == s)]
    table = np.stack([(level_digits[:, e] == s) for e, s in used], axis=1).astype(np.uint8)   # [L, G]
    planes = _planes(m.act)
    # bounds (see module docstring)
    counts = hist @ table.astype(np.int64)                                # [O, G] mask entries per row and group
    max_plane = max(p[2] for p in planes)
    if max_plane * int(counts.max()) > 2 ** 31 - 1:
        raise ValueError(f"{m.node.name}: a 0/1-mask product can exceed int32 (fan-in {int(hist[0].sum())})")
    level_weight = (np.abs(level_digits) * (2 ** np.arange(level_digits.shape[1]))).sum(axis=1)  # sum_terms 2**e
    term_weight = hist @ level_weight                                     # [O]
    x_sum = sum(p[2] << (8 * p[1]) for p in planes)
    bound = int(x_sum) * int(term_weight.max())
    if bound < 2 ** 31:
        width = 32
    elif bound < 2 ** 63:
        width = 64
    else:
        raise ValueError(f"{m.node.name}: accumulator bound {bound} exceeds int64")
    if max(e + 8 * p[1] for e, _ in used for p in planes) >= width:
        width = 64
    cost = cost_from_histogram(hist, w.lut, m.positions, decomposition)
    # what the ONNX emulation computes: each 0/1-mask product densely, for every plane and group
    cost.update(onnx_planes=len(planes), groups=len(used),
                onnx_mask_macs=len(planes) * len(used) * cost["uniform"]["mults"])
    n_pos = sum(1 for _, s in used if s > 0)
    return _Plan(tuple(used), n_pos, table, planes, width, bound, cost)


# -- graph construction --------------------------------------------------------------------------------------
class _Emitter:
    """Adds named nodes to a gs graph and remembers the names (the region)."""

    def __init__(self, graph, prefix: str, shared: Optional[dict] = None):
        self.graph = graph
        self.prefix = prefix
        self.names: list[str] = []
        self._n = 0
        self._shared = shared if shared is not None else {}  # small constants shared across the graph

    def _next(self, what: str) -> str:
        self._n += 1
        return f"{self.prefix}/{what}_{self._n}"

    def const(self, array: np.ndarray, what: str):
        import onnx_graphsurgeon as gs

        array = np.ascontiguousarray(array)
        if array.size > 16:
            return gs.Constant(self._next(what), array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._shared:
            tag = self._shared.setdefault("tag", "")
            self._shared[key] = gs.Constant(f"{PREFIX}/const{tag}/{what}_{len(self._shared)}", array)
        return self._shared[key]

    def op(self, op: str, inputs: list, dtype, output=None, **attrs):
        import onnx_graphsurgeon as gs

        out = output if output is not None else gs.Variable(self._next(op.lower() + "_out"), dtype=dtype)
        node = gs.Node(op=op, name=self._next(op), attrs=attrs, inputs=list(inputs), outputs=[out])
        self.graph.nodes.append(node)
        self.names.append(node.name)
        return out

    def i64(self, values, what: str = "shape"):
        return self.const(np.asarray(values, dtype=np.int64), what)


def _activation_planes(em: _Emitter, act: _Activation, planes: tuple):
    """uint8 planes of ``codes - Z`` stacked on axis 0 (see module docstring, step 1)."""
    codes = act.codes
    single = len(planes) == 1 and planes[0][0] == 1 and planes[0][1] == 0
    if single and act.zero_point == 0 and act.lo >= 0 and act.hi <= 255:
        if codes.dtype is not None and np.dtype(codes.dtype) == np.uint8:
            return codes
        return em.op("Cast", [codes], np.uint8, to=TensorProto.UINT8)
    x = em.op("Cast", [codes], np.int32, to=TensorProto.INT32)
    if act.zero_point != 0:
        x = em.op("Sub", [x, em.const(np.array(act.zero_point, np.int32), "zero_point")], np.int32)
    zero = em.const(np.array(0, np.int32), "zero")
    parts = {}
    if any(s == 1 for s, _, _ in planes):
        parts[1] = x if act.lo >= 0 else em.op("Max", [x, zero], np.int32)
    if any(s == -1 for s, _, _ in planes):
        neg = em.op("Sub", [zero, x], np.int32)
        parts[-1] = neg if act.hi <= 0 else em.op("Max", [neg, zero], np.int32)
    out = []
    for sign, byte, _ in planes:
        part = parts[sign]
        if sum(1 for s, _, _ in planes if s == sign) == 1:
            out.append(em.op("Cast", [part], np.uint8, to=TensorProto.UINT8))
            continue
        u = em.op("Cast", [part], np.uint32, to=TensorProto.UINT32)
        if byte:
            u = em.op("BitShift", [u, em.const(np.array(8 * byte, np.uint32), "byte_shift")], np.uint32,
                      direction="RIGHT")
        u = em.op("BitwiseAnd", [u, em.const(np.array(255, np.uint32), "byte_mask")], np.uint32)
        out.append(em.op("Cast", [u], np.uint8, to=TensorProto.UINT8))
    if len(out) == 1:
        return out[0]
    return em.op("Concat", out, np.uint8, axis=0)


def _masks(em: _Emitter, m: _Match, plan: _Plan, pack: bool):
    """The stacked 0/1 masks: conv [g*G*Og, Cg, k...] (group-major, then term group), matmul [C, G*O]."""
    w = m.weight
    n_groups = len(plan.groups)
    if m.kind == "conv":
        g = int(m.node.attrs.get("group", 1))
        shape = w.index_values.shape  # [O, Cg, k...]
        o, rest = shape[0], list(shape[1:])
        d = len(rest)
        stacked_shape = [g * n_groups * (o // g)] + rest
        perm = [0, d + 2] + list(range(1, d + 2))  # [g, Og, Cg, k.., G] -> [g, G, Og, Cg, k..]
        if not pack:
            masks = plan.level_table[w.index_values]  # [O, Cg, k.., G]
            masks = masks.reshape([g, o // g] + rest + [n_groups]).transpose(perm).reshape(stacked_shape)
            return em.const(masks.astype(np.uint8), "masks")
        idx = em.op("Cast", [w.index], np.int32, to=TensorProto.INT32)
        table = em.const(plan.level_table, "mask_table")
        gathered = em.op("Gather", [table, idx], np.uint8, axis=0)
        split = em.op("Reshape", [gathered, em.i64([g, o // g] + rest + [n_groups])], np.uint8)
        moved = em.op("Transpose", [split], np.uint8, perm=perm)
        return em.op("Reshape", [moved, em.i64(stacked_shape)], np.uint8)
    o, c = w.canonical_index.shape
    if not pack:
        masks = plan.level_table[w.canonical_index]  # [O, C, G]
        return em.const(masks.transpose(1, 2, 0).reshape(c, n_groups * o).astype(np.uint8), "masks")
    idx = em.op("Cast", [w.index], np.int32, to=TensorProto.INT32)
    gathered = em.op("Gather", [em.const(plan.level_table, "mask_table"), idx], np.uint8, axis=0)
    perm = [1, 2, 0] if w.out_axis == 0 else [0, 2, 1]  # stored [O, C] or [C, O] (+G) -> [C, G, O]
    moved = em.op("Transpose", [gathered], np.uint8, perm=perm)
    return em.op("Reshape", [moved, em.i64([c, n_groups * o])], np.uint8)


def _signed_sum(em: _Emitter, t, axis: int, n_pos: int, n_total: int, itype, np_t):
    """sum over ``axis`` of the first ``n_pos`` entries minus the sum of the rest (keepdims=0)."""
    axes = em.i64([axis], "axes")
    if n_pos == n_total:
        return em.op("ReduceSum", [t, axes], np_t, keepdims=0)

    def part(lo, hi):
        sl = em.op("Slice", [t, em.i64([lo], "starts"), em.i64([hi], "ends"), em.i64([axis], "axes")], np_t)
        return em.op("ReduceSum", [sl, axes], np_t, keepdims=0)

    neg = part(n_pos, n_total)
    if n_pos == 0:
        return em.op("Sub", [em.const(np.array(0, np_t), "zero"), neg], np_t)
    return em.op("Sub", [part(0, n_pos), neg], np_t)


def _lower_one(graph, m: _Match, plan: _Plan, planes_cache: dict, pack: bool, index: int, inits: dict,
               shared: dict) -> dict:
    import onnx_graphsurgeon as gs

    layer = m.node
    em = _Emitter(graph, f"{PREFIX}/{index}", shared)
    key = (m.act.codes.name, m.act.zero_point)
    if key not in planes_cache:
        act_em = _Emitter(graph, f"{PREFIX}/act{shared.get('tag', '')}_{len(planes_cache)}", shared)
        planes_cache[key] = (_activation_planes(act_em, m.act, plan.planes), act_em.names)
    x, act_nodes = planes_cache[key]
    u_t, np_u = (TensorProto.UINT32, np.uint32) if plan.width == 32 else (TensorProto.UINT64, np.uint64)
    i_t, np_i = (TensorProto.INT32, np.int32) if plan.width == 32 else (TensorProto.INT64, np.int64)
    n_planes, n_groups = len(plan.planes), len(plan.groups)
    n_pos_planes = sum(1 for p in plan.planes if p[0] > 0)
    masks = _masks(em, m, plan, pack)
    shift_values = np.array([[e + 8 * byte for e, _ in plan.groups] for _, byte, _ in plan.planes], dtype=np_u)
    if m.kind == "conv":
        attrs = {k: v for k, v in layer.attrs.items() if k in ("auto_pad", "dilations", "group", "kernel_shape",
                                                                  "pads", "strides")}
        g = int(layer.attrs.get("group", 1))
        n_out = m.weight.index_values.shape[0]
        d = m.weight.index_values.ndim - 2
        y = em.op("ConvInteger", [x, masks], np.int32, **attrs)
        tail = em.op("Shape", [y], np.int64, start=2)
        target = em.op("Concat", [em.i64([n_planes, -1, g, n_groups, n_out // g]), tail], np.int64, axis=0)
        y = em.op("Reshape", [y, target], np.int32)                                    # [P, N, g, G, Og, S..]
        shifts = shift_values.reshape([n_planes, 1, 1, n_groups, 1] + [1] * d)
        group_axis = 3
    else:
        n_out = m.weight.canonical_index.shape[0]
        y = em.op("MatMulInteger", [x, masks], np.int32)
        y = em.op("Reshape", [y, em.i64([n_planes, -1, n_groups, n_out])], np.int32)  # [P, M, G, O]
        shifts = shift_values.reshape([n_planes, 1, n_groups, 1])
        group_axis = 2
    u = em.op("Cast", [y], np_u, to=u_t)
    u = em.op("BitShift", [u, em.const(shifts, "shifts")], np_u, direction="LEFT")
    s = em.op("Cast", [u], np_i, to=i_t)
    s = _signed_sum(em, s, group_axis, plan.n_pos_groups, n_groups, i_t, np_i)      # groups
    s = _signed_sum(em, s, 0, n_pos_planes, n_planes, i_t, np_i)                    # planes
    acc = gs.Variable(f"{PREFIX}/{index}/accumulator", dtype=np_i)
    if m.kind == "conv":
        head = em.op("Shape", [s], np.int64, end=1)
        spatial = em.op("Shape", [s], np.int64, start=3)
        target = em.op("Concat", [head, em.i64([n_out]), spatial], np.int64, axis=0)
        em.op("Reshape", [s, target], np_i, output=acc)
    else:
        lead = em.op("Shape", [m.act.codes], np.int64, end=-1)
        target = em.op("Concat", [lead, em.i64([n_out])], np.int64, axis=0)
        em.op("Reshape", [s, target], np_i, output=acc)
    out = layer.outputs[0]
    layer.outputs.clear()
    scale = (m.weight.scale.astype(np.float64) * np.float64(m.act.scale)).astype(np.float32)  # float32(S_x·S_w)
    bshape = [1, n_out] + [1] * (m.weight.index_values.ndim - 2) if m.kind == "conv" else [n_out]
    q_bias = _integer_bias(m, inits, scale, n_out)
    if q_bias is not None and np.any(q_bias) and \
            plan.bound + int(np.abs(q_bias).max()) >= (2 ** 31 if plan.width == 32 else 2 ** 63):
        q_bias = None  # the biased sum could pass the accumulator's width: the bias is added in float
    leaving = acc  # the integer tensor that leaves the region
    if q_bias is not None and np.any(q_bias):  # the bias on the accumulator grid, added to it in integers
        leaving = em.op("Add", [acc, em.const(q_bias.astype(np_i).reshape(bshape), "bias")], np_i)
    region = act_nodes + em.names

    # the one rescale (outside the region)
    rescale = _Emitter(graph, f"{PREFIX}_rescale/{index}", shared)
    f = rescale.op("Cast", [leaving], np.float32, to=TensorProto.FLOAT)
    requant = _requantizers(out, graph) if q_bias is not None else None
    if requant is not None:
        # re-quantized at once: code = QuantizeLinear(float32(acc + b) · float32(S_x·S_w / S_y), 1, Z_y), the
        # integer kernel's requantization, which the simulation computes (FakeQuantize._requantize): the same codes
        relu, quantizers, s_y = requant
        multiplier = (scale / np.float32(s_y)).astype(np.float32)
        v = rescale.op("Mul", [f, rescale.const(multiplier.reshape(bshape), "multiplier")], np.float32)
        one = rescale.const(np.array(1.0, np.float32), "unit_scale")
        if relu is not None:
            relu.inputs[0] = v
            if relu.op == "Clip":  # ReLU6's bounds in the units of v (codes before the zero point): y / S_y
                for k in (1, 2):
                    if len(relu.inputs) > k and relu.inputs[k] is not None and relu.inputs[k].name:
                        bound = np.float32(np.float32(_scalar_constant(relu.inputs[k])) / np.float32(s_y))
                        relu.inputs[k] = rescale.const(np.array(bound, np.float32), "clip_bound")
        for q in quantizers:
            if relu is None:
                q.inputs[0] = v
            q.inputs[1] = one
    elif q_bias is not None or m.bias is None:  # float32(acc + b) · float32(S_x·S_w): an integer kernel's float output
        rescale.op("Mul", [f, rescale.const(scale.reshape(bshape), "scale")], np.float32, output=out)
    else:  # a bias off the accumulator grid: float(acc) · (S_x·S_w) + b
        f = rescale.op("Mul", [f, rescale.const(scale.reshape(bshape), "scale")], np.float32)
        bias = m.bias
        if m.kind == "conv":
            b = _const_array(bias, inits)
            if b is not None:
                bias = rescale.const(b.astype(np.float32).reshape(bshape), "bias")
            else:
                bias = rescale.op("Unsqueeze", [bias, rescale.i64([0] + list(range(2, len(bshape))), "axes")],
                                  np.float32)
        rescale.op("Add", [f, bias], np.float32, output=out)
    return {
        "layer": layer.name,
        "op": layer.op,
        "module": _module_name(m),
        "weight_levels": m.weight.label,
        "activation": {"kind": m.act.kind, "codes": m.act.codes.name, "zero_point": m.act.zero_point,
                       "range": [m.act.lo, m.act.hi]},
        "entries": [m.act.codes.name],
        "accumulator": acc.name,
        "accumulator_dtype": f"int{plan.width}",
        "output": leaving.name,
        "requantized": requant is not None,
        "bound": plan.bound,
        "planes": [list(p) for p in plan.planes],
        "groups": [list(gr) for gr in plan.groups],
        "nodes": region,
        "rescale_nodes": rescale.names,
        "cost": plan.cost,
    }


def _integer_bias(m: _Match, inits: dict, acc_scale: np.ndarray, n_out: int) -> Optional[np.ndarray]:
    """The layer's bias in accumulator units (int64 ``[n_out]``; zeros without a bias), or None where it is not on
    the accumulator grid ``float32(S_x·S_w)``. The int8 layers' biases are on it (``QuantizeBias``), stored as a
    float32 bias (within float32 rounding of ``q·S_x·S_w``) or as ``DequantizeLinear(int32 codes, S_x·S_w)``."""
    import onnx_graphsurgeon as gs

    if m.bias is None:
        return np.zeros(n_out, np.int64)
    b = _const_array(m.bias, inits)
    if b is None:
        dq = _producer(m.bias)
        if dq is None or dq.op != "DequantizeLinear" or len(dq.inputs) < 2:
            return None
        codes = _const_array(dq.inputs[0], inits)
        if len(dq.inputs) > 2 and dq.inputs[2] is not None and dq.inputs[2].name:
            zp = _const_array(dq.inputs[2], inits)
            if zp is None or np.any(zp != 0):
                return None
        s = _const_array(dq.inputs[1], inits)
        mul = _producer(dq.inputs[1]) if s is None else None
        if mul is not None and mul.op == "Mul" and len(mul.inputs) == 2:  # S_x · S_w, computed in the file
            a, c = (_const_array(t, inits) for t in mul.inputs)
            if a is not None and c is not None:
                s = (a.astype(np.float32) * c.astype(np.float32)).astype(np.float32)
        if codes is None or s is None or codes.dtype != np.int32 or codes.size != n_out:
            return None
        s = np.broadcast_to(s.astype(np.float32).reshape(-1), (n_out,))
        if not np.array_equal(s, acc_scale.reshape(-1)):
            return None
        return codes.astype(np.int64).reshape(-1)
    if not isinstance(m.bias, gs.Constant) or b.size != n_out or not np.issubdtype(b.dtype, np.floating):
        return None
    units = b.astype(np.float64).reshape(-1) / acc_scale.astype(np.float64).reshape(-1)
    q = np.round(units)
    # float32 holds q·S_x·S_w to 2^-24 of itself: a bias of 26 656 units was 0.0016 units off its integer, and
    # taken as off the grid (a second rounding in the layers of MobileNetV2's linear bottlenecks)
    if not np.all(np.isfinite(units)) or np.any(np.abs(units - q) > 1e-3 + np.abs(q) * 2.0 ** -22) \
            or np.any(np.abs(q) >= 2 ** 22):
        return None
    return q.astype(np.int64)


def _scalar_constant(t) -> Optional[float]:
    """The value of a one-element constant: an initializer, or a ``Constant`` node's output (the ReLU6 bounds
    torch.onnx writes); else None."""
    import onnx_graphsurgeon as gs

    if not isinstance(t, gs.Constant):
        node = _producer(t)
        value = node.attrs.get("value") if node is not None and node.op == "Constant" else None
        if value is None:
            return None
        t = value
    values = np.asarray(t.values if isinstance(t, gs.Constant) else t)
    return float(values.reshape(())) if values.size == 1 and values.dtype.kind == "f" else None


def _requantizers(out, graph) -> Optional[tuple]:
    """``(rectifier or None, [QuantizeLinear nodes], S_y)`` where the layer's output ``out`` is read only by
    ``QuantizeLinear`` nodes with one constant per-tensor scale ``S_y`` (directly, or all through one ``Relu`` or
    ``Clip`` with constant bounds, ReLU6): what onnxruntime fuses into the integer layer, re-quantizing its
    accumulator. Else None."""
    import onnx_graphsurgeon as gs

    outputs = {t.name for t in graph.outputs}
    if out.name in outputs:
        return None
    users = list(out.outputs)
    relu = None
    if len(users) == 1 and users[0].op in ("Relu", "Clip"):
        relu = users[0]
        if relu.outputs[0].name in outputs:
            return None
        if relu.op == "Clip" and (relu.attrs or any(t is not None and t.name and _scalar_constant(t) is None
                                                     for t in relu.inputs[1:])):
            return None  # bounds computed in the graph (or opset-6 attributes): not rescaled here
        users = list(relu.outputs[0].outputs)
    if not users or any(u.op != "QuantizeLinear" for u in users):
        return None
    scales = set()
    for q in users:
        s = q.inputs[1] if len(q.inputs) > 1 else None
        if not isinstance(s, gs.Constant) or np.asarray(s.values).size != 1:
            return None
        scales.add(float(np.asarray(s.values, dtype=np.float32).reshape(())))
        if int(q.attrs.get("saturate", 1)) != 1 or len(q.inputs) < 3 or not isinstance(q.inputs[2], gs.Constant):
            return None
        if np.asarray(q.inputs[2].values).dtype not in (np.uint8, np.int8):
            return None
    if len(scales) != 1 or not next(iter(scales)) > 0.0:
        return None
    return relu, users, next(iter(scales))


def _module_name(m: _Match) -> str:
    """Best-effort module name: the prefix of the bias initializer (``conv2.bias`` -> ``conv2``), else the
    exporter's node name (``/fc1/Gemm`` -> ``fc1``: a Gemm's bias is stored as int32 codes under another name)."""
    if m.bias is not None and m.bias.name.endswith(".bias"):
        return m.bias.name[: -len(".bias")]
    parts = (getattr(m.node, "name", "") or "").split("/")
    if parts[0] == "" and len(parts) > 2:
        return ".".join(parts[1:-1])
    return ""


# -- the pass ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoweringResult:
    model: onnx.ModelProto
    modified: bool
    layers: list             # one record per lowered layer (also in metadata_props[REGION_KEY])
    skipped: list            # {"layer", "op", "reason"} for Conv/Gemm/MatMul left as they were


def refuse_custom_form(model: onnx.ModelProto) -> None:
    """The lowering reads the standard form's DequantizeLinear weights; the custom form's ``qcompile.*`` quantizer
    nodes would have every layer skipped as 'not quantized'."""
    from .errors import UserError

    if any(n.domain == "qcompile" for n in model.graph.node):
        raise UserError("this file is the custom form (--emit custom), whose qcompile.* quantizer nodes the shift-add "
                        "lowering does not read; lower the standard form (compile with --emit shift-add, or lower "
                        "the file --emit standard wrote)")


class LowerShiftAdd:
    """ONNX pass: lower APoT/PoT Conv/Gemm/MatMul layers of a standard-form model to shift-add integer regions.

    ``LowerShiftAdd(decomposition="naf", pack_masks=True, check=None)(model) -> LoweringResult``; the input
    model is not changed. ``check`` (``None``: follow ``QCOMPILE_CHECK=1``) runs :func:`check_shift_add` and
    ``onnx.checker`` (full) on the result.
    """

    def __init__(self, decomposition: str = "naf", pack_masks: bool = True, check: Optional[bool] = None):
        if decomposition not in DECOMPOSITIONS:
            raise ValueError(f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
        self.decomposition = decomposition
        self.pack_masks = pack_masks
        self.check = check if check is not None else os.environ.get("QCOMPILE_CHECK") == "1"

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, model: onnx.ModelProto) -> LoweringResult:
        import onnx_graphsurgeon as gs

        refuse_custom_form(model)
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        inits = _initializers(inferred)
        graph = gs.import_onnx(inferred)
        matches, skipped = match_layers(graph, inits)  # collect first, then rewrite
        previous = _read_records(model)
        plans, kept = [], []
        for m in matches:  # a layer whose sums could pass int64 (PoT-6 weights on PoT-5 codes) stays as it is
            try:
                plans.append(plan_layer(m, self.decomposition))
                kept.append(m)
            except ValueError as exc:
                skipped.append({"layer": m.node.name, "op": m.node.op, "reason": str(exc).split(": ", 1)[-1]})
        matches = kept
        if not matches:
            return LoweringResult(model, False, previous, skipped)
        planes_cache: dict = {}
        shared: dict = {"tag": str(len(previous)) if previous else ""}  # unique names when lowering twice
        records = [_lower_one(graph, m, p, planes_cache, self.pack_masks, len(previous) + i, inits, shared)
                   for i, (m, p) in enumerate(zip(matches, plans))]
        _cleanup_keeping(graph, _activation_tensors(model))
        out = gs.export_onnx(graph)
        _copy_model_fields(model, out)
        del out.graph.value_info[:]  # stale after the rewrite; checker and runtime infer shapes again
        _write_records(out, previous + records)
        if self.check:
            onnx.checker.check_model(out, full_check=True)
            check_shift_add(out)
        return LoweringResult(out, True, previous + records, skipped)


def lower_shift_add(model: onnx.ModelProto, decomposition: str = "naf", pack_masks: bool = True,
                    check: Optional[bool] = None) -> onnx.ModelProto:
    """Lower every APoT/PoT Conv/Gemm/MatMul of a standard-form ``model`` (see the module docstring); ``model``
    may also be the path of the .onnx file."""
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(model)
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"lower_shift_add takes an onnx.ModelProto or the path of an .onnx file, not a "
                        f"{type(model).__name__}")
    return LowerShiftAdd(decomposition, pack_masks, check)(model).model


def _activation_tensors(model: onnx.ModelProto) -> list[str]:
    from .emit import activation_map

    return [a["tensor"] for a in activation_map(model)]


def _cleanup_keeping(graph, names: list[str]) -> None:
    """Drop dead nodes, but keep the tensors of the activation map (``qcompile.activations``): the validator
    reads the dequantized activations from them even where only lowered layers consumed them."""
    tensors = graph.tensors()
    keep = [tensors[n] for n in names if n in tensors and n not in {o.name for o in graph.outputs}]
    outputs = list(graph.outputs)
    graph.outputs = outputs + keep
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    graph.outputs = outputs


def _copy_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    dst.ir_version = src.ir_version
    dst.producer_name, dst.producer_version = src.producer_name, src.producer_version
    del dst.opset_import[:]
    dst.opset_import.extend(src.opset_import)
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)


def _read_records(model: onnx.ModelProto) -> list:
    meta = {p.key: p.value for p in model.metadata_props}
    return json.loads(meta[REGION_KEY])["layers"] if REGION_KEY in meta else []


def _write_records(model: onnx.ModelProto, records: list) -> None:
    for prop in list(model.metadata_props):
        if prop.key == REGION_KEY:
            model.metadata_props.remove(prop)
    model.metadata_props.add(key=REGION_KEY, value=json.dumps({"version": 1, "layers": records}))


def lowered_layers(model: onnx.ModelProto) -> list:
    """The per-layer records of a lowered model (empty for a model that was not lowered)."""
    return _read_records(model)


# -- verifier ------------------------------------------------------------------------------------------------
_INTEGER_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32,
                  TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64, TensorProto.INT4, TensorProto.UINT4,
                  TensorProto.INT2, TensorProto.UINT2}
#: ops allowed inside a region; none of them multiplies (the 0/1-mask products and BitShift are checked further)
_ALLOWED_OPS = {"Cast", "Sub", "Add", "Max", "ReduceSum", "BitShift", "BitwiseAnd", "ConvInteger", "MatMulInteger",
                "Concat", "Reshape", "Shape", "Slice", "Gather", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
#: ops through which a set of constant values passes unchanged (the mask tables to the mask operand)
_VALUE_PRESERVING = {"Gather": 0, "Reshape": 0, "Transpose": 0, "Identity": 0, "Squeeze": 0, "Unsqueeze": 0,
                     "Cast": 0}


def verify_shift_add(model: onnx.ModelProto) -> list[str]:
    """Check the shift-add claim on every lowered region; return the violations (empty: the claim holds).

    For every region recorded in ``metadata_props["qcompile.shift_add"]``:

    1. its nodes exist, and every tensor a region node reads or writes has an integer element type (initializer
       type, or ONNX type inference): no float value inside a region;
    2. every region node is one of ``Cast`` (to an integer type), ``Add``, ``Sub``, ``Max``, ``ReduceSum``,
       ``BitShift``, ``BitwiseAnd``, ``ConvInteger``, ``MatMulInteger``, ``Concat``, ``Reshape``, ``Shape``,
       ``Slice``, ``Gather``, ``Transpose``, ``Squeeze``, ``Unsqueeze``, ``Identity`` -- so no ``Mul``, ``Div``,
       ``MatMul``, ``Conv``, ``Gemm``, ``Pow``, ``Einsum`` or ``QLinear*``;
    3. every ``BitShift`` shifts by a constant (``x << k`` is ``x * 2**k``, ``x >> k`` a floor division by
       ``2**k``), and every ``ConvInteger`` / ``MatMulInteger`` has no zero-point inputs and a constant weight
       operand whose values all lie in {0, 1} (followed through ``Gather``/``Reshape``/``Transpose``/``Cast``
       back to initializers): a product with a 0/1 value selects, so these ops only add. Together: no
       multiplication by anything but a power of two;
    4. it is closed: each input of a region node comes from a region node, an initializer, or a declared entry
       tensor (the integer activation codes);
    5. the accumulator is produced inside the region (and its integer bias added there, ``output`` of the record),
       and outside it is only read by one ``Cast`` to float followed by one ``Mul`` by a constant (the single
       rescale), or by graph outputs.
    """
    records = _read_records(model)
    problems: list[str] = []
    if not records:
        return problems
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    inits = {t.name: t for t in g.initializer}
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    nodes_by_name = {n.name: n for n in g.node}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}

    def is_const(name: str, depth: int = 0) -> bool:
        """Computed from initializers only (through any ops)."""
        if name in inits:
            return True
        node = producer.get(name)
        return node is not None and depth < 32 and all(is_const(i, depth + 1) for i in node.input if i)

    def const_values(name: str, depth: int = 0) -> Optional[set]:
        """The set of values a constant tensor can hold, following value-preserving ops; None if unknown."""
        if name in inits:
            return set(np.unique(numpy_helper.to_array(inits[name]).astype(np.int64)).tolist())
        node = producer.get(name)
        if node is None or node.op_type not in _VALUE_PRESERVING or depth > 16:
            return None
        if not all(is_const(i) for i in node.input if i):
            return None
        return const_values(node.input[_VALUE_PRESERVING[node.op_type]], depth + 1)

    for rec in records:
        where = f"region of {rec['layer']}"
        region = set(rec["nodes"])
        missing = [n for n in rec["nodes"] if n not in nodes_by_name]
        if missing:
            problems.append(f"{where}: nodes missing from the graph: {missing[:3]}")
            continue
        produced = {o for name in region for o in nodes_by_name[name].output}
        entries = set(rec["entries"])
        for e in entries:
            if types.get(e) not in _INTEGER_TYPES:
                problems.append(f"{where}: entry tensor {e} is not an integer tensor")
        for name in rec["nodes"]:
            node = nodes_by_name[name]
            if node.op_type not in _ALLOWED_OPS:
                problems.append(f"{where}: {node.op_type} node {name} is not an addition/shift/data-movement op")
            for t in list(node.input) + list(node.output):
                if t and types.get(t) not in _INTEGER_TYPES:
                    problems.append(f"{where}: tensor {t} of {node.op_type} {name} is not an integer tensor "
                                    f"(type {types.get(t)})")
            for t in node.input:
                if t and t not in produced and t not in inits and t not in entries:
                    problems.append(f"{where}: {name} reads {t}, which is neither in the region, an "
                                    f"initializer nor a declared entry")
            if node.op_type == "BitShift" and (len(node.input) < 2 or not is_const(node.input[1])):
                problems.append(f"{where}: BitShift {name} shifts by a non-constant amount")
            if node.op_type in ("ConvInteger", "MatMulInteger"):
                if any(i for i in node.input[2:]):
                    problems.append(f"{where}: {node.op_type} {name} has zero-point inputs")
                vals = const_values(node.input[1])
                if vals is None:
                    problems.append(f"{where}: {node.op_type} {name} has a non-constant weight operand")
                elif not vals <= {0, 1}:
                    problems.append(f"{where}: {node.op_type} {name} multiplies by {sorted(vals - {0, 1})[:5]}, "
                                    f"not a 0/1 mask")
        acc = rec["accumulator"]
        leaving = rec.get("output", acc)  # the accumulator, or the accumulator plus the integer bias
        if acc not in produced or leaving not in produced:
            problems.append(f"{where}: accumulator {acc if acc not in produced else leaving} is not produced in the "
                            "region")
            continue
        if leaving != acc and any(n.name not in region for n in consumers.get(acc, [])):
            problems.append(f"{where}: the accumulator {acc} is read outside the region before its bias is added")
        acc = leaving
        outside = [n for n in consumers.get(acc, []) if n.name not in region]
        ok = len(outside) == 1 and outside[0].op_type == "Cast" and \
            next(a.i for a in outside[0].attribute if a.name == "to") == TensorProto.FLOAT
        if ok:
            users = consumers.get(outside[0].output[0], [])
            ok = len(users) == 1 and users[0].op_type == "Mul" and \
                any(i in inits for i in users[0].input if i != outside[0].output[0])
        if not ok and not (not outside and acc in graph_outputs):
            problems.append(f"{where}: the accumulator is not read by exactly one Cast-to-float and Mul-by-constant "
                            f"rescale")
    return problems


def check_shift_add(model: onnx.ModelProto) -> None:
    """Raise :class:`ShiftAddVerificationError` listing the violations of :func:`verify_shift_add`."""
    problems = verify_shift_add(model)
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ShiftAddVerificationError("shift-add verification failed: " + "; ".join(problems[:5]) + more)
