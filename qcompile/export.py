"""Export a (possibly quantized) fx graph to ONNX, and write files atomically.

A graph made only of common layers is written straight from its fx nodes (``qcompile.fx_onnx``: the file the
TorchScript exporter gives, in a millisecond); any other graph is exported with ``torch.onnx.export``
(TorchScript-based exporter, where quantizer modules emit their own ONNX through ``symbolic``); batch dimension
dynamic either way. ONNX-level passes (quantization emission,
shift-add lowering) then run on the ``onnx.ModelProto``; the file is checked with
``onnx.checker.check_model(full_check=True)`` and written to a temporary file that is renamed into place, so an
interrupted run never leaves a half-written ``.onnx``.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import warnings
from typing import Optional, Sequence

import numpy as np
import onnx
import torch
import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata

from .errors import UserError

DEFAULT_OPSET = 20  # the TorchScript exporter's newest; emission raises quantized files to 21 (INT4/UINT4)


def same_file(a: str, b: str) -> bool:
    a, b = os.path.abspath(a), os.path.abspath(b)
    if a == b or os.path.realpath(a) == os.path.realpath(b):  # a symlink to the other, existing yet or not
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_not_model_source(model, path: str, flag: str, specs=()) -> None:
    """Refuse an output path that names the Python source of the model's code (the ``--arch`` or spec module, or
    the module of any of its layers): the ONNX bytes replaced the user's ``models.py`` and the next compile failed
    with "source code string cannot contain null bytes". (A factory that builds torch.nn layers only left its own
    module unchecked: the spec's module is checked by name.)"""
    import sys

    seen = set()
    names = [str(spec).partition(":")[0] for spec in specs if isinstance(spec, str) and ":" in spec]
    names += [spec.__module__ for spec in specs if callable(spec) and isinstance(getattr(spec, "__module__", None), str)]
    for name in names + [type(m).__module__ for m in model.modules()]:
        if name in seen:
            continue
        seen.add(name)
        source = getattr(sys.modules.get(name), "__file__", None)
        if source and os.path.exists(source) and same_file(path, source):
            raise UserError(f"{flag} {path!r} is the source file of the model's module {name!r}; writing there "
                            f"would overwrite it: choose another {flag} path (such as model.onnx)")


# extensions of other formats, refused for an ONNX output (other names, .onnx or none, are the user's choice)
_OTHER_FORMATS = {".pt": "a PyTorch checkpoint", ".pth": "a PyTorch checkpoint", ".pt2": "a torch.export archive",
                  ".ckpt": "a checkpoint", ".safetensors": "a safetensors file", ".npy": "a numpy array",
                  ".npz": "a numpy archive", ".py": "Python source", ".json": "a JSON file", ".toml": "a TOML file",
                  ".yaml": "a YAML file", ".yml": "a YAML file"}


def check_output_path(path: str, what: str = "-o", example: str = "model.onnx") -> str:
    """Fail early, before any work, when ``path`` cannot be written."""
    if path.endswith(("/", os.sep)):  # "newdir/" named a folder; the file would be written as "newdir"
        raise UserError(f"output path {path!r} ends with a slash (a folder); give a file name such as {example}")
    if path == "-" or path in ("/dev/stdout", "/dev/stderr") or path.startswith(("/dev/fd/", "/proc/self/fd/")) or \
            re.match(r"/proc/\d+/fd/", path):
        # "-" wrote a file named "-"; /dev/stdout redirected to a file had the atomic rename replace that file (the
        # lines printed before lost), and into a pipe it said "cannot write in '/proc/<pid>/fd'"
        raise UserError(f"{what} {path!r} names a standard stream, not a file: qcompile writes its outputs whole "
                        f"(atomically) by name; give a file name such as {example}")
    ext = os.path.splitext(path)[1].lower()
    if example.endswith(".onnx") and ext in _OTHER_FORMATS:
        # -o model.pt wrote ONNX bytes under a checkpoint's name: torch.load of it then failed far from the cause
        raise UserError(f"{what} {path!r} ends in {ext}, the extension of {_OTHER_FORMATS[ext]}, but qcompile "
                        f"writes an ONNX file there; give a name ending in .onnx, such as {example}")
    path = os.path.abspath(path)
    if os.path.islink(path):  # write the file the link names (the rename would replace the link itself)
        path = os.path.realpath(path)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise UserError(f"output path {path!r} is a directory; give a file name such as {example}")
    if os.path.exists(path) and not os.path.isfile(path):
        # a device, a fifo, a socket: the atomic rename would put a regular file in its place (as root, -o /dev/null
        # replaced /dev/null)
        raise UserError(f"output path {path!r} is a device, fifo or socket, not a regular file; give a file name such "
                        f"as {example}")
    if os.path.exists(folder) and not os.path.isdir(folder):  # -o calib.npy/model.onnx: "create it" could not be done
        raise UserError(f"output folder {folder!r} is a file, not a folder; choose another {what} path")
    if not os.path.isdir(folder):
        raise UserError(f"output folder {folder!r} does not exist; create it or choose another {what} path")
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder {folder!r} is not writable; choose another {what} path")
    try:  # access() can say yes where creating a file fails (/proc, a read-only mount seen by root)
        fd, probe = tempfile.mkstemp(prefix=".qcompile-", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write in {folder!r} ({exc.strerror or exc}); choose another {what} path") from None
    return path


def input_names_for(n: int, gm: Optional[torch.nn.Module] = None) -> list[str]:
    """The file's input names: ``input`` for one input; for several, ``forward``'s parameter names (the
    placeholders of the traced ``gm``: ``input_ids``, ``attention_mask``, as torch.onnx.export names them) where
    they are distinct identifiers that no output or attribute of the module is called, else ``input_0``,
    ``input_1``, ... (also for the ``arg<k>`` the tracer gives the inputs of a ``forward(self, *args)``)."""
    import re

    fallback = ["input"] if n == 1 else [f"input_{i}" for i in range(n)]
    if n == 1 or not isinstance(gm, torch.fx.GraphModule):
        return fallback
    from .frontend import INPUT_NAMES

    names = [str(node.target) for node in gm.graph.nodes if node.op == "placeholder"]
    spelled = gm.meta.get(INPUT_NAMES)  # as forward spells them: torch.fx renames an input called input to input_1
    if isinstance(spelled, list) and len(spelled) == len(names):
        names = spelled
    if len(names) != n or len(set(names)) != n:
        return fallback
    # what the file's tensors may be named after: the module's own parameters, buffers, submodules and attributes
    # read by the graph (hasattr(gm, name) also took GraphModule's own attributes: forward(image, meta) and inputs
    # called training or type had input_0, input_1 where README promised forward's names)
    own = {str(node.target).split(".")[0] for node in gm.graph.nodes if node.op in ("get_attr", "call_module")}
    own |= {k for k, _ in gm.named_children()} | {k for k, _ in gm.named_parameters(recurse=False)} | \
        {k for k, _ in gm.named_buffers(recurse=False)}
    for name in names:
        if not name.isidentifier() or re.fullmatch(r"arg\d+|output(_\d+)?", name) or name in own:
            return fallback
    return names


def record_input_names(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Record all of ``forward``'s input names in a file with several inputs (``runtime.session.INPUTS_KEY``): an
    input ``forward`` never reads is not in the file, and the validator finds which arrays the others take."""
    import json

    from qcompile.runtime.session import INPUTS_KEY

    for prop in list(model.metadata_props):
        if prop.key == INPUTS_KEY:
            model.metadata_props.remove(prop)
    if len(names) > 1:
        model.metadata_props.add(key=INPUTS_KEY, value=json.dumps(list(names), separators=(",", ":")))


def recorded_input_names(model: onnx.ModelProto, n: int) -> list[str]:
    """The names :func:`record_input_names` recorded in ``model`` (``n`` inputs), else :func:`input_names_for`'s."""
    from qcompile.runtime.session import recorded_inputs

    names = recorded_inputs(model)
    return names if names is not None and len(names) == n else input_names_for(n)


def export_onnx(gm: torch.nn.Module, example_inputs: Sequence[torch.Tensor], opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True) -> onnx.ModelProto:
    """Export ``gm`` to an in-memory ONNX model (nothing is written to disk). ``example_inputs``: one tensor per
    model input (a single tensor is the one input, not a sequence of its rows)."""
    from qcompile.emit import _require_module

    _require_module(gm, "export_onnx")
    example_inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if isinstance(gm, torch.fx.GraphModule):
        _check_input_count(gm, example_inputs)
    if isinstance(gm, torch.fx.GraphModule) and any(hasattr(m, "prepare_export") for m in gm.modules()):
        from qcompile.passes.quantize_bias import off_grid_biases

        off = off_grid_biases(gm)
        if off:
            raise RuntimeError(f"the bias of {', '.join(off[:3])}{' ...' if len(off) > 3 else ''} is not on its "
                               "accumulator grid S_x*S_w, where onnxruntime rounds it when it loads the file: run "
                               "the QuantizeBias pass after Calibrate and after every pass that moves biases or ranges "
                               "(BiasCorrection, PairSafeInt8Weights): qcompile.pipeline.build_passes gives the full "
                               "order")
    from .fx_onnx import export_fx

    in_names = input_names_for(len(example_inputs), gm)
    fast = export_fx(gm, example_inputs, opset, dynamic_batch)  # common layers only; None: use torch.onnx.export
    if fast is not None:
        record_input_names(fast, in_names)
        return fast
    _check_dict_keys(gm)
    gm = exact_nearest_resizes(gm)
    n_out = _output_count(gm, example_inputs)
    out_names = _dict_output_names(gm, n_out, in_names) or \
        (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in in_names + out_names}
    buf = io.BytesIO()
    # the qcompile domain only where quantizers export their markers (else torch warns that it is unused)
    opsets = {"qcompile": 1} if any(hasattr(m, "prepare_export") for m in gm.modules()) else None
    try:
        with warnings.catch_warnings(record=True) as caught, _output_unless_failed(), _softplus_with_threshold(opset):
            warnings.simplefilter("always")
            torch.onnx.export(
                gm, example_inputs, buf, opset_version=opset, input_names=in_names, output_names=out_names,
                dynamic_axes=dynamic_axes, do_constant_folding=True, dynamo=False, custom_opsets=opsets,
            )
    except torch.onnx.errors.OnnxExporterError as e:  # SymbolicValueError, UnsupportedOperatorError
        raise UserError(_export_error_message(e)) from e
    except AssertionError as e:  # a symbolic function's own refusal ("conversion of ... not implemented if ...")
        if "not implemented" in str(e):
            raise UserError(_export_error_message(e)) from e
        if not _raised_in_torch_onnx(e):
            raise
        _exporter_failed(e)  # a symbolic function's check ("All tensors must have the same rank")
    except (RuntimeError, AttributeError, TypeError, IndexError, KeyError) as e:
        # torch.onnx's TorchScript exporter failing inside on what the model does (pack_padded_sequence in a module
        # kept whole: "vector::_M_range_check"; a dataclass output: "'Graph' object has no attribute 'outputs'")
        if not _raised_in_torch_onnx(e):
            raise
        _exporter_failed(e)
    _warn_frozen_branches(caught, gm)
    # parsed from the buffer itself: getvalue() copied the file once more while the buffer held it (BERT-base's
    # export peaked at three times its weights)
    model = onnx.ModelProto()
    view = buf.getbuffer()
    try:
        model.ParseFromString(view)
    finally:
        view.release()
    buf.close()
    record_input_names(model, in_names)
    return fold_constant_shapes(explicit_same_pads(model))


# ops on small constants that torch.onnx leaves unfolded: F.pad with reflect/replicate padding writes its pads as
# Constant -> ConstantOfShape/Concat -> Reshape -> Slice -> Transpose -> Reshape -> Cast
_SHAPE_OPS = {"Concat", "ConstantOfShape", "Reshape", "Slice", "Transpose", "Cast", "Unsqueeze", "Squeeze", "Gather"}
_FOLD_MAX = 1024  # elements: only shapes and pads, never a weight-sized tensor


def fold_constant_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Compute the ``_SHAPE_OPS`` nodes whose inputs are all constants (initializers or ``Constant`` nodes) and
    store their small results as initializers. torch.onnx writes a reflect/replicate ``F.pad``'s pads as such a
    chain of ten nodes: ONNX shape inference then knew no shape past the ``Pad``, so the shift-add lowering left the
    convolution after it unlowered (a PoT-4 conv kept its multiplications) and the cost table printed "?"; the
    file also carried the chain. onnxruntime folds the same constants when it loads the file, so it computes the
    same values."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known = {t.name: t for t in graph.initializer}
    constants = {}  # Constant node outputs -> their value
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and int(np.prod(value.dims)) <= _FOLD_MAX:
                constants[node.output[0]] = value
    if not constants:
        return model

    def value(name):
        t = known.get(name) if name in known else constants.get(name)
        return None if t is None else numpy_helper.to_array(t)

    keep, added = [], []
    for node in graph.node:
        if node.op_type in _SHAPE_OPS and node.domain in ("", "ai.onnx") and len(node.output) == 1 and \
                all(i in known or i in constants for i in node.input if i):
            feeds = {i: value(i) for i in node.input if i}
            if all(v is not None and v.size <= _FOLD_MAX for v in feeds.values()):
                try:
                    out = ReferenceEvaluator(node).run(None, feeds)[0]
                except Exception:  # noqa: BLE001 -- an op the reference evaluator does not run: left in the graph
                    out = None
                if out is not None and np.asarray(out).size <= _FOLD_MAX:
                    t = numpy_helper.from_array(np.asarray(out), node.output[0])
                    known[node.output[0]] = t
                    added.append(t)
                    continue
        keep.append(node)
    if not added:
        return model
    read = {i for n in keep for i in n.input} | {o.name for o in graph.output}

    def subgraph_reads(nodes) -> set:  # inputs of subgraphs (If/Loop bodies, nested) read from the outer scopes
        found = set()
        for n in nodes:
            for a in n.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    found |= {i for sub in g.node for i in sub.input} | subgraph_reads(g.node)
        return found

    read |= subgraph_reads(keep)
    nodes = [n for n in keep if not (n.op_type == "Constant" and n.output[0] in constants and n.output[0] not in read)]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(t for t in added if t.name in read)
    return model


def _exporter_failed(e: BaseException) -> None:
    """torch.onnx's TorchScript exporter failing inside on what the model does, as one line."""
    first = " ".join(str(e).split())[:200] or type(e).__name__
    module = _failing_module(e)
    where = f" in {module}" if module else ""
    op = re.search(r"Occurred when translating (\w+)", str(e))
    if op:  # the symbolic function of one operator failed (VOLO's F.fold, aten::col2im, on sizes computed from shapes)
        cause = first.split(" (Occurred when translating")[0]
        raise UserError(f"torch.onnx cannot export this model: its conversion of aten::{op.group(1)}{where} failed "
                        f"({type(e).__name__}: {cause}); replace that operation in the model with operations "
                        "torch.onnx exports, or give its size arguments as Python ints rather than values computed "
                        "from tensor shapes") from e
    if module and "has no attribute 'outputs'" not in first and "_M_range_check" not in first:
        # a torch.nn module the exporter cannot trace (MaxUnpool2d's size check): the words on dataclass outputs and
        # packed sequences led elsewhere
        raise UserError(f"torch.onnx's exporter failed on this model{where} ({type(e).__name__}: {first}); replace "
                        "that module with tensor operations torch.onnx exports, or keep it out of the compiled "
                        "model (compile the parts before and after it)") from e
    raise UserError(f"torch.onnx's exporter failed on this model{where} ({type(e).__name__}: {first}); it exports "
                    "tensor operations returning tensors, tuples, lists or dicts: return those (not a dataclass; "
                    "return_dict=False for HuggingFace models) and replace what it cannot export (packed "
                    "sequences: pass padded ones)") from e


def _raised_in_torch_onnx(e: BaseException) -> bool:
    """The innermost Python frame of the traceback is in torch.onnx or torch.jit (the exporter), not qcompile; or
    in torch itself while the exporter traces a torch.nn module (``MaxUnpool2d``'s output-size check: "cond must be
    a bool, but got a Tensor")."""
    files = []
    tb = e.__traceback__
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename.replace("\\", "/"))
        tb = tb.tb_next
    if not files:
        return False
    if any(part in files[-1] for part in ("/torch/onnx/", "/torch/jit/")):
        return True
    return "/torch/" in files[-1] and "/qcompile/" not in files[-1] and any("/torch/onnx/" in f for f in files) \
        and any("/torch/nn/" in f for f in files)


def _failing_module(e: BaseException) -> str:
    """The class of the innermost torch.nn module whose ``forward`` was running when ``e`` was raised, if any."""
    found = ""
    tb = e.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self") if tb.tb_frame.f_code.co_name == "forward" else None
        if isinstance(owner, torch.nn.Module) and not isinstance(owner, torch.fx.GraphModule):
            found = type(owner).__name__
        tb = tb.tb_next
    return found


def _softplus_symbolic(g, x, beta, threshold):
    """``aten::softplus`` with its threshold: PyTorch returns ``x`` where ``x·beta > threshold``; torch.onnx's own
    symbolic writes ``Softplus(x·beta)/beta`` everywhere (``nn.Softplus(threshold=1)``: 1.32 for 1.01 at x = 1.01;
    the file failed validation at 55 dB in fp32). From the default threshold 20 up the difference is below float32
    rounding (log1p(exp(-20)) ~ 2e-9), and the file is written as before."""
    from torch.onnx import symbolic_helper

    beta_c = symbolic_helper._maybe_get_const(beta, "f")
    thr = symbolic_helper._maybe_get_const(threshold, "f")
    scaled = x if beta_c == 1 else g.op("Mul", x, beta)
    soft = g.op("Softplus", scaled)
    if beta_c != 1:
        soft = g.op("Div", soft, beta)
    if not isinstance(thr, (int, float)) or thr >= 20:
        return soft
    limit = g.op("Constant", value_t=torch.tensor(float(thr), dtype=torch.float32))
    return g.op("Where", g.op("Greater", scaled, limit), x, soft)


_NEAREST_MODES = ("nearest", "nearest-exact")


def _nearest_resize_args(gm, node):
    """``(input node, spatial sizes, interpolate keyword arguments)`` of a nearest ``F.interpolate`` /
    ``nn.Upsample`` whose input has static recorded spatial sizes, else None."""
    import torch.nn.functional as F

    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, torch.nn.Upsample) or mod.mode not in _NEAREST_MODES or len(node.args) != 1 \
                or node.kwargs:
            return None
        kwargs = {"size": mod.size, "scale_factor": mod.scale_factor, "mode": mod.mode,
                  "recompute_scale_factor": getattr(mod, "recompute_scale_factor", None)}
    elif node.op == "call_function" and node.target is F.interpolate and node.args:
        names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
        given = dict(zip(names, node.args))
        given.update(node.kwargs)
        if given.get("mode", "nearest") not in _NEAREST_MODES or given.get("antialias"):
            return None
        kwargs = {k: given.get(k) for k in ("size", "scale_factor", "recompute_scale_factor")}
        kwargs["mode"] = given.get("mode", "nearest")
    else:
        return None
    x = node.args[0]
    meta, out_meta = getattr(x, "meta", {}).get("tensor_meta"), node.meta.get("tensor_meta")
    shape, out_shape = getattr(meta, "shape", None), getattr(out_meta, "shape", None)
    if shape is None or out_shape is None or len(shape) not in (3, 4, 5) or len(out_shape) != len(shape):
        return None
    dims = len(shape) - 2
    if isinstance(kwargs["size"], torch.fx.Node) or (isinstance(kwargs["size"], (tuple, list)) and
                                                     any(isinstance(v, torch.fx.Node) for v in kwargs["size"])):
        kwargs["size"] = tuple(int(v) for v in out_shape[2:])  # read from the input's shape: the traced sizes
    if kwargs["size"] is None and (kwargs["scale_factor"] is None or isinstance(kwargs["scale_factor"], torch.fx.Node)):
        return None
    return x, [int(v) for v in shape[2:]], kwargs, dims


def exact_nearest_resizes(gm: torch.nn.Module) -> torch.nn.Module:
    """``gm`` for export, with each nearest resize whose output/input ratio is no integer written as
    ``index_select`` along each spatial axis with PyTorch's own source indices (ONNX ``Gather``); ``gm`` itself
    unchanged (the graph is copied; modules are shared). ONNX ``Resize`` divides by the float scale where PyTorch
    multiplies by the float inverse: 14 -> 16 pixels (a U-Net's skip size after a stride-2 transposed conv with
    padding 1) put output column 8 on input column 6 in onnxruntime (8 / (16/14) = 6.9999995) and on 7 in PyTorch
    (8 * 0.875); an fp32 file was 18.8 dB from its model. The indices are those PyTorch computes: its own nearest
    resize of the positions 0..n-1 along that axis, with the same size or scale. Integer upsampling factors keep
    ``Resize`` (exact there, and faster). ``nearest-exact`` (half-pixel centres), which torch.onnx does not export
    at all, is written the same way."""
    import torch.nn.functional as F

    if not isinstance(gm, torch.fx.GraphModule):
        return gm
    plans = {}
    for node in gm.graph.nodes:
        found = _nearest_resize_args(gm, node)
        if found is None:
            continue
        _x, spatial, kwargs, dims = found
        per_axis = []
        for axis, n in enumerate(spatial):
            pick = {"recompute_scale_factor": kwargs["recompute_scale_factor"], "mode": kwargs["mode"]}
            if kwargs["size"] is not None:
                size = kwargs["size"]
                pick["size"] = int(size[axis] if isinstance(size, (tuple, list)) else size)
            else:
                scale = kwargs["scale_factor"]
                pick["scale_factor"] = float(scale[axis] if isinstance(scale, (tuple, list)) else scale)
            try:
                pos = F.interpolate(torch.arange(n, dtype=torch.float32).reshape(1, 1, n), **pick)
            except Exception:  # noqa: BLE001 -- arguments this rewrite does not understand: leave the resize
                per_axis = None
                break
            per_axis.append(pos.reshape(-1).to(torch.int64))
        if per_axis is None:
            continue
        if kwargs["mode"] == "nearest" and all(
                len(idx) % n == 0 and torch.equal(idx, torch.arange(n).repeat_interleave(len(idx) // n))
                for idx, n in zip(per_axis, spatial)):
            continue  # an integer upsampling factor (or none): Resize computes the same
        plans[node.name] = per_axis
    if not plans:
        return gm
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    copy_ = torch.fx.GraphModule(gm, graph)
    for i, node in enumerate([n for n in graph.nodes if n.name in plans]):
        y = node.args[0]
        with graph.inserting_before(node):
            for axis, idx in enumerate(plans[node.name]):
                n = y.meta.get("tensor_meta").shape[axis + 2] if "tensor_meta" in getattr(y, "meta", {}) else None
                if n is not None and torch.equal(idx, torch.arange(int(n))):
                    continue  # this axis unchanged
                name = f"_nearest_index_{i}_{axis}"
                copy_.register_buffer(name, idx)
                y = graph.call_function(torch.index_select, (y, axis + 2, graph.get_attr(name)))
        node.replace_all_uses_with(y)
        graph.erase_node(node)
    copy_.recompile()
    return copy_


@contextlib.contextmanager
def _softplus_with_threshold(opset: int):
    """:func:`_softplus_symbolic`, :func:`_unflatten_symbolic`, :func:`_unfold_symbolic` and
    :func:`_col2im_symbolic` for the duration of one export (not for the user's own exports)."""
    torch.onnx.register_custom_op_symbolic("aten::softplus", _softplus_symbolic, opset)
    torch.onnx.register_custom_op_symbolic("aten::unflatten", _unflatten_symbolic, opset)
    torch.onnx.register_custom_op_symbolic("aten::unfold", _unfold_symbolic, opset)
    if opset >= 18:
        torch.onnx.register_custom_op_symbolic("aten::col2im", _col2im_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::softplus", opset)
        torch.onnx.unregister_custom_op_symbolic("aten::unflatten", opset)
        torch.onnx.unregister_custom_op_symbolic("aten::unfold", opset)
        if opset >= 18:
            torch.onnx.unregister_custom_op_symbolic("aten::col2im", opset)


def _unfold_symbolic(g, x, dimension, size, step):
    """``Tensor.unfold(dim, size, step)`` as one ``Gather`` along ``dim`` with the (n, size) index
    ``[[i·step + j]]``, then a ``Transpose`` that moves the frame axis last: torch's output shape
    ``shape[:dim] + (n,) + shape[dim+1:] + (size,)`` with ``n = (L - size) // step + 1``. torch.onnx's own
    symbolic needs ``L`` as a static size, which it loses after a ``Pad`` whose pads it computes in the graph:
    timm's halonet26t (``F.pad(kv, ...).unfold(2, ...)``) stopped with "input size not accessible". Where ``L``,
    ``size`` and ``step`` are numbers the index is a constant; otherwise it is computed from ``Shape(x)`` in the
    graph (``L`` along the dynamic batch axis, a size read from a shape), exact at every input size. A negative
    ``dim`` counts from the rank (torch.onnx wrote its frames transposed)."""
    from torch.onnx import symbolic_helper, symbolic_opset12

    rank = symbolic_helper._get_tensor_rank(x)
    d = symbolic_helper._maybe_get_const(dimension, "i")
    if not rank or not isinstance(d, int):  # no rank to place the frame axis by: torch.onnx's own (or its refusal)
        return symbolic_opset12.unfold(g, x, dimension, size, step)
    d = d + rank if d < 0 else d
    k = symbolic_helper._maybe_get_const(size, "i")
    s = symbolic_helper._maybe_get_const(step, "i")
    length = symbolic_helper._get_tensor_dim_size(x, d)
    if isinstance(k, int) and isinstance(s, int) and isinstance(length, int):
        n = (length - k) // s + 1
        index = g.op("Constant", value_t=torch.arange(n).unsqueeze(1) * s + torch.arange(k))
    else:
        def scalar(v):  # a 0-d INT64 tensor of a number or of an int value traced in the graph
            if isinstance(v, int):
                return g.op("Constant", value_t=torch.tensor(v, dtype=torch.int64))
            return g.op("Reshape", g.op("Cast", v, to_i=7), g.op("Constant", value_t=torch.ones(0, dtype=torch.int64)))

        k, s = scalar(k), scalar(s)
        length = g.op("Gather", g.op("Shape", x), scalar(d), axis_i=0)
        zero, one = scalar(0), scalar(1)
        n = g.op("Add", g.op("Div", g.op("Sub", length, k), s), one)  # integer Div: L >= size, so floor
        starts = g.op("Mul", g.op("Range", zero, n, one), s)
        index = g.op("Add", symbolic_helper._unsqueeze_helper(g, starts, [1]),
                     symbolic_helper._unsqueeze_helper(g, g.op("Range", zero, k, one), [0]))
    frames = g.op("Gather", x, index, axis_i=d)  # shape[:d] + (n, size) + shape[d+1:]
    if d == rank - 1:
        return frames
    return g.op("Transpose", frames, perm_i=list(range(d + 1)) + list(range(d + 2, rank + 1)) + [d + 1])


def _col2im_symbolic(g, x, output_size, kernel_size, dilation, padding, stride):
    """``aten::col2im`` (``F.fold``) as ONNX ``Col2Im`` with an image shape that may be computed in the graph.
    torch.onnx's own symbolic reads the number of spatial axes from the static size of ``output_size``, which a
    list of values computed from a tensor's shape does not have (VOLO's outlook attention folds to ``(H, W)`` read
    from its input: "'NoneType' object is not subscriptable", and the model could not be exported at all). Here
    such a list is concatenated into the 1-D INT64 tensor ``Col2Im`` takes."""
    from torch.onnx import symbolic_helper

    def ints(v):
        got = symbolic_helper._maybe_get_const(v, "is")
        return [int(i) for i in got] if isinstance(got, (list, tuple)) else None

    size = ints(output_size)
    if size is not None:
        shape = g.op("Constant", value_t=torch.tensor(size, dtype=torch.int64))
    elif symbolic_helper._is_packed_list(output_size):
        parts = [g.op("Cast", v, to_i=7) for v in symbolic_helper._unpack_list(output_size)]  # 7: INT64
        size = parts
        shape = g.op("Concat", *[symbolic_helper._unsqueeze_helper(g, v, [0]) for v in parts], axis_i=0)
    else:
        shape = g.op("Cast", output_size, to_i=7)
        size = [None, None]  # F.fold: two spatial axes
    axes = len(size)
    kernel = ints(kernel_size)
    block = g.op("Constant", value_t=torch.tensor(kernel, dtype=torch.int64)) if kernel is not None else kernel_size
    dilation, padding, stride = ints(dilation) or [1] * axes, ints(padding) or [0] * axes, ints(stride) or [1] * axes
    return g.op("Col2Im", x, shape, block, dilations_i=dilation, pads_i=padding * 2,
                strides_i=stride)


def _unflatten_symbolic(g, x, dim, sizes):
    """``aten::unflatten`` as ``Reshape(x, Concat(Shape(x)[:d], sizes, Shape(x)[d+1:]))`` with constant indices.
    torch.onnx's own symbolic computes the indices with ``Mod``; shape inference then lost the batch dimension and
    took the example's sizes for everything after the unflatten: a ``h.shape`` read later (``x.view(x.size(0),
    -1)``, qcompile's per-token head) was folded to the example's batch, and the file failed at any other batch
    size ("cannot be reshaped to the requested shape {1,2,4}")."""
    from torch.onnx import symbolic_helper, symbolic_opset13

    d = symbolic_helper._maybe_get_const(dim, "i")
    sz = symbolic_helper._maybe_get_const(sizes, "is")
    rank = symbolic_helper._get_tensor_rank(x)
    if not isinstance(d, int) or not isinstance(sz, (list, tuple)) or rank is None:
        return symbolic_opset13.unflatten(g, x, dim, sizes)
    d = d + rank if d < 0 else d
    shape = g.op("Shape", x)

    def part(lo, hi):
        return g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([lo])),
                    g.op("Constant", value_t=torch.tensor([hi])))

    parts = ([part(0, d)] if d > 0 else []) + [g.op("Constant", value_t=torch.tensor([int(v) for v in sz]))]
    if d + 1 < rank:
        parts.append(part(d + 1, rank))
    return g.op("Reshape", x, g.op("Concat", *parts, axis_i=0))


def explicit_same_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``auto_pad = SAME_UPPER/SAME_LOWER`` of stride-1 ``Conv`` nodes (what ``torch.onnx.export`` writes
    for ``padding="same"``) by the explicit ``pads`` they mean: onnxruntime refuses ``SAME_*`` with a dilation
    above 1 ("Dilation not supported for AutoPadType::SAME_UPPER") at run time. With stride 1 the padding does not
    depend on the input size: ``d*(k-1)`` in all, the odd one at the end for ``SAME_UPPER`` (PyTorch's rule) and
    at the beginning for ``SAME_LOWER``. ``VALID`` (no padding) loses its ``auto_pad`` too, so that both export
    paths write the same file. Other nodes are left as they are."""
    for node in model.graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: a for a in node.attribute}
        mode = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
        if mode == "VALID":  # no padding: the default, written as the fast path writes it
            keep = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
            del node.attribute[:]
            node.attribute.extend(keep)
            continue
        if mode not in ("SAME_UPPER", "SAME_LOWER") or "kernel_shape" not in attrs:
            continue
        k = list(attrs["kernel_shape"].ints)
        d = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * len(k)
        s = list(attrs["strides"].ints) if "strides" in attrs else [1] * len(k)
        if any(v != 1 for v in s) or len(d) != len(k):
            continue
        total = [dd * (kk - 1) for dd, kk in zip(d, k)]
        small = [t // 2 for t in total]
        big = [t - h for t, h in zip(total, small)]
        pads = small + big if mode == "SAME_UPPER" else big + small
        keep = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(keep + [onnx.helper.make_attribute("pads", pads)])
    return model


def _check_dict_keys(gm: torch.nn.Module) -> None:
    """Refuse, in one line, a dict output with keys that are not strings: torch.onnx's exporter took the key ``0``
    for a constant output ("did not have observable data dependence with trace inputs")."""
    graph = getattr(gm, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return
    stack = [next(n for n in reversed(graph.nodes) if n.op == "output").args[0]]
    while stack:
        out = stack.pop()
        if isinstance(out, dict):
            bad = [k for k in out if not isinstance(k, str)]
            if bad:
                keys = ", ".join(map(repr, bad[:3])) + (" ..." if len(bad) > 3 else "")
                raise UserError(f"the model returns a dict with keys that are not strings ({keys}), which the ONNX "
                                "export cannot name outputs by; use string keys or return a tuple")
            stack.extend(out.values())
        elif isinstance(out, (tuple, list)):
            stack.extend(out)


def _dict_output_names(gm: torch.nn.Module, n_out: int, taken: list[str]) -> list[str] | None:
    """The keys of a model's flat dict output (``{"logits": ..., "box": ...}``), in their order, as the ONNX output
    names (they were ``output_0``, ``output_1``); None for other outputs or keys that are not distinct names."""
    graph = getattr(gm, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    out = next(n for n in reversed(graph.nodes) if n.op == "output").args[0]
    if not isinstance(out, dict) or len(out) != n_out or not all(isinstance(v, torch.fx.Node) for v in out.values()):
        return None
    names = [str(k) for k in out]
    if not all(isinstance(k, str) and k.strip() for k in out) or len(set(names)) != len(names) or set(names) & set(taken):
        return None
    if any(k.isdigit() for k in names):  # torch.onnx refuses a number as a value's name ("Invalid name: '0'"):
        return None  # torchvision's FPN backbones and IntermediateLayerGetter return keys '0', '1', ...
    return names


def _output_count(gm: torch.nn.Module, example_inputs: tuple) -> int:
    """How many outputs ``gm`` returns: from its fx graph where that says (a tuple of nodes, or one node that
    ShapeProp saw return one tensor), else by running it once (for a quantized ResNet-18 the exact int8 simulation
    at batch 1 costs 0.2 s of a 3.5 s compile)."""
    from torch.utils._pytree import tree_leaves

    graph = getattr(gm, "graph", None)
    if isinstance(graph, torch.fx.Graph):
        out = next(n for n in reversed(graph.nodes) if n.op == "output").args[0]
        if isinstance(out, (tuple, list, dict)):  # a dict's values become outputs in their order
            leaves = tree_leaves(out)
            if all(isinstance(n, torch.fx.Node) and isinstance(n.meta.get("tensor_meta"), TensorMetadata)
                   for n in leaves):
                return len(leaves)
        if isinstance(out, torch.fx.Node) and isinstance(out.meta.get("tensor_meta"), TensorMetadata):
            return 1
    with torch.no_grad():
        out = gm(*example_inputs)
    return len([t for t in tree_leaves(out) if isinstance(t, torch.Tensor)])


@contextlib.contextmanager
def _output_unless_failed():
    """Hold what is written to file descriptors 1 and 2 inside the block; pass it on unless the block raises.

    When an operator fails, the TorchScript exporter prints its whole graph from C++ to stdout (its log switch is
    always on: torch tests the function object, not its value); the one-line error made from the exception says
    what matters. Whatever a successful export prints still comes out."""
    held = []
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                fd = stream.fileno()
            except (AttributeError, OSError, ValueError):  # not a real file (captured): nothing to hold
                continue
            stream.flush()
            tmp = tempfile.TemporaryFile()
            held.append((stream, fd, os.dup(fd), tmp))
            os.dup2(tmp.fileno(), fd)
    except OSError:
        pass
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        for stream, fd, saved, tmp in held:
            stream.flush()
            os.dup2(saved, fd)
            os.close(saved)
            if not failed:
                tmp.seek(0)
                text = tmp.read()
                if text:
                    os.write(fd, text)
            tmp.close()


FROZEN_BRANCH_NOTE = "frozen_branch_note"  # gm.meta key: the warning below, for the CLI's notes


def _check_input_count(gm: torch.fx.GraphModule, example_inputs: tuple) -> None:
    """One example per input ``forward`` needs (those without a default): a two-input model given one tensor stopped
    in torch.onnx with "forward() missing 1 required positional argument", which blamed the exporter."""
    from .errors import UserError

    needed = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.args and not n.target.startswith("*")]
    if len(example_inputs) < len(needed):
        raise UserError(f"the model takes {len(needed)} inputs ({', '.join(str(n.target) for n in needed)}) but "
                        f"{len(example_inputs)} example(s) were given: pass a tuple with one tensor per input")


def _warn_frozen_branches(caught, gm) -> None:
    """torch.onnx's tracer turned a tensor into a Python bool: a data-dependent ``if`` inside a module the fx trace
    kept whole (``--leaf-module``), whose branch the file then fixes to the example input's for every input (a file
    that passed its validation computed another function on inputs taking the other branch)."""
    import os

    from .errors import QuantizationWarning, _package_roots, user_stacklevel

    # torch's own modules check their inputs this way (nn.LSTM's batch-size checks) and qcompile's quantizers their
    # ranges: the user's code alone
    library = (os.path.dirname(os.path.abspath(torch.__file__)),) + _package_roots()
    places = []
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning) and "Python boolean" in str(w.message) and \
                not os.path.abspath(w.filename).startswith(library):
            place = f"{w.filename}:{w.lineno}"
            if place not in places:
                places.append(place)
    if places:
        note = (f"a Python condition on tensor values ({', '.join(places[:3])}) was traced inside a module kept "
                "whole (--leaf-module): the file takes the branch the example input took, for every input; "
                "validate on inputs that take the other branch too (qcompile validate --data), or write the "
                "condition with torch.where")
        gm.meta[FROZEN_BRANCH_NOTE] = note
        warnings.warn(note, QuantizationWarning, stacklevel=user_stacklevel())


def _export_error_message(e: Exception) -> str:
    """One line for an operator torch.onnx cannot export: what it said (first sentence) and what to change."""
    text = " ".join(str(e).split())
    what = text.split(" Please feel free")[0].split(" [Caused by")[0].rstrip(". ")
    if "instance_norm training" in what:
        return ("torch.onnx cannot export an InstanceNorm with track_running_stats=True for a variable batch size "
                "(its eval mode normalises with the running statistics, as a BatchNorm does): make it a BatchNorm with "
                "the same weights and running statistics, or use track_running_stats=False")
    if "adaptive" in what and "factor of input size" in what:
        hint = ("choose an input size whose spatial dimensions are multiples of the adaptive pool's output size "
                "(--input-shape, e.g. 1,3,224,224 for a 7x7 pool)")
    elif any(word in what for word in ("size", "shape", "dimension")):
        hint = "replace that operation in the model, or give an input shape for which it is exportable (--input-shape)"
    else:  # an operator torch.onnx has no export for at all (aten::bilinear): no input shape helps
        hint = "replace that operation in the model with operations torch.onnx exports"
    return f"torch.onnx cannot export this model: {what}; {hint}"


def pin_output_dims(model: onnx.ModelProto, gm: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[str]:
    """Give the graph outputs the dimensions the model gives them. The exporter leaves names where it cannot tell: a
    Linear on (batch, tokens, features) exported as Reshape → Gemm → Reshape declared ``[batch,
    Reshapeoutput_dim_1, ...]``, a time-first output ``[batch, batch, 6]``, ``y.flatten()`` of the whole batch
    ``[batch]``. The model runs at the example's batch size and twice it: a dimension of the same size both times
    is pinned to it, one that doubles with the batch is the batch, any other gets a name of its own (it follows
    the batch some other way). Only outputs with a named dimension past the first, or of rank 1, are checked: the
    common ``[batch, ...static]`` needs no run. Returns a note for each output whose rank follows the batch size."""
    outputs = model.graph.output
    batch = {d.dim_param for i in model.graph.input for d in list(i.type.tensor_type.shape.dim)[:1] if d.dim_param}
    dims_of = [list(o.type.tensor_type.shape.dim) for o in outputs]
    if not any(any(d.HasField("dim_param") for d in dims[1:]) or (len(dims) == 1 and dims[0].HasField("dim_param"))
               for dims in dims_of):
        return []
    if not example_inputs or any(not isinstance(t, torch.Tensor) or t.dim() == 0 for t in example_inputs):
        return []
    from .qmodules import disabled_quantizers

    sizes = (int(example_inputs[0].shape[0]), 2 * int(example_inputs[0].shape[0]))
    shapes = []
    for reps in (1, 2):  # the example, and the example twice over along the batch
        inputs = [t.repeat(reps, *([1] * (t.dim() - 1))) for t in example_inputs]
        try:  # (torch.fx prints a failing graph's code to stderr before raising: kept out of the user's terminal)
            # with the quantizers passing values through: the same shapes, without simulating every code (YOLOv8n
            # at 320 x 320: 0.49 s of a 6 s compile)
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), disabled_quantizers(gm):
                values = gm(*inputs)
        except Exception:  # a model that takes only this batch: leave the declared shapes alone
            return []
        shapes.append([tuple(v.shape) for v in _flat_tensors(values)])
    if len(shapes[0]) != len(outputs) or len(shapes[1]) != len(outputs):
        return []  # an output the exporter dropped or merged: leave the declared shapes alone
    name = next(iter(sorted(batch)), "batch")
    ranked: list = []
    for out, one, two in zip(outputs, *shapes):
        dims = out.type.tensor_type.shape.dim
        if len(one) != len(two):
            # a rank that follows the batch size (``x.squeeze()`` after a global pool: (10,) at batch 1, (N, 10)
            # from 2 on): the file computes it as the model does (Squeeze without axes), and a graph output must
            # declare a rank, so it declares the one of batches past 1; the exporter's ``[batch]`` of the batch-1
            # trace made onnxruntime warn on every run of a larger batch
            del dims[:]
            for j, size in enumerate(two):
                d = dims.add()
                if j == 0 and size == sizes[1]:
                    d.dim_param = name
                else:
                    d.dim_value = int(size)
            ranked.append((out.name, one, two))
            continue
        if len(dims) != len(one):
            continue
        for j, d in enumerate(dims):
            if not d.HasField("dim_param"):
                continue
            if one[j] == two[j]:
                d.dim_value = int(one[j])
            elif (one[j], two[j]) == sizes:
                d.dim_param = name
            else:
                d.dim_param = f"{out.name}_dim{j}"
    return [f"output {out_name!r} has {len(one)} dimension(s) at batch {sizes[0]} {tuple(one)} and {len(two)} at batch "
            f"{sizes[1]} {tuple(two)} (a .squeeze() that also takes away a batch of 1?): the file computes it as the model "
            "does and declares the shape of batches past 1; .flatten(1) or .squeeze(-1) keeps the batch dimension"
            for out_name, one, two in ranked]


def _flat_tensors(values) -> list:
    """The tensors of a model's output in the exporter's order: tuples and lists in order, dicts by insertion."""
    flat: list = []
    stack = [values]
    while stack:
        v = stack.pop(0)
        if isinstance(v, torch.Tensor):
            flat.append(v)
        elif isinstance(v, (tuple, list)):
            stack[:0] = list(v)
        elif isinstance(v, dict):
            stack[:0] = list(v.values())
    return flat


def check_model(model: onnx.ModelProto | bytes) -> None:
    """``onnx.checker`` with the full check (shape inference included)."""
    onnx.checker.check_model(model, full_check=True)


def save_atomic(model: onnx.ModelProto, path: str) -> str:
    """Serialize ``model`` to ``path`` through a temporary file in the same folder and a rename."""
    return _write_atomic(model.SerializeToString(), path, ".onnx.tmp", "-o")


def save_bytes_atomic(data: bytes, path: str) -> str:
    """Write a serialized ONNX model to ``path`` the same way (whole or not at all)."""
    return _write_atomic(data, path, ".onnx.tmp", "-o")


def write_text_atomic(text: str, path: str, what: str = "--json") -> str:
    """Write ``text`` (UTF-8) to ``path`` the same way: whole or not at all."""
    return _write_atomic(text.encode("utf-8"), path, ".tmp", what)


def _write_atomic(data: bytes, path: str, suffix: str, what: str) -> str:
    path = check_output_path(path, what, "model.onnx" if suffix == ".onnx.tmp" else "summary.json")
    folder = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qcompile-", suffix=suffix, dir=folder)
    except OSError as exc:  # e.g. a folder that says writable but is not (/proc, a read-only mount)
        raise UserError(f"cannot write in {folder!r} ({exc.strerror or exc}); choose another {what} path") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # the permissions of a plain open(): mkstemp's are 0600
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise UserError(f"cannot write {path!r} ({exc.strerror or exc}); choose another {what} path") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_opset(model: onnx.ModelProto, version: int) -> None:
    """Raise the default-domain opset (the ops the exporter emits keep their semantics from 20 to 21; 21 adds
    the 4-bit types to QuantizeLinear/DequantizeLinear)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = max(imp.version, version)


# Attributes whose documented meaning when absent is "1 along each spatial axis" / "0 padding", but which carry no
# default in the operator schema (their length depends on the input rank).
_UNIT_WHEN_ABSENT = {"dilations", "strides"}
_SPATIAL_OPS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "ConvInteger", "QLinearConv"}


def strip_default_attributes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove, from the main graph's standard-domain nodes, attributes that equal their default (the schema's
    ``default_value``; all-ones ``dilations``/``strides`` and all-zero ``pads`` of convolutions and pools without
    ``auto_pad``). The exporter writes every attribute out; on a small model they were about 1% of the file.
    Nodes of other domains and subgraphs are left as they are."""
    opsets = {(o.domain or ""): o.version for o in model.opset_import}
    opsets.setdefault("", opsets.get("ai.onnx", 0))
    version = opsets[""]
    schemas: dict[str, object] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type not in schemas:
            try:
                schemas[node.op_type] = onnx.defs.get_schema(node.op_type, version, "")
            except Exception:  # not a known operator at this opset: leave the node alone
                schemas[node.op_type] = None
        schema = schemas[node.op_type]
        if schema is None:
            continue
        attrs = {a.name: a for a in node.attribute}
        auto_pad = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
        keep = []
        for a in node.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                keep.append(a)
                continue
            value = onnx.helper.get_attribute_value(a)
            spec = schema.attributes.get(a.name)
            default = spec.default_value if spec is not None else None
            drop = (default is not None and default.type == a.type and default.name != "" and
                    onnx.helper.get_attribute_value(default) == value)
            if node.op_type in _SPATIAL_OPS:
                if a.name in _UNIT_WHEN_ABSENT and all(v == 1 for v in value):
                    drop = True
                elif a.name == "pads" and auto_pad == "NOTSET" and all(v == 0 for v in value):
                    drop = True
                elif a.name == "auto_pad" and auto_pad == "NOTSET":
                    drop = True
            if not drop:
                keep.append(a)
        if len(keep) != len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(keep)
    return model


SHARE_MAX_BYTES = 1024  # constants up to this size are shared: tables, scales, zero points, shapes; not weights


def share_identical_initializers(model: onnx.ModelProto, max_bytes: int = SHARE_MAX_BYTES) -> int:
    """Keep one copy of each small initializer (``max_bytes`` or less) that the main graph holds several times
    with the same type, shape and contents (the level table of every APoT layer, zero points, the cell tables
    of APoT activations that share a level set), and point every reader at it, subgraphs included. Graph inputs
    and outputs are never merged. Returns how many initializers were removed."""
    graph = model.graph
    io_names = {v.name for v in list(graph.input) + list(graph.output)}
    keep: dict[bytes, str] = {}
    rename: dict[str, str] = {}
    for t in graph.initializer:
        if t.name in io_names or t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        body = onnx.TensorProto()
        body.CopyFrom(t)
        body.ClearField("name")
        body.ClearField("doc_string")
        key = body.SerializeToString(deterministic=True)
        if len(key) > max_bytes:
            continue
        if key in keep:
            rename[t.name] = keep[key]
        else:
            keep[key] = t.name
    if not rename:
        return 0
    kept = [t for t in graph.initializer if t.name not in rename]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    _rename_inputs(graph, rename)
    _rename_probe_inputs(model, rename)
    _rename_region_records(model, rename)
    return len(rename)


def drop_identity_requantizations(model: onnx.ModelProto) -> int:
    """Remove ``QuantizeLinear(DequantizeLinear(c))`` where both use the same scale and zero point (values, type
    and axis): the codes ``c`` themselves, exactly (``round((c - z)·s / s) = c - z`` in float32 for 8-bit and
    smaller codes). The fx graph has such pairs where a quantizer reads codes whose parameters it shares already
    (a concatenation's codes read by the next convolutions: ``ShareInt8Params`` leaves both quantizers), and
    onnxruntime keeps them as a float DequantizeLinear and QuantizeLinear between its int8 kernels (inception_v3:
    9 of each). The readers of the quantizer read ``c``, and those of a DequantizeLinear of it with the same
    parameters read the first one, whose values it repeats (the activation map names that one instead). Main graph
    only; returns how many re-quantizations were removed."""
    from onnx import numpy_helper

    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    produced = {o: n for n in graph.node for o in n.output}
    outputs = {v.name for v in graph.output}

    def same_const(a: str, b: str) -> bool:
        if a == b:
            return a in consts
        if a not in consts or b not in consts:
            return False
        x, y = numpy_helper.to_array(consts[a]), numpy_helper.to_array(consts[b])
        return x.dtype == y.dtype and x.shape == y.shape and bool((x == y).all())

    def axis(node) -> int:
        return next((a.i for a in node.attribute if a.name == "axis"), 1)

    rename: dict[str, str] = {}
    dropped = set()
    removed = 0
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) != 3:
            continue
        dq = produced.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or len(dq.input) != 3:
            continue
        if {a.name for a in node.attribute} - {"axis"} or {a.name for a in dq.attribute} - {"axis"}:
            continue  # block quantization, saturate, output_dtype: not the plain pair
        if node.output[0] in outputs or not (same_const(node.input[1], dq.input[1]) and
                                             same_const(node.input[2], dq.input[2])):
            continue
        if numpy_helper.to_array(consts[node.input[1]]).size > 1 and axis(node) != axis(dq):
            continue
        if numpy_helper.to_array(consts[node.input[2]]).dtype.itemsize > 1:
            continue  # 16-bit codes: (c - z)·s / s in float32 is no longer c - z for every c
        rename[node.output[0]] = dq.input[0]  # the codes themselves
        dropped.add(id(node))
        removed += 1
        # a DequantizeLinear of the re-quantized codes with the same parameters gives the values of ``dq``: its
        # readers read ``dq`` (which then keeps readers: a DequantizeLinear left without any kept onnxruntime from
        # fusing the layer before it, and cost cspdarknet53 five Transposes and float DequantizeLinears)
        for reader in readers.get(node.output[0], []):
            if reader.op_type == "DequantizeLinear" and reader.domain in ("", "ai.onnx") and \
                    len(reader.input) == 3 and reader.output[0] not in outputs and \
                    same_const(reader.input[1], dq.input[1]) and same_const(reader.input[2], dq.input[2]) and \
                    {a.name for a in reader.attribute} <= {"axis"} and \
                    (numpy_helper.to_array(consts[reader.input[1]]).size == 1 or axis(reader) == axis(dq)):
                rename[reader.output[0]] = dq.output[0]
                dropped.add(id(reader))
    if not rename:
        return 0
    for name in rename:  # chains of such pairs: each name to the first tensor, not to another dropped one
        target = rename[name]
        while target in rename:
            target = rename[target]
        rename[name] = target
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    _rename_inputs(graph, rename)
    _rename_probe_inputs(model, rename)
    _rename_region_records(model, rename)
    from .emit import activation_map, set_activation_map

    acts = activation_map(model)
    if acts:  # the validator reads a dropped DequantizeLinear's values from the one they equal
        set_activation_map(model, [{"module": a["module"], "tensor": rename.get(a["tensor"], a["tensor"])}
                                   for a in acts])
    return removed


def _rename_probe_inputs(model: onnx.ModelProto, rename: dict) -> None:
    """The detached ``DequantizeLinear`` probes (``qcompile.emit.detach_probes``) name their scale and zero point
    initializers in the model's metadata: rename them there too."""
    import json

    from .emit import PROBES_KEY

    for prop in model.metadata_props:
        if prop.key == PROBES_KEY:
            probes = json.loads(prop.value)
            for r in probes:
                r["inputs"] = [rename.get(name, name) for name in r["inputs"]]
            prop.value = json.dumps(probes, separators=(",", ":"))


def _rename_region_records(model: onnx.ModelProto, rename: dict) -> None:
    """The shift-add regions' records (``qcompile.lowering.REGION_KEY``) name the integer codes they read: rename
    them there too (the verifier found a region reading a tensor it did not declare)."""
    import json

    from .lowering import REGION_KEY

    for prop in model.metadata_props:
        if prop.key == REGION_KEY:
            value = json.loads(prop.value)
            for rec in value.get("layers", []):
                rec["entries"] = [rename.get(name, name) for name in rec.get("entries", [])]
                for key in ("accumulator", "output"):
                    if key in rec:
                        rec[key] = rename.get(rec[key], rec[key])
                act = rec.get("activation")
                if isinstance(act, dict) and "codes" in act:
                    act["codes"] = rename.get(act["codes"], act["codes"])
            prop.value = json.dumps(value)


def _rename_inputs(graph: onnx.GraphProto, rename: dict) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(a.g, rename)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    _rename_inputs(g, rename)
