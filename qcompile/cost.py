"""Operation counts of the shift-add lowering against the uniform integer form, per input sample.

In the spirit of the APoT paper's FixOPs comparison (Table 3), counted on the integer arithmetic a multiplier-free
accelerator performs, not on the ONNX operators that emulate it (those compute 0/1-mask products densely):

- **uniform integer form** of a layer: ``mults = MACs = P * O * K`` and ``adds = P * O * (K - 1)``
  (P output positions per sample, O output channels, K fan-in; dense, as uniform hardware runs it);
- **shift-add form** (as lowered: terms grouped by (exponent, sign) per output): no multiplications;
  ``adds = P * sum_o (T_o - 1)`` where T_o is the number of nonzero signed power-of-two terms in output o's
  weights (zero weights cost nothing); ``shifts = P * sum_o #{groups of o with exponent > 0}``;
  ``shifts_per_product`` = one shift per term with exponent > 0 (a shift-add multiplier per MAC, ungrouped).

Layers that are not lowered (uniform 8-bit first/last layers, float layers) keep their MACs as multiplications in
both columns. :func:`cost_report` works on a lowered file (records in ``metadata_props``) and on a standard-form
file (what the lowering would produce). :func:`format_cost_report` gives the summary lines.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import onnx


def layer_cost(codes: np.ndarray, positions: Optional[int], decomposition: str = "naf") -> dict:
    """Counts for one layer with integer weight ``codes`` ``[O, ...]`` (see the module docstring)."""
    from .lowering import level_histogram

    codes = np.asarray(codes, dtype=np.int64)
    levels, index = np.unique(codes, return_inverse=True)
    return cost_from_histogram(level_histogram(index.reshape(codes.shape), len(levels)), levels, positions,
                               decomposition)


def cost_from_histogram(hist: np.ndarray, levels: np.ndarray, positions: Optional[int],
                        decomposition: str = "naf") -> dict:
    """:func:`layer_cost` from ``hist[o, l]`` (weights of output ``o`` at level ``levels[l]``)."""
    from .lowering import signed_digits

    digits = signed_digits(levels, decomposition)                  # [L, E]
    n_out, fan_in = hist.shape[0], int(hist[0].sum())
    terms = hist @ np.count_nonzero(digits, axis=1)                # T_o
    group_shifts = sum(int(((hist @ (digits[:, e] == s).astype(np.int64)) > 0).sum())
                       for e in range(1, digits.shape[1]) for s in (1, -1))
    shifted_terms = int((hist @ np.count_nonzero(digits[:, 1:], axis=1)).sum())
    present = hist.sum(axis=0) > 0
    p = positions if positions is not None else 1
    return {
        "positions": positions,
        "out_channels": int(n_out),
        "fan_in": fan_in,
        "weight_count": int(hist.sum()),
        "nonzero_weights": int(hist[:, np.asarray(levels) != 0].sum()),
        "terms": int(terms.sum()),
        "max_terms_per_weight": int(np.count_nonzero(digits[present], axis=1).max()) if present.any() else 0,
        "uniform": {"mults": p * n_out * fan_in, "adds": p * n_out * (fan_in - 1)},
        "shift_add": {"mults": 0, "shifts": p * group_shifts, "adds": p * int(np.maximum(terms - 1, 0).sum()),
                      "shifts_per_product": p * shifted_terms},
    }


def _shapes(model: onnx.ModelProto) -> dict:
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for t in inferred.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _dense_outputs(node: onnx.NodeProto, shapes: dict) -> Optional[int]:
    """Output values per sample of a layer (batch dimension excluded)."""
    out = shapes.get(node.output[0])
    if out is None or any(d is None for d in out[1:]):
        return None
    return int(np.prod(out[1:], dtype=np.int64))


def _dense_macs(node: onnx.NodeProto, shapes: dict) -> Optional[int]:
    """MACs per sample of a Conv/Gemm/MatMul left as it is (batch dimension excluded)."""
    out = shapes.get(node.output[0])
    if node.op_type == "ConvTranspose":  # every input element times its (C_out / groups) x kernel weights
        x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
        if x is None or w is None or any(d is None for d in x[1:] + w):
            return None
        return int(np.prod(x[1:], dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    if node.op_type == "Conv":
        w = shapes.get(node.input[1])
        if out is None or w is None or any(d is None for d in out[1:] + w):
            return None
        return int(np.prod(out[1:], dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
    x = shapes.get(node.input[0])
    if out is None or x is None or any(d is None for d in out[1:]) or x[-1] is None:
        return None
    return int(np.prod(out[1:], dtype=np.int64) * x[-1])


_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Relu", "Clip", "Cast", "QuantizeLinear", "DequantizeLinear", "Identity"}


def _rows_per_sample(model: onnx.ModelProto, node: onnx.NodeProto, shapes: dict) -> Optional[int]:
    """Rows of a 2-D Gemm/MatMul per input sample where the layer runs on (batch · tokens, features) rows: a Linear
    on (B, T, d) written as Reshape -> Gemm -> Reshape, whose row count is not the batch (the cost table counted
    one row per sample, T times too few products). From the (batch, ...) shape of the Reshape before it or after
    it (through elementwise nodes); None where nothing says (a plain (B, d) layer)."""
    x, out = shapes.get(node.input[0]), shapes.get(node.output[0])
    if node.op_type not in ("Gemm", "MatMul") or x is None or out is None or len(x) != 2 or x[0] is not None \
            or x[-1] is None or out[-1] is None:
        return None
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def per_sample(shape) -> Optional[int]:
        if shape is None or len(shape) < 2 or any(d is None for d in shape[1:]):
            return None
        return int(np.prod(shape[1:], dtype=np.int64))

    tensor = node.input[0]
    for _ in range(6):  # back to the Reshape/Flatten that made the rows
        src = producer.get(tensor)
        if src is None:
            break
        if src.op_type in ("Reshape", "Flatten"):
            e = per_sample(shapes.get(src.input[0]))
            if e is not None and e % x[-1] == 0 and e // x[-1] > 1:
                return e // x[-1]
            break
        if src.op_type not in _ELEMENTWISE:
            break
        tensor = src.input[0]
    tensor = node.output[0]
    for _ in range(6):  # on to the Reshape that gives the rows back their samples
        readers = consumers.get(tensor, [])
        if len(readers) != 1:
            break
        dst = readers[0]
        if dst.op_type == "Reshape":
            e = per_sample(shapes.get(dst.output[0]))
            if e is not None and e % out[-1] == 0 and e // out[-1] > 1:
                return e // out[-1]
            break
        if dst.op_type not in _ELEMENTWISE:
            break
        tensor = dst.output[0]
    return None


def _recurrent_macs(node: onnx.NodeProto, shapes: dict) -> tuple[Optional[int], Optional[int]]:
    """(MACs, gate outputs) per sample of an LSTM/GRU/RNN: every time step multiplies the input by W
    ([directions, gates·hidden, input]) and the state by R ([directions, gates·hidden, hidden])."""
    x, w, r = (shapes.get(node.input[i]) if len(node.input) > i else None for i in range(3))
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    steps = None if x is None or len(x) != 3 else x[1 if layout else 0]
    if steps is None or w is None or r is None or any(d is None for d in w + r):
        return None, None
    return int(steps * (np.prod(w, dtype=np.int64) + np.prod(r, dtype=np.int64))), int(steps * w[0] * w[1])


def _producer_name(model: onnx.ModelProto, tensor: str) -> str:
    return next((n.name for n in model.graph.node if tensor in n.output), "")


def _module_of(model: onnx.ModelProto, node_name: str) -> str:
    """Best-effort module name: the prefix of a ``<module>.bias`` initializer the layer (or its bias Add) reads."""
    node = next((n for n in model.graph.node if n.name == node_name), None)
    if node is None:
        return ""
    candidates = list(node.input)
    candidates += [i for n in model.graph.node if n.op_type == "Add" and node.output[0] in n.input for i in n.input]
    found = next((c[: -len(".bias")] for c in candidates if c.endswith(".bias")), "")
    parts = node_name.split("/")
    if not found and node_name.startswith("/") and len(parts) > 2:  # the exporter's "/layer1/conv/Conv"
        found = ".".join(parts[1:-1])
    return found


def cost_report(model: onnx.ModelProto | str, decomposition: str = "naf") -> dict:
    """Per-layer and total counts per input sample (a dict ready for JSON); see the module docstring. ``model``
    is an ONNX model or the path of a file."""
    from .lowering import _initializers, lowered_layers, match_layers, plan_layer

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model))
    from .lowering import refuse_custom_form

    refuse_custom_form(model)

    import onnx_graphsurgeon as gs

    records = lowered_layers(model)
    lowered_form = bool(records)
    layers = []
    if lowered_form:
        for rec in records:
            layers.append({"layer": rec["layer"], "module": rec.get("module", ""), "op": rec["op"],
                           "weight_levels": rec["weight_levels"], "lowered": True,
                           "accumulator_dtype": rec["accumulator_dtype"], **rec["cost"]})
    # why each layer left as it is was not lowered (the lowering's own reasons: they reached no output before)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    matches, skipped = match_layers(gs.import_onnx(inferred), _initializers(inferred))
    reasons = {row["layer"]: row["reason"] for row in skipped}
    for m in matches:
        try:
            plan = plan_layer(m, decomposition)
        except ValueError as exc:  # the lowering leaves such a layer as it is (its sums could pass int64)
            reasons[m.node.name] = str(exc)
            continue
        if not lowered_form:
            layers.append({"layer": m.node.name, "module": _module_of(model, m.node.name), "op": m.node.op,
                           "weight_levels": m.weight.label, "lowered": True, "accumulator_dtype": f"int{plan.width}",
                           **plan.cost})
    done = {row["layer"] for row in layers}
    shapes = _shapes(model)
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN") or node.name in done:
            continue
        if node.op_type in ("LSTM", "GRU", "RNN"):  # weight-only, float: its matrix products, every time step
            macs, outputs = _recurrent_macs(node, shapes)
        else:
            macs = _dense_macs(node, shapes)
            outputs = _dense_outputs(node, shapes)
            rows = _rows_per_sample(model, node, shapes)
            if rows is not None and macs is not None and outputs is not None:
                macs, outputs = macs * rows, outputs * rows
        # P * O * (K - 1) as for the lowered layers: each output sums its K products with K - 1 adds
        adds = None if macs is None or outputs is None else macs - outputs
        layers.append({"layer": node.name, "module": _module_of(model, node.name), "op": node.op_type, "weight_levels": "kept", "lowered": False,
                       "macs": macs, "uniform": {"mults": macs, "adds": adds},
                       "shift_add": {"mults": macs, "shifts": 0, "adds": adds, "shifts_per_product": 0},
                       "reason": reasons.get(node.name, "float layer" if node.op_type in ("LSTM", "GRU", "RNN")
                                             else None)})

    order = {n.name: i for i, n in enumerate(model.graph.node)}
    order.update({rec["layer"]: order.get(_producer_name(model, rec["accumulator"]), 0) for rec in records})
    layers.sort(key=lambda row: order.get(row["layer"], 0))

    def total(key: str, field: str, only_lowered: bool = False) -> Optional[int]:
        vals = [row[key][field] for row in layers if row["lowered"] or not only_lowered]
        return None if any(v is None for v in vals) else int(sum(vals))

    totals = {
        "uniform": {"mults": total("uniform", "mults"), "adds": total("uniform", "adds")},
        "shift_add": {f: total("shift_add", f) for f in ("mults", "shifts", "adds", "shifts_per_product")},
        "lowered_layers": {
            "uniform": {f: total("uniform", f, True) for f in ("mults", "adds")},
            "shift_add": {f: total("shift_add", f, True) for f in ("shifts", "adds", "shifts_per_product")},
        },
    }
    return {"form": "shift-add" if lowered_form else "standard (lowering planned)", "per": "input sample",
            "decomposition": decomposition, "layers": layers, "totals": totals}


def _si(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def nothing_lowered_note(report: dict, quantized_layers: int | None = None) -> str | None:
    """The warning for a shift-add file in which no layer was lowered (uniform weights, 2-bit or ternary levels):
    the cost table's "not lowered" rows were the only word that the file multiplies like the standard form.
    ``quantized_layers``: how many layers have quantized weights, where known (none: every layer is float)."""
    if any(row.get("lowered") for row in report.get("layers", [])):
        return None
    if quantized_layers == 0:
        return ("--emit shift-add lowered no layer: every layer is float (excluded, or kept float), and only layers "
                "with APoT/PoT/log2 weights of 3 bits or more are lowered; the file computes as the standard form does")
    return ("--emit shift-add lowered no layer: uniform weights, 2-bit APoT/PoT and ternary levels keep their "
            "integer multiplications, transposed convolutions, recurrent layers and embedding tables are not "
            "lowered (the last two compute in float), "
            "nor layers whose sums could pass int64 (PoT/log2 6-bit weights on 5-bit PoT codes); the file computes "
            "as the standard form does. Shift-add needs Conv/Linear layers (not ConvTranspose) with APoT/PoT/log2 "
            "weights of 3 bits or more")


def format_cost_report(report: dict) -> list[str]:
    """Summary lines of :func:`cost_report`: one row per layer, then the model totals."""
    rows = [("layer", "weights", "uniform mult", "uniform add", "shifts", "adds", "terms/w")]
    for row in report["layers"]:
        name = row["module"] or row["layer"]
        if row["lowered"]:
            per_w = row["terms"] / row["nonzero_weights"] if row["nonzero_weights"] else 0.0
            rows.append((name, row["weight_levels"], _si(row["uniform"]["mults"]), _si(row["uniform"]["adds"]),
                         _si(row["shift_add"]["shifts"]), _si(row["shift_add"]["adds"]), f"{per_w:.2f}"))
        else:
            rows.append((name, "not lowered", _si(row["uniform"]["mults"]), _si(row["uniform"]["adds"]),
                         "-", "(mults kept)", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if report["layers"] and not any(row["lowered"] for row in report["layers"]):
        lines = ["shift-add cost per input sample (standard form: no layer lowered; only convolutions and Linear "
                 "layers with APoT, PoT or log2 weights of 3 bits or more, or binary weights, become shifts and "
                 "adds, e.g. --wscheme apot):"]
    else:
        lines = [f"shift-add cost per input sample ({report['form']}):"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    why: dict[str, list[str]] = {}  # reason -> the layers it keeps
    for row in report["layers"]:
        if not row["lowered"] and row.get("reason"):
            why.setdefault(row["reason"], []).append(row["module"] or row["layer"])
    for reason, names in why.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(f"  not lowered: {shown}: {reason}")
    unknown = [row["module"] or row["layer"] for row in report["layers"] if row["lowered"] and
               row.get("positions", 1) is None]
    if unknown:  # a dynamic spatial size (--dynamic-axes): the counts are those of one output position
        lines.append(f"  per output position, not per sample: {', '.join(unknown[:3])}"
                     f"{f' and {len(unknown) - 3} more' if len(unknown) > 3 else ''} (output size not fixed)")
    t = report["totals"]
    lines.append(f"  total, uniform integer form: {_si(t['uniform']['mults'])} mults + {_si(t['uniform']['adds'])} adds; "
                 f"shift-add form: {_si(t['shift_add']['mults'])} mults (layers not lowered) + "
                 f"{_si(t['shift_add']['shifts'])} shifts + {_si(t['shift_add']['adds'])} adds")
    return lines
