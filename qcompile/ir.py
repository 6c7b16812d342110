"""Typed quantization metadata carried on ``torch.fx`` nodes.

The user's configuration is turned into metadata by one early pass (layer selection); later passes read only
the metadata. Two keys are used:

- ``node.meta["qconfig"]``: a :class:`LayerConfig` on each Conv/Linear node, the decision for that layer;
- ``node.meta["qparams"]``: a :class:`QParams` on each quantizer node once calibration has fixed its
  clipping values.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

SCHEMES = ("fp32", "apot", "pot", "uniform", "log2", "ternary", "binary")
QUANT_SCHEMES = tuple(s for s in SCHEMES if s != "fp32")


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """How one layer is quantized.

    ``action`` is ``"quant"`` (weights and input activation quantized as below) or ``"float"`` (left in float).
    ``reason`` says which rule decided it (default, first/last layer, ``--exclude`` pattern, config file).
    """

    action: str = "quant"
    wscheme: str = "apot"
    wbits: int = 4
    ascheme: str = "apot"
    abits: int = 4
    per_channel: bool = True
    reason: str = "default"

    def __post_init__(self) -> None:
        if self.action not in ("quant", "float"):  # LayerConfig(action="quantize") left the layer float, silently
            raise ValueError(f"LayerConfig.action must be 'quant' or 'float', got {self.action!r}")
        # per_channel="no" quantized per channel and wbits="4" went into the metadata as a string, without a word
        if not isinstance(self.per_channel, bool):
            raise TypeError(f"LayerConfig.per_channel must be True or False, got {self.per_channel!r}")
        for field in ("wbits", "abits"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"LayerConfig.{field} must be an int, got {value!r}")
            if not 1 <= value <= 8:  # wbits=9 showed as "W9 apot" in the layer table until InsertQuantizers refused it
                raise ValueError(f"LayerConfig.{field} must be from 2 to 8 (1 for binary levels), got {value}")
        for field in ("wscheme", "ascheme"):
            if getattr(self, field) not in SCHEMES:
                raise ValueError(f"LayerConfig.{field} must be one of {', '.join(SCHEMES)}, got "
                                 f"{getattr(self, field)!r}")

    def describe(self, weights_only: bool = False) -> str:
        """``weights_only``: a layer whose input stays float (a recurrent layer): no activation part."""
        if self.action != "quant":
            return f"float ({self.reason})"
        tensor = " per-tensor" if not self.per_channel else ""  # per output channel goes without saying
        if weights_only:
            return f"W{_bits(self.wscheme, self.wbits)} {self.wscheme}{tensor}, weights only ({self.reason})"
        return f"W{_bits(self.wscheme, self.wbits)} {self.wscheme}{tensor} / A{_bits(self.ascheme, self.abits)} " \
            f"{self.ascheme} ({self.reason})"


FIXED_BITS = {"ternary": 2, "binary": 1}  # level sets whose size --bits does not change (quant.levels)


def _bits(scheme: str, bits: int) -> int:
    return FIXED_BITS.get(scheme, bits)


@dataclasses.dataclass(frozen=True, eq=False)
class QParams:
    """Parameters of one quantizer, fixed after calibration.

    ``alpha`` is the clipping value (scalar for per-tensor, 1-D along ``axis`` for per-channel); the level set is
    ``qcompile.quant.level_set(scheme, bits, signed, offset=level_offset)``. ``zero_point`` is used only by
    asymmetric uniform levels.
    """

    scheme: str
    bits: int
    signed: bool
    alpha: torch.Tensor
    axis: Optional[int] = None
    zero_point: int = 0
    role: str = "activation"  # or "weight"
    observer: str = ""
    level_offset: int = 0  # asymmetric APoT/PoT levels (qcompile.quant.level_set's offset)

    def levelset(self):
        from qcompile.quant import level_set

        return level_set(self.scheme, self.bits, self.signed, offset=self.level_offset)
