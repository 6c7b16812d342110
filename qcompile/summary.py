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
    if not rows:
        return []
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return ["layers:"] + [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
