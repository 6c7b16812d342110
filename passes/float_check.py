"""RecordFloatOutputs / CheckFloatOutputs: the passes before calibration must not change what the model computes.

Folding BatchNorm and constants, equalizing channels, choosing layers and inserting (not yet calibrated) quantizers
keep the model's function up to float rounding: with every quantizer passing values through, the graph that reaches
``Calibrate`` computes the traced model's outputs. A rewrite that breaks this (a layer whose own forward is lost,
a fold into a weight its forward transforms) would give a file that matches its own simulation, so validation
passes, yet computes another function. ``RecordFloatOutputs`` (first in the quantization pipeline) runs the traced
graph on a couple of calibration samples; ``CheckFloatOutputs`` (just before ``Calibrate``) runs the prepared graph
on them, both with the quantizers passing values through and the same random seed, and stops the compile with one
line when an output moved by more than ``rtol`` of its largest magnitude. Neither changes the graph.
"""
from __future__ import annotations

import copy

import torch
import torch.fx

from .base import Pass, PassResult, calibration_inputs, data_batches, passes_run


_SEED_0 = torch.Generator().manual_seed(0).get_state()  # the CPU generator's state after torch.manual_seed(0)


def _outputs(gm: torch.fx.GraphModule, sample: tuple) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    from qcompile.qmodules import disabled_quantizers

    # a model that draws noise in forward draws the same noise in both runs: the CPU generator seeded with 0 for
    # the run and restored after it (setting a saved state: ~1 µs; torch.manual_seed: ~100 µs, it seeds every
    # device's generator)
    saved = torch.random.get_rng_state()
    torch.random.set_rng_state(_SEED_0)
    try:
        with torch.no_grad(), disabled_quantizers(gm):
            return [t.detach().double() for t in tree_leaves(gm(*sample)) if isinstance(t, torch.Tensor)]
    finally:
        torch.random.set_rng_state(saved)


# the float64 second opinion is recorded for models up to this many parameters (the graph is converted to float64
# and back in place: exact, but a transient copy of every weight)
_WIDE_PARAMS = 1 << 25
_EAGER_PARAMS = 1 << 20  # up to here computed at once (cheaper than copying the graph)


class RecordFloatOutputs(Pass):
    def __init__(self, data, samples: int = 2):
        super().__init__()
        self.data = data  # any form compile(calib=...) takes; read in call(), which knows the model's inputs
        self.samples = samples
        self.sample = None
        self.outputs: list[torch.Tensor] | None = None
        self.outputs64: list[torch.Tensor] | None = None  # the traced model computed in float64
        self._traced: torch.fx.GraphModule | None = None  # large models: a copy to compute outputs64 from if needed

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if self.data is not None:
            # calibration_inputs: a numpy array, float64 data, a DataLoader or a list of batches from build_passes
            # crashed here, where compile() had converted them
            self.sample = next(data_batches(calibration_inputs(self.data, gm), self.samples))
        if self.sample is None:  # no data (a hand-built data-free pipeline): inputs of the traced shapes
            self.sample = _traced_sample(gm)
            if self.sample is None:
                self.report.append("no data and no float inputs of known shape: nothing recorded, so "
                                   "CheckFloatOutputs checks nothing (RecordFloatOutputs(data))")
        if self.sample is not None:
            self.outputs = _outputs(gm, self.sample)
            params = sum(p.numel() for p in gm.parameters())
            if params <= _EAGER_PARAMS:
                self.outputs64 = _outputs64(gm, self.sample)
            elif params <= _WIDE_PARAMS:
                # the float64 run is needed only when the check finds a difference: keep the traced graph for it
                # (a copy: ~0.05 s on ResNet-18, where the run took 0.15 s of every compile)
                try:
                    self._traced = copy.deepcopy(gm)
                except Exception:  # noqa: BLE001 -- a module that cannot be copied: no second opinion
                    self._traced = None
        return PassResult(gm, False)

    def float64_outputs(self) -> list[torch.Tensor] | None:
        """The traced model's outputs on the sample computed in float64 (None where it does not run in float64)."""
        if self.outputs64 is None and self._traced is not None:
            self.outputs64 = _outputs64(self._traced, self.sample)
            self._traced = None
        return self.outputs64


def _traced_sample(gm: torch.fx.GraphModule):
    """Normal random inputs of the shapes the trace recorded (its batch: a model may fix it), or None where an input
    is not a float tensor of known shape (token ids, ``*args``): the check then has nothing to run on."""
    sample = []
    gen = torch.Generator().manual_seed(0)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if not hasattr(meta, "shape") or not getattr(meta, "dtype", torch.int64).is_floating_point \
                or len(meta.shape) == 0:
            return None
        sample.append(torch.randn(tuple(meta.shape), generator=gen).to(meta.dtype))
    return tuple(sample) or None


def _outputs64(gm: torch.fx.GraphModule, sample: tuple) -> list[torch.Tensor] | None:
    """``gm``'s outputs computed in float64: its float32 weights converted and, after the run, converted back
    (float32 -> float64 -> float32 is exact). None where the model does not run in float64."""
    import contextlib
    import io

    floats = [t for t in list(gm.parameters()) + list(gm.buffers()) if t.is_floating_point()]
    if any(t.dtype != torch.float32 for t in floats) or \
            any(type(m).__module__.startswith("qcompile.") for m in gm.modules() if m is not gm):
        return None  # quantizers already in (a QAT-trained model) hand float32 on
    try:
        gm.double()
        with contextlib.redirect_stderr(io.StringIO()):  # torch.fx prints a failing graph's code to stderr
            return _outputs(gm, tuple(t.double() if t.is_floating_point() else t for t in sample))
    except Exception:  # an op pinned to float32, a dtype check in forward: no second opinion
        return None
    finally:
        gm.float()


def _known_passes() -> tuple[set[str], set[str]]:
    """The names of qcompile's own passes, and of those among them that quantize (or move parameters for it)."""
    import qcompile.passes as ours

    names = {n for n in ours.__all__ if isinstance(getattr(ours, n, None), type) and issubclass(getattr(ours, n), Pass)}
    # what changes the numbers (quantizers placed but not calibrated pass values through: build_passes checks after
    # InsertQuantizers, QuantizeOutputs and QuantizeResiduals)
    quantizing = {"Calibrate", "AdaptiveRounding", "BiasCorrection", "QuantizeBias", "PairSafeInt8Weights",
                  "ShareInt8Params", "BindIntegerLayers", "BindIntegerAdds", "BindIntegerPools", "BindIntegerMuls",
                  "BindIntegerSigmoids", "AllocateWeightBits"} & names
    return names, quantizing


class CheckFloatOutputs(Pass):
    def __init__(self, record: RecordFloatOutputs, rtol: float = 1e-3):
        super().__init__()
        self.record = record
        self.rtol = rtol

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        from qcompile.errors import UserError

        ref = self.record.outputs
        if ref is None:  # it returned without a word: a reader took the graph for checked
            self.report.append("not checked: RecordFloatOutputs recorded no outputs (it has not run, or had no "
                               "inputs to run on)")
            return PassResult(gm, False)
        got = _outputs(gm, self.record.sample)
        problem = output_difference(ref, got, self.rtol)
        imprecise = bool(problem) and self._model_imprecise(gm, ref, got)
        self.record._traced = None  # the copy kept for that second opinion: not needed any more
        if imprecise:
            self.report.append(f"the model's own float32 outputs are off from float64 ({problem}); the prepared "
                               "graph's are not (a large constant that a BatchNorm removes, folded away)")
            return PassResult(gm, False)
        if problem:
            ours, quantizing = _known_passes()
            ran = passes_run(gm)
            since = ran[len(ran) - ran[::-1].index("RecordFloatOutputs"):] if "RecordFloatOutputs" in ran else ran
            foreign = [n for n in dict.fromkeys(since) if n not in ours and n != "CheckFloatOutputs"]
            late = [n for n in dict.fromkeys(since) if n in quantizing]
            if foreign:  # a pass of one's own in the pipeline: not qcompile's to answer for
                raise UserError(f"the graph no longer computes what the model does before quantization ({problem}) "
                                f"after the passes run since RecordFloatOutputs, {', '.join(foreign)} not qcompile's: "
                                "check what those change (CheckFloatOutputs compares with the float model)")
            if late:
                raise UserError(f"CheckFloatOutputs ran after {', '.join(late)}, which quantize or move parameters "
                                f"for quantization ({problem}): place it before InsertQuantizers, after the float "
                                "passes, as qcompile.pipeline.build_passes does")
            raise UserError(
                f"qcompile's graph passes changed what the model computes before quantization ({problem}); this is a "
                "qcompile bug, please report it; keeping the layer involved float (--exclude NAME or --leaf-module "
                "NAME) or --no-fold-bn / --no-equalize may avoid it")
        self.report.append(f"outputs of the prepared graph equal the model's (rtol {self.rtol:g})")
        return PassResult(gm, False)


    def _model_imprecise(self, gm, ref, got) -> bool:
        """The traced model differs from its own float64 computation beyond ``rtol`` while the prepared graph does
        not: float32 rounding in the model (a conv bias of 1e6 cancelled by its BatchNorm's running mean), which the
        folding removed, and no rewrite error."""
        ref64 = self.record.float64_outputs()
        if ref64 is None:
            return False
        return not output_difference(ref64, got, self.rtol) and bool(output_difference(ref64, ref, self.rtol))


def output_difference(ref: list, got: list, rtol: float = 1e-3) -> str:
    """How the tensors ``got`` differ from ``ref`` beyond ``rtol`` of each output's largest finite magnitude (plus
    1e-6), in words; "" when they do not (count, shapes, where the non-finite values are, integer outputs equal)."""
    if len(got) != len(ref):
        return f"{len(ref)} outputs became {len(got)}"
    for i, (a, b) in enumerate(zip(ref, got)):
        if a.shape != b.shape:
            return f"output {i} changed shape {tuple(a.shape)} -> {tuple(b.shape)}"
        if not (a.is_floating_point() or b.is_floating_point()):
            if not torch.equal(a, b):
                return f"output {i} differs"
            continue
        a, b = a.double(), b.double()
        finite = torch.isfinite(a) & torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return f"output {i} has non-finite values in other places"
        if bool(finite.any()):
            scale = float(a[finite].abs().max())
            err = float((a - b)[finite].abs().max())
            if err > rtol * scale + 1e-6:
                return f"output {i} moved by {err:.3g} (its largest magnitude is {scale:.3g})"
    return ""
