"""``--emit custom``: compact quantizer nodes in the ``qcompile`` domain (version 1), each op shipped as a
model-local ONNX function, so stock onnxruntime runs the file (it inlines the function bodies) and a runtime
that knows the domain can execute the nodes with kernels of its own. The ops are documented in
``runtime/OPS.md``.

- ``qcompile.DequantizeLevels(index, lut, scale[, zero_point]) -> y``  (weights)
  ``y = DequantizeLinear(Gather(lut, Cast(index, int32)), scale, zero_point, axis)``: level indices (packed
  UINT4/UINT8), the grid integers of the level set (int8, or uint8 = grid + 128 with ``zero_point`` 128 where the
  grid exceeds ±64 and ``--int8-weights u8``), the fine-grid unit per channel.
- ``qcompile.QuantizeLevels(x, thresholds, grid, scale[, zero_point]) -> y``  (non-uniform activations)
  ``idx = Σ_j [x > thresholds_j]``; ``y = DequantizeLinear(grid[idx], scale, zero_point)``, found by a binary
  search in the function body (:func:`_quantize_levels_body`); ``grid`` holds the codes as the standard form
  stores them (uint8 shifted by ``zero_point`` where the levels reach below 0). ``thresholds`` are the simulation's float32 decision thresholds
  with the "tie goes up" ones nudged one ulp down, so every decision is a strict ``Greater``.
- ``qcompile.QuantizeUniform(x, scale, zero_point, lo, hi) -> y``  (uniform activations)
  ``y = DequantizeLinear(QuantizeLinear(Clip(x, lo, hi), scale, zero_point), scale, zero_point)``.

Each node carries the attributes ``scheme`` (string), ``bits``, ``signed`` (int), ``offset`` (int, asymmetric
APoT/PoT activations only) and, for weights, ``axis``; they describe the quantizer and are the information a
native kernel needs beyond the inputs.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from qcompile import quant
from qcompile.qmodules import FakeQuantize

from .emit import (_Builder, _int_type, _unit, act_storage, clip_on_codes, emit_activation, emit_cell_requant,
                   emit_weight, grid_index, quantize_gemm_bias, replace_markers, u8_storage)
from .ir import FIXED_BITS

DOMAIN = "qcompile"
VERSION = 1
_OPSET = [helper.make_opsetid("", 21)]


def _attrs(fq: FakeQuantize) -> dict:
    # the level set's bits: ternary/binary have 2/1 whatever --bits said (the layer table's W2/W1)
    attrs = {"scheme": fq.scheme, "bits": int(FIXED_BITS.get(fq.scheme, fq.bits)), "signed": int(fq.signed)}
    if fq.level_offset:
        attrs["offset"] = int(fq.level_offset)  # asymmetric APoT/PoT: the unsigned levels minus this grid integer
    return attrs


SEARCH_STEPS = (4, 8)  # thresholds padded to 15 entries (up to 16 levels) or to 255 (up to 256 levels: 8 bits)


def _search(steps: int, tag: str) -> list[onnx.NodeProto]:
    """Nodes of a branchless binary search of ``steps`` steps over ``thresholds`` padded with +inf to
    ``2^steps - 1`` entries, for the flattened ``xf``: its output is ``pos_{tag}`` (int32 level indices)."""
    def const(name, value, dtype=TensorProto.INT32):
        dims = [len(value)] if isinstance(value, list) else []
        values = value if isinstance(value, list) else [value]
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_v", dtype, dims, values))

    nodes = [const(f"len_{tag}", [2 ** steps - 1], TensorProto.INT64), const(f"zero1_{tag}", [0], TensorProto.INT64),
             const(f"inf_{tag}", float("inf"), TensorProto.FLOAT),
             helper.make_node("Sub", [f"len_{tag}", "n_thr"], [f"pad_len_{tag}"]),
             helper.make_node("Concat", [f"zero1_{tag}", f"pad_len_{tag}"], [f"pads_{tag}"], axis=0),
             helper.make_node("Pad", ["thresholds", f"pads_{tag}", f"inf_{tag}"], [f"table_{tag}"]),
             helper.make_node("ConstantOfShape", ["n_x"], [f"pos_init_{tag}"],
                              value=helper.make_tensor("zero_i32", TensorProto.INT32, [1], [0]))]
    pos = f"pos_init_{tag}"
    for k in reversed(range(steps)):
        step, name = 2 ** k, f"{tag}{k}"
        nodes += [const(f"s{name}", step), const(f"p{name}", step - 1),
                  helper.make_node("Add", [pos, f"p{name}"], [f"probe{name}"]),
                  helper.make_node("GatherElements", [f"table_{tag}", f"probe{name}"], [f"t{name}"], axis=0),
                  helper.make_node("Greater", ["xf", f"t{name}"], [f"above{name}"]),
                  helper.make_node("Add", [pos, f"s{name}"], [f"up{name}"]),
                  helper.make_node("Where", [f"above{name}", f"up{name}", pos], [f"pos{name}"])]
        pos = f"pos{name}"
    nodes.append(helper.make_node("Identity", [pos], [f"pos_{tag}"]))
    return nodes


def _quantize_levels_body() -> list[onnx.NodeProto]:
    """``QuantizeLevels`` as standard operators: a branchless binary search over the thresholds padded with +inf
    (``pos += step if x > thresholds[pos + step - 1]``) on the flattened ``x``, 4 steps where there are at most 16
    levels and 8 otherwise (an ``If`` on the number of thresholds), then ``grid[pos] * scale`` reshaped back.
    Memory and time are O(size of x) at any bit-width. (The body of earlier files compared ``x`` with every
    threshold at once, an int64 tensor ``levels - 1`` times the size of ``x``: 10x slower than the standard form
    at 8 bits on ResNet-18.) NaN compares false everywhere and gets ``grid[0]``, as in the simulation."""
    small, large = SEARCH_STEPS

    def branch(steps, tag):
        return helper.make_graph(_search(steps, tag), f"search_{tag}", [],
                                 [helper.make_tensor_value_info(f"pos_{tag}", TensorProto.INT32, None)])

    return [helper.make_node("Constant", [], ["flat"], value=helper.make_tensor("flat_v", TensorProto.INT64, [1], [-1])),
            helper.make_node("Constant", [], ["small_len"],
                             value=helper.make_tensor("small_v", TensorProto.INT64, [1], [2 ** small - 1])),
            helper.make_node("Shape", ["x"], ["x_shape"]),
            helper.make_node("Reshape", ["x", "flat"], ["xf"]),
            helper.make_node("Shape", ["xf"], ["n_x"]),
            helper.make_node("Shape", ["thresholds"], ["n_thr"]),
            helper.make_node("LessOrEqual", ["n_thr", "small_len"], ["few1"]),
            helper.make_node("Squeeze", ["few1"], ["few"]),
            helper.make_node("If", ["few"], ["pos"], then_branch=branch(small, "a"), else_branch=branch(large, "b")),
            helper.make_node("GatherElements", ["grid", "pos"], ["qf"], axis=0),
            # the codes reshaped, then dequantized: the DequantizeLinear (with its zero point) feeds the next layer
            # itself, the pattern onnxruntime fuses into QLinearConv / QGemm after inlining the body
            helper.make_node("Reshape", ["qf", "x_shape"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"])]  # zero_point: optional

def function_protos() -> list[onnx.FunctionProto]:
    axis_ref = helper.make_attribute_ref("axis", onnx.AttributeProto.INT)
    dq = helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"])  # zero_point: optional
    dq.attribute.append(axis_ref)
    dequantize_levels = helper.make_function(
        DOMAIN, "DequantizeLevels", ["index", "lut", "scale", "zero_point"], ["y"],
        [helper.make_node("Cast", ["index"], ["index32"], to=TensorProto.INT32),
         helper.make_node("Gather", ["lut", "index32"], ["q"], axis=0),
         dq],
        _OPSET, attributes=["scheme", "bits", "signed", "axis"])
    quantize_levels = helper.make_function(
        DOMAIN, "QuantizeLevels", ["x", "thresholds", "grid", "scale", "zero_point"], ["y"], _quantize_levels_body(),
        _OPSET, attributes=["scheme", "bits", "signed"],
        attribute_protos=[helper.make_attribute("offset", 0)])  # a default: symmetric sets leave it out
    quantize_uniform = helper.make_function(
        DOMAIN, "QuantizeUniform", ["x", "scale", "zero_point", "lo", "hi"], ["y"],
        [helper.make_node("Clip", ["x", "lo", "hi"], ["xc"]),
         helper.make_node("QuantizeLinear", ["xc", "scale", "zero_point"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"])],
        _OPSET, attributes=["scheme", "bits", "signed"])
    return [dequantize_levels, quantize_levels, quantize_uniform]


def _custom_node(b: _Builder, op: str, inputs: list[str], output: str, **attrs) -> None:
    b.nodes.append(helper.make_node(op, inputs, [output], name=b.node_name(), domain=DOMAIN, **attrs))


def custom_weight(b: _Builder, fq: FakeQuantize, w: np.ndarray, output: str, transpose: bool = False) -> None:
    ls = fq.levelset
    if ls.storage_dtype == "int32":  # PoT/log2 6-bit weights: the standard form's float dequantization (emit.py)
        emit_weight(b, fq, w, output, transpose)
        return
    codes = fq.quantize(torch.from_numpy(w)).numpy().astype(np.int64)
    axis = fq.axis
    if transpose:
        codes = np.ascontiguousarray(codes.T)
        axis = None if axis is None else 1 - axis
    grid = np.asarray(ls.grid, dtype=np.int64)
    index = grid_index(grid, codes)
    itype = TensorProto.UINT4 if len(grid) <= 16 else TensorProto.UINT8
    u8 = u8_storage(b, grid)  # lut = grid + 128 as uint8 with zero point 128: exact U8U8 kernels (see emit.py)
    offset = 128 if u8 else 0
    lut_t = np.uint8 if u8 else _int_type(int(grid.min()), int(grid.max()))[1]
    unit = _unit(fq)
    inputs = [b.packed(index, itype, "w_index"), b.const((grid + offset).astype(lut_t), "w_lut"), b.const(unit, "w_scale")]
    if u8:
        inputs.append(b.const(np.full(unit.shape, offset, np.uint8), "w_zp"))
    else:
        # explicit even at 0, as the standard form's (emit._dequantize_codes): onnxruntime fuses DequantizeLinear ->
        # Gemm -> QuantizeLinear into QGemm only with explicit zero points, and the custom form's Linear layers
        # stayed float Gemm after it inlined the function body (its convolutions fused); 16- and 32-bit grids too,
        # since onnx.reference's function calls take every declared input
        inputs.append(b.shared_const(np.zeros(unit.shape, lut_t), "w_zp"))
    _custom_node(b, "DequantizeLevels", inputs, output, axis=int(axis if axis is not None else 0), **_attrs(fq))


def custom_activation(b: _Builder, fq: FakeQuantize, x: str, output: str) -> None:
    ls = fq.levelset
    unit = _unit(fq).reshape(())
    if ls.is_uniform and (fq.requant is not None or clip_on_codes(fq)):
        # the re-quantized output of an int8 layer (BindIntegerLayers): standard nodes, QuantizeLinear right after
        # the layer, so onnxruntime fuses it into QLinearConv/QGemm as in the standard form; the Clip that opens
        # QuantizeUniform's body kept the layer on float kernels (42 of LR-ASPP's 66 convolutions at APoT W4A4),
        # where float summation order flipped codes of channels whose sums cancel
        # (and a unit so small that onnxruntime drops the body's float Clip, emit.CLIP_FUSION_GAP)
        emit_activation(b, fq, x, output)
        return
    if ls.is_uniform:
        zp = int(fq.zero_point)
        unsigned = ls.code_min >= 0
        np_t = np.uint8 if unsigned else np.int8
        lo = np.float32(np.float32(ls.code_min - zp) * unit)
        hi = np.float32(np.float32(ls.code_max - zp) * unit)
        inputs = [x, b.const(unit, "a_scale"), b.const(np.array(zp, np_t), "a_zp"),
                  b.const(np.array(lo, np.float32), "lo"), b.const(np.array(hi, np.float32), "hi")]
        _custom_node(b, "QuantizeUniform", inputs, output, **_attrs(fq))
        return
    if fq.cells is not None:  # an int8 layer's output: standard nodes, so onnxruntime fuses the layer (see emit)
        emit_cell_requant(b, fq, x, output)
        return
    if ls.storage_dtype == "int32":  # PoT/log2 5-bit activations: standard nodes, no int32 DequantizeLinear
        emit_activation(b, fq, x, output)
        return
    thr, tie_up = quant.decision_thresholds(ls, torch.as_tensor(unit))
    thr = thr.numpy().astype(np.float32).ravel()
    strict = np.where(tie_up.numpy(), np.nextafter(thr, np.float32(-np.inf)), thr).astype(np.float32)
    grid = np.asarray(ls.grid, dtype=np.int64)
    # the codes as the standard form stores them (act_storage): uint8, shifted up by a zero point where the levels
    # reach below 0, the zero point explicit even at 0. A DequantizeLinear of uint8 codes with its zero point is
    # what onnxruntime fuses with the next layer into QLinearConv / QGemm on x86 (int8 activations it leaves to
    # float kernels there)
    g_np, zp = act_storage(grid)
    inputs = [x, b.const(strict, "thresholds"), b.const((grid + zp).astype(g_np), "grid"), b.const(unit, "a_scale")]
    # the zero point also where it is 0 (16-bit codes: APoT 6-bit, PoT 4-bit): onnx.reference's function calls
    # take every declared input (it refused "4 inputs, expected 5"); onnxruntime computes the same either way
    inputs.append(b.shared_const(np.array(zp, g_np), "a_zp"))
    _custom_node(b, "QuantizeLevels", inputs, output, **_attrs(fq))


def emit_custom(model: onnx.ModelProto, table: dict[int, FakeQuantize], u8_weights: bool = False) -> onnx.ModelProto:
    # a Linear's bias as int32 codes on the accumulator grid, as in the standard form: the QGemm that onnxruntime
    # fuses after inlining the functions then also takes a last layer with float outputs (same values)
    model = quantize_gemm_bias(replace_markers(model, table, custom_weight, custom_activation, u8_weights=u8_weights))
    keep = [o for o in model.opset_import if o.domain != DOMAIN]  # the markers' import (same domain) goes: one entry
    del model.opset_import[:]
    model.opset_import.extend(keep + [helper.make_opsetid(DOMAIN, VERSION)])
    model.functions.extend(function_protos())
    return model
