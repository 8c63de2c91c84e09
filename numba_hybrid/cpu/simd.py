"""Integer dot products on 8-bit activations, written as generic LLVM vector IR.

``precision="fast"`` rounds activations to 8-bit blocks as ggml does (quantize.py); these
kernels then multiply them with the repacked weights in integers. Plain Numba cannot: it
types ``int32 * int32`` as int64 and the loop never vectorises. The IR here is portable
(no target intrinsics): LLVM turns "sign-extend, multiply, add even and odd lanes" into
``vpmaddwd`` on x86 and the equivalent on other targets.

Every function walks one row in steps of 32 weights. Each step forms sixteen exact int32
pair sums, converts them to float32 and adds ``sum * (weight scale * activation scale)``
into a 16-lane float32 accumulator with one fused multiply-add per lane; after the row, a
fixed tree of shuffles sums the 16 lanes. The order of every floating-point operation is
set here, not by the optimiser, and does not depend on how many tokens a call processes,
so results are bitwise the same for any batch.

Layouts (matmul.py repacks the weights at load, quantize.py the activations per call):
weights ``w`` int8 [K] with float32 scales per 32 (Q8_0) or per 16 (Q6_K) values, or
Q4_K nibbles uint8 [K/2] with scales per 32 values (``dlo`` for the low, ``dhi`` for the
high nibbles of each 32-byte group); activations ``x`` int8 [K] with float32 scales ``xd``
per 32 values (Q8_K's per-256 scale is repeated eight times).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

F32 = ir.FloatType()
I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
V16F = ir.VectorType(F32, 16)
V16I = ir.VectorType(I32, 16)
V32B = ir.VectorType(I8, 32)
V32W = ir.VectorType(I16, 32)
V32I = ir.VectorType(I32, 32)



def _consts(ty, values):
    values = list(values)
    return ir.Constant(ir.VectorType(ty, len(values)), values)


EVEN = _consts(I32, range(0, 32, 2))
ODD = _consts(I32, range(1, 32, 2))


def _fma(builder, a, b, c):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16F, [V16F] * 3),
                                        "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


def _splat(builder, value):
    v = builder.insert_element(ir.Constant(V16F, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 16), None))


def _halves(builder, a, b):
    """Lanes 0-7 = a, lanes 8-15 = b."""
    va = builder.insert_element(ir.Constant(V16F, ir.Undefined), a, ir.Constant(I32, 0))
    vb = builder.insert_element(ir.Constant(V16F, ir.Undefined), b, ir.Constant(I32, 0))
    return builder.shuffle_vector(va, vb, _consts(I32, [0] * 8 + [16] * 8))


def _load32(builder, base, offset):
    ptr = builder.gep(base, [offset])
    return builder.load(builder.bitcast(ptr, V32B.as_pointer()), align=1)


def _pair_sums(builder, a, b, a_unsigned):
    """<32 x i8> a, b -> <16 x i32>: a[2i]*b[2i] + a[2i+1]*b[2i+1] (b signed)."""
    ext = builder.zext if a_unsigned else builder.sext
    a32 = builder.sext(ext(a, V32W), V32I)
    b32 = builder.sext(builder.sext(b, V32W), V32I)
    p = builder.mul(a32, b32)
    return builder.add(builder.shuffle_vector(p, p, EVEN), builder.shuffle_vector(p, p, ODD))


def _reduce(builder, acc):
    """Sum of 16 lanes by a fixed tree: halves added to halves down to one lane."""
    width = 16
    while width > 1:
        width //= 2
        lo = builder.shuffle_vector(acc, acc, _consts(I32, range(width)))
        hi = builder.shuffle_vector(acc, acc, _consts(I32, range(width, 2 * width)))
        acc = builder.fadd(lo, hi)
    return builder.extract_element(acc, ir.Constant(I32, 0))


def _data(context, builder, ty, value):
    return context.make_array(ty)(context, builder, value).data


def _row_loop(builder, n, body):
    """acc = 0; for i in range(n): acc = body(i, acc); return the lanes' sum."""
    acc = cgutils.alloca_once_value(builder, ir.Constant(V16F, None))
    with cgutils.for_range(builder, n) as loop:
        builder.store(body(loop.index, builder.load(acc)), acc)
    return _reduce(builder, builder.load(acc))


def _dot_i8_codegen(per16: bool):
    def codegen(context, builder, sig, args):
        w, wd, x, xd = (_data(context, builder, t, a) for t, a in zip(sig.args, args))
        n = builder.extract_value(context.make_array(sig.args[2])(context, builder,
                                                                  args[2]).shape, 0)
        steps = builder.lshr(n, ir.Constant(I64, 5))

        def body(i, acc):
            off = builder.shl(i, ir.Constant(I64, 5))
            s = builder.sitofp(_pair_sums(builder, _load32(builder, w, off),
                                          _load32(builder, x, off), False), V16F)
            xs = builder.load(builder.gep(xd, [i]))
            if per16:
                j = builder.shl(i, ir.Constant(I64, 1))
                d0 = builder.load(builder.gep(wd, [j]))
                d1 = builder.load(builder.gep(wd, [builder.add(j, ir.Constant(I64, 1))]))
                scale = builder.fmul(_halves(builder, d0, d1), _splat(builder, xs))
            else:
                scale = _splat(builder, builder.fmul(builder.load(builder.gep(wd, [i])), xs))
            return _fma(builder, s, scale, acc)

        return _row_loop(builder, steps, body)
    return codegen


@intrinsic
def dot_q8_0(typingctx, w, wd, x, xd):
    """Q8_0 row (int8 [K], scales per 32) . Q8 activations -> float32."""
    return types.float32(w, wd, x, xd), _dot_i8_codegen(False)


@intrinsic
def dot_q6_k(typingctx, w, wd, x, xd):
    """Q6_K row repacked (int8 q - 32 [K], scales per 16) . Q8 activations -> float32."""
    return types.float32(w, wd, x, xd), _dot_i8_codegen(True)


@intrinsic
def dot_q4_k(typingctx, w, dlo, dhi, x, xd):
    """Q4_K row repacked (nibbles uint8 [K/2], dlo/dhi per 64) . Q8 activations, without
    the mins (the caller subtracts them) -> float32."""
    def codegen(context, builder, sig, args):
        w_, dlo_, dhi_, x_, xd_ = (_data(context, builder, t, a) for t, a in zip(sig.args, args))
        nbytes = builder.extract_value(context.make_array(sig.args[0])(context, builder,
                                                                       args[0]).shape, 0)
        groups = builder.lshr(nbytes, ir.Constant(I64, 5))
        low = ir.Constant(V32B, [15] * 32)
        four = ir.Constant(V32B, [4] * 32)

        def body(g, acc):
            q = _load32(builder, w_, builder.shl(g, ir.Constant(I64, 5)))
            xo = builder.shl(g, ir.Constant(I64, 6))
            xl = _load32(builder, x_, xo)
            xh = _load32(builder, x_, builder.add(xo, ir.Constant(I64, 32)))
            sl = builder.sitofp(_pair_sums(builder, builder.and_(q, low), xl, True), V16F)
            sh = builder.sitofp(_pair_sums(builder, builder.lshr(q, four), xh, True), V16F)
            c = builder.shl(g, ir.Constant(I64, 1))
            xdl = builder.load(builder.gep(xd_, [c]))
            xdh = builder.load(builder.gep(xd_, [builder.add(c, ir.Constant(I64, 1))]))
            al = builder.fmul(builder.load(builder.gep(dlo_, [g])), xdl)
            ah = builder.fmul(builder.load(builder.gep(dhi_, [g])), xdh)
            return _fma(builder, sh, _splat(builder, ah), _fma(builder, sl, _splat(builder, al), acc))

        return _row_loop(builder, groups, body)
    return types.float32(w, dlo, dhi, x, xd), codegen
