"""Bit-level intrinsics the kernels share: a float32's bit pattern and back, and an
address as a pointer. Written as LLVM intrinsics because numba's array `.view` costs
a fifth of a second of compile time per kernel that uses it, and kernels only ever
need one element's bits at a time."""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


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
