"""LLVM IR that Numba's own lowering lacks: vectorisable math for loops it would leave scalar,
and a software prefetch."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

F32 = ir.FloatType()
I32 = ir.IntType(32)


# ---- exp -------------------------------------------------------------------------------------
#
# libm's expf is an opaque call, so loops that need it (SiLU, sigmoid, softmax) never
# vectorise. This one is plain IR that LLVM inlines and vectorises: Cody-Waite reduction
# x = k ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r (the Cephes expf
# coefficients), and the scaling by 2^k as an integer add to the exponent field (immune to
# the re-association the kernels' fast-math flags allow). Within 5 ulp of e^x (mean 1 ulp)
# for normal results; above ln(FLT_MAX) it gives inf, below ln(FLT_MIN) zero (no denormals), NaN
# gives NaN.

_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)


@intrinsic
def exp32(typingctx, x):
    """e**x for a float32 x, vectorisable."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        (v,) = args
        f = lambda c: ir.Constant(F32, c)           # noqa: E731
        lo, hi = -87.33654, 88.72283                # ln FLT_MIN, ln FLT_MAX
        xc = builder.select(builder.fcmp_ordered(">=", v, f(lo)), v, f(lo))
        xc = builder.select(builder.fcmp_ordered("<=", xc, f(hi)), xc, f(hi))
        rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32, [F32]),
                                              "llvm.rint.f32")
        k = builder.call(rint, [builder.fmul(xc, f(1.44269504088896341))])
        r = builder.fsub(builder.fsub(xc, builder.fmul(k, f(0.693359375))),
                         builder.fmul(k, f(-2.12194440e-4)))
        p = f(_EXP_POLY[0])
        for c in _EXP_POLY[1:]:
            p = builder.fadd(builder.fmul(p, r), f(c))
        p = builder.fadd(builder.fadd(builder.fmul(p, builder.fmul(r, r)), r), f(1.0))
        shift = builder.shl(builder.fptosi(k, I32), ir.Constant(I32, 23))
        y = builder.bitcast(builder.add(builder.bitcast(p, I32), shift), F32)
        y = builder.select(builder.fcmp_ordered(">", v, f(hi)), f(float("inf")), y)
        y = builder.select(builder.fcmp_ordered("<", v, f(lo)), f(0.0), y)
        return builder.select(builder.fcmp_unordered("uno", v, v), v, y)
    return types.float32(x), codegen


# ---- prefetch --------------------------------------------------------------------------------

def emit_prefetch(builder, base, offset, locality=3):
    """IR: prefetch the cache line at byte pointer ``base`` + ``offset`` (an i64 value) for
    reading; locality 3 (prefetcht0) into every cache level, 1 (prefetcht2) into the outer
    ones, 0 (prefetchnta) non-temporal, kept out of the outer caches where the CPU can."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), I32, I32, I32]),
        "llvm.prefetch.p0")
    builder.call(fn, [builder.gep(base, [offset]), ir.Constant(I32, 0),
                      ir.Constant(I32, locality), ir.Constant(I32, 1)])


@intrinsic
def prefetch_line(typingctx, a, offset):
    """Ask for the cache line ``offset`` bytes into array a's data (a hint to the memory
    system: it never faults, whatever the address)."""
    if not isinstance(a, types.Array) or not isinstance(offset, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        emit_prefetch(builder, builder.bitcast(data, ir.IntType(8).as_pointer()),
                      context.cast(builder, args[1], sig.args[1], types.int64))
        return context.get_dummy_value()
    return types.none(a, offset), codegen
