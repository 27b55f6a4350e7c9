"""Plain-NumPy reference implementation of npmerge's merge math.

This module is the executable form of /work/shared/SEMANTICS.md. It is written for
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
    SEMANTICS makes them an error unless the user opts in, and does not define TIES
    trimming over NaN magnitudes; :func:`trim_mask` raises ``ValueError`` on NaN when it
    has to rank magnitudes (density < 1). Everything else just follows IEEE float32
    (floating-point warnings are silenced: the IEEE result is the defined result).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "to_f32_bf16",
    "from_f32_bf16",
    "trim_mask",
    "ties",
    "task_arithmetic",
    "linear",
    "ties_stats",
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
    """k = number of elements kept out of n (SEMANTICS TIES step 1).

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
    """Bool mask (shaped like tau) of the elements TIES keeps, SEMANTICS TIES step 1.

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
    """TIES merge of float32 tensors (SEMANTICS TIES steps 1-5); returns float32 B + delta."""
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
    """Per-tensor TIES statistics (SEMANTICS "Statistics").

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
