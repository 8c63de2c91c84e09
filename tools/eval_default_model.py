"""Numbers for the model card of the bundled model, measured with numba_hybrid itself:

* held-out perplexity: ``numba-hybrid perplexity -m FILE -f <run>/heldout.txt -c 256``
  (llama-perplexity semantics, CPU backend);
* the excerpt perplexity that ``tests/test_default_model.py`` bounds (same semantics, its own
  few-line implementation over ``Model.decode``);
* sample generations: ``numba-hybrid run -m FILE -p PROMPT -n N -s SEED``.

    python tools/eval_default_model.py --run /tmp/shakespeare-train/run [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROMPTS = ("ROMEO:", "KING HENRY:", "JULIET:\nO Romeo, Romeo!")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "numba_hybrid", *args], cwd=ROOT,
                          capture_output=True, text=True, check=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="/tmp/shakespeare-train/run", type=Path)
    p.add_argument("-m", "--model", type=Path, help="GGUF file (default: the bundled one)")
    p.add_argument("-n", type=int, default=120, help="tokens per sample")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from numba_hybrid.default_model import default_model_path

    model_path = args.model or default_model_path()
    results: dict = {"model": str(model_path)}

    out = cli("perplexity", "-m", str(model_path), "-f", str(args.run / "heldout.txt"),
              "-c", "256")
    text = out.stdout + out.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    if not m:
        raise SystemExit(f"no final estimate in the output of numba-hybrid perplexity:\n{text}")
    results["heldout_perplexity_cli"] = m[0]
    results["heldout_ppl"], results["heldout_ppl_stderr"] = float(m[1]), float(m[2])
    print(f"held-out perplexity (-c 256): {results['heldout_perplexity_cli']}", flush=True)

    import numba_hybrid as nh
    from test_default_model import EXCERPT, perplexity

    model = nh.load(model_path, device="cpu", n_slots=1, n_ctx=512)
    ids = model.tokenizer.encode(EXCERPT.read_text(encoding="utf-8"))
    results["excerpt_ppl"] = perplexity(model, ids)
    print(f"excerpt perplexity (-c 256): {results['excerpt_ppl']:.4f}", flush=True)

    samples = []
    for prompt in PROMPTS:
        out = cli("run", "-m", str(model_path), "-p", prompt, "-n", str(args.n),
                  "-s", str(args.seed))
        samples.append({"prompt": prompt, "seed": args.seed, "n": args.n,
                        "text": out.stdout, "summary": out.stderr.strip()})
        print(f"--- {prompt!r} (seed {args.seed})\n{out.stdout}\n[{out.stderr.strip()}]",
              flush=True)
    results["samples"] = samples
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
