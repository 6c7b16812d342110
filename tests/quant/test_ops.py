"""quantize / dequantize / fake_quantize: the lecture's worked examples, the tie rule, properties, gradients."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qcompile.quant import (asymmetric_qparams, binarize, clip_range, decision_thresholds, dequantize,
                            fake_quantize, level_set, quantize, supported, twn_ternarize, unit_from_alpha)

# The lecture's 4x4 weight matrix (Han, "Quantization part II").
W = torch.tensor([[2.09, -0.98, 1.48, 0.09],
                  [0.05, -0.14, -1.08, 2.12],
                  [-0.91, 1.92, 0.00, -1.03],
                  [1.87, 0.00, 1.53, 1.49]])
LECTURE_TOL = 0.005  # the lecture prints two decimals

SETS = [(s, b, sg) for s in ("apot", "pot", "uniform", "uniform_asym", "log2") for b in range(2, 9)
        for sg in (True, False) if supported(s, b, sg)] + [("ternary", 2, True), ("binary", 1, True)]


def real_levels(ls, alpha, zero_point=None):
    unit = unit_from_alpha(alpha, ls)
    z = ls.zero_point if zero_point is None else zero_point
    codes = torch.arange(ls.code_min, ls.code_max + 1) if ls.is_uniform else torch.tensor(ls.grid) + ls.zero_point
    return (codes - z).to(torch.float32) * unit


# -- the lecture's worked examples ----------------------------------------------------------------------------
def test_lecture_asymmetric_two_bit():
    scale, zp = asymmetric_qparams(W.min(), W.max(), bits=2)
    assert abs(scale.item() - 1.07) < LECTURE_TOL and zp.item() == -1
    ls = level_set("uniform_asym", 2, signed=True)
    codes = quantize(W, W.max() - W.min(), ls, zero_point=zp)
    expected = torch.tensor([[1, -2, 0, -1], [-1, -1, -2, 1], [-2, 1, -1, -2], [1, -1, 0, 0]], dtype=torch.int32)
    assert torch.equal(codes, expected)
    # reconstruction (q - Z) x 1.07 as printed in the lecture
    printed = torch.tensor([[2.14, -1.07, 1.07, 0], [0, 0, -1.07, 2.14], [-1.07, 2.14, 0, -1.07],
                            [2.14, 0, 1.07, 1.07]])
    torch.testing.assert_close((codes - zp).float() * 1.07, printed, rtol=0, atol=1e-6)


def test_lecture_symmetric_per_tensor_vs_per_channel():
    ls = level_set("uniform", 2, signed=True)
    per_tensor = fake_quantize(W, W.abs().max(), ls)  # S = |r|max / qmax = 2.12
    per_channel = fake_quantize(W, W.abs().amax(dim=1), ls, axis=0)  # S_i = 2.09, 2.12, 1.92, 1.87
    assert abs(torch.linalg.norm(W - per_tensor).item() - 2.28) < LECTURE_TOL
    assert abs(torch.linalg.norm(W - per_channel).item() - 2.08) < LECTURE_TOL
    expected = torch.tensor([[1, 0, 1, 0], [0, 0, -1, 1], [0, 1, 0, -1], [1, 0, 1, 1]], dtype=torch.int32)
    assert torch.equal(quantize(W, W.abs().amax(dim=1), ls, axis=0), expected)


def test_lecture_ternary_twn():
    codes, r_t, delta = twn_ternarize(W)
    assert abs(delta.item() - 0.73) < LECTURE_TOL and abs(r_t.item() - 1.5) < 1e-6
    expected = torch.tensor([[1, -1, 1, 0], [0, 0, -1, 1], [-1, 1, 0, -1], [1, 0, 1, 1]], dtype=torch.int32)
    assert torch.equal(codes, expected)
    torch.testing.assert_close(dequantize(codes, r_t, level_set("ternary")), expected.float() * 1.5, rtol=0, atol=0)


def test_twn_codes_and_r_t_use_one_comparison():
    """A weight equal to float32(Delta), which rounded up past the float64 Delta: r_t counted it as kept (|w| >
    Delta in float64) while its code compared against float32(Delta) made it 0. The codes and r_t now agree."""
    w = torch.tensor([0.4902002513408661, -1.0096181631088257, -0.20917557179927826, -0.15922501683235168,
                      0.5408455729484558, 0.21465912461280823, 0.35537269711494446, -0.6538286209106445,
                      -0.12961363792419434, 0.7839754819869995, 1.4934310913085938, -1.2590655088424683,
                      1.5139237642288208, 1.3458753824234009, 0.7813113927841187, 0.2644556164741516])
    delta64 = 0.7 * w.double().abs().mean()
    assert float(w[0]) > float(delta64) and float(w[0]) == float(delta64.float())  # the edge case, found
    codes, r_t, _ = twn_ternarize(w)
    kept = w.double().abs() > delta64
    assert torch.equal(codes != 0, kept) and int(codes[0]) == 1
    assert r_t.item() == pytest.approx(float(w.double().abs()[kept].mean()), rel=1e-6)


def test_lecture_binarization():
    codes, alpha = binarize(W)
    assert abs(alpha.item() - 1.05) < LECTURE_TOL
    assert torch.equal(codes, quantize(W, alpha, level_set("binary")))  # sign(0) = +1 either way
    assert abs(((W - codes) ** 2).sum().item() - 9.28) < LECTURE_TOL
    assert abs(((W - alpha * codes) ** 2).sum().item() - 9.245) < LECTURE_TOL  # printed truncated as 9.24


# -- tie rule and thresholds ----------------------------------------------------------------------------------
def test_tie_rule_on_apot_thresholds():
    ls = level_set("apot", 4, True)
    alpha = torch.tensor(1.3)
    thr, tie_up = decision_thresholds(ls, unit_from_alpha(alpha, ls))
    codes = quantize(thr, alpha, ls)
    grid = torch.tensor(ls.grid, dtype=torch.int32)
    expected = torch.where(tie_up, grid[1:], grid[:-1])
    assert torch.equal(codes, expected)
    # one float32 step either side decides without the tie rule
    above = torch.nextafter(thr, torch.tensor(float("inf")))
    below = torch.nextafter(thr, torch.tensor(-float("inf")))
    assert torch.equal(quantize(above, alpha, ls), grid[1:])
    assert torch.equal(quantize(below, alpha, ls), grid[:-1])


def test_tie_rule_on_uniform_is_half_even():
    ls = level_set("uniform", 4, True)
    codes = quantize(torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 6.5, 7.5, 100.0]), 7.0, ls)  # unit = 1
    assert codes.tolist() == [-2, -2, 0, 0, 2, 2, 6, 7, 7]


def test_binary_zero_goes_up():
    ls = level_set("binary")
    assert quantize(torch.tensor([-0.0, 0.0, -1e-45, 1e-45]), 1.0, ls).tolist() == [1, 1, -1, 1]


def test_asymmetric_default_zero_point_is_range_from_zero():
    ls = level_set("uniform_asym", 8, signed=True)
    codes = quantize(torch.tensor([-1.0, 0.0, 0.25, 1.0, 2.0]), 1.0, ls)  # range [0, 1], unit 1/255
    assert codes.tolist() == [-128, -128, -128 + 64, 127, 127]  # 0.25 * 255 = 63.75 -> 64
    torch.testing.assert_close(dequantize(codes, 1.0, ls), torch.tensor([0.0, 0.0, 64 / 255, 1.0, 1.0]),
                               rtol=0, atol=1e-7)


def test_bad_parameters():
    ls = level_set("apot", 4, True)
    with pytest.raises(ValueError, match="alpha"):
        quantize(torch.ones(3), 0.0, ls)
    with pytest.raises(ValueError, match="scalar"):
        quantize(torch.ones(3), torch.ones(3), ls)
    with pytest.raises(ValueError, match="1-D"):
        quantize(torch.ones(3, 4), torch.ones(4), ls, axis=0)
    with pytest.raises(ValueError, match="uniform_asym"):
        quantize(torch.ones(3), 1.0, ls, zero_point=3)
    with pytest.raises(ValueError, match="grad"):
        fake_quantize(torch.ones(3), 1.0, ls, grad="lsq")


# -- properties -----------------------------------------------------------------------------------------------
finite32 = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)
alphas = st.floats(0.0009765625, 1024.0, width=32)


@st.composite
def quantizer_inputs(draw):
    scheme, bits, signed = draw(st.sampled_from(SETS))
    ls = level_set(scheme, bits, signed)
    alpha = draw(alphas)
    x = draw(arrays(np.float32, st.integers(1, 64), elements=finite32))
    # mix in values on and next to the decision thresholds and the levels themselves
    unit = unit_from_alpha(alpha, ls)
    thr, _ = decision_thresholds(ls, unit)
    special = torch.cat([thr, torch.nextafter(thr, torch.tensor(np.inf)), real_levels(ls, alpha)]).numpy()
    picks = draw(st.lists(st.sampled_from(special.tolist()), max_size=16))
    zp = None
    if scheme == "uniform_asym":
        zp = draw(st.integers(ls.code_min, ls.code_max))
    return ls, np.float32(alpha), np.concatenate([x, np.asarray(picks, np.float32)]), zp


@settings(max_examples=150, deadline=None, derandomize=True)
@given(quantizer_inputs())
def test_outputs_lie_on_the_level_set_and_match_dequantize(args):
    ls, alpha, x, zp = args
    xt = torch.from_numpy(x)
    codes = quantize(xt, alpha, ls, zero_point=zp)
    y = fake_quantize(xt, alpha, ls, zero_point=zp)
    assert torch.equal(y, dequantize(codes, alpha, ls, zero_point=zp))  # bit for bit
    assert bool(torch.isin(y, real_levels(ls, alpha, zp)).all())
    allowed = torch.arange(ls.code_min, ls.code_max + 1) if ls.is_uniform else torch.tensor(ls.grid) + ls.zero_point
    assert bool(torch.isin(codes, allowed).all())


@settings(max_examples=150, deadline=None, derandomize=True)
@given(quantizer_inputs())
def test_idempotent_monotone_nearest(args):
    ls, alpha, x, zp = args
    xt = torch.from_numpy(np.sort(x))
    codes = quantize(xt, alpha, ls, zero_point=zp)
    assert torch.equal(quantize(dequantize(codes, alpha, ls, zero_point=zp), alpha, ls, zero_point=zp), codes)
    assert bool((codes[1:] >= codes[:-1]).all())
    # nearest level (float64 check; float32 rounding may move a decision by a few ulps of the threshold)
    levels64 = real_levels(ls, alpha, zp).double()
    chosen = dequantize(codes, alpha, ls, zero_point=zp).double()
    dist = (xt.double()[:, None] - levels64[None, :]).abs()
    slack = 4 * np.finfo(np.float32).eps * (xt.double().abs() + levels64.abs().max())
    assert bool(((xt.double() - chosen).abs() <= dist.min(dim=1).values + slack).all())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.sampled_from(SETS), st.integers(0, 2), st.integers(0, 2**31 - 1))
def test_per_channel_equals_per_tensor_channel_by_channel(spec, axis, seed):
    ls = level_set(*spec)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 5, generator=gen) * 2
    alpha = torch.rand(x.shape[axis], generator=gen) * 3 + 0.1
    codes = quantize(x, alpha, ls, axis=axis)
    y = fake_quantize(x, alpha, ls, axis=axis)
    for c in range(x.shape[axis]):
        xc = x.select(axis, c)
        assert torch.equal(codes.select(axis, c), quantize(xc, alpha[c], ls))
        assert torch.equal(y.select(axis, c), fake_quantize(xc, alpha[c], ls))


def test_per_channel_zero_points():
    ls = level_set("uniform_asym", 4, signed=False)
    x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.5, 3.0]])
    alpha, zp = torch.tensor([2.0, 5.0]), torch.tensor([7, 6], dtype=torch.int32)
    codes = quantize(x, alpha, ls, axis=0, zero_point=zp)
    for c in range(2):
        assert torch.equal(codes[c], quantize(x[c], alpha[c], ls, zero_point=zp[c]))
    assert torch.equal(fake_quantize(x, alpha, ls, axis=0, zero_point=zp), dequantize(codes, alpha, ls, 0, zp))


@pytest.mark.parametrize("spec", [("apot", 5, True), ("pot", 3, False), ("uniform", 8, True),
                                  ("uniform_asym", 4, True)])
def test_chunked_and_blocked_paths_agree_with_one_piece(spec, monkeypatch):
    # per-tensor paths run in chunks, per-channel searchsorted in blocks on worker threads: the split must not
    # change a single code or value
    from qcompile.quant import ops

    ls = level_set(*spec)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(7, 1500, generator=gen) * 2
    alpha = torch.rand(7, generator=gen) * 3 + 0.2
    zp = ls.code_min + 3 if ls.scheme == "uniform_asym" else None
    whole = [quantize(x, 2.0, ls, zero_point=zp), fake_quantize(x, 2.0, ls, zero_point=zp),
             quantize(x, alpha, ls, axis=0), fake_quantize(x, alpha, ls, axis=0)]
    monkeypatch.setattr(ops, "_CHUNK", 1000)
    monkeypatch.setattr(ops, "_BLOCK", 700)
    for max_cells in (1 << 22, 0):  # cell tables in pieces; searchsorted in blocks on worker threads
        monkeypatch.setattr(ops, "_MAX_CELLS", max_cells)
        pieces = [quantize(x, 2.0, ls, zero_point=zp), fake_quantize(x, 2.0, ls, zero_point=zp),
                  quantize(x, alpha, ls, axis=0), fake_quantize(x, alpha, ls, axis=0)]
        for a, b in zip(whole, pieces):
            assert torch.equal(a, b)


# -- gradients ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [("apot", 4, True), ("uniform", 4, True), ("apot", 4, False)])
def test_ste_and_rcf_gradients(spec):
    ls = level_set(*spec)
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    alpha = torch.tensor(2.0, requires_grad=True)
    weights = torch.linspace(0.5, 1.5, 61)
    (fake_quantize(x, alpha, ls, grad="rcf") * weights).sum().backward()
    lo, hi = clip_range(2.0, ls)
    xd = x.detach()
    inside = (xd > lo) & (xd < hi)
    torch.testing.assert_close(x.grad, inside.float() * weights, rtol=0, atol=0)
    y = fake_quantize(xd, 2.0, ls)
    outside_term = torch.where(xd >= hi, 1.0, torch.where(xd <= lo, -1.0 if ls.signed else 0.0, 0.0))
    expected = (weights * torch.where(inside, (y - xd) / 2.0, outside_term)).sum()
    torch.testing.assert_close(alpha.grad, expected, rtol=1e-6, atol=1e-6)
    # PACT / "ste": only the clipped values move alpha
    alpha2 = torch.tensor(2.0, requires_grad=True)
    (fake_quantize(xd, alpha2, ls, grad="ste") * weights).sum().backward()
    torch.testing.assert_close(alpha2.grad, (weights * outside_term).sum(), rtol=1e-6, atol=1e-6)


def test_per_channel_alpha_gradient_shape_and_values():
    ls = level_set("apot", 3, True)
    x = torch.randn(4, 10) * 2
    alpha = torch.tensor([0.5, 1.0, 2.0, 4.0], requires_grad=True)
    fake_quantize(x, alpha, ls, axis=0, grad="rcf").sum().backward()
    for c in range(4):
        a = alpha[c].detach().clone().requires_grad_(True)
        fake_quantize(x[c], a, ls, grad="rcf").sum().backward()
        torch.testing.assert_close(alpha.grad[c], a.grad, rtol=1e-6, atol=1e-6)


def test_rcf_matches_finite_difference_of_the_projection_held_fixed():
    # y = alpha * Pi(x / alpha) with Pi held at its value: dy/dalpha = Pi - x/alpha inside the range
    ls = level_set("apot", 4, True)
    x = torch.tensor([0.37, -1.2, 0.05, 1.9])
    alpha = torch.tensor(2.0, requires_grad=True)
    fake_quantize(x, alpha, ls, grad="rcf").sum().backward()
    pi = fake_quantize(x, 2.0, ls) / 2.0
    torch.testing.assert_close(alpha.grad, (pi - x / 2.0).sum(), rtol=1e-6, atol=1e-6)


NONUNIFORM = [spec for spec in SETS if not level_set(*spec).is_uniform]


@pytest.mark.parametrize("spec", NONUNIFORM)
def test_cell_table_and_searchsorted_paths_agree(spec, monkeypatch):
    # two exact implementations of the same decisions (ops module): ties and extremes included
    from qcompile.quant import ops

    ls = level_set(*spec)
    gen = torch.Generator().manual_seed(11)
    for alpha in (1e-6, 0.37, 3.0, 1e6):
        unit = unit_from_alpha(alpha, ls)
        thr, _ = decision_thresholds(ls, unit)
        x = torch.cat([torch.randn(3000, generator=gen) * alpha, thr, torch.nextafter(thr, torch.tensor(np.inf)),
                       torch.nextafter(thr, torch.tensor(-np.inf)), real_levels(ls, alpha),
                       torch.tensor([np.inf, -np.inf, 0.0, -0.0, 3.4e38, -3.4e38, np.nan])])
        x2 = torch.stack([x, -x])
        a2 = torch.tensor([alpha, alpha * 1.7])
        with monkeypatch.context() as patch:
            patch.setattr(ops, "_MAX_CELLS", 0)
            searched = [quantize(x, alpha, ls), fake_quantize(x, alpha, ls), quantize(x2, a2, ls, axis=0)]
        tabled = [quantize(x, alpha, ls), fake_quantize(x, alpha, ls), quantize(x2, a2, ls, axis=0)]
        for a, b in zip(searched, tabled):
            assert torch.equal(a, b)


def test_nan_gives_the_lowest_code():
    nan = torch.tensor([float("nan"), 1.0])
    for spec in [("apot", 4, True), ("uniform", 8, True), ("uniform_asym", 8, False), ("pot", 3, False)]:
        ls = level_set(*spec)
        assert quantize(nan, 2.0, ls)[0].item() == ls.code_min
        assert quantize(nan[None], torch.tensor([2.0]), ls, axis=0)[0, 0].item() == ls.code_min


def test_tiny_unit_falls_back_to_searchsorted():
    ls = level_set("apot", 4, True)
    x = torch.tensor([-1e-30, 0.0, 3e-31, 1e-31, 1.0])
    assert quantize(x, 1e-30, ls).tolist() == [-10, 0, 3, 1, 10]


def test_an_axis_out_of_range_is_an_index_error():
    """axis=7 of a 4-D tensor was wrapped to axis 3 (quantize, fake_quantize, the observers); torch raises."""
    from qcompile.quant import level_set, make_observer, quantize

    x = torch.randn(2, 3, 4, 5)
    ls = level_set("uniform", 8, True)
    with pytest.raises(IndexError, match="axis 7 is out of range"):
        quantize(x, torch.ones(5), ls, axis=7)
    with pytest.raises(IndexError, match="axis -5 is out of range"):
        make_observer("minmax", axis=-5).update(x)
    assert torch.equal(quantize(x, torch.ones(5), ls, axis=-1), quantize(x, torch.ones(5), ls, axis=3))
