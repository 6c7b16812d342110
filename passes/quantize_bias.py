"""QuantizeBias: put the bias of every quantized layer on its accumulator grid, S_b = S_x·S_w.

The lecture's integer layer keeps the bias as a 32-bit integer, q_bias = round(b / (S_x S_w)), and onnxruntime
does the same to any float bias of a Conv/Gemm whose inputs come from DequantizeLinear (at load time, even when
the layer then runs on float kernels). The simulation must therefore see the rounded bias too:

    b  ->  round(b / (S_x · S_w)) · (S_x · S_w)        (float32 arithmetic, per output channel)

Before: ``F.conv2d(xq, wq, b)`` with any float ``b``.  After: the same graph, ``b`` on the S_x·S_w grid.

A layer with 32-bit input or weight codes (PoT/log2 activations at 5 bits, weights at 6) is the exception: the
file dequantizes those codes with ``Cast`` and ``Mul`` (onnxruntime has no int32 ``QuantizeLinear``, which its
QDQ propagation would insert), so onnxruntime sees a float layer and keeps its bias float; so does the
simulation, and the bias is left alone.

Runs after calibration and bias correction (it needs the final scales and biases). Idempotent.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from qcompile import quant
from qcompile.qmodules import FakeQuantize, int8_conv1d, int8_conv2d, int8_conv3d, int8_linear

from .base import (Pass, PassResult, fake_quantizer, input_quantizer, private_bias, remember_float,
                   require_calibrated)

_LAYERS = (F.conv1d, F.conv2d, F.conv3d, F.linear, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
           # the same layers once BindIntegerLayers made them integer kernels: a pipeline that binds first still
           # gets their biases rounded (and the export's check sees them), instead of a file 1e-4 off the simulation
           int8_conv1d, int8_conv2d, int8_conv3d, int8_linear)


def accumulator_scale(xfq: FakeQuantize, wfq: FakeQuantize) -> torch.Tensor:
    """float32(S_x) · float32(S_w) per output channel, computed in float32 as onnxruntime does."""
    s_x = quant.unit_from_alpha(xfq.alpha, xfq.levelset).float()
    s_w = quant.unit_from_alpha(wfq.alpha, wfq.levelset).float()
    return (s_x * s_w).float().reshape(-1)


def float_bias(xfq: FakeQuantize, wfq: FakeQuantize) -> bool:
    """Whether onnxruntime keeps the layer's bias float: its input or weight codes are 32-bit integers, which the
    file dequantizes with ``Cast`` and ``Mul`` rather than ``DequantizeLinear`` (see the module docstring)."""
    return "int32" in (xfq.levelset.storage_dtype, wfq.levelset.storage_dtype)


def quantized_layer_biases(gm: torch.fx.GraphModule):
    """``(node, xfq, wfq, bias_node)`` for every layer with a calibrated input and weight quantizer and a bias read
    by ``get_attr``: the layers whose bias lives on the accumulator grid S_x·S_w (not those whose bias onnxruntime
    keeps float, :func:`float_bias`)."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LAYERS or len(node.args) < 2:
            continue
        xfq, wfq = input_quantizer(gm, node.args[0]), fake_quantizer(gm, node.args[1])
        bnode = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if xfq is None or wfq is None or not xfq.calibrated or not wfq.calibrated:
            continue
        if isinstance(bnode, torch.fx.Node) and bnode.op == "get_attr" and not float_bias(xfq, wfq):
            yield node, xfq, wfq, bnode


def _on_grid(b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(b.float() / scale) * scale


class QuantizeBias(Pass):
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        # it did nothing and said nothing; the export then asked for QuantizeBias after Calibrate
        require_calibrated(gm, "QuantizeBias")
        changed = False
        for node, xfq, wfq, bnode in list(quantized_layer_biases(gm)):
            if private_bias(gm, node):  # a shared module: each call's bias on its own grid
                bnode = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                changed = True
            owner_name, _, attr = str(bnode.target).rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            b = getattr(owner, attr)
            scale = accumulator_scale(xfq, wfq)
            if scale.numel() not in (1, b.numel()):
                continue  # a grouped transposed conv: its weight scales repeat per group; onnxruntime leaves b too
            with torch.no_grad():
                rounded = _on_grid(b, scale)
                if not torch.equal(rounded, b.float()):
                    remember_float(gm, (owner, attr))
                    b.copy_(rounded.to(b.dtype))
                    changed = True
                    self.report.append(f"{node.meta.get('layer', node.name)}: bias on the S_x*S_w grid")
        if not changed and not self.report:  # a second run said nothing
            self.report.append("every quantized layer's bias is on its S_x*S_w grid already (or it has none): "
                               "nothing to do")
        return PassResult(gm, changed)


def off_grid_biases(gm: torch.fx.GraphModule) -> list[str]:
    """The layers whose bias :class:`QuantizeBias` would still move: onnxruntime rounds them at load time, so a
    file exported now would not compute the simulation (a hand-built pipeline that left QuantizeBias out)."""
    out = []
    for node, xfq, wfq, bnode in quantized_layer_biases(gm):
        owner_name, _, attr = str(bnode.target).rpartition(".")
        b = getattr(gm.get_submodule(owner_name) if owner_name else gm, attr)
        scale = accumulator_scale(xfq, wfq)
        with torch.no_grad():
            if scale.numel() in (1, b.numel()) and not torch.equal(_on_grid(b, scale), b.float()):
                out.append(str(node.meta.get("layer", node.name)))
    return out
