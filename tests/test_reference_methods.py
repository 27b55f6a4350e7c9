"""Hand-computed cases that pin the docs/semantics.md §A-§C half of tests/reference.py to
docs/semantics.md.

Expected values are derived in the comments: by hand (dyadic values wherever possible,
so float32 / float64 arithmetic is exact and the hand result is the bit result), from the
test vectors printed in docs/semantics.md §A, or by an independent computation written here
(pure-Python loops, exact fractions, other trigonometric identities). Where a
transcendental is evaluated along a different path than the reference's, the comparison
allows one float32 ulp and says so.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

try:  # works whether or not tests/ is a package
    from tests import reference as ref
except ImportError:  # pragma: no cover
    import reference as ref


def f32(*values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    """Bit-for-bit float32 equality (distinguishes -0.0 from +0.0)."""
    assert actual.dtype == np.float32, actual.dtype
    expected = np.asarray(expected, dtype=np.float32)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


def mask_of(s: str) -> np.ndarray:
    return np.array([c == "T" for c in s], dtype=bool)


def _r64(x: Fraction) -> Fraction:
    """Round an exact rational to the nearest float64 (ties even), as a Fraction."""
    return Fraction(float(x))


def is_pos_zero(x: float) -> bool:
    return x == 0.0 and math.copysign(1.0, x) == 1.0


# Tensor names and streams printed in docs/semantics.md §A.
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
# seed 0, model 0, e = 0..4 -> u * 2**24
Q_PROJ_U24 = [12885016, 15125359, 364251, 11220107, 13767954]


# ============================================================================== reductions


def _reduce_loop(terms) -> float:
    """Independent pure-Python form of the reduction rule, element by element."""
    terms = [float(t) for t in terms]
    blocks = []
    for start in range(0, len(terms), ref.BLOCK):
        A = [0.0] * 8
        for e in range(start, min(start + ref.BLOCK, len(terms))):
            A[(e - start) % 8] += terms[e]
        blocks.append(((A[0] + A[1]) + (A[2] + A[3])) + ((A[4] + A[5]) + (A[6] + A[7])))
    return math.fsum(blocks)


def test_reduce_sum_lanes():
    # Element e goes to lane e mod 8. t[0] = 2**53, t[8] = 1 (both lane 0), t[1] = t[9] = 1 (lane 1):
    #   A0 = (0 + 2**53) + 1 = 2**53 (2**53 + 1 is a tie, even mantissa wins), A1 = 1 + 1 = 2.
    #   block = (A0 + A1) + ... = 2**53 + 2 (exact).  Plain left-to-right would absorb every 1 -> 2**53.
    t = np.zeros(16)
    t[0], t[8], t[1], t[9] = 2.0**53, 1.0, 1.0, 1.0
    assert ref.reduce_sum(t) == 2.0**53 + 2


def test_reduce_sum_lane_tree_order():
    # lanes [2**53, 0, 1, 1]: (A0+A1) = 2**53, (A2+A3) = 2 -> 2**53 + 2  (sequential lanes: 2**53)
    assert ref.reduce_sum(np.array([2.0**53, 0.0, 1.0, 1.0])) == 2.0**53 + 2
    # lanes [2**53, 1, 1, 0]: (A0+A1) = 2**53 (tie, even), (A2+A3) = 1, 2**53 + 1 -> 2**53
    # (A0 + (A1 + A2) would give 2**53 + 2)
    assert ref.reduce_sum(np.array([2.0**53, 1.0, 1.0, 0.0])) == 2.0**53
    # right half: lanes 4, 5 = 1, 1 -> ((A4+A5)+(A6+A7)) = 2; 2**53 + 2
    assert ref.reduce_sum(np.array([2.0**53, 0, 0, 0, 1.0, 1.0])) == 2.0**53 + 2


def test_reduce_sum_blocks_added_exactly_rounded_once():
    n = 3 * ref.BLOCK
    t = np.zeros(n)
    # block sums 2**53, 1, 1: exact sum 2**53 + 2 (representable); sequential float adds would give 2**53
    t[0], t[ref.BLOCK], t[2 * ref.BLOCK] = 2.0**53, 1.0, 1.0
    assert ref.reduce_sum(t) == 2.0**53 + 2
    # block sums 1, 2**-53, 2**-53: exact 1 + 2**-52 (sequential: 1 + 2**-53 ties to 1, twice)
    t[:] = 0
    t[0], t[ref.BLOCK], t[2 * ref.BLOCK] = 1.0, 2.0**-53, 2.0**-53
    assert ref.reduce_sum(t) == 1.0 + 2.0**-52
    # block sums 1, 2**-53, 2**-80: exact value just above the halfway point -> rounds up, once
    t[2 * ref.BLOCK] = 2.0**-80
    assert ref.reduce_sum(t) == 1.0 + 2.0**-52


def test_reduce_sum_zero_and_signed_zero():
    assert is_pos_zero(ref.reduce_sum(np.zeros(0)))
    # lanes start at +0.0: +0 + (-0) = +0, so the sum of negative zeros is +0.0
    assert is_pos_zero(ref.reduce_sum(np.array([-0.0, -0.0, -0.0])))
    assert is_pos_zero(ref.dot(f32(-0.0, 2.0), f32(1.0, 0.0)))  # products -0.0, +0.0
    # x + (-x) in one lane is +0.0 too
    assert is_pos_zero(ref.reduce_sum(np.array([3.0] + [0.0] * 7 + [-3.0])))


def test_reduce_sum_non_finite_follows_ieee():
    # (fsum itself would raise on +Inf + -Inf; never reached from finite float32 inputs)
    t = np.zeros(2 * ref.BLOCK)
    t[0] = np.inf
    assert ref.reduce_sum(t) == np.inf
    t[ref.BLOCK] = -np.inf  # block sums +Inf, -Inf
    assert math.isnan(ref.reduce_sum(t))
    assert math.isnan(ref.reduce_sum(np.array([1.0, np.nan])))


def test_reduce_sum_rejects_non_float64():
    with pytest.raises(TypeError):
        ref.reduce_sum(np.zeros(3, np.float32))
    with pytest.raises(TypeError):
        ref.sq_norm(np.zeros(3))


def test_reduce_sum_matches_independent_loop():
    rng = np.random.default_rng(1)
    n = 2 * ref.BLOCK + 1237
    # a wide dynamic range so that the order of additions shows in the last bits
    terms = rng.standard_normal(n) * np.exp2(rng.integers(-30, 30, n))
    expected = _reduce_loop(terms)
    assert ref.reduce_sum(terms) == expected
    assert expected != sum(terms.tolist())  # the rule is not a plain left-to-right sum here


def test_norms_dot_l1_hand():
    x = f32(3.0, -4.0, 0.5)
    # 9 + 16 + 0.25 = 25.25; |3| + |-4| + |0.5| = 7.5; <x, [1, 1, 2]> = 3 - 4 + 1 = 0
    assert ref.sq_norm(x) == 25.25
    assert ref.l1(x) == 7.5
    assert is_pos_zero(ref.dot(x, f32(1.0, 1.0, 2.0)))
    # float32 squares are exact in float64: (1 + 2**-23)**2 = 1 + 2**-22 + 2**-46
    assert ref.sq_norm(f32(1 + 2.0**-23)) == 1 + 2.0**-22 + 2.0**-46
    # float32 max squared does not overflow float64
    big = float(np.finfo(np.float32).max)
    assert ref.sq_norm(f32(big)) == big * big


def test_reduce_rows_are_row_relative():
    # Rows of C = 13. Row 1 = [2**53, 0, 1, 1, 0 ...]: relative to the row, its lanes are
    # A0 = 2**53, A2 = A3 = 1 -> (A0+A1) + (A2+A3) = 2**53 + 2.
    # (With flat-index lanes row 1 would start at lane 13 mod 8 = 5: 2**53 in lane 5, the 1s in
    # lanes 7 and 0 -> (2**53 + 1) + 1, each a tie to even -> 2**53.)
    t = np.zeros((2, 13))
    t[1, 0], t[1, 2], t[1, 3] = 2.0**53, 1.0, 1.0
    out = ref.reduce_rows(t)
    assert out.shape == (2,)
    assert out.tolist() == [0.0, 2.0**53 + 2]
    assert ref.reduce_sum(t.ravel()) == 2.0**53
    # the same numbers as columns (vectors along axis 0)
    out0 = ref.reduce_rows(np.ascontiguousarray(t.T), axis=0)
    assert out0.tolist() == [0.0, 2.0**53 + 2]


def test_reduce_rows_match_independent_loop_and_shapes():
    rng = np.random.default_rng(2)
    C = ref.BLOCK + 37  # each row has a second, short block
    terms = rng.standard_normal((2, C)) * np.exp2(rng.integers(-30, 30, (2, C)))
    assert ref.reduce_rows(terms).tolist() == [_reduce_loop(row) for row in terms]
    # 3-D: along the last axis -> shape[:-1]; along axis 0 -> shape[1:], one vector per (j, k)
    x = rng.standard_normal((3, 2, 5)).astype(np.float32)
    r_last = ref.sq_norm_rows(x)
    r_first = ref.sq_norm_rows(x, axis=0)
    assert r_last.shape == (3, 2) and r_first.shape == (2, 5)
    for i in range(3):
        for j in range(2):
            assert r_last[i, j] == ref.sq_norm(x[i, j])
    for j in range(2):
        for k in range(5):
            assert r_first[j, k] == ref.sq_norm(np.ascontiguousarray(x[:, j, k]))
            assert ref.dot_rows(x, x + 1, axis=0)[j, k] == ref.dot(np.ascontiguousarray(x[:, j, k]), x[:, j, k] + 1)
            assert ref.l1_rows(x, axis=0)[j, k] == ref.l1(np.ascontiguousarray(x[:, j, k]))
    # 1-D and 0-d tensors are one vector
    v = f32(3.0, 4.0)
    assert ref.sq_norm_rows(v).shape == () and float(ref.sq_norm_rows(v)) == 25.0
    assert float(ref.sq_norm_rows(v, axis=0)) == 25.0
    assert float(ref.sq_norm_rows(np.array(3.0, np.float32))) == 9.0


# ============================================================================== keep_range


def test_keep_range_two_boundary_groups():
    # v = [5, 3, 3, 3, 1, 1, 1, 1, 0]; descending ranks: 5 -> 0; 3s -> 1..3; 1s -> 4..7; 0 -> 8.
    # keep ranks [2, 6):
    #   group 3 (flat 1, 2, 3): ranks 1-3 ∩ [2,6) = {2, 3} -> q = 2, m = 3:
    #       j = 0: 2//3 = 0 > 0? no; j = 1: 4//3 = 1 > 0 yes; j = 2: 6//3 = 2 > 1 yes -> flat 2, 3
    #   group 1 (flat 4..7): ranks 4-7 ∩ [2,6) = {4, 5} -> q = 2, m = 4:
    #       j = 0: 2//4 = 0 no; j = 1: 4//4 = 1 > 0 yes; j = 2: 6//4 = 1 > 1 no; j = 3: 8//4 = 2 > 1 yes -> flat 5, 7
    v = f32(5, 3, 3, 3, 1, 1, 1, 1, 0)
    np.testing.assert_array_equal(ref.keep_range(v, 2, 6), mask_of("FFTTFTFTF"))
    # the group strictly inside is kept whole: [0, 5) -> 5, all 3s, and 1 of the four 1s:
    #   q = 1, m = 4: j = 3 is the first with (j+1)//4 > j//4 -> flat 7
    np.testing.assert_array_equal(ref.keep_range(v, 0, 5), mask_of("TTTTFFFTF"))


def test_keep_range_one_group_holds_both_boundaries():
    # ten equal values, ranks [3, 6): one group, q = 3, m = 10 (the TIES example):
    # (j+1)*3//10: 0 0 0 1 1 1 2 2 2 3 ; j*3//10: 0 0 0 0 1 1 1 2 2 2 -> kept j = 3, 6, 9
    v = np.ones(10, np.float32)
    np.testing.assert_array_equal(ref.keep_range(v, 3, 6), mask_of("FFFTFFTFFT"))
    # -0.0 and +0.0 are one value (one group)
    v = f32(0.0, -0.0, 0.0, -0.0)
    np.testing.assert_array_equal(ref.keep_range(v, 0, 2), mask_of("FTFT"))


def test_keep_range_edges_and_errors():
    v = f32(1, 2, 3)
    np.testing.assert_array_equal(ref.keep_range(v, 1, 1), mask_of("FFF"))  # lo == hi keeps none
    np.testing.assert_array_equal(ref.keep_range(v, 0, 3), mask_of("TTT"))
    np.testing.assert_array_equal(ref.keep_range(v, 2, 3), mask_of("TFF"))  # rank 2 = the smallest
    assert ref.keep_range(v.reshape(3, 1), 0, 1).shape == (3, 1)
    np.testing.assert_array_equal(ref.keep_range(np.zeros(0, np.float32), 0, 0), np.zeros(0, bool))
    with pytest.raises(ValueError):
        ref.keep_range(v, 2, 1)
    with pytest.raises(ValueError):
        ref.keep_range(v, 0, 4)
    with pytest.raises(ValueError):
        ref.keep_range(f32(1, np.nan, 3), 0, 1)


def test_keep_range_by_rank_counts_and_even_thinning():
    rng = np.random.default_rng(3)
    for _ in range(60):
        n = int(rng.integers(1, 80))
        v = rng.integers(0, 6, n).astype(np.float32)  # many ties
        lo = int(rng.integers(0, n + 1))
        hi = int(rng.integers(lo, n + 1))
        keep = ref.keep_range(v, lo, hi)
        assert int(keep.sum()) == hi - lo
        # every kept value lies between the values at ranks lo and hi-1; above/below: all/none
        desc = np.sort(v)[::-1]
        if hi > lo:
            top, bottom = desc[lo], desc[hi - 1]
            assert keep[(v < top) & (v > bottom)].all()
            assert not keep[(v > top) | (v < bottom)].any()
        # in every group, the first j members (flat order) hold exactly floor(j*q/m) kept ones
        for val in np.unique(v):
            members = np.flatnonzero(v == val)
            m, q = len(members), int(keep[members].sum())
            prefix = np.cumsum(keep[members])
            assert prefix.tolist() == [(j + 1) * q // m for j in range(m)]


def test_keep_range_equals_ties_trim():
    rng = np.random.default_rng(4)
    for _ in range(60):
        n = int(rng.integers(1, 60))
        tau = (rng.integers(-4, 5, n) * 0.25).astype(np.float32)
        density = float(rng.choice([0.0, 0.1, 0.3, 0.5, 0.77, 0.999, rng.random()]))
        k = ref.trim_k(n, density)
        np.testing.assert_array_equal(ref.keep_range(np.abs(tau), 0, k), ref.trim_mask(tau, density))


# ============================================================================== random masks


def test_philox_random123_known_answers():
    # Random123 kat_vectors, philox4x32 with 10 rounds
    assert ref.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert ref.philox4x32_10((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    pi_ctr = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    assert ref.philox4x32_10(pi_ctr, (0xA4093822, 0x299F31D0)) == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def test_stream_ids_from_the_table():
    assert ref.fnv1a64(Q_PROJ, 0) == 0x6593CC1C7923F051
    assert ref.fnv1a64("lm_head.weight", 2) == 0x44888830B22EDAE5
    assert ref.fnv1a64("model.embed_tokens.weight", 1) == 0xBE2FBC2BEC504CD3


def test_fnv1a64_independent():
    # FNV-1a 64 of the bytes b"a\x00\x00\x00\x00\x00" computed here step by step
    h = 0xCBF29CE484222325
    for byte in b"a\x00" + (0).to_bytes(4, "little"):
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    assert ref.fnv1a64("a", 0) == h
    # UTF-8, not Latin-1: "é" is two bytes
    h = 0xCBF29CE484222325
    for byte in "é".encode() + b"\x00" + (7).to_bytes(4, "little"):
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    assert ref.fnv1a64("é", 7) == h


def test_uniform24_vectors_from_the_table():
    got = [ref.uniform24(0, Q_PROJ, 0, e) for e in (0, 1, 2, 3, 4, 1000003)]
    assert got == Q_PROJ_U24 + [10481241]
    assert ref.uniform24(42, "lm_head.weight", 2, 12345678) == 2817663
    assert ref.uniform24(42, "lm_head.weight", 2, 4294967301) == 9085512  # j = 2**30 + 1: counter word 1 used
    assert ref.uniform24(2**64 - 1, "model.embed_tokens.weight", 1, 7) == 8641540
    # the vectorized form agrees, also far from 0
    arr = ref.uniform24_array(0, Q_PROJ, 0, 1000004)
    assert arr[[0, 1, 2, 3, 4, 1000003]].tolist() == Q_PROJ_U24 + [10481241]
    assert ref.uniform24_array(42, "lm_head.weight", 2, 2, start=4294967300).tolist()[1] == 9085512
    assert ref.uniform24_array(42, "lm_head.weight", 2, 3, start=12345677).tolist()[1] == 2817663
    with pytest.raises(ValueError):
        ref.uniform24(2**64, Q_PROJ, 0, 0)


def test_uniform24_is_the_top_24_bits_of_word_e_mod_4():
    # e = 0..3 share the counter j = 0; e = 4..7 use j = 1.
    s = ref.fnv1a64(Q_PROJ, 0)
    words = ref.philox4x32_10((0, 0, s & 0xFFFFFFFF, s >> 32), (0, 0))
    assert [w >> 8 for w in words] == Q_PROJ_U24[:4]
    words = ref.philox4x32_10((1, 0, s & 0xFFFFFFFF, s >> 32), (0, 0))
    assert words[0] >> 8 == Q_PROJ_U24[4]


def test_random_keep_is_strictly_less_in_float64():
    u0 = Q_PROJ_U24[0] * 2.0**-24  # exactly element 0's u
    above = np.nextafter(u0, 1.0)
    assert not ref.random_keep(0, Q_PROJ, 0, (1,), u0)[0]  # u < p is false at p == u
    assert ref.random_keep(0, Q_PROJ, 0, (1,), above)[0]
    # an array of p: element e compared with p[e]
    u1 = Q_PROJ_U24[1] * 2.0**-24
    p = np.array([[u0, np.nextafter(u1, 1.0)], [0.0, 1.0]])
    np.testing.assert_array_equal(ref.random_keep(0, Q_PROJ, 0, (2, 2), p), [[False, True], [False, True]])
    # p = 0.8: threshold 0.8 * 2**24 = 13421772.8 -> u24 [12885016 <, 15125359 >, 364251 <, 11220107 <, 13767954 >]
    np.testing.assert_array_equal(ref.random_keep(0, Q_PROJ, 0, (5,), 0.8), mask_of("TFTTF"))
    # the mask follows the flat index, not the shape
    np.testing.assert_array_equal(ref.random_keep(0, Q_PROJ, 0, (5, 1), 0.8).ravel(), mask_of("TFTTF"))


def test_random_streams_differ_by_model_seed_and_name():
    a = ref.random_keep(0, "x.weight", 0, (4096,), 0.5)
    assert not np.array_equal(a, ref.random_keep(0, "x.weight", 1, (4096,), 0.5))
    assert not np.array_equal(a, ref.random_keep(1, "x.weight", 0, (4096,), 0.5))
    assert not np.array_equal(a, ref.random_keep(0, "y.weight", 0, (4096,), 0.5))
    np.testing.assert_array_equal(a, ref.random_keep(0, "x.weight", 0, (64, 64), 0.5).ravel())


# ============================================================================== task family

# The DARE cases use the stream printed in docs/semantics.md §A.5 (tensor Q_PROJ, seed 0, model 0), n = 5.
# density 0.8 keeps e = 0, 2, 3 (see test_random_keep_is_strictly_less_in_float64).
B5 = f32(1, 2, 3, 4, 5)
TAU0 = f32(1, 2, 1, 2, 2)


def test_dare_rescale_variants_hand():
    M = B5 + TAU0  # exact
    # rescale False: tau_hat = [1, 0, 1, 2, 0]
    out = ref.dare_linear(B5, [M], [1.0], [0.8], name=Q_PROJ, rescale=False)
    assert_bits_equal(out, B5 + f32(1, 0, 1, 2, 0))
    # l1: r = sum|tau| / sum|tau_hat| = 8 / 4 = 2 -> [2, 0, 2, 4, 0]
    out = ref.dare_linear(B5, [M], [1.0], [0.8], name=Q_PROJ)
    assert_bits_equal(out, B5 + f32(2, 0, 2, 4, 0))
    # inverse: fl32(1 / 0.8) = 1.25 -> [1.25, 0, 1.25, 2.5, 0]
    out = ref.dare_linear(B5, [M], [1.0], [0.8], name=Q_PROJ, rescale="inverse")
    assert_bits_equal(out, B5 + f32(1.25, 0, 1.25, 2.5, 0))
    # density 0.7 (threshold 11744051.2): keeps e = 2, 3 -> l1 r = 8 / 3 -> fl32(8/3) * [1, 2]
    r = np.float32(8 / 3)
    out = ref.dare_linear(B5, [M], [1.0], [0.7], name=Q_PROJ)
    assert_bits_equal(out, B5 + f32(0, 0, r * np.float32(1), r * np.float32(2), 0))
    # weight and lambda: u = fl32(0.5) * tau_hat, delta * fl32(2): [2, 0, 2, 4, 0]
    out = ref.dare_linear(B5, [M], [0.5], [0.8], name=Q_PROJ, lam=2.0)
    assert_bits_equal(out, B5 + f32(2, 0, 2, 4, 0))
    # the name matters (another stream)
    assert not np.array_equal(out, ref.dare_linear(B5, [M], [0.5], [0.8], name="other.weight", lam=2.0))


def test_dare_l1_rescale_skipped_below_1e_minus_7():
    B = np.zeros(5, np.float32)
    # sum |tau| = 5 * 2**-26 ~ 7.5e-8 < 1e-7: no rescale, the kept values stay as they are
    tau = np.full(5, 2.0**-26, np.float32)
    assert_bits_equal(ref.dare_linear(B, [B + tau], [1.0], [0.8], name=Q_PROJ), f32(1, 0, 1, 1, 0) * tau)
    # sum |tau| ~ 2 but sum |tau_hat| = 3 * 2**-25 ~ 8.9e-8 < 1e-7: no rescale either
    tau = f32(2.0**-25, 1.0, 2.0**-25, 2.0**-25, 1.0)
    assert_bits_equal(ref.dare_linear(B, [B + tau], [1.0], [0.8], name=Q_PROJ), f32(2.0**-25, 0, 2.0**-25, 2.0**-25, 0))


def test_dare_ties_hand():
    # model 0: tau_0 = [1, 2, 1, 2, 2], density 0.8, l1: u_0 = [2, 0, 2, 4, 0]
    # model 1: density 1 (untouched): u_1 = tau_1 = [-1, 1, -4, 2, 0]
    # sum vote S = [1, 1, -2, 6, 0] -> s = [+, +, -, +, +]
    # agreeing: e0 model 0 (2); e1 model 1 (1); e2 model 1 (-4); e3 both (6); e4 none (0)
    tau1 = f32(-1, 1, -4, 2, 0)
    models = [B5 + TAU0, B5 + tau1]
    out = ref.dare_ties(B5, models, [1, 1], [0.8, 1.0], name=Q_PROJ)
    assert_bits_equal(out, B5 + f32(2, 1, -4, 6, 0))
    # normalize: D = [1, 1, 1, 2, 0 -> 1] -> delta [2, 1, -4, 3, 0]
    out = ref.dare_ties(B5, models, [1, 1], [0.8, 1.0], name=Q_PROJ, normalize=True)
    assert_bits_equal(out, B5 + f32(2, 1, -4, 3, 0))
    # count vote: signs u_0 = [+, 0, +, +, 0], u_1 = [-, +, -, +, 0] -> [0, 1, 0, 2, 0] -> all +:
    # e0 model 0 (2); e1 model 1 (1); e2 model 0 (2); e3 both (6); e4 none
    out = ref.dare_ties(B5, models, [1, 1], [0.8, 1.0], name=Q_PROJ, consensus="count")
    assert_bits_equal(out, B5 + f32(2, 1, 2, 6, 0))
    # dare_linear: delta = u_0 + u_1 = [1, 1, -2, 6, 0]
    out = ref.dare_linear(B5, models, [1, 1], [0.8, 1.0], name=Q_PROJ)
    assert_bits_equal(out, B5 + f32(1, 1, -2, 6, 0))


# breadcrumbs: tau = [5, -1, 4, 0.5, -3, 2, 0, 1, -2, 3] (n = 10); |tau| by descending rank:
#   5 (flat 0) r0 | 4 (2) r1 | 3 (4, 9) r2, r3 | 2 (5, 8) r4, r5 | 1 (1, 7) r6, r7 | 0.5 (3) r8 | 0 (6) r9
TAU_BC = f32(5, -1, 4, 0.5, -3, 2, 0, 1, -2, 3)
B10 = np.ones(10, np.float32)


def _bc(density, gamma):
    return ref.breadcrumbs(B10, [B10 + TAU_BC], [1.0], [density], [gamma]) - B10  # exact (dyadic)


def test_breadcrumbs_hand():
    # density 0.3 -> k = 3; gamma 0.1 -> floor(1.0) = 1 = m; keep ranks [1, 4): flat 2, 4, 9
    assert_bits_equal(_bc(0.3, 0.1), f32(0, 0, 4, 0, -3, 0, 0, 0, 0, 3))
    # density 0.1 -> k = 1, gamma 0.2 -> m = 2: rank 2 only, in the group of 3s (ranks 2, 3):
    # q = 1, m = 2: j = 0: 1//2 = 0 no; j = 1: 2//2 = 1 yes -> flat 9
    assert_bits_equal(_bc(0.1, 0.2), f32(0, 0, 0, 0, 0, 0, 0, 0, 0, 3))
    # m = min(floor(gamma n), n - k): density 0.8 -> k = 8, gamma 0.5 -> 5 > n - k = 2 -> m = 2:
    # ranks [2, 10): everything but flat 0 and 2
    assert_bits_equal(_bc(0.8, 0.5), f32(0, -1, 0, 0.5, -3, 2, 0, 1, -2, 3))
    # gamma n < 1 -> m = 0: plain magnitude top-3 = ranks 0, 1 and one of the 3s (flat 9)
    assert_bits_equal(_bc(0.3, 0.05), f32(5, 0, 4, 0, 0, 0, 0, 0, 0, 3))
    np.testing.assert_array_equal(_bc(0.3, 0.05) != 0, ref.trim_mask(TAU_BC, 0.3))
    # default gamma 0.01 on n = 10 -> m = 0 as well
    out = ref.breadcrumbs(B10, [B10 + TAU_BC], [1.0], [0.3]) - B10
    assert_bits_equal(out, f32(5, 0, 4, 0, 0, 0, 0, 0, 0, 3))


def test_breadcrumbs_ties_is_ties_on_the_sparsified_deltas():
    # breadcrumbs_ties = TIES (no trim, normalize false) on the hand-sparsified deltas
    tau2 = f32(-1, 1, -4, 2, 0.5, 0, 3, -1, 1, -2)
    # model 2, density 0.2 -> k = 2, gamma 0.1 -> m = 1: |tau2| ranks: 4 (flat 2) r0,
    # 3 (6) r1, 2 (3, 9) r2 r3 -> ranks [1, 3): flat 6, and one of the 2s: q = 1, m = 2 -> flat 9
    hat1 = f32(0, 0, 4, 0, -3, 0, 0, 0, 0, 3)  # from test_breadcrumbs_hand (0.3, 0.1)
    hat2 = f32(0, 0, 0, 0, 0, 0, 3, 0, 0, -2)
    out = ref.breadcrumbs_ties(B10, [B10 + TAU_BC, B10 + tau2], [1.0, 2.0], [0.3, 0.2], [0.1, 0.1])
    expected = ref.ties(B10, [B10 + hat1, B10 + hat2], [1.0, 2.0], [1, 1], normalize=False)
    assert_bits_equal(out, expected)
    # by hand: u1 = hat1, u2 = 2 hat2 = [.., 6 at flat 6, -4 at flat 9]; S at flat 9: 3 - 4 = -1 -> model 2
    assert_bits_equal(out - B10, f32(0, 0, 4, 0, -3, 0, 6, 0, 0, -4))


# DELLA on Q_PROJ's stream: u = [0.768, 0.902, 0.0217, 0.669, 0.821] (u24 / 2**24).
# tau = [5, -4, 1, 3, -2]; ascending |tau|: flat 2 (r1), 4 (r2), 3 (r3), 1 (r4), 0 (r5).
# density 0.625, epsilon 0.25: a = 0.375, b = 0.5, C - 1 = 4: p = 0.375 + 0.125 (r - 1), exact:
#   p = [0.875, 0.75, 0.375, 0.625, 0.5]; u < p -> [T, F, T, F, F]
TAU_D = f32(5, -4, 1, 3, -2)


def test_della_probabilities_hand():
    p = ref.della_probabilities(TAU_D, 0.625, 0.25)
    assert p.dtype == np.float64 and p.tolist() == [0.875, 0.75, 0.375, 0.625, 0.5]
    # equal magnitudes are ranked by index: |[-1, 1, 1]| -> r = 1, 2, 3; rho 0.5, eps 0.25:
    # p = 0.25 + 0.5 (r - 1) / 2 = [0.25, 0.5, 0.75]
    assert ref.della_probabilities(f32(-1, 1, 1), 0.5, 0.25).tolist() == [0.25, 0.5, 0.75]


def test_della_probability_order_of_operations():
    # C = 8, rho 0.5, eps 0.15 (the default), emulated with exact fractions and one float64
    # rounding per operation: a = rho - eps, b = 2 eps, p = a + ((b (r - 1)) / (C - 1)).
    # At r = 3 this is 0.4357142857142857; the form a + ((r - 1)/(C - 1)) b gives ...567.
    tau = np.arange(1, 9, dtype=np.float32)  # ascending: r = index + 1
    a = _r64(Fraction(0.5) - Fraction(0.15))
    b = _r64(2 * Fraction(0.15))
    expected = [float(_r64(a + _r64(_r64(b * (r - 1)) / 7))) for r in range(1, 9)]
    assert ref.della_probabilities(tau, 0.5, 0.15).tolist() == expected
    assert expected[2] == 0.4357142857142857


def test_della_ranks_along_the_last_axis():
    # rows of C = 3, rho 0.5, eps 0.25 -> p(r) = 0.25, 0.5, 0.75
    tau = f32(3, 1, 2, -1, -1, 5).reshape(2, 3)
    # row 0 |.| = [3, 1, 2] -> r = [3, 1, 2]; row 1 = [1, 1, 5] -> r = [1, 2, 3] (ties by index)
    expected = [[0.75, 0.25, 0.5], [0.25, 0.5, 0.75]]
    assert ref.della_probabilities(tau, 0.5, 0.25).tolist() == expected
    # 3-D: every last-axis row on its own (mergekit's axis-1 ranking would mix rows here)
    tau3 = f32(3, 1, 2, -1, -1, 5, 0, 9, 4, 2, 2, 2).reshape(2, 2, 3)
    expected3 = [[[0.75, 0.25, 0.5], [0.25, 0.5, 0.75]], [[0.25, 0.75, 0.5], [0.25, 0.5, 0.75]]]
    assert ref.della_probabilities(tau3, 0.5, 0.25).tolist() == expected3


def test_della_rows_of_one_element_take_density():
    for shape in [(4, 1), (1,), (), (2, 3, 1)]:
        tau = np.arange(1, 1 + math.prod(shape), dtype=np.float32).reshape(shape)
        p = ref.della_probabilities(tau, 0.4, 0.3)
        assert p.shape == shape and (p == 0.4).all()


def test_della_hand():
    M = B5 + TAU_D
    # no rescale: [5, 0, 1, 0, 0]
    out = ref.della_linear(B5, [M], [1.0], [0.625], [0.25], name=Q_PROJ, rescale=False)
    assert_bits_equal(out, B5 + f32(5, 0, 1, 0, 0))
    # l1: 15 / 6 = 2.5 -> [12.5, 0, 2.5, 0, 0]
    out = ref.della_linear(B5, [M], [1.0], [0.625], [0.25], name=Q_PROJ)
    assert_bits_equal(out, B5 + f32(12.5, 0, 2.5, 0, 0))
    # inverse: fl32(1 / 0.875) = fl32(8/7), fl32(1 / 0.375) = fl32(8/3)
    out = ref.della_linear(B5, [M], [1.0], [0.625], [0.25], name=Q_PROJ, rescale="inverse")
    assert_bits_equal(out, B5 + f32(np.float32(5) * np.float32(8 / 7), 0, np.float32(8 / 3), 0, 0))
    # della (sum consensus, normalize): one model w = 2: D = 2 on kept elements -> same as w = 1
    out = ref.della(B5, [M], [2.0], [0.625], [0.25], name=Q_PROJ)
    assert_bits_equal(out, B5 + f32(12.5, 0, 2.5, 0, 0))


def test_della_bounds_and_parameter_errors():
    tau = f32(1, 2, 3)
    with pytest.raises(ValueError):
        ref.sparsify(tau, 0.5, "della", epsilon=0.5, name="x")  # rho - eps = 0
    with pytest.raises(ValueError):
        ref.sparsify(tau, 0.8, "della", epsilon=0.2, name="x")  # rho + eps = 1
    with pytest.raises(ValueError):
        ref.sparsify(tau, -0.1, "random", name="x")
    with pytest.raises(ValueError):
        ref.sparsify(tau, 0.5, "outliers", gamma=1.5)
    with pytest.raises(ValueError):
        ref.sparsify(tau, 0.5, "random")  # a random mask needs the tensor name
    with pytest.raises(ValueError):
        ref.sparsify(tau, 0.5, "magnitude", rescale="inverse")  # no keep probability
    # the bounds do not apply at density 0 or >= 1
    ref.sparsify(tau, 0.0, "della", epsilon=0.5, name="x")
    ref.sparsify(tau, 1.0, "della", epsilon=0.5, name="x")


def _random_case(shape=(6, 7), n_models=3, seed=5):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    models = [base + (rng.integers(-8, 9, shape) * 0.125).astype(np.float32) for _ in range(n_models)]
    return base, models


SPARSIFIER_KW = {
    "magnitude": {},
    "random": {"name": "t.weight", "seed": 3},
    "outliers": {"gammas": [0.1, 0.2, 0.05]},
    "della": {"name": "t.weight", "seed": 3, "epsilons": [0.1, 0.2, 0.05]},
}


@pytest.mark.parametrize("sparsifier", ["magnitude", "random", "outliers", "della"])
def test_density_one_leaves_deltas_untouched(sparsifier):
    base, models = _random_case()
    kw = SPARSIFIER_KW[sparsifier]
    for rescale in (False, True, "inverse") if sparsifier in ("random", "della") else (False, True):
        for dens in ([1.0, 1.0, 1.0], [1.0, 1.5, 2.0]):
            out = ref.task_family(base, models, weights=[1, 2, -0.5], densities=dens, sparsifier=sparsifier,
                                  rescale=rescale, lam=0.75, normalize=True, **kw)
            assert_bits_equal(out, ref.task_arithmetic(base, models, [1, 2, -0.5], lam=0.75, normalize=True))
            out = ref.task_family(base, models, weights=[1, 2, 1], densities=dens, sparsifier=sparsifier,
                                  consensus="sum", normalize=True, rescale=rescale, **kw)
            assert_bits_equal(out, ref.ties(base, models, [1, 2, 1], [1, 1, 1]))


@pytest.mark.parametrize("sparsifier", ["magnitude", "random", "outliers", "della"])
def test_density_zero_gives_base(sparsifier):
    base, models = _random_case()
    kw = SPARSIFIER_KW[sparsifier]
    for consensus in (None, "sum", "count"):
        for rescale in (False, True):
            out = ref.task_family(base, models, weights=[1, 2, 1], densities=[0, 0, 0], sparsifier=sparsifier,
                                  consensus=consensus, normalize=True, rescale=rescale, **kw)
            assert_bits_equal(out, base)
            stats = ref.task_family_stats(base, models, densities=[0, 0, 0], sparsifier=sparsifier, **kw)
            assert [s["kept"] for s in stats] == [0, 0, 0]


def test_family_magnitude_is_ties_and_plain_is_task_arithmetic():
    for seed in range(4):
        base, models = _random_case(seed=seed)
        dens = [0.3, 0.55, 1.0]
        for consensus in ("sum", "count"):
            for normalize in (True, False):
                out = ref.task_family(base, models, weights=[1, 0.5, 2], densities=dens, sparsifier="magnitude",
                                      consensus=consensus, normalize=normalize, lam=1.5)
                expected = ref.ties(base, models, [1, 0.5, 2], dens, lam=1.5, normalize=normalize, consensus=consensus)
                assert_bits_equal(out, expected)
        out = ref.task_family(base, models, weights=[1, 0.5, 2], normalize=True, lam=0.3)
        assert_bits_equal(out, ref.task_arithmetic(base, models, [1, 0.5, 2], normalize=True, lam=0.3))


def test_sparsify_works_on_1d_0d_and_3d():
    rng = np.random.default_rng(6)
    for shape in [(17,), (), (3, 4, 5)]:
        tau = rng.standard_normal(shape).astype(np.float32)
        for sp in ("magnitude", "random", "outliers", "della"):
            hat, keep, _ = ref.sparsify(tau, 0.5, sp, epsilon=0.1, name="x", rescale=False)
            assert hat.shape == shape and keep.shape == shape
            assert_bits_equal(hat, np.where(keep, tau, np.float32(0)))
    # magnitude / outliers keep exactly k (count over the flat tensor)
    tau = rng.standard_normal((3, 4, 5)).astype(np.float32)
    assert int(ref.sparsify(tau, 0.5, "magnitude")[1].sum()) == 30
    assert int(ref.sparsify(tau, 0.5, "outliers", gamma=0.1)[1].sum()) == 30


def test_dare_and_della_keep_sum_p_within_5_sigma():
    rng = np.random.default_rng(7)
    shape = (200, 250)
    n = 200 * 250
    base = rng.standard_normal(shape).astype(np.float32)
    models = [base + rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    dens = [0.1, 0.5, 0.9]
    stats = ref.task_family_stats(base, models, densities=dens, sparsifier="random", seed=11, name="m.weight")
    for st_, rho in zip(stats, dens):
        assert st_["n"] == n
        assert math.isclose(st_["p_sum"], n * rho) and math.isclose(st_["p_var"], n * rho * (1 - rho))
        assert abs(st_["kept"] - n * rho) <= 5 * math.sqrt(n * rho * (1 - rho))
    # DELLA: p varies with the rank, but every row's p sums to C * rho (the ramp is symmetric)
    stats = ref.task_family_stats(base, models, densities=dens, sparsifier="della", seed=11, name="m.weight",
                                  epsilons=[0.05, 0.3, 0.08])
    for st_, rho in zip(stats, dens):
        assert math.isclose(st_["p_sum"], n * rho, rel_tol=1e-9)
        assert st_["p_var"] < n * rho * (1 - rho)
        assert abs(st_["kept"] - st_["p_sum"]) <= 5 * math.sqrt(st_["p_var"])
    # DELLA keeps large magnitudes more often: kept fraction in the top rank third > bottom third
    tau = models[1] - base
    _, keep, p = ref.sparsify(tau, 0.5, "della", epsilon=0.3, seed=11, name="m.weight", index=1)
    # (p in (0.6, 0.8] averages 0.7, p in [0.2, 0.4) 0.3; ~16600 draws each, sigma ~ 0.004)
    assert keep[p > 0.6].mean() > 0.68 and keep[p < 0.4].mean() < 0.32


# ============================================================================== slerp


def test_slerp_orthogonal_hand():
    B, M = f32(1, 0), f32(0, 1)
    # n0 = n1 = 1, c = 0, theta = pi/2, sin theta = 1; t = 0.5: c0 = c1 = sin(pi/4) = sqrt(1/2)
    h = np.float32(math.sqrt(0.5))
    assert_bits_equal(ref.slerp(B, M, 0.5), f32(h, h))
    # t = 0.25: c0 = sin(3 pi/8) = sqrt(2 + sqrt 2)/2, c1 = sin(pi/8) = sqrt(2 - sqrt 2)/2
    c0 = np.float32(math.sqrt(2 + math.sqrt(2)) / 2)
    c1 = np.float32(math.sqrt(2 - math.sqrt(2)) / 2)
    assert_bits_equal(ref.slerp(B, M, 0.25), f32(c0, c1))


def test_slerp_45_degrees_hand():
    B, M = f32(1, 0, 0, 0), f32(1, 1, 0, 0)
    # n0 = 1, n1 = sqrt 2, c = 1/sqrt 2, theta = pi/4; t = 0.5:
    # c0 = c1 = sin(pi/8) / sin(pi/4) = sqrt(1 - 1/sqrt 2) = 0.5411961...
    c = np.float32(math.sqrt(1 - 1 / math.sqrt(2)))
    out = ref.slerp(B, M, 0.5)
    expected = f32(c + c, c, 0, 0)  # c0*1 + c1*1, c0*0 + c1*1
    np.testing.assert_array_max_ulp(out, expected, maxulp=1)  # another float64 path: 1 ulp allowed


def test_slerp_t0_is_base_t1_is_model_exactly():
    rng = np.random.default_rng(8)
    B = rng.standard_normal((5, 7)).astype(np.float32)
    M = rng.standard_normal((5, 7)).astype(np.float32)
    # theta in (0, pi): c0 = sin(theta)/sin(theta) = 1, c1 = sin(0)/sin(theta) = 0 (and back)
    assert_bits_equal(ref.slerp(B, M, 0.0), B)
    assert_bits_equal(ref.slerp(B, M, 1.0), M)
    assert_bits_equal(ref.slerp(B, 2 * B, 0.0), B)  # lerp branch
    assert_bits_equal(ref.slerp(B, 2 * B, 1.0), 2 * B)


def test_slerp_parallel_and_antiparallel_lerp():
    B = f32(1, 2)
    # c = 10 / (sqrt 5 * sqrt 20) = 1 -> lerp with (0.75, 0.25): [0.75 + 0.5, 1.5 + 1] = [1.25, 2.5]
    assert_bits_equal(ref.slerp(B, f32(2, 4), 0.25), f32(1.25, 2.5))
    # c = -1: |c| > 0.9995 -> lerp too: t = 0.5 -> 0; t = 0.25 -> [0.75 - 0.25, 1.5 - 0.5]
    assert_bits_equal(ref.slerp(B, -B, 0.5), f32(0, 0))
    assert_bits_equal(ref.slerp(B, -B, 0.25), f32(0.5, 1.0))


def test_slerp_threshold_0_9995():
    # v0 = [1, 0], v1 = [1, b]: c = 1 / sqrt(1 + b^2) (decided with exact fractions here)
    for b, lerp in [(0.031, True), (0.032, False)]:
        b32 = Fraction(float(np.float32(b)))
        c_sq = 1 / (1 + b32 * b32)
        assert (c_sq > Fraction(0.9995) ** 2) == lerp
        out = ref.slerp(f32(1, 0), f32(1, b), 0.5)
        if lerp:  # (0.5, 0.5): [1, b/2]
            assert_bits_equal(out, f32(1.0, np.float32(0.5) * np.float32(b)))
        else:  # c0 = c1 = 1 / (2 cos(theta/2)) > 1/2: first element 1/cos(theta/2) > 1
            assert float(out[0]) > 1.0001


def test_slerp_zero_tensor_is_not_a_lerp():
    # B = 0: n0 -> 1, c = 0, theta = pi/2; t = 0.5: c1 = sin(pi/4) (a lerp would give 0.5 M)
    h = np.float32(math.sqrt(0.5))
    out = ref.slerp(f32(0, 0), f32(3, 4), 0.5)
    assert_bits_equal(out, f32(h * np.float32(3), h * np.float32(4)))
    assert_bits_equal(ref.slerp(f32(0, 0), f32(0, 0), 0.3), f32(0, 0))
    # tiny norms (<= 1e-8) are replaced by 1, too: c = 2**-60 / 1 -> tiny, theta ~ pi/2
    out = ref.slerp(f32(2.0**-30, 0), f32(2.0**-30, 0), 0.5)
    assert_bits_equal(out, f32(np.float32(2.0**-30) * (h + h), 0))


def test_slerp_1d_of_one_element_and_3d():
    # one element: v0 = [2], v1 = [3]: c = 6 / 6 = 1 -> lerp: 0.5*2 + 0.5*3 = 2.5
    assert_bits_equal(ref.slerp(f32(2), f32(3), 0.5), f32(2.5))
    # a 3-D tensor is flattened: same result as its flat form
    rng = np.random.default_rng(9)
    B = rng.standard_normal((2, 3, 4)).astype(np.float32)
    M = rng.standard_normal((2, 3, 4)).astype(np.float32)
    assert_bits_equal(ref.slerp(B, M, 0.3).ravel(), ref.slerp(B.ravel(), M.ravel(), 0.3))


# ============================================================================== nuslerp


def test_nuslerp_t():
    assert ref.nuslerp_t(1, 3) == 0.75
    assert ref.nuslerp_t(1, -1) == 0.5  # |w0 + w1| < 1e-6
    assert ref.nuslerp_t(1e-7, 0) == 0.5
    assert ref.nuslerp_t(2, 0) == 0.0
    assert ref.nuslerp_t(-1, 3) == 1.5


def test_nuslerp_flatten_no_base_hand():
    # w = [1, 3] -> t = 0.75; orthogonal: c0 = sin(pi/8), c1 = sin(3 pi/8)
    out = ref.nuslerp([f32(1, 0), f32(0, 1)], [1, 3])
    assert_bits_equal(out, f32(math.sqrt(2 - math.sqrt(2)) / 2, math.sqrt(2 + math.sqrt(2)) / 2))


# rows (last axis): row 0 v0 = [3, 4], v1 = [6, 8]: c = 50 / (5 * 10) = 1 -> lerp (t = 0.5) -> [4.5, 6]
#                   row 1 v0 = [1, 0], v1 = [0, 1]: c = 0 -> sin(pi/4) each -> [h, h]
V0 = f32(3, 4, 1, 0).reshape(2, 2)
V1 = f32(6, 8, 0, 1).reshape(2, 2)
H = float(np.float32(math.sqrt(0.5)))


def test_nuslerp_rows_hand():
    out = ref.nuslerp([V0, V1], [1, 1], flatten=False)
    assert_bits_equal(out, f32(4.5, 6, H, H).reshape(2, 2))
    # row_wise: vectors along axis 0 -> the same on the transposed tensors
    out = ref.nuslerp([np.ascontiguousarray(V0.T), np.ascontiguousarray(V1.T)], [1, 1], flatten=False, row_wise=True)
    assert_bits_equal(out, f32(4.5, 6, H, H).reshape(2, 2).T)
    # with a base: v_i = M_i - B; result B + r
    B = f32(1, -1, 0.5, 2).reshape(2, 2)
    out = ref.nuslerp([B + V0, B + V1], [1, 1], B, flatten=False)
    assert_bits_equal(out, B + f32(4.5, 6, H, H).reshape(2, 2))


def test_nuslerp_flatten_hand():
    # whole tensor: dot = 18 + 32 = 50, |v0|^2 = 26, |v1|^2 = 101: c = 50 / sqrt(2626).
    # t = 0.5: c0 = c1 = sin(theta/2) / sin(theta) = 1 / (2 cos(theta/2)) = 1 / sqrt(2 (1 + c))
    c = 50 / math.sqrt(2626)
    k = np.float32(1 / math.sqrt(2 * (1 + c)))
    expected = k * V0 + k * V1
    np.testing.assert_array_max_ulp(ref.nuslerp([V0, V1], [1, 1]), expected, maxulp=1)  # another path


def test_nuslerp_colinear_rule_has_no_0_9995_threshold():
    # c = 1 and c = -1 exactly (norms 5 and 10, 5 and 5): 1 - c^2 = 0 <= 1e-16 -> (1 - t, t)
    assert_bits_equal(ref.nuslerp([f32(3, 4), f32(6, 8)], [1, 1]), f32(4.5, 6))
    # t = 0.25: 0.75 [3, 4] + 0.25 [-3, -4] = [2.25 - 0.75, 3 - 1]
    assert_bits_equal(ref.nuslerp([f32(3, 4), f32(-3, -4)], [3, 1]), f32(1.5, 2))
    # In float64, 1 - c^2 <= 1e-16 holds only for |c| == 1 exactly (c = 1 - 2**-53 gives
    # 2.2e-16). [1, 2] and [-1, -2]: sqrt 5 * sqrt 5 = 5.000000000000001, c = -0.9999999999999998,
    # so the slerp branch runs (theta ~ pi - 2e-8, coefficients ~ 3.5e7 that cancel): not the lerp.
    assert not np.array_equal(ref.nuslerp([f32(1, 2), f32(-1, -2)], [3, 1]), f32(0.5, 1))
    # c ~ 0.99995 (slerp would lerp here): the slerp coefficients, theta = atan(0.01)
    out = ref.nuslerp([f32(1, 0), f32(1, 0.01)], [1, 1])
    theta = math.atan2(float(np.float32(0.01)), 1.0)
    k = math.sin(theta / 2) / math.sin(theta)
    np.testing.assert_array_max_ulp(out, f32(2 * k, k * float(np.float32(0.01))), maxulp=1)
    assert not np.array_equal(out, f32(1.0, np.float32(0.005)))  # not the lerp


def test_nuslerp_zero_vector_and_shapes():
    # v0 = 0: max(||v0||, 1e-7) -> c = 0 -> theta = pi/2: r = sin(pi/4) v1 at t = 0.5
    out = ref.nuslerp([f32(0, 0), f32(3, 4)], [1, 1])
    assert_bits_equal(out, f32(np.float32(H) * np.float32(3), np.float32(H) * np.float32(4)))
    # 1-D with flatten False is one vector (= flatten)
    rng = np.random.default_rng(10)
    a, b = rng.standard_normal(9).astype(np.float32), rng.standard_normal(9).astype(np.float32)
    assert_bits_equal(ref.nuslerp([a, b], [1, 2], flatten=False), ref.nuslerp([a, b], [1, 2]))
    assert_bits_equal(ref.nuslerp([a, b], [1, 2], flatten=False, row_wise=True), ref.nuslerp([a, b], [1, 2]))
    # 3-D: each last-axis row on its own; rows along axis 0 = columns of the (A, B*C) reshape
    a3 = rng.standard_normal((3, 2, 4)).astype(np.float32)
    b3 = rng.standard_normal((3, 2, 4)).astype(np.float32)
    out = ref.nuslerp([a3, b3], [1, 2], flatten=False)
    for i in range(3):
        for j in range(2):
            assert_bits_equal(out[i, j], ref.nuslerp([a3[i, j].copy(), b3[i, j].copy()], [1, 2]))
    out = ref.nuslerp([a3, b3], [1, 2], flatten=False, row_wise=True)
    for j in range(2):
        for k in range(4):
            col = ref.nuslerp([np.ascontiguousarray(a3[:, j, k]), np.ascontiguousarray(b3[:, j, k])], [1, 2])
            assert_bits_equal(np.ascontiguousarray(out[:, j, k]), col)
    with pytest.raises(ValueError):
        ref.nuslerp([a], [1])


# ============================================================================== model_stock


def test_model_stock_hand():
    # d1 = [3, 4], d2 = [5, 0]: c = 15 / (5 * 5) = 0.6; t = 2 * 0.6 / (1 + 0.6) = 0.75 (fl32);
    # s = 0.25; m = ([4, 5] + [6, 1]) / 2 = [5, 3]; result 0.75 m + 0.25 B = [3.75 + 0.25, 2.25 + 0.25]
    B = f32(1, 1)
    assert_bits_equal(ref.model_stock(B, [f32(4, 5), f32(6, 1)]), f32(4.0, 2.5))


def test_model_stock_three_models_mean_of_pairs():
    # d1 = [1, 0], d2 = [0, 1], d3 = [-1, 0]: c12 = 0, c13 = -1, c23 = 0 -> c = -1/3;
    # 1 + 2c = 1/3 -> t = 3c / (1 + 2c) = -3 (fl32; float64 gives -2.9999999999999996);
    # s = fl32(1 - (-3)) = 4. m = ([2, 2] + [1, 3] + [0, 2]) / 3 = [1, fl32(7/3)].
    # e0: -3 * 1 + 4 * 1 = 1.
    # e1: fl32(7/3) = 9786709 * 2**-22; * -3 = -29360127 * 2**-22, 25 bits -> tie -> -7.0; + 8 = 1.
    B = f32(1, 2)
    out = ref.model_stock(B, [f32(2, 2), f32(1, 3), f32(0, 2)])
    assert_bits_equal(out, f32(1.0, 1.0))
    assert float(np.float32(7 / 3)) == 9786709 * 2.0**-22


def test_model_stock_filter_wise_rows():
    # row 0: as test_model_stock_hand -> [4, 2.5]
    # row 1: d1 = [1, 0], d2 = [-2, 0]: c = -2 / 2 = -1 -> |1 + c| = 0 < 1e-6 -> t = 0, s = 1 -> B's row [1, 2]
    B = f32(1, 1, 1, 2).reshape(2, 2)
    M1 = f32(4, 5, 2, 2).reshape(2, 2)
    M2 = f32(6, 1, -1, 2).reshape(2, 2)
    assert_bits_equal(ref.model_stock(B, [M1, M2], filter_wise=True), f32(4, 2.5, 1, 2).reshape(2, 2))
    # the same rows one at a time agree; 1-D filter_wise = per tensor
    assert_bits_equal(ref.model_stock(B[0].copy(), [M1[0].copy(), M2[0].copy()], filter_wise=True), f32(4.0, 2.5))


def test_model_stock_degenerate_cases():
    B = f32(1, 2)
    # a zero delta: c = 0 / max(0, 1e-6) = 0 -> t = 0 -> B
    assert_bits_equal(ref.model_stock(B, [B.copy(), f32(3, 3)]), B)
    # opposite deltas: c = -1 -> 1 + c = 0 -> t = 0 -> B
    assert_bits_equal(ref.model_stock(B, [f32(2, 3), f32(0, 1)]), B)
    # identical deltas: c = 1 -> t = 2/2 = 1, s = 0 -> m = M
    assert_bits_equal(ref.model_stock(B, [f32(2, 3), f32(2, 3)]), f32(2, 3))
    with pytest.raises(ValueError):
        ref.model_stock(B, [f32(2, 3)])


# ============================================================================== sce


def test_sce_equal_weights_hand():
    # tau1 = [1, 2], tau2 = [-1, 2]: q = 5/2 each -> w = 0.5 each.
    # S = [0, 4] -> s = [+, +]; a1 = [T, T], a2 = [F, T]
    # num = [0.5, 1 + 1], den = [0.5, 1] -> delta = [1, 2]
    B = f32(1, 1)
    assert_bits_equal(ref.sce(B, [B + f32(1, 2), B + f32(-1, 2)]), f32(2, 3))


def test_sce_unequal_weights_hand():
    # tau1 = [2, 2], tau2 = [1, 0]: q1 = 8/2 = 4, q2 = 1/2; Q = 4.5 -> w1 = fl32(8/9), w2 = fl32(1/9)
    # e0: both +: (w1*2 + w2*1) / (w1 + w2) (~ 17/9); e1: model 1 only: (w1*2) / w1 = 2 exactly
    w1, w2 = np.float32(8 / 9), np.float32(1 / 9)
    e0 = np.float32((w1 * np.float32(2) + w2 * np.float32(1)) / (w1 + w2))
    B = f32(0, 0)
    assert_bits_equal(ref.sce(B, [f32(2, 2), f32(1, 0)]), f32(e0, 2))
    assert abs(float(e0) - 17 / 9) < 1e-6


def test_sce_small_deltas_keep_their_weights():
    # The deliberate difference: Q = 2**-24 + 2**-27 ~ 6.7e-8 < 1e-6, but Q != 0, so the weights
    # are still q_i / Q = 8/9, 1/9 (mergekit: 1/2, 1/2).
    # tau1 = [2**-12, 2**-12] (q1 = 2**-24), tau2 = [2**-13, 0] (q2 = 2**-27).
    t1, t2 = f32(2.0**-12, 2.0**-12), f32(2.0**-13, 0)
    w1, w2 = np.float32(8 / 9), np.float32(1 / 9)
    e0 = np.float32((w1 * np.float32(2.0**-12) + w2 * np.float32(2.0**-13)) / (w1 + w2))
    out = ref.sce(f32(0, 0), [t1, t2])
    assert_bits_equal(out, f32(e0, 2.0**-12))
    assert float(out[0]) != 0.75 * 2.0**-12  # the equal-weight answer


def test_sce_divisor_floor():
    # tau1 = [1, 0], tau2 = [0, 2**-20]: q1 = 1/2, q2 = 2**-41; w2 = fl32(2**-41 / (1/2 + 2**-41)) ~ 9.1e-13
    # e1: only model 2 agrees: den = max(w2, fl32(1e-6)) = fl32(1e-6): delta = (w2 * 2**-20) / fl32(1e-6)
    q1, q2 = 0.5, 2.0**-41
    w1, w2 = np.float32(q1 / (q1 + q2)), np.float32(q2 / (q1 + q2))
    e1 = np.float32(w2 * np.float32(2.0**-20)) / np.float32(1e-6)
    out = ref.sce(f32(0, 0), [f32(1, 0), f32(0, 2.0**-20)])
    assert_bits_equal(out, f32(np.float32(w1 * np.float32(1)) / w1, e1))


# per element (3 models): e0 [1, 1, 1] var 0; e1 [0, 2, 4] mu 2, var 8/3; e2 [1, -1, 0] var 2/3;
# e3 [2, 2, -1] mu 1, var (1 + 1 + 4)/3 = 2. #{var != 0} = 3.
SCE_TAUS = [f32(1, 0, 1, 2), f32(1, 2, -1, 2), f32(1, 4, 0, -1)]


def test_sce_select_topk_hand():
    B = np.zeros(4, np.float32)
    # sigma 0.5: k = floor(1.5) = 1 -> e1 only. taus -> [0,0,0,0], [0,2,0,0], [0,4,0,0]
    # q = [0, 4/4, 16/4] = [0, 1, 4]; Q = 5; w = [0, fl32(0.2), fl32(0.8)]
    # e1: S = 6 -> +; models 2, 3 agree: (w2*2 + w3*4) / (w2 + w3)
    w2, w3 = np.float32(0.2), np.float32(0.8)
    e1 = np.float32((w2 * np.float32(2) + w3 * np.float32(4)) / (w2 + w3))
    assert_bits_equal(ref.sce(B, SCE_TAUS, select_topk=0.5), f32(0, e1, 0, 0))
    # sigma 0.7: k = floor(2.1) = 2 -> e1, e3. taus -> [0,0,0,2], [0,2,0,2], [0,4,0,-1]
    # q = [4/4, 8/4, 17/4]; Q = 7.25; w = fl32(1/7.25), fl32(2/7.25), fl32(4.25/7.25)
    # e1: models 2, 3; e3: S = 3 -> +: models 1, 2
    w1, w2, w3 = np.float32(1 / 7.25), np.float32(2 / 7.25), np.float32(4.25 / 7.25)
    e1 = np.float32((w2 * np.float32(2) + w3 * np.float32(4)) / (w2 + w3))
    e3 = np.float32((w1 * np.float32(2) + w2 * np.float32(2)) / (w1 + w2))
    assert_bits_equal(ref.sce(B, SCE_TAUS, select_topk=0.7), f32(0, e1, 0, e3))
    # sigma <= 0 zeroes every delta: the base
    Bn = f32(1, -2, 3, 0.5)
    assert_bits_equal(ref.sce(Bn, [Bn + t for t in SCE_TAUS], select_topk=0.0), Bn)
    assert_bits_equal(ref.sce(Bn, [Bn + t for t in SCE_TAUS], select_topk=-1.0), Bn)


def test_sce_all_zero_deltas_and_one_model():
    B = f32(1, -2)
    assert_bits_equal(ref.sce(B, [B.copy(), B.copy()]), B)  # Q = 0 -> w = 1/2, delta 0
    # one model: w = fl32(q/q) = 1; delta = (1 * tau) / 1 where tau != 0, 0 elsewhere
    assert_bits_equal(ref.sce(B, [f32(3, -2)]), f32(3, -2))


# ============================================================================== passthrough


def test_passthrough():
    x = np.array([0x3FC00000, 0x80000000, 0x7FC00123], np.uint32).view(np.float32)  # 1.5, -0.0, NaN+payload
    out = ref.passthrough(x)
    np.testing.assert_array_equal(out.view(np.uint32), x.view(np.uint32))
    assert out is not x
    assert_bits_equal(ref.passthrough(f32(1.5, -0.0, 4), 0.5), f32(0.75, -0.0, 2))
    # fl32(x * fl32(0.1))
    assert_bits_equal(ref.passthrough(f32(3.0), 0.1), f32(np.float32(3) * np.float32(0.1)))


# ============================================================================== recipes


def test_layer_t():
    assert [ref.layer_t(j, 5) for j in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert ref.layer_t(0, 1) == 1.0
    assert ref.layer_t(1, 3) == 0.5
    assert ref.layer_t(1, 4) == 1 / 3
    with pytest.raises(ValueError):
        ref.layer_t(5, 5)


def test_gradient_value_hand():
    g = [0.0, 1.0, 0.5]
    # t = 0 -> s0; 0.25 -> x = 0.5: 0.5*0 + 0.5*1; 0.5 -> x = 1: s1; 0.75 -> x = 1.5: 0.5*1 + 0.5*0.5; 1 -> s2
    assert [ref.gradient_value(g, t) for t in (0, 0.25, 0.5, 0.75, 1.0)] == [0.0, 0.5, 1.0, 0.75, 0.5]
    assert ref.gradient_value([0.3], 0.7) == 0.3
    assert ref.gradient_value([1, 3], 0.5) == 2.0  # integers are numbers
    with pytest.raises(ValueError):
        ref.gradient_value(g, 1.5)
    with pytest.raises(ValueError):
        ref.gradient_value([], 0.5)


def test_gradient_order_of_operations():
    # Emulated with exact fractions and one float64 rounding per operation:
    # x = t*(A-1); f = x - i0; value = (1 - f)*s0 + f*s1
    s0, s1, t = 0.1, 0.7, 0.3
    x = _r64(Fraction(t) * 1)
    f = _r64(x - 0)
    value = _r64(_r64(_r64(1 - f) * Fraction(s0)) + _r64(f * Fraction(s1)))
    assert ref.gradient_value([s0, s1], t) == float(value) == 0.27999999999999997
    # the other algebraic form s0 + f*(s1 - s0) would give 0.28: the order is part of the contract
    assert float(_r64(Fraction(s0) + _r64(f * _r64(Fraction(s1) - Fraction(s0))))) == 0.28


def test_gradient_booleans():
    g = [True, False, True]
    # index floor(t * 2): 0.4 -> 0; 0.5 -> 1; 0.99 -> 1; 1 -> 2
    assert [ref.gradient_value(g, t) for t in (0.0, 0.4, 0.5, 0.99, 1.0)] == [True, True, False, False, True]
    with pytest.raises(ValueError):
        ref.gradient_value([True, 0.5], 0.5)


def test_first_match_and_settings():
    entries = [{"filter": "self_attn", "value": 0.5}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.2}]
    assert ref.first_match(entries, "model.layers.1.self_attn.q_proj.weight") == 0.5
    assert ref.first_match(entries, "model.layers.1.mlp.up_proj.weight") == [0.0, 1.0]
    assert ref.first_match(entries, "model.norm.weight") == 0.2  # trailing entry without filter
    assert ref.first_match(entries[:2], "model.norm.weight") is ref.NO_MATCH
    # the first match wins, substrings match: layers.1 matches layers.10; "*" matches everything
    order = [{"filter": "layers.1", "value": 1}, {"filter": "layers.10", "value": 2}]
    assert ref.first_match(order, "model.layers.10.mlp.down_proj.weight") == 1
    assert ref.first_match({"filter": "*", "value": 7}, "anything") == 7
    # evaluate_setting: the matched value may be a gradient, evaluated at t
    assert ref.evaluate_setting(entries, "model.layers.1.mlp.up_proj.weight", 0.25) == 0.25
    assert ref.evaluate_setting([0.0, 1.0], "x", 0.5) == 0.5
    assert ref.evaluate_setting(0.9, "x", 0.5) == 0.9


def test_resolve_parameter_precedence():
    model_level = [{"filter": "mlp", "value": 0.1}]
    slice_level = None
    top_level = [{"filter": "self_attn", "value": 0.3}, {"value": [0.0, 1.0]}]
    levels = [model_level, slice_level, top_level]
    assert ref.resolve_parameter(levels, "model.layers.0.mlp.up_proj.weight", 0.5) == 0.1  # model's own
    assert ref.resolve_parameter(levels, "model.layers.0.self_attn.o_proj.weight", 0.5) == 0.3  # next level
    assert ref.resolve_parameter(levels, "model.norm.weight", 0.5) == 0.5  # top-level default gradient
    assert ref.resolve_parameter([model_level], "model.norm.weight", 0.5, default=1.0) == 1.0
    assert ref.resolve_parameter([model_level], "model.norm.weight", 0.5) is ref.NO_MATCH
