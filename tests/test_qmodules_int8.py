"""``int8_accumulator`` (qcompile/qmodules.py): the int32 accumulator of an int8 layer from one or two float32 runs of
the layer, bit-identical to the float64 run on the same integer codes (exact there: every sum stays below 2**53),
at the worst-case magnitudes of 8-bit codes: |q_x − Z_x| = 255, |q_w| = 128, 4608 and 8192 terms per output."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from qcompile.qmodules import int8_accumulator


def _codes(shape, values, seed):
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(values), shape, generator=g)
    return torch.tensor(values, dtype=torch.float32)[pick]


EXTREME_X = [-255.0, -254.0, -241.0, -16.0, -1.0, 0.0, 1.0, 15.0, 16.0, 240.0, 255.0]
EXTREME_W = [-128.0, -127.0, -1.0, 0.0, 1.0, 127.0]


@pytest.mark.parametrize("cin, groups", [(512, 1), (64, 64), (32, 4)])
def test_conv_accumulator_is_bit_identical_to_float64(cin, groups):
    x = _codes((2, cin, 9, 9), EXTREME_X, seed=1)
    w = _codes((16 if groups == 1 else cin, cin // groups, 3, 3), EXTREME_W, seed=2)
    args = (1, 1, 1, groups)  # stride, padding, dilation, groups
    expected = F.conv2d(x.double(), w.double(), None, *args)
    got = int8_accumulator(F.conv2d, x, w, *args)
    assert got.dtype == torch.float64 and torch.equal(got, expected)


def test_largest_partial_sums_reach_two_to_the_24_and_stay_exact():
    # every term of the high half is (−16)·128 = −2048: 8192 of them sum to −2**24, the float32 limit
    x = torch.full((1, 8192), -255.0)
    w = torch.full((3, 8192), 128.0)
    expected = F.linear(x.double(), w.double(), None)
    got = int8_accumulator(F.linear, x, w)
    assert torch.equal(got, expected) and float(got[0, 0]) == -255.0 * 128 * 8192


def test_one_float32_run_where_no_partial_sum_reaches_two_to_the_24(monkeypatch):
    # Σ|q_w|·max|q_x| = 4096·16·255 = 16 711 680 < 2**24: one float32 run, exact; one more unit of weight and the
    # bound passes 2**24: the split into two runs
    calls = []

    def counted(*a):
        calls.append(a[0].dtype)
        return F.linear(*a)

    x = torch.full((2, 4096), 255.0)
    for w_value, runs in ((16.0, 1), (17.0, 2)):
        calls.clear()
        w = torch.full((3, 4096), w_value)
        got = int8_accumulator(counted, x, w)
        assert torch.equal(got, F.linear(x.double(), w.double())) and len(calls) == runs
        assert float(got[0, 0]) == 255.0 * w_value * 4096
    # random codes of the usual magnitudes: one run, bit-identical to float64
    x = _codes((4, 3000), [-200.0, -3.0, 0.0, 7.0, 255.0], seed=9)
    w = _codes((6, 3000), [-20.0, -1.0, 0.0, 2.0, 19.0], seed=10)
    assert torch.equal(int8_accumulator(F.linear, x, w), F.linear(x.double(), w.double()))


def test_linear_random_codes_and_the_float64_fallback_beyond_8192_terms():
    for k in (8192, 9000):  # the second takes the float64 path
        x = _codes((4, k), EXTREME_X, seed=k)
        w = _codes((5, k), EXTREME_W, seed=k + 1)
        assert torch.equal(int8_accumulator(F.linear, x, w), F.linear(x.double(), w.double()))


def test_conv1d_with_stride_and_dilation():
    x = _codes((3, 128, 40), EXTREME_X, seed=3)
    w = _codes((8, 128, 5), EXTREME_W, seed=4)
    conv = functools.partial(F.conv1d)
    args = (2, 3, 2, 1)
    assert torch.equal(int8_accumulator(conv, x, w, *args), F.conv1d(x.double(), w.double(), None, *args))


@pytest.mark.parametrize("layer", ["conv2d", "linear"])
def test_int8_layer_with_units_gives_the_exact_accumulator_of_the_dequantized_inputs(layer):
    # inputs as the simulation holds them: float32(d·S_x), float32(q_w·S_w[c]), bias float32(q_b·S_x·S_w[c])
    from qcompile.qmodules import int8_conv2d, int8_linear

    g = torch.Generator().manual_seed(7)
    s_x = torch.tensor(0.0371, dtype=torch.float32)
    if layer == "conv2d":
        d = torch.randint(-255, 256, (2, 64, 6, 6), generator=g).float()
        q_w = torch.randint(-127, 128, (8, 64, 3, 3), generator=g).float()
    else:
        d = torch.randint(-255, 256, (5, 300), generator=g).float()
        q_w = torch.randint(-127, 128, (8, 300), generator=g).float()
    s_w = torch.rand(8, generator=g) * 0.01 + 1e-4
    acc_scale = (s_x * s_w).float()
    q_b = torch.randint(-5000, 5000, (8,), generator=g).double()
    wshape = [-1] + [1] * (q_w.dim() - 1)
    x, w, b = d * s_x, q_w * s_w.reshape(wshape), (q_b * acc_scale.double()).float()
    shape = [1, -1, 1, 1] if layer == "conv2d" else [1, -1]
    units = (s_x, s_w, acc_scale)
    if layer == "conv2d":
        exact = F.conv2d(d.double(), q_w.double(), None, 1, 1) + q_b.reshape(shape)
        y, y64 = int8_conv2d(x, w, b, 1, 1, units=units), int8_conv2d(x, w, b, 1, 1)
    else:
        exact = F.linear(d.double(), q_w.double()) + q_b.reshape(shape)
        y, y64 = int8_linear(x, w, b, units=units), int8_linear(x, w, b)
    acc = torch.round(y / acc_scale.double().reshape(shape))
    assert torch.equal(acc, exact)
    # the float64 path agrees on these (typical) magnitudes; it is exact only up to round-off of float32(d·S_x)
    assert torch.equal(torch.round(y64 / acc_scale.double().reshape(shape)), exact)


@pytest.mark.parametrize("top", [127, 128], ids=["int8-codes", "int16-codes"])
def test_weight_memo_keeps_codes_in_8_or_16_bits_and_gives_the_same_outputs(top):
    """Under ``weight_memo`` (validation's runs) an int8 layer keeps its weight codes as 8-bit integers (16-bit where a
    code is ±128), not as a float copy of the weights, and computes the same outputs on every call, bound memo
    included, as without the memo."""
    from qcompile import qmodules
    from qcompile.qmodules import int8_linear, weight_memo

    g = torch.Generator().manual_seed(3)
    s_x = torch.tensor(0.05, dtype=torch.float32)
    q_w = torch.randint(-127, 128, (16, 400), generator=g).float()
    q_w[0, 0] = -float(top)
    s_w = torch.rand(16, generator=g) * 0.01 + 1e-4
    units = (s_x, s_w, (s_x * s_w).float())
    w = q_w * s_w[:, None]
    xs = [torch.randint(-255, 256, (3, 400), generator=g).float() * s_x for _ in range(3)]
    plain = [int8_linear(x, w, None, units=units) for x in xs]
    with torch.no_grad(), weight_memo():
        memo = [int8_linear(x, w, None, units=units) for x in xs]
        kept = [v[1] for k, v in qmodules._WEIGHT_MEMO[0].items() if k[0] == "codes"]
    assert len(kept) == 1 and kept[0].dtype == (torch.int8 if top == 127 else torch.int16)
    assert torch.equal(kept[0].float(), q_w)
    for a, b in zip(plain, memo):
        assert torch.equal(a, b)
