"""Close the int8 region: quantize what sits between int8 layers, so onnxruntime runs the whole chain in int8.

Between two int8 layers a ResNet or MobileNet has residual adds, pooling and reshapes. Left in float, each of them
costs a ``DequantizeLinear``/``QuantizeLinear`` pair (and layout transposes) in onnxruntime. Quantized the way its
QDQ fusions expect, onnxruntime runs them as ``QLinearAdd``, ``QLinearGlobalAveragePool`` and uint8 ``MaxPool``,
and removes a ``Relu``/``Clip`` whose range the following quantizer already implies.

``QuantizeResiduals`` (structure, before calibration): every residual add (and average pool) whose inputs are
8-bit uniform codes gets an 8-bit output quantizer, after its single ReLU where there is one; a skip connection
that read the float tensor reads that tensor's 8-bit codes instead.

    Before: ``h = relu(a);  c = conv(act_fq(h));  s = add(out_fq(conv2(...)), h)``
    After:  ``h = relu(a);  hq = act_fq(h);  c = conv(hq);  s = res_fq(relu(add(out_fq(conv2(...)), hq)))``

This is the quantized model of the lecture's integer residual block: both addends are codes, the sum is
re-quantized, ``q_s = round((S_a(q_a − Z_a) + S_b(q_b − Z_b)) / S_s) + Z_s``.

It does the same for gates (EfficientNet's MBConv): a product of two activations that only 8-bit quantizers read
multiplies their codes (an SE block's ``x * sigmoid(s)``), a sigmoid of codes reads the codes, and a SiLU of codes
that only 8-bit quantizers read becomes ``xq * gate_q(sigmoid(xq))``: onnxruntime's ``QLinearSigmoid`` and
``QLinearMul``, as in ``quantize_static``'s file (``BindIntegerSigmoids`` / ``BindIntegerMuls`` make the simulation
compute their codes).

``ShareInt8Params`` (parameters, after calibration): a quantizer that re-quantizes codes another 8-bit quantizer
produced, directly or through max-pooling and reshapes, takes that quantizer's parameters (so the re-quantization
is the identity and onnxruntime drops it); and a quantizer right after ``Clip(0, H)``/ReLU6 keeps its range within
``[0, H]`` (so the clip is implied and onnxruntime removes it).
"""
from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from qcompile.qmodules import FakeQuantize

from .base import (Pass, PassResult, attr_value, fake_quantizer, passes_run, recompile_lazily,
                   require_calibrated)
from .calibrate import BIAS_FIT
from .insert_quant import is_nonnegative

_ADD_FNS = {operator.add, torch.add, operator.iadd}
_AVGPOOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_AVGPOOL_FNS = {F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}
# ops that move or select values without changing them: Q(op(codes)) is op(codes) when Q has the codes' parameters
_TRANSPARENT_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                        nn.AdaptiveMaxPool3d, nn.Flatten, nn.Identity, nn.Dropout)
_TRANSPARENT_FNS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                    F.adaptive_max_pool3d, torch.flatten, torch.reshape, F.dropout}
_ADAPTIVE_MAX_FNS = {F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}  # (x, size, indices)
_TRANSPARENT_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "expand", "expand_as"}


def is_int8_act(fq: FakeQuantize | None) -> bool:
    """An 8-bit uniform activation quantizer: its codes are onnxruntime's uint8 tensors."""
    return fq is not None and fq.role == "activation" and fq.bits == 8 and fq.scheme in ("uniform", "uniform_asym")


def clip_bounds(gm: torch.fx.GraphModule, node) -> tuple[float, float] | None:
    """(lo, hi) of a ReLU / ReLU6 / hardtanh / clamp node with constant bounds, else None."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.ReLU):
            return 0.0, float("inf")
        if isinstance(mod, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            return float(mod.min_val), float(mod.max_val)
        return None
    if node.op == "call_function" and node.target in (F.relu, torch.relu):
        return 0.0, float("inf")
    if node.op == "call_method" and node.target == "relu":
        return 0.0, float("inf")
    if node.op == "call_function" and node.target is F.relu6:
        return 0.0, 6.0
    if node.op == "call_function" and node.target is F.hardtanh:
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return (float(lo), float(hi)) if not isinstance(lo, torch.fx.Node) and not isinstance(hi, torch.fx.Node) \
            else None
    if (node.op == "call_function" and node.target in (torch.clamp, torch.clip)) or \
            (node.op == "call_method" and node.target in ("clamp", "clip")):
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
        if isinstance(lo, torch.fx.Node) or isinstance(hi, torch.fx.Node):
            return None
        return (float("-inf") if lo is None else float(lo)), (float("inf") if hi is None else float(hi))
    if (node.op == "call_function" and node.target is torch.clamp_min) or \
            (node.op == "call_method" and node.target == "clamp_min"):  # x.clamp_min(0): a ReLU
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        return None if isinstance(lo, torch.fx.Node) or lo is None else (float(lo), float("inf"))
    return None


def is_rectifier(gm: torch.fx.GraphModule, node) -> bool:
    """ReLU, ReLU6, or a clip to [0, H]: an activation an unsigned quantizer after it implies (range within [0, H])."""
    bounds = clip_bounds(gm, node)
    return bounds is not None and bounds[0] == 0.0


def _is_leaky_relu(gm: torch.fx.GraphModule, node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.LeakyReLU)
    return node.op == "call_function" and node.target is F.leaky_relu


def _is_add(node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FNS:
        pass
    elif not (node.op == "call_method" and node.target in ("add", "add_")):
        return False
    tensors = [a for a in node.args[:2] if isinstance(a, torch.fx.Node) and a.op != "get_attr"]
    return len(tensors) == 2 and "alpha" not in node.kwargs  # two activations: not a bias or constant add


_MUL_FNS = {operator.mul, torch.mul, operator.imul}


def _is_mul(node) -> bool:
    """A product of two activations (an SE block's gate times its input), not a scaling by a constant."""
    if node.op == "call_function" and node.target in _MUL_FNS:
        pass
    elif not (node.op == "call_method" and node.target in ("mul", "mul_")):
        return False
    tensors = [a for a in node.args[:2] if isinstance(a, torch.fx.Node) and a.op != "get_attr"]
    if len(tensors) != 2 or tensors[0] is tensors[1]:
        return False
    metas = [a.meta.get("tensor_meta") for a in tensors]
    return all(hasattr(m, "dtype") and m.dtype.is_floating_point for m in metas)


def _is_sigmoid(gm, node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Sigmoid)
    if node.op == "call_function":
        return node.target in (torch.sigmoid, F.sigmoid)
    if node.op == "call_method" and node.target == "sigmoid_":
        # in place (timm's gate): a sigmoid where nothing else reads the tensor it overwrites
        return bool(node.args) and isinstance(node.args[0], torch.fx.Node) and len(node.args[0].users) == 1
    return node.op == "call_method" and node.target == "sigmoid"


_AFFINE_FNS = {operator.add, torch.add, operator.sub, torch.sub, operator.mul, torch.mul, operator.truediv, torch.div}
_AFFINE_METHODS = {"add", "sub", "mul", "div"}


def _scalar_constant(gm, a) -> bool:
    """A number, or a parameter / buffer with one element (a learnable scale or bias)."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return True
    if isinstance(a, torch.fx.Node) and a.op == "get_attr":
        try:
            value = attr_value(gm, a)
        except AttributeError:
            return False
        return isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()
    return False


def _affine_source(gm, node, depth: int = 0):
    """The tensor that ``node`` scales and shifts by constants (``x * s + b``, HGNetV2's learnable affine after
    each ReLU; a chain of scalar mul / add / sub / div, each read by the next alone), else None."""
    if not isinstance(node, torch.fx.Node) or depth > 4 or not (
            (node.op == "call_function" and node.target in _AFFINE_FNS) or
            (node.op == "call_method" and node.target in _AFFINE_METHODS)) or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    div = node.target in (operator.truediv, torch.div, "div")
    if _scalar_constant(gm, b) and isinstance(a, torch.fx.Node) and not _scalar_constant(gm, a):
        src = a
    elif not div and _scalar_constant(gm, a) and isinstance(b, torch.fx.Node) and not _scalar_constant(gm, b):
        src = b
    else:
        return None
    inner = _affine_source(gm, src, depth + 1) if len(src.users) == 1 else None
    return inner if inner is not None else src


def _is_affine_of_codes(gm, node) -> bool:
    src = _affine_source(gm, node)
    return src is not None and _has_codes(gm, src)


def _gate_of_codes(gm, node, depth: int = 0):
    """The sigmoid of 8-bit codes (an SE block's gate, which onnxruntime runs as ``QLinearSigmoid``) that ``node``
    is, or reshapes and broadcasts (ECA's ``gate(y).view(b, -1, 1, 1).expand_as(x)``); else None."""
    if not isinstance(node, torch.fx.Node) or depth > 8 or not node.args:
        return None
    if _is_sigmoid(gm, node):
        return node if _has_codes(gm, node.args[0]) else None
    if len(node.users) == 1 and (_is_transparent(gm, node) or
                                 (node.op == "call_method" and node.target in ("expand", "expand_as"))):
        return _gate_of_codes(gm, node.args[0], depth + 1)
    return None


def _is_gate_of_codes(gm, node) -> bool:
    return _gate_of_codes(gm, node) is not None


def _is_silu(gm, node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.SiLU)
    return node.op == "call_function" and node.target is F.silu


def _is_avgpool(gm, node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _AVGPOOL_MODULES)
    return node.op == "call_function" and node.target in _AVGPOOL_FNS


def _is_transparent(gm, node) -> bool:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Upsample):
            return mod.mode == "nearest"
        if isinstance(mod, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
            return float(mod.value) == 0.0  # (nn.ZeroPad2d is a ConstantPad2d)
        if isinstance(mod, _COPY_PAD_MODULES):
            return True  # reflection / replication: the border repeats values of the tensor
        return isinstance(mod, _TRANSPARENT_MODULES) and not getattr(mod, "return_indices", False)
    if node.op == "call_function":
        if node.target in _ADAPTIVE_MAX_FNS and len(node.args) > 2 and node.args[2]:
            return False  # return_indices given by position
        if node.target is F.interpolate:
            return (node.args[3] if len(node.args) > 3 else node.kwargs.get("mode", "nearest")) == "nearest"
        if node.target is F.pad:
            return _is_level_pad(node)
        if node.target is operator.getitem:
            if _is_split(node.args[0]):
                return isinstance(node.args[1], int)  # one part of a chunk / split
            return _is_basic_slice(node)
        return (node.target in _TRANSPARENT_FNS and not node.kwargs.get("return_indices", False)) or \
            node.target in _SPLIT_FNS
    return node.op == "call_method" and (node.target in _TRANSPARENT_METHODS or node.target in _SPLIT_METHODS)


_COPY_PAD_MODULES = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                     nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)


def _is_level_pad(node) -> bool:
    """``F.pad(x, pads)`` with zeros (constant mode, value 0 or None) or with values of the tensor (reflect,
    replicate, circular): 0 is a level of every 8-bit uniform quantizer (its integer zero point), so the padded
    codes are codes of the same parameters, and onnxruntime pads the uint8 tensor (HGNetV2's stem pads before a
    max-pool and a convolution; image-to-image networks reflect-pad before each convolution)."""
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    if mode in ("reflect", "replicate", "circular"):
        return True  # the border repeats values of the tensor: codes of the same parameters
    return mode == "constant" and (value is None or (isinstance(value, (int, float)) and float(value) == 0.0))


# ops that cut a tensor into parts without changing a value (YOLOv8's C2f: ``list(cv1(x).chunk(2, 1))``); the parts
# are ``getitem`` nodes, which ``_is_transparent`` takes too. onnxruntime slices codes (Split / Slice between a
# DequantizeLinear and a QuantizeLinear of one scale are dropped to a uint8 Split / Slice)
_SPLIT_FNS = {torch.chunk, torch.split, torch.tensor_split, torch.unbind}
_SPLIT_METHODS = {"chunk", "split", "tensor_split", "unbind"}


def _is_split(node) -> bool:
    return isinstance(node, torch.fx.Node) and ((node.op == "call_function" and node.target in _SPLIT_FNS) or
                                                (node.op == "call_method" and node.target in _SPLIT_METHODS))


def _is_basic_slice(node) -> bool:
    """``x[:, :c]``, ``x[..., 0]``: basic indexing of a tensor (slices, integers, None, Ellipsis), which selects
    values without changing one (onnxruntime drops the DequantizeLinear/QuantizeLinear pair around its Slice)."""
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], torch.fx.Node) else None
    if not hasattr(meta, "shape"):
        return False  # an item of a tuple, not a tensor
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    for part in index:
        if isinstance(part, slice):
            if any(isinstance(v, torch.fx.Node) for v in (part.start, part.stop, part.step)):
                return False
        elif not (part is None or part is Ellipsis or (isinstance(part, int) and not isinstance(part, bool))):
            return False
    return True


_CAT_FNS = {torch.cat, torch.concat, torch.concatenate}


def _cat_inputs(node) -> list | None:
    """The tensors a ``torch.cat`` node joins, where they are a list of traced values, else None."""
    if node.op != "call_function" or node.target not in _CAT_FNS:
        return None
    xs = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(xs, (list, tuple)) or not xs or not all(isinstance(a, torch.fx.Node) for a in xs):
        return None
    return list(xs)


def int8_source(gm: torch.fx.GraphModule, node) -> FakeQuantize | None:
    """The 8-bit uniform quantizer whose codes ``node`` carries (itself, or through max-pooling and reshapes)."""
    while isinstance(node, torch.fx.Node):
        fq = fake_quantizer(gm, node)
        if fq is not None:
            return fq if is_int8_act(fq) else None
        if not _is_transparent(gm, node) or not node.args:
            return None
        node = node.args[0]
    return None


def _int8_user(gm, node):
    """A user of ``node`` that is an 8-bit uniform activation quantizer, else None."""
    for user in node.users:
        if is_int8_act(fake_quantizer(gm, user)):
            return user
    return None


def _has_codes(gm, node) -> bool:
    """``node`` is 8-bit codes, is quantized to 8 bits for some consumer, or carries codes through max-pooling or
    reshapes."""
    return isinstance(node, torch.fx.Node) and (int8_source(gm, node) is not None or _int8_user(gm, node) is not None)


def _only_quantizer_readers(gm, node) -> bool:
    """Every reader of ``node`` (through max-pooling and reshapes) is an 8-bit or a low-bit (``_sub_8_bit_act``)
    activation quantizer."""
    return _only_readers(gm, node, lambda fq: is_int8_act(fq) or _sub_8_bit_act(fq))


# Below 8 bits, where an extra 8-bit rounding of a residual sum costs nothing measurable: at 4 bits its noise is
# ~24 dB under the activations'; at 6-7 bits it cost ResNet blocks 0.7-2.6 dB of output SQNR (uniform W7A7 Bottleneck:
# 46.5 against 49.1 dB)
LOW_BITS = 4


def _sub_8_bit_act(fq) -> bool:
    """An activation quantizer of at most ``LOW_BITS`` bits (4-bit uniform, APoT, PoT, ...)."""
    return fq is not None and fq.role == "activation" and fq.bits <= LOW_BITS


def _feeds_int8(gm, node) -> bool:
    """Some consumer of ``node`` (through max-pooling and reshapes) is an 8-bit quantizer, an add, a pool, or a
    SiLU/sigmoid that 8-bit quantizers alone read (it becomes an int8 gate once ``node`` has codes)."""
    todo, seen = list(node.users), set()
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if is_int8_act(fake_quantizer(gm, user)) or _is_add(user) or _is_avgpool(gm, user):
            return True
        if _cat_inputs(user) is not None and _read_by_int8_quantizers(gm, user):
            return True
        if (_is_silu(gm, user) or _is_sigmoid(gm, user)) and _read_by_int8_quantizers(gm, user):
            return True
        if _is_transparent(gm, user):
            todo.extend(user.users)
    return False


def _int8_readers_only(gm, node, depth: int = 0) -> bool:
    """Every reader of ``node`` is int8 once ``node`` is 8-bit codes: an 8-bit quantizer, an add whose other operand
    is codes, a concatenation of codes that only 8-bit quantizers read, an average pool that only 8-bit quantizers
    read, or a max-pool, reshape, split or nearest upsampling whose readers are all such (the graph's output is
    not)."""
    if not node.users or depth > 16:
        return False
    for user in node.users:
        if is_int8_act(fake_quantizer(gm, user)):
            continue
        if _is_add(user):
            if not all(a is node or _will_have_codes(gm, a) for a in user.args[:2]):
                return False
            continue
        xs = _cat_inputs(user)
        if xs is not None:
            if not (_read_by_int8_quantizers(gm, user) or _int8_readers_only(gm, user, depth + 1)) or \
                    not all(a is node or _will_have_codes(gm, a) for a in xs):
                return False  # (the second: Inception's reduction, a max-pool of a block output concatenated)
            continue
        if _is_avgpool(gm, user) and _only_int8_readers(gm, user):
            continue  # QLinearAveragePool (an Inception block's pool branch)
        if not (_is_transparent(gm, user) and _int8_readers_only(gm, user, depth + 1)):
            return False
    return True


def _batchnorm_of_codes(gm, node, reader) -> bool:
    """``node`` is an inference BatchNorm (not folded: no layer before it) of codes, read by ``reader`` alone."""
    return isinstance(node, torch.fx.Node) and list(node.users) == [reader] and _is_inference_bn(gm, node) and \
        _has_codes(gm, node.args[0])


def _is_inference_bn(gm, node) -> bool:
    """A BatchNorm on running statistics (module or ``F.batch_norm``), which no layer before it absorbed."""
    if not isinstance(node, torch.fx.Node) or not node.args:
        return False
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.training and mod.track_running_stats
    if node.op == "call_function" and node.target is F.batch_norm:
        return not node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
    return False


def _will_have_codes(gm, node, depth: int = 0) -> bool:
    """``node`` is codes (``_has_codes``), or becomes codes in ``QuantizeResiduals`` where int8 ops alone read it: a
    SiLU or LeakyReLU of codes, a sum of such values, or a max-pool, split or reshape of one (a C2f block's
    bottleneck sums)."""
    if not isinstance(node, torch.fx.Node) or depth > 16:
        return False
    if _has_codes(gm, node):
        return True
    if _is_silu(gm, node) or _is_leaky_relu(gm, node):
        return bool(node.args) and _has_codes(gm, node.args[0])
    if _is_affine_of_codes(gm, node):
        return True
    if _is_add(node):
        return all(_will_have_codes(gm, a, depth + 1) for a in node.args[:2])
    return _is_transparent(gm, node) and bool(node.args) and _will_have_codes(gm, node.args[0], depth + 1)


def _read_from(gm, node, src, q) -> None:
    """``node`` reads ``q`` (the quantizer of ``src``) instead of ``src``. InsertQuantizers puts a quantizer just
    before the layer it feeds, which may come after ``node`` (a pool branch written before the conv): the
    quantizer, which reads only ``src``, moves up to just before ``node``."""
    for n in gm.graph.nodes:
        if n is q:
            break
        if n is node:
            node.prepend(q)
            break
    node.replace_input_with(src, q)


def _read_by_int8_quantizers(gm, node) -> bool:
    """Every reader of ``node`` is an 8-bit quantizer, directly: onnxruntime fuses ``QLinearMul`` and
    ``QLinearSigmoid`` only with the ``QuantizeLinear`` right after the op (a product read through a flatten stayed
    a float Mul, its SiLU gate quantized for nothing)."""
    return bool(node.users) and all(is_int8_act(fake_quantizer(gm, u)) for u in node.users)


def _only_int8_readers(gm, node) -> bool:
    """Every reader of ``node`` (through max-pooling and reshapes) is an 8-bit quantizer."""
    return _only_readers(gm, node, is_int8_act)


def _reads_sum_codes(gm, user) -> bool:
    """``user`` of a residual sum may read the sum's 8-bit codes instead of the float sum: a BatchNorm that no layer
    absorbs (pre-activation ResNets), or a rectifier that 8-bit quantizers alone read, directly or through a
    scaling by constants (Xception, NF-ResNet). quantize_static's file reads the codes there too."""
    return _is_inference_bn(gm, user) or (is_rectifier(gm, user) and _only_int8_readers_or_scaled(gm, user))


def _only_int8_readers_or_scaled(gm, node) -> bool:
    """Every reader of ``node`` is an 8-bit quantizer (through max-pooling and reshapes), or a scaling of it by
    constants that only such quantizers read (NF-ResNet's ``relu(x) * beta`` before the next block's conv)."""
    if _only_int8_readers(gm, node):
        return True
    return bool(node.users) and all(_scaled_for_int8(gm, u, node) for u in node.users)


def _scaled_for_int8(gm, user, node) -> bool:
    """``user`` scales ``node`` by constants, and 8-bit quantizers alone read the result (directly, through
    max-pooling and reshapes, or through average pools that only they read)."""
    def int8_reader(w) -> bool:
        return is_int8_act(fake_quantizer(gm, w)) or (_is_avgpool(gm, w) and _only_int8_readers(gm, w))

    return _affine_source(gm, user) is node and bool(user.users) and \
        (_only_int8_readers(gm, user) or all(int8_reader(w) for w in user.users))


def _only_readers(gm, node, accept) -> bool:
    """Every reader of ``node``, through max-pooling and reshapes, is a quantizer ``accept(fq)`` takes."""
    todo, seen = list(node.users), set()
    if not todo:
        return False
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if accept(fake_quantizer(gm, user)):
            continue
        if not _is_transparent(gm, user) or not user.users:
            return False
        todo.extend(user.users)
    return True


class QuantizeResiduals(Pass):
    """Give residual adds and average pools on 8-bit codes an 8-bit output quantizer (see the module docstring)."""

    def __init__(self, observer: str = "mse"):
        super().__init__()
        self.observer = observer

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        self._changed = False
        self._count = sum(1 for name, _ in gm.named_children() if name.startswith("res_fq"))
        for node in list(gm.graph.nodes):  # graph order: an add's inputs are settled before the add
            if self._read_codes_through(gm, node):
                continue
            if _is_silu(gm, node) and node.args and _has_codes(gm, node.args[0]) and \
                    not _read_by_int8_quantizers(gm, node) and _int8_readers_only(gm, node):
                # a SiLU on codes whose output goes into adds, concatenations and splits that are int8 once it is
                # codes (YOLOv8's C2f and SPPF): an int8 gate, and its output as 8-bit codes
                prod = self._split_silu(gm, node, self._codes_of(gm, node.args[0]))
                q = self._insert(gm, prod)
                for user in list(prod.users):
                    if user is not q:
                        user.replace_input_with(prod, q)
                continue
            if _is_leaky_relu(gm, node) and node.args and _has_codes(gm, node.args[0]) and \
                    not _read_by_int8_quantizers(gm, node) and _int8_readers_only(gm, node):
                # the same for a LeakyReLU (CSPDarknet's blocks: its output goes into a split, a shortcut add and a
                # concatenation): it reads codes and its output is 8-bit codes, onnxruntime's QLinearLeakyRelu
                src = node.args[0]
                q = self._codes_of(gm, src)
                if q is not src:
                    _read_from(gm, node, src, q)
                q = self._insert(gm, node)
                for user in list(node.users):
                    if user is not q:
                        user.replace_input_with(node, q)
                continue
            if _is_affine_of_codes(gm, node) and not _read_by_int8_quantizers(gm, node) and \
                    _int8_readers_only(gm, node):
                # codes scaled and shifted by constants (HGNetV2's learnable affine after each ReLU), read by pads,
                # pools, concatenations: the result as codes of its own, so that those run on uint8 (the affine
                # itself is a float Mul and Add between DequantizeLinear and QuantizeLinear)
                q = self._insert(gm, node)
                for user in list(node.users):
                    if user is not q:
                        user.replace_input_with(node, q)
                continue
            xs = _cat_inputs(node)
            if xs is not None:
                # a concatenation that only 8-bit quantizers read, of tensors that are codes: it joins the codes
                # (onnxruntime's QLinearConcat re-quantizes each part onto the output's scale)
                direct = _read_by_int8_quantizers(gm, node)
                if (direct or _int8_readers_only(gm, node)) and all(_has_codes(gm, a) for a in xs):
                    if not direct:
                        # read through a slice by a residual add (GhostNet's ghost module, ReXNet's partial
                        # shortcut): the concatenation's output as 8-bit codes for them
                        q = self._insert(gm, node)
                        for user in list(node.users):
                            if user is not q:
                                user.replace_input_with(node, q)
                    for arg in dict.fromkeys(xs):
                        q = self._codes_of(gm, arg)
                        if q is arg:
                            continue
                        carried = fake_quantizer(gm, arg) is None and int8_source(gm, arg) is not None
                        for user in list(arg.users) if carried else [node]:
                            # codes carried through a max-pool or split (SPPF's chain of pools): q re-quantizes
                            # them with their own parameters (ShareInt8Params), so every reader may read q, and
                            # onnxruntime then runs each pool on uint8 between a DequantizeLinear and q
                            if user is not q:
                                _read_from(gm, user, arg, q)
                        self._changed = True
                continue
            if _is_mul(node):
                # a product whose result only 8-bit quantizers read (an SE gate times its input, a GLU): both
                # factors as 8-bit codes, which onnxruntime multiplies in QLinearMul (BindIntegerMuls)
                users = list(node.users)
                clipped = len(users) == 1 and is_rectifier(gm, users[0]) and \
                    _read_by_int8_quantizers(gm, users[0])
                # the product summed with a shortcut of codes (SE-ResNet/ResNeXt blocks: the gated branch plus
                # the block input), of factors that are codes or a sigmoid gate of codes
                summed = len(users) == 1 and _is_add(users[0]) and _int8_readers_only(gm, node) and \
                    all(_has_codes(gm, a) or _is_gate_of_codes(gm, a) for a in node.args[:2])
                if _read_by_int8_quantizers(gm, node) or clipped or summed:
                    for arg in node.args[:2]:
                        gate = _gate_of_codes(gm, arg) if summed else None
                        if gate is not None and gate is not arg and fake_quantizer(gm, gate) is None and \
                                _int8_user(gm, gate) is None:
                            # a gate reshaped and broadcast before the product (ECA): codes right after the
                            # sigmoid (QLinearSigmoid), which the reshapes carry to the product
                            qg = self._insert(gm, gate)
                            for user in list(gate.users):
                                if user is not qg:
                                    user.replace_input_with(gate, qg)
                        q = self._codes_of(gm, arg)
                        if q is not arg:
                            _read_from(gm, node, arg, q)
                            self._changed = True
                    if clipped:
                        # the product read by a ReLU6 before the next layer's quantizer (ReXNet's SE gate): codes
                        # of its own right after it, for QLinearMul; the clip and the re-quantization after them
                        # stay (onnxruntime drops the clip, which the unsigned quantizer after it implies)
                        self._insert(gm, node)
                    elif summed:
                        # codes of its own, which the sum reads: QLinearMul, then QLinearAdd, as in quantize_static's
                        # file (seresnext26d: 8 float Sigmoid, Mul, Add and Relu in every block)
                        _read_from(gm, users[0], node, self._insert(gm, node))
                continue
            if _is_add(node):
                if all(_has_codes(gm, a) or _batchnorm_of_codes(gm, a, node) for a in node.args[:2]):
                    for arg in node.args[:2]:
                        if not _has_codes(gm, arg):
                            # RepVGG's / MobileOne's identity branch, a BatchNorm of the block input that only the
                            # sum reads: its output as codes, so that the sum is int8 (the BatchNorm itself stays
                            # float between DequantizeLinear and QuantizeLinear, as in quantize_static's file)
                            self._insert(gm, arg)
                if not all(_has_codes(gm, a) for a in node.args[:2]):
                    continue  # an add with a float operand stays float, and reads what it read
                for arg in node.args[:2]:
                    q = self._codes_of(gm, arg)
                    if q is not arg:
                        _read_from(gm, node, arg, q)  # the skip connection reads the codes
                        self._changed = True
            elif not _is_avgpool(gm, node):
                continue
            elif fake_quantizer(gm, node.args[0]) is None and int8_source(gm, node.args[0]) is not None and \
                    (_is_split(getattr(node.args[0], "args", (None,))[0]) or _only_int8_readers(gm, node)):
                # a pool of one part of a split of codes (Res2Net's last part in a strided block): the part as
                # codes of its own, which onnxruntime needs after the Split to run it on uint8 and the pool as
                # QLinearAveragePool (re-quantized with the split's parameters by ShareInt8Params: the identity);
                # so for a pool of a max-pool of codes that the next convolutions read too (Inception's stem): the
                # max-pool then has quantizers alone as readers and runs on uint8
                _read_from(gm, node, node.args[0], self._codes_of(gm, node.args[0]))
                self._changed = True
            elif int8_source(gm, node.args[0]) is None:
                if not (_is_global_avgpool(gm, node) and _feeds_int8(gm, node)) and \
                        not (_has_codes(gm, node.args[0]) and _only_int8_readers(gm, node)):
                    # (the second: a pool of a tensor that 8-bit quantizers also read, for 8-bit quantizers alone,
                    # an Inception block's pool branch beside its convolutions: QLinearAveragePool on those codes)
                    continue
                # a global pool of a float tensor (Hardswish/SiLU output: the squeeze of an SE block, a classifier
                # head) whose mean an int8 layer reads: pool the tensor's 8-bit codes, as onnxruntime's
                # QLinearGlobalAveragePool can in its NHWC int8 chain (a float pool there costs two transposes)
                src = node.args[0]
                _read_from(gm, node, src, self._codes_of(gm, src))
                self._changed = True
            users = list(node.users)
            tail = users[0] if len(users) == 1 and is_rectifier(gm, users[0]) else node
            q = _int8_user(gm, tail)
            if q is None and _is_add(node) and tail is node and len(users) == 1 and _is_leaky_relu(gm, users[0]) \
                    and (_int8_user(gm, users[0]) is not None or _feeds_int8(gm, users[0])):
                # the sum read by a LeakyReLU whose output is 8-bit codes (CSPResNet's blocks): the sum as codes too,
                # so that onnxruntime runs QLinearAdd and then QLinearLeakyRelu (a table) between its int8 layers,
                # as in quantize_static's file, instead of a float Add and LeakyRelu (cspresnet50: 13 of each)
                q = self._insert(gm, node)
                _read_from(gm, users[0], node, q)
            if q is None:
                if not (_feeds_int8(gm, tail) or (_is_add(node) and _only_quantizer_readers(gm, tail)) or
                        (_is_add(node) and tail is node and all(_reads_sum_codes(gm, u) for u in tail.users)) or
                        (_is_add(node) and _only_int8_readers_or_scaled(gm, tail))):
                    continue  # e.g. the graph's output: no integer kernel reads it, keep it float
                # (a sum that only sub-8-bit quantizers read, through reshapes: 8-bit codes for QLinearAdd, which
                # those quantizers re-quantize; a sum that only BatchNorms read, the last block of a stage of a
                # pre-activation ResNet: QLinearAdd, whose codes the BatchNorm reads as quantize_static's file does)
                q = self._insert(gm, tail)
            for user in list(tail.users):  # int8-capable consumers read the codes, not the float sum
                if user is not q and (_is_add(user) or _is_avgpool(gm, user) or _is_transparent(gm, user) or
                                      (_cat_inputs(user) is not None and _read_by_int8_quantizers(gm, user)) or
                                      (_is_inference_bn(gm, user) and len(user.users) == 1 and
                                       _is_add(next(iter(user.users))))):
                    # (a BatchNorm read by an add: RepVGG's identity branch, which then reads the block input's
                    # codes, so that the sum before it is a QLinearAdd and not an Add and Relu read twice)
                    # (q moves up before the user where it came later: HRNet's fuse sums read a branch output
                    # whose quantizer sits before a layer further down the graph)
                    _read_from(gm, user, tail, q)
                    self._changed = True
                elif user is not q and _is_add(node) and _scaled_for_int8(gm, user, tail):
                    # the sum (or its ReLU) scaled by constants before the next quantizers (NF-ResNet's
                    # ``relu(x) * beta``): the scaling reads the codes, so that the sum is a QLinearAdd
                    _read_from(gm, user, tail, q)
                    self._changed = True
                elif user is not q and tail is node and _is_add(node) and _reads_sum_codes(gm, user):
                    # a sum read by a rectifier beside its codes (Xception's pre-activation blocks: the next
                    # block's ReLU, and its shortcut or the next sum): the rectifier reads the codes, so that
                    # onnxruntime runs QLinearAdd and re-quantizes the codes for the rectified reader, as in
                    # quantize_static's file, instead of a float Add read by two quantizers; so does a BatchNorm
                    # that no layer absorbs (pre-activation ResNets: the next block's norm1 reads the sum)
                    _read_from(gm, user, tail, q)
                    self._changed = True
                elif user is not q and _is_add(node) and _sub_8_bit_act(fake_quantizer(gm, user)):
                    # a sub-8-bit quantizer (the next block's 4-bit input) re-quantizes the sum's codes: the float
                    # sum then has no reader beside them, and onnxruntime fuses the add into QLinearAdd (an 8-bit
                    # quantizer of the sum that comes later in the graph moves up before it)
                    _read_from(gm, user, tail, q)
                    self._changed = True
        # after the products and pools above gave their operands codes: the gates of those codes
        for node in list(gm.graph.nodes):
            if not (_is_silu(gm, node) or _is_sigmoid(gm, node)) or not node.args:
                continue
            src = node.args[0]
            if not (isinstance(src, torch.fx.Node) and _has_codes(gm, src) and _read_by_int8_quantizers(gm, node)):
                continue
            if _is_silu(gm, node):
                self._split_silu(gm, node, self._codes_of(gm, src))
            elif fake_quantizer(gm, src) is None:
                _read_from(gm, node, src, self._codes_of(gm, src))  # a sigmoid gate reads the codes
                self._changed = True
        if self._changed:
            gm.graph.lint()
            recompile_lazily(gm)
        elif "QuantizeOutputs" not in passes_run(gm):
            # it found nothing and said nothing: the sums it quantizes read QuantizeOutputs' 8-bit layer outputs
            self.report.append("no int8 layer outputs to carry through sums (run QuantizeOutputs first)")
        return PassResult(gm, self._changed)

    def _split_silu(self, gm, node, xq) -> None:
        """``silu(x)`` of 8-bit codes whose result only 8-bit quantizers read becomes ``xq · gate_q(sigmoid(xq))``:
        onnxruntime runs the sigmoid as ``QLinearSigmoid`` (a table on the codes) and the product as
        ``QLinearMul`` (``BindIntegerSigmoids``, ``BindIntegerMuls``), as in ``quantize_static``'s file, instead of
        dequantizing, a float Sigmoid and Mul, and quantizing again (an MBConv model ran 1.2-1.5x slower than that
        file). The gate is one more 8-bit quantization, of values in [0, 1]."""
        meta = node.meta.get("tensor_meta")
        with gm.graph.inserting_before(node):
            gate = gm.graph.call_function(torch.sigmoid, (xq,))
        gate.meta["tensor_meta"] = meta
        gq = self._insert(gm, gate)
        with gm.graph.inserting_after(gq):
            prod = gm.graph.call_function(operator.mul, (xq, gq))
        prod.meta.update(node.meta)
        node.replace_all_uses_with(prod)
        gm.graph.erase_node(node)
        self.report.append(f"{node.name}: silu as an 8-bit sigmoid gate times its input")
        self._changed = True
        return prod

    def _read_codes_through(self, gm, node) -> bool:
        """A max-pool or reshape of a float tensor that is also quantized to 8 bits for another reader (an
        Inception concat read by a conv and by a pool branch), whose result only 8-bit quantizers read: it reads
        the codes (max-pooling commutes with rounding), so onnxruntime keeps the concat and the pool in int8
        (QLinearConcat, uint8 MaxPool) instead of a float branch with layout transposes."""
        if not (_is_transparent(gm, node) and node.args and isinstance(node.args[0], torch.fx.Node)):
            return False
        src = node.args[0]
        if fake_quantizer(gm, src) is not None or int8_source(gm, src) is not None:
            return True  # already codes
        q = _int8_user(gm, src)
        if q is None or not _only_int8_readers(gm, node):
            return True
        _read_from(gm, node, src, q)
        self.report.append(f"{node.name}: reads the 8-bit codes of {src.name}")
        self._changed = True
        return True

    def _codes_of(self, gm, arg):
        """The node holding the 8-bit codes of ``arg`` (``_has_codes``): ``arg`` itself, its quantizer, or a new
        re-quantizer of codes that came through max-pooling or reshapes, which ``ShareInt8Params`` makes an
        identity."""
        if is_int8_act(fake_quantizer(gm, arg)):
            return arg
        return _int8_user(gm, arg) or self._insert(gm, arg)

    def _insert(self, gm, tail):
        fq = FakeQuantize("uniform" if is_nonnegative(gm, tail) else "uniform_asym", 8, signed=False,
                          role="activation", observer=self.observer)
        fq.optional = True  # for the int8 adds only: data-free calibration may leave these values float instead
        name = f"res_fq{self._count}"
        self._count += 1
        gm.add_submodule(name, fq)
        with gm.graph.inserting_after(tail):
            q = gm.graph.call_module(name, (tail,))
        q.meta["tensor_meta"] = tail.meta.get("tensor_meta")
        self.report.append(f"{tail.name}: 8-bit codes")
        self._changed = True
        return q


class ShareInt8Params(Pass):
    """After calibration: re-quantizations of 8-bit codes become identities, and clips become implied."""
    needs_quantizers = True  # before InsertQuantizers: nothing to do, and the report says so

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        require_calibrated(gm, "ShareInt8Params")  # it skipped uncalibrated quantizers without a word
        changed = False
        for node in gm.graph.nodes:
            fq = fake_quantizer(gm, node)
            if not is_int8_act(fq) or not fq.calibrated or fq.requant is not None:
                continue
            if any(u.op == "call_function" and getattr(u.target, "__module__", "") == "qcompile.qmodules"
                   and getattr(u.target, "__name__", "").startswith("int8_") for u in node.users):
                # read by a layer bound to an int8 kernel already (a converted QAT model compiled): its input unit
                # is in the layer's integer arithmetic; changing it here left the simulation on the old unit and the
                # file on the new one (QAT W8A8 through compile(): FAIL, 16.8% of codes)
                continue
            src = int8_source(gm, node.args[0])
            qp = node.meta.get("qparams")
            if qp is not None and str(qp.observer).endswith(BIAS_FIT):
                continue  # widened for a reader's bias: re-quantizes the codes it reads onto its own coarser grid
            if src is not None and src is not fq and src.calibrated:
                if not _same_params(fq, src):
                    fq.scheme, fq.signed = src.scheme, src.signed
                    fq.set_params(src.alpha, src.zero_point)
                    _record(node, fq, "shared")
                    self.report.append(f"{node.target}: parameters of the codes it reads")
                    changed = True
                continue
            bounds = clip_bounds(gm, node.args[0])
            if bounds is not None and bounds[0] == 0.0 and not fq.asymmetric and float(fq.alpha) > bounds[1]:
                fq.set_params(torch.tensor(bounds[1]))
                _record(node, fq, "clip")
                self.report.append(f"{node.target}: range clipped to [0, {bounds[1]:g}]")
                changed = True
        return PassResult(gm, changed)


def _same_params(a: FakeQuantize, b: FakeQuantize) -> bool:
    return (a.scheme, a.signed, a.bits) == (b.scheme, b.signed, b.bits) and torch.equal(a.alpha, b.alpha) \
        and torch.equal(a.zero_point, b.zero_point)


def _record(node, fq: FakeQuantize, how: str) -> None:
    from qcompile.ir import QParams

    old = node.meta.get("qparams")
    observer = f"{old.observer}+{how}" if old is not None else how
    node.meta["qparams"] = QParams(scheme=fq.scheme, bits=fq.bits, signed=fq.signed, alpha=fq.alpha.clone(),
                                   axis=fq.axis, zero_point=int(fq.zero_point), role=fq.role, observer=observer)


def _coded_operands(gm, node):
    """(fa, fb): the calibrated 8-bit quantizers whose codes a binary op reads, else None."""
    fa, fb = (fake_quantizer(gm, a) for a in node.args[:2])
    if is_int8_act(fa) and is_int8_act(fb) and fa.calibrated and fb.calibrated:
        return fa, fb
    return None


def _one_int8_output(gm, node):
    """The parameters of the calibrated 8-bit quantizers that alone read ``node``, all alike, else None."""
    outs = [fake_quantizer(gm, u) for u in node.users]
    if outs and all(is_int8_act(o) and o.calibrated and _same_params(o, outs[0]) for o in outs):
        return outs[0]
    return None


def _bind_all(gm, prefix: str, found: list, what: str, report: list) -> bool:
    """Swap each ``(node, module, args)`` of ``found`` for a call of ``module`` named ``prefix<k>``; True if any."""
    count = sum(1 for name, _ in gm.named_children() if name.startswith(prefix))
    for node, module, args in found:
        _replace_with_module(gm, node, f"{prefix}{count}", module, args)
        count += 1
        report.append(f"{node.name}: {what}")
    if found:
        gm.graph.lint()
        recompile_lazily(gm)
    return bool(found)


def _replace_with_module(gm, node, name: str, module: nn.Module, args: tuple) -> None:
    """Swap ``node`` for a call of ``module``, registered on ``gm`` as ``name``, on ``args``."""
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


class BindIntegerAdds(Pass):
    """Make the simulation of each int8 residual add compute what onnxruntime's ``QLinearAdd`` computes, bit for bit.

    An int8 add: both addends are 8-bit codes, and its output (directly or through one ReLU whose clip the output
    quantizer implies) flows only into 8-bit quantizers with one set of parameters. The add becomes a
    ``qcompile.qmodules.Int8Add`` holding the three quantizers; it exports as the same ``Add``. Runs last, after
    calibration (it reads final parameters).
    """
    needs_quantizers = True  # before InsertQuantizers: nothing to do, and the report says so

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        require_calibrated(gm, "BindIntegerAdds")  # it skipped uncalibrated quantizers without a word
        from qcompile.qmodules import Int8Add

        from .quantize_outputs import _implies

        found = []
        for node in gm.graph.nodes:
            operands = _coded_operands(gm, node) if _is_add(node) else None
            if operands is None:
                continue
            users = list(node.users)
            tail = users[0] if len(users) == 1 and is_rectifier(gm, users[0]) else node
            out = _one_int8_output(gm, tail)
            if out is None or (tail is not node and not _implies(out, clip_bounds(gm, tail))):
                continue
            found.append((node, Int8Add(*operands, out), tuple(node.args[:2])))
        return PassResult(gm, _bind_all(gm, "int8_add", found, "int8 add", self.report))


class BindIntegerMuls(Pass):
    """Make the simulation of each int8 product compute what onnxruntime's ``QLinearMul`` computes, bit for bit: a
    product of two 8-bit code tensors whose output goes only into 8-bit quantizers with one set of parameters
    becomes a ``qcompile.qmodules.Int8Mul``; it exports as the same ``Mul``. Runs after calibration."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        require_calibrated(gm, "BindIntegerMuls")  # it skipped uncalibrated quantizers without a word
        from qcompile.qmodules import Int8Mul, fills_storage, storage_range

        found = []
        for node in gm.graph.nodes:
            operands = _coded_operands(gm, node) if _is_mul(node) else None
            out = _one_int8_output(gm, node) if operands is not None else None
            if out is None:
                continue
            fa, fb = operands
            if not fills_storage(out) or not storage_range(fa) == storage_range(fb) == storage_range(out):
                continue  # a Clip before the QuantizeLinear, or mixed int8/uint8 codes: no QLinearMul fusion
            found.append((node, Int8Mul(fa, fb, out), tuple(node.args[:2])))
        return PassResult(gm, _bind_all(gm, "int8_mul", found, "int8 multiply", self.report))


class BindIntegerSigmoids(Pass):
    """Make the simulation of each int8 sigmoid compute what onnxruntime's ``QLinearSigmoid`` computes, bit for bit:
    a sigmoid of 8-bit codes whose output goes only into 8-bit quantizers with one set of parameters (whose codes
    fill their storage type: no clip between) becomes a ``qcompile.qmodules.Int8Sigmoid``, a table of the 256
    codes that onnxruntime computes itself; it exports as the same ``Sigmoid``."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        require_calibrated(gm, "BindIntegerSigmoids")  # it skipped uncalibrated quantizers without a word
        from qcompile.qmodules import Int8Sigmoid, fills_storage
        from qcompile.runtime.tables import sigmoid_tables

        found = []
        for node in gm.graph.nodes:
            if not _is_sigmoid(gm, node) or not node.args:
                continue
            fin, out = fake_quantizer(gm, node.args[0]), _one_int8_output(gm, node)
            if not (is_int8_act(fin) and fin.calibrated) or out is None or not fills_storage(out):
                continue
            found.append((node, fin, out))
        tables = sigmoid_tables([Int8Sigmoid.table_params(fin, out) for _, fin, out in found])  # one session
        bound = [(node, Int8Sigmoid(fin, out, table), (node.args[0],))
                 for (node, fin, out), table in zip(found, tables)]
        return PassResult(gm, _bind_all(gm, "int8_sigmoid", bound, "int8 sigmoid", self.report))


def _is_global_avgpool(gm, node) -> bool:
    """An adaptive average pool of a 4-D tensor to 1×1 (module or function): ONNX ``GlobalAveragePool``."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.AdaptiveAvgPool2d):
        size = gm.get_submodule(node.target).output_size
    elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    else:
        return False
    return tuple(size) == (1, 1) if isinstance(size, (tuple, list)) else size == 1


class BindIntegerPools(Pass):
    """Make the simulation of each int8 average pool compute what onnxruntime's ``QLinearGlobalAveragePool`` /
    ``QLinearAveragePool`` computes, bit for bit: a pool to 1×1 (exported as ``GlobalAveragePool``) on 8-bit codes
    whose output goes only into 8-bit quantizers with one set of parameters becomes a
    ``qcompile.qmodules.Int8GlobalAvgPool``; a 1-D / 2-D ``AvgPool`` of 8-bit codes read by one 8-bit quantizer
    (floor mode, or ceil mode where pads are not counted) becomes a ``qcompile.qmodules.Int8AvgPool``."""
    needs_quantizers = True  # before InsertQuantizers: nothing to do, and the report says so

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        require_calibrated(gm, "BindIntegerPools")  # it skipped uncalibrated quantizers without a word
        from qcompile.qmodules import Int8AvgPool, Int8GlobalAvgPool

        found = []
        for node in gm.graph.nodes:
            if not _is_global_avgpool(gm, node):
                continue
            fin, out = _pooled_codes(gm, node.args[0]), _one_int8_output(gm, node)
            if not (is_int8_act(fin) and fin.calibrated) or out is None:
                continue
            found.append((node, Int8GlobalAvgPool(nn.AdaptiveAvgPool2d(1), fin, out), (node.args[0],)))
        changed = _bind_all(gm, "int8_gap", found, "int8 global average pool", self.report)
        found = []
        for node in gm.graph.nodes:
            pool = _plain_avgpool(gm, node)
            if pool is None or len(node.users) != 1:
                continue  # (onnxruntime fuses DequantizeLinear → AveragePool → QuantizeLinear with one reader)
            fin, out = _pooled_codes(gm, node.args[0]), _one_int8_output(gm, node)
            if not (is_int8_act(fin) and fin.calibrated) or out is None:
                continue
            module, kernel, stride, padding, count_include_pad, ceil = pool
            found.append((node, Int8AvgPool(module, fin, out, kernel, stride, padding, count_include_pad, ceil),
                          (node.args[0],)))
        changed = _bind_all(gm, "int8_avgpool", found, "int8 average pool", self.report) or changed
        return PassResult(gm, changed)


def _pooled_codes(gm, node) -> FakeQuantize | None:
    """The quantizer whose codes a pool reads: its input's own, or the codes it carries through ops that move or
    select values (max-pooling, reshapes, slices, zero / border pads). onnxruntime moves a ``DequantizeLinear``
    forward through those (or the file runs them on the codes) and fuses the pool into ``QLinearAveragePool`` /
    ``QLinearGlobalAveragePool`` all the same (checked on each: a pool after them was left to the float pool's
    rounding, one code apart near half steps). Not through a nearest ``Resize`` (upsampling) or an ``Expand``:
    there the pool stays float in onnxruntime."""
    fq = fake_quantizer(gm, node)
    while fq is None and isinstance(node, torch.fx.Node) and node.args and _is_transparent(gm, node) \
            and not _is_resize_or_expand(gm, node):
        node = node.args[0]
        fq = fake_quantizer(gm, node) if isinstance(node, torch.fx.Node) else None
    return fq


def _is_resize_or_expand(gm, node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Upsample)
    if node.op == "call_function":
        return node.target is F.interpolate
    return node.op == "call_method" and node.target in ("expand", "expand_as")


def _plain_avgpool(gm, node):
    """``(module, kernel, stride, padding, count_include_pad, ceil_mode)`` of a 1-D / 2-D average pool of a batched
    tensor without a divisor override (module or function), else None: what onnxruntime runs as
    ``QLinearAveragePool`` between ``DequantizeLinear`` and ``QuantizeLinear``. Not in ceil mode where pads count:
    onnxruntime divides a window past the padded input by the whole kernel there, so the file feeds that pool
    float values instead of fusing it (``qcompile.emit._ceil_pool_counting_pads``)."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.AvgPool1d, nn.AvgPool2d)):
        mod = gm.get_submodule(node.target)
        dims = 1 if isinstance(mod, nn.AvgPool1d) else 2
        kernel, stride, padding = mod.kernel_size, mod.stride, mod.padding
        ceil, count_pad, divisor = mod.ceil_mode, mod.count_include_pad, getattr(mod, "divisor_override", None)
    elif node.op == "call_function" and node.target in (F.avg_pool1d, F.avg_pool2d):
        dims = 1 if node.target is F.avg_pool1d else 2
        names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
        given = dict(zip(names, node.args))
        given.update(node.kwargs)
        kernel, stride, padding = given.get("kernel_size"), given.get("stride"), given.get("padding", 0)
        ceil, count_pad = given.get("ceil_mode", False), given.get("count_include_pad", True)
        divisor = given.get("divisor_override")
        mod = None
    else:
        return None

    def tup(v):
        if isinstance(v, int):
            return (v,) * dims
        if isinstance(v, (tuple, list)) and all(isinstance(i, int) for i in v):
            return tuple(v) * dims if len(v) == 1 else tuple(v)
        return None

    kernel, padding = tup(kernel), tup(padding)
    stride = kernel if stride is None or (isinstance(stride, (tuple, list)) and not stride) else tup(stride)
    meta = node.meta.get("tensor_meta")
    if None in (kernel, stride, padding) or len(kernel) != dims or len(stride) != dims or len(padding) != dims \
            or not isinstance(ceil, bool) or (ceil and count_pad) or divisor is not None \
            or not isinstance(count_pad, bool) \
            or getattr(meta, "shape", None) is None or len(meta.shape) != dims + 2:
        return None
    if mod is None:
        cls = nn.AvgPool1d if dims == 1 else nn.AvgPool2d
        mod = cls(kernel, stride, padding, ceil_mode=ceil, count_include_pad=count_pad)
    return mod, kernel, stride, padding, count_pad, ceil
