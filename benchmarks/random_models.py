"""Random small models for ``bench_random_models.py``: five families, each a seeded draw of common building blocks.

- ``cnn``: stems, conv blocks (depthwise, dilated, 1x1/3x3/5x5, with or without BatchNorm, twelve activations),
  residual adds, concatenations, squeeze-excite gates, pools, upsampling, channel shuffles, LayerNorm over
  channels, scalar arithmetic, chunk/concat; heads by mean, global pool or flatten, optional (log-)softmax.
- ``sequence``: Linear or Embedding inputs, MLP / attention (hand-written, ``nn.MultiheadAttention``,
  ``scaled_dot_product_attention``) / Conv1d / GRU / LSTM / GLU blocks with LayerNorm or RMSNorm, pooled heads.
- ``dense``: encoder-decoders (transposed convs, nearest/bilinear resizes to a skip's size, pixel shuffle),
  two-input / dict-output models, Conv3d video and Conv1d audio models.
- ``soup``: convs separated by less common ops (GroupNorm, InstanceNorm, CBAM, normalize, einsum, bmm attention,
  cumsum, softmax over channels, reflect pads, roll, flip, PReLU, erf, padding modes, adaptive pools, ...).
- ``detection``: FPNs whose laterals are resized to each other's size, multi-scale heads flattened and
  concatenated, YOLO-style decoding and split outputs, on even and odd input sizes.

``make(family, seed)`` returns ``(model in eval mode with BatchNorm statistics from its own inputs, inputs)``:
``inputs`` is a tuple with one tensor (N = 48) per model input.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

FAMILIES = ("cnn", "sequence", "dense", "soup", "detection")

_ACTS = ["relu", "relu6", "gelu", "silu", "hardswish", "leaky", "sigmoid", "tanh", "none", "elu", "mish", "hardsigmoid"]


def _act(name):
    return {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "gelu": nn.GELU(), "silu": nn.SiLU(), "hardswish": nn.Hardswish(),
            "leaky": nn.LeakyReLU(0.1), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "none": nn.Identity(),
            "elu": nn.ELU(), "mish": nn.Mish(), "hardsigmoid": nn.Hardsigmoid()}[name]


# -- cnn --------------------------------------------------------------------------------------------------------
class _ConvBlock(nn.Module):
    def __init__(self, rng, cin, cout, stride=1):
        super().__init__()
        k = rng.choice([1, 3, 3, 5])
        d = rng.choice([1, 1, 2]) if k > 1 else 1
        groups = cin if (cin == cout and rng.random() < 0.3) else 1
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=d * (k // 2), dilation=d, groups=groups,
                              bias=rng.random() < 0.5)
        self.bn = nn.BatchNorm2d(cout) if rng.random() < 0.7 else nn.Identity()
        self.act = _act(rng.choice(_ACTS))

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class _CnnBlock(nn.Module):
    KINDS = ["conv", "res", "cat", "se", "pool", "up", "shuffle", "ln", "scale", "mulgate", "avgpool_pad", "chunk"]

    def __init__(self, rng, c):
        super().__init__()
        self.kind = rng.choice(self.KINDS)
        self.c_out = c
        k = self.kind
        if k == "conv":
            co = rng.choice([c, c * 2, max(4, c // 2)])
            self.a = _ConvBlock(rng, c, co, rng.choice([1, 1, 2]))
            self.c_out = co
        elif k == "res":
            self.a, self.b = _ConvBlock(rng, c, c), _ConvBlock(rng, c, c)
            self.post = _act(rng.choice(["relu", "none", "silu"]))
        elif k == "cat":
            self.a, self.b = _ConvBlock(rng, c, c // 2 + 1), _ConvBlock(rng, c, c // 2 + 1)
            self.c_out = 2 * (c // 2 + 1)
        elif k == "se":
            self.fc1, self.fc2 = nn.Conv2d(c, max(2, c // 4), 1), nn.Conv2d(max(2, c // 4), c, 1)
            self.gate = rng.choice(["sigmoid", "hardsigmoid"])
        elif k == "pool":
            self.mode = rng.choice(["max3", "avg3", "avg2", "max2", "avg3nopad"])
        elif k == "up":
            self.mode = rng.choice(["nearest", "bilinear"])
            self.a = _ConvBlock(rng, c, c, 2)
        elif k == "shuffle":
            self.g = 2 if c % 2 == 0 else 1
        elif k == "ln":
            self.ln = nn.LayerNorm(c)
        elif k == "scale":
            self.op, self.v = rng.choice(["mul", "add", "div", "neg_relu"]), rng.uniform(0.3, 2.0)
        elif k == "mulgate":
            self.a = _ConvBlock(rng, c, c)
        elif k == "avgpool_pad":
            self.pad = rng.choice(["constant", "reflect"])
        elif k == "chunk":
            self.a = _ConvBlock(rng, c // 2, c // 2) if c % 2 == 0 else None

    def forward(self, x):
        k = self.kind
        if k == "conv":
            return self.a(x)
        if k == "res":
            return self.post(x + self.b(self.a(x)))
        if k == "cat":
            return torch.cat([self.a(x), self.b(x)], 1)
        if k == "se":
            g = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
            return x * (torch.sigmoid(g) if self.gate == "sigmoid" else F.hardsigmoid(g))
        if k == "pool":
            if x.shape[-1] < 4:
                return x
            return {"max3": lambda: F.max_pool2d(x, 3, 1, 1), "avg3": lambda: F.avg_pool2d(x, 3, 1, 1),
                    "avg2": lambda: F.avg_pool2d(x, 2), "max2": lambda: F.max_pool2d(x, 2),
                    "avg3nopad": lambda: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)}[self.mode]()
        if k == "up":
            return self.a(F.interpolate(x, scale_factor=2, mode=self.mode))
        if k == "shuffle":
            n, c, h, w = x.shape
            return x.reshape(n, self.g, c // self.g, h, w).transpose(1, 2).reshape(n, c, h, w)
        if k == "ln":
            return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if k == "scale":
            return {"mul": lambda: x * self.v, "add": lambda: x + self.v, "div": lambda: x / 2,
                    "neg_relu": lambda: -F.relu(-x)}[self.op]()
        if k == "mulgate":
            return x * torch.tanh(self.a(x))
        if k == "avgpool_pad":
            return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode=self.pad), 3, 1)
        if self.a is None:
            return x
        a, b = x.chunk(2, 1)
        return torch.cat([b, self.a(a)], 1)


class RandomCNN(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        torch.manual_seed(seed)
        c = rng.choice([8, 12, 16])
        self.stem = _ConvBlock(rng, 3, c)
        blocks = []
        for _ in range(rng.randint(2, 6)):
            blocks.append(_CnnBlock(rng, c))
            c = blocks[-1].c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = rng.choice(["mean", "gap", "flatten"])
        self.fc = nn.Linear(c if self.head != "flatten" else c * 4, 10)
        self.out = rng.choice(["none", "none", "softmax", "logsoftmax"])

    def forward(self, x):
        x = self.blocks(self.stem(x))
        if self.head == "mean":
            x = x.mean((2, 3))
        else:
            x = F.adaptive_avg_pool2d(x, 1 if self.head == "gap" else 2).flatten(1)
        y = self.fc(x)
        return y if self.out == "none" else F.softmax(y, -1) if self.out == "softmax" else F.log_softmax(y, -1)


# -- sequence ---------------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h, self.qkv, self.o = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.h)
        return self.o((a.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d))


class _SeqBlock(nn.Module):
    def __init__(self, rng, d):
        super().__init__()
        self.kind = rng.choice(["mlp", "attn", "mha", "conv1d", "gru", "lstm", "glu", "sdpa"])
        norm = rng.choice(["ln", "none", "rms"])
        self.norm = nn.LayerNorm(d) if norm == "ln" else nn.RMSNorm(d) if norm == "rms" else nn.Identity()
        k = self.kind
        if k == "mlp":
            self.f1, self.f2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
            self.act = rng.choice([nn.GELU(), nn.ReLU(), nn.SiLU(), nn.GELU("tanh")])
        elif k == "attn":
            self.a = _Attention(d, rng.choice([1, 2, 4]))
        elif k == "mha":
            self.a = nn.MultiheadAttention(d, rng.choice([1, 2, 4]), batch_first=True)
        elif k == "conv1d":
            self.c = nn.Conv1d(d, d, rng.choice([1, 3, 5]), padding="same", groups=rng.choice([1, d]))
        elif k in ("gru", "lstm"):
            self.r = (nn.GRU if k == "gru" else nn.LSTM)(d, d, batch_first=True)
        elif k == "glu":
            self.f1, self.f2 = nn.Linear(d, 2 * d), nn.Linear(d, d)
        else:
            self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        h, k = self.norm(x), self.kind
        if k == "mlp":
            h = self.f2(self.act(self.f1(h)))
        elif k == "attn":
            h = self.a(h)
        elif k == "mha":
            h = self.a(h, h, h, need_weights=False)[0]
        elif k == "conv1d":
            h = self.c(h.transpose(1, 2)).transpose(1, 2)
        elif k in ("gru", "lstm"):
            h = self.r(h)[0]
        elif k == "glu":
            h = self.f2(F.glu(self.f1(h), -1))
        else:
            q, kk, v = self.qkv(h).chunk(3, -1)
            h = F.scaled_dot_product_attention(q.unsqueeze(1), kk.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + h


class RandomSequence(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        torch.manual_seed(seed)
        self.tokens = rng.random() < 0.4
        d = rng.choice([8, 16, 32])
        self.inp = nn.Embedding(50, d) if self.tokens else nn.Linear(6, d)
        self.blocks = nn.Sequential(*[_SeqBlock(rng, d) for _ in range(rng.randint(1, 4))])
        self.pool = rng.choice(["mean", "last", "first", "max"])
        self.head = nn.Linear(d, 5)
        self.length = rng.choice([4, 7, 12])

    def forward(self, x):
        h = self.blocks(self.inp(x))
        h = {"mean": lambda: h.mean(1), "last": lambda: h[:, -1], "first": lambda: h[:, 0],
             "max": lambda: h.amax(1)}[self.pool]()
        return self.head(h)


# -- dense prediction, several inputs, 3-D and 1-D -------------------------------------------------------------
class _UNet(nn.Module):
    def __init__(self, rng):
        super().__init__()
        c = rng.choice([4, 8])
        self.up_mode = rng.choice(["convT", "nearest", "bilinear", "pixelshuffle"])
        self.e1, self.e2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(2 * c)
        if self.up_mode == "convT":  # padding 1 gives 14 pixels for a skip of 16: resized to its size
            self.u = nn.ConvTranspose2d(2 * c, c, rng.choice([2, 4]), stride=2, padding=rng.choice([0, 1]))
        elif self.up_mode == "pixelshuffle":
            self.u = nn.Sequential(nn.Conv2d(2 * c, 4 * c, 1), nn.PixelShuffle(2))
        else:
            self.u = nn.Conv2d(2 * c, c, 1)
        self.skip = rng.choice(["cat", "add"])
        self.d = nn.Conv2d(2 * c if self.skip == "cat" else c, c, 3, padding=1)
        self.out = nn.Conv2d(c, rng.choice([1, 3]), 1)
        self.final = rng.choice(["none", "sigmoid", "tanh"])

    def forward(self, x):
        a = F.relu(self.e1(x))
        b = F.relu(self.bn(self.e2(a)))
        u = self.u(b) if self.up_mode in ("convT", "pixelshuffle") else \
            self.u(F.interpolate(b, scale_factor=2, mode=self.up_mode))
        if u.shape[-1] != a.shape[-1]:
            u = F.interpolate(u, size=a.shape[-2:])
        y = self.out(F.relu(self.d(torch.cat([u, a], 1) if self.skip == "cat" else u + a)))
        return torch.sigmoid(y) if self.final == "sigmoid" else torch.tanh(y) if self.final == "tanh" else y


class _TwoInputs(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Conv1d(2, 8, 3, padding=1)
        self.h, self.h2 = nn.Linear(24, 4), nn.Linear(24, 2)
        self.multi = rng.choice(["tuple", "dict", "one"])

    def forward(self, x, y):
        f = torch.cat([F.gelu(self.a(x)), F.relu(self.b(y)).mean(-1)], 1)
        if self.multi == "tuple":
            return self.h(f), self.h2(f).softmax(-1)
        return {"cls": self.h(f), "reg": self.h2(f)} if self.multi == "dict" else self.h(f)


class _Video(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.c, self.bn, self.c2 = nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.Conv3d(8, 8, 1)
        self.fc, self.pool = nn.Linear(8, 5), rng.choice(["avg", "max", "mean"])

    def forward(self, x):
        h = F.relu(self.bn(self.c(x)))
        h = F.avg_pool3d(h, 2) if self.pool == "avg" else F.max_pool3d(h, 2) if self.pool == "max" else h
        return self.fc(F.relu(self.c2(h)).mean((2, 3, 4)))


class _Audio(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(1, 8, 9, stride=2, padding=4), nn.Conv1d(8, 16, 5, dilation=2, padding=4)
        self.bn, self.r, self.fc = nn.BatchNorm1d(16), nn.GRU(16, 16, batch_first=True), nn.Linear(16, 4)
        self.gru, self.pool = rng.random() < 0.5, rng.choice(["avg", "max", "adaptive"])

    def forward(self, x):
        h = F.relu(self.bn(self.c2(F.relu(self.c1(x)))))
        h = F.avg_pool1d(h, 2) if self.pool == "avg" else F.max_pool1d(h, 2) if self.pool == "max" else \
            F.adaptive_avg_pool1d(h, 8)
        return self.fc(self.r(h.transpose(1, 2))[0][:, -1] if self.gru else h.mean(-1))


# -- op soup ----------------------------------------------------------------------------------------------------
_SOUP = ["groupnorm", "instnorm", "cbam", "normalize", "clamp", "abs", "pow2", "sqrt_abs", "exp_neg", "log1p_relu",
         "where", "split_cat", "stack_mean", "einsum_mix", "bmm_attn", "cumsum", "max_reduce", "std_gate",
         "softmax_c", "pad_reflect", "roll", "flip", "hardtanh", "prelu", "celu", "softsign", "logsigmoid", "erf",
         "minimum", "channel_mean_sub", "pixel_unshuffle", "avgpool_ceil", "transpose_hw", "sigmoid_mul",
         "frac_pool", "conv_padmode"]


class _SoupOp(nn.Module):
    def __init__(self, rng, c):
        super().__init__()
        self.k = k = rng.choice(_SOUP)
        if k == "groupnorm":
            self.m = nn.GroupNorm(rng.choice([1, 2]), c)
        elif k == "instnorm":
            self.m = nn.InstanceNorm2d(c, affine=rng.random() < 0.5)
        elif k == "cbam":
            self.fc = nn.Sequential(nn.Conv2d(c, max(2, c // 4), 1), nn.ReLU(), nn.Conv2d(max(2, c // 4), c, 1))
            self.sp = nn.Conv2d(2, 1, 7, padding=3)
        elif k == "einsum_mix":
            self.w = nn.Parameter(torch.randn(c, c) / c ** 0.5)
        elif k == "bmm_attn":
            self.q, self.kk = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        elif k == "prelu":
            self.m = nn.PReLU(c)
        elif k == "pixel_unshuffle":
            self.m = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * c, c, 1), nn.Upsample(scale_factor=2))
        elif k == "conv_padmode":
            self.m = nn.Conv2d(c, c, 3, padding=1, padding_mode=rng.choice(["reflect", "replicate", "circular"]))
        elif k == "frac_pool":
            self.m = nn.AdaptiveAvgPool2d(rng.choice([3, 5, 7]))

    def forward(self, x):
        k = self.k
        if k in ("groupnorm", "instnorm", "prelu", "pixel_unshuffle", "conv_padmode"):
            return self.m(x)
        if k == "cbam":
            x = x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)) + self.fc(x.amax((2, 3), keepdim=True)))
            return x * torch.sigmoid(self.sp(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))
        if k == "einsum_mix":
            return torch.einsum("nchw,dc->ndhw", x, self.w)
        if k == "bmm_attn":
            n, c, h, w = x.shape
            a = torch.bmm(self.q(x).flatten(2).transpose(1, 2), self.kk(x).flatten(2)).softmax(-1)
            return torch.bmm(x.flatten(2), a.transpose(1, 2)).reshape(n, c, h, w)
        if k == "split_cat":
            a, b = torch.split(x, [1, x.shape[1] - 1], 1)
            return torch.cat([b, a * 2], 1)
        if k == "avgpool_ceil":
            return F.interpolate(F.avg_pool2d(x, 3, 2, ceil_mode=True), size=x.shape[-2:])
        if k == "frac_pool":
            return F.interpolate(self.m(x), size=x.shape[-2:])
        return {"normalize": lambda: F.normalize(x, dim=1), "clamp": lambda: x.clamp(-1.5, 2.0),
                "abs": lambda: x.abs(), "pow2": lambda: x * x, "sqrt_abs": lambda: torch.sqrt(x.abs() + 1e-3),
                "exp_neg": lambda: torch.exp(-x.abs()), "log1p_relu": lambda: torch.log1p(F.relu(x)),
                "where": lambda: torch.where(x > 0.1, x, 0.5 * x),
                "stack_mean": lambda: torch.stack([x, F.relu(x), -x], 0).mean(0),
                "cumsum": lambda: x.cumsum(-1) / x.shape[-1], "max_reduce": lambda: x - x.amax(1, keepdim=True),
                "std_gate": lambda: x / (x.std((2, 3), keepdim=True) + 1e-3), "softmax_c": lambda: x.softmax(1),
                "pad_reflect": lambda: F.pad(x, (1, 1, 1, 1), mode="reflect")[:, :, 1:-1, 1:-1] + x,
                "roll": lambda: torch.roll(x, 1, -1), "flip": lambda: x.flip(-1), "hardtanh": lambda: F.hardtanh(x),
                "celu": lambda: F.celu(x), "softsign": lambda: F.softsign(x), "logsigmoid": lambda: F.logsigmoid(x),
                "erf": lambda: torch.erf(x), "minimum": lambda: torch.minimum(x, torch.zeros_like(x) + 0.5),
                "channel_mean_sub": lambda: x - x.mean(1, keepdim=True), "transpose_hw": lambda: x.transpose(2, 3),
                "sigmoid_mul": lambda: x * torch.sigmoid(x)}[k]()


class RandomSoup(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        torch.manual_seed(seed)
        c = rng.choice([4, 8])
        layers = [nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)]
        for _ in range(rng.randint(2, 5)):
            layers += [_SoupOp(rng, c), nn.Conv2d(c, c, rng.choice([1, 3]), padding="same")]
        self.body, self.fc = nn.Sequential(*layers), nn.Linear(c, 6)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


# -- detection --------------------------------------------------------------------------------------------------
class RandomDetector(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        rng = random.Random(seed)
        torch.manual_seed(seed)
        c = rng.choice([8, 16])
        self.na, self.nc = rng.choice([1, 3]), rng.choice([2, 4])

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.SiLU())

        self.s1, self.s2, self.s3 = stage(3, c), stage(c, 2 * c), stage(2 * c, 4 * c)
        self.l1, self.l2, self.l3 = nn.Conv2d(c, c, 1), nn.Conv2d(2 * c, c, 1), nn.Conv2d(4 * c, c, 1)
        self.merge, self.resize = rng.choice(["add", "cat"]), rng.choice(["size", "scale", "convT"])
        cin = c if self.merge == "add" else 2 * c
        self.m2, self.m1 = nn.Conv2d(cin, c, 3, padding=1), nn.Conv2d(cin, c, 3, padding=1)
        self.t3, self.t2 = nn.ConvTranspose2d(c, c, 2, 2), nn.ConvTranspose2d(c, c, 2, 2)
        self.heads = nn.ModuleList([nn.Conv2d(c, self.na * (5 + self.nc), 1) for _ in range(3)])
        self.decode = rng.choice(["raw", "sigmoid", "yolo", "split"])
        self.size = 32 + 6 * rng.choice([0, 1])  # an odd pyramid: sizes that do not halve evenly

    def _up(self, x, ref, t):
        if self.resize == "size":
            return F.interpolate(x, size=ref.shape[-2:], mode="nearest")
        if self.resize == "scale":
            return F.interpolate(x, scale_factor=2, mode="nearest")[..., :ref.shape[-2], :ref.shape[-1]]
        y = t(x)
        return F.pad(y, (0, ref.shape[-1] - y.shape[-1], 0, ref.shape[-2] - y.shape[-2]))

    def _fuse(self, a, b, m):
        return m(a + b if self.merge == "add" else torch.cat([a, b], 1))

    def forward(self, x):
        c1 = self.s1(x)
        c2 = self.s2(c1)
        c3 = self.s3(c2)
        p3 = self.l3(c3)
        p2 = self._fuse(self.l2(c2), self._up(p3, c2, self.t3), self.m2)
        p1 = self._fuse(self.l1(c1), self._up(p2, c1, self.t2), self.m1)
        outs = []
        for p, head in zip((p1, p2, p3), self.heads):
            y = head(p)
            n, _, h, w = y.shape
            outs.append(y.reshape(n, self.na, 5 + self.nc, h, w).permute(0, 1, 3, 4, 2).reshape(n, -1, 5 + self.nc))
        y = torch.cat(outs, 1)
        if self.decode == "sigmoid":
            return y.sigmoid()
        if self.decode == "yolo":
            return torch.cat([y[..., :2].sigmoid() * 2 - 0.5, (y[..., 2:4].sigmoid() * 2) ** 2, y[..., 4:].sigmoid()],
                             -1)
        return (y[..., :4], y[..., 4:].softmax(-1)) if self.decode == "split" else y


# -- one draw ---------------------------------------------------------------------------------------------------
def _draw(family: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = 48
    if family == "cnn":
        return RandomCNN(seed), (torch.randn(n, 3, 16, 16, generator=g),)
    if family == "sequence":
        model = RandomSequence(seed)
        t = model.length
        x = torch.randint(0, 50, (n, t), generator=g) if model.tokens else torch.randn(n, t, 6, generator=g)
        return model, (x,)
    if family == "soup":
        return RandomSoup(seed), (torch.randn(n, 3, 12, 12, generator=g),)
    if family == "detection":
        model = RandomDetector(seed)
        return model, (torch.randn(n, 3, model.size, model.size, generator=g),)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kind = rng.choice(["unet", "two_inputs", "video", "audio"])
    if kind == "unet":
        return _UNet(rng), (torch.randn(n, 3, 16, 16, generator=g),)
    if kind == "two_inputs":
        return _TwoInputs(rng), (torch.randn(n, 6, generator=g), torch.randn(n, 2, 12, generator=g))
    if kind == "video":
        return _Video(rng), (torch.randn(n, 3, 4, 8, 8, generator=g),)
    return _Audio(rng), (torch.randn(n, 1, 64, generator=g),)


def make(family: str, seed: int):
    """``(model, inputs)``: the model in eval mode, its BatchNorm statistics from three scaled batches of its own
    inputs (random weights with non-trivial statistics); ``inputs`` one tensor per model input."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    model, inputs = _draw(family, seed)
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(*[t[i * 8:(i + 1) * 8] * (1 + 0.3 * i) if t.is_floating_point() else t[i * 8:(i + 1) * 8]
                    for t in inputs])
    return model.eval(), inputs
