"""Trainable fake-quantizers: drop-in subclasses of :class:`qcompile.qmodules.FakeQuantize`.

Every quantizer computes ``fake_quantize(x_in, alpha_e, levels)`` of :mod:`qcompile.quant` (the single numeric
reference, so simulation, export and integer lowering agree bit for bit); the method decides the quantizer input
``x_in``, the effective clipping value ``alpha_e`` and the gradient of the learned ``alpha``:

- :class:`LearnableFakeQuantize` with ``grad="rcf"`` (APoT, slides "Reparameterized Clipping Function"; the
  authors' ``_pq.backward``): ``x_in = x``, ``alpha_e = alpha``;
  ``dQ/dalpha = sign(x/alpha)`` where ``x`` is clipped, ``Pi(x/alpha) - x/alpha`` inside the clip range.
- ... with ``weight_norm`` (APoT "Weights Normalization", slides "Forward and Backward"): ``mu``, ``sigma`` of
  ``w`` per output channel (per tensor when ``axis`` is None), ``x_in = w - mu``, ``alpha_e = sigma * alpha``, so
  the quantized weight is ``sigma * alpha * Pi(w_n / alpha)`` with ``w_n = (w - mu) / sigma``. The α gradient is
  the RCF term times ``sigma`` (chain rule), and ``w`` gets its gradient through ``mu`` and ``sigma`` as well
  ("BACKWARD i. compute the gradients of weights before normalization").
- :class:`LearnableFakeQuantize` with ``grad="ste"`` (PACT, lecture): ``dQ/dalpha = 1`` (``sign(x)`` for signed
  levels) where ``x`` is clipped, ``0`` inside.
- :class:`SDQFakeQuantize` (SDQ sec. 2, eq. 1-8): ``alpha_e = alpha * sigma`` with ``sigma`` the std of the
  weights or the running σ of the activations' mirrored positive part (eq. 3, momentum 0.001);
  ``g_alpha = s * sigma * sign(x) * g_y`` where ``|x| >= alpha * sigma``, ``0`` inside (eq. 6/8, ``s`` the
  gradient scale; the ``lambda * alpha`` term of eq. 8 is the optimizer's weight decay on the α group).

The input ``x`` always gets the straight-through estimator of :func:`qcompile.quant.fake_quantize`: the incoming
gradient inside the clip range, zero outside (the lecture's "STE with saturation"; SDQ eq. 7).

``FakeQuantize`` semantics are kept: the buffer ``alpha`` holds the effective clipping value of the last
forward (the real range of the levels), ``zero_point``, ``scheme``, ``bits``, ``signed``, ``axis`` and ``role``
mean what they mean there, so the pipeline's passes and the validator read a trained model as they read a
calibrated one. The learned parameter is ``learned_alpha`` (the paper's α, in the method's units: the clip value
itself for PACT/APoT without normalisation, in normalised units with weight normalisation, the multiplier of
``sigma`` for SDQ). Export goes through :func:`qcompile.qat.convert`, which turns each trainable quantizer back
into a plain calibrated ``FakeQuantize`` with ``alpha = alpha_e`` and, for weight normalisation, stores
``w - mu`` as the layer weight.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from qcompile import quant
from qcompile.errors import UserError
from qcompile.qmodules import FakeQuantize

GRADS = ("rcf", "ste")
SDQ_MOMENTUM = 1e-3  # SDQ eq. 3: "the momentum value of 0.001 was empirically obtained"


class _GradScale(torch.autograd.Function):
    """Identity forward (the value is untouched, bit for bit); backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass, ``scale * grad`` in the backward pass (SDQ's gradient scale ``s``, eq. 8)."""
    if scale == 1.0:
        return x
    return _GradScale.apply(x, float(scale))


def _reduce_dims(x: torch.Tensor, axis: Optional[int]) -> list[int]:
    """Dimensions to reduce for statistics per ``axis`` channel (all dimensions when ``axis`` is None)."""
    if axis is None:
        return list(range(x.dim()))
    axis = axis % x.dim()
    return [d for d in range(x.dim()) if d != axis]


def channel_stats(x: torch.Tensor, axis: Optional[int], centred: bool = True):
    """``(mu, sigma)`` of ``x`` per channel along ``axis`` (per tensor when None), kept broadcastable to ``x``.

    ``sigma`` is the unbiased standard deviation (``torch.std``, as the APoT authors' code) and at least
    ``MIN_ALPHA``; gradients flow through both. ``centred=False``: the spread about 0 instead, ``sqrt(E[x²])``, for a
    clip centred at 0 (SDQ's weights, whose mean it takes as 0; weight normalisation by scale only): the spread about
    the mean of a depthwise blur filter, mostly its mean, set its clip at a fraction of its weights (4-bit SDQ
    weights: 9.5 dB where sqrt(E[w²]) gives 21.0 dB).
    """
    dims = _reduce_dims(x, axis)
    mu = x.mean(dim=dims, keepdim=True)
    if not centred:
        return mu, x.pow(2).mean(dim=dims, keepdim=True).sqrt().clamp_min(quant.MIN_ALPHA)
    if x.numel() // max(mu.numel(), 1) < 2 and x.numel() > 1:
        # one value per channel (nn.Linear(1, d), a depthwise 1x1 conv): its unbiased std is NaN (0 / 0), which
        # stopped qat.prepare in its MSE observer; the spread of the whole tensor is the channels' common scale
        sigma = x.std().clamp_min(quant.MIN_ALPHA).expand_as(mu)
    else:
        sigma = x.std(dim=dims, keepdim=True).clamp_min(quant.MIN_ALPHA)
    return mu, sigma


def _as_alpha_shape(stat: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """A keep-dim statistic as the shape ``fake_quantize`` expects of ``alpha`` (scalar, or 1-D along axis)."""
    return stat.reshape(()) if axis is None else stat.reshape(-1)


class LearnableFakeQuantize(FakeQuantize):
    """A fake-quantizer with a learned clipping value: APoT (RCF, optional weight normalisation) or PACT/STE.

    Args:
        scheme, bits, signed, axis, role: as :class:`FakeQuantize`.
        init_alpha: the initial learned α (scalar; or 1-D along ``axis`` for a per-channel α).
        zero_point: the zero point (``uniform_asym`` only; not learned).
        grad: ``"rcf"`` (APoT) or ``"ste"`` (PACT) gradient of α.
        weight_norm: normalise the input to zero mean and unit variance before clipping (weights only), per
            ``axis`` channel (or per tensor when ``axis`` is None).
        center: with ``weight_norm``, subtract the mean (the paper); False divides by ``sigma`` only, keeping
            the mean in the quantized weight (``x_in = w``, ``alpha_e = sigma * alpha``).
        learn_alpha: False keeps α fixed (``requires_grad=False``); the input still gets the STE.
    """

    method = "apot"

    def __init__(self, scheme: str, bits: int, signed: bool, axis: Optional[int] = None, role: str = "activation",
                 *, init_alpha: torch.Tensor, zero_point=0, grad: str = "rcf", weight_norm: bool = False,
                 center: bool = True, learn_alpha: bool = True, observer: str = "mse"):
        super().__init__(scheme, bits, signed, axis=axis, role=role, observer=observer)
        if grad not in GRADS:
            raise UserError(f"grad must be one of {', '.join(GRADS)}, got {grad!r}")
        if weight_norm and role != "weight":
            raise UserError("weight normalisation applies to weight quantizers only")
        init = torch.as_tensor(init_alpha, dtype=torch.float32).detach().clone()
        if init.dim() > 1 or (init.dim() == 1 and axis is None):
            raise UserError(f"init_alpha must be a scalar or 1-D along axis, got shape {tuple(init.shape)}")
        self.grad = grad
        self.weight_norm = bool(weight_norm)
        self.center = bool(center)
        self.learned_alpha = nn.Parameter(init, requires_grad=bool(learn_alpha))
        self.learnable = bool(learn_alpha)  # fixed at construction; freezing only stops the updates
        # the effective alpha buffer takes its final shape at the first forward (prepare runs one)
        FakeQuantize.set_params(self, init, zero_point)

    # -- parameters ----------------------------------------------------------------------------------------
    def set_params(self, alpha: torch.Tensor, zero_point=0) -> None:
        """Set the learned α (in this quantizer's units) and the zero point."""
        with torch.no_grad():
            self.learned_alpha.copy_(torch.as_tensor(alpha, dtype=torch.float32).expand_as(self.learned_alpha))
        FakeQuantize.set_params(self, self.alpha, zero_point)

    def clip_alpha(self) -> torch.Tensor:
        """The learned α kept positive (``>= MIN_ALPHA``), gradient intact above the bound."""
        return self.learned_alpha.clamp_min(quant.MIN_ALPHA)

    def effective(self, x: torch.Tensor):
        """``(x_in, alpha_e)``: the tensor the levels quantize and the effective clipping value (module doc)."""
        alpha = self.clip_alpha()
        if self.weight_norm:
            mu, sigma = channel_stats(x, self.axis, centred=self.center)
            x_in = x - mu if self.center else x
            return x_in, _as_alpha_shape(sigma, self.axis) * alpha
        if self.axis is not None and alpha.dim() == 0:
            alpha = alpha.expand(x.shape[self.axis])
        return x, alpha

    # -- numerics ----------------------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` with the current learned parameters (of ``w - mu`` with weight normalisation)."""
        with torch.no_grad():
            x_in, alpha = self.effective(x)
        return quant.quantize(x_in, alpha, self.levelset, axis=self.axis, zero_point=self.zero_point)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        x_in, alpha = self.effective(x)
        y = quant.fake_quantize(x_in, alpha, self.levelset, axis=self.axis, grad=self.grad,
                                zero_point=self.zero_point)
        with torch.no_grad():  # FakeQuantize.alpha: the effective clipping value of this forward
            self.alpha = alpha.detach().to(torch.float32).clone()
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            raise UserError("a QAT model exports through qcompile.qat.convert(model) (or qcompile.qat.export): "
                            "it folds the learned parameters into plain quantizers first")
        return super().forward(x)

    def extra_repr(self) -> str:
        extra = f", grad={self.grad}"
        if self.weight_norm:
            extra += ", weight-norm" + ("" if self.center else " (scale only)")
        if not self.learned_alpha.requires_grad:
            extra += ", alpha fixed"
        return super().extra_repr() + extra


class SDQFakeQuantize(LearnableFakeQuantize):
    """SDQ quantizer (Ardakani et al., sec. 2-4): clip at ``alpha * sigma``, eq. 1-2 and 4-5 (uniform) or the
    levels of eq. 9-10 (base-2 logarithmic, ``log2``), each value rounded to its nearest level, not in the log
    domain as eq. 9 rounds (docs/levels.md: 8.5-15 % of codes differ at 2-5 bits).

    ``sigma``: for weights the standard deviation of the weights (per output channel along ``axis`` when given,
    since BatchNorm is folded into the weights first; the paper's mean is taken as zero, sec. 2), recomputed at
    every forward; for activations a running average (eq. 3, ``momentum`` 0.001) of the batch ``sigma`` of the
    *mirrored positive part*, ``sqrt(E[x^2 | x > 0])`` (zero mean by construction), updated in training mode.
    ``sigma`` carries no gradient: the α gradient is eq. 6 times the gradient scale ``s`` (eq. 8).

    :meth:`freeze` starts SDQ's second training phase (sec. 4.2): α and ``sigma`` are frozen at their values.
    """

    method = "sdq"

    def __init__(self, scheme: str, bits: int, signed: bool, axis: Optional[int] = None, role: str = "activation",
                 *, init_alpha: torch.Tensor, sigma: torch.Tensor, zero_point=0, grad_scale: float = 1.0,
                 momentum: float = SDQ_MOMENTUM, learn_alpha: bool = True, observer: str = "sdq"):
        super().__init__(scheme, bits, signed, axis=axis, role=role, init_alpha=init_alpha, zero_point=zero_point,
                         grad="ste", weight_norm=False, learn_alpha=learn_alpha, observer=observer)
        if not 0.0 <= momentum <= 1.0:
            raise UserError(f"SDQ momentum must be in [0, 1], got {momentum}")
        self.grad_scale = float(grad_scale)
        self.momentum = float(momentum)
        self.frozen = False
        self.register_buffer("sigma", torch.as_tensor(sigma, dtype=torch.float32).detach().clone())

    @staticmethod
    def batch_sigma(x: torch.Tensor, role: str, axis: Optional[int]) -> torch.Tensor:
        """``sigma`` of one tensor: RMS of weights about 0 (per ``axis`` channel), or of the mirrored positive part of
        activations, ``sqrt(E[x^2 | x > 0])`` (sec. 2)."""
        x = x.detach().to(torch.float32)
        if role == "weight":  # about 0: SDQ takes the weights' mean as 0 (its clip is centred there)
            _, sigma = channel_stats(x, axis, centred=False)
            return _as_alpha_shape(sigma, axis)
        pos = x > 0
        n = pos.sum().clamp_min(1)
        return torch.sqrt(torch.where(pos, x * x, 0.0).sum() / n).clamp_min(quant.MIN_ALPHA)

    def freeze(self) -> None:
        """Phase two (sec. 4.2): α and ``sigma`` keep their current values from now on."""
        self.learned_alpha.requires_grad_(False)
        self.frozen = True

    def effective(self, x: torch.Tensor):
        if not self.frozen:
            if self.role == "weight":
                self.sigma = self.batch_sigma(x, self.role, self.axis)
            elif self.training and torch.is_grad_enabled():
                with torch.no_grad():  # eq. 3: running average of sigma
                    self.sigma.mul_(1.0 - self.momentum).add_(self.momentum * self.batch_sigma(x, self.role, None))
        alpha = grad_scale(self.clip_alpha(), self.grad_scale)
        return x, alpha * self.sigma

    def extra_repr(self) -> str:
        return (FakeQuantize.extra_repr(self) + f", sdq s={self.grad_scale:g}"
                + (", frozen" if self.frozen else "") + ("" if self.learned_alpha.requires_grad or self.frozen
                                                         else ", alpha fixed"))


def learnable_quantizers(model: nn.Module) -> list[LearnableFakeQuantize]:
    """The trainable quantizers of ``model``, in ``named_modules`` order."""
    return [m for m in model.modules() if isinstance(m, LearnableFakeQuantize)]


class _RoundToGrid(torch.autograd.Function):
    """``round(b / scale) * scale`` (float32, as ``QuantizeBias``) forward; identity backward (STE)."""

    @staticmethod
    def forward(ctx, b, scale):
        return torch.round(b.float() / scale) * scale

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class BiasQuantize(nn.Module):
    """The bias of a quantized layer on its accumulator grid ``S_x * S_w`` during training (STE).

    Deployment keeps the bias as a 32-bit integer, ``q_bias = round(b / (S_x S_w))`` (the lecture's integer
    layer; ``passes/quantize_bias.py`` rounds it at compile time, and onnxruntime at load time). At 2-3 bits the
    grid is coarse, so QAT trains with the rounded bias. ``S_x``, ``S_w`` are the units of the layer's input and
    weight quantizers in this forward (their effective ``alpha``), taken as constants. :func:`qcompile.qat.convert`
    stores the rounded bias and removes this module, so ``QuantizeBias`` then finds nothing to change.
    """

    def __init__(self, input_quantizer: FakeQuantize, weight_quantizer: FakeQuantize):
        super().__init__()
        self._quantizers = (input_quantizer, weight_quantizer)  # references, not submodules

    def scale(self) -> torch.Tensor:
        xfq, wfq = self._quantizers
        s_x = quant.unit_from_alpha(xfq.alpha, xfq.levelset).float()
        s_w = quant.unit_from_alpha(wfq.alpha, wfq.levelset).float()
        return (s_x * s_w).float().reshape(-1)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return _RoundToGrid.apply(b, self.scale())
