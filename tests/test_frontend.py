"""Frontend: the three loading paths (state dict + arch, full pickle, factory spec), bad model files, input shapes,
and tracing with torch.fx (shape propagation, data-dependent control flow and ``leaf_modules``)."""
from __future__ import annotations

import importlib
import operator
import os
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn as nn

import qcompile
from qcompile.errors import UserError
from qcompile.frontend import load_model, parse_input_shape, resolve_factory, trace
from tests.models import MLP, DepthwiseSeparableNet, ResidualCNN, example_input

ATOL = 1e-6  # tracing and loading reorder no arithmetic: outputs agree to float32 round-off

USER_MODULE = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class UserNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 5)
            self.fc2 = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))


    def user_net():
        return UserNet()


    def not_a_module():
        return 42


    def broken_factory():
        raise RuntimeError("needs a config")


    def offline_factory():  # a factory that downloads its weights, on a machine without network
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")


    def factory_with_arguments(classes):
        return UserNet()


    CONSTANT = 3
''')


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    """load_model puts the current directory on sys.path (as `python` does); undo it after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A model module written to tmp_path, which becomes the current directory."""
    name = f"qc_user_models_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, str(tmp_path))  # so the test can build the model; restored by _restore_sys_path
    importlib.invalidate_caches()
    yield name
    sys.modules.pop(name, None)


def _build_user_net(name: str, seed: int = 0) -> nn.Module:
    module = importlib.import_module(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return module.UserNet().eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def _assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(err.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text


# --- loading: state dict + --arch -------------------------------------------------------------------------


def test_state_dict_with_arch_loads_the_saved_weights(tmp_path):
    saved = ResidualCNN(seed=3)
    path = tmp_path / "weights.pt"
    torch.save(saved.state_dict(), path)
    loaded = load_model(str(path), arch="tests.models:ResidualCNN")  # the factory builds seed-0 weights
    assert isinstance(loaded, ResidualCNN) and not loaded.training
    x = example_input(saved, seed=1)
    with torch.no_grad():
        _close(loaded(x), saved(x))


def test_torchscript_archive_loads_its_weights_into_arch(tmp_path):
    model = ResidualCNN(seed=3).eval()
    x = example_input(model, seed=1)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(model, x), str(path))
    with pytest.raises(UserError, match="TorchScript archive, which torch.fx cannot trace; pass --arch"):
        load_model(str(path))
    loaded = load_model(str(path), arch="tests.models:ResidualCNN")  # the factory's own weights are replaced
    assert isinstance(loaded, ResidualCNN)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model"])
def test_state_dict_inside_a_checkpoint_wrapper(tmp_path, wrapper):
    saved = MLP(seed=4)
    path = tmp_path / "ckpt.pt"
    torch.save({wrapper: saved.state_dict(), "epoch": 7}, path)
    loaded = load_model(str(path), arch="tests.models:MLP")
    x = example_input(saved, seed=2)
    with torch.no_grad():
        _close(loaded(x), saved(x))


def test_state_dict_without_arch_names_the_flag(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(MLP().state_dict(), path)
    with pytest.raises(UserError) as err:
        load_model(str(path))
    _assert_one_line(err, "state dict", "--arch")


def test_state_dict_with_wrong_keys_is_refused(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(MLP().state_dict(), path)
    with pytest.raises(UserError) as err:
        load_model(str(path), arch="tests.models:ResidualCNN")
    _assert_one_line(err, "does not fit --arch", "missing", "unexpected fc1.weight")


def test_state_dict_with_wrong_shapes_is_refused(tmp_path):
    path = tmp_path / "five_classes.pt"
    torch.save(ResidualCNN(num_classes=5).state_dict(), path)
    with pytest.raises(UserError) as err:
        load_model(str(path), arch="tests.models:ResidualCNN")
    _assert_one_line(err, "does not fit --arch", "other shapes: fc.weight (5, 16) vs (10, 16)")


def test_arch_may_be_the_factory_itself_and_wrong_types_get_one_line(tmp_path):
    # from Python, arch=ResidualCNN (the class) or a function raised "'type' object has no attribute 'partition'",
    # and load_model(None) a TypeError from os.stat
    path = tmp_path / "weights.pt"
    torch.save(MLP().state_dict(), path)
    assert isinstance(load_model(str(path), arch=MLP), MLP)
    assert isinstance(load_model(path, arch=lambda: MLP()), MLP)  # a pathlib.Path too
    for source, arch, needle in ((None, None, "got NoneType"), (3, None, "got int"),
                                 (MLP(), None, "this is a model already"), (str(path), 3, "arch takes"),
                                 (str(path), MLP(), "load the weights into it")):
        with pytest.raises(UserError) as err:
            load_model(source, arch=arch)
        _assert_one_line(err, needle)


def test_complex_weights_are_refused(tmp_path):
    # load_state_dict kept their real parts with a multi-line UserWarning, and the compile passed
    path = tmp_path / "weights.pt"
    state = MLP().state_dict()
    key = next(iter(state))
    state[key] = state[key].to(torch.complex64)
    torch.save(state, path)
    with pytest.raises(UserError) as err:
        load_model(str(path), arch="tests.models:MLP")
    _assert_one_line(err, "holds complex tensors", key)


def test_a_checkpoint_with_damaged_weights_is_refused(tmp_path):
    """torch.load does not check the zip archive's CRCs: 100 bytes flipped inside a weight loaded as garbage values
    (one of 1258 where the largest had been 0.19), and the compile passed."""
    import zipfile

    path = tmp_path / "weights.pt"
    torch.save(MLP().state_dict(), path)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 64)
    data = bytearray(path.read_bytes())
    local = info.header_offset  # the local header: its name and extra field lengths at bytes 26 and 28
    start = local + 30 + int.from_bytes(data[local + 26:local + 28], "little") + \
        int.from_bytes(data[local + 28:local + 30], "little")
    for i in range(start + 8, start + 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)  # it loads, with other values
    with pytest.raises(UserError) as err:
        load_model(str(path), arch="tests.models:MLP")
    _assert_one_line(err, "is damaged", "fails the archive's CRC check")
    # a checkpoint saved without CRCs (torch.serialization.set_crc32_options(False): every stored CRC is 0) loads
    if hasattr(torch.serialization, "set_crc32_options"):
        plain = tmp_path / "no_crc.pt"
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(MLP().state_dict(), plain)
        finally:
            torch.serialization.set_crc32_options(True)
        assert isinstance(load_model(str(plain), arch="tests.models:MLP"), MLP)


def test_an_unreadable_checkpoint_says_permission_denied(tmp_path, monkeypatch):
    """It was "not a PyTorch checkpoint ([Errno 13] Permission denied ...); save one with torch.save". (Tests run as
    root, whom chmod 000 does not stop: open refuses the file here.)"""
    import builtins

    path = tmp_path / "weights.pt"
    torch.save(MLP().state_dict(), path)
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(UserError) as err:
        load_model(str(path), arch="tests.models:MLP")
    _assert_one_line(err, "cannot be read (permission denied); check its permissions")
    assert "torch.save" not in str(err.value)


def test_tensor_file_is_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError) as err:
        load_model(str(path), arch="tests.models:MLP")
    _assert_one_line(err, "not a state dict")


# --- loading: full pickle ---------------------------------------------------------------------------------


def test_full_pickle_is_refused_without_trust_pickle(tmp_path, user_module):
    path = tmp_path / "model.pt"
    torch.save(_build_user_net(user_module), path)
    with pytest.raises(UserError) as err:
        load_model(str(path))
    _assert_one_line(err, "full pickle", "--trust-pickle")


def test_full_pickle_loads_with_trust_pickle_from_the_current_directory(tmp_path, user_module):
    reference = _build_user_net(user_module, seed=5)
    path = tmp_path / "model.pt"
    torch.save(reference, path)
    # Forget the module and drop tmp_path from sys.path: unpickling must find it through the current directory.
    sys.modules.pop(user_module, None)
    sys.path[:] = [p for p in sys.path if p not in ("", ".", str(tmp_path))]
    loaded = load_model(str(path), trust_pickle=True)
    assert type(loaded).__name__ == "UserNet" and not loaded.training
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _close(loaded(x), reference(x))


def test_full_pickle_with_arch_says_to_drop_it(tmp_path, user_module):
    path = tmp_path / "model.pt"
    torch.save(_build_user_net(user_module), path)
    with pytest.raises(UserError) as err:
        load_model(str(path), arch=f"{user_module}:user_net", trust_pickle=True)
    _assert_one_line(err, "drop --arch")


def test_full_pickle_whose_class_is_gone_names_the_fix(tmp_path, user_module):
    path = tmp_path / "model.pt"
    torch.save(_build_user_net(user_module), path)
    os.remove(tmp_path / f"{user_module}.py")
    sys.modules.pop(user_module, None)
    importlib.invalidate_caches()
    with pytest.raises(UserError) as err:
        load_model(str(path), trust_pickle=True)
    _assert_one_line(err, "cannot unpickle", "importable")


# --- loading: factory spec --------------------------------------------------------------------------------


def test_spec_builds_the_model_with_seeded_weights():
    first = load_model("tests.models:MLP")
    second = load_model("tests.models:MLP")
    assert isinstance(first, MLP) and not first.training
    x = example_input(first, seed=3)
    with torch.no_grad():
        _close(first(x), second(x))


def test_spec_from_a_module_in_the_current_directory(user_module):
    model = load_model(f"{user_module}:user_net")
    assert type(model).__name__ == "UserNet"


def test_spec_with_arch_is_refused():
    with pytest.raises(UserError) as err:
        load_model("tests.models:MLP", arch="tests.models:MLP")
    _assert_one_line(err, "--arch is not needed")


@pytest.mark.parametrize("suffix, needle", [
    ("no_such_module_qc:f", "cannot import module"),
    ("{mod}:missing", "has no attribute"),
    ("{mod}:CONSTANT", "is not callable"),
    ("{mod}:not_a_module", "not a torch.nn.Module"),
    ("{mod}:broken_factory", "failed building the model (RuntimeError: needs a config)"),
    ("{mod}:offline_factory", "without network access"),
    ("{mod}:factory_with_arguments", "it must build the model with no arguments"),
])
def test_bad_factory_specs(user_module, suffix, needle):
    with pytest.raises(UserError) as err:
        load_model(suffix.format(mod=user_module))
    _assert_one_line(err, needle)


@pytest.mark.parametrize("spec", ["./{mod}.py:UserNet", ".{mod}:UserNet", "{mod}.py:UserNet", "../x/{mod}.py:f"])
def test_a_factory_spec_written_as_a_file_names_the_module_form(user_module, tmp_path, spec):
    """'./common.py:cnn' was an internal error (TypeError: "the 'package' argument is required")."""
    for call in (resolve_factory, load_model):  # as --arch, and as the MODEL argument
        with pytest.raises(UserError) as err:
            call(spec.format(mod=user_module))
        _assert_one_line(err, f"names a file, not a module: give the module name, e.g. {user_module}:")


@pytest.mark.parametrize("body, needle", [("def f(:\n", "SyntaxError"), ("raise RuntimeError('needs CUDA')\n",
                                                                           "RuntimeError: needs CUDA")])
def test_a_factory_module_that_fails_on_import_is_the_users_error(user_module, tmp_path, body, needle):
    """The user's module failing on import was "a qcompile bug, report it" (exit 3)."""
    (tmp_path / "qc_broken_mod.py").write_text(body)
    try:
        with pytest.raises(UserError) as err:
            resolve_factory("qc_broken_mod:f")
        _assert_one_line(err, f"importing module 'qc_broken_mod' from 'qc_broken_mod:f' failed: {needle}")
    finally:
        sys.modules.pop("qc_broken_mod", None)


def test_resolve_factory_needs_module_and_name():
    with pytest.raises(UserError) as err:
        resolve_factory("tests.models")
    _assert_one_line(err, "package.module:factory")


# --- loading: files that are not checkpoints ----------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(UserError) as err:
        load_model(str(tmp_path / "nope.pt"), arch="tests.models:MLP")
    _assert_one_line(err, "does not exist")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(UserError) as err:
        load_model(str(tmp_path))
    _assert_one_line(err, "is a directory")


@pytest.mark.parametrize("content", [
    b"just some words in a text file\nline two\n",
    bytes(torch.randint(0, 256, (1024,), generator=torch.Generator().manual_seed(7), dtype=torch.uint8).tolist()),
    b"",
    b"PK\x03\x04 a truncated zip archive",
], ids=["text", "random-bytes", "empty", "truncated-zip"])
@pytest.mark.parametrize("trust_pickle", [False, True])
def test_file_that_is_not_a_checkpoint(tmp_path, content, trust_pickle):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_model(str(path), arch="tests.models:MLP", trust_pickle=trust_pickle)
    _assert_one_line(err, "not a PyTorch checkpoint")


# --- input shapes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, shape", [("1,3,224,224", (1, 3, 224, 224)), ("1x3x8x8", (1, 3, 8, 8)),
                                         (" 2, 16 ", (2, 16))])
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["1,a,3", "0,3", "", ",", "-1,3", "1.5,3", "1,,8,8", "1,3,"])
def test_invalid_input_shape(text):
    with pytest.raises(UserError) as err:
        parse_input_shape(text)
    _assert_one_line(err, "invalid --input-shape")


@pytest.mark.parametrize("text, said", [
    ("1,1,99999999999999999999,8", "dimension 99999999999999999999 is too large (past 2**63 - 1"),
    ("1,1,4611686018427387904,2", "its 9223372036854775808 values are more than a tensor can hold")])
def test_an_input_shape_no_tensor_can_hold_is_refused(text, said):
    """It parsed, and torch.randn failed as an internal error ("Overflow when unpacking long long", "Storage size
    calculation overflowed")."""
    with pytest.raises(UserError) as err:
        parse_input_shape(text)
    _assert_one_line(err, f"invalid --input-shape {text!r}", said, "give the model's input size")


# --- tracing ------------------------------------------------------------------------------------------------


def test_trace_takes_numpy_example_inputs_as_compile_does():
    """An array was iterated as the tuple of inputs: "the model does not run on inputs of shape [array([[[0. , ...",
    every value of it in the one-line error; a dict of inputs said "inputs of shape ['x']"."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
    x = torch.rand(1, 1, 8, 8)
    for given in (x.numpy(), x.double().numpy(), [x.numpy()]):
        gm = trace(model, given)
        assert torch.equal(gm(x), model(x))
    with pytest.raises(UserError) as err:
        trace(model, {"x": x})
    _assert_one_line(err, "example_inputs must be a tensor or a tuple of tensors")


def test_compile_refuses_a_path_or_a_number_as_calibration_data_in_one_line(tmp_path):
    """calib=Path("calib.npy") (the command line's --calib, from Python) raised "TypeError: 'PosixPath' object is not
    iterable", calib="calib.npy" said "a calibration batch is a str", and output=5 raised os.fspath's TypeError."""
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.rand(8, 4)
    np.save(tmp_path / "c.npy", x.numpy())
    for calib in (tmp_path / "c.npy", str(tmp_path / "c.npy")):
        with pytest.raises(UserError) as err:
            qcompile.compile(model, x[:1], calib=calib, validate=False)
        _assert_one_line(err, "calib= is a path", "calib=numpy.load(path)")
    with pytest.raises(UserError) as err:
        qcompile.compile(model, x[:1], calib=x, validation_inputs=tmp_path / "c.npy")
    _assert_one_line(err, "validation_inputs= is a path")
    with pytest.raises(UserError) as err:
        qcompile.compile(model, x[:1], calib=5, validate=False)
    _assert_one_line(err, "calib= is of type int")
    with pytest.raises(UserError) as err:
        qcompile.compile(model, x[:1], calib=x, output=5, validate=False)
    _assert_one_line(err, "output= is of type int")
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize("factory", [ResidualCNN, DepthwiseSeparableNet, MLP])
def test_trace_matches_eager_and_records_shapes(factory):
    model = factory(seed=1)
    x = example_input(model, seed=2)
    gm = trace(model, x)
    assert isinstance(gm, torch.fx.GraphModule) and not gm.training
    with torch.no_grad():
        _close(gm(x), model(x))
    nodes = list(gm.graph.nodes)
    # Shape propagation ran: every value has tensor metadata with the eager shape.
    for node in nodes:
        assert "tensor_meta" in node.meta, node.name
    assert tuple(nodes[0].meta["tensor_meta"].shape) == tuple(x.shape)
    assert tuple(nodes[-1].meta["tensor_meta"].shape) == (x.shape[0], 10)
    # Standard layers stay whole modules (no tracing into Conv/Linear/BN).
    leaf_types = {type(gm.get_submodule(n.target)) for n in nodes if n.op == "call_module"}
    assert leaf_types <= {nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.AdaptiveAvgPool2d}


def test_trace_residual_keeps_the_add():
    gm = trace(ResidualCNN(), example_input(ResidualCNN))
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 1
    assert "layer1.downsample.0" in {n.target for n in gm.graph.nodes if n.op == "call_module"}


def test_trace_depthwise_conv_shapes():
    model = DepthwiseSeparableNet()
    gm = trace(model, example_input(model))
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert gm.get_submodule("dw2").groups == 32
    assert tuple(by_target["dw2"].meta["tensor_meta"].shape) == (4, 32, 8, 8)


def test_trace_without_inputs_skips_shape_propagation():
    gm = trace(MLP())
    assert all("tensor_meta" not in n.meta for n in gm.graph.nodes)


def test_trace_with_inputs_of_the_wrong_shape():
    with pytest.raises(UserError) as err:
        trace(ResidualCNN(), torch.zeros(2, 5, 16, 16))
    _assert_one_line(err, "does not run on inputs of shape", "[(2, 5, 16, 16) float32]", "fix --input-shape")


class SignGate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace through this."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2.0
        return -x


class GatedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = SignGate()

    def forward(self, x):
        return self.gate(self.fc(x))


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = GatedBlock()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x))


class TopLevelBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.mean() > 0:
            return y
        return y * 0.5


def test_data_dependent_control_flow_names_the_module_and_the_way_out():
    with pytest.raises(UserError) as err:
        trace(GatedNet().eval(), torch.randn(2, 4))
    _assert_one_line(err, "cannot trace", "'block.gate'", "test_frontend.py:", "--leaf-module block.gate")


@pytest.mark.parametrize("leaf, opaque", [("block.gate", "block.gate"), ("SignGate", "block.gate"), ("block", "block")])
def test_leaf_module_makes_it_traceable(leaf, opaque):
    model = GatedNet().eval()
    gm = trace(model, torch.randn(2, 4), leaf_modules=[leaf])
    assert opaque in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    # The leaf runs as the real module, so both branches still work in the GraphModule.
    for sign in (1.0, -1.0):
        x = sign * torch.rand(3, 4, generator=torch.Generator().manual_seed(1)) + sign
        with torch.no_grad():
            _close(gm(x), model(x))


def test_compile_takes_one_leaf_module_as_a_string_and_refuses_a_config_of_another_type():
    """leaf_modules="block" was split into its letters ("--leaf-module 'b' names no submodule"), unlike
    exclude="conv2"; config=[...] was a TypeError from inside the config reader."""
    model = GatedNet().eval()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, leaf_modules="block", validate=False)
    assert "block" in {n.target for n in result.model.graph.nodes if n.op == "call_module"}
    with pytest.raises(UserError) as err:
        qcompile.compile(model, x[:1], calib=x, leaf_modules="block", config=[("fc", "fp32")])
    _assert_one_line(err, "config= takes", "not a list")


def test_sizes_used_as_python_ints_get_the_traceable_spelling_in_the_message():
    """A buffer sliced to the sequence length stopped with "slice indices must be integers": nothing said what to
    write instead. (torch.zeros(x.size(0), H), which stopped with "zeros() takes 1 positional argument but 2 were
    given", is now traced.)"""
    class Zeros(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) + torch.zeros(x.size(0), 4)

    class Sliced(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("pos", torch.randn(8, 4))

        def forward(self, x):  # (B, T, 4): a tensor made in forward sliced to the batch size
            return self.fc(x[:, 0] + torch.linspace(0.0, 1.0, 8)[:x.shape[0], None])

    # torch.zeros(B, 4) with a traced batch size: the sized retrace traces it (0.7.6), at any batch
    zeros = Zeros().eval()
    gm = trace(zeros, torch.randn(2, 4))
    x = torch.randn(5, 4)
    assert torch.allclose(gm(x), zeros(x))
    with pytest.raises(UserError) as err:
        trace(Sliced().eval(), torch.randn(2, 8, 4))
    _assert_one_line(err, "slice indices", "is used as a Python int (range, a slice): write the fixed number")


def test_control_flow_in_the_top_forward_points_at_the_line():
    with pytest.raises(UserError) as err:
        trace(TopLevelBranch().eval(), torch.randn(2, 4))
    _assert_one_line(err, "in the model's forward", "test_frontend.py:", "--leaf-module NAME")


def test_unknown_leaf_module_is_refused():
    with pytest.raises(UserError) as err:
        trace(GatedNet(), torch.randn(2, 4), leaf_modules=["block.nope"])
    _assert_one_line(err, "'block.nope'", "names no submodule")


class _InheritsConv(nn.Conv2d):
    """A library's conv subclass that computes exactly nn.Conv2d (torchvision's Conv3DSimple is one)."""


class _StandardizedConv(nn.Conv2d):
    """Overrides forward: its effective weight is computed when it runs."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class _DynamicConv(nn.Conv2d):
    """Its weight depends on the input (a dynamic convolution): no constant weight to quantize."""

    def forward(self, x):
        w = self.weight * torch.sigmoid(x.mean())
        return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class _Subclassed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _InheritsConv(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.b = _StandardizedConv(4, 4, 3, padding=1)
        self.c = _DynamicConv(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.c(torch.relu(self.b(torch.relu(self.bn(self.a(x))))))).mean((2, 3)))


def test_layer_subclasses_that_inherit_forward_stay_whole_and_are_quantized():
    """torch.fx only keeps torch.nn's own modules whole; a subclass defined elsewhere was traced into a bare F.conv2d
    that no pass quantized or folded (R3D-18's Conv3DSimple layers all stayed float)."""
    from qcompile.summary import layer_lines

    model = _Subclassed().eval()
    gm = trace(model, (torch.randn(1, 3, 8, 8),))
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "a" in modules and "b" not in modules  # b overrides forward: traced through
    x = torch.randn(16, 3, 8, 8)
    result = qcompile.compile(model, x[:1], calib=x, scheme="apot", bits=4, keep_first_last="quant")
    assert "self.bn" not in result.model.code  # folded into a
    assert result.model.a.weight_fq.calibrated
    lines = "\n".join(layer_lines(result.model))
    assert "_InheritsConv" in lines and "_StandardizedConv" in lines
    # b computes its weight from its parameters alone: FoldConstants makes it a weight, and it is quantized
    assert any(line.split()[0] == "b" and "W4 apot" in line for line in lines.splitlines()[1:]), lines
    assert any(line.split()[0] == "c" and "float: a functional call on a weight computed in forward" in line
               for line in lines.splitlines()[1:]), lines
    assert result.report.passed


def _normed_model(kind: str) -> nn.Module:
    from torch.nn.utils import parametrizations

    wrap = {"weight_norm": parametrizations.weight_norm, "spectral_norm": parametrizations.spectral_norm,
            "old_weight_norm": torch.nn.utils.weight_norm, "old_spectral_norm": torch.nn.utils.spectral_norm}[kind]
    torch.manual_seed(15)
    return nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.LeakyReLU(), wrap(nn.Conv1d(8, 8, 3, padding=1)),
                         nn.LeakyReLU(), wrap(nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1)), nn.LeakyReLU(),
                         nn.Conv1d(4, 1, 1)).eval()


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "old_weight_norm", "old_spectral_norm"])
def test_weight_and_spectral_norm_layers_compile_as_their_baked_weights(kind):
    """Vocoder-style layers wrapped in weight/spectral norm (the parametrizations API or the older hooks): the
    compile failed (no ``weight`` parameter; the old hooks' weight cannot be deep-copied). The compiled copy bakes the
    weight the wrapper computes now and quantizes it; the user's model is left as it was."""
    from qcompile.frontend import plain_copy

    model = _normed_model(kind)
    x = torch.randn(16, 2, 32, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        before = model(x)
        baked = plain_copy(model)
        assert isinstance(baked[2].weight, nn.Parameter) and not baked[2]._forward_pre_hooks
        assert torch.allclose(baked(x), before, atol=1e-6)
    result = qcompile.compile(model, x[:1], calib=x, scheme="apot", bits=4)
    assert result.model.get_submodule("2").weight_fq.calibrated and result.model.get_submodule("4").weight_fq.calibrated
    assert result.report.passed and result.report.extra["code_mismatch"] == 0.0, result.report.extra
    with torch.no_grad():
        assert torch.equal(model(x), before)  # still the user's float model, parametrized as before


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_state_dict_of_a_wrapped_model_loads_into_arch(tmp_path, prefix):
    """DataParallel/DDP and torch.compile save every key behind a prefix; --arch used to refuse such a checkpoint
    ("missing a.weight ...; unexpected module.a.weight ...")."""
    source = ResidualCNN(seed=3)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in source.state_dict().items()}}, path)
    loaded = load_model(str(path), arch="tests.models:ResidualCNN")
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_model_in_another_float_precision_compiles_from_its_float32_values(dtype):
    """It stopped with "does not run on inputs ... fix --input-shape" (float32 inputs, half weights)."""
    model = ResidualCNN(seed=4).to(dtype)
    x = torch.randn(8, *ResidualCNN.INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(5))
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8)
    assert result.report.passed and result.report.extra["code_mismatch"] == 0.0
    assert next(model.parameters()).dtype == dtype  # the user's model is left as it was


class _Float64Island(nn.Module):
    """A float32 model with one float64 layer that its forward casts to and back (or a half model casting its
    input to half)."""

    def __init__(self, half: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.half_model = half
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        if half:
            self.half()
        else:
            self.b.double()

    def forward(self, x):
        if self.half_model:
            return self.c(torch.relu(self.b(torch.relu(self.a(x.to(torch.float16))))))
        return self.c(torch.relu(self.b(torch.relu(self.a(x)).double())).float())


@pytest.mark.parametrize("half", [False, True], ids=["float64 layer", "half model casting its input"])
@pytest.mark.parametrize("scheme", ["uniform", "fp32"])
def test_casts_to_the_type_a_model_was_made_from_become_float32(half, scheme):
    """The model is quantized from its float32 copy; its forward's casts to float64/half met float32 weights
    there: "does not run on inputs of shape [(1, 8) float32] (mat1 and mat2 must have the same dtype); fix
    --input-shape"."""
    model = _Float64Island(half).eval()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, x[:1], calib=x, scheme=scheme, bits=8)
    assert result.report.passed, result.report.summary()
    if scheme != "fp32":
        assert result.report.extra["code_mismatch"] == 0.0 and result.report.extra["sqnr_vs_float_db"] > 30
    assert {p.dtype for p in model.parameters()} == ({torch.float16} if half else {torch.float32, torch.float64})


def test_a_torchscript_module_is_refused_with_what_to_pass_instead():
    with pytest.raises(UserError, match="TorchScript module cannot be traced"):
        qcompile.compile(torch.jit.script(MLP(seed=0)), torch.randn(2, *MLP.INPUT_SHAPE[1:]), scheme="uniform", bits=8)


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "both", "averaged"])
def test_wrapped_models_compile_as_the_model_inside(wrap):
    """torch.compile's OptimizedModule and nn.DataParallel cannot be traced by torch.fx ("missing the required
    forward", "Proxy object cannot be iterated"): compile takes the model inside."""
    inner = ResidualCNN(seed=6)
    model = {"compile": lambda m: torch.compile(m), "data_parallel": nn.DataParallel,
             "both": lambda m: nn.DataParallel(torch.compile(m)),
             "averaged": torch.optim.swa_utils.AveragedModel}[wrap](inner)  # SWA/EMA: forward(*args, **kwargs)
    x = torch.randn(8, *ResidualCNN.INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(7))
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8)
    assert result.report.passed and result.report.extra["code_mismatch"] == 0.0


class _PassOn(nn.Module):
    """A user's own wrapper (an EMA holder, a normalizing shell) that hands its inputs on as ``*args``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 16)
        self.b = nn.Linear(6, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x, *extra):  # the second input arrives through *extra
        return self.head(torch.relu(self.a(x) + self.b(extra[0])))


class _InputNamed(_TwoInputs):
    def forward(self, input, input_1):  # torch.fx renames the first to input_1, and its codegen read it twice
        return self.head(torch.relu(self.a(input) + self.b(input_1)))


@pytest.mark.parametrize("case", ["wrapper", "positional_then_varargs", "wrapper_of_two", "named_input"])
def test_a_forward_taking_varargs_is_traced_with_one_parameter_per_input(case):
    """torch.fx makes ``*args`` one placeholder, and ``self.net(*args)`` failed with "Proxy object cannot be
    iterated": a user's own pass-on wrapper (not DataParallel/AveragedModel, which are unwrapped by name) could not
    be compiled. The inputs are now spelled out, every layer inside is quantized, and the user's model keeps its
    class."""
    from torch.utils._pytree import tree_leaves

    gen = torch.Generator().manual_seed(3)
    if case == "wrapper":
        model = _PassOn(ResidualCNN(seed=6)).eval()
        inputs = (torch.randn(16, *ResidualCNN.INPUT_SHAPE[1:], generator=gen),)
        layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    else:
        torch.manual_seed(4)
        model = {"positional_then_varargs": _TwoInputs, "named_input": _InputNamed,
                 "wrapper_of_two": lambda: _PassOn(_TwoInputs())}[case]().eval()
        inputs = (torch.randn(16, 12, generator=gen), 3 * torch.randn(16, 6, generator=gen))
        layers = 3
    cls = type(model)
    gm = trace(model, tuple(t[:1] for t in inputs), copy=False)  # the caller's own model keeps its class
    assert type(model) is cls
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs))
    result = qcompile.compile(model, tuple(t[:1] for t in inputs), calib=[tuple(t[i:i + 4] for t in inputs)
                                                                          for i in range(0, 16, 4)],
                              scheme="uniform", bits=8)
    assert type(model) is cls
    assert result.report.passed and result.report.extra["code_mismatch"] == 0.0
    from qcompile.summary import layer_lines

    lines = layer_lines(result.model)[1:]
    assert len(lines) == layers and all(" W8 uniform / A8 uniform " in line for line in lines), lines
    assert [i.name for i in result.onnx_model.graph.input][:len(inputs)] == (
        {"wrapper": ["input"], "named_input": ["input", "input_1"]}.get(case, ["input_0", "input_1"]))
    with torch.no_grad():
        want = model(*inputs)
        got = tree_leaves(result.model(*inputs))[0]
    assert 10 * torch.log10(want.pow(2).sum() / (want - got).pow(2).sum()) > 30


def _hf_style(forward):
    """A decorator as HuggingFace transformers 5 puts on every model's forward: functools.wraps over a
    ``wrapper(self, *args, **kwargs)``."""
    import functools

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return forward(self, *args, **kwargs)
    return wrapper


class _KwargsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x, mask=None, **kwargs):
        return self.fc2(nn.ReLU()(self.fc1(x)))  # a stateless module made in forward (DistilBERT's classifier)


class _DecoratedKwargsNet(_KwargsNet):
    @_hf_style
    def forward(self, x, mask=None, **kwargs):
        return super().forward(x)


@pytest.mark.parametrize("cls", [_KwargsNet, _DecoratedKwargsNet])
def test_a_forward_taking_kwargs_or_under_an_hf_decorator_compiles_as_its_inputs(cls):
    """``forward(self, x, **kwargs)``: torch.fx made ``**kwargs`` a second placeholder, and calibration asked for 2
    inputs while the signature took 1; under transformers 5's decorator the trace failed with "co_varnames is too
    small" (every HuggingFace model). And ``nn.ReLU()(x)`` in forward ("module is not installed as a submodule")
    sent users to --leaf-module the whole model: every layer float. Now: one input, both layers quantized, and the
    ReLU makes the second layer's input unsigned."""
    from qcompile.summary import layer_lines

    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    gm = trace(model, (x[:1],))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    result = qcompile.compile(model, (x[:1],), calib=x, scheme="uniform", bits=8)
    assert result.report.passed
    lines = layer_lines(result.model)[1:]
    assert len(lines) == 2 and all(" W8 uniform / A8 uniform " in line for line in lines), lines
    assert [i.name for i in result.onnx_model.graph.input] == ["input"]
    assert result.model.get_submodule("act_fq1").levelset.scheme == "uniform"  # after the ReLU: unsigned, no offset
    assert not result.model.get_submodule("act_fq1").levelset.signed
    with torch.no_grad():
        want, got = model(x), result.model(x)
    assert 10 * torch.log10(want.pow(2).sum() / (want - got).pow(2).sum()) > 30


def test_a_layer_made_in_forward_is_refused_in_one_line():
    """A module with parameters made in forward (new random weights at every call) is not traced through."""
    class Net(nn.Module):
        def forward(self, x):
            return nn.Linear(8, 4)(x)

    with pytest.raises(UserError, match="not installed as a submodule"):
        trace(Net(), (torch.randn(1, 8),))


class _HFStyleEncoder(nn.Module):
    """The Python over sizes and dtypes that HuggingFace models are written with (BERT, ViT, HF ResNet): a buffer
    sliced to the sequence length and expanded to the batch, ``(*x.shape[:-1], -1, d)`` head shapes, a rank
    check that raises, a dtype check; torch.fx stopped at the first of them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.pos = nn.Embedding(32, 16)
        self.register_buffer("position_ids", torch.arange(32)[None])
        self.register_buffer("token_type_ids", torch.zeros(1, 32, dtype=torch.long))
        self.types = nn.Embedding(2, 16)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.cls = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if input_ids.dim() != 2:
            raise ValueError("ids must be (batch, length)")
        batch, length = input_ids.size()
        types = self.token_type_ids[:, :length].expand(batch, length)
        h = self.emb(input_ids) + self.pos(self.position_ids[:, :length]) + self.types(types)
        if h.dtype != self.q.weight.dtype:
            h = h.to(self.q.weight.dtype)
        if h.shape[1:].numel() != length * 16:  # torch.Size's numel() on the traced shape
            raise ValueError("16 features per token")
        shape = h.shape[:-1]
        heads = (*shape, -1, 8)
        q, k, v = (f(h).view(*heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1) @ v
        out = self.o(att.transpose(1, 2).reshape(*shape, -1))
        return self.cls(torch.relu(out[:, 0]))


def test_python_over_sizes_and_dtypes_is_traced_for_the_examples_sizes_and_any_batch():
    """HuggingFace models did not trace (every BERT, ViT, ConvNeXt needed its embeddings and attention kept
    opaque: half their Linear layers float). Sizes that follow the batch stay traced, the others are the example's
    (as the file's are): the graph computes the model at every batch size, and every layer is quantized."""
    from qcompile.summary import layer_lines

    torch.manual_seed(0)
    model = _HFStyleEncoder().eval()
    ids = torch.randint(0, 50, (40, 12), generator=torch.Generator().manual_seed(1))
    gm = trace(model, (ids[:1],))
    for batch in (1, 5, 32):
        with torch.no_grad():
            torch.testing.assert_close(gm(ids[:batch]), model(ids[:batch]))
    result = qcompile.compile(model, (ids[:1],), calib=ids[:32], scheme="uniform", bits=8)
    assert result.report.passed, result.report.summary()
    lines = layer_lines(result.model)[1:]
    assert sum(" W8 uniform / A8 uniform " in line for line in lines) == 5, lines  # q, k, v, o, cls
    from qcompile.runtime import session

    sess = session(result.onnx_model.SerializeToString())
    y = sess.run(None, {sess.get_inputs()[0].name: ids[32:39].numpy()})[0]  # batch 7, not calibrated on
    with torch.no_grad():
        want = result.model(ids[32:39])
    torch.testing.assert_close(torch.from_numpy(y), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


class _TokenTypes(nn.Module):
    """DeBERTa-v2's embeddings: a buffer sliced to the sequence length and token types made with
    ``torch.zeros(input_ids.size())``, a shape of a traced batch size and an int."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.types = nn.Embedding(2, 16)
        self.register_buffer("pos", torch.randn(1, 32, 16))
        self.fc = nn.Linear(16, 3)

    def forward(self, ids):
        shape = ids.size()
        h = self.emb(ids) + self.pos[:, :shape[1]]
        h = h + self.types(torch.zeros(shape, dtype=torch.long, device=ids.device))
        return self.fc(h.mean(1))


def test_a_shape_with_a_traced_batch_size_goes_to_torch_functions():
    """torch.zeros(ids.size()) inside the sized retrace: torch.fx did not find the traced size in the shape (a tuple
    of its own class) and the retrace gave up, so DeBERTa-v2 did not compile."""
    from qcompile.runtime import session

    torch.manual_seed(0)
    model = _TokenTypes().eval()
    ids = torch.randint(0, 50, (32, 12), generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, calib=ids, scheme="uniform", bits=8)
    assert result.report.passed
    sess = session(result.onnx_model.SerializeToString())
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: ids[:7].numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, result.model(ids[:7]), rtol=1e-4, atol=1e-4)


class _LearnedPositions(nn.Embedding):
    """BART's positional embedding: positions made with torch.arange in forward, expanded to the batch."""

    def forward(self, ids):
        if ids.dim() != 2:  # (the plain trace stops here: the sized retrace traces this model)
            raise ValueError("ids must be (batch, length)")
        positions = torch.arange(0, ids.shape[1], dtype=torch.long, device=self.weight.device)
        return super().forward(positions.expand(ids.shape[0], -1) + 2)


def test_positions_made_in_forward_expand_to_the_traced_batch_and_the_table_is_quantized():
    """The BART and mBART encoders: torch.arange(L).expand(B, -1) was a real tensor given a traced size (the
    retrace gave up, and the hint sent users to keep the attention float); and a table whose forward reads
    self.weight.device was listed as float ("read by getattr") beside its W8 row, with a warning."""
    import warnings

    from qcompile.summary import layer_lines

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(50, 8)
            self.pos = _LearnedPositions(20, 8)
            self.fc = nn.Linear(8, 4)

        def forward(self, ids):
            return self.fc(self.tok(ids) + self.pos(ids))

    torch.manual_seed(0)
    model = Net().eval()
    ids = torch.randint(0, 50, (32, 16), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", qcompile.QuantizationWarning)
        result = qcompile.compile(model, calib=ids, scheme="uniform", bits=8)
    assert result.report.passed
    lines = layer_lines(result.model)[1:]
    assert [line.split()[0] for line in lines] == ["tok", "pos", "fc"], lines
    assert all("W8 uniform" in line for line in lines), lines


def test_inputs_the_model_cannot_take_are_named_as_such_not_as_a_trace_failure():
    """Float token ids for a model that needs the sized retrace: the plain trace's error ("slice indices must be
    integers ... --leaf-module") was shown, and following it led to the next module's."""
    model = _TokenTypes().eval()
    with pytest.raises(UserError) as err:
        qcompile.compile(model, calib=torch.randint(0, 50, (32, 12)).float(), scheme="uniform", bits=8)
    _assert_one_line(err, "the model does not run on inputs of shape [(1, 12) float32]", "ids.astype(np.int64)")
    assert "--leaf-module" not in str(err.value)


def test_python_over_the_batch_size_still_stops_in_one_line():
    """A branch on the batch size cannot be fixed to the example's: the trace's own error stands."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.size(0) > 1 else -self.fc(x)

    with pytest.raises(UserError) as err:
        trace(Net().eval(), torch.randn(1, 4))
    _assert_one_line(err, "control flow")


class _SizeFromData(nn.Module):
    """Python over sizes that depend on the data or on the batch in ways the repeated example cannot show."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.fc = nn.Linear(8, 8)
        self.register_buffer("ema", torch.zeros(8))

    def forward(self, x):
        if x.shape[1] != 8:
            raise ValueError("8 features")
        if self.case == "masked":  # zeros are padding, replaced only where there are any
            return self.fc(x) if x[x == 0].shape[0] == 0 else self.fc(x.masked_fill(x == 0, -1.0))
        if self.case == "unique":
            u, inv = torch.unique(x, dim=0, return_inverse=True)
            return self.fc(x[:1]).expand(x.shape[0], -1) if u.shape[0] == 1 else self.fc(u)[inv]
        if self.case == "stride":  # one row up to a batch of 4
            sub = x[::4]
            return self.fc(x) + sub if sub.shape[0] == 1 else self.fc(x) + sub.mean(0)
        self.ema.mul_(0.5).add_(0.5 * x.mean(0))  # "state": a running average updated by forward
        return self.fc(x) - self.ema


@pytest.mark.parametrize("case", ["masked", "unique", "stride", "state"])
def test_sizes_the_example_cannot_fix_keep_the_one_line_error(case, tmp_path):
    """The sized retrace wrote data-dependent sizes (x[x == 0], torch.unique of a batch of one sample repeated)
    and x[::4]'s as the example's: the file matched its simulation (PASS) and both computed another function, or
    onnxruntime failed at batch 32. A forward that updates a buffer converged over the retrace's runs and passed
    its check. Each now stops with the trace's one-line error, no file."""
    torch.manual_seed(0)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for i in range(1, 32):
        x[i, 8 - (i % 4):] = 0  # sample 0 (the example) has no zeros, the others some
    model = _SizeFromData(case).eval()
    with pytest.raises(UserError, match="cannot trace the model|does not compute the model") as err:
        qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, output=str(tmp_path / "never.onnx"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "never.onnx").exists()


class _CropToLongest(nn.Module):
    """A padded batch cropped to its longest sequence (a size from the mask's values), behind a shape check."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.e = nn.Linear(8, 16)
        self.h = nn.Linear(16, 3)

    def forward(self, x, mask):
        if x.shape[-1] != 8:
            raise ValueError("8 features")
        longest = mask.sum(1).max()
        if self.how == "slice":
            h, m = self.e(x[:, :longest]), mask[:, :longest]
        elif self.how == "narrow":
            h, m = self.e(torch.narrow(x, 1, 0, longest)), torch.narrow(mask, 1, 0, longest)
        else:  # positions up to the longest
            keep = torch.arange(longest)
            h, m = self.e(x[:, keep]), mask[:, keep]
        return self.h((h * m.unsqueeze(-1)).sum(1) / h.shape[1])


def _padded(batch, lo, hi, full_first, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (batch,), generator=gen)
    if full_first:
        lengths[0] = 12
    return torch.randn(batch, 12, 8, generator=gen), (torch.arange(12)[None] < lengths[:, None]).long()


@pytest.mark.parametrize("how", ["slice", "narrow", "arange"])
def test_a_size_from_data_values_stays_traced(how):
    """The crop length came out of the example (its longest sequence, 12) as a constant, and the check on
    calibration samples led by full-length ones passed: the file divided by 12 where a batch's longest was 10."""
    from qcompile.runtime import session

    torch.manual_seed(0)
    model = _CropToLongest(how).eval()
    calib = _padded(32, 6, 12, True, 1)
    result = qcompile.compile(model, calib=calib, scheme="fp32")
    assert result.report.passed
    sess = session(result.onnx_model.SerializeToString())
    names = [i.name for i in sess.get_inputs()]
    for batch in (7, 32):
        x, mask = _padded(batch, 6, 10, False, batch)
        with torch.no_grad():
            want = model(x, mask)
        got = torch.from_numpy(sess.run(None, dict(zip(names, (x.numpy(), mask.numpy()))))[0])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_stride_over_the_batch_stays_traced_with_few_calibration_samples():
    """x[::4] has one row up to a batch of 4: with 3 calibration samples nothing showed that its size follows the
    batch, and the file took its first row at batch 32 too."""
    from qcompile.runtime import session

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if x.shape[1] != 8:
                raise ValueError("8 features")
            ref = x[::4]
            return self.fc(x) + ref.sum(0) / ref.shape[0]

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, x[:1], calib=x[:3], scheme="fp32")
    assert result.report.passed
    sess = session(result.onnx_model.SerializeToString())
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)


def test_a_module_kept_whole_may_size_its_outputs_from_data():
    """A leaf module (the hint's advice for data-dependent code) that drops the all-padding positions: its output
    size was written as the example's."""
    from qcompile.runtime import session

    class Trim(nn.Module):
        def forward(self, x, mask):
            keep = mask.any(0)
            return x[:, keep], mask[:, keep]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trim = Trim()
            self.e = nn.Linear(8, 16)
            self.h = nn.Linear(16, 3)

        def forward(self, x, mask):
            if x.shape[-1] != 8:
                raise ValueError("8 features")
            x, mask = self.trim(x, mask)
            h = self.e(x) * mask.unsqueeze(-1)
            return self.h(h.sum(1) / h.shape[1])

    torch.manual_seed(0)
    model = Net().eval()
    result = qcompile.compile(model, calib=_padded(32, 6, 12, True, 1), scheme="fp32", leaf_modules=["trim"])
    sess = session(result.onnx_model.SerializeToString())
    names = [i.name for i in sess.get_inputs()]
    x, mask = _padded(7, 6, 10, False, 7)
    got = torch.from_numpy(sess.run(None, dict(zip(names, (x.numpy(), mask.numpy()))))[0])
    with torch.no_grad():
        torch.testing.assert_close(got, model(x, mask), rtol=1e-4, atol=1e-5)


def test_a_shape_check_keeps_attention_traced_as_its_projections():
    """An input-width check sent the model to the sized retrace, which kept nn.MultiheadAttention whole (float)."""
    from qcompile.summary import layer_lines

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(16, 32)
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
            self.out = nn.Linear(32, 4)

        def forward(self, x):
            if x.shape[-1] != 16:
                raise ValueError("16 features")
            h = self.inp(x)
            return self.out(self.mha(h, h, h, need_weights=False)[0].flatten(1).reshape(x.shape[0], -1, 32).mean(1))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(32, 6, 16, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8)
    assert result.report.passed
    lines = layer_lines(result.model)[1:]
    assert sum(" W8 uniform / A8 uniform " in line for line in lines) == 6, lines  # inp, q, k, v, out_proj, out


def test_a_size_used_as_a_python_int_names_the_module_to_keep_opaque():
    """A loop over the batch (a size no trace can fix): the hint ended in the literal --leaf-module NAME."""
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(1, 4)

        def forward(self, x):
            return torch.stack([self.fc(x[i]) for i in range(x.size(0))])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = Embed()

        def forward(self, x):
            return self.embed(x)

    with pytest.raises(UserError, match=r"--leaf-module embed \(leaf_modules=\['embed'\]\)"):
        trace(Net(), (torch.randn(1, 16, 1),))


class _DynamicSameConv(nn.Conv2d):
    """timm's Conv2dSame: "same" padding computed from the input size with math.ceil, which torch.fx cannot trace
    (so it must be kept whole with --leaf-module)."""

    def forward(self, x):
        import math

        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = torch.nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return torch.nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _GatedConv(nn.Conv2d):
    """A conv whose forward branches on its data: no trace can keep it (--leaf-module)."""

    def forward(self, x):
        y = super().forward(x)
        return y if y.mean() > 0 else -y


class _StemAndDepthwise(nn.Module):
    """tf_efficientnet_b0's pattern: a strided stem and a depthwise conv of one conv class, then a head."""

    def __init__(self, conv):
        super().__init__()
        self.stem = conv(3, 8, 3, stride=2)
        self.dw = conv(8, 8, 3, stride=2, groups=8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.dw(torch.relu(self.stem(x))).mean((2, 3)))


def test_an_untraceable_class_used_twice_is_named_by_its_class_in_the_hint():
    """timm's tf_efficientnet_b0 has a Conv2dSame in its stem and in four depthwise convs: the hint named the stem
    module, then the next one, five reruns for one flag. A class used more than once is named by the class, which
    --leaf-module takes; one used once keeps its module name (above)."""
    model = _StemAndDepthwise(_GatedConv).eval()
    x = torch.randn(4, 3, 17, 17)
    with pytest.raises(qcompile.UserError, match=r"--leaf-module _GatedConv \(every _GatedConv of the "
                                                 r"model: leaf_modules=\['_GatedConv'\]"):
        qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, validate=False)
    with pytest.warns(qcompile.QuantizationWarning, match="opaque"):  # both kept whole by the one flag, as it says
        qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, leaf_modules=["_GatedConv"])


def test_same_padding_computed_from_the_input_size_traces_and_is_quantized():
    """timm's Conv2dSame (tf_efficientnet_b0: stem and four depthwise convs) computes its padding from the input's
    height and width with math.ceil: torch.fx stopped there, and --leaf-module kept the five convs float. The sizes
    are the example's, as the file's are: the pads and convs are traced and quantized."""
    from qcompile.summary import layer_lines

    torch.manual_seed(0)
    model = _StemAndDepthwise(_DynamicSameConv).eval()
    x = torch.randn(16, 3, 17, 17, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8)
    assert result.report.passed
    lines = layer_lines(result.model)[1:]
    assert len(lines) == 3 and all(" W8 uniform / A8 uniform " in line for line in lines), lines
    assert result.report.extra["sqnr_vs_float_db"] > 30, result.report.extra


def test_a_kept_whole_layer_with_its_own_forward_stays_float_and_its_batchnorm_stays():
    """Kept whole, such a layer used to be rewritten as a plain conv with its module's padding (0): the file and the
    simulation agreed with each other, and both computed another function (17x17 maps became 16x16; 28 dB from
    float at W8A8)."""
    from qcompile.summary import layer_lines

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = _DynamicSameConv(3, 16, 3, stride=2, bias=False)
            self.b1 = nn.BatchNorm2d(16)
            self.c2 = nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x):
            return self.c2(torch.relu(self.b1(self.c1(x)))).mean((2, 3))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(16, 3, 33, 33)
    # traced (its padding from the example's size, see above), it is quantized; kept whole, it stays float
    assert qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8).report.passed
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, leaf_modules=["c1"])
    lines = "\n".join(layer_lines(result.model))
    assert any(line.split()[0] == "c1" and "float" in line and "own forward" in line
               for line in lines.splitlines()[1:]), lines
    assert "c2" in lines and "W8 uniform" in lines
    with torch.no_grad():
        ref, sim = model(x), result.model(x)
    sqnr = float(10 * torch.log10(ref.pow(2).sum() / (sim - ref).pow(2).sum()))
    assert sqnr > 40.0, sqnr
    assert result.report.passed
    # its BatchNorm is not folded into a weight that the layer's own forward may transform
    assert any(n.op == "call_module" and n.target == "b1" for n in result.model.graph.nodes)


def test_a_pass_that_changes_the_function_stops_the_compile(monkeypatch):
    """CheckFloatOutputs: with the guard above removed (a kept-whole layer with its own forward rewritten as a plain
    conv again), the prepared graph no longer computes the model's outputs and the compile stops with one line,
    instead of writing a file that only agrees with its own simulation."""
    import qcompile.passes.select as select

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = _DynamicSameConv(3, 8, 3, stride=2)
            self.c2 = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c2(torch.relu(self.c1(x)))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(8, 3, 33, 33)
    assert qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, leaf_modules=["c1"]).report.passed
    monkeypatch.setattr(select, "stock_layer", lambda mod: True)
    with pytest.raises(qcompile.UserError, match="changed what the model computes.*changed shape"):
        qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, leaf_modules=["c1"])


def test_the_float_check_also_runs_without_calibration_data():
    """Data-free compiles (ranges from BatchNorm statistics) check the prepared graph on the example input."""
    from tests.models import ResidualCNN, example_input

    model = ResidualCNN(seed=0).eval()
    result = qcompile.compile(model, example_input(model, seed=1, batch=1), scheme="uniform", bits=8,
                              keep_first_last="fp32", int8_outputs=False, validate=False)
    reports = {t.name: t.report for t in result.timings}
    assert any("data-free" in line for line in reports["Calibrate"])
    assert any("equal the model's" in line for line in reports["CheckFloatOutputs"])


def test_the_float_check_gives_a_model_that_draws_noise_the_same_noise_and_keeps_the_callers_generator():
    """A forward that draws random numbers draws the same ones in the recorded and the checked run (the CPU
    generator seeded with 0 for each), and the caller's generator state is as it was."""
    from qcompile.passes.base import Pipeline
    from qcompile.passes.float_check import CheckFloatOutputs, RecordFloatOutputs
    from qcompile.passes.fold_bn import FoldBatchNorm

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y + torch.randn_like(y)

    torch.manual_seed(0)
    model = Noisy().eval()
    x = torch.randn(2, 3, 8, 8)
    record = RecordFloatOutputs(x)
    check = CheckFloatOutputs(record, rtol=1e-5)
    gm = trace(model, (x[:1],))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    Pipeline([record, FoldBatchNorm(), check])(gm)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert any("equal the model's" in line for line in check.report)


class WithDefaults(nn.Module):
    """Optional forward parameters that change the control flow: a mask that defaults to None, a flag."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, mask=None, return_features=False, *, scale=1.0):
        h = torch.relu(self.conv(x))
        if mask is not None:
            h = h * mask
        feats = h.mean((2, 3)) * scale
        out = self.fc(feats)
        return (out, feats) if return_features else out


def test_optional_forward_parameters_are_traced_at_their_defaults(tmp_path):
    """``model(x)`` is what is compiled: ``if mask is not None`` and ``if return_features`` follow the defaults
    (tracing them as inputs failed: 'symbolically traced variables cannot be used as inputs to control flow')."""
    import qcompile

    torch.manual_seed(0)
    model = WithDefaults().eval()
    x = torch.randn(4, 3, 8, 8)
    gm = trace(model, (x,))
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert not any(n.op == "call_function" and n.target is torch._assert for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    result = qcompile.compile(model, x[:1], calib=x, output=str(tmp_path / "m.onnx"), scheme="apot", bits=4)
    assert result.report.passed, result.report.summary()
    assert len(result.onnx_model.graph.input) == 1


def test_a_second_input_with_a_default_is_traced_when_given():
    torch.manual_seed(0)
    model = WithDefaults().eval()
    x, mask = torch.randn(2, 3, 8, 8), (torch.rand(2, 8, 8, 8) > 0.5).float()
    gm = trace(model, (x, mask))
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "mask"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x, mask), model(x, mask))


def test_calibration_arrays_for_an_input_with_a_default_feed_that_input(tmp_path):
    """``compile(m, calib=(x, mask))`` for ``forward(x, mask=None)``: the tuple was read as two batches of ``x``,
    the file had one input and computed ``m(x)``, and validation passed (5.8 dB from ``m(x, mask)``)."""
    import pathlib

    import numpy as np

    from qcompile.runtime import run, session

    torch.manual_seed(0)
    model = WithDefaults().eval()
    x, mask = torch.randn(32, 3, 8, 8), (torch.rand(32, 8, 8, 8) > 0.5).float()
    path = pathlib.Path(tmp_path) / "m.onnx"  # a path-like output: an AttributeError ('endswith') before
    result = qcompile.compile(model, calib=(x, mask), output=path, scheme="uniform", bits=8)
    assert result.report.passed, result.report.summary()
    assert len(result.onnx_model.graph.input) == 2
    with torch.no_grad():
        ref = model(x, mask).numpy()
    out = run(session(str(path)), [x.numpy(), mask.numpy()])[0]
    assert 10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()) > 30


def test_trace_works_on_a_copy_so_passes_leave_the_users_model_alone():
    """The pass-pipeline API: ``qcompile.trace(model)`` then passes. BatchNorm folding rewrote the weights of the
    user's own model (the graph module shared its parameters): the float model lost 5.6 points on digits."""
    import qcompile
    from qcompile.passes.base import Pipeline
    from qcompile.passes.fold_bn import FoldBatchNorm
    from tests.models import ResidualCNN, example_input, randomize_batchnorm

    model = randomize_batchnorm(ResidualCNN(seed=0), seed=1).train()
    x = example_input(model, seed=2, batch=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = Pipeline([FoldBatchNorm()])(qcompile.trace(model, x)).gm
    assert any(not torch.equal(before[k], v) for k, v in gm.state_dict().items() if k in before)  # it folded
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # not switched to eval either
    shared = qcompile.trace(model, x, copy=False)  # the caller copied already: the model itself
    assert shared.get_submodule("conv1").weight is model.conv1.weight


@pytest.mark.parametrize("name", ["meta", "graph", "code"])
def test_a_submodule_named_like_a_graph_module_attribute_is_a_user_error(name):
    """torch.fx cannot build a GraphModule with a top-level submodule called meta, graph or code ("cannot assign
    'dict' as child module 'meta'"): an internal error before, a one-line error naming the fix now."""
    import qcompile

    model = torch.nn.Sequential()
    model.add_module(name, torch.nn.Linear(5, 6))
    with pytest.raises(UserError) as err:
        qcompile.compile(model.eval(), torch.randn(1, 5), scheme="fp32")
    _assert_one_line(err, f"the model has a submodule named '{name}', a name torch.fx's GraphModule keeps")


class _InplaceDiscarded(torch.nn.Module):
    """``a.relu_()`` with its result discarded, ``b += a`` and ``nn.ReLU(inplace=True)`` whose input is read after it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.relu = torch.nn.ReLU(inplace=True)
        self.c3 = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = self.c1(x)
        a.relu_()
        b = self.c2(a)
        b += a
        z = self.relu(b)
        return self.c3(z + b)


class _SharedInplaceModule(torch.nn.Module):
    """One nn.ReLU(inplace=True) called twice, its input read after each call (torchvision shares self.relu too)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.c1(x)
        a = self.relu(y)
        z = self.c2(a + y)
        b = self.relu(z)
        return b + z


class _InplaceFunctions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.c(x)
        torch.nn.functional.leaky_relu_(y, 0.2)  # no torch.leaky_relu: the out-of-place form is in F
        z = torch.nn.functional.relu(y, True)
        torch.sigmoid_(z)
        torch.nn.functional.hardtanh(z, -0.5, 0.5, True)
        return y + z


@pytest.mark.parametrize("factory", [lambda: _InplaceFunctions(), lambda: _SharedInplaceModule()],
                         ids=["functions", "shared-module"])
def test_in_place_functions_and_shared_modules_keep_their_meaning(factory):
    """F.leaky_relu_ has no torch-namespace twin (it crashed on a missing inplace parameter); a shared
    nn.ReLU(inplace=True) is in place at every call (the first rewrite switched its flag off)."""
    import qcompile

    model = factory().eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x.clone())
    gm = qcompile.trace(model, x)
    with torch.no_grad():
        torch.testing.assert_close(gm(x.clone()), want)
    assert not any(str(getattr(n.target, "__name__", n.target)).endswith("_") for n in gm.graph.nodes
                   if n.op in ("call_function", "call_method"))


class _OutArgument(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.o = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        u = self.a(x)
        torch.clamp(u, -0.2, 0.2, out=u)  # the written tensor is the out argument; the result is discarded
        z = torch.empty_like(u)
        torch.sigmoid(u, out=z)
        return self.o(z)


@pytest.mark.parametrize("scheme", ["fp32", "uniform"])
def test_an_out_argument_is_an_in_place_write(scheme):
    """torch.clamp(u, ..., out=u) with the result discarded: dead-code elimination dropped it after the traced-graph
    check (which ran it), and the file computed the model without it (2.3 dB against float, fp32, validation PASS)."""
    import qcompile

    model = _OutArgument().eval()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    result = qcompile.compile(model, x[:1], calib=x, scheme=scheme, bits=8, output=None, validation_inputs=x)
    with torch.no_grad():
        got = result.model(x)
    assert 10 * torch.log10(want.pow(2).sum() / (got - want).pow(2).sum()) > (100 if scheme == "fp32" else 30)
    assert result.report.passed


class _InplaceOnAView(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        y[:, :4].relu_()  # mutates y through a view
        return self.c2(y)


@pytest.mark.parametrize("scheme", ["fp32", "uniform"])
def test_in_place_operations_keep_their_meaning(scheme):
    """torch.fx records ``a.relu_()`` as a node nobody uses: dead-code elimination dropped it, and the file computed
    the model without that ReLU (0 dB against float) while validation, comparing it with the same graph, passed."""
    import qcompile

    model = _InplaceDiscarded().eval()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x.clone())
    result = qcompile.compile(model, x[:1], calib=x, scheme=scheme, bits=8, output=None, validation_inputs=x)
    assert result.report.passed, result.report.summary()
    with torch.no_grad():
        got = result.model(x.clone())
    sqnr = 10 * torch.log10(want.pow(2).sum() / (got - want).pow(2).sum())
    assert sqnr > (100 if scheme == "fp32" else 30), float(sqnr)
    assert model.relu.inplace  # the user's module is untouched (the copy's is out of place)


class _AugmentedAliased(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        z = y
        y += 1  # in place in eager PyTorch (z sees it); torch.fx records a new value, z keeps x * 2
        return z


def test_an_update_that_torch_fx_cannot_follow_is_a_user_error():
    """The graph would compute x * 2 where the model computes x * 2 + 1, and validation (file vs graph) would
    pass: the traced graph is compared with the model on the example inputs."""
    import qcompile

    with pytest.raises(UserError, match="the graph torch.fx traced does not compute the model"):
        qcompile.compile(_AugmentedAliased(), torch.randn(2, 3), scheme="fp32", output=None)


def test_in_place_operation_on_a_view_is_a_user_error():
    import qcompile

    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(UserError, match="the graph torch.fx traced does not compute the model"):
        qcompile.compile(_InplaceOnAView().eval(), x[:1], scheme="fp32", output=None)


def test_a_python_number_among_the_outputs_is_a_user_error():
    """``return self.l(x), 3``: torch.onnx's "did not have observable data dependence" error before."""
    import qcompile

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 2)

        def forward(self, x):
            return self.l(x), 3

    with pytest.raises(UserError, match=r"output 1 of the model is a Python int \(3\), not a tensor"):
        qcompile.compile(M(), torch.randn(2, 4), scheme="fp32")


@pytest.mark.parametrize("where", ["root", "layer"])
def test_a_forward_hook_that_changes_outputs_is_named(where):
    """torch.fx does not trace hooks: a hook that changes a value made the float check fail with "this is a
    qcompile bug" (a layer's hook) or blame in-place updates (a root hook)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    target = model if where == "root" else model[0]
    target.register_forward_hook(lambda mod, args, out: out * 2 + 1)
    x = torch.randn(32, 8)
    with pytest.raises(UserError, match="forward hooks, which torch.fx does not trace"):
        qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8)


def test_a_pruned_model_with_its_masks_still_on_compiles_as_the_masked_weights():
    """torch.nn.utils.prune keeps weight_orig and weight_mask and recomputes weight in a forward pre-hook (the state
    after pruning and fine-tuning): the compile stopped in deepcopy ("Only Tensors created explicitly by the user")."""
    from torch.nn.utils import prune

    model = ResidualCNN(seed=8)
    prune.l1_unstructured(model.conv1, "weight", amount=0.5)
    x = torch.randn(8, *ResidualCNN.INPUT_SHAPE[1:], generator=torch.Generator().manual_seed(9))
    before = model(x).detach()  # with grad: the hook's weight is a non-leaf tensor, as after fine-tuning
    assert model.conv1.weight.grad_fn is not None
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, progress=False)
    assert result.report.passed and result.report.extra["code_mismatch"] == 0.0
    assert hasattr(model.conv1, "weight_mask")  # the user's model keeps its masks
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_layers_inside_a_nested_data_parallel_are_quantized():
    """model.features = nn.DataParallel(model.features) (the ImageNet example): a torch.nn module, a leaf to
    torch.fx, whose convs stayed float without a word while APoT 4-bit was asked."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                        nn.ReLU()), nn.Flatten(), nn.Linear(8 * 64, 4)).eval()
    model[0] = nn.DataParallel(model[0])
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(11))
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, progress=False)
    assert result.report.passed
    assert result.model.get_submodule("0.2").weight_fq.calibrated
    assert isinstance(model[0], nn.DataParallel)  # the user's model is left as it was


def test_state_dict_of_an_averaged_model_loads_into_arch(tmp_path):
    """AveragedModel's state dict: n_averaged beside module.* keys ("unexpected n_averaged, module.a.weight")."""
    source = ResidualCNN(seed=3)
    path = tmp_path / "ema.pt"
    torch.save(torch.optim.swa_utils.AveragedModel(source).state_dict(), path)
    loaded = load_model(str(path), arch="tests.models:ResidualCNN")
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_a_full_pickle_of_a_class_from_the_saving_script_names_the_way_out(tmp_path, monkeypatch):
    """torch.save(model) in a training script pickles the class as __main__.Net, which nothing else can import;
    "make the module that defines the model importable" could not help."""
    import subprocess

    script = tmp_path / "train.py"
    script.write_text("import torch, torch.nn as nn\n"
                      "class Net(nn.Module):\n"
                      "    def __init__(self):\n"
                      "        super().__init__()\n"
                      "        self.fc = nn.Linear(4, 2)\n"
                      "    def forward(self, x):\n"
                      "        return self.fc(x)\n"
                      "torch.save(Net(), 'full.pt')\n")
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        load_model(str(tmp_path / "full.pt"), trust_pickle=True)
    _assert_one_line(err, "defined in the script that saved it (__main__)")


def test_a_torch_export_program_is_refused_in_one_line(tmp_path):
    """ep.module() is a GraphModule of aten operators: no layer was quantized, a float file said PASS."""
    model = MLP(seed=0)
    x = torch.randn(4, *MLP.INPUT_SHAPE[1:])
    ep = torch.export.export(model, (x,))
    for given in (ep, ep.module()):
        with pytest.raises(UserError) as err:
            qcompile.compile(given, x[:1], calib=x, scheme="uniform", bits=8, output=str(tmp_path / "e.onnx"))
        _assert_one_line(err, "torch.export program", "pass the nn.Module it was exported from")
    assert not (tmp_path / "e.onnx").exists()


def test_a_lazy_module_that_never_ran_is_refused_in_one_line(tmp_path):
    """nn.LazyConv2d before its first forward holds no weights: torch's ValueError and a traceback came out of the
    compile's first look at the parameters. Once it ran (or its weights are loaded), it compiles."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.LazyConv2d(4, 1), nn.Flatten(), nn.LazyLinear(3)).eval()
    x = torch.randn(8, 3, 8, 8)
    for run in (lambda: qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8,
                                         output=str(tmp_path / "l.onnx")),
                lambda: trace(model, x[:1])):
        with pytest.raises(UserError) as err:
            run()
        _assert_one_line(err, "lazy modules that have not run yet", "'2'", "run it once on an input")
    assert not (tmp_path / "l.onnx").exists()
    model(x[:1])
    assert qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, progress=False).report.passed


def test_model_argument_forms(tmp_path):
    """A path-like model is a path (it was "got PosixPath"); arch= with a module is refused (it was ignored); a
    state dict object names what to do."""
    import pathlib

    model = MLP(seed=0)
    x = torch.randn(8, *MLP.INPUT_SHAPE[1:])
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    result = qcompile.compile(pathlib.Path(path), x[:1], calib=x, arch="tests.models:MLP", scheme="uniform", bits=8,
                              progress=False)
    assert result.report.passed
    with pytest.raises(UserError) as err:
        qcompile.compile(model, x[:1], calib=x, arch="tests.models:MLP", scheme="uniform", bits=8)
    _assert_one_line(err, "arch= names the architecture of a weights file")
    with pytest.raises(UserError) as err:
        qcompile.compile(model.state_dict(), x[:1], calib=x, scheme="uniform", bits=8)
    _assert_one_line(err, "load it into the model")


def test_torchscript_archive_with_non_persistent_buffers_loads_into_arch(tmp_path):
    """A TorchScript archive's state_dict holds non-persistent buffers too: --arch naming the very factory was
    refused ("unexpected mean, std")."""
    from tests.models import Normalized

    model = Normalized().eval()
    with torch.no_grad():
        model.mean.fill_(0.5)
        model.std.fill_(2.0)
    x = torch.randn(4, 16)
    path = tmp_path / "n.pt"
    torch.jit.save(torch.jit.trace(model, x), str(path))
    loaded = load_model(str(path), arch="tests.models:Normalized")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_checkpoint_layouts(tmp_path, user_module):
    """{'model': <module>, 'epoch': 7} with --trust-pickle (was "holds a dict"); {'net': sd} (the one dict of
    tensors in it); a dict without one names its keys; a torch.export archive and an ONNX file say what they are."""
    import onnx

    model = _build_user_net(user_module)
    torch.save({"model": model, "epoch": 7}, tmp_path / "whole.pt")
    assert type(load_model(str(tmp_path / "whole.pt"), trust_pickle=True)).__name__ == "UserNet"
    torch.save({"net": model.state_dict(), "epoch": 7}, tmp_path / "net.pt")
    loaded = load_model(str(tmp_path / "net.pt"), arch=f"{user_module}:UserNet")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    torch.save({"epoch": 7, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(UserError) as err:
        load_model(str(tmp_path / "meta.pt"), arch=f"{user_module}:UserNet")
    _assert_one_line(err, "holds a dict with keys 'epoch', 'lr', none of them a state dict")
    x = torch.randn(2, *MLP.INPUT_SHAPE[1:])
    torch.export.save(torch.export.export(MLP(seed=0), (x,)), str(tmp_path / "m.pt2"))
    with pytest.raises(UserError) as err:
        load_model(str(tmp_path / "m.pt2"), arch="tests.models:MLP")
    _assert_one_line(err, "is a torch.export archive (.pt2)")
    assert "then weights.pt with --arch tests.models:MLP" in str(err.value)  # --arch was given: not "pass them with"
    with pytest.raises(UserError) as err:
        load_model("tests.models:MLP(3)")
    _assert_one_line(err, "'tests.models:MLP(3)' passes arguments to the factory, which a spec cannot")
    onnx.save(qcompile.compile(MLP(seed=0), x, scheme="fp32", validate=False).onnx_model, str(tmp_path / "m.onnx"))
    with pytest.raises(UserError) as err:
        load_model(str(tmp_path / "m.onnx"), arch="tests.models:MLP")
    _assert_one_line(err, "is an ONNX file")


def test_a_fuse_fx_graph_module_is_traced_through_its_fused_modules():
    """fuse_fx's GraphModule calls ConvReLU2d whole: taken as it was, its convs stayed float without a word."""
    from torch.ao.quantization.quantize_fx import fuse_fx

    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4)).eval()
    fused = fuse_fx(model)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(13))
    result = qcompile.compile(fused, x[:1], calib=x, scheme="uniform", bits=8, progress=False)
    assert result.report.passed
    assert len([n for n, m in result.model.named_modules() if n.endswith("weight_fq")]) == 3


def test_layers_left_float_inside_opaque_modules_warn_from_python():
    """From Python nothing said that an LSTM's (or a --leaf-module's) layers stayed float; the CLI's layer table
    did. A QuantizationWarning names them."""
    from qcompile.errors import QuantizationWarning

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 16, batch_first=True)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.lstm(x)[0][:, -1])

    class Holder(nn.Module):  # a module kept whole (--leaf-module) with an LSTM inside: out of the quantizer's reach
        def __init__(self):
            super().__init__()
            self.inner = Recurrent()

        def forward(self, x):
            return self.inner(x)

    class CellLoop(nn.Module):  # a GRUCell unrolled by hand: no word of its float weights before
        def __init__(self):
            super().__init__()
            self.cell = nn.GRUCell(8, 16)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            h = x.new_zeros(x.size(0), 16)
            for t in range(5):
                h = self.cell(x[:, t], h)
            return self.fc(h)

    x = torch.randn(8, 5, 8, generator=torch.Generator().manual_seed(14))
    with pytest.warns(QuantizationWarning, match=r"1 module\(s\) keep layers float.*inner \(1 Conv/Linear layer\(s\) "
                                                 r"and 1 recurrent layer"):
        qcompile.compile(Holder().eval(), x[:1], calib=x, scheme="uniform", bits=8, progress=False,
                         leaf_modules=("inner",))
    with warnings.catch_warnings():  # a plain LSTM is a layer (quantized weight-only): nothing to warn about
        warnings.simplefilter("error", QuantizationWarning)
        qcompile.compile(Recurrent().eval(), x[:1], calib=x, scheme="uniform", bits=8, progress=False)
    with pytest.warns(QuantizationWarning, match=r"1 module\(s\) keep layers float.*cell \(1 recurrent layer"):
        qcompile.compile(CellLoop().eval(), x[:1], calib=x, scheme="uniform", bits=8, progress=False)


def test_autocast_in_forward_and_float_inputs_for_token_ids_are_named(tmp_path):
    """A forward under torch.autocast was blamed on an in-place update; float --input-shape inputs for an
    Embedding were told to "fix --input-shape", which cannot make integers."""
    from tests.models import TokenMean

    class Autocast(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 64), nn.Linear(64, 3)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.fc2(torch.relu(self.fc1(x))).float()

    torch.manual_seed(0)
    x = torch.randn(16, 8)
    with pytest.raises(UserError) as err:
        qcompile.compile(Autocast().eval(), x[:1], calib=x, scheme="uniform", bits=8)
    _assert_one_line(err, "runs under torch.autocast")
    with pytest.raises(UserError) as err:
        qcompile.compile(TokenMean().eval(), torch.zeros(1, 5), scheme="fp32")
    _assert_one_line(err, "an input takes integer ids (an Embedding) and was given floats")
    # token ids saved as float32 and given as calibration data: the line named only --input-shape
    ids = torch.randint(0, 5, (8, 5)).float()
    with pytest.raises(UserError) as err:
        qcompile.compile(TokenMean().eval(), calib=ids, scheme="uniform", bits=8)
    _assert_one_line(err, "ids.astype(np.int64), not float32")


class _ChunkList(nn.Module):
    """YOLOv8's C2f: ``list(x.chunk(2, 1))`` (torch.fx cannot iterate a Proxy)."""

    def __init__(self):
        super().__init__()
        self.cv1 = nn.Conv2d(1, 16, 1)
        self.m = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.m(y[-1]))
        return torch.cat(y, 1).mean((2, 3))


class _PerSample(nn.Module):
    """A loop over the batch's samples (``for t in x``): their count follows the batch, no fixed count to trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)

    def forward(self, x):
        return torch.stack([self.conv(t[None])[0] for t in x]).mean((2, 3))


class _TokensAndMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, ids, mask):
        h = self.emb(ids) * mask.unsqueeze(-1)
        return self.fc(h.mean(1))


def test_a_list_of_chunks_traces_to_its_fixed_count():
    """``list(cv1(x).chunk(2, 1))`` (YOLOv8's C2f) and ``for part in torch.split(x, 4, 1)`` were refused ("Proxy
    object cannot be iterated"): torch.fx knows no count other than a fixed unpacking. The sized trace knows it from
    the example (2 chunks, 4 parts, the same at every batch) and traces each as ``getitem``."""

    class Splits(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 8, 1)

        def forward(self, x):
            parts = [p * (i + 1) for i, p in enumerate(torch.split(x, 4, 1))]
            return self.conv(torch.cat(parts, 1))

    torch.manual_seed(0)
    for model, x in ((_ChunkList().eval(), torch.rand(16, 1, 8, 8)), (Splits().eval(), torch.randn(16, 16, 6, 6))):
        gm = trace(model, x[:1])
        assert sum(n.target is operator.getitem for n in gm.graph.nodes) >= 2
        for batch in (x[:1], x[:5]):
            torch.testing.assert_close(gm(batch), model(batch))
        result = qcompile.compile(model, calib=x, scheme="uniform", bits=8)
        assert result.report.passed, result.report.summary()


def test_user_mistakes_in_model_code_and_data_get_the_right_hint():
    """Three hints that pointed the wrong way (a sweep of models written as in the wild): iterating a traced tensor
    (``list(x.chunk(2, 1))``, now traced; a loop over the batch's samples still is refused) was "wrap the
    data-dependent part", under torch.fx's paragraph on loops, and named
    only the CLI flag; float32 token ids beside an int64 mask got "save image data as float32", the opposite fix;
    a dict of calibration inputs was "a calibration batch is a str" (its keys)."""
    x = torch.rand(16, 1, 8, 8)
    with pytest.raises(UserError, match=r"Proxy object cannot be iterated; torch.fx cannot iterate a traced tensor "
                                        r"or its chunks: unpack a fixed count instead \(a, b = x.chunk\(2, 1\)") as e:
        qcompile.compile(_PerSample().eval(), calib=x, scheme="uniform", bits=8, validate=False)
    assert "leaf_modules=[NAME]" in str(e.value) and "See the torch.fx docs" not in str(e.value)
    ids = torch.randint(0, 50, (16, 6))
    mask = torch.ones(16, 6, dtype=torch.int64)
    with pytest.raises(UserError, match=r"hold the ids as integers \(ids.astype\(np.int64\), not float32"):
        qcompile.compile(_TokensAndMask().eval(), calib=(ids.float(), mask), scheme="uniform", bits=8, validate=False)
    with pytest.raises(UserError, match=r"the calibration data is a dict \(keys 'x'\); give the inputs as a tensor"):
        qcompile.compile(_ChunkList().eval(), x[:1], calib={"x": x}, scheme="uniform", bits=8, validate=False)
    # a tokenizer's BatchEncoding is a UserDict: its keys were read as batches ("a calibration batch is a str")
    import collections

    class BatchEncoding(collections.UserDict):
        pass

    encoded = BatchEncoding({"input_ids": ids, "attention_mask": mask})
    with pytest.raises(UserError, match=r"the calibration data is a BatchEncoding mapping \(keys 'input_ids', "
                                        r"'attention_mask'\); .* calib=\(d\['input_ids'\], d\['attention_mask'\]\)"):
        qcompile.compile(_TokensAndMask().eval(), calib=encoded, scheme="uniform", bits=8, validate=False)
    with pytest.raises(UserError, match=r"the calibration batches are BatchEncoding mappings"):
        qcompile.compile(_TokensAndMask().eval(), calib=[encoded, encoded], scheme="uniform", bits=8, validate=False)


def test_a_state_dict_saved_with_pruning_masks_on_loads_baked(tmp_path):
    # torch.nn.utils.prune leaves conv1.weight_orig and conv1.weight_mask where the model has conv1.weight: the
    # checkpoint was refused as not fitting --arch ("pass the factory that built it"), the factory that built it
    import torch.nn.utils.prune as prune

    from qcompile.frontend import load_model
    from qcompile.models import digits

    model = digits.pretrained()
    for mod in (model.conv1, model.fc1):
        prune.l1_unstructured(mod, "weight", amount=0.5)
    path = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), path)
    assert "conv1.weight_orig" in model.state_dict() and "conv1.weight" not in model.state_dict()
    loaded = load_model(str(path), arch=digits.SPEC)
    assert torch.equal(loaded.conv1.weight, model.conv1.weight) and torch.equal(loaded.fc1.weight, model.fc1.weight)
    assert float((loaded.conv1.weight == 0).float().mean()) >= 0.5
    x = digits.calibration_inputs(8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


class OwnOrigMask(nn.Module):
    """A model whose own state dict has ``pos_orig`` and ``pos_mask``: nothing to bake."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.pos_orig = nn.Parameter(torch.randn(4))
        self.register_buffer("pos_mask", torch.ones(4))

    def forward(self, x):
        return self.fc(x) + self.pos_orig * self.pos_mask


def own_orig_mask():
    return OwnOrigMask()


def test_pruning_names_the_model_has_itself_are_not_baked_and_a_bad_mask_is_one_line(tmp_path):
    import torch.nn.utils.prune as prune

    from qcompile.frontend import load_model
    from qcompile.models import digits

    model = OwnOrigMask()
    torch.save(model.state_dict(), tmp_path / "own.pt")
    loaded = load_model(str(tmp_path / "own.pt"), arch=f"{__name__}:own_orig_mask")
    assert torch.equal(loaded.pos_orig, model.pos_orig)  # was "missing pos_orig, pos_mask; unexpected pos"

    pruned = digits.pretrained()
    prune.l1_unstructured(pruned.fc1, "weight", amount=0.5)
    state = pruned.state_dict()
    state["fc1.weight_mask"] = torch.ones(3, 3)  # an "internal error" (RuntimeError from the product)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(qcompile.UserError, match=r"pruned 'fc1.weight' whose mask fc1.weight_mask has shape \(3, 3\)"):
        load_model(str(tmp_path / "bad.pt"), arch=digits.SPEC)


def test_a_packed_sequence_in_forward_is_named():
    """pack_padded_sequence in forward failed to trace with torch.fx's '__cuda_array_interface__ must be a dict',
    which says nothing of the cause."""
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, x):
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            return self.fc(self.rnn(packed)[1][0][-1])

    x = torch.randn(4, 6, 8)
    with pytest.raises(UserError) as err:
        qcompile.compile(Packed().eval(), x[:1], calib=x, scheme="fp32", progress=False)
    _assert_one_line(err, "a packed sequence (nn.utils.rnn.pack_padded_sequence) cannot be traced")


class _SeededLinear8(nn.Module):
    """A seeded ``fc = nn.Linear(8, 8)``, for the small models of the tracing tests below to write a forward over."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)


def test_item_of_data_read_by_arithmetic_stays_a_tensor_in_the_file():
    """``fc(x) / x.abs().max().item()``: torch.onnx wrote the ``.item()`` as the example's value, a constant, so
    the file divided every batch by the example's maximum (0.5 dB from the model). Read only by arithmetic (also
    through arithmetic on the number, ``0.1 * ...item()``, and as a clamp bound), the 0-dim tensor is kept."""
    import numpy as np
    import onnxruntime as ort

    class M(_SeededLinear8):
        def forward(self, x):
            y = self.fc(x - x.mean().item()) / x.abs().max().item()
            return torch.clamp(y, max=0.1 * x.std().item())

    x = torch.randn(64, 8) * torch.linspace(0.2, 3, 64)[:, None]
    gm = trace(M().eval(), (x[:1],))
    assert not [n for n in gm.graph.nodes if n.target == "item"], gm.graph
    for scheme in ("fp32", "uniform"):
        result = qcompile.compile(M().eval(), x[:1], calib=x, scheme=scheme, bits=8)
        assert result.report.passed, result.report.failures
        sess = ort.InferenceSession(result.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            want = (M().eval() if scheme == "fp32" else result.model)(x).numpy()
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), scheme


def test_item_whose_tensor_would_change_a_dtype_stays_an_item():
    """An integer tensor times a float64 0-dim tensor is float64, times a Python float float32: such an
    ``.item()`` is left as it is (the model's dtypes are kept)."""
    class M(nn.Module):
        def forward(self, x, n):
            return x * (n * x.double().mean().item()).float()

    x, n = torch.randn(4, 3), torch.arange(12).reshape(4, 3)
    gm = trace(M().eval(), (x, n))
    assert [node for node in gm.graph.nodes if node.target == "item"]
    assert torch.equal(gm(x, n), M()(x, n))

    class Shaped(nn.Module):  # read as a 0-dim tensor: a (1, 1) one would broadcast a (3,) row to (1, 3)
        def forward(self, x):
            return x[0] / x.sum(dim=(0, 1), keepdim=True).item()

    gm = trace(Shaped().eval(), (x[:1],))
    assert not [node for node in gm.graph.nodes if node.target == "item"]
    assert gm(x[:1]).shape == (3,) and torch.allclose(gm(x), Shaped()(x))

    class IntPower(nn.Module):  # an int tensor ** -1 fails where the Python int does not: the item stays
        def forward(self, x):
            n = (x > 0).sum().item() + 1
            return x * n ** -1

    gm = trace(IntPower().eval(), (x[:1],))
    assert [node for node in gm.graph.nodes if node.target == "item"]
    assert torch.equal(gm(x[:1]), IntPower()(x[:1]))


def test_an_item_the_file_holds_as_a_constant_is_named_even_where_validation_passes():
    """``x[:1, :1].item()`` through ``full_like``: the file holds the example's value; validation, whose first batch
    starts with the example, passed, and nothing said so."""
    from qcompile.errors import QuantizationWarning

    class M(_SeededLinear8):
        def forward(self, x):
            return self.fc(x) + torch.full_like(self.fc.bias, x[:1, :1].abs().item())

    x = torch.randn(1, 8).repeat(16, 1)  # every sample the example: validation cannot tell
    with pytest.warns(QuantizationWarning, match="as Python numbers"):
        result = qcompile.compile(M().eval(), x[:1], calib=x, scheme="fp32")
    assert result.report.passed and "as Python numbers" in result.summary["numbers_note"]


def test_a_failed_validation_names_an_item_the_file_holds_as_a_constant():
    class M(_SeededLinear8):
        def forward(self, x):  # full_like takes a number: the .item() stays, and torch.onnx bakes it
            return self.fc(x) * torch.full_like(self.fc.weight[0], x.abs().max().item())

    x = torch.randn(64, 8) * torch.linspace(0.2, 3, 64)[:, None]
    result = qcompile.compile(M().eval(), x[:1], calib=x, scheme="fp32")
    assert not result.report.passed
    assert any("as Python numbers" in f and ".item()" in f for f in result.report.failures), result.report.failures


def test_a_forward_that_fills_a_cache_on_its_first_call_compiles():
    """``if self.cache is None: self.cache = ...``: the trace stored a Proxy in the attribute, and the compile stopped
    with a wrong "in-place update" error. The attribute gets back what it held; the caller's model is untouched."""
    class Cache(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc, self.cache = nn.Linear(8, 8), None

        def forward(self, x):
            if self.cache is None:
                self.cache = torch.ones(1, x.shape[1]) * 2
            return self.fc(x) * self.cache

    model = Cache().eval()
    x = torch.randn(32, 8)
    for scheme in ("fp32", "uniform"):
        result = qcompile.compile(model, x[:1], calib=x, scheme=scheme, bits=8)
        assert result.report.passed, result.report.failures
    assert model.cache is None


def test_a_list_appended_to_in_forward_keeps_its_items_and_the_traced_graph_is_still_checked():
    """``self.log.append(y.mean())``: the trace appended a Proxy to the list; the attribute was deleted, the check of
    the traced graph against the model then failed to run the model and was skipped, and a graph that wrote into a
    view (``v = y[:, :4]; v[:, 0] = 5; return y``) was compiled to a file 5 dB from the model with validation PASS."""
    class M(nn.Module):
        def __init__(self, view: bool):
            super().__init__()
            torch.manual_seed(0)
            self.fc, self.log, self.view = nn.Linear(8, 8), [], view

        def forward(self, x):
            y = self.fc(x)
            self.log.append(y.mean())
            if self.view:
                v = y[:, :4]
                v[:, 0] = 5
            return y

    model = M(view=False).eval()
    gm = trace(model, (torch.randn(1, 8),), copy=False)
    # no Proxy left in it (the model's own run, which checks the graph, appended a real value)
    assert all(type(v) is torch.Tensor for v in model.log) and gm(torch.randn(3, 8)).shape == (3, 8)
    with pytest.raises(UserError, match="does not compute the model"):
        qcompile.compile(M(view=True).eval(), torch.randn(1, 8), calib=torch.randn(16, 8), scheme="uniform", bits=8)


def test_an_assignment_through_a_view_that_the_example_does_not_show_is_refused():
    """``z = y.view(...); y[y > 2] = 2``: the graph does not follow the view, and on the example no value is above 2,
    so the check on the example passed and the file (PASS) was 11 dB worse than the model's own. With an item
    assignment in the graph the check runs on the calibration samples too."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            y = self.fc(x)
            z = y.view(-1, 4, 4)
            y[y > 2.0] = 2.0
            return z.sum(-1)

    x = torch.randn(32, 16) * 2
    example = torch.zeros(1, 16)  # fc(0) = bias: nothing above 2
    with pytest.raises(UserError, match="does not compute the model"):
        qcompile.compile(M().eval(), example, calib=x, scheme="uniform", bits=8)


def test_a_mask_built_from_the_batch_size_in_transformers_code_asks_for_the_mask(tmp_path, monkeypatch):
    """transformers (GPT-2) builds the attention mask from the batch size when it is given none, in
    ``masking_utils.py``: a branch on the batch that no trace keeps. --leaf-module, the generic hint, then failed in
    torch.onnx (``aten::diff``); with the mask as an input GPT-2 compiles. A stand-in module of that name here."""
    (tmp_path / "masking_utils.py").write_text(textwrap.dedent("""
        import torch

        def make_mask(x, mask=None):
            if mask is None:
                positions = torch.arange(x.shape[1])[None]
                if x.shape[0] != positions.shape[0]:
                    positions = positions.expand(x.shape[0], -1)
                mask = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) == 1
            return mask
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import masking_utils

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) * masking_utils.make_mask(x)[..., None]

    with pytest.raises(UserError, match="masking_utils.py.*give every mask the model takes as an input"):
        qcompile.compile(M().eval(), torch.randn(1, 5, 8), calib=torch.randn(8, 5, 8), scheme="uniform", bits=8)
    sys.modules.pop("masking_utils", None)


def test_item_assignment_on_a_traced_tensor_is_traced():
    """``g[:, 0] = 1`` (Longformer's global attention mask) and ``y[:, 2:4] = ...`` on a layer's output: torch.fx
    stopped ("'Proxy' object does not support item assignment"). Recorded in place, then made a new tensor that
    every later use reads, as eager PyTorch computes it."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            g = torch.zeros_like(x)
            g[:, 0] = 1
            y = self.fc(x)
            y[:, 2:4] = y[:, 2:4] * 3
            return self.fc2(torch.relu(y)) + g

    x = torch.randn(64, 8)
    gm = trace(M().eval(), (x[:1],))
    assert torch.allclose(gm(x), M().eval()(x), atol=1e-6)
    for scheme in ("fp32", "uniform"):
        result = qcompile.compile(M().eval(), x[:1], calib=x, scheme=scheme, bits=8)
        assert result.report.passed, result.report.failures


def test_equal_sizes_compare_equal_in_the_sized_retrace():
    """``assert q.size() == k.size()`` (Longformer's attention) on sizes that follow the batch: the comparison of
    traced sizes was a control-flow error; the shapes of the two values at batches 2 and 3 answer it."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            q, k = self.q(x), self.k(x)
            assert q.size() == k.size()
            assert q.shape[1:] != x[:, :4].shape[1:]
            return q * k

    x = torch.randn(16, 8)
    gm = trace(M().eval(), (x[:1],))
    assert torch.allclose(gm(x), M().eval()(x), atol=1e-6)

    class Sliced(nn.Module):  # h[:4] has h's shape at batches 2 and 3 only: the comparison stays traced (refused)
        def forward(self, x):
            if x.shape[1] != 8:
                raise ValueError("8 features")
            if x[:4].shape == x.shape:
                x = x - x.mean(0, keepdim=True)
            return x * 2

    with pytest.raises(UserError, match="cannot trace the model"):
        trace(Sliced().eval(), (x[:1],))


def test_a_shape_compared_with_a_tuple_holding_the_traced_batch_size_traces():
    """``if y.shape != (b, c, h, w)`` with ``b`` from ``x.shape`` (torchvision RAFT's correlation block): the
    elements compared are two traced sizes that follow the batch, equal at batches 2 and 3; the comparison was a
    control-flow error. A size against a number keeps it."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            b, _, h, w = x.shape
            y = self.c(x)
            if y.shape != (b, 4, h, w):
                raise ValueError("unexpected shape")
            return y

    x = torch.randn(5, 3, 8, 8)
    gm = trace(M().eval(), (x[:1],))
    assert torch.allclose(gm(x), M().eval()(x), atol=1e-6)

    class Big(nn.Module):  # b == 16 is False at batches 2 and 3 alike, but not a comparison of two sizes
        def forward(self, x):
            return x * 2 if x.shape[0] == 16 else x

    with pytest.raises(UserError, match="cannot trace the model"):
        trace(Big().eval(), (x[:1],))


def test_the_sized_retrace_of_a_forward_that_fills_a_cache():
    """A shape check (sized retrace) in a forward that caches a value on its first call (timm's attention-bias
    cache: TinyViT, whose train()/eval() empties it): the retrace left a Proxy in the cache, the model's eager run
    that checks the graph returned it, and the plain trace's control-flow error stood."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(8, 8)
            self.b = nn.Parameter(torch.randn(8))
            self.cache = {}

        def forward(self, x):
            if x.shape[1] != 8:
                raise ValueError("8 features")
            if "b" not in self.cache:
                self.cache["b"] = self.b * 2
            return self.fc(x) + self.cache["b"]

        def train(self, mode=True):  # as timm's attention blocks: a mode switch (the retrace's eval()) clears it
            super().train(mode)
            self.cache = {}
            return self

    x = torch.randn(5, 8)
    model = M().eval()
    gm = trace(model, (x[:1],))
    assert torch.allclose(gm(x), M().eval()(x), atol=1e-6)
    assert all(isinstance(v, torch.Tensor) for v in model.cache.values())


def test_the_sized_retrace_keeps_sizes_after_repeat_interleave_by_a_number_and_traces_ones_of_sizes():
    """Two things that stopped GPT-J, CodeGen and BART's decoder: ``repeat_interleave(y, 2, 1)`` (rotary embeddings)
    was taken for a data-sized operation, so every later size stayed traced and a branch on one failed; and
    ``torch.ones(B, L)`` with a traced batch size raised "ones() takes 1 positional argument but 2 were given"."""
    class M(_SeededLinear8):
        def forward(self, x):
            B, L = x.shape[:2]
            if L != 4:
                raise ValueError("4 positions")
            y = torch.repeat_interleave(self.fc(x), 2, 1)
            if y.shape[1] > 1:
                y = y * 2
            return y * torch.ones(B, 2 * L, device=x.device)[..., None]

    x = torch.randn(16, 4, 8)
    gm = trace(M().eval(), (x[:1],))
    assert torch.allclose(gm(x), M().eval()(x), atol=1e-6)
    result = qcompile.compile(M().eval(), x[:1], calib=x, scheme="uniform", bits=8)
    assert result.report.passed, result.report.failures


def test_a_failed_validation_of_a_model_that_draws_random_numbers_says_so():
    """``+ 0.1 * torch.randn(B, 4)`` in forward: the file and the simulation draw different numbers, and the failure
    said the layers after the last quantizer did not compute what the simulation does."""
    class M(_SeededLinear8):
        def forward(self, x):
            return self.fc(x) + 0.1 * torch.randn(x.shape[0], 8)

    x = torch.randn(32, 8)
    for scheme in ("fp32", "uniform"):
        result = qcompile.compile(M().eval(), x[:1], calib=x, scheme=scheme, bits=8)
        assert not result.report.passed
        assert any("draws random numbers (randn" in f for f in result.report.failures), result.report.failures


def test_digits_accuracy_takes_logits_straight_from_the_model():
    """``digits.accuracy(model(x), y)`` outside ``torch.no_grad()`` raised "Can't call numpy() on Tensor that
    requires grad"; arrays and tensors give the same figure."""
    from qcompile.models import digits

    model = digits.pretrained()
    _, _, x, y = digits.load_split()
    logits = model(x[:100])
    assert logits.requires_grad
    acc = digits.accuracy(logits, y[:100])
    assert acc == digits.accuracy(logits.detach().numpy(), y[:100]) > 0.9


def test_a_model_that_rebuilds_submodules_on_its_first_call_is_traced_as_it_becomes():
    """transformers' BigBird (default block-sparse attention) switches to full attention on short inputs inside its
    first forward, building new attention modules: no trace could follow, and the error pointed at a slice. The
    copy being traced has run eagerly by then; traced again as it now is, it compiles."""
    import copy

    import torch.nn as nn

    class Full(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return torch.relu(self.proj(x))

    class Sparse(Full):
        def forward(self, x):
            return torch.relu(self.proj(x[:, : x.shape[1] // 2].repeat(1, 2, 1)))

    class Switching(nn.Module):
        def __init__(self):
            super().__init__()
            self.mode = "sparse"
            self.attn = Sparse(nn.Linear(8, 8))
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            if self.mode == "sparse" and x.shape[1] < 64:  # too short for blocks: full attention from now on
                self.mode = "full"
                self.attn = Full(self.attn.proj)
            return self.fc(self.attn(x)).mean(1)

    x = torch.randn(32, 6, 8, generator=torch.Generator().manual_seed(0))
    model = Switching().eval()
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, output=None)
    assert result.report.passed, result.report.summary()
    assert model.mode == "sparse" and isinstance(model.attn, Sparse)  # the caller's model is left as it was
    with torch.no_grad():
        reference = copy.deepcopy(model)(x)  # (switches the copy)
        assert torch.allclose(result.model(x), reference, atol=0.1)


def test_a_trace_error_also_names_where_the_sized_trace_stopped():
    """The plain trace stops at the first size it needs; the sized one answers sizes from the example and stops at
    what really blocks the trace (Longformer: a branch on whether the mask marks global tokens). The error named
    only the first place, and advised writing a fixed size there."""
    import torch.nn as nn

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            if x.shape[1] > 4:  # a size: the sized trace answers it
                x = x * 2
            if x.sum() > 0:  # the data: no trace can answer it
                x = x + 1
            return self.fc(x)

    with pytest.raises(qcompile.UserError, match=r"\(with the input sizes answered from the example, the trace then "
                                                 r"stopped at test_frontend\.py:\d+: symbolically traced variables "
                                                 r"cannot be used as inputs to control flow\)"):
        qcompile.compile(Branchy().eval(), torch.randn(1, 8), scheme="fp32", output=None)


# --- user mistakes that were tracebacks or misleading messages ----------------------------------------------


@pytest.mark.parametrize("body, exits", [
    ("import argparse\np = argparse.ArgumentParser()\np.add_argument('--epochs', type=int)\nargs = p.parse_args()\n",
     "importing module 'qc_train_script' from 'qc_train_script:net' exited (sys.exit(2); it said "),
    ("def net():\n    raise SystemExit('no GPU')\n", "factory 'qc_train_script:net' exited (sys.exit('no GPU')"),
])
def test_a_factory_module_that_exits_is_one_line(user_module, tmp_path, monkeypatch, capsys, body, exits):
    """A training script used as --arch that parses sys.argv when imported read qcompile's own arguments: argparse
    printed "usage: qcompile [-h] [--epochs EPOCHS]" and "qcompile: error: unrecognized arguments" and the command
    exited 2 on SystemExit, as if qcompile's options were wrong (a factory's sys.exit(1): exit 1, no message)."""
    source = f"from {user_module} import UserNet\n" + body + "\ndef net():\n    return UserNet()\n" \
        if "argparse" in body else body
    (tmp_path / "qc_train_script.py").write_text(source)
    monkeypatch.setattr(sys, "argv", ["qcompile", "w.pt", "--arch", "qc_train_script:net"])
    try:
        with pytest.raises(UserError) as err:
            load_model("qc_train_script:net")
        _assert_one_line(err, exits, "if __name__ == \"__main__\":")
        assert "usage:" not in capsys.readouterr().err  # argparse's usage lines were held back
    finally:
        sys.modules.pop("qc_train_script", None)


def test_a_factory_module_that_warns_still_shows_its_warning(user_module, tmp_path, capsys):
    """What the user's module writes to stderr is held back while it runs, and shown when it does not exit."""
    (tmp_path / "qc_noisy.py").write_text(f"import sys\nfrom {user_module} import UserNet\n"
                                          "sys.stderr.write('loading config\\n')\ndef net():\n    return UserNet()\n")
    try:
        assert isinstance(load_model("qc_noisy:net"), nn.Module)
        assert "loading config" in capsys.readouterr().err
    finally:
        sys.modules.pop("qc_noisy", None)


def test_a_state_dict_of_meta_tensors_is_refused_in_one_line(tmp_path):
    """A state dict saved from a model built on the meta device: "does not fit --arch (Error(s) in loading
    state_dict for MLP:)", the heading of torch's message, which named no reason."""
    path = tmp_path / "meta.pt"
    torch.save({k: v.to("meta") for k, v in MLP(seed=0).state_dict().items()}, path)
    with pytest.raises(UserError) as err:
        load_model(str(path), arch="tests.models:MLP")
    _assert_one_line(err, "holds tensors on the 'meta' device, shapes without values", "save the state dict")


def test_a_model_on_the_meta_device_is_refused_in_one_line():
    """A model on the meta device was "the model does not run on inputs of shape [(1, 16) float32] (... Tensor on
    device meta ...); fix --input-shape": its inputs were fine, its weights hold no values."""
    x = torch.randn(8, *MLP.INPUT_SHAPE[1:])
    for run in (lambda m: qcompile.compile(m, x[:1], calib=x, scheme="uniform", bits=8, validate=False),
                lambda m: trace(m, x[:1])):
        with pytest.raises(UserError) as err:
            run(MLP(seed=0).to("meta"))
        _assert_one_line(err, "weights are on the 'meta' device", "load_state_dict(state_dict, assign=True)")


@pytest.mark.parametrize("model, needle", [
    ("weights.pt", "trace() takes an nn.Module, got str (a path: load it first with qcompile.load_model"),
    (lambda x: x * 2, "trace() takes an nn.Module, got function"),
    ("script", "a TorchScript module cannot be traced with torch.fx"),
])
def test_trace_of_something_else_than_a_module_is_one_line(model, needle):
    """qcompile.trace('w.pt', x): AttributeError "'str' object has no attribute 'named_children'"; a scripted
    module: RuntimeError "get_submodule is not supported on ScriptModules"."""
    if model == "script":
        model = torch.jit.script(MLP(seed=0))
    with pytest.raises(UserError) as err:
        trace(model, example_input(MLP))
    _assert_one_line(err, needle)


def test_a_forward_that_returns_none_is_one_line():
    """A forward that forgot its return: torch.onnx's exporter failed "('Graph' object has no attribute 'outputs')"
    and the error blamed what torch.onnx exports."""
    class NoReturn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            self.fc(x)

    x = torch.randn(8, 8)
    with pytest.raises(UserError) as err:
        qcompile.compile(NoReturn().eval(), x[:1], calib=x, scheme="uniform", bits=8, validate=False)
    _assert_one_line(err, "the model's forward returns None", "return the model's output tensor(s)")


def test_a_negative_input_shape_says_the_batch_is_dynamic_anyway():
    with pytest.raises(UserError) as err:
        parse_input_shape("-1,3,8,8")
    _assert_one_line(err, "invalid --input-shape '-1,3,8,8'", "give 1 there, not -1")


def test_a_torchvision_detection_model_is_told_to_compile_its_tensor_part():
    """torchvision's SSD / RetinaNet take a list of images and end in non-maximum suppression: the trace stops at
    iterating the images, and the generic hints (unpack a fixed count, --leaf-module) led nowhere. The refusal names
    the part that compiles (its backbone, or the head on the backbone's features: SSDlite and RetinaNet so compiled
    PASS at W8A8 with 0 codes differing)."""
    class SSDLike(nn.Module):  # iterates its input as torchvision's GeneralizedRCNNTransform does
        def __init__(self):
            super().__init__()
            self.backbone = nn.Conv2d(3, 4, 3)

        def forward(self, images):
            return [self.backbone(img[None]) for img in images]

    SSDLike.__module__ = "torchvision.models.detection.ssd"
    with pytest.raises(qcompile.UserError) as info:
        qcompile.trace(SSDLike().eval(), torch.randn(1, 3, 8, 8))
    message = str(info.value)
    assert "torchvision detection model" in message and "model.backbone" in message
    assert "\n" not in message


def test_a_forward_taking_a_dict_or_annotated_tuple_is_named():
    """forward(d) reading d["x"]: "the model does not run on inputs of shape [(1, 64) float32] (... invalid data type
    'str'); fix --input-shape, or the shape and type of the --calib inputs", a fix that cannot work."""
    class DictIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, d):
            return self.fc(d["x"])

    class TupleIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, t: tuple[torch.Tensor, torch.Tensor]):
            x, y = t
            return self.fc(x + y)

    class PlainTupleIn(nn.Module):  # unannotated: read from the code (it had the generic shape hint)
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, inputs):
            x, y = inputs
            return self.fc(x * y)

    x = torch.randn(4, 8)
    with pytest.raises(qcompile.UserError, match=r"forward takes a dict, tuple or list \(d\) where qcompile passes"):
        qcompile.compile(DictIn().eval(), x[:1], calib=x, scheme="uniform", bits=8)
    with pytest.raises(qcompile.UserError, match=r"forward takes a dict, tuple or list \(t\) where qcompile passes"):
        qcompile.compile(TupleIn().eval(), x[:1], calib=x, scheme="uniform", bits=8)
    with pytest.raises(qcompile.UserError, match=r"forward takes a dict, tuple or list \(inputs\) where qcompile"):
        qcompile.compile(PlainTupleIn().eval(), x[:1], calib=x, scheme="uniform", bits=8)
    # its two inputs given as two arrays: "takes 1 input(s) but 2 were given" said nothing of the tuple
    with pytest.raises(qcompile.UserError, match=r"but 2 were given .*; forward reads inputs as a tuple, list or "
                       r"dict, .*wrap the model") as err:
        qcompile.compile(PlainTupleIn().eval(), calib=(x, x), scheme="uniform", bits=8)
    assert "\n" not in str(err.value)

    class IndexedTensor(nn.Module):  # x[:, 0] and x[..., -1] index a tensor: not read as a container
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(x[:, 0] + x[..., -1:])

    from qcompile.frontend import _container_inputs

    assert _container_inputs(IndexedTensor()) == [] and _container_inputs(PlainTupleIn()) == ["inputs"]


def test_a_data_free_compile_from_python_validates_on_more_than_its_example():
    """compile(model, example) without calib= validated on the example alone ("validation on 1 inputs ... PASS",
    often an all-zero input): now the example and 15 seeded N(0, 1) samples of its shape, as the CLI does; the
    example alone for integer inputs (noise is no token id)."""
    from qcompile.api import random_validation_inputs
    from tests.models import ResidualCNN, example_input

    model = ResidualCNN(seed=0).eval()
    example = torch.zeros((1,) + tuple(ResidualCNN.INPUT_SHAPE[1:]))
    result = qcompile.compile(model, example, scheme="uniform", bits=8, keep_first_last="fp32")
    assert result.report.passed and "validation on 16 inputs" in result.report.summary(), result.report.summary()
    grown = random_validation_inputs((example,))
    assert len(grown[0]) == 16 and torch.equal(grown[0][:1], example) and grown[0][1:].std() > 0.5
    ids = torch.zeros(1, 5, dtype=torch.long)
    assert random_validation_inputs((example, ids))[0] is example
    assert random_validation_inputs((example_input(model, batch=20),))[0].shape[0] == 20  # enough already

    class FloatIds(torch.nn.Module):  # column 0 a category stored as float, cast in forward: noise is no id
        def __init__(self):
            super().__init__()
            self.e, self.fc = torch.nn.Embedding(5, 8), torch.nn.Linear(11, 2)

        def forward(self, x):
            return self.fc(torch.cat([self.e(x[:, 0].long()), x[:, 1:]], 1))

    ids = FloatIds().eval()
    result = qcompile.compile(ids, torch.tensor([[3.0, 0.1, 0.2, 0.3]]), scheme="fp32")  # an IndexError before
    assert result.report.passed and "validation on 1 inputs" in result.report.summary()
