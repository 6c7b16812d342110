"""Lookup tables that onnxruntime builds for its int8 kernels, read back from onnxruntime itself.

``QLinearSigmoid`` (what onnxruntime fuses ``DequantizeLinear → Sigmoid → QuantizeLinear`` into) maps each of the
256 input codes through a table it builds when the session loads: the dequantized code, MLAS's logistic (a
rational approximation, vectorised per CPU), ``QuantizeLinear``'s rounding. The unfused graph computes the same
values (its float ``Sigmoid`` is the same MLAS routine). A table written in Python from the exact logistic would
differ wherever the approximation falls on the other side of a rounding threshold, and one entry off is every
activation with that code; so the simulation (``qcompile.qmodules.Int8Sigmoid``) asks onnxruntime, once per set of
parameters.
"""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4096)
def sigmoid_table(in_unit: float, in_zp: int, in_signed: bool, out_unit: float, out_zp: int,
                  out_signed: bool) -> np.ndarray:
    """Output codes (int64, 256 entries, read-only) of ``QuantizeLinear(Sigmoid(DequantizeLinear(x)))`` for the input
    codes ``x`` = -128..127 (``in_signed``, int8) or 0..255 (uint8), as onnxruntime computes them."""
    from onnx import TensorProto, helper, numpy_helper

    from .session import session

    in_np, in_t = (np.int8, TensorProto.INT8) if in_signed else (np.uint8, TensorProto.UINT8)
    out_np, out_t = (np.int8, TensorProto.INT8) if out_signed else (np.uint8, TensorProto.UINT8)
    inits = [numpy_helper.from_array(np.array(in_unit, np.float32), "sx"),
             numpy_helper.from_array(np.array(in_zp, in_np), "zx"),
             numpy_helper.from_array(np.array(out_unit, np.float32), "sy"),
             numpy_helper.from_array(np.array(out_zp, out_np), "zy")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["f"]),
             helper.make_node("Sigmoid", ["f"], ["g"]),
             helper.make_node("QuantizeLinear", ["g", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, "sigmoid_table", [helper.make_tensor_value_info("x", in_t, [256])],
                              [helper.make_tensor_value_info("y", out_t, [256])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    codes = np.arange(-128, 128) if in_signed else np.arange(256)
    out = session(model.SerializeToString(), threads=1).run(None, {"x": codes.astype(in_np)})[0]
    table = out.astype(np.int64)
    table.flags.writeable = False
    return table
