"""Lookup tables that onnxruntime builds for its int8 kernels, read back from onnxruntime itself.

``QLinearSigmoid`` (what onnxruntime fuses ``DequantizeLinear → Sigmoid → QuantizeLinear`` into) maps each of the
256 input codes through a table it builds when the session loads: the dequantized code, MLAS's logistic (a
rational approximation, vectorised per CPU), ``QuantizeLinear``'s rounding. The unfused graph computes the same
values (its float ``Sigmoid`` is the same MLAS routine), which is how the tables are read here. A table written in
Python from the exact logistic would differ wherever the approximation falls on the other side of a rounding
threshold, and one entry off is every activation with that code; so the simulation
(``qcompile.qmodules.Int8Sigmoid``) asks onnxruntime, once per set of parameters and process.
"""
from __future__ import annotations

import numpy as np


_TABLES: dict = {}  # (in_unit, in_zp, in_signed, out_unit, out_zp, out_signed) -> table, for the process
_KEPT = 4096  # tables kept (2 KiB each); the oldest go first


def sigmoid_table(in_unit: float, in_zp: int, in_signed: bool, out_unit: float, out_zp: int,
                  out_signed: bool) -> np.ndarray:
    """Output codes (int64, 256 entries, read-only) of ``QuantizeLinear(Sigmoid(DequantizeLinear(x)))`` for the input
    codes ``x`` = -128..127 (``in_signed``, int8) or 0..255 (uint8), as onnxruntime computes them."""
    return sigmoid_tables([(in_unit, in_zp, in_signed, out_unit, out_zp, out_signed)])[0]


def sigmoid_tables(params: list) -> list:
    """``sigmoid_table`` for many parameter sets with one onnxruntime session, a graph of one chain per set not
    seen before in this process (EfficientNet-B0 has 65 gates)."""
    keys = [tuple((float(p[0]), int(p[1]), bool(p[2]), float(p[3]), int(p[4]), bool(p[5]))) for p in params]
    missing = list(dict.fromkeys(k for k in keys if k not in _TABLES))
    if missing:
        built = dict(zip(missing, _build(missing)))
        for table in built.values():
            table.flags.writeable = False
        out = [_TABLES.get(k, built.get(k)) for k in keys]
        _TABLES.update(built)
        while len(_TABLES) > _KEPT:
            del _TABLES[next(iter(_TABLES))]
        return out
    return [_TABLES[k] for k in keys]


def _build(keys: list) -> list:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from .session import session

    types = {False: (np.uint8, TensorProto.UINT8), True: (np.int8, TensorProto.INT8)}
    inits, nodes, outputs = [], [], []
    for i, (in_unit, in_zp, in_signed, out_unit, out_zp, out_signed) in enumerate(keys):
        in_np, out_np = types[in_signed][0], types[out_signed][0]
        inits += [numpy_helper.from_array(np.array(in_unit, np.float32), f"sx{i}"),
                  numpy_helper.from_array(np.array(in_zp, in_np), f"zx{i}"),
                  numpy_helper.from_array(np.array(out_unit, np.float32), f"sy{i}"),
                  numpy_helper.from_array(np.array(out_zp, out_np), f"zy{i}")]
        # each chain is what onnxruntime fuses into one QLinearSigmoid, which builds its table when the session loads
        source = "x_s8" if in_signed else "x_u8"
        nodes += [helper.make_node("DequantizeLinear", [source, f"sx{i}", f"zx{i}"], [f"f{i}"]),
                  helper.make_node("Sigmoid", [f"f{i}"], [f"g{i}"]),
                  helper.make_node("QuantizeLinear", [f"g{i}", f"sy{i}", f"zy{i}"], [f"y{i}"])]
        outputs.append(helper.make_tensor_value_info(f"y{i}", types[out_signed][1], [256]))
    inputs = [helper.make_tensor_value_info(name, types[signed][1], [256])
              for name, signed in (("x_u8", False), ("x_s8", True))]
    graph = helper.make_graph(nodes, "sigmoid_tables", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    feeds = {"x_u8": np.arange(256).astype(np.uint8), "x_s8": np.arange(-128, 128).astype(np.int8)}
    # unoptimized: the float Sigmoid kernel is the same MLAS logistic and QuantizeLinear the same rounding, so the
    # chains give QLinearSigmoid's tables (tests compare them with the fused kernel), and the session builds in
    # 0.5 ms per chain instead of 8 (the QDQ fusion pass)
    sess = session(model.SerializeToString(), threads=1, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return [out.astype(np.int64) for out in sess.run(None, feeds)]
