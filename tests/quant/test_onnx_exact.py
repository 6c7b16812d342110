"""Exactness against onnxruntime: uniform ``quantize`` == ``QuantizeLinear``; non-uniform ``quantize`` == a
``Greater``/``GreaterOrEqual`` graph built from ``decision_thresholds``. Codes must be identical, ties included."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile.quant import decision_thresholds, level_set, quantize, unit_from_alpha

_ONNX_TYPE = {"int2": TensorProto.INT2, "uint2": TensorProto.UINT2, "int4": TensorProto.INT4,
              "uint4": TensorProto.UINT4, "int8": TensorProto.INT8, "uint8": TensorProto.UINT8,
              "int16": TensorProto.INT16, "uint16": TensorProto.UINT16}


def _run(model, feeds):
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _zp_tensor(name, values, dtype):
    values = np.asarray(values, dtype=np.int64)
    return helper.make_tensor(name, _ONNX_TYPE[dtype], list(values.shape), values.reshape(-1).tolist())


def quantize_linear_onnx(x: np.ndarray, scale: np.ndarray, zero_point, dtype: str, axis=None) -> np.ndarray:
    """QuantizeLinear in onnxruntime, the codes cast to int32."""
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], **attrs),
             helper.make_node("Cast", ["q"], ["y"], to=TensorProto.INT32)]
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "scale"),
             _zp_tensor("zp", zero_point, dtype)]
    graph = helper.make_graph(nodes, "ql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, list(x.shape))], inits)
    opset = 25 if dtype in ("int2", "uint2") else 21
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return _run(model, {"x": x})


def threshold_graph_onnx(x: np.ndarray, thr: np.ndarray, tie_up: np.ndarray, grid) -> np.ndarray:
    """Count the passed thresholds with Greater / GreaterOrEqual (ties up), then Gather the grid integer."""
    nodes, inits, counts = [], [numpy_helper.from_array(np.asarray(grid, np.int32), "grid")], []
    for j in range(thr.shape[-1]):
        const = np.ascontiguousarray(thr[..., j:j + 1] if thr.ndim > 1 else thr[j])
        inits.append(numpy_helper.from_array(const.astype(np.float32), f"t{j}"))
        op = "GreaterOrEqual" if tie_up[j] else "Greater"
        nodes.append(helper.make_node(op, ["x", f"t{j}"], [f"b{j}"]))
        nodes.append(helper.make_node("Cast", [f"b{j}"], [f"c{j}"], to=TensorProto.INT32))
        counts.append(f"c{j}")
    total = counts[0]
    for j, name in enumerate(counts[1:]):  # Sum is float-only: add the int32 indicators pairwise
        nodes.append(helper.make_node("Add", [total, name], [f"s{j}"]))
        total = f"s{j}"
    nodes.append(helper.make_node("Identity", [total], ["index"]))
    nodes.append(helper.make_node("Gather", ["grid", "index"], ["y"], axis=0))
    graph = helper.make_graph(nodes, "thr", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, list(x.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return _run(model, {"x": x})


def _inputs(unit: torch.Tensor, ls, n: int, seed: int) -> np.ndarray:
    """Random values across (and beyond) the range, plus every threshold, level midpoint and their neighbours."""
    gen = torch.Generator().manual_seed(seed)
    top = float(unit.max()) * ls.denom
    x = [torch.randn(n, generator=gen) * top, (torch.rand(n, generator=gen) * 2 - 1) * 1.5 * top]
    thr, _ = decision_thresholds(ls, unit.reshape(-1)[0])
    half = (torch.arange(2 * ls.code_min - 2, 2 * ls.code_max + 3) * 0.5).to(torch.float32) * unit.reshape(-1)[0]
    for t in (thr, half):
        x += [t, torch.nextafter(t, torch.tensor(np.inf)), torch.nextafter(t, torch.tensor(-np.inf))]
    return torch.cat(x).numpy().astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scheme,signed", [("uniform", True), ("uniform", False), ("uniform_asym", True),
                                           ("uniform_asym", False)])
def test_uniform_quantize_equals_quantize_linear(scheme, signed, bits):
    ls = level_set(scheme, bits, signed)
    for seed, alpha in enumerate([0.37, 1.0, 3.3, 117.0]):
        unit = unit_from_alpha(alpha, ls)
        x = _inputs(unit, ls, 2000, seed)
        zps = [ls.zero_point] if scheme == "uniform" else [ls.code_min, (ls.code_min + ls.code_max) // 2, ls.code_max]
        for zp in zps:
            ours = quantize(torch.from_numpy(x), alpha, ls, zero_point=zp).numpy()
            ref = quantize_linear_onnx(x, unit.numpy(), zp, ls.storage_dtype)
            # QuantizeLinear saturates to the storage type; the restricted symmetric range clips once more
            ref = np.clip(ref, ls.code_min, ls.code_max)
            np.testing.assert_array_equal(ours, ref)


def test_uniform_per_axis_equals_quantize_linear():
    ls = level_set("uniform_asym", 8, signed=False)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 3, 50, generator=gen) * 4).numpy()
    alpha = torch.tensor([0.5, 2.0, 7.0])
    zp = torch.tensor([0, 100, 255], dtype=torch.int32)
    ours = quantize(torch.from_numpy(x), alpha, ls, axis=1, zero_point=zp).numpy()
    ref = quantize_linear_onnx(x, unit_from_alpha(alpha, ls).numpy(), zp.numpy(), "uint8", axis=1)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("scheme,bits,signed", [("apot", 3, True), ("apot", 4, True), ("apot", 8, True),
                                                ("apot", 4, False), ("pot", 4, True), ("log2", 5, True),
                                                ("binary", 1, True)])
def test_threshold_decisions_equal_onnx_comparisons(scheme, bits, signed):
    ls = level_set(scheme, bits, signed)
    for seed, alpha in enumerate([0.3, 1.0, 2.7, 55.0]):
        unit = unit_from_alpha(alpha, ls)
        x = _inputs(unit, ls, 3000, seed)
        thr, tie_up = decision_thresholds(ls, unit)
        ours = quantize(torch.from_numpy(x), alpha, ls).numpy()
        ref = threshold_graph_onnx(x, thr.numpy(), tie_up.numpy(), ls.grid)
        np.testing.assert_array_equal(ours, ref)


def test_per_channel_threshold_decisions_equal_onnx_comparisons():
    ls = level_set("apot", 4, True)
    gen = torch.Generator().manual_seed(5)
    alpha = torch.tensor([0.4, 1.3, 9.0])
    x = torch.randn(3, 400, generator=gen) * alpha[:, None]
    thr, tie_up = decision_thresholds(ls, unit_from_alpha(alpha, ls))  # (3, 14)
    x = torch.cat([x, thr, torch.nextafter(thr, torch.tensor(-np.inf))], dim=1).numpy()
    ours = quantize(torch.from_numpy(x), alpha, ls, axis=0).numpy()
    ref = threshold_graph_onnx(x, thr.numpy(), tie_up.numpy(), ls.grid)
    np.testing.assert_array_equal(ours, ref)
