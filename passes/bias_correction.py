"""BiasCorrection: absorb the mean output error that weight quantization causes into the bias (Nagel et al. 2019).

With ε = Q(W) − W, a quantized layer computes y_q = Q(W)·x + b = y + ε·x, so E[y_q − y] = ε·E[x] per output
channel (the lecture's "Quantization Bias Correction"). Subtracting it from the bias removes the bias of the
error:  b' = b − ε·E[x].

- empirical (calibration data given), in two steps:
  1. ε·E[x], with E[x] the per-input-channel mean of the layer's input over the data (and over spatial
     positions); for a convolution ``conv(E[x] broadcast, ε)`` on a constant input, which equals
     Σ_{c,k} ε_{o,c,k}·E[x_c] away from the zero-padded border. ``Calibrate`` records E[x] during its own pass
     over the data (``meta["input_mean"]``), so no pass is needed for it. Run alone, the pass measures E[x] itself.
  2. The mean shift ε·E[x] leaves out: the one that quantized inputs, and every layer before, carry into the layer
     (DFQ's empirical bias correction, applied layer by layer). ``Calibrate``, which observes the activations on the
     float model when bias correction is on, records each layer's per-channel output means there on
     ``CORRECTION_SAMPLES`` (32 for small inputs) calibration samples spread over the data
     (``meta["float_output_mean"]``); this pass runs the quantized network on the same samples in graph order and,
     at each layer, moves the bias by the difference of the two means (shrunk where the samples disagree,
     ``shrunk_shift``), so the layers after it see the corrected output. A layer whose output is not batch-first
     ((T, B, d) tokens) is left alone. Measured on held-out inputs (output SQNR vs float, 0.6.1 -> 0.7.0,
     ``benchmarks/results/vs_ort.json``): random-weight MobileNetV2 W8A8 45.6 -> 53.0 dB, APoT W4A4 21.0 -> 42.5,
     uniform W4A4 21.2 -> 40.8; ResNet-18 W8A8 31.4 -> 31.1, W4A4 +0.3 / +0.4; the trained digits CNN W8A8
     41.6 -> 42.5, APoT W4A4 22.0 -> 22.3, uniform W4A4 22.7 -> 23.5. Cost: one forward pass of the simulation over
     those samples (ResNet-18 at 224x224: 0.3 s; digits: 9 ms).
- analytic, data-free: E[x] from the BatchNorm that precedes the input's ReLU (FoldBatchNorm records
  ``output_stats`` = (β, |γ|)): for x = ReLU(z), z ~ N(β, γ²), E[x] = γ·φ(β/γ) + β·Φ(β/γ). Where that does not
  reach (a SiLU, a squeeze-excite gate, a concatenation) and data-free Calibrate distilled inputs from the BatchNorm
  statistics (``passes/synthetic.py``, ``gm.meta[DISTILLED]``): E[x] measured on those, step 1 only.

Before: ``F.conv2d(xq, weight_fq(W), b)``;  After: the same graph, ``b`` replaced by ``b − ε·E[x]``
(a zero bias is created when the layer had none). Layers whose E[x] cannot be known are left alone (reported).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from qcompile.qmodules import FakeQuantize

from .base import (Pass, PassResult, add_functional_bias, attr_value, calibration_inputs, data_batches, private_bias,
                   remember_float)
from .synthetic import DISTILLED

_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def _relu_expectation(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    std = std.clamp_min(1e-12)
    t = mean / std
    pdf = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    return std * pdf + mean * cdf


def _channel_means(x: torch.Tensor, channel: int) -> torch.Tensor:
    """Per-channel mean of ``x`` (float64): float32 sums over the contiguous dims after ``channel`` (relative
    error ~1e-7, rounding noise for a bias), then float64 over the dims before it. Much faster than a float64
    copy of ``x``, which dominated the pass on large activations."""
    x = x.float()
    n_channels = x.shape[channel]
    per_channel = x.numel() // n_channels
    if channel < x.dim() - 1:
        x = x.flatten(channel + 1).sum(dim=-1)  # (..., C)
    return x.reshape(-1, n_channels).double().sum(dim=0) / per_channel


def correctable_layers(gm) -> list:
    """Conv/Linear nodes with a weight quantizer whose bias has not been corrected yet."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or (node.target not in _CONV and node.target is not F.linear):
            continue
        wq = node.args[1]
        if not (isinstance(wq, torch.fx.Node) and wq.op == "call_module"
                and isinstance(gm.get_submodule(wq.target), FakeQuantize)):
            continue
        if node.meta.get("bias_corrected"):
            continue
        out.append(node)
    return out


INPUT_MEAN = "input_mean"  # node.meta key: E[x] per input channel (float64), recorded over the calibration data
FLOAT_MEAN = "float_output_mean"  # node.meta key: per sample and output channel, the float model's layer output mean
CORRECTION_SAMPLES = 8  # calibration samples the float and quantized means are compared on
SMALL_CORRECTION_SAMPLES = 32  # samples of up to SMALL_SAMPLE values: their runs cost little, their means vary more
SMALL_SAMPLE = 1 << 14  # (the digits CNN at 8 samples: APoT W4A4 -0.5 dB against no matching; at 32: +0.3 dB)


CHANNELS_LAST = "qcompile_channels_last"  # gm.meta: Calibrate ran the image batches in channels-last memory order


def correction_indices(parts: tuple) -> torch.Tensor:
    """Indices of the calibration samples (``parts``: one tensor per model input, batch first) the correction compares
    on: ``CORRECTION_SAMPLES`` (``SMALL_CORRECTION_SAMPLES`` for small samples) spread evenly over the data, not
    the first ones (in class-sorted data those are one class, whose shift the correction then gave every input:
    -1.6 dB on the digits CNN at uniform W4A4)."""
    n = parts[0].shape[0]
    small = n > 0 and all(t[:1].numel() <= SMALL_SAMPLE for t in parts)
    k = min(SMALL_CORRECTION_SAMPLES if small else CORRECTION_SAMPLES, n)
    return torch.linspace(0, n - 1, k).round().long() if k > 0 else torch.zeros(0, dtype=torch.long)


def correction_batch(data, gm=None) -> tuple:
    """The calibration samples of ``correction_indices``, as one batch (image batches in channels-last memory
    order where ``Calibrate`` found that ``gm`` runs them: PyTorch's CPU convolutions are faster there)."""
    parts = data if isinstance(data, (tuple, list)) else (data,)
    idx = correction_indices(parts)
    batch = tuple(t[idx] for t in parts)
    if gm is not None and gm.meta.get(CHANNELS_LAST):
        batch = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 and t.is_floating_point()
                      else t for t in batch)
    return batch


def _output_channel(node, value: torch.Tensor) -> int:
    return value.dim() - 1 if node.target is F.linear else 1  # Linear: features last


def _sample_channel_means(value: torch.Tensor, channel: int) -> torch.Tensor:
    """(batch, channels) float64: each sample's mean of each channel (batch first). Float32 sums over the positions,
    in the activation's own memory order (relative error ~1e-7, absolute ~1e-8 on these values: rounding noise for a
    bias), then float64: a float64 reduction took ~8x as long (8 MobileNetV2 images, 96x112x112: 240 -> 28 ms)."""
    x = value.detach().float()
    dims = [d for d in range(1, x.dim()) if d != channel]
    if not dims:  # (batch, features): nothing to sum
        return x.double()
    return x.sum(dim=dims).double() / math.prod(x.shape[d] for d in dims)


class LayerMeans(torch.fx.Interpreter):
    """Run the graph on one batch, node by node; after each of ``layers``, the per-sample channel means of its
    output (``means``), and with ``correct``, whatever ``correct(node, value, channel, means)`` makes of the value
    (the nodes after it then read that)."""

    def __init__(self, gm, layers, samples: int, correct=None):
        super().__init__(gm)
        self.layers = set(layers)
        self.samples = samples  # the batch's; an output whose dimension 0 is not the batch (a (T, B, d) layout) is
        self.correct = correct  # left out: its rows are no samples, and another batch gives other rows
        self.means: dict = {}

    def run_node(self, n):
        value = super().run_node(n)
        if n in self.layers and isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2 \
                and value.shape[0] == self.samples:
            channel = _output_channel(n, value)
            self.means[n] = _sample_channel_means(value, channel)
            if self.correct is not None:
                value = self.correct(n, value, channel, self.means[n])
        return value


class weights_passing_through:
    """Context manager: every weight quantizer of ``gm`` passes its float weights through (the activations'
    quantizers are left as they are)."""

    def __init__(self, gm):
        self.mods = [m for m in gm.modules() if isinstance(m, FakeQuantize) and m.role == "weight"]

    def __enter__(self):
        self.saved = [m.enabled for m in self.mods]
        for m in self.mods:
            m.enabled = False
        return self

    def __exit__(self, *exc):
        for m, e in zip(self.mods, self.saved):
            m.enabled = e
        return False


def shrunk_shift(diff: torch.Tensor) -> torch.Tensor:
    """The mean of the paired differences ``diff`` (samples, channels), each channel's shrunk towards 0 by
    max(0, 1 - se²/mean²) (se: the standard error of that mean; James-Stein's positive part): a shift the samples
    agree on is taken (nearly) whole, one within its own noise mostly left alone (the digits model's layers, where
    the raw shifts of 8 samples cost 0.3 dB; a stricter rule, nothing below two standard errors, did worse there
    and on the test models)."""
    mean = diff.mean(dim=0)
    if diff.shape[0] < 2:
        return torch.zeros_like(mean)
    se2 = diff.var(dim=0) / diff.shape[0]
    return mean * (1.0 - se2 / (mean * mean).clamp_min(1e-300)).clamp_min(0.0)


class recording_input_means:
    """Context manager: while the model runs on data inside it, accumulate E[x] per input channel of ``layers``
    (the output of the quantizer each reads); on exit, store it as ``layer.meta["input_mean"]``."""

    def __init__(self, gm, layers):
        self.sums: dict = {}
        self.counts: dict = {}
        self.hooks = []
        self.targets: dict[str, list] = {}  # quantizer -> the layers reading it (a shared input feeds several)
        for layer in layers:
            xq = layer.args[0]
            if isinstance(xq, torch.fx.Node) and xq.op == "call_module":
                self.targets.setdefault(xq.target, []).append(layer)
        self.gm = gm

    def __enter__(self):
        for target, layer_list in self.targets.items():
            def hook(_m, _inp, out, layer_list=layer_list):
                means = {}  # channel axis -> per-channel mean of this batch (layers sharing the input share it)
                for layer in layer_list:
                    channel = out.dim() - 1 if layer.target is F.linear else 1  # Linear: features last
                    if channel not in means:
                        means[channel] = _channel_means(out.detach(), channel)
                    self.sums[layer] = self.sums.get(layer, 0) + means[channel] * out.shape[0]
                    self.counts[layer] = self.counts.get(layer, 0) + out.shape[0]
            self.hooks.append(self.gm.get_submodule(target).register_forward_hook(hook))
        return self

    def __exit__(self, exc_type, *exc):
        for h in self.hooks:
            h.remove()
        if exc_type is None:
            for layer, total in self.sums.items():
                layer.meta[INPUT_MEAN] = total / self.counts[layer]
        return False


class BiasCorrection(Pass):
    needs_quantizers = True  # before InsertQuantizers: nothing to do, and the report says so

    def __init__(self, data: Optional[torch.Tensor] = None, batch_size: int = 32):
        super().__init__()
        self.data = data
        self.batch_size = batch_size

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self.data = calibration_inputs(self.data, gm)  # any form compile(calib=...) takes
        layers = correctable_layers(gm)
        bound = [n for n in gm.graph.nodes if n.op == "call_function" and not n.meta.get("bias_corrected")
                 and getattr(n.target, "__module__", "") == "qcompile.qmodules"
                 and getattr(n.target, "__name__", "").startswith("int8_")]
        if bound:  # skipped without a word: the file then differed from what a corrected model computes
            names = ", ".join(dict.fromkeys(str(n.meta.get("layer", n.name)) for n in bound[:8]))
            self.report.append(f"{len(bound)} layer(s) ({names}) are bound to int8 kernels already and were not "
                               f"corrected (in a pipeline of your own: run BiasCorrection before BindIntegerLayers)")
        if not layers:
            if any(n.meta.get("bias_corrected") for n in gm.graph.nodes):  # a second run said nothing
                self.report.append("every quantized layer is corrected already: nothing to do")
            return PassResult(gm, False)
        means = self._input_means(gm, layers) if self.data is not None else self._analytic_means(gm, layers)
        distilled = gm.meta.pop(DISTILLED, None)  # data-free Calibrate's inputs distilled from BatchNorm statistics
        missing = [n for n in layers if n not in means]
        if self.data is None and distilled is not None and missing:
            # E[x] of the layers no BatchNorm describes, on those inputs. Only this first step: the mean matching
            # on them (their float model's layer means) measured no better on five trained digits CNNs
            self.data = distilled[0] if len(distilled) == 1 else tuple(distilled)
            try:
                means.update(self._input_means(gm, missing))
            finally:
                self.data = None
        changed = False
        labels = [node.meta.get("layer", node.name) for node in layers]
        for node, name in zip(layers, labels):
            ex = means.get(node)
            if labels.count(name) > 1:  # a module called from several places: which call
                name = f"{name} ({node.name})"
            if ex is None:
                self.report.append(f"{name}: no E[x] (needs calibration data), left alone")
                continue
            wfq = gm.get_submodule(node.args[1].target)
            w = attr_value(gm, node.args[1].args[0]).detach()
            eps = (wfq.simulate(w) - w).double()
            shift = self._shift(node, eps, ex.double())
            found = self._bias_of(gm, node, w)
            if found is None:
                continue
            holder, attr = found
            remember_float(gm, found)
            with torch.no_grad():
                getattr(holder, attr).sub_(shift.to(getattr(holder, attr).dtype))
            node.meta["bias_corrected"] = True
            self.report.append(f"{name}: |Δb| max {float(shift.detach().abs().max()):.3g}")
            changed = True
        if self.data is not None:
            recorded = [n for n in layers if FLOAT_MEAN in n.meta]
            if not recorded:  # a pipeline of one's own ran half the correction without a word (digits APoT W4A4:
                # 21.7 dB against float, 22.2 with the matching)
                self.report.append("output means not matched to the float model's (the second step): no float "
                                   "layer means recorded; Calibrate(data, record_input_means=True) records them in "
                                   "its own run (compile() does)")
            changed |= self._match_float_means(gm, recorded)
        return PassResult(gm, changed)

    def _match_float_means(self, gm, layers) -> bool:
        """Empirical bias correction of the whole quantized network (DFQ's empirical variant, layer by layer): run
        one calibration batch through it in graph order; at each layer, the difference between its per-channel
        output mean and the float model's (``FLOAT_MEAN``) leaves the bias, and the layers after it see the
        corrected output. This takes in what ε·E[x] leaves out: the mean shift the quantized activations and the
        layers before carry into the layer. MobileNetV2 W8A8: 45.6 -> 53.0 dB of output SQNR vs float."""
        biases = {}
        for node in layers:
            wq = node.args[1]
            found = self._bias_of(gm, node, attr_value(gm, wq.args[0]).detach())
            if found is not None:
                biases[node] = found
        if not biases:
            return False
        moved = {}

        def correct(node, value, channel, means):
            float_means = node.meta[FLOAT_MEAN]
            if node not in biases or means.shape != float_means.shape:
                return value
            holder, attr = biases[node]
            bias = getattr(holder, attr)
            delta = shrunk_shift(means - float_means)
            remember_float(gm, biases[node])
            with torch.no_grad():
                bias.sub_(delta.to(bias.dtype))
            moved[node] = float(delta.abs().max())
            bnode = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if isinstance(bnode, torch.fx.Node) and bnode.op == "get_attr" and attr_value(gm, bnode) is bias:
                shape = [1] * value.dim()
                shape[channel] = -1
                return value - delta.to(value.dtype).reshape(shape)  # the layer's output with the new bias
            return value  # a bias added after the layer's output quantizer: the node that adds it reads the new one

        with torch.no_grad():
            batch = correction_batch(self.data, gm)
            LayerMeans(gm, list(biases), batch[0].shape[0], correct).run(*batch)
        labels = [node.meta.get("layer", node.name) for node in moved]
        for (node, shift), label in zip(moved.items(), labels):
            if shift > 0:  # a module called from several places: which call
                label = f"{label} ({node.name})" if labels.count(label) > 1 else label
                self.report.append(f"{label}: output mean matched to the float model's, |Δb| max {shift:.3g}")
        still = sum(1 for shift in moved.values() if shift == 0)
        if still:
            self.report.append(f"{still} layer(s) left alone by the mean matching (their samples disagree about the "
                               "shift, or fewer than 2 samples)")
        return True  # biases may have been created for layers without one

    @staticmethod
    def _bias_of(gm: torch.fx.GraphModule, node, w: torch.Tensor):
        """``(module, attribute)`` of the layer's bias parameter; a layer without one gets a zero bias (``bias`` of
        the module that owns the weight, or ``<weight>_bias`` where that name is taken) wired into the call."""
        bnode = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if isinstance(bnode, torch.fx.Node):
            if bnode.op != "get_attr":
                return None  # a bias computed in forward
            if private_bias(gm, node):  # a module called from several places: each call is corrected apart
                bnode = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            path, _, attr = str(bnode.target).rpartition(".")
            return (gm.get_submodule(path) if path else gm), attr
        layer = node.meta.get("layer")
        try:
            module = gm.get_submodule(layer) if isinstance(layer, str) else None
        except AttributeError:
            module = None
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and module.bias is not None:
            # where QuantizeOutputs moved the bias behind the output quantizer; a module called from several
            # places adds that bias after each call: a correction of this call goes into a bias of its own
            calls = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("layer") == layer)
            if calls == 1:
                return module, "bias"
        return add_functional_bias(gm, node, str(node.args[1].args[0].target), w.shape[0],
                                   torch.zeros((), dtype=w.dtype, requires_grad=True))

    @staticmethod
    def _shift(node, eps: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
        if node.target is F.linear:
            return eps @ ex
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        o, cin_g = eps.shape[0], eps.shape[1]
        ex_g = ex.view(groups, cin_g)  # E[x] per input channel, grouped
        per_group_out = o // groups
        summed = eps.flatten(2).sum(-1)  # (O, Cin/groups)
        idx = torch.arange(o) // per_group_out
        return (summed * ex_g[idx]).sum(1)

    def _input_means(self, gm, layers) -> dict:
        missing = [layer for layer in layers if INPUT_MEAN not in layer.meta]
        if missing:  # not recorded by Calibrate's pass over the same data: one pass of our own
            with recording_input_means(gm, missing), torch.no_grad():
                for batch in data_batches(self.data, self.batch_size):
                    gm(*batch)
        return {layer: layer.meta[INPUT_MEAN] for layer in layers if INPUT_MEAN in layer.meta}

    def _analytic_means(self, gm, layers) -> dict:
        from .calibrate import _bn_stats_through_relu, relu_cap

        out = {}
        for node in layers:
            xq = node.args[0]
            src = xq.args[0] if xq.op == "call_module" else xq
            stats = _bn_stats_through_relu(gm, src) if isinstance(src, torch.fx.Node) else None
            if stats is not None:
                mean, std = stats[0].double(), stats[1].double()
                out[node] = _relu_expectation(mean, std)
                cap = relu_cap(gm, src)
                if cap is not None:  # E[min(relu(x), c)] = E[relu(x)] - E[relu(x - c)]: ReLU6 taken as ReLU
                    out[node] = out[node] - _relu_expectation(mean - cap, std)
        return out
