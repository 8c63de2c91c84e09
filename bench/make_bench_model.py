"""Write the benchmark model: a random-weight ``qwen35moe`` GGUF with Qwen3.5-35B-A3B's
per-layer shapes, cut to 8 layers (three delta-net layers then one attention layer, twice)
and a 4096-token vocabulary.

Shapes: hidden 2048; 16 attention heads, 2 KV heads, head dim 256, 64 rotary dims;
delta-net 16 key heads and 32 value heads of dim 128, conv kernel 4; 32 experts of width
512, top-8, a shared expert of width 512. About 1.1 B parameters.

The file is written by the project's own GGUF writer (``numba_hybrid.convert``) as BF16 and
Q8_0; with the ``llama-cpp-python`` package installed (a development-time peer, never a
runtime dependency) it is also quantised to Q4_K_M and Q8_0 by llama.cpp's own quantiser,
which is what the comparison uses, so both engines read the same bytes.

    python bench/make_bench_model.py [--out bench/models]
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

from numba_hybrid.convert import random_hf_checkpoint, small_config, write_gguf

# llama.cpp's LLAMA_FTYPE values for the types we ask it for.
LLAMA_FTYPE = {"q8_0": 7, "q4_k_m": 15}


def bench_config() -> dict:
    return small_config(
        "qwen35moe", hidden_size=2048, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, linear_conv_kernel_dim=4,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
        linear_num_value_heads=32, num_experts=32, num_experts_per_tok=8,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, vocab_size=4096,
        max_position_embeddings=4096, mrope_section=[11, 11, 10])


def llama_quantize(src: Path, dst: Path, ftype: int, threads: int = 2) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama.cpp could not quantise {src} to {dst} (code {rc})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/models"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads of llama.cpp's quantiser")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config = bench_config()
    weights = random_hf_checkpoint("qwen35moe", config, seed=args.seed)
    n = sum(w.size for w in weights.values())
    print(f"{n / 1e9:.2f} B parameters generated in {time.perf_counter() - t0:.0f} s")
    bf16 = args.out / "a3b-8l-bf16.gguf"
    write_gguf(bf16, "qwen35moe", config, weights, out_type="bf16", name="a3b-8l-bench")
    write_gguf(args.out / "a3b-8l-own-q8_0.gguf", "qwen35moe", config, weights,
               out_type="q8_0", name="a3b-8l-bench")
    del weights
    print(f"wrote {bf16} and the Q8_0 of our writer ({time.perf_counter() - t0:.0f} s)")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: skipping llama.cpp's Q4_K_M and Q8_0")
        return
    for name, ftype in LLAMA_FTYPE.items():
        dst = args.out / f"a3b-8l-{name}.gguf"
        llama_quantize(bf16, dst, ftype, threads=args.threads)
        print(f"llama.cpp quantised {dst} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
