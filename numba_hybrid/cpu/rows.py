"""Integer matmul on Q8_0 weights as the file stores them: no repacking, no copy.

Q8_0 rows are read in place from the file's memory map, so loading a Q8_0 model touches
none of its weights (a 1.1 GB Q8_0 model loaded in 1.5-2.0 s when they were copied into
panels, most of it the kernel handing out fresh pages; 0.04 s in place). A row is K/32
blocks of 34 bytes, an f16 scale d then 32 int8 weights w. Two blocks, 2b and 2b + 1, are
one 64-byte vector: the 68 bytes at 68 b are read as two overlapping 64-byte loads, one
two-source permute picks the 64 weights (``vpermt2w``) and one word permute spreads the
two scales over the vector's halves. With 8-bit activations x (quantize.quantize_int8, blocks of 32,
scale xd), per token, exactly (|p| < 2^16 per lane):

    p = (w + 128) . x - 128 * (x summed per lane)                  one ``vpdpbusd``
    acc += float(p) * (d * xd)                                      16 float lanes, one FMA

``vpdpbusd`` multiplies unsigned by signed bytes, hence w + 128 (w xor 0x80) and the
correction ``neg`` (q8_0_negs, once per token for all rows), which starts each sum. Lanes
0-7 take the even blocks and 8-15 the odd ones; two accumulators take alternate pairs (the
FMA latency) and at the row's end the lanes are summed in a fixed tree. A call takes rows
one after the other (one stream through memory) and up to TOKENS tokens, each weight
vector serving every token; per (row, token) the
operations are the same, in the same order, for any number of tokens, so a token's result
does not depend on the batch, bit for bit.

Without AVX512-VNNI the same integer sums come from portable IR (panels._dpbusd).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import helper
from .panels import (F16, F32, I8, I16, I32, V16F, V16I, V64B, _c, _consts, _dpbusd, _fma,
                     _has_vnni, _load, _prefetch, _splat)

TOKENS = 4              # tokens per call, at most
BLOCK = 34              # bytes per Q8_0 block: f16 d, 32 int8
ACCS = 2                # accumulators per (row, token), taking alternate pairs of blocks
# Software prefetch of the row's stream, this many bytes ahead (one matrix 32768 x 2048
# from DRAM, one token: none 28 GB/s, 512 B 40, 1024 B 40, 2048 B 39).
PREFETCH = 1024
V32W = ir.VectorType(I16, 32)
V2F = ir.VectorType(F32, 2)
# From the 128 bytes of two loads, at 68 b and 68 b + 4: block 2b's weights (bytes 2-33 of
# the first) and block 2b + 1's (bytes 32-63 of the second, 96-127 of the pair).
_PICK = _consts(list(range(2, 34)) + list(range(96, 128)))
# Block 2b's scale is word 0 of the first load, block 2b + 1's word 17.
_SCALES = _consts([0] * 8 + [17] * 8)
_HALVES = _consts([0] * 8 + [1] * 8)


@helper
def q8_0_negs(xq):
    """-128 * the sums of each 4 consecutive 8-bit activations: int32 [T, K/4]."""
    T, K = xq.shape
    out = np.empty((T, K // 4), np.int32)
    for t in range(T):
        for i in range(K // 4):
            s = np.int32(xq[t, 4 * i]) + np.int32(xq[t, 4 * i + 1])
            s += np.int32(xq[t, 4 * i + 2]) + np.int32(xq[t, 4 * i + 3])
            out[t, i] = -128 * s
    return out


@helper
def stacked(w, start, x, xd, negs, tok, i0, nt, r0, r1, out):
    """q8_0_rows for the rows r0..r1 of a product stacking several matrices that fall in
    w, whose rows are the product's from ``start``; returns where the next matrix starts."""
    n = w.shape[0]
    lo, hi = max(r0, start), min(r1, start + n)
    if lo < hi:
        q8_0_rows(w, x, xd, negs, tok, i0, nt, lo - start, hi - lo, out, lo)
    return start + n


def _hsum16(builder, v):
    """The 16 lanes of v summed in a fixed tree (halves, then quarters, ...)."""
    for n in (8, 4, 2, 1):
        lo = builder.shuffle_vector(v, v, _consts(range(n)))
        hi = builder.shuffle_vector(v, v, _consts(range(n, 2 * n)))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, _c(0, I32))


def _emit(context, builder, sig, args, nt, vnni):
    w, x, xd, negs, tok, out = (context.make_array(sig.args[i])(context, builder, args[i])
                                for i in (0, 1, 2, 3, 4, 9))
    cast = lambda i: context.cast(builder, args[i], sig.args[i], types.int64)  # noqa: E731
    i0, r0, nr, c0 = cast(5), cast(7), cast(8), cast(10)
    K = builder.extract_value(x.shape, 1)
    wstride = builder.extract_value(w.strides, 0)
    xrow, xdrow, nrow = [], [], []
    for j in range(nt):
        t = builder.load(builder.gep(tok.data, [builder.add(i0, _c(j))]))
        xrow.append(builder.gep(x.data, [builder.mul(t, K)]))
        xdrow.append(builder.gep(xd.data, [builder.mul(t, builder.lshr(K, _c(5)))]))
        nrow.append(builder.gep(builder.bitcast(negs.data, I8.as_pointer()),
                                [builder.mul(t, K)]))
    accs = [[cgutils.alloca_once(builder, V16F) for _ in range(ACCS)] for _ in range(nt)]
    bias = ir.Constant(V64B, [0x80] * 64)
    base = builder.bitcast(out.data, I8.as_pointer())
    ostride = builder.extract_value(out.strides, 0)
    with cgutils.for_range(builder, nr) as rows:
        row = builder.gep(w.data, [builder.mul(builder.add(r0, rows.index), wstride)])
        col = builder.add(c0, rows.index)
        for a in accs:
            for u in a:
                builder.store(ir.Constant(V16F, None), u)
        _row(builder, row, col, K, xrow, xdrow, nrow, accs, base, ostride, i0, nt, bias, vnni)


def _row(builder, row, col, K, xrow, xdrow, nrow, accs, base, ostride, i0, nt, bias, vnni):

    def pair(g, u, last):
        """Blocks 2g and 2g + 1 into accumulator u; ``last``: block 2g alone (an odd
        number of blocks), the upper half of every vector zero."""
        off = builder.mul(g, _c(2 * BLOCK))
        _prefetch(builder, row, builder.add(off, _c(PREFETCH)))
        if last:
            a = _load(builder, row, off, ir.VectorType(I8, BLOCK))
            a = builder.shuffle_vector(a, ir.Constant(a.type, None), _consts(range(64)))
            b = ir.Constant(V64B, None)
        else:
            a = _load(builder, row, off, V64B)
            b = _load(builder, row, builder.add(off, _c(4)), V64B)
        ws = builder.xor(builder.shuffle_vector(a, b, _PICK), bias)
        halves = builder.bitcast(a, V32W)
        d = builder.fpext(builder.bitcast(builder.shuffle_vector(halves, halves, _SCALES),
                                          ir.VectorType(F16, 16)), V16F)
        if last:
            d = builder.shuffle_vector(d, ir.Constant(V16F, None),
                                       _consts(list(range(8)) + list(range(16, 24))))
        for j in range(nt):
            if last:
                xv = _load(builder, xrow[j], builder.mul(g, _c(64)), ir.VectorType(I8, 32))
                xv = builder.shuffle_vector(xv, ir.Constant(xv.type, None), _consts(range(64)))
                ng = _load(builder, nrow[j], builder.mul(g, _c(64)), ir.VectorType(I32, 8))
                ng = builder.shuffle_vector(ng, ir.Constant(ng.type, None), _consts(range(16)))
                sx = _splat(builder, _load(builder, xdrow[j], builder.mul(g, _c(2)), F32), V2F)
            else:
                xv = _load(builder, xrow[j], builder.mul(g, _c(64)), V64B)
                ng = _load(builder, nrow[j], builder.mul(g, _c(64)), V16I)
                sx = _load(builder, xdrow[j], builder.mul(g, _c(2)), V2F)
            p = _dpbusd(builder, ng, ws, xv, vnni)
            scale = builder.fmul(d, builder.shuffle_vector(sx, sx, _HALVES))
            acc = builder.load(accs[j][u])
            builder.store(_fma(builder, builder.sitofp(p, V16F), scale, acc), accs[j][u])

    nb = builder.udiv(K, _c(32))
    npairs = builder.udiv(nb, _c(2))
    groups = builder.udiv(npairs, _c(ACCS))
    with cgutils.for_range(builder, groups) as loop:
        for u in range(ACCS):
            pair(builder.add(builder.mul(loop.index, _c(ACCS)), _c(u)), u, False)
    for u in range(ACCS - 1):
        g = builder.add(builder.mul(groups, _c(ACCS)), _c(u))
        with builder.if_then(builder.icmp_unsigned("<", g, npairs)):
            pair(g, u, False)
    with builder.if_then(builder.icmp_unsigned("!=", builder.urem(nb, _c(2)), _c(0))):
        pair(npairs, 0, True)
    for j in range(nt):
        off = builder.add(builder.mul(builder.add(i0, _c(j)), ostride), builder.mul(col, _c(4)))
        acc = builder.load(accs[j][0])
        for u in range(1, ACCS):
            acc = builder.fadd(acc, builder.load(accs[j][u]))
        builder.store(_hsum16(builder, acc),
                      builder.bitcast(builder.gep(base, [off]), F32.as_pointer()))


def _codegen(context, builder, sig, args):
    nt = context.cast(builder, args[6], sig.args[6], types.int64)
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
def q8_0_rows(typingctx, w, x, xd, negs, tok, i0, nt, r0, nr, out, c0):
    """out[i0 + j, c0 + i] = Q8_0 row r0 + i of w (uint8 [N, 34 K/32], the file's bytes)
    . the 8-bit activations of token tok[i0 + j] (x, xd; negs = q8_0_negs(x)), for i < nr
    and j < nt <= TOKENS."""
    sig = types.none(w, x, xd, negs, tok, i0, nt, r0, nr, out, c0)
    return sig, _codegen
