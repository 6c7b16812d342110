"""EqualizeInputs: per-feature scaling of a model input, folded into the layers that read it.

The activation quantizers are per tensor (the int8 kernels take one input scale), so a model fed raw features of
very different ranges (wine: proline up to 1680 beside hue below 1.7; breast cancer: areas in the thousands beside
smoothness near 0.1) puts every small feature into one or two codes of the input quantizer. A trained MLP on raw
wine lost 35 points of accuracy at W8A8 that way (94 % -> 59 %; onnxruntime's ``quantize_static`` 70 %).

For an input ``x`` read only by Linear (or ungrouped zero-padded Conv) layers, the pass feeds them
``x' = (x - c) * s`` (per feature ``j``: the channel axis, last for Linear, 1 for Conv) and divides the weight
columns by ``s`` (a Linear's bias takes ``W c``), which computes the same function:

    W x + b = (W / s) ((x - c) s) + (b + W c)

``c_j`` is the middle of feature ``j``'s calibration range (Linear only: a conv's zero padding would stop being
zero), and ``s_j = (r_w_j / r_x_j) ** a`` with ``r_x_j`` the feature's range and ``r_w_j`` the largest weight of its
column: ``a = 0`` leaves the input alone, ``a = 1/2`` is the cross-layer equalization balance of the lecture (the
ranges of the feature and of its weight column become ``sqrt(r_x·r_w)``), ``a = 1`` moves all of the spread into the
weights. The pass predicts the output noise of each ``a`` in {0, 1/4, 1/2, 3/4, 1} from the calibration data --
the input quantizer's step over every column's weights, plus each weight row's step over the features' mean
squares -- and applies the best one only where the features' ranges are more than 100x apart, or the largest weight
column is more than 100x the median one (a standardisation folded into the first layer: rarely lit pixels' columns
1/std large), (or, before a Linear,
their offsets make the input's span 100x the largest feature's: centring alone, ``a = 0``, is then a candidate) and
it predicts at least 3 dB less noise than leaving the input alone: inputs whose features share a range (images,
standardized tables) are left as they were.

The float ``Sub``/``Mul`` runs before the input quantizer in the file (one multiply per input value). The pass
needs calibration data and leaves a graph that already has quantizers (a QAT-trained model) alone.
"""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn

from .base import Pass, PassResult, calibration_inputs, data_batches, shared_with, stock_layer

_ALPHAS = (0.25, 0.5, 0.75, 1.0)
_MIN_GAIN = 2.0  # predicted noise ratio (3 dB) below which the input is left alone
# Ranges more than 100x apart: raw measurements in different units (wine 2300x, breast cancer 2e5x). Closer ranges
# lose at most 7 of the input quantizer's bits, while scaling each feature to fill the range leaves no headroom for
# values past the calibration data: flattened digits (pixels rarely lit at the border, 16x) lost 2.5-10 dB on
# held-out images at W8A8, and raw iris (2.6x) 0.9 dB
_MIN_SPREAD = 100.0


_SAME_VALUES_METHODS = {"float", "contiguous", "view", "reshape", "flatten", "to", "type", "clone"}


def _same_values(gm, node: torch.fx.Node, shape) -> bool:
    """A node that hands its one input on unchanged, same shape and order (``x.float()``, ``x.view(B, -1)`` of a
    (B, F) input, ``nn.Flatten()`` of it, ``x.contiguous()``)."""
    meta = node.meta.get("tensor_meta")
    if not hasattr(meta, "dtype") or tuple(meta.shape) != tuple(shape) or not meta.dtype.is_floating_point:
        return False
    if node.op == "call_method":
        return node.target in _SAME_VALUES_METHODS
    if node.op == "call_function":
        return node.target in (torch.flatten, torch.reshape)
    return node.op == "call_module" and type(gm.get_submodule(node.target)) in (nn.Flatten, nn.Identity)


def _input_layers(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """``(kind, [(user node, module)])`` where every reader of ``node`` (through nodes that hand the values on
    unchanged) is a Linear (kind "linear") or every reader an ungrouped, zero-padded Conv (kind "conv") taking it
    as its only argument; None otherwise."""
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    shape = node.meta["tensor_meta"].shape
    layers, kinds = [], set()
    frontier = [(user, node) for user in node.users]
    while frontier:
        user, src = frontier.pop()
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), (nn.Linear, nn.Conv1d, nn.Conv2d,
                                                                                   nn.Conv3d)):
            if user.args != (src,) or user.kwargs:
                return None
            mod = gm.get_submodule(user.target)
            if not stock_layer(mod) or calls[user.target] != 1 or shared_with(gm, user.target):
                return None
            if isinstance(mod, nn.Linear):
                kinds.add("linear")
            elif mod.groups == 1 and mod.padding_mode == "zeros":
                kinds.add("conv")
            else:
                return None
            layers.append((user, mod))
        elif user.args and user.args[0] is src and _same_values(gm, user, shape) and len(layers) < 64:
            frontier.extend((u, user) for u in user.users)
        elif (user.op == "call_method" and user.target in ("size", "dim")) or \
                (user.op == "call_function" and user.target is getattr and user.args[1:] in (("shape",), ("ndim",))):
            continue  # reads the shape only (x.view(x.size(0), -1)), which the scaling keeps
        else:
            return None
    if len(kinds) != 1:
        return None
    return kinds.pop(), layers


def _divide_columns(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w`` ([out, features, k...]) with column ``j`` divided by ``scale[j]``; a column scaled by 0 (a feature
    the layer ignores: its weights are 0) stays 0."""
    view = scale.to(w.dtype).reshape((1, -1) + (1,) * (w.dim() - 2))
    return torch.where(view == 0, torch.zeros_like(w), w / torch.where(view == 0, torch.ones_like(view), view))


class EqualizeInputs(Pass):
    def __init__(self, data=None, weight_bits: int = 8, act_bits: int = 8, batch_size: int = 256, select=None):
        super().__init__()
        self.data = data
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.batch_size = batch_size
        self.select = select  # the SelectLayers to come: only layers it quantizes, on uniform input levels

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self.data = calibration_inputs(self.data, gm)  # any form compile(calib=...) takes
        from qcompile.qmodules import FakeQuantize

        if self.data is None:
            self.report.append("no data given: input ranges unknown, nothing equalized (EqualizeInputs(data))")
            return PassResult(gm, False)
        if any(isinstance(m, FakeQuantize) for m in gm.modules()):  # it returned without a word
            self.report.append("nothing equalized: the layers are already quantized (run EqualizeInputs before "
                               "InsertQuantizers)")
            return PassResult(gm, False)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        decision = self.select.decide(gm) if self.select is not None else None
        changed = False
        for index, node in enumerate(placeholders):
            meta = node.meta.get("tensor_meta")
            if not hasattr(meta, "dtype") or not meta.dtype.is_floating_point:  # None, or a list for *args
                continue
            found = _input_layers(gm, node)
            if found is None:
                continue
            kind, layers = found
            if decision is not None:  # a float first layer reads no input codes; uniform and APoT input levels
                # (APoT since 0.5: raw wine at W3/A8 on every layer 41 -> 70 %); a binary/ternary quantizer decides by
                # sign, which centring would move, and on PoT/log2 levels the gain was mixed (wine +22 points on one
                # model, -5 on others; breast cancer -0.6 dB on average)
                configs = [decision.get(user) for user, _ in layers]
                if any(c is None or c.action != "quant" or c.ascheme not in ("uniform", "uniform_asym", "apot")
                       for c in configs):
                    continue
            axis = -1 if kind == "linear" else 1
            stats = self._feature_stats(index, axis)
            if stats is None:
                continue
            if self._apply(gm, node, kind, layers, *stats):
                changed = True
        return PassResult(gm, changed)

    def _feature_stats(self, index: int, axis: int):
        """Per feature: min, max, mean and mean square over the calibration data (float64); None without data."""
        lo = hi = s1 = s2 = None
        count = 0
        for batch in data_batches(self.data, self.batch_size):
            if index >= len(batch) or not batch[index].is_floating_point() or batch[index].dim() < 2:
                return None
            x = batch[index].double().movedim(axis, -1)
            x = x.reshape(-1, x.shape[-1])
            b_lo, b_hi, b1, b2 = x.amin(0), x.amax(0), x.sum(0), (x * x).sum(0)
            if lo is None:
                lo, hi, s1, s2 = b_lo, b_hi, b1, b2
            else:
                lo, hi, s1, s2 = torch.minimum(lo, b_lo), torch.maximum(hi, b_hi), s1 + b1, s2 + b2
            count += x.shape[0]
        if not count or not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            return None
        return lo, hi, s1 / count, s2 / count

    def _noise(self, weights, lo, hi, mean, msq, center, scale) -> float:
        """Predicted output noise power per sample of the layers reading ``x' = (x - center) * scale``: uniform
        steps of the per-tensor input quantizer and of each per-row weight quantizer (squared step / 12)."""
        lo_s, hi_s = (lo - center) * scale, (hi - center) * scale
        span = float(torch.maximum(hi_s, lo_s).max() - torch.minimum(hi_s, lo_s).min())
        step_x = span / (2 ** self.act_bits - 1)
        msq_s = (msq - 2 * center * mean + center * center).clamp_min(0) * scale * scale  # E[x'^2] per feature
        total = 0.0
        for w in weights:  # [out, features, k...] with the features' columns divided by scale
            cols = _divide_columns(w, scale)
            total += step_x ** 2 / 12 * float((cols * cols).sum())
            k = cols[0, 0].numel()
            step_w = 2 * cols.abs().flatten(1).amax(1) / (2 ** self.weight_bits - 1)
            total += float((step_w ** 2 / 12).sum()) * k * float(msq_s.sum())
        return total

    def _apply(self, gm, node, kind, layers, lo, hi, mean, msq) -> bool:
        weights = [mod.weight.detach().double() for _, mod in layers]
        n = lo.numel()
        if any(w.shape[1] != n for w in weights):
            return False
        r_w = torch.stack([w.abs().movedim(1, 0).reshape(n, -1).amax(1) for w in weights]).amax(0)
        linear = kind == "linear"
        zero, ones = torch.zeros_like(lo), torch.ones_like(lo)
        r_x = (hi - lo) if linear else torch.maximum(hi.abs(), lo.abs())
        live = (r_x > 0) & (r_w > 0)
        if int(live.sum()) < 1:
            return False
        # a feature the layers ignore (zero weights) is multiplied by 0, and before a Linear a constant one is
        # moved to 0 (its value goes into the bias): else it alone sets the input quantizer's range
        dead = (r_w == 0) & (r_x > 0)
        constant = (r_x == 0) & (lo != 0) & linear
        # weight columns far above the typical one (a folded scaler's 1/std of rarely lit pixels, also those with
        # one value in the calibration data), against the median: columns far below it (L1 leftovers, inputs a
        # feature selection all but dropped) carry little and scaling them up cost held-out headroom (-8 dB)
        weighted = r_w > 0
        spread_w = float(r_w[weighted].max() / r_w[live].median()) if bool(live.any()) else 1.0
        alphas = _ALPHAS if float(r_x[live].max() / r_x[live].min()) >= _MIN_SPREAD or spread_w >= _MIN_SPREAD else ()
        # before a Linear, features far from 0 against their spread (a pressure of 1013 ± 0.2 hPa beside pixels
        # in [0, 1], a year, a temperature in kelvin): the per-tensor range spans the offsets, not the values,
        # whatever the features' ranges; centring alone (a = 0) gives the range back
        offset = linear and float(torch.maximum(hi.max(), zero.max()) - torch.minimum(lo.min(), zero.min())) \
            >= _MIN_SPREAD * float(r_x[live].max())
        if bool(dead.any() or constant.any()) or offset:
            alphas = (0.0,) + alphas  # those features alone
        if not alphas:
            return False
        base = self._noise(weights, lo, hi, mean, msq, zero, ones)
        best = None
        centres = ((lo + hi) / 2, zero) if linear else (zero,)  # a conv's zero padding must stay zero
        # a feature with one value in the calibration data (constant, or 0: a pixel never lit) and weights: its
        # column is brought to the largest column range of the others, which its raw scale could pass by far
        # (raw features spanning 1e6 in units: 10-20 dB lost where such columns set every weight row's range)
        flat = (r_x == 0) & (r_w > 0)
        for a in alphas:
            s = torch.where(live, (r_w / r_x.clamp_min(1e-300)) ** a, ones)
            s = s / torch.exp(torch.log(s[live]).mean())  # geometric mean 1: only the spread matters
            if bool(flat.any()):
                top = float((r_w[live] / s[live]).max())
                s = torch.where(flat, torch.clamp(r_w / top, min=1.0), s)
            s = torch.where(dead, torch.zeros_like(s), s)
            for c in centres:
                c = torch.where((live & (a > 0 or offset)) | constant, c, zero)
                noise = self._noise(weights, lo, hi, mean, msq, c, s)
                if best is None or noise < best[0]:
                    best = (noise, s, c, a)
        noise, scale, center, a = best
        if noise * _MIN_GAIN > base:
            return False
        self._rewrite(gm, node, kind, layers, scale, center)
        spread = lambda r: float(r[live].max() / r[live].min())  # noqa: E731
        centred = ", centred" if bool((center != 0).any()) else ""
        self.report.append(f"{node.name}: {n} features scaled (a={a:g}{centred}): range spread {spread(r_x):.3g}x -> "
                           f"{spread(r_x * scale):.3g}x, predicted noise {10 * math.log10(noise / base):+.1f} dB")
        return True

    @staticmethod
    def _rewrite(gm, node, kind, layers, scale, center) -> None:
        meta = node.meta["tensor_meta"]
        shape = (-1,) if kind == "linear" else (-1,) + (1,) * (len(meta.shape) - 2)
        base = f"{node.name}_equalize"
        while hasattr(gm, f"{base}_scale") or hasattr(gm, f"{base}_center"):
            base += "_"
        users = list(node.users)  # the layers, or the nodes that hand the values on to them
        first = next(n for n in gm.graph.nodes if n in set(users))
        centred = bool((center != 0).any())
        g = gm.graph
        with g.inserting_before(first):
            cur = node
            if centred:
                gm.register_buffer(f"{base}_center", center.reshape(shape).to(meta.dtype))
                cur = g.call_function(torch.sub, (cur, g.get_attr(f"{base}_center")))
                cur.meta["tensor_meta"] = meta
            gm.register_buffer(f"{base}_scale", scale.reshape(shape).to(meta.dtype))
            cur = g.call_function(torch.mul, (cur, g.get_attr(f"{base}_scale")))
            cur.meta["tensor_meta"] = meta
        for user in users:
            user.replace_input_with(node, cur)
        with torch.no_grad():
            for _, mod in layers:
                w = mod.weight
                w64 = w.double()
                if centred:  # Linear: b' = b + W c, with the weights before scaling
                    if mod.bias is None:
                        mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype), requires_grad=w.requires_grad)
                    mod.bias.copy_((mod.bias.double() + w64 @ center).to(mod.bias.dtype))
                w.copy_(_divide_columns(w64, scale).to(w.dtype))
