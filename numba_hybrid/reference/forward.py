"""The float64 reference forward pass over a BatchPlan: the oracle for every backend.

Written for clarity, not speed: weights are dequantised once (lazily) to float64, and the
recurrent state and KV cache are float64 arrays of the shared StatePool layout.
"""

from __future__ import annotations

import numpy as np

from ..models import RECURRENT
from ..quants import dequantize
from . import ops

# HF and llama.cpp L2-normalise q and k with this epsilon (not the RMSNorm one).
L2_NORM_EPS = 1e-6


class ReferenceBackend:
    name = "reference"
    state_dtype = np.float64
    kv_dtype = np.float64

    def __init__(self, model):
        self.model = model
        self.args = model.args
        self.kq_map = self.args.kq_head_map()
        self._cache: dict[int, np.ndarray] = {}

    def w(self, t) -> np.ndarray:
        """Dequantised float64 copy of a tensor, made on first use."""
        key = id(t)
        if key not in self._cache:
            self._cache[key] = ops.prepare_weight(t)
        return self._cache[key]

    def forward(self, state, plan) -> np.ndarray:
        """Run the batch; returns float64 logits [n_out, V] for plan.out_rows."""
        m, a = self.model, self.args
        emb = m.token_embd
        x = dequantize(emb.data[plan.tokens], emb.qtype).astype(np.float64)   # [T, H]
        for l, layer in enumerate(m.layers):
            h = ops.rms_norm(x, self.w(layer["attn_norm"]), a.rms_eps)
            if layer.kind == RECURRENT:
                x = x + self.deltanet(l, layer, h, state, plan)
            else:
                x = x + self.attention(l, layer, h, state, plan)
            f = ops.rms_norm(x, self.w(layer["post_attention_norm"]), a.rms_eps)
            x = x + self.ffn(layer, f)
        xo = ops.rms_norm(x[plan.out_rows], self.w(m.output_norm), a.rms_eps)
        return ops.matmul(xo, self.w(m.output))

    def deltanet(self, l, layer, h, state, plan):
        a, w = self.args, self.w
        T = h.shape[0]
        hk, hv, dk, dv = a.ssm_k_heads, a.ssm_v_heads, a.ssm_k_dim, a.ssm_v_dim
        qkv = ops.matmul(h, w(layer["attn_qkv"]))                              # [T, C]
        z = ops.matmul(h, w(layer["attn_gate"])).reshape(T, hv, dv)
        beta, g = ops.deltanet_gates(ops.matmul(h, w(layer["ssm_beta"])),
                                     ops.matmul(h, w(layer["ssm_alpha"])),
                                     w(layer["ssm_dt"]), w(layer["ssm_a"]))
        c = ops.causal_conv(qkv, w(layer["ssm_conv1d"]), state.conv[l], plan)
        q = c[:, :hk * dk].reshape(T, hk, dk)
        k = c[:, hk * dk:2 * hk * dk].reshape(T, hk, dk)
        v = c[:, 2 * hk * dk:].reshape(T, hv, dv)
        q = ops.l2_norm(q, L2_NORM_EPS) / np.sqrt(dk)
        k = ops.l2_norm(k, L2_NORM_EPS)
        o = ops.deltanet_scan(q, k, v, g, beta, state.ssm[l], self.kq_map, plan)
        y = ops.gated_rms_norm(o, z, w(layer["ssm_norm"]), a.rms_eps)
        return ops.matmul(y.reshape(T, hv * dv), w(layer["ssm_out"]))

    def attention(self, l, layer, h, state, plan):
        a, w = self.args, self.w
        T = h.shape[0]
        nh, nkv, hd = a.n_head, a.n_head_kv, a.head_dim
        qg = ops.matmul(h, w(layer["attn_q"])).reshape(T, nh, 2 * hd)
        q, gate = qg[..., :hd], qg[..., hd:]
        k = ops.matmul(h, w(layer["attn_k"])).reshape(T, nkv, hd)
        v = ops.matmul(h, w(layer["attn_v"])).reshape(T, nkv, hd)
        q = ops.rms_norm(q, w(layer["attn_q_norm"]), a.rms_eps)
        k = ops.rms_norm(k, w(layer["attn_k_norm"]), a.rms_eps)
        q = ops.rope_neox(q, plan.positions, a.n_rot, a.rope_theta)
        k = ops.rope_neox(k, plan.positions, a.n_rot, a.rope_theta)
        o = ops.attention(q, k, v, state.k[l], state.v[l], plan) * ops.sigmoid(gate)
        return ops.matmul(o.reshape(T, nh * hd), w(layer["attn_output"]))

    def ffn(self, layer, f):
        a, w = self.args, self.w
        if a.ffn_kind == "dense":
            return ops.swiglu(f, w(layer["ffn_gate"]), w(layer["ffn_up"]), w(layer["ffn_down"]))
        out = ops.moe(f, w(layer["ffn_gate_inp"]), w(layer["ffn_gate_exps"]),
                      w(layer["ffn_up_exps"]), w(layer["ffn_down_exps"]), a.n_expert_used)
        if layer.get("ffn_gate_shexp") is not None:
            out = out + ops.shared_expert(f, w(layer["ffn_gate_shexp"]), w(layer["ffn_up_shexp"]),
                                          w(layer["ffn_down_shexp"]),
                                          w(layer["ffn_gate_inp_shexp"]))
        return out
