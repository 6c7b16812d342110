"""Cleanup passes needed by every path, the float one included.

- ``EliminateDeadCode``: remove nodes whose values nobody uses and that have no side effects
  (``Graph.eliminate_dead_code``), then drop submodules no node refers to.
- ``RemoveIdentity``: ``nn.Identity`` and eval-mode ``nn.Dropout*`` calls are the identity: x -> x.
  Before: ``y = dropout(x); z = f(y)``  After: ``z = f(x)``.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

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
