"""EqualizeWeights: data-free cross-layer weight equalization (Nagel et al., ICCV 2019; the lecture's
"weight equalization").

For a layer pair ``y = f(W1 x + b1)``, ``z = W2 y + b2`` with ``f`` positively homogeneous per channel
(``f(s*v) = s*f(v)`` for ``s > 0``: ReLU, LeakyReLU, PReLU, identity, max/avg pooling, flatten), scaling output
channel ``j`` of layer 1 down by ``s_j`` and input channel ``j`` of layer 2 up by ``s_j`` leaves ``z`` unchanged:

    W1'[j] = W1[j] / s_j,   b1'[j] = b1[j] / s_j,   W2'[:, j] = W2[:, j] * s_j

With ``r1_j`` the weight range (max |w|) of output channel ``j`` of layer 1 and ``r2_j`` that of input channel ``j``
of layer 2 (per group for grouped and depthwise consumers, over the ``K`` flattened features of channel ``j`` for
conv → flatten → Linear), the choice

    s_j = sqrt(r1_j * r2_j) / r2_j      gives      r1'_j = r2'_j = sqrt(r1_j * r2_j),

which makes the per-channel ranges of both tensors as even as possible, so one per-tensor scale fits all channels.
Chains ``conv1x1 → dw3x3 → conv1x1`` (inverted residual blocks) share the middle layer, so pairs are equalized one
after the other, sweeping over all pairs (forward, then backward, so that scales travel both ways along a chain)
until every ``|s_j - 1| <= tol`` (default 1e-3) or ``max_iters`` sweeps (default 20). A pair whose scales are already within ``tol`` of 1 is not touched, so a second run reports
``modified=False``.

Before: ``conv1 → relu → conv2`` with channel ranges spread 300×.   After: the same graph, weights rescaled,
outputs equal to float rounding, channel ranges spread a few ×.

Chains are ``producer → [pass-through ops] → consumer`` where producer and consumer are ``call_module``
Conv1d/2d/3d or Linear, each called from one place only, and every value on the way has exactly one user, so a
residual add ends the chain. Conv → Linear needs a ``flatten(start_dim=1)`` (or a rank-2 value) before the Linear.
The pass expects BatchNorm to be folded first (``FoldBatchNorm``): a BN between the layers ends the chain.

Clipping activations (ReLU6, Hardtanh, clamp) are not positively homogeneous. They end the chain, with a report
line, unless ``allow_clipping=True``: then the node is replaced by ``torch.clamp(x, min=lo/s, max=hi/s)`` with
per-channel bound buffers, which is exact (``clamp(v/s, lo/s, hi/s) = clamp(v, lo, hi)/s``) but turns a scalar
clip into a per-channel one.

A channel whose weights are tiny next to its bias (a pruned BatchNorm channel: gamma ~ 0, beta != 0) would be
scaled up by ``1/s_j`` ~ 1000, and its bias with it: that constant became the largest value of the activation, and
the next quantizer's range grew 600× (W8A8 fell from 59 to 17 dB). So no channel's bias is scaled past twice the
largest |bias| the producer had before the pass (``s_j >= |b1[j]| / (2 max|b1|)``). The factor 2 leaves every
bias of the digits CNN, ResNet-18 and MobileNetV2 inside the bound: their files are byte-identical with and without
it; at 1, MobileNetV2 W8A8 lost 0.6 dB.

Likewise no input channel of a consumer is scaled past ``CONSUMER_CAP`` (4) times the consumer's largest
input-channel range before the pass (depthwise consumers aside: their channels are their rows). A producer row whose
range is one outlier weight on an input that is always 0 (harmless in float, and in its own per-channel scale) moved
its range into the consumer's column, which then set every per-row scale of the consumer: a 4-bit layer after the
8-bit first layer of a digits MLP fell from 96.4 % to 34.0 % (94.6 % with the cap). The benchmark models equalize to
the same weights with and without it.

High-bias absorption (``absorb_bias=True``, same paper): for producer → ReLU → consumer where the producer's output
statistics are known from a folded BatchNorm (``node.meta["output_stats"]``, mean ``beta``, std ``gamma``), move
``c = max(0, beta - 3*gamma)`` out of the producer bias into the consumer bias:
``b1' = b1 - c``, ``b2' = b2 + W2 c``. It is exact while ``h >= c`` (about 99.9% of a Gaussian) and is applied
only where the consumer is a Linear or an unpadded conv, where ``W2 c`` is a per-channel constant.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .base import Pass, PassResult, shared_with, stock_layer

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# Element-wise, positively homogeneous per channel: f(s*v) = s*f(v) for s > 0.
_ACT_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_ACT_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.dropout}
_ACT_METHODS = {"relu", "relu_"}
# Per-channel pooling: positively homogeneous per channel, channel axis kept.
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                   F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_RELU_TARGETS = {F.relu, torch.relu}
_CLIP_PREFIX = "equalize_clip_"   # names of the per-channel clip bound buffers this pass registers


def _owns_bounds(node: torch.fx.Node) -> bool:
    bounds = (_arg(node, 1, "min"), _arg(node, 2, "max"))
    return all(isinstance(b, torch.fx.Node) and b.op == "get_attr" and str(b.target).startswith(_CLIP_PREFIX)
               for b in bounds)


@dataclasses.dataclass
class _Chain:
    producer: torch.fx.Node
    consumer: torch.fx.Node
    between: list[torch.fx.Node]
    kinds: list[str]                  # "act", "pool", "flatten", "mean", "clip" for each node in ``between``
    features_per_channel: int = 1     # K: consumer input features per producer channel (after flatten)

    @property
    def label(self) -> str:
        via = "".join(f" → {_short(n)}" for n in self.between)
        return f"{self.producer.target}{via} → {self.consumer.target}"


def _short(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _first_arg(node: torch.fx.Node):
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()), None)


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _spread(r: torch.Tensor) -> float:
    """max/min of the per-channel ranges, over channels whose range is nonzero."""
    nz = r[r > 0]
    if nz.numel() == 0:
        return 1.0
    return float(nz.max() / nz.min())


# Rescalings are deferred: each layer keeps the product of the factors given to its output channels (rows) and to
# its input channels (columns), and its weights are multiplied once, at the end. Rewriting the weights at every
# rescaling (float64 copy, product, float32 copy) cost AlexNet's 55 M classifier weights 41 s over the 20 sweeps its
# chains took (ResNet-18's 0.05 s); ranges of scaled weights are read from the stored weights and the factors.
def _in_factor(layer: nn.Module, col: torch.Tensor, k: int) -> torch.Tensor:
    """Per-input-channel factors ``col`` (one per producer channel) as a tensor that broadcasts against the weight
    (each factor repeated over its ``k`` features; for a conv, over the groups' rows)."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return col.repeat_interleave(k).reshape(1, -1)
    return _block_factor(layer, col).reshape(w.shape[0], w.shape[1], *([1] * (w.dim() - 2)))


def _block_factor(layer: nn.Module, col: torch.Tensor) -> torch.Tensor:
    """``col`` laid out as ``_block_max``'s columns: ``[1, C]`` for a Linear, ``[O, I/g]`` for a conv."""
    if isinstance(layer, nn.Linear):
        return col.reshape(1, -1)
    groups = layer.groups
    out_ch, in_per_group = layer.weight.shape[0], layer.weight.shape[1]
    return col.reshape(groups, 1, in_per_group).expand(groups, out_ch // groups, in_per_group) \
        .reshape(out_ch, in_per_group)


def _block_max(layer: nn.Module, k: int) -> torch.Tensor:
    """max |w| over each block of weights that one pair of (output channel, input channel) factors scales: ``[O, C]``
    over the ``k`` features of each producer channel (Linear), ``[O, I/g]`` over the kernel (conv). Every range
    the pass reads is a maximum of these blocks times factors, so a read costs O·C, not the whole weight (AlexNet's
    first classifier layer: 4096 x 256 for 37.7 M weights)."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return w.abs().reshape(w.shape[0], -1, k).amax(dim=2)
    return w.abs().reshape(w.shape[0], w.shape[1], -1).amax(dim=2)


def _out_ranges(layer: nn.Module, blocks: torch.Tensor, col=None) -> torch.Tensor:
    """Per output channel, max |w| of the weights as the deferred column factors ``col`` will leave them."""
    if col is not None:
        blocks = blocks * _block_factor(layer, col).to(blocks.dtype)
    return blocks.amax(dim=1).double()


def _in_ranges(layer: nn.Module, blocks: torch.Tensor, channels: int, row=None) -> torch.Tensor:
    """Per producer channel, max |w| of the consumer's weights as the deferred row factors ``row`` will leave them."""
    if row is not None:
        blocks = blocks * row.reshape(-1, 1).to(blocks.dtype)
    if isinstance(layer, nn.Linear):
        return blocks.amax(dim=0).double()
    groups = layer.groups
    out_ch, in_per_group = blocks.shape
    return blocks.reshape(groups, out_ch // groups, in_per_group).amax(dim=1).reshape(channels).double()


def _apply_factors(layer: nn.Module, row, col, k: int) -> None:
    """The deferred rescaling, once: ``w = float32(float64(w) · row_o · col_i)``, ``b = b · row``."""
    w = layer.weight
    f = torch.ones((), dtype=torch.float64)
    if row is not None:
        f = f * row.reshape((-1,) + (1,) * (w.dim() - 1))
    if col is not None:
        f = f * _in_factor(layer, col, k)
    rows = max(1, (1 << 18) // max(1, w[0].numel()))  # a block of rows at a time: float64 temporaries in cache
    for r0 in range(0, w.shape[0], rows):
        part = f[r0:r0 + rows] if f.dim() and f.shape[0] == w.shape[0] else f
        w[r0:r0 + rows].copy_((w[r0:r0 + rows].double() * part).to(w.dtype))
    if row is not None and layer.bias is not None:
        layer.bias.copy_((layer.bias.double() * row).to(layer.bias.dtype))


VERIFY_RANGE_CACHE = False  # set by the tests: every cached range is compared with a fresh read of the weights
BIAS_CAP = 2.0  # no channel's bias is scaled past this multiple of its layer's largest |bias| before the pass
# no input channel of a consumer (but a depthwise one, whose channels are its rows) is scaled past this multiple of
# the consumer's largest input-channel range before the pass: a producer channel whose range is one outlier weight
# (1000x its row, on an input that is always 0) moved its range into the consumer, whose every per-row scale it then
# set (a 4-bit layer after an 8-bit first layer: 96.4 % without equalization, 34.0 % with it, 94.6 % capped at 4x).
# At 4 the digits CNN, ResNet-18, MobileNetV2/V3-small, EfficientNet-B0, MnasNet and RegNet equalize to the same
# weights as without the cap; at 2 the digits CNN lost up to 0.3 dB at 3-4 bits
CONSUMER_CAP = 4.0
# a float producer is balanced against its quantized consumer only while its channel ranges are spread at most this
# many times as much as the consumer's (balancing moves about the square root of the ratio into the consumer: at
# most 2x); the digits CNN's float conv1 (2.5x against 1.5x) keeps its balance, a float first layer on raw wine
# features (280x against 2.9x) does not
FLOAT_PRODUCER_SPREAD = 4.0


def _bias_capped(done: torch.Tensor, s: torch.Tensor, bias0: torch.Tensor, cap: float) -> torch.Tensor:
    """``s`` with every channel's total scale ``done·s`` at least ``g·|b0_j|/cap``: no bias grows past ``cap``
    (twice the layer's largest |bias| before the pass) more than the layer's typical channel does, ``1/g`` with
    ``g = min(1, median(done·s))``. A pruned channel scaled up alone stays bounded as before; a layer whose weights
    are all tiny next to their biases (a first layer on raw measurements: weights ~1e-3) is scaled up as a whole,
    where the absolute bound held every channel at ~|b_j|/cap and set the channels' ratios by their biases (breast
    cancer Conv1d: range ratio 1.4 → 4.9, W4A4 50 % against 93 % without the pass)."""
    total = done * s
    g = min(1.0, float(total.median()))
    return torch.maximum(total, (g * bias0 / cap).to(total.dtype)) / done


class EqualizeWeights(Pass):
    """Cross-layer weight equalization (see the module docstring).

    Args:
        max_iters: bound on the sweeps over all pairs.
        tol: a pair is rescaled only while some ``|s_j - 1| > tol``; the sweep loop stops when none is.
        allow_clipping: rescale through ReLU6/Hardtanh/clamp by turning them into per-channel clamps.
        absorb_bias: after equalizing, absorb high biases through ReLU using folded-BN statistics.
        select: the ``SelectLayers`` to come. Pairs with a layer it keeps float are then balanced only where that
            cannot move much spread into a quantized layer (see ``_split_float``); without it every pair is
            equalized, as the paper does.
    """

    def __init__(self, max_iters: int = 20, tol: float = 1e-3, allow_clipping: bool = False,
                 absorb_bias: bool = False, select=None) -> None:
        super().__init__()
        self.select = select
        if max_iters < 1:
            raise ValueError("max_iters must be >= 1")
        if not tol > 0:
            raise ValueError("tol must be > 0")
        self.max_iters = max_iters
        self.tol = tol
        self.allow_clipping = allow_clipping
        self.absorb_bias = absorb_bias

    # -- matching -------------------------------------------------------------------------------------------

    def _classify(self, gm: torch.fx.GraphModule, node: torch.fx.Node, prev: torch.fx.Node) -> str:
        """Kind of a pass-through node, or "" if the chain cannot go through it."""
        if _first_arg(node) is not prev:
            return ""
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.PReLU):
                return "act"
            if isinstance(mod, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
                return "act" if not mod.training else ""
            if isinstance(mod, _ACT_MODULES):
                return "act"
            if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and mod.return_indices:
                return ""
            if isinstance(mod, _POOL_MODULES):
                return "pool"
            if isinstance(mod, nn.Flatten):
                return "flatten" if mod.start_dim == 1 and mod.end_dim == -1 else ""
            if isinstance(mod, (nn.ReLU6, nn.Hardtanh)):
                return "clip"
            return ""
        if node.op == "call_function":
            if node.target in _ACT_FUNCTIONS:
                if node.target is F.dropout and _arg(node, 2, "training", True) is not False:
                    return ""
                return "act"
            if node.target in _POOL_FUNCTIONS:
                return "" if node.kwargs.get("return_indices") else "pool"
            if node.target is torch.flatten:
                return "flatten" if _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1 else ""
            if node.target is torch.mean:
                return "mean" if self._mean_ok(_arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)) else ""
            if node.target in (F.relu6, F.hardtanh):
                return "clip"
            if node.target in (torch.clamp, torch.clip, torch.clamp_min) and _arg(node, 1, "min") == 0 \
                    and (node.target is torch.clamp_min or _arg(node, 2, "max") is None):
                return "act"  # clamp(x, min=0) is ReLU: scale-equivariant, no bound to rescale
            if node.target is torch.clamp:
                return "clip" if self._clamp_bounds_ok(node) else ""
            return ""
        if node.op == "call_method":
            if node.target in _ACT_METHODS:
                return "act"
            if node.target in ("clamp", "clip", "clamp_min") and _arg(node, 1, "min") == 0 \
                    and (node.target == "clamp_min" or _arg(node, 2, "max") is None):
                return "act"
            if node.target == "flatten":
                return "flatten" if _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1 else ""
            if node.target == "mean":
                return "mean" if self._mean_ok(_arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)) else ""
        return ""

    @staticmethod
    def _mean_ok(dim, keepdim) -> bool:
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        return bool(dims) and all(isinstance(d, int) and d >= 2 for d in dims)

    @staticmethod
    def _clamp_bounds_ok(node: torch.fx.Node) -> bool:
        """Scalar bounds, or the per-channel bound buffers this pass created."""
        bounds = (_arg(node, 1, "min"), _arg(node, 2, "max"))
        if all(b is None or isinstance(b, (int, float)) for b in bounds):
            return True
        return _owns_bounds(node)

    def _find_chains(self, gm: torch.fx.GraphModule) -> list[_Chain]:
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1

        def is_layer(node) -> bool:
            return node.op == "call_module" and isinstance(gm.get_submodule(node.target), LAYERS) \
                and stock_layer(gm.get_submodule(node.target))

        chains: list[_Chain] = []
        for node in gm.graph.nodes:
            if not is_layer(node):
                continue
            producer = gm.get_submodule(node.target)
            between: list[torch.fx.Node] = []
            kinds: list[str] = []
            cur = node
            consumer = None
            while len(cur.users) == 1:
                nxt = next(iter(cur.users))
                if is_layer(nxt):
                    if _first_arg(nxt) is cur:
                        consumer = nxt
                    break
                kind = self._classify(gm, nxt, cur)
                if not kind:
                    break
                between.append(nxt)
                kinds.append(kind)
                cur = nxt
            if consumer is None:
                continue
            chain = _Chain(node, consumer, between, kinds)
            why = self._why_not(gm, chain, producer, calls)
            if why:
                self.report.append(f"skipped {chain.label}: {why}")
                continue
            chains.append(chain)
        return chains

    def _why_not(self, gm, chain: _Chain, producer: nn.Module, calls: dict[str, int]) -> str:
        consumer = gm.get_submodule(chain.consumer.target)
        for n in (chain.producer, chain.consumer):
            if calls[n.target] != 1:
                return f"{n.target} is called from {calls[n.target]} places"
            other = shared_with(gm, n.target)
            if other:
                return f"{n.target} shares a parameter with {other} (tied weights)"
        if "clip" in chain.kinds:
            if not self.allow_clipping:
                return "clipping activation (ReLU6/Hardtanh/clamp) is not scale-equivariant; " \
                       "allow_clipping=True rescales its bound per channel"
            if chain.kinds.count("clip") > 1 or any(k in ("flatten", "mean", "pool") for k in
                                                    chain.kinds[:chain.kinds.index("clip")]):
                return "clip bound can be rescaled only right after the layer's activations"
        channels = producer.weight.shape[0]
        if isinstance(producer, nn.Linear):
            if any(k != "act" and k != "clip" for k in chain.kinds):
                return "only element-wise ops may follow a Linear producer"
            if not isinstance(consumer, nn.Linear):
                return "Linear → Conv changes the channel axis"
            k = 1
        else:
            if isinstance(consumer, nn.Linear):
                if "flatten" in chain.kinds:
                    if any(x != "act" for x in chain.kinds[chain.kinds.index("flatten") + 1:]):
                        return "only element-wise ops may follow the flatten"
                else:
                    last = chain.between[-1] if chain.between else chain.producer
                    shape = getattr(last.meta.get("tensor_meta"), "shape", None)
                    if shape is None or len(shape) != 2:
                        return "conv → Linear needs flatten(start_dim=1) or a known rank-2 value before the Linear"
                in_features = consumer.in_features
                if in_features % channels:
                    return f"{in_features} input features are not a multiple of {channels} channels"
                k = in_features // channels
            else:
                if any(kind in ("flatten",) for kind in chain.kinds):
                    return "flatten before a conv"
                if "mean" in chain.kinds:
                    return "channel axis reduced before a conv"
                if consumer.in_channels != channels:
                    return f"{channels} output channels but the consumer takes {consumer.in_channels}"
                k = 1
        chain.features_per_channel = k
        return ""

    # -- rewriting ------------------------------------------------------------------------------------------

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        chains = self._find_chains(gm)
        if not chains:
            from qcompile.qmodules import FakeQuantize

            quantized = any(isinstance(m, FakeQuantize) for m in gm.modules())
            self.report.append("no equalizable layer pairs" + (
                " (the layers are already quantized: run EqualizeWeights before InsertQuantizers)" if quantized
                else ""))
            return PassResult(gm, False)
        float_side = []
        select = self.select
        if select is not None and (select.first_last == "fp32" or select.float_downsample or select.overrides or
                                   select.default.action != "quant"):
            # pairs with a float layer: not balanced against it (see _split_float); every layer quantized: no need
            # to ask which (0.2 ms of a digits compile)
            chains, float_side = self._split_float(gm, chains)
        modified = self._sweep(gm, chains) if chains else False
        for c, why in float_side:
            self.report.append(f"left {c.label} alone: {why}")
        return PassResult(gm, modified)

    def _sweep(self, gm: torch.fx.GraphModule, chains: list[_Chain]) -> bool:
        """Cross-layer equalization of ``chains``, sweep after sweep; whether a weight changed."""
        mods = {c.producer.target: gm.get_submodule(c.producer.target) for c in chains}
        mods.update({c.consumer.target: gm.get_submodule(c.consumer.target) for c in chains})

        # Deferred rescaling (see _in_factor): ``row[t]`` / ``col[t]`` are the products of the factors layer ``t``'s
        # output / input channels were given, applied to its weights once after the sweeps. A layer's output-channel
        # ranges are ``row · max over the row of |w|·col`` and its input-channel ranges ``col · max over the column
        # of |w|·row``; the maxima are cached (reading every weight on every visit made VGG-11's 100 M classifier
        # weights cost ~10 s) and read again only when the other side's factors change.
        row: dict[str, torch.Tensor] = {}
        col: dict[str, torch.Tensor] = {}
        k_of = {c.consumer.target: c.features_per_channel for c in chains}
        channels_of = {c.consumer.target: mods[c.producer.target].weight.shape[0] for c in chains}
        out_max: dict[str, torch.Tensor] = {}
        in_max: dict[str, torch.Tensor] = {}

        blocks: dict[str, torch.Tensor] = {}

        def block_max(t: str) -> torch.Tensor:
            if t not in blocks:
                blocks[t] = _block_max(mods[t], k_of.get(t, 1))
            return blocks[t]

        def read_out_max(t: str) -> torch.Tensor:
            return _out_ranges(mods[t], block_max(t), col=col.get(t))

        def read_in_max(t: str) -> torch.Tensor:
            return _in_ranges(mods[t], block_max(t), channels_of[t], row=row.get(t))

        def ranges(c: _Chain):
            p, q = c.producer.target, c.consumer.target
            if p not in out_max:
                out_max[p] = read_out_max(p)
            if q not in in_max:
                in_max[q] = read_in_max(q)
            if VERIFY_RANGE_CACHE:  # tests: the cached maxima are the ones a fresh read gives, bit for bit
                assert torch.equal(out_max[p], read_out_max(p))
                assert torch.equal(in_max[q], read_in_max(q))
            r1 = out_max[p] * row[p] if p in row else out_max[p]
            r2 = in_max[q] * col[q] if q in col else in_max[q]
            return r1, r2

        def rescaled_ranges(c: _Chain, s: torch.Tensor) -> None:
            p, q = c.producer.target, c.consumer.target
            row[p] = row[p] * (1.0 / s) if p in row else 1.0 / s
            col[q] = col[q] * s if q in col else s.clone()
            in_max.pop(p, None)   # the producer's columns are maxima over its rescaled rows
            out_max.pop(q, None)  # the consumer's rows are maxima over its rescaled columns

        before = {id(c): tuple(map(_spread, ranges(c))) for c in chains}
        # twice the largest |bias| of each producer before equalization: no channel's bias is scaled up past it
        # by more than the layer's typical scale (cumulative over the sweeps, per producer)
        bias_cap = {t: BIAS_CAP * float(m.bias.detach().abs().max()) for t, m in mods.items()
                    if getattr(m, "bias", None) is not None and m.bias.numel()}
        bias_before = {t: mods[t].bias.detach().abs().double().clone() for t in bias_cap}
        column_cap = {}
        for c in chains:
            cons = mods[c.consumer.target]
            if getattr(cons, "groups", 1) > 1 and cons.groups == cons.in_channels:
                continue  # depthwise: each input channel is its own output channel, its range its own scale's
            top = CONSUMER_CAP * float(ranges(c)[1].max())
            column_cap[c.consumer.target] = max(column_cap.get(c.consumer.target, 0.0), top)
        total_s: dict[str, torch.Tensor] = {}
        rescaled: set[int] = set()
        modified = False
        sweeps, worst = 0, 0.0
        with torch.no_grad():
            for sweeps in range(1, self.max_iters + 1):
                worst = 0.0
                # symmetric sweep (forward then backward): a chain's scales propagate both ways in one sweep
                for c in chains + chains[-2::-1]:
                    r1, r2 = ranges(c)
                    s = torch.ones_like(r1)
                    ok = (r1 > 0) & (r2 > 0)
                    s[ok] = torch.sqrt(r1[ok] / r2[ok])
                    if column_cap.get(c.consumer.target, 0.0) > 0.0:
                        s[ok] = torch.minimum(s[ok], column_cap[c.consumer.target] / r2[ok])
                    cap = bias_cap.get(c.producer.target, 0.0)
                    if cap > 0.0:
                        done = total_s.get(c.producer.target, torch.ones_like(s))
                        s = _bias_capped(done, s, bias_before[c.producer.target], cap)
                        total_s[c.producer.target] = done * s
                    change = float((s - 1).abs().max())
                    if change <= self.tol:
                        continue
                    worst = max(worst, change)
                    self._apply(gm, c, s)
                    rescaled_ranges(c, s)
                    rescaled.add(id(c))
                    modified = True
                if worst == 0.0:
                    break
            for t in mods:
                if t in row or t in col:
                    _apply_factors(mods[t], row.get(t), col.get(t), k_of.get(t, 1))
            # the report reads the rescaled weights
            for cache in (row, col, out_max, in_max, blocks):
                cache.clear()
        for c in chains:
            b_out, b_in = before[id(c)]
            a_out, a_in = map(_spread, ranges(c))
            if id(c) in rescaled:
                self.report.append(f"equalized {c.label}: out-channel range ratio {b_out:.1f} → {a_out:.1f}, "
                                   f"in-channel range ratio {b_in:.1f} → {a_in:.1f}")
        if modified:
            if worst == 0.0:
                self.report.append(f"converged after {sweeps} sweep(s) (all |s-1| <= {self.tol:g})")
            else:
                self.report.append(f"stopped after max_iters={self.max_iters} sweeps, largest |s-1| = {worst:.2e}")
        else:
            self.report.append("all pairs already equalized")
        if self.absorb_bias:
            modified |= self._absorb_high_bias(gm, chains, mods)
        return modified

    def _split_float(self, gm: torch.fx.GraphModule, chains: list[_Chain]):
        """``(balanced, float_side)``: the chains whose both layers are quantized, whose producer is quantized per
        tensor and consumer float (balancing helps the producer and costs a float consumer nothing), or whose
        float producer's channel ranges are spread at most ``FLOAT_PRODUCER_SPREAD`` times as much as the quantized
        consumer's; and the others. Balancing a float layer far more spread than its quantized consumer only moves
        that spread into the consumer: an MLP on raw wine features with float first and last layers (the float
        first layer's rows 280x apart) had its 4-bit middle layer's columns spread 2.9x -> 17.8x, 27.5 -> 11.0 dB
        at W4A4 and 47.9 -> 31.1 dB at W8A8 against no equalization; a quantized producer per channel is not
        changed by the balance at all, and a float consumer reads no codes. Over 36 compiles of 9 small trained
        models with float first and last layers: +1.8 dB on average (-3.9 to +16.8 dB; docs/passes.md). Choosing
        such pairs' scales from the calibration data instead (the consumer's quantization error under a few
        scalings) was tried and lost up to 22 dB on held-out rows: scales fitted to 64 rows leave no headroom
        past them."""
        decision = self.select.decide(gm)

        def config(node):
            cfg = decision.get(node)
            return cfg if cfg is not None and cfg.action == "quant" else None

        balanced, float_side = [], []
        for c in chains:
            p, q = config(c.producer), config(c.consumer)
            if p is not None and (q is not None or not p.per_channel):
                balanced.append(c)
            elif p is None and q is None:
                float_side.append((c, "both layers stay float"))
            elif p is None and self._spread_ratio(gm, c) <= FLOAT_PRODUCER_SPREAD:
                balanced.append(c)
            elif p is None:
                float_side.append((c, f"{c.producer.target} stays float, its channel ranges spread more than "
                                      f"{FLOAT_PRODUCER_SPREAD:g}x {c.consumer.target}'s"))
            else:
                float_side.append((c, f"{c.consumer.target} stays float and {c.producer.target}'s weights are "
                                      f"quantized per channel"))
        return balanced, float_side

    @staticmethod
    def _spread_ratio(gm, c: _Chain) -> float:
        """The producer's output-channel range spread over the consumer's input-channel range spread (max/min of
        the live channels): balancing the two moves about the square root of it into the consumer."""
        prod, cons = gm.get_submodule(c.producer.target), gm.get_submodule(c.consumer.target)
        r1 = _out_ranges(prod, _block_max(prod, 1))
        r2 = _in_ranges(cons, _block_max(cons, c.features_per_channel), prod.weight.shape[0])
        live = (r1 > 0) & (r2 > 0)
        if int(live.sum()) < 2:
            return 1.0
        return _spread(r1[live]) / max(_spread(r2[live]), 1.0)

    def _apply(self, gm, c: _Chain, s: torch.Tensor) -> None:
        """The rescaling's effects beside the weights (``rescaled_ranges`` records those, ``_apply_factors`` makes
        them): the producer's output statistics and clip bounds."""
        inv_s = 1.0 / s
        stats = c.producer.meta.get("output_stats")
        if stats is not None and hasattr(stats, "scaled"):
            c.producer.meta["output_stats"] = stats.scaled(inv_s)
        for node, kind in zip(list(c.between), list(c.kinds)):
            if kind == "clip":
                new = self._rescale_clip(gm, c, node, inv_s)
                c.between[c.between.index(node)] = new

    def _rescale_clip(self, gm, c: _Chain, node: torch.fx.Node, inv_s: torch.Tensor) -> torch.fx.Node:
        """Divide the clip bounds of channel j by s_j; the first time, turn the node into a per-channel clamp."""
        if node.op == "call_function" and node.target is torch.clamp and _owns_bounds(node):
            for b in (_arg(node, 1, "min"), _arg(node, 2, "max")):
                buf = gm.get_buffer(b.target)
                buf.copy_((buf.double() * inv_s.reshape(buf.shape)).to(buf.dtype))
            return node
        prod = gm.get_submodule(c.producer.target)
        shape = (-1,) if isinstance(prod, nn.Linear) else (-1,) + (1,) * (prod.weight.dim() - 2)
        channels = prod.weight.shape[0]
        lo, hi = self._clip_bounds(gm, node)
        lo_t = torch.full((channels,), lo, dtype=torch.float64) * inv_s
        hi_t = torch.full((channels,), hi, dtype=torch.float64) * inv_s
        base = f"{_CLIP_PREFIX}{node.name}"
        gm.register_buffer(f"{base}_min", lo_t.reshape(shape).to(prod.weight.dtype))
        gm.register_buffer(f"{base}_max", hi_t.reshape(shape).to(prod.weight.dtype))
        graph = gm.graph
        with graph.inserting_before(node):
            lo_node = graph.get_attr(f"{base}_min")
            hi_node = graph.get_attr(f"{base}_max")
            new = graph.call_function(torch.clamp, (_first_arg(node),), {"min": lo_node, "max": hi_node})
        if "tensor_meta" in node.meta:
            new.meta["tensor_meta"] = node.meta["tensor_meta"]
        node.replace_all_uses_with(new)
        old_target = node.target if node.op == "call_module" else None
        graph.erase_node(node)
        if old_target is not None and not any(n.op == "call_module" and n.target == old_target for n in graph.nodes):
            gm.delete_submodule(old_target)
        self.report.append(f"replaced {_short(node)} by a per-channel clamp to rescale its bound ({c.label})")
        return new

    @staticmethod
    def _clip_bounds(gm, node: torch.fx.Node) -> tuple[float, float]:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            return float(mod.min_val), float(mod.max_val)  # ReLU6 is a Hardtanh(0, 6)
        if node.target is F.relu6:
            return 0.0, 6.0
        if node.target is F.hardtanh:
            return float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0))
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
        return (-math.inf if lo is None else float(lo)), (math.inf if hi is None else float(hi))

    # -- high-bias absorption --------------------------------------------------------------------------------

    def _absorb_high_bias(self, gm, chains: list[_Chain], mods) -> bool:
        changed = False
        with torch.no_grad():
            for c in chains:
                stats = c.producer.meta.get("output_stats")
                prod, cons = mods[c.producer.target], mods[c.consumer.target]
                relu_only = len(c.between) == 1 and self._is_relu(gm, c.between[0])
                if stats is None or not relu_only or prod.bias is None:
                    continue
                mean, std = stats.mean.double(), stats.std.double()
                absorb = torch.clamp(mean - 3.0 * std, min=0.0)
                absorb[absorb <= self.tol * std] = 0.0  # rounding leftovers of an earlier absorption
                if float(absorb.max()) <= 0.0:
                    continue
                if not isinstance(cons, nn.Linear) and any(p != 0 for p in _padding(cons)):
                    self.report.append(f"no bias absorption for {c.label}: the consumer is a padded conv, "
                                       "where W2 c is not constant at the borders")
                    continue
                shift = _constant_response(cons, absorb)
                prod.bias.copy_((prod.bias.double() - absorb).to(prod.bias.dtype))
                if cons.bias is None:
                    cons.bias = nn.Parameter(shift.to(cons.weight.dtype), requires_grad=cons.weight.requires_grad)
                else:
                    cons.bias.copy_((cons.bias.double() + shift).to(cons.bias.dtype))
                c.producer.meta["output_stats"] = type(stats)(
                    mean=(stats.mean.double() - absorb).to(stats.mean.dtype), std=stats.std, source=stats.source)
                self.report.append(f"absorbed high bias of {c.producer.target} into {c.consumer.target} "
                                   f"({int((absorb > 0).sum())} channel(s), max {float(absorb.max()):.3g})")
                changed = True
        return changed

    @staticmethod
    def _is_relu(gm, node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return type(gm.get_submodule(node.target)) is nn.ReLU
        if node.op == "call_function":
            return node.target in _RELU_TARGETS
        return node.op == "call_method" and node.target in _ACT_METHODS


def _padding(conv: nn.Module) -> tuple:
    pad = conv.padding
    if isinstance(pad, str):
        return (0,) if pad == "valid" else (1,)
    return tuple(pad)


def _constant_response(layer: nn.Module, c: torch.Tensor) -> torch.Tensor:
    """The layer's output (without bias) for an input that is the constant ``c_j`` on channel ``j``."""
    w = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        return w @ c
    groups = layer.groups
    out_ch, in_per_group = w.shape[0], w.shape[1]
    wsum = w.reshape(out_ch, in_per_group, -1).sum(dim=2).reshape(groups, out_ch // groups, in_per_group)
    cg = c.reshape(groups, in_per_group, 1)
    return torch.bmm(wsum, cg).reshape(out_ch)


__all__ = ["EqualizeWeights"]
