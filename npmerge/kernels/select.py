"""Exact k-th largest magnitude by two streamed radix histograms.

Non-negative float32 values order like their uint32 bit patterns, so the k-th
largest |x| is found without sorting: a histogram of the high 15 bits of the
31-bit magnitude finds the bucket holding it, a histogram of the low 16 bits of
the elements inside that bucket finds the exact value and how many elements equal
it. Counts are integers, so per-thread histograms summed in any order give the
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


@njit(parallel=True, cache=True, nogil=True)
def hist_hi(rows, active, hist):
    """hist[p, i, mag >> 16] += 1 for every element of row i (active rows only)."""
    parts = hist.shape[0]
    nm, c = rows.shape
    for p in prange(parts):
        lo = p * c // parts
        hi = (p + 1) * c // parts
        for i in range(nm):
            if active[i]:
                h = hist[p, i]
                for e in range(lo, hi):
                    h[(rows[i, e] & MAG_MASK) >> HI_SHIFT] += 1


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


@njit(parallel=True, cache=True, nogil=True)
def block_sumsq(rows, block, out):
    """out[i, b] = float64 sum of rows[i]**2 over block b, summed in index order.

    The block grid is global (chunks are whole multiples of `block`), so the
    partial sums do not depend on chunking or threads."""
    nm, c = rows.shape
    nblocks = (c + block - 1) // block
    for b in prange(nblocks):
        lo = b * block
        hi = min(lo + block, c)
        for i in range(nm):
            s = 0.0
            for e in range(lo, hi):
                v = np.float64(rows[i, e])
                s += v * v
            out[i, b] = s


@njit(parallel=True, cache=True, nogil=True)
def count_nonfinite(rows, out):
    """out[i] = number of NaN/Inf values in row i."""
    nm, c = rows.shape
    for i in range(nm):
        n = 0
        for e in prange(c):
            if not np.isfinite(rows[i, e]):
                n += 1
        out[i] = n
