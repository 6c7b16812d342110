"""Level sets: the APoT authors' construction at every bit-width, PoT, uniform, SDQ log2, ternary/binary,
integer grids, storage types and the tie rule."""
import itertools

import numpy as np
import pytest

from qcompile.quant import (apot_terms, asymmetric_offsets, integer_table, level_set, levels, sdq_log2_reference,
                            supported)

FLOAT32_RTOL = 1e-6  # the authors' sets are float32 tensors; ours are exact rationals


# A transcription of the authors' build_power_value (APoT_Quantization, ImageNet/models/quant_layer.py):
# per-B lists of the three additive bases, products summed, de-duplicated, normalised by the largest value in
# float32. Written out as the exponent lists the authors' loops produce, so it is an independent oracle.
_AUTHORS_BASES = {
    2: ([1, 2, 3], [], []),
    3: ([1, 2, 4], [3], []),
    4: ([1, 3, 5], [2, 4, 6], []),
    5: ([1, 3, 6], [2, 4, 7], [5]),
    6: ([1, 4, 7], [2, 5, 8], [3, 6, 9]),
}


def authors_build_power_value(B, additive=True):
    if additive:
        exps = _AUTHORS_BASES.get(B, ([], [], []))  # other B: the later code falls through with {0}
        bases = [[0.0] + [2.0 ** -e for e in term] for term in exps]
    else:
        bases = [[0.0] + [2.0 ** (-i - 1) for i in range(2 ** B - 1)], [0.0], [0.0]]
    values = sorted({a + b + c for a, b, c in itertools.product(*bases)})
    values = np.asarray(values, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sort(values * np.float32(1.0 / np.max(values)))


def signed_from_magnitudes(mags):
    return np.unique(np.concatenate([-mags, mags]))


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 7])
def test_apot_signed_weights_match_authors(bits):
    # weights: sign bit + build_power_value(B=bits-1), defined by the authors for B = 2..6
    ours = levels("apot", bits, signed=True)
    theirs = signed_from_magnitudes(authors_build_power_value(bits - 1))
    np.testing.assert_allclose(ours, theirs, rtol=FLOAT32_RTOL, atol=0)
    assert len(ours) == 2 ** bits - 1


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_apot_unsigned_activations_match_authors(bits):
    ours = levels("apot", bits, signed=False)
    np.testing.assert_allclose(ours, authors_build_power_value(bits), rtol=FLOAT32_RTOL, atol=0)
    assert len(ours) == 2 ** bits


def test_authors_code_is_undefined_where_we_extend():
    # B = 1 (2-bit weights) and B = 7, 8 give {0} / 0 = NaN in the authors' later code
    for B in (1, 7, 8):
        assert np.isnan(authors_build_power_value(B)).all()


def test_apot_two_bit_meaning():
    # 2-bit weights: sign + 1 magnitude bit = ternary, as the authors' ImageNet code does with uniform 2-bit
    np.testing.assert_array_equal(levels("apot", 2, True), [-1.0, 0.0, 1.0])
    # 2-bit activations: {0, 1/4, 1/2, 1} (= PoT)
    np.testing.assert_array_equal(levels("apot", 2, False), [0.0, 0.25, 0.5, 1.0])


def test_apot_4bit_integer_grid_from_the_issue():
    ls = level_set("apot", 4, True)
    assert ls.denom == 10
    assert ls.grid == (-10, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 10)
    assert ls.storage_dtype == "int8"


@pytest.mark.parametrize("magnitude_bits,denom", [(7, 904), (8, 3840)])
def test_apot_extension_beyond_authors(magnitude_bits, denom):
    terms = apot_terms(magnitude_bits)
    assert len(terms) == 4
    exps = sorted(e for t in terms for e in t)
    assert exps == list(range(1, len(exps) + 1))  # every exponent used once: distinct binary fractions
    ls = level_set("apot", magnitude_bits, signed=False)
    assert ls.denom == denom and ls.num_levels == 2 ** magnitude_bits
    # every level is a sum of one choice (0 or a power of two) per term, normalised by the largest
    top = max(exps)
    sums = {sum(c) for c in itertools.product(*[[0] + [2 ** (top - e) for e in t] for t in terms])}
    np.testing.assert_allclose(ls.values, np.array(sorted(sums)) / max(sums), rtol=1e-15)
    # the signed 8-bit weights use the 7-bit magnitudes
    assert level_set("apot", 8, True).denom == 904


def test_apot_terms_reproduce_authors_exponents():
    for B, bases in _AUTHORS_BASES.items():
        assert sorted(map(sorted, apot_terms(B))) == sorted(sorted(t) for t in bases if t)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_pot_signed_matches_authors_additive_false(bits):
    ours = levels("pot", bits, True)
    theirs = signed_from_magnitudes(authors_build_power_value(bits - 1, additive=False))
    np.testing.assert_allclose(ours, theirs, rtol=FLOAT32_RTOL, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_pot_unsigned_matches_authors_additive_false(bits):
    np.testing.assert_allclose(levels("pot", bits, False), authors_build_power_value(bits, additive=False),
                               rtol=FLOAT32_RTOL, atol=0)


def test_pot_refused_where_grid_exceeds_32_bits():
    for bits, signed in [(7, True), (8, True), (6, False), (8, False)]:
        with pytest.raises(ValueError, match="apot"):
            level_set("pot", bits, signed)
        with pytest.raises(ValueError):
            level_set("log2", bits, signed)


@pytest.mark.parametrize("scheme", ["pot", "log2"])
def test_pot_widest_sets_use_int32_grids(scheme):
    """Signed 6-bit and unsigned 5-bit PoT (the APoT paper's PoT 5/5 ablation) halve down to 2^-30: int32 codes,
    every level and decision threshold exact in float32."""
    for bits, signed in [(6, True), (5, False)]:
        ls = level_set(scheme, bits, signed)
        assert ls.storage_dtype == "int32" and ls.denom == 2 ** 30
        assert ls.num_levels == (63 if signed else 32)
        np.testing.assert_array_equal(ls.values.astype(np.float32).astype(np.float64), ls.values)
        np.testing.assert_array_equal(ls.thresholds.astype(np.float32).astype(np.float64), ls.thresholds)


def test_sdq_log2_three_bit_levels():
    ls = level_set("log2", 3, True)
    assert ls.grid == (-4, -2, -1, 0, 1, 2, 4) and ls.denom == 4  # {0, +-1, +-2, +-4} / L_p2, L_p2 = 4
    for bits in (2, 3, 4, 5):  # L_p2 = 2 ** (2 ** (b - 1) - 2)
        assert level_set("log2", bits, True).denom == 2 ** (2 ** (bits - 1) - 2)
        np.testing.assert_array_equal(levels("log2", bits, True), levels("pot", bits, True))


def test_sdq_literal_rule_hits_the_same_levels():
    y = np.linspace(-1.5, 1.5, 3001)
    codes = sdq_log2_reference(y, alpha_sigma=1.0, bits=3)
    assert set(np.unique(codes)) == {-4, -2, -1, 0, 1, 2, 4}
    # log-domain rounding: zero below 2**-0.5 of the smallest level, unlike the linear midpoint 1/2
    assert sdq_log2_reference(np.array([0.7 / 4, 0.72 / 4]), 1.0, 3).tolist() == [0, 1]


def test_uniform_sets():
    np.testing.assert_array_equal(level_set("uniform", 2, True).grid, [-1, 0, 1])  # SDQ: ternary at 2 bits
    assert level_set("uniform", 8, True).grid[0] == -127 and level_set("uniform", 8, True).denom == 127
    assert level_set("uniform", 4, False).grid == tuple(range(16)) and level_set("uniform", 4, False).denom == 15
    asym = level_set("uniform_asym", 2, True)
    assert asym.grid == (0, 1, 2, 3) and asym.zero_point == -2 and (asym.code_min, asym.code_max) == (-2, 1)
    assert level_set("uniform_asym", 8, False).storage_dtype == "uint8"
    assert level_set("uniform_asym", 8, True).storage_dtype == "int8"


def test_ternary_binary():
    assert level_set("ternary").grid == (-1, 0, 1) and level_set("ternary", 7).bits == 2
    assert level_set("binary").grid == (-1, 1) and level_set("binary").bits == 1
    assert level_set("binary").tie_up.tolist() == [True]  # sign(0) = +1
    for scheme in ("ternary", "binary"):
        with pytest.raises(ValueError, match="signed"):
            level_set(scheme, 2, signed=False)


@pytest.mark.parametrize("scheme", ["apot", "pot", "uniform", "uniform_asym", "log2"])
@pytest.mark.parametrize("signed", [True, False])
def test_every_supported_set_is_normalised_sorted_and_stored(scheme, signed):
    for bits in range(2, 9):
        if not supported(scheme, bits, signed):
            continue
        ls = level_set(scheme, bits, signed)
        v = ls.values
        assert np.all(np.diff(v) > 0) and np.max(np.abs(v)) == 1.0
        np.testing.assert_array_equal(v, np.asarray(ls.grid) / ls.denom)
        if signed and scheme != "uniform_asym":
            np.testing.assert_array_equal(v, -v[::-1])  # symmetric
            assert 0.0 in v
        assert ls.storage_dtype in ("int2", "uint2", "int4", "uint4", "int8", "uint8", "int16", "uint16", "int32")
        lo, hi = {"int2": (-2, 1), "uint2": (0, 3), "int4": (-8, 7), "uint4": (0, 15), "int8": (-128, 127),
                  "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535),
                  "int32": (-2 ** 31, 2 ** 31 - 1)}[ls.storage_dtype]
        assert lo <= ls.code_min and ls.code_max <= hi
        assert ls.is_uniform == bool(np.all(np.diff(ls.grid) == 1))  # 2-bit signed APoT/PoT are {-1, 0, 1}
        if scheme in ("uniform", "uniform_asym"):
            assert ls.is_uniform
        assert level_set(scheme, bits, signed) is ls  # cached


def test_storage_table_sixteen_bit_cases():
    need16 = {(r[0], r[1], r[2]) for r in integer_table() if r[7] in ("int16", "uint16")}
    assert need16 == {("apot", 7, True), ("apot", 8, True), ("apot", 6, False), ("apot", 7, False),
                      ("apot", 8, False), ("pot", 5, True), ("pot", 4, False), ("log2", 5, True),
                      ("log2", 4, False)}
    need32 = {(r[0], r[1], r[2]) for r in integer_table() if r[7] == "int32"}
    assert need32 == {("pot", 6, True), ("pot", 5, False), ("log2", 6, True), ("log2", 5, False)}


def test_tie_rule_flags_apot4():
    ls = level_set("apot", 4, True)
    by_mid = dict(zip(ls.thresholds.tolist(), ls.tie_up.tolist()))
    # even beats odd: 0|1 -> 0 (down), 1|2 -> 2 (up), 3|4 -> 4 (up); both even: smaller magnitude 4|6 -> 4
    assert by_mid[0.5] is False and by_mid[1.5] is True and by_mid[3.5] is True and by_mid[5.0] is False
    assert by_mid[-0.5] is True and by_mid[-5.0] is True and by_mid[9.0] is False and by_mid[-9.0] is True


def test_tie_rule_is_half_even_on_uniform_grids():
    ls = level_set("uniform", 4, True)
    for mid, up in zip(ls.thresholds, ls.tie_up):
        assert up == (np.round(mid) == np.ceil(mid))  # numpy rounds half to even


@pytest.mark.parametrize("args,match", [
    (("nope", 4, True), "unknown scheme"),
    (("apot", 1, True), "2 to 8"),
    (("apot", 9, True), "2 to 8"),
    (("uniform", 4.0, True), "int"),
    (("apot", None, True), "bits"),
])
def test_bad_arguments_raise_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        level_set(*args)


def test_asymmetric_sets_are_the_unsigned_grid_shifted_by_an_offset():
    unsigned = level_set("apot", 4, False)
    assert asymmetric_offsets("apot", 4) == (1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 24)  # levels in 1 .. 48 / 2
    ls = level_set("apot", 4, True, offset=3)
    assert ls.grid == tuple(g - 3 for g in unsigned.grid) and ls.denom == 45 and ls.offset == 3
    assert ls.grid[:5] == (-3, -2, -1, 0, 1) and 0 in ls.grid  # real 0 stays a level; dense levels around it
    assert ls.signed and not ls.symmetric and ls.num_levels == 16 and ls.storage_dtype == "int8"
    assert level_set("apot", 4, True).symmetric and not unsigned.symmetric
    # the tie rule applies to the shifted integers (both neighbours of threshold -2.5 are ... -3 | -2: even wins)
    assert list(ls.tie_up[:3]) == [True, False, True]
    assert asymmetric_offsets("pot", 3) == (1, 2, 4, 8, 16, 32)
    assert asymmetric_offsets("pot", 5) == tuple(2 ** k for k in range(30))
    assert asymmetric_offsets("uniform", 4) == () and asymmetric_offsets("pot", 6) == ()  # no unsigned 6-bit PoT


@pytest.mark.parametrize("args,match", [
    (("apot", 4, True, 5), "must be a level of the unsigned grid"),   # 5 is not an APoT level
    (("apot", 4, True, 32), "must be a level of the unsigned grid"),  # beyond denom / 2
    (("uniform", 4, True, 3), "uniform_asym"),
])
def test_bad_offsets_raise_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        level_set(*args)
