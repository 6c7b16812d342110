"""DecomposeWindowAttention: a call of torchvision's fx-wrapped ``shifted_window_attention`` becomes partition ->
Linear -> attention -> Linear -> reverse, the projections are quantized like any Linear, and the float function is
unchanged.

torchvision is not a test dependency: the call here is a stand-in with torchvision's name, module and signature,
written independently (a loop over windows, the shifted-window mask from region labels), so the pass's split
functions are checked against a second implementation of Swin's window attention, shifted and not, V1 and V2."""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import qcompile
from qcompile.frontend import trace
from qcompile.passes.base import Pipeline, verify
from qcompile.passes.window_attention import DecomposeWindowAttention
from qcompile.qmodules import FakeQuantize
from qcompile.summary import layer_lines


def _regions(size: int, window: int, shift: int) -> torch.Tensor:
    """Region label per row (or column) of the shifted map: the last window mixes rolled-in and rolled-out parts."""
    labels = torch.zeros(size, dtype=torch.long)
    if shift > 0:
        labels[size - window: size - shift] = 1
        labels[size - shift:] = 2
    return labels


def shifted_window_attention(input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads,
                             shift_size, attention_dropout=0.0, dropout=0.0, qkv_bias=None, proj_bias=None,
                             logit_scale=None, training=True):
    """Swin window attention, one window at a time (maps whose sides are multiples of the window)."""
    b, h, w, c = input.shape
    wh, ww = window_size
    sh, sw = (0 if wh >= h else shift_size[0]), (0 if ww >= w else shift_size[1])
    x = torch.roll(input, shifts=(-sh, -sw), dims=(1, 2)) if sh or sw else input
    label = _regions(h, wh, sh)[:, None] * 3 + _regions(w, ww, sw)[None, :]
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = torch.cat([qkv_bias[:c], torch.zeros_like(qkv_bias[c:2 * c]), qkv_bias[2 * c:]])
    out = torch.empty_like(x)
    d = c // num_heads
    for i in range(0, h, wh):
        for j in range(0, w, ww):
            tokens = x[:, i:i + wh, j:j + ww, :].reshape(b, wh * ww, c)
            q, k, v = F.linear(tokens, qkv_weight, qkv_bias).split(c, dim=-1)
            q, k, v = (t.reshape(b, wh * ww, num_heads, d).transpose(1, 2) for t in (q, k, v))
            if logit_scale is not None:
                attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
                attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
            else:
                attn = (q * d ** -0.5) @ k.transpose(-2, -1)
            attn = attn + relative_position_bias
            lab = label[i:i + wh, j:j + ww].reshape(-1)
            attn = attn + torch.where(lab[:, None] != lab[None, :], -100.0, 0.0)
            o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, wh * ww, c)
            out[:, i:i + wh, j:j + ww, :] = F.linear(o, proj_weight, proj_bias).reshape(b, wh, ww, c)
    return torch.roll(out, shifts=(sh, sw), dims=(1, 2)) if sh or sw else out


shifted_window_attention.__module__ = "torchvision.models.swin_transformer"  # what the pass recognises
torch.fx.wrap("shifted_window_attention")


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, v2: bool):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.window, self.shift, self.heads = [window, window], [shift, shift], heads
        self.bias_table = nn.Parameter(torch.randn(heads, window * window, window * window) * 0.1)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(heads, 1, 1))) if v2 else None

    def forward(self, x):
        return shifted_window_attention(x, self.qkv.weight, self.proj.weight, self.bias_table, self.window,
                                        self.heads, self.shift, attention_dropout=0.0, dropout=0.0,
                                        qkv_bias=self.qkv.bias, proj_bias=self.proj.bias,
                                        logit_scale=self.logit_scale, training=self.training)


class TinySwin(nn.Module):
    """Patch embedding, a plain and a shifted window block (pre-norm, MLP), mean pooling, a head."""

    def __init__(self, v2: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 16, 2, stride=2)
        self.norm1, self.norm2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.attn1 = WindowAttention(16, 2, 4, 0, v2)
        self.attn2 = WindowAttention(16, 2, 4, 2, v2)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)  # (N, 8, 8, 16)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x))
        x = x + self.mlp(x)
        return self.head(x.mean((1, 2)))


@pytest.mark.parametrize("v2", [False, True])
def test_the_split_computes_the_window_attention_it_replaces(v2):
    model = TinySwin(v2).eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    gm = trace(model, x[:1])
    assert sum(n.target is shifted_window_attention for n in gm.graph.nodes) == 2  # kept whole by the trace
    p = DecomposeWindowAttention()
    gm = Pipeline([p], check=True)(gm).gm
    verify(gm)
    assert p.report == ["decomposed 2 window attention(s): their qkv/proj projections are Linear layers"]
    assert not any(n.target is shifted_window_attention for n in gm.graph.nodes)
    linears = [n.meta["layer"] for n in gm.graph.nodes if n.target is F.linear]
    assert linears == ["attn1.qkv", "attn1.proj", "attn2.qkv", "attn2.proj"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("v2", [False, True])
def test_window_attention_projections_are_quantized_and_validate(v2, tmp_path):
    model = TinySwin(v2).eval()
    gen = torch.Generator().manual_seed(2)
    calib, val = torch.randn(16, 3, 16, 16, generator=gen), torch.randn(16, 3, 16, 16, generator=gen)
    result = qcompile.compile(model, calib[:1], scheme="apot", bits=4, calib=calib, validation_inputs=val,
                              output=str(tmp_path / "swin.onnx"))
    assert result.report.passed, result.report.summary()
    weights = {n for n, m in result.model.named_modules() if isinstance(m, FakeQuantize) and m.role == "weight"}
    for name in ("attn1.qkv", "attn1.proj", "attn2.qkv", "attn2.proj"):
        assert any(w.startswith(name) for w in weights), (name, sorted(weights))
    lines = "\n".join(layer_lines(result.model))
    assert "shifted_window_attention" not in lines and "attn2.qkv" in lines, lines
    # --exclude addresses the projections by their module names
    kept = qcompile.compile(model, calib[:1], scheme="apot", bits=4, calib=calib, validate=False,
                            exclude=("*.qkv",))
    kept_weights = {n for n, m in kept.model.named_modules() if isinstance(m, FakeQuantize) and m.role == "weight"}
    assert not any(".qkv" in w for w in kept_weights) and any("attn1.proj" in w for w in kept_weights)


def test_a_window_attention_with_another_signature_is_left_alone():
    """A torchvision whose function takes arguments the stand-in does not know keeps the call whole (float,
    listed by the layer table) rather than computing something else."""
    def shifted_window_attention(input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads,
                                 shift_size, attention_dropout=0.0, dropout=0.0, qkv_bias=None, proj_bias=None,
                                 logit_scale=None, training=True, new_option=None):
        return input

    shifted_window_attention.__module__ = "torchvision.models.swin_transformer"
    graph = torch.fx.Graph()
    x, w1, w2, b = (graph.placeholder(n) for n in ("x", "w1", "w2", "b"))
    out = graph.call_function(shifted_window_attention, (x, w1, w2, b, [4, 4], 2, [0, 0]))
    graph.output(out)
    gm = torch.fx.GraphModule(nn.Module(), graph)
    assert DecomposeWindowAttention()(gm).modified is False
