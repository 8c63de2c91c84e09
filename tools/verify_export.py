"""Check the GGUF export of a ``tools/train_shakespeare.py`` run against the trained
checkpoint:

1. tokenizer: ``numba_hybrid``'s GGUF tokenizer encodes the held-out play exactly as the
   trained HF ``tokenizers`` tokenizer, and decodes it back to the same text;
2. logits of the f32 GGUF through our float64 reference (``device="reference"``) against
   Hugging Face transformers' ``Qwen3_5ForCausalLM`` in float64 on the trained checkpoint
   (relative L2 over all positions, bound 1e-5);
3. the Q8_0 GGUF: CPU backend against the reference on the same file, and Q8_0 against f32
   (information: the cost of quantisation);
4. llama.cpp, when ``llama-cpp-python`` is installed (a development-time check): the f32
   GGUF's logits for every position against our reference (bound 1e-4).

    python tools/verify_export.py --run /tmp/shakespeare-train/run [--json out.json]

Needs the development extras (tools/requirements-train.txt) for step 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numba_hybrid as nh  # noqa: E402

BOUND_HF = 1e-5
BOUND_LLAMA = 1e-4


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ours(path: Path, ids: list[int], device: str = "reference",
         precision: str = "exact") -> np.ndarray:
    model = nh.load(path, device=device, n_slots=1, n_ctx=max(256, len(ids)),
                    precision=precision)
    n = len(ids)
    return model.decode(np.array(ids), np.arange(n), np.zeros(n, dtype=np.int64),
                        dtype=np.float64)


def hf_float64(run: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import Qwen3_5ForCausalLM

    torch.set_num_threads(1)
    model = Qwen3_5ForCausalLM.from_pretrained(str(run), dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    return out.numpy()


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=max(256, len(ids)), n_batch=512, logits_all=True,
                n_threads=1, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="/tmp/shakespeare-train/run", type=Path)
    p.add_argument("--tokens", type=int, default=96, help="prompt length for the logit checks")
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args(argv)
    f32 = args.run / "shakespeare-qwen35-f32.gguf"
    q8 = args.run / "shakespeare-qwen35-q8_0.gguf"
    results: dict = {}
    ok = True

    # 1. tokenizer
    from tokenizers import Tokenizer as HFTokenizer

    heldout = (args.run / "heldout.txt").read_text(encoding="utf-8")
    hf_tok = HFTokenizer.from_file(str(args.run / "tokenizer.json"))
    ref_ids = hf_tok.encode(heldout, add_special_tokens=False).ids
    model = nh.load(f32, device="reference", n_slots=1, n_ctx=256)
    our_ids = model.tokenizer.encode(heldout)
    same = our_ids == ref_ids
    round_trip = model.tokenizer.decode(our_ids) == heldout
    special = [model.tokenizer.encode(t) for t in ("<|endoftext|>", "<|im_start|>",
                                                    "<|im_end|>")]
    results["tokenizer"] = {"heldout_tokens": len(ref_ids), "ids_equal_hf": same,
                            "round_trip": round_trip, "special_ids": special,
                            "eos_id": model.tokenizer.eos_id}
    ok &= same and round_trip
    print(f"tokenizer: {len(ref_ids)} held-out tokens, ids equal HF: {same}, "
          f"round trip: {round_trip}, specials {special}")

    # 2. reference (float64) vs HF float64
    ids = ref_ids[1000:1000 + args.tokens]
    ref = ours(f32, ids)
    try:
        hf = hf_float64(args.run, ids)
    except ImportError as exc:
        print(f"HF check skipped: {exc}")
        hf = None
    if hf is not None:
        err = rel_l2(ref, hf)
        worst = max(rel_l2(ref[t], hf[t]) for t in range(len(ids)))
        results["reference_vs_hf_float64"] = {"tokens": len(ids), "rel_l2": err,
                                              "worst_position_rel_l2": worst,
                                              "argmax_equal": bool((ref.argmax(-1) ==
                                                                    hf.argmax(-1)).all())}
        ok &= err <= BOUND_HF
        print(f"reference (f32 GGUF) vs HF float64: rel L2 {err:.3e} (worst position "
              f"{worst:.3e}), bound {BOUND_HF:g}: {'ok' if err <= BOUND_HF else 'FAIL'}")

    # 3. Q8_0
    ref_q8 = ours(q8, ids)
    cpu_q8 = ours(q8, ids, device="cpu")
    results["q8_0"] = {"cpu_vs_reference_rel_l2": rel_l2(cpu_q8, ref_q8),
                       "q8_0_vs_f32_rel_l2": rel_l2(ref_q8, ref),
                       "argmax_agreement_q8_vs_f32": float((ref_q8.argmax(-1) ==
                                                            ref.argmax(-1)).mean())}
    print(f"Q8_0: cpu vs reference rel L2 {results['q8_0']['cpu_vs_reference_rel_l2']:.3e}; "
          f"Q8_0 vs f32 rel L2 {results['q8_0']['q8_0_vs_f32_rel_l2']:.3e}, argmax agreement "
          f"{results['q8_0']['argmax_agreement_q8_vs_f32']:.3f}")

    # 4. llama.cpp
    ll = llama_cpp_logits(f32, ids)
    if ll is None:
        print("llama.cpp check skipped: llama-cpp-python is not installed")
        results["llama_cpp"] = None
    else:
        import llama_cpp

        err = rel_l2(ll, ref)
        worst = max(rel_l2(ll[t], ref[t]) for t in range(len(ids)))
        ll_q8 = llama_cpp_logits(q8, ids)
        err_q8 = rel_l2(ll_q8, ref_q8)
        # ggml rounds activations to Q8 blocks before Q8_0 products: precision="fast"
        err_q8_fast = rel_l2(ll_q8, ours(q8, ids, precision="fast"))
        results["llama_cpp"] = {"version": llama_cpp.__version__, "tokens": len(ids),
                                "f32_rel_l2_vs_reference": err,
                                "f32_worst_position_rel_l2": worst,
                                "q8_0_rel_l2_vs_reference_q8_0": err_q8,
                                "q8_0_rel_l2_vs_reference_q8_0_fast": err_q8_fast}
        ok &= err <= BOUND_LLAMA
        print(f"llama.cpp {llama_cpp.__version__} (f32 GGUF) vs reference: rel L2 {err:.3e} "
              f"(worst position {worst:.3e}), bound {BOUND_LLAMA:g}: "
              f"{'ok' if err <= BOUND_LLAMA else 'FAIL'}; Q8_0 file vs our reference on it: "
              f"{err_q8:.3e} (precision='fast', activations rounded as ggml does: "
              f"{err_q8_fast:.3e})")
    results["ok"] = bool(ok)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
