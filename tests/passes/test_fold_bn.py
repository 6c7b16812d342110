"""FoldBatchNorm: numeric equivalence, structure, BNs that must stay, unchanged graphs, idempotence."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qcompile.frontend import trace
from qcompile.passes.base import Pipeline, verify
from qcompile.passes.fold_bn import BATCHNORMS, ChannelStats, FoldBatchNorm
from tests.models import MLP, MobileNetLike, ResidualCNN, UnfoldableBN, example_input, randomize_batchnorm

RTOL = 1e-5  # the bound: relative error in float32 on seeded inputs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def seeded(factory, seed: int = 0):
    """Build a toy module with torch's default init under a fixed seed, leaving the global RNG as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory()


def bn_nodes(gm):
    return [n for n in gm.graph.nodes
            if (n.op == "call_module" and isinstance(gm.get_submodule(n.target), BATCHNORMS))
            or (n.op == "call_function" and n.target is F.batch_norm)]


def fold(model: nn.Module, x: torch.Tensor):
    gm = trace(model, x)
    with torch.no_grad():
        ref = gm(x)
    p = FoldBatchNorm()
    result = p(gm)
    gm = result.gm
    gm.recompile()
    verify(gm)
    with torch.no_grad():
        out = gm(x)
    return gm, result, p, ref, out


MODELS = {
    "residual_cnn": lambda: ResidualCNN(seed=0),
    "mobilenet_relu": lambda: MobileNetLike(seed=1, act="relu"),
    "mobilenet_relu6": lambda: MobileNetLike(seed=2, act="relu6"),
    "mlp": lambda: MLP(seed=3),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_folds_every_bn_and_keeps_outputs(name):
    model = MODELS[name]()
    n_bn = sum(isinstance(m, BATCHNORMS) for m in model.modules())
    gm, result, p, ref, out = fold(model, example_input(model, seed=10))
    assert result.modified
    assert rel_err(out, ref) <= RTOL
    assert bn_nodes(gm) == []
    assert not any(isinstance(m, BATCHNORMS) for m in gm.modules())
    assert sum(line.startswith("folded ") for line in p.report) == n_bn


class _ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module, shape):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.INPUT_SHAPE = shape

    def forward(self, x):
        return self.bn(self.conv(x))


CASES = {
    "conv1d_grouped_bias": lambda: _ConvBN(nn.Conv1d(4, 6, 3, groups=2, padding=1), nn.BatchNorm1d(6), (2, 4, 9)),
    "conv2d_depthwise_nobias": lambda: _ConvBN(nn.Conv2d(6, 6, 3, groups=6, bias=False), nn.BatchNorm2d(6), (2, 6, 7, 7)),
    "conv2d_depthwise_multiplier": lambda: _ConvBN(nn.Conv2d(4, 8, 3, groups=4), nn.BatchNorm2d(8), (2, 4, 6, 6)),
    "conv2d_bn_no_affine": lambda: _ConvBN(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5, affine=False), (2, 3, 4, 4)),
    "linear_nobias": lambda: _ConvBN(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7), (3, 5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_grouped_depthwise_bias_variants(name):
    model = randomize_batchnorm(seeded(CASES[name]), seed=5)
    x = example_input(model.INPUT_SHAPE, seed=11)
    gm, result, p, ref, out = fold(model, x)
    assert result.modified and rel_err(out, ref) <= RTOL
    assert gm.conv.bias is not None  # a layer without bias gets one
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    stats = next(n for n in gm.graph.nodes if n.op == "call_module").meta["output_stats"]
    assert isinstance(stats, ChannelStats) and stats.mean.shape == (gm.conv.weight.shape[0],)
    assert p.report == ["folded bn into conv"]


def test_bns_that_must_stay_are_reported():
    model = UnfoldableBN(seed=0)
    gm, result, p, ref, out = fold(model, example_input(model, seed=12))
    assert rel_err(out, ref) <= RTOL
    assert result.modified  # bn_ok follows conv_ok alone and is folded
    remaining = {n.target for n in bn_nodes(gm)}
    assert remaining == {"bn_in", "bn1", "bn2"}
    text = "\n".join(p.report)
    assert "left bn_in alone: its input x (placeholder)" in text
    assert "left bn1 alone: the output of conv1 also feeds" in text
    assert "left bn2 alone: shared is called from 2 places" in text
    assert "folded bn_ok into conv_ok" in text


def test_linear_with_3d_output_is_not_folded():
    class M(nn.Module):
        INPUT_SHAPE = (2, 6, 4)

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)  # normalises axis 1 (6 rows), not the 6 features

        def forward(self, x):
            return self.bn(self.fc(x))

    model = randomize_batchnorm(seeded(M), seed=1)
    gm, result, p, ref, out = fold(model, example_input(M.INPUT_SHAPE, seed=1))
    assert not result.modified and len(bn_nodes(gm)) == 1
    assert rel_err(out, ref) <= RTOL
    assert "BatchNorm1d normalises axis 1" in p.report[0]


def test_training_mode_bn_is_left_alone():
    model = MLP(seed=0)
    gm = trace(model, example_input(model))
    gm.bn1.train()
    p = FoldBatchNorm()
    assert p(gm).modified is False
    assert "training mode" in p.report[0]


def test_functional_batch_norm_is_folded():
    class M(nn.Module):
        INPUT_SHAPE = (2, 3, 5, 5)

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            gen = torch.Generator().manual_seed(3)
            self.register_buffer("mean", torch.randn(4, generator=gen))
            self.register_buffer("var", torch.rand(4, generator=gen) + 0.5)
            self.gamma = nn.Parameter(torch.randn(4, generator=gen))
            self.beta = nn.Parameter(torch.randn(4, generator=gen))

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)

    model = seeded(M).eval()
    gm, result, p, ref, out = fold(model, example_input(M.INPUT_SHAPE, seed=2))
    assert result.modified and rel_err(out, ref) <= RTOL
    assert bn_nodes(gm) == [] and not any(n.op == "get_attr" for n in gm.graph.nodes)


def test_graph_without_bn_comes_back_unchanged():
    model = MLP(seed=0, with_bn=False)
    x = example_input(model)
    gm = trace(model, x)
    code, params = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    result = FoldBatchNorm()(gm)
    assert result.modified is False
    assert gm.code == code
    assert all(torch.equal(v, params[k]) for k, v in gm.state_dict().items())


@pytest.mark.parametrize("name", ["residual_cnn", "mobilenet_relu"])
def test_idempotent(name):
    model = MODELS[name]()
    x = example_input(model, seed=13)
    gm, _, _, ref, _ = fold(model, x)
    code = gm.code
    second = FoldBatchNorm()
    assert second(gm).modified is False
    assert gm.code == code
    with torch.no_grad():
        assert rel_err(gm(x), ref) <= RTOL


def test_in_a_checked_pipeline():
    model = ResidualCNN(seed=4)
    x = example_input(model, seed=4)
    gm = trace(model, x)
    with torch.no_grad():
        ref = gm(x)
    pipe = Pipeline([FoldBatchNorm()], steps=3, check=True)
    result = pipe(gm)
    assert result.modified and len(pipe.timings) == 2  # second round finds nothing and stops
    with torch.no_grad():
        assert rel_err(result.gm(x), ref) <= RTOL


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_conv_and_batchnorm_fold_per_output_channel(groups):
    """A decoder's ConvTranspose -> BatchNorm: the output channels are axis 1 of the weight, per group."""
    gen = torch.Generator().manual_seed(17)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups),
                          nn.BatchNorm2d(6), nn.ReLU()).eval()
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.copy_(torch.randn(6, generator=gen))
        bn.running_var.copy_(torch.rand(6, generator=gen) + 0.5)
        bn.weight.copy_(torch.randn(6, generator=gen))
        bn.bias.copy_(torch.randn(6, generator=gen))
    x = torch.randn(2, 4, 5, 5, generator=gen)
    with torch.no_grad():
        expected = model(x)
    result = Pipeline([FoldBatchNorm()])(trace(copy.deepcopy(model), (x,)))
    assert result.modified
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(result.gm(x), expected, rtol=1e-5, atol=1e-5)


class _SameConv(nn.Conv2d):
    """A conv subclass with its own forward (TF "same" padding, as timm's Conv2dSame): traced into F.pad +
    F.conv2d on the module's parameters."""

    def forward(self, x):
        return F.conv2d(F.pad(x, [0, 1, 0, 1]), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _SameConvBN(nn.Module):
    INPUT_SHAPE = (2, 3, 9, 9)

    def __init__(self, bias: bool):
        super().__init__()
        self.conv = _SameConv(3, 6, 3, stride=2, bias=bias)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4, bias=False)
        self.bn1d = nn.BatchNorm1d(4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.bn1d(F.linear(y, self.fc.weight))  # a functional Linear on a module's weight, then BN


@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_after_functional_layers_on_parameters_is_folded(bias):
    model = seeded(lambda: _SameConvBN(bias)).eval()
    randomize_batchnorm(model, seed=4)
    gm, result, p, ref, out = fold(model, example_input(_SameConvBN.INPUT_SHAPE, seed=5))
    assert result.modified and bn_nodes(gm) == [], p.report
    assert rel_err(out, ref) <= RTOL
    conv = next(n for n in gm.graph.nodes if n.target is F.conv2d)
    assert conv.args[2] is not None and conv.args[2].op == "get_attr"  # a bias now, folded
    assert "output_stats" in conv.meta


def test_functional_layer_whose_weight_is_shared_keeps_its_batchnorm():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(F.conv2d(x, self.weight)) + F.conv2d(x.flip(-1), self.weight)  # two readers

    model = seeded(Shared).eval()
    randomize_batchnorm(model, seed=6)
    gm, result, p, ref, out = fold(model, example_input((2, 3, 6, 6), seed=7))
    assert not result.modified and len(bn_nodes(gm)) == 1
    assert any("also used elsewhere" in line for line in p.report), p.report
    assert torch.equal(out, ref)


def test_tied_weights_are_not_folded_or_equalized():
    """Two layers sharing one weight (tying): folding a BatchNorm or equalizing through one rewrote the other's
    weight too, and the compile stopped with "qcompile's graph passes changed what the model computes ... this is a
    qcompile bug". Such layers are now left alone and say why."""
    import qcompile
    from qcompile.passes import EqualizeWeights

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.out = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)
            self.b.weight = self.a.weight
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            x = F.relu(self.bn(self.a(x)))
            return self.out(F.relu(self.b(x)).mean((2, 3)))

    model = randomize_batchnorm(Tied(), seed=1).eval()
    x = torch.randn(32, 8, 6, 6, generator=torch.Generator().manual_seed(2))
    fold, eq = FoldBatchNorm(), EqualizeWeights()
    gm = Pipeline([fold, eq])(qcompile.trace(model, x[:1])).gm
    assert any("shares a parameter with b.weight" in line or "shares a parameter with a.weight" in line
               for line in fold.report + eq.report), (fold.report, eq.report)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, output=None)
    assert result.report.passed and result.report.extra["sqnr_vs_float_db"] > 30, result.report.summary()


@pytest.mark.parametrize("bn", [False, True])
def test_a_module_weight_a_functional_call_reads_is_tied_too(bn):
    """A tied autoencoder decodes with ``F.conv_transpose2d(h, self.enc.weight)``: the graph reads the conv's
    weight with a ``get_attr`` node. FoldBatchNorm and EqualizeWeights rescaled that weight in place, and the compile
    stopped with "... this is a qcompile bug"."""
    import qcompile

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.enc = nn.Conv2d(1, 8, 4, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
            self.mid = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            h = F.relu(self.mid(F.relu(self.bn(self.enc(x)))))
            return F.conv_transpose2d(h, self.enc.weight, None, stride=2, padding=1)

    model = randomize_batchnorm(Tied(), seed=1).eval()
    x = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    result = qcompile.compile(model, x[:1], calib=x, scheme="uniform", bits=8, output=None)
    assert result.report.passed and result.report.extra["sqnr_vs_float_db"] > 30, result.report.summary()
    reports = [line for t in result.timings for line in t.report]
    assert any("shares a parameter with the node" in line for line in reports), reports


def test_reading_a_weight_shape_in_forward_is_not_tying():
    """``self.conv.weight.shape`` read in forward made the conv count as tied: its BatchNorm stayed unfolded."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            return y * (self.conv.weight.shape[0] / 8)

    model = randomize_batchnorm(M(), seed=1).eval()
    fold = FoldBatchNorm()
    gm = Pipeline([fold])(trace(model, (torch.randn(1, 3, 8, 8),))).gm
    assert not bn_nodes(gm), fold.report


def test_initial_batchnorm_statistics_are_noted_for_a_pipeline_of_ones_own():
    """compile() refused data-free calibration from BatchNorms that hold their initial statistics (mean 0, variance
    1), but a hand-built FoldBatchNorm -> ... -> Calibrate() pipeline calibrated from them without a word (the digits
    CNN untrained: 23 dB against float). FoldBatchNorm notes them now, before folding them."""
    from qcompile.errors import UserError
    from qcompile.frontend import trace
    from qcompile.models import digits
    from qcompile.passes import Calibrate, InsertQuantizers, Pipeline, SelectLayers

    gm = trace(digits.digits_cnn().eval(), torch.rand(1, 1, 8, 8))
    with pytest.raises(UserError, match=r"4 BatchNorm layer\(s\) hold their initial running statistics"):
        Pipeline([FoldBatchNorm(), SelectLayers(), InsertQuantizers(), Calibrate(None)])(gm)
    trained = trace(digits.pretrained(), torch.rand(1, 1, 8, 8))
    FoldBatchNorm()(trained)
    assert "qcompile.initial_batchnorm_stats" not in trained.meta


def _bn_net_on(data: torch.Tensor) -> nn.Module:
    """A conv + BatchNorm net whose running statistics are those of ``data`` (as training leaves them)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 10))
    net.train()
    with torch.no_grad():
        for i in range(0, len(data), 32):
            net(data[i:i + 32])
    return net.eval()


@pytest.mark.parametrize("scale, shift, warned", [(1.0, 0.0, False), (8.0, 8.0, True), (0.5, 0.5, True),
                                                  (8 / 255, 8 / 255, True)])
def test_calibration_data_unlike_the_training_data_are_noted(scale, shift, warned):
    """Pixels in 0..16, 0..1 or 0..255 handed to a model trained on [-1, 1] compiled without a word and validated
    (on those same data), while the file scored 11-21 % on real inputs: the first BatchNorm's running statistics
    say what the data should look like."""
    import warnings

    import qcompile
    from qcompile.passes.fold_bn import calibration_shift_note

    from qcompile.models import digits

    x_train, _, _, _ = digits.load_split()  # in [-1, 1]
    net = _bn_net_on(x_train[:512])
    calib = x_train[512:576] * scale + shift
    gm = trace(net, calib[:1])
    note = calibration_shift_note(gm, calib)
    assert (note is not None) == warned, note
    if warned:
        assert note.startswith("the calibration data do not look like the model's training data: at its first "
                               "BatchNorm (1)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = qcompile.compile(net, calib[:1], calib=calib, scheme="uniform", bits=8, validate=False)
        assert any("do not look like the model's training data" in str(w.message) for w in caught)
        assert result.summary["data_shift_note"] == note


def test_few_samples_and_few_batches_of_statistics_are_no_shift():
    """False alarms: two correct rows through an input BatchNorm1d (their own statistics are far from any
    population's), and running statistics of 3 batches at momentum 0.1 (73 % still the initial variance 1)."""
    from qcompile.passes.fold_bn import calibration_shift_note

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(512, 12, generator=gen) * 3 + 5
    net = nn.Sequential(nn.BatchNorm1d(12, momentum=None), nn.Linear(12, 4))
    net.train()
    with torch.no_grad():
        net(rows)
    net.eval()
    fired = sum(calibration_shift_note(trace(net, rows[:1]), rows[i:i + 2]) is not None for i in range(0, 200, 2))
    assert fired <= 5, fired
    assert calibration_shift_note(trace(net, rows[:1]), rows[:64] / 3) is not None  # mis-scaled: still said

    conv = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())  # momentum 0.1
    images = torch.randn(96, 1, 8, 8, generator=gen) * 20
    conv.train()
    with torch.no_grad():
        for i in range(0, 96, 32):
            conv(images[i:i + 32])
    conv.eval()
    assert int(conv[1].num_batches_tracked) == 3
    assert calibration_shift_note(trace(conv, images[:1]), images[:32]) is None
    conv[1].num_batches_tracked.fill_(1000)  # the same statistics taken for converged ones: far off
    assert calibration_shift_note(trace(conv, images[:1]), images[:32]) is not None


def test_the_shift_check_reads_rows_from_all_the_data_and_functional_batchnorms():
    """load_wine is sorted by class: the first 32 rows, all class 0, read as "do not look like the training data".
    timm's BatchNormAct2d traces to F.batch_norm on buffers, which the check did not look at."""
    from qcompile.passes.fold_bn import calibration_shift_note

    gen = torch.Generator().manual_seed(0)
    classes = [torch.randn(60, 6, generator=gen) + 3 * c for c in range(3)]  # sorted by class
    rows = torch.cat(classes)
    net = nn.Sequential(nn.BatchNorm1d(6, momentum=None), nn.Linear(6, 3))
    net.train()
    with torch.no_grad():
        net(rows)
    net.eval()
    gm = trace(net, rows[:1])
    assert calibration_shift_note(gm, classes[0][:32]) is not None  # one class alone is unlike the whole
    assert calibration_shift_note(gm, rows) is None  # rows drawn over all of it

    class Functional(nn.Module):  # BatchNorm written as F.batch_norm on the module's own buffers
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.register_buffer("mean", torch.zeros(4) + 0.5)
            self.register_buffer("var", torch.ones(4) * 0.25)

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.mean, self.var, training=False)

    torch.manual_seed(0)
    model = Functional().eval()
    x = torch.randn(32, 1, 8, 8, generator=gen)
    with torch.no_grad():
        y = model.conv(x).transpose(0, 1).reshape(4, -1)
        model.mean.copy_(y.mean(1))
        model.var.copy_(y.var(1))
    gm = trace(model, x[:1])
    assert calibration_shift_note(gm, x) is None
    note = calibration_shift_note(gm, x * 255)
    assert note is not None and "x the variance" in note
