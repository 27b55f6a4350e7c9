"""What every kernel module shares: the compile options, and bit-level intrinsics (a
float32's bit pattern and back, an address as a pointer).

Kernels are called from Python (JIT: cached on disk, with the GIL released); helpers
only from other kernels (HELPER: no Python wrapper to compile, which saves a large share
of the compile time; calling one from Python would crash, so tests call kernels only).
The intrinsics exist because numba's array `.view` costs a fifth of a second of compile
time per kernel that uses it, and kernels only ever need one element's bits at a time.
"""

import warnings

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import NumbaExperimentalFeatureWarning
from numba.extending import intrinsic

from . import CACHE

# Kernels take their dtype conversions as first-class functions (codecs.py), which numba
# still calls experimental; they are plain C function pointers here.
warnings.filterwarnings("ignore", category=NumbaExperimentalFeatureWarning)

JIT = dict(cache=CACHE, nogil=True)
HELPER = dict(nogil=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)


@intrinsic
def f32_bits(typingctx, x):
    """The uint32 bit pattern of a float32."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def bits_f32(typingctx, u):
    """The float32 whose bit pattern is the uint32 `u`."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def f64_bits(typingctx, x):
    """The int64 bit pattern of a float64 (non-negative floats order like it)."""
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@intrinsic
def voidptr(typingctx, addr):
    """int64 address -> void* (for numba.carray)."""
    sig = types.voidptr(addr)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


@intrinsic
def address(typingctx, arr):
    """The int64 address of an array's first element."""
    sig = types.int64(arr)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, cgutils.intp_t)

    return sig, codegen
