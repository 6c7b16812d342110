"""Direct fx -> ONNX export for graphs made only of common layers: the fast path of ``export.export_onnx``.

``torch.onnx.export`` (TorchScript) re-traces the GraphModule through the JIT and runs its graph optimizer: about
26 ms for the bundled digits CNN, a third of that model's whole compile. For a graph whose every node is one of
the layers below, this module writes the ONNX graph the TorchScript exporter writes for it (same operators, same
attributes, same initializer values, the ``qcompile::FakeQuant`` marker for every enabled quantizer, inputs and
outputs named and batch-dynamic the same way, the same merging of repeated computations and the same dropping of
an unused input) straight from the fx nodes, in about a millisecond. Two differences, by design: functional
layers are named after the module that owns their weight (``/layer1.0.conv1/Conv``, where TorchScript writes
``/Conv_7``), and a parameter bit-identical to an earlier one is read from that one's initializer (TorchScript
feeds it through an ``Identity`` node): same values, one node less. Any other node,
or anything it cannot prove about a node (a shape it cannot derive, a dtype other than float32, a hook), makes
:func:`export_fx` return ``None`` and the caller uses ``torch.onnx.export``: the fast path only narrows what runs,
never what is supported. ``tests/test_fx_onnx.py`` checks the two paths give the same file.

Handled: Conv1d/2d/3d (modules, ``F.conv*`` and qcompile's ``int8_conv*``) with zero padding (numeric,
``"same"``, ``"valid"``); Linear on 2-D inputs with a bias (Gemm), and on other inputs or without a bias where its
weight is a quantizer's (MatMul of the transposed weight, then the bias added); LayerNorm (module and
``F.layer_norm``), GELU (module and function), ``permute`` keeping the batch first (Transpose); ReLU, LeakyReLU,
ReLU6/Hardtanh (Clip);
MaxPool1d/2d/3d; adaptive average pooling to 1 (GlobalAveragePool); ``flatten(x, 1)`` of a rank >= 3 tensor;
``torch.cat`` along a non-batch axis (Concat); AvgPool1d/2d/3d; eval-mode BatchNorm1d/2d/3d left unfolded;
``a + b`` broadcasting; ``a * b`` broadcasting (operator, ``torch.mul``, ``.mul``); Sigmoid (module,
function, method), SiLU (as the TorchScript exporter writes it: ``Mul(x, Sigmoid(x))``), Hardswish, Hardsigmoid;
Identity, eval-mode Dropout and torchvision's StochasticDepth; qcompile's FakeQuantize (marker or pass-through),
Int8Add, Int8Mul, Int8Sigmoid, IntegerOutput, Int8GlobalAvgPool, Int8AvgPool. The squeeze-excite models
(EfficientNet-B0, MobileNetV3, RegNetY) took the TorchScript path for their gates: ~0.5-0.9 s of a 4-7 s compile.
"""
from __future__ import annotations

import math
import operator
import os
from typing import Optional, Sequence

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from .qmodules import (MARKER_DOMAIN, MARKER_OP, FakeQuantize, Int8Add, Int8AvgPool, Int8GlobalAvgPool, Int8Mul,
                       Int8Sigmoid, IntegerOutput)
from . import qmodules

ENV_SWITCH = "QCOMPILE_EXPORTER"  # "torchscript": always use torch.onnx.export (debugging, equivalence tests)
IR_VERSION = 9  # what the TorchScript exporter of torch 2.13 writes at opset 20


class Unsupported(Exception):
    """A node the fast path does not write: the caller falls back to ``torch.onnx.export``."""


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() not in ("torchscript", "jit")


_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
               qmodules.int8_conv1d: 1, qmodules.int8_conv2d: 2, qmodules.int8_conv3d: 3}
_LINEAR_FUNCS = (F.linear, qmodules.int8_linear)
_RELU_FUNCS = (F.relu, torch.relu)
_ADD_FUNCS = (operator.add, torch.add)
_MUL_FUNCS = (operator.mul, torch.mul)
_SIGMOID_FUNCS = (torch.sigmoid, F.sigmoid)
_FLATTEN_FUNCS = (torch.flatten,)
_CAT_FUNCS = (torch.cat, torch.concat, torch.concatenate)
_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_MAXPOOL_MODULES = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_GAP_MODULES = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
_AVGPOOL_MODULES = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_BN_MODULES = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}  # -> the input ranks


def _tuple(v, n: int, what: str) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    if isinstance(v, (tuple, list)) and len(v) == n and all(isinstance(i, int) for i in v):
        return list(v)
    raise Unsupported(f"{what} {v!r}")


class _Value:
    """An ONNX tensor name with its static shape (``None`` for the batch dimension)."""

    __slots__ = ("name", "shape", "param")

    def __init__(self, name: str, shape: list, param: str = ""):
        self.name, self.shape = name, shape
        self.param = param  # the parameter it is (or quantizes): names the layer that reads it


class _Exporter:
    def __init__(self, gm: torch.fx.GraphModule, example_inputs: tuple, opset: int, dynamic_batch: bool):
        self.gm, self.example_inputs, self.opset, self.dynamic_batch = gm, example_inputs, opset, dynamic_batch
        self.modules = dict(gm.named_modules())
        self.first_name: dict[int, str] = {}
        for name, mod in self.modules.items():
            self.first_name.setdefault(id(mod), name)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}  # name -> the parameter's values (a view, not a copy)
        self.by_content: dict[tuple, list] = {}  # (shape, sum) -> [(initializer, values)] with those
        self.same_as: dict[str, str] = {}  # parameter name -> the initializer with the same values
        self.values: dict[torch.fx.Node, object] = {}  # _Value, or a torch.Tensor for get_attr
        self.used_names: dict[str, int] = {}
        self.scope_calls: dict[str, int] = {}
        self.value_info: list[onnx.ValueInfoProto] = []
        self.typed: set[str] = set()
        self.computed: dict[tuple, str] = {}  # (op, inputs, attributes) -> output, for common subexpressions

    # -- naming as the TorchScript exporter does: a module call's scope is its attribute name, numbered per call
    # (blocks.0.conv -> /conv, blocks.1.conv or a second call -> /conv_1, blocks.0.0 -> /blocks.0.0); ops in it
    # /conv/Conv, /conv/Constant_1; output tensors <node name>_output_0. Functional layers (qcompile's int8 convs
    # and linears) are named after the module owning their weight (/layer1.0.conv1/Conv; TorchScript: /Conv_7).
    def _scope(self, target: str) -> str:
        # a module's first qualified name, from its last atom that is not a number (layer1.0.conv1 -> conv1,
        # features.0.2 -> features.0.2), as torch.onnx's _unqualified_variable_name
        atoms = self.first_name.get(id(self.modules.get(target)), target).split(".")
        i = max((k for k, a in enumerate(atoms) if not a.isnumeric()), default=0)
        last = ".".join(atoms[i:])
        n = self.scope_calls.get(last, 0)
        self.scope_calls[last] = n + 1
        return last if n == 0 else f"{last}_{n}"

    def _node_name(self, scope: str, op: str) -> str:
        base = f"/{scope}/{op}" if scope else f"/{op}"
        n = self.used_names.get(base, 0)
        self.used_names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def _emit(self, op: str, inputs: list[str], shape: list, scope: str, domain: str = "", **attrs) -> _Value:
        node = helper.make_node(op, inputs, [], domain=domain or None, **attrs)
        # the same operator on the same inputs twice is computed once, as the TorchScript exporter's common
        # subexpression elimination does (a module called twice on one tensor, its weight's quantizer marker on
        # every call); not the Constant nodes it writes after that pass (see _clip)
        key = None
        if op != "Constant":
            key = (domain, op, tuple(inputs), tuple(a.SerializeToString() for a in node.attribute))
            if key in self.computed:
                return _Value(self.computed[key], shape)
        node.name = self._node_name(scope, op)
        node.output.append(f"{node.name}_output_0")
        self.nodes.append(node)
        if key is not None:
            self.computed[key] = node.output[0]
        return _Value(node.output[0], shape)

    # -- operands ----------------------------------------------------------------------------------------------
    def _tensor(self, arg) -> _Value:
        if not isinstance(arg, torch.fx.Node) or arg not in self.values:
            raise Unsupported(f"operand {arg!r}")
        v = self.values[arg]
        if isinstance(v, torch.Tensor):  # a parameter or buffer read by get_attr: an initializer
            return self._initializer(arg.target, v)
        return v

    def _initializer(self, name: str, t: torch.Tensor) -> _Value:
        if t.dtype != torch.float32:
            raise Unsupported(f"{name}: {t.dtype}")
        shape = [int(d) for d in t.shape]
        if name not in self.initializers and name not in self.same_as:
            array = t.detach().cpu().numpy()
            # bit-identical parameters (layers cloned and not trained apart) are stored once (the TorchScript
            # exporter feeds the copy through an Identity node); readers of the copy read the first
            key = (tuple(shape), float(array.sum(dtype=np.float64)) if array.size else 0.0)  # a cheap first filter
            twins = self.by_content.setdefault(key, [])
            first = next((other for other, values in twins if np.array_equal(values, array)), None)
            if first is not None:
                self.same_as[name] = first
            else:
                twins.append((name, array))
                self.initializers[name] = array
        return _Value(self.same_as.get(name, name), shape, param=name)

    # -- the graph ---------------------------------------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.example_inputs):
            raise Unsupported("inputs")
        from .export import input_names_for

        in_names = input_names_for(len(placeholders), self.gm)
        graph_inputs = []
        for node, name, x in zip(placeholders, in_names, self.example_inputs):
            if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() < 1:
                raise Unsupported("input dtype")
            shape = [None if (i == 0 and self.dynamic_batch) else int(d) for i, d in enumerate(x.shape)]
            self.values[node] = _Value(name, shape)
            graph_inputs.append(_value_info(name, shape))
        out_node = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out_node = node
                continue
            if node.op == "get_attr":
                self.values[node] = _attr(self.gm, node.target)
                continue
            handler = {"call_module": self._call_module, "call_function": self._call_function,
                       "call_method": self._call_method}.get(node.op)
            if handler is None:
                raise Unsupported(node.op)
            result = handler(node)
            self._check_shape(node, result)
            self.values[node] = result
        return self._finish(out_node, graph_inputs)

    def _check_shape(self, node: torch.fx.Node, v: _Value) -> None:
        # where a shape propagation recorded the shape, it must be the one derived here (a cheap second opinion)
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if shape is not None and len(shape) == len(v.shape):
            if any(a is not None and a != int(b) for a, b in zip(v.shape, shape)):
                raise Unsupported(f"{node.name}: shape {v.shape} vs {list(shape)}")
        elif shape is not None:
            raise Unsupported(f"{node.name}: rank")

    def _finish(self, out_node, graph_inputs) -> onnx.ModelProto:
        out = out_node.args[0] if out_node is not None else None
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if not outs or not all(isinstance(n, torch.fx.Node) for n in outs) or len(set(outs)) != len(outs):
            raise Unsupported("outputs")
        out_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
        producers = {o: n for n in self.nodes for o in n.output}
        uses: dict[str, int] = {}
        for n in self.nodes:
            for i in n.input:
                uses[i] = uses.get(i, 0) + 1
        for n in self.nodes:
            # a BatchNormalization that alone reads a Conv: the TorchScript exporter folds it into the Conv (an fp32
            # compile, where no pass folded it); that is its file to write
            conv = producers.get(n.input[0]) if n.op_type == "BatchNormalization" else None
            if conv is not None and conv.op_type == "Conv" and uses.get(conv.output[0], 0) == 1:
                raise Unsupported("batch norm after conv")
        graph_outputs, seen = [], set()
        for node, name in zip(outs, out_names):
            v = self.values.get(node)
            if not isinstance(v, _Value) or v.name not in producers or v.name in seen:
                raise Unsupported("an output is an input, a constant or another output")  # TorchScript adds Identity
            seen.add(v.name)
            self._rename(v.name, name)
            graph_outputs.append(_value_info(name, v.shape))
        read = {i for n in self.nodes for i in n.input}
        graph_inputs = [v for v in graph_inputs if v.name in read]  # an unused input is dropped, as TorchScript does
        graph = helper.make_graph(self.nodes, "main_graph", graph_inputs, graph_outputs, value_info=self.value_info)
        opsets = [helper.make_opsetid("", self.opset)]
        if any(hasattr(m, "prepare_export") for m in self.gm.modules()):
            opsets.append(helper.make_opsetid(MARKER_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="pytorch",
                                  producer_version=torch.__version__.split("+")[0])
        model.ir_version = IR_VERSION
        # the weights go straight into the model's own graph, one tensor at a time: through make_graph's list and
        # make_model's copy of the graph they were held three times over at once (a 54M-weight MLP's export
        # peaked at 3x its float weights)
        for name, array in self.initializers.items():
            model.graph.initializer.append(numpy_helper.from_array(array, name))
        return model

    def _rename(self, old: str, new: str) -> None:
        for n in self.nodes:
            for i, o in enumerate(n.output):
                if o == old:
                    n.output[i] = new
            for i, x in enumerate(n.input):
                if x == old:
                    n.input[i] = new
        for v in self.value_info:
            if v.name == old:
                v.name = new

    # -- call_module -------------------------------------------------------------------------------------------
    def _call_module(self, node: torch.fx.Node) -> _Value:
        mod = self.modules.get(node.target)
        if mod is None or mod._forward_hooks or mod._forward_pre_hooks or node.kwargs:
            raise Unsupported(f"module {node.target}")
        scope = self._scope(node.target)
        kind = type(mod)
        if kind is FakeQuantize:
            x = self._tensor(node.args[0])
            if not mod.enabled:
                return x
            if mod.observer is not None or not mod.calibrated or mod.qid < 0 or not hasattr(mod, "frozen_params"):
                raise Unsupported("quantizer not ready for export")
            # the TorchScript exporter records the type of a custom op's output (shape inference cannot)
            out = self._emit(MARKER_OP, [x.name], x.shape, scope, domain=MARKER_DOMAIN, qid=int(mod.qid))
            if out.name not in self.typed:  # not a second call merged into the first
                self.typed.add(out.name)
                self.value_info.append(_value_info(out.name, out.shape))
            out.param = x.param
            return out
        if kind is IntegerOutput:
            return self._tensor(node.args[0])
        if kind is Int8Add:
            return self._add(node.args[0], node.args[1], scope)
        if kind is Int8GlobalAvgPool:
            return self._global_pool(mod.pool, node.args[0], f"{scope}/pool")
        if kind is Int8AvgPool:
            pool = mod.pool
            return self._avg_pool(node.args[0], pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
                                  pool.count_include_pad, _AVGPOOL_MODULES[type(pool)], f"{scope}/pool")
        if kind is Int8Mul:
            return self._mul(node.args[0], node.args[1], scope)
        if kind in (Int8Sigmoid, nn.Sigmoid):
            return self._unary("Sigmoid", node.args[0], scope)
        if kind is nn.SiLU:
            return self._silu(node.args[0], scope)
        if kind is nn.Hardswish:
            return self._unary("HardSwish", node.args[0], scope)
        if kind is nn.Hardsigmoid:
            return self._unary("HardSigmoid", node.args[0], scope, alpha=1.0 / 6)
        if kind in (nn.Identity,) or (kind is nn.Dropout and not mod.training) or _eval_stochastic_depth(mod):
            return self._tensor(node.args[0])
        if kind is nn.ReLU:
            x = self._tensor(node.args[0])
            return self._emit("Relu", [x.name], x.shape, scope)
        if kind is nn.LeakyReLU:
            return self._leaky_relu(node.args[0], mod.negative_slope, scope)
        if kind in (nn.ReLU6, nn.Hardtanh):
            return self._clip(node.args[0], float(mod.min_val), float(mod.max_val), scope)
        if kind in _CONV_MODULES:
            if mod.padding_mode != "zeros":
                raise Unsupported("conv padding")
            w = self._initializer(f"{node.target}.weight", mod.weight)
            b = self._initializer(f"{node.target}.bias", mod.bias) if mod.bias is not None else None
            return self._conv(node.args[0], w, b, mod.stride, mod.padding, mod.dilation, mod.groups,
                              _CONV_MODULES[kind], scope)
        if kind is nn.Linear:
            b = self._initializer(f"{node.target}.bias", mod.bias) if mod.bias is not None else None
            return self._linear(node.args[0], self._initializer(f"{node.target}.weight", mod.weight), b, scope)
        if kind is nn.LayerNorm:
            if not mod.elementwise_affine or mod.bias is None:
                raise Unsupported("layer norm without affine parameters")
            return self._layer_norm(node.args[0], mod.normalized_shape,
                                    self._initializer(f"{node.target}.weight", mod.weight),
                                    self._initializer(f"{node.target}.bias", mod.bias), mod.eps, scope)
        if kind is nn.GELU:
            return self._unary("Gelu", node.args[0], scope, approximate=mod.approximate)
        if kind in _MAXPOOL_MODULES:
            if mod.return_indices:
                raise Unsupported("max pool indices")
            return self._max_pool(node.args[0], mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                  mod.ceil_mode, _MAXPOOL_MODULES[kind], scope)
        if kind in _GAP_MODULES:
            return self._global_pool(mod, node.args[0], scope)
        if kind in _AVGPOOL_MODULES:
            if getattr(mod, "divisor_override", None) is not None:
                raise Unsupported("avg pool divisor")
            return self._avg_pool(node.args[0], mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                                  mod.count_include_pad, _AVGPOOL_MODULES[kind], scope)
        if kind in _BN_MODULES:
            return self._batch_norm(mod, node.target, node.args[0], _BN_MODULES[kind], scope)
        if kind is nn.Flatten:
            return self._flatten(node.args[0], mod.start_dim, mod.end_dim, scope)
        raise Unsupported(f"module {kind.__name__}")

    # -- call_function / call_method ---------------------------------------------------------------------------
    def _call_function(self, node: torch.fx.Node) -> _Value:
        fn, args, kwargs = node.target, node.args, dict(node.kwargs)
        if fn in _CONV_FUNCS:
            kwargs.pop("units", None)
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            a = dict(zip(names, args))
            for k, v in kwargs.items():
                if k not in names or k in a:
                    raise Unsupported(f"conv argument {k}")
                a[k] = v
            w = self._tensor(a["weight"])
            b = self._tensor(a["bias"]) if a.get("bias") is not None else None
            n = _CONV_FUNCS[fn]
            return self._conv(a["input"], w, b, a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1),
                              a.get("groups", 1), n, "")
        if fn in _LINEAR_FUNCS:
            kwargs.pop("units", None)
            bias = args[2] if len(args) > 2 else kwargs.pop("bias", None)
            if kwargs or len(args) > 3 or len(args) < 2:
                raise Unsupported("linear arguments")
            return self._linear(args[0], self._tensor(args[1]), self._tensor(bias) if bias is not None else None, "")
        if fn in _RELU_FUNCS:
            kwargs.pop("inplace", None)
            if kwargs or len(args) != 1:
                raise Unsupported("relu arguments")
            x = self._tensor(args[0])
            return self._emit("Relu", [x.name], x.shape, "")
        if fn is F.leaky_relu:
            kwargs.pop("inplace", None)
            slope = args[1] if len(args) > 1 else kwargs.pop("negative_slope", 0.01)
            if kwargs or len(args) > 3 or not isinstance(slope, (int, float)):
                raise Unsupported("leaky_relu arguments")
            return self._leaky_relu(args[0], slope, "")
        if fn is F.relu6:
            kwargs.pop("inplace", None)
            if kwargs or len(args) != 1:
                raise Unsupported("relu6 arguments")
            return self._clip(args[0], 0.0, 6.0, "")
        if fn in _ADD_FUNCS:
            if kwargs or len(args) != 2:
                raise Unsupported("add arguments")
            return self._add(args[0], args[1], "")
        if fn in _MUL_FUNCS:
            if kwargs or len(args) != 2:
                raise Unsupported("mul arguments")
            return self._mul(args[0], args[1], "")
        if fn in _SIGMOID_FUNCS or fn in (F.silu, F.hardswish, F.hardsigmoid):
            kwargs.pop("inplace", None)
            if kwargs or len(args) != 1:
                raise Unsupported(f"{fn.__name__} arguments")
            if fn is F.silu:
                return self._silu(args[0], "")
            if fn is F.hardswish:
                return self._unary("HardSwish", args[0], "")
            if fn is F.hardsigmoid:
                return self._unary("HardSigmoid", args[0], "", alpha=1.0 / 6)
            return self._unary("Sigmoid", args[0], "")
        if fn in _FLATTEN_FUNCS:
            start = args[1] if len(args) > 1 else kwargs.pop("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.pop("end_dim", -1)
            if kwargs or len(args) > 3:
                raise Unsupported("flatten arguments")
            return self._flatten(args[0], start, end, "")
        if fn is F.adaptive_avg_pool2d:
            if kwargs or len(args) != 2:
                raise Unsupported("adaptive pool arguments")
            return self._gap(args[0], args[1], 2, "")
        if fn is F.layer_norm:
            names = ("input", "normalized_shape", "weight", "bias", "eps")
            a = dict(zip(names, args))
            for k, v in kwargs.items():
                if k not in names or k in a:
                    raise Unsupported(f"layer_norm argument {k}")
                a[k] = v
            if a.get("weight") is None or a.get("bias") is None:
                raise Unsupported("layer norm without affine parameters")
            return self._layer_norm(a["input"], a["normalized_shape"], self._tensor(a["weight"]),
                                    self._tensor(a["bias"]), a.get("eps", 1e-5), "")
        if fn is F.gelu:
            approximate = args[1] if len(args) > 1 else kwargs.pop("approximate", "none")
            if kwargs or len(args) > 2:
                raise Unsupported("gelu arguments")
            return self._unary("Gelu", args[0], "", approximate=approximate)
        if fn is torch.permute:
            dims = args[1] if len(args) > 1 else kwargs.pop("dims", None)
            if kwargs or len(args) > 2 or not isinstance(dims, (list, tuple)):
                raise Unsupported("permute arguments")
            return self._permute(args[0], dims, "")
        if fn in _CAT_FUNCS:
            tensors = args[0] if args else kwargs.pop("tensors", None)
            dim = args[1] if len(args) > 1 else kwargs.pop("dim", kwargs.pop("axis", 0))
            if kwargs or len(args) > 2:
                raise Unsupported("cat arguments")
            return self._cat(tensors, dim, "")
        raise Unsupported(f"function {getattr(fn, '__name__', fn)}")

    def _call_method(self, node: torch.fx.Node) -> _Value:
        if node.target == "flatten":
            args, kwargs = list(node.args), dict(node.kwargs)
            start = args[1] if len(args) > 1 else kwargs.pop("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.pop("end_dim", -1)
            if kwargs or len(args) > 3:
                raise Unsupported("flatten arguments")
            return self._flatten(args[0], start, end, "")
        if node.target == "relu" and len(node.args) == 1 and not node.kwargs:
            x = self._tensor(node.args[0])
            return self._emit("Relu", [x.name], x.shape, "")
        if node.target == "sigmoid" and len(node.args) == 1 and not node.kwargs:
            return self._unary("Sigmoid", node.args[0], "")
        if node.target == "mul" and len(node.args) == 2 and not node.kwargs:
            return self._mul(node.args[0], node.args[1], "")
        if node.target == "permute" and len(node.args) >= 2 and not node.kwargs:
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            if not all(isinstance(d, int) for d in dims):
                raise Unsupported("permute arguments")
            return self._permute(node.args[0], dims, "")
        raise Unsupported(f"method {node.target}")

    # -- the operators -----------------------------------------------------------------------------------------
    def _conv(self, x_arg, w: _Value, b: Optional[_Value], stride, padding, dilation, groups, n: int,
              scope: str) -> _Value:
        x = self._tensor(x_arg)
        if not isinstance(groups, int):
            raise Unsupported("conv groups")
        s, d = _tuple(stride, n, "stride"), _tuple(dilation, n, "dilation")
        if len(x.shape) != n + 2 or len(w.shape) != n + 2 or any(v is None for v in x.shape[1:]):
            raise Unsupported("conv rank")
        k = w.shape[2:]
        if padding == "valid":
            begin, end = [0] * n, [0] * n
        elif padding == "same":  # PyTorch's rule (stride 1 only): the odd one of d*(k-1) goes on the right
            if any(v != 1 for v in s):
                raise Unsupported("conv padding")
            begin = [dd * (kk - 1) // 2 for dd, kk in zip(d, k)]
            end = [dd * (kk - 1) - b for dd, kk, b in zip(d, k, begin)]
        elif isinstance(padding, str):
            raise Unsupported("conv padding")
        else:
            begin = end = _tuple(padding, n, "padding")
        if x.shape[1] != w.shape[1] * groups or (b is not None and b.shape != [w.shape[0]]):
            raise Unsupported("conv channels")
        spatial = [(i + pb + pe - dd * (kk - 1) - 1) // ss + 1
                   for i, pb, pe, dd, kk, ss in zip(x.shape[2:], begin, end, d, k, s)]
        if any(v <= 0 for v in spatial):
            raise Unsupported("conv output size")
        if not scope:  # a functional conv: named after the module that owns its weight (layer1.0.conv1 -> /.../Conv)
            scope = _owner(w.param)
        inputs = [x.name, w.name] + ([b.name] if b is not None else [])
        return self._emit("Conv", inputs, [x.shape[0], w.shape[0]] + spatial, scope,
                          dilations=d, group=groups, kernel_shape=list(k), pads=begin + end, strides=s)

    def _linear(self, x_arg, w: _Value, b: Optional[_Value], scope: str) -> _Value:
        x = self._tensor(x_arg)
        if len(x.shape) < 2 or len(w.shape) != 2 or x.shape[-1] != w.shape[1] or \
                (b is not None and b.shape != [w.shape[0]]):
            raise Unsupported("linear shapes")
        if not scope:
            scope = _owner(w.param)
        shape = x.shape[:-1] + [w.shape[0]]
        if len(x.shape) == 2 and b is not None:
            return self._emit("Gemm", [x.name, w.name, b.name], shape, scope, alpha=1.0, beta=1.0, transB=1)
        # other inputs (a Linear on channels-last tokens: ConvNeXt), or no bias, as the TorchScript exporter writes
        # them: MatMul(x, Transpose(W)), then Add(b, ·), bias first. A constant W it transposes at export time, into
        # an initializer of its own naming: that file is its to write
        if w.name in self.initializers or w.name in self.same_as.values():
            raise Unsupported("linear of a constant weight on a rank != 2 input")
        wt = self._emit("Transpose", [w.name], [w.shape[1], w.shape[0]], scope, perm=[1, 0])
        out = self._emit("MatMul", [x.name, wt.name], shape, scope)
        return self._emit("Add", [b.name, out.name], shape, scope) if b is not None else out

    def _layer_norm(self, x_arg, normalized_shape, w: _Value, b: _Value, eps, scope: str) -> _Value:
        """``LayerNormalization`` over the last ``len(normalized_shape)`` axes, as the TorchScript exporter writes
        ``nn.LayerNorm`` and ``F.layer_norm`` (ConvNeXt's, on channels-last tensors)."""
        x = self._tensor(x_arg)
        dims = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
        if not dims or not all(isinstance(d, int) for d in dims) or len(dims) >= len(x.shape) or \
                x.shape[-len(dims):] != dims or w.shape != dims or b.shape != dims or not isinstance(eps, float):
            raise Unsupported("layer norm shapes")
        return self._emit("LayerNormalization", [x.name, w.name, b.name], x.shape, scope, axis=-len(dims),
                          epsilon=eps)

    def _permute(self, x_arg, dims, scope: str) -> _Value:
        x = self._tensor(x_arg)
        perm = list(dims)
        if sorted(perm) != list(range(len(x.shape))) or perm[0] != 0:
            raise Unsupported("permute")  # negative axes, or the batch moved
        return self._emit("Transpose", [x.name], [x.shape[p] for p in perm], scope, perm=perm)

    def _leaky_relu(self, x_arg, slope: float, scope: str) -> _Value:
        x = self._tensor(x_arg)
        return self._emit("LeakyRelu", [x.name], x.shape, scope, alpha=float(slope))

    def _clip(self, x_arg, lo: float, hi: float, scope: str) -> _Value:
        x = self._tensor(x_arg)
        key = ("clip", x.name, lo, hi)  # merged on the bounds' values: their Constant nodes are new each time
        if key in self.computed:
            return _Value(self.computed[key], x.shape)
        consts = []
        for v in (lo, hi):  # the TorchScript exporter writes the bounds as two Constant nodes
            consts.append(self._emit("Constant", [], [], scope,
                                     value=numpy_helper.from_array(np.array(v, dtype=np.float32), "")).name)
        out = self._emit("Clip", [x.name] + consts, x.shape, scope)
        self.computed[key] = out.name
        return out

    def _add(self, a_arg, b_arg, scope: str) -> _Value:
        a, b = self._tensor(a_arg), self._tensor(b_arg)
        return self._emit("Add", [a.name, b.name], _broadcast(a.shape, b.shape), scope)  # a bias: broadcasting

    def _mul(self, a_arg, b_arg, scope: str) -> _Value:
        """``a * b`` of two tensors, broadcasting (a squeeze-excite gate times its features)."""
        a, b = self._tensor(a_arg), self._tensor(b_arg)
        return self._emit("Mul", [a.name, b.name], _broadcast(a.shape, b.shape), scope)

    def _unary(self, op: str, x_arg, scope: str, **attrs) -> _Value:
        x = self._tensor(x_arg)
        return self._emit(op, [x.name], x.shape, scope, **attrs)

    def _silu(self, x_arg, scope: str) -> _Value:
        # the TorchScript exporter's silu: Mul(x, Sigmoid(x))
        x = self._tensor(x_arg)
        gate = self._emit("Sigmoid", [x.name], x.shape, scope)
        return self._emit("Mul", [x.name, gate.name], x.shape, scope)

    def _max_pool(self, x_arg, kernel, stride, padding, dilation, ceil_mode, n: int, scope: str) -> _Value:
        x, k, s, p, spatial = self._pool_geometry(x_arg, kernel, stride, padding, dilation, ceil_mode, n)
        d = _tuple(dilation, n, "dilation")
        return self._emit("MaxPool", [x.name], x.shape[:2] + spatial, scope,
                          ceil_mode=int(bool(ceil_mode)), dilations=d, kernel_shape=k, pads=p + p, strides=s)

    def _pool_geometry(self, x_arg, kernel, stride, padding, dilation, ceil_mode, n: int):
        """A pooling window's input, kernel, strides, padding and output size by PyTorch's rule."""
        x = self._tensor(x_arg)
        if len(x.shape) != n + 2 or any(v is None for v in x.shape[1:]):
            raise Unsupported("pool rank")
        k = _tuple(kernel, n, "kernel")
        s = _tuple(stride if stride not in (None, ()) else kernel, n, "stride")
        p, d = _tuple(padding, n, "padding"), _tuple(dilation, n, "dilation")
        spatial = []
        for i, kk, ss, pp, dd in zip(x.shape[2:], k, s, p, d):
            span = i + 2 * pp - dd * (kk - 1) - 1
            o = (math.ceil(span / ss) if ceil_mode else span // ss) + 1
            if ceil_mode and (o - 1) * ss >= i + pp:  # PyTorch: the last window must start inside the input
                o -= 1
            spatial.append(o)
        if any(v <= 0 for v in spatial):
            raise Unsupported("pool output size")
        return x, k, s, p, spatial

    def _avg_pool(self, x_arg, kernel, stride, padding, ceil_mode, count_include_pad, n: int, scope: str) -> _Value:
        """``AveragePool`` as the TorchScript exporter writes an eval-mode ``nn.AvgPool1d/2d/3d`` (a DenseNet
        transition); the output size by PyTorch's rule, as for max pooling."""
        x, k, s, p, spatial = self._pool_geometry(x_arg, kernel, stride, padding, 1, ceil_mode, n)
        return self._emit("AveragePool", [x.name], x.shape[:2] + spatial, scope, ceil_mode=int(bool(ceil_mode)),
                          count_include_pad=int(bool(count_include_pad)), kernel_shape=k, pads=p + p, strides=s)

    def _batch_norm(self, mod: nn.Module, target: str, x_arg, ranks: tuple, scope: str) -> _Value:
        """An eval-mode BatchNorm the passes kept (one after a concatenation or a residual sum: DenseNet,
        pre-activation ResNets) as the TorchScript exporter writes it: ``BatchNormalization`` of the running
        statistics, ``momentum`` 1 - the module's, ``training_mode`` 0."""
        x = self._tensor(x_arg)
        if mod.training or not mod.affine or not mod.track_running_stats or mod.momentum is None or \
                len(x.shape) not in ranks or x.shape[1] is None:
            raise Unsupported("batch norm")
        names = ("weight", "bias", "running_mean", "running_var")
        params = [self._initializer(f"{target}.{name}", getattr(mod, name)) for name in names]
        return self._emit("BatchNormalization", [x.name] + [v.name for v in params], x.shape, scope,
                          epsilon=float(mod.eps), momentum=1.0 - float(mod.momentum), training_mode=0)

    def _global_pool(self, mod: nn.Module, x_arg, scope: str) -> _Value:
        n = _GAP_MODULES.get(type(mod))
        if n is None or mod._forward_hooks or mod._forward_pre_hooks:
            raise Unsupported("pool module")
        return self._gap(x_arg, mod.output_size, n, scope)

    def _gap(self, x_arg, output_size, n: int, scope: str) -> _Value:
        x = self._tensor(x_arg)
        if _tuple(output_size, n, "output size") != [1] * n or len(x.shape) != n + 2:
            raise Unsupported("adaptive pool")
        return self._emit("GlobalAveragePool", [x.name], x.shape[:2] + [1] * n, scope)

    def _cat(self, tensors, dim, scope: str) -> _Value:
        """``torch.cat`` along a channel or spatial axis of tensors of one rank (an Inception or DenseNet block):
        ``Concat(axis=dim)``, the axis as written, as the TorchScript exporter writes it."""
        if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
            raise Unsupported("cat operands")
        xs = [self._tensor(t) for t in tensors]
        rank = len(xs[0].shape)
        axis = dim + rank if dim < 0 else dim
        if not 0 < axis < rank or any(len(x.shape) != rank for x in xs):
            raise Unsupported("cat axis or ranks")  # along the batch: its size is dynamic
        for i in range(rank):
            if i != axis and len({x.shape[i] for x in xs}) != 1:
                raise Unsupported("cat shapes")
        if any(x.shape[axis] is None for x in xs):
            raise Unsupported("cat shapes")
        if any(x.shape[axis] == 0 for x in xs):
            raise Unsupported("cat of an empty tensor")  # the TorchScript exporter leaves it out
        shape = list(xs[0].shape)
        shape[axis] = sum(x.shape[axis] for x in xs)
        return self._emit("Concat", [x.name for x in xs], shape, scope, axis=dim)

    def _flatten(self, x_arg, start, end, scope: str) -> _Value:
        x = self._tensor(x_arg)
        rank = len(x.shape)
        if start != 1 or end not in (-1, rank - 1) or rank < 3 or any(v is None for v in x.shape[1:]):
            raise Unsupported("flatten")
        return self._emit("Flatten", [x.name], [x.shape[0], int(np.prod(x.shape[1:]))], scope, axis=1)


def _broadcast(a: list, b: list) -> list:
    """The shape of an elementwise op on shapes ``a`` and ``b`` (``None``: the dynamic batch dimension)."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:  # a batch against a fixed size other than 1: not provable here
            raise Unsupported("broadcast shapes")
    return out[::-1]


def _eval_stochastic_depth(mod: nn.Module) -> bool:
    """torchvision's ``StochasticDepth`` in eval mode (EfficientNet, ConvNeXt): the identity."""
    return type(mod).__name__ == "StochasticDepth" and type(mod).__module__.startswith("torchvision.") \
        and not mod.training


def _owner(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def _attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise Unsupported(f"attribute {target}")
    return obj


def _value_info(name: str, shape: list) -> onnx.ValueInfoProto:
    dims = ["batch" if d is None else d for d in shape]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def export_fx(gm: torch.nn.Module, example_inputs: Sequence[torch.Tensor], opset: int,
              dynamic_batch: bool = True) -> Optional[onnx.ModelProto]:
    """The ONNX model of ``gm`` written from its fx graph, or ``None`` where a node is not one the fast path
    handles (then ``torch.onnx.export`` exports it). ``example_inputs``: one tensor per model input."""
    if not enabled() or not isinstance(getattr(gm, "graph", None), torch.fx.Graph) or gm.training:
        return None
    try:
        return _Exporter(gm, tuple(example_inputs), opset, dynamic_batch).run()
    except Unsupported:
        return None
