"""Test-wide settings: every pipeline verifies the graph after every pass (TVM-style well-formedness check)."""
import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _verify_every_pass(monkeypatch):
    monkeypatch.setenv("QCOMPILE_CHECK", "1")
    yield


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


torch.set_num_threads(min(2, os.cpu_count() or 1))
