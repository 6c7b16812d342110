"""``prepare``: a model → a trainable fx GraphModule with learnable fake-quantizers, initialised by PTQ.

The graph is the one ``qcompile.compile`` would export: trace → FoldBatchNorm → SelectLayers → InsertQuantizers
→ QuantizeOutputs → Calibrate (the compile pipeline, ``qcompile.pipeline.build_passes``, with bias correction
off: training absorbs the mean error itself), up to calibration. The passes after calibration (bias rounding to
the accumulator grid, integer binding of int8 layers) read the final clipping values and biases, so they run in
:func:`qcompile.qat.convert`, after training. BatchNorm is folded *before* training: the simple, exportable
choice -- the trained graph is the exported graph, and nothing has to be re-folded into quantized weights
afterwards. (Training with BN unfolded and folding it into the quantized weights after training would change the
weights that were trained on the grid.) With BN folded, the output channels of a layer carry BN's per-channel
scale, so weight statistics (APoT weight normalisation, SDQ's σ) are taken per output channel where the weights
are quantized per channel.

Then every calibrated ``FakeQuantize`` becomes a trainable one (:mod:`qcompile.qat.modules`):

- quantizers at the requested precision (weights ``wscheme``/``wbits``, activations ``ascheme``/``abits``) learn α
  with the method's gradient; their initial α is the PTQ value (activations: the pipeline's calibration observer;
  weights: the MSE-optimal clip of the pooled, per-channel normalised weights, one search per layer);
- the others (first/last layers and 8-bit output re-quantizers) keep their calibrated α fixed and pass the STE,
  as the APoT authors keep the first and last layers at a fixed 8-bit scale.
"""
from __future__ import annotations

import math

import collections.abc
import dataclasses
import warnings
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from qcompile import quant
from qcompile.api import (_example_int_types, as_input_tuple, calib_data, check_calibration_data,
                          extra_items_note)
from qcompile.errors import QuantizationWarning, UserError
from qcompile.frontend import plain_copy, trace, unwrap
from qcompile.options import CompileOptions
from qcompile.passes.base import Pipeline
from qcompile.passes.base import Pass, verify
from qcompile.passes.bias_correction import BiasCorrection
from qcompile.passes.calibrate import Calibrate
from qcompile.pipeline import build_passes
from qcompile.qmodules import FakeQuantize

from .modules import SDQ_MOMENTUM, BiasQuantize, LearnableFakeQuantize, SDQFakeQuantize, channel_stats

META_KEY = "qat"  # gm.meta[META_KEY]: the QATConfig of a prepared model


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Defaults of one training method; ``prepare``'s ``weight_norm``/``rcf`` override them (ablations)."""

    name: str
    grad: str            # gradient of α: "rcf" or "ste"
    weight_norm: bool    # normalise weights before clipping
    learn_alpha: bool    # α trained at all
    sdq: bool = False
    summary: str = ""


METHODS = {
    "apot": MethodSpec("apot", "rcf", True, True, summary="APoT: weight normalisation + RCF (any level set)"),
    "pact": MethodSpec("pact", "ste", False, True, summary="PACT: learned clip, gradient 1 where clipped"),
    "ste": MethodSpec("ste", "ste", False, False, summary="plain STE: PTQ clip values kept, weights trained"),
    "sdq": MethodSpec("sdq", "ste", False, True, sdq=True, summary="SDQ: clip at alpha*sigma, eq. 6/8"),
}


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """What ``prepare`` did, kept on the model as ``gm.meta["qat"]``."""

    method: str
    wscheme: str
    ascheme: str
    wbits: int
    abits: int
    grad: str
    weight_norm: bool
    wn_center: bool
    shared_alpha: bool
    grad_scale: float
    momentum: float
    options: CompileOptions

    def describe(self) -> str:
        from qcompile.ir import FIXED_BITS

        wbits, abits = FIXED_BITS.get(self.wscheme, self.wbits), FIXED_BITS.get(self.ascheme, self.abits)
        parts = [f"{self.method}: W{wbits} {self.wscheme} / A{abits} {self.ascheme}", f"grad {self.grad}"]
        if self.weight_norm:
            parts.append("weight-norm" if self.wn_center else "weight-norm (scale only)")
        return ", ".join(parts)


def split_pipeline(opts: CompileOptions, calib=None) -> tuple[list[Pass], list[Pass]]:
    """The compile pipeline cut after ``Calibrate``: the passes up to calibration build the trainable graph;
    the ones after it fix biases and integer layers to the final clipping values, so they run after training
    (in :func:`qcompile.qat.convert`). Bias correction is a PTQ device and is left out."""
    from qcompile.passes.int8_pairs import PairSafeInt8Weights
    from qcompile.passes.int8_region import ShareInt8Params
    from qcompile.passes.quantize_outputs import BindIntegerLayers

    from qcompile.passes.quantize_outputs import QuantizeOutputs

    # QAT keeps its trained level decisions (see ``after``): layers before APoT/PoT levels get no cells, so an 8-bit
    # layer keeps the 8-bit output quantizer that lets it run on int8 kernels
    passes = [QuantizeOutputs(cells=False) if isinstance(p, QuantizeOutputs) else p for p in build_passes(opts, calib)]
    cut = next((i for i, p in enumerate(passes) if isinstance(p, Calibrate)), None)
    if cut is None:
        raise UserError("the compile pipeline has no calibration step to start QAT from")
    if cut + 1 < len(passes) and isinstance(passes[cut + 1], ShareInt8Params):
        cut += 1  # shared 8-bit parameters are a property of the graph that is trained, not a change after it
    # the trained logits of a final Linear are its float32 output: keep them (no QGemm accumulator rounding)
    # auto keeps the trained weights (export resolves it to u8 where s8 saturates); s8-safe asked for moves them
    # and levels decided on cells of the accumulator move thresholds by up to an accumulator unit: keep the trained
    # decisions (those layers stay float in onnxruntime)
    after = [BindIntegerLayers(float_outputs=False, cells=False) if isinstance(p, BindIntegerLayers) else p
             for p in passes[cut + 1:] if not isinstance(p, BiasCorrection)
             and not (isinstance(p, PairSafeInt8Weights) and opts.int8_weights == "auto")]
    return passes[:cut + 1], after


RECORD_ATTR = "_qcompile_qat"  # the same QATConfig as a plain attribute: torch.save of a GraphModule drops its meta


NODES_ATTR = "_qcompile_qat_nodes"  # node name -> (layer name, LayerConfig): what torch.save drops of node.meta


def set_config(model: torch.fx.GraphModule, cfg: "QATConfig") -> None:
    """Record ``cfg`` on ``model``: in ``gm.meta`` and as an attribute, which a whole-model ``torch.save`` keeps
    (``qat.export`` of a reloaded model lost its scheme and bits and stopped on the biases); and each layer node's
    name and config, which the reloaded graph (same node names) lost with its node meta: the layer table read
    ``conv2d_1 … W4 (default)`` for ``r2a`` at W2."""
    model.meta[META_KEY] = cfg
    setattr(model, RECORD_ATTR, cfg)
    setattr(model, NODES_ATTR, {n.name: (n.meta.get("layer"), n.meta.get("qconfig")) for n in model.graph.nodes
                                if n.meta.get("qconfig") is not None})


def config_of(model: nn.Module) -> Optional[QATConfig]:
    """The QATConfig of a prepared model (None for any other module)."""
    meta = getattr(model, "meta", None)
    cfg = meta.get(META_KEY) if isinstance(meta, dict) else None
    if not isinstance(cfg, QATConfig):
        cfg = getattr(model, RECORD_ATTR, None)  # reloaded from a torch.save of the whole model
        if isinstance(cfg, QATConfig) and isinstance(meta, dict):
            meta[META_KEY] = cfg
            nodes = getattr(model, NODES_ATTR, None) or {}
            for node in getattr(getattr(model, "graph", None), "nodes", ()):
                if node.name in nodes and node.meta.get("qconfig") is None:
                    layer, qconfig = nodes[node.name]
                    if layer is not None:
                        node.meta["layer"] = layer
                    node.meta["qconfig"] = qconfig
    return cfg if isinstance(cfg, QATConfig) else None


def _family(scheme: str) -> str:
    return "uniform" if scheme == "uniform_asym" else scheme


def prepare(model: nn.Module, example_inputs, scheme: str = "apot", bits: int = 4, method: str = "apot",
            calib=None, *, weight_norm: Optional[bool | str] = None, rcf: Optional[bool] = None,
            shared_alpha: bool = True, grad_scale: float = 1.0, momentum: float = SDQ_MOMENTUM,
            **options) -> torch.fx.GraphModule:
    """Trace, fold BN, select and insert quantizers, calibrate, and make the quantizers trainable.

    Args:
        model: the float model (it is not modified).
        example_inputs: a tensor or tuple of tensors, for tracing.
        scheme, bits: level set and bit-width, as for ``qcompile.compile`` (``wbits``/``abits``/``wscheme``/
            ``ascheme`` in ``options`` refine them). Method ``sdq`` defaults to uniform activations (SDQ eq. 4);
            its base-2 logarithmic weights are ``scheme="log2"``.
        method: ``apot`` (weight normalisation + RCF), ``pact`` (learned clip, PACT gradient), ``ste`` (fixed PTQ
            clip, STE), ``sdq`` (α·σ clipping, eq. 6/8).
        calib: calibration data for the PTQ initialisation (tensor, array, or iterable of batches); default: the
            example inputs.
        weight_norm, rcf: override the method's weight normalisation / RCF gradient (the APoT ablation).
            ``weight_norm="scale"`` divides by the per-channel std without removing the mean (see docs/qat.md:
            with BN folded before training, the removed mean costs the PTQ starting point).
        shared_alpha: one learned α per layer in normalised units (APoT with weight normalisation, SDQ), as in
            the papers; False learns one per output channel.
        grad_scale, momentum: SDQ's gradient scale ``s`` (eq. 8) and σ momentum (eq. 3).
        **options: fields of :class:`qcompile.options.CompileOptions` (``per_channel``, ``keep_first_last``,
            ``calib_method``, ``int8_outputs``, ``exclude``, ``config``, ``leaf_modules``, ``equalize``, ...).

    Returns the GraphModule in training mode, with ``gm.meta["qat"]`` (:class:`QATConfig`). Train it with any
    loop and optimizer (:func:`qcompile.qat.param_groups` separates the clipping values), then export with
    :func:`qcompile.qat.export` or ``qcompile.compile(qcompile.qat.convert(gm), ...)``.
    """
    if method not in METHODS:
        raise UserError(f"unknown QAT method {method!r}; choose one of {', '.join(METHODS)}")
    # rcf="no" was taken as true (RCF stayed on), grad_scale="x" raised from float(), grad_scale=-1 reversed SDQ's
    # alpha gradient
    import numpy as np

    for name, value in (("rcf", rcf), ("shared_alpha", shared_alpha)):
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise UserError(f"{name} must be True or False, got {value!r}")
    rcf = None if rcf is None else bool(rcf)
    shared_alpha = bool(shared_alpha)
    numbers_ = {}
    for name, value in (("grad_scale", grad_scale), ("momentum", momentum)):
        try:  # a number, a numpy scalar, a 0-d tensor; not a string or a boolean
            number = None if isinstance(value, (str, bytes, bool, np.bool_)) else float(value)
        except (TypeError, ValueError, RuntimeError):
            number = None
        if number is None or not math.isfinite(number):
            raise UserError(f"{name} must be a number, got {value!r}")
        numbers_[name] = number
    grad_scale, momentum = numbers_["grad_scale"], numbers_["momentum"]
    if not grad_scale > 0:
        raise UserError(f"grad_scale must be positive (it scales the clipping values' gradients), got {grad_scale!r}")
    spec = METHODS[method]
    if spec.sdq and (weight_norm or rcf):
        raise UserError("method 'sdq' has its own clipping (alpha * sigma); weight_norm/rcf apply to apot/pact")
    if not spec.learn_alpha and (weight_norm or rcf):  # they were accepted, not applied, and recorded as applied
        raise UserError(f"method {spec.name!r} keeps the calibrated clipping values (no alpha is trained); "
                        "weight_norm/rcf apply to apot/pact")
    grad = spec.grad if rcf is None else ("rcf" if rcf else "ste")
    if weight_norm not in (None, True, False, "scale"):
        raise UserError(f"weight_norm must be True, False or 'scale', got {weight_norm!r}")
    wn = spec.weight_norm if weight_norm is None else bool(weight_norm)
    wn_center = weight_norm != "scale"
    if spec.sdq and "ascheme" not in options:
        options["ascheme"] = "uniform"
    if options.pop("bias_correction", False):
        raise UserError("bias correction is a PTQ step; QAT trains the biases with the quantizers in the loop")
    if options.get("avg_wbits") is not None:
        raise UserError("avg_wbits chooses bit-widths for post-training quantization; for QAT give the bits per "
                        "layer (config=, e.g. the layer table of a compile with avg_wbits)")
    if options.get("weight_rounding", "nearest") != "nearest":
        raise UserError("adaptive weight rounding is a PTQ step; QAT trains the weights with their quantizers in the "
                        "loop (leave weight_rounding out)")
    options.setdefault("equalize", False)
    options.setdefault("equalize_inputs", True)  # raw input features: scaled in the file, trained from there on
    from qcompile.api import _check_option_names

    _check_option_names(options, "qcompile.qat.prepare()")
    opts = CompileOptions(scheme=scheme, bits=bits, bias_correction=False, **options)
    if not opts.quantized:
        raise UserError("QAT needs a quantized scheme, not fp32")
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be an nn.Module, got {type(model).__name__}")
    if config_of(model) is not None or any(type(m).__module__ in ("qcompile.qmodules", "qcompile.qat.modules")
                                           for m in model.modules()):
        raise UserError("the model already holds qcompile quantizers (prepared for QAT, or compiled); prepare the "
                        "float model (to change bits of a prepared one: qcompile.qat.change_bits)")
    example_inputs = as_input_tuple(example_inputs)
    # as compile takes it: one tensor for a one-input model, a tuple of tensors (or batches of tuples) for several
    if len(example_inputs) == 1 and calib is not None:  # as compile says it: a mask taken as a label
        if isinstance(calib, collections.abc.Iterator):
            calib = list(calib)
        note = extra_items_note(model, calib)
        if note:
            warnings.warn(note, QuantizationWarning, stacklevel=2)
    calib_x = calib_data(calib, len(example_inputs))
    if calib_x is None:
        calib_x = example_inputs[0] if len(example_inputs) == 1 else tuple(example_inputs)
    else:  # as compile checks it: one-line errors, not a pass failing on another shape, no samples or integers
        check_calibration_data(calib_x, example_inputs, option="calib=")
        calib_x = _example_int_types(calib_x, example_inputs)

    gm = trace(plain_copy(unwrap(model)).eval(), example_inputs, leaf_modules=opts.leaf_modules, copy=False)
    before, _ = split_pipeline(opts, calib_x)
    # Weights are re-initialised below (one MSE search per layer), so their calibration can be the cheap one.
    before[-1] = Calibrate(calib_x, method=opts.calib_method, weight_method="minmax")
    passes = before
    gm = Pipeline(passes, check=opts.check, name_errors=False)(gm).gm

    cfg = QATConfig(method=method, wscheme=opts.weight_scheme, ascheme=opts.act_scheme, wbits=opts.weight_bits,
                    abits=opts.act_bits, grad=grad, weight_norm=wn, wn_center=wn_center, shared_alpha=shared_alpha,
                    grad_scale=float(grad_scale), momentum=float(momentum), options=opts)
    _make_trainable(gm, cfg, spec, calib_x)
    from .modules import learnable_quantizers

    if not learnable_quantizers(gm):  # export then said "give the module that qcompile.qat.prepare returned"
        raise UserError("prepare quantized no layer (every layer excluded or fp32 by exclude/config, or none that "
                        "qcompile quantizes): nothing to train; leave some Conv/Linear layers quantized")
    _insert_bias_quantizers(gm)
    gm.recompile()
    if opts.check:
        verify(gm)
    set_config(gm, cfg)
    gm.meta[UNTRAINED_KEY] = parameter_sums(gm)  # convert warns when nothing moved from here
    gm.train()
    return gm


UNTRAINED_KEY = "qat_prepared_sums"


def parameter_sums(gm: nn.Module) -> tuple:
    """A cheap fingerprint of the trainable parameters (weights, biases, learned α): each one's sum and sum of
    magnitudes, float64. Any optimizer step on the prepared module moves it."""
    with torch.no_grad():
        return tuple((float(p.double().sum()), float(p.double().abs().sum())) for p in gm.parameters()
                     if p.requires_grad)


def _attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_submodule(gm: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _pooled_mse_alpha(z: torch.Tensor, levelset) -> torch.Tensor:
    """The MSE-optimal clipping value of all of ``z`` at once (one histogram search)."""
    obs = quant.make_observer("mse")
    obs.update(z.detach().reshape(-1))
    return obs.compute_qparams(levelset).alpha.reshape(())


def _learns(fq: FakeQuantize, cfg: QATConfig) -> bool:
    # ternary/binary quantizers have their own width whatever --bits said (FIXED_BITS): wscheme="ternary" with
    # bits=4 compared 2 with 4, and the run's own weight quantizers learned no alpha and had no weight
    # normalisation, while the recorded method said they had
    from qcompile.ir import FIXED_BITS

    if fq.role == "weight":
        return (fq.scheme, fq.bits) == (cfg.wscheme, FIXED_BITS.get(cfg.wscheme, cfg.wbits))
    return (_family(fq.scheme), fq.bits) == (_family(cfg.ascheme), FIXED_BITS.get(cfg.ascheme, cfg.abits))


def _activation_sigmas(gm: torch.fx.GraphModule, nodes, data: torch.Tensor, batch: int = 64) -> dict:
    """SDQ's σ of the mirrored positive part of each quantizer's input over ``data`` (PTQ-calibrated model)."""
    sums = {n.target: [0.0, 0] for n in nodes}
    hooks = []
    for n in nodes:
        def hook(mod, inp, name=n.target):
            x = inp[0].detach().double()
            pos = x > 0
            sums[name][0] += float(torch.where(pos, x * x, 0.0).sum())
            sums[name][1] += int(pos.sum())
        hooks.append(gm.get_submodule(n.target).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for i in range(0, _length(data), batch):
                gm(*_rows(data, i, i + batch))
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.tensor(max((s / max(c, 1)) ** 0.5, quant.MIN_ALPHA), dtype=torch.float32)
            for k, (s, c) in sums.items()}


def _make_trainable(gm: torch.fx.GraphModule, cfg: QATConfig, spec: MethodSpec, calib_x: torch.Tensor) -> None:
    """Replace every calibrated FakeQuantize of ``gm`` by its trainable counterpart (module docstring)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)) is FakeQuantize]
    act_sigma = {}
    if spec.sdq:
        sdq_acts = [n for n in nodes if gm.get_submodule(n.target).role != "weight"
                    and _learns(gm.get_submodule(n.target), cfg)]
        act_sigma = _activation_sigmas(gm, sdq_acts, calib_x)
    for node in nodes:
        fq = gm.get_submodule(node.target)
        common = dict(scheme=fq.scheme, bits=fq.bits, signed=fq.signed, axis=fq.axis, role=fq.role,
                      zero_point=fq.zero_point.clone())
        learn = _learns(fq, cfg) and spec.learn_alpha
        if not learn:
            new = LearnableFakeQuantize(**common, init_alpha=fq.alpha, grad="ste", learn_alpha=False,
                                        observer=fq.observer_name)
        elif fq.role == "weight":
            w = _attr(gm, node.args[0].target).detach()
            _, sigma = channel_stats(w, fq.axis)
            if spec.sdq:
                _, sigma = channel_stats(w, fq.axis, centred=False)  # as SDQFakeQuantize.batch_sigma
                init = _pooled_mse_alpha(w / sigma, fq.levelset)
                new = SDQFakeQuantize(**common, init_alpha=_per_channel(init, w, fq.axis, cfg.shared_alpha),
                                      sigma=SDQFakeQuantize.batch_sigma(w, "weight", fq.axis),
                                      grad_scale=cfg.grad_scale, momentum=cfg.momentum)
            elif cfg.weight_norm:
                # a depthwise filter (one input channel per group, ~9 weights) is mostly its mean (median |mu|/sigma
                # 2 in a depthwise-separable digits CNN): removing it turned blurs into edge detectors, and APoT QAT
                # started at 11 % and ended at 25 % there (99.4 % float); such layers are normalised by scale only
                # (one weight per channel, nn.Linear(1, d): centred it is 0, and the layer computed its bias only)
                center = cfg.wn_center and not (w.dim() >= 3 and w.shape[1] == 1) and \
                    (fq.axis is None or w.numel() > w.shape[fq.axis])
                centred = w - w.mean(dim=_dims(w, fq.axis), keepdim=True) if center else w
                if not center:  # scale only: the spread about 0, as LearnableFakeQuantize.effective takes it
                    _, sigma = channel_stats(w, fq.axis, centred=False)
                init = _pooled_mse_alpha(centred / sigma, fq.levelset)
                new = LearnableFakeQuantize(**common, init_alpha=_per_channel(init, w, fq.axis, cfg.shared_alpha),
                                            grad=cfg.grad, weight_norm=True, center=center)
            else:  # raw clip values, one per channel: σ_c times the pooled optimum of w / σ_c
                init = _pooled_mse_alpha(w / sigma, fq.levelset) * sigma.reshape(-1 if fq.axis is not None else ())
                new = LearnableFakeQuantize(**common, init_alpha=init, grad=cfg.grad)
        elif spec.sdq:
            sigma = act_sigma[node.target]
            new = SDQFakeQuantize(**common, init_alpha=fq.alpha / sigma, sigma=sigma, grad_scale=cfg.grad_scale,
                                  momentum=cfg.momentum)
        else:
            new = LearnableFakeQuantize(**common, init_alpha=fq.alpha, grad=cfg.grad)
        new.level_offset = fq.level_offset  # asymmetric APoT/PoT levels chosen by calibration
        _set_submodule(gm, node.target, new)
    # one forward in eval mode gives every quantizer its effective alpha (FakeQuantize.alpha)
    gm.eval()
    with torch.no_grad():
        gm(*_rows(calib_x, 0, 1))


def _length(data) -> int:
    return (data[0] if isinstance(data, tuple) else data).shape[0]


def _rows(data, start: int, stop: int) -> tuple:
    """Rows ``start:stop`` of the calibration data as the model's positional inputs (one tensor, or a tuple)."""
    return tuple(t[start:stop] for t in data) if isinstance(data, tuple) else (data[start:stop],)


_LAYER_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.linear, F.conv_transpose1d, F.conv_transpose2d,
                    F.conv_transpose3d)
BIAS_QUANTIZER = "bias_fq"  # child name of a layer's BiasQuantize


def _quantizer(gm, node) -> Optional[FakeQuantize]:
    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, FakeQuantize):
            return mod
    return None


def _insert_bias_quantizers(gm: torch.fx.GraphModule) -> None:
    """``F.conv2d(xq, wq, b)`` → ``F.conv2d(xq, wq, layer.bias_fq(b))`` for every quantized layer with a bias
    parameter (the layers ``QuantizeBias`` rounds at compile time)."""
    from qcompile.passes.base import input_quantizer  # the input's quantizer, also through a conv's F.pad

    layers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _LAYER_FUNCTIONS
              and len(n.args) > 2 and isinstance(n.args[2], torch.fx.Node) and n.args[2].op == "get_attr"
              and input_quantizer(gm, n.args[0]) is not None and _quantizer(gm, n.args[1]) is not None]
    for node in layers:
        bias = node.args[2]
        owner_name = str(bias.target).rpartition(".")[0]
        owner = gm.get_submodule(owner_name) if owner_name else gm
        wfq = _quantizer(gm, node.args[1])
        if wfq.alpha.numel() not in (1, _attr(gm, str(bias.target)).numel()):
            continue  # a grouped transposed conv: QuantizeBias and onnxruntime leave its bias float too
        owner.add_module(BIAS_QUANTIZER, BiasQuantize(input_quantizer(gm, node.args[0]), wfq))
        target = f"{owner_name}.{BIAS_QUANTIZER}" if owner_name else BIAS_QUANTIZER
        with gm.graph.inserting_before(node):
            bq = gm.graph.call_module(target, (bias,))
        node.args = node.args[:2] + (bq,) + node.args[3:]


def _dims(w: torch.Tensor, axis):
    return [d for d in range(w.dim()) if axis is None or d != axis % w.dim()]


def _per_channel(alpha: torch.Tensor, w: torch.Tensor, axis, shared: bool) -> torch.Tensor:
    if shared or axis is None:
        return alpha.reshape(())
    return alpha.reshape(()).expand(w.shape[axis]).clone()


def _require_prepared(model: nn.Module, what: str) -> None:
    """A model with no trainable quantizer (the float model, a converted one) trains nothing that export reads:
    an optimizer built from the float model's parameters left the prepared model untouched, without a word."""
    from .modules import learnable_quantizers

    if not learnable_quantizers(model):
        raise UserError(f"{what} takes the model that qcompile.qat.prepare returned (this one has no trainable "
                        "quantizers: the float model, or a converted one); build the optimizer from gm = "
                        "qat.prepare(model, ...)")


def param_groups(model: nn.Module, lr_alpha: Optional[float] = None, wd_alpha: float = 0.0,
                 weight_decay: Optional[float] = None) -> list[dict]:
    """Two optimizer parameter groups: ``[weights and biases, learned clipping values]``.

    The clipping values get their own learning rate ``lr_alpha`` (default: the optimizer's) and weight decay
    ``wd_alpha`` -- PACT's L2 regulariser on α, SDQ's ``lambda * alpha`` term of eq. 8. ``weight_decay`` sets the
    first group's decay (default: the optimizer's). Frozen α (fixed quantizers, SDQ phase two) are left out.
    """
    from .modules import learnable_quantizers

    _require_prepared(model, "param_groups")
    import numbers

    for name, value in (("lr_alpha", lr_alpha), ("wd_alpha", wd_alpha), ("weight_decay", weight_decay)):
        # a string or a negative rate was handed to the optimizer, which failed at its first step (a TypeError
        # from torch.optim, "can't multiply sequence by non-int of type 'str'") or trained the wrong way
        if value is None and name != "wd_alpha":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
            raise UserError(f"param_groups: {name} must be a number >= 0, got {value!r}")
    alphas = [m.learned_alpha for m in learnable_quantizers(model) if m.learned_alpha.requires_grad]
    ids = {id(p) for p in alphas} | {id(m.learned_alpha) for m in learnable_quantizers(model)}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    first: dict = {"params": weights}
    if weight_decay is not None:
        first["weight_decay"] = weight_decay
    second: dict = {"params": alphas, "weight_decay": wd_alpha}
    if lr_alpha is not None:
        second["lr"] = lr_alpha
    return [first, second]
