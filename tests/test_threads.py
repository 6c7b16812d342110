"""qcompile.threads: small compiles run torch on one thread and give the caller's setting back."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompile
from qcompile.errors import UserError
import qcompile.threads
from qcompile.threads import (SMALL_PARAMS, SMALL_SAMPLE, busy_elsewhere, compile_threads, small_workload,
                              torch_threads)
from tests.models import MLP, example_input


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_small_and_large_workloads(monkeypatch):
    monkeypatch.setattr(qcompile.threads, "busy_elsewhere", lambda *a, **k: 0.0)  # an idle machine
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


def test_a_large_compile_leaves_the_cores_other_processes_hold(monkeypatch, two_threads):
    """A 3.2 M-parameter compile from Python took 33 s on 2 threads while other processes held the 2 cores, 4.4 s
    on one: a large model runs on the cores left free, never on more threads than the caller's."""
    wide = nn.Linear(1024, SMALL_PARAMS // 1024 + 1)
    x = (torch.randn(1, 1024),)
    monkeypatch.setattr(qcompile.threads, "_affinity", lambda: [0, 1])
    for busy, threads in ((0.0, None), (0.4, None), (0.6, 1), (1.0, 1), (2.0, 1)):
        monkeypatch.setattr(qcompile.threads, "busy_elsewhere", lambda *a, _b=busy, **k: _b)
        assert compile_threads(wide, x) == threads, busy
    monkeypatch.setattr(qcompile.threads, "busy_elsewhere", lambda *a, **k: None)  # not Linux: unchanged
    assert compile_threads(wide, x) is None


def test_busy_elsewhere_sees_another_process_and_not_this_one():
    import subprocess
    import sys
    import threading

    if busy_elsewhere(seconds=0.01) is None:
        pytest.skip("no /proc/stat on this system: the probe reports None and compiles keep their threads")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time
        time.sleep(0.3)  # the interpreter started
        other = busy_elsewhere(seconds=0.3)
    finally:
        spin.kill()
        spin.wait()
    stop = threading.Event()

    def own():
        while not stop.is_set():
            pass

    worker = threading.Thread(target=own)
    worker.start()
    try:
        mine = busy_elsewhere(seconds=0.3)  # this process's own busy thread is not another process
    finally:
        stop.set()
        worker.join()
    assert other >= 0.6, other
    assert mine <= other - 0.4, (mine, other)


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def test_a_large_compile_probes_while_it_traces(monkeypatch, two_threads):
    """The probe of the other processes' load runs beside the trace (it took 50 ms before every large compile's
    first step); the passes run on the cores it found free, and the caller's setting comes back, also after a
    failing compile."""
    import threading

    x = torch.randn(4, 3, 80, 80)  # 19 200 values a sample: not a small workload
    model = _Convs().eval()
    assert not small_workload(model, (x[:1],))
    monkeypatch.setattr(qcompile.threads, "_affinity", lambda: [0, 1])
    traced = threading.Event()
    probe_saw_trace = []
    real_trace = qcompile.api.trace

    def trace(*args, **kwargs):
        out = real_trace(*args, **kwargs)
        traced.set()
        return out

    def busy(*args, **kwargs):  # answers only once the trace is done: it would wait forever if it ran first
        probe_saw_trace.append(traced.wait(timeout=30))
        return 2.0  # the other processes hold both cores

    monkeypatch.setattr(qcompile.api, "trace", trace)
    monkeypatch.setattr(qcompile.threads, "busy_elsewhere", busy)
    seen = []
    result = qcompile.compile(model, x[:1], scheme="uniform", bits=8, calib=x, validate=False,
                              callback=lambda t: seen.append(torch.get_num_threads()))
    assert probe_saw_trace == [True]
    assert seen and set(seen) == {1}
    assert result.onnx_model is not None
    assert torch.get_num_threads() == 2
    with pytest.raises(UserError):
        qcompile.compile(model, x[:1], scheme="uniform", bits=8, calib=x * float("nan"))
    assert torch.get_num_threads() == 2
