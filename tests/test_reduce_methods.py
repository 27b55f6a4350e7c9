"""SLERP, NuSLERP, Model Stock and SCE (kernels/reduce.py, methods/reduce.py, methods/sce.py)
through the engine's span loop (arrays.run_arrays) against tests/reference.py, bit for bit:
the exact per-vector sums (docs/semantics.md §A), the merged tensors, the statistics.

Small kernel blocks and spans put row blocks across span boundaries (the reference's
BLOCK is set to the same block: the reduction grid is part of the contract); shapes cover
1-D tensors, rows and columns of one element, rows longer than a block and 3-D tensors;
inputs cover zero tensors, parallel and antiparallel vectors (|cos| above the
thresholds), heavy ties in SCE's variance ranking. A separate test checks that no fused
multiply-add sneaks into the float32 blends.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
from npmerge import kernels
from npmerge.constants import BLOCK
from npmerge.arrays import run_arrays


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def same(a, b) -> bool:
    return a.shape == b.shape and np.array_equal(bits(a), bits(b))


@contextlib.contextmanager
def grid(block: int):
    """The reference's reduction block set to the kernels' (a multiple of 8)."""
    saved = ref.BLOCK
    ref.BLOCK = block
    try:
        yield
    finally:
        ref.BLOCK = saved


def merge(method, base, models, params=None, model_params=None, *, block=BLOCK, spans=None, cache=False):
    """run_arrays with kernel blocks of `block` and spans of `spans` blocks (default: one span);
    `cache`: the driver may keep its optional cache (SCE: collect the threshold's bucket)."""
    span = block * spans if spans else None
    mp = model_params if model_params is not None else [{} for _ in models]
    out, stats, drv = run_arrays(method, base, models, params or {}, mp, block=block, span=span, driver=True,
                                 shape=models[0].shape, driver_cache=cache)
    return out.reshape(models[0].shape), stats, drv


def normal(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def bf16(x):
    return ref.to_f32_bf16(ref.from_f32_bf16(np.ascontiguousarray(x, np.float32)))


SHAPES = [(1,), (7,), (333,), (5, 1), (1, 9), (40, 37), (3, 5, 7), (2, 3, 41)]


# ------------------------------------------------------------------ exact sums


FINITE = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(FINITE, st.sampled_from([0.0, -0.0, 1.0, 1e-16, 1e16, 2.0**-1074, 5e-324]),
                          st.integers(-2**60, 2**60).map(float)), max_size=40))
def test_exact_rows_is_math_fsum(values):
    k = kernels.load("reduce")
    out = np.empty(1, np.float64)
    k.exact_rows(np.array([values], np.float64).reshape(1, -1), out)
    want = math.fsum(values)
    assert out[0] == want and math.copysign(1, out[0]) == math.copysign(1, want)


@pytest.mark.parametrize("values", [[1e-16, 1.0, 1e16], [1.0, 1e100, 1.0, -1e100], [0.1] * 10, [-0.0], [],
                                    [2.0**53, 1.0, 2.0**-60], [1e308, -1e308, 1.0],
                                    [math.inf, 1.0], [math.inf, -math.inf], [math.nan, 1.0], [-math.inf, 3.0]])
def test_exact_rows_special_cases(values):
    """Half-way rounding across partials (CPython's fix-up), cancellation, and the
    reference's IEEE rule for non-finite block sums."""
    k = kernels.load("reduce")
    out = np.empty(1, np.float64)
    k.exact_rows(np.array(values, np.float64).reshape(1, -1), out)
    want = ref._exact_sum(values)
    assert (math.isnan(out[0]) and math.isnan(want)) or out[0] == want


@pytest.mark.parametrize("layout", ["flat", "rows", "columns"])
@pytest.mark.parametrize("shape", SHAPES + [(70, 19)])
@pytest.mark.parametrize("block,spans", [(8, 1), (16, 3), (24, 2), (BLOCK, None)])
def test_vector_sums_match_reference(layout, shape, block, spans):
    """The float64 norms and dot products NuSLERP reduces, per layout, against
    reference.sq_norm(_rows) / dot(_rows) with the same block grid, to the last bit."""
    rng = np.random.default_rng(sum(shape) + block)
    base, m0, m1 = (normal(rng, shape, s) for s in (1.0, 1.0, 1.0))
    m0 = (base + normal(rng, shape, 0.1)).astype(np.float32)
    params = {"nuslerp_flatten": layout == "flat", "nuslerp_row_wise": layout == "columns"}
    _, _, drv = merge("nuslerp", base, [m0, m1], params, [{"weight": 1.0}, {"weight": 2.0}], block=block, spans=spans)
    v0, v1 = m0 - base, m1 - base
    with grid(block):
        if layout == "flat" or len(shape) < 2:
            want = [[ref.sq_norm(v0)], [ref.sq_norm(v1)], [ref.dot(v0, v1)]]
        else:
            axis = 0 if layout == "columns" else -1
            want = [ref.sq_norm_rows(v0, axis).ravel(), ref.sq_norm_rows(v1, axis).ravel(),
                    ref.dot_rows(v0, v1, axis).ravel()]
    assert np.array_equal(drv.vector_sums, np.array(want, np.float64))


# ------------------------------------------------------------------ SLERP


def slerp_inputs(rng, shape, case):
    base = normal(rng, shape)
    other = {
        "random": lambda: normal(rng, shape),
        "close": lambda: (base + normal(rng, shape, 0.02)).astype(np.float32),
        "parallel": lambda: (base * np.float32(2.0)).astype(np.float32),
        "antiparallel": lambda: (-base).astype(np.float32),
        "zero-model": lambda: np.zeros(shape, np.float32),
    }
    if case == "zero-both":
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    if case == "zero-base":
        return np.zeros(shape, np.float32), normal(rng, shape)
    return base, other[case]()


@pytest.mark.parametrize("case", ["random", "close", "parallel", "antiparallel", "zero-model", "zero-base",
                                  "zero-both"])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 1.5, -0.25])
@pytest.mark.parametrize("shape,block,spans", [((333,), 16, 2), ((40, 37), 8, 5), ((3, 5, 7), BLOCK, None),
                                               ((1,), BLOCK, None)])
def test_slerp_matches_reference(case, t, shape, block, spans):
    rng = np.random.default_rng(7)
    base, other = slerp_inputs(rng, shape, case)
    got, stats, drv = merge("slerp", base, [other], {"t": t}, block=block, spans=spans)
    with grid(block):
        want = ref.slerp(base, other, t)
        n0, n1 = math.sqrt(ref.sq_norm(base)), math.sqrt(ref.sq_norm(other))
        c = ref.dot(base, other) / ((n0 if n0 > 1e-8 else 1.0) * (n1 if n1 > 1e-8 else 1.0))
    assert same(got, want)
    c = min(max(c, -1.0), 1.0)
    assert stats["lerped_count"] == (abs(c) > 0.9995) and stats["theta"] == math.degrees(math.acos(c))
    if case in ("parallel", "antiparallel"):
        assert stats["lerped"] == 1.0
    if case.startswith("zero"):
        assert stats["theta"] == 90.0 and stats["lerped"] == 0.0  # a zero tensor: theta = pi/2, not a lerp


def test_slerp_ends_are_the_inputs():
    rng = np.random.default_rng(3)
    base, other = normal(rng, (50, 20)), normal(rng, (50, 20))
    assert same(merge("slerp", base, [other], {"t": 0.0})[0], base)
    assert same(merge("slerp", base, [other], {"t": 1.0})[0], other)


def test_slerp_threshold_edges():
    """|cos| just below and just above 0.9995 take the two branches, as the reference."""
    rng = np.random.default_rng(5)
    u = normal(rng, (4000,))
    w = normal(rng, (4000,))
    w -= np.float32(np.dot(w, u) / np.dot(u, u)) * u  # roughly orthogonal to u
    for target in (0.99948, 0.99952):
        other = (np.float32(target) * u / np.float32(np.linalg.norm(u))
                 + np.float32(math.sqrt(1 - target**2)) * w / np.float32(np.linalg.norm(w))).astype(np.float32)
        got, stats, _ = merge("slerp", u, [other], {"t": 0.4})
        assert same(got, ref.slerp(u, other, 0.4))
        assert stats["lerped"] == (target > 0.9995)


# ------------------------------------------------------------------ NuSLERP


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("layout", ["flat", "rows", "columns"])
@pytest.mark.parametrize("shape,block,spans", [((333,), 16, 2), ((40, 37), 8, 5), ((40, 37), 16, 1),
                                               ((70, 19), 24, 3), ((5, 1), 8, 1), ((1, 9), 8, 1),
                                               ((3, 5, 7), 8, 2), ((2, 3, 41), BLOCK, None)])
def test_nuslerp_matches_reference(with_base, layout, shape, block, spans):
    rng = np.random.default_rng(11)
    base = normal(rng, shape)
    m0 = (base + normal(rng, shape, 0.05)).astype(np.float32)
    m1 = (base + normal(rng, shape, 0.05)).astype(np.float32)
    m1.reshape(-1)[: m1.size // 3] = m0.reshape(-1)[: m1.size // 3]  # some rows parallel (equal deltas)
    params = {"nuslerp_flatten": layout == "flat", "nuslerp_row_wise": layout == "columns"}
    w = [0.3, 0.9]
    got, stats, _ = merge("nuslerp", base if with_base else None, [m0, m1], params,
                          [{"weight": x} for x in w], block=block, spans=spans)
    with grid(block):
        want = ref.nuslerp([m0, m1], w, base if with_base else None, flatten=layout == "flat",
                           row_wise=layout == "columns")
    assert same(got, want)
    assert stats["t"] == ref.nuslerp_t(*w)


@pytest.mark.parametrize("w", [(1.0, -1.0), (1.0, 0.0), (0.0, 2.0), (-0.5, 2.0), (1.0, 1.0)])
def test_nuslerp_t_and_colinear_rows(w):
    """t from the weights (0.5 when they cancel); rows with parallel, antiparallel and
    zero vectors take the (1 - t, t) branch exactly where the reference does."""
    rng = np.random.default_rng(13)
    m0 = normal(rng, (6, 50))
    m1 = normal(rng, (6, 50))
    m1[0] = m0[0]  # parallel
    m1[1] = -m0[1]  # antiparallel
    m1[2] = 0.0  # a zero vector: cos 0, slerp branch
    m0[3] = m1[3] = 0.0
    m1[4] = m0[4] * np.float32(4.0)
    params = {"nuslerp_flatten": False}
    got, stats, _ = merge("nuslerp", None, [m0, m1], params, [{"weight": x} for x in w])
    want = ref.nuslerp([m0, m1], list(w), None, flatten=False)
    assert same(got, want)
    assert stats["t"] == ref.nuslerp_t(*w) and stats["vector_count"] == 6
    n0, n1 = np.sqrt(ref.sq_norm_rows(m0)), np.sqrt(ref.sq_norm_rows(m1))
    c = np.clip(ref.dot_rows(m0, m1) / (np.maximum(n0, 1e-7) * np.maximum(n1, 1e-7)), -1, 1)
    assert stats["lerped_count"] == int((1.0 - c * c <= 1e-16).sum())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 60), cols=st.integers(1, 60), depth=st.sampled_from([None, 1, 3]),
       block=st.sampled_from([8, 16, 24, 64]), spans=st.integers(1, 6), layout=st.sampled_from(["rows", "columns"]),
       with_base=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_nuslerp_property(rows, cols, depth, block, spans, layout, with_base, seed):
    shape = (rows, cols) if depth is None else (rows, depth, cols)
    rng = np.random.default_rng(seed)
    base = bf16(normal(rng, shape))
    m0, m1 = (bf16(base + normal(rng, shape, 0.01)) for _ in range(2))
    params = {"nuslerp_flatten": False, "nuslerp_row_wise": layout == "columns"}
    got, _, _ = merge("nuslerp", base if with_base else None, [m0, m1], params, [{"weight": 1.0}, {"weight": 3.0}],
                      block=block, spans=spans)
    with grid(block):
        want = ref.nuslerp([m0, m1], [1.0, 3.0], base if with_base else None, flatten=False,
                           row_wise=layout == "columns")
    assert same(got, want)


# ------------------------------------------------------------------ Model Stock


@pytest.mark.parametrize("n_models", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape,block,spans", [((333,), 16, 2), ((40, 37), 8, 5), ((5, 1), 8, 1),
                                               ((3, 5, 7), 8, 2), ((64, 64), BLOCK, None)])
def test_model_stock_matches_reference(n_models, filter_wise, shape, block, spans):
    rng = np.random.default_rng(17 + n_models)
    base = normal(rng, shape)
    shared = normal(rng, shape, 0.01)
    models = [(base + shared + normal(rng, shape, 0.01)).astype(np.float32) for _ in range(n_models)]
    got, stats, drv = merge("model_stock", base, models, {"filter_wise": filter_wise}, block=block, spans=spans)
    with grid(block):
        want = ref.model_stock(base, models, filter_wise=filter_wise)
    assert same(got, want)
    assert stats["t"] == pytest.approx(stock_t(base, models, filter_wise), abs=0, rel=1e-12)


def stock_t(base, models, filter_wise) -> float:
    """Model Stock's ratio t as docs/semantics.md §C defines it, averaged over rows (the statistic)."""
    N = len(models)
    ds = [m - base for m in models]
    rows = filter_wise and base.ndim >= 2
    norm = (lambda d: np.sqrt(ref.sq_norm_rows(d))) if rows else (lambda d: np.array([math.sqrt(ref.sq_norm(d))]))
    dot = (lambda a, b: ref.dot_rows(a, b)) if rows else (lambda a, b: np.array([ref.dot(a, b)]))
    norms = [norm(d).ravel() for d in ds]
    pairs = [(i, j) for i in range(N) for j in range(i + 1, N)]
    c = sum(np.clip(dot(ds[i], ds[j]).ravel() / np.maximum(norms[i] * norms[j], 1e-6), -1, 1) for i, j in pairs)
    c = c / len(pairs)
    den = 1 + (N - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, N * c / np.where(den == 0, 1, den))
    return float(t.astype(np.float32).astype(np.float64).mean())


@pytest.mark.parametrize("case", ["equal-to-base", "same-delta", "opposite", "one-zero-delta"])
def test_model_stock_degenerate(case):
    """Zero deltas give t = 0 (c_ij = 0); identical deltas t = 1; opposite deltas of two
    models make 1 + (N-1)c = 0: t = 0."""
    rng = np.random.default_rng(19)
    base = normal(rng, (30, 8))
    d = normal(rng, (30, 8), 0.1)
    models = {"equal-to-base": [base.copy(), base.copy()],
              "same-delta": [base + d, base + d],
              "opposite": [base + d, base - d],
              "one-zero-delta": [base + d, base.copy(), base - d * np.float32(0.5)]}[case]
    models = [m.astype(np.float32) for m in models]
    for filter_wise in (False, True):
        got, stats, _ = merge("model_stock", base, models, {"filter_wise": filter_wise})
        assert same(got, ref.model_stock(base, models, filter_wise=filter_wise))
    if case in ("equal-to-base", "opposite"):
        assert stats["t"] == 0.0
    if case == "same-delta":
        assert stats["t"] == 1.0


# ------------------------------------------------------------------ SCE


def sce_inputs(rng, n, nm, levels=12):
    """BF16 base and fine-tunes whose deltas take few values: many equal variances."""
    base = bf16(normal(rng, (n,), 0.02))
    lv = rng.normal(0, 1e-3, levels).astype(np.float32)
    models = []
    for _ in range(nm):
        d = rng.choice(lv, n) * rng.choice([-1, 1], n)
        d[rng.random(n) < 0.2] = 0
        models.append(bf16(base + d.astype(np.float32)))
    return base, models


def sce_selected(base, models, sigma) -> float:
    """k / n of the reference's variance selection (for the statistic)."""
    n = base.size
    if sigma >= 1:
        return 1.0
    if sigma <= 0:
        return 0.0
    taus = [(m - base).astype(np.float64) for m in models]
    mu = np.zeros(n)
    for t in taus:
        mu = mu + t
    mu = mu / len(taus)
    var = np.zeros(n)
    for t in taus:
        var = var + (t - mu) * (t - mu)
    var = var / len(taus)
    return ref.count_k(sigma, int(np.count_nonzero(var))) / n


@pytest.mark.parametrize("sigma", [1.0, 0.999, 0.5, 0.1, 1e-4, 0.0, -1.0])
@pytest.mark.parametrize("nm", [1, 2, 3])
@pytest.mark.parametrize("block,spans", [(8, 3), (64, 2), (BLOCK, None)])
@pytest.mark.parametrize("cache", [False, True])
def test_sce_matches_reference(sigma, nm, block, spans, cache):
    """The threshold found by radix passes alone, and (cache) by collecting the keys of its
    top-16-bit bucket."""
    rng = np.random.default_rng(23 + nm)
    base, models = sce_inputs(rng, 2000, nm)
    got, stats, drv = merge("sce", base, models, {"select_topk": sigma}, block=block, spans=spans, cache=cache)
    with grid(block):
        want = ref.sce(base, models, select_topk=sigma)
    assert same(got, want)
    assert stats["selected"] == sce_selected(base, models, sigma)
    assert ("sums" in drv.passes) == (stats["selected"] > 0)  # nothing selected: no q_i to reduce
    assert stats["passes"] == len(drv.passes) <= 6


def test_sce_collects_the_threshold_bucket_only_with_room():
    """With memory granted, one pass collecting the keys of the threshold's top-16-bit
    bucket replaces the further digit passes; without, the digit passes run. Same bytes."""
    rng = np.random.default_rng(24)
    base, models = sce_inputs(rng, 2000, 2)
    radix, _, plain = merge("sce", base, models, {"select_topk": 0.5})
    collected, _, drv = merge("sce", base, models, {"select_topk": 0.5}, cache=True)
    assert plain.passes == ["hist48", "hist32", "sums", "merge"]
    assert drv.passes == ["hist48", "collect", "sums", "merge"]
    assert same(radix, collected) and (plain.t, plain.tq, plain.tm) == (drv.t, drv.tq, drv.tm)


def test_sce_thins_ties_across_spans():
    """A boundary group of equal variances larger than a span: thinned evenly by flat
    index, the running ordinal carried across blocks and spans."""
    rng = np.random.default_rng(29)
    base, models = sce_inputs(rng, 5000, 3, levels=3)
    for sigma in (0.3, 0.55, 0.71):
        for cache in (False, True):
            got, _, drv = merge("sce", base, models, {"select_topk": sigma}, block=16, spans=5, cache=cache)
            with grid(16):
                assert same(got, ref.sce(base, models, select_topk=sigma))
            assert 0 < drv.tq < drv.tm, "the case must thin a tie group"


def test_sce_weights_and_zero_q():
    """omega_i = fl32(q_i / Q); all deltas zero: Q = 0 gives 1/N (mergekit's absolute
    1e-6 guard would also fire for small non-zero deltas: npmerge does not)."""
    rng = np.random.default_rng(31)
    base = normal(rng, (500,))
    tiny = [(base + normal(rng, (500,), 1e-4)).astype(np.float32) for _ in range(3)]
    got, stats, _ = merge("sce", base, tiny)
    assert same(got, ref.sce(base, tiny))
    taus = [m - base for m in tiny]
    q = [ref.sq_norm(t) / 500 for t in taus]
    assert sum(q) < 1e-6  # mergekit would use 1/N here
    Q = (0.0 + q[0]) + q[1] + q[2]
    assert [m["omega"] for m in stats["models"]] == [float(np.float32(x / Q)) for x in q]
    got, stats, _ = merge("sce", base, [base.copy(), base.copy()])
    assert same(got, ref.sce(base, [base.copy(), base.copy()]))
    assert [m["omega"] for m in stats["models"]] == [0.5, 0.5]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 900), nm=st.integers(1, 4), levels=st.integers(1, 20), block=st.sampled_from([8, 16, 32]),
       spans=st.integers(1, 8), sigma=st.sampled_from([0.05, 0.3, 0.5, 0.9, 1.0]), seed=st.integers(0, 2**32 - 1))
def test_sce_property(n, nm, levels, block, spans, sigma, seed):
    rng = np.random.default_rng(seed)
    base, models = sce_inputs(rng, n, nm, levels)
    got, _, _ = merge("sce", base, models, {"select_topk": sigma}, block=block, spans=spans, cache=seed % 2 == 0)
    with grid(block):
        assert same(got, ref.sce(base, models, select_topk=sigma))


# ------------------------------------------------------------------ no FMA


def fma_changes(a, x, b, y, want) -> bool:
    """Whether contracting a*x + b*y into fma(a, x, b*y) or fma(b, y, a*x) would change
    some float32 result: the exact product is in float64, the sum rounded once to float32
    (up to float64 double rounding, which at worst hides a case)."""
    ax = a.astype(np.float64) * x.astype(np.float64)
    by = b.astype(np.float64) * y.astype(np.float64)
    f1 = (ax + (b * y).astype(np.float64)).astype(np.float32)
    f2 = (by + (a * x).astype(np.float64)).astype(np.float32)
    return bool((bits(f1) != bits(want)).any() and (bits(f2) != bits(want)).any())


def test_no_fused_multiply_add():
    """The blends c0*v0 + c1*v1 (SLERP, NuSLERP), t*m + s*B (Model Stock) and SCE's
    weighted sums run through the real kernels on values where an FMA would change the
    float32 result: they must still equal the reference's separately rounded operations."""
    rng = np.random.default_rng(37)
    n = 20000
    base = normal(rng, (n,))
    other = (base * np.float32(1.0001) + normal(rng, (n,), 1e-3)).astype(np.float32)  # cos > 0.9995: a lerp
    t = 0.3141592
    got, stats, _ = merge("slerp", base, [other], {"t": t})
    assert stats["lerped"] == 1.0
    want = ref.slerp(base, other, t)
    assert same(got, want)
    c0, c1 = np.full(n, 1.0 - t, np.float32), np.full(n, t, np.float32)
    assert fma_changes(c0, base, c1, other, want)

    m1 = normal(rng, (n,))
    got, _, drv = merge("slerp", base, [m1], {"t": 0.3})  # the slerp branch
    want = ref.slerp(base, m1, 0.3)
    assert same(got, want) and fma_changes(np.full(n, drv.ca[0]), base, np.full(n, drv.cb[0]), m1, want)

    models = [(base + normal(rng, (n,), 0.1)).astype(np.float32) for _ in range(3)]
    got, _, drv = merge("model_stock", base, models)
    want = ref.model_stock(base, models)
    m = ((np.float32(0) + models[0]) + models[1] + models[2]) / np.float32(3)
    assert same(got, want) and fma_changes(np.full(n, drv.ca[0]), m, np.full(n, drv.cb[0]), base, want)

    got, _, drv = merge("nuslerp", None, models[:2], {}, [{"weight": 0.37}, {"weight": 0.5}])
    want = ref.nuslerp(models[:2], [0.37, 0.5])
    assert same(got, want) and fma_changes(np.full(n, drv.ca[0]), models[0], np.full(n, drv.cb[0]), models[1], want)

    got, _, _ = merge("sce", base, models)
    assert same(got, ref.sce(base, models))


# ------------------------------------------------------------------ non-finite inputs


def same_or_both_nan(a, b) -> bool:
    """Bitwise equal, except that any NaN matches any NaN (payloads are not specified)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    nan = np.isnan(a)
    return bool((nan == np.isnan(b)).all() and np.array_equal(bits(a[~nan]), bits(b[~nan])))


@pytest.mark.parametrize("method", ["slerp", "nuslerp", "model_stock", "sce"])
def test_nonfinite_inputs_follow_ieee(method):
    """With --allow-nonfinite, Inf/NaN flow through the sums and coefficients as IEEE
    arithmetic (the reference's rule for non-finite block sums) and the output matches
    the reference, NaN where it has NaN."""
    rng = np.random.default_rng(41)
    base = normal(rng, (300,))
    models = [(base + normal(rng, (300,), 0.1)).astype(np.float32) for _ in range(2)]
    models[0][[3, 200]] = [np.inf, -np.inf]
    models[1][17] = np.nan
    params, mp = {"slerp": ({"t": 0.3}, [{}]), "nuslerp": ({}, [{"weight": 1.0}, {"weight": 2.0}]),
                  "model_stock": ({}, [{}, {}]), "sce": ({}, [{}, {}])}[method]
    ms = models[:len(mp)]
    out, _ = run_arrays(method, base, ms, params, mp, allow_nonfinite=True, block=64)
    with grid(64):
        want = {"slerp": lambda: ref.slerp(base, ms[0], 0.3), "nuslerp": lambda: ref.nuslerp(ms, [1.0, 2.0], base),
                "model_stock": lambda: ref.model_stock(base, ms), "sce": lambda: ref.sce(base, ms)}[method]()
    assert np.isnan(want).any() and same_or_both_nan(out, want)


def test_sce_refuses_nan_variance():
    """keep(v, 0, k) has no rank for NaN: with a selection, a NaN variance is an error
    naming the tensor (only reachable with --allow-nonfinite)."""
    from npmerge.errors import IncompatibleModels

    rng = np.random.default_rng(43)
    base = normal(rng, (300,))
    models = [(base + normal(rng, (300,), 0.1)).astype(np.float32) for _ in range(2)]
    models[1][17] = np.nan
    with pytest.raises(IncompatibleModels, match="tensor 'tensor': SCE cannot rank elements by variance, 1 variance"):
        run_arrays("sce", base, models, {"select_topk": 0.5}, [{}, {}], allow_nonfinite=True)
    with pytest.raises(ValueError):
        ref.sce(base, models, select_topk=0.5)
    out, _ = run_arrays("sce", base, models, {"select_topk": 0.0}, [{}, {}], allow_nonfinite=True)
    assert same(out, ref.sce(base, models, select_topk=0.0))  # nothing to rank: the base
