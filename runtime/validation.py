"""Validate an emitted ONNX file against its PyTorch reference.

The file runs in onnxruntime on the given inputs; the reference (the float model for ``--scheme fp32``, the
fake-quantized simulation ``GraphModule`` otherwise) runs in PyTorch on the same inputs. Reported:

- ``max_abs``: max |onnx − reference| over all outputs;
- ``sqnr_db``: 10·log10(Σ ref² / Σ (onnx − ref)²) (``inf`` when identical);
- ``top1``: fraction of samples whose arg-max over the last axis agrees (classification outputs only).

A report ``passed`` when every threshold the caller chose is met.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .session import run, session


@dataclasses.dataclass
class ValidationReport:
    samples: int
    max_abs: float
    sqnr_db: float
    top1: float | None
    thresholds: dict = dataclasses.field(default_factory=dict)
    failures: list = dataclasses.field(default_factory=list)
    #: per-layer details filled in by quantized validation (codes that differ, SQNR vs float)
    layers: list = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        top1 = "n/a" if self.top1 is None else f"{100 * self.top1:.2f}%"
        if self.top1 is not None and self.extra.get("outputs", 1) > 1:
            # the first output with class scores; the SQNR and max abs err are over all
            top1 = f"(output {self.extra.get('top1_output', 0)}) {top1}"
        sq = ("inf" if self.sqnr_db > 0 else "-inf") if math.isinf(self.sqnr_db) else f"{self.sqnr_db:.1f} dB"
        status = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        codes = ""
        if self.extra.get("codes_total"):
            codes = f", codes differ {self.extra['codes_differ']} of {self.extra['codes_total']}"
            if self.extra["codes_differ"]:
                codes += f" ({self.extra['codes_differ_local']} on identical inputs)"
        if self.extra.get("saturating_pairs"):
            # a note on other CPUs, not on this run: the pairs saturate only where x86 lacks VNNI
            codes += (f"; elsewhere: on x86 without VNNI {self.extra['saturating_pairs']} int8 weight pairs would "
                      "saturate int16 (--int8-weights s8-safe avoids them)")
        against = f" (against {self.extra['reference']})" if self.extra.get("reference") else ""
        return (f"validation on {self.samples} inputs{against}: max abs err {self.max_abs:.3g}, SQNR {sq}, "
                f"top-1 agreement {top1}{codes} -> {status}")

    def to_dict(self) -> dict:
        """The report as plain data that ``json.dumps`` writes as strict JSON (non-finite numbers as strings)."""
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return json_safe(d)


def json_safe(value):
    """``value`` with every non-finite float as the string "inf", "-inf" or "nan": ``json.dumps`` writes them as
    ``Infinity``/``NaN``, which strict JSON parsers (JavaScript's JSON.parse) refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - test.astype(np.float64)) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def compare_outputs(reference: Sequence[np.ndarray], test: Sequence[np.ndarray], min_sqnr: float | None = None,
                    max_abs: float | None = None, min_top1: float | None = None,
                    samples: int | None = None) -> ValidationReport:
    """Compare two lists of output arrays (same shapes, batch axis first) and apply thresholds. ``samples``: the
    number of inputs (default: the first output's length)."""
    wrong = [f"the file has {len(test)} output(s), the reference {len(reference)}"] if len(reference) != len(test) \
        else [f"output {i}: the file's shape {list(t.shape)}, the reference's {list(r.shape)}"
              for i, (r, t) in enumerate(zip(reference, test)) if r.shape != t.shape]
    if wrong:  # an edited file, or another model's: nothing to compare value by value
        report = ValidationReport(samples=samples if samples is not None else 0, max_abs=math.inf,
                                  sqnr_db=-math.inf, top1=None,
                                  thresholds={"min_sqnr": min_sqnr, "max_abs": max_abs, "min_top1": min_top1})
        report.failures.append("; ".join(wrong) + " (the file computes another graph)")
        report.extra["shape_mismatch"] = True
        return report
    errs, ref_all, test_all = [], [], []
    unmatched = 0  # entries non-finite on one side only (or inf against -inf)
    nan_ref = total = 0  # NaN in the reference: NaN against NaN was a match, all-NaN outputs passed
    for r, t in zip(reference, test):
        r64, t64 = r.astype(np.float64).ravel(), t.astype(np.float64).ravel()
        nan_ref += int(np.isnan(r64).sum())
        total += r64.size
        finite = np.isfinite(r64) & np.isfinite(t64)
        same = (np.isnan(r64) & np.isnan(t64)) | (np.isinf(r64) & (r64 == t64))
        unmatched += int((~finite & ~same).sum())
        # NaN compares false: the metrics are over the entries finite on both sides, so a NaN never passes a bound
        r64, t64 = r64[finite], t64[finite]
        errs.append(float(np.max(np.abs(r64 - t64))) if r64.size else 0.0)
        ref_all.append(r64)
        test_all.append(t64)
    first = reference[0]
    top1 = None
    # the first output that holds class scores (batch x classes): a model returning (features, logits) was
    # checked on the features' argmax, top-1 "n/a", and a --min-top1 bound given for it silently not applied
    scores = next((i for i, r in enumerate(reference) if r.ndim == 2 and r.shape[1] > 1), None)
    if scores is not None:
        top1 = float(np.mean(np.argmax(reference[scores], axis=1) == np.argmax(test[scores], axis=1)))
    report = ValidationReport(
        samples=samples if samples is not None else (int(first.shape[0]) if first.ndim else 1),
        max_abs=max(errs) if errs else 0.0,
        sqnr_db=sqnr_db(np.concatenate(ref_all), np.concatenate(test_all)),
        top1=top1,
        thresholds={"min_sqnr": min_sqnr, "max_abs": max_abs, "min_top1": min_top1},
    )
    if len(reference) > 1:
        report.extra["outputs"] = len(reference)
        if scores is not None:
            report.extra["top1_output"] = scores
    if unmatched:
        report.failures.append(f"{unmatched} output value(s) are NaN or inf on one side only")
    if nan_ref:
        report.extra["nan_outputs"] = nan_ref  # NaN on both sides agree (a step output masked with NaN) ...
    if total and nan_ref == total:  # ... but outputs that are all NaN compare nothing: they passed with SQNR inf
        report.failures.append(f"the model computes NaN in {nan_ref} of its {total} output values on these inputs, "
                               "so nothing can be compared: check the model and the inputs (a square root or log "
                               "of negative values, 0/0)")
        report.extra["nonfinite_unmatched"] = unmatched
    if min_sqnr is not None and report.sqnr_db < min_sqnr:
        report.failures.append(f"SQNR {report.sqnr_db:.1f} dB < {min_sqnr} dB")
    if max_abs is not None and report.max_abs > max_abs:
        report.failures.append(f"max abs err {report.max_abs:.3g} > {max_abs}")
    if min_top1 is not None and top1 is not None and top1 < min_top1:
        report.failures.append(f"top-1 agreement {100 * top1:.2f}% < {100 * min_top1:.2f}%")
    if min_top1 is not None and top1 is None:
        report.failures.append("a top-1 bound was given, but no output holds class scores (batch x classes, more "
                               "than one class): drop --min-top1 (min_top1) for this model")
    return report


def batches(inputs, batch_size: int) -> Iterable[tuple[torch.Tensor, ...]]:
    """Split a tensor (or tuple of tensors, batch-first) into batches."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    n = inputs[0].shape[0]
    for i in range(0, n, batch_size):
        yield tuple(x[i:i + batch_size] for x in inputs)


def output_tensors(y) -> list[torch.Tensor]:
    """A model's outputs as the flat list of tensors the ONNX file has: tuples, lists and dicts (values in their
    order, as torch.onnx flattens them) of tensors."""
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(y) if isinstance(t, torch.Tensor)]


def join_batches(outs: Sequence[Sequence[np.ndarray]], sizes: Sequence[int]) -> list[np.ndarray]:
    """Join per-batch outputs (``outs[i][k]``: output ``k`` of batch ``i``, which held ``sizes[i]`` inputs) into one
    array per output, batch axis first. The batch axis is axis 0 where its length is the batch's (else the first
    axis that is: ``logits.t()``, ``x[None]``, sequence-first outputs); an output with no such axis in every batch
    (a 0-d loss, a batch mean, a flattened batch) is joined as the concatenation of its raveled batches, which the
    comparison treats the same on both sides."""
    joined = []
    for parts in zip(*outs):
        first = parts[0]
        axis = next((a for a in range(first.ndim) if first.shape[a] == sizes[0]), None)
        if axis is not None and all(p.ndim == first.ndim and p.shape[axis] == n
                                    and p.shape[:axis] + p.shape[axis + 1:] == first.shape[:axis] + first.shape[axis + 1:]
                                    for p, n in zip(parts, sizes)):
            joined.append(np.concatenate([np.moveaxis(p, axis, 0) for p in parts]))
        else:
            joined.append(np.concatenate([np.ravel(p) for p in parts]))
    return joined


def _batch_sizes(inputs, batch_size: int) -> list[int]:
    return [int(b[0].shape[0]) for b in batches(inputs, batch_size)]


def _sample_count(inputs) -> int:
    return int((inputs if isinstance(inputs, torch.Tensor) else inputs[0]).shape[0])


def _check_runnable(inputs, batch_size: int) -> None:
    """One-line errors for inputs no run can compare on (an empty batch left the outputs empty: ``IndexError``) and
    a batch size no batch holds (``range() arg 3 must not be zero``)."""
    from qcompile.errors import UserError

    first = inputs if isinstance(inputs, torch.Tensor) else (inputs[0] if inputs else None)
    if not isinstance(first, torch.Tensor) or first.dim() == 0 or first.shape[0] == 0:
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else None
        raise UserError(f"the validation inputs hold no samples (shape {shape}); give a batch-first tensor or array "
                        "with at least one input (one per model input for several)")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")


def run_reference(reference: Callable, inputs, batch_size: int = 64) -> list[np.ndarray]:
    outs: list[list[np.ndarray]] = []
    with torch.no_grad():
        for batch in batches(inputs, batch_size):  # on copies: a model may write to its input in place
            ys = output_tensors(reference(*[t.clone() if isinstance(t, torch.Tensor) else t for t in batch]))
            outs.append([t.detach().float().numpy() for t in ys])
    return join_batches(outs, _batch_sizes(inputs, batch_size))


@dataclasses.dataclass
class FloatOutputs:
    """A float model's outputs on the validation inputs (joined over batches) and which of them are floating point:
    what :func:`validate_quantized` compares the file with, computed before it runs (:func:`float_outputs`)."""

    outputs: list
    floating: list


def float_outputs(float_model: Callable, inputs, batch_size: int) -> FloatOutputs:
    """``float_model``'s outputs on ``inputs``, for ``validate_quantized(..., float_model=...)``: the caller can let
    the model go before the validation's own runs (compile passes its float copy of the model: one copy of the
    weights less at the validation's peak). ``batch_size``: as the validation's (the same numbers)."""
    inputs = as_inputs(inputs)
    outputs = run_reference(float_model, inputs, batch_size)
    first = next(iter(batches(inputs, 1)))
    with torch.no_grad():
        floating = [t.is_floating_point() for t in output_tensors(float_model(*[t.clone() for t in first]))]
    return FloatOutputs(outputs, floating)


def run_onnx(path_or_sess, inputs, batch_size: int = 64) -> list[np.ndarray]:
    sess = session(path_or_sess) if isinstance(path_or_sess, (str, bytes)) else path_or_sess
    outs: list[list[np.ndarray]] = []
    for batch in batches(inputs, batch_size):
        outs.append(run(sess, [b.numpy() for b in batch]))
    return join_batches(outs, _batch_sizes(inputs, batch_size))


def _check_arguments(onnx_file, reference, inputs, thresholds: dict) -> None:
    """One-line errors for arguments of the wrong kind (a missing file, a reference that is no callable, inputs in a
    dict or a generator, a bound given as a string), before anything runs: these stopped in a TypeError or
    KeyError from deep inside the comparison."""
    import os

    from qcompile.errors import UserError

    if isinstance(onnx_file, (str, os.PathLike)) and not os.path.isfile(onnx_file):
        raise UserError(f"no ONNX file at {os.fspath(onnx_file)!r}; give the path of the file qcompile wrote")
    if not (isinstance(onnx_file, (str, os.PathLike, bytes, bytearray)) or hasattr(onnx_file, "SerializeToString")
            or hasattr(onnx_file, "get_inputs")):
        raise UserError(f"the ONNX file is a {type(onnx_file).__name__}; give a path, the model's bytes, an "
                        "onnx.ModelProto or an onnxruntime InferenceSession")
    if not callable(reference):
        raise UserError(f"the reference is a {type(reference).__name__}, not a model; give the simulation "
                        "(CompileResult.model) or a callable taking the inputs")
    parts = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    bad = [p for p in parts if not isinstance(p, (torch.Tensor, np.ndarray))]
    if bad or not parts:
        kind = f"a {type(bad[0]).__name__}" if bad else "an empty sequence"
        kind = "None" if bad and bad[0] is None else kind
        raise UserError(f"the validation inputs hold {kind}; give a batch-first tensor or numpy array, or a tuple "
                        "of them (one per model input)")
    for name, value in thresholds.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))):
            raise UserError(f"{name} is {value!r}; give a number or None")


def as_inputs(inputs):
    """Validation inputs as the runs take them: a tensor, or a tuple of tensors (one per model input). NumPy
    arrays become tensors and float64/float16 values float32, as ``qcompile.compile`` takes them."""
    def one(t):
        t = torch.from_numpy(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) else t
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()
        return t

    if isinstance(inputs, (tuple, list)):
        return tuple(one(t) for t in inputs)
    return one(inputs)


def model_source(onnx_file):
    """A file path (str or path-like), serialized bytes or an ``onnx.ModelProto`` as a path or bytes."""
    import os

    if hasattr(onnx_file, "SerializeToString"):
        return onnx_file.SerializeToString()
    if isinstance(onnx_file, (bytes, bytearray)):
        return bytes(onnx_file)
    return os.fspath(onnx_file)


def validate(onnx_path, reference: Callable, inputs, batch_size: int | None = None, min_sqnr: float | None = None,
             max_abs: float | None = None, min_top1: float | None = None) -> ValidationReport:
    """Run ``onnx_path`` (a path, bytes, ModelProto or onnxruntime session) in onnxruntime and ``reference`` in PyTorch on ``inputs``
    and compare. The file must compute ``reference``: without any threshold, ``min_sqnr`` is 80 dB (relative error
    1e-4, float rounding; what ``qcompile validate`` holds an fp32 file to): a report that checked nothing said
    PASS for a file of another model (-4 dB). ``batch_size``: samples per run (default 64).

    A quantized simulation (a GraphModule with ``FakeQuantize`` modules) as ``reference`` is validated as a compile
    validates it, by :func:`validate_quantized` (integer codes side by side, code flips at decision thresholds
    allowed up to its bounds; the thresholds given apply there): compared as a float file it failed a correct
    file at 78.8 dB, three codes flipped by float summation order."""
    _check_arguments(onnx_path, reference, inputs, {"min_sqnr": min_sqnr, "max_abs": max_abs, "min_top1": min_top1,
                                                    "batch_size": batch_size})
    if _is_simulation(reference) and not hasattr(onnx_path, "get_inputs"):
        return validate_quantized(onnx_path, reference, inputs, batch_size=batch_size, min_sqnr=min_sqnr,
                                  max_abs=max_abs, min_top1=min_top1)
    if batch_size is None:
        batch_size = 64
    if min_sqnr is None and max_abs is None and min_top1 is None:
        min_sqnr = 80.0
    inputs = as_inputs(inputs)
    _check_runnable(inputs, batch_size)
    if not hasattr(onnx_path, "get_inputs"):  # an onnxruntime session runs as it is
        onnx_path = model_source(onnx_path)
    ref = run_reference(reference, inputs, batch_size)
    got = run_onnx(onnx_path, inputs, batch_size)
    return compare_outputs(ref, got, min_sqnr=min_sqnr, max_abs=max_abs, min_top1=min_top1,
                           samples=_sample_count(inputs))


def _is_simulation(reference) -> bool:
    """Whether ``reference`` is a quantized simulation: a GraphModule holding ``FakeQuantize`` modules."""
    if not isinstance(reference, torch.fx.GraphModule):
        return False
    from qcompile.qmodules import FakeQuantize

    return any(isinstance(m, FakeQuantize) for m in reference.modules())


def validate_model(onnx_path, model, inputs, float64_scale: bool = True, rounding_scale: bool = True,
                   **thresholds) -> ValidationReport:
    """``validate`` of a float file against ``model``; where that fails, against ``model`` computed in float64 too:
    a model whose own float32 outputs are imprecise (a conv bias of 1e6 cancelled by its BatchNorm's running mean)
    failed at 13.5 dB while the file, which computes the folded graph, was at 127 dB of the exact function. The
    report then says which reference it used. Where only the SQNR bound fails, each output may instead be within
    ``FORCED_ROUNDING_MARGIN_DB`` of the model's own float32-vs-float64 distance on that output (outputs that
    amplify rounding), for a deterministic model (``float64_scale=False``: a model known to draw random numbers),
    and only for a default bound (``rounding_scale=False``: a ``--min-sqnr`` the user gave holds as given; a bound
    of 1000 dB passed a 133 dB file on that scale)."""
    report = validate(onnx_path, model, inputs, **thresholds)
    if report.passed or not isinstance(model, torch.nn.Module):
        return report
    import copy
    import warnings

    def as64(t):
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    bound = thresholds.get("min_sqnr")
    if all(v is None for k, v in thresholds.items() if k != "batch_size"):
        bound = 80.0  # validate()'s own default
    try:
        model64 = copy.deepcopy(model).double().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exact = validate(onnx_path, lambda *xs: model64(*(as64(x) for x in xs)), inputs, **thresholds)
            if not exact.passed and float64_scale and rounding_scale and bound is not None and \
                    report.failures == [f"SQNR {report.sqnr_db:.1f} dB < {bound} dB"]:
                # outputs that amplify float32 rounding (a - b of near-equal values, a LayerNorm far off its mean):
                # the model's own float32 outputs against float64 set the scale, output by output
                batch = thresholds.get("batch_size", 64)
                ref32 = run_reference(model, inputs, batch)
                again = run_reference(model, inputs, batch)  # a model that draws random numbers: no such scale
                deterministic = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(ref32, again))
                ref64 = run_reference(lambda *xs: model64(*(as64(x) for x in xs)), inputs, batch)
                got = run_onnx(model_source(onnx_path), inputs, batch)
                verdicts, scales = [], []
                for r32, r64, g in zip(ref32, ref64, got):
                    if r32.dtype.kind != "f" or r32.shape != g.shape or r32.shape != r64.shape:
                        verdicts.append(np.array_equal(r32, g))
                        continue
                    file_db, _ = _finite_sqnr(r32, g)
                    own, _ = _finite_sqnr(r64, r32)
                    scales.append(own)
                    verdicts.append(file_db >= bound or (own >= ROUNDING_SCALE_MIN_DB
                                                         and file_db >= own - FORCED_ROUNDING_MARGIN_DB))
                if scales:
                    report.extra["rounding_sqnr_db"] = min(scales)
                if deterministic and scales and all(verdicts):
                    report.failures = []
                    report.extra["reference"] = (f"the model, whose own float32 outputs are {min(scales):.1f} dB "
                                                 "from its float64 ones (rounding that these outputs amplify)")
                    return report
    except Exception:  # noqa: BLE001 -- a model that does not run in float64: the float32 verdict stands
        return report
    if not exact.passed:
        return report
    exact.extra["reference"] = (f"the model computed in float64; its own float32 outputs are "
                                f"{report.sqnr_db:.1f} dB from the file")
    return exact


INT16_MAX = 32767


def saturating_pairs(model) -> int:
    """Pairs of int8 weight codes in ``model`` (an ONNX ModelProto or bytes) that a uint8 × int8 kernel without
    VNNI adds past int16: same-sign neighbours of the kernel's reduction order with |a| + |b| > 32767 // A, in
    layers fed by uint8 activations of largest code A (255, or a level table's largest entry) (see ``qcompile.passes.int8_pairs``; depthwise convolutions and int8 activations
    run on exact kernels). 0 means the file computes the same on every onnxruntime CPU."""
    import onnx
    from onnx import TensorProto, numpy_helper

    if isinstance(model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model))
    if any(n.domain == "qcompile" for n in model.graph.node):
        # the custom form's weights are qcompile.DequantizeLevels functions, whose bodies onnxruntime inlines and
        # fuses into the same int8 convolutions: counted as inlined (they counted 0, and its validation never said
        # that a CPU without VNNI saturates them)
        import onnx.inliner

        model = onnx.inliner.inline_local_functions(model)
    inits = {t.name: t for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}

    def int8_weight(name):
        """``(codes, lut)``: the layer's int8 weight codes, or the indices into an int8 level table ``lut`` (None
        for plain codes); None where the weight is not int8. Kept in 8 bits: wider copies of a large model's
        weights were the peak of its compile's memory (a 54M-weight MLP: 3.5x its float weights here alone)."""
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        src = inits.get(node.input[0])
        if src is not None:
            return (numpy_helper.to_array(src), None) if src.data_type == TensorProto.INT8 else None
        gather = producer.get(node.input[0])  # non-uniform grid: Gather(int8 lut, Cast(packed indices))
        if gather is None or gather.op_type != "Gather" or gather.input[0] not in inits:
            return None
        lut = inits[gather.input[0]]
        cast = producer.get(gather.input[1])
        idx = inits.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
        if lut.data_type != TensorProto.INT8 or idx is None:
            return None
        return numpy_helper.to_array(idx), numpy_helper.to_array(lut).astype(np.int16)

    def uint8_input(name):
        """The layer's input is uint8 codes (or unknown): int8 codes run on int8 x int8 kernels, and codes wider
        than 8 bits (PoT-4 / APoT-8 activations: int16 tables) on float ones; neither saturates."""
        node = producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and len(node.input) > 2 and node.input[2] in inits:
            return inits[node.input[2]].data_type == TensorProto.UINT8
        if node is not None and node.op_type == "DequantizeLinear":
            table = _looked_up(node.input[0])
            return table is None or table.dtype == np.uint8
        return True  # unknown: assume the worst

    def _looked_up(codes):
        """The table of a Gather/GatherElements lookup (through Reshapes) that produces ``codes``, else None."""
        node = producer.get(codes)
        while node is not None and node.op_type == "Reshape":
            node = producer.get(node.input[0])
        if node is not None and node.op_type in ("Gather", "GatherElements") and node.input[0] in inits:
            return numpy_helper.to_array(inits[node.input[0]])
        return None

    def const(name):
        t = inits.get(name)
        return numpy_helper.to_array(t) if t is not None else None

    def clipped_code(q):
        """The largest code of ``QuantizeLinear(Clip(x, lo, hi), s, z)`` (a sub-8-bit uniform activation: its levels
        end at hi), else None."""
        clip = producer.get(q.input[0])
        if clip is None or clip.op_type != "Clip" or len(clip.input) < 3 or len(q.input) < 3:
            return None
        hi, scale, zp = const(clip.input[2]), const(q.input[1]), const(q.input[2])
        if hi is None or scale is None or zp is None or hi.size != 1 or scale.size != 1 or zp.size != 1:
            return None
        code = np.rint(np.float32(hi.reshape(())) / np.float32(scale.reshape(()))) + int(zp.reshape(()))
        return int(np.clip(code, 0, 255))

    def max_code(name):
        """Largest uint8 code the input can hold: a level table's largest entry (APoT/PoT activations), the clip of a
        sub-8-bit uniform activation (4-bit codes end at 15), else 255."""
        node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return 255
        table = _looked_up(node.input[0])
        if table is not None and table.size:
            return max(1, int(table.max()))
        q = producer.get(node.input[0])
        top = clipped_code(q) if q is not None and q.op_type == "QuantizeLinear" else None
        return max(1, top) if top is not None else 255

    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        found = int8_weight(node.input[1])
        if found is None or not uint8_input(node.input[0]):
            continue
        w, lut = found
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            if w.shape[1] == 1 and attrs.get("group", 1) == w.shape[0] > 1:
                continue  # depthwise kernel (one output per input channel): exact
            rows = w.reshape(w.shape[0], w.shape[1], -1).transpose(0, 2, 1).reshape(w.shape[0], -1)
        elif node.op_type == "Gemm" and attrs.get("transB", 0):
            rows = w.reshape(w.shape[0], -1)
        else:
            rows = w.reshape(w.shape[0], -1).T  # MatMul / Gemm B is [K, N]
        limit = INT16_MAX // max_code(node.input[0])
        step = max(1, (1 << 20) // max(rows.shape[1], 1))  # rows at a time: int16 copies of about 1M codes
        for r0 in range(0, rows.shape[0], step):
            block = rows[r0:r0 + step]
            block = lut[block.astype(np.intp)] if lut is not None else block.astype(np.int16)  # |a + b| <= 256
            if block.shape[1] % 2:
                block = np.concatenate([block, np.zeros((block.shape[0], 1), block.dtype)], 1)
            total += int((np.abs(block[:, 0::2] + block[:, 1::2]) > limit).sum())
    return total


def _saturation_hint(model_bytes: bytes) -> str:
    """Why codes may differ on this machine: int8 weight pairs past int16 on a CPU whose onnxruntime saturates
    uint8 × int8 products (x86 without VNNI; see ``--int8-weights``)."""
    from .session import u8s8_saturates

    if not u8s8_saturates():
        return ""
    n = saturating_pairs(model_bytes)
    if not n:
        return ""
    return (f"; this CPU's onnxruntime saturates uint8 x int8 products (no VNNI) and the file has {n} int8 weight "
            "pairs past int16: compile the float model with --int8-weights s8-safe (int8 speed) or u8 for a file "
            "exact here (a model compiled already keeps the weights it was compiled with)")


def _onnx_with_outputs(model, names: list[str]) -> bytes:
    """``model`` (bytes, or a ModelProto, which this changes) with ``names`` as further graph outputs, serialized."""
    import onnx

    from qcompile.emit import attach_probes

    if isinstance(model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model))
    model = attach_probes(model)  # activations the deployed graph does not compute
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def _own_error(stat: dict, x: torch.Tensor, q: torch.Tensor, saturation) -> None:
    """Add a quantizer's own rounding and clipping error on one batch (its output ``q`` against its input ``x`` in
    the quantized model) to ``stat``: where the error enters, unlike the SQNR against the float model, which every
    quantizer downstream inherits (a PoT set that left 3 levels to a transformer's input showed 0.8 dB here, while
    the report named three later quantizers)."""
    if saturation is not None:  # a tanh / clip reader sees nothing beyond its saturation
        x, q = x.clamp(*saturation), q.clamp(*saturation)
    stat["own_sig"] += _sum_squares(x)
    stat["own_noise"] += _sum_squares(q - x)


def _sum_squares(t: torch.Tensor) -> float:
    """Σ t² of a float32 tensor: float32 squares and row sums (round-off ~1e-7 relative, noise for an SQNR), then
    float64 across rows; no float64 copy of a large activation."""
    sq = t * t
    if sq.dim() >= 2:
        sq = sq.flatten(1).sum(dim=1)
    return float(sq.double().sum())


def _float_layers(sim):
    """``sim`` with its int8 layers (``int8_conv2d``, ...: exact integer accumulators, in float64) back on the
    float32 functions. It shares ``sim``'s modules, so hooks and ``disabled_quantizers(sim)`` apply to it."""
    import copy

    import torch.fx
    import torch.nn.functional as F

    from qcompile.qmodules import int8_conv1d, int8_conv2d, int8_conv3d, int8_linear

    if not isinstance(sim, torch.fx.GraphModule):
        return sim
    back = {int8_conv1d: F.conv1d, int8_conv2d: F.conv2d, int8_conv3d: F.conv3d, int8_linear: F.linear}
    if not any(n.op == "call_function" and n.target in back for n in sim.graph.nodes):
        return sim
    graph = copy.deepcopy(sim.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in back:
            node.target = back[node.target]
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "units"}
    return torch.fx.GraphModule(sim, graph)


# Outputs recomputed from onnxruntime's own codes differ from its outputs only by the float rounding of the layers
# after the last quantizer (10^-6 relative: 100-140 dB, most often exactly 0; exactly 0 or 142-143 dB in 45 compiles
# of nine trained models, a ViT and an autoencoder among them): 80 dB leaves that margin tenfold and fails a file
# whose tail computes something else (a changed bias, a wrong op: 0-20 dB; 40 dB passed a classifier's weight scale
# x1.02 on one class at 42.5 dB and its int32 bias +300 at 47.3 dB; 60 dB one classifier weight code off by one at
# 66-68 dB and one weight scale x1.001 at 72-75 dB). Tails whose float32 rounding is larger than that are judged on
# their own float32-vs-float64 distance (FORCED_ROUNDING_MARGIN_DB).
MIN_FORCED_SQNR_DB = 80.0


# operations whose output jumps where their input crosses a point (a comparison, rounding, an index): after the last
# quantizer they turn float rounding (an exactly-zero logit computed as 1e-9) into whole steps, as an integer output
_STEP_OPS = {"gt", "lt", "ge", "le", "eq", "ne", "greater", "less", "greater_equal", "less_equal", "equal",
             "not_equal", "round", "round_", "floor", "floor_", "ceil", "ceil_", "trunc", "trunc_", "sign", "sign_",
             "heaviside", "argmax", "argmin", "topk", "sort", "argsort", "mode", "median", "bool",
             "long", "int", "short", "char", "byte", "bucketize", "searchsorted", "floor_divide", "fmod",
             "remainder", "mod", "__and__", "__or__", "__xor__", "logical_and", "logical_or", "logical_not"}


def step_outputs(sim) -> set[int]:
    """Indices (in :func:`output_tensors` order) of the outputs of ``sim`` (a GraphModule) that pass through a step
    operation, or an integer/bool value, after the last quantizer on their way: the output comparison of the
    teacher-forced run leaves them out (their codes-to-output part is discontinuous)."""
    from torch.utils._pytree import tree_leaves

    from qcompile.qmodules import FakeQuantize

    graph = getattr(sim, "graph", None)
    if graph is None:
        return set()
    modules = dict(sim.named_modules())
    out = next((n for n in graph.nodes if n.op == "output"), None)
    if out is None:
        return set()
    leaves = [leaf for leaf in tree_leaves(out.args[0]) if isinstance(leaf, torch.fx.Node)]

    def floating(node) -> bool | None:
        dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
        return None if dtype is None else (dtype.is_floating_point or dtype.is_complex)

    def is_step(node) -> bool:
        # floats made integers (x.long(), a comparison, argmax of floats): integers from integers (token ids, a
        # position buffer expanded, the residual stream of a transformer reaching back to its embedding lookups, a
        # padding mask ids != 0) are exact on both sides, and counting them made a token classifier's logits a step
        # output, which skipped the forced check (a classifier bias edited in such a file passed at -7.9 dB)
        inputs = [floating(a) for a in node.all_input_nodes]
        # (no input of a known type: a step, as before; sizes, Python numbers, have none)
        from_floats = any(inputs) or all(v is None for v in inputs)
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name in _STEP_OPS:
            return from_floats
        return floating(node) is False and from_floats

    steps = set()
    for i, leaf in enumerate(leaves):
        seen, todo = set(), [leaf]
        while todo:
            node = todo.pop()
            if node in seen or node.op == "placeholder":
                continue
            seen.add(node)
            if node.op == "call_module" and isinstance(modules.get(node.target), FakeQuantize):
                continue  # the last quantizer on this path: what comes before it is compared through its codes
            if node.op in ("call_function", "call_method") and is_step(node):
                steps.add(i)
                break
            todo.extend(node.all_input_nodes)
    return steps


def _finite_sqnr(reference: np.ndarray, test: np.ndarray) -> tuple[float, int]:
    """SQNR over the entries finite on both sides, and the count of entries non-finite on one side only (or inf
    against -inf): a NaN made the SQNR NaN, which no bound failed."""
    r, t = np.asarray(reference, np.float64).ravel(), np.asarray(test, np.float64).ravel()
    finite = np.isfinite(r) & np.isfinite(t)
    same = (np.isnan(r) & np.isnan(t)) | (np.isinf(r) & (r == t))
    return sqnr_db(r[finite], t[finite]) if finite.any() else math.inf, int((~finite & ~same).sum())


# The outputs from onnxruntime's codes may sit below MIN_FORCED_SQNR_DB where the float layers after the last
# quantizer amplify rounding (a - b of nearly equal values, a LayerNorm of features 10^4 from their mean: 51-57 dB on
# genuine files). There, the simulation's own float32 outputs against the same computed in float64 set the scale:
# the file may be this much further from the simulation than float32 rounding puts the simulation from float64,
# output by output.
FORCED_ROUNDING_MARGIN_DB = 10.0  # genuine files sat within 0.7-4.4 dB of it; edits 11.8 dB and more off
ROUNDING_SCALE_MIN_DB = 30.0  # float32 against float64 further apart than this is no rounding (random draws...)


def _forced_check(report: ValidationReport, forced: Sequence[np.ndarray], got: Sequence[np.ndarray],
                  min_forced_sqnr: float | None, skip: set[int] = frozenset(), forced64=None) -> None:
    """The file's floating outputs against the simulation's computed from the file's own activation codes: the
    worst SQNR goes in ``extra["forced_sqnr_db"]``, and below ``min_forced_sqnr`` the validation fails, unless
    ``forced64()`` (the same outputs computed in float64, asked for only then) shows that float32 rounding alone
    puts the simulation within ``FORCED_ROUNDING_MARGIN_DB`` of that. Outputs in ``skip`` (a step operation after the
    last quantizer, see :func:`step_outputs`) are left out."""
    pairs = [(i, _finite_sqnr(f, g)) for i, (f, g) in enumerate(zip(forced, got))
             if g.dtype.kind == "f" and f.size and i not in skip and f.shape == g.shape]
    unmatched = sum(n for _, (_, n) in pairs)
    if unmatched:
        report.failures.append(f"{unmatched} output value(s) computed from onnxruntime's own activation codes are "
                               "NaN or inf on one side only: the layers after the last quantizer do not compute what "
                               "the simulation does")
    scores = [score for _, (score, _) in pairs]
    for i in sorted(skip):  # after a step: only a value within float rounding of a threshold may land elsewhere
        if i < min(len(forced), len(got)) and forced[i].size and forced[i].shape == got[i].shape:
            f, g = np.asarray(forced[i]), np.asarray(got[i])
            if g.dtype.kind == "f":
                finite = np.isfinite(f) & np.isfinite(g)
                scale = float(np.abs(f[finite]).max()) if finite.any() else 0.0
                differ = ~((np.abs(f.astype(np.float64) - g) <= 1e-4 * max(scale, 1e-30)) | (f == g)
                           | (np.isnan(f) & np.isnan(g)))  # NaN on both sides (where(z > 0, z, nan)) agrees
            else:
                differ = f != g
            share = float(differ.mean())
            report.extra.setdefault("step_output_mismatch", {})[i] = share
            if share > STEP_OUTPUT_MISMATCH:
                report.failures.append(f"{100 * share:.2f}% of the values of output {i} (after a step operation "
                                       "such as argmax, round or a comparison) differ from the simulation's computed "
                                       f"from onnxruntime's own activation codes (> {100 * STEP_OUTPUT_MISMATCH:g}%)")
    for i, (f, g) in enumerate(zip(forced, got)):  # integers from integers (ids != 7): exact on both sides
        if g.dtype.kind != "f" and i not in skip and f.size and f.shape == g.shape:
            differ = int((np.asarray(f) != np.asarray(g)).sum())
            if differ:
                report.failures.append(f"{differ} value(s) of output {i} (integers computed from integers, exact on "
                                       "both sides) differ from the simulation's")
    if not scores:
        return
    worst = min(scores)
    report.extra["forced_sqnr_db"] = worst
    report.thresholds["min_forced_sqnr"] = min_forced_sqnr
    if min_forced_sqnr is None or worst >= min_forced_sqnr:
        return
    low = [(i, score) for i, (score, _) in pairs if score < min_forced_sqnr]
    wide = forced64() if forced64 is not None else None
    bounds = {i: min_forced_sqnr for i, _ in low}
    if wide is not None:  # how far float32 rounding alone takes each output of the simulation (from the same codes)
        for i, _ in low:
            if i < len(wide) and np.shape(wide[i]) == np.shape(forced[i]):
                own = _finite_sqnr(wide[i], forced[i])[0]
                report.extra.setdefault("forced_rounding_sqnr_db", own)
                report.extra["forced_rounding_sqnr_db"] = min(own, report.extra["forced_rounding_sqnr_db"])
                if own >= ROUNDING_SCALE_MIN_DB:
                    bounds[i] = min(min_forced_sqnr, own - FORCED_ROUNDING_MARGIN_DB)
    failing = [(score, i) for i, score in low if score < bounds[i]]
    if failing:
        score, i = min(failing)
        report.failures.append(f"the outputs computed from onnxruntime's own activation codes differ from the "
                               f"simulation's (output {i}: SQNR {score:.1f} dB < {bounds[i]:.4g} dB): the layers "
                               "after the last quantizer do not compute what the simulation does")


# An output after a step operation (argmax, round, comparisons) may differ where float rounding moves a value across
# the step; computed from the file's own codes, more than this share of its values differing is a wrong file.
STEP_OUTPUT_MISMATCH = 0.02


# One quantizer whose codes differ on identical inputs beyond this share (and beyond LAYER_CODE_MIN codes) fails the
# validation whatever the model-wide share: float accumulation order moves a value across a threshold about once in
# 10^5-10^6 codes (at most 8 of 26.9 M codes in the architecture benchmark), a wrong file moves most of them.
LAYER_CODE_MISMATCH = 0.01
LAYER_CODE_MIN = 10
# One channel (index along dimension 1, or the last) of one quantizer beyond this share, and beyond
# CHANNEL_CODE_MIN codes: one changed weight of a 4-bit conv moved a quarter of its output channel's codes, under 1%
# of the layer's and 0.1% of the model's, and passed; one level up moved 4.3-4.7% of its channel, and three weights
# of a Linear row 10 of its 32 codes. A genuine file has a handful of such codes in the whole model, scattered
# (at most 33 of 35 M in a 38-compile torchvision sweep, none near these bounds in one channel).
CHANNEL_CODE_MISMATCH = 0.02
CHANNEL_CODE_MIN = LAYER_CODE_MIN  # a code whose accumulator sits on a rounding tie flips wherever it recurs: 4 of a
# channel's 192 codes on 3 real digits images, a flipped sample given 4 times: genuine files


# A code that differs on identical inputs only because the simulation's input lies within this relative distance
# of the threshold between the two codes is float drift (32 float32 ulps; onnxruntime's GRU gave 1.0000005 where
# PyTorch's gave 1.0, on a tie of a uniform grid whose zero point put 1.0 at 127.5 steps).
TIE_TOLERANCE = 2.0 ** -18
# A code that differs on identical inputs with the simulation's input beyond this relative distance of the threshold
# (the floor as below: 2^-18 alpha) is no float rounding of any order
FAR_TOLERANCE = 2.0 ** -12
# ... and one quantizer with more such codes than this share of its codes (and more than LAYER_CODE_MIN) fails the
# validation: a genuine file has none on this CPU (0 in every digits, tabular and vision validation measured; 7 of
# 26.9 M codes within LAYER_CODE_MISMATCH in the architecture benchmark), while a scale off by 0.1% or one 8-bit
# weight code off by one moved 142-8136 codes of one quantizer (0.03-1.6%) past this distance, under the bounds above
# (the validation passed files at 34.5 dB from their simulation). Saturating uint8 x int8 pairs on a CPU without
# VNNI (a file compiled on another machine) move codes that far too: the file computes something else there.
FAR_CODE_MISMATCH = 1e-4
# ... and at least this share of the quantizer's range alpha (with TIE_TOLERANCE: 2^-24 alpha, one float32 ulp at
# the range): a sum of terms of the range's size that cancels to ~1e-9 differs between any two summation orders by
# about that much, which PoT levels (down to 2^-30 of the range at 6 bits) resolve into other codes (a random net's
# signed PoT-6 input after a Mish: 0.7 % of one quantizer's codes on identical inputs, values of +-1e-8, range 1.35)
DRIFT_FLOOR = 2.0 ** -6


# ops whose weight input the weight check reads, and the shape-only ops it looks through to the dequantization
_WEIGHT_READERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "LSTM", "GRU", "RNN"}
_SHAPE_ONLY = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Identity", "Flatten"}
_DEQUANTIZERS = {("", "DequantizeLinear"), ("qcompile", "DequantizeLevels")}
# share of a weight's values (sorted) past float rounding up to which a file tensor of the same size is taken for
# that weight, edited: beyond it the tensor is another one (a lowered layer's tables) and the weight goes unchecked
WEIGHT_MATCH_SHARE = 0.5


def file_weights(model: onnx.ModelProto) -> dict:
    """The dequantized weight tensors of ``model`` (the outputs of its DequantizeLinear / DequantizeLevels nodes on
    constants that layers read), computed by onnxruntime from the file's own initializers."""
    import onnx

    g = model.graph
    nodes, const = _constant_nodes(model)
    producer = {o: n for n in g.node for o in n.output}
    wanted = []
    for n in g.node:
        if n.op_type not in _WEIGHT_READERS:
            continue
        for name in n.input:
            src = producer.get(name)
            while src is not None and src.op_type in _SHAPE_ONLY and src.input and src.input[0] in const:
                name, src = src.input[0], producer.get(src.input[0])
            if src is not None and (src.domain, src.op_type) in _DEQUANTIZERS and name in const and name not in wanted:
                wanted.append(name)
    return _constant_values(model, nodes, wanted, onnx.TensorProto.FLOAT)


def _constant_values(model: onnx.ModelProto, nodes: list, wanted: list, elem_type: int) -> dict:
    """The values of the constant tensors ``wanted`` (of ``elem_type``), computed by onnxruntime from ``nodes``
    (the file's nodes that read only initializers and constants) and the initializers they read."""
    import onnx
    from onnx import helper

    if not wanted:
        return {}
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "weights", [], [helper.make_tensor_value_info(w, elem_type, None)
                                                     for w in wanted],
                              [t for t in model.graph.initializer if t.name in used])
    probe = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    probe.functions.extend(model.functions)
    sess = session(probe.SerializeToString(), level=ort_disable_all())
    return dict(zip(wanted, sess.run(None, {})))


def _constant_nodes(model: onnx.ModelProto) -> tuple[list, set]:
    """The nodes of ``model`` that compute from initializers and constants only, and the names they make."""
    const = {t.name for t in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        if n.op_type == "Constant" or (n.input and all(i == "" or i in const for i in n.input)):
            nodes.append(n)
            const.update(o for o in n.output if o)
    return nodes, const


def lowered_weights(model: onnx.ModelProto) -> dict:
    """The integer weights of the layers lowered to shifts and adds (``--emit shift-add``), by the layer's module
    name: ``sum over term groups (e, s) of s * 2**e * mask`` with the 0/1 masks the region's ``ConvInteger`` /
    ``MatMulInteger`` reads (onnxruntime computes them from the stored level indices), ``[O, C/g, k...]`` for a
    convolution and ``[C, O]`` for a matmul. The file has no dequantized weight tensor of such a layer: without
    this, an edited weight code there was left to the activation codes (51.6-58.2 dB from the unedited file, and
    the validation passed)."""
    import onnx

    from qcompile.lowering import lowered_layers

    records = lowered_layers(model)
    if not records:
        return {}
    by_name = {n.name: n for n in model.graph.node}
    nodes, const = _constant_nodes(model)
    todo = {}
    for rec in records:
        for name in rec.get("nodes", ()):
            n = by_name.get(name)
            if n is not None and n.op_type in ("ConvInteger", "MatMulInteger") and len(n.input) > 1 and \
                    n.input[1] in const:
                todo[n.input[1]] = (n, rec)
                break
    try:
        masks = _constant_values(model, nodes, list(todo), onnx.TensorProto.UINT8)
    except Exception:  # noqa: BLE001 -- masks onnxruntime cannot compute alone: those layers stay unchecked
        return {}
    out = {}
    for name, (node, rec) in todo.items():
        m = np.asarray(masks[name]).astype(np.int64)
        coef = np.array([int(s) * 2 ** int(e) for e, s in rec["groups"]], dtype=np.int64)
        n_terms = len(coef)
        try:
            if node.op_type == "ConvInteger":  # [g*G*Og, Cg, k...], group-major, then term group
                groups = next((a.i for a in node.attribute if a.name == "group"), 1)
                rest = m.shape[1:]
                m = m.reshape((groups, n_terms, m.shape[0] // (groups * n_terms)) + rest)
                w = np.tensordot(coef, m, axes=([0], [1])).reshape((-1,) + rest)
            else:  # [C, G*O]
                m = m.reshape(m.shape[0], n_terms, -1)
                w = np.tensordot(coef, m, axes=([0], [1]))
        except ValueError:  # not the layout the lowering writes: unchecked
            continue
        out[rec.get("module") or rec["layer"]] = w
    return out


def ort_disable_all():
    import onnxruntime as ort

    return ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def weight_mismatches(model: onnx.ModelProto, sim) -> tuple[int, int, list]:
    """The simulation's quantized weights against the file's dequantized ones (:func:`file_weights`), matched as
    multisets of values (layouts differ: transposed Linear weights, recurrent gates): ``(checked, total, wrong)``
    with ``wrong`` as ``(quantizer, values differing, values)``. A weight with no file tensor of its size within
    ``WEIGHT_MATCH_SHARE`` is not checked; a layer lowered to shifts and adds is checked on its integer codes
    (:func:`lowered_weights`). The activation codes catch a weight
    edit only where it moves a code past a threshold on the inputs given: one 8-bit weight code off by one, or one
    channel's scale x1.001, passed at 41-44 dB on 32 inputs."""
    from qcompile.qmodules import FakeQuantize

    mods = dict(sim.named_modules())
    weights = {}  # quantizer -> the parameter it quantizes (quantized one at a time below: one layer's copy at once)
    for n in sim.graph.nodes:
        fq = mods.get(n.target) if n.op == "call_module" else None
        if isinstance(fq, FakeQuantize) and fq.role == "weight" and getattr(n.args[0], "op", None) == "get_attr":
            w = _attr(sim, n.args[0].target)
            if isinstance(w, torch.Tensor) and w.is_floating_point():
                weights.setdefault(n.target, (fq, w))
    if not weights:
        return 0, 0, []
    files = file_weights(model)
    lowered = lowered_weights(model)
    by_size: dict = {}
    for a in files.values():
        by_size.setdefault(a.size, []).append(a)
    checked, wrong = 0, []
    for name, (fq, param) in weights.items():
        with torch.no_grad():
            w = fq(param.detach().float()).numpy()
        tol = 1e-5 * max(float(np.abs(w).max()), 1e-30)
        candidates = by_size.get(w.size, [])
        layouts = [lambda c: c.reshape(w.shape)]  # the same layout, or a Linear's weight as MatMul's (transposed)
        if w.ndim == 2:
            layouts.append(lambda c: c.reshape(w.shape[::-1]).T)
        def same(a, b=w, tol=tol):  # a few values first: most candidates of the same size are other layers
            a = np.asarray(a)
            head = tuple(slice(0, 2) for _ in range(a.ndim))
            return float(np.abs(a[head] - b[head]).max()) <= tol and float(np.abs(a - b).max()) <= tol

        if any(same(f(c)) for c in candidates for f in layouts):
            checked += 1
            continue
        ws = np.sort(w.ravel())
        best = min((int((np.abs(np.sort(c.ravel()) - ws) > tol).sum()) for c in candidates), default=None)
        if best is None or best > WEIGHT_MATCH_SHARE * w.size:
            best = _lowered_mismatch(fq, param, name, lowered) if lowered else None
            if best is None:
                continue  # no tensor of the file is this weight
        checked += 1
        if best:
            wrong.append((name, best, w.size))
    return checked, len(weights), wrong


def _lowered_mismatch(fq, param, name: str, lowered: dict):
    """How many of a weight's integer codes differ from those of its layer lowered to shifts and adds
    (:func:`lowered_weights`), in the same layout (a matmul's transposed) or else as multisets; None where no
    lowered layer is this weight. (The codes, not the scales: a scale edit moves the rescale, which the outputs
    and activation codes see.)"""
    with torch.no_grad():
        codes = fq.quantize(param.detach().float()).numpy().astype(np.int64)
    module = name[: -len(".weight_fq")] if name.endswith(".weight_fq") else name
    found = [lowered[module]] if module in lowered and lowered[module].size == codes.size else \
        [a for a in lowered.values() if a.size == codes.size]
    best = None
    for a in found:
        if a.shape == codes.shape:
            diff = int((a != codes).sum())
        elif codes.ndim == 2 and a.shape == codes.shape[::-1]:
            diff = int((a.T != codes).sum())
        else:
            diff = int((np.sort(a.ravel()) != np.sort(codes.ravel())).sum())
        best = diff if best is None else min(best, diff)
    return best if best is not None and best <= WEIGHT_MATCH_SHARE * codes.size else None


def _attr(module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _worst_quantizer(stats: dict, key: str, bound: float | None):
    """``(share, name, stats, more)`` of the quantizer with the largest share of ``key`` codes (those differing on
    identical inputs, or beyond float rounding) past ``bound`` and ``LAYER_CODE_MIN``; None where none is."""
    if bound is None:
        return None
    worst = [(s[key] / s["codes"], name, s) for name, s in stats.items()
             if s["codes"] and s[key] > LAYER_CODE_MIN and s[key] > bound * s["codes"]]
    if not worst:
        return None
    share, name, s = max(worst, key=lambda w: w[0])
    return share, name, s, (f" (and {len(worst) - 1} more quantizer(s))" if len(worst) > 1 else "")


@contextlib.contextmanager
def _quiet_fx_errors():
    """torch.fx prints the generated code's traceback to stderr before it raises from a GraphModule: a float64
    second run that some op refuses (and whose failure only means "no float64 scale") printed 24 lines beside a
    verdict."""
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _drift(fq, x: torch.Tensor, ort_codes: torch.Tensor, to_codes, tolerance: float = None) -> torch.Tensor:
    """Where onnxruntime's code is one the quantizer ``fq`` gives a value within float rounding of its own input
    ``x`` (``|d| <= TIE_TOLERANCE · max(|x|, DRIFT_FLOOR · alpha)``): ``Q(x - d) <= code <= Q(x + d)``, the
    quantizer being monotone. Any level set: adjacent APoT/PoT levels are several grid integers apart, and near 0 a
    value whose sign float rounding decides may land several levels away."""
    floor = DRIFT_FLOOR * float(fq.alpha.detach().abs().max())
    # in x's own type (an int8 layer's exact float64 output)
    d = (TIE_TOLERANCE if tolerance is None else tolerance) * x.abs().clamp(min=floor)
    lo, hi = (to_codes(fq.simulate(x + sign * d)) for sign in (-1.0, 1.0))
    return (ort_codes >= torch.minimum(lo, hi)) & (ort_codes <= torch.maximum(lo, hi))


# input values per batch of validate_quantized (default batch size): one 224x224 image. With 2**20 (six such images)
# ResNet-50's compile of 32 images peaked at 2.5-2.7 GB above the model, all of it in validation, with 2**18 at
# 0.95 GB in the same time (17-20 s); MobileNetV2 1.1-1.2 GB -> 0.36 GB (5.6-7.1 s either way, noise)
VALIDATION_BATCH_VALUES = 1 << 18


# float activation values per batch (the traced graph's, per sample): BERT-base at 128 tokens (~50 M a sample),
# 32 samples at W8A8: 2**29 gave batches of 8, 7.0 GB above the model and 74 s; 2**27 batches of 2, 3.6 GB, 62 s
VALIDATION_BATCH_ACTIVATIONS = 1 << 27


def _activation_values(sim) -> int:
    """Float values the traced graph computes per sample (its nodes' recorded shapes), 0 where unknown."""
    import math

    total = 0
    for node in getattr(getattr(sim, "graph", None), "nodes", ()):
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if node.op in ("call_module", "call_function", "call_method") and shape and int(shape[0]) > 0 and \
                getattr(meta, "dtype", torch.int64).is_floating_point:
            total += math.prod(int(v) for v in shape) // int(shape[0])
    return total


def validation_batch_size(inputs, sim=None) -> int:
    """Samples per batch of :func:`validate_quantized`: about ``VALIDATION_BATCH_VALUES`` input values, from 1 to
    64. It holds every quantizer's output twice over per batch (the simulation's, and its float run's or
    onnxruntime's): 32 ResNet-50 images at 224x224 in one batch of 64 peaked at 11.0 GB and took 85 s to validate,
    in batches of 8 5.3 GB and 31 s, with the same report; one image per batch holds least."""
    parts = inputs if isinstance(inputs, tuple) else (inputs,)
    per_sample = sum(int(t[:1].numel()) for t in parts if isinstance(t, torch.Tensor) and t.dim() > 0)
    batch = VALIDATION_BATCH_VALUES // max(per_sample, 1)
    if sim is not None:  # and by the activations of ``sim``: 128 token ids are a small input, BERT-base's 37 M
        # activation values per sample are not (32 samples in one batch peaked at 20 GB, in batches of 8 9.7 GB)
        batch = min(batch, VALIDATION_BATCH_ACTIVATIONS // max(_activation_values(sim), 1))
    return int(max(1, min(64, batch)))


def _count_channels(channels: dict, wrong: torch.Tensor) -> None:
    """Add the codes that differ (``wrong``, bool) per index of dimension 1 and of the last dimension (a conv's
    channels, a linear layer's features) to ``channels``: (dimension, index, size of that dimension) -> codes that
    differ. Only indices with a difference are kept."""
    if wrong.dim() < 2 or not bool(wrong.any()):
        return
    for dim in {1, wrong.dim() - 1}:
        counts = wrong.movedim(dim, 0).reshape(wrong.shape[dim], -1).sum(dim=1)
        for index in counts.nonzero().flatten().tolist():
            key = (dim, index, wrong.shape[dim])
            channels[key] = channels.get(key, 0) + int(counts[index])


def _with_weight_memo(fn):
    """Run ``fn`` with the simulation's weight quantizers and int8 weight codes computed once
    (``qcompile.qmodules.weight_memo``): it runs the simulation several times per batch."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from qcompile.qmodules import weight_memo

        with weight_memo():
            return fn(*args, **kwargs)
    return wrapper


@_with_weight_memo
def validate_quantized(onnx_file, sim, inputs, float_model: Callable | None = None, batch_size: int | None = None,
                       min_sqnr: float | None = None, max_abs: float | None = None, min_top1: float | None = None,
                       max_code_mismatch: float | None = 1e-3,
                       min_forced_sqnr: float | None = MIN_FORCED_SQNR_DB,
                       max_layer_code_mismatch: float | None = LAYER_CODE_MISMATCH,
                       max_far_code_mismatch: float | None = FAR_CODE_MISMATCH,
                       check_weights: bool = True) -> ValidationReport:
    """Validate a quantized ONNX file against its simulation ``sim`` (a GraphModule with FakeQuantize modules).

    Beyond the output comparison, for every activation quantizer:

    - the integer codes that differ between onnxruntime and the simulation, run side by side (``codes_differ``):
      one code that flips near a threshold changes everything downstream of it, so in a deep float network this
      count grows with depth;
    - the codes that differ when every quantizer reads onnxruntime's own upstream codes (``codes_differ_local``,
      a teacher-forced second run, made only for batches where a code differed): only float accumulation order
      near a decision threshold can make these differ. The validation fails when more than ``max_code_mismatch``
      of them do, or when more than ``max_layer_code_mismatch`` of one quantizer's codes (and more than
      ``LAYER_CODE_MIN`` codes) do: the model-wide fraction alone let a small quantizer be wrong everywhere in a
      model whose attention tensors hold millions of codes;
    - the SQNR of the quantized activation against the float model's activation at that point: the same graph
      run with its quantizers passed through and the float values back in the parameters that passes moved for
      the quantized model (bias correction, the bias grid, pair-safe weights; ``passes.base.float_parameters``),
      the per-layer view of where the error grows.

    And the weights: every weight quantizer's values in the simulation against the file's dequantized weight
    tensors (:func:`weight_mismatches`; ``check_weights=False`` leaves them out).

    And the outputs: recomputed from onnxruntime's own codes (the teacher-forced run; the side-by-side one where no
    code differed), the simulation's floating outputs may differ from the file's only by float rounding after the
    last quantizer; below ``min_forced_sqnr`` dB the validation fails (codes alone say nothing of what follows
    the last quantizer). A file without activation quantizers is held to the same bound, side by side.

    ``float_model``: the float model the file's outputs are compared with (SQNR, top-1 agreement), or its outputs
    from :func:`float_outputs`. ``batch_size``: samples per run; by default :func:`validation_batch_size` (about a
    quarter million input values).
    """
    import onnx

    from qcompile.emit import activation_map
    from qcompile.qmodules import FakeQuantize, disabled_quantizers
    from qcompile.passes.base import float_parameters

    _check_arguments(onnx_file, sim, inputs, {"min_sqnr": min_sqnr, "max_abs": max_abs, "min_top1": min_top1,
                                              "batch_size": batch_size, "max_code_mismatch": max_code_mismatch})
    inputs = as_inputs(inputs)
    if batch_size is None:
        batch_size = validation_batch_size(inputs, sim)
    _check_runnable(inputs, batch_size)
    source = model_source(onnx_file)
    # from a path with onnx.load: a file saved with external data has its tensors read from beside it (from the
    # bytes alone onnxruntime looked in the working directory: "External data path ... escapes")
    model_bytes = source if isinstance(source, bytes) else onnx.load(source).SerializeToString()
    got = run_onnx(model_bytes, inputs, batch_size)
    parsed = onnx.load_from_string(model_bytes)  # parsed once (each parse is a copy of the weights), then dropped
    act_map = activation_map(parsed)
    weights_checked, weights_total, weights_wrong = 0, 0, []
    if check_weights:
        try:
            weights_checked, weights_total, weights_wrong = weight_mismatches(parsed, sim)
        except Exception as e:  # noqa: BLE001 -- a graph whose weights onnxruntime cannot compute alone: unchecked
            first = str(e).splitlines()[0][:160] if str(e) else ""
            weights_note = f"weights not compared ({type(e).__name__}: {first})"
        else:
            weights_note = None

    modules = dict(sim.named_modules())
    acts = [a for a in act_map if isinstance(modules.get(a["module"]), FakeQuantize)]
    if not acts:
        del parsed
        ref = run_reference(sim, inputs, batch_size)
        report = compare_outputs(ref, got, min_sqnr=min_sqnr, max_abs=max_abs, min_top1=min_top1,
                                 samples=_sample_count(inputs))
        _forced_check(report, ref, got, min_forced_sqnr, step_outputs(sim))
    else:
        # One simulation run per batch gives both the reference outputs and the codes; the float run of the
        # same graph uses float32 layers (the float64 of int8 layers only serves exact accumulators).
        float_graph = _float_layers(sim)
        ref_parts: list[list[np.ndarray]] = []
        forced_parts: list[list[np.ndarray]] = []  # outputs from onnxruntime's codes
        pairs = saturating_pairs(parsed)  # 0: exact on every onnxruntime CPU
        probe = session(_onnx_with_outputs(parsed, [a["tensor"] for a in acts]))
        del parsed
        out_names = [o.name for o in probe.get_outputs()]
        stats = {a["module"]: {"codes": 0, "differ": 0, "local": 0, "far": 0, "sig": 0.0, "noise": 0.0, "channels": {},
                               "own_sig": 0.0, "own_noise": 0.0}
                 for a in acts}
        own_run = [False]  # the simulation's own run: each quantizer's output against its own input
        shapes: dict[str, tuple] = {}  # quantizer -> (the file's shape, the simulation's) where they differ
        captured: dict[str, torch.Tensor] = {}  # each quantizer's output in the last run
        captured_in: dict[str, torch.Tensor] = {}  # each quantizer's input in the last teacher-forced run
        forced: dict[str, torch.Tensor] = {}    # outputs to substitute (onnxruntime's), in a teacher-forced run
        hooks = []
        for a in acts:
            fq = modules[a["module"]]

            def hook(mod, inp, out, name=a["module"]):
                # a copy: an in-place op downstream (Hardswish(inplace=True), SiLU, ReLU) rewrites `out` later
                captured[name] = out.detach().clone()
                if own_run[0] and inp and isinstance(inp[0], torch.Tensor) and inp[0].shape == out.shape:
                    _own_error(stats[name], inp[0].detach().float(), captured[name].float(), saturation.get(name))
                if forced and inp and isinstance(inp[0], torch.Tensor):  # the input the teacher-forced run decided on
                    captured_in[name] = inp[0].detach().clone()
                return forced.get(name)  # None keeps the simulation's own output
            hooks.append(fq.register_forward_hook(hook))

        inverse_units = {a["module"]: float(modules[a["module"]].levelset.denom) / modules[a["module"]].alpha.float()
                         for a in acts}

        def codes(name: str, values: torch.Tensor) -> torch.Tensor:
            # values are float32(code − Z)·unit with |code − Z| < 2**16: times 1/unit (float32, off by an ulp or
            # two) they are within 1e-4 of the integers code − Z, which round() restores. Both sides of every
            # comparison subtract the same Z, so it is left out; one multiply and one round, in place.
            out = values.float() * inverse_units[name]
            return out.round_()

        saturation = {a["module"]: getattr(sim.get_submodule(a["module"]), "saturation", None) for a in acts}
        try:
            with torch.no_grad():
                for batch in batches(inputs, batch_size):
                    with disabled_quantizers(sim), float_parameters(sim):
                        float_graph(*batch)  # the float model: no quantizer, the biases before bias correction
                    floats = dict(captured)  # float activations at each point
                    own_run[0] = True
                    try:
                        ys = output_tensors(sim(*batch))
                    finally:
                        own_run[0] = False
                    ref_parts.append([t.detach().float().numpy() for t in ys])
                    forced_parts.append(ref_parts[-1])
                    # The batch's activations are held at most twice at once (the float run's and the simulation's,
                    # then the simulation's and onnxruntime's), each quantizer's codes made when compared: with
                    # onnxruntime's outputs and all their codes beside both runs' ResNet-50's validation held four
                    # copies of every quantized activation of 6 images (its peak: 2.2 GB of the compile's 2.3)
                    against_float = {}
                    for a in acts:
                        q_out = captured[a["module"]]
                        f = floats[a["module"]].float()
                        if saturation.get(a["module"]) is not None:  # tanh/clip readers see no difference beyond
                            f = f.clamp(*saturation[a["module"]])
                        against_float[a["module"]] = (_sum_squares(f), _sum_squares(q_out.float() - f))
                        del f
                    del floats
                    onnx_out = dict(zip(out_names, run(probe, [b.numpy() for b in batch])))

                    def onnx_codes(a, out=onnx_out):
                        return codes(a["module"], torch.from_numpy(out[a["tensor"]]))

                    drifted = False
                    for a in acts:
                        s = stats[a["module"]]
                        q_out = captured[a["module"]]
                        ort_codes = onnx_codes(a)
                        if ort_codes.shape != q_out.shape:  # another graph: nothing to compare
                            shapes.setdefault(a["module"], (tuple(ort_codes.shape), tuple(q_out.shape)))
                            s["codes"] += q_out.numel()  # in the total, as codes of this quantizer
                            continue
                        differ = int((ort_codes != codes(a["module"], q_out)).sum())
                        del ort_codes
                        s["codes"] += q_out.numel()
                        s["differ"] += differ
                        drifted |= differ > 0
                        sig, noise = against_float[a["module"]]
                        s["sig"] += sig
                        s["noise"] += noise
                    if drifted:
                        # Teacher-forced: every quantizer reads what onnxruntime's upstream quantizers produced, so a
                        # code differs only where the two computations of its own input (float accumulation order)
                        # fall on either side of a decision threshold, not because an upstream code already did.
                        forced.update({a["module"]: torch.from_numpy(onnx_out[a["tensor"]]) for a in acts
                                       if a["module"] not in shapes})  # (of other shapes: the simulation's own)
                        try:
                            forced_parts[-1] = [t.detach().float().numpy() for t in output_tensors(sim(*batch))]
                        finally:
                            forced.clear()
                        for a in acts:
                            if a["module"] in shapes:
                                continue
                            sim_codes = codes(a["module"], captured[a["module"]])
                            ort_codes = onnx_codes(a)
                            wrong = ort_codes != sim_codes
                            x = captured_in.get(a["module"])
                            if bool(wrong.any()) and x is not None and x.shape == wrong.shape \
                                    and x.is_floating_point():
                                # Float drift, not a wrong file: onnxruntime's code is the code of a value within
                                # float rounding of the simulation's own input, Q(x - d) <= code <= Q(x + d) (the
                                # quantizer is monotone): values piled on a tie (a saturated GRU/LSTM/tanh output at
                                # exactly 1.0 on a grid whose 1.0 is a half step), or a sum that cancels to ~1e-9
                                # where PoT levels reach 2^-30 of the range (any two float orders differ there)
                                wrong &= ~_drift(modules[a["module"]], x, ort_codes,
                                                 lambda v, name=a["module"]: codes(name, v))
                                if bool(wrong.any()):
                                    far = wrong & ~_drift(modules[a["module"]], x, ort_codes,
                                                          lambda v, name=a["module"]: codes(name, v), FAR_TOLERANCE)
                                    stats[a["module"]]["far"] += int(far.sum())
                            elif bool(wrong.any()):
                                stats[a["module"]]["far"] += int(wrong.sum())
                            stats[a["module"]]["local"] += int(wrong.sum())
                            _count_channels(stats[a["module"]]["channels"], wrong)
        finally:
            for h in hooks:
                h.remove()
        ref = join_batches(ref_parts, _batch_sizes(inputs, batch_size))
        report = compare_outputs(ref, got, min_sqnr=min_sqnr, max_abs=max_abs, min_top1=min_top1,
                                 samples=_sample_count(inputs))
        def forced64():
            """The outputs of the simulation computed in float64 from onnxruntime's codes (None where it does not
            run in float64)."""
            import copy

            from qcompile.api import _random_draws

            if _random_draws(sim):  # its float64 run draws other numbers: no rounding scale from it
                return None
            try:
                sim64 = copy.deepcopy(sim).double()
            except Exception:  # noqa: BLE001 -- a module that cannot be copied: no float64 scale
                return None
            mods64 = dict(sim64.named_modules())
            sub: dict[str, torch.Tensor] = {}
            hooks64 = [mods64[a["module"]].register_forward_hook(lambda m, i, o, name=a["module"]: sub.get(name))
                       for a in acts if a["module"] in mods64 and a["module"] not in shapes]
            parts = []
            try:
                with torch.no_grad():
                    for batch in batches(inputs, batch_size):
                        onnx_out = dict(zip(out_names, run(probe, [b.numpy() for b in batch])))
                        sub.clear()
                        sub.update({a["module"]: torch.from_numpy(onnx_out[a["tensor"]]).double() for a in acts
                                    if a["module"] not in shapes})
                        with _quiet_fx_errors():
                            ys = output_tensors(sim64(*(t.double() if t.is_floating_point() else t for t in batch)))
                        parts.append([t.detach().double().numpy() for t in ys])
                        # the float32 simulation twice more: a model whose outputs move between runs (dropout
                        # left on, noise in a leaf module) has no rounding scale
                        runs = [[t.detach().float().numpy() for t in output_tensors(sim(*batch))] for _ in range(2)]
                        if not all(np.array_equal(a, b, equal_nan=True) for a, b in zip(*runs)):
                            return None
            except Exception:  # noqa: BLE001 -- an op pinned to float32: no float64 scale
                return None
            finally:
                for h in hooks64:
                    h.remove()
            return join_batches(parts, _batch_sizes(inputs, batch_size))

        _forced_check(report, join_batches(forced_parts, _batch_sizes(inputs, batch_size)), got, min_forced_sqnr,
                      step_outputs(sim), forced64=forced64)
        total = sum(s["codes"] for s in stats.values())
        differ = sum(s["differ"] for s in stats.values())
        local = sum(s["local"] for s in stats.values())
        places = quantizer_places(sim)
        for name, s in stats.items():
            sq = math.inf if s["noise"] == 0 else 10 * math.log10(max(s["sig"], 1e-300) / s["noise"])
            own = None if not s["own_sig"] and not s["own_noise"] else math.inf if s["own_noise"] == 0 else \
                10 * math.log10(max(s["own_sig"], 1e-300) / s["own_noise"])
            report.layers.append({"quantizer": name, "where": places.get(name, ""), "codes": s["codes"],
                                  "codes_differ": s["differ"], "codes_differ_local": s["local"],
                                  "codes_differ_far": s["far"],
                                  "sqnr_vs_float_db": sq, "own_sqnr_db": own})
        frac = differ / total if total else 0.0
        frac_local = local / total if total else 0.0
        report.extra["codes_total"] = total
        report.extra["codes_differ"] = differ
        report.extra["code_mismatch"] = frac
        report.extra["codes_differ_local"] = local
        report.extra["code_mismatch_local"] = frac_local
        report.extra["codes_differ_far"] = sum(s["far"] for s in stats.values())
        report.extra["saturating_pairs"] = pairs
        for name, (theirs, ours) in shapes.items():
            report.failures.append(f"activation quantizer {name!r}: the file's tensor has shape {list(theirs)}, the "
                                   f"simulation's {list(ours)} (the file computes another graph)")
        hint = None  # why codes may differ on this machine: said once, after the first failure on codes
        if max_code_mismatch is not None and frac_local > max_code_mismatch:
            hint = _saturation_hint(model_bytes)
            report.failures.append(f"{100 * frac_local:.3f}% of activation codes differ on identical inputs "
                                   f"(> {100 * max_code_mismatch:.2f}%)" + hint)
        for key, bound, what in (("local", max_layer_code_mismatch, ""),
                                 ("far", max_far_code_mismatch, " by more than float rounding moves a value")):
            worst = _worst_quantizer(stats, key, bound)
            if worst is None:
                continue
            share, name, s, more = worst
            tail = ": the file computes another layer or quantizer there than the simulation" if key == "far" else ""
            report.failures.append(f"{s[key]} of the {s['codes']} codes of activation quantizer {name!r} "
                                   f"({100 * share:.3g}%) differ on identical inputs{what} "
                                   f"(> {100 * bound:g}% of one quantizer){more}{tail}"
                                   + (_saturation_hint(model_bytes) if hint is None else ""))
            hint = hint if hint is not None else ""  # said once
        if max_layer_code_mismatch is not None and CHANNEL_CODE_MISMATCH is not None:
            bad = []  # (share, quantizer, dimension, index, differ, codes)
            worst = None
            for name, s in stats.items():
                for (dim, index, size), wrong in s["channels"].items():
                    count = s["codes"] // size  # codes of one index, over every batch
                    entry = (wrong / count, name, dim, index, wrong, count)
                    worst = entry if worst is None or entry > worst else worst
                    if wrong > CHANNEL_CODE_MIN and wrong > CHANNEL_CODE_MISMATCH * count:
                        bad.append(entry)
            if worst is not None:  # the channel with the largest share of codes differing on identical inputs
                report.extra["worst_channel"] = dict(zip(("share", "quantizer", "dim", "index", "differ", "codes"),
                                                         worst))
            if bad:
                share, name, dim, index, wrong, count = max(bad)
                more = len({b[1] for b in bad}) - 1
                report.failures.append(f"{wrong} of the {count} codes of channel {index} (dimension {dim}) of activation "
                                       f"quantizer {name!r} ({100 * share:.1f}%) differ on identical inputs "
                                       f"(> {100 * CHANNEL_CODE_MISMATCH:g}% of one channel and > {CHANNEL_CODE_MIN})"
                                       + (f" (and {more} more quantizer(s))" if more else "")
                                       + (_saturation_hint(model_bytes) if hint is None else ""))
    report.extra["weights_checked"] = weights_checked
    report.extra["weights_total"] = weights_total
    if check_weights and weights_note:
        report.extra["weights_note"] = weights_note
    if weights_wrong:
        name, differ, size = max(weights_wrong, key=lambda w: w[1] / w[2])
        more = f" (and {len(weights_wrong) - 1} more)" if len(weights_wrong) > 1 else ""
        report.failures.append(f"the quantized weights of {name!r} differ from the simulation's in {differ} of their "
                               f"{size} values{more}: the file holds other weights than the model it was compiled "
                               "from computes")
    if float_model is not None and not report.extra.get("shape_mismatch"):
        if not isinstance(float_model, FloatOutputs):
            float_model = float_outputs(float_model, inputs, batch_size)
        fl, kinds = float_model.outputs, float_model.floating
        # the worst float output (an integer output, argmax say, has no SQNR), over the entries finite in both
        scores = []
        wrong = [f"output {i}: the file's shape {list(t.shape)}, the float model's {list(r.shape)}"
                 for i, (r, t) in enumerate(zip(fl, got)) if r.shape != t.shape]
        if wrong:  # at another size than the example's (--dynamic-axes), a graph that fixed a size: "could not be
            # broadcast" from the comparison below, an internal error
            report.failures.append("; ".join(wrong))
            fl = got = ()
        for i, (r, t) in enumerate(zip(fl, got)):
            if i < len(kinds) and kinds[i]:
                finite = np.isfinite(r) & np.isfinite(t)
                if finite.any():
                    scores.append((sqnr_db(r[finite], t[finite]), i))
        floats = [r for i, r in enumerate(fl) if i < len(kinds) and kinds[i] and r.size]
        if floats and all(float(np.ptp(r)) == 0.0 for r in floats) and len({float(r.flat[0]) for r in floats}) == 1:
            # torchvision's vit_b_16(weights=None) starts its head at zero: "SQNR inf, top-1 100 %" said nothing
            report.extra["float_output_constant"] = float(floats[0].flat[0])
        if scores:
            worst, index = min(scores)
            report.extra["sqnr_vs_float_db"] = worst
            if len(fl) > 1:
                report.extra["sqnr_vs_float_output"] = index
        top = next((i for i, (r, k) in enumerate(zip(fl, kinds)) if k and r.ndim == 2 and r.shape[1] > 1), None)
        if top is not None:
            report.extra["top1_vs_float"] = float(np.mean(np.argmax(fl[top], 1) == np.argmax(got[top], 1)))
            report.extra["top1_classes"] = int(fl[top].shape[1])
            if len(fl) > 1:
                report.extra["top1_vs_float_output"] = top
    return report


def quantizer_places(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Where each activation quantizer sits, by layer: ``"input of layer3.conv2"`` (the layers reading its codes,
    through reshapes and pools) or ``"output of fc1"``. The report and the CLI named quantizers by internal ids
    (``act_fq6``) that nothing tied to the model's layers."""
    def layer_of(node):
        name = node.meta.get("layer") if isinstance(node, torch.fx.Node) else None
        return name if isinstance(name, str) else None

    from qcompile.qmodules import FakeQuantize

    def op_name(node) -> str:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            return {"Int8Mul": "mul", "Int8Sigmoid": "sigmoid", "Int8Add": "add",
                    "Int8GlobalAvgPool": "global pool"}.get(type(mod).__name__, type(mod).__name__.lower())
        return str(getattr(node.target, "__name__", node.target)).strip("_")

    def after(node) -> str:
        """" after sigmoid": the op the quantizer reads where that is not a layer (a SiLU's gate or product, an
        add, a pool), so that the quantizers of one layer's output, its gate and its product read apart."""
        src = node.args[0] if node.args else None
        while isinstance(src, torch.fx.Node) and src.meta.get("qcompile_inserted") and src.args:
            src = src.args[0]  # a reshape qcompile added (a 3-D Linear's rows flattened): the model's op before it
        if not isinstance(src, torch.fx.Node) or src.op not in ("call_module", "call_function", "call_method") or \
                layer_of(src) is not None or \
                (src.op == "call_module" and isinstance(gm.get_submodule(src.target), FakeQuantize)):
            return ""
        return f" after {op_name(src)}"

    def writer(src):
        """The layer whose output reaches ``src`` through a few quantizers and other one-input nodes, or None."""
        for _ in range(4):
            if not isinstance(src, torch.fx.Node):
                return None
            if layer_of(src) is not None:
                return layer_of(src)
            src = src.args[0] if src.args else None
        return None

    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith(("act_fq", "out_fq", "res_fq", "pool_fq")):
            continue
        readers, frontier, seen = [], list(node.users), set()
        for _ in range(4):  # through a few non-layer nodes (flatten, pool, ReLU)
            nxt = []
            for u in frontier:
                if u in seen:
                    continue
                seen.add(u)
                name = layer_of(u)
                if name is not None:
                    readers.append(name)
                elif not (u.op == "call_module" and isinstance(gm.get_submodule(u.target), FakeQuantize)):
                    # another quantizer's codes are what the layers after it read: a conv's 8-bit output before
                    # a max-pool and the re-quantized input of the next layer were both "input of fc"
                    nxt.extend(u.users)
            frontier = nxt
        if readers:
            names = list(dict.fromkeys(readers))
            out[str(node.target)] = "input of " + ", ".join(names[:3]) + (" ..." if len(names) > 3 else "") + \
                after(node)
            continue
        src = node.args[0] if node.args else None
        for _ in range(4):
            if not isinstance(src, torch.fx.Node):
                break
            if layer_of(src) is not None:
                out[str(node.target)] = f"output of {layer_of(src)}{after(node)}"
                break
            operands = [a for a in src.args if isinstance(a, torch.fx.Node) and a.op != "get_attr"]
            if len(operands) > 1:  # a residual add (or a product): following its first operand named one layer
                names = list(dict.fromkeys(n for n in map(writer, operands) if n is not None))
                what = names[0] if len(names) == 1 else f"{op_name(src)}({', '.join(names)})"  # x * sigmoid(x): one
                out[str(node.target)] = f"output of {what}{after(node)}"
                break
            src = src.args[0] if src.args else None
    return out

