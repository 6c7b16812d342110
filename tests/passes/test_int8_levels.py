"""APoT/PoT levels decided on the integer accumulator of an int8 layer (``BindIntegerLayers._bind_cells``).

A layer with uint8 input codes and int8 weights whose output goes (through a ReLU/ReLU6, max-pooling, reshapes)
to an APoT/PoT activation quantizer re-quantizes its accumulator onto uint8 cells of half a unit whose boundaries
are the decision thresholds; one table lookup gives the level. onnxruntime runs such a layer as ``QLinearConv`` /
``QGemm``; the simulation computes the same cells, so the file matches it code for code.
"""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcompile
from qcompile import quant
from qcompile.qmodules import FakeQuantize
from qcompile.runtime.session import session
from tests.models import MobileNetLike, ResidualCNN, _init_, example_input, randomize_batchnorm

SETS = [("apot", b, s) for b in (2, 3, 4, 5) for s in (False, True)] + \
       [("pot", 2, False), ("pot", 3, False), ("pot", 3, True), ("pot", 4, True), ("log2", 3, True)]


def nearest(grid: np.ndarray, v: np.ndarray) -> np.ndarray:
    return grid[np.abs(v[:, None] - grid[None, :]).argmin(1)]


@pytest.mark.parametrize("scheme,bits,signed", SETS)
def test_cells_give_the_nearest_level_away_from_the_thresholds(scheme, bits, signed):
    sets = [quant.level_set(scheme, bits, signed)]
    if not signed:  # asymmetric sets: the unsigned grid shifted down
        unsigned = quant.level_set(scheme, bits, False)
        sets += [quant.level_set(scheme, bits, True, offset=o) for o in unsigned.grid[1:3]
                 if o <= unsigned.denom // 2]
    for ls in (s for s in sets if not s.is_uniform):  # ternary APoT: QuantizeLinear itself
        assert ls.requant_cells is not None, ls.describe()
        z, table = ls.requant_cells
        grid = np.asarray(ls.grid, dtype=np.int64)
        assert table.shape == (256,) and table.min() == grid[0] and table.max() == grid[-1]
        # k in half-units, never on a half-unit integer (where the thresholds are)
        k = np.random.default_rng(0).uniform(2 * grid[0] - 9, 2 * grid[-1] + 9, 20000)
        k = k[np.abs(k - np.round(k)) > 1e-6]
        cell = np.clip(np.round(k - 0.5) + z, 0, 255).astype(np.int64)
        np.testing.assert_array_equal(table[cell], nearest(grid, k / 2))


def test_sets_whose_thresholds_span_more_than_the_cells_have_none():
    assert quant.level_set("apot", 6, False).requant_cells is None  # thresholds over 896 half-units
    assert quant.level_set("uniform", 4, False).requant_cells is None  # uniform levels: QuantizeLinear itself


class PoolNet(nn.Module):
    """conv → BN → ReLU6 → max-pool → conv → BN → ReLU → flatten → fc: the cells pass a clip, a pool and a flatten
    (after which each of conv2's channels, with its own accumulator scale, is a run of 16 elements)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)
        _init_(self, seed)
        randomize_batchnorm(self, seed + 1)

    def forward(self, x):
        x = F.max_pool2d(F.relu6(self.bn1(self.conv1(x))), 2)
        x = torch.flatten(F.relu(self.bn2(self.conv2(x))), 1)
        return self.fc2(F.relu(self.fc1(x)))


def compile_w4a4(model, shape, **options):
    calib = torch.randn(64, *shape, generator=torch.Generator().manual_seed(1))
    x = torch.randn(48, *shape, generator=torch.Generator().manual_seed(2))
    return qcompile.compile(model.eval(), calib=calib, validation_inputs=x, scheme="apot", bits=4, **options)


def optimized_ops(result, tmp_path) -> collections.Counter:
    path = str(tmp_path / "optimized.onnx")
    session(result.onnx_model.SerializeToString(), optimized_model_path=path)
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def cell_quantizers(result) -> list[FakeQuantize]:
    return [m for m in result.model.modules() if isinstance(m, FakeQuantize) and m.cells is not None]


def test_clip_and_maxpool_move_onto_the_cells_and_the_file_matches_the_simulation(tmp_path):
    result = compile_w4a4(PoolNet(), (3, 8, 8))
    report = result.report
    assert report.passed and report.max_abs == 0.0 and report.extra["codes_differ"] == 0, report.summary()
    # conv1 (8-bit first layer) → ReLU6 → pool → APoT, conv2 → ReLU → flatten → APoT (both on cells);
    # fc1 → ReLU → 8-bit input of fc2 (an 8-bit re-quantization)
    assert [fq.cells[3] for fq in cell_quantizers(result)] == [1, 16]
    graph = result.onnx_model.graph
    producer = {o: n for n in graph.node for o in n.output}
    # the ReLU6 is implied by the cells: no Clip reads a Conv
    assert not any(n.op_type == "Clip" and producer[n.input[0]].op_type == "Conv" for n in graph.node)
    pool = next(n for n in graph.node if n.op_type == "MaxPool")
    cells = producer[pool.input[0]]  # the pool takes the maximum of uint8 cells
    assert cells.op_type == "QuantizeLinear" and producer[cells.input[0]].op_type == "Conv"
    ops = optimized_ops(result, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["Conv"] + ops["FusedConv"] == 0, ops
    assert ops["QGemm"] == 2, ops
    from qcompile.summary import layer_lines

    table = {line.split()[0]: line for line in layer_lines(result.model)[1:]}  # the layer table says which is which
    assert table["conv1"].endswith("; int8 kernel, output levels from accumulator cells")
    assert table["conv2"].endswith("; int8 kernel, output levels from accumulator cells")
    assert table["fc1"].endswith("; int8 kernel")


def test_per_tensor_weights_through_the_flatten(tmp_path):
    result = compile_w4a4(PoolNet(), (3, 8, 8), per_channel=False)
    report = result.report
    assert report.passed and report.max_abs == 0.0 and report.extra["codes_differ"] == 0, report.summary()
    # conv1 (8-bit first layer) has per-tensor weights too, as asked; conv2's single scale covers all 16 x 16
    # flattened values
    assert [(fq.cells[3], fq.requant[0].numel()) for fq in cell_quantizers(result)] == [(1, 1), (16, 1)]


class PoolFlattenNet(PoolNet):
    """conv2 → ReLU → max-pool → flatten → fc1: each channel is a run of 2 x 2 elements after the flatten, not of
    conv2's 4 x 4 (the simulation took the conv's shape and raised on every input: 256 vs 1024 cells)."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        _init_(self.fc1, seed + 2)

    def forward(self, x):
        x = F.max_pool2d(F.relu6(self.bn1(self.conv1(x))), 2)
        x = torch.flatten(F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2), 1)
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("scheme,bits", [("apot", 4), ("pot", 3)])
def test_max_pool_before_the_flatten(scheme, bits, tmp_path):
    calib = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    result = qcompile.compile(PoolFlattenNet().eval(), calib=calib, validation_inputs=x, scheme=scheme, bits=bits)
    report = result.report
    assert report.passed and report.max_abs == 0.0 and report.extra["codes_differ"] == 0, report.summary()
    assert [fq.cells[3] for fq in cell_quantizers(result)] == [1, 4]
    assert optimized_ops(result, tmp_path)["QLinearConv"] == 2


def test_float_levels_option_keeps_those_layers_float(tmp_path):
    result = compile_w4a4(PoolNet(), (3, 8, 8), int8_levels=False)
    assert result.report.passed and not cell_quantizers(result)
    ops = optimized_ops(result, tmp_path)
    assert ops["QLinearConv"] == 1, ops  # conv1: 8-bit input, an 8-bit output quantizer before the APoT one
    assert result.options.int8_levels is False
    meta = {p.key: p.value for p in result.onnx_model.metadata_props}
    assert '"int8_levels":false' in meta["qcompile.options"]


def test_signed_apot_codes_are_uint8_with_a_zero_point_and_feed_int8_layers(tmp_path):
    """MobileNetV2's projections have no ReLU: their APoT levels are signed (or asymmetric). Stored as uint8 with
    a zero point, they feed the next 1x1 convolution's uint8 x int8 kernel."""
    model = MobileNetLike(seed=0, act="relu6")
    result = compile_w4a4(model, MobileNetLike.INPUT_SHAPE[1:])
    report = result.report
    assert report.passed and report.extra["code_mismatch_local"] <= 1e-3, report.summary()
    signed = [m for m in result.model.modules() if isinstance(m, FakeQuantize) and m.role == "activation"
              and m.scheme == "apot" and m.levelset.qmin < 0]
    assert signed, "no signed APoT activation in the model"
    inits = {t.name: t for t in result.onnx_model.graph.initializer}
    dq_zero_points = [inits[n.input[2]] for n in result.onnx_model.graph.node
                      if n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    assert any(t.data_type == onnx.TensorProto.UINT8 and int(onnx.numpy_helper.to_array(t)) > 0
               for t in dq_zero_points)
    ops = optimized_ops(result, tmp_path)
    # int8 kernels everywhere: block1's projection, which the residual add reads, writes 8-bit codes that
    # QLinearAdd sums (it was a float conv beside a float add); block2's expand and the head read signed /
    # asymmetric APoT codes, and the head writes the 8-bit codes the pool averages
    assert ops["QLinearConv"] == 8 and ops["Conv"] + ops["FusedConv"] == 0 and ops["QLinearAdd"] == 1, ops
    assert ops["Add"] == 2, ops  # the APoT level sums of the asymmetric activations, no float residual add


def test_cell_decisions_differ_from_the_exact_ones_only_within_an_accumulator_unit():
    """The cells move each threshold onto the accumulator grid (the quarter-unit shift is rounded to it) and the
    requantization multiplier is float32: a decision may differ from the exact nearest level of the layer's real
    output only where that output is within about one accumulator unit of a threshold."""
    result = compile_w4a4(ResidualCNN(seed=0), ResidualCNN.INPUT_SHAPE[1:], calib_method="minmax")
    gm = result.model
    seen = {}
    hooks = []
    for name, fq in gm.named_modules():
        if isinstance(fq, FakeQuantize) and fq.cells is not None:
            hooks.append(fq.register_forward_hook(
                lambda m, i, o, name=name: seen.setdefault(name, []).append((i[0].detach(), o.detach()))))
    try:
        with torch.no_grad():
            gm(example_input(ResidualCNN(), seed=3, batch=32))
    finally:
        for h in hooks:
            h.remove()
    assert seen
    total = differ = 0
    for name, runs in seen.items():
        fq = gm.get_submodule(name)
        unit = float(quant.unit_from_alpha(fq.alpha, fq.levelset))
        acc_unit = float(fq.requant[0].max())
        grid = np.asarray(fq.levelset.grid, dtype=np.float64)
        thresholds = np.asarray(fq.levelset.thresholds)
        for y, out in runs:
            v = y.double().numpy().ravel() / unit  # the layer's real output in grid units
            exact = nearest(grid, v)
            got = np.rint(out.double().numpy().ravel() / unit)
            wrong = exact != got
            total += v.size
            differ += int(wrong.sum())
            if wrong.any():
                gap = np.abs(v[wrong][:, None] - thresholds[None, :]).min(1) * unit
                assert gap.max() <= 1.01 * acc_unit, (name, gap.max(), acc_unit)
    assert total > 10000 and differ / total < 1e-3


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_uniform_low_bit_layers_run_on_int8_kernels_bit_exact(bits, tmp_path):
    """Uniform 2-4-bit activations and weights: the codes fit uint8/int8, so a layer between two such quantizers is
    an integer layer too: QuantizeLinear right after it, then the level range as an integer Clip; the INT4 (INT2 at
    2 bits, opset 25) weights reach the int8 kernels through a Cast that onnxruntime folds at load time."""
    model = MobileNetLike(seed=0, act="relu6")
    calib = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    result = qcompile.compile(model.eval(), calib=calib, validation_inputs=x, scheme="uniform", bits=bits)
    report = result.report
    assert report.passed and report.extra["codes_differ"] == 0, report.summary()
    graph = result.onnx_model.graph
    producer = {o: n for n in graph.node for o in n.output}
    int_clips = [n for n in graph.node if n.op_type == "Clip" and producer[n.input[0]].op_type == "QuantizeLinear"]
    assert int_clips and all(producer[producer[n.input[0]].input[0]].op_type == "Conv" for n in int_clips)
    assert any(n.op_type == "Cast" and producer.get(n.input[0]) is None for n in graph.node)  # Cast(INT4 initializer)
    small = {t.data_type for t in graph.initializer} & {onnx.TensorProto.INT2, onnx.TensorProto.INT4}
    assert small == {onnx.TensorProto.INT2 if bits == 2 else onnx.TensorProto.INT4}  # stored at the bit-width
    assert max(o.version for o in result.onnx_model.opset_import if o.domain == "") == (25 if bits == 2 else 21)
    ops = optimized_ops(result, tmp_path)
    # as the APoT file above
    assert ops["QLinearConv"] == 8 and ops["Conv"] + ops["FusedConv"] == 0 and ops["QLinearAdd"] == 1, ops
    float_levels = qcompile.compile(model.eval(), calib=calib, validation_inputs=x, scheme="uniform", bits=bits,
                                    int8_levels=False)
    # the 8-bit stem, and the head, whose 8-bit output codes the pool averages for the 8-bit classifier
    assert optimized_ops(float_levels, tmp_path)["QLinearConv"] == 2


@pytest.mark.parametrize("between", ["zeropad", "reflect", "replicate", "circular", "upsample"])
@pytest.mark.parametrize("emit", ["standard", "custom"])
def test_pads_and_nearest_upsampling_between_a_layer_and_its_apot_levels(between, emit):
    """A UNet's nn.Upsample(mode="nearest") (and a pad module) between a conv + ReLU and the next APoT-4 quantizer:
    the simulation decided the levels on the conv's cells through it, and the emitter, which found a Resize (Pad,
    Slice/Concat) there, stopped with "internal: the integer layer before quantizer ... is not a lone Conv/Gemm".
    A nearest Resize and a reflecting / edge Pad move values only and work on cells; a zero pad is no cell and a
    circular one is slices and a concatenation: those layers decide their levels in float."""
    mid = {"zeropad": nn.ZeroPad2d(1), "reflect": nn.ReflectionPad2d(1), "replicate": nn.ReplicationPad2d(1),
           "circular": nn.CircularPad2d(1), "upsample": nn.Upsample(scale_factor=2, mode="nearest")}[between]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          mid, nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    result = qcompile.compile(model, x[:1], calib=x, scheme="apot", bits=4, emit=emit, output=None)
    assert result.report.passed and result.report.extra["codes_differ"] == 0, result.report.summary()
