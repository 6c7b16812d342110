"""Cleanup passes needed by every path, the float one included.

- ``EliminateDeadCode``: remove nodes whose values nobody uses and that have no side effects
  (``Graph.eliminate_dead_code``), then drop submodules no node refers to.
- ``RemoveIdentity``: ``nn.Identity`` and eval-mode ``nn.Dropout*`` calls are the identity: x -> x.
  Before: ``y = dropout(x); z = f(y)``  After: ``z = f(x)``.
- ``DecomposeRMSNorm``: ``nn.RMSNorm`` / ``F.rms_norm``, which torch.onnx cannot export (``aten::rms_norm`` has no
  symbolic up to opset 20), as the ops of its definition: ``x * rsqrt(mean(x², dims) + eps) * weight``.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .base import Pass, PassResult

_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_IDENTITY_FUNCTIONS = {torch.nn.functional.dropout}


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


class RemoveIdentity(Pass):
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        matches = []
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _IDENTITY_MODULES):
                if not gm.get_submodule(node.target).training:
                    matches.append(node)
            elif node.op == "call_function" and node.target in _IDENTITY_FUNCTIONS:
                training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
                if training is False:
                    matches.append(node)
        for node in matches:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        if matches:
            self.report.append(f"removed {len(matches)} identity/dropout node(s)")
            gm.delete_all_unused_submodules()
        return PassResult(gm, bool(matches))


_RMS_NORM_FUNCTIONS = {F.rms_norm, torch.rms_norm}


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
            out.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "val")})
            node.replace_all_uses_with(out)
            g.erase_node(node)
            count += 1
        if count:
            gm.delete_all_unused_submodules()
            self.report.append(f"decomposed {count} RMSNorm(s)")
        return PassResult(gm, bool(count))
