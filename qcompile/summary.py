"""Human-readable compile summary lines."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _weight_quantized(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether the layer ``node`` reads its weight through a weight FakeQuantize (what InsertQuantizers makes)."""
    from qcompile.passes.base import fake_quantizer

    if node.op != "call_function":
        return False
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    fq = fake_quantizer(gm, weight)
    return fq is not None and fq.role == "weight"


def _recurrent_quantized(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    from qcompile.qmodules import QuantizedRecurrent

    return isinstance(gm.get_submodule(node.target), QuantizedRecurrent)


def _layer_name(node: torch.fx.Node, gm: torch.fx.GraphModule | None = None) -> str:
    """The module a layer node belongs to: recorded by InsertQuantizers, the call_module target, else the layer
    name of the parameter it reads as SelectLayers and ``--exclude`` name it (its owner; the parameter itself at the
    top level or in a ParameterList), else the innermost module torch.fx was tracing through (a functional conv on a
    weight computed in forward), else the node's name."""
    name = node.meta.get("layer")
    if isinstance(name, str):
        return name
    if node.op == "call_module":
        return str(node.target)
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":  # a functional layer on the model's own tensor
        if gm is not None:
            from qcompile.passes.select import weight_layer_name

            return weight_layer_name(gm, str(weight.target), node)
        target = str(weight.target)
        return target.rsplit(".", 1)[0] if "." in target else target
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return next(reversed(stack.values()))[0]
    return node.name


def layer_rows(gm: torch.fx.GraphModule) -> list[tuple[str, str, str]]:
    """``(name, type, decision)`` per Conv/Linear layer with the quantization decision recorded on its node, in
    graph order (those bound to integer kernels too), then the opaque modules whose layers stay float. Once weight
    quantizers are in the graph, a layer selected for quantization that no pass could quantize says why it stayed
    float."""
    from qcompile.qmodules import FakeQuantize

    inserted = any(isinstance(m, FakeQuantize) and m.role == "weight" for m in gm.modules())
    rows = []
    for node in gm.graph.nodes:
        cfg = node.meta.get("qconfig")
        if cfg is None:
            continue
        name = _layer_name(node, gm)
        stack = node.meta.get("nn_module_stack") or {}
        traced_into = node.op == "call_function" and stack
        try:
            kind = type(gm.get_submodule(name)).__name__
        except AttributeError:
            kind = getattr(node.target, "__name__", str(node.target))
        if traced_into and kind in ("Module", getattr(node.target, "__name__", "")):
            # the fx copy of a traced-through module is a plain Module: name its original class
            kind = getattr(next(reversed(stack.values()))[1], "__name__", kind)
        if getattr(node.target, "__module__", "") == "qcompile.qmodules" and kind.startswith("int8_"):
            kind = kind[len("int8_"):]  # a functional layer bound to an int8 kernel: the function it was
        from qcompile.passes.select import recurrent_module, weight_only_layer

        if kind in ("Embedding", "EmbeddingBag") and node.op == "call_function" and node.target is not F.embedding:
            fn = getattr(node.target, "__name__", "linear")  # a table used as a layer's weight (a tied output layer)
            kind = fn[len("int8_"):] if fn.startswith("int8_") else fn
        if weight_only_layer(gm, node):  # a recurrent layer or an embedding table: its weights alone
            rnn = recurrent_module(gm, node)
            if rnn is not None:
                kind, done = type(rnn).__name__, _recurrent_quantized(gm, node)
            else:
                kind = "Embedding"  # F.embedding tables too: the type rules match ('type:Embedding')
                done = node.op == "call_function" and _weight_quantized(gm, node)
            rows.append((name, kind, cfg.describe(weights_only=True) if cfg.action != "quant" or not inserted
                         or done else "float: unsupported layer form"))
            continue
        decision = cfg.describe()
        if cfg.action == "quant" and node.args:
            from qcompile.passes.base import input_quantizer

            fq = input_quantizer(gm, node.args[0])
            if fq is not None and fq.level_offset:  # calibration chose asymmetric APoT/PoT input levels
                ls = fq.levelset
                decision += f", A asymmetric (offset {ls.offset}: levels {ls.grid[0]}..{ls.grid[-1]} / {ls.denom})"
        if node.op == "call_function" and getattr(node.target, "__module__", "") == "qcompile.qmodules" \
                and getattr(node.target, "__name__", "").startswith("int8_"):  # bound by BindIntegerLayers
            from qcompile.passes.quantize_outputs import cell_output

            found = cell_output(gm, node)
            cells = found is not None and found[0].cells is not None
            decision += "; int8 kernel" + (", output levels from accumulator cells" if cells else "")
        if inserted and cfg.action == "quant" and not _weight_quantized(gm, node):
            why = "a functional call on a weight computed in forward (or with string padding)" \
                if node.op == "call_function" else "unsupported layer form"
            decision = f"float: {why}"
        rows.append((name, kind, decision))
    from qcompile.passes.select import opaque_layers

    # modules called whole; weights handed to functions that compute with them in float ("read by ...", or a
    # functional transposed convolution): not "opaque to torch.fx", which traced them
    rows += [(name, kind, f"float: opaque to torch.fx ({inside})" if kind != "weight" and not kind.startswith(
        "conv_transpose") else f"float: {inside}") for name, kind, inside in opaque_layers(gm)]
    seen = set()
    for node in gm.graph.nodes:  # embedding tables: weights qcompile does not quantize (it quantizes Conv/Linear)
        if node.op == "call_module" and node.target not in seen and node.meta.get("qconfig") is None:
            seen.add(node.target)
            mod = gm.get_submodule(node.target)
            if isinstance(mod, torch.nn.Embedding) and mod.max_norm is not None:
                rows.append((str(node.target), type(mod).__name__,
                             "float: an embedding table with max_norm (renormalized in forward)"))
            elif isinstance(mod, torch.nn.EmbeddingBag):
                rows.append((str(node.target), type(mod).__name__, "float: an EmbeddingBag table (not quantized)"))
        elif node.op == "call_function" and node.target is F.embedding and node.meta.get("qconfig") is None \
                and (node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")) is not None:
            table = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            name = str(table.target) if isinstance(table, torch.fx.Node) else node.name
            rows.append((name, "Embedding", "float: an embedding table with max_norm (renormalized in forward)"))
    return rows


def layer_lines(gm: torch.fx.GraphModule) -> list[str]:
    """The layer table of the compile summary: :func:`layer_rows` as aligned lines under ``layers:``."""
    rows = layer_rows(gm)
    if not rows:
        return []
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return ["layers:"] + [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
