"""dynamic_axes / --dynamic-axes (qcompile/dynamic.py): a file whose inputs may change size on chosen axes, checked
at twice the example's size, and refused with one line where the graph fixed a size.

Every file here also runs in onnxruntime at sizes the compile never saw (not twice the example's, odd ones too)
and is compared with the simulation and the float model there."""
from __future__ import annotations

import importlib
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile.cli import main
from qcompile.errors import UserError
from qcompile.options import parse_dynamic_axes


class FullyConv(nn.Module):
    """A segmentation-like net: conv, BatchNorm, a stride-2 conv, an upsample by a factor, a skip add."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1, stride=2)
        self.up = nn.Upsample(scale_factor=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return self.head(torch.relu(self.up(self.c2(y)) + y[:, :8]))


class Classifier(nn.Module):
    def __init__(self, pool: int = 1):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Linear(16 * pool * pool, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.c1(x))), 1))


class FixedReshape(nn.Module):
    """Reads its feature count from the example's size: the model itself takes no other size."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c1(x)).reshape(x.shape[0], -1))


class SizeArithmetic(nn.Module):
    """A mean written with the feature map's size: the graph must compute it from the input, not the example."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.c(x))
        h, w = y.shape[-2:]
        return self.fc(y[:, :, : h // 2, : w // 2].sum((2, 3)) / ((h // 2) * (w // 2)))


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _dims(values):
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values]


def _run_at(path, result, model, x):
    """The file, its simulation and the float model on ``x``: (file, simulation, float) outputs."""
    sess = _session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        sim = result.model(x).numpy()
        ref = model(x).numpy()
    return got, sim, ref


def _sqnr(ref, got):
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(np.sum((ref - got).astype(np.float64) ** 2), 1e-30))


@pytest.mark.parametrize("scheme,bits,emit", [("uniform", 8, "standard"), ("apot", 4, "standard"),
                                              ("pot", 4, "custom"), ("apot", 4, "shift-add")])
def test_fully_convolutional_file_runs_at_other_sizes(tmp_path, scheme, bits, emit):
    model = FullyConv().eval()
    x = torch.randn(16, 3, 16, 16)
    path = str(tmp_path / "fc.onnx")
    # keep_first_last quant: the 4-bit levels (and their lookups, which held the example's shape) in every layer
    result = qcompile.compile(model, x[:1], calib=x, output=path, scheme=scheme, bits=bits, emit=emit,
                              keep_first_last="quant", dynamic_axes=(2, 3))
    saved = onnx.load(path)
    assert _dims(saved.graph.input) == [["batch", 3, "d2", "d3"]]
    # the output follows the input's sizes, but a square example whose odd size the model refuses cannot show which
    # axis is which (a transpose would look the same): names of its own
    assert _dims(saved.graph.output) == [["batch", 4, "out_d2", "out_d3"]]
    entry = result.summary["dynamic_axes"]
    assert entry["axes"] == [2, 3] and entry["checked_inputs"] == [[4, 3, 32, 32]]
    # its upsampled half meets the skip at even sizes only: the odd size is the model's own refusal, and said so
    assert entry["also_checked"] == [] and entry["odd_size_refused_by_model"] == [[2, 3, 33, 35]]
    assert entry["code_mismatch"] <= 1e-3
    for hw in ((24, 40), (34, 18), (64, 64)):  # sizes the compile did not check, the stride-2 conv's too
        got, sim, ref = _run_at(path, result, model, torch.randn(2, 3, *hw))
        assert got.shape == ref.shape == (2, 4) + hw
        assert _sqnr(sim, got) > 40.0, hw  # code flips at thresholds only
        assert _sqnr(ref, got) > (25.0 if bits == 8 else 5.0), hw


def test_default_file_keeps_the_example_sizes(tmp_path):
    model = FullyConv().eval()
    x = torch.randn(8, 3, 16, 16)
    result = qcompile.compile(model, x[:1], calib=x, output=str(tmp_path / "f.onnx"), scheme="uniform", bits=8)
    assert _dims(onnx.load(tmp_path / "f.onnx").graph.input) == [["batch", 3, 16, 16]]
    assert "dynamic_axes" not in result.summary


@pytest.mark.parametrize("scheme", ["uniform", "fp32"])
def test_classifier_output_stays_fixed(tmp_path, scheme):
    model = Classifier().eval()
    x = torch.randn(16, 3, 16, 16)
    path = str(tmp_path / "c.onnx")
    result = qcompile.compile(model, x[:1], calib=x, output=path, scheme=scheme, bits=8, dynamic_axes="2,3")
    saved = onnx.load(path)
    assert _dims(saved.graph.input) == [["batch", 3, "d2", "d3"]]
    assert _dims(saved.graph.output) == [["batch", 10]]
    got, sim, ref = _run_at(path, result, model, torch.randn(3, 3, 40, 24))
    assert got.shape == (3, 10)
    assert _sqnr(sim, got) > (100.0 if scheme == "fp32" else 40.0)


class FoldsTheBatch(nn.Module):
    """``view(-1, 256)``: at twice the height and width the batch axis takes four times the rows."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(256, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(-1, 256))


def test_an_output_of_another_shape_at_the_new_size_is_a_one_line_refusal(tmp_path):
    # the file's output had shape [160] where the model's was [16, 10]: the comparison with the float model raised
    # "operands could not be broadcast together" (an internal error, rc 3)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "v.onnx"
    with pytest.raises(qcompile.UserError, match=r"--dynamic-axes .*output 0: the file's shape \[160\], the float "
                                                  r"model's \[16, 10\]"):
        qcompile.compile(FoldsTheBatch().eval(), x[:1], calib=x, output=str(path), scheme="uniform", bits=8,
                         dynamic_axes=(2, 3))
    assert not path.exists()


def test_size_arithmetic_in_forward_follows_the_input(tmp_path):
    model = SizeArithmetic().eval()
    x = torch.randn(16, 3, 16, 16)
    path = str(tmp_path / "s.onnx")
    result = qcompile.compile(model, x[:1], calib=x, output=path, scheme="uniform", bits=8, dynamic_axes=(2, 3))
    got, sim, ref = _run_at(path, result, model, torch.randn(2, 3, 40, 24))
    assert _sqnr(ref, got) > 30.0  # divided by the new size, not the example's


def test_sequence_axis_of_conv1d_and_token_ids(tmp_path):
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.conv = nn.Conv1d(16, 16, 3, padding=1)
            self.fc = nn.Linear(16, 4)

        def forward(self, ids):
            return self.fc(torch.relu(self.conv(self.emb(ids).transpose(1, 2))).amax(2))

    model = Tokens().eval()
    ids = torch.randint(0, 50, (16, 12))
    path = str(tmp_path / "t.onnx")
    result = qcompile.compile(model, ids[:1], calib=ids, output=path, scheme="apot", bits=4, dynamic_axes=1,
                              keep_first_last="quant")
    assert _dims(onnx.load(path).graph.input) == [["batch", "d1"]]
    for length in (5, 31):
        got, sim, _ = _run_at(path, result, model, torch.randint(0, 50, (3, length)))
        assert got.shape == (3, 4)
        assert _sqnr(sim, got) > 40.0


@pytest.mark.parametrize("model,needle", [
    (FixedReshape(), "the model itself does not run at twice the example's size"),
    # AdaptiveAvgPool2d(4) becomes a pool of the example's feature map: named before anything runs
    (Classifier(pool=4), "the file computes the adaptive pool(s) pool (adaptive pool) as pools over the example's"),
])
def test_graph_that_fixes_a_size_is_refused_without_a_file(tmp_path, model, needle):
    x = torch.randn(8, 3, 16, 16)
    path = tmp_path / "bad.onnx"
    with pytest.raises(UserError) as info:
        qcompile.compile(model.eval(), x[:1], calib=x, output=str(path), scheme="uniform", bits=8,
                         dynamic_axes=(2, 3))
    assert needle in str(info.value) and "--dynamic-axes 2,3" in str(info.value)
    assert "\n" not in str(info.value)
    assert not path.exists()


def test_option_values():
    assert parse_dynamic_axes("3, 2") == parse_dynamic_axes("2 3") == (2, 3)
    assert parse_dynamic_axes([2, 2]) == (2,)
    assert parse_dynamic_axes(np.int64(1)) == (1,)
    assert parse_dynamic_axes(None) == parse_dynamic_axes("") == ()
    for bad, needle in ((0, "axis 0 is the batch"), ("-1", "negative"), ("h", "whole-number"), (2.5, "whole-number"),
                        ({"input": 2}, "takes input axes")):
        with pytest.raises(UserError, match=needle):
            parse_dynamic_axes(bad)
    with pytest.raises(UserError, match="past the last axis"):
        qcompile.compile(Classifier().eval(), torch.randn(1, 3, 8, 8), scheme="uniform", bits=8, dynamic_axes=4)


CLI_MODULE = "qc_dynamic_models"


@pytest.fixture
def cli_module(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / f"{CLI_MODULE}.py").write_text(textwrap.dedent("""
        import torch
        import torch.nn as nn

        def fully_conv():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()

        def flat_head():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    """))
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    sys.modules.pop(CLI_MODULE, None)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    yield tmp_path
    sys.modules.pop(CLI_MODULE, None)


def test_cli(cli_module, capsys):
    rc = main([f"{CLI_MODULE}:fully_conv", "--calib", "calib.npy", "--scheme", "uniform", "--bits", "8",
               "--dynamic-axes", "2,3", "-o", "fc.onnx"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "dynamic axes 2,3: checked at inputs 4x3x16x16 (twice the example's size)" in out
    assert _dims(onnx.load(cli_module / "fc.onnx").graph.output) == [["batch", 2, "d2", "d3"]]

    rc = main([f"{CLI_MODULE}:flat_head", "--calib", "calib.npy", "--scheme", "uniform", "--bits", "8",
               "--dynamic-axes", "2,3", "-o", "bad.onnx"])
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]  # after the calibration's progress line
    assert rc == 2 and last.startswith("qcompile: error: --dynamic-axes 2,3: the model itself") and \
        "Traceback" not in err, err
    assert not (cli_module / "bad.onnx").exists()

    rc = main([f"{CLI_MODULE}:fully_conv", "--calib", "calib.npy", "--dynamic-axes", "0", "-o", "z.onnx"])
    out, err = capsys.readouterr()
    assert rc == 2 and "axis 0 is the batch" in err and not (cli_module / "z.onnx").exists()


def test_two_inputs_and_a_qat_trained_model(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.h = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

        def forward(self, x, mask):
            return self.h(torch.relu(self.a(x) + self.b(mask)))

    model = Two().eval()
    x, mask = torch.randn(16, 3, 16, 16), torch.randn(16, 1, 16, 16)
    path = str(tmp_path / "two.onnx")
    result = qcompile.compile(model, (x[:1], mask[:1]), calib=(x, mask), output=path, scheme="uniform", bits=8,
                              dynamic_axes=(2, 3))
    saved = onnx.load(path)
    assert _dims(saved.graph.input) == [["batch", 3, "x_d2", "x_d3"], ["batch", 1, "mask_d2", "mask_d3"]]
    sess = _session(path)
    xp, mp = torch.randn(2, 3, 20, 30), torch.randn(2, 1, 20, 30)
    got = sess.run(None, {"x": xp.numpy(), "mask": mp.numpy()})[0]
    with torch.no_grad():
        assert _sqnr(result.model(xp, mp).numpy(), got) > 40.0

    # a model trained with qcompile.qat: dynamic_axes is a form of the file, not an option its training fixed
    from qcompile import qat

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    trained = qat.prepare(net, x[:1], scheme="apot", bits=4, calib=x)
    trained.eval()
    path = str(tmp_path / "qat.onnx")
    result = qcompile.compile(trained, x[:1], calib=x, output=path, dynamic_axes=(2, 3))
    assert result.summary["dynamic_axes"]["outputs"] == {"output": ["batch", 2, "d2", "d3"]}
    got, sim, _ = _run_at(path, result, result.model, torch.randn(2, 3, 24, 40))
    assert got.shape == (2, 2, 24, 40) and _sqnr(sim, got) > 40.0
    # and through qat.export, which took no dynamic_axes (a TypeError)
    exported = qat.export(trained, x[:1], output=str(tmp_path / "qat2.onnx"), validation_inputs=x,
                          dynamic_axes=(2, 3))
    assert exported.report.passed and exported.summary["dynamic_axes"]["outputs"] == {"output": ["batch", 2, "d2", "d3"]}
    assert onnx.load(str(tmp_path / "qat2.onnx")).graph == onnx.load(path).graph  # the metadata names the data
    # a trained model that takes one size only (a Linear after the flatten): the model's limit, not "where the
    # model itself runs, a size read in forward" (the float model fails there the same way)
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 2)).eval()
    trained = qat.prepare(fixed, x[:1], scheme="apot", bits=4, calib=x)
    with pytest.raises(UserError, match=r"the trained graph does not run at twice the example's size on those axes "
                       r".*the model itself takes only that size") as err:
        qat.export(trained, x[:1], output=str(tmp_path / "fixed.onnx"), dynamic_axes=(2, 3))
    assert "\n" not in str(err.value) and not (tmp_path / "fixed.onnx").exists()


def test_validate_a_dynamic_file_on_inputs_of_another_size(cli_module, capsys):
    """qcompile validate rebuilt the simulation at the --data size and refused --calib of the compile's size: a
    dynamic file could only be validated where it was compiled. The rebuild is now traced at --calib's size, and
    --data may differ from it on the file's dynamic axes (only there)."""
    rng = np.random.default_rng(2)
    np.save(cli_module / "big.npy", rng.standard_normal((3, 3, 20, 12)).astype(np.float32))
    rc = main([f"{CLI_MODULE}:fully_conv", "--calib", "calib.npy", "--scheme", "apot", "--bits", "4",
               "--keep-first-last", "quant", "--dynamic-axes", "2,3", "-o", "d.onnx"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    rc = main(["validate", "d.onnx", "--against", f"{CLI_MODULE}:fully_conv", "--calib", "calib.npy",
               "--data", "big.npy"])
    out, err = capsys.readouterr()
    assert rc == 0 and "validation on 3 inputs" in out and "PASS" in out, (out, err)
    rc = main([f"{CLI_MODULE}:fully_conv", "--calib", "calib.npy", "--scheme", "uniform", "--bits", "8",
               "-o", "f.onnx"])
    assert rc == 0
    capsys.readouterr()
    rc = main(["validate", "f.onnx", "--against", f"{CLI_MODULE}:fully_conv", "--calib", "calib.npy",
               "--data", "big.npy"])
    out, err = capsys.readouterr()
    assert rc == 2 and "takes input 'input' of shape (batch, 3, 8, 8)" in err, err


class SamePadding(nn.Module):
    """TensorFlow's 'same' padding as timm's Conv2dSame computes it: from the input's size, with math.ceil, which
    torch.fx cannot trace on a size, so the trace takes the example's sizes (the pads of an even size)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        import math

        ih, iw = x.shape[-2:]
        ph = max((math.ceil(ih / 2) - 1) * 2 + 3 - ih, 0)
        pw = max((math.ceil(iw / 2) - 1) * 2 + 3 - iw, 0)
        x = nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return self.head(torch.relu(self.conv(x)))


def test_output_sizes_and_padding_at_an_odd_size(tmp_path):
    """Three cases a fresh-eyes test found: a stride-2 output's width (32 -> 64 at the probe, the input height's
    sizes) was named d2, the input's height; an output of size 1 at the example and at twice its size (a stride-64
    level) was declared a fixed 1 though it grows at 65; and 'same' padding computed from the input's size passed
    the check at twice the size (even, the same pads) and computed other values at odd sizes. The compile now also
    runs the model and the traced float graph at an odd size (twice plus one)."""
    x = torch.randn(8, 3, 32, 64)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    path = str(tmp_path / "s2.onnx")
    result = qcompile.compile(model, x[:1], calib=x, output=path, scheme="uniform", bits=8, dynamic_axes=(2, 3))
    assert _dims(onnx.load(path).graph.output) == [["batch", 4, "out_d2", "out_d3"]]
    assert result.summary["dynamic_axes"]["also_checked"] == [[[2, 3, 65, 131]]]  # odd, unequal: 2x+1, 2x+3

    x = torch.randn(8, 3, 32, 32)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(1, stride=32)).eval()
    path = str(tmp_path / "p.onnx")
    result = qcompile.compile(model, x[:1], calib=x, output=path, scheme="uniform", bits=8, dynamic_axes=(2, 3))
    assert _dims(onnx.load(path).graph.output) == [["batch", 8, "out_d2", "out_d3"]]
    got, sim, ref = _run_at(path, result, model, torch.randn(1, 3, 128, 96))
    assert got.shape == ref.shape == (1, 8, 2, 2)

    path = tmp_path / "same.onnx"
    with pytest.raises(UserError, match="the model computes with its input's sizes in Python"):
        qcompile.compile(SamePadding().eval(), x[:1], calib=x, output=str(path), scheme="uniform", bits=8,
                         dynamic_axes=(2, 3))
    assert not path.exists()
    # without dynamic axes the same model compiles, fixed to the example's size
    qcompile.compile(SamePadding().eval(), x[:1], calib=x, output=str(path), scheme="uniform", bits=8)
    assert path.exists()


def test_validate_cli_messages_for_dynamic_files(cli_module, capsys):
    """Found by a fresh-eyes test: validate without --data drew random inputs of size 1 on a dynamic file's free
    axes (the float model refused them, or a PASS on 1x1 images), and --calib given alone was called --data in the
    mismatch message."""
    rc = main([f"{CLI_MODULE}:fully_conv", "--calib", "calib.npy", "--scheme", "uniform", "--bits", "8",
               "--dynamic-axes", "2 3", "-o", "d.onnx"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    rc = main(["validate", "d.onnx", "--against", f"{CLI_MODULE}:fully_conv"])
    out, err = capsys.readouterr()
    assert rc == 2 and "takes inputs of any size on axes 2,3" in err and "--input-shape" in err, err
    np.save(cli_module / "other.npy", np.random.default_rng(5).standard_normal((8, 3, 8, 8)).astype(np.float32))
    rc = main(["validate", "d.onnx", "--against", f"{CLI_MODULE}:fully_conv", "--calib", "other.npy"])
    out, err = capsys.readouterr()
    assert rc == 2 and "--calib is not the calibration data" in err, err


def test_validation_inputs_of_another_size(tmp_path):
    """compile(validation_inputs=...) of a dynamic compile refused held-out inputs of another size on its dynamic
    axes, which qcompile validate took; other axes must still agree."""
    model = FullyConv().eval()
    x = torch.randn(16, 3, 16, 16)
    result = qcompile.compile(model, x[:1], calib=x, validation_inputs=torch.randn(3, 3, 24, 20), scheme="uniform",
                              bits=8, dynamic_axes=(2, 3))
    assert result.report.passed and "validation on 3 inputs" in result.report.summary()
    with pytest.raises(UserError, match="samples of shape"):
        qcompile.compile(model, x[:1], calib=x, validation_inputs=torch.randn(3, 3, 24, 20), scheme="uniform",
                         bits=8)


def test_adaptive_pools_and_transposed_outputs(tmp_path):
    """A second fresh-eyes round: an adaptive pool to 2x2 (upsampled back) was accepted and its file was 8-13 dB
    from the model at every other size (the passes wrote a pool of the example's feature map, and the file equalled
    that simulation); a global max pool was refused as a 'reshape'; a transposed output was declared with the input's
    height and width swapped. Pools are named now, and output dims take an input's name only where the checked sizes
    tell them apart."""
    x = torch.randn(8, 3, 16, 16)

    class PoolUp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.c(x))
            return y + nn.functional.interpolate(nn.functional.adaptive_avg_pool2d(y, 2), size=y.shape[-2:])

    for model, needle in ((PoolUp(), "adaptive_avg_pool2d(2)"),
                          (nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
                           "1 (AdaptiveMaxPool2d)")):
        path = tmp_path / "p.onnx"
        with pytest.raises(UserError, match=r"the file computes the adaptive pool\(s\) "):
            qcompile.compile(model.eval(), x[:1], calib=x, output=str(path), scheme="uniform", bits=8,
                             dynamic_axes=(2, 3))
        try:
            qcompile.compile(model.eval(), x[:1], calib=x, scheme="uniform", bits=8, dynamic_axes=(2, 3))
        except UserError as exc:
            assert needle in str(exc), str(exc)
        assert not path.exists()

    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.c(x).transpose(2, 3)

    model = Transposed().eval()
    path = str(tmp_path / "t.onnx")
    result = qcompile.compile(model, x[:1], calib=x, output=path, scheme="uniform", bits=8, dynamic_axes=(2, 3))
    assert _dims(onnx.load(path).graph.output) == [["batch", 4, "out_d2", "out_d3"]]
    got, sim, ref = _run_at(path, result, model, torch.randn(1, 3, 33, 47))
    assert got.shape == ref.shape == (1, 4, 47, 33) and _sqnr(sim, got) > 40.0


def test_chunks_iterated_trace_with_their_sizes_free_and_size_only_ops_are_named(tmp_path):
    """A third fresh-eyes round: YOLOv8's C2f (``list(x.chunk(2, 1))``, appended to) needs the sized trace, which
    answered every size from the example, and --dynamic-axes refused it as "computes with its input's sizes in
    Python" though it reads none; the sized trace now keeps the sizes of the dynamic axes traced, so only the chunk
    count is answered (a Python branch on the width is still refused). A pixel unshuffle (torch.onnx: reshapes to the
    example's sizes) and a 3-D adaptive pool to more than 1 failed in onnxruntime with misleading words; both are
    named before anything runs now."""
    class C2f(nn.Module):
        def __init__(self):
            super().__init__()
            self.cv1, self.m, self.cv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(12, 4, 1)

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            y.append(self.m(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.c(x)
            return y * 2 if x.shape[-1] > 40 else y

    x = torch.randn(8, 3, 16, 16)
    model = C2f().eval()
    path = str(tmp_path / "c2f.onnx")
    result = qcompile.compile(model, x[:1], calib=x, output=path, scheme="uniform", bits=8, dynamic_axes=(2, 3))
    assert result.report.passed
    got, sim, ref = _run_at(path, result, model, torch.randn(2, 3, 40, 24))
    assert got.shape == ref.shape == (2, 4, 40, 24) and _sqnr(sim, got) > 40.0 and _sqnr(ref, got) > 25.0
    with pytest.raises(UserError, match="the model computes with its input's sizes in Python"):
        qcompile.compile(Branch().eval(), x[:1], calib=x, scheme="uniform", bits=8, dynamic_axes=(2, 3))

    unshuffle = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, 4, 3, padding=1)).eval()
    pool3d = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.AdaptiveAvgPool3d((1, 2, 2)), nn.Flatten(),
                           nn.Linear(16, 3)).eval()
    x3 = torch.randn(8, 2, 8, 8, 8)
    for model, data, axes, needle in ((unshuffle, x, (2, 3), "torch.onnx writes the pixel unshuffle 0 as reshapes"),
                                      (pool3d, x3, (2, 3, 4), "the file computes the adaptive pool(s) 1 "
                                                              "(AdaptiveAvgPool3d)")):
        for scheme in ("fp32", "uniform"):
            path = tmp_path / "no.onnx"
            with pytest.raises(UserError) as info:
                qcompile.compile(model, data[:1], calib=data, output=str(path), scheme=scheme, bits=8,
                                 dynamic_axes=axes)
            assert needle in str(info.value) and "\n" not in str(info.value)
            assert not path.exists()


def test_python_math_on_a_size_is_named_when_the_file_fixes_it(tmp_path):
    """math.sqrt(x.shape[1]) stays traced in the graph, but torch.onnx writes the example's result as a constant: the
    failure said only "some operation fixed a size"; it names math.sqrt and the operator form that follows the
    size, which compiles."""
    import math

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 8)

        def forward(self, x):
            return self.fc(x).sum(1) / math.sqrt(x.shape[1])

    class Operator(Scaled):
        def forward(self, x):
            return self.fc(x).sum(1) / x.shape[1] ** 0.5

    x = torch.randn(8, 12, 16)
    path = tmp_path / "s.onnx"
    with pytest.raises(UserError, match=r"torch.onnx writes math.sqrt of a size as the example's constant; compute it "
                                        r"with tensor operators \(x.shape\[1\] \*\* 0.5"):
        qcompile.compile(Scaled().eval(), x[:1], calib=x, output=str(path), scheme="uniform", bits=8,
                         dynamic_axes=(1,))
    assert not path.exists()
    result = qcompile.compile(Operator().eval(), x[:1], calib=x, output=str(path), scheme="uniform", bits=8,
                              dynamic_axes=(1,))
    assert result.report.passed and path.exists()


def test_the_refusal_of_sizes_read_in_python_names_the_module():
    """The refusal said the model branches on x.shape; where a library module does it (nn.MultiheadAttention's
    check of an attn_mask's shape) the user's own code has no such branch. It now names the module."""
    class Sub(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if x.shape[1] > 5:
                x = x * 2
            return self.fc(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = Sub(), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.block(x)).mean(1))

    x = torch.randn(16, 10, 8)
    with pytest.raises(UserError, match=r"computes with its input's sizes in Python \(.*, in block \(Sub\)\)"):
        qcompile.compile(Net().eval(), x[:1], calib=x, scheme="uniform", bits=8, dynamic_axes=(1,))
