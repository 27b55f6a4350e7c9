"""Span kernels of the task-arithmetic family (TIES, task arithmetic, linear, DARE,
breadcrumbs, DELLA): exact rank selection by radix histograms, random masks, and
sparsify / rescale / elect / disjoint merge / encode.

Each kernel covers one piece of a span (see span.py for how inputs are passed); the
driver (methods/family.py) runs the pieces on the engine's workers. Everything is
float32, in the exact operation order of tests/reference.py, so results match it bit
for bit. There is one merge kernel per kind of sparsifier (none, rank, random, DELLA),
so a method compiles only its own.

What each model's sparsifier does is one record of `SELECT` per model (`sel`), filled
by the driver; kernels/masks.py has the record and the masks it describes.

Rank selection keep(|x|, lo, hi): non-negative float32 values order like their uint32
bit patterns, so the values at the boundary ranks lo and hi - 1 are found without
sorting: a histogram of the high 15 bits of the 31-bit magnitude finds the bucket
holding each, a histogram of the low 16 bits of the elements inside that bucket the
exact value and how many elements equal it. The first histogram also tells, per bucket,
how many elements have non-zero low bits, which usually settles a value without the
second pass. Counts are integers, so any piece or thread count gives the same answer.
Elements strictly between the two boundary values are kept; those above the upper one
(t_hi) and below the lower one (t_lo) are dropped.

Ties at a boundary are thinned evenly along the flat index: the j-th of the m elements
equal to t, of which q are kept, is kept iff floor((j+1)q/m) > floor(jq/m). Instead of
big products j*q the kernels step the remainder r = j*q mod m: element j is kept iff
r + q >= m. When both boundaries are one value the group is thinned once. The ordinal
j of an element depends on every tie before it, so the merge pass leaves the elements
that tie at a thinned boundary *pending* (in a per-span mask, counting each piece's
ties); once every piece of the span is counted, `fixup_rank` merges the pending
elements of each piece from its first ordinal (a prefix sum). The inputs are read once
and only the pending elements again.

Random masks (DARE, DELLA): element e keeps iff u < p with u from Philox
(philox.uniform24), p = rho (DARE) or DELLA's probability from the rank of |x| within
its row along the last axis, which the kernel computes by reading the whole row.
"""

from collections import namedtuple

import numpy as np
from numba import njit

from .bits import HELPER, JIT, f32_bits
from .masks import MAG_MASK, ONE, apply_mask, keep_della, keep_random, keep_thinned, mark_ties, select_rank
from .span import check_block, encode, gather_rows, load_rows, scatter

HI_SHIFT = 16
HI_BUCKETS = 1 << 15  # magnitude bits 30..16
LO_BUCKETS = 1 << 16  # magnitude bits 15..0

CONSENSUS_NONE = 0
CONSENSUS_SUM = 1
CONSENSUS_COUNT = 2

# One thread's block buffers (each `block` long; u, f32s, b8s per model or 3 deep).
Scratch = namedtuple("Scratch", "rows base u keep u24 prob o f32s b8s i32s idx pend")
# A thread's DELLA row buffers: both rows (float32[2, C]), magnitudes, sort order, the
# sort's key and index copies, radix counts (int64[3, 2048]).
RowScratch = namedtuple("RowScratch", "vals mags order keys tmp count")


def scratch(nm: int, block: int) -> Scratch:
    """Allocate one thread's block buffers (methods/family.py's work_bytes counts them)."""
    return Scratch(np.empty((nm, block), np.float32), np.empty(block, np.float32), np.empty((nm, block), np.float32),
                   np.empty(block, np.bool_), np.empty(block, np.uint32), np.empty(block, np.float64),
                   np.empty(block, np.float32), np.empty((3, block), np.float32), np.empty((3, block), np.bool_),
                   np.empty(block, np.int32), np.empty(block, np.int64), np.empty(block, np.uint8))


def row_scratch(C: int) -> RowScratch:
    return RowScratch(np.empty((2, C), np.float32), np.empty(C, np.uint32), np.empty(C, np.int64),
                      np.empty(C, np.uint32), np.empty(C, np.int64), np.empty((3, 2048), np.int64))


# ------------------------------------------------------------------ selection histograms


@njit(**JIT)
def hist(inp, a, z, block, check, sums, bad, active, slot_model, slot_bucket, h, sc):
    """The radix histograms of rank selection over the task vectors, elements a..z (h:
    the thread's own).

    High bits (slot_model empty): h[i, 2 * (mag >> 16) + (mag & 0xFFFF != 0)] += 1 for the
    active models. The split of each bucket by zero/non-zero low bits lets the caller skip
    the low-bits pass when a boundary is one of the bucket's low-zero elements, which all
    equal the bucket's floor (usual for BF16 models). With `check`, also the engine's
    first-pass checks (span.check_block).
    Low bits: h[k, mag & 0xFFFF] += 1 for the elements of model slot_model[k] whose high
    bits equal slot_bucket[k] (one slot per bucket a boundary of a model lies in)."""
    rows, base = sc.rows, sc.base
    has_base = inp[6]
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, has_base, s, n, rows, base)
        if check:
            check_block(rows, base, n, has_base, sums, s // block, bad)
        if slot_model.shape[0] == 0:
            for i in range(rows.shape[0]):
                if active[i]:
                    hi, x = h[i], rows[i]
                    for e in range(n):
                        m = f32_bits(x[e]) & MAG_MASK
                        hi[((m >> HI_SHIFT) << 1) | np.uint32((m & 0xFFFF) != 0)] += 1
        for k in range(slot_model.shape[0]):
            bk, hk, x = slot_bucket[k], h[k], rows[slot_model[k]]
            for e in range(n):
                m = f32_bits(x[e]) & MAG_MASK
                if (m >> HI_SHIFT) == bk:
                    hk[m & 0xFFFF] += 1


# ------------------------------------------------------------------ merge one block


@njit(**HELPER)
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


@njit(**HELPER)
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


@njit(**HELPER)
def _merge(u, base, n, has_base, m, cnt, sc):
    """Merge the weighted sparsified deltas u into sc.o (m: MergeArgs)."""
    _combine(u, base, n, has_base, m.weights, m.consensus, m.normalize, m.eps, m.lam, sc.o, cnt, sc.f32s, sc.b8s,
             sc.i32s)


@njit(**HELPER)
def _add_abs(x, y, n, e0, x_lanes, y_lanes):
    """x_lanes[(e0 + e) % 8] += |x[e]| and y_lanes[...] += |y[e]| (float64) for e < n in
    increasing e: the reduction rule's lanes (docs/semantics.md §A), both sums in one loop."""
    head = min(n, (8 - (e0 & 7)) & 7)
    for e in range(head):
        x_lanes[(e0 + e) & 7] += abs(np.float64(x[e]))
        y_lanes[(e0 + e) & 7] += abs(np.float64(y[e]))
    main = head + (n - head) // 8 * 8
    for e in range(head, main, 8):  # x[e] is lane 0 here
        for lane in range(8):
            x_lanes[lane] += abs(np.float64(x[e + lane]))
            y_lanes[lane] += abs(np.float64(y[e + lane]))
    for e in range(main, n):
        x_lanes[(e0 + e) & 7] += abs(np.float64(x[e]))
        y_lanes[(e0 + e) & 7] += abs(np.float64(y[e]))


@njit(**HELPER)
def _merge_out(out, lo, s, n, base, has_base, m, cnt, sc):
    """Merge the sparsified deltas sc.u into sc.o and encode it at element s."""
    _merge(sc.u, base, n, has_base, m, cnt, sc)
    cnt[1 + 3 * sc.u.shape[0]] += encode(out, sc.o, n, s - lo)


# MergeArgs: the method's merge parameters (weights float32[nm], consensus 0/1/2,
# normalize, eps (|D| < eps -> 1), lam float32).
MergeArgs = namedtuple("MergeArgs", "weights consensus normalize eps lam")


# ------------------------------------------------------------------ the span kernels
#
# Common arguments: inp (span.py), out = (kind marker, address of element lo), lo the
# span's first element, a..z this piece, block the sub-block length; check: also the
# engine's first-pass checks into sums (per tensor block) and bad (this piece's NaN/Inf
# counts: base, models); cnt (this piece's) += [sign conflicts, per model: kept, kept
# nonzero, excluded, then Inf/NaN outputs]; sc the thread's Scratch.


@njit(**JIT)
def merge_plain(inp, out, lo, a, z, block, check, sums, bad, m, cnt, sc):
    """Task arithmetic and linear: a weighted sum (rows are the models without a base)."""
    rows, base = sc.rows, sc.base
    has_base = inp[6]
    nm = rows.shape[0]
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, has_base, s, n, rows, base)
        if check:
            check_block(rows, base, n, has_base, sums, s // block, bad)
        for i in range(nm):
            cnt[1 + 3 * i] += n
        _weighted_sum(rows, base, n, has_base, m.weights, m.normalize, m.eps, m.lam, sc.o, sc.f32s[0])
        cnt[1 + 3 * nm] += encode(out, sc.o, n, s - lo)


@njit(**JIT)
def merge_rank(inp, out, lo, a, z, block, sel, thin, rem, pending, ties, fixup, m, cnt, sc):
    """TIES and breadcrumbs over piece a..z, in two passes over the span:

    merge (fixup False): elements tying at a thinned boundary of any model are left
        pending: every model drops them, they are written as +0, their positions (relative
        to the span's lo, int32) are listed in `pending` (this piece's part of the span's
        list) and each model's ties counted per side into ties; returns how many;
    fixup: the `pending` elements, in increasing order, their tied groups thinned
        (remainders rem[i, side] at the piece's first ties, advanced), are merged and
        written in place."""
    rows, base, keep, idx, pb = sc.rows, sc.base, sc.keep, sc.idx, sc.pend
    has_base = inp[6]
    nm = rows.shape[0]
    listed = 0
    done = 0
    e = a
    while (done < pending.shape[0]) if fixup else (e < z):
        if fixup:  # the next block of pending elements
            n = min(block, pending.shape[0] - done)
            for j in range(n):
                idx[j] = lo + np.int64(pending[done + j])
            done += n
            gather_rows(inp, has_base, idx, n, rows, base)
        else:
            s, n = e, min(block, z - e)
            e += n
            load_rows(inp, has_base, s, n, rows, base)
            for j in range(n):
                pb[j] = 0
            for i in range(nm):
                if thin[i, 0]:
                    ties[i, 0] += mark_ties(rows[i], n, sel[i].t_hi, pb)
                if thin[i, 1]:
                    ties[i, 1] += mark_ties(rows[i], n, sel[i].t_lo, pb)
        for i in range(nm):
            w = m.weights[i]
            if fixup:
                keep_thinned(rows[i], n, sel[i], thin[i], rem[i], keep)
                cnt[1 + 3 * i] += apply_mask(rows[i], keep, n, sel[i], sc.prob, w, sc.u[i])
            else:
                cnt[1 + 3 * i] += select_rank(rows[i], n, sel[i], w, pb, sc.u[i])
        _merge(sc.u, base, n, has_base, m, cnt, sc)
        if fixup:
            cnt[1 + 3 * nm] += scatter(out, sc.o, n, idx, lo)
        else:
            o = sc.o
            first = np.int32(s - lo)
            for j in range(n):  # branch-free: write every position, advance past pending ones
                o[j] = o[j] if pb[j] == 0 else np.float32(0.0)
                pending[listed] = first + np.int32(j)
                listed += pb[j] != 0
            cnt[1 + 3 * nm] += encode(out, o, n, s - lo)
    return listed


@njit(**JIT)
def count_ties(inp, a, z, block, sel, thin, ties, sc):
    """ties[i, side] = elements a..z of model i equal to its thinned boundary value."""
    rows, base = sc.rows, sc.base
    has_base = inp[6]
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, has_base, s, n, rows, base)
        for i in range(rows.shape[0]):
            if thin[i, 0]:
                ties[i, 0] += _count(rows[i], n, sel[i].t_hi)
            if thin[i, 1]:
                ties[i, 1] += _count(rows[i], n, sel[i].t_lo)


@njit(**HELPER)
def _count(x, n, t):
    c = 0
    for e in range(n):
        c += np.int64(f32_bits(x[e]) & MAG_MASK) == t
    return c


@njit(**JIT)
def sums_rank(inp, a, z, block, grid, sel, thin, rem, lanes, sc):
    """The l1 rescale's sums pass of breadcrumbs: |x| and |kept x| of the models with
    sel.l1 into lanes[0 / 1, i, e // grid, e % 8], tied groups thinned from the
    remainders rem[i, side] at the piece's first ties (count_ties)."""
    has_base = inp[6]
    rows, base, keep = sc.rows, sc.base, sc.keep
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, has_base, s, n, rows, base)
        for i in range(rows.shape[0]):
            if sel[i].l1:
                keep_thinned(rows[i], n, sel[i], thin[i], rem[i], keep)
                apply_mask(rows[i], keep, n, sel[i], sc.prob, ONE, sc.u[i])
                _add_abs(rows[i], sc.u[i], n, s, lanes[0, i, s // grid], lanes[1, i, s // grid])


@njit(**JIT)
def merge_random(inp, out, lo, a, z, block, check, sums, bad, sel, seed, m, cnt, sc):
    """DARE: random masks."""
    rows, base, keep = sc.rows, sc.base, sc.keep
    has_base = inp[6]
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, has_base, s, n, rows, base)
        if check:
            check_block(rows, base, n, has_base, sums, s // block, bad)
        for i in range(rows.shape[0]):
            keep_random(sel[i], seed, s, n, keep, sc.u24)
            cnt[1 + 3 * i] += apply_mask(rows[i], keep, n, sel[i], sc.prob, m.weights[i], sc.u[i])
        _merge_out(out, lo, s, n, base, has_base, m, cnt, sc)


@njit(**JIT)
def sums_random(inp, a, z, block, grid, check, sums, bad, sel, seed, lanes, sc):
    """DARE's l1 sums pass (see sums_rank), the first pass: with the engine's checks."""
    has_base = inp[6]
    rows, base, keep = sc.rows, sc.base, sc.keep
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, has_base, s, n, rows, base)
        if check:
            check_block(rows, base, n, has_base, sums, s // block, bad)
        for i in range(rows.shape[0]):
            if sel[i].l1:
                keep_random(sel[i], seed, s, n, keep, sc.u24)
                apply_mask(rows[i], keep, n, sel[i], sc.prob, ONE, sc.u[i])
                _add_abs(rows[i], sc.u[i], n, s, lanes[0, i, s // grid], lanes[1, i, s // grid])


@njit(**HELPER)
def _store_bits(keep, n, e0, bits):
    """Bit (e0 + e) & 7 of bits[(e0 + e) >> 3] = keep[e] (bits zeroed beforehand): whole
    bytes at once, bit by bit only at the ends."""
    e = 0
    while e < n and (e0 + e) & 7:
        if keep[e]:
            bits[(e0 + e) >> 3] |= np.uint8(1 << ((e0 + e) & 7))
        e += 1
    while e + 8 <= n:
        b = np.uint8(0)
        for q in range(8):
            b |= np.uint8(keep[e + q]) << np.uint8(q)
        bits[(e0 + e) >> 3] = b
        e += 8
    for t in range(e, n):
        if keep[t]:
            bits[(e0 + t) >> 3] |= np.uint8(1 << ((e0 + t) & 7))


@njit(**HELPER)
def _load_bits(bits, n, e0, keep):
    for e in range(n):
        keep[e] = ((bits[(e0 + e) >> 3] >> ((e0 + e) & 7)) & 1) != 0


@njit(**JIT)
def merge_della(inp, out, lo, a, z, block, check, sums, bad, sel, seed, kept_bits, m, cnt, sc, rs):
    """DELLA: random masks with row-rank probabilities (rs: the thread's RowScratch). The
    masks of the models the sums pass ranked are read from kept_bits[i] when it holds them
    (the sums pass stored them: the rows are not ranked twice)."""
    rows, base, keep = sc.rows, sc.base, sc.keep
    has_base = inp[6]
    cached = kept_bits.shape[1] != 0
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, has_base, s, n, rows, base)
        if check:
            check_block(rows, base, n, has_base, sums, s // block, bad)
        for i in range(rows.shape[0]):
            if cached and sel[i].l1:
                _load_bits(kept_bits[i], n, s, keep)
            else:
                keep_della(inp, i, sel[i], seed, s, n, keep, sc.u24, sc.prob, rs)
            cnt[1 + 3 * i] += apply_mask(rows[i], keep, n, sel[i], sc.prob, m.weights[i], sc.u[i])
        _merge_out(out, lo, s, n, base, has_base, m, cnt, sc)


@njit(**JIT)
def sums_della(inp, a, z, block, grid, check, sums, bad, sel, seed, kept_bits, lanes, sc, rs):
    """DELLA's l1 sums pass (see sums_random); stores each model's mask into kept_bits[i]
    when it has room (a ranks cache for the merge pass)."""
    has_base = inp[6]
    rows, base, keep = sc.rows, sc.base, sc.keep
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, has_base, s, n, rows, base)
        if check:
            check_block(rows, base, n, has_base, sums, s // block, bad)
        for i in range(rows.shape[0]):
            if sel[i].l1:
                keep_della(inp, i, sel[i], seed, s, n, keep, sc.u24, sc.prob, rs)
                if kept_bits.shape[1] != 0:
                    _store_bits(keep, n, s, kept_bits[i])
                apply_mask(rows[i], keep, n, sel[i], sc.prob, ONE, sc.u[i])
                _add_abs(rows[i], sc.u[i], n, s, lanes[0, i, s // grid], lanes[1, i, s // grid])
