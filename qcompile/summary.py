"""Human-readable compile summary lines."""
from __future__ import annotations

import torch


def layer_lines(gm: torch.fx.GraphModule) -> list[str]:
    """One line per Conv/Linear layer with the quantization decision recorded on its node, if any."""
    rows = []
    for node in gm.graph.nodes:
        cfg = node.meta.get("qconfig")
        if cfg is None:
            continue
        name = node.meta.get("layer", str(node.target))  # quantized layers are F.conv2d/F.linear calls
        try:
            kind = type(gm.get_submodule(name)).__name__
        except AttributeError:
            kind = getattr(node.target, "__name__", str(node.target))
        rows.append((name, kind, cfg.describe()))
    from qcompile.passes.select import opaque_layers

    rows += [(name, kind, f"float: opaque to torch.fx ({inside})") for name, kind, inside in opaque_layers(gm)]
    if not rows:
        return []
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return ["layers:"] + [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
