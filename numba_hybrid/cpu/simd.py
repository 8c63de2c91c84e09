"""Integer matmul micro-kernels on 8-bit activations, written as generic LLVM vector IR.

``precision="fast"`` rounds activations to 8-bit blocks as ggml does (quantize.py); these
kernels multiply them with the weights in integers. Plain Numba cannot: it types
``int32 * int32`` as int64 and such loops never vectorise. The IR is portable (no target
intrinsics): LLVM turns "sign-extend 16-bit lanes, multiply, add even and odd lanes" into
``vpmaddwd`` on x86 and the equivalent elsewhere.

A kernel call takes one weight row and up to ``TILE`` tokens and writes one float32 per
token. The row is decoded once per 64 or 32 weights into 16-bit integers, with the integer
sub-block scales of the K-quants already multiplied in, and reused for every token of the
tile; per token the work is then one ``vpmaddwd`` and one integer add per 32 weights.

Arithmetic, per token, in this order and the same for any tile size (so a token's result
does not depend on the batch, bit for bit); the result goes straight to ``out[i0 + j, r]``:

* Q4_K, Q6_K (super-blocks of 256): exact int32 sums over the super-block in 16 lanes,
  converted to float32 and added into a 16-lane float32 accumulator with one fused
  multiply-add by ``d * xd`` (the weight's and the activation's super-block scales).
  Bounds: Q4_K lanes sum 16 products of |nibble * scale| <= 945 and |x| <= 127, Q6_K 16
  of |q * scale| <= 4096: under 2^24, so the conversion is exact too.
* Q8_0 (blocks of 32): the block's int32 pair sums, converted and added with one FMA by
  ``d * xd`` per block, even blocks into one accumulator and odd blocks into another (two
  independent chains), which are added at the end.
* After the row, a fixed tree of shuffles sums the 16 lanes. Q4_K then subtracts its mins
  term, sum over 32-blocks of dmin * min * (the activations' block sum xs), accumulated in
  8 lanes one super-block at a time and summed by a fixed tree.

Layouts (matmul.py repacks the weights at load, quantize.py the activations per call):
activations ``x`` int16 [T, K] and float32 scales ``xd`` [T, K/32] (Q8_K's per-256
scale repeated for each 32). Weights, per row: Q4_K in 148-byte super-blocks, one stream
(d f16, dmin f16, 8 six-bit scales and 8 mins as bytes, then the file's 128 bytes of
nibbles: byte l of each 32-byte group holds element l of the group's 64 in the low nibble,
l + 32 in the high one); Q6_K ``qs`` int8 [K] (q - 32), ``sc`` int8 [K/16], ``d`` float32
[K/256]; Q8_0 the file's rows as they are (uint8, blocks of an f16 scale and 32 int8
values), read in place from the memory map. Q4_K also takes the activations' 32-block sums
``xs`` [T, K/32].
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

TILE = 8                       # tokens per call
Q4_K_BLOCK = 148               # bytes of a repacked Q4_K super-block (see the docstring)

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


def _c(v):
    return ir.Constant(I64, v)


def _fma(builder, a, b, c):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16F, [V16F] * 3),
                                        "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


def _splat(builder, value, vec_ty):
    v = builder.insert_element(ir.Constant(vec_ty, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, vec_ty.count), None))


def _halves16(builder, a, b):
    """<32 x i16>: lanes 0-15 = a, 16-31 = b."""
    va = builder.insert_element(ir.Constant(V32W, ir.Undefined), a, ir.Constant(I32, 0))
    vb = builder.insert_element(ir.Constant(V32W, ir.Undefined), b, ir.Constant(I32, 0))
    return builder.shuffle_vector(va, vb, _consts(I32, [0] * 16 + [32] * 16))


def _load(builder, base, offset, ty):
    ptr = builder.gep(base, [offset])
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=1)


def _scalar(builder, base, offset):
    return builder.load(builder.gep(base, [offset]))


def _half(builder, base, offset, extra):
    """The f16 at byte offset + extra of a uint8 buffer, as float32."""
    ptr = builder.gep(base, [builder.add(offset, _c(extra))])
    return builder.fpext(builder.load(builder.bitcast(ptr, ir.HalfType().as_pointer()),
                                      align=1), F32)


# Software prefetch of the weight stream, this many bytes ahead (into the next rows), in the
# kernels for 2 or more tokens: the hardware prefetcher alone left the 8-token Q4_K kernel
# at 285 GFLOP/s on weights from DRAM against 520 from L3 (with it 350-470; Q6_K 235 ->
# 375, Q8_0 189 -> 252). One token is bandwidth-bound and streams well without it.
PREFETCH = 1024


def _prefetch(builder, base, offset):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]),
        "llvm.prefetch.p0")
    ptr = builder.gep(builder.bitcast(base, I8.as_pointer()), [offset])
    builder.call(fn, [ptr, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def _madd(builder, a, b):
    """<32 x i16> a, b -> <16 x i32>: a[2i]*b[2i] + a[2i+1]*b[2i+1] (vpmaddwd)."""
    p = builder.mul(builder.sext(a, V32I), builder.sext(b, V32I))
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


class _Args:
    """Data pointers and shapes of the kernel's array arguments."""

    def __init__(self, context, builder, sig, args):
        self.context, self.builder = context, builder
        self.arrays = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array)
                       else None for t, a in zip(sig.args, args)]
        self.values = args

    def data(self, i):
        return self.arrays[i].data

    def dim(self, i, axis):
        return self.builder.extract_value(self.arrays[i].shape, axis)

    def stride(self, i, axis):
        return self.builder.extract_value(self.arrays[i].strides, axis)

    def int64(self, i, sig):
        return self.context.cast(self.builder, self.values[i], sig.args[i], types.int64)


def _tile(builder, n, K, x, xd, tok, i0, n_outer, outer_step, inner, n_acc):
    """The loop nest shared by every type: for each of the row's K / outer_step outer
    blocks, ``inner(o, xrows)`` returns, per token, the block's float32 term to add
    (a <16 x float> and its scale). Block o goes to accumulator o % n_acc (independent
    FMA chains, so one token is not bound by FMA latency); at the end the accumulators
    are added in order and their lanes summed. Returns the n sums."""
    xrows, xdrows = [], []
    for j in range(n):
        t = builder.load(builder.gep(tok, [builder.add(i0, _c(j))]))
        xrows.append(builder.gep(x, [builder.mul(t, K)]))
        xdrows.append(builder.gep(xd, [builder.mul(t, builder.lshr(K, _c(5)))]))
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(V16F, None)) for _ in range(n_acc)]
            for _ in range(n)]

    def step(o, a):
        terms = inner(o, xrows)
        xo = builder.mul(o, _c(outer_step // 32))
        for j in range(n):
            vec, wscale = terms[j]
            s = builder.fmul(wscale, _scalar(builder, xdrows[j], xo))
            builder.store(_fma(builder, vec, _splat(builder, s, V16F),
                               builder.load(accs[j][a])), accs[j][a])

    with cgutils.for_range(builder, builder.udiv(n_outer, _c(n_acc))) as loop:
        for a in range(n_acc):
            step(builder.add(builder.mul(loop.index, _c(n_acc)), _c(a)), a)
    done = builder.mul(builder.udiv(n_outer, _c(n_acc)), _c(n_acc))
    with cgutils.for_range(builder, builder.sub(n_outer, done)) as loop:   # the tail
        step(builder.add(done, loop.index), 0)
    sums = []
    for j in range(n):
        total = builder.load(accs[j][0])
        for a in range(1, n_acc):
            total = builder.fadd(total, builder.load(accs[j][a]))
        sums.append(_reduce(builder, total))
    return sums


def _q4_k_mins(builder, n, K, w, xs, tok, i0):
    """Per token: sum over 32-blocks c of dmin * mn[c] * xs[t, c] (dmin, mn: the
    super-block's), in 8 lanes (one super-block per step), the lanes summed by a fixed
    tree."""
    v8b, v8f = ir.VectorType(I8, 8), ir.VectorType(F32, 8)
    rows = [builder.gep(xs, [builder.mul(builder.load(builder.gep(tok, [builder.add(i0, _c(j))])),
                                         builder.lshr(K, _c(5)))]) for j in range(n)]
    accs = [cgutils.alloca_once_value(builder, ir.Constant(v8f, None)) for _ in range(n)]
    with cgutils.for_range(builder, builder.lshr(K, _c(8))) as loop:
        sb = loop.index
        blk = builder.mul(sb, _c(Q4_K_BLOCK))
        m = builder.uitofp(_load(builder, w, builder.add(blk, _c(12)), v8b), v8f)
        dm = builder.insert_element(ir.Constant(v8f, ir.Undefined), _half(builder, w, blk, 2),
                                    ir.Constant(I32, 0))
        ml = builder.fmul(m, builder.shuffle_vector(dm, dm, ir.Constant(ir.VectorType(I32, 8),
                                                                        None)))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f] * 3),
                                            "llvm.fma.v8f32")
        for j in range(n):
            xv = _load(builder, rows[j], builder.mul(sb, _c(8)), v8f)
            builder.store(builder.call(fn, [ml, xv, builder.load(accs[j])]), accs[j])
    out = []
    for j in range(n):
        acc, width = builder.load(accs[j]), 8
        while width > 1:
            width //= 2
            acc = builder.fadd(builder.shuffle_vector(acc, acc, _consts(I32, range(width))),
                               builder.shuffle_vector(acc, acc, _consts(I32, range(width,
                                                                                   2 * width))))
        out.append(builder.extract_element(acc, ir.Constant(I32, 0)))
    return out


_WEIGHT_ARGS = {"q8_0": 1, "q6_k": 3, "q4_k": 1}     # arrays before x in the signature


def _kernel(kind: str):
    """codegen of the kernel for ``kind`` (q4_k, q6_k, q8_0): a switch on the token count
    n to the code for that many tokens (1 to TILE; anything else runs the 1-token code)."""
    def codegen(context, builder, sig, args):
        a = _Args(context, builder, sig, args)
        ix = _WEIGHT_ARGS[kind]
        n = a.int64(ix + (5 if kind == "q4_k" else 4), sig)
        end = builder.append_basic_block("tile_end")
        cases = {k: builder.append_basic_block(f"tile_{k}") for k in range(1, TILE + 1)}
        switch = builder.switch(n, cases[1])
        for k in range(2, TILE + 1):
            switch.add_case(ir.Constant(I64, k), cases[k])
        for k, block in cases.items():
            builder.position_at_end(block)
            _emit(context, builder, sig, a, kind, k)
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()
    return codegen


def _emit(context, builder, sig, a, kind, n):
    """The n-token kernel for ``kind``."""
    ix = _WEIGHT_ARGS[kind]
    qs = a.data(0)
    if kind == "q6_k":
        sc, d = a.data(1), a.data(2)
    x, xd = a.data(ix), a.data(ix + 1)
    if kind == "q4_k":
        xs = a.data(ix + 2)
        ix += 1
    tok, i0 = a.data(ix + 2), a.int64(ix + 3, sig)
    out, r = a.data(ix + 5), a.int64(ix + 6, sig)
    out_stride = a.stride(ix + 5, 0)
    K = a.dim(_WEIGHT_ARGS[kind], 1)

    # K-quant super-blocks: each token's integer sums run in `chains` independent
    # chains (fewer tokens, more chains, so one token is not bound by the latency of
    # the multiply-adds), converted and added in float32. Every partial sum is below
    # 2^24, so the conversions and adds are exact and the result is the same for any
    # number of chains; the adds are float so that LLVM keeps the chains apart.
    chains = 4 if n <= 2 else (2 if n <= 4 else 1)

    def _combine(iaccs, dv):
        out = []
        for j in range(n):
            f = builder.sitofp(iaccs[chains * j], V16F)
            for c in range(1, chains):
                f = builder.fadd(f, builder.sitofp(iaccs[chains * j + c], V16F))
            out.append((f, dv))
        return out

    def q4_k_step(sb, xrows):
        iaccs = [ir.Constant(V16I, None)] * (chains * n)
        low, four = ir.Constant(V32B, [15] * 32), ir.Constant(V32B, [4] * 32)
        blk = builder.mul(sb, _c(Q4_K_BLOCK))
        for line in range(0, Q4_K_BLOCK if n > 1 else 0, 64):
            _prefetch(builder, qs, builder.add(blk, _c(PREFETCH + line)))
        for g in range(4):
            grp = builder.add(builder.mul(sb, _c(4)), _c(g))
            q = _load(builder, qs, builder.add(blk, _c(20 + 32 * g)), V32B)
            ws = []
            for half, nib in enumerate((builder.and_(q, low), builder.lshr(q, four))):
                s = builder.zext(_scalar(builder, qs, builder.add(blk, _c(4 + 2 * g + half))),
                                 I16)
                ws.append(builder.mul(builder.zext(nib, V32W), _splat(builder, s, V32W)))
            for j in range(n):
                xo = builder.mul(grp, _c(64))
                xl = _load(builder, xrows[j], xo, V32W)
                xh = _load(builder, xrows[j], builder.add(xo, _c(32)), V32W)
                a = chains * j + g % chains
                iaccs[a] = builder.add(iaccs[a], builder.add(_madd(builder, ws[0], xl),
                                                             _madd(builder, ws[1], xh)))
        return _combine(iaccs, _half(builder, qs, blk, 0))

    def q6_k_step(sb, xrows):
        iaccs = [ir.Constant(V16I, None)] * (chains * n)
        for line in range(0, 256 if n > 1 else 0, 64):
            _prefetch(builder, qs, builder.add(builder.mul(sb, _c(256)), _c(PREFETCH + line)))
        for h in range(8):
            step = builder.add(builder.mul(sb, _c(8)), _c(h))
            q = builder.sext(_load(builder, qs, builder.mul(step, _c(32)), V32B), V32W)
            s0 = builder.sext(_scalar(builder, sc, builder.mul(step, _c(2))), I16)
            s1 = builder.sext(_scalar(builder, sc, builder.add(builder.mul(step, _c(2)),
                                                               _c(1))), I16)
            w = builder.mul(q, _halves16(builder, s0, s1))
            for j in range(n):
                xv = _load(builder, xrows[j], builder.mul(step, _c(32)), V32W)
                a = chains * j + h % chains
                iaccs[a] = builder.add(iaccs[a], _madd(builder, w, xv))
        return _combine(iaccs, _scalar(builder, d, sb))

    def q8_0_step(b, xrows):
        # The file's 34-byte blocks in place: an f16 scale, then 32 int8 values.
        blk = builder.mul(b, _c(34))
        if n > 1:
            _prefetch(builder, qs, builder.add(blk, _c(PREFETCH)))
        w = builder.sext(_load(builder, qs, builder.add(blk, _c(2)), V32B), V32W)
        half = builder.load(builder.bitcast(builder.gep(qs, [blk]), ir.HalfType().as_pointer()),
                            align=1)
        dv = builder.fpext(half, F32)
        return [(builder.sitofp(_madd(builder, w, _load(builder, xrows[j],
                                                        builder.mul(b, _c(32)), V32W)),
                                V16F), dv) for j in range(n)]

    inner, step, n_acc = {"q4_k": (q4_k_step, 256, 1), "q6_k": (q6_k_step, 256, 1),
                          "q8_0": (q8_0_step, 32, 2)}[kind]
    sums = _tile(builder, n, K, x, xd, tok, i0, builder.udiv(K, _c(step)), step, inner, n_acc)
    if kind == "q4_k":
        mins = _q4_k_mins(builder, n, K, qs, xs, tok, i0)
        sums = [builder.fsub(v, m) for v, m in zip(sums, mins)]
    base = builder.bitcast(out, I8.as_pointer())
    for j, v in enumerate(sums):
        off = builder.add(builder.mul(builder.add(i0, _c(j)), out_stride),
                          builder.mul(r, _c(4)))
        builder.store(v, builder.bitcast(builder.gep(base, [off]), F32.as_pointer()))


# One kernel per type: out[i0 + j, r] = row r . x[tok[i0 + j]] for j < n <= TILE (the
# caller passes the row's arrays and r).

@intrinsic
def q8_0(typingctx, raw, x, xd, tok, i0, n, out, r):
    """A Q8_0 row (the file's bytes)."""
    return types.none(raw, x, xd, tok, i0, n, out, r), _kernel("q8_0")


@intrinsic
def q6_k(typingctx, qs, sc, d, x, xd, tok, i0, n, out, r):
    """A Q6_K row (matmul.repack_int_q6_k)."""
    return types.none(qs, sc, d, x, xd, tok, i0, n, out, r), _kernel("q6_k")


@intrinsic
def q4_k(typingctx, w, x, xd, xs, tok, i0, n, out, r):
    """A Q4_K row (matmul.repack_int_q4_k); xs: the activations' 32-block sums."""
    return types.none(w, x, xd, xs, tok, i0, n, out, r), _kernel("q4_k")


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
