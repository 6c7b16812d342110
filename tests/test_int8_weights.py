"""8-bit weight storage (``--int8-weights``): int8 codes, or uint8 = code + 128 with zero point 128 (the
pair-safe int8 form, ``s8-safe``, is tested in ``test_int8_pairs.py``).

onnxruntime's uint8 × int8 kernels saturate on x86 CPUs without VNNI; the uint8 form runs on its uint8 × uint8
kernels, exact everywhere. These tests run on whatever machine the suite runs on, and say which it is.
"""
from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

import qcompile
from qcompile.lowering import lowered_layers
from qcompile.models import digits
from qcompile.runtime.session import run, session, u8s8_saturates


@pytest.fixture(scope="module")
def data():
    x_tr, _, x_te, _ = digits.load_split()
    return x_tr[:128], x_te[:200]


def weight_dq_inputs(model: onnx.ModelProto) -> list[tuple[onnx.TensorProto, np.ndarray | None]]:
    """(stored codes, zero point) of every DequantizeLinear that reads a 2-D/4-D integer initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) >= 2:
            zp = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else None
            out.append((inits[n.input[0]], zp))
    return out


def optimized_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    path = str(tmp_path / "opt.onnx")
    session(model.SerializeToString(), optimized_model_path=path)
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def test_probe_answers_and_auto_records_its_choice(data):
    calib, x = data
    saturates = u8s8_saturates()
    assert isinstance(saturates, bool)
    result = qcompile.compile(digits.pretrained(), calib=calib, scheme="uniform", bits=8, validate=False)
    assert result.options.int8_weights == ("s8-safe" if saturates else "s8")
    meta = {p.key: p.value for p in result.onnx_model.metadata_props}
    assert json.loads(meta["qcompile.options"])["int8_weights"] == result.options.int8_weights


def test_u8_storage_is_exact_on_this_machine_and_keeps_the_int8_kernels(data, tmp_path):
    calib, x = data
    u8 = qcompile.compile(digits.pretrained(), calib=calib, scheme="uniform", bits=8, int8_weights="u8",
                          validation_inputs=x)
    s8 = qcompile.compile(digits.pretrained(), calib=calib, scheme="uniform", bits=8, int8_weights="s8",
                          validate=False)
    stored = weight_dq_inputs(u8.onnx_model)
    assert stored and all(t.data_type == TensorProto.UINT8 for t, _ in stored)
    assert all(zp is not None and zp.dtype == np.uint8 and np.all(zp == 128) for _, zp in stored)
    assert all(t.data_type == TensorProto.INT8 for t, _ in weight_dq_inputs(s8.onnx_model))
    # the same real weights: code + 128 - 128
    for (tu, _), (ts, _) in zip(stored, weight_dq_inputs(s8.onnx_model)):
        assert np.array_equal(numpy_helper.to_array(tu).astype(np.int16) - 128, numpy_helper.to_array(ts))
    # the digits model's first layer reads full-range codes (pixels at 16 -> 255) with full-range weights: the
    # case that saturates; in uint8 storage onnxruntime equals the simulation bit for bit
    assert u8.report.passed and u8.report.max_abs == 0.0, u8.report.summary()
    assert u8.report.extra["codes_differ"] == 0
    ops_u8, ops_s8 = optimized_ops(u8.onnx_model, tmp_path), optimized_ops(s8.onnx_model, tmp_path)
    assert ops_u8["QLinearConv"] == ops_s8["QLinearConv"] == 4 and ops_u8["QGemm"] == ops_s8["QGemm"] == 2
    assert ops_u8["DequantizeLinear"] == 0


def test_s8_storage_is_exact_exactly_where_the_probe_says(data):
    calib, x = data
    s8 = qcompile.compile(digits.pretrained(), calib=calib, scheme="uniform", bits=8, int8_weights="s8",
                          validation_inputs=x)
    if u8s8_saturates():  # x86 without VNNI: pmaddubsw saturates on the first layer's full-range products
        assert not s8.report.passed and s8.report.max_abs > 0.5, s8.report.summary()
        assert any("--int8-weights s8-safe" in f for f in s8.report.failures), s8.report.failures  # why, the fix
        assert s8.report.extra["saturating_pairs"] > 0
    else:
        assert s8.report.passed and s8.report.max_abs == 0.0, s8.report.summary()
    assert s8.report.extra["saturating_pairs"] > 0  # a property of the file, whatever this CPU does


def test_narrow_grids_stay_int8(data):
    calib, _ = data
    # APoT-4 weights ({0, ±1, ..., ±10}): 2·255·10 < 2^15, no kernel saturates, so no zero point is needed
    result = qcompile.compile(digits.pretrained(), calib=calib, scheme="apot", bits=4, wscheme="apot",
                              ascheme="uniform", abits=8, keep_first_last="quant", int8_weights="u8", validate=False)
    luts = [t for t in result.onnx_model.graph.initializer if len(t.dims) == 1 and t.dims[0] == 15]
    assert luts and all(t.data_type == TensorProto.INT8 for t in luts)
    assert all(zp is None for _, zp in weight_dq_inputs(result.onnx_model))


@pytest.mark.parametrize("emit", ["custom", "shift-add"])
def test_wide_level_grids_in_uint8_run_exactly_in_every_form(data, emit):
    calib, x = data
    # APoT-6 weights: grid integers up to ±100, stored as a uint8 lookup table with zero point 128
    result = qcompile.compile(digits.pretrained(), calib=calib, scheme="apot", bits=6, int8_weights="u8", emit=emit,
                              validation_inputs=x)
    assert result.report.passed, result.report.summary()
    if emit == "custom":
        dq = [n for n in result.onnx_model.graph.node if n.op_type == "DequantizeLevels"]
        assert any(len(n.input) == 4 for n in dq)  # the optional zero point
    else:
        assert lowered_layers(result.onnx_model), "no layer lowered to shift-add"
    got = run(session(result.onnx_model.SerializeToString()), [x.numpy()])[0]
    with torch.no_grad():
        sim = result.model(x).numpy()
    assert np.abs(got - sim).max() <= 1e-4 * np.abs(sim).max()
