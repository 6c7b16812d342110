"""One torch thread for small compiles.

A compile runs many small torch operations (observers, scale searches, the calibration batches of a small model).
Split over torch's intra-op threads they gain nothing, and on a shared machine they lose a great deal: an OpenMP
region waits for its slowest thread, and a thread that another process has descheduled stalls every region. The
bundled digits compile took 0.79 s with 2 threads and 0.15 s with 1 while two other processes kept the 2 cores
busy (onnxruntime's quantizer, measured in the same loop: 0.27 s). ``small_workload`` models therefore compile with
one torch thread; the caller's setting is restored afterwards. Larger models keep their threads, except those that
other processes keep busy (``busy_elsewhere``, read from ``/proc/stat`` over 50 ms while the model is traced:
``DeferredThreads``): a 3.2 M parameter LRASPP compile from Python took 33 s on 2 threads while other processes
held the 2 cores, 4.4 s on one (the CLI's ``OMP_WAIT_POLICY=PASSIVE``, which Python cannot set once torch is
loaded: 4.7 s).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time

import torch

# A model counts as small up to this many parameters and input elements per sample (a CIFAR ResNet-20: 0.27 M
# parameters, 3 x 32 x 32 inputs; torchvision's ImageNet models at 224 x 224 are not)
SMALL_PARAMS = 1 << 20
SMALL_SAMPLE = 1 << 14


def small_workload(model: torch.nn.Module, example_inputs: tuple) -> bool:
    """Whether ``model`` on samples like ``example_inputs`` (batch-first) is small enough for one thread."""
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    if params > SMALL_PARAMS:
        return False
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t[:1].numel() > SMALL_SAMPLE:
            return False
    return True


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with at most ``n`` torch intra-op threads (None: unchanged), then restore the setting."""
    old = torch.get_num_threads()
    if n is None or old <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def compile_threads(model: torch.nn.Module, example_inputs: tuple) -> int | None:
    """The torch thread count a compile of ``model`` runs with: 1 for a small workload; else the cores of this
    process's CPU set that other processes leave free, where that is fewer than torch's threads; else None
    (unchanged)."""
    if small_workload(model, example_inputs):
        return 1
    threads = torch.get_num_threads()
    if threads <= 1:
        return None
    cpus = _affinity()
    return _free_threads(len(cpus), busy_elsewhere(cpus), threads)


class DeferredThreads:
    """:func:`compile_threads` for a compile, measured while the compile starts: the 50 ms probe of the other
    processes' load runs in a background thread (it counts this process's own CPU time out, so tracing the model
    meanwhile does not read as load) and :meth:`settle` applies its answer, after the trace; a small workload takes
    one thread at once. Leaving the block joins the probe and restores the caller's setting. A ResNet-18 compile
    waited the probe's 50 ms before its first step."""

    def __init__(self, model: torch.nn.Module, example_inputs: tuple):
        self.threads = 1 if small_workload(model, example_inputs) else None
        self._probe = None
        self._busy = None
        self._old = None
        if self.threads is None and torch.get_num_threads() > 1:
            self._probe = threading.Thread(target=self._measure, name="qcompile-load-probe", daemon=True)
            self._probe.start()

    def _measure(self) -> None:
        try:
            self._busy = busy_elsewhere(_affinity())
        except Exception:  # noqa: BLE001 -- a probe that cannot read the load leaves the threads as they are
            self._busy = None

    def __enter__(self) -> "DeferredThreads":
        self._apply(self.threads)
        return self

    def settle(self) -> None:
        """Wait for the probe and run the rest of the compile on the cores it found free."""
        if self._probe is None:
            return
        self._probe.join()
        self._probe = None
        self._apply(_free_threads(len(_affinity()), self._busy, torch.get_num_threads()))

    def _apply(self, n) -> None:
        old = torch.get_num_threads()
        if n is None or old <= n:
            return
        if self._old is None:
            self._old = old
        torch.set_num_threads(n)

    def __exit__(self, *exc) -> None:
        if self._probe is not None:
            self._probe.join()
            self._probe = None
        if self._old is not None:
            torch.set_num_threads(self._old)
            self._old = None


def _free_threads(cpus: int, busy: float | None, threads: int) -> int | None:
    if busy is None:
        return None
    free = max(1, int(cpus - busy + 0.5))
    return free if free < threads else None


PROBE_SECONDS = 0.05


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _cpu_ticks(cpus: list[int]) -> int | None:
    """Busy clock ticks (all but idle and iowait) of ``cpus`` since boot, from /proc/stat; None where unreadable."""
    wanted = {f"cpu{c}" for c in cpus}
    total = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                fields = line.split()
                if fields[0] in wanted:
                    values = [int(v) for v in fields[1:9]]
                    total += sum(values) - values[3] - values[4]  # idle, iowait
    except (OSError, ValueError, IndexError):
        return None
    return total


def busy_elsewhere(cpus: list[int] | None = None, seconds: float = PROBE_SECONDS) -> float | None:
    """How many of ``cpus`` (default: this process's CPU set) other processes kept busy over the next ``seconds``:
    busy ticks of those CPUs minus this process's own CPU time. None where /proc/stat cannot be read (not Linux)."""
    cpus = _affinity() if cpus is None else cpus
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    before, own_before, t0 = _cpu_ticks(cpus), _own_seconds(), time.perf_counter()
    if before is None:
        return None
    time.sleep(seconds)
    after, own_after, elapsed = _cpu_ticks(cpus), _own_seconds(), time.perf_counter() - t0
    if after is None or elapsed <= 0:
        return None
    others = (after - before) / hz - (own_after - own_before)
    return min(float(len(cpus)), max(0.0, others / elapsed))


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system
