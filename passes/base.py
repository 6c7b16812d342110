"""Pass infrastructure shared by every graph pass of qcompile.

One IR flows between passes: a ``torch.fx.GraphModule``. A pass is a small class with one job:

    result = MyPass(option=...)(gm)      # -> PassResult(gm, modified)

``modified`` must be the truth: a pass that found nothing to do returns ``modified=False``, and the
``PassManager`` relies on it to reach a fixed point. ``Pipeline`` runs passes in order, optionally repeating
the whole list until no pass modifies the graph (bounded by ``steps``), verifies the graph after every pass
when asked, records per-pass wall time, and re-raises failures as ``PassError`` naming the failing pass and
the passes that ran before it.
"""
from __future__ import annotations

import dataclasses
import os
import time
import weakref
from typing import Callable, Iterable, Sequence

import torch
import torch.fx

from qcompile.errors import UserError


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) graph module and whether it changed anything."""

    gm: torch.fx.GraphModule
    modified: bool


def _bound_graph_reduce(self):
    from qcompile.errors import UserError

    raise UserError("this graph module has layers bound to qcompile's integer kernels (BindIntegerLayers), which "
                    "torch.fx cannot rebuild when it unpickles a graph module (torch.load / pickle.loads failed with "
                    "\"symbolically traced variables cannot be used as inputs to control flow\"): keep it in this "
                    "process (copy.deepcopy works), or save what it was built from (the float model; for QAT the "
                    "qat.prepare'd model, which pickles) and build it again, or keep the ONNX file (torch.save "
                    "opened its file before this stop: remove what it left there)")


def _bound_graph_deepcopy(self, memo):
    copied = torch.fx.GraphModule.__deepcopy__(self, memo)  # a class of its own again: refused there too
    refuse_pickling(copied)
    return copied


def refuse_pickling(gm: torch.fx.GraphModule) -> None:
    """Pickling ``gm`` (torch.save, multiprocessing) stops with one line saying why and what to do instead, rather
    than writing bytes that torch.fx's unpickling cannot rebuild. Each GraphModule has a class of its own (torch.fx
    makes one per instance), so this changes ``gm`` (and its deep copies) only."""
    type(gm).__reduce__ = _bound_graph_reduce
    type(gm).__deepcopy__ = _bound_graph_deepcopy


class PassError(RuntimeError):
    """A pass failed, or the graph failed verification after it."""

    def __init__(self, pass_name: str, before: Sequence[str], cause: BaseException | str):
        self.pass_name = pass_name
        self.before = list(before)
        self.cause = cause
        ran = ", ".join(self.before) if self.before else "none"
        if len(self.before) > 8:  # a full pipeline listed ~25 names after the cause; the last few say the order
            ran = f"{len(self.before)}, the last: {', '.join(self.before[-6:])}"
        super().__init__(f"pass {pass_name} failed: {cause} (passes run before it: {ran})")


class VerificationError(RuntimeError):
    """The graph is not well formed."""


class Pass:
    """Base class of a graph pass.

    Subclasses implement :meth:`call`. Options are constructor arguments; a pass keeps no state between calls
    other than a human-readable ``report`` (list of strings) describing what the last call did.
    """

    #: Passes listed here must have run before this one (checked by the pipeline).
    requires: tuple[type["Pass"], ...] = ()
    needs_quantizers: bool = False  # True: a pass on quantizers, which says so when the graph has none

    def __init__(self) -> None:
        self.report: list[str] = []

    @property
    def name(self) -> str:
        return type(self).__name__

    def call(self, gm: torch.fx.GraphModule) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        """Run the pass alone: the module's code follows its rewritten graph (``result.gm(x)`` runs it). A
        ``Pipeline`` runs :meth:`run_managed` and regenerates code once for several rewrites."""
        missing = _missing(self, passes_run(gm))  # a pass run alone was not checked at all
        if missing:
            raise PassError(self.name, passes_run(gm), f"requires {', '.join(missing)} to run first")
        result = self.run_managed(gm)
        if result.modified:  # now, not lazily: torch.jit.script / fx.symbolic_trace read the code, not the graph
            recompile_lazily(result.gm)
            ensure_compiled(result.gm)
        return result

    def run_managed(self, gm: torch.fx.GraphModule) -> PassResult:
        """Run the pass and leave the module's code as it was (the caller regenerates it)."""
        if not isinstance(gm, torch.fx.GraphModule):  # the model itself: "'DigitsCNN' object has no attribute 'graph'"
            raise TypeError(f"{self.name} takes a torch.fx.GraphModule, got {type(gm).__name__}: trace the model "
                            "first, gm = qcompile.trace(model, example_inputs)")
        self.report = []
        _OWNERS[gm] = None  # shared_with's map of parameter owners, built on first use within this pass
        try:
            result = self.call(gm)
        finally:
            _OWNERS.pop(gm, None)
        if not isinstance(result, PassResult):
            raise TypeError(f"{self.name}.call must return PassResult, got {type(result).__name__}")
        if not result.modified and not self.report and self.needs_quantizers and not _has_quantizers(result.gm):
            # placed before InsertQuantizers in a pipeline of one's own: it did nothing, without a word. After
            # InsertQuantizers (a model with no layer to quantize), the order is right and there is nothing to say
            if "InsertQuantizers" in passes_run(gm):
                self.report.append("the graph has no quantizers: nothing to do")
            else:
                self.report.append(f"the graph has no quantizers: nothing to do; run {self.name} after "
                                   "InsertQuantizers and Calibrate (the order of qcompile.pipeline.build_passes)")
        _note_ran(gm, result.gm, self.name)
        return result

    def __repr__(self) -> str:
        return self.name


def _has_quantizers(gm: torch.fx.GraphModule) -> bool:
    from qcompile.qmodules import FakeQuantize

    return any(isinstance(m, FakeQuantize) for m in gm.modules())


def verify(gm: torch.fx.GraphModule) -> None:
    """Check that ``gm`` is a well-formed graph module.

    - ``Graph.lint()``: topological order, every used value defined, targets exist;
    - every ``call_module`` target resolves to a submodule and every ``get_attr`` to an attribute;
    - exactly one output node;
    - quantization metadata, where present, has the declared type.
    """
    from qcompile.ir import QParams, LayerConfig  # local import: ir imports nothing from passes

    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises RuntimeError with a precise message
        raise VerificationError(f"graph lint failed: {exc}") from exc
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        raise VerificationError(f"graph must have exactly one output node, found {len(outputs)}")
    for node in gm.graph.nodes:
        if node.op == "call_module":
            try:
                gm.get_submodule(node.target)
            except AttributeError as exc:
                raise VerificationError(f"node {node.name}: no submodule {node.target!r}") from exc
        elif node.op == "get_attr":
            obj = gm
            for part in str(node.target).split("."):
                if not hasattr(obj, part):
                    raise VerificationError(f"node {node.name}: no attribute {node.target!r}")
                obj = getattr(obj, part)
        qp = node.meta.get("qparams")
        if qp is not None and not isinstance(qp, QParams):
            raise VerificationError(f"node {node.name}: meta['qparams'] must be QParams, got {type(qp).__name__}")
        cfg = node.meta.get("qconfig")
        if cfg is not None and not isinstance(cfg, LayerConfig):
            raise VerificationError(f"node {node.name}: meta['qconfig'] must be LayerConfig, got {type(cfg).__name__}")
        if cfg is not None and cfg.action not in ("quant", "float"):  # a typo left the layer float, silently
            raise VerificationError(f"node {node.name}: meta['qconfig'].action must be 'quant' or 'float', got "
                                    f"{cfg.action!r}")


@dataclasses.dataclass
class PassTiming:
    name: str
    seconds: float
    modified: bool
    report: list[str]


def _check_passes(passes) -> None:
    for p in passes:
        if isinstance(p, type) and issubclass(p, Pass):  # "pass <property object at 0x...> failed: TypeError"
            raise TypeError(f"{p.__name__} is a pass class; give an instance: {p.__name__}()")
        if not isinstance(p, Pass):
            raise TypeError(f"a pipeline takes Pass instances, got {type(p).__name__} {p!r}")


_RAN = "qcompile_passes_run"  # GraphModule.meta key: the names of the passes that ran on it, in order


def passes_run(gm: torch.fx.GraphModule) -> list[str]:
    """The passes that ran on ``gm`` so far (alone or in any pipeline), in order: what ``requires`` is checked
    against, so a pipeline split in two, or a pass run alone, sees what ran before it."""
    meta = getattr(gm, "meta", None)
    return list(meta.get(_RAN, ())) if isinstance(meta, dict) else []


def _missing(p: Pass, ran) -> list[str]:
    return [r.__name__ for r in p.requires if r.__name__ not in ran]


def _note_ran(before: torch.fx.GraphModule, after: torch.fx.GraphModule, name: str) -> None:
    meta = getattr(after, "meta", None)
    if isinstance(meta, dict):
        meta[_RAN] = passes_run(before) + [name]


class Pipeline:
    """Run a readable list of passes.

    Args:
        passes: the passes, in order.
        steps: how many times the whole list may run; the loop stops early at the first round in which no pass
            modified the graph. ``steps=1`` (default) runs each pass once.
        check: run :func:`verify` before the first pass and after every pass. ``None`` (default) follows the
            environment variable ``QCOMPILE_CHECK=1``, which the test suite sets for every test.
        callback: called after each pass with its ``PassTiming`` (the CLI prints progress with it).
        name_errors: a ``UserError`` a pass raises is raised again with the pass's name in front
            (``"Calibrate: ..."``; a hand-built pipeline's user could not tell which pass refused); ``compile()``
            and the QAT flows, whose messages speak of options rather than passes, leave their messages as raised.
    """

    def __init__(
        self,
        passes: Iterable[Pass],
        steps: int = 1,
        check: bool | None = None,
        callback: Callable[[PassTiming], None] | None = None,
        name_errors: bool = True,
    ) -> None:
        self.passes = list(passes)
        self.name_errors = name_errors
        _check_passes(self.passes)
        if steps < 1:
            raise ValueError("steps must be >= 1")
        self.steps = steps
        self.check = check if check is not None else os.environ.get("QCOMPILE_CHECK") == "1"
        self.callback = callback
        self.timings: list[PassTiming] = []

    def __repr__(self) -> str:  # the passes in order (it was "<qcompile.passes.base.Pipeline object at 0x...>")
        steps = f", steps={self.steps}" if self.steps != 1 else ""
        return f"Pipeline([{', '.join(map(repr, self.passes))}]{steps})"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        if not isinstance(gm, torch.fx.GraphModule):
            raise TypeError(f"a pipeline runs on a torch.fx.GraphModule, got {type(gm).__name__}: trace the model "
                            "first, gm = qcompile.trace(model, example_inputs)")
        _check_passes(self.passes)  # the list may have been edited since (pl.passes.insert(0, FoldBatchNorm))
        ran: list[str] = []
        earlier = passes_run(gm)  # passes run on it before this pipeline (another pipeline, or alone)
        any_modified = False
        if self.check:
            try:
                verify(gm)
            except VerificationError as exc:
                raise PassError("<input>", ran, exc) from exc
        compiled_key = None  # the graph the module's code was last generated from (None: unknown)
        for _round in range(self.steps):
            round_modified = False
            for p in self.passes:
                missing = _missing(p, ran + earlier)
                if missing:
                    raise PassError(p.name, ran, f"requires {', '.join(missing)} to run first")
                t0 = time.perf_counter()
                try:
                    # a pass with its own __call__ runs as written; ours leave code generation to this loop
                    result = p.run_managed(gm) if type(p).__call__ is Pass.__call__ else p(gm)
                except PassError:
                    raise  # already names the pass
                except UserError as exc:  # a one-line user message
                    if not self.name_errors or getattr(exc, "pass_name", None) or str(exc).startswith(p.name):
                        raise  # (a message that starts with the pass's name says it already)
                    named = UserError(f"{p.name}: {exc}")
                    named.pass_name = p.name
                    raise named from exc
                except Exception as exc:  # the passes run on it before this pipeline too ("run before it: none")
                    raise PassError(p.name, earlier + ran, f"{type(exc).__name__}: {exc}") from exc
                if result.modified:
                    # regenerate the module's code only when the graph changed, not for passes that only set
                    # values (calibration, weights, metadata): codegen is ~5 ms per pass on a ResNet; and only
                    # when the module next runs (a pass that calls it, or the end of the pipeline), so several
                    # rewriting passes in a row share one regeneration
                    key = _graph_key(result.gm.graph)
                    if result.gm is not gm or not _same(key, compiled_key):
                        recompile_lazily(result.gm)
                    compiled_key = key
                gm = result.gm
                if self.check:
                    try:
                        verify(gm)
                    except VerificationError as exc:
                        raise PassError(p.name, ran, exc) from exc
                timing = PassTiming(p.name, time.perf_counter() - t0, result.modified, list(p.report))
                self.timings.append(timing)
                if self.callback is not None:
                    self.callback(timing)
                ran.append(p.name)
                round_modified |= result.modified
            any_modified |= round_modified
            if not round_modified:
                break
        ensure_compiled(gm)
        return PassResult(gm, any_modified)


_STALE = "_qcompile_code_stale"


def recompile_lazily(gm: torch.nn.Module) -> None:
    """Mark ``gm``'s generated code stale after a graph rewrite: it is regenerated the next time ``gm`` is called
    (or by :func:`ensure_compiled`), not now. Several passes that only rewrite the graph then pay for one code
    generation instead of one each (the digits model's quantization pipeline: 9 code generations -> 3).

    Every ``GraphModule`` has a class of its own, whose ``forward`` becomes a stub that regenerates the code and
    runs it; anything that calls the module (a pass, a hook, ``torch.jit.trace``) sees the current graph. Other
    modules are recompiled at once."""
    if not isinstance(gm, torch.fx.GraphModule):
        gm.recompile()
        return
    cls = type(gm)
    if cls is torch.fx.GraphModule or cls.__dict__.get(_STALE, False):
        if cls is torch.fx.GraphModule:  # not a per-instance class: nothing can be deferred safely
            gm.recompile()
        return

    def forward(self, *args, **kwargs):
        ensure_compiled(self)
        return type(self).forward(self, *args, **kwargs)

    cls.forward = forward
    setattr(cls, _STALE, True)


def ensure_compiled(gm: torch.nn.Module) -> None:
    """Regenerate ``gm``'s code now if :func:`recompile_lazily` left it stale (before reading ``gm.code``)."""
    cls = type(gm)
    if cls.__dict__.get(_STALE, False):
        setattr(cls, _STALE, False)
        gm.recompile()


PassManager = Pipeline


def _same(a, b) -> bool:
    if a is None or b is None:
        return False
    try:
        return bool(a == b)
    except Exception:  # a value whose == is not a plain bool (a tensor nested in a tuple): treat as changed
        return False


def _graph_key(graph: torch.fx.Graph):
    """What the generated code of ``graph`` depends on, node by node (Node arguments compare by identity), or
    None where a value cannot be compared safely (a tensor constant in the arguments)."""
    key = []
    for n in graph.nodes:
        for a in n.args:
            if isinstance(a, torch.Tensor):
                return None
        for v in n.kwargs.values():
            if isinstance(v, torch.Tensor):
                return None
        key.append((n.name, n.op, n.target, n.args, tuple(n.kwargs.items()), n.type))
    return tuple(key)


def data_batches(data, batch_size: int):
    """Batches of calibration data for ``gm(*batch)``: ``data`` is one tensor (one model input) or a tuple of
    tensors (one per model input), all batch-first with the same number of samples."""
    parts = data if isinstance(data, (tuple, list)) else (data,)
    n = parts[0].shape[0]
    for i in range(0, n, batch_size):
        yield tuple(t[i:i + batch_size] for t in parts)


def calibration_inputs(data, gm: torch.fx.GraphModule):
    """Calibration data in a pass's own pipeline, in the forms ``qcompile.compile(calib=...)`` takes: a tensor or
    array ``(N, ...)``, a DataLoader or list of batches or ``(x, y)`` pairs, and for a model with several inputs a
    tuple of one tensor per input or batches of such tuples. Given to ``Calibrate``/``BiasCorrection`` directly, an
    array or DataLoader stopped inside the pass (``'numpy.ndarray' object has no attribute 'dim'``) and a list of
    batches was read as several model inputs."""
    if data is None:
        return None
    from qcompile.api import calib_data, model_input

    # tensors as compile() takes them (model_input): float32, plain strides. A slice x[:32] of (N, 1, 8, 8) images
    # has strides (64, 1, 8, 1), which the kernels run as channels-last: other float sums, other scales, so a pass
    # pipeline run by hand calibrated another file than compile() on the same data
    n = sum(1 for node in gm.graph.nodes if node.op == "placeholder")
    if n == 1 and isinstance(data, torch.Tensor):
        data = model_input(data)
    elif n > 1 and isinstance(data, (tuple, list)) and len(data) == n \
            and all(isinstance(t, torch.Tensor) for t in data) \
            and len({t.shape[0] if t.dim() else -1 for t in data}) == 1:
        data = tuple(model_input(t) for t in data)
    else:
        data = calib_data(data, n)
    first = data[0] if isinstance(data, tuple) else data
    if first.dim() == 0 or first.shape[0] == 0:  # a pass's next(data_batches(...)) stopped: "StopIteration: "
        raise UserError(f"the calibration data holds no samples (shape {tuple(first.shape)}); give a batch-first "
                        "tensor with at least one input")
    _check_traced_shapes(data, gm)
    return data


def _check_traced_shapes(data, gm: torch.fx.GraphModule) -> None:
    """Samples of the shape and kind of type the graph was traced with (``tensor_meta`` of its inputs, which
    ``qcompile.trace`` records), as ``compile()`` checks them: data of another shape stopped a pass with torch's
    own error ("mat1 and mat2 shapes cannot be multiplied") and torch.fx's dump of the graph's code."""
    from qcompile.api import check_sample_shape

    parts = data if isinstance(data, tuple) else (data,)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(parts):
        return
    for i, (c, node) in enumerate(zip(parts, placeholders)):
        meta = node.meta.get("tensor_meta")
        shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
        if not isinstance(c, torch.Tensor) or shape is None or dtype is None or len(shape) == 0:
            continue
        example = torch.empty(tuple(shape), dtype=dtype, device="meta")
        check_sample_shape(c, example, i, len(parts), "calibration data", "the data given to the pass",
                           "the inputs the graph was traced with, qcompile.trace(model, example)")


def data_length(data) -> int:
    """Number of samples of calibration data (a tensor or a tuple of tensors)."""
    return (data[0] if isinstance(data, (tuple, list)) else data).shape[0]


def attr_value(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """The tensor a ``get_attr`` node refers to."""
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


# gm.meta key: qualified name -> the float value of a parameter that a pass after ``CheckFloatOutputs`` moved for
# the quantized model's sake (bias correction, the bias grid, pair-safe weights). The graph with its quantizers
# passed through and these values put back computes the float model; validation's per-quantizer SQNR is measured
# against that (see ``float_parameters``).
FLOAT_PARAMS = "qcompile_float_params"


_PATHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # gm -> {id(module): qualified name}


def module_path(gm: torch.fx.GraphModule, module: torch.nn.Module) -> str | None:
    """The qualified name of ``module`` in ``gm`` ("" for ``gm`` itself), None if it is not one of its modules. The
    names are looked up once and kept while they stay right (bias correction asked for every layer, and each
    question walked every module: 0.2 s of a MobileNetV2 compile)."""
    paths = _PATHS.get(gm)
    path = paths.get(id(module)) if paths is not None else None
    if path is not None:
        try:
            if gm.get_submodule(path) is module:
                return path
        except AttributeError:
            pass
    paths = {id(m): p for p, m in gm.named_modules()}
    _PATHS[gm] = paths
    return paths.get(id(module))


def remember_float(gm: torch.fx.GraphModule, target: str | tuple) -> None:
    """Record the current value of parameter ``target`` (a qualified name, or ``(holder module, attribute)``) as its
    float value, unless one is recorded already: call it before a pass after calibration changes the parameter."""
    if isinstance(target, tuple):
        holder, attr = target
        path = module_path(gm, holder)
        if path is None:
            return
        target = f"{path}.{attr}" if path else attr
    store = gm.meta.setdefault(FLOAT_PARAMS, {})
    if target not in store:
        obj = gm
        for part in target.split("."):
            obj = getattr(obj, part)
        store[target] = obj.detach().clone()


class float_parameters:
    """Within it, the parameters recorded by :func:`remember_float` hold their float values again (shared modules
    see them too); on exit, their quantization-time values come back."""

    def __init__(self, gm: torch.nn.Module):
        self.store = (getattr(gm, "meta", None) or {}).get(FLOAT_PARAMS) or {}
        self.gm = gm
        self.swapped: list = []

    def __enter__(self):
        for name, value in self.store.items():
            obj = self.gm
            try:
                for part in name.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                continue
            if isinstance(obj, torch.Tensor) and obj.shape == value.shape:
                self.swapped.append((obj, obj.data))
                obj.data = value
        return self

    def __exit__(self, *exc):
        for obj, data in reversed(self.swapped):  # reversed: a tied parameter recorded under two names
            obj.data = data
        self.swapped = []
        return False


def require_calibrated(gm: torch.fx.GraphModule, pass_name: str) -> None:
    """Raise, naming the order to run, when a quantizer of ``gm`` is not calibrated yet: the passes after
    ``Calibrate`` skipped such quantizers without a word (an int8 binding, a bias grid silently not made)."""
    from qcompile.qmodules import FakeQuantize

    if all(m.calibrated for m in gm.modules() if isinstance(m, FakeQuantize)):
        return  # the common case, in one pass over the modules
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, FakeQuantize) and not mod.calibrated:
                ran = passes_run(gm)
                placing = ("InsertQuantizers", "QuantizeOutputs", "QuantizeResiduals")
                late = [n for n in dict.fromkeys(ran[len(ran) - ran[::-1].index("Calibrate"):]) if n in placing] \
                    if "Calibrate" in ran else []
                if late:  # QuantizeOutputs after Calibrate: "run Calibrate after InsertQuantizers" named neither
                    raise ValueError(f"quantizer {node.target} is not calibrated: {', '.join(late)} ran after "
                                     f"Calibrate and placed it; run {' and '.join(late)} before Calibrate "
                                     "(qcompile.pipeline.build_passes gives the full order)")
                raise ValueError(f"quantizer {node.target} is not calibrated yet: run Calibrate after "
                                 f"InsertQuantizers (which places the quantizers) and before {pass_name} "
                                 "(qcompile.pipeline.build_passes gives the full order)")


def stock_layer(mod) -> bool:
    """A Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear module that computes exactly what its torch.nn class does:
    neither ``forward`` nor ``_conv_forward`` overridden. A subclass with its own forward (TF "same" padding, weight
    standardization) kept whole by ``--leaf-module`` is not one: rewriting its call as the plain layer op, folding
    a BatchNorm into its weight or rescaling it would change what it computes."""
    import torch.nn as nn

    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.Linear):
        if isinstance(mod, base):
            return all(getattr(type(mod), attr, None) is getattr(base, attr, None)
                       for attr in ("forward", "_conv_forward"))
    return False


def add_functional_bias(gm: torch.fx.GraphModule, node: torch.fx.Node, weight_target: str, n_out: int,
                        like: torch.Tensor) -> tuple:
    """Give the bias-less ``F.conv*/F.linear`` call ``node`` a zero bias parameter of ``n_out`` entries, wired into
    the call: ``bias`` of the module that owns the weight (``weight_target``), or ``<weight>_bias`` where that name
    is taken. Returns ``(holder module, attribute name)``."""
    import torch.nn as nn

    path, _, wattr = weight_target.rpartition(".")
    holder = gm.get_submodule(path) if path else gm
    attr = "bias" if getattr(holder, "bias", None) is None else _free_name(holder, f"{wattr}_bias")
    if hasattr(holder, attr) and not isinstance(getattr(holder, attr), nn.Parameter):
        delattr(holder, attr)  # nn.Conv2d(bias=False) registers bias = None
    zero = torch.zeros(n_out, dtype=like.dtype)
    holder.register_parameter(attr, nn.Parameter(zero, requires_grad=like.requires_grad))
    with gm.graph.inserting_before(node):
        new = gm.graph.get_attr(f"{path}.{attr}" if path else attr)
    if "bias" in node.kwargs:
        node.kwargs = {**node.kwargs, "bias": new}
    else:
        args = list(node.args) + [None] * max(0, 3 - len(node.args))
        args[2] = new
        node.args = tuple(args)
    return holder, attr


def _free_name(holder: torch.nn.Module, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``, ... : the first that ``holder`` has no attribute of."""
    candidate, i = name, 0
    while getattr(holder, candidate, None) is not None:
        i += 1
        candidate = f"{name}_{i}"
    return candidate


def private_bias(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Give the layer call ``node`` a bias parameter of its own where its bias (a ``get_attr``) is also read by
    another node: a module called from several places (a shared conv) shares its weight, but bias correction and
    the bias grid (S_x·S_w, S_x that of each call's input) differ per call. The copy is registered beside the
    original (``bias_1``, ...) and wired into ``node`` alone. Returns whether it copied."""
    import torch.nn as nn

    in_kwargs = "bias" in node.kwargs
    bnode = node.kwargs["bias"] if in_kwargs else (node.args[2] if len(node.args) > 2 else None)
    if not isinstance(bnode, torch.fx.Node) or bnode.op != "get_attr":
        return False
    readers = {u for n in gm.graph.nodes if n.op == "get_attr" and n.target == bnode.target for u in n.users}
    if readers <= {node}:
        return False
    path, _, attr = str(bnode.target).rpartition(".")
    holder = gm.get_submodule(path) if path else gm
    value = getattr(holder, attr)
    new_attr = _free_name(holder, attr)
    holder.register_parameter(new_attr, nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad))
    floats = gm.meta.get(FLOAT_PARAMS) or {}
    if str(bnode.target) in floats:  # the original was moved already: the copy's float value is the original's
        floats[f"{path}.{new_attr}" if path else new_attr] = floats[str(bnode.target)]
    with gm.graph.inserting_before(node):
        new = gm.graph.get_attr(f"{path}.{new_attr}" if path else new_attr)
    if in_kwargs:
        node.kwargs = {**node.kwargs, "bias": new}
    else:
        args = list(node.args)
        args[2] = new
        node.args = tuple(args)
    return True


_OWNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # graph module -> shared_with's map, per pass


def shared_with(gm: torch.nn.Module, module_name: str, attrs=("weight", "bias")) -> str:
    """Where else a parameter of submodule ``module_name`` lives (tied weights: ``b.weight = a.weight``), as
    "a.weight"; "" when its parameters are its own. A pass that rewrites a weight in place (folding, equalization)
    must leave a shared one alone: the rewrite would change the other module too."""
    mod = gm.get_submodule(module_name)
    mine = {id(getattr(mod, a)) for a in attrs if isinstance(getattr(mod, a, None), torch.Tensor)}
    if not mine:
        return ""
    owners = _OWNERS.get(gm) if gm in _OWNERS else None
    if owners is None:
        # id -> (names, the parameter): the parameter kept alive, so that its id is not reused while the map lives.
        # Within one pass the map may be missing parameters the pass made; those are a module's own.
        owners = {}
        for i, (name, p) in enumerate(gm.named_parameters(remove_duplicate=False)):
            owners.setdefault(id(p), ([], p))[0].append((i, name))
        if gm in _OWNERS:  # in a pass: built once for every layer it asks about (was a walk per layer)
            _OWNERS[gm] = owners
    elsewhere = [(i, name) for pid in mine for i, name in owners.get(pid, ((), None))[0]
                 if name.rpartition(".")[0] != module_name]
    if elsewhere:
        return min(elsewhere)[1]  # the first in named_parameters' order, as before
    if isinstance(gm, torch.fx.GraphModule):  # a node that reads it (``F.conv_transpose2d(h, self.enc.weight)``)
        for node in gm.graph.nodes:
            if node.op == "get_attr" and str(node.target).rpartition(".")[0] == module_name and \
                    str(node.target).rpartition(".")[2] in attrs and any(not _reads_metadata(u) for u in node.users):
                return f"the node {node.name} ({node.target})"
    return ""


def _reads_metadata(node: torch.fx.Node) -> bool:
    """``w.shape``, ``w.dtype``, ``w.device``, ``w.size()``, ``w.dim()``: what a rescaling leaves as it was."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "dtype", "device", "ndim", "is_cuda")
    return node.op == "call_method" and node.target in ("size", "dim")


def fake_quantizer(gm: torch.fx.GraphModule, node):
    """The FakeQuantize a ``call_module`` node calls, or None."""
    from qcompile.qmodules import FakeQuantize

    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, FakeQuantize):
            return mod
    return None


def input_quantizer(gm: torch.fx.GraphModule, node):
    """The activation FakeQuantize whose codes a layer reads as ``node``: the quantizer's own output, or that
    output through the ``F.pad`` that ``InsertQuantizers`` puts before a conv with reflect/replicate or asymmetric
    ``"same"`` padding (copied codes, or zeros: real 0 is a code of every level set), which the emitted file pads
    as codes before its int8 kernels. Circular padding exports as Slice/Concat, which onnxruntime runs on floats
    before a float conv: not looked through (the layer is simulated as that float conv). None otherwise."""
    import torch.nn.functional as F

    fq = fake_quantizer(gm, node)
    if fq is None and isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is F.pad \
            and node.args:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if mode in ("reflect", "replicate") or (mode == "constant" and not value):
            fq = fake_quantizer(gm, node.args[0])
            if fq is not None and fq.role != "activation":
                fq = None
    return fq
