"""Integer matmul on row panels: 16 weight rows interleaved, one row per vector lane.

``precision="fast"`` multiplies 8-bit activations (quantize.quantize_int8) with Q4_K and
Q6_K weights in integers (Q8_0: rows.py, on the file's own layout). At load each matrix is
repacked into panels of 16 rows
(``panel_*`` in matmul.py; the last panel padded with zero rows). In a panel, the weights
of one "step" (4 consecutive inputs of each of the 16 rows) fill one 64-byte vector, row r
in 32-bit lane r, as unsigned bytes. A step is one ``vpdpbusd``: the 4 activations, one
32-bit word broadcast to every lane, times the 4 weights of every row, summed per lane.
There is no horizontal reduction anywhere: lane r accumulates row r's dot product, and 16
outputs leave with one store.

A kernel call takes ``ng`` panels and ``nt`` tokens, at most TILES[type] (``tile`` picks
them): each decoded weight vector serves nt tokens, each broadcast activation ng panels.
Per token and row lane the operations are the same, in the same order, for any ng and nt,
so a token's result does not depend on the batch, bit for bit.

Arithmetic per (row, token); x are the activations' 8-bit integers, xd their scales, n16 and
n32 their integer sums over 16 and 32 inputs (quantize_int8):

* Q4_K (super-blocks of 256; sub-blocks of 32 with 6-bit scale sc and min m; d, dmin):
  isum = sum_j sc_j * (q . x)_j and imin = sum_j m_j * n32_j in int32 (|isum| <= 8 * 63 *
  32 * 15 * 127), then acc += float(isum) * (d * xd) and acc += float(imin) * -(dmin * xd).
* Q6_K (super-blocks of 256; sub-blocks of 16 with int8 scale sc; q in 0..63 stands for
  q - 32): isum = sum_u sc_u * ((q . x)_u - 32 * n16_u) in int32 (each sub-block's sum
  starts at -32 * n16_u), then acc += float(isum) * (d * xd).

Panel layouts, in bytes, per super-block of the 16 rows:

* Q4_K, 2368 (0.578 per weight): d and dmin as 16 f16 each; the scales [8 sub-blocks][16];
  the mins as [4 pairs of sub-blocks][16][2]; then per sub-block 4 vectors, vector v holding
  step 2v in its low nibbles and step 2v + 1 in its high nibbles.
* Q6_K, 3392 (0.83): d as 16 f16; the scales int8 [16 sub-blocks][16]; 32 bytes of
  zeros, so that the weight vectors start on a cache line (as every panel does); the low
  4 bits, per sub-block 2 vectors (steps 2v and 2v + 1 in the low and high nibbles); the
  high 2 bits, per sub-block one vector (step s in bits 2s, 2s + 1).

``vpdpbusd`` is AVX512-VNNI; on CPUs without it the same sums come from portable IR (LLVM
picks the best it has, e.g. ``vpmaddwd``): integers, so the results are identical.
``NUMBA_HYBRID_NO_VNNI=1`` forces that path (for its test; use a cache directory of its own).
"""

from __future__ import annotations

import os

import numba
from llvmlite import ir
from llvmlite import binding as llvm
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .jit import helper
from .simd import emit_prefetch as _prefetch

PANEL = 16          # rows per panel
Q4_K, Q6_K = 0, 1      # the kernels' type codes
# Panels and tokens per kernel call, at most (measured, 2 threads, T = 512: Q4_K 1 x 6 at
# 1360 GFLOP/s against 1050 for 2 x 4).
TILES = ((1, 6), (2, 4))        # by type code
PANELS = max(p for p, _ in TILES)
TOKENS = max(t for _, t in TILES)
BLOCK_BYTES = {Q4_K: 2368, Q6_K: 3392}
# Q6_K: where the low 4 bits and the high 2 bits start (after d, the scales and 32 bytes
# of zeros that align the weight vectors to cache lines)
Q6_K_LOW, Q6_K_HIGH = 320, 2368
BLOCK_INPUTS = {Q4_K: 256, Q6_K: 256}

F32, F16 = ir.FloatType(), ir.HalfType()
I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
V16F = ir.VectorType(F32, 16)
V16H = ir.VectorType(F16, 16)
V16I = ir.VectorType(I32, 16)
V16B = ir.VectorType(I8, 16)
V32B = ir.VectorType(I8, 32)
V32W = ir.VectorType(I16, 32)
V32I = ir.VectorType(I32, 32)
V64B = ir.VectorType(I8, 64)
V64W = ir.VectorType(I16, 64)


def _has_vnni() -> bool:
    if os.environ.get("NUMBA_HYBRID_NO_VNNI", "") in ("1", "true", "yes"):
        return False
    features = numba.config.CPU_FEATURES
    if features is None:
        return bool(llvm.get_host_cpu_features().get("avx512vnni", False))
    return "+avx512vnni" in features.split(",")


def _c(v, ty=I64):
    return ir.Constant(ty, v)


def _consts(values):
    values = list(values)
    return ir.Constant(ir.VectorType(I32, len(values)), values)


def _splat(builder, value, vec_ty):
    v = builder.insert_element(ir.Constant(vec_ty, ir.Undefined), value, _c(0, I32))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, vec_ty.count), None))


def _load(builder, base, offset, ty):
    ptr = builder.gep(base, [offset])
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=1)


def _pairs(builder, p, even):
    """<2n x iK> -> the even or odd lanes, <n x iK>."""
    n = p.type.count
    return builder.shuffle_vector(p, p, _consts(range(0 if even else 1, n, 2)))


def _madd(builder, a, b):
    """<32 x i16> a, b -> <16 x i32>: a[2i]*b[2i] + a[2i+1]*b[2i+1] (vpmaddwd)."""
    p = builder.mul(builder.sext(a, V32I), builder.sext(b, V32I))
    return builder.add(_pairs(builder, p, True), _pairs(builder, p, False))


def _dpbusd(builder, acc, w, x, vnni):
    """acc <16 x i32> + per lane the sum of 4 products unsigned byte w * signed byte x."""
    if vnni:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16I, [V16I] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, builder.bitcast(w, V16I), builder.bitcast(x, V16I)])
    # Products fit in 16 bits (255 * 127); pairs summed into 32 bits, then pairs of pairs.
    p = builder.mul(builder.zext(builder.bitcast(w, V64B), V64W),
                    builder.sext(builder.bitcast(x, V64B), V64W))
    p = builder.sext(p, ir.VectorType(I32, 64))
    p = builder.add(_pairs(builder, p, True), _pairs(builder, p, False))
    return builder.add(acc, builder.add(_pairs(builder, p, True), _pairs(builder, p, False)))


# Software prefetch of each panel's weight stream, this many bytes ahead (Q6_K: one
# super-block ahead, for both of its streams; 2048 bytes would land the low bits' prefetches
# in the same block's high bits: Q6_K 12352 x 2048 from DRAM 41 -> 55 GB/s). Measured on one
# token (Q4_K_M bench model, Q4_K 8192 x 2048 from DRAM): 0 B 233 us, 1024 B 208, 2048 B
# 202, 4096 B 235.
PREFETCH = 2048
# A second prefetch of each line, this many bytes ahead, into the outer caches only (the
# nearer one above then finds it there): more lines in flight from DRAM than the L1's own
# stream allows. All of one token's products of a decode step in turn (Q4_K_M bench model,
# 282 MB, 5 alternating pairs of processes): 2-13% faster in every pair, 4096 and 12288 B
# within the noise of 8192. Decode: faster in 6 of 8 alternating pairs, ~4% at the median.
PREFETCH_L2 = 8192
# A call of one panel and one token (every call of a one-token product: tile) reads its
# weights once, so both prefetches are non-temporal (prefetchnta): on AMD the lines then
# skip the outer caches (the L2, and the L3 its victims fill). Q4_K_M bench model,
# alternating pairs of processes: decode faster in 6 of 6 pairs (median of the pairs'
# ratios 5.7%); all of a token's products in turn, with nothing else to keep cached, 4 of 4
# (1-5%), so the gain is not only the recurrent state staying in the L3. Calls of more
# panels or tokens read their weights again for the next tile of tokens, from the outer
# caches: they keep the temporal prefetches. (Q8_0 rows, rows.py, read one token's rows
# the same way, but there prefetchnta measured no faster: decode on the Q8_0 bench model 3
# of 6 pairs faster, median of the pairs' ratios 1% slower.)
NON_TEMPORAL = 0


def _weights(builder, base, offset, ahead=PREFETCH, locality=3):
    """The 64 bytes of weights at base + offset, prefetching ``ahead`` bytes ahead (and
    PREFETCH_L2 into the outer caches) with ``locality`` (simd.emit_prefetch; 0: both
    non-temporal)."""
    if ahead:
        _prefetch(builder, base, _c(offset + ahead), locality=locality)
        _prefetch(builder, base, _c(offset + PREFETCH_L2), locality=min(locality, 1))
    return _load(builder, base, _c(offset), V64B)


def _fma(builder, a, b, c):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16F, [V16F] * 3),
                                        "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


def _halves(builder, base, offset):
    """16 f16 at a byte offset -> <16 x float>."""
    return builder.fpext(_load(builder, base, offset, V16H), V16F)


class _Call:
    """The kernel call's arguments: pointers to the panels, the tokens' activation rows;
    and the locality of its weights' prefetches (see NON_TEMPORAL)."""

    def __init__(self, context, builder, sig, args, ng, nt):
        arr = [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else None
               for t, a in zip(sig.args, args)]
        cast = lambda i: context.cast(builder, args[i], sig.args[i], types.int64)  # noqa: E731
        wp, x, xd, n16, n32, tok, out = (arr[i] for i in (1, 2, 3, 4, 5, 6, 11))
        i0, g0 = cast(7), cast(9)
        K = builder.extract_value(x.shape, 1)
        pstride = builder.extract_value(wp.strides, 0)
        self.panels = [builder.gep(wp.data, [builder.mul(builder.add(g0, _c(r)), pstride)])
                       for r in range(ng)]
        self.xrow, self.xdrow, self.n16row, self.n32row = [], [], [], []
        for j in range(nt):
            t = builder.load(builder.gep(tok.data, [builder.add(i0, _c(j))]))
            self.xrow.append(builder.gep(x.data, [builder.mul(t, K)]))
            self.xdrow.append(builder.gep(xd.data, [builder.mul(t, builder.lshr(K, _c(5)))]))
            self.n16row.append(builder.gep(n16.data, [builder.mul(t, builder.lshr(K, _c(4)))]))
            self.n32row.append(builder.gep(n32.data, [builder.mul(t, builder.lshr(K, _c(5)))]))
        self.K = K
        # Outputs: row i0 + j of out, columns 16 (g0 + r) ...; the last panel may be partial.
        self.out_base = builder.bitcast(out.data, I8.as_pointer())
        self.out_stride = builder.extract_value(out.strides, 0)
        self.n_out = builder.extract_value(out.shape, 1)
        self.i0, self.g0 = i0, g0
        # the weights' prefetch: a call of one panel and one token reads them once
        self.locality = NON_TEMPORAL if ng == 1 and nt == 1 else 3


def _add_scaled(builder, call, accs, r, t, isum, w_scale, xd_index):
    """accs[r][t] += float(isum) * (w_scale * xd[token t, xd_index]), one FMA."""
    s = _splat(builder, _load(builder, call.xdrow[t], xd_index, F32), V16F)
    acc = builder.load(accs[r][t])
    builder.store(_fma(builder, builder.sitofp(isum, V16F), builder.fmul(w_scale, s), acc),
                  accs[r][t])


def _broadcast_x(builder, call, j, offset):
    """Activations offset .. offset + 3 of token j as one word in every lane."""
    return _splat(builder, _load(builder, call.xrow[j], offset, I32), V16I)


def _step(builder, call, isub, ws, offset, vnni):
    """One step for every panel r and token t: isub[r][t] += ws[r] . (the 4 activations
    at offset of token t), each broadcast word serving all the panels."""
    for t in range(len(isub[0])):
        xb = _broadcast_x(builder, call, t, offset)
        for r in range(len(isub)):
            isub[r][t] = _dpbusd(builder, isub[r][t], ws[r], xb, vnni)


def _add_scaled_sums(builder, isum, isub, scales):
    """isum[r][t] += isub[r][t] * scales[r] (a sub-block's sums times its integer scales)."""
    for r in range(len(isum)):
        for t in range(len(isum[r])):
            isum[r][t] = builder.add(isum[r][t], builder.mul(isub[r][t], scales[r]))


def _q4_k_block(builder, call, sb, accs, ng, nt, vnni):
    base = [builder.gep(p, [builder.mul(sb, _c(BLOCK_BYTES[Q4_K]))]) for p in call.panels]
    low, four = ir.Constant(V64B, [15] * 64), ir.Constant(V64B, [4] * 64)
    zero = ir.Constant(V16I, None)
    isum = [[zero] * nt for _ in range(ng)]
    for j in range(8):
        isub = [[zero] * nt for _ in range(ng)]
        for v in range(4):
            ws = []
            for r in range(ng):
                q = _weights(builder, base[r], 320 + (4 * j + v) * 64, locality=call.locality)
                ws.append((builder.and_(q, low), builder.lshr(q, four)))
            for half in range(2):
                offset = builder.add(builder.mul(sb, _c(256)), _c(32 * j + 4 * (2 * v + half)))
                _step(builder, call, isub, [w[half] for w in ws], offset, vnni)
        _add_scaled_sums(builder, isum, isub,
                         [builder.zext(_load(builder, base[r], _c(64 + 16 * j), V16B), V16I)
                          for r in range(ng)])
    for r in range(ng):
        mins = [builder.zext(_load(builder, base[r], _c(192 + 32 * p), V32B), V32W)
                for p in range(4)]
        d, dmin = _halves(builder, base[r], _c(0)), _halves(builder, base[r], _c(32))
        for t in range(nt):
            imin = zero
            for p in range(4):
                n = _load(builder, call.n32row[t], builder.add(builder.mul(sb, _c(8)),
                                                               _c(2 * p)), I32)
                imin = builder.add(imin, _madd(builder, mins[p],
                                               builder.bitcast(_splat(builder, n, V16I), V32W)))
            s = _splat(builder, _load(builder, call.xdrow[t], builder.mul(sb, _c(8)), F32),
                       V16F)
            acc = builder.load(accs[r][t])
            acc = _fma(builder, builder.sitofp(isum[r][t], V16F), builder.fmul(d, s), acc)
            acc = _fma(builder, builder.sitofp(imin, V16F), builder.fneg(builder.fmul(dmin, s)),
                       acc)
            builder.store(acc, accs[r][t])


def _q6_k_block(builder, call, sb, accs, ng, nt, vnni):
    base = [builder.gep(p, [builder.mul(sb, _c(BLOCK_BYTES[Q6_K]))]) for p in call.panels]
    low, four = ir.Constant(V64B, [15] * 64), ir.Constant(V64B, [4] * 64)
    high = ir.Constant(V64B, [0x30] * 64)
    zero = ir.Constant(V16I, None)
    isum = [[zero] * nt for _ in range(ng)]
    for u in range(16):
        # Each sub-block's sum starts at -32 * n16: the stored q are the weights + 32.
        start = []
        for t in range(nt):
            n = builder.sext(_load(builder, call.n16row[t], builder.add(builder.mul(sb, _c(16)),
                                                                        _c(u)), I16), I32)
            start.append(_splat(builder, builder.mul(n, _c(-32, I32)), V16I))
        isub = [list(start) for _ in range(ng)]
        ws = []
        for r in range(ng):
            ahead = BLOCK_BYTES[Q6_K]
            lo = [_weights(builder, base[r], Q6_K_LOW + (2 * u + v) * 64, ahead,
                           call.locality) for v in range(2)]
            hi = _weights(builder, base[r], Q6_K_HIGH + 64 * u, ahead, call.locality)
            steps = []
            for s in range(4):
                nib = (builder.and_(lo[s // 2], low) if s % 2 == 0 else
                       builder.lshr(lo[s // 2], four))
                shift = 4 - 2 * s
                h = (builder.shl(hi, ir.Constant(V64B, [shift] * 64)) if shift > 0 else
                     builder.lshr(hi, ir.Constant(V64B, [-shift] * 64)) if shift < 0 else hi)
                steps.append(builder.or_(nib, builder.and_(h, high)))
            ws.append(steps)
        for s in range(4):
            offset = builder.add(builder.mul(sb, _c(256)), _c(16 * u + 4 * s))
            _step(builder, call, isub, [w[s] for w in ws], offset, vnni)
        _add_scaled_sums(builder, isum, isub,
                         [builder.sext(_load(builder, base[r], _c(32 + 16 * u), V16B), V16I)
                          for r in range(ng)])
    for r in range(ng):
        d = _halves(builder, base[r], _c(0))
        for t in range(nt):
            _add_scaled(builder, call, accs, r, t, isum[r][t], d, builder.mul(sb, _c(8)))


_BLOCK = {Q4_K: _q4_k_block, Q6_K: _q6_k_block}


def _emit(context, builder, sig, args, kind, ng, nt, vnni):
    call = _Call(context, builder, sig, args, ng, nt)
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(V16F, None)) for _ in range(nt)]
            for _ in range(ng)]
    n_blocks = builder.udiv(call.K, _c(BLOCK_INPUTS[kind]))
    with cgutils.for_range(builder, n_blocks) as loop:
        _BLOCK[kind](builder, call, loop.index, accs, ng, nt, vnni)
    # Stores: 16 lanes, masked to the matrix's rows in its last panel.
    lanes = _consts(range(PANEL))
    masked_store = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [V16F, V16F.as_pointer(), I32,
                                                        ir.VectorType(ir.IntType(1), 16)]),
        "llvm.masked.store.v16f32.p0")
    for r in range(ng):
        col = builder.mul(builder.add(call.g0, _c(r)), _c(PANEL))
        left = builder.trunc(builder.sub(call.n_out, col), I32)
        mask = builder.icmp_signed("<", lanes, _splat(builder, left, ir.VectorType(I32, 16)))
        for t in range(nt):
            off = builder.add(builder.mul(builder.add(call.i0, _c(t)), call.out_stride),
                              builder.mul(col, _c(4)))
            ptr = builder.bitcast(builder.gep(call.out_base, [off]), V16F.as_pointer())
            builder.call(masked_store, [builder.load(accs[r][t]), ptr, _c(4, I32), mask])


def _codegen(context, builder, sig, args):
    """A switch on (type, ng, nt) to the code for each."""
    kind = context.cast(builder, args[0], sig.args[0], types.int64)
    nt = context.cast(builder, args[8], sig.args[8], types.int64)
    ng = context.cast(builder, args[10], sig.args[10], types.int64)
    case = builder.add(builder.mul(builder.add(builder.mul(kind, _c(PANELS)),
                                               builder.sub(ng, _c(1))), _c(TOKENS)),
                       builder.sub(nt, _c(1)))
    end = builder.append_basic_block("panel_end")
    switch = builder.switch(case, end)
    vnni = _has_vnni()
    for kind_code, (max_g, max_t) in enumerate(TILES):
        for g in range(1, max_g + 1):
            for t in range(1, max_t + 1):
                block = builder.append_basic_block(f"panel_{kind_code}_{g}_{t}")
                switch.add_case(_c((kind_code * PANELS + g - 1) * TOKENS + t - 1), block)
                builder.position_at_end(block)
                _emit(context, builder, sig, args, kind_code, g, t, vnni)
                builder.branch(end)
    builder.position_at_end(end)
    return context.get_dummy_value()


@intrinsic
def panel_tile(typingctx, kind, wp, x, xd, n16, n32, tok, i0, nt, g0, ng, out):
    """out[i0 + j, 16 (g0 + r) + lane] = row 16 (g0 + r) + lane of the panels wp (uint8
    [G, bytes]) . the activations of token tok[i0 + j], for j < nt and r < ng, with
    (ng, nt) at most TILES[kind]; kind: Q4_K or Q6_K (a code above)."""
    sig = types.none(kind, wp, x, xd, n16, n32, tok, i0, nt, g0, ng, out)
    return sig, _codegen


@helper
def tile(kind, n_tokens):
    """(panels per task, tokens per call) for a matrix of type ``kind`` and n_tokens
    tokens. One token takes one panel per task: a task streaming two panels at once read
    Q4_K weights from DRAM ~15% slower (8192 x 2048: 264 us against 236)."""
    p, t = TILES[kind]
    return (1 if n_tokens < 2 else p), t

