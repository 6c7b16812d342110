"""The bundled default model: a small residual CNN trained on scikit-learn's ``load_digits``.

``load_digits`` holds 1,797 real 8×8 handwritten digits (UCI optdigits test set) and ships inside
scikit-learn, so nothing is downloaded. Split: a stratified split with ``random_state=0`` keeps **500 test
images**; the other 1,297 train the model (``examples/train_digits.py``). Pixels are scaled from 0..16 to 0..1.

``digits_cnn`` is the factory (fresh weights); ``pretrained()`` loads the bundled weights ``digits_cnn.pt``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS = os.path.join(os.path.dirname(__file__), "digits_cnn.pt")
SPEC = "qcompile.models.digits:digits_cnn"
INPUT_SHAPE = (1, 1, 8, 8)


class DigitsCNN(nn.Module):
    """conv-bn-relu ×2, a residual block with a 1×1 downsample shortcut, then two Linear layers."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 48, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(48)
        self.down = nn.Conv2d(32, 48, 1, bias=False)
        self.bn_down = nn.BatchNorm2d(48)
        self.fc1 = nn.Linear(48 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = F.relu(self.bn3(self.conv3(x)) + self.bn_down(self.down(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def digits_cnn() -> DigitsCNN:
    return DigitsCNN()


def pretrained() -> DigitsCNN:
    model = DigitsCNN()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


def load_split(test_size: int = 500, seed: int = 0):
    """Return ``(x_train, y_train, x_test, y_test)`` as float32 tensors (N,1,8,8) in [0,1] and int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te))


def calibration_inputs(n: int = 32) -> torch.Tensor:
    """The first ``n`` training images: the default calibration set of the demo and the benchmarks."""
    x_tr, _, _, _ = load_split()
    return x_tr[:n].clone()


def accuracy(logits: np.ndarray | torch.Tensor, labels: torch.Tensor) -> float:
    # a model's output straight from model(x), outside torch.no_grad(), too
    logits = logits.detach() if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits))
    return float((logits.argmax(dim=1) == labels).float().mean())
