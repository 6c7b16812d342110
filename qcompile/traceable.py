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
encoder layer.

Masks: their dtype decides how they apply (bool: ``True`` is masked out, ``-inf`` added; float: added), which a
trace cannot see on a Proxy. :func:`record_masks` runs the model once on the example inputs, on PyTorch's slow path,
and notes on each module the kind and rank of every mask it was given; the stand-ins read those notes when traced.
``nn.TransformerEncoder`` called with a key-padding mask in eval mode runs PyTorch's nested-tensor fast path, which
writes 0 at the padded positions: where that path would be taken the traced forward zeroes them too (the exported
file computed other values there and failed validation even in fp32). A mask the notes do not cover raises
:class:`NotTraceable`, and the frontend then traces the model as before, the modules opaque. The frontend also
checks the traced module against the original on the example inputs and falls back when they differ.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class NotTraceable(Exception):
    """A transformer module was called in a way the traceable stand-in does not reproduce."""


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` as four Linear projections (eval: no dropout), with its masks applied as PyTorch
    applies them (:func:`additive_mask`).

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
        if is_causal and attn_mask is None:
            raise NotTraceable("a causal hint without its mask")
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).unflatten(-1, (h, d)).transpose(1, 2)  # (N, H, L, D)
        k = self.k_proj(key).unflatten(-1, (h, d)).transpose(1, 2)
        v = self.v_proj(value).unflatten(-1, (h, d)).transpose(1, 2)
        scores = torch.matmul(q * (float(d) ** -0.5), k.transpose(-2, -1))  # (N, H, L, S)
        if attn_mask is not None:  # (L, S), or (N·H, L, S)
            bias = additive_mask(self, "attn_mask", attn_mask)
            if mask_rank(self, "attn_mask", attn_mask) == 3:
                bias = bias.unflatten(0, (-1, h))
            scores = scores + bias
        if key_padding_mask is not None:  # (N, S)
            scores = scores + additive_mask(self, "key_padding_mask", key_padding_mask).unsqueeze(1).unsqueeze(2)
        weights = torch.softmax(scores, dim=-1)
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


# -- masks -------------------------------------------------------------------------------------------------------
_NOTES = "_qc_masks"  # module attribute: {argument name: (kind, rank)}, kind "bool" or "float"; see record_masks
_NESTED = "_qc_nested"  # nn.TransformerEncoder attribute: its nested-tensor fast path zeroes padded positions


def _note(module: nn.Module, name: str, mask) -> tuple[str, int] | None:
    if isinstance(mask, torch.Tensor):  # an eager call: the tensor itself
        return ("bool" if mask.dtype == torch.bool else "float" if mask.is_floating_point() else "other", mask.dim())
    return module.__dict__.get(_NOTES, {}).get(name)


# "masked out" as a finite term: exp(-1e30 - max) is 0 in float32 as exp(-inf) is, so every row with one key left
# computes what PyTorch computes; a row with every key masked (an all-padding sequence) gets uniform weights instead
# of NaN (PyTorch's nested path drops such a row and writes 0; the encoder's zeros below do the same), so NaN never
# reaches a quantizer's observer
MASKED = -1e30


def additive_mask(module: nn.Module, name: str, mask):
    """``mask`` as the float term added to attention scores, as ``F._canonical_mask`` makes it, with
    :data:`MASKED` for -inf: a bool mask's ``True`` entries, and a float mask's -inf entries (its other values as
    they are)."""
    note = _note(module, name, mask)
    if note is None or note[0] not in ("bool", "float"):
        raise NotTraceable(f"{name} of unknown type")
    if note[0] == "float":
        return mask.clamp(min=MASKED)
    return torch.zeros_like(mask, dtype=torch.float32).masked_fill(mask, MASKED)


def mask_rank(module: nn.Module, name: str, mask) -> int:
    note = _note(module, name, mask)
    if note is None:
        raise NotTraceable(f"{name} of unknown rank")
    return note[1]


def _padded(module: nn.Module, name: str, mask):
    """True at the padded positions of a key-padding mask (bool: True; float: non-zero, as the fast path reads it)."""
    note = _note(module, name, mask)
    if note is None or note[0] not in ("bool", "float"):
        raise NotTraceable(f"{name} of unknown type")
    return mask if note[0] == "bool" else mask != 0


def _would_nest(m: nn.TransformerEncoder, src) -> bool:
    """Whether PyTorch's TransformerEncoder.forward, given a key-padding mask and no attention mask, converts
    ``src`` to a nested tensor (and writes 0 at padded positions) in eval mode under ``torch.no_grad``: its
    conditions that do not depend on the masks, with the fast path as it is enabled now. (The masks' left
    alignment, mask_check, depends on the batch: tested in the graph.)"""
    if not torch.backends.mha.get_fastpath_enabled() or not getattr(m, "use_nested_tensor", False):
        return False
    if m.layers[0].training or src.dim() != 3 or src.is_nested or torch.is_autocast_enabled():
        return False
    return src.device.type in ("cpu", "cuda", "xpu")


def record_masks(model: nn.Module, example_inputs) -> None:
    """Run ``model`` once on ``example_inputs`` (eval, no grad, PyTorch's slow path so that every attention module
    is called with its masks) and note on each transformer/attention module the kind and rank of each mask argument
    it was given, and on each ``nn.TransformerEncoder`` whether its nested-tensor fast path applies. The notes go
    on the modules of ``model`` by name: :func:`copy_mask_notes` carries them to a rewritten copy."""
    import inspect

    kinds = (nn.MultiheadAttention, nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.TransformerDecoder,
             nn.TransformerDecoderLayer)
    fast = torch.backends.mha.get_fastpath_enabled()

    def hook(module, args, kwargs):
        try:
            bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
        except TypeError:
            return
        notes = module.__dict__.setdefault(_NOTES, {})
        for name, value in bound.items():
            if "mask" in name and isinstance(value, torch.Tensor):
                note = _note(module, name, value)
                if notes.get(name, note) != note:
                    note = ("mixed", note[1])
                notes[name] = note
        if isinstance(module, nn.TransformerEncoder):
            with _fastpath(fast):
                nest = _would_nest(module, bound.get("src"))
            if module.__dict__.get(_NESTED, nest) != nest:
                raise NotTraceable("the encoder's fast path differs between calls")
            module.__dict__[_NESTED] = nest

    modules = [m for m in model.modules() if isinstance(m, kinds)]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.no_grad(), _fastpath(False):
            model.eval()(*example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training


class _fastpath:
    """``torch.backends.mha.set_fastpath_enabled(flag)`` for a block."""

    def __init__(self, flag: bool):
        self.flag = flag

    def __enter__(self):
        self.saved = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(self.flag)

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.saved)


def copy_mask_notes(source: nn.Module, target: nn.Module) -> None:
    """The notes of :func:`record_masks` from the modules of ``source`` to the same-named modules of ``target``."""
    mods = dict(target.named_modules())
    for name, m in source.named_modules():
        for key in (_NOTES, _NESTED):
            if key in m.__dict__ and name in mods:
                mods[name].__dict__[key] = m.__dict__[key]


def clear_mask_notes(model: nn.Module) -> None:
    for m in model.modules():
        m.__dict__.pop(_NOTES, None)
        m.__dict__.pop(_NESTED, None)


def _replaceable(mha: nn.MultiheadAttention) -> bool:
    return (type(mha) is nn.MultiheadAttention and mha.bias_k is None and mha.bias_v is None
            and not mha.add_zero_attn and mha.embed_dim % mha.num_heads == 0)


def needs_rewrite(model: nn.Module) -> bool:
    return any(_replaceable(m) for m in model.modules() if isinstance(m, nn.MultiheadAttention)) or \
        any(traceable_forward(m) is not None for m in model.modules())


def rewrite_attention(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every plain ``nn.MultiheadAttention`` replaced by :class:`MultiheadAttention`."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention) and _replaceable(child):
                setattr(parent, name, MultiheadAttention(child).train(child.training))
    return model


# -- plain forwards of the containers (the slow path of torch.nn.modules.transformer) ------------------------------
def _encoder_layer_forward(m: nn.TransformerEncoderLayer, src, src_mask=None, src_key_padding_mask=None,
                           is_causal=False):
    if is_causal and src_mask is None:
        raise NotTraceable("a causal hint without its mask")
    # as PyTorch's layer does (F._canonical_mask): bool masks become -inf terms before attention sees them
    if src_mask is not None:
        src_mask = additive_mask(m, "src_mask", src_mask)
    if src_key_padding_mask is not None:
        src_key_padding_mask = additive_mask(m, "src_key_padding_mask", src_key_padding_mask)
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), src_mask, src_key_padding_mask)
        x = x + m._ff_block(m.norm2(x))
    else:
        x = m.norm1(x + m._sa_block(x, src_mask, src_key_padding_mask))
        x = m.norm2(x + m._ff_block(x))
    return x


def _encoder_forward(m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    if is_causal and mask is None:
        raise NotTraceable("a causal hint without its mask")
    if (mask is not None or src_key_padding_mask is not None) and _NESTED not in m.__dict__:
        raise NotTraceable("encoder masks not recorded")
    # as PyTorch's encoder does (F._canonical_mask): the layers get -inf terms, which their notes recorded
    layer_mask = additive_mask(m, "mask", mask) if mask is not None else None
    layer_padding = additive_mask(m, "src_key_padding_mask", src_key_padding_mask) \
        if src_key_padding_mask is not None else None
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=layer_mask, src_key_padding_mask=layer_padding)
    if src_key_padding_mask is not None and mask is None and m.__dict__.get(_NESTED):
        # the nested-tensor fast path writes 0 at the padded positions (to_padded_tensor(0.0)), before the norm --
        # for a batch whose masks are all left-aligned (padding at the end); with mask_check off, for any batch
        pad = _padded(m, "src_key_padding_mask", src_key_padding_mask)  # (N, S)
        if getattr(m, "mask_check", True):
            # a row is left-aligned when no valid position follows a padded one
            aligned = torch.logical_not(torch.any(pad[:, :-1] & torch.logical_not(pad[:, 1:])))
            pad = pad & aligned
        if not m.layers[0].self_attn.batch_first:
            pad = pad.transpose(0, 1)
        out = out.masked_fill(pad.unsqueeze(-1), 0.0)
    return m.norm(out) if m.norm is not None else out


def _decoder_forward(m: nn.TransformerDecoder, tgt, memory, tgt_mask=None, memory_mask=None,
                     tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal=None,
                     memory_is_causal=False):
    if (tgt_is_causal and tgt_mask is None) or (memory_is_causal and memory_mask is None):
        raise NotTraceable("a causal hint without its mask")
    out = tgt
    for layer in m.layers:
        out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                    memory_key_padding_mask=memory_key_padding_mask)
    return m.norm(out) if m.norm is not None else out


def _transformer_forward(m: nn.Transformer, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
                         src_key_padding_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
                         src_is_causal=None, tgt_is_causal=None, memory_is_causal=False):
    memory = m.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


def traceable_forward(m: nn.Module):
    """The class of :data:`TRACEABLE_FORWARDS` that ``m`` is, also as a subclass that keeps its forward
    (``class MyLayer(nn.TransformerEncoderLayer)`` adding only an __init__); None otherwise."""
    for cls in TRACEABLE_FORWARDS:
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return cls
    return None


TRACEABLE_FORWARDS = {
    nn.Transformer: _transformer_forward,
    nn.TransformerEncoderLayer: _encoder_layer_forward,
    nn.TransformerEncoder: _encoder_forward,
    nn.TransformerDecoder: _decoder_forward,
    nn.TransformerDecoderLayer: None,  # its own forward traces (no fast path): only stop treating it as a leaf
}
