"""AdaptiveRounding: choose each weight's level for the layer's output, not for the weight alone.

Rounding every weight to its nearest level minimises ``‖W − Q(W)‖²``, but what the network sees is the layer's
output: the lecture's adaptive rounding (Nagel et al., "Up or Down?", 2020) picks the quantized weights ``W̃`` that
minimise ``‖W·x − W̃·x‖²`` over the calibration inputs ``x``. Over the data that objective is the quadratic form
``Σ_o (w_o − w̃_o)ᵀ H (w_o − w̃_o)`` with ``H = Σ x·xᵀ``, one per layer, so it is solved here the way GPTQ (Frantar
et al., 2023) solves it: one input column at a time, each column's weights set to a level of the layer's own level
set (the quantizer's nearest level, so any scheme: APoT, PoT, uniform, ternary ...), and the error that leaves
spread onto the columns not yet quantized through the inverse of ``H`` (its Cholesky factor). Columns go in order
of decreasing ``H_ii`` (the inputs with the most energy first). ``H`` gets ``DAMP`` of its mean diagonal added, so
that a few calibration samples (fewer than the layer's fan-in: the ill-posed case) still give a well-posed
problem.

The inputs ``x`` are what each layer reads in the quantized simulation (quantized activations, the layers before it
with nearest rounding), over the calibration data, one pass: for a convolution, its input patches (``F.unfold``;
``Tensor.unfold`` in 3-D), at most ``MAX_ROWS`` of them per layer (a fixed-seed sample). The per-channel ranges
``alpha`` stay those Calibrate chose; the new weights are on their levels exactly, so the weight quantizer gives them
back unchanged, and the file's codes are those of the simulation as before. Run after Calibrate and before
BiasCorrection (which then matches the output means).

Before: ``F.conv2d(xq, weight_fq(W), b)``;  After: the same graph with ``W`` replaced by ``W̃`` (on its levels).

A transposed convolution is solved as the convolution it equals (``_as_convolution``, ``_transposed_input``): its
input with ``stride − 1`` zeros between samples and padded by ``dilation·(k − 1) − padding``, the weight's channels
swapped within each group and its kernel flipped; the solved weight is mapped back.

Left alone (reported): layers whose weight several calls share, fan-ins over ``MAX_FAN_IN`` (an ``H`` of that size
costs more than the layer gains), 3-D convolutions with dilation, and layers no calibration sample reached.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F

from qcompile.qmodules import FakeQuantize

from .base import (Pass, PassResult, attr_value, calibration_inputs, data_batches, data_length, remember_float,
                   require_calibrated)

DAMP = 0.01  # of the mean of diag(H), added to its diagonal (GPTQ's default)
MAX_ROWS = 1 << 16  # input rows (samples x positions) per layer that H is summed over
MAX_FAN_IN = 8192  # columns of W (in_channels / groups x kernel): H is fan-in^2 float32
CHUNK = 1 << 23  # input elements x kernel size unfolded at a time
BLOCK = 128  # columns updated lazily together (GPTQ's blocks): the same result, fewer large updates

_LAYERS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, F.linear: 0}
# transposed convolutions: solved as the convolution they equal (see _as_convolution)
_TRANSPOSED = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}


def _pair(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _layer_args(node):
    """``(input, weight, bias, stride, padding, dilation, groups)`` of a layer node, defaults filled in (a
    transposed convolution's ``output_padding`` is read by ``_transposed_args``)."""
    if node.target in _TRANSPOSED:
        x, w, b, stride, padding, _out_pad, groups, dilation = _transposed_args(node)
        return x, w, b, stride, padding, dilation, groups
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    values = dict(zip(names, node.args))
    for k, v in node.kwargs.items():
        values[k] = v
    return tuple(values.get(k, defaults.get(k)) for k in names)


def _transposed_args(node):
    """``(input, weight, bias, stride, padding, output_padding, groups, dilation)`` of a transposed convolution."""
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
    defaults = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    return tuple(values.get(k, defaults.get(k)) for k in names)


def _as_convolution(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A transposed convolution's weight ``(in, out / groups, k...)`` as the weight ``(out, in / groups, k...)`` of
    the convolution it equals on its stride-dilated input (``_transposed_input``): channels swapped within each
    group, kernel flipped. ``_from_convolution`` is the inverse."""
    cin, per, kernel = w.shape[0], w.shape[1], w.shape[2:]
    flip = tuple(range(2, w.dim()))
    return (w.reshape(groups, cin // groups, per, *kernel).transpose(1, 2)
            .reshape(groups * per, cin // groups, *kernel).flip(flip))


def _from_convolution(w_eq: torch.Tensor, groups: int) -> torch.Tensor:
    out, per_in, kernel = w_eq.shape[0], w_eq.shape[1], w_eq.shape[2:]
    flip = tuple(range(2, w_eq.dim()))
    return (w_eq.flip(flip).reshape(groups, out // groups, per_in, *kernel).transpose(1, 2)
            .reshape(groups * per_in, out // groups, *kernel))


def _transposed_input(node, x: torch.Tensor, kernel: tuple) -> torch.Tensor:
    """What the equal convolution (stride 1, the layer's dilation, no padding) reads: ``x`` with ``stride − 1``
    zeros between its samples, padded by ``dilation·(k − 1) − padding`` before and that plus ``output_padding``
    after (negative: cropped)."""
    _x, _w, _b, stride, padding, out_pad, _g, dilation = _transposed_args(node)
    n = len(kernel)
    stride, padding, out_pad, dilation = (_pair(v, n) for v in (stride, padding, out_pad, dilation))
    if any(s > 1 for s in stride):
        spread = x.new_zeros(*x.shape[:2], *((d - 1) * s + 1 for d, s in zip(x.shape[2:], stride)))
        spread[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)] = x
        x = spread
    pad = []
    for i in reversed(range(n)):  # F.pad: the last dimension first
        before = dilation[i] * (kernel[i] - 1) - padding[i]
        pad += [before, before + out_pad[i]]
    return F.pad(x, pad) if any(pad) else x


def _by_row(fq: FakeQuantize, groups: int) -> FakeQuantize:
    """A transposed convolution's weight quantizer (scales on axis 1 of ``(in, out / groups, k...)``: with groups,
    one scale serves the same output position of every group) as a quantizer of the rows of the convolution it
    equals (axis 0, one scale per output channel, group-major): a copy, the layer's own quantizer unchanged."""
    rows = copy.copy(fq)
    rows._buffers = dict(fq._buffers)  # set_params below writes the copy's buffers, not the layer's
    rows.axis = 0
    alpha, zero_point = fq.alpha.detach(), fq.zero_point.detach()
    if alpha.numel() > 1:
        alpha = alpha.reshape(-1).repeat(groups)
    if zero_point.numel() > 1:
        zero_point = zero_point.reshape(-1).repeat(groups)
    rows.set_params(alpha, zero_point)
    return rows


class _Rows:
    """Accumulates ``H = Σ x·xᵀ`` (float32) over up to ``MAX_ROWS`` rows of a layer's input matrix."""

    def __init__(self, fan_in: int, groups: int):
        self.h = torch.zeros(groups, fan_in, fan_in)
        self.rows = 0
        self.gen = torch.Generator().manual_seed(0)

    def add(self, x: torch.Tensor, limit: int) -> None:
        """``x``: (groups, rows, fan_in); at most ``limit`` of its rows (a fixed-seed sample), ``MAX_ROWS`` in all."""
        limit = min(limit, MAX_ROWS - self.rows)
        if limit <= 0 or x.shape[1] == 0:
            return
        if x.shape[1] > limit:
            x = x[:, torch.randperm(x.shape[1], generator=self.gen)[:limit]]
        self.h.baddbmm_(x.transpose(1, 2), x)
        self.rows += x.shape[1]


def _input_rows(node, x: torch.Tensor, groups: int, weight_shape) -> Optional[torch.Tensor]:
    """A layer's input as (groups, rows, fan_in): linear inputs flattened to rows, conv inputs unfolded into patches
    (the columns in the order of ``weight.reshape(out, -1)``)."""
    x = x.detach().float()
    if node.target is F.linear:
        return x.reshape(1, -1, x.shape[-1])
    _, _w, _b, stride, padding, dilation, _g = _layer_args(node)
    kernel = tuple(weight_shape[2:])
    if node.target in _TRANSPOSED:  # the equal convolution's input: stride 1, no padding
        dims = _TRANSPOSED[node.target]
        x, stride, padding = _transposed_input(node, x, kernel), 1, 0
    else:
        dims = _LAYERS[node.target]
    if dims == 1:  # as a 2-D convolution of height 1
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1,) + kernel, (1,) + _pair(stride, 1), (1,) + _pair(dilation, 1)
        padding = padding if isinstance(padding, str) else (0,) + _pair(padding, 1)
    n_dims = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * n_dims
        else:  # "same": F.conv2d pads (d·(k−1)) // 2 before and the rest after; unfold pads evenly
            total = [d * (k - 1) for d, k in zip(_pair(dilation, n_dims), kernel)]
            if any(t % 2 for t in total):
                return None
            padding = tuple(t // 2 for t in total)
    if dims == 3:  # patches by Tensor.unfold along depth, height and width (no dilation there)
        if any(d != 1 for d in _pair(dilation, 3)):
            return None
        (pd, ph, pw), (sd, sh, sw) = _pair(padding, 3), _pair(stride, 3)
        x = F.pad(x, (pw, pw, ph, ph, pd, pd))
        patches = x.unfold(2, kernel[0], sd).unfold(3, kernel[1], sh).unfold(4, kernel[2], sw)
        c = patches.shape[1]
        cols = patches.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, groups, c * math.prod(kernel) // groups)
        return cols.transpose(0, 1)
    cols = F.unfold(x, kernel, dilation=_pair(dilation, 2), padding=_pair(padding, 2), stride=_pair(stride, 2))
    n, d, positions = cols.shape  # d = in_channels x kernel
    cols = cols.transpose(1, 2).reshape(n * positions, groups, d // groups)
    return cols.transpose(0, 1)


def _level_table(fq: FakeQuantize, rows: int) -> Optional[torch.Tensor]:
    """(rows, levels) float32: every level of each output channel's quantizer, ascending; None where they are not
    the quantizer's own fixed points (then each column goes through ``fq.simulate``)."""
    from qcompile import quant

    ls = fq.levelset
    grid = torch.tensor(ls.grid, dtype=torch.int32)
    per_channel = fq.alpha.numel() > 1
    zp = fq.zero_point.to(torch.int32).reshape(-1)
    codes = grid[None, :] + (zp[:, None] if zp.numel() > 1 else zp.reshape(1, 1))
    codes = codes.expand(rows, -1) if codes.shape[0] == 1 else codes
    if per_channel and fq.alpha.numel() != rows:
        return None
    levels = quant.dequantize(codes, fq.alpha.reshape(-1) if per_channel else fq.alpha, ls,
                              axis=0 if per_channel else None, zero_point=fq.zero_point)
    levels = levels.float().contiguous()
    if not bool((levels[:, 1:] > levels[:, :-1]).all()) or not torch.equal(fq.simulate(levels), levels):
        return None
    return levels


def adaptive_round(w: torch.Tensor, h: torch.Tensor, fq: FakeQuantize) -> torch.Tensor:
    """``W̃`` (float32, on ``fq``'s levels) minimising ``Σ_o (w_o − w̃_o)ᵀ h_g (w_o − w̃_o)`` in GPTQ's column order
    with its updates, for all groups at once: ``w`` (groups, out / groups, fan_in), ``h`` (groups, fan_in,
    fan_in) float32; rows in output-channel order (group-major), as ``fq``'s per-channel ranges."""
    groups, rows, fan_in = w.shape
    h = h.clone()
    w = w.float().clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)  # a view: the edits below go into h
    dead = diag == 0
    diag += dead.float()  # an input no sample reached: its column is rounded, nothing moves onto it
    diag += DAMP * diag.mean(dim=1, keepdim=True)
    order = torch.argsort(diag, dim=1, descending=True)  # per group
    h = h.gather(1, order[:, :, None].expand(groups, fan_in, fan_in))
    h = h.gather(2, order[:, None, :].expand(groups, fan_in, fan_in))
    w = w.gather(2, order[:, None, :].expand(groups, rows, fan_in))
    # GPTQ's U = chol(H⁻¹) (upper), from one factorisation: with J the reversal, J·H·J = L·Lᵀ gives
    # H⁻¹ = (J·L⁻¹·J)ᵀ(J·L⁻¹·J), and J·L⁻¹·J is upper triangular with a positive diagonal
    chol, info = torch.linalg.cholesky_ex(h.flip(1, 2))
    ok = info == 0  # positive definite, damped (it is, in exact arithmetic): a group that is not keeps nearest
    eye = torch.eye(fan_in, dtype=h.dtype).expand_as(h)
    if not bool(ok.all()):
        chol = torch.where(ok[:, None, None], chol, eye)
    u = torch.linalg.solve_triangular(chol, eye, upper=False).flip(1, 2)
    if not bool(ok.all()):
        u = torch.where(ok[:, None, None], u, eye)  # identity: plain nearest rounding, no error moved
    q = torch.empty_like(w)
    levels = _level_table(fq, groups * rows)
    ls = fq.levelset
    if levels is not None and ls.is_uniform and not bool(fq.zero_point.any()):
        # uniform levels: the nearest code directly (8-bit: 255 midpoints per weight were most of a ViT's solve)
        from qcompile import quant

        unit = quant.unit_from_alpha(fq.alpha.reshape(-1) if fq.alpha.numel() > 1 else fq.alpha, ls)
        unit = unit.reshape(-1).expand(groups * rows).reshape(groups, rows)

        def nearest(col: torch.Tensor) -> torch.Tensor:  # code x unit: the table's values, bit for bit
            return torch.clamp(torch.round(col / unit), ls.qmin, ls.qmax) * unit
    elif levels is not None:  # each row's levels and the midpoints between them: a column is two small ops
        mids = (levels[:, 1:] + levels[:, :-1]) / 2

        def nearest(col: torch.Tensor) -> torch.Tensor:  # (groups, rows) -> their levels
            idx = (col.reshape(-1, 1) > mids).sum(dim=1, keepdim=True)
            return levels.gather(1, idx).reshape(groups, rows)
    else:
        def nearest(col: torch.Tensor) -> torch.Tensor:
            return fq.simulate(col.reshape(groups * rows, 1).float()).reshape(groups, rows)

    for b0 in range(0, fan_in, BLOCK):
        b1 = min(b0 + BLOCK, fan_in)
        block = w[:, :, b0:b1].clone()
        errs = torch.empty_like(block)
        ub = u[:, b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = block[:, :, j]
            qc = nearest(col)
            q[:, :, b0 + j] = qc
            err = (col - qc) / ub[:, j, j][:, None]
            block[:, :, j:] -= err[:, :, None] * ub[:, j, j:][:, None, :]
            errs[:, :, j] = err
        w[:, :, b1:] -= errs @ u[:, b0:b1, b1:]
    inverse = torch.argsort(order, dim=1)
    return q.gather(2, inverse[:, None, :].expand(groups, rows, fan_in)).float()


class AdaptiveRounding(Pass):
    needs_quantizers = True  # before InsertQuantizers: nothing to do, and the report says so

    def __init__(self, data=None, batch_size: int = 32):
        super().__init__()
        self.data = data
        self.batch_size = batch_size

    def _layers(self, gm):
        uses: dict = {}
        found = []
        for node in gm.graph.nodes:
            if node.op != "call_function" or not (node.target in _LAYERS or node.target in _TRANSPOSED) \
                    or len(node.args) < 2:
                continue
            wq = node.args[1]
            if not (isinstance(wq, torch.fx.Node) and wq.op == "call_module"):
                continue
            fq = gm.get_submodule(wq.target)
            if not (isinstance(fq, FakeQuantize) and fq.role == "weight" and fq.enabled and fq.calibrated):
                continue
            wnode = wq.args[0] if wq.args else None
            if not (isinstance(wnode, torch.fx.Node) and wnode.op == "get_attr"):
                continue
            uses[wnode.target] = uses.get(wnode.target, 0) + 1
            found.append((node, fq, wnode))
        layers, shared = [], []
        for node, fq, wnode in found:
            (shared if uses[wnode.target] > 1 else layers).append((node, fq, wnode))
        return layers, shared

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        require_calibrated(gm, "AdaptiveRounding")  # the levels it chooses among are the calibrated ones
        self.data = calibration_inputs(self.data, gm)
        if self.data is None:
            self.report.append("no calibration data: nearest rounding kept (adaptive rounding needs the layers' "
                               "inputs)")
            return PassResult(gm, False)
        layers, shared = self._layers(gm)
        if not layers and not shared and any(getattr(m, "role", None) == "weight" for m in gm.modules()):
            # a compiled model: its layers are bound to integer kernels, no fake-quantized layer call is left
            self.report.append("no layer with fake-quantized weights to round (after BindIntegerLayers, or on a "
                               "compiled model): nothing done; run AdaptiveRounding right after Calibrate")
            return PassResult(gm, False)
        if shared:
            self.report.append(f"{len(shared)} layer call(s) share their weights with another call: nearest rounding "
                               "kept there")
        todo = {}
        for node, fq, wnode in layers:
            w = attr_value(gm, wnode).detach()
            groups = 1 if node.target is F.linear else _layer_args(node)[6]
            name = node.meta.get("layer", node.name)
            if node.target in _TRANSPOSED:
                w = _as_convolution(w, groups)  # solved on the convolution it equals, rows = output channels
            fan_in = w[0].numel()
            if fan_in > MAX_FAN_IN:
                self.report.append(f"{name}: fan-in {fan_in} over {MAX_FAN_IN}, nearest rounding kept")
                continue
            todo[node] = (fq, wnode, w, groups, _Rows(fan_in, groups))
        if not todo:
            return PassResult(gm, False)
        skipped = set()

        per_sample = max(1, MAX_ROWS // max(1, data_length(self.data)))  # rows from every sample alike

        class Collect(torch.fx.Interpreter):
            def run_node(self, n):
                if n in todo and n not in skipped:
                    x = self.env.get(n.args[0]) if isinstance(n.args[0], torch.fx.Node) else None
                    fq, wnode, w, groups, rows = todo[n]
                    if not isinstance(x, torch.Tensor) or x.dim() < 2:
                        skipped.add(n)
                    else:  # a few samples at a time: a conv's patches are kernel-size times its input
                        spread = math.prod(_pair(_transposed_args(n)[3], x.dim() - 2)) if n.target in _TRANSPOSED \
                            else 1  # the stride's zeros between a transposed convolution's inputs
                        step = max(1, CHUNK // max(1, x[:1].numel() * spread * max(1, w[0, 0].numel())))
                        for i in range(0, x.shape[0], step):
                            cols = _input_rows(n, x[i:i + step], groups, w.shape)
                            if cols is None:
                                skipped.add(n)
                                break
                            rows.add(cols, per_sample * (min(i + step, x.shape[0]) - i))
                return super().run_node(n)

        with torch.no_grad():
            for batch in data_batches(self.data, self.batch_size):
                Collect(gm).run(*batch)
        changed = False
        for node, (fq, wnode, w, groups, rows) in todo.items():
            name = node.meta.get("layer", node.name)
            if node in skipped or rows.rows == 0:
                self.report.append(f"{name}: no input rows (a padding or dilation this pass does not unfold), nearest "
                                   "rounding kept")
                continue
            rows_fq = _by_row(fq, groups) if node.target in _TRANSPOSED and fq.axis == 1 else fq
            new = adaptive_round(w.reshape(groups, w.shape[0] // groups, -1).float(), rows.h, rows_fq)
            new = new.reshape(w.shape)
            if node.target in _TRANSPOSED:
                w, new = attr_value(gm, wnode).detach(), _from_convolution(new, groups)
            before = fq.simulate(w.float())
            diff = float((new != before).float().mean())
            remember_float(gm, str(wnode.target))
            current = attr_value(gm, wnode)
            if torch.equal(current.detach(), new.to(current.dtype)):  # a second run: the weights are where they were
                self.report.append(f"{name}: weights unchanged ({100 * diff:.1f}% on another level than the nearest)")
                continue
            with torch.no_grad():
                current.copy_(new.to(w.dtype))
            self.report.append(f"{name}: {100 * diff:.1f}% of weights on another level than the nearest "
                               f"({rows.rows} input rows)")
            changed = True
        return PassResult(gm, changed)
