"""Frontend: load a PyTorch model from a file or a ``package.module:factory`` spec, and trace it with torch.fx.

Loading paths (``load_model``):

- ``weights.pt`` + ``arch="pkg.mod:factory"``: a ``state_dict`` loaded with ``torch.load(weights_only=True)``
  into the module the factory returns;
- ``model.pt`` saved with ``torch.save(model)``: a full pickle, which runs code from the file when loaded, so it
  is refused unless ``trust_pickle=True``;
- ``pkg.mod:factory`` alone: the factory's module with its fresh weights.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import io
import math
import operator
import os
import pickle
import sys
import traceback
import warnings
from typing import Iterable, Sequence

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import UserError
from .traceable import (TRACEABLE_FORWARDS, clear_mask_notes, copy_mask_notes, needs_rewrite, record_masks,
                        rewrite_attention, traceable_forward)


def _torchscript_weights(source: str, arch) -> dict:
    """The state dict of a TorchScript archive (torch.jit.save): torch.fx traces Python modules, not TorchScript,
    so the weights go into the architecture named by --arch."""
    if not arch:
        raise UserError(f"{source!r} is a TorchScript archive, which torch.fx cannot trace; pass --arch "
                        "package.module:factory (the Python model) and qcompile loads the archive's weights into it")
    try:
        return dict(torch.jit.load(source, map_location="cpu").state_dict())
    except Exception as exc:
        raise UserError(f"cannot read the TorchScript archive {source!r} ({_first_line(exc)}); "
                        "save the model's state_dict with torch.save instead") from None


def _is_spec(text: str) -> bool:
    mod, sep, attr = text.partition(":")
    return bool(sep) and bool(mod) and bool(attr) and not os.path.exists(text) and "/" not in mod


@contextlib.contextmanager
def _refuse_exit(what: str, when: str):
    """Run the user's module code (an import, a factory call) so that a ``sys.exit`` in it is one line: a training
    script that parses ``sys.argv`` at import read qcompile's own arguments, printed "usage: qcompile [-h]
    [--epochs EPOCHS] ... error: unrecognized arguments" and exited 2, as if qcompile's options were wrong. What
    it writes to stderr is held back, and shown where it does not exit."""
    held = io.StringIO()
    exited = None
    try:
        with contextlib.redirect_stderr(held):
            yield
    except SystemExit as exc:
        exited = exc
    finally:
        if exited is None and held.getvalue():
            sys.stderr.write(held.getvalue())
    if exited is not None:
        said = [line.strip() for line in held.getvalue().splitlines() if line.strip()]
        code = exited.code if exited.code is None or isinstance(exited.code, int) else repr(str(exited.code))
        detail = f"; it said {said[-1]!r}" if said else ""
        raise UserError(f"{what} exited (sys.exit({code}){detail}): it runs a script {when} (argparse, sys.exit); "
                        "put that code under `if __name__ == \"__main__\":`, or give a factory that only builds "
                        "the model") from None


def resolve_factory(spec: str):
    """Import ``package.module:factory`` and return the callable."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise UserError(f"invalid factory spec {spec!r}: use the form package.module:factory")
    if mod_name.startswith(".") or "/" in mod_name or "\\" in mod_name or mod_name.endswith(".py"):
        name = os.path.splitext(os.path.basename(mod_name.rstrip("/\\")))[0].lstrip(".") or "module"
        raise UserError(f"{spec!r} names a file, not a module: give the module name, e.g. {name}:{attr}, run from "
                        f"the folder that holds {name}.py (or with that folder on PYTHONPATH)")
    cwd = os.getcwd()
    if cwd not in sys.path:  # as `python` itself does, so a user's local module is importable
        sys.path.insert(0, cwd)
    try:
        with _refuse_exit(f"importing module {mod_name!r} from {spec!r}", "when imported"):
            module = importlib.import_module(mod_name)
    except UserError:
        raise
    except ImportError as exc:
        raise UserError(f"cannot import module {mod_name!r} from {spec!r} ({exc}); check the spelling or install it") from None
    except Exception as exc:  # the user's module fails on import: their code, not a qcompile bug
        raise UserError(f"importing module {mod_name!r} from {spec!r} failed: {type(exc).__name__}: "
                        f"{_first_line(exc)}; fix that module (python -c 'import {mod_name}' shows it)") from None
    obj = module
    if "(" in attr:  # mymodels:cnn(16, 10): "module has no attribute 'cnn(16, 10)'"
        raise UserError(f"{spec!r} passes arguments to the factory, which a spec cannot: define a function without "
                        f"arguments that returns the model (def my_model(): return {attr.strip()}) and give "
                        f"{mod_name}:my_model")
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"module {mod_name!r} has no attribute {attr!r}; check the factory name in {spec!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{spec!r} is not callable; it must name a function or class that returns an nn.Module")
    return obj


def check_materialized(model: nn.Module) -> None:
    """Lazy modules (``nn.LazyConv2d``, ``nn.LazyLinear``) that never ran hold no weights yet: the first use of
    one stopped the compile with torch's own ValueError and a traceback. Their weights would be a random draw, so
    this is no trained model: say so."""
    from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

    lazy = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
            if isinstance(t, (UninitializedParameter, UninitializedBuffer))]
    if lazy:
        owner = lazy[0].rsplit(".", 1)[0] if "." in lazy[0] else lazy[0]
        raise UserError(f"the model has lazy modules that have not run yet ({owner!r} holds no weights: "
                        f"{len(lazy)} uninitialized tensor(s)); load its trained weights (load_state_dict) or run "
                        "it once on an input (model(x)) before quantizing it")
    on_meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:  # built under torch.device("meta") / init_empty_weights: "the model does not run on inputs of
        # shape ... (Tensor on device meta is not on the expected device cpu!); fix --input-shape"
        raise UserError(f"the model's weights are on the 'meta' device, which holds shapes but no values "
                        f"({on_meta[0]!r} and {len(on_meta) - 1} more); load its trained weights first: "
                        "model.load_state_dict(state_dict, assign=True), or model.to_empty(device='cpu') and then "
                        "load_state_dict")


_CONVERTED_TO_FLOAT32 = "_qcompile_converted_to_float32"  # set by plain_copy on a copy it made float32
_FLOAT_CAST_METHODS = {"double", "half", "bfloat16"}


def _float32_casts(gm: torch.fx.GraphModule) -> None:
    """In a model that ``plain_copy`` made float32, the casts its forward makes to other float types
    (``x.double()``, ``x.half()``, ``x.to(torch.float64)``, ``x.type(torch.float16)``) cast to float32: its layers
    hold float32 weights now, and a float64 layer inside a float32 model stopped the compile with "mat1 and mat2
    must have the same dtype", blamed on the input shape."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_method":
            continue
        if node.target in _FLOAT_CAST_METHODS:
            node.target = "float"
            changed = True
        elif node.target in ("to", "type"):
            def f32(v):
                return torch.float32 if isinstance(v, torch.dtype) and v.is_floating_point and v != torch.float32 \
                    else v
            args, kwargs = tuple(f32(a) for a in node.args), {k: f32(v) for k, v in node.kwargs.items()}
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                changed = True
    if changed:
        gm.recompile()


def float_reference(model: nn.Module, example_inputs, leaf_modules=()) -> nn.Module:
    """The float32 model that validation compares with: its :func:`plain_copy`, or, where that copy no longer
    runs eagerly because its forward casts to the float type it was made from (a float64 layer inside a float32
    model), the traced copy, whose casts are float32 (:func:`_float32_casts`)."""
    copied = plain_copy(model).eval()
    if copied.__dict__.get(_CONVERTED_TO_FLOAT32) and _eager_failure(copied, example_inputs) is not None:
        return trace(copied, example_inputs, leaf_modules=leaf_modules, copy=False)
    return copied


def check_not_exported(model) -> None:
    """A ``torch.export`` program, or the GraphModule of one (``ep.module()``): its graph calls aten operators
    (``aten.conv2d.default``) where the passes look for Conv/Linear layers, so nothing was quantized (a float file,
    validation PASS)."""
    exported = type(model).__name__ == "ExportedProgram"
    if not exported and isinstance(model, torch.fx.GraphModule):
        exported = any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                       for n in model.graph.nodes)
    if exported:
        raise UserError("the model is a torch.export program (its graph calls aten operators, whose layers qcompile "
                        "does not see); pass the nn.Module it was exported from (or its weights with --arch)")


def _call_factory(spec) -> nn.Module:
    """The model that factory ``spec`` (``"package.module:factory"``, or from Python the callable itself: a
    function or a class) builds with no arguments."""
    factory = spec if callable(spec) else resolve_factory(spec)
    if callable(spec):
        spec = f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', type(spec).__name__)}"
    try:
        with _refuse_exit(f"factory {spec!r}", "when called"):
            model = factory()
    except UserError:
        raise
    except TypeError as exc:  # most likely required arguments
        raise UserError(f"factory {spec!r} raised TypeError: {exc}; it must build the model with no "
                        "arguments") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"factory {spec!r} failed building the model ({type(exc).__name__}: {first}); make it run "
                        "without arguments and without network access (load weights from a local file, or pass "
                        "the weights as MODEL.pt with --arch)") from None
    check_not_exported(model)
    if not isinstance(model, nn.Module):
        raise UserError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module; make it return "
                        "the model (an nn.Module instance)")
    return model


def _extract_state_dict(obj):
    """Accept a plain state dict, or the usual checkpoint wrappers {'state_dict': ...} / {'model': ...}."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    return None


def _damaged_zip_member(path: str) -> str | None:
    """The first member of a zip-format checkpoint (what ``torch.save`` writes) whose CRC-32 does not match its
    bytes, or None (no mismatch, or not a readable zip file: ``torch.load`` then says what it is). Reads the file
    once (~20 ms per 50 MB)."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:  # torch.serialization.set_crc32_options(False) stores no CRCs: nothing to check
                    continue
                try:
                    with archive.open(info) as member:  # zipfile compares the CRC at the member's end
                        while member.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    return info.filename
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError, NotImplementedError, EOFError):
        return None
    return None


def load_model(source: str, arch: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """Load the model named by ``source`` (a file path or a factory spec). Returns it in eval mode. ``arch``: the
    architecture of a state-dict file, as a ``package.module:factory`` spec or (from Python) the factory itself."""
    if isinstance(source, nn.Module):
        raise UserError("load_model takes a file path or a 'package.module:factory' spec, and this is a model "
                        "already: pass it to qcompile.compile as it is")
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(f"load_model takes a file path or a 'package.module:factory' spec, got "
                        f"{type(source).__name__}")
    source = os.fspath(source)
    if arch is not None and not isinstance(arch, str) and not callable(arch):
        raise UserError(f"arch takes a 'package.module:factory' spec or the factory itself (a function or class "
                        f"that builds the model with no arguments), got {type(arch).__name__}")
    if isinstance(arch, nn.Module):
        raise UserError("arch takes a 'package.module:factory' spec or the factory itself, and this is a model: "
                        "load the weights into it (model.load_state_dict(torch.load(path))) and pass the model")
    if not os.path.exists(source):
        if _is_spec(source):
            if arch:
                raise UserError(f"{source!r} is a factory spec, so --arch is not needed; pass a weights file to use --arch")
            # Seeded, so that the same spec gives the same weights in `qcompile` and `qcompile validate`.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return _call_factory(source).eval()
        mod, sep, attr = source.partition(":")
        if sep and attr and (mod.endswith(".py") or mod.startswith(".")):
            resolve_factory(source)  # one line: a file path where the module name goes
        raise UserError(f"model file {source!r} does not exist; give a .pt path or a package.module:factory spec")
    if os.path.isdir(source):
        raise UserError(f"{source!r} is a directory; give the .pt file inside it")

    not_checkpoint = f"{source!r} is not a PyTorch checkpoint ({{}}); save one with torch.save"
    damaged = _damaged_zip_member(source)
    if damaged is not None:  # torch.load does not check the CRCs: 100 flipped bytes in a weight compiled and PASSed
        raise UserError(f"{source!r} is damaged: its member {damaged!r} fails the archive's CRC check (a copy or "
                        "download cut or corrupted); save or copy the checkpoint again")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise before a one-line error
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(source, map_location="cpu", weights_only=True)
        safe_error = None
    except pickle.UnpicklingError as exc:
        # weights_only refuses a class it does not allow ("Unsupported global") for a full pickle; any other
        # unpickling failure (random bytes, a non-torch pickle) means the file is not a checkpoint at all.
        if "Unsupported global" not in str(exc):
            if _is_onnx_file(source):
                raise UserError(f"{source!r} is an ONNX file; qcompile quantizes the PyTorch model: pass its .pt "
                                "(weights with --arch, or a factory spec)") from None
            raise UserError(not_checkpoint.format("unreadable pickle data")) from None
        obj, safe_error = None, exc
    except PermissionError:  # not a damaged checkpoint: "save one with torch.save" was the wrong fix
        raise UserError(f"model file {source!r} cannot be read (permission denied); check its permissions "
                        "(chmod +r) or run as a user who can read it") from None
    except (RuntimeError, OSError) as exc:  # e.g. a damaged zip archive: torch's message says what is wrong
        if "TorchScript" in str(exc):
            obj, safe_error = _torchscript_weights(source, arch), None
        elif _is_torch_export_archive(source):
            how = (f"give the weights instead: torch.save(model.state_dict(), 'weights.pt'), then weights.pt with "
                   f"--arch {arch}" if arch else
                   "save the model's weights with torch.save(model.state_dict()) and pass them with --arch "
                   "package.module:factory")
            raise UserError(f"{source!r} is a torch.export archive (.pt2), whose graph of aten operators qcompile "
                            f"does not read; {how}") from None
        elif _is_onnx_file(source):
            raise UserError(f"{source!r} is an ONNX file; qcompile quantizes the PyTorch model: pass its .pt "
                            "(weights with --arch, or a factory spec)") from None
        else:
            raise UserError(not_checkpoint.format(_first_line(exc))) from None
    except Exception:  # text files raise KeyError from the pickle memo, empty ones EOFError, ...
        raise UserError(not_checkpoint.format("unreadable data")) from None

    if safe_error is not None:
        # weights_only refused a global: the file is a full pickle (torch.save(model)) or some other pickle.
        if not trust_pickle:
            raise UserError(
                f"{source!r} is a full pickle (torch.save(model)); loading it runs code from the file, so it is refused. "
                "Re-save with torch.save(model.state_dict()) and pass --arch (arch=... from Python), or pass "
                "--trust-pickle (trust_pickle=True) if you trust the file"
            )
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        try:
            obj = torch.load(source, map_location="cpu", weights_only=False)
        except Exception as exc:
            if "Can't get attribute" in str(exc) and "__main__" in str(exc):  # a class of the saving script
                raise UserError(f"cannot unpickle {source!r}: its model class was defined in the script that saved it "
                                f"(__main__), which no other program can import; save model.state_dict() and pass "
                                f"--arch script_module:Class (or move the class into a module and save again)") from None
            if type(exc).__name__ == "TraceError":  # torch.fx re-traces a pickled GraphModule's code on load
                raise UserError(f"cannot unpickle {source!r}: a GraphModule that qcompile compiled or "
                                "qcompile.qat.convert converted does not survive torch.save/torch.load (torch.fx "
                                "cannot re-trace its integer layers); save the qat.prepare'd model, or the float "
                                "model's state dict with --arch") from None
            raise UserError(f"cannot unpickle {source!r} ({type(exc).__name__}: {_first_line(exc)}); "
                            "make the module that defines the model importable from the current directory") from None
        if isinstance(obj, dict) and _extract_state_dict(obj) is None:  # {'model': <module>, 'epoch': 7}
            inner = [obj[k] for k in ("model", "ema", "module", "net") if isinstance(obj.get(k), nn.Module)]
            if inner:
                obj = inner[0]
        if isinstance(obj, nn.Module):
            if arch:
                raise UserError("--arch is for state-dict files; this file holds a whole model, drop --arch")
            return obj.eval()

    if isinstance(obj, nn.Module):  # possible with weights_only for some trusted types
        return obj.eval()
    state = _extract_state_dict(obj)
    if state is None and isinstance(obj, dict):
        nested = [k for k, v in obj.items() if isinstance(v, dict) and v and
                  all(isinstance(t, torch.Tensor) for t in v.values())]
        if len(nested) == 1:  # {'model_state': sd, 'epoch': ..}, {'net': sd}: the one dict of tensors in it
            state = obj[nested[0]]
        elif len(nested) > 1:  # {'net': sd, 'ema': sd_ema}: which one is the user's to say
            keys = ", ".join(map(repr, nested))
            raise UserError(f"{source!r} holds several state dicts (under {keys}); save the one to compile on its "
                            f"own: torch.save(torch.load({source!r})[{nested[0]!r}], 'weights.pt')")
        else:
            keys = ", ".join(map(repr, list(obj)[:6])) or "none"
            raise UserError(f"{source!r} holds a dict with keys {keys}, none of them a state dict (a dict of tensors "
                            "under 'state_dict', 'model_state_dict' or 'model'); save model.state_dict() with "
                            "torch.save" + (" (a frozen TorchScript archive keeps no weights: save the module's "
                                            "state_dict before torch.jit.freeze)" if not obj else ""))
    if state is None:
        raise UserError(f"{source!r} holds a {type(obj).__name__}, not a state dict or model; save model.state_dict() with torch.save")
    if not arch:
        raise UserError(f"{source!r} holds a state dict; name the architecture with --arch package.module:factory")
    complex_ = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_complex()]
    if complex_:  # load_state_dict kept the real parts (a UserWarning), and the compile passed on other weights
        raise UserError(f"the state dict in {source!r} holds complex tensors ({complex_[0]!r}"
                        f"{f' and {len(complex_) - 1} more' if len(complex_) > 1 else ''}), which qcompile does not "
                        "quantize: save the real-valued weights of the model the factory builds")
    meta = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_meta]
    if meta:  # saved from a model on the meta device: "does not fit --arch (Error(s) in loading state_dict for X:)"
        raise UserError(f"the state dict in {source!r} holds tensors on the 'meta' device, shapes without values "
                        f"({meta[0]!r} and {len(meta) - 1} more: saved from a model built on the meta device); save "
                        "the state dict of the model with its trained weights")
    model = _call_factory(arch)
    expected = model.state_dict()  # once: each call walks every module (it was called per key, 7 ms on digits)
    state = _strip_wrapper_prefix(_bake_pruning(state, expected, source), expected)
    # a TorchScript archive's state_dict also holds the non-persistent buffers (an input normalisation's mean/std
    # registered with persistent=False), which the factory's model_state_dict leaves out: load them as buffers
    transient = {k: v for k, v in state.items() if k not in expected and _is_buffer(model, k)}
    if transient:
        state = {k: v for k, v in state.items() if k not in transient}
        with torch.no_grad():
            for k, v in transient.items():
                owner, _, leaf = k.rpartition(".")
                buf = model.get_submodule(owner).get_buffer(leaf)
                if buf.shape == v.shape:
                    buf.copy_(v)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        missing, unexpected, shapes = _key_mismatch(expected, state)
        detail = "; ".join(x for x in (
            f"missing {missing}" if missing else "",
            f"unexpected {unexpected}" if unexpected else "",
            f"other shapes: {shapes} (file vs --arch)" if shapes else "",
        ) if x) or _informative_line(exc)
        raise UserError(f"state dict in {source!r} does not fit --arch {arch} ({detail}); pass the factory that built it") from None
    return model.eval()


def _is_buffer(model: nn.Module, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    try:
        return leaf in dict(model.get_submodule(owner).named_buffers(recurse=False))
    except AttributeError:
        return False


def _is_torch_export_archive(path: str) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("archive_format") or "/models/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _is_onnx_file(path: str) -> bool:
    try:
        import onnx

        model = onnx.load(path, load_external_data=False)
        return bool(model.graph.node)
    except Exception:
        return False


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DataParallel/DDP, torch.compile, Lightning-style wrappers


def _bake_pruning(state: dict, expected: dict, source: str) -> dict:
    """The state dict of a model saved with ``torch.nn.utils.prune``'s masks still on (``conv.weight_orig`` and
    ``conv.weight_mask`` where the model has ``conv.weight``) with each pruned tensor baked, ``orig * mask``, as
    ``prune.remove`` would (the whole model, pruned in memory, is accepted the same way). Keys the model itself
    has (a parameter named ``pos_orig``) are left alone; a wrapper's prefix (``module.``) is looked through."""
    names = set(expected)
    prefixes = [""] + list(_WRAPPER_PREFIXES)

    def model_key(key: str) -> str | None:
        return next((key[len(p):] for p in prefixes if key.startswith(p) and key[len(p):] in names), None)

    pruned = [k[:-len("_orig")] for k in state if k.endswith("_orig") and k[:-len("_orig")] + "_mask" in state
              and k[:-len("_orig")] not in state and model_key(k) is None
              and model_key(k[:-len("_orig")]) is not None]
    if not pruned:
        return state
    baked = {k: v for k, v in state.items() if not any(k in (p + "_orig", p + "_mask") for p in pruned)}
    for p in pruned:
        orig, mask = state[p + "_orig"], state[p + "_mask"]
        if not isinstance(orig, torch.Tensor) or not isinstance(mask, torch.Tensor) or orig.shape != mask.shape:
            shapes = tuple(getattr(orig, "shape", ())), tuple(getattr(mask, "shape", ()))
            raise UserError(f"{source!r} holds a pruned {p!r} whose mask {p}_mask has shape {shapes[1]} but its "
                            f"weights {p}_orig have shape {shapes[0]}; save the model after prune.remove")
        baked[p] = orig * mask
    return baked


def _strip_wrapper_prefix(state: dict, expected: dict) -> dict:
    """The state dict with a wrapper's key prefix removed where every key carries it and the stripped keys are the
    model's (``nn.DataParallel``/DDP save ``module.conv.weight``, a ``torch.compile``d model ``_orig_mod.``,
    ``AveragedModel`` ``module.`` beside its ``n_averaged``)."""
    stripped = state
    if "n_averaged" in stripped and "n_averaged" not in expected:  # AveragedModel (SWA/EMA): its counter + module.*
        stripped = {k: v for k, v in stripped.items() if k != "n_averaged"}
    for _ in range(3):  # nested wrappers, e.g. module._orig_mod.
        if set(stripped) <= set(expected):
            break
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in stripped)), None)
        if prefix is None:
            break
        stripped = {k[len(prefix):]: v for k, v in stripped.items()}
    return stripped if set(stripped) <= set(expected) else state


def _key_mismatch(expected: dict, got: dict, limit: int = 3):
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shape = [k for k in expected if k in got and tuple(expected[k].shape) != tuple(got[k].shape)]

    def fmt(keys):
        return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")

    m = fmt(missing) if missing else ""
    u = fmt(unexpected) if unexpected else ""
    if shape and not missing and not unexpected:
        return "", "", fmt([f"{k} {tuple(got[k].shape)} vs {tuple(expected[k].shape)}" for k in shape])
    return m, u, ""


def _packs_sequences(exc: BaseException) -> bool:
    """The traceback passed through ``torch.nn.utils.rnn``'s packing (``pack_padded_sequence``, ``pack_sequence``)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("pack_padded_sequence", "pack_sequence", "pad_packed_sequence"):
            return True
        tb = tb.tb_next
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _informative_line(exc: BaseException) -> str:
    """The first line of the message that says more than a heading ("Error(s) in loading state_dict for X:" is
    followed by the reasons, one per line)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for line in lines:
        if not line.endswith(":"):
            return line
    return lines[0] if lines else type(exc).__name__


INT64_MAX = 2**63 - 1
MAX_TENSOR_VALUES = INT64_MAX // 4  # float32 values whose byte count fits int64 (torch's storage size)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``1,3,224,224`` (also ``1x3x224x224``) into a shape tuple of positive ints."""
    # every field a number: an empty one ("1,,8,8", a dimension left out) was dropped, and the model then failed on
    # a 3-D input of the wrong sizes
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        dynamic = " (the file takes any batch size whatever the first number: give 1 there, not -1)" \
            if any(d < 0 for d in shape) else ""
        raise UserError(f"invalid --input-shape {text!r}: give positive integers separated by commas, e.g. "
                        f"1,3,224,224{dynamic}")
    # a dimension past int64 failed in torch.randn as an internal error ("Overflow when unpacking long long"), and
    # one whose float32 tensor has more bytes than int64 counts with "Storage size calculation overflowed"
    big = next((d for d in shape if d > INT64_MAX), None)
    if big is not None:
        raise UserError(f"invalid --input-shape {text!r}: dimension {big} is too large (past 2**63 - 1, the largest "
                        "tensor dimension); give the model's input size, e.g. 1,3,224,224")
    if math.prod(shape) > MAX_TENSOR_VALUES:
        raise UserError(f"invalid --input-shape {text!r}: its {math.prod(shape)} values are more than a tensor can "
                        "hold; give the model's input size, e.g. 1,3,224,224")
    return shape


def _wrapped(model: nn.Module) -> nn.Module | None:
    """The module a wrapper holds: ``torch.compile`` (``OptimizedModule._orig_mod``), ``nn.DataParallel``/DDP and
    ``torch.optim.swa_utils.AveragedModel`` (the SWA/EMA average, ``.module``); None for any other module."""
    from torch.optim.swa_utils import AveragedModel

    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        return inner
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel, AveragedModel)):
        return model.module
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``, ``nn.DataParallel``/DDP and ``AveragedModel`` wrappers, which torch.fx
    cannot trace (:func:`_wrapped`); any other module as it is. Wrappers inside the model are replaced in the copy
    the passes work on (:func:`plain_copy`)."""
    for _ in range(4):  # nested, e.g. DataParallel(torch.compile(model))
        inner = _wrapped(model)
        if inner is None:
            break
        model = inner
    return model


def _unwrap_children(model: nn.Module) -> None:
    """Replace, in place, every wrapper inside ``model`` by the module it holds: ``model.features =
    nn.DataParallel(model.features)`` (the ImageNet example's idiom) is a torch.nn module, a leaf to torch.fx, and
    its layers stayed float without a word."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            inner = unwrap(child)
            if inner is not child:
                setattr(parent, name, inner)


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose weights are plain parameters: ``torch.nn.utils.parametrizations``
    (``weight_norm``, ``spectral_norm``, ...), the older ``weight_norm``/``spectral_norm`` hooks and
    ``torch.nn.utils.prune``'s masks (before ``prune.remove``) are baked into the
    weight they compute now (eval mode: spectral norm's stored vectors, no power iteration), as for inference, and
    a half/bfloat16/float64 model becomes float32 (the precision the quantizers and the ONNX file start from), and
    wrappers inside it (``nn.DataParallel``, ``torch.compile``) give way to the module they hold. The
    model itself is left as it is. (A parametrized layer has no ``weight`` parameter to quantize, and the old hooks'
    computed weight cannot even be deep-copied.)"""
    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    def hook_name(h) -> str | None:  # the tensor a weight hook computes before each forward
        if isinstance(h, (WeightNorm, SpectralNorm)):
            return h.name
        if isinstance(h, prune.BasePruningMethod):  # weight = weight_orig * weight_mask
            return h._tensor_name
        return None

    hooked = [(m, hook_name(h)) for m in model.modules() for h in m._forward_pre_hooks.values()
              if hook_name(h) and isinstance(getattr(m, hook_name(h), None), torch.Tensor)]
    saved = [(m, name, getattr(m, name)) for m, name in hooked]
    try:
        for m, name, value in saved:  # the computed weight is a non-leaf tensor: copy a detached stand-in
            setattr(m, name, value.detach())
        copied = copy.deepcopy(model)
    finally:
        for m, name, value in saved:
            setattr(m, name, value)
    _unwrap_children(copied)
    tensors = list(copied.parameters()) + list(copied.buffers())
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        copied.float()  # a half/bfloat16/float64 model: quantized from (and validated against) its float32 values
        # its forward's own casts to those types (a float64 layer inside a float32 model: x.double() before it,
        # .float() after) now meet float32 weights: trace() makes them float32 casts (_float32_casts)
        copied.__dict__[_CONVERTED_TO_FLOAT32] = True
    was_training = copied.training
    copied.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old hooks' removal functions are deprecated, not gone
        for m in list(copied.modules()):
            for h in list(m._forward_pre_hooks.values()):
                if isinstance(h, WeightNorm):
                    torch.nn.utils.remove_weight_norm(m, h.name)  # weight = g * v / |v| as a parameter
                elif isinstance(h, SpectralNorm):
                    torch.nn.utils.remove_spectral_norm(m, h.name)  # weight / sigma from the stored u, v
                elif isinstance(h, prune.BasePruningMethod):
                    prune.remove(m, h._tensor_name)  # weight_orig * weight_mask as the weight parameter
            if parametrize.is_parametrized(m):
                # the copy shares its parametrized class (and the class's properties) with the original: removing
                # a parametrization deletes the property from the class, so give the copy a class of its own
                cls = type(m)
                m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
                for name in list(m.parametrizations.keys()):
                    parametrize.remove_parametrizations(m, name, leave_parametrized=True)
                    value = getattr(m, name)
                    if not isinstance(value, nn.Parameter):  # weight_norm's two originals leave a plain tensor
                        delattr(m, name)
                        m.register_parameter(name, nn.Parameter(value.detach().clone()))
    copied.train(was_training)
    return copied


_INSTANCE_TO_BATCH = {nn.InstanceNorm1d: nn.BatchNorm1d, nn.InstanceNorm2d: nn.BatchNorm2d,
                      nn.InstanceNorm3d: nn.BatchNorm3d}


def running_stats_as_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` (an eval-mode copy) with every InstanceNorm that tracks running statistics as the BatchNorm it
    computes in eval mode (the same running mean/var, eps and affine parameters): torch.onnx cannot export such an
    InstanceNorm for a variable batch size, and as a BatchNorm it folds into the layer before it. Unbatched inputs
    are not supported by the swap and are left to fail as before."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            bn_type = _INSTANCE_TO_BATCH.get(type(child))
            if bn_type is None or not child.track_running_stats or child.running_mean is None:
                continue
            bn = bn_type(child.num_features, eps=child.eps, affine=child.affine, track_running_stats=True)
            with torch.no_grad():
                bn.running_mean.copy_(child.running_mean)
                bn.running_var.copy_(child.running_var)
                if child.affine:
                    bn.weight.copy_(child.weight)
                    bn.bias.copy_(child.bias)
            setattr(parent, name, bn.eval())
    return model


_LAYER_BASES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
                nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def inherits_layer_forward(m: nn.Module) -> bool:
    """A subclass of a torch.nn conv/linear/BatchNorm defined elsewhere (torchvision's ``Conv3DSimple``, a library's
    ``MyConv2d(nn.Conv2d)``) that computes exactly what its base does: it overrides neither ``forward`` nor
    ``_conv_forward``. torch.fx would trace into it (only torch.nn's own modules are leaves) and leave a bare
    ``F.conv3d`` that no pass quantizes or folds; kept whole, it is the layer it is."""
    for base in _LAYER_BASES:
        if isinstance(m, base) and type(m) is not base:
            return all(getattr(type(m), attr, None) is getattr(base, attr, None) for attr in ("forward", "_conv_forward"))
    return False


def setitem_(x, index, value):
    """``x[index] = value`` on a traced tensor, in place (returns ``x``), as torch.fx records it here (torch.fx itself
    cannot: "'Proxy' object does not support item assignment", Longformer's ``global_attention_mask[:, 0] = 1``).
    :func:`functionalize_inplace` makes it :func:`setitem`, read by every later use of ``x``."""
    x[index] = value
    return x


def setitem(x, index, value):
    """``x`` with ``x[index] = value``, a new tensor (the out-of-place form of :func:`setitem_`)."""
    out = x.clone()
    out[index] = value
    return out


class _Proxy(torch.fx.Proxy):
    """A traced value that records item assignment (``x[:, 0] = 1``) as :func:`setitem_`."""

    def __setitem__(self, index, value):
        self.tracer.create_proxy("call_function", setitem_, (self, index, value), {})


class _Tracer(torch.fx.Tracer):
    """A tracer that keeps chosen modules opaque and remembers which module it was in when tracing failed."""

    def __init__(self, leaf_modules: Sequence[str] = (), transformers: bool = False):
        super().__init__()
        self.leaf_names = set(leaf_modules)
        self.transformers = transformers  # trace into torch.nn's transformer containers (qcompile.traceable)
        self._qc_stack: list[str] = []  # modules being traced, innermost last

    def proxy(self, node):
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        if self.transformers and traceable_forward(m) is not None:
            return False
        if inherits_layer_forward(m):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            qualname = self.path_of_module(m)
        except NameError:
            # a module made in forward, not a submodule (DistilBERT's classifier: nn.ReLU()(x)): without parameters
            # or buffers it is the function it computes, traced through; else torch.fx's error stands
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
                raise
            return forward(*args, **kwargs)
        self._qc_stack.append(qualname)
        cls = traceable_forward(m) if self.transformers else None
        if cls is not None and TRACEABLE_FORWARDS[cls] is not None and not self.is_leaf_module(m, qualname):
            forward = functools.partial(TRACEABLE_FORWARDS[cls], m)
        out = super().call_module(m, forward, args, kwargs)
        self._qc_stack.pop()
        return out


class _SizedProxy(_Proxy):
    """A traced value that answers questions about its metadata as the model's eager run does: ``x.shape``,
    ``x.size(i)``, ``x.dim()``, ``x.dtype``, ``x.device``, ``len(x)`` give Python values, except for the sizes that
    follow the batch (those that differ between the runs on batches of 2 and 3), which stay traced. Used where the
    plain trace fails on Python code over sizes: ``(*x.shape[:-1], -1, d)``, ``buffer[:, :x.size(1)]``,
    ``if x.shape[1] != self.channels: raise``, ``if x.dtype != w.dtype`` (HuggingFace models, almost all of them)."""

    def _values(self):
        vals = self.tracer._qc_values.get(self.node)
        return vals if vals is not None and all(isinstance(v, torch.Tensor) for v in vals) else None

    def _size(self, dim: int, vals):
        a, b = vals
        if a.shape[dim] == b.shape[dim] and self.node not in self.tracer._qc_data_sized:
            return int(a.shape[dim])
        return torch.fx.Proxy.__getattr__(self, "size")(dim)

    def __getattr__(self, k):
        vals = self._values() if k in _SIZED_ATTRIBUTES else None
        if vals is None:
            return super().__getattr__(k)
        a = vals[0]
        if k in ("dtype", "device", "ndim", "layout", "is_cuda", "is_sparse", "is_quantized"):
            return getattr(a, k)
        if k == "shape":
            return _SizedShape._of(self, vals)

        def method(*args, **kwargs):
            if k == "size":
                dim = args[0] if args else kwargs.get("dim")
                if dim is None:
                    return _SizedShape._of(self, vals)
                return self._size(dim % max(a.dim(), 1), vals)
            return getattr(a, k)(*args, **kwargs)  # dim(), is_floating_point(), is_complex(), is_contiguous()
        return method

    @classmethod
    def __torch_function__(cls, orig_method, types, args=(), kwargs=None):
        # a shape of ints and traced sizes handed to a torch function (torch.zeros(x.size()), DeBERTa's token types):
        # torch.fx looks for traced values in plain tuples only
        return super().__torch_function__(orig_method, types, _plain_shapes(args or ()), _plain_shapes(kwargs or {}))

    def __len__(self):
        raw = self.tracer._qc_values.get(self.node)
        if raw is not None and self.node not in self.tracer._qc_data_sized and \
                all(isinstance(v, (tuple, list)) for v in raw) and len(raw[0]) == len(raw[1]):
            return len(raw[0])  # the chunks of x.chunk(2, 1), the parts of torch.split(x, 8, 1): a fixed count
        vals = self._values()
        if vals is None or vals[0].dim() == 0 or vals[0].shape[0] != vals[1].shape[0] or \
                self.node in self.tracer._qc_data_sized:
            return super().__len__()
        return int(vals[0].shape[0])


def _plain_shapes(a):
    """``a`` with every :class:`_SizedShape` in it (in tuples, lists and dicts) as a plain tuple."""
    if isinstance(a, _SizedShape):
        return tuple(_plain_shapes(x) for x in a)
    if type(a) in (tuple, list):
        return type(a)(_plain_shapes(x) for x in a)
    if type(a) is dict:
        return {k: _plain_shapes(v) for k, v in a.items()}
    return a


class _SizedShape(tuple):
    """``x.shape`` of a :class:`_SizedProxy`: the sizes, Python ints or traced, with ``torch.Size``'s ``numel()``.
    Two such shapes compare as the shapes of their values at batches 2 and 3 do, where those agree (``assert
    q.size() == k.size()``, Longformer): equal sizes are equal at any batch."""

    eager: tuple = ()  # the value's shapes at batches 2 and 3

    @classmethod
    def _of(cls, proxy, vals):
        shape = cls(proxy._size(i, vals) for i in range(vals[0].dim()))
        if proxy.node not in proxy.tracer._qc_data_sized:  # h[:4]: equal at batches 2 and 3, not at 32
            shape.eager = tuple(tuple(v.shape) for v in vals)
        return shape

    def __eq__(self, other):
        if isinstance(other, _SizedShape) and self.eager and other.eager:
            same = [a == b for a, b in zip(self.eager, other.eager)]
            if all(same) or not any(same):
                return all(same)
        return tuple.__eq__(self, other)

    def __ne__(self, other):
        eq = self.__eq__(other)
        return not eq if isinstance(eq, bool) else NotImplemented

    __hash__ = tuple.__hash__

    def __getitem__(self, index):
        item = tuple.__getitem__(self, index)
        if isinstance(index, slice):
            part = _SizedShape(item)
            part.eager = tuple(e[index] for e in self.eager)
            return part
        return item

    def numel(self):
        return functools.reduce(operator.mul, self, 1)


# operations whose output size depends on the values of their input, not only on its size: sizes that follow from
# them stay traced (the example repeated to a batch cannot show how they vary)
_DATA_SIZED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount",
               "repeat_interleave", "nonzero_static", "tolist", "item"}


# operations that take sizes, bounds or counts (a 0-dim tensor given as one makes the output's size data's)
_SIZE_TAKING = {"getitem", "narrow", "narrow_copy", "select", "arange", "linspace", "eye", "expand", "repeat", "tile",
                "view", "reshape", "unflatten", "zeros", "ones", "empty", "full", "rand", "randn", "randint",
                "new_zeros", "new_ones", "new_empty", "new_full", "split", "tensor_split", "chunk", "pad",
                "interpolate", "topk", "roll"}


def _data_sized_op(tracer, kind, target, args, kwargs) -> bool:
    """Whether the output sizes of this operation may vary in ways that the example repeated to batches of 2 and 3
    does not show: they then stay traced. Conservatively:

    - an operation whose output size follows its input's values (``_DATA_SIZED``, ``torch.where(c)``, ``x[mask]``);
    - one given a traced scalar computed from data (a 0-dim tensor or ``.item()``: ``x[:, :mask.sum(1).max()]``,
      ``torch.narrow(h, 1, 0, L)``, ``torch.arange(L)``);
    - a slice with bounds or a step over a dimension that follows the batch (``x[::4]``: one row up to batch 4);
    - a module kept whole that is not one of torch.nn's own (its output sizes are its code's business)."""
    name = target if kind == "call_method" else getattr(target, "__name__", "")
    if name == "repeat_interleave":  # by a number of repeats (rotary embeddings: GPT-J, CodeGen): sized by its input
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return not isinstance(repeats, int) or isinstance(repeats, bool)
    if name in _DATA_SIZED or (name == "where" and len(args) == 1):
        return True
    if kind == "call_module":
        return not type(tracer.root.get_submodule(target)).__module__.startswith("torch.nn.")
    if name in _SIZE_TAKING:
        traced = []
        torch.fx.node.map_aggregate((args, kwargs), lambda a: traced.append(a) if isinstance(a, torch.fx.Proxy) else a)
        for a in traced:
            vals = tracer._qc_values.get(a.node)
            if vals is not None and isinstance(vals[0], torch.Tensor) and vals[0].dim() == 0:
                return True  # a size or bound computed from data: x[:, :mask.sum(1).max()], torch.arange(L)
    if kind == "call_function" and target is operator.getitem and len(args) > 1 and isinstance(args[0], torch.fx.Proxy):
        base = tracer._qc_values.get(args[0].node)
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        values = torch.fx.node.map_aggregate(
            index, lambda a: tracer._qc_values.get(a.node, (None,))[0] if isinstance(a, torch.fx.Proxy) else a)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in values):
            return True  # x[mask]
        if base is not None and isinstance(base[0], torch.Tensor):
            a, b = base
            dim = 0
            for i, item in enumerate(index):
                if item is Ellipsis:
                    dim = a.dim() - sum(1 for j in index[i + 1:] if j is not None)
                    continue
                if item is None:
                    continue
                if isinstance(item, slice) and dim < a.dim() and a.shape[dim] != b.shape[dim] and \
                        (item.start is not None or item.stop is not None or item.step not in (None, 1)):
                    return True  # x[::4], x[:2] along the batch
                dim += 1
    return False


_SIZED_ATTRIBUTES = {"shape", "size", "dim", "ndim", "dtype", "device", "layout", "is_cuda", "is_sparse",
                     "is_quantized", "is_floating_point", "is_complex", "is_contiguous"}


class _NotEager(Exception):
    pass


_VARARG_FACTORIES = ("ones", "zeros", "empty", "rand", "randn")  # torch.ones(*size): sizes as separate arguments


class _SizedTracer(_Tracer):
    """The tracer, with every traced value also computed on the example inputs repeated to batches of 2 and 3
    (``_qc_values``), so that :class:`_SizedProxy` can answer metadata questions. Its graph is specialised to the
    example's non-batch sizes, as the emitted file is."""

    def __init__(self, example_inputs, leaf_modules: Sequence[str] = (), transformers: bool = False,
                 dynamic_axes: Sequence[int] = ()):
        super().__init__(leaf_modules, transformers=transformers)
        # buffers traced too (BERT's position_ids[:, :L].expand(B, L): a real tensor given a traced size failed)
        self.proxy_buffer_attributes = True
        self._qc_inputs = [tuple(torch.cat([t] * n) if isinstance(t, torch.Tensor) and t.dim() > 0 else t
                                 for t in example_inputs) for n in (2, 3)]
        # --dynamic-axes: the second run has those axes twice as long too, so that sizes along them stay traced as the
        # batch's do, and only the sizes that hold at every size (channels, a chunk count) are answered
        self._qc_inputs[1] = tuple(_doubled(t, dynamic_axes) for t in self._qc_inputs[1])
        self._qc_values: dict = {}
        self._qc_data_sized: set = set()  # nodes whose sizes depend on data (_DATA_SIZED, and what follows them)
        self._qc_placeholders = 0

    _qc_evaluating = False  # computing a value: module calls and attribute reads run eagerly, nothing is recorded

    def trace(self, root, concrete_args=None):
        # torch.arange of Python numbers, traced: positions made in forward and then expanded to the traced batch
        # (BART's positional embedding: torch.arange(L, device=w.device).expand(B, -1)) were a real tensor, whose
        # expand() cannot take a traced size
        arange, tracer = torch.arange, self

        def traced_arange(*args, **kwargs):
            if tracer._qc_evaluating:
                return arange(*args, **kwargs)
            return tracer.create_proxy("call_function", arange, args, kwargs)

        def sized_factory(fn):
            # torch.ones(B, L) with B a traced size: torch's argument parser refuses a traced value among the
            # varargs sizes ("ones() takes 1 positional argument but 2 were given"; BART's decoder mask); as one
            # tuple it is traced
            def factory(*size, **kwargs):
                if not tracer._qc_evaluating and len(size) > 1 and \
                        any(isinstance(v, torch.fx.Proxy) for v in size):
                    return tracer.create_proxy("call_function", fn, (tuple(size),), kwargs)
                return fn(*size, **kwargs)
            return factory

        factories = {name: getattr(torch, name) for name in _VARARG_FACTORIES}
        torch.arange = traced_arange
        for name, fn in factories.items():
            setattr(torch, name, sized_factory(fn))
        try:
            return super().trace(root, concrete_args)
        finally:
            torch.arange = arange
            for name, fn in factories.items():
                setattr(torch, name, fn)

    def proxy(self, node):
        return _SizedProxy(node, self)

    def call_module(self, m, forward, args, kwargs):
        if self._qc_evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._qc_evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if self._qc_evaluating:
            raise _NotEager(f"{kind} {target}")  # a value computed with a traced one: unknown
        args, kwargs = _plain_shapes(args), _plain_shapes(kwargs)  # x.new_zeros(x.shape): a plain tuple in the graph
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        inputs = []
        torch.fx.node.map_aggregate((args, kwargs), lambda a: inputs.append(a) if isinstance(a, torch.fx.Proxy) else a)
        if any(a.node in self._qc_data_sized for a in inputs):
            self._qc_data_sized.add(proxy.node)
        self._qc_evaluating = True
        try:
            self._qc_values[proxy.node] = tuple(self._evaluate(kind, target, args, kwargs, run) for run in (0, 1))
        except Exception:  # noqa: BLE001 -- unknown: its metadata stays traced, as in the plain trace
            pass
        finally:
            self._qc_evaluating = False
        try:
            if kind not in ("placeholder", "get_attr") and _data_sized_op(self, kind, target, args, kwargs):
                self._qc_data_sized.add(proxy.node)
        except Exception:  # noqa: BLE001 -- unknown: its sizes stay traced
            self._qc_data_sized.add(proxy.node)
        return proxy

    def to_bool(self, obj):
        # two traced sizes compared for (in)equality (``if y.shape != (b, c, h, w)`` with ``b`` the traced batch
        # size: RAFT's correlation block) give a Python bool in both runs; where the two agree it is that bool (the
        # graph is checked at batches 1 and 3 and on calibration samples afterwards, as for sizes). A size against
        # a number (``if b > 1``, ``b == 16``) stays a control-flow error.
        node, vals = obj.node, self._qc_values.get(obj.node)
        if node.op == "call_function" and node.target in (operator.eq, operator.ne) and \
                all(isinstance(a, torch.fx.Node) for a in node.args) and vals is not None and \
                node not in self._qc_data_sized and all(type(v) is bool for v in vals) and vals[0] == vals[1]:
            return vals[0]
        return super().to_bool(obj)

    def iter(self, obj):
        # a traced value iterated other than by unpacking a fixed count: ``list(x.chunk(2, 1))`` (YOLOv8's C2f),
        # ``for t in torch.split(x, 8, 1)``, ``zip(mods, x.unbind(1))``. Where the runs on batches of 2 and 3 give
        # sequences of one length (a tuple of chunks, or a tensor whose dimension 0 is not the batch), that many
        # items, each traced as ``obj[i]``; a count that follows the batch or the data stays a trace error
        vals = self._qc_values.get(obj.node)
        if vals is not None and obj.node not in self._qc_data_sized:
            a, b = vals
            if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
                return iter([obj[i] for i in range(len(a))])
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() > 0 and b.dim() > 0 and \
                    a.shape[0] == b.shape[0]:
                return iter([obj[i] for i in range(int(a.shape[0]))])
        return super().iter(obj)

    def _evaluate(self, kind, target, args, kwargs, run: int):
        if kind == "placeholder":
            index = self._qc_placeholders if run == 0 else self._qc_placeholders - 1
            if run == 0:
                self._qc_placeholders += 1
            if index < len(self._qc_inputs[run]):
                return self._qc_inputs[run][index]
            if args:
                return args[0]
            raise LookupError(target)

        def value(a):
            if isinstance(a, torch.fx.Proxy):
                vals = self._qc_values.get(a.node)
                if vals is None:
                    raise LookupError(a.node.name)
                return vals[run]
            return a

        args = torch.fx.node.map_aggregate(args, value)
        kwargs = torch.fx.node.map_aggregate(kwargs, value)
        with torch.no_grad():
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                return self.root.get_submodule(target)(*args, **kwargs)
            if kind == "get_attr":
                obj = self.root
                for part in str(target).split("."):
                    obj = getattr(obj, part)
                return obj
        raise LookupError(kind)


SIZED_TRACE = "qcompile.sized_trace"  # gm.meta: traced with the example's sizes answering Python's size reads
SIZED_AXES = "qcompile.sized_axes"  # gm.meta: ... but for the sizes of these input axes, traced as the batch's


def _doubled(t, axes: Sequence[int]):
    """``t`` twice as long on each of ``axes`` that it has (the batch's, 0, aside): itself repeated along them."""
    if not isinstance(t, torch.Tensor):
        return t
    for a in axes:
        if 0 < a < t.dim():
            t = torch.cat([t, t], dim=a)
    return t


SIZED_SITE = "qcompile.sized_site"  # gm.meta: the module whose code the plain trace stopped in ("mha (MultiheadAttention)")


def _failure_site(exc: BaseException, model: nn.Module) -> str:
    """The innermost module of ``model`` whose code ``exc`` passed through: ``"name (Type)"``, or "" where none."""
    names = {id(m): name for name, m in model.named_modules()}
    site = ""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        obj = tb.tb_frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None  # self, or s
        if isinstance(obj, nn.Module) and id(obj) in names:
            site = f"{names[id(obj)] or 'the model'} ({type(obj).__name__})"
        tb = tb.tb_next
    return site


def _trace_sized(model: nn.Module, example_inputs, leaf_modules: list, check_inputs=None,
                 failure: list | None = None, dynamic_axes: Sequence[int] = ()) -> torch.fx.GraphModule | None:
    """The graph module :class:`_SizedTracer` makes (through the transformer stand-ins where the model has them),
    where it computes the model as the model does on the example at batches 1 and 3 and on ``check_inputs`` (a
    batch of distinct samples, from the calibration data: a size the repeated example cannot show, such as
    ``x[::4]``'s or one that depends on which samples differ); else None, and the plain trace's error stands
    (``failure`` gets the sized trace's own exception, where it raised one).
    The model's buffers are as before afterwards; a forward that updates them (a running average) computes other
    outputs on its second run and is refused, as the plain trace refuses it.

    ``dynamic_axes`` (--dynamic-axes): the sizes along those input axes stay traced too (:class:`_SizedTracer`), the
    graph is checked at twice the example's size there as well, and ``gm.meta[SIZED_AXES]`` records them (YOLOv8's
    C2f, ``list(x.chunk(2, 1))``, traces with its spatial sizes free). Not through the transformer stand-ins."""
    from torch.utils._pytree import tree_leaves

    axes = tuple(a for a in dynamic_axes if a > 0)
    if axes and needs_rewrite(model):
        return None

    modes = [(m, m.training) for m in model.modules()]
    state = [(b, b.detach().clone()) for b in model.buffers()]

    def restore():
        with torch.no_grad():
            for b, saved in state:
                b.copy_(saved)

    try:
        model.eval()
        with contextlib.redirect_stderr(io.StringIO()):
            gm = _trace_transformers(model, example_inputs, leaf_modules, sized=True) if needs_rewrite(model) else None
            restore()
            if gm is None:
                tracer = _SizedTracer(example_inputs, leaf_modules, dynamic_axes=axes)
                # a cache that forward fills (timm's attention-bias cache) holds a Proxy after the trace: the
                # model's eager runs below that check the graph returned it, and the retrace was given up
                with _attributes_kept(model):
                    graph = tracer.trace(model, concrete_args=_defaults_beyond(model, len(example_inputs)))
                _drop_default_placeholders(graph, len(example_inputs))
                gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
                restore()
            batches = [tuple(torch.cat([t] * n) if isinstance(t, torch.Tensor) and t.dim() > 0 else t
                             for t in example_inputs) for n in (1, 3)]
            if check_inputs is not None:
                batches.append(tuple(check_inputs))
            if axes:
                batches.append(tuple(_doubled(t, axes) for t in example_inputs))
            for batch in batches:
                with torch.no_grad():  # the model, then the graph, on the same state (not restored between)
                    want = [t for t in tree_leaves(_seeded(lambda: model(*[_clone(t) for t in batch])))
                            if isinstance(t, torch.Tensor)]
                    got = [t for t in tree_leaves(_seeded(lambda: gm(*[_clone(t) for t in batch])))
                           if isinstance(t, torch.Tensor)]
                if len(want) != len(got) or any(
                        w.shape != g.shape or w.dtype != g.dtype or not torch.allclose(
                            g.double(), w.double(), rtol=1e-4, atol=1e-5 * float(w.abs().max().clamp_min(1e-6))
                            if w.numel() else 0.0)
                        for w, g in zip(want, got)):
                    return None
    except Exception as exc:  # noqa: BLE001 -- the plain trace's error says what to do
        if failure is not None:
            failure.append(exc)
        return None
    finally:
        restore()
        for m, training in modes:
            m.training = training
    gm.meta[SIZED_TRACE] = True  # sizes read in Python are the example's: no file of it takes other sizes
    if axes:
        gm.meta[SIZED_AXES] = axes  # ... but on these axes, where they were traced
    return gm


def _container_inputs(model) -> list[str]:
    """The inputs of ``model.forward`` annotated as a dict, tuple or list (which tensors cannot stand for)."""
    import collections.abc
    import inspect
    import typing

    try:
        params = inspect.signature(model.forward).parameters.values()
        hints = typing.get_type_hints(model.forward)
    except Exception:  # noqa: BLE001 -- unresolvable annotations: nothing to say
        return []
    kinds = (dict, tuple, list, collections.abc.Mapping, collections.abc.Sequence)
    found = []
    unpacked = _unpacked_params(model)
    for p in params:
        hint = hints.get(p.name)
        origin = typing.get_origin(hint) or hint
        if isinstance(origin, type) and issubclass(origin, kinds) and not issubclass(origin, (str, bytes)) or \
                p.name in unpacked:
            found.append(p.name)
    return found


def _unpacked_params(model) -> set:
    """Parameters of ``model.forward`` that its code reads as a container without saying so: unpacked
    (``x, y = inputs``, ``for t in inputs``) or indexed by a constant (``inputs[0]``, ``batch["image"]``)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(model.forward)))
    except Exception:  # noqa: BLE001 -- no source (a compiled or generated forward): nothing to say
        return set()
    fn = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if fn is None:
        return set()
    names = {a.arg for a in fn.args.args[1:] + fn.args.posonlyargs}
    found = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id in names and \
                any(isinstance(t, (ast.Tuple, ast.List)) for t in node.targets):
            found.add(node.value.id)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in names and \
                isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, (int, str)) and \
                not isinstance(node.slice.value, bool):
            found.add(node.value.id)
    return found


def _inputs_error(cause: BaseException, example_inputs, where: str = "", model=None) -> UserError:
    """The one-line error for a model that does not run on its example inputs (a wrong shape, float token ids)."""
    shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor)
                       else repr(t) for t in example_inputs)
    hint = "fix --input-shape, or the shape and type of the --calib inputs"
    if len(example_inputs) > 1 and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in example_inputs):
        hint += (" (--input-shape gives random float32 inputs: a mask or token ids needs --calib with real "
                 "arrays, an .npz with x0, x1, ...)")
    if "indices" in str(cause) and "Long, Int" in str(cause) and \
            any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in example_inputs):
        # (also beside an integer mask: that sent the image-data hint, save as float32, the opposite fix)
        hint = ("an input takes integer ids (an Embedding) and was given floats: --input-shape makes random "
                "floats, so give --calib, whose arrays must hold the ids as integers (ids.astype(np.int64), "
                "not float32; the same for calib= from Python)")
    elif "index out of range" in str(cause) and \
            any(isinstance(t, torch.Tensor) and not t.is_floating_point() for t in example_inputs):
        # an Embedding's ids past its table (or negative): the shape and type are right, the values are not
        hint = ("an integer input holds ids outside an Embedding's table: give ids in [0, num_embeddings) (the "
                "ids of the --calib inputs, and of calib= from Python)")
    elif any(isinstance(t, torch.Tensor) and not t.is_floating_point() for t in example_inputs) \
            and "type" in str(cause).lower():
        hint = ("integer inputs stay integers (token ids for an Embedding; a file's uint8 and int32 arrays are read as "
                "int64): save image data as float32, as the model was trained on it (uint8 images 0..255: "
                "x.astype(np.float32) / 255 and the training normalisation)")
    import re

    channels = re.search(r"to have (\d+) channels, but got (\d+) channels", str(cause))
    if channels and any(isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[-1] == int(channels.group(1))
                        for t in example_inputs):
        # (N, H, W, C) images: torch's "expected input[1, 8, 8, 1] to have 1 channels, but got 8 channels"
        rank = next(t.dim() for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() >= 3)
        perm = ", ".join(["0", str(rank - 1)] + [str(k) for k in range(1, rank - 1)])
        hint = (f"channels last? the layers take channels first: x.transpose({perm}) in numpy, x.permute({perm}) "
                "in torch, for the --calib inputs and --input-shape (calib= from Python)")
    containers = _container_inputs(model) if model is not None else []
    if containers or "invalid data type 'str'" in str(cause):  # x["key"] on a tensor: forward reads a dict
        which = f" ({', '.join(containers)})" if containers else ""
        hint = (f"forward takes a dict, tuple or list{which} where qcompile passes tensors, one per input: wrap the "
                "model in a module whose forward takes the tensors and builds the container, and compile that")
    return UserError(f"the model does not run on inputs of shape [{shapes}] ({where}{_first_line(cause)}); {hint}")


def _eager_failure(model: nn.Module, inputs) -> BaseException | None:
    """The exception ``model`` raises on ``inputs`` (eval mode, buffers as before), or None where it runs."""
    modes = [(m, m.training) for m in model.modules()]
    state = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            _seeded(lambda: model.eval()(*[_clone(t) for t in inputs]))
        return None
    except Exception as exc:  # noqa: BLE001 -- reported by the caller
        return exc
    finally:
        with torch.no_grad():
            for b, saved in state:
                b.copy_(saved)
        for m, training in modes:
            m.training = training


def _calls_fused_modules(gm: torch.fx.GraphModule) -> bool:
    """A GraphModule that calls torch.ao's fused modules (``fuse_fx``: ConvReLU2d, LinearReLU ...) whole: its
    layers were invisible to the passes and stayed float. Traced again, they are traced through as eager
    ``fuse_modules`` models are."""
    from torch.ao.nn.intrinsic.modules.fused import _FusedModule

    return any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), _FusedModule) for n in gm.graph.nodes)


_GRAPH_MODULE_NAMES = {"meta", "graph", "code"}  # GraphModule attributes a top-level submodule cannot be named


def _size_hint(exc: BaseException) -> str:
    """The fix for a size read from a traced tensor and used as a Python int: torch.fx hands ``x.size(1)`` on as a
    traced value, which ``torch.zeros(B, H)``, ``range(T)`` or a slice ``cos[:T]`` cannot take (the bare error,
    "zeros() takes 1 positional argument but 2 were given", said nothing of it)."""
    text = str(exc)
    if "positional argument" in text and any(f in text for f in ("zeros(", "ones(", "empty(", "full(", "rand(",
                                                                   "randn(", "arange(", "eye(")):
        return ("a size read from the input (x.size(i), x.shape[i]) is a traced value here: make tensors of the "
                "input's size with x.new_zeros(...)/x.new_ones(...), or write the fixed number (the file's non-batch "
                "sizes are fixed)")
    if ("Proxy" in text and "integer" in text) or "slice indices must be integers" in text:
        return ("a size read from the input (x.size(i), x.shape[i]) is used as a Python int (range, a slice): "
                "write the fixed number there (the file's non-batch sizes are fixed), or keep the module opaque "
                "with --leaf-module NAME")
    return ""


def _unfold_dim(node: torch.fx.Node):
    """The ``dimension`` argument of a ``Tensor.unfold`` node (method or function form), else None."""
    if not ((node.op == "call_method" and node.target == "unfold") or
            (node.op == "call_function" and node.target is torch.Tensor.unfold)):
        return None
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dimension")


_UNFOLD_MESSAGE = ("Tensor.unfold with a negative dimension is exported wrongly by torch.onnx (its frames come out "
                   "transposed); give the dimension as a non-negative index (x.unfold(2, size, step) for a 3-D x, "
                   "not x.unfold(-1, ...)), or pass example inputs so that qcompile can")


def _refuse_unexportable(gm: torch.fx.GraphModule) -> None:
    """Operations torch.onnx writes wrongly, refused before any pass runs. ``Tensor.unfold`` (framing a signal)
    along a dimension counted from the end: its frames come out transposed ((B, C, size, n) for (B, C, n, size)),
    so the file failed in onnxruntime at every batch size ("internal error") or, with validate=False, was written
    broken. Along a non-negative dimension it is exact (HaloNet's ``x.unfold(2, w, b).unfold(3, w, b)``), and a
    negative one is made non-negative from the traced shapes (:func:`_positive_unfold_dims`); only a dimension that
    is not a number is refused here."""
    for node in gm.graph.nodes:
        dim = _unfold_dim(node)
        if dim is not None and not isinstance(dim, int):
            raise UserError(_UNFOLD_MESSAGE)


def _positive_unfold_dims(gm: torch.fx.GraphModule) -> bool:
    """``x.unfold(-1, size, step)`` as ``x.unfold(x.dim() - 1, size, step)``, the rank from ShapeProp's metadata
    (torch.onnx writes the negative form with its frames transposed: 96 % of the next quantizer's codes differed);
    refused where the rank is not known. True if a node changed."""
    changed = False
    for node in gm.graph.nodes:
        dim = _unfold_dim(node)
        if not isinstance(dim, int) or dim >= 0:
            continue
        meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], torch.fx.Node) else None
        if getattr(meta, "shape", None) is None:
            raise UserError(_UNFOLD_MESSAGE)
        dim += len(meta.shape)
        if len(node.args) > 1:
            node.args = (node.args[0], dim) + tuple(node.args[2:])
        else:
            node.kwargs = {**node.kwargs, "dimension": dim}
        changed = True
    return changed


# operations that compute the same with a 0-dim tensor in place of a Python number (type promotion treats both as
# scalars; the result's dtype is checked anyway)
_SCALAR_ARITHMETIC_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
                                operator.neg, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow,
                                torch.subtract, torch.multiply, torch.divide, torch.clamp, torch.clip,
                                torch.clamp_min, torch.clamp_max, torch.minimum, torch.maximum}
_SCALAR_ARITHMETIC_METHODS = {"add", "sub", "mul", "div", "true_divide", "pow", "subtract", "multiply", "divide",
                              "clamp", "clip", "clamp_min", "clamp_max"}


def _items_as_tensors(gm: torch.fx.GraphModule, example_inputs) -> bool:
    """``.item()`` of a value computed from the inputs, read only by tensor arithmetic (``fc(x) / x.abs().max()
    .item()``, also through arithmetic on the number: ``x - 3 * x.mean().item()``): those users read the 0-dim
    tensor itself. torch.onnx writes an ``.item()`` as the constant it had on the example, so the file divided
    every input by the example's maximum (0.5 dB from the model; the validation, which skipped outputs after a
    ``max``, passed it). They read it as a 0-dim tensor (``reshape(())``), which broadcasts as the number does.
    Where a tensor result would change dtype, or the graph then fails on the example, the ``.item()`` stays. True
    where the graph changed (``gm`` recompiled, ShapeProp's metadata new)."""
    def arithmetic(u, item) -> bool:
        if u.op == "call_function":
            return u.target in _SCALAR_ARITHMETIC_FUNCTIONS
        return u.op == "call_method" and u.target in _SCALAR_ARITHMETIC_METHODS and u.args[0] is not item

    def qualifies(u, item, tensors: list) -> bool:
        if not arithmetic(u, item):
            return False
        meta = u.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "dtype"):  # a tensor result: its dtype is checked after
            tensors.append(u)
            return True
        # a Python number (``3 * x.mean().item()``): a 0-dim tensor from now on, as far as its readers allow
        return u.meta.get("type") in (int, float) and bool(u.users) and \
            all(qualifies(w, u, tensors) for w in u.users)

    items = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "item" and len(n.args) == 1
             and isinstance(n.args[0], torch.fx.Node) and n.users]
    changed = []
    for item in items:
        tensors: list = []
        if all(qualifies(u, item, tensors) for u in item.users):
            before = {u: u.meta["tensor_meta"].dtype for u in tensors}
            users = list(item.users)
            with gm.graph.inserting_after(item):  # 0-dim, as the number is (x[:1, :1].item(): a (1, 1) tensor)
                scalar = gm.graph.call_method("reshape", (item.args[0], ()))
            for u in users:
                u.replace_input_with(item, scalar)
            changed.append((item, scalar, users, before))
    if not changed:
        return False

    def propagate():
        gm.recompile()
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # a new interpreter: last uses moved
            _seeded(lambda: _ShapeProp(gm).propagate(*[_clone(t) for t in example_inputs]))

    def undo(entry):  # as the model computes it (the file then keeps the example's value; compile warns)
        item, scalar, users, _before = entry
        for u in users:
            u.replace_input_with(scalar, item)
        gm.graph.erase_node(scalar)

    try:
        propagate()
        failed = False
    except Exception:  # noqa: BLE001 -- a tensor where the number was fails somewhere (int ** -1): all undone
        failed = True
    for entry in changed:
        # a tensor result of another dtype (an int tensor times a float64 0-dim tensor is float64)
        if failed or any(u.meta["tensor_meta"].dtype != dtype for u, dtype in entry[3].items()):
            undo(entry)
            entry[2].clear()
    propagate()
    for item, _scalar, users, _before in changed:
        if users and not item.users:
            gm.graph.erase_node(item)
    gm.recompile()
    return any(users for _item, _scalar, users, _before in changed)


INPUT_NAMES = "input_names"


def _inputs_named_as_placeholders(gm: torch.fx.GraphModule) -> None:
    """Name each input of the graph module's forward after its placeholder node. torch.fx renames a placeholder
    ``input`` (a builtin) to ``input_1`` and writes ``input_1 = input`` at the top of forward; a second parameter
    that was itself named ``input_1`` then read the first input (``forward(self, input, input_1)``: both layers fed
    the first input, 7.7 dB and validation FAIL). ``gm.meta["input_names"]``: the names as ``forward`` spells them
    (the file's input names, ``qcompile.export.input_names_for``)."""
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    known = gm.meta.get(INPUT_NAMES)
    if not (isinstance(known, list) and len(known) == len(names)):  # a graph module traced again keeps forward's
        gm.meta[INPUT_NAMES] = names
    changed = False
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.target != node.name and not str(node.target).startswith("*"):
            node.target = node.name
            changed = True
    if changed:
        gm.recompile()


def _leaf_name(model: nn.Module, where: str) -> str:
    """What ``--leaf-module`` should name for the untraceable submodule ``where``: its class name where the model
    has other instances of that class, which would fail one by one (timm's Conv2dSame in every depthwise conv of
    tf_efficientnet_b0: five reruns, one flag each), else ``where`` itself."""
    try:
        mod = model.get_submodule(where)
    except AttributeError:
        return where
    cls = type(mod)
    if cls.__module__.startswith("torch.nn.") or sum(1 for m in model.modules() if type(m) is cls) < 2:
        return where
    names = {type(m).__name__ for m in model.modules() if type(m).__name__ == cls.__name__ and type(m) is not cls}
    return where if names else cls.__name__  # two classes of one name: the qualified name is unambiguous


def _holds_proxy(value) -> bool:
    if isinstance(value, torch.fx.Proxy):
        return True
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.fx.Proxy) for v in value)
    if isinstance(value, dict):
        return any(isinstance(v, torch.fx.Proxy) for v in value.values())
    return False


@contextlib.contextmanager
def _attributes_kept(model: nn.Module):
    """A forward that stores a value on a module (``if self.cache is None: self.cache = ...``, filled on the first
    call) stored a traced Proxy there while torch.fx traced it: the graph module's own run, and the model's eager
    run that checks it, then returned that Proxy, and the compile stopped with a wrong "in-place update" error.
    Attributes that hold a Proxy after the trace get back what they held before it (or go, if new); a list or dict
    appended to in forward gets back its items."""
    def contents(v):  # a list or dict is changed in place (self.log.append(y)): its items are kept too
        return list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else None

    before = [(m, {k: (v, contents(v)) for k, v in m.__dict__.items()}) for m in model.modules()]
    try:
        yield
    finally:
        for m, old in before:
            for key, value in list(m.__dict__.items()):
                if not _holds_proxy(value):
                    continue
                if key not in old:
                    del m.__dict__[key]
                    continue
                was, items = old[key]
                if items is not None and was is value:  # the same container, appended to: its old items back
                    if isinstance(value, list):
                        value[:] = items
                    else:
                        value.clear()
                        value.update(items)
                elif not _holds_proxy(was):
                    m.__dict__[key] = was
                else:
                    del m.__dict__[key]


def _trace_graph(model: nn.Module, example_inputs, leaf_modules: list, check_inputs=None,
                 dynamic_axes: Sequence[int] = ()) -> torch.fx.GraphModule:
    """:func:`trace`'s tracing proper: a GraphModule as it is, else through the transformer stand-ins, else plainly."""
    gm = None
    if isinstance(model, torch.fx.GraphModule) and not leaf_modules and not _calls_fused_modules(model):
        gm = model
    else:
        known = {name for name, _ in model.named_modules()} | {type(m).__name__ for m in model.modules()}
        unknown = [n for n in leaf_modules if n not in known]
        if unknown:
            raise UserError(f"--leaf-module {unknown[0]!r} names no submodule or module class of the model; "
                            "use a qualified name such as layer1.0 or a class name such as Bottleneck")
        if needs_rewrite(model):
            gm = _trace_transformers(model, example_inputs, leaf_modules)
    if gm is None:
        tracer = _Tracer(leaf_modules)
        n_given = len(example_inputs) if example_inputs is not None else None
        modules = [(name, id(m)) for name, m in model.named_modules()]  # (a forward that rebuilds them: below)
        sized_failure: list = []  # the sized trace's own exception, where it raises one
        try:
            with _attributes_kept(model):
                graph = tracer.trace(model, concrete_args=_defaults_beyond(model, n_given))
            _drop_default_placeholders(graph, n_given)
        except Exception as exc:
            # Python code over the input's sizes or dtype (a shape check, a slice to the sequence length): traced
            # again with those answered from the example, where that computes the model on other batch sizes
            if example_inputs is not None:
                # a model that does not run on its inputs (float token ids, a wrong shape) is told so, not sent to
                # --leaf-module by the trace's error
                # (asked only where the sized trace fails too: each asks for a run of the model, and the sized
                # trace runs it on the same inputs; YOLOv8n at 320 x 320 spent 0.7 s here)
                sized = None
                axes_failure: list = []  # why the sizes could not stay free on those axes
                if any(a > 0 for a in dynamic_axes):  # sizes free on those axes; else as below (compile refuses it)
                    with _attributes_kept(model):
                        sized = _trace_sized(model, example_inputs, leaf_modules, check_inputs, axes_failure,
                                             dynamic_axes=dynamic_axes)
                if sized is None:
                    with _attributes_kept(model):
                        sized = _trace_sized(model, example_inputs, leaf_modules, check_inputs, sized_failure)
                if sized is not None:
                    site = _failure_site(axes_failure[0] if axes_failure else exc, model)
                    if site:
                        sized.meta[SIZED_SITE] = site
                    return sized
                for inputs in (example_inputs, check_inputs):
                    failed = _eager_failure(model, inputs) if inputs is not None else None
                    if failed is not None:
                        raise _inputs_error(failed, inputs, model=model) from None
                if [(name, id(m)) for name, m in model.named_modules()] != modules:
                    # forward rebuilt submodules on its first calls, here or in the sized trace's runs
                    # (transformers' BigBird switches block-sparse attention to full attention on short inputs,
                    # building new modules, which no trace can): traced again as it now is. (The copy is the one
                    # changed, not the caller's model.)
                    try:
                        return _trace_graph(model, example_inputs, leaf_modules, check_inputs, dynamic_axes)
                    except UserError:
                        pass  # the first trace's words
            where = tracer._qc_stack[-1] if tracer._qc_stack else ""
            line = _user_frame(exc)
            place = f"in module {where!r}" if where else "in the model's forward"
            leaf = _leaf_name(model, where)  # the class, where other instances of it would fail next
            every = f"every {leaf} of the model: " if leaf != where else ""
            hint = (f"keep it opaque with --leaf-module {leaf} ({every}leaf_modules=[{leaf!r}] from Python)" if where
                    else "make forward traceable, or wrap the data-dependent part in a submodule and pass --leaf-module "
                         "NAME (leaf_modules=[NAME] from Python)")
            if "cannot be iterated" in str(exc):  # list(x.chunk(2, 1)), zip(mods, torch.split(x, 8, 1)), for t in x
                hint = ("torch.fx cannot iterate a traced tensor or its chunks: unpack a fixed count instead (a, b = "
                        "x.chunk(2, 1); ys = [x[:, i:i + 8] for i in range(0, 16, 8)]), or " +
                        (f"keep {leaf!r} opaque with --leaf-module {leaf} (leaf_modules=[{leaf!r}])" if where else
                         "wrap that part in a submodule and keep it opaque with --leaf-module NAME (leaf_modules=[NAME])"))
            hint = _size_hint(exc).replace("--leaf-module NAME", f"--leaf-module {leaf} (leaf_modules=[{leaf!r}])"
                                           if where else "--leaf-module NAME") or hint
            said = _first_line(exc)
            if "masking_utils.py" in line:
                # transformers builds a causal mask from the batch size when it is given none (GPT-2: a branch on
                # the batch, and torch.diff for packed sequences): --leaf-module then failed in torch.onnx
                hint = ("transformers builds an attention mask from the batch size where it is given none: give "
                        "every mask the model takes as an input of the module compiled (forward(self, input_ids, "
                        "attention_mask) passing attention_mask=attention_mask, and decoder_attention_mask for an "
                        "encoder-decoder; calibrate with masks of ones where there is no padding)")
            if _packs_sequences(exc):  # torch.fx's words ("__cuda_array_interface__ must be a dict") say nothing of it
                said = "a packed sequence (nn.utils.rnn.pack_padded_sequence) cannot be traced, nor exported to ONNX"
                hint = ("give the recurrent layer the padded batch and pick each sample's last valid step with its "
                        "lengths (h[torch.arange(B), lengths - 1])")
            if "cannot be iterated" in said:  # torch.fx's paragraph on loops and *args: the hint says it here
                said = said.split(". ")[0]
            if type(unwrap(model)).__module__.startswith("torchvision.models.detection."):
                # SSD, RetinaNet, FCOS, Faster R-CNN: their forward takes a list of images and ends in NMS, and the
                # generic hints (unpack a fixed count, --leaf-module) lead nowhere there
                hint = ("a torchvision detection model resizes its list of images, makes anchors and runs non-maximum "
                        "suppression in forward (data-dependent boxes), which no trace keeps: compile its tensor part, "
                        "its backbone (model.backbone) or a module returning model.head(list(model.backbone(x)"
                        ".values())) for SSD / RetinaNet / FCOS, and decode the boxes from the file's outputs")
            then = ""
            later = sized_failure[0] if sized_failure else None
            if later is not None and _user_frame(later) and _user_frame(later) != line:
                # the plain trace stopped at a size; with the sizes answered the trace went on and stopped at what
                # really blocks it (Longformer: a branch on whether the mask marks global tokens)
                then = (f" (with the input sizes answered from the example, the trace then stopped at "
                        f"{_user_frame(later).strip(' ()')}: {_first_line(later).split('. ')[0]})")
            raise UserError(f"cannot trace the model with torch.fx {place}{line}: {said}{then}; {hint}") from None
        name = type(model).__name__
        gm = torch.fx.GraphModule(tracer.root, graph, name)
    return gm


_LAYER_OWNER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                      nn.ConvTranspose3d, nn.Bilinear, nn.Embedding)


def _record_layer_owners(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """``gm.meta["layer_owners"]``: the paths of layer modules (``nn.Linear``, ``nn.Conv*``, ...) of ``model`` that the
    graph reads only parameters of (``F.linear(x, self.fc.weight)``): torch.fx copies such a path as a plain Module,
    and the layer table then named the functional layer ``fc.weight`` instead of ``fc``
    (:func:`qcompile.passes.select.weight_layer_name`)."""
    owners = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or "." not in node.target:
            continue
        path = node.target.rpartition(".")[0]
        try:
            original, copied = model.get_submodule(path), gm.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(original, _LAYER_OWNER_TYPES) and type(copied) is nn.Module:
            owners[path] = type(original).__name__
    if owners:
        gm.meta["layer_owners"] = owners


def keeps_global_rng(fn):
    """Give torch's global CPU generator back as it was after ``fn``: the decomposed ``nn.MultiheadAttention``'s new
    Linear layers draw from it as they initialise (before they take the trained weights), and a seeded script
    computed other numbers after a trace than without one."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        state = torch.random.get_rng_state()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.random.set_rng_state(state)
    return wrapper


@keeps_global_rng
def trace(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
          leaf_modules: Iterable[str] = (), copy: bool = True, check_inputs=None,
          dynamic_axes: Sequence[int] = ()) -> torch.fx.GraphModule:
    """Trace ``model`` with ``torch.fx`` and propagate shapes from ``example_inputs`` (if given).

    The graph module works on a copy of ``model`` (:func:`plain_copy`): the passes rewrite weights in place
    (BatchNorm folding, equalization), and a graph module traced from the model itself shares its parameters, so
    they changed the user's float model. ``copy=False`` traces ``model`` as it is (for a caller that copied it
    already). A ``GraphModule`` is taken as it is: it is the IR the passes transform.

    A model whose forward has Python code over its input's sizes or dtype is traced with those of the example
    (:func:`_trace_sized`); ``check_inputs`` (a batch of distinct samples, one tensor per input: the compile passes
    its first calibration samples) is a further check that the graph computes the model on other data;
    ``dynamic_axes``, input axes whose sizes must stay traced there too (compile's --dynamic-axes).

    Raises ``UserError`` naming the module and source line that could not be traced and how to keep it opaque.
    """
    if not isinstance(model, nn.Module):  # a path, a function: "'str' object has no attribute 'named_children'"
        raise UserError(f"trace() takes an nn.Module, got {type(model).__name__}"
                        + (" (a path: load it first with qcompile.load_model(path, arch=...))"
                           if isinstance(model, (str, os.PathLike)) else ""))
    if isinstance(model, torch.jit.ScriptModule):  # "get_submodule is not supported on ScriptModules"
        raise UserError("a TorchScript module cannot be traced with torch.fx; pass the nn.Module itself (or load the "
                        "archive's weights into it: qcompile.load_model(path, arch='package.module:factory'))")
    if not isinstance(model, torch.fx.GraphModule):
        taken = [n for n, _ in model.named_children() if n in _GRAPH_MODULE_NAMES]
        if taken:
            raise UserError(f"the model has a submodule named {taken[0]!r}, a name torch.fx's GraphModule keeps for "
                            f"itself (tracing fails on it); rename that attribute (e.g. self.{taken[0]}_net) and load "
                            "the weights with the renamed keys")
    if not isinstance(model, torch.fx.GraphModule):
        check_materialized(model)
    if copy and not isinstance(model, torch.fx.GraphModule):
        model = plain_copy(model)
    leaf_modules = list(leaf_modules)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif example_inputs is not None and not (isinstance(example_inputs, (tuple, list)) and
                                             all(isinstance(t, torch.Tensor) for t in example_inputs)):
        # NumPy arrays as compile() takes them (an array was iterated: its repr, every value, in the error), and a
        # one-line error for anything else (a dict: "inputs of shape ['x']")
        from .api import as_input_tuple

        example_inputs = as_input_tuple(example_inputs)
    original_class = None
    if not isinstance(model, torch.fx.GraphModule) and example_inputs is not None:
        original_class = _spell_out_varargs(model, len(example_inputs))
    try:
        if isinstance(check_inputs, torch.Tensor):
            check_inputs = (check_inputs,)
        gm = _trace_graph(model, example_inputs, leaf_modules, check_inputs, tuple(dynamic_axes or ()))
    finally:
        if original_class is not None:  # the caller's model (copy=False) keeps its class
            model.__class__ = original_class
    if model.__dict__.get(_CONVERTED_TO_FLOAT32):
        _float32_casts(gm)
    _inputs_named_as_placeholders(gm)
    _refuse_unexportable(gm)
    _record_layer_owners(gm, model)
    gm.eval()
    # what the model computes, before functionalize_inplace switches its modules' inplace flags off (the graph
    # module calls the model's own submodules)
    want = _reference_outputs(model, example_inputs) if example_inputs is not None and model is not gm else None
    if example_inputs is None and functionalize_inplace(gm):
        gm.recompile()
    if example_inputs is not None:
        prop = _ShapeProp(gm)
        try:
            # ShapeProp prints the whole traceback to stderr before re-raising: keep it to the one-line error.
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                traced_out = _seeded(lambda: prop.propagate(*[_clone(t) for t in example_inputs]))
        except Exception as exc:
            node = prop.current
            where = ""
            if node is not None:
                where = f"at {node.target if node.op == 'call_module' else node.name}: "
            raise _inputs_error(exc.__cause__ if exc.__cause__ is not None else exc, example_inputs, where,
                                 model=model) from None
        if _items_as_tensors(gm, example_inputs):
            with torch.no_grad():
                traced_out = _seeded(lambda: gm(*[_clone(t) for t in example_inputs]))
        # on the eager-semantics graph ShapeProp marked which values are tensors: `n += 1` on a size is not an
        # in-place update of anything another name could see
        if functionalize_inplace(gm):
            gm.recompile()
            if want is not None:
                with torch.no_grad():
                    traced_out = _seeded(lambda: gm(*[_clone(t) for t in example_inputs]))
        if want is not None:
            try:
                _check_traced(want, traced_out)
                if check_inputs is not None and any(n.target is setitem for n in gm.graph.nodes):
                    # an assignment whose effect depends on the data (y[y > 2] = 2 after a view of y was taken,
                    # which the graph does not follow): the example alone may not show it
                    again = _reference_outputs(model, check_inputs)
                    if again is not None:
                        with torch.no_grad():
                            _check_traced(again, _seeded(lambda: gm(*[_clone(t) for t in check_inputs])))
            except UserError:
                if _forward_uses_autocast(model):
                    raise UserError("the model's forward runs under torch.autocast, which torch.fx does not record: "
                                    "the traced graph computes in float32 and the model in lower precision; remove "
                                    "the autocast (or autocast(enabled=False)) for the compile: quantization starts "
                                    "from the float32 model") from None
                raise
    if _positive_unfold_dims(gm):
        gm.recompile()
    return gm


def _forward_uses_autocast(model: nn.Module) -> bool:
    import inspect

    for m in model.modules():
        try:
            if "autocast" in inspect.getsource(type(m).forward):
                return True
        except (OSError, TypeError):
            continue
    return False


# -- in-place operations ---------------------------------------------------------------------------------------
_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                      operator.imod: operator.mod, operator.ipow: operator.pow, operator.imatmul: operator.matmul,
                      operator.iand: operator.and_, operator.ior: operator.or_, operator.ixor: operator.xor,
                      operator.ilshift: operator.lshift, operator.irshift: operator.rshift}
_NOT_INPLACE_METHODS = {"requires_grad_", "share_memory_", "retain_grad_", "record_stream_"}


def _inplace_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """How ``node`` mutates its first argument, if it does: "method" (``x.relu_()``), "operator" (``x += y``),
    "function" (``F.relu(x, inplace=True)``, ``torch.relu_(x)``), "module" (``nn.ReLU(inplace=True)``) or "out"
    (``torch.sigmoid(u, out=u)``: the tensor written is the ``out`` argument)."""
    if node.op == "call_function" and isinstance(node.kwargs.get("out"), torch.fx.Node):
        return "out"
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    if node.op == "call_function" and node.target is setitem_:
        return "function"
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and not name.endswith("__") and name not in _NOT_INPLACE_METHODS:
            return "method"
    elif node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            # on tensors only (known from ShapeProp): for an int or a tuple `a += b` makes a new value, and a name
            # bound to the old one keeps it
            return "operator" if "tensor_meta" in node.args[0].meta else None
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and any(
                getattr(ns, name, None) is node.target for ns in (torch, torch.nn.functional, torch.special)):
            return "function"
        if node.kwargs.get("inplace") is True:
            return "function"
        at = _inplace_position(node.target)
        if at is not None and at < len(node.args) and node.args[at] is True:
            return "function"
    elif node.op == "call_module":
        if getattr(gm.get_submodule(node.target), "inplace", False) is True:
            return "module"
    return None


@functools.lru_cache(maxsize=None)
def _inplace_position(target) -> int | None:
    """The position of an ``inplace`` parameter of a function (``F.relu(x, True)``), or None."""
    import inspect

    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def functionalize_inplace(gm: torch.fx.GraphModule) -> bool:
    """Give in-place operations the meaning they have in eager PyTorch: after ``a.relu_()`` (result discarded),
    ``b += a`` or ``nn.ReLU(inplace=True)(y)``, every later use of the mutated tensor reads the operation's result,
    and the operation becomes its out-of-place form where there is one (``relu``, ``operator.add``,
    ``inplace=False``). torch.fx records ``a.relu_()`` as a node nobody uses: dead-code elimination dropped it and
    the file computed the model without the ReLU (validation compared it with the same graph and passed). An
    in-place operation on a view of another tensor is not followed; :func:`_check_traced` catches what that
    changes. Returns whether the graph changed."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # every kind first: a shared nn.ReLU(inplace=True) called in two places is in place at both calls, though the
    # first rewrite switches the module's flag off
    found = [(node, kind) for node in gm.graph.nodes if (kind := _inplace_kind(gm, node)) is not None]
    changed = False
    for node, kind in found:
        target = node.kwargs["out"] if kind == "out" else node.args[0]
        later = [u for u in target.users if u is not node and order.get(u, -1) > order[node]]
        for user in later:
            user.replace_input_with(target, node)
        if kind == "method" and callable(getattr(torch.Tensor, str(node.target)[:-1], None)):
            node.target = str(node.target)[:-1]
        elif kind == "operator":
            node.target = _INPLACE_OPERATORS[node.target]
        elif kind == "function":
            base = getattr(node.target, "__name__", "")
            if node.target is setitem_:
                node.target = setitem
            elif node.kwargs.get("inplace") is True:
                node.kwargs = {**node.kwargs, "inplace": False}
            elif base.endswith("_") and not base.endswith("__"):  # torch.relu_ -> torch.relu (else stays in place)
                pure = [getattr(ns, base[:-1]) for ns in (torch, torch.nn.functional, torch.special)
                        if callable(getattr(ns, base[:-1], None))]
                if pure:
                    node.target = pure[0]
            else:
                at = _inplace_position(node.target)
                if at is not None:
                    node.args = node.args[:at] + (False,) + node.args[at + 1:]
        elif kind == "module":
            gm.get_submodule(node.target).inplace = False
        elif kind == "out":
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "out"}
        changed = True
    return changed


def _clone(t):
    return t.clone() if isinstance(t, torch.Tensor) else t


_SEED_0 = torch.Generator().manual_seed(0).get_state()  # the CPU generator's state after torch.manual_seed(0)


def _seeded(fn):
    """``fn()`` with the CPU generator seeded as by ``torch.manual_seed(0)``, restored after (random draws in a
    forward draw the same values in the model and in its graph)."""
    saved = torch.random.get_rng_state()
    torch.random.set_rng_state(_SEED_0)
    try:
        return fn()
    finally:
        torch.random.set_rng_state(saved)


def _reference_outputs(model: nn.Module, example_inputs) -> list | None:
    """The model's output tensors on (copies of) the example inputs, in eval mode with the same random draws as
    the graph's run; None where the model does not run (the traced graph then reports the error)."""
    from torch.utils._pytree import tree_leaves

    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            out = _seeded(lambda: model.eval()(*[_clone(t) for t in example_inputs]))
    except Exception:
        return None
    finally:
        for m, training in modes:
            m.training = training
    leaves = tree_leaves(out)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, (bool, int, float, complex, str, bytes)):
            raise UserError(f"output {i} of the model is a Python {type(leaf).__name__} ({leaf!r}), not a tensor; an "
                            "ONNX file returns tensors only: return torch.tensor(...) for a constant, or leave it out")
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    if all(leaf is None for leaf in leaves):  # torch.onnx then failed: "'Graph' object has no attribute 'outputs'"
        # (a dataclass is one leaf that holds tensors: torch.onnx's own error says what to return there)
        what = "None" if out is None else f"a {type(out).__name__} without tensors"
        raise UserError(f"the model's forward returns {what}; an ONNX file computes tensors: return the model's "
                        "output tensor(s) from forward")
    return tensors


def _check_traced(want: list, traced_out) -> None:
    """The traced graph must compute what the model computes on the example inputs (eval mode, the same random
    draws): an in-place operation on a view (``x[:, :4].relu_()``), or anything else torch.fx records differently
    from what eager PyTorch runs, would otherwise give a file that matches its own graph, so validation passes,
    yet computes another function."""
    from torch.utils._pytree import tree_leaves

    from qcompile.passes.float_check import output_difference

    problem = output_difference(want, [t for t in tree_leaves(traced_out) if isinstance(t, torch.Tensor)])
    if problem:
        raise UserError(f"the graph torch.fx traced does not compute the model ({problem}); an in-place update seen "
                        "through another name (a view or alias updated in place: x[:, :4].relu_(), x.detach().mul_(2), "
                        "x.contiguous().add_(1); or z = y; y += 1) or a value computed in Python from a tensor is the "
                        "usual cause: write it out of place (x = x.relu(), y = y + 1), or keep that module whole with "
                        "--leaf-module NAME")


def _trace_transformers(model: nn.Module, example_inputs, leaf_modules,
                        sized: bool = False) -> torch.fx.GraphModule | None:
    """Trace ``model`` with its ``nn.MultiheadAttention`` as four Linear projections and through the transformer
    containers (``qcompile.traceable``), so their projections are quantized too. ``None`` where that does not trace
    (a mask, an unusual module) or, on the example inputs, computes something else than ``model``: the caller then
    traces the model as it is, those modules opaque."""
    from torch.utils._pytree import tree_leaves

    tracer = _SizedTracer(example_inputs, leaf_modules, transformers=True) if sized else \
        _Tracer(leaf_modules, transformers=True)
    try:
        if example_inputs is not None:  # the kind of each mask argument, which a Proxy does not show
            record_masks(model, example_inputs)
        candidate = rewrite_attention(model)
        copy_mask_notes(model, candidate)
        n_given = len(example_inputs) if example_inputs is not None else None
        graph = tracer.trace(candidate, concrete_args=_defaults_beyond(candidate, n_given))
        _drop_default_placeholders(graph, n_given)
        gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
        if example_inputs is not None:  # compared in eval mode (no dropout), each module's mode restored after
            modes = [(m, m.training) for m in list(model.modules()) + list(gm.modules())]
            try:
                with torch.no_grad():
                    want = [t for t in tree_leaves(model.eval()(*example_inputs)) if isinstance(t, torch.Tensor)]
                    got = [t for t in tree_leaves(gm.eval()(*example_inputs)) if isinstance(t, torch.Tensor)]
            finally:
                for m, training in modes:
                    m.training = training
            if len(want) != len(got) or any(
                    w.shape != g.shape or not torch.allclose(g.double(), w.double(), rtol=1e-3,
                                                             atol=1e-4 * float(w.abs().max().clamp_min(1e-6)))
                    for w, g in zip(want, got)):
                return None
        return gm
    except Exception:  # NotTraceable, a TraceError, a shape the stand-in does not cover: trace as before
        return None
    finally:
        clear_mask_notes(model)


def _spell_out_varargs(model: nn.Module, n_given: int) -> type | None:
    """Give a ``forward(self, *args, **kwargs)`` (a user's wrapper that hands its inputs on, ``forward(self, x,
    *extra)``) one named parameter per example input. torch.fx makes ``*args`` a single placeholder, and a forward
    that unpacks it (``self.net(*args)``) fails with "Proxy object cannot be iterated"; with the inputs spelled out
    it is traced as the call with those inputs runs. The same for ``forward(self, x, **kwargs)``, whose ``**kwargs``
    torch.fx made a second input (calibration then asked for 2 inputs, the model's signature took 1), and for a
    forward under a decorator whose wrapper takes ``(*args, **kwargs)`` (HuggingFace transformers 5 models: "co_varnames
    is too small"). Only ``model``'s class is changed, for the trace (the graph
    keeps its submodules, not its class): the class it had is returned, for :func:`trace` to restore, else None."""
    import inspect

    cls = type(model)
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError, AttributeError):
        return None
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    outer = getattr(cls.forward, "__code__", None)  # a decorator's wrapper(*args, **kwargs) (transformers 5)
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    if not (varargs or any(p.kind is p.VAR_KEYWORD for p in params)
            or (outer is not None and outer is not code and outer.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS))):
        return None
    fixed = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if n_given > len(fixed) and not varargs:
        return None  # more inputs than the forward takes: the trace says so
    names = fixed[:n_given]
    taken = set(names) | {p.name for p in params}
    for i in range(len(names), n_given):
        name = f"arg{i}"  # not "input": torch.fx renames a placeholder that shadows a builtin ("input_1")
        while name in taken:
            name += "_"
        names.append(name)
        taken.add(name)
    arglist = ", ".join(names)
    scope = {"_forward": cls.forward}
    exec(f"def forward(self, {arglist}):\n    return _forward(self, {arglist})\n", scope)  # noqa: S102 (our own text)
    model.__class__ = type(cls.__name__, (cls,), {"forward": scope["forward"], "__module__": cls.__module__,
                                                   "__qualname__": cls.__qualname__})
    return cls


def _defaults_beyond(model: nn.Module, n_given: int | None) -> dict | None:
    """The forward parameters with defaults that the traced call does not pass (those after the ``n_given``
    inputs; all of them when the count is unknown), with their defaults: ``forward(self, x, mask=None,
    return_features=False)`` is traced as ``model(x)`` is called, its ``if mask is not None`` and
    ``if return_features`` branches decided by the defaults instead of failing on (or taking) a traced value."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if n_given is None:
        n_given = sum(1 for p in params if p.kind in positional and p.default is p.empty)
    out, index = {}, 0
    for p in params:
        if p.kind in positional:
            index += 1
            if index <= n_given:
                continue
        elif p.kind != inspect.Parameter.KEYWORD_ONLY:
            continue  # *args / **kwargs
        if p.default is not p.empty:
            out[p.name] = p.default
    return out or None


def _drop_default_placeholders(graph: torch.fx.Graph, given: int | None = None) -> None:
    """Remove what tracing with defaults leaves behind: the checks that a parameter has its default
    (``_assert_is_none(p)``, ``torch._assert(p == value)``) and the placeholders of those parameters, now unused, so
    the module takes the model's inputs alone. The first ``given`` placeholders are inputs the caller gives: kept
    (an optional input forward never reads, given an array, was dropped, and the compile refused its data)."""
    import operator

    from torch.fx._symbolic_trace import _assert_is_none

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    kept = set(placeholders[:given]) if given is not None else set()
    for ph in [n for n in placeholders if n.args and n not in kept]:  # n.args: (default,)
        for user in list(ph.users):
            if user.op != "call_function":
                continue
            if user.target is _assert_is_none and not user.users:
                graph.erase_node(user)
            elif user.target is operator.eq:
                for check in list(user.users):
                    if check.op == "call_function" and check.target is torch._assert and not check.users:
                        graph.erase_node(check)
                if not user.users:
                    graph.erase_node(user)
        if not ph.users:
            graph.erase_node(ph)


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, to name it when the model fails on the inputs."""

    current: torch.fx.Node | None = None

    def run_node(self, n):
        self.current = n
        return super().run_node(n)


def _user_frame(exc: BaseException) -> str:
    """' (file.py:LINE)' for the innermost frame outside torch, if any."""
    frames = traceback.extract_tb(exc.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(__file__)
    for fr in reversed(frames):
        if not fr.filename.startswith(torch_dir) and not fr.filename.startswith(here):
            return f" ({os.path.basename(fr.filename)}:{fr.lineno})"
    return ""
