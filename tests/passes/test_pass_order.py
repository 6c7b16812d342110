"""Hand-built pipelines in a wrong order or with a pass left out: one clear error naming the pass to run, where
they used to do nothing silently (InsertQuantizers before SelectLayers: no quantizer, yet the layer table said
"W4 apot") or to give a file that failed its own validation (no QuantizeBias: onnxruntime rounds the biases)."""
from __future__ import annotations

import pytest

import qcompile
from qcompile.emit import emit, quantizers_by_id
from qcompile.export import export_onnx
from qcompile.ir import LayerConfig
from qcompile.options import CompileOptions
from qcompile.passes import (Calibrate, FoldBatchNorm, InsertQuantizers, PassError, Pipeline, QuantizeBias,
                             SelectLayers)
from qcompile.passes.select import layer_table
from qcompile.runtime.validation import validate_quantized
from tests.models import MLP, ResidualCNN, example_input, randomize_batchnorm

DEFAULT = LayerConfig(action="quant", wscheme="apot", wbits=4, ascheme="apot", abits=4)


def test_insert_quantizers_before_select_layers_is_an_error():
    model = MLP()
    with pytest.raises(PassError, match="run SelectLayers before it"):
        Pipeline([InsertQuantizers(), SelectLayers(DEFAULT)])(qcompile.trace(model, example_input(model)))


def test_export_without_quantize_bias_is_an_error_and_with_it_the_file_validates():
    model = MLP()
    x = example_input(model, seed=1, batch=32)
    passes = [SelectLayers(DEFAULT), InsertQuantizers(), Calibrate(x)]
    gm = Pipeline(passes)(qcompile.trace(model, x[:1])).gm
    with pytest.raises(RuntimeError, match="run the QuantizeBias pass after Calibrate"):
        export_onnx(gm, x[:1])
    gm = Pipeline([QuantizeBias()])(gm).gm
    table = quantizers_by_id(gm)
    onnx_model = emit(export_onnx(gm, x[:1]), table, CompileOptions(scheme="apot", bits=4))
    report = validate_quantized(onnx_model.SerializeToString(), gm, x)
    assert report.passed, report.summary()


def test_fold_batchnorm_after_insert_quantizers_says_why_nothing_folds():
    model = randomize_batchnorm(ResidualCNN(), seed=1)
    x = example_input(model, batch=8)
    gm = Pipeline([SelectLayers(DEFAULT), InsertQuantizers()])(qcompile.trace(model, x[:1])).gm
    fold = FoldBatchNorm()
    result = fold(gm)
    assert not result.modified
    assert any("already quantized (run FoldBatchNorm before InsertQuantizers)" in line for line in fold.report), \
        fold.report
    assert layer_table(gm)  # the decisions are still there to read
