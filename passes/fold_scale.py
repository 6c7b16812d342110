"""FoldConstantScale: fold a multiplication by constants into the Conv/Linear layer before or after it.

A layer's output times constants, one per output channel or one for all (NF-ResNet's ``out * alpha``, ConvNeXt's
layer scale ``x * gamma``, HGNetV2's learnable scale after the ReLU) is the layer with its weights and bias scaled:

    (W x + b) · k_j  =  (k_j W_j) x + k_j b_j

and, for ``k > 0``, through a ReLU or LeakyReLU between them (``relu(y) · k = relu(y · k)``). A tensor times one
positive constant that only layers read (NF-ResNet's ``relu(x) * beta`` before the next convolutions, through an
average or max pool) is the same as their weights scaled:

    W (x · k) + b  =  (k W) x + b      (zero padding stays zero)

Either way the multiplication leaves the graph: as a float ``Mul`` between the quantized layers it kept
onnxruntime's int8 chain from running through (nf_resnet26: 15 of them). The folded function is the float model's
up to float rounding. A multiplication is left alone where the layer is called from several places or shares its
weights, where its output has other readers, or where the constant is not a number or a parameter / buffer of one
value per output channel.

Before: ``y = conv(x); z = y * 0.2``      After: ``y = conv'(x)`` (conv' with 0.2 W, 0.2 b)
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .base import Pass, PassResult, add_functional_bias, attr_value, shared_with, stock_layer
from .fold_bn import _TRANSPOSED, FOLDABLE_LAYERS, _functional_weight_bias, _module_call_counts

_MUL = {operator.mul, torch.mul}
_DIV = {operator.truediv, torch.div}
_FUNCTIONAL_LAYERS = (F.conv1d, F.conv2d, F.conv3d, F.linear)
# between a tensor and the layers that read it: linear in it, and keep 0 at 0 (the average of k·x is k times it;
# a max-pool, a flatten or a reshape of k·x, k > 0, is k times theirs)
_THROUGH_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                    nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity,
                    nn.Dropout)
_THROUGH_FNS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.flatten, torch.reshape}
_THROUGH_METHODS = {"view", "reshape", "flatten", "contiguous"}
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU)  # f(k·y) = k·f(y) for k > 0


def _constant(gm, a) -> Optional[torch.Tensor]:
    """``a`` as a float64 tensor when it is a number or a float parameter / buffer (``get_attr``)."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return torch.tensor(float(a), dtype=torch.float64)
    if isinstance(a, torch.fx.Node) and a.op == "get_attr":
        try:
            value = attr_value(gm, a)
        except AttributeError:
            return None
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() >= 1:
            return value.detach().double()
    return None


def _scaling(gm, node) -> Optional[tuple[torch.fx.Node, torch.Tensor]]:
    """``(x, k)`` when ``node`` is ``x * k``, ``k * x`` or ``x / k`` with a constant ``k``, else None."""
    if node.op == "call_function" and node.target in _MUL | _DIV:
        div = node.target in _DIV
    elif node.op == "call_method" and node.target in ("mul", "div"):
        div = node.target == "div"
    else:
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    kb = _constant(gm, b)
    if isinstance(a, torch.fx.Node) and kb is not None and _constant(gm, a) is None:
        return a, (1.0 / kb if div else kb)
    ka = _constant(gm, a)
    if not div and isinstance(b, torch.fx.Node) and ka is not None and kb is None:
        return b, ka
    return None


def _is_homogeneous(gm, node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _HOMOGENEOUS)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, F.leaky_relu)
    return node.op == "call_method" and node.target == "relu"


def _is_through(gm, node, positive: bool) -> bool:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            return positive and not mod.return_indices
        return isinstance(mod, _THROUGH_MODULES)
    if node.op == "call_function":
        if node.target in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
            return positive and not node.kwargs.get("return_indices", False) and len(node.args) < 7
        return node.target in _THROUGH_FNS
    return node.op == "call_method" and node.target in _THROUGH_METHODS


class FoldConstantScale(Pass):
    """Fold multiplications by constants into the Conv/Linear layers around them (see the module docstring)."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        counts = _module_call_counts(gm)
        changed = False
        for node in list(gm.graph.nodes):
            found = _scaling(gm, node)
            if found is None:
                continue
            x, k = found
            if not bool(torch.isfinite(k).all()) or bool((k == 0).any()):
                continue
            if self._fold_into_producer(gm, node, x, k, counts) or self._fold_into_readers(gm, node, x, k, counts):
                node.replace_all_uses_with(x)
                gm.graph.erase_node(node)
                changed = True
        if changed:
            gm.graph.lint()
        return PassResult(gm, changed)

    # -- the layer before ----------------------------------------------------------------------------------------
    def _fold_into_producer(self, gm, node, x, k, counts) -> bool:
        layer_node, through = x, None
        if _is_homogeneous(gm, x) and x.args and isinstance(x.args[0], torch.fx.Node) and len(x.users) == 1:
            if not bool((k > 0).all()):
                return False
            layer_node, through = x.args[0], x
        if len(layer_node.users) != 1:
            return False
        out = self._out_channels(gm, layer_node, counts)
        if out is None:
            return False
        shape = getattr(node.meta.get("tensor_meta"), "shape", None)
        per_channel = self._per_channel(k, out, shape, linear=self._is_linear(gm, layer_node))
        if per_channel is None:
            return False
        self._scale_outputs(gm, layer_node, per_channel)
        stats = layer_node.meta.get("output_stats")
        if stats is not None and bool((per_channel > 0).all()):
            layer_node.meta["output_stats"] = stats.scaled(per_channel.float())
        elif stats is not None:
            del layer_node.meta["output_stats"]
        what = "per channel" if per_channel.numel() > 1 and not bool((per_channel == per_channel[0]).all()) else \
            f"{float(per_channel[0]):.4g}"
        self.report.append(f"folded {node.name} ({what}) into {self._describe(layer_node)}"
                           f"{' through ' + through.name if through is not None else ''}")
        return True

    @staticmethod
    def _per_channel(k: torch.Tensor, out: int, shape, linear: bool) -> Optional[torch.Tensor]:
        """``k`` as ``out`` factors, one per output channel, when it broadcasts that way over the layer output."""
        if k.numel() == 1:
            return k.reshape(1).expand(out).clone()
        if k.numel() != out or shape is None:
            return None
        dims = [d for d in range(k.dim()) if k.shape[d] != 1]
        if len(dims) != 1:
            return None
        axis_from_end = k.dim() - dims[0]  # the constant's channel axis, counted from the last one
        channel_axis = len(shape) - 1 if linear else 1
        if len(shape) - axis_from_end != channel_axis:
            return None
        return k.reshape(-1).clone()

    # -- the layers after ----------------------------------------------------------------------------------------
    def _fold_into_readers(self, gm, node, x, k, counts) -> bool:
        if k.numel() != 1:
            return False
        positive = float(k) > 0
        layers: list[torch.fx.Node] = []
        todo = list(node.users)
        while todo:
            user = todo.pop()
            if self._out_channels(gm, user, counts) is not None and user.args and user.args[0] is not None and \
                    self._reads_as_input(user, node if user in node.users else None):
                layers.append(user)
            elif _is_through(gm, user, positive) and user.users and len(user.all_input_nodes) == 1:
                todo.extend(user.users)
            else:
                return False
        if not layers:
            return False
        for layer_node in layers:
            self._scale_inputs(gm, layer_node, float(k))
        self.report.append(f"folded {node.name} ({float(k):.4g}) into the layers reading it: "
                           f"{', '.join(self._describe(n) for n in layers)}")
        return True

    @staticmethod
    def _reads_as_input(layer_node, scaled) -> bool:
        """The layer reads the scaled tensor (or what the pools made of it) as its input, not as its weight."""
        if scaled is None:
            return True  # reached through a pool or reshape, which is the layer's input
        others = list(layer_node.args[1:]) + list(layer_node.kwargs.values())
        return layer_node.args[0] is scaled and scaled not in others

    # -- layers ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _is_linear(gm, node) -> bool:
        if node.op == "call_module":
            return isinstance(gm.get_submodule(node.target), nn.Linear)
        return node.target is F.linear

    @staticmethod
    def _describe(node) -> str:
        return str(node.target) if node.op == "call_module" else node.name

    @staticmethod
    def _out_channels(gm, node, counts) -> Optional[int]:
        """The output channels of a layer whose weights this pass may scale in place, else None."""
        if node.op == "call_module":
            layer = gm.get_submodule(node.target)
            if not isinstance(layer, FOLDABLE_LAYERS) or not stock_layer(layer) or counts.get(node.target, 0) != 1:
                return None
            if shared_with(gm, node.target) or not layer.weight.is_floating_point():
                return None
            if isinstance(layer, nn.Linear):
                return layer.out_features
            return layer.out_channels
        if node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
            weight, bias = _functional_weight_bias(node)
            for arg in (weight, bias):
                if arg is None:
                    continue
                if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr") or len(arg.users) != 1:
                    return None
                if sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == arg.target) != 1:
                    return None
                owner = str(arg.target).rpartition(".")[0]
                if owner and any(n.op == "call_module" and n.target == owner for n in gm.graph.nodes):
                    return None
            w = attr_value(gm, weight) if weight is not None else None
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                return None
            return int(w.shape[0])
        return None

    @staticmethod
    def _scale_outputs(gm, layer_node, k: torch.Tensor) -> None:
        """Output channel j's weights and bias times ``k[j]``."""
        if layer_node.op == "call_module":
            layer = gm.get_submodule(layer_node.target)
            w = layer.weight.detach().double()
            if isinstance(layer, _TRANSPOSED):  # [in, out / groups, ...]: output channel g * (out / groups) + j
                groups = layer.groups
                scale = k.reshape((groups, 1, w.shape[1]) + (1,) * (w.dim() - 2))
                new_w = (w.reshape((groups, w.shape[0] // groups) + tuple(w.shape[1:])) * scale).reshape(w.shape)
            else:
                new_w = w * k.reshape((-1,) + (1,) * (w.dim() - 1))
            with torch.no_grad():
                layer.weight.copy_(new_w.to(layer.weight.dtype))
                if layer.bias is not None:
                    layer.bias.copy_((layer.bias.detach().double() * k).to(layer.bias.dtype))
            return
        weight, bias = _functional_weight_bias(layer_node)
        w = attr_value(gm, weight)
        with torch.no_grad():
            w.copy_((w.detach().double() * k.reshape((-1,) + (1,) * (w.dim() - 1))).to(w.dtype))
            if bias is not None:
                b = attr_value(gm, bias)
                b.copy_((b.detach().double() * k).to(b.dtype))

    @staticmethod
    def _scale_inputs(gm, layer_node, k: float) -> None:
        """The layer's weights times ``k`` (its input is ``k`` times smaller now); the bias stays."""
        if layer_node.op == "call_module":
            w = gm.get_submodule(layer_node.target).weight
        else:
            w = attr_value(gm, _functional_weight_bias(layer_node)[0])
        with torch.no_grad():
            w.copy_((w.detach().double() * k).to(w.dtype))


__all__ = ["FoldConstantScale"]
