"""The sparsifier family (DARE, breadcrumbs, DELLA and their _ties/_linear variants)
through the engine's span loop (run_arrays) against tests/reference.py, bit for bit:
Philox known answers and the docs/semantics.md §A.5 test vectors, rank selection with both
boundary groups thinned across spans and blocks, random masks independent of spans,
DELLA rows straddling spans (also from computed sources), rescale modes, statistics,
and the 5-sigma check of DARE/DELLA keep counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
from npmerge import kernels
from npmerge.constants import BLOCK
from npmerge.arrays import run_arrays
from npmerge.io import sources

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"

# docs/semantics.md §B, written out independently of npmerge's registry:
# method -> (sparsifier, consensus, normalize, rescale, per-model extra parameter)
TABLE = {
    "dare_ties": ("random", "sum", False, True, None),
    "dare_linear": ("random", None, False, True, None),
    "breadcrumbs": ("outliers", None, False, False, "gamma"),
    "breadcrumbs_ties": ("outliers", "sum", False, False, "gamma"),
    "della": ("della", "sum", True, True, "epsilon"),
    "della_linear": ("della", None, False, True, "epsilon"),
}
METHODS = list(TABLE)


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def merge(method, base, models, weights, densities, extra=None, *, name="t", span=None, block=BLOCK, cache=False, **g):
    """run_arrays with per-model weight/density (and gamma/epsilon); spans of about
    `span` elements rounded to whole blocks. Returns (output, stats, driver)."""
    key = TABLE[method][4]
    mp = []
    for i, (w, d) in enumerate(zip(weights, densities)):
        p = {"weight": w, "density": d}
        if key and extra is not None:
            p[key] = extra[i]
        mp.append(p)
    span = max(block, (span or models[0].size) // block * block)
    if TABLE[method][0] == "outliers":
        g.pop("seed", None)  # deterministic: breadcrumbs has no seed
    return run_arrays(method, base, models, g, mp, name=name, span=span, block=block, driver=True, driver_cache=cache)


def reference(method, base, models, weights, densities, extra=None, *, name="t", **g):
    sparsifier, consensus, normalize, rescale, key = TABLE[method]
    kw = dict(weights=weights, densities=densities, sparsifier=sparsifier, name=name,
              consensus=g.get("consensus", consensus) if consensus else None,
              normalize=g.get("normalize", normalize), rescale=g.get("rescale", rescale),
              lam=g.get("lambda", 1.0), seed=g.get("seed", 0))
    if key == "gamma" and extra is not None:
        kw["gammas"] = extra
    if key == "epsilon" and extra is not None:
        kw["epsilons"] = extra
    return ref.task_family(base, models, **kw)


def bf16_models(rng, shape, nm, distinct=40):
    """Base and fine-tunes quantised to BF16, deltas drawn from few magnitudes: heavy ties."""
    base = ref.to_f32_bf16(ref.from_f32_bf16(rng.normal(0, 0.02, shape).astype(np.float32)))
    levels = rng.normal(0, 1e-3, distinct).astype(np.float32)
    models = []
    for _ in range(nm):
        d = rng.choice(levels, shape) * rng.choice([-1, 1], shape)
        d[rng.random(shape) < 0.1] = 0
        models.append(ref.to_f32_bf16(ref.from_f32_bf16(base + d.astype(np.float32))))
    return base, models


def f32_models(rng, shape, nm):
    base = np.array(rng.normal(0, 0.02, shape), np.float32)
    return base, [np.array(base + rng.normal(0, 1e-3, shape), np.float32) for _ in range(nm)]


# ----------------------------------------------------------------------------- Philox


def test_philox_known_answers():
    """Random123's philox4x32-10 known-answer vectors, computed by the kernel."""
    p = kernels.load("philox")
    u = np.uint64
    for ctr, key, want in [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]:
        assert tuple(int(w) for w in p.philox(*map(u, ctr), *map(u, key))) == want


def test_semantics2_vectors():
    """Every stream id and u * 2**24 of docs/semantics.md §A's table, from the kernel module."""
    p = kernels.load("philox")
    assert p.stream(Q_PROJ, 0) == 0x6593CC1C7923F051
    assert p.stream("lm_head.weight", 2) == 0x44888830B22EDAE5
    assert p.stream("model.embed_tokens.weight", 1) == 0xBE2FBC2BEC504CD3
    table = [(0, Q_PROJ, 0, {0: 12885016, 1: 15125359, 2: 364251, 3: 11220107, 4: 13767954, 1000003: 10481241}),
             (42, "lm_head.weight", 2, {12345678: 2817663, 4294967301: 9085512}),
             (2**64 - 1, "model.embed_tokens.weight", 1, {7: 8641540})]
    out = np.zeros(8, np.uint32)
    for seed, name, i, values in table:
        for e, want in values.items():
            for lead in (0, 1, 3):  # the element first, second or fourth in the range asked for
                if e - lead < 0:
                    continue
                p.uniform24(np.uint64(seed), np.uint64(p.stream(name, i)), e - lead, lead + 1, out)
                assert int(out[lead]) == want, (seed, name, e, lead)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), start=st.integers(0, 2**40), n=st.integers(1, 70), i=st.integers(0, 9))
def test_uniform24_any_range(seed, start, n, i):
    p = kernels.load("philox")
    out = np.zeros(n, np.uint32)
    p.uniform24(np.uint64(seed), np.uint64(p.stream("a.b", i)), start, n, out)
    assert out.tolist() == ref.uniform24_array(seed, "a.b", i, n, start=start).tolist()


# ----------------------------------------------------------------------------- each method


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,span,block", [((7, 13), None, BLOCK), ((7, 13), 6, 3), ((3, 5, 11), 16, 4),
                                              ((160,), 32, 8), ((40, 1), 9, 3)])
def test_methods_match_reference(method, shape, span, block):
    rng = np.random.default_rng(5)
    base, models = bf16_models(rng, shape, 3, distinct=6)
    w, d = [1.0, 0.7, -0.4], [0.3, 0.5, 0.8]
    extra = [0.1, 0.05, 0.15] if TABLE[method][4] else None
    got, stats, _ = merge(method, base, models, w, d, extra, name="x.weight", span=span, block=block, seed=11)
    want = reference(method, base, models, w, d, extra, name="x.weight", seed=11)
    assert np.array_equal(bits(got), bits(want))
    kept = ref.task_family_stats(base, models, densities=d, sparsifier=TABLE[method][0],
                                 gammas=extra if TABLE[method][4] == "gamma" else None,
                                 epsilons=extra if TABLE[method][4] == "epsilon" else None, seed=11, name="x.weight")
    n = base.size
    assert [m["kept"] for m in stats["models"]] == [k["kept"] / n for k in kept]
    assert ("sign_conflict" in stats) == (TABLE[method][1] is not None)


@pytest.mark.parametrize("method,cache", [("dare_linear", False), ("della_linear", False), ("dare_ties", False),
                                          ("della", False), ("della_linear", True), ("della", True)])
@pytest.mark.parametrize("rescale", [True, "l1", "inverse", False])
def test_rescale_modes(method, cache, rescale):
    """Every rescale mode; DELLA also with the sums pass's masks kept for the merge pass
    (Driver.cache_bytes, granted by the budget)."""
    rng = np.random.default_rng(6)
    base, models = f32_models(rng, (9, 17), 2)
    w, d = [0.6, 1.3], [0.35, 0.6]
    extra = [0.2, 0.1] if TABLE[method][4] else None
    got, stats, drv = merge(method, base, models, w, d, extra, span=32, block=16, rescale=rescale, seed=3, cache=cache)
    assert (drv._kept_bits is not None) == (cache and rescale in (True, "l1") and "della" in method)
    want = reference(method, base, models, w, d, extra, rescale=True if rescale == "l1" else rescale, seed=3)
    assert np.array_equal(bits(got), bits(want))
    if rescale in (True, "l1"):  # the factor each model's kept deltas were multiplied by
        for i, m in enumerate(stats["models"]):
            tau = models[i] - base
            keep = ref.sparsify(tau, d[i], TABLE[method][0], epsilon=extra[i] if extra else 0.15, seed=3,
                                name="t", index=i)[1]
            assert m["rescale"] == float(np.float32(ref.l1(tau) / ref.l1(np.where(keep, tau, np.float32(0)))))
    else:
        assert all("rescale" not in m for m in stats["models"])


def test_breadcrumbs_both_boundaries_thinned_across_spans():
    """Heavy ties: the values at ranks m and m + k - 1 are both shared by many elements;
    both groups are thinned evenly, with ordinals carried over spans and blocks; the
    low-bits pass resolves boundaries the high bits do not (F32 deltas in one bucket)."""
    rng = np.random.default_rng(7)
    base, models = bf16_models(rng, 5000, 2, distinct=5)
    for span, block in [(None, BLOCK), (700, 64), (7, 3)]:
        got, _, drv = merge("breadcrumbs", base, models, [1.0, 1.0], [0.4, 0.3], [0.2, 0.35], span=span, block=block)
        assert np.array_equal(bits(got), bits(reference("breadcrumbs", base, models, [1.0, 1.0], [0.4, 0.3],
                                                        [0.2, 0.35])))
        sel = drv.sel
        assert ((sel["q_hi"] > 0) & (sel["q_hi"] < sel["m_hi"])).any(), "upper group thinned"
        assert ((sel["q_lo"] > 0) & (sel["q_lo"] < sel["m_lo"])).any(), "lower group thinned"
    # one value everywhere: both boundaries in one group, thinned once with q = k
    base = np.zeros(1000, np.float32)
    models = [np.full(1000, 0.5, np.float32) * np.where(np.arange(1000) % 3, 1, -1).astype(np.float32)]
    got, _, drv = merge("breadcrumbs", base, models, [1.0], [0.3], [0.25], span=64, block=16)
    assert np.array_equal(bits(got), bits(reference("breadcrumbs", base, models, [1.0], [0.3], [0.25])))
    assert drv.sel["t_hi"][0] == drv.sel["t_lo"][0] and drv.sel["q_hi"][0] == 300
    # the low-bits pass: F32 deltas that share a high-bits bucket
    base = np.zeros(3000, np.float32)
    models = [(1.0 + rng.integers(1, 2**16, 3000).astype(np.float32) * 2.0**-23).astype(np.float32)]
    got, _, drv = merge("breadcrumbs_ties", base, models, [1.0], [0.2], [0.1], span=512, block=32)
    assert "hist_lo" in drv.passes
    assert np.array_equal(bits(got), bits(reference("breadcrumbs_ties", base, models, [1.0], [0.2], [0.1])))


@pytest.mark.parametrize("gamma", [0.0, 1e-4, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_breadcrumbs_gamma_and_density_edges(gamma, density):
    """floor(gamma n) = 0 is TIES's trim; m + k reaching n drops only the top; density 0
    drops everything, density 1 nothing (gamma then has no effect)."""
    rng = np.random.default_rng(8)
    base, models = bf16_models(rng, 999, 2, distinct=30)
    got, _, _ = merge("breadcrumbs_ties", base, models, [1.0, 0.5], [density, 0.3], [gamma, gamma], span=200, block=50)
    want = reference("breadcrumbs_ties", base, models, [1.0, 0.5], [density, 0.3], [gamma, gamma])
    assert np.array_equal(bits(got), bits(want))


@pytest.mark.parametrize("layout", ["random", "few-values", "low-digit-only", "top-digit-only", "constant", "one"])
def test_della_row_order_is_a_stable_sort(layout):
    """DELLA's row ranking (an LSD radix sort that skips passes whose digit is constant,
    so the result lands in either buffer) equals a stable argsort of the magnitudes."""
    asc = kernels.load("masks").ascending
    rng = np.random.default_rng(7)
    C = 1 if layout == "one" else 5000
    mags = {"random": lambda: rng.integers(0, 2**31, C),
            "few-values": lambda: rng.choice([0, 5, 2**20, 2**30 + 3], C),
            "low-digit-only": lambda: rng.integers(0, 2**11, C),
            "top-digit-only": lambda: rng.integers(0, 2**9, C) << 22,
            "constant": lambda: np.full(C, 12345),
            "one": lambda: np.array([7])}[layout]().astype(np.uint32)
    order = np.empty(C, np.int64)
    got_keys = mags.copy()
    asc(got_keys, order, np.empty(C, np.uint32), np.empty(C, np.int64), np.empty((3, 2048), np.int64))
    assert np.array_equal(order, np.argsort(mags, kind="stable"))


def test_della_rows():
    """DELLA ranks within rows along the last axis: 1-D (one row), 3-D (not axis 1 as
    mergekit), rows of one element (p = density), rows straddling spans and blocks; and
    a 0-d tensor (one row of one element: as the same value in shape (1,); the reference
    takes arrays of at least one dimension)."""
    rng = np.random.default_rng(9)
    base, models = f32_models(rng, (), 1)
    for seed in range(20):
        got = merge("della", base, models, [1.0], [0.5], [0.3], seed=seed)[0]
        want = reference("della", base.reshape(1), [models[0].reshape(1)], [1.0], [0.5], [0.3], seed=seed)
        assert got.shape == () and np.array_equal(bits(got).reshape(1), bits(want))
    for shape, span, block in [((300,), 64, 16), ((4, 6, 25), 40, 8), ((50, 1), 16, 4), ((3, 700), 256, 64)]:
        base, models = f32_models(rng, shape, 2)
        for method in ("della", "della_linear"):
            got, _, drv = merge(method, base, models, [1.0, 0.8], [0.4, 0.7], [0.3, 0.2], span=span, block=block,
                                seed=2**63 + 5, rescale="inverse")
            want = reference(method, base, models, [1.0, 0.8], [0.4, 0.7], [0.3, 0.2], seed=2**63 + 5,
                             rescale="inverse")
            assert np.array_equal(bits(got), bits(want)), (shape, method)
            assert drv.whole_rows == (shape[-1] if shape and shape[-1] > 1 else 0)


def test_whole_rows_of_computed_sources(monkeypatch):
    """A source without raw storage is materialised for every row a span touches, so
    DELLA can rank an element within its whole row (Driver.whole_rows)."""
    monkeypatch.setattr(sources.ArraySource, "raw", lambda self: None)
    rng = np.random.default_rng(10)
    base, models = f32_models(rng, (6, 50), 2)
    got, _, _ = merge("della", base, models, [1.0, 1.0], [0.5, 0.5], [0.2, 0.2], span=32, block=8, seed=4)
    assert np.array_equal(bits(got), bits(reference("della", base, models, [1.0, 1.0], [0.5, 0.5], [0.2, 0.2],
                                                    seed=4)))


def test_masks_depend_on_seed_tensor_and_model_only():
    """Same seed, tensor name and model: the same mask whatever the span; a different seed
    or name: a different mask; the stream index is the model's position."""
    rng = np.random.default_rng(11)
    base, models = f32_models(rng, 4000, 2)
    a = merge("dare_linear", base, models, [1.0, 1.0], [0.5, 0.5], span=4000, name="n1", seed=1)[0]
    assert np.array_equal(bits(a), bits(merge("dare_linear", base, models, [1.0, 1.0], [0.5, 0.5], span=96, block=32,
                                              name="n1", seed=1)[0]))
    assert not np.array_equal(bits(a), bits(merge("dare_linear", base, models, [1.0, 1.0], [0.5, 0.5], name="n1",
                                                  seed=2)[0]))
    assert not np.array_equal(bits(a), bits(merge("dare_linear", base, models, [1.0, 1.0], [0.5, 0.5], name="n2",
                                                  seed=1)[0]))


def test_consensus_count_normalize_lambda():
    rng = np.random.default_rng(13)
    base, models = bf16_models(rng, (20, 30), 3, distinct=10)
    w, d = [1.0, -0.5, 2.0], [0.6, 0.4, 0.5]
    for method in ("dare_ties", "breadcrumbs_ties", "della"):
        extra = [0.1, 0.1, 0.1] if TABLE[method][4] else None
        for g in ({"consensus": "count", "normalize": True, "lambda": 0.7}, {"normalize": False, "lambda": -1.5}):
            got = merge(method, base, models, w, d, extra, span=128, block=32, seed=99, **g)[0]
            assert np.array_equal(bits(got), bits(reference(method, base, models, w, d, extra, seed=99, **g)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(METHODS),
    shape=st.sampled_from([(1,), (37,), (200,), (5, 1), (6, 9), (2, 3, 17), (4, 1, 8), (33, 12)]),
    nm=st.integers(1, 3),
    distinct=st.integers(1, 20),
    data_seed=st.integers(0, 2**32 - 1),
    seed=st.integers(0, 2**64 - 1),
    chunk=st.integers(1, 300),
    block=st.integers(1, 40),
    normalize=st.booleans(),
    data=st.data(),
)
def test_family_property(method, shape, nm, distinct, data_seed, seed, chunk, block, normalize, data):
    rng = np.random.default_rng(data_seed)
    base, models = bf16_models(rng, shape, nm, distinct)
    w = data.draw(st.lists(st.sampled_from([1.0, 0.5, -0.3, 2.0, 0.0]), min_size=nm, max_size=nm))
    key = TABLE[method][4]
    if key == "epsilon":  # within DELLA's bounds (or density 0 / >= 1, where they do not apply)
        d = data.draw(st.lists(st.sampled_from([0.0, 0.2, 0.5, 0.7, 1.0, 1.5]), min_size=nm, max_size=nm))
        extra = [data.draw(st.sampled_from([0.0, 0.05, 0.19])) for _ in range(nm)]
    else:
        d = data.draw(st.lists(st.sampled_from([0.0, 1.0, 0.9, 0.5, 0.2, 0.01, 1e-6, 0.333]), min_size=nm,
                               max_size=nm))
        extra = data.draw(st.lists(st.sampled_from([0.0, 1e-6, 0.01, 0.3, 0.6, 1.0]), min_size=nm, max_size=nm))
        extra = extra if key else None
    g = {"normalize": normalize, "seed": seed} if TABLE[method][0] != "outliers" else {"normalize": normalize}
    if TABLE[method][0] != "outliers":
        g["rescale"] = data.draw(st.sampled_from([True, False, "inverse"]))
    else:
        g["rescale"] = data.draw(st.booleans())
    got = merge(method, base, models, w, d, extra, span=chunk, block=block, **g)[0]
    want = reference(method, base, models, w, d, extra, **g)
    assert np.array_equal(bits(got), bits(want))


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("method,density,extra", [("dare_linear", 0.1, None), ("dare_linear", 0.5, None),
                                                  ("dare_ties", 0.9, None), ("della_linear", 0.3, [0.2, 0.2, 0.2]),
                                                  ("della", 0.6, [0.35, 0.35, 0.35])])
@pytest.mark.parametrize("seed", [0, 1234567, 2**64 - 1])
def test_keep_counts_within_five_sigma(method, density, extra, seed):
    """docs/semantics.md §A: per tensor and model the kept count is within 5 sigma of sum p
    (sigma^2 = sum p(1 - p)), the check npmerge's masks share with mergekit's."""
    rng = np.random.default_rng(14)
    base, models = f32_models(rng, (256, 1024), 3)
    _, stats, _ = merge(method, base, models, [1.0] * 3, [density] * 3, extra, name="model.layers.3.mlp.up_proj.weight",
                        seed=seed)
    n = base.size
    for i, m in enumerate(stats["models"]):
        if TABLE[method][0] == "random":
            p_sum, p_var = n * density, n * density * (1 - density)
        else:
            p = ref.della_probabilities(models[i] - base, density, extra[i])
            p_sum, p_var = math.fsum(p.ravel().tolist()), math.fsum((p * (1 - p)).ravel().tolist())
        kept = round(m["kept"] * n)
        assert abs(kept - p_sum) <= 5 * math.sqrt(p_var), (i, kept, p_sum)


@pytest.mark.parametrize("method,g", [("dare_ties", {}), ("dare_linear", {"rescale": False}), ("breadcrumbs", {}),
                                      ("della", {})])
@pytest.mark.parametrize("span,block", [(None, BLOCK), (48, 16), (10, 5)])
def test_first_pass_checks(method, g, span, block):
    """Whichever pass comes first (sums, hist_hi or merge) runs the engine's checks: the
    task-vector norms, and NaN/Inf inputs refused."""
    from npmerge.errors import IncompatibleModels

    rng = np.random.default_rng(15)
    base, models = f32_models(rng, (12, 20), 2)
    extra = [0.1, 0.1] if TABLE[method][4] else None
    _, stats, _ = merge(method, base, models, [1.0, 1.0], [0.5, 0.5], extra, span=span, block=block, **g)
    for m, x in zip(stats["models"], models):
        tau = (x - base).astype(np.float64)
        assert m["l2"] == pytest.approx(math.sqrt(math.fsum((tau * tau).ravel().tolist())), rel=1e-12)
    models[1][3, 7] = np.nan
    with pytest.raises(IncompatibleModels, match="model 2 .* 1 NaN/Inf"):
        merge(method, base, models, [1.0, 1.0], [0.5, 0.5], extra, span=span, block=block, **g)
