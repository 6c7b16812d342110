"""FoldConstants: compute, once, what the model computes from its parameters alone.

A layer whose weight is computed in ``forward`` from parameters and buffers only (weight standardization as in
BiT's ``StdConv2d`` and NFNets' ``ScaledStdConv2d``, a learned gain times the weight, a reshape or transpose of a
stored matrix, a relative-position bias gathered from its table) traces into a chain of nodes that starts at
``get_attr`` nodes and reads no model input. At inference the chain gives the same tensor on every call, so this
pass evaluates it at compile time and puts the result in the graph as a parameter: the layer reads a ``get_attr``
weight like any other, and the quantization passes quantize it (before, such a layer stayed float).

    Before: ``w = get_attr(conv.weight); w2 = batch_norm(w.reshape(1, C, -1), ...).reshape_as(w);
    y = conv2d(x, w2, b)``
    After:  ``w2 = get_attr(conv.weight_folded); y = conv2d(x, w2, b)``  (the chain is gone)

A node is constant when it is a ``get_attr`` of a tensor or number, or a ``call_function``/``call_method``
whose node inputs are all constant, that is pure, not random and not in place, or a call of a stateless
``torch.nn`` module in eval mode (Linear, Conv, activations, norms: ``_PURE_MODULES``) on constant inputs (Swin-V2
computes its relative position bias with such an MLP on a coordinates table: the MLP's layers are folded into the
table it produces, not quantized as if they read activations). Each constant tensor that a
non-constant node reads is evaluated (the model's own arithmetic, in its dtype, under ``torch.no_grad``) and stored
next to the parameters it comes from (``<owner>.<name>_folded``, named after the largest parameter of that module;
on the root module as ``_folded_<i>`` when it comes from several modules), as an ``nn.Parameter`` that trains in
QAT when one of its sources did, else as a buffer. The user's model is not touched (the pipeline works on a traced
copy).
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

from .base import Pass, PassResult

# functions and methods that must run on every call: random draws, in-place updates, side effects
_RANDOM = {"bernoulli", "normal", "multinomial", "poisson", "rrelu", "gumbel_softmax", "fractional_max_pool1d",
           "fractional_max_pool2d", "fractional_max_pool3d", "native_dropout"}


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _foldable_op(node: torch.fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    name = _name(node.target).lower()
    if name.startswith("rand") or "dropout" in name or name in _RANDOM:  # F.normalize is not random
        return False
    if name.endswith("_") and not name.endswith("__"):  # in place (x.clamp_(), x.add_()): mutates its input
        return False
    if name in ("copy_", "set_", "requires_grad_", "item", "tolist", "numpy", "cpu", "cuda", "to"):
        return False  # leave device moves and Python conversions as the model wrote them
    return True


# torch.nn modules whose eval-mode forward is a pure function of its input and parameters: a chain of them applied to
# constants (Swin-V2's continuous position bias MLP on its coordinates table) is a constant too
_PURE_MODULES = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                 nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
                 nn.Softmax, nn.LogSoftmax, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d,
                 nn.BatchNorm3d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Embedding)


def _foldable_module(gm: torch.nn.Module, node: torch.fx.Node):
    """The module a ``call_module`` node calls, where it is one of ``_PURE_MODULES`` itself (not a subclass with
    another forward) in eval mode; else None."""
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(str(node.target))
    if type(mod) not in _PURE_MODULES or mod.training:
        return None
    return mod


def _attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class FoldConstants(Pass):
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        const: set[torch.fx.Node] = set()
        sources: dict[torch.fx.Node, set[str]] = {}  # constant node -> the get_attr targets it is computed from
        for node in graph.nodes:
            if node.op == "get_attr":
                value = _attr(gm, str(node.target))
                if isinstance(value, (torch.Tensor, int, float, bool)):
                    const.add(node)
                    sources[node] = {str(node.target)}
                continue
            mod = _foldable_module(gm, node)
            if mod is None and not _foldable_op(node):
                continue
            inputs = node.all_input_nodes
            if inputs and all(i in const for i in inputs):
                const.add(node)
                sources[node] = set().union(*(sources[i] for i in inputs))
                if mod is not None:  # the module's own parameters and buffers are sources too
                    sources[node] |= {f"{node.target}.{name}" for name, _ in
                                      list(mod.named_parameters()) + list(mod.named_buffers())}
        # the constant tensors a non-constant node reads, computed once
        boundary = [n for n in graph.nodes if n in const and n.op != "get_attr"
                    and any(u not in const for u in n.users)]
        if not boundary:
            return PassResult(gm, False)
        values: dict[torch.fx.Node, object] = {}
        with torch.no_grad():
            for node in graph.nodes:
                if node not in const:
                    continue
                if node.op == "get_attr":
                    values[node] = _attr(gm, str(node.target))
                    continue
                args = torch.fx.node.map_arg(node.args, lambda n: values[n])
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
                if node.op == "call_function":
                    values[node] = node.target(*args, **kwargs)
                elif node.op == "call_module":
                    values[node] = gm.get_submodule(str(node.target))(*args, **kwargs)
                else:
                    self_obj, *rest = args
                    values[node] = getattr(self_obj, node.target)(*rest, **kwargs)
        folded = 0
        for node in boundary:
            value = values[node]
            if not isinstance(value, torch.Tensor) or value.is_sparse:
                continue  # a size, a dtype, a Python number: computed at run time as before
            target = self._register(gm, node, value, sources[node])
            with graph.inserting_before(node):
                new = graph.get_attr(target)
            new.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "val")})
            node.replace_all_uses_with(new)
            folded += 1
        if not folded:
            return PassResult(gm, False)
        graph.eliminate_dead_code()
        self.report.append(f"folded {folded} tensor(s) computed from parameters alone")
        return PassResult(gm, True)

    def _register(self, gm: torch.fx.GraphModule, node: torch.fx.Node, value: torch.Tensor, srcs: set[str]) -> str:
        params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
        trainable = any(s in params and _attr(gm, s).requires_grad for s in srcs)
        tensor_srcs = sorted(s for s in srcs if isinstance(_attr(gm, s), torch.Tensor))
        owners = {t.rsplit(".", 1)[0] if "." in t else "" for t in tensor_srcs}
        if len(owners) == 1:  # one module's parameters (a weight and its gain): store it beside them, named
            owner_name = owners.pop()  # after the largest (the weight), so the layer keeps the module's name
            base = max(tensor_srcs, key=lambda t: _attr(gm, t).numel()).rsplit(".", 1)[-1]
        else:
            owner_name, base = "", "_folded"
        owner = gm.get_submodule(owner_name) if owner_name else gm
        attr, i = f"{base}_folded" if base != "_folded" else "_folded_0", 0
        while hasattr(owner, attr):
            i += 1
            attr = f"{base}_folded{i}" if base != "_folded" else f"_folded_{i}"
        data = value.detach().clone().contiguous()
        if trainable and data.is_floating_point():
            owner.register_parameter(attr, nn.Parameter(data, requires_grad=True))
        else:
            owner.register_buffer(attr, data)
        return f"{owner_name}.{attr}" if owner_name else attr
