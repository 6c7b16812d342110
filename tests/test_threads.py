"""qcompile.threads: small compiles run torch on one thread and give the caller's setting back."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompile
from qcompile.errors import UserError
from qcompile.threads import SMALL_PARAMS, SMALL_SAMPLE, compile_threads, small_workload, torch_threads
from tests.models import MLP, example_input


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_small_and_large_workloads():
    small = MLP(seed=0)
    assert small_workload(small, (torch.randn(1, 16),))
    assert compile_threads(small, (torch.randn(1, 16),)) == 1
    # a large sample (an ImageNet-sized image) or many parameters keep the caller's threads
    assert not small_workload(small, (torch.randn(1, SMALL_SAMPLE + 1),))
    wide = nn.Linear(1024, SMALL_PARAMS // 1024 + 1)
    assert not small_workload(wide, (torch.randn(1, 1024),))
    assert compile_threads(wide, (torch.randn(1, 1024),)) is None


def test_torch_threads_restores_on_error(two_threads):
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    with torch_threads(None):
        assert torch.get_num_threads() == 2
    with torch_threads(4):  # never raises the caller's setting
        assert torch.get_num_threads() == 2


def test_a_small_compile_runs_on_one_thread_and_restores(two_threads):
    model = MLP(seed=1)
    x = example_input(model, seed=2, batch=32)
    seen = []
    result = qcompile.compile(model, x[:1], scheme="uniform", bits=8, calib=x,
                              callback=lambda t: seen.append(torch.get_num_threads()))
    assert result.report.passed
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


def test_a_failing_compile_restores_the_threads(two_threads):
    model = MLP(seed=1)
    x = example_input(model, seed=2, batch=4)
    with pytest.raises(UserError):
        qcompile.compile(model, x[:1], scheme="uniform", bits=8, calib=x * float("nan"))
    assert torch.get_num_threads() == 2
