"""``numba-hybrid info``: describe a GGUF model (hyper-parameters, layer plan, tensor types,
unused tensors, memory for a context and slots, tokenizer) without running it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .common import (_model_path, _non_negative_int, _positive_int, _table, add_model_argument,
                     human_bytes, naming_file)


# ---- the layer plan ------------------------------------------------------------------------

def layer_ranges(kinds: tuple[str, ...]) -> str:
    """('recurrent',)*3 + ('attention',) -> '0-2 recurrent, 3 attention'."""
    parts, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            parts.append(f"{span} {kinds[start]}")
            start = i
    return ", ".join(parts)


def layer_letters(kinds: tuple[str, ...], group: int = 4) -> str:
    """One letter per layer (R recurrent, A attention), in groups: 'RRRA RRRA'."""
    letters = "".join(k[0].upper() for k in kinds)
    return " ".join(letters[i:i + group] for i in range(0, len(letters), group))


# ---- sizes ---------------------------------------------------------------------------------

def state_sizes(args, n_slots: int, n_ctx: int) -> dict[str, int]:
    """Bytes of the StatePool for ``n_slots`` x ``n_ctx``, computed from ModelArgs (nothing
    is allocated). Recurrent state (conv + ssm) is float32 and does not grow with n_ctx;
    the KV cache is given for float32 and float16 entries."""
    f32, f16 = 4, 2
    n_rec, n_att = len(args.recurrent_layers), len(args.attention_layers)
    conv = (args.ssm_conv_kernel - 1) * args.conv_channels * f32
    ssm = args.ssm_v_heads * args.ssm_v_dim * args.ssm_k_dim * f32
    kv_token_elems = n_att * 2 * args.n_head_kv * args.head_dim  # K and V, all layers
    return {
        "n_slots": n_slots,
        "n_ctx": n_ctx,
        "conv_per_slot": n_rec * conv,
        "ssm_per_slot": n_rec * ssm,
        "recurrent_per_slot": n_rec * (conv + ssm),
        "recurrent": n_slots * n_rec * (conv + ssm),
        "kv_per_token_f32": kv_token_elems * f32,
        "kv_per_token_f16": kv_token_elems * f16,
        "kv_f32": n_slots * n_ctx * kv_token_elems * f32,
        "kv_f16": n_slots * n_ctx * kv_token_elems * f16,
    }


# ---- info ----------------------------------------------------------------------------------

# A few words for each ModelArgs field (fields without one are still printed).
_ARG_NOTES = {
    "arch": "GGUF architecture",
    "n_layer": "trunk blocks",
    "n_mtp": "MTP blocks stored after the trunk (not run)",
    "n_embd": "hidden size H",
    "n_vocab": "vocabulary V (rows of token_embd)",
    "n_ctx_train": "training context",
    "rms_eps": "RMSNorm epsilon",
    "n_head": "attention heads",
    "n_head_kv": "attention KV heads",
    "head_dim": "attention head dim",
    "n_rot": "rotary dims per head",
    "rope_theta": "RoPE base",
    "rope_sections": "M-RoPE sections",
    "ssm_conv_kernel": "DeltaNet causal conv kernel Kc",
    "ssm_k_heads": "DeltaNet key heads Hk",
    "ssm_v_heads": "DeltaNet value heads Hv",
    "ssm_k_dim": "DeltaNet key head dim Dk",
    "ssm_v_dim": "DeltaNet value head dim Dv",
    "v_head_order": "value-head order in the file",
    "ffn_kind": "feed-forward kind",
    "n_ff": "dense FFN width",
    "n_expert": "experts",
    "n_expert_used": "experts per token",
    "n_ff_exp": "expert FFN width",
    "n_ff_shexp": "shared expert FFN width (0: none)",
    "layer_kinds": "per layer: recurrent or attention",
}


def model_facts(path: str, n_ctx: int, n_slots: int) -> dict:
    """Everything ``info`` prints, as plain data. Reads the file, checks the weights
    against the hyper-parameters and builds the tokenizer; allocates no state and picks
    no backend, so it works for models this machine could not run."""
    from ..gguf_file import GGUFFile
    from ..models import read_model
    from ..tokenizer import Tokenizer

    f = GGUFFile(path)
    weights = read_model(f)
    tok = Tokenizer.from_gguf(f)
    a = weights.args
    if n_ctx == 0:
        n_ctx = a.n_ctx_train

    types: dict[str, dict[str, int]] = {}
    for t in f.tensors.values():
        entry = types.setdefault(t.qtype.name, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += t.n_bytes
    weight_bytes = sum(t.n_bytes for t in f.tensors.values())
    state = state_sizes(a, n_slots, n_ctx)

    hparams = {}
    for field in dataclasses.fields(a):
        value = getattr(a, field.name)
        hparams[field.name] = list(value) if isinstance(value, tuple) else value
    hparams["conv_channels"] = a.conv_channels

    def piece(i):
        return None if i is None else tok.token_to_piece(i).decode("utf-8", "replace")

    return {
        "file": {
            "path": os.path.abspath(path),
            "size": f.file_size,
            "gguf_version": _gguf_version(path),
            "n_tensors": len(f.tensors),
            "n_metadata": len(f.metadata),
            "name": f.get("general.name"),
            "file_type": _file_type_name(f.get("general.file_type")),
        },
        "architecture": a.arch,
        "hyper_parameters": hparams,
        "layers": {
            "plan": layer_ranges(a.layer_kinds),
            "compact": layer_letters(a.layer_kinds),
            "recurrent": list(a.recurrent_layers),
            "attention": list(a.attention_layers),
        },
        "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1]["bytes"])),
        "weight_bytes": weight_bytes,
        "unused_tensors": list(weights.unused),
        "memory": {
            "weights": weight_bytes,
            **state,
            "total_f32_kv": weight_bytes + state["recurrent"] + state["kv_f32"],
            "total_f16_kv": weight_bytes + state["recurrent"] + state["kv_f16"],
        },
        "tokenizer": {
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "eos": piece(tok.eos_id),
            "bos_id": tok.bos_id,
            "bos": piece(tok.bos_id),
            "add_bos": tok.add_bos,
            "eog_ids": sorted(tok.eog_ids),
            "chat_template": bool(tok.chat_template),
            "chat_template_chars": len(tok.chat_template or ""),
        },
    }


def _file_type_name(value) -> str | None:
    """general.file_type as llama.cpp names it (MOSTLY_Q4_K_M ...), if it is known."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(value)).name
    except (TypeError, ValueError):
        return None if value is None else str(value)


def _gguf_version(path: str) -> int:
    """The version field of the header (GGUFFile has already validated it)."""
    with open(path, "rb") as fh:
        return int.from_bytes(fh.read(8)[4:], "little")


def format_info(facts: dict) -> str:
    """The human-readable report of :func:`model_facts`."""
    fi, hp, ly, mem, tk = (facts[k] for k in ("file", "hyper_parameters", "layers", "memory",
                                              "tokenizer"))
    lines = [
        f"file:          {fi['path']}",
        f"               {human_bytes(fi['size'])}, GGUF v{fi['gguf_version']}, "
        f"{fi['n_tensors']} tensors, {fi['n_metadata']} metadata keys"
        + (f", file type {fi['file_type']}" if fi["file_type"] else ""),
    ]
    if fi["name"]:
        lines.append(f"name:          {fi['name']}")
    lines += [f"architecture:  {facts['architecture']}", "", "hyper-parameters:"]
    width = max(len(k) for k in hp)
    for key, value in hp.items():
        if key == "layer_kinds":
            continue  # the layer plan below says it better
        note = _ARG_NOTES.get(key, "derived: 2*Hk*Dk + Hv*Dv" if key == "conv_channels" else "")
        shown = (", ".join(map(str, value)) or "none") if isinstance(value, list) else value
        if isinstance(value, float):
            shown = f"{value:g}"
        lines.append(f"  {key.ljust(width)}  {str(shown):<12}  {note}".rstrip())
    lines += [
        "",
        f"layers:        {ly['plan']}",
        f"               {ly['compact']}",
        f"               {len(ly['recurrent'])} recurrent (Gated DeltaNet), "
        f"{len(ly['attention'])} attention",
        "",
        "tensor types:",
    ]
    total = facts["weight_bytes"] or 1
    rows = [(name, t["count"], human_bytes(t["bytes"]), f"{100 * t['bytes'] / total:.1f}%")
            for name, t in facts["tensor_types"].items()]
    rows.append(("total", fi["n_tensors"], human_bytes(facts["weight_bytes"]), "100.0%"))
    lines += _table(rows, ("type", "tensors", "bytes", "share"))
    unused = facts["unused_tensors"]
    lines += ["", f"unused tensors: {len(unused)}" + (":" if unused else " (all are used)")]
    lines += [f"  {name}" for name in unused]
    lines += [
        "",
        f"memory for n_ctx {mem['n_ctx']} x {mem['n_slots']} slot(s):",
        *_table([
            ("weights (mapped from the file)", human_bytes(mem["weights"]), ""),
            ("recurrent state per slot, f32", human_bytes(mem["recurrent_per_slot"]),
             f"conv {human_bytes(mem['conv_per_slot'])} + ssm "
             f"{human_bytes(mem['ssm_per_slot'])}"),
            (f"recurrent state, {mem['n_slots']} slot(s)", human_bytes(mem["recurrent"]), ""),
            ("KV cache, f32", human_bytes(mem["kv_f32"]),
             f"{human_bytes(mem['kv_per_token_f32'])} per token"),
            ("KV cache, f16", human_bytes(mem["kv_f16"]),
             f"{human_bytes(mem['kv_per_token_f16'])} per token"),
            ("total with the f32 KV cache", human_bytes(mem["total_f32_kv"]), ""),
            ("total with the f16 KV cache", human_bytes(mem["total_f16_kv"]), ""),
        ], left=(0, 2)),
        "",
        "tokenizer:",
        f"  vocabulary     {tk['vocab_size']} tokens",
        f"  eos            {tk['eos_id']} {tk['eos']!r}",
        "  bos            " + ("none" if tk["bos_id"] is None else
                                f"{tk['bos_id']} {tk['bos']!r}, "
                                f"{'added' if tk['add_bos'] else 'not added'} to prompts"),
        f"  end of gen.    {', '.join(map(str, tk['eog_ids']))}",
        "  chat template  " + (f"yes ({tk['chat_template_chars']} characters)"
                                if tk["chat_template"] else "no"),
    ]
    return "\n".join(lines) + "\n"


def _info_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, required=False)
    p.add_argument("-c", "--ctx-size", type=_non_negative_int, default=4096, metavar="N_CTX",
                   help="context length (positions per sequence) to size the KV cache for; "
                        "0 uses the model's training context (default: %(default)s)")
    p.add_argument("-np", "--parallel", type=_positive_int, default=4, metavar="N_SLOTS",
                   help="number of sequence slots (parallel sequences) to size the state "
                        "for (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print the same facts as one JSON object instead of a report")


def cmd_info(args: argparse.Namespace) -> int:
    from . import model_facts  # on the package, at call time: see numba_hybrid.cli

    args.model = _model_path(args)
    with naming_file(args.model):
        facts = model_facts(args.model, args.ctx_size, args.parallel)
    if args.json:
        json.dump(facts, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_info(facts))
    return 0
