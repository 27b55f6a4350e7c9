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

Each block is processed model by model in short element-wise loops (trim,
vote, disjoint sum) that LLVM vectorises; only tied elements that must be
thinned take a scalar path.
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


@njit(cache=True, nogil=True)
def _trim_weight(x, xbits, t, keep_ties, w, u):
    """u = w * (x if kept else 0): keep |x| > t, and |x| == t when keep_ties."""
    for e in range(x.shape[0]):
        mag = np.int64(xbits[e] & MAG_MASK)
        keep = (mag > t) | (keep_ties & (mag == t))
        u[e] = w * (x[e] if keep else np.float32(0.0))


@njit(cache=True, nogil=True)
def _thin_ties(x, xbits, t, q, m, rem, w, u):
    """Scalar pass over the tied elements: keep the j-th iff r_j + q >= m; return r."""
    for e in range(x.shape[0]):
        if np.int64(xbits[e] & MAG_MASK) == t:
            keep = rem + q >= m
            rem = rem + q - (m if keep else 0)
            u[e] = w * (x[e] if keep else np.float32(0.0))
    return rem


@njit(cache=True, nogil=True)
def _count_ties(xbits, t):
    n = 0
    for e in range(xbits.shape[0]):
        n += np.int64(xbits[e] & MAG_MASK) == t
    return n


@njit(cache=True, nogil=True)
def _merge_block(rows, bits, base, lo, hi, weights, tbits, tq, tm, thin, rem, consensus, normalize, eps, lam,
                 out, cnt):
    """Elements lo..hi: trim and weight each model, elect, disjoint sum, normalise, add the base.

    Rows are sliced per model (rows[i, lo:hi] keeps a contiguous layout, so the
    element loops vectorise)."""
    nm = rows.shape[0]
    n = hi - lo
    u = np.empty((nm, n), np.float32)
    for i in range(nm):
        x = rows[i, lo:hi]
        xb = bits[i, lo:hi]
        _trim_weight(x, xb, tbits[i], tq[i] > 0, weights[i], u[i])
        if thin[i]:
            _thin_ties(x, xb, tbits[i], tq[i], tm[i], rem[i], weights[i], u[i])

    # Elect: positive[e] is the sign every agreeing u must have.
    positive = np.ones(n, np.bool_)
    if consensus == CONSENSUS_SUM:
        s = np.zeros(n, np.float32)
        for i in range(nm):
            ui = u[i]
            for e in range(n):
                s[e] += ui[e]
        for e in range(n):
            positive[e] = s[e] >= 0
    elif consensus == CONSENSUS_COUNT:
        k = np.zeros(n, np.int32)
        for i in range(nm):
            ui = u[i]
            for e in range(n):
                k[e] += np.int32(ui[e] > 0) - np.int32(ui[e] < 0)
        for e in range(n):
            positive[e] = k[e] >= 0

    # Disjoint sum of the agreeing deltas and their weights, with statistics.
    delta = np.zeros(n, np.float32)
    denom = np.zeros(n, np.float32)
    pos = np.zeros(n, np.bool_)
    neg = np.zeros(n, np.bool_)
    for i in range(nm):
        ui = u[i]
        w = weights[i]
        nonzero = 0
        excluded = 0
        for e in range(n):
            v = ui[e]
            agree = (v > 0) if positive[e] else (v < 0)
            if consensus == CONSENSUS_NONE:
                agree = True
            delta[e] += v if agree else np.float32(0.0)
            denom[e] += w if agree else np.float32(0.0)
            nonzero += v != 0
            excluded += (v != 0) & (not agree)
            pos[e] |= v > 0
            neg[e] |= v < 0
        cnt[1 + 2 * i] += nonzero
        cnt[2 + 2 * i] += excluded
    conflicts = 0
    has_base = base.size != 0
    o = out[lo:hi]
    bs = base[lo:hi] if has_base else base
    for e in range(n):
        conflicts += pos[e] & neg[e]
        d = delta[e]
        if normalize:
            dd = denom[e]
            if dd == 0 or abs(dd) < eps:
                dd = np.float32(1.0)
            d = d / dd
        d = lam * d
        o[e] = (bs[e] + d) if has_base else d
    cnt[0] += conflicts


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

    # Per-block tie counts, prefix-summed into each block's first tie ordinal.
    thin = (tq > 0) & (tq < tm)
    ties = np.zeros((nblocks, nm), np.int64)
    for b in prange(nblocks):
        lo = b * block
        hi = min(lo + block, c)
        for i in range(nm):
            if thin[i]:
                ties[b, i] = _count_ties(bits[i, lo:hi], tbits[i])
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
        _merge_block(rows, bits, base, lo, hi, weights, tbits, tq, tm, thin, rem, consensus, normalize, eps, lam,
                     out, per_block[b])
    for b in range(nblocks):
        for j in range(1 + 2 * nm):
            counts[j] += per_block[b, j]
