"""Shapes the 4-layer fixtures do not cover, end to end: HF checkpoint -> our GGUF writer
(numba_hybrid.convert) -> engine (reference backend, float64) vs an independent float64
HF-math forward (tests/hf_reference.py) on the same checkpoint.

Also checks the writer against llama.cpp's converter: the fixture GGUFs, mapped back to HF
weights, go through the HF forward to the transformers / llama.cpp logits, and through the
writer to the same keys, tensors and bytes.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

import numba_hybrid
from numba_hybrid.convert import (config_dims, random_hf_checkpoint, small_config,
                                  write_gguf)

from hf_reference import hf_forward
from oracle import DATA, gguf_path, logits, rel_l2, sequences

LIN, FULL = "linear_attention", "full_attention"
T_SEQ = 13

# (arch, id, small_config overrides, out_type, legacy_ssm_in)
VARIANTS = [
    ("qwen3next", "hk2-hv6-dk32-dv48-hd96-L5-trailing-linear",
     dict(linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=32,
          linear_value_head_dim=48, head_dim=96, num_hidden_layers=5,
          layer_types=[LIN, LIN, FULL, LIN, LIN], hidden_size=80, vocab_size=384,
          num_experts=5, num_experts_per_tok=2, moe_intermediate_size=24,
          shared_expert_intermediate_size=40), "f32", False),
    ("qwen3next", "hk1-hv4-hd32-interval2-tied-H65-kc3",
     dict(linear_num_key_heads=1, linear_num_value_heads=4, linear_key_head_dim=24,
          linear_value_head_dim=24, head_dim=32, partial_rotary_factor=0.5,
          num_hidden_layers=3, layer_types=None, full_attention_interval=2,
          tie_word_embeddings=True, hidden_size=65, vocab_size=300, num_experts=6,
          num_experts_per_tok=3, linear_conv_kernel_dim=3), "f32", False),
    ("qwen3next", "legacy-ssm_in-hk2-hv4-dk16-dv24",
     dict(linear_value_head_dim=24, hidden_size=72, vocab_size=320), "f32", True),
    ("qwen3next", "q8_0-hk3-hv3-f16-fallback",
     dict(linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=32,
          linear_value_head_dim=32, num_experts_per_tok=1, moe_intermediate_size=48,
          shared_expert_intermediate_size=64, vocab_size=352), "q8_0", False),
    ("qwen35", "hk2-hv6-dk32-dv48-hd96-L5-trailing-linear-tied",
     dict(linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=32,
          linear_value_head_dim=48, head_dim=96, num_hidden_layers=5,
          layer_types=[LIN, LIN, FULL, LIN, LIN], mrope_section=[5, 4, 3],
          tie_word_embeddings=True, hidden_size=80, intermediate_size=112,
          vocab_size=400), "f32", False),
    ("qwen35", "hk3-hv3-dk16-dv40-hd32-H75-nkv1",
     dict(linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=16,
          linear_value_head_dim=40, head_dim=32, partial_rotary_factor=0.5,
          num_attention_heads=2, num_key_value_heads=1, hidden_size=75,
          intermediate_size=100, vocab_size=333), "f32", False),
    ("qwen35", "hk1-hv4-interval3-L7-kc2",
     dict(linear_num_key_heads=1, linear_num_value_heads=4, num_hidden_layers=7,
          layer_types=None, full_attention_interval=3, linear_conv_kernel_dim=2,
          vocab_size=512), "f32", False),
    ("qwen35", "q8_0-hk2-hv6-dv32",
     dict(linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=32,
          linear_value_head_dim=32, vocab_size=320), "q8_0", False),
    ("qwen35moe", "hk2-hv6-dk32-dv48-hd96-E5-top2-L5",
     dict(linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=32,
          linear_value_head_dim=48, head_dim=96, num_hidden_layers=5,
          layer_types=[LIN, LIN, FULL, LIN, LIN], hidden_size=80, num_experts=5,
          num_experts_per_tok=2, moe_intermediate_size=24,
          shared_expert_intermediate_size=40, vocab_size=384), "f32", False),
    ("qwen35moe", "hk1-hv4-E8-top3-tied-interval2",
     dict(linear_num_key_heads=1, linear_num_value_heads=4, linear_key_head_dim=24,
          linear_value_head_dim=16, layer_types=None, full_attention_interval=2,
          num_experts=8, num_experts_per_tok=3, tie_word_embeddings=True,
          vocab_size=300), "f32", False),
    ("qwen35moe", "hk3-hv3-E3-top1-H96-hd64",
     dict(linear_num_key_heads=3, linear_num_value_heads=3, head_dim=64, hidden_size=96,
          num_experts=3, num_experts_per_tok=1, shared_expert_intermediate_size=16,
          vocab_size=320), "f32", False),
    ("qwen35moe", "bf16-hk2-hv6",
     dict(linear_num_key_heads=2, linear_num_value_heads=6, vocab_size=320), "bf16", False),
]


def converter_rounded(tensors: dict) -> dict:
    """The HF checkpoint as the converter's float32 arithmetic leaves it, in float64: the
    GGUF stores float32(1 + w) for the zero-centred norms and float32(-exp(A_log)). Feeding
    hf_forward w' = float32(1 + w) - 1 and A_log' = log(-float32(-exp(A_log))) (both exact
    or within 1 ulp in float64) makes it compute with exactly the values the engine reads,
    so float64 vs float64 can be held to 1e-10 instead of the ~1e-7 these roundings cost."""
    out = {}
    for name, x in tensors.items():
        x32 = np.asarray(x, dtype=np.float32)
        if name.endswith("A_log"):
            out[name] = np.log(np.exp(x32).astype(np.float64))
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            out[name] = (x32 + np.float32(1)).astype(np.float64) - 1.0
        else:
            out[name] = x32.astype(np.float64)
    return out


def as_stored(tensors: dict, out_type: str) -> dict:
    """HF tensors rounded the way write_gguf stores them: BF16, or Q8_0 per 32-value block
    of each row (F16 where a row is not whole blocks). Converter transforms only permute
    whole rows, or (ssm_out) whole value heads of the row, here multiples of 32, so
    rounding before or after them gives the same values. F32-forced tensors stay as is."""
    if out_type == "f32":
        return dict(tensors)
    out = {}
    for name, x in tensors.items():
        keep = (x.ndim < 2 or "norm" in name or
                name.endswith(("conv1d.weight", "mlp.gate.weight", "shared_expert_gate.weight")))
        if keep:
            out[name] = x
        elif out_type == "bf16":
            out[name] = dequantize(quantize(x, QT.BF16), QT.BF16)
        elif x.shape[-1] % 32:
            out[name] = x.astype(np.float16).astype(np.float32)
        else:
            out[name] = dequantize(quantize(x, QT.Q8_0), QT.Q8_0)
    return out


def _decode(model, ids, slot, start=0):
    pos = np.arange(start, start + len(ids))
    return model.decode(ids, pos, np.full(len(ids), slot), dtype=np.float64)


@pytest.mark.parametrize("seed,arch,overrides,out_type,legacy", [
    pytest.param(seed, arch, overrides, out_type, legacy, id=f"{arch}-{name}")
    for seed, (arch, name, overrides, out_type, legacy) in enumerate(VARIANTS)])
def test_engine_matches_hf_math(tmp_path, seed, arch, overrides, out_type, legacy):
    config = small_config(arch, **overrides)
    ckpt = random_hf_checkpoint(arch, config, seed=seed)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch, config, ckpt, out_type=out_type, legacy_ssm_in=legacy)

    model = numba_hybrid.load(path, device="reference", n_slots=3, n_ctx=64, precision="exact")
    a = model.args
    d = config_dims(arch, config)
    assert (a.ssm_k_heads, a.ssm_v_heads, a.ssm_k_dim, a.ssm_v_dim) == (d.nk, d.nv, d.dk, d.dv)
    assert (a.n_layer, a.head_dim, a.n_rot, a.n_embd) == (d.L, d.hd, d.n_rot, d.H)
    assert a.layer_kinds == tuple("recurrent" if t == LIN else "attention"
                                  for t in d.layer_types)
    names = set(model.file.tensors)
    assert ("blk.0.ssm_in.weight" in names) == legacy
    assert ("output.weight" in names) == (not d.tied)
    if out_type == "q8_0":
        types = {t.qtype for t in model.file.tensors.values()}
        # the qwen3next variant's expert FFN (48) is not whole Q8_0 blocks: F16 fallback
        assert QT.Q8_0 in types and (QT.F16 in types) == (arch == "qwen3next")

    ids = np.random.default_rng(7).integers(0, d.V, T_SEQ)
    ours = _decode(model, ids, slot=0)
    # GGUF stores rms_norm_eps as float32 (1e-6 -> 9.99999997e-07); the gated DeltaNet norm
    # (small mean(o^2)) turns that into ~1e-10 of the logits, so hand HF the same epsilon.
    config32 = dict(config, rms_norm_eps=float(np.float32(config["rms_norm_eps"])))
    ref = hf_forward(arch, config32, converter_rounded(as_stored(ckpt, out_type)), ids)
    assert ours.shape == ref.shape == (T_SEQ, d.V)
    rel = rel_l2(ours, ref)
    assert rel <= 1e-10, f"engine vs HF math: rel L2 {rel:.3e}"
    if out_type == "f32":   # the float32 roundings above are worth ~1e-7 at most
        raw = rel_l2(ours, hf_forward(arch, config, ckpt, ids))
        assert raw <= 1e-6, f"engine vs HF math on unrounded weights: rel L2 {raw:.3e}"

    # The same sequence in three chunks on another slot: prefill 5, one token, the rest.
    chunks = np.concatenate([_decode(model, ids[:5], slot=1),
                             _decode(model, ids[5:6], slot=1, start=5),
                             _decode(model, ids[6:], slot=1, start=6)])
    rel = rel_l2(chunks, ours)
    assert rel <= 1e-12, f"chunked decode (5+1+{T_SEQ - 6}) vs whole sequence: rel L2 {rel:.3e}"


def test_default_vocabulary_loads(tmp_path):
    config = small_config("qwen35", vocab_size=260, eos_token_id=None)
    write_gguf(tmp_path / "m.gguf", "qwen35", config, random_hf_checkpoint("qwen35", config, 1))
    tok = numba_hybrid.load(tmp_path / "m.gguf", n_slots=1, n_ctx=8).tokenizer
    assert tok.vocab_size == 260 and tok.eos_id == 259
    ids = tok.encode("héllo, wörld")
    assert max(ids) < 256 and tok.decode(ids) == "héllo, wörld"
    assert tok.encode("x   ") == [87, 256, 220]   # "ĠĠ" is the one merged token


def test_writer_rejects_bad_checkpoints(tmp_path):
    config = small_config("qwen3next")
    ckpt = random_hf_checkpoint("qwen3next", config, 0)
    path = tmp_path / "x.gguf"
    missing = dict(ckpt)
    del missing["model.layers.1.linear_attn.in_proj_ba.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.linear_attn\.in_proj_ba\.weight"):
        write_gguf(path, "qwen3next", config, missing)
    bad = dict(ckpt, **{"model.layers.3.self_attn.k_proj.weight": np.zeros((3, 64), np.float32)})
    with pytest.raises(ValueError, match=r"model\.layers\.3\.self_attn\.k_proj\.weight"):
        write_gguf(path, "qwen3next", config, bad)
    with pytest.raises(ValueError, match="unexpected tensor"):
        write_gguf(path, "qwen3next", config,
                   dict(ckpt, **{"model.extra.weight": ckpt["model.norm.weight"]}))
    with pytest.raises(ValueError, match="linear_num_key_heads"):
        write_gguf(path, "qwen3next", dict(config, linear_num_key_heads=None), ckpt)
    with pytest.raises(ValueError, match="legacy_ssm_in"):
        write_gguf(path, "qwen35", small_config("qwen35"),
                   random_hf_checkpoint("qwen35", small_config("qwen35"), 0), legacy_ssm_in=True)
    with pytest.raises(ValueError, match="out_type"):
        write_gguf(path, "qwen3next", config, ckpt, out_type="q4_k")


# ---- against llama.cpp's converter (the fixture GGUFs) -----------------------------------

FIXTURES = [("qwen35-tiny", "qwen35", "f32"), ("qwen3next-tiny", "qwen3next", "q8_0"),
            ("qwen35moe-tiny", "qwen35moe", "q8_0")]
# Informational keys whose values differ: the converter takes the name from the model
# directory ("Qwen35 Tiny"). Every other key must be present with the same type and value.
IGNORED_VALUES = {"general.name"}


def hf_checkpoint_from_gguf(path, arch: str, config: dict) -> dict:
    """Undo the converter: GGUF tensors (dequantised) -> HF names and layout, float64.
    Written independently of numba_hybrid.convert (plain index arithmetic)."""
    d = config_dims(arch, config)
    g = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64)
         for t in gguf.GGUFReader(path).tensors}
    r, kd = d.nv // d.nk, d.nk * d.dk
    # HF value head h = grp*r + j sits at GGUF position j*nk + grp (qwen35*), or h (qwen3next)
    h = np.arange(d.nv)
    pos = (h % r) * d.nk + h // r if arch != "qwen3next" else h

    def heads(x, size, axis=0):
        """HF-ordered value heads (``size`` rows or columns each) of a GGUF tensor."""
        return np.take(x, (pos[:, None] * size + np.arange(size)).ravel(), axis)

    out = {"model.embed_tokens.weight": g["token_embd.weight"],
           "model.norm.weight": g["output_norm.weight"] - 1.0}
    if "output.weight" in g:
        out["lm_head.weight"] = g["output.weight"]
    for i, kind in enumerate(d.layer_types):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = g[b + "attn_norm.weight"] - 1.0
        out[p + "post_attention_layernorm.weight"] = g[b + "post_attention_norm.weight"] - 1.0
        if kind == LIN:
            la = p + "linear_attn."
            qkv, gate = g[b + "attn_qkv.weight"], g[b + "attn_gate.weight"]
            conv = g[b + "ssm_conv1d.weight"]
            if arch == "qwen3next":
                groups = []
                for grp in range(d.nk):
                    vrows = slice(grp * r * d.dv, (grp + 1) * r * d.dv)
                    krows = slice(grp * d.dk, (grp + 1) * d.dk)
                    groups += [qkv[:kd][krows], qkv[kd:2 * kd][krows], qkv[2 * kd:][vrows],
                               gate[vrows]]
                out[la + "in_proj_qkvz.weight"] = np.concatenate(groups)
                out[la + "in_proj_ba.weight"] = g[b + "ssm_ba.weight"]
            else:
                out[la + "in_proj_qkv.weight"] = np.concatenate([qkv[:2 * kd],
                                                                 heads(qkv[2 * kd:], d.dv)])
                out[la + "in_proj_z.weight"] = heads(gate, d.dv)
                out[la + "in_proj_b.weight"] = heads(g[b + "ssm_beta.weight"], 1)
                out[la + "in_proj_a.weight"] = heads(g[b + "ssm_alpha.weight"], 1)
            conv = np.concatenate([conv[:2 * kd], heads(conv[2 * kd:], d.dv)])
            out[la + "conv1d.weight"] = conv[:, None, :]
            out[la + "dt_bias"] = heads(g[b + "ssm_dt.bias"], 1)
            out[la + "A_log"] = np.log(-heads(g[b + "ssm_a"], 1))
            out[la + "norm.weight"] = g[b + "ssm_norm.weight"]
            out[la + "out_proj.weight"] = heads(g[b + "ssm_out.weight"], d.dv, axis=1)
        else:
            sa = p + "self_attn."
            for hf, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                             ("o_proj", "attn_output")):
                out[f"{sa}{hf}.weight"] = g[f"{b}{name}.weight"]
            out[sa + "q_norm.weight"] = g[b + "attn_q_norm.weight"] - 1.0
            out[sa + "k_norm.weight"] = g[b + "attn_k_norm.weight"] - 1.0
        m = p + "mlp."
        for proj in ("gate", "up", "down"):
            if not d.moe:
                out[f"{m}{proj}_proj.weight"] = g[f"{b}ffn_{proj}.weight"]
                continue
            for e in range(d.E):
                out[f"{m}experts.{e}.{proj}_proj.weight"] = g[f"{b}ffn_{proj}_exps.weight"][e]
            out[f"{m}shared_expert.{proj}_proj.weight"] = g[f"{b}ffn_{proj}_shexp.weight"]
        if d.moe:
            out[m + "gate.weight"] = g[b + "ffn_gate_inp.weight"]
            shexp_gate = g[b + "ffn_gate_inp_shexp.weight"]
            out[m + "shared_expert_gate.weight"] = shexp_gate.reshape(1, d.H)
    return out


def _fixture(model, wtype):
    config = json.loads((DATA / f"{model}-hf_config.json").read_text())
    return config, gguf.GGUFReader(gguf_path(model, wtype))


def _tokenizer_of(reader) -> dict:
    f = lambda key: reader.fields[key].contents()  # noqa: E731
    return {"tokens": f("tokenizer.ggml.tokens"), "token_types": f("tokenizer.ggml.token_type"),
            "merges": f("tokenizer.ggml.merges"), "pre": f("tokenizer.ggml.pre"),
            "eos_id": f("tokenizer.ggml.eos_token_id"), "bos_id": f("tokenizer.ggml.bos_token_id"),
            "pad_id": f("tokenizer.ggml.padding_token_id"),
            "chat_template": f("tokenizer.chat_template")}


@pytest.mark.parametrize("model,arch,wtype", FIXTURES, ids=[f"{m}-{w}" for m, _, w in FIXTURES])
def test_writer_matches_llama_cpp_converter(tmp_path, model, arch, wtype):
    """Random weights with the fixture's config -> same metadata keys (types, values but
    general.name, order), tensor names, order, shapes (ne) and ggml types as the fixture."""
    config, ref = _fixture(model, wtype)
    path = tmp_path / "ours.gguf"
    write_gguf(path, arch, config, random_hf_checkpoint(arch, config, 0), _tokenizer_of(ref),
               out_type=wtype, name="ours")
    ours = gguf.GGUFReader(path)
    assert list(ours.fields) == list(ref.fields), "metadata keys (or their order) differ"
    for key, field in ref.fields.items():
        mine = ours.fields[key]
        assert mine.types == field.types, key
        if key not in IGNORED_VALUES and not key.startswith("GGUF."):
            assert mine.contents() == field.contents(), key
    def layout(reader):
        return [(t.name, [int(n) for n in t.shape], t.tensor_type.name) for t in reader.tensors]

    assert layout(ours) == layout(ref)


@pytest.mark.parametrize("model,arch,wtype", FIXTURES, ids=[f"{m}-{w}" for m, _, w in FIXTURES])
def test_fixture_roundtrip(tmp_path, model, arch, wtype):
    """The fixture mapped back to HF weights (1) gives transformers' / llama.cpp's logits
    through hf_forward, which validates hf_reference and the inverse mapping, and (2) goes
    through write_gguf to the fixture's tensors again: bit-identical, except the float32
    ``+1`` norms and ``-exp`` of ssm_a (rounding of the undo/redo, <= 1 ulp)."""
    config, ref = _fixture(model, wtype)
    hf = hf_checkpoint_from_gguf(gguf_path(model, wtype), arch, config)
    ids = sequences(model)["s7"]
    # f32: the exact HF float64 run; quantized: llama.cpp float32 math on the same dequantised
    # weights (README: float64 vs these agrees to ~1e-6).
    target = logits(model, "hf_f64_s7" if wtype == "f32" else f"llama_{wtype}_deq_s7")
    rel = rel_l2(hf_forward(arch, config, hf, ids), target)
    assert rel <= (1e-6 if wtype == "f32" else 1e-5), f"hf_forward vs {model} reference: {rel:.3e}"

    path = tmp_path / "again.gguf"
    write_gguf(path, arch, config, {k: v.astype(np.float32) for k, v in hf.items()},
               _tokenizer_of(ref), out_type=wtype)
    again = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for t in ref.tensors:
        mine = again[t.name]
        assert mine.tensor_type == t.tensor_type, t.name
        if t.name.endswith(("_norm.weight", "ssm_a")):
            np.testing.assert_allclose(mine.data, t.data, rtol=2.5e-7, atol=0, err_msg=t.name)
        else:
            assert np.array_equal(mine.data, t.data), f"{t.name} differs from the converter's"
