"""Data-free calibration inputs distilled from BatchNorm statistics (ZeroQ, Cai et al. 2020).

``Calibrate``'s data-free path synthesises a quantizer's values from the folded BatchNorms that feed it, through a
short list of operations it models itself (ReLUs, max-pools, flattens, residual adds: ``_synthesis_plan``). Past
those — a SiLU or Hardswish, a squeeze-excite gate, a concatenation, a channel shuffle, a BatchNorm left unfolded
in front of its activation (DenseNet), a classifier after an average pool — the values depend on how the model
mixes positions and channels, which per-channel draws do not have (independent draws average out in a pool: a
first version fed the graph such draws, and the classifier inputs of two trained digits CNNs came out at half their
real range, 13-17 dB at W8A8 where 32 images give 33-45).

Here the model computes them from inputs made to fit its BatchNorms: a small batch of inputs, starting from
N(0, 1), is optimised (Adam, ``STEPS`` steps) so that every tensor a BatchNorm describes has, per channel, the mean
and standard deviation that BatchNorm says it has — the output of a layer with a folded BatchNorm
(``meta["output_stats"]`` = (β, |γ|)) and the output of an unfolded ``BatchNorm`` module (its β, |γ|) — and the
float graph then runs on them while the quantizers that asked observe their values. ZeroQ's "distilled data":
the statistics loss Σ‖μ̃ − β‖² + ‖σ̃ − |γ|‖², each layer's term divided by its mean γ², so that every layer counts
alike.

What it is used for, and what not (``Calibrate._calibrate_data_free``): only the activation quantizers of the
requested layers that no plan describes and that have a BatchNorm'd tensor among their inputs' ancestors; the model
input (nothing before it is a BatchNorm) stays refused, and 8-bit outputs added only for the int8 kernels stay
float as before (a trained digits CNN's classifier-side output fitted on distilled inputs cost 16 dB at W8A8).
Only floating-point inputs are optimised: a model with another input (token ids) gets nothing from here.
"""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn

from qcompile import quant
from qcompile.qmodules import FakeQuantize

DISTILLED = "qcompile.distilled_inputs"  # gm.meta key: the distilled inputs, for BiasCorrection
STEPS = 50  # Adam steps on the inputs: 20 or 30 lost up to 5 dB on the trained digits CNNs of bench_data_free
# (EfficientNet-like W8A8 33.1 -> 28.0 dB at 30), 200 gained nothing
LR = 0.1
PIXELS = 1 << 16  # the batch: enough samples for this many input values, 4 to 16 samples; one sample where a
# sample alone holds over 4 x PIXELS values (512 x 512 images: the backward pass of a segmentation network on 4 of
# them would hold gigabytes of activations)


def describing_points(gm: torch.fx.GraphModule) -> dict:
    """node -> (β, |γ|) for every tensor BatchNorm statistics describe: a layer's output with a folded BatchNorm
    (``meta["output_stats"]``) and an unfolded BatchNorm module's output (its affine parameters)."""
    points = {}
    for node in gm.graph.nodes:
        stats = node.meta.get("output_stats")
        if stats is not None:
            points[node] = (stats.mean.detach().float(), stats.std.detach().float().abs())
        elif node.op == "call_module":
            bn = gm.get_submodule(node.target)
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats and \
                    bn.running_mean is not None:
                c = bn.num_features
                beta = bn.bias.detach().float() if bn.affine else torch.zeros(c)
                gamma = bn.weight.detach().float().abs() if bn.affine else torch.ones(c)
                points[node] = (beta, gamma)
    return points


def after_points(gm: torch.fx.GraphModule, points: dict) -> set:
    """The nodes that read, directly or not, a tensor in ``points``."""
    reached = set()
    for node in gm.graph.nodes:  # topological order
        if node in points or any(isinstance(a, torch.fx.Node) and a in reached for a in node.all_input_nodes):
            reached.add(node)
    return reached


def _channel_axis(value, c: int):
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 2:
        return None
    if value.shape[1] == c:
        return 1
    return value.dim() - 1 if value.shape[-1] == c else None


class _Record(torch.fx.Interpreter):
    """The graph, handing each tensor in ``points`` to ``sink(value, β, γ)`` and each input of a ``watched``
    quantizer node to ``seen(node, value)``."""

    def __init__(self, gm, points: dict, sink=None, watched=(), seen=None):
        super().__init__(gm, garbage_collect_values=True)
        self.points, self.sink, self.watched, self.seen = points, sink, watched, seen

    def run_node(self, n):
        if n in self.watched and isinstance(n.args[0], torch.fx.Node):
            self.seen(n, self.env[n.args[0]])
        out = super().run_node(n)
        if self.sink is not None and n in self.points:
            self.sink(out, *self.points[n])
        return out


def _statistics_loss(gm, points: dict, inputs) -> torch.Tensor | None:
    terms = []

    def sink(value, beta, gamma):
        axis = _channel_axis(value, beta.numel())
        if axis is None or not value.requires_grad:
            return
        dims = [d for d in range(value.dim()) if d != axis]
        mean, std = value.mean(dims), value.std(dims)
        scale = gamma.square().mean().clamp_min(1e-12)
        terms.append(((mean - beta).square().mean() + (std - gamma).square().mean()) / scale)

    _Record(gm, points, sink).run(*inputs)
    return torch.stack(terms).mean() if terms else None


def _start(gm) -> tuple | None:
    """Two candidate starting inputs, N(0, 1), shaped as the traced example: with the batch this module picks, and
    with the traced batch (for a graph that takes no other); None where an input is not a floating tensor of known
    shape."""
    shapes = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape") or not meta.dtype.is_floating_point or len(meta.shape) < 1:
            return None
        shapes.append((tuple(meta.shape), meta.dtype))
    if not shapes:
        return None
    per_sample = max(1, max(math.prod(s[1:]) for s, _ in shapes))
    batch = min(16, max(4 if per_sample <= 4 * PIXELS else 1, math.ceil(PIXELS / per_sample)))
    gen = torch.Generator().manual_seed(0)
    return [torch.randn((batch,) + s[1:], generator=gen, dtype=dtype) for s, dtype in shapes], \
        [torch.randn(s, generator=gen, dtype=dtype) for s, dtype in shapes]


def distill(gm: torch.fx.GraphModule, points: dict, progress=None, record: dict | None = None) -> list | None:
    """Inputs whose BatchNorm'd tensors have the statistics ``points`` gives; None where the graph does not run on
    such inputs (or no BatchNorm'd tensor depends on them). ``progress(step, STEPS)`` after each step; ``record``
    gets ``"loss"``: the statistics loss at the start and at the last step, and ``"batch"``."""
    starts = _start(gm)
    if starts is None:
        return None
    for start in starts:  # the batch this module picks; else the traced one (a graph traced at a fixed batch)
        x = [t.clone().requires_grad_(True) for t in start]
        try:
            with torch.enable_grad():
                loss = _statistics_loss(gm, points, x)
                if loss is None:
                    return None
                first = float(loss.detach())
                opt = torch.optim.Adam(x, lr=LR)
                for step in range(STEPS):
                    if step:
                        loss = _statistics_loss(gm, points, x)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if progress is not None:
                        progress(step + 1, STEPS)
        except Exception:  # noqa: BLE001 - the model's code does not take this batch (or no autograd through it)
            continue
        if record is not None:
            record["loss"] = (first, float(loss.detach()))
            record["batch"] = int(x[0].shape[0])
        return [t.detach() for t in x]
    return None


def observe(gm: torch.fx.GraphModule, nodes: list, method: str, progress=None, record: dict | None = None) -> dict:
    """For each activation quantizer node in ``nodes`` that reads a BatchNorm'd tensor (directly or not): an
    observer of ``method`` that has seen its values on distilled inputs (the float graph). Nodes missing from the
    result have no BatchNorm before them, or the graph could not be run that way. ``record``: as for ``distill``."""
    points = describing_points(gm)
    reached = after_points(gm, points)
    nodes = [n for n in nodes if isinstance(n.args[0], torch.fx.Node) and n.args[0] in reached]
    if not nodes:
        return {}
    fqs = [m for m in gm.modules() if isinstance(m, FakeQuantize)]
    enabled = [m.enabled for m in fqs]
    observers = {n: quant.make_observer(method) for n in nodes}

    def seen(node, value):
        bounds = getattr(gm.get_submodule(node.target), "saturation", None)
        value = value.detach().float()
        observers[node].update(value.clamp(*bounds) if bounds is not None else value)

    try:
        for m in fqs:
            m.enabled = False  # the float model: quantizers (weights included) pass values through
        inputs = distill(gm, points, progress, record)
        if inputs is None:
            return {}
        gm.meta[DISTILLED] = inputs  # BiasCorrection's E[x] where no BatchNorm gives it (it removes them)
        with torch.no_grad():
            _Record(gm, points, watched=set(nodes), seen=seen).run(*inputs)
    finally:
        for m, e in zip(fqs, enabled):
            m.enabled = e
    return observers
