"""The fused trim / elect / disjoint-merge kernel of the TIES family.

One kernel serves TIES, task arithmetic and linear (SEMANTICS.md): rows hold the
task vectors of one chunk (or the models themselves for linear), and per-model
thresholds say what survives the trim. Everything is float32, in the exact
operation order of tests/reference.py, so results match it bit for bit.

Ties at a threshold are thinned evenly along the flat index: the j-th tied
element of a tensor is kept iff floor((j+1)q/m) > floor(jq/m). The running
ordinal j is carried across chunks by the caller (`tie_pos`) and across blocks
by a prefix sum of per-block tie counts, so the choice never depends on chunk
size or thread count. Instead of big products j*q the kernel steps the
remainder r = j*q mod m: element j is kept iff r + q >= m.
"""

import numpy as np
from numba import njit, prange

MAG_MASK = 0x7FFFFFFF

CONSENSUS_NONE = 0
CONSENSUS_SUM = 1
CONSENSUS_COUNT = 2


@njit(cache=True, nogil=True)
def _mulmod(a, b, m):
    """(a * b) % m for 0 <= a, b < m < 2**62 without overflow (double and add)."""
    r = 0
    a = a % m
    while b > 0:
        if b & 1:
            r += a
            if r >= m:
                r -= m
        a += a
        if a >= m:
            a -= m
        b >>= 1
    return r


@njit(parallel=True, cache=True, nogil=True)
def merge_chunk(rows, base, weights, tbits, tq, tm, tie_pos, consensus, normalize,
                eps, lam, block, out, counts):
    """Merge one chunk.

    rows     float32[nm, c]  task vectors (or models, for linear)
    base     float32[c]      added to the merged delta; size 0 means no base
    weights  float32[nm]
    tbits    int64[nm]       threshold magnitude bits: keep |x| > t; -1 keeps all,
                             2**31 keeps none
    tq, tm   int64[nm]       of the tm elements with |x| == t, keep tq (thinned)
    tie_pos  int64[nm]       ordinal of this chunk's first tied element; advanced
    consensus                0 none (every model agrees), 1 sum, 2 count
    normalize                divide by the sum of agreeing weights D
    eps      float           where |D| < eps or D == 0, D = 1
    lam      float32         scales the merged delta
    out      float32[c]
    counts   int64[1 + 2*nm] += [sign conflicts, per model: kept nonzero, excluded]
    """
    nm, c = rows.shape
    nblocks = (c + block - 1) // block
    has_base = base.size != 0
    bits = rows.view(np.uint32)

    # Which models need the tie ordinal, and per-block tie counts for them.
    thin = np.zeros(nm, np.bool_)
    for i in range(nm):
        thin[i] = tq[i] > 0 and tq[i] < tm[i]
    ties = np.zeros((nblocks, nm), np.int64)
    for b in prange(nblocks):
        lo = b * block
        hi = min(lo + block, c)
        for i in range(nm):
            if thin[i]:
                t = tbits[i]
                n = 0
                for e in range(lo, hi):
                    if (bits[i, e] & MAG_MASK) == t:
                        n += 1
                ties[b, i] = n
    start = np.zeros((nblocks, nm), np.int64)
    for i in range(nm):
        j = tie_pos[i]
        for b in range(nblocks):
            start[b, i] = j
            j += ties[b, i]
        tie_pos[i] = j

    per_block = np.zeros((nblocks, 1 + 2 * nm), np.int64)
    for b in prange(nblocks):
        lo = b * block
        hi = min(lo + block, c)
        rem = np.zeros(nm, np.int64)
        for i in range(nm):
            if thin[i]:
                rem[i] = _mulmod(start[b, i], tq[i], tm[i])
        u = np.empty(nm, np.float32)
        cnt = per_block[b]
        for e in range(lo, hi):
            s_sum = np.float32(0.0)
            s_cnt = 0
            for i in range(nm):
                mag = np.int64(bits[i, e] & MAG_MASK)
                t = tbits[i]
                keep = mag > t
                if mag == t:
                    if thin[i]:
                        keep = rem[i] + tq[i] >= tm[i]
                        rem[i] = rem[i] + tq[i] - (tm[i] if keep else 0)
                    else:
                        keep = tq[i] > 0
                x = rows[i, e] if keep else np.float32(0.0)
                ui = weights[i] * x
                u[i] = ui
                s_sum += ui
                if ui > 0:
                    s_cnt += 1
                elif ui < 0:
                    s_cnt -= 1
            if consensus == CONSENSUS_SUM:
                positive = s_sum >= 0
            else:
                positive = s_cnt >= 0
            delta = np.float32(0.0)
            denom = np.float32(0.0)
            has_pos = False
            has_neg = False
            for i in range(nm):
                ui = u[i]
                agree = True
                if ui != 0:
                    cnt[1 + 2 * i] += 1
                    if ui > 0:
                        has_pos = True
                    else:
                        has_neg = True
                if consensus != CONSENSUS_NONE:
                    agree = (ui > 0) if positive else (ui < 0)
                    if ui != 0 and not agree:
                        cnt[2 + 2 * i] += 1
                if agree:
                    delta += ui
                    denom += weights[i]
            if has_pos and has_neg:
                cnt[0] += 1
            if normalize:
                if denom == 0 or abs(denom) < eps:
                    denom = np.float32(1.0)
                delta = delta / denom
            delta = lam * delta
            out[e] = (base[e] + delta) if has_base else delta
    for b in range(nblocks):
        for j in range(1 + 2 * nm):
            counts[j] += per_block[b, j]
