"""Fused span kernels of the TIES family (TIES, task arithmetic, linear): exact
magnitude selection by radix histograms, and trim / elect / disjoint merge / encode.

Each kernel covers one span of a tensor in one parallel region of cache-sized blocks
(see span.py for how inputs are passed). Everything is float32, in the exact operation
order of tests/reference.py, so results match it bit for bit.

Selection: non-negative float32 values order like their uint32 bit patterns, so the
k-th largest |x| is found without sorting: a histogram of the high 15 bits of the
31-bit magnitude finds the bucket holding it, a histogram of the low 16 bits of the
elements inside that bucket the exact value and how many elements equal it. The first
histogram also tells, per bucket, how many elements have non-zero low bits, which
usually settles the value without the second pass. Counts are integers in per-thread
histograms, so any chunking or thread count gives the same answer.

Ties at a threshold are thinned evenly along the flat index: the j-th tied element of
a tensor is kept iff floor((j+1)q/m) > floor(jq/m). The running ordinal j is carried
across spans by the caller (`tie_pos`) and across blocks by a prefix sum of per-block
tie counts, so the choice never depends on span size or thread count. Instead of big
products j*q the kernel steps the remainder r = j*q mod m: element j is kept iff
r + q >= m.
"""

import numba
import numpy as np
from numba import njit, prange

from .span import check_block, load_rows, store

HI_SHIFT = 16
HI_BUCKETS = 1 << 15  # magnitude bits 30..16
LO_BUCKETS = 1 << 16  # magnitude bits 15..0
MAG_MASK = 0x7FFFFFFF

CONSENSUS_NONE = 0
CONSENSUS_SUM = 1
CONSENSUS_COUNT = 2


# ------------------------------------------------------------------ selection


@njit(parallel=True, cache=True, nogil=True)
def hist_hi(addrs, modes, luts, rnd, has_base, lo, hi, block, check, sums, bad, active, hist):
    """hist[t, i, 2 * (mag >> 16) + (mag & 0xFFFF != 0)] += 1 over the task vectors of
    the active models, elements lo..hi (t: the thread's slot).

    The split of each bucket by zero/non-zero low bits lets the caller skip the
    low-bits pass when the k-th largest is one of the bucket's low-zero elements, which
    all equal the bucket's floor (usual for BF16 models). With `check`, also the
    engine's first-pass checks (span.check_block)."""
    nm = addrs.shape[0] - 1
    nb = (hi - lo + block - 1) // block
    for b in prange(nb):
        s = lo + b * block
        n = min(block, hi - s)
        rows = np.empty((nm, n), np.float32)
        base = np.empty(n, np.float32)
        load_rows(addrs, modes, luts, rnd, has_base, True, s, n, rows, base)
        if check:
            check_block(rows, base, n, has_base, sums, s // block, bad[b])
        t = numba.get_thread_id()
        for i in range(nm):
            if active[i]:
                h = hist[t, i]
                bits = rows[i].view(np.uint32)
                for e in range(n):
                    m = bits[e] & MAG_MASK
                    h[((m >> HI_SHIFT) << 1) | np.uint32((m & 0xFFFF) != 0)] += 1


@njit(parallel=True, cache=True, nogil=True)
def hist_lo(addrs, modes, luts, rnd, has_base, lo, hi, block, bucket, hist):
    """hist[t, i, mag & 0xFFFF] += 1 for task-vector elements of model i whose high
    magnitude bits equal bucket[i] (models with bucket[i] < 0 are skipped)."""
    nm = addrs.shape[0] - 1
    nb = (hi - lo + block - 1) // block
    for b in prange(nb):
        s = lo + b * block
        n = min(block, hi - s)
        rows = np.empty((nm, n), np.float32)
        base = np.empty(n, np.float32)
        load_rows(addrs, modes, luts, rnd, has_base, True, s, n, rows, base)
        t = numba.get_thread_id()
        for i in range(nm):
            bk = bucket[i]
            if bk >= 0:
                h = hist[t, i]
                bits = rows[i].view(np.uint32)
                for e in range(n):
                    m = bits[e] & MAG_MASK
                    if (m >> HI_SHIFT) == bk:
                        h[m & 0xFFFF] += 1


# ------------------------------------------------------------------ merge


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
def _count_ties(x, n, t):
    bits = x.view(np.uint32)
    c = 0
    for e in range(n):
        c += np.int64(bits[e] & MAG_MASK) == t
    return c


@njit(cache=True, nogil=True)
def _trim_weight(x, n, t, keep_ties, w, u):
    """u = w * (x if kept else 0): keep |x| > t, and |x| == t when keep_ties."""
    bits = x.view(np.uint32)
    for e in range(n):
        mag = np.int64(bits[e] & MAG_MASK)
        keep = (mag > t) | (keep_ties & (mag == t))
        u[e] = w * (x[e] if keep else np.float32(0.0))


@njit(cache=True, nogil=True)
def _thin_ties(x, n, t, q, m, rem, w, u):
    """Scalar pass over the tied elements: keep the j-th iff r_j + q >= m; return r."""
    bits = x.view(np.uint32)
    for e in range(n):
        if np.int64(bits[e] & MAG_MASK) == t:
            keep = rem + q >= m
            rem = rem + q - (m if keep else 0)
            u[e] = w * (x[e] if keep else np.float32(0.0))
    return rem


@njit(cache=True, nogil=True)
def _weighted_sum(rows, base, n, has_base, weights, normalize, eps, lam, o):
    """No trim, no election (task arithmetic, linear): o = B + lam * (sum w_i x_i) / D with
    D the float32 sum of all weights (|D| < eps -> 1), in the reference's operation order."""
    delta = np.zeros(n, np.float32)
    for i in range(rows.shape[0]):
        w = weights[i]
        x = rows[i]
        for e in range(n):
            delta[e] += w * x[e]
    if normalize:
        dd = np.float32(0.0)
        for i in range(rows.shape[0]):
            dd += weights[i]
        if dd == 0 or abs(np.float64(dd)) < eps:
            dd = np.float32(1.0)
        for e in range(n):
            delta[e] = delta[e] / dd
    for e in range(n):
        d = lam * delta[e]
        o[e] = (base[e] + d) if has_base else d


@njit(cache=True, nogil=True)
def _merge_block(rows, base, n, has_base, weights, tbits, tq, tm, thin, rem, consensus, normalize, eps, lam,
                 o, cnt):
    """Trim and weight each model, elect, disjoint sum, normalise, add the base: o[:n]."""
    nm = rows.shape[0]
    if consensus == CONSENSUS_NONE and (tbits < 0).all():
        _weighted_sum(rows, base, n, has_base, weights, normalize, eps, lam, o)
        return
    u = np.empty((nm, n), np.float32)
    for i in range(nm):
        _trim_weight(rows[i], n, tbits[i], tq[i] > 0, weights[i], u[i])
        if thin[i]:
            _thin_ties(rows[i], n, tbits[i], tq[i], tm[i], rem[i], weights[i], u[i])

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
    for e in range(n):
        conflicts += pos[e] & neg[e]
        d = delta[e]
        if normalize:
            dd = denom[e]
            if dd == 0 or abs(dd) < eps:
                dd = np.float32(1.0)
            d = d / dd
        d = lam * d
        o[e] = (base[e] + d) if has_base else d
    cnt[0] += conflicts


@njit(parallel=True, cache=True, nogil=True)
def merge(addrs, modes, luts, rnd, has_base, lo, hi, block, check, sums, bad, weights, tbits, tq, tm, tie_pos,
          consensus, normalize, eps, lam, out_addr, out_mode, counts):
    """Merge elements lo..hi into the output buffer (element lo at its start); return
    how many encoded results are Inf/NaN.

    weights  float32[nm]
    tbits    int64[nm]   threshold magnitude bits: keep |x| > t; -1 keeps all, 2**31 none
    tq, tm   int64[nm]   of the tm elements with |x| == t, keep tq (thinned)
    tie_pos  int64[nm]   ordinal of this span's first tied element; advanced
    consensus            0 none (every model agrees), 1 sum, 2 count
    normalize            divide by the sum of agreeing weights D (|D| < eps or 0 -> 1)
    lam      float32     scales the merged delta
    counts   int64[1 + 2*nm] += [sign conflicts, per model: kept nonzero, excluded]
    Rows are task vectors when has_base, else the models (linear). With `check`, also
    the engine's first-pass checks (span.check_block)."""
    nm = addrs.shape[0] - 1
    nb = (hi - lo + block - 1) // block
    thin = (tq > 0) & (tq < tm)
    start = np.zeros((nb, nm), np.int64)
    if thin.any():  # per-block tie counts, prefix-summed into each block's first ordinal
        ties = np.zeros((nb, nm), np.int64)
        sel = np.flatnonzero(thin)  # decode only the base and the models whose ties are thinned
        sub_addrs = np.empty(1 + sel.size, np.int64)
        sub_modes = np.empty(1 + sel.size, np.int64)
        sub_addrs[0], sub_modes[0] = addrs[0], modes[0]
        for j in range(sel.size):
            sub_addrs[1 + j], sub_modes[1 + j] = addrs[1 + sel[j]], modes[1 + sel[j]]
        for b in prange(nb):
            s = lo + b * block
            n = min(block, hi - s)
            rows = np.empty((sel.size, n), np.float32)
            base = np.empty(n, np.float32)
            load_rows(sub_addrs, sub_modes, luts, rnd, has_base, has_base, s, n, rows, base)
            for j in range(sel.size):
                ties[b, sel[j]] = _count_ties(rows[j], n, tbits[sel[j]])
        for i in range(nm):
            j = tie_pos[i]
            for b in range(nb):
                start[b, i] = j
                j += ties[b, i]
            tie_pos[i] = j

    per_block = np.zeros((nb, 2 + 2 * nm), np.int64)  # [.., overflow] per block
    for b in prange(nb):
        s = lo + b * block
        n = min(block, hi - s)
        rows = np.empty((nm, n), np.float32)
        base = np.empty(n, np.float32)
        load_rows(addrs, modes, luts, rnd, has_base, has_base, s, n, rows, base)
        if check:
            check_block(rows, base, n, has_base, sums, s // block, bad[b])
        rem = np.zeros(nm, np.int64)
        for i in range(nm):
            if thin[i]:
                rem[i] = _mulmod(start[b, i], tq[i], tm[i])
        o = np.empty(n, np.float32)
        _merge_block(rows, base, n, has_base, weights, tbits, tq, tm, thin, rem, consensus, normalize, eps, lam,
                     o, per_block[b])
        per_block[b, 1 + 2 * nm] = store(o, n, out_addr, out_mode, s - lo)
    overflow = 0
    for b in range(nb):
        for j in range(1 + 2 * nm):
            counts[j] += per_block[b, j]
        overflow += per_block[b, 1 + 2 * nm]
    return overflow
