"""The ``numba-hybrid`` command line: ``info`` output, ``--json``, error reporting, help.

Most tests run the real thing, ``python -m numba_hybrid ...`` in a subprocess; a few call
:func:`numba_hybrid.cli.main` in-process to reach paths a subprocess cannot (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from numba_hybrid import cli
from numba_hybrid.models import read_model
from numba_hybrid.gguf_file import GGUFFile
from numba_hybrid.state import StatePool
from oracle import gguf_path
from test_errors import rewrite_gguf

ROOT = Path(__file__).resolve().parent.parent
Q8 = gguf_path("qwen35-tiny", "q8_0")
ERROR_PREFIX = "numba-hybrid: error: "


def run_cli(*argv, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "numba_hybrid", *map(str, argv)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def type_counts(path: Path) -> Counter:
    return Counter(t.tensor_type.name for t in GGUFReader(path).tensors)


# ---- info ------------------------------------------------------------------------------------

def test_info_report():
    out = run_cli("info", "-m", Q8).stdout
    assert "architecture:  qwen35" in out
    assert "0-2 recurrent, 3 attention" in out
    assert re.search(r"^\s+RRRA$", out, re.M)
    counts = type_counts(Q8)
    assert set(counts) == {"Q8_0", "F32"}
    for name, n in counts.items():  # one table row per type: name, count, bytes, share
        assert re.search(rf"^\s+{name}\s+{n}\s+[\d.]+ (B|KiB|MiB)\s+[\d.]+%$", out, re.M), name
    for field in ("n_layer", "n_embd", "ssm_k_dim", "rope_theta", "n_expert", "n_ctx_train"):
        assert re.search(rf"^\s+{field}\s+\S", out, re.M), field
    assert "unused tensors: 0" in out
    assert "KV cache, f32" in out and "KV cache, f16" in out
    assert "recurrent state per slot" in out
    assert "vocabulary     4096 tokens" in out
    assert "chat template  yes" in out


@pytest.mark.parametrize("model,wtype,arch,ffn", [
    ("qwen35-tiny", "q2_k", "qwen35", "dense"),
    ("qwen3next-tiny", "q4_k_m", "qwen3next", "moe"),
    ("qwen35moe-tiny", "q8_0", "qwen35moe", "moe"),
])
def test_info_json(model, wtype, arch, ffn):
    path = gguf_path(model, wtype)
    facts = json.loads(run_cli("info", "-m", path, "--json", "-c", 100, "-np", 3).stdout)
    hp = facts["hyper_parameters"]
    assert facts["architecture"] == arch == hp["arch"]
    assert hp["n_layer"] == 4 and hp["ffn_kind"] == ffn and hp["n_vocab"] == 4096
    assert facts["layers"]["recurrent"] == [0, 1, 2]
    assert facts["layers"]["attention"] == [3]
    assert facts["layers"]["plan"] == "0-2 recurrent, 3 attention"
    assert facts["layers"]["compact"] == "RRRA"
    counts = type_counts(path)
    assert {k: v["count"] for k, v in facts["tensor_types"].items()} == dict(counts)
    reader = GGUFReader(path)
    assert facts["weight_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    assert sum(v["bytes"] for v in facts["tensor_types"].values()) == facts["weight_bytes"]
    assert facts["file"]["n_tensors"] == len(reader.tensors)
    assert facts["file"]["size"] == path.stat().st_size
    assert facts["unused_tensors"] == []
    mem = facts["memory"]
    assert (mem["n_ctx"], mem["n_slots"]) == (100, 3)
    # Arithmetic by hand: 3 recurrent layers, Kc 4, C 512, Hv 4, Dv Dk 64; 1 attention
    # layer with 2 KV heads of 64.
    assert mem["recurrent_per_slot"] == 3 * (3 * 512 * 4 + 4 * 64 * 64 * 4)
    assert mem["kv_f32"] == 1 * 2 * 2 * 64 * 4 * 100 * 3
    assert mem["kv_f16"] == mem["kv_f32"] // 2
    assert mem["total_f32_kv"] == mem["weights"] + mem["recurrent"] + mem["kv_f32"]
    tk = facts["tokenizer"]
    assert tk["vocab_size"] == 4096 and tk["eos"] == "<|im_end|>" and tk["chat_template"]


def test_info_ctx_zero_means_training_context():
    facts = json.loads(run_cli("info", "-m", Q8, "--json", "-c", "0").stdout)
    assert facts["memory"]["n_ctx"] == facts["hyper_parameters"]["n_ctx_train"] == 4096
    assert facts["memory"]["n_slots"] == 4  # the default


@pytest.mark.parametrize("model,wtype", [("qwen35-tiny", "q8_0"), ("qwen3next-tiny", "q8_0"),
                                         ("qwen35moe-tiny", "q6_k")])
@pytest.mark.parametrize("n_slots,n_ctx", [(1, 1), (3, 100), (2, 4096)])
def test_state_sizes_match_a_real_state_pool(model, wtype, n_slots, n_ctx):
    """The arithmetic of ``info`` equals what a StatePool of that size allocates."""
    args = read_model(GGUFFile(gguf_path(model, wtype))).args
    sizes = cli.state_sizes(args, n_slots, n_ctx)
    f32 = StatePool(args, n_slots, n_ctx, dtype=np.float32, kv_dtype=np.float32)
    f16 = StatePool(args, n_slots, n_ctx, dtype=np.float32, kv_dtype=np.float16)
    assert sizes["recurrent"] + sizes["kv_f32"] == f32.nbytes()
    assert sizes["recurrent"] + sizes["kv_f16"] == f16.nbytes()
    assert sizes["recurrent"] == sum(b.nbytes for b in [*f32.conv.values(),
                                                        *f32.ssm.values()])
    assert sizes["recurrent_per_slot"] * n_slots == sizes["recurrent"]
    assert sizes["conv_per_slot"] + sizes["ssm_per_slot"] == sizes["recurrent_per_slot"]


def test_info_lists_unused_tensors(tmp_path):
    path = rewrite_gguf(Q8, tmp_path / "extra.gguf",
                        add_tensors={"blk.9.mystery.weight": (np.zeros(64, np.float32), None)})
    out = run_cli("info", "-m", path).stdout
    assert "unused tensors: 1:" in out and "  blk.9.mystery.weight" in out
    facts = json.loads(run_cli("info", "-m", path, "--json").stdout)
    assert facts["unused_tensors"] == ["blk.9.mystery.weight"]


def test_formatting_helpers():
    assert cli.human_bytes(0) == "0 B"
    assert cli.human_bytes(1023) == "1023 B"
    assert cli.human_bytes(1536) == "1.50 KiB"
    assert cli.human_bytes(3 * 2**30) == "3.00 GiB"
    R, A = "recurrent", "attention"
    kinds = (R, R, R, A) * 3
    assert cli.layer_ranges(kinds) == ("0-2 recurrent, 3 attention, 4-6 recurrent, "
                                       "7 attention, 8-10 recurrent, 11 attention")
    assert cli.layer_letters(kinds) == "RRRA RRRA RRRA"
    assert cli.layer_ranges((A,)) == "0 attention"
    assert cli.layer_letters((R, A, A, A, R)) == "RAAA R"


# ---- errors ----------------------------------------------------------------------------------

def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 10)
    llama = rewrite_gguf(gguf_path("qwen35-tiny", "q2_k"), tmp_path / "llama.gguf",
                         arch="llama")
    tokenizer = rewrite_gguf(gguf_path("qwen35-tiny", "q2_k"), tmp_path / "tok.gguf", set_kv={
        "tokenizer.ggml.token_type": (["1"] * 4096, GGUFValueType.ARRAY, GGUFValueType.STRING)})
    return {
        "missing": (tmp_path / "missing.gguf", "no such file"),
        # The tokenizer's message names only the key; the CLI adds the file.
        "broken tokenizer": (tokenizer, "token_type must be an array of integers"),
        "directory": (tmp_path, "directory"),
        "not gguf": (text, "not a GGUF file"),
        "unsupported arch": (llama, "unsupported architecture 'llama'"),
    }


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", ["missing", "directory", "not gguf", "unsupported arch",
                                  "broken tokenizer"])
def test_error_is_one_line_without_traceback(bad_files, case):
    path, words = bad_files[case]
    proc = run_cli("info", "-m", path, check_rc=2)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(ERROR_PREFIX)
    assert words in lines[0] and str(path) in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("case", ["missing", "unsupported arch"])
def test_verbose_adds_the_traceback(bad_files, case, where):
    path, words = bad_files[case]
    argv = ["info", "-m", path]
    argv = ["--verbose", *argv] if where == "before" else [*argv, "--verbose"]
    proc = run_cli(*argv, check_rc=2)
    assert proc.stderr.startswith("Traceback (most recent call last):")
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(ERROR_PREFIX) and words in last


def test_info_without_a_model_describes_the_bundled_one():
    proc = run_cli("info", check_rc=0)
    assert "architecture:  qwen35" in proc.stdout and "shakespeare" in proc.stdout


def test_usage_errors_exit_2():
    proc = run_cli("info", "-m", Q8, "-np", "0", check_rc=2)
    assert "at least 1" in proc.stderr
    proc = run_cli("info", "-m", Q8, "-c", "lots", check_rc=2)
    assert "not an integer" in proc.stderr
    run_cli("frobnicate", check_rc=2)
    run_cli(check_rc=2)  # no command


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "model_facts", interrupted)
    assert cli.main(["info", "-m", str(Q8)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "numba-hybrid: interrupted"


@pytest.mark.parametrize("command", ["parallel", "perplexity", "bench"])
def test_ctrl_c_stops_long_commands_at_their_next_step(command, monkeypatch, capsys, tmp_path):
    """Ctrl-C during parallel, perplexity or bench is honoured at the next progress step
    (between decode batches), not raised inside whatever runs: exit 130, "interrupted",
    and no more steps taken."""
    import signal

    from numba_hybrid.engine import bench, parallel, perplexity

    steps = []

    def interrupted_run(*args, on_progress=None, on_chunk=None, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)        # as if typed during the first step
        for i in range(3):
            steps.append(i)
            on_chunk(i, 1.0) if on_chunk is not None else on_progress()
        raise AssertionError("the steps after Ctrl-C ran")

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    argv = {"parallel": ["parallel", "-np", "2", "-n", "2"],
            "perplexity": ["perplexity", "-f", str(text), "-c", "64"],
            "bench": ["bench", "--no-check", "-r", "1"]}[command]
    target = {"parallel": (parallel, "parallel_check"),
              "perplexity": (perplexity, "perplexity"), "bench": (bench, "sweep")}[command]
    monkeypatch.setattr(*target, interrupted_run)
    if command == "bench":
        monkeypatch.setattr(bench, "warm_up", lambda *a, **k: None)
    before = signal.getsignal(signal.SIGINT)    # ignored where the runner started in the background
    assert cli.main(argv + ["-m", str(Q8)]) == 130
    assert steps == [0]
    assert capsys.readouterr().err.strip().endswith("numba-hybrid: interrupted")
    assert signal.getsignal(signal.SIGINT) is before        # the command's handler is gone


def test_os_error_is_reported_in_one_line(monkeypatch, capsys):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "/models/secret.gguf")

    monkeypatch.setattr(cli, "model_facts", denied)
    assert cli.main(["info", "-m", "/models/secret.gguf"]) == 2
    assert capsys.readouterr().err == (f"{ERROR_PREFIX}/models/secret.gguf: "
                                       f"Permission denied\n")


def test_multi_line_messages_are_folded(monkeypatch, capsys):
    from numba_hybrid.errors import ModelFormatError

    def bad(*a, **k):
        raise ModelFormatError("first line\nsecond line")

    monkeypatch.setattr(cli, "model_facts", bad)
    assert cli.main(["info", "-m", "x.gguf"]) == 2
    # Folded to one line, and prefixed with the file the message did not name.
    assert capsys.readouterr().err == f"{ERROR_PREFIX}x.gguf: first line second line\n"


def test_main_sets_gomp_spincount(monkeypatch, capsys):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert cli.main(["info", "-m", str(Q8), "--json"]) == 0
    assert os.environ["GOMP_SPINCOUNT"] == "1000"
    assert json.loads(capsys.readouterr().out)["architecture"] == "qwen35"
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")  # a user's own setting wins
    assert cli.main(["info", "-m", str(Q8), "--json"]) == 0
    assert os.environ["GOMP_SPINCOUNT"] == "7"


# ---- help ------------------------------------------------------------------------------------

def test_help_lists_every_command():
    proc = run_cli("--help")
    assert proc.stdout.startswith("usage: numba-hybrid")
    for cmd in cli.COMMANDS:
        assert re.search(rf"^\s+{cmd.name}\s+\S", proc.stdout, re.M), cmd.name
    assert "--verbose" in proc.stdout


@pytest.mark.parametrize("name", [c.name for c in cli.COMMANDS])
def test_subcommand_help_explains_every_option(name):
    out = run_cli(name, "--help").stdout
    sub = _subparsers(cli.build_parser())[name]
    for action in sub._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        for opt in action.option_strings:
            assert opt in out, opt


def test_every_option_has_help_text():
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, action
    for name, sub in _subparsers(parser).items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, (name, action.option_strings)


def test_version():
    import numba_hybrid

    assert run_cli("--version").stdout.strip() == f"numba-hybrid {numba_hybrid.__version__}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")
