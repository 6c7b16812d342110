"""Cleanup passes needed by every path, the float one included.

- ``EliminateDeadCode``: remove nodes whose values nobody uses and that have no side effects
  (``Graph.eliminate_dead_code``), then drop submodules no node refers to.
- ``RemoveIdentity``: ``nn.Identity``, eval-mode ``nn.Dropout*`` and torchvision's eval-mode ``stochastic_depth``
  calls are the identity: x -> x.
  Before: ``y = dropout(x); z = f(y)``  After: ``z = f(x)``.
- ``ConstantMetadataReads``: reads of a tensor's dtype (``x.dtype``, ``x.is_floating_point()``), and of its rank
  (``x.ndim``, ``x.dim()``) where only ``torch._assert`` checks it, as the constants the trace fixed. timm's
  ``BatchNormAct2d`` starts with ``_assert(x.ndim == 4)``: that read was a second user of the conv's output, and
  FoldBatchNorm left 55 of 55 BatchNorms of cspresnet50 unfolded (float between the int8 layers).
  Before: ``n = getattr(y, "ndim"); ok = n == 4``  After: ``ok = 4 == 4``.
- ``DecomposeAdaptivePool``: adaptive average/max pools whose output size does not divide the input size (VGG's
  7x7 pool on a 160x160 image), which torch.onnx cannot export, as the mean/max of each of their fixed bins.
- ``DecomposeRMSNorm``: ``nn.RMSNorm`` / ``F.rms_norm``, which torch.onnx cannot export (``aten::rms_norm`` has no
  symbolic up to opset 20), as the ops of its definition: ``x * rsqrt(mean(x², dims) + eps) * weight``.
- ``DecomposeAvgPoolDivisor``: an average pool with ``divisor_override``, which torch.onnx exports as a plain
  average pool (the divisor lost), as the pool counting pads times ``prod(kernel) / divisor``.
- ``MatmulAsLinear`` (quantized path only): ``x @ W`` with a 2-D parameter ``W`` as ``F.linear(x, W.t())``, the
  layer it is (FoldConstants then stores ``W.t()``), so that it is quantized and listed like a Linear.
- ``MeanAsGlobalPool`` (quantized path only): ``x.mean((2, 3))`` of a 4-D tensor (the hand-written global pool of a
  classifier head) as ``F.adaptive_avg_pool2d(x, 1)`` (then ``flatten(1)`` without ``keepdim``), the pool that
  the int8 region runs on codes (``QLinearGlobalAveragePool``); a ReduceMean ran in float between
  ``DequantizeLinear`` and ``QuantizeLinear``, and kept the SiLU before it float too.
- ``DecomposeCubicDownscale`` (quantized path only): a bicubic resize that shrinks an axis, which onnxruntime's
  optimized session refuses between int8 layers, as the two constant matrix products it is: ``A_h @ x @ A_w^T``.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .base import Pass, PassResult

_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_IDENTITY_FUNCTIONS = {torch.nn.functional.dropout}


def _is_stochastic_depth(target) -> bool:
    return getattr(target, "__name__", None) == "stochastic_depth" and \
        getattr(target, "__module__", "").startswith("torchvision.")


class EliminateDeadCode(Pass):
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        removed = before - len(gm.graph.nodes)
        # delete_all_unused_submodules keeps parents of used modules; only count real removals.
        names_before = {name for name, _ in gm.named_modules()}
        gm.delete_all_unused_submodules()
        names_after = {name for name, _ in gm.named_modules()}
        dropped = names_before - names_after
        if removed:
            self.report.append(f"removed {removed} dead node(s)")
        if dropped:
            self.report.append(f"dropped {len(dropped)} unused submodule(s)")
        return PassResult(gm, bool(removed or dropped))


_RANK_AND_DTYPE = {"ndim": lambda m: len(m.shape), "dtype": lambda m: m.dtype}
_RANK_AND_DTYPE_METHODS = {"dim": lambda m: len(m.shape), "ndimension": lambda m: len(m.shape),
                           "is_floating_point": lambda m: m.dtype.is_floating_point,
                           "is_complex": lambda m: m.dtype.is_complex}


_RANKS = ("ndim", "dim", "ndimension")
_CHECKS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
           operator.or_, operator.not_, operator.truth}


def _only_asserted(node: torch.fx.Node) -> bool:
    """Whether every use of ``node`` ends in the condition of a ``torch._assert``, through comparisons."""
    todo, seen = list(node.users), set()
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op != "call_function":
            return False
        if user.target is torch._assert:  # the check itself: it computes nothing
            continue
        if user.target not in _CHECKS or not user.users:
            return False
        todo.extend(user.users)
    return bool(seen)


class ConstantMetadataReads(Pass):
    """``x.dtype``, ``x.is_floating_point()`` of a traced tensor, and ``x.ndim``/``x.dim()`` where only a
    ``torch._assert`` checks them, as constants (from the trace's ShapeProp metadata). As nodes they were users of
    ``x`` that kept FoldBatchNorm (and the integer region) from seeing a layer's output read once. A rank that the
    model computes with stays a read: it can follow the batch (``h.squeeze()`` of a (1, C) example is 1-D; as a
    constant the file took a softmax over the batch, and validation, comparing it with the same graph, passed)."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        count = 0
        for node in list(gm.graph.nodes):
            src = node.args[0] if node.args else None
            meta = src.meta.get("tensor_meta") if isinstance(src, torch.fx.Node) else None
            if meta is None or not hasattr(meta, "shape") or node.kwargs:
                continue
            if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and \
                    node.args[1] in _RANK_AND_DTYPE:
                what, value = node.args[1], _RANK_AND_DTYPE[node.args[1]](meta)
            elif node.op == "call_method" and node.target in _RANK_AND_DTYPE_METHODS and len(node.args) == 1:
                what, value = node.target, _RANK_AND_DTYPE_METHODS[node.target](meta)
            else:
                continue
            if what in _RANKS and not _only_asserted(node):
                # a rank can follow the batch (h.squeeze() of a (1, C) example is 1-D): only a check that
                # torch._assert makes of it is folded (it computes nothing); dtypes do not change with the batch
                continue
            for user in list(node.users):
                user.args = torch.fx.node.map_aggregate(user.args, lambda a: value if a is node else a)
                user.kwargs = torch.fx.node.map_aggregate(user.kwargs, lambda a: value if a is node else a)
            if not node.users:
                gm.graph.erase_node(node)
                count += 1
        if count:
            self.report.append(f"{count} read(s) of a tensor's rank or dtype made constants")
        return PassResult(gm, bool(count))


def _adds_zero(node):
    """The tensor of ``0 + x`` / ``x + 0`` (an integer 0: the dtype stays x's), else None. A sum started at 0 and
    added to in a loop (timm MobileOne: ``out = 0; out += conv(x)`` for each branch) traced as such an add, which
    the int8 region took for a float operand: 82 of its 99 branch sums ran in float."""
    if node.op != "call_function" or node.target not in (operator.add, operator.iadd, torch.add) or node.kwargs \
            or len(node.args) != 2:
        return None
    a, b = node.args
    for zero, x in ((a, b), (b, a)):
        meta = x.meta.get("tensor_meta") if isinstance(x, torch.fx.Node) else None
        if type(zero) is int and zero == 0 and hasattr(meta, "shape") and meta.dtype is not torch.bool:
            return x  # (a bool tensor plus 0 is int64)
    return None


_CATS = (torch.cat, torch.concat, torch.concatenate)


def _drop_empty_cat_inputs(gm: torch.fx.GraphModule, node) -> bool:
    """Take out of ``torch.cat`` the constant 1-D empty tensors that torch skips beside tensors of higher rank (a
    key/value cache started empty: transformers 5's GPT-2 without an attention mask concatenated each layer's keys
    to a ``tensor([])``): torch.onnx refused the rank mismatch with an AssertionError. True where it changed."""
    if node.op != "call_function" or node.target not in _CATS or not node.args:
        return False
    tensors = node.args[0] if "tensors" not in node.kwargs else node.kwargs["tensors"]
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
        return False
    from .base import attr_value

    def empty(t) -> bool:
        if not isinstance(t, torch.fx.Node) or t.op != "get_attr":
            return False
        value = attr_value(gm, t)
        return isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == 0

    kept = [t for t in tensors if not empty(t)]
    ranked = [getattr(t.meta.get("tensor_meta"), "shape", None) for t in kept if isinstance(t, torch.fx.Node)]
    if len(kept) == len(tensors) or not kept or not any(r is not None and len(r) > 1 for r in ranked):
        return False
    if len(kept) == 1:  # cat([empty, x]) is x
        node.replace_all_uses_with(kept[0])
        node.graph.erase_node(node)
        return True
    if "tensors" in node.kwargs:
        node.kwargs = {**node.kwargs, "tensors": type(tensors)(kept)}
    else:
        node.args = (type(tensors)(kept),) + tuple(node.args[1:])
    return True


class RemoveIdentity(Pass):
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        caches = sum(_drop_empty_cat_inputs(gm, node) for node in list(gm.graph.nodes))
        if caches:
            self.report.append(f"dropped empty tensors from {caches} concatenation(s) (an empty cache)")
        matches = []
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _IDENTITY_MODULES):
                if not gm.get_submodule(node.target).training:
                    matches.append(node)
            elif node.op == "call_function" and node.target in _IDENTITY_FUNCTIONS:
                training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
                if training is False:
                    matches.append(node)
            elif node.op == "call_function" and _is_stochastic_depth(node.target):
                # torchvision's stochastic_depth(input, p, mode, training), a leaf of its trace: in eval mode the
                # identity. Left in, each residual add of EfficientNet / ConvNeXt read a value the int8 region did
                # not see through (EfficientNet-B0: 7 of 9 adds in float between DequantizeLinear and QuantizeLinear)
                args = dict(zip(("input", "p", "mode", "training"), node.args), **node.kwargs)
                if args.get("training", True) is False or args.get("p") == 0:
                    matches.append(node)
            elif _adds_zero(node) is not None:
                matches.append(node)
        for node in matches:
            node.replace_all_uses_with(_adds_zero(node) or node.args[0])
            gm.graph.erase_node(node)
        if matches:
            self.report.append(f"removed {len(matches)} identity/dropout node(s)")
            gm.delete_all_unused_submodules()
        if caches:
            gm.graph.eliminate_dead_code()
        return PassResult(gm, bool(matches) or bool(caches))


_RMS_NORM_FUNCTIONS = {F.rms_norm, torch.rms_norm}


_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


class DecomposeGroupedQueryAttention(Pass):
    """``scaled_dot_product_attention(q, k, v, enable_gqa=True)`` as the same call on keys and values repeated to
    the query heads (``k.repeat_interleave(Hq // Hkv, dim=-3)``: PyTorch's definition of ``enable_gqa``).
    torch.onnx has no conversion for ``enable_gqa`` ("not implemented if enable_gqa is True"): Llama, Mistral and
    Qwen2 with fewer key/value heads than query heads, compiled without an attention mask (transformers 5.25 then
    passes no mask and lets the kernel group the heads), stopped there with advice to rewrite transformers."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        count = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _SDPA or node.kwargs.get("enable_gqa") is not True \
                    or len(node.args) < 3:
                continue
            q, k, v = node.args[:3]
            shapes = [getattr(t.meta.get("tensor_meta"), "shape", None) if isinstance(t, torch.fx.Node) else None
                      for t in (q, k, v)]
            if any(sh is None or len(sh) < 3 for sh in shapes):
                continue
            hq, hk, hv = (int(sh[-3]) for sh in shapes)
            if hk != hv or hk == 0 or hq % hk:
                continue
            with gm.graph.inserting_before(node):
                if hq != hk:
                    k = gm.graph.call_method("repeat_interleave", (k, hq // hk), {"dim": -3})
                    v = gm.graph.call_method("repeat_interleave", (v, hq // hk), {"dim": -3})
                kwargs = {key: val for key, val in node.kwargs.items() if key != "enable_gqa"}
                out = gm.graph.call_function(node.target, (q, k, v) + tuple(node.args[3:]), kwargs)
            _replace(node, out)
            count += 1
        return _finish(self, gm, count, "grouped-query attention(s) as attention on repeated key/value heads")


class DecomposeRMSNorm(Pass):
    """``nn.RMSNorm`` modules and ``F.rms_norm`` calls as ``pow``, ``mean``, ``add``, ``rsqrt`` and ``mul`` nodes
    (PyTorch's own formula; ``eps=None`` is the float32 machine epsilon, as PyTorch takes it for float32 inputs).
    The weight stays the module's parameter (read with ``get_attr``)."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        count = 0
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.RMSNorm):
                mod = gm.get_submodule(node.target)
                x, shape, eps = node.args[0], tuple(mod.normalized_shape), mod.eps
                weight = f"{node.target}.weight" if mod.weight is not None else None
            elif node.op == "call_function" and node.target in _RMS_NORM_FUNCTIONS:
                args = dict(zip(("input", "normalized_shape", "weight", "eps"), node.args), **node.kwargs)
                x, shape = args["input"], args["normalized_shape"]
                shape = (shape,) if isinstance(shape, int) else tuple(shape)
                weight, eps = args.get("weight"), args.get("eps")
            else:
                continue
            eps = torch.finfo(torch.float32).eps if eps is None else float(eps)
            dims = tuple(range(-len(shape), 0))
            g = gm.graph
            with g.inserting_before(node):
                ms = g.call_method("mean", (g.call_method("pow", (x, 2)), dims), {"keepdim": True})
                out = g.call_function(torch.mul, (x, g.call_function(torch.rsqrt, (g.call_function(
                    torch.add, (ms, eps)),))))
                if isinstance(weight, str):
                    weight = g.get_attr(weight)
                if weight is not None:
                    out = g.call_function(torch.mul, (out, weight))
            _replace(node, out)
            count += 1
        return _finish(self, gm, count, "RMSNorm(s)")


class DecomposeUnexportable(Pass):
    """torch.nn layers torch.onnx's exporter refuses, as operations it exports (each exact):

    - ``nn.ChannelShuffle`` / ``F.channel_shuffle(x, g)`` ("aten::channel_shuffle not supported"): ``x.unflatten(1,
      (g, -1)).transpose(1, 2).flatten(1, 2)`` (ShuffleNet's own view/transpose form, with no size of the example);
    - ``nn.Threshold(t, v)`` / ``F.threshold`` other than ReLU's (t = v = 0; "non-zero threshold"):
      ``torch.where(x > t, x, v)``;
    - ``nn.Bilinear`` / ``F.bilinear`` ("aten::bilinear not supported"): ``einsum('...i,oij,...j->...o', x1, W, x2)``
      plus the bias. It stays float (no quantizer reads an einsum's parameter);
    - ``nn.EmbeddingBag`` on 2-D ids (one bag per row; no offsets, per-sample weights, padding index or max_norm),
      which torch.onnx writes as a ``Loop``: an ``nn.Embedding`` of the same name and weight, then ``sum``/``mean``/
      ``amax`` over dim 1."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        count = 0
        g = gm.graph
        calls: dict = {}
        for node in g.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.EmbeddingBag):
                calls.setdefault(node.target, []).append(node)
        # the bags every call of which is one bag per row (a bag also called with offsets stays as it is)
        bags = {t: gm.get_submodule(t) for t, nodes in calls.items()
                if all(_plain_bag(n, gm.get_submodule(t)) for n in nodes)}
        for node in list(g.nodes):
            mod = gm.get_submodule(node.target) if node.op == "call_module" else None
            fn = node.target if node.op == "call_function" else None
            if isinstance(mod, nn.ChannelShuffle) or fn in _CHANNEL_SHUFFLES:
                x = node.args[0]
                groups = mod.groups if mod is not None else (node.args[1] if len(node.args) > 1
                                                             else node.kwargs.get("groups"))
                if not isinstance(groups, int):
                    continue
                with g.inserting_before(node):
                    out = g.call_method("flatten", (g.call_method("transpose", (
                        g.call_method("unflatten", (x, 1, (groups, -1))), 1, 2)), 1, 2))
            elif isinstance(mod, nn.Threshold) or fn is F.threshold:
                if mod is not None:
                    x, t, v = node.args[0], mod.threshold, mod.value
                else:
                    args = dict(zip(("input", "threshold", "value"), node.args), **node.kwargs)
                    x, t, v = args["input"], args.get("threshold"), args.get("value")
                if not isinstance(t, (int, float)) or not isinstance(v, (int, float)) or (t == 0 and v == 0):
                    continue  # ReLU's: torch.onnx writes Relu
                with g.inserting_before(node):
                    out = g.call_function(torch.where, (g.call_function(operator.gt, (x, float(t))), x, float(v)))
            elif isinstance(mod, nn.Bilinear) or fn is F.bilinear:
                if mod is not None:
                    x1, x2 = node.args[0], node.args[1]
                    with g.inserting_before(node):
                        weight = g.get_attr(f"{node.target}.weight")
                        bias = g.get_attr(f"{node.target}.bias") if mod.bias is not None else None
                else:
                    args = dict(zip(("input1", "input2", "weight", "bias"), node.args), **node.kwargs)
                    x1, x2, weight, bias = args["input1"], args["input2"], args["weight"], args.get("bias")
                with g.inserting_before(node):
                    out = g.call_function(torch.einsum, ("...i,oij,...j->...o", x1, weight, x2))
                    if bias is not None:
                        out = g.call_function(torch.add, (out, bias))
            elif node.op == "call_module" and node.target in bags:
                # one bag per row of 2-D ids: an Embedding (same name, same weight Parameter) and the bag's
                # reduction over the row. torch.onnx wrote the bag as a Loop (onnxruntime warned on every load,
                # and the table stayed float, not a layer); the Embedding is a table like any other. A bag called
                # at several places is replaced once and reduced at each
                mod = bags[node.target]
                if isinstance(gm.get_submodule(node.target), nn.EmbeddingBag):
                    emb = nn.Embedding(mod.num_embeddings, mod.embedding_dim)
                    emb.weight = mod.weight
                    gm.add_submodule(str(node.target), emb)
                meta = node.meta.get("tensor_meta")
                ids = node.args[0].meta["tensor_meta"].shape
                with g.inserting_after(node):
                    out = g.call_method({"sum": "sum", "mean": "mean", "max": "amax"}[mod.mode], (node, 1))
                node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
                if meta is not None:
                    out.meta["tensor_meta"] = meta
                    shape = torch.Size([ids[0], ids[1], mod.embedding_dim])
                    node.meta["tensor_meta"] = meta._replace(shape=shape, stride=(ids[1] * shape[2], shape[2], 1))
                node.meta.pop("val", None)
                count += 1
                continue
            else:
                continue
            _replace(node, out)
            count += 1
        return _finish(self, gm, count, "layer(s) torch.onnx cannot export well (channel shuffle, threshold, "
                                        "bilinear, bag of embeddings)")


def _plain_bag(node: torch.fx.Node, mod: nn.EmbeddingBag) -> bool:
    """``bag(ids)`` on 2-D integer ids (one bag per row), no offsets or per-sample weights, no padding index or
    max_norm (which change what a bag sums): what an Embedding and a reduction over dim 1 compute."""
    ids = node.args[0] if node.args else None
    meta = ids.meta.get("tensor_meta") if isinstance(ids, torch.fx.Node) else None
    extra = list(node.args[1:]) + list(node.kwargs.values())
    return hasattr(meta, "shape") and len(meta.shape) == 2 and not meta.dtype.is_floating_point and \
        all(v is None for v in extra) and mod.padding_idx is None and mod.max_norm is None and \
        mod.mode in ("sum", "mean", "max")


_CHANNEL_SHUFFLES = {F.channel_shuffle, torch.channel_shuffle} if hasattr(F, "channel_shuffle") else \
    {torch.channel_shuffle}


def _replace(node: torch.fx.Node, out: torch.fx.Node) -> None:
    """``out`` (the last node of a decomposition) takes ``node``'s place, shape metadata included."""
    out.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "val")})
    node.replace_all_uses_with(out)
    node.graph.erase_node(node)


def _finish(p: Pass, gm: torch.fx.GraphModule, count: int, what: str) -> PassResult:
    if count:
        gm.delete_all_unused_submodules()
        p.report.append(f"decomposed {count} {what}")
    return PassResult(gm, bool(count))


_ADAPTIVE_MODULES = {nn.AdaptiveAvgPool1d: ("mean", 1), nn.AdaptiveAvgPool2d: ("mean", 2),
                     nn.AdaptiveMaxPool1d: ("amax", 1), nn.AdaptiveMaxPool2d: ("amax", 2)}
_ADAPTIVE_FUNCTIONS = {F.adaptive_avg_pool1d: ("mean", 1), F.adaptive_avg_pool2d: ("mean", 2),
                       F.adaptive_max_pool1d: ("amax", 1), F.adaptive_max_pool2d: ("amax", 2)}


# gm.meta: the adaptive pools DecomposeAdaptivePool wrote for the example's input size (a pool of its kernel, or
# reductions over its bins): a file of them computes the model at that size only (compile's --dynamic-axes refuses)
FIXED_SIZE_POOLS = "qcompile.fixed_size_pools"


def _adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling bins: ``[floor(i·size/out), ceil((i+1)·size/out))`` for each output index."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def _area_resize(node):
    """``F.interpolate(x, size | scale_factor, mode="area")`` of a 3-D or 4-D input as ``(("mean", dims), size)``:
    size is a list, or for a scale factor a function of the input's spatial sizes (floor(size · factor), as
    PyTorch computes it); None for any other call (another mode, options "area" ignores set otherwise)."""
    names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
    args = dict(zip(names, node.args), **node.kwargs)
    if args.get("mode") != "area" or args.get("recompute_scale_factor") or args.get("antialias"):
        return None
    meta = getattr(args.get("input"), "meta", {}).get("tensor_meta")
    rank = len(getattr(meta, "shape", ()))
    if rank not in (3, 4):
        return None
    dims = rank - 2
    size, factor = args.get("size"), args.get("scale_factor")
    if size is not None:
        return ("mean", dims), list(size) if isinstance(size, (tuple, list)) else [size] * dims
    if factor is None:
        return None
    factors = list(factor) if isinstance(factor, (tuple, list)) else [factor] * dims
    return ("mean", dims), lambda sizes: [int(math.floor(sz * f)) for sz, f in zip(sizes, factors)]


class DecomposeAdaptivePool(Pass):
    """Adaptive average/max pools (1-D and 2-D) whose output size does not divide the input size, as one
    ``mean``/``amax`` per bin of PyTorch's adaptive bins, joined with ``cat``: torch.onnx exports adaptive pools
    only where every bin has the same size. ``F.interpolate(mode="area")``, which PyTorch computes as an adaptive
    average pool, too (and always when given a scale factor, which torch.onnx does not export). Needs the input's shape (``tensor_meta``, recorded by ``trace`` with
    example inputs); pools that export as they are, and pools of unknown input size, are left alone. Max pools that
    also return indices are left alone."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        count = 0
        for node in list(gm.graph.nodes):
            kind, by_factor = None, False
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                kind = _ADAPTIVE_MODULES.get(type(mod))
                out_size = getattr(mod, "output_size", None)
                if getattr(mod, "return_indices", False):
                    continue
            elif node.op == "call_function" and node.target in _ADAPTIVE_FUNCTIONS:
                kind = _ADAPTIVE_FUNCTIONS[node.target]
                out_size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
                if (node.args[2] if len(node.args) > 2 else node.kwargs.get("return_indices", False)) is not False:
                    continue
            elif node.op == "call_function" and node.target is F.interpolate and _area_resize(node) is not None:
                kind, out_size = _area_resize(node)  # PyTorch computes "area" as an adaptive average pool
            if kind is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
                continue
            reduce, dims = kind
            meta = node.args[0].meta.get("tensor_meta")
            shape = getattr(meta, "shape", None)
            if shape is None or len(shape) < dims:
                continue
            by_factor = callable(out_size)  # a scale factor: torch.onnx exports no "area" resize by a factor
            if by_factor:  # the output size follows from the input's
                out_size = out_size([int(v) for v in shape[-dims:]])
            sizes = [int(v) for v in shape[-dims:]]
            outs = list(out_size) if isinstance(out_size, (tuple, list)) else [out_size] * dims
            outs = [sz if o is None else int(o) for o, sz in zip(outs, sizes)]
            x, g = node.args[0], gm.graph
            if all(sz % o == 0 for sz, o in zip(sizes, outs)) and not by_factor:
                if all(o == 1 for o in outs):
                    continue  # a global pool: torch.onnx exports it as one (GlobalAveragePool / GlobalMaxPool)
                # equal bins: the pool torch.onnx would write, written here, where the sizes are known (behind a
                # reflect/replicate pad torch.onnx could not read them: "input size not accessible")
                kernel = [sz // o for sz, o in zip(sizes, outs)]
                pool = {("mean", 1): F.avg_pool1d, ("mean", 2): F.avg_pool2d,
                        ("amax", 1): F.max_pool1d, ("amax", 2): F.max_pool2d}[kind]
                with g.inserting_before(node):
                    out = g.call_function(pool, (x, kernel, kernel))
                out.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "val")})
                gm.meta.setdefault(FIXED_SIZE_POOLS, []).append(_pool_name(node))
                _replace(node, out)
                count += 1
                continue
            with g.inserting_before(node):
                if dims == 1:
                    cells = [g.call_method(reduce, (g.call_function(operator.getitem, (x, (Ellipsis, slice(a, b)))),
                                                    -1), {"keepdim": True}) for a, b in _adaptive_bins(sizes[0], outs[0])]
                    out = g.call_function(torch.cat, (cells, -1))
                else:
                    rows = []
                    for h0, h1 in _adaptive_bins(sizes[0], outs[0]):
                        band = g.call_function(operator.getitem, (x, (Ellipsis, slice(h0, h1), slice(None))))
                        cells = [g.call_method(reduce, (g.call_function(operator.getitem, (
                            band, (Ellipsis, slice(w0, w1)))), (-2, -1)), {"keepdim": True})
                            for w0, w1 in _adaptive_bins(sizes[1], outs[1])]
                        rows.append(g.call_function(torch.cat, (cells, -1)))
                    out = g.call_function(torch.cat, (rows, -2))
            gm.meta.setdefault(FIXED_SIZE_POOLS, []).append(_pool_name(node))
            _replace(node, out)
            count += 1
        return _finish(self, gm, count, "adaptive pool(s) as pools or per-bin reductions")


def _pool_name(node: torch.fx.Node) -> str:
    """The module name of an adaptive pool (or the function and its output size), for messages."""
    if node.op == "call_module":
        return f"{node.target} (adaptive pool)"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name}({', '.join(str(a) for a in node.args[1:2])})" if len(node.args) > 1 else name


def _cubic_call(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """The resize ``node`` computes as a function of its input alone, for a bicubic ``F.interpolate`` call or
    ``nn.Upsample`` module of a 4-D input; None for anything else (another mode, a size computed in the graph)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Upsample) and mod.mode == "bicubic" and len(node.args) == 1 and not node.kwargs:
            return mod
        return None
    if node.op != "call_function" or node.target is not F.interpolate or not node.args:
        return None
    names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
    args = dict(zip(names, node.args), **node.kwargs)
    if args.get("mode") != "bicubic" or set(args) - set(names):
        return None
    rest = {k: v for k, v in args.items() if k != "input"}
    graph_values: list = []
    torch.fx.node.map_arg(tuple(rest.values()), graph_values.append)
    if graph_values:  # a size computed in the graph
        return None
    return lambda x: F.interpolate(x, **rest)


def _cubic_matrices(fn, h: int, w: int):
    """``(A_h, A_w)`` with ``fn(x) = A_h @ x @ A_w^T`` for every ``[N, C, h, w]`` input ``x``, read from ``fn``
    itself (float64) on one-hot rows and columns: PyTorch's own coordinates, clamping and antialias weights. None
    where ``fn`` is not that separable map (checked on a random input)."""
    def axis(n: int, along_h: bool) -> torch.Tensor:
        probe = torch.zeros(n, 1, h, w, dtype=torch.float64)
        idx = torch.arange(n)
        if along_h:
            probe[idx, 0, idx, :] = 1.0
        else:
            probe[idx, 0, :, idx] = 1.0
        out = fn(probe)[:, 0]                                 # [n, Ho, Wo]
        return (out[:, :, 0] if along_h else out[:, 0, :]).T  # [Ho, n] / [Wo, n]

    try:
        with torch.no_grad():
            a_h, a_w = axis(h, True), axis(w, False)
            x = torch.randn(2, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            ok = torch.allclose(a_h @ x @ a_w.T, fn(x), rtol=1e-9, atol=1e-9)
    except (RuntimeError, ValueError, TypeError):
        return None
    return (a_h, a_w) if ok else None


RESIZE_MATMUL = "qcompile_resize_matmul"


class DecomposeCubicDownscale(Pass):
    """A bicubic resize (``F.interpolate(mode="bicubic")``, ``nn.Upsample``) of a 4-D input that shrinks an
    axis, as ``matmul(matmul(A_h, x), A_w^T)`` with constant matrices: onnxruntime's optimized session runs a
    Resize between int8 layers in the NHWC layout, where it refuses cubic scales below 1 ("'Cubic' mode only
    supports ... other scales >= 1"). The matrices are read from PyTorch's own resize (float64, one-hot inputs), so
    the graph computes what the model does up to float rounding; the spatial sizes are the traced ones (a file's
    non-batch dimensions are fixed). Enlarging resizes, which onnxruntime runs, stay resizes."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        count = 0
        for node in list(gm.graph.nodes):
            fn = _cubic_call(gm, node)
            if fn is None or not isinstance(node.args[0], torch.fx.Node):
                continue
            src, dst = node.args[0].meta.get("tensor_meta"), node.meta.get("tensor_meta")
            if src is None or dst is None or len(src.shape) != 4 or len(dst.shape) != 4:
                continue
            (h, w), (ho, wo) = [int(v) for v in src.shape[-2:]], [int(v) for v in dst.shape[-2:]]
            if ho >= h and wo >= w:
                continue
            mats = _cubic_matrices(fn, h, w)
            if mats is None:
                continue
            a_h, a_w = mats
            base = f"{str(node.name)}_cubic"
            while hasattr(gm, f"{base}_h") or hasattr(gm, f"{base}_w"):
                base += "_"
            gm.register_buffer(f"{base}_h", a_h.to(src.dtype))
            gm.register_buffer(f"{base}_w", a_w.T.contiguous().to(src.dtype))
            g = gm.graph
            with g.inserting_before(node):
                rows = g.call_function(torch.matmul, (g.get_attr(f"{base}_h"), node.args[0]))
                rows.meta[RESIZE_MATMUL] = True
                rows.meta["tensor_meta"] = _extract_tensor_metadata(
                    torch.empty((*src.shape[:-2], ho, w), dtype=src.dtype, device="meta"))
                out = g.call_function(torch.matmul, (rows, g.get_attr(f"{base}_w")))
                out.meta[RESIZE_MATMUL] = True  # a resize, not a layer: MatmulAsLinear leaves it float
            _replace(node, out)
            count += 1
        return _finish(self, gm, count, "bicubic downscale(s)")


_AVG_POOL_MODULES = {nn.AvgPool2d: F.avg_pool2d, nn.AvgPool3d: F.avg_pool3d}
_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _partial_windows(args: dict, kernel: list, dims: int) -> bool:
    """Whether a ceil-mode pool has a window past its padded input (True where the input size is not known)."""
    meta = getattr(args.get("input"), "meta", {}).get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) < dims:
        return True

    def per_dim(v, default):
        v = default if v is None or (isinstance(v, (tuple, list)) and not v) else v
        return list(v) if isinstance(v, (tuple, list)) else [v] * dims

    stride, pad = per_dim(args.get("stride"), kernel), per_dim(args.get("padding", 0), 0)
    for size, k, st, p in zip([int(v) for v in shape[-dims:]], kernel, stride, pad):
        out = -(-(size + 2 * p - k) // st) + 1
        if (out - 1) * st >= size + p:  # PyTorch: the last window must start inside the input or left padding
            out -= 1
        if (out - 1) * st + k > size + 2 * p:
            return True
    return False


class DecomposeAvgPoolDivisor(Pass):
    """``nn.AvgPool2d/3d(divisor_override=d)`` and ``F.avg_pool2d/3d(..., divisor_override=d)`` as the same pool
    counting pads (divisor: the kernel size) times ``prod(kernel_size) / d``. torch.onnx writes such a pool as an
    ``AveragePool`` without the divisor, so the file computed another function (14 dB against the model in fp32,
    and validation failed). Exact where every window is whole; in ceil mode a window can run past the padded input,
    where PyTorch divides it by its own size: those pools stop the compile with one line."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from qcompile.errors import UserError

        count = 0
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and type(gm.get_submodule(node.target)) in _AVG_POOL_MODULES:
                mod = gm.get_submodule(node.target)
                fn = _AVG_POOL_MODULES[type(mod)]
                args = {"input": node.args[0] if node.args else node.kwargs.get("input"),
                        "kernel_size": mod.kernel_size, "stride": mod.stride, "padding": mod.padding,
                        "ceil_mode": mod.ceil_mode, "count_include_pad": mod.count_include_pad,
                        "divisor_override": mod.divisor_override}
            elif node.op == "call_function" and node.target in (F.avg_pool2d, F.avg_pool3d):
                fn = node.target
                args = dict(zip(_AVG_POOL_ARGS, node.args), **node.kwargs)
            else:
                continue
            divisor = args.get("divisor_override")
            if not divisor:
                continue
            name = node.target if node.op == "call_module" else node.name
            dims = 2 if fn is F.avg_pool2d else 3
            kernel = args["kernel_size"]
            kernel = list(kernel) if isinstance(kernel, (tuple, list)) else [kernel] * dims
            if args.get("ceil_mode") and _partial_windows(args, kernel, dims):
                raise UserError(f"the average pool {name} has divisor_override with ceil_mode=True and a window "
                                "that runs past its input, which no ONNX operator computes; use ceil_mode=False "
                                "(pad the input if the last row/column matters) or drop divisor_override")
            factor = math.prod(int(k) for k in kernel) / float(divisor)
            pool_args = {k: v for k, v in args.items() if k not in ("input", "divisor_override")}
            pool_args["count_include_pad"] = True  # with whole windows: divided by the kernel size
            pool_args.setdefault("stride", None)
            g = gm.graph
            with g.inserting_before(node):
                pooled = g.call_function(fn, (args["input"],), pool_args)
                pooled.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "val")})
                out = g.call_function(torch.mul, (pooled, factor))
            _replace(node, out)
            count += 1
        return _finish(self, gm, count, "average pool(s) with divisor_override")


_MATMULS = {operator.matmul, torch.matmul, torch.mm}


class MatmulAsLinear(Pass):
    """``x @ self.W``, ``torch.matmul(x, self.W)``, ``torch.mm(x, self.W)`` and ``x.matmul(self.W)`` with ``W`` a
    2-D floating parameter or buffer read by ``get_attr`` as ``F.linear(x, W.t())``, and ``torch.addmm(self.b, x,
    self.W)`` (HuggingFace's ``Conv1D``, GPT-2's layers) as ``F.linear(x, W.t(), b)``: the same product (a layer
    written without ``nn.Linear``). Such a layer was left float, with no row in the layer table, while the compile
    said W8A8; now FoldConstants stores ``W.t()`` and the layer is quantized like any ``F.linear`` on a parameter."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from .base import attr_value

        count = _positional_layer_arguments(gm)
        for node in list(gm.graph.nodes):
            bias = None
            if node.op == "call_function" and node.target is torch.addmm and len(node.args) == 3 and \
                    all(node.kwargs.get(k, 1) == 1 for k in ("beta", "alpha")) and set(node.kwargs) <= {"beta", "alpha"}:
                # HuggingFace's Conv1D (GPT-2's c_attn, c_fc, c_proj): addmm(b, x, W) = x @ W + b
                bias, x, w = node.args
                if not isinstance(bias, torch.fx.Node) or bias.op != "get_attr":
                    continue
                b = attr_value(gm, bias)
                if not isinstance(b, torch.Tensor) or b.dim() != 1 or not b.is_floating_point():
                    continue
            elif node.op == "call_function" and node.target is torch.einsum:
                found = _einsum_linear(gm, node)  # einsum("bi,oi->bo", x, W): a Linear written as einsum
                if found is None:
                    continue
                x, w, out_first = found
            else:
                is_matmul = (node.op == "call_function" and node.target in _MATMULS) or \
                    (node.op == "call_method" and node.target == "matmul")
                if not is_matmul or len(node.args) != 2 or node.kwargs or node.meta.get(RESIZE_MATMUL):
                    continue
                x, w = node.args
            if not isinstance(x, torch.fx.Node) or not isinstance(w, torch.fx.Node) or x.op == "get_attr":
                continue
            # x @ W.T: F.linear(x, W); also addmm(b, x, W.t()) (it was left float when a bias came with it), and an
            # einsum whose weight is (out, in)
            transposed = w if node.target is torch.einsum and out_first else _transposed_parameter(gm, w)
            if w.op != "get_attr" and transposed is None:
                continue
            value = attr_value(gm, transposed if transposed is not None else w)
            if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
                continue
            out_features = value.shape[0] if transposed is not None else value.shape[1]
            if bias is not None and attr_value(gm, bias).shape[0] != out_features:
                continue  # a bias broadcast another way: not a layer's
            added = None
            if bias is None:  # x @ W.T + self.bias (Falcon's FalconLinear): the layer's bias
                added, bias = _bias_add(gm, node, out_features)
            g = gm.graph
            with g.inserting_before(added if added is not None else node):  # after the bias's get_attr too
                wt = transposed if transposed is not None else g.call_method("t", (w,))
                out = g.call_function(F.linear, (x, wt) if bias is None else (x, wt, bias))
            if "nn_module_stack" in node.meta:  # the layer of the module that ran the product (GPT-2's Conv1D
                out.meta["nn_module_stack"] = node.meta["nn_module_stack"]  # c_attn): named after it
            if added is not None:
                added.replace_all_uses_with(out)
                g.erase_node(added)
            _replace(node, out)
            count += 1
        return _finish(self, gm, count, "matmul(s) with a parameter as F.linear")


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class DecomposeCircularPadding(Pass):
    """A convolution module with ``padding_mode="circular"`` as ``F.pad(x, ..., mode="circular")`` and the same
    module with zero padding: what its forward computes. torch.onnx writes the wrap-around as slices and a
    concatenation inside the layer, behind the input quantizer, so onnxruntime saw a float Conv and ran the layer on
    float kernels (a helper's model: 1.8x slower than quantize_static's file, which quantizes after the
    concatenation); with the pad outside the layer, the quantizer reads the padded tensor and the layer is an int8
    one. (Reflect / replicate padding exports as one Pad, which onnxruntime already looks through.)"""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        calls: dict[str, list] = {}  # each module with all its calls (a module called twice is padded twice)
        for node in gm.graph.nodes:
            if node.op == "call_module" and type(gm.get_submodule(node.target)) in _CONVS and \
                    gm.get_submodule(node.target).padding_mode == "circular":
                calls.setdefault(str(node.target), []).append(node)
        if any(len(node.args) != 1 or node.kwargs for nodes in calls.values() for node in nodes):
            calls = {t: nodes for t, nodes in calls.items() if all(len(n.args) == 1 and not n.kwargs for n in nodes)}
        count = 0
        for target, nodes in calls.items():
            mod = gm.get_submodule(target)
            pad = [int(p) for p in mod._reversed_padding_repeated_twice]
            for node in nodes:
                with gm.graph.inserting_before(node):
                    padded = gm.graph.call_function(F.pad, (node.args[0], pad), {"mode": "circular"})
                node.args = (padded,)
                count += 1
            mod.padding_mode = "zeros"
            mod.padding = (0,) * len(mod.kernel_size)
            mod._reversed_padding_repeated_twice = [0] * len(pad)
        return _finish(self, gm, count, "circular padding(s) of convolutions as pads before the layer")


_LAYER_PARAMETERS = {F.linear: ("input", "weight", "bias")} | {
    fn: ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    for fn in (F.conv1d, F.conv2d, F.conv3d)}
_LAYER_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _positional_layer_arguments(gm: torch.fx.GraphModule) -> int:
    """``F.linear(x, weight=W, bias=b)`` (timm's EVA attention) and ``F.conv2d(x, weight=W, ...)`` as positional
    calls, the form the passes read a functional layer in (QuantizeOutputs stopped with an internal IndexError on
    the keyword form). Returns how many calls were rewritten."""
    count = 0
    for node in gm.graph.nodes:
        names = _LAYER_PARAMETERS.get(node.target) if node.op == "call_function" else None
        if not names or not node.kwargs or not set(node.kwargs) <= set(names):
            continue
        values = dict(zip(names, node.args))
        values.update(node.kwargs)
        if "input" not in values or "weight" not in values:
            continue
        last = max(i for i, name in enumerate(names) if name in values)
        node.args = tuple(values[name] if name in values else _LAYER_DEFAULTS[name] for name in names[:last + 1])
        node.kwargs = {}
        count += 1
    return count


def _einsum_linear(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """``(x, W, out_first)`` where ``node`` is ``torch.einsum(eq, x, W)`` computing ``x`` times the 2-D floating
    parameter ``W`` over ``x``'s last axis, as a Linear does: ``"...k,ok->...o"`` (``W`` is (out, in),
    ``out_first``) or ``"...k,ko->...o"``, the leading axes of ``x`` kept in order; else None."""
    from .base import attr_value

    args = node.args[1:]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = tuple(args[0])
    if not node.args or not isinstance(node.args[0], str) or len(args) != 2 or node.kwargs:
        return None
    x, w = args
    if not isinstance(w, torch.fx.Node) or w.op != "get_attr":
        return None
    value = attr_value(gm, w)
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
        return None
    eq = node.args[0].replace(" ", "")
    if eq.count("->") != 1 or "." in eq:
        return None
    ins, out = eq.split("->")
    if ins.count(",") != 1:
        return None
    a, b = ins.split(",")
    if len(b) != 2 or not a or len(set(a)) != len(a) or b[0] == b[1]:
        return None
    k = a[-1]
    if k not in b:
        return None
    o = b[0] if b[1] == k else b[1]
    if o in a or out != a[:-1] + o:
        return None
    return x, w, b[0] == o


def _transposed_parameter(gm: torch.fx.GraphModule, w: torch.fx.Node):
    """The ``get_attr`` node of a 2-D parameter ``W`` that ``w`` reads transposed (``W.T``, ``W.mT``, ``W.t()``,
    ``W.transpose(0, 1)``, ``W.permute(1, 0)``), else None."""
    base = None
    if w.op == "call_function" and w.target is getattr and len(w.args) == 2 and w.args[1] in ("T", "mT"):
        base = w.args[0]
    elif w.op == "call_method" and not w.kwargs:
        if w.target == "t" and len(w.args) == 1:
            base = w.args[0]
        elif w.target in ("transpose", "swapaxes") and len(w.args) == 3 and \
                all(isinstance(a, int) for a in w.args[1:]) and sorted(a % 2 for a in w.args[1:]) == [0, 1]:
            base = w.args[0]
        elif w.target == "permute" and tuple(w.args[1:]) in (((1, 0),), (1, 0)):
            base = w.args[0]
    if isinstance(base, torch.fx.Node) and base.op == "get_attr":
        from .base import attr_value

        value = attr_value(gm, base)
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            return base
    return None


def _bias_add(gm: torch.fx.GraphModule, node: torch.fx.Node, out_features: int):
    """``(add, b)`` where the product ``node``'s one reader adds a 1-D floating parameter ``b`` of its out features
    (``x @ W.T + self.bias``), else ``(None, None)``."""
    from .base import attr_value

    users = list(node.users)
    if len(users) != 1:
        return None, None
    add = users[0]
    if not (add.op == "call_function" and add.target in (operator.add, torch.add) and len(add.args) == 2
            and not add.kwargs):
        return None, None
    other = add.args[1] if add.args[0] is node else add.args[0] if add.args[1] is node else None
    if not isinstance(other, torch.fx.Node) or other.op != "get_attr":
        return None, None
    b = attr_value(gm, other)
    if not isinstance(b, torch.Tensor) or b.dim() != 1 or not b.is_floating_point() or b.shape[0] != out_features:
        return None, None
    return add, other


class MeanAsGlobalPool(Pass):
    """``x.mean((2, 3))``, ``x.mean(dim=(-2, -1), keepdim=...)`` and ``torch.mean(x, (2, 3))`` of a 4-D floating tensor
    as ``F.adaptive_avg_pool2d(x, 1)``, flattened to (N, C) without ``keepdim``: the same average (up to float
    summation order), exported as ``GlobalAveragePool``, which the int8 region pools on codes."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        count = 0
        for node in list(gm.graph.nodes):
            if not ((node.op == "call_method" and node.target == "mean") or
                    (node.op == "call_function" and node.target is torch.mean)):
                continue
            args = dict(zip(("input", "dim", "keepdim"), node.args), **node.kwargs)
            x, dims, keepdim = args.get("input"), args.get("dim"), args.get("keepdim", False)
            meta = x.meta.get("tensor_meta") if isinstance(x, torch.fx.Node) else None
            if set(args) - {"input", "dim", "keepdim"} or not isinstance(keepdim, bool) or meta is None or \
                    not hasattr(meta, "shape") or len(meta.shape) != 4 or not meta.dtype.is_floating_point or \
                    not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims) or \
                    sorted(d % 4 for d in dims) != [2, 3]:
                continue
            g = gm.graph
            with g.inserting_before(node):
                out = g.call_function(F.adaptive_avg_pool2d, (x, 1))
                out.meta["tensor_meta"] = meta._replace(shape=torch.Size(list(meta.shape[:2]) + [1, 1]))
                if not keepdim:
                    out = g.call_function(torch.flatten, (out, 1))
            _replace(node, out)
            count += 1
        return _finish(self, gm, count, "spatial mean(s) as global average pools")
