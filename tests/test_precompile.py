"""The precompile helper (npmerge/precompile.py): a merge's later kernels compiled by a
second process while the first pass runs, by feeding each method's driver an empty span."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from npmerge import kernels, precompile
from npmerge.methods import registry
from npmerge.methods.protocol import TensorContext

PARAMS = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.001}, "nuslerp": {"nuslerp_flatten": False}, "sce": {"select_topk": 0.5}}


def spec(method: str, dtype: str = "BF16") -> dict:
    m = registry.get(method)
    count = m.max_models or 3
    names = {p.name for p in m.model_params}
    per_model = {k: v for k, v in {"density": 0.5, "weight": 1.0}.items() if k in names}
    g, mp = m.resolve(dict(PARAMS.get(method, {})), [dict(per_model) for _ in range(count)], cross_check=False)
    return {"method": m.name, "params": g, "model_params": tuple(mp), "shape": (40, 24), "has_base": m.base != "none",
            "base_dtype": dtype if m.base != "none" else None, "model_dtype": dtype, "out_dtype": dtype}


@pytest.mark.parametrize("method", sorted(registry.all_methods()))
def test_every_method_feeds_its_later_passes_an_empty_span(method):
    """Every driver takes every pass on an empty span without touching data (kernels called
    on empty pieces): what the helper does, here in-process with the kernels compiled."""
    precompile.compile_later_passes(spec(method))


def test_later_kernels_are_the_ones_the_first_pass_does_not_run():
    s = spec("ties")
    drv = registry.get("ties").driver(TensorContext("t", (40, 24), 960, s["params"], s["model_params"], True, 2,
                                                    (0, 1, 2)))
    assert drv.passes[0] == "hist_hi" and precompile._later_kernels(drv) == ["family.merge_rank"]


def test_helper_compiles_into_the_cache(tmp_path):
    """The helper process, with an empty kernel cache, leaves the merge kernel of TIES there
    (and compiles nothing of the first pass)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "npmerge.precompile"], input=pickle.dumps(spec("ties")),
                          capture_output=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    names = {p.name.split("-")[0] for p in tmp_path.rglob("*.nbi")}
    assert "family.merge_rank" in names and "family.hist" not in names
    assert kernels.is_cached("family.merge_rank")  # this process: the session's cache
