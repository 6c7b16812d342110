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
    off = np.abs(got - sim).max(axis=1) > 1e-4 * np.abs(sim).max()
    if emit == "custom":  # its function bodies run float kernels: a code at a rounding tie may flip (1 row of 200)
        assert off.mean() <= 0.01 and (got.argmax(1) == sim.argmax(1)).all()
    else:
        assert not off.any()


@pytest.mark.parametrize("saturates", [True, False])
def test_emit_with_auto_in_a_pipeline_of_ones_own_stores_u8_where_s8_would_saturate(saturates, monkeypatch, data):
    """``emit`` with ``int8_weights="auto"`` after a pipeline without ``PairSafeInt8Weights`` (the README's minimal
    one): on a CPU whose onnxruntime saturates uint8 × int8 products, full-range int8 weights made a file that
    failed its validation there (81 pairs past int16); it stores uint8 weights instead. Elsewhere, int8."""
    import sys

    from qcompile import CompileOptions, emit, export_onnx
    from qcompile.passes import Calibrate, InsertQuantizers, Pipeline, QuantizeBias, SelectLayers
    from qcompile.ir import LayerConfig
    from qcompile.runtime.validation import saturating_pairs

    # the module (qcompile.runtime re-exports a function of the same name)
    monkeypatch.setattr(sys.modules["qcompile.runtime.session"], "u8s8_saturates", lambda: saturates)
    x, _ = data
    cfg = LayerConfig(action="quant", wscheme="uniform", wbits=8, ascheme="uniform", abits=8)
    passes = [SelectLayers(cfg, first_last="quant"), InsertQuantizers(), Calibrate(x[:64]), QuantizeBias()]
    gm = Pipeline(passes)(qcompile.trace(digits.pretrained(), x[:1])).gm
    table = emit.quantizers_by_id(gm)
    s8 = emit.emit(export_onnx(gm, x[:1]), table, CompileOptions(scheme="uniform", bits=8, int8_weights="s8"))
    assert saturating_pairs(s8) > 0  # the digits CNN's full-range int8 weights have pairs past int16
    model = emit.emit(export_onnx(gm, x[:1]), table, CompileOptions(scheme="uniform", bits=8))
    stored = {t.data_type for t, _ in weight_dq_inputs(model)}
    assert stored == ({TensorProto.UINT8} if saturates else {TensorProto.INT8})
    if saturates:
        assert saturating_pairs(model) == 0


def test_layers_fed_by_16_bit_codes_have_no_saturating_pairs(data):
    """PoT-4 activations are int16 codes: the layers they feed run on float kernels in onnxruntime, so no uint8 ×
    int8 pair can saturate there. They were counted (446 pairs on a digits MLP) and the validation line advised
    --int8-weights s8-safe, which changed nothing."""
    from qcompile.runtime.validation import saturating_pairs

    x, _ = data
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    result = qcompile.compile(model, x[:1], calib=x[:64], scheme="pot", bits=4, keep_first_last="quant")
    assert result.report.passed, result.report.summary()
    graph = result.onnx_model.graph
    inits = {t.name: t for t in graph.initializer}
    assert any(t.data_type == TensorProto.INT16 for t in inits.values())  # the activations' level tables
    assert saturating_pairs(result.onnx_model) == 0
    assert result.report.extra["saturating_pairs"] == 0


def test_layers_fed_by_sub_8_bit_uniform_codes_count_pairs_at_their_largest_code(data):
    """4-bit uniform activations are uint8 codes up to 15 (``Clip`` → ``QuantizeLinear``): a pair of full-range
    int8 weights adds to at most 15 · 254 there, far from int16. Every pair past 128 was counted as if the codes
    reached 255, and the report advised --int8-weights s8-safe for a file exact on this CPU (found by the CLI
    sweep: 132 pairs at W8A4)."""
    from qcompile.runtime.validation import saturating_pairs

    x, _ = data
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    torch.manual_seed(0)
    for m in model:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.uniform_(m.weight, -1.0, 1.0)  # flat rows: many pairs of large codes
    result = qcompile.compile(model, x[:1], calib=x[:64], scheme="uniform", wbits=8, abits=4,
                              keep_first_last="fp32", int8_weights="s8", validation_inputs=x[64:])
    assert result.report.passed, result.report.summary()
    graph = result.onnx_model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    wide = [w for w in inits.values() if w.dtype == np.int8 and w.ndim == 2 and w.shape == (64, 64)]
    assert wide and int((np.abs(wide[0][:, 0::2].astype(int) + wide[0][:, 1::2]) > 128).sum()) > 0
    assert any(n.op_type == "Clip" for n in graph.node)  # the 4-bit input codes end at the clip
    assert saturating_pairs(result.onnx_model) == 0
    assert result.report.extra["saturating_pairs"] == 0
    assert "past int16" not in result.report.summary()
