"""The low-rank product behind a LoRA task vector: rows of scale * (L @ R), exactly.

Import only through `npmerge.kernels.load("lora")`; the driver is
`npmerge.io.lora.LoraTarget.read_delta`, which decodes the few rows of the factors
it needs to float32 and lays them out as `left` (rows x r) and `right` (r x cols):

    plain LoRA        tau = B @ A        left = B rows,   right = A
    transposed        tau = (B @ A)^T    left = A^T rows, right = B^T
    (fan_in_fan_out Conv1D layers and embeddings)

The exact definition, for every element (p, q) of the block:

    tau[p, q] = fl32( scale * sum_{j = 0 .. r-1} f64(left[p, j]) * f64(right[j, q]) )

Each product of two float32 values is exact in float64 (24 + 24 significant bits);
the products are added in float64 in increasing j, starting from +0.0; the sum is
multiplied by the float64 scale and rounded once to float32. No BLAS (its summation
order varies with the library, the CPU and the thread count), no fastmath (no FMA
contraction): the result of an element depends only on its own row and column, so
it is the same for any thread count and any split of the flat range into calls.
`tests/test_lora.py` re-implements the definition in NumPy and compares bit for bit.
"""

import numpy as np
from numba import njit

from .bits import JIT

# Columns accumulated at once per row: the float64 accumulators (8 KiB) stay in L1.
COL_BLOCK = 1024


@njit(**JIT)
def lowrank_rows(left, right, scale, offset, out, p0, p1):
    """out[k - offset] = tau[k // cols, k % cols] for the k in [offset, offset + out.size)
    of rows p0..p1 of the block.

    left: (rows, r) float32; right: (r, cols) float32; scale: float64; `offset` is
    the flat index of out[0] inside the rows x cols block (0 <= offset < cols), and
    the block's rows cover exactly the elements asked for. Rows are independent, so
    callers split them among threads.
    """
    r = left.shape[1]
    cols = right.shape[1]
    n = out.shape[0]
    acc = np.empty(min(COL_BLOCK, cols), np.float64)
    for p in range(p0, p1):
        lo = max(p * cols, offset)
        hi = min((p + 1) * cols, offset + n)
        for c0 in range(lo - p * cols, hi - p * cols, COL_BLOCK):
            c1 = min(c0 + COL_BLOCK, hi - p * cols)
            w = c1 - c0
            for q in range(w):
                acc[q] = 0.0
            j = 0
            while j + 4 <= r:  # four terms per pass over acc, added in the same order
                l0 = np.float64(left[p, j])
                l1 = np.float64(left[p, j + 1])
                l2 = np.float64(left[p, j + 2])
                l3 = np.float64(left[p, j + 3])
                r0 = right[j, c0:c1]
                r1 = right[j + 1, c0:c1]
                r2 = right[j + 2, c0:c1]
                r3 = right[j + 3, c0:c1]
                for q in range(w):
                    acc[q] = (((acc[q] + l0 * np.float64(r0[q])) + l1 * np.float64(r1[q]))
                              + l2 * np.float64(r2[q])) + l3 * np.float64(r3[q])
                j += 4
            while j < r:
                lj = np.float64(left[p, j])
                rj = right[j, c0:c1]
                for q in range(w):
                    acc[q] += lj * np.float64(rj[q])
                j += 1
            dst = p * cols + c0 - offset
            for q in range(w):
                out[dst + q] = np.float32(scale * acc[q])
