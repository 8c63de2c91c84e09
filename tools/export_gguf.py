"""Export a checkpoint made by ``tools/train_shakespeare.py`` to GGUF with the project's
own writer (:func:`numba_hybrid.convert.write_gguf`, the llama.cpp converter's output for
``qwen35``), tokenizer included.

    python tools/export_gguf.py --run /tmp/shakespeare-train/run [--install]

Writes ``<run>/shakespeare-qwen35-f32.gguf`` (for the checks of ``verify_export.py``) and
``<run>/shakespeare-qwen35-q8_0.gguf``; ``--install`` copies the Q8_0 file into
``numba_hybrid/data/`` as the bundled default model. Needs only numpy, gguf, safetensors
(no torch).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from numba_hybrid.convert import tokenizer_from_hf, write_gguf  # noqa: E402
from numba_hybrid.default_model import DATA_DIR, DEFAULT_MODEL_NAME  # noqa: E402

CHAT_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
                 "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
NAME = "Shakespeare Qwen35"


def load_run(run: Path) -> tuple[dict, dict, dict]:
    """(HF config dict, HF-named float32 numpy tensors, tokenizer.json dict) of a run."""
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((run / "config.json").read_text())
    tensors = {k: np.asarray(v, dtype=np.float32)
               for k, v in load_file(str(run / "model.safetensors")).items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)   # tied: the converter writes no output.weight
    tok = json.loads((run / "tokenizer.json").read_text(encoding="utf-8"))
    return config, tensors, tok


def gguf_tokenizer(config: dict, tok: dict) -> dict:
    """Base model: eos = pad = bos = <|endoftext|> (the separator between works), ChatML
    template for the chat endpoints (``<|im_end|>`` is end-of-generation too)."""
    return tokenizer_from_hf(tok, int(config["vocab_size"]), eos_token="<|endoftext|>",
                             bos_token="<|endoftext|>", pad_token="<|endoftext|>",
                             chat_template=CHAT_TEMPLATE, pre="qwen2")


def export(run: Path, out_types=("f32", "q8_0")) -> dict[str, Path]:
    config, tensors, tok = load_run(run)
    tokenizer = gguf_tokenizer(config, tok)
    paths = {}
    for out_type in out_types:
        path = run / f"shakespeare-qwen35-{out_type}.gguf"
        write_gguf(path, "qwen35", config, tensors, tokenizer=tokenizer, out_type=out_type,
                   name=NAME)
        paths[out_type] = path
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="/tmp/shakespeare-train/run", type=Path)
    p.add_argument("--install", action="store_true",
                   help=f"copy the Q8_0 file to numba_hybrid/data/{DEFAULT_MODEL_NAME}")
    args = p.parse_args(argv)
    paths = export(args.run)
    if args.install:
        DATA_DIR.mkdir(exist_ok=True)
        dest = DATA_DIR / DEFAULT_MODEL_NAME
        shutil.copyfile(paths["q8_0"], dest)
        print(f"installed {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
