"""Training schedules of SDQ (sec. 4): progressive training with re-scaling, and two-phase training.

Progressive training with re-scaling (eq. 11): a ``b``-bit model starts from a trained ``(b+n)``-bit one with

    alpha_b = alpha_{b+n} * L_b / L_{b+n}

so the step ``alpha / L`` -- the quantization interval, and with it the pruning area ``|y| < alpha / (2L)`` --
is the same after the switch (without it the pruning area of a 3 -> 2 bit switch grows 3x, SDQ Fig. 3). ``L`` is
the level set's grid denominator: SDQ's ``L_P`` (``2**(b-1) - 1`` signed, ``2**b - 1`` unsigned) for uniform
levels, ``L_p2 = 2**(2**(b-1) - 2)`` for base-2 logarithmic ones (the smallest non-zero level is ``alpha / L``
for both).

Two-phase training (sec. 4.2): after the first phase, α and σ are frozen (:func:`freeze_quantizers`) and the
weights alone are trained again.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn

from qcompile import quant
from qcompile.errors import UserError

from .modules import LearnableFakeQuantize, SDQFakeQuantize, learnable_quantizers
from .prepare import _family, _learns, config_of, set_config


def rescale_alpha(alpha: torch.Tensor, levels_from: quant.LevelSet, levels_to: quant.LevelSet) -> torch.Tensor:
    """Eq. 11: ``alpha_to = alpha_from * L_to / L_from`` (the grid step ``alpha / L`` is kept)."""
    return torch.as_tensor(alpha) * (float(levels_to.denom) / float(levels_from.denom))


def change_bits(model: nn.Module, wbits: Optional[int] = None, abits: Optional[int] = None,
                rescale: bool = True) -> int:
    """Switch a prepared model's quantizers at the trained precision to ``wbits`` / ``abits`` (in place).

    With ``rescale`` (default) their learned α is re-scaled by eq. 11. Fixed quantizers (first/last layers,
    8-bit outputs) are untouched. Returns the number of quantizers changed.
    """
    cfg = config_of(model)
    if cfg is None:
        raise UserError("change_bits takes a model from qcompile.qat.prepare")
    for name, value in (("wbits", wbits), ("abits", abits)):  # both checked before any quantizer changes
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8):
            raise UserError(f"change_bits: {name} must be an integer from 2 to 8, got {value!r}")
    todo = []
    for fq in learnable_quantizers(model):
        if not _learns(fq, cfg):
            continue
        new_bits = wbits if fq.role == "weight" else abits
        if new_bits is None or new_bits == fq.bits:
            continue
        from qcompile.ir import FIXED_BITS

        if fq.scheme in FIXED_BITS:  # checked for all before any changes
            raise UserError(f"change_bits: {fq.scheme} {fq.role}s have a fixed width ({FIXED_BITS[fq.scheme]} "
                            f"bit{'s' if FIXED_BITS[fq.scheme] > 1 else ''}); leave "
                            f"{'wbits' if fq.role == 'weight' else 'abits'} out")
        if fq.scheme == "uniform_asym" and rescale:  # checked for all before any changes (the weights went first)
            raise UserError("eq. 11 re-scaling is defined for symmetric and unsigned levels, not uniform_asym; "
                            "change_bits(..., rescale=False) keeps the learned ranges")
        todo.append((fq, new_bits))
    changed = 0
    for fq, new_bits in todo:
        old = fq.levelset
        offset = _matching_offset(old, fq.scheme, new_bits)
        new = quant.level_set(fq.scheme, new_bits, fq.signed, offset=offset)
        with torch.no_grad():
            if rescale:
                fq.learned_alpha.copy_(rescale_alpha(fq.learned_alpha, old, new))
                fq.alpha = rescale_alpha(fq.alpha, old, new).to(torch.float32)
        fq.bits = int(new_bits)
        fq.level_offset = offset
        changed += 1
    # the layers' recorded configs (the layer table, and the file's description of each layer) follow the levels
    from qcompile.ir import LayerConfig

    for node in getattr(getattr(model, "graph", None), "nodes", ()):
        lc = node.meta.get("qconfig")
        if not isinstance(lc, LayerConfig) or lc.action != "quant":
            continue
        w = wbits if wbits is not None and (lc.wscheme, lc.wbits) == (cfg.wscheme, cfg.wbits) else lc.wbits
        a = abits if abits is not None and (_family(lc.ascheme), lc.abits) == (_family(cfg.ascheme), cfg.abits) \
            else lc.abits
        if (w, a) != (lc.wbits, lc.abits):
            node.meta["qconfig"] = dataclasses.replace(lc, wbits=int(w), abits=int(a))
    opts = cfg.options
    updates = {}
    if wbits is not None:
        updates["wbits"] = int(wbits)
    if abits is not None:
        updates["abits"] = int(abits)
    opts = dataclasses.replace(opts, **{k: v for k, v in updates.items()})
    set_config(model, dataclasses.replace(cfg, wbits=opts.weight_bits, abits=opts.act_bits, options=opts))
    return changed


def freeze_quantizers(model: nn.Module) -> int:
    """Start the second training phase: freeze every learned α (and SDQ's σ). Returns how many were frozen.

    A frozen α gets no gradient (``requires_grad=False``, its ``.grad`` cleared), so an optimizer built before
    the switch leaves it alone as well.
    """
    from .prepare import _require_prepared

    _require_prepared(model, "freeze_quantizers")
    count = 0
    for fq in learnable_quantizers(model):
        if isinstance(fq, SDQFakeQuantize):
            fq.freeze()
        elif isinstance(fq, LearnableFakeQuantize):
            fq.learned_alpha.requires_grad_(False)
        fq.learned_alpha.grad = None
        count += 1
    return count


def _matching_offset(old, scheme: str, bits: int) -> int:
    """The offset of the asymmetric ``bits``-bit set whose negative reach ``offset / denom`` is nearest that of
    ``old`` (0 where ``old`` is not asymmetric)."""
    if not old.offset:
        return 0
    reach = old.offset / old.denom
    top = quant.level_set(scheme, bits, False).denom
    return min(quant.asymmetric_offsets(scheme, bits), key=lambda o: abs(o / (top - o) - reach))
