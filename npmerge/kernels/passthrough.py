"""Span kernel of passthrough: one input, optionally scaled, encoded to the output dtype.

Unscaled tensors in their stored dtype never get here (the plan copies their bytes);
this kernel serves scaled tensors, fl32(x * fl32(scale)) (SEMANTICS-2 C), and
unscaled ones the recipe asks to convert (`dtype`/`out_dtype`), which are decoded,
rounded as `dtype` says and encoded without arithmetic.
"""

import numba
import numpy as np
from numba import njit, prange

from .span import block_scratch, load_rows, store


@njit(parallel=True, cache=True, nogil=True)
def scale(addrs, modes, luts, rnd, has_base, lo, hi, block, scaled, factor, out_addr, out_mode, threads):
    """Elements lo..hi of model 1 (slot 1), times `factor` (float32) if `scaled`, encoded
    into the output buffer; return how many encoded values are Inf/NaN."""
    nm = addrs.shape[0] - 1
    nb = (hi - lo + block - 1) // block
    bad = np.zeros(nb, np.int64)
    rows_t, base_t = block_scratch(threads, nm, block)
    o_t = np.empty((threads, block), np.float32)
    for b in prange(nb):
        s = lo + b * block
        n = min(block, hi - s)
        t = numba.get_thread_id()
        rows, o = rows_t[t], o_t[t]
        load_rows(addrs, modes, luts, rnd, has_base, False, s, n, rows, base_t[t])
        if scaled:
            for e in range(n):
                o[e] = rows[0, e] * factor
        else:
            for e in range(n):
                o[e] = rows[0, e]
        bad[b] = store(o, n, out_addr, out_mode, s - lo)
    total = 0
    for b in range(nb):
        total += bad[b]
    return total
