"""AllocateWeightBits: automatic mixed precision under a model-size budget (the lecture's "mixed-precision
quantization", model size constrained).

Layers are not equally sensitive to their weights' bit-width: HAQ (Wang et al., CVPR 2019) searches per-layer
bit-widths under a size, latency or energy budget. Here the budget is the parameter-weighted average weight
bit-width of the layers the default rule quantizes (``--avg-wbits``), and the search is by measured sensitivity:

1. For every such layer and every bit-width its weight scheme allows on int8 kernels (2-8 for uniform, 2-6 for
   APoT, 2-4 for PoT), the layer's weights alone are quantized as Calibrate would (per channel, the MSE range of
   that level set), and the float model runs on BiasCorrection's calibration samples (32 spread over the data; 8
   where a sample holds more than 2^14 values), its mean shift taken out as BiasCorrection will: the
   squared error of the outputs against the float model's, ``n_l(b)``, is the layer's sensitivity (made
   non-increasing in ``b``).
2. The bits per layer of least summed error ``Σ n_l(b_l)`` within the budget ``Σ params_l × b_l``, exactly
   (dynamic programming over the budget). Errors of different layers are taken to add up, as independent noise
   does: on the digits CNN the sum of its layers' errors alone at 4 bits predicts 27.1 dB, and the file gives 27.4.

Layers set by a rule (first/last layer kept 8-bit, ``--exclude``, ``--config``) keep their bit-width and stay out of
the average; so do weight-only layers (recurrent, embedding tables) and binary/ternary weights. The activations keep
their bit-width. The layer table shows the chosen bits (reason ``mixed precision``); the file records
``avg_wbits``, and ``qcompile validate`` decides the same bits from the same calibration data.

Runs after SelectLayers and before InsertQuantizers, on the float graph.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx

from qcompile import quant
from qcompile.errors import UserError
from qcompile.ir import FIXED_BITS

from .base import Pass, PassResult, calibration_inputs

REASON = "mixed precision"


def candidate_bits(scheme: str) -> list[int]:
    """The weight bit-widths of ``scheme`` whose integer grid fits int8 (the file runs them on int8 kernels)."""
    out = []
    for bits in range(2, 9):
        try:
            ls = quant.level_set(scheme, bits, signed=True)
        except ValueError:
            continue
        if max(abs(g) for g in ls.grid) <= 127:
            out.append(bits)
    return out


def _weight(gm, node):
    """The float weight tensor of a Conv/Linear layer node (module or functional form), or None."""
    from .insert_quant import functional_weight, quantizable_module, weight_axis

    mod = quantizable_module(gm, node)
    if mod is not None:
        return mod, "weight", weight_axis(mod)
    wnode = functional_weight(gm, node)
    if wnode is None:
        return None
    path, _, attr = str(wnode.target).rpartition(".")
    return (gm.get_submodule(path) if path else gm), attr, 0


def _outputs(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach().float()] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _outputs(v)]
    return []


RESOLUTION = 4096  # steps the budget is divided into for the first allocation
FRONTIER_MAX = 1 << 16  # (cost, error) pairs the branch and bound keeps per layer before it gives up


def allocate(sensitivity: dict, params: dict, budget: float) -> dict:
    """Bits per layer minimising the summed output error ``Σ sensitivity[l][bits]`` with ``Σ params[l] × bits`` at
    most ``budget``: the multiple-choice knapsack, solved exactly. First by dynamic programming over the budget in
    ``RESOLUTION`` steps (costs rounded down there; of the solutions the steps keep, the least error whose exact
    cost fits is taken), which can miss an optimum that fills the budget to within one step (0.02 %: 7 of 3000
    random instances, at worst 2.9x its error); then, branch and bound on the Pareto frontier of (cost, error)
    pairs, layer by layer, which proves that answer optimal or finds a better one: each layer's options added to
    every pair of the layers before it, and a pair dropped where another beats it on both cost and error, where the
    fewest bits of the layers after it would break the budget, or where their least errors would take it past the
    first answer. Where that frontier would still pass ``FRONTIER_MAX`` pairs, the first answer stands. A greedy
    descent (the cheapest step down per bit saved, repeatedly) took the digits CNN's large fc1 to 3 bits for 6-bit
    convolutions, a worse choice by its own measurements than 4 bits everywhere. Where even the fewest bits exceed
    the budget, every layer gets its fewest."""
    layers = list(sensitivity)
    fewest = {layer: min(sensitivity[layer]) for layer in layers}
    if not layers or sum(params[layer] * b for layer, b in fewest.items()) >= budget:
        return fewest
    first = _allocate_steps(sensitivity, params, budget)
    bound = sum(sensitivity[layer][b] for layer, b in first.items())
    exact = _allocate_frontier(sensitivity, params, budget, bound)
    return exact if exact is not None else first


def _allocate_frontier(sensitivity: dict, params: dict, budget: float, bound: float) -> dict | None:
    """The least-error allocation of error below ``bound`` (see :func:`allocate`), or None where there is none or
    the frontier grows past ``FRONTIER_MAX``."""
    import numpy as np

    layers = list(sensitivity)
    limit = budget + 1e-6
    # what the layers after each one need at least: their fewest bits' cost, their least errors
    least_cost = [float(params[layer]) * min(sensitivity[layer]) for layer in layers]
    least_err = [min(sensitivity[layer].values()) for layer in layers]
    cost_after = np.concatenate([np.cumsum(least_cost[::-1])[::-1][1:], [0.0]])
    err_after = np.concatenate([np.cumsum(least_err[::-1])[::-1][1:], [0.0]])
    cost = np.zeros(1)  # the frontier: ascending cost, strictly descending error
    err = np.zeros(1)
    steps = []  # per layer: (options, the option of each frontier pair, the pair of the layers before it)
    for i, layer in enumerate(layers):
        options = sorted(sensitivity[layer])
        n = len(cost)
        c = np.concatenate([cost + float(params[layer]) * b for b in options])
        e = np.concatenate([err + float(sensitivity[layer][b]) for b in options])
        option = np.repeat(np.arange(len(options)), n)
        parent = np.tile(np.arange(n), len(options))
        keep = (c + cost_after[i] <= limit) & (e + err_after[i] < bound)
        c, e, option, parent = c[keep], e[keep], option[keep], parent[keep]
        if not len(c):  # nothing beats the first answer
            return None
        order = np.lexsort((e, c))  # by cost, then error
        c, e, option, parent = c[order], e[order], option[order], parent[order]
        # a pair is kept where its error is below every cheaper (or equally cheap, earlier) pair's
        before = np.concatenate([[np.inf], np.minimum.accumulate(e)[:-1]])
        keep = e < before
        cost, err = c[keep], e[keep]
        steps.append((options, option[keep], parent[keep]))
        if len(cost) > FRONTIER_MAX:
            return None
    i = int(np.argmin(err))  # the last pair: the least error within the budget
    out = {}
    for layer, (options, option, parent) in zip(reversed(layers), reversed(steps)):
        out[layer] = options[int(option[i])]
        i = int(parent[i])
    return {layer: out[layer] for layer in layers}


def _allocate_steps(sensitivity: dict, params: dict, budget: float) -> dict:
    """The knapsack by dynamic programming over the budget in ``RESOLUTION`` steps (see :func:`allocate`)."""
    import numpy as np

    layers = list(sensitivity)
    fewest = {layer: min(sensitivity[layer]) for layer in layers}
    unit = budget / RESOLUTION
    size = RESOLUTION + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    choices = []
    for layer in layers:
        options = sorted(sensitivity[layer])
        new = np.full(size, np.inf)
        pick = np.full(size, -1, dtype=np.int64)
        for k, bits in enumerate(options):
            cost = int(params[layer] * bits // unit)
            if cost >= size:
                continue
            shifted = np.full(size, np.inf)
            shifted[cost:] = best[:size - cost] + sensitivity[layer][bits]
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = k
        choices.append((layer, options, pick))
        best = new

    def path(c: int) -> dict:  # backtrack: each layer's choice, and the steps before it
        out = {}
        for layer, options, pick in reversed(choices):
            bits = options[int(pick[c])]
            out[layer] = bits
            c -= int(params[layer] * bits // unit)
        return out

    for c in np.argsort(best, kind="stable"):
        if not np.isfinite(best[c]):
            break
        bits = path(int(c))
        if sum(params[layer] * b for layer, b in bits.items()) <= budget + 1e-6:
            return {layer: bits[layer] for layer in layers}
    return fewest


class AllocateWeightBits(Pass):
    def __init__(self, avg_wbits: float, data=None):
        super().__init__()
        self.avg_wbits = float(avg_wbits)
        self.data = data

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from qcompile.qmodules import FakeQuantize

        from .base import data_batches
        from .bias_correction import _sample_channel_means, correction_indices, shrunk_shift
        from .calibrate import weight_mse_alpha
        from .insert_quant import quantizable_module
        from .select import recurrent_module, weight_only_layer

        if any(isinstance(m, FakeQuantize) for m in gm.modules()):  # its bits would be decided and never used
            self.report.append("quantizers are in the graph already: nothing allocated (run AllocateWeightBits "
                               "after SelectLayers and before InsertQuantizers)")
            return PassResult(gm, False)
        self.data = calibration_inputs(self.data, gm)
        if self.data is None:
            raise UserError("--avg-wbits (avg_wbits=) chooses the layers' bit-widths by their effect on the model's "
                            "outputs: pass calibration inputs (--calib FILE, calib= from Python)")
        layers, sharing = {}, {}  # sharing: the first call of a weight -> the later calls reading the same one
        weight_only = []  # (name, weights, bits): default-rule layers left out of the average
        self.weight_only_note = None
        for node in gm.graph.nodes:
            cfg = node.meta.get("qconfig")
            if cfg is None or cfg.action != "quant" or not (cfg.reason in ("default", REASON) or
                                                           cfg.reason.startswith("default; ")) \
                    or cfg.wscheme in FIXED_BITS:
                continue
            if weight_only_layer(gm, node):
                rec = recurrent_module(gm, node)
                if rec is not None:
                    count = sum(p.numel() for name, p in rec.named_parameters() if "weight" in name)
                else:
                    found = _weight(gm, node)
                    count = getattr(found[0], found[1]).numel() if found is not None else 0
                weight_only.append((str(node.meta.get("layer", node.target)), count, cfg.wbits))
                continue
            found = _weight(gm, node)
            if found is None:
                continue
            holder, attr, axis = found
            first = next((n for n, (h, a, _) in layers.items() if getattr(h, a) is getattr(holder, attr)), None)
            if first is not None:  # a weight two calls share: decided once, by its first call, for both
                sharing.setdefault(first, []).append(node)
                continue
            layers[node] = found
        if weight_only:  # the header said "W3 (average)" and a GRU's 35k weights stayed at 4 bits, without a word
            shown = ", ".join(f"{name} ({count} weights, W{b})" for name, count, b in weight_only[:3])
            self.weight_only_note = (
                f"--avg-wbits leaves out {len(weight_only)} weight-only layer(s), which keep --wbits: {shown}"
                f"{' ...' if len(weight_only) > 3 else ''} (recurrent layers and embedding tables run on float "
                "kernels; set their bits with --config)")
            self.report.append(self.weight_only_note)
        if not layers:
            decided = any(n.meta.get("qconfig") is not None for n in gm.graph.nodes)
            self.report.append("no layer is quantized by the default rule: nothing to allocate" if decided else
                               "no layer decisions on the graph: nothing to allocate (run SelectLayers first)")
            return PassResult(gm, False)
        schemes = {node.meta["qconfig"].wscheme for node in layers}
        choices = {s: candidate_bits(s) for s in schemes}
        lowest = max(min(c) for c in choices.values())
        if self.avg_wbits < lowest:
            raise UserError(f"--avg-wbits {self.avg_wbits:g} is below the fewest bits the weight levels take "
                            f"({lowest}); give at least {lowest}")
        most = max(max(c) for c in choices.values())
        if self.avg_wbits > most:  # PoT at 5-6 bits, APoT at 7-8: no int8 grid, not a choice here
            self.report.append(f"the budget {self.avg_wbits:g} is above the most bits the "
                               f"{'/'.join(sorted(schemes))} weight levels take on int8 kernels ({most}): each "
                               f"layer gets {most}, or fewer where more bits measure no better")

        parts = self.data if isinstance(self.data, (tuple, list)) else (self.data,)
        # BiasCorrection's samples (32 small ones, 8 ImageNet-sized), on which it will match the means too
        sample = tuple(t[correction_indices(parts)] for t in parts)

        def run() -> list[torch.Tensor]:
            outs = []
            for batch in data_batches(sample, 32):
                outs.append(_outputs(gm(*batch)))
            return [torch.cat(ts) for ts in zip(*outs)]

        def channel_of(node, y) -> int:  # Linear: features last
            return y.dim() - 1 if isinstance(quantizable_module(gm, node), torch.nn.Linear) else 1

        with torch.no_grad():
            # each layer's float output means per sample: a candidate's mean shift is taken out as BiasCorrection
            # will (the same shrunk estimate), since a layer whose error is mostly a shift is less sensitive than
            # its raw error says (the digits CNN's conv2 at 4 bits: 24.3 dB alone, 28.4 dB with the shift out)
            float_means, hooks = {}, []
            for node in layers:
                mod = quantizable_module(gm, node)
                if mod is not None and node not in sharing:  # a module called twice: its calls' means differ
                    hooks.append(mod.register_forward_hook(lambda m, i, y, node=node: float_means.__setitem__(
                        node, _sample_channel_means(y, channel_of(node, y)))))
            try:
                reference = run()
            finally:
                for h in hooks:
                    h.remove()
            sensitivity, params = {}, {}
            for node, (holder, attr, axis) in layers.items():
                w = getattr(holder, attr)
                original = w.detach().clone()
                cfg = node.meta["qconfig"]
                curve = {}
                mod = quantizable_module(gm, node)

                def matched(m, i, y, node=node):
                    ref = float_means.get(node)
                    channel = channel_of(node, y)
                    means = _sample_channel_means(y, channel)
                    if ref is None or means.shape != ref.shape:
                        return y
                    shape = [1] * y.dim()
                    shape[channel] = -1
                    return y - shrunk_shift(means - ref).to(y.dtype).reshape(shape)

                hook = mod.register_forward_hook(matched) if mod is not None and node in float_means else None
                for bits in choices[cfg.wscheme]:
                    ls = quant.level_set(cfg.wscheme, bits, signed=True)
                    rows_axis = axis if cfg.per_channel else None
                    alpha = weight_mse_alpha(original, ls, rows_axis)
                    w.copy_(quant.fake_quantize(original, alpha, ls, axis=rows_axis))
                    try:
                        out = run()
                    finally:
                        w.copy_(original)
                    curve[bits] = sum(float(((o - r) ** 2).sum()) for o, r in zip(out, reference))
                if hook is not None:
                    hook.remove()
                ordered = sorted(curve)  # more bits never worse (a measured exception is noise): n(b) >= n(b + 1)
                for i in range(len(ordered) - 2, -1, -1):
                    curve[ordered[i]] = max(curve[ordered[i]], curve[ordered[i + 1]])
                sensitivity[node] = curve
                params[node] = original.numel()
        total = sum(params.values())
        bits = allocate(sensitivity, params, self.avg_wbits * total)
        changed = False
        for node, b in bits.items():
            for call in [node] + sharing.get(node, []):
                cfg = call.meta["qconfig"]
                new = dataclasses.replace(cfg, wbits=b, reason=REASON)
                if new != cfg:
                    call.meta["qconfig"] = new
                    changed = True
        avg = sum(params[node] * b for node, b in bits.items()) / total
        self.report.append(f"{len(bits)} layer(s), {total} weights: average {avg:.2f} bits (budget "
                           f"{self.avg_wbits:g})")
        ref_power = sum(float((r ** 2).sum()) for r in reference) or 1.0
        for node, b in bits.items():
            name = node.meta.get("layer", str(node.target))
            curve = sensitivity[node]
            shown = ", ".join(f"{k}b {10 * math.log10(ref_power / max(v, 1e-30)):.1f} dB"
                              for k, v in sorted(curve.items()))
            self.report.append(f"{name}: W{b} ({params[node]} weights; alone, output SQNR {shown})")
        return PassResult(gm, changed)
