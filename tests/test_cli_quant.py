"""The quantizing command line end to end on the digits CNN (a state dict saved to a temporary folder, loaded with
``--arch qcompile.models.digits:digits_cnn``, calibrated on 32 training images): ``.npy`` and ``.npz`` calibration
files, bad calibration inputs (exit 2, one line), ``--emit custom``, mixed weight/activation schemes, the graph
switches reaching the pipeline, and ``qcompile validate`` rebuilding the simulation of a quantized file."""
from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import onnx
import pytest
import torch

from qcompile.cli import main
from qcompile.models import digits

ARCH = ("--arch", digits.SPEC)
LAYERS = ("conv1", "conv2", "conv3", "down", "fc1", "fc2")


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def layer_table(stdout: str) -> dict[str, str]:
    """``{layer: decision}`` from the ``layers:`` block of the summary."""
    lines = stdout.splitlines()
    start = lines.index("layers:") + 1
    table = {}
    for line in lines[start:]:
        parts = line.split(None, 2)
        if not line.startswith("  ") or len(parts) < 3 or parts[0] not in LAYERS:
            break
        table[parts[0]] = parts[2]
    return table


def assert_one_line_error(rc: int, out: str, err: str, *words: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_quant")
    torch.save(digits.pretrained().state_dict(), folder / "digits.pt")
    calib = digits.load_split()[0][:32].numpy()
    np.save(folder / "calib.npy", calib)
    return folder, calib


@pytest.fixture(scope="module")
def apot4(work):
    folder, _ = work
    out = folder / "apot4.onnx"
    rc, stdout, stderr = cli(folder / "digits.pt", *ARCH, "--scheme", "apot", "--bits", "4",
                             "--calib", folder / "calib.npy", "-o", out)
    return rc, stdout, stderr, out


def test_compile_apot4_end_to_end(apot4):
    rc, stdout, stderr, out = apot4
    assert rc == 0, stderr
    assert out.exists()
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    table = layer_table(stdout)
    assert set(table) == set(LAYERS)
    assert table["conv1"].startswith("W8 uniform / A8 uniform") and table["fc2"].startswith("W8 uniform / A8 uniform")
    for name in ("conv2", "conv3", "down", "fc1"):
        assert table[name].startswith("W4 apot / A4 apot"), table
    summary = stdout.strip().splitlines()[-1]
    assert summary.startswith("validation on 32 inputs") and summary.endswith("PASS"), summary
    # what quantization costs against the float model, on the line before (validation compares file and simulation)
    vs_float = stdout.strip().splitlines()[-2]
    m = re.match(r"vs the float model: output SQNR ([0-9.]+) dB, top-1 agreement ([0-9.]+)%; lowest quantizer SQNR "
                 r"(?:act|out|res)_fq\d+ \((?:input|output) of [a-z0-9., ]+\) ([0-9.]+) dB", vs_float)
    assert m and 15 < float(m.group(1)) < 40 and float(m.group(2)) > 90, vs_float


def test_apot8_warns_that_its_levels_do_not_fit_the_int8_kernels(work, apot4):
    # APoT W8A8 (grid ±904 for weights, 0..3840 for activations) runs float layers with level lookups: slower than
    # the float model, which nothing said; APoT W4A4's grids fit and it says nothing
    folder, _ = work
    out = folder / "apot8.onnx"
    rc, stdout, stderr = cli(folder / "digits.pt", *ARCH, "--scheme", "apot", "--bits", "8",
                             "--calib", folder / "calib.npy", "-o", out)
    assert rc == 0 and out.exists(), stderr
    assert "qcompile: warning: apot 8-bit weights (grid -904..904) and apot 8-bit activations (grid 0..3840) do not " \
           "fit onnxruntime's int8 kernels" in stderr
    assert "int8 kernels" not in apot4[2]
    rc, stdout, stderr = cli("demo", "--scheme", "apot", "--bits", "8", "-o", folder / "demo8.onnx")
    assert rc == 0 and "qcompile: warning: apot 8-bit weights" in stderr  # the demo said nothing
    summary = folder / "apot8.json"
    rc, _, stderr = cli(folder / "digits.pt", *ARCH, "--scheme", "apot", "--bits", "8", "--calib",
                        folder / "calib.npy", "-o", out, "--json", summary)
    assert rc == 0 and "int8 kernels" in json.loads(summary.read_text())["warnings"][0]


def test_the_cli_says_where_uniform_activation_levels_would_fit_far_better(work):
    """compile() warned that conv2's APoT-6 input levels fit 6.4 dB worse than uniform ones ("consider --ascheme
    uniform"), but the CLI silences QuantizationWarnings and printed only the int8-grid note: the hint was lost."""
    folder, _ = work
    summary = folder / "apot6.json"
    rc, _, stderr = cli(folder / "digits.pt", *ARCH, "--scheme", "apot", "--bits", "6", "--calib",
                        folder / "calib.npy", "-o", folder / "apot6.onnx", "--json", summary)
    assert rc == 0, stderr
    line = next((line for line in stderr.splitlines() if "consider --ascheme uniform" in line), "")
    assert line.startswith("qcompile: warning: the input of layer 'conv2'") and "dB worse than uniform" in line
    assert any("consider --ascheme uniform" in w for w in json.loads(summary.read_text())["warnings"])


def test_npz_with_x_key_and_custom_emission(work):
    folder, calib = work
    npz = folder / "calib_x.npz"
    np.savez(npz, x=calib, y=np.zeros(len(calib), dtype=np.int64))  # labels beside the inputs are ignored
    out = folder / "custom.onnx"
    rc, stdout, stderr = cli(folder / "digits.pt", *ARCH, "--calib", npz, "--emit", "custom", "-o", out)
    assert rc == 0, stderr
    model = onnx.load(str(out))
    assert any(n.domain == "qcompile" for n in model.graph.node)
    assert {f.domain for f in model.functions} == {"qcompile"}
    assert stdout.strip().endswith("PASS")


def test_npz_with_two_arrays_and_no_x_is_a_one_line_error(work):
    folder, calib = work
    npz = folder / "ambiguous.npz"
    np.savez(npz, inputs=calib, masks=calib)  # two arrays, neither of them labels (beside labels: the inputs)
    out = folder / "never.onnx"
    rc, stdout, stderr = cli(folder / "digits.pt", *ARCH, "--calib", npz, "-o", out)
    assert_one_line_error(rc, stdout, stderr, "'x'", "ambiguous.npz")
    assert not out.exists()


def test_npz_holding_an_object_array_is_named_as_one(work):
    """Its zip header is no pickle's, and it was "not an .npy/.npz file (text, or another format)"; the .npy of the
    same array says it holds Python objects."""
    folder, _ = work
    npz = folder / "objects.npz"
    np.savez(npz, x=np.array([object(), 1], dtype=object))
    out = folder / "never.onnx"
    rc, stdout, stderr = cli(folder / "digits.pt", *ARCH, "--calib", npz, "-o", out)
    assert_one_line_error(rc, stdout, stderr, "objects.npz", "holds Python objects (an object array)")
    assert not out.exists()


def test_unknown_calib_method_is_a_one_line_error(work):
    folder, _ = work
    out = folder / "never.onnx"
    rc, stdout, stderr = cli(folder / "digits.pt", *ARCH, "--calib", folder / "calib.npy",
                             "--calib-method", "median", "-o", out)
    assert_one_line_error(rc, stdout, stderr, "--calib-method", "median", "mse")
    assert not out.exists()


def test_unsupported_activation_levels_are_a_one_line_error(work):
    folder, _ = work
    out = folder / "never.onnx"
    rc, stdout, stderr = cli(folder / "digits.pt", *ARCH, "--calib", folder / "calib.npy", "--scheme", "ternary",
                             "-o", out)
    assert_one_line_error(rc, stdout, stderr, "ternary", "--ascheme")
    assert not out.exists()


def test_mixed_weight_and_activation_schemes(work):
    folder, _ = work
    out = folder / "w4a8.onnx"
    rc, stdout, stderr = cli(folder / "digits.pt", *ARCH, "--calib", folder / "calib.npy", "--wscheme", "apot",
                             "--ascheme", "uniform", "--wbits", "4", "--abits", "8", "-o", out)
    assert rc == 0, stderr
    assert "W4 apot / A8 uniform" in stdout.splitlines()[0]
    table = layer_table(stdout)
    for name in ("conv2", "conv3", "down", "fc1"):
        assert table[name].startswith("W4 apot / A8 uniform"), table
    assert stdout.strip().endswith("PASS")


def test_graph_switches_reach_the_pipeline(work):
    folder, _ = work
    out = folder / "switches.onnx"
    rc, stdout, stderr = cli(folder / "digits.pt", *ARCH, "--calib", folder / "calib.npy", "--no-fold-bn",
                             "--no-equalize", "--keep-first-last", "fp32", "--exclude", "conv2*", "-o", out)
    assert rc == 0, stderr
    assert "FoldBatchNorm" not in stdout and "EqualizeWeights" not in stdout  # the passes did not run
    table = layer_table(stdout)
    assert table["conv1"] == "float (first layer)"
    assert table["fc2"] == "float (last layer)"
    assert table["conv2"] == "float (--exclude 'conv2*')"
    for name in ("conv3", "down", "fc1"):
        assert table[name].startswith("W4 apot / A4 apot"), table
    # BatchNorms were not folded: they are still in the file, the float layers stay float Conv/Gemm
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "BatchNormalization" in ops
    assert stdout.strip().endswith("PASS")


def test_validate_rebuilds_the_simulation_of_a_quantized_file(work, apot4):
    folder, _ = work
    rc, _, stderr, out = apot4
    assert rc == 0, stderr
    rc, stdout, stderr = cli("validate", out, "--against", folder / "digits.pt", *ARCH,
                             "--data", folder / "calib.npy")
    assert rc == 0, stderr
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("validation on 32 inputs") and line.endswith("PASS"), line
    assert "max abs err 0," in line  # the rebuilt simulation is the one the file was made from


def test_a_file_from_qcompile_0_2_is_validated_with_float_level_decisions(work, tmp_path):
    """qcompile 0.2 decided APoT levels in float everywhere, and its files do not record ``int8_levels``: validate
    rebuilds that simulation for them. The same file claiming to be 0.3 (levels decided on int8 accumulators) would
    fail, so the recorded version is what decides."""
    folder, _ = work
    path = tmp_path / "old.onnx"
    rc, _, stderr = cli(folder / "digits.pt", *ARCH, "--calib", folder / "calib.npy", "--scheme", "apot", "--bits", "4",
                        "--float-levels", "--no-validate", "-o", path)
    assert rc == 0, stderr
    model = onnx.load(str(path))
    # 0.3 places its quantizers otherwise (one fewer here): refused in one line, exit 2, naming the version
    for version, expect in (("0.2.0", 0), ("0.3.0", 2)):
        for prop in model.metadata_props:
            if prop.key == "qcompile.options":
                record = json.loads(prop.value)
                record.pop("int8_levels", None)
                record["qcompile"] = version
                prop.value = json.dumps(record, separators=(",", ":"))
        onnx.save(model, str(tmp_path / f"as_{version}.onnx"))
        rc, stdout, stderr = cli("validate", tmp_path / f"as_{version}.onnx", "--against", folder / "digits.pt", *ARCH,
                                 "--data", folder / "calib.npy")
        assert rc == expect, (version, stdout, stderr)
        assert expect == 0 or "was written by qcompile 0.3.0" in stderr


def test_symmetric_levels_switch_keeps_signed_apot_activations_symmetric(tmp_path):
    """SiLU/Hardswish outputs: by default calibration may shift APoT activations onto asymmetric levels;
    ``--symmetric-levels`` keeps the symmetric set, and the file records the choice."""
    from tests.test_emit import _SiLUNet

    torch.save(_SiLUNet().state_dict(), tmp_path / "silu.pt")
    np.save(tmp_path / "calib.npy", torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2)).numpy())
    files = {}
    for name, extra in (("asym", ()), ("sym", ("--symmetric-levels",))):
        files[name] = tmp_path / f"{name}.onnx"
        rc, stdout, stderr = cli(tmp_path / "silu.pt", "--arch", "tests.test_emit:_SiLUNet", "--input-shape", "1,1,8,8",
                                 "--calib", tmp_path / "calib.npy", "-o", files[name], *extra)
        assert rc == 0, stderr
        assert stdout.strip().endswith("PASS"), stdout
    meta = {name: {p.key: p.value for p in onnx.load(str(path)).metadata_props} for name, path in files.items()}
    assert '"asym_levels":false' in meta["sym"]["qcompile.options"]
    assert "asym_levels" not in meta["asym"]["qcompile.options"]

    def level_tables(path):  # the activation lookup tables of the APoT quantizers, as grid integers
        model = onnx.load(str(path))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        readers = {}
        for n in model.graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n)
        tables = []
        for n in model.graph.node:
            if n.op_type != "GatherElements" or n.input[0] not in inits:
                continue
            out = n.output[0]
            while readers[out][0].op_type in ("Reshape", "Transpose"):
                out = readers[out][0].output[0]
            dq = readers[out][0]  # DequantizeLinear(codes, unit[, zero point]): codes = grid + zero point
            zp = int(inits[dq.input[2]]) if len(dq.input) > 2 else 0
            tables.append(inits[n.input[0]].astype(np.int64) - zp)
        return tables

    # symmetric 4-bit APoT: grid -10..10 in every table; asymmetric: some table reaches far above 10
    sym_tables = level_tables(files["sym"])
    assert sym_tables and all(t.min() == -10 and t.max() == 10 for t in sym_tables)
    assert any(t.max() > 10 and t.min() > -10 for t in level_tables(files["asym"]))


def test_a_handful_of_calibration_samples_is_warned_about(work, tmp_path):
    """One calibration image was taken without a word (a trained depthwise CNN: 98.5 % where 128 images give
    99.1 %): ranges fitted on a few samples clip what other inputs reach. The CLI and the API say so under 8."""
    import warnings as warnings_

    import qcompile
    from qcompile.errors import QuantizationWarning

    folder, calib = work
    np.save(tmp_path / "one.npy", calib[:1])
    rc, stdout, stderr = cli(folder / "digits.pt", *ARCH, "--calib", tmp_path / "one.npy", "--scheme", "apot",
                             "--bits", "4", "-o", tmp_path / "o.onnx")
    assert rc == 0 and "PASS" in stdout
    assert "qcompile: warning: the calibration data holds 1 sample:" in stderr, stderr
    # the loss against float names where it enters too: the quantizer whose own output is furthest from its input
    assert re.search(r"lowest own SQNR \(its rounding and clipping alone\) \S+ \(.*\) [\d.]+ dB", stdout), stdout
    with pytest.warns(QuantizationWarning, match="the calibration data holds 7 samples"):
        qcompile.compile(digits.pretrained(), calib=torch.from_numpy(calib[:7]), scheme="uniform", bits=8,
                         validate=False)
    with warnings_.catch_warnings():  # 8 samples, or no quantization: nothing to say
        warnings_.simplefilter("error", QuantizationWarning)
        qcompile.compile(digits.pretrained(), calib=torch.from_numpy(calib[:8]), scheme="uniform", bits=8,
                         validate=False)
        qcompile.compile(digits.pretrained(), calib=torch.from_numpy(calib[:1]), scheme="fp32", validate=False)


def test_a_calibration_outlier_that_wrecks_the_model_is_warned_about(work, tmp_path):
    """One calibration image x100 among 32 set the ranges: the file predicted at chance (10% of held-out digits),
    validation passed (the file computes its simulation) and nothing said so. The compile now warns when the
    quantized model agrees with the float one on under half of the validation inputs."""
    import warnings as warnings_

    import qcompile
    from qcompile.errors import QuantizationWarning

    folder, calib = work
    bad = calib.copy()
    bad[0] *= 100
    np.save(tmp_path / "outlier.npy", bad)
    rc, stdout, stderr = cli(folder / "digits.pt", *ARCH, "--calib", tmp_path / "outlier.npy", "--scheme", "apot",
                             "--bits", "4", "-o", tmp_path / "o.onnx")
    assert rc == 0 and "PASS" in stdout
    assert "qcompile: warning: the quantized model predicts as the float model on only" in stderr, stderr
    assert "--calib-method percentile" in stderr
    assert re.search(r"the largest error enters at act_fq\d+ \(input of .*\), -?[\d.]+ dB on its own", stderr), stderr
    with pytest.warns(QuantizationWarning, match="predicts as the float model on only"):
        qcompile.compile(digits.pretrained(), torch.from_numpy(bad[:1]), calib=torch.from_numpy(bad), scheme="apot",
                         bits=4)
    with warnings_.catch_warnings():  # the good calibration set: no warning
        warnings_.simplefilter("error", QuantizationWarning)
        qcompile.compile(digits.pretrained(), torch.from_numpy(calib[:1]), calib=torch.from_numpy(calib),
                         scheme="apot", bits=4)


def test_a_binary_classifier_wrecked_by_its_calibration_method_is_warned_about():
    """Raw breast-cancer features (0.05 to 2500, in one per-tensor range) at W8A8: --calib-method laplace clips them
    (57 % top-1 agreement with the float model, where 50 % is chance: the old floor of 50 % said nothing); mse keeps
    99 %. The warning names the method."""
    import warnings as warnings_

    import torch.nn as nn
    import torch.nn.functional as F
    from sklearn.datasets import load_breast_cancer

    import qcompile
    from qcompile.errors import QuantizationWarning

    data = load_breast_cancer()
    x, y = torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x[::2]), y[::2]).backward()
        opt.step()
    model.eval()
    calib, held_out = x[::2][:64], x[1::2]
    with pytest.warns(QuantizationWarning, match=r"predicts as the float model on only \d.*--calib-method laplace fits"):
        result = qcompile.compile(model, calib[:1], calib=calib, validation_inputs=held_out, scheme="uniform", bits=8,
                                  calib_method="laplace")
    assert result.report.passed and result.report.extra["top1_classes"] == 2
    assert 0.5 < result.report.extra["top1_vs_float"] < 0.75
    with warnings_.catch_warnings():  # the default method: no warning
        warnings_.simplefilter("error", QuantizationWarning)
        result = qcompile.compile(model, calib[:1], calib=calib, validation_inputs=held_out, scheme="uniform", bits=8)
    assert result.report.extra["top1_vs_float"] > 0.95


def test_an_eight_bit_file_far_from_the_float_model_is_warned_about():
    """Where every quantizer has 6 bits or more, outputs under 15 dB from the float model's are said where a
    quantizer's own error is large (a range that clips; a regression output has no top-1); at 4 bits, at 20 dB, or
    with every quantizer fine on its own (the model amplifying small errors), they are not."""
    from qcompile.api import quality_warning
    from qcompile.qmodules import FakeQuantize
    from qcompile.runtime.validation import ValidationReport

    gm = torch.nn.Module()
    gm.wq, gm.aq = FakeQuantize("uniform", 8, signed=True, role="weight"), FakeQuantize("uniform", 8, signed=False)
    report = ValidationReport(samples=8, max_abs=0.0, sqnr_db=float("inf"), top1=None,
                              extra={"sqnr_vs_float_db": 8.0},
                              layers=[{"quantizer": "act_fq0", "own_sqnr_db": 13.6, "where": "input of fc1"},
                                      {"quantizer": "act_fq1", "own_sqnr_db": 40.0}])
    message = quality_warning(report, gm, "laplace")
    assert message.startswith("the quantized model's outputs are only 8.0 dB from the float model's although every "
                              "quantizer has 8 bits or more") and "--calib-method laplace" in message
    assert message.endswith("the largest error enters at act_fq0 (input of fc1), 13.6 dB on its own")
    assert quality_warning(ValidationReport(8, 0.0, 1.0, None, extra={"sqnr_vs_float_db": 20.0},
                                            layers=report.layers), gm) is None
    fine = [{"quantizer": "act_fq0", "own_sqnr_db": 47.6}]
    assert quality_warning(ValidationReport(8, 0.0, 1.0, None, extra={"sqnr_vs_float_db": 9.3}, layers=fine), gm) \
        is None
    gm.aq = FakeQuantize("uniform", 4, signed=False)
    assert quality_warning(report, gm) is None
    # at any bit-width, outputs whose error outweighs them (all-layer PoT W3A3 on raw breast-cancer features: -2.0 dB
    # with 79 % agreement on two classes, above the 75 % agreement floor, compiled without a word)
    noise = ValidationReport(8, 0.0, 1.0, None, extra={"sqnr_vs_float_db": -2.0}, layers=report.layers)
    message = quality_warning(noise, gm)
    assert message.startswith("the quantized model's outputs are -2.0 dB from the float model's: their error "
                              "outweighs the outputs themselves") and "act_fq0" in message
    assert quality_warning(ValidationReport(8, 0.0, 1.0, None, extra={"sqnr_vs_float_db": 2.0},
                                            layers=report.layers), gm) is None
    # of several outputs the worst may be a small one (an autoencoder's residual x - recon at -11 dB beside its
    # reconstruction at 36 dB, uniform W8A8): no word
    several = ValidationReport(8, 0.0, 1.0, None, extra={"sqnr_vs_float_db": -11.3, "sqnr_vs_float_output": 1},
                               layers=report.layers)
    assert quality_warning(several, gm) is None
