"""What every kernel module shares: the compile options, and bit-level intrinsics (a
float32's bit pattern and back, an address as a pointer).

Kernels are called from Python (JIT: cached on disk, with the GIL released); helpers
only from other kernels (HELPER: no Python wrapper to compile, which saves a large share
of the compile time; calling one from Python would crash, so tests call kernels only).
The intrinsics exist because numba's array `.view` costs a fifth of a second of compile
time per kernel that uses it, and kernels only ever need one element's bits at a time.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import CACHE

JIT = dict(cache=CACHE, nogil=True)
HELPER = dict(nogil=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)


def _bitcast(source, target, llvm_target, doc: str):
    """An intrinsic reinterpreting a `source` scalar's bits as a `target` scalar."""
    def cast(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_target)
        return target(source), codegen
    cast.__doc__ = doc
    return intrinsic(cast)


f32_bits = _bitcast(types.float32, types.uint32, ir.IntType(32), "The uint32 bit pattern of a float32.")
bits_f32 = _bitcast(types.uint32, types.float32, ir.FloatType(), "The float32 whose bit pattern is the uint32.")
f64_bits = _bitcast(types.float64, types.int64, ir.IntType(64),
                    "The int64 bit pattern of a float64 (non-negative floats order like it).")


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


def _c_call(ret):
    """An intrinsic calling the C function at an int64 address with int64 arguments (a
    cfunc's `address`): a function pointer passed as a plain integer costs nothing to
    dispatch, where numba types a cfunc object argument in ~40 us per call."""
    def call(typingctx, fn, *args):
        sig = ret(types.int64, *([types.int64] * len(args)))

        def codegen(context, builder, signature, llargs):
            i64 = ir.IntType(64)
            fnty = ir.FunctionType(ir.VoidType() if ret is types.void else i64, [i64] * len(args))
            result = builder.call(builder.inttoptr(llargs[0], fnty.as_pointer()), llargs[1:])
            return context.get_dummy_value() if ret is types.void else result

        return sig, codegen
    return call


@intrinsic
def call_void(typingctx, fn, a, b, c, d, e, f):
    """fn(a, b, c, d, e, f) for a C function `void fn(int64 x 6)` at address fn."""
    return _c_call(types.void)(typingctx, fn, a, b, c, d, e, f)


@intrinsic
def call_void3(typingctx, fn, a, b, c):
    """fn(a, b, c) for a C function `void fn(int64 x 3)` at address fn."""
    return _c_call(types.void)(typingctx, fn, a, b, c)


@intrinsic
def call_int5(typingctx, fn, a, b, c, d, e):
    """fn(a, b, c, d, e) for a C function `int64 fn(int64 x 5)` at address fn."""
    return _c_call(types.int64)(typingctx, fn, a, b, c, d, e)
