"""The model-running commands end to end, in a subprocess: ``run``, ``perplexity``,
``parallel``, ``bench`` -- their output, their agreement with the Python API, and every
error path (one line on stderr, exit code 2). A few tests call :func:`cli.main` in-process
to reach what a subprocess cannot (a perturbed comparison, a missing matplotlib)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import numba_hybrid as nh
from numba_hybrid import cli
from numba_hybrid.default_model import DATA_DIR, DEFAULT_MODEL_NAME
from oracle import DATA, gguf_path

ROOT = Path(__file__).resolve().parent.parent
Q8 = gguf_path("qwen35-tiny", "q8_0")
ERROR_PREFIX = "numba-hybrid: error: "
COMPILE_NOTICE = ("numba-hybrid: compiling the CPU kernels", "numba-hybrid: compiled in")


def _env() -> dict:
    return {**os.environ, "GOMP_SPINCOUNT": "1000",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_cli(*argv, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "numba_hybrid", *map(str, argv)],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def error_line(*argv) -> str:
    """Run a command that must fail on bad input; its one error line."""
    proc = run_cli(*argv, check_rc=2)
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith(COMPILE_NOTICE)]
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0][len(ERROR_PREFIX):]


@pytest.fixture(scope="module")
def model():
    return nh.load(Q8, device="cpu", n_slots=4, n_ctx=4096)


@pytest.fixture(scope="module")
def ppl_text(tmp_path_factory) -> Path:
    """About 680 tokens of text: the fixture sequences, repeated."""
    tok = nh.load(Q8).tokenizer
    seqs = json.loads((DATA / "qwen35-tiny-tokens.json").read_text())["sequences"]
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text((tok.decode(seqs["s130"]) + tok.decode(seqs["s40"])) * 4, encoding="utf-8")
    return path


# ---- run -----------------------------------------------------------------------------------

def test_run_streams_the_same_text_as_the_python_api(model):
    proc = run_cli("run", "-m", Q8, "-p", "Once upon a time", "-n", 24, "--temp", 0)
    want = model.generate("Once upon a time", max_tokens=24, sampling=nh.SamplingParams.greedy())
    assert proc.stdout == want.text + "\n"
    assert re.search(r"\d+ prompt \+ 24 generated tokens in [\d.]+ s.*stopped by: length$",
                     proc.stderr.strip()), proc.stderr


def test_run_with_a_seed_repeats_and_matches_alone(model):
    argv = ["run", "-m", Q8, "-n", 16, "--temp", 1.0, "--seed", 42, "--top-k", 0,
            "--repeat-penalty", 1.2]
    one = run_cli(*argv, "-p", "The capital of France is")
    assert one.stdout == run_cli(*argv, "-p", "The capital of France is").stdout
    assert "seed 42" in one.stderr
    # Beside two other prompts (three slots, continuous batching) it prints the same text.
    several = run_cli(*argv, "-p", "Hello", "-p", "The capital of France is", "-p", "x = [")
    blocks = dict(re.findall(r"^\[(\d)\] (.*?)\n(?=\[\d\] |\Z)", several.stdout, re.M | re.S))
    assert sorted(blocks) == ["0", "1", "2"]
    assert blocks["1"] + "\n" == one.stdout
    sp = nh.SamplingParams(temperature=1.0, top_k=0, repeat_penalty=1.2, seed=42)
    assert blocks["2"] == model.generate("x = [", max_tokens=16, sampling=sp).text


def test_run_several_prompts_on_fewer_slots(model):
    proc = run_cli("run", "-m", Q8, "-p", "a", "-p", "b", "-p", "c", "-np", 2, "-n", 5,
                   "--temp", 0)
    got = dict(re.findall(r"^\[(\d)\] (.*?)\n(?=\[\d\] |\Z)", proc.stdout, re.M | re.S))
    want = model.generate(["a", "b", "c"], max_tokens=5, sampling=nh.SamplingParams.greedy())
    assert got == {str(r.index): r.text for r in want}


def test_run_chat_and_stop(model, tmp_path):
    proc = run_cli("run", "-m", Q8, "-p", "Say hi", "--chat", "-n", 12, "--temp", 0)
    want = model.chat([{"role": "user", "content": "Say hi"}], max_tokens=12,
                      sampling=nh.SamplingParams.greedy())
    assert proc.stdout == want.text + "\n"
    full = model.generate("Hello", max_tokens=30, sampling=nh.SamplingParams.greedy()).text
    stop = full[8:11]
    proc = run_cli("run", "-m", Q8, "-p", "Hello", "-n", 30, "--temp", 0, "--stop", stop)
    assert proc.stdout == full[:full.index(stop)] + "\n"
    assert "stopped by: stop" in proc.stderr
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello", encoding="utf-8")
    assert run_cli("run", "-m", Q8, "-f", prompt, "-n", 30, "--temp", 0).stdout == full + "\n"


def test_run_until_the_context_is_full():
    proc = run_cli("run", "-m", Q8, "-p", "Hello", "-n", -1, "-c", 12, "--ignore-eos",
                   "--seed", 1)
    n_prompt, n_gen = map(int, re.search(r"(\d+) prompt \+ (\d+) generated",
                                         proc.stderr).groups())
    assert n_prompt + n_gen == 12 and "stopped by: context" in proc.stderr


def test_run_without_a_model_uses_the_bundled_one():
    if (DATA_DIR / DEFAULT_MODEL_NAME).is_file():
        proc = run_cli("run", "-p", "To be", "-n", 4, "--temp", 0)
        assert proc.stdout.strip()
    else:
        msg = error_line("run", "-p", "To be", "-n", 4)
        assert DEFAULT_MODEL_NAME in msg and "-m" in msg


@pytest.mark.parametrize("argv,words", [
    (["-m", "missing.gguf", "-p", "x"], "missing.gguf"),
    (["-m", Q8, "-p", "word " * 40, "-c", 16], "prompt 0 has 41 tokens, longer than the "
                                                "context allows (-c 16"),
    (["-m", Q8], "no prompt"),
    (["-m", Q8, "-p", ""], "prompt 0 is empty"),
    (["-m", Q8, "-f", "no/such/prompt.txt"], "no/such/prompt.txt: No such file or directory"),
    (["-m", Q8, "-p", "x", "--top-p", 0], "top_p must be greater than 0"),
    (["-m", Q8, "-p", "x", "--repeat-penalty", -1], "repeat_penalty must be greater than 0"),
    (["-m", Q8, "-p", "x", "-t", 10_000], "-t 10000: this machine runs at most"),
    (["-m", Q8, "-p", "x", "--system-prompt", "be nice"], "only applies with --chat"),
])
def test_run_errors(argv, words):
    assert words in error_line("run", *argv)


def test_run_usage_errors():
    for argv, words in ((["-n", 0], "-1 for no limit"), (["--temp", "hot"], "not a number"),
                        (["-np", 0], "at least 1"), (["--device", "tpu"], "invalid choice"),
                        (["--seed", -5], "-1 (random)")):
        proc = run_cli("run", "-m", Q8, "-p", "x", *argv, check_rc=2)
        assert words in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("n_prompts", [1, 2])
def test_ctrl_c_stops_cleanly_and_prints_what_was_produced(n_prompts, model):
    if n_prompts > 1:
        # Nothing streams before the end with several prompts, so the interruption comes
        # after a fixed wait: the one-time kernel compilation must be behind us by then.
        run_cli("run", "-m", Q8, "-n", 1, "-p", "x")
    argv = [sys.executable, "-m", "numba_hybrid", "run", "-m", str(Q8), "-n", "-1",
            "-c", "100000", "--ignore-eos", "--seed", "3"]
    for i in range(n_prompts):
        argv += ["-p", f"prompt {i}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env=_env())
    try:
        if n_prompts == 1:
            first = os.read(proc.stdout.fileno(), 16)  # it has started streaming
            assert first
            time.sleep(1)
        else:
            first = b""
            time.sleep(4)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    out, err = (first + out).decode(), err.decode()
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "numba-hybrid: interrupted"
    assert "stopped by: interrupted" in err and "Traceback" not in err
    if n_prompts == 1:
        # Everything produced, up to the interruption: a prefix of the uninterrupted text.
        assert out.endswith("\n") and len(out) > 1
        n_gen = int(re.search(r"(\d+) generated", err).group(1))
        full = model.generate("prompt 0", max_tokens=n_gen + 1, ignore_eos=True,
                              sampling=nh.SamplingParams(seed=3))
        # (An interruption inside a character prints U+FFFD for its first bytes.)
        assert full.text.startswith(out[:-1].rstrip("\ufffd"))
        assert len(out[:-1]) >= len(model.tokenizer.decode(full.token_ids[:n_gen - 8]))
    else:
        for i in range(n_prompts):
            assert re.search(rf"^\[{i}\] .+ \[interrupted\]$", out, re.M | re.S), out


# ---- perplexity ----------------------------------------------------------------------------

def test_perplexity_is_the_same_for_any_ubatch(ppl_text):
    outs = {ub: run_cli("perplexity", "-m", Q8, "-f", ppl_text, "-c", 128, "-ub", ub)
            for ub in (512, 2048, 128)}
    finals = {ub: p.stdout.strip().splitlines()[-1] for ub, p in outs.items()}
    assert len(set(finals.values())) == 1, finals
    assert re.fullmatch(r"Final estimate: PPL = \d+\.\d{4} \+/- \d+\.\d{5}", finals[512])
    running = outs[512].stdout.splitlines()[0]
    assert re.fullmatch(r"(\[\d\]\d+\.\d{4},){5}", running), running
    assert len({p.stdout for p in outs.values()}) == 1
    assert "4 chunk(s) per batch" in outs[512].stderr
    assert "5 chunk(s) per batch" in outs[2048].stderr
    assert "1 chunk(s) per batch" in outs[128].stderr
    # -ub above -b is capped at -b, as in llama.cpp.
    capped = run_cli("perplexity", "-m", Q8, "-f", ppl_text, "-c", 128, "-ub", 2048, "-b", 256)
    assert "2 chunk(s) per batch" in capped.stderr and capped.stdout == outs[512].stdout


def test_perplexity_errors(tmp_path, ppl_text):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"abc\xff\xfe")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question.")
    assert error_line("perplexity", "-m", Q8, "-f", empty) == f"{empty}: the text file is empty"
    assert error_line("perplexity", "-m", Q8, "-f", tmp_path / "nope.txt") == \
        f"{tmp_path / 'nope.txt'}: No such file or directory"
    assert "not UTF-8 text" in error_line("perplexity", "-m", Q8, "-f", binary)
    assert re.fullmatch(rf"{re.escape(str(short))}: the text has \d+ tokens; -c 512 needs at "
                        r"least 1024 \(two chunks\)",
                        error_line("perplexity", "-m", Q8, "-f", short))
    assert "missing.gguf" in error_line("perplexity", "-m", tmp_path / "missing.gguf",
                                        "-f", ppl_text)
    assert "-f/--file" in run_cli("perplexity", "-m", Q8, check_rc=2).stderr


# ---- parallel ------------------------------------------------------------------------------

def test_parallel_passes_and_prints_a_table(tmp_path):
    proc = run_cli("parallel", "-m", gguf_path("qwen3next-tiny", "q8_0"), "-np", 3, "-n", 6)
    rows = re.findall(r"^\s+(\d)\s+\d+\s+6/6\s+yes\s+-\s+0\s+OK$", proc.stdout, re.M)
    assert rows == ["0", "1", "2"], proc.stdout
    assert "OK: all 3 sequences" in proc.stdout
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond one, longer than the first\nthird\nunused\n")
    proc = run_cli("parallel", "-m", Q8, "-np", 3, "-n", 4, "--prompts", prompts)
    assert proc.stdout.count(" OK") == 3


def test_parallel_errors(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    assert error_line("parallel", "-m", Q8, "-np", 3, "--prompts", prompts) == \
        f"{prompts}: 2 prompt(s); -np 3 needs 3, one per line"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert "is empty" in error_line("parallel", "-m", Q8, "--prompts", empty)
    assert "No such file" in error_line("parallel", "-m", Q8, "--prompts", tmp_path / "x")
    # More slots than this machine can hold.
    msg = error_line("parallel", "-m", Q8, "-np", 1000, "-n", 1_000_000)
    assert "slot(s)" in msg and "more than this machine's" in msg
    assert "at least 1" in run_cli("parallel", "-m", Q8, "-np", 0, check_rc=2).stderr


def test_parallel_exits_1_on_a_difference(monkeypatch, capsys):
    """The product is exact, so perturb what the concurrent run returns, here in the test."""
    from numba_hybrid.engine import parallel

    real = parallel.decode_together

    def perturbed(model, prompts, n_predict, max_batch_tokens):
        traces = real(model, prompts, n_predict, max_batch_tokens)
        if len(prompts) > 1:  # the concurrent run
            traces[1].logits[2] = traces[1].logits[2] * 1.0000001
        return traces

    monkeypatch.setattr(parallel, "decode_together", perturbed)
    rc = cli.main(["parallel", "-m", str(Q8), "-np", "3", "-n", "4"])
    out = capsys.readouterr().out
    assert rc == 1
    assert re.search(r"^\s+1\s+\d+\s+4/4\s+yes\s+2\s+\S+\s+FAIL$", out, re.M), out
    assert "FAIL: 1 of 3 sequences differ" in out


# ---- bench ---------------------------------------------------------------------------------

BENCH = ["bench", "-m", Q8, "--depths", "0,32", "-np", "1,2", "-n", 8, "-ub", 32, "-r", 2]


def test_bench_prints_both_tables():
    out = run_cli(*BENCH).stdout
    rows = re.findall(r"^\s+32\s+8\s+(\d+)\s+[\d.]+\s+[\d.]+ ± [\d.]+\s+[\d.]+\s+[\d.]+ ± "
                      r"[\d.]+$", out, re.M)
    assert rows == ["0", "32"], out
    par = re.findall(r"^\s+(\d)\s+(\d+)\s+[\d.]+\s+[\d.]+ ± [\d.]+\s+[\d.]+\s+([\d.]+)x$", out,
                     re.M)
    assert [(n, t) for n, t, _ in par] == [("1", "8"), ("2", "16")], out
    assert par[0][2] == "1.00"


def test_bench_plot(tmp_path):
    # matplotlib comes with the test extra, so this runs wherever the tests do.
    png = tmp_path / "sweep.png"
    run_cli(*BENCH, "-r", 1, "--plot", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib_fails_before_the_work(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the --plot check")

    monkeypatch.setattr(cli, "_load", no_load)
    assert cli.main([str(a) for a in BENCH] + ["--plot", "x.png"]) == 2
    assert capsys.readouterr().err == (f"{ERROR_PREFIX}--plot needs matplotlib: pip install "
                                       f"'numba-hybrid[bench]'\n")


def test_bench_errors():
    assert "depths must be 0 or more, got -4" in run_cli("bench", "-m", Q8, "--depths", "0,-4",
                                                  check_rc=2).stderr
    assert "at least 1" in run_cli("bench", "-m", Q8, "-np", "1,0", check_rc=2).stderr
    assert "not a comma-separated list" in run_cli("bench", "-m", Q8, "-np", "two",
                                                   check_rc=2).stderr
    assert "missing.gguf" in error_line("bench", "-m", "missing.gguf")


# ---- the first run's compile notice -------------------------------------------------------

def test_first_run_announces_the_one_time_compilation(monkeypatch, capsys, tmp_path):
    """Without the stamp of a compiled cache the command line says it is compiling, once,
    and how long it took; with it (the next run) it says nothing. Both runs load the
    kernels before generating, so that the speed they report is the generation's."""
    from numba_hybrid.cpu import warmup

    stamp = tmp_path / "cache" / "compiled"
    monkeypatch.setattr(warmup, "_stamp", lambda precision: stamp)
    warm_ups = []
    real_warm_up = warmup.warm_up
    monkeypatch.setattr(warmup, "warm_up", lambda m: (warm_ups.append(m), real_warm_up(m)))
    assert cli.main(["run", "-m", str(Q8), "-p", "hello", "-n", "2"]) == 0
    err = capsys.readouterr().err
    assert "compiling the CPU kernels for this machine. This happens once" in err
    assert re.search(r"compiled in \d+ s", err), err
    assert stamp.exists() and warmup.is_compiled("fast")
    assert cli.main(["run", "-m", str(Q8), "-p", "hello", "-n", "2"]) == 0
    assert "compil" not in capsys.readouterr().err
    assert len(warm_ups) == 2
