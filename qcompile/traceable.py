"""Traceable stand-ins for the ``torch.nn`` transformer modules, so their Linear layers can be quantized.

``torch.fx`` keeps every ``torch.nn`` module opaque (a leaf), and the transformer ones cannot be traced anyway:
``nn.TransformerEncoder``/``nn.TransformerEncoderLayer`` test their arguments for a fast path, and
``nn.MultiheadAttention`` computes its projections from packed parameters inside ``F.multi_head_attention_forward``.
Left opaque, all their projections stay float while the user asked for, say, APoT 4-bit: in a transformer that is
nearly every weight.

:func:`rewrite_attention` replaces each ``nn.MultiheadAttention`` of a model by :class:`MultiheadAttention`: the
same computation written with four ``nn.Linear`` projections (``q_proj``, ``k_proj``, ``v_proj`` — slices of the
packed ``in_proj_weight`` — and ``out_proj``), which the quantizer passes see like any other Linear.
:data:`TRACEABLE_FORWARDS` gives the tracer the plain (slow-path) forward of the encoder/decoder containers and the
encoder layer. Masks and causal flags are not traced (their dtype decides how they apply, which a trace cannot
see): a call with one raises :class:`NotTraceable`, and the frontend then traces the model as before, the modules
opaque. The frontend also checks the traced module against the original on the example inputs and falls back
when they differ.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class NotTraceable(Exception):
    """A transformer module was called in a way the traceable stand-in does not reproduce."""


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` without masks, as four Linear projections (eval: no dropout).

    ``forward`` has the signature of ``nn.MultiheadAttention.forward`` and returns ``(output, weights)``, weights
    averaged over heads unless ``average_attn_weights=False`` and ``None`` when ``need_weights=False``."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.embed_dim, self.num_heads, self.head_dim = e, h, e // h
        self.batch_first = mha.batch_first
        if mha._qkv_same_embed_dim:
            wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
        else:
            wq, wk, wv = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        self.q_proj, self.k_proj, self.v_proj = (_linear(w, b) for w, b in zip((wq, wk, wv), biases))
        self.out_proj = _linear(mha.out_proj.weight.detach(),
                                mha.out_proj.bias.detach() if mha.out_proj.bias is not None else None)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise NotTraceable("attention with a mask")
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).unflatten(-1, (h, d)).transpose(1, 2)  # (N, H, L, D)
        k = self.k_proj(key).unflatten(-1, (h, d)).transpose(1, 2)
        v = self.v_proj(value).unflatten(-1, (h, d)).transpose(1, 2)
        weights = torch.softmax(torch.matmul(q * (float(d) ** -0.5), k.transpose(-2, -1)), dim=-1)
        out = self.out_proj(torch.matmul(weights, v).transpose(1, 2).flatten(-2))  # (N, L, E)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=1) if average_attn_weights else weights)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.to(weight.dtype)


def _replaceable(mha: nn.MultiheadAttention) -> bool:
    return (type(mha) is nn.MultiheadAttention and mha.bias_k is None and mha.bias_v is None
            and not mha.add_zero_attn and mha.embed_dim % mha.num_heads == 0)


def needs_rewrite(model: nn.Module) -> bool:
    return any(_replaceable(m) for m in model.modules() if isinstance(m, nn.MultiheadAttention)) or \
        any(type(m) in TRACEABLE_FORWARDS for m in model.modules())


def rewrite_attention(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every plain ``nn.MultiheadAttention`` replaced by :class:`MultiheadAttention`."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention) and _replaceable(child):
                setattr(parent, name, MultiheadAttention(child).train(child.training))
    return model


# -- plain forwards of the containers (the slow path of torch.nn.modules.transformer, without masks) -------------
def _encoder_layer_forward(m: nn.TransformerEncoderLayer, src, src_mask=None, src_key_padding_mask=None,
                           is_causal=False):
    if src_mask is not None or src_key_padding_mask is not None or is_causal:
        raise NotTraceable("encoder layer with a mask")
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), None, None)
        x = x + m._ff_block(m.norm2(x))
    else:
        x = m.norm1(x + m._sa_block(x, None, None))
        x = m.norm2(x + m._ff_block(x))
    return x


def _encoder_forward(m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    if mask is not None or src_key_padding_mask is not None or is_causal:
        raise NotTraceable("encoder with a mask")
    out = src
    for layer in m.layers:
        out = layer(out)
    return m.norm(out) if m.norm is not None else out


def _decoder_forward(m: nn.TransformerDecoder, tgt, memory, tgt_mask=None, memory_mask=None,
                     tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal=None,
                     memory_is_causal=False):
    if any(a is not None for a in (tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask)) or \
            tgt_is_causal or memory_is_causal:
        raise NotTraceable("decoder with a mask")
    out = tgt
    for layer in m.layers:
        out = layer(out, memory)
    return m.norm(out) if m.norm is not None else out


TRACEABLE_FORWARDS = {
    nn.TransformerEncoderLayer: _encoder_layer_forward,
    nn.TransformerEncoder: _encoder_forward,
    nn.TransformerDecoder: _decoder_forward,
    nn.TransformerDecoderLayer: None,  # its own forward traces (no fast path): only stop treating it as a leaf
}
