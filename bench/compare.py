"""numba_hybrid against llama.cpp (the llama-cpp-python package) on the same GGUF, in one run.

What is measured, per model file, with the same thread count for both engines:

- prompt processing of 512 tokens in one batch, and generation of 128 tokens after it;
- aggregate generation of 1, 2, 4 and 8 parallel sequences (a 128-token prompt each, then
  64 steps of one batch holding one new token of every sequence), and the prefill of 8
  prompts of 128 tokens in one batch (8 sequence ids);
- numba_hybrid's single-sequence generation with 8 slots configured against 1 slot (a
  second model with n_slots=1; rounds of a 512-token prompt and 48 generated tokens on
  each model in turn, in the same process, 9 per repetition; the median of all rounds'
  ratios);
- generation as a fraction of the memory roofline: the measured streaming read bandwidth
  over the bytes of weights one token reads (from the GGUF tensor sizes: every tensor, the
  routed experts scaled by n_expert_used / n_expert, the token embedding one row only
  unless it is also the output matrix);
- load time (from the start of loading to a model ready to decode, with the file in the
  page cache, kernels compiled on first use excluded) and resident memory (VmRSS) after
  loading and after the runs.

Both engines get the same batches through the same code (``steps``): fixed token ids,
nothing sampled, logits of the last token of each sequence only. llama.cpp is driven
through llama-cpp-python's low-level batch API (bench/peer_llama.py): one context with
8 sequences, one llama_decode per batch; numba_hybrid through ``Model.decode`` on 8 slots.
Every repetition starts each engine in a fresh subprocess of this script (so that load time
and memory are its own; the two load one after the other), then runs each measurement on
one engine and straight after on the other, which goes first alternating with the
repetition: the two figures of a pair see the same state of the machine, whose speed
drifts over seconds to minutes (a shared virtual machine more than most). Each side's
figures are medians over the repetitions; each ratio is the median of the repetitions'
ratios. The prompt of 512 tokens and the generation after it are measured SINGLE_ROUNDS
times in each repetition (rounds of a prompt on each engine, then the generation on each),
so generation's ratio is the median of reps x SINGLE_ROUNDS pairs. Prints the tables and
the targets (PASS/FAIL) and writes them to bench/results/<date>-cpu.md.

    python bench/compare.py -m bench/models/a3b-8l-q4_k_m.gguf [-m ...] [-t 2] [-r 3]

llama-cpp-python is needed for the comparison only (``--no-peer`` measures numba_hybrid
alone); numba_hybrid never imports it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("GOMP_SPINCOUNT", "1000")

PROMPT, GEN, PAR_PROMPT, PAR_GEN = 512, 128, 128, 64
N_SEQ = 8                                   # slots / sequences of the parallel rows
N_CTX = PROMPT + GEN + 8                    # positions per sequence
SLOT_ROUNDS, SLOT_STEPS = 9, 48             # the 8-slot / 1-slot comparison
SINGLE_ROUNDS = 3                           # the 512-token prompt and generation, per repetition
N_BATCH = N_SEQ * PAR_PROMPT                # the largest batch: the 8-sequence prefill
RSS_SLACK_MB = 300


# ---- measurement, identical for both engines ------------------------------------------

def _prompt(eng, ids, n: int) -> float:
    """Sequences 0..n-1 start again with the prompt ``ids`` each, all in one batch; tok/s."""
    for s in range(n):
        eng.reset(s)
    k = len(ids)
    pos = np.tile(np.arange(k), n)
    t = time.perf_counter()
    eng.decode(np.tile(ids, n), pos, np.repeat(np.arange(n), k), logits=pos == k - 1)
    return n * k / (time.perf_counter() - t)


def _generate(eng, ids, n: int, start: int, steps: int) -> float:
    """``steps`` batches of one token for each of sequences 0..n-1 at positions start..;
    aggregate tok/s."""
    seq = np.arange(n)
    t = time.perf_counter()
    for i in range(steps):
        eng.decode(np.full(n, ids[i]), np.full(n, start + i), seq)
    return n * steps / (time.perf_counter() - t)


def steps(prompt=PROMPT, gen=GEN, par_prompt=PAR_PROMPT, par_gen=PAR_GEN) -> list:
    """The throughput rows, in order, as (key, function of (engine, ids) -> tok/s). A
    generation step continues the sequences that its engine's previous step (a prompt)
    started, so each engine must run them in this order."""
    out = [("pp", lambda eng, ids: _prompt(eng, ids[:prompt], 1)),
           ("tg", lambda eng, ids: _generate(eng, ids, 1, prompt, gen))]
    for n in (1, 2, 4, N_SEQ):
        out += [(f"mpp{n}", lambda eng, ids, n=n: _prompt(eng, ids[:par_prompt], n)),
                (f"np{n}", lambda eng, ids, n=n: _generate(eng, ids, n, par_prompt, par_gen))]
    return out


STEPS = dict(steps())


def warm_up(eng, ids, parallel: bool = True) -> None:
    """The same kinds of batches, small: kernels compiled, buffers allocated."""
    todo = steps(16, 2, 16, 2) if parallel else steps(16, 2)[:2]
    for _, fn in todo:
        fn(eng, ids)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def token_ids(n_vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, n_vocab, PROMPT)


# ---- the engines' processes -----------------------------------------------------------

def read_through(path: str) -> None:
    """Read the file once so that both engines load it from the page cache: load times
    then measure the engines, not the disk (llama.cpp maps the file lazily, so a cold
    cache would be paid by whoever reads the weights first)."""
    with open(path, "rb") as f:
        while f.read(1 << 26):
            pass


def load_ours(path: str, threads: int, precision: str, n_slots: int = N_SEQ):
    import numba_hybrid as nh
    return nh.load(path, device="cpu", n_slots=n_slots, n_ctx=N_CTX, threads=threads,
                   precision=precision)


def slot_rounds(m, path: str, args, ids) -> dict:
    """numba_hybrid with 8 slots against 1: a second model, loaded after the RSS figures.
    Rounds of a prompt and SLOT_STEPS generated tokens on each model in turn (which goes
    first alternates), so that both see the same machine: each model's speeds and their
    ratios, by round (summary takes the medians over all rounds of all repetitions)."""
    m1 = load_ours(path, args.threads, args.precision, 1)
    warm_up(m1, ids, parallel=False)
    speeds = {N_SEQ: [], 1: []}
    for k in range(SLOT_ROUNDS):
        for n_slots, eng in [(N_SEQ, m), (1, m1)][::1 if (args.rep + k) % 2 else -1]:
            _prompt(eng, ids, 1)
            speeds[n_slots].append(_generate(eng, ids, 1, PROMPT, SLOT_STEPS))
    return {"tg8": speeds[N_SEQ], "tg1": speeds[1],
            "tg_ratio": list(np.divide(speeds[N_SEQ], speeds[1]))}


def worker(args) -> None:
    """One engine in its own process: load it (timed), warm it up, print READY and its
    load figures, then run each command read from stdin (a key of STEPS, "rss", "slots",
    "quit") and print its result, as JSON lines."""
    path = args.model[0]
    if args.worker == "ours":
        import numba_hybrid.cpu.forward  # noqa: F401  (libraries imported before the clock)
    else:
        from peer_llama import LlamaPeer
    read_through(path)
    t = time.perf_counter()
    if args.worker == "ours":
        eng = load_ours(path, args.threads, args.precision)
        r = {"state_mb": eng.state.nbytes() / 2**20}
        n_vocab = eng.args.n_vocab
    else:
        eng = LlamaPeer(path, n_seq=N_SEQ, n_ctx_seq=N_CTX, n_batch=N_BATCH, threads=args.threads)
        r, n_vocab = {}, eng.n_vocab
    r.update(load=time.perf_counter() - t, rss_load=rss_mb())
    ids = token_ids(n_vocab)
    warm_up(eng, ids)
    print("READY " + json.dumps(r), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd == "rss":
            r = {"rss_run": rss_mb()}
        elif cmd == "slots":
            r = slot_rounds(eng, path, args, ids)
        else:
            r = {cmd: STEPS[cmd](eng, ids)}
        print("RESULT " + json.dumps(r), flush=True)


class Worker:
    """The parent's handle on a worker process."""

    def __init__(self, engine: str, path: str, args, rep: int):
        cmd = [sys.executable, __file__, "--worker", engine, "--rep", str(rep), "-m", path,
               "-t", str(args.threads), "--precision", args.precision]
        self.name = f"{engine} on {path}"
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1)
        self.figures = self._reply("READY ")

    def _reply(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return json.loads(line[len(tag):])
        self.err.seek(0)
        sys.exit(f"{self.name} failed (exit {self.proc.wait()}):\n{self.err.read()[-4000:]}")

    def ask(self, cmd: str) -> None:
        """Run a command; a measurement's figure joins the list of its rounds."""
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        for key, value in self._reply("RESULT ").items():
            if key in STEPS:
                self.figures.setdefault(key, []).append(value)
            else:
                self.figures[key] = value

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()
        self.err.close()
        return self.figures


def repetition(path: str, args, rep: int) -> tuple[dict, dict]:
    """Both engines in processes alive together, loaded one after the other; then every
    measurement on one and straight after on the other (which goes first alternates with the
    repetition), so that each pair of figures saw the same state of the machine. Returns
    (ours, peer's) figures; the peer's are empty with --no-peer."""
    engines = ["ours"] if args.no_peer else ["ours", "peer"][::1 if rep % 2 == 0 else -1]
    workers = {}
    for engine in engines:
        workers[engine] = Worker(engine, path, args, rep)
    keys = list(STEPS)
    for key in keys[:2] * SINGLE_ROUNDS + keys[2:]:
        for engine in engines:
            workers[engine].ask(key)
    for engine in engines:
        workers[engine].ask("rss")
    workers["ours"].ask("slots")
    figures = {engine: w.close() for engine, w in workers.items()}
    return figures["ours"], figures.get("peer", {})


def source_revision() -> str:
    """The checkout's commit, marked "+changes" if numba_hybrid's sources differ from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "numba_hybrid"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit"
    return f"commit {rev}" + (" +changes" if dirty else "")


# ---- the memory roofline ----------------------------------------------------------------

def weight_bytes_per_token(path: str) -> int:
    """Bytes of weights one generated token reads: every tensor, the routed experts
    (3-D ``*_exps``) scaled by n_expert_used / n_expert, the token embedding one row only
    unless it is also the output matrix."""
    from numba_hybrid.gguf_file import GGUFFile

    f = GGUFFile(path)
    arch = f.architecture
    n_exp = f.get_int(f"{arch}.expert_count", 0)
    used = f.get_int(f"{arch}.expert_used_count", 0)
    tied = "output.weight" not in f.tensors
    total = 0.0
    for name, t in f.tensors.items():
        if "_exps" in name and n_exp:
            total += t.n_bytes * used / n_exp
        elif name == "token_embd.weight" and not tied:
            total += t.n_bytes / t.ne[-1]
        else:
            total += t.n_bytes
    return int(total)


# ---- report -------------------------------------------------------------------------------

ROWS = [("pp", f"prompt processing, {PROMPT} tokens (tok/s)", "{:.1f}"),
        ("tg", f"generation, {GEN} tokens after {PROMPT}, {N_SEQ} slots configured (tok/s)",
         "{:.1f}"),
        ("tg1", f"generation, {SLOT_STEPS} tokens after {PROMPT}, 1 slot configured (tok/s)",
         "{:.1f}"),
        ("np1", "aggregate generation, 1 sequence (tok/s)", "{:.1f}"),
        ("np2", "aggregate generation, 2 sequences (tok/s)", "{:.1f}"),
        ("np4", "aggregate generation, 4 sequences (tok/s)", "{:.1f}"),
        ("np8", "aggregate generation, 8 sequences (tok/s)", "{:.1f}"),
        (f"mpp{N_SEQ}", f"prefill of {N_SEQ} x {PAR_PROMPT} tokens in one batch (tok/s)",
         "{:.1f}"),
        ("roof", "generation / memory roofline", "{:.1%}"),
        ("load", "load time (s)", "{:.2f}"),
        ("rss_load", "resident memory after load (MB)", "{:.0f}"),
        ("rss_run", "resident memory after the runs (MB)", "{:.0f}")]


def targets(a: dict, ratio: dict, file_mb: float) -> list:
    """(target, measured value, passed) for one model; None where llama.cpp was not run."""
    limit = file_mb + a["state_mb"] + RSS_SLACK_MB
    rows = [("generation >= 1.4x llama.cpp", ratio.get("tg"), 1.4),
            ("prompt processing >= 1.5x llama.cpp", ratio.get("pp"), 1.5),
            ("aggregate generation, 8 sequences >= 1.5x llama.cpp", ratio.get(f"np{N_SEQ}"),
             1.5),
            ("generation, 8 slots / 1 slot configured >= 0.98x", a["tg_ratio"], 0.98),
            (f"prefill of {N_SEQ} x {PAR_PROMPT} >= 0.9x own single-sequence PP",
             a["mpp_pp"], 0.9)]
    out = [(name, v, None if v is None else v >= lo) for name, v, lo in rows]
    out.append((f"RSS after the runs <= file + state + {RSS_SLACK_MB} MB "
                f"({limit:.0f} MB)", a["rss_run"], a["rss_run"] <= limit))
    load = ratio.get("load")
    out.append(("load time <= 2x llama.cpp", load, None if load is None else load <= 2))
    return out


def summary(ours: list[dict], theirs: list[dict]) -> tuple[dict, dict, dict]:
    """Each side's medians over all rounds of all repetitions, and each ratio ours /
    llama.cpp as the median of the rounds' ratios (the two figures of a round measured back
    to back); ours gains "mpp_pp", the median over the repetitions of its own
    multi-sequence prefill / prompt ratio (its median prompt of the repetition)."""
    def values(runs, k):
        return [v for r in runs for v in (r[k] if isinstance(r[k], list) else [r[k]])]

    a = {k: float(np.median(values(ours, k))) for k in ours[0]}
    b = {k: float(np.median(values(theirs, k))) for k in theirs[0]} if theirs else {}
    a["mpp_pp"] = float(np.median([r[f"mpp{N_SEQ}"][0] / np.median(r["pp"]) for r in ours]))
    ratio = {k: float(np.median(np.divide(values(ours, k), values(theirs, k))))
             for k in b if k in a}
    return a, b, ratio


def model_section(path: str, ours: list[dict], theirs: list[dict], bw: float) -> tuple:
    a, b, ratio = summary(ours, theirs)
    wbytes = weight_bytes_per_token(path)
    roof = bw * 1e9 / wbytes
    file_mb = os.path.getsize(path) / 2**20
    a["roof"] = a["tg"] / roof
    if b:
        b["roof"] = b["tg"] / roof
        ratio["roof"] = ratio["tg"]
    lines = [f"## {Path(path).name}", "",
             "| measure | numba_hybrid | llama.cpp | ratio |", "|---|---|---|---|"]
    for key, label, fmt in ROWS:
        peer, r = "-", "-"
        if key in b:
            peer, r = fmt.format(b[key]), f"{ratio[key]:.2f}x"
        lines.append(f"| {label} | {fmt.format(a[key])} | {peer} | {r} |")
    lines += ["",
              f"- memory roofline: {bw:.1f} GB/s / {wbytes / 1e6:.1f} MB of weights per "
              f"token = {roof:.1f} tok/s",
              f"- generation with {N_SEQ} slots / 1 slot configured (measured alternately "
              f"in one process; medians over all rounds, {SLOT_ROUNDS} per repetition): "
              f"{a['tg8']:.1f} / {a['tg1']:.1f}; ratio {a['tg_ratio']:.3f} (by repetition: "
              + ", ".join(f"{np.median(r['tg_ratio']):.3f}" for r in ours) + ")",
              f"- GGUF file {file_mb:.0f} MB; numba_hybrid state for {N_SEQ} slots x "
              f"{N_CTX} positions {a['state_mb']:.0f} MB", ""]
    if b:
        each = "; ".join(", ".join(f"{x / y:.2f}" for x, y in zip(o["tg"], p["tg"]))
                         for o, p in zip(ours, theirs))
        lines[-1:-1] = [f"- generation ratio in each round, by repetition: {each}"]
    return lines, targets(a, ratio, file_mb)


def targets_section(names: list[str], results: list[list]) -> list[str]:
    lines = ["## Targets", "", "| target | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for i, (label, *_) in enumerate(results[0]):
        cells = []
        for res in results:
            _, v, ok = res[i]
            if v is None:
                cells.append("n/a (no llama.cpp run)")
            else:
                num = f"{v:.0f} MB" if "RSS" in label else f"{v:.2f}x"
                cells.append(f"{num} {'PASS' if ok else 'FAIL'}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append", required=True)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--precision", default=None,
                    help="numba_hybrid's precision (default: nh.load's default)")
    ap.add_argument("--no-peer", action="store_true", help="measure numba_hybrid only")
    ap.add_argument("-o", "--output", type=Path, default=None,
                    help="report file (default: bench/results/<date>-cpu.md)")
    ap.add_argument("--worker", choices=("ours", "peer"), help=argparse.SUPPRESS)
    ap.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:                         # one engine's process (see Worker)
        worker(args)
        return

    import importlib.metadata
    import inspect

    import common
    import numba_hybrid as nh
    from tqdm import tqdm

    if args.precision is None:
        args.precision = inspect.signature(nh.load).parameters["precision"].default
    peer_note = ""
    if not args.no_peer:
        try:
            peer_note = f"; llama-cpp-python {importlib.metadata.version('llama_cpp_python')}"
        except importlib.metadata.PackageNotFoundError:
            sys.exit("llama-cpp-python is not installed here; install it or pass --no-peer")
    bw = common.memory_bandwidth()
    lines = [f"# CPU comparison, {datetime.date.today()}", "",
             f"Machine: {common.machine()}. {args.threads} threads; numba_hybrid precision "
             f"{args.precision!r} at {source_revision()}{peer_note}; medians of {args.reps} "
             f"repetition(s); measured streaming read bandwidth {bw:.1f} GB/s.", ""]
    names, all_targets = [], []
    for path in args.model:
        ours, theirs = [], []
        for rep in tqdm(range(args.reps), desc=Path(path).name, unit="repetition"):
            a, b = repetition(path, args, rep)
            ours.append(a)
            if b:
                theirs.append(b)
        section, tgt = model_section(path, ours, theirs, bw)
        lines += section
        names.append(Path(path).name)
        all_targets.append(tgt)
    lines += targets_section(names, all_targets)
    text = "\n".join(lines)
    print(text)
    out = args.output or Path(__file__).parent / "results" / f"{datetime.date.today()}-cpu.md"
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
