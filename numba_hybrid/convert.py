"""Write GGUF files for ``qwen3next``, ``qwen35`` and ``qwen35moe`` from a Hugging Face style
checkpoint given as NumPy arrays, the way llama.cpp's ``convert_hf_to_gguf.py`` does.

Same metadata keys (in the converter's order), tensor names, shapes and dtypes, and the
same tensor transforms (all in :func:`gguf_tensors`):

* ``+1`` on every ``*norm.weight`` except the gated ``linear_attn.norm.weight`` (HF's
  RMSNorm multiplies by ``1 + w``); ``ssm_a = -exp(A_log)`` in float32; ``conv1d`` squeezed
  to ``[C, Kc]``; ``dt_bias`` renamed ``ssm_dt.bias``;
* qwen3next: ``in_proj_qkvz`` (rows grouped per key head ``[q, k, v, z]``) split into
  ``attn_qkv`` = [all q | all k | all v] and ``attn_gate`` = z (``legacy_ssm_in`` writes it
  unchanged as ``ssm_in`` like old GGUFs); ``in_proj_ba`` kept as ``ssm_ba``;
* qwen35*: when key heads != value heads, the value heads go from HF's grouped order
  (head ``g*r + j``) to tiled order (position ``j*nk + g``) in the V rows of ``attn_qkv``,
  ``attn_gate``, ``ssm_beta``, ``ssm_alpha``, ``ssm_dt``, ``ssm_a``, the V channels of
  ``ssm_conv1d`` and the input columns of ``ssm_out``;
* MoE: per-expert weights stacked into ``ffn_{gate,up,down}_exps``.

F32 is kept for 1-D tensors, norms, ``ssm_a``, ``ssm_dt.bias``, ``ssm_conv1d``,
``ffn_gate_inp`` and ``ffn_gate_inp_shexp``; other tensors get ``out_type`` (Q8_0 falls back
to F16 when a row is not a multiple of 32). :func:`random_hf_checkpoint` and
:func:`small_config` make small random models with the init used for the test fixtures.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT

ARCHS = ("qwen3next", "qwen35", "qwen35moe")
OUT_TYPES = {"f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
             "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
             "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
             "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
LINEAR, FULL = "linear_attention", "full_attention"
_F32_FORCED = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")


# Dims field -> HF config key (integers).
_INT_KEYS = {"L": "num_hidden_layers", "H": "hidden_size", "V": "vocab_size",
             "nh": "num_attention_heads", "nkv": "num_key_value_heads", "hd": "head_dim",
             "nk": "linear_num_key_heads", "nv": "linear_num_value_heads",
             "dk": "linear_key_head_dim", "dv": "linear_value_head_dim",
             "Kc": "linear_conv_kernel_dim"}
_MOE_KEYS = {"E": "num_experts", "k": "num_experts_per_tok", "Fe": "moe_intermediate_size"}


@dataclass(frozen=True)
class Dims:
    """The hyper-parameters of an HF config (letters as in model_spec), converter defaults
    applied. F is None when the config has no intermediate_size (MoE only)."""
    arch: str
    L: int
    H: int
    V: int
    nh: int
    nkv: int
    hd: int
    nk: int
    nv: int
    dk: int
    dv: int
    Kc: int
    F: int | None
    E: int
    k: int
    Fe: int
    Fs: int
    tied: bool
    layer_types: tuple
    interval: int
    rope_theta: float | None
    n_rot: int
    mrope: tuple

    @property
    def moe(self) -> bool:
        return self.arch != "qwen35"


def config_dims(arch: str, config: dict) -> Dims:
    """Read (and check) an HF config.json dict; ``text_config`` is merged over the root."""
    if arch not in ARCHS:
        raise ValueError(f"unsupported architecture {arch!r} (supported: {', '.join(ARCHS)})")
    c = {**config, **config.get("text_config", {})}
    moe = arch != "qwen35"
    keys = dict(_INT_KEYS, **(_MOE_KEYS if moe else {}))
    if not moe or c.get("intermediate_size") is not None:
        keys["F"] = "intermediate_size"
    for key in [*keys.values(), "rms_norm_eps", "max_position_embeddings"]:
        if c.get(key) is None:
            raise ValueError(f"config is missing {key!r}")
    v = {field: int(c[key]) for field, key in keys.items()}
    interval = int(c.get("full_attention_interval") or 4)
    types = c.get("layer_types") or [FULL if (i + 1) % interval == 0 else LINEAR
                                     for i in range(v["L"])]
    if len(types) != v["L"] or set(types) - {LINEAR, FULL}:
        raise ValueError(f"layer_types must be {v['L']} of {LINEAR!r}/{FULL!r}, got {types}")
    if v["nv"] % v["nk"] or v["nh"] % v["nkv"]:
        raise ValueError("linear_num_value_heads must be a multiple of linear_num_key_heads and "
                         "num_attention_heads a multiple of num_key_value_heads")
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    partial = rp.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.25))
    return Dims(arch=arch, **{"F": None, "E": 0, "k": 0, "Fe": 0, **v},
                Fs=int(c.get("shared_expert_intermediate_size") or 0) if moe else 0,
                tied=bool(c.get("tie_word_embeddings", False)), layer_types=tuple(types),
                interval=interval, rope_theta=rp.get("rope_theta", c.get("rope_theta")),
                n_rot=int(v["hd"] * partial),
                mrope=tuple(rp.get("mrope_section") or c.get("mrope_section") or (11, 11, 10)))


def expected_shapes(d: Dims) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> torch shape, for every tensor the checkpoint must hold."""
    H, kd, vd = d.H, d.nk * d.dk, d.nv * d.dv
    s = {"model.embed_tokens.weight": (d.V, H), "model.norm.weight": (H,)}
    if not d.tied:
        s["lm_head.weight"] = (d.V, H)
    for i, kind in enumerate(d.layer_types):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = s[p + "post_attention_layernorm.weight"] = (H,)
        if kind == LINEAR:
            la = p + "linear_attn."
            if d.arch == "qwen3next":
                s[la + "in_proj_qkvz.weight"] = (2 * kd + 2 * vd, H)
                s[la + "in_proj_ba.weight"] = (2 * d.nv, H)
            else:
                s[la + "in_proj_qkv.weight"] = (2 * kd + vd, H)
                s[la + "in_proj_z.weight"] = (vd, H)
                s[la + "in_proj_b.weight"] = s[la + "in_proj_a.weight"] = (d.nv, H)
            s[la + "conv1d.weight"] = (2 * kd + vd, 1, d.Kc)
            s[la + "dt_bias"] = s[la + "A_log"] = (d.nv,)
            s[la + "norm.weight"] = (d.dv,)
            s[la + "out_proj.weight"] = (H, vd)
        else:
            sa = p + "self_attn."
            s[sa + "q_proj.weight"] = (2 * d.nh * d.hd, H)
            s[sa + "k_proj.weight"] = s[sa + "v_proj.weight"] = (d.nkv * d.hd, H)
            s[sa + "o_proj.weight"] = (H, d.nh * d.hd)
            s[sa + "q_norm.weight"] = s[sa + "k_norm.weight"] = (d.hd,)
        m = p + "mlp."
        if not d.moe:
            s[m + "gate_proj.weight"] = s[m + "up_proj.weight"] = (d.F, H)
            s[m + "down_proj.weight"] = (H, d.F)
            continue
        s[m + "gate.weight"] = (d.E, H)
        for e in range(d.E):
            x = f"{m}experts.{e}."
            s[x + "gate_proj.weight"] = s[x + "up_proj.weight"] = (d.Fe, H)
            s[x + "down_proj.weight"] = (H, d.Fe)
        if d.Fs:
            x = m + "shared_expert."
            s[x + "gate_proj.weight"] = s[x + "up_proj.weight"] = (d.Fs, H)
            s[x + "down_proj.weight"] = (H, d.Fs)
            s[m + "shared_expert_gate.weight"] = (1, H)
    return s


def gguf_tensors(d: Dims, t: dict[str, np.ndarray], legacy_ssm_in: bool = False):
    """The converter's per-arch transforms: HF float32 arrays -> [(gguf name, float32 array)]
    in the order the converter writes them (sorted by HF source name)."""
    out: list[tuple[str, str, np.ndarray]] = []   # (HF source name, GGUF name, data)
    f32 = lambda name: np.asarray(t[name], dtype=np.float32)  # noqa: E731
    one = np.float32(1)
    r, kd, H = d.nv // d.nk, d.nk * d.dk, d.H

    def put(src, name, x):
        out.append((src, name, np.ascontiguousarray(x, dtype=np.float32)))

    def tile(x, head, axis=0):
        """qwen35*: grouped value-head order (nk, r) -> tiled (r, nk) along ``axis``."""
        if d.arch == "qwen3next" or r == 1:
            return x
        x = np.moveaxis(x, axis, 0)
        y = x.reshape(d.nk, r, head, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)
        return np.moveaxis(y, 0, axis)

    put("model.embed_tokens.weight", "token_embd.weight", f32("model.embed_tokens.weight"))
    put("model.norm.weight", "output_norm.weight", f32("model.norm.weight") + one)
    if not d.tied:
        put("lm_head.weight", "output.weight", f32("lm_head.weight"))
    for i, kind in enumerate(d.layer_types):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(p + "input_layernorm.weight", b + "attn_norm.weight",
            f32(p + "input_layernorm.weight") + one)
        put(p + "post_attention_layernorm.weight", b + "post_attention_norm.weight",
            f32(p + "post_attention_layernorm.weight") + one)
        if kind == LINEAR:
            la = p + "linear_attn."
            if d.arch == "qwen3next":
                src = la + "in_proj_qkvz.weight"
                if legacy_ssm_in:
                    put(src, b + "ssm_in.weight", f32(src))
                else:
                    g = f32(src).reshape(d.nk, 2 * d.dk + 2 * r * d.dv, H)
                    q, k, v, z = np.split(g, [d.dk, 2 * d.dk, 2 * d.dk + r * d.dv], axis=1)
                    put(src, b + "attn_qkv.weight",
                        np.concatenate([x.reshape(-1, H) for x in (q, k, v)]))
                    put(src, b + "attn_gate.weight", z.reshape(-1, H))
                put(la + "in_proj_ba.weight", b + "ssm_ba.weight", f32(la + "in_proj_ba.weight"))
            else:
                qkv = f32(la + "in_proj_qkv.weight")
                put(la + "in_proj_qkv.weight", b + "attn_qkv.weight",
                    np.concatenate([qkv[:2 * kd], tile(qkv[2 * kd:], d.dv)]))
                put(la + "in_proj_z.weight", b + "attn_gate.weight",
                    tile(f32(la + "in_proj_z.weight"), d.dv))
                for hf, gg in (("in_proj_b", "ssm_beta"), ("in_proj_a", "ssm_alpha")):
                    put(f"{la}{hf}.weight", f"{b}{gg}.weight", tile(f32(f"{la}{hf}.weight"), 1))
            conv = f32(la + "conv1d.weight")[:, 0, :]
            put(la + "conv1d.weight", b + "ssm_conv1d.weight",
                np.concatenate([conv[:2 * kd], tile(conv[2 * kd:], d.dv)]))
            put(la + "dt_bias", b + "ssm_dt.bias", tile(f32(la + "dt_bias"), 1))
            put(la + "A_log", b + "ssm_a", -np.exp(tile(f32(la + "A_log"), 1)))  # float32 exp
            put(la + "norm.weight", b + "ssm_norm.weight", f32(la + "norm.weight"))  # no +1
            put(la + "out_proj.weight", b + "ssm_out.weight",
                tile(f32(la + "out_proj.weight"), d.dv, axis=1))
        else:
            sa = p + "self_attn."
            for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                           ("o_proj", "attn_output")):
                put(sa + hf + ".weight", b + gg + ".weight", f32(sa + hf + ".weight"))
            for hf, gg in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
                put(sa + hf + ".weight", b + gg + ".weight", f32(sa + hf + ".weight") + one)
        m = p + "mlp."
        names = (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))
        if not d.moe:
            for hf, gg in names:
                put(f"{m}{hf}.weight", f"{b}ffn_{gg}.weight", f32(f"{m}{hf}.weight"))
            continue
        put(m + "gate.weight", b + "ffn_gate_inp.weight", f32(m + "gate.weight"))
        for hf, gg in sorted(names):   # emitted together once the last expert is read
            put(m + "experts", f"{b}ffn_{gg}_exps.weight",
                np.stack([f32(f"{m}experts.{e}.{hf}.weight") for e in range(d.E)]))
        if d.Fs:
            for hf, gg in names:
                put(f"{m}shared_expert.{hf}.weight", f"{b}ffn_{gg}_shexp.weight",
                    f32(f"{m}shared_expert.{hf}.weight"))
            put(m + "shared_expert_gate.weight", b + "ffn_gate_inp_shexp.weight",
                f32(m + "shared_expert_gate.weight"))
    out.sort(key=lambda e: e[0])   # stable: a source's outputs keep their order
    return [(name, x) for _, name, x in out]


def stored_tensor(name: str, x: np.ndarray, out_type: str) -> tuple[np.ndarray, QT]:
    """The data and ggml type the converter stores for GGUF tensor ``name``."""
    qtype = OUT_TYPES[out_type][0]
    if (x.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
            or name.endswith(_F32_FORCED) or qtype == QT.F32):
        return x.astype(np.float32), QT.F32
    if qtype == QT.Q8_0 and x.shape[-1] % 32:
        qtype = QT.F16   # the converter's fallback when a row is not whole Q8_0 blocks
    if qtype == QT.F16:
        return x.astype(np.float16), QT.F16
    return gguf.quants.quantize(x, qtype), qtype


def byte_level_symbols() -> list[str]:
    """GPT-2's 256 byte-level token strings, in its vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    return [chr(b) for b in bs] + [chr(256 + n) for n in range(256 - len(bs))]


def _minimal_tokenizer(d: Dims, c: dict) -> dict:
    """The 256 byte-level symbols, then one merge "Ġ Ġ" -> "ĠĠ" (id 256), then [PADn]
    fillers. One merge is needed: GGUFWriter drops empty arrays, and llama.cpp (like our
    Tokenizer) refuses a gpt2 vocabulary without tokenizer.ggml.merges."""
    if d.V < 257:
        raise ValueError(f"vocab_size {d.V} is too small for the 257-token default vocabulary")
    ids = {key: c.get(key + "_token_id") for key in ("eos", "bos", "pad")}
    ids = {k: (v if isinstance(v, int) and 0 <= v < d.V else None) for k, v in ids.items()}
    return {"tokens": byte_level_symbols() + ["ĠĠ"] + [f"[PAD{i}]" for i in range(257, d.V)],
            "token_types": [1] * 257 + [5] * (d.V - 257), "merges": ["Ġ Ġ"], "pre": "qwen2",
            "eos_id": d.V - 1 if ids["eos"] is None else ids["eos"],
            "bos_id": ids["bos"], "pad_id": ids["pad"]}


_CONTROL_LIKE = re.compile(r"<\|.*\|>")


def tokenizer_from_hf(tokenizer_json: dict, vocab_size: int, eos_token: str | None = None,
                      bos_token: str | None = None, pad_token: str | None = None,
                      chat_template: str | None = None, pre: str = "qwen2") -> dict:
    """The ``tokenizer`` argument of :func:`write_gguf` from a byte-level BPE
    ``tokenizer.json`` (a parsed dict), as the converter's ``_set_vocab_gpt2`` builds it:
    tokens by id (ids without a token become ``[PADn]`` fillers of type 5 UNUSED), type 3
    CONTROL for added tokens marked special or looking like ``<|...|>``, 4 USER_DEFINED for
    other added tokens, 1 NORMAL for the rest; merges as ``"left right"`` strings; eos, bos
    and pad ids looked up by token text (None: the key is not written)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"expected a BPE tokenizer.json, got model type {model.get('type')!r}")
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tokenizer_json.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(f"token id {max(by_id)} does not fit vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)
            continue
        tokens.append(by_id[i])
        if i in added:
            special = added[i].get("special") or _CONTROL_LIKE.fullmatch(by_id[i])
            types.append(3 if special else 4)
        else:
            types.append(1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {text: i for i, text in by_id.items()}

    def token_id(text: str | None) -> int | None:
        if text is None:
            return None
        if text not in ids:
            raise ValueError(f"token {text!r} is not in the vocabulary")
        return ids[text]

    return {"tokens": tokens, "token_types": types, "merges": merges, "pre": pre,
            "eos_id": token_id(eos_token), "bos_id": token_id(bos_token),
            "pad_id": token_id(pad_token), "chat_template": chat_template}


def write_gguf(path: str | os.PathLike, arch: str, config: dict, tensors: dict[str, np.ndarray],
               tokenizer: dict | None = None, out_type: str = "f32", name: str = "model",
               legacy_ssm_in: bool = False) -> None:
    """Write ``tensors`` (HF names, HF layout) as a GGUF of ``arch``, like the converter.

    ``tokenizer``: tokens, token_types, merges, pre, eos_id, bos_id, pad_id, chat_template
    (optional); None writes a minimal byte-level vocabulary padded with ``[PADn]``.
    ``legacy_ssm_in`` (qwen3next) stores ``in_proj_qkvz`` unchanged as ``ssm_in``.
    """
    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    if legacy_ssm_in and arch != "qwen3next":
        raise ValueError("legacy_ssm_in exists only for qwen3next")
    d = config_dims(arch, config)
    c = {**config, **config.get("text_config", {})}
    expected = expected_shapes(d)
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(f"tensor {key!r} is missing from the checkpoint")
        if tuple(np.shape(tensors[key])) != shape:
            raise ValueError(f"tensor {key!r} has shape {tuple(np.shape(tensors[key]))}, "
                             f"expected {shape} from the config")
    extra = sorted(k for k in tensors if k not in expected and not k.startswith("mtp."))
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]!r} for this config")  # mtp.*: dropped
    tok = _minimal_tokenizer(d, c) if tokenizer is None else dict(tokenizer)
    tokens, types = list(tok["tokens"]), [int(x) for x in tok["token_types"]]
    if len(types) != len(tokens) or len(tokens) > d.V:
        raise ValueError(f"tokenizer has {len(tokens)} tokens and {len(types)} types for "
                         f"vocab_size {d.V}")
    types += [5] * (d.V - len(tokens))
    tokens += [f"[PAD{i}]" for i in range(len(tokens), d.V)]

    w = gguf.GGUFWriter(os.fspath(path), arch)
    for tname, x in gguf_tensors(d, tensors, legacy_ssm_in):
        data, qtype = stored_tensor(tname, x, out_type)
        w.add_tensor(tname, data, raw_dtype=qtype)
    w.add_type("model")
    w.add_name(name)
    w.add_size_label(gguf.size_label(*w.get_total_parameter_count()))
    w.add_block_count(d.L)
    w.add_context_length(int(c["max_position_embeddings"]))
    w.add_embedding_length(d.H)
    if d.F is not None:
        w.add_feed_forward_length(d.F)
    w.add_head_count(d.nh)
    w.add_head_count_kv(d.nkv)
    if arch != "qwen3next":
        w.add_rope_dimension_sections(list(d.mrope[:4]) + [0] * (4 - len(d.mrope[:4])))
    if d.rope_theta is not None:
        w.add_rope_freq_base(float(d.rope_theta))
    w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    if d.moe:
        w.add_expert_count(d.E)
        w.add_expert_used_count(d.k)
    w.add_key_length(d.hd)
    w.add_value_length(d.hd)
    w.add_file_type(OUT_TYPES[out_type][1])
    if d.moe:
        w.add_expert_feed_forward_length(d.Fe)
        if d.Fs:
            w.add_expert_shared_feed_forward_length(d.Fs)
    w.add_ssm_conv_kernel(d.Kc)
    w.add_ssm_state_size(d.dk)
    w.add_ssm_group_count(d.nk)
    w.add_ssm_time_step_rank(d.nv)
    w.add_ssm_inner_size(d.nv * d.dv)
    if c.get("layer_types"):
        w.add_array(f"{arch}.attention.recurrent_layers", [t == LINEAR for t in d.layer_types])
    w.add_full_attention_interval(d.interval)
    w.add_rope_dimension_count(d.n_rot)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(list(tok["merges"]))
    for key, add in (("eos_id", w.add_eos_token_id), ("pad_id", w.add_pad_token_id),
                     ("bos_id", w.add_bos_token_id)):
        if tok.get(key) is not None:
            add(int(tok[key]))
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if tok.get("chat_template"):
        w.add_chat_template(tok["chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def random_hf_checkpoint(arch: str, config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 HF-named weights with the fixtures' init: projections N(0, 1/fan_in),
    embeddings N(0, 1) (tied: N(0, 0.15^2)), lm_head N(0, 4/H), router N(0, 2.56/H), conv1d
    N(0, 0.25), (1 + w) norms w ~ N(0, 0.01), gated norm 1 + N(0, 0.01), A_log = log U(0.05, 1),
    dt_bias U(-2, 1)."""
    d = config_dims(arch, config)
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(d).items():
        if name == "model.embed_tokens.weight":
            x = rng.normal(0.0, 0.15 if d.tied else 1.0, shape)
        elif name == "lm_head.weight":
            x = rng.normal(0.0, np.sqrt(4.0 / d.H), shape)
        elif name.endswith("mlp.gate.weight"):
            x = rng.normal(0.0, np.sqrt(2.56 / d.H), shape)
        elif name.endswith("conv1d.weight"):
            x = rng.normal(0.0, 0.5, shape)
        elif name.endswith("linear_attn.norm.weight"):
            x = 1.0 + rng.normal(0.0, 0.1, shape)
        elif name.endswith("norm.weight"):
            x = rng.normal(0.0, 0.1, shape)
        elif name.endswith("A_log"):
            x = np.log(rng.uniform(0.05, 1.0, shape))
        elif name.endswith("dt_bias"):
            x = rng.uniform(-2.0, 1.0, shape)
        else:
            x = rng.normal(0.0, np.sqrt(1.0 / shape[-1]), shape)
        out[name] = x.astype(np.float32)
    return out


def small_config(arch: str, **overrides) -> dict:
    """A small valid HF config. Overrides are HF keys; ``rope_theta``,
    ``partial_rotary_factor`` and ``mrope_section`` go into ``rope_parameters``; a value of
    None removes the key (``layer_types=None``: layer kinds from full_attention_interval)."""
    if arch not in ARCHS:
        raise ValueError(f"unsupported architecture {arch!r}")
    L = overrides.get("num_hidden_layers", 4)
    every = overrides.get("full_attention_interval") or 4
    c = {"hidden_size": 64, "num_hidden_layers": L, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6,
         "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
         "linear_num_key_heads": 2, "linear_num_value_heads": 4, "vocab_size": 320,
         "max_position_embeddings": 256, "tie_word_embeddings": False,
         "layer_types": [FULL if (i + 1) % every == 0 else LINEAR for i in range(L)],
         "rope_parameters": {"rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                             "rope_type": "default"},
         "bos_token_id": 0, "eos_token_id": 1}
    if arch == "qwen35":
        c["intermediate_size"] = 96
    else:
        c.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 shared_expert_intermediate_size=32)
        if arch == "qwen3next":
            c.update(intermediate_size=96, norm_topk_prob=True)
    if arch != "qwen3next":
        c["rope_parameters"].update(mrope_section=[2, 1, 1], mrope_interleaved=True)
    for key, value in overrides.items():
        target = c["rope_parameters"] if key in ("rope_theta", "partial_rotary_factor",
                                                 "mrope_section") else c
        target.pop(key, None) if value is None else target.__setitem__(key, value)
    return c
