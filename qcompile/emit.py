"""Emission: replace the exporter's ``qcompile::FakeQuant`` markers with real ONNX.

``--emit standard`` (default) uses only standard operators, so any onnxruntime runs the file:

- **weights** become integer initializers packed at their bit-width with ``DequantizeLinear`` (scale = the
  fine-grid unit α/denom, per output channel on axis 0):
  uniform levels store the codes directly (INT2 for 2-bit and ternary levels, INT4 for 3-4 bits, INT8 otherwise;
  a file with 2-bit storage has opset 25, the first where Cast/DequantizeLinear take INT2/UINT2);
  APoT/PoT/log2 levels store the *level index* (UINT2 up to 4 levels, UINT4 up to 16, UINT8 otherwise) and a
  small lookup table
  of grid integers, ``DequantizeLinear(Gather(lut, Cast(index)))``. onnxruntime folds the lookup at load time into
  an int8 constant, so an APoT layer whose grid fits int8 runs on its int8 kernels (QLinearConv / QGemm) when
  its output is re-quantized, and the file stays at ``bits`` per weight.
- **uniform activations**: ``QuantizeLinear → DequantizeLinear`` (uint8/int8, zero point for asymmetric
  levels), with a ``Clip`` in front where the level range is narrower than the storage type (restricted or
  < 8-bit ranges). The simulation uses the same float32 division and round-half-to-even, so codes agree.
- **APoT/PoT/log2 activations**: the nearest level with the simulation's decisions, bit for bit, by a *cell
  table* wherever the grid spans at most 127 integers (APoT and log2 up to their common widths, PoT to 3 bits;
  see :func:`emit_cell_lookup`): ``QuantizeLinear`` onto half-unit cells centred on the decision thresholds, one
  exact comparison with the threshold of the cell (``Sub``, then ``QuantizeLinear`` with a tiny scale as a
  three-way sign), one lookup of the level in a ``3 x cells`` table that also encodes the tie rule. Wider
  grids use a branchless binary search over the float32 thresholds (lookup + ``Greater`` + ``Where``,
  log2(levels) steps; ties by nudging the "tie goes up" thresholds one ulp down). Both end in
  ``DequantizeLinear(grid codes[index], unit)``. Lookups of activation-sized indices are ``GatherElements`` on the
  flattened index (:meth:`_Builder.lookup`): onnxruntime's ``Gather`` copies a block per index and was 7 of the
  12 ms of a 4-bit APoT activation on a 1x96x112x112 tensor with 2 threads (``GatherElements``: ~2 ms; a
  ``QuantizeLinear`` alone is ~0.6 ms).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile import quant
from qcompile.qmodules import MARKER_DOMAIN, MARKER_OP, FakeQuantize


def node_reads(nodes) -> set[str]:
    """Every tensor name the nodes read, including those read from the outer scope inside their subgraph
    attributes (the bodies of ``Loop``/``If``/``Scan``, at any depth: torch.onnx writes ``nn.EmbeddingBag`` as a
    ``Loop`` whose body gathers from the bag's weight). A pass that drops an initializer or node no top-level node
    reads must use this, or a body is left naming a tensor that no longer exists."""
    read: set[str] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        read.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                stack.extend(a.g.node)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    stack.extend(g.node)
    return read


def _require_module(gm, what: str) -> None:
    """A pipeline's PassResult given where its graph module belongs: "'PassResult' object has no attribute
    'named_modules'" from deep inside before."""
    if not isinstance(gm, torch.nn.Module):
        from qcompile.errors import UserError

        hint = ": a pipeline (or a pass) returns a PassResult, its graph module is .gm" \
            if type(gm).__name__ == "PassResult" else ""
        raise UserError(f"{what} takes a graph module, got {type(gm).__name__}{hint}")


def quantizers_by_id(gm: torch.nn.Module) -> dict[int, FakeQuantize]:
    """Give every FakeQuantize of ``gm`` a stable id (its order in ``named_modules``) and return the map."""
    _require_module(gm, "quantizers_by_id")
    table = {}
    for i, (name, mod) in enumerate((n, m) for n, m in gm.named_modules() if isinstance(m, FakeQuantize)):
        mod.prepare_export(i, name)
        table[i] = mod
    return table


class _Builder:
    """Collects new nodes and initializers with unique names.

    ``shared`` (one dict for the whole model) holds small constants that many quantizers use with the same value
    (the binary search's offsets): :meth:`shared_const` stores each such value once per model."""

    def __init__(self, prefix: str, shared: dict | None = None, u8_weights: bool = False):
        self.prefix = prefix
        self.u8_weights = u8_weights  # store 8-bit weight grids beyond ±64 as uint8 with zero point 128
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shared = shared if shared is not None else {}
        self.shape: list | None = None  # the quantized tensor's dims (int, or str when symbolic), where known
        # the file's inputs have sizes that may change beyond the batch (dynamic_axes): the dims above are the
        # example's, which no constant may hold (lookups reshape back to the index's own shape at run time)
        self.dynamic = False
        self._n = 0
        self.post: list = []  # fn(model) to run once every marker is replaced (see after)

    def after(self, fn) -> None:
        """Run ``fn(model)`` after all markers of the model are replaced (edits outside this quantizer's nodes)."""
        self.post.append(fn)

    def name(self, what: str) -> str:
        self._n += 1
        return f"{self.prefix}/{what}_{self._n}"

    def node_name(self) -> str:
        """``q12/3``: the quantizer (or layer) and a counter; the op type is in the node already, and the longer
        ``q12/QuantizeLinear_3`` form was 1-2% of a small model's file."""
        self._n += 1
        return f"{self.prefix}/{self._n}"

    def const(self, array: np.ndarray, what: str) -> str:
        name = self.name(what)
        # np.require, not np.ascontiguousarray: that turns a 0-d array into shape (1,), and onnxruntime fuses
        # DequantizeLinear → Add → QuantizeLinear into QLinearAdd only when scales and zero points are scalars
        self.inits.append(numpy_helper.from_array(np.require(array, requirements="C"), name))
        return name

    def shared_const(self, array: np.ndarray, what: str) -> str:
        """A constant stored once per model for its (dtype, shape, value)."""
        array = np.require(array, requirements="C")
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.shared:
            self.shared[key] = f"{what}_{len(self.shared)}"
            self.inits.append(numpy_helper.from_array(array, self.shared[key]))
        return self.shared[key]

    def packed(self, values: np.ndarray, dtype: int, what: str) -> str:
        """A 2- or 4-bit (INT2/UINT2/INT4/UINT4) initializer stored as raw bytes, 4 or 2 values per byte, the first
        in the lowest bits (the ONNX layout)."""
        name = self.name(what)
        flat = np.asarray(values).ravel()
        if not np.issubdtype(flat.dtype, np.integer):
            flat = flat.astype(np.int64)
        width = {TensorProto.INT2: 2, TensorProto.UINT2: 2, TensorProto.INT4: 4, TensorProto.UINT4: 4}.get(dtype)
        if width is not None:
            per = 8 // width
            # the low bits of each value (two's complement for the signed types), in uint8 throughout: an int64 copy
            # and a reduce over (n, per) made VGG-11's APoT classifier 2.9 s
            parts = (flat & ((1 << width) - 1)).astype(np.uint8)
            parts = np.append(parts, np.zeros((-parts.size) % per, np.uint8)).reshape(-1, per)
            raw = parts[:, 0].copy()
            for j in range(1, per):
                raw |= parts[:, j] << np.uint8(j * width)
            self.inits.append(helper.make_tensor(name, dtype, values.shape, raw.tobytes(), raw=True))
        else:  # 8-bit and wider: raw bytes too (an int list would be written as int32 varints)
            np_type = onnx.helper.tensor_dtype_to_np_dtype(dtype)
            self.inits.append(numpy_helper.from_array(flat.astype(np_type).reshape(values.shape), name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        out = output or self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.node_name(), **attrs))
        return out

    def lookup(self, table: str, index: str, output: str | None = None) -> str:
        """``table[index]`` elementwise for an activation-sized ``index`` tensor (any shape): ``GatherElements`` on
        the flattened indices, reshaped back. onnxruntime's ``GatherElements`` reads one element per index where
        ``Gather`` copies a block per index: 2.2 vs 7.3 ms for 1.2 M uint8 entries on 2 threads; the Reshapes
        are views."""
        dims = self.shape
        if dims is not None and len(dims) == 1:
            return self.node("GatherElements", [table, index], output, axis=0)
        flat = self.node("Reshape", [index, self.shared_const(np.array([-1], np.int64), "flat")])
        values = self.node("GatherElements", [table, flat], axis=0)
        if dims is not None and len(dims) > 1 and all(isinstance(d, int) and d > 0 for d in dims[1:]):
            back = self.shared_const(np.array([-1] + [int(d) for d in dims[1:]], np.int64), "shape")
        else:  # more than the batch dimension unknown: the index's own shape, at run time
            back = self.node("Shape", [index])
        return self.node("Reshape", [values, back], output)


def act_code_type(lo: int, hi: int) -> tuple[int, np.dtype]:
    """Storage of activation codes: uint8 wherever they fit (onnxruntime fuses only uint8 activations into its
    int8 convolutions on x86), else the smallest signed type."""
    if lo >= 0 and hi <= 255:
        return TensorProto.UINT8, np.uint8
    return _int_type(lo, hi)


def act_storage(grid: np.ndarray) -> tuple[np.dtype, int]:
    """``(dtype, zero point)`` of APoT/PoT/log2 activation codes: the grid integers as uint8, shifted up by
    ``-grid[0]`` (the ``DequantizeLinear`` zero point) where the set reaches below 0 and spans at most 255 (the
    uint8 activations onnxruntime's int8 convolutions take); else the grid integers in the smallest type."""
    lo, hi = int(grid.min()), int(grid.max())
    if lo < 0 and hi - lo <= 255:
        return np.uint8, -lo
    return act_code_type(lo, hi)[1], 0


def _dequantize_codes(b: "_Builder", codes: str, unit: np.ndarray, zp: int, g_np, output: str) -> None:
    """``DequantizeLinear(codes, unit, zp)``; the zero point is explicit for 8-bit codes even where it is 0:
    onnxruntime fuses ``DequantizeLinear → Gemm → QuantizeLinear`` into ``QGemm`` only with explicit zero points.
    32-bit codes: ``Mul(Cast(codes), unit)`` (see :func:`_float_dequantize`)."""
    if np.dtype(g_np) == np.int32:
        _float_dequantize(b, codes, b.const(unit, "a_scale"), output)
        return
    inputs = [codes, b.const(unit, "a_scale")]
    if zp or np.dtype(g_np).itemsize == 1:
        inputs.append(b.shared_const(np.array(zp, g_np), "a_zp"))
    b.node("DequantizeLinear", inputs, output)


def _float_dequantize(b: "_Builder", codes: str, scale: str, output: str) -> None:
    """``Mul(Cast(codes, float), scale)`` for 32-bit codes (PoT/log2 activations at 5 bits, weights at 6): the
    values of ``DequantizeLinear`` (an exact integer, one rounding of the product), but no QDQ node for
    onnxruntime. Its QDQ propagation moves a ``DequantizeLinear`` past a Reshape or Unsqueeze by inserting a
    ``QuantizeLinear`` of the same type, which it has no int32 kernel for; and its bias quantization puts the
    bias of a layer between ``DequantizeLinear``s on the int32 grid S_x·S_w, which overflows at these units
    (``passes.quantize_bias.float_bias``)."""
    b.node("Mul", [b.node("Cast", [codes], to=TensorProto.FLOAT), scale], output)


def _int_type(lo: int, hi: int) -> tuple[int, np.dtype]:
    if lo >= -128 and hi <= 127:
        return TensorProto.INT8, np.int8
    if lo >= 0 and hi <= 255:
        return TensorProto.UINT8, np.uint8
    if lo >= -32768 and hi <= 32767:
        return TensorProto.INT16, np.int16
    return TensorProto.INT32, np.int32


SATURATION_FREE = 64  # |w| <= 64: 255·64 + 255·64 < 2^15, so no uint8 × int8 kernel saturates (x86 pmaddubsw)


def u8_storage(b: _Builder, grid: np.ndarray) -> bool:
    """Whether weights on ``grid`` are stored as uint8 = code + 128 with zero point 128 (see ``int8_weights``)."""
    lo, hi = int(grid.min()), int(grid.max())
    return b.u8_weights and max(-lo, hi) > SATURATION_FREE and lo >= -128 and hi <= 127


def _unit(fq: FakeQuantize) -> np.ndarray:
    return quant.unit_from_alpha(fq.alpha, fq.levelset).detach().numpy().astype(np.float32)


def grid_index(grid: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The index of each code on the sorted integer ``grid`` (int16), by a table over the grid's span: a searchsorted
    of VGG-11's 102 M classifier codes took 4 s (a searchsorted where the span is too wide for a table: PoT-6
    weights span 2^31 integers). Every code must be a grid value."""
    lo, hi = int(grid.min()), int(grid.max())
    if hi - lo >= 1 << 20:
        index = np.searchsorted(grid, codes)
        assert codes.size == 0 or np.array_equal(grid[np.minimum(index, len(grid) - 1)], codes), \
            "weight codes must lie on the level grid"
        return index.astype(np.int16)
    where = np.full(hi - lo + 1, -1, np.int16)  # -1: integers between levels, which no code may be
    where[grid - lo] = np.arange(len(grid))
    if codes.size == 0:
        return np.zeros(codes.shape, np.int16)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi, "weight codes must lie on the level grid"
    index = where[codes - lo]
    assert int(index.min()) >= 0, "weight codes must lie on the level grid"
    return index


def emit_weight(b: _Builder, fq: FakeQuantize, w: np.ndarray, output: str, transpose: bool = False) -> None:
    """Packed weight codes + DequantizeLinear producing ``output``; ``transpose`` stores W^T (2-D, for MatMul)."""
    ls = fq.levelset
    codes = fq.quantize(torch.from_numpy(w)).numpy().astype(np.int64)
    unit = _unit(fq)
    axis_value = fq.axis
    if transpose:
        codes = np.ascontiguousarray(codes.T)
        axis_value = None if fq.axis is None else 1 - fq.axis
    axis = {"axis": axis_value} if axis_value is not None else {}
    grid = np.asarray(ls.grid, dtype=np.int64)
    u8 = u8_storage(b, grid)
    offset = 128 if u8 else 0
    if ls.is_uniform:
        lo, hi = int(grid.min()), int(grid.max())
        if lo >= -8 and hi <= 7:
            # INT2 (2-bit levels and ternary: -1..1) or INT4 storage, widened by a Cast that onnxruntime folds at
            # load time: its QDQ fusion takes int8 weights only, so without it a 2-4-bit uniform layer never
            # reaches the int8 kernels
            small = TensorProto.INT2 if lo >= -2 and hi <= 1 else TensorProto.INT4
            what = "w_int2" if small == TensorProto.INT2 else "w_int4"
            q = b.node("Cast", [b.packed(codes, small, what)], to=TensorProto.INT8)
        elif u8:
            q = b.const((codes + offset).astype(np.uint8), "w_u8")
        else:
            t, np_t = _int_type(lo, hi)
            q = b.const(codes.astype(np_t), "w_int")
    else:
        index = grid_index(grid, codes)
        itype = TensorProto.UINT2 if len(grid) <= 4 else TensorProto.UINT4 if len(grid) <= 16 else TensorProto.UINT8
        idx = b.packed(index, itype, "w_index")
        lut_t = np.uint8 if u8 else _int_type(int(grid.min()), int(grid.max()))[1]
        lut = b.const((grid + offset).astype(lut_t), "w_lut")
        idx32 = b.node("Cast", [idx], to=TensorProto.INT32)
        q = b.node("Gather", [lut, idx32], axis=0)
    if ls.storage_dtype == "int32":  # PoT/log2 6-bit weights: float dequantization, per channel on its axis
        shape = [1] * codes.ndim
        if axis_value is not None:
            shape[axis_value] = -1
        _float_dequantize(b, q, b.const(unit.reshape(shape) if axis_value is not None else unit, "w_scale"), output)
        return
    inputs = [q, b.const(unit, "w_scale")]
    if u8:
        inputs.append(b.const(np.full(unit.shape, offset, np.uint8), "w_zp"))
    b.node("DequantizeLinear", inputs, output, **axis)


# onnxruntime's ClipQuantFusion (EXTENDED and ALL) drops a Clip in front of a QuantizeLinear whose bounds it finds
# within an absolute ~1.2e-7 of the quantizer's own saturation range: for a level range narrower than the storage type
# at a unit of 5e-10 and below (a MobileNetV3 channel at 2.4e-11), every value then reached the type's range, not the
# levels'. Below this gap the level range is clipped on the codes instead (the same codes: the rounding is monotone).
CLIP_FUSION_GAP = 1e-5


def clip_on_codes(fq: FakeQuantize) -> bool:
    """Whether the uniform activation ``fq`` clips its level range on the integer codes (``QuantizeLinear → Clip →
    DequantizeLinear``) rather than on the float values: where onnxruntime would take the float Clip for the
    quantizer's own saturation (``CLIP_FUSION_GAP``)."""
    ls = fq.levelset
    unit = float(_unit(fq).reshape(()))
    tmin, tmax = (0, 255) if ls.code_min >= 0 else (-128, 127)
    gaps = [g for g in ((ls.code_min - tmin) * unit, (tmax - ls.code_max) * unit) if g > 0]
    return bool(gaps) and min(gaps) < CLIP_FUSION_GAP


def emit_activation(b: _Builder, fq: FakeQuantize, x: str, output: str) -> None:
    ls = fq.levelset
    unit = _unit(fq).reshape(())
    grid = np.asarray(ls.grid, dtype=np.int64)
    if ls.is_uniform:
        zp = int(fq.zero_point)
        lo, hi = ls.code_min, ls.code_max  # stored code range; real value = (code - zp) * unit
        if lo >= 0:
            np_t, tmin, tmax = np.uint8, 0, 255
        else:
            np_t, tmin, tmax = np.int8, -128, 127
        if lo < tmin or hi > tmax:
            raise ValueError(f"activation codes {lo}..{hi} do not fit 8 bits")
        src = x
        scale = b.const(unit, "a_scale")
        zpt = b.const(np.array(zp, np_t), "a_zp")
        if (lo > tmin or hi < tmax) and (fq.requant is not None or clip_on_codes(fq)):
            # the re-quantized output of an int8 layer (BindIntegerLayers): QuantizeLinear right after the layer, so
            # onnxruntime fuses them into QLinearConv/QGemm, then the level range as an integer Clip (the same codes);
            # and a unit so small that onnxruntime would drop a float Clip (CLIP_FUSION_GAP)
            q = b.node("QuantizeLinear", [x, scale, zpt])
            clipped = b.node("Clip", [q, b.shared_const(np.array(lo, np_t), "code_lo"),
                                      b.shared_const(np.array(hi, np_t), "code_hi")])
            b.node("DequantizeLinear", [clipped, scale, zpt], output)
            b.after(lambda model: _bypass_implied_clip(model, x, q))
            return
        if lo > tmin or hi < tmax:
            # QuantizeLinear saturates to the type's range only: clip to the level range first (exact, see module doc)
            clip_lo = np.float32(np.float32(lo - zp) * unit)
            clip_hi = np.float32(np.float32(hi - zp) * unit)
            src = b.node("Clip", [x, b.const(np.array(clip_lo, np.float32), "lo"), b.const(np.array(clip_hi, np.float32), "hi")])
        q = b.node("QuantizeLinear", [src, scale, zpt])
        b.node("DequantizeLinear", [q, scale, zpt], output)
        return
    if fq.cells is not None:
        emit_cell_requant(b, fq, x, output)
        return
    if cell_table(ls, unit) is not None:
        emit_cell_lookup(b, fq, x, output)
        return
    thr, tie_up = quant.decision_thresholds(ls, torch.as_tensor(unit))
    thr = thr.detach().numpy().astype(np.float32).ravel()
    tie_up = tie_up.detach().numpy().astype(bool).ravel()
    # x >= t  <=>  x > nextafter(t, -inf) for float32 x: every decision becomes a strict Greater
    strict = np.where(tie_up, np.nextafter(thr, np.float32(-np.inf)), thr).astype(np.float32)
    steps = max(1, math.ceil(math.log2(len(grid))))
    padded = np.full(2 ** steps - 1, np.inf, dtype=np.float32)
    padded[: len(strict)] = strict
    table = b.const(padded, "thresholds")

    def scalar(v: int) -> str:
        return b.shared_const(np.array(v, np.int64), "i64")

    pos = None  # position 0: the first step probes and moves by constants
    for k in reversed(range(steps)):
        step = 2 ** k
        probe = scalar(step - 1) if pos is None else b.node("Add", [pos, scalar(step - 1)])
        t = b.node("Gather", [table, probe], axis=0) if pos is None else b.lookup(table, probe)
        cond = b.node("Greater", [x, t])
        if pos is None:
            pos = b.node("Where", [cond, scalar(step), scalar(0)])
        else:
            pos = b.node("Where", [cond, b.node("Add", [pos, scalar(step)]), pos])
    g_np, zp = act_storage(grid)
    codes = b.lookup(b.const((grid + zp).astype(g_np), "grid"), pos)
    _dequantize_codes(b, codes, unit, zp, g_np, output)


_MIN_CELL_UNIT = 2.0 ** -90  # below it a nonzero x - t could underflow the three-way sign (see emit_cell_lookup)


def cell_table(ls: "quant.LevelSet", unit: np.ndarray) -> np.ndarray | None:
    """The ``3 x cells`` level table of :func:`emit_cell_lookup` for a non-uniform level set, or ``None`` where
    that form does not apply (the grid spans more than 127 integers, or a unit too small for the sign test).

    Cell ``c`` is centred on ``k = c + 2 * grid[0]`` half-units; a decision threshold lies on a cell centre (the
    midpoint of two grid integers is a half-integer) and each cell holds at most one. Entry ``3c + s`` is the grid
    integer for ``x`` below (s=0), exactly on (s=1) or above (s=2) the centre of cell ``c``: the level below the
    cell's threshold, the level of the tie rule, the level above; all three equal where the cell has none."""
    grid = [int(g) for g in ls.grid]
    span = 2 * (grid[-1] - grid[0])
    half = float(unit) / 2.0
    if ls.is_uniform or span > 255 or -2 * grid[0] > 255 or not (float(unit) >= _MIN_CELL_UNIT) \
            or np.float32(half) * 2 != np.float32(unit):
        return None
    mids = {int(round(2 * m)): j for j, m in enumerate(ls.thresholds)}
    table = np.empty(3 * (span + 1), dtype=np.int64)
    below = 0
    for c in range(span + 1):
        j = mids.get(c + 2 * grid[0])
        if j is None:
            table[3 * c: 3 * c + 3] = grid[below]
            continue
        up = bool(ls.tie_up[j])
        table[3 * c: 3 * c + 3] = (grid[below], grid[below + 1] if up else grid[below], grid[below + 1])
        below += 1
    return table


def emit_cell_lookup(b: _Builder, fq: FakeQuantize, x: str, output: str) -> None:
    """Nearest level of ``x`` (per tensor) through the cell table, bit for bit the simulation's decision::

        xc  = Clip(x, grid[0] * unit, grid[-1] * unit)          # same side of every threshold as x
        c   = QuantizeLinear(xc, unit / 2, -2 * grid[0])        # uint8 cell; NaN -> 0
        t   = DequantizeLinear(c, unit / 2, -2 * grid[0])       # the cell centre = float32(mid) * unit exactly
        s   = QuantizeLinear(xc - t, 2^-126, 0)                 # int8 -128 | 0 | 127: below | on | above (NaN: below)
        i   = QuantizeLinear(3c + (s + 128) / 128, 1, 0)        # uint16 3c + 0 | 1 | 2 (1.99 rounds to 2)
        y   = DequantizeLinear(table[Cast(i, int32)], unit)     # GatherElements on the flattened i

    The cell of ``xc`` may be off by one where ``xc`` is within float rounding of a cell boundary, half a cell
    away from any threshold: the neighbouring cell gives the same level there. ``t`` is exact because
    ``unit / 2`` is (float32 halving) and ``(c - z) * (unit / 2)`` rounds the same real number as
    ``float32(mid) * unit``; ``xc - t`` is zero only when ``xc == t``, and otherwise at least an ulp of ``t``,
    which ``_MIN_CELL_UNIT`` keeps far above the 2^-127 the sign quantizer resolves."""
    ls = fq.levelset
    unit = _unit(fq).reshape(())
    table = cell_table(ls, unit)
    grid = np.asarray(ls.grid, dtype=np.int64)
    lo = np.float32(np.float32(grid[0]) * unit)
    hi = np.float32(np.float32(grid[-1]) * unit)
    xc = b.node("Clip", [x, b.const(np.array(lo, np.float32), "lo"), b.const(np.array(hi, np.float32), "hi")])
    half = b.const(np.array(unit / np.float32(2), np.float32), "half_unit")
    z = b.shared_const(np.array(-2 * grid[0], np.uint8), "cell_zp")
    cell = b.node("QuantizeLinear", [xc, half, z])
    centre = b.node("DequantizeLinear", [cell, half, z])
    sign = b.node("QuantizeLinear", [b.node("Sub", [xc, centre]), b.shared_const(np.array(2.0 ** -126, np.float32),
                                                                                  "tiny"),
                                     b.shared_const(np.array(0, np.int8), "i8_zero")])
    side = b.node("DequantizeLinear", [sign, b.shared_const(np.array(2.0 ** -7, np.float32), "side_scale"),
                                       b.shared_const(np.array(-128, np.int8), "side_zp")])
    base = b.node("DequantizeLinear", [cell, b.shared_const(np.array(3.0, np.float32), "three")])
    index = b.node("QuantizeLinear", [b.node("Add", [base, side]), b.shared_const(np.array(1.0, np.float32), "one"),
                                      b.shared_const(np.array(0, np.uint16), "u16_zero")])
    g_np, zp = act_storage(grid)
    codes = b.lookup(b.const((table + zp).astype(g_np), "cells"), b.node("Cast", [index], to=TensorProto.INT32))
    _dequantize_codes(b, codes, unit, zp, g_np, output)


def emit_cell_requant(b: _Builder, fq: FakeQuantize, x: str, output: str) -> None:
    """Levels of an int8 layer's output decided on its integer accumulator (``FakeQuantize.cells``, set by
    ``BindIntegerLayers``)::

        c = QuantizeLinear(x, unit / 2, z)                      # uint8 cells; the layer's bias carries the shift
        y = DequantizeLinear(table[Cast(c, int32)], unit)       # GatherElements on the flattened c

    onnxruntime fuses ``DequantizeLinear → Conv/Gemm → QuantizeLinear`` into ``QLinearConv``/``QGemm``, so ``c`` is
    ``clamp(round(float32(acc) · float32(S_x·S_w / (unit/2))) + z)`` as the simulation computes it. After all
    markers are replaced, :func:`_shift_cell_bias` adds the quarter-unit shift to the layer's bias and takes out a
    ReLU / clip the cells imply (onnxruntime removes a ReLU before a zero-point-0 quantizer itself, not a clip whose
    top is below the cells' range)."""
    ls = fq.levelset
    unit = _unit(fq).reshape(())
    shift, z, table, _ = fq.cells
    grid = np.asarray(ls.grid, dtype=np.int64)
    g_np, zp = act_storage(grid)
    cell = b.node("QuantizeLinear", [x, b.const(np.array(unit / np.float32(2), np.float32), "half_unit"),
                                     b.shared_const(np.array(z, np.uint8), "cell_zp")])
    lut = b.shared_const((np.asarray(table, dtype=np.int64) + zp).astype(g_np), "cell_levels")
    dims = b.shape
    if dims is not None and len(dims) == 4 and (b.dynamic or all(isinstance(d, int) and d > 0 for d in dims[1:])):
        # the lookup is elementwise: do it channels-last, between two Transposes that cancel against the ones
        # onnxruntime puts around its NHWC QLinearConv (measured: 0.89 -> 0.72 ms for a 96x56x56 lookup between two
        # 1x1 QLinearConvs; without them onnxruntime transposes to NCHW and back around every lookup)
        nhwc = b.node("Transpose", [cell], perm=[0, 2, 3, 1])
        b.shape = [dims[0], dims[2], dims[3], dims[1]]
        codes = b.lookup(lut, b.node("Cast", [nhwc], to=TensorProto.INT32))
        b.shape = dims
        codes = b.node("Transpose", [codes], perm=[0, 3, 1, 2])
    else:
        codes = b.lookup(lut, b.node("Cast", [cell], to=TensorProto.INT32))
    _dequantize_codes(b, codes, unit, zp, g_np, output)
    b.after(lambda model: _shift_cell_bias(model, x, cell, fq))


def _producers_and_readers(graph) -> tuple[dict, dict]:
    """The node writing each tensor, and how many nodes (or graph outputs) read it."""
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {o.name: 1 for o in graph.output}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    return producer, readers


def _graph_maps(graph) -> tuple[dict, dict, dict]:
    """The initializers by name, the node writing each tensor, and the nodes reading each tensor."""
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    return {t.name: t for t in graph.initializer}, producer, readers


def _private_layer_path(graph, q: onnx.NodeProto, x: str, fq: FakeQuantize) -> str:
    """Give the cells quantizer ``q`` (reading ``x``) a layer of its own: where the exporter merged equal
    computations (a module called twice on the same input: one ``Gemm → Relu`` read by two quantizers), copy the
    nodes from the layer to ``x`` for ``q``, as the model computes them twice. Returns what ``q`` reads now."""
    producer, readers = _producers_and_readers(graph)
    path, rect, src = [], None, x
    while True:
        node = producer.get(src)
        if node is None:
            return x
        if _passes_cells(node) or (node.op_type in ("Relu", "Clip") and rect is None):
            rect = node if node.op_type in ("Relu", "Clip") else rect
            path.append(node)
            src = node.input[0]
            continue
        if node.op_type not in ("Conv", "Gemm"):
            return x
        path.append(node)
        break
    if all(readers.get(n.output[0], 0) == 1 for n in path[1:]) and readers.get(x, 0) == 1:
        return x
    taken = {o for n in graph.node for o in n.output}
    renamed: dict[str, str] = {}
    position = min(list(graph.node).index(n) for n in path)
    for node in reversed(path):  # the layer first
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{node.name}/{fq.qname}" if node.name else ""
        copy.input[0] = renamed.get(copy.input[0], copy.input[0])
        name, k = f"{node.output[0]}/{fq.qname}", 1
        while name in taken:
            name, k = f"{node.output[0]}/{fq.qname}_{k}", k + 1
        taken.add(name)
        renamed[node.output[0]] = name
        copy.output[0] = name
        graph.node.insert(position, copy)
        position += 1
    q.input[0] = renamed[x]
    return renamed[x]


def _shift_cell_bias(model: onnx.ModelProto, x: str, cell: str, fq: FakeQuantize) -> None:
    """Make the integer layer before quantizer ``fq`` write its cells, as ``BindIntegerLayers._bind_cells``
    simulates it: ``Conv/Gemm → [Relu|Clip] → [MaxPool, Reshape, ...] → QuantizeLinear(cells)`` becomes
    ``Conv/Gemm → QuantizeLinear(cells) → [MaxPool, Reshape, ...]`` (the cell of a maximum is the maximum of the
    cells; the ReLU / clip is implied by the cells), and the Conv/Gemm bias gets ``fq.cells``' shift (accumulator
    units)."""
    graph = model.graph
    q = next(n for n in graph.node if n.output and n.output[0] == cell)
    x = _private_layer_path(graph, q, x, fq)
    producer, readers = _producers_and_readers(graph)
    chain, rect, src = [], None, x
    while True:
        node = producer.get(src)
        if node is None or readers.get(src, 0) != 1:
            break
        if _passes_cells(node):
            chain.append(node)
        elif node.op_type in ("Relu", "Clip") and rect is None:
            rect = node
        else:
            break
        src = node.input[0]
    layer = producer.get(src)
    if layer is None or layer.op_type not in ("Conv", "Gemm") or readers.get(src, 0) != 1:
        raise RuntimeError(f"internal: the integer layer before quantizer {fq.qname} is not a lone Conv/Gemm")
    if rect is not None:
        graph.node.remove(rect)
        for n in chain:  # the op that read the ReLU / clip reads the layer's output
            if n.input[0] == rect.output[0]:
                n.input[0] = rect.input[0]
    if chain:  # chain[0] is next to the quantizer: the ops now pass the cells on, and the lookup reads x
        for n in graph.node:
            if n is not q and cell in n.input:
                n.input[list(n.input).index(cell)] = x
        first = chain[-1]
        first.input[0] = cell
        q.input[0] = src
        moved = onnx.NodeProto()
        moved.CopyFrom(q)
        graph.node.remove(q)
        graph.node.insert(list(graph.node).index(first), moved)  # protobuf inserts a copy
    elif rect is not None:
        q.input[0] = src
    inits = {t.name: t for t in graph.initializer}
    acc_scale = fq.requant[0].detach().numpy().astype(np.float32).reshape(-1)
    shift = fq.cells[0].detach().numpy().reshape(-1)
    n_out = max(acc_scale.size, shift.size)
    if len(layer.input) > 2 and layer.input[2]:
        if layer.input[2] not in inits:
            raise RuntimeError(f"internal: the bias of the integer layer before quantizer {fq.qname} is computed "
                               "in the graph, not stored")
        bias = numpy_helper.to_array(inits[layer.input[2]]).astype(np.float32).reshape(-1)
    else:
        bias = np.zeros(n_out, np.float32)
    n_out = max(n_out, bias.size)
    acc = np.broadcast_to(acc_scale, (n_out,)).astype(np.float64)
    codes = np.rint(np.broadcast_to(bias, (n_out,)).astype(np.float64) / acc) + np.broadcast_to(shift, (n_out,))
    value = (codes * acc).astype(np.float32)
    old = layer.input[2] if len(layer.input) > 2 else ""
    if old in inits and readers.get(old, 0) == 1:  # the layer's own bias: new values, same name (cost reports)
        inits[old].CopyFrom(numpy_helper.from_array(value, old))
        return
    # a bias other layers read too (a layer called twice, equal biases the exporter stored once): a copy of its own
    name = f"{old}/cells" if old else f"{layer.output[0]}/cell_bias"
    taken = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    k = 1
    while name in taken:
        name = f"{old or layer.output[0]}/cells_{k}"
        k += 1
    graph.initializer.append(numpy_helper.from_array(value, name))
    while len(layer.input) < 3:
        layer.input.append("")
    layer.input[2] = name


def _bypass_implied_clip(model: onnx.ModelProto, x: str, q: str) -> None:
    """``Conv/Gemm → Clip(0, H) → QuantizeLinear`` where the quantizer's own code range implies the clip
    (``BindIntegerLayers`` checked it): the quantizer reads the layer, so onnxruntime fuses the two (it removes a
    ReLU before a zero-point-0 quantizer itself, not a clip narrower than the uint8 range)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers = sum(1 for n in graph.node for i in n.input if i == x) + sum(1 for o in graph.output if o.name == x)
    clip = producer.get(x)
    if clip is None or clip.op_type != "Clip" or readers != 1 or producer.get(clip.input[0]) is None \
            or producer[clip.input[0]].op_type not in ("Conv", "Gemm"):
        return
    node = next(n for n in graph.node if n.output and n.output[0] == q)
    node.input[0] = clip.input[0]
    graph.node.remove(clip)


_CELL_TRANSPARENT = ("MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout")


def _passes_cells(node: onnx.NodeProto) -> bool:
    """An op that only moves or repeats values, so it works on cells as on the values they decide: the ops above,
    a nearest-neighbour ``Resize`` (``nn.Upsample(mode="nearest")``) and a reflecting / edge-replicating ``Pad``
    (a zero pad is no cell: ``BindIntegerLayers`` binds no layer across one)."""
    if node.op_type in _CELL_TRANSPARENT:
        return True
    mode = next((a.s for a in node.attribute if a.name == "mode"), None)
    if node.op_type == "Resize":
        return mode in (None, b"nearest")
    return node.op_type == "Pad" and mode in (b"reflect", b"edge")


def _auto_needs_u8(model: onnx.ModelProto, table: dict[int, FakeQuantize]) -> bool:
    """``int8_weights="auto"`` at emission: int8 weights, unless this machine's onnxruntime saturates uint8 × int8
    products (x86 without VNNI) and some weight pair of the graph would (no ``PairSafeInt8Weights`` in the
    pipeline): then uint8 weights with zero point 128, exact everywhere (what QAT's export does with trained
    weights)."""
    from qcompile.runtime.session import u8s8_saturates
    from qcompile.runtime.validation import saturating_pairs

    if not u8s8_saturates():
        return False
    probe = emit_standard(onnx.ModelProto.FromString(model.SerializeToString()), table, u8_weights=False)
    return saturating_pairs(probe) > 0


def _check_pair_safe(model: onnx.ModelProto, table: dict[int, FakeQuantize]) -> None:
    """``int8_weights="s8-safe"`` promises no kernel pair past int16: a pipeline of one's own without
    ``PairSafeInt8Weights`` wrote plain int8 weights under it, and validation then advised the option given. Where
    the pass ran it decided (it knows the activations' code ranges, which the file's count leaves out)."""
    from qcompile.runtime.validation import saturating_pairs

    from .errors import UserError

    if any(getattr(fq, "pair_safe_checked", False) for fq in table.values()):
        return
    n = saturating_pairs(model)
    if n:
        raise UserError(f"int8_weights='s8-safe' but {n} int8 weight pairs of the graph reach past int16: run "
                        "qcompile.passes.PairSafeInt8Weights after Calibrate (and AdaptiveRounding), as build_passes "
                        "does, or emit with int8_weights='s8' or 'u8'")


def emit(model: onnx.ModelProto, table: dict[int, FakeQuantize], opts) -> onnx.ModelProto:
    """Replace every FakeQuant marker of ``model`` (ids from :func:`quantizers_by_id`) according to ``opts.emit``."""
    model = bypass_parameter_identities(model)
    if opts.emit == "custom":
        from .emit_custom import emit_custom

        u8 = opts.int8_weights == "u8" or (opts.int8_weights == "auto" and _auto_needs_u8(model, table))
        model = emit_lookup_tables(model, table, u8)  # standard rows, gathered before dequantizing
        # float MatMuls on its weights shielded as in the standard form: onnxruntime inlines DequantizeLevels and
        # fused DequantizeLinear -> MatMul into MatMulNBits, which quantizes a float input on the fly (a ViT-like
        # model at PoT W4A4: 0.36% of the codes differed, FAIL)
        model = emit_custom(model, table, u8_weights=u8)
        if opts.int8_weights == "s8-safe":
            _check_pair_safe(model, table)
        return declared_ir_version(detach_probes(drop_unread_constants(compact_tensor_names(shield_float_matmuls(
            shield_float_layers(pad_codes(model)))))))
    u8 = opts.int8_weights == "u8"
    if opts.int8_weights == "auto":  # a pipeline of one's own (compile() decides before its passes)
        u8 = _auto_needs_u8(model, table)
    model = emit_standard(model, table, u8_weights=u8)
    if opts.int8_weights == "s8-safe":
        _check_pair_safe(model, table)
    if opts.emit == "shift-add":  # after compaction: the lowering's records name the tensors it reads
        from .lowering import lower_shift_add

        # the float MatMuls it leaves (layers it does not lower) shielded after it: it reads the plain form
        model = shield_float_matmuls(lower_shift_add(compact_tensor_names(model), check=opts.check))
    else:
        model = compact_tensor_names(shield_float_matmuls(model))
    return declared_ir_version(detach_probes(drop_unread_constants(model)))


def declared_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """The IR version the file's opset and types need, at least: opset 21 and INT4/UINT4 need IR 10, opset 25 and
    INT2/UINT2 IR 13 (onnx's ``find_min_ir_version_for``); the files said 9 and 11, which onnx.checker and
    onnxruntime accept but stricter readers refuse."""
    from onnx import helper

    standard = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    need = helper.find_min_ir_version_for(standard, ignore_unknown=True) if standard else model.ir_version
    if any(t.data_type in (TensorProto.INT4, TensorProto.UINT4) for t in model.graph.initializer):
        need = max(need, 10)
    model.ir_version = max(model.ir_version, need)
    return model


def drop_unread_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove ``Constant`` nodes whose value no node or graph output reads: the bounds of a ``Clip`` that the
    emission leaves out (a ReLU6 before APoT levels that imply it) stayed, and onnxruntime warned "Removing
    initializer ... not used by any node" on every session."""
    graph = model.graph
    read = node_reads(graph.node) | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
            and not any(o in read for o in n.output)]
    for n in dead:
        graph.node.remove(n)
    return model


def bypass_parameter_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Let the readers of ``Identity(initializer)`` read the initializer. torch.onnx writes such an ``Identity`` for
    a parameter that a module called more than once reads again (``l.bias_1 = Identity(l.bias)``); the rewrites
    that follow (a bias on the accumulator grid, an integer layer writing its cells) look a layer's bias up among
    the initializers, and onnxruntime folds the copy anyway. An ``Identity`` that writes a graph output stays."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.domain in ("", "ai.onnx")
             and n.input[0] in inits and n.output[0] not in outputs}
    if not alias:
        return model
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in alias)]
    for n in kept:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(kept)
    return model


PROBES_KEY = "qcompile.probes"


def detach_probes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Take out of the graph the ``DequantizeLinear`` nodes that only the validator reads: activation-map tensors
    whose readers were rewired (a padded conv reads the padded codes, a float layer reads ``Cast``/``Mul``, a lowered
    layer reads the codes). onnxruntime computed them on every run. They are kept in the metadata
    (``qcompile.probes``: output, inputs, axis) for :func:`attach_probes`, which the validator calls. A scale or
    zero point that only those nodes read leaves the graph too (onnxruntime warns about an initializer no node
    uses): its values go into the record (``constants``: name -> data type, dims, values)."""
    import json

    graph = model.graph
    read = node_reads(graph.node) | {o.name for o in graph.output}
    mapped = {a["tensor"] for a in activation_map(model)}
    probes = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")
              and n.output[0] in mapped and n.output[0] not in read]
    if not probes:
        return model
    for n in probes:
        graph.node.remove(n)
    still_read = node_reads(graph.node) | {o.name for o in graph.output}
    orphans = {t.name: t for t in graph.initializer if t.name not in still_read
               and any(t.name in n.input for n in probes)}
    records = []
    for n in probes:
        axis = next((a.i for a in n.attribute if a.name == "axis"), None)
        record = {"output": n.output[0], "inputs": list(n.input), **({"axis": axis} if axis is not None else {})}
        constants = {name: {"type": orphans[name].data_type, "dims": list(orphans[name].dims),
                            "values": numpy_helper.to_array(orphans[name]).reshape(-1).tolist()}
                     for name in n.input if name in orphans}
        if constants:  # float32 -> float -> JSON (shortest repr) -> float32 is exact, as are integers
            record["constants"] = constants
        records.append(record)
    if orphans:
        kept = [t for t in graph.initializer if t.name not in orphans]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    model.metadata_props.add(key=PROBES_KEY, value=json.dumps(records, separators=(",", ":")))
    return model


def attach_probes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Put back the ``DequantizeLinear`` nodes :func:`detach_probes` took out (for reading activations), with the
    constants that only they read as initializers of their own (``<output>/probe/<name>``)."""
    import json

    for prop in model.metadata_props:
        if prop.key == PROBES_KEY:
            for r in json.loads(prop.value):
                attrs = {"axis": r["axis"]} if "axis" in r else {}
                inputs = list(r["inputs"])
                for name, c in r.get("constants", {}).items():
                    fresh = f"{r['output']}/probe/{name}"
                    dtype = helper.tensor_dtype_to_np_dtype(c["type"])
                    value = np.asarray(c["values"], dtype=dtype).reshape(c["dims"])
                    model.graph.initializer.append(numpy_helper.from_array(value, fresh))
                    inputs = [fresh if i == name else i for i in inputs]
                model.graph.node.append(helper.make_node("DequantizeLinear", inputs, [r["output"]],
                                                         name=f"{r['output']}/probe", **attrs))
    return model


def emit_standard(model: onnx.ModelProto, table: dict[int, FakeQuantize], u8_weights: bool = False) -> onnx.ModelProto:
    """Standard ONNX operators only."""
    model = fold_recurrent_weight_reorders(model, table, u8_weights)
    model = quantize_gemm_bias(replace_markers(model, table, emit_weight, emit_activation, u8_weights=u8_weights))
    model = gather_rows_before_dequantizing(model)
    return shield_float_layers(pad_codes(model))  # emit() then applies shield_float_matmuls


_REORDER_OPS = ("Slice", "Concat", "Unsqueeze", "Constant")
_RECURRENT_OPS = {"LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}  # the W and R inputs


def fold_recurrent_weight_reorders(model: onnx.ModelProto, table: dict[int, FakeQuantize],
                                   u8_weights: bool = False) -> onnx.ModelProto:
    """torch.onnx writes an LSTM/GRU's weights as ``Slice``/``Concat``/``Unsqueeze`` of the torch.nn matrices
    (the ONNX gate order, the direction axis); on quantized weights these ran on every inference, after the
    dequantization (LSTM W8 on digits rows: 1.5x the float file's latency at batch 1). Where the W or R input of a
    recurrent node is made only of such reorders of weight quantizers' markers, the reordered weight is stored
    directly: the rows keep their own scales (per-row quantization is unchanged by a row permutation), so the codes
    and values are those of the markers' emission, and the graph reads ``Reshape(DequantizeLinear(codes, scale,
    axis=0), [D, rows, cols])``."""
    graph = model.graph
    if not any(n.op_type in _RECURRENT_OPS for n in graph.node):
        return model
    from onnx.reference import ReferenceEvaluator

    inits, producer, readers = _graph_maps(graph)
    drop: set[int] = set()
    added: list = []
    stored: dict = {}  # (markers, shape, row order) -> the tensor holding that reordered weight
    seen_markers: list = []
    for rnn in [n for n in graph.node if n.op_type in _RECURRENT_OPS]:
        for k in _RECURRENT_OPS[rnn.op_type]:
            if k >= len(rnn.input) or not rnn.input[k]:
                continue
            chain, markers, ok = [], [], True
            stack, seen = [rnn.input[k]], set()
            while stack and ok:  # the nodes between the markers and the recurrent node
                name = stack.pop()
                if name in seen or name in inits:
                    continue
                seen.add(name)
                src = producer.get(name)
                if src is None:
                    ok = False
                elif src.domain == MARKER_DOMAIN and src.op_type == MARKER_OP:
                    fq = table.get(next(a.i for a in src.attribute if a.name == "qid"))
                    ok = fq is not None and fq.role == "weight" and fq.axis in (0, None) and src.input[0] in inits \
                        and numpy_helper.to_array(inits[src.input[0]]).ndim == 2
                    markers.append((src, fq))
                elif src.op_type in _REORDER_OPS:
                    chain.append(src)
                    stack.extend(i for i in src.input if i)
                else:
                    ok = False
            # the reorder nodes feed this input alone; a marker may also feed another recurrent node's reorders
            # (one LSTM called twice), which fold the same way and then read the same stored weight
            inside = {id(n) for n in chain} | {id(rnn)}
            ok = ok and markers and all(id(r) in inside for n in chain for o in n.output
                                        for r in readers.get(o, []))
            if not ok or len({(fq.scheme, fq.bits, fq.signed, fq.level_offset) for _, fq in markers}) != 1:
                continue
            # the chain evaluated on the weights, and on each row's global index (the permutation of the rows)
            weights = {m.output[0]: numpy_helper.to_array(inits[m.input[0]]).astype(np.float32) for m, _ in markers}
            ids, start = {}, 0
            for m, _ in markers:
                rows, cols = weights[m.output[0]].shape
                ids[m.output[0]] = np.repeat((start + np.arange(rows, dtype=np.float64))[:, None], cols, axis=1)
                start += rows
            order = [n for n in graph.node if id(n) in {id(c) for c in chain}]
            sub = helper.make_graph(order, "reorder", [helper.make_tensor_value_info(m.output[0], TensorProto.FLOAT,
                                                                                      None) for m, _ in markers],
                                    [helper.make_tensor_value_info(rnn.input[k], TensorProto.FLOAT, None)],
                                    [inits[i] for i in dict.fromkeys(i for n in order for i in n.input) if i in inits])
            evaluator = ReferenceEvaluator(helper.make_model(sub, opset_imports=model.opset_import))
            final = evaluator.run(None, weights)[0]
            rows_of = evaluator.run(None, {n: v.astype(np.float32) if start < 2 ** 24 else v
                                           for n, v in ids.items()})[0]
            if final.ndim != 3 or start >= 2 ** 24:
                continue
            perm = rows_of[..., 0].reshape(-1).astype(np.int64)
            key = (tuple((m.input[0], next(a.i for a in m.attribute if a.name == "qid")) for m, _ in markers),
                   final.shape, perm.tobytes())
            drop |= {id(n) for n in chain}
            seen_markers.extend(m for m, _ in markers)
            if key in stored:  # the same weights reordered the same way for another call of the layer
                rnn.input[k] = stored[key]
                continue
            stored[key] = rnn.input[k]
            alphas = np.concatenate([np.broadcast_to(fq.alpha.detach().double().numpy().reshape(-1),
                                                     (weights[m.output[0]].shape[0],)) for m, fq in markers])
            fq = copy.deepcopy(markers[0][1])
            fq.axis = 0
            fq.alpha = torch.from_numpy(alphas[perm].copy()).to(fq.alpha.dtype)
            b = _Builder(f"r{len(added)}", u8_weights=u8_weights)
            flat = final.reshape(-1, final.shape[-1])
            emit_weight(b, fq, flat, b.name("w"))
            b.node("Reshape", [b.nodes[-1].output[0], b.const(np.array(final.shape, np.int64), "shape")],
                   rnn.input[k])
            added.append(b)
    if not added:
        return model
    for m in seen_markers:  # a marker goes with its reorders once nothing else reads it
        if all(id(r) in drop for r in readers.get(m.output[0], [])):
            drop.add(id(m))
    nodes = [n for n in graph.node if id(n) not in drop]
    first = next(i for i, n in enumerate(nodes) if n.op_type in _RECURRENT_OPS)
    new = [n for b in added for n in b.nodes]
    nodes = nodes[:first] + new + nodes[first:]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(t for b in added for t in b.inits)
    read = node_reads(graph.node)
    for t in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(t)
    return model


def emit_lookup_tables(model: onnx.ModelProto, table: dict[int, FakeQuantize], u8_weights: bool = False
                       ) -> onnx.ModelProto:
    """The custom form's embedding tables in the standard form: a weight marker read only by row lookups
    (``Gather`` on axis 0) becomes the standard weight emission, whose rows :func:`gather_rows_before_dequantizing`
    then gathers as codes. A ``qcompile`` dequantization node would dequantize the whole table on every run
    (a 50000 x 64 table: 23x the float file's latency at batch 1)."""
    graph = model.graph
    inits, _producer, readers = _graph_maps(graph)
    emitted: dict = {}
    replaced: dict[int, list] = {}
    for node in graph.node:
        if not (node.domain == MARKER_DOMAIN and node.op_type == MARKER_OP) or node.input[0] not in inits:
            continue
        qid = next(a.i for a in node.attribute if a.name == "qid")
        fq = table.get(qid)
        users = readers.get(node.output[0], [])
        if fq is None or fq.role != "weight" or not users or not all(
                u.op_type == "Gather" and u.input[0] == node.output[0]
                and next((a.i for a in u.attribute if a.name == "axis"), 0) == 0 for u in users):
            continue
        if (qid, node.input[0]) in emitted:  # the same table looked up again: one stored copy, read directly
            b = _Builder(f"q{qid}")
            for u in users:
                u.input[0] = emitted[qid, node.input[0]]
        else:
            b = _Builder(f"q{qid}", u8_weights=u8_weights)
            emit_weight(b, fq, numpy_helper.to_array(inits[node.input[0]]).astype(np.float32), node.output[0])
            emitted[qid, node.input[0]] = node.output[0]
        replaced[id(node)] = b
    if not replaced:
        return model
    nodes = []
    for n in graph.node:
        nodes.extend(replaced[id(n)].nodes if id(n) in replaced else [n])
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(t for b in replaced.values() for t in b.inits)
    read = node_reads(graph.node)
    for t in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(t)
    from .export import set_opset

    set_opset(model, 21)  # INT4 and UINT4 codes
    return gather_rows_before_dequantizing(model)


def gather_rows_before_dequantizing(model: onnx.ModelProto) -> onnx.ModelProto:
    """An embedding lookup ``Gather(DequantizeLinear(codes, scale, axis=0), ids)`` dequantized the whole table on
    every run (a 30k × 768 table: 23M values for a few tokens). Gather the code rows and their scales instead:
    ``Mul(Cast(Gather(codes, ids), FLOAT) [− Gather(zp, ids)], Unsqueeze(Gather(scale, ids), −1))``: the same float32
    value per element as the ``DequantizeLinear`` (one product of the exact integer by the scale). ``codes`` is what
    the weight emission feeds the ``DequantizeLinear`` (an INT8 table, or a ``Cast`` of packed INT4/INT2 codes or a
    level-table ``Gather``, which onnxruntime folds into an int8 table when it loads the file)."""
    graph = model.graph
    if not any(n.op_type == "Gather" for n in graph.node):
        return model
    inits, producer, _readers = _graph_maps(graph)
    out_names = {o.name for o in graph.output}

    def constant(name: str) -> bool:  # an initializer, or Cast/Gather nodes of initializers (the weight emission's)
        if name in inits:
            return True
        src = producer.get(name)
        return src is not None and src.op_type in ("Cast", "Gather") and all(constant(i) for i in src.input)

    replaced: dict[int, list] = {}  # id(Gather node) -> the nodes that replace it
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) != 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        dq = producer.get(node.input[0])
        if axis != 0 or dq is None or dq.op_type != "DequantizeLinear" or node.input[0] in out_names:
            continue
        if not constant(dq.input[0]):  # a quantized activation read by a Gather: its codes stay where they are
            continue
        dq_axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        scale = inits.get(dq.input[1])
        zp = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if scale is None or (len(scale.dims) == 1 and dq_axis != 0) or len(scale.dims) > 1 \
                or any(a.name == "block_size" and a.i for a in dq.attribute):
            continue
        per_row = len(scale.dims) == 1
        b = _Builder(f"g{len(replaced)}")
        ids = node.input[1]
        codes = b.node("Cast", [b.node("Gather", [dq.input[0], ids], axis=0)], to=TensorProto.FLOAT)
        def rows(param):  # per row: gathered and broadcast over the row's elements; per tensor: as it is
            if not per_row:
                return b.node("Cast", [param.name], to=TensorProto.FLOAT) if param is zp else param.name
            got = b.node("Gather", [param.name, ids], axis=0)
            if param is zp:
                got = b.node("Cast", [got], to=TensorProto.FLOAT)
            return b.node("Unsqueeze", [got, b.const(np.array([-1], np.int64), "axes")])
        if zp is not None:
            codes = b.node("Sub", [codes, rows(zp)])
        b.node("Mul", [codes, rows(scale)], node.output[0])
        replaced[id(node)] = b
    if not replaced:
        return model
    nodes = []
    for n in graph.node:
        if id(n) in replaced:
            nodes.extend(replaced[id(n)].nodes)
            graph.initializer.extend(replaced[id(n)].inits)
        else:
            nodes.append(n)
    read = node_reads(nodes) | out_names
    nodes = [n for n in nodes if n.op_type != "DequantizeLinear" or any(o in read for o in n.output)]  # now dead
    del graph.node[:]
    graph.node.extend(nodes)
    return model


_EIGHT_BIT = (TensorProto.UINT8, TensorProto.INT8)


def shield_float_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep a float ``MatMul`` with quantized weights float in onnxruntime: read the weight through
    ``Unsqueeze(DequantizeLinear(W), 0)`` (shape ``[1, K, N]``, the same products and sums) where the input is not
    8-bit codes, so that no int8 fusion takes the layer.

    A Linear on 3-D inputs exports as ``MatMul(x, DequantizeLinear(W))``. With 8-bit input codes onnxruntime fuses
    it into ``QLinearMatMul``/``MatMulIntegerToFloat`` (exact). With any other input (APoT/PoT codes wider than 8 bits
    behind a 16-bit ``DequantizeLinear``, float values) onnxruntime 1.32's ``DQMatMulToMatMulNBits`` fusion (on by
    default) made it ``com.microsoft.MatMulNBits`` with ``accuracy_level=4``, which quantizes the float input to
    int8 on the fly: a transformer with APoT 4-bit weights and APoT 8-bit activations then disagreed with the
    simulation on 12% of the codes (3 of 500 predictions). The fusion takes 2-D weights only. A 2-D input (whose
    product with ``[1, K, N]`` would be 3-D) is widened too and the product squeezed back."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}

    def dequantized_weight(node) -> bool:  # the custom form's DequantizeLevels is a DequantizeLinear once inlined
        return node is not None and (node.op_type == "DequantizeLinear" or
                                     (node.domain == "qcompile" and node.op_type == "DequantizeLevels"))

    candidates = {id(n) for n in graph.node if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
                  and len(n.input) == 2 and dequantized_weight(producer.get(n.input[1]))}
    if not candidates:
        return model
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)
             + list(inferred.graph.output)}
    types.update({t.name: onnx.TypeProto.Tensor(elem_type=t.data_type) for t in graph.initializer})

    def rank(name: str):
        t = types.get(name)
        return len(t.shape.dim) if t is not None and t.HasField("shape") else None

    def eight_bit_codes(name: str) -> bool:
        dq = producer.get(name)
        if dq is not None and dq.domain == "qcompile" and dq.op_type in ("QuantizeUniform", "QuantizeLevels"):
            # the custom form's activation quantizers end in a DequantizeLinear of codes of their zero point's
            # (QuantizeUniform) or their stored grid's (QuantizeLevels) type
            t = types.get(dq.input[2])
            return t is not None and t.elem_type in _EIGHT_BIT
        if dq is None or dq.op_type != "DequantizeLinear":
            return False
        t = types.get(dq.input[0])
        return t is not None and t.elem_type in _EIGHT_BIT

    axes = None
    out_nodes = []
    widened: dict[str, str] = {}  # tensor -> its [1, ...] form, made once (tied weights, one input read twice)

    def unsqueezed(name: str, suffix: str) -> str:
        if name not in widened:
            widened[name] = f"{name}/float/{suffix}"
            out_nodes.append(helper.make_node("Unsqueeze", [name, axes], [widened[name]],
                                              name=f"{widened[name]}/unsqueeze"))
        return widened[name]

    for node in graph.node:
        if id(node) in candidates and not eight_bit_codes(node.input[0]) and rank(node.input[1]) == 2 \
                and rank(node.input[0]) is not None:
            if axes is None:
                axes = f"{node.input[1]}/float/axes0"
                graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axes))
            wide = unsqueezed(node.input[1], "w3d")
            squeeze = rank(node.input[0]) < 3
            x = unsqueezed(node.input[0], "x3d") if squeeze else node.input[0]
            out = node.output[0]
            node.input[:] = [x, wide]
            if squeeze:
                node.output[0] = f"{out}/float/y3d"
            out_nodes.append(node)
            if squeeze:
                out_nodes.append(helper.make_node("Squeeze", [node.output[0], axes], [out],
                                                  name=f"{node.name or out}/float/squeeze"))
            continue
        out_nodes.append(node)
    del graph.node[:]
    graph.node.extend(out_nodes)
    return model


def pad_codes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``Pad(DequantizeLinear(q))`` -> ``DequantizeLinear(Pad(q))`` for a per-tensor quantized input: reflect, edge
    and wrap padding copy codes, zero padding adds the zero point's code (real 0), so the values are the same; the
    convolution after it then reads a ``DequantizeLinear`` again and onnxruntime fuses it into its int8 kernels
    (a ``reflect``/``replicate`` or asymmetric ``"same"`` conv; circular padding exports as Slice/Concat and is left
    alone). The first ``DequantizeLinear`` stays for its other readers (and the validator's activation map). Only
    8-bit codes move: onnxruntime has no int16 Pad, and only 8-bit codes feed its int8 kernels. In the custom form
    the ``DequantizeLinear`` is the end of a ``qcompile.QuantizeUniform``/``QuantizeLevels`` function body: a
    ``QuantizeLinear`` at its scale takes the codes back (exact: the values are on the grid), and the conv after
    the pad reached the int8 kernels in the custom form too (it stayed a float ``Conv`` before)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    changed = False

    def eight_bit_codes(dq: onnx.NodeProto) -> bool:
        """Codes of 8 bits: what onnxruntime's Pad runs (not the int16 codes of APoT-8 or PoT-4 activations,
        "Could not find an implementation for Pad(21)") and what its int8 kernels read."""
        zp = dq.input[2] if len(dq.input) > 2 else ""
        if zp:
            return inits[zp].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        q = producer.get(dq.input[0])  # QuantizeLinear without a zero point gives uint8
        return q is not None and q.op_type == "QuantizeLinear" and (len(q.input) < 3 or not q.input[2])

    new_inits: list[onnx.TensorProto] = []

    def custom_codes(quantizer: onnx.NodeProto):
        """``(scale, zero point)`` of the 8-bit codes behind a custom-form quantizer's per-tensor output (its
        function body ends in ``DequantizeLinear``, which a ``QuantizeLinear`` at the same scale undoes exactly:
        the values are on the grid), else None."""
        scale = quantizer.input[1] if quantizer.op_type == "QuantizeUniform" else quantizer.input[3]
        if scale not in inits or int(np.prod(inits[scale].dims)) != 1:
            return None
        if quantizer.op_type == "QuantizeUniform" or (len(quantizer.input) > 4 and quantizer.input[4]):
            zp = quantizer.input[2] if quantizer.op_type == "QuantizeUniform" else quantizer.input[4]
            if zp not in inits or inits[zp].data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
                return None
            return scale, zp
        grid = inits.get(quantizer.input[2])  # files before 0.9.7: the grid integers, zero point 0
        if grid is None or grid.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            return None
        zp = f"{quantizer.output[0]}/pad/codes_zp"
        if zp not in inits:
            inits[zp] = numpy_helper.from_array(np.array(0, helper.tensor_dtype_to_np_dtype(grid.data_type)), zp)
            new_inits.append(inits[zp])
        return scale, zp

    for node in graph.node:
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        fill = node.input[2] if len(node.input) > 2 else ""
        src = producer.get(node.input[0]) if node.op_type == "Pad" and node.domain in ("", "ai.onnx") else None
        filled = mode != "constant" or not fill or (fill in inits and not numpy_helper.to_array(inits[fill]).any())
        found = custom_codes(src) if src is not None and src.domain == "qcompile" and filled and \
            src.op_type in ("QuantizeUniform", "QuantizeLevels") else None
        if found is not None:  # the custom form: codes taken back from the quantizer's output, padded, dequantized
            scale, zp = found
            codes, padded = f"{node.output[0]}/codes_in", f"{node.output[0]}/codes"
            nodes.append(helper.make_node("QuantizeLinear", [node.input[0], scale, zp], [codes],
                                          name=f"{node.name or padded}/q"))
            inputs = [codes, node.input[1], zp if mode == "constant" else ""] + list(node.input[3:])
            while inputs and not inputs[-1]:
                inputs.pop()
            nodes.append(helper.make_node("Pad", inputs, [padded], name=f"{node.name or padded}/codes", mode=mode))
            nodes.append(helper.make_node("DequantizeLinear", [padded, scale, zp], list(node.output),
                                          name=f"{node.name or padded}/dq"))
            changed = True
            continue
        dq = src
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.domain in ("", "ai.onnx") \
                and dq.input[1] in inits and int(np.prod(inits[dq.input[1]].dims)) == 1 \
                and (len(dq.input) < 3 or not dq.input[2] or dq.input[2] in inits) and eight_bit_codes(dq) \
                and (mode != "constant" or not fill or (fill in inits and not numpy_helper.to_array(inits[fill]).any())):
            zp = dq.input[2] if len(dq.input) > 2 else ""
            codes = f"{node.output[0]}/codes"
            inputs = [dq.input[0], node.input[1], zp if mode == "constant" else ""] + list(node.input[3:])
            while inputs and not inputs[-1]:
                inputs.pop()
            nodes.append(helper.make_node("Pad", inputs, [codes], name=f"{node.name or codes}/codes",
                                          mode=mode))
            nodes.append(helper.make_node("DequantizeLinear", [codes] + list(dq.input[1:]), list(node.output),
                                          name=f"{node.name or codes}/dq"))
            changed = True
            continue
        nodes.append(node)
    if changed:
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(new_inits)
    return model


_WEIGHT_BIAS_OPS = ("Conv", "ConvTranspose", "Gemm")


def shield_float_layers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep float layers float in onnxruntime: feed a ``Conv``/``ConvTranspose``/``Gemm`` whose weight is not
    quantized (an excluded layer, a layer type qcompile does not quantize) from ``Mul(Cast(q) - zp, scale)``
    instead of ``DequantizeLinear(q, scale, zp)`` of a per-tensor quantized input.

    onnxruntime's ``WeightBiasQuantization`` graph transformer (on by default) quantizes the float weight of such
    a layer to symmetric per-tensor int8, and its bias to int32, whenever input 0 comes from a per-tensor
    ``DequantizeLinear``: the layer the user kept in float (``--exclude``) then ran with 8-bit weights, and about
    3% of the next quantizer's codes differed from the simulation. The replacement computes the same float32
    values (``(q - zp)`` is an exact small integer, then one rounding of the product, as in
    ``DequantizeLinear``); the ``DequantizeLinear`` stays for its other readers. In the custom form the
    ``DequantizeLinear`` is the end of a ``qcompile.QuantizeUniform``/``QuantizeLevels`` function body: the codes
    are recovered from its output with a ``QuantizeLinear`` at the same scale (exact: the values are on the
    grid). An ``AveragePool`` in ceil mode that counts pads is fed the same way (:func:`_ceil_pool_counting_pads`).
    Where the layer reads the dequantized values through ops that onnxruntime's QDQ propagation moves a
    ``DequantizeLinear`` across (a max-pool, a reshape: ``_QDQ_PROPAGATING``), the first of them is fed instead, or
    the layer gets a copy of them of its own where one is read by others too: propagated, the
    ``DequantizeLinear`` reached the layer all the same."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}

    def scalar(name: str) -> bool:
        t = inits.get(name)
        return t is not None and int(np.prod(t.dims)) == 1

    def codes_of(node: onnx.NodeProto):
        """``(codes, scale, zero point or '', nodes to add)`` of a per-tensor dequantizing producer, else None."""
        if node is None:
            return None
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
            zp = node.input[2] if len(node.input) > 2 else ""
            if scalar(node.input[1]) and (not zp or zp in inits):
                return node.input[0], node.input[1], zp, []
            return None
        if node.domain == "qcompile" and node.op_type in ("QuantizeUniform", "QuantizeLevels"):
            scale = node.input[1] if node.op_type == "QuantizeUniform" else node.input[3]
            if not scalar(scale):
                return None
            if node.op_type == "QuantizeUniform":
                zp = node.input[2]
            elif len(node.input) > 4 and node.input[4]:  # stored codes with their zero point (0.9.7 on)
                zp = node.input[4]
            else:  # grid integers: a zero point of their type puts the codes back in it
                grid_type = numpy_helper.to_array(inits[node.input[2]]).dtype
                zp = f"{node.output[0]}/float/codes_zp"
                inits[zp] = numpy_helper.from_array(np.array(0, grid_type), zp)
                new_inits.append(inits[zp])
            codes = f"{node.output[0]}/float/codes"
            requantize = helper.make_node("QuantizeLinear", [node.output[0], scale, zp], [codes],
                                          name=f"{node.output[0]}/float/q")
            return codes, scale, zp, [requantize]
        return None

    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in graph.output}

    def dequantizer(node) -> bool:  # what codes_of takes apart, without its side effects
        if node is None:
            return False
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
            return scalar(node.input[1]) and (len(node.input) < 3 or not node.input[2] or node.input[2] in inits)
        return node.domain == "qcompile" and node.op_type in ("QuantizeUniform", "QuantizeLevels")

    def dequantized_chain(name: str) -> list | None:
        """The ops between a dequantizer and ``name`` (dequantizer side first) through which onnxruntime's QDQ
        propagation moves a ``DequantizeLinear`` forward (``_QDQ_PROPAGATING``; it copies the Q/DQ pair onto every
        reader of each, and stops at graph outputs), or None where ``name`` is not reached so."""
        chain = []
        node = producer.get(name)
        while node is not None and node.op_type in _QDQ_PROPAGATING and node.domain in ("", "ai.onnx"):
            if node.output[0] in outputs:
                return None
            chain.append(node)
            node = producer.get(node.input[0])
        return chain[::-1] if chain and dequantizer(node) else None

    def float_layer(node: onnx.NodeProto) -> bool:
        if not (node.op_type in _WEIGHT_BIAS_OPS and node.domain in ("", "ai.onnx") and len(node.input) > 1):
            return False
        weight = producer.get(node.input[1])
        # (a custom-form weight, qcompile.DequantizeLevels, ends in a DequantizeLinear once onnxruntime inlines its
        # function body: the layer is quantized, and fuses into QLinearConv / QGemm as in the standard form)
        return weight is None or not (weight.op_type == "DequantizeLinear" or
                                      (weight.domain == "qcompile" and weight.op_type == "DequantizeLevels"))

    # A float layer that reads dequantized values through a max-pool, a reshape, ... got a DequantizeLinear input
    # all the same once onnxruntime propagated it, and WeightBiasQuantization quantized the layer (2.7% of the next
    # codes differed). Where each op of that chain is read once, the shield feeds its first op; where one is read
    # by others too (a pooled map that a residual add or another layer reads as well), the layer gets a copy of
    # the chain of its own, fed from the shield, and the others keep theirs.
    chain_heads = set()  # id() of the first op of a chain read by the float layer alone
    private: dict[int, list] = {}  # id(float layer) -> the chain it gets a copy of
    for node in graph.node:
        if float_layer(node) or _ceil_pool_counting_pads(node):
            chain = dequantized_chain(node.input[0])
            if chain is None:
                continue
            if all(readers.get(op.output[0], 0) == 1 for op in chain):
                chain_heads.add(id(chain[0]))
            else:
                private[id(node)] = chain

    shielded: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []

    def shield(src: str) -> str | None:
        """``Mul(Cast(codes) [- zp], scale)`` for the dequantized ``src`` (made once, appended to ``nodes``)."""
        found = shielded.get(src) or codes_of(producer.get(src))
        if found is None:
            return None
        if src not in shielded:
            codes, scale, zp, first = found
            stem = f"{src}/float"
            nodes.extend(first)
            value = helper.make_node("Cast", [codes], [f"{stem}/cast"], name=f"{stem}/0", to=TensorProto.FLOAT)
            nodes.append(value)
            zero = float(numpy_helper.to_array(inits[zp]).reshape(-1)[0]) if zp else 0.0
            if zero != 0.0:
                new_inits.append(numpy_helper.from_array(np.array(zero, np.float32), f"{stem}/zp"))
                nodes.append(helper.make_node("Sub", [value.output[0], f"{stem}/zp"], [f"{stem}/sub"],
                                              name=f"{stem}/1"))
            nodes.append(helper.make_node("Mul", [nodes[-1].output[0], scale], [f"{stem}/value"], name=f"{stem}/2"))
            shielded[src] = nodes[-1].output[0]
        return shielded[src]

    copied: dict[str, str] = {}  # output of a chain op -> that of its float copy (float layers reading one share it)
    for node in graph.node:
        if id(node) in private:
            value = shield(private[id(node)][0].input[0])
            if value is not None:
                for op in private[id(node)]:
                    if op.output[0] not in copied:
                        copy = onnx.NodeProto()
                        copy.CopyFrom(op)
                        copy.name = f"{op.name or op.output[0]}/float"
                        copy.input[0] = value
                        del copy.output[:]
                        copy.output.append(f"{op.output[0]}/float")  # MaxPool's indices output not needed
                        nodes.append(copy)
                        copied[op.output[0]] = copy.output[0]
                    value = copied[op.output[0]]
                node.input[0] = value
        elif id(node) in chain_heads or float_layer(node) or _ceil_pool_counting_pads(node):
            value = shield(node.input[0])
            if value is not None:
                node.input[0] = value
        nodes.append(node)
    if not shielded:
        return model
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    still_read = node_reads(graph.node) | {o.name for o in graph.output}
    mapped = {a["tensor"] for a in activation_map(model)}
    dead = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in shielded
            and n.output[0] not in still_read and n.output[0] not in mapped]
    for n in dead:  # its only readers were shielded layers, and the validator does not read it
        graph.node.remove(n)
    return model


# the ops onnxruntime's QDQPropagationTransformer moves a DequantizeLinear forward across (qdq_propagation.cc)
_QDQ_PROPAGATING = ("MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice")


def _ceil_pool_counting_pads(node: onnx.NodeProto) -> bool:
    """An ``AveragePool`` with ``ceil_mode=1`` and ``count_include_pad=1`` (PyTorch's ``AvgPool2d(ceil_mode=True)``
    default): onnxruntime fuses ``DequantizeLinear → AveragePool → QuantizeLinear`` into its
    ``QLinearAveragePool``, which divides a window that runs past the padded input by the whole kernel size, where
    its float ``AveragePool`` and PyTorch count only the cells inside (up to 158 codes off on a 15×15 map; the
    W8A8 file failed validation). Without the fusion the pool runs in float on the dequantized values."""
    if node.op_type != "AveragePool" or node.domain not in ("", "ai.onnx"):
        return False
    attrs = {a.name: a.i for a in node.attribute if a.name in ("ceil_mode", "count_include_pad")}
    return attrs.get("ceil_mode", 0) == 1 and attrs.get("count_include_pad", 0) == 1


def _stored_type(name: str, inits: dict, producer: dict) -> int | None:
    """Element type of an integer weight tensor: an initializer, or a Gather from an initializer lookup table."""
    if name in inits:
        return inits[name].data_type
    node = producer.get(name)
    if node is not None and node.op_type == "Gather" and node.input[0] in inits:
        return inits[node.input[0]].data_type
    if node is not None and node.op_type == "Cast" and node.input[0] in inits:  # INT4 codes widened to INT8
        return next(a.i for a in node.attribute if a.name == "to")
    return None


def quantize_gemm_bias(model: onnx.ModelProto) -> onnx.ModelProto:
    """``Gemm(DQ(x), DQ(W), b)`` with a float bias: store ``b`` as int32 codes on the accumulator grid S_x·S_w
    behind a ``DequantizeLinear``, and give the weight's ``DequantizeLinear`` an explicit zero point: the form
    onnxruntime fuses into ``QGemm`` (bias added to the int32 accumulator, as in ``QLinearConv``).

    The values do not change: ``QuantizeBias`` already put ``b`` on that grid; a bias that is not on it (the layer
    is not an int8 layer) is left as it is.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def scale_input(name):
        """The scale input of the node making ``name``: a ``DequantizeLinear``'s, or in the custom form that of a
        qcompile weight/activation function whose body ends in one (``runtime/OPS.md``); None for other nodes."""
        node = producer.get(name)
        if node is None:
            return None
        if node.domain in ("", "ai.onnx") and node.op_type == "DequantizeLinear":
            index = 1
        elif node.domain == "qcompile":
            index = {"DequantizeLevels": 2, "QuantizeUniform": 1, "QuantizeLevels": 3}.get(node.op_type)
        else:
            index = None
        return node.input[index] if index is not None and len(node.input) > index else None

    def dq_scale(name):
        scale = scale_input(name)
        if scale is None or scale not in inits:
            return None
        return numpy_helper.to_array(inits[scale]).astype(np.float32)

    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        plain = all(attrs[k].f == 1.0 for k in ("alpha", "beta") if k in attrs) and \
            ("transA" not in attrs or attrs["transA"].i == 0)
        if node.op_type == "Gemm" and len(node.input) == 3 and node.input[2] in inits and plain:
            s_x, s_w = dq_scale(node.input[0]), dq_scale(node.input[1])
            bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(-1)
            if s_x is not None and s_w is not None and s_x.size == 1 and s_w.size in (1, bias.size):
                acc = np.broadcast_to((s_x.reshape(()) * s_w).astype(np.float32).reshape(-1), bias.shape)
                codes = np.rint(bias.astype(np.float64) / acc.astype(np.float64))
                if np.array_equal((codes.astype(np.float32) * acc).astype(np.float32), bias) and \
                        np.abs(codes).max(initial=0) < 2 ** 31:
                    b = _Builder(node.name or "gemm")
                    q = b.const(codes.astype(np.int32), "bias_int32")
                    # no zero point: int32 codes with zero point 0 (the default), which QGemm fuses as well
                    # the scale S_x·S_w as a Mul of the two scales the file holds already (float32, as computed
                    # above): onnxruntime folds it to a constant before its QDQ fusion, and a 64-channel layer's
                    # scale is not stored twice
                    x_scale, w_scale = scale_input(node.input[0]), scale_input(node.input[1])
                    node.input[2] = b.node("DequantizeLinear", [q, b.node("Mul", [x_scale, w_scale])], axis=0)
                    w_dq = producer[node.input[1]]
                    w_type = _stored_type(w_dq.input[0], inits, producer) if w_dq.domain != "qcompile" else None
                    if len(w_dq.input) == 2 and w_type is not None:  # QGemm is fused only with explicit zero points
                        zp_shape = numpy_helper.to_array(inits[w_dq.input[1]]).shape
                        w_dq.input.append(b.const(np.zeros(zp_shape, helper.tensor_dtype_to_np_dtype(w_type)), "w_zp"))
                    nodes.extend(b.nodes)
                    graph.initializer.extend(b.inits)
        nodes.append(node)
    used = node_reads(nodes)
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _name_layers_by_module(nodes: list, weight_owner: dict[str, str]) -> None:
    """A layer node without its module's scope in its name (torch.onnx names the layers that qcompile's integer
    layers compute ``/Gemm``, ``/Gemm_1``) is named as the exporter names a module's: ``/fc/Gemm``, from the module
    whose quantized weight it reads. The cost report and the lowering records read the module from there."""
    taken = {n.name for n in nodes}
    for n in nodes:
        if n.op_type not in _LAYER_OPS or len(n.input) < 2 or n.input[1] not in weight_owner:
            continue
        if n.name and n.name.count("/") >= 2:  # "/layer1/conv/Conv": scoped already
            continue
        base = f"/{weight_owner[n.input[1]].replace('.', '/')}/{n.op_type}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.discard(n.name)
        taken.add(name)
        n.name = name


def replace_markers(model: onnx.ModelProto, table: dict[int, FakeQuantize], weight_fn, activation_fn,
                    u8_weights: bool = False) -> onnx.ModelProto:
    """Replace each marker with the nodes ``weight_fn(builder, fq, w, out, transpose)`` or
    ``activation_fn(builder, fq, x, out)`` produce; drop the float weights they replace."""
    from .export import set_opset

    set_opset(model, 21)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    used_weights: set[str] = set()
    activations: list[dict] = []
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # The exporter stores bit-identical parameters once and feeds the others through Identity (layers cloned from
    # one another and not yet trained apart, tied weights): such a marker still quantizes a weight.
    identity_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    absorbed: set[int] = set()  # Transpose nodes folded into the stored weights
    emitted: dict = {}  # (quantizer id, weight, transposed) -> the tensor its emission wrote
    alias: dict[str, str] = {}  # the output of a repeated weight marker -> the first one's
    shared: dict = {}  # constants stored once per model (see _Builder.shared_const)
    weight_owner: dict[str, str] = {}  # a quantized weight tensor -> the module whose weight it is
    post: list = []
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                       for d in v.type.tensor_type.shape.dim]
              for v in list(graph.value_info) + list(graph.input) if v.type.tensor_type.HasField("shape")}
    # inputs with symbolic sizes beyond the batch (compile's dynamic_axes, qcompile.dynamic): the value_info shapes
    # are the example's
    dynamic = any(d.dim_param for v in graph.input if v.type.tensor_type.HasField("shape")
                  for d in v.type.tensor_type.shape.dim[1:])
    for node in graph.node:
        if id(node) in absorbed:
            continue
        if not (node.domain == MARKER_DOMAIN and node.op_type == MARKER_OP):
            new_nodes.append(node)
            continue
        qid = next(a.i for a in node.attribute if a.name == "qid")
        fq = table[qid]
        src, out = node.input[0], node.output[0]
        b = _Builder(f"q{qid}", shared, u8_weights)
        b.shape = shapes.get(out, shapes.get(src))
        if dynamic and b.shape is not None:
            b.shape, b.dynamic = [b.shape[0]] + [None] * (len(b.shape) - 1), True
        if src not in inits and src in identity_of:
            src = identity_of[src]
        # a weight quantizer reads a stored weight; an activation quantizer whose input is a constant (a buffer such
        # as Swin-V2's relative-coordinates table) stays an activation: its zero point and per-tensor scale are an
        # activation's, and the validator reads its codes like any other
        if src in inits and fq.role == "weight":
            w = numpy_helper.to_array(inits[src]).astype(np.float32)
            users = consumers.get(out, [])
            transpose = (w.ndim == 2 and len(users) == 1 and users[0].op_type == "Transpose"
                         and list(next((a.ints for a in users[0].attribute if a.name == "perm"), [1, 0])) == [1, 0])
            if transpose:  # Linear exported as MatMul(x, Transpose(W)): store W^T, per-channel axis 1
                absorbed.add(id(users[0]))
                out = users[0].output[0]
            if fq.qname.endswith(".weight_fq"):
                weight_owner[out] = fq.qname[: -len(".weight_fq")]
            if (qid, src, transpose) in emitted:  # one quantizer read twice (a table looked up twice): stored once
                alias[out] = emitted[qid, src, transpose]
                continue
            emitted[qid, src, transpose] = out
            weight_fn(b, fq, w, out, transpose=transpose)
            used_weights.add(src)
        else:
            activation_fn(b, fq, src, out)
            activations.append({"module": fq.qname, "tensor": out})
        new_nodes.extend(b.nodes)
        new_inits.extend(b.inits)
        post.extend(b.post)
    if alias:
        from .export import _rename_inputs

        for n in new_nodes:
            for i, name in enumerate(n.input):
                if name in alias:
                    n.input[i] = alias[name]
            for a in n.attribute:  # outer-scope reads in Loop/If bodies
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                          list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                    _rename_inputs(g, alias)
    _name_layers_by_module(new_nodes, weight_owner)
    read = node_reads(new_nodes) | {o.name for o in graph.output}
    new_nodes = [n for n in new_nodes if not (n.op_type == "Identity" and n.output[0] in identity_of
                                              and n.output[0] not in read)]  # now dead
    still_used = node_reads(new_nodes)
    kept = [t for t in graph.initializer if t.name in still_used or t.name not in used_weights]
    kept = [t for t in kept if t.name in still_used]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if post:
        for fn in post:
            fn(model)
        read = node_reads(graph.node)
        unread = [t for t in graph.initializer if t.name not in read]
        for t in unread:  # biases a shifted copy replaced
            graph.initializer.remove(t)
    _drop_marker_domain(model)
    if any(t.data_type in (TensorProto.INT2, TensorProto.UINT2) for t in model.graph.initializer):
        set_opset(model, 25)  # Cast and DequantizeLinear take 2-bit types from opset 25 on (IR: declared_ir_version)
        model.ir_version = max(model.ir_version, 11)
    set_activation_map(model, activations)
    return model


ACTIVATIONS_KEY = "qcompile.activations"
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def compact_tensor_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every tensor of the main graph but its inputs and outputs a short name (``t0``, ``t1``, ... in base 36,
    in order of appearance) and update the activation map. The exporter's names (``/layer1/conv1/Conv_output_0``,
    ``q12/quantizelinear_3``) appear two or three times each and made up most of a small model's graph bytes
    (about 3% of the digits model at 8 bits). Kept: node names (profilers and error messages show them) and the
    model's own parameter names (``conv2.bias``: reports attribute layers to modules by them). Graphs with
    subgraph attributes (If/Loop/Scan bodies may name outer tensors) are left as they are."""
    import re

    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return model
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    keep |= {t.name for t in graph.initializer if re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", t.name)}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            n, digits = len(names), ""
            while True:
                n, r = divmod(n, 36)
                digits = _DIGITS[r] + digits
                if n == 0:
                    break
            names[name] = "t" + digits
            while names[name] in keep:  # never collide with an input/output name
                names[name] += "_"
        return names[name]

    for t in graph.initializer:
        t.name = short(t.name)
    for node in graph.node:
        node.input[:] = [short(i) for i in node.input]
        node.output[:] = [short(o) for o in node.output]
    del graph.value_info[:]
    acts = activation_map(model)
    if acts:
        set_activation_map(model, [{"module": a["module"], "tensor": names.get(a["tensor"], a["tensor"])}
                                   for a in acts])
    return model


def set_activation_map(model: onnx.ModelProto, activations: list[dict]) -> None:
    """Record which ONNX tensor holds the output of which activation quantizer (read by the validator), as one
    compact JSON object ``{"<quantizer module>": "<tensor>", ...}`` (a list of such records where one quantizer
    module has several outputs)."""
    import json

    for prop in list(model.metadata_props):
        if prop.key == ACTIVATIONS_KEY:
            model.metadata_props.remove(prop)
    records = [{"module": a["module"], "tensor": a["tensor"]} for a in activations]
    as_object = {a["module"]: a["tensor"] for a in records}
    value = as_object if len(as_object) == len(records) else records  # a module called twice: keep both records
    model.metadata_props.add(key=ACTIVATIONS_KEY, value=json.dumps(value, separators=(",", ":")))


def activation_map(model: onnx.ModelProto) -> list[dict]:
    """The activation map of ``model`` as ``[{"module": ..., "tensor": ...}, ...]`` in graph order (also from the
    list-of-records form)."""
    import json

    for prop in model.metadata_props:
        if prop.key == ACTIVATIONS_KEY:
            value = json.loads(prop.value)
            if isinstance(value, dict):
                return [{"module": m, "tensor": t} for m, t in value.items()]
            return [{"module": a["module"], "tensor": a["tensor"]} for a in value]
    return []


def _drop_marker_domain(model: onnx.ModelProto) -> None:
    used = {n.domain for n in model.graph.node} | {n.domain for f in model.functions for n in f.node}
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    del model.graph.value_info[:]  # stale after the rewrite; the checker infers shapes again
