"""Hand-built pipelines in a wrong order or with a pass left out: one clear error naming the pass to run, where
they used to do nothing silently (InsertQuantizers before SelectLayers: no quantizer, yet the layer table said
"W4 apot") or to give a file that failed its own validation (no QuantizeBias: onnxruntime rounds the biases)."""
from __future__ import annotations

import pytest
import torch

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


def test_build_passes_by_hand_calibrates_what_compile_does_on_a_strided_slice():
    """``build_passes`` gives the passes ``compile`` runs, so a pipeline run by hand on the same data calibrates
    the same scales. A slice x[:32] of (N, 1, 8, 8) images has channels-last strides (64, 1, 8, 1); compile()
    gives the passes plain strides, and the passes took the slice as it was: another convolution path, other
    float sums, scales apart by 1e-4 and logits by 0.13 at APoT W3A3."""
    from qcompile.models import digits
    from qcompile.pipeline import build_passes
    from qcompile.threads import compile_threads, torch_threads

    x_train, _, _, _ = digits.load_split()
    model, calib = digits.pretrained(), x_train[:32]
    assert calib.stride() == (64, 1, 8, 1)  # what makes this case
    result = qcompile.compile(model, calib[:1], calib=calib, scheme="apot", bits=3, validate=False)
    with torch_threads(compile_threads(model, (calib[:1],))):  # the thread count compile() runs with
        gm = Pipeline(build_passes(result.options, calib))(qcompile.trace(model, calib[:1])).gm
    for name, t in result.model.state_dict().items():
        assert torch.equal(t, gm.state_dict()[name]), name


@pytest.mark.parametrize("form", ["numpy", "float64", "dataloader", "list of batches", "generator"])
def test_build_passes_take_the_calibration_forms_compile_takes(form):
    """compile() converts a numpy array, float64 data, a DataLoader of (x, y) or a list of batches; the pipeline
    from build_passes crashed on each in RecordFloatOutputs, its first quantization pass (it read the raw data). A
    generator of batches was used up by that pass, and the next said "the calibration data is empty"."""
    from torch.utils.data import DataLoader, TensorDataset

    from qcompile.models import digits
    from qcompile.pipeline import build_passes

    x_train, y_train, _, _ = digits.load_split()
    calib = x_train[:32].clone()
    data = {"numpy": calib.numpy(), "float64": calib.double(),
            "dataloader": DataLoader(TensorDataset(calib, y_train[:32]), batch_size=8),
            "list of batches": [calib[:16], calib[16:]],
            "generator": (calib[i:i + 8] for i in range(0, 32, 8))}[form]
    model = digits.pretrained()
    opts = CompileOptions(scheme="apot", bits=4)
    want = Pipeline(build_passes(opts, calib))(qcompile.trace(model, calib[:1])).gm
    got = Pipeline(build_passes(opts, data))(qcompile.trace(model, calib[:1])).gm
    for name, t in want.state_dict().items():
        assert torch.equal(t, got.state_dict()[name]), name


def test_quantize_bias_before_calibrate_is_an_error():
    """QuantizeBias before Calibrate did nothing and said nothing (its layers' quantizers have no ranges yet); the
    export later asked for QuantizeBias after Calibrate."""
    model = MLP()
    x = example_input(model, seed=1, batch=32)
    with pytest.raises(PassError, match="is not calibrated yet: run Calibrate after InsertQuantizers .* and before "
                                        "QuantizeBias"):
        Pipeline([SelectLayers(DEFAULT), InsertQuantizers(), QuantizeBias()])(qcompile.trace(model, x[:1]))


def test_calibrate_before_insert_quantizers_says_to_insert_them_first():
    """Calibrate run between SelectLayers and InsertQuantizers reported "every layer is kept float" (the layers
    were chosen for quantization, their quantizers not placed yet), and QuantizeBias then asked for Calibrate, which
    had run: both name InsertQuantizers."""
    model = MLP()
    x = example_input(model, seed=1, batch=32)
    calibrate = Calibrate(x)
    with pytest.raises(PassError, match="run Calibrate after InsertQuantizers"):
        Pipeline([SelectLayers(DEFAULT), calibrate, InsertQuantizers(), QuantizeBias()])(qcompile.trace(model, x[:1]))
    assert calibrate.report == ["no quantizers in the graph yet: InsertQuantizers places them for the layers "
                                "SelectLayers chose; run it before Calibrate"]


def test_pipeline_api_mistakes_get_one_clear_error():
    """Mistakes of the pass-pipeline API that gave unreadable or no errors (a sweep of the API): a pass class for an
    instance ("pass <property object at 0x...> failed"), a pass run on the model instead of its traced graph
    ("'MLP' object has no attribute 'graph'"), a LayerConfig action typo (the layer stayed float, silently), an
    unknown observer name (recorded, unused), a second Calibrate (nothing happened, nothing said)."""
    from qcompile.passes import FoldBatchNorm

    model = MLP()
    x = example_input(model, seed=1, batch=32)
    with pytest.raises(TypeError, match=r"FoldBatchNorm is a pass class; give an instance: FoldBatchNorm\(\)"):
        Pipeline([FoldBatchNorm])
    for run in (FoldBatchNorm(), Pipeline([FoldBatchNorm()])):
        with pytest.raises(TypeError, match=r"trace the model first, gm = qcompile.trace\(model, example_inputs\)"):
            run(model)
    with pytest.raises(ValueError, match="LayerConfig.action must be 'quant' or 'float', got 'quantize'"):
        LayerConfig(action="quantize")
    with pytest.raises(ValueError, match="unknown calibration method 'no-such'"):
        InsertQuantizers(observer="no-such")
    gm = Pipeline([SelectLayers(DEFAULT), InsertQuantizers(), Calibrate(x)])(qcompile.trace(model, x[:1])).gm
    again = Calibrate(x * 2)
    assert not again(gm).modified and "calibrated already: nothing to do" in again.report[0]


def test_calibration_data_without_samples_is_one_clear_error():
    """Calibrate or BiasCorrection given an empty tensor stopped with ``pass Calibrate failed: StopIteration: `` (an
    empty message): the first batch of no data."""
    from qcompile.errors import UserError
    from qcompile.passes import BiasCorrection

    model = MLP()
    x = example_input(model, seed=1, batch=8)
    for late in ([Calibrate(x[:0])], [Calibrate(x), BiasCorrection(x[:0])]):
        with pytest.raises(UserError, match=r"the calibration data holds no samples \(shape \(0, "):
            Pipeline([SelectLayers(DEFAULT), InsertQuantizers(), *late])(qcompile.trace(model, x[:1]))


@pytest.mark.parametrize("name", ["BindIntegerLayers", "PairSafeInt8Weights", "ShareInt8Params", "BindIntegerAdds",
                                  "BindIntegerMuls", "BindIntegerSigmoids", "BindIntegerPools"])
def test_passes_after_calibrate_run_before_it_are_an_error(name):
    """Run before Calibrate they skipped every uncalibrated quantizer without a word: a pipeline with
    BindIntegerLayers before Calibrate exported a file with no layer on the int8 kernels it simulates."""
    from qcompile import passes

    model = ResidualCNN()
    x = example_input(model, seed=2, batch=4)
    with pytest.raises(PassError, match=f"not calibrated yet: run Calibrate after InsertQuantizers .* before {name}"):
        Pipeline([SelectLayers(DEFAULT), InsertQuantizers(), getattr(passes, name)()])(qcompile.trace(model, x[:1]))


def test_late_or_repeated_decisions_are_reported():
    """BiasCorrection after BindIntegerLayers corrected only the unbound layers, SelectLayers given a new
    configuration after InsertQuantizers kept the old one, Calibrate on a graph without quantizers did nothing:
    all without a word."""
    from qcompile.passes import BiasCorrection, BindIntegerLayers

    model = MLP()
    x = example_input(model, seed=1, batch=32)
    gm = qcompile.trace(model, x[:1])
    calibrate = Calibrate(x)
    assert not calibrate(gm).modified and "no quantizers in the graph" in calibrate.report[0]
    gm = Pipeline([SelectLayers(DEFAULT, first_last="quant"), InsertQuantizers(), Calibrate(x), QuantizeBias(),
                   BindIntegerLayers()])(gm).gm
    late = BiasCorrection(x)
    late(gm)
    assert any("bound to int8 kernels already and were not corrected (in a pipeline of your own: run "
               "BiasCorrection before BindIntegerLayers)" in line for line in late.report), late.report
    gm = Pipeline([SelectLayers(DEFAULT, first_last="quant"), InsertQuantizers()])(qcompile.trace(model, x[:1])).gm
    again = SelectLayers(LayerConfig(action="quant", wscheme="uniform", wbits=8, ascheme="uniform", abits=8))
    assert not again(gm).modified
    assert any("keep the decision that placed them, not this configuration" in line for line in again.report)


@pytest.mark.parametrize("field, value", [("per_channel", "no"), ("wbits", "4"), ("abits", 4.0), ("wbits", True),
                                          ("wscheme", "apot4")])
def test_layer_config_refuses_values_of_the_wrong_type(field, value):
    """per_channel="no" quantized per channel, wbits="4" went into the metadata as a string."""
    with pytest.raises((TypeError, ValueError), match=f"LayerConfig.{field} must be"):
        LayerConfig(**{field: value})
