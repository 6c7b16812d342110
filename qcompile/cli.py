"""The ``qcompile`` command line.

    qcompile MODEL [options] -o OUT.onnx          compile a model
    qcompile validate OUT.onnx --against MODEL     validate an emitted file against its PyTorch reference
    qcompile demo [--scheme S --bits N ...]        compile the bundled digits model and print accuracy
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import traceback

import numpy as np

from .errors import UserError, ValidationFailed

MAIN_DESCRIPTION = """Quantize a PyTorch model with APoT, PoT or uniform levels and emit an ONNX file that onnxruntime runs,
validated against the PyTorch simulation of the same quantized model.

MODEL is one of:
  weights.pt --arch pkg.mod:factory   a state dict (torch.save(model.state_dict())), loaded with weights_only=True
  model.pt --trust-pickle             a full pickle (torch.save(model)); refused without the flag (it runs code)
  scripted.pt --arch pkg.mod:factory  a TorchScript archive: its weights, loaded into the factory's model
  pkg.mod:factory                     a factory that returns the model (fresh weights)

other commands:  qcompile validate FILE.onnx --against MODEL ...  |  qcompile demo"""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) with exit code 2."""

    def error(self, message):
        raise UserError(f"{message}; see {self.prog} --help")


def _finite(text: str) -> float:
    """A float option value that must be a number (not nan)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value:
        raise argparse.ArgumentTypeError("nan is not a threshold; give a number")
    return value


def _fraction(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction; give a value in [0, 1], e.g. 0.99")
    return value


def _non_negative(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give a value >= 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count; give 1 or more")
    if value > 2**63 - 1:  # torch.randn's "Overflow when unpacking long long", an internal error
        raise argparse.ArgumentTypeError(f"{text} is too large (past 2**63 - 1); give a count such as 16")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", metavar="PKG.MOD:FACTORY", help="factory that builds the architecture of a state-dict file")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a full pickle (torch.save(model)); it runs code from the file")
    p.add_argument("--input-shape", metavar="N,C,H,W", action="append",
                   help="shape of the example input (float32), e.g. 1,3,224,224; once per input of a model with several")
    p.add_argument("--leaf-module", action="append", default=[], metavar="NAME",
                   help="keep a submodule (qualified name or class name) opaque when tracing; repeatable")


def _check_leaf_modules(args) -> None:
    """An empty --leaf-module named the model itself (its root module's name is ''): accepted, and nothing kept
    opaque, where an empty --exclude is refused."""
    if any(not name.strip() for name in args.leaf_module):
        raise UserError("--leaf-module needs a submodule name or module class, e.g. --leaf-module layer1.0 or "
                        "--leaf-module Bottleneck (got an empty value)")


def _compile_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qcompile", description=MAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model file or package.module:factory spec")
    from . import __version__

    p.add_argument("--version", action="version", version=f"qcompile {__version__}")
    _add_model_args(p)
    p.add_argument("-o", "--output", metavar="OUT.onnx", help="output file (default: MODEL name + scheme + bits [+ _pertensor, _adaptive, _custom, "
                   "_shiftadd] + .onnx)")
    q = p.add_argument_group("quantization")
    q.add_argument("--scheme", default="apot", help="fp32, apot, pot, uniform, log2, ternary or binary (default apot)")
    q.add_argument("--bits", type=int, default=4, help="bit-width of weights and activations, 2..8 (default 4; pot and log2 levels take at most 6 bits for weights and signed activations and 5 for non-negative ones (after a ReLU), their integer grid doubling with every level: apot is the scheme for more; ternary and binary levels have 2 and 1 bits whatever it says)")
    q.add_argument("--wbits", type=int, help="weight bit-width (overrides --bits)")
    q.add_argument("--abits", type=int, help="activation bit-width (overrides --bits)")
    q.add_argument("--wscheme", help="weight scheme (overrides --scheme), e.g. --wscheme apot --ascheme uniform")
    q.add_argument("--ascheme", help="activation scheme (overrides --scheme)")
    q.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per output channel")
    q.add_argument("--calib", metavar="FILE", help="calibration inputs: .npy, or .npz with the array under 'x' (or its only array; "
                   "a model with several inputs: .npz with x0, x1, ... or forward's input names), or a tensor saved with torch.save (.pt; "
                   "several inputs: a tuple of tensors)")
    q.add_argument("--calib-method", default="mse",
                   help="activation clipping observer: mse (default), minmax, ema, percentile, kl, laplace, sdq")
    q.add_argument("--symmetric-levels", action="store_true",
                   help="APoT/PoT activations that can be negative keep the symmetric signed levels (default: "
                        "calibration may shift the unsigned levels instead, where that quantizes with less error)")
    g = p.add_argument_group("graph passes")
    g.add_argument("--no-fold-bn", action="store_true", help="do not fold BatchNorm, nor products by constants, into the Conv/Linear layers around them")
    g.add_argument("--no-equalize", action="store_true", help="skip cross-layer weight equalization and the per-feature scaling of raw inputs (EqualizeInputs)")
    g.add_argument("--no-bias-correction", action="store_true", help="skip bias correction after weight quantization")
    g.add_argument("--avg-wbits", type=float, metavar="AVG",
                   help="automatic mixed precision: each layer's weight bit-width (2-8 uniform, 2-6 APoT, 2-4 PoT) "
                        "chosen by its measured effect on the outputs, averaging at most AVG bits per weight over "
                        "the layers the default rule quantizes (needs --calib)")
    g.add_argument("--weight-rounding", default="nearest", metavar="nearest|adaptive",
                   help="adaptive: round each layer's weights to the levels that best reconstruct its output on the "
                        "calibration data (adaptive rounding, solved as GPTQ does; needs --calib; slower) instead of "
                        "to their nearest levels")
    g.add_argument("--no-int8-outputs", action="store_true",
                   help="do not re-quantize the outputs of 8-bit layers, residual adds and pools (they then run on "
                        "float kernels, and skip connections stay float)")
    g.add_argument("--float-levels", action="store_true",
                   help="layers whose output goes to APoT/PoT (or sub-8-bit uniform) levels run on float kernels and "
                        "take the exact nearest level of their float output (default: int8 kernels, the level "
                        "decided on the integer accumulator, thresholds within one accumulator unit)")
    g.add_argument("--keep-first-last", default="int8", metavar="int8|fp32|quant",
                   help="first and last layer: 8-bit uniform (default, as the papers do), float, or quantized like the rest")
    g.add_argument("--float-downsample", action="store_true", help="keep 1x1 downsample shortcuts in float (N2UQ appendix)")
    g.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="keep layers whose name (as the layer table names them: the module, or a functional "
                        "layer's parameter such as w or W.0) matches GLOB in float; repeatable")
    g.add_argument("--config", metavar="FILE", help="per-layer overrides, TOML or YAML: 'layer4.*': {scheme: uniform, bits: 8}")
    e = p.add_argument_group("emission and checks")
    e.add_argument("--emit", default="standard", metavar="standard|custom|shift-add",
                   help="standard ONNX ops (default), compact qcompile-domain nodes with function bodies, "
                        "or multiplier-free shift-add lowering of APoT/PoT layers")
    e.add_argument("--int8-weights", default="auto", metavar="auto|s8|s8-safe|u8",
                   help="8-bit weights: s8 (int8, U8S8 kernels; x86 CPUs without VNNI saturate them), s8-safe (int8 "
                        "with no pair past int16: U8S8 speed, exact on every CPU, ~0.5 bit less weight precision), u8 "
                        "(uint8 with zero point 128: exact everywhere, slower U8U8 kernels on x86), auto (s8 where this "
                        "machine runs U8S8 exactly, else s8-safe)")
    e.add_argument("--dynamic-axes", metavar="AXES", default="",
                   help="input axes besides the batch whose size may change when the file runs, e.g. 2,3 for an "
                        "image's height and width: declared symbolic, and checked at twice the example's size and "
                        "at an odd one (the compile stops where the graph fixed a size there)")
    e.add_argument("--check", action="store_true", help="verify the graph after every pass")
    e.add_argument("--no-validate", action="store_true", help="skip validating the ONNX file in onnxruntime")
    e.add_argument("--data", metavar="FILE",
                   help="held-out inputs to validate on, in --calib's formats: the file, its simulation and the float "
                        "model are compared there (default: the --calib inputs; without them, random ones)")
    e.add_argument("--min-sqnr", type=_finite, metavar="DB", help="fail (exit 1) if output SQNR vs the simulation is below DB")
    e.add_argument("--min-top1", type=_fraction, metavar="FRACTION",
                   help="fail (exit 1) if top-1 agreement is below FRACTION (0..1)")
    e.add_argument("--json", metavar="FILE", help="also write the compile summary as JSON")
    e.add_argument("-v", "--verbose", action="store_true",
                   help=f"print every line of each pass's report (default: the first {REPORT_ITEMS - 1} and a count)")
    e.add_argument("-q", "--quiet", action="store_true",
                   help="print the results only: the file written, the comparison with the float model and the "
                        "validation verdict (no pass lines, layer table or progress bar; warnings still go to stderr)")
    return p


def _validate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qcompile validate", description="Run an emitted ONNX file in onnxruntime and compare it with its "
                "PyTorch reference: the simulation of the quantized model (rebuilt with the options recorded in the "
                "file), or the float model for fp32 files.")
    p.add_argument("onnx", metavar="FILE.onnx")
    p.add_argument("--against", required=True, metavar="MODEL", help="the model the file was compiled from")
    _add_model_args(p)
    p.add_argument("--data", metavar="FILE", help="inputs to compare on (.npy/.npz, or .pt tensors); without --calib also "
                   "the calibration data that rebuilds the simulation of a quantized file")
    p.add_argument("--calib", metavar="FILE", help="the compile's calibration data (its --calib file), which rebuilds the "
                   "simulation of a quantized file; then --data may hold other (held-out) inputs to compare on")
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="random inputs when no --data is given (default 16); a quantized file calibrated on data "
                        "needs --calib, the calibration inputs it was compiled with, to rebuild its simulation")
    p.add_argument("--min-sqnr", type=_finite, metavar="DB",
                   help="fail (exit 1) if the file's output SQNR vs the simulation is below DB (not vs the float "
                        "model: that figure is reported, never a threshold)")
    p.add_argument("--max-abs", type=_non_negative, help="fail (exit 1) if max abs error exceeds this")
    p.add_argument("--min-top1", type=_fraction, metavar="FRACTION",
                   help="fail (exit 1) if top-1 agreement is below FRACTION (0..1)")
    return p


def _demo_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qcompile demo", description="Compile the bundled digits CNN (trained on scikit-learn's real "
                "handwritten digits), run it in onnxruntime and print test accuracy before and after.")
    p.add_argument("--scheme", default="apot", help="fp32, apot, pot, uniform, log2, ternary or binary (default apot)")
    p.add_argument("--bits", type=int, default=4, help="bit-width of weights and activations, 2..8 (default 4; pot and log2 levels take at most 6 bits for weights and signed activations and 5 for non-negative ones (after a ReLU), their integer grid doubling with every level: apot is the scheme for more; ternary and binary levels have 2 and 1 bits whatever it says)")
    p.add_argument("--wbits", type=int, help="weight bit-width (overrides --bits)")
    p.add_argument("--abits", type=int, help="activation bit-width (overrides --bits)")
    p.add_argument("--wscheme", help="weight scheme (overrides --scheme), e.g. --wscheme ternary --ascheme uniform")
    p.add_argument("--ascheme", help="activation scheme (overrides --scheme)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="keep matching layers (conv1..conv3, down, fc1, fc2) in float; repeatable")
    p.add_argument("--emit", default="standard", metavar="standard|custom|shift-add",
                   help="ONNX form, as for qcompile MODEL (default standard)")
    p.add_argument("--int8-weights", default="auto", metavar="auto|s8|s8-safe|u8",
                   help="8-bit weights, as for qcompile MODEL (default auto)")
    p.add_argument("-o", "--output", default="digits_demo.onnx", metavar="OUT.onnx",
                   help="output file (default digits_demo.onnx)")
    return p


def _starts_like_a_pickle(path) -> bool:
    """An object array saved by numpy.save starts with the .npy magic; a bare pickle with protocol 2 or later with
    0x80. Anything else that numpy could only try to unpickle is not an array file at all (a text file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return True
    return head.startswith(b"\x93NUMPY") or head[:1] == b"\x80"


class NamedArrays(dict):
    """The arrays of a .npz stored under other names than ``x0, x1, ...`` (``forward``'s input names,
    ``np.savez(path, input_ids=..., attention_mask=...)``), until the model's input names put them in order
    (:func:`resolve_named`)."""

    path = ""
    what = ""


class NumberedArrays(tuple):
    """The arrays of a .npz stored as ``x0, x1, ...``: by position, unless ``forward`` names its inputs so too."""

    path = ""
    what = ""


_LABEL_KEYS = ("y", "label", "labels", "target", "targets")  # arrays beside the inputs that are no input


def forward_inputs(model) -> list[tuple[str, bool]] | None:
    """``forward``'s positional inputs as ``(name, required)``; None where it takes ``*args`` or has no signature."""
    import inspect

    from .frontend import unwrap

    try:
        params = list(inspect.signature(unwrap(model).forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    inputs = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        if p.default is not p.empty and isinstance(p.default, (bool, int, float, str)):
            break  # a flag (return_features=False): no array of a file, nor anything after it
        inputs.append((p.name, p.default is p.empty))
    return inputs


def resolve_named(data, inputs, file_names=None, what: str | None = None):
    """``data`` as :func:`load_array_file` gives it, with the arrays of a named .npz put in ``forward``'s order.

    ``inputs``: ``forward_inputs(model)``; ``file_names``: the names a compiled file gives its inputs (the ones it
    records, ``input_0, ...`` where forward's names could not be used). Named arrays feed forward's inputs from the
    first on, as far as the .npz holds them (at least the required ones, two or more; labels ``y``/``labels``/
    ``target(s)`` beside them are no input unless forward requires them); else an array ``x`` is the one input (the
    one-input convention) and the rest are left out; else the file's names. Numbered arrays ``x0, x1, ...`` are
    positional, and refused where forward itself names its inputs ``x0, x1, ...`` in another order (which one is
    meant?)."""
    what = what or getattr(data, "what", "--calib")
    if isinstance(data, NumberedArrays):
        names = [n for n, _ in inputs or ()][:len(data)]
        if any(re.fullmatch(r"x\d+", n) for n in names) and names != [f"x{i}" for i in range(len(names))]:
            raise UserError(f"{what} file {data.path!r} stores the inputs as x0, x1, ..., read by position, but forward "
                            f"names its inputs {', '.join(names)}: which is which is ambiguous; save them as a tuple, "
                            "torch.save((a, b, ...), path), in forward's order")
        return tuple(data)
    if not isinstance(data, NamedArrays):
        return data
    keys = list(data)
    candidates = [[(n, req) for n, req in inputs]] if inputs else []
    candidates.append(None)  # the one-input convention: the array under x
    for names in (file_names, [f"input_{i}" for i in range(len(keys))]):
        if names:
            candidates.append([(n, True) for n in names])
    for cand in candidates:
        if cand is None:
            if "x" in data:
                return data["x"]
            continue
        taken = []
        for name, req in cand:
            if name not in data or (not req and name in _LABEL_KEYS):
                break
            taken.append(name)
        if len(taken) >= max(2, sum(req for _, req in cand)):
            counts = [data[n].shape[0] for n in taken]
            if len(set(counts)) != 1:
                raise UserError(f"{what} file {data.path!r}: the inputs {', '.join(taken)} must have the same number "
                                f"of samples, got {counts}")
            return tuple(data[n] for n in taken)
    inputs_of_file = [k for k in keys if k not in _LABEL_KEYS]
    if (not inputs or len(inputs) < 2) and len(inputs_of_file) == 1:  # images + y (labels beside are no input)
        return data[inputs_of_file[0]]
    if not inputs or len(inputs) < 2:
        raise UserError(f"{what} file {data.path!r} has arrays {keys}; store the inputs under 'x' (a model with "
                        "several inputs: x0, x1, ... or its input names)")
    names = [n for n, _ in inputs]
    missing = next(n for n in names if n not in data)
    raise UserError(f"{what} file {data.path!r} has arrays {keys}; forward takes {', '.join(names)}: store the inputs "
                    f"under those names from the first on ({missing} is missing), or as x0, x1, ... in that order")


def load_array_file(path: str, what: str = "--calib", several: bool = False):
    """The inputs in a .npy/.npz file (or a tensor file of ``torch.save``, ``_torch_tensor_file``): one array, or
    (``several``) a tuple of arrays stored as x0, x1, ... in a .npz
    for a model with several inputs."""
    if not os.path.exists(path):
        raise UserError(f"{what} file {path!r} does not exist; give a .npy or .npz file of inputs")
    if os.path.isdir(path):  # numpy's IsADirectoryError read as "not a readable array; save it with numpy.save"
        raise UserError(f"{what} file {path!r} is a directory; give the .npy or .npz file inside it")
    npz = False  # an object array in an .npz: its zip header is no pickle's, yet it holds Python objects
    try:
        loaded = np.load(path, allow_pickle=False)  # an .npz by its content, whatever the extension (.NPZ)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            npz = True
            with loaded as data:
                keys = list(data.keys())
                torch_file = any(k == "data.pkl" or k.endswith("/data.pkl") for k in keys)  # torch.save's zip
                numbered = [f"x{i}" for i in range(len(keys)) if f"x{i}" in keys]
                if torch_file:
                    arr = _torch_tensor_file(path, what, several)
                elif "x" in keys and not (several and len(keys) >= 2):
                    arr = data["x"]
                elif len(keys) == 1:
                    arr = data[keys[0]]
                elif several and len(numbered) >= 2 and numbered == [f"x{i}" for i in range(len(numbered))]:
                    arr = NumberedArrays(data[k] for k in numbered)
                elif several and len(keys) >= 2 and all(re.fullmatch(r"x\d+", k) for k in keys):
                    gap = next(i for i in range(len(keys) + 1) if f"x{i}" not in keys)
                    raise UserError(f"{what} file {path!r} has arrays {', '.join(sorted(keys, key=lambda k: int(k[1:])))} "
                                    f"but no x{gap}; number the inputs x0, x1, ... from 0, one array per input")
                elif several and len(keys) >= 2:
                    arr = NamedArrays()
                    refused = None
                    for k in keys:
                        try:
                            arr[k] = data[k]
                        except ValueError as exc:  # an object array beside the inputs: not one of them
                            refused = exc
                    if not arr and refused is not None:
                        raise refused
                elif len([k for k in keys if k not in _LABEL_KEYS]) == 1:  # one array beside labels: the inputs
                    arr = data[next(k for k in keys if k not in _LABEL_KEYS)]
                else:
                    more = " (a model with several inputs: x0, x1, ...)" if several else ""
                    raise UserError(f"{what} file {path!r} has arrays {keys}; store the inputs under 'x'{more}")
        else:
            arr = loaded
    except UserError:
        raise
    except PermissionError:  # not a damaged file: "save it with numpy.save" was the wrong fix
        raise UserError(f"{what} file {path!r} cannot be read (permission denied); check its permissions (chmod +r) "
                        "or run as a user who can read it") from None
    except ValueError as exc:
        if "allow_pickle" in str(exc) and not npz and not _starts_like_a_pickle(path):
            raise UserError(f"{what} file {path!r} is not an .npy/.npz file or a tensor saved with torch.save (text, or "
                            "another format); save the inputs with numpy.save(path, numpy.asarray(x, "
                            "dtype=numpy.float32)) or torch.save(x, path)") from None
        if "allow_pickle" in str(exc):
            raise UserError(f"{what} file {path!r} holds Python objects (an object array), which qcompile does not "
                            "load (unpickling runs code); save a numeric array: "
                            "numpy.save(path, numpy.asarray(x, dtype=numpy.float32))") from None
        raise UserError(f"{what} file {path!r} is not a readable .npy/.npz array ({type(exc).__name__}); save it with "
                        "numpy.save") from None
    except Exception as exc:
        raise UserError(f"{what} file {path!r} is not a readable .npy/.npz array ({type(exc).__name__}); save it with numpy.save") from None
    if isinstance(arr, NamedArrays):  # arrays of numbers only (labels beside them are numbers too)
        arr = NamedArrays((k, a) for k, a in arr.items() if isinstance(a, np.ndarray) and a.dtype.kind in "fiub"
                          and a.ndim >= 1 and a.shape[0] > 0)
    arrays = tuple(arr.values()) if isinstance(arr, NamedArrays) else arr if isinstance(arr, tuple) else (arr,)
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiub" or a.ndim < 1 or a.shape[0] == 0:
            raise UserError(f"{what} file {path!r} must hold a non-empty numeric array (N, ...) of inputs")
    if len({a.shape[0] for a in arrays}) != 1 and not isinstance(arr, NamedArrays):  # which are inputs: later
        raise UserError(f"{what} file {path!r}: the inputs x0, x1, ... must have the same number of samples, got "
                        f"{[a.shape[0] for a in arrays]}")
    for a in arrays:
        if a.dtype.kind != "f" or a.size == 0:
            continue
        bad = int(np.count_nonzero(np.isnan(a) | (a == np.inf)))  # -inf: a float mask's "masked out"
        if bad:  # --data's NaN were compared as equal on both sides: PASS on outputs that were all NaN
            raise UserError(f"{what} file {path!r} holds {bad} NaN or +inf value(s); give finite inputs")
        big = float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0))
        if big > float(np.finfo(np.float32).max):  # numpy's overflow warning, then "holds NaN or +inf"
            raise UserError(f"{what} file {path!r} holds values beyond float32's range (largest magnitude {big:.3g}); "
                            "the model computes in float32: give inputs it can hold")
    # floating point as float32; integer inputs (token ids) stay integers for the model's Embedding
    out = tuple(a.astype(np.float32) if a.dtype.kind == "f" else a.astype(np.int64) if a.dtype.kind in "iu" else a
                for a in arrays)
    if isinstance(arr, (NamedArrays, NumberedArrays)):
        named = NamedArrays(zip(arr, out)) if isinstance(arr, NamedArrays) else NumberedArrays(out)
        named.path, named.what = path, what
        return named
    return out if isinstance(arr, tuple) else out[0]


def _torch_tensor_file(path: str, what: str, several: bool):
    """The inputs in a file written by ``torch.save``: a tensor, or (a model with several inputs) a tuple/list of
    tensors, or a dict holding them under ``x`` (``x0, x1, ...``). Read with ``weights_only=True``: tensors and
    containers only, no code runs."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- anything but tensors (a pickled module or object) is refused
        raise UserError(f"{what} file {path!r} is a PyTorch file (torch.save) that holds more than tensors "
                        f"({type(exc).__name__}); save the inputs as a tensor, torch.save(x, path), or with "
                        "numpy.save(path, x.numpy())") from None
    if isinstance(obj, dict):  # the .npz conventions: under "x", as "x0, x1, ...", or its only entry
        numbered = [obj.get(f"x{i}") for i in range(len(obj))]
        if "x" in obj:
            obj = obj["x"]
        elif numbered and all(isinstance(t, torch.Tensor) for t in numbered):
            obj = tuple(numbered) if len(numbered) > 1 else numbered[0]
        elif len(obj) == 1:
            obj = next(iter(obj.values()))
    if isinstance(obj, (tuple, list)) and len(obj) == 1 and isinstance(obj[0], torch.Tensor):
        obj = obj[0]  # torch.save((x,), path) for a model with one input

    def plain(t):  # sparse and quantized tensors as the dense float values they hold
        t = t.detach()
        if t.is_sparse or t.layout != torch.strided:
            t = t.to_dense()
        if t.is_quantized:
            t = t.dequantize()
        return (t.float() if t.is_floating_point() else t).numpy()

    try:
        if isinstance(obj, (tuple, list)) and several and len(obj) >= 2 and \
                all(isinstance(t, torch.Tensor) for t in obj):
            return tuple(plain(t) for t in obj)
        if isinstance(obj, torch.Tensor):
            return plain(obj)
    except (RuntimeError, TypeError) as exc:  # a nested tensor, a dtype numpy has no type for
        from .frontend import _first_line

        raise UserError(f"{what} file {path!r} holds a tensor numpy cannot read ({_first_line(exc)}); save the "
                        "inputs as a plain float tensor: torch.save(x.float(), path)") from None
    more = " (a model with several inputs: a tuple of tensors)" if several else ""
    raise UserError(f"{what} file {path!r} holds a {type(obj).__name__}, not a tensor of inputs{more}; save the "
                    "inputs with torch.save(x, path) (x of shape (N, ...)) or numpy.save(path, x.numpy())")


def _default_output(model: str, opts) -> str:
    stem = os.path.splitext(os.path.basename(model))[0] if os.path.exists(model) else model.split(":")[-1]
    return f"{stem}_{opts.file_suffix()}.onnx"


def _example_inputs(args, calib):
    import torch
    from .frontend import parse_input_shape

    if args.input_shape:
        gen = torch.Generator().manual_seed(0)
        tensors = tuple(torch.randn(parse_input_shape(text), generator=gen) for text in args.input_shape)
        return tensors[0] if len(tensors) == 1 else tensors
    if calib is not None:
        if isinstance(calib, tuple):
            return tuple(torch.from_numpy(a[:1]) for a in calib)
        return torch.from_numpy(calib[:1])
    needs = [flag for flag, on in (("--avg-wbits", getattr(args, "avg_wbits", None) is not None),
                                   ("--weight-rounding adaptive", getattr(args, "weight_rounding", "") == "adaptive"))
             if on]
    if needs:  # --input-shape alone would only lead to "needs calibration data" next
        raise UserError(f"{' and '.join(needs)} need{'s' if len(needs) == 1 else ''} calibration data: pass --calib "
                        "FILE (real inputs of the model, .npy/.npz)")
    raise UserError("no example input: pass --input-shape N,C,H,W (or --calib FILE)")


def _progress(done: int, total: int) -> None:
    """A calibration progress bar on stderr (redrawn in place on a terminal, one final line otherwise)."""
    width = 30
    filled = int(width * done / max(total, 1))
    line = f"  calibrating [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
    if sys.stderr.isatty():
        print("\r" + line, end="\n" if done >= total else "", file=sys.stderr, flush=True)
    elif done >= total:
        print(line, file=sys.stderr)


REPORT_ITEMS = 4  # report lines shown per pass without --verbose (a MobileNetV3's InsertQuantizers has 54)


def _print_timing(t, verbose: bool = False) -> None:
    flag = "changed" if t.modified else "no change"
    shown = t.report if verbose or len(t.report) <= REPORT_ITEMS else t.report[:REPORT_ITEMS - 1]
    more = len(t.report) - len(shown)
    extra = f"  [{'; '.join(shown)}{f'; ... {more} more (--verbose, --json)' if more else ''}]" if t.report else ""
    print(f"  {t.name:<30} {1000 * t.seconds:8.1f} ms  {flag}{extra}")  # the longest: DecomposeGroupedQueryAttention


# options that change nothing in an fp32 file (nothing is quantized), when given
_QUANT_ONLY = ("--bits", "--wbits", "--abits", "--wscheme", "--ascheme", "--per-tensor", "--calib-method", "--symmetric-levels",
               "--float-levels", "--no-bias-correction", "--weight-rounding", "--avg-wbits", "--no-int8-outputs", "--keep-first-last",
               "--float-downsample", "--exclude", "--config", "--int8-weights")


def _refuse_quant_only(args, argv) -> None:
    """With --scheme fp32, the quantization options given (by their flags) are refused: they would change nothing."""
    if args.scheme != "fp32":
        return
    given = [flag for flag in _QUANT_ONLY if any(a == flag or a.startswith(flag + "=") for a in argv)]
    if args.emit != "standard":
        given.append(f"--emit {args.emit}")
    if given:
        raise UserError(f"{', '.join(given)} cannot apply to --scheme fp32 (nothing is quantized); drop "
                        f"{'them' if len(given) > 1 else 'it'} or choose a quantized --scheme")


def cmd_compile(argv) -> int:
    args = _compile_parser().parse_args(argv)
    _check_leaf_modules(args)
    from .api import compile as qcompile_compile
    from .frontend import load_model

    bits = args.bits
    if args.output is not None and not args.output.strip():
        raise UserError("-o is empty; give a file name such as model.onnx (or leave -o out for the default name)")
    from .export import check_not_model_source, check_output_path, same_file
    from .options import CompileOptions

    opts = CompileOptions(scheme=args.scheme, bits=bits, wbits=args.wbits, abits=args.abits, wscheme=args.wscheme,
                          ascheme=args.ascheme, emit=args.emit, keep_first_last=args.keep_first_last,
                          calib_method=args.calib_method, int8_weights=args.int8_weights,
                          weight_rounding=args.weight_rounding, avg_wbits=args.avg_wbits,
                          per_channel=not args.per_tensor)  # fail on bad options before loading anything
    output = args.output or _default_output(args.model, opts)
    if args.no_validate:
        given = [flag for flag in ("--min-sqnr", "--min-top1") if getattr(args, flag[2:].replace("-", "_")) is not None]
        if given:
            raise UserError(f"{' and '.join(given)} cannot apply with --no-validate (nothing is checked); drop "
                            f"{'them' if len(given) > 1 else 'it'} or --no-validate")
    if args.symmetric_levels and opts.act_scheme not in ("apot", "pot", "log2") and not args.config:
        raise UserError(f"--symmetric-levels applies to APoT/PoT/log2 activations; the activations are "
                        f"{opts.act_scheme}: drop it")
    _refuse_quant_only(args, argv)
    if args.quiet and args.verbose:
        raise UserError("-q (--quiet) and -v (--verbose) ask for fewer and for more lines: give one of them")
    _check_not_an_input(args, output, "-o")  # first: "-o weights.pt is the model file" says more than its extension
    check_output_path(output)
    if args.json is not None:
        if not args.json.strip():
            raise UserError("--json is empty; give a file name such as summary.json")
        _check_not_an_input(args, args.json, "--json")
        check_output_path(args.json, what="--json", example="summary.json")
        if same_file(args.json, output):
            raise UserError(f"--json and -o name the same file {output!r}; give the summary another name")
    if args.data and args.no_validate:
        raise UserError("--data holds the inputs validation runs on, and --no-validate skips it; drop one of them")
    calib = load_array_file(args.calib, several=True) if args.calib else None
    held_out = load_array_file(args.data, "--data", several=True) if args.data else None
    model = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle)  # a missing file: say so first
    # arrays under forward's input names, or numbered x0, x1, ...: in forward's order
    inputs = forward_inputs(model)
    calib, held_out = resolve_named(calib, inputs), resolve_named(held_out, inputs)
    if calib is not None and args.scheme != "fp32":
        from .api import many_samples_note

        many = many_samples_note(calib[0] if isinstance(calib, tuple) else calib)
        if many:  # as the file is read: the compile it announces takes minutes
            print(f"qcompile: warning: {many}", file=sys.stderr)
    for path, flag in ((output, "-o"), (args.json, "--json")):
        if path is not None:
            check_not_model_source(model, path, flag, specs=(args.model, args.arch))
    example = _example_inputs(args, calib if calib is not None else held_out)
    if isinstance(calib, tuple):  # x0, x1 for a model with one input: the model's count first (the message below
        # asked for a second --input-shape, which the model then refused)
        from .api import check_input_count

        check_input_count(model, len(calib), "calibration arrays (x0, x1, ... in --calib)")
    if args.input_shape and calib is not None and \
            len(args.input_shape) != (len(calib) if isinstance(calib, tuple) else 1):
        raise UserError(f"{len(args.input_shape)} --input-shape for "
                        f"{len(calib) if isinstance(calib, tuple) else 1} input(s) in --calib; give one per input")
    validation_inputs = held_out
    if held_out is not None and calib is not None and isinstance(held_out, tuple) != isinstance(calib, tuple):
        raise UserError(f"--data holds {len(held_out) if isinstance(held_out, tuple) else 1} input array(s) and --calib "
                        f"{len(calib) if isinstance(calib, tuple) else 1}; give both in the same form (x0, x1, ... "
                        "of a .npz for a model with several inputs)")
    if calib is None and held_out is None and not args.no_validate:
        import torch
        gen = torch.Generator().manual_seed(1)
        examples = example if isinstance(example, tuple) else (example,)
        validation_inputs = tuple(torch.randn((16,) + tuple(t.shape[1:]), generator=gen) for t in examples)
        validation_inputs = validation_inputs[0] if len(validation_inputs) == 1 else validation_inputs
    from .qat import config_of

    trained = config_of(model)  # a QAT-trained model compiles with the options it was trained with, not the defaults
    described = f"{trained.options.describe()}, QAT-trained" if trained is not None else opts.describe()
    print(f"qcompile: {args.model} -> {output} ({described})")
    thresholds = {k: v for k, v in (("min_sqnr", args.min_sqnr), ("min_top1", args.min_top1)) if v is not None}
    # (option, value, given on the command line): a model trained with qcompile.qat fixes the pass options, and
    # compile refuses a value that differs from the trained one, so those left at their defaults are not passed
    parser = _compile_parser()
    chosen = [
        ("wbits", args.wbits, args.wbits is not None), ("abits", args.abits, args.abits is not None),
        ("wscheme", args.wscheme, args.wscheme is not None), ("ascheme", args.ascheme, args.ascheme is not None),
        ("per_channel", not args.per_tensor, args.per_tensor),
        ("calib_method", args.calib_method, args.calib_method != parser.get_default("calib_method")),
        ("asym_levels", not args.symmetric_levels, args.symmetric_levels),
        ("int8_levels", not args.float_levels, args.float_levels), ("fold_bn", not args.no_fold_bn, args.no_fold_bn),
        ("equalize", not args.no_equalize, args.no_equalize),
        ("bias_correction", not args.no_bias_correction, args.no_bias_correction),
        ("weight_rounding", args.weight_rounding, args.weight_rounding != parser.get_default("weight_rounding")),
        ("avg_wbits", args.avg_wbits, args.avg_wbits is not None),
        ("int8_outputs", not args.no_int8_outputs, args.no_int8_outputs),
        ("keep_first_last", args.keep_first_last, args.keep_first_last != parser.get_default("keep_first_last")),
        ("float_downsample", args.float_downsample, args.float_downsample), ("exclude", tuple(args.exclude), bool(args.exclude)),
        ("config", args.config, args.config is not None)]
    qat_trained = trained is not None
    options = {name: value for name, value, given in chosen if given or not qat_trained}
    named = {a.split("=")[0] for a in argv}
    scheme = args.scheme if "--scheme" in named or not qat_trained else None
    bits = bits if "--bits" in named or not qat_trained else None
    result = qcompile_compile(
        model, example, scheme=scheme, bits=bits, calib=calib, output=output,
        validate=not args.no_validate, validation_inputs=validation_inputs,
        callback=None if args.quiet else (lambda t: _print_timing(t, args.verbose)),
        progress=None if args.quiet else _progress,
        thresholds=thresholds, emit=args.emit, check=args.check, leaf_modules=tuple(args.leaf_module),
        int8_weights=args.int8_weights, dynamic_axes=args.dynamic_axes, **options,
    )
    _print_summary(result, real_inputs=calib is not None or held_out is not None, quiet=args.quiet)
    for note in _notes(result):
        if note:
            print(f"qcompile: warning: {note}", file=sys.stderr)
    if args.json:
        from .export import write_text_atomic

        write_text_atomic(json.dumps(json_safe(summary_dict(result)), indent=2, allow_nan=False), args.json)
    if result.report is not None and not result.report.passed:  # the verdict is printed above
        raise ValidationFailed("; ".join(result.report.failures))
    return 0


def _check_not_an_input(args, path: str, flag: str) -> None:
    """Refuse an output path that names one of the run's input files (it would be overwritten)."""
    from .export import same_file

    inputs = [("the model file", args.model), ("the --calib file", args.calib), ("the --config file", args.config),
              ("the --data file", getattr(args, "data", None))]
    for what, given in inputs:
        if given and os.path.exists(given) and same_file(path, given):
            raise UserError(f"{flag} {path!r} is {what}; writing there would overwrite it: choose another {flag} path")


def json_safe(value):
    """``value`` with non-finite floats as strings (``qcompile.runtime.validation.json_safe``, imported when used:
    ``qcompile --help`` does not load torch)."""
    from qcompile.runtime.validation import json_safe as safe

    return safe(value)


def _notes(result) -> list[str]:
    """The compile's warnings, which the CLI prints to stderr and lists under ``warnings`` in ``--json`` (from
    Python they are QuantizationWarnings, which the CLI silences: the layer table shows the rest)."""
    from .options import int8_grid_note

    notes = (int8_grid_note(result.options, result.model),) + tuple(
        result.summary.get(key) for key in ("data_shift_note", "few_samples_note", "first_last_note", "level_note",
                                          "calib_note", "numbers_note", "shift_add_note", "unused_inputs_note",
                                          "constant_output_note", "output_rank_note", "mixed_precision_note",
                                          "time_first_note", "dynamic_axes_note", "batchnorm_note",
                                          "frozen_branch_note"))
    return [note for note in notes if note]


def summary_dict(result) -> dict:
    return {
        "onnx_path": result.onnx_path,
        "options": {k: v for k, v in vars(result.options).items()},
        "seconds": result.seconds,
        "file_bytes": os.path.getsize(result.onnx_path) if result.onnx_path else None,
        "passes": [{"name": t.name, "ms": 1000 * t.seconds, "modified": t.modified, "report": t.report}
                   for t in result.timings],
        "validation": result.report.to_dict() if result.report else None,
        "warnings": _notes(result),
        **result.summary,
    }


def _print_summary(result, real_inputs: bool = False, quiet: bool = False) -> None:
    from .api import quality_warning
    from .summary import layer_lines

    for line in ([] if quiet else layer_lines(result.model)):
        print(line)
    for line in result.summary.get("lines", []):
        print(line)
    if result.onnx_path:
        size = os.path.getsize(result.onnx_path)
        took = result.summary.get("validation_seconds")
        print(f"wrote {result.onnx_path} ({size / 1024:.1f} KiB) in {result.seconds:.2f} s"
              f"{f' (validation {took:.2f} s)' if took is not None else ''}")
    if result.report is not None:
        line = float_line(result.report, random_inputs=not real_inputs)
        if line:
            print(line)
        print(result.report.summary())
    line = dynamic_line(result.summary.get("dynamic_axes"))
    if line:
        print(line)
    quality = quality_warning(result.report, result.model, getattr(result.options, "calib_method", None)) \
        if real_inputs else None  # random inputs have no classes, nor the calibrated ranges
    if quality:
        print(f"qcompile: warning: {quality}", file=sys.stderr)


def dynamic_line(entry) -> str:
    """The check of --dynamic-axes in one line: the shapes it ran, the file against its simulation there."""
    if not entry:
        return ""
    shapes = ", ".join("x".join(map(str, s)) for s in entry["checked_inputs"])
    sq = entry.get("sqnr_db")
    also = "; ".join(", ".join("x".join(map(str, s)) for s in probe) for probe in entry.get("also_checked", []))
    text = (f"dynamic axes {','.join(map(str, entry['axes']))}: checked at inputs {shapes} (twice the example's "
            f"size){f' and {also}' if also else ''}: file vs simulation SQNR "
            f"{'inf' if sq is None or math.isinf(sq) else f'{sq:.1f} dB'}")
    if entry.get("code_mismatch") is not None:
        text += f", codes differing {100 * entry['code_mismatch']:.4f}%"
    if entry.get("sqnr_vs_float_db") is not None:
        text += f"; vs the float model {entry['sqnr_vs_float_db']:.1f} dB"
    refused = entry.get("odd_size_refused_by_model")
    if refused:
        text += (f"; not at the odd size {', '.join('x'.join(map(str, s)) for s in refused)}, which the model itself "
                 "refuses")
    return text


def float_line(report, random_inputs: bool = False) -> str:
    """What quantization costs against the float model: output SQNR (and top-1 agreement) of the file, and the
    quantizers whose outputs are furthest from their float values. Validation compares the file with the
    simulation; this line is where a large loss shows (a per-tensor input quantizer on unnormalised features)."""
    sq = report.extra.get("sqnr_vs_float_db")
    if sq is None:
        return ""
    which = report.extra.get("sqnr_vs_float_output")
    # normal noise, not the model's data: a digits CNN's file at 96 % held-out accuracy (as float) read 7.7 dB here
    where = (" on random N(0, 1) inputs (no --calib: not the model's data, so this says little of its accuracy; "
             "--calib/--data gives a real figure)") if random_inputs else ""
    text = f"vs the float model{where}: output{'' if which is None else f' {which} (the lowest)'} SQNR " + (
        "inf" if math.isinf(sq) else f"{sq:.1f} dB")
    if report.extra.get("top1_vs_float") is not None:
        of = report.extra.get("top1_vs_float_output")
        text += f", top-1 agreement{'' if of is None else f' (output {of})'} {100 * report.extra['top1_vs_float']:.2f}%"
    layers = [(l["quantizer"] + (f" ({l['where']})" if l.get("where") else ""), l["sqnr_vs_float_db"])
              for l in report.layers or []
              if l.get("sqnr_vs_float_db") is not None and math.isfinite(l["sqnr_vs_float_db"])]
    if layers:
        worst = sorted(layers, key=lambda t: t[1])[:3]
        text += "; lowest quantizer SQNR " + ", ".join(f"{q} {v:.1f} dB" for q, v in worst)
    # where the error enters: each quantizer's output against its own input (the SQNR above accumulates downstream)
    own = [(l["quantizer"] + (f" ({l['where']})" if l.get("where") else ""), l["own_sqnr_db"])
           for l in report.layers or []
           if l.get("own_sqnr_db") is not None and math.isfinite(l["own_sqnr_db"])]
    if own:
        q, v = min(own, key=lambda t: t[1])
        text += f"; lowest own SQNR (its rounding and clipping alone) {q} {v:.1f} dB"
    return text


def cmd_validate(argv) -> int:
    args = _validate_parser().parse_args(argv)
    _check_leaf_modules(args)
    from .validate_cli import validate_against

    report = validate_against(args)
    line = float_line(report, random_inputs=not args.data)
    if line:
        print(line)
    print(report.summary())
    if args.data:  # as the compile warns: 39 % agreement with the float model on --data passed without a word
        from .api import quality_warning

        quality = quality_warning(report)
        if quality:  # here the --data may be what is off (x10 data read as a calibration problem)
            print(f"qcompile: warning: {quality}; and check that --data is preprocessed as the --calib data were",
                  file=sys.stderr)
    if not report.passed:
        raise ValidationFailed("; ".join(report.failures))
    return 0


def cmd_demo(argv) -> int:
    args = _demo_parser().parse_args(argv)
    _refuse_quant_only(args, argv)
    from .demo import run_demo

    return run_demo(scheme=args.scheme, bits=args.bits, output=args.output, emit=args.emit, wbits=args.wbits,
                    abits=args.abits, wscheme=args.wscheme, ascheme=args.ascheme, exclude=tuple(args.exclude),
                    int8_weights=args.int8_weights)


_NUMBER_OPTIONS = ("--min-sqnr", "--max-abs", "--min-top1")


def _glue_negative_values(argv: list[str]) -> list[str]:
    """``--min-sqnr -inf`` as ``--min-sqnr=-inf``: argparse takes a value starting with ``-`` that is not a plain
    negative number (``-inf``, ``-1e3``) for an option and stops with "expected one argument"."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _NUMBER_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            try:
                float(argv[i + 1])
            except ValueError:
                pass
            else:
                out.append(f"{argv[i]}={argv[i + 1]}")
                i += 2
                continue
        if argv[i] == "--input-shape" and i + 1 < len(argv) and argv[i + 1][:2].rstrip("0123456789") == "-":
            # -1,3,224,224 (ONNX's dynamic batch): "expected one argument"; glued, parse_input_shape says what to give
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


class _Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, a cancelled CI job), raised where the process is so that the atomic writes
    remove their temporary files, as on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _raised_by_argparse(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside argparse (``--help``, a usage error it printed)."""
    tb = exc.__traceback__
    while tb is not None:
        if os.path.basename(tb.tb_frame.f_code.co_filename) == "argparse.py":
            return True
        tb = tb.tb_next
    return False


def main(argv=None) -> int:
    import signal

    try:  # only the main thread may set handlers
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        previous = None
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _ClosedPipeSafe:
    """stdout that keeps the run going when its reader has gone (``qcompile ... | head -1``): the first
    BrokenPipeError points the descriptor at /dev/null and later writes go nowhere. The compile aborted there with
    "internal error: BrokenPipeError" and wrote no file."""

    def __init__(self, stream):
        self._stream = stream
        self._closed_pipe = False

    def _gone(self) -> None:
        self._closed_pipe = True
        try:  # the interpreter flushes stdout at exit too: quietly, into /dev/null
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def write(self, text):
        if not self._closed_pipe:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._gone()
        return len(text)

    def flush(self):
        if not self._closed_pipe:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._gone()

    def __getattr__(self, name):  # isatty, fileno, encoding, reconfigure, ...
        return getattr(self._stream, name)


def _main(argv=None) -> int:
    saved = sys.stdout
    if not isinstance(sys.stdout, _ClosedPipeSafe):
        sys.stdout = _ClosedPipeSafe(sys.stdout)
    try:
        return _run(argv)
    finally:
        if sys.stdout is not saved and isinstance(sys.stdout, _ClosedPipeSafe):
            sys.stdout.flush()
            sys.stdout = saved


def _run(argv=None) -> int:
    argv = _glue_negative_values(list(sys.argv[1:] if argv is None else argv))
    commands = {"validate": cmd_validate, "demo": cmd_demo}
    debug = os.environ.get("QCOMPILE_DEBUG") == "1"
    import warnings

    from .errors import QuantizationWarning

    warnings.filterwarnings("ignore", category=QuantizationWarning)  # the layer table shows what it would say
    for stream in (sys.stdout, sys.stderr):  # an ASCII-only terminal and a path like "é.onnx": not an internal error
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        if not argv:
            _compile_parser().print_help()
            return 2
        return cmd_compile(argv)
    except SystemExit as exc:  # --help, argparse's errors (it printed them) ...
        if not _raised_by_argparse(exc):  # ... or the model's own code: a forward that calls sys.exit ended with
            # exit status 0 and no file, or 2 and no word
            code = exc.code if exc.code is None or isinstance(exc.code, int) else repr(str(exc.code))
            print(f"qcompile: error: the model's code exited (sys.exit({code})) while qcompile ran it; remove that "
                  "sys.exit from its forward (or the code forward calls)", file=sys.stderr)
            return UserError.exit_code
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except UserError as exc:
        print(f"qcompile: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except ValidationFailed as exc:
        print(f"qcompile: validation failed{': ' + exc.args[0] if exc.args and exc.args[0] else ''}",
              file=sys.stderr)
        return ValidationFailed.exit_code
    except KeyboardInterrupt:
        print("qcompile: interrupted (files are written whole or not at all)", file=sys.stderr)
        return 130
    except _Terminated:
        print("qcompile: terminated (files are written whole or not at all)", file=sys.stderr)
        return 143
    except Exception as exc:  # a bug in qcompile, not a user mistake: still one line unless debugging
        if _out_of_memory(exc):
            # validate's inputs are --samples random ones or --data: --calib is compile's option
            fix = ("fewer --samples (or a --data file with fewer samples) or a smaller model" if argv and
                   argv[0] == "validate" else "a smaller --input-shape, fewer --calib samples or a smaller model")
            print(f"qcompile: error: out of memory; use {fix}", file=sys.stderr)
            return UserError.exit_code
        return _internal_error(exc, debug)


def _out_of_memory(exc: BaseException) -> bool:
    """A MemoryError, or torch's allocation failure (a RuntimeError, possibly wrapped by a pass)."""
    if isinstance(exc, MemoryError) or isinstance(getattr(exc, "__cause__", None), MemoryError):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "not enough memory" in text or "DefaultCPUAllocator" in text


def _internal_error(exc: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    else:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"qcompile: internal error: {type(exc).__name__}: {first} (set QCOMPILE_DEBUG=1 for the traceback "
              "and report it)", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
