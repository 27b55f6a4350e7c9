"""Span kernels of the methods that reduce a tensor before they merge it (SLERP, NuSLERP,
Model Stock, SCE): exact float64 sums over vectors, then float32 blends.

Reductions follow SEMANTICS-2 A (tests/reference.py `reduce_sum`): float64 terms; blocks
of `block` elements relative to the vector (the whole tensor, a row along the last axis,
or a column of the (shape[0], -1) view); in a block element e goes to lane e mod 8 in
increasing e; block sum ((A0+A1)+(A2+A3))+((A4+A5)+(A6+A7)); the block sums of a vector
are added exactly (`exact_rows`, Python's math.fsum). A block is always accumulated by
one thread in increasing e and its sum lands in its own slot, so results depend neither
on the thread count nor on the span size.

Rows are not aligned to spans: a row block may start in one span and end in the next.
`run` splits a span into work items that each hold whole row blocks, plus at most
a head piece (the end of a row block the previous span began: it continues that span's
8 lanes, `carry_in`) and a tail piece (the start of a row block the next span finishes:
its lanes go to `carry_out`). Spans are at least one block long, so a row block spans
at most two of them.

Blends are float32, one rounding per operation in the written order (no fused
multiply-add: numba compiles without fastmath, so LLVM does not contract a*b + c).

Every operation runs in the one parallel kernel `run`: each parallel kernel carries its
own inlined copy of the decode/encode plumbing, and compiling it dominates the cold
start (`npmerge warmup`).
"""

import numba
import numpy as np
from numba import njit, prange

from .span import block_scratch, load_rows, mulmod, store, sumsq

# Operations of `run`.
SUMS = 0  # exact sums over rows (or the whole tensor)
COLUMNS = 1  # exact sums over columns (vectors along axis 0)
SLERP = 2  # o = ca*B + cb*M0 (model values)
NUSLERP = 3  # r = ca*v0 + cb*v1, v_i = M_i - B (with a base) or M_i; o = B + r, or r
STOCK = 4  # m = (((+0 + M0) + M1) + ...) / fl32(N); o = ca*m + cb*B
SCE_HIST = 5  # radix histogram of the variance keys (one 16-bit digit)
SCE_TIES = 6  # per block: elements whose key equals the threshold
SCE_SUMS = 7  # per block and model: sum of squares of the selected task vector
SCE_MERGE = 8  # elect, weight, merge, encode

DIGIT = 16
BUCKETS = 1 << DIGIT
NO_KEY = np.iinfo(np.int64).max  # threshold that selects nothing


# ------------------------------------------------------------------ reductions


@njit(cache=True, nogil=True)
def _combine(lanes):
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def _widen(rows, base, n, wide):
    """wide[0] = f64(base), wide[1 + i] = f64(rows[i]) over the first n elements: each
    vector converted once for all the pairs it is in."""
    for e in range(n):
        wide[0, e] = np.float64(base[e])
    for i in range(rows.shape[0]):
        for e in range(n):
            wide[1 + i, e] = np.float64(rows[i, e])


@njit(cache=True, nogil=True)
def _rb_start(k, C, nbr, block):
    """First element of row block k (row k // nbr, block k % nbr of it)."""
    return (k // nbr) * C + (k % nbr) * block


@njit(cache=True, nogil=True)
def _rb_end(k, C, nbr, block):
    return (k // nbr) * C + min((k % nbr + 1) * block, C)


@njit(cache=True, nogil=True)
def _rb_of(pos, C, nbr, block):
    """The row block holding element pos."""
    r = pos // C
    return r * nbr + (pos - r * C) // block


@njit(cache=True, nogil=True)
def _blend(op, rows, base, has_base, n, a, b, o):
    """o[:n] from the decoded block and per-element coefficients a, b (float32)."""
    if op == SLERP:
        x1 = rows[0]
        for j in range(n):
            o[j] = a[j] * base[j] + b[j] * x1[j]
    elif op == NUSLERP:
        x0, x1 = rows[0], rows[1]
        for j in range(n):
            o[j] = a[j] * x0[j] + b[j] * x1[j]
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
            o[j] = a[j] * (o[j] / fn) + b[j] * base[j]


@njit(cache=True, nogil=True)
def _row_sums(wide, s, e, C, nbr, block, pa, pb, carry_in, carry_out, sums):
    """SUMS over the decoded elements s..e-1 (wide: vector slots as float64): each row
    block's pairs, from +0 lanes or continuing carry_in (a block begun in the previous
    span); finished blocks to sums, an unfinished one to carry_out."""
    lanes = np.empty(8, np.float64)
    k = _rb_of(s, C, nbr, block)
    while True:
        start, end = _rb_start(k, C, nbr, block), _rb_end(k, C, nbr, block)
        a, b = max(s, start), min(e, end)
        for p in range(pa.shape[0]):
            for q in range(8):
                lanes[q] = carry_in[p, q] if a > start else 0.0
            _accumulate(wide[pa[p]], wide[pb[p]], a - s, b - s, (a - start) & 7, lanes)
            if b == end:
                sums[p, k] = _combine(lanes)
            else:
                for q in range(8):
                    carry_out[p, q] = lanes[q]
        if b >= e:
            return
        k += 1


@njit(cache=True, nogil=True)
def _column_sums(wide, n, i, first, R, nbr, block, pa, pb, lanes, sums):
    """COLUMNS: row i of the (R, W) view, columns first .. first+n-1 (wide: vector slots
    as float64): add the terms to each column's lane i mod 8; a column's block ends at
    row i: its sum to sums."""
    lane = (i % block) & 7
    for p in range(pa.shape[0]):
        x, y = wide[pa[p]], wide[pb[p]]
        acc = lanes[p, lane]
        for q in range(n):
            acc[first + q] += x[q] * y[q]
    if i % block == block - 1 or i == R - 1:
        done = np.empty(8, np.float64)
        for p in range(pa.shape[0]):
            for c in range(first, first + n):
                for q in range(8):
                    done[q] = lanes[p, q, c]
                    lanes[p, q, c] = 0.0
                sums[p, c * nbr + i // block] = _combine(done)


@njit(cache=True, nogil=True)
def _blend_range(op, rows, base, has_base, s, n, W, per_col, ca, cb, a, b, o):
    """Blend elements s..s+n-1 into o[:n]; a, b (scratch) get each element's coefficients:
    those of vector e // W (rows) or e % W (columns)."""
    j0 = 0
    while j0 < n:
        v = (s + j0) // W
        j1 = min(n, (v + 1) * W - s)
        if per_col:
            first = s + j0 - v * W
            for j in range(j0, j1):
                a[j] = ca[first + j - j0]
                b[j] = cb[first + j - j0]
        else:
            for j in range(j0, j1):
                a[j] = ca[v]
                b[j] = cb[v]
        j0 = j1
    _blend(op, rows, base, has_base, n, a, b, o)


@njit(cache=True, nogil=True)
def _scratch(nt, nm, cap, op):
    """Each of nt threads' buffers for `_item`: rows, base (span.block_scratch), output,
    float64 copies, coefficients."""
    rows, base = block_scratch(nt, nm, cap)
    return (rows, base, np.empty((nt, cap), np.float32),
            np.empty((nt, nm + 1 if op <= COLUMNS else 0, cap), np.float64),
            np.empty((nt, 2 if SLERP <= op <= STOCK else 0, cap), np.float32))


@njit(cache=True, nogil=True)
def _item(addrs, modes, luts, rnd, has_base, deltas, lo, hi, block, op, C, W, chunks, pa, pb, carry_in, carry_out,
          lanes, sums, per_col, ca, cb, selecting, shift, prefix, t, tq, tm, hist, nan, tie_start, ties, weights,
          out_addr, out_mode, item, items, ranges, cap, nbr, i0, k0, k1, g, head_end, tail_start, rows, base, o, wide,
          coef):
    """One work item of `run` (the body of its parallel loop, kept out of it: numba's
    parfor passes are slow on large loop bodies), with its thread's scratch buffers.
    Returns its Inf/NaN count."""
    bad = 0
    for rg in range(ranges):
        if op == COLUMNS:
            i = i0 + rg
            s, e = max(lo, i * W + item * W // chunks), min(hi, i * W + (item + 1) * W // chunks)
        elif item == 0:
            s, e = lo, head_end
        elif item == items - 1:
            s, e = tail_start, hi
        else:
            kb = k0 + (item - 1) * g
            s, e = _rb_start(kb, C, nbr, block), _rb_end(min(k1, kb + g) - 1, C, nbr, block)
        n = e - s
        if n <= 0:
            continue
        load_rows(addrs, modes, luts, rnd, has_base, deltas, s, n, rows, base)
        write = False
        if op <= COLUMNS:
            _widen(rows, base, n, wide)
        if op == SUMS:
            _row_sums(wide, s, e, C, nbr, block, pa, pb, carry_in, carry_out, sums)
        elif op == COLUMNS:
            _column_sums(wide, n, i0 + rg, s - (i0 + rg) * W, C, nbr, block, pa, pb, lanes, sums)
        elif op <= STOCK:
            _blend_range(op, rows, base, has_base, s, n, W, per_col, ca, cb, coef[0], coef[1], o)
            write = True
        else:
            write = _sce(op, rows, base, n, s // block, selecting, shift, prefix, t, tq, tm, hist, nan, tie_start,
                         ties, sums, weights, o)
        if write:
            bad += store(o, n, out_addr, out_mode, s - lo)
    return bad


@njit(parallel=True, cache=True, nogil=True)
def run(addrs, modes, luts, rnd, has_base, deltas, lo, hi, block, op, C, W, chunks, pa, pb, carry_in, carry_out,
        lanes, sums, per_col, ca, cb, selecting, shift, prefix, t, tq, tm, hist, nan, tie_start, ties, weights,
        out_addr, out_mode, threads):
    """One span (elements lo..hi) of one operation; returns how many encoded values are
    Inf/NaN (writing operations). Use `launch`, which names and defaults the arguments.

    SUMS     vectors of C consecutive elements (C = numel: the tensor; a row length):
             for each pair p, sums[p, k] = block sum of row block k (row k // nbr, block
             k % nbr; nbr = ceil(C / block)) of f64(x)*f64(y), x and y the vectors in
             slots pa[p], pb[p] (0 the base, 1 + i model i; task vectors if `deltas`).
             carry_in / carry_out [npairs, 8]: lanes of the row block this span
             continues / leaves unfinished (zeros when none).
    COLUMNS  the same for the columns of the (C, W) view (vectors along axis 0), split
             in `chunks` column ranges; lanes [npairs, 8, W] are each column's running
             lanes (kept across spans), sums[p, c * nbr + j] the block sums.
    SLERP, NUSLERP, STOCK  blend (see the constants) with the coefficients ca, cb of
             vector e // W, or e % W if per_col; C = numel.
    SCE_*    C = numel; see `_sce`.
    """
    nbr = (C + block - 1) // block
    i0 = lo // W if op == COLUMNS else 0
    if op == COLUMNS:  # items: column ranges, each walking the span's rows
        items, ranges, cap = chunks, (hi - 1) // W - i0 + 1, (W + chunks - 1) // chunks
        k0 = k1 = g = head_end = tail_start = 0
    else:  # items: a head piece, units of g whole row blocks [k0, k1), a tail piece
        r = lo // C
        j = (lo - r * C + block - 1) // block
        if j >= nbr:
            r += 1
            j = 0
        k0 = r * nbr + j
        r = hi // C
        k1 = max(k0, r * nbr + (hi - r * C) // block)
        head_end = min(hi, _rb_start(k0, C, nbr, block))
        tail_start = max(head_end, _rb_start(k1, C, nbr, block))
        g = max(1, block // C) if nbr == 1 else 1
        items, ranges, cap = (k1 - k0 + g - 1) // g + 2, 1, block
    bad = np.zeros(items, np.int64)
    # scratch per thread, allocated once per call: items allocating their own contend in malloc
    rows_t, base_t, o_t, wide_t, coef_t = _scratch(threads, addrs.shape[0] - 1, cap, op)
    for item in prange(items):
        tid = numba.get_thread_id()
        bad[item] = _item(addrs, modes, luts, rnd, has_base, deltas, lo, hi, block, op, C, W, chunks, pa, pb,
                          carry_in, carry_out, lanes, sums, per_col, ca, cb, selecting, shift, prefix, t, tq, tm,
                          hist, nan, tie_start, ties, weights, out_addr, out_mode, np.int64(item), items, ranges, cap,
                          nbr, i0, k0, k1, g, head_end, tail_start, rows_t[tid], base_t[tid], o_t[tid], wide_t[tid],
                          coef_t[tid])  # int64(item): one signature of _item
    return bad.sum()


_NO_I64 = np.zeros(0, np.int64)
_NO_F32 = np.zeros(0, np.float32)
_NO_LANES = np.zeros((0, 8), np.float64)
_NO_3D = np.zeros((0, 8, 0), np.float64)
_NO_2D = np.zeros((0, 0), np.float64)
_NO_HIST = np.zeros((0, 0), np.int64)


def launch(span, op, *, deltas=False, C=1, W=1, chunks=1, pa=_NO_I64, pb=_NO_I64, carry_in=_NO_LANES,
           carry_out=_NO_LANES, lanes=_NO_3D, sums=_NO_2D, per_col=False, ca=_NO_F32, cb=_NO_F32, selecting=False,
           shift=0, prefix=-1, t=-1, tq=0, tm=0, hist=_NO_HIST, nan=_NO_I64, tie_start=_NO_I64, ties=_NO_I64,
           weights=_NO_F32) -> int:
    """`run` one operation over a protocol Span; unused arguments get empty arrays of the
    one compiled signature."""
    return run(*span.inputs, deltas, span.lo, span.hi, span.block, op, C, W, chunks, pa, pb, carry_in, carry_out,
               lanes, sums, per_col, ca, cb, selecting, shift, prefix, t, tq, tm, hist, nan, tie_start, ties, weights,
               span.out_addr, span.out_mode, numba.get_num_threads())


@njit(cache=True, nogil=True)
def _fsum(x):
    """math.fsum of x (Shewchuk's partials and CPython's correctly rounded finish), for
    finite values; with a non-finite value the IEEE sum of the non-finite ones
    (tests/reference.py `_exact_sum`)."""
    special = False
    for v in x:
        if not np.isfinite(v):
            special = True
    if special:
        acc = 0.0
        for v in x:
            if not np.isfinite(v):
                acc += v
        return acc
    partials = np.empty(x.shape[0] + 1, np.float64)
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
    return hi


@njit(cache=True, nogil=True)
def exact_rows(sums, out):
    """out[r] = math.fsum(sums[r]) for every row of a float64[rows, nbr] array."""
    for r in range(sums.shape[0]):
        out[r] = _fsum(sums[r])


# ------------------------------------------------------------------ SCE


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def _select(rows, keys, n, t, tq, tm, rem):
    """Zero (+0.0) every model's element e unless keep(v, 0, k) holds: key > t, or
    key == t and the tie is kept (all when tq >= tm, else the even thinning with the
    running remainder `rem`, returned)."""
    keep = np.empty(n, np.bool_)
    ties = 0
    for e in range(n):
        keep[e] = keys[e] > t
        ties += keys[e] == t
    if ties:
        for e in range(n):
            if keys[e] == t:
                if tq < tm:
                    keep[e] = rem + tq >= tm
                    rem = rem + tq - (tm if keep[e] else 0)
                else:
                    keep[e] = tq > 0
    for i in range(rows.shape[0]):
        x = rows[i]
        for e in range(n):
            x[e] = x[e] if keep[e] else np.float32(0.0)
    return rem


@njit(cache=True, nogil=True)
def _sce_merge(rows, base, n, weights, o):
    """Elect s = sign(sum tau) (+ at 0), keep the agreeing w_i*tau_i, divide by
    max(sum of their w_i, fl32(1e-6)), add the base (float32, model order from +0)."""
    nm = rows.shape[0]
    eps = np.float32(1e-6)
    s = np.zeros(n, np.float32)
    num = np.zeros(n, np.float32)
    den = np.zeros(n, np.float32)
    for i in range(nm):
        for e in range(n):
            s[e] += rows[i, e]
    for i in range(nm):
        w = weights[i]
        for e in range(n):
            x = rows[i, e]
            agree = (x > 0) if s[e] >= 0 else (x < 0)
            num[e] += (w * x) if agree else np.float32(0.0)
            den[e] += w if agree else np.float32(0.0)
    for e in range(n):
        d = den[e]
        o[e] = base[e] + num[e] / (eps if d < eps else d)


@njit(cache=True, nogil=True)
def _sce(op, rows, base, n, blk, selecting, shift, prefix, t, tq, tm, hist, nan, tie_start, ties, sums, weights,
         o):
    """One block (index blk from element 0) of SCE's task vectors tau_i = M_i - B; True
    if o holds output. With `selecting`, element e is ranked by the variance v of the
    tau_i at e, as the int64 key of its float64 bits (v >= 0 orders like its bits).

    SCE_HIST   hist[thread, 2*d + (lower bits != 0)] += 1, d = (key >> shift) & 0xFFFF,
               for keys whose bits above the digit equal `prefix` (prefix < 0: all);
               NaN variances counted in nan[thread]
    SCE_TIES   ties[blk] = #{key == t}
    SCE_SUMS   sums[i, blk] = sum of squares of the selected tau_i (the reduction rule)
    SCE_MERGE  o = the merged block (float32 `weights`)
    Selection: keep key > t, and of the tm elements with key == t keep tq (the j-th tie of
    the tensor kept iff floor((j+1)tq/tm) > floor(j tq/tm); tie_start[blk] = j of the
    block's first tie)."""
    nm = rows.shape[0]
    v = np.empty(n if selecting else 0, np.float64)
    keys = v.view(np.int64)
    if selecting:
        _variance(rows, n, np.empty(n, np.float64), v)
    if op == SCE_HIST:
        th = numba.get_thread_id()
        h = hist[th]
        low_mask = (np.int64(1) << shift) - 1
        for e in range(n):
            key = keys[e]
            if v[e] != v[e]:
                nan[th] += 1
            elif prefix < 0 or (key >> (shift + DIGIT)) == prefix:
                h[2 * ((key >> shift) & (BUCKETS - 1)) + np.int64((key & low_mask) != 0)] += 1
        return False
    if op == SCE_TIES:
        c = 0
        for e in range(n):
            c += keys[e] == t
        ties[blk] = c
        return False
    if selecting:
        _select(rows, keys, n, t, tq, tm, mulmod(tie_start[blk], tq, tm) if 0 < tq < tm else 0)
    if op == SCE_SUMS:
        for i in range(nm):
            sums[i, blk] = sumsq(rows[i], n)
        return False
    _sce_merge(rows, base, n, weights, o)
    return True
