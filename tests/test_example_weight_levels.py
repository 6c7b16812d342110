"""examples/weight_levels.py: the per-layer comparison of level sets on a model's weights."""
import importlib.util
import os

import pytest
import torch
import torch.nn as nn

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "weight_levels.py")
spec = importlib.util.spec_from_file_location("weight_levels", PATH)
weight_levels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(weight_levels)


def test_apot_fits_bell_shaped_weights_and_uniform_fits_flat_ones():
    gen = torch.Generator().manual_seed(0)
    gauss = torch.randn(32, 512, generator=gen)
    flat = torch.rand(32, 512, generator=gen) * 2 - 1
    assert weight_levels.kurtosis(gauss) == pytest.approx(3.0, abs=0.3)
    assert weight_levels.kurtosis(flat) == pytest.approx(1.8, abs=0.1)
    g = {s: weight_levels.weight_sqnr_db(gauss, s, 4) for s in weight_levels.SCHEMES}
    f = {s: weight_levels.weight_sqnr_db(flat, s, 4) for s in weight_levels.SCHEMES}
    assert g["apot"] > g["uniform"] > g["pot"]
    assert f["uniform"] > f["apot"] + 0.5
    # more bits, less error, for every set
    for s in weight_levels.SCHEMES:
        assert weight_levels.weight_sqnr_db(gauss, s, 5) > g[s]


def test_table_covers_convs_linears_and_attention_projections(capsys, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    model.attn = nn.MultiheadAttention(8, 2)
    names = [row[0] for row in weight_levels.table(model, 4)]
    assert names == ["0", "2", "attn.in_proj", "attn.out_proj"]
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    assert weight_levels.main([str(path)]) == 2  # a state_dict without --arch: one-line error, no traceback
    err = capsys.readouterr().err
    assert err.startswith("weight_levels: error:") and err.count("\n") == 1


def test_every_advertised_bit_width_runs(capsys):
    # --bits takes 2..8; signed PoT stops at 6 bits, so 7-8 compare APoT and uniform instead of raising
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    assert weight_levels.schemes_at(6) == ("apot", "pot", "uniform")
    assert weight_levels.schemes_at(7) == ("apot", "uniform")
    for bits in (7, 8):
        rows = weight_levels.table(model, bits)
        assert rows and set(rows[0][3]) == {"apot", "uniform"}
