"""Qwen3-Next (GGUF architecture ``qwen3next``): hyper-parameters, layer plan, weights.

The trunk is ``n_layer`` blocks; each is a Gated DeltaNet ("recurrent") or a gated full
attention ("attention") mixer followed by a MoE (or dense SwiGLU) FFN. Qwen3.5 (``qwen35``,
``qwen35moe``) reuses this module: only the names of the beta/alpha projections and the
order of the value heads differ (see ``models/qwen35.py``).

Weights are kept under their GGUF names (``attn_qkv``, ``ssm_conv1d``, ``ffn_gate_exps``,
...) as zero-copy views of the file. Every layout quirk of the converter is handled in one
place, :meth:`Qwen3Next.sanitize`, which turns the file's tensors into the canonical set the
backends consume:

recurrent layer:  attn_norm, attn_qkv [C rows], attn_gate [Hv*Dv rows], ssm_beta [Hv rows],
                  ssm_alpha [Hv rows], ssm_conv1d [C, Kc], ssm_dt [Hv], ssm_a [Hv],
                  ssm_norm [Dv], ssm_out, post_attention_norm
attention layer:  attn_norm, attn_q [2*nh*hd rows: per head q then gate], attn_k, attn_v,
                  attn_q_norm, attn_k_norm, attn_output, post_attention_norm
FFN (moe):        ffn_gate_inp, ffn_gate_exps, ffn_up_exps, ffn_down_exps, and optionally
                  ffn_gate_shexp, ffn_up_shexp, ffn_down_shexp, ffn_gate_inp_shexp
FFN (dense):      ffn_gate, ffn_up, ffn_down
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ModelFormatError, UnsupportedModelError
from ..gguf_file import GGUFFile, TensorInfo
from ..quants import check_supported

RECURRENT = "recurrent"
ATTENTION = "attention"


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters read from GGUF metadata. Letters as in the kernel legends:
    H hidden, V vocab, Hk/Hv key/value heads of the DeltaNet with dims Dk/Dv, Kc conv
    kernel, nh/nkv attention heads of dim hd, E experts."""

    arch: str
    n_layer: int                    # trunk blocks (MTP blocks excluded)
    n_mtp: int                      # MTP blocks stored after the trunk (never run)
    n_embd: int                     # H
    n_vocab: int                    # V
    n_ctx_train: int
    rms_eps: float
    # full attention
    n_head: int                     # nh
    n_head_kv: int                  # nkv
    head_dim: int                   # hd
    n_rot: int
    rope_theta: float
    rope_sections: tuple[int, ...]  # M-RoPE sections (qwen35*); text-only input ignores them
    # gated delta net
    ssm_conv_kernel: int            # Kc
    ssm_k_heads: int                # Hk
    ssm_v_heads: int                # Hv
    ssm_k_dim: int                  # Dk
    ssm_v_dim: int                  # Dv
    v_head_order: str               # "grouped" (qwen3next) or "tiled" (qwen35*)
    # feed forward
    ffn_kind: str                   # "moe" or "dense"
    n_ff: int                       # dense FFN width (0 if none)
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int                 # 0: no shared expert
    layer_kinds: tuple[str, ...] = field(default=())

    @property
    def conv_channels(self) -> int:
        """C = 2*Hk*Dk + Hv*Dv: the q, k, v channels that go through the causal conv."""
        return 2 * self.ssm_k_heads * self.ssm_k_dim + self.ssm_v_heads * self.ssm_v_dim

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == RECURRENT)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == ATTENTION)

    def kq_head_map(self) -> np.ndarray:
        """For each value head, the key/query head it reads (int64[Hv])."""
        hv, hk = self.ssm_v_heads, self.ssm_k_heads
        h = np.arange(hv)
        if self.v_head_order == "grouped":
            return h // (hv // hk)
        return h % hk

    @classmethod
    def from_gguf(cls, f: GGUFFile, v_head_order: str = "grouped") -> "ModelArgs":
        arch = f.architecture
        p = arch + "."
        n_block = f.get_int(p + "block_count")
        n_mtp = f.get_int(p + "nextn_predict_layers", 0)
        n_layer = n_block - n_mtp
        if n_layer <= 0:
            raise ModelFormatError(f"{f.path}: {n_block} blocks of which {n_mtp} are MTP")
        n_embd = f.get_int(p + "embedding_length")
        n_head = f.get_int(p + "attention.head_count")
        n_head_kv = f.get_int(p + "attention.head_count_kv")
        head_dim = f.get_int(p + "attention.key_length", 0) or (n_embd // max(n_head, 1))
        hv = f.get_int(p + "ssm.time_step_rank")
        d_inner = f.get_int(p + "ssm.inner_size")
        n_expert = f.get_int(p + "expert_count", 0)
        emb = f.tensors.get("token_embd.weight")
        if emb is None:
            raise ModelFormatError(f"{f.path}: tensor 'token_embd.weight' is missing")
        if len(emb.ne) != 2:
            raise ModelFormatError(f"{f.path}: token_embd.weight must be 2-D, has ne {emb.ne}")
        args = cls(
            arch=arch,
            n_layer=n_layer,
            n_mtp=n_mtp,
            n_embd=n_embd,
            n_vocab=emb.ne[1],
            n_ctx_train=f.get_int(p + "context_length"),
            rms_eps=f.get_float(p + "attention.layer_norm_rms_epsilon"),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_rot=f.get_int(p + "rope.dimension_count", head_dim),
            rope_theta=f.get_float(p + "rope.freq_base", 10000.0),
            rope_sections=_int_tuple(f, p + "rope.dimension_sections"),
            ssm_conv_kernel=f.get_int(p + "ssm.conv_kernel"),
            ssm_k_heads=f.get_int(p + "ssm.group_count"),
            ssm_v_heads=hv,
            ssm_k_dim=f.get_int(p + "ssm.state_size"),
            ssm_v_dim=d_inner // hv if hv > 0 else 0,
            v_head_order=v_head_order,
            ffn_kind="moe" if n_expert > 0 else "dense",
            n_ff=f.get_int(p + "feed_forward_length", 0),
            n_expert=n_expert,
            n_expert_used=f.get_int(p + "expert_used_count", 0) if n_expert else 0,
            n_ff_exp=f.get_int(p + "expert_feed_forward_length", 0) if n_expert else 0,
            n_ff_shexp=f.get_int(p + "expert_shared_feed_forward_length", 0),
            layer_kinds=_layer_kinds(f, p, n_layer, n_block),
        )
        args._validate(f.path, d_inner)
        return args

    def _validate(self, path: str, d_inner: int) -> None:
        def bad(msg):
            raise ModelFormatError(f"{path}: {msg}")

        positive = ("n_embd", "n_vocab", "n_head", "n_head_kv", "head_dim", "ssm_conv_kernel",
                    "ssm_k_heads", "ssm_v_heads", "ssm_k_dim", "ssm_v_dim", "n_ctx_train")
        for name in positive:
            if getattr(self, name) <= 0:
                bad(f"hyper-parameter {name} must be positive, is {getattr(self, name)}")
        if self.ssm_v_heads * self.ssm_v_dim != d_inner:
            bad(f"ssm.inner_size {d_inner} is not a multiple of ssm.time_step_rank "
                f"{self.ssm_v_heads}")
        if self.ssm_v_heads % self.ssm_k_heads:
            bad(f"value heads ({self.ssm_v_heads}) must be a multiple of key heads "
                f"({self.ssm_k_heads})")
        if self.n_head % self.n_head_kv:
            bad(f"attention heads ({self.n_head}) must be a multiple of KV heads "
                f"({self.n_head_kv})")
        if not (0 < self.n_rot <= self.head_dim) or self.n_rot % 2:
            bad(f"rope.dimension_count {self.n_rot} must be even and in 1..{self.head_dim}")
        if not (self.rms_eps > 0 and np.isfinite(self.rms_eps)):
            bad(f"layer_norm_rms_epsilon must be positive, is {self.rms_eps}")
        if not (self.rope_theta > 0 and np.isfinite(self.rope_theta)):
            bad(f"rope.freq_base must be positive, is {self.rope_theta}")
        if self.ffn_kind == "moe":
            if not (0 < self.n_expert_used <= self.n_expert):
                bad(f"expert_used_count {self.n_expert_used} must be in 1..{self.n_expert}")
            if self.n_ff_exp <= 0:
                bad("expert_feed_forward_length is missing or zero")
        elif self.n_ff <= 0:
            bad("feed_forward_length is missing or zero for a dense model")


def _int_tuple(f: GGUFFile, key: str) -> tuple[int, ...]:
    """An optional array-of-integers key (an array of strings or floats is an error)."""
    values = f.get_array(key, [])
    if not all(isinstance(v, int) for v in values):
        raise ModelFormatError(f"{f.path}: metadata key {key!r} must be an array of integers")
    return tuple(int(v) for v in values)


def _layer_kinds(f: GGUFFile, p: str, n_layer: int, n_block: int) -> tuple[str, ...]:
    """Per trunk layer: recurrent or attention. The per-layer flag array wins; otherwise
    every ``full_attention_interval``-th layer is attention."""
    flags = f.get_array(p + "attention.recurrent_layers", [])
    if flags:
        if len(flags) not in (n_layer, n_block):
            raise ModelFormatError(
                f"{f.path}: attention.recurrent_layers has {len(flags)} entries for "
                f"{n_block} blocks"
            )
        return tuple(RECURRENT if bool(x) else ATTENTION for x in flags[:n_layer])
    interval = f.get_int(p + "full_attention_interval", 4)
    if interval <= 0:
        raise ModelFormatError(f"{f.path}: full_attention_interval must be positive")
    return tuple(ATTENTION if (i + 1) % interval == 0 else RECURRENT for i in range(n_layer))


def _rows(t: TensorInfo, name: str, rows: np.ndarray | slice) -> TensorInfo:
    """A tensor made of some rows (outputs) of a 2-D weight: a view for a slice, a small
    copy for an index array. Quantised rows are independent, so this is exact."""
    data = t.data[rows]
    n = data.shape[0]
    return TensorInfo(name, t.qtype, (t.ne[0], n), data.nbytes, t.offset, data)


def _expert_rows(t: TensorInfo, name: str, rows: slice) -> TensorInfo:
    data = t.data[:, rows]
    return TensorInfo(name, t.qtype, (t.ne[0], data.shape[1], t.ne[2]), data.nbytes,
                      t.offset, data)


@dataclass
class LayerWeights:
    kind: str
    tensors: dict[str, TensorInfo]

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def get(self, name: str) -> TensorInfo | None:
        return self.tensors.get(name)


class Qwen3Next:
    """Tensor catalogue and sanitising for ``qwen3next``; subclassed for ``qwen35*``."""

    v_head_order = "grouped"

    def __init__(self, f: GGUFFile):
        self.file = f
        self.args = ModelArgs.from_gguf(f, self.v_head_order)
        self.used: set[str] = set()
        self.token_embd = self._take("token_embd.weight", (self.args.n_embd, self.args.n_vocab))
        self.output_norm = self._take("output_norm.weight", (self.args.n_embd,))
        if "output.weight" in f.tensors:
            self.output = self._take("output.weight", (self.args.n_embd, self.args.n_vocab))
        else:
            self.output = self.token_embd
        self.layers = [self._layer(i, kind) for i, kind in enumerate(self.args.layer_kinds)]
        self.unused = sorted(set(f.tensors) - self.used)

    # ---- loading ---------------------------------------------------------------------

    def _take(self, name: str, ne: tuple[int, ...], optional: bool = False):
        t = self.file.tensors.get(name)
        if t is None:
            if optional:
                return None
            raise ModelFormatError(f"{self.file.path}: tensor {name!r} is missing")
        try:
            check_supported(t.qtype, name)
        except UnsupportedModelError as exc:  # say which file, like every other load error
            raise UnsupportedModelError(f"{self.file.path}: {exc}") from None
        have = _strip_trailing_ones(t.ne)
        if have != _strip_trailing_ones(ne):
            raise ModelFormatError(
                f"{self.file.path}: tensor {name!r} has shape (ne) {list(t.ne)}, "
                f"expected {list(ne)} from the hyper-parameters"
            )
        self.used.add(name)
        if tuple(t.ne) != tuple(ne):
            data = t.data.reshape(tuple(reversed(ne))[:-1] + (t.data.shape[-1],))
            t = TensorInfo(t.name, t.qtype, tuple(ne), t.n_bytes, t.offset, data)
        return t

    def _has(self, i: int, name: str) -> bool:
        return f"blk.{i}.{name}" in self.file.tensors

    def _layer(self, i: int, kind: str) -> LayerWeights:
        a = self.args
        H = a.n_embd
        blk = f"blk.{i}."
        tk = lambda name, ne, optional=False: self._take(blk + name, ne, optional)  # noqa: E731
        t: dict[str, TensorInfo] = {"attn_norm": tk("attn_norm.weight", (H,))}
        if kind == RECURRENT:
            t.update(self._recurrent(i, tk))
        else:
            t.update(self._attention(i, tk))
        t["post_attention_norm"] = tk("post_attention_norm.weight", (H,))
        t.update(self._ffn(i, tk))
        return LayerWeights(kind, t)

    def _recurrent(self, i, tk) -> dict[str, TensorInfo]:
        a = self.args
        H, C, Kc = a.n_embd, a.conv_channels, a.ssm_conv_kernel
        hv, dv = a.ssm_v_heads, a.ssm_v_dim
        t = {}
        if self._has(i, "ssm_in.weight") and not self._has(i, "attn_qkv.weight"):
            t.update(self._split_legacy_ssm_in(tk("ssm_in.weight", (H, C + hv * dv))))
        else:
            t["attn_qkv"] = tk("attn_qkv.weight", (H, C))
            t["attn_gate"] = tk("attn_gate.weight", (H, hv * dv))
        t.update(self._beta_alpha(i, tk))
        t["ssm_conv1d"] = tk("ssm_conv1d.weight", (Kc, C))
        t["ssm_dt"] = tk("ssm_dt.bias", (hv,))
        t["ssm_a"] = tk("ssm_a", (hv,))
        t["ssm_norm"] = tk("ssm_norm.weight", (dv,))
        t["ssm_out"] = tk("ssm_out.weight", (hv * dv, H))
        return t

    def _beta_alpha(self, i, tk) -> dict[str, TensorInfo]:
        """qwen3next fuses beta and alpha in ``ssm_ba``, grouped per key head g as
        [b (r values), a (r values)]; value head h = g*r + j."""
        a = self.args
        hk, hv = a.ssm_k_heads, a.ssm_v_heads
        r = hv // hk
        ba = tk("ssm_ba.weight", (a.n_embd, 2 * hv))
        g, j = np.divmod(np.arange(hv), r)
        return {"ssm_beta": _rows(ba, ba.name, g * 2 * r + j),
                "ssm_alpha": _rows(ba, ba.name, g * 2 * r + r + j)}

    def _split_legacy_ssm_in(self, w: TensorInfo) -> dict[str, TensorInfo]:
        """Legacy ``ssm_in``: rows grouped per key head g as [q_g, k_g, v_g (r*Dv),
        z_g (r*Dv)]; re-split into the canonical [all q | all k | all v] and z."""
        a = self.args
        hk, dk, dv, r = a.ssm_k_heads, a.ssm_k_dim, a.ssm_v_dim, a.ssm_v_heads // a.ssm_k_heads
        group = 2 * dk + 2 * r * dv
        base = np.arange(hk)[:, None] * group
        q = (base + np.arange(dk)).ravel()
        k = (base + dk + np.arange(dk)).ravel()
        v = (base + 2 * dk + np.arange(r * dv)).ravel()
        z = (base + 2 * dk + r * dv + np.arange(r * dv)).ravel()
        return {"attn_qkv": _rows(w, w.name, np.concatenate([q, k, v])),
                "attn_gate": _rows(w, w.name, z)}

    def _attention(self, i, tk) -> dict[str, TensorInfo]:
        a = self.args
        H, nh, nkv, hd = a.n_embd, a.n_head, a.n_head_kv, a.head_dim
        t = {}
        if self._has(i, "attn_qkv.weight"):
            qkv = tk("attn_qkv.weight", (H, 2 * nh * hd + 2 * nkv * hd))
            q_end, k_end = 2 * nh * hd, 2 * nh * hd + nkv * hd
            t["attn_q"] = _rows(qkv, qkv.name, slice(0, q_end))
            t["attn_k"] = _rows(qkv, qkv.name, slice(q_end, k_end))
            t["attn_v"] = _rows(qkv, qkv.name, slice(k_end, None))
        else:
            t["attn_q"] = tk("attn_q.weight", (H, 2 * nh * hd))
            t["attn_k"] = tk("attn_k.weight", (H, nkv * hd))
            t["attn_v"] = tk("attn_v.weight", (H, nkv * hd))
        t["attn_q_norm"] = tk("attn_q_norm.weight", (hd,))
        t["attn_k_norm"] = tk("attn_k_norm.weight", (hd,))
        t["attn_output"] = tk("attn_output.weight", (nh * hd, H))
        return t

    def _ffn(self, i, tk) -> dict[str, TensorInfo]:
        a = self.args
        H = a.n_embd
        if a.ffn_kind == "dense":
            F = a.n_ff
            return {"ffn_gate": tk("ffn_gate.weight", (H, F)),
                    "ffn_up": tk("ffn_up.weight", (H, F)),
                    "ffn_down": tk("ffn_down.weight", (F, H))}
        E, Fe, Fs = a.n_expert, a.n_ff_exp, a.n_ff_shexp
        t = {"ffn_gate_inp": tk("ffn_gate_inp.weight", (H, E))}
        if self._has(i, "ffn_gate_up_exps.weight"):
            gu = tk("ffn_gate_up_exps.weight", (H, 2 * Fe, E))
            t["ffn_gate_exps"] = _expert_rows(gu, gu.name, slice(0, Fe))
            t["ffn_up_exps"] = _expert_rows(gu, gu.name, slice(Fe, None))
        else:
            t["ffn_gate_exps"] = tk("ffn_gate_exps.weight", (H, Fe, E))
            t["ffn_up_exps"] = tk("ffn_up_exps.weight", (H, Fe, E))
        t["ffn_down_exps"] = tk("ffn_down_exps.weight", (Fe, H, E))
        if Fs > 0:
            t["ffn_gate_shexp"] = tk("ffn_gate_shexp.weight", (H, Fs))
            t["ffn_up_shexp"] = tk("ffn_up_shexp.weight", (H, Fs))
            t["ffn_down_shexp"] = tk("ffn_down_shexp.weight", (Fs, H))
            t["ffn_gate_inp_shexp"] = tk("ffn_gate_inp_shexp.weight", (H,))
        return t


def _strip_trailing_ones(ne: tuple[int, ...]) -> tuple[int, ...]:
    ne = tuple(int(n) for n in ne)
    while len(ne) > 1 and ne[-1] == 1:
        ne = ne[:-1]
    return ne
