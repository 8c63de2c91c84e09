"""The ``numba-hybrid`` command line (also ``python -m numba_hybrid``).

Each subcommand is a :class:`Command` in :data:`COMMANDS`: a function that adds its
options to an argparse subparser and a function that runs it and returns the exit code.
Adding a command (``serve``, say) means writing those two functions, in a module of this
package of their own, and appending one entry. The commands that run a model (``run``,
``perplexity``, ``parallel``, ``bench``) compute through :mod:`numba_hybrid.engine`; this
package only parses, loads and prints.

Modules: :mod:`.common` (what the commands share: exit codes, formatting, error
reporting, shared options, model loading), one module per command (:mod:`.info`,
:mod:`.run`, :mod:`.perplexity`, :mod:`.parallel`, :mod:`.bench`), and here the command
table, the parser and :func:`main`. The commands look ``model_facts`` and ``_load`` up on
this package when they run, so replacing ``numba_hybrid.cli.model_facts`` or
``numba_hybrid.cli._load`` (as the tests do) reaches them.

Exit codes: 0 success; 1 ``parallel`` found a difference; 2 bad input (any
NumbaHybridError, an OSError on a user's file, or a usage error from argparse), printed as
ONE line ``numba-hybrid: error: <message>`` on stderr, with the traceback only under
``--verbose``; 130 on Ctrl-C; 141 when the reader of the output goes away (``| head``).
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..errors import NumbaHybridError
from .bench import _bench_arguments, cmd_bench
from .common import (EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USAGE, PROG, Command, Progress,
                     _add_verbose, _error_line, add_model_argument, human_bytes, naming_file)
from .common import _load  # noqa: F401  (the commands call it from here: see above)
from .info import (_info_arguments, cmd_info, format_info, layer_letters, layer_ranges,
                   model_facts, state_sizes)
from .parallel import _parallel_arguments, cmd_parallel
from .perplexity import _perplexity_arguments, cmd_perplexity
from .run import _run_arguments, cmd_run

__all__ = [
    "COMMANDS", "Command", "build_parser", "main", "PROG", "EXIT_USAGE", "EXIT_INTERRUPTED",
    "EXIT_BROKEN_PIPE", "Progress", "add_model_argument", "naming_file", "human_bytes",
    "layer_ranges", "layer_letters", "state_sizes", "model_facts", "format_info", "cmd_info",
    "cmd_run", "cmd_perplexity", "cmd_parallel", "cmd_bench",
]


# ---- the command table ---------------------------------------------------------------------

COMMANDS: list[Command] = [
    Command("info", "describe a GGUF model: hyper-parameters, layers, tensors, memory",
            "Read a GGUF model and print its architecture, every hyper-parameter, the layer "
            "plan, tensor types with counts and bytes, unused tensors, the memory the weights "
            "and the state need for the given context and slots, and a tokenizer summary. "
            "Nothing is allocated and no backend is started.",
            _info_arguments, cmd_info),
    Command("run", "continue prompts (several at once on parallel slots), streaming the text",
            "Continue one or more prompts. One prompt streams its continuation to stdout as it "
            "is generated; several -p prompts run concurrently (continuous batching over "
            "-np slots) and each continuation is printed when it is done, as '[i] text'. "
            "Generation stops at an end-of-generation token, a --stop text, -n tokens or a "
            "full context. A summary (tokens, speed, seed) goes to stderr. Ctrl-C stops "
            "cleanly, prints what was produced and exits with 130. Without -m, the bundled "
            "default model is used.",
            _run_arguments, cmd_run),
    Command("perplexity", "perplexity of a text file, as llama-perplexity computes it",
            "Cut the tokenized text into chunks of -c tokens, run each as a fresh sequence "
            "(-ub / -c chunks in parallel per batch) and score the second half of each chunk. "
            "Prints the running perplexity after each chunk ('[i]value,') and the final "
            "estimate with its standard error. The result is bitwise the same for any -ub.",
            _perplexity_arguments, cmd_perplexity),
    Command("parallel", "check that N sequences decode together exactly as alone",
            "Decode N different prompts greedily, first each alone, then all N at once with "
            "their prompts split into chunks that share batches with the others' decoding, "
            "and compare the token streams and the logits of every step bitwise. Prints a "
            "table; exits with 1 if any sequence differs. Run it after changing anything.",
            _parallel_arguments, cmd_parallel),
    Command("bench", "speed: prompt processing and generation vs depth, and N parallel",
            "Time prompt processing (-ub tokens in one step) and generation (-n tokens one by "
            "one) at each context depth, like llama-sweep-bench, and aggregate generation "
            "speed with N parallel sequences, like llama-batched-bench. Warms up (JIT) and "
            "checks that parallel decoding is exact before timing. Prints tables; --plot "
            "draws them to a PNG.",
            _bench_arguments, cmd_bench),
]


# ---- parser and entry point ----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inference engine for hybrid recurrent LLMs (Qwen3-Next, Qwen3.5) "
                    "in GGUF files.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_verbose(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands",
                                help="one of the commands below")
    sub.required = True
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description)
        # Accepted after the subcommand too; SUPPRESS keeps a flag given before it.
        _add_verbose(p, argparse.SUPPRESS)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before anything can load numba's parallel runtime (backends import numba lazily, at
    # load time): libgomp reads GOMP_SPINCOUNT once, when it is loaded. Its default spin
    # (about 3*10^5 iterations before a worker thread sleeps) makes every parallel region
    # wait out a scheduler slice on a busy 2-core machine, where the spinning threads and
    # the one doing work compete for the same cores.
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints them, exit code 2

    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Silence the second BrokenPipeError Python would hit flushing stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (NumbaHybridError, OSError) as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {_error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
