"""Benchmark: adaptive weight rounding (``--weight-rounding adaptive``) against nearest rounding, on trained models.

Four models trained on real data (the digits split of ``qcompile.models.digits``, scikit-learn's handwritten
digits; nothing downloaded): the bundled digits CNN, the MobileNetV3-like CNN (Hardswish, SiLU, squeeze-excite,
depthwise) and ViT-like transformer (GELU, LayerNorm) that ``benchmarks/bench_negative_activations.py`` trains here,
seeded, and a denoising autoencoder whose decoder is two ConvTranspose layers and a conv (``DenoisingAE``, trained
here, seeded; its rows have no accuracy). Each is compiled with APoT and uniform levels at W4A4, W3A3, W2A2, APoT W4 / uniform A8 and uniform W8A8
(default options otherwise: first and last layers 8-bit uniform; 32 calibration images), once with each rounding.
Reported per row: output SQNR of the onnxruntime file against the float model and its accuracy on the 500 held-out
images, the validation verdict (the file against its simulation, on those images), and the compile time.

Writes ``benchmarks/results/adaptive_rounding.json`` and prints a markdown table.
Run: ``python benchmarks/bench_adaptive_rounding.py`` from the repository root (about 2-3 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import qcompile  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.bench_negative_activations import MODELS, train  # noqa: E402
from qcompile.models import digits  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "adaptive_rounding.json")
CALIB = 32
CONFIGS = {
    "apot W4A4": {"scheme": "apot", "bits": 4},
    "uniform W4A4": {"scheme": "uniform", "bits": 4},
    "apot W3A3": {"scheme": "apot", "bits": 3},
    "uniform W3A3": {"scheme": "uniform", "bits": 3},
    "apot W2A2": {"scheme": "apot", "bits": 2},
    "uniform W2A2": {"scheme": "uniform", "bits": 2},
    "W4 apot / A8 uniform": {"wscheme": "apot", "wbits": 4, "ascheme": "uniform", "abits": 8},
    "uniform W8A8": {"scheme": "uniform", "bits": 8},
}
ROUNDINGS = ("nearest", "adaptive")


def trained_models(x_tr, y_tr, specs: dict = MODELS) -> dict:
    """The bundled digits CNN and the models of ``specs`` (name -> (class, epochs, lr); default: the two that
    ``bench_negative_activations`` trains), trained seeded, in eval mode."""
    models = {"digits CNN": digits.pretrained()}
    for name, (cls, epochs, lr) in specs.items():
        torch.manual_seed(0)
        models[name] = train(cls(), x_tr, y_tr, epochs, lr)
    return {name: model.eval() for name, model in models.items()}


class DenoisingAE(nn.Module):
    """8x8 digits -> 4x4 codes -> 8x8 images: a strided conv encoder, a decoder of two ConvTranspose layers (stride 2,
    then 1) and a conv."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
                                 nn.ConvTranspose2d(32, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 1, 3, padding=1))

    def forward(self, x):
        return self.dec(self.enc(x))


def train_autoencoder(x_tr, epochs: int = 60, lr: float = 2e-3, noise: float = 0.1) -> nn.Module:
    """``DenoisingAE`` trained seeded to restore training images from copies with N(0, noise^2) added (Adam, MSE)."""
    torch.manual_seed(0)
    model = DenoisingAE()
    opt = torch.optim.Adam(model.parameters(), lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr))
        for i in range(0, len(x_tr), 64):
            xb = x_tr[perm[i:i + 64]]
            loss = ((model(xb + noise * torch.randn(xb.shape, generator=gen)) - xb) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def measure(model, options: dict, x_cal, x_test, y_test, ref, path: str) -> dict:
    """Compile ``model`` with ``options`` (validated on the test images) and score the onnxruntime file: output
    SQNR against the float outputs ``ref``, accuracy, the weights' bits and packed ideal size, compile seconds."""
    from qcompile.qmodules import FakeQuantize

    t0 = time.perf_counter()
    result = qcompile.compile(model, x_cal[:1], calib=x_cal, output=path, validation_inputs=x_test, **options)
    seconds = time.perf_counter() - t0
    out = common.session(path).run(None, {"input": x_test.numpy()})[0]
    bits = {name.rpartition(".")[0]: m.bits for name, m in result.model.named_modules()
            if isinstance(m, FakeQuantize) and m.role == "weight"}
    return {"sqnr_vs_float_db": round(common.sqnr_db(ref, out), 2),
            "accuracy": float(np.mean(out.argmax(1) == y_test.numpy())) if out.ndim == 2 else None,
            "ideal_bytes": common.ideal_size(result.model)["bytes"], "weight_bits": bits,
            "validation_passed": bool(result.report.passed), "compile_seconds": round(seconds, 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=RESULTS, help="JSON results file (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x_tr, y_tr, x_te, y_te = digits.load_split()
    x_cal = x_tr[:CALIB].clone()
    models = trained_models(x_tr, y_tr)
    models["denoising autoencoder (ConvTranspose)"] = train_autoencoder(x_tr)
    results = {"environment": common.environment(), "calibration_images": CALIB, "test_images": len(x_te),
               "models": []}
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for name, model in models.items():
            with torch.no_grad():
                ref = model(x_te).numpy()
            entry = {"model": name, "float_accuracy": float(np.mean(ref.argmax(1) == y_te.numpy()))
                     if ref.ndim == 2 else None, "rows": []}
            for config, options in CONFIGS.items():
                row = {"config": config, "options": options}
                for rounding in ROUNDINGS:
                    row[rounding] = measure(model, dict(options, weight_rounding=rounding), x_cal, x_te, y_te, ref,
                                            os.path.join(folder, "m.onnx"))
                row["sqnr_gain_db"] = round(row["adaptive"]["sqnr_vs_float_db"] - row["nearest"]["sqnr_vs_float_db"], 2)
                entry["rows"].append(row)
                n, a = row["nearest"], row["adaptive"]
                rows.append([name, config, f"{n['sqnr_vs_float_db']:.2f} / {a['sqnr_vs_float_db']:.2f}",
                             f"{row['sqnr_gain_db']:+.2f}", "n/a" if n["accuracy"] is None
                             else f"{100 * n['accuracy']:.1f} / {100 * a['accuracy']:.1f}",
                             "PASS" if n["validation_passed"] and a["validation_passed"] else "FAIL",
                             f"{n['compile_seconds']:.2f} / {a['compile_seconds']:.2f}"])
                print(" | ".join(rows[-1]), flush=True)
            results["models"].append(entry)
    gains = [r["sqnr_gain_db"] for m in results["models"] for r in m["rows"]]
    results["summary"] = {"rows": len(gains), "sqnr_gain_db_median": float(np.median(gains)),
                          "sqnr_gain_db_min": float(min(gains)), "sqnr_gain_db_max": float(max(gains)),
                          "rows_with_gain": int(sum(g > 0 for g in gains)),
                          "all_validations_passed": all(r[k]["validation_passed"] for m in results["models"]
                                                        for r in m["rows"] for k in ROUNDINGS),
                          "by_model": {m["model"]: {"sqnr_gain_db_median": float(np.median([r["sqnr_gain_db"]
                                                                                           for r in m["rows"]])),
                                                    "sqnr_gain_db_min": min(r["sqnr_gain_db"] for r in m["rows"]),
                                                    "sqnr_gain_db_max": max(r["sqnr_gain_db"] for r in m["rows"])}
                                       for m in results["models"]}}
    common.finish(results, args.output,
                  ["model", "config", "SQNR vs float dB (nearest / adaptive)", "gain",
                   "accuracy % (nearest / adaptive)", "validation", "compile s"], rows, t_start)


if __name__ == "__main__":
    main()
