"""Plain-NumPy reference implementation of npmerge's merge math.

This module is the executable form of docs/semantics.md. It is written for
clarity, not speed: whole tensors, ``np.sort`` and Python integers. It deliberately
imports nothing from ``npmerge`` and does not use Numba, so that the production kernels
can be checked against an independent implementation. The kernels and the end-to-end
CLI must match the float32 results of this module **bit for bit**.

Conventions fixed here (the kernels must follow them exactly)
-------------------------------------------------------------

Inputs
    ``base`` and ``models`` are float32 arrays of one shape, already decoded (BF16 by
    bit shift, see :func:`to_f32_bf16`). Anything else is a ``TypeError`` /
    ``ValueError``: float64 must never sneak in. The result is float32; rounding to the
    output dtype (e.g. :func:`from_f32_bf16`) is a separate, single step.

Scalars
    Every weight ``w_i`` and ``lam`` is rounded to float32 once, ``np.float32(w)``,
    before it touches a tensor. All tensor arithmetic is float32, IEEE round-to-nearest-
    even, one rounding per operation: a product ``w * x`` is rounded before it is
    added (no fused multiply-add; production code must not contract ``a*b + c``).
    Divisions are true float32 divisions (not multiplication by a reciprocal).

Accumulation order (the bit-exact contract)
    Every sum over models is accumulated element-wise as::

        acc = float32 zeros (+0.0)
        for i in 0 .. n_models-1:          # the order the models were given
            acc = acc + term_i             # one float32 rounding per addition

    i.e. ``((((+0.0 + t_0) + t_1) + t_2) + ...)``. Starting from +0.0 (rather than
    from ``t_0``) only matters for signed zeros: ``+0.0 + (-0.0) = +0.0``, so an
    accumulator is never -0.0. This applies to: the TIES vote sum S, the TIES merged
    delta and divisor D, the task-arithmetic delta, the linear sum R, and the scalar
    weight sums W (accumulated from ``np.float32(0)`` the same way).

    TIES: ``delta = (((0 + where(a_0,u_0,0)) + where(a_1,u_1,0)) + ...)``;
    ``D = (((0 + where(a_0,w_0,0)) + where(a_1,w_1,0)) + ...)``;
    if normalize: ``D = where(D == 0, 1, D)``, ``delta = delta / D``;
    then ``delta = float32(lam) * delta`` (always, also for lam == 1, which is exact);
    result ``= B + delta``.

    Task arithmetic: ``delta = ((0 + f32(w_0)*tau_0) + f32(w_1)*tau_1) + ...``;
    if normalize: ``delta = delta / W``; result ``= B + f32(lam) * delta``.

    Linear: ``R = ((0 + f32(w_0)*X_0) + f32(w_1)*X_1) + ...``; if normalize ``R = R / W``.

Small weight sums
    ``W`` is the float32 sum of the float32 weights (order as above). The rule
    "|W| < 1e-8 -> use 1" is evaluated on the exact value of the float32 ``W`` against
    the real number 1e-8 (``abs(float(W)) < 1e-8``, a float64 comparison, which is exact
    here). Note ``np.float32(1e-8) = 9.99999993922529e-09 < 1e-8``, so a W equal to
    ``float32(1e-8)`` is replaced by 1 (a float32 comparison, e.g. under NumPy 2's
    NEP 50 or in torch, would say otherwise).

Signs
    ``sign(x)`` is +1 for x > 0, -1 for x < 0 and 0 otherwise (0, -0.0 and NaN): zero
    and NaN never agree with an elected sign.

Non-finite values
    docs/semantics.md makes them an error unless the user opts in, and does not define TIES
    trimming over NaN magnitudes; :func:`trim_mask` raises ``ValueError`` on NaN when it
    has to rank magnitudes (density < 1). Everything else just follows IEEE float32
    (floating-point warnings are silenced: the IEEE result is the defined result).

docs/semantics.md §A-§C (the second half of this module)
-----------------------------------------------

Everything above stands; the second half adds the methods and rules of docs/semantics.md §A-§C
with these further conventions (each function's docstring repeats what it needs):

Reductions (:func:`reduce_sum` and the functions built on it)
    Every sum over the *elements* of a tensor (||x||^2, <x, y>, sum |x|, mean squares):
    float64 terms (exact for squares / products / magnitudes of float32 values); blocks
    of ``BLOCK = 16384`` consecutive elements (by flat index, or by the index inside the
    vector for per-row / per-column sums); in a block, element e goes to lane
    ``A[e % 8]``, lanes start at +0.0 and add in increasing e (one float64 rounding per
    addition); block sum ``((A0+A1)+(A2+A3))+((A4+A5)+(A6+A7))``; the block sums are added
    exactly and rounded once (``math.fsum``). ||x|| = ``math.sqrt`` of that.

Scalars
    Coefficients (cosines, angles, interpolation and rescale factors, SCE weights) are
    Python floats (IEEE float64, one rounding per operation, in the order the docstring
    writes) and are rounded to float32 exactly once, ``np.float32(c)``, before they touch
    a tensor. Transcendentals are the C library's (``math.acos``, ``math.sin``; the
    production code must compute these scalars with Python's ``math`` too, not with
    NumPy's SIMD ufuncs, whose last bit can differ); ``math.sqrt`` is correctly rounded.

Element-wise work
    float32, one rounding per operation, in the order written, no FMA; sums over models
    from +0.0 in model order (as above). Elements a sparsifier drops become +0.0 (not
    ``0 * tau``), and a rescale factor multiplies only kept elements.

Shapes
    "Rows along the last axis" are ``x.reshape(-1, x.shape[-1])``; "vectors along axis
    0" are ``x.reshape(x.shape[0], -1)``'s columns; a 1-D tensor is one row/vector, a 0-d
    tensor one row of one element.

Decisions where docs/semantics.md is silent (each also in the function's docstring)
    - Non-finite block sums: IEEE (NaN, or the infinity) instead of fsum's exceptions.
    - Dropped elements are +0.0; rescale factors multiply kept elements only (so a 0 * Inf
      can never appear); 'inverse' with magnitude/outliers (no keep probability) is an
      error.
    - The random stream index i is the position in the ``models`` list passed in.
    - SCE: Q = ((0.0 + q_0) + q_1) + ... in float64, model order; mu and v likewise
      from 0.0 in model order; NaN variance is an error (no rank).
    - Model Stock: c = (((0.0 + c_01) + c_02) + ...) / P over pairs in lexicographic order.
    - NuSLERP: t from the recipe weights in float64 (not from fl32 weights). Its colinear
      rule 1 - c*c <= 1e-16 holds in float64 only for |c| == 1 exactly.
    - Gradients: t outside [0, 1] and lists mixing booleans with numbers are errors.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

import numpy as np

__all__ = [
    "to_f32_bf16",
    "from_f32_bf16",
    "trim_mask",
    "ties",
    "task_arithmetic",
    "linear",
    "ties_stats",
    # docs/semantics.md §A-§C
    "BLOCK",
    "reduce_sum",
    "reduce_rows",
    "sq_norm",
    "dot",
    "l1",
    "sq_norm_rows",
    "dot_rows",
    "l1_rows",
    "count_k",
    "keep_range",
    "fnv1a64",
    "philox4x32_10",
    "uniform24",
    "uniform24_array",
    "random_keep",
    "della_probabilities",
    "sparsify",
    "task_family",
    "task_family_stats",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "nuslerp_t",
    "nuslerp",
    "model_stock",
    "sce",
    "passthrough",
    "nearswap",
    "ram_counts",
    "ramplus_lambda",
    "ram",
    "multislerp64",
    "karcher64",
    "combine",
    "fusion_row_kl",
    "arcee_fusion",
    "arcee_fusion_mask64",
    "NO_MATCH",
    "layer_t",
    "gradient_value",
    "first_match",
    "evaluate_setting",
    "resolve_parameter",
    # tokenizer_source (issue 16)
    "read_vocabulary",
    "output_vocabulary",
    "permuted_rows",
]

_F32 = np.dtype(np.float32)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


# ----------------------------------------------------------------------------- helpers


def _check_f32(name: str, x) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != _F32:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"{name} must be a float32 ndarray, got {got}")
    return x


def _check_inputs(base, models, per_model: dict) -> None:
    _check_f32("base", base)
    if len(models) == 0:
        raise ValueError("at least one model is required")
    for i, m in enumerate(models):
        _check_f32(f"models[{i}]", m)
        if m.shape != base.shape:
            raise ValueError(f"models[{i}] has shape {m.shape}, base has {base.shape}")
    for pname, values in per_model.items():
        if len(values) != len(models):
            raise ValueError(f"{pname}: {len(values)} values for {len(models)} models")


def _sign(x: np.ndarray) -> np.ndarray:
    """+1 / -1 / 0 as int8; 0 for +-0.0 and NaN (zero is neither sign)."""
    return (x > 0).astype(np.int8) - (x < 0).astype(np.int8)


def _weight_sum(weights) -> np.float32:
    """W = ((0 + f32(w_0)) + f32(w_1)) + ... in float32; |W| < 1e-8 (exact compare) -> 1."""
    W = _ZERO
    for w in weights:
        W = np.float32(W + np.float32(w))
    if abs(float(W)) < 1e-8:
        W = _ONE
    return W


# ------------------------------------------------------------------------------- BF16


def to_f32_bf16(bits_u16: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (uint16) -> float32, exactly: the 16 bits become the high half."""
    bits = np.asarray(bits_u16)
    if bits.dtype != np.uint16:
        raise TypeError(f"expected uint16 bit patterns, got {bits.dtype}")
    wide = bits.astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32)


def from_f32_bf16(x_f32: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bit patterns (uint16), round-to-nearest-even.

    Finite values and infinities: ``(b + 0x7FFF + ((b >> 16) & 1)) >> 16`` on the uint32
    bits ``b`` (values past the BF16 range round to +-Inf, as IEEE RNE does). NaN (any
    payload, quiet or signalling) becomes the quiet NaN ``0x7FC0`` with its sign bit
    kept: ``0x7FC0 | (sign << 15)``.
    """
    x = np.asarray(x_f32)
    if x.dtype != _F32:
        raise TypeError(f"expected float32, got {x.dtype}")
    b = np.ascontiguousarray(x).view(np.uint32)
    is_nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    # Keep NaN bit patterns out of the addition (they would wrap around uint32).
    b_num = np.where(is_nan, np.uint32(0), b)
    lsb = (b_num >> np.uint32(16)) & np.uint32(1)
    rounded = (b_num + np.uint32(0x7FFF) + lsb) >> np.uint32(16)
    quiet_nan = np.uint32(0x7FC0) | ((b >> np.uint32(16)) & np.uint32(0x8000))
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16)


# ------------------------------------------------------------------------------- trim


def trim_k(n: int, density) -> int:
    """k = number of elements kept out of n (docs/semantics.md §2, step 1).

    density >= 1 keeps all n; otherwise k = floor(float(density) * n) computed in
    float64 (Python float), clamped to [0, n].
    """
    d = float(density)
    if d >= 1.0:
        return n
    k = math.floor(d * n)
    return min(max(k, 0), n)


def _tie_keep(m: int, q: int) -> list[bool]:
    """Which of m tied elements (in flat order) are kept when q of them must be:
    the j-th is kept iff (j+1)*q // m > j*q // m, exact Python-int arithmetic."""
    return [(j + 1) * q // m > j * q // m for j in range(m)]


def trim_mask(tau: np.ndarray, density: float) -> np.ndarray:
    """Bool mask (shaped like tau) of the elements TIES keeps, docs/semantics.md §2, step 1.

    Over the flattened tensor of n elements: k = trim_k(n, density). density >= 1 keeps
    all; k == 0 keeps none. Otherwise t = the exact k-th largest float32 magnitude
    |tau|; every |tau| > t is kept; of the m elements with |tau| == t (j = 0..m-1 in
    flat-index order) q = k - #{|tau| > t} are kept, the j-th iff
    (j+1)*q // m > j*q // m.
    """
    tau = _check_f32("tau", tau)
    flat = tau.ravel()
    n = flat.size
    k = trim_k(n, density)
    if k >= n:
        return np.ones(tau.shape, dtype=bool)
    if k == 0:
        return np.zeros(tau.shape, dtype=bool)
    mag = np.abs(flat)  # float32; |-0.0| == 0.0
    if np.isnan(mag).any():
        raise ValueError("trim_mask: NaN in tau; magnitudes cannot be ranked")
    t = np.sort(mag, kind="stable")[n - k]  # k-th largest (ascending sort, index n-k)
    above = mag > t
    tied = np.flatnonzero(mag == t)  # flat indices, increasing
    m = len(tied)
    q = k - int(above.sum())
    assert 1 <= q <= m
    keep = above.copy()
    keep[tied[np.array(_tie_keep(m, q), dtype=bool)]] = True
    assert int(keep.sum()) == k
    return keep.reshape(tau.shape)


# ------------------------------------------------------------------------------- TIES


def _ties_core(base, models, weights, densities, consensus):
    """Steps 1-3: per model (tau, mask, u) and the elected sign s (int8, +1/-1)."""
    _check_inputs(base, models, {"weights": weights, "densities": densities})
    if consensus not in ("sum", "count"):
        raise ValueError(f"consensus must be 'sum' or 'count', got {consensus!r}")
    taus, masks, us = [], [], []
    for M, w, rho in zip(models, weights, densities):
        tau = M - base  # float32
        mask = trim_mask(tau, rho)
        tau_hat = np.where(mask, tau, _ZERO)  # float32
        u = np.float32(w) * tau_hat  # float32 scalar * float32 array -> float32
        taus.append(tau)
        masks.append(mask)
        us.append(u)
    if consensus == "sum":
        S = np.zeros(base.shape, dtype=np.float32)
        for u in us:
            S = S + u
        s = np.where(S >= 0, 1, -1).astype(np.int8)  # S == 0 (a tie) elects +1
    else:
        C = np.zeros(base.shape, dtype=np.int64)
        for u in us:
            C = C + _sign(u)
        s = np.where(C >= 0, 1, -1).astype(np.int8)  # C == 0 (a tie) elects +1
    return taus, masks, us, s


def ties(base, models, weights, densities, *, lam=1.0, normalize=True, consensus="sum") -> np.ndarray:
    """TIES merge of float32 tensors (docs/semantics.md §2); returns float32 B + delta."""
    with np.errstate(all="ignore"):
        _, _, us, s = _ties_core(base, models, weights, densities, consensus)
        delta = np.zeros(base.shape, dtype=np.float32)
        D = np.zeros(base.shape, dtype=np.float32)
        for u, w in zip(us, weights):
            agree = _sign(u) == s
            delta = delta + np.where(agree, u, _ZERO)
            D = D + np.where(agree, np.float32(w), _ZERO)
        if normalize:
            D = np.where(D == 0, _ONE, D)
            delta = delta / D
        delta = np.float32(lam) * delta
        out = base + delta
    assert out.dtype == _F32
    return out


def ties_stats(base, models, weights, densities, *, consensus="sum") -> dict:
    """Per-tensor TIES statistics (docs/semantics.md §E).

    For each model i (k_i kept elements out of n):
      kept     = k_i / n
      excluded = #{kept, u_i != 0, sign(u_i) != s} / #{kept, u_i != 0}  (0.0 if none)
      l2       = sqrt(sum(float64(tau_i)**2)) over the *untrimmed* tau_i (exact sum,
                 math.fsum; squares of float32 values are exact in float64)
    sign_conflict = fraction of elements where, among the models with u_i != 0, there
    is both a positive and a negative u_i (weighted, trimmed deltas).
    For an empty tensor (n == 0) every fraction is 0.0.
    """
    with np.errstate(all="ignore"):
        taus, masks, us, s = _ties_core(base, models, weights, densities, consensus)
        n = base.size
        per_model = []
        for tau, mask, u in zip(taus, masks, us):
            k = int(mask.sum())
            nonzero_kept = mask & (u != 0)
            denom = int(nonzero_kept.sum())
            lost = int((nonzero_kept & (_sign(u) != s)).sum())
            sq = tau.astype(np.float64).ravel() ** 2
            per_model.append(
                {
                    "kept": k / n if n else 0.0,
                    "excluded": lost / denom if denom else 0.0,
                    "l2": math.sqrt(math.fsum(sq.tolist())),
                }
            )
        has_pos = np.zeros(base.shape, dtype=bool)
        has_neg = np.zeros(base.shape, dtype=bool)
        for u in us:
            has_pos |= u > 0
            has_neg |= u < 0
        conflict = int((has_pos & has_neg).sum())
    return {"models": per_model, "sign_conflict": conflict / n if n else 0.0}


# ------------------------------------------------------------- task arithmetic, linear


def task_arithmetic(base, models, weights, *, lam=1.0, normalize=False) -> np.ndarray:
    """delta = sum_i f32(w_i) * (M_i - B); if normalize delta /= W; return B + f32(lam)*delta."""
    _check_inputs(base, models, {"weights": weights})
    with np.errstate(all="ignore"):
        delta = np.zeros(base.shape, dtype=np.float32)
        for M, w in zip(models, weights):
            delta = delta + np.float32(w) * (M - base)
        if normalize:
            delta = delta / _weight_sum(weights)
        out = base + np.float32(lam) * delta
    assert out.dtype == _F32
    return out


def linear(models, weights, *, normalize=True) -> np.ndarray:
    """R = sum_j f32(w_j) * X_j over the listed models; if normalize R /= W."""
    if len(models) == 0:
        raise ValueError("at least one model is required")
    _check_inputs(models[0], models, {"weights": weights})
    with np.errstate(all="ignore"):
        R = np.zeros(models[0].shape, dtype=np.float32)
        for X, w in zip(models, weights):
            R = R + np.float32(w) * X
        if normalize:
            R = R / _weight_sum(weights)
    assert R.dtype == _F32
    return R


# ======================================================================================
# docs/semantics.md §A-§C
# ======================================================================================

BLOCK = 16384  # reduction block (elements); a multiple of the 8 lanes
LANES = 8

# ------------------------------------------------------------------ A. reductions


def _as_vectors(x: np.ndarray, axis: int) -> tuple[np.ndarray, tuple]:
    """(R, C) array whose rows are the vectors of x along `axis` (-1 or 0), and the
    shape of the per-vector results. A 0-d tensor is one vector of one element, a 1-D
    tensor one vector; rows follow the C order of the remaining axes."""
    if axis not in (-1, 0):
        raise ValueError(f"axis must be -1 (rows along the last axis) or 0, got {axis}")
    if x.ndim == 0:
        return x.reshape(1, 1), ()
    if x.ndim == 1:
        return x.reshape(1, -1), ()
    if axis == -1:
        return x.reshape(-1, x.shape[-1]), x.shape[:-1]
    return np.moveaxis(x.reshape(x.shape[0], -1), 0, -1), x.shape[1:]


def _exact_sum(values) -> float:
    """Exact sum of float64 values, rounded once (math.fsum). Non-finite values (never
    produced by finite float32 inputs) follow IEEE instead of fsum's exceptions: NaN if
    any NaN or both +Inf and -Inf occur, else the infinity."""
    values = [float(v) for v in values]
    if all(math.isfinite(v) for v in values):
        return math.fsum(values)
    acc = 0.0
    for v in values:
        if not math.isfinite(v):
            acc += v
    return acc


def _block_lane_sums(terms: np.ndarray) -> np.ndarray:
    """(R, C) float64 terms -> (R, nb) block sums by the lane rule (see reduce_sum)."""
    R, C = terms.shape
    nb = max(1, -(-C // BLOCK))
    steps = BLOCK // LANES if nb > 1 else max(1, -(-C // LANES))
    padded = np.zeros((R, nb * steps * LANES), dtype=np.float64)  # +0.0 padding adds nothing
    padded[:, :C] = terms
    t = padded.reshape(R, nb, steps, LANES)  # t[r, b, s, l] = element b*BLOCK + s*8 + l
    A = np.zeros((R, nb, LANES), dtype=np.float64)  # lanes from +0.0
    for s in range(steps):  # increasing e: A[l] = ((+0 + t_l) + t_{l+8}) + t_{l+16} ...
        A = A + t[:, :, s, :]
    return ((A[..., 0] + A[..., 1]) + (A[..., 2] + A[..., 3])) + ((A[..., 4] + A[..., 5]) + (A[..., 6] + A[..., 7]))


def reduce_sum(terms) -> float:
    """The one reduction rule (docs/semantics.md §A) over a flat float64 array of terms.

    Blocks of BLOCK = 16384 elements by flat index; in a block element e is added to
    lane A[e mod 8] in increasing e, every lane starting at +0.0 (float64, one rounding
    per addition); block sum ((A0+A1)+(A2+A3))+((A4+A5)+(A6+A7)); the block sums are
    added exactly and rounded once (math.fsum; see _exact_sum for non-finite values).
    An empty array sums to +0.0. The result is never -0.0.

    For kernels: blocks are independent (any thread may take any block); a chunk that
    ends inside a block must carry that block's 8 lane accumulators into the next chunk.
    The per-block float64 sums can be handed back to Python and combined with math.fsum.
    """
    terms = np.asarray(terms)
    if terms.dtype != np.float64 or terms.ndim != 1:
        raise TypeError(f"reduce_sum wants a flat float64 array, got {terms.dtype} ndim {terms.ndim}")
    return _exact_sum(_block_lane_sums(terms.reshape(1, -1))[0])


def reduce_rows(terms, axis: int = -1) -> np.ndarray:
    """reduce_sum of every vector of a float64 array along `axis` (-1: rows along the
    last axis; 0: columns, i.e. vectors along axis 0). Blocks and lanes are relative to
    the vector (element e of a vector is its index inside the vector). Returns float64
    of shape terms.shape without that axis (() for 0-d and 1-D arrays)."""
    terms = np.asarray(terms)
    if terms.dtype != np.float64:
        raise TypeError(f"reduce_rows wants float64 terms, got {terms.dtype}")
    vecs, out_shape = _as_vectors(terms, axis)
    blocks = _block_lane_sums(np.ascontiguousarray(vecs))
    out = np.array([_exact_sum(row) for row in blocks], dtype=np.float64)
    return out.reshape(out_shape)


def _f64(name, x):
    return _check_f32(name, x).astype(np.float64)


def sq_norm(x) -> float:
    """||x||^2 of a float32 tensor over its flat index: reduce_sum(float64(x)**2)."""
    return reduce_sum(_f64("x", x).ravel() ** 2)


def dot(x, y) -> float:
    """<x, y> of two float32 tensors of one shape: reduce_sum(float64(x) * float64(y))."""
    if x.shape != y.shape:
        raise ValueError(f"dot: shapes {x.shape} and {y.shape} differ")
    return reduce_sum((_f64("x", x) * _f64("y", y)).ravel())


def l1(x) -> float:
    """sum |x| of a float32 tensor: reduce_sum(|float64(x)|)."""
    return reduce_sum(np.abs(_f64("x", x)).ravel())


def sq_norm_rows(x, axis: int = -1) -> np.ndarray:
    """||v||^2 of every vector of x along `axis` (see reduce_rows)."""
    return reduce_rows(_f64("x", x) ** 2, axis)


def dot_rows(x, y, axis: int = -1) -> np.ndarray:
    """<v, w> of corresponding vectors of x and y along `axis` (see reduce_rows)."""
    if x.shape != y.shape:
        raise ValueError(f"dot_rows: shapes {x.shape} and {y.shape} differ")
    return reduce_rows(_f64("x", x) * _f64("y", y), axis)


def l1_rows(x, axis: int = -1) -> np.ndarray:
    """sum |v| of every vector of x along `axis` (see reduce_rows)."""
    return reduce_rows(np.abs(_f64("x", x)), axis)


# -------------------------------------------------------------- A. rank selection


def count_k(fraction, n: int) -> int:
    """k = floor(fraction * n): float64 product, floored, clamped to [0, n]."""
    return min(max(math.floor(float(fraction) * n), 0), n)


def keep_range(v, lo: int, hi: int) -> np.ndarray:
    """Bool mask (shaped like v) of keep(v, lo, hi), docs/semantics.md §A "Rank selection".

    The elements whose descending rank by v lies in [lo, hi), 0 <= lo <= hi <= n,
    over the flat index. Equal values (==, so -0.0 and +0.0 are one value) form a
    group; a group occupying descending ranks [a, a + m) needs
    q = |[a, a + m) ∩ [lo, hi)| of its elements. All groups strictly inside the interval
    have q = m (all kept), groups outside q = 0; only the (at most two) boundary groups
    are thinned, and when lo and hi - 1 fall in the same group it is thinned once with
    q = hi - lo. Thinning (the TIES rule): the j-th element of the group in flat-index
    order (j = 0..m-1) is kept iff (j+1)*q // m > j*q // m, exact integers.
    Exactly hi - lo elements are kept; lo == hi keeps none. NaN in v: ValueError (NaN
    has no rank). TIES trim is keep_range(|tau|, 0, k).
    """
    v = np.asarray(v)
    flat = v.ravel()
    n = flat.size
    lo, hi = int(lo), int(hi)
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"keep_range: need 0 <= lo <= hi <= n, got lo={lo} hi={hi} n={n}")
    keep = np.zeros(n, dtype=bool)
    if lo == hi:
        return keep.reshape(v.shape)
    if np.isnan(flat).any():
        raise ValueError("keep_range: NaN values cannot be ranked")
    values, group, counts = np.unique(flat, return_inverse=True, return_counts=True)  # ascending
    # descending rank range of ascending group g: [n - cum[g], n - cum[g] + counts[g])
    start = n - np.cumsum(counts)
    q = np.clip(np.minimum(hi, start + counts) - np.maximum(lo, start), 0, None)
    keep[(q == counts)[group]] = True  # groups wholly inside [lo, hi)
    for g in np.flatnonzero((q > 0) & (q < counts)):  # the (at most two) boundary groups
        members = np.flatnonzero(group == g)  # flat indices, increasing
        m, qg = len(members), int(q[g])
        keep[members[np.array(_tie_keep(m, qg), dtype=bool)]] = True
    assert int(keep.sum()) == hi - lo
    return keep.reshape(v.shape)


# --------------------------------------------------------------- A. random masks

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def fnv1a64(name: str, i: int) -> int:
    """Stream id s: FNV-1a-64 over UTF-8(name) || 0x00 || i as 4 bytes little-endian.
    For each byte: h ^= byte; h = (h * 0x100000001b3) mod 2**64, from 0xcbf29ce484222325."""
    if not 0 <= i < 2**32:
        raise ValueError(f"model index {i} out of [0, 2**32)")
    h = FNV_OFFSET
    for byte in name.encode("utf-8") + b"\x00" + int(i).to_bytes(4, "little"):
        h = ((h ^ byte) * FNV_PRIME) & _M64
    return h


def _philox_rounds(c0, c1, c2, c3, k0: int, k1: int):
    """Philox-4x32-10 on uint64 arrays (or Python ints) holding 32-bit words."""
    m32 = np.uint64(_M32) if isinstance(c0, np.ndarray) else _M32
    s32 = np.uint64(32) if isinstance(c0, np.ndarray) else 32
    M0 = np.uint64(PHILOX_M0) if isinstance(c0, np.ndarray) else PHILOX_M0
    M1 = np.uint64(PHILOX_M1) if isinstance(c0, np.ndarray) else PHILOX_M1
    for rnd in range(10):
        if rnd > 0:  # key bumped before rounds 2..10
            k0, k1 = (k0 + PHILOX_W0) & _M32, (k1 + PHILOX_W1) & _M32
        p0 = M0 * c0  # 64-bit products of 32-bit values: exact in uint64
        p1 = M1 * c2
        K0 = np.uint64(k0) if isinstance(c0, np.ndarray) else k0
        K1 = np.uint64(k1) if isinstance(c0, np.ndarray) else k1
        c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ K0, p1 & m32, (p0 >> s32) ^ c3 ^ K1, p0 & m32
    return c0, c1, c2, c3


def philox4x32_10(counter, key) -> tuple[int, int, int, int]:
    """Philox-4x32-10 (Salmon et al., SC'11; Random123's philox4x32 with 10 rounds).

    counter (c0, c1, c2, c3), key (k0, k1): 32-bit words. A round maps
    (c0, c1, c2, c3) -> (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))
    with M0 = 0xD2511F53, M1 = 0xCD9E8D57 and 64-bit products; before rounds 2..10 the
    key becomes (k0 + 0x9E3779B9, k1 + 0xBB67AE85) mod 2**32. Returns the 4 output words.
    """
    c = [int(w) for w in counter]
    k = [int(w) for w in key]
    if len(c) != 4 or len(k) != 2 or not all(0 <= w <= _M32 for w in c + k):
        raise ValueError("philox4x32_10: counter is 4 and key 2 words of 32 bits")
    return tuple(int(w) for w in _philox_rounds(c[0], c[1], c[2], c[3], k[0], k[1]))


def _check_seed(seed) -> int:
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed {seed} out of [0, 2**64)")
    return seed


def uniform24(seed: int, name: str, i: int, e: int) -> int:
    """u * 2**24 for element e (flat index) of model i (0-based among the non-base models)
    in output tensor `name`: s = fnv1a64(name, i), j = e // 4,
    words = philox4x32_10((j mod 2**32, j >> 32, s mod 2**32, s >> 32),
                          (seed mod 2**32, seed >> 32)),
    u * 2**24 = words[e mod 4] >> 8 (the top 24 bits). u = that * 2**-24 in [0, 1)."""
    seed, e = _check_seed(seed), int(e)
    if not 0 <= e < 2**66:
        raise ValueError(f"element index {e} out of range")
    s, j = fnv1a64(name, i), e // 4
    words = philox4x32_10((j & _M32, j >> 32, s & _M32, s >> 32), (seed & _M32, seed >> 32))
    return words[e % 4] >> 8


def uniform24_array(seed: int, name: str, i: int, n: int, start: int = 0) -> np.ndarray:
    """uniform24(seed, name, i, e) for e = start .. start+n-1, vectorized (int64 array).
    Each element runs its own Philox block (4x redundant work, but obviously per element)."""
    seed = _check_seed(seed)
    s = fnv1a64(name, i)
    e = np.arange(int(start), int(start) + int(n), dtype=np.uint64)
    j = e >> np.uint64(2)
    ones = np.ones(e.shape, dtype=np.uint64)
    words = _philox_rounds(j & np.uint64(_M32), j >> np.uint64(32), ones * np.uint64(s & _M32),
                           ones * np.uint64(s >> 32), seed & _M32, seed >> 32)
    word = np.choose((e & np.uint64(3)).astype(np.intp), words)  # word e mod 4
    return (word >> np.uint64(8)).astype(np.int64)


def random_keep(seed: int, name: str, i: int, shape, p) -> np.ndarray:
    """Bool mask of the given shape: element e (flat index) is kept iff
    u_e < p_e, compared exactly in float64, u_e = uniform24(seed, name, i, e) * 2**-24.
    p is a scalar or an array of that shape (float64; float32 values convert exactly)."""
    shape = tuple(shape)
    n = math.prod(shape)
    u = uniform24_array(seed, name, i, n).astype(np.float64) * 2.0**-24  # exact
    p = np.asarray(p, dtype=np.float64)
    if p.ndim:
        if p.shape != shape:
            raise ValueError(f"random_keep: p has shape {p.shape}, want {shape}")
        p = p.ravel()
    return (u < p).reshape(shape)


# ------------------------------------------------------- B. task-arithmetic family

SPARSIFIERS = ("magnitude", "random", "outliers", "della")


def _rescale_mode(rescale) -> str | None:
    if rescale is None or rescale is False:
        return None
    if rescale is True or rescale == "l1":
        return "l1"
    if rescale == "inverse":
        return "inverse"
    raise ValueError(f"rescale must be False, True/'l1' or 'inverse', got {rescale!r}")


def della_probabilities(tau, density, epsilon) -> np.ndarray:
    """DELLA keep probabilities p (float64, shaped like tau), for 0 < density < 1.

    Rows run along the last axis (1-D: one row; 0-d: one row of one element) of C
    elements. r = 1 + position of the element in the ascending order of |tau| within its
    row, equal magnitudes by increasing index (a stable sort). In float64, in this order:
    a = rho - eps; b = 2 * eps; p = a + ((b * (r - 1)) / (C - 1)); C = 1: p = rho.
    """
    tau = _check_f32("tau", tau)
    rho, eps = float(density), float(epsilon)
    rows, _ = _as_vectors(tau, -1)
    C = rows.shape[1]
    mag = np.abs(rows)
    if np.isnan(mag).any():
        raise ValueError("della: NaN in tau; magnitudes cannot be ranked")
    if C == 1:
        return np.full(tau.shape, rho, dtype=np.float64)
    order = np.argsort(mag, axis=1, kind="stable")
    r = np.empty(rows.shape, dtype=np.float64)
    np.put_along_axis(r, order, np.arange(1, C + 1, dtype=np.float64)[None, :], axis=1)
    a, b = rho - eps, 2.0 * eps
    p = a + ((b * (r - 1.0)) / float(C - 1))
    return p.reshape(tau.shape)


def sparsify(tau, density, sparsifier, *, rescale=False, gamma=0.01, epsilon=0.15,
             seed=0, name=None, index=0):
    """One model's sparsified delta (docs/semantics.md §B): returns (tau_hat, keep, p).

    tau_hat is float32, keep the bool mask, p the float64 keep probability per element
    for the random sparsifiers (None otherwise). density >= 1 (or sparsifier None)
    returns tau unchanged (no drop, no rescale); density 0 drops everything.
    - 'magnitude': keep_range(|tau|, 0, k), k = floor(rho * n)   (TIES trim)
    - 'outliers' : k = floor(rho n), m = min(floor(gamma n), n - k); keep_range(|tau|, m, m + k)
    - 'random'   : keep iff u < rho (random_keep(seed, name, index, ...))
    - 'della'    : keep iff u < p, p = della_probabilities(tau, rho, epsilon)
    Dropped elements become +0.0. Rescale of the kept elements:
    - 'l1' (True): r = l1(tau) / l1(tau_masked) in float64 (two reductions; tau_masked is
      tau with dropped elements +0.0), skipped if either sum < 1e-7; kept elements become
      fl32(tau * fl32(r)).
    - 'inverse': kept elements become fl32(tau * fl32(1 / p)) (p = rho for 'random').
    """
    tau = _check_f32("tau", tau)
    rho = float(density)
    if not rho >= 0:
        raise ValueError(f"density must be >= 0, got {density!r}")
    mode = _rescale_mode(rescale)
    if sparsifier is not None and sparsifier not in SPARSIFIERS:
        raise ValueError(f"sparsifier must be one of {SPARSIFIERS} or None, got {sparsifier!r}")
    n = tau.size
    p = None
    if sparsifier is None or rho >= 1:
        return tau.copy(), np.ones(tau.shape, dtype=bool), p
    if mode == "inverse" and sparsifier in ("magnitude", "outliers"):
        raise ValueError("rescale 'inverse' needs a keep probability (sparsifier random or della)")
    if sparsifier == "magnitude":
        keep = keep_range(np.abs(tau), 0, count_k(rho, n))
    elif sparsifier == "outliers":
        g = float(gamma)
        if not 0 <= g <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        k = count_k(rho, n)
        m = min(count_k(g, n), n - k)
        keep = keep_range(np.abs(tau), m, m + k)
    else:
        if name is None:
            raise ValueError("random sparsifiers need the output tensor name")
        if sparsifier == "random":
            p = np.full(tau.shape, rho, dtype=np.float64)
        else:
            eps = float(epsilon)
            if not eps >= 0:
                raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
            if rho > 0 and not (rho - eps > 0 and rho + eps < 1):
                raise ValueError(f"della: need density - epsilon > 0 and density + epsilon < 1, got {rho}, {eps}")
            p = np.zeros(tau.shape) if rho == 0 else della_probabilities(tau, rho, eps)
        keep = random_keep(seed, name, index, tau.shape, p)
    with np.errstate(all="ignore"):
        tau_hat = np.where(keep, tau, _ZERO)
        if mode == "l1":
            before, after = l1(tau), l1(tau_hat)
            if not (before < 1e-7 or after < 1e-7):
                tau_hat = np.where(keep, tau * np.float32(before / after), _ZERO)
        elif mode == "inverse":
            factor = (1.0 / np.where(keep, p, 1.0)).astype(np.float32)  # fl32(1/p), float64 division
            tau_hat = np.where(keep, tau * factor, _ZERO)
    assert tau_hat.dtype == _F32
    return tau_hat, keep, p


def _per_model(values, default, count, pname):
    if values is None:
        return [default] * count
    if len(values) != count:
        raise ValueError(f"{pname}: {len(values)} values for {count} models")
    return list(values)


def task_family(base, models, *, weights, densities=None, sparsifier=None, consensus=None,
                normalize=False, rescale=False, lam=1.0, gammas=None, epsilons=None,
                seed=0, name=None) -> np.ndarray:
    """The task-arithmetic family (docs/semantics.md §B); returns float32 B + delta.

    Per model i (index i = position in `models`, used for the random stream):
    tau_i = M_i - B; tau_hat_i = sparsify(tau_i, ...)[0]; u_i = fl32(w_i) * tau_hat_i.
    consensus None: delta = ((+0 + u_0) + u_1) + ...; if normalize,
      delta = delta / D, D = ((0 + fl32(w_0)) + fl32(w_1)) + ... in float32, |D| < 1e-8 -> 1.
    consensus 'sum' / 'count': TIES steps 3-4 exactly as ties() (vote on u; tie elects +1;
      delta = sum of agreeing u_i, D = sum of agreeing fl32(w_i), D == 0 -> 1, divided if
      normalize).
    Always delta = fl32(lam) * delta; result = B + delta.
    With sparsifier 'magnitude', consensus 'sum', normalize True this is ties(); with no
    sparsifier and no consensus it is task_arithmetic().
    """
    count = len(models)
    _check_inputs(base, models, {"weights": weights})
    densities = _per_model(densities, 1.0, count, "densities")
    gammas = _per_model(gammas, 0.01, count, "gammas")
    epsilons = _per_model(epsilons, 0.15, count, "epsilons")
    if consensus not in (None, "sum", "count"):
        raise ValueError(f"consensus must be None, 'sum' or 'count', got {consensus!r}")
    with np.errstate(all="ignore"):
        us = []
        for i, (M, w, rho, g, eps) in enumerate(zip(models, weights, densities, gammas, epsilons)):
            tau_hat, _, _ = sparsify(M - base, rho, sparsifier, rescale=rescale, gamma=g, epsilon=eps,
                                     seed=seed, name=name, index=i)
            us.append(np.float32(w) * tau_hat)
        delta = np.zeros(base.shape, dtype=np.float32)
        if consensus is None:
            for u in us:
                delta = delta + u
            if normalize:
                delta = delta / _weight_sum(weights)
        else:
            if consensus == "sum":
                S = np.zeros(base.shape, dtype=np.float32)
                for u in us:
                    S = S + u
                s = np.where(S >= 0, 1, -1)
            else:
                C = np.zeros(base.shape, dtype=np.int64)
                for u in us:
                    C = C + _sign(u)
                s = np.where(C >= 0, 1, -1)
            D = np.zeros(base.shape, dtype=np.float32)
            for u, w in zip(us, weights):
                agree = _sign(u) == s
                delta = delta + np.where(agree, u, _ZERO)
                D = D + np.where(agree, np.float32(w), _ZERO)
            if normalize:
                delta = delta / np.where(D == 0, _ONE, D)
        out = base + np.float32(lam) * delta
    assert out.dtype == _F32
    return out


def task_family_stats(base, models, *, densities=None, sparsifier=None, rescale=False,
                      gammas=None, epsilons=None, seed=0, name=None) -> list[dict]:
    """Per model: {"n", "kept" (exact count), "p_sum" = sum p, "p_var" = sum p(1-p)}
    (p_sum = kept and p_var = 0 for deterministic sparsifiers). For the statistical
    check: a random sparsifier keeps p_sum within a few sqrt(p_var)."""
    count = len(models)
    _check_inputs(base, models, {})
    densities = _per_model(densities, 1.0, count, "densities")
    gammas = _per_model(gammas, 0.01, count, "gammas")
    epsilons = _per_model(epsilons, 0.15, count, "epsilons")
    out = []
    with np.errstate(all="ignore"):
        for i, M in enumerate(models):
            _, keep, p = sparsify(M - base, densities[i], sparsifier, rescale=rescale, gamma=gammas[i],
                                  epsilon=epsilons[i], seed=seed, name=name, index=i)
            kept = int(keep.sum())
            if p is None:
                out.append({"n": base.size, "kept": kept, "p_sum": float(kept), "p_var": 0.0})
            else:
                out.append({"n": base.size, "kept": kept, "p_sum": math.fsum(p.ravel().tolist()),
                            "p_var": math.fsum((p * (1 - p)).ravel().tolist())})
    return out


def dare_ties(base, models, weights, densities, *, name, seed=0, lam=1.0, normalize=False,
              rescale=True, consensus="sum"):
    """dare_ties: random drop, sum consensus, normalize false, rescale l1 (mergekit defaults)."""
    return task_family(base, models, weights=weights, densities=densities, sparsifier="random",
                       consensus=consensus, normalize=normalize, rescale=rescale, lam=lam, seed=seed, name=name)


def dare_linear(base, models, weights, densities, *, name, seed=0, lam=1.0, normalize=False, rescale=True):
    """dare_linear: random drop, no consensus, normalize false, rescale l1."""
    return task_family(base, models, weights=weights, densities=densities, sparsifier="random",
                       consensus=None, normalize=normalize, rescale=rescale, lam=lam, seed=seed, name=name)


def breadcrumbs(base, models, weights, densities, gammas=None, *, lam=1.0, normalize=False, rescale=False):
    """breadcrumbs: outliers (gamma default 0.01), no consensus, normalize false, no rescale."""
    return task_family(base, models, weights=weights, densities=densities, sparsifier="outliers",
                       consensus=None, normalize=normalize, rescale=rescale, lam=lam, gammas=gammas)


def breadcrumbs_ties(base, models, weights, densities, gammas=None, *, lam=1.0, normalize=False,
                     rescale=False, consensus="sum"):
    """breadcrumbs_ties: outliers, sum consensus, normalize false, no rescale."""
    return task_family(base, models, weights=weights, densities=densities, sparsifier="outliers",
                       consensus=consensus, normalize=normalize, rescale=rescale, lam=lam, gammas=gammas)


def della(base, models, weights, densities, epsilons=None, *, name, seed=0, lam=1.0, normalize=True,
          rescale=True, consensus="sum"):
    """della: DELLA drop (epsilon default 0.15), sum consensus, normalize true, rescale l1."""
    return task_family(base, models, weights=weights, densities=densities, sparsifier="della",
                       consensus=consensus, normalize=normalize, rescale=rescale, lam=lam,
                       epsilons=epsilons, seed=seed, name=name)


def della_linear(base, models, weights, densities, epsilons=None, *, name, seed=0, lam=1.0,
                 normalize=False, rescale=True):
    """della_linear: DELLA drop, no consensus, normalize false, rescale l1."""
    return task_family(base, models, weights=weights, densities=densities, sparsifier="della",
                       consensus=None, normalize=normalize, rescale=rescale, lam=lam,
                       epsilons=epsilons, seed=seed, name=name)


# ------------------------------------------------------------- C. other methods


def _slerp_coefficients(c: float, t: float) -> tuple[float, float]:
    """theta = acos(c); c0 = sin((1 - t) * theta) / sin(theta); c1 = sin(t * theta) / sin(theta)."""
    theta = math.acos(c)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def slerp(base, model, t) -> np.ndarray:
    """SLERP (docs/semantics.md §C) of v0 = base and v1 = model over the flattened tensor.

    float64: n0 = sqrt(sq_norm(v0)), n1 = sqrt(sq_norm(v1)), each -> 1.0 if <= 1e-8;
    c = dot(v0, v1) / (n0 * n1), clamped to [-1, 1]. |c| > 0.9995: (c0, c1) = (1 - t, t);
    else theta = acos(c), c0 = sin((1 - t) * theta) / sin(theta),
    c1 = sin(t * theta) / sin(theta). float32: result = fl32(c0) * v0 + fl32(c1) * v1
    (each product rounded, then the sum). t = 0 gives v0 and t = 1 gives v1 exactly
    (c0, c1 = 1, 0 or 0, 1; up to the sign of zero elements and non-finite values).
    """
    _check_inputs(base, [model], {})
    t = float(t)
    n0, n1 = math.sqrt(sq_norm(base)), math.sqrt(sq_norm(model))
    n0 = 1.0 if n0 <= 1e-8 else n0
    n1 = 1.0 if n1 <= 1e-8 else n1
    c = min(max(dot(base, model) / (n0 * n1), -1.0), 1.0)
    if abs(c) > 0.9995:
        c0, c1 = 1.0 - t, t
    else:
        c0, c1 = _slerp_coefficients(c, t)
    with np.errstate(all="ignore"):
        out = np.float32(c0) * base + np.float32(c1) * model
    assert out.dtype == _F32
    return out


def nuslerp_t(w0, w1) -> float:
    """t = w1 / (w0 + w1) in float64 (weights as given), or 0.5 if |w0 + w1| < 1e-6."""
    s = float(w0) + float(w1)
    return 0.5 if abs(s) < 1e-6 else float(w1) / s


def nuslerp(models, weights, base=None, *, flatten=True, row_wise=False) -> np.ndarray:
    """NuSLERP (docs/semantics.md §C) of exactly two models (recipe order), base optional.

    t = nuslerp_t(w0, w1). v_i = M_i - B (float32) with a base, else M_i. Vectors: the
    whole flattened tensor (flatten), else rows along the last axis (row_wise False) or
    vectors along axis 0 (row_wise True); 1-D: one vector. Per vector, float64:
    c = dot / (max(||v0||, 1e-7) * max(||v1||, 1e-7)), clamped to [-1, 1];
    (c0, c1) = (1 - t, t) if 1 - c * c <= 1e-16, else the slerp coefficients (no 0.9995
    threshold). float32: r = fl32(c0) * v0 + fl32(c1) * v1; result B + r, or r.
    """
    if len(models) != 2 or len(weights) != 2:
        raise ValueError("nuslerp needs exactly two models and two weights")
    ref_ = models[0] if base is None else base
    _check_inputs(ref_, models, {"weights": weights})
    t = nuslerp_t(*weights)
    with np.errstate(all="ignore"):
        v0, v1 = (models[0], models[1]) if base is None else (models[0] - base, models[1] - base)
        if flatten:
            n0, n1, d = [np.array(math.sqrt(sq_norm(v0))), np.array(math.sqrt(sq_norm(v1))), np.array(dot(v0, v1))]
        else:
            axis = 0 if row_wise else -1
            n0, n1, d = np.sqrt(sq_norm_rows(v0, axis)), np.sqrt(sq_norm_rows(v1, axis)), dot_rows(v0, v1, axis)
        c0s = np.empty(d.shape, dtype=np.float64)
        c1s = np.empty(d.shape, dtype=np.float64)
        for idx in np.ndindex(d.shape):
            c = float(d[idx]) / (max(float(n0[idx]), 1e-7) * max(float(n1[idx]), 1e-7))
            c = min(max(c, -1.0), 1.0)
            if 1.0 - c * c <= 1e-16:
                c0s[idx], c1s[idx] = 1.0 - t, t
            else:
                c0s[idx], c1s[idx] = _slerp_coefficients(c, t)
        c0s, c1s = c0s.astype(np.float32), c1s.astype(np.float32)
        if not flatten and v0.ndim >= 2:  # broadcast one coefficient per vector
            shape = (1,) + v0.shape[1:] if row_wise else v0.shape[:-1] + (1,)
            c0s, c1s = c0s.reshape(shape), c1s.reshape(shape)
        r = c0s * v0 + c1s * v1
        out = r if base is None else base + r
    assert out.dtype == _F32 and out.shape == ref_.shape
    return out


def model_stock(base, models, *, filter_wise=False) -> np.ndarray:
    """Model Stock (docs/semantics.md §C): base and N >= 2 models.

    Per tensor, or per row along the last axis if filter_wise (1-D: one row). float64,
    per tensor/row: d_i = M_i - B (float32); for pairs i < j in lexicographic order,
    c_ij = clamp(dot(d_i, d_j) / max(||d_i|| * ||d_j||, 1e-6), -1, 1); c = the mean,
    ((0.0 + c_01) + c_02) + ... then / P (P = N(N-1)/2 pairs); den = 1 + (N - 1) * c;
    t = 0 if |den| < 1e-6 else (N * c) / den. float32: t32 = fl32(t), s = fl32(1 - t32);
    m = (((+0 + M_0) + M_1) + ...) / fl32(N); result = t32 * m + s * B (each product
    rounded, then the sum).
    """
    N = len(models)
    if N < 2:
        raise ValueError("model_stock needs at least two models besides the base")
    _check_inputs(base, models, {})
    with np.errstate(all="ignore"):
        ds = [M - base for M in models]
        axis_shape = base.shape[:-1] if (filter_wise and base.ndim >= 2) else ()
        if filter_wise:
            norms = [np.sqrt(sq_norm_rows(d)) for d in ds]
        else:
            norms = [np.array(math.sqrt(sq_norm(d))) for d in ds]
        pairs = [(i, j) for i in range(N) for j in range(i + 1, N)]
        dots = {(i, j): (dot_rows(ds[i], ds[j]) if filter_wise else np.array(dot(ds[i], ds[j]))) for i, j in pairs}
        t32 = np.empty(axis_shape, dtype=np.float32)
        for idx in np.ndindex(axis_shape):
            acc = 0.0
            for i, j in pairs:
                cij = float(dots[i, j][idx]) / max(float(norms[i][idx]) * float(norms[j][idx]), 1e-6)
                acc += min(max(cij, -1.0), 1.0)
            c = acc / len(pairs)
            den = 1.0 + (N - 1) * c
            t = 0.0 if abs(den) < 1e-6 else (N * c) / den
            t32[idx] = np.float32(t)
        s = (np.float32(1.0) - t32).astype(np.float32)  # float32 subtraction = fl32(1 - t32) (float64 then fl32 rounds the same)
        if filter_wise and base.ndim >= 2:
            t32, s = t32[..., None], s[..., None]
        m = np.zeros(base.shape, dtype=np.float32)
        for M in models:
            m = m + M
        m = m / np.float32(N)
        out = t32 * m + s * base
    assert out.dtype == _F32
    return out


def sce(base, models, *, select_topk=1.0) -> np.ndarray:
    """SCE (docs/semantics.md §C): base and >= 1 model, no weights.

    tau_i = M_i - B (float32). If sigma = select_topk < 1: sigma <= 0 zeroes every tau_i;
    else per element, float64 in model order: mu = ((0.0 + tau_0) + tau_1 + ...) / N,
    v = ((0.0 + (tau_0 - mu)**2) + ...) / N (each difference and square rounded);
    k = floor(sigma * #{v != 0}); elements outside keep_range(v, 0, k) become +0.0 in every
    tau_i. Elect: S = ((+0 + tau_0) + tau_1) + ... float32, s = +1 where S >= 0 else -1;
    a_i = [sign(tau_i) == s]. Weights: q_i = sq_norm(tau_i) / n (float64), Q = ((0.0 + q_0)
    + q_1) + ...; w_i = fl32(q_i / Q), or fl32(1 / N) if Q == 0 (mergekit: Q < 1e-6, a
    deliberate difference). Merge, float32 from +0 in model order:
    num = sum where(a_i, w_i * tau_i, 0); den = sum where(a_i, w_i, 0);
    delta = num / max(den, fl32(1e-6)); result = B + delta.
    """
    N = len(models)
    _check_inputs(base, models, {})
    sigma = float(select_topk)
    n = base.size
    with np.errstate(all="ignore"):
        taus = [M - base for M in models]
        if sigma < 1:
            if sigma <= 0:
                taus = [np.zeros(base.shape, dtype=np.float32) for _ in taus]
            else:
                mu = np.zeros(base.shape, dtype=np.float64)
                for tau in taus:
                    mu = mu + tau.astype(np.float64)
                mu = mu / N
                var = np.zeros(base.shape, dtype=np.float64)
                for tau in taus:
                    diff = tau.astype(np.float64) - mu
                    var = var + diff * diff
                var = var / N
                k = count_k(sigma, int(np.count_nonzero(var)))
                sel = keep_range(var, 0, k)
                taus = [np.where(sel, tau, _ZERO) for tau in taus]
        S = np.zeros(base.shape, dtype=np.float32)
        for tau in taus:
            S = S + tau
        s = np.where(S >= 0, 1, -1)
        q = [sq_norm(tau) / n if n else 0.0 for tau in taus]
        Q = 0.0
        for qi in q:
            Q = Q + qi
        w = [np.float32(1.0 / N) if Q == 0 else np.float32(qi / Q) for qi in q]
        num = np.zeros(base.shape, dtype=np.float32)
        den = np.zeros(base.shape, dtype=np.float32)
        for tau, wi in zip(taus, w):
            agree = _sign(tau) == s
            num = num + np.where(agree, wi * tau, _ZERO)
            den = den + np.where(agree, wi, _ZERO)
        delta = num / np.maximum(den, np.float32(1e-6))
        out = base + delta
    assert out.dtype == _F32
    return out


def passthrough(x, scale=None) -> np.ndarray:
    """passthrough (docs/semantics.md §C): scale None copies x unchanged (bytes included);
    else fl32(x * fl32(scale))."""
    _check_f32("x", x)
    if scale is None:
        return x.copy()
    with np.errstate(all="ignore"):
        return x * np.float32(scale)


# ------------------------------------------------ C. element-wise methods (issue 21)


def nearswap(base, model, t) -> np.ndarray:
    """NearSwap (docs/semantics.md §C): d = |B - M|; w = fl32(1 / max(d, fl32(1e-6))) * fl32(t)
    clamped to [0, 1] (mergekit: torch's `t / x` is `x.reciprocal() * t`); result
    fl32(w * M) + fl32(fl32(1 - w) * B). NaN propagates."""
    _check_inputs(base, [model], {})
    with np.errstate(all="ignore"):
        d = np.abs(base - model)
        w = (_ONE / np.maximum(d, np.float32(1e-6))) * np.float32(t)
        w = np.minimum(np.maximum(w, _ZERO), _ONE)
        out = w * model + (_ONE - w) * base
    assert out.dtype == _F32
    return out


def _ram_masks(base, models, epsilon):
    taus = [M - base for M in models]
    kept = [np.abs(tau) > np.float32(epsilon) for tau in taus]
    count = np.zeros(base.shape, dtype=np.int64)
    for k in kept:
        count = count + k
    return taus, kept, count


def ram_counts(base, models, epsilon=1e-5) -> tuple[list[int], list[int]]:
    """Per model: elements whose delta it alone keeps (|tau| > fl32(epsilon)), and those
    it keeps with at least one other model."""
    _check_inputs(base, models, {})
    taus, kept, count = _ram_masks(base, models, epsilon)
    return [int((k & (count == 1)).sum()) for k in kept], [int((k & (count > 1)).sum()) for k in kept]


def ramplus_lambda(unique, shared, *, r=0.1, alpha=0.2, epsilon=1e-5) -> list[np.float32]:
    """lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha), every
    operand and operation float32 (the counts converted to float32)."""
    out = []
    for u, s in zip(unique, shared):
        rho = np.float32(s) / np.maximum(np.float32(u), np.float32(epsilon))
        rho = np.minimum(np.maximum(rho, _ZERO), np.float32(alpha))
        out.append(np.float32(_ONE + np.float32(r) * rho))
    return out


def ram(base, models, *, epsilon=1e-5, plus=False, r=0.1, alpha=0.2) -> np.ndarray:
    """RAM / RAM+ tensor-local (docs/semantics.md §C). tau_i = M_i - B; kept where
    |tau_i| > fl32(epsilon); c = number of models keeping theirs. Term t_i = tau_i * lambda_i
    where c == 1 (lambda_i = 1 for RAM, ramplus_lambda for RAM+), tau_i / fl32(c) where
    c > 1, +0 where not kept; result B + (((+0 + t_0) + t_1) + ...)."""
    _check_inputs(base, models, {})
    with np.errstate(all="ignore"):
        taus, kept, count = _ram_masks(base, models, epsilon)
        lams = [_ONE] * len(models)
        if plus:
            lams = ramplus_lambda(*ram_counts(base, models, epsilon), r=r, alpha=alpha, epsilon=epsilon)
        acc = np.zeros(base.shape, dtype=np.float32)
        c32 = count.astype(np.float32)
        for tau, k, lam in zip(taus, kept, lams):
            term = np.where(count == 1, tau * lam, tau / np.maximum(c32, _ONE))
            acc = acc + np.where(k, term, _ZERO)
        out = base + acc
    assert out.dtype == _F32
    return out


def multislerp64(models, weights, base=None, *, normalize_weights=True, eps=1e-8, dtype=np.float64) -> np.ndarray:
    """mergekit's multislerp evaluated in `dtype` (float64; float32 as mergekit's float32
    run) on whole vectors, returned in that dtype:
    v_i = M_i - B (float32) or M_i; w normalized by its sum; u_i = v_i / (||v_i|| + eps);
    mean = sum w_i u_i, normalized (norm < eps: the weighted sum for two inputs, else an
    error); tangent = sum w_i (u_i - <u_i, mean> mean); t = ||tangent|| + eps;
    result (mean cos t + tangent sin t / t) * sum w_i ||v_i|| (+ B)."""
    ref_ = models[0] if base is None else base
    _check_inputs(ref_, models, {"weights": weights})
    vs = np.stack([(M if base is None else M - base).astype(dtype).ravel() for M in models])
    w = np.array(weights, dtype=dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = np.linalg.norm(vs, axis=1)
    eps = dtype(eps)
    units = vs / (norms[:, None] + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = np.linalg.norm(mean)
    if mean_norm < eps:
        if len(models) != 2:
            raise ValueError("multislerp: the weighted sum of the inputs is zero")
        res = vs[0] * w[0] + vs[1] * w[1]
    else:
        mean = mean / mean_norm
        dots = units @ mean
        tangent = ((units - dots[:, None] * mean) * w[:, None]).sum(0)
        tn = np.linalg.norm(tangent) + eps
        res = (mean * np.cos(tn) + tangent * (np.sin(tn) / tn)) * (norms * w).sum()
    res = res.reshape(ref_.shape)
    return res if base is None else res + base.astype(dtype)


def karcher64(models, *, max_iter=10, tol=1e-5) -> np.ndarray:
    """mergekit's karcher evaluated in float64 on whole vectors (returns float64): equal
    weights 1/N; inputs of norm <= tol dropped (an error if none is left); the iteration
    of mergekit's karcher_merge_tensors; result (sum ||v_i|| / N) * mean."""
    _check_inputs(models[0], models, {})
    vs = [M.astype(np.float64).ravel() for M in models]
    N = len(vs)
    norms = [float(np.linalg.norm(v)) for v in vs]
    valid = [i for i in range(N) if norms[i] > tol]
    if not valid:
        raise ValueError("karcher: every input is zero")
    units = [vs[i] / norms[i] for i in valid]
    alphas = [1.0 / len(valid)] * len(valid)
    mean = np.zeros_like(units[0])
    for a, u in zip(alphas, units):
        mean += a * u
    mn = np.linalg.norm(mean)
    mean = units[0].copy() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for a, u in zip(alphas, units):
            dot = min(max(float(mean @ u), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += a * (theta / math.sin(theta)) * (u - dot * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = np.linalg.norm(mean)
        if un > tol:
            mean = mean / un
    return (sum(n / N for n in norms) * mean).reshape(models[0].shape)


def fusion_row_kl(base, model) -> np.ndarray:
    """Arcee Fusion's KL per row along the last axis (float64, shape base.shape[:-1]; one
    value for a 1-D tensor): p = exp(f64(M) - max M)/Z_M + 1e-8, q likewise of B, Z and
    the sum of p*log(p/q) by reduce_rows. exp and log are Python's math functions (the C
    library's, which the kernels call too; NumPy's own SIMD versions may differ in the
    last bit)."""
    _check_inputs(base, [model], {})
    exp, log = np.frompyfunc(math.exp, 1, 1), np.frompyfunc(math.log, 1, 1)
    x, y = _f64("model", model), _f64("base", base)
    if x.ndim == 0:
        x, y = x.reshape(1), y.reshape(1)
    ex = exp(x - x.max(axis=-1, keepdims=True)).astype(np.float64)
    ey = exp(y - y.max(axis=-1, keepdims=True)).astype(np.float64)
    p = ex / reduce_rows(ex)[..., None] + 1e-8
    q = ey / reduce_rows(ey)[..., None] + 1e-8
    return reduce_rows(p * log(p / q).astype(np.float64))


def arcee_fusion(base, model) -> tuple[np.ndarray, dict]:
    """Arcee Fusion (docs/semantics.md §C): d = M - B (float32); importance
    x = f64(|d|) * kl[row] (float64); q1, median, q3 = the sorted x at ranks
    floor(k(n - 1)/4), k = 1, 2, 3 (exact, no sampling); threshold median + 1.5 (q3 - q1)
    in float64; result B + d * fl32(x >= threshold). Returns (result, {"threshold", "kept"})."""
    kl = fusion_row_kl(base, model)
    with np.errstate(all="ignore"):
        d = model - base
        x = np.abs(d).astype(np.float64) * (np.asarray(kl)[..., None] if d.ndim else np.asarray(kl).reshape(()))
        n = x.size
        s = np.sort(x.ravel())
        q1, med, q3 = float(s[(n - 1) // 4]), float(s[(n - 1) // 2]), float(s[3 * (n - 1) // 4])
        thr = med + 1.5 * (q3 - q1)
        keep = x >= thr
        out = base + d * keep.astype(np.float32)
    assert out.dtype == _F32
    return out, {"threshold": thr, "kept": int(keep.sum())}


def arcee_fusion_mask64(base, model) -> np.ndarray:
    """mergekit's arcee_fusion mask evaluated in float64 on the whole tensor (no sampling):
    importance |M - B| * sum p log(p/q) per row, p, q = softmax + 1e-8; kept where
    importance >= median + 1.5 (q3 - q1), the quartiles at floor(q (n - 1)) of the sort."""
    x, y = _f64("model", model), _f64("base", base)
    if x.ndim == 0:
        x, y = x.reshape(1), y.reshape(1)
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True) + 1e-8
    q = np.exp(y - y.max(axis=-1, keepdims=True))
    q = q / q.sum(axis=-1, keepdims=True) + 1e-8
    imp = np.abs(x - y) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    s = np.sort(imp.ravel())
    n = s.size
    q1, med, q3 = s[int(0.25 * (n - 1))], s[int(0.5 * (n - 1))], s[int(0.75 * (n - 1))]
    return (imp >= med + 1.5 * (q3 - q1)).reshape(base.shape)


def combine(models, coefficients, base=None) -> np.ndarray:
    """The merge pass of multislerp and karcher given their float64 coefficients c_i:
    fl32(f64(B) + acc) with x_i = M_i - B (float32), else fl32(acc);
    acc = ((+0 + c_0 f64(x_0)) + c_1 f64(x_1)) + ... in float64."""
    ref_ = models[0] if base is None else base
    _check_inputs(ref_, models, {"coefficients": coefficients})
    with np.errstate(all="ignore"):
        acc = np.zeros(ref_.shape, dtype=np.float64)
        for M, c in zip(models, coefficients):
            x = M if base is None else M - base
            acc = acc + float(c) * x.astype(np.float64)
        if base is not None:
            acc = base.astype(np.float64) + acc
        return acc.astype(np.float32)


# ------------------------------------------------------------ D. recipe values

NO_MATCH = object()  # first_match / evaluate_setting: nothing matched, ask the next level


def layer_t(j: int, L: int) -> float:
    """t of output-slice offset j in a slice of L layers: j / (L - 1) (float64), 1.0 if L == 1."""
    if not (L >= 1 and 0 <= j < L):
        raise ValueError(f"layer_t: need 0 <= j < L, got j={j} L={L}")
    return 1.0 if L == 1 else j / (L - 1)


def gradient_value(anchors, t: float):
    """Value of the gradient s_0 .. s_(A-1) at position t in [0, 1] (docs/recipes.md).

    Numbers, float64 in this order: x = t * (A - 1); i0 = floor(x);
    i1 = min(A - 1, i0 + 1); f = x - i0; value = (1 - f) * s_i0 + f * s_i1.
    A list of booleans takes s_floor(t * (A - 1)). A list mixing booleans and numbers is
    a ValueError (mergekit would interpolate True as 1).
    """
    anchors = list(anchors)
    A = len(anchors)
    t = float(t)
    if A == 0:
        raise ValueError("a gradient needs at least one anchor")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"gradient position t={t} outside [0, 1]")
    x = t * (A - 1)
    i0 = math.floor(x)
    if all(isinstance(s, (bool, np.bool_)) for s in anchors):
        return anchors[i0]
    if any(isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Real) for s in anchors):
        raise ValueError(f"gradient anchors must be all numbers or all booleans: {anchors!r}")
    i1 = min(A - 1, i0 + 1)
    f = x - i0
    return (1.0 - f) * float(anchors[i0]) + f * float(anchors[i1])


def _entry_matches(entry: dict, name: str) -> bool:
    flt = entry.get("filter")
    return flt is None or flt == "*" or flt in name


def first_match(entries, name: str):
    """The `value` of the first {filter, value} entry (a dict or list of dicts, in order)
    with no filter, filter '*', or a filter that is a substring of `name`; NO_MATCH if
    none. (`layers.1` matches `layers.10`.)"""
    if isinstance(entries, dict):
        entries = [entries]
    for entry in entries:
        if _entry_matches(entry, name):
            return entry["value"]
    return NO_MATCH


def evaluate_setting(setting, name: str, t: float):
    """A parameter setting at tensor `name` and position t: a scalar as is; a list of
    numbers/booleans as a gradient; {filter, value} entries via first_match (the value
    may be a gradient); NO_MATCH if no entry matched."""
    is_entries = isinstance(setting, dict) or (isinstance(setting, list) and setting and isinstance(setting[0], dict))
    if is_entries:
        value = first_match(setting, name)
        if value is NO_MATCH:
            return NO_MATCH
        return evaluate_setting(value, name, t)
    if isinstance(setting, list):
        return gradient_value(setting, t)
    return setting


def resolve_parameter(levels, name: str, t: float, default=NO_MATCH):
    """Precedence (docs/recipes.md): `levels` are the settings in order (the model's own,
    the slice's, the top level; None where absent); the first that yields a value wins,
    else `default`; NO_MATCH if there is none (the caller raises, naming tensor/model)."""
    for setting in levels:
        if setting is None:
            continue
        value = evaluate_setting(setting, name, t)
        if value is not NO_MATCH:
            return value
    return default


# ------------------------------------------------------- E. vocabularies (tokenizer_source)
#
# mergekit 0.1.5's tokenizer/build.py and tokenizer/embed.py as npmerge follows them
# (README "Vocabularies"); written from those rules, sharing nothing with npmerge/io/vocab.py.
# A vocabulary is a dict: "vocab" token -> id (tokenizer.json model.vocab, then every added
# token, whose id wins), "added" [(id, content)] ascending id, "rows" (the model's
# embedding rows), "assumed" (no tokenizer.json: the base's vocabulary with its own rows).


def read_vocabulary(model_dir, rows: int, base: dict | None = None) -> dict:
    """A model's vocabulary from tokenizer.json (+ tokenizer_config.json added_tokens_decoder);
    without tokenizer.json, `base`'s tokens with this model's rows."""
    root = Path(model_dir)
    if not (root / "tokenizer.json").is_file():
        return {"vocab": dict(base["vocab"]), "added": list(base["added"]), "rows": rows, "assumed": True}
    data = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
    raw = data["model"]["vocab"]
    vocab = dict(raw) if isinstance(raw, dict) else {}
    if isinstance(raw, list):  # Unigram: [piece, score], id = position, first occurrence wins
        for i, (piece, _score) in enumerate(raw):
            vocab.setdefault(piece, i)
    added = {e["id"]: e["content"] for e in data.get("added_tokens") or []}
    config = root / "tokenizer_config.json"
    if config.is_file():
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        for key, entry in decoder.items():
            added.setdefault(int(key), entry["content"])
    for i, content in added.items():
        vocab[content] = i
    return {"vocab": vocab, "added": sorted(added.items()), "rows": rows, "assumed": False}


def output_vocabulary(source, vocabs: list[dict], base: int = 0, pad_to_multiple_of: int | None = None):
    """(names, n_tokens, size): the output token of each id, the ids in use (max + 1) and the
    rows (n_tokens rounded up to pad_to_multiple_of).

    source "base": the base's tokens with ids below its rows. A model index: that model's
    whole vocabulary. "union": the base's as for "base", then the plain (not added) tokens
    of every model with ids below its rows, then their added tokens, models in the order
    base, the others as given, within a model by ascending id (then token); a token not
    yet present takes the next id. A model without tokenizer.json adds nothing. An id
    named by several tokens is named by its added token, else the first in vocab order.
    """
    b = vocabs[base]
    if source in ("base", "union"):
        tokens = {t: i for t, i in b["vocab"].items() if i < b["rows"]}
        added = {c: None for i, c in b["added"] if i < b["rows"]}
    else:
        tokens = dict(vocabs[source]["vocab"])
        added = {c: None for _, c in vocabs[source]["added"]}
    if source == "union":
        plain: dict[str, None] = {}
        extra: dict[str, None] = {}
        for j in [base] + [k for k in range(len(vocabs)) if k != base]:
            v = vocabs[j]
            if v["assumed"]:
                continue
            own = {c for _, c in v["added"]}
            for tok, i in sorted(v["vocab"].items(), key=lambda kv: (kv[1], kv[0])):
                if i < v["rows"] and tok not in own:
                    plain.setdefault(tok)
            for i, c in v["added"]:
                if i < v["rows"]:
                    extra.setdefault(c)
        nxt = max(tokens.values(), default=-1) + 1
        for tok in [t for t in plain if t not in extra and t not in tokens] + list(extra):
            if tok not in tokens:  # a new token; transformers adds plain words as (non-special) added tokens
                tokens[tok] = nxt
                nxt += 1
            added.setdefault(tok)
    names: dict[int, str] = {}
    for tok, i in tokens.items():
        names.setdefault(i, tok)
    for content in added:
        if content in tokens:
            names[tokens[content]] = content
    n_tokens = max(names, default=-1) + 1
    size = n_tokens
    if pad_to_multiple_of:
        size = -(-n_tokens // pad_to_multiple_of) * pad_to_multiple_of
    return names, n_tokens, size


def _vocab_row(v: dict, token: str | None):
    i = v["vocab"].get(token) if token is not None else None
    return i if i is not None and i < v["rows"] else None


def permuted_rows(names: dict, n_tokens: int, size: int, vocabs: list[dict], base: int, model: int,
                  full: list[np.ndarray]) -> np.ndarray:
    """Model `model`'s vocabulary-sized tensor in output order, float32 [size, hidden], one row
    at a time. `full[j]`: model j's float32 tensor [rows_j, hidden] (a tied model's embeddings
    for the head). Output id t (token x) takes the model's own row of x; if it lacks x, with P
    the models having x: none -> zeros; one -> its row; the base among them -> the base's row;
    else fl32((sum over P in model order, float64 from +0) / |P|). Rows n_tokens..size-1
    (padding): per column fl32(reduce_rows(float64(rows 0..n_tokens-1), axis=0) / n_tokens)."""
    hidden = full[model].shape[1]
    out = np.zeros((size, hidden), dtype=np.float32)
    for t in range(n_tokens):
        token = names.get(t)
        own = _vocab_row(vocabs[model], token)
        if own is not None:
            out[t] = full[model][own]
            continue
        have = [j for j in range(len(vocabs)) if _vocab_row(vocabs[j], token) is not None]
        if not have:
            continue
        if len(have) == 1 or base in have:
            j = have[0] if len(have) == 1 else base
            out[t] = full[j][_vocab_row(vocabs[j], token)]
            continue
        acc = np.zeros(hidden, dtype=np.float64)
        for j in have:
            acc = acc + full[j][_vocab_row(vocabs[j], token)].astype(np.float64)
        out[t] = (acc / len(have)).astype(np.float32)
    if size > n_tokens:
        out[n_tokens:] = (reduce_rows(out[:n_tokens].astype(np.float64), axis=0) / n_tokens).astype(np.float32)
    return out
