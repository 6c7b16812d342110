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
    with pytest.raises(PassError, match="InsertQuantizers ran after Calibrate and placed it; run InsertQuantizers "
                                        "before Calibrate"):
        Pipeline([SelectLayers(DEFAULT), calibrate, InsertQuantizers(), QuantizeBias()])(qcompile.trace(model, x[:1]))
    assert calibrate.report == ["no quantizers in the graph yet: InsertQuantizers places them for the layers "
                                "SelectLayers chose; run it before Calibrate"]


def test_passes_on_quantizers_before_insert_quantizers_say_they_did_nothing():
    """Eight passes placed before InsertQuantizers returned modified=False with an empty report: AdaptiveRounding and
    BiasCorrection there cost the digits model at APoT W3A3 4 dB, without a word."""
    from qcompile.passes import (AdaptiveRounding, BiasCorrection, BindIntegerAdds, BindIntegerLayers,
                                 BindIntegerPools, PairSafeInt8Weights, QuantizeOutputs, ShareInt8Params)

    model = ResidualCNN()
    x = example_input(model, seed=1, batch=8)
    early = [AdaptiveRounding(x), BiasCorrection(x), QuantizeOutputs(), BindIntegerLayers(), PairSafeInt8Weights(),
             ShareInt8Params(), BindIntegerAdds(), BindIntegerPools()]
    Pipeline([FoldBatchNorm(), SelectLayers(DEFAULT), *early, InsertQuantizers(), Calibrate(x), QuantizeBias()])(
        qcompile.trace(model, x[:1]))
    for p in early:
        assert p.report == [f"the graph has no quantizers: nothing to do; run {p.name} after InsertQuantizers and "
                            "Calibrate (the order of qcompile.pipeline.build_passes)"], p.name


def test_check_float_outputs_names_a_pass_of_ones_own_or_its_late_place_not_a_qcompile_bug():
    """A pass of one's own that changes the model (ReLU -> ReLU6), or CheckFloatOutputs placed after the passes that
    quantize, was reported as "qcompile's graph passes changed what the model computes ...; this is a qcompile bug"."""
    import torch.nn.functional as F

    from qcompile.errors import UserError
    from qcompile.models import digits
    from qcompile.passes import BiasCorrection, CheckFloatOutputs, Pass, PassResult, RecordFloatOutputs
    from qcompile.pipeline import build_passes

    class ReluToRelu6(Pass):
        def call(self, gm):
            hit = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.relu]
            for n in hit:
                n.target = F.relu6
            return PassResult(gm, bool(hit))

    x = digits.calibration_inputs(32)
    passes = build_passes(CompileOptions(), x, example=(x[:1],))
    passes.insert([p.name for p in passes].index("SelectLayers"), ReluToRelu6())
    with pytest.raises(UserError) as err:
        Pipeline(passes)(qcompile.trace(digits.pretrained(), x[:1]))
    assert "ReluToRelu6 not qcompile's" in str(err.value) and "qcompile bug" not in str(err.value)
    record = RecordFloatOutputs(x)
    late = Pipeline([record, FoldBatchNorm(), SelectLayers(DEFAULT), InsertQuantizers(),
                     Calibrate(x, record_input_means=True), BiasCorrection(x), QuantizeBias(),
                     CheckFloatOutputs(record)])
    with pytest.raises(UserError, match="CheckFloatOutputs ran after Calibrate, BiasCorrection, QuantizeBias, .*place "
                                        "it before InsertQuantizers") as err:
        late(qcompile.trace(digits.pretrained(), x[:1]))
    assert "qcompile bug" not in str(err.value)


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


# --- found by a sweep of the pass API as a user would drive it --------------------------------------------------
def _int8_pipeline(model, x, order):
    from qcompile.passes import BindIntegerLayers

    layers = {"bias": QuantizeBias, "bind": BindIntegerLayers}
    passes = [SelectLayers(LayerConfig(action="quant", wscheme="uniform", wbits=8, ascheme="uniform", abits=8)),
              InsertQuantizers(), Calibrate(x)] + [layers[name]() for name in order]
    return Pipeline(passes)(qcompile.trace(model, x[:1])).gm


def test_bind_integer_layers_before_quantize_bias_still_gives_a_file_equal_to_its_simulation():
    """BindIntegerLayers before QuantizeBias: QuantizeBias skipped the bound layers, the export's grid check did not
    see them, and onnxruntime differed from the simulation by 1e-4 (PASS). The bound layers' biases are rounded now."""
    from qcompile.passes.quantize_bias import off_grid_biases

    model = MLP()
    x = example_input(model, seed=1, batch=32)
    gm = _int8_pipeline(model, x, ["bind", "bias"])
    assert off_grid_biases(gm) == []
    table = quantizers_by_id(gm)
    onnx_model = emit(export_onnx(gm, x[:1]), table, CompileOptions(scheme="uniform", bits=8))
    report = validate_quantized(onnx_model.SerializeToString(), gm, x)
    assert report.passed and report.max_abs == 0.0, report.summary()


def test_off_grid_check_sees_bound_layers():
    """A bias moved after binding (as PairSafeInt8Weights after QuantizeBias does to the scales) is caught."""
    from qcompile.passes.quantize_bias import off_grid_biases

    model = MLP()
    x = example_input(model, seed=1, batch=32)
    gm = _int8_pipeline(model, x, ["bias", "bind"])
    bound = [n for n in gm.graph.nodes if n.op == "call_function" and "int8_" in getattr(n.target, "__name__", "")]
    assert bound
    with torch.no_grad():
        bias = next(n for n in bound if len(n.args) > 2 and n.args[2] is not None).args[2]
        owner, _, attr = str(bias.target).rpartition(".")
        getattr(gm.get_submodule(owner) if owner else gm, attr).add_(1e-3)
    assert off_grid_biases(gm)


def test_a_pass_run_alone_leaves_code_that_torch_can_read():
    """FoldBatchNorm()(gm) left gm.code calling the folded BatchNorm until the module first ran: torch.jit.script and
    torch.fx.symbolic_trace failed on it."""
    model = randomize_batchnorm(ResidualCNN(), seed=1)
    x = example_input(model, batch=4)
    gm = FoldBatchNorm()(qcompile.trace(model, x[:1])).gm
    assert "bn" not in gm.code
    retraced = torch.fx.symbolic_trace(gm)
    with torch.no_grad():
        torch.testing.assert_close(retraced(x), model(x), rtol=1e-4, atol=1e-4)


def test_requires_is_checked_across_pipelines_and_for_a_pass_run_alone():
    from qcompile.passes import Pass, PassResult

    class Reads(Pass):
        requires = (SelectLayers,)

        def call(self, gm):
            return PassResult(gm, False)

    model = MLP()
    x = example_input(model)
    with pytest.raises(PassError, match="requires SelectLayers to run first"):
        Reads()(qcompile.trace(model, x))  # alone: it was not checked at all
    gm = Pipeline([SelectLayers(DEFAULT)])(qcompile.trace(model, x)).gm
    Pipeline([Reads()])(gm)  # a second pipeline: SelectLayers ran in the first (it was refused)
    Reads()(gm)


def test_a_pass_class_put_into_a_pipeline_after_it_is_built_is_named():
    pipeline = Pipeline([SelectLayers(DEFAULT)])
    pipeline.passes.insert(0, FoldBatchNorm)
    with pytest.raises(TypeError, match="FoldBatchNorm is a pass class; give an instance"):
        pipeline(qcompile.trace(MLP(), example_input(MLP())))


def test_a_graph_without_shapes_is_refused_by_select_layers():
    """torch.fx.symbolic_trace records no shapes: the passes built another model (the logits quantized to 8 bits,
    3.9 dB lower SQNR on digits) without a word."""
    from torch.fx.passes.shape_prop import ShapeProp

    model = MLP()
    x = example_input(model)
    with pytest.raises(qcompile.UserError, match="no tensor shapes.*qcompile.trace"):
        SelectLayers(DEFAULT)(torch.fx.symbolic_trace(model))
    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(x)  # what the message offers
    assert SelectLayers(DEFAULT)(gm).modified


def test_passes_out_of_place_say_so():
    """EqualizeInputs after InsertQuantizers, AllocateWeightBits before SelectLayers, QuantizeResiduals without
    QuantizeOutputs and CheckFloatOutputs with nothing recorded returned without a word."""
    from qcompile.passes import AllocateWeightBits, CheckFloatOutputs, EqualizeInputs, QuantizeResiduals
    from qcompile.passes.float_check import RecordFloatOutputs

    model = MLP()
    x = example_input(model, seed=1, batch=32)
    gm = qcompile.trace(model, x[:1])
    allocate = AllocateWeightBits(3.0, x)
    assert not allocate(gm).modified and "run SelectLayers first" in allocate.report[0]
    gm = Pipeline([SelectLayers(DEFAULT), InsertQuantizers()])(gm).gm
    for p, says in ((EqualizeInputs(x), "run EqualizeInputs before InsertQuantizers"),
                    (QuantizeResiduals(), "run QuantizeOutputs first"),
                    (CheckFloatOutputs(RecordFloatOutputs(None)), "not checked")):
        assert not p(gm).modified
        assert any(says in line for line in p.report), (p.name, p.report)


def test_check_float_outputs_checks_a_data_free_pipeline_on_inputs_of_the_traced_shape():
    """build_passes(opts) without data (README's data-free form) recorded nothing, and a pass that changed a
    weight went through the check unseen."""
    from qcompile.passes import CheckFloatOutputs, Pass, PassResult
    from qcompile.passes.float_check import RecordFloatOutputs

    class Doubles(Pass):
        def call(self, gm):
            with torch.no_grad():
                next(gm.parameters()).mul_(2)
            return PassResult(gm, False)

    model = MLP()
    record = RecordFloatOutputs(None)
    with pytest.raises(qcompile.UserError, match="Doubles not qcompile.s: check what those change"):
        Pipeline([record, Doubles(), CheckFloatOutputs(record)])(qcompile.trace(model, example_input(model)))


def test_adaptive_rounding_run_twice_says_it_changed_nothing():
    from qcompile.passes import AdaptiveRounding

    model = MLP()
    x = example_input(model, seed=1, batch=64)
    gm = Pipeline([SelectLayers(DEFAULT), InsertQuantizers(), Calibrate(x)])(qcompile.trace(model, x[:1])).gm
    assert AdaptiveRounding(x)(gm).modified
    again = AdaptiveRounding(x)
    assert not again(gm).modified, again.report


def test_per_layer_rules_as_a_mapping_work_at_the_pass_level():
    """compile(config={"fc1": {...}}) took the mapping; load_overrides(mapping) returned [] silently and
    SelectLayers(overrides=mapping) failed with "'str' object has no attribute 'matches'"."""
    from qcompile.passes import load_overrides

    model = MLP()
    first = next(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    rules = {first: {"bits": 8}}
    assert [o.pattern for o in load_overrides(rules)] == [first]
    for overrides in (rules, load_overrides(rules)):
        gm = SelectLayers(DEFAULT, first_last="quant", overrides=overrides)(qcompile.trace(model, example_input(model))).gm
        row = next(r for r in layer_table(gm) if r[0] == first)
        assert "W8" in row[2], row
    with pytest.raises(TypeError, match="overrides must be Override rules"):
        SelectLayers(DEFAULT, overrides=["fc1"])
    with pytest.raises(TypeError, match="overrides must be Override rules.*got int 42"):  # "'int' object is not iterable"
        SelectLayers(DEFAULT, overrides=42)
    one = load_overrides(rules)[0]
    assert SelectLayers(DEFAULT, overrides=one).overrides == (one,)
    from qcompile.ir import LayerConfig

    with pytest.raises(ValueError, match="LayerConfig.wbits must be from 2 to 8"):  # showed as "W9 apot" in the table
        LayerConfig(wbits=9)


def test_ternary_and_binary_quantizers_record_their_own_width():
    """A ternary weight quantizer said bits=4 (the --bits given) in its QParams and LayerConfig; it stores 2."""
    model = MLP()
    x = example_input(model, seed=1, batch=32)
    result = qcompile.compile(model, x[:1], calib=x, wscheme="ternary", ascheme="uniform", bits=4, validate=False)
    widths = {n.meta["qparams"].bits for n in result.model.graph.nodes
              if n.meta.get("qparams") is not None and n.meta["qparams"].scheme == "ternary"}
    assert widths == {2}  # (the LayerConfig keeps the bits asked: a config rule may change the scheme)


def test_a_quantizer_placed_after_calibrate_names_the_pass_that_placed_it():
    """QuantizeOutputs moved after Calibrate failed in ShareInt8Params with "run Calibrate after InsertQuantizers",
    which had run in order; and build_passes(calib) (options left out) was an AttributeError on a tensor."""
    from qcompile import CompileOptions
    from qcompile.errors import UserError
    from qcompile.models import digits
    from qcompile.passes import Pipeline
    from qcompile.passes.base import PassError
    from qcompile.pipeline import build_passes

    x = digits.calibration_inputs(16)
    with pytest.raises(UserError, match=r"build_passes takes the options first, got Tensor"):
        build_passes(x)
    passes = build_passes(CompileOptions(), x)
    moved = next(p for p in passes if p.name == "QuantizeOutputs")
    passes.remove(moved)
    passes.insert(passes.index(next(p for p in passes if p.name == "Calibrate")) + 1, moved)
    with pytest.raises(PassError, match=r"is not calibrated: QuantizeOutputs ran after Calibrate and placed it; run "
                                        "QuantizeOutputs before Calibrate"):
        Pipeline(passes)(qcompile.trace(digits.pretrained(), x[:1]))
