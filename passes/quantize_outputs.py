"""QuantizeOutputs: re-quantize the outputs of int8-ready layers so onnxruntime can run them on int8 kernels.

onnxruntime fuses ``DequantizeLinear → Conv/MatMul → [Relu] → QuantizeLinear`` into ``QLinearConv`` /
``QLinearMatMul`` only when the layer's output is quantized. A layer whose inputs are 8-bit uniform codes and
whose weights fit int8 (uniform, or APoT/PoT on an int8 grid) gets an 8-bit output quantizer unless its output
(or the output of its single ReLU, ReLU6 or clip to [0, H]) already flows only into 8-bit activation quantizers,
or is the graph's output from a 2-D Linear (``QGemm`` then writes it in float). This is the integer layer of the
lecture, q_Y = S_W S_X / S_Y · (q_W q_X + q_bias) + Z_Y, simulated exactly by the same fake-quantizer.

A 2-D Linear keeps its bias (it exports as ``Gemm``, which onnxruntime runs as ``QGemm`` with the bias on the
int32 accumulator, like a convolution). Other Linear layers with bias export as ``MatMul`` + ``Add``; they are
split so the bias is added after the re-quantization (``MatMul → Q → DQ → Add``), the form onnxruntime fuses.

Before: ``y = F.conv2d(xq, wq, b, ...); z = relu(y); u = y + v``
After:  ``y = F.conv2d(xq, wq, b, ...); yq = out_fq(y); z = relu(yq); u = yq + v``
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from qcompile.qmodules import FakeQuantize

from .base import Pass, PassResult, fake_quantizer, input_quantizer, refuse_pickling, require_calibrated
from .insert_quant import is_nonnegative
from .int8_region import (LOW_BITS, _cat_inputs, _has_codes, _is_add, _is_avgpool, _is_transparent,
                          _read_by_int8_quantizers, _sub_8_bit_act, clip_bounds, is_int8_act, is_rectifier)

_LAYER_FNS = (F.conv1d, F.conv2d, F.conv3d, F.linear)


class QuantizeOutputs(Pass):
    needs_quantizers = True  # before InsertQuantizers: nothing to do, and the report says so

    def __init__(self, bits: int = 8, cells: bool = True):
        super().__init__()
        self.bits = bits
        self.cells = cells  # layers whose APoT/PoT levels BindIntegerLayers decides on cells need no 8-bit output

    def _candidates(self, gm):
        out = []
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in _LAYER_FNS or node.meta.get("output_quantized"):
                continue
            xfq, wfq = input_quantizer(gm, node.args[0]), fake_quantizer(gm, node.args[1])
            # (with --float-levels the sums stay float: their sub-8-bit levels are decided on the exact sum)
            if wfq is None or not (is_int8_act(xfq) or (uint8_codes(xfq) and (
                    _feeds_int8_only(gm, node, any_bits=self.cells) or
                    (self.cells and (_feeds_residual_add(gm, node) or _feeds_float_op(gm, node)))))):
                continue
            grid = wfq.levelset.grid
            if min(grid) < -128 or max(grid) > 127:
                continue
            out.append(node)
        return out

    def _as_gemm(self, gm, node) -> bool:
        """A Linear on (..., d) inputs whose output only goes out through a float tail (a per-token head: logits
        (B, T, C), perhaps transposed for a cross-entropy over tokens): made the 2-D Linear of its rows, so it
        exports as ``Gemm`` and runs as ``QGemm`` writing float logits, as a classifier's do; as ``MatMul`` it needed
        an 8-bit output (per-token logits 37.3 dB against float instead of 46). The input quantizer, per tensor,
        moves after the flatten only where this Linear is its one reader."""
        x = node.args[0]
        rank = _rank(x)
        if node.target is not F.linear or rank is None or rank < 3 or not _float_tail(node):
            return False
        if not (isinstance(x, torch.fx.Node) and x.op == "call_module" and len(x.users) == 1
                and isinstance(gm.get_submodule(x.target), FakeQuantize)):
            return False
        meta = x.meta["tensor_meta"]
        out_meta = node.meta.get("tensor_meta")
        if out_meta is None or not hasattr(out_meta, "shape"):
            return False
        src = x.args[0]
        rows = int(np.prod(meta.shape[:-1]))
        flat_meta = meta._replace(shape=torch.Size([rows, meta.shape[-1]]), stride=(meta.shape[-1], 1))
        graph = gm.graph
        with graph.inserting_before(x):
            flat = graph.call_method("flatten", (src, 0, -2))
        flat.meta["tensor_meta"] = flat_meta
        flat.meta["qcompile_inserted"] = True  # not the model's op: reports name the one before it
        x.replace_input_with(src, flat)
        x.meta["tensor_meta"] = flat_meta
        # the shape back as a tensor (ONNX Shape → Slice → Concat): torch.onnx's tracer froze ``src.shape[:-1]``
        # to the example's batch where ``src`` came through an unflatten (Reshape to (1, T, C) at any batch)
        with graph.inserting_before(node):
            lead = graph.call_function(operator.getitem, (graph.call_function(torch._shape_as_tensor, (src,)),
                                                          slice(None, -1)))
            last = graph.call_function(torch.tensor, ([int(out_meta.shape[-1])],))
        with graph.inserting_after(node):
            shape = graph.call_function(torch.cat, ([lead, last],))
        with graph.inserting_after(shape):
            back = graph.call_function(torch._reshape_from_tensor, (node, shape))
        node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        back.meta["tensor_meta"] = out_meta
        node.meta["tensor_meta"] = out_meta._replace(shape=torch.Size([rows, out_meta.shape[-1]]),
                                                     stride=(out_meta.shape[-1], 1))
        self.report.append(f"{node.meta.get('layer', node.name)}: per-token head as a 2-D Linear (float logits)")
        return True

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        changed = False
        count = sum(1 for name, _ in gm.named_children() if name.startswith("out_fq"))
        for node in self._candidates(gm):
            if self._as_gemm(gm, node):
                changed = True
                node.meta["output_quantized"] = True
                continue
            node.meta["output_quantized"] = True
            users = list(node.users)
            tail = users[0] if len(users) == 1 and is_rectifier(gm, users[0]) else node
            # A 2-D Linear exports as Gemm(x, W, b), which onnxruntime runs as QGemm (bias on the accumulator) when
            # its output is quantized. Any other Linear with bias exports as MatMul + Add: split the bias off so
            # that MatMul → Q fuses into QLinearMatMul.
            split = node.target is F.linear and len(node.args) > 2 and node.args[2] is not None \
                and _rank(node.args[0]) != 2
            requant = uniform_uint8 if self.cells else is_int8_act
            if not split and tail.users and all(requant(fake_quantizer(gm, u)) for u in tail.users):
                continue  # already Conv/Gemm → [Relu] → Q
            if self.cells and not split and (node.target is not F.linear or _rank(node.args[0]) == 2) \
                    and cell_output(gm, node) is not None:
                continue  # its APoT/PoT levels are decided on the accumulator (BindIntegerLayers._bind_cells)
            if is_float_output_gemm(node):
                continue  # QGemm writes the graph output in float straight from its accumulator: no 8-bit logits
            if _normalized_only(node):
                continue  # a per-sample norm rescales each part by its own spread: one 8-bit step would not do
            if _reaches_requantized_softmax(gm, tail):
                self.report.append(f"{node.meta.get('layer', node.name)}: float output (a Softmax reads it)")
                continue
            if split:
                # y = x W^T + b  ->  y = Q(x W^T) + b
                bias = node.args[2]
                node.args = (node.args[0], node.args[1], None)
                with graph.inserting_after(node):
                    add = graph.call_function(torch.add, (node, bias))
                node.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
                add.meta.update({k: v for k, v in node.meta.items() if k == "tensor_meta"})
                anchor, tail = node, add
                if len(users) == 1 and is_rectifier(gm, users[0]):
                    tail = add  # the bias add sits between the matmul and its relu; quantize the matmul output
            else:
                anchor = tail if tail is not node else node
            nonneg = is_nonnegative(gm, anchor)
            fq = FakeQuantize("uniform" if nonneg else "uniform_asym", self.bits, signed=False, role="activation",
                              observer="minmax")
            fq.saturation = saturation_bounds(gm, anchor)
            fq.optional = True  # for the int8 kernels only: data-free calibration may leave the output float instead
            name = f"out_fq{count}"
            count += 1
            gm.add_submodule(name, fq)
            with graph.inserting_after(anchor):
                qnode = graph.call_module(name, (anchor,))
            anchor.replace_all_uses_with(qnode, delete_user_cb=lambda u: u is not qnode)
            qnode.meta["tensor_meta"] = anchor.meta.get("tensor_meta")
            self.report.append(f"{node.meta.get('layer', node.name)}: 8-bit output")
            changed = True
        return PassResult(gm, changed)


# beyond these, tanh/sigmoid are their limits to float32's resolution (|tanh(10) - 1| < 5e-9, sigmoid(-17) < 5e-8)
_SOFT_LIMITS = {"tanh": 10.0, "sigmoid": 17.0, "hardsigmoid": 3.0}


def _soft_limit(gm: torch.fx.GraphModule, node) -> float | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        name = {torch.nn.Tanh: "tanh", torch.nn.Sigmoid: "sigmoid", torch.nn.Hardsigmoid: "hardsigmoid"}.get(type(mod))
    elif node.op == "call_function":
        name = {torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
                F.hardsigmoid: "hardsigmoid"}.get(node.target)
    elif node.op == "call_method":
        name = node.target if node.target in ("tanh", "sigmoid") else None
    else:
        name = None
    return _SOFT_LIMITS.get(name)


def saturation_bounds(gm: torch.fx.GraphModule, node) -> tuple[float, float] | None:
    """(lo, hi) past which every reader of ``node`` gives the same output as at the bound: its readers are all
    tanh, sigmoid, hardsigmoid or clips (through a bias add, shifted by the bias), else None.

    A layer's 8-bit output that feeds tanh on raw features spanned ±400: a step of 3 rounded all of tanh's
    sensitive [-3, 3] to 0 or ±3 (wine MLP: 81.5 % against 92.6 % float). Calibrated on values clamped to these
    bounds, its levels cover what the function can tell apart, and what lies beyond still saturates to the bound's
    code, whose image is the function's limit."""
    users = list(node.users)
    shift_lo = shift_hi = 0.0
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in (torch.add, operator.add) \
            and len(users[0].args) == 2 and users[0].args[0] is node and isinstance(users[0].args[1], torch.fx.Node) \
            and users[0].args[1].op == "get_attr":  # y = x W^T, then + b (QuantizeOutputs' split Linear)
        bias = _attr(gm, users[0].args[1].target)
        if not isinstance(bias, torch.Tensor) or bias.numel() == 0:
            return None
        shift_lo, shift_hi = float(bias.detach().min()), float(bias.detach().max())
        node = users[0]
        users = list(node.users)
    if not users:
        return None
    lo, hi = float("inf"), float("-inf")
    for user in users:
        if not user.args or user.args[0] is not node:
            return None
        bounds = clip_bounds(gm, user)
        if bounds is None:
            limit = _soft_limit(gm, user)
            if limit is None:
                return None
            bounds = (-limit, limit)
        lo, hi = min(lo, bounds[0]), max(hi, bounds[1])
    lo, hi = lo - shift_hi, hi - shift_lo  # y + b_c >= hi for every channel c once y >= hi - min(b)
    if lo == float("-inf") and hi == float("inf"):
        return None
    return lo, hi


def _attr(gm: torch.fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


# what may follow the classifier on its way to the graph output, in float after QGemm's float output: shape ops,
# casts, a temperature, (log-)softmax, argmax/max/topk. Re-quantizing the logits to 8 bits for them cost 4-13 dB
# against float.
_TAIL_METHODS = {"view", "reshape", "squeeze", "unsqueeze", "flatten", "float", "contiguous", "clone", "to",
                 "transpose", "permute", "t", "softmax", "log_softmax", "mul", "div", "add", "sub", "__truediv__",
                 "__mul__", "__getitem__", "unflatten", "argmax", "argmin", "max", "min", "topk", "sort"}
_TAIL_FUNCTIONS = {torch.reshape, torch._reshape_from_tensor, torch.flatten, torch.squeeze, torch.unsqueeze,
                   torch.transpose, torch.permute, torch.softmax, torch.log_softmax, F.softmax, F.log_softmax,
                   torch.mul, torch.div, torch.add, torch.sub, operator.mul, operator.truediv, operator.add, operator.sub, operator.getitem,
                   torch.argmax, torch.argmin, torch.max, torch.min, torch.topk, torch.sort}
_TAIL_ARITHMETIC = {"mul", "div", "add", "sub", "__truediv__", "__mul__", torch.mul, torch.div, torch.add, torch.sub,
                    operator.mul, operator.truediv, operator.add, operator.sub}


def _float_tail(node, depth: int = 0) -> bool:
    """Every use of ``node`` leads to the graph output through :data:`_TAIL_METHODS`/:data:`_TAIL_FUNCTIONS`
    (arithmetic only with numbers or the model's own constants, never with another value of the graph)."""
    if not node.users or depth > 16:
        return False
    for u in node.users:
        if u.op == "output":
            continue
        if (u.op == "call_function" and u.target is getattr and u.args[1] in ("shape", "dtype", "device")) or \
                (u.op == "call_method" and u.target in ("size", "dim")):
            continue  # reads the shape (lg.view(lg.shape[0], -1)), not the values
        if u.op == "call_function" and u.target is getattr and u.args[1] in ("values", "indices"):
            if not _float_tail(u, depth + 1):  # lg.max(1).indices, torch.topk(lg, 3).values
                return False
            continue
        if u.op == "call_function" and isinstance(u.target, type) and issubclass(u.target, tuple) \
                and hasattr(u.target, "_fields"):
            if not _float_tail(u, depth + 1):  # a namedtuple of outputs
                return False
            continue
        known = (u.op == "call_method" and u.target in _TAIL_METHODS) or \
            (u.op == "call_function" and u.target in _TAIL_FUNCTIONS)
        if not known:
            return False
        if u.target in _TAIL_ARITHMETIC:
            # by a number or a constant of the model (a temperature Parameter, a buffer): 0.5 * lg, lg / self.T
            others = [a for a in u.args if a is not node]
            if node not in u.args or not all(isinstance(a, (int, float)) or
                                             (isinstance(a, torch.fx.Node) and a.op == "get_attr") for a in others):
                return False
        elif u.args[0] is not node or (u.target in ("max", "min", torch.max, torch.min) and any(
                isinstance(a, torch.fx.Node) for a in list(u.args[1:]) + list(u.kwargs.values()))):
            return False  # torch.max(lg, other): with another value of the graph
        if not _float_tail(u, depth + 1):
            return False
    return True


def is_float_output_gemm(node) -> bool:
    """A 2-D Linear (exported as Gemm) whose output goes to the graph outputs only, directly or through a float tail
    (:func:`_float_tail`: ``lg.view(B, -1)``, ``lg / T``, ``F.log_softmax(lg, -1)``, a namedtuple), or only into
    LayerNorms (:func:`_normalized_only`)."""
    return node.target in (F.linear, _int8_fns()[F.linear]) and _rank(node.args[0]) == 2 and \
        (_float_tail(node) or _normalized_only(node))


def _is_softmax(gm: torch.fx.GraphModule, node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), torch.nn.Softmax)
    if node.op == "call_function":
        return node.target in (F.softmax, torch.softmax, torch.Tensor.softmax)
    return node.op == "call_method" and node.target == "softmax"


def _reaches_requantized_softmax(gm: torch.fx.GraphModule, node) -> bool:
    """A Softmax reads ``node`` (through reshapes, transposes, max-pooling: ``_is_transparent``) and a quantizer
    reads the softmax (``_requantized``). With 8-bit codes there, the file holds ``DequantizeLinear → Softmax →
    QuantizeLinear``, which onnxruntime's extended optimizations fuse into ``com.microsoft.QLinearSoftmax``: a
    table of exp on the input codes, a float sum, and the output scale rounded down to 1 / floor(1 / S_y); not
    the float softmax the simulation computes (EfficientFormerV2's attention heads: 14-19 % of the codes after
    the softmax differed). The layer keeps its output float there: the softmax then runs in float on it, as in
    the simulation."""
    stack, seen = list(node.users), set()
    while stack:
        cur = stack.pop()
        if cur in seen or cur.op == "output":
            continue
        seen.add(cur)
        if _is_softmax(gm, cur):
            if _requantized(gm, cur):
                return True
            continue
        if _is_transparent(gm, cur) and len(seen) <= 64:
            stack.extend(cur.users)
    return False


def _requantized(gm: torch.fx.GraphModule, node) -> bool:
    """A quantizer reads ``node`` directly or through reshapes and transposes (onnxruntime moves a
    ``QuantizeLinear`` back across those to the op it fuses)."""
    stack, seen = list(node.users), set()
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if fake_quantizer(gm, cur) is not None:
            return True
        if _is_transparent(gm, cur) and len(seen) <= 64:
            stack.extend(cur.users)
    return False


def _normalized_only(node) -> bool:
    """Every reader of ``node`` is a per-sample normalization of it: LayerNorm, GroupNorm, or InstanceNorm without
    running statistics. An 8-bit output before one has one step for the whole tensor, and the norm divides each
    row, group or channel of each sample by its own spread: rows 15x narrower than others came out with 20 % error
    (raw breast-cancer MLP, Linear → LayerNorm → ReLU: 93.6 % at W8A8 against 97.7 % float); a conv before an
    InstanceNorm lost 8.6 dB (29.2 against 37.8 dB). A 2-D Linear's QGemm writes the float output instead, at the
    same int8 speed; other layers keep their output float (a Linear on tokens: MatMulIntegerToFloat, int8 speed; a
    conv: a float Conv on its dequantized weights, slower, as float as the norm after it)."""
    if not node.users:
        return False
    for u in node.users:
        if not u.args or u.args[0] is not node:
            return False
        if u.op == "call_module":
            mod = u.graph.owning_module.get_submodule(u.target)
            if isinstance(mod, torch.nn.modules.instancenorm._InstanceNorm):
                if mod.track_running_stats:  # eval: a fixed affine map per channel, as a BatchNorm
                    return False
            elif not isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                return False
        elif not (u.op == "call_function" and (u.target in (F.layer_norm, F.group_norm) or
                                               (u.target is F.instance_norm and not _uses_running_stats(u)))):
            return False
    return True


def _uses_running_stats(node) -> bool:
    """``F.instance_norm(x, running_mean, running_var, ..., use_input_stats=False)``: a fixed map per channel."""
    use_input = node.kwargs.get("use_input_stats", node.args[5] if len(node.args) > 5 else True)
    return use_input is False


def _feeds_int8_only(gm: torch.fx.GraphModule, node, any_bits: bool = False) -> bool:
    """Every value of layer ``node`` reaches 8-bit uniform activation quantizers only (``any_bits``: or activation
    quantizers of at most ``LOW_BITS`` bits), through at most one ReLU / clip and then max-/average-pooling and reshapes
    (``_is_transparent``), and at least one of them is not right after the layer or its ReLU. A layer on sub-8-bit
    input codes (uniform, APoT, PoT) runs on the same uint8 × int8 kernels as one on 8-bit codes; where its output
    goes to the 8-bit input of a classifier through a max-pool and a flatten, it needs the same 8-bit output
    quantizer to be fused (it ran as a float Conv at W4A4, a QLinearConv at W8A8). With ``any_bits`` a uniform
    quantizer of at most ``LOW_BITS`` bits after a max-pool re-quantizes those 8-bit codes, as it does after an
    8-bit-input layer (APoT/PoT levels there are decided on cells instead: ``QuantizeOutputs.call`` checks that
    first)."""
    users = list(node.users)
    tail = users[0] if len(users) == 1 and is_rectifier(gm, users[0]) else node
    stack, found, deep = [(u, 0) for u in tail.users], False, False
    while stack:
        cur, depth = stack.pop()
        fq = fake_quantizer(gm, cur)
        if fq is not None:
            if not (is_int8_act(fq) or (any_bits and _sub_8_bit_act(fq))):
                return False
            found, deep = True, deep or depth > 0
            continue
        if _cat_inputs(cur) is not None and _read_by_int8_quantizers(gm, cur):
            # a concatenation that 8-bit quantizers read (Res2Net's pooled part beside its convolved ones):
            # QuantizeResiduals joins codes there
            found, deep = True, True
            continue
        if not (_is_transparent(gm, cur) or _is_avgpool(gm, cur)) or not cur.users or len(stack) > 64:
            return False
        stack.extend((u, depth + 1) for u in cur.users)
    return found and deep


def _feeds_float_op(gm: torch.fx.GraphModule, node) -> bool:
    """Layer ``node`` (on sub-8-bit input codes) writes, after at most one ReLU / clip, into something other than
    activation quantizers and residual adds: a resize, a concatenation, a pixel shuffle, an average pool, a
    graph output (through max-pooling and reshapes). Its sum is float there anyway, so an 8-bit output quantizer
    costs 8-bit noise only and lets the layer run on the int8 kernels, as at W8A8 (a U-Net at W4A4 ran 3 of 7
    convolutions on onnxruntime's float Conv). Not a Linear on (B, T, d) tokens (see ``_feeds_residual_add``); a
    layer whose output a per-sample norm reads keeps it float (``QuantizeOutputs.call``: ``_normalized_only``)."""
    if node.target is F.linear and _rank(node.args[0]) != 2:
        return False
    users = list(node.users)
    tail = users[0] if len(users) == 1 and is_rectifier(gm, users[0]) else node
    stack, seen = list(tail.users), set()
    while stack:  # through max-pooling and reshapes; what ends in quantizers or adds the other rules decide
        cur = stack.pop()
        if cur in seen or fake_quantizer(gm, cur) is not None or _is_add(cur):
            continue
        seen.add(cur)
        if cur.op == "output" or not (_is_transparent(gm, cur) and cur.users) or len(seen) > 64:
            return True
        stack.extend(cur.users)
    return False


def _feeds_residual_add(gm: torch.fx.GraphModule, node) -> bool:
    """Layer ``node`` reads codes of at most ``LOW_BITS`` bits, and its output (after at most one ReLU / clip) goes to
    residual adds whose other operand is or will be 8-bit codes (``_may_have_codes``), and otherwise only to 8-bit or
    low-bit activation quantizers. At 4-bit activations such a layer (a ResNet block's second conv, a MobileNetV2
    projection) ran on float kernels beside a float add; with an 8-bit output quantizer it runs on the int8 kernels,
    and ``QuantizeResiduals`` makes the add an 8-bit ``QLinearAdd`` on the residual stream's codes (8-bit noise
    beside the 4-bit activations the next layers read). Not a Linear on (B, T, d) tokens: its output quantizer
    splits the bias off (``MatMul → Q → DQ → Add``), slower than the ``MatMulIntegerToFloat`` it ran as, where the
    stream beside it (LayerNorm, GELU) stays float anyway."""
    xfq = input_quantizer(gm, node.args[0])
    if xfq is None or xfq.bits > LOW_BITS or (node.target is F.linear and _rank(node.args[0]) != 2):
        return False
    users = list(node.users)
    tail = users[0] if len(users) == 1 and is_rectifier(gm, users[0]) else node
    readers = list(tail.users)
    if not any(_is_add(u) for u in readers):
        return False
    for u in readers:
        if _is_add(u):
            if not all(a is tail or _may_have_codes(gm, a) for a in u.args[:2]):
                return False
        elif not (is_int8_act(fake_quantizer(gm, u)) or _sub_8_bit_act(fake_quantizer(gm, u))):
            return False
    return True


def _may_have_codes(gm: torch.fx.GraphModule, x, depth: int = 0, seen: dict | None = None) -> bool:
    """``x`` is 8-bit codes now (``_has_codes``) or will be once the int8 region is closed: the output of a
    convolution or 2-D Linear (an 8-bit output quantizer where it runs on int8 kernels), through a ReLU / clip,
    max-pooling or reshapes, or a sum of such values (``QuantizeResiduals`` gives it codes). Each node is decided
    once (``seen``): sums of sums that share operands (``y = y + y`` repeated) would otherwise be walked 2^depth
    times."""
    if not isinstance(x, torch.fx.Node) or depth > 64:
        return False
    seen = {} if seen is None else seen
    if x not in seen:
        seen[x] = False  # (a cycle cannot occur in a graph; this only guards the recursion)
        if _has_codes(gm, x):
            seen[x] = True
        elif (is_rectifier(gm, x) or _is_transparent(gm, x)) and x.args:
            seen[x] = _may_have_codes(gm, x.args[0], depth + 1, seen)
        elif x.op == "call_function" and (x.target in (F.conv1d, F.conv2d, F.conv3d) or
                                          (x.target is F.linear and _rank(x.args[0]) == 2)):
            seen[x] = True
        elif _is_add(x):
            seen[x] = all(_may_have_codes(gm, a, depth + 1, seen) for a in x.args[:2])
    return seen[x]


def _rank(node) -> int | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _int8_fns():
    from qcompile.qmodules import int8_conv1d, int8_conv2d, int8_conv3d, int8_linear

    return {F.conv1d: int8_conv1d, F.conv2d: int8_conv2d, F.conv3d: int8_conv3d, F.linear: int8_linear}


class BindIntegerLayers(Pass):
    """Make the simulation of each int8 layer compute what an integer kernel computes, bit for bit.

    An int8 layer: 8-bit uniform input codes, weights on an int8 grid, and an output that flows (directly or
    through one ReLU) only into 8-bit uniform quantizers. For it:

    - (the bias is already on the accumulator grid S_x·S_w: ``QuantizeBias`` runs before);
    - the layer (``int8_conv2d``/``int8_linear``) recovers the integer codes of its input and weights from their
      units and accumulates them exactly; its float64 output divided by S_x·S_w is the int32 accumulator;
    - the quantizers that read it re-quantize like onnxruntime's QLinearConv/QLinearMatMul:
      code = clamp(round_half_even(float32(acc) · float32(float32(S_x·S_w) / S_y)) + Z_y).

    A 2-D Linear whose output is the graph's runs as ``QGemm`` with a float output: its output is
    float32(acc) · float32(S_x·S_w) (``IntegerOutput``), not re-quantized.

    Runs last, after calibration and bias correction (it reads final α and biases). Export is unchanged.
    """
    needs_quantizers = True  # before InsertQuantizers: nothing to do, and the report says so

    def __init__(self, float_outputs: bool = True, cells: bool = True):
        super().__init__()
        self.float_outputs = float_outputs  # False: a final Linear keeps its float32 output (QAT's trained one)
        self.cells = cells  # False: layers whose output goes to APoT/PoT/log2 levels stay float (exact decisions)

    def _bind_cells(self, gm, node, rect, xfq, wfq, out, repeat: int = 1) -> bool:
        """An int8 layer whose output flows (see :func:`cell_output`) into one APoT/PoT/log2 activation quantizer:
        decide its level from the integer accumulator (``FakeQuantize.cells``). In onnxruntime the layer then runs
        as ``QLinearConv``/``QGemm`` writing uint8 cells (max-pooling and reshapes move onto the cells: the cell
        of a maximum is the maximum of the cells), and one table lookup gives the level codes
        (``qcompile.emit.emit_cell_requant``).

        Only layers that keep a bias input in ONNX (convolutions, 2-D Linear = ``Gemm``): the quarter-unit shift
        of the cells is added to that bias."""
        if not out.calibrated or out.requant is not None:
            return False
        cells = out.levelset.requant_cells
        if cells is None or (node.target is F.linear and _rank(node.args[0]) != 2):
            return False
        z, table = cells
        if rect is not None:
            lo, hi = clip_bounds(gm, rect)
            if lo != 0.0 or z != 0 or out.levelset.qmin != 0 or float(out.alpha.max()) > hi:
                return False  # the cells would not reproduce the ReLU/clip
        acc_scale = self._acc_scale(xfq, wfq)
        s_cell = quant_unit(out) / 2  # exact halving in float32
        shift = -torch.round((quant_unit(out).double() / 4) / acc_scale.double())
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        q_bias = torch.zeros_like(shift)
        if bias is not None:
            from .base import attr_value

            if not (isinstance(bias, torch.fx.Node) and bias.op == "get_attr"):
                return False
            q_bias = torch.round(attr_value(gm, bias).detach().double().reshape(-1) / acc_scale.double())
        if float((q_bias + shift).abs().max()) >= 2 ** 22:
            return False  # the shifted bias would not survive float32 in the file
        out.requant = (acc_scale.double(), (acc_scale / s_cell).float(), -1 if node.target is F.linear else 1)
        out.cells = (shift, z, torch.tensor(np.array(table), dtype=torch.int64), int(repeat))
        out.requant_top = _finite_top(gm, rect)
        return True

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        require_calibrated(gm, "BindIntegerLayers")  # it skipped uncalibrated quantizers without a word
        fns = _int8_fns()
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in fns:
                continue
            xfq, wfq = input_quantizer(gm, node.args[0]), fake_quantizer(gm, node.args[1])
            if not uint8_codes(xfq) or wfq is None or not xfq.calibrated or not wfq.calibrated:
                continue
            grid = wfq.levelset.grid
            if min(grid) < -128 or max(grid) > 127:
                continue
            if is_float_output_gemm(node):
                if not self.float_outputs:
                    continue
                self._bind_float_output(gm, node, xfq, wfq)
                self._bind(gm, node, fns, xfq, wfq)
                self.report.append(f"{node.meta.get('layer', node.name)}: int8 layer, float output")
                changed = True
                continue
            found = cell_output(gm, node) if self.cells else None
            if found is not None and self._bind_cells(gm, node, found[1], xfq, wfq, found[0], found[2]):
                self._bind(gm, node, fns, xfq, wfq)
                self.report.append(f"{node.meta.get('layer', node.name)}: int8 layer, {found[0].scheme} output cells")
                changed = True
                continue
            users = list(node.users)
            tail = users[0] if len(users) == 1 and is_rectifier(gm, users[0]) else node
            outs = [fake_quantizer(gm, u) for u in tail.users]
            requant = uniform_uint8 if self.cells else is_int8_act  # sub-8-bit uniform levels with the cells
            if not outs or not all(requant(o) and o.calibrated for o in outs):
                continue
            if tail is not node and not all(_implies(o, clip_bounds(gm, tail)) for o in outs):
                continue  # the re-quantization would not reproduce the ReLU/clip: keep the layer in float
            acc_scale = self._acc_scale(xfq, wfq)  # float32 values, per output channel
            for out in outs:
                # S_y = alpha_y / denom_y in float32, then (S_x·S_w) / S_y in float32, as onnxruntime does
                s_y = quant_unit(out)
                multiplier = (acc_scale / s_y).float()
                axis = -1 if node.target is F.linear else 1
                out.requant = (acc_scale.double(), multiplier, axis)
                out.requant_top = _finite_top(gm, tail if tail is not node else None)
            self._bind(gm, node, fns, xfq, wfq)
            self.report.append(f"{node.meta.get('layer', node.name)}: int8 layer")
            changed = True
        if changed:  # the bound layers call qcompile's kernels, which torch.fx's unpickling re-traces and fails on
            refuse_pickling(gm)
        return PassResult(gm, changed)

    def _bind(self, gm, node, fns, xfq, wfq) -> None:
        """The integer layer, given its units (float32 buffers of ``gm.int8_units``): S_x, S_w per output channel
        and float32(S_x·S_w), so it recovers the integer codes of its input and weights and accumulates them
        exactly (``qcompile.qmodules.int8_accumulator``)."""
        from qcompile import quant

        if not hasattr(gm, "int8_units"):
            gm.add_submodule("int8_units", torch.nn.Module())
        holder = gm.get_submodule("int8_units")
        key = f"u{len(list(holder.buffers())) // 3}"
        units = {"x": quant_unit(xfq).reshape(()),
                 "w": quant.unit_from_alpha(wfq.alpha, wfq.levelset).float().reshape(-1),
                 "acc": self._acc_scale(xfq, wfq)}
        refs = []
        with gm.graph.inserting_before(node):
            for what, value in units.items():
                holder.register_buffer(f"{key}_{what}", value.detach().clone())
                refs.append(gm.graph.get_attr(f"int8_units.{key}_{what}"))
        node.target = fns[node.target]
        node.kwargs = {**node.kwargs, "units": tuple(refs)}

    def _bind_float_output(self, gm, node, xfq, wfq) -> None:
        """y = float32(acc) · float32(S_x·S_w): what onnxruntime's QGemm writes when its output is not quantized."""
        from qcompile.qmodules import IntegerOutput

        count = sum(1 for name, _ in gm.named_children() if name.startswith("int_out"))
        name = f"int_out{count}"
        gm.add_submodule(name, IntegerOutput(xfq, self._acc_scale(xfq, wfq)))
        with gm.graph.inserting_after(node):
            out = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
        out.meta["tensor_meta"] = node.meta.get("tensor_meta")

    @staticmethod
    def _acc_scale(xfq, wfq) -> torch.Tensor:
        from .quantize_bias import accumulator_scale

        return accumulator_scale(xfq, wfq)


def cell_output(gm: torch.fx.GraphModule, node):
    """``(quantizer, rectifier node or None, repeat)`` where the output of layer ``node`` flows, one user after
    another, through max-pooling / identities, at most one ReLU / clip to [0, H] and at most one flatten from the
    channel axis on, into one activation quantizer whose levels an int8 kernel can decide on cells
    (``LevelSet.requant_cells``); else None. ``repeat``: after such a flatten each channel is a run of ``repeat``
    consecutive elements (the product of the spatial dims), else 1."""
    cur, rect, repeat = node, None, 1
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        fq = fake_quantizer(gm, user)
        if fq is not None:
            ok = fq.role == "activation" and fq.levelset.requant_cells is not None
            return (fq, rect, repeat) if ok else None
        if rect is None and is_rectifier(gm, user):
            rect = user
        elif repeat == 1 and _channel_flatten(gm, user, cur, node) is not None:
            repeat = _channel_flatten(gm, user, cur, node)
        elif not _keeps_channels(gm, user):
            return None
        cur = user
    return None


def _channel_flatten(gm: torch.fx.GraphModule, node, source, layer) -> int | None:
    """For a flatten of dims 1.. (``nn.Flatten()``, ``torch.flatten(x, 1)``, ``x.flatten(1)``) of ``source``, a
    convolution's output or what max-pooling made of it, with known shape: the number of elements per channel
    after it (``source``'s spatial size: a pool before the flatten shrinks it); else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        ok = isinstance(mod, torch.nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1
    elif (node.op == "call_function" and node.target is torch.flatten) or \
            (node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        ok = start == 1 and end == -1
    else:
        return None
    meta = source.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if not ok or layer.target is F.linear or shape is None or len(shape) < 3:
        return None
    repeat = 1
    for d in shape[2:]:
        repeat *= int(d)
    return repeat


_ZERO_OR_WRAPPING_PADS = (torch.nn.ConstantPad1d, torch.nn.ConstantPad2d, torch.nn.ConstantPad3d,
                          torch.nn.CircularPad1d, torch.nn.CircularPad2d, torch.nn.CircularPad3d)


def _keeps_channels(gm: torch.fx.GraphModule, node) -> bool:
    """Max-pooling, identity or dropout: the cell of each output element is a cell of the same channel (the
    per-channel re-quantization still applies; a reshape would move the channels)."""
    if not _is_transparent(gm, node):
        return False
    if node.op == "call_module":
        # (a zero pad is no cell of the layer, and a circular one exports as slices and a concatenation that the
        # emitted file cannot move onto cells: those layers decide their levels in float)
        return not isinstance(gm.get_submodule(node.target), (torch.nn.Flatten,) + _ZERO_OR_WRAPPING_PADS)
    if node.op == "call_function":
        return node.target in (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.dropout)
    return node.target == "contiguous"


def uniform_uint8(fq) -> bool:
    """An activation quantizer with uniform levels whose codes are uint8 (8-bit, or fewer bits clipped to their
    range): an integer kernel re-quantizes onto it, ``clamp(round(acc · M) + Z, code_min, code_max)``."""
    if fq is None or fq.role != "activation" or fq.scheme not in ("uniform", "uniform_asym"):
        return False
    ls = fq.levelset
    return ls.code_min >= 0 and ls.code_max <= 255


def uint8_codes(fq) -> bool:
    """An activation quantizer whose codes the file stores as uint8 (8-bit uniform, including asymmetric with a
    zero point; unsigned uniform levels up to 255; APoT, PoT and log2 levels spanning at most 255 grid integers,
    with a zero point where they reach below 0): the input onnxruntime's uint8 x int8 kernels take (it fuses no
    int8-activation convolution on x86)."""
    if fq is None or fq.role != "activation":
        return False
    if is_int8_act(fq):
        return True
    ls = fq.levelset
    if not ls.is_uniform:  # stored as uint8 grid - grid[0] where that fits (qcompile.emit.act_storage)
        return ls.code_max - min(ls.code_min, 0) <= 255
    return ls.code_min >= 0 and ls.code_max <= 255


def _finite_top(gm, rect) -> float | None:
    """H of the ReLU6 / clip to [0, H] ``rect`` between an int8 layer and its re-quantizing quantizer; None for a
    ReLU or no rectifier (``FakeQuantize.requant_top``)."""
    if rect is None:
        return None
    hi = clip_bounds(gm, rect)[1]
    return hi if math.isfinite(hi) else None


def _implies(fq, bounds) -> bool:
    """True when quantizing with ``fq`` already applies the clip ``bounds`` = (0, H): real 0 is code 0 and the
    top level is at most H."""
    lo, hi = bounds
    return lo == 0.0 and not fq.asymmetric and not fq.signed and float(fq.alpha.max()) <= hi


def quant_unit(fq) -> torch.Tensor:
    from qcompile import quant

    return quant.unit_from_alpha(fq.alpha, fq.levelset).float()
