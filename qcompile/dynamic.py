"""Dynamic axes: a file that runs at other sizes than the example's on chosen axes, and the check that it does.

Every file takes any batch size. With ``dynamic_axes=(2, 3)`` (``--dynamic-axes 2,3``) the inputs' height and
width are declared symbolic too (``d2``, ``d3``), and so is every output dimension that varies with them. Nothing
in the graph is rewritten for it (but for emission's lookups, which reshape to their index's own shape): a fully
convolutional model (convolutions, pools of fixed kernels, resizes by a scale, element-wise operations) computes
the same at any size, and a graph that fixed a size somewhere (a reshape to the example's number of features, a
pool whose kernel was the example's feature map, a positional embedding of the example's length, 'same' padding
computed in Python from the example's size) does not. So the compile proves it rather than assuming it: the model,
its traced float graph, its simulation and the file run on the validation inputs at **twice** the example's size
on those axes (each value repeated, so the values are those of real inputs) and at an odd size (twice plus one,
two samples, where the model itself takes it), and

- the traced float graph must compute the model there (as the trace checks it at the example's size),
- the file's output shapes must be the model's there, and
- the file must equal its simulation there as it does at the example's size (the same validation, the same
  bounds: output SQNR, integer codes of every quantized activation).

Where one fails, the compile stops with one line naming the axes and what differed, and writes nothing. The
activation ranges stay those calibrated at the example's size. Twice the size keeps every divisibility the
example's size had (a stride-32 network, a patch size); the odd size shows what depends on parity (padding).
"""
from __future__ import annotations

from typing import Optional, Sequence

import onnx
import torch

from .errors import UserError

PROBE_SAMPLES = 4  # inputs at twice the size per axis: 4 of them hold 16 samples' worth of values on two axes
PROBE_FACTOR = 2


def flag(axes: Sequence[int]) -> str:
    return f"--dynamic-axes {','.join(map(str, axes))}"


def check_axes(axes: Sequence[int], example_inputs: Sequence) -> None:
    """Every axis exists in some input (an axis past every input's last one named nothing)."""
    ranks = [t.dim() for t in example_inputs if isinstance(t, torch.Tensor)]
    past = [a for a in axes if all(a >= r for r in ranks)]
    if past:
        shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs if isinstance(t, torch.Tensor))
        raise UserError(f"dynamic axis {past[0]} is past the last axis of the input{'s' if len(ranks) > 1 else ''} "
                        f"(shape {shapes}); name axes from 1 to {max(ranks) - 1}, such as 2,3 for an image's height "
                        "and width")


def probe_inputs(inputs, axes: Sequence[int], samples: int = PROBE_SAMPLES, extra: int = 0):
    """The first ``samples`` inputs at ``PROBE_FACTOR`` times their size on ``axes`` (each value repeated: an image
    upsampled by nearest neighbour, a sequence with every step twice), ``extra`` more there (the last slice
    repeated: an odd size, where padding computed from the size differs), in the form given."""
    def grow(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        t = t[:samples]
        for k, a in enumerate(axes):
            if a < t.dim():
                t = t.repeat_interleave(PROBE_FACTOR, dim=a)
                if extra:  # 1, 3, 5, ... more on the successive axes: odd, and unequal (a square example's
                    # height and width told apart, a transpose seen)
                    t = torch.cat([t] + [t.narrow(a, t.shape[a] - 1, 1)] * (extra + 2 * k), dim=a)
        return t

    if isinstance(inputs, tuple):
        return tuple(grow(t) for t in inputs)
    return grow(inputs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def run_model_at_probe(reference, probe, axes: Sequence[int], what: str, optional: bool = False) -> list | None:
    """``reference``'s output tensors on the probe inputs, or one line saying that it does not run there
    (``optional``: None where the model itself does not take that size, an odd one a UNet refuses)."""
    import contextlib
    import io

    from qcompile.runtime.validation import output_tensors

    from .frontend import _seeded

    args = probe if isinstance(probe, tuple) else (probe,)
    try:  # (torch.fx prints a failing graph's code and traceback to stderr: the one line below says it)
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # seeded as the trace's checks are
            return output_tensors(_seeded(lambda: reference(*[t.clone() if isinstance(t, torch.Tensor) else t
                                                               for t in args])))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 -- the model's own refusal of the size, in one line
        if optional and what == "model":
            return None
        shape = _shapes(probe)
        if what == "trained":  # a QAT-prepared graph: the model and its trace are one, so either may fix the size
            raise UserError(f"{flag(axes)}: the trained graph does not run at twice the example's size on those axes "
                            f"(inputs {shape}: {_first_line(exc)}): the model itself takes only that size (a Linear "
                            "after a flatten of the feature map), or its trace fixed a size read in forward "
                            "(x.shape); name only axes whose size the model takes at any value, or export once per "
                            "size without dynamic_axes") from None
        if what == "model":
            raise UserError(f"{flag(axes)}: the model itself does not run at twice the example's size on those axes "
                            f"(inputs {shape}: {_first_line(exc)}); name only axes whose size the model takes at any "
                            "value, or compile once per size without --dynamic-axes") from None
        raise UserError(f"{flag(axes)}: the traced graph fixes the size of those axes (at inputs {shape} it fails: "
                        f"{_first_line(exc)}), where the model itself runs: a size read in forward (x.shape) became "
                        "the example's, or an adaptive pool to more than 1x1 became a pool of the example's size; "
                        "compile once per size without --dynamic-axes") from None


def _shapes(inputs) -> str:
    parts = inputs if isinstance(inputs, tuple) else (inputs,)
    return ", ".join(str(tuple(t.shape)) for t in parts if isinstance(t, torch.Tensor))


def mark_inputs(onnx_model: onnx.ModelProto, example_inputs: Sequence, axes: Sequence[int]) -> None:
    """Declare ``axes`` of the exported (not yet emitted) file's inputs symbolic: emission then holds no size of
    the example in a constant (``emit._Builder.dynamic``)."""
    from .export import recorded_input_names

    names = recorded_input_names(onnx_model, len(example_inputs))
    for value in onnx_model.graph.input:
        if value.name not in names or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        for a in axes:
            if a < len(dims):
                dims[a].Clear()
                dims[a].dim_param = f"d{a}" if len(names) == 1 else f"{value.name}_d{a}"


def check_fixed_size_ops(gm, axes: Sequence[int]) -> None:
    """Refuse the operations the passes or the export write for the example's size alone: adaptive pools to more
    than 1x1 (ONNX has no adaptive pool: DecomposeAdaptivePool writes a pool of the example's kernel or reductions
    over its bins) and adaptive max pools to 1 (torch.onnx writes a MaxPool of the example's kernel)."""
    import torch.nn as nn
    import torch.nn.functional as F

    from qcompile.passes.cleanup import FIXED_SIZE_POOLS

    names = list(gm.meta.get(FIXED_SIZE_POOLS, []))
    unshuffles = []
    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            names.append(f"{node.target} ({type(mod).__name__})")
        elif isinstance(mod, nn.AdaptiveAvgPool3d) and not _all_ones(mod.output_size):
            # DecomposeAdaptivePool writes the 1-D and 2-D ones (and says so above); torch.onnx the 3-D one, for
            # the example's size (onnxruntime then failed at the next Gemm, "Dimension mismatch")
            names.append(f"{node.target} ({type(mod).__name__})")
        elif node.op == "call_function" and node.target in (F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                                                            F.adaptive_max_pool3d):
            names.append(f"{node.target.__name__}({node.args[1] if len(node.args) > 1 else ''})")
        elif node.op == "call_function" and node.target is F.adaptive_avg_pool3d and \
                not _all_ones(node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")):
            names.append(f"adaptive_avg_pool3d({node.args[1] if len(node.args) > 1 else ''})")
        elif isinstance(mod, nn.PixelUnshuffle) or (node.op == "call_function" and node.target is F.pixel_unshuffle):
            unshuffles.append(str(node.target) if mod is not None else node.name)
    if unshuffles:
        raise UserError(f"{flag(axes)}: torch.onnx writes the pixel unshuffle {', '.join(unshuffles[:3])} as reshapes "
                        "to the example's sizes, so the file computes it at that size only; write it as "
                        "x.reshape(b, c, h // r, r, w // r, r).permute(0, 1, 3, 5, 2, 4).reshape(b, c * r * r, h // r, "
                        "w // r) with b, c, h, w = x.shape (sizes that follow the input), or compile once per size "
                        "without --dynamic-axes")
    if names:
        raise UserError(f"{flag(axes)}: the file computes the adaptive pool(s) {', '.join(names[:3])}"
                        f"{' ...' if len(names) > 3 else ''} as pools over the example's feature map (ONNX has no "
                        "adaptive pool but the global average one): use output size 1 (nn.AdaptiveAvgPool2d(1), "
                        "nn.AdaptiveAvgPool3d(1)) or x.amax((2, 3), keepdim=True) for a global pool, or compile once "
                        "per size without "
                        "--dynamic-axes")


def _all_ones(size) -> bool:
    """Whether an adaptive pool's output size is 1 on every axis (a global pool, which ONNX has at any size)."""
    sizes = size if isinstance(size, (tuple, list)) else (size,)
    return all(v == 1 for v in sizes)  # None (the input's size) is not 1


def check_traced(traced, probe, model_outputs: Sequence[torch.Tensor], axes: Sequence[int]) -> None:
    """The traced float graph (before any pass) must compute the model at the probe's size as it does at the
    example's: a size the model reads in Python became the example's in a trace fixed to its sizes (timm's 'same'
    padding, computed with math.ceil from the input's size, pads as for the example at odd sizes)."""
    from qcompile.passes.float_check import output_difference

    got = run_model_at_probe(traced, probe, axes, "graph")
    problem = output_difference([t.detach().double() for t in model_outputs], [t.detach().double() for t in got])
    if problem:
        raise UserError(f"{flag(axes)}: the traced graph computes another function than the model at inputs "
                        f"{_shapes(probe)} ({problem}): the model reads its input's size in Python (padding "
                        "computed from it, as timm's 'same' padding), which the trace fixed to the example's; "
                        "compile once per size without --dynamic-axes")


def mark(onnx_model: onnx.ModelProto, example_inputs: Sequence, axes: Sequence[int], probe,
         probe_outputs: Sequence[torch.Tensor], sim_outputs: Optional[Sequence[torch.Tensor]] = None,
         more: Sequence[tuple] = ()) -> dict:
    """Declare ``axes`` of the file's inputs symbolic, and each output dimension whose size at the probe (or in any
    of ``more``, ``(inputs, the model's outputs)`` at other sizes) differs from the example's; drop the intermediate
    shapes (``value_info``), which were the example's. ``probe_outputs``: the model's outputs on the probe inputs
    (the shapes the file must give there); ``sim_outputs``: the simulation's, which must have the same shapes. An
    output dimension takes an input axis's symbol only at that axis's position, with that axis's size at every
    checked size, where no other input axis has those sizes (a fully convolutional net's height; not a square
    image's transposed width), else a name of its own. Returns ``{output name: [dims]}`` as declared."""
    from .export import recorded_input_names

    graph = onnx_model.graph
    names = recorded_input_names(onnx_model, len(example_inputs))
    index = {name: i for i, name in enumerate(names)}
    sizes: dict[tuple, list] = {}  # sizes at every checked size -> [(axis, symbol)] of the input axes with them
    probe_parts = probe if isinstance(probe, tuple) else (probe,)
    more_parts = [(p if isinstance(p, tuple) else (p,), outs) for p, outs in more]
    for value in graph.input:
        i = index.get(value.name)
        if i is None or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        for a in axes:
            if a >= len(dims):
                continue
            sym = f"d{a}" if len(names) == 1 else f"{value.name}_d{a}"
            example_size = int(example_inputs[i].shape[a])
            dims[a].Clear()
            dims[a].dim_param = sym
            seen = (example_size, int(probe_parts[i].shape[a])) + tuple(int(p[i].shape[a]) for p, _ in more_parts)
            sizes.setdefault(seen, []).append((a, sym))

    outputs = list(graph.output)
    if sim_outputs is not None:
        for k, (want, got) in enumerate(zip(probe_outputs, sim_outputs)):
            if tuple(want.shape) != tuple(got.shape):
                raise UserError(f"{flag(axes)}: the traced graph fixes the size of those axes: at inputs "
                                f"{_shapes(probe)} the model's output {k} has shape {tuple(want.shape)} and its "
                                f"simulation's {tuple(got.shape)} (a size read in forward, or an adaptive pool, "
                                "became the example's); compile once per size without --dynamic-axes")
    if len(outputs) != len(probe_outputs):
        raise UserError(f"{flag(axes)}: the file has {len(outputs)} outputs where the model gives "
                        f"{len(probe_outputs)} tensors; compile without --dynamic-axes")
    declared = {}
    for k, (value, y) in enumerate(zip(outputs, probe_outputs)):
        if not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != y.dim():
            raise UserError(f"{flag(axes)}: the file's output {value.name} has {len(dims)} axes, the model's "
                            f"{y.dim()} at inputs {_shapes(probe)}; compile without --dynamic-axes")
        for j in range(1, len(dims)):
            if not dims[j].HasField("dim_value"):
                continue
            example_size, probe_size = int(dims[j].dim_value), int(y.shape[j])
            seen = (example_size, probe_size) + tuple(
                int(outs[k].shape[j]) if k < len(outs) and outs[k].dim() == y.dim() else -1 for _, outs in more_parts)
            if all(v in (example_size, -1) for v in seen):
                continue
            # the input axis it follows: the only one with these sizes, at the same position (an image's height
            # and width through a fully convolutional net), else a name of its own (a size the model computes
            # from them: a stride-2 output's width, a transposed one)
            match = sizes.get(seen, [])
            sym = match[0][1] if len(match) == 1 and match[0][0] == j else \
                f"out_d{j}" if len(outputs) == 1 else f"{value.name}_d{j}"
            dims[j].Clear()
            dims[j].dim_param = sym
        declared[value.name] = [d.dim_param or int(d.dim_value) for d in dims]
    del graph.value_info[:]
    return declared


def failure(axes: Sequence[int], probe, reason: str, gm=None) -> UserError:
    """The file does not compute its simulation at the probe's size; where ``gm`` calls Python's ``math`` on a value
    (``math.sqrt(x.shape[1])``: torch.fx keeps it traced, torch.onnx writes the example's result as a constant), that
    is named."""
    math_calls = sorted({f"math.{n.target.__name__}" for n in (gm.graph.nodes if gm is not None else ())
                         if n.op == "call_function" and getattr(n.target, "__module__", None) == "math"})
    if math_calls:
        return UserError(f"{flag(axes)}: at another size than the example's (inputs {_shapes(probe)}) the file does not "
                         f"compute what its simulation does ({reason}): torch.onnx writes {', '.join(math_calls)} of "
                         "a size as the example's constant; compute it with tensor operators (x.shape[1] ** 0.5 for "
                         "math.sqrt(x.shape[1])), or compile once per size without --dynamic-axes")
    return UserError(f"{flag(axes)}: at another size than the example's (inputs {_shapes(probe)}) the file does not compute "
                     f"what its simulation does ({reason}); some operation fixed a size of the example: compile once "
                     "per size without --dynamic-axes")


def onnxruntime_failure(axes: Sequence[int], probe, exc: BaseException) -> UserError:
    return UserError(f"{flag(axes)}: onnxruntime cannot run the file at another size than the example's (inputs "
                     f"{_shapes(probe)}: {_first_line(exc)}); a node holds a size of the example (a reshape to its "
                     "number of features): compile once per size without --dynamic-axes")
