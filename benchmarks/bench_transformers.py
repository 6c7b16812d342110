"""HuggingFace transformers models, compiled as they are: does every layer get quantized, and how close is the file
to the float model, beside onnxruntime's own flow?

Each model is built from a small config (random weights: nothing is downloaded) and compiled at W8A8 with no flags
(no ``--leaf-module``): ``qcompile.compile(model, example, calib=...)``; GPT-2 (a causal LM) as a module that gives it
its attention mask (``forward(ids, mask)``, every third sample padded), scored on the positions the mask keeps; so are
OPT, Llama and BLOOM. On inputs held out from the 32 calibration
inputs, the output SQNR against the float model of

- ``qcompile``: the emitted file, run in onnxruntime;
- ``quantize_static``: onnxruntime's flow (``torch.onnx.export`` of the same model returning its logits, then QDQ,
  per-channel int8 weights, uint8 activations, MinMax, on the same calibration inputs).

transformers is not a dependency of qcompile: install it beside (``pip install transformers``); without it the script
says so and exits with status 2. Run: ``python benchmarks/bench_transformers.py`` from the repository root (about
a minute). Writes ``benchmarks/results/transformers.json``.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import qcompile  # noqa: E402

CALIB, HELD_OUT = 32, 48


def models():
    """(name, model, input kind) for each architecture, from small configs, each initialised from seed 0."""
    import transformers as T

    small = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    builders = {
        "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(
            hidden_size=64, vocab_size=500, num_labels=3, **small)), "ids"),
        "roberta": (lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
            hidden_size=64, vocab_size=500, num_labels=3, max_position_embeddings=40, **small)), "ids"),
        "distilbert": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            dim=64, n_layers=2, n_heads=2, hidden_dim=128, vocab_size=500, num_labels=3)), "ids"),
        "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(
            hidden_size=64, image_size=32, patch_size=8, num_labels=10, **small)), "image"),
        "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)), "image"),
        "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)), "image"),
        # a causal LM: next-token logits at every position, with its attention mask as an input (padded samples);
        # without one transformers builds the mask from the batch size, which no trace keeps
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
            n_embd=64, n_layer=2, n_head=2, vocab_size=500, n_positions=32, bos_token_id=0, eos_token_id=0,
            use_cache=False)), "ids+mask"),
        "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(
            vocab_size=500, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=64, use_cache=False)), "ids+mask"),
        "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(  # grouped-query attention, rotary positions
            vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=64, use_cache=False)), "ids+mask"),
        "bloom": (lambda: T.BloomForCausalLM(T.BloomConfig(  # ALiBi
            vocab_size=500, hidden_size=64, n_layer=2, n_head=4, use_cache=False)), "ids+mask"),
    }
    for name, (build, kind) in builders.items():
        torch.manual_seed(0)
        yield name, build(), kind


def inputs(kind: str, n: int, seed: int) -> tuple:
    """The model's inputs, one tensor each: token ids (and an attention mask, every third sample padded at the end
    by 1 to 7 positions), or images."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "image":
        return (torch.randn(n, 3, 32, 32, generator=gen),)
    ids = torch.randint(0, 500, (n, 16), generator=gen)
    if kind == "ids":
        return (ids,)
    mask = torch.ones_like(ids)
    for i in range(0, n, 3):
        mask[i, 16 - 1 - i % 7:] = 0
    return ids, mask


class Logits(nn.Module):
    """The model returning its logits tensor, for torch.onnx.export (a ModelOutput is not an ONNX output)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, return_dict=False)[0]


class MaskedLogits(nn.Module):
    """A causal LM given its attention mask: the logits at every position."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask, return_dict=False)[0]


def run(sess, xs: tuple, batch: int = 32) -> np.ndarray:
    names = [i.name for i in sess.get_inputs()]
    n = len(xs[0])
    return np.concatenate([sess.run(None, {name: np.ascontiguousarray(x[i:i + batch].numpy())
                                           for name, x in zip(names, xs)})[0] for i in range(0, n, batch)])


class _Reader:
    def __init__(self, names, calib):
        self.items = iter([{name: x[i:i + 8].numpy() for name, x in zip(names, calib)}
                           for i in range(0, len(calib[0]), 8)])

    def get_next(self):
        return next(self.items, None)


def theirs(wrapped, calib, test, folder) -> np.ndarray:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path, pre_path, q_path = (os.path.join(folder, f) for f in ("float.onnx", "pre.onnx", "ort.onnx"))
    names = [f"input_{i}" for i in range(len(calib))]
    torch.onnx.export(wrapped, tuple(x[:1] for x in calib), float_path, input_names=names, output_names=["output"],
                      dynamic_axes={name: {0: "batch"} for name in names + ["output"]}, opset_version=17,
                      dynamo=False)
    quant_pre_process(float_path, pre_path)
    quantize_static(pre_path, q_path, _Reader(names, calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return run(common.session(q_path), test)


def main() -> int:
    try:
        import transformers
    except ImportError:
        print("bench_transformers: transformers is not installed (pip install transformers); nothing measured",
              file=sys.stderr)
        return 2
    from qcompile.summary import layer_lines

    warnings.simplefilter("ignore")
    rows, t_start = [], time.perf_counter()
    for name, model, kind in models():
        model.eval()
        calib, test = inputs(kind, CALIB, 1), inputs(kind, HELD_OUT, 2)
        wrapped = (MaskedLogits if kind == "ids+mask" else Logits)(model).eval()
        with torch.no_grad():
            ref = wrapped(*test).numpy()
        # agreement of the predicted class (the next token at the positions the mask keeps)
        keep = test[1].numpy().astype(bool) if kind == "ids+mask" else np.ones(ref.shape[:-1], dtype=bool)
        row = {"model": name, "inputs": "token ids, attention mask" if kind == "ids+mask" else kind}
        with tempfile.TemporaryDirectory() as folder:
            t0 = time.perf_counter()
            try:
                # the model itself, or (given a mask) the module that passes it
                result = qcompile.compile(wrapped if kind == "ids+mask" else model, tuple(x[:1] for x in calib),
                                          calib=calib if len(calib) > 1 else calib[0], scheme="uniform", bits=8,
                                          output=os.path.join(folder, "ours.onnx"))
            except qcompile.UserError as exc:
                row["error"] = str(exc)
                rows.append(row)
                print(f"{name}: {exc}", flush=True)
                continue
            row["compile_seconds"] = round(time.perf_counter() - t0, 2)
            lines = layer_lines(result.model)[1:]
            row["layers"] = len(lines)
            row["quantized_layers"] = sum(" W8 uniform" in line for line in lines)
            row["validation_passed"] = bool(result.report.passed)
            ours = run(common.session(result.onnx_path), test)
            row["ours_sqnr_db"] = round(common.sqnr_db(ref[keep], ours[keep]), 2)
            row["ours_top1_agreement"] = float((ours.argmax(-1) == ref.argmax(-1))[keep].mean())
            try:
                th = theirs(wrapped, calib, test, folder)
                row["quantize_static_sqnr_db"] = round(common.sqnr_db(ref[keep], th[keep]), 2)
                row["quantize_static_top1_agreement"] = float((th.argmax(-1) == ref.argmax(-1))[keep].mean())
            except Exception as exc:  # noqa: BLE001 -- their flow's failure is a result too
                row["quantize_static_error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"benchmark": "transformers", "environment": common.environment(),
           "transformers_version": transformers.__version__, "calibration_inputs": CALIB,
           "held_out_inputs": HELD_OUT, "models": rows, "seconds": round(time.perf_counter() - t_start, 1)}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "transformers.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(common.markdown_table(["model", "layers quantized", "qcompile dB", "quantize_static dB"],
                                [[r["model"], f"{r.get('quantized_layers')}/{r.get('layers')}",
                                  r.get("ours_sqnr_db"), r.get("quantize_static_sqnr_db")] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
