"""Span kernel of passthrough: one input, optionally scaled, encoded to the output dtype.

Unscaled tensors in their stored dtype never get here (the plan copies their bytes);
this kernel serves scaled tensors, fl32(x * fl32(scale)) (docs/semantics.md §C), and
unscaled ones the recipe asks to convert (`dtype`/`out_dtype`), which are decoded,
rounded as `dtype` says and encoded without arithmetic.
"""

from numba import njit

from .span import JIT, encode, load_rows


@njit(**JIT)
def scale(inp, out, lo, a, z, block, scaled, factor, rows, base, o):
    """Elements a..z of model 1 (slot 1), times `factor` (float32) if `scaled`, encoded
    into the output; return how many encoded values are Inf/NaN."""
    bad = 0
    for s in range(a, z, block):
        n = min(block, z - s)
        load_rows(inp, inp[6], s, n, rows, base)  # no base: model values
        if scaled:
            for e in range(n):
                o[e] = rows[0, e] * factor
        else:
            for e in range(n):
                o[e] = rows[0, e]
        bad += encode(out, o, n, s - lo)
    return bad
