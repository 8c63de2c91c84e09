"""The ``numba-hybrid`` command line (also ``python -m numba_hybrid``).

Each subcommand is a :class:`Command` in :data:`COMMANDS`: a function that adds its
options to an argparse subparser and a function that runs it and returns the exit code.
Adding a command (``serve``, say) means writing those two functions and appending one entry.
The commands that run a model (``run``, ``perplexity``, ``parallel``, ``bench``) compute
through :mod:`numba_hybrid.engine`; this module only parses, loads and prints.

Exit codes: 0 success; 1 ``parallel`` found a difference; 2 bad input (any
NumbaHybridError, an OSError on a user's file, or a usage error from argparse), printed as
ONE line ``numba-hybrid: error: <message>`` on stderr, with the traceback only under
``--verbose``; 130 on Ctrl-C; 141 when the reader of the output goes away (``| head``).
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from .errors import NumbaHybridError

PROG = "numba-hybrid"
EXIT_USAGE = 2       # bad input, as argparse uses for usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of our output went away (`| head`)


@dataclass(frozen=True)
class Command:
    name: str
    help: str                                              # one line, in the command list
    description: str                                       # the subcommand's --help text
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- formatting helpers ------------------------------------------------------------------------

def human_bytes(n: int | float) -> str:
    """1536 -> '1.50 KiB' (binary units; bytes below 1 KiB are written exactly)."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


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


def _table(rows: list[tuple], header: tuple | None = None, indent: str = "  ",
           left: tuple[int, ...] = (0,)) -> list[str]:
    """Rows of cells under an optional header; columns in ``left`` are left-aligned,
    the others right-aligned."""
    cells = ([tuple(map(str, header))] if header else []) + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return [indent + "  ".join(c.ljust(w) if i in left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in cells]


# ---- sizes -------------------------------------------------------------------------------------

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


# ---- info ------------------------------------------------------------------------------------

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
    from .gguf_file import GGUFFile
    from .models import read_model
    from .tokenizer import Tokenizer

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
        f"  chat template  " + (f"yes ({tk['chat_template_chars']} characters)"
                                if tk["chat_template"] else "no"),
    ]
    return "\n".join(lines) + "\n"


def _info_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("-c", "--ctx-size", type=_non_negative_int, default=4096, metavar="N_CTX",
                   help="context length (positions per sequence) to size the KV cache for; "
                        "0 uses the model's training context (default: %(default)s)")
    p.add_argument("-np", "--parallel", type=_positive_int, default=4, metavar="N_SLOTS",
                   help="number of sequence slots (parallel sequences) to size the state "
                        "for (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print the same facts as one JSON object instead of a report")


def cmd_info(args: argparse.Namespace) -> int:
    with naming_file(args.model):
        facts = model_facts(args.model, args.ctx_size, args.parallel)
    if args.json:
        json.dump(facts, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_info(facts))
    return 0


# ---- shared by the commands that run a model -----------------------------------------------

class Progress:
    """A tqdm bar on stderr when stderr is a terminal (and tqdm is installed); ``write``
    prints around it without breaking it."""

    def __init__(self, total: int, desc: str, unit: str = "it"):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = (tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None,
                         leave=False, dynamic_ncols=True) if tqdm else None)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None and not self.bar.disable:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def write(self, text: str, file=None) -> None:
        file = file or sys.stdout
        active = self.bar is not None and not self.bar.disable
        if active:
            self.bar.clear()
        file.write(text)
        file.flush()
        if active:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _add_runtime_arguments(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    from .backend import DEVICES, PRECISIONS

    add_model_argument(p, required=model_required)
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="compute backend: 'cpu' (Numba kernels; the first run compiles them, "
                        "then they are cached on disk) or 'reference' (float64 NumPy, slow; "
                        "for checking) (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="exact",
                   help="'exact' keeps activations in float32; 'fast' rounds them to 8-bit "
                        "blocks before quantized products, as ggml does (default: "
                        "%(default)s)")
    p.add_argument("-t", "--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for the kernels, 1 .. the machine's cores (default: all)")


def _check_threads(n: int | None) -> None:
    if n is None:
        return
    import numba

    top = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= top:
        raise NumbaHybridError(f"-t {n}: this machine runs at most {top} threads")


def _model_path(args: argparse.Namespace) -> str:
    """The -m file, or the bundled default model (a clear error if it is not installed)."""
    if args.model is not None:
        return args.model
    from .default_model import default_model_path

    return str(default_model_path())


def _training_ctx(path: str) -> int:
    from .gguf_file import GGUFFile
    from .models import read_model

    return read_model(GGUFFile(path)).args.n_ctx_train


def _load(args: argparse.Namespace, n_slots: int, n_ctx: int):
    from .model import load

    _check_threads(args.threads)
    path = _model_path(args)
    with naming_file(path):
        return load(path, device=args.device, n_slots=n_slots, n_ctx=n_ctx,
                    precision=args.precision, threads=args.threads)


def _read_text(path: str, what: str = "text file") -> str:
    """A user's UTF-8 text file; a clear error when it is missing, not text, or empty."""
    with open(path, "rb") as fh:  # a missing file: OSError, reported as "path: reason"
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NumbaHybridError(f"{path}: the {what} is not UTF-8 text (byte {exc.start})") \
            from None
    if not text.strip():
        raise NumbaHybridError(f"{path}: the {what} is empty")
    return text


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: "
                                         f"{text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("the list is empty")
    return values


def _depth_list(text: str) -> list[int]:
    values = _int_list(text)
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"depths must be 0 or more, got {min(values)}")
    return values


def _positive_list(text: str) -> list[int]:
    values = _int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"values must be at least 1, got {min(values)}")
    return values


def _n_predict(text: str) -> int:
    value = _int(text)
    if value < 1 and value != -1:
        raise argparse.ArgumentTypeError(f"must be at least 1, or -1 for no limit, got {value}")
    return value


def _seed(text: str) -> int:
    value = _int(text)
    if value < -1 or value >= 2**64:
        raise argparse.ArgumentTypeError(f"must be -1 (random) or 0 .. 2^64-1, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _batch_budget(args: argparse.Namespace) -> int:
    """Tokens per model step: -ub, capped at -b (as llama.cpp caps n_ubatch)."""
    return min(args.ubatch_size, args.batch_size)


def _add_batch_arguments(p: argparse.ArgumentParser, ubatch: int, what: str) -> None:
    p.add_argument("-b", "--batch-size", type=_positive_int, default=2048, metavar="N",
                   help="logical batch size; caps -ub (default: %(default)s)")
    p.add_argument("-ub", "--ubatch-size", type=_positive_int, default=ubatch, metavar="N",
                   help=f"physical batch size: the most tokens in one model step; {what} "
                        f"(default: %(default)s)")


# ---- run -----------------------------------------------------------------------------------

def _run_arguments(p: argparse.ArgumentParser) -> None:
    _add_runtime_arguments(p)
    p.add_argument("-p", "--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt to continue; repeat -p to run several prompts concurrently, "
                        "each on its own slot")
    p.add_argument("-f", "--file", action="append", default=[], metavar="FILE",
                   help="read a prompt from a UTF-8 text file (repeatable; after the -p "
                        "prompts)")
    p.add_argument("-n", "--n-predict", type=_n_predict, default=256, metavar="N",
                   help="most tokens to generate per prompt; -1: until an end-of-generation "
                        "token or a full context (default: %(default)s)")
    p.add_argument("-c", "--ctx-size", type=_non_negative_int, default=4096, metavar="N",
                   help="context length per sequence, prompt included; 0: the model's "
                        "training context (default: %(default)s)")
    p.add_argument("-np", "--parallel", type=_positive_int, default=None, metavar="N",
                   help="sequence slots; with more prompts than slots the rest wait for a "
                        "free one (default: one per prompt)")
    _add_batch_arguments(p, 512, "long prompts are processed in chunks of this size, "
                                 "alongside the other sequences' generation")
    g = p.add_argument_group("sampling (llama.cpp's order: penalties, top-k, top-p, min-p, "
                             "temperature)")
    g.add_argument("--temp", type=_float, default=0.8, metavar="T",
                   help="temperature; 0 = greedy, always the most likely token "
                        "(default: %(default)s)")
    g.add_argument("--top-k", type=_non_negative_int, default=40, metavar="K",
                   help="sample among the K most likely tokens; 0 = all (default: %(default)s)")
    g.add_argument("--top-p", type=_float, default=0.95, metavar="P",
                   help="sample among the most likely tokens whose probabilities sum to P; "
                        "1 = all (default: %(default)s)")
    g.add_argument("--min-p", type=_float, default=0.05, metavar="P",
                   help="drop tokens less likely than P times the most likely one; 0 = none "
                        "(default: %(default)s)")
    g.add_argument("--repeat-penalty", type=_float, default=1.0, metavar="X",
                   help="penalize tokens seen in the last --repeat-last-n; 1 = off "
                        "(default: %(default)s)")
    g.add_argument("--repeat-last-n", type=_int, default=64, metavar="N",
                   help="how many recent tokens the penalties look at; 0 = off, -1 = all "
                        "(default: %(default)s)")
    g.add_argument("--presence-penalty", type=_float, default=0.0, metavar="X",
                   help="subtracted from the logit of every recent token; 0 = off "
                        "(default: %(default)s)")
    g.add_argument("--frequency-penalty", type=_float, default=0.0, metavar="X",
                   help="subtracted per occurrence of a recent token; 0 = off "
                        "(default: %(default)s)")
    g.add_argument("-s", "--seed", type=_seed, default=-1, metavar="SEED",
                   help="random seed: each prompt samples from its own generator seeded "
                        "with it, so a prompt gives the same text alone or beside others; -1 "
                        "= a fresh seed per prompt, printed at the end (default: %(default)s)")
    g = p.add_argument_group("stopping and chat")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (not printed); repeatable")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past end-of-generation tokens")
    g.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the model's chat "
                        "template and print the assistant's reply")
    g.add_argument("-sys", "--system-prompt", default=None, metavar="TEXT",
                   help="with --chat: a system message before the user's")


def _sampling_params(args: argparse.Namespace):
    from .engine import SamplingParams

    return SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=None if args.seed == -1 else args.seed)


def cmd_run(args: argparse.Namespace) -> int:
    from .engine import Engine, StopCriteria
    from .engine.engine import render_chat

    prompts = list(args.prompt) + [_read_text(f, "prompt file") for f in args.file]
    if not prompts:
        raise NumbaHybridError("no prompt: give one with -p TEXT (or -f FILE)")
    if args.system_prompt is not None and not args.chat:
        raise NumbaHybridError("--system-prompt only applies with --chat")
    sampling = _sampling_params(args)
    criteria = StopCriteria(None if args.n_predict == -1 else args.n_predict,
                            tuple(args.stop), args.ignore_eos)
    n_ctx = args.ctx_size or _training_ctx(_model_path(args))
    # More slots than prompts would only take memory.
    model = _load(args, min(args.parallel or len(prompts), len(prompts)), n_ctx)
    tok = model.tokenizer

    def ids_of(text: str) -> list[int]:
        if not args.chat:
            return tok.encode(text, add_special=True)
        system = ([{"role": "system", "content": args.system_prompt}]
                  if args.system_prompt is not None else [])
        return render_chat(tok, system + [{"role": "user", "content": text}])

    engine = Engine(model, _batch_budget(args))
    for i, text in enumerate(prompts):
        ids = ids_of(text)
        if not ids:
            raise NumbaHybridError(f"prompt {i} is empty")
        if len(ids) >= model.n_ctx:
            raise NumbaHybridError(
                f"prompt {i} has {len(ids)} tokens, longer than the context allows "
                f"(-c {model.n_ctx} leaves room for {model.n_ctx - 1} prompt tokens); raise -c "
                f"or shorten the prompt")
        engine.add(ids, sampling, criteria, index=i)

    out = sys.stdout
    single = len(prompts) == 1
    shown: set[int] = set()

    def show(seq) -> None:
        shown.add(seq.index)
        note = "" if seq.finish_reason != "interrupted" else " [interrupted]"
        out.write(f"[{seq.index}] {seq.text}{note}\n")
        out.flush()

    t0 = time.perf_counter()
    try:
        for ev in engine.events():
            if single:
                if ev.text:
                    out.write(ev.text)
                    out.flush()
            elif ev.finished:
                show(ev.seq)
        if single:
            out.write("\n")
    except KeyboardInterrupt:
        engine.abort()
        if single:
            out.write(engine.sequences[0].take_text() + "\n")
        else:
            for seq in engine.sequences:
                if seq.index not in shown:
                    show(seq)
        out.flush()
        _report_run(engine, time.perf_counter() - t0)
        raise
    _report_run(engine, time.perf_counter() - t0)
    return 0


def _report_run(engine, seconds: float) -> None:
    """One line on stderr: tokens, time, why the sequences stopped, their seeds."""
    seqs = engine.sequences
    n_gen = sum(len(s.output) for s in seqs)
    reasons = ", ".join(sorted({s.finish_reason or "unfinished" for s in seqs}))
    speed = f", {n_gen / seconds:.1f} generated tokens/s" if seconds > 0 else ""
    seeds = sorted({s.seed for s in seqs if s.seed is not None})
    seeds_text = (f"; seed {seeds[0]}" if len(seeds) == 1 else
                  f"; seeds {', '.join(str(s.seed) for s in seqs)}" if seeds else "")
    print(f"{PROG}: {engine.stats.n_prompt_tokens} prompt + {n_gen} generated tokens in "
          f"{seconds:.2f} s{speed}; stopped by: {reasons}{seeds_text}", file=sys.stderr)


# ---- perplexity ----------------------------------------------------------------------------

def _perplexity_arguments(p: argparse.ArgumentParser) -> None:
    _add_runtime_arguments(p)
    p.add_argument("-f", "--file", required=True, metavar="TEXT_FILE",
                   help="UTF-8 text to score (e.g. wiki.test.raw)")
    p.add_argument("-c", "--ctx-size", type=_positive_int, default=512, metavar="N",
                   help="chunk length in tokens; the second half of each chunk is scored "
                        "(default: %(default)s)")
    _add_batch_arguments(p, 512, "-ub / -c chunks run as parallel sequences in one batch "
                                 "(below -c, each chunk is fed in pieces)")
    p.add_argument("--chunks", type=_n_predict, default=-1, metavar="N",
                   help="score at most N chunks; -1 = all (default: %(default)s)")


def cmd_perplexity(args: argparse.Namespace) -> int:
    from .engine.perplexity import perplexity, plan_perplexity

    text = _read_text(args.file)
    c = args.ctx_size
    model = _load(args, max(1, _batch_budget(args) // c), c)
    tokens = model.tokenizer.encode(text, add_special=True)
    try:
        n_chunk, n_seq, ub = plan_perplexity(len(tokens), c, args.batch_size, args.ubatch_size,
                                             args.chunks)
    except NumbaHybridError as exc:
        raise NumbaHybridError(f"{args.file}: {exc}") from None
    first = c // 2
    print(f"{PROG}: perplexity over {n_chunk} chunks of {c} tokens ({len(tokens)} in the "
          f"file), scoring the last {c - 1 - first} of each, {n_seq} chunk(s) per batch "
          f"of at most {ub} tokens", file=sys.stderr)
    bar = Progress(n_chunk, "perplexity", unit="chunk")

    def on_chunk(i: int, ppl: float) -> None:
        bar.write(f"[{i}]{ppl:.4f},")
        bar.update(1, ppl=f"{ppl:.4f}")

    try:
        result = perplexity(model, tokens, c, args.batch_size, args.ubatch_size, args.chunks,
                            on_chunk=on_chunk)
    finally:
        bar.close()
    sys.stdout.write("\n")
    print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}")
    return 0


# ---- parallel ------------------------------------------------------------------------------

def _parallel_arguments(p: argparse.ArgumentParser) -> None:
    _add_runtime_arguments(p)
    p.add_argument("-np", "--parallel", type=_positive_int, default=4, metavar="N",
                   help="number of sequences decoded at once (default: %(default)s)")
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="UTF-8 file with one prompt per line (blank lines skipped); the "
                        "first N are used (default: built-in varied prompts)")
    p.add_argument("-n", "--n-predict", type=_positive_int, default=32, metavar="N",
                   help="tokens to generate per sequence, greedily, ignoring end-of-"
                        "generation tokens (default: %(default)s)")
    p.add_argument("-b", "--batch-size", type=_positive_int, default=32, metavar="N",
                   help="most tokens per step of the concurrent run; small, so prompts are "
                        "split into chunks that share batches with other sequences' "
                        "decoding (default: %(default)s)")


def cmd_parallel(args: argparse.Namespace) -> int:
    from .engine.parallel import builtin_prompts, parallel_check

    n = args.parallel
    if args.prompts is not None:
        prompts = [line for line in _read_text(args.prompts, "prompts file").splitlines()
                   if line.strip()]
        if len(prompts) < n:
            raise NumbaHybridError(f"{args.prompts}: {len(prompts)} prompt(s); -np {n} needs "
                                   f"{n}, one per line")
        prompts = prompts[:n]
    else:
        prompts = builtin_prompts(n)
    # Byte-level BPE: a prompt has at most one token per byte, plus BOS. Sizing the context
    # from that bound lets a state too large for this machine fail before any tokenizing.
    longest = max(len(p.encode("utf-8")) for p in prompts) + 1
    model = _load(args, n, longest + args.n_predict)
    ids = [model.tokenizer.encode(p, add_special=True) for p in prompts]
    print(f"{PROG}: {n} sequence(s), {args.n_predict} greedy tokens each: alone, then "
          f"together ({model.device} backend)", file=sys.stderr)
    bar = Progress(n, "alone", unit="seq")
    try:
        report = parallel_check(model, ids, args.n_predict, args.batch_size,
                                on_progress=bar.update)
    finally:
        bar.close()
    rows = [(r.index, r.n_prompt, f"{r.n_alone}/{r.n_together}",
             "yes" if r.same_tokens else "NO",
             "-" if r.first_diff is None else r.first_diff, f"{r.max_abs_diff:.3g}",
             "OK" if r.ok else "FAIL") for r in report.rows]
    print("\n".join(_table(rows, ("seq", "prompt tokens", "generated alone/together",
                                  "same tokens", "first differing step", "max |diff|",
                                  "result"), left=())))
    bad = [r.index for r in report.rows if not r.ok]
    if bad:
        print(f"FAIL: {len(bad)} of {n} sequences differ when decoded together "
              f"(sequences {', '.join(map(str, bad))})")
        return 1
    print(f"OK: all {n} sequences decode to bitwise identical tokens and logits alone and "
          f"together")
    return 0


# ---- bench ---------------------------------------------------------------------------------

def _bench_arguments(p: argparse.ArgumentParser) -> None:
    _add_runtime_arguments(p)
    p.add_argument("--depths", type=_depth_list, default=[0, 512, 2048], metavar="D,D,...",
                   help="context depths at which to time prompt processing and generation "
                        "(default: 0,512,2048)")
    p.add_argument("-np", "--parallel", type=_positive_list, default=[1, 2, 4, 8],
                   metavar="N,N,...",
                   help="numbers of parallel sequences for the aggregate generation speed "
                        "(default: 1,2,4,8)")
    p.add_argument("-ub", "--ubatch-size", type=_positive_int, default=512, metavar="N",
                   help="prompt tokens processed in one timed step at each depth "
                        "(default: %(default)s)")
    p.add_argument("-n", "--n-gen", type=_positive_int, default=32, metavar="N",
                   help="tokens generated per timing (default: %(default)s)")
    p.add_argument("-npp", "--n-prompt", type=_positive_int, default=32, metavar="N",
                   help="prompt tokens of each parallel sequence before its generation is "
                        "timed (default: %(default)s)")
    p.add_argument("-r", "--repetitions", type=_positive_int, default=3, metavar="N",
                   help="repeat each timing N times; the table shows mean and standard "
                        "deviation (default: %(default)s)")
    p.add_argument("--plot", metavar="OUT.png", default=None,
                   help="also draw the results to this PNG (needs matplotlib: "
                        "pip install 'numba-hybrid[bench]')")
    p.add_argument("--no-check", action="store_true",
                   help="skip the check, before timing, that parallel sequences decode "
                        "exactly as alone")


def cmd_bench(args: argparse.Namespace) -> int:
    from .engine import bench
    from .engine.parallel import builtin_prompts, parallel_check

    if args.plot is not None:
        # Fail before the long work, not after it.
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise NumbaHybridError("--plot needs matplotlib: pip install "
                                   "'numba-hybrid[bench]'") from None
    depths, nps = args.depths, args.parallel
    n_ctx = bench.needed_ctx(depths, args.ubatch_size, args.n_gen, args.n_prompt)
    model = _load(args, max(nps), n_ctx)
    name = os.path.basename(model.path)
    print(f"{PROG}: bench {name}, {model.device} backend, {args.precision} precision, "
          f"{_threads_in_use()} threads", file=sys.stderr)
    bench.warm_up(model, args.ubatch_size, max(nps))
    if not args.no_check:
        n = max(nps)
        report = parallel_check(model, builtin_prompts(n), n_predict=4)
        if not report.ok:
            raise NumbaHybridError(f"refusing to time: {n} parallel sequences do not decode "
                                   f"as they do alone (run '{PROG} parallel -np {n}')")
    r = args.repetitions
    bar = Progress(r * (len(depths) + len(nps)), "bench")
    try:
        sweep = bench.sweep(model, depths, args.ubatch_size, args.n_gen, r,
                            on_progress=bar.update)
        par = bench.parallel_generation(model, nps, args.n_gen, args.n_prompt,
                                        args.ubatch_size, r, on_progress=bar.update)
    finally:
        bar.close()

    def speed(n: int, t) -> str:
        s = f"{n / t.mean:.2f}"
        return s + (f" ± {n * t.std / t.mean ** 2:.2f}" if r > 1 else "")

    print(f"prompt processing (PP) and generation (TG) at depth N_KV, slot 0, {r} run(s) each")
    print("\n".join(_table(
        [(row.n_pp, row.n_tg, row.depth, f"{row.t_pp.mean:.3f}", speed(row.n_pp, row.t_pp),
          f"{row.t_tg.mean:.3f}", speed(row.n_tg, row.t_tg)) for row in sweep],
        ("PP", "TG", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s"), left=())))
    print()
    print(f"generation with N parallel sequences ({args.n_prompt}-token prompts, "
          f"{args.n_gen} tokens each)")
    base = par[0].speed if par and par[0].n_parallel == 1 else None
    print("\n".join(_table(
        [(row.n_parallel, row.n_tokens, f"{row.t.mean:.3f}", speed(row.n_tokens, row.t),
          f"{row.speed_per_seq:.2f}", f"{row.speed / base:.2f}x" if base else "-")
         for row in par],
        ("NP", "tokens", "T s", "S t/s (all)", "S t/s (per seq)", "vs NP=1"), left=())))
    if args.plot is not None:
        bench.plot(sweep, par, args.plot, title=f"{name} ({model.device}, {args.precision})")
        print(f"{PROG}: plot written to {args.plot}", file=sys.stderr)
    return 0


def _threads_in_use() -> int:
    import numba

    return numba.get_num_threads()


# ---- the command table ---------------------------------------------------------------------

COMMANDS: list[Command] = [
    Command("info", "describe a GGUF model: hyper-parameters, layers, tensors, memory",
            "Read a GGUF model and print its architecture, every hyper-parameter, the layer "
            "plan, tensor types with counts and bytes, unused tensors, the memory the weights "
            "and the state need for the given context and slots, and a tokenizer summary. "
            "Nothing is allocated and no backend is started.",
            _info_arguments, cmd_info),
    Command("run", "continue prompts (several at once on parallel slots), streaming the text",
            "Continue one or more prompts. One prompt streams its continuation to stdout as it "
            "is generated; several -p prompts run concurrently (continuous batching over "
            "-np slots) and each continuation is printed when it is done, as '[i] text'. "
            "Generation stops at an end-of-generation token, a --stop text, -n tokens or a "
            "full context. A summary (tokens, speed, seed) goes to stderr. Ctrl-C stops "
            "cleanly, prints what was produced and exits with 130. Without -m, the bundled "
            "default model is used.",
            _run_arguments, cmd_run),
    Command("perplexity", "perplexity of a text file, as llama-perplexity computes it",
            "Cut the tokenized text into chunks of -c tokens, run each as a fresh sequence "
            "(-ub / -c chunks in parallel per batch) and score the second half of each chunk. "
            "Prints the running perplexity after each chunk ('[i]value,') and the final "
            "estimate with its standard error. The result is bitwise the same for any -ub.",
            _perplexity_arguments, cmd_perplexity),
    Command("parallel", "check that N sequences decode together exactly as alone",
            "Decode N different prompts greedily, first each alone, then all N at once with "
            "their prompts split into chunks that share batches with the others' decoding, "
            "and compare the token streams and the logits of every step bitwise. Prints a "
            "table; exits with 1 if any sequence differs. Run it after changing anything.",
            _parallel_arguments, cmd_parallel),
    Command("bench", "speed: prompt processing and generation vs depth, and N parallel",
            "Time prompt processing (-ub tokens in one step) and generation (-n tokens one by "
            "one) at each context depth, like llama-sweep-bench, and aggregate generation "
            "speed with N parallel sequences, like llama-batched-bench. Warms up (JIT) and "
            "checks that parallel decoding is exact before timing. Prints tables; --plot "
            "draws them to a PNG.",
            _bench_arguments, cmd_bench),
]


# ---- shared options ------------------------------------------------------------------------

def add_model_argument(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-m", "--model", required=required, default=None, metavar="FILE",
                   help="path of the GGUF model file (qwen3next, qwen35 or qwen35moe)"
                        + ("" if required else "; default: the bundled model"))


@contextlib.contextmanager
def naming_file(path: str):
    """Prefix ``path`` to a NumbaHybridError that does not name it already (tokenizer
    errors, for one, only name the metadata key), so the one error line says which file."""
    try:
        yield
    except NumbaHybridError as exc:
        if str(path) in str(exc):
            raise
        raise type(exc)(f"{path}: {exc}").with_traceback(exc.__traceback__) from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _add_verbose(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="on an error, print the full traceback too")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inference engine for hybrid recurrent LLMs (Qwen3-Next, Qwen3.5) "
                    "in GGUF files.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_verbose(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands",
                                help="one of the commands below")
    sub.required = True
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description)
        # Accepted after the subcommand too; SUPPRESS keeps a flag given before it.
        _add_verbose(p, argparse.SUPPRESS)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def _error_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        msg = f"{exc.filename}: {exc.strerror}"
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    # Before anything can load numba's parallel runtime (backends import numba lazily, at
    # load time): libgomp reads GOMP_SPINCOUNT once, when it is loaded. Its default spin
    # (about 3*10^5 iterations before a worker thread sleeps) makes every parallel region
    # wait out a scheduler slice on a busy 2-core machine, where the spinning threads and
    # the one doing work compete for the same cores.
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints them, exit code 2

    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Silence the second BrokenPipeError Python would hit flushing stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (NumbaHybridError, OSError) as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {_error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
