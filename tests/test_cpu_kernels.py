"""Every CPU kernel against the float64 reference op, on awkward shapes.

Shapes are non-square on purpose (Hk != Hv, Dk != Dv, channel counts that cross the
kernels' block edges, T = 1, 63, 257 split into several runs on non-consecutive slots with
existing state), outputs are poisoned with NaN before each call, and the final conv, ssm
and KV state is compared too. Tolerances live in one table.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize as gguf_quantize

from numba_hybrid import quants
from numba_hybrid.batch import plan_batch
from numba_hybrid.cpu import attention as attn_k
from numba_hybrid.cpu import conv as conv_k
from numba_hybrid.cpu import deltanet as dn_k
from numba_hybrid.cpu.forward import (INT_TYPES, expert_linear, expert_linear_int,
                                      expert_tasks, linear, linear_int, qweight, quantize)
from numba_hybrid.cpu import matmul as mm_k
from numba_hybrid.cpu import moe as moe_k
from numba_hybrid.cpu import norm as norm_k
from numba_hybrid.cpu import rows as rows_k
from numba_hybrid.cpu import quantize as quant_k
from numba_hybrid.reference import ops

# Max relative L2 error of each kernel against the float64 reference (float32 kernels).
TOL = {
    "matmul": 2e-6,
    "rms_norm": 1e-6,
    "gated_rms_norm": 1e-6,
    "conv": 1e-6,
    "conv_state": 0.0,     # the window is a copy of inputs: exact
    "scan": 2e-5,
    "scan_state": 2e-5,
    "attention": 2e-6,
    "kv_cache": 2e-6,
    "moe": 2e-6,
}

TOKENS = [1, 63, 257]
SLOTS = 6
RUN_SLOTS = (0, 2, 5)


def assert_close(name: str, ref, out, tol: float | None = None):
    tol = TOL[name] if tol is None else tol
    out = np.asarray(out, np.float64)
    assert not np.isnan(out).any(), f"{name}: NaN in output (an element was not written)"
    ref = np.asarray(ref, np.float64)
    err = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err <= tol, f"{name}: relative L2 error {err:.3e} > {tol:.0e}"


def poisoned(shape):
    return np.full(shape, np.nan, np.float32)


def make_plan(T: int, rng, history: int = 5):
    """T tokens over up to three runs on slots 0, 2, 5, each continuing a slot that
    already holds ``history`` positions (so states are non-trivial); batch order shuffled."""
    n_runs = min(T, len(RUN_SLOTS))
    cuts = np.sort(rng.choice(np.arange(1, T), n_runs - 1, replace=False)) if n_runs > 1 else []
    lens = np.diff(np.r_[0, cuts, T]).astype(int)
    slot_pos = np.full(SLOTS, -1)
    seq, pos = [], []
    for slot, n in zip(RUN_SLOTS, lens):
        slot_pos[slot] = history - 1
        seq += [slot] * n
        pos += range(history, history + n)
    order = rng.permutation(T)
    seq, pos = np.asarray(seq)[order], np.asarray(pos)[order]
    return plan_batch(np.zeros(T, int), pos, seq, None, slot_pos, n_ctx=history + T + 1,
                      n_vocab=1)


# ---- matmul ----------------------------------------------------------------------------

QUANTISABLE = {QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1}


def random_weight(qtype: QT, n: int, k: int, rng) -> np.ndarray:
    """Raw GGML rows uint8 [n, bytes]: quantised from random floats where gguf can, else
    random bytes with moderate f16 scales (the K-quants and IQ types)."""
    if qtype in QUANTISABLE:
        w = rng.standard_normal((n, k)).astype(np.float32)
        raw = gguf_quantize(w, qtype)
        return np.ascontiguousarray(raw).view(np.uint8).reshape(n, -1)
    block, size = quants.block_geometry(qtype)
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    offsets = {QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2],
               QT.Q6_K: [208], QT.IQ4_NL: [0], QT.IQ4_XS: [0]}[qtype]
    for off in offsets:
        d = rng.uniform(0.01, 0.1, (n, k // block, 1)).astype(np.float16)
        raw[:, :, off:off + 2] = d.view(np.uint8)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("qtype", quants.SUPPORTED_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_matmul(qtype, T, precision):
    rng = np.random.default_rng(int(qtype) * 1000 + T)
    n, k = 37, 512
    raw = random_weight(qtype, n, k, rng)
    x = rng.standard_normal((T, k)).astype(np.float32)
    w = dequant_reference(raw, qtype)
    act = quants.activation_kind(qtype) if precision == "fast" else quants.ACT_NONE
    xr = poisoned(x.shape)
    quant_k.round_activations(x, act, xr)
    np.testing.assert_array_equal(xr, quants.round_activations(x, act))
    ref = quants.round_activations(x, act).astype(np.float64) @ w.T
    out = poisoned((T, n))
    mm_k.matmul(xr, raw, int(qtype), out)
    assert_close("matmul", ref, out)
    # The load-time repacked layouts (Q8_0, Q6_K, Q4_0, Q4_1, Q4_K) through the path the
    # backend takes.
    packed = qweight(_Tensor(raw, qtype, (k, n)))
    if packed.packed is not None:
        out = poisoned((T, n))
        linear(xr, packed, out)
        assert_close("matmul", ref, out)
    # Fast precision's integer kernels (8-bit activations times Q8_0, Q6_K, Q4_K).
    if precision == "fast" and int(qtype) in INT_TYPES:
        out = poisoned((T, n))
        linear_int(quantize(x, act), qweight(_Tensor(raw, qtype, (k, n)), fast=True), out)
        assert_close("matmul", ref, out)


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("kind", [quants.ACT_Q8_0, quants.ACT_Q8_K], ids=["Q8_0", "Q8_K"])
def test_quantize_activations(kind, T):
    """The integers and scales of the 8-bit blocks give exactly the rounded values of the
    NumPy rounding, and the integer sums are those values' sums."""
    rng = np.random.default_rng(kind * 100 + T)
    k = 768
    x = (rng.standard_normal((T, k)) * rng.uniform(0.01, 10, (T, 1))).astype(np.float32)
    x[0, 256:512] = 0.0                      # an all-zero block (Q8_K: a whole super-block)
    x[-1, 5] = -40.0                         # a block whose largest magnitude is negative
    xq = np.full((T, k), 99, np.int8)
    xd = poisoned((T, k // 32))
    n16, n32 = np.full((T, k // 16), -999, np.int16), np.full((T, k // 32), -999, np.int16)
    quant_k.quantize_int8(x, kind, xq, xd, n16, n32)
    rounded = quants.round_activations(x, kind)
    np.testing.assert_array_equal(xq.astype(np.float32) * np.repeat(xd, 32, axis=1), rounded)
    # The rounded values' sums over 16 and 32, in units of the block scale.
    with np.errstate(invalid="ignore", divide="ignore"):
        units = np.rint(np.nan_to_num(rounded / np.repeat(xd, 32, axis=1))).astype(np.int64)
    np.testing.assert_array_equal(n16, units.reshape(T, -1, 16).sum(-1))
    np.testing.assert_array_equal(n32, units.reshape(T, -1, 32).sum(-1))


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K], ids=lambda q: q.name)
def test_q4_repack_is_exact(qtype):
    """The repacked 4-bit layout gives back the file's weights bit for bit:
    w = dl*n - ml per half group, low nibbles first."""
    rng = np.random.default_rng(int(qtype))
    n, k = 5, 512
    raw = random_weight(qtype, n, k, rng)
    qs, dlo, dhi, mlo, mhi, shift = qweight(_Tensor(raw, qtype, (k, n))).packed
    G = 1 << shift
    assert qs.dtype == np.uint8 and qs.shape == (n, k // 2)
    assert all(a.dtype == np.float32 and a.shape == (n, k // (2 * G))
               for a in (dlo, dhi, mlo, mhi))
    q = qs.reshape(n, -1, G)
    lo = dlo[..., None] * (q & 15).astype(np.float32) - mlo[..., None]
    hi = dhi[..., None] * (q >> 4).astype(np.float32) - mhi[..., None]
    w = np.concatenate([lo, hi], axis=-1).reshape(n, k)
    np.testing.assert_array_equal(w, quants.dequantize(raw, qtype))


class _Tensor:
    """The few TensorInfo fields the loaders read, for weights made in a test."""

    def __init__(self, raw, qtype, ne):
        self.data, self.qtype, self.ne, self.name = raw, qtype, ne, "w"


def dequant_reference(raw, qtype):
    typed = {QT.F32: np.float32, QT.F16: np.float16}
    data = raw.view(typed[qtype]) if qtype in typed else raw
    return quants.dequantize(data, qtype).astype(np.float64)


def test_gather_rows_is_exact_dequantisation():
    rng = np.random.default_rng(3)
    raw = random_weight(QT.Q6_K, 50, 256, rng)
    rows = np.array([7, 0, 49, 7])
    out = poisoned((4, 256))
    mm_k.gather_rows(raw, int(QT.Q6_K), rows, out)
    np.testing.assert_array_equal(out, quants.dequantize(raw, QT.Q6_K)[rows])


# ---- norms -----------------------------------------------------------------------------

@pytest.mark.parametrize("T", TOKENS)
def test_norms(T):
    rng = np.random.default_rng(T)
    x = rng.standard_normal((T, 75)).astype(np.float32)
    w = rng.standard_normal(75).astype(np.float32)
    out = poisoned(x.shape)
    norm_k.rms_norm(x, w, 1e-6, out)
    assert_close("rms_norm", ops.rms_norm(x.astype(np.float64), w, 1e-6), out)
    hv, dv = 6, 40
    o = rng.standard_normal((T, hv * dv)).astype(np.float32)
    z = rng.standard_normal((T, hv * dv)).astype(np.float32)
    wn = rng.standard_normal(dv).astype(np.float32)
    y = poisoned(o.shape)
    norm_k.gated_rms_norm(o, z, wn, 1e-6, y)
    ref = ops.gated_rms_norm(o.reshape(T, hv, dv).astype(np.float64), z.reshape(T, hv, dv), wn,
                             1e-6)
    assert_close("gated_rms_norm", ref.reshape(T, -1), y)


# ---- conv and delta-net ----------------------------------------------------------------

HK, HV, DK, DV, KC = 2, 6, 24, 40, 4
C = 2 * HK * DK + HV * DV          # 336: crosses the conv kernel's 256-channel blocks


@pytest.mark.parametrize("T", TOKENS)
def test_causal_conv(T):
    rng = np.random.default_rng(10 + T)
    plan = make_plan(T, rng)
    x = rng.standard_normal((T, C)).astype(np.float32)
    w = rng.standard_normal((C, KC)).astype(np.float32)
    state = rng.standard_normal((SLOTS, KC - 1, C)).astype(np.float32)
    ref_state = state.astype(np.float64)
    ref = ops.causal_conv(x.astype(np.float64), w, ref_state, plan)
    out = poisoned((T, C))
    conv_k.causal_conv(x, np.ascontiguousarray(w.T), state, plan.run_start, plan.run_len,
                       plan.run_slot, out)
    assert_close("conv", ref, out)
    assert_close("conv_state", ref_state, state)


@pytest.mark.parametrize("order", ["grouped", "tiled"])
@pytest.mark.parametrize("T", TOKENS)
def test_deltanet_scan(T, order):
    rng = np.random.default_rng(20 + T)
    plan = make_plan(T, rng)
    qkv = rng.standard_normal((T, C)).astype(np.float32)
    b = rng.standard_normal((T, HV)).astype(np.float32)
    a = rng.standard_normal((T, HV)).astype(np.float32)
    dt = rng.uniform(-2, 1, HV).astype(np.float32)
    ssm_a = -rng.uniform(0.05, 1, HV).astype(np.float32)
    ssm = (0.1 * rng.standard_normal((SLOTS, HV, DV, DK))).astype(np.float32)
    kq = (np.arange(HV) // (HV // HK) if order == "grouped" else np.arange(HV) % HK)

    beta_ref, g_ref = ops.deltanet_gates(b.astype(np.float64), a, dt, ssm_a)
    beta, g = poisoned(b.shape), poisoned(a.shape)
    dn_k.gates(b, a, dt, ssm_a, beta, g)
    assert_close("scan", beta_ref, beta, 1e-6)
    assert_close("scan", g_ref, g, 1e-6)

    q = ops.l2_norm(qkv[:, :HK * DK].reshape(T, HK, DK).astype(np.float64), 1e-6) / np.sqrt(DK)
    k = ops.l2_norm(qkv[:, HK * DK:2 * HK * DK].reshape(T, HK, DK).astype(np.float64), 1e-6)
    v = qkv[:, 2 * HK * DK:].reshape(T, HV, DV).astype(np.float64)
    ref_ssm = ssm.astype(np.float64)
    ref = ops.deltanet_scan(q, k, v, g_ref, beta_ref, ref_ssm, kq, plan)
    out = poisoned((T, HV * DV))
    dn_k.scan(qkv, beta, g, ssm, kq.astype(np.int64), HK, DK, 1e-6, plan.run_start,
              plan.run_len, plan.run_slot, out)
    assert_close("scan", ref.reshape(T, -1), out)
    assert_close("scan_state", ref_ssm, ssm)


# ---- attention -------------------------------------------------------------------------

@pytest.mark.parametrize("nh", [6, 10])     # query heads per KV head 3 and 5: below and
@pytest.mark.parametrize("T", TOKENS)       # above the 4 heads that share a key's load
def test_attention(T, nh):
    rng = np.random.default_rng(30 + T + nh)
    nkv, hd, n_rot, theta = 2, 48, 16, 1e6
    history = 9
    plan = make_plan(T, rng, history=history)
    n_ctx = history + T + 1
    qg = rng.standard_normal((T, nh * 2 * hd)).astype(np.float32)
    kx = rng.standard_normal((T, nkv * hd)).astype(np.float32)
    vx = rng.standard_normal((T, nkv * hd)).astype(np.float32)
    qn = rng.uniform(0.5, 1.5, hd).astype(np.float32)
    kn = rng.uniform(0.5, 1.5, hd).astype(np.float32)
    kc = rng.standard_normal((SLOTS, n_ctx, nkv, hd)).astype(np.float32)
    vc = rng.standard_normal((SLOTS, n_ctx, nkv, hd)).astype(np.float32)
    kc_ref, vc_ref = kc.astype(np.float64), vc.astype(np.float64)

    q3 = qg.reshape(T, nh, 2 * hd).astype(np.float64)
    q = ops.rope_neox(ops.rms_norm(q3[..., :hd], qn, 1e-6), plan.positions, n_rot, theta)
    k = ops.rope_neox(ops.rms_norm(kx.reshape(T, nkv, hd).astype(np.float64), kn, 1e-6),
                      plan.positions, n_rot, theta)
    ref = ops.attention(q, k, vx.reshape(T, nkv, hd).astype(np.float64), kc_ref, vc_ref, plan)
    ref = (ref * ops.sigmoid(q3[..., hd:])).reshape(T, -1)

    inv_freq = theta ** (-np.arange(n_rot // 2, dtype=np.float64) * 2.0 / n_rot)
    out = poisoned((T, nh * hd))
    attn_k.attention(qg, kx, vx, qn, kn, 1e-6, inv_freq, kc, vc, plan.positions,
                     np.repeat(plan.run_slot, plan.run_len), out)
    assert_close("attention", ref, out)
    assert_close("kv_cache", kc_ref, kc)
    assert_close("kv_cache", vc_ref, vc)


# ---- MoE -------------------------------------------------------------------------------

@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_moe(qtype, T):
    rng = np.random.default_rng(40 + T)
    H, E, Fe, k = 64, 5, 32, 2
    x = rng.standard_normal((T, H)).astype(np.float32)
    router = rng.standard_normal((E, H)).astype(np.float32)
    gate_raw = [random_weight(qtype, Fe, H, rng) for _ in range(E)]
    up_raw = [random_weight(qtype, Fe, H, rng) for _ in range(E)]
    down_raw = [random_weight(qtype, H, Fe, rng) for _ in range(E)]

    class _T:  # the reference Linear reads TensorInfo-like objects
        def __init__(self, raw, qtype, shape):
            self.data, self.qtype, self.name = raw, qtype, "w"

    lin = lambda raws: ops.Linear(_T(np.stack(raws), qtype, None), fast=False)  # noqa: E731
    rlin = ops.Linear(_T(router, QT.F32, None), fast=False)
    ref = ops.moe(x.astype(np.float64), rlin, lin(gate_raw), lin(up_raw), lin(down_raw), k)

    logits = x @ router.T
    experts = np.empty((T, k), np.int64)
    weights = poisoned((T, k))
    moe_k.route(logits, k, experts, weights)
    src, exp_start, pair_of, counts = moe_k.group_pairs(experts, E)
    P = T * k
    tasks = moe_k.tasks_for(counts, Fe, moe_k.RB)
    down_tasks = moe_k.tasks_for(counts, H, moe_k.RB)
    pairs = np.arange(P, dtype=np.int64)
    g_raw, u_raw, d_raw = np.stack(gate_raw), np.stack(up_raw), np.stack(down_raw)

    def generic(xs, index, raw, work, out):
        moe_k.expert_matmul(xs, index, raw, int(qtype), exp_start, work, out)

    def repacked(xs, index, raw, work, out):
        # The load-time repacking (int8 for Q8_0, 4-bit groups for Q4_0/Q4_1) through the
        # backend's dispatch.
        w = qweight(_Tensor(raw, qtype, (xs.shape[1], raw.shape[1], raw.shape[0])))
        assert w.packed is not None
        expert_linear(xs, index, w, exp_start, work, out)

    for expert_matmul in (generic, repacked):
        gate, up = poisoned((P, Fe)), poisoned((P, Fe))
        expert_matmul(x, src, g_raw, tasks, gate)
        expert_matmul(x, src, u_raw, tasks, up)
        norm_k.swiglu(gate, up, gate)
        y = poisoned((P, H))
        expert_matmul(gate, pairs, d_raw, down_tasks, y)
        out = np.zeros((T, H), np.float32)
        moe_k.combine(y, pair_of, weights, out)
        assert_close("moe", ref, out)


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q6_K, QT.Q4_K], ids=lambda q: q.name)
def test_expert_matmul_int(qtype, T):
    """Fast precision's grouped expert kernels: every (token, rank) pair's product with its
    expert against the float64 product of the rounded activations."""
    rng = np.random.default_rng(70 + T)
    H, E, Fe, k = 512, 5, 40, 3
    x = rng.standard_normal((T, H)).astype(np.float32)
    raw = np.stack([random_weight(qtype, Fe, H, rng) for _ in range(E)])
    w = qweight(_Tensor(raw, qtype, (H, Fe, E)), fast=True)
    act = quants.activation_kind(qtype)
    experts = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    src, exp_start, pair_of, counts = moe_k.group_pairs(experts, E)
    out = poisoned((T * k, Fe))
    expert_linear_int(quantize(x, act), src, w, exp_start, expert_tasks(counts, w), out)
    xr = quants.round_activations(x, act).astype(np.float64)
    ref = np.stack([xr[t] @ dequant_reference(raw[e], qtype).T
                    for t, e in ((src[p], np.searchsorted(exp_start, p, "right") - 1)
                                 for p in range(T * k))])
    assert_close("matmul", ref, out)


@pytest.mark.parametrize("qtype, k", [(qt, k) for qt in (QT.Q8_0, QT.Q6_K, QT.Q4_K)
                                      for k in (2304, 4352)] + [(QT.Q8_0, 800)],
                         ids=lambda v: getattr(v, "name", v))
def test_integer_kernels_give_every_token_the_same_bits_in_any_batch(qtype, k):
    """Three panels (the last partial), taken one and two per call, and tiles of every
    size (Q8_0: blocks of 16 rows, the last partial; an odd number of blocks in a row for
    k = 800; passes of 1 to rows.TOKENS tokens, both ways of offsetting the bytes): each
    token's result is bitwise the same computed alone, in batches of every size up to
    rows.TOKENS + 1, or among 29 others, and close to the float64 product."""
    rng = np.random.default_rng(k + int(qtype))
    n, T = 40, 30
    raw = random_weight(qtype, n, k, rng)
    w = qweight(_Tensor(raw, qtype, (k, n)), fast=True)
    act = quants.activation_kind(qtype)
    x = rng.standard_normal((T, k)).astype(np.float32)
    together = poisoned((T, n))
    linear_int(quantize(x, act), w, together)
    for t in range(T):
        alone = poisoned((1, n))
        linear_int(quantize(x[t:t + 1], act), w, alone)
        assert np.array_equal(alone[0], together[t]), t
    for size in range(2, rows_k.TOKENS + 2):
        some = poisoned((size, n))
        linear_int(quantize(x[T - size:], act), w, some)
        assert np.array_equal(some, together[T - size:]), size
    ref = quants.round_activations(x, act).astype(np.float64) @ dequant_reference(raw, qtype).T
    assert_close("matmul", ref, together)


def test_exp32_is_within_5_ulp_and_handles_the_edges():
    from numba_hybrid.cpu.simd import exp32
    from numba_hybrid.cpu.jit import serial

    @serial
    def apply(x, out):
        for i in range(x.size):
            out[i] = exp32(x[i])

    x = np.concatenate([np.linspace(-87.3, 88.7, 400_001),
                        np.random.default_rng(0).standard_normal(100_000)]).astype(np.float32)
    out = poisoned(x.shape)
    apply(x, out)
    ref = np.exp(x.astype(np.float64))
    ulp = np.abs(out - ref) / np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert ulp.max() <= 5.0, (x[np.argmax(ulp)], ulp.max())
    edges = np.array([np.nan, np.inf, -np.inf, 89.0, -88.0, -200.0, 0.0], np.float32)
    out = poisoned(edges.shape)
    apply(edges, out)
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == 0.0 and out[3] == np.inf
    assert out[4] == 0.0 and out[5] == 0.0 and out[6] == 1.0
