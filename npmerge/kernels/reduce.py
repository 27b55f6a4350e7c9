"""Span kernels of the methods that reduce a tensor before they merge it (SLERP, NuSLERP,
Model Stock, SCE, Multi-SLERP, Karcher): exact float64 sums over vectors, then float32 blends.

Reductions follow docs/semantics.md §A (tests/reference.py `reduce_sum`): float64 terms; blocks
of `block` elements relative to the vector (the whole tensor, a row along the last axis,
or a column of the (shape[0], -1) view); in a block element e goes to lane e mod 8 in
increasing e; block sum ((A0+A1)+(A2+A3))+((A4+A5)+(A6+A7)); the block sums of a vector
are added exactly (`exact_rows`, Python's math.fsum). A block is always accumulated by
one thread in increasing e and its sum lands in its own slot, so results depend neither
on the thread count nor on the span size.

Rows are not aligned to spans: a row block may start in one span and end in the next.
The driver (methods/reduce.py) splits a span into work items that each hold whole row
blocks, plus at most a head piece (the end of a row block the previous span began: it
continues that span's 8 lanes, `carry_in`) and a tail piece (the start of a row block
the next span finishes: its lanes go to `carry_out`). Spans are at least one block long,
so a row block spans at most two of them.

Blends are float32, one rounding per operation in the written order (no fused
multiply-add: numba compiles without fastmath, so LLVM does not contract a*b + c).

One kernel per operation (row sums, column sums, blend, SCE), each serial over a range
of work items; the driver runs the ranges on the engine's workers.
"""

from collections import namedtuple

import numpy as np
from numba import njit

from .bits import HELPER, JIT, f64_bits
from .span import encode, lanes8, load_rows, sumsq, thin_step

# Blend operations.
SLERP = 0  # o = ca*B + cb*M0 (model values)
NUSLERP = 1  # r = ca*v0 + cb*v1, v_i = M_i - B (with a base) or M_i; o = B + r, or r
STOCK = 2  # m = (((+0 + M0) + M1) + ...) / fl32(N); o = ca*m + cb*B

# SCE operations.
SCE_HIST = 0  # radix histogram of the variance keys (one 16-bit digit)
SCE_TIES = 1  # per block: elements whose key equals the threshold
SCE_SUMS = 2  # per block and model: sum of squares of the selected task vector
SCE_MERGE = 3  # elect, weight, merge, encode
SCE_COLLECT = 4  # the variance keys of one top-16-bit bucket

DIGIT = 16
BUCKETS = 1 << DIGIT
NO_KEY = np.iinfo(np.int64).max  # threshold that selects nothing

# One thread's buffers (`cap` elements each): decoded rows and base, output, float64
# copies of every input (reductions), per-element coefficients (blends); SCE's variances,
# selection mask and float32 sums.
Scratch = namedtuple("Scratch", "rows base o wide coef v mu keep f32s")


def scratch(nm: int, cap: int, wide: bool = False, coef: bool = False, variance: bool = False) -> Scratch:
    sce = cap if variance else 0
    return Scratch(np.empty((nm, cap), np.float32), np.empty(cap, np.float32), np.empty(cap, np.float32),
                   np.empty((nm + 1 if wide else 0, cap), np.float64), np.empty((2 if coef else 0, cap), np.float32),
                   np.empty(sce, np.float64), np.empty(sce, np.float64), np.empty(sce, np.uint8),
                   np.empty((3, sce), np.float32))


# ------------------------------------------------------------------ reductions


@njit(**HELPER)
def _accumulate(x, y, a, b, lane, lanes):
    """lanes[(lane + e - a) mod 8] += x[e] * y[e] for e = a .. b-1, in increasing e
    (float64 x, y: the exact widened float32 values)."""
    e = a
    while e < b and lane != 0:
        lanes[lane] += x[e] * y[e]
        e += 1
        lane = (lane + 1) & 7
    a0 = lanes[0]; a1 = lanes[1]; a2 = lanes[2]; a3 = lanes[3]
    a4 = lanes[4]; a5 = lanes[5]; a6 = lanes[6]; a7 = lanes[7]
    main = e + (b - e) // 8 * 8
    u1, u2, u3, u4, u5, u6, u7 = (np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(4), np.uint64(5),
                                  np.uint64(6), np.uint64(7))
    for i in range(np.uint64(0), np.uint64((main - e) // 8)):  # unsigned indices: no wraparound code
        p = np.uint64(e) + i * np.uint64(8)
        a0 += x[p] * y[p]; a1 += x[p + u1] * y[p + u1]; a2 += x[p + u2] * y[p + u2]; a3 += x[p + u3] * y[p + u3]
        a4 += x[p + u4] * y[p + u4]; a5 += x[p + u5] * y[p + u5]; a6 += x[p + u6] * y[p + u6]; a7 += x[p + u7] * y[p + u7]
    lanes[0] = a0; lanes[1] = a1; lanes[2] = a2; lanes[3] = a3
    lanes[4] = a4; lanes[5] = a5; lanes[6] = a6; lanes[7] = a7
    for p in range(main, b):
        lanes[p - main] += x[p] * y[p]


@njit(**HELPER)
def _widen(rows, base, n, wide):
    """wide[0] = f64(base), wide[1 + i] = f64(rows[i]) over the first n elements: each
    vector converted once for all the pairs it is in."""
    for e in range(n):
        wide[0, e] = np.float64(base[e])
    for i in range(rows.shape[0]):
        for e in range(n):
            wide[1 + i, e] = np.float64(rows[i, e])


@njit(**HELPER)
def _rb_start(k, C, nbr, block):
    """First element of row block k (row k // nbr, block k % nbr of it)."""
    return (k // nbr) * C + (k % nbr) * block


@njit(**HELPER)
def _rb_end(k, C, nbr, block):
    return (k // nbr) * C + min((k % nbr + 1) * block, C)


@njit(**HELPER)
def _rb_of(pos, C, nbr, block):
    """The row block holding element pos."""
    r = pos // C
    return r * nbr + (pos - r * C) // block


@njit(**JIT)
def row_sums(inp, deltas, lo, hi, block, C, items, i0, i1, pa, pb, carry_in, carry_out, sums, sc):
    """Work items i0..i1 of a span's exact sums over vectors of C consecutive elements
    (C = numel: the tensor; a row length): for each pair p, sums[p, k] = block sum of row
    block k (row k // nbr, block k % nbr; nbr = ceil(C / block)) of f64(x)*f64(y), x and
    y the vectors in slots pa[p], pb[p] (0 the base, 1 + i model i; task vectors if
    `deltas`). items = (k0, k1, g, head_end, tail_start, count): item 0 is the head piece
    lo..head_end, items 1.. groups of g row blocks from k0 (to k1), the last the tail
    piece tail_start..hi. carry_in / carry_out [npairs, 8]: lanes of the row block this
    span continues / leaves unfinished (zeros when none)."""
    nbr = (C + block - 1) // block
    k0, k1, g, head_end, tail_start, count = items[0], items[1], items[2], items[3], items[4], items[5]
    lanes = np.empty(8, np.float64)
    for item in range(i0, i1):
        if item == 0:
            s, e = lo, head_end
        elif item == count - 1:
            s, e = tail_start, hi
        else:
            kb = k0 + (item - 1) * g
            s, e = _rb_start(kb, C, nbr, block), _rb_end(min(k1, kb + g) - 1, C, nbr, block)
        n = e - s
        if n <= 0:
            continue
        load_rows(inp, deltas, s, n, sc.rows, sc.base)
        _widen(sc.rows, sc.base, n, sc.wide)
        k = _rb_of(s, C, nbr, block)
        while True:  # each row block the range touches
            start, end = _rb_start(k, C, nbr, block), _rb_end(k, C, nbr, block)
            a, b = max(s, start), min(e, end)
            for p in range(pa.shape[0]):
                for q in range(8):
                    lanes[q] = carry_in[p, q] if a > start else 0.0
                _accumulate(sc.wide[pa[p]], sc.wide[pb[p]], a - s, b - s, (a - start) & 7, lanes)
                if b == end:
                    sums[p, k] = lanes8(lanes)
                else:
                    for q in range(8):
                        carry_out[p, q] = lanes[q]
            if b >= e:
                break
            k += 1


@njit(**JIT)
def column_sums(inp, deltas, lo, hi, block, R, W, chunks, c0, c1, pa, pb, lanes, sums, sc):
    """Column chunks c0..c1 (of `chunks` over the W columns) of the exact sums over the
    columns of the (R, W) view (vectors along axis 0), for the rows of elements lo..hi:
    lanes [npairs, 8, W] are each column's running lanes (kept across spans),
    sums[p, c * nbr + j] the block sums (block j of column c)."""
    nbr = (R + block - 1) // block
    done = np.empty(8, np.float64)
    for chunk in range(c0, c1):
        for i in range(lo // W, (hi - 1) // W + 1):  # the rows the span touches
            s, e = max(lo, i * W + chunk * W // chunks), min(hi, i * W + (chunk + 1) * W // chunks)
            n = e - s
            if n <= 0:
                continue
            load_rows(inp, deltas, s, n, sc.rows, sc.base)
            _widen(sc.rows, sc.base, n, sc.wide)
            first = s - i * W
            lane = (i % block) & 7
            for p in range(pa.shape[0]):
                x, y = sc.wide[pa[p]], sc.wide[pb[p]]
                acc = lanes[p, lane]
                for q in range(n):
                    acc[first + q] += x[q] * y[q]
            if i % block == block - 1 or i == R - 1:  # a column block ends at row i
                for p in range(pa.shape[0]):
                    for c in range(first, first + n):
                        for q in range(8):
                            done[q] = lanes[p, q, c]
                            lanes[p, q, c] = 0.0
                        sums[p, c * nbr + i // block] = lanes8(done)


@njit(**JIT)
def exact_rows(sums, out):
    """out[r] = math.fsum(sums[r]) for every row of a float64[rows, nbr] array: Shewchuk's
    partials and CPython's correctly rounded finish, for finite values; with a non-finite
    value the IEEE sum of the non-finite ones (tests/reference.py `_exact_sum`)."""
    partials = np.empty(sums.shape[1] + 1, np.float64)
    for r in range(sums.shape[0]):
        x = sums[r]
        special = False
        for v in x:
            if not np.isfinite(v):
                special = True
        if special:
            acc = 0.0
            for v in x:
                if not np.isfinite(v):
                    acc += v
            out[r] = acc
            continue
        n = 0
        for v in x:
            xv = v
            i = 0
            for jj in range(n):
                y = partials[jj]
                if abs(xv) < abs(y):
                    xv, y = y, xv
                hi = xv + y
                lo = y - (hi - xv)
                if lo != 0.0:
                    partials[i] = lo
                    i += 1
                xv = hi
            n = i
            if xv != 0.0:
                partials[n] = xv
                n += 1
        hi = 0.0
        if n > 0:
            n -= 1
            hi = partials[n]
            lo = 0.0
            while n > 0:
                xv = hi
                n -= 1
                y = partials[n]
                hi = xv + y
                lo = y - (hi - xv)
                if lo != 0.0:
                    break
            if n > 0 and ((lo < 0.0 and partials[n - 1] < 0.0) or (lo > 0.0 and partials[n - 1] > 0.0)):
                y = lo * 2.0
                xv = hi + y
                if y == xv - hi:
                    hi = xv
        out[r] = hi


# ------------------------------------------------------------------ blends


@njit(**JIT)
def blend(inp, out, op, lo, a, z, block, W, per_col, ca, cb, sc):
    """Elements a..z blended (see the operations) with the coefficients ca, cb of vector
    e // W, or e % W if per_col; return how many encoded values are Inf/NaN."""
    rows, base, o = sc.rows, sc.base, sc.o
    ka, kb = sc.coef[0], sc.coef[1]
    has_base = inp[6]
    bad = 0
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, has_base and op == NUSLERP, s, n, rows, base)
        j0 = 0
        while j0 < n:  # each element's coefficients: those of its vector
            v = (s + j0) // W
            j1 = min(n, (v + 1) * W - s)
            first = s + j0 - v * W
            for j in range(j0, j1):
                ka[j] = ca[first + j - j0] if per_col else ca[v]
                kb[j] = cb[first + j - j0] if per_col else cb[v]
            j0 = j1
        if op == SLERP:
            x1 = rows[0]
            for j in range(n):
                o[j] = ka[j] * base[j] + kb[j] * x1[j]
        elif op == NUSLERP:
            x0, x1 = rows[0], rows[1]
            for j in range(n):
                o[j] = ka[j] * x0[j] + kb[j] * x1[j]
            if has_base:
                for j in range(n):
                    o[j] = base[j] + o[j]
        else:  # STOCK: o[j] is first the running sum of the models, from +0
            fn = np.float32(rows.shape[0])
            for j in range(n):
                o[j] = np.float32(0.0)
            for i in range(rows.shape[0]):
                x = rows[i]
                for j in range(n):
                    o[j] += x[j]
            for j in range(n):
                o[j] = ka[j] * (o[j] / fn) + kb[j] * base[j]
        bad += encode(out, o, n, s - lo)
    return bad


@njit(**JIT)
def combine(inp, out, lo, a, z, block, c, sc):
    """Elements a..z of fl32(f64(B) + acc) with a base (x_i task vectors), else fl32(acc):
    acc = ((+0 + c[0]*f64(x_0)) + c[1]*f64(x_1)) + ... in float64 (multislerp, karcher:
    float64 coefficients from the Gram matrix). Returns how many encoded values are Inf/NaN."""
    rows, base, o, acc = sc.rows, sc.base, sc.o, sc.wide[0]
    has_base = inp[6]
    bad = 0
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, has_base, s, n, rows, base)
        for e in range(n):
            acc[e] = 0.0
        for i in range(rows.shape[0]):
            ci, x = c[i], rows[i]
            for e in range(n):
                acc[e] += ci * np.float64(x[e])
        if has_base:
            for e in range(n):
                acc[e] = np.float64(base[e]) + acc[e]
        for e in range(n):
            o[e] = np.float32(acc[e])
        bad += encode(out, o, n, s - lo)
    return bad


# ------------------------------------------------------------------ SCE


@njit(**HELPER)
def _variance(rows, n, mu, v):
    """v[e] = population variance over models of the task vectors at e, float64 in model
    order: mu = ((0 + t0) + t1 ...)/N, v = ((0 + (t0 - mu)**2) + ...)/N."""
    nm = rows.shape[0]
    for e in range(n):
        mu[e] = 0.0
        v[e] = 0.0
    for i in range(nm):
        for e in range(n):
            mu[e] += np.float64(rows[i, e])
    dn = np.float64(nm)
    for e in range(n):
        mu[e] = mu[e] / dn
    for i in range(nm):
        for e in range(n):
            d = np.float64(rows[i, e]) - mu[e]
            v[e] += d * d
    for e in range(n):
        v[e] = v[e] / dn


@njit(**HELPER)
def _select(rows, v, n, t, tq, tm, rem, keep):
    """Zero (+0.0) every model's element e unless keep(v, 0, k) holds: key > t, or
    key == t and the tie is kept (all when tq >= tm, else the even thinning with the
    running remainder `rem`, returned). Keys are the int64 bits of the variances."""
    ties = 0
    for e in range(n):
        key = f64_bits(v[e])
        keep[e] = key > t
        ties += key == t
    if ties:
        for e in range(n):
            if f64_bits(v[e]) == t:
                if tq < tm:
                    keep[e], rem = thin_step(rem, tq, tm)
                else:
                    keep[e] = tq > 0
    zero = np.float32(0.0)
    for i in range(rows.shape[0]):
        x = rows[i]
        for e in range(n):
            x[e] = x[e] if keep[e] else zero
    return rem


@njit(**JIT)
def sce(inp, out, op, lo, a, z, block, selecting, shift, prefix, t, tq, tm, tie_rem, ties, found, tally, sums, weights,
        sc):
    """SCE over elements a..z (whole blocks, index s // block from element 0) of the task
    vectors tau_i = M_i - B; with `selecting`, element e is ranked by the variance v of
    the tau_i at e, as the int64 key of its float64 bits (v >= 0 orders like its bits).
    Returns how many encoded values are Inf/NaN (SCE_MERGE).

    SCE_HIST   found[2*d + (lower bits != 0)] += 1, d = (key >> shift) & 0xFFFF, for keys
               whose bits above the digit equal `prefix` (prefix < 0: all); NaN
               variances counted in tally[0] (found, tally: the thread's own)
    SCE_COLLECT  every key whose top 16 bits equal `prefix` appended to found (tally[0]:
               how many so far)
    SCE_TIES   ties[blk] = #{key == t}
    SCE_SUMS   sums[i, blk] = sum of squares of the selected tau_i (the reduction rule)
    SCE_MERGE  o = the merged block (float32 `weights`)
    Selection: keep key > t, and of the tm elements with key == t keep tq (the j-th tie
    of the tensor kept iff floor((j+1)tq/tm) > floor(j tq/tm); tie_rem[blk] = j*tq mod tm
    for the block's first tie j)."""
    rows, base, v, o = sc.rows, sc.base, sc.v, sc.o
    nm = rows.shape[0]
    bad = 0
    low_mask = (np.int64(1) << shift) - 1
    for s in range(a, z, block):
        n = min(block, z - s)
        blk = s // block
        load_rows(inp, inp[6], s, n, rows, base)  # task vectors (SCE has a base)
        if selecting:
            _variance(rows, n, sc.mu, v)
        if op == SCE_HIST:
            for e in range(n):
                key = f64_bits(v[e])
                if v[e] != v[e]:
                    tally[0] += 1
                elif prefix < 0 or (key >> (shift + DIGIT)) == prefix:
                    found[2 * ((key >> shift) & (BUCKETS - 1)) + np.int64((key & low_mask) != 0)] += 1
            continue
        if op == SCE_COLLECT:
            c = tally[0]
            for e in range(n):  # branch-free append
                key = f64_bits(v[e])
                found[c] = key
                c += (key >> 48) == prefix
            tally[0] = c
            continue
        if op == SCE_TIES:
            c = 0
            for e in range(n):
                c += f64_bits(v[e]) == t
            ties[blk] = c
            continue
        if selecting:
            _select(rows, v, n, t, tq, tm, tie_rem[blk], sc.keep)
        if op == SCE_SUMS:
            for i in range(nm):
                sums[i, blk] = sumsq(rows[i], n)
            continue
        # merge: elect s = sign(sum tau) (+ at 0), keep the agreeing w_i*tau_i, divide by
        # max(sum of their w_i, fl32(1e-6)), add the base (float32, model order from +0;
        # model-major loops over the block, which vectorise)
        eps, zero = np.float32(1e-6), np.float32(0.0)
        total, num, den = sc.f32s[0], sc.f32s[1], sc.f32s[2]
        for e in range(n):
            total[e] = zero
            num[e] = zero
            den[e] = zero
        for i in range(nm):
            x = rows[i]
            for e in range(n):
                total[e] += x[e]
        for i in range(nm):
            w, x = weights[i], rows[i]
            for e in range(n):
                agree = (x[e] > 0) if total[e] >= 0 else (x[e] < 0)
                num[e] += (w * x[e]) if agree else zero
                den[e] += w if agree else zero
        for e in range(n):
            d = den[e]
            o[e] = base[e] + num[e] / (eps if d < eps else d)
        bad += encode(out, o, n, s - lo)
    return bad
