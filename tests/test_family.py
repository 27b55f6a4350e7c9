"""The TIES-family kernels (exact selection + fused merge) against tests/reference.py,
bit for bit, over chunked streams: heavy BF16 ties, tie groups spanning chunk and
block boundaries, k = 0, density 1, negative weights, one model, 1-D tensors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
from npmerge.constants import BLOCK
from npmerge.arrays import run_arrays
from npmerge.methods import family, registry


def run_family(method_name, base, models, weights, densities=None, *, chunk=None, block=None, **gparams):
    """Run a method through the engine's span loop on in-memory float32 tensors; spans of
    about `chunk` elements (rounded to whole blocks) and kernel blocks of `block`."""
    method = registry.get(method_name)
    names = {q.name for q in method.model_params}
    model_params = [{k: v for k, v in {"weight": w, "density": d}.items() if k in names}
                    for w, d in zip(weights, densities or [1.0] * len(weights))]
    block = block or BLOCK
    span = max(block, (chunk or models[0].size) // block * block)
    out, _, drv = run_arrays(method_name, base, models, gparams, model_params, span=span, block=block, driver=True)
    return out, drv


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def bf16_models(rng, n, nm, distinct=40):
    """Base and fine-tunes quantised to BF16, with deltas drawn from few magnitudes: heavy ties."""
    base = ref.to_f32_bf16(ref.from_f32_bf16(rng.normal(0, 0.02, n).astype(np.float32)))
    levels = rng.normal(0, 1e-3, distinct).astype(np.float32)
    models = []
    for _ in range(nm):
        d = rng.choice(levels, n) * rng.choice([-1, 1], n)
        d[rng.random(n) < 0.1] = 0
        models.append(ref.to_f32_bf16(ref.from_f32_bf16(base + d.astype(np.float32))))
    return base, models


def test_hand_example_matches_reference():
    base = np.zeros(6, np.float32)
    m = [np.array([0.1, -0.5, 0.3, -0.3, 0.3, 0.2], np.float32)]
    out, tm = run_family("ties", base, m, [1.0], [0.5])
    assert np.array_equal(out != 0, [False, True, False, True, True, False])
    assert tm.k == [3] and tm.tq[0] == 2 and tm.tm[0] == 3


@pytest.mark.parametrize("chunk,block", [(None, None), (7, 3), (64, 16), (1000, 128)])
@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties_heavy_ties_chunked(chunk, block, consensus):
    rng = np.random.default_rng(1)
    base, models = bf16_models(rng, 5000, 3, distinct=12)
    w, d = [1.0, 0.7, -0.4], [0.2, 0.5, 0.05]
    got, tm = run_family("ties", base, models, w, d, chunk=chunk, block=block, consensus=consensus, **{"lambda": 0.8})
    want = ref.ties(base, models, w, d, lam=0.8, consensus=consensus)
    assert np.array_equal(bits(got), bits(want))
    assert (tm.tm > tm.tq).any() and (tm.tq > 0).any(), "the case must exercise thinning of ties"
    stats = ref.ties_stats(base, models, w, d, consensus=consensus)
    mine = tm.stats()
    assert mine["sign_conflict"] == pytest.approx(stats["sign_conflict"], abs=0)
    for a, b in zip(mine["models"], stats["models"]):
        assert a["kept"] == b["kept"] and a["excluded"] == pytest.approx(b["excluded"], abs=0)


def test_ties_edge_densities_and_single_model():
    rng = np.random.default_rng(2)
    base, models = bf16_models(rng, 999, 1)
    for d in (1.0, 1e-9, 0.5, 0.999):
        got, _ = run_family("ties", base, models, [1.0], [d], chunk=100, block=10)
        assert np.array_equal(bits(got), bits(ref.ties(base, models, [1.0], [d])))


def test_all_zero_deltas_give_the_base():
    base = np.linspace(-1, 1, 300).astype(np.float32)
    got, tm = run_family("ties", base, [base.copy(), base.copy()], [1.0, 1.0], [0.3, 0.3])
    assert np.array_equal(bits(got), bits(base))
    assert tm.stats()["sign_conflict"] == 0


@pytest.mark.parametrize("normalize", [True, False])
def test_task_arithmetic_and_linear(normalize):
    rng = np.random.default_rng(3)
    base, models = bf16_models(rng, 3000, 3, distinct=200)
    w = [0.5, -0.25, 1.5]
    got, _ = run_family("task_arithmetic", base, models, w, chunk=333, normalize=normalize, **{"lambda": 0.5})
    assert np.array_equal(bits(got), bits(ref.task_arithmetic(base, models, w, lam=0.5, normalize=normalize)))
    got, _ = run_family("linear", None, models, w, chunk=333, normalize=normalize)
    assert np.array_equal(bits(got), bits(ref.linear(models, w, normalize=normalize)))


def test_zero_weight_sum_divides_by_one():
    rng = np.random.default_rng(4)
    base, models = bf16_models(rng, 100, 2)
    got, _ = run_family("linear", None, models, [1.0, -1.0], normalize=True)
    assert np.array_equal(bits(got), bits(ref.linear(models, [1.0, -1.0], normalize=True)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 700),
    nm=st.integers(1, 4),
    distinct=st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
    chunk=st.integers(1, 800),
    block=st.integers(1, 64),
    consensus=st.sampled_from(["sum", "count"]),
    normalize=st.booleans(),
    data=st.data(),
)
def test_ties_property(n, nm, distinct, seed, chunk, block, consensus, normalize, data):
    rng = np.random.default_rng(seed)
    base, models = bf16_models(rng, n, nm, distinct)
    w = data.draw(st.lists(st.sampled_from([1.0, 0.5, -0.3, 2.0, 0.0]), min_size=nm, max_size=nm))
    d = data.draw(st.lists(st.sampled_from([1.0, 0.9, 0.5, 0.2, 0.01, 1e-6, 0.333]), min_size=nm, max_size=nm))
    got, _ = run_family("ties", base, models, w, d, chunk=chunk, block=block, consensus=consensus, normalize=normalize)
    want = ref.ties(base, models, w, d, consensus=consensus, normalize=normalize)
    assert np.array_equal(bits(got), bits(want))


def _threshold(delta: np.ndarray, k: int) -> tuple[int, int, int]:
    """(bits of the k-th largest |delta|, how many equal it, how many of those are kept), by sorting."""
    mags = np.sort(bits(np.abs(delta)).ravel())[::-1]
    t = int(mags[k - 1])
    return t, int(np.count_nonzero(mags == t)), k - int(np.count_nonzero(mags > t))


def test_low_bits_pass_runs_only_when_needed():
    """The high-bits pass also counts each bucket's elements with non-zero low bits; when the
    k-th largest is the bucket's floor value the low-bits pass is skipped. Thresholds must
    be the exact ones either way: per model, in one tensor mixing both cases."""
    rng = np.random.default_rng(7)
    n = 20_000
    base = np.zeros(n, np.float32)
    # model 1: BF16-like deltas (low 16 bits zero) -> floor of its bucket, no low-bits pass
    d1 = ref.to_f32_bf16(ref.from_f32_bf16(rng.normal(0, 1e-3, n).astype(np.float32)))
    # model 2: 100 elements just above 1.0 (same bucket, non-zero low bits) over 1.0s, k = 50:
    # the k-th largest is one of them, so this model needs the low-bits pass
    d2 = np.where(rng.random(n) < 0.5, 1.0, -1.0).astype(np.float32)
    d2[rng.choice(n, 100, replace=False)] = 1.0 + np.arange(1, 101, dtype=np.float32) * 2 ** -23
    density2 = 50 / n
    models = [base + d1, base + d2]
    for densities, needs_lo in (([0.2, 0.2], False), ([0.2, density2], True)):
        out, tm = run_family("ties", base, models, [1.0, 1.0], densities, chunk=4096, block=1024)
        assert ("hist_lo" in tm.passes) == needs_lo
        for i, d in enumerate((d1, d2)):
            k = family.keep_count(densities[i], n)
            assert (int(tm.tbits[i]), int(tm.tm[i]), int(tm.tq[i])) == _threshold(d, k)
        assert np.array_equal(bits(out), bits(ref.ties(base, models, [1.0, 1.0], densities)))
