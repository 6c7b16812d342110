"""FoldBatchNorm: fold inference-mode BatchNorm into the Conv/Linear layer before it.

An eval-mode BatchNorm is a per-channel affine map of the layer output ``y = W x + b``:

    BN(y)_j = gamma_j * (y_j - mu_j) / sigma_j + beta_j,      sigma_j = sqrt(var_j + eps)

so with ``k_j = gamma_j / sigma_j`` the pair is one layer with

    W'_j = k_j * W_j            (output channel j: row j of a Linear, filter j of a Conv, any ``groups``)
    b'_j = k_j * (b_j - mu_j) + beta_j     (b = 0 when the layer had no bias; it gets one)

Before: ``y = conv(x); z = bn(y); f(z)``   After: ``y = conv'(x); f(y)``  (the BN node and module are gone).

Matches ``call_module`` Conv1d/2d/3d, ConvTranspose1d/2d/3d (the output channels are axis 1 of their weight, per
group) or Linear, and ``F.conv1d/2d/3d``/``F.linear`` on ``get_attr`` parameters that no other node reads (a conv
subclass with its own forward, e.g. "same" padding), followed by ``call_module`` BatchNorm1d/2d/3d in eval mode, and
``F.batch_norm(..., training=False)`` whose statistics are ``get_attr`` nodes. The arithmetic is done in float64
and cast back. A BN is left alone, with a report line saying why, when its input is not such a layer, when the
layer's output has other users as well, when the layer's module is called from more than one place (folding
would change the other call), when it is in training mode or has no running statistics, or when a Linear's
output is not 2-D (BatchNorm1d would normalise another axis).

The folded layer node gets ``node.meta["output_stats"] = ChannelStats(mean=beta, std=|gamma|)``: the per-channel
distribution BN imposed on the layer output. Data-free passes (high-bias absorption, analytic bias correction)
read it; passes that rescale output channels must rescale it too.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .base import Pass, PassResult, add_functional_bias, fake_quantizer, shared_with, stock_layer

FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                   nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelStats:
    """Per-output-channel mean and standard deviation of a layer's output, inferred from a folded BatchNorm."""

    mean: torch.Tensor
    std: torch.Tensor
    source: str = ""

    def scaled(self, factor: torch.Tensor) -> "ChannelStats":
        """The stats of ``y_j * factor_j`` (``factor > 0``)."""
        factor = factor.to(self.mean.dtype)
        return ChannelStats(self.mean * factor, self.std * factor, self.source)


@dataclasses.dataclass
class _BNParams:
    name: str
    mean: torch.Tensor
    var: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float


def _module_call_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _get_attr_tensor(gm: torch.fx.GraphModule, arg) -> Optional[torch.Tensor]:
    if arg is None:
        return None
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        obj = gm
        for part in str(arg.target).split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None
    raise ValueError("statistics are computed in the graph, not get_attr constants")


def _functional_bn_params(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[Optional[_BNParams], str]:
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    values = dict(defaults)
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    if values["training"] is not False:
        return None, "F.batch_norm is called with training=True (or a traced flag)"
    try:
        mean = _get_attr_tensor(gm, values["running_mean"])
        var = _get_attr_tensor(gm, values["running_var"])
        weight = _get_attr_tensor(gm, values["weight"])
        bias = _get_attr_tensor(gm, values["bias"])
    except ValueError as exc:
        return None, str(exc)
    if mean is None or var is None:
        return None, "it has no running statistics"
    return _BNParams(node.name, mean, var, weight, bias, float(values["eps"])), ""


def _module_bn_params(bn: nn.Module, name: str) -> tuple[Optional[_BNParams], str]:
    if bn.training:
        return None, "it is in training mode (call model.eval())"
    if bn.running_mean is None or bn.running_var is None:
        return None, "it has no running statistics (track_running_stats=False)"
    weight = bn.weight if bn.affine else None
    bias = bn.bias if bn.affine else None
    return _BNParams(name, bn.running_mean, bn.running_var, weight, bias, float(bn.eps)), ""


_FUNCTIONAL_LAYERS = (F.conv1d, F.conv2d, F.conv3d, F.linear)


def _functional_weight_bias(node: torch.fx.Node):
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return weight, bias


def _folded(w: torch.Tensor, b: Optional[torch.Tensor], p: _BNParams) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k·W, k·(b − μ) + β)`` in float64, ``k = γ / sqrt(var + eps)`` per output channel (axis 0 of W)."""
    with torch.no_grad():
        mean = p.mean.detach().double()
        k = (p.weight.detach().double() if p.weight is not None else torch.ones_like(mean)) * \
            torch.rsqrt(p.var.detach().double() + p.eps)
        beta = p.bias.detach().double() if p.bias is not None else torch.zeros_like(mean)
        bias = b.detach().double() if b is not None else torch.zeros_like(mean)
        return w.detach().double() * k.reshape((-1,) + (1,) * (w.dim() - 1)), k * (bias - mean) + beta


def _is_batchnorm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), BATCHNORMS)
    return node.op == "call_function" and node.target is F.batch_norm


def _describe(node) -> str:
    if isinstance(node, torch.fx.Node):
        return node.target if node.op == "call_module" else node.name
    return repr(node)


def note_initial_batch_statistics(gm: torch.fx.GraphModule) -> None:
    """Data-free calibration reads the activations' ranges from the BatchNorm running statistics. Where every
    BatchNorm still holds its initial ones (mean 0, variance 1: never run on data in training mode, as in a
    torchvision or timm model built with ``weights=None``), they say nothing about the activations: the file
    compiled from them scored 0 dB against the float model (MobileNetV3-Large, EfficientNet-B0 at 128x128).
    Noted on the graph (``gm.meta[INITIAL_BATCHNORM_STATS]``) before they are folded, by ``compile`` (so that errors
    in the options come first) and by FoldBatchNorm (a pipeline of one's own calibrated from them without a word);
    ``Calibrate`` refuses to calibrate from them."""
    from .calibrate import INITIAL_BATCHNORM_STATS, PARTIAL_BATCHNORM_STATS

    if INITIAL_BATCHNORM_STATS in gm.meta or PARTIAL_BATCHNORM_STATS in gm.meta:
        return
    norms = [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if norms and all(bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()) for m in norms):
        gm.meta[INITIAL_BATCHNORM_STATS] = len(norms)
        return
    # Running statistics tracked over a few batches only hold (1 - momentum)^n of their initial mean 0 / variance 1
    # (3 batches at momentum 0.1: 73 %): data-free ranges read from them are far off (a model saved right after a
    # short fine-tuning, or BatchNorms re-estimated on a few batches). num_batches_tracked 0 is no count (older
    # checkpoints lack it).
    partial = []
    for m in norms:
        n = int(m.num_batches_tracked) if getattr(m, "num_batches_tracked", None) is not None else 0
        if 0 < n and m.momentum is not None and (1.0 - float(m.momentum)) ** n > 0.05:
            partial.append((n, (1.0 - float(m.momentum)) ** n))
    if partial:  # the layer with most of its initial statistics left: its batches and that share
        n, share = max(partial, key=lambda p: p[1])
        gm.meta[PARTIAL_BATCHNORM_STATS] = (len(partial), len(norms), n, share)


# median over the first BatchNorm's channels of KL(N(data mean, data var) || N(running mean, running var)): 0.0007
# for a digits CNN's own calibration images, 0.37 for those images in [0, 1] instead of [-1, 1] (the file then
# scored 19 % on real inputs), 2.9 for x/255, 38 for raw 0..16 pixels; plus 2 / samples (few samples' own noise)
DATA_SHIFT_KL = 0.25
_SHIFT_SAMPLES = 32


class _Reached(Exception):
    pass


def _first_batchnorm(gm: torch.fx.GraphModule):
    """The first eval-mode BatchNorm of ``gm`` with running statistics: ``(node, module or None, eps, name)`` for a
    BatchNorm module, or for ``F.batch_norm`` on buffers (timm's BatchNormAct2d traces to one); None if none."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None \
                    and mod.running_var is not None:
                return node, mod, float(mod.eps), str(node.target)
        elif node.op == "call_function" and node.target is F.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            bound = dict(zip(names, node.args))
            bound.update(node.kwargs)
            stats = (bound.get("running_mean"), bound.get("running_var"))
            if bound.get("training", False) is not False or \
                    not all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in stats):
                continue
            owner = str(stats[0].target).rpartition(".")[0]
            try:
                mod = gm.get_submodule(owner) if owner else None
            except AttributeError:
                mod = None
            return node, mod, float(bound.get("eps", 1e-5)), owner or node.name
    return None


def calibration_shift_note(gm: torch.fx.GraphModule, data) -> str | None:
    """A note where the calibration data do not look like the data the model was trained on: the input of its
    first BatchNorm (trained running statistics) has another mean or variance than those statistics record
    (median over channels of the Gaussian KL divergence past ``DATA_SHIFT_KL`` plus 2 / samples). Pixels in 0..255
    or 0..1 handed to a model trained on normalised ones compiled without a word, and validation (on those same
    data) passed while the file scored 11-21 % on real inputs. Read on up to 32 samples spread over the data (a
    data set sorted by class starts with one class). None where no trained BatchNorm is reached or the run fails."""
    found = _first_batchnorm(gm)
    if found is None:
        return None
    node, bn, eps, where = found
    tracked = int(bn.num_batches_tracked) if getattr(bn, "num_batches_tracked", None) is not None else 0
    momentum = getattr(bn, "momentum", None)
    if tracked > 0 and momentum is not None and (1.0 - float(momentum)) ** tracked > 0.05:
        # statistics of a few batches still hold much of their initial variance 1 (3 batches at momentum 0.1:
        # 73 %): correct data read as 1/8 of the variance (ResNet-18, KL 0.6)
        return None
    parts = data if isinstance(data, tuple) else (data,)
    n = next((len(t) for t in parts if isinstance(t, torch.Tensor) and t.dim() > 0), 0)
    if n == 0:
        return None
    first_input = next(t for t in parts if isinstance(t, torch.Tensor) and t.dim() > 0)
    # large inputs, fewer samples: the layers before the BatchNorm run on them (ResNet-18's conv1 on 32 images at
    # 224 x 224 took 0.3 s of a 2 s compile)
    wanted = _SHIFT_SAMPLES if first_input[:1].numel() <= 2 ** 14 else _SHIFT_SAMPLES // 4
    rows = sorted({round(i * (n - 1) / max(1, min(n, wanted) - 1)) for i in range(min(n, wanted))})
    sample = tuple(t[rows] if isinstance(t, torch.Tensor) and t.dim() > 0 and len(t) == n else t for t in parts)

    class Run(torch.fx.Interpreter):  # runs the graph up to the BatchNorm only
        got = None

        def run_node(self, n):
            if n is node:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                self.got = (args[0], args[1:3] if n.op == "call_function" else None)
                if n.op == "call_function" and len(args) < 3:
                    self.got = (args[0], (kwargs.get("running_mean"), kwargs.get("running_var")))
                raise _Reached()
            return super().run_node(n)

    run = Run(gm)
    try:
        with torch.no_grad():
            run.run(*sample)
    except _Reached:
        pass
    except Exception:  # noqa: BLE001 -- a diagnostic only: the compile reports its own errors
        return None
    if run.got is None:
        return None
    x, stats = run.got
    running_mean, running_var = stats if stats is not None else (bn.running_mean, bn.running_var)
    if not all(isinstance(t, torch.Tensor) for t in (x, running_mean, running_var)) or not x.is_floating_point() \
            or x.dim() < 2 or x.shape[1] != running_mean.numel() or x.numel() <= x.shape[1]:
        return None
    if bool((running_mean == 0).all()) and bool((running_var == 1).all()):
        return None  # initial statistics (never trained): they say nothing of the data
    samples = x.shape[0]
    x = x.detach().reshape(x.shape[0], x.shape[1], -1)  # (N, C, positions)
    step = -(-x.shape[0] * x.shape[2] // 2 ** 12)  # evenly spaced positions, ~4096 values per channel (ResNet-18's
    var, mean = torch.var_mean(x[:, :, ::step].double(), dim=(0, 2), unbiased=False)  # 1.6 M each took 0.6 s)
    ref_var = running_var.detach().double() + eps
    ratio = (var + eps) / ref_var
    shift = (mean - running_mean.detach().double()) / ref_var.sqrt()
    finite = torch.isfinite(ratio) & torch.isfinite(shift)
    if not bool(finite.any()):
        return None
    ratio, shift = ratio[finite], shift[finite]
    kl = 0.5 * (ratio - 1 - torch.log(ratio) + shift * shift)
    # a few samples' own statistics are off by ~1/n in KL (tabular features through an input BatchNorm: 91 of 100
    # random pairs of correct rows went past 0.25, 1 of 100 sets of 16): the bound grows for few samples
    if float(kl.median()) <= DATA_SHIFT_KL + 2.0 / max(1, samples):
        return None
    r, z = float(ratio.median()), float(shift.abs().median())
    spread = f"{r:.3g}x the variance" if r >= 1 else f"1/{1 / r:.3g} of the variance"
    return (f"the calibration data do not look like the model's training data: at its first BatchNorm "
            f"({where}) they have {spread} its running statistics record, means {z:.2g} standard deviations "
            f"off (medians over channels); scales calibrated on them fit other inputs than the model's (pixels in "
            f"0..255 or 0..1 for a model trained on normalised ones: 11-21 % on real digits). Give calibration data "
            f"preprocessed as in training (the same scaling, mean and std) and drawn from all of it (not one class)")


class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the preceding Conv/Linear (see the module docstring)."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        note_initial_batch_statistics(gm)  # before they are folded: data-free Calibrate reads the note
        counts = _module_call_counts(gm)
        matches: list[tuple[torch.fx.Node, torch.fx.Node, _BNParams]] = []
        for node in gm.graph.nodes:
            if not _is_batchnorm(gm, node):
                continue
            bn_name = _describe(node)
            if node.op == "call_module":
                params, why = _module_bn_params(gm.get_submodule(node.target), bn_name)
            else:
                params, why = _functional_bn_params(gm, node)
            if params is None:
                self.report.append(f"left {bn_name} alone: {why}")
                continue
            why = self._why_not_foldable(gm, node, counts)
            if why:
                self.report.append(f"left {bn_name} alone: {why}")
                continue
            matches.append((node.args[0], node, params))

        for layer_node, bn_node, params in matches:
            if layer_node.op == "call_function":
                self._fold_functional(gm, layer_node, params)
            else:
                self._fold(gm.get_submodule(layer_node.target), params)
            inputs = bn_node.all_input_nodes
            bn_node.replace_all_uses_with(layer_node)
            gm.graph.erase_node(bn_node)
            if "tensor_meta" in bn_node.meta:
                layer_node.meta["tensor_meta"] = bn_node.meta["tensor_meta"]
            gamma = params.weight if params.weight is not None else torch.ones_like(params.mean)
            beta = params.bias if params.bias is not None else torch.zeros_like(params.mean)
            layer_node.meta["output_stats"] = ChannelStats(
                mean=beta.detach().clone().float(), std=gamma.detach().abs().clone().float(), source=f"batchnorm {params.name}")
            self.report.append(f"folded {params.name} into {_describe(layer_node)}")
            if bn_node.op == "call_module":
                self._drop_module_if_unused(gm, bn_node.target)
            else:
                for arg in inputs:
                    if arg.op == "get_attr" and not arg.users:
                        gm.graph.erase_node(arg)
        if not matches and not self.report:  # a second run said nothing
            self.report.append("no BatchNorm after a Conv/Linear left to fold: nothing to do")
        return PassResult(gm, bool(matches))

    @staticmethod
    def _why_not_foldable(gm: torch.fx.GraphModule, bn_node: torch.fx.Node, counts: dict[str, int]) -> str:
        src = bn_node.args[0] if bn_node.args else bn_node.kwargs.get("input")
        if not isinstance(src, torch.fx.Node):
            return "its input is not a graph value"
        if src.op == "call_function" and src.target in _FUNCTIONAL_LAYERS:
            return FoldBatchNorm._why_not_functional(gm, bn_node, src)
        if src.op != "call_module" or not isinstance(gm.get_submodule(src.target), FOLDABLE_LAYERS):
            kind = src.op if src.op != "call_module" else type(gm.get_submodule(src.target)).__name__
            return f"its input {src.name} ({kind}) is not a Conv1d/2d/3d, ConvTranspose or Linear module"
        layer = gm.get_submodule(src.target)
        if not stock_layer(layer):
            return f"{src.target} ({type(layer).__name__}) has its own forward, which its weight may not pass through"
        if len(src.users) != 1:
            others = ", ".join(u.name for u in src.users if u is not bn_node)
            return f"the output of {src.target} also feeds {others}"
        if counts.get(src.target, 0) != 1:
            return f"{src.target} is called from {counts[src.target]} places; folding would change the others"
        other = shared_with(gm, src.target)
        if other:
            return f"{src.target} shares a parameter with {other} (tied weights); folding would change it there"
        meta = src.meta.get("tensor_meta")
        if isinstance(layer, nn.Linear):
            shape = getattr(meta, "shape", None)
            if shape is not None and len(shape) != 2:
                return f"{src.target} output has shape {tuple(shape)}; BatchNorm1d normalises axis 1, not the features"
        if bn_node.op == "call_module":
            num = gm.get_submodule(bn_node.target).num_features
        else:
            num = None
        out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if num is not None and num != out_channels:
            return f"it has {num} channels but {src.target} has {out_channels} outputs"
        return ""

    @staticmethod
    def _why_not_functional(gm: torch.fx.GraphModule, bn_node: torch.fx.Node, src: torch.fx.Node) -> str:
        """Why ``F.conv1d/2d/3d`` or ``F.linear`` on parameters cannot take the BN in (empty: it can). Its weight
        and bias are folded in place, so each must be a ``get_attr`` read by this layer alone."""
        weight, bias = _functional_weight_bias(src)
        for what, arg in (("weight", weight), ("bias", bias)):
            if arg is None and what == "bias":
                continue
            if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
                if what == "weight" and fake_quantizer(gm, arg) is not None:  # BN after InsertQuantizers
                    return (f"the weight of {src.name} is already quantized (run FoldBatchNorm before "
                            "InsertQuantizers)")
                return f"the {what} of {src.name} is computed in forward, not a parameter"
            readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == arg.target]
            if len(readers) != 1 or len(arg.users) != 1:
                return f"the {what} of {src.name} ({arg.target}) is also used elsewhere; folding would change it there"
            owner = str(arg.target).rpartition(".")[0]
            if owner and any(n.op == "call_module" and n.target == owner for n in gm.graph.nodes):
                return f"the {what} of {src.name} belongs to {owner}, which is also called as a module"
        if len(src.users) != 1:
            others = ", ".join(u.name for u in src.users if u is not bn_node)
            return f"the output of {src.name} also feeds {others}"
        w = _get_attr_tensor(gm, weight)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            return f"the weight of {src.name} is not a float tensor"
        shape = getattr(src.meta.get("tensor_meta"), "shape", None)
        if src.target is F.linear and shape is not None and len(shape) != 2:
            return f"{src.name} output has shape {tuple(shape)}; BatchNorm1d normalises axis 1, not the features"
        num = gm.get_submodule(bn_node.target).num_features if bn_node.op == "call_module" else None
        if num is not None and num != w.shape[0]:
            return f"it has {num} channels but {src.name} has {w.shape[0]} outputs"
        return ""

    @staticmethod
    def _fold_functional(gm: torch.fx.GraphModule, node: torch.fx.Node, p: _BNParams) -> None:
        """``F.conv*/F.linear(x, W, b)`` then BN: W and b (a new zero bias wired into the call where there was
        none) become the folded ones, in place."""
        weight, bias = _functional_weight_bias(node)
        w = _get_attr_tensor(gm, weight)
        if bias is None:
            add_functional_bias(gm, node, str(weight.target), w.shape[0], w)
            _, bias = _functional_weight_bias(node)
        b = _get_attr_tensor(gm, bias)
        new_w, new_b = _folded(w, b, p)
        with torch.no_grad():
            w.copy_(new_w.to(w.dtype))
            b.copy_(new_b.to(b.dtype))

    @staticmethod
    def _fold(layer: nn.Module, p: _BNParams) -> None:
        with torch.no_grad():
            w = layer.weight.detach().double()
            dtype = layer.weight.dtype
            mean = p.mean.detach().double()
            inv_std = torch.rsqrt(p.var.detach().double() + p.eps)
            gamma = p.weight.detach().double() if p.weight is not None else torch.ones_like(mean)
            beta = p.bias.detach().double() if p.bias is not None else torch.zeros_like(mean)
            k = gamma * inv_std
            b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)
            if isinstance(layer, _TRANSPOSED):  # [in, out / groups, k...]: output channel g * (out / groups) + j
                groups = layer.groups
                shape = (groups, w.shape[0] // groups, w.shape[1]) + tuple(w.shape[2:])
                scale = k.reshape((groups, 1, w.shape[1]) + (1,) * (w.dim() - 2))
                new_w = (w.reshape(shape) * scale).reshape(w.shape)
            else:
                new_w = w * k.reshape((-1,) + (1,) * (w.dim() - 1))
            new_b = k * (b - mean) + beta
            layer.weight.copy_(new_w.to(dtype))
            if layer.bias is None:
                layer.bias = nn.Parameter(new_b.to(dtype), requires_grad=layer.weight.requires_grad)
            else:
                layer.bias.copy_(new_b.to(layer.bias.dtype))

    @staticmethod
    def _drop_module_if_unused(gm: torch.fx.GraphModule, target: str) -> None:
        if any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
            return  # the same BN module is also called elsewhere
        gm.delete_submodule(target)


__all__ = ["FoldBatchNorm", "ChannelStats", "FOLDABLE_LAYERS", "BATCHNORMS"]
