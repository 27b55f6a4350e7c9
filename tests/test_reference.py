"""Hand-computed cases that pin tests/reference.py to docs/semantics.md.

Every expected value below is derived by hand in the comments (dyadic values are used
wherever possible so that float32 arithmetic is exact and the hand result is the bit
result). If a test here fails, the reference disagrees with the contract.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

try:  # works whether or not tests/ is a package
    from tests import reference as ref
except ImportError:  # pragma: no cover
    import reference as ref


def f32(*values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    """Bit-for-bit float32 equality (distinguishes -0.0 from +0.0)."""
    assert actual.dtype == np.float32, actual.dtype
    assert expected.dtype == np.float32, expected.dtype
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


def mask_of(s: str) -> np.ndarray:
    """'FTFTTF' -> bool array."""
    return np.array([c == "T" for c in s], dtype=bool)


# ============================================================================== BF16


def test_bf16_decode_hand_cases():
    bits = np.array([0x3F80, 0xBF80, 0x4040, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x7F7F], dtype=np.uint16)
    out = ref.to_f32_bf16(bits)
    assert out.dtype == np.float32
    # 0x3F80 -> 0x3F800000 = 1.0; 0xBF80 -> -1.0; 0x4040 -> 0x40400000 = 3.0;
    # 0x0000 / 0x8000 -> +0.0 / -0.0; 0x7F80 / 0xFF80 -> +-Inf;
    # 0x0001 -> 0x00010000 = 2**16 * 2**-149 = 2**-133 (subnormal);
    # 0x7F7F -> 0x7F7F0000 = (1 + 127/128) * 2**127 = BF16 max.
    expected = f32(1.0, -1.0, 3.0, 0.0, -0.0, np.inf, -np.inf, 2.0**-133, (1 + 127 / 128) * 2.0**127)
    assert_bits_equal(out, expected)
    # shape is kept, including 0-d
    assert ref.to_f32_bf16(np.zeros((2, 3), np.uint16)).shape == (2, 3)
    assert ref.to_f32_bf16(np.array(0x3F80, np.uint16)).shape == ()


def test_bf16_encode_hand_cases():
    pats = np.array(
        [
            0x3F800000,  # 1.0 exactly                               -> 0x3F80
            0x3F808000,  # 1 + 2**-8: halfway 0x3F80/0x3F81, even     -> 0x3F80
            0x3F818000,  # halfway 0x3F81/0x3F82, even                -> 0x3F82
            0x3F808001,  # just above halfway                         -> 0x3F81
            0x3F807FFF,  # just below halfway                         -> 0x3F80
            0xBF818000,  # negative, halfway 0xBF81/0xBF82, even      -> 0xBF82
            0x7F7FFFFF,  # float32 max: above BF16 max + half ulp     -> 0x7F80 (+Inf)
            0x7F7F8000,  # halfway BF16 max / Inf; 0x7F80 is even     -> 0x7F80
            0x7F7F7FFF,  # below halfway                              -> 0x7F7F
            0x7F800000,  # +Inf                                       -> 0x7F80
            0xFF800000,  # -Inf                                       -> 0xFF80
            0x80000000,  # -0.0                                       -> 0x8000
            0x00008000,  # subnormal halfway 0x0000/0x0001, even      -> 0x0000
            0x00018000,  # subnormal halfway 0x0001/0x0002, even      -> 0x0002
            0x007FFFFF,  # largest f32 subnormal rounds up to normal  -> 0x0080
            0x7FC00000,  # quiet NaN                                  -> 0x7FC0
            0x7F800001,  # signalling NaN (naive rounding gives Inf!) -> 0x7FC0
            0x7FFFFFFF,  # NaN, all payload bits (naive wraps)        -> 0x7FC0
            0xFF800001,  # negative NaN keeps its sign                -> 0xFFC0
            0xFFFFFFFF,  # negative NaN, would overflow uint32        -> 0xFFC0
        ],
        dtype=np.uint32,
    )
    expected = np.array(
        [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x3F80, 0xBF82, 0x7F80, 0x7F80, 0x7F7F, 0x7F80,
         0xFF80, 0x8000, 0x0000, 0x0002, 0x0080, 0x7FC0, 0x7FC0, 0x7FC0, 0xFFC0, 0xFFC0],
        dtype=np.uint16,
    )
    out = ref.from_f32_bf16(pats.view(np.float32))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, expected)


def test_bf16_roundtrip_all_patterns():
    # Every BF16 value is exactly a float32, so encode(decode(p)) == p, except NaNs,
    # which all become the quiet NaN 0x7FC0 with their sign.
    p = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    back = ref.from_f32_bf16(ref.to_f32_bf16(p))
    is_nan = (p & 0x7FFF) > 0x7F80
    np.testing.assert_array_equal(back[~is_nan], p[~is_nan])
    np.testing.assert_array_equal(back[is_nan], np.where(p[is_nan] & 0x8000, 0xFFC0, 0x7FC0).astype(np.uint16))


def _bf16_rne_independent(b: int) -> int:
    """Nearest-even BF16 of the finite/inf float32 with bits b, by exact comparison."""
    sign, mag = b & 0x80000000, b & 0x7FFFFFFF
    lo = mag >> 16
    if mag == 0x7F800000:
        return (sign >> 16) | 0x7F80

    def value(p: int) -> float:  # magnitude of BF16 pattern p, exponent unbounded
        e, f = p >> 7, p & 0x7F
        if e == 0:
            return math.ldexp(f, -133)
        return math.ldexp(128 + f, e - 127 - 7)

    x = float(np.array([mag], np.uint32).view(np.float32)[0])
    lo_v = value(lo)
    hi_v = value(lo + 1) if lo < 0x7F7F else lo_v + math.ldexp(1, 127 - 7)
    d_lo, d_hi = x - lo_v, hi_v - x  # exact in float64
    if d_lo < d_hi or (d_lo == d_hi and lo % 2 == 0):
        r = lo
    else:
        r = lo + 1
    return (sign >> 16) | r


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_bf16_encode_matches_exact_rounding(b):
    if (b & 0x7FFFFFFF) > 0x7F800000:
        expected = 0xFFC0 if b & 0x80000000 else 0x7FC0
    else:
        expected = _bf16_rne_independent(b)
    got = ref.from_f32_bf16(np.array([b], np.uint32).view(np.float32))
    assert int(got[0]) == expected


# ============================================================================== trim


def test_trim_brief_example():
    # tau = [0.1, -0.5, 0.3, -0.3, 0.3, 0.2], n = 6, density 0.5 -> k = floor(3.0) = 3.
    # |tau| sorted descending: 0.5, 0.3, 0.3, 0.3, 0.2, 0.1 -> t = 3rd largest = 0.3.
    # > t: {index 1 (-0.5)}; == t: indices 2, 3, 4 (m = 3); q = 3 - 1 = 2.
    # j=0 (idx 2): 1*2//3 = 0 > 0*2//3 = 0? no  -> dropped
    # j=1 (idx 3): 2*2//3 = 1 > 1*2//3 = 0? yes -> kept
    # j=2 (idx 4): 3*2//3 = 2 > 2*2//3 = 1? yes -> kept
    tau = f32(0.1, -0.5, 0.3, -0.3, 0.3, 0.2)
    np.testing.assert_array_equal(ref.trim_mask(tau, 0.5), mask_of("FTFTTF"))
    # Same tensor as 2x3: the rule runs over the flat (C-order) index, the mask keeps the shape.
    m2 = ref.trim_mask(tau.reshape(2, 3), 0.5)
    assert m2.shape == (2, 3)
    np.testing.assert_array_equal(m2, mask_of("FTFTTF").reshape(2, 3))


def test_trim_density_one_keeps_all_including_zeros():
    tau = f32(0.0, -0.0, 1.0, 0.0)
    np.testing.assert_array_equal(ref.trim_mask(tau, 1.0), mask_of("TTTT"))
    # density > 1 also keeps all (floor(2*4) = 8 > n would be meaningless)
    np.testing.assert_array_equal(ref.trim_mask(tau, 2.0), mask_of("TTTT"))


def test_trim_k_zero_keeps_none():
    tau = f32(*range(1, 11))  # n = 10
    # density 0.09: 0.09 * 10 = 0.9 -> k = 0 -> nothing kept
    np.testing.assert_array_equal(ref.trim_mask(tau, 0.09), np.zeros(10, bool))
    np.testing.assert_array_equal(ref.trim_mask(tau, 0.0), np.zeros(10, bool))
    # a single element with density 0.5: floor(0.5) = 0
    np.testing.assert_array_equal(ref.trim_mask(f32(5.0), 0.5), mask_of("F"))
    # 0-d tensor: n = 1
    assert ref.trim_mask(np.array(3.0, np.float32), 0.5).shape == ()
    assert not ref.trim_mask(np.array(3.0, np.float32), 0.5)
    assert ref.trim_mask(np.array(3.0, np.float32), 1.0)


def test_trim_density_just_below_one():
    # n = 10, density 0.999999: 9.99999 -> k = 9; the only dropped element is the
    # smallest magnitude, |0| at index 3.
    tau = f32(0.5, -1, 2, 0, 3, -4, 5, 6, -7, 8)
    np.testing.assert_array_equal(ref.trim_mask(tau, 0.999999), mask_of("TTTFTTTTTT"))


def test_trim_all_equal_magnitudes_thinned_evenly():
    # n = 10, all |tau| = 1 (signs mixed), density 0.5 -> k = 5; t = 1, #(>t) = 0, m = 10, q = 5.
    # j:          0 1 2 3 4 5 6 7 8 9
    # (j+1)*5//10 0 1 1 2 2 3 3 4 4 5
    # j*5//10     0 0 1 1 2 2 3 3 4 4
    # kept?       F T F T F T F T F T   -> every other element, starting at index 1
    tau = f32(1, -1, 1, 1, -1, -1, 1, -1, 1, 1)
    np.testing.assert_array_equal(ref.trim_mask(tau, 0.5), mask_of("FTFTFTFTFT"))
    # density 0.3: 0.3 * 10 = 3.0 exactly in float64 -> k = 3, q = 3, m = 10
    # (j+1)*3//10 0 0 0 1 1 1 2 2 2 3
    # j*3//10     0 0 0 0 1 1 1 2 2 2
    # kept?       F F F T F F T F F T
    np.testing.assert_array_equal(ref.trim_mask(tau, 0.3), mask_of("FFFTFFTFFT"))
    # density 0.7: 0.7 * 10 = 7.0 -> k = 7, q = 7
    # (j+1)*7//10 0 1 2 2 3 4 4 5 6 7
    # j*7//10     0 0 1 2 2 3 4 4 5 6
    # kept?       F T T F T T F T T T
    np.testing.assert_array_equal(ref.trim_mask(tau, 0.7), mask_of("FTTFTTFTTT"))


def test_trim_ties_at_zero_and_negative_zero():
    # tau = [0, -0.0, 0, 1], density 0.5 -> k = 2; t = 0 (|-0.0| == 0); > t: {3};
    # ties: indices 0, 1, 2 (m = 3), q = 1:
    # j=0: 1//3 = 0 > 0? no; j=1: 2//3 = 0 > 0? no; j=2: 3//3 = 1 > 0? yes -> index 2
    np.testing.assert_array_equal(ref.trim_mask(f32(0.0, -0.0, 0.0, 1.0), 0.5), mask_of("FFTT"))


def test_trim_k_is_floor_of_float64_product():
    # float64: 0.29 * 100 = 28.999999999999996 -> k = 28 (not 29)
    #          0.57 * 100 = 56.99999999999999  -> k = 56 (not 57)
    #          0.14 * 100 = 14.000000000000002 -> k = 14
    assert 0.29 * 100 < 29 and 0.57 * 100 < 57 and 0.14 * 100 > 14
    assert ref.trim_k(100, 0.29) == 28
    assert ref.trim_k(100, 0.57) == 56
    assert ref.trim_k(100, 0.14) == 14
    tau = np.arange(1, 101, dtype=np.float32)  # distinct magnitudes 1..100
    m = ref.trim_mask(tau, 0.29)
    assert int(m.sum()) == 28
    # the 28 largest are 73..100, i.e. flat indices 72..99
    np.testing.assert_array_equal(np.flatnonzero(m), np.arange(72, 100))
    assert int(ref.trim_mask(tau, 0.57).sum()) == 56


def test_trim_rejects_nan_when_ranking():
    with pytest.raises(ValueError):
        ref.trim_mask(f32(1.0, np.nan, 2.0), 0.5)
    # density >= 1 needs no ranking
    np.testing.assert_array_equal(ref.trim_mask(f32(1.0, np.nan), 1.0), mask_of("TT"))


def test_trim_rejects_non_float32():
    with pytest.raises(TypeError):
        ref.trim_mask(np.array([1.0, 2.0]), 0.5)  # float64


# Magnitudes from a small set so that ties at the threshold are frequent.
_tie_values = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 1.5, 2.0, -2.0, 3.0, -3.0, 1e-30, np.inf])
_taus = st.lists(_tie_values, min_size=1, max_size=60).map(lambda v: np.array(v, dtype=np.float32))
_densities = st.one_of(  # one_of picks a branch uniformly: mostly 0 < k < n
    st.floats(min_value=0.05, max_value=0.95),
    st.floats(min_value=0.0, max_value=1.2, allow_nan=False),
    st.sampled_from([0.0, 0.1, 0.25, 0.29, 0.3, 0.5, 0.7, 0.999999, 1.0]),
)


def _tie_info(tau, mask):
    """(t, tied flat positions, q) for a mask that is neither empty nor full."""
    mag = np.abs(tau.ravel())
    t = mag[mask.ravel()].min()
    tied = np.flatnonzero(mag == t)
    q = int(mask.ravel()[tied].sum())
    return t, tied, q


@settings(max_examples=100, deadline=None)
@given(tau=_taus, density=_densities, data=st.data())
def test_trim_properties(tau, density, data):
    n = tau.size
    mask = ref.trim_mask(tau, density)
    assert mask.dtype == bool and mask.shape == tau.shape
    # exactly k elements, k = n if density >= 1 else floor(density * n) (float64)
    k = n if density >= 1 else math.floor(density * n)
    assert int(mask.sum()) == k
    mag = np.abs(tau)
    if 0 < k < n:
        # every kept magnitude >= every dropped magnitude
        assert mag[mask].min() >= mag[~mask].max()
        t, tied, q = _tie_info(tau, mask)
        m = len(tied)
        # everything strictly above t is kept, strictly below dropped
        assert mask[mag > t].all() and not mask[mag < t].any()
        # the tie pattern (by rank among ties) is the even-thinning rule
        pattern = mask[tied]
        assert pattern.tolist() == [(j + 1) * q // m > j * q // m for j in range(m)]

        # (a) moving the untied elements around (tied positions fixed) changes nothing
        #     at the tied positions, and the untied kept set moves with its elements
        untied = np.flatnonzero(mag != t)
        perm_untied = data.draw(st.permutations(untied.tolist()))
        tau2 = tau.copy()
        tau2[untied] = tau[perm_untied]
        mask2 = ref.trim_mask(tau2, density)
        np.testing.assert_array_equal(mask2[tied], mask[tied])
        np.testing.assert_array_equal(mask2[untied], mask[perm_untied])

        # (b) any permutation: the kept pattern by rank among ties is unchanged
        perm = np.array(data.draw(st.permutations(range(n))), dtype=np.intp)
        tau3 = tau[perm]
        mask3 = ref.trim_mask(tau3, density)
        t3, tied3, q3 = _tie_info(tau3, mask3)
        assert t3 == t and q3 == q and len(tied3) == m
        np.testing.assert_array_equal(mask3[tied3], pattern)
        # and untied elements are kept iff they were kept before
        mag3 = np.abs(tau3)
        np.testing.assert_array_equal(mask3[mag3 != t], mask[perm][mag3 != t])


# ============================================================================== TIES

# A 3-model, 4-element example. All values dyadic: float32 arithmetic below is exact.
#   B      = [ 1.0, -2.0, 0.5,  3.0]
#   tau_1  = [ 1.0, -2.0, 0.0,  0.5]
#   tau_2  = [-3.0,  1.0, 0.0, -0.5]
#   tau_3  = [ 1.0, -1.0, 0.0,  0.0]
# element 0: a sign conflict where sum and count disagree (1 - 3 + 1 = -1, but 2 positives vs 1 negative)
# element 1: a conflict both votes resolve to -1
# element 2: all u = 0 (D = 0 -> 1, delta 0)
# element 3: the sum vote ties: 0.5 - 0.5 + 0 = 0 -> elects +1 (count: 1 - 1 + 0 = 0 -> +1 too)
B = f32(1.0, -2.0, 0.5, 3.0)
TAU = [f32(1.0, -2.0, 0.0, 0.5), f32(-3.0, 1.0, 0.0, -0.5), f32(1.0, -1.0, 0.0, 0.0)]
MODELS = [B + t for t in TAU]  # exact: e.g. 1 + (-3) = -2, -2 + 1 = -1, 3 + 0.5 = 3.5


def test_models_are_exact():
    for M, t in zip(MODELS, TAU):
        assert_bits_equal(M - B, t)


def test_ties_sum_normalize():
    # w = [1,1,1], no trim, sum consensus, normalize, lam 1.
    # e0: S = 1 - 3 + 1 = -1 -> s = -1; agreeing: model 2 (-3). delta = -3, D = 1 -> -3.  B + delta = 1 - 3 = -2
    # e1: S = -2 + 1 - 1 = -2 -> s = -1; agreeing: models 1, 3. delta = -3, D = 2 -> -1.5. -2 - 1.5 = -3.5
    # e2: S = 0 -> s = +1; nobody agrees (all 0). delta = 0, D = 0 -> 1 -> 0.            0.5
    # e3: S = 0.5 - 0.5 + 0 = 0 -> s = +1 (tie elects +); agreeing: model 1. 0.5/1.     3 + 0.5 = 3.5
    out = ref.ties(B, MODELS, [1, 1, 1], [1, 1, 1])
    assert_bits_equal(out, f32(-2.0, -3.5, 0.5, 3.5))


def test_ties_sum_no_normalize():
    # Same votes; delta not divided: e0 -3, e1 -3, e2 0, e3 0.5 -> [-2, -5, 0.5, 3.5]
    out = ref.ties(B, MODELS, [1, 1, 1], [1, 1, 1], normalize=False)
    assert_bits_equal(out, f32(-2.0, -5.0, 0.5, 3.5))


def test_ties_count_normalize():
    # e0: sum of signs = +1 - 1 + 1 = 1 -> s = +1; agreeing: models 1, 3: delta = 2, D = 2 -> 1. 1 + 1 = 2
    # e1: -1 + 1 - 1 = -1 -> s = -1: models 1, 3: -3 / 2 = -1.5 -> -3.5
    # e2: 0 -> +1, nobody: 0.5.   e3: +1 - 1 + 0 = 0 -> +1 (tie): model 1: 0.5 -> 3.5
    out = ref.ties(B, MODELS, [1, 1, 1], [1, 1, 1], consensus="count")
    assert_bits_equal(out, f32(2.0, -3.5, 0.5, 3.5))


def test_ties_count_no_normalize():
    # e0: delta = 2 -> 3; e1: -3 -> -5; e2: 0.5; e3: 3.5
    out = ref.ties(B, MODELS, [1, 1, 1], [1, 1, 1], normalize=False, consensus="count")
    assert_bits_equal(out, f32(3.0, -5.0, 0.5, 3.5))


def test_ties_lambda():
    # sum, normalize: delta = [-3, -1.5, 0, 0.5]; lam 0.5 -> [-1.5, -0.75, 0, 0.25]
    # B + delta = [1 - 1.5, -2 - 0.75, 0.5, 3.25] = [-0.5, -2.75, 0.5, 3.25]
    out = ref.ties(B, MODELS, [1, 1, 1], [1, 1, 1], lam=0.5)
    assert_bits_equal(out, f32(-0.5, -2.75, 0.5, 3.25))


def test_ties_negative_weight():
    # w = [1, -1, 2]: u_1 = [1, -2, 0, 0.5], u_2 = -tau_2 = [3, -1, 0, 0.5], u_3 = 2 tau_3 = [2, -2, 0, 0]
    # e0: S = 1 + 3 + 2 = 6 -> +1; all agree; delta = 6; D = 1 - 1 + 2 = 2 -> 3.   1 + 3 = 4
    # e1: S = -2 - 1 - 2 = -5 -> -1; all agree; delta = -5; D = 2 -> -2.5.         -2 - 2.5 = -4.5
    # e2: nobody -> 0.5
    # e3: S = 0.5 + 0.5 + 0 = 1 -> +1; agreeing: models 1, 2 (u_3 = 0 is no sign);
    #     delta = 1; D = 1 + (-1) = 0 -> 1 (the D == 0 rule, reached through weights
    #     that cancel, not through an empty vote); delta = 1.                        3 + 1 = 4
    out = ref.ties(B, MODELS, [1, -1, 2], [1, 1, 1])
    assert_bits_equal(out, f32(4.0, -4.5, 0.5, 4.0))
    # without normalize: B + [6, -5, 0, 1] = [7, -7, 0.5, 4]
    out = ref.ties(B, MODELS, [1, -1, 2], [1, 1, 1], normalize=False)
    assert_bits_equal(out, f32(7.0, -7.0, 0.5, 4.0))
    # count gives the same votes here (e0: +,+,+; e1: -,-,-; e3: +,+,0 -> 2)
    out = ref.ties(B, MODELS, [1, -1, 2], [1, 1, 1], consensus="count")
    assert_bits_equal(out, f32(4.0, -4.5, 0.5, 4.0))


def test_ties_single_negative_weight_is_undone_by_normalize():
    # One model, w = -1: u = -tau; s = sign(-tau); it agrees wherever u != 0;
    # D = -1, delta = -tau / -1 = tau  -> B + tau (the weight's sign cancels).
    out = ref.ties(B, [MODELS[0]], [-1], [1])
    assert_bits_equal(out, f32(2.0, -4.0, 0.5, 3.5))
    # without normalize: B - tau = [0, 0, 0.5, 2.5]
    out = ref.ties(B, [MODELS[0]], [-1], [1], normalize=False)
    assert_bits_equal(out, f32(0.0, 0.0, 0.5, 2.5))


def test_ties_with_trim():
    # densities [0.5, 0.25, 1] on n = 4:
    # model 1: k = 2; |tau_1| = [1, 2, 0, 0.5]: t = 1; > t: {1}; ties {0}, q = 1 -> keep {0, 1}
    #          tau_hat_1 = [1, -2, 0, 0]
    # model 2: k = 1; |tau_2| = [3, 1, 0, 0.5]: t = 3 -> keep {0}; tau_hat_2 = [-3, 0, 0, 0]
    # model 3: k = 4, all kept: [1, -1, 0, 0]
    # sum:  e0: 1 - 3 + 1 = -1 -> -1: model 2: -3/1 -> 1 - 3 = -2
    #       e1: -2 + 0 - 1 = -3 -> -1: models 1, 3: -3/2 = -1.5 -> -3.5
    #       e2: nobody -> 0.5;  e3: all 0 (0.5 of model 1 trimmed) -> S = 0 -> +1, nobody -> 3.0
    out = ref.ties(B, MODELS, [1, 1, 1], [0.5, 0.25, 1.0])
    assert_bits_equal(out, f32(-2.0, -3.5, 0.5, 3.0))
    # count: e0: +1 - 1 + 1 = 1 -> +1: models 1, 3: 2/2 = 1 -> 2;  e1: -1 + 0 - 1 -> -1: -3.5
    out = ref.ties(B, MODELS, [1, 1, 1], [0.5, 0.25, 1.0], consensus="count")
    assert_bits_equal(out, f32(2.0, -3.5, 0.5, 3.0))


def test_ties_model_with_k_zero_contributes_nothing():
    # density 0.1 on n = 4: floor(0.4) = 0 -> model 2 trimmed away entirely.
    # e0: 1 + 1 = 2 -> +1: models 1, 3: 2/2 = 1 -> 2
    # e1: -2 - 1 = -3 -> -1: -3/2 = -1.5 -> -3.5
    # e2: 0.5;  e3: 0.5 + 0 -> +1: model 1: 0.5/1 -> 3.5
    out = ref.ties(B, MODELS, [1, 1, 1], [1.0, 0.1, 1.0])
    assert_bits_equal(out, f32(2.0, -3.5, 0.5, 3.5))


def test_ties_count_tie_elects_plus():
    # 2 models, 1 element: u = [1], [-3]. count: 1 - 1 = 0 -> +1 -> model 1: 1/1 -> B + 1.
    # sum: 1 - 3 = -2 -> -1 -> model 2: -3 -> B - 3.
    b = f32(10.0)
    ms = [f32(11.0), f32(7.0)]
    assert_bits_equal(ref.ties(b, ms, [1, 1], [1, 1], consensus="count"), f32(11.0))
    assert_bits_equal(ref.ties(b, ms, [1, 1], [1, 1], consensus="sum"), f32(7.0))


def test_ties_non_dyadic_division_is_float32():
    # 3 agreeing models, tau = 1 each: delta = 3, D = 3 -> 1 exactly;
    # w = [1, 1, 1], tau = [1, 1, 0.5]: delta = 2.5, D = 3 -> float32(2.5) / float32(3),
    # correctly rounded = 0.833333313465118408203125 (= 13981013 * 2**-24); B = 0 -> that.
    b = f32(0.0)
    out = ref.ties(b, [f32(1.0), f32(1.0), f32(0.5)], [1, 1, 1], [1, 1, 1])
    assert_bits_equal(out, f32(13981013 * 2.0**-24))
    assert float(out[0]) == 0.833333313465118408203125


def test_ties_weights_are_rounded_to_float32():
    # w = 0.1: u = float32(0.1) * 3 = 0.30000000447..., rounded to float32 -> float32(0.3)
    # (the float32 neighbours are 0.29999998212 and 0.30000001192; the latter is nearer).
    # Not normalized: B + u = 0 + float32(0.3).
    out = ref.ties(f32(0.0), [f32(3.0)], [0.1], [1], normalize=False)
    assert_bits_equal(out, f32(0.3))


def test_ties_rejects_float64():
    with pytest.raises(TypeError):
        ref.ties(B.astype(np.float64), MODELS, [1, 1, 1], [1, 1, 1])
    with pytest.raises(ValueError):
        ref.ties(B, MODELS, [1, 1], [1, 1, 1])


# ============================================================================== stats


def test_ties_stats_trimmed():
    # Same as test_ties_with_trim: u_1 = [1, -2, 0, 0], u_2 = [-3, 0, 0, 0], u_3 = [1, -1, 0, 0]
    # sum: s = [-1, -1, +1, +1]
    # model 1: kept 2/4 = 0.5; kept & u != 0: e0 (+ vs -1: excluded), e1 (agrees) -> 1/2
    #          l2 = sqrt(1 + 4 + 0 + 0.25) = sqrt(5.25)
    # model 2: kept 1/4; e0 (-3 agrees) -> 0/1 = 0; l2 = sqrt(9 + 1 + 0 + 0.25) = sqrt(10.25)
    # model 3: kept 4/4 = 1; kept & u != 0: e0 (excluded), e1 (agrees) -> 1/2 (the kept
    #          zeros at e2, e3 are not in the denominator); l2 = sqrt(1 + 1) = sqrt(2)
    # sign conflict: e0 has + (m1, m3) and - (m2); e1: -, 0, -; e2, e3: none -> 1/4
    st_ = ref.ties_stats(B, MODELS, [1, 1, 1], [0.5, 0.25, 1.0])
    assert st_["sign_conflict"] == 0.25
    assert st_["models"] == [
        {"kept": 0.5, "excluded": 0.5, "l2": math.sqrt(5.25)},
        {"kept": 0.25, "excluded": 0.0, "l2": math.sqrt(10.25)},
        {"kept": 1.0, "excluded": 0.5, "l2": math.sqrt(2.0)},
    ]
    # count: s = [+1 (1-1+1), -1, +1, +1]
    # model 1: e0 agrees, e1 agrees -> 0; model 2: e0 (-3 vs +1) -> 1/1 = 1.0; model 3: 0.
    st_ = ref.ties_stats(B, MODELS, [1, 1, 1], [0.5, 0.25, 1.0], consensus="count")
    assert [m["excluded"] for m in st_["models"]] == [0.0, 1.0, 0.0]
    assert st_["sign_conflict"] == 0.25


def test_ties_stats_conflict_uses_weighted_deltas():
    # w = [1, -1, 1], no trim: u_1 = [1, -2, 0, 0.5], u_2 = [3, -1, 0, 0.5], u_3 = [1, -1, 0, 0].
    # No element has both signs among the u -> sign_conflict 0 (on the unweighted tau it
    # would be 3/4: e0, e1, e3). s (sum) = [+1, -1, +1, +1]: nobody is excluded.
    # l2 is of the unweighted, untrimmed tau: as above.
    st_ = ref.ties_stats(B, MODELS, [1, -1, 1], [1, 1, 1])
    assert st_["sign_conflict"] == 0.0
    assert [m["kept"] for m in st_["models"]] == [1.0, 1.0, 1.0]
    assert [m["excluded"] for m in st_["models"]] == [0.0, 0.0, 0.0]
    assert [m["l2"] for m in st_["models"]] == [math.sqrt(5.25), math.sqrt(10.25), math.sqrt(2.0)]


def test_ties_stats_k_zero():
    # density 0.1 on n = 4 -> k = 0: kept 0.0, excluded 0.0 (no kept coordinates), l2 of tau.
    st_ = ref.ties_stats(B, MODELS, [1, 1, 1], [1.0, 0.1, 1.0])
    assert st_["models"][1] == {"kept": 0.0, "excluded": 0.0, "l2": math.sqrt(10.25)}
    # remaining u: [1, -2, 0, 0.5], [1, -1, 0, 0]: no conflict
    assert st_["sign_conflict"] == 0.0


# ============================================================================== task arithmetic


def test_task_arithmetic_plain():
    # w = [1, 1, 1]: delta = tau_1 + tau_2 + tau_3 = [1-3+1, -2+1-1, 0, 0.5-0.5+0] = [-1, -2, 0, 0]
    # B + delta = [0, -4, 0.5, 3]
    assert_bits_equal(ref.task_arithmetic(B, MODELS, [1, 1, 1]), f32(0.0, -4.0, 0.5, 3.0))


def test_task_arithmetic_weights_normalize_lambda():
    # w = [1, 2, 1]: delta = tau_1 + 2 tau_2 + tau_3 = [1-6+1, -2+2-1, 0, 0.5-1+0] = [-4, -1, 0, -0.5]
    # no normalize: B + delta = [-3, -3, 0.5, 2.5]
    assert_bits_equal(ref.task_arithmetic(B, MODELS, [1, 2, 1]), f32(-3.0, -3.0, 0.5, 2.5))
    # normalize: W = 4 -> delta = [-1, -0.25, 0, -0.125] -> [0, -2.25, 0.5, 2.875]
    assert_bits_equal(ref.task_arithmetic(B, MODELS, [1, 2, 1], normalize=True), f32(0.0, -2.25, 0.5, 2.875))
    # normalize, lam 0.5: delta = [-0.5, -0.125, 0, -0.0625] -> [0.5, -2.125, 0.5, 2.9375]
    out = ref.task_arithmetic(B, MODELS, [1, 2, 1], normalize=True, lam=0.5)
    assert_bits_equal(out, f32(0.5, -2.125, 0.5, 2.9375))


def test_task_arithmetic_small_weight_sum_rule():
    # w = [1, -1]: W = 0 -> 1: delta = tau_1 - tau_2 = [4, -3, 0, 1] -> [5, -5, 0.5, 4]
    out = ref.task_arithmetic(B, MODELS[:2], [1, -1], normalize=True)
    assert_bits_equal(out, f32(5.0, -5.0, 0.5, 4.0))
    # w = [2**-30, 0]: W = 2**-30 ~ 9.3e-10 < 1e-8 -> W = 1: delta = 2**-30 * tau_1, which
    # is below half an ulp of every B element (ulp(1) = 2**-23): B + delta = B exactly.
    out = ref.task_arithmetic(B, MODELS[:2], [2.0**-30, 0.0], normalize=True)
    assert_bits_equal(out, B)
    # w = [2**-26, 0]: W = 2**-26 ~ 1.49e-8 >= 1e-8 -> divides: delta = tau_1 -> B + tau_1
    out = ref.task_arithmetic(B, MODELS[:2], [2.0**-26, 0.0], normalize=True)
    assert_bits_equal(out, f32(2.0, -4.0, 0.5, 3.5))
    # boundary: W = float32(1e-8) = 9.99999993922529e-09, which is < 1e-8 (exact compare),
    # so W = 1 and delta = float32(1e-8) * tau_1 vanishes against B.
    assert float(np.float32(1e-8)) < 1e-8
    out = ref.task_arithmetic(B, MODELS[:2], [np.float32(1e-8), 0.0], normalize=True)
    assert_bits_equal(out, B)


def test_task_arithmetic_accumulates_from_positive_zero():
    # B = [-0.0], M = [-0.0], w = [-1]: tau = -0.0 - (-0.0) = +0.0; u = -1 * +0.0 = -0.0;
    # delta = +0.0 + (-0.0) = +0.0 (accumulator starts at +0.0); lam * delta = +0.0;
    # B + delta = -0.0 + +0.0 = +0.0. (Starting the sum from u_0 would give -0.0 + -0.0 = -0.0.)
    out = ref.task_arithmetic(f32(-0.0), [f32(-0.0)], [-1])
    assert_bits_equal(out, f32(0.0))


# ============================================================================== linear


def test_linear():
    X = [f32(1.0, 2.0), f32(3.0, -2.0)]
    # w = [1, 3]: R = [1 + 9, 2 - 6] = [10, -4]; normalize: W = 4 -> [2.5, -1]
    assert_bits_equal(ref.linear(X, [1, 3]), f32(2.5, -1.0))
    assert_bits_equal(ref.linear(X, [1, 3], normalize=False), f32(10.0, -4.0))
    # w = [1, -1]: R = [-2, 4]; W = 0 -> 1 -> [-2, 4]
    assert_bits_equal(ref.linear(X, [1, -1]), f32(-2.0, 4.0))
    # w = [0.5, 0.5] averages: [2, 0]
    assert_bits_equal(ref.linear(X, [0.5, 0.5]), f32(2.0, 0.0))


def test_linear_sum_order_is_model_order():
    # float32 spacing above 2**24 is 2. In the given order:
    #   ((0 + 2**24) + 1) + 1: 2**24 + 1 is halfway between 2**24 and 2**24 + 2 -> even -> 2**24,
    #   twice -> 2**24.
    # Reversed: ((0 + 1) + 1) + 2**24 = 2 + 2**24 = 16777218 exactly.
    big, one = f32(2.0**24), f32(1.0)
    assert_bits_equal(ref.linear([big, one, one], [1, 1, 1], normalize=False), f32(2.0**24))
    assert_bits_equal(ref.linear([one, one, big], [1, 1, 1], normalize=False), f32(2.0**24 + 2))


def test_linear_accumulates_from_positive_zero():
    # R = +0.0 + (-1 * +0.0) = +0.0 + -0.0 = +0.0 (from u_0 it would be -0.0)
    assert_bits_equal(ref.linear([f32(0.0)], [-1], normalize=False), f32(0.0))
    # normalize: W = -1 -> +0.0 / -1 = -0.0
    assert_bits_equal(ref.linear([f32(0.0)], [-1]), f32(-0.0))


def test_linear_weights_rounded_to_float32_no_float64():
    # float32(0.1) * 3 = 0.30000000447... -> float32 -> float32(0.3) (nearest, see above)
    out = ref.linear([f32(3.0)], [0.1], normalize=False)
    assert_bits_equal(out, f32(0.3))
    # a float64 weight scalar must not promote the result either
    out = ref.linear([f32(3.0)], [np.float64(0.1)], normalize=False)
    assert out.dtype == np.float32
