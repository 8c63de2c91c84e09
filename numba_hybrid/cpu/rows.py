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
                     _has_vnni, _load, _prefetch)

TOKENS = 4              # tokens per call, at most
BLOCK = 34              # bytes per Q8_0 block: f16 d, 32 int8
ACCS = 2                # accumulators per (row, token), taking alternate pairs of blocks
# Software prefetch of the row's stream, this many bytes ahead (one matrix 32768 x 2048
# from DRAM, one token: none 28 GB/s, 512 B 40, 1024 B 40, 2048 B 39).
PREFETCH = 1024
V32W = ir.VectorType(I16, 32)
# From the 128 bytes of two loads, at 68 b and 68 b + 4: block 2b's weights (bytes 2-33 of
# the first) and block 2b + 1's (bytes 32-63 of the second, 96-127 of the pair).
_PICK = _consts(list(range(2, 34)) + list(range(96, 128)))
# Block 2b's scale is word 0 of the first load, block 2b + 1's word 17.
_SCALES = _consts([0] * 8 + [17] * 8)
PAIR_BYTES = 192        # a pair of blocks' activations, as q8_0_activations lays them out


@helper
def q8_0_activations(xq, xd):
    """8-bit activations (quantize.quantize_int8: xq int8 [T, K], xd [T, K/32]) as the
    kernel reads them, one run of 192 bytes per pair of blocks and token: the 64 values
    (zeros past the last block), the 16 int32 sums a row's sums start from (-128 * each 4
    values summed) and the two blocks' scales, each over 8 float lanes. int32 [T, pairs,
    48]. One pointer per token: a call's tokens then leave the registers to the loop."""
    T, K = xq.shape
    nb = K // 32
    n = (nb + 1) // 2
    out = np.zeros((T, n, 48), np.int32)
    values = out.view(np.int8)
    scales = out.view(np.float32)
    for t in range(T):
        for b in range(nb):
            g, h = b // 2, b % 2
            for i in range(32):
                values[t, g, 32 * h + i] = xq[t, 32 * b + i]
            for i in range(8):
                s = np.int32(xq[t, 32 * b + 4 * i]) + np.int32(xq[t, 32 * b + 4 * i + 1])
                s += np.int32(xq[t, 32 * b + 4 * i + 2]) + np.int32(xq[t, 32 * b + 4 * i + 3])
                out[t, g, 16 + 8 * h + i] = -128 * s
                scales[t, g, 32 + 8 * h + i] = xd[t, b]
    return out


def _hsum16(builder, v):
    """The 16 lanes of v summed in a fixed tree (halves, then quarters, ...)."""
    for n in (8, 4, 2, 1):
        lo = builder.shuffle_vector(v, v, _consts(range(n)))
        hi = builder.shuffle_vector(v, v, _consts(range(n, 2 * n)))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, _c(0, I32))


def _emit(context, builder, sig, args, nt, vnni):
    w, xa, tok, out = (context.make_array(sig.args[i])(context, builder, args[i])
                       for i in (0, 1, 2, 7))
    cast = lambda i: context.cast(builder, args[i], sig.args[i], types.int64)  # noqa: E731
    i0, r0, nr, c0 = cast(3), cast(5), cast(6), cast(8)
    nb = builder.udiv(builder.extract_value(w.shape, 1), _c(BLOCK))
    wstride = builder.extract_value(w.strides, 0)
    xa_base = builder.bitcast(xa.data, I8.as_pointer())
    xstride = builder.extract_value(xa.strides, 0)
    xrow = [builder.gep(xa_base, [builder.mul(builder.load(builder.gep(tok.data, [
        builder.add(i0, _c(j))])), xstride)]) for j in range(nt)]
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
        _row(builder, row, col, nb, xrow, accs, base, ostride, i0, nt, bias, vnni)


def _row(builder, row, col, nb, xrow, accs, base, ostride, i0, nt, bias, vnni):

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
            at = builder.mul(g, _c(PAIR_BYTES))
            xv = _load(builder, xrow[j], at, V64B)
            ng = _load(builder, xrow[j], builder.add(at, _c(64)), V16I)
            sx = _load(builder, xrow[j], builder.add(at, _c(128)), V16F)
            p = _dpbusd(builder, ng, ws, xv, vnni)
            scale = builder.fmul(d, sx)
            acc = builder.load(accs[j][u])
            builder.store(_fma(builder, builder.sitofp(p, V16F), scale, acc), accs[j][u])

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
def q8_0_rows(typingctx, w, xa, tok, i0, nt, r0, nr, out, c0):
    """out[i0 + j, c0 + i] = Q8_0 row r0 + i of w (uint8 [N, 34 K/32], the file's bytes)
    . the 8-bit activations of token tok[i0 + j] (xa = q8_0_activations), for i < nr and
    j < nt <= TOKENS."""
    sig = types.none(w, xa, tok, i0, nt, r0, nr, out, c0)
    return sig, _codegen
