"""The best rank-r approximation of one task vector (Eckart–Young), as LoRA factors.

Δ (m × n, float64, exactly the float32 FT − BASE) is factorised by LAPACK's gesdd
(`np.linalg.svd(full_matrices=False)`), which the caller runs on a single-threaded
BLAS (blas.py), so the factors' bits do not depend on the thread count. The rank is
`--rank`, lowered by `--sv-epsilon` (singular values at or below it are dropped) and by
`--rank-energy F` (the smallest r with Σ_{i≤r} s_i² ≥ F·Σ s_i²). The factors are
B = U_r·√S_r, A = √S_r·V_rᵀ (distributed, mergekit's default) or B = U_r·S_r, A = V_rᵀ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ERROR_ROWS = 1 << 20  # elements per block of the error check (a constant: same sums for any budget)


def svd_bytes(m: int, n: int) -> int:
    """Peak working memory of extracting an m × n module, measured with NumPy 2 on OpenBLAS
    and rounded up: Δ in float64 and gesdd's copy of it (2mn), U and Vᵀ and their copies
    (2(m+n)k), its k² workspaces (5k²), blocked-QR panels (64(m+n)); 8 bytes each."""
    k = min(m, n)
    return 8 * (2 * m * n + 2 * (m + n) * k + 5 * k * k + 64 * (m + n))


@dataclass(frozen=True)
class Factors:
    rank: int
    a: np.ndarray  # float64 [rank, n] (lora_A)
    b: np.ndarray  # float64 [m, rank] (lora_B)
    norm: float  # ‖Δ‖_F
    energy: float  # Σ_{i≤r} s_i² / Σ s_i²: the fraction of ‖Δ‖²_F kept
    optimal_error: float  # ‖Δ − Δ_r‖_F / ‖Δ‖_F, the Eckart–Young optimum at this rank


def choose_rank(s: np.ndarray, max_rank: int, sv_epsilon: float = 0.0, rank_energy: float | None = None) -> int:
    """The rank kept from singular values `s` (descending)."""
    r = min(max_rank, int(np.count_nonzero(s > sv_epsilon)))
    if rank_energy is not None and r > 0:
        sq = s.astype(np.float64) ** 2
        kept = np.cumsum(sq)
        r = min(r, int(np.searchsorted(kept, rank_energy * kept[-1], side="left")) + 1)
    return r


def factorise(delta: np.ndarray, max_rank: int, *, sv_epsilon: float = 0.0, rank_energy: float | None = None,
              distribute: bool = True, transposed: bool = False) -> Factors:
    """LoRA factors of `delta` (float64 m × n); `transposed`: of deltaᵀ (embedding LoRA and
    Conv1D store (B·A)ᵀ), from the same SVD with U and V swapped."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    sq = s * s
    total = math.fsum(sq)
    r = choose_rank(s, max_rank, sv_epsilon, rank_energy)
    left, right = (vt[:r].T, u[:, :r].T) if transposed else (u[:, :r], vt[:r])
    if distribute:
        root = np.sqrt(s[:r])
        b, a = left * root, root[:, None] * right
    else:
        b, a = left * s[:r], np.array(right)
    kept = math.fsum(sq[:r])
    return Factors(r, np.ascontiguousarray(a), np.ascontiguousarray(b), math.sqrt(total),
                   kept / total if total else 1.0, math.sqrt(max(total - kept, 0.0) / total) if total else 0.0)


def relative_error(delta: np.ndarray, b: np.ndarray, a: np.ndarray, transposed: bool = False) -> float:
    """‖Δ − B·A‖_F / ‖Δ‖_F (or against (B·A)ᵀ), in float64 over fixed blocks of rows."""
    rows = max(1, ERROR_ROWS // max(1, delta.shape[1]))
    err = norm = 0.0
    for i in range(0, delta.shape[0], rows):
        block = delta[i:i + rows]
        approx = (a[:, i:i + rows].T @ b.T) if transposed else (b[i:i + rows] @ a)
        err += float(np.sum((block - approx) ** 2))
        norm += float(np.sum(block * block))
    return math.sqrt(err / norm) if norm else 0.0
