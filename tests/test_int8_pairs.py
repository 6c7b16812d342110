"""PairSafeInt8Weights and ``--int8-weights s8-safe``: 8-bit weights no uint8 × int8 kernel can saturate.

The kernel facts the pass relies on (which products x86 MLAS adds in int16) are measured here on the installed
onnxruntime; the pass's guarantee is then checked end to end with the worst inputs there are (every activation
code at 255) on this machine, whichever kind of CPU it is.
"""
from __future__ import annotations

import collections
import json
import itertools

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.models import digits
from qcompile.passes.int8_pairs import (PairSafeInt8Weights, fix_pairs, kernel_order, merge_pairs, pair_positions,
                                        split_pairs)
from qcompile.runtime.session import run, session, u8s8_saturates
from qcompile.runtime.validation import saturating_pairs


# -- what onnxruntime's kernels add in int16 ------------------------------------------------------------------------
def _conv_pair_outputs(cin: int, k: tuple, group: int = 1) -> tuple[np.ndarray, list]:
    """One output channel per pair of kernel-order positions (p, p+1), both weights 127, input all 255: the output
    (scale 256) is 253 when the pair is summed exactly, 128 when saturated."""
    cpg, size = cin // group, int(np.prod(k))
    n = cpg * size
    pairs = [(p, p + 1) for p in range(n - 1)]
    cout = -(-len(pairs) // group) * group
    flat = np.zeros((cout, n), np.int8)
    for o, (p, q) in enumerate(pairs):
        flat[o, p] = flat[o, q] = 127
    w = from_order(flat, (cout, cpg) + k)
    consts = {"s1": np.array(1.0, np.float32), "za": np.array(0, np.uint8), "w": w, "sw": np.ones(cout, np.float32),
              "zw": np.zeros(cout, np.int8), "sy": np.array(256.0, np.float32), "zy": np.array(0, np.uint8)}
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    shape = [1, cin, *k]
    node = helper.make_node("QLinearConv", ["x", "s1", "za", "w", "sw", "zw", "sy", "zy"], ["y"], group=group)
    g = helper.make_graph([node], "pairs", [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    y = run(session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString(), threads=1),
            [np.full(shape, 255, np.uint8)])[0]
    return y.reshape(cout, -1)[: len(pairs), 0], pairs


def from_order(flat: np.ndarray, shape: tuple) -> np.ndarray:
    t = torch.from_numpy(flat.astype(np.int64))
    from qcompile.passes.int8_pairs import from_kernel_order

    return np.ascontiguousarray(from_kernel_order(t, torch.Size(shape)).numpy().astype(np.int8))


@pytest.mark.parametrize("cin,k,group", [(3, (3, 3), 1), (16, (3, 3), 1), (5, (1, 1), 1), (64, (1, 1), 1),
                                         (8, (3, 3), 2), (32, (3,), 1), (3, (2, 2, 2), 1),
                                         (4, (3, 3), 4)])  # one input channel per group, 2 outputs each
def test_onnxruntime_adds_kernel_order_neighbours_in_int16_where_the_probe_says(cin, k, group):
    out, pairs = _conv_pair_outputs(cin, k, group)
    saturated = {p for (p, _), v in zip(pairs, out) if v != 253}
    if u8s8_saturates():  # exactly the pairs (2j, 2j+1) of the (kernel position, channel) order saturate
        assert saturated == {p for p, _ in pairs if p % 2 == 0}
    else:
        assert saturated == set()


def test_depthwise_convolutions_never_saturate():
    out, _ = _conv_pair_outputs(16, (3, 3), group=16)
    assert np.all(out == 253)


# -- the pair layout ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 6, 3, 3), (4, 3, 3, 3), (5, 7), (5, 8), (3, 5, 3), (2, 1, 3, 3)])
def test_split_merge_and_positions_follow_the_kernel_order(shape):
    t = torch.arange(1, int(np.prod(shape)) + 1).reshape(shape)  # 0 marks the padding of an odd length
    a, b = split_pairs(t)
    assert torch.equal(merge_pairs(a, b, t.shape), t)
    order = kernel_order(t)
    if order.shape[1] % 2:
        order = torch.cat([order, torch.zeros(order.shape[0], 1, dtype=order.dtype)], 1)
    for row in range(order.shape[0]):  # each (a, b) is a neighbour pair (2j, 2j+1) of the kernel order
        expect = sorted((int(order[row, 2 * j]), int(order[row, 2 * j + 1])) for j in range(order.shape[1] // 2))
        assert sorted(zip(a[row].tolist(), b[row].tolist())) == expect
    rows, cols = torch.meshgrid(torch.arange(a.shape[0]), torch.arange(a.shape[1]), indexing="ij")
    ia, ib = pair_positions(rows.reshape(-1), cols.reshape(-1), t.shape)
    flat = t.reshape(-1)
    assert torch.equal(flat[ia], a.reshape(-1))
    real = ib >= 0
    assert torch.equal(flat[ib[real]], b.reshape(-1)[real])
    padded = order.shape[1] != kernel_order(t).shape[1]
    assert torch.all(b.reshape(-1)[~real] == 0) and int((~real).sum()) == (a.shape[0] if padded else 0)


def test_fix_pairs_moves_only_violations_to_the_nearest_safe_grid_pair():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(64, 200, generator=gen) * 45
    codes = values.round().clamp(-127, 127).long()
    a, b = codes[:, 0::2], codes[:, 1::2]
    va, vb = values[:, 0::2], values[:, 1::2]
    grid = tuple(range(-127, 128))
    na, nb, moved = fix_pairs(a, b, va, vb, grid, 128)
    bad = ((a > 0) & (b > 0) | (a < 0) & (b < 0)) & (a.abs() + b.abs() > 128)
    assert moved == int(bad.sum()) > 0
    assert torch.all((na + nb).abs() <= 128)
    assert torch.equal(na[~bad], a[~bad]) and torch.equal(nb[~bad], b[~bad])
    for i, j in list(zip(*torch.nonzero(bad, as_tuple=True)))[:50]:  # brute force: no safe pair is nearer
        x, y = float(va[i, j]), float(vb[i, j])
        best = min(((x - p) ** 2 + (y - q) ** 2, p, q) for p, q in itertools.product(grid, grid)
                   if not (p * q > 0 and abs(p) + abs(q) > 128))
        assert (x - int(na[i, j])) ** 2 + (y - int(nb[i, j])) ** 2 <= best[0] + 1e-9


# -- the pass, end to end -------------------------------------------------------------------------------------------
class Net(nn.Module):
    """Full-range 8-bit layers of every kind the pass handles: odd and even channel counts, a grouped and a
    depthwise conv, a Linear with an odd input length."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c3 = nn.Conv2d(16, 9, 1)
        self.fc = nn.Linear(9 * 8 * 8, 10)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # heavy-tailed, correlated neighbours: many pairs near the channel maximum
            for m in (self.c1, self.c2, self.dw, self.c3, self.fc):
                sign = torch.randn(m.weight.shape, generator=gen).sign()
                m.weight.copy_(sign * torch.rand(m.weight.shape, generator=gen) ** 0.3)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.flatten(1))


def _hostile_inputs(n=16):
    """Inputs that drive every quantized activation towards its top code (all-255 uint8 codes)."""
    gen = torch.Generator().manual_seed(2)
    return torch.rand(n, 3, 8, 8, generator=gen) * 4


def test_s8_safe_is_exact_on_this_machine_even_at_full_scale_activations(tmp_path):
    model = Net().eval()
    calib = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    hostile = _hostile_inputs()
    s8 = qcompile.compile(model, calib[:1], calib=calib, scheme="uniform", bits=8, int8_weights="s8",
                          validation_inputs=hostile)
    safe = qcompile.compile(model, calib[:1], calib=calib, scheme="uniform", bits=8, int8_weights="s8-safe",
                            validation_inputs=hostile)
    assert saturating_pairs(s8.onnx_model) > 0  # the case exists in this model
    assert saturating_pairs(safe.onnx_model) == 0
    assert safe.report.extra["saturating_pairs"] == 0
    assert safe.report.passed and safe.report.max_abs == 0.0, safe.report.summary()
    assert safe.report.extra["codes_differ"] == 0
    moved = [line for t in safe.timings if t.name == "PairSafeInt8Weights" for line in t.report]
    assert moved and not any(line.startswith("dw:") for line in moved)  # depthwise untouched
    # int8 codes throughout, and onnxruntime still fuses every layer onto its integer kernels
    inits = {t.name: t for t in safe.onnx_model.graph.initializer}
    assert not any(t.data_type == TensorProto.UINT8 and len(t.dims) >= 2 for t in inits.values())
    opt = str(tmp_path / "opt.onnx")
    session(safe.onnx_model.SerializeToString(), optimized_model_path=opt)
    ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    assert ops["QLinearConv"] == 4 and ops["QGemm"] == 1 and not ops["Conv"] and not ops["DequantizeLinear"], ops
    if u8s8_saturates():
        assert not s8.report.passed  # and without the pass, this CPU gets these inputs wrong


class ChannelMultiplier(nn.Module):
    """A grouped conv with one input channel per group and two outputs each (MobileNet's depthwise with a channel
    multiplier): not onnxruntime's depthwise kernel, so its weight pairs saturate like any other."""

    def __init__(self):
        super().__init__()
        self.dw2 = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.fc = nn.Linear(8 * 8 * 8, 3)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(4)
            self.dw2.weight.copy_(torch.rand(self.dw2.weight.shape, generator=gen) ** 0.3)

    def forward(self, x):
        return self.fc(torch.relu(self.dw2(x)).flatten(1))


def test_channel_multiplier_convolutions_are_made_pair_safe_and_counted():
    model = ChannelMultiplier().eval()
    calib = torch.rand(32, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    hostile = torch.rand(16, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * 4
    s8 = qcompile.compile(model, calib[:1], calib=calib, scheme="uniform", bits=8, int8_weights="s8",
                          validation_inputs=hostile)
    safe = qcompile.compile(model, calib[:1], calib=calib, scheme="uniform", bits=8, int8_weights="s8-safe",
                            validation_inputs=hostile)
    assert saturating_pairs(s8.onnx_model) > 0
    assert saturating_pairs(safe.onnx_model) == 0
    assert any(line.startswith("dw2:") for t in safe.timings if t.name == "PairSafeInt8Weights" for line in t.report)
    assert safe.report.passed and safe.report.extra["codes_differ"] == 0, safe.report.summary()
    if u8s8_saturates():
        assert not s8.report.passed


def test_s8_safe_costs_little_accuracy_on_the_digits_model():
    x_tr, _, x_te, y_te = digits.load_split()
    model = digits.pretrained()
    u8 = qcompile.compile(model, x_tr[:1], calib=x_tr[:64], scheme="uniform", bits=8, int8_weights="u8",
                          validate=False)
    safe = qcompile.compile(model, x_tr[:1], calib=x_tr[:64], scheme="uniform", bits=8, int8_weights="s8-safe",
                            validation_inputs=x_te[:200])
    assert safe.report.passed and safe.report.max_abs == 0.0, safe.report.summary()
    with torch.no_grad():
        ref = model(x_te).numpy()
        sq = {name: 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - r.model(x_te).numpy()) ** 2))
              for name, r in (("u8", u8), ("safe", safe))}
    assert sq["safe"] >= sq["u8"] - 1.5, sq  # measured: within 0.2 dB here
    got = run(session(safe.onnx_model.SerializeToString()), [x_te.numpy()])[0]
    assert np.mean(got.argmax(1) == y_te.numpy()) >= 0.985


def test_pass_is_idempotent_and_keeps_narrow_grids_and_int8_activations():
    model = Net().eval()
    calib = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    r = qcompile.compile(model, calib[:1], calib=calib, scheme="uniform", bits=8, int8_weights="s8-safe",
                         validate=False)
    # the bound graph has integer layers now; a fresh trace of the pass's own output is what can be re-run
    from qcompile.frontend import trace
    from qcompile.pipeline import build_passes
    from qcompile.options import CompileOptions
    from qcompile.passes import Pipeline

    gm = trace(Net().eval(), (calib[:1],))
    passes = build_passes(CompileOptions(scheme="uniform", bits=8, int8_weights="s8-safe"), calib)
    cut = next(i for i, p in enumerate(passes) if isinstance(p, PairSafeInt8Weights))
    gm = Pipeline(passes[:cut + 1])(gm).gm
    assert passes[cut].report
    assert not PairSafeInt8Weights()(gm).modified  # a second run finds nothing to do
    assert [t for t in r.timings if t.name == "PairSafeInt8Weights" and t.modified]
    # APoT-4 weights (grid ±10) and 4-bit activations (codes <= 15) never reach the limit: nothing moves
    for kw in ({"scheme": "apot", "bits": 4, "wscheme": "apot", "ascheme": "uniform", "abits": 8},
               {"scheme": "uniform", "bits": 8, "abits": 4}):
        r = qcompile.compile(Net().eval(), calib[:1], calib=calib, int8_weights="s8-safe", validate=False,
                             keep_first_last="quant", **kw)
        assert not [t for t in r.timings if t.name == "PairSafeInt8Weights" and t.modified], kw


def test_wide_apot_grid_is_made_safe_too():
    x_tr, _, x_te, _ = digits.load_split()
    # APoT-6 weights: grid integers up to ±100 (non-uniform), int8 lookup table
    r = qcompile.compile(digits.pretrained(), x_tr[:1], calib=x_tr[:64], scheme="apot", bits=6, wscheme="apot",
                         ascheme="uniform", abits=8, int8_weights="s8-safe", validation_inputs=x_te[:200])
    assert saturating_pairs(r.onnx_model) == 0
    assert r.report.passed and r.report.max_abs == 0.0, r.report.summary()


def test_cli_takes_s8_safe(tmp_path):
    from qcompile.cli import main

    x_tr, _, _, _ = digits.load_split()
    np.save(tmp_path / "calib.npy", x_tr[:32].numpy())
    out = tmp_path / "m.onnx"
    assert main([digits.SPEC, "--calib", str(tmp_path / "calib.npy"), "--scheme", "uniform", "--bits", "8",
                 "--int8-weights", "s8-safe", "-o", str(out)]) == 0
    model = onnx.load(str(out))
    assert saturating_pairs(model) == 0
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["qcompile.options"])["int8_weights"] == "s8-safe"


@pytest.mark.parametrize("rows,k", [(48, 64), (48, 1024), (1, 1024)],
                         ids=["short-rows-exact", "long-rows-estimated", "one-long-row"])
def test_fast_search_error_is_the_error_of_the_codes_it_returns(rows, k):
    """Flat (xavier-uniform) weights put many same-sign pairs past the limit. The fast search's error for the scales
    it picks is the squared error of the pair-safe codes it returns: exactly for short rows, and within a few
    percent where it estimates rounding as step²/12 (long rows). One row (a Linear(k, 1) score head): its error
    table was a read-only broadcast view, and the pass crashed."""
    from qcompile import quant
    from qcompile.passes.int8_pairs import safe_weights
    from qcompile.qmodules import FakeQuantize

    w = torch.empty(rows, k)
    nn.init.xavier_uniform_(w, generator=torch.Generator().manual_seed(0))
    if rows == 1:
        w = w * 0.4 + w.abs().amax() * 0.6 * torch.sign(w)  # flat: many same-sign pairs near the top code
        w[0, :4] *= 3.0  # and a few far above the rest, clipped at the calibrated range below
    fq = FakeQuantize("uniform", 8, signed=True, axis=0, role="weight")
    fq.set_params(w.abs().amax(dim=1) / (2.0 if rows == 1 else 1.0))
    w_new, alpha, moved, err = safe_weights(w, fq, 128)
    assert moved > 0
    codes = quant.quantize(w_new, alpha, fq.levelset, axis=0)
    a, b = split_pairs(codes)
    assert int(((a + b).abs() > 128).sum()) == 0  # pair-safe
    real = float(((quant.dequantize(codes, alpha, fq.levelset, axis=0) - w) ** 2).sum(dtype=torch.float64))
    assert err == pytest.approx(real, rel=1e-4 if k < 256 else 0.05)


def test_pair_safe_weights_update_the_recorded_qparams():
    """PairSafeInt8Weights widens an 8-bit weight range (x1.45 on the digits model's conv1) and left the weight
    node's meta["qparams"] at the calibrated range: the typed metadata disagreed with the quantizer and the file."""
    import qcompile
    from qcompile.models import digits
    from qcompile.qmodules import FakeQuantize

    x = digits.load_split()[0][:32]
    result = qcompile.compile(digits.pretrained(), x[:1], calib=x, scheme="uniform", bits=8,
                              int8_weights="s8-safe", validate=False)
    gm = result.model
    moved = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantize) and \
                gm.get_submodule(node.target).role == "weight":
            qp = node.meta["qparams"]
            assert torch.equal(qp.alpha.float(), gm.get_submodule(node.target).alpha.float()), node.target
            moved += qp.observer.endswith("+pair-safe")
    assert moved > 0


def _pairs_reference(w: np.ndarray, limit: int) -> int:
    """Same-sign neighbours along a Gemm(transB=1) row past ``limit``: the count, in int64, all at once."""
    rows = w.astype(np.int64)
    if rows.shape[1] % 2:
        rows = np.concatenate([rows, np.zeros((rows.shape[0], 1), np.int64)], 1)
    return int((np.abs(rows[:, 0::2] + rows[:, 1::2]) > limit).sum())


def test_saturating_pairs_counts_large_and_table_weights_in_8_bits():
    """saturating_pairs reads int8 weights in blocks of rows as 16-bit integers (int64 copies of a 54M-weight
    model's codes were the peak of its compile's memory): the count is that of a direct int64 count, for plain int8
    codes over several blocks of rows with an odd row length, and for indices into an int8 level table."""
    gen = np.random.default_rng(0)
    k, n = 4097, 600  # 2**20 // 4097 = 255 rows per block: three blocks; odd rows are padded with a zero
    w = gen.integers(-128, 128, size=(n, k), dtype=np.int8)
    lut = np.array([0, 100, -100, 90, -90, 127, -128, 5], dtype=np.int8)  # a non-uniform grid's table
    idx = gen.integers(-8, 8, size=(64, k), dtype=np.int8)  # Gather wraps negative indices, as numpy does
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0.01] * n, np.float32), "ws"),
             numpy_helper.from_array(np.float32(0.1), "xs"), numpy_helper.from_array(np.uint8(0), "xz"),
             numpy_helper.from_array(lut, "lut"), numpy_helper.from_array(idx, "idx"),
             numpy_helper.from_array(np.array([0.01] * 64, np.float32), "vs")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0),
             helper.make_node("Gemm", ["xd", "wd"], ["y"], transB=1),
             helper.make_node("Cast", ["idx"], ["idx32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["lut", "idx32"], ["v"]),
             helper.make_node("DequantizeLinear", ["v", "vs"], ["vd"], axis=0),
             helper.make_node("Gemm", ["xd", "vd"], ["z"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 64])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    limit = 32767 // 255
    expected = _pairs_reference(w, limit) + _pairs_reference(lut[idx.astype(np.int64)], limit)
    assert expected > 1000  # the case exists: both layers have such pairs
    assert saturating_pairs(model) == expected
    assert saturating_pairs(model.SerializeToString()) == expected


def test_emitting_s8_safe_without_the_pair_pass_is_one_clear_error():
    """A pipeline of one's own without PairSafeInt8Weights, emitted with int8_weights="s8-safe", wrote plain int8
    weights (3066 pairs past int16 on the digits model) without a word, and validation then advised the option given."""
    from qcompile import CompileOptions, emit, export_onnx
    from qcompile.errors import UserError
    from qcompile.ir import LayerConfig
    from qcompile.passes import Calibrate, FoldBatchNorm, InsertQuantizers, Pipeline, QuantizeBias, SelectLayers

    x = digits.calibration_inputs(32)
    cfg = LayerConfig(wscheme="uniform", wbits=8, ascheme="uniform", abits=8)
    opts = CompileOptions(scheme="uniform", bits=8, int8_weights="s8-safe")
    for extra in ([], [PairSafeInt8Weights()]):
        gm = Pipeline([FoldBatchNorm(), SelectLayers(cfg), InsertQuantizers(), Calibrate(x), *extra, QuantizeBias()])(
            qcompile.trace(digits.pretrained(), x[:1])).gm
        table = emit.quantizers_by_id(gm)
        exported = export_onnx(gm, x[:1])
        if not extra:
            with pytest.raises(UserError, match=r"int8_weights='s8-safe' but \d+ int8 weight pairs .* run "
                                                r"qcompile.passes.PairSafeInt8Weights"):
                emit.emit(exported, table, opts)
        else:
            assert saturating_pairs(emit.emit(exported, table, opts)) == 0


def test_pair_pass_that_finds_no_layer_promises_nothing():
    """PairSafeInt8Weights on a compiled model (its layers bound to integer kernels) found no layer, yet marked every
    weight checked: emit with int8_weights="s8-safe" then wrote int8 pairs past int16, and validation passed."""
    import copy

    from qcompile import CompileOptions, emit, export_onnx
    from qcompile.errors import UserError

    x = digits.calibration_inputs(32)
    result = qcompile.compile(digits.pretrained(), x[:1], calib=x, scheme="uniform", bits=8, int8_weights="s8",
                              validate=False)
    gm = copy.deepcopy(result.model)
    p = PairSafeInt8Weights()
    assert not p(gm).modified
    assert any("nothing done, and int8_weights='s8-safe' is not promised" in line for line in p.report)
    exported = export_onnx(gm, x[:1])
    plain = emit.emit(exported, emit.quantizers_by_id(gm), CompileOptions(scheme="uniform", bits=8, int8_weights="s8"))
    assert saturating_pairs(plain) > 0  # full-range int8 weights: pairs past int16 to refuse
    with pytest.raises(UserError, match=r"int8_weights='s8-safe' but \d+ int8 weight pairs"):
        emit.emit(exported, emit.quantizers_by_id(gm), CompileOptions(scheme="uniform", bits=8, int8_weights="s8-safe"))
