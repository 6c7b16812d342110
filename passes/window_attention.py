"""DecomposeWindowAttention: torchvision's Swin window attention with its two projections as graph Linear layers.

torchvision's Swin (V1 and V2) computes each block's attention in ``shifted_window_attention(x, qkv.weight,
proj.weight, ...)``, a function it marks ``torch.fx.wrap``: the trace keeps it as one opaque call, and the ``qkv``
and ``proj`` Linear layers it computes with stay float (``qcompile.summary`` lists them as "read by
shifted_window_attention"). In a Swin-T that is 24 of its 53 weight layers.

Before:  y = shifted_window_attention(x, qkv_weight, proj_weight, bias_table, window, heads, shift, ...,
                                      qkv_bias=b_qkv, proj_bias=b_proj, logit_scale=s, training=False)
After:   w = window_partition(x, window, shift)                        # pad, cyclic shift, windows
         q = F.linear(w, qkv_weight, b_qkv)                             # (V2: b_qkv with its key third zeroed)
         a = window_attention(q, x, bias_table, window, heads, shift, s) # heads, softmax(QK^T + bias + mask) V
         p = F.linear(a, proj_weight, b_proj)
         y = window_reverse(p, x, window, shift)                        # windows back, shift back, unpad

The three functions are torchvision's computation split at the two projections, operation for operation, so the
float result is the same (the tests compare it with an independent per-window implementation; ``CheckFloatOutputs``
checks every compile on its calibration samples). They are marked
``torch.fx.wrap`` too: a second trace keeps them whole. Calls in training mode (dropout) are left alone.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.fx
import torch.nn.functional as F

from .base import Pass, PassResult


def _padded(input: torch.Tensor, window_size) -> tuple:
    _, h, w, _ = input.shape
    pad_r = (window_size[1] - w % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - h % window_size[0]) % window_size[0]
    return pad_r, pad_b, h + pad_b, w + pad_r


def _shift(window_size, shift_size, pad_h: int, pad_w: int) -> list:
    shift = list(shift_size)
    if window_size[0] >= pad_h:  # a window larger than the map: no shift (torchvision's rule)
        shift[0] = 0
    if window_size[1] >= pad_w:
        shift[1] = 0
    return shift


@torch.fx.wrap
def window_partition(input: torch.Tensor, window_size, shift_size) -> torch.Tensor:
    """``(N, H, W, C)`` -> ``(N * windows, window_h * window_w, C)``: pad to whole windows, shift, partition."""
    b, _, _, c = input.shape
    pad_r, pad_b, _, _ = _padded(input, window_size)
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    shift = _shift(window_size, shift_size, pad_h, pad_w)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    num_windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    x = x.view(b, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b * num_windows, window_size[0] * window_size[1], c)


@torch.fx.wrap
def window_attention(qkv: torch.Tensor, input: torch.Tensor, relative_position_bias: torch.Tensor, window_size,
                     num_heads: int, shift_size, logit_scale=None) -> torch.Tensor:
    """The attention of every window from the qkv projection ``(N * windows, L, 3C)``: ``(N * windows, L, C)``
    (``input`` gives the map's shape)."""
    c = input.shape[3]
    _, _, pad_h, pad_w = _padded(input, window_size)
    shift = _shift(window_size, shift_size, pad_h, pad_w)
    num_windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    n, length = qkv.size(0), qkv.size(1)
    qkv = qkv.reshape(n, length, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # cosine attention (V2)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * (c // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        attn_mask = qkv.new_zeros((pad_h, pad_w))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0]: h[1], w[0]: w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(n // num_windows, num_windows, num_heads, length, length)
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, length, length)
    attn = F.softmax(attn, dim=-1)
    return attn.matmul(v).transpose(1, 2).reshape(n, length, c)


@torch.fx.wrap
def window_reverse(x: torch.Tensor, input: torch.Tensor, window_size, shift_size) -> torch.Tensor:
    """``(N * windows, L, C)`` back to the map ``(N, H, W, C)`` of ``input``: un-partition, shift back, unpad."""
    b, h, w, c = input.shape
    _, _, pad_h, pad_w = _padded(input, window_size)
    shift = _shift(window_size, shift_size, pad_h, pad_w)
    x = x.view(b, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


@torch.fx.wrap
def v2_qkv_bias(qkv_bias: torch.Tensor) -> torch.Tensor:
    """Swin V2's qkv bias: the key third is zero (torchvision zeroes it on every call)."""
    bias = qkv_bias.clone()
    length = bias.numel() // 3
    bias[length: 2 * length].zero_()
    return bias


def _name_layer(layer: torch.fx.Node, weight, call: torch.fx.Node) -> None:
    """Name a projection after the Linear module its weight belongs to (``features.1.0.attn.qkv``): the layer table,
    ``--exclude`` and per-layer overrides then address it as they address any module."""
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and str(weight.target).endswith(".weight"):
        name = str(weight.target)[: -len(".weight")]
        layer.meta["layer"] = name
        stack = dict(call.meta.get("nn_module_stack") or {})
        stack[name] = (name, torch.nn.Linear)
        layer.meta["nn_module_stack"] = stack


_KNOWN_ARGUMENTS = {"input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
                    "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training"}


def _is_window_attention(node: torch.fx.Node) -> bool:
    target = node.target
    return node.op == "call_function" and getattr(target, "__name__", "") == "shifted_window_attention" \
        and getattr(target, "__module__", "").startswith("torchvision.")


class DecomposeWindowAttention(Pass):
    """torchvision's ``shifted_window_attention`` calls as partition -> Linear -> attention -> Linear -> reverse
    (module docstring), so the quantization passes see the ``qkv`` and ``proj`` projections."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        count = 0
        for node in list(gm.graph.nodes):
            if not _is_window_attention(node):
                continue
            try:
                bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
            except TypeError:
                continue
            bound.apply_defaults()
            a = bound.arguments
            if set(a) != _KNOWN_ARGUMENTS:
                continue  # another torchvision's signature: what the stand-in computes is not known to match
            if a["training"] is not False and (a["attention_dropout"] or a["dropout"]):
                continue  # dropout in training mode: not what the stand-in computes
            window, shift = list(a["window_size"]), list(a["shift_size"])
            g = gm.graph
            with g.inserting_before(node):
                qkv_bias = a["qkv_bias"]
                if a["logit_scale"] is not None and qkv_bias is not None:
                    qkv_bias = g.call_function(v2_qkv_bias, (qkv_bias,))
                windows = g.call_function(window_partition, (a["input"], window, shift))
                qkv = g.call_function(F.linear, (windows, a["qkv_weight"], qkv_bias))
                attn = g.call_function(window_attention, (qkv, a["input"], a["relative_position_bias"], window,
                                                          a["num_heads"], shift, a["logit_scale"]))
                proj = g.call_function(F.linear, (attn, a["proj_weight"], a["proj_bias"]))
                out = g.call_function(window_reverse, (proj, a["input"], window, shift))
            for layer, weight in ((qkv, a["qkv_weight"]), (proj, a["proj_weight"])):
                _name_layer(layer, weight, node)
            out.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "val")})
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            count += 1
        if count:
            self.report.append(f"decomposed {count} window attention(s): their qkv/proj projections are Linear layers")
        return PassResult(gm, bool(count))
