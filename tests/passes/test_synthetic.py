"""passes/synthetic.py: inputs distilled from BatchNorm statistics (ZeroQ) for data-free calibration.

What is checked: the distilled inputs give every BatchNorm'd tensor (folded layer outputs, unfolded BatchNorms)
the per-channel mean and spread its statistics record, where the starting inputs do not; which quantizers the
distilled values describe (those with a BatchNorm before them); and that a model with an integer input, or no
BatchNorm, gets nothing.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qcompile.frontend import trace
from qcompile.ir import LayerConfig
from qcompile.passes import synthetic
from qcompile.passes.base import Pipeline
from qcompile.passes.fold_bn import FoldBatchNorm
from qcompile.passes.insert_quant import InsertQuantizers
from qcompile.passes.select import SelectLayers
from qcompile.qmodules import FakeQuantize

U8 = LayerConfig(action="quant", wscheme="uniform", wbits=8, ascheme="uniform", abits=8, per_channel=True)


def _model() -> nn.Module:
    """conv-BN-SiLU (folded), then BN-ReLU-conv (the BatchNorm before its conv stays unfolded), a mean, a linear;
    BatchNorm statistics those of inputs uniform on [1, 5], far from the N(0, 1) that distillation starts from."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.SiLU(),
                          nn.BatchNorm2d(8, momentum=None), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for bn in (model[1], model[3]):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
        model.train()
        model(1 + 4 * torch.rand(256, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def _prepared(model, x):
    return Pipeline([FoldBatchNorm(), SelectLayers(U8, first_last="quant"), InsertQuantizers()])(trace(model, x)).gm


def _statistics(gm, points, inputs) -> dict:
    """node -> (per-channel mean, per-channel std) of each described tensor on ``inputs``."""
    out = {}

    def sink(value, beta, gamma):
        dims = [d for d in range(value.dim()) if d != 1]
        out[len(out)] = (value.mean(dims), value.std(dims), beta, gamma)

    with torch.no_grad():
        synthetic._Record(gm, points, sink).run(*inputs)
    return out


def test_distilled_inputs_give_every_batchnormed_tensor_its_statistics():
    gm = Pipeline([FoldBatchNorm()])(trace(_model(), torch.randn(1, 3, 8, 8))).gm
    points = synthetic.describing_points(gm)
    kinds = sorted("folded" if "output_stats" in n.meta else "module" for n in points)
    assert kinds == ["folded", "module"], kinds  # conv0 with its BatchNorm folded; the BatchNorm before conv5
    inputs = synthetic.distill(gm, points)
    assert inputs is not None and inputs[0].shape == (16, 3, 8, 8)  # 16 samples of 192 values: the batch's cap

    def worst(stats):
        return max(float(((m - b).abs() / g).max().item()) + float(((s - g).abs() / g).max().item())
                   for m, s, b, g in stats.values())

    start = [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))]
    before, after = worst(_statistics(gm, points, start)), worst(_statistics(gm, points, inputs))
    assert before > 3.0 and after < 0.4, (before, after)  # measured 3.44 -> 0.28 (worst channel)


def test_observe_describes_the_quantizers_after_a_batchnorm_only():
    model = _model()
    gm = _prepared(model, torch.randn(1, 3, 8, 8))
    acts = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FakeQuantize)
            and gm.get_submodule(n.target).role != "weight"]
    steps = []
    observers = synthetic.observe(gm, acts, "mse", progress=lambda done, total: steps.append((done, total)))
    assert steps[-1] == (synthetic.STEPS, synthetic.STEPS) and len(steps) == synthetic.STEPS  # the CLI's bar
    # the inputs of conv5 (after BN-ReLU) and of the linear (after the mean) are described, not the model's input
    assert len(acts) == 3 and set(observers) == set(acts[1:])
    for node, obs in observers.items():
        assert float(obs.max_val.max()) > 0.0
    # the quantizers pass values through again afterwards, and none was left observing
    assert all(m.enabled and m.observer is None for m in gm.modules() if isinstance(m, FakeQuantize))


def test_nothing_is_distilled_without_a_batchnorm_or_for_integer_inputs():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    gm = _prepared(plain, torch.randn(1, 3, 8, 8))
    acts = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FakeQuantize)
            and gm.get_submodule(n.target).role != "weight"]
    assert acts and synthetic.observe(gm, acts, "mse") == {}

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.fc1, self.bn, self.fc2 = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)

        def forward(self, ids):
            return self.fc2(torch.relu(self.bn(self.fc1(self.embed(ids).mean(1)))))

    gm = _prepared(Tokens().eval(), torch.zeros(2, 5, dtype=torch.long))
    assert synthetic.describing_points(gm)
    assert synthetic.distill(gm, synthetic.describing_points(gm)) is None  # token ids cannot be optimised


def test_compile_names_why_nothing_was_distilled_for_token_inputs():
    """A quantizer after a BatchNorm and a SiLU in a model that reads token ids: no plan reaches it, and ids cannot
    be optimised; the refusal says so (not "no BatchNorm comes before it")."""
    import pytest

    import qcompile
    from qcompile.errors import UserError

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(10, 8)
            self.fc1, self.bn, self.fc2, self.fc3 = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, ids):
            return self.fc3(self.fc2(torch.nn.functional.silu(self.bn(self.fc1(self.embed(ids).mean(1))))))

    model = Tokens()
    with torch.no_grad():  # running statistics of data, not the initial ones (those are refused first)
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    with pytest.raises(UserError, match=r"cannot calibrate the input of layer 'fc2' without data \(inputs could not "
                                        r"be distilled from its BatchNorm statistics: a model input that is not a "
                                        r"float tensor"):
        qcompile.compile(model.eval(), torch.zeros(2, 5, dtype=torch.long), scheme="uniform", bits=8,
                         keep_first_last="fp32")
