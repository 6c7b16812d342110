"""Calibrate: fix the clipping value α (and zero point) of every uncalibrated fake-quantizer.

- Weights: an observer of ``qcompile.quant`` over the weight tensor (per output channel where the quantizer is
  per-channel); by default the MSE-optimal α for the quantizer's own level set,
  α* = argmin_α ‖W − Q_α(W)‖², which works for APoT and PoT levels as well as uniform ones.
- Activations, with calibration data: every activation quantizer observes the tensors that reach it while the
  model runs on the data, then the chosen observer (``--calib-method``) gives α. The weights are quantized during
  that run, except with bias correction (``record_input_means``): then the run is the float model's, whose
  per-layer output means ``BiasCorrection`` gives the quantized network back, and its first batch also records
  those means (``meta["float_output_mean"]``, on the samples of ``correction_indices``, run as a batch of their own).
  Asymmetric uniform levels get S = (r_max − r_min)/(q_max − q_min), Z = round(q_min − r_min/S). APoT/PoT
  activations that may be negative (``search_offset``) take the symmetric signed set or an asymmetric one (the
  unsigned set shifted by an offset), whichever the observed histogram says quantizes with less squared error
  (histogram observers: mse, percentile; the others keep the symmetric set).
- Activations, data-free: values synthesised from the BatchNorm statistics FoldBatchNorm records
  (``meta["output_stats"]`` = (β, |γ|)) through ReLUs, max-pools, flattens and residual adds (``_synthesis_plan``,
  ``_draw``: ReLU(N(β_c, γ_c²)) per channel, a Laplace for a signed output, the inputs of an add drawn independently
  and summed; a quantizer read by a max-pool alone, the window maxima: ``_pool_after``), and the calibration
  method's clip of them. Past those (a SiLU, a squeeze-excite gate, a concatenation, an unfolded BatchNorm, an
  average pool, a layer without BatchNorm): the float model's values on inputs distilled from the BatchNorm
  statistics (``passes/synthetic.py``, ZeroQ). Where no BatchNorm comes before a quantizer (the model's input),
  calibration data is needed.

Before: quantizers with α unset.  After: ``set_params(α, Z)`` on each and ``node.meta["qparams"]`` = QParams.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.fx

from qcompile import quant
from qcompile.errors import UserError
from qcompile.ir import QParams
from qcompile.qmodules import FakeQuantize, QuantizedRecurrent
from qcompile.quant.observers import _batched_mse_search, _symmetric_bins_error

from . import synthetic
from .base import Pass, PassResult, attr_value, calibration_inputs, data_batches, data_length
from .bias_correction import (CHANNELS_LAST, FLOAT_MEAN, LayerMeans, correctable_layers, correction_indices,
                              recording_input_means, weights_passing_through)


def _dead_beside_bias(gm, layer: str, w: torch.Tensor, top: float) -> bool:
    """Weights so small against the layer's bias that the layer computes its bias (a channel that decayed to
    ~1e-13 in training): all-zero codes are then what it computes, to 1e-6 of the bias."""
    try:
        bias = getattr(gm.get_submodule(layer), "bias", None)
    except AttributeError:
        return False
    if not isinstance(bias, torch.Tensor) or not bias.numel():
        return False
    fan_in = w[0].numel() if w.dim() > 1 else 1
    return top * fan_in < 1e-6 * float(bias.detach().abs().max())


_MOVING_METHODS = {"transpose", "permute", "view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous",
                   "float", "t"}
_MOVING_FNS = {torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
               torch.t}


def _moves_values(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """``node`` passes its first input's values on, rearranged at most: a quantizer (not calibrated yet, it passes
    them through), a transpose, permute or reshape."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (FakeQuantize, torch.nn.Flatten, torch.nn.Identity))
    if node.op == "call_method":
        return node.target in _MOVING_METHODS
    return node.op == "call_function" and node.target in _MOVING_FNS


class Calibrate(Pass):
    """Fix α of every uncalibrated ``FakeQuantize`` from weights, calibration data or BatchNorm statistics."""

    def __init__(self, data: Optional[torch.Tensor] = None, method: str = "mse", weight_method: str = "mse",
                 batch_size: int = 32, bn_k: float = 6.0, progress: Optional[Callable[[int, int], None]] = None,
                 record_input_means: bool = False):
        super().__init__()
        # also record E[x] of every quantized layer's input during the pass (BiasCorrection reads it)
        self.record_input_means = record_input_means
        from qcompile.quant.observers import OBSERVERS

        for what, value in (("method", method), ("weight_method", weight_method)):
            if value not in OBSERVERS:  # it failed only when the pipeline ran, as a PassError of a ValueError
                raise UserError(f"Calibrate: unknown {what} {value!r}; use one of {', '.join(OBSERVERS)}")
        self.data = data
        self.method = method
        self.weight_method = weight_method
        self.batch_size = batch_size
        self.bn_k = bn_k
        self.progress = progress
        self.level_hints: list[str] = []  # activations whose APoT levels uniform ones would fit far better
        self.batchnorm_note: str | None = None  # data-free ranges read from statistics of few batches (compile's summary)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self.data = calibration_inputs(self.data, gm)  # any form compile(calib=...) takes
        todo = [n for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(n.target), FakeQuantize)
                and not gm.get_submodule(n.target).calibrated]
        recurrent = [(n, name, fq) for n in gm.graph.nodes if n.op == "call_module"
                     and isinstance(gm.get_submodule(n.target), QuantizedRecurrent)
                     for name, fq in gm.get_submodule(n.target).weight_fq.items() if not fq.calibrated]
        for node, name, fq in recurrent:  # weight-only recurrent layers: their weight matrices, per row
            w = getattr(gm.get_submodule(node.target).layer, name).detach()
            self._calibrate_weight(gm, fq, w, str(node.target))
            node.meta.setdefault("weight_qparams", {})[name] = _qparams(fq, self.weight_method)
        if not todo:
            if recurrent:
                return PassResult(gm, True)
            if any(isinstance(m, FakeQuantize) for m in gm.modules()):  # a second Calibrate: new data changes nothing
                self.report.append("every quantizer is calibrated already: nothing to do (to calibrate on other data, "
                                   "run the pipeline again from the traced model)")
            elif any(getattr(n.meta.get("qconfig"), "action", None) == "quant" for n in gm.graph.nodes):
                # SelectLayers chose layers to quantize, and nothing placed their quantizers yet
                self.report.append("no quantizers in the graph yet: InsertQuantizers places them for the layers "
                                   "SelectLayers chose; run it before Calibrate")
            elif any(n.meta.get("qconfig") is not None for n in gm.graph.nodes):
                self.report.append("no quantizers in the graph: every layer is kept float")
            else:
                self.report.append("no quantizers in the graph: nothing to calibrate (SelectLayers and "
                                   "InsertQuantizers place them)")
            return PassResult(gm, False)
        weights = [n for n in todo if gm.get_submodule(n.target).role == "weight"]
        acts = [n for n in todo if gm.get_submodule(n.target).role != "weight"]
        for node in weights:
            fq = gm.get_submodule(node.target)
            w = attr_value(gm, node.args[0]).detach()
            layer = node.target[:-len(".weight_fq")] if node.target.endswith(".weight_fq") else node.target
            self._calibrate_weight(gm, fq, w, layer)
            node.meta["qparams"] = _qparams(fq, self.weight_method)
        if acts:
            if self.data is not None:
                self._calibrate_with_data(gm, acts)
            else:
                self._calibrate_data_free(gm, acts)
            self._fit_biases(gm)
            # what changed a range or a layer's weights first (the CLI shows a pass's first lines), then the notes
            first = [line for line in self.report if any(mark in line for mark in _CHANGED_RANGE)]
            self.report = first + [line for line in self.report if line not in first]
        return PassResult(gm, True)

    def _calibrate_weight(self, gm, fq: FakeQuantize, w: torch.Tensor, layer: str) -> None:
        top = float(w.abs().max()) if w.numel() else 0.0
        if 0.0 < top < quant.MIN_ALPHA and not _dead_beside_bias(gm, layer, w, top):
            raise UserError(f"the weights of layer {layer!r} are all below {quant.MIN_ALPHA:g} in magnitude "
                            f"(largest {top:.3g}), under the smallest quantizer range: every code would be 0 "
                            f"(the file silently computing another model); rescale the layer (and the next one by "
                            f"the inverse), or keep it float (--exclude {layer}, exclude=[{layer!r}])")
        if self.weight_method == "mse" and not fq.asymmetric:
            fq.set_params(weight_mse_alpha(w, fq.levelset, fq.axis))
        else:
            obs = quant.make_observer(self.weight_method, axis=fq.axis)
            obs.update(w)
            params = obs.compute_qparams(fq.levelset)
            fq.set_params(params.alpha, params.zero_point)

    def _fit_biases(self, gm) -> None:
        """Widen ranges whose units are so small that a layer would need a bias of more than 30 bits on its
        accumulator grid S_x·S_w (``QuantizeBias``; onnxruntime converts the bias to int32 when it fuses the
        layer, and a value past int32 does not survive that). The widened units keep the largest |bias| at 2^29
        units, leaving headroom for bias correction and for the products Σ q_x·q_w; the x·w term quantized more
        coarsely is then below 2^-29·K·255·127 of that bias (K the fan-in), so the layer's output barely changes.

        A need of up to ``_INPUT_WIDENING_MAX`` (2×, one bit) widens the input range, as it always did (PoT-5
        weights, whose unit is alpha·2^-14, need ~1.4× on the digits model). Beyond that, with per-channel weights,
        what every channel needs is the input's doing (inputs of magnitude ~1e-7: a bias of 0.1 is then ~4e10
        units) and the input range grows by it; what single channels need beyond that is theirs (a pruned
        channel, a folded BatchNorm with gamma ~ 0: tiny weights and a bias), and only those channels' weight
        ranges grow. Widening the shared input range for one such channel coarsened every channel of every layer
        reading it (one pruned channel took a model from 61 to 11 dB)."""
        from .quantize_bias import accumulator_scale, quantized_layer_biases

        layers = []
        for node, xfq, wfq, bnode in quantized_layer_biases(gm):
            b = attr_value(gm, bnode).detach().double().reshape(-1)
            scale = accumulator_scale(xfq, wfq).double()
            if scale.numel() in (1, b.numel()):  # |bias| in units of 2^29 accumulator steps, per channel
                layers.append((node, xfq, wfq, b, (b.abs() / scale) / _BIAS_UNITS))

        need: dict[str, float] = {}  # input quantizer target -> factor its unit must grow by
        readers: dict[str, list[str]] = {}
        for node, xfq, wfq, b, ratio in layers:
            per_channel = wfq.alpha.numel() == b.numel() > 1
            most = float(ratio.max())
            factor = float(ratio.min()) if per_channel and most > _INPUT_WIDENING_MAX else most
            if factor > 1.0:
                target = next(t for t, m in gm.named_modules() if m is xfq)
                need[target] = max(need.get(target, 1.0), factor)
                readers.setdefault(target, []).append(str(node.meta.get("layer", node.name)))
        for target, factor in need.items():
            fq = gm.get_submodule(target)
            old = float(fq.alpha.max())
            fq.set_params(fq.alpha.detach().double() * (factor * 1.01), fq.zero_point)
            for qnode in gm.graph.nodes:  # ShareInt8Params keeps a widened range (observer "...+bias fit")
                if qnode.op == "call_module" and qnode.target == target:
                    old_qp = qnode.meta.get("qparams")
                    qnode.meta["qparams"] = _qparams(fq, f"{old_qp.observer if old_qp else 'calibrated'}+{BIAS_FIT}")
            self.report.append(f"{target}: range {old:.3g} -> {float(fq.alpha.max()):.3g}, so that the bias of "
                               f"layer(s) {', '.join(readers[target])} fits the int32 accumulator")
        widened = {id(gm.get_submodule(t)) for t in need}
        for node, xfq, wfq, b, ratio in layers:  # what single channels need beyond what their input now gives
            if wfq.alpha.numel() != b.numel() or b.numel() <= 1 or not bool((ratio > 1.0).any()):
                continue
            if id(xfq) in widened:
                ratio = (b.abs() / accumulator_scale(xfq, wfq).double()) / _BIAS_UNITS
                if not bool((ratio > 1.0).any()):
                    continue
            self._widen_weight_channels(node, wfq, ratio)

    def _widen_weight_channels(self, node: torch.fx.Node, wfq, ratio: torch.Tensor) -> None:
        """Grow the weight range of each output channel whose bias needs more than ``_BIAS_UNITS`` accumulator
        units, by that excess (×1.01). Such a channel's weights are tiny next to its bias: the x·w term it now
        quantizes more coarsely is below 2^-29·K·255·127 of the bias (K the fan-in), and an all-zero channel
        keeps its codes (0) exactly. Widening the shared input range instead coarsened every channel of every
        layer reading it: one pruned channel with a bias took a model from 61 to 11 dB."""
        grow = torch.where(ratio > 1.0, ratio * 1.01, torch.ones_like(ratio))
        alpha = wfq.alpha.detach().double()
        wfq.set_params((alpha.reshape(-1) * grow).reshape(alpha.shape), wfq.zero_point)
        wnode = node.args[1]
        old_qp = wnode.meta.get("qparams") if isinstance(wnode, torch.fx.Node) else None
        if old_qp is not None:
            wnode.meta["qparams"] = _qparams(wfq, f"{old_qp.observer}+{BIAS_FIT}")
        channels = [int(c) for c in torch.nonzero(ratio > 1.0).reshape(-1)]
        shown = ", ".join(map(str, channels[:8])) + (", ..." if len(channels) > 8 else "")
        self.report.append(f"{node.meta.get('layer', node.name)}: weight range of channel(s) {shown} widened "
                           f"(up to {float(grow.max()):.3g}x), so that their bias fits the int32 accumulator")

    def _calibrate_with_data(self, gm, acts) -> None:
        layout = _channels_last if _runs_channels_last(gm, next(data_batches(self.data, self.batch_size))) \
            else (lambda t: t)
        try:
            observers = self._observe(gm, acts, layout)
        except RuntimeError:
            if layout is not _channels_last or \
                    not any(_channels_last(t) is not t for t in next(data_batches(self.data, self.batch_size))):
                raise  # the batches were not converted: the model's own error
            # Model code that needs NCHW-contiguous activations fails on channels-last batches: observe again, from
            # scratch, in the layout the model was written for.
            observers = self._observe(gm, acts, lambda t: t)
        shifted = 0
        tiny = []  # (node, largest magnitude, method): values under the smallest range the observers give
        todo = []  # (node, key, observer, method): quantizers whose parameters come from their observer
        for node in acts:
            fq = gm.get_submodule(node.target)
            obs, method = observers[node]
            if _saw_only_zeros(obs):
                # Nothing to fit (a ReLU that no calibration input switched on, a branch the data never reaches): the
                # observers' range would be ~0, and a layer reading these codes would need a bias of more than 32
                # bits on its accumulator grid S_x·S_w. The unit range [0, 1] (symmetric sets: [-1, 1]) instead,
                # as onnxruntime's quantizer takes scale 1 for an empty range: zeros stay exact.
                params = quant.clip_params_from_range(torch.zeros((), dtype=torch.float64),
                                                      torch.ones((), dtype=torch.float64), fq.levelset)
                fq.set_params(params.alpha, params.zero_point)
                node.meta["qparams"] = _qparams(fq, "zero data: unit range")
                self.report.append(f"{node.target}: every calibration value was 0; unit range")
                continue
            top = max(abs(float(obs.min_val.min())), abs(float(obs.max_val.max())))
            if 0.0 < top < quant.MIN_ALPHA:  # under the observers' floor: every code would be 0
                tiny.append((node, top, method))
                continue
            if fq.scheme == "binary" and (float(obs.min_val.min()) >= 0.0 or float(obs.max_val.max()) <= 0.0):
                # binary levels are ±α decided at 0: values of one sign all get the same code (0 included), so the
                # layer reading them sees a constant (a digits MLP fell to chance, with no word of why)
                raise UserError(f"the input of {_consumer_names(node)} is never "
                                f"{'negative' if float(obs.min_val.min()) >= 0.0 else 'positive'} on the calibration "
                                "data, and binary levels (±alpha, decided at 0) give every such value the same code; "
                                "quantize it with --ascheme uniform/apot/ternary (a config rule for that layer), or "
                                "center the input")
            if fq.search_offset:
                fq.level_offset = least_error_offset(obs, fq)
                shifted += fq.level_offset > 0
            todo.append((node, None if fq.search_offset else _state_key(obs, fq.levelset), obs, method))
        if tiny:
            self._tiny_ranges(gm, tiny)
        # one search per distinct observer state (a flatten's quantizer sees its input's values), all at once
        jobs, job_index, by_key = [], [], {}
        for node, key, obs, _method in todo:
            if key is not None and key in by_key:
                job_index.append(by_key[key])
                continue
            if key is not None:
                by_key[key] = len(jobs)
            job_index.append(len(jobs))
            jobs.append((obs, gm.get_submodule(node.target).levelset))
        solved = quant.compute_qparams_many(jobs)
        widened = []
        for (node, _key, obs, method), j in zip(todo, job_index):
            fq = gm.get_submodule(node.target)
            params = solved[j]
            fq.set_params(params.alpha, params.zero_point)
            if tail_headroom(fq, obs):
                widened.append(node.target)
            node.meta["qparams"] = _qparams(fq, method)
        if widened:
            self.report.append(f"{len(widened)} activation range(s) widened past the calibration extremes for values "
                               f"the data has too few samples to show (tail headroom): {', '.join(widened[:4])}"
                               f"{' ...' if len(widened) > 4 else ''}")
        if shifted:
            self.report.append(f"{shifted} activation quantizer(s) on asymmetric (offset) levels")
        self.level_hints = []
        for node, _key, obs, _method in todo:
            worse = uniform_fits_better(gm.get_submodule(node.target), obs)
            if worse is not None:
                hint = (f"{_quantizer_place(node)}: its {gm.get_submodule(node.target).scheme} levels fit the calibration "
                        f"values {worse:.1f} dB worse than uniform levels of the same bits would")
                self.report.append(hint)
                if worse >= UNIFORM_WARN_DB:
                    self.level_hints.append(hint)

    def _tiny_ranges(self, gm, tiny) -> None:
        """Quantizers whose values span far less than the smallest range the observers give (``MIN_ALPHA``, every
        code would be 0): activations that vanish in an untrained network (torchvision's MobileNetV3-Large,
        EfficientNet-B0 and GoogLeNet with their initial weights and BatchNorm statistics: ±3e-10 from a
        squeeze-excite input on, down to the logits) or inputs in tiny units (features in farads). Their observers
        see the float model's values again, times a power of two that brings them to ~1 (exact), and the range
        they choose is scaled back: the scheme's own calibration at their own scale. The layers reading them keep
        their accumulator scale ``S_x·S_w`` in float32's normal range down to ``TINY_FLOOR``; below it the compile
        stops."""
        from qcompile.qmodules import disabled_quantizers

        node, least, _ = min(tiny, key=lambda t: t[1])
        if least < TINY_FLOOR:
            raise UserError(f"the input of {_consumer_names(node)} spans only ±{least:.3g} on the calibration data, "
                            f"under the smallest range a file can hold ({TINY_FLOOR:g}): give inputs in ordinary "
                            "units (standardized features), or rescale the layers that make these values")
        observers = {}
        for node, top, method in tiny:
            fq = gm.get_submodule(node.target)
            scale = 2.0 ** round(-math.log2(top))
            obs = quant.make_observer(method)
            observers[node] = (obs, scale)
            fq.start_observing(_Scaled(obs, scale))
        try:
            with torch.no_grad(), disabled_quantizers(gm):
                for batch in data_batches(self.data, self.batch_size):
                    if batch[0].shape[0]:
                        gm(*batch)
        finally:
            for node, _, _ in tiny:
                gm.get_submodule(node.target).stop_observing()
        solved = quant.compute_qparams_many([(obs, gm.get_submodule(n.target).levelset)
                                             for n, (obs, _) in observers.items()])
        for (node, _, method), params in zip(tiny, solved):
            fq, scale = gm.get_submodule(node.target), observers[node][1]
            fq.set_params(params.alpha.double() / scale, params.zero_point)
            node.meta["qparams"] = _qparams(fq, f"{method} (tiny values, scaled by 2^{round(math.log2(scale))})")
        places = "; ".join(_quantizer_place(n) for n, _, _ in tiny[:2]) + (" ..." if len(tiny) > 2 else "")
        self.report.append(f"{len(tiny)} activation range(s) under {quant.MIN_ALPHA:g} (down to ±{least:.2g}: an "
                           f"untrained network, or inputs in tiny units?), calibrated at their own scale: {places}")

    def _observe(self, gm, acts, layout) -> dict:
        """Run the data through ``gm`` (batches converted by ``layout``) with a fresh observer on every activation
        quantizer and the input-mean recorder of bias correction; the observers, by node."""
        observers = {}
        kept_mse = 0
        for node in acts:
            fq = gm.get_submodule(node.target)
            method = self.method
            if method == "sdq" and fq.bits >= 6 and str(node.target).startswith(_INT8_REQUANTIZERS):
                # SDQ's 3-sigma clip is for low-bit activations: the 8-bit requantizers of the integer region (the
                # layers' outputs, residual adds) are qcompile's, not the activations asked for, and take mse
                method = "mse"
                kept_mse += 1
            observers[node] = (quant.make_observer(method), method)
            fq.start_observing(observers[node][0])
        layers = correctable_layers(gm) if self.record_input_means else []
        recorder = recording_input_means(gm, layers)
        # With bias correction the ranges are observed on the float model, whose per-layer means the correction
        # restores (BiasCorrection), and the first batch also records those means (FLOAT_MEAN), in the same run
        float_weights = weights_passing_through(gm) if layers else contextlib.nullcontext()
        means = None
        batches = data_batches(self.data, self.batch_size)
        if layers:  # the samples bias correction compares on first, as a batch of their own; then the others
            batches = _correction_samples_first(self.data, self.batch_size)
        try:
            n, done = data_length(self.data), 0
            with torch.no_grad(), recorder, float_weights:
                for batch in batches:
                    if not batch[0].shape[0]:
                        continue
                    try:
                        if layers and means is None:
                            means = LayerMeans(gm, layers, batch[0].shape[0])
                            means.run(*(layout(t) for t in batch))
                        else:
                            gm(*(layout(t) for t in batch))
                    except ValueError as e:
                        if "got NaN or inf values" not in str(e):
                            raise
                        ninf = sum(int((t == float("-inf")).sum()) for t in batch if t.is_floating_point())
                        if ninf:
                            raise UserError(f"the calibration data holds {ninf} -inf value(s) that reach a quantizer; "
                                            "give finite inputs (--calib): -inf belongs only in a float attention "
                                            "mask") from None
                        if "(NaN)" in str(e):  # 0/0, not an overflow
                            raise UserError("the model computes NaN on the calibration data (0/0 or the like: a softmax "
                                            "over a row whose every entry is masked with -inf, as for an all-padding "
                                            "sample; a log or sqrt of a negative); keep such samples out of --calib or "
                                            "make the model handle them") from None
                        raise UserError("the model computes inf values on the calibration data (an activation past "
                                        "float32's range, ~3.4e38); give inputs in the range the model was trained on "
                                        "(--calib)") from None
                    done += batch[0].shape[0]
                    if self.progress is not None:
                        self.progress(done, n)
        finally:
            for node in acts:
                gm.get_submodule(node.target).stop_observing()
        if means is not None:  # the float model's layer output means, for BiasCorrection
            for node, m in means.means.items():
                node.meta[FLOAT_MEAN] = m
            gm.meta[CHANNELS_LAST] = layout is _channels_last  # BiasCorrection's run on them: the same layout
        if kept_mse:
            self.report.append(f"{kept_mse} 8-bit requantizer(s) of the integer region (layer outputs, residual adds) "
                               "calibrated with mse: sdq's 3-sigma clip is for the low-bit activations")
        return observers

    def _calibrate_data_free(self, gm, acts) -> None:
        initial = gm.meta.get(INITIAL_BATCHNORM_STATS)
        if initial:  # noted by compile before the passes folded them (api._note_initial_batch_statistics)
            raise UserError(f"the model's {initial} BatchNorm layer(s) hold their initial running statistics (mean 0, "
                            "variance 1: never run on data in training mode), which say nothing about its "
                            "activations, so it cannot be calibrated without data; pass calibration inputs with "
                            "--calib FILE.npy (calib= from Python), or compile the trained model")
        partial = gm.meta.get(PARTIAL_BATCHNORM_STATS)
        if partial:  # noted with the initial ones (fold_bn.note_initial_batch_statistics)
            count, total, batches, kept = partial
            note = (f"{count} of the model's {total} BatchNorm layers tracked their running statistics over few "
                    f"batches (one over {batches}: {kept:.0%} of its initial mean 0 / variance 1 remains): data-free "
                    "calibration reads the activations' ranges from them; give calibration data (--calib FILE, calib= "
                    "from Python) or the fully trained model")
            self.report.append(note)
            self.batchnorm_note = note
            import warnings

            from qcompile.errors import QuantizationWarning

            warnings.warn(note, QuantizationWarning, stacklevel=2)
        sums = {}  # the last residual sums drawn (_draw): the next block's quantizer reads them
        dropped = []
        plans = {}
        for node in acts:
            plan = _synthesis_plan(gm, node.args[0])
            window = _pool_after(gm, node)
            if plan is not None and window is not None:  # what passes the max-pool after the quantizer
                plan = ("pool", window, plan)
            plans[node] = plan
        # The values no plan describes (after a SiLU, a squeeze-excite gate, a concatenation, an unfolded BatchNorm,
        # an average pool): computed by the float model from inputs distilled to fit its BatchNorms
        # (passes/synthetic.py). The 8-bit outputs added only for the int8 kernels that no plan describes stay float,
        # as before: fitted on distilled inputs, the digits CNN's fc1 output cost it 16 dB at W8A8.
        # Where the distillation runs, the planned quantizers observe its values too and take the wider of the two
        # ranges: the plans' normal leaves miss the heavier tails of trained networks' activations (an Inception-like
        # digits CNN's plan ranges were 0.72-1.32x the data's; W8A8 33.2 -> 37.8 dB so, five such models -0.4 to
        # +4.7 dB a row). The distilled ranges alone instead: -0.3 to +1.1 dB; and where no quantizer needs the
        # distillation it does not run (the digits CNN, plans only, lost 2.1 dB at W8A8 on distilled ranges).
        distilled = {}
        needed = [n for n in acts if plans[n] is None and not getattr(gm.get_submodule(n.target), "optional", False)]
        reached = synthetic.after_points(gm, synthetic.describing_points(gm))
        for node in needed:  # what no distillation can give, refused before it runs (26 s at 224x224 for nothing)
            refusal = _data_free_refusal(gm, node, acts, reached, distilled=False)
            if refusal:
                raise UserError(refusal)
        planned = [n for n in acts if plans[n] is not None] if needed else []
        computed = synthetic.observe(gm, needed + planned, self.method, self.progress, distilled)
        hints = {n: computed.pop(n) for n in planned if n in computed}
        widened = 0
        for node in acts:
            fq = gm.get_submodule(node.target)
            plan = plans[node]
            if node in computed:
                params = quant.compute_qparams_many([(computed[node], fq.levelset)])[0]
                fq.set_params(params.alpha, params.zero_point)
                node.meta["qparams"] = _qparams(fq, f"bn-distilled({self.method})")
                continue
            if plan is None and getattr(fq, "optional", False):
                # an 8-bit output QuantizeOutputs added for int8 kernels, which nothing describes without data: the
                # layer's output stays float, as at the bit-widths where no such quantizer is added
                dropped.append(_quantizer_place(node))
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                gm.delete_submodule(node.target)
                continue
            if plan is None:  # and the distillation gave it nothing
                raise UserError(_data_free_refusal(gm, node, acts, reached, distilled=True))
            # the clip: the calibration method's own choice on what BatchNorm says the values are (each channel in
            # equal shares), synthesised through the graph (_draw). max_c(β_c + 6|γ_c|), the whole range it used to
            # take, spent 4-bit levels on values that barely occur: 2.5x the real maximum, -4 to -13 dB at 3-4 bits
            obs = quant.make_observer(self.method)
            # values per channel: _DATA_FREE_SAMPLES shared among the channels and the widest max-pool window of
            # one draw, so that no draw holds more than that (as many as before where a single BatchNorm is read)
            per_channel = max(64, _DATA_FREE_SAMPLES // (max(1, _plan_columns(plan)) * _plan_window(plan)))
            values = _draw(plan, per_channel, torch.Generator().manual_seed(0), self.bn_k, sums)
            obs.update(values.float().flatten())
            params = quant.compute_qparams_many([(obs, fq.levelset)])[0]
            if node in hints:  # the wider of the plan's range and the distilled values'
                wider = quant.compute_qparams_many([(hints[node], fq.levelset)])[0]
                if float(wider.alpha.max()) > float(params.alpha.max()):
                    params = wider
                    widened += 1
            fq.set_params(params.alpha, params.zero_point)
            node.meta["qparams"] = _qparams(fq, f"bn({self.method})")
        self.report.append(f"data-free: {len(acts) - len(dropped) - len(computed)} activation range(s) from "
                           f"BatchNorm statistics ({self.method} on values drawn from each channel's normal, through "
                           f"ReLUs, max-pools and residual adds)")
        if computed:
            start, end = distilled["loss"]
            self.report.append(f"data-free: {len(computed)} activation range(s) on inputs distilled from the "
                               f"BatchNorm statistics ({self.method} on {distilled['batch']} sample"
                               f"{'s' if distilled['batch'] != 1 else ''}; ZeroQ's "
                               f"statistics loss {start:.3g} -> {end:.3g} in {synthetic.STEPS} steps): an "
                               "approximation, pass --calib for real ranges")
            if widened:
                self.report.append(f"data-free: {widened} range(s) from BatchNorm statistics widened to what the "
                                   "distilled inputs give")
        for place in dropped:
            self.report.append(f"data-free: {place} stays float (an 8-bit output for the int8 kernels, which no "
                               "BatchNorm describes)")


def _data_free_refusal(gm, node: torch.fx.Node, acts, reached: set, distilled: bool) -> str | None:
    """Why activation quantizer ``node``, which no plan describes, cannot be calibrated without data: it reads the
    model's input, or no BatchNorm comes before it (known before any distillation runs), or (``distilled``: the
    distillation ran and gave it nothing) inputs could not be distilled. None where the distillation may give it."""
    inputs = sum(n.op == "placeholder" for n in gm.graph.nodes)
    how = "--calib FILE.npy (calib= from Python)" if inputs == 1 else \
        f"--calib FILE.npz (arrays x0 .. x{inputs - 1}, one per input), or calib= from Python"
    src = node.args[0]
    while isinstance(src, torch.fx.Node) and src.args and _moves_values(gm, src):
        src = src.args[0]  # a quantizer, or the input rearranged: (B, T, F).transpose(1, 2), a view
    if isinstance(src, torch.fx.Node) and src.op == "placeholder":
        # forward's name of that input (torch.fx renames an input called 'input' to 'input_1')
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        spelled = gm.meta.get("input_names")
        name = spelled[phs.index(src)] if isinstance(spelled, list) and len(spelled) == len(phs) else src.name
        # the first layer's input: no BatchNorm describes the data itself. Keeping the first and last layers float
        # helps only where BatchNorms describe the others: a ViT (LayerNorms, none) was sent to --keep-first-last
        # fp32, and then refused on its attention projections
        if not any(_synthesis_plan(gm, n.args[0]) is not None for n in acts if n is not node):
            return (f"cannot calibrate {_quantizer_place(node)} without data (it is the model's input {name!r}), "
                    f"nor any other activation (no BatchNorm describes them); pass calibration inputs with {how}")
        return (f"cannot calibrate {_quantizer_place(node)} without data (it is the model's input {name!r}, "
                f"which no BatchNorm describes); keep the first layer float (--keep-first-last fp32, "
                f"keep_first_last='fp32') or pass calibration inputs with {how}")
    if node.args[0] not in reached:
        why = "no BatchNorm comes before it, so no statistics describe its values"
    elif distilled:
        why = ("inputs could not be distilled from its BatchNorm statistics: a model input that is not a float "
               "tensor, or model code that fails on such inputs or under autograd")
    else:
        return None
    return f"cannot calibrate {_quantizer_place(node)} without data ({why}); pass calibration inputs with {how}"


UNIFORM_HINT_DB = 3.0  # APoT activation levels this much worse (squared error) than uniform ones: in the report
# and this much worse: a QuantizationWarning too (random-weight ResNet-18 / MobileNetV2 at 64x64 have 3 of 16 and 4 of
# 51 APoT activations at 3.2-4.9 dB, the flat wine activation 6.2 dB)
UNIFORM_WARN_DB = 6.0


TAIL_CAP = 0.25  # δ at most this fraction of the range, for up to TAIL_REF samples; for n samples TAIL_REF/n of it
TAIL_REF = 32
TAIL_SAMPLES = 16  # fewer samples than this: no fit
TAIL_K = 16  # sample extremes the exponential tail is fitted on (at most a quarter of the samples)


def _tail_excess(obs, side: int) -> float:
    """The scale β of an exponential tail fitted to the per-sample extremes of one side (``side`` +1: the
    samples' maxima, -1: their minima, as distances outward): the mean excess of the k most extreme over the
    (k+1)-th, k = min(``TAIL_K``, samples / 4). 0 where the samples agree about their extreme (a bound: images at 0
    or 1, a clamp; a squeeze-excite's pooled values, alike on every image) or there are fewer than ``TAIL_SAMPLES``
    samples."""
    values = obs.sample_max if side > 0 else obs.sample_min
    if values is None or values.numel() < TAIL_SAMPLES:
        return 0.0
    far = torch.sort(values * side, descending=True).values
    k = max(2, min(TAIL_K, far.numel() // 4))
    return float(max(0.0, float(far[:k].mean() - far[k])))


def tail_headroom(fq: FakeQuantize, obs) -> bool:
    """Widen a uniform activation range past the calibration extremes where the data is too small to show the
    tails (the default MSE observer, per-tensor ranges). The MSE objective counts the calibration values; a new
    sample passes the observed extreme x* with probability 1/(n+1) (n samples), by an excess whose scale β comes from
    the samples' own extremes (``_tail_excess``): per value, p = n/((n+1)·V) for V values. Moving the edge to x* + δ
    costs (R + δ)²/(12 L²) of rounding noise per value (range R over L steps) and saves p·2β²·e^(−δ/β): least at
    δ = β·ln(12 L² p β / (R + δ)) (solved by iteration; 0 where that is negative), and at most ``TAIL_CAP`` of the
    range (a few outliers give a large β: breast cancer's standardized features lost 3.4 dB uncapped). MLPs on wine,
    breast cancer and iris calibrated on 32 rows (9 models): +4.7 dB of output SQNR against float on held-out rows
    on average over W8A8 and APoT W4A4 (at worst −4.5 dB, iris at W8A8). Past ``TAIL_REF`` samples the cap falls as
    TAIL_REF/n (a breast cancer MLP on 256 rows lost 2.1 dB under the fixed cap, 0.6 now); 128 rows: W8A8 +3.1 dB (−0.7
    to +7.4).
    A convolution's samples agree about their extremes (random-weight MnasNet, EfficientNet-B0 on 32 images:
    within ±0.1 dB held out), values piled at a bound get β = 0, and fewer than ``TAIL_SAMPLES`` samples or
    batches of more than ``SAMPLE_EXTREMES_MAX`` values nothing. Returns whether the range moved."""
    from qcompile.quant.observers import MSEObserver

    if type(obs) is not MSEObserver or obs.hist is None or obs.axis is not None or fq.alpha.numel() != 1 or \
            fq.scheme not in ("uniform", "uniform_asym") or fq.saturation is not None or obs.sample_max is None:
        return False
    ls = fq.levelset
    unit = float(fq.alpha) / ls.denom
    zp = int(fq.zero_point)
    if fq.scheme == "uniform_asym":  # r = S(q - Z) over the code range
        lo, hi = unit * (ls.code_min - zp), unit * (ls.code_max - zp)
    else:  # symmetric signed or unsigned grid, zero point 0
        lo, hi = unit * ls.grid[0], unit * ls.grid[-1]
    steps = (hi - lo) / unit
    samples = int(obs.sample_max.numel())
    # a new sample passes the calibration extreme with probability 1/(n+1): per value, over its V/n values
    p = samples / ((samples + 1.0) * float(obs.count[0]))
    grow = 2.0 if (ls.signed and fq.scheme == "uniform") else 1.0  # a symmetric range grows on both sides
    new = {}
    for side, edge, extreme in ((1, hi, float(obs.max_val[0])), (-1, lo, float(obs.min_val[0]))):
        if side < 0 and not (ls.signed or fq.scheme == "uniform_asym"):
            continue  # unsigned levels: the range starts at 0
        if extreme * side <= 0.0 or abs(edge) < 0.9 * abs(extreme):
            continue  # nothing on this side, or a range the observer clipped on purpose (fewer bits)
        beta = _tail_excess(obs, side)
        if beta <= 0.0:
            continue
        delta = 0.0
        for _ in range(30):
            ratio = 12.0 * steps * steps * p * beta / (grow * ((hi - lo) + grow * delta))
            nxt = beta * math.log(ratio) if ratio > 1.0 else 0.0
            if abs(nxt - delta) <= 1e-6 * beta:
                delta = nxt
                break
            delta = nxt
        delta = min(delta, TAIL_CAP * min(1.0, TAIL_REF / samples) * (hi - lo))
        target = side * (abs(extreme) + delta)
        if delta > 0.0 and abs(target) > abs(edge):
            new[side] = target
    if not new:
        return False
    nlo, nhi = new.get(-1, lo), new.get(1, hi)
    params = quant.clip_params_from_range(torch.tensor(nlo, dtype=torch.float64), torch.tensor(nhi, dtype=torch.float64),
                                          ls)
    fq.set_params(params.alpha, params.zero_point)
    return True


def uniform_fits_better(fq: FakeQuantize, obs) -> float | None:
    """How many dB more squared error the calibrated APoT levels of activation quantizer ``fq`` leave on the
    histogram of ``obs`` than uniform levels of the same bits and sign (with their own least-error range), where
    that is at least ``UNIFORM_HINT_DB``; else None. APoT crowds its levels towards zero, which suits bell-shaped
    values; on values spread evenly over their range (a ReLU of raw features) uniform levels fit better: a
    raw-feature wine MLP at APoT W4A4 scored 75.9 % against uniform's 88.9 % (float 94.4 %), and nothing said why
    (the digits CNN's APoT activations stay within 3 dB). PoT and log2 levels are coarse at the top on any data
    (8.7-10.5 dB on the digits CNN at 4 bits), the price of their multiplier-free form: not flagged. Only for the
    default MSE observer on one histogram and the symmetric or unsigned sets."""
    from qcompile.quant.observers import MSEObserver, _symmetric_bins_error

    if type(obs) is not MSEObserver or obs.hist is None or obs.axis is not None or fq.scheme != "apot" or \
            fq.asymmetric or fq.levelset.offset or fq.alpha.numel() != 1:
        return None
    radius, counts = obs.radius.numpy(), obs.hist.numpy()
    ls = fq.levelset
    chosen = float(fq.alpha) * np.asarray(ls.values, dtype=np.float64)
    try:
        uniform = quant.level_set("uniform", ls.bits, signed=ls.signed)
    except ValueError:
        return None
    params = obs.compute_qparams(uniform)
    other = float(params.alpha) * np.asarray(uniform.values, dtype=np.float64)
    counts = np.ascontiguousarray(counts)
    e_chosen = float(_symmetric_bins_error(radius, counts, chosen[None, None, :])[0, 0])
    e_other = float(_symmetric_bins_error(radius, counts, other[None, None, :])[0, 0])
    if not (e_other > 0.0 and e_chosen > 0.0):
        return None
    worse = 10.0 * math.log10(e_chosen / e_other)
    return worse if worse >= UNIFORM_HINT_DB else None


_CHANGED_RANGE = ("so that", "unit range")  # report lines of ranges widened for a bias or set for zeros: first
_DATA_FREE_SAMPLES = 1 << 20  # synthetic values per data-free quantizer (shared among its channels)
BIAS_FIT = "bias fit"  # the observer suffix of a range Calibrate widened for a layer's bias
_BIAS_UNITS = float(2 ** 29)  # the largest |bias| on a layer's accumulator grid (int32 with headroom)
_INPUT_WIDENING_MAX = 2.0  # up to this, an input range grows for a bias; beyond, the channels that need it do


def _saw_only_zeros(obs) -> bool:
    """Whether a per-tensor observer saw values, all of them 0."""
    lo, hi = getattr(obs, "min_val", None), getattr(obs, "max_val", None)
    return lo is not None and hi is not None and lo.numel() == 1 and float(lo) == 0.0 and float(hi) == 0.0


MAX_OFFSETS = 16  # offsets tried per quantizer (spread geometrically where there are more)


def least_error_offset(obs, fq: FakeQuantize) -> int:
    """The level offset (0: the symmetric signed set) whose calibrated levels quantize the observed histogram with
    the least squared error; 0 where the observer keeps no histogram or does not handle offset sets."""
    if not isinstance(obs, quant.HistogramObserver) or not obs.asymmetric_levels or obs.axis is not None:
        return 0
    offsets = quant.asymmetric_offsets(fq.scheme, fq.bits)
    if len(offsets) > MAX_OFFSETS:  # those nearest a geometric sequence: the negative reach o / denom matters
        targets = np.geomspace(offsets[0], offsets[-1], MAX_OFFSETS)
        offsets = tuple(sorted({min(offsets, key=lambda o: abs(math.log(o / t))) for t in targets}))
    candidates = (0,) + tuple(offsets)
    sets = [quant.level_set(fq.scheme, fq.bits, fq.signed, offset=o) for o in candidates]
    width = max(ls.num_levels for ls in sets)
    # normalised levels, one row per candidate; shorter rows repeat their top level (an empty cell: no error term)
    base = np.stack([np.concatenate([ls.values, np.full(width - ls.num_levels, ls.values[-1])]) for ls in sets])
    if isinstance(obs, quant.MSEObserver):  # every candidate's MSE search at once, as rows of one batch
        lo, hi = float(obs.min_val[0]), float(obs.max_val[0])
        # the MSEObserver's search range: max |x| (symmetric), max(hi, lo / v0) for levels alpha * [v0, 1]
        alpha_max = np.array([max(abs(lo), abs(hi)) if ls.symmetric else max(hi, lo / ls.values[0], 0.0)
                              for ls in sets])
        rows = len(sets)
        radius = np.repeat(obs.radius.numpy()[:1], rows)
        counts = np.repeat(obs.hist.numpy()[:1], rows, axis=0)
        alpha = _batched_mse_search(radius, counts, base, alpha_max)
    else:
        radius = np.repeat(obs.radius.numpy()[:1], len(sets))
        counts = np.repeat(obs.hist.numpy()[:1], len(sets), axis=0)
        alpha = np.array([float(obs.compute_qparams(ls).alpha) for ls in sets])
    err = _symmetric_bins_error(radius, counts, (alpha[:, None] * base)[:, None, :])[:, 0]
    best = int(np.argmin(err))  # first minimum: ties keep the symmetric set (or the smaller offset)
    return candidates[best]


def _runs_channels_last(gm: torch.fx.GraphModule, batch) -> bool:
    """Whether the graph runs on one channels-last sample of ``batch`` (quantizers passing values through). Model
    code that needs NCHW-contiguous activations (``x.view(x.size(0), -1)`` after a conv: the tutorial LeNet) fails
    there; found on the whole calibration run, that cost a second run, and torch.fx printed the model's traceback on
    a compile that then succeeded. Its printout of this probe's failure is kept off stderr."""
    import contextlib
    import io

    from qcompile.qmodules import disabled_quantizers

    sample = [t[:1] for t in batch]
    if not any(_channels_last(t) is not t for t in sample):
        return False  # nothing to convert
    try:
        with torch.no_grad(), disabled_quantizers(gm), contextlib.redirect_stderr(io.StringIO()):
            gm(*(_channels_last(t) for t in sample))
    except Exception:  # noqa: BLE001 -- any failure of the probe (one sample: a model that needs a larger batch
        return False  # too) leaves the layout the model was written for; the calibration run reports real errors
    return True


def _correction_samples_first(data, batch_size: int):
    """The batches of ``data`` with the samples of ``correction_indices`` first, as a batch of their own, then the
    others in batches of up to ``batch_size`` (views where a batch holds none of them: no copy of the data)."""
    parts = data if isinstance(data, (tuple, list)) else (data,)
    n = parts[0].shape[0]
    idx = correction_indices(parts)
    others = torch.ones(n, dtype=torch.bool)
    others[idx] = False
    yield tuple(t[idx] for t in parts)
    for i in range(0, n, batch_size):
        keep = others[i:i + batch_size]
        if bool(keep.all()):
            yield tuple(t[i:i + batch_size] for t in parts)
        elif bool(keep.any()):
            yield tuple(t[i:i + batch_size][keep] for t in parts)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """An image batch (4-D float) in channels-last memory order for the calibration pass: PyTorch's CPU convolutions
    and pools run that layout without reordering, 1.2 -> 0.9 s (ResNet-18) and 1.2 -> 0.7 s (MobileNetV2) for 32
    images at 224x224. The values are those of the NCHW pass up to float32 rounding (another summation order)."""
    if t.dim() == 4 and t.is_floating_point():
        return t.contiguous(memory_format=torch.channels_last)
    return t


_INT8_REQUANTIZERS = ("out_fq", "res_fq")  # quantizers the integer region adds (QuantizeOutputs, QuantizeResiduals)


def weight_mse_alpha(w: torch.Tensor, levelset, axis, points: int | None = None, refine: int = 16) -> torch.Tensor:
    """α* = argmin_α ‖W − Q_α(W)‖² per channel (or per tensor), on the weights themselves, for any level set.

    All channels are searched at once: ``points`` ratios of max|w| in (0, 1] (by default more for small tensors,
    whose error curve is jagged: 32 to 512, about 2^22 quantized elements per sweep), then ``refine`` ratios between
    the neighbours of each channel's best. Exact errors (the real quantizer, not a histogram), vectorised over the
    whole tensor, so a ResNet-18 takes seconds rather than the per-channel histogram search's minutes.
    """
    w = w.float()
    # weights past ~1e15: squared errors overflow float32 (1.35e22 weights got a range of 6e-8, 0.5 dB). The search
    # is scale-free, so it runs on the weights times a power of two (exact) and the range is scaled back.
    big = float(w.abs().max()) if w.numel() else 0.0
    if math.isfinite(big) and big > 2.0 ** 50:
        unit = 2.0 ** math.floor(math.log2(big))
        return weight_mse_alpha(w / unit, levelset, axis, points, refine) * unit
    if axis is None:
        rows = w.reshape(1, -1)
    else:
        rows = w.movedim(axis, 0).reshape(w.shape[axis], -1)
    if points is None:
        points = int(min(512, max(32, 2 ** 22 // max(rows.numel(), 1))))
    top = rows.abs().amax(dim=1).clamp_min(quant.MIN_ALPHA)
    if not levelset.signed:
        top = rows.amax(dim=1).clamp_min(quant.MIN_ALPHA)

    finite = bool(torch.isfinite(rows).all())
    uniform = levelset.is_uniform and levelset.zero_point == 0 and finite
    # Uniform errors are computed a block of rows at a time, about 2^20 elements with the candidates of a sweep, so
    # that the six in-place operations on the block stay in cache: on the whole of a large tensor each one streamed
    # it through memory (VGG-11's 4096 x 25088 classifier: 10.8 s). Each row's error is its own sum, so the blocks
    # give the same numbers.
    rows_per_block = max(1, 2 ** 20 // max(rows.shape[1], 1))
    buf = torch.empty(min(rows.shape[0], rows_per_block), rows.shape[1]) if uniform else None
    # Other level sets (APoT, PoT, ...): the errors of every candidate from each row sorted once (_SortedRows), not
    # a lookup over every weight per candidate (APoT-4 weights of ConvNeXt-T: 14.7 -> 3.2 s).
    table = _SortedRows(rows, levelset) if not uniform and levelset.zero_point == 0 and finite else None

    # Small tensors: several ratios per sweep (rows repeated, about 2^20 elements), not one Python step each. 2^20,
    # not 2^22: the sweep's temporaries then stay in cache (uniform 4-bit 256x2304 weights: 41.8 -> 11.5 ms, 8-bit
    # 30.5 -> 5.7 ms; the digits model's layers unchanged; the same errors, value for value).
    per_sweep = max(1, 2 ** 20 // max(rows.numel(), 1))
    wide, bufs = {}, {}

    def errors(ratios):  # ratios: (C, K) -> (C, K) squared errors
        if table is not None:
            return table.errors((top[:, None] * ratios).clamp_min(quant.MIN_ALPHA))
        out = torch.empty_like(ratios)
        c = rows.shape[0]
        for k0 in range(0, ratios.shape[1], per_sweep):
            kc = min(per_sweep, ratios.shape[1] - k0)
            alpha = (top[:, None] * ratios[:, k0:k0 + kc]).clamp_min(quant.MIN_ALPHA)
            if uniform:  # rows broadcast against the kc ratios: no repeated copy of the weights
                block = max(1, rows_per_block // kc)
                if kc not in bufs:
                    bufs[kc] = torch.empty(min(c, block), kc, rows.shape[1]) if kc > 1 else buf.unsqueeze(1)
                for r0 in range(0, c, block):
                    r1 = min(c, r0 + block)
                    out[r0:r1, k0:k0 + kc] = _uniform_sq_error(rows[r0:r1].unsqueeze(1), alpha[r0:r1].unsqueeze(2),
                                                               levelset, bufs[kc][:r1 - r0])
                continue
            if kc not in wide:  # row r·kc + j is channel r at ratio j
                wide[kc] = rows.repeat_interleave(kc, dim=0) if kc > 1 else rows
            x = wide[kc]
            q = quant.dequantize(quant.quantize(x, alpha.reshape(-1), levelset, axis=0), alpha.reshape(-1), levelset,
                                 axis=0)
            out[:, k0:k0 + kc] = ((q - x) ** 2).sum(dim=1).reshape(c, kc)
        return out

    # Clipping at α = r·max costs at least ((1 − r)·max)² on the largest weight alone, so no r below
    # 1 − sqrt(E(1)) / max can beat r = 1: search only [r_min, 1] per channel (at 8 bits a few percent of (0, 1]; at
    # low bit-widths r_min is 0 and nothing changes), with as many points as the old spacing needs.
    at_one = errors(torch.ones(rows.shape[0], 1))[:, 0].float()
    r_min = (1.0 - at_one.clamp_min(0).sqrt() / top).clamp(0.0, 1.0)
    span = 1.0 - r_min
    n = int(min(points, max(4, math.ceil(points * float(span.max())))))
    coarse = (r_min[:, None] + span[:, None] * torch.linspace(1.0 / n, 1.0, n)[None, :]).clamp_min(1.0 / points)
    best = errors(coarse).argmin(dim=1)
    lo = torch.where(best[:, None] > 0, coarse.gather(1, (best - 1).clamp_min(0)[:, None]), r_min[:, None])
    hi = coarse.gather(1, (best + 1).clamp_max(n - 1)[:, None])
    fine = lo + (hi - lo) * torch.linspace(0.0, 1.0, refine)[None, :]
    fine = torch.cat([fine, coarse.gather(1, best[:, None])], dim=1)
    choice = fine.gather(1, errors(fine).argmin(dim=1)[:, None]).squeeze(1)
    alpha = (top * choice).clamp_min(quant.MIN_ALPHA)
    return alpha.reshape(()) if axis is None else alpha


class _SortedRows:
    """``sum((Q_α(x) − x)²)`` per row for many α at once, for a level set with zero point 0 and finite rows.

    Each row is sorted once, with float64 prefix sums of ``x`` and ``x²``. For a candidate α the quantizer's own
    decision boundaries (``_strict_boundaries``: the float32 thresholds and tie rule of ``quant.quantize``) split the
    sorted row into one run per level (``searchsorted``), so every weight gets the level the real quantizer gives
    it, and the run of level ``v`` adds ``Σx² − 2vΣx + v²n``: O(levels · log n) per row and candidate instead of
    O(n). The sums are float64 (the direct path sums float32 squares), so near-equal candidates may rank apart
    by round-off. Rows are processed in blocks of about 2^22 weights, kept sorted when the whole tensor is small
    enough (2^24 weights) and sorted again per call otherwise."""

    BLOCK = 1 << 22
    KEEP = 1 << 24
    # Beyond KEEP the prefix sums (two float64 copies) are computed again per call, but the sorted rows (one float32
    # copy) are kept up to KEEP_SORTED weights: sorting was 18 of the 24 s VGG-11's APoT calibration took, its
    # 4096 x 25088 classifier sorted again for each of the search's three calls; cumsums are a fraction of that.
    KEEP_SORTED = 1 << 28

    def __init__(self, rows: torch.Tensor, levelset):
        self.rows = rows
        self.levelset = levelset
        self.grid = torch.tensor(levelset.grid, dtype=torch.float32)
        step = max(1, self.BLOCK // max(rows.shape[1], 1))
        self.blocks = [(r, min(r + step, rows.shape[0])) for r in range(0, rows.shape[0], step)]
        self.sorted = {}
        if self.KEEP < rows.numel() <= self.KEEP_SORTED:
            self.sorted = {r0: rows[r0:r1].sort(dim=1).values for r0, r1 in self.blocks}
        self.kept = [self._table(r0, r1) for r0, r1 in self.blocks] if rows.numel() <= self.KEEP else None

    def _table(self, r0: int, r1: int):
        s = self.sorted[r0] if r0 in self.sorted else self.rows[r0:r1].sort(dim=1).values
        zero = torch.zeros(s.shape[0], 1, dtype=torch.float64)
        s64 = s.double()
        return s, torch.cat([zero, s64.cumsum(1)], 1), torch.cat([zero, (s64 * s64).cumsum(1)], 1)

    def errors(self, alpha: torch.Tensor) -> torch.Tensor:
        """``alpha`` (C, K) float32 -> (C, K) float64 squared errors."""
        out = torch.empty(alpha.shape, dtype=torch.float64)
        levels = self.grid.numel()
        for b, (r0, r1) in enumerate(self.blocks):
            s, p1, p2 = self.kept[b] if self.kept is not None else self._table(r0, r1)
            n = s.shape[1]
            # candidates in groups of about BLOCK (row, candidate, level) entries: bounded temporaries
            step = max(1, self.BLOCK // ((r1 - r0) * levels))
            for k0 in range(0, alpha.shape[1], step):
                a = alpha[r0:r1, k0:k0 + step]
                c, k = a.shape
                unit = quant.unit_from_alpha(a, self.levelset)                    # (c, k) float32
                bounds = quant.ops._strict_boundaries(self.levelset, unit)        # (c, k, L-1)
                idx = torch.searchsorted(s, bounds.reshape(c, -1), right=True)  # elements <= each boundary
                edges = torch.cat([torch.zeros(c, k, 1, dtype=idx.dtype), idx.reshape(c, k, -1),
                                   torch.full((c, k, 1), n, dtype=idx.dtype)], 2)  # (c, k, L+1)
                flat = edges.reshape(c, -1)
                s0 = edges.diff(dim=2).double()
                s1 = p1.gather(1, flat).reshape(edges.shape).diff(dim=2)
                s2 = p2.gather(1, flat).reshape(edges.shape).diff(dim=2)
                v = (self.grid * unit[..., None]).double()                         # dequantized levels, float32
                out[r0:r1, k0:k0 + k] = (s2 - 2.0 * v * s1 + v * v * s0).sum(dim=2)
        return out


def _uniform_sq_error(rows: torch.Tensor, alpha: torch.Tensor, levelset, buf: torch.Tensor) -> torch.Tensor:
    """Per row, ``sum((dequantize(quantize(rows)) - rows)^2)`` for a uniform level set with zero point 0 and
    finite ``rows``: the float32 operations of ``quant.quantize``/``quant.dequantize`` in the same order
    (``clamp(round(x / unit)) * unit``), fused in place into ``buf``, so the errors are identical bit for bit.
    ``rows`` ``(C, 1, n)`` and ``alpha`` ``(C, K, 1)`` broadcast into ``buf`` ``(C, K, n)``; errors ``(C, K)``."""
    unit = quant.unit_from_alpha(alpha, levelset)
    torch.div(rows, unit, out=buf)
    buf.round_().clamp_(levelset.code_min, levelset.code_max).mul_(unit).sub_(rows)
    return buf.mul_(buf).sum(dim=-1)


def _state_key(obs, levelset):
    """A key equal for two histogram observers of one kind that saw the same values (same bins, same range), with
    the same (cached, so identical) level set: their parameters are the same, and the search runs once. ``None``
    for other observers (cheap to solve, or with state that is not plain tensors and numbers)."""
    if not isinstance(obs, quant.observers.HistogramObserver) or obs.hist is None:
        return None
    parts = []
    for name, value in sorted(vars(obs).items()):
        if name == "ndim" and obs.axis is None:
            continue  # the rank of what it saw: only checked against a per-channel axis
        if name in ("sample_min", "sample_max", "sample_extremes"):
            continue  # read per quantizer after the search (tail_headroom), not by it
        if isinstance(value, torch.Tensor):
            parts.append((name, str(value.dtype), tuple(value.shape), value.detach().cpu().numpy().tobytes()))
        elif value is None or isinstance(value, (bool, int, float, str)):
            parts.append((name, value))
        else:
            return None
    return type(obs), id(levelset), tuple(parts)


def _qparams(fq: FakeQuantize, observer: str) -> QParams:
    return QParams(scheme=fq.scheme, bits=fq.bits, signed=fq.signed, alpha=fq.alpha.clone(), axis=fq.axis,
                   zero_point=int(fq.zero_point), role=fq.role, observer=observer, level_offset=fq.level_offset)


_RELU_LIKE = {"relu", "relu6"}


def relu_cap(gm, node) -> float | None:
    """6 for a ReLU6 (``nn.ReLU6``, ``F.relu6``, ``.relu6()``), else None: the upper clip of the activation."""
    import torch.nn as nn
    import torch.nn.functional as F

    if (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU6)) or \
            (node.op == "call_function" and node.target is F.relu6) or \
            (node.op == "call_method" and node.target == "relu6"):
        return 6.0
    return None


def _max_pool_window(gm, node) -> int | None:
    """The element count of the window of a max-pool node (``nn.MaxPool2d``, ``F.max_pool2d``, without indices),
    else None (also where the kernel size is not a constant)."""
    import torch.nn as nn
    import torch.nn.functional as F

    pool = gm.get_submodule(node.target) if node.op == "call_module" else None
    if isinstance(pool, nn.MaxPool2d) and not pool.return_indices:
        k = pool.kernel_size
        return int(k * k if isinstance(k, int) else k[0] * k[1])
    if node.op == "call_function" and node.target is F.max_pool2d and not node.kwargs.get("return_indices"):
        k = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size")
        if isinstance(k, (int, tuple, list)):
            return int(k * k if isinstance(k, int) else k[0] * k[1])
    return None


def _pool_after(gm, node) -> int | None:
    """The window of the max-pool that is the one reader of quantizer ``node``'s output, else None. A monotone
    quantizer commutes with a max-pool, so only the window maxima of its codes go on: their squared error is what
    counts, and data-free, the quantizer is calibrated on draws of those maxima. On draws of every value, the values
    each window drops weighed as much as those it keeps, and the clip fell among the largest (trained digits CNNs
    at uniform W8A8, an 8-bit conv output before a 2x2 max-pool: 39.1 -> 40.8 and 42.1 -> 43.7 dB). With data the
    change measured within +-0.3 dB, and the observers see what the quantizer sees, as before.

    Not where a coarser quantizer reads the pooled values (an 8-bit conv output before the 4-bit input of the next
    layer, at W4A4): its own clip decides what is kept there, and the wider 8-bit grid of the pooled fit cost the
    digits CNN 0.5 dB at uniform W4A4 (a grid change within the coarser steps: where their thresholds fall on it)."""
    users = list(node.users)
    window = _max_pool_window(gm, users[0]) if len(users) == 1 else None
    if window is None:
        return None
    bits = gm.get_submodule(node.target).bits
    frontier = list(users[0].users)
    for _ in range(4):  # the quantizers that read the pooled values, through flattens and reshapes
        later = []
        for u in frontier:
            fq = gm.get_submodule(u.target) if u.op == "call_module" else None
            if isinstance(fq, FakeQuantize):
                if fq.bits < bits:
                    return None
            elif "layer" not in u.meta:  # not past a layer: what it reads is its own input
                later.extend(u.users)
        frontier = later
    return window


def _data_free_source(gm, node):
    """What BatchNorm statistics say about the values of ``node``: (β, γ, rectified, cap, window) for the output of
    a layer with a folded BatchNorm, through a ReLU/ReLU6 (rectified, cap 6), a max-pool (the window's element
    count) and quantizers of those values; None where the values are not that."""
    from .base import fake_quantizer

    window = 1
    while isinstance(node, torch.fx.Node):
        if fake_quantizer(gm, node) is not None and node.op == "call_module":  # a quantizer of those values
            node = node.args[0]
            continue
        k = _max_pool_window(gm, node)
        if k is not None:
            window *= k
            node = node.args[0]
            continue
        break
    if not isinstance(node, torch.fx.Node):
        return None
    stats = _bn_stats_through_relu(gm, node)
    if stats is not None:
        return stats[0], stats[1], True, relu_cap(gm, node), window
    direct = node.meta.get("output_stats")  # the layer's own output: N(β, γ²), signed
    if direct is not None and window == 1:
        return direct.mean, direct.std, False, None, 1
    return None


# Ops that only rearrange values (a per-tensor quantizer after them sees the same values): the samples pass through,
# but their columns are no longer the tensor's channels, so no residual add may pair them with others.
_RESHAPE_FNS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "reshape", "view", "contiguous", "squeeze", "unsqueeze"}


def _synthesis_plan(gm, node, memo: dict | None = None):
    """How to synthesise the values of ``node`` from BatchNorm statistics, as a tree for ``_draw``, or None:

    - ``("bn", β, γ, rectified, cap, window)``: what ``_data_free_source`` reads (a BatchNorm'd layer's output,
      through a ReLU/ReLU6, max-pools and quantizers), drawn as before;
    - ``("relu", cap, child)``, ``("pool", window, child)``: a ReLU/ReLU6 or max-pool of synthesised values
      (a residual add's output: every torchvision ResNet block ends in ``relu(add(...))``);
    - ``("add", a, b, node, depth, window)``: a residual add (``+``, ``torch.add`` without ``alpha``) of two
      synthesised tensors with the same channel count (MobileNetV2's block outputs, read by the next block's 1x1
      conv), with the add node, the plan's depth and widest leaf window (``_plan_depth``, ``_plan_window``);
    - ``("reshape", child)``: a flatten/reshape/view of them (the digits CNN's ``flatten(relu(add))`` before fc1).

    Quantizers of such values are looked through (they pass them on, up to rounding). Anything else: None.
    ``memo`` (node -> plan) makes a graph whose adds read one node twice (``relu(x) + x``) linear, not 2^depth."""
    memo = {} if memo is None else memo
    if isinstance(node, torch.fx.Node) and node in memo:
        return memo[node]
    plan = _plan_of(gm, node, memo)
    if isinstance(node, torch.fx.Node):
        memo[node] = plan
    return plan


def _plan_of(gm, node, memo: dict):
    """``_synthesis_plan`` of ``node`` itself, its inputs' through ``memo``."""
    import operator

    import torch.nn as nn
    import torch.nn.functional as F

    from .base import fake_quantizer

    found = _data_free_source(gm, node)
    if found is not None:
        return ("bn",) + tuple(found)
    if not isinstance(node, torch.fx.Node) or not node.args:
        return None
    src = node.args[0]
    if fake_quantizer(gm, node) is not None:
        return _synthesis_plan(gm, src, memo)
    if _is_relu(gm, node):
        child = _synthesis_plan(gm, src, memo)
        return None if child is None else ("relu", relu_cap(gm, node), child)
    window = _max_pool_window(gm, node)
    if window is not None:
        child = _synthesis_plan(gm, src, memo)
        return None if child is None else ("pool", window, child)
    if (node.op == "call_function" and node.target in _RESHAPE_FNS) or \
            (node.op == "call_method" and node.target in _RESHAPE_METHODS) or \
            (node.op == "call_function" and node.target is F.dropout and  # F.dropout(x, p, training=False)
             node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True) is False) or \
            (node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Flatten, nn.Dropout,
                                                                                       nn.Identity))):
        child = _synthesis_plan(gm, src, memo)
        return None if child is None else ("reshape", child)
    is_add = (node.op == "call_function" and node.target in (operator.add, torch.add)) or \
             (node.op == "call_method" and node.target == "add")
    if is_add and len(node.args) == 2 and not node.kwargs and all(isinstance(a, torch.fx.Node) for a in node.args):
        a, b = (_synthesis_plan(gm, arg, memo) for arg in node.args)
        if a is None or b is None or _plan_channels(a) is None or _plan_channels(a) != _plan_channels(b):
            return None
        return ("add", a, b, node, 1 + max(_plan_depth(a), _plan_depth(b)), max(_plan_window(a), _plan_window(b)))
    return None


def _plan_columns(plan) -> int:
    """The columns of ``_draw``'s result: the channel count of the BatchNorm'd layers it is drawn from."""
    return int(plan[1].numel()) if plan[0] == "bn" else _plan_columns(plan[1] if plan[0] == "add" else plan[-1])


def _plan_channels(plan) -> int | None:
    """The channel count of synthesised values; None after a reshape (its columns are no longer channels)."""
    if plan[0] == "reshape":
        return None
    return _plan_columns(plan) if plan[0] == "bn" else _plan_channels(plan[1] if plan[0] == "add" else plan[-1])


def _plan_window(plan) -> int:
    """The largest max-pool window drawn at once by one leaf (``("bn", ...)``): its draw holds window × n × C."""
    if plan[0] == "bn":
        return int(plan[5])
    if plan[0] == "add":
        return plan[5]
    return _plan_window(plan[-1])


def _plan_depth(plan) -> int:
    if plan[0] == "bn":
        return 0
    if plan[0] == "add":
        return plan[4]
    return 1 + _plan_depth(plan[-1])


def _draw(plan, n: int, gen: torch.Generator, bn_k: float, sums: dict | None = None) -> torch.Tensor:
    """``n`` synthetic values per channel, ``(n, C)`` float64, of what ``plan`` (``_synthesis_plan``) describes.

    A leaf is drawn as the data-free ranges always were: each channel N(β, γ²) after a ReLU (within a dB of 32
    real images at 3-8 bits on trained digits CNNs), cut at the largest channel's β + 6|γ| (the range bound it used
    to be; 6 at most after ReLU6); a signed BatchNorm output (before a residual add) from a Laplace of the same
    spread instead: heavier tails than a normal's (8σ seen; ACIQ's model of pre-activations), where a normal clipped
    those at 4σ, 16 dB under real data at W8A8 on a residual digits CNN. A max-pool takes the largest of its
    window's independent draws.

    The two inputs of a residual add are drawn independently and summed. That is an assumption: the shortcut and
    the residual branch are computed from the same input and may correlate, and BatchNorm statistics say nothing
    about it. Independence gives the sum the variance γ_a² + γ_b² per channel, and its tails (relative to its
    spread, the sum of two Laplaces is lighter-tailed than either) are the clip's to judge, as for any other values.
    The signed inputs of an add stay Laplace: drawn from a normal they lost 0.8-4.5 dB on the digits CNN (W8A8 to
    APoT W3A3), although a random-weight ResNet-18 (BatchNorm statistics of randn images) reaches only ~8σ there,
    where the Laplace's 8-bit clip is ~14σ (4-5 dB under calibrating at W8A8). The deeper input is drawn first, so
    that a chain of adds holds two or three ``(n, C)`` tensors at a time, not one per block.

    ``sums`` keeps the last ``_KEPT_SUMS`` sums drawn, by add node and ``n``: the quantizer of block k of a stage
    reads the sum of block k-1's, drawn for the previous quantizer, so a stage of B blocks costs B draws, not B²/2
    (a graph whose adds read one another twice, ``relu(x) + x``, not 2^depth)."""
    kind = plan[0]
    if kind == "bn":
        beta, gamma, rectified, cap, window = plan[1:]
        shape = (window, n, beta.numel())
        if rectified:
            z = torch.randn(shape, generator=gen, dtype=torch.float64)
        else:  # Laplace(0, 1/√2): unit variance
            u = torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5
            z = -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2.0)
        values = z * gamma.abs().double() + beta.double()
        if rectified:
            values = values.clamp(min=0.0)
        if cap is not None:
            values = values.clamp(max=cap)
        values = values.amax(0)  # a max-pool's window (1: none)
        if rectified:
            hi = torch.clamp(beta + bn_k * gamma.abs(), min=0).max().double()
            if cap is not None:
                hi = hi.clamp(max=cap)
            values = torch.minimum(values, hi)
        return values
    if kind == "relu":
        values = _draw(plan[2], n, gen, bn_k, sums).clamp_(min=0.0)
        return values if plan[1] is None else values.clamp_(max=plan[1])
    if kind == "pool":  # independent draws (no kept sums: a kept sum would come back the same, a max of copies)
        values = _draw(plan[2], n, gen, bn_k)
        for _ in range(plan[1] - 1):
            values = torch.maximum(values, _draw(plan[2], n, gen, bn_k), out=values)
        return values
    if kind == "reshape":
        return _draw(plan[1], n, gen, bn_k, sums)
    key = (plan[3], n)
    if sums is not None and key in sums:
        return sums[key].clone()  # the callers work in place
    first, second = sorted(plan[1:3], key=_plan_depth, reverse=True)
    values = _draw(first, n, gen, bn_k, sums).add_(_draw(second, n, gen, bn_k, sums))
    if sums is not None:
        sums[key] = values.clone()
        while len(sums) > _KEPT_SUMS:
            del sums[next(iter(sums))]  # the oldest: dicts keep insertion order
    return values


_KEPT_SUMS = 2  # residual-add sums _draw keeps for the next quantizers (each n x C float64, at most 8 MiB)


def _quantizer_place(node) -> str:
    """'the output of layer X' for a quantizer of a layer's output, else 'the input of layer Y'."""
    src = node.args[0] if node.args else None
    if isinstance(src, torch.fx.Node) and isinstance(src.meta.get("layer"), str):
        return f"the output of layer {src.meta['layer']!r}"
    names = _consumer_names(node)
    if names.startswith("layer ") or not isinstance(src, torch.fx.Node):
        return f"the input of {names}"
    writer, ops = src, []
    for _ in range(4):  # a layer's output through a ReLU (a float last layer reads it: no layer name after it)
        if not isinstance(writer, torch.fx.Node) or writer.op not in ("call_function", "call_method", "call_module"):
            break
        if isinstance(writer.meta.get("layer"), str):
            return f"the output of layer {writer.meta['layer']!r} after {', '.join(reversed(ops))}"
        ops.append(str(writer.target) if writer.op != "call_function" else
                   getattr(writer.target, "__name__", str(writer.target)))
        writer = writer.args[0] if writer.args else None
    if src.op != "call_module":
        return f"the input of {names}"
    return f"the output of {src.target!r}"  # an activation module whose output no layer reads directly


def _is_relu(gm, node) -> bool:
    """Whether ``node`` is a ReLU or ReLU6 (module, function or method)."""
    import torch.nn as nn
    import torch.nn.functional as F

    return (node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.ReLU, nn.ReLU6))) or \
        (node.op == "call_function" and node.target in (F.relu, torch.relu, F.relu6)) or \
        (node.op == "call_method" and node.target in _RELU_LIKE)


def _bn_stats_through_relu(gm, node):
    """(β, γ) of the BatchNorm folded into the layer that feeds ``node`` through a ReLU, else None."""
    if not _is_relu(gm, node):
        return None
    src = node.args[0]
    if not isinstance(src, torch.fx.Node):
        return None
    stats = src.meta.get("output_stats")  # ChannelStats(mean=β, std=|γ|), set by FoldBatchNorm
    if stats is None:
        return None
    return stats.mean, stats.std


# gm.meta key: the number of BatchNorm layers, where every one held its initial statistics (set by compile)
INITIAL_BATCHNORM_STATS = "qcompile.initial_batchnorm_stats"
# gm.meta key: (layers, of layers, batches and remaining share of the initial statistics of the layer with the most
# left) where some
# BatchNorm tracked its running statistics over few batches (fold_bn.note_initial_batch_statistics)
PARTIAL_BATCHNORM_STATS = "qcompile.partial_batchnorm_stats"
TINY_FLOOR = 1e-20  # the smallest activation range calibrated (at its own scale); below it the compile stops


class _Scaled:
    """An observer fed its values times ``scale`` (a power of two: exact)."""

    def __init__(self, observer, scale: float):
        self.observer, self.scale = observer, scale

    def update(self, x: torch.Tensor) -> None:
        self.observer.update(x * self.scale)


def _consumer_names(node) -> str:
    """The layers that read ``node``, looking through the nodes between (the F.pad of a reflect-padded conv)."""
    names, frontier, seen = set(), list(node.users), set()
    for _ in range(8):  # through pads, concatenations, max-pools and the 8-bit requantizers between (GoogLeNet)
        later = []
        for u in frontier:
            if u in seen:
                continue
            seen.add(u)
            if "layer" in u.meta:
                names.add(u.meta["layer"])
            else:
                later.extend(u.users)
        if not later:
            break
        frontier = later
    else:
        if not names:
            names.update(u.meta.get("layer", u.name) for u in frontier)
    return ", ".join(f"layer {n!r}" for n in sorted(map(str, names))) or repr(node.name)
