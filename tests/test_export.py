"""fp32 export: onnx.checker (full check), onnxruntime parity with PyTorch, dynamic batch, atomic writes, and the
Python API ``qcompile.compile(..., scheme="fp32")``."""
from __future__ import annotations

import collections
import copy
import os
import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import qcompile
from qcompile.errors import UserError
from qcompile.export import check_model, check_output_path, export_onnx, save_atomic
from qcompile.frontend import trace
from qcompile.runtime.session import run, session
from tests.models import MLP, DepthwiseSeparableNet, ResidualCNN, example_input, randomize_batchnorm

RTOL = 1e-4  # the issue's bound for fp32: max |onnx - torch| / max |torch| on seeded inputs

MODELS = [ResidualCNN, DepthwiseSeparableNet, MLP]


def rel_err(got: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.detach().numpy().astype(np.float64)
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / np.max(np.abs(ref)))


def exported(factory):
    model = factory(seed=1)
    x = example_input(model, seed=2)
    gm = trace(model, x)
    return model, x, export_onnx(gm, (x,))


def leftovers(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture(scope="module")
def exports():
    """Export each model once (the slow part); the tests below only run the files."""
    return {f.__name__: exported(f) for f in MODELS}


@pytest.mark.parametrize("factory", MODELS, ids=lambda f: f.__name__)
def test_fp32_export_passes_the_full_checker(exports, factory):
    _, _, onnx_model = exports[factory.__name__]
    check_model(onnx_model)
    onnx.checker.check_model(onnx_model, full_check=True)
    assert [i.name for i in onnx_model.graph.input] == ["input"]
    assert [o.name for o in onnx_model.graph.output] == ["output"]


@pytest.mark.parametrize("factory", MODELS, ids=lambda f: f.__name__)
def test_fp32_onnxruntime_matches_pytorch(exports, factory):
    model, x, onnx_model = exports[factory.__name__]
    sess = session(onnx_model.SerializeToString())
    (got,) = run(sess, [x.numpy()])
    with torch.no_grad():
        ref = model(x)
    assert got.shape == tuple(ref.shape)
    assert rel_err(got, ref) <= RTOL


@pytest.mark.parametrize("factory", MODELS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch(exports, factory, batch):
    model, _, onnx_model = exports[factory.__name__]
    assert onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert onnx_model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = example_input(model, seed=10 + batch, batch=batch)
    (got,) = run(session(onnx_model.SerializeToString()), [x.numpy()])
    with torch.no_grad():
        ref = model(x)
    assert got.shape[0] == batch
    assert rel_err(got, ref) <= RTOL


def test_static_batch_when_asked():
    model = MLP(seed=0)
    x = example_input(model)
    onnx_model = export_onnx(trace(model, x), (x,), dynamic_batch=False)
    assert onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == x.shape[0]


class _Unflattened(nn.Module):
    """Features unflattened into tokens (``x.unflatten(1, (T, d))``), a Linear per token, then ``view(B, -1)``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.a(x.unflatten(1, (2, 8))))
        return self.b(h).view(h.size(0), -1)


@pytest.mark.parametrize("scheme", ["fp32", "uniform"])
def test_sizes_read_after_an_unflatten_stay_dynamic(scheme):
    """torch.onnx's unflatten lost the batch dimension for shape inference: ``h.size(0)`` after it was folded to
    the example's batch, and the file (fp32, or quantized with the per-token head as a 2-D Gemm) stopped at any
    other batch size ("cannot be reshaped to the requested shape")."""
    model = _Unflattened().eval()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, x[:1], calib=x, scheme=scheme, bits=8)
    assert result.report.passed
    assert_file_runs_at_other_batches(result, x, out_shape=(6,))


def assert_file_runs_at_other_batches(result, x, out_shape=None, batches=(1, 5)):
    """The compiled file, in onnxruntime, gives the simulation's outputs at batch sizes other than the example's."""
    sess = session(result.onnx_model.SerializeToString())
    for batch in batches:
        got = run(sess, [x[:batch].numpy()])[0]
        with torch.no_grad():
            want = result.model(x[:batch]).numpy()
        if out_shape is not None:
            assert got.shape == (batch, *out_shape)
        np.testing.assert_allclose(got, want, atol=1e-4 * float(np.abs(want).max()))


def test_inputs_are_named_after_forward_as_torch_onnx_names_them(tmp_path):
    """A file of a model with several inputs named them input_0, input_1, ...: a user feeding it with the names of
    torch.onnx.export's file (forward's parameter names) got "invalid input name". Now forward's names, recorded
    with those the file leaves out (never read), so that positional inputs still find theirs; input_0, ... where a
    name would clash with an output (or for *args)."""
    import json

    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(3, 4)

        def forward(self, features, mask, unused):
            return self.a(features) * torch.sigmoid(self.b(mask))

    class Clash(Gate):
        def forward(self, features, output, unused):
            return super().forward(features, output, unused)

    class Attribute(Gate):  # GraphModule's own attributes (meta, training): forward's names all the same
        def forward(self, meta, training, unused):
            return super().forward(meta, training, unused)

    class Submodule(Gate):  # a name of the module's own (its layer a): the fallback names
        def forward(self, a, mask, unused):
            return super().forward(a, mask, unused)

    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 8, generator=gen), torch.randn(16, 3, generator=gen), torch.randn(16, 2, generator=gen))
    for cls, names, kept in ((Gate, ["features", "mask", "unused"], ["features", "mask"]),
                             (Attribute, ["meta", "training", "unused"], ["meta", "training"]),
                             (Submodule, ["input_0", "input_1", "input_2"], ["input_0", "input_1"]),
                             (Clash, ["input_0", "input_1", "input_2"], ["input_0", "input_1"])):
        result = qcompile.compile(cls().eval(), tuple(t[:1] for t in x), calib=x, scheme="uniform", bits=8,
                                  output=str(tmp_path / "m.onnx"))
        assert result.report.passed, result.report.summary()
        saved = onnx.load(str(tmp_path / "m.onnx"))
        assert [i.name for i in saved.graph.input] == kept
        assert json.loads({p.key: p.value for p in saved.metadata_props}["qcompile.inputs"]) == names
        sess = session(str(tmp_path / "m.onnx"))
        by_name = sess.run(None, {kept[0]: x[0].numpy(), kept[1]: x[1].numpy()})[0]
        np.testing.assert_array_equal(run(sess, [t.numpy() for t in x])[0], by_name)  # positional: the record


def test_a_qat_model_compiled_keeps_forward_names_torch_fx_renamed():
    """forward(self, input, x): torch.fx renames the placeholder 'input' to 'input_1'; a QAT-prepared model compiled
    (traced a second time) named the file's inputs input_1, x, and forward(self, input, input_1) gave input_1,
    input_2: a user feeding forward's names swapped the two inputs."""
    from qcompile import qat

    class InputNamed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

        def forward(self, input, input_1):
            return self.out(torch.relu(self.a(input) + 3 * self.b(input_1)))

    gen = torch.Generator().manual_seed(0)
    calib = (torch.randn(64, 4, generator=gen), torch.randn(64, 4, generator=gen) * 5)
    example = tuple(c[:1] for c in calib)
    gm = qat.prepare(InputNamed().eval(), example, scheme="apot", bits=4, calib=calib)
    for result in (qcompile.compile(gm, example), qcompile.compile(qat.convert(gm), example),
                   qat.export(gm, example)):
        assert [i.name for i in result.onnx_model.graph.input] == ["input", "input_1"]
        sess = session(result.onnx_model.SerializeToString())
        by_name = sess.run(None, {"input": calib[0].numpy(), "input_1": calib[1].numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(by_name, result.model(*calib).numpy(), atol=1e-5)


def test_an_optional_input_forward_never_reads_may_be_given():
    """forward(self, features, mask=None, scale=None) given three arrays: the trace dropped the unread optional
    input's placeholder as if it had taken its default, and the compile refused the data ("the model takes 2
    inputs"), while the same input without a default compiled. Now it is an input the file leaves out, as that."""
    import json

    class Optional3(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

        def forward(self, features, mask=None, scale=None):
            h = self.a(features)
            if mask is not None:
                h = h + self.b(mask)
            return self.out(torch.relu(h))

    gen = torch.Generator().manual_seed(2)
    x = tuple(torch.randn(32, 4, generator=gen) for _ in range(3))
    with pytest.warns(qcompile.QuantizationWarning, match="never reads its input"):
        result = qcompile.compile(Optional3().eval(), calib=x, scheme="uniform", bits=8)
    assert result.report.passed, result.report.summary()
    assert [i.name for i in result.onnx_model.graph.input] == ["features", "mask"]
    props = {p.key: p.value for p in result.onnx_model.metadata_props}
    assert json.loads(props["qcompile.inputs"]) == ["features", "mask", "scale"]


def test_two_inputs_and_two_outputs_are_named():
    class TwoInTwoOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, a, b):
            y = self.fc(a) + b
            return y, y * 2.0

    model = TwoInTwoOut().eval()
    a, b = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), torch.ones(2, 3)
    onnx_model = export_onnx(trace(model, (a, b)), (a, b))
    assert [i.name for i in onnx_model.graph.input] == ["a", "b"]  # forward's names, as torch.onnx.export
    assert [o.name for o in onnx_model.graph.output] == ["output_0", "output_1"]
    got = run(session(onnx_model.SerializeToString()), [a.numpy(), b.numpy()])
    with torch.no_grad():
        ref = model(a, b)
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= RTOL


# --- atomic writes ------------------------------------------------------------------------------------------


def small_onnx() -> onnx.ModelProto:
    model = MLP(seed=0)
    x = example_input(model)
    return export_onnx(trace(model, x), (x,))


def test_save_atomic_writes_a_loadable_file_and_no_temp(tmp_path):
    proto = small_onnx()
    path = save_atomic(proto, str(tmp_path / "m.onnx"))
    assert path == str(tmp_path / "m.onnx")
    assert leftovers(tmp_path) == ["m.onnx"]
    assert onnx.load(path).SerializeToString() == proto.SerializeToString()


class _FailingModel:
    """Stands in for a ModelProto whose serialization fails part-way."""

    def SerializeToString(self):
        raise MemoryError("serialization failed")


def test_failed_serialization_leaves_no_file(tmp_path):
    with pytest.raises(MemoryError):
        save_atomic(_FailingModel(), str(tmp_path / "m.onnx"))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["oserror", "interrupt"])
def test_interrupted_rename_leaves_no_file_and_no_temp(tmp_path, monkeypatch, error):
    """An OS error while writing becomes a one-line UserError naming the path and the fix; an interrupt stays
    itself. Either way nothing is left behind."""
    def failing_replace(src, dst):
        raise error

    monkeypatch.setattr(os, "replace", failing_replace)
    expected = UserError if isinstance(error, OSError) else type(error)
    with pytest.raises(expected) as err:
        save_atomic(small_onnx(), str(tmp_path / "m.onnx"))
    if expected is UserError:
        assert "No space left on device" in str(err.value) and "choose another -o path" in str(err.value)
    assert leftovers(tmp_path) == []


def test_saved_files_get_the_permissions_of_a_plain_open(tmp_path):
    """mkstemp's temporary file is 0600; the written file gets 0666 minus the umask, as open() would give it."""
    mask = os.umask(0o022)
    try:
        path = save_atomic(small_onnx(), str(tmp_path / "m.onnx"))
    finally:
        os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous contents")

    def interrupted_fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        save_atomic(small_onnx(), str(target))
    assert target.read_bytes() == b"previous contents"
    assert leftovers(tmp_path) == ["m.onnx"]


def test_check_output_path(tmp_path):
    assert check_output_path(str(tmp_path / "a.onnx")) == str(tmp_path / "a.onnx")
    with pytest.raises(UserError, match="does not exist"):
        check_output_path(str(tmp_path / "missing" / "a.onnx"))
    with pytest.raises(UserError, match="is a directory"):
        check_output_path(str(tmp_path))


# --- the Python API -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [ResidualCNN, MLP], ids=lambda f: f.__name__)
def test_compile_api_fp32(tmp_path, factory):
    model = factory(seed=3)
    x = example_input(model, seed=4)
    out = tmp_path / "model.onnx"
    seen = []
    result = qcompile.compile(model, x, scheme="fp32", output=str(out), callback=seen.append)
    assert isinstance(result.model, torch.fx.GraphModule)
    assert result.onnx_path == str(out) and out.is_file()
    assert result.report is not None and result.report.passed
    assert result.report.sqnr_db >= 80.0  # relative error <= 1e-4
    assert [t.name for t in result.timings] == ["RemoveIdentity", "ConstantMetadataReads", "DecomposeRMSNorm",
                                                "DecomposeGroupedQueryAttention", "DecomposeAdaptivePool",
                                                "DecomposeAvgPoolDivisor", "DecomposeUnexportable",
                                                "EliminateDeadCode"] == [t.name for t in seen]
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=1e-6)
    onnx.checker.check_model(str(out), full_check=True)
    written = onnx.load(str(out))
    assert (written.producer_name, written.producer_version) == ("qcompile", qcompile.__version__)
    (got,) = run(session(str(out)), [x.numpy()])
    with torch.no_grad():
        assert rel_err(got, model(x)) <= RTOL


class DictHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.cls, self.reg = nn.Linear(16, 3), nn.Linear(16, 1)

    def forward(self, x):
        h = self.body(x)
        return {"logits": self.cls(h), "box": self.reg(h)}


@pytest.mark.parametrize("scheme", ["fp32", "uniform"])
def test_a_dict_output_names_the_onnx_outputs_after_its_keys(scheme, tmp_path):
    """A model returning {"logits": ..., "box": ...} gave outputs output_0 and output_1; its users look them up by
    the model's own keys."""
    torch.manual_seed(0)
    model, x = DictHeads().eval(), torch.randn(32, 8)
    out = tmp_path / "heads.onnx"
    result = qcompile.compile(model, x[:1], calib=None if scheme == "fp32" else x, scheme=scheme,
                              **({} if scheme == "fp32" else {"bits": 8}), output=str(out))
    assert result.report.passed, result.report.summary()
    sess = session(str(out))
    assert [o.name for o in sess.get_outputs()] == ["logits", "box"]
    got = dict(zip(["logits", "box"], run(sess, [x.numpy()])))
    with torch.no_grad():
        want = model(x)
    assert got["logits"].shape == (32, 3) and got["box"].shape == (32, 1)
    if scheme == "fp32":
        assert rel_err(got["logits"], want["logits"]) <= RTOL and rel_err(got["box"], want["box"]) <= RTOL


class DigitKeyHeads(DictHeads):
    def forward(self, x):
        h = self.body(x)
        return collections.OrderedDict([("0", self.cls(h)), ("1", self.reg(h))])


@pytest.mark.parametrize("scheme", ["fp32", "uniform"])
def test_a_dict_output_with_digit_string_keys_compiles_with_numbered_outputs(scheme, tmp_path):
    """torchvision's FPN backbones (BackboneWithFPN, IntermediateLayerGetter) return an OrderedDict keyed '0', '1',
    ...: named after their keys, the outputs failed in torch.onnx ("Invalid name: '0'"); they are output_0, ..."""
    torch.manual_seed(0)
    model, x = DigitKeyHeads().eval(), torch.randn(32, 8)
    out = tmp_path / "heads.onnx"
    result = qcompile.compile(model, x[:1], calib=None if scheme == "fp32" else x, scheme=scheme,
                              **({} if scheme == "fp32" else {"bits": 8}), output=str(out))
    assert result.report.passed, result.report.summary()
    assert [o.name for o in session(str(out)).get_outputs()] == ["output_0", "output_1"]


class IntKeyHeads(DictHeads):
    def forward(self, x):
        h = self.body(x)
        return {0: self.cls(h), 1: self.reg(h)}


def test_a_dict_output_with_int_keys_is_refused_in_one_line_naming_the_keys(tmp_path):
    """{0: mask, 1: logits} failed inside torch.onnx ("output 1 ... did not have observable data dependence"), and the
    message asked the user to return dicts, which the model did."""
    from qcompile.errors import UserError

    torch.manual_seed(0)
    out = tmp_path / "heads.onnx"
    with pytest.raises(UserError, match=r"dict with keys that are not strings \(0, 1\).*use string keys"):
        qcompile.compile(IntKeyHeads().eval(), torch.randn(1, 8), scheme="fp32", output=str(out))
    assert not out.exists()


def test_compile_api_compiles_a_training_mode_model_for_inference():
    """A model handed over in training mode (BatchNorm on batch statistics, Dropout on) is compiled as its eval-mode
    self, in the quantized pipeline too, and is handed back untouched: still training, same parameters and
    running statistics."""
    model = nn.Sequential(ResidualCNN(seed=3), nn.Dropout(0.5))
    randomize_batchnorm(model, seed=4).train()
    x = example_input(model[0], seed=5, batch=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for scheme in ("fp32", "uniform"):
        result = qcompile.compile(model, x, scheme=scheme, bits=8, calib=x, output=None)
        assert model.training and all(m.training for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        with torch.no_grad():
            want = model.eval()(x)
            model.train()
            got = result.model(x)
        assert not result.model.training
        floor = 80.0 if scheme == "fp32" else 30.0  # in training mode Dropout alone puts it near 3 dB
        assert 10 * torch.log10(want.pow(2).sum() / (got - want).pow(2).sum()) > floor, scheme


def test_batchnorm_without_running_statistics_is_a_user_error(tmp_path):
    """track_running_stats=False normalises with each batch's statistics, in eval mode too: torch.onnx stopped on
    it with an AssertionError (an internal error); it is one line naming the module now, and no file."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    for scheme in ("fp32", "uniform"):
        with pytest.raises(UserError, match=r"^1 \(BatchNorm2d\) has no running statistics"):
            qcompile.compile(model, torch.randn(4, 3, 8, 8), calib=torch.randn(4, 3, 8, 8),
                             scheme=scheme, bits=8, output=str(tmp_path / "m.onnx"))
    assert leftovers(tmp_path) == []


class _DoublesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x.mul_(2)  # writes to the caller's tensor
        return self.fc(x), self.fc(x).argmax(1)


def test_compile_leaves_the_callers_tensors_alone_and_scores_float_outputs_only():
    """The validation ran the float model on the user's own calibration/validation tensors: a model writing to its
    input doubled them (a second compile calibrated on doubled data). And the SQNR against float took output 0
    whatever it was (class indices from argmax: a meaningless figure)."""
    model = _DoublesItsInput().eval()
    calib, valid = torch.randn(32, 8), torch.randn(16, 8)
    calib0, valid0 = calib.clone(), valid.clone()
    result = qcompile.compile(model, calib[:1], calib=calib, scheme="uniform", bits=8, output=None,
                              validation_inputs=valid)
    assert torch.equal(calib, calib0) and torch.equal(valid, valid0)
    assert result.report.passed and result.report.extra["sqnr_vs_float_db"] > 30
    assert result.report.extra["sqnr_vs_float_output"] == 0  # the logits, not the argmax output


def test_compile_api_in_memory_and_from_a_spec():
    result = qcompile.compile("tests.models:MLP", torch.zeros(2, 16), scheme="fp32", output=None,
                              validation_inputs=example_input(MLP, seed=5, batch=7))
    assert result.onnx_path is None
    assert result.report.samples == 7 and result.report.passed


def test_scheme_names_in_any_case_and_a_model_class_for_a_model(tmp_path):
    """scheme='APoT' (the paper's spelling) was an unknown scheme; a model class for a model said "got type"."""
    from qcompile.options import CompileOptions

    opts = CompileOptions(scheme="APoT", wscheme="PoT", ascheme="Uniform", calib_method="MSE", emit="Custom")
    assert (opts.scheme, opts.wscheme, opts.ascheme, opts.calib_method, opts.emit) == \
        ("apot", "pot", "uniform", "mse", "custom")
    with pytest.raises(UserError, match=r"model is the class MLP, not a model: pass an instance"):
        qcompile.compile(MLP, example_input(MLP), scheme="fp32", output=str(tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()


def test_compile_api_rejects_bad_options_before_writing(tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(UserError, match="unknown --scheme"):
        qcompile.compile(MLP(), example_input(MLP), scheme="fp16", output=str(out))
    with pytest.raises(UserError, match="outside 2..8"):
        qcompile.compile(MLP(), example_input(MLP), scheme="fp32", bits=9, output=str(out))
    with pytest.raises(UserError, match="give example_inputs"):
        qcompile.compile(MLP(), None, scheme="fp32", output=str(out))
    # options that quantize something, given to a float compile, were dropped silently (the CLI refused them)
    with pytest.raises(UserError, match="config, wbits cannot apply to scheme='fp32'"):
        qcompile.compile(MLP(), example_input(MLP), scheme="fp32", config={"fc2": {"scheme": "apot"}}, wbits=4,
                         output=str(out))
    # an unknown keyword was a TypeError from the options dataclass; now it names the option to use
    for kwargs, needle in [({"float_levels": True}, "unknown option 'float_levels'; use int8_levels=False"),
                           ({"calib_methd": "kl"}, "did you mean 'calib_method'?"),
                           ({"per_channel": "no"}, "option per_channel must be True or False, got 'no'"),
                           ({"progress": True}, r"progress must be a function \(or None\), got True")]:
        with pytest.raises(UserError, match=needle):
            qcompile.compile(MLP(), example_input(MLP), scheme="uniform", bits=8, output=str(out), **kwargs)
    assert leftovers(tmp_path) == []


def test_compile_api_takes_numpy_numbers_arrays_and_datasets():
    """``bits=np.int64(8)`` (a sweep over np.arange) and a tuple of arrays as example inputs were refused; a
    TensorDataset (samples without a batch axis) was read as one batch per sample and failed to trace."""
    from torch.utils.data import TensorDataset

    model = MLP().eval()
    x = example_input(MLP, batch=32)
    for kwargs in [dict(calib=x, bits=np.int64(8), per_channel=np.bool_(True)),
                   dict(calib=x, bits=8, example_inputs=(x[:1].numpy(),)),
                   dict(calib=TensorDataset(x, torch.zeros(32)), bits=8, progress=False)]:
        result = qcompile.compile(model, scheme="uniform", **kwargs)
        assert result.report.passed and result.options.bits == 8 and type(result.options.bits) is int
    assert result.report.samples == 32


def test_compile_api_refuses_bad_data_before_writing(tmp_path):
    """Mistakes in the data given from Python: one-line UserErrors, and no file (the file is written after its
    validation, so a validation that cannot run leaves nothing behind either)."""
    out = tmp_path / "model.onnx"
    x = example_input(MLP, batch=8)
    cases = [
        (dict(calib=x.long()),
         "calibration data holds integers but the model takes torch.float32: convert"),
        (dict(calib=[x[:4], torch.randn(4, x.shape[1] + 1)]), "calibration batch 1 has samples of shape"),
        (dict(calib=x, validation_inputs=torch.randn(4, x.shape[1] + 1)), "validation data has samples of shape"),
        (dict(calib=x, thresholds={"min_snr": 10}), "unknown validation threshold(s) 'min_snr'"),
        (dict(calib=x, bits="4"), "--bits must be an integer bit-width from 2 to 8, got '4'"),
        (dict(calib=x[:0]), "calibration data holds no samples (shape (0, 16))"),  # was a bare StopIteration
        (dict(calib=[x[:0]]), "calibration data holds no samples"),
    ]
    for kwargs, needle in cases:
        kwargs = {"scheme": "uniform", "bits": 8, **kwargs}
        with pytest.raises(UserError) as info:
            qcompile.compile(MLP(), x[:1], output=str(out), **kwargs)
        assert needle in str(info.value)
        assert leftovers(tmp_path) == []
    # calibration inputs that require grad (the output of a preprocessing module) are data, not a graph
    pre = torch.nn.Linear(x.shape[1], x.shape[1])
    result = qcompile.compile(MLP(), x[:1], scheme="uniform", bits=8, calib=pre(x), output=str(out))
    assert result.report.passed and out.exists()
    # a float64 example given as a torch tensor is float32 too, as float64 calibration data and numpy examples
    # were (it met the float32 model: "mat1 and mat2 must have the same dtype")
    result = qcompile.compile(MLP(), x[:1].double(), scheme="uniform", bits=8, calib=x.double())
    assert result.report.passed


@pytest.mark.parametrize("kwargs, needle", [
    # TypeError from validation's comparison ("'<' not supported between instances of 'float' and 'str'")
    (dict(thresholds={"min_sqnr": "30"}), "threshold min_sqnr='30' is a str; give a number"),
    (dict(thresholds={"max_code_mismatch": "x"}), "threshold max_code_mismatch='x' is a str"),
    # TypeError "'int' object is not iterable", ValueError "dictionary update sequence element #0 has length 8"
    (dict(thresholds=30), "thresholds= is of type int; give a dict of validation thresholds"),
    (dict(thresholds=["min_sqnr"]), "thresholds= is of type list"),
    # accepted: a percentage failed every compile ("100.00% < 9900.00%"), nan passed, a negative max_abs failed
    (dict(thresholds={"min_top1": 99}), "threshold min_top1=99 is not a fraction; give a value in [0, 1]"),
    (dict(thresholds={"min_sqnr": float("nan")}), "threshold min_sqnr=nan compares with nothing"),
    (dict(thresholds={"max_abs": -1}), "threshold max_abs=-1 is negative"),
    # "output path '/current/folder' is a directory"
    (dict(output=""), "output= is empty; give a file name"),
    # validate="no" validated (a non-empty string is true)
    (dict(validate="no"), "validate must be True or False, got 'no'"),
    # check="yes" / trust_pickle="yes" were taken as true, as validate="no" was
    (dict(check="no"), "option check must be True or False, got 'no'"),
    (dict(trust_pickle="no"), "trust_pickle must be True or False, got 'no'"),
    # TypeError "'int' object is not iterable" in SelectLayers / trace
    (dict(exclude=3), "option exclude takes layer names (--exclude): a str or a list of str"),
    (dict(leaf_modules=3), "option leaf_modules takes layer names (--leaf-module)"),
    # ignored: validation inputs or thresholds given and nothing validated (the CLI refuses --data/--min-sqnr with
    # --no-validate)
    (dict(validate=False, validation_inputs=torch.zeros(4, 64)),
     "validation_inputs= holds the inputs validation runs on, and validate=False skips it"),
    (dict(validate=False, thresholds={"min_sqnr": 30}), "thresholds= cannot apply with validate=False"),
    # "unknown option 'min_sqnr'; the options are ..." (the CLI's --min-sqnr is a threshold)
    (dict(min_sqnr=30), "validation thresholds go in thresholds=, e.g. thresholds={'min_sqnr': ...}"),
])
def test_compile_api_refuses_bad_options_in_one_line(tmp_path, kwargs, needle):
    x = example_input(MLP, batch=8)
    kwargs = {"scheme": "uniform", "bits": 8, "calib": x, "output": str(tmp_path / "model.onnx"), **kwargs}
    with pytest.raises(UserError) as info:
        qcompile.compile(MLP(), x[:1], **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert leftovers(tmp_path) == []


def test_compile_api_takes_thresholds_as_numbers_of_any_kind():
    """numpy and 0-d torch numbers, and None for no threshold, are thresholds as before."""
    x = example_input(MLP, batch=8)
    result = qcompile.compile(MLP(), x[:1], scheme="uniform", bits=8, calib=x, progress=False, thresholds={
        "min_sqnr": np.float32(20), "min_top1": torch.tensor(0.5), "max_abs": None})
    assert result.report.passed, result.report.summary()


def test_default_attributes_are_stripped_and_outputs_unchanged():
    """Attributes equal to their default (schema defaults; unit strides/dilations and zero pads of convolutions and
    pools) go; the rest stay; onnxruntime computes the same before and after."""
    import torch.nn as nn

    from qcompile.export import strip_default_attributes

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, stride=2, groups=2, dilation=2, padding=2)
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(8 * 4 * 4, 5)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.b(torch.relu(self.a(x)))), 1))

    model = Net().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = export_onnx(trace(model, (x,)), (x,))
    after = strip_default_attributes(onnx.ModelProto.FromString(before.SerializeToString()))
    check_model(after)
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in after.graph.node}
    convs = [n.name for n in after.graph.node if n.op_type == "Conv"]
    assert set(attrs[convs[0]]) == {"kernel_shape", "pads"}  # strides/dilations 1, group 1: gone
    assert attrs[convs[1]] == {"kernel_shape": [3, 3], "pads": [2, 2, 2, 2], "strides": [2, 2], "dilations": [2, 2],
                               "group": 2}
    gemm = next(n.name for n in after.graph.node if n.op_type == "Gemm")
    assert attrs[gemm] == {"transB": 1}  # alpha = beta = 1.0: gone
    assert len(after.SerializeToString()) < len(before.SerializeToString())
    xs = x.numpy()
    np.testing.assert_array_equal(run(session(after.SerializeToString()), [xs])[0],
                                  run(session(before.SerializeToString()), [xs])[0])


def test_identical_small_initializers_are_stored_once_and_the_file_computes_the_same():
    """Every APoT layer's level table, the zero points, the cell tables of APoT activations with one level set: one
    copy each (readers in subgraphs renamed too); weights are never merged."""
    from onnx import helper, numpy_helper

    from qcompile.export import share_identical_initializers
    from qcompile.models import digits

    x_tr, _, x_te, _ = digits.load_split()
    result = qcompile.compile(digits.pretrained(), x_tr[:1], calib=x_tr[:32], scheme="apot", bits=4,
                              validation_inputs=x_te[:64])
    assert result.report.passed and result.report.extra["codes_differ"] == 0
    seen = {}
    for t in result.onnx_model.graph.initializer:
        body = onnx.TensorProto()
        body.CopyFrom(t)
        body.ClearField("name")
        key = body.SerializeToString(deterministic=True)
        if len(key) <= 1024:
            assert key not in seen, f"{t.name} repeats {seen[key]}"
            seen[key] = t.name
    # unit: the duplicate goes, its readers (a subgraph's too) read the kept copy, weights above the size stay apart
    a, b = np.arange(4, dtype=np.float32), np.arange(4, dtype=np.float32)
    big = np.ones(600, np.float32)
    inner = helper.make_graph([helper.make_node("Add", ["x", "b"], ["y_then"])], "then", [],
                              [helper.make_tensor_value_info("y_then", onnx.TensorProto.FLOAT, [4])])
    other = helper.make_graph([helper.make_node("Add", ["x", "a"], ["y_else"])], "else", [],
                              [helper.make_tensor_value_info("y_else", onnx.TensorProto.FLOAT, [4])])
    nodes = [helper.make_node("Add", ["x", "a"], ["s"]), helper.make_node("Add", ["s", "b"], ["t"]),
             helper.make_node("ReduceSum", ["big1"], ["r1"], keepdims=0),
             helper.make_node("ReduceSum", ["big2"], ["r2"], keepdims=0),
             helper.make_node("Add", ["r1", "r2"], ["r"]),
             helper.make_node("Greater", ["r", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["u"], then_branch=inner, else_branch=other),
             helper.make_node("Add", ["t", "u"], ["y"])]
    inits = [numpy_helper.from_array(v, n) for n, v in
             (("a", a), ("b", b), ("big1", big), ("big2", big.copy()), ("zero", np.zeros((), np.float32)))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    x = np.linspace(-1, 1, 4, dtype=np.float32)
    before = run(session(model.SerializeToString()), [x])[0]
    assert share_identical_initializers(model) == 1
    assert sorted(t.name for t in model.graph.initializer) == ["a", "big1", "big2", "zero"]
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(run(session(model.SerializeToString()), [x])[0], before)


def test_a_requantization_with_the_codes_own_parameters_is_dropped_and_the_file_computes_the_same():
    """``QuantizeLinear(DequantizeLinear(c))`` with the same scale and zero point is ``c``: the quantizer goes, and
    so does the DequantizeLinear of its codes, whose readers read the first one (the activation map follows); a
    pair with another scale stays."""
    import json

    from onnx import helper, numpy_helper

    from qcompile.emit import ACTIVATIONS_KEY
    from qcompile.export import drop_identity_requantizations

    def model(second_scale: float, mapped: bool):
        inits = [numpy_helper.from_array(np.array(v, t), n) for n, v, t in
                 (("s", 0.05, np.float32), ("s2", second_scale, np.float32), ("z", 3, np.uint8),
                  ("z2", 3, np.uint8))]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["c"]),
                 helper.make_node("DequantizeLinear", ["c", "s", "z"], ["d"]),
                 helper.make_node("QuantizeLinear", ["d", "s2", "z2"], ["c2"]),
                 helper.make_node("DequantizeLinear", ["c2", "s2", "z2"], ["d2"]),
                 helper.make_node("Relu", ["d2"], ["y"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        if mapped:
            m.metadata_props.add(key=ACTIVATIONS_KEY, value=json.dumps({"act_fq0": "d", "act_fq1": "d2"}))
        return m

    x = np.linspace(-0.3, 13.0, 64, dtype=np.float32)  # past both ends of the codes, and every code between
    for mapped in (False, True):
        m = model(0.05, mapped)
        before = run(session(m.SerializeToString()), [x])[0]
        assert drop_identity_requantizations(m) == 1
        ops = [n.op_type for n in m.graph.node]
        assert ops == ["QuantizeLinear", "DequantizeLinear", "Relu"] and m.graph.node[2].input[0] == "d", ops
        if mapped:
            assert json.loads(m.metadata_props[0].value) == {"act_fq0": "d", "act_fq1": "d"}
        onnx.checker.check_model(m, full_check=True)
        np.testing.assert_array_equal(run(session(m.SerializeToString()), [x])[0], before)
    m = model(0.0500001, False)
    assert drop_identity_requantizations(m) == 0 and len(m.graph.node) == 5


def test_gemm_bias_scale_is_computed_from_the_scales_in_the_file():
    """The int32 bias of an int8 Gemm is dequantized with Mul(S_x, S_w) of the scales the file holds, not a stored
    copy of their product; onnxruntime still fuses QGemm."""
    import collections
    import tempfile

    from qcompile.models import digits

    x_tr, _, _, _ = digits.load_split()
    result = qcompile.compile(digits.pretrained(), x_tr[:1], calib=x_tr[:32], scheme="uniform", bits=8)
    graph = result.onnx_model.graph
    producer = {o: n for n in graph.node for o in n.output}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert gemms
    for gemm in gemms:
        bias_dq = producer[gemm.input[2]]
        scale = producer[bias_dq.input[1]]
        assert scale.op_type == "Mul"
        assert set(scale.input) == {producer[gemm.input[0]].input[1], producer[gemm.input[1]].input[1]}
    with tempfile.TemporaryDirectory() as tmp:
        opt = os.path.join(tmp, "opt.onnx")
        session(result.onnx_model.SerializeToString(), optimized_model_path=opt)
        ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    assert ops["QGemm"] == len(gemms) and not ops["Gemm"], ops


def test_a_token_id_past_the_embedding_in_a_later_sample_is_a_user_error(tmp_path):
    """The traced example (sample 0) is checked when the model runs; an id past the table in sample 9 was an
    IndexError inside the Calibrate pass (an internal error)."""
    import torch.nn as nn

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(50, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, ids):
            return self.fc(self.e(ids).mean(1))

    ids = torch.randint(0, 50, (16, 7), generator=torch.Generator().manual_seed(0))
    ids[9, 3] = 77
    with pytest.raises(UserError, match=r"calibration data holds token id 77 but the embedding 'e' has 50 rows"):
        qcompile.compile(Tokens(), ids[:1], scheme="uniform", bits=8, calib=ids, output=str(tmp_path / "t.onnx"))
    assert leftovers(tmp_path) == []


def test_an_embedding_bag_loop_body_keeps_the_weight_it_reads(tmp_path):
    """torch.onnx writes nn.EmbeddingBag as a Loop whose body gathers from the bag's weight, an outer-scope
    initializer that no top-level node reads: the emission dropped it, and every quantized compile of such a model
    stopped with onnx.checker's "not output of any previous nodes" traceback."""
    import onnx
    import onnxruntime as ort
    import torch.nn as nn

    class Bag(nn.Module):
        def __init__(self, mode="mean", weighted=False):
            super().__init__()
            self.bag = nn.EmbeddingBag(40, 8, mode=mode)
            self.fc = nn.Linear(8, 3)
            self.weighted = weighted

        def forward(self, ids):
            if self.weighted:  # per-sample weights: torch.onnx's Loop stays
                return self.fc(self.bag(ids, per_sample_weights=torch.ones_like(ids, dtype=torch.float32) * 0.5))
            return self.fc(self.bag(ids))

    ids = torch.randint(0, 40, (16, 6), generator=torch.Generator().manual_seed(0))
    for mode, weighted in [("sum", True), ("mean", False), ("sum", False), ("max", False)]:
        torch.manual_seed(0)
        m = Bag(mode, weighted).eval()
        path = tmp_path / f"bag_{mode}_{weighted}.onnx"
        result = qcompile.compile(m, ids[:1], scheme="uniform", bits=8, calib=ids, output=str(path),
                                  progress=False)
        assert result.report.passed
        model = onnx.load(str(path))
        # a plain bag of 2-D ids is an Embedding and a reduction (DecomposeUnexportable): no Loop, and its table
        # is quantized like an Embedding's
        assert ("Loop" in {n.op_type for n in model.graph.node}) == weighted, mode
        assert (result.model.get_submodule("bag").__class__ is nn.Embedding) == (not weighted)
        onnx.checker.check_model(model, full_check=True)
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": ids.numpy()})[0]
        with torch.no_grad():
            ref = m(ids).numpy()
        assert 10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()) > 30, mode

    class TwoCalls(nn.Module):  # one bag called twice: replaced once, reduced at both calls
        def __init__(self):
            super().__init__()
            self.bag, self.fc = nn.EmbeddingBag(40, 8, mode="sum"), nn.Linear(16, 3)

        def forward(self, a, b):
            return self.fc(torch.cat([self.bag(a), self.bag(b)], 1))

    torch.manual_seed(0)
    m = TwoCalls().eval()
    b = torch.randint(0, 40, (16, 7), generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(m, (ids[:1], b[:1]), scheme="uniform", bits=8, calib=(ids, b), progress=False)
    assert result.report.passed and type(result.model.get_submodule("bag")) is nn.Embedding
    with torch.no_grad():
        ref, sim = m(ids, b).numpy(), result.model(ids, b).numpy()
    assert 10 * np.log10((ref ** 2).sum() / ((ref - sim) ** 2).sum()) > 30


def test_a_model_torch_ao_quantized_or_prepared_is_a_user_error(tmp_path):
    """torchvision's quantize=True models (torch.ao converted) were exported as torch's own int8 graph whatever
    scheme was asked, with validation PASS; a prepared one (observers) gave --leaf-module hints one observer at a
    time. Calibration batches that are dicts were a RuntimeError from torch.as_tensor."""
    import warnings

    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.dequant(self.fc2(torch.relu(self.fc1(self.quant(x)))))

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = torch.ao.quantization.quantize_dynamic(Net().eval(), {nn.Linear}, dtype=torch.qint8)
        net = Net().eval()
        net.qconfig = torch.ao.quantization.get_default_qconfig("x86")
        prepared = torch.ao.quantization.prepare(net)
        prepared(x)
        converted = torch.ao.quantization.convert(copy.deepcopy(prepared))
    out = str(tmp_path / "m.onnx")
    for model, needle in [(dynamic, "already quantized by torch.ao.quantization ('fc1' is "
                                    "torch.ao.nn.quantized.dynamic.Linear)"),
                          (converted, "already quantized by torch.ao.quantization ('quant' is "),
                          (prepared, "carries torch.ao.quantization observers ('quant.activation_post_process'")]:
        with pytest.raises(UserError, match=re.escape(needle)):
            qcompile.compile(model, x[:1], scheme="apot", bits=4, calib=x, output=out)
    with pytest.raises(UserError, match=re.escape("the calibration batches are dicts (keys 'image'); give each "
                                                  "batch as a tensor, or for several inputs a tuple in forward's "
                                                  "argument order: batch['image']")):
        qcompile.compile(Net().eval(), x[:1], scheme="uniform", bits=8, calib=[{"image": x}], output=out)
    assert leftovers(tmp_path) == []
    result = qcompile.compile(Net().eval(), x[:1], scheme="uniform", bits=8, calib=x)  # the stubs alone are fine
    assert result.report.passed


def test_a_bit_width_for_ternary_levels_applies_where_config_rules_change_the_scheme():
    """--wbits with --wscheme ternary is refused as changing nothing, but not when config rules give layers
    another weight scheme: there it is their bit-width (a regression of that refusal)."""
    x = example_input(MLP, batch=8)
    with pytest.raises(UserError, match="--wscheme ternary has 2-bit levels"):
        qcompile.compile(MLP(), x[:1], scheme="uniform", wscheme="ternary", wbits=6, calib=x)
    result = qcompile.compile(MLP(), x[:1], scheme="uniform", wscheme="ternary", wbits=6, calib=x,
                              config={"fc2": {"wscheme": "uniform"}})
    assert result.report.passed
    assert result.model.get_submodule("fc2").weight_fq.bits == 6


def test_a_scripted_submodule_and_an_operator_torch_onnx_refuses_are_user_errors():
    """A submodule under torch.jit.script crashed the export at every scheme ("Tried to trace ... not part of the
    active trace"); scaled_dot_product_attention with enable_gqa=True was a bare AssertionError from torch.onnx
    (then a one-line refusal; now it exports)."""
    import torch.nn as nn
    import torch.nn.functional as F

    class Scripted(nn.Module):
        def __init__(self):
            super().__init__()
            self.sub = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.sub(x))

    class GroupedQueryAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):  # 4 query heads over 2 key/value heads
            b, n, _ = x.shape
            q = self.q(x).view(b, n, 4, 2).transpose(1, 2)
            kv = self.kv(x).view(b, n, 2, 2).transpose(1, 2)
            return F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True).transpose(1, 2).reshape(b, n, 8)

    with pytest.raises(UserError, match="submodule 'sub' is a TorchScript module"):
        qcompile.compile(Scripted(), torch.randn(2, 4), scheme="fp32")
    # (it exports now: DecomposeGroupedQueryAttention repeats the key/value heads, tests/passes/test_cleanup.py)
    assert qcompile.compile(GroupedQueryAttention(), torch.randn(2, 5, 8), scheme="fp32").report.passed


@pytest.mark.parametrize("scheme", ["fp32", "uniform"])
def test_softplus_keeps_its_threshold_in_the_file(scheme):
    """nn.Softplus(threshold=1) returns x where x > 1; torch.onnx wrote a plain Softplus (1.32 for 1.01), and the
    file failed validation (55 dB in fp32, 1 % of codes at W8A8). The export now writes the threshold."""
    import torch.nn as nn

    model = nn.Sequential(nn.Linear(6, 16), nn.Softplus(beta=1.0, threshold=1.0), nn.Linear(16, 4),
                          nn.Softplus(beta=2.0, threshold=3.0), nn.Linear(4, 3)).eval()
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0)) * 3
    result = qcompile.compile(model, x[:1], scheme=scheme, bits=8, calib=x)
    assert result.report.passed, result.report.summary()
    ops = [n.op_type for n in result.onnx_model.graph.node]
    assert ops.count("Where") == 2 and ops.count("Softplus") == 2
    assert result.report.sqnr_db > (80 if scheme == "fp32" else 0)


def test_an_instance_norm_with_running_statistics_compiles_as_the_batchnorm_it_computes():
    """InstanceNorm2d(track_running_stats=True) normalises with its running statistics in eval mode; torch.onnx
    refused it for a variable batch size ("instance_norm training for unknown batch size"). The compile copy
    writes it as that BatchNorm (folded into the conv before it); the user's model keeps its InstanceNorm."""
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 16, 3, padding=1)
            self.n = nn.InstanceNorm2d(16, affine=True, track_running_stats=True)
            self.o = nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.o(torch.relu(self.n(self.c(x))))

    torch.manual_seed(0)
    model = Net().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8))
        model.n.weight.uniform_(0.5, 2.0)
        model.n.bias.uniform_(-1.0, 1.0)
    model.eval()
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    fp32 = qcompile.compile(model, x[:1], scheme="fp32", calib=x)
    assert fp32.report.passed
    with torch.no_grad():
        ref = model(x).numpy()
    got = run(session(fp32.onnx_model.SerializeToString()), [x.numpy()])[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    q = qcompile.compile(model, x[:1], scheme="uniform", bits=8, calib=x)
    assert q.report.passed and q.report.extra["sqnr_vs_float_db"] > 30
    assert isinstance(model.n, nn.InstanceNorm2d)


@pytest.mark.parametrize("kwargs", [dict(size=(5, 7)), dict(scale_factor=0.3), dict(scale_factor=(0.5, 0.25))])
def test_area_resizes_compile_as_the_adaptive_pools_they_are(kwargs):
    """F.interpolate(mode="area") is an adaptive average pool: to a size that does not divide the input, or by a
    scale factor, torch.onnx refused it (the message said to change the input shape, while the same adaptive pool
    compiled through DecomposeAdaptivePool). It is decomposed the same way now."""
    import torch.nn as nn
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.o = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.o(F.interpolate(torch.relu(self.c(x)), mode="area", **kwargs))

    model = Net().eval()
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fp32 = qcompile.compile(model, x[:1], scheme="fp32", calib=x)
    assert fp32.report.passed and fp32.report.sqnr_db > 80
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(run(session(fp32.onnx_model.SerializeToString()), [x.numpy()])[0], ref,
                               rtol=1e-4, atol=1e-5)
    q = qcompile.compile(model, x[:1], scheme="uniform", bits=8, calib=x)
    assert q.report.passed and q.report.extra["sqnr_vs_float_db"] > 30


def test_the_file_depends_on_the_calibration_values_not_their_strides():
    """``x[:32]`` of (N, 1, 8, 8) images (strides (64, 1, 8, 1)) and the same values from np.load (strides (64, 64,
    8, 1)) gave two files: the layout changed the kernels' float sums, so `qcompile validate --data calib.npy` of the
    demo's file found 19 codes differing."""
    from qcompile.models import digits

    model = digits.pretrained()
    x_train = digits.load_split()[0]
    view = x_train[:32]
    copy_ = torch.from_numpy(view.numpy().copy())
    assert view.stride() != copy_.stride() and torch.equal(view, copy_)
    files = [qcompile.compile(model, c[:1], calib=c, scheme="apot", bits=4, validate=False).onnx_model
             .SerializeToString() for c in (view, copy_)]
    assert files[0] == files[1]


def test_calibration_batches_of_input_tuples_and_labels_feed_a_two_input_model():
    """A DataLoader yielding ((x1, x2), label), the (inputs, labels) form, stopped with a bare ValueError."""
    from torch.utils.data import DataLoader, Dataset

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Linear(6, 16), nn.Linear(6, 16), nn.Linear(16, 5)

        def forward(self, x1, x2):
            return self.fc(torch.relu(self.a(x1)) + torch.relu(self.b(x2)))

    torch.manual_seed(0)
    x1, x2 = torch.randn(64, 6), torch.randn(64, 6)

    class Pairs(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return (x1[i], x2[i]), 0

    result = qcompile.compile(Two().eval(), calib=DataLoader(Pairs(), batch_size=16), scheme="uniform", bits=8)
    assert result.report.passed and result.report.samples == 64
    assert len(result.onnx_model.graph.input) == 2


def test_a_constant_input_beside_one_that_varies_is_calibration_data(tmp_path):
    """A padding mask that is all ones (no calibration text was padded) beside the token ids was refused as
    "constant calibration data"; only calibration in which nothing varies is."""
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(20, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, ids, mask):
            h = self.e(ids) * mask.unsqueeze(-1)
            return self.fc(h.sum(1) / mask.sum(1, keepdim=True))

    ids = torch.randint(0, 20, (16, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(16, 6)
    result = qcompile.compile(Pool().eval(), (ids[:1], mask[:1]), scheme="uniform", bits=8, calib=(ids, mask),
                              output=str(tmp_path / "p.onnx"), progress=False)
    assert result.report.passed
    with pytest.raises(UserError, match=r"input 1 of the calibration data is constant"):
        qcompile.compile(Pool().eval(), (ids[:1], mask[:1]), scheme="uniform", bits=8,
                         calib=(torch.full_like(ids, 3), mask), output=str(tmp_path / "q.onnx"))
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("example, calib", [(torch.int32, torch.int64), (torch.int64, torch.int32)])
def test_token_ids_take_the_integer_type_of_the_example_input(tmp_path, example, calib):
    """int64 calibration ids (torch.randint) for an int32 example input: onnxruntime's "Unexpected input data
    type" from the validation, and no file."""
    from tests.models import TokenMean

    ids = torch.randint(0, 20, (16, 5), generator=torch.Generator().manual_seed(0))
    result = qcompile.compile(TokenMean().eval(), ids[:1].to(example), scheme="uniform", bits=8,
                              calib=ids.to(calib), output=str(tmp_path / "t.onnx"), progress=False)
    assert result.report.passed, result.report.summary()


@pytest.mark.parametrize("corrupt, needle", [
    (lambda m: m[0].weight.data.__setitem__((0, 0, 0, 0), float("nan")), r"'0.weight' holds 1 NaN or inf value"),
    (lambda m: m[1].running_var.__setitem__(0, -1.0), r"BatchNorm2d '1' has running_var \+ eps <= 0 in 1 channel"),
])
def test_a_corrupted_checkpoint_is_a_user_error(tmp_path, corrupt, needle):
    """A NaN weight or a negative running_var: "a qcompile bug" from calibration (a NaN scale), and at fp32 NaN
    outputs compared as PASS."""
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    corrupt(m)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for scheme in ("uniform", "fp32"):
        with pytest.raises(UserError, match=needle):
            qcompile.compile(m, x[:1], calib=x, scheme=scheme, bits=8, output=str(tmp_path / "m.onnx"))
        assert not (tmp_path / "m.onnx").exists()


def test_a_causal_mask_buffer_of_minus_inf_is_not_a_corrupted_checkpoint(tmp_path):
    """nn.Transformer.generate_square_subsequent_mask: -inf above the diagonal, registered as a buffer. The check
    for broken checkpoints refused it ("'causal' holds 120 NaN or inf values")."""
    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(6))

        def forward(self, x):  # (N, 6, 4)
            scores = x @ x.transpose(1, 2) + self.causal
            return self.fc(torch.softmax(scores, -1) @ x)

    x = torch.randn(8, 6, 4, generator=torch.Generator().manual_seed(0))
    result = qcompile.compile(Causal().eval(), x[:1], calib=x, scheme="uniform", bits=8,
                              output=str(tmp_path / "c.onnx"), progress=False)
    assert result.report.passed


def test_what_torch_onnx_fails_inside_on_is_one_line(tmp_path, capfd):
    """A dataclass output (as HuggingFace's ModelOutput): torch.onnx's own AttributeError ("'Graph' object has no
    attribute 'outputs'") came out as a traceback / "internal error, report it"."""
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return Out(self.fc(x))

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for scheme in ("fp32", "uniform"):
        with pytest.raises(UserError, match=r"torch.onnx's exporter failed on this model .*not a dataclass"):
            qcompile.compile(Net().eval(), x[:1], calib=x, scheme=scheme, bits=8, output=str(tmp_path / "d.onnx"))
    assert not (tmp_path / "d.onnx").exists()


def test_a_torch_nn_module_the_exporter_cannot_trace_is_named_without_the_dataclass_hint(tmp_path):
    """nn.MaxUnpool2d fails inside torch.onnx's tracer ("cond must be a bool"); the message sent the user to dataclass
    outputs and packed sequences, which the model has neither of."""
    class Unpool(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.o = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)
            self.p, self.u = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)

        def forward(self, x):
            y, i = self.p(torch.relu(self.c(x)))
            return self.o(self.u(y, i))

    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError) as info:
        qcompile.compile(Unpool().eval(), x[:1], calib=x, scheme="uniform", bits=8, output=str(tmp_path / "u.onnx"))
    assert "failed on this model in MaxUnpool2d" in str(info.value) and "replace that module" in str(info.value)
    assert "dataclass" not in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "u.onnx").exists()


def test_a_torch_nn_module_that_torch_onnx_cannot_trace_is_named_in_one_line(tmp_path):
    """SegNet's MaxUnpool2d: torch's own output-size check fails under the exporter ("cond must be a bool, but got
    a Tensor", raised in torch/__init__.py, not torch.onnx) and came out as "internal error, report it"."""
    class SegNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv2d(3, 8, 3, padding=1)
            self.pool, self.unpool = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)
            self.head = nn.Conv2d(8, 2, 3, padding=1)

        def forward(self, x):
            p, idx = self.pool(torch.relu(self.enc(x)))
            return self.head(self.unpool(p, idx))

    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    try:
        torch.onnx.export(SegNet().eval(), (x[:1],), str(tmp_path / "plain.onnx"), dynamo=False)
    except TypeError:  # torch 2.4-2.14
        with pytest.raises(UserError, match=r"exporter failed on this model in MaxUnpool2d \(TypeError"):
            qcompile.compile(SegNet().eval(), x[:1], calib=x, scheme="uniform", bits=8,
                             output=str(tmp_path / "s.onnx"))
        assert not (tmp_path / "s.onnx").exists()
    else:  # a torch that exports it: then so does qcompile
        result = qcompile.compile(SegNet().eval(), x[:1], calib=x, scheme="uniform", bits=8,
                                  output=str(tmp_path / "s.onnx"))
        assert result.report.passed


def test_a_minus_inf_mask_in_a_frozen_parameter_is_not_a_broken_checkpoint(tmp_path):
    """A fixed additive mask kept as nn.Parameter(requires_grad=False): refused as "holds NaN or inf"."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)
            self.mask = nn.Parameter(torch.tensor([0.0, 0.0, float("-inf"), 0.0]), requires_grad=False)

        def forward(self, x):
            return torch.softmax(self.fc(x) + self.mask, -1)

    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    result = qcompile.compile(Masked().eval(), x[:1], calib=x, scheme="uniform", bits=8,
                              output=str(tmp_path / "m.onnx"), progress=False)
    assert result.report.passed


def test_minus_inf_in_image_calibration_data_is_named(tmp_path):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    x[3, 2] = float("-inf")
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with pytest.raises(UserError, match=r"the calibration data holds 1 -inf value\(s\) that reach a quantizer"):
        qcompile.compile(m, x[:1], calib=x, scheme="uniform", bits=8, output=str(tmp_path / "m.onnx"))


def test_an_example_input_without_its_batch_dimension_is_named():
    """compile(model, x[0], calib=x): the message spoke of a per-sample shape () and of CLI flags the caller never
    used."""
    model = nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    calib = torch.randn(64, 13, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"shape \(13,\), the shape of one calibration data sample: .*\(1, 13\)"):
        qcompile.compile(model, calib[0], calib=calib, scheme="uniform", bits=8)


@pytest.mark.parametrize("framing", ["slices", "unfold(-1)", "unfold(2)"])
def test_framing_by_tensor_unfold_compiles_with_its_dimension_counted_from_the_start(framing):
    """torch.onnx writes Tensor.unfold's frames transposed for a negative dimension: the compile stopped in
    onnxruntime ("internal error") and a validate=False file ran at no batch size. It was refused; along a
    non-negative dimension the export is exact (timm's halonet26t was refused all the same), and a negative one is
    now counted from the start using the traced rank: all three framings give the same file's outputs."""
    class Framing(nn.Module):
        def __init__(self, framing: str):
            super().__init__()
            torch.manual_seed(0)
            self.framing = framing
            self.lin, self.fc = nn.Linear(32, 16), nn.Linear(16, 3)

        def forward(self, x):  # (B, 2, 64) -> 7 frames of 16
            if self.framing == "slices":
                fr = torch.stack([x[..., i * 8:i * 8 + 16] for i in range(7)], dim=-2)
            else:
                fr = x.unfold(-1 if self.framing == "unfold(-1)" else 2, 16, 8)
            fr = fr.permute(0, 2, 1, 3).flatten(2)  # (B, 7, 32)
            return self.fc(torch.relu(self.lin(fr)).mean(1))

    x = torch.randn(32, 2, 64, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(Framing(framing).eval(), x[:2], calib=x, scheme="uniform", bits=8)
    assert result.report.passed and result.report.extra["codes_differ"] == 0, result.report.summary()
    assert_file_runs_at_other_batches(result, x)
    want = qcompile.compile(Framing("slices").eval(), x[:2], calib=x, scheme="uniform", bits=8)
    got, ref = (run(session(r.onnx_model.SerializeToString()), [x.numpy()])[0] for r in (result, want))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_unfold_along_a_negative_dimension_without_shapes_is_refused():
    class Frames(nn.Module):
        def forward(self, x):
            return x.unfold(-1, 4, 2)

    with pytest.raises(UserError, match="negative dimension is exported wrongly by torch.onnx"):
        trace(Frames())  # no example inputs: no rank to count from
    gm = trace(Frames(), (torch.randn(2, 3, 8),))
    assert [n.args[1] for n in gm.graph.nodes if n.op == "call_method"] == [2]


class _Unfold(nn.Module):
    """``x.unfold(dim, size, step)``, after an ``F.pad`` (torch.onnx computes the pads in the graph and loses the
    padded sizes) or not, with the size a number or read from the padded tensor's shape."""

    def __init__(self, dim: int, size: int, step: int, pad: bool, size_from_shape: bool = False):
        super().__init__()
        self.dim, self.size, self.step, self.pad, self.size_from_shape = dim, size, step, pad, size_from_shape

    def forward(self, x):
        if self.pad:
            x = nn.functional.pad(x, [2, 1, 1, 3])
        size = x.size(2) // 3 if self.size_from_shape else self.size
        return x.unfold(self.dim, size, self.step) * 2.0


@pytest.mark.parametrize("pad", [False, True], ids=["static", "after F.pad"])
def test_tensor_unfold_exports_exactly_along_every_dimension(pad):
    """torch.onnx exported ``Tensor.unfold`` only where it knew the dimension's length: after an ``F.pad`` (timm's
    halonet26t, ``F.pad(kv, ...).unfold(2, w, b).unfold(3, w, b)``) it stopped with "input size not accessible".
    qcompile's own symbolic gathers the frames (a constant index where the length is known, one computed from the
    input's shape otherwise): torch's values and shape exactly, for frames that overlap (step < size), touch, skip
    elements (step > size) or leave a remainder, along the batch axis too, at other batch sizes."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 9, 8, generator=gen)
    other = torch.randn(11, 5, 9, 8, generator=gen)
    cases = [(dim, size, step, False) for dim in (0, 1, 2, 3, -1, -2)
             for size, step in ((3, 1), (2, 3), (4, 2), (5, 5), (1, 1))] + [(1, 0, 1, True), (3, 0, 2, True)]
    for dim, size, step, size_from_shape in cases:
        model = _Unfold(dim, size, step, pad, size_from_shape).eval()
        onnx_model = export_onnx(trace(model, (x,)), (x,))
        assert "Loop" not in {n.op_type for n in onnx_model.graph.node}
        sess = session(onnx_model.SerializeToString())
        for inp in (x, other):
            want = model(inp).numpy()
            got = run(sess, [inp.numpy()])[0]
            assert got.shape == want.shape and np.array_equal(got, want), (dim, size, step, size_from_shape)


def test_halo_attention_windows_after_padding_compile():
    """HaloNet's key/value windows in small: a padded map cut into overlapping blocks with two unfolds, each
    block's window flattened for the attention. The compile stopped in torch.onnx ("input size not accessible")."""
    class Halo(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.kv, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8 * 36, 4)

        def forward(self, x):  # (B, 3, 8, 8): 4 blocks of 4 x 4, each with a halo of 1 -> 6 x 6 windows
            kv = nn.functional.pad(torch.relu(self.kv(x)), [1, 1, 1, 1])
            kv = kv.unfold(2, 6, 4).unfold(3, 6, 4).reshape(-1, 8, 4, 36).permute(0, 2, 1, 3)  # (B, 4, 8, 36)
            return self.fc(kv.flatten(2)).mean(1)

    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(Halo().eval(), x[:2], calib=x, scheme="uniform", bits=8)
    assert result.report.passed and result.report.extra["codes_differ"] == 0, result.report.summary()
    assert_file_runs_at_other_batches(result, x)


class _ResizeTo(nn.Module):
    """``F.interpolate(x, size=..., mode="nearest")`` (or a scale factor), then a multiply so the resize is not the
    output itself."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, x):
        return nn.functional.interpolate(x, **self.kwargs) * 2.0


@pytest.mark.parametrize("shape,kwargs", [((14, 14), dict(size=(16, 16))), ((7, 9), dict(size=(13, 20))),
                                          ((16, 16), dict(size=(5, 6))), ((12, 12), dict(size=(4, 4))),
                                          ((6,), dict(size=11)), ((3, 5, 7), dict(size=(4, 9, 10))),
                                          ((8, 8), dict(size=(16, 16))), ((9, 9), dict(scale_factor=1.5)),
                                          ((8, 8), dict(scale_factor=2)),
                                          ((14, 14), dict(size=(16, 16), mode="nearest-exact")),
                                          ((7, 9), dict(size=(13, 20), mode="nearest-exact")),
                                          ((8, 8), dict(scale_factor=2, mode="nearest-exact"))])
def test_nearest_resize_to_a_size_exports_pytorchs_pixels(shape, kwargs):
    """ONNX Resize divides by the float scale where PyTorch multiplies by the float inverse: 14 -> 16 pixels (a
    U-Net's skip size after a stride-2 transposed conv with padding 1) put output column 8 on input column 6 in
    onnxruntime and on 7 in PyTorch; an fp32 file was 31.5 dB from its model. Exact now, at other batch sizes too.
    nearest-exact (half-pixel centres), which torch.onnx did not export at all, the same way."""
    model = _ResizeTo(**kwargs).eval()
    x = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    sess = session(export_onnx(trace(model, (x[:1],)), (x[:1],)).SerializeToString())
    for batch in (x, torch.randn(5, 3, *shape)):
        got, want = run(sess, [batch.numpy()])[0], model(batch).numpy()
        assert got.shape == want.shape and np.array_equal(got, want)


def test_a_unet_whose_skip_is_resized_to_its_size_compiles_exactly():
    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.e1, self.e2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose2d(16, 8, 2, stride=2, padding=1)  # 8 -> 14 pixels
            self.d, self.out = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, 1, 1)

        def forward(self, x):
            a = torch.relu(self.e1(x))
            u = nn.functional.interpolate(self.up(torch.relu(self.e2(a))), size=a.shape[-2:])
            return self.out(torch.relu(self.d(torch.cat([u, a], 1))))

    x = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for options in (dict(scheme="fp32"), dict(scheme="uniform", bits=8), dict(scheme="apot", bits=4)):
        result = qcompile.compile(UNet().eval(), x[:1], calib=x[:32], validation_inputs=x[32:], **options)
        assert result.report.passed, (options, result.report.summary())
        assert result.report.extra.get("codes_differ_local", 0) == 0


def test_a_labelled_set_given_as_one_x_y_pair_calibrates_on_x():
    """calib=(x, y) or validation_inputs=(x, y) of a one-input model: the labels were read as a second batch
    ("calibration batch 1 has samples of shape ()", also for the validation inputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    want = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, validation_inputs=x)
    got = qcompile.compile(model, x[:1], calib=(x, y), scheme="uniform", bits=8, validation_inputs=(x, y))
    assert got.report.passed and got.report.samples == want.report.samples == 64
    assert got.onnx_model.SerializeToString() == want.onnx_model.SerializeToString()
    with pytest.raises(UserError, match=r"^validation batch 1 has samples of shape \(1, 4, 4\)"):
        qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8,
                         validation_inputs=[x[:8], torch.rand(8, 1, 4, 4)])


def test_the_python_api_refuses_to_overwrite_the_model_file_or_its_source(tmp_path):
    # the CLI refused these; qcompile.compile wrote the ONNX bytes over the checkpoint and over the model's .py
    import importlib
    import sys

    from qcompile.errors import UserError
    from qcompile.models import digits

    (tmp_path / "usermodel.py").write_text("import torch.nn as nn\n\n\nclass Net(nn.Sequential):\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("usermodel")
        model = module.Net(nn.Flatten(), nn.Linear(64, 10)).eval()
        before = (tmp_path / "usermodel.py").read_bytes()
        x = digits.calibration_inputs(8)
        # refused by its extension before the model is read (check_not_model_source still guards --json)
        with pytest.raises(UserError, match="ends in .py, the extension of Python source, but qcompile writes an "
                                            "ONNX file there"):
            qcompile.compile(model, x[:1], calib=x, output=str(tmp_path / "usermodel.py"))
        assert (tmp_path / "usermodel.py").read_bytes() == before
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("usermodel", None)
    ckpt = tmp_path / "ckpt.pt"
    torch.save(digits.pretrained().state_dict(), ckpt)
    size = ckpt.stat().st_size
    with pytest.raises(UserError, match="is the model file; writing there would overwrite it"):
        qcompile.compile(str(ckpt), x[:1], calib=x, arch=digits.SPEC, output=str(ckpt))
    assert ckpt.stat().st_size == size


def test_a_float64_default_dtype_does_not_break_the_compile_and_is_restored():
    # torch.set_default_dtype(torch.float64) stopped APoT compiles of a float32 model in Calibrate/BiasCorrection
    # ("index_select(): self and result must have the same scalar type"); float16 broke even uniform ones
    from qcompile.models import digits

    x = digits.calibration_inputs(16)
    for dtype in (torch.float64, torch.float16):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            result = qcompile.compile(digits.pretrained(), x[:1], calib=x, scheme="apot", bits=4)
            assert torch.get_default_dtype() == dtype
        finally:
            torch.set_default_dtype(previous)
        assert result.report.passed, result.report.summary()


def test_a_process_wide_forward_hook_that_changes_values_is_named():
    # it was called "a qcompile bug, please report it"
    from qcompile.errors import UserError

    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, inp, out: out * 1.5 if isinstance(mod, nn.Linear) else None)
    try:
        with pytest.raises(UserError, match=r"register_module_forward_hook\) has forward hooks, which torch.fx does "
                                            r"not trace"):
            qcompile.compile(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), torch.randn(1, 8),
                             calib=torch.randn(16, 8), scheme="uniform", bits=8)
    finally:
        handle.remove()


class TokenMLP(torch.nn.Module):
    """A Linear on (batch, tokens, features): exported as Reshape -> Gemm -> Reshape once it leaves the int8 region."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_outputs_keep_their_static_dimensions_after_quantization(tmp_path):
    """A Linear on (batch, tokens, features) that leaves the int8 region as float is exported as Reshape → Gemm →
    Reshape: the file declared its output [batch, Reshapeoutput_dim_1, Reshapeoutput_dim_2] where the float file
    says [batch, 5, 8]."""
    import onnx

    torch.manual_seed(0)
    x = torch.randn(32, 5, 16)
    for options in (dict(scheme="fp32"), dict(scheme="uniform", bits=8), dict(scheme="apot", bits=4)):
        path = str(tmp_path / "t.onnx")
        qcompile.compile(TokenMLP().eval(), x[:1], calib=x, output=path, progress=False, **options)
        dims = onnx.load(path).graph.output[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == ["batch", 5, 8], options


def test_output_dimensions_are_read_from_float_runs_of_the_quantized_graph(monkeypatch):
    """The two runs that pin an output's named dimensions need shapes only: the quantizers pass values through
    (simulating every code took 0.49 of YOLOv8n's 6 s compile at 320 x 320); the dimensions are those of the
    test above."""
    import onnx

    from qcompile import export
    from qcompile.qmodules import FakeQuantize

    torch.manual_seed(0)
    x = torch.randn(32, 5, 16)
    result = qcompile.compile(TokenMLP().eval(), x[:1], calib=x, validate=False, progress=False, scheme="uniform", bits=8)
    model = onnx.ModelProto()
    model.CopyFrom(result.onnx_model)
    for d in model.graph.output[0].type.tensor_type.shape.dim[1:]:
        d.dim_param = "unknown"  # as the exporter leaves them after Reshape -> Gemm -> Reshape
    seen = []
    real = FakeQuantize.forward
    monkeypatch.setattr(FakeQuantize, "forward", lambda self, v: (seen.append(self.enabled), real(self, v))[1])
    export.pin_output_dims(model, result.model, (x[:1],))
    assert seen and not any(seen)  # the graph ran, every quantizer passing values through
    assert [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == ["batch", 5, 8]


def test_output_dimensions_that_follow_the_batch_are_not_pinned(tmp_path):
    """Pinning every named dimension to the example's size broke outputs whose other axes follow the batch: a
    time-first output declared [batch, 1, 6] and onnxruntime refused batch 5; a reshape folding the batch in made
    onnxruntime's optimizer build a Reshape to the example's size (the compile's own validation crashed)."""
    import onnx
    import onnxruntime as ort

    class TimeFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 6)

        def forward(self, x):  # (B, T, F) -> (T, B, 6)
            return self.fc(x.transpose(0, 1))

    class Folded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 8)

        def forward(self, x):  # (B, 7, 12) -> (4, 14·B)
            return self.fc(x).reshape(4, -1)

    torch.manual_seed(0)
    x = torch.randn(16, 7, 12)
    for model, batch in ((TimeFirst(), 5), (Folded(), 4)):
        for options in (dict(scheme="fp32"), dict(scheme="apot", bits=4)):
            path = str(tmp_path / "m.onnx")
            result = qcompile.compile(model.eval(), x[:1], calib=x, output=path, progress=False, **options)
            assert result.report.passed
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            got = sess.run(None, {sess.get_inputs()[0].name: x[:batch].numpy()})[0]
            with torch.no_grad():
                assert got.shape == tuple(model(x[:batch]).shape)
            dims = onnx.load(path).graph.output[0].type.tensor_type.shape.dim
            assert all(d.dim_param for d in dims[1:2]), (type(model).__name__, options)  # the batch-bound axis


def test_output_dimensions_that_are_not_the_batch_are_not_called_batch(tmp_path):
    """y.flatten() of the whole batch was declared [batch] (5 samples give 50 values), y.t() [batch, batch], a
    time-first output [batch, batch, 10]: each dimension now says what it is."""
    import onnx
    import onnxruntime as ort

    class Out(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.fc, self.kind = torch.nn.Linear(12, 10), kind

        def forward(self, x):
            y = self.fc(x)
            return y.flatten() if self.kind == "flatten" else y.t() if self.kind == "t" else y.transpose(0, 1)

    torch.manual_seed(0)
    for kind, x, want in (("flatten", torch.randn(16, 12), ["output_dim0"]), ("t", torch.randn(16, 12), [10, "batch"]),
                          ("time-first", torch.randn(16, 7, 12), [7, "batch", 10])):
        path = str(tmp_path / "o.onnx")
        qcompile.compile(Out(kind).eval(), x[:1], calib=x, output=path, scheme="uniform", bits=8, progress=False)
        dims = onnx.load(path).graph.output[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == want, kind
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            assert sess.run(None, {sess.get_inputs()[0].name: x[:5].numpy()})[0].shape == tuple(Out(kind)(x[:5]).shape)


def test_a_0_dim_input_is_refused_in_one_line():
    """forward(x, scale) with a 0-dim scale ended in torch.onnx's "Dynamic shape axis should be no more than the
    shape dimension for batch"; (batch,) works."""
    import qcompile
    from qcompile.errors import UserError

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x, scale):
            return self.fc(x) * scale[:, None]

    x = torch.randn(4, 8)
    with pytest.raises(UserError, match="input 1 of the example is a 0-dim tensor") as err:
        qcompile.compile(Scaled().eval(), (x[:1], torch.tensor(2.0)), scheme="fp32")
    assert "\n" not in str(err.value)
    assert qcompile.compile(Scaled().eval(), (x[:1], torch.tensor([2.0])), scheme="fp32").report.passed


def test_a_list_of_one_array_per_input_calibrates_a_two_input_model_as_a_tuple_does():
    """calib=[x1, x2] for forward(a, b): the passes of a hand-built pipeline read it as one tensor per input, and
    compile refused it ("give calibration batches as tuples")."""
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(5, 8)
            self.mid, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)

        def forward(self, a, b):
            return self.head(torch.relu(self.mid(torch.cat([torch.relu(self.a(a)), torch.relu(self.b(b))], 1))))

    torch.manual_seed(0)
    model = Two().eval()
    x1, x2 = torch.randn(32, 6), torch.randn(32, 5)
    want = qcompile.compile(model, (x1[:1], x2[:1]), calib=(x1, x2), scheme="apot", bits=4, validate=False)
    got = qcompile.compile(model, (x1[:1], x2[:1]), calib=[x1, x2.numpy()], scheme="apot", bits=4)
    assert got.report.passed, got.report.summary()
    assert want.onnx_model.SerializeToString() == got.onnx_model.SerializeToString()


def test_batches_whose_second_item_could_be_an_input_say_it_was_taken_as_a_label():
    """(input_ids, attention_mask) batches for forward(input_ids=None, attention_mask=None) (every HuggingFace
    argument has a default): the mask was taken as a label without a word, and the file computed the model without
    it (13.5 dB from the model with it; validation passed, comparing the same maskless graph)."""
    import warnings

    from qcompile.errors import QuantizationWarning

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30, 8)
            self.mid = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, input_ids=None, attention_mask=None):
            h = torch.relu(self.mid(self.emb(input_ids)))
            if attention_mask is not None:
                h = h * attention_mask[..., None]
            return self.head(h.mean(1))

    torch.manual_seed(0)
    ids = torch.randint(0, 30, (32, 6))
    mask = torch.ones_like(ids)
    mask[::2, 4:] = 0
    labels = torch.randint(0, 3, (32,))

    def said(calib, **kw):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qcompile.compile(Masked().eval(), calib=calib, scheme="uniform", bits=8, validate=False, **kw)
        return [str(w.message) for w in caught if issubclass(w.category, QuantizationWarning)
                and "taken as a label" in str(w.message)]

    notes = said([(ids[i:i + 8], mask[i:i + 8]) for i in range(0, 32, 8)])
    assert len(notes) == 1 and "item 2 (torch.int64 of shape [8, 6]" in notes[0] and "'attention_mask'" in notes[0]
    assert said(((ids[i:i + 8], mask[i:i + 8]) for i in range(0, 32, 8)))  # a generator too, read once
    assert not said([(ids[i:i + 8], labels[i:i + 8]) for i in range(0, 32, 8)])  # labels of another shape
    assert not said((ids, mask))  # one array per input: both are inputs
    assert not said(torch.utils.data.TensorDataset(ids, labels))  # samples of a Dataset: labels are no mask
    assert said(torch.utils.data.TensorDataset(ids, mask))
    with pytest.raises(qcompile.UserError, match=re.escape("batches are ((x1, x2, ...), label) with 2 inputs, but the "
                                                           "model is traced with 1 (forward's other inputs have "
                                                           "defaults): give example_inputs")):
        said([((ids[i:i + 8], mask[i:i + 8]), labels[i:i + 8]) for i in range(0, 32, 8)])
    from qcompile import qat

    with warnings.catch_warnings(record=True) as caught:  # qat.prepare says it as compile does
        warnings.simplefilter("always")
        qat.prepare(Masked().eval(), ids[:1], scheme="uniform", bits=4,
                    calib=[(ids[i:i + 8], mask[i:i + 8]) for i in range(0, 32, 8)])
    assert any("taken as a label" in str(w.message) for w in caught)

    class Sequence(torch.nn.Module):  # (B, T, d) features and a (B, T) key padding mask
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

        def forward(self, x, key_padding_mask=None):
            h = torch.relu(self.a(x))
            if key_padding_mask is not None:
                h = h * key_padding_mask[..., None]
            return self.b(h.mean(1))

    x = torch.randn(32, 6, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qcompile.compile(Sequence().eval(), calib=[(x[i:i + 8], mask[i:i + 8].float()) for i in range(0, 32, 8)],
                         scheme="uniform", bits=8, validate=False)
    assert any("not as forward's 'key_padding_mask'" in str(w.message) for w in caught)


def _refused_file() -> bytes:
    """x (batch, 4) @ W (5, 3): onnxruntime refuses it at load (shape inference: "Incompatible dimensions")."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((5, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("scheme", ["fp32", "uniform"])
def test_a_file_onnxruntime_refuses_is_one_line_and_not_written(scheme, monkeypatch, tmp_path):
    """torch.onnx exports some models into graphs onnxruntime refuses (HuggingFace Cohere: a rank-6 rotary tensor,
    "[ShapeInferenceError] Incompatible dimensions") or cannot run (Canine: a FusedMatMul that cannot broadcast);
    compile's validation raised onnxruntime's own exception with its traceback. Here onnxruntime gets such a
    file in place of the exported one."""
    import onnxruntime as ort

    import qcompile.runtime.validation as validation

    def refusing(*args, **kwargs):
        return ort.InferenceSession(_refused_file(), providers=["CPUExecutionProvider"])

    monkeypatch.setattr(validation, "session", refusing)
    model, x = MLP(seed=0).eval(), example_input(MLP(seed=0), batch=16)
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match=r"onnxruntime cannot run the exported file \(.*\): torch.onnx wrote a graph") \
            as err:
        qcompile.compile(model, x[:1], calib=None if scheme == "fp32" else x, scheme=scheme,
                         **({} if scheme == "fp32" else {"bits": 8}), output=str(out))
    assert "\n" not in str(err.value) and "--no-validate" in str(err.value)
    assert not out.exists()


def test_an_endless_calibration_iterable_is_read_up_to_a_bound(monkeypatch):
    """compile(calib=itertools.cycle(loader)) grew memory at 0.5 GB/s until the kernel killed the process; a
    training set's loader was read whole. An iterable is read up to MAX_ITERABLE_SAMPLES, with a warning."""
    import itertools

    import qcompile.api as api
    from qcompile.errors import QuantizationWarning

    monkeypatch.setattr(api, "MAX_ITERABLE_SAMPLES", 96)
    model = nn.Sequential(nn.Linear(13, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(64, 13, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(64)), batch_size=32)
    with pytest.warns(QuantizationWarning, match="read up to 96 samples"):
        result = qcompile.compile(model, x[:1], calib=itertools.cycle(loader), scheme="uniform", bits=8)
    assert result.report.passed
    with pytest.warns(QuantizationWarning):
        assert api.calib_tensor(itertools.cycle(loader)).shape[0] == 96
    import warnings

    with warnings.catch_warnings():  # a finite loader under the bound: read whole, no word
        warnings.simplefilter("error", QuantizationWarning)
        qcompile.compile(model, x[:1], calib=loader, scheme="uniform", bits=8, validate=False)


def test_a_file_past_protobufs_2gb_limit_is_a_one_line_error(monkeypatch, tmp_path):
    """An fp32 compile of a 600M-parameter MLP (2.4 GB of weights) ended in "internal error: EncodeError: Failed to
    serialize proto" after minutes of work. The limit is scaled down here: the float file is refused in one line
    naming the 8-bit alternative, which fits, and nothing is written."""
    import qcompile.api as api

    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(api, "_GRAPH_MARGIN", 0)
    monkeypatch.setattr(api, "_PROTOBUF_LIMIT", 50_000)  # fp32 weights: 78 kB, 8-bit: 20 kB
    out = tmp_path / "m.onnx"
    with pytest.raises(UserError, match=r"past protobuf's 2 GiB limit.*--scheme uniform --bits 8"):
        qcompile.compile(model, x[:1], calib=x, scheme="fp32", output=str(out))
    assert not out.exists()
    assert qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, output=str(out)).report.passed


class OutlookFold(nn.Module):
    """VOLO's outlook attention in small: unfold, then fold back to the (H, W) read from the input's shape, with
    a non-square kernel and pads."""

    def __init__(self, shape_sizes: bool):
        super().__init__()
        self.shape_sizes = shape_sizes
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 10, 10)

    def forward(self, x):
        x = self.conv(x)
        size = x.shape[2:] if self.shape_sizes else (8, 10)
        cols = nn.functional.unfold(x, (3, 5), padding=(1, 2))
        return self.fc(nn.functional.fold(cols, size, (3, 5), padding=(1, 2)).flatten(1))


@pytest.mark.parametrize("shape_sizes", [False, True])
@pytest.mark.parametrize("scheme", ["fp32", "uniform"])
def test_fold_exports_with_sizes_from_shapes_and_uneven_pads(shape_sizes, scheme):
    # torch.onnx's col2im symbolic stopped on an output size read from a shape ("'NoneType' object is not
    # subscriptable": timm's volo_d1_224 could not be compiled) and wrote pads (1, 2) as [1, 1, 2, 2] where ONNX
    # wants begins then ends, [1, 2, 1, 2] (onnxruntime refused the file)
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 10)
    result = qcompile.compile(OutlookFold(shape_sizes).eval(), x[:1], calib=x, scheme=scheme, bits=8)
    assert result.report.passed, result.report.summary()
    assert [n.op_type for n in result.onnx_model.graph.node].count("Col2Im") == 1


def test_a_failing_operator_conversion_is_named_in_one_line(monkeypatch):
    # torch.onnx's own col2im symbolic, which fails inside on an output size read from a shape
    from torch.onnx import symbolic_opset18

    import qcompile.export as export

    monkeypatch.setattr(export, "_col2im_symbolic", symbolic_opset18.col2im)
    x = torch.randn(4, 3, 8, 10)
    with pytest.raises(UserError) as err:
        qcompile.compile(OutlookFold(True).eval(), x[:1], calib=x, scheme="fp32")
    message = str(err.value)
    assert "conversion of aten::col2im" in message and "dataclass" not in message and "\n" not in message


def test_a_list_of_single_samples_is_told_to_be_stacked():
    # each item of a list is a batch: sixteen (3, 8, 8) images read as batches of three (8, 8) samples
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    x = torch.randn(16, 3, 8, 8)
    with pytest.raises(UserError, match=r"samples of shape \(8, 8\) .*a list of single samples\? .*stack them"):
        qcompile.compile(model, x[:1], calib=[s.numpy() for s in x], scheme="uniform", bits=8)
    assert qcompile.compile(model, x[:1], calib=np.stack([s.numpy() for s in x]), scheme="uniform", bits=8).report.passed
    # without an example the first item is the example: the model ran on one sample without its batch axis
    with pytest.raises(UserError) as err:
        qcompile.compile(model, None, calib=[s for s in x], scheme="uniform", bits=8)
    assert "\n" not in str(err.value) and "list of 16 arrays of shape (3, 8, 8)" in str(err.value)
    assert "stack them" in str(err.value)
    assert qcompile.compile(model, None, calib=[x[:8], x[8:]], scheme="uniform", bits=8).report.passed  # batches


class _SqueezedHead(torch.nn.Module):
    """``.squeeze()`` after a global pool: (10,) at batch 1, (N, 10) from batch 2 on."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).squeeze())


def test_an_output_whose_rank_follows_the_batch_declares_the_rank_of_larger_batches(tmp_path):
    """A batch-1 example traced ``x.squeeze()`` to (10,), and the file declared its output ``[batch]`` while it gave
    (N, 10) for N > 1 (onnxruntime warned "Expected shape ... does not match" on every run, the validation
    passed): it now declares ``[batch, 10]`` and the compile says why its rank follows the batch."""
    import onnxruntime as ort

    from qcompile import QuantizationWarning

    torch.manual_seed(0)
    model, x = _SqueezedHead().eval(), torch.rand(32, 1, 8, 8)
    path = tmp_path / "sq.onnx"
    with pytest.warns(QuantizationWarning, match=r"\.squeeze\(\)"):
        result = qcompile.compile(model, calib=x, scheme="uniform", bits=8, output=str(path), progress=False)
    assert result.report.passed
    assert "squeeze" in result.summary["output_rank_note"]
    dims = result.onnx_model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 10]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].shape == ["batch", 10]
    for n in (1, 4):  # the file computes the model's own shapes, at batch 1 too
        got = sess.run(None, {sess.get_inputs()[0].name: x[:n].numpy()})[0]
        assert got.shape == tuple(model(x[:n]).shape)


def test_compile_gives_the_global_generator_back_as_it_was():
    """The decomposed nn.MultiheadAttention's new Linear layers drew from torch's global generator, so a seeded
    script computed other numbers after a compile than without it."""
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.att = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.att(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(16, 5, 16)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, validate=False, progress=False)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(123)
    qcompile.trace(model, x[:1])
    assert torch.equal(torch.rand(3), expected)


def test_a_time_first_recurrent_layer_on_a_model_input_is_a_warning():
    """nn.GRU(8, 32) (batch_first=False) reading (T, B, F) inputs compiled without a word into a file whose batch is
    the time axis and whose batch is fixed (README says so); a model that transposes batch-first inputs first is
    left alone."""
    from qcompile import QuantizationWarning

    class TimeFirst(torch.nn.Module):
        def __init__(self, transpose):
            super().__init__()
            self.transpose = transpose
            self.gru, self.fc = torch.nn.GRU(8, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            y, _ = self.gru(x.transpose(0, 1) if self.transpose else x)
            return self.fc(y[-1])

    torch.manual_seed(0)
    with pytest.warns(QuantizationWarning, match=r"gru \(GRU, batch_first=False\) reads input 'x' time-first"):
        result = qcompile.compile(TimeFirst(False).eval(), calib=torch.randn(6, 32, 8), scheme="uniform", bits=8,
                                  validate=False, progress=False)
    assert "batch_first=True" in result.summary["time_first_note"]
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = qcompile.compile(TimeFirst(True).eval(), calib=torch.randn(32, 6, 8), scheme="uniform", bits=8,
                                  validate=False, progress=False)
    assert not any("time-first" in str(w.message) for w in caught)
    assert "time_first_note" not in result.summary


def test_a_data_dependent_branch_in_a_leaf_module_is_said_to_be_frozen():
    """A module kept whole (--leaf-module) that branches on tensor values: the export fixed the example input's
    branch for every input, and the compile passed without a word (the file off by 0.55 on inputs taking the other
    branch)."""
    import warnings

    from qcompile.errors import QuantizationWarning

    class Gate(nn.Module):
        def forward(self, h):
            if h.mean() > 0.9:  # noqa: a data-dependent branch, what fx cannot trace
                return h * 3
            return h

    class Plain(nn.Module):
        def forward(self, h):
            return h * 3

    class Net(nn.Module):
        def __init__(self, gate=Gate):
            super().__init__()
            self.a, self.g, self.b = nn.Linear(8, 8), gate(), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(self.g(torch.relu(self.a(x))))

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = qcompile.compile(Net().eval(), x[:1], calib=x, scheme="fp32", leaf_modules=("g",), validate=False)
    said = [str(w.message) for w in caught if issubclass(w.category, QuantizationWarning)]
    assert any("a Python condition on tensor values" in m and "--leaf-module" in m for m in said), said
    assert "Python condition" in result.summary["frozen_branch_note"]
    with warnings.catch_warnings(record=True) as caught:  # a module kept whole without such a branch: no word
        warnings.simplefilter("always")
        plain = qcompile.compile(Net(Plain).eval(), x[:1], calib=x, scheme="fp32", leaf_modules=("g",),
                                 validate=False)
    assert not any("Python condition" in str(w.message) for w in caught) and "frozen_branch_note" not in plain.summary


def test_export_with_fewer_examples_than_inputs_is_one_clear_error():
    """export_onnx(gm, x) of a two-input model said torch.onnx's exporter failed ("forward() missing 1 required
    positional argument: 'feats'") and to rewrite the module."""
    from qcompile.errors import UserError
    from qcompile.export import export_onnx
    from qcompile.frontend import trace

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, img, feats, scale: float = 1.0):
            return self.fc(img + feats) * scale

    x = torch.randn(2, 8)
    gm = trace(Two().eval(), (x, x))
    with pytest.raises(UserError, match=r"the model takes 2 inputs \(img, feats\) but 1 example\(s\) were given"):
        export_onnx(gm, x)
    assert len(export_onnx(gm, (x, x)).graph.input) == 2


def test_a_model_without_layers_to_quantize_says_the_file_is_the_float_model():
    """forward = relu(x) * 2: compiled as "(apot W4A4)", PASS, exit 0 and not a word, while seven pass lines told
    the user to run the passes after InsertQuantizers, which the pipeline had done."""
    import warnings

    from qcompile.errors import QuantizationWarning

    class Act(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    x = torch.randn(8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = qcompile.compile(Act(), x[:1], calib=x, scheme="apot", bits=4, progress=False)
    notes = [str(w.message) for w in caught if issubclass(w.category, QuantizationWarning)]
    assert any(n.startswith("no layer is quantized: the model has no layer qcompile quantizes") for n in notes), notes
    assert result.report.passed
    lines = [line for t in result.timings for line in t.report]
    assert "the graph has no quantizers: nothing to do" in lines and not any("after InsertQuantizers" in line
                                                                           for line in lines), lines


def test_runtime_file_mistakes_and_bad_pass_options_are_user_errors(tmp_path):
    """runtime.session('nope.onnx') raised onnxruntime's NoSuchFile and runtime.validate of a text file its
    InvalidArgument; Calibrate(method='median') failed only when the pipeline ran (a PassError of a ValueError);
    ids past an Embedding's table were sent to fix --input-shape."""
    from qcompile.errors import UserError
    from qcompile.passes.calibrate import Calibrate
    from qcompile.runtime import session, validate

    text = tmp_path / "t.onnx"
    text.write_text("hi")
    with pytest.raises(UserError, match="no ONNX file at"):
        session(str(tmp_path / "nope.onnx"))
    with pytest.raises(UserError, match="is not an ONNX file"):
        validate(str(text), MLP(), example_input(MLP, batch=4))
    with pytest.raises(UserError, match="Calibrate: unknown method 'median'; use one of minmax"):
        Calibrate(method="median")

    class Ids(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.f = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2)

        def forward(self, ids):
            return self.f(self.e(ids).mean(1))

    ids = torch.randint(10, 30, (8, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"ids outside an Embedding's table: give ids in \[0, num_embeddings\)"):
        qcompile.compile(Ids().eval(), ids[:1], calib=ids)


def test_a_pipeline_result_given_for_its_graph_module_is_named():
    """gm = Pipeline([...])(gm) (a PassResult) handed to emit/export_onnx: "'PassResult' object has no attribute
    'named_modules'" from inside; SelectLayers(CompileOptions(...)) a TypeError."""
    from qcompile import CompileOptions, emit, export_onnx
    from qcompile.errors import UserError
    from qcompile.passes import Pipeline, SelectLayers

    x = example_input(MLP, batch=4)
    result = Pipeline([SelectLayers()])(qcompile.trace(MLP(), x[:1]))
    for call in (lambda: emit.quantizers_by_id(result), lambda: export_onnx(result, x[:1])):
        with pytest.raises(UserError, match="got PassResult: a pipeline .* returns a PassResult, its graph module "
                                            "is .gm"):
            call()
    with pytest.raises(UserError, match="SelectLayers: default must be a LayerConfig .* got CompileOptions"):
        SelectLayers(CompileOptions(scheme="apot", bits=4))


def test_compiling_a_compiled_model_again_is_refused(tmp_path):
    # compile(result.model, scheme="uniform", bits=8) on an APoT W4A4 result wrote the APoT file bit for bit with
    # "uniform 8" in its metadata, and validated it against itself (SQNR vs "float" inf)
    from qcompile.errors import UserError
    from qcompile.models import digits

    x = digits.calibration_inputs(8)
    result = qcompile.compile(digits.pretrained(), x[:1], calib=x, validate=False)
    out = tmp_path / "again.onnx"
    with pytest.raises(UserError, match=r"already quantized by qcompile \(\d+ quantizer\(s\), apot 4-bit.*compile "
                                        "the float model with the new options"):
        qcompile.compile(result.model, x[:1], calib=x, scheme="uniform", bits=8, output=str(out))
    assert not out.exists()
    # decisions set on a traced graph (SelectLayers, or by hand) were replaced by compile's own without a word
    from qcompile.passes import SelectLayers

    decided = SelectLayers()(qcompile.trace(digits.pretrained(), x[:1])).gm
    with pytest.raises(UserError, match=r"carries layer decisions \(node.meta\['qconfig'\] on 6 node\(s\).*"
                                        r"config=\{layer: \{...\}\} rules"):
        qcompile.compile(decided, x[:1], calib=x, output=str(out))
    assert not out.exists()
    assert qcompile.compile(qcompile.trace(digits.pretrained(), x[:1]), x[:1], calib=x, validate=False).model is not None


def test_a_compiled_model_refuses_pickling_with_the_way_out(tmp_path):
    """torch.save / pickle.dumps of result.model wrote bytes that torch.load could not rebuild ("symbolically traced
    variables cannot be used as inputs to control flow", far from the cause): refused when pickled, deep copies
    too; copies in the process keep working."""
    import copy
    import pickle

    from qcompile.errors import UserError
    from qcompile.models import digits

    x = digits.calibration_inputs(8)
    result = qcompile.compile(digits.pretrained(), x[:1], calib=x, scheme="uniform", bits=8, validate=False)
    for gm in (result.model, copy.deepcopy(result.model)):
        with pytest.raises(UserError, match="bound to qcompile's integer kernels.*copy.deepcopy works.*save what it was "
                                            r"built from \(the float model"):
            pickle.dumps(gm)
        with pytest.raises(UserError, match="bound to qcompile's integer kernels"):
            torch.save(gm, tmp_path / "gm.pt")
        assert torch.equal(gm(x), result.model(x))
    float_gm = qcompile.compile(digits.pretrained(), x[:1], scheme="fp32", validate=False).model
    assert torch.equal(pickle.loads(pickle.dumps(float_gm))(x), float_gm(x))  # nothing bound: pickles as before
