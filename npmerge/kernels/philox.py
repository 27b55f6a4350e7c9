"""Counter-based random numbers for masks (DARE, DELLA): Philox-4x32-10, docs/semantics.md §A.

Element e of model i in tensor `name` draws u = (word e mod 4 of
Philox(counter (j mod 2**32, j >> 32, s mod 2**32, s >> 32), key (seed mod 2**32, seed >> 32))
>> 8) * 2**-24 with j = e // 4 and s = stream(name, i). A value depends only on
(seed, tensor, model, element), so masks never depend on spans, blocks or threads.

`stream` is plain Python (once per tensor and model); `philox` and `uniform24` are
Numba functions the span kernels call inside their block loops. All words are held in
uint64 (32-bit values; products of two of them are exact).
"""

import numpy as np
from numba import njit

from .bits import JIT

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3

M0 = np.uint64(0xD2511F53)
M1 = np.uint64(0xCD9E8D57)
W0 = np.uint64(0x9E3779B9)
W1 = np.uint64(0xBB67AE85)
LOW32 = np.uint64(0xFFFFFFFF)
S32 = np.uint64(32)
S8 = np.uint64(8)


def stream(name: str, i: int) -> int:
    """s = FNV-1a-64 over UTF-8(name) || 0x00 || i as 4 bytes little-endian."""
    h = FNV_OFFSET
    for byte in name.encode("utf-8") + b"\x00" + int(i).to_bytes(4, "little"):
        h = ((h ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


@njit(**JIT, inline="always")
def philox(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 of a counter (c0..c3) under key (k0, k1), all uint64 holding 32-bit
    words. A round: (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0));
    the key is bumped by (W0, W1) mod 2**32 after each round (before rounds 2..10)."""
    for _ in range(10):
        p0 = M0 * c0
        p1 = M1 * c2
        c0, c1, c2, c3 = (p1 >> S32) ^ c1 ^ k0, p1 & LOW32, (p0 >> S32) ^ c3 ^ k1, p0 & LOW32
        k0 = (k0 + W0) & LOW32
        k1 = (k1 + W1) & LOW32
    return c0, c1, c2, c3


@njit(**JIT)
def uniform24(seed, s, e0, n, out):
    """out[t] = u * 2**24 (the top 24 bits of the word) of element e0 + t, t < n, for
    key `seed` and stream `s` (uint64); out is uint32. One Philox call per 4 elements:
    first every group j of the range into four word arrays (a loop LLVM vectorises),
    then element e takes word e mod 4 of group e // 4."""
    k0 = seed & LOW32
    k1 = seed >> S32
    s0 = s & LOW32
    s1 = s >> S32
    j0 = e0 // 4
    ng = (e0 + n - 1) // 4 - j0 + 1
    words = np.empty((4, ng), np.uint32)
    for g in range(ng):
        j = np.uint64(j0 + g)
        w0, w1, w2, w3 = philox(j & LOW32, j >> S32, s0, s1, k0, k1)
        words[0, g] = np.uint32(w0 >> S8)
        words[1, g] = np.uint32(w1 >> S8)
        words[2, g] = np.uint32(w2 >> S8)
        words[3, g] = np.uint32(w3 >> S8)
    for t in range(n):
        e = e0 + t
        out[t] = words[e & 3, (e >> 2) - j0]
