"""``convert`` / ``export``: a trained QAT model → the plain quantized GraphModule → ONNX.

Each trainable quantizer becomes a plain, calibrated :class:`qcompile.qmodules.FakeQuantize` whose ``alpha`` is
the effective clipping value the trained model used (``alpha`` for PACT, ``sigma * alpha`` for APoT with weight
normalisation, ``alpha * sigma`` for SDQ). Nothing is recalibrated.

Weight normalisation folds away exactly: the trained layer computes ``conv(x, Q(w))`` with
``Q(w) = fake_quantize(w - mu, sigma * alpha)`` (per output channel), i.e. ``sigma * alpha * Pi(w_n / alpha)``
with ``w_n = (w - mu) / sigma``. ``convert`` stores ``w - mu`` as the layer weight and ``sigma * alpha`` as the
quantizer's ``alpha`` -- the same float32 operations as the trained forward, so the converted model computes the
trained model's values bit for bit and the graph is unchanged (``F.conv2d(act_fq(x), weight_fq(weight), b)``).
The scale ``sigma`` plays the part of the BatchNorm that follows the normalised conv in the authors' ResNets
(BN is folded before training here); the mean ``mu`` is dropped, as in the paper.

Before: ``weight_fq = LearnableFakeQuantize(weight_norm)``, weight ``w``, bias ``layer.bias_fq(b)``.
The biases were trained on their accumulator grid (``BiasQuantize``); its nodes are removed and the pipeline's
``QuantizeBias`` stores the rounded values.

After:  ``weight_fq = FakeQuantize(alpha = sigma * alpha)``, weight ``w - mu``; layers marked
``meta["bias_corrected"]`` so a later ``qcompile.compile`` leaves the trained biases alone. Then the compile
pipeline's passes after calibration run (``qat.prepare.split_pipeline``), as at the end of a compile: biases are
rounded to the accumulator grid ``S_x * S_w`` (as in training) and the int8 layers' output re-quantization
becomes integer-exact, so the converted model differs from the trained one by that integer re-quantization only.
"""
from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from qcompile.errors import UserError
from qcompile.ir import QParams
from qcompile.passes.base import Pipeline
from qcompile.qmodules import FakeQuantize

from .modules import BiasQuantize, LearnableFakeQuantize
from .prepare import META_KEY, _attr, _set_submodule, config_of, split_pipeline

CONVERTED_KEY = "qat_converted"  # gm.meta[CONVERTED_KEY]: the QATConfig the converted model was trained with
_LAYER_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.linear)


def _warn_if_untrained(model: torch.fx.GraphModule) -> None:
    """No parameter of the prepared module moved since ``prepare``: an optimizer built from the float model
    (``torch.optim.AdamW(model.parameters())`` before ``prepare``) stepped that model's tensors while the loss
    flowed through these, and the file exported the PTQ starting point under a PASS."""
    from qcompile.errors import QuantizationWarning

    from .prepare import UNTRAINED_KEY, parameter_sums

    start = model.meta.get(UNTRAINED_KEY) if isinstance(getattr(model, "meta", None), dict) else None
    if start is not None and start == parameter_sums(model):
        warnings.warn("no weight, bias or clipping value of this model changed since qcompile.qat.prepare: it was "
                      "not trained (an optimizer built before prepare, from the float model's parameters, updates "
                      "those instead: build it from the module prepare returns, qcompile.qat.param_groups(gm))",
                      QuantizationWarning, stacklevel=3)


def convert(model: torch.fx.GraphModule, inplace: bool = False) -> torch.fx.GraphModule:
    """The trained model with plain ``FakeQuantize`` modules holding the learned clipping values (eval mode).

    ``inplace=False`` (default) leaves ``model`` trainable and untouched.
    """
    from qcompile.frontend import unwrap

    model = unwrap(model)
    if not isinstance(model, torch.fx.GraphModule):
        raise UserError("convert takes the GraphModule that qcompile.qat.prepare returned")
    cfg = config_of(model)
    _warn_if_untrained(model)
    gm = model if inplace else copy.deepcopy(model)
    gm.eval()
    nodes = [n for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LearnableFakeQuantize)]
    if not nodes:
        raise UserError("the model has no trainable quantizers; give the module that qcompile.qat.prepare returned")
    method = cfg.method if cfg is not None else "qat"
    _fold_bias_quantizers(gm)
    with torch.no_grad():
        for node in nodes:
            fq = gm.get_submodule(node.target)
            if fq.role == "weight":
                source = node.args[0]
                if not (isinstance(source, torch.fx.Node) and source.op == "get_attr"):
                    raise UserError(f"weight quantizer {node.target} does not read a parameter; cannot fold it")
                weight = _attr(gm, source.target)
                x_in, alpha = fq.effective(weight)
                if fq.weight_norm:
                    weight.copy_(x_in)  # w - mu: the tensor the trained levels quantized
            else:
                _, alpha = fq.effective(torch.zeros(()))  # eval mode: no running statistic moves
            plain = FakeQuantize(fq.scheme, fq.bits, fq.signed, axis=fq.axis, role=fq.role,
                                 observer=fq.observer_name)
            plain.level_offset = fq.level_offset
            plain.set_params(alpha.detach().clone(), fq.zero_point)
            _set_submodule(gm, node.target, plain)
            node.meta["qparams"] = QParams(scheme=plain.scheme, bits=plain.bits, signed=plain.signed,
                                           alpha=plain.alpha.clone(), axis=plain.axis,
                                           zero_point=int(plain.zero_point) if plain.zero_point.numel() == 1 else 0,
                                           role=plain.role, observer=f"qat:{method}",
                                           level_offset=plain.level_offset)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _LAYER_FUNCTIONS and len(node.args) > 1:
            wq = node.args[1]
            if isinstance(wq, torch.fx.Node) and wq.op == "call_module" and \
                    isinstance(gm.get_submodule(wq.target), FakeQuantize):
                node.meta["bias_corrected"] = True  # the biases were trained with the quantizers in the loop
    gm.meta.pop(META_KEY, None)
    if cfg is not None:
        gm.meta[CONVERTED_KEY] = cfg
    if cfg is not None:
        after = split_pipeline(cfg.options)[1]
        gm = Pipeline(after, check=cfg.options.check, name_errors=False)(gm).gm
        _warn_if_pair_safe_moved(after)
    return gm


def _warn_if_pair_safe_moved(passes) -> None:
    """``int8_weights="s8-safe"`` given to ``prepare``: the pair-safe pass runs at conversion, after training, and
    changes trained 8-bit layers (a wider weight step, moved weights: digits APoT W4A4 after training, 133 of conv1's
    weights, 1 of 500 predictions changed); the export's validation compares the file with the converted model and
    passes, so this is the only word of it."""
    from qcompile.errors import QuantizationWarning
    from qcompile.passes.int8_pairs import PairSafeInt8Weights

    layers = [line.split(":")[0] for p in passes if isinstance(p, PairSafeInt8Weights) for line in p.report
              if "weight pairs within int16" in line]
    if layers:
        warnings.warn(f"int8_weights='s8-safe' made the trained 8-bit layer(s) {', '.join(layers[:4])}"
                      f"{' ...' if len(layers) > 4 else ''} pair-safe at conversion (the pass runs after training: a "
                      "wider weight step, moved weights), so the file computes the converted model, which may differ "
                      "from the trained one on some inputs; int8_weights='auto' keeps the trained weights (uint8 "
                      "where int8 would saturate on x86 without VNNI)", QuantizationWarning, stacklevel=3)


def export(model: torch.fx.GraphModule, example_inputs, output: Optional[str] = None, *, validate: bool = True,
           validation_inputs=None, emit: str = "standard", thresholds: Optional[dict] = None,
           float_model: Optional[nn.Module] = None, dynamic_axes=(), **options):
    """Convert a trained QAT model and export it like ``qcompile.compile`` does: ONNX export, emission,
    ``onnx.checker``, atomic write to ``output`` (if given), and validation in onnxruntime against the converted
    simulation (``validation_inputs``, default the example inputs and 15 N(0, 1) samples of their shape).
    Returns a :class:`qcompile.api.CompileResult`.

    ``dynamic_axes`` (input axes besides the batch whose size may change, ``(2, 3)``): the export is
    ``qcompile.compile`` of the trained model with them, which converts it the same way and checks the file at other
    sizes (README "Dynamic axes"); ``float_model`` is then not used.
    """
    if options:  # int8_weights="u8": Python's own TypeError ("unexpected keyword argument") before
        name = next(iter(options))
        raise UserError(f"qat.export takes output, validate, validation_inputs, emit, thresholds, float_model and "
                        f"dynamic_axes, not {name!r}; the other options of the file's form (int8_weights) go "
                        f"through qcompile.compile(model, example_inputs, {name}=...), which exports a trained model "
                        "the same way")
    if dynamic_axes:
        from qcompile.api import compile as compile_model

        return compile_model(model, example_inputs, output=output, validate=validate,
                             validation_inputs=validation_inputs, thresholds=thresholds, emit=emit,
                             dynamic_axes=dynamic_axes)
    from qcompile import export as export_mod
    from qcompile.api import CompileResult, as_input_tuple, calib_data
    from qcompile.emit import emit as emit_onnx, quantizers_by_id
    from qcompile.options import OPTIONS_KEY, CompileOptions, resolve_int8_weights, to_metadata
    from qcompile.runtime.validation import validate_quantized

    t0 = time.perf_counter()
    from qcompile.api import checked_thresholds

    thresholds = checked_thresholds(thresholds, validate=validate)  # {"min_sqnr": "30"}: a TypeError in validation
    if not validate and validation_inputs is not None:
        raise UserError("validation_inputs= holds the inputs validation runs on, and validate=False skips it; drop "
                        "one of them")
    from qcompile.api import checked_output_arg

    output = checked_output_arg(output)  # a pathlib.Path: "'PosixPath' object has no attribute 'endswith'"
    if output is not None:
        export_mod.check_output_path(output, what="output")
    from qcompile.frontend import unwrap

    model = unwrap(model)  # DataParallel, torch.compile, AveragedModel (EMA/SWA of QAT) around the prepared model
    if isinstance(model, nn.Module) and any(p.is_floating_point() and p.dtype != torch.float32
                                            for p in list(model.parameters()) + list(model.buffers())):
        model = copy.deepcopy(model).float()  # a half/bfloat16/double copy: its float32 values, as compile takes them
    if not isinstance(model, torch.fx.GraphModule):
        raise UserError("qcompile.qat.export takes the GraphModule that qcompile.qat.prepare returned (trained), or "
                        "qcompile.qat.convert's result; a float model compiles with qcompile.compile")
    cfg = config_of(model)
    if cfg is None and not _has_learnable(model) and CONVERTED_KEY not in model.meta:
        raise UserError("the model has no trainable quantizers (not prepared with qcompile.qat.prepare): export the "
                        "module that qcompile.qat.prepare returned, or compile a float model with qcompile.compile")
    gm = convert(model) if cfg is not None or _has_learnable(model) else model
    cfg = cfg or gm.meta.get(CONVERTED_KEY)
    opts = cfg.options if cfg is not None else CompileOptions()
    # QAT keeps its trained level decisions: no accumulator cells (qat.prepare.split_pipeline), and the file says so
    opts = resolve_int8_weights(dataclasses.replace(opts, emit=emit, int8_levels=False), keep_weights=True)
    example_inputs = as_input_tuple(example_inputs)
    _check_runs(gm, example_inputs)
    table = quantizers_by_id(gm)
    onnx_model = export_mod.strip_default_attributes(emit_onnx(export_mod.export_onnx(gm, example_inputs), table, opts))
    onnx_model.metadata_props.add(key=OPTIONS_KEY, value=to_metadata(opts))
    if cfg is not None:
        onnx_model.metadata_props.add(key="qcompile.qat", value=cfg.describe())
    export_mod.check_model(onnx_model)
    report = None  # validated before it is written, as compile does: nothing is left behind when it cannot run
    if validate:
        from qcompile.api import check_calibration_data, quality_warning, random_validation_inputs
        from qcompile.errors import QuantizationWarning

        if validation_inputs is not None:
            inputs = calib_data(validation_inputs, len(example_inputs), what="validation")
            check_calibration_data(inputs, example_inputs, "validation data", "validation_inputs")
        else:  # the example and noise of its shape, as compile without data (the example alone checked little)
            inputs = random_validation_inputs(example_inputs, gm)
        if isinstance(float_model, nn.Module):
            from qcompile.frontend import plain_copy

            # an eval-mode copy, as compile runs it: after a training loop the model is in train mode, where its
            # BatchNorms took batch statistics (and moved their running ones) and its Dropouts dropped values
            float_model = plain_copy(float_model).eval()
        report = validate_quantized(onnx_model.SerializeToString(), gm, inputs, float_model=float_model,
                                    **(thresholds or {}))
        quality = quality_warning(report, gm) if validation_inputs is not None else None  # noise has no classes
        if quality:
            warnings.warn(quality, QuantizationWarning, stacklevel=2)
    path = export_mod.save_atomic(onnx_model, output) if output is not None else None
    return CompileResult(model=gm, onnx_path=path, onnx_model=onnx_model, report=report, options=opts, timings=[],
                         seconds=time.perf_counter() - t0)


def _check_runs(gm: torch.fx.GraphModule, example_inputs: tuple) -> None:
    """A one-line error where the converted model does not run on the example inputs (a wrong shape was a torch
    RuntimeError from inside the int8 layer simulation; compile and prepare say which shapes failed)."""
    import contextlib
    import io

    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # torch.fx prints the failing code
            gm(*example_inputs)
    except Exception as exc:  # noqa: BLE001 -- any failure on the user's example is reported as such
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor)
                           else repr(t) for t in example_inputs)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"the model does not run on the example inputs of shape [{shapes}] ({first}); give "
                        "example_inputs shaped like the data the model was prepared and trained on") from None


def _fold_bias_quantizers(gm: torch.fx.GraphModule) -> None:
    """Take the BiasQuantize nodes out of the graph: the pipeline's ``QuantizeBias`` (run by convert) puts the
    biases on the same grid with the final clipping values, as the trained forward did."""
    nodes = [n for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), BiasQuantize)]
    with torch.no_grad():
        for node in nodes:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            parent, _, name = str(node.target).rpartition(".")
            delattr(gm.get_submodule(parent) if parent else gm, name)
    if nodes:
        gm.recompile()


def _has_learnable(model: nn.Module) -> bool:
    return any(isinstance(m, LearnableFakeQuantize) for m in model.modules())
