"""The fake-quantizer module that quantization passes insert into the fx graph.

``FakeQuantize`` simulates one quantizer in PyTorch with the exact numerics of ``qcompile.quant`` (level set,
clipping value ``alpha``, zero point, tie rule). It has three modes:

- calibrating: observe the tensors that flow through (an observer of ``qcompile.quant``) and pass them on;
- simulating (default): return ``fake_quantize(x)``;
- exporting (inside ``torch.onnx.export``): the same values, but the ONNX graph gets a marker node
  ``qcompile::FakeQuant(x)`` with the quantizer's id, which the emission pass (``qcompile.emit``) replaces with
  standard ONNX operators, compact custom nodes, or a shift-add lowering.
"""
from __future__ import annotations

import contextlib
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompile import quant

MARKER_DOMAIN = "qcompile"
MARKER_OP = "FakeQuant"


# Quantizers by id while an export runs: the marker op looks its quantizer up here, so the exporter sees one
# opaque op instead of tracing (and trying to export) the fake-quantization arithmetic itself.
_EXPORTING: dict[int, "FakeQuantize"] = {}

# a dict while ``weight_memo`` is active: weight quantizers' outputs and int8 layers' weight codes, computed once
_WEIGHT_MEMO: list = [None]


@contextlib.contextmanager
def weight_memo():
    """Within it (and without autograd), each weight quantizer computes its output once and each int8 layer its
    weight codes once, instead of on every forward: validation runs the simulation several times per batch, and
    re-quantizing every weight each time made its cost grow with the number of batches (BERT-base: 67 s in one
    batch, 308 s in batches of 8). The weights must not change inside; the memo is dropped on exit."""
    outer = _WEIGHT_MEMO[0]
    if outer is None:
        _WEIGHT_MEMO[0] = {}
    try:
        yield
    finally:
        if outer is None:
            _WEIGHT_MEMO[0] = None


def _memo_key(*tensors) -> tuple:
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in tensors)


def _memo_get(memo: dict, key: tuple):
    found = memo.get(key)
    return None if found is None else found[1]


def _memo_put(memo: dict, key: tuple, keyed: tuple, value):
    """Store ``value`` with the tensors its key was made of: held, their memory is not reused by another tensor
    that could then match the key (a data pointer and version of a freed temporary)."""
    memo[key] = (keyed, value)
    return value

# The marker is a torch.library op rather than an autograd.Function: the TorchScript exporter fails
# ("unordered_map::at") when a Python autograd.Function consumes the output of max_pool2d.
_LIB = torch.library.Library(MARKER_DOMAIN, "DEF")
_LIB.define("fake_quant_marker(Tensor x, int qid) -> Tensor")


def _marker_impl(x: torch.Tensor, qid: int) -> torch.Tensor:
    fq = _EXPORTING[qid]
    # Fresh tensors from plain numbers: a module buffer used in here would be taken for a traced value.
    alpha_list, zp_list = fq.frozen_params
    alpha = torch.tensor(alpha_list, dtype=torch.float32)
    zp = torch.tensor(zp_list, dtype=torch.int32)
    codes = quant.quantize(x, alpha, fq.levelset, axis=fq.axis, zero_point=zp)
    return quant.dequantize(codes, alpha, fq.levelset, axis=fq.axis, zero_point=zp)


_LIB.impl("fake_quant_marker", _marker_impl, "CompositeExplicitAutograd")


def _marker_symbolic(g, x, qid):
    from torch.onnx import symbolic_helper

    out = g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, qid_i=symbolic_helper._get_const(qid, "i", "qid"))
    out.setType(x.type())
    return out


torch.onnx.register_custom_op_symbolic(f"{MARKER_DOMAIN}::fake_quant_marker", _marker_symbolic, 1)


class FakeQuantize(nn.Module):
    """One quantizer: ``scheme``/``bits``/``signed`` levels, per-tensor or per-channel along ``axis``."""

    def __init__(self, scheme: str, bits: int, signed: bool, axis: int | None = None, role: str = "activation",
                 observer: str = "mse"):
        super().__init__()
        self.scheme = scheme
        from .ir import FIXED_BITS

        self.bits = int(FIXED_BITS.get(scheme, bits))  # ternary/binary: their own width, whatever --bits said
        self.signed = bool(signed)
        self.axis = axis
        self.role = role
        self.observer_name = observer
        self.register_buffer("alpha", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        # > 0: asymmetric APoT/PoT levels, the unsigned set shifted down by this grid integer (quant.level_set);
        # chosen by Calibrate where ``search_offset`` (signed non-uniform activations) and the observer allows it
        self.register_buffer("level_offset_buffer", torch.zeros((), dtype=torch.int64))  # level_offset (below)
        # (scheme, bits, signed) as written into the state dict (_save_to_state_dict): checked on loading
        self.register_buffer("level_config_buffer", self._config_tensor())
        self.search_offset = False
        self.calibrated = False
        self.enabled = True  # False: pass values through (float reference runs of the same graph)
        self.observer = None
        # (lo, hi): what reads this quantizer's values maps everything past them to the bound's image (tanh, a
        # clip); calibration observes the values clamped to them (QuantizeOutputs.saturation_bounds)
        self.saturation = None
        # True for an output quantizer added only so that a layer runs on int8 kernels (QuantizeOutputs): where
        # data-free calibration cannot describe its values, it is removed and the output stays float
        self.optional = False
        self.qid = -1
        self.qname = ""
        # Set by BindIntegerLayers when this quantizer re-quantizes the int32 accumulator of an int8 layer:
        # (acc_scale float64 per channel = float32(S_x·S_w), multiplier float32 = S_x·S_w/S_y, channel axis)
        self.requant = None
        # Set with ``requant`` for APoT/PoT/log2 levels (``LevelSet.requant_cells``): (shift per channel, integer
        # float64 = -round((unit/4) / (S_x·S_w)), added to the accumulator; cell zero point z; the 256-entry
        # cell -> grid integer table; repeat: elements per channel after a flatten of a conv output, else 1)
        self.cells = None
        # Set with ``requant`` where a ReLU6 / clip to [0, H] between the int8 layer and this quantizer is left to
        # the kernel's saturation (the levels end at or below H): H. The clip turns every accumulator past H into
        # H itself, which is no point of the accumulator grid: re-rounded onto it, it could fall a code short of
        # the top one that onnxruntime's saturation gives (2- and 4-bit layers, whose grid is coarse)
        self.requant_top = None

    # -- state ---------------------------------------------------------------------------------------------------
    # The level offset is part of what the quantizer computes, so it is a buffer and travels in the state dict: a
    # QAT model saved with its state dict and loaded into a new prepare whose calibration chose another offset
    # (other calibration rows) reported every key matched and computed another function (logits 0.96 apart), and
    # validation, which compares the file with the loaded model, could not tell. (Not get_extra_state: torch.onnx's
    # exporter reads every state dict value as a tensor.)
    @property
    def level_offset(self) -> int:
        return int(self.level_offset_buffer)

    @level_offset.setter
    def level_offset(self, value) -> None:
        self.level_offset_buffer = torch.tensor(int(value), dtype=torch.int64)

    # The level set's scheme, bits and sign travel in the state dict too: a QAT state dict of APoT 4-bit weights
    # loaded into a model prepared at uniform 4 or APoT 3 bits reported every key matched and took the learned
    # clipping values of other levels. Loading now stops with the two configurations named.
    def _config_tensor(self) -> torch.Tensor:
        from .quant.levels import SCHEMES

        code = SCHEMES.index(self.scheme) if self.scheme in SCHEMES else -1
        device = self.alpha.device if isinstance(getattr(self, "alpha", None), torch.Tensor) else None
        return torch.tensor([code, int(self.bits), int(bool(self.signed))], dtype=torch.int64, device=device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        config = self._config_tensor()  # scheme/bits/signed are plain attributes (change_bits sets bits)
        if not hasattr(self, "level_config_buffer"):  # a module pickled before 0.9.12
            self.register_buffer("level_config_buffer", config)
        else:
            self.level_config_buffer = config
        super()._save_to_state_dict(destination, prefix, keep_vars)

    @staticmethod
    def _describe_config(config) -> str:
        from .quant.levels import SCHEMES

        code, bits, signed = (int(v) for v in config)
        scheme = SCHEMES[code] if 0 <= code < len(SCHEMES) else "unknown"
        return f"{scheme} {bits}-bit {'signed' if signed else 'unsigned'}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "level_offset_buffer"
        absent = key not in state_dict
        config_key = prefix + "level_config_buffer"
        saved = state_dict.get(config_key)
        if not hasattr(self, "level_config_buffer"):  # a module pickled before 0.9.12
            self.register_buffer("level_config_buffer", self._config_tensor())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if absent and key in missing_keys:  # a state dict saved before qcompile 0.9.2: the offset stays as it is
            missing_keys.remove(key)
        if config_key in missing_keys:  # saved before qcompile 0.9.12: nothing to check
            missing_keys.remove(config_key)
        own = self._config_tensor()
        if isinstance(saved, torch.Tensor) and saved.shape == own.shape and not torch.equal(saved.to(own), own):
            error_msgs.append(
                f"quantizer {prefix.rstrip('.') or 'root'} was saved with {self._describe_config(saved)} levels and "
                f"this one has {self._describe_config(own)}: prepare the model with the scheme and bits it was "
                "trained with (after qcompile.qat.change_bits, change them the same way before loading)")
        self.level_config_buffer = own

    @property
    def asymmetric(self) -> bool:
        """Asymmetric uniform levels r = S(q − Z) (activations that may be negative)."""
        return self.scheme == "uniform_asym"

    @property
    def levelset(self):
        return quant.level_set(self.scheme, self.bits, self.signed, offset=self.level_offset)

    def extra_repr(self) -> str:
        kind = "per-channel axis=%d" % self.axis if self.axis is not None else "per-tensor"
        sign = "signed" if self.signed else "unsigned"
        asym = ", asymmetric" if self.asymmetric else ""
        if self.level_offset:
            sign, asym = "asymmetric", f" (unsigned levels - {self.level_offset})"
        return f"{self.role}: {self.scheme} {self.bits}-bit {sign}{asym}, {kind}"

    # -- calibration -------------------------------------------------------------------------------------------
    def start_observing(self, observer) -> None:
        self.observer = observer

    def stop_observing(self) -> None:
        self.observer = None

    def set_params(self, alpha: torch.Tensor, zero_point: int | torch.Tensor = 0) -> None:
        self.alpha = torch.as_tensor(alpha, dtype=torch.float32).detach().clone()
        zp = torch.as_tensor(zero_point, dtype=torch.int32).detach().clone()
        if not self.asymmetric:
            zp = torch.zeros((), dtype=torch.int32)  # symmetric / APoT / PoT levels: real 0 is code 0
        self.zero_point = zp
        self.calibrated = True

    def prepare_export(self, qid: int, qname: str) -> None:
        """Give the quantizer its marker id and freeze its parameters as plain numbers (outside any trace)."""
        self.qid = qid
        self.qname = qname
        self.frozen_params = (self.alpha.tolist(), self.zero_point.tolist())

    # -- numerics ----------------------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (grid integers, zero point included for asymmetric levels)."""
        if self.requant is not None:
            return self._requantize(x)
        return quant.quantize(x, self.alpha, self.levelset, axis=self.axis, zero_point=self.zero_point)

    def _requantize(self, y: torch.Tensor) -> torch.Tensor:
        """Codes of an int8 layer's output exactly as an integer kernel computes them (onnxruntime's
        QLinearConv/QLinearMatMul): acc = y / (S_x·S_w) (an integer: y is the float64 layer output on integer
        codes), code = clamp(round_half_even(float32(acc) · float32(S_x·S_w/S_y)) + Z_y)."""
        return self._requantized_codes(y).to(torch.int32)

    def _requantized_codes(self, y: torch.Tensor) -> torch.Tensor:
        """:meth:`_requantize` as integer-valued float32 (in place after the first two temporaries).

        Non-uniform levels (``cells``): the accumulator, shifted down by a quarter unit (``shift``, an integer on
        the accumulator grid; the file adds it to the layer's int32 bias), is re-quantized onto uint8 cells of half
        a unit, ``c = clamp(round_half_even(float32(acc + shift) · float32(S_x·S_w / (unit/2))) + z, 0, 255)``,
        whose boundaries are the decision thresholds (``LevelSet.requant_cells``); the level is ``table[c]``."""
        acc_scale, multiplier, axis = self.requant
        shape = [1] * y.dim()
        shape[axis % y.dim()] = -1
        shift = None
        if self.cells is not None:
            shift, z, table, repeat = self.cells
            if repeat > 1:  # a flattened convolution output: each channel is a run of `repeat` elements
                acc_scale, multiplier, shift = (t.reshape(-1).repeat_interleave(repeat) if t.numel() > 1 else t
                                                for t in (acc_scale, multiplier, shift))
        acc = torch.div(y.double(), acc_scale.reshape(shape)).round_()
        if shift is not None:
            c = acc.add_(shift.reshape(shape)).float().mul_(multiplier.reshape(shape)).round_().add_(float(z))
            q = table.to(torch.float32)[c.clamp_(0, 255).long()]
        else:
            q = acc.float().mul_(multiplier.reshape(shape)).round_().add_(self.zero_point.float())
            q = q.clamp_(self.levelset.code_min, self.levelset.code_max)
        top = getattr(self, "requant_top", None)  # absent on quantizers saved before it existed
        if top is not None:  # clipped to H: the layer's accumulator reached H or more, the top code in the kernel
            q = q.masked_fill_(y >= top, float(self.levelset.code_max))
        return q

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        if self.requant is not None:
            # quant.dequantize's float32(code - Z) * unit, on the float codes: the same values bit for bit
            unit = quant.unit_from_alpha(self.alpha, self.levelset)
            return self._requantized_codes(x).sub_(self.zero_point.float()).mul_(unit)
        return quant.fake_quantize(x, self.alpha, self.levelset, axis=self.axis, zero_point=self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64 and (self.observer is not None or not self.enabled):
            x = x.float()  # the float64 output of an int8 layer (see int8_conv2d) leaves as float32
        if self.observer is not None:
            bounds = getattr(self, "saturation", None)  # absent on quantizers saved before it existed
            self.observer.update((x.clamp(*bounds) if bounds is not None else x).detach())
            return x
        if not self.enabled:
            return x
        if not self.calibrated:
            raise RuntimeError(f"quantizer ({self.extra_repr()}) used before calibration: run the Calibrate pass "
                               "after InsertQuantizers (qcompile.pipeline.build_passes gives the full order)")
        if torch.onnx.is_in_onnx_export():
            if self.qid < 0 or not hasattr(self, "frozen_params"):
                raise RuntimeError("FakeQuantize needs prepare_export() before torch.onnx.export: call "
                                   "table = qcompile.emit.quantizers_by_id(gm) first, then export_onnx(gm, x) and "
                                   "qcompile.emit.emit(onnx_model, table, options)")
            _EXPORTING[self.qid] = self
            return torch.ops.qcompile.fake_quant_marker(x, self.qid)
        memo = _WEIGHT_MEMO[0]
        if memo is not None and self.role == "weight" and not torch.is_grad_enabled():
            keyed = (x, self.alpha, self.zero_point, self.level_offset_buffer)
            key = ("fq", id(self)) + _memo_key(*keyed)
            out = _memo_get(memo, key)
            return out if out is not None else _memo_put(memo, key, keyed, self.simulate(x))
        return self.simulate(x)


# > 0 while ``disabled_quantizers`` is active: int8 layers then see float values, not codes
_FLOAT_REFERENCE = [0]


def _int8_layer(fn, x, w, *args, units=None):
    # Simulation: the integer accumulator sum((q_x - Z_x)·q_w)·S_x·S_w (+ bias on the same grid), recovered exactly
    # by the re-quantizing FakeQuantize that follows. Export: the plain float32 op.
    # Without ``units``: a float64 run on the dequantized values. With ``units = (S_x, S_w, acc_scale)`` (float32
    # scalar, per-output-channel S_w, the float32 S_x·S_w that the re-quantizer divides by): the codes are recovered
    # (x = float32(d·S_x) with |d| <= 255, so round(x / S_x) = d) and accumulated exactly by ``int8_accumulator``.
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return fn(x, w, *args)
    if units is None or _FLOAT_REFERENCE[0]:  # inputs are not codes in a float reference run
        args = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
        return fn(x.double(), w.double(), *args)
    x_unit, w_unit, acc_scale = (torch.as_tensor(u, dtype=torch.float32) for u in units)
    x_codes = torch.round(x.float() / x_unit)
    memo = _WEIGHT_MEMO[0] if not torch.is_grad_enabled() else None
    key = ("codes",) + _memo_key(w, w_unit) if memo is not None else None
    w_codes = _memo_get(memo, key) if memo is not None else None
    if w_codes is None:
        w_codes = torch.round(w.float() / w_unit.reshape([-1] + [1] * (w.dim() - 1)))
        if memo is not None:
            # kept as 8- or 16-bit integers (exact: |codes| <= 128) and made float per call: a float copy of
            # every weight beside the quantized weights themselves was a whole model's weights more at
            # validation's peak
            small = torch.int8 if w_codes.numel() == 0 or float(w_codes.abs().max()) < 128 else torch.int16
            _memo_put(memo, key, (w, w_unit), w_codes.to(small))
    elif not w_codes.is_floating_point():
        w_codes = w_codes.float()
    bias, rest = (args[0], args[1:]) if args else (None, ())
    acc = int8_accumulator(fn, x_codes, w_codes, *rest, bound_key=key)
    shape = [1] * acc.dim()
    shape[1 if fn is not F.linear else -1] = -1
    y = acc.mul_(acc_scale.double().reshape(shape))
    if bias is not None:
        y += bias.double().reshape(shape)
    return y


# Exact integer accumulators from float32 kernels: input codes d = q_x − Z_x in [−255, 255] split as d = 16·hi + lo
# with hi in [−16, 15], lo in [0, 15]; with |q_w| ≤ 128 every term of either half is an integer of magnitude
# ≤ 2048, so with at most 8192 terms per output every partial sum is an integer ≤ 2**24: exact in float32 in any
# summation order (direct convolution, GEMM, blocked reductions alike).
_SPLIT = 16
_MAX_EXACT_TERMS = 8192


def int8_accumulator(fn, x_codes: torch.Tensor, w_codes: torch.Tensor, *args, bound_key=None) -> torch.Tensor:
    """``fn(x_codes, w_codes, None, *args)`` exactly (float64): Σ (q_x − Z_x)·q_w of a conv/linear ``fn`` on integer
    codes (``|x_codes| ≤ 255``, ``|w_codes| ≤ 128``, integer-valued float tensors), from one float32 run of ``fn``
    where no partial sum can reach 2**24, else two (the halves of the split codes), instead of one float64 run
    (several times faster on a CPU). ``args`` follow the bias (stride, ...). ``bound_key``: the weight memo's key of
    ``w_codes`` where they come from it (made float for this call, so not a key of their own).
    Layers with more than 8192 terms per output fall back to float64, exact there too (|Σ| < 2**53)."""
    if w_codes[0].numel() > _MAX_EXACT_TERMS:
        return fn(x_codes.double(), w_codes.double(), None, *args)
    x32, w32 = x_codes.float(), w_codes.float()
    # Where no output can reach 2**24 (Σ_k |q_w| · max |q_x| per output channel bounds every partial sum), one
    # float32 run is exact already: most layers, whose weights are far from ±128 everywhere.
    memo = _WEIGHT_MEMO[0] if not torch.is_grad_enabled() else None
    key = None
    if memo is not None:
        key = ("bound",) + (bound_key if bound_key is not None else _memo_key(w32))
    bound = _memo_get(memo, key) if memo is not None else None
    if bound is None:
        bound = float(w32.detach().abs().flatten(1).sum(1).max())
        if memo is not None:
            _memo_put(memo, key, () if bound_key is not None else (w32,), bound)
    if bound * float(x32.detach().abs().max()) < 2.0 ** 24:
        return fn(x32, w32, None, *args).double()
    hi = torch.floor(x32 / _SPLIT)  # exact: division by a power of two of an integer below 2**24
    lo = x32 - _SPLIT * hi
    return fn(hi, w32, None, *args).double().mul_(_SPLIT).add_(fn(lo, w32, None, *args).double())


def int8_conv1d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, units=None):
    """``F.conv1d`` of an int8 layer (see ``BindIntegerLayers``; ``units`` see ``_int8_layer``)."""
    return _int8_layer(F.conv1d, x, w, b, stride, padding, dilation, groups, units=units)


def int8_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, units=None):
    """``F.conv2d`` of an int8 layer (see ``BindIntegerLayers``; ``units`` see ``_int8_layer``)."""
    return _int8_layer(F.conv2d, x, w, b, stride, padding, dilation, groups, units=units)


def int8_conv3d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, units=None):
    """``F.conv3d`` of an int8 layer (see ``BindIntegerLayers``; ``units`` see ``_int8_layer``)."""
    return _int8_layer(F.conv3d, x, w, b, stride, padding, dilation, groups, units=units)


def int8_linear(x, w, b=None, units=None):
    """``F.linear`` of an int8 layer (see ``BindIntegerLayers``; ``units`` see ``_int8_layer``)."""
    return _int8_layer(F.linear, x, w, b, units=units)


class disabled_quantizers:
    """Context manager: run ``gm`` with every FakeQuantize passing values through (the float reference)."""

    def __init__(self, gm: nn.Module):
        self.mods = [m for m in gm.modules() if isinstance(m, FakeQuantize)]

    def __enter__(self):
        self.saved = [m.enabled for m in self.mods]
        for m in self.mods:
            m.enabled = False
        _FLOAT_REFERENCE[0] += 1
        return self

    def __exit__(self, *exc):
        _FLOAT_REFERENCE[0] -= 1
        for m, e in zip(self.mods, self.saved):
            m.enabled = e
        return False


class _Int8Binary(nn.Module):
    """An elementwise op of two 8-bit code tensors re-quantized by ``out`` as an onnxruntime kernel does
    (``codes``); the value returned is the dequantized code, so ``out`` that follows leaves it unchanged. Export,
    calibration and float reference runs see the plain float op. The quantizers are held, not registered (they
    live in the graph already)."""

    def __init__(self, a: FakeQuantize, b: FakeQuantize, out: FakeQuantize):
        super().__init__()
        self._fqs = [a, b, out]

    def float_op(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def codes(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def input_codes(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The int32 codes (zero points included) of the two inputs."""
        fa, fb, _ = self._fqs
        return tuple(quant.quantize(x.float(), fq.alpha, fq.levelset, zero_point=fq.zero_point)
                     for x, fq in ((a, fa), (b, fb)))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb, fc = self._fqs
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or not fc.enabled or fc.observer is not None:
            return self.float_op(a, b)
        return quant.dequantize(self.codes(a, b), fc.alpha, fc.levelset, zero_point=fc.zero_point)


def _unit_f32(fq: FakeQuantize) -> torch.Tensor:
    """The quantizer's float32 unit as a 0-d tensor."""
    return quant.unit_from_alpha(fq.alpha, fq.levelset).to(torch.float32).reshape(())


class Int8Add(_Int8Binary):
    """``a + b`` of two 8-bit code tensors, re-quantized by ``out`` exactly as onnxruntime's ``QLinearAdd`` does
    (MLAS, x86 AVX2 kernel): with r_a = f32(S_a/S_c), r_b = f32(S_b/S_c) and
    k = f32(Z_c − fma(r_a, Z_a, f32(r_b·Z_b))), code = sat(round_half_even(fma(r_a, q_a, fma(r_b, q_b, k)))).

    Export, calibration and float reference runs see a plain ``a + b`` (``_Int8Binary``).
    """

    def float_op(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def codes(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb, _ = self._fqs
        qa, qb = self.input_codes(a, b)
        (la, ha), (lb, hb) = ((fq.levelset.code_min, fq.levelset.code_max) for fq in (fa, fb))
        if qa.numel() + qb.numel() <= 4 * (ha - la + 1) * (hb - lb + 1):
            return self.code_of(qa, qb)
        # Every output code is a function of the two input codes: one table over all pairs (65536 for two 8-bit
        # inputs, computed by the same arithmetic) and a gather, instead of six float64 passes over the tensors
        table = self.code_of(torch.arange(la, ha + 1, dtype=torch.int32)[:, None],
                             torch.arange(lb, hb + 1, dtype=torch.int32)[None, :]).reshape(-1)
        return table[(qa - la) * (hb - lb + 1) + (qb - lb)]

    def code_of(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        """The output codes of input codes ``qa``, ``qb`` (broadcast), as ``QLinearAdd`` computes them."""
        fa, fb, fc = self._fqs
        f32 = torch.float32
        unit = _unit_f32
        qa, qb = qa.to(torch.float64), qb.to(torch.float64)
        sc = unit(fc)
        ra, rb = unit(fa) / sc, unit(fb) / sc
        za, zb, zc = (fq.zero_point.to(f32).reshape(()) for fq in (fa, fb, fc))
        # fma(x, y, z) = f32(x·y + z) rounded once: the float64 product of a float32 and an 8-bit integer is exact,
        # and so is its float64 sum with a float32 of similar magnitude. The compiler contracts r_a·Z_a + (r_b·Z_b)
        # into an fma too (checked against onnxruntime: 0 of 1.2 M random codes differ, 5 without it).
        fixed = zc - (ra.double() * za.double() + (rb * zb).double()).to(f32)
        t = (rb.double() * qb + fixed.double()).to(f32)
        c = (ra.double() * qa + t.double()).to(f32)
        return torch.round(c).clamp_(fc.levelset.code_min, fc.levelset.code_max).to(torch.int32)


class Int8Mul(_Int8Binary):
    """``a * b`` of two 8-bit code tensors (broadcasting: an SE block's gate), re-quantized by ``out`` exactly as
    onnxruntime's ``QLinearMul`` does (MLAS, SSE2 and NEON64 kernels): with the exact integer product
    p = (q_a − Z_a)·(q_b − Z_b) and r = f32(f32(S_a·S_b) / S_c), code = sat(round_half_even(f32(f32(p·r) + Z_c))),
    the multiply and the add rounded apart (checked against onnxruntime: 0 of 250 k tie-prone codes differ; an fma
    there gives 13). Export, calibration and float reference runs see a plain ``a * b`` (``_Int8Binary``)."""

    def float_op(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b

    def codes(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb, fc = self._fqs
        f32 = torch.float32
        unit = _unit_f32
        qa, qb = self.input_codes(a, b)
        p = (qa - int(fa.zero_point)) * (qb - int(fb.zero_point))  # int32 (broadcast), |p| <= 255²: exact in float32
        ratio = (unit(fa) * unit(fb)) / unit(fc)
        y = p.to(f32) * ratio + fc.zero_point.to(f32).reshape(())
        return torch.round(y).clamp_(fc.levelset.code_min, fc.levelset.code_max).to(torch.int32)


def storage_range(fq: FakeQuantize) -> tuple[int, int]:
    """The integer type an 8-bit uniform quantizer's codes are stored in (``qcompile.emit.emit_activation``):
    uint8 (0, 255) for codes from 0 up, else int8 (-128, 127)."""
    return (0, 255) if fq.levelset.code_min >= 0 else (-128, 127)


def fills_storage(fq: FakeQuantize) -> bool:
    """Whether the quantizer's codes span its storage type (no Clip before its QuantizeLinear)."""
    return (fq.levelset.code_min, fq.levelset.code_max) == storage_range(fq)


class Int8Sigmoid(nn.Module):
    """``sigmoid`` of an 8-bit code tensor, quantized by ``out``, as onnxruntime's ``QLinearSigmoid`` computes it: a
    table of the 256 input codes, built when the session loads from onnxruntime's own logistic (MLAS's rational
    approximation) and ``QuantizeLinear`` rounding. The table here comes from onnxruntime on this machine
    (``qcompile.runtime.tables.sigmoid_table``), so the codes are those of the file it runs. Export, calibration and
    float reference runs see a plain ``sigmoid``."""

    def __init__(self, a: FakeQuantize, out: FakeQuantize, table=None):
        super().__init__()
        from qcompile.runtime.tables import sigmoid_table

        self._fqs = [a, out]
        self.offset = storage_range(a)[0]
        if table is None:
            table = sigmoid_table(*self.table_params(a, out))
        self.register_buffer("table", torch.from_numpy(table.astype("int32")))

    @staticmethod
    def table_params(a: FakeQuantize, out: FakeQuantize) -> tuple:
        """The parameters of ``qcompile.runtime.tables.sigmoid_table`` for these quantizers."""
        return (_unit(a), int(a.zero_point), storage_range(a)[0] < 0, _unit(out), int(out.zero_point),
                storage_range(out)[0] < 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fa, fc = self._fqs
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or not fc.enabled or fc.observer is not None:
            return torch.sigmoid(x)
        return quant.dequantize(self.codes(x), fc.alpha, fc.levelset, zero_point=fc.zero_point)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        fa = self._fqs[0]
        q = quant.quantize(x.float(), fa.alpha, fa.levelset, zero_point=fa.zero_point)
        return self.table[(q - self.offset).long()]


def _unit(fq: FakeQuantize) -> float:
    return float(_unit_f32(fq))


class IntegerOutput(nn.Module):
    """The float output of an int8 layer that is not re-quantized, as onnxruntime's ``QGemm`` writes it:
    y = float32(acc) · float32(S_x·S_w), where acc is the exact int32 accumulator (bias included) that the float64
    layer before it carries. Export, and float reference runs (input quantizer disabled), pass ``y`` through."""

    def __init__(self, input_fq: FakeQuantize, acc_scale: torch.Tensor):
        super().__init__()
        self._fqs = [input_fq]
        self.register_buffer("acc_scale", acc_scale.float().reshape(-1).clone())

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            return y
        if not self._fqs[0].enabled:
            return y.float()
        acc = torch.round(y.double() / self.acc_scale.double())
        return acc.float() * self.acc_scale


class Int8GlobalAvgPool(nn.Module):
    """Global average pooling of 8-bit codes, re-quantized by ``out`` exactly as onnxruntime's
    ``QLinearGlobalAveragePool`` does (MLAS): with N = H·W and s = f32(S_x / f32(S_y · N)),
    code = sat(round_half_even(f32(Σ q_x − Z_x·N) · s) + Z_y). Export, calibration and float reference runs see
    the plain average pool."""

    def __init__(self, pool: nn.Module, inp: FakeQuantize, out: FakeQuantize):
        super().__init__()
        self.pool = pool
        self._fqs = [inp, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fi, fo = self._fqs
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or not fo.enabled or fo.observer is not None:
            return self.pool(x)
        f32 = torch.float32
        n = x.shape[2:].numel()
        q = quant.quantize(x.float(), fi.alpha, fi.levelset, zero_point=fi.zero_point).to(torch.int64)
        total = q.flatten(2).sum(dim=2) - int(fi.zero_point) * n
        s_x = quant.unit_from_alpha(fi.alpha, fi.levelset).to(f32).reshape(())
        s_y = quant.unit_from_alpha(fo.alpha, fo.levelset).to(f32).reshape(())
        scale = s_x / (s_y * torch.tensor(float(n), dtype=f32))
        zp = fo.zero_point.to(f32).reshape(())
        lo, hi = fo.levelset.code_min, fo.levelset.code_max
        codes = torch.round(total.to(f32) * scale).clamp_(lo - zp, hi - zp) + zp
        codes = codes.to(torch.int32).reshape(*x.shape[:2], *([1] * (x.dim() - 2)))
        return quant.dequantize(codes, fo.alpha, fo.levelset, zero_point=fo.zero_point)


class Int8AvgPool(nn.Module):
    """Average pooling (1-D or 2-D, explicit pads; ceil mode where pads are not counted) of 8-bit codes,
    re-quantized by ``out`` exactly as onnxruntime's ``QLinearAveragePool`` does: each code dequantized to
    f32(S_x · (q − Z_x)), the cells of a window inside the input summed in float32 row by row from 0, divided by the
    window's count (the cells inside, or the whole kernel with ``count_include_pad``), then code =
    sat(round_half_even(f32(f32(y / S_y) + Z_y))). The zero
    point is added before the rounding, unlike ``QuantizeLinear``: an average a few float32 ulps from a half step
    (an Inception/NASNet branch whose pool output scale nearly equals its input's) came out one code apart from the
    simulation's ``round(y / S_y) + Z_y``. A window covering the whole input without pads is onnxruntime's global
    average pool (``Int8GlobalAvgPool``'s formula). Export, calibration and float reference runs see the plain
    pool."""

    def __init__(self, pool: nn.Module, inp: FakeQuantize, out: FakeQuantize, kernel: tuple, stride: tuple,
                 padding: tuple, count_include_pad: bool, ceil_mode: bool = False):
        super().__init__()
        self.pool = pool
        self._fqs = [inp, out]
        self.kernel, self.stride, self.padding = tuple(kernel), tuple(stride), tuple(padding)
        self.count_include_pad = bool(count_include_pad)
        self.ceil_mode = bool(ceil_mode)  # (with count_include_pad only in floor mode: see BindIntegerPools)

    def _out_size(self, n: int, p: int, k: int, st: int) -> int:
        if not self.ceil_mode:
            return (n + 2 * p - k) // st + 1
        out = -(-(n + 2 * p - k) // st) + 1
        return out - 1 if (out - 1) * st >= n + p else out  # the last window starts inside the input or left pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fi, fo = self._fqs
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or not fo.enabled or fo.observer is not None:
            return self.pool(x)
        dims = len(self.kernel)
        spatial = tuple(x.shape[2:])
        if spatial == self.kernel and not any(self.padding):
            return Int8GlobalAvgPool(self.pool, fi, fo)(x)
        f32 = torch.float32
        q = quant.quantize(x.float(), fi.alpha, fi.levelset, zero_point=fi.zero_point).to(torch.int32)
        s_x = quant.unit_from_alpha(fi.alpha, fi.levelset).to(f32).reshape(())
        s_y = quant.unit_from_alpha(fo.alpha, fo.levelset).to(f32).reshape(())
        v = (q - int(fi.zero_point)).to(f32) * s_x
        outs = [self._out_size(n, p, k, st) for n, p, k, st in zip(spatial, self.padding, self.kernel, self.stride)]
        pads = []
        for n, p, k, st, o in reversed(list(zip(spatial, self.padding, self.kernel, self.stride, outs))):
            pads += [p, max(p, (o - 1) * st + k - n - p)]  # ceil mode: windows past the right pad read zeros too
        v = F.pad(v, pads)  # zeros: adding 0.0 leaves a float sum as it was
        acc = torch.zeros(*x.shape[:2], *outs, dtype=f32, device=x.device)
        for offset in itertools.product(*(range(k) for k in self.kernel)):  # row-major: onnxruntime's order
            index = tuple(slice(o, o + st * (n - 1) + 1, st) for o, st, n in zip(offset, self.stride, outs))
            acc = acc + v[(..., *index)]
        counts = []
        for n_out, n, p, k, st in zip(outs, spatial, self.padding, self.kernel, self.stride):
            start = torch.arange(n_out, device=x.device) * st - p
            end = torch.clamp(start + k, max=n)
            counts.append(end - torch.clamp(start, min=0))
        if self.count_include_pad:
            count = torch.full(outs, float(math.prod(self.kernel)), dtype=f32, device=x.device)
        else:
            count = counts[0].to(f32) if dims == 1 else (counts[0][:, None] * counts[1][None, :]).to(f32)
        y = acc / count
        zp = fo.zero_point.to(f32).reshape(())
        lo, hi = fo.levelset.code_min, fo.levelset.code_max
        codes = torch.round(y / s_y + zp).clamp_(lo, hi).to(torch.int32)
        return quant.dequantize(codes, fo.alpha, fo.levelset, zero_point=fo.zero_point)


RECURRENT_MODULES = (nn.LSTM, nn.GRU, nn.RNN)


def stock_recurrent(mod) -> bool:
    """An ``nn.LSTM``/``nn.GRU``/``nn.RNN`` that computes what its class does (no ``forward`` of its own) and
    reads its weights from ``_flat_weights`` (``QuantizedRecurrent`` relies on that); no LSTM projection
    (``proj_size``, which torch.onnx does not export)."""
    return type(mod) in RECURRENT_MODULES and getattr(mod, "proj_size", 0) == 0 \
        and hasattr(mod, "_flat_weights") and hasattr(mod, "_flat_weights_names")


class QuantizedRecurrent(nn.Module):
    """A recurrent layer (``nn.LSTM``/``nn.GRU``/``nn.RNN``) with quantized weights: the weight matrices
    ``weight_ih_l*``/``weight_hh_l*`` (every layer and direction) read through per-row (per gate unit) weight
    quantizers, ``weight_fq[name]``; biases, states and the recurrence stay float, as in onnxruntime's ``LSTM``
    operator that the file runs it on (weight-only quantization: the weights are stored packed at their bit-width
    and dequantized in the graph).

    The layer runs as itself with its ``_flat_weights`` (the list the torch.nn recurrent forward hands to its
    kernel) replaced by the quantized weights for the call: its forward, hidden-state handling and export stay
    torch.nn's own."""

    def __init__(self, layer: nn.Module, quantizers: dict):
        super().__init__()
        self.layer = layer
        self.weight_fq = nn.ModuleDict(quantizers)

    def forward(self, *args, **kwargs):
        rnn = self.layer
        saved = rnn._flat_weights
        rnn._flat_weights = [self.weight_fq[name](w) if name in self.weight_fq else w
                             for name, w in zip(rnn._flat_weights_names, saved)]
        try:
            return rnn(*args, **kwargs)
        finally:
            rnn._flat_weights = saved
