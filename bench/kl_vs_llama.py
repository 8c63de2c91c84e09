"""Agreement with llama.cpp's own quantised runs: mean KL divergence and top-1 agreement of
numba_hybrid's logits against llama.cpp's native logits (the fixtures' ``llama_<type>``
files, llama.cpp computing with its quantised kernels), per fixture and precision.

    python bench/kl_vs_llama.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numba_hybrid as nh  # noqa: E402
from oracle import DATA, gguf_path, logits, sequences  # noqa: E402


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def main() -> None:
    runs = sorted(p.stem for p in (DATA / "logits").glob("*-llama_*_s*.npy")
                  if "_deq_" not in p.stem and "_f32_" not in p.stem)
    print(f"{'model':16} {'type':7} {'seq':4} {'precision':9} {'mean KL':>9} {'top-1':>6}")
    for stem in runs:
        model, rest = stem.split("-llama_")
        wtype, seq = rest.rsplit("_", 1)
        ref = log_softmax(logits(model, f"llama_{wtype}_{seq}"))
        ids = sequences(model)[seq]
        for precision in ("exact", "fast"):
            m = nh.load(gguf_path(model, wtype), device="cpu", n_slots=1, n_ctx=len(ids) + 1,
                        precision=precision)
            ours = log_softmax(m.decode(ids, np.arange(len(ids)), np.zeros(len(ids), int)))
            kl = float(np.mean(np.sum(np.exp(ref) * (ref - ours), axis=-1)))
            top1 = float(np.mean(ref.argmax(-1) == ours.argmax(-1)))
            print(f"{model:16} {wtype:7} {seq:4} {precision:9} {kl:9.2e} {top1:6.3f}")


if __name__ == "__main__":
    main()
