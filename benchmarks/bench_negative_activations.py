"""Benchmark: APoT/PoT on activations that can be negative (SiLU, Hardswish, GELU), symmetric vs asymmetric levels.

The bundled digits CNN has ReLU activations only, so every APoT activation there is unsigned. Modern networks feed
their layers SiLU/Hardswish/GELU outputs (mostly positive, down to -0.28 / -0.375 / -0.17): a signed APoT set is
symmetric and spends half its levels on a side that holds almost nothing, where uniform levels have a zero point.
``quant.level_set(scheme, bits, offset=o)`` (the unsigned set shifted down by one of its grid integers) is the APoT
answer; calibration picks it per activation where it quantizes with less error.

Two models trained here, seeded, on the digits split of ``qcompile.models.digits`` (scikit-learn's real handwritten
digits; nothing downloaded): a MobileNetV3-like CNN (Hardswish, SiLU, squeeze-excite, a channel-multiplier depthwise
conv, BatchNorm) and a ViT-like transformer (rows of the image as 8 tokens, 2 pre-norm encoder layers with GELU).
Each is compiled with APoT, PoT and uniform at 4 and 3 bits (default options: first/last layer 8-bit uniform; 32
calibration images), APoT/PoT once with the default (asymmetric levels allowed) and once with
``asym_levels=False`` (``--symmetric-levels``: the symmetric set, what qcompile did before) and once with
``int8_levels=False`` (``--float-levels``: the layers before APoT/PoT activations in float with exact nearest levels,
instead of int8 layers deciding the level on their accumulator); uniform W8A8 as the reference. Reported per row: accuracy on the 500 held-out images in onnxruntime and in the simulation, whether
they predict the same class everywhere, the validation verdict and code mismatches, and how many activation
quantizers took an offset.

Writes ``benchmarks/results/negative_activations.json`` and prints a markdown table.
Run: ``python benchmarks/bench_negative_activations.py`` from the repository root (about 2-4 minutes on 2 cores).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import qcompile  # noqa: E402
from benchmarks import common  # noqa: E402
from qcompile.models import digits  # noqa: E402
from qcompile.qmodules import FakeQuantize  # noqa: E402
from qcompile.runtime.session import run, session  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "negative_activations.json")
CALIB = 32


class MobileNetV3Like(nn.Module):
    """Hardswish stem, a depthwise conv with channel multiplier 2, squeeze-excite, an inverted residual with SiLU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(32),
                                nn.Hardswish())
        self.se_fc1, self.se_fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.pw = nn.Sequential(nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.block = nn.Sequential(
            nn.Conv2d(24, 48, 1, bias=False), nn.BatchNorm2d(48), nn.SiLU(),
            nn.Conv2d(48, 48, 3, stride=2, padding=1, groups=48, bias=False), nn.BatchNorm2d(48), nn.SiLU(),
            nn.Conv2d(48, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1), nn.Hardswish())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem(x)
        h = self.dw(x)
        w = torch.sigmoid(self.se_fc2(F.relu(self.se_fc1(h.mean((2, 3), keepdim=True)))))
        x = self.pw(h * w)
        x = F.avg_pool2d(x, 2) + self.block(x)
        return self.fc(self.head(x).mean((2, 3)))


class ViTLike(nn.Module):
    """The 8 image rows as tokens, a learned position embedding, 2 pre-norm encoder layers (GELU), mean pooling."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(1, 8, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x):
        t = self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos
        return self.head(self.norm(self.enc(t)).mean(1))


def train(model: nn.Module, x, y, epochs: int, lr: float, seed: int = 0) -> nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


MODELS = {"MobileNetV3-like (Hardswish, SiLU)": (MobileNetV3Like, 60, 3e-3),
          "ViT-like (GELU, LayerNorm)": (ViTLike, 60, 3e-3)}


def configurations() -> list[dict]:
    configs = [{"name": "uniform W8A8", "scheme": "uniform", "bits": 8}]
    for bits in (4, 3):
        for scheme in ("apot", "pot", "uniform"):
            configs.append({"name": f"{scheme} W{bits}A{bits}", "scheme": scheme, "bits": bits})
            if scheme != "uniform":
                configs.append({"name": f"{scheme} W{bits}A{bits} symmetric", "scheme": scheme, "bits": bits,
                                "asym_levels": False})
                # layers before the APoT/PoT activations in float, exact nearest levels (qcompile <= 0.2)
                configs.append({"name": f"{scheme} W{bits}A{bits} float levels", "scheme": scheme, "bits": bits,
                                "int8_levels": False})
    return configs


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def measure(model, config, x_cal, x_te, y_te, folder) -> dict:
    options = {k: v for k, v in config.items() if k != "name"}
    path = os.path.join(folder, "m.onnx")
    t0 = time.perf_counter()
    result = qcompile.compile(model, x_cal[:1], calib=x_cal, output=path, validation_inputs=x_te, **options)
    seconds = time.perf_counter() - t0
    got = run(session(path), [x_te.numpy()])[0]
    with torch.no_grad():
        sim = result.model(x_te).numpy()
    acts = [m for m in result.model.modules() if isinstance(m, FakeQuantize) and m.role == "activation"]
    report = result.report
    return {"name": config["name"], "options": options,
            "onnx_acc": accuracy(got, y_te.numpy()), "sim_acc": accuracy(sim, y_te.numpy()),
            "same_predictions": bool((got.argmax(1) == sim.argmax(1)).all()),
            "validation": "PASS" if report.passed else "FAIL",
            "codes_differ": report.extra.get("codes_differ"), "codes_total": report.extra.get("codes_total"),
            "activation_quantizers": len(acts), "signed_apot_searched": sum(m.search_offset for m in acts),
            "asymmetric": sum(m.level_offset > 0 for m in acts),
            "offsets": sorted(int(m.level_offset) for m in acts if m.level_offset), "compile_s": round(seconds, 3)}


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x_tr, y_tr, x_te, y_te = digits.load_split()
    x_cal = x_tr[:CALIB].clone()
    results = {"environment": common.environment(), "calibration_images": CALIB, "test_images": len(x_te),
               "models": []}
    with tempfile.TemporaryDirectory() as folder:
        for name, (cls, epochs, lr) in MODELS.items():
            torch.manual_seed(0)
            t0 = time.perf_counter()
            model = train(cls(), x_tr, y_tr, epochs, lr)
            with torch.no_grad():
                float_acc = accuracy(model(x_te).numpy(), y_te.numpy())
            entry = {"model": name, "float_acc": float_acc, "train_s": round(time.perf_counter() - t0, 1),
                     "rows": []}
            print(f"\n{name}: float {100 * float_acc:.1f}% (trained in {entry['train_s']} s)")
            print("| config | onnxruntime acc. | sim acc. | same predictions | validation | asymmetric / searched |")
            print("|---|---|---|---|---|---|")
            for config in configurations():
                row = measure(model, config, x_cal, x_te, y_te, folder)
                entry["rows"].append(row)
                print(f"| {row['name']} | {100 * row['onnx_acc']:.1f}% | {100 * row['sim_acc']:.1f}% | "
                      f"{row['same_predictions']} | {row['validation']} ({row['codes_differ']} codes differ) | "
                      f"{row['asymmetric']} / {row['signed_apot_searched']} |")
            results["models"].append(entry)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
