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

    def __init__(self, model, precision: str = "exact"):
        self.model = model
        self.args = model.args
        self.fast = precision == "fast"
        self.kq_map = self.args.kq_head_map()
        self._cache: dict[int, np.ndarray] = {}
        self._linear: dict[int, ops.Linear] = {}

    def w(self, t) -> np.ndarray:
        """Dequantised float64 copy of a tensor (a vector), made on first use."""
        key = id(t)
        if key not in self._cache:
            self._cache[key] = ops.prepare_weight(t)
        return self._cache[key]

    def lin(self, t) -> ops.Linear:
        """A weight matrix as a Linear (with the activation rounding of the precision)."""
        key = id(t)
        if key not in self._linear:
            self._linear[key] = ops.Linear(t, self.fast)
        return self._linear[key]

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
        return self.lin(m.output)(xo)

    def deltanet(self, l, layer, h, state, plan):
        a, w, lin = self.args, self.w, self.lin
        T = h.shape[0]
        hk, hv, dk, dv = a.ssm_k_heads, a.ssm_v_heads, a.ssm_k_dim, a.ssm_v_dim
        qkv = lin(layer["attn_qkv"])(h)                                        # [T, C]
        z = lin(layer["attn_gate"])(h).reshape(T, hv, dv)
        beta, g = ops.deltanet_gates(lin(layer["ssm_beta"])(h), lin(layer["ssm_alpha"])(h),
                                     w(layer["ssm_dt"]), w(layer["ssm_a"]))
        c = ops.causal_conv(qkv, w(layer["ssm_conv1d"]), state.conv[l], plan)
        q = c[:, :hk * dk].reshape(T, hk, dk)
        k = c[:, hk * dk:2 * hk * dk].reshape(T, hk, dk)
        v = c[:, 2 * hk * dk:].reshape(T, hv, dv)
        q = ops.l2_norm(q, L2_NORM_EPS) / np.sqrt(dk)
        k = ops.l2_norm(k, L2_NORM_EPS)
        o = ops.deltanet_scan(q, k, v, g, beta, state.ssm[l], self.kq_map, plan)
        y = ops.gated_rms_norm(o, z, w(layer["ssm_norm"]), a.rms_eps)
        return lin(layer["ssm_out"])(y.reshape(T, hv * dv))

    def attention(self, l, layer, h, state, plan):
        a, w, lin = self.args, self.w, self.lin
        T = h.shape[0]
        nh, nkv, hd = a.n_head, a.n_head_kv, a.head_dim
        qg = lin(layer["attn_q"])(h).reshape(T, nh, 2 * hd)
        q, gate = qg[..., :hd], qg[..., hd:]
        k = lin(layer["attn_k"])(h).reshape(T, nkv, hd)
        v = lin(layer["attn_v"])(h).reshape(T, nkv, hd)
        q = ops.rms_norm(q, w(layer["attn_q_norm"]), a.rms_eps)
        k = ops.rms_norm(k, w(layer["attn_k_norm"]), a.rms_eps)
        q = ops.rope_neox(q, plan.positions, a.n_rot, a.rope_theta)
        k = ops.rope_neox(k, plan.positions, a.n_rot, a.rope_theta)
        o = ops.attention(q, k, v, state.k[l], state.v[l], plan) * ops.sigmoid(gate)
        return lin(layer["attn_output"])(o.reshape(T, nh * hd))

    def ffn(self, layer, f):
        a, lin = self.args, self.lin
        if a.ffn_kind == "dense":
            return ops.swiglu(f, lin(layer["ffn_gate"]), lin(layer["ffn_up"]),
                              lin(layer["ffn_down"]))
        out = ops.moe(f, lin(layer["ffn_gate_inp"]), lin(layer["ffn_gate_exps"]),
                      lin(layer["ffn_up_exps"]), lin(layer["ffn_down_exps"]), a.n_expert_used)
        if layer.get("ffn_gate_shexp") is not None:
            out = out + ops.shared_expert(f, lin(layer["ffn_gate_shexp"]),
                                          lin(layer["ffn_up_shexp"]), lin(layer["ffn_down_shexp"]),
                                          self.w(layer["ffn_gate_inp_shexp"]))
        return out
