"""Small seeded models shared by the tests and benchmarks.

Every factory takes a ``seed``, builds its weights with a private ``torch.Generator`` (the global RNG is not
touched), and returns the model in eval mode. BatchNorm layers get non-trivial statistics so that folding them is
a real test. Each model has an ``INPUT_SHAPE`` class attribute; :func:`example_input` makes a seeded input.

- :class:`ResidualCNN`: conv-bn-relu stem and a basic residual block with a 1×1 stride-2 downsample + BN shortcut.
- :class:`MobileNetLike`: inverted residual blocks (1×1 expand → depthwise 3×3 → 1×1 project, BN after each),
  one with an identity residual; ``act="relu"`` or ``"relu6"``.
- :class:`MLP`: Linear → BatchNorm1d → ReLU → Linear → LeakyReLU → Linear.
- :class:`UnfoldableBN`: BatchNorms that must not be folded: one on the input, one whose conv output also feeds an
  add, one after a conv module that is called twice.
- :class:`DepthwiseSeparableNet`: stem → dw 3×3 → pw 1×1 → dw 3×3 → pw 1×1 → pool → Linear, rescaled channel by
  channel between layers (outputs unchanged) so that per-channel weight ranges differ by more than 100×.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ResidualCNN", "MobileNetLike", "InvertedResidual", "MLP", "UnfoldableBN", "DepthwiseSeparableNet",
           "example_input", "randomize_batchnorm", "channel_range_spread"]


def _init_(model: nn.Module, seed: int) -> None:
    """Re-initialise conv/linear weights and biases from ``seed`` (Kaiming-uniform-like scale)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                fan_in = mod.weight[0].numel()
                bound = (3.0 / fan_in) ** 0.5
                mod.weight.copy_((torch.rand(mod.weight.shape, generator=gen) * 2 - 1) * bound)
                if mod.bias is not None:
                    mod.bias.copy_((torch.rand(mod.bias.shape, generator=gen) * 2 - 1) * bound)


def randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm seeded non-trivial statistics and affine parameters (some gammas negative)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                mod.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                if mod.affine:
                    sign = torch.where(torch.rand(c, generator=gen) < 0.15, -1.0, 1.0)
                    mod.weight.copy_(sign * (torch.rand(c, generator=gen) + 0.5))
                    mod.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model.eval()


def example_input(model_or_shape, seed: int = 0, batch: int | None = None) -> torch.Tensor:
    """A seeded standard-normal input of the model's ``INPUT_SHAPE`` (batch dimension replaced if given)."""
    shape = tuple(getattr(model_or_shape, "INPUT_SHAPE", model_or_shape))
    if batch is not None:
        shape = (batch,) + shape[1:]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def channel_range_spread(weight: torch.Tensor) -> float:
    """max/min over output channels of max |w|: the per-tensor quantization failure measure of the lecture."""
    r = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
    return float(r.max() / r.min())


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResidualCNN(nn.Module):
    """conv1-bn-relu → BasicBlock(8→16, stride 2, 1×1 downsample) → avgpool → fc."""

    INPUT_SHAPE = (2, 3, 16, 16)

    def __init__(self, seed: int = 0, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(8, 16, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)
        _init_(self, seed)
        randomize_batchnorm(self, seed + 1)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand-BN-act → depthwise 3×3-BN-act → 1×1 project-BN (+ identity if it fits)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, act: str):
        super().__init__()
        hidden = cin * expand
        act_cls = {"relu": nn.ReLU, "relu6": nn.ReLU6}[act]
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act1 = act_cls()
        self.dw = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act2 = act_cls()
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.act1(self.bn1(self.expand(x)))
        out = self.act2(self.bn2(self.dw(out)))
        out = self.bn3(self.project(out))
        return x + out if self.use_residual else out


class MobileNetLike(nn.Module):
    """stem conv-BN-act → IR(8→8, residual) → IR(8→16, stride 2) → 1×1 head-BN-act → pool → classifier."""

    INPUT_SHAPE = (2, 3, 16, 16)

    def __init__(self, seed: int = 0, act: str = "relu", num_classes: int = 10):
        super().__init__()
        act_cls = {"relu": nn.ReLU, "relu6": nn.ReLU6}[act]
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = act_cls()
        self.block1 = InvertedResidual(8, 8, stride=1, expand=4, act=act)
        self.block2 = InvertedResidual(8, 16, stride=2, expand=4, act=act)
        self.head = nn.Conv2d(16, 32, 1, bias=False)
        self.bn_head = nn.BatchNorm2d(32)
        self.act_head = act_cls()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, num_classes)
        _init_(self, seed)
        randomize_batchnorm(self, seed + 1)

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        x = self.act_head(self.bn_head(self.head(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


class MLP(nn.Module):
    """fc1 → BatchNorm1d → ReLU → fc2 → LeakyReLU(0.1) → fc3."""

    INPUT_SHAPE = (8, 16)

    def __init__(self, seed: int = 0, with_bn: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn1 = nn.BatchNorm1d(32) if with_bn else nn.Identity()
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 10)
        _init_(self, seed)
        randomize_batchnorm(self, seed + 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.leaky_relu(self.fc2(x), 0.1)
        return self.fc3(x)


class UnfoldableBN(nn.Module):
    """BatchNorms that must be left alone, plus one that may be folded (``bn_ok`` after ``conv_ok``).

    - ``bn_in`` normalises the graph input (no layer before it);
    - ``bn1`` follows ``conv1``, whose output also feeds the add;
    - ``bn2`` follows ``shared``, a conv module called twice.
    """

    INPUT_SHAPE = (2, 3, 8, 8)

    def __init__(self, seed: int = 0):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv_ok = nn.Conv2d(8, 8, 1)
        self.bn_ok = nn.BatchNorm2d(8)
        _init_(self, seed)
        randomize_batchnorm(self, seed + 1)

    def forward(self, x):
        x = self.bn_in(x)
        y = self.conv1(x)
        z = F.relu(self.bn1(y) + y)
        w = F.relu(self.bn2(self.shared(z)))
        w = self.shared(w)
        return self.bn_ok(self.conv_ok(w))


class DepthwiseSeparableNet(nn.Module):
    """stem 3×3 → dw 3×3 → pw 1×1 → dw 3×3 (stride 2) → pw 1×1 → pool → fc, ReLU between, biases everywhere.

    After seeded initialisation, every consecutive pair (i, i+1) is rescaled with random per-channel factors
    ``t_j = 10**u_j``, ``u_j`` uniform in ``[-log10(spread)/2, log10(spread)/2]`` with both ends taken:
    output channel j of layer i is multiplied by ``t_j`` and input channel j of layer i+1 divided by it. ReLU and
    pooling commute with positive scales, so the function is unchanged, but per-channel weight ranges now differ by
    more than ``spread``× — the situation in which per-tensor weight quantization fails (the lecture) and which
    cross-layer equalization undoes.
    """

    INPUT_SHAPE = (4, 3, 16, 16)

    def __init__(self, seed: int = 0, spread: float = 300.0, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw1 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw1 = nn.Conv2d(16, 32, 1)
        self.dw2 = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32)
        self.pw2 = nn.Conv2d(32, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)
        _init_(self, seed)
        if spread > 1:
            self._unbalance(spread, seed + 1)
        self.eval()

    def layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, getattr(self, n)) for n in ("stem", "dw1", "pw1", "dw2", "pw2", "fc")]

    def _unbalance(self, spread: float, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        half = torch.log10(torch.tensor(float(spread))) / 2
        mods = [m for _, m in self.layers()]
        with torch.no_grad():
            for prod, cons in zip(mods[:-1], mods[1:]):
                c = prod.weight.shape[0]
                u = (torch.rand(c, generator=gen) * 2 - 1) * half
                u[torch.randperm(c, generator=gen)[:2]] = torch.stack([-half, half])
                t = 10 ** u
                prod.weight.mul_(t.reshape(-1, *([1] * (prod.weight.dim() - 1))))
                prod.bias.mul_(t)
                if isinstance(cons, nn.Linear):
                    cons.weight.div_(t.reshape(1, -1))
                elif cons.groups == 1:
                    cons.weight.div_(t.reshape(1, -1, 1, 1))
                else:  # depthwise: input channel j is filter j
                    cons.weight.div_(t.reshape(-1, 1, 1, 1))

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.dw1(x))
        x = F.relu(self.pw1(x))
        x = F.relu(self.dw2(x))
        x = F.relu(self.pw2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class TokenMean(nn.Module):
    """Token ids (int64, ``(N, L)``) -> embedding -> mean over the sequence -> Linear: a model whose input is not
    a float tensor."""

    def __init__(self, vocab: int = 20, dim: int = 8, classes: int = 3):
        super().__init__()
        self.e = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.fc(self.e(ids).mean(1))


class Normalized(nn.Module):
    """An MLP whose input normalisation lives in non-persistent buffers (not in its state_dict)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(16), persistent=False)
        self.register_buffer("std", torch.ones(16), persistent=False)
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1((x - self.mean) / self.std)))


def ulps_off(model_bytes: bytes, prefixes: tuple[str, ...], ulps: int = 1, seed: int = 0) -> bytes:
    """The ONNX file ``model_bytes`` with each float initializer whose name starts with one of ``prefixes`` moved
    ``ulps`` float32 steps up or down (random signs): the rounding difference another machine's kernels (another
    summation order) give, made on purpose. Whether onnxruntime and PyTorch round alike depends on the CPU (a Xeon
    with AVX-512 matched some small Linear models exactly, an EPYC with AVX2 did not)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.ModelProto.FromString(model_bytes)
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name.startswith(prefixes):
            values = numpy_helper.to_array(init)
            for _ in range(ulps):
                values = np.nextafter(values, np.where(rng.random(values.shape) < 0.5, -np.inf, np.inf)
                                      .astype(np.float32))
            init.CopyFrom(numpy_helper.from_array(values.astype(np.float32), init.name))
    return model.SerializeToString()
