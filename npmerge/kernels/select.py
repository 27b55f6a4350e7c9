"""Exact k-th largest magnitude by two streamed radix histograms.

Non-negative float32 values order like their uint32 bit patterns, so the k-th
largest |x| is found without sorting: a histogram of the high 15 bits of the
31-bit magnitude finds the bucket holding it, a histogram of the low 16 bits of
the elements inside that bucket finds the exact value and how many elements equal
it. The first histogram also tells, per bucket, how many elements have non-zero
low bits, which often settles the value without the second pass. Counts are integers, so per-thread histograms summed in any order give the
same answer whatever the chunking or thread count.

Inputs are float32 work rows viewed as uint32 (zero copy); `hist` has one slice
per partition (the caller passes numba's thread count) so no two threads ever
write the same counter.
"""

import numpy as np
from numba import njit, prange

HI_SHIFT = 16
HI_BUCKETS = 1 << 15  # magnitude bits 30..16
LO_BUCKETS = 1 << 16  # magnitude bits 15..0
MAG_MASK = 0x7FFFFFFF
EXP_MASK = 0x7F800000


@njit(parallel=True, cache=True, nogil=True)
def hist_hi(rows, active, hist):
    """hist[p, i, 2 * (mag >> 16) + (mag & 0xFFFF != 0)] += 1 for every element of row i
    (active rows only): the high-bits histogram, each bucket split by whether the low
    16 bits are zero.

    The split lets the caller skip the low-bits pass when the k-th largest is one of the
    bucket's low-zero elements, which all equal the bucket's floor (usual for BF16
    models: their deltas rarely have more than 8 significant bits). One increment per
    element, like the plain histogram: a second, conditional one cost twice as much."""
    parts = hist.shape[0]
    nm, c = rows.shape
    for p in prange(parts):
        lo = p * c // parts
        hi = (p + 1) * c // parts
        for i in range(nm):
            if active[i]:
                h = hist[p, i]
                for e in range(lo, hi):
                    m = rows[i, e] & MAG_MASK
                    h[((m >> HI_SHIFT) << 1) | np.uint32((m & 0xFFFF) != 0)] += 1


@njit(parallel=True, cache=True, nogil=True)
def hist_lo(rows, bucket, hist):
    """hist[p, i, mag & 0xFFFF] += 1 for elements of row i whose high bits equal bucket[i] (>= 0)."""
    parts = hist.shape[0]
    nm, c = rows.shape
    for p in prange(parts):
        lo = p * c // parts
        hi = (p + 1) * c // parts
        for i in range(nm):
            b = bucket[i]
            if b >= 0:
                h = hist[p, i]
                for e in range(lo, hi):
                    m = rows[i, e] & MAG_MASK
                    if (m >> HI_SHIFT) == b:
                        h[m & 0xFFFF] += 1


@njit(cache=True, nogil=True)
def _sumsq(x):
    """float64 sum of x**2 over a short 1-D slice.

    Eight interleaved accumulators (element e goes to e % 8, combined in a fixed
    order) break the add-latency chain; the order is a function of the block
    alone, so the result is as deterministic as a plain left-to-right sum."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    n = x.shape[0]
    main = n - n % 8
    for e in range(0, main, 8):
        v0 = np.float64(x[e]); v1 = np.float64(x[e + 1]); v2 = np.float64(x[e + 2]); v3 = np.float64(x[e + 3])
        v4 = np.float64(x[e + 4]); v5 = np.float64(x[e + 5]); v6 = np.float64(x[e + 6]); v7 = np.float64(x[e + 7])
        a0 += v0 * v0; a1 += v1 * v1; a2 += v2 * v2; a3 += v3 * v3
        a4 += v4 * v4; a5 += v5 * v5; a6 += v6 * v6; a7 += v7 * v7
    for e in range(main, n):
        v = np.float64(x[e])
        a0 += v * v
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(cache=True, nogil=True)
def _nonfinite(x):
    """Count of NaN/Inf in a short 1-D slice (exponent bits all ones; an integer loop that vectorises)."""
    bits = x.view(np.uint32)
    bad = 0
    for e in range(x.shape[0]):
        bad += (bits[e] & EXP_MASK) == EXP_MASK
    return bad


@njit(parallel=True, cache=True, nogil=True)
def block_stats(rows, block, sumsq, nonfinite):
    """sumsq[i, b] = float64 sum of rows[i]**2 over block b (skipped when sumsq has no
    columns, e.g. for the base); nonfinite[i] += NaN/Inf count of row i.

    The block grid is global (chunks are whole multiples of `block`), so the
    partial sums do not depend on chunking or threads."""
    nm, c = rows.shape
    nblocks = (c + block - 1) // block
    want_sumsq = sumsq.shape[1] != 0
    bad = np.zeros((nblocks, nm), np.int64)
    for b in prange(nblocks):
        lo = b * block
        hi = min(lo + block, c)
        for i in range(nm):
            x = rows[i, lo:hi]
            if want_sumsq:
                sumsq[i, b] = _sumsq(x)
            bad[b, i] = _nonfinite(x)
    for b in range(nblocks):
        for i in range(nm):
            nonfinite[i] += bad[b, i]
