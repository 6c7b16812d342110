"""``qcompile validate FILE.onnx --against MODEL``: rebuild the reference and compare."""
from __future__ import annotations

import json
import math
import os

import onnx
import torch

from .errors import UserError
from .frontend import MAX_TENSOR_VALUES, _first_line, load_model, parse_input_shape, plain_copy, unwrap
from .options import OPTIONS_KEY, _version, from_metadata
from .threads import compile_threads, torch_threads


def _file_options(model: onnx.ModelProto) -> dict | None:
    for prop in model.metadata_props:
        if prop.key == OPTIONS_KEY:
            return from_metadata(prop.value)
    return None


def _calibration_record(model: onnx.ModelProto) -> dict | None:
    from .api import CALIBRATION_KEY

    for prop in model.metadata_props:
        if prop.key == CALIBRATION_KEY:
            try:
                return json.loads(prop.value)
            except ValueError:
                return None
    return None


# the metadata qcompile writes as JSON and validate reads, with the type of its top level
_JSON_METADATA = {OPTIONS_KEY: dict, "qcompile.calibration": dict, "qcompile.model": dict,
                  "qcompile.activations": (dict, list), "qcompile.probes": list, "qcompile.shift_add": dict}


def _check_metadata(model: onnx.ModelProto, path: str) -> None:
    """Each qcompile metadata record parses: an edited or damaged one failed as an internal error (JSONDecodeError),
    or (the calibration and model records) was taken as absent, and the file validated as something it is not."""
    from .emit import activation_map

    for prop in model.metadata_props:
        kind = _JSON_METADATA.get(prop.key)
        if kind is None:
            continue
        try:
            value = json.loads(prop.value)
            problem = None if isinstance(value, kind) else \
                f"a JSON {type(value).__name__}, not the record qcompile writes"
        except ValueError as exc:
            problem = f"not JSON: {str(exc).splitlines()[0]}"
        if problem is None:
            try:  # the records the validation takes apart field by field
                if prop.key == OPTIONS_KEY:
                    from_metadata(prop.value)
                elif prop.key == "qcompile.activations":
                    activation_map(model)
            except (KeyError, TypeError, AttributeError, ValueError) as exc:
                problem = f"a record of another form ({type(exc).__name__}: {_first_line(exc)})"
        if problem is not None:
            raise UserError(f"{path!r} has corrupt qcompile metadata: {prop.key!r} is {problem}; the file was edited "
                            "or damaged since qcompile wrote it: compile the model again")


def _graph_inputs(model: onnx.ModelProto) -> list:
    init = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init]


def _input_shapes_from_onnx(model: onnx.ModelProto) -> list[tuple[int, ...]] | None:
    """One shape per graph input (a symbolic dimension, the batch, as 1); None where an input has no shape."""
    shapes = []
    for graph_input in _graph_inputs(model):
        dims = graph_input.type.tensor_type.shape.dim
        if not dims:
            return None
        shapes.append(tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims))
    return shapes or None


def _check_inputs_fit(onnx_model: onnx.ModelProto, inputs: tuple, path: str, given: str) -> None:
    """The inputs must be one per graph input, each with the rank and every fixed dimension of its graph input: a
    one-line error naming both shapes, not onnxruntime's INVALID_ARGUMENT from deep inside validation."""
    from qcompile.runtime.session import file_inputs, recorded_inputs

    graph_inputs = _graph_inputs(onnx_model)
    # inputs the model never reads are not in it
    inputs = file_inputs([g.name for g in graph_inputs], inputs, recorded_inputs(onnx_model))
    if len(graph_inputs) != len(inputs):
        how = ("a .npz with x0, x1, ... for --data, or one --input-shape per input" if len(graph_inputs) > 1 else
               "one array (or one --input-shape)")
        raise UserError(f"{path!r} has {len(graph_inputs)} input(s) but {given} gives {len(inputs)}; give {how}")
    for graph_input, tensor in zip(graph_inputs, inputs):
        elem = graph_input.type.tensor_type.elem_type
        if elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE) and \
                not tensor.is_floating_point():  # uint8 images, bool masks: onnxruntime's error blamed the file
            which = f"input {graph_input.name!r} of " if len(graph_inputs) > 1 else ""
            kind = "booleans" if tensor.dtype == torch.bool else "integers"
            raise UserError(f"{given} holds {kind} but {which}{path!r} takes floating point: convert them as the "
                            "model was trained on them (uint8 images 0..255: for instance x.astype(np.float32) / 255, "
                            "and the training normalisation)")
        dims = graph_input.type.tensor_type.shape.dim
        want = tuple(d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in dims)
        got = tuple(tensor.shape)
        fits = len(want) == len(got) and all(not isinstance(w, int) or w == g for w, g in zip(want, got))
        if not fits:
            shown = "(" + ", ".join(str(w) for w in want) + ")"
            batch_only = len(want) == len(got) and \
                all(not isinstance(w, int) or w == g for w, g in zip(want[1:], got[1:]))  # a fixed batch size
            fix = (f"pass --samples {want[0]} (its fixed batch size), or --data with that many samples"
                   if batch_only and isinstance(want[0], int) and "--samples" in given
                   else "give --input-shape of that shape" if given.startswith("--input-shape")
                   else "give inputs of that shape (for a quantized file, the calibration inputs it was compiled with)")
            raise UserError(f"{given} gives shape {got} but {path!r} takes input {graph_input.name!r} of shape "
                            f"{shown}; {fix}")


def _weight_shapes(model: onnx.ModelProto):
    """The shapes of a file's weight tensors (initializers of rank 2 and more: convolution and matrix weights):
    what a model gives whatever the options and qcompile version (which change tables, scales and nodes)."""
    from collections import Counter

    return Counter(tuple(t.dims) for t in model.graph.initializer if len(t.dims) >= 2)


def _check_same_weights(onnx_model: onnx.ModelProto, model, args) -> None:
    """The file records a fingerprint of the float model it was compiled from (since 0.7.1): another checkpoint of
    the same architecture rebuilt another simulation, and the report blamed the file."""
    from .api import MODEL_KEY, model_fingerprint

    record = next((p.value for p in onnx_model.metadata_props if p.key == MODEL_KEY), None)
    try:
        fields = json.loads(record) if record is not None else {}
        # every value (0.7.3 on), or 4096 samples per tensor (0.7.1-0.7.2 files)
        recorded, sampled = (fields["sha256_all"], False) if "sha256_all" in fields else (fields.get("sha256"), True)
    except (ValueError, AttributeError, TypeError):
        recorded = None
    if recorded is None:
        return  # an older file, or a QAT export (refused below): nothing to compare
    if model_fingerprint(model, sampled=sampled) != recorded:
        raise UserError(f"{args.onnx!r} was not compiled from the weights in {args.against!r} (another checkpoint or "
                        "another model); pass the model (and --arch) the file was compiled from")


def _file_dynamic_axes(onnx_model: onnx.ModelProto) -> set:
    """The input axes beyond the batch that the file declares symbolic (a compile with --dynamic-axes)."""
    return {a for value in _graph_inputs(onnx_model) if value.type.tensor_type.HasField("shape")
            for a, d in enumerate(value.type.tensor_type.shape.dim) if a > 0 and d.dim_param}


def _check_same_graph(onnx_model: onnx.ModelProto, rebuilt: onnx.ModelProto, args) -> None:
    """The simulation rebuilt from ``--against`` must be the one the file was compiled from: another model gives
    other layers, and comparing their quantizers failed deep inside with an internal error."""
    mine, theirs = _weight_shapes(onnx_model), _weight_shapes(rebuilt)
    if mine == theirs:
        return
    raise UserError(f"{args.onnx!r} was not compiled from {args.against!r} (its weights have other shapes: "
                    f"{sum(mine.values())} tensors of rank 2 or more against {sum(theirs.values())}); pass the model "
                    "(and --arch) the file was compiled from")


def _check_same_quantizers(onnx_model: onnx.ModelProto, rebuilt: onnx.ModelProto, args, written: str) -> None:
    """The rebuilt simulation has the file's activation quantizers: a file from another qcompile version, whose
    passes placed them otherwise (0.5 quantizes the float input of a pool an int8 layer reads), failed with codes
    that 'differ' in a quantizer the two do not share."""
    from qcompile import __version__

    from .emit import activation_map

    mine = {a["module"] for a in activation_map(onnx_model)}
    theirs = {a["module"] for a in activation_map(rebuilt)}
    if not mine or mine == theirs:
        return
    try:
        version = json.loads(written).get("qcompile", "?")
    except (ValueError, AttributeError):
        version = "?"
    if version != __version__:
        raise UserError(f"{args.onnx!r} was written by qcompile {version}, whose activation quantizers this "
                        f"qcompile {__version__} does not place the same way ({len(mine)} against {len(theirs)}); "
                        f"compile the model again, or validate with qcompile {version}")
    raise UserError(f"{args.onnx!r} has other activation quantizers than {args.against!r} compiled with its recorded "
                    f"options ({len(mine)} against {len(theirs)}); pass the model (and --arch, --data) the file was "
                    "compiled from")


def _quantized_nodes(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.domain == "qcompile" for n in model.graph.node)


def _onnxruntime_refused(exc: BaseException, args) -> None:
    """A UserError for onnxruntime failing to run the file (an index past a level table, a shape its graph cannot
    take: an edited file), not an internal error; returns where ``exc`` is not onnxruntime's."""
    if not type(exc).__module__.startswith("onnxruntime"):
        return
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise UserError(f"onnxruntime cannot run {args.onnx!r} on these inputs ({first}); the file is not one qcompile "
                    "wrote or was edited since: validate the file qcompile wrote") from None


def _check_reference_runs(reference, example, args, given) -> None:
    """The float model ``--against`` runs on one sample of the inputs, or a one-line UserError (a model of another
    architecture, a two-input model, uint8 image data)."""
    from .frontend import _first_line

    try:
        with torch.no_grad():
            reference(*[t.clone() for t in example])
    except Exception as exc:  # noqa: BLE001 - whatever the user's forward raises
        shapes = ", ".join(f"{tuple(t.shape[1:])} {str(t.dtype).replace('torch.', '')}" for t in example)
        hint = "give the model the file was compiled from (--against, and --arch for a state dict)"
        if "indices" in str(exc) and "Long, Int" in str(exc) and any(t.is_floating_point() for t in example):
            hint = "token ids are integers: save them as ids.astype(np.int64), not float32"
        elif any(not t.is_floating_point() for t in example) and "type" in str(exc).lower():
            hint = ("integer inputs stay integers (token ids): save image data as float32, as the model was trained "
                    "on it (uint8 images 0..255: x.astype(np.float32) / 255 and the training normalisation)")
        raise UserError(f"the --against model does not run on the {given} inputs (samples of shape [{shapes}]: "
                        f"{_first_line(exc)}); {hint}") from None


def validate_against(args):
    from qcompile.runtime import validation as rv

    from qcompile.runtime.session import recorded_inputs

    from .cli import forward_inputs, load_array_file, resolve_named

    if not os.path.exists(args.onnx):
        raise UserError(f"ONNX file {args.onnx!r} does not exist; give the file qcompile wrote")
    try:
        onnx_model = onnx.load(args.onnx)
    except PermissionError:  # not "is not an ONNX file"
        raise UserError(f"ONNX file {args.onnx!r} cannot be read (permission denied); check its permissions "
                        "(chmod +r) or run as a user who can read it") from None
    except Exception:
        onnx_model = None
    if onnx_model is None or not onnx_model.graph.node:  # an empty file parses as an empty model
        raise UserError(f"{args.onnx!r} is not an ONNX file{' (it is empty)' if not os.path.getsize(args.onnx) else ''}; "
                        "give the .onnx file qcompile wrote")
    _check_metadata(onnx_model, args.onnx)
    model = load_model(args.against, arch=args.arch, trust_pickle=args.trust_pickle)
    # the float reference as compile has it: float32 (a half/bfloat16/float64 model's float32 values; model.eval() of
    # a half model met float32 inputs: "Input type (float) and bias type (c10::Half)"), baked weights, no wrappers
    reference = plain_copy(unwrap(model)).eval()
    _check_same_weights(onnx_model, model, args)
    data_flag = "--data"
    if args.calib and not args.data:  # one file for both (--calib was another name of --data before 0.9.7)
        args.data, args.calib, data_flag = args.calib, None, "--calib"
    if args.data and args.samples is not None:  # it was ignored: "validation on 64 inputs" after --samples 10
        which = "--data" if data_flag == "--data" else "--calib (the inputs compared on when --data is not given)"
        raise UserError(f"--samples sets the number of random inputs; with {which} every sample of the file is "
                        f"used (drop --samples, or pass a {data_flag} file with fewer samples)")
    if args.samples is None:
        args.samples = 16
    data = load_array_file(args.data, data_flag, several=True) if args.data else None
    data = resolve_named(data, forward_inputs(model), recorded_inputs(onnx_model))
    if data is not None:  # one array, or x0, x1, ... of a .npz for a model with several inputs
        arrays = data if isinstance(data, tuple) else (data,)
        inputs = tuple(torch.from_numpy(a.astype("float32") if a.dtype.kind == "f" else a) for a in arrays)
        for text, t in zip(args.input_shape or (), inputs):  # --input-shape beside --data: they must agree
            shape = parse_input_shape(text)
            if tuple(shape[1:]) != tuple(t.shape[1:]):
                raise UserError(f"--input-shape {text} does not match the {data_flag} samples of shape "
                                f"{tuple(t.shape[1:])}; drop --input-shape ({data_flag} gives the shape)")
    else:
        if args.input_shape:
            shapes = [parse_input_shape(text) for text in args.input_shape]
        else:
            free = sorted(_file_dynamic_axes(onnx_model))
            if free:  # random inputs of size 1 there: a size no example had (the file does not record one)
                raise UserError(f"{args.onnx!r} takes inputs of any size on axes {','.join(map(str, free))} "
                                "(--dynamic-axes); give the inputs to validate on: --data FILE, or --input-shape "
                                "N,C,H,W for random ones")
            shapes = _input_shapes_from_onnx(onnx_model)
        if not shapes:
            raise UserError("cannot tell the input shape; pass --input-shape N,C,H,W or --data FILE")
        not_float = [(i.name, onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name)
                     for i in _graph_inputs(onnx_model) if i.type.tensor_type.elem_type not in
                     (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)]
        if not_float:  # token ids or a mask: random floats are no input for it
            name, dtype = not_float[0]
            raise UserError(f"{args.onnx!r} takes {dtype} input {name!r} (token ids or a mask), which random "
                            "inputs cannot stand for; pass --data FILE (.npy, or .npz with x0, x1, ...) with real "
                            "inputs, such as the calibration data")
        for shape in shapes:  # past int64: torch.randn's "Overflow when unpacking long long", an internal error
            values = args.samples * math.prod(shape[1:])
            if values > MAX_TENSOR_VALUES:
                raise UserError(f"--samples {args.samples} random inputs of shape {tuple(shape[1:])} are {values} "
                                "values, more than a tensor can hold; use fewer --samples (the default is 16)")
        gen = torch.Generator().manual_seed(1)
        inputs = tuple(torch.randn((args.samples,) + tuple(shape[1:]), generator=gen) for shape in shapes)
    given = data_flag if data is not None else (f"--input-shape (with --samples {args.samples})" if args.input_shape
                                               else f"--samples {args.samples}")
    _check_inputs_fit(onnx_model, inputs, args.onnx, given)
    # integer inputs (token ids) in the file's own integer type: --data's arrays are read as int64. One graph input
    # per model input, None for one the model never reads (not in the file; its array stays for the simulation)
    from qcompile.runtime.session import file_inputs, recorded_inputs

    graph_inputs = _graph_inputs(onnx_model)
    picked = {id(t): g for t, g in zip(file_inputs([g.name for g in graph_inputs], inputs,
                                                   recorded_inputs(onnx_model)), graph_inputs)}
    graph_of = [picked.get(id(t)) for t in inputs]
    types = [g.type.tensor_type.elem_type if g is not None else 0 for g in graph_of]
    for graph_input, t, e in zip(graph_of, inputs, types):
        if data is not None and t.is_floating_point() and e not in (0, onnx.TensorProto.BOOL) and \
                onnx.helper.tensor_dtype_to_np_dtype(e).kind in "iu":  # the compile refuses float ids the same way
            raise UserError(f"--data holds floats for input {graph_input.name!r} of {args.onnx!r}, which takes "
                            "integer ids (an Embedding): save them as integers (ids.astype(np.int64)), as the compile "
                            "took them")
    def file_types(tensors):
        return tuple(t.to(getattr(torch, onnx.helper.tensor_dtype_to_np_dtype(e).name))
                     if not t.is_floating_point() and t.dtype != torch.bool and e not in (0, onnx.TensorProto.BOOL)
                     and onnx.helper.tensor_dtype_to_np_dtype(e).kind in "iu" else t
                     for t, e in zip(tensors, types))

    inputs = file_types(inputs)
    example = tuple(t[:1] for t in inputs)
    inputs = inputs[0] if len(inputs) == 1 else inputs
    calib = None  # --calib beside --data: the compile's calibration inputs, which rebuild the simulation
    if args.calib:
        loaded = resolve_named(load_array_file(args.calib, "--calib", several=True), forward_inputs(model),
                               recorded_inputs(onnx_model))
        calib = tuple(torch.from_numpy(a.astype("float32") if a.dtype.kind == "f" else a)
                      for a in (loaded if isinstance(loaded, tuple) else (loaded,)))
        n_data = len(inputs) if isinstance(inputs, tuple) else 1
        free = _file_dynamic_axes(onnx_model)  # a file compiled with --dynamic-axes takes other sizes there

        def fixed(t):
            return tuple(d for a, d in enumerate(t.shape) if a > 0 and a not in free)

        if len(calib) != n_data or any(c.dim() != d.dim() or fixed(c) != fixed(d) for c, d in
                                       zip(calib, inputs if isinstance(inputs, tuple) else (inputs,))):
            raise UserError(f"--calib holds samples of shape {', '.join(str(tuple(c.shape[1:])) for c in calib)}, "
                            "--data of shape "
                            f"{', '.join(str(tuple(d.shape[1:])) for d in (inputs if isinstance(inputs, tuple) else (inputs,)))}"
                            "; give the compile's calibration file as --calib and held-out inputs of the same "
                            "shape as --data")
        calib = file_types(calib)
        example = tuple(t[:1] for t in calib)  # the rebuilt simulation is traced at the compile's size
        calib = calib[0] if len(calib) == 1 else calib
    opts = _file_options(onnx_model)
    qat = next((p.value for p in onnx_model.metadata_props if p.key == "qcompile.qat"), None)
    if qat is not None:  # its parameters were trained: calibrating --against afresh gives another simulation
        raise UserError(f"{args.onnx!r} was exported from a QAT-trained model ({qat}); its quantizers were learned, "
                        "not calibrated, so validate cannot rebuild them from --against: validate from Python, where "
                        "qcompile.compile(trained_model) and qcompile.qat.export(trained_model, ...) check the file "
                        "against the trained model")
    thresholds = dict(min_sqnr=args.min_sqnr, max_abs=args.max_abs, min_top1=args.min_top1)
    given_leaves = list(getattr(args, "leaf_module", None) or [])
    if given_leaves:  # accepted and silently ignored before: the recorded options rebuild the simulation
        recorded_leaves = list((opts or {}).get("leaf_modules") or [])
        if not opts or opts.get("scheme") == "fp32":
            raise UserError(f"--leaf-module does not apply to {args.onnx!r}, a float file (validate runs the model "
                            "itself, nothing is traced); drop it")
        if sorted(given_leaves) != sorted(recorded_leaves):
            shown = ", ".join(recorded_leaves) if recorded_leaves else "none"
            raise UserError(f"validate rebuilds the simulation of {args.onnx!r} with the leaf modules its compile "
                            f"recorded ({shown}), not --leaf-module {', '.join(given_leaves)}; drop --leaf-module")
    bodiless = sorted({n.op_type for n in onnx_model.graph.node if n.domain == "qcompile"}
                      - {f.name for f in onnx_model.functions if f.domain == "qcompile"})
    if bodiless:
        raise UserError(f"{args.onnx!r} uses qcompile.{bodiless[0]} without its function body (onnx.version_converter "
                        "drops model-local functions, and onnxruntime then refuses the file): convert the standard "
                        "form (--emit standard), or recompile")
    if not opts and _quantized_nodes(onnx_model):
        raise UserError(f"{args.onnx!r} has quantization nodes but no qcompile metadata (metadata_props, which "
                        "tools such as onnx-graphsurgeon drop): validate the file qcompile wrote, or copy its "
                        "metadata_props into this one (a file of a pass pipeline of your own: validate it from "
                        "Python, qcompile.runtime.validate(file, gm, inputs))")
    if (not opts or opts.get("scheme") == "fp32") and calib is not None:
        raise UserError(f"--calib rebuilds the simulation of a quantized file; {args.onnx!r} is a float file, "
                        "compared with the model on --data: drop --calib")
    if not opts or opts.get("scheme") == "fp32":
        _check_reference_runs(reference, example, args, given)
        if all(v is None for v in thresholds.values()):
            thresholds["min_sqnr"] = 80.0  # as a compile's own check: relative error <= 1e-4
        try:
            report = rv.validate_model(args.onnx, reference, inputs, rounding_scale=args.min_sqnr is None,
                                       **thresholds)
            if report.extra.get("shape_mismatch"):  # another model than the file's: a mistake in the command
                raise ValueError(report.failures[0])
            if not opts:  # a file from another tool (torch.onnx.export): say how it was taken
                said = report.extra.get("reference")
                report.extra["reference"] = (f"{said or 'the model'}; the file has no qcompile metadata, so it is "
                                             "compared as a float file")
            return report
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error type
            _onnxruntime_refused(e, args)
            if not isinstance(e, ValueError):
                raise
            raise UserError(f"{args.onnx!r} does not give --against's outputs ({e}); give the model the file was "
                            "compiled from") from None
    # A quantized file: rebuild its simulation with the options recorded in the file.
    from .api import compile as qcompile_compile

    recorded = _calibration_record(onnx_model)
    # since 0.4 a file calibrated on data always records it: without a record it was calibrated data-free (from
    # BatchNorm statistics), and --data is validation input only (calibrating the simulation on it gave another
    # simulation: 23-45% of a correct file's codes differed). An older file without one was calibrated on --data.
    written = next((p.value for p in onnx_model.metadata_props if p.key == OPTIONS_KEY), "{}")
    try:
        version = _version(json.loads(written).get("qcompile", "0"))
    except (ValueError, AttributeError):
        version = (0,)
    data_free = recorded is None and version >= (0, 4)
    if calib is not None and data_free:
        raise UserError(f"{args.onnx!r} was calibrated without data (from BatchNorm statistics), so there is no "
                        "calibration data to rebuild it from: drop --calib (validate on --data alone)")
    rebuild = calib if calib is not None else inputs if data is not None else None
    if rebuild is None and recorded is not None:  # the simulation cannot be rebuilt data-free (compile's refusal
        # named --keep-first-last and --calib, options of the compile, not of validate)
        raise UserError(f"{args.onnx!r} was calibrated on {recorded.get('samples', 'its')} samples; validate rebuilds "
                        "its simulation by calibrating on the same inputs: pass them with --calib FILE (the --calib "
                        "file of the compile; --data FILE then gives other inputs to compare on)")
    if rebuild is not None and recorded is not None:
        from .api import calibration_fingerprint

        flag = "--calib" if calib is not None else data_flag
        if calibration_fingerprint(rebuild) != recorded.get("sha256"):
            raise UserError(f"{flag} is not the calibration data {args.onnx!r} was compiled with "
                            f"({recorded.get('samples')} samples); validate rebuilds the simulation by calibrating on "
                            "it, so pass those inputs as --calib (the --calib file of the compile), and held-out "
                            "inputs to compare on as --data")

    opts = dict(opts)
    scheme, bits = opts.pop("scheme"), opts.pop("bits", 4)
    try:
        sim = qcompile_compile(model, example, scheme=scheme, bits=bits,
                               calib=rebuild if rebuild is not None and not data_free else None,
                               output=None, validate=False, **opts)
    except UserError as e:
        if data_free and "without data" in str(e):  # the record a data-free compile leaves out is missing here
            raise UserError(f"{args.onnx!r} has no calibration record (qcompile.calibration), which only a data-free "
                            "compile leaves out, but its model cannot be calibrated without data: the file's metadata "
                            "was edited or lost; compile the model again with --calib (the file then records its "
                            "calibration inputs)") from None
        raise
    mine, theirs = len(onnx_model.graph.output), len(sim.onnx_model.graph.output)
    if mine != theirs:
        raise UserError(f"{args.onnx!r} has {mine} output(s) but the model it is checked against gives {theirs}; "
                        "validate the file qcompile wrote (an output added to or removed from it cannot be "
                        "compared), or pass the model it was compiled from")
    _check_same_graph(onnx_model, sim.onnx_model, args)
    _check_same_quantizers(onnx_model, sim.onnx_model, args, written)
    from .api import _check_token_ids

    # token ids beyond an embedding's rows: the compile's one line, not an IndexError in the simulation (negative
    # ids) nor onnxruntime's Gather error blamed on the file
    _check_token_ids(sim.model, inputs, data_flag if data is not None else "--data")
    try:
        with torch_threads(compile_threads(reference, inputs if isinstance(inputs, tuple) else (inputs,))):
            return rv.validate_quantized(args.onnx, sim.model, inputs, float_model=reference, **thresholds)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own error type
        if "does not exist in the graph" not in str(e):
            _onnxruntime_refused(e, args)
            raise
        raise UserError(f"{args.onnx!r} no longer has the activations its qcompile metadata names: its graph was "
                        "rewritten (an onnxruntime-optimized file fuses them away); validate the file qcompile "
                        "wrote") from None
