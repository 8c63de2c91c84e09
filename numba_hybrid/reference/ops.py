"""The float64 reference ops: plain NumPy, one readable function per op.

This is the specification the Numba and CUDA kernels are tested against. Letters:
T tokens, R runs, S slots, H hidden, K/N matmul in/out, C conv channels, Kc conv kernel,
Hk/Hv key/value heads with dims Dk/Dv, nh/nkv attention heads of dim hd, E experts,
F FFN width. ``plan`` is a :class:`numba_hybrid.batch.BatchPlan`; every stateful op walks
its runs and reads/writes the run's slot in place.
"""

from __future__ import annotations

import numpy as np

from ..quants import ACT_NONE, activation_kind, dequantize, round_activations


def prepare_weight(t) -> np.ndarray:
    """TensorInfo -> float64 array of its numpy shape, dequantised exactly."""
    return dequantize(t.data, t.qtype).astype(np.float64)


class Linear:
    """A weight matrix w [(E,) N, K] (float64) and how its input is rounded first:
    ``act`` is a quants.ACT_* kind for precision="fast", or ACT_NONE for exact."""

    def __init__(self, t, fast: bool):
        self.w = prepare_weight(t)
        self.act = activation_kind(t.qtype) if fast else ACT_NONE

    def __call__(self, x: np.ndarray, expert: int | None = None) -> np.ndarray:
        """x [T, K] -> x @ w.T [T, N] (of one expert's slab for a 3-D weight)."""
        if self.act != ACT_NONE:
            x = round_activations(x.astype(np.float32), self.act).astype(np.float64)
        w = self.w if expert is None else self.w[expert]
        return x @ w.T


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    """log(1 + e^x), switching to x above 20 as ggml and torch do."""
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [T, K] @ w [N, K]^T -> [T, N]."""
    return x @ w.T


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [..., D] / sqrt(mean(x^2) + eps) * w [D]."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def l2_norm(x: np.ndarray, eps: float) -> np.ndarray:
    """x [..., D] / sqrt(sum(x^2) + eps)."""
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)


def causal_conv(x: np.ndarray, w: np.ndarray, conv_state: np.ndarray, plan) -> np.ndarray:
    """Depthwise causal conv + SiLU over each run, continuing from its slot's window.

    x [T, C] (grouped order), w [C, Kc] (last column multiplies the current token),
    conv_state [S, Kc-1, C] (the slot's last Kc-1 inputs, oldest first; updated in place).
    Returns silu(conv) [T, C].
    """
    kc = w.shape[1]
    out = np.empty_like(x)
    for t0, n, slot in zip(plan.run_start, plan.run_len, plan.run_slot):
        u = np.concatenate([conv_state[slot].astype(np.float64), x[t0:t0 + n]])  # [Kc-1+n, C]
        for t in range(n):
            out[t0 + t] = np.sum(u[t:t + kc].T * w, axis=1)
        conv_state[slot] = u[n:]
    return silu(out)


def deltanet_gates(b, a, dt_bias, ssm_a):
    """b, a [T, Hv] -> beta = sigmoid(b), g = softplus(a + dt_bias) * ssm_a (g <= 0)."""
    return sigmoid(b), softplus(a + dt_bias) * ssm_a


def deltanet_scan(q, k, v, g, beta, ssm, kq_map, plan):
    """The gated delta rule, token by token inside each run, per value head.

    q, k [T, Hk, Dk] (L2-normalised; q also scaled by Dk^-0.5), v [T, Hv, Dv],
    g, beta [T, Hv], ssm [S, Hv, Dv, Dk] (row j of head h is S_h[:, j]; updated in place),
    kq_map [Hv]: the key head each value head reads. Returns o [T, Hv, Dv].

    For one head:  S <- exp(g) S;  u = S k;  S <- S + beta (v - u) k^T;  o = S q.
    """
    T, Hv, Dv = v.shape
    o = np.empty((T, Hv, Dv))
    for t0, n, slot in zip(plan.run_start, plan.run_len, plan.run_slot):
        for h in range(Hv):
            kh = kq_map[h]
            s = ssm[slot, h].astype(np.float64)                      # [Dv, Dk]
            for t in range(t0, t0 + n):
                s = s * np.exp(g[t, h])
                u = s @ k[t, kh]
                s = s + np.outer(beta[t, h] * (v[t, h] - u), k[t, kh])
                o[t, h] = s @ q[t, kh]
            ssm[slot, h] = s
    return o


def gated_rms_norm(o, z, w, eps):
    """o, z [T, Hv, Dv], w [Dv] -> rms_norm(o) * w * silu(z)."""
    return rms_norm(o, w, eps) * silu(z)


def rope_neox(x, positions, n_rot, theta):
    """Partial NeoX RoPE on x [T, nh, hd]: dims i and i + n_rot/2 (i < n_rot/2) rotate by
    pos * theta^(-2i/n_rot); dims from n_rot on pass through."""
    half = n_rot // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / n_rot)
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]           # [T, half]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = x.copy()
    x0, x1 = x[..., :half], x[..., half:n_rot]
    out[..., :half] = x0 * cos - x1 * sin
    out[..., half:n_rot] = x1 * cos + x0 * sin
    return out


def attention(q, k, v, k_cache, v_cache, plan):
    """Causal attention per run over its slot's KV cache, GQA.

    q [T, nh, hd] (normed, roped), k, v [T, nkv, hd]; k_cache, v_cache [S, n_ctx, nkv, hd]
    get this batch's keys and values written at their positions first. Returns [T, nh, hd].
    """
    T, nh, hd = q.shape
    nkv = k.shape[1]
    group = nh // nkv
    out = np.empty((T, nh, hd))
    for t0, n, slot in zip(plan.run_start, plan.run_len, plan.run_slot):
        pos = plan.positions[t0:t0 + n]
        k_cache[slot, pos] = k[t0:t0 + n]
        v_cache[slot, pos] = v[t0:t0 + n]
        for i in range(n):
            p = pos[i]
            keys = k_cache[slot, :p + 1].astype(np.float64)                   # [p+1, nkv, hd]
            vals = v_cache[slot, :p + 1].astype(np.float64)
            for h in range(nh):
                scores = keys[:, h // group] @ q[t0 + i, h] / np.sqrt(hd)
                w = np.exp(scores - scores.max())
                out[t0 + i, h] = (w / w.sum()) @ vals[:, h // group]
    return out


def swiglu(x, gate: Linear, up: Linear, down: Linear, expert=None):
    """Dense FFN: down( silu(gate x) * up x ). gate, up [F, H], down [H, F]."""
    h = silu(gate(x, expert)) * up(x, expert)
    return down(h, expert)


def moe(x, router: Linear, gate_exps: Linear, up_exps: Linear, down_exps: Linear, n_used):
    """Routed experts: softmax over E router logits, top-k, renormalised weights.

    x [T, H], router [E, H], gate_exps/up_exps [E, Fe, H], down_exps [E, H, Fe].
    """
    logits = router(x)                                                       # [T, E]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-p[t], kind="stable")[:n_used]
        w = p[t, top] / max(p[t, top].sum(), 6.103515625e-5)
        for e, we in zip(top, w):
            out[t] += we * swiglu(x[t:t + 1], gate_exps, up_exps, down_exps, e)[0]
    return out


def shared_expert(x, gate: Linear, up: Linear, down: Linear, gate_inp):
    """Sigmoid-gated shared expert: sigmoid(gate_inp . x) * swiglu(x). gate_inp [H]."""
    return sigmoid(x @ gate_inp)[:, None] * swiglu(x, gate, up, down)
