"""``validate_quantized``: the report's fields on a genuine file, and doctored files (one weight code changed, the
decision thresholds of one APoT activation quantizer moved) that the validation must reject."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

import qcompile
from qcompile.qmodules import FakeQuantize
from qcompile.runtime.validation import validate_quantized
from tests.models import ResidualCNN, example_input

MAX_CODE_MISMATCH = 1e-3  # the default bound: 0.1% of activation codes


@pytest.fixture(scope="module")
def compiled():
    model = ResidualCNN(seed=0)
    calib = example_input(model, seed=1, batch=64)
    x = example_input(model, seed=2, batch=48)
    result = qcompile.compile(model, calib=calib, validate=False, scheme="apot", bits=4, calib_method="minmax")
    return result, model, x


def activation_map(model: onnx.ModelProto) -> list[dict]:
    from qcompile.emit import activation_map as read

    return read(model)


def test_report_fields_of_a_genuine_file(compiled):
    result, float_model, x = compiled
    onnx_model = result.onnx_model
    report = validate_quantized(onnx_model.SerializeToString(), result.model, x, float_model=float_model)
    assert report.passed and report.failures == []
    assert report.samples == 48
    assert report.max_abs == 0.0 and math.isinf(report.sqnr_db)  # bit-exact file
    assert report.top1 == 1.0
    assert report.thresholds == {"min_sqnr": None, "max_abs": None, "min_top1": None, "min_forced_sqnr": 80.0}
    assert math.isinf(report.extra["forced_sqnr_db"])
    assert "PASS" in report.summary() and report.to_dict()["passed"] is True

    # one entry per activation quantizer of the file, with as many codes as the tensor has elements
    sizes: dict[str, int] = {}
    modules = dict(result.model.named_modules())
    hooks = [modules[a["module"]].register_forward_hook(
        lambda m, i, o, name=a["module"]: sizes.__setitem__(name, sizes.get(name, 0) + o.numel()))
        for a in activation_map(onnx_model)]
    try:
        with torch.no_grad():
            result.model(x)
    finally:
        for h in hooks:
            h.remove()
    by_name = {layer["quantizer"]: layer for layer in report.layers}
    assert set(by_name) == set(sizes)
    assert all(isinstance(modules[name], FakeQuantize) and modules[name].role == "activation" for name in by_name)
    for name, layer in by_name.items():
        assert set(layer) == {"quantizer", "where", "codes", "codes_differ", "codes_differ_local",
                              "codes_differ_far", "sqnr_vs_float_db", "own_sqnr_db"}
        assert layer["codes_differ_far"] <= layer["codes_differ_local"]
        # the layers reading the codes (or the layer writing them): internal ids alone named no layer
        layer_names = {n for n, m in modules.items() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
        kind, _, names = layer["where"].partition(" after ")[0].partition(" of ")
        if names.startswith("add("):  # a residual sum: the layers whose outputs it adds
            names = names[len("add("):].rstrip(")")
        assert kind in ("input", "output") and set(names.split(", ")) <= layer_names, layer["where"]
        assert layer["codes"] == sizes[name] and layer["codes_differ"] == layer["codes_differ_local"] == 0, name
        assert 0.0 < layer["sqnr_vs_float_db"] < math.inf, name  # quantized activations vs the same graph in float
        # vs the quantizer's own input, its error alone (inf: a residual sum of codes already on its grid)
        assert 0.0 < layer["own_sqnr_db"] <= math.inf, name
    # the model's input quantizer reads the float input itself: both SQNRs are the same number; further on, the
    # error against float also holds what the quantizers before added
    first = next(layer for layer in report.layers if " after " not in layer["where"])
    assert first["own_sqnr_db"] == pytest.approx(first["sqnr_vs_float_db"], abs=1e-6)
    assert any(layer["sqnr_vs_float_db"] < layer["own_sqnr_db"] - 1.0 for layer in report.layers)
    assert report.extra["codes_total"] == sum(sizes.values())
    assert report.extra["codes_differ"] == 0 and report.extra["code_mismatch"] == 0.0
    assert report.extra["codes_differ_local"] == 0 and report.extra["code_mismatch_local"] == 0.0
    # (where this machine's onnxruntime adds uint8 x int8 pairs exactly, the summary also counts the int8 weight
    # pairs that would saturate on x86 without VNNI)
    assert f"codes differ 0 of {sum(sizes.values())}" in report.summary() and report.summary().endswith("PASS")
    assert 0.0 < report.extra["sqnr_vs_float_db"] < math.inf
    assert 0.0 <= report.extra["top1_vs_float"] <= 1.0


def test_strict_thresholds_pass_on_the_genuine_file(compiled):
    result, _, x = compiled
    report = validate_quantized(result.onnx_model.SerializeToString(), result.model, x, max_abs=0.0,
                                min_sqnr=100.0, min_top1=1.0, max_code_mismatch=0.0)
    assert report.passed, report.summary()


def doctored(model: onnx.ModelProto, name: str, change) -> bytes:
    model = onnx.ModelProto.FromString(model.SerializeToString())  # a copy
    init = next(t for t in model.graph.initializer if t.name == name)
    array = change(numpy_helper.to_array(init).copy())
    init.CopyFrom(numpy_helper.from_array(array, name))
    return model.SerializeToString()


def test_a_changed_weight_code_fails_validation(compiled):
    result, _, x = compiled
    # conv1 is 8-bit uniform (first layer): its weight codes are a plain INT8 initializer (UINT8 = code + 128 where
    # this machine's U8S8 kernels saturate, see --int8-weights)
    ints = [t for t in result.onnx_model.graph.initializer
            if t.data_type in (TensorProto.INT8, TensorProto.UINT8) and len(t.dims) == 4]
    assert ints, "no 8-bit conv weight codes in the file"
    target = ints[0]
    offset = 128 if target.data_type == TensorProto.UINT8 else 0

    def change(codes):
        flat = codes.reshape(-1)
        flat[0] = (-127 if int(flat[0]) - offset > 0 else 127) + offset  # one code, to the other end of the range
        return codes

    data = doctored(result.onnx_model, target.name, change)
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)  # still a valid file
    report = validate_quantized(data, result.model, x)
    assert not report.passed
    assert report.extra["codes_differ"] > 0
    assert any("activation codes differ" in f for f in report.failures), report.failures
    assert report.max_abs > 0.0
    # an explicit output threshold catches it as well
    strict = validate_quantized(data, result.model, x, max_abs=0.0, max_code_mismatch=None)
    assert not strict.passed and any("max abs err" in f for f in strict.failures)


@pytest.mark.parametrize("edit", ["weight code", "activation scale"])
def test_edits_below_the_share_bounds_fail_on_codes_beyond_float_rounding(edit):
    """One 8-bit conv weight code off by one, or one activation quantizer's scale x1.001, in the digits model's
    APoT W4A4 file: 140-750 codes of one quantizer differed on identical inputs, under 0.1% of the model's and 1% of
    the quantizer's, and the validation passed at 34.5-41 dB from the simulation. A genuine file has no code that
    differs beyond float rounding of the threshold: every such edit of the file fails, and some of them passed the
    share bounds alone."""
    from qcompile.models import digits

    x = digits.calibration_inputs(64)
    result = qcompile.compile(digits.pretrained(), calib=x[:32], validate=False, scheme="apot", bits=4)
    assert validate_quantized(result.onnx_model.SerializeToString(), result.model, x).passed
    inits = {t.name: t for t in result.onnx_model.graph.initializer}
    edits = []
    if edit == "weight code":
        for target in [t for t in inits.values() if t.data_type in (TensorProto.INT8, TensorProto.UINT8)
                       and len(t.dims) == 4]:
            for where in (3, 2, 1):  # one code, a third / half way through the tensor / the last, one step
                def change(codes, where=where):
                    flat = codes.reshape(-1)
                    i = flat.size // where - (where == 1)
                    flat[i] += -1 if flat[i] > (128 if flat.dtype == np.uint8 else 0) else 1
                    return codes
                edits.append(doctored(result.onnx_model, target.name, change))
    else:
        for k, node in enumerate(result.onnx_model.graph.node):
            if node.op_type != "QuantizeLinear" or node.input[1] not in inits \
                    or inits[node.input[1]].data_type != TensorProto.FLOAT:
                continue
            model = onnx.ModelProto.FromString(result.onnx_model.SerializeToString())
            scale = numpy_helper.to_array(inits[node.input[1]]) * np.float32(1.001)
            model.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), "edited_scale"))
            model.graph.node[k].input[1] = "edited_scale"
            edits.append(model.SerializeToString())
    caught_only_here = 0
    for data in edits:
        report = validate_quantized(data, result.model, x)
        if report.extra["codes_differ_far"] > 10:
            assert not report.passed
            assert any("by more than float rounding moves a value" in f for f in report.failures), report.failures
            caught_only_here += validate_quantized(data, result.model, x, max_far_code_mismatch=None,
                                                   check_weights=False).passed
        if edit == "weight code":  # the weights themselves are compared too, whatever the codes show
            weights_only = validate_quantized(data, result.model, x, max_far_code_mismatch=None,
                                              max_layer_code_mismatch=None, max_code_mismatch=None)
            assert any("the quantized weights of" in f for f in weights_only.failures), weights_only.failures
    assert caught_only_here >= 1


def test_a_changed_layer_after_the_last_quantizer_fails_validation(compiled):
    """The classifier's bias (int32 behind a DequantizeLinear) changed in the file: no activation code differs, as
    no quantizer follows the classifier, and validation said PASS with logits off by ~0.5 (SQNR 0.5 dB). The
    outputs recomputed from onnxruntime's own codes catch it."""
    result, _, x = compiled
    graph = result.onnx_model.graph
    producer = {o: n for n in graph.node for o in n.output}
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    target = producer[gemm.input[2]].input[0]
    assert next(t for t in graph.initializer if t.name == target).data_type == TensorProto.INT32

    def change(codes):
        codes[3] += 200000
        return codes

    report = validate_quantized(doctored(result.onnx_model, target, change), result.model, x)
    assert report.extra["codes_differ"] == 0
    assert not report.passed and report.extra["forced_sqnr_db"] < 40.0
    assert any("computed from onnxruntime's own activation codes" in f for f in report.failures), report.failures
    loose = validate_quantized(doctored(result.onnx_model, target, change), result.model, x, min_forced_sqnr=None)
    assert loose.passed  # the bound is what fails it


def test_moved_thresholds_of_an_apot_activation_fail_validation(compiled):
    result, _, x = compiled
    graph = result.onnx_model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    # the level tables of APoT activations: table[Cast(QuantizeLinear(...))] by GatherElements on the flattened
    # index (emit_cell_lookup: three entries per cell; emit_cell_requant: one per cell of the accumulator, the
    # index channels-last behind a Transpose)
    def index_source(n):
        flat = producer[n.input[1]]  # Reshape(index, [-1])
        return producer.get(flat.input[0]) if flat.op_type == "Reshape" else None

    def quantized(cast):
        src = producer.get(cast.input[0])
        if getattr(src, "op_type", "") == "Transpose":
            src = producer.get(src.input[0])
        return getattr(src, "op_type", "") == "QuantizeLinear"

    names = sorted({n.input[0] for n in graph.node if n.op_type == "GatherElements" and n.input[0] in inits
                    and getattr(index_source(n), "op_type", "") == "Cast" and quantized(index_source(n))})
    assert names, "no APoT cell table in the file"
    # every cell takes its left neighbour's decisions: the thresholds move up by half a unit
    data = doctored(result.onnx_model, names[0], lambda table: np.concatenate([table[:3], table[:-3]]))
    report = validate_quantized(data, result.model, x)
    assert not report.passed
    assert report.extra["code_mismatch"] > MAX_CODE_MISMATCH
    assert any("activation codes differ" in f for f in report.failures), report.failures
    assert any(layer["codes_differ"] > 0 for layer in report.layers)


def test_drift_from_float_rounding_is_told_apart_from_a_wrong_quantizer(compiled):
    """A float Conv whose output moves a little (as another accumulation order would move it, only more): codes
    near its quantizer's thresholds flip, and every flip changes the layers after it. Side by side, many codes
    differ downstream; teacher-forced (each quantizer reading onnxruntime's upstream codes) only the quantizer
    right after the moved Conv sees differing codes, and the file passes."""
    _, model, x = compiled
    # float layers between APoT quantizers (by default those layers decide on cells of an int8 accumulator)
    result = qcompile.compile(model, calib=example_input(model, seed=1, batch=64), validate=False, scheme="apot",
                              bits=4, calib_method="minmax", int8_levels=False)
    producer = {o: n for n in result.onnx_model.graph.node for o in n.output}
    inits = {t.name: t for t in result.onnx_model.graph.initializer}
    read_by_q = {i for n in result.onnx_model.graph.node if n.op_type == "QuantizeLinear" for i in n.input}
    float_convs = [n for n in result.onnx_model.graph.node if n.op_type == "Conv" and len(n.input) > 2
                   and n.input[2] in inits and producer[n.input[0]].op_type == "DequantizeLinear"
                   and producer[producer[n.input[0]].input[0]].op_type == "Reshape"  # APoT codes: a lookup
                   and n.output[0] not in read_by_q]
    assert float_convs, "no float Conv on APoT activations in the file"
    bias = float_convs[0].input[2]
    data = doctored(result.onnx_model, bias, lambda b: (b + np.float32(1e-4) * np.abs(b).max()).astype(np.float32))
    report = validate_quantized(data, result.model, x)
    by_name = {layer["quantizer"]: layer for layer in report.layers}
    moved = [name for name, layer in by_name.items() if layer["codes_differ_local"] > 0]
    downstream = [name for name, layer in by_name.items() if layer["codes_differ"] > 0 and name not in moved]
    assert len(moved) == 1, by_name  # only the quantizer right after the moved Conv
    assert downstream, by_name       # its flips propagate when the two run side by side
    assert report.extra["codes_differ"] > report.extra["codes_differ_local"] > 0
    assert report.extra["code_mismatch_local"] <= MAX_CODE_MISMATCH and report.passed, report.summary()
    assert "on identical inputs" in report.summary()


def test_float_reference_runs_int8_layers_in_float32_and_shares_the_quantizers():
    from qcompile.qmodules import disabled_quantizers, int8_conv2d
    from qcompile.runtime.validation import _float_layers

    model = ResidualCNN(seed=0)
    calib = example_input(model, seed=1, batch=16)
    sim = qcompile.compile(model, calib=calib, validate=False, scheme="uniform", bits=8).model
    assert any(n.target is int8_conv2d for n in sim.graph.nodes)  # the case this helper exists for
    fl = _float_layers(sim)
    assert not any(n.target is int8_conv2d for n in fl.graph.nodes)
    quantizers = {name: m for name, m in sim.named_modules() if isinstance(m, FakeQuantize)}
    assert quantizers and all(fl.get_submodule(name) is m for name, m in quantizers.items())
    x = example_input(model, seed=2, batch=8)
    with torch.no_grad(), disabled_quantizers(sim):
        expected, got = sim(x), fl(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)  # float32 vs float64 layers: round-off


class _InplaceActs(torch.nn.Module):
    """MobileNetV3/EfficientNet's pattern: Conv → BN → Hardswish(inplace=True) (and SiLU(inplace=True)), whose input
    is a quantized layer output that the activation then overwrites."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        nn = torch.nn
        self.c1, self.b1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish(inplace=True)
        self.c2, self.b2, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(inplace=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.a1(self.b1(self.c1(x)))
        x = self.a2(self.b2(self.c2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_in_place_activations_after_a_quantizer_do_not_change_the_codes_compared():
    """The validator compares each quantizer's output as it left the quantizer, not after a downstream in-place op
    rewrote the tensor (which made a bit-exact MobileNetV3 file report most of its codes as differing)."""
    model = _InplaceActs().eval()
    calib = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, calib=calib, validate=False, scheme="uniform", bits=8)
    inplace = {name for name, m in model.named_modules() if getattr(m, "inplace", False)}
    assert inplace and not any(getattr(m, "inplace", False) for m in result.model.modules())  # trace made them
    for name, m in result.model.named_modules():  # out of place; a graph given as it is may still have them
        if name in inplace:
            m.inplace = True
    report = validate_quantized(result.onnx_model.SerializeToString(), result.model, calib, float_model=model)
    assert report.max_abs == 0.0, report.summary()  # the file is bit-exact ...
    modules = dict(result.model.named_modules())
    rewritten = [layer for layer in report.layers
                 if any(isinstance(u, torch.fx.Node) and u.op == "call_module"
                        and getattr(modules.get(u.target), "inplace", False)
                        for n in result.model.graph.nodes if n.target == layer["quantizer"] for u in n.users)]
    assert rewritten, [layer["quantizer"] for layer in report.layers]  # the case under test is in the graph
    assert report.extra["codes_differ"] == 0, report.layers  # ... so no code may differ
    # per-layer SQNR against float: of the quantizer's own output, i.e. 8-bit noise (~40-50 dB), not the
    # difference between a tensor before and after Hardswish
    assert all(layer["sqnr_vs_float_db"] > 30 for layer in report.layers), report.layers


def test_model_with_dict_outputs_compiles_and_validates():
    """A model returning a dict (segmentation/detection heads do): the file's outputs are the dict's values in
    order, and the validation compares each with the simulation's."""
    import torch.nn as nn

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.seg = nn.Conv2d(8, 4, 1)
            self.cls = nn.Linear(8, 3)

        def forward(self, x):
            f = self.stem(x)
            return {"seg": self.seg(f), "cls": self.cls(f.mean((2, 3)))}

    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, calib=x, scheme="apot", bits=4)
    assert [o.name for o in result.onnx_model.graph.output] and len(result.onnx_model.graph.output) == 2
    assert result.report.passed, result.report.failures
    from qcompile.runtime.validation import run_onnx

    seg, cls = run_onnx(result.onnx_model.SerializeToString(), x)
    assert seg.shape == (16, 4, 12, 12) and cls.shape == (16, 3)


def test_outputs_through_a_step_after_the_last_quantizer_are_not_held_to_the_forced_bound():
    """``(logits > 0).float()``: a logit that is exactly 0 on the integer accumulator comes out as 1e-9 in the
    simulation and 0 in onnxruntime, so the 0/1 output flips (3 of 2000 at uniform 2-bit) and its SQNR is 23 dB,
    though the file computes what the simulation does: the forced-output bound failed it. Outputs that pass a
    step (a comparison, rounding, an index) after the last quantizer are left out of that bound, as integer
    outputs are; the logits themselves stay in."""
    import torch.nn as nn
    import torch.nn.functional as F

    from qcompile.runtime.validation import step_outputs

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1, stride=2)
            self.fc1, self.fc = nn.Linear(32 * 8 * 8, 64), nn.Linear(64, 10)

        def forward(self, x):
            y = self.fc(F.relu(self.fc1(F.relu(self.c2(F.relu(self.c1(x)))).flatten(1))))
            return y, (y > 0).float(), torch.round(y * 4)

    g = torch.Generator().manual_seed(1)
    calib, valid = torch.rand(64, 3, 16, 16, generator=g) * 2 - 0.5, torch.rand(200, 3, 16, 16, generator=g) * 2 - 0.5
    result = qcompile.compile(M().eval(), calib[:1], calib=calib, validation_inputs=valid, scheme="uniform", bits=2,
                              keep_first_last="quant")
    assert step_outputs(result.model) == {1, 2}
    report = result.report
    assert report.passed and report.extra["forced_sqnr_db"] > 100, report.summary()


def test_one_wrong_quantizer_fails_however_many_codes_the_others_hold():
    """A float LayerNorm before the head's input quantizer, its bias changed in the file: every code of that small
    quantizer differs on identical inputs, yet they were under 0.1% of the model's codes (the conv activations hold
    the rest) and the validation said PASS (a sequence helper's transformer: 2045 of 3.1 M codes, logits 0.7 dB from
    the simulation). The bound holds per quantizer too."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.ln = torch.nn.LayerNorm(16)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.c2(torch.relu(self.c1(x))))
            return self.fc(self.ln(h.mean((2, 3))))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    result = qcompile.compile(model, x[:1], calib=x, validate=False, scheme="uniform", bits=8, progress=False)
    genuine = validate_quantized(result.onnx_model.SerializeToString(), result.model, x)
    assert genuine.passed, genuine.summary()
    ln_bias = next(n.input[2] for n in result.onnx_model.graph.node if n.op_type == "LayerNormalization")
    data = doctored(result.onnx_model, ln_bias, lambda b: (b + np.linspace(-1, 1, b.size)).astype(np.float32))
    report = validate_quantized(data, result.model, x)
    head = max(report.layers, key=lambda layer: layer["codes_differ_local"] / max(layer["codes"], 1))
    assert head["codes_differ_local"] > 0.5 * head["codes"]
    assert report.extra["code_mismatch_local"] <= MAX_CODE_MISMATCH  # the model-wide share alone let it pass
    assert not report.passed
    assert any(f"activation quantizer {head['quantizer']!r}" in f for f in report.failures), report.failures
    # the per-quantizer bounds are what fail it (on the share of its codes, and on those beyond float rounding)
    assert validate_quantized(data, result.model, x, max_layer_code_mismatch=None, max_far_code_mismatch=None).passed


class _ConvPoolFC(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_report_places_name_the_layer_whose_codes_a_quantizer_holds(compiled):
    """A W8A8 conv's 8-bit output before a max-pool and the re-quantized input of the next layer were both named
    "input of fc" (the walk to the readers went through the second quantizer); a residual sum was named after the
    first layer it adds ("output of layer1.conv2 after relu")."""
    torch.manual_seed(0)
    model = _ConvPoolFC().eval()
    calib = torch.randn(16, 1, 8, 8)
    result = qcompile.compile(model, calib=calib, scheme="uniform", bits=8, keep_first_last="int8")
    places = [layer["where"] for layer in result.report.layers]
    assert len(places) == len(set(places)), places
    assert {"output of c2 after relu", "input of fc after flatten"} <= set(places), places
    result, _, x = compiled
    report = validate_quantized(result.onnx_model.SerializeToString(), result.model, x)
    assert "output of add(layer1.conv2, layer1.downsample.0) after relu" in [layer["where"] for layer in report.layers]


def test_validation_batches_hold_a_quarter_million_input_values(compiled):
    """32 ResNet-50 images at 224x224 went through validation in one batch (the default was 64 samples): 11.0 GB
    and 85 s; in batches of about a million input values (6 such images) 4.5 GB and 33 s, of a quarter million (one
    image) 0.95 GB above the model for the whole compile, in the same time. The batches change nothing in the
    report; small inputs keep batches of 64."""
    from qcompile.runtime.validation import validation_batch_size

    assert validation_batch_size(torch.zeros(32, 3, 224, 224)) == 1
    assert validation_batch_size(torch.zeros(32, 3, 128, 128)) == 5
    assert validation_batch_size(torch.zeros(500, 1, 8, 8)) == 64
    assert validation_batch_size((torch.zeros(4, 3, 512, 512), torch.zeros(4, 10))) == 1
    result, _, x = compiled
    blob = result.onnx_model.SerializeToString()
    default = validate_quantized(blob, result.model, x)
    small = validate_quantized(blob, result.model, x, batch_size=5)
    assert default.passed and small.passed
    assert small.extra["codes_total"] == default.extra["codes_total"]
    assert [layer["codes_differ"] for layer in small.layers] == [layer["codes_differ"] for layer in default.layers]
    assert small.max_abs == default.max_abs


def test_quantizer_sqnr_is_measured_against_the_float_model_not_the_bias_corrected_graph():
    # Bias correction (and the bias grid, pair-safe weights) move parameters for the quantized model's sake; the
    # per-quantizer SQNR compares each quantized activation with the float model's activation at that point, so the
    # graph it runs with quantizers off must hold the float values again (it held the corrected biases: the input
    # of fc2 read 38.4 dB where the float model gives 43.2). Equalization off: the activations are the model's own.
    import torch.nn.functional as F

    from qcompile.models import digits
    from qcompile.passes.base import FLOAT_PARAMS

    model, x = digits.pretrained(), digits.calibration_inputs(32)
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, equalize=False, validate=False)
    modules = dict(result.model.named_modules())
    with torch.no_grad():
        a1 = F.relu(model.bn1(model.conv1(x)))
        pooled = model.pool(F.relu(model.bn2(model.conv2(a1))))
        res = F.relu(model.bn3(model.conv3(pooled)) + model.bn_down(model.down(pooled)))
        h = F.relu(model.fc1(torch.flatten(res, 1)))
        before = result.model(x)
    report = validate_quantized(result.onnx_model.SerializeToString(), result.model, x, float_model=model)
    where = {layer["where"]: layer for layer in report.layers}
    expected = {"input of conv2 after relu": a1, "input of conv3, down after maxpool2d": pooled,
                "output of add(conv3, down) after relu": res, "input of fc2 after relu": h}
    captured = {}
    hooks = [modules[where[w]["quantizer"]].register_forward_hook(
        lambda m, i, o, w=w: captured.__setitem__(w, o.detach().clone())) for w in expected]
    try:
        with torch.no_grad():
            after = result.model(x)
    finally:
        for hk in hooks:
            hk.remove()
    assert torch.equal(before, after)  # the quantized values came back after the float run
    moved = result.model.meta[FLOAT_PARAMS]  # what the float run puts back: corrected biases, pair-safe weights
    assert {"conv2.bias", "fc2.bias"} <= set(moved) and not torch.equal(moved["fc2.bias"], result.model.fc2.bias)
    for w, ref in expected.items():
        ref64, q64 = ref.double(), captured[w].double()
        want = 10 * math.log10(float((ref64 ** 2).sum()) / float(((q64 - ref64) ** 2).sum()))
        assert abs(where[w]["sqnr_vs_float_db"] - want) < 0.01, (w, where[w]["sqnr_vs_float_db"], want)


def test_the_saturation_hint_says_to_compile_the_float_model(monkeypatch):
    """Recompiling a compiled model (its int8 weights bound) with --int8-weights s8-safe changes no weight, and the
    FAIL said 'compile it with --int8-weights s8-safe' again: the hint now names the float model."""
    import sys

    import qcompile.runtime.session  # noqa: F401  (the package exports a function of the same name)
    from qcompile.models import digits
    from qcompile.runtime.validation import _saturation_hint, saturating_pairs

    x = digits.load_split()[0][:32]
    result = qcompile.compile(digits.pretrained(), x[:1], calib=x, scheme="uniform", bits=8, int8_weights="s8",
                              validate=False)
    model_bytes = result.onnx_model.SerializeToString()
    assert saturating_pairs(model_bytes) > 0
    monkeypatch.setattr(sys.modules["qcompile.runtime.session"], "u8s8_saturates", lambda: True)  # x86, no VNNI
    hint = _saturation_hint(model_bytes)
    assert "compile the float model with --int8-weights s8-safe" in hint and "compiled already keeps" in hint


def test_a_wrong_file_fails_validation_through_an_argmax_output():
    """A model whose only output is ``argmax`` (after a step, so left out of the forced SQNR bound): the classifier's
    bias changed in the file moved the predicted class of most samples and validation said PASS, as nothing
    compared the output. The values of such outputs, computed from onnxruntime's own codes, may differ only where
    float rounding crosses the step."""
    import torch.nn as nn

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc = nn.Linear(16, 32), nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.fc1(x))).argmax(1)

    g = torch.Generator().manual_seed(3)
    calib, valid = torch.randn(64, 16, generator=g), torch.randn(300, 16, generator=g)
    result = qcompile.compile(M().eval(), calib[:1], calib=calib, validate=False, scheme="uniform", bits=8)
    genuine = validate_quantized(result.onnx_model.SerializeToString(), result.model, valid)
    assert genuine.passed, genuine.failures
    assert genuine.extra["step_output_mismatch"] == {0: 0.0}

    graph = result.onnx_model.graph
    producer = {o: n for n in graph.node for o in n.output}
    gemm = [n for n in graph.node if n.op_type == "Gemm"][-1]
    target = producer[gemm.input[2]].input[0]
    assert next(t for t in graph.initializer if t.name == target).data_type == TensorProto.INT32

    def change(codes):
        codes[:5] += np.abs(codes).max() * 40
        return codes

    report = validate_quantized(doctored(result.onnx_model, target, change), result.model, valid)
    assert report.extra["codes_differ"] == 0
    assert not report.passed and report.extra["step_output_mismatch"][0] > 0.2
    assert any("after a step operation" in f for f in report.failures), report.failures


@pytest.fixture(scope="module")
def digits_apot4():
    from qcompile.models import digits

    x_train, *_ = digits.load_split()
    calib = x_train[:32].clone()
    return qcompile.compile(digits.pretrained(), calib[:1], calib=calib, scheme="apot", bits=4, validate=False), calib


def test_one_changed_4_bit_weight_fails_through_its_output_channel(digits_apot4):
    """One APoT-4 weight of conv2 moved from level -4 to +1 (its level index in the packed table): 24% of that
    output channel's codes differ, but under 1% of the quantizer's and 0.1% of the model's, and the file passed.
    The codes of one channel are compared on their own."""
    result, calib = digits_apot4
    model = result.onnx_model
    producer = {o: n for n in model.graph.node for o in n.output}
    conv2 = next(n for n in model.graph.node if n.op_type == "Conv" and "conv2" in n.name)
    gather = producer[producer[conv2.input[1]].input[0]]  # DequantizeLinear <- Gather(levels, Cast(index))
    assert gather.op_type == "Gather"
    index_name = producer[gather.input[1]].input[0]
    levels = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == gather.input[0]))

    def change(codes):
        wide = codes.astype(np.int64)
        old = int(wide[0, 0, 1, 1])
        new = int(np.argmin(np.abs(levels - (levels[old] + 5))))  # five grid steps up
        assert new != old
        wide[0, 0, 1, 1] = new
        return wide.astype(codes.dtype)

    data = doctored(model, index_name, change)
    report = validate_quantized(data, result.model, calib)
    assert not report.passed, report.summary()
    assert any("of channel 0 (dimension 1)" in f for f in report.failures), report.failures
    assert report.extra["code_mismatch_local"] < MAX_CODE_MISMATCH  # the model-wide share alone passed it
    # the genuine file: no channel anywhere near the bound
    assert validate_quantized(model.SerializeToString(), result.model, calib).passed


def test_a_file_of_another_graph_fails_validation_without_an_error(digits_apot4):
    """The max-pool removed from the file (its reader rewired to its input): every later tensor has other shapes.
    Validation stopped with a RuntimeError from comparing them (an internal error from `qcompile validate`)."""
    result, x = digits_apot4
    model = onnx.ModelProto.FromString(result.onnx_model.SerializeToString())
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    for node in model.graph.node:
        for j, name in enumerate(node.input):
            if name == pool.output[0]:
                node.input[j] = pool.input[0]
    model.graph.node.remove(pool)
    report = validate_quantized(model.SerializeToString(), result.model, x)
    assert not report.passed
    assert any("the file computes another graph" in f for f in report.failures), report.failures


def test_small_edits_of_a_linear_layer_and_of_the_classifier_fail(digits_apot4):
    """Four of fc1's 4-bit level indices in one row mirrored: 13 of that output feature's 32 codes differ, 0.009% of
    the model's (a Linear channel holds one code per sample). The classifier's weight scale of one class x1.02:
    42.5 dB from the genuine file's outputs, above the old 40 dB bound."""
    result, calib = digits_apot4
    model = result.onnx_model
    producer = {o: n for n in model.graph.node for o in n.output}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2
    gather = producer[producer[gemms[0].input[1]].input[0]]  # fc1: DequantizeLinear <- Gather(levels, Cast(index))
    index_name = producer[gather.input[1]].input[0]
    levels = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == gather.input[0]))

    def mirror(codes):
        wide = codes.astype(np.int64)
        row = wide[5]
        cols = np.nonzero(row != len(levels) - 1 - row)[0][:4]
        row[cols] = len(levels) - 1 - row[cols]
        return wide.astype(codes.dtype)

    report = validate_quantized(doctored(model, index_name, mirror), result.model, calib)
    assert not report.passed and any("of channel 5 (dimension 1)" in f for f in report.failures), report.summary()

    scale = producer[gemms[1].input[1]].input[1]  # fc2: DequantizeLinear(codes, scale per class)

    def larger(values):
        values[3] *= 1.02
        return values

    report = validate_quantized(doctored(model, scale, larger), result.model, calib)
    assert report.extra["codes_differ"] == 0
    assert not report.passed and 40.0 < report.extra["forced_sqnr_db"] < 60.0, report.summary()


def test_integers_from_integers_are_no_step_before_an_output():
    """A float residual stream that reaches back to an embedding lookup of positions (an int64 buffer expanded, as
    BERT's token types are) made the outputs of a token classifier "step outputs": compared by agreement only, so
    the forced check of what follows the last quantizer never ran on them."""
    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 16)
            self.pos = torch.nn.Embedding(8, 16)
            self.register_buffer("positions", torch.arange(8)[None])
            self.mid = torch.nn.Linear(16, 16)
            self.norm = torch.nn.LayerNorm(16)
            self.head = torch.nn.Linear(16, 4)

        def forward(self, ids):
            h = self.emb(ids) + self.pos(self.positions.expand(ids.shape[0], -1))
            h = h * (ids != 0)[..., None]  # a padding mask: a comparison of integers, exact on both sides
            h = self.norm(h + torch.relu(self.mid(h)))  # the residual stream stays float
            return self.head(h)

    from qcompile.runtime.validation import step_outputs

    torch.manual_seed(0)
    ids = torch.randint(0, 20, (32, 8))
    result = qcompile.compile(Tokens().eval(), ids[:1], calib=ids, scheme="uniform", bits=8)
    assert step_outputs(result.model) == set()
    assert result.report.passed and result.report.extra["forced_sqnr_db"] > 80.0, result.report.summary()


def test_float_tails_that_amplify_rounding_pass_and_non_finite_outputs_are_compared():
    """A float head out = fa(h) - fb(h) with fb within 1e-4 of fa: the difference of nearly equal values puts
    float32 rounding at 56 dB, under the 60 dB bound, on a genuine file; the simulation computed in float64 from the
    same codes sets the scale there. And an output with -inf (log of a ReLU) made the forced SQNR NaN, which no
    bound failed: the excluded last layer scaled by 1.5 in the file passed."""
    class Diff(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 64)
            self.fa, self.fb = torch.nn.Linear(64, 8), torch.nn.Linear(64, 8)
            with torch.no_grad():
                self.fb.weight.copy_(self.fa.weight * (1 + 1e-4 * torch.randn_like(self.fa.weight)))
                self.fb.bias.copy_(self.fa.bias)

        def forward(self, x):
            h = torch.relu(self.l2(torch.relu(self.l1(x))))
            return self.fa(h) - self.fb(h)

    from tests.models import ulps_off

    torch.manual_seed(0)
    x = torch.randn(64, 16)
    result = qcompile.compile(Diff(), x[:1], calib=x, scheme="uniform", bits=8, exclude=["fa", "fb"])
    assert result.report.passed, result.report.summary()  # 56 dB on an EPYC (AVX2); inf on a Xeon (AVX-512)
    # the float tail rounded as another machine would (fa, fb one float32 step off): 56.6 dB, under the fixed bound,
    # passed on the float64 scale (59.4 dB); eight steps off (49 dB) is more than rounding and fails
    blob = result.onnx_model.SerializeToString()
    report = validate_quantized(ulps_off(blob, ("fa.", "fb.")), result.model, x)
    assert report.passed, report.summary()
    assert report.extra["forced_sqnr_db"] < 60.0  # under the fixed bound: the float64 scale let it pass
    assert report.extra["forced_sqnr_db"] > report.extra["forced_rounding_sqnr_db"] - 20.0
    report = validate_quantized(ulps_off(blob, ("fa.", "fb."), 8), result.model, x)
    assert not report.passed and "after the last quantizer" in report.summary(), report.summary()

    class Log(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 10)

        def forward(self, x):
            return torch.log(torch.relu(self.l2(torch.relu(self.l1(x)))))

    result = qcompile.compile(Log(), x[:1], calib=x, scheme="uniform", bits=8, exclude=["l2"])
    assert result.report.passed, result.report.summary()
    assert np.isfinite(result.report.extra["forced_sqnr_db"])
    model = onnx.ModelProto.FromString(result.onnx_model.SerializeToString())
    for init in model.graph.initializer:
        if init.name.startswith("l2.") and init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    report = validate_quantized(model.SerializeToString(), result.model, x)
    assert not report.passed and any("after the last quantizer" in f for f in report.failures), report.summary()


def test_each_output_is_held_to_its_own_bound_and_integer_outputs_exactly():
    """A model with a rounding-amplifying output beside its logits: the float64 scale of the first loosened the
    bound of every output, and the logits' scale x1.05 edited in the file passed (39.5 dB). An output of integers
    computed from integers (ids != 7) is compared exactly: the constant edited in the file passed."""
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.fc1, self.fc2, self.fc3 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 10), torch.nn.Linear(32, 4)
            self.gain = torch.nn.Parameter(torch.ones(10) * 1.5)

        def forward(self, x, ids):
            h = torch.relu(self.fc1(self.emb(ids).mean(1) + x))
            far = (self.fc3(h) + 3e4) - 3e4  # amplifies float32 rounding
            return self.fc2(h) * self.gain, far, ids != 7

    torch.manual_seed(0)
    x, ids = torch.randn(64, 16), torch.randint(0, 50, (64, 8))
    # fold_bn=False: the gain stays a constant of its own in the file (FoldConstantScale would move it into fc2)
    result = qcompile.compile(Two().eval(), (x[:1], ids[:1]), calib=(x, ids), scheme="apot", bits=4,
                              exclude=["fc3"], fold_bn=False)
    assert result.report.passed, result.report.summary()

    def edited(match, change):
        model = onnx.ModelProto.FromString(result.onnx_model.SerializeToString())
        tensors = list(model.graph.initializer) + [a.t for n in model.graph.node if n.op_type == "Constant"
                                                   for a in n.attribute if a.name == "value"]
        tensor = next(t for t in tensors if match(numpy_helper.to_array(t)))
        tensor.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(tensor).copy()), tensor.name))
        return model.SerializeToString()

    def gain(values):
        values[3] *= 1.05
        return values

    report = validate_quantized(edited(lambda a: a.shape == (10,) and np.allclose(a, 1.5), gain), result.model,
                                (x, ids))
    assert not report.passed and any("(output 0: SQNR" in f for f in report.failures), report.summary()
    report = validate_quantized(edited(lambda a: a.size == 1 and a.dtype.kind in "iu" and int(a.ravel()[0]) == 7,
                                       lambda a: a * 0 + 9), result.model, (x, ids))
    assert not report.passed and any("of output 2 (integers computed from integers" in f
                                     for f in report.failures), report.summary()


def test_a_step_output_with_nan_on_both_sides_agrees():
    """torch.where(z > 0, z, nan) after the last quantizer (a step output): NaN != NaN counted every masked value
    as a difference, and a genuine file failed with 47% of its values "differing"."""
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 10)

        def forward(self, x):
            z = self.l2(torch.relu(self.l1(x)))
            return torch.where(z > 0, z, torch.full_like(z, float("nan")))

    torch.manual_seed(0)
    x = torch.randn(64, 16)
    result = qcompile.compile(Masked().eval(), x[:1], calib=x, scheme="apot", bits=4)
    assert result.report.passed, result.report.summary()
    assert result.report.extra["step_output_mismatch"][0] < 0.02


class _SaturatedGRU(torch.nn.Module):
    """A GRU whose outputs sit at +-1 (tanh saturated, update gate closed) before an 8-bit Linear: the uniform grid
    of its calibrated range [-1, 1] puts 1.0 on a rounding tie (zero point 127 of 2/255 steps), and onnxruntime's
    GRU writes 1.0000005 where PyTorch's writes 1.0."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gru = torch.nn.GRU(4, 8, batch_first=True)
        self.fc = torch.nn.Linear(8, 3)
        with torch.no_grad():
            for p in self.gru.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 4.0)
            self.gru.bias_ih_l0[8:16] = -30.0

    def forward(self, x):
        o, _ = self.gru(x)
        return self.fc(o)


def test_codes_on_a_tie_of_a_float_layers_output_are_drift_not_a_wrong_file():
    model = _SaturatedGRU().eval()
    calib = torch.randn(64, 6, 4, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, calib=calib, validate=False, scheme="uniform", bits=8)
    report = validate_quantized(result.onnx_model.SerializeToString(), result.model, calib, float_model=model)
    assert report.extra["codes_differ"] > 0  # the flips are there, side by side
    assert report.extra["codes_differ_local"] == 0 and report.passed, report.summary()
    # a wrong classifier bias still fails (after the last quantizer: the forced bound)
    inits = {t.name for t in result.onnx_model.graph.initializer}
    producer = {o: n for n in result.onnx_model.graph.node for o in n.output}
    bias = next(n.input[2] for n in result.onnx_model.graph.node if n.op_type == "Gemm")
    while bias not in inits:  # through the DequantizeLinear of its int32 codes
        bias = producer[bias].input[0]
    data = doctored(result.onnx_model, bias, lambda b: b + (np.abs(b).max() // 10 + 1).astype(b.dtype))
    assert not validate_quantized(data, result.model, calib).passed


class _CancellingConv(nn.Module):
    """A float conv (kept float) whose output is 0 on the black half of every image, read by a signed PoT 6-bit
    quantizer: levels down to 2^-30 of the range resolve the ~1e-9 by which any other summation order misses 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.a.bias.zero_()

    def forward(self, x):
        return self.c(self.b(self.a(x))).mean((2, 3))


def test_drift_at_the_scale_of_the_range_passes_where_pot_levels_resolve_it():
    # A random net's signed PoT-6 input after a Mish held values of +-1e-8 (range 1.35) where onnxruntime's float
    # sums and PyTorch's cancel differently: 0.7 % of that quantizer's codes differed on identical inputs (FAIL),
    # the tie rule asking for adjacent grid integers (PoT levels near 0 are 2^-30, 2^-29, ... apart) within 2^-18 of
    # a tiny |x|. A value within one float32 ulp of the range (2^-24 alpha) of another code's values is drift; 16
    # ulps is not.
    model = _CancellingConv().eval()
    x = torch.randn(48, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    x[:, :, :, 6:] = 0
    result = qcompile.compile(model, calib=x[:32], validate=False, wscheme="uniform", wbits=6, ascheme="pot", abits=6,
                              keep_first_last="quant", exclude=["a"], bias_correction=False, equalize=False,
                              int8_levels=False)
    from qcompile.runtime.validation import quantizer_places

    name = next(q for q, where in quantizer_places(result.model).items() if where.startswith("input of b"))
    alpha = float(result.model.get_submodule(name).alpha)
    assert result.model.get_submodule(name).scheme == "pot"
    assert validate_quantized(result.onnx_model.SerializeToString(), result.model, x[32:]).passed
    for shift, passes in ((2.0 ** -26, True), (2.0 ** -16, False)):
        data = doctored(result.onnx_model, "a.bias", lambda b: (b + np.float32(shift * alpha)).astype(np.float32))
        report = validate_quantized(data, result.model, x[32:])
        by_name = {layer["quantizer"]: layer for layer in report.layers}
        assert by_name[name]["codes_differ"] > 0.1 * by_name[name]["codes"]  # the black half's codes moved
        assert report.passed is passes, (shift, report.summary())


class _BinaryAfterSiLU(nn.Module):
    """Binary weights and activations behind float SiLU layers: a layer's sum of +-alpha codes times +-1 weights is
    often exactly 0, and float32 sums in another order land on either side of the threshold at 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2, self.c3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.c4, self.fc = nn.Conv2d(16, 16, 1), nn.Linear(16, 4)

    def forward(self, x):
        h = F.silu(self.c3(F.silu(self.c2(F.silu(self.c1(x))))))
        return self.fc(self.c4(h).mean((2, 3)))


def test_binary_activations_on_sums_that_are_zero_pass_as_drift():
    # README listed this as a known exception: 3.5 % of one channel's codes differed on identical inputs and
    # validation FAILed, though both sides decide the sign of the same sum, 0, computed in other float orders
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(_BinaryAfterSiLU().eval(), x[:1], calib=x[:32], validation_inputs=x[32:],
                              scheme="binary", int8_levels=False, progress=False)
    report = result.report
    assert report.passed, report.summary()
    assert report.extra["codes_differ"] > 1000  # the flips are there, side by side
    assert report.extra["code_mismatch_local"] <= MAX_CODE_MISMATCH


def test_validation_batches_are_bounded_by_the_activations_too(monkeypatch):
    """BERT-base on 128 token ids a sample: a small input, so the 32 samples went through validation in one batch
    and peaked at 20 GB. The traced graph's activations per sample bound the batch as well (scaled down here)."""
    import qcompile.runtime.validation as validation

    wide = torch.nn.Sequential(torch.nn.Linear(16, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4)).eval()
    tokens = torch.zeros(32, 16)
    gm = qcompile.trace(wide, tokens[:1])
    assert validation.validation_batch_size(tokens, gm) == 64  # the default budget: small activations
    monkeypatch.setattr(validation, "VALIDATION_BATCH_ACTIVATIONS", 10 * (4096 + 4096 + 4))
    assert validation.validation_batch_size(tokens) == 64  # by the inputs alone
    assert validation.validation_batch_size(tokens, gm) == 10  # two Linear outputs and a ReLU's, as traced


def test_a_float_model_with_a_constant_output_is_named():
    """torchvision's vit_b_16(weights=None) starts its head at zero: every compile reported "vs the float model:
    SQNR inf, top-1 100 %" and PASS, which said nothing about the quantization."""
    from qcompile.errors import QuantizationWarning

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(QuantizationWarning, match="outputs are all 0 on these inputs"):
        result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8)
    assert "constant_output_note" in result.summary


@pytest.mark.parametrize("scheme,bits", [("apot", 4), ("uniform", 8)])
def test_the_weight_memo_changes_no_figure_of_the_report(monkeypatch, scheme, bits):
    """validate_quantized computes each weight quantizer's output and each int8 layer's weight codes once
    (qmodules.weight_memo) instead of on every simulation run: the report is the same as without it, batch for
    batch, and a weight changed between two validations is seen by the second."""
    import qcompile.qmodules as qmodules

    model = ResidualCNN(seed=0)
    x = example_input(model, seed=2, batch=24)
    result = qcompile.compile(model, x[:1], calib=x, validate=False, scheme=scheme, bits=bits)
    blob = result.onnx_model.SerializeToString()
    memo = validate_quantized(blob, result.model, x, batch_size=4)
    monkeypatch.setattr(qmodules, "weight_memo", contextlib.nullcontext)
    plain = validate_quantized(blob, result.model, x, batch_size=4)
    assert memo.summary() == plain.summary()
    assert memo.extra.get("code_mismatch") == plain.extra.get("code_mismatch")
    monkeypatch.undo()
    with torch.no_grad():  # the simulation's weight moved: the file no longer computes it
        next(p for name, p in result.model.named_parameters() if name.endswith("weight")).mul_(-1)
    assert validate_quantized(blob, result.model, x, batch_size=4).summary() != memo.summary()


def test_float_outputs_computed_first_give_the_same_report(compiled):
    """compile() hands validation the float model's outputs (``float_outputs``), computed before the validation's
    own runs, so that its float copy of the model is gone by then (a 54M-weight MLP: 5.95x -> 5.26x its float
    weights at the compile's peak): the comparisons with float are those of the model itself."""
    from qcompile.runtime.validation import FloatOutputs, float_outputs, validation_batch_size

    result, float_model, x = compiled
    blob = result.onnx_model.SerializeToString()
    direct = validate_quantized(blob, result.model, x, float_model=float_model)
    outs = float_outputs(float_model, x, validation_batch_size(x, result.model))
    assert isinstance(outs, FloatOutputs) and outs.floating == [True]
    first = validate_quantized(blob, result.model, x, float_model=outs)
    assert direct.extra["sqnr_vs_float_db"] == first.extra["sqnr_vs_float_db"] < 60.0
    assert direct.extra["top1_vs_float"] == first.extra["top1_vs_float"]
    assert direct.summary() == first.summary()
    # what compile reports is that comparison, with the model itself
    r = qcompile.compile(float_model, calib=x, scheme="apot", bits=4, calib_method="minmax", validation_inputs=x)
    again = validate_quantized(r.onnx_model.SerializeToString(), r.model, x, float_model=float_model)
    assert r.report.extra["sqnr_vs_float_db"] == again.extra["sqnr_vs_float_db"]
    assert r.report.extra["top1_vs_float"] == again.extra["top1_vs_float"]


def test_report_places_skip_the_reshape_qcompile_adds_before_a_3d_linear():
    """A Linear on (B, T, d) tokens reads its rows flattened by a reshape qcompile adds; its input quantizer was
    named "input of head after flatten", an op the model does not have."""
    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.ln, self.head = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 5)

        def forward(self, x):
            return self.head(self.ln(torch.nn.functional.gelu(self.l1(x))))

    torch.manual_seed(0)
    calib = torch.randn(16, 6, 8)
    result = qcompile.compile(Tokens().eval(), calib=calib, scheme="apot", bits=4, keep_first_last="int8")
    places = [layer["where"] for layer in result.report.layers]
    assert "input of head after layernorm" in places and not any("flatten" in p for p in places), places


def test_a_weight_code_of_a_layer_lowered_to_shifts_and_adds_fails():
    """A layer lowered to shifts and adds has no dequantized weight tensor: one of its level indices changed was
    left to the activation codes, and fc1's (one code of 49152) passed at 58.2 dB from the genuine file. The
    weights are now read back from the region's 0/1 masks and term groups."""
    from qcompile.models import digits

    x_train, *_ = digits.load_split()
    calib = x_train[:32].clone()
    result = qcompile.compile(digits.pretrained(), calib[:1], calib=calib, scheme="apot", bits=4, emit="shift-add",
                              validate=False, progress=False)
    model = result.onnx_model
    genuine = validate_quantized(model.SerializeToString(), result.model, calib)
    assert genuine.passed and genuine.extra["weights_checked"] == genuine.extra["weights_total"], genuine.summary()
    inits = {t.name: t for t in model.graph.initializer}
    users = {i: n for n in model.graph.node for i in n.input}
    lowered = [n.input[0] for n in model.graph.node
               if n.op_type == "Cast" and n.input[0] in inits and "mask_table" in "".join(users[n.output[0]].input)]
    assert len(lowered) == 4  # conv2, conv3, down, fc1 (conv1 and fc2: 8-bit uniform, not lowered)
    for name in lowered:
        def change(index):
            wide = index.astype(np.int64)
            flat = wide.reshape(-1)
            flat[7] = flat[7] + 1 if flat[7] < 14 else flat[7] - 1  # a neighbouring level
            return wide.astype(np.uint8)

        report = validate_quantized(doctored(model, name, change), result.model, calib)
        assert not report.passed, report.summary()
        assert any("differ from the simulation's in 1 of their" in f for f in report.failures), report.failures
