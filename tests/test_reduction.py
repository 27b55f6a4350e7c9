"""The reduction rule's host side (npmerge/reduction.py) against tests/reference.py and
hand cases: one home for combining lanes and adding block sums exactly, non-finite
values included (docs/semantics.md §A.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from npmerge import kernels
from npmerge.reduction import combine_lanes, exact_sum

FINITE = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)


@settings(max_examples=200, deadline=None)
@given(st.lists(FINITE, max_size=30))
def test_exact_sum_is_the_reference_and_the_kernel(values):
    out = np.empty(1)
    kernels.load("reduce").exact_rows(np.array([values], np.float64).reshape(1, -1), out)
    assert exact_sum(values) == ref._exact_sum(values) == out[0]


@pytest.mark.parametrize("values,want", [([1e16, 1.0, -1e16], 1.0), ([math.inf, 1.0], math.inf),
                                         ([-math.inf, 2.0, -math.inf], -math.inf), ([], 0.0)])
def test_exact_sum_hand_cases(values, want):
    assert exact_sum(values) == want


def test_exact_sum_of_opposite_infinities_is_nan():
    assert math.isnan(exact_sum([math.inf, 1.0, -math.inf]))  # math.fsum raises here
    assert math.isnan(ref._exact_sum([math.inf, 1.0, -math.inf]))


def test_combine_lanes_is_the_fixed_pairing():
    rng = np.random.default_rng(1)
    lanes = rng.standard_normal((5, 8)) * 10.0 ** rng.integers(-20, 20, (5, 8))
    want = [((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])) for a in lanes.tolist()]
    assert combine_lanes(lanes).tolist() == want
