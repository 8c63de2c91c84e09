"""Integer matmul on Q8_0 weights as the file stores them: no repacking, no copy.

Q8_0 rows are read in place from the file's memory map, so loading a Q8_0 model touches
none of its weights (a 1.1 GB Q8_0 model loaded in 1.5-2.0 s when they were copied into
panels, most of it the kernel handing out fresh pages; 0.04 s in place). A row is K/32
blocks of 34 bytes, an f16 scale d then 32 int8 weights w. Two blocks, 2b and 2b + 1, are
one 64-byte vector: the 68 bytes at 68 b are read as two overlapping 64-byte loads, one
two-source permute picks the 64 weights (``vpermt2w``) and one word permute spreads the
two scales over the vector's halves. Lanes 0-7 take block 2b and 8-15 block 2b + 1. With
8-bit activations x (quantize.quantize_int8, blocks of 32, scale xd), per (row, token) and
pair of blocks, exactly:

    p = the 16 lanes' sums of 4 products w * x, in int32           ``vpdpbusd``
    acc += float(p) * (d * xd)                                      16 float lanes, one FMA

and at the row's end the lanes of acc are summed in a fixed tree. ``vpdpbusd`` multiplies
unsigned by signed bytes, so one side is offset by 128 and a correction starts the sum.
Which side is a matter of speed only (p is an exact integer either way), and it depends on
how many tokens a pass takes:

* Few tokens (nt < WIDE, decode): the weights are offset (w xor 0x80, once per pair) and
  each token's correction -128 * (x summed per lane) is read from ``negs``, computed once
  per call. This keeps a pair's work short, which one-token passes, bound by memory, need.
* Many (prompts): the activations are offset (``xu`` = x + 128, once per call) and the
  correction -128 * (w summed per lane) is one more ``vpdpbusd`` per pair and row, shared
  by all the pass's tokens. ROWS rows go together, so every activation vector loaded
  serves both, and the activations' scales come spread over 16 lanes (``xs``), a memory
  operand of the multiply. A (row, token, pair) then costs one ``vpdpbusd``, one
  conversion, one multiply and one FMA. (Against one row at a time, offset weights and 4
  tokens a pass: a 512-token prompt on the Q8_0 bench model 282 -> 327-346 tok/s, decode
  unchanged.)

A call takes up to TOKENS tokens; per (row, token) the operations are the same, in the same
order, for any number of tokens and either side offset, so a token's result does not
depend on the batch, bit for bit.

Without AVX512-VNNI the same integer sums come from portable IR (panels._dpbusd).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import helper, serial
from .panels import (F16, F32, I8, I16, I32, V16F, V16I, V64B, _c, _consts, _dpbusd, _fma,
                     _has_vnni, _load, _prefetch, _splat)

TOKENS = 8              # tokens per pass, at most
WIDE = 4                # passes of this many tokens or more offset the activations
ROWS = 2                # rows taken together by such passes
BLOCK = 34              # bytes per Q8_0 block: f16 d, 32 int8
# Software prefetch of the row's stream, this many bytes ahead, in passes of few tokens and
# in wide ones. One token, three matrices 65536 x 2048 in turn from DRAM, against 1024 B in
# the same process: 2048 B +4%, 3072 B +5-9%, 4096 B +8%, 6144 B +10-16%, 8192 B +10%,
# 12288 B +9%; decode on the Q8_0 bench model ~4% faster (8 of 10 alternating runs). Wide
# passes read each row from memory once and then from the caches (a 512-token prompt was
# 3% slower with 6144 B), so they keep 1024 B (one matrix 32768 x 2048, one token: none
# 28 GB/s, 512 B 40, 1024 B 40, 2048 B 39).
PREFETCH = 6144
PREFETCH_WIDE = 1024
V32W = ir.VectorType(I16, 32)
V2F = ir.VectorType(F32, 2)
# From the 128 bytes of two loads, at 68 b and 68 b + 4: block 2b's weights (bytes 2-33 of
# the first) and block 2b + 1's (bytes 32-63 of the second, 96-127 of the pair).
_PICK = _consts(list(range(2, 34)) + list(range(96, 128)))
# Block 2b's scale is word 0 of the first load, block 2b + 1's word 17.
_SCALES = _consts([0] * 8 + [17] * 8)
_HALVES = _consts([0] * 8 + [1] * 8)
_BIAS = ir.Constant(V64B, [0x80] * 64)


@serial
def q8_0_activations(xq, xd):
    """8-bit activations (quantize.quantize_int8: xq int8 [T, K], xd [T, K/32]) as the
    kernel reads them: (xq, xd, negs, xu, xs). negs int32 [T, K/4]: -128 * the sums of each
    4 consecutive xq. If T >= WIDE (else empty): xu = xq + 128 as uint8 [T, K], and xs the
    scales spread over the lanes of each pair of blocks, float32 [T, ceil(K/64), 16] (lanes
    0-7 block 2g's, 8-15 block 2g + 1's or zero past the end)."""
    T, K = xq.shape
    nb = K // 32
    negs = np.empty((T, K // 4), np.int32)
    for t in range(T):
        for i in range(K // 4):
            s = np.int32(xq[t, 4 * i]) + np.int32(xq[t, 4 * i + 1])
            s += np.int32(xq[t, 4 * i + 2]) + np.int32(xq[t, 4 * i + 3])
            negs[t, i] = -128 * s
    Tw = T if T >= WIDE else 0
    xu = np.empty((Tw, K), np.uint8)
    xs = np.zeros((Tw, (nb + 1) // 2, 16), np.float32)
    for t in range(Tw):
        for i in range(K):
            xu[t, i] = np.uint8(np.int32(xq[t, i]) + 128)
        for b in range(nb):
            for lane in range(8):
                xs[t, b // 2, 8 * (b % 2) + lane] = xd[t, b]
    return xq, xd, negs, xu, xs


@helper
def stacked(w, start, acts, tok, i0, nt, r0, r1, out):
    """q8_0_rows for the rows r0..r1 of a product stacking several matrices that fall in
    w, whose rows are the product's from ``start``; returns where the next matrix starts."""
    n = w.shape[0]
    lo, hi = max(r0, start), min(r1, start + n)
    if lo < hi:
        q8_0_rows(w, acts, tok, i0, nt, lo - start, hi - lo, out, lo)
    return start + n


def _hsum16(builder, v):
    """The 16 lanes of v summed in a fixed tree (halves, then quarters, ...)."""
    for n in (8, 4, 2, 1):
        lo = builder.shuffle_vector(v, v, _consts(range(n)))
        hi = builder.shuffle_vector(v, v, _consts(range(n, 2 * n)))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, _c(0, I32))


def _emit(context, builder, sig, args, nt, vnni):
    w, tok, out = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 2, 7))
    acts = [context.make_array(ty)(context, builder, v)
            for ty, v in zip(sig.args[1].types, cgutils.unpack_tuple(builder, args[1]))]
    cast = lambda i: context.cast(builder, args[i], sig.args[i], types.int64)  # noqa: E731
    i0, r0, nr, c0 = cast(3), cast(5), cast(6), cast(8)
    wide = nt >= WIDE
    K = builder.extract_value(acts[0].shape, 1)
    # per token: its activations (xu or xq), their scales (xs or xd), and negs
    tokens = []
    for j in range(nt):
        t = builder.load(builder.gep(tok.data, [builder.add(i0, _c(j))]))
        row = []
        for a in ((3, 4) if wide else (0, 1, 2)):
            data = builder.bitcast(acts[a].data, I8.as_pointer())
            row.append(builder.gep(data, [builder.mul(t, builder.extract_value(acts[a].strides,
                                                                                0))]))
        tokens.append(row)
    base = builder.bitcast(out.data, I8.as_pointer())
    ostride = builder.extract_value(out.strides, 0)
    wstride = builder.extract_value(w.strides, 0)

    def rows(first, n):
        """Rows first..first + n - 1 of the call, together."""
        ptrs = [builder.gep(w.data, [builder.mul(builder.add(r0, builder.add(first, _c(r))),
                                                 wstride)]) for r in range(n)]
        cols = [builder.add(c0, builder.add(first, _c(r))) for r in range(n)]
        _rows(builder, ptrs, cols, K, tokens, wide, base, ostride, i0, vnni)

    together = ROWS if wide else 1
    full = builder.udiv(nr, _c(together))
    with cgutils.for_range(builder, full) as loop:
        rows(builder.mul(loop.index, _c(together)), together)
    if together > 1:
        with cgutils.for_range(builder, builder.sub(nr, builder.mul(full, _c(together)))) as loop:
            rows(builder.add(builder.mul(full, _c(together)), loop.index), 1)


def _rows(builder, ptrs, cols, K, tokens, wide, base, ostride, i0, vnni):
    """len(ptrs) rows times the tokens, each activation vector loaded once for all rows."""
    zero = ir.Constant(V16I, None)
    accs = [[cgutils.alloca_once(builder, V16F) for _ in ptrs] for _ in tokens]
    for a in accs:
        for acc in a:
            builder.store(ir.Constant(V16F, None), acc)

    def widen(v, n):
        """The n-lane vector v in the low lanes of a vector twice as long, zeros above."""
        return builder.shuffle_vector(v, ir.Constant(v.type, None), _consts(range(2 * n)))

    def pair(g, last):
        """Blocks 2g and 2g + 1; ``last``: block 2g alone (an odd number of blocks), the
        upper half of every vector zero."""
        off = builder.mul(g, _c(2 * BLOCK))
        ws, starts, ds = [], [], []
        for row in ptrs:
            _prefetch(builder, row, builder.add(off, _c(PREFETCH_WIDE if wide else PREFETCH)))
            if last:
                a = widen(_load(builder, row, off, ir.VectorType(I8, BLOCK)), 32)
                b = ir.Constant(V64B, None)
            else:
                a = _load(builder, row, off, V64B)
                b = _load(builder, row, builder.add(off, _c(4)), V64B)
            w = builder.shuffle_vector(a, b, _PICK)
            if wide:        # the correction from the weights, for every token
                starts.append(builder.sub(zero, _dpbusd(builder, zero, _BIAS, w, vnni)))
            else:
                w = builder.xor(w, _BIAS)
            ws.append(w)
            halves = builder.bitcast(a, V32W)
            d = builder.fpext(builder.bitcast(builder.shuffle_vector(halves, halves, _SCALES),
                                              ir.VectorType(F16, 16)), V16F)
            if last:
                d = builder.shuffle_vector(d, ir.Constant(V16F, None),
                                           _consts(list(range(8)) + list(range(16, 24))))
            ds.append(d)
        at = builder.mul(g, _c(64))
        for j, ptr in enumerate(tokens):
            x = (widen(_load(builder, ptr[0], at, ir.VectorType(I8, 32)), 32) if last
                 else _load(builder, ptr[0], at, V64B))
            if wide:
                sx = _load(builder, ptr[1], at, V16F)
            else:
                sx = (_splat(builder, _load(builder, ptr[1], builder.mul(g, _c(8)), F32), V2F)
                      if last else _load(builder, ptr[1], builder.mul(g, _c(8)), V2F))
                sx = builder.shuffle_vector(sx, sx, _HALVES)
                ng = (widen(_load(builder, ptr[2], at, ir.VectorType(I32, 8)), 8) if last
                      else _load(builder, ptr[2], at, V16I))
            for r in range(len(ptrs)):
                p = (_dpbusd(builder, starts[r], x, ws[r], vnni) if wide
                     else _dpbusd(builder, ng, ws[r], x, vnni))
                acc = builder.load(accs[j][r])
                builder.store(_fma(builder, builder.sitofp(p, V16F), builder.fmul(ds[r], sx),
                                   acc), accs[j][r])

    nb = builder.udiv(K, _c(32))
    with cgutils.for_range(builder, builder.udiv(nb, _c(2))) as loop:
        pair(loop.index, False)
    with builder.if_then(builder.icmp_unsigned("!=", builder.urem(nb, _c(2)), _c(0))):
        pair(builder.udiv(nb, _c(2)), True)
    for j in range(len(tokens)):
        for r in range(len(ptrs)):
            off = builder.add(builder.mul(builder.add(i0, _c(j)), ostride),
                              builder.mul(cols[r], _c(4)))
            builder.store(_hsum16(builder, builder.load(accs[j][r])),
                          builder.bitcast(builder.gep(base, [off]), F32.as_pointer()))


def _codegen(context, builder, sig, args):
    nt = context.cast(builder, args[4], sig.args[4], types.int64)
    end = builder.append_basic_block("rows_end")
    switch = builder.switch(nt, end)
    vnni = _has_vnni()
    for t in range(1, TOKENS + 1):
        block = builder.append_basic_block(f"rows_{t}")
        switch.add_case(_c(t), block)
        builder.position_at_end(block)
        _emit(context, builder, sig, args, t, vnni)
        builder.branch(end)
    builder.position_at_end(end)
    return context.get_dummy_value()


@intrinsic
def q8_0_rows(typingctx, w, acts, tok, i0, nt, r0, nr, out, c0):
    """out[i0 + j, c0 + i] = Q8_0 row r0 + i of w (uint8 [N, 34 K/32], the file's bytes)
    . the 8-bit activations of token tok[i0 + j] (acts = q8_0_activations(xq, xd)), for
    i < nr and j < nt <= TOKENS."""
    sig = types.none(w, acts, tok, i0, nt, r0, nr, out, c0)
    return sig, _codegen
