"""One torch thread for small compiles.

A compile runs many small torch operations (observers, scale searches, the calibration batches of a small model).
Split over torch's intra-op threads they gain nothing, and on a shared machine they lose a great deal: an OpenMP
region waits for its slowest thread, and a thread that another process has descheduled stalls every region. The
bundled digits compile took 0.79 s with 2 threads and 0.15 s with 1 while two other processes kept the 2 cores
busy (onnxruntime's quantizer, measured in the same loop: 0.27 s). ``small_workload`` models therefore compile with
one torch thread; the caller's setting is restored afterwards. Larger models keep it: their convolutions gain from
the threads.
"""
from __future__ import annotations

import contextlib

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
    """The torch thread count a compile of ``model`` runs with: 1 for a small workload, else None (unchanged)."""
    return 1 if small_workload(model, example_inputs) else None
