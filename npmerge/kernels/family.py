"""Fused span kernels of the task-arithmetic family (TIES, task arithmetic, linear,
DARE, breadcrumbs, DELLA): exact rank selection by radix histograms, random masks,
and sparsify / rescale / elect / disjoint merge / encode.

Each kernel covers one span of a tensor in one parallel region of cache-sized pieces
(see span.py for how inputs are passed). Everything is float32, in the exact operation
order of tests/reference.py, so results match it bit for bit.

What each model's sparsifier does is one record of `SELECT` per model (`sel`), filled
by the driver (methods/family.py); every method runs the same compiled kernels.

Rank selection keep(|x|, lo, hi): non-negative float32 values order like their uint32
bit patterns, so the values at the boundary ranks lo and hi - 1 are found without
sorting: a histogram of the high 15 bits of the 31-bit magnitude finds the bucket
holding each, a histogram of the low 16 bits of the elements inside that bucket the
exact value and how many elements equal it. The first histogram also tells, per bucket,
how many elements have non-zero low bits, which usually settles a value without the
second pass. Counts are integers in per-thread histograms, so any chunking or thread
count gives the same answer. Elements strictly between the two boundary values are
kept; those above the upper one (t_hi) and below the lower one (t_lo) are dropped.

Ties at a boundary are thinned evenly along the flat index: the j-th of the m elements
equal to t, of which q are kept, is kept iff floor((j+1)q/m) > floor(jq/m). The running
ordinal j is carried across spans in `sel` (j_hi, j_lo) and across pieces by a prefix
sum of per-piece tie counts, so the choice never depends on span size or thread count.
Instead of big products j*q the kernel steps the remainder r = j*q mod m: element j is
kept iff r + q >= m. When both boundaries are one value the group is thinned once.

Random masks (DARE, DELLA): element e keeps iff u < p with u from Philox
(philox.uniform24), p = rho (DARE) or DELLA's probability from the rank of |x| within
its row along the last axis, which the kernel computes by reading the whole row.
"""

from collections import namedtuple

import numba
import numpy as np
from numba import njit, prange

from .philox import uniform24
from .span import DELTA, block_scratch, check_block, load, load_rows, mulmod, store

HI_SHIFT = 16
HI_BUCKETS = 1 << 15  # magnitude bits 30..16
LO_BUCKETS = 1 << 16  # magnitude bits 15..0
MAG_MASK = 0x7FFFFFFF
TWO_M24 = 2.0 ** -24

CONSENSUS_NONE = 0
CONSENSUS_SUM = 1
CONSENSUS_COUNT = 2

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

NO_TOP = 1 << 32  # t_hi when nothing above is dropped
NO_BOTTOM = -1  # t_lo when nothing below is dropped

SELECT = np.dtype([
    ("kind", np.int64),
    # RANK: |x| > t_hi and |x| < t_lo dropped; of the m_* elements equal to t_*, q_* kept;
    # j_*: ordinal of the current span's first such element (advanced by the kernels)
    ("t_hi", np.int64), ("q_hi", np.int64), ("m_hi", np.int64), ("j_hi", np.int64),
    ("t_lo", np.int64), ("q_lo", np.int64), ("m_lo", np.int64), ("j_lo", np.int64),
    ("stream", np.uint64),  # RANDOM, DELLA: Philox stream s of this model and tensor
    ("below", np.int64),  # RANDOM: keep iff u * 2**24 < below (= ceil(rho * 2**24))
    ("row", np.int64),  # DELLA: row length C (> 1)
    ("p_a", np.float64), ("p_b", np.float64),  # DELLA: p = p_a + (p_b * (r - 1)) / (C - 1)
    ("rescale", np.int64), ("factor", np.float32),
    ("l1", np.bool_),  # the sums pass wants this model's sum |x| and sum |kept x|
])


# ------------------------------------------------------------------ selection histograms


@njit(parallel=True, cache=True, nogil=True)
def hist_hi(addrs, modes, luts, rnd, has_base, lo, hi, block, check, sq, bad, active, hist):
    """hist[t, i, 2 * (mag >> 16) + (mag & 0xFFFF != 0)] += 1 over the task vectors of
    the active models, elements lo..hi (t: the thread's slot).

    The split of each bucket by zero/non-zero low bits lets the caller skip the
    low-bits pass when a boundary is one of the bucket's low-zero elements, which all
    equal the bucket's floor (usual for BF16 models). With `check`, also the engine's
    first-pass checks (span.check_block)."""
    nm = addrs.shape[0] - 1
    nb = (hi - lo + block - 1) // block
    rows_t, base_t = block_scratch(hist.shape[0], nm, block)  # hist: one slot per thread
    for b in prange(nb):
        s = lo + b * block
        n = min(block, hi - s)
        t = numba.get_thread_id()
        rows, base = rows_t[t], base_t[t]
        load_rows(addrs, modes, luts, rnd, has_base, True, s, n, rows, base)
        if check:
            check_block(rows, base, n, has_base, sq, s // block, bad[b])
        for i in range(nm):
            if active[i]:
                h = hist[t, i]
                bits = rows[i].view(np.uint32)
                for e in range(n):
                    m = bits[e] & MAG_MASK
                    h[((m >> HI_SHIFT) << 1) | np.uint32((m & 0xFFFF) != 0)] += 1


@njit(parallel=True, cache=True, nogil=True)
def hist_lo(addrs, modes, luts, rnd, has_base, lo, hi, block, slot_model, slot_bucket, hist):
    """hist[t, k, mag & 0xFFFF] += 1 for task-vector elements of model slot_model[k]
    whose high magnitude bits equal slot_bucket[k] (one slot per bucket a boundary of a
    model lies in)."""
    nm = addrs.shape[0] - 1
    nb = (hi - lo + block - 1) // block
    rows_t, base_t = block_scratch(hist.shape[0], nm, block)  # hist: one slot per thread
    for b in prange(nb):
        s = lo + b * block
        n = min(block, hi - s)
        t = numba.get_thread_id()
        rows, base = rows_t[t], base_t[t]
        load_rows(addrs, modes, luts, rnd, has_base, True, s, n, rows, base)
        for k in range(slot_model.shape[0]):
            bk = slot_bucket[k]
            h = hist[t, k]
            bits = rows[slot_model[k]].view(np.uint32)
            for e in range(n):
                m = bits[e] & MAG_MASK
                if (m >> HI_SHIFT) == bk:
                    h[m & 0xFFFF] += 1


# ------------------------------------------------------------------ sparsify one piece


@njit(cache=True, nogil=True)
def _count_ties(x, n, t):
    bits = x.view(np.uint32)
    c = 0
    for e in range(n):
        c += np.int64(bits[e] & MAG_MASK) == t
    return c


@njit(cache=True, nogil=True)
def _thins(s):
    """Which boundary groups of a RANK record are thinned: (upper, lower)."""
    hi = s.kind == RANK and 0 < s.q_hi < s.m_hi
    lo = s.kind == RANK and 0 < s.q_lo < s.m_lo and s.t_lo != s.t_hi
    return hi, lo


@njit(cache=True, nogil=True)
def _thin(x, n, t, q, m, rem, keep):
    """Scalar pass over the elements equal to t: keep the j-th iff r_j + q >= m; return r."""
    bits = x.view(np.uint32)
    for e in range(n):
        if np.int64(bits[e] & MAG_MASK) == t:
            k = rem + q >= m
            rem = rem + q - (m if k else 0)
            keep[e] = k
    return rem


@njit(cache=True, nogil=True)
def _ascending(mags, order, keys, tmp, count):
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
        order[:] = tmp


# A thread's DELLA row buffers: both rows (float32[2, C]), magnitudes, sort order, the
# sort's key and index copies, radix counts (int64[3, 2048]).
RowScratch = namedtuple("RowScratch", "vals mags order keys tmp count")


@njit(cache=True, nogil=True)
def _della_p(addrs, modes, luts, rnd, i, e0, n, C, pa, pb, p, rs):
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
    delta = (modes[1 + i] & DELTA) != 0
    for r in range(e0 // C, (e0 + n - 1) // C + 1):
        start = r * C
        for k in range(1 if delta else 2):  # one call site of the (large) decoder
            slot = 1 + i if k == 0 else 0
            load(addrs[slot], modes[slot], luts, rnd, start, C, vals[k])
        row = vals[0]
        if not delta:
            for c in range(C):
                row[c] = row[c] - vals[1, c]
        bits = row.view(np.uint32)
        for c in range(C):
            mags[c] = bits[c] & MAG_MASK
        _ascending(mags, order, keys, tmp, count)
        first = max(e0 - start, 0)
        last = min(e0 + n - start, C)
        for pos in range(C):
            c = order[pos]
            if first <= c < last:
                p[start + c - e0] = pa + ((pb * np.float64(pos)) / np.float64(C - 1))


@njit(cache=True, nogil=True)
def _sparsify(addrs, modes, luts, rnd, sel, i, seed, x, n, e0, rem, keep, u24, p, out, rs):
    """out[:n] = tau_hat of model i on elements e0..e0+n (x: its task vector there):
    kept elements x (times the rescale), dropped +0.0. Returns how many are kept.
    rem[i, 0 / 1]: running remainders of the upper / lower boundary ties (advanced)."""
    s = sel[i]
    kind = s.kind
    if kind == KEEP_ALL:
        for e in range(n):
            out[e] = x[e]
        return n
    if kind == DROP_ALL:
        for e in range(n):
            out[e] = np.float32(0.0)
        return 0
    if kind == RANK:
        th, tl = s.t_hi, s.t_lo
        all_hi, all_lo = s.q_hi == s.m_hi, s.q_lo == s.m_lo
        bits = x.view(np.uint32)
        for e in range(n):
            mag = np.int64(bits[e] & MAG_MASK)
            keep[e] = ((mag < th) | (all_hi & (mag == th))) & ((mag > tl) | (all_lo & (mag == tl)))
        thin_hi, thin_lo = _thins(s)
        if thin_hi:
            rem[i, 0] = _thin(x, n, th, s.q_hi, s.m_hi, rem[i, 0], keep)
        if thin_lo:
            rem[i, 1] = _thin(x, n, tl, s.q_lo, s.m_lo, rem[i, 1], keep)
    else:
        uniform24(seed, s.stream, e0, n, u24)
        if kind == RANDOM:
            below = s.below
            for e in range(n):
                keep[e] = np.int64(u24[e]) < below
        else:
            _della_p(addrs, modes, luts, rnd, i, e0, n, s.row, s.p_a, s.p_b, p, rs)
            for e in range(n):
                keep[e] = np.float64(u24[e]) * TWO_M24 < p[e]
    kept = 0
    zero = np.float32(0.0)
    if s.rescale == SCALE_NONE:
        for e in range(n):
            out[e] = x[e] if keep[e] else zero
            kept += keep[e]
    elif s.rescale == SCALE_FACTOR:
        f = s.factor
        for e in range(n):
            out[e] = x[e] * f if keep[e] else zero
            kept += keep[e]
    else:
        for e in range(n):
            out[e] = x[e] * np.float32(1.0 / p[e]) if keep[e] else zero
            kept += keep[e]
    return kept


# ------------------------------------------------------------------ merge one piece


@njit(cache=True, nogil=True)
def _weighted_sum(rows, base, n, has_base, weights, normalize, eps, lam, o, delta):
    """No sparsifier, no election (task arithmetic, linear): o = B + lam * (sum w_i x_i) / D
    with D the float32 sum of all weights (|D| < eps -> 1), in the reference's operation order.
    delta: float32 scratch."""
    delta[:n] = 0
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
def _combine(u, base, n, has_base, weights, consensus, normalize, eps, lam, o, cnt, f32s, b8s, i32s):
    """From the weighted sparsified deltas u[i, :n]: elect, disjoint sum, normalise,
    scale, add the base: o[:n]. cnt += [sign conflicts, per model: -, nonzero, excluded].
    f32s (3 x block), b8s (3 x block), i32s (block): scratch."""
    nm = u.shape[0]
    # Elect: positive[e] is the sign every agreeing u must have.
    positive = b8s[0]
    positive[:n] = True
    if consensus == CONSENSUS_SUM:
        s = f32s[0]
        s[:n] = 0
        for i in range(nm):
            ui = u[i]
            for e in range(n):
                s[e] += ui[e]
        for e in range(n):
            positive[e] = s[e] >= 0
    elif consensus == CONSENSUS_COUNT:
        k = i32s
        k[:n] = 0
        for i in range(nm):
            ui = u[i]
            for e in range(n):
                k[e] += np.int32(ui[e] > 0) - np.int32(ui[e] < 0)
        for e in range(n):
            positive[e] = k[e] >= 0

    # Disjoint sum of the agreeing deltas and their weights, with statistics.
    delta, denom, pos, neg = f32s[1], f32s[2], b8s[1], b8s[2]
    delta[:n] = 0
    denom[:n] = 0
    pos[:n] = False
    neg[:n] = False
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
        cnt[2 + 3 * i] += nonzero
        cnt[3 + 3 * i] += excluded
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


# ------------------------------------------------------------------ the span kernel


@njit(cache=True, nogil=True)
def _add_abs(x, y, n, e0, x_lanes, y_lanes):
    """x_lanes[(e0 + e) % 8] += |x[e]| and y_lanes[...] += |y[e]| (float64) for e < n in
    increasing e: the reduction rule's lanes (SEMANTICS-2 A), both sums in one loop."""
    head = min(n, (8 - (e0 & 7)) & 7)
    for e in range(head):
        x_lanes[(e0 + e) & 7] += abs(np.float64(x[e]))
        y_lanes[(e0 + e) & 7] += abs(np.float64(y[e]))
    a = x_lanes.copy()
    b = y_lanes.copy()
    main = head + (n - head) // 8 * 8
    for e in range(head, main, 8):  # x[e] is lane 0 here
        for lane in range(8):
            a[lane] += abs(np.float64(x[e + lane]))
            b[lane] += abs(np.float64(y[e + lane]))
    x_lanes[:] = a
    y_lanes[:] = b
    for e in range(main, n):
        x_lanes[(e0 + e) & 7] += abs(np.float64(x[e]))
        y_lanes[(e0 + e) & 7] += abs(np.float64(y[e]))


@njit(cache=True, nogil=True)
def _piece_ties(addrs, modes, luts, rnd, has_base, a, z, block, sel, thin, which, ties, rows, base):
    """ties[i, side] = elements a..z of model i equal to its boundary value, for the models
    `which` (addrs holds the base and just those models: only they are decoded); rows and
    base: scratch of `block` elements."""
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(addrs, modes, luts, rnd, has_base, has_base, s, n, rows, base)
        for j in range(which.size):
            i = which[j]
            if thin[i, 0]:
                ties[i, 0] += _count_ties(rows[j], n, sel[i].t_hi)
            if thin[i, 1]:
                ties[i, 1] += _count_ties(rows[j], n, sel[i].t_lo)


@njit(cache=True, nogil=True)
def _piece(addrs, modes, luts, rnd, has_base, lo, a, z, grid, block, check, sq, bad, sel, thin, start, seed, weights,
           consensus, normalize, eps, lam, l1, lanes, out_addr, out_mode, cnt, rows, base, u, keep, u24, prob, o, f32s,
           b8s, i32s, rs):
    """Elements a..z (one piece, in sub-blocks of `block`) of the span starting at lo;
    start[i, side]: the piece's first tie ordinals; the rest: the thread's scratch. See `run`."""
    nm = addrs.shape[0] - 1
    rem = np.zeros((nm, 2), np.int64)
    plain = consensus == CONSENSUS_NONE and not l1
    for i in range(nm):
        plain &= sel[i].kind == KEEP_ALL
        if thin[i, 0]:
            rem[i, 0] = mulmod(start[i, 0], sel[i].q_hi, sel[i].m_hi)
        if thin[i, 1]:
            rem[i, 1] = mulmod(start[i, 1], sel[i].q_lo, sel[i].m_lo)
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(addrs, modes, luts, rnd, has_base, has_base, s, n, rows, base)
        if check:
            check_block(rows, base, n, has_base, sq, s // block, bad[(s - lo) // block])
        if plain:  # task arithmetic, linear: a weighted sum
            for i in range(nm):
                cnt[1 + 3 * i] += n
            _weighted_sum(rows, base, n, has_base, weights, normalize, eps, lam, o, f32s[0])
            cnt[1 + 3 * nm] += store(o, n, out_addr, out_mode, s - lo)
            continue
        for i in range(nm):
            if l1 and not sel[i].l1:
                continue
            cnt[1 + 3 * i] += _sparsify(addrs, modes, luts, rnd, sel, i, seed, rows[i], n, s, rem, keep, u24, prob,
                                        u[i], rs)
        if l1:
            for i in range(nm):
                if sel[i].l1:
                    _add_abs(rows[i], u[i], n, s, lanes[0, i, s // grid], lanes[1, i, s // grid])
        else:
            for i in range(nm):
                w = weights[i]
                ui = u[i]
                for e in range(n):
                    ui[e] = w * ui[e]
            _combine(u, base, n, has_base, weights, consensus, normalize, eps, lam, o, cnt, f32s, b8s, i32s)
            cnt[1 + 3 * nm] += store(o, n, out_addr, out_mode, s - lo)


@njit(parallel=True, cache=True, nogil=True)
def run(addrs, modes, luts, rnd, has_base, lo, hi, grid, block, check, sq, bad, sel, seed, weights, consensus,
        normalize, eps, lam, l1, lanes, out_addr, out_mode, counts, threads):
    """One span, elements lo..hi, in pieces cut at multiples of `grid` (each piece one
    thread, in sub-blocks of `block`, which `grid` is a multiple of); return how many
    encoded results are Inf/NaN.

    check    also the engine's first-pass checks (span.check_block) into sq and bad
    sel      SELECT[nm]  each model's sparsifier (tie ordinals j_* advanced)
    seed     uint64      the Philox key
    weights  float32[nm]
    consensus            0 none (every model agrees), 1 sum, 2 count
    normalize            divide by the sum of agreeing weights D (|D| < eps or 0 -> 1)
    lam      float32     scales the merged delta
    l1       True: no output; for the models with sel.l1, add |x| and |kept x| of each
             element e to lanes[0 / 1, i, e // grid, e % 8] (in increasing e: `grid`
             must be the reduction block)
    counts   int64[1 + 3*nm] += [sign conflicts, per model: kept, kept nonzero, excluded]
    threads  the parallel region's thread count (scratch buffers per thread)
    Rows are task vectors when has_base, else the models (linear)."""
    nm = addrs.shape[0] - 1
    first = lo // grid
    nu = (hi - 1) // grid - first + 1
    thin = np.zeros((nm, 2), np.bool_)
    for i in range(nm):
        if l1 and not sel[i].l1:
            continue  # a model the sums pass skips
        upper, lower = _thins(sel[i])
        thin[i, 0] = upper
        thin[i, 1] = lower
    start = np.zeros((nu, nm, 2), np.int64)
    if thin.any():  # per-piece tie counts, prefix-summed into each piece's first ordinal
        which = np.flatnonzero(thin[:, 0] | thin[:, 1])  # decode only the base and these models
        sub_addrs = np.empty(1 + which.size, np.int64)
        sub_modes = np.empty(1 + which.size, np.int64)
        sub_addrs[0], sub_modes[0] = addrs[0], modes[0]
        for j in range(which.size):
            sub_addrs[1 + j], sub_modes[1 + j] = addrs[1 + which[j]], modes[1 + which[j]]
        ties = np.zeros((nu, nm, 2), np.int64)
        rows_t, base_t = block_scratch(threads, which.size, block)
        for p in prange(nu):
            t = numba.get_thread_id()
            _piece_ties(sub_addrs, sub_modes, luts, rnd, has_base, max(lo, (first + p) * grid),
                        min(hi, (first + p + 1) * grid), block, sel, thin, which, ties[p], rows_t[t], base_t[t])
        for i in range(nm):
            j_hi, j_lo = sel[i].j_hi, sel[i].j_lo
            for p in range(nu):
                start[p, i, 0] = j_hi
                start[p, i, 1] = j_lo
                j_hi += ties[p, i, 0]
                j_lo += ties[p, i, 1]
            sel[i].j_hi = j_hi
            sel[i].j_lo = j_lo

    per_piece = np.zeros((nu, 2 + 3 * nm), np.int64)  # [.., overflow] per piece
    rows_t, base_t = block_scratch(threads, nm, block)
    u_t = np.empty((threads, nm, block), np.float32)
    keep_t = np.empty((threads, block), np.bool_)
    u24_t = np.empty((threads, block), np.uint32)
    prob_t = np.empty((threads, block), np.float64)
    o_t = np.empty((threads, block), np.float32)
    f32_t = np.empty((threads, 3, block), np.float32)
    b8_t = np.empty((threads, 3, block), np.bool_)
    i32_t = np.empty((threads, block), np.int32)
    C = 0  # DELLA's row length
    for i in range(nm):
        if sel[i].kind == DELLA:
            C = max(C, sel[i].row)
    vals_t = np.empty((threads, 2, C), np.float32)
    mags_t = np.empty((threads, C), np.uint32)
    order_t = np.empty((threads, C), np.int64)
    keys_t = np.empty((threads, C), np.uint32)
    tmp_t = np.empty((threads, C), np.int64)
    count_t = np.empty((threads, 3, 2048), np.int64)
    for p in prange(nu):
        t = numba.get_thread_id()
        _piece(addrs, modes, luts, rnd, has_base, lo, max(lo, (first + p) * grid), min(hi, (first + p + 1) * grid),
               grid, block, check, sq, bad, sel, thin, start[p], seed, weights, consensus, normalize, eps, lam, l1,
               lanes, out_addr, out_mode, per_piece[p], rows_t[t], base_t[t], u_t[t], keep_t[t], u24_t[t], prob_t[t],
               o_t[t], f32_t[t], b8_t[t], i32_t[t], RowScratch(vals_t[t], mags_t[t], order_t[t], keys_t[t], tmp_t[t],
                                                                  count_t[t]))
    overflow = 0
    if not l1:
        for p in range(nu):
            for j in range(1 + 3 * nm):
                counts[j] += per_piece[p, j]
            overflow += per_piece[p, 1 + 3 * nm]
    return overflow
