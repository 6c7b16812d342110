"""The ``qcompile`` command line: the three ways to name a model, ``--leaf-module``, ``validate``, ``demo``,
``--help``, and every bad input (one line on stderr starting ``qcompile: error:``, exit code 2, no traceback,
no output file).

Most cases run in-process through ``qcompile.cli.main``; two run the installed console script."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile.cli import main

MODULE = "qc_cli_models"
SPEC = f"{MODULE}:tiny_cnn"
SHAPE = "1,3,8,8"
MIN_SQNR_FP32 = 80.0  # relative error <= 1e-4
FP32_OUT = ("--input-shape", SHAPE, "--scheme", "fp32", "-o", "out.onnx")

MODULE_SOURCE = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class TinyCNN(nn.Module):
        def __init__(self, classes=4):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc = nn.Linear(24, classes)

        def forward(self, x):
            x = self.pool(torch.relu(self.bn(self.conv(x))))
            return self.fc(torch.flatten(x, 1))


    class Gate(nn.Module):
        def forward(self, x):
            if x.abs().sum() > 0:  # data-dependent: torch.fx cannot trace it
                return x * 2.0
            return x


    class GatedNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 6)
            self.gate = Gate()
            self.fc2 = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(self.gate(self.fc1(x)))


    class WideCNN(nn.Module):  # the input of TinyCNN, other layers
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.b(torch.relu(self.a(x))))
            return self.fc(x.mean((2, 3)))


    def tiny_cnn():
        return TinyCNN()


    def wide_cnn():
        return WideCNN()


    class FlaggedNet(TinyCNN):  # a Python flag after the input
        def forward(self, x, return_features=False):
            return super().forward(x)


    def flagged_net():
        return FlaggedNet()


    class SwappedNamesNet(nn.Module):  # inputs named as the numbered .npz convention, in another order
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x1, x0):
            return self.a(x1) + 0.1 * self.b(x0)


    def swapped_names_net():
        return SwappedNamesNet()


    class LossWhenLabelledNet(nn.Module):  # returns the loss when labels are given
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x, y=None):
            out = self.fc(x)
            return out if y is None else nn.functional.cross_entropy(out, y)


    def loss_when_labelled_net():
        return LossWhenLabelledNet()


    class AttributeNamedInputsNet(nn.Module):  # an input named as a submodule: the file names it input_0
        def __init__(self):
            super().__init__()
            self.fc, self.g = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, fc, weight):
            return self.fc(fc) + self.g(weight)


    def attribute_named_inputs_net():
        return AttributeNamedInputsNet()


    class TwoInputNet(nn.Module):  # an image and a feature vector
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.feat = nn.Linear(5, 6)
            self.fc = nn.Linear(6, 4)

        def forward(self, x, m):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)) + torch.relu(self.feat(m)))


    def two_input_net():
        return TwoInputNet()


    class KeywordGain(TinyCNN):
        def forward(self, x, *, gain):  # a required keyword-only input: nothing qcompile passes can fill it
            return super().forward(x) * gain


    def keyword_gain_net():
        return KeywordGain()


    class UnusedInput(TinyCNN):
        def forward(self, x, extra):  # extra is never read: torch.onnx and qcompile's export drop it
            return super().forward(x)


    def unused_input_net():
        return UnusedInput()


    class UnusedFirstInput(TinyCNN):
        def forward(self, extra, x):  # the file keeps input_1 only
            return super().forward(x)


    def unused_first_input_net():
        return UnusedFirstInput()


    def gated_net():
        return GatedNet()


    def tiny_cnn_3():
        return TinyCNN(classes=3)


    class BatchOfOne(nn.Module):  # forward flattens the whole batch: runs on one input only
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(256, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(1, -1))


    class OneChannel(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((-1, -2)))


    def one_channel():
        return OneChannel()


    def batch_of_one():
        return BatchOfOne()


    def tiny_mlp():  # 8 features
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


    def tiny_regressor():  # 8 features, one output value per sample: no class scores
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


    class ExitsOnBatches(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            if x.shape[0] > 1:
                raise SystemExit("batch too large")
            return self.fc(x)


    def exits_on_batches():
        return ExitsOnBatches()


    def bn_stack():  # every quantized activation after a BatchNorm: data-free calibration reaches them
        torch.manual_seed(3)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Flatten(), nn.Linear(512, 4))
        with torch.no_grad():  # running statistics of data (the initial ones describe nothing: refused)
            model.train()(torch.randn(16, 3, 8, 8))
        return model
''')


@pytest.fixture
def work(tmp_path, monkeypatch):
    """tmp_path as the current directory, with a model module and the model files the tests name."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the current directory on sys.path
    (tmp_path / f"{MODULE}.py").write_text(MODULE_SOURCE)
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    sys.modules.pop(MODULE, None)
    models = importlib.import_module(MODULE)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        trained = models.TinyCNN().eval()
        torch.save(trained.state_dict(), "weights.pt")
        torch.save(trained, "full.pt")
        torch.save(models.GatedNet().state_dict(), "wrong_keys.pt")
        torch.save(models.TinyCNN(classes=7).state_dict(), "wrong_shapes.pt")
        torch.save({"net": trained.state_dict(), "ema": trained.state_dict(), "epoch": 3}, "two_state_dicts.pt")
        torch.save(torch.randn(6, 3, 8, 8), "calib_torch.pt")
        torch.save([1, 2, 3], "calib_list.pt")
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32))
    np.save(tmp_path / "nochan.npy", np.random.default_rng(1).standard_normal((6, 8, 8)).astype(np.float32))
    np.save(tmp_path / "nhwc1.npy", np.random.default_rng(1).standard_normal((6, 8, 8, 1)).astype(np.float32))
    yield tmp_path
    sys.modules.pop(MODULE, None)


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, needle):
    assert rc == 2, err
    assert err.startswith("qcompile: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err  # one line
    assert "Traceback" not in err
    assert needle in err, err


def drop_weight_fingerprint(path: str) -> None:
    """Remove the file's record of the weights it was compiled from (as files before 0.7.1 have none), for the
    tests of what validate says when the --against model differs in other ways."""
    import onnx

    model = onnx.load(path)
    keep = [p for p in model.metadata_props if p.key != "qcompile.model"]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.save(model, path)


def onnx_files(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith((".onnx", ".tmp")))


def test_a_forward_that_calls_sys_exit_is_named(work, capsys):
    # qcompile's handler for argparse's exits took it: exit status 2 and no word (sys.exit(0): status 0, no file)
    np.save(work / "rows.npy", np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32))
    rc, out, err = cli(capsys, f"{MODULE}:exits_on_batches", "--calib", "rows.npy", "--scheme", "uniform", "--bits",
                       "8", "-o", "e.onnx")
    assert_user_error(rc, err, "the model's code exited (sys.exit('batch too large')) while qcompile ran it")


def test_a_top1_bound_on_a_model_without_class_scores_is_a_usage_error(work, capsys):
    # it was a validation failure (exit 1, the file kept) whose message said to drop the flag
    np.save(work / "rows.npy", np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32))
    rc, out, err = cli(capsys, f"{MODULE}:tiny_regressor", "--calib", "rows.npy", "--scheme", "uniform", "--bits", "8",
                       "--min-top1", "0.5", "-o", "r.onnx")
    assert_user_error(rc, err, "no output of the model holds class scores")
    assert onnx_files(work) == []


# --- the three ways to name a model -------------------------------------------------------------------------


def test_state_dict_with_arch(work, capsys):
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--input-shape", SHAPE, "--scheme", "fp32",
                       "-o", "out.onnx")
    assert rc == 0, err
    assert "wrote" in out and "PASS" in out
    sqnr = float(re.search(r"SQNR ([0-9.]+) dB", out).group(1))
    assert sqnr >= MIN_SQNR_FP32
    onnx.checker.check_model(str(work / "out.onnx"), full_check=True)
    assert onnx_files(work) == ["out.onnx"]


def test_factory_spec_and_default_output_name(work, capsys):
    rc, out, err = cli(capsys, SPEC, "--input-shape", SHAPE, "--scheme", "fp32")
    assert rc == 0, err
    assert onnx_files(work) == ["tiny_cnn_fp32.onnx"]


def test_full_pickle_with_trust_pickle(work, capsys):
    rc, out, err = cli(capsys, "full.pt", "--trust-pickle", *FP32_OUT)
    assert rc == 0, err
    assert (work / "out.onnx").is_file()


def test_calib_file_gives_the_example_input_and_json_summary(work, capsys):
    rc, out, err = cli(capsys, SPEC, "--calib", "calib.npy", "--scheme", "fp32", "-o", "out.onnx",
                       "--json", "summary.json", "--check")
    assert rc == 0, err
    summary = json.loads((work / "summary.json").read_text())
    assert summary["validation"]["passed"] is True and summary["validation"]["samples"] == 6
    assert [p["name"] for p in summary["passes"]] == ["RemoveIdentity", "ConstantMetadataReads", "DecomposeRMSNorm",
                                                           "DecomposeGroupedQueryAttention", "DecomposeAdaptivePool",
                                                           "DecomposeAvgPoolDivisor", "DecomposeUnexportable",
                                                           "EliminateDeadCode"]


def test_leaf_module_way_out(work, capsys):
    args = [f"{MODULE}:gated_net", "--input-shape", "2,6", "--scheme", "fp32", "-o", "out.onnx"]
    rc, out, err = cli(capsys, *args)
    assert_user_error(rc, err, "in module 'gate'")
    assert "--leaf-module gate" in err and f"{MODULE}.py:" in err
    assert onnx_files(work) == []
    rc, out, err = cli(capsys, *args, "--leaf-module", "gate")
    assert rc == 0, err
    assert "PASS" in out and (work / "out.onnx").is_file()


# --- bad input ----------------------------------------------------------------------------------------------

BAD_INPUTS = {
    "missing-file": (["missing.pt", "--arch", SPEC], "does not exist"),
    "missing-file-no-shape": (["missing.pt", "--input-shape", None], "model file 'missing.pt' does not exist"),
    "text-file": (["notes.txt", "--arch", SPEC], "not a PyTorch checkpoint"),
    "random-bytes": (["random.bin", "--arch", SPEC], "not a PyTorch checkpoint"),
    "wrong-keys": (["wrong_keys.pt", "--arch", SPEC], "does not fit --arch"),
    "wrong-shapes": (["wrong_shapes.pt", "--arch", SPEC], "other shapes: fc.weight (7, 24) vs (4, 24)"),
    "state-dict-without-arch": (["weights.pt"], "--arch package.module:factory"),
    "pickle-without-trust": (["full.pt"], "--trust-pickle"),
    "unknown-module": (["qc_no_such_module:f"], "cannot import module"),
    "shape-letters": ([SPEC, "--input-shape", "1,a,3"], "invalid --input-shape '1,a,3'"),
    "shape-zero": ([SPEC, "--input-shape", "0,3"], "invalid --input-shape '0,3'"),
    "shape-empty": ([SPEC, "--input-shape", ""], "invalid --input-shape ''"),
    "shape-does-not-fit": ([SPEC, "--input-shape", "1,5,8,8"], "fix --input-shape"),
    "no-example-input": ([SPEC, "--input-shape", None], "no example input"),
    "missing-calib": ([SPEC, "--input-shape", None, "--calib", "nope.npy"], "--calib file 'nope.npy' does not exist"),
    "unknown-scheme": ([SPEC, "--scheme", "fp16"], "unknown --scheme 'fp16'"),
    "bits-1": ([SPEC, "--bits", "1"], "--bits 1 is outside 2..8"),
    "bits-9": ([SPEC, "--bits", "9"], "--bits 9 is outside 2..8"),
    "wbits-9": ([SPEC, "--wbits", "9"], "--wbits 9 is outside 2..8"),
    "bits-not-int": ([SPEC, "--bits", "four"], "invalid int value"),
    "output-missing-folder": ([SPEC, "-o", "no_such_dir/out.onnx"], "does not exist"),
    "unknown-leaf": ([SPEC, "--leaf-module", "nope"], "names no submodule"),
    "unknown-option": ([SPEC, "--frobnicate"], "unrecognized arguments: --frobnicate"),
    # paths that would overwrite an input or cannot be written; options that cannot apply; thresholds out of range
    "output-is-the-model": (["weights.pt", "--arch", SPEC, "-o", "weights.pt"], "is the model file"),
    "output-empty": ([SPEC, "-o", ""], "-o is empty"),
    # a file named "-"; /dev/stdout replaced a redirect's file by the atomic rename, or "cannot write in /proc/.../fd"
    "output-dash": ([SPEC, "-o", "-"], "-o '-' names a standard stream, not a file"),
    "json-stdout": ([SPEC, "--json", "/dev/stdout"], "--json '/dev/stdout' names a standard stream, not a file"),
    # ONNX bytes were written under a checkpoint's name, exit 0
    "output-checkpoint-extension": ([SPEC, "-o", "out.pt"], "-o 'out.pt' ends in .pt, the extension of a PyTorch "
                                    "checkpoint, but qcompile writes an ONNX file there; give a name ending in .onnx"),
    "json-is-the-output": ([SPEC, "--json", "out.onnx"], "--json and -o name the same file"),
    "json-missing-folder": ([SPEC, "--json", "no_such_dir/s.json"], "choose another --json path"),
    "fp32-with-wbits": ([SPEC, "--wbits", "4"], "--wbits cannot apply to --scheme fp32"),
    "min-top1-above-1": ([SPEC, "--min-top1", "2"], "2 is not a fraction"),
    "min-sqnr-nan": ([SPEC, "--min-sqnr", "nan"], "nan is not a threshold"),
    "two-shapes-for-one-input": ([SPEC, "--input-shape", SHAPE, "--input-shape", SHAPE],
                                 "the model's forward takes 1 input(s) (x) but 2 were given"),
    "exclude-matches-nothing": ([SPEC, "--scheme", "uniform", "--bits", "8", "--exclude", "nosuch"],
                                "--exclude 'nosuch' matched no layer; the layers are conv, fc"),
    "exclude-empty": ([SPEC, "--scheme", "uniform", "--bits", "8", "--exclude", ""], "--exclude needs a layer name"),
    # accepted silently, nothing kept opaque ('' is the name of the model itself), where --exclude '' is refused
    "leaf-empty": ([SPEC, "--leaf-module", ""], "--leaf-module needs a submodule name or module class"),
    # internal errors: torch.randn's "Overflow when unpacking long long"
    "shape-past-int64": ([SPEC, "--input-shape", "1,3,99999999999999999999,8"],
                         "dimension 99999999999999999999 is too large (past 2**63 - 1"),
    # "not a readable .npy/.npz array (IsADirectoryError); save it with numpy.save"
    "calib-directory": ([SPEC, "--input-shape", None, "--calib", "."],
                        "--calib file '.' is a directory; give the .npy or .npz file inside it"),
    # "newdir/" wrote a file named newdir
    "output-trailing-slash": ([SPEC, "-o", "no_such_dir/"], "ends with a slash (a folder)"),
    # internal errors before: a model whose forward takes one input only, in a pass or in validation
    "batch-of-one": ([f"{MODULE}:batch_of_one", "--scheme", "uniform", "--bits", "8", "--calib", "calib.npy",
                      "--input-shape", None],
                     "the model runs on a batch of 1 but not of 2 inputs"),
    "batch-of-one-fp32": ([f"{MODULE}:batch_of_one"], "make forward independent of the batch size"),
    # (6, 8, 8) images for a one-channel conv: "make forward independent of the batch size", the wrong fix
    # the same with --input-shape: "a list of single samples? stack them", not the channel axis
    "calib-without-channel-axis-shape-given": ([f"{MODULE}:one_channel", "--calib", "nochan.npy", "--input-shape",
                                                "1,1,8,8"], "(without the channel axis? x[:, None] adds it;"),
    # torch's own text only: "expected input[1, 8, 8, 1] to have 1 channels, but got 8 channels instead"
    "calib-channels-last": ([f"{MODULE}:one_channel", "--calib", "nhwc1.npy", "--input-shape", None],
                            "channels last? the layers take channels first: x.transpose(0, 3, 1, 2) in numpy"),
    "calib-without-channel-axis": ([f"{MODULE}:one_channel", "--calib", "nochan.npy", "--input-shape", None],
                                   "have shape (8, 8), without the channel axis the first layer reads (1 channel(s)): "
                                   "give the data shape (N, 1, 8, 8)"),
    # options that could not apply were accepted and ignored (exit 0)
    "no-validate-with-threshold": ([SPEC, "--no-validate", "--min-sqnr", "30"],
                                   "--min-sqnr cannot apply with --no-validate"),
    "fp32-with-bits": ([SPEC, "--bits", "8"], "--bits cannot apply to --scheme fp32"),
    "ternary-with-wbits": ([SPEC, "--scheme", "uniform", "--wscheme", "ternary", "--wbits", "4"],
                           "--wscheme ternary has 2-bit levels whatever the bit-width; --wbits 4 cannot apply"),
    # misleading messages before: the archive's members listed, "none of them a state dict", a batch-size problem
    "calib-module-saved-with-torch": ([SPEC, "--input-shape", None, "--calib", "full.pt"],
                                      "is a PyTorch file (torch.save) that holds more than tensors"),
    "calib-list-saved-with-torch": ([SPEC, "--input-shape", None, "--calib", "calib_list.pt"],
                                    "holds a list, not a tensor of inputs"),
    "two-state-dicts": (["two_state_dicts.pt", "--arch", SPEC], "holds several state dicts (under 'net', 'ema')"),
    "shape-without-batch": ([f"{MODULE}:tiny_mlp", "--input-shape", "8"],
                            "give it the batch dimension (--input-shape 1,8 for 8 features"),
    "symmetric-levels-uniform": ([SPEC, "--scheme", "uniform", "--symmetric-levels"],
                                 "--symmetric-levels applies to APoT/PoT/log2 activations"),
    # ONNX's dynamic batch: argparse took "-1,3,8,8" for an option ("expected one argument")
    "shape-negative-batch": ([SPEC, "--input-shape", "-1,3,8,8"], "give 1 there, not -1"),
}


def _with_defaults(args: list) -> list:
    """Add --input-shape, --scheme fp32 and -o out.onnx unless the case sets (or, with None, drops) them."""
    args = list(args)
    if "--input-shape" in args:
        i = args.index("--input-shape")
        if args[i + 1] is None:
            del args[i:i + 2]
    else:
        args += ["--input-shape", SHAPE]
    if "--scheme" not in args:
        args += ["--scheme", "fp32"]
    if "-o" not in args:
        args += ["-o", "out.onnx"]
    return args


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_file(work, capsys, case):
    args, needle = BAD_INPUTS[case]
    rc, out, err = cli(capsys, *_with_defaults(args))
    assert_user_error(rc, err, needle)
    assert onnx_files(work) == []
    assert not (work / "no_such_dir").exists() and not (work / "out.pt").exists()


def test_arch_module_that_parses_argv_when_imported(work, capsys, monkeypatch):
    """A training script named by --arch that parses sys.argv at import read qcompile's arguments: argparse printed
    "usage: qcompile [-h] [--epochs EPOCHS]" and "qcompile: error: unrecognized arguments: weights.pt --arch ...",
    which looked like qcompile's own usage."""
    (work / "qc_train_script.py").write_text(
        f"import argparse\nfrom {MODULE} import TinyCNN\np = argparse.ArgumentParser()\n"
        "p.add_argument('--epochs', type=int, default=3)\nargs = p.parse_args()\n\ndef net():\n    return TinyCNN()\n")
    args = _with_defaults(["weights.pt", "--arch", "qc_train_script:net"])
    # the command line as the qcompile executable has it (pytest's own argv, which the script parses too, depends
    # on how the suite was started: a bare `python -m pytest` parsed, and nothing exited)
    monkeypatch.setattr(sys, "argv", ["qcompile"] + [str(a) for a in args])
    try:
        rc, out, err = cli(capsys, *args)
        assert_user_error(rc, err, "importing module 'qc_train_script' from 'qc_train_script:net' exited (sys.exit(2)")
        assert "usage:" not in err and "if __name__ ==" in err
        assert onnx_files(work) == []
    finally:
        sys.modules.pop("qc_train_script", None)


def test_calib_saved_with_torch_is_read_as_the_same_inputs(work, capsys):
    """A tensor saved with torch.save (read with weights_only=True) was refused ("save the inputs with
    numpy.save"); it is the same calibration data as the .npy of its values: the same file, byte for byte."""
    x = torch.load("calib_torch.pt")
    np.save("calib_same.npy", x.numpy())
    torch.save({"x": x}, "calib_dict.pt")
    # a 1-tuple, a sparse tensor: "holds a tuple, not a tensor", "not a readable .npy/.npz array (TypeError)"
    torch.save((x,), "calib_tuple.pt")
    torch.save(x.to_sparse(), "calib_sparse.pt")
    files = {}
    for name in ("calib_torch.pt", "calib_dict.pt", "calib_same.npy", "calib_tuple.pt", "calib_sparse.pt"):
        rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", name, "--scheme", "uniform", "--bits", "8",
                           "-o", f"{name}.onnx")
        assert rc == 0 and "PASS" in out, err
        files[name] = open(f"{name}.onnx", "rb").read()
    assert files["calib_torch.pt"] == files["calib_same.npy"] == files["calib_dict.pt"] == files["calib_tuple.pt"] \
        == files["calib_sparse.pt"]
    rc, out, err = cli(capsys, "validate", "calib_torch.pt.onnx", "--against", "weights.pt", "--arch", SPEC,
                       "--data", "calib_torch.pt")
    assert rc == 0 and "PASS" in out, out + err


def test_read_only_output_folder(work, capsys, monkeypatch):
    folder = work / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root ignores the mode bits: make the check see a read-only folder
            real_access = os.access

            def access(path, mode, *args, **kwargs):
                if os.path.abspath(path) == str(folder) and mode & os.W_OK:
                    return False
                return real_access(path, mode, *args, **kwargs)

            monkeypatch.setattr(os, "access", access)
        rc, out, err = cli(capsys, SPEC, "--input-shape", SHAPE, "--scheme", "fp32", "-o", folder / "out.onnx")
        assert_user_error(rc, err, "is not writable")
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


def test_output_path_that_is_a_directory(work, capsys):
    (work / "adir").mkdir()
    rc, out, err = cli(capsys, SPEC, "--input-shape", SHAPE, "--scheme", "fp32", "-o", "adir")
    assert_user_error(rc, err, "is a directory")


def test_interrupted_write_leaves_no_file(work, capsys, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    rc, out, err = cli(capsys, SPEC, "--input-shape", SHAPE, "--scheme", "fp32", "-o", "out.onnx")
    assert rc == 130
    assert err == "qcompile: interrupted (files are written whole or not at all)\n"
    assert onnx_files(work) == [] and not any(f.startswith(".qcompile-") for f in os.listdir(work))


def test_terminated_write_leaves_no_file(work, capsys, monkeypatch):
    """SIGTERM (kill, timeout, a cancelled CI job) left the temporary file beside -o; it is cleaned up as on
    Ctrl-C, and the exit code is 128 + 15."""
    import signal

    def terminated(src, dst):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes of the main thread
            pass
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(os, "replace", terminated)
    before = signal.getsignal(signal.SIGTERM)
    rc, out, err = cli(capsys, SPEC, "--input-shape", SHAPE, "--scheme", "fp32", "-o", "out.onnx")
    assert rc == 143 and err == "qcompile: terminated (files are written whole or not at all)\n"
    assert onnx_files(work) == [] and not any(f.startswith(".qcompile-") for f in os.listdir(work))
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_json_summary_through_a_link_to_the_output_is_refused(work, capsys):
    """-o o.onnx, a symlink to s.json that does not exist yet, with --json s.json: the summary overwrote the
    ONNX file (exit 0); the same-file check now resolves links."""
    os.symlink("s.json", work / "o.onnx")
    rc, out, err = cli(capsys, SPEC, "--input-shape", SHAPE, "--scheme", "fp32", "-o", "o.onnx", "--json", "s.json")
    assert_user_error(rc, err, "--json and -o name the same file")
    assert not (work / "s.json").exists()


def test_json_summary_is_strict_json(work, capsys):
    """Non-finite figures are written as "inf"/"-inf"/"nan" strings: json.dumps wrote Infinity, which strict
    parsers (JavaScript's JSON.parse) refuse."""
    from qcompile.cli import json_safe

    assert json_safe({"a": [float("inf"), -float("inf"), 1.5], "b": float("nan")}) == {"a": ["inf", "-inf", 1.5],
                                                                                       "b": "nan"}
    np.save(work / "calib8.npy", np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32))
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib8.npy", "--scheme", "uniform",
                       "--bits", "8", "-o", "q.onnx", "--json", "s.json")
    assert rc == 0, err

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    summary = json.loads((work / "s.json").read_text(), parse_constant=refuse)
    assert summary["validation"]["passed"] is True


def test_internal_error_is_one_line_without_traceback(work, capsys, monkeypatch):
    import qcompile.export

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter exploded\nsecond line")

    monkeypatch.delenv("QCOMPILE_DEBUG", raising=False)
    monkeypatch.setattr(qcompile.export, "export_onnx", broken_export)
    rc, out, err = cli(capsys, SPEC, "--input-shape", SHAPE, "--scheme", "fp32", "-o", "out.onnx")
    assert rc == 3
    assert err.startswith("qcompile: internal error: RuntimeError: exporter exploded (set QCOMPILE_DEBUG=1")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert onnx_files(work) == []


# --- validate -----------------------------------------------------------------------------------------------


def test_validate_reports_and_passes(work, capsys):
    assert cli(capsys, "weights.pt", "--arch", SPEC, *FP32_OUT)[0] == 0
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", "weights.pt", "--arch", SPEC,
                       "--min-sqnr", MIN_SQNR_FP32, "--max-abs", "1e-4", "--min-top1", "1.0")
    assert rc == 0, err
    for needle in ("validation on 16 inputs", "max abs err", "SQNR", "top-1 agreement 100.00%", "PASS"):
        assert needle in out
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", "full.pt", "--trust-pickle", "--data", "calib.npy")
    assert rc == 0, err
    assert "validation on 6 inputs" in out


def test_validate_of_a_float_file_against_a_model_that_does_not_take_its_inputs(work, capsys):
    """A float file checked against another architecture, a two-input model, or uint8 image data: one line, exit
    2 (an "internal error", exit 3, before; the quantized branch already said it in one line)."""
    assert cli(capsys, "weights.pt", "--arch", SPEC, *FP32_OUT)[0] == 0
    drop_weight_fingerprint("out.onnx")  # other weights are refused first (see below)
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", f"{MODULE}:two_input_net")
    assert_user_error(rc, err, "the --against model does not run on the --samples 16 inputs")
    assert "give the model the file was compiled from" in err
    np.save("u8.npy", np.random.default_rng(2).integers(0, 256, (4, 3, 8, 8)).astype(np.uint8))
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", "weights.pt", "--arch", SPEC, "--data", "u8.npy")
    assert_user_error(rc, err, "--data holds integers but 'out.onnx' takes floating point: convert them")


def test_validate_of_a_file_whose_quantizers_this_version_places_otherwise(work, capsys):
    """A file from an earlier qcompile whose passes placed the activation quantizers otherwise failed with codes
    'differing' in a quantizer the two do not share; it now says which version wrote it."""
    import json

    import onnx

    from qcompile import __version__

    assert cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib.npy", "--scheme", "uniform", "--bits", "8",
               "-o", "q.onnx")[0] == 0
    model = onnx.load("q.onnx")
    props = {p.key: p for p in model.metadata_props}
    amap = json.loads(props["qcompile.activations"].value)
    assert len(amap) >= 2
    amap.pop(next(iter(amap)))  # one quantizer fewer, as an older build placed them
    props["qcompile.activations"].value = json.dumps(amap)
    onnx.save(model, "same_version.onnx")
    record = json.loads(props["qcompile.options"].value)
    record["qcompile"] = "0.4.0"
    props["qcompile.options"].value = json.dumps(record)
    onnx.save(model, "older.onnx")
    rc, out, err = cli(capsys, "validate", "older.onnx", "--against", "weights.pt", "--arch", SPEC, "--data", "calib.npy")
    assert_user_error(rc, err, f"was written by qcompile 0.4.0, whose activation quantizers this qcompile {__version__}")
    rc, out, err = cli(capsys, "validate", "same_version.onnx", "--against", "weights.pt", "--arch", SPEC,
                       "--data", "calib.npy")
    assert_user_error(rc, err, "has other activation quantizers than 'weights.pt'")
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", "weights.pt", "--arch", SPEC, "--data", "calib.npy")
    assert rc == 0 and "PASS" in out, err


def test_negative_thresholds_need_no_equals_sign(work, capsys):
    """``--min-sqnr -inf`` (argparse alone takes ``-inf`` for an option and wants ``--min-sqnr=-inf``)."""
    from qcompile.cli import _glue_negative_values

    assert _glue_negative_values(["m.pt", "--min-sqnr", "-inf", "--max-abs", "-1e3", "-o", "x.onnx"]) == \
        ["m.pt", "--min-sqnr=-inf", "--max-abs=-1e3", "-o", "x.onnx"]
    assert _glue_negative_values(["--min-sqnr", "-o", "x.onnx"]) == ["--min-sqnr", "-o", "x.onnx"]
    assert cli(capsys, "weights.pt", "--arch", SPEC, *FP32_OUT)[0] == 0
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", "weights.pt", "--arch", SPEC, "--min-sqnr", "-inf")
    assert rc == 0 and "PASS" in out, err
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", "weights.pt", "--arch", SPEC, "--max-abs", "-1")
    assert rc == 2 and "--max-abs" in err and "Traceback" not in err


def test_validate_exits_1_when_a_threshold_is_missed(work, capsys):
    # Compiled from trained weights, validated against the factory's fresh weights: the outputs differ.
    assert cli(capsys, "weights.pt", "--arch", SPEC, *FP32_OUT)[0] == 0
    drop_weight_fingerprint("out.onnx")  # other weights are refused first (see below)
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", SPEC, "--min-sqnr", "40")
    assert rc == 1
    assert err.startswith("qcompile: validation failed: ") and "SQNR" in err and "< 40.0 dB" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    # no threshold: a float file is held to the compile's own bound (80 dB); it said PASS at -6 dB before
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", SPEC)
    assert rc == 1 and "FAIL: SQNR" in out and "< 80.0 dB" in out, (out, err)
    assert err.startswith("qcompile: validation failed: SQNR") and err.count("\n") == 1  # the reason, once
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", SPEC, "--min-sqnr", "-inf")  # report only
    assert rc == 0 and "PASS" in out


def test_a_given_min_sqnr_holds_for_a_float_file(work, capsys):
    """``--min-sqnr`` above what the file reaches fails, also where the model's own float32 rounding would excuse
    the default bound: a float digits file at 133.6 dB passed ``--min-sqnr 1000`` on that scale (exit 0)."""
    assert cli(capsys, "weights.pt", "--arch", SPEC, *FP32_OUT)[0] == 0
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", "weights.pt", "--arch", SPEC, "--min-sqnr", "1000")
    assert rc == 1 and "FAIL: SQNR" in out and "< 1000.0 dB" in out, (out, err)
    assert "own float32 outputs" not in out
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--input-shape", SHAPE, "--scheme", "fp32",
                       "--min-sqnr", "1000", "-o", "again.onnx")
    assert rc == 1 and "< 1000.0 dB" in err, (out, err)


def test_validate_says_a_file_from_another_tool_is_compared_as_a_float_file(work, capsys):
    """A torch.onnx.export file has no qcompile metadata: validate compares it with --against as a float file, and
    now says so (it read as any qcompile file's verdict)."""
    model = importlib.import_module(MODULE).TinyCNN()
    model.load_state_dict(torch.load("weights.pt"))
    torch.onnx.export(model.eval(), (torch.randn(1, 3, 8, 8),), "plain.onnx", input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    rc, out, err = cli(capsys, "validate", "plain.onnx", "--against", "weights.pt", "--arch", SPEC)
    assert rc == 0 and "PASS" in out, (out, err)
    assert "the file has no qcompile metadata, so it is compared as a float file" in out
    assert cli(capsys, "weights.pt", "--arch", SPEC, *FP32_OUT)[0] == 0
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", "weights.pt", "--arch", SPEC)
    assert rc == 0 and "no qcompile metadata" not in out, (out, err)


def test_validate_of_a_float_file_against_other_outputs_is_a_user_error(work, capsys):
    """Outputs of another shape (a model with 3 classes against a file with 4) were a ValueError from the
    comparison: an internal error."""
    assert cli(capsys, "weights.pt", "--arch", SPEC, *FP32_OUT)[0] == 0
    drop_weight_fingerprint("out.onnx")  # other weights are refused first (see below)
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", f"{MODULE}:tiny_cnn_3")
    assert_user_error(rc, err, "'out.onnx' does not give --against's outputs (output 0: the file's shape [16, 4], "
                      "the reference's [16, 3]")


@pytest.mark.parametrize("what, needle", [("missing", "does not exist"), ("text", "is not an ONNX file")])
def test_validate_bad_file(work, capsys, what, needle):
    path = "missing.onnx" if what == "missing" else "notes.txt"
    rc, out, err = cli(capsys, "validate", path, "--against", SPEC)
    assert_user_error(rc, err, needle)


def test_validate_needs_against(work, capsys):
    rc, out, err = cli(capsys, "validate", "out.onnx")
    assert_user_error(rc, err, "--against")


# --- help and demo ------------------------------------------------------------------------------------------


def test_help_lists_the_options(capsys):
    rc, out, err = cli(capsys, "--help")
    assert rc == 0 and err == ""
    for option in ("MODEL", "--arch", "--trust-pickle", "--input-shape", "--leaf-module", "-o", "--scheme",
                   "--bits", "--calib", "--check", "--min-sqnr", "--min-top1", "--json", "qcompile validate"):
        assert option in out, option
    rc, out, err = cli(capsys, "validate", "--help")
    assert rc == 0
    for option in ("--against", "--data", "--min-sqnr", "--max-abs", "--min-top1"):
        assert option in out, option


def test_version(capsys):
    rc, out, err = cli(capsys, "--version")
    assert rc == 0 and out.strip() == f"qcompile {qcompile.__version__}"


def test_no_arguments_prints_help_and_exits_2(capsys):
    rc, out, err = cli(capsys)
    assert rc == 2 and "usage: qcompile" in out


def test_demo_fp32_prints_accuracy(tmp_path, capsys):
    rc, out, err = cli(capsys, "demo", "--scheme", "fp32", "-o", tmp_path / "digits.onnx")
    assert rc == 0, err
    m = re.search(r"float \(PyTorch\): ([0-9.]+)%.*ONNX \(onnxruntime\): ([0-9.]+)%", out)
    assert m, out
    acc_float, acc_onnx = float(m.group(1)), float(m.group(2))
    assert acc_float >= 90.0 and abs(acc_onnx - acc_float) <= 0.2 + 1e-9  # at most one of 500 images differs
    assert "PASS" in out and (tmp_path / "digits.onnx").is_file()


def test_demo_takes_the_options_its_errors_suggest(tmp_path, capsys):
    """`qcompile demo --scheme ternary` says to choose another --ascheme (ternary levels are signed, ReLU outputs
    are not); the demo had no --ascheme. It has the weight/activation options now, and ternary/binary layers are
    labelled with their own bit-widths (2 and 1; they were labelled with --bits)."""
    rc, out, err = cli(capsys, "demo", "--scheme", "ternary", "-o", tmp_path / "t.onnx")
    assert_user_error(rc, err, "choose another --ascheme/--abits")
    rc, out, err = cli(capsys, "demo", "--wscheme", "ternary", "--ascheme", "uniform", "--exclude", "fc1",
                       "-o", tmp_path / "t.onnx")
    assert rc == 0 and "PASS" in out, err
    assert "W2 ternary / A4 uniform" in out.splitlines()[0]
    table = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and len(line.split()) > 2}
    assert "W2 ternary / A4 uniform (default)" in table["conv2"] and "float" in table["fc1"]


def test_demo_refuses_to_write_over_its_bundled_weights(capsys):
    from qcompile.models import digits

    before = open(digits.WEIGHTS, "rb").read()
    rc, out, err = cli(capsys, "demo", "-o", digits.WEIGHTS)
    assert_user_error(rc, err, "is the demo's bundled weights file")
    assert open(digits.WEIGHTS, "rb").read() == before


# --- the installed console script ----------------------------------------------------------------------------


def run_console(work, *args):
    env = {k: v for k, v in os.environ.items() if k != "QCOMPILE_DEBUG"}
    return subprocess.run(["qcompile", *args], cwd=work, env=env, capture_output=True, text=True, timeout=120)


def test_a_non_ascii_output_name_on_an_ascii_terminal_is_no_internal_error(work):
    # print(f"... -> é.onnx") raised UnicodeEncodeError: "qcompile: internal error", exit 3, no file
    env = {k: v for k, v in os.environ.items() if k != "QCOMPILE_DEBUG"}
    env["PYTHONIOENCODING"] = "ascii"
    proc = subprocess.run(["qcompile", SPEC, "--input-shape", SHAPE, "--scheme", "fp32", "-o", "\u00e9.onnx"],
                          cwd=work, env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (work / "\u00e9.onnx").exists() and b"internal error" not in proc.stderr


def test_a_reader_that_stops_early_does_not_stop_the_compile(work):
    """`qcompile ... | head -1`: the first print after head exited raised BrokenPipeError, "qcompile: internal
    error", exit 3 and no file. The compile now goes on with its output discarded and writes the file."""
    env = {k: v for k, v in os.environ.items() if k != "QCOMPILE_DEBUG"}
    proc = subprocess.Popen(["qcompile", SPEC, "--calib", "calib.npy", "--scheme", "uniform", "--bits", "8",
                             "-o", "piped.onnx"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # as head -1 does
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert first.startswith(b"qcompile: ") and b"internal error" not in err, err
    assert (work / "piped.onnx").exists()


def test_console_script_refuses_a_pickle_with_exit_2(work):
    proc = run_console(work, "full.pt", "--input-shape", SHAPE, "--scheme", "fp32", "-o", "out.onnx")
    assert proc.returncode == 2
    assert proc.stderr.startswith("qcompile: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "--trust-pickle" in proc.stderr and "Traceback" not in proc.stderr
    assert onnx_files(work) == []


def test_console_script_compiles_a_trusted_pickle_from_the_current_directory(work):
    # The pickled class lives in qc_cli_models.py in the working directory, which is on no sys.path but the CLI's.
    proc = run_console(work, "full.pt", "--trust-pickle", "--input-shape", SHAPE, "--scheme", "fp32", "-o", "out.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "PASS" in proc.stdout
    onnx.checker.check_model(str(work / "out.onnx"), full_check=True)


def test_console_script_names_an_operator_torch_onnx_cannot_export(work):
    # torch.cummax has no ONNX export: one line naming the operator and the fix, exit 2, no file, and not the
    # TorchScript graph the exporter prints on its way out
    (work / "qc_cummax_model.py").write_text(
        "import torch\n"
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(6, 3)\n"
        "    def forward(self, x):\n"
        "        return self.fc(torch.cummax(x, -1)[0])\n"
        "def make():\n"
        "    return Net()\n")
    proc = run_console(work, "qc_cummax_model:make", "--input-shape", "1,6", "--scheme", "fp32", "-o", "out.onnx")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("qcompile: error: torch.onnx cannot export this model: ")
    assert proc.stderr.count("\n") == 1 and "cummax" in proc.stderr and "replace that operation" in proc.stderr
    assert "--input-shape" not in proc.stderr  # no input shape exports an operator torch.onnx has no export for
    assert "Torch IR graph" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert onnx_files(work) == []


def test_console_script_compiles_an_adaptive_pool_with_unequal_bins(work):
    # AdaptiveAvgPool2d to 7x7 on a 5x5 map, which torch.onnx cannot export as a pool, is decomposed into its bins
    (work / "qc_pool_model.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((7, 7)),\n"
        "                         nn.Flatten(), nn.Linear(4 * 49, 3))\n")
    for shape in ("1,3,5,5", "1,3,14,14"):
        ok = run_console(work, "qc_pool_model:make", "--input-shape", shape, "--scheme", "fp32", "-o", "out.onnx")
        assert ok.returncode == 0 and "PASS" in ok.stdout, ok.stderr


TEXT_MODEL = (
    "import torch\n"
    "import torch.nn as nn\n"
    "class TextCNN(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        torch.manual_seed(0)\n"
    "        self.emb = nn.Embedding(50, 8)\n"
    "        self.conv = nn.Conv1d(8, 16, 3, padding=1)\n"
    "        self.fc = nn.Linear(16, 3)\n"
    "    def forward(self, ids):\n"
    "        return self.fc(torch.relu(self.conv(self.emb(ids).transpose(1, 2))).mean(-1))\n"
    "def make():\n"
    "    return TextCNN()\n")


def test_integer_inputs_stay_integers_from_python_and_from_a_calibration_file(work, capsys):
    # token ids for an nn.Embedding: calibration, tracing and the ONNX input keep the integer type
    (work / "qc_text_model.py").write_text(TEXT_MODEL)
    import qc_text_model

    ids = torch.randint(0, 50, (12, 7), generator=torch.Generator().manual_seed(3))
    result = qcompile.compile(qc_text_model.make().eval(), calib=ids, scheme="apot", bits=4)
    assert result.report.passed and result.report.max_abs == 0.0, result.report.summary()
    (inp,) = result.onnx_model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64

    np.save(work / "ids.npy", ids.numpy().astype(np.int32))
    rc, out, err = cli(capsys, "qc_text_model:make", "--calib", "ids.npy", "--scheme", "uniform", "--bits", "8",
                       "-o", "text.onnx")
    assert rc == 0, err
    assert "PASS" in out
    onnx.checker.check_model(str(work / "text.onnx"), full_check=True)
    # the embedding table is a layer of the table (8-bit rows, the first-layer rule): it had no row, then stayed float
    emb = next(line for line in out.splitlines() if line.split()[:2] == ["emb", "Embedding"])
    assert "W8 uniform, weights only (first layer)" in emb


TWO_INPUT_MODEL = (
    "import torch\n"
    "import torch.nn as nn\n"
    "class TwoInputs(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        torch.manual_seed(0)\n"
    "        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(3, 8), nn.Linear(8, 2)\n"
    "    def forward(self, x, side):\n"
    "        return self.out(torch.relu(self.a(x) + self.b(side)))\n"
    "def make():\n"
    "    return TwoInputs()\n")


def test_a_model_with_two_inputs_from_the_command_line(work, capsys):
    (work / "qc_two_inputs.py").write_text(TWO_INPUT_MODEL)
    rng = np.random.default_rng(5)
    np.savez(work / "two.npz", x0=rng.standard_normal((10, 6)).astype(np.float32),
             x1=rng.standard_normal((10, 3)).astype(np.float32))
    rc, out, err = cli(capsys, "qc_two_inputs:make", "--calib", "two.npz", "--scheme", "apot", "--bits", "4",
                       "-o", "two.onnx")
    assert rc == 0, err
    assert "PASS" in out
    model = onnx.load(str(work / "two.onnx"))
    assert len(model.graph.input) == 2
    # fp32 from two example shapes; a count that does not match the file's inputs is one clear line
    rc, out, err = cli(capsys, "qc_two_inputs:make", "--input-shape", "1,6", "--input-shape", "1,3", "--scheme",
                       "fp32", "-o", "two_fp32.onnx")
    assert rc == 0 and "PASS" in out, err
    rc, out, err = cli(capsys, "qc_two_inputs:make", "--calib", "two.npz", "--input-shape", "1,6", "-o", "x.onnx")
    assert rc == 2 and "one per input" in err and err.count("\n") == 1
    np.savez(work / "bad.npz", x0=np.zeros((4, 6), np.float32), x1=np.zeros((5, 3), np.float32))
    rc, out, err = cli(capsys, "qc_two_inputs:make", "--calib", "bad.npz", "-o", "y.onnx")
    assert rc == 2 and "same number of samples" in err
    assert not (work / "x.onnx").exists() and not (work / "y.onnx").exists()


@pytest.mark.parametrize("case,needle", [
    ("nan", "'bad.npy' holds 2 NaN or +inf value(s)"),
    ("shape", "calibration data has samples of shape (3, 4, 4) but the example input is (3, 8, 8) per sample"),
    ("channels", "the model does not run on inputs of shape [(1, 5, 8, 8) float32]"),
    ("constant", "calibration data is constant (every value is 0)"),
    ("nhwc", "samples of shape (8, 8, 3) but the example input is (3, 8, 8) per sample (channels last? "
             "x.permute(0, 3, 1, 2) in torch, x.transpose(0, 3, 1, 2) in numpy, puts them first)"),
    ("labels", "samples of shape () but the example input is (3, 8, 8) per sample (one number per sample: labels?"),
])
def test_bad_calibration_data_is_a_one_line_error_and_writes_nothing(work, capsys, case, needle):
    """NaN in the data, samples of another shape than --input-shape, data the model cannot take: one line, exit 2,
    no file (these were an internal error from a pass, or told to fix --input-shape when --calib was at fault)."""
    data = np.random.default_rng(2).standard_normal({"nan": (6, 3, 8, 8), "shape": (6, 3, 4, 4),
                                                     "channels": (6, 5, 8, 8), "constant": (6, 3, 8, 8),
                                                     "nhwc": (6, 8, 8, 3), "labels": (6,)}[case]
                                                    ).astype(np.float32)
    if case == "nan":
        data[0, 0, 0, :2] = np.nan
    if case == "constant":  # e.g. an all-black image set: no range to calibrate from
        data[:] = 0.0
    np.save(work / "bad.npy", data)
    args = ["weights.pt", "--arch", SPEC, "--calib", "bad.npy", "--scheme", "uniform", "--bits", "8", "-o", "q.onnx"]
    if case in ("shape", "nhwc", "labels"):
        args += ["--input-shape", SHAPE]
    rc, out, err = cli(capsys, *args)
    assert_user_error(rc, err, needle)
    if case == "channels":
        assert "--calib" in err
    assert onnx_files(work) == []


def test_the_model_and_calibration_files_are_never_overwritten(work, capsys):
    """-o or --json naming an input file: refused before any work, the input unchanged."""
    np.save(work / "calib.npy", np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    before = {name: (work / name).read_bytes() for name in ("weights.pt", "calib.npy")}
    for args in (["-o", "calib.npy"], ["-o", "q.onnx", "--json", "calib.npy"], ["-o", "q.onnx", "--json", "weights.pt"]):
        rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib.npy", "--scheme", "uniform",
                           "--bits", "8", *args)
        assert_user_error(rc, err, "writing there would overwrite it")
    assert {name: (work / name).read_bytes() for name in before} == before
    assert onnx_files(work) == []


def test_the_model_source_module_is_never_overwritten(work, capsys):
    """-o or --json naming the --arch / spec module's own .py file: the ONNX bytes replaced the user's code, and the
    next compile failed with "source code string cannot contain null bytes"."""
    source = f"{MODULE}.py"
    before = (work / source).read_bytes()
    for model in (["weights.pt", "--arch", SPEC], [SPEC]):
        for args, needle in ((["-o", source], "ends in .py, the extension of Python source"),
                             (["-o", "q.onnx", "--json", f"./{source}"], "is the source file of the model's module")):
            rc, out, err = cli(capsys, *model, "--calib", "calib.npy", "--scheme", "uniform", "--bits", "8", *args)
            assert_user_error(rc, err, needle)
    assert (work / source).read_bytes() == before
    assert onnx_files(work) == [] and not (work / "q.onnx").exists()
    # a factory that builds torch.nn layers only: its module was not among the layers' modules, and was overwritten
    (work / "plain_factory.py").write_text("import torch.nn as nn\n\n\ndef mlp():\n"
                                           "    return nn.Sequential(nn.Flatten(), nn.Linear(192, 4))\n")
    plain = (work / "plain_factory.py").read_bytes()
    rc, out, err = cli(capsys, "plain_factory:mlp", "--calib", "calib.npy", "--json", "plain_factory.py")
    assert_user_error(rc, err, "is the source file of the model's module 'plain_factory'")
    assert (work / "plain_factory.py").read_bytes() == plain


def test_quiet_prints_the_results_only(work, capsys):
    """A redirected run printed ~45 lines, 3-4 of them results, with no way to leave out the rest."""
    args = (SPEC, "--calib", "calib.npy", "--scheme", "uniform", "--bits", "8", "-o", "q.onnx")
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    full = out.splitlines()
    rc, out, err = cli(capsys, *args, "-q")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("qcompile: ") and lines[1].startswith("wrote ") and lines[-1].endswith("PASS"), out
    assert len(lines) <= 4 < len(full) and "calibrating" not in err, (out, err)
    rc, out, err = cli(capsys, *args, "-q", "-v")
    assert_user_error(rc, err, "-q (--quiet) and -v (--verbose) ask for fewer and for more lines")


def test_json_summary_is_written_whole_next_to_the_file(work, capsys):
    rc, out, err = cli(capsys, SPEC, *FP32_OUT, "--json", "summary.json")
    assert rc == 0, err
    summary = json.loads((work / "summary.json").read_text())
    assert summary["onnx_path"].endswith("out.onnx") and summary["validation"]["passed"]
    assert not [f for f in os.listdir(work) if f.endswith(".tmp")]


def test_validate_checks_its_arguments_and_the_data_shape(work, capsys):
    rc, out, err = cli(capsys, SPEC, *FP32_OUT)
    assert rc == 0, err
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", SPEC, "--samples", "0")
    assert_user_error(rc, err, "0 is not a positive count")
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", SPEC, "--max-abs", "-1")
    assert_user_error(rc, err, "-1 is negative")
    np.save(work / "wide.npy", np.zeros((4, 3, 9, 9), np.float32))
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", SPEC, "--data", "wide.npy")
    assert_user_error(rc, err, "--data gives shape (4, 3, 9, 9) but 'out.onnx' takes input 'input' of shape "
                               "(batch, 3, 8, 8)")
    np.save(work / "fits.npy", np.zeros((4, 3, 8, 8), np.float32))  # --input-shape beside it was ignored
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", SPEC, "--data", "fits.npy", "--input-shape",
                       "1,3,16,16")
    assert_user_error(rc, err, "--input-shape 1,3,16,16 does not match the --data samples of shape (3, 8, 8)")
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", SPEC, "--data", "fits.npy", "--samples", "2")
    assert_user_error(rc, err, "--samples sets the number of random inputs; with --data every sample")  # was ignored


@pytest.mark.parametrize("argv0,torch_first,expected", [
    ("/usr/local/bin/qcompile", False, "PASSIVE"),   # the command: waiting OpenMP threads sleep
    ("/usr/local/bin/qcompile", True, None),         # torch already loaded its OpenMP runtime: left alone
    ("train.py", False, None),                       # a program importing qcompile keeps its own policy
], ids=["command", "torch-first", "library"])
def test_the_command_makes_waiting_openmp_threads_sleep(argv0, torch_first, expected):
    code = (f"import sys; sys.argv = [{argv0!r}]\n" + ("import torch\n" if torch_first else "")
            + "import os, qcompile; print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == str(expected)


def test_mixed_precision_and_adaptive_rounding_from_the_command_line_validate_again(work, capsys):
    """--avg-wbits and --weight-rounding adaptive are recorded in the file, so validate decides the same bits and
    levels from the same --data; without --calib they are refused before anything is written."""
    rng = np.random.default_rng(4)
    np.save(work / "calib16.npy", rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib16.npy", "--avg-wbits", "3.5",
                       "--weight-rounding", "adaptive", "--keep-first-last", "quant", "-o", "mp.onnx")
    assert rc == 0 and "(mixed precision)" in out and "apot W3.5 (average) A4" in out, out + err
    options = json.loads({p.key: p.value for p in onnx.load(work / "mp.onnx").metadata_props}["qcompile.options"])
    assert options["avg_wbits"] == 3.5 and options["weight_rounding"] == "adaptive"
    assert "AdaptiveRounding" in out and "AllocateWeightBits" in out
    rc, out, err = cli(capsys, "validate", "mp.onnx", "--against", "weights.pt", "--arch", SPEC, "--data",
                       "calib16.npy")
    assert rc == 0 and "PASS" in out, err
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--input-shape", "1,3,8,8", "--avg-wbits", "3",
                       "-o", "none.onnx")
    assert_user_error(rc, err, "--avg-wbits (avg_wbits=) chooses the layers' bit-widths")
    assert not (work / "none.onnx").exists()


def test_validate_of_a_quantized_file_needs_its_calibration_data(work, capsys):
    """validate rebuilds the simulation by calibrating on --data: other inputs (held-out images) made a wrong
    reference and a FAIL on thousands of codes. The file records a fingerprint of its calibration data."""
    rng = np.random.default_rng(3)
    np.save(work / "calib8.npy", rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    np.save(work / "heldout.npy", rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib8.npy", "--scheme", "uniform",
                       "--bits", "8", "-o", "q.onnx")
    assert rc == 0, err
    record = {p.key: p.value for p in onnx.load(work / "q.onnx").metadata_props}["qcompile.calibration"]
    assert json.loads(record)["samples"] == 8
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", "weights.pt", "--arch", SPEC, "--data", "calib8.npy")
    assert rc == 0 and "PASS" in out, err
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", "weights.pt", "--arch", SPEC, "--data", "heldout.npy")
    assert_user_error(rc, err, "--data is not the calibration data 'q.onnx' was compiled with (8 samples)")
    # without --data: the compile's data-free refusal named --keep-first-last and --calib, which validate lacks
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", "weights.pt", "--arch", SPEC)
    assert_user_error(rc, err, "'q.onnx' was calibrated on 8 samples")
    assert "--calib FILE" in err and "--keep-first-last" not in err


def test_held_out_data_for_compile_and_validate(work, capsys):
    """The figures against float were those of the calibration inputs, and validate took one file for both
    calibration and comparison: an MLP on breast-cancer features at uniform W4A4 reported 30.0 dB there and was
    at 19.9 dB on held-out rows, which no command could show. compile --data and validate --calib + --data compare on held-out
    inputs; the simulation is still calibrated on --calib."""
    rng = np.random.default_rng(3)
    np.save(work / "calib8.npy", rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    np.save(work / "heldout.npy", (2.0 * rng.standard_normal((5, 3, 8, 8))).astype(np.float32))
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib8.npy", "--data", "heldout.npy",
                       "--scheme", "uniform", "--bits", "4", "-o", "q.onnx")
    assert rc == 0, err
    assert "validation on 5 inputs" in out and "PASS" in out and "random" not in out, out
    held_out_line = next(line for line in out.splitlines() if line.startswith("vs the float model"))
    record = {p.key: p.value for p in onnx.load(work / "q.onnx").metadata_props}["qcompile.calibration"]
    assert json.loads(record)["samples"] == 8  # calibrated on --calib, not --data
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", "weights.pt", "--arch", SPEC,
                       "--calib", "calib8.npy", "--data", "heldout.npy")
    assert rc == 0 and "validation on 5 inputs" in out and "PASS" in out, err
    assert held_out_line in out  # the same comparison as the compile's
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", "weights.pt", "--arch", SPEC, "--calib", "calib8.npy")
    assert rc == 0 and "validation on 8 inputs" in out, err  # --calib alone: compared on it too, as before
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", "weights.pt", "--arch", SPEC,
                       "--calib", "heldout.npy", "--data", "calib8.npy")
    assert_user_error(rc, err, "--calib is not the calibration data 'q.onnx' was compiled with (8 samples)")
    np.save(work / "other_shape.npy", rng.standard_normal((5, 3, 4, 4)).astype(np.float32))
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", "weights.pt", "--arch", SPEC,
                       "--calib", "calib8.npy", "--data", "other_shape.npy")
    assert rc == 2 and "qcompile: error:" in err and "Traceback" not in err, err
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib8.npy", "--data", "heldout.npy",
                       "--no-validate", "-o", "n.onnx")
    assert_user_error(rc, err, "--data holds the inputs validation runs on, and --no-validate skips it")
    assert not (work / "n.onnx").exists()
    before = (work / "heldout.npy").read_bytes()
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib8.npy", "--data", "heldout.npy",
                       "-o", "heldout.npy")
    assert_user_error(rc, err, "-o 'heldout.npy' is the --data file")
    assert (work / "heldout.npy").read_bytes() == before


def test_validate_against_another_model_is_a_user_error(work, capsys):
    """A file validated against a model it was not compiled from (same input shape, other layers) failed deep in
    the code comparison with an internal error; the rebuilt simulation's graph is now checked first."""
    np.save(work / "calib8.npy", np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32))
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib8.npy", "--scheme", "uniform",
                       "--bits", "8", "-o", "q.onnx")
    assert rc == 0, err
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", f"{MODULE}:wide_cnn", "--data", "calib8.npy")
    assert_user_error(rc, err, f"'q.onnx' was not compiled from the weights in '{MODULE}:wide_cnn'")
    drop_weight_fingerprint("q.onnx")  # a file before 0.7.1: the rebuilt graph's weight shapes tell
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", f"{MODULE}:wide_cnn", "--data", "calib8.npy")
    assert_user_error(rc, err, f"'q.onnx' was not compiled from '{MODULE}:wide_cnn' (its weights have other shapes")


@pytest.mark.parametrize("scheme", ["uniform", "fp32"])
def test_validate_against_another_checkpoint_of_the_architecture_is_a_user_error(work, capsys, scheme):
    """Another checkpoint of the same architecture (the next epoch, a fine-tuned copy) passed the shape check; the
    simulation rebuilt from it differed from the file, and validation FAILed blaming the file ("27.3% of activation
    codes differ"). The file records a fingerprint of the weights it was compiled from."""
    sd = torch.load("weights.pt")
    near = {k: v + 0.01 * v.std() * torch.randn_like(v) if k.endswith("weight") and v.dim() > 1 else v
            for k, v in sd.items()}
    torch.save(near, "near.pt")
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib.npy", "--scheme", scheme, "-o", "q.onnx")
    assert rc == 0, err
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", "near.pt", "--arch", SPEC, "--data", "calib.npy")
    assert_user_error(rc, err, "'q.onnx' was not compiled from the weights in 'near.pt' (another checkpoint")
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", "full.pt", "--trust-pickle", "--data", "calib.npy")
    assert rc == 0 and "PASS" in out, err  # the same weights, saved as the whole model


def test_validate_accepts_the_state_dict_of_a_pruned_model_compiled_from_python(work, capsys):
    """A model with torch.nn.utils.prune masks compiled from Python fingerprinted weight_orig and weight_mask; the
    CLI bakes them into weight when it loads the saved state dict, and validate refused the model's own weights."""
    import torch.nn.utils.prune as prune

    model = qcompile.load_model("weights.pt", arch=SPEC)
    prune.l1_unstructured(model.conv, "weight", amount=0.5)
    torch.save(model.state_dict(), "pruned.pt")
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    np.save("calib16.npy", x.numpy())
    qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, output="pruned.onnx", progress=False)
    rc, out, err = cli(capsys, "validate", "pruned.onnx", "--against", "pruned.pt", "--arch", SPEC, "--data",
                       "calib16.npy")
    assert rc == 0 and "PASS" in out, err


def test_validate_refuses_a_checkpoint_with_one_weight_edited(work, capsys):
    """The fingerprint hashed 4096 evenly spaced values per tensor: one weight changed between them (a patched or
    pruned checkpoint) had the same fingerprint, and validation FAILed as if the file were broken. Files of
    0.7.1-0.7.2 (the sampled fingerprint, key ``sha256``) are still checked their way."""
    import qcompile.models
    from qcompile.api import MODEL_KEY, model_fingerprint
    from qcompile.models.digits import load_split

    np.save(work / "digits.npy", load_split()[0][:32].numpy())
    weights = os.path.join(os.path.dirname(qcompile.models.__file__), "digits_cnn.pt")
    arch = ("--arch", "qcompile.models.digits:digits_cnn")
    sd = torch.load(weights)
    edited = {k: v.clone() for k, v in sd.items()}
    edited["fc1.weight"].reshape(-1)[1] += 2.0  # 49,152 values: between the samples at 0 and 12
    torch.save(edited, "edited.pt")
    rc, out, err = cli(capsys, weights, *arch, "--calib", "digits.npy", "-o", "q.onnx")
    assert rc == 0, err
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", "edited.pt", *arch, "--data", "digits.npy")
    assert_user_error(rc, err, "'q.onnx' was not compiled from the weights in 'edited.pt'")
    recorded = json.loads({p.key: p.value for p in onnx.load("q.onnx").metadata_props}[MODEL_KEY])
    model = qcompile.load_model(weights, arch=arch[1])  # the sampled form too, for validators of 0.7.1-0.7.2
    assert recorded == {"sha256": model_fingerprint(model, sampled=True), "sha256_all": model_fingerprint(model)}
    # a file with the sampled fingerprint of 0.7.2: still accepted for its own weights
    model = onnx.load("q.onnx")
    prop = next(p for p in model.metadata_props if p.key == MODEL_KEY)
    prop.value = json.dumps({"sha256": model_fingerprint(qcompile.load_model(weights, arch=arch[1]), sampled=True)})
    onnx.save(model, "old.onnx")
    rc, out, err = cli(capsys, "validate", "old.onnx", "--against", weights, *arch, "--data", "digits.npy")
    assert rc == 0 and "PASS" in out, err

def test_the_fingerprint_of_a_tensor_past_2_24_values():
    """The sampled fingerprint took 4096 float32 positions up to numel - 1; past 2**24 values the last one rounded up
    to numel, and every compile with an output file of a model with such a tensor (VGG-11's 102,760,448-value
    classifier weight) ended in an IndexError. 16,777,220 values: numel - 1 rounds up to numel in float32."""
    from qcompile.api import model_fingerprint

    big = torch.nn.Module()
    big.register_buffer("w", torch.zeros(16_777_220))
    big.w[-1] = 1.0
    assert float(torch.tensor(16_777_219.0)) == 16_777_220.0  # the rounding this test needs
    sampled = model_fingerprint(big, sampled=True)
    big.w[-1] = 2.0  # the last value is among the samples
    assert model_fingerprint(big, sampled=True) != sampled
    assert len(model_fingerprint(big)) == 16


def test_validate_of_a_file_a_tool_rewrote_says_what_happened(work, capsys):
    """Files a user changed in ordinary ways: metadata dropped (onnx-graphsurgeon) gave a false FAIL as if the file
    were fp32 (21 dB < 80 dB); an exposed intermediate output, an onnxruntime-optimized copy and a custom-form file
    after onnx.version_converter gave internal errors; a file saved with external data failed unless validate ran in
    its folder."""
    import onnxruntime as ort

    np.save(work / "calib8.npy", np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32))
    for emit in ("standard", "custom"):
        rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib8.npy", "--scheme", "uniform",
                           "--bits", "8", "--emit", emit, "-o", f"{emit}.onnx")
        assert rc == 0, err
    check = ("--against", "weights.pt", "--arch", SPEC, "--data", "calib8.npy")
    model = onnx.load(work / "standard.onnx")
    del model.metadata_props[:]
    onnx.save(model, work / "bare.onnx")
    assert_user_error(*cli(capsys, "validate", "bare.onnx", *check)[::2], "has quantization nodes but no qcompile "
                      "metadata")
    model = onnx.load(work / "standard.onnx")
    inner = next(o for n in model.graph.node if n.op_type == "Conv" for o in n.output)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(inner))
    onnx.save(model, work / "extra.onnx")
    assert_user_error(*cli(capsys, "validate", "extra.onnx", *check)[::2], "has 2 output(s) but the model")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(work / "opt.onnx")
    ort.InferenceSession(str(work / "standard.onnx"), so, providers=["CPUExecutionProvider"])
    assert_user_error(*cli(capsys, "validate", "opt.onnx", *check)[::2], "no longer has the activations")
    model = onnx.load(work / "custom.onnx")
    del model.functions[:]
    onnx.save(model, work / "nobody.onnx")
    assert_user_error(*cli(capsys, "validate", "nobody.onnx", *check)[::2], "without its function body")
    (work / "sub").mkdir()
    onnx.save(onnx.load(work / "standard.onnx"), work / "sub" / "ext.onnx", save_as_external_data=True,
              location="ext.onnx.data", size_threshold=64)
    assert (work / "sub" / "ext.onnx.data").exists()
    rc, out, err = cli(capsys, "validate", "sub/ext.onnx", *check)
    assert rc == 0 and "PASS" in out, err


@pytest.mark.parametrize("emit", ["custom", "shift-add"])
def test_validate_passes_the_apot_files_qcompile_wrote(work, capsys, emit):
    """A check that every activation the metadata names is a graph tensor refused untouched APoT custom and
    shift-add files (their probes are not plain graph tensors): 35 of 186 files in a regression sweep."""
    import qcompile.models
    from qcompile.models.digits import load_split

    np.save(work / "digits.npy", load_split()[0][:32].numpy())
    weights = os.path.join(os.path.dirname(qcompile.models.__file__), "digits_cnn.pt")
    arch = ("--arch", "qcompile.models.digits:digits_cnn")
    rc, out, err = cli(capsys, weights, *arch, "--calib", "digits.npy", "--scheme", "apot", "--bits", "4",
                       "--emit", emit, "-o", "a.onnx")
    assert rc == 0, err
    rc, out, err = cli(capsys, "validate", "a.onnx", "--against", weights, *arch, "--data", "digits.npy")
    assert rc == 0 and "PASS" in out, err
    # a level index edited past the file's level table: onnxruntime's Gather refuses it, which was an internal error
    model = onnx.load(work / "a.onnx")
    init = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT4 and len(t.dims) == 4)
    codes = onnx.numpy_helper.to_array(init).copy()
    codes.reshape(-1)[0] = 15  # past the 15 levels of APoT-4 (conv2's level indices)
    init.CopyFrom(onnx.numpy_helper.from_array(codes, init.name))
    onnx.save(model, work / "edited.onnx")
    rc, out, err = cli(capsys, "validate", "edited.onnx", "--against", weights, *arch, "--data", "digits.npy")
    assert_user_error(rc, err, "onnxruntime cannot run 'edited.onnx' on these inputs")


def test_validate_needs_no_config_file(work, capsys):
    """The file records the --config rules themselves, not the path: validate used to re-read the path, so a config
    edited after the compile gave a false FAIL (15 % of codes) and a deleted one, or validate run from another
    folder, an error that advised a --config option validate does not have."""
    np.save(work / "calib8.npy", np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32))
    (work / "layers.toml").write_text('"conv" = {scheme = "uniform", bits = 3}\n')
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib8.npy", "--keep-first-last", "quant",
                       "-o", "q.onnx", "--config", "layers.toml")
    line = next(line for line in out.splitlines() if line.split()[:1] == ["conv"])
    assert rc == 0 and "uniform" in line and "(layers.toml 'conv')" in line, out
    options = json.loads({p.key: p.value for p in onnx.load(work / "q.onnx").metadata_props}["qcompile.options"])
    assert options["config"] == {"file": "layers.toml", "layers": {"conv": {"scheme": "uniform", "bits": 3}}}
    (work / "layers.toml").write_text('"conv" = {scheme = "pot", bits = 4}\n')  # edited after the compile
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", "weights.pt", "--arch", SPEC, "--data", "calib8.npy")
    assert rc == 0 and out.strip().endswith("PASS") and "codes differ 0 of" in out, (out, err)
    os.remove(work / "layers.toml")
    rc, out, err = cli(capsys, "validate", "q.onnx", "--against", "weights.pt", "--arch", SPEC, "--data", "calib8.npy")
    assert rc == 0 and out.strip().endswith("PASS"), (out, err)


def test_too_few_inputs_and_integer_image_data_are_named(work, capsys):
    """One array for a two-input model said "Expected positional argument for parameter y" (torch.fx's words); a
    uint8 image file (kept as integers, for token-id models) said only that long and float do not mix."""
    rng = np.random.default_rng(5)
    np.save(work / "one.npy", rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    rc, out, err = cli(capsys, f"{MODULE}:two_input_net", "--calib", "one.npy", "--scheme", "uniform", "-o", "q.onnx")
    assert_user_error(rc, err, "the model's forward needs 2 input(s) (x, m) but 1 was given")
    # a required keyword-only input blamed --input-shape and --calib, which cannot supply it
    rc, out, err = cli(capsys, f"{MODULE}:keyword_gain_net", "--input-shape", SHAPE, "--scheme", "uniform",
                       "-o", "q.onnx")
    assert_user_error(rc, err, "keyword-only input(s) without a default (gain)")
    # an input forward never reads is not in the file: said, naming the inputs onnxruntime takes
    rc, out, err = cli(capsys, f"{MODULE}:unused_input_net", "--input-shape", SHAPE, "--input-shape", "1,2",
                       "--scheme", "fp32", "-o", "u.onnx")
    assert rc == 0 and "never reads its input(s) extra" in err and "with x only" in err, err
    assert [i.name for i in onnx.load(work / "u.onnx").graph.input] == ["x"]  # forward's name, as torch.onnx
    os.remove(work / "u.onnx")
    # the file's one input took the first array by position: the compile failed, blaming torch.onnx ("Invalid rank
    # for input: input_1"), and validate refused the compile's own --calib file ("has 1 input(s) but --data gives 2")
    np.savez(work / "two.npz", x0=rng.standard_normal((8, 2)).astype(np.float32),
             x1=rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    rc, out, err = cli(capsys, f"{MODULE}:unused_first_input_net", "--calib", "two.npz", "--scheme", "uniform",
                       "--bits", "8", "-o", "u.onnx")
    assert rc == 0 and out.strip().endswith("PASS") and "with x only" in err, (out, err)
    rc, out, err = cli(capsys, "validate", "u.onnx", "--against", f"{MODULE}:unused_first_input_net",
                       "--data", "two.npz")
    assert rc == 0 and out.strip().endswith("PASS"), (out, err)
    os.remove(work / "u.onnx")
    np.save(work / "u8.npy", rng.integers(0, 255, (8, 3, 8, 8)).astype(np.uint8))
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "u8.npy", "--scheme", "uniform", "-o", "q.onnx")
    assert_user_error(rc, err, "save image data as float32")
    assert "uint8 images 0..255: x.astype(np.float32) / 255" in err
    assert onnx_files(work) == []


def test_validate_runs_a_file_with_two_inputs(work, capsys):
    """compile takes --calib inputs.npz (x0, x1) for a model with two inputs; validate refused that file ("store the
    inputs under 'x'", or "takes one input" for two --input-shape), so its file could only be checked from Python."""
    rng = np.random.default_rng(5)
    np.savez(work / "two.npz", x0=rng.standard_normal((8, 3, 8, 8)).astype(np.float32),
             x1=rng.standard_normal((8, 5)).astype(np.float32))
    spec = f"{MODULE}:two_input_net"
    rc, out, err = cli(capsys, spec, "--calib", "two.npz", "--scheme", "uniform", "--bits", "8", "-o", "q2.onnx")
    assert rc == 0, err
    rc, out, err = cli(capsys, "validate", "q2.onnx", "--against", spec, "--data", "two.npz")
    assert rc == 0 and out.strip().splitlines()[-1].endswith("PASS"), (out, err)
    assert "max abs err 0," in out  # the rebuilt simulation is the file's
    rc, out, err = cli(capsys, spec, "--input-shape", "1,3,8,8", "--input-shape", "1,5", "--scheme", "fp32",
                       "-o", "f2.onnx")
    assert rc == 0, err
    rc, out, err = cli(capsys, "validate", "f2.onnx", "--against", spec)  # shapes from the file
    assert rc == 0 and out.strip().endswith("PASS"), (out, err)
    rc, out, err = cli(capsys, "validate", "f2.onnx", "--against", spec, "--input-shape", "1,3,8,8")
    assert_user_error(rc, err, "'f2.onnx' has 2 input(s) but --input-shape (with --samples 16) gives 1")


def test_special_files_and_symlinks_as_output(work, capsys):
    """A fifo (or a device) as -o/--json is refused: the atomic rename would replace it with a regular file (as root,
    -o /dev/null replaced /dev/null). A symlink is written through: the file it names gets the model."""
    os.mkfifo(work / "pipe")
    for args in (["-o", "pipe"], ["-o", "out.onnx", "--json", "pipe"]):
        rc, out, err = cli(capsys, SPEC, "--input-shape", SHAPE, "--scheme", "fp32", *args)
        assert_user_error(rc, err, "is a device, fifo or socket, not a regular file")
    assert (work / "pipe").is_fifo() and onnx_files(work) == []
    (work / "models").mkdir()
    os.symlink(work / "models" / "real.onnx", work / "link.onnx")  # dangling until written
    rc, out, err = cli(capsys, SPEC, "--input-shape", SHAPE, "--scheme", "fp32", "-o", "link.onnx")
    assert rc == 0, err
    assert (work / "link.onnx").is_symlink() and onnx.load(work / "models" / "real.onnx").graph.node


def test_quantization_options_with_fp32_are_refused(work, capsys):
    for args in (["--emit", "custom"], ["--calib-method", "kl"], ["--keep-first-last", "quant"], ["--exclude", "fc"]):
        rc, out, err = cli(capsys, SPEC, *FP32_OUT, *args)
        assert_user_error(rc, err, "cannot apply to --scheme fp32")


def test_help_answers_without_loading_torch():
    """qcompile's package imports torch on first use: --help is fast, and a Ctrl-C while torch loads reaches the
    command's one-line handler. The public names still import as before."""
    code = ("import sys\nfrom qcompile.cli import main\nrc = main(['--help'])\nprint(rc, 'torch' in sys.modules)\n"
            "import qcompile\nfrom qcompile import compile, CompileOptions, load_model\n"
            "print(callable(compile), qcompile.runtime.session.__name__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[-2] == "0 False" and lines[-1] == "True session True"


def test_validate_names_integer_data_for_a_float_file(work, capsys):
    """uint8 images (or bool masks) as --data of validate: onnxruntime's "Unexpected input data type" was reported
    as a file 'not one qcompile wrote or edited since'; the compile itself said what to do."""
    rng = np.random.default_rng(6)
    np.save(work / "c.npy", rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "c.npy", "--scheme", "uniform", "--bits", "8",
                       "-o", "f.onnx")
    assert rc == 0, err
    for arr in ((rng.random((8, 3, 8, 8)) * 255).astype(np.uint8), rng.random((8, 3, 8, 8)) > 0.5):
        np.save(work / "d.npy", arr)
        rc, out, err = cli(capsys, "validate", "f.onnx", "--against", "weights.pt", "--arch", SPEC, "--calib", "c.npy",
                           "--data", "d.npy")
        assert_user_error(rc, err, "--data holds")
        assert "takes floating point: convert them" in err and "not one qcompile wrote" not in err, err


def test_several_inputs_from_an_npz_under_forward_names(work, capsys, monkeypatch):
    """A .npz of a two-input model's arrays under forward's names (the file's input names since 0.9.8) was refused
    ("store the inputs under 'x'"); x0, x1 with a gap said nothing of the missing one."""
    rng = np.random.default_rng(7)
    x, m = rng.standard_normal((8, 3, 8, 8)).astype(np.float32), rng.standard_normal((8, 5)).astype(np.float32)
    np.savez(work / "named.npz", m=m, x=x)  # not forward's order: the names decide
    np.savez(work / "numbered.npz", x0=x, x1=m)
    np.savez(work / "with_object.npz", m=m, x=x, meta=np.array([{"source": "camera"}], dtype=object))
    for name in ("named", "numbered", "with_object"):  # an object array beside the inputs is none of them
        rc, out, err = cli(capsys, f"{MODULE}:two_input_net", "--calib", f"{name}.npz", "--scheme", "uniform",
                           "--bits", "8", "-o", f"{name}.onnx")
        assert rc == 0 and out.strip().endswith("PASS"), (out, err)
    assert open(work / "named.onnx", "rb").read() == open(work / "numbered.onnx", "rb").read()
    rc, out, err = cli(capsys, "validate", "named.onnx", "--against", f"{MODULE}:two_input_net", "--data", "named.npz")
    assert rc == 0 and out.strip().endswith("PASS"), (out, err)
    np.savez(work / "wrong.npz", image=x, m=m)
    rc, out, err = cli(capsys, f"{MODULE}:two_input_net", "--calib", "wrong.npz", "--scheme", "uniform", "-o", "w.onnx")
    assert_user_error(rc, err, "has arrays ['image', 'm']; forward takes x, m: store the inputs under those names "
                               "from the first on (x is missing)")
    rc, out, err = cli(capsys, f"{MODULE}:flagged_net", "--calib", "wrong.npz", "--scheme", "uniform", "-o", "w.onnx")
    assert_user_error(rc, err, "store the inputs under 'x'")  # a flag (return_features=False) is no array's name
    np.savez(work / "gap.npz", x0=x, x2=m)
    rc, out, err = cli(capsys, f"{MODULE}:two_input_net", "--calib", "gap.npz", "--scheme", "uniform", "-o", "w.onnx")
    assert_user_error(rc, err, "has arrays x0, x2 but no x1")
    assert not (work / "w.onnx").exists()


def test_npz_names_against_forward_names_from_a_fresh_eyes_round(work, capsys):
    """forward(self, x1, x0) with np.savez(x1=..., x0=...): the numbered convention fed x0 to the first input, and
    compile and validate said PASS (the file fed by name was 104 off); forward(self, x, y=None) with labels under y
    compiled the loss; a fallback-named file's validate refused the .npz its compile took."""
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    np.savez(work / "xs.npz", x1=a, x0=b)
    rc, out, err = cli(capsys, f"{MODULE}:swapped_names_net", "--calib", "xs.npz", "--scheme", "uniform", "-o", "s.onnx")
    assert_user_error(rc, err, "stores the inputs as x0, x1, ..., read by position, but forward names its inputs x1, "
                               "x0: which is which is ambiguous")
    np.savez(work / "xy.npz", x=a, y=rng.integers(0, 3, 8))
    rc, out, err = cli(capsys, f"{MODULE}:loss_when_labelled_net", "--calib", "xy.npz", "--scheme", "uniform",
                       "--bits", "8", "-o", "l.onnx")
    assert rc == 0, err
    assert [i.name for i in onnx.load(work / "l.onnx").graph.input] == ["input"]  # y is the labels, not an input
    np.savez(work / "fw.npz", fc=a, weight=b)
    rc, out, err = cli(capsys, f"{MODULE}:attribute_named_inputs_net", "--calib", "fw.npz", "--scheme", "uniform",
                       "--bits", "8", "-o", "f.onnx")
    assert rc == 0 and [i.name for i in onnx.load(work / "f.onnx").graph.input] == ["input_0", "input_1"], err
    for flags in (["--calib", "fw.npz"], ["--data", "fw.npz"]):
        rc, out, err = cli(capsys, "validate", "f.onnx", "--against", f"{MODULE}:attribute_named_inputs_net", *flags)
        assert rc == 0 and out.strip().endswith("PASS"), (out, err)


def test_npz_of_inputs_beside_labels_under_another_name_is_taken(work, capsys):
    """np.savez(images=..., y=...) for a one-input model was refused ("store the inputs under 'x'"), though labels
    beside the inputs are no input (README) and x + labels was taken."""
    calib = np.load(work / "calib.npy")
    for labels in ("y", "labels", "targets"):
        np.savez(work / "il.npz", images=calib, **{labels: np.arange(len(calib)) % 3})
        rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "il.npz", "--scheme", "uniform", "--bits",
                           "8", "-o", "il.onnx")
        assert rc == 0, err
        rc, out, err = cli(capsys, "validate", "il.onnx", "--against", "weights.pt", "--arch", SPEC, "--calib",
                           "il.npz", "--data", "il.npz")
        assert rc == 0 and out.strip().endswith("PASS"), (out, err)
    np.savez(work / "two.npz", images=calib, masks=calib)  # two arrays, neither labels: still ambiguous
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "two.npz", "-o", "two.onnx")
    assert_user_error(rc, err, "has arrays ['images', 'masks']; store the inputs under 'x'")


def test_options_that_fit_to_data_ask_for_calib_not_an_input_shape(work, capsys):
    """Without --calib or --input-shape, --avg-wbits and adaptive rounding asked for --input-shape; given it, they
    then said they need --calib."""
    for extra in (["--avg-wbits", "3"], ["--weight-rounding", "adaptive"]):
        rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, *extra, "-o", "a.onnx")
        assert_user_error(rc, err, f"{' '.join(extra[:1]) if extra[0] == '--avg-wbits' else ' '.join(extra)} needs "
                                   "calibration data: pass --calib FILE")
    assert not os.path.exists("a.onnx")


def test_default_output_names_tell_the_file_forms_apart(work, capsys):
    """The default name held scheme and bits only: a --emit custom, --per-tensor or adaptive-rounding compile after
    the default one overwrote its file without a word."""
    x = np.random.default_rng(4).standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.save(work / "c.npy", x)
    runs = [([], "weights_apot4.onnx"), (["--emit", "custom"], "weights_apot4_custom.onnx"),
            (["--per-tensor"], "weights_apot4_pertensor.onnx"),
            (["--weight-rounding", "adaptive", "--emit", "shift-add"], "weights_apot4_adaptive_shiftadd.onnx")]
    for extra, name in runs:
        rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "c.npy", "--no-validate", *extra)
        assert rc == 0 and os.path.exists(name), (extra, out, err)
    assert len({open(name, "rb").read() for _, name in runs}) == len(runs)


def test_files_and_names_the_sweep_found_misread(work, capsys):
    """An .npz named .NPZ was "not a non-empty numeric array"; an object array was told to save with numpy.save
    (it had); an empty .onnx "has 0 input(s)"; the demo named Python keywords; the default name and the header
    line said --scheme where --wscheme/--ascheme chose other levels."""
    x = np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32)
    with open(work / "UPPER.NPZ", "wb") as fh:  # np.savez would append .npz to the name
        np.savez(fh, inputs=x)
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "UPPER.NPZ", "--wscheme", "uniform",
                       "--ascheme", "uniform", "--bits", "8")
    assert rc == 0, err
    assert "(uniform W8A8)" in out.splitlines()[0] and os.path.exists("weights_uniform8.onnx"), out
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "UPPER.NPZ", "--wscheme", "apot",
                       "--ascheme", "uniform", "--abits", "8", "--no-validate")
    assert rc == 0 and os.path.exists("weights_apot4_uniform8.onnx"), err
    np.save(work / "obj.npy", np.array([x[0], "text"], dtype=object), allow_pickle=True)
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "obj.npy", "-o", "o.onnx")
    assert_user_error(rc, err, "holds Python objects (an object array)")
    (work / "text.npy").write_text("1,2,3\n4,5,6\n")  # was also "holds Python objects"
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "text.npy", "-o", "o.onnx")
    assert_user_error(rc, err, "'text.npy' is not an .npy/.npz file or a tensor saved with torch.save (text, or another format)")
    (work / "empty.onnx").write_bytes(b"")
    rc, out, err = cli(capsys, "validate", "empty.onnx", "--against", "weights.pt", "--arch", SPEC)
    assert_user_error(rc, err, "'empty.onnx' is not an ONNX file (it is empty)")
    rc, out, err = cli(capsys, "demo", "--scheme", "fp32", "--wbits", "4")
    assert_user_error(rc, err, "--wbits cannot apply to --scheme fp32")


def test_binary_levels_take_their_own_bit_width(work, capsys):
    """Binary levels are 1-bit: --wbits 1 with --wscheme binary was refused as outside 2..8 (and --wbits 4, which
    changes nothing, was ignored)."""
    x = np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32)
    np.save(work / "calib8.npy", x)
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib8.npy", "--wscheme", "binary",
                       "--wbits", "1", "--ascheme", "uniform", "--abits", "8", "--keep-first-last", "quant")
    assert rc == 0 and "(W1 binary / A8 uniform)" in out.splitlines()[0], (out, err)
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib8.npy", "--scheme", "uniform",
                       "--bits", "1")
    assert_user_error(rc, err, "--bits 1 is outside 2..8")


def test_every_pipeline_pass_is_importable_from_qcompile_passes():
    """README builds pipelines from qcompile.passes; PairSafeInt8Weights and four more were only in submodules."""
    import qcompile.passes as passes
    from qcompile.options import CompileOptions
    from qcompile.pipeline import build_passes

    names = {type(p).__name__ for p in build_passes(CompileOptions(scheme="uniform", bits=8, int8_weights="s8-safe"),
                                                    None)}
    assert names and all(hasattr(passes, n) and n in passes.__all__ for n in names), names


def test_validate_of_a_token_model_without_data_says_to_pass_data(work, capsys):
    """Random float inputs for a file that takes int64 token ids: 'internal error' from nn.Embedding before."""
    np.save("ids.npy", np.random.default_rng(0).integers(0, 20, (8, 5)))
    from tests.models import TokenMean

    torch.save(TokenMean().state_dict(), "tokens.pt")
    assert cli(capsys, "tokens.pt", "--arch", "tests.models:TokenMean", "--calib", "ids.npy", "--scheme", "fp32",
               "-o", "tok.onnx")[0] == 0
    rc, out, err = cli(capsys, "validate", "tok.onnx", "--against", "tokens.pt", "--arch", "tests.models:TokenMean")
    assert_user_error(rc, err, "takes int64 input")
    assert "--data" in err
    rc, out, err = cli(capsys, "validate", "tok.onnx", "--against", "tokens.pt", "--arch", "tests.models:TokenMean",
                       "--data", "ids.npy")
    assert rc == 0 and "PASS" in out, err


def test_validate_data_on_a_data_free_file_is_validation_input_only(work, capsys):
    """A file calibrated from BatchNorm statistics (no --calib) records no calibration data; validate --data
    calibrated the rebuilt simulation on --data, another simulation than the file's: a correct file FAILed with
    23-45% of its codes differing."""
    import importlib

    torch.save(importlib.import_module(MODULE).bn_stack().eval().state_dict(), "bn.pt")
    spec = f"{MODULE}:bn_stack"
    rc, out, err = cli(capsys, "bn.pt", "--arch", spec, "--input-shape", SHAPE, "--scheme", "uniform", "--bits", "8",
                       "--keep-first-last", "fp32", "-o", "df.onnx")
    assert rc == 0 and "PASS" in out, err
    # its validation ran on random inputs: their top-1 agreement with the float model says little, and the line
    # says where it comes from (a user read 68.75% as the file's accuracy against float)
    assert "vs the float model on random N(0, 1) inputs (no --calib: not the model's data, so this says little of " \
           "its accuracy; --calib/--data gives a real figure): output SQNR" in out, out
    rc, out, err = cli(capsys, "validate", "df.onnx", "--against", "bn.pt", "--arch", spec, "--data", "calib.npy")
    assert rc == 0 and "validation on 6 inputs" in out and "PASS" in out, out + err
    assert "vs the float model: output SQNR" in out, out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_validate_against_a_model_in_another_float_precision(work, capsys, dtype):
    """compile takes a half/float64 model from its float32 values; validate ran the model itself on float32 inputs
    ("Input type (float) and bias type (c10::Half)": internal error)."""
    model = torch.load("full.pt", weights_only=False).to(dtype)
    torch.save(model, "other.pt")
    for scheme in (("--scheme", "fp32"), ("--scheme", "uniform", "--bits", "8")):
        rc, out, err = cli(capsys, "other.pt", "--trust-pickle", "--calib", "calib.npy", *scheme, "-o", "o.onnx")
        assert rc == 0, err
        rc, out, err = cli(capsys, "validate", "o.onnx", "--against", "other.pt", "--trust-pickle", "--data", "calib.npy")
        assert rc == 0 and "PASS" in out, out + err


def test_validate_of_a_file_with_int32_ids(work, capsys):
    """A file compiled from Python with int32 ids: --data's arrays are read as int64, the fingerprint differed
    ("not the calibration data") and the file takes int32."""
    from tests.models import TokenMean

    model = TokenMean().eval()
    torch.save(model.state_dict(), "tokens.pt")
    ids = np.random.default_rng(0).integers(0, 20, (8, 5))
    np.save("ids.npy", ids.astype(np.int32))
    result = qcompile.compile(model, calib=torch.from_numpy(ids.astype(np.int32)), scheme="uniform", bits=8,
                              output="tok32.onnx", progress=False)
    assert result.report.passed
    rc, out, err = cli(capsys, "validate", "tok32.onnx", "--against", "tokens.pt", "--arch", "tests.models:TokenMean",
                       "--data", "ids.npy")
    assert rc == 0 and "PASS" in out, out + err
    # the same ids saved as float32: "not the calibration data" sent the user looking for other data
    np.save("ids_float.npy", ids.astype(np.float32))
    rc, out, err = cli(capsys, "validate", "tok32.onnx", "--against", "tokens.pt", "--arch", "tests.models:TokenMean",
                       "--data", "ids_float.npy")
    assert_user_error(rc, err, "--data holds floats for input 'input' of 'tok32.onnx', which takes integer ids")
    assert "ids.astype(np.int64)" in err


def test_the_compile_says_how_long_validation_took(work, capsys):
    """Validation is most of a large model's compile (ResNet-50 at 224x224: 31 of 40 s) and nothing said so."""
    import json

    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib.npy", "-o", "q.onnx", "--json", "s.json")
    assert rc == 0, err
    assert re.search(r"wrote \S*q.onnx \([0-9.]+ KiB\) in [0-9.]+ s \(validation [0-9.]+ s\)", out), out
    assert json.loads((work / "s.json").read_text())["validation_seconds"] > 0


def test_pass_reports_are_capped_without_verbose(tmp_path, capsys):
    """A MobileNetV3's InsertQuantizers listed all 54 layers on one line of the pass table; a pass now shows its
    first lines and a count, ``--verbose`` shows them all, and ``--json`` keeps them all either way."""
    import json

    from qcompile.cli import REPORT_ITEMS, _print_timing
    from qcompile.passes.base import PassTiming

    timing = PassTiming("InsertQuantizers", 0.01, True, [f"layer{i}: W4 apot / A4 apot" for i in range(10)])
    _print_timing(timing)
    short = capsys.readouterr().out
    assert short.count("layer") == REPORT_ITEMS - 1 and f"... {10 - REPORT_ITEMS + 1} more (--verbose" in short
    _print_timing(timing, verbose=True)
    assert capsys.readouterr().out.count("layer") == 10
    _print_timing(PassTiming("FoldBatchNorm", 0.01, True, ["a", "b", "c", "d"][:REPORT_ITEMS]))
    assert "more" not in capsys.readouterr().out  # up to REPORT_ITEMS lines are shown whole


def test_validate_refuses_a_leaf_module_it_would_not_use(work, capsys):
    """validate took --leaf-module and ignored it: the simulation is rebuilt with the leaf modules the file's
    compile recorded (and a float file is not traced at all)."""
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib.npy", "--leaf-module", "pool",
                       "-o", "q.onnx")
    assert rc == 0, err
    base = ("validate", "q.onnx", "--against", "weights.pt", "--arch", SPEC, "--data", "calib.npy")
    for same in ((), ("--leaf-module", "pool")):
        rc, out, err = cli(capsys, *base, *same)
        assert rc == 0 and "PASS" in out, err
    rc, out, err = cli(capsys, *base, "--leaf-module", "fc")
    assert_user_error(rc, err, "with the leaf modules its compile recorded (pool), not --leaf-module fc")
    assert cli(capsys, "weights.pt", "--arch", SPEC, *FP32_OUT)[0] == 0
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", "weights.pt", "--arch", SPEC, "--leaf-module", "pool")
    assert_user_error(rc, err, "--leaf-module does not apply to 'out.onnx', a float file")


# --- found by a sweep of degenerate data ---------------------------------------------------------------------
def test_non_finite_or_float32_overflowing_data_files_are_refused_in_one_line(work, capsys):
    """validate --data of NaN compared NaN with NaN as equal: max abs err 0, SQNR inf, PASS; a float64 value past
    float32's range printed numpy's overflow warning, then claimed the file held NaN or inf."""
    assert cli(capsys, "weights.pt", "--arch", SPEC, *FP32_OUT)[0] == 0
    x = np.random.default_rng(2).standard_normal((6, 3, 8, 8))
    np.save("nan.npy", np.where(x > 1, np.nan, x).astype(np.float32))
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", "weights.pt", "--arch", SPEC, "--data", "nan.npy")
    assert_user_error(rc, err, "holds")
    assert "NaN or +inf" in err
    huge = x.copy()
    huge[0, 0, 0, 0] = 1e300
    np.save("huge.npy", huge)
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "huge.npy", "-o", "q.onnx")
    assert_user_error(rc, err, "beyond float32's range")
    assert not os.path.exists("q.onnx")


def test_a_model_computing_nan_fails_validation(work, capsys):
    """A float compile of a model that computes NaN on its data (a square root of negative values) validated with
    NaN against NaN as a match: PASS, SQNR inf."""
    (work / "sqrt_model.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Sqrt(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 4)

            def forward(self, x):
                return torch.sqrt(self.fc(x) - 100.0)

        def sqrt_net():
            return Sqrt()
    '''))
    np.save("rows.npy", np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    rc, out, err = cli(capsys, "sqrt_model:sqrt_net", "--calib", "rows.npy", "--scheme", "fp32", "-o", "s.onnx")
    assert rc == 1, (out, err)
    assert "computes NaN in 64 of its 64 output values" in err


def test_calibration_arrays_for_more_inputs_than_the_model_takes_name_the_model(work, capsys):
    """An .npz with x0 and x1 for a one-input model asked for a second --input-shape, which the model then refused."""
    x = np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez("two.npz", x0=x, x1=x)
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "two.npz", "--input-shape", SHAPE)
    assert_user_error(rc, err, "forward takes 1 input(s)")


def test_calibration_data_with_an_axis_too_many_is_named_as_such(work, capsys):
    """Samples of shape (1, 3, 8, 8) against --input-shape 1,3,8,8: the message only offered an example of shape
    (1, 1, 3, 8, 8), which the model then refused."""
    np.save("extra_axis.npy", np.random.default_rng(1).standard_normal((6, 1, 3, 8, 8)).astype(np.float32))
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "extra_axis.npy", "--input-shape", SHAPE)
    assert_user_error(rc, err, "drop the extra axis of the calibration data")


def test_excluding_every_layer_warns_that_the_file_is_the_float_model(work, capsys):
    """--exclude '*': the header said the scheme asked for and the file was the float model, without a word."""
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib.npy", "--exclude", "*", "-o", "f.onnx")
    assert rc == 0, err
    assert "no layer is quantized: every layer is kept float (--exclude '*')" in err


# --- found by a tester's sweep of the command line ------------------------------------------------------------
def test_validate_refuses_input_sizes_no_tensor_can_hold(work, capsys):
    """A dimension or --samples past int64 was an internal error (torch.randn: "Overflow when unpacking long long");
    a count that fits int64 but whose inputs have more values than a tensor can hold failed the same way."""
    assert cli(capsys, "weights.pt", "--arch", SPEC, *FP32_OUT)[0] == 0
    base = ("validate", "out.onnx", "--against", "weights.pt", "--arch", SPEC)
    rc, out, err = cli(capsys, *base, "--input-shape", "1,3,99999999999999999999,8")
    assert_user_error(rc, err, "invalid --input-shape '1,3,99999999999999999999,8': dimension 99999999999999999999 "
                               "is too large")
    rc, out, err = cli(capsys, *base, "--samples", "99999999999999999999")
    assert_user_error(rc, err, "99999999999999999999 is too large (past 2**63 - 1); give a count such as 16")
    rc, out, err = cli(capsys, *base, "--samples", str(2**62))
    assert_user_error(rc, err, f"--samples {2**62} random inputs of shape (3, 8, 8) are {2**62 * 192} values, more "
                               "than a tensor can hold; use fewer --samples")


def test_validate_out_of_memory_names_the_samples(work, capsys, monkeypatch):
    """validate --samples 100000000000 said "use a smaller --input-shape, fewer --calib samples": --calib is the
    compile's option, and validate's inputs are --samples random ones (or --data)."""
    assert cli(capsys, "weights.pt", "--arch", SPEC, *FP32_OUT)[0] == 0
    randn = torch.randn

    def no_memory(size, *args, **kwargs):  # as torch's allocator fails (allocating it for real is no test)
        if tuple(size)[:1] == (10**11,):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 76800000000000 bytes.")
        return randn(size, *args, **kwargs)

    monkeypatch.setattr(torch, "randn", no_memory)
    rc, out, err = cli(capsys, "validate", "out.onnx", "--against", "weights.pt", "--arch", SPEC,
                       "--samples", str(10**11))
    assert_user_error(rc, err, "out of memory; use fewer --samples (or a --data file with fewer samples)")
    assert "--calib" not in err


def test_validate_refuses_corrupt_qcompile_metadata_in_one_line(work, capsys):
    """qcompile.options edited to "{garbage" was an internal error (JSONDecodeError); a damaged calibration or model
    record was taken as absent, and the file validated as data-free or without its weights' check."""
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib.npy", "--scheme", "uniform", "--bits",
                       "8", "--no-validate", "-o", "q.onnx")
    assert rc == 0, err
    for key, value, said in [("qcompile.options", "{garbage", "is not JSON"),
                             ("qcompile.options", "[1, 2]", "is a JSON list, not the record qcompile writes"),
                             ("qcompile.calibration", "nope", "is not JSON"),
                             ("qcompile.model", "{\"sha256\": ", "is not JSON"),
                             ("qcompile.activations", "[{\"x\": 1}]", "is a record of another form")]:
        model = onnx.load(work / "q.onnx")
        assert key in {p.key for p in model.metadata_props}
        for prop in model.metadata_props:
            if prop.key == key:
                prop.value = value
        onnx.save(model, work / "bad.onnx")
        rc, out, err = cli(capsys, "validate", "bad.onnx", "--against", "weights.pt", "--arch", SPEC, "--data",
                           "calib.npy")
        assert_user_error(rc, err, f"'bad.onnx' has corrupt qcompile metadata: {key!r} {said}")
        assert "compile the model again" in err


def test_validate_of_a_file_whose_calibration_record_was_removed_says_so(work, capsys):
    """Without its qcompile.calibration record a file reads as data-free; its model needs data, and the message
    was the compile's "cannot calibrate ... pass calibration inputs with --calib FILE.npy", though --calib was given."""
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib.npy", "--scheme", "uniform", "--bits",
                       "8", "--no-validate", "-o", "q.onnx")
    assert rc == 0, err
    model = onnx.load(work / "q.onnx")
    kept = [p for p in model.metadata_props if p.key != "qcompile.calibration"]
    assert len(kept) < len(model.metadata_props)
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, work / "nocal.onnx")
    rc, out, err = cli(capsys, "validate", "nocal.onnx", "--against", "weights.pt", "--arch", SPEC, "--calib",
                       "calib.npy")
    assert_user_error(rc, err, "'nocal.onnx' has no calibration record (qcompile.calibration)")
    assert "metadata was edited or lost; compile the model again" in err


def test_unreadable_input_files_say_permission_denied(work, capsys, monkeypatch):
    """A file the user cannot read was "not a PyTorch checkpoint ...; save one with torch.save", "not a readable
    .npy/.npz array (PermissionError); save it with numpy.save", "cannot parse config file ...; fix the syntax there".
    (Tests run as root, whom chmod 000 does not stop: open refuses the files here.)"""
    import builtins
    import shutil

    for name in ("noread.pt", "noread.npy", "noread.onnx"):
        shutil.copy({"pt": "weights.pt", "npy": "calib.npy", "onnx": "calib.npy"}[name.split(".")[1]], name)
    (work / "noread.toml").write_text("'fc' = {scheme = 'uniform', bits = 8}\n")
    assert cli(capsys, "weights.pt", "--arch", SPEC, *FP32_OUT)[0] == 0
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)).startswith("noread."):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    cases = [(["noread.pt", "--arch", SPEC, "--calib", "calib.npy"], "model file 'noread.pt'"),
             (["weights.pt", "--arch", SPEC, "--calib", "noread.npy"], "--calib file 'noread.npy'"),
             (["weights.pt", "--arch", SPEC, "--calib", "calib.npy", "--config", "noread.toml"],
              "config file 'noread.toml'"),
             (["validate", "noread.onnx", "--against", "weights.pt", "--arch", SPEC], "ONNX file 'noread.onnx'"),
             (["validate", "out.onnx", "--against", "noread.pt", "--arch", SPEC], "model file 'noread.pt'"),
             (["validate", "out.onnx", "--against", "weights.pt", "--arch", SPEC, "--data", "noread.npy"],
              "--data file 'noread.npy'")]
    for args, who in cases:
        output = [] if args[0] == "validate" else ["--scheme", "uniform", "--bits", "8", "-o", "q.onnx"]
        rc, out, err = cli(capsys, *args, *output)
        assert_user_error(rc, err, f"{who} cannot be read (permission denied); check its permissions")
        assert not os.path.exists("q.onnx")


SQUEEZED_MODEL = textwrap.dedent('''
    import torch

    class Squeezed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3), keepdim=True).squeeze())

    def make():
        torch.manual_seed(0)
        return Squeezed().eval()
''')


def test_an_output_whose_rank_follows_the_batch_is_a_warning_of_the_command(work, capsys):
    """The compile's note on an output whose rank follows the batch (.squeeze() of a batch-1 example) reaches the
    command's stderr and --json warnings, as the other notes do."""
    import json

    (work / "qc_squeezed.py").write_text(SQUEEZED_MODEL)
    rc, out, err = cli(capsys, "qc_squeezed:make", "--calib", "calib.npy", "--scheme", "uniform", "--bits", "8",
                       "-o", "sq.onnx", "--json", "sq.json")
    assert rc == 0 and "PASS" in out, err
    assert "a .squeeze() that also takes away a batch of 1?" in err
    assert any(".squeeze()" in w for w in json.loads((work / "sq.json").read_text())["warnings"])


def test_validate_names_token_ids_beyond_the_embedding(work, capsys):
    """qcompile validate --data with a negative token id stopped with 'internal error: IndexError' (the simulation's
    embedding), and one past the table was onnxruntime's Gather error blamed on the file; the compile's own
    one line names the id and the table now (found by a fresh-eyes test)."""
    (work / "qc_text_model.py").write_text(TEXT_MODEL)
    ids = np.random.default_rng(3).integers(0, 50, (12, 7))
    np.save(work / "ids.npy", ids)
    rc, out, err = cli(capsys, "qc_text_model:make", "--calib", "ids.npy", "--scheme", "uniform", "--bits", "8",
                       "-o", "text.onnx")
    assert rc == 0, err
    for bad, value in (("neg.npy", -1), ("big.npy", 77)):
        held = ids[:4].copy()
        held[0, 0] = value
        np.save(work / bad, held)
        rc, out, err = cli(capsys, "validate", "text.onnx", "--against", "qc_text_model:make", "--calib", "ids.npy",
                           "--data", bad)
        assert_user_error(rc, err, f"--data holds token id {value} but the embedding 'emb' has 50 rows")


def test_a_very_large_calibration_set_is_warned_about_before_the_compile(work, capsys, monkeypatch):
    """A million-sample --calib ran for minutes with no word (arrays are taken whole; 128 k digits took 80 s)."""
    import warnings

    import qcompile.api as api
    from qcompile.errors import QuantizationWarning

    monkeypatch.setattr(api, "MANY_CALIBRATION_SAMPLES", 4)  # the calibration file here holds 6
    rc, out, err = cli(capsys, "weights.pt", "--arch", SPEC, "--calib", "calib.npy", "--scheme", "uniform", "--bits",
                       "8", "--no-validate", "-o", "q.onnx")
    assert rc == 0, err
    assert "qcompile: warning: the calibration data holds 6 samples, all of which calibration runs" in err
    model = importlib.import_module(MODULE).TinyCNN().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qcompile.compile(model, calib=torch.from_numpy(np.load("calib.npy")), scheme="uniform", bits=8,
                         validate=False, progress=False)
    assert any(issubclass(w.category, QuantizationWarning) and "pass a subset" in str(w.message) for w in caught)


def test_validate_on_data_far_from_the_float_model_warns_as_the_compile_does(work, capsys):
    """`qcompile validate --data` with pixels in 0..16 for a model trained on [-1, 1]: "top-1 agreement 39 %" with
    the float model, PASS and no word, where the compile warns below half agreement."""
    import qcompile.models
    from qcompile.models.digits import load_split

    x = load_split()[0][:32].numpy()
    np.save(work / "digits.npy", x)
    weights = os.path.join(os.path.dirname(qcompile.models.__file__), "digits_cnn.pt")
    arch = ("--arch", "qcompile.models.digits:digits_cnn")
    rc, out, err = cli(capsys, weights, *arch, "--calib", "digits.npy", "--scheme", "uniform", "--bits", "8",
                       "-o", "u8.onnx")
    assert rc == 0, err
    np.save(work / "held.npy", load_split()[2][:64].numpy())
    np.save(work / "held16.npy", (load_split()[2][:64].numpy() + 1) * 8)
    rc, out, err = cli(capsys, "validate", "u8.onnx", "--against", weights, *arch, "--calib", "digits.npy",
                       "--data", "held.npy")
    assert rc == 0 and "PASS" in out and "warning" not in err, err
    rc, out, err = cli(capsys, "validate", "u8.onnx", "--against", weights, *arch, "--calib", "digits.npy",
                       "--data", "held16.npy")
    assert rc == 0 and "PASS" in out, err  # the file computes its simulation
    assert "qcompile: warning: the quantized model predicts as the float model on only" in err, (out, err)
    assert err.rstrip().endswith("and check that --data is preprocessed as the --calib data were"), err
