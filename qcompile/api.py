"""The Python API: ``qcompile.compile`` mirrors the ``qcompile`` command line."""
from __future__ import annotations

import collections.abc
import contextlib
import copy
import dataclasses
import json
import math
import os
import time
import warnings
from typing import Callable, Optional

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompile.passes.base import PassTiming, Pipeline
from qcompile.passes.calibrate import INITIAL_BATCHNORM_STATS, PARTIAL_BATCHNORM_STATS
from qcompile.passes.synthetic import DISTILLED
from qcompile.runtime.validation import ValidationReport, validate_model

from . import dynamic
from . import export as export_mod
from .errors import QuantizationWarning, UserError, user_stacklevel
from .frontend import check_materialized, check_not_exported, float_reference, keeps_global_rng, load_model, plain_copy, running_stats_as_batchnorm, trace, unwrap
from .options import OPTIONS_KEY, CompileOptions, int8_grid_note, resolve_int8_weights, to_metadata as options_metadata
from .pipeline import build_passes
from .threads import DeferredThreads


@dataclasses.dataclass
class CompileResult:
    model: torch.fx.GraphModule          #: the simulation GraphModule (fake-quantized; float for fp32)
    onnx_path: Optional[str]              #: where the ONNX file was written (None when output=None)
    onnx_model: onnx.ModelProto           #: the emitted ONNX model
    report: Optional[ValidationReport]    #: validation of the ONNX file against ``model``
    options: CompileOptions
    timings: list[PassTiming]
    seconds: float
    summary: dict = dataclasses.field(default_factory=dict)


def model_input(t) -> torch.Tensor:
    """A tensor or array as a model input: floating point as float32; integers (token ids, indices) and booleans
    keep their type, so an ``nn.Embedding`` still gets integers."""
    t = torch.from_numpy(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) else torch.as_tensor(t).detach()
    # the same values, the same file: a slice x[:32] of (N, 1, 8, 8) images has strides (64, 1, 8, 1), where
    # np.load gives (64, 64, 8, 1); the layout the kernels saw changed float sums and calibrated another file
    t = t.clone(memory_format=torch.contiguous_format) if t.stride() != _plain_strides(t.shape) else t
    if t.is_floating_point():
        return t.float()
    if t.is_complex():
        raise UserError(f"complex inputs are not supported (got {t.dtype}); give real tensors")
    return t


def _plain_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


def as_input_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    # floating point as float32, as calibration data (a float64 example met the float32 model the passes build)
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        return (model_input(example_inputs),)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and \
            all(isinstance(t, (torch.Tensor, np.ndarray)) for t in example_inputs):
        return tuple(model_input(t) for t in example_inputs)
    raise UserError("example_inputs must be a tensor or a tuple of tensors")


# what is read of an iterable of batches (a DataLoader, a generator): an endless one (itertools.cycle) grew memory
# at 0.5 GB/s until the kernel killed the process, and a training set's loader would be read whole. Arrays and
# tensors are in memory already and are taken whole.
MAX_ITERABLE_SAMPLES = 4096
MAX_ITERABLE_BYTES = 1 << 30


def _item_samples(item) -> tuple[int, int]:
    """(samples, bytes) of one batch: a tensor/array, or a tuple whose first item (or first item's first) is one."""
    first = item
    while isinstance(first, (tuple, list)) and first:
        first = first[0]
    n = int(first.shape[0]) if isinstance(first, (torch.Tensor, np.ndarray)) and first.ndim >= 1 else 1
    tensors = item if isinstance(item, (tuple, list)) else (item,)
    size = sum(int(t.nbytes) for t in tensors if isinstance(t, (torch.Tensor, np.ndarray)))
    return n, size


def bounded_batches(calib, what: str = "calibration"):
    """The batches of an iterable, up to :data:`MAX_ITERABLE_SAMPLES` samples or :data:`MAX_ITERABLE_BYTES`; a
    warning says so where more were left unread."""
    samples = size = 0
    it = iter(calib)
    for item in it:
        yield item
        n, b = _item_samples(item)
        samples, size = samples + n, size + b
        if samples >= MAX_ITERABLE_SAMPLES or size >= MAX_ITERABLE_BYTES:
            if next(it, _END) is not _END:
                warnings.warn(f"the {what} iterable was read up to {samples} samples ({size / 2 ** 20:.0f} MiB) and "
                              f"no further (at most {MAX_ITERABLE_SAMPLES} samples or 1 GiB are read from an "
                              "iterable: an endless or training-set loader would fill the memory); to choose the "
                              "samples, pass an array or itertools.islice(loader, n_batches)",
                              QuantizationWarning, stacklevel=user_stacklevel())
            return


_END = object()


def calib_tensor(calib, what: str = "calibration") -> Optional[torch.Tensor]:
    """Stack a calibration source (tensor, array, or iterable of batches / (x, y) pairs) into one tensor
    (float32, or the integer type of integer inputs such as token ids). One ``(x, y)`` pair of a whole labelled set
    (inputs, then one label per sample: another sample shape) gives ``x``."""
    if calib is None:
        return None
    if isinstance(calib, (torch.Tensor, np.ndarray)):
        return model_input(calib)
    if isinstance(calib, collections.abc.Mapping):  # its keys were taken for batches: "a calibration batch is a str"
        raise UserError(_mapping_message(calib, what, batches=False))
    if isinstance(calib, (tuple, list)) and len(calib) == 2 and \
            all(isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim >= 1 for t in calib) and \
            calib[0].shape[0] == calib[1].shape[0] and tuple(calib[0].shape[1:]) != tuple(calib[1].shape[1:]) and \
            calib[1].ndim == 1:
        return model_input(calib[0])  # (x, y): the inputs and their labels
    parts = []
    for item in bounded_batches(calib, what):
        if isinstance(item, collections.abc.Mapping):  # batches of a tokenizer's BatchEncoding, of dicts
            raise UserError(_mapping_message(item, what, batches=True))
        if isinstance(item, (tuple, list)):
            item = item[0]
        if isinstance(item, (tuple, list)) and item and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in item):
            raise UserError(f"the {what} batches are ((x1, x2, ...), label) with {len(item)} inputs, but the model is "
                            f"traced with 1 (forward's other inputs have defaults): give example_inputs with one "
                            f"tensor per input (example_inputs=(x1[:1], x2[:1]))")
        if not isinstance(item, (torch.Tensor, np.ndarray)):
            raise UserError(f"a {what} batch is a {type(item).__name__}; give tensors or arrays (N, ...), or "
                            "(inputs, labels) pairs, as a DataLoader over a TensorDataset yields them")
        parts.append(model_input(item))
    if not parts:
        raise UserError(f"the {what} data is empty; give at least one batch")
    _check_batches_agree(parts, what=what)
    return torch.cat(parts)


def _mapping_message(data, what: str, batches: bool) -> str:
    """A dict (or a tokenizer's BatchEncoding, a UserDict) given as calibration data or as its batches: what to give
    instead, with its own keys."""
    kind = "dict" if type(data) is dict else f"{type(data).__name__} mapping"
    keys = list(data)[:4]
    d = "batch" if batches else "d"
    example = f"{d}[{keys[0]!r}]" if len(keys) == 1 else f"({', '.join(f'{d}[{k!r}]' for k in keys[:2])})"
    if batches:
        return (f"the {what} batches are {kind}s (keys {', '.join(map(repr, keys))}); give each batch as a tensor, "
                f"or for several inputs a tuple in forward's argument order: {example}")
    return (f"the {what} data is a {kind} (keys {', '.join(map(repr, keys))}); give the inputs as a tensor or array "
            f"(N, ...), or for several inputs a tuple in forward's argument order: calib={example}")


def extra_items_note(model: nn.Module, calib) -> Optional[str]:
    """A note where calibration batches of several items feed the model their first alone while its forward takes
    more positional inputs (with defaults, as every HuggingFace argument has) and a dropped item has the first's
    sample shape: (input_ids, attention_mask) batches compiled ``model(input_ids)``, a file 13.5 dB from the model
    with its mask, and validation passed (it compares the file with the same maskless graph). Such an item may be
    token labels too, so it is said, not guessed. ``calib``: a list or other re-iterable of batches."""
    if isinstance(calib, (torch.Tensor, np.ndarray, collections.abc.Mapping)) or calib is None:
        return None
    if isinstance(calib, torch.utils.data.Dataset):  # samples without a batch axis: batched, as calib_data does
        calib = torch.utils.data.DataLoader(calib, batch_size=2)
    try:
        first = next(iter(calib), None)
    except TypeError:
        return None
    if not isinstance(first, (tuple, list)) or len(first) < 2 or \
            not all(isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim >= 1 for t in first):
        return None
    names = model_input_names(model)
    if names is None or len(names) < 2:
        return None
    sample = tuple(first[0].shape[1:])
    # a mask of the first input's samples (input_ids' (T,), a key padding mask's (T,) of (T, d) features); labels of
    # a sample each, or of another shape (a segmentation map of (C, H, W) images), are no such item
    like = [i for i, t in enumerate(first[1:len(names)], 1)
            if 0 < len(t.shape[1:]) <= len(sample) and tuple(t.shape[1:]) == sample[:len(t.shape[1:])]
            and not any(word in names[i].lower() for word in ("label", "target"))]  # forward(x, labels=None)
    if not like:
        return None
    i = like[0]
    return (f"the calibration batches hold {len(first)} items and only the first was given to the model "
            f"({names[0]!r}); item {i + 1} ({first[i].dtype} of shape {list(first[i].shape)}, shaped as the first's "
            f"samples) was taken as a label, not as forward's {names[i]!r}: if it is an input (a mask), give one "
            "tensor per input (calib=(x1, x2), or example_inputs=(x1[:1], x2[:1]) with the batches)")


def _check_batches_agree(parts: list[torch.Tensor], which: str = "", what: str = "calibration") -> None:
    """Calibration batches must share the sample shape and type, so that they stack into one (N, ...) tensor."""
    first = parts[0]
    for i, t in enumerate(parts[1:], 1):
        if t.dim() == 0 or first.dim() == 0 or tuple(t.shape[1:]) != tuple(first.shape[1:]) or t.dtype != first.dtype:
            raise UserError(f"{which}{what} batch {i} has samples of shape {tuple(t.shape[1:])} ({t.dtype}) but "
                            f"batch 0 has {tuple(first.shape[1:])} ({first.dtype}); give batches of one sample shape "
                            "and type")


CALIBRATION_KEY = "qcompile.calibration"


def calibration_fingerprint(calib_x) -> str:
    """SHA-256 (first 16 hex digits) of the calibration inputs as the passes saw them: dtype, shape and bytes of
    each part. ``qcompile validate`` rebuilds the simulation by calibrating on its ``--data``, so it compares."""
    import hashlib

    h = hashlib.sha256()
    for t in calib_x if isinstance(calib_x, tuple) else (calib_x,):
        t = t.detach().contiguous().cpu()
        if not t.is_floating_point() and t.dtype != torch.bool:
            t = t.to(torch.int64)  # ids are ids: int32 ids and the int64 ones an .npy gives back are the same data
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


MODEL_KEY = "qcompile.model"  # metadata: {"sha256": sampled, "sha256_all": every value} of the float model


def model_fingerprint(model: nn.Module, sampled: bool = False) -> str:
    """SHA-256 (first 16 hex digits) of the float model's state: each floating tensor's shape and values, as float32.
    ``qcompile validate`` compares it: against another checkpoint, the rebuilt simulation differs from the file,
    and the failure read as a broken file ("27.3% of activation codes differ").

    ``sampled``: up to 4096 evenly spaced values per tensor, what files of 0.7.1-0.7.2 record (key ``sha256``); a
    checkpoint with a few weights edited (pruned, patched) between the samples had the same fingerprint, and its
    validation failed as if the file were broken. All values cost ~30 ms on ResNet-18's 46 MB."""
    import hashlib

    from .frontend import unwrap

    h = hashlib.sha256()
    state = unwrap(model).state_dict()
    if not sampled:
        # torch.nn.utils.prune's weight_orig/weight_mask as the weight they make (the CLI's loader bakes them, and
        # the same model compiled from Python was refused by validate), and the tensors by name, not in the order
        # modules registered them (a baked weight comes back where the pruned one was)
        masks = {k[:-len("_mask")] for k in state if k.endswith("_mask") and k[:-len("_mask")] + "_orig" in state}
        baked = {}
        for k, v in state.items():
            if k.endswith("_mask") and k[:-len("_mask")] in masks:
                continue
            if k.endswith("_orig") and k[:-len("_orig")] in masks:
                k, v = k[:-len("_orig")], v * state[k[:-len("_orig")] + "_mask"]
            baked[k] = v
        state = dict(sorted(baked.items()))
    for t in state.values():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue  # num_batches_tracked and other counters say nothing of the function
        try:
            flat = t.detach().reshape(-1)
            if sampled and flat.numel() > 4096:
                # float32 positions (what 0.7.1-0.7.2 recorded), clamped: past 2**24 values the last one rounds up
                # to numel (VGG-11's 102,760,448-value classifier weight: IndexError, no file)
                flat = flat[torch.linspace(0, flat.numel() - 1, 4096).long().clamp_(max=flat.numel() - 1)]
            values = memoryview(flat.cpu().to(torch.float32).contiguous().numpy()).cast("B")
        except (RuntimeError, TypeError, NotImplementedError):  # a sparse or otherwise unusual tensor: its shape
            values = b""
        h.update(str(tuple(t.shape)).encode())
        h.update(values)
    return h.hexdigest()[:16]


def model_input_count(model: nn.Module) -> int:
    """Positional inputs ``model.forward`` requires (parameters without defaults; at least 1)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.default is p.empty]
    return max(1, len(required))


def model_input_names(model: nn.Module) -> Optional[list[str]]:
    """The names of the positional inputs ``model.forward`` accepts (with or without defaults); None when it takes
    ``*args`` or its signature cannot be read."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


# what compile() may still choose for a QAT-trained model: the file's form, not what the layers compute
_FORM_OPTIONS = ("emit", "check", "int8_weights", "leaf_modules", "dynamic_axes")  # the file's form, not its numbers
# post-training steps that qat.prepare refuses: "pass them to prepare" is no advice for them
_PTQ_ONLY = ("avg_wbits", "weight_rounding", "bias_correction")


def _trained_options(cfg, opts: CompileOptions, asked: dict, options: dict) -> CompileOptions:
    """The options of a model trained with ``qcompile.qat`` (``cfg.options``, those of ``prepare``) with this
    call's form options. The passes re-decided layers from this call's options: a layer that ``prepare`` excluded
    (or kept float as first/last) was quantized and calibrated anew, and the file recorded a scheme and bit-width
    it did not have. Other options that differ from the trained ones are refused."""
    trained = cfg.options
    given = {k: v for k, v in options.items() if k not in _FORM_OPTIONS}
    given.update(asked)  # scheme/bits given explicitly
    probe = dataclasses.replace(trained, **given) if given else trained
    # bit-widths and schemes by what the layers get (after qat.change_bits, bits=2 of W2A2 layers is no change)
    effective_of = {"bits": lambda o: (o.weight_bits, o.act_bits), "wbits": lambda o: o.weight_bits,
                    "abits": lambda o: o.act_bits, "scheme": lambda o: (o.weight_scheme, o.act_scheme),
                    "wscheme": lambda o: o.weight_scheme, "ascheme": lambda o: o.act_scheme}
    differ = [k for k in given if (effective_of[k](probe) != effective_of[k](trained) if k in effective_of
                                   else getattr(probe, k) != getattr(trained, k))]
    if "bits" in given and "bits" not in differ and "wbits" not in given and "abits" not in given \
            and given["bits"] != trained.bits \
            and (given["bits"], given["bits"]) != (trained.weight_bits, trained.act_bits):
        # after qat.change_bits(wbits=3, abits=3) the trained wbits/abits hide bits in the probe: bits=5 was taken
        # without a word for a W3A3 file (bits= as prepare had it, or as the layers have it, is no change)
        differ.append("bits")
    if differ:
        effective = {"wbits": trained.weight_bits, "abits": trained.act_bits, "wscheme": trained.weight_scheme,
                     "ascheme": trained.act_scheme}  # what None means there
        values = {k: effective[k] if getattr(trained, k) is None and k in effective else getattr(trained, k)
                  for k in differ}
        if "bits" in values and (trained.weight_bits, trained.act_bits) != (trained.bits, trained.bits):
            values["bits"] = f"W{trained.weight_bits}A{trained.act_bits}"  # qat.change_bits moved them from bits
        now = ", ".join(f"{k}={v!r}" if k != "bits" or isinstance(v, int) else f"layers at {v}"
                        for k, v in values.items())
        ptq = [k for k in differ if k in _PTQ_ONLY]
        retrain = [k for k in differ if k not in _PTQ_ONLY]
        advice = []
        if retrain:
            advice.append(f"drop {', '.join(retrain)} here, or pass {'it' if len(retrain) == 1 else 'them'} to "
                          "prepare and train again")
        if ptq:  # prepare refuses them: its own advice would send the user in a circle
            advice.append(f"drop {', '.join(ptq)} ({'a post-training step' if len(ptq) == 1 else 'post-training steps'}"
                          f": a trained model's weights and bit-widths are already chosen; for bit-widths per layer in "
                          "QAT, give prepare config=)")
        raise UserError(f"this model was trained with qcompile.qat.prepare, whose options fix what its layers compute "
                        f"({now}); {'; '.join(advice)}")
    return dataclasses.replace(trained, **{k: getattr(opts, k) for k in _FORM_OPTIONS})


def _check_finite_model(gm: torch.fx.GraphModule) -> None:
    """The weights of layers and normalisations and BatchNorm statistics must be finite (other tensors: no NaN), and
    every BatchNorm's ``running_var + eps`` positive: a corrupted or badly converted checkpoint stopped in
    calibration as "a qcompile bug" (a NaN scale), and at fp32 its NaN outputs compared as PASS."""
    bn_stats = {f"{n.target}.{k}" for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
                for k in ("running_mean", "running_var")}
    # weights of the layers and normalisations: finite; any other tensor (a frozen Parameter holding a -inf mask) may
    # hold -inf/inf on purpose, and only NaN is refused there
    weighted = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.Embedding, nn.LayerNorm,
                nn.GroupNorm, nn.EmbeddingBag)
    params = {f"{m_name}.{p_name}" if m_name else p_name for m_name, m in gm.named_modules() if isinstance(m, weighted)
              for p_name, _ in m.named_parameters(recurse=False)}
    named = [(name, t) for name, t in list(gm.named_parameters()) + list(gm.named_buffers()) if t.is_floating_point()]
    named = [(name, t) for name, t in named if t.numel()]
    if named:
        # each tensor's extremes first (one pass; NaN propagates, inf is an extreme): only a tensor with a non-finite
        # one is counted element-wise below. Four operations per tensor were 1 ms of a small compile, and a float64
        # sum per tensor 36 ms of a ResNet-18's (aminmax: 4 ms)
        with torch.no_grad():
            ends = torch.stack([torch.stack(torch.aminmax(t.detach())).float() for _, t in named])
        named = [item for item, ok in zip(named, torch.isfinite(ends).all(dim=1).tolist()) if not ok]
    for name, t in named:
        # a buffer may hold -inf/inf on purpose (a causal mask above the diagonal); NaN, or a non-finite weight or
        # BatchNorm statistic, is a broken checkpoint
        param = name in bn_stats or name in params
        bad = int((~torch.isfinite(t)).sum()) if param else int(torch.isnan(t).sum())
        if bad:
            raise UserError(f"{name!r} holds {bad} {'NaN or inf' if param else 'NaN'} value(s) of {t.numel()}; the "
                            "model computes no finite output: fix the checkpoint (or the training that wrote it)")
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_var is not None:
                low = mod.running_var.double() + mod.eps
                if bool((low <= 0).any()):
                    raise UserError(f"{type(mod).__name__} {node.target!r} has running_var + eps <= 0 in "
                                    f"{int((low <= 0).sum())} channel(s): it divides by the square root of it; fix "
                                    "the checkpoint's running_var (a variance is >= 0) or give eps > 0")


def _check_batch_statistics(gm: torch.fx.GraphModule) -> None:
    """A BatchNorm without running statistics (``track_running_stats=False``) normalises every batch with that
    batch's own mean and variance, in eval mode too: an output that depends on the other samples of the batch,
    which no per-sample inference file computes (torch.onnx stopped on it with an AssertionError)."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is None:
                raise UserError(f"{node.target} ({type(mod).__name__}) has no running statistics "
                                "(track_running_stats=False): it normalises each batch with its own statistics, "
                                "which an inference file cannot; train it with running statistics, or use "
                                "InstanceNorm/GroupNorm/LayerNorm there")


def _note_initial_batch_statistics(gm: torch.fx.GraphModule) -> None:
    from qcompile.passes.fold_bn import note_initial_batch_statistics

    note_initial_batch_statistics(gm)


def check_input_count(model: nn.Module, given: int, source: str) -> None:
    """More inputs than ``forward`` takes, or a keyword-only one without a default: one line naming them (instead
    of a TypeError from tracing, which blamed --input-shape and --calib)."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    required = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if required:
        raise UserError(f"the model's forward takes keyword-only input(s) without a default ({', '.join(required)}), "
                        "and qcompile passes a model's inputs by position: give them defaults, or wrap the model in a "
                        "module whose forward takes them positionally")
    names = model_input_names(model)
    if names is not None and given > len(names):
        from .frontend import _container_inputs

        containers = _container_inputs(model)
        hint = (f"; forward reads {', '.join(containers)} as a tuple, list or dict, and qcompile passes one tensor "
                "per input: wrap the model in a module whose forward takes the tensors and builds the container, "
                "and compile that") if containers else ""
        raise UserError(f"the model's forward takes {len(names)} input(s) ({', '.join(names) or 'none'}) but {given} "
                        f"were given ({source}); give one array (or --input-shape) per input{hint}")
    need = model_input_count(model)
    if names is not None and given < need:
        raise UserError(f"the model's forward needs {need} input(s) ({', '.join(names[:need])}) but {given} "
                        f"{'was' if given == 1 else 'were'} given ({source}); give one array per input (an .npz with "
                        f"x0, x1, ...) or one --input-shape per input")


def check_calibration_data(calib_x, example_inputs: tuple, what: str = "calibration data",
                           option: str = "--calib", free_axes: tuple = ()) -> None:
    """Calibration (or validation) inputs must be finite and have, sample for sample, the shape and kind of type
    of the example inputs the model is traced (and the file exported) with: one-line errors here instead of a
    failing pass, or a failing onnxruntime run after the file is written."""
    parts = calib_x if isinstance(calib_x, tuple) else (calib_x,)
    if len(parts) != len(example_inputs):
        raise UserError(f"{what} has {len(parts)} input(s) but the model is traced with {len(example_inputs)}; give "
                        f"one array per model input ({option})")
    # each float part's extremes in one pass (aminmax propagates NaN, and +inf is a maximum): the element-wise
    # counts below run only where one is not finite (four passes over 32 ImageNet images took 25 ms)
    extremes = [tuple(float(v) for v in torch.aminmax(c)) if c.is_floating_point() and c.numel() else None
                for c in parts]
    # a constant input beside one that varies (a padding mask of all ones when no text was padded, a flag) is
    # real data; only calibration with nothing that varies sets the ranges from nothing
    varied = any(c.numel() > 1 and (ext[0] != ext[1] if ext is not None else bool((c != c.reshape(-1)[0]).any()))
                 for c, ext in zip(parts, extremes))
    for i, (c, e) in enumerate(zip(parts, example_inputs)):
        which = f"input {i} of the " if len(parts) > 1 else ""
        if c.dim() == 0 or c.shape[0] == 0:
            raise UserError(f"{which}{what} holds no samples (shape {tuple(c.shape)}); give a batch-first array "
                            f"with at least one input ({option})")
        if c.is_floating_point() and extremes[i] is not None:
            lo, hi = extremes[i]
            # -inf is a float attention/padding mask's "masked out" (PyTorch's convention): allowed; the
            # calibration reports it where it reaches a quantizer
            bad = int((torch.isnan(c) | (c == float("inf"))).sum()) if not math.isfinite(hi) else 0
            if bad:
                raise UserError(f"{which}{what} holds {bad} NaN or +inf value(s); give finite inputs ({option})")
            if c.numel() > 1 and lo == hi and option.startswith("--calib") and not varied:
                raise UserError(f"{which}{what} is constant (every value is {float(c.min()):g}); activation "
                                "ranges are set from it: give real model inputs (--calib)")
        check_sample_shape(c, e, i, len(parts), what, option, free_axes=free_axes)


def check_sample_shape(c: torch.Tensor, e, i: int, n_parts: int, what: str = "calibration data",
                       option: str = "--calib",
                       example: str = "--input-shape, or example_inputs from Python", free_axes: tuple = ()) -> None:
    """Part ``i`` (of ``n_parts``) of calibration or validation data, ``c`` (batch first), against the example input
    ``e`` the model is traced with: the same shape per sample and the same kind of type, or one line saying how
    they differ (labels, channels last, single samples, an example without its batch axis, integers for floats)."""
    which = f"input {i} of the " if n_parts > 1 else ""
    if isinstance(e, torch.Tensor) and tuple(e.shape) == tuple(c.shape[1:]) and e.dim() < c.dim():
        # (1, 1, 8, 8) samples of (1, 1, 8, 8) examples: an example without its batch axis, or data with an
        # axis too many (--input-shape is batch-first: following the first fix alone failed again)
        extra = (f", or, if the model takes samples of shape {tuple(e.shape[1:])}, drop the extra axis of the "
                 f"{what} (x[:, 0], x.squeeze(1))") if c.dim() > 1 and c.shape[1] == 1 else ""
        raise UserError(f"the example input{f' {i}' if n_parts > 1 else ''} has shape {tuple(e.shape)}, the "
                        f"shape of one {what} sample: give it batch-first, shape {(1,) + tuple(e.shape)} "
                        f"(x[:1], not x[0]){extra}")
    if isinstance(e, torch.Tensor) and free_axes and c.dim() == e.dim() and all(
            a in free_axes or c.shape[a] == e.shape[a] for a in range(1, c.dim())):
        pass  # another size on the file's dynamic axes only (validation data of a --dynamic-axes compile)
    elif isinstance(e, torch.Tensor) and tuple(c.shape[1:]) != tuple(e.shape[1:]):
        got, want = tuple(c.shape[1:]), tuple(e.shape[1:])
        hint = ""
        if not got and want:  # one number per sample: class labels, a target column
            hint = " (one number per sample: labels? give the model's inputs)"
        elif len(got) == len(want) >= 2 and got == want[1:] + want[:1]:
            perm = ", ".join(["0", str(len(got))] + [str(k) for k in range(1, len(got))])
            hint = f" (channels last? x.permute({perm}) in torch, x.transpose({perm}) in numpy, puts them first)"
        elif len(want) == len(got) + 1 and got == want[1:]:
            # a list of single samples: each item of an iterable is read as a batch, so (3, 64, 64) images
            # were taken as batches of three (64, 64) samples
            hint = (" (a list of single samples? each item of a list is read as a batch: stack them, "
                    "np.stack(samples) / torch.stack(samples), or give each with a batch axis)")
            if want[0] == 1:  # (N, 8, 8) images for a one-channel conv: the channel axis is the likelier miss
                hint = (" (without the channel axis? x[:, None] adds it; or a list of single samples? each item "
                        "of a list is read as a batch: stack them, np.stack(samples) / torch.stack(samples))")
        raise UserError(f"{which}{what} has samples of shape {got} but the example input "
                        f"is {want} per sample{hint}; make them agree ({option}; the example input: "
                        f"{example})")
    if isinstance(e, torch.Tensor) and c.is_floating_point() != e.is_floating_point():
        if e.is_floating_point():  # uint8 images, say (the CLI reads every integer array as int64)
            # no dtype named: the CLI reads every integer array as int64, and an int32 file read "torch.int64"
            raise UserError(f"{which}{what} holds integers but the model takes {e.dtype}: convert "
                            "them as the model was trained on them (uint8 images 0..255: for instance "
                            "x.astype(np.float32) / 255, and the training normalisation)")
        raise UserError(f"{which}{what} is {c.dtype} but the example input is {e.dtype}; give both in the type "
                        "the model takes (floating point for images and features, integers for token ids; "
                        "--input-shape makes float inputs)")


def _example_int_types(data, example_inputs: tuple):
    """Integer inputs (token ids) in the integer type of the example inputs the file is exported with: int64
    calibration ids (``torch.randint``) for an int32 example stopped in onnxruntime ("Unexpected input data type")."""
    parts = data if isinstance(data, tuple) else (data,)
    cast = tuple(c.to(e.dtype) if isinstance(e, torch.Tensor) and c.dtype != e.dtype and not c.is_floating_point()
                 and not e.is_floating_point() and c.dtype != torch.bool and e.dtype != torch.bool else c
                 for c, e in zip(parts, example_inputs))
    return cast if isinstance(data, tuple) else cast[0]


def calib_data(calib, n_inputs: int = 1, what: str = "calibration"):
    """Calibration data as the passes take it: one tensor for a one-input model (see :func:`calib_tensor`), a tuple
    of ``n_inputs`` tensors (each ``(N, ...)``) for a model with several inputs. For several inputs ``calib`` is a
    tuple of ``n_inputs`` tensors/arrays, or an iterable of batches, each a tuple whose first ``n_inputs`` items
    are the inputs (more items, such as labels, are ignored)."""
    if isinstance(calib, torch.utils.data.Dataset):  # samples without a batch axis: batched as a DataLoader would
        calib = torch.utils.data.DataLoader(calib, batch_size=64)
    arg = "calib" if what == "calibration" else "validation_inputs"
    if isinstance(calib, (str, bytes, os.PathLike)):  # the command line's --calib FILE, given from Python
        raise UserError(f"{arg}= is a path ({os.fsdecode(calib)!r}); from Python give the inputs themselves, e.g. "
                        f"{arg}=numpy.load(path) (a .npz: numpy.load(path)['x'])")
    if calib is not None and not isinstance(calib, (torch.Tensor, np.ndarray, collections.abc.Iterable)):
        raise UserError(f"{arg}= is of type {type(calib).__name__}; give a tensor or array (N, ...), an iterable of "
                        "batches or (x, y) pairs, or for several inputs a tuple with one tensor per input")
    if calib is None or n_inputs <= 1 or isinstance(calib, collections.abc.Mapping):
        return calib_tensor(calib, what)
    if isinstance(calib, (tuple, list)) and len(calib) == n_inputs and \
            all(isinstance(t, (torch.Tensor, np.ndarray)) for t in calib):
        # a list too: batches of a model with several inputs are tuples, so plain arrays are one per input (the
        # passes of a hand-built pipeline read [x1, x2] so, and compile refused it)
        parts = [model_input(t) for t in calib]
    else:
        columns: list[list[torch.Tensor]] = [[] for _ in range(n_inputs)]
        for item in bounded_batches(calib, what):
            if isinstance(item, collections.abc.Mapping):
                raise UserError(_mapping_message(item, what, batches=True))
            if isinstance(item, (tuple, list)) and item and isinstance(item[0], (tuple, list)) and \
                    len(item[0]) == n_inputs:
                item = item[0]  # ((x1, x2), label): the inputs, then the label
            if not isinstance(item, (tuple, list)) or len(item) < n_inputs:
                raise UserError(f"the model takes {n_inputs} inputs: give {what} batches as tuples of "
                                f"{n_inputs} tensors (or calib=(x1, x2, ...) with one tensor per input)")
            for column, t in zip(columns, item[:n_inputs]):
                column.append(model_input(t))
        if not columns[0]:
            raise UserError(f"the {what} data is empty; give at least one batch")
        for i, column in enumerate(columns):
            _check_batches_agree(column, f"input {i}: ", what=what)
        parts = [torch.cat(column) for column in columns]
    sizes = {t.shape[0] if t.dim() else 0 for t in parts}
    if len(sizes) != 1 or 0 in sizes:
        raise UserError(f"calibration inputs must be batch-first with the same number of samples, got first "
                        f"dimensions {[tuple(t.shape[:1]) for t in parts]}")
    return tuple(parts)


def default_thresholds(opts: CompileOptions) -> dict:
    if not opts.quantized:
        # relative error <= 1e-4  <=>  SQNR >= 80 dB
        return {"min_sqnr": 80.0}
    return {"min_top1": None}


# compile(thresholds=...) keys
VALIDATION_THRESHOLDS = {"min_sqnr", "max_abs", "min_top1", "max_code_mismatch", "min_forced_sqnr",
                         "max_layer_code_mismatch"}


# thresholds that are fractions (the CLI's --min-top1 takes 0..1 too) and those that must not be negative
_FRACTION_THRESHOLDS = {"min_top1", "max_code_mismatch", "max_layer_code_mismatch"}


def checked_thresholds(thresholds, quantized: bool = True, validate: bool = True):
    """``thresholds=`` (of ``compile`` and ``qat.export``) checked as the CLI checks its flags: a dict of known
    names; values numbers (or None: no threshold), not NaN; fractions in [0, 1] (``min_top1=99``, a percentage,
    failed every compile with "100.00% < 9900.00%"), ``max_abs`` >= 0. A string stopped validation with a
    TypeError from its comparison, ``thresholds=30`` with "'int' object is not iterable"."""
    import numbers

    if thresholds is not None and not isinstance(thresholds, collections.abc.Mapping):
        raise UserError(f"thresholds= is of type {type(thresholds).__name__}; give a dict of validation thresholds, "
                        "e.g. thresholds={'min_sqnr': 30.0, 'min_top1': 0.99}")
    if not validate and thresholds:
        raise UserError("thresholds= cannot apply with validate=False (nothing is checked); drop thresholds= or "
                        "validate=False")
    if not validate or not thresholds:
        return thresholds
    known = VALIDATION_THRESHOLDS if quantized else \
        VALIDATION_THRESHOLDS - {"max_code_mismatch", "min_forced_sqnr", "max_layer_code_mismatch"}
    unknown = sorted(map(str, set(thresholds) - known))
    if unknown:
        raise UserError(f"unknown validation threshold(s) {', '.join(map(repr, unknown))}; use "
                        f"{', '.join(sorted(known))}")
    out = {}
    for name, value in thresholds.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1 or \
                isinstance(value, (np.ndarray, np.generic)) and value.size == 1:  # np.float32(30), tensor(30.)
            value = value.item()
        if value is None:
            out[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UserError(f"threshold {name}={value!r} is a {type(value).__name__}; give a number (or None for "
                            "no threshold)")
        value = float(value)
        if value != value:
            raise UserError(f"threshold {name}=nan compares with nothing; give a number (or None for no threshold)")
        if name in _FRACTION_THRESHOLDS and not 0.0 <= value <= 1.0:
            raise UserError(f"threshold {name}={value:g} is not a fraction; give a value in [0, 1], e.g. "
                            f"{name}=0.99" + (" (99 %)" if name == "min_top1" else ""))
        if name == "max_abs" and value < 0:
            raise UserError(f"threshold max_abs={value:g} is negative; give a value >= 0")
        out[name] = value
    return out


# command-line flags whose Python option has another name or sense
_FLAG_OPTIONS = {"float_levels": "int8_levels=False", "per_tensor": "per_channel=False",
                 "symmetric_levels": "asym_levels=False", "no_fold_bn": "fold_bn=False",
                 "no_equalize": "equalize=False", "no_bias_correction": "bias_correction=False",
                 "no_int8_outputs": "int8_outputs=False", "leaf_module": "leaf_modules=(...)",
                 "no_validate": "validate=False", "out": "output=...", "calib_data": "calib=..."}


def _check_option_names(options: dict, caller: str = "compile()") -> None:
    """An unknown keyword is one line naming the option to use (a TypeError from the dataclass otherwise)."""
    import dataclasses
    import difflib

    known = [f.name for f in dataclasses.fields(CompileOptions)]
    for name in options:
        if name in known:
            continue
        if name in _FLAG_OPTIONS:
            hint = f"use {_FLAG_OPTIONS[name]}"
        elif name in VALIDATION_THRESHOLDS:  # compile(min_sqnr=30): the CLI's --min-sqnr
            hint = f"validation thresholds go in thresholds=, e.g. thresholds={{{name!r}: ...}}"
        else:
            close = difflib.get_close_matches(name, known + ["output", "calib", "validate", "validation_inputs",
                                                               "thresholds", "example_inputs"], n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the options are {', '.join(known)}"
        raise UserError(f"{caller} got an unknown option {name!r}; {hint}")


def _float32_default(fn):
    """Run ``fn`` with float32 as torch's default dtype (restored after): the quantizers' buffers and tables are
    float32, and a user's ``torch.set_default_dtype(torch.float64)`` stopped APoT compiles of a float32 model in
    Calibrate ("index_select(): self and result must have the same scalar type"), float16 even uniform ones."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = torch.get_default_dtype()
        if previous == torch.float32:
            return fn(*args, **kwargs)
        torch.set_default_dtype(torch.float32)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_default_dtype(previous)
    return wrapper


@keeps_global_rng  # a seeded script computes the same numbers after a compile as without one
@_float32_default
def compile(
    model,
    example_inputs=None,
    scheme: Optional[str] = None,
    bits: Optional[int] = None,
    calib=None,
    output: Optional[str] = None,
    validate: bool = True,
    validation_inputs=None,
    callback: Optional[Callable[[PassTiming], None]] = None,
    thresholds: Optional[dict] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    **options,
) -> CompileResult:
    """Compile ``model`` to ONNX for inference.

    The model is compiled in eval mode (BatchNorm running statistics, Dropout off), whatever mode it is in; the
    passes work on a copy, so ``model`` itself, its parameters and its mode are left as they were.

    Args:
        model: an ``nn.Module``, or a path / ``package.module:factory`` spec as on the command line
            (then ``arch=`` -- a ``package.module:factory`` spec or the factory itself -- and ``trust_pickle=``
            may be passed).
        example_inputs: a tensor or tuple of tensors; defaults to the first calibration sample.
        scheme, bits: the quantization scheme (``fp32``, ``apot``, ``pot``, ``uniform``, ...) and bit-width
            (default ``apot``, 4; a model trained with ``qcompile.qat`` takes those it was trained with).
        calib: calibration data: a tensor/array (N, ...) or an iterable of batches or (x, y) pairs; for a model
            with several inputs a tuple with one tensor per input, or batches that are such tuples. Batches
            feed the inputs ``forward`` requires (more items are taken as labels); to feed inputs that have
            defaults too, give ``example_inputs`` with one tensor per input, or the tuple form.
        output: where to write the ONNX file (atomically; a str or path-like); ``None`` keeps it in memory only.
        validate: run the ONNX file in onnxruntime and compare it with the simulation.
        progress: called as ``progress(done, total)`` while calibration runs over the data (without data: over
            the steps that distill inputs from the BatchNorm statistics, where those run).
        **options: the fields of :class:`CompileOptions` (``wbits``, ``abits``, ``emit``, ``check``, ...).
    """
    t0 = time.perf_counter()
    for name, fn in (("progress", progress), ("callback", callback)):
        if fn is not None and fn is not False and not callable(fn):
            raise UserError(f"{name} must be a function (or None), got {fn!r}")
    progress = progress or None  # False: none
    if not isinstance(validate, (bool, np.bool_)):  # validate="no" validated, as any non-empty string is true
        raise UserError(f"validate must be True or False, got {validate!r} ({type(validate).__name__})")
    validate = bool(validate)
    callback = callback or None
    asked = {k: v for k, v in (("scheme", scheme), ("bits", bits)) if v is not None}  # a QAT model's are fixed
    scheme = "apot" if scheme is None else scheme
    bits = 4 if bits is None else bits
    arch = options.pop("arch", None)
    trust_pickle = options.pop("trust_pickle", False)
    if not isinstance(trust_pickle, (bool, np.bool_)):  # trust_pickle="no" unpickled (any non-empty string is true)
        raise UserError(f"trust_pickle must be True or False, got {trust_pickle!r} ({type(trust_pickle).__name__})")
    _check_option_names(options)
    opts = CompileOptions(scheme=scheme, bits=bits, **options)
    if not opts.quantized:  # as the CLI: options that would quantize something, given to a float compile
        defaults = CompileOptions(scheme="fp32")
        given = [k for k in options if k not in ("check", "leaf_modules", "fold_bn", "equalize", "dynamic_axes")
                 and getattr(opts, k, None) != getattr(defaults, k, None)]
        if given:
            raise UserError(f"{', '.join(given)} cannot apply to scheme='fp32' (nothing is quantized); drop "
                            f"{'them' if len(given) > 1 else 'it'} or choose a quantized scheme")
    output = checked_output_arg(output)
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    source = model if isinstance(model, str) else None
    if source is not None and output is not None and os.path.exists(source) and export_mod.same_file(output, source):
        raise UserError(f"output {output!r} is the model file; writing there would overwrite it: choose another "
                        "output path (such as model.onnx)")
    if output is not None:
        export_mod.check_output_path(output, what="output")
    if source is not None:
        model = load_model(source, arch=arch, trust_pickle=trust_pickle)
    elif arch is not None:
        raise UserError("arch= names the architecture of a weights file; drop it, or pass the file's path as model")
    if output is not None and isinstance(model, nn.Module):  # the ONNX bytes replaced the user's models.py
        export_mod.check_not_model_source(model, output, "output", specs=(source, arch))
    if isinstance(model, dict):
        raise UserError("model is a dict (a state dict?); load it into the model (model.load_state_dict(sd)) and "
                        "pass the model, or pass the file's path with arch='package.module:factory'")
    check_not_exported(model)
    if isinstance(model, type) and issubclass(model, nn.Module):  # "got type" said nothing of the fix
        raise UserError(f"model is the class {model.__name__}, not a model: pass an instance with its trained weights "
                        f"({model.__name__}(...) and load_state_dict), or its weights file with arch=")
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be an nn.Module or a path/spec, got {type(model).__name__}")
    model = unwrap(model)  # torch.compile / DataParallel wrappers: the model inside
    if isinstance(model, torch.jit.ScriptModule):
        raise UserError("a TorchScript module cannot be traced with torch.fx; pass the nn.Module itself, or compile the "
                        "saved archive with arch='package.module:factory' (--arch) to load its weights into that model")
    from qcompile.qat import config_of, convert  # here: qcompile.qat imports this module

    _check_not_torch_quantized(model)
    check_materialized(model)
    scripted = next((name for name, m in model.named_modules() if name and isinstance(m, torch.jit.ScriptModule)),
                    None)
    if scripted is not None:  # torch.onnx failed inside the trace: "Tried to trace ... not part of the active trace"
        raise UserError(f"submodule {scripted!r} is a TorchScript module (torch.jit.script / torch.jit.trace); "
                        "qcompile traces Python modules with torch.fx: put the module itself there, not its "
                        "scripted form")
    if config_of(model) is not None:  # a model from qcompile.qat.prepare: export its learned quantizers
        model = convert(model)
    from qcompile.qat.convert import CONVERTED_KEY

    trained = isinstance(getattr(model, "meta", None), dict) and CONVERTED_KEY in model.meta
    if not trained and isinstance(model, nn.Module):
        _check_not_compiled(unwrap(model))
    if example_inputs is not None:
        check_input_count(model, len(as_input_tuple(example_inputs)), "example inputs: --input-shape or --calib arrays")
    elif isinstance(calib, tuple) and calib and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in calib):
        check_input_count(model, len(calib), "calibration arrays")
    n_inputs = len(as_input_tuple(example_inputs)) if example_inputs is not None else model_input_count(model)
    if example_inputs is None and isinstance(calib, tuple) and len(calib) > n_inputs and \
            all(isinstance(t, (torch.Tensor, np.ndarray)) for t in calib):
        # one array per input, for inputs with defaults (``forward(x, mask=None)``) or ``*args`` too: read as
        # batches of the first input, the second was dropped and the file computed ``m(x)`` (PASS, 5.8 dB from
        # ``m(x, mask)``); check_input_count above refused more arrays than forward takes
        n_inputs = len(calib)
    if n_inputs == 1 and calib is not None:
        if isinstance(calib, collections.abc.Iterator):  # read once: its first batch is looked at here
            calib = list(bounded_batches(calib))
        dropped_note = extra_items_note(model, calib)
        if dropped_note:
            warnings.warn(dropped_note, QuantizationWarning, stacklevel=user_stacklevel())
    # a list of equally shaped arrays and no example: each item is read as a batch, so a list of single samples
    # traced the model on one sample without its batch axis ("expected 4D input (got 3D input)")
    listed = example_inputs is None and isinstance(calib, list) and len(calib) > 1 and n_inputs == 1 and \
        all(isinstance(t, (torch.Tensor, np.ndarray)) and tuple(t.shape) == tuple(calib[0].shape) for t in calib)
    calib_x = calib_data(calib, n_inputs)
    if example_inputs is None:
        if calib_x is None:
            raise UserError("give example_inputs (or --input-shape) or calibration data, so the model can be traced")
        example_inputs = tuple(t[:1] for t in calib_x) if isinstance(calib_x, tuple) else calib_x[:1]
    example_inputs = as_input_tuple(example_inputs)
    if opts.quantized and opts.avg_wbits is not None and calib_x is None and not trained:
        raise UserError("--avg-wbits (avg_wbits=) chooses the layers' bit-widths by their effect on the model's "
                        "outputs: pass calibration inputs (--calib FILE, calib= from Python)")
    if opts.quantized and opts.weight_rounding == "adaptive" and calib_x is None and not trained:
        raise UserError("--weight-rounding adaptive (weight_rounding='adaptive') chooses the weights' levels on the "
                        "layers' inputs: pass calibration inputs (--calib FILE, calib= from Python), or leave it "
                        "at nearest")
    if calib_x is not None:
        check_calibration_data(calib_x, example_inputs, option="--calib, or calib= from Python")
        calib_x = _example_int_types(calib_x, example_inputs)
        many = many_samples_note(calib_x) if opts.quantized else None
        if many:  # now, before the minutes it announces (the CLI prints it as it reads the file)
            warnings.warn(many, QuantizationWarning, stacklevel=user_stacklevel())
    if not validate and validation_inputs is not None:
        raise UserError("validation_inputs= holds the inputs validation runs on, and validate=False skips it; drop "
                        "one of them")
    valid_x = None
    if validation_inputs is not None:
        valid_x = calib_data(validation_inputs, len(example_inputs), what="validation")
        check_calibration_data(valid_x, example_inputs, "validation data", "validation_inputs (--data)",
                               free_axes=opts.dynamic_axes)
        valid_x = _example_int_types(valid_x, example_inputs)
    thresholds = checked_thresholds(thresholds, opts.quantized, validate)

    if trained:
        opts = _trained_options(model.meta[CONVERTED_KEY], opts, asked, options)
        if opts.int8_weights == "s8-safe" and model.meta[CONVERTED_KEY].options.int8_weights != "s8-safe":
            # PairSafeInt8Weights moves 8-bit weights; the trained ones stay as trained (qat.prepare's pipeline
            # drops it), and the file had full-range int8 weights under the s8-safe name: FAIL on x86 without VNNI
            raise UserError("int8_weights='s8-safe' moves 8-bit weights onto pair-safe codes, which this model was not "
                            "trained with; pass it to qcompile.qat.prepare and train, or keep 'auto' (uint8 weights "
                            "where int8 ones would saturate) or 'u8'")
    if opts.quantized:
        opts = resolve_int8_weights(opts, keep_weights=trained)  # before the passes: s8-safe adds one
    if trained and opts.int8_levels:
        # QAT trained its level decisions in float (qat.prepare.split_pipeline, as qat.export writes them): deciding
        # APoT/PoT output levels on accumulator cells here bound layers the conversion left float, and the file no
        # longer computed the trained model (digits APoT-3: max |diff| 0.78, 98.75 -> 98.00 %)
        opts = dataclasses.replace(opts, int8_levels=False)
    try:
        with DeferredThreads(model, example_inputs) as threads:
            return _trace_and_compile(model, example_inputs, calib_x, valid_x, opts, trained, output, validate,
                                      thresholds, callback, progress, t0, settle_threads=threads.settle)
    except UserError as e:
        if listed and str(e).startswith("the model does not run on inputs of shape"):
            raise UserError(f"{e} (calib= is a list of {len(calib)} arrays of shape {tuple(calib[0].shape)}, each read "
                            "as a batch: a list of single samples? stack them, np.stack(samples) / "
                            "torch.stack(samples))") from None
        hooked = _hooked_modules(model)
        if hooked and ("does not compute the model" in str(e) or "changed what the model computes" in str(e)):
            raise UserError(f"the model's outputs differ from its traced graph's, and {', '.join(hooked[:3])}"
                            f"{' ...' if len(hooked) > 3 else ''} {'has' if len(hooked) == 1 else 'have'} forward "
                            "hooks, which torch.fx does not trace (nor onnxruntime run): a hook that changes a "
                            "value must become part of forward; remove the hooks before compiling") from None
        raise
    except KeyboardInterrupt:
        raise
    except Exception:
        problem = _batch_problem(model, example_inputs)
        if problem:
            raise UserError(problem) from None
        raise


FEW_CALIBRATION_SAMPLES = 8


# calibration data past this many samples gets a warning before the compile: every calibration step runs over all
# of them (a digits CNN: 16 k samples 7 s of compile, 128 k 80 s, a million still running after 5 minutes)
MANY_CALIBRATION_SAMPLES = 16384


def many_samples_note(calib_x) -> str | None:
    """A warning where the calibration data holds more than ``MANY_CALIBRATION_SAMPLES`` samples (arrays and tensors
    are taken whole; iterables are read up to ``MAX_ITERABLE_SAMPLES``)."""
    n = (calib_x[0] if isinstance(calib_x, tuple) else calib_x).shape[0]
    if n <= MANY_CALIBRATION_SAMPLES:
        return None
    return (f"the calibration data holds {n} samples, all of which calibration runs the model over (a digits CNN "
            f"took 80 s on 128 k); a few hundred to a few thousand representative samples calibrate as well: pass "
            f"a subset (--calib, calib=...)")


RANDOM_VALIDATION_SAMPLES = 16  # as the CLI: the example, then normal noise of its shapes


def random_validation_inputs(example_inputs, model=None):
    """What a compile without calibration or validation data is validated on: the example and 15 N(0, 1) samples
    of its shapes (seeded), as the command line does; the example alone where an input is not floating point (token
    ids: noise is no valid id) or where ``model`` (the compiled graph) does not run on the noise (a float column
    cast to ids in forward).
    A data-free compile from Python validated on its one example input (often zeros): "validation on 1 inputs ...
    PASS" checked almost nothing."""
    inputs = as_input_tuple(example_inputs)
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0 for t in inputs):
        return example_inputs
    gen = torch.Generator().manual_seed(1)
    more = RANDOM_VALIDATION_SAMPLES - inputs[0].shape[0]
    if more <= 0:
        return example_inputs
    grown = tuple(torch.cat([t, torch.randn((more,) + tuple(t.shape[1:]), generator=gen).to(t.dtype)]) for t in inputs)
    if model is not None:
        import contextlib
        import io

        try:  # an IndexError from noise read as ids stopped a compile that passed on the example
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                model(*grown)
        except Exception:  # noqa: BLE001 -- the example alone, as before
            return example_inputs
    return grown if isinstance(example_inputs, tuple) else grown[0]


DATA_SHIFT_NOTE = "qcompile_data_shift_note"  # gm.meta: calibration data unlike the training data (fold_bn)


def few_samples_note(calib_x) -> str | None:
    """A warning where the calibration data holds fewer than ``FEW_CALIBRATION_SAMPLES`` samples: ranges fitted on
    so few clip what other inputs reach (a trained CNN on one digit image: 98.5 % where 128 images give 99.1 %),
    and nothing else said so."""
    if calib_x is None:
        return None
    n = (calib_x[0] if isinstance(calib_x, tuple) else calib_x).shape[0]
    if n >= FEW_CALIBRATION_SAMPLES:
        return None
    return (f"the calibration data holds {n} sample{'' if n == 1 else 's'}: activation ranges fitted on so few clip "
            f"values that other inputs reach; give {FEW_CALIBRATION_SAMPLES * 4} or more representative samples "
            "(--calib, calib=...)")


def _trace_and_compile(model, example_inputs, calib_x, valid_x, opts, trained, output, validate, thresholds,
                       callback, progress, t0, settle_threads=lambda: None) -> CompileResult:
    for i, t in enumerate(example_inputs):
        if isinstance(t, torch.Tensor) and t.dim() == 0:  # torch.onnx: "Dynamic shape axis should be no more than ..."
            raise UserError(f"input {i} of the example is a 0-dim tensor, but every input of the file has a batch "
                            "dimension first: give it shape (batch,) (one value per sample), or make it a constant "
                            "of the model (a buffer or attribute) instead of an input")
    # distinct samples, for a trace fixed to the example's sizes (frontend._trace_sized): 8, enough to show a size
    # that follows the samples (x[::4], the rows that differ); the model and its graph each run on them (with 32,
    # YOLOv8n at 320 x 320 spent 1.4 s there)
    check = None
    if calib_x is not None:
        check = tuple(t[:8] for t in calib_x) if isinstance(calib_x, tuple) else (calib_x[:8],)
    gm = trace(running_stats_as_batchnorm(plain_copy(model).eval()), example_inputs,
               leaf_modules=opts.leaf_modules, copy=False, check_inputs=check, dynamic_axes=opts.dynamic_axes or ())
    settle_threads()  # the load probe ran during the trace: the passes run on the cores it found free
    _check_batch_statistics(gm)
    if opts.quantized and calib_x is None and not trained:
        _note_initial_batch_statistics(gm)
    _check_finite_model(gm)
    for what, data in (("calibration data", calib_x), ("validation data", valid_x)):
        if data is not None:
            _check_token_ids(gm, data, what)
    if opts.quantized and calib_x is not None and not trained:
        from qcompile.passes.fold_bn import calibration_shift_note

        note = calibration_shift_note(gm, calib_x)  # before FoldBatchNorm: the statistics are still there
        if note:
            gm.meta[DATA_SHIFT_NOTE] = note
    # --dynamic-axes: the traced float graph as traced, to check against the model at other sizes (the passes
    # rewrite gm in place; a trace fixed to the example's sizes computes the model there only)
    traced = copy.deepcopy(gm) if opts.dynamic_axes and not trained else None
    return _compile_traced(model, gm, example_inputs, calib_x, valid_x, opts, trained, output, validate,
                           thresholds, callback, progress, t0, traced=traced)


DYNAMIC_SQNR_DROP_DB = 6.0  # a drop against float this large at twice the size: said as a warning


def _check_dynamic(data: bytes, gm, probes: list, reference, opts: CompileOptions, thresholds,
                   declared: dict) -> dict:
    """The file at the sizes of ``probes`` (``[(inputs, the model's outputs)]``: twice the example's size on
    ``opts.dynamic_axes``, and one more where the model takes it) validated as the compile validates it at the
    example's size: against its simulation (codes and outputs) for a quantized file, against the model for a float
    one; a failure stops the compile (dynamic.py). Returns the summary's ``dynamic_axes`` entry: the figures of
    the first probe, the shapes of all."""
    from qcompile.runtime.validation import FloatOutputs, validate_quantized

    th = default_thresholds(opts)
    th.update(thresholds or {})
    axes = opts.dynamic_axes
    reports = []
    for probe, outputs in probes:
        try:
            if opts.quantized:
                floats = FloatOutputs([t.detach().float().numpy() for t in outputs],
                                      [t.is_floating_point() for t in outputs])
                report = validate_quantized(data, gm, probe, float_model=floats, **th)
            else:
                report = validate_model(data, reference, probe, rounding_scale="min_sqnr" not in (thresholds or {}),
                                        **th)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 -- onnxruntime refusing the new size: a node holds the example's
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            raise dynamic.onnxruntime_failure(axes, probe, exc) from None
        if not report.passed:
            raise dynamic.failure(axes, probe, report.failures[0] if report.failures else "validation failed", gm)
        reports.append(report)
    report = reports[0]
    shapes = [[list(t.shape) for t in (p if isinstance(p, tuple) else (p,)) if isinstance(t, torch.Tensor)]
              for p, _ in probes]
    entry = {"axes": list(axes), "checked_inputs": shapes[0], "also_checked": shapes[1:], "outputs": declared,
             "sqnr_db": report.sqnr_db}
    for key in ("code_mismatch", "sqnr_vs_float_db", "top1_vs_float"):
        if report.extra.get(key) is not None:
            entry[key] = report.extra[key]
    return entry


@contextlib.contextmanager
def _onnxruntime_refusals():
    """onnxruntime refusing to load or run the file compile just wrote (its own exception types, not RuntimeError)
    as one line: torch.onnx exported a graph that does not compute the model (HuggingFace Canine: a FusedMatMul
    that cannot broadcast; Cohere: a rank-6 rotary tensor that shape inference refuses), which a plain
    torch.onnx.export of the model shows too."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 -- only onnxruntime's own errors are turned into a message
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"onnxruntime cannot run the exported file ({first[:300]}): torch.onnx wrote a graph that "
                        "does not compute the model there (torch.onnx.export of the float model does the same); "
                        "rewrite the operation that makes that node, or compile with --no-validate "
                        "(validate=False) to keep the file as written") from None


def _clip_note(opts: CompileOptions, gm: torch.fx.GraphModule) -> Optional[str]:
    """SDQ's fixed 3-sigma clip asked for activations of 6 bits or more, where it clips far too much (a depthwise
    digits CNN at W8A8: 17 dB against float, 39 with mse): said once, as a note."""
    if opts.calib_method != "sdq":
        return None
    from .qmodules import FakeQuantize

    wide = sorted({m.bits for name, m in gm.named_modules() if isinstance(m, FakeQuantize) and m.role != "weight"
                   and m.bits >= 6 and not name.startswith(("out_fq", "res_fq"))})  # those take mse (Calibrate)
    if not wide:
        return None
    if opts.act_bits < 6:  # the user asked for few bits: the wide quantizers are those of layers kept at 8 bits
        return (f"--calib-method sdq clips activations at 3 sigma, which suits 2-4 bits; the layers kept at "
                f"{wide[-1]} bits (the first and last, --keep-first-last {opts.keep_first_last}, or --config rules) "
                "lose values their levels could hold (a depthwise digits CNN at W8A8: 17 dB against float, 39 dB with mse): "
                "--keep-first-last quant quantizes them as asked; --calib-method mse suits every width")
    return (f"--calib-method sdq clips activations at 3 sigma, which suits 2-4 bits; at {wide[-1]} bits it cuts off "
            "values the levels could hold (a depthwise digits CNN at W8A8: 17 dB against float, 39 dB with mse): consider "
            "--calib-method mse (calib_method='mse') for these bits")


_RANDOM_FUNCTIONS = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "normal",
                     "multinomial", "randperm", "poisson"}
_RANDOM_METHODS = {"uniform_", "normal_", "bernoulli_", "random_", "exponential_", "geometric_", "cauchy_",
                   "log_normal_", "bernoulli", "multinomial"}


_TRAINING_DRAWS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "rrelu"}


def _random_draws(gm: torch.fx.GraphModule) -> list[str]:
    """The nodes of ``gm`` that draw random numbers (``torch.randn``, ``x.uniform_()``, ``F.dropout(...,
    training=True)``, ...)."""
    def training(n) -> bool:  # F.dropout(x, p, training) / F.rrelu(x, lower, upper, training)
        name = getattr(n.target, "__name__", "")
        flag = n.kwargs.get("training", None)
        if flag is None:
            position = 3 if name == "rrelu" else 2
            flag = n.args[position] if len(n.args) > position else name not in ("rrelu",)  # dropout's default
        return flag is True

    return [n.name for n in gm.graph.nodes
            if (n.op == "call_function" and getattr(n.target, "__name__", "") in _RANDOM_FUNCTIONS)
            or (n.op == "call_method" and n.target in _RANDOM_METHODS)
            or (n.op == "call_function" and getattr(n.target, "__name__", "") in _TRAINING_DRAWS and training(n))]


_TIME_AXIS_KEEPING = (nn.Embedding, nn.Linear, nn.Dropout, nn.LayerNorm, nn.Identity)


def _time_first_note(gm: torch.fx.GraphModule) -> Optional[str]:
    """A recurrent layer with ``batch_first=False`` that reads a model input (directly, or through layers that keep
    its dimension 0: an Embedding, a Linear): the input is (T, B, ...), and the file takes T as its batch, with B
    fixed to the example's and calibration counting time steps as samples. README says so; the compile said nothing
    (nn.GRU(8, 32) on (8, 256, 8) data: a file for batch 256, 8 calibration "samples")."""
    from qcompile.passes.select import recurrent_module

    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        mod = recurrent_module(gm, node)  # the nn.GRU/LSTM/RNN, or the one inside its QuantizedRecurrent
        if not isinstance(mod, nn.RNNBase) or mod.batch_first or not node.args:
            continue
        src = node.args[0]
        while isinstance(src, torch.fx.Node) and src.op == "call_module" and \
                isinstance(modules.get(src.target), _TIME_AXIS_KEEPING) and src.args:
            src = src.args[0]
        if isinstance(src, torch.fx.Node) and src.op == "placeholder":
            return (f"{node.target} ({type(mod).__name__}, batch_first=False) reads input {src.target!r} time-first, "
                    "but qcompile takes dimension 0 of every input as the batch: the file's batch is the time axis, "
                    "its batch is fixed to the example's, and calibration counts time steps as samples; build it "
                    "with batch_first=True, or wrap the model to take (B, T, ...) and transpose")
    return None


def _python_numbers_hint(gm: torch.fx.GraphModule) -> Optional[str]:
    """Why a file may not compute the model: values of data taken out as Python numbers (``.item()`` that the
    frontend could not keep a tensor, ``.tolist()``), which torch.onnx writes as the constants of the example."""
    def from_data(node, seen=None) -> bool:  # computed from an input (a parameter's .item() is a constant)
        seen = set() if seen is None else seen
        todo = [node]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder":
                return True
            todo.extend(n.all_input_nodes)
        return False

    taken = [n.name for n in gm.graph.nodes if n.op == "call_method" and n.target in ("item", "tolist")
             and from_data(n)]
    if not taken:
        return None
    return (f"forward takes {len(taken)} value(s) of the data out as Python numbers ({', '.join(taken[:3])}"
            f"{' ...' if len(taken) > 3 else ''}: .item() or .tolist()), which the ONNX file holds as the constants "
            "they were on the example: compute with the tensor itself (drop the .item())")


def _hooked_modules(model: nn.Module) -> list[str]:
    """The modules of ``model`` with forward or forward-pre hooks ("the model" for the root)."""
    names = []
    for name, m in model.named_modules():
        if any(getattr(m, attr, None) for attr in ("_forward_hooks", "_forward_pre_hooks")):
            names.append(repr(name) if name else "the model")
    from torch.nn.modules import module as torch_module

    # process-wide hooks (torch.nn.modules.module.register_module_forward_hook): every module runs them
    if any(getattr(torch_module, attr, None) for attr in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        names.insert(0, "every module (torch.nn.modules.module.register_module_forward_hook)")
    return names


_TORCH_QUANTIZED = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized",
                    "torch.nn.intrinsic.quantized", "torch.ao.nn.quantized.dynamic")


def _check_not_compiled(model: nn.Module) -> None:
    """A compile's ``result.model`` (or a pipeline's graph with quantizers) compiled again: the passes kept its
    quantizers, so ``scheme="uniform", bits=8`` on an APoT W4A4 result wrote the APoT file bit for bit, recorded the
    new options in its metadata, and validated it against itself (SQNR vs "float" inf)."""
    from qcompile.qmodules import FakeQuantize

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantize)]
    decided = [n for n in model.graph.nodes if n.meta.get("qconfig") is not None] \
        if isinstance(model, torch.fx.GraphModule) else []
    if not found and decided:  # a pipeline's graph after SelectLayers: compile re-traced it and decided anew
        raise UserError(f"the graph module carries layer decisions (node.meta['qconfig'] on {len(decided)} node(s), "
                        f"{decided[0].name!r} one), which compile does not read: it decides from its options; give "
                        "them as config={layer: {...}} rules, or run the passes from SelectLayers on yourself "
                        "(README, the pipeline section)")
    if not found:
        return
    levels = sorted({f"{m.scheme} {m.bits}-bit" for _, m in found})
    if any(type(m).__module__.startswith("qcompile.qat") for _, m in found):
        # a qat.prepare'd model inside another module (a head added after prepare): compile reads QAT models whole
        raise UserError(f"the model holds quantizers of a qcompile.qat.prepare'd model ({found[0][0]!r} one) inside "
                        "other modules; compile or qat.export the prepared model itself, and put any head or "
                        "wrapper around the float model before qat.prepare")
    raise UserError(f"the model is already quantized by qcompile ({len(found)} quantizer(s), {', '.join(levels)}; "
                    f"{found[0][0]!r} is one): compiling it again keeps those levels whatever the options say; "
                    "compile the float model with the new options, or export this one as README's pipeline section "
                    "shows (emit.emit(export_onnx(gm, x), ...))")


def _check_not_torch_quantized(model: nn.Module) -> None:
    """A model torch.ao.quantization prepared (observers) or converted (quantized modules) is not a float model:
    a converted one was exported as torch's own int8 graph whatever scheme was asked, and validation passed."""
    try:
        from torch.ao.quantization import FakeQuantizeBase, ObserverBase
        observers = (ObserverBase, FakeQuantizeBase)
    except ImportError:  # a torch without the eager-mode quantization package
        observers = ()
    for name, m in model.named_modules():
        if observers and isinstance(m, observers):
            raise UserError(f"the model carries torch.ao.quantization observers ({name!r}: {type(m).__name__}, from "
                            "prepare/prepare_qat); qcompile quantizes float models: pass the model before prepare")
        kind = type(m).__module__
        if kind.startswith(_TORCH_QUANTIZED) and type(m).__name__ != "FloatFunctional":
            raise UserError(f"the model is already quantized by torch.ao.quantization ({name or 'the model'!r} is "
                            f"{kind.split('.modules')[0]}.{type(m).__name__}); qcompile quantizes float models: pass "
                            "the float model (before torch.ao.quantization.convert / quantize_dynamic, or "
                            "quantize=False for torchvision's quantizable models)")


def _check_token_ids(gm: torch.fx.GraphModule, data, what: str) -> None:
    """Integer inputs read by an ``nn.Embedding`` must be row indices of it, in every sample (the traced example
    is checked when the model runs; a bad id in a later sample was an IndexError inside a pass)."""
    parts = data if isinstance(data, tuple) else (data,)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    modules = dict(gm.named_modules())
    for i, (node, t) in enumerate(zip(placeholders, parts)):
        if t.is_floating_point() or t.dtype == torch.bool or not t.numel():
            continue
        for user in node.users:
            emb = modules.get(user.target) if user.op == "call_module" else None
            rows, name = None, user.target
            if isinstance(emb, (nn.Embedding, nn.EmbeddingBag)):
                rows = emb.num_embeddings
            elif user.op == "call_function" and user.target is F.embedding and len(user.args) > 1:
                # the functional form the passes leave (a quantized simulation): the weight's rows
                weight = user.args[1]
                while isinstance(weight, torch.fx.Node) and weight.op == "call_module" and weight.args:
                    weight = weight.args[0]  # through its weight quantizer
                meta = getattr(weight, "meta", {}).get("tensor_meta")
                if hasattr(meta, "shape") and len(meta.shape):
                    rows = int(meta.shape[0])
                elif isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                    value = gm
                    for part in str(weight.target).split("."):
                        value = getattr(value, part, None)
                    rows = int(value.shape[0]) if isinstance(value, torch.Tensor) and value.dim() else None
                name = str(getattr(weight, "target", user.name)).removesuffix(".weight")
            if rows is not None:
                lo, hi = int(t.min()), int(t.max())
                if lo < 0 or hi >= rows:
                    bad = hi if hi >= rows else lo
                    which = f"input {i} of the " if len(parts) > 1 else ""
                    raise UserError(f"{which}{what} holds token id {bad} but the embedding {name!r} has "
                                    f"{rows} rows (ids 0..{rows - 1}); fix the ids or give the model its "
                                    "vocabulary size")


LOW_AGREEMENT = 0.5  # top-1 agreement with the float model under which a compile warns (halfway to chance, if more)
WIDE_BITS = 6  # every quantizer this wide or wider: a file expected near the float model
WIDE_MIN_SQNR_DB = 15.0  # ... whose outputs this far from the float model's are said (8-bit files: 22-53 dB)
WIDE_MIN_OWN_SQNR_DB = 25.0  # ... where a quantizer's own error is this large (8-bit ones alone: 30 dB and more)
NOISE_SQNR_DB = 0.0  # at any bit-width: outputs whose error against the float model's outweighs those outputs


def quality_warning(report, gm=None, calib_method: Optional[str] = None) -> Optional[str]:
    """The warning for a file that computes its simulation (validation passed) but whose quantized model is far from
    the float one, or None: top-1 agreement under ``LOW_AGREEMENT`` or under halfway between chance and full
    agreement (a binary classifier agreeing on 62 %: 50 % is chance there); outputs under ``NOISE_SQNR_DB`` from
    the float model's, at any bit-width (their error outweighs them); or, where every quantizer of ``gm`` has
    ``WIDE_BITS`` bits or more, outputs under ``WIDE_MIN_SQNR_DB`` from the float model's where a quantizer's own
    error (its output against its own input) is under ``WIDE_MIN_OWN_SQNR_DB``: a range that clips (raw breast-cancer
    features at W8A8 with --calib-method laplace: 8.0 dB, its input quantizer 13.6 dB on its own, 62 % agreement,
    said nothing). Where every quantizer is fine on its own, a low output SQNR is the model amplifying small errors
    (random-weight test networks: 9-12 dB with every quantizer at 32-48 dB), which no calibration changes."""
    if report is None:
        return None
    agree = report.extra.get("top1_vs_float")
    classes = report.extra.get("top1_classes")
    floor = max(LOW_AGREEMENT, (1.0 + 1.0 / classes) / 2.0) if classes else LOW_AGREEMENT
    if agree is not None and agree < floor:
        return low_agreement_message(agree, report, calib_method)
    sq = report.extra.get("sqnr_vs_float_db")
    if sq is None or not math.isfinite(sq) or sq >= WIDE_MIN_SQNR_DB or \
            report.extra.get("float_output_constant") is not None:
        return None
    if sq < NOISE_SQNR_DB and report.extra.get("sqnr_vs_float_output") is None:
        # all-layer PoT W3A3 on raw breast-cancer features: -2.0 dB, 79 % agreement, no word. One output only: of
        # several, the worst is a small one's (an autoencoder's residual x - recon: -11 dB at W8A8, its
        # reconstruction 36 dB), whose relative error says little of the file
        return (f"the quantized model's outputs are {sq:.1f} dB from the float model's: their error outweighs the "
                f"outputs themselves (the file computes its simulation, the loss is in the quantization): more bits, "
                f"other levels (--scheme uniform or apot), or {_calibration_advice(calib_method)}{_entry_point(report)}")
    if gm is None:
        return None
    from .qmodules import FakeQuantize

    bits = [m.bits for m in gm.modules() if isinstance(m, FakeQuantize) and isinstance(m.bits, int)]
    own = [layer["own_sqnr_db"] for layer in (getattr(report, "layers", None) or [])
           if layer.get("own_sqnr_db") is not None and math.isfinite(layer["own_sqnr_db"])]
    if not bits or min(bits) < WIDE_BITS or not own or min(own) >= WIDE_MIN_OWN_SQNR_DB:
        return None
    return (f"the quantized model's outputs are only {sq:.1f} dB from the float model's although every quantizer has "
            f"{min(bits)} bits or more (8-bit files keep 22-53 dB on the benchmark models; the file computes its "
            f"simulation, the loss is in the quantization): {_calibration_advice(calib_method)}{_entry_point(report)}")


def _entry_point(report) -> str:
    """Where the largest error enters: the quantizer whose own error (its output against its own input) is largest."""
    own = [(layer["own_sqnr_db"], layer["quantizer"], layer.get("where", ""))
           for layer in (getattr(report, "layers", None) or [])
           if layer.get("own_sqnr_db") is not None and math.isfinite(layer["own_sqnr_db"])]
    if not own:
        return ""
    sq, name, where = min(own)
    return f"; the largest error enters at {name}{f' ({where})' if where else ''}, {sq:.1f} dB on its own"


def _calibration_advice(calib_method: Optional[str]) -> str:
    if calib_method not in (None, "mse"):
        return (f"--calib-method {calib_method} fits its clipping to a distribution these values may not have: "
                "compare --calib-method mse (the default, fitted to the values themselves); check the calibration "
                "data too")
    return ("check the calibration data (one outlier sample can set a whole range: --calib-method percentile), the "
            "bit-widths, or --exclude the layers with the lowest SQNR")


def low_agreement_message(agree: float, report=None, calib_method: Optional[str] = None) -> str:
    """The warning for a quantized model that predicts unlike the float one; with the validation ``report``, it
    names the quantizer whose own error is largest (its output against its own input), where the loss enters."""
    return (f"the quantized model predicts as the float model on only {100 * agree:.1f}% of the validation inputs "
            f"(the file computes its simulation; the loss is in the quantization): {_calibration_advice(calib_method)}"
            f"{_entry_point(report)}")


def _batch_problem(model: nn.Module, example_inputs: tuple) -> Optional[str]:
    """After a failure: the reason, where the model runs on its example batch but not on a batch twice its size
    (``x.view(1, -1)``); qcompile runs calibration and validation data in batches. None otherwise."""
    if not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in example_inputs):
        return None
    copy_ = plain_copy(model).eval()
    doubled = tuple(torch.cat([t, t]) for t in example_inputs)
    try:
        with torch.no_grad():
            copy_(*[t.clone() for t in example_inputs])
    except Exception:
        return None
    try:
        with torch.no_grad():
            copy_(*doubled)
    except Exception as exc:
        n = int(example_inputs[0].shape[0])
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        import re

        unbatched = re.search(r"expected input\[1, (\d+), [^\]]*\] to have (\d+) channels, but got (\d+) channels",
                              reason)
        if unbatched and int(unbatched.group(1)) == 2 * n and int(unbatched.group(3)) == 2 * n:
            # a conv takes a 3-D (C, H, W) batch of one as unbatched, and the doubled batch as channels
            shape = tuple(example_inputs[0].shape[1:])
            return (f"the input samples have shape {shape}, without the channel axis the first layer reads "
                    f"({unbatched.group(2)} channel(s)): give the data shape (N, {unbatched.group(2)}, "
                    f"{', '.join(map(str, shape))}) (x[:, None] for one channel)")
        if all(t.dim() == 1 for t in example_inputs):  # --input-shape 8: a batch of 8 scalars, no feature axis
            return (f"the model runs on a 1-D input of {n} values but not on {2 * n} ({reason}): the input's first "
                    f"dimension is the batch; give it the batch dimension (--input-shape 1,{n} for {n} features; "
                    "from Python an example of shape (1, ...))")
        return (f"the model runs on a batch of {n} but not of {2 * n} inputs ({reason}); qcompile runs the "
                "calibration and validation data in batches: make forward independent of the batch size "
                "(x.flatten(1) or x.view(x.size(0), -1) rather than x.view(1, -1))")
    return None


_PROTOBUF_LIMIT = 2 ** 31 - 1  # bytes of one serialized protobuf message (an ONNX file without external data)
_GRAPH_MARGIN = 1 << 24  # what the graph itself may take beside the weights


def _check_protobuf_size(onnx_model: onnx.ModelProto, opts: CompileOptions) -> None:
    """A file past protobuf's 2 GB limit: one line, before anything serializes it (an fp32 compile of a 600M-parameter
    MLP ended in "internal error: EncodeError: Failed to serialize proto"). qcompile writes no external data."""
    weights = sum(len(t.raw_data) + 4 * len(t.float_data) + 8 * (len(t.int64_data) + len(t.double_data)) +
                  4 * len(t.int32_data) for t in onnx_model.graph.initializer)
    if weights + _GRAPH_MARGIN < _PROTOBUF_LIMIT:
        return
    hint = ("8-bit weights (--scheme uniform --bits 8) store a quarter of that" if not opts.quantized else
            "fewer weight bits (--wbits 4) store less")
    raise UserError(f"the ONNX file would hold {weights / 2 ** 30:.2f} GiB of weights, past protobuf's 2 GiB limit for "
                    f"one file, and qcompile does not write ONNX external data: {hint}, or export the float model "
                    "with torch.onnx.export(..., external_data=True)")


def checked_output_arg(output):
    """``output=`` of ``compile`` and ``qat.export`` as a str path, or None; one line for other types and "" ."""
    if output is None:
        return None
    if not isinstance(output, (str, bytes, os.PathLike)):
        raise UserError(f"output= is of type {type(output).__name__}; give the file's path as a str or "
                        "pathlib.Path, such as output='model.onnx' (or None to keep the file in memory)")
    output = os.fsdecode(output)  # a pathlib.Path; bytes ("a bytes-like object is required, not 'str'")
    if not output.strip():  # "" named the current folder: "output path '/home/me' is a directory"
        raise UserError("output= is empty; give a file name such as output='model.onnx' (or None to keep the "
                        "file in memory)")
    return output


def _has_class_scores(gm) -> Optional[bool]:
    """Whether an output of the traced ``gm`` is (batch x classes) float scores with more than one class, what a
    top-1 bound reads; None where the trace recorded no output shapes."""
    from torch.utils._pytree import tree_leaves

    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None:
        return None
    metas = [a.meta.get("tensor_meta") for a in tree_leaves(out.args) if isinstance(a, torch.fx.Node)]
    if not metas or any(not hasattr(m, "shape") for m in metas):
        return None
    return any(m.dtype.is_floating_point and len(m.shape) == 2 and m.shape[1] > 1 for m in metas)


def _compile_traced(model, gm, example_inputs, calib_x, valid_x, opts, trained, output, validate, thresholds,
                    callback, progress, t0, traced=None) -> CompileResult:
    if validate and (thresholds or {}).get("min_top1") is not None and _has_class_scores(gm) is False:
        # a validation failure kept the file and exited 1, as for a file that computes another model
        raise UserError("a top-1 bound was given (--min-top1, min_top1), but no output of the model holds class "
                        "scores (batch x classes, more than one class): drop it for this model, or bound the SQNR "
                        "(--min-sqnr)")
    if opts.dynamic_axes:  # before the passes: an axis the inputs do not have is a mistake of the command
        dynamic.check_axes(opts.dynamic_axes, example_inputs)
        from .frontend import SIZED_AXES, SIZED_SITE, SIZED_TRACE

        free = set(gm.meta.get(SIZED_AXES, ())) | {0}  # the axes whose sizes the sized trace kept traced
        if gm.meta.get(SIZED_TRACE) and not set(opts.dynamic_axes) <= free:
            # a branch on a size, math on it: the example's, whatever the checks sample. Where: the module the plain
            # trace stopped in (nn.MultiheadAttention's own check of an attn_mask's shape, not the user's code)
            site = gm.meta.get(SIZED_SITE)
            where = f", in {site}" if site else ""
            raise UserError(f"{dynamic.flag(opts.dynamic_axes)}: the model computes with its input's sizes in Python "
                            f"(a branch on x.shape, math.ceil of it{where}), which torch.fx cannot trace, so its graph holds "
                            "the example's sizes and computes the model at those only; compile once per size without "
                            "--dynamic-axes, or compute the sizes with tensor operations")
    pipeline = Pipeline(build_passes(opts, calib_x, progress, example=example_inputs), check=opts.check,
                        callback=callback, name_errors=False)  # its messages speak of options
    time_note = _time_first_note(gm)  # on the traced modules, before the passes make layers functional
    gm = pipeline(gm).gm
    gm.eval()
    if opts.dynamic_axes:  # pools the passes or the export write for the example's size alone
        dynamic.check_fixed_size_ops(gm, opts.dynamic_axes)
    gm.meta.pop(DISTILLED, None)  # data-free calibration's inputs, where BiasCorrection did not take them
    gm.meta.pop(INITIAL_BATCHNORM_STATS, None)
    gm.meta.pop(PARTIAL_BATCHNORM_STATS, None)
    hints = [h for p in pipeline.passes for h in getattr(p, "level_hints", ())]
    level_note = None
    if hints:  # the pass report has them too; the CLI prints it, from Python a warning is the only word of it
        level_note = (f"{hints[0]}{f' (and {len(hints) - 1} more)' if len(hints) > 1 else ''}: APoT levels suit "
                      "bell-shaped values, uniform ones values spread over their range; consider --ascheme uniform "
                      "(ascheme='uniform') or --config for those layers")
        warnings.warn(level_note, QuantizationWarning, stacklevel=user_stacklevel())

    # the pass warned already (a pipeline run by hand says it too); the summary carries it for the command line
    batchnorm_note = next((p.batchnorm_note for p in pipeline.passes if getattr(p, "batchnorm_note", None)), None)
    mixed_note = next((p.weight_only_note for p in pipeline.passes if getattr(p, "weight_only_note", None)), None)
    if mixed_note:  # the CLI prints it; from Python a warning is the only word of it
        warnings.warn(mixed_note, QuantizationWarning, stacklevel=user_stacklevel())
    few_note = few_samples_note(calib_x) if opts.quantized and not trained else None
    if few_note:
        warnings.warn(few_note, QuantizationWarning, stacklevel=user_stacklevel())
    shift_note = gm.meta.get(DATA_SHIFT_NOTE)
    if shift_note:
        warnings.warn(shift_note, QuantizationWarning, stacklevel=user_stacklevel())
    first_last_note = None
    if any(getattr(p, "only_first_last", False) for p in pipeline.passes):
        kept = "at 8-bit uniform" if opts.keep_first_last == "int8" else "float"
        first_last_note = (f"no layer of this model is {opts.describe()}: its first and last layers are kept {kept} "
                           f"(--keep-first-last {opts.keep_first_last}) and it has no other layer the rules leave "
                           "as asked; --keep-first-last quant (keep_first_last='quant') quantizes them as asked")
        warnings.warn(first_last_note, QuantizationWarning, stacklevel=user_stacklevel())
    decided = [n.meta["qconfig"] for n in gm.graph.nodes if n.meta.get("qconfig") is not None]
    if opts.quantized and decided and all(cfg.action == "float" for cfg in decided) and first_last_note is None:
        # --exclude '*': the header said "(apot W4A4)" and the file was the float model, without a word
        reasons = ", ".join(dict.fromkeys(cfg.reason for cfg in decided))
        first_last_note = (f"no layer is quantized: every layer is kept float ({reasons}), so the file computes "
                           "the float model")  # the summary's note of the same kind: no layer as asked
        warnings.warn(first_last_note, QuantizationWarning, stacklevel=user_stacklevel())
    elif opts.quantized and not decided and not trained and first_last_note is None:
        # a model of activations and pooling only: the header said "(apot W4A4)", exit 0, not a word
        first_last_note = ("no layer is quantized: the model has no layer qcompile quantizes (Conv, Linear, "
                           "ConvTranspose, Embedding, recurrent layers, matmuls with a parameter), so the file "
                           "computes the float model")
        warnings.warn(first_last_note, QuantizationWarning, stacklevel=user_stacklevel())
    numbers_note = _python_numbers_hint(gm)
    if time_note:  # the CLI prints it; from Python a warning is the only word of it
        warnings.warn(time_note, QuantizationWarning, stacklevel=user_stacklevel())
    if numbers_note:  # validation sees it only where its data differs from the example's
        warnings.warn(numbers_note, QuantizationWarning, stacklevel=user_stacklevel())
    calib_note = None
    if opts.quantized:
        note = int8_grid_note(opts, gm)
        if note:  # the CLI prints it; from Python a warning is the only word of it
            warnings.warn(note, QuantizationWarning, stacklevel=user_stacklevel())
        calib_note = _clip_note(opts, gm)
        if calib_note:
            warnings.warn(calib_note, QuantizationWarning, stacklevel=user_stacklevel())
        from qcompile.passes.select import opaque_layers

        opaque = opaque_layers(gm)
        if opaque:  # the CLI's layer table shows them; from Python this is the only word of it
            shown = "; ".join(f"{name} ({what})" for name, _, what in opaque[:3])
            warnings.warn(f"{len(opaque)} module(s) keep layers float, opaque to the quantizer: {shown}"
                          f"{' ...' if len(opaque) > 3 else ''} (README, Tracing: why, and --leaf-module/--exclude)",
                          QuantizationWarning, stacklevel=user_stacklevel())
        from .emit import emit, quantizers_by_id  # ONNX-level emission (standard / custom / shift-add)

        table = quantizers_by_id(gm)  # ids the exporter's markers carry
        exported = export_mod.export_onnx(gm, example_inputs)
        if opts.dynamic_axes:
            dynamic.mark_inputs(exported, example_inputs, opts.dynamic_axes)
        onnx_model = emit(exported, table, opts)
        del exported
    else:
        onnx_model = export_mod.export_onnx(gm, example_inputs)
    rank_notes = export_mod.pin_output_dims(onnx_model, gm, example_inputs)
    for note in rank_notes:  # the CLI prints warnings; onnxruntime said only "Expected shape ... does not match"
        warnings.warn(note, QuantizationWarning, stacklevel=user_stacklevel())
    export_mod.strip_default_attributes(onnx_model)
    export_mod.share_identical_initializers(onnx_model)
    export_mod.drop_identity_requantizations(onnx_model)
    if opts.emit == "shift-add" and opts.quantized and (opts.check if opts.check is not None
                                                         else os.environ.get("QCOMPILE_CHECK") == "1"):
        from .lowering import check_shift_add

        check_shift_add(onnx_model)  # the regions as written, after the renames above
    _check_protobuf_size(onnx_model, opts)
    probe = None
    if opts.dynamic_axes:
        # the model, its traced float graph and its simulation at twice the example's size on those axes, and at
        # an odd size (two samples: padding computed from the size differs there; a size the model itself refuses,
        # as a UNet's skips do, is not checked): the output shapes the file declares, and (below, once the file is
        # serialized) the check that it computes its simulation at those sizes too
        axes = opts.dynamic_axes
        source = valid_x if valid_x is not None else calib_x if calib_x is not None else example_inputs
        probe = dynamic.probe_inputs(source, axes)
        odd = dynamic.probe_inputs(source, axes, samples=2, extra=1)
        probe_reference = gm if trained else float_reference(model, example_inputs, opts.leaf_modules)
        probe_outputs = dynamic.run_model_at_probe(probe_reference, probe, axes, "trained" if trained else "model")
        odd_outputs = dynamic.run_model_at_probe(probe_reference, odd, axes, "model", optional=True)
        if traced is not None:
            for inputs, outputs in ((probe, probe_outputs), (odd, odd_outputs)):
                if outputs is not None:
                    dynamic.check_traced(traced, inputs, outputs, axes)
            traced = None
        sim_outputs = dynamic.run_model_at_probe(gm, probe, axes, "graph")
        declared = dynamic.mark(onnx_model, example_inputs, axes, probe, probe_outputs, sim_outputs,
                                more=[(odd, odd_outputs)] if odd_outputs is not None else [])
        del sim_outputs
        probes = [(probe, probe_outputs)] + ([(odd, odd_outputs)] if odd_outputs is not None else [])
        if opts.quantized:  # its outputs are all the check needs: no second copy of the weights during validation
            probe_reference = None
    from . import __version__

    onnx_model.producer_name, onnx_model.producer_version = "qcompile", __version__  # not torch.onnx's name
    summary = {"level_note": level_note} if level_note else {}
    if calib_note:
        summary["calib_note"] = calib_note
    if numbers_note:
        summary["numbers_note"] = numbers_note
    if first_last_note:
        summary["first_last_note"] = first_last_note
    if few_note:
        summary["few_samples_note"] = few_note
    if shift_note:
        summary["data_shift_note"] = shift_note
    if rank_notes:
        summary["output_rank_note"] = rank_notes[0]
    if mixed_note:
        summary["mixed_precision_note"] = mixed_note
    if batchnorm_note:
        summary["batchnorm_note"] = batchnorm_note
    if time_note:
        summary["time_first_note"] = time_note
    if gm.meta.get(export_mod.FROZEN_BRANCH_NOTE):
        summary["frozen_branch_note"] = gm.meta[export_mod.FROZEN_BRANCH_NOTE]
    unused = [n.target for n in gm.graph.nodes if n.op == "placeholder" and not n.users]
    file_inputs = [i.name for i in onnx_model.graph.input]
    if unused and len(file_inputs) < len(example_inputs):
        # a user feeding every input to onnxruntime got "invalid input name" and nothing had said why
        unused_note = (f"the model never reads its input(s) {', '.join(map(str, unused))}: the file has no input for "
                       f"them (as torch.onnx.export writes it); run it in onnxruntime with "
                       f"{', '.join(file_inputs) or 'no inputs'} only")
        summary["unused_inputs_note"] = unused_note
        warnings.warn(unused_note, QuantizationWarning, stacklevel=user_stacklevel())
    if opts.quantized and opts.emit == "shift-add":
        from .cost import cost_report, format_cost_report, nothing_lowered_note

        cost = cost_report(onnx_model)
        summary.update({"shift_add_cost": cost, "lines": format_cost_report(cost)})
        from .qmodules import FakeQuantize

        weight_quantizers = sum(isinstance(m, FakeQuantize) and m.role == "weight" for m in gm.modules())
        nothing = nothing_lowered_note(cost, weight_quantizers)
        if nothing:  # the CLI prints it; from Python a warning is the only word of it
            summary["shift_add_note"] = nothing
            warnings.warn(nothing, QuantizationWarning, stacklevel=user_stacklevel())
    onnx_model.metadata_props.add(key=OPTIONS_KEY, value=options_metadata(opts))
    if trained:  # as qat.export records it
        from qcompile.qat.convert import CONVERTED_KEY

        onnx_model.metadata_props.add(key="qcompile.qat", value=model.meta[CONVERTED_KEY].describe())
    if not trained:  # qcompile validate --against: the same weights, not only the same architecture
        # every value (0.7.3 on); the sampled form too, which is what 0.7.1-0.7.2 validators compare
        onnx_model.metadata_props.add(key=MODEL_KEY, value=json.dumps(
            {"sha256": model_fingerprint(model, sampled=True), "sha256_all": model_fingerprint(model)},
            separators=(",", ":")))
    if opts.quantized and calib_x is not None:
        first = calib_x[0] if isinstance(calib_x, tuple) else calib_x
        onnx_model.metadata_props.add(key=CALIBRATION_KEY, value=json.dumps(
            {"samples": int(first.shape[0]), "sha256": calibration_fingerprint(calib_x)}, separators=(",", ":")))
    # serialized once, for the checker, the validation and the file; and the in-memory model parsed again from it:
    # upb keeps a tensor replaced in a message (emission's float weights -> int8) in the message's arena until
    # the whole message goes, so the exported model held its float weights beside the quantized ones through the
    # validation (a 54M-weight MLP at W8A8: 315 MB for a 52 MB file)
    data = onnx_model.SerializeToString()
    onnx_model = onnx.ModelProto.FromString(data)
    export_mod.check_model(data)

    report = None  # validated before it is written: nothing is left behind when validation cannot run
    if validate:
        t_validate = time.perf_counter()
        inputs = valid_x
        if inputs is None:
            inputs = calib_x if calib_x is not None else random_validation_inputs(example_inputs, gm)
        th = default_thresholds(opts)
        th.update(thresholds or {})
        if opts.quantized:
            from qcompile.runtime.validation import validate_quantized

            # the passes worked on a copy: model is still the float one (a QAT-trained model has none: its converted
            # quantizers compared with themselves, "vs the float model: 79 dB, top-1 100 %" at 10 % accuracy)
            float_model = None
            if not trained:
                # its outputs, computed first: the float copy is let go before the validation's own runs (one copy
                # of the weights less at their peak)
                from qcompile.runtime.validation import as_inputs, float_outputs, validation_batch_size

                float_model = float_outputs(float_reference(model, example_inputs, opts.leaf_modules), inputs,
                                            validation_batch_size(as_inputs(inputs), gm))
            with _onnxruntime_refusals():
                report = validate_quantized(data, gm, inputs, float_model=float_model,
                                            **th)
            constant = report.extra.get("float_output_constant")
            if constant is not None:
                summary["constant_output_note"] = (
                    f"the float model's outputs are all {constant:g} on these inputs, so the comparisons with it say "
                    "nothing about the quantization (an untrained model whose last layer starts at zero?); compile "
                    "the trained model")
                warnings.warn(summary["constant_output_note"], QuantizationWarning, stacklevel=user_stacklevel())
            quality = quality_warning(report, gm, opts.calib_method) if inputs is valid_x or inputs is calib_x \
                else None  # random inputs have no classes, nor the calibrated ranges
            if quality:  # validation compares the file with its simulation and passes: the loss is the quantized model's
                warnings.warn(quality, QuantizationWarning, stacklevel=user_stacklevel())
        else:
            # against the model itself (its float32 copy), as qcompile validate does: the traced graph could be the
            # one that differs (it is checked on the example inputs only)
            with _onnxruntime_refusals():
                report = validate_model(data,
                                        float_reference(model, example_inputs, opts.leaf_modules), inputs,
                                        float64_scale=not _random_draws(gm),
                                        rounding_scale="min_sqnr" not in (thresholds or {}), **th)
        if not report.passed and numbers_note:
            report.failures.append(numbers_note)
        if not report.passed:
            drawn = _random_draws(gm)
            if drawn:
                report.failures.append(f"forward draws random numbers ({', '.join(drawn[:3])}): the file draws other "
                                       "ones than the simulation, so they cannot agree; make the model deterministic "
                                       "for the compile (no sampling in eval mode)")
        # most of a large model's compile (ResNet-50, 32 images at 224x224: 31 of 40 s), and nothing said so
        summary["validation_seconds"] = round(time.perf_counter() - t_validate, 3)
    if probe is not None and (report is None or report.passed):  # (a failed validation is the verdict already)
        entry = summary["dynamic_axes"] = _check_dynamic(data, gm, probes, probe_reference, opts, thresholds,
                                                         declared)
        del probe_reference, probe_outputs, probes
        if odd_outputs is None:  # the model refused the odd size: said, not hidden
            entry["odd_size_refused_by_model"] = [list(t.shape) for t in (odd if isinstance(odd, tuple) else (odd,))
                                                  if isinstance(t, torch.Tensor)]
        if trained:  # its probe reference was the simulation itself: no float model was compared
            entry.pop("sqnr_vs_float_db", None)
            entry.pop("top1_vs_float", None)
        at_example = report.extra.get("sqnr_vs_float_db") if report is not None else None
        at_probe = entry.get("sqnr_vs_float_db")
        if at_example is not None and at_probe is not None and at_probe < at_example - DYNAMIC_SQNR_DROP_DB:
            # the file computes its simulation at the new size, but the ranges were calibrated at the example's
            summary["dynamic_axes_note"] = (
                f"--dynamic-axes: on the validation inputs at twice their size (each value repeated) the quantized "
                f"model is {at_probe:.1f} dB from the float model, {at_example:.1f} dB at the example's size: "
                "activation ranges calibrated at one size can clip or waste levels at another; calibrate (--calib) "
                "on inputs of the size the file mostly runs at")
            warnings.warn(summary["dynamic_axes_note"], QuantizationWarning, stacklevel=user_stacklevel())
    path = export_mod.save_bytes_atomic(data, output) if output is not None else None
    return CompileResult(model=gm, onnx_path=path, onnx_model=onnx_model, report=report, options=opts,
                         timings=pipeline.timings, seconds=time.perf_counter() - t0, summary=summary)
