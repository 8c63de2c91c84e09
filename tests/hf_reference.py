"""An independent float64 NumPy forward of Qwen3-Next / Qwen3.5 (dense and MoE), written
from the Hugging Face transformers modelling code, on an HF-layout checkpoint dict.

It deliberately shares nothing with ``numba_hybrid``: it reads HF tensor names and layouts
(``in_proj_qkvz`` grouped per key head, ``in_proj_ba``, ``A_log``, zero-centred norms
``x_hat * (1 + w)``, ``conv1d`` of shape (C, 1, Kc)), keeps the value heads in HF's grouped
order with ``repeat_interleave`` of q/k (value head h reads key head h // r), keeps the
DeltaNet state in HF's ``[Dk, Dv]`` layout, runs the whole sequence at once (no cache) with
zero left padding for the causal conv, and builds the interleaved M-RoPE of Qwen3.5 from
three (equal, for text) position streams. So it checks the GGUF writer's transforms and
the engine's loader independently.
"""

from __future__ import annotations

import numpy as np

LINEAR, FULL = "linear_attention", "full_attention"


def _cfg(config: dict) -> dict:
    c = {**config, **config.get("text_config", {})}
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    c["_theta"] = float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))
    c["_partial"] = float(rp.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.25)))
    c["_mrope"] = rp.get("mrope_section", c.get("mrope_section"))
    if not c.get("layer_types"):   # what the HF config classes synthesise
        every = c.get("full_attention_interval", 4)
        c["layer_types"] = [LINEAR if (i + 1) % every else FULL
                            for i in range(c["num_hidden_layers"])]
    return c


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    """torch.nn.functional.softplus (beta 1, threshold 20)."""
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def zero_centred_rms_norm(x, w, eps):
    """Qwen3NextRMSNorm / Qwen3_5RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + w)."""
    return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps) * (1.0 + w)


def l2norm(x, eps=1e-6):
    return x / np.sqrt(np.sum(x ** 2, axis=-1, keepdims=True) + eps)


def linear(x, w):
    """nn.Linear without bias: weight (out, in)."""
    return x @ w.T


def gated_deltanet(arch, c, W, p, x):
    T = x.shape[0]
    nk, nv = c["linear_num_key_heads"], c["linear_num_value_heads"]
    dk, dv, kc = c["linear_key_head_dim"], c["linear_value_head_dim"], c["linear_conv_kernel_dim"]
    r = nv // nk
    if arch == "qwen3next":   # fix_query_key_value_ordering
        qkvz = linear(x, W(p + "in_proj_qkvz.weight")).reshape(T, nk, 2 * dk + 2 * r * dv)
        q, k, v, z = np.split(qkvz, [dk, 2 * dk, 2 * dk + r * dv], axis=-1)
        ba = linear(x, W(p + "in_proj_ba.weight")).reshape(T, nk, 2 * r)
        b, a = ba[..., :r].reshape(T, nv), ba[..., r:].reshape(T, nv)
        mixed = np.concatenate([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], axis=-1)
    else:
        mixed = linear(x, W(p + "in_proj_qkv.weight"))
        z = linear(x, W(p + "in_proj_z.weight"))
        b, a = linear(x, W(p + "in_proj_b.weight")), linear(x, W(p + "in_proj_a.weight"))
    z = z.reshape(T, nv, dv)
    # depthwise Conv1d(groups=C, padding=Kc-1)[..., :T]: zero left padding, then SiLU
    w = W(p + "conv1d.weight")[:, 0, :]                                  # (C, Kc)
    padded = np.concatenate([np.zeros((kc - 1, mixed.shape[1])), mixed])
    conv = silu(sum(padded[j:j + T] * w[:, j] for j in range(kc)))
    q = conv[:, :nk * dk].reshape(T, nk, dk)
    k = conv[:, nk * dk:2 * nk * dk].reshape(T, nk, dk)
    v = conv[:, 2 * nk * dk:].reshape(T, nv, dv)
    beta = sigmoid(b)
    g = -np.exp(W(p + "A_log")) * softplus(a + W(p + "dt_bias"))
    q, k = np.repeat(q, r, axis=1), np.repeat(k, r, axis=1)            # repeat_interleave
    q, k = l2norm(q) * dk ** -0.5, l2norm(k)
    # torch_recurrent_gated_delta_rule, state (heads, Dk, Dv)
    state = np.zeros((nv, dk, dv))
    out = np.empty((T, nv, dv))
    for t in range(T):
        state = state * np.exp(g[t])[:, None, None]
        kv_mem = np.einsum("hkv,hk->hv", state, k[t])
        delta = (v[t] - kv_mem) * beta[t][:, None]
        state = state + k[t][:, :, None] * delta[:, None, :]
        out[t] = np.einsum("hkv,hk->hv", state, q[t])
    # Qwen3NextRMSNormGated: plain weight, then * silu(z)
    eps = c["rms_norm_eps"]
    y = out / np.sqrt(np.mean(out ** 2, axis=-1, keepdims=True) + eps) * W(p + "norm.weight")
    y = y * silu(z)
    return linear(y.reshape(T, nv * dv), W(p + "out_proj.weight"))


def rotary_cos_sin(c, hd, positions, interleaved_mrope):
    """HF rotary embedding: cos/sin of shape (T, rotary_dim). For Qwen3.5, interleaved M-RoPE
    over (T, H, W) position streams, all equal to the token index for text input."""
    dim = int(hd * c["_partial"])
    inv_freq = 1.0 / (c["_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    freqs = np.stack([positions] * 3).astype(np.float64)[..., None] * inv_freq   # (3, T, dim/2)
    f = freqs[0].copy()
    if interleaved_mrope and c["_mrope"]:
        sec = c["_mrope"]
        for axis, offset in ((1, 1), (2, 2)):
            idx = slice(offset, sec[axis] * 3, 3)
            f[..., idx] = freqs[axis][..., idx]
    emb = np.concatenate([f, f], axis=-1)
    return np.cos(emb), np.sin(emb)


def apply_rotary(x, cos, sin):
    """Partial rotary: rotate-half on the first cos.shape[-1] dims; x (T, heads, hd)."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return np.concatenate([rot * cos[:, None] + rotated * sin[:, None], rest], axis=-1)


def gated_attention(arch, c, W, p, x):
    T = x.shape[0]
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    eps = c["rms_norm_eps"]
    qg = linear(x, W(p + "q_proj.weight")).reshape(T, nh, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:].reshape(T, nh * hd)
    k = linear(x, W(p + "k_proj.weight")).reshape(T, nkv, hd)
    v = linear(x, W(p + "v_proj.weight")).reshape(T, nkv, hd)
    q = zero_centred_rms_norm(q, W(p + "q_norm.weight"), eps)
    k = zero_centred_rms_norm(k, W(p + "k_norm.weight"), eps)
    cos, sin = rotary_cos_sin(c, hd, np.arange(T), arch != "qwen3next")
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)   # repeat_kv
    scores = np.einsum("qhd,khd->hqk", q, k) * hd ** -0.5
    scores = scores + np.triu(np.full((T, T), -np.inf), 1)
    prob = np.exp(scores - scores.max(axis=-1, keepdims=True))
    prob /= prob.sum(axis=-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", prob, v).reshape(T, nh * hd)
    return linear(o * sigmoid(gate), W(p + "o_proj.weight"))


def swiglu_mlp(W, p, x):
    return linear(silu(linear(x, W(p + "gate_proj.weight"))) * linear(x, W(p + "up_proj.weight")),
                  W(p + "down_proj.weight"))


def sparse_moe(arch, c, W, p, x):
    """Softmax router, top-k, renormalised (Qwen3.5-MoE always; Qwen3-Next per
    norm_topk_prob), plus the sigmoid-gated shared expert."""
    logits = linear(x, W(p + "gate.weight"))
    prob = np.exp(logits - logits.max(axis=-1, keepdims=True))
    prob /= prob.sum(axis=-1, keepdims=True)
    top_k = c["num_experts_per_tok"]
    renorm = arch == "qwen35moe" or c.get("norm_topk_prob", True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-prob[t], kind="stable")[:top_k]
        weights = prob[t, top] / (prob[t, top].sum() if renorm else 1.0)
        for e, we in zip(top, weights):
            out[t] += we * swiglu_mlp(W, f"{p}experts.{e}.", x[t:t + 1])[0]
    if c.get("shared_expert_intermediate_size"):
        shared = swiglu_mlp(W, p + "shared_expert.", x)
        out += sigmoid(linear(x, W(p + "shared_expert_gate.weight"))) * shared
    return out


def hf_forward(arch: str, config: dict, tensors: dict, token_ids) -> np.ndarray:
    """float64 logits [T, V] for ``token_ids`` at positions 0..T-1 (no BOS, no cache)."""
    c = _cfg(config)
    W = lambda name: np.asarray(tensors[name], dtype=np.float64)  # noqa: E731
    eps = c["rms_norm_eps"]
    ids = np.asarray(token_ids, dtype=np.int64)
    embed = W("model.embed_tokens.weight")
    x = embed[ids]
    for i, kind in enumerate(c["layer_types"]):
        p = f"model.layers.{i}."
        h = zero_centred_rms_norm(x, W(p + "input_layernorm.weight"), eps)
        if kind == LINEAR:
            x = x + gated_deltanet(arch, c, W, p + "linear_attn.", h)
        else:
            x = x + gated_attention(arch, c, W, p + "self_attn.", h)
        h = zero_centred_rms_norm(x, W(p + "post_attention_layernorm.weight"), eps)
        x = x + (swiglu_mlp(W, p + "mlp.", h) if arch == "qwen35"
                 else sparse_moe(arch, c, W, p + "mlp.", h))
    x = zero_centred_rms_norm(x, W("model.norm.weight"), eps)
    head = embed if c.get("tie_word_embeddings", False) else W("lm_head.weight")
    return linear(x, head)
