"""Access to the independent oracle data in tests/data: fixture GGUFs (written by
llama.cpp's converter and quantizer), their token sequences, and logits from Hugging Face
transformers (float64) and llama.cpp."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"

# (model, weight type) of every fixture GGUF.
FIXTURES = [
    ("qwen35-tiny", t)
    for t in ("f32", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_xs", "q2_k")
] + [("qwen3next-tiny", "q8_0"), ("qwen3next-tiny", "q4_k_m"),
     ("qwen35moe-tiny", "q8_0"), ("qwen35moe-tiny", "q6_k")]

MODELS = ("qwen35-tiny", "qwen3next-tiny", "qwen35moe-tiny")


def gguf_path(model: str, wtype: str) -> Path:
    return DATA / f"{model}-{wtype}.gguf"


@functools.lru_cache(maxsize=None)
def sequences(model: str) -> dict[str, list[int]]:
    return json.loads((DATA / f"{model}-tokens.json").read_text())["sequences"]


def logits(model: str, name: str) -> np.ndarray:
    """float32 [T, V]; row t = logits after tokens 0..t."""
    return np.load(DATA / "logits" / f"{model}-{name}.npy")


def deq_reference_name(wtype: str, seq: str) -> str:
    """The llama.cpp run on dequantised weights that is the tight target for a file."""
    return f"llama_f32_{seq}" if wtype == "f32" else f"llama_{wtype}_deq_{seq}"


def rel_l2(out, ref) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(out, dtype=np.float64) - ref) / np.linalg.norm(ref))
