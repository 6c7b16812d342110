"""QuantizeResiduals, ShareInt8Params, BindIntegerAdds (passes/int8_region.py) and the Int8Add simulation."""
from __future__ import annotations

import collections
import operator

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.frontend import trace
from qcompile.ir import LayerConfig
from qcompile.passes.base import Pipeline, fake_quantizer, verify
from qcompile.passes.fold_bn import FoldBatchNorm
from qcompile.passes.insert_quant import InsertQuantizers
from qcompile.passes.int8_region import (QuantizeResiduals, ShareInt8Params, int8_source, is_int8_act,
                                         is_rectifier)
from qcompile.passes.quantize_outputs import QuantizeOutputs
from qcompile.passes.select import SelectLayers
from qcompile.qmodules import FakeQuantize, Int8Add, Int8Mul, Int8Sigmoid
from qcompile.runtime.session import session
from tests.models import MobileNetLike, ResidualCNN, example_input


def cfg(scheme: str, bits: int) -> LayerConfig:
    return LayerConfig(action="quant", wscheme=scheme, wbits=bits, ascheme=scheme, abits=bits, reason="test")


def structured(model, config: LayerConfig):
    gm = trace(model, example_input(model))
    passes = [FoldBatchNorm(), SelectLayers(config, first_last="quant"), InsertQuantizers(), QuantizeOutputs()]
    return Pipeline(passes, check=True)(gm).gm


def adds(gm):
    """Adds of two activations (not the classifier's bias add)."""
    return [n for n in gm.graph.nodes if ((n.op == "call_function" and n.target in (operator.add, torch.add))
            or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), Int8Add)))
            and all(a.op != "get_attr" for a in n.args[:2])]


def optimized_ops(onnx_model: onnx.ModelProto, tmp_path) -> collections.Counter:
    path = str(tmp_path / "optimized.onnx")
    session(onnx_model.SerializeToString(), optimized_model_path=path)
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def int8_ops(model: nn.Module, size: int, tmp_path, calib_images: int = 32, **options) -> collections.Counter:
    """``model`` given the BatchNorm statistics of random inputs, compiled at uniform W8A8 on seeded calibration
    images of ``size`` x ``size`` and validated on as many others (asserted: validation passes, and the simulation's
    output SQNR against the float model is over 30 dB): the op counts of onnxruntime's optimized session."""
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, size, size))
    model.eval()
    calib = torch.randn(calib_images, 3, size, size, generator=torch.Generator().manual_seed(1))
    x = torch.randn(calib_images, 3, size, size, generator=torch.Generator().manual_seed(2))
    result = qcompile.compile(model, calib=calib, validation_inputs=x, scheme="uniform", bits=8, **options)
    assert result.report.passed, result.report.summary()
    with torch.no_grad():
        ref, sim = model(x), result.model(x)
    assert 10 * torch.log10(ref.pow(2).mean() / (ref - sim).pow(2).mean()) > 30
    return optimized_ops(result.onnx_model, tmp_path)


# --- structure ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [ResidualCNN, lambda seed: MobileNetLike(seed=seed, act="relu6")])
def test_every_residual_add_reads_and_produces_8bit_codes(factory):
    gm = structured(factory(seed=0), cfg("uniform", 8))
    result = QuantizeResiduals()(gm)
    assert result.modified
    verify(result.gm)
    found = adds(result.gm)
    assert found
    for add in found:
        assert all(is_int8_act(fake_quantizer(gm, a)) for a in add.args[:2]), add.args  # both addends are codes
        tail = next(iter(add.users))
        if is_rectifier(gm, tail):
            add = tail
        assert all(is_int8_act(fake_quantizer(gm, u)) for u in add.users), list(add.users)
    again = QuantizeResiduals()(result.gm)
    assert again.modified is False


def test_the_skip_connection_reads_the_quantized_tensor():
    gm = structured(ResidualCNN(seed=0), cfg("uniform", 8))
    # before: the block input reaches the downsample conv through its quantizer, the add does not see it at all
    gm = QuantizeResiduals()(gm).gm
    pool = next(n for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(n.target), nn.AdaptiveAvgPool2d))
    assert int8_source(gm, pool.args[0]) is not None  # the pooled tensor is codes, and so is the pool's output:
    assert is_int8_act(fake_quantizer(gm, next(iter(pool.users))))


def test_below_8_bits_the_residual_add_sums_8_bit_codes_that_the_sub_8_bit_quantizers_re_quantize():
    """At APoT W4A4 the block's conv2 and downsample (4-bit inputs) get 8-bit outputs (QuantizeOutputs), so the add
    sums codes (QLinearAdd); its sum gets 8-bit codes, which the average pool reads. Before, the two convs and the add
    ran float."""
    gm = structured(ResidualCNN(seed=0), cfg("apot", 4))
    result = QuantizeResiduals()(gm)
    assert result.modified
    verify(result.gm)
    (add,) = adds(result.gm)
    assert all(is_int8_act(fake_quantizer(gm, a)) for a in add.args[:2]), add.args
    tail = next(iter(add.users))
    assert is_rectifier(gm, tail)
    (q,) = tail.users
    assert is_int8_act(fake_quantizer(gm, q))
    again = QuantizeResiduals()(result.gm)
    assert again.modified is False


def test_a_sum_only_sub_8_bit_quantizers_read_is_re_quantized_from_its_codes():
    """The sum of two 8-bit codes read only by 4-bit quantizers (a MobileNetV2 block before a stride change) gets
    8-bit codes, and the 4-bit quantizers read them: the float sum then has no other reader, and onnxruntime fuses
    the add into QLinearAdd."""
    gm = structured(MobileNetLike(seed=0, act="relu6"), cfg("uniform", 4))
    gm = QuantizeResiduals()(gm).gm
    found = adds(gm)
    assert found
    for add in found:
        assert all(is_int8_act(fake_quantizer(gm, a)) for a in add.args[:2]), add.args
        assert len(add.users) == 1 and is_int8_act(fake_quantizer(gm, next(iter(add.users)))), list(add.users)


# --- parameters ---------------------------------------------------------------------------------------------------


class PoolThenConv(nn.Module):
    """conv → ReLU6 → maxpool → conv: the max-pooled codes need no re-quantization, the clip none either."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU6()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight.mul_(8.0)  # so that ReLU6 clips

    def forward(self, x):
        return self.conv2(self.pool(self.act(self.conv1(x))))


def test_requantization_after_maxpool_shares_parameters_and_clip_is_respected(tmp_path):
    model = PoolThenConv().eval()
    calib = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, calib=calib, scheme="uniform", bits=8, keep_first_last="quant",
                              calib_method="minmax")
    gm = result.model
    qnodes = {n.target: n for n in gm.graph.nodes if is_int8_act(fake_quantizer(gm, n))}
    after_pool = next(n for n in qnodes.values() if n.args[0].op == "call_module"
                      and isinstance(gm.get_submodule(n.args[0].target), nn.MaxPool2d))
    before_pool = gm.get_submodule(after_pool.args[0].args[0].target)
    shared = gm.get_submodule(after_pool.target)
    assert torch.equal(shared.alpha, before_pool.alpha) and torch.equal(shared.zero_point, before_pool.zero_point)
    assert float(before_pool.alpha) <= 6.0  # inside ReLU6's range: onnxruntime drops the Clip
    assert result.report.passed and result.report.max_abs == 0.0, result.report.summary()
    ops = optimized_ops(result.onnx_model, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["Clip"] == 0 and ops["MaxPool"] + ops["NhwcMaxPool"] == 1, ops
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1, ops  # one at each end of the graph


def test_share_params_second_run_is_unmodified():
    model = PoolThenConv().eval()
    calib = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    gm = qcompile.compile(model, calib=calib, scheme="uniform", bits=8, keep_first_last="quant",
                          validate=False).model
    assert ShareInt8Params()(gm).modified is False


# --- whole models in onnxruntime ----------------------------------------------------------------------------------


@pytest.mark.parametrize("factory,n_adds", [(ResidualCNN, 1), (lambda seed: MobileNetLike(seed=seed, act="relu6"), 1)])
def test_int8_region_runs_on_integer_kernels_bit_exact(factory, n_adds, tmp_path):
    model = factory(seed=0)
    calib = example_input(model, seed=1, batch=64)
    x = example_input(model, seed=2, batch=64)
    result = qcompile.compile(model, calib=calib, validation_inputs=x, scheme="uniform", bits=8,
                              keep_first_last="quant")
    report = result.report
    assert report.passed and report.max_abs == 0.0, report.summary()
    assert report.extra["codes_differ"] == 0 and report.extra["codes_total"] > 0
    ops = optimized_ops(result.onnx_model, tmp_path)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert ops["QLinearConv"] == n_convs and ops["QLinearAdd"] == n_adds, ops
    assert ops["QLinearGlobalAveragePool"] == 1, ops
    assert ops["Clip"] == 0 and ops["Relu"] == 0 and ops["Conv"] == 0, ops
    assert ops["QGemm"] == 1 and ops["Add"] == 0 and ops["Gemm"] == 0, ops  # the classifier, bias included
    # one QuantizeLinear at the input; QGemm writes the float output itself
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0, ops


def test_no_int8_outputs_keeps_the_residual_path_float(tmp_path):
    model = ResidualCNN(seed=0)
    calib = example_input(model, seed=1, batch=32)
    result = qcompile.compile(model, calib=calib, scheme="uniform", bits=8, keep_first_last="quant",
                              int8_outputs=False)
    assert not any(isinstance(m, Int8Add) for m in result.model.modules())
    assert optimized_ops(result.onnx_model, tmp_path)["QLinearAdd"] == 0


# --- Int8Add against onnxruntime's QLinearAdd ---------------------------------------------------------------------


def qdq_add_model(params, n: int, op: str = "Add") -> bytes:
    names = ["sa", "za", "sb", "zb", "sc", "zc"]
    inits = [numpy_helper.from_array(np.array(v, np.float32 if nm.startswith("s") else np.uint8), nm)
             for v, nm in zip(params, names)]
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
             helper.make_node(op, ["fa", "fb"], ["s"]),
             helper.make_node("QuantizeLinear", ["s", "sc", "zc"], ["c"])]
    io = [helper.make_tensor_value_info(nm, TensorProto.UINT8, [n]) for nm in ("a", "b", "c")]
    graph = helper.make_graph(nodes, "qladd", io[:2], io[2:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model.SerializeToString()


def asym(scale: float, zp: int) -> FakeQuantize:
    fq = FakeQuantize("uniform_asym", 8, signed=False)
    fq.set_params(torch.tensor(scale * 255, dtype=torch.float32), zp)
    return fq


def test_int8_add_equals_onnxruntime_qlinearadd_code_for_code(tmp_path):
    rng = np.random.default_rng(0)
    n, differ, total = 4096, 0, 0
    for _ in range(60):
        scales = rng.uniform(0.001, 0.1, 3)
        zps = rng.integers(0, 256, 3)
        fa, fb, fc = (asym(float(s), int(z)) for s, z in zip(scales, zps))
        # the scales the file stores are the quantizers' own float32 units
        units = [float(qcompile.quant.unit_from_alpha(f.alpha, f.levelset)) for f in (fa, fb, fc)]
        sess = session(qdq_add_model([units[0], zps[0], units[1], zps[1], units[2], zps[2]], n),
                       optimized_model_path=str(tmp_path / "opt.onnx"))
        assert [node.op_type for node in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["QLinearAdd"]
        qa, qb = rng.integers(0, 256, n).astype(np.uint8), rng.integers(0, 256, n).astype(np.uint8)
        want = sess.run(None, {"a": qa, "b": qb})[0]
        a = qcompile.quant.dequantize(torch.from_numpy(qa.astype(np.int32)), fa.alpha, fa.levelset,
                                      zero_point=fa.zero_point)
        b = qcompile.quant.dequantize(torch.from_numpy(qb.astype(np.int32)), fb.alpha, fb.levelset,
                                      zero_point=fb.zero_point)
        got = Int8Add(fa, fb, fc).codes(a, b).numpy()
        differ += int((got != want).sum())
        total += n
    assert differ == 0, f"{differ} of {total} codes differ"


def test_int8_add_table_path_equals_onnxruntime_and_the_direct_arithmetic(tmp_path):
    # a large tensor goes through the 256x256 table of output codes: code for code what QLinearAdd gives, and what
    # the direct arithmetic gives, also where one operand broadcasts (a gate-like (N, C, 1, 1) operand)
    rng = np.random.default_rng(1)
    n = 300_000
    for _ in range(6):
        scales, zps = rng.uniform(0.001, 0.1, 3), rng.integers(0, 256, 3)
        fa, fb, fc = (asym(float(s), int(z)) for s, z in zip(scales, zps))
        units = [float(qcompile.quant.unit_from_alpha(f.alpha, f.levelset)) for f in (fa, fb, fc)]
        sess = session(qdq_add_model([units[0], zps[0], units[1], zps[1], units[2], zps[2]], n))
        qa, qb = rng.integers(0, 256, n).astype(np.uint8), rng.integers(0, 256, n).astype(np.uint8)
        want = sess.run(None, {"a": qa, "b": qb})[0]
        a, b = (qcompile.quant.dequantize(torch.from_numpy(q.astype(np.int32)), f.alpha, f.levelset,
                                          zero_point=f.zero_point) for q, f in ((qa, fa), (qb, fb)))
        add = Int8Add(fa, fb, fc)
        got = add.codes(a, b)
        assert int((got.numpy() != want).sum()) == 0
        a4, b4 = a.reshape(30, 10, 25, 40), b[:300].reshape(30, 10, 1, 1)
        direct = add.code_of(*add.input_codes(a4, b4))
        assert torch.equal(add.codes(a4, b4), direct) and direct.shape == (30, 10, 25, 40)


class ResidualOutput(nn.Module):
    """conv → ReLU → conv, plus the block input: the graph's output is a residual add."""

    INPUT_SHAPE = (2, 4, 8, 8)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class HalfFloatAdd(nn.Module):
    """An add of an int8 layer's output and a float tensor (the input through a float op nothing quantizes)."""

    INPUT_SHAPE = (2, 4, 8, 8)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.head(self.conv(x) + torch.sigmoid(x))


def test_a_residual_add_that_is_the_graph_output_stays_float():
    gm = structured(ResidualOutput().eval(), cfg("uniform", 8))
    QuantizeResiduals()(gm)
    (add,) = adds(gm)
    assert all(is_int8_act(fake_quantizer(gm, a)) for a in add.args[:2])  # QLinearAdd-ready inputs...
    assert [u.op for u in add.users] == ["output"]  # ...but no 8-bit logits: nothing integer reads the sum


def test_an_add_with_a_float_operand_is_left_as_it_was():
    gm = structured(HalfFloatAdd().eval(), cfg("uniform", 8))
    (add,) = adds(gm)
    before = tuple(add.args)
    result = QuantizeResiduals()(gm)
    assert result.modified is False and tuple(add.args) == before


def qdq_gap_model(params, shape) -> bytes:
    names = ["sx", "zx", "sy", "zy"]
    inits = [numpy_helper.from_array(np.array(v, np.float32 if nm.startswith("s") else np.uint8), nm)
             for v, nm in zip(params, names)]
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["fx"]),
             helper.make_node("GlobalAveragePool", ["fx"], ["p"]),
             helper.make_node("QuantizeLinear", ["p", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, "qlgap", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [shape[0], shape[1], 1, 1])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model.SerializeToString()


def test_int8_global_avg_pool_equals_onnxruntime_code_for_code(tmp_path):
    from qcompile.qmodules import Int8GlobalAvgPool

    rng = np.random.default_rng(1)
    differ, total = 0, 0
    for trial in range(40):
        shape = (2, 64, int(rng.integers(1, 15)), int(rng.integers(1, 15)))
        fx, fy = asym(float(rng.uniform(0.001, 0.1)), int(rng.integers(0, 256))), \
            asym(float(rng.uniform(0.0005, 0.05)), int(rng.integers(0, 256)))
        ux, uy = (float(qcompile.quant.unit_from_alpha(f.alpha, f.levelset)) for f in (fx, fy))
        sess = session(qdq_gap_model([ux, int(fx.zero_point), uy, int(fy.zero_point)], shape),
                       optimized_model_path=str(tmp_path / "opt.onnx"))
        ops = [node.op_type for node in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
        assert "QLinearGlobalAveragePool" in ops, ops
        qx = rng.integers(0, 256, shape).astype(np.uint8)
        want = sess.run(None, {"x": qx})[0]
        x = qcompile.quant.dequantize(torch.from_numpy(qx.astype(np.int32)), fx.alpha, fx.levelset,
                                      zero_point=fx.zero_point)
        y = Int8GlobalAvgPool(nn.AdaptiveAvgPool2d(1), fx, fy)(x)
        got = fy.quantize(y).numpy()
        differ += int((got != want).sum())
        total += want.size
    assert differ == 0, f"{differ} of {total} codes differ"


def qdq_avgpool_model(params, shape, out_shape, **attrs) -> bytes:
    names = ["sx", "zx", "sy", "zy"]
    inits = [numpy_helper.from_array(np.array(v, np.float32 if nm.startswith("s") else np.uint8), nm)
             for v, nm in zip(params, names)]
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["fx"]),
             helper.make_node("AveragePool", ["fx"], ["p"], **attrs),
             helper.make_node("QuantizeLinear", ["p", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, "qlavg", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, list(out_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model.SerializeToString()


# (kernel, stride, padding, count_include_pad, ceil_mode, spatial): NASNet's 3x3 stride-1 pool that excludes pads,
# Inception's that counts them, a strided one, a 1-D one, a window over the whole input (onnxruntime's global
# kernel), and ceil-mode ones that do not count pads (windows past the input's end)
AVG_POOLS = [((3, 3), (1, 1), (1, 1), False, False, (9, 7)), ((3, 3), (1, 1), (1, 1), True, False, (9, 7)),
             ((3, 3), (2, 2), (1, 1), False, False, (11, 8)), ((2, 2), (2, 2), (0, 0), True, False, (8, 6)),
             ((3,), (1,), (1,), False, False, (13,)), ((5, 4), (1, 1), (0, 0), True, False, (5, 4)),
             ((3, 3), (2, 2), (0, 0), False, True, (10, 9)), ((2, 3), (2, 2), (1, 1), False, True, (7, 8))]


@pytest.mark.parametrize("kernel,stride,padding,count_pad,ceil,spatial", AVG_POOLS)
def test_int8_avg_pool_equals_onnxruntime_qlinearaveragepool_code_for_code(kernel, stride, padding, count_pad, ceil,
                                                                            spatial, tmp_path):
    # onnxruntime adds the output zero point before it rounds (round(y / S_y + Z_y)); QuantizeLinear's
    # round(y / S_y) + Z_y put an average a few ulps from a half step one code apart (timm's nasnetalarge FAILed
    # validation; near-equal input and output scales make such averages common)
    from qcompile.qmodules import Int8AvgPool

    rng = np.random.default_rng(3)
    pool_cls = nn.AvgPool1d if len(kernel) == 1 else nn.AvgPool2d
    pool = pool_cls(kernel, stride, padding, ceil_mode=ceil, count_include_pad=count_pad)
    differ, total = 0, 0
    for trial in range(12):
        shape = (2, 32, *spatial)
        ux = float(rng.uniform(0.001, 0.1))
        uy = ux * (1 + float(rng.choice([0.0, 1.28e-5, -6e-6, rng.uniform(-0.3, 0.3)])))
        fx, fy = asym(ux, int(rng.integers(0, 256))), asym(uy, int(rng.integers(0, 256)))
        ux, uy = (float(qcompile.quant.unit_from_alpha(f.alpha, f.levelset)) for f in (fx, fy))
        qx = rng.integers(0, 256, shape).astype(np.uint8)
        x = qcompile.quant.dequantize(torch.from_numpy(qx.astype(np.int32)), fx.alpha, fx.levelset,
                                      zero_point=fx.zero_point)
        out_shape = pool(x).shape
        attrs = dict(kernel_shape=list(kernel), strides=list(stride), pads=list(padding) * 2,
                     count_include_pad=int(count_pad), ceil_mode=int(ceil))
        sess = session(qdq_avgpool_model([ux, int(fx.zero_point), uy, int(fy.zero_point)], shape, out_shape,
                                         **attrs), optimized_model_path=str(tmp_path / "opt.onnx"))
        ops = [node.op_type for node in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
        assert ops == ["QLinearAveragePool"], ops
        want = sess.run(None, {"x": qx})[0]
        y = Int8AvgPool(pool, fx, fy, kernel, stride, padding, count_pad, ceil)(x)
        got = fy.quantize(y).numpy()
        differ += int((got != want).sum())
        total += want.size
    assert differ == 0, f"{differ} of {total} codes differ"


class PoolBranchCell(nn.Module):
    """NASNet's cell pattern: ``avg_pool(x) + x`` where ``x`` is a layer output (8-bit codes), pool 3x3 with pads
    not counted, or a strided function-form pool."""

    def __init__(self, functional: bool):
        super().__init__()
        torch.manual_seed(0)
        self.functional = functional
        self.c0, self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 10, 1)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x):
        x = self.c1(torch.relu(self.c0(x)))
        y = F.avg_pool2d(x, 3, 2, 1) + x[..., ::2, ::2] if self.functional else self.pool(x) + x
        return self.c2(torch.relu(y)).mean((2, 3))


@pytest.mark.parametrize("functional", [False, True])
def test_an_average_pool_of_codes_runs_as_qlinearaveragepool_bit_exact(functional, tmp_path):
    model = PoolBranchCell(functional).eval()
    result, x = compile_w8a8(model, (3, 16, 16), torch.randn)
    assert result.report.passed and result.report.extra["codes_differ"] == 0, result.report.summary()
    assert sum(type(m).__name__ == "Int8AvgPool" for m in result.model.modules()) == 1
    assert optimized_ops(result.onnx_model, tmp_path)["QLinearAveragePool"] == 1


class PoolAfterMove(nn.Module):
    """An average pool (or a global one) of a layer's codes reached through an op that moves or selects them:
    a max-pool (NASNet's reduction cells), a zero or reflection pad, a slice, a reshape; or an upsampling."""

    def __init__(self, via: str, global_pool: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.via, self.global_pool = via, global_pool
        self.c0, self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 10, 1)

    def forward(self, x):
        x = self.c1(torch.relu(self.c0(x)))
        z = {"maxpool": lambda: F.max_pool2d(x, 3, 1, 1), "pad": lambda: F.pad(x, (1, 1, 1, 1)),
             "reflect": lambda: F.pad(x, (1, 1, 1, 1), mode="reflect"), "slice": lambda: x[:, :, 1:, 1:],
             "reshape": lambda: x.reshape(x.shape[0], 16, 8, 32).reshape(x.shape),
             "upsample": lambda: F.interpolate(x, scale_factor=2, mode="nearest")}[self.via]()
        if self.global_pool:
            return self.c2(F.adaptive_avg_pool2d(z, 1)).flatten(1)
        y = F.avg_pool2d(z, 3, 2 if self.via == "upsample" else 1, 0 if "pad" in self.via or self.via == "reflect"
                         else 1, count_include_pad=False)
        return self.c2(torch.relu(F.interpolate(y, size=x.shape[-2:]) + x)).mean((2, 3))


@pytest.mark.parametrize("via", ["maxpool", "pad", "reflect", "slice", "reshape", "upsample"])
@pytest.mark.parametrize("global_pool", [False, True], ids=["pool", "global pool"])
def test_a_pool_of_codes_moved_by_a_max_pool_pad_slice_or_reshape_is_bound_as_onnxruntime_fuses_it(via, global_pool,
                                                                                                tmp_path):
    # onnxruntime moves the DequantizeLinear forward through max-pools, pads, slices and reshapes (or the file runs
    # them on the codes) and still fuses the pool into QLinearAveragePool / QLinearGlobalAveragePool, whose rounding
    # (zero point added before it) is not QuantizeLinear's: the simulation left such a pool float, one code apart
    # near half steps. Through a nearest Resize an AveragePool stays float in onnxruntime, and in the simulation (a
    # global pool of the upsampled codes is re-quantized first, and fused).
    result, _ = compile_w8a8(PoolAfterMove(via, global_pool).eval(), (3, 16, 16), torch.randn)
    assert result.report.passed and result.report.extra["codes_differ_local"] == 0, result.report.summary()
    kind = "Int8GlobalAvgPool" if global_pool else "Int8AvgPool"
    bound = sum(type(m).__name__ == kind for m in result.model.modules())
    fused = optimized_ops(result.onnx_model, tmp_path)["QLinearGlobalAveragePool" if global_pool
                                                       else "QLinearAveragePool"]
    assert bound == fused, (bound, fused)  # the simulation computes what onnxruntime runs
    assert bound == (0 if via == "upsample" and not global_pool else 1), bound


def compile_w8a8(model, shape, draw, **options):
    """Uniform W8A8 with 32 calibration and 64 validation inputs drawn by ``draw`` (seeded); (result, inputs)."""
    calib = draw(32, *shape, generator=torch.Generator().manual_seed(1))
    x = draw(64, *shape, generator=torch.Generator().manual_seed(2))
    return qcompile.compile(model, calib=calib, validation_inputs=x, scheme="uniform", bits=8, **options), x


class HardswishSE(nn.Module):
    """MobileNetV3's pattern: a Hardswish output (float, not codes) pooled by a squeeze-excite block and, at the
    head, by the classifier's global pool."""

    def __init__(self, gate_conv: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.gate_conv = gate_conv
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.side = nn.Conv2d(16, 16, 1)
        self.fc1 = nn.Conv2d(16, 8, 1)
        self.fc2 = nn.Conv2d(8, 16, 1)
        self.proj = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = F.hardswish(self.dw(F.hardswish(self.stem(x))))
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        if self.gate_conv:  # x also read by a conv after the pool: its input quantizer comes later in the graph
            x = F.hardswish(self.proj(self.side(x) * s))
        else:
            x = F.hardswish(self.proj(x * s))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("gate_conv", [False, True])
def test_a_pool_of_a_float_activation_that_an_int8_layer_reads_pools_codes(gate_conv, tmp_path):
    model = HardswishSE(gate_conv).eval()
    result, x = compile_w8a8(model, (3, 16, 16), torch.randn, keep_first_last="quant")
    assert result.report.passed, result.report.summary()
    pools = [m for m in result.model.modules() if type(m).__name__ == "Int8GlobalAvgPool"]
    assert len(pools) == 2
    ops = optimized_ops(result.onnx_model, tmp_path)
    # float pools in onnxruntime's NHWC int8 chain cost a transpose pair each (4 here before)
    assert ops["QLinearGlobalAveragePool"] == 2 and ops["GlobalAveragePool"] == 0, ops
    assert ops["Transpose"] <= 2, ops
    with torch.no_grad():
        ref = model(x)
        sim = result.model(x)
    assert 10 * torch.log10(ref.pow(2).mean() / (ref - sim).pow(2).mean()) > 30


class ConcatPoolBranch(nn.Module):
    """Inception's pattern: a concat read by a 1x1 conv and by a max-pool branch."""

    def __init__(self, pool_first: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.pool_first = pool_first
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.a, self.b = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, padding=1)
        self.c, self.d = nn.Conv2d(32, 32, 1), nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        if self.pool_first:  # the conv's input quantizer comes after the pool in the graph
            p = F.relu(self.d(F.max_pool2d(x, 3, 1, 1)))
            y = torch.cat([F.relu(self.c(x)), p], 1)
        else:
            y = torch.cat([F.relu(self.c(x)), F.relu(self.d(F.max_pool2d(x, 3, 1, 1)))], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize("pool_first", [False, True])
def test_a_max_pool_branch_of_a_quantized_concat_reads_its_codes(pool_first, tmp_path):
    model = ConcatPoolBranch(pool_first).eval()
    result, _ = compile_w8a8(model, (1, 16, 16), torch.rand)
    assert result.report.passed and result.report.extra["codes_differ"] == 0, result.report.summary()
    gm = result.model
    pool = next(n for n in gm.graph.nodes if n.target is F.max_pool2d)
    assert is_int8_act(fake_quantizer(gm, pool.args[0]))  # the concat's quantizer, not the float concat
    ops = optimized_ops(result.onnx_model, tmp_path)
    # the first concat and the pool in int8 (a float pool of the float concat: 6 transposes and a float Concat)
    assert ops["QLinearConcat"] >= 1 and ops["MaxPool"] == 0 and ops["Transpose"] <= 2, ops


@pytest.mark.parametrize("tie_prone", [False, True])
def test_int8_mul_equals_onnxruntime_qlinearmul_code_for_code(tie_prone, tmp_path):
    """Int8Mul against onnxruntime's QLinearMul (fused from DequantizeLinear x2 -> Mul -> QuantizeLinear). Tie-prone:
    S_a = S_b = 1 and S_c just off 2, so p·r lands within rounding of .5 (an fma there changes 13 in 250 k codes)."""
    rng = np.random.default_rng(1)
    n, differ, total = 4096, 0, 0
    for _ in range(40):
        if tie_prone:
            fa, fb = asym(1.0, 128), asym(1.0, 128)
            fc = asym(float(np.float32(2.0 * (1 + int(rng.integers(-40, 40)) * 2.0 ** -23))), int(rng.integers(0, 256)))
        else:
            fa, fb, fc = (asym(float(s), int(z)) for s, z in zip(rng.uniform(0.001, 0.1, 3), rng.integers(0, 256, 3)))
        units = [float(qcompile.quant.unit_from_alpha(f.alpha, f.levelset)) for f in (fa, fb, fc)]
        zps = [int(f.zero_point) for f in (fa, fb, fc)]
        sess = session(qdq_add_model([units[0], zps[0], units[1], zps[1], units[2], zps[2]], n, op="Mul"),
                       optimized_model_path=str(tmp_path / "opt.onnx"))
        assert [node.op_type for node in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["QLinearMul"]
        qa, qb = rng.integers(0, 256, n).astype(np.uint8), rng.integers(0, 256, n).astype(np.uint8)
        want = sess.run(None, {"a": qa, "b": qb})[0]
        a, b = (qcompile.quant.dequantize(torch.from_numpy(q.astype(np.int32)), f.alpha, f.levelset,
                                          zero_point=f.zero_point) for q, f in ((qa, fa), (qb, fb)))
        got = Int8Mul(fa, fb, fc).codes(a, b).numpy()
        differ += int((got != want).sum())
        total += n
    assert differ == 0, f"{differ} of {total} codes differ"


class SiLUSE(nn.Module):
    """EfficientNet's squeeze-excite: a SiLU output pooled, a sigmoid gate, the gate times the SiLU output."""

    def __init__(self, gate: str = "sigmoid"):
        super().__init__()
        torch.manual_seed(0)
        self.gate = {"sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}[gate]
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.proj = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.silu(self.stem(x))
        g = self.gate(self.se2(F.silu(self.se1(F.adaptive_avg_pool2d(x, 1)))))
        x = F.relu(self.proj(x * g))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_silu_and_squeeze_excite_gates_run_in_int8_bit_exact(gate, tmp_path):
    """The SiLUs and the SE product of a W8A8 file ran in float between DequantizeLinear and QuantizeLinear
    (quantize_static's file: QLinearSigmoid and QLinearMul): an MBConv model ran 1.2-1.5x slower than that file.
    Now each SiLU is an 8-bit sigmoid gate times its input, the SE product multiplies codes, and the simulation
    computes onnxruntime's codes: not one differs (before: float Sigmoids, a few codes on rounding ties)."""
    model = SiLUSE(gate).eval()
    calib = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    result = qcompile.compile(model, calib=calib, validation_inputs=x, scheme="uniform", bits=8,
                              keep_first_last="quant")
    assert result.report.passed and result.report.extra["code_mismatch"] == 0, result.report.summary()
    sigmoids = 3 if gate == "sigmoid" else 2  # the two SiLUs' gates, and the SE gate where it is a sigmoid
    assert sum(isinstance(m, Int8Mul) for m in result.model.modules()) == 3  # two SiLUs, the SE product
    assert sum(isinstance(m, Int8Sigmoid) for m in result.model.modules()) == sigmoids
    ops = optimized_ops(result.onnx_model, tmp_path)
    assert ops["QLinearMul"] == 3 and ops["QLinearSigmoid"] == sigmoids and ops["Transpose"] <= 2, ops
    assert ops["Sigmoid"] == 0 and ops["Mul"] == 0, ops
    # the report tells a layer's output, its SiLU gate and its product apart (all three were "output of stem"; the
    # product was then "input of proj, se1", layers that read other quantizers' codes)
    places = [layer["where"] for layer in result.report.layers]
    assert len(places) == len(set(places)), places
    assert {"output of stem", "output of stem after sigmoid", "output of stem after mul",
            "input of proj after mul"} <= set(places), places
    with torch.no_grad():
        ref, sim = model(x), result.model(x)
    assert 10 * torch.log10(ref.pow(2).mean() / (ref - sim).pow(2).mean()) > 30


def test_int8_sigmoid_equals_onnxruntime_qlinearsigmoid_on_every_code(tmp_path):
    """Int8Sigmoid's table against onnxruntime's QLinearSigmoid fused in a file, for input and output parameters of
    both storage types: all 256 codes, for 30 random parameter sets."""
    rng = np.random.default_rng(3)
    for i in range(30):
        fin = asym(float(rng.uniform(0.005, 0.2)), int(rng.integers(0, 256)))
        fout = asym(float(rng.uniform(1 / 300, 1 / 200)), int(rng.integers(0, 20)))
        units = [float(qcompile.quant.unit_from_alpha(f.alpha, f.levelset)) for f in (fin, fout)]
        names = ["sa", "za", "sc", "zc"]
        params = [units[0], int(fin.zero_point), units[1], int(fout.zero_point)]
        inits = [numpy_helper.from_array(np.array(v, np.float32 if nm.startswith("s") else np.uint8), nm)
                 for v, nm in zip(params, names)]
        nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
                 helper.make_node("Sigmoid", ["fa"], ["s"]),
                 helper.make_node("QuantizeLinear", ["s", "sc", "zc"], ["c"])]
        io = [helper.make_tensor_value_info(nm, TensorProto.UINT8, [1, 256, 2, 2]) for nm in ("a", "c")]
        model = helper.make_model(helper.make_graph(nodes, "qlsig", io[:1], io[1:], inits),
                                  opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        sess = session(model.SerializeToString(), optimized_model_path=str(tmp_path / "opt.onnx"))
        assert [node.op_type for node in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["QLinearSigmoid"]
        codes = np.repeat(np.arange(256, dtype=np.uint8), 4).reshape(1, 256, 2, 2)
        want = sess.run(None, {"a": codes})[0]
        a = qcompile.quant.dequantize(torch.from_numpy(codes.astype(np.int32)), fin.alpha, fin.levelset,
                                      zero_point=fin.zero_point)
        got = Int8Sigmoid(fin, fout).codes(a).numpy()
        assert np.array_equal(got, want), f"set {i}: {(got != want).sum()} codes differ"


def silu_forms(model_class, calib_shape) -> tuple[tuple[int, int], int]:
    """((Int8Mul, Int8Sigmoid) modules, float F.silu nodes) of a W8A8 compile of a seeded ``model_class()``."""
    torch.manual_seed(0)
    model = model_class().eval()
    calib = torch.randn(*calib_shape, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, calib=calib, scheme="uniform", bits=8, keep_first_last="quant")
    assert result.report.passed, result.report.summary()
    mods = list(result.model.modules())
    gates = (sum(isinstance(m, Int8Mul) for m in mods), sum(isinstance(m, Int8Sigmoid) for m in mods))
    return gates, sum(n.target is F.silu for n in result.model.graph.nodes)


def test_a_silu_whose_output_a_float_op_reads_stays_float():
    """Only a SiLU that 8-bit quantizers alone read becomes a gate times its input: one whose output is the model's
    float output keeps its single float op (nothing reads its codes, no second quantization)."""

    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return F.silu(self.conv2(F.silu(self.conv(x))))

    gates, float_silus = silu_forms(Tail, (16, 3, 10, 10))
    assert gates == (1, 1) and float_silus == 1  # the last one, float


def test_no_int8_outputs_keeps_silu_whole():
    """--no-int8-outputs keeps the previous form: SiLU in float between the quantizers."""
    model = SiLUSE("sigmoid").eval()
    calib = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, calib=calib, scheme="uniform", bits=8, int8_outputs=False)
    assert result.report.passed, result.report.summary()
    assert not any(isinstance(m, (Int8Mul, Int8Sigmoid)) for m in result.model.modules())
    assert sum(n.target is F.silu for n in result.model.graph.nodes) == 2


def test_a_silu_read_through_a_flatten_is_a_gate_with_its_own_codes(tmp_path):
    """onnxruntime fuses QLinearMul only with the QuantizeLinear right after the Mul: a SiLU that the classifier
    reads through a flatten is split into a gate whose product gets 8-bit codes right after it (split without them,
    its gate was quantized and the product stayed a float Mul; unsplit, a float Sigmoid and Mul). The flatten then
    moves uint8 codes, and the whole head runs on integer kernels."""

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(torch.flatten(F.silu(self.conv(x)), 1))

    gates, float_silus = silu_forms(Head, (16, 3, 8, 8))
    assert gates == (1, 1) and float_silus == 0
    torch.manual_seed(0)
    calib = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "head.onnx")
    result = qcompile.compile(Head().eval(), calib=calib, output=path, scheme="uniform", bits=8,
                              keep_first_last="quant")
    assert result.report.passed, result.report.summary()
    ops = optimized_ops(onnx.load(path), tmp_path)
    assert ops["QLinearMul"] == 1 and ops["QLinearSigmoid"] == 1 and "Mul" not in ops and "Sigmoid" not in ops


def test_a_silu_after_a_residual_add_runs_in_int8(tmp_path):
    """silu(a + b) of two 8-bit code tensors: the add got no output codes (its reader, the SiLU, was no quantizer),
    so the add and the SiLU ran in float. Now QLinearAdd, QLinearSigmoid and QLinearMul, as quantize_static has it."""

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
            self.c3, self.fc = nn.Conv2d(16, 16, 1), nn.Linear(16, 10)

        def forward(self, x):
            a = F.relu(self.b1(self.c1(x)))
            y = F.silu(a + self.b2(self.c2(a)))
            return self.fc(F.adaptive_avg_pool2d(self.c3(y), 1).flatten(1))

    torch.manual_seed(0)
    model = Res().eval()
    calib = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    result = qcompile.compile(model, calib=calib, validation_inputs=x, scheme="uniform", bits=8,
                              keep_first_last="quant")
    assert result.report.passed and result.report.extra["code_mismatch"] == 0, result.report.summary()
    ops = optimized_ops(result.onnx_model, tmp_path)
    assert ops["QLinearAdd"] == 1 and ops["QLinearSigmoid"] == 1 and ops["QLinearMul"] == 1, ops
    assert ops["Add"] == 0 and ops["Sigmoid"] == 0 and ops["Mul"] == 0 and ops["DequantizeLinear"] <= 1, ops
    with torch.no_grad():
        ref, sim = model(x), result.model(x)
    assert 10 * torch.log10(ref.pow(2).mean() / (ref - sim).pow(2).mean()) > 45


def test_a_hand_written_mean_head_pools_codes(tmp_path):
    """``y.mean((2, 3))`` ran a float ReduceMean between DequantizeLinear and QuantizeLinear, and kept the SiLU before
    it float; written as a global pool (MeanAsGlobalPool), the head is the int8 chain nn.AdaptiveAvgPool2d gives."""

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(F.silu(self.bn(self.conv(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = Head().eval()
    calib = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, calib=calib, scheme="uniform", bits=8, keep_first_last="quant")
    assert result.report.passed and result.report.extra["code_mismatch"] == 0, result.report.summary()
    ops = optimized_ops(result.onnx_model, tmp_path)
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["QLinearSigmoid"] == 1 and ops["QLinearMul"] == 1, ops
    assert ops["ReduceMean"] == 0 and ops["DequantizeLinear"] == 0, ops


def test_int8_mul_broadcasts_either_operand(tmp_path):
    """An SE gate may come first (``g * x``): Int8Mul broadcasts a [N, C, 1, 1] code tensor against [N, C, H, W]
    on either side, code for code with onnxruntime's QLinearMul."""
    rng = np.random.default_rng(4)
    fa, fb, fc = asym(0.02, 3), asym(0.05, 120), asym(0.04, 60)
    units = [float(qcompile.quant.unit_from_alpha(f.alpha, f.levelset)) for f in (fa, fb, fc)]
    params = [units[0], int(fa.zero_point), units[1], int(fb.zero_point), units[2], int(fc.zero_point)]
    names = ["sa", "za", "sb", "zb", "sc", "zc"]
    inits = [numpy_helper.from_array(np.array(v, np.float32 if nm.startswith("s") else np.uint8), nm)
             for v, nm in zip(params, names)]
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
             helper.make_node("Mul", ["fa", "fb"], ["s"]),
             helper.make_node("QuantizeLinear", ["s", "sc", "zc"], ["c"])]
    io = [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 3, 1, 1]),
          helper.make_tensor_value_info("b", TensorProto.UINT8, [2, 3, 4, 4]),
          helper.make_tensor_value_info("c", TensorProto.UINT8, [2, 3, 4, 4])]
    model = helper.make_model(helper.make_graph(nodes, "qlmul", io[:2], io[2:], inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    sess = session(model.SerializeToString(), optimized_model_path=str(tmp_path / "opt.onnx"))
    assert [node.op_type for node in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["QLinearMul"]
    qa = rng.integers(0, 256, (2, 3, 1, 1)).astype(np.uint8)
    qb = rng.integers(0, 256, (2, 3, 4, 4)).astype(np.uint8)
    want = sess.run(None, {"a": qa, "b": qb})[0]
    a, b = (qcompile.quant.dequantize(torch.from_numpy(q.astype(np.int32)), f.alpha, f.levelset,
                                      zero_point=f.zero_point) for q, f in ((qa, fa), (qb, fb)))
    assert np.array_equal(Int8Mul(fa, fb, fc).codes(a, b).numpy(), want)
    assert np.array_equal(Int8Mul(fb, fa, fc).codes(b, a).numpy(), want)  # the other order, the same codes


class AuxHead(nn.Module):
    """A residual sum read first by the next block (4-bit) and then by an auxiliary head (a last layer: 8-bit)."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(16, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc3, self.fc4 = nn.Linear(d, d), nn.Linear(d, d)
        self.aux, self.head = nn.Linear(d, 3), nn.Linear(d, 5)

    def forward(self, x):
        h = F.relu(self.fc0(x))
        h = F.relu(h + self.fc2(F.relu(self.fc1(h))))
        g = F.relu(h + self.fc4(F.relu(self.fc3(h))))
        return self.head(g), self.aux(h)


@pytest.mark.parametrize("scheme", ["apot", "uniform"])
def test_a_sum_read_by_a_4_bit_and_a_later_8_bit_quantizer_keeps_the_graph_in_order(scheme):
    """The 4-bit quantizer re-reads the sum's codes from an 8-bit quantizer that came later in graph order: the
    compile stopped with "Argument 'act_fq6' of Node 'act_fq3' was used before it has been defined"."""
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    result = qcompile.compile(AuxHead().eval(), x[:1], calib=x, scheme=scheme, bits=4)
    assert result.report.passed and result.report.extra["codes_differ"] == 0, result.report.summary()
    assert len(adds(result.model)) == 2 and all(isinstance(result.model.get_submodule(n.target), Int8Add)
                                                for n in adds(result.model))


class TokenResidual(nn.Module):
    """x + fc2(relu(fc1(x))) on (B, T, d) tokens."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.emb, self.fc1, self.fc2, self.head = nn.Linear(8, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 10)

    def forward(self, x):
        x = F.relu(self.emb(x))
        return self.head((x + self.fc2(F.relu(self.fc1(x)))).mean(1))


def test_residual_sums_stay_as_they_were_above_4_bits_and_on_token_linears():
    """At 6 bits an extra 8-bit rounding of the sums cost ResNet blocks 0.7-2.6 dB; a Linear on tokens whose sum
    stays float ran slower with an 8-bit output (its bias split off). Neither gets one."""
    gm = structured(ResidualCNN(seed=0), cfg("uniform", 6))
    assert not any(n.target.startswith("out_fq") for n in gm.graph.nodes if n.op == "call_module")
    assert QuantizeResiduals()(gm).modified is False
    torch.manual_seed(0)
    calib = torch.randn(32, 16, 8)
    result = qcompile.compile(TokenResidual().eval(), calib[:1], calib=calib, scheme="uniform", bits=4)
    assert result.report.passed
    reports = [r for t in result.timings if t.name == "QuantizeOutputs" for r in t.report]
    assert not any(r.startswith("fc2") for r in reports), reports


class _FuseSum(nn.Module):
    """HRNet's fuse pattern: a residual block's output ``r`` is read by a sum written before the conv that also
    reads it (whose input quantizer InsertQuantizers puts just before that conv, after the sum)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        r = F.relu(self.b(h) + h)
        fused = r + self.d(h)
        later = self.c(r)
        return self.head((fused + later).mean((2, 3)))


def test_a_sum_read_before_the_layer_whose_quantizer_it_shares_compiles():
    """It crashed in QuantizeResiduals ("Argument 'act_fq2' of Node 'add_1' was used before it has been defined",
    timm's hrnet_w18_small): the earlier sum was given the later layer's input quantizer without moving it up."""
    torch.manual_seed(0)
    model = _FuseSum().eval()
    x = torch.randn(16, 3, 12, 12)
    result = qcompile.compile(model, x[:1], calib=x, output=None, scheme="uniform", bits=8)
    assert result.report.passed, result.report.failures
    assert result.report.extra["code_mismatch_local"] == 0.0
    verify(result.model)


def test_a_residual_add_read_by_a_leaky_relu_runs_on_integer_kernels(tmp_path):
    """CSPResNet's blocks end in ``act(x + shortcut)`` with a LeakyReLU: the sum was left float (an Add and a
    LeakyRelu between DequantizeLinear and QuantizeLinear, 13 of each in cspresnet50, 1.05x quantize_static's
    latency). The sum is now 8-bit codes: onnxruntime runs QLinearAdd and QLinearLeakyRelu, bit-exact."""
    def cbr(i, o, act=True):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o),
                             *([nn.ReLU()] if act else []))

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.b = cbr(3, 16), nn.Sequential(cbr(16, 16), cbr(16, 16, False))
            self.act, self.head = nn.LeakyReLU(0.01), nn.Conv2d(16, 8, 1)

        def forward(self, x):
            x = self.stem(x)
            return self.head(self.act(self.b(x) + x))

    torch.manual_seed(0)
    model = Res().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16))
    model.eval()
    calib, valid = torch.randn(32, 3, 16, 16), torch.randn(64, 3, 16, 16)
    result = qcompile.compile(model, calib[:1], calib=calib, validation_inputs=valid, scheme="uniform", bits=8)
    assert result.report.passed and result.report.extra["codes_differ"] == 0, result.report.summary()
    ops = optimized_ops(result.onnx_model, tmp_path)
    assert ops["QLinearAdd"] == 1 and ops["QLinearLeakyRelu"] == 1, ops
    assert not ops["Add"] and not ops["LeakyRelu"], ops


class _CBS(nn.Module):  # YOLOv8's Conv: conv, BatchNorm, SiLU
    def __init__(self, ci, co, k=1, s=1):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(ci, co, k, s, k // 2, bias=False), nn.BatchNorm2d(co)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)))


class _C2f(nn.Module):  # as ultralytics writes it: a list of chunks, bottleneck sums, one concatenation
    def __init__(self, c, n=2):
        super().__init__()
        self.c = c // 2
        self.cv1, self.cv2 = _CBS(c, c), _CBS((2 + n) * self.c, c)
        self.m = nn.ModuleList(nn.Sequential(_CBS(self.c, self.c, 3), _CBS(self.c, self.c, 3)) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(y[-1] + m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class _YoloLike(nn.Module):
    """A YOLOv8-style backbone and neck: C2f blocks, SPPF's chain of max-pools, nearest upsampling and a concat."""

    def __init__(self):
        super().__init__()
        self.stem, self.c2f1 = _CBS(3, 16, 3, 2), _C2f(16)
        self.down, self.c2f2 = _CBS(16, 32, 3, 2), _C2f(32)
        self.sppf1, self.sppf2 = _CBS(32, 16), _CBS(64, 32)
        self.pool, self.up = nn.MaxPool2d(5, 1, 2), nn.Upsample(scale_factor=2, mode="nearest")
        self.neck, self.head = _C2f(48, 1), nn.Conv2d(48, 8, 1)

    def forward(self, x):
        p1 = self.c2f1(self.stem(x))
        x = self.sppf1(self.c2f2(self.down(p1)))
        y1 = self.pool(x)
        y2 = self.pool(y1)
        x = self.sppf2(torch.cat((x, y1, y2, self.pool(y2)), 1))
        return self.head(self.neck(torch.cat([self.up(x), p1], 1)))


def test_a_yolov8_style_network_runs_in_int8_between_its_convolutions(tmp_path):
    """C2f's chunks, bottleneck sums and concatenation, SPPF's max-pools and the neck's upsampling ran in float
    between DequantizeLinear and QuantizeLinear (13 float SiLU, 6 float adds, 3 float concats in a small YOLOv8-style
    network; quantize_static's file has none). The SiLUs whose outputs only int8 ops read are now gates with 8-bit
    codes, and the splits, sums, pools and concatenations read codes: onnxruntime's QLinearConcat, QLinearAdd and
    uint8 max-pools, and the file agrees with the simulation."""
    torch.manual_seed(0)
    ops = int8_ops(_YoloLike(), 32, tmp_path, calib_images=16)
    # every SiLU (20; the head conv has none), every sum and every concatenation in int8
    assert ops["QLinearConcat"] == 5 and ops["QLinearAdd"] == 5 and ops["QLinearMul"] == 20, ops
    assert ops["Concat"] == ops["Sigmoid"] == ops["MaxPool"] == 0 and ops["NhwcMaxPool"] == 3, ops
    # what float arithmetic is left computes the chunks' bounds from the shape (Shape, Gather, Add, Div, Mul)
    assert ops["Add"] == ops["Mul"] == ops["Div"] == ops["Shape"] == 3 and ops["DequantizeLinear"] <= 5, ops


def _cbl(ci, co, k=1, s=1):  # conv, BatchNorm, LeakyReLU: CSPDarknet's ConvNormAct
    return nn.Sequential(nn.Conv2d(ci, co, k, s, k // 2, bias=False), nn.BatchNorm2d(co), nn.LeakyReLU(0.1))


class _CSPDark(nn.Module):
    """timm's CSPDarknet stage: expand, split in two, dark blocks (1x1, 3x3, shortcut add) on one half, then a
    transition conv of the concatenation."""

    def __init__(self):
        super().__init__()
        self.stem, self.exp = _cbl(3, 16, 3), _cbl(16, 32)
        self.blocks = nn.ModuleList(nn.Sequential(_cbl(16, 8), _cbl(8, 16, 3)) for _ in range(2))
        self.trans_b, self.trans = _cbl(16, 16), _cbl(32, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        xs, xb = self.exp(self.stem(x)).split(16, dim=1)
        for block in self.blocks:
            xb = xb + block(xb)
        x = self.trans(torch.cat([xs, self.trans_b(xb)], dim=1))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _Res2NetDown(nn.Module):
    """Res2Net's strided block: a 1x1 conv split in four; three parts through strided 3x3 convs, the last through an
    average pool; their concatenation into a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
                                   for _ in range(3))
        self.pool = nn.AvgPool2d(3, 2, 1)
        self.conv3 = nn.Sequential(nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        spx = torch.split(self.stem(x), 8, 1)
        out = [conv(spx[i]) for i, conv in enumerate(self.convs)] + [self.pool(spx[-1])]
        x = self.conv3(torch.cat(out, 1))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("factory, counts", [
    (_CSPDark, {"QLinearLeakyRelu": 8, "QLinearAdd": 2, "QLinearConcat": 1}),
    (_Res2NetDown, {"QLinearAveragePool": 1, "QLinearConcat": 1}),
])
def test_split_stages_run_in_int8(factory, counts, tmp_path):
    """A split whose parts go into shortcut adds, a pool and a concatenation: CSPDarknet's LeakyReLUs before the
    split and the adds ran in float between DequantizeLinear and QuantizeLinear (timm cspdarknet53 at 96 x 96: 33
    LeakyRelu, 23 Add, 5 Concat; 1.15x / 1.30x quantize_static's latency at batch 1 / 8), and Res2Net's pooled
    part too (4 float AveragePool, 1.08x / 1.12x). Now every one of them is an integer op, as in their files."""
    torch.manual_seed(0)
    ops = int8_ops(factory(), 16, tmp_path, keep_first_last="quant")
    for op, n in counts.items():
        assert ops[op] == n, ops
    for op in ("LeakyRelu", "Add", "Concat", "AveragePool", "Relu"):
        assert ops[op] == 0, ops
    assert ops["DequantizeLinear"] == 0 and ops["QuantizeLinear"] == 1, ops


class _RepBlock(nn.Module):
    """RepVGG / MobileOne in their training form: k x k and 1 x 1 conv-BN branches and an identity BatchNorm, summed
    (MobileOne's sum starts at 0 and adds each branch in a loop), then a ReLU."""

    def __init__(self, c, branches=1, identity=True, stride=1):
        super().__init__()
        self.kxk = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c))
                                 for _ in range(branches))
        self.scale = nn.Sequential(nn.Conv2d(c, c, 1, stride, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c) if identity else None

    def forward(self, x):
        out = self.scale(x) + (self.identity(x) if self.identity is not None else 0)
        for conv in self.kxk:
            out += conv(x)
        return F.relu(out)


class _RepNet(nn.Module):
    def __init__(self, branches):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(_RepBlock(16, branches, identity=False, stride=2), _RepBlock(16, branches),
                                    _RepBlock(16, branches))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class _LoopSum(_RepBlock):
    def forward(self, x):  # MobileOne without a scale branch or identity: out = 0, then out += each branch
        out = 0
        for conv in self.kxk:
            out += conv(x)
        return F.relu(out)


@pytest.mark.parametrize("branches", [1, 3])
def test_training_form_rep_blocks_sum_in_int8(branches, tmp_path):
    """RepVGG and MobileOne compiled in their training form: the sum with the identity BatchNorm, and (MobileOne)
    the sums of a loop started at 0, ran in float with their ReLU (timm repvgg_a0: 20 float Add and 17 Relu, 1.15x /
    1.21x quantize_static's latency; mobileone_s0: 99 Add, 1.10x / 1.32x). The identity BatchNorm's output is now
    codes, the ReLU before it is read through its codes, and ``0 + x`` is x: every sum is a QLinearAdd."""
    torch.manual_seed(0)
    model = _RepNet(branches)
    model.blocks.append(_LoopSum(16, branches))
    ops = int8_ops(model, 16, tmp_path, keep_first_last="quant")
    # the sums: branches (strided block), branches + 1 (each identity block), branches - 1 (the loop from 0)
    assert ops["QLinearAdd"] == 4 * branches + 1, ops
    assert ops["Add"] == ops["Relu"] == 0 and ops["BatchNormalization"] == 2, ops


class _GhostNet(nn.Module):
    """GhostNet's bottleneck: ghost modules (a conv, a cheap depthwise conv of its output, their concatenation cut to
    the output width), the second without activation, then the shortcut add; ReXNet's partial shortcut
    (``cat([x[:, :c] + shortcut, x[:, c:]])``) after it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.p1, self.c1 = nn.Sequential(nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12), nn.ReLU()), \
            nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12), nn.ReLU())
        self.p2, self.c2 = nn.Sequential(nn.Conv2d(24, 8, 1), nn.BatchNorm2d(8)), \
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8))
        self.expand = nn.Sequential(nn.Conv2d(15, 24, 1), nn.BatchNorm2d(24))
        self.proj, self.fc = nn.Conv2d(24, 24, 1), nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        y1 = self.p1(x)
        y = torch.cat([y1, self.c1(y1)], 1)[:, :24]
        y2 = self.p2(y)
        y = torch.cat([y2, self.c2(y2)], 1)[:, :15] + x[:, :15]  # a ghost module cut to 15 of its 16 channels
        z = self.expand(y)
        z = self.proj(torch.cat([z[:, :15] + y, z[:, 15:]], 1))
        return self.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))


def test_ghost_modules_and_partial_shortcuts_run_in_int8(tmp_path):
    """A concatenation read through a slice by a shortcut add (GhostNet's second ghost module) and the add of a slice
    (ReXNet's partial shortcut) ran in float between DequantizeLinear and QuantizeLinear (timm ghostnet_100 at
    96 x 96: 16 Concat and 16 Add, 1.06x / 1.15x quantize_static's latency). Slices of codes are codes now, and the
    concatenation's output gets codes for the add: QLinearConcat and QLinearAdd."""
    torch.manual_seed(0)
    ops = int8_ops(_GhostNet(), 16, tmp_path, keep_first_last="quant")
    assert ops["QLinearConcat"] == 3 and ops["QLinearAdd"] == 2, ops
    assert ops["Concat"] == ops["Add"] == 0, ops


class _SEThenReLU6(nn.Module):
    """ReXNet's block middle: a depthwise conv without activation, a squeeze-excite gate, then ReLU6 before the
    projection: the gate's product is read by the ReLU6, not by a quantizer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16))
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.pwl, self.fc = nn.Conv2d(16, 16, 1), nn.Linear(16, 10)

    def forward(self, x):
        x = self.dw(self.stem(x))
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        x = self.pwl(F.relu6(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_a_gate_product_read_by_relu6_runs_in_int8(tmp_path):
    """The product ran as a float Sigmoid and Mul between DequantizeLinear and QuantizeLinear (timm rexnet_100: 13
    of each). It now gets codes right after it: QLinearSigmoid and QLinearMul; the ReLU6 after it is implied by the
    next quantizer and onnxruntime drops it."""
    torch.manual_seed(0)
    ops = int8_ops(_SEThenReLU6(), 16, tmp_path, keep_first_last="quant")
    assert ops["QLinearMul"] == 1 and ops["QLinearSigmoid"] == 1, ops
    assert ops["Mul"] == ops["Sigmoid"] == ops["Clip"] == 0, ops


class _SEResBlocks(nn.Module):
    """SE-ResNet / SE-ResNeXt: each block's last conv (no activation) times a squeeze-excite gate, summed with the
    block input (identity) or a strided 1x1 conv of it, then a ReLU; the gate as timm writes it (``sigmoid_``)."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.body = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, s, 1), nn.BatchNorm2d(c), nn.ReLU(),
                                                nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)) for s in (1, 2))
        self.se = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 4, 1), nn.ReLU(), nn.Conv2d(4, c, 1)) for _ in range(2))
        self.down = nn.Sequential(nn.Conv2d(c, c, 1, 2), nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for i, (body, se) in enumerate(zip(self.body, self.se)):
            y = body(x)
            y = y * se(y.mean((2, 3), keepdim=True)).sigmoid_()
            x = F.relu(y + (x if i == 0 else self.down(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_squeeze_excite_products_summed_with_a_shortcut_run_in_int8(tmp_path):
    """The gated branch of an SE-ResNet block is summed with the shortcut, not read by a quantizer: the Sigmoid, Mul,
    Add and ReLU ran in float between DequantizeLinear and QuantizeLinear (timm seresnext26d_32x4d at 96 x 96: 8 of
    each, 1.09x quantize_static's latency at batch 8). The product now gets codes of its own, which the sum reads:
    QLinearSigmoid, QLinearMul and QLinearAdd, as in their file."""
    torch.manual_seed(0)
    ops = int8_ops(_SEResBlocks(), 16, tmp_path, keep_first_last="quant")
    assert ops["QLinearSigmoid"] == ops["QLinearMul"] == ops["QLinearAdd"] == 2, ops
    assert ops["Sigmoid"] == ops["Mul"] == ops["Add"] == ops["Relu"] == 0, ops


class _PreActBlocks(nn.Module):
    """Xception's blocks: each starts with a ReLU of the previous sum, which its shortcut (identity or a 1x1 conv)
    reads too, unrectified."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c))
        self.stack = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, groups=c),
                                                 nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)) for _ in range(3))
        self.short = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for i, stack in enumerate(self.stack):
            x = stack(x) + (self.short(x) if i == 0 else x)
        return self.fc(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


def test_a_sum_read_by_the_next_blocks_relu_and_its_shortcut_runs_in_int8(tmp_path):
    """A sum read by a ReLU (the next block's input) and by a shortcut ran as a float Add read by two quantizers
    (timm xception41: 11 float Add, 1.06x / 1.05x quantize_static's latency). The ReLU now reads the sum's codes and
    re-quantizes them: every sum is a QLinearAdd."""
    torch.manual_seed(0)
    ops = int8_ops(_PreActBlocks(), 16, tmp_path, keep_first_last="quant")
    assert ops["QLinearAdd"] == 3, ops
    assert ops["Add"] == ops["Relu"] == 0, ops


def _cbr(ci, co, k=1, s=1):
    return nn.Sequential(nn.Conv2d(ci, co, k, s, k // 2, bias=False), nn.BatchNorm2d(co), nn.ReLU())


class _Mixed(nn.Module):
    """An Inception block: 1x1, 1x1-3x3 and average-pool-1x1 branches of one input, concatenated."""

    def __init__(self, c):
        super().__init__()
        self.b1, self.b3, self.bp = _cbr(c, 8), nn.Sequential(_cbr(c, 8), _cbr(8, 8, 3)), _cbr(c, 8)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.bp(F.avg_pool2d(x, 3, 1, 1))], 1)


class _Inception(nn.Module):
    """Inception-v3's pattern: a stem whose max-pool the first block's branches read, two blocks, and a reduction
    (a strided conv and a max-pool of the block output, concatenated) before the head."""

    def __init__(self):
        super().__init__()
        self.stem, self.m1, self.m2, self.red = _cbr(3, 16, 3), _Mixed(16), _Mixed(24), _cbr(24, 8, 3, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.m2(self.m1(F.max_pool2d(self.stem(x), 3, 1, 1)))
        x = torch.cat([self.red(x), F.max_pool2d(x, 3, 2, 1)], 1)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_inception_blocks_run_in_int8(tmp_path):
    """The pool branch of an Inception block (an average pool beside the convolutions that read the same tensor) and
    the reduction's max-pool of a block output left the concatenations and pools float (timm inception_v3 at
    96 x 96: 10 Concat, 9 AveragePool, 3 MaxPool), and the concatenations' codes were re-quantized with their own
    parameters before the next convolutions (9 float DequantizeLinear and QuantizeLinear). Now the op counts are
    those of quantize_static's file: QLinearConcat, QLinearAveragePool, uint8 max-pools, one QuantizeLinear."""
    torch.manual_seed(0)
    ops = int8_ops(_Inception(), 16, tmp_path, keep_first_last="quant")
    assert ops["QLinearConcat"] == 3 and ops["QLinearAveragePool"] == 2 and ops["NhwcMaxPool"] == 2, ops
    for op in ("Concat", "AveragePool", "MaxPool", "Relu"):
        assert ops[op] == 0, ops
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0, ops


class _Affine(nn.Module):
    """HGNetV2's learnable affine after each ReLU: ``scale * x + bias`` with one-element parameters."""

    def __init__(self, scale: float, bias: float):
        super().__init__()
        self.scale, self.bias = nn.Parameter(torch.tensor([scale])), nn.Parameter(torch.tensor([bias]))

    def forward(self, x):
        return self.scale * x + self.bias


def _cba(ci, co, k=1, s=1, affine=(1.3, 0.2)):
    return nn.Sequential(nn.Conv2d(ci, co, k, s, (k - 1) // 2, bias=False), nn.BatchNorm2d(co), nn.ReLU(),
                         _Affine(*affine))


class _HGStem(nn.Module):
    """HGNetV2's stem (zero pads, a max-pool beside two convolutions, their concatenation) and one block (a chain
    of layers whose outputs are concatenated with its input), every layer ending in a learnable affine."""

    def __init__(self):
        super().__init__()
        self.stem1, self.stem2a = _cba(3, 16, 3, 2), _cba(16, 8, 2)
        self.stem2b, self.stem3 = _cba(8, 16, 2, affine=(0.7, -0.1)), _cba(32, 16, 3, 2)
        self.pool = nn.MaxPool2d(2, 1, ceil_mode=True)
        self.l1, self.l2, self.agg = _cba(16, 16, 3), _cba(16, 16, 3, affine=(0.9, 0.05)), _cba(48, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.pad(self.stem1(x), (0, 1, 0, 1))
        x2 = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))
        x = self.stem3(torch.cat([self.pool(x), x2], 1))
        y1 = self.l1(x)
        x = self.agg(torch.cat([x, y1, self.l2(y1)], 1))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_zero_pads_and_a_learnable_affine_of_codes_keep_the_stem_in_int8(tmp_path):
    """HGNetV2 (timm hgnetv2_b0 at 96 x 96, 1.09x / 1.17x quantize_static's latency): the affine after each ReLU
    made every value after it float, so its stem's zero pads, max-pool and concatenation, and with trained affine
    parameters the concatenations of every block, ran in float. A zero pad is transparent to codes now (0 is a
    level of every 8-bit quantizer), and an affine of codes read by pads, pools and concatenations gets codes of
    its own: the max-pool and the concatenations are uint8 ops (the affines stay a float Mul and Add)."""
    torch.manual_seed(0)
    ops = int8_ops(_HGStem(), 32, tmp_path, keep_first_last="quant")
    assert ops["QLinearConcat"] == 2 and ops["NhwcMaxPool"] == 1 and ops["Pad"] == 2, ops
    assert ops["Concat"] == ops["MaxPool"] == 0 and ops["Transpose"] == 2, ops


class _PreActBottleneck(nn.Module):
    """ResNet-v2 (timm resnetv2, BiT): BatchNorm and ReLU before each conv, the first one on the sum of the block
    before (which no layer absorbs); the shortcut is the sum itself, or a strided 1x1 conv of the pre-activation."""

    def __init__(self, c, stride=1):
        super().__init__()
        self.norm1, self.norm2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.Conv2d(c, c, 1, bias=False)
        self.down = nn.Conv2d(c, c, 1, stride, bias=False) if stride > 1 else None

    def forward(self, x):
        pre = F.relu(self.norm1(x))
        shortcut = self.down(pre) if self.down is not None else x
        return self.conv2(F.relu(self.norm2(self.conv1(pre)))) + shortcut


class _PreActNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(_PreActBottleneck(c), _PreActBottleneck(c), _PreActBottleneck(c, 2),
                                    _PreActBottleneck(c))
        self.norm, self.fc = nn.BatchNorm2d(c), nn.Linear(c, 10)

    def forward(self, x):
        x = F.relu(self.norm(self.blocks(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_pre_activation_resnet_sums_run_in_int8(tmp_path):
    """The sums of a pre-activation ResNet are read by the next block's BatchNorm, which no layer absorbs, and by
    the next sum or nothing else: they ran as float Adds (timm resnetv2_50 at 96 x 96: 16, 1.07x / 1.20x
    quantize_static's latency). The BatchNorm reads the sum's codes now, as in their file: every sum is a
    QLinearAdd."""
    torch.manual_seed(0)
    ops = int8_ops(_PreActNet(), 16, tmp_path, keep_first_last="quant")
    assert ops["QLinearAdd"] == 4 and ops["Add"] == 0, ops


class _ECA(nn.Module):
    """timm's EcaModule: a 1-D conv across the pooled channels, a sigmoid, reshaped and broadcast to the input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * y.sigmoid().view(x.shape[0], -1, 1, 1).expand_as(x)


class _ECANet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.body = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                                nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)) for _ in range(2))
        self.eca = nn.ModuleList(_ECA() for _ in range(2))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        for body, eca in zip(self.body, self.eca):
            x = F.relu(eca(body(x)) + x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_eca_gates_reshaped_before_the_product_run_in_int8(tmp_path):
    """ECA's gate is reshaped and broadcast between the sigmoid and the product, which a shortcut sum reads: the
    Sigmoid, Mul, Add and ReLU ran in float (timm ecaresnet26t at 96 x 96: 1.24x / 1.32x quantize_static's latency).
    The sigmoid now gets codes right after it, which the reshapes carry: QLinearSigmoid, QLinearMul, QLinearAdd."""
    torch.manual_seed(0)
    ops = int8_ops(_ECANet(), 16, tmp_path, keep_first_last="quant")
    assert ops["QLinearSigmoid"] == ops["QLinearMul"] == ops["QLinearAdd"] == 2, ops
    assert ops["Sigmoid"] == ops["Mul"] == ops["Add"] == ops["Relu"] == 0, ops


class _NFBlock(nn.Module):
    """NF-ResNet's block: ``relu(x) * beta`` into the convs (and, strided, into an average pool and 1x1 conv for the
    shortcut), the branch scaled by ``alpha`` and summed with the shortcut; no normalization layers."""

    def __init__(self, c, beta, stride=1):
        super().__init__()
        self.beta = beta
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, stride, 1), nn.Conv2d(c, c, 1)
        self.down = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(c, c, 1)) if stride > 1 else None

    def forward(self, x):
        pre = F.relu(x) * self.beta
        shortcut = self.down(pre) if self.down is not None else x
        return self.conv2(F.relu(self.conv1(pre))) * 0.2 + shortcut


class _NFNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(_NFBlock(c, 1.0), _NFBlock(c, 0.98), _NFBlock(c, 0.96, 2), _NFBlock(c, 0.98))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.blocks(self.stem(x))), 1).flatten(1))


def test_normalizer_free_sums_read_through_a_scaled_relu_run_in_int8(tmp_path):
    """NF-ResNet's sums are read by ``relu(x) * beta`` before the next convolutions (and an average pool): they
    ran as float Adds and ReLUs (timm nf_resnet26 at 96 x 96: 7 of each). The scaling reads the sum's codes now:
    every sum is a QLinearAdd (the scalings stay float Muls)."""
    torch.manual_seed(0)
    ops = int8_ops(_NFNet(), 16, tmp_path, keep_first_last="quant")
    assert ops["QLinearAdd"] == 4 and ops["Add"] == 0, ops


def test_an_in_place_sigmoid_is_a_gate_only_where_nothing_else_reads_its_input():
    """timm writes its SE gate as ``x.sigmoid_()``: a sigmoid for the int8 region when the tensor it overwrites has
    no other reader; where another node reads that tensor, rewriting the call out of place would change what that
    reader sees, so it is not taken for one."""
    from qcompile.passes.int8_region import _is_sigmoid

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y, z = self.a(x), self.b(x)
            return z.sigmoid_() * x + y * y.sigmoid_()

    gm = torch.fx.symbolic_trace(Gate())
    found = {n.args[0].target: _is_sigmoid(gm, n) for n in gm.graph.nodes if n.target == "sigmoid_"}
    assert found == {"b": True, "a": False}


class _ReflectGen(nn.Module):
    """An image-to-image generator (style transfer, pix2pix): a reflection pad before each conv, residual blocks."""

    def __init__(self, c=16):
        super().__init__()
        self.head = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, c, 3), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.BatchNorm2d(c),
                                                  nn.ReLU(), nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3),
                                                  nn.BatchNorm2d(c)) for _ in range(2))
        self.tail = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, 3, 3))

    def forward(self, x):
        x = self.head(x)
        for block in self.blocks:
            x = x + block(x)
        return self.tail(x)


def test_reflection_pads_carry_codes(tmp_path):
    """A reflection pad repeats values of the tensor, so padded codes are codes: the pads ran in float between
    DequantizeLinear and QuantizeLinear (8 and 7 of them on this toy) and the residual sums were float Adds; now
    onnxruntime pads the uint8 tensors and sums in QLinearAdd."""
    torch.manual_seed(0)
    ops = int8_ops(_ReflectGen(), 16, tmp_path, keep_first_last="quant")
    assert ops["QLinearAdd"] == 2 and ops["Add"] == 0 and ops["Pad"] == 6, ops
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 1, ops
