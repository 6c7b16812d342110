"""AllocateWeightBits (``avg_wbits``): the exact allocation under the budget, per-layer bits in the file within that
budget, a sensitive layer kept wider than an insensitive one, and the option's refusals."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile.passes.mixed_precision import allocate, candidate_bits
from qcompile.qmodules import FakeQuantize


def test_candidate_bits_are_those_whose_grid_fits_int8():
    assert candidate_bits("uniform") == [2, 3, 4, 5, 6, 7, 8]
    assert candidate_bits("apot") == [2, 3, 4, 5, 6]
    assert candidate_bits("pot") == [2, 3, 4]


def test_allocate_finds_the_least_error_within_the_budget():
    """A small multiple-choice knapsack checked against every assignment; a budget met exactly stays possible."""
    import itertools

    sens = {"a": {2: 50.0, 4: 10.0, 6: 1.0}, "b": {2: 8.0, 4: 3.0, 6: 2.5}, "c": {2: 30.0, 4: 4.0, 6: 0.5}}
    params = {"a": 100, "b": 1000, "c": 300}
    for avg in (2.0, 3.0, 3.4, 4.0, 5.0, 6.0):
        budget = avg * sum(params.values())
        got = allocate(sens, params, budget)
        assert sum(params[k] * b for k, b in got.items()) <= budget + 1e-9
        best = min((sum(sens[k][b] for k, b in zip(sens, combo)), combo)
                   for combo in itertools.product(*(sorted(s) for s in sens.values()))
                   if sum(params[k] * b for k, b in zip(sens, combo)) <= budget + 1e-9)
        assert sum(sens[k][b] for k, b in got.items()) == pytest.approx(best[0]), (avg, got, best)
    assert allocate(sens, params, 1.0) == {"a": 2, "b": 2, "c": 2}  # nothing fits: the fewest bits everywhere


def test_allocate_is_exact_where_the_optimum_fills_the_budget_to_within_a_step():
    """The optimum costs 321178 of a budget of 321188.5, within one of the dynamic programme's 4096 steps (78.4):
    the steps alone (costs rounded down) chose {8, 3, 8, 8, 8} at 2.9x its error."""
    params = {"l0": 724, "l1": 76990, "l2": 11, "l3": 3654, "l4": 17}
    sens = {"l0": {2: 53.69052, 3: 2.65557, 4: 1.61995, 5: 1.32989, 6: 1.17148, 7: 0.79551, 8: 0.00319},
            "l1": {2: 33.67352, 3: 21.25671, 4: 3.15226, 5: 1.39036, 6: 0.56634, 7: 0.01498, 8: 0.00312},
            "l2": {2: 4.96944, 3: 0.58168, 4: 0.51819, 5: 0.33937, 6: 0.28329, 7: 0.20012, 8: 0.01392},
            "l3": {2: 33.23196, 3: 0.47618, 4: 0.25529, 5: 0.03505, 6: 0.01656, 7: 0.00312, 8: 0.00181},
            "l4": {2: 6.83235, 3: 0.53379, 4: 0.09122, 5: 0.01995, 6: 0.0069, 7: 0.00675, 8: 0.0005}}
    assert allocate(sens, params, 321188.5035275033) == {"l0": 3, "l1": 4, "l2": 3, "l3": 3, "l4": 3}


def test_allocate_matches_every_assignment_on_random_knapsacks():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(300):
        layers = [f"l{i}" for i in range(rng.randint(2, 5))]
        params = {k: rng.choice([rng.randint(1, 50), rng.randint(100, 5000), rng.randint(10000, 300000)])
                  for k in layers}
        sens = {k: dict(zip(range(2, 9), sorted((rng.random() * 10 ** rng.uniform(-3, 2) for _ in range(7)),
                                                reverse=True))) for k in layers}
        budget = rng.uniform(2.0, 8.0) * sum(params.values())
        got = allocate(sens, params, budget)
        assert sum(params[k] * b for k, b in got.items()) <= budget + 1e-6
        best = min(sum(sens[k][b] for k, b in zip(layers, combo))
                   for combo in itertools.product(range(2, 9), repeat=len(layers))
                   if sum(params[k] * b for k, b in zip(layers, combo)) <= budget + 1e-6)
        assert sum(sens[k][b] for k, b in got.items()) == pytest.approx(best, rel=1e-12)


class TwoPaths(nn.Module):
    """Two Linear layers of equal size side by side; the output reads ``big`` 30x more than ``small``."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.big = nn.Linear(32, 32)
        self.small = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(30.0 * torch.relu(self.big(h)) + torch.relu(self.small(h)))


def test_a_rule_that_sets_no_weight_bits_leaves_the_layer_in_the_average():
    # {abits = 8} or {per_channel = false} on a layer took it out of --avg-wbits: it kept --wbits 4, and an
    # average announced as 2 bits was 3.33
    torch.manual_seed(0)
    model = TwoPaths().eval()
    x = torch.randn(64, 8)
    for rule in ({"abits": 8}, {"per_channel": False}):
        result = qcompile.compile(model, calib=x, scheme="uniform", bits=4, avg_wbits=2, config={"big": rule},
                                  validate=False)
        bits = {name.rpartition(".")[0]: m.bits for name, m in result.model.named_modules()
                if isinstance(m, FakeQuantize) and m.role == "weight"}
        assert bits["big"] == bits["small"] == 2, (rule, bits)


def test_a_module_called_twice_gets_the_widest_weights_of_its_calls():
    """One weight, one quantizer: an nn.Linear called first as the first layer (8-bit) and again later (4-bit)
    ran both calls on the later call's 4-bit weights (2-bit with --avg-wbits 2) while the table said W8."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.mid, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.relu(self.fc(torch.relu(self.mid(torch.relu(self.fc(x)))))))

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    for extra in ({}, {"avg_wbits": 2}):
        result = qcompile.compile(Twice().eval(), calib=x, scheme="uniform", bits=4, **extra)
        assert result.report.passed
        assert result.model.get_submodule("fc.weight_fq").bits == 8
        from qcompile.passes.select import layer_table

        rows = [row for row in layer_table(result.model) if row[0] == "fc"]
        assert len(rows) == 2 and all(row[2].startswith("W8 uniform") for row in rows), rows


def test_the_layer_the_output_depends_on_gets_more_bits_and_the_file_keeps_the_budget(tmp_path):
    torch.manual_seed(0)
    model = TwoPaths().eval()
    x = torch.randn(64, 8)
    result = qcompile.compile(model, calib=x, output=str(tmp_path / "m.onnx"), scheme="uniform", bits=4,
                              avg_wbits=4)
    assert result.report.passed, result.report.summary()
    bits = {name.rpartition(".")[0]: m.bits for name, m in result.model.named_modules()
            if isinstance(m, FakeQuantize) and m.role == "weight"}
    assert bits["inp"] == 8 and bits["out"] == 8  # first and last layer: kept 8-bit by their rule
    assert bits["big"] > bits["small"], bits
    assert (bits["big"] + bits["small"]) / 2 <= 4  # same size: their average is the budget's
    from qcompile.passes.select import layer_table

    rows = {row[0]: row[2] for row in layer_table(result.model)}
    assert rows["big"].startswith(f"W{bits['big']} uniform / A4 uniform (mixed precision)"), rows
    report = next(t.report for t in result.timings if t.name == "AllocateWeightBits")
    assert report[0].startswith("2 layer(s), 2048 weights: average"), report
    meta = json.loads(next(p.value for p in result.onnx_model.metadata_props if p.key == "qcompile.options"))
    assert meta["avg_wbits"] == 4.0  # qcompile validate decides the same bits from the same data


def test_refusals():
    model = TwoPaths().eval()
    x = torch.randn(16, 8)
    with pytest.raises(qcompile.UserError, match="pass calibration inputs"):
        qcompile.compile(model, x[:1], avg_wbits=4, validate=False)
    with pytest.raises(qcompile.UserError, match="average bit-width from 2 to 8"):
        qcompile.compile(model, calib=x, avg_wbits=9, validate=False)
    with pytest.raises(qcompile.UserError, match="ternary weights have 2-bit levels"):
        qcompile.compile(model, calib=x, wscheme="ternary", ascheme="uniform", abits=8, avg_wbits=3, validate=False)
    from qcompile import qat

    with pytest.raises(qcompile.UserError, match="avg_wbits chooses bit-widths for post-training"):
        qat.prepare(model, x, scheme="apot", bits=4, avg_wbits=3)


def test_after_insert_quantizers_it_says_so_and_changes_nothing():
    from qcompile.ir import LayerConfig
    from qcompile.passes import AllocateWeightBits, InsertQuantizers, Pipeline, SelectLayers

    model = TwoPaths().eval()
    x = torch.randn(32, 8)
    gm = Pipeline([SelectLayers(LayerConfig(wscheme="uniform", wbits=4, ascheme="uniform", abits=8)),
                   InsertQuantizers()])(qcompile.trace(model, x[:1])).gm
    late = AllocateWeightBits(3, x)
    assert not late(gm).modified
    assert "run AllocateWeightBits after SelectLayers and before InsertQuantizers" in late.report[0]


class Twice(nn.Module):
    """``mid`` called twice: one weight, one width for both calls."""

    def __init__(self):
        super().__init__()
        self.a, self.mid, self.b, self.o = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.mid(torch.relu(self.mid(torch.relu(self.a(x))))))
        return self.o(torch.relu(self.b(h)))


def test_a_weight_two_calls_share_gets_one_width_for_both():
    from qcompile.passes.select import layer_table

    torch.manual_seed(0)
    result = qcompile.compile(Twice().eval(), calib=torch.randn(64, 8), scheme="uniform", bits=4, avg_wbits=3)
    assert result.report.passed, result.report.summary()
    mids = [row[2] for row in layer_table(result.model) if row[0] == "mid"]
    assert len(mids) == 2 and mids[0] == mids[1] and "(mixed precision)" in mids[0], mids
    report = next(t.report for t in result.timings if t.name == "AllocateWeightBits")
    assert report[0].startswith("2 layer(s), 512 weights"), report  # mid's weights counted once


def test_weight_only_layers_left_out_of_the_average_are_named():
    """--avg-wbits 3 on Linear -> GRU -> Linear x3: the header said "W3 (average)" while the GRU's 4608 weights stayed
    at 4 bits, and nothing said so. The pass report and a compile warning name them now."""
    import warnings

    import qcompile

    class RecurrentMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(8, 16)
            self.gru = torch.nn.GRU(16, 32, batch_first=True)
            self.fc1, self.fc2, self.fc = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 10)

        def forward(self, t):
            y, _ = self.gru(self.inp(t))
            return self.fc(torch.relu(self.fc2(torch.relu(self.fc1(y[:, -1])))))

    torch.manual_seed(0)
    model, x = RecurrentMLP().eval(), torch.randn(64, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = qcompile.compile(model, x[:1], calib=x, avg_wbits=3, validate=False, progress=False)
    note = "--avg-wbits leaves out 1 weight-only layer(s), which keep --wbits: gru (4608 weights, W4)"
    assert any(str(w.message).startswith(note) for w in caught)
    assert result.summary["mixed_precision_note"].startswith(note)
    report = next(t.report for t in result.timings if t.name == "AllocateWeightBits")
    assert report[0].startswith(note) and report[1].startswith("2 layer(s), 2048 weights: average 3.00 bits")
