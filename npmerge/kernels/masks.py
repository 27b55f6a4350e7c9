"""Which elements of a model's task vector survive its sparsifier, block by block: the
SELECT record the family driver fills per model, rank selection with thinned ties, DARE's
random mask and DELLA's row-rank probabilities, and applying the mask and rescale.
The span kernels that use them are kernels/family.py's; the rules are its docstring's
(and docs/semantics.md's)."""

import numpy as np
from numba import njit

from .bits import HELPER, JIT, f32_bits
from .philox import uniform24
from .span import DELTA, load_one, thin_step

MAG_MASK = 0x7FFFFFFF
TWO_M24 = 2.0 ** -24

# SELECT.kind: what a model's sparsifier keeps
KEEP_ALL = 0  # the whole task vector (density >= 1, or no sparsifier)
DROP_ALL = 1  # nothing (density 0, or k = 0)
RANK = 2  # keep(|x|, lo, hi): boundary values t_hi >= t_lo, ties thinned
RANDOM = 3  # u < rho, i.e. u * 2**24 < below
DELLA = 4  # u < p, p from the rank of |x| in its row of `row` elements

# SELECT.rescale: what multiplies the kept elements
SCALE_NONE = 0
SCALE_FACTOR = 1  # fl32 factor (l1 rescale, or 1/rho for DARE's inverse)
SCALE_INVERSE = 2  # fl32(1 / p) per element (DELLA's inverse)

ONE = np.float32(1.0)
NO_TOP = 1 << 32  # t_hi when nothing above is dropped
NO_BOTTOM = -1  # t_lo when nothing below is dropped

SELECT = np.dtype([
    ("kind", np.int64),
    # RANK: |x| > t_hi and |x| < t_lo dropped; of the m_* elements equal to t_*, q_* kept;
    # j_*: ordinal of the current span's first such element (advanced by the driver)
    ("t_hi", np.int64), ("q_hi", np.int64), ("m_hi", np.int64), ("j_hi", np.int64),
    ("t_lo", np.int64), ("q_lo", np.int64), ("m_lo", np.int64), ("j_lo", np.int64),
    ("stream", np.uint64),  # RANDOM, DELLA: Philox stream s of this model and tensor
    ("below", np.int64),  # RANDOM: keep iff u * 2**24 < below (= ceil(rho * 2**24))
    ("row", np.int64),  # DELLA: row length C (> 1)
    ("p_a", np.float64), ("p_b", np.float64),  # DELLA: p = p_a + (p_b * (r - 1)) / (C - 1)
    ("rescale", np.int64), ("factor", np.float32),
    ("l1", np.bool_),  # the sums pass wants this model's sum |x| and sum |kept x|
])


def thins(sel: np.ndarray) -> np.ndarray:
    """Which boundary groups of each model's RANK record are thinned: bool[nm, 2] (upper, lower)."""
    rank = sel["kind"] == RANK
    upper = rank & (0 < sel["q_hi"]) & (sel["q_hi"] < sel["m_hi"])
    lower = rank & (0 < sel["q_lo"]) & (sel["q_lo"] < sel["m_lo"]) & (sel["t_lo"] != sel["t_hi"])
    return np.stack([upper, lower], axis=1)


@njit(**HELPER)
def keep_rank(x, n, s, keep):
    """keep(|x|, lo, hi) except the elements of a boundary group that is thinned (those
    are left out here: see thin_group). KEEP_ALL and DROP_ALL records have boundaries that keep
    every element, or none."""
    th, tl = s.t_hi, s.t_lo
    all_hi, all_lo = s.q_hi == s.m_hi, s.q_lo == s.m_lo
    for e in range(n):
        mag = np.int64(f32_bits(x[e]) & MAG_MASK)
        keep[e] = ((mag < th) | (all_hi & (mag == th))) & ((mag > tl) | (all_lo & (mag == tl)))


@njit(**HELPER)
def select_rank(x, n, s, w, pend, u):
    """u[e] = w * tau_hat[e] for the merge pass of rank selection: kept elements x (times
    the rescale factor), dropped and pending (pend[e] != 0) ones +0, in one loop (keep_rank
    and apply_mask fused). Returns how many are kept."""
    th, tl = s.t_hi, s.t_lo
    all_hi, all_lo = s.q_hi == s.m_hi, s.q_lo == s.m_lo
    f = s.factor if s.rescale == SCALE_FACTOR else np.float32(1.0)
    scaled = s.rescale == SCALE_FACTOR
    zero = np.float32(0.0)
    kept = 0
    for e in range(n):
        v = x[e]
        mag = np.int64(f32_bits(v) & MAG_MASK)
        k = ((mag < th) | (all_hi & (mag == th))) & ((mag > tl) | (all_lo & (mag == tl))) & (pend[e] == 0)
        if scaled:
            v = v * f
        u[e] = w * (v if k else zero)
        kept += k
    return kept


@njit(**HELPER)
def thin_group(x, n, t, q, m, rem, keep):
    """Scalar pass over the elements equal to t: keep the j-th iff r_j + q >= m; return r."""
    for e in range(n):
        if np.int64(f32_bits(x[e]) & MAG_MASK) == t:
            keep[e], rem = thin_step(rem, q, m)
    return rem


@njit(**HELPER)
def keep_thinned(x, n, s, thin, rem, keep):
    """keep_rank with the thinned boundary groups decided from the running remainders
    rem[0] (upper), rem[1] (lower), which advance."""
    keep_rank(x, n, s, keep)
    if thin[0]:
        rem[0] = thin_group(x, n, s.t_hi, s.q_hi, s.m_hi, rem[0], keep)
    if thin[1]:
        rem[1] = thin_group(x, n, s.t_lo, s.q_lo, s.m_lo, rem[1], keep)


@njit(**HELPER)
def mark_ties(x, n, t, pend):
    """pend[e] |= (|x[e]| == t) (uint8); return how many equal t."""
    c = 0
    for e in range(n):
        tie = np.int64(f32_bits(x[e]) & MAG_MASK) == t
        c += np.uint32(tie)
        pend[e] |= np.uint8(tie)
    return c


@njit(**HELPER)
def keep_random(s, seed, e0, n, keep, u24):
    """DARE: keep iff u * 2**24 < below."""
    if s.kind != RANDOM:  # KEEP_ALL, DROP_ALL
        for e in range(n):
            keep[e] = s.kind == KEEP_ALL
        return
    uniform24(seed, s.stream, e0, n, u24)
    below = s.below
    for e in range(n):
        keep[e] = np.int64(u24[e]) < below


@njit(**JIT)  # with a Python wrapper: tests call it
def ascending(mags, order, keys, tmp, count):
    """order[:C] = indices of mags (31-bit magnitudes, uint32; overwritten) in ascending
    order, equal values by index: a stable LSD radix sort of (key, index) pairs with
    11-bit digits (three passes; the digit histograms come from one read, and a pass whose
    digit is the same for every element is skipped). keys, tmp: scratch of C; count:
    int64[3, 2048]."""
    C = mags.shape[0]
    count[:] = 0
    for c in range(C):
        m = mags[c]
        count[0, m & 0x7FF] += 1
        count[1, (m >> 11) & 0x7FF] += 1
        count[2, m >> 22] += 1
        order[c] = c
    src_k, src_o, dst_k, dst_o = mags, order, keys, tmp
    swapped = False
    for d in range(3):
        h = count[d]
        if h.max() == C:
            continue
        total = 0
        for b in range(2048):
            total, h[b] = total + h[b], total
        shift = 11 * d
        for c in range(C):
            k = src_k[c]
            j = h[(k >> shift) & 0x7FF]
            h[(k >> shift) & 0x7FF] = j + 1
            dst_k[j] = k
            dst_o[j] = src_o[c]
        src_k, src_o, dst_k, dst_o = dst_k, dst_o, src_k, src_o
        swapped = not swapped
    if swapped:  # the sorted indices are in tmp
        for c in range(C):
            order[c] = tmp[c]


@njit(**HELPER)
def della_p(inp, i, e0, n, C, pa, pb, p, rs):
    """p[t] = DELLA's keep probability of element e0 + t of model i: rows of C elements
    along the last axis, r = 1 + position in the ascending order of |tau| within the row
    (equal values by index), p = pa + (pb * (r - 1)) / (C - 1) in float64. Reads every
    row the range touches whole (rows may extend beyond the span). rs: RowScratch."""
    vals = rs.vals[:, :C]  # the model's row, the base's row
    mags = rs.mags[:C]
    order = rs.order[:C]
    keys = rs.keys[:C]
    tmp = rs.tmp[:C]
    count = rs.count
    delta = (inp[4][1 + i] & DELTA) != 0  # the source holds task-vector values
    for r in range(e0 // C, (e0 + n - 1) // C + 1):
        start = r * C
        load_one(inp, 1 + i, start, C, vals[0])
        row = vals[0]
        if not delta:
            load_one(inp, 0, start, C, vals[1])
            for c in range(C):
                row[c] = row[c] - vals[1, c]
        for c in range(C):
            mags[c] = f32_bits(row[c]) & MAG_MASK
        ascending(mags, order, keys, tmp, count)
        first = max(e0 - start, 0)
        last = min(e0 + n - start, C)
        for pos in range(C):
            c = order[pos]
            if first <= c < last:
                p[start + c - e0] = pa + ((pb * np.float64(pos)) / np.float64(C - 1))


@njit(**HELPER)
def keep_della(inp, i, s, seed, e0, n, keep, u24, p, rs):
    """DELLA: keep iff u < p (rows of one element: DARE's constant p, kind RANDOM)."""
    if s.kind != DELLA:
        keep_random(s, seed, e0, n, keep, u24)
        return
    uniform24(seed, s.stream, e0, n, u24)
    della_p(inp, i, e0, n, s.row, s.p_a, s.p_b, p, rs)
    for e in range(n):
        keep[e] = np.float64(u24[e]) * TWO_M24 < p[e]


@njit(**HELPER)
def apply_mask(x, keep, n, s, p, w, out):
    """out[:n] = w * tau_hat: kept elements x (times the rescale), dropped +0.0, times the
    model's weight w (1 for the l1 sums). Returns how many are kept."""
    kept = 0
    zero = np.float32(0.0)
    if s.rescale == SCALE_NONE:
        for e in range(n):
            out[e] = w * (x[e] if keep[e] else zero)
            kept += keep[e]
    elif s.rescale == SCALE_FACTOR:
        f = s.factor
        for e in range(n):
            out[e] = w * (x[e] * f if keep[e] else zero)
            kept += keep[e]
    else:
        for e in range(n):
            out[e] = w * (x[e] * np.float32(1.0 / p[e]) if keep[e] else zero)
            kept += keep[e]
    return kept
