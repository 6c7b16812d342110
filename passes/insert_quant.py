"""InsertQuantizers: put fake-quantizers on the weights and input activations of the selected layers.

For every Conv1d/2d/3d, ConvTranspose1d/2d and Linear node whose ``meta["qconfig"]`` says
``action="quant"``:

    Before:  y = conv(x)
    After:   xq = act_fq(x);  wq = conv.weight_fq(conv.weight);  y = F.conv2d(xq, wq, conv.bias, ...)

Weights get signed levels of the layer's weight scheme, per output channel (axis 0; axis 1 of a transposed conv's
weight) unless ``per_channel`` is off. Padding a conv cannot do itself (reflect/replicate/circular, asymmetric
``"same"``) becomes an ``F.pad`` of the quantized input.
Input activations get one per-tensor quantizer per (tensor, scheme, bits), shared by every layer that reads the
same tensor with the same configuration. Their levels are unsigned where the tensor is provably non-negative
(produced by ReLU-like ops, possibly through pooling, reshapes, concatenation or sums of non-negative tensors),
signed otherwise; uniform activations that may be negative use asymmetric levels r = S(q − Z) (the lecture), and
APoT/PoT ones are marked ``search_offset``: ``Calibrate`` chooses between the symmetric signed set and the unsigned
set shifted by an offset (``quant.level_set(..., offset=o)``), whichever quantizes the observed tensor with the
least squared error. The quantizers are uncalibrated: ``Calibrate`` fixes their clipping values.

Weight-only layers: an embedding table becomes ``F.embedding(ids, emb.weight_fq(emb.weight))`` (a quantizer per
row); an ``nn.LSTM``/``nn.GRU``/``nn.RNN`` becomes a ``QuantizedRecurrent`` holding a per-row quantizer for each
weight matrix. Their inputs get no quantizer (ids; a recurrent layer computes in float).
"""
from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from qcompile import quant
from qcompile.errors import UserError
from qcompile.qmodules import FakeQuantize, QuantizedRecurrent

from .base import Pass, PassResult
from .select import weight_layer_name

_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_CONV_T_FN = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
              nn.ConvTranspose3d: F.conv_transpose3d}


def _layer_fn(table: dict, mod: nn.Module):
    """The functional form of ``mod`` from ``table``: by its class, or by the torch.nn class it derives from (the
    tracer keeps such subclasses whole only when they inherit the forward, see ``frontend._Tracer``)."""
    return next((fn for cls, fn in table.items() if isinstance(mod, cls)), None)

_NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Hardsigmoid)
_NONNEG_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.softmax, torch.softmax, F.hardsigmoid,
                     F.softplus, torch.exp, torch.abs}
_PRESERVING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                       nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                       nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten, nn.Identity, nn.Dropout, nn.Upsample)
_PADDING_MODULES = (nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
                    nn.modules.padding._ReplicationPadNd, nn.modules.padding._CircularPadNd)
_PRESERVING_FUNCTIONS = {torch.flatten, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                         F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                         F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
                         torch.cat, operator.add, torch.add, operator.mul, torch.mul, F.dropout, F.interpolate,
                         operator.getitem, torch.reshape}
_ARITHMETIC = {operator.add, torch.add, operator.mul, torch.mul}  # non-negative when every operand is
# interpolation modes whose outputs are convex combinations of inputs (bicubic's weights can be negative)
_CONVEX_MODES = {"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"}


def _interpolation_mode(node) -> str:
    mode = node.args[3] if len(node.args) > 3 else node.kwargs.get("mode", "nearest")
    return mode if isinstance(mode, str) else ""


_PRESERVING_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                       "mean", "sum", "max", "relu", "clamp"}


def is_nonnegative(gm: torch.fx.GraphModule, node, _memo=None) -> bool:
    """True when the value of ``node`` is non-negative for every input (a conservative static proof)."""
    memo = {} if _memo is None else _memo
    if not isinstance(node, torch.fx.Node):
        return isinstance(node, (int, float)) and node >= 0
    if node in memo:
        return memo[node]
    memo[node] = False  # cycles cannot happen in fx graphs, but stay safe
    result = False
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, _NONNEG_MODULES):
            result = True
        elif isinstance(mod, FakeQuantize):
            result = (not mod.signed and not mod.asymmetric) or is_nonnegative(gm, node.args[0], memo)
        elif isinstance(mod, nn.Hardtanh):
            result = mod.min_val >= 0
        elif isinstance(mod, nn.Upsample) and mod.mode not in _CONVEX_MODES:
            result = False  # bicubic overshoots below zero
        elif isinstance(mod, _PRESERVING_MODULES):
            result = is_nonnegative(gm, node.args[0], memo)
        elif isinstance(mod, _PADDING_MODULES):  # a causal TCN's zero pad of a ReLU output
            value = getattr(mod, "value", 0.0)
            result = isinstance(value, (int, float)) and value >= 0 and is_nonnegative(gm, node.args[0], memo)
    elif node.op == "call_function":
        if node.target is F.softplus:  # x itself above the threshold: a negative threshold lets x < 0 through
            threshold = node.args[2] if len(node.args) > 2 else node.kwargs.get("threshold", 20.0)
            result = isinstance(threshold, (int, float)) and threshold >= 0
        elif node.target in _NONNEG_FUNCTIONS:
            result = True
        elif node.target is F.hardtanh:
            result = (node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)) >= 0
        elif node.target in (torch.clamp, torch.clip, torch.clamp_min):
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
            result = lo is not None and not isinstance(lo, torch.fx.Node) and lo >= 0
        elif node.target in _ARITHMETIC:
            # every operand counts, constants too (relu(x) * -0.7, torch.add(a, b, alpha=-1) are not non-negative)
            operands = _flat_args(node)
            result = any(isinstance(a, torch.fx.Node) for a in operands) and \
                all(isinstance(a, torch.fx.Node) and is_nonnegative(gm, a, memo)
                    or isinstance(a, (int, float)) and not isinstance(a, bool) and a >= 0 for a in operands)
        elif node.target is F.pad:  # constant padding with a value >= 0 (default 0), or copies of the input
            args = dict(zip(("input", "pad", "mode", "value"), node.args), **node.kwargs)
            value = args.get("value")
            value = 0.0 if value is None else value
            result = (args.get("mode", "constant") != "constant" or
                      isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0) and \
                is_nonnegative(gm, args.get("input"), memo)
        elif node.target is F.interpolate and _interpolation_mode(node) not in _CONVEX_MODES:
            result = False  # bicubic overshoots below zero
        elif node.target in _PRESERVING_FUNCTIONS:
            tensors = [a for a in _flat_args(node) if isinstance(a, torch.fx.Node)]
            if node.target is operator.getitem:
                tensors = tensors[:1]
            result = bool(tensors) and all(is_nonnegative(gm, a, memo) for a in tensors)
    elif node.op == "call_method":
        if node.target == "relu":
            result = True
        elif node.target in ("clamp", "clip", "clamp_min"):
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
            result = lo is not None and not isinstance(lo, torch.fx.Node) and lo >= 0
        elif node.target in _PRESERVING_METHODS:
            result = is_nonnegative(gm, node.args[0], memo)
    memo[node] = result
    return result


def _flat_args(node):
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


def quantizable_module(gm: torch.fx.GraphModule, node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    if isinstance(mod, nn.Linear):
        return mod
    if _layer_fn(_CONV_FN, mod) is not None:
        return mod
    if _layer_fn(_CONV_T_FN, mod) is not None and len(node.args) == 1 and not node.kwargs:  # not (x, output_size)
        return mod
    return None


_FUNCTIONAL_LAYERS = (F.conv1d, F.conv2d, F.conv3d, F.linear)


def functional_weight(gm: torch.fx.GraphModule, node) -> torch.fx.Node | None:
    """The ``get_attr`` weight of a functional layer, ``F.conv2d(x, self.weight, ...)`` / ``F.linear(x, self.w, b)``
    written in a module's forward (a parameter, not a weight computed there), or None. String padding
    (``"same"``) is left to the module form."""
    if node.op != "call_function" or node.target not in _FUNCTIONAL_LAYERS or len(node.args) < 2 \
            or "weight" in node.kwargs or "input" in node.kwargs:
        return None
    weight = node.args[1]
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return None
    padding = node.args[4] if len(node.args) > 4 else node.kwargs.get("padding")
    if node.target is not F.linear and isinstance(padding, str):
        return None
    return weight


def weight_axis(mod: nn.Module) -> int:
    """The output-channel axis of a layer's weight: 0 ([out, in, k...], Linear [out, in]), or 1 for a transposed
    conv ([in, out / groups, k...]; with groups > 1 one scale serves the same position in every group). A
    depthwise transposed conv (groups = in = out, weight [C, 1, k...]) has its output channels on axis 0: on axis 1
    its one scale served every channel, per-tensor whatever ``per_channel`` said (a learned upsampling whose
    channels differ 100× kept no code in the small ones)."""
    if _layer_fn(_CONV_T_FN, mod) is None:
        return 0
    w = mod.weight
    return 0 if mod.groups > 1 and w.shape[1] == 1 and w.shape[0] == mod.groups else 1


def conv_padding(mod: nn.Module) -> tuple[list | None, str, tuple]:
    """How a conv module pads, as ``(pad, mode, conv_padding)``: an explicit ``F.pad(x, pad, mode)`` before the
    convolution (``None`` where the convolution's own symmetric zero padding does it) and the padding argument of
    the functional convolution. ``padding="same"`` with an odd total pads one more on the right, as PyTorch does;
    ``reflect``/``replicate``/``circular`` padding copies input values, so it commutes with the input quantizer and
    runs on the quantized tensor (ONNX ``Pad``)."""
    if mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
        return None, "constant", tuple(mod.padding)
    pad = [int(p) for p in mod._reversed_padding_repeated_twice]  # (last dim left, right, previous dim ...)
    symmetric = all(pad[2 * i] == pad[2 * i + 1] for i in range(len(pad) // 2))
    if mod.padding_mode == "zeros" and symmetric:
        return None, "constant", tuple(reversed(pad[0::2]))
    mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
    return pad, mode, (0,) * (len(pad) // 2)


class InsertQuantizers(Pass):
    """Insert weight and input-activation fake-quantizers for layers whose qconfig says ``quant``."""

    def __init__(self, observer: str = "mse", asym_levels: bool = True):
        """``observer`` is recorded on the activation quantizers (QAT's initial calibration reads it); the ranges of
        a pipeline come from ``Calibrate(method=...)``."""
        super().__init__()
        from qcompile.quant import make_observer

        make_observer(observer)  # an unknown name was accepted and recorded
        self.observer = observer
        self.asym_levels = asym_levels  # False: signed APoT/PoT activations keep the symmetric set

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        if not any(n.meta.get("qconfig") is not None for n in graph.nodes):
            from .select import layer_nodes

            if layer_nodes(gm):  # it inserted nothing, and the layer table still read "W4 apot / A4 apot"
                raise RuntimeError("InsertQuantizers found no layer decisions: run SelectLayers before it "
                                   "(qcompile.pipeline.build_passes gives the full order)")
        layers = [n for n in graph.nodes
                  if n.meta.get("qconfig") is not None and n.meta["qconfig"].action == "quant"]
        from .select import embedding_node, recurrent_module

        recurrent = [n for n in layers if recurrent_module(gm, n) is not None]
        tables = [n for n in layers if embedding_node(gm, n)]
        layers = [n for n in layers if n not in recurrent and n not in tables]
        weight_only = [n for n in recurrent if self._quantize_recurrent(gm, n)]
        weight_only += [n for n in tables if self._quantize_embedding(gm, n)]
        skipped = [n for n in layers if quantizable_module(gm, n) is None and functional_weight(gm, n) is None]
        layers = [n for n in layers if n not in skipped]
        for n in skipped:
            if n.op == "call_module":
                self.report.append(f"left {n.target} in float: unsupported layer form")
        if not layers:
            if not weight_only and not self.report:  # a second run said nothing
                placed = any(isinstance(m, FakeQuantize) for m in gm.modules())
                self.report.append("the layers' quantizers are in place already: nothing inserted" if placed else
                                   "no layer is to be quantized (the decisions keep every layer float): nothing "
                                   "inserted")
            return PassResult(gm, bool(weight_only))

        self._unify_shared_weights(gm, layers)
        act_quant: dict[tuple, torch.fx.Node] = {}
        counter = sum(1 for name, _ in gm.named_children() if name.startswith("act_fq"))
        for node in layers:
            cfg = node.meta["qconfig"]
            mod = quantizable_module(gm, node)
            x = node.args[0]
            key = (x, cfg.ascheme, cfg.abits)
            if key not in act_quant:
                nonneg = is_nonnegative(gm, x)
                asym = cfg.ascheme == "uniform" and not nonneg
                fq = FakeQuantize("uniform_asym" if asym else cfg.ascheme, cfg.abits, signed=not nonneg and not asym,
                                  axis=None, role="activation", observer=self.observer)
                # APoT/PoT on a tensor that may be negative: Calibrate may shift the unsigned levels instead
                fq.search_offset = self.asym_levels and fq.signed and bool(quant.asymmetric_offsets(fq.scheme,
                                                                                                     fq.bits))
                name = f"act_fq{counter}"
                counter += 1
                gm.add_submodule(name, fq)
                with graph.inserting_before(node):
                    act_quant[key] = graph.call_module(name, (x,))
                act_quant[key].meta["tensor_meta"] = x.meta.get("tensor_meta") if isinstance(x, torch.fx.Node) else None
            xq = act_quant[key]
            where = str(node.target) if mod is not None else str(functional_weight(gm, node).target).rpartition(".")[0]
            _check_levels(gm.get_submodule(xq.target), where or node.name, cfg.reason)

            if mod is None:  # a functional layer on a parameter: quantize its weight where it is read
                self._quantize_functional(gm, node, xq, cfg)
                continue
            wfq = FakeQuantize(cfg.wscheme, cfg.wbits, signed=True, axis=weight_axis(mod) if cfg.per_channel else None,
                               role="weight", observer="mse")
            _check_levels(wfq, node.target, cfg.reason)
            mod.add_module("weight_fq", wfq)
            with graph.inserting_before(node):
                w = graph.get_attr(f"{node.target}.weight")
                wq = graph.call_module(f"{node.target}.weight_fq", (w,))
                b = graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
                if isinstance(mod, nn.Linear):
                    new = graph.call_function(F.linear, (xq, wq, b))
                elif _layer_fn(_CONV_T_FN, mod) is not None:
                    new = graph.call_function(_layer_fn(_CONV_T_FN, mod), (xq, wq, b, mod.stride, mod.padding,
                                                                     mod.output_padding, mod.groups, mod.dilation))
                else:
                    pad, mode, padding = conv_padding(mod)
                    source = xq if pad is None else graph.call_function(F.pad, (xq, pad, mode))
                    new = graph.call_function(_layer_fn(_CONV_FN, mod), (source, wq, b, mod.stride, padding,
                                                                   mod.dilation, mod.groups))
            new.meta.update(node.meta)
            new.meta["layer"] = str(node.target)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            self.report.append(f"{node.target}: {cfg.describe()}")
        # act quantizers were inserted before their first consumer; keep topological order valid
        graph.lint()
        return PassResult(gm, True)

    def _unify_shared_weights(self, gm: torch.fx.GraphModule, layers: list) -> None:
        """A module called from several places holds one weight, and one weight quantizer (``weight_fq``): where its
        calls were given different weight levels (an ``nn.Linear`` called first as the model's first layer, 8-bit,
        and again later, 4-bit), the last call's quantizer replaced the first's, and the table said W8 for a call
        that ran on 4-bit (or, with --avg-wbits 2, 2-bit) weights. Every call now takes the widest weight levels
        of its calls (the first layer's 8 bits stay 8), and its layer table row says so."""
        import dataclasses

        calls: dict[str, list] = {}
        for node in layers:
            if node.op == "call_module" and quantizable_module(gm, node) is not None:
                calls.setdefault(str(node.target), []).append(node)
        for target, nodes in calls.items():
            cfgs = [n.meta["qconfig"] for n in nodes]
            if len(nodes) < 2 or len({(c.wscheme, c.wbits, c.per_channel) for c in cfgs}) == 1:
                continue
            widest = max(cfgs, key=lambda c: (c.wbits, c.per_channel))
            for n, c in zip(nodes, cfgs):
                if (c.wscheme, c.wbits, c.per_channel) != (widest.wscheme, widest.wbits, widest.per_channel):
                    n.meta["qconfig"] = dataclasses.replace(
                        c, wscheme=widest.wscheme, wbits=widest.wbits, per_channel=widest.per_channel,
                        reason=f"{c.reason}; weights shared with its {widest.reason} call")
            self.report.append(f"{target}: called {len(nodes)} times with one weight, quantized for all calls as "
                               f"W{widest.wbits} {widest.wscheme} ({widest.reason})")

    def _quantize_recurrent(self, gm: torch.fx.GraphModule, node) -> bool:
        """``lstm(x)`` -> ``QuantizedRecurrent(lstm)(x)``: a per-row weight quantizer on every weight matrix of the
        layer (each layer and direction, input and hidden), the layer's weight scheme and bits; its input and the
        recurrence stay float (weight-only quantization, as onnxruntime's ``LSTM``/``GRU``/``RNN`` operators compute
        in float)."""
        mod = gm.get_submodule(node.target)
        if isinstance(mod, QuantizedRecurrent):  # quantized already (a second run, a converted QAT model)
            return False
        cfg = node.meta["qconfig"]
        quantizers = {}
        for name in mod._flat_weights_names:
            if name.startswith("weight_"):
                fq = FakeQuantize(cfg.wscheme, cfg.wbits, signed=True, axis=0 if cfg.per_channel else None,
                                  role="weight", observer="mse")
                _check_levels(fq, str(node.target), cfg.reason)
                quantizers[name] = fq
        owner_path, _, attr = str(node.target).rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        setattr(owner, attr, QuantizedRecurrent(mod, quantizers))
        node.meta["layer"] = str(node.target)
        kind = type(mod).__name__
        self.report.append(f"{node.target}: {cfg.describe(weights_only=True)} ({kind}: its input, states and "
                           f"recurrence stay float)")
        return True

    def _quantize_embedding(self, gm: torch.fx.GraphModule, node) -> bool:
        """``emb(ids)`` -> ``F.embedding(ids, emb.weight_fq(emb.weight), padding_idx)``: one quantizer per row of the
        table (per token), the layer's weight scheme and bits; the ids are the input (nothing to quantize) and the
        rows come out float (the next layer quantizes its input). ``F.embedding(ids, self.table)`` alike."""
        cfg = node.meta["qconfig"]
        if node.op == "call_function":
            weight = node.args[1]
            if weight.op == "call_module":  # read through its quantizer already
                return False
            owner_path, _, attr = str(weight.target).rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            layer = weight_layer_name(gm, str(weight.target), node)
        else:
            owner, layer, attr = gm.get_submodule(node.target), str(node.target), "weight"
            owner_path = layer
        wfq = FakeQuantize(cfg.wscheme, cfg.wbits, signed=True, axis=0 if cfg.per_channel else None,
                           role="weight", observer="mse")
        _check_levels(wfq, layer, cfg.reason)
        fq_name = f"{attr}_fq"
        prefix = f"{owner_path}." if owner_path else ""
        lookups = {str(n.args[1].target) for n in gm.graph.nodes if n.op == "call_function" and n.target is F.embedding
                   and len(n.args) > 1 and isinstance(n.args[1], torch.fx.Node) and n.args[1].op == "call_module"}
        same = next((name for name, m in owner.named_children() if name.startswith(fq_name)
                     and f"{prefix}{name}" in lookups and isinstance(m, FakeQuantize)
                     and m.extra_repr() == wfq.extra_repr()), None)
        if same is not None:  # the same table looked up again (query and document): one quantizer, one stored table
            fq_name = same
        else:
            if hasattr(owner, fq_name):  # the same table read by another layer (a tied output layer): one per use
                fq_name = f"{attr}_fq_{node.name}"
            owner.add_module(fq_name, wfq)
        fq_target = f"{prefix}{fq_name}"
        with gm.graph.inserting_before(node):
            if node.op == "call_function":
                node.args = (node.args[0], gm.graph.call_module(fq_target, (node.args[1],))) + tuple(node.args[2:])
                new = node
            else:
                w = gm.graph.get_attr(f"{node.target}.weight")
                wq = gm.graph.call_module(fq_target, (w,))
                new = gm.graph.call_function(F.embedding, (node.args[0], wq, owner.padding_idx))
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
        new.meta["layer"] = layer
        self.report.append(f"{layer}: {cfg.describe(weights_only=True)} (embedding table, per row)")
        return True

    def _quantize_functional(self, gm: torch.fx.GraphModule, node, xq, cfg) -> None:
        """``F.conv2d(x, self.weight, ...)`` -> ``F.conv2d(act_fq(x), self.weight_fq(self.weight), ...)``: the
        quantizer is a child of the module that owns the parameter (``<attr>_fq``)."""
        weight = functional_weight(gm, node)
        owner_path, _, attr = str(weight.target).rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        wfq = FakeQuantize(cfg.wscheme, cfg.wbits, signed=True, axis=0 if cfg.per_channel else None,
                           role="weight", observer="mse")
        layer = weight_layer_name(gm, str(weight.target), node)  # as SelectLayers and --exclude name it
        _check_levels(wfq, layer, cfg.reason)
        fq_name = f"{attr}_fq"
        if hasattr(owner, fq_name):  # the same parameter read by another layer: one quantizer per use
            fq_name = f"{attr}_fq_{node.name}"
        owner.add_module(fq_name, wfq)
        with gm.graph.inserting_before(node):
            wq = gm.graph.call_module(f"{owner_path}.{fq_name}" if owner_path else fq_name, (weight,))
        node.args = (xq, wq) + tuple(node.args[2:])
        node.meta["layer"] = layer
        self.report.append(f"{layer}: {cfg.describe()} (functional {node.target.__name__})")


def _check_levels(fq: FakeQuantize, layer: str, reason: str = "default") -> None:
    """A level set the quantizer library does not define (ternary/binary on a non-negative activation, PoT
    beyond its bit limit) is a user error (one line, exit 2), not a failure inside a later pass. ``reason`` (the
    layer configuration's) names a config rule that chose the levels, so the fix points there, not at the flags."""
    try:
        fq.levelset
    except ValueError as exc:
        from qcompile.ir import FIXED_BITS

        what = ("--wscheme/--wbits (wscheme=, wbits=)" if fq.role == "weight"
                else "--ascheme/--abits (ascheme=, abits=)")
        if reason.endswith("'") and " '" in reason:  # a config rule chose them (Override.apply: "k15.toml 'conv2'")
            what = f"{'weight' if fq.role == 'weight' else 'activation'} scheme/bits in {reason}"
        levels = f"{fq.scheme} levels" if fq.scheme in FIXED_BITS else f"{fq.scheme} {fq.bits}-bit levels"
        raise UserError(f"{layer}: cannot quantize its {fq.role} with {levels} ({exc}); "
                        f"choose another {what} or keep the layer in float (--exclude, exclude=)") from None


def layer_of(gm: torch.fx.GraphModule, node) -> str | None:
    """The layer name of a quantized conv/linear call_function node (set by InsertQuantizers)."""
    return node.meta.get("layer")
