"""What the ``numba-hybrid`` commands share: the :class:`Command` record, exit codes,
output formatting, error reporting, argument types, the options several commands take
(``-m``, ``--device``, ``--precision``, ``-t``, ``-b``/``-ub``, ``-v``) and model loading.

Names with a leading underscore are private to :mod:`numba_hybrid.cli`, not to this module.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import NumbaHybridError

PROG = "numba-hybrid"
EXIT_USAGE = 2       # bad input, as argparse uses for usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of our output went away (`| head`)


@dataclass(frozen=True)
class Command:
    name: str
    help: str                                              # one line, in the command list
    description: str                                       # the subcommand's --help text
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- formatting helpers --------------------------------------------------------------------

def human_bytes(n: int | float) -> str:
    """1536 -> '1.50 KiB' (binary units; bytes below 1 KiB are written exactly)."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def _table(rows: list[tuple], header: tuple | None = None, indent: str = "  ",
           left: tuple[int, ...] = (0,)) -> list[str]:
    """Rows of cells under an optional header; columns in ``left`` are left-aligned,
    the others right-aligned."""
    cells = ([tuple(map(str, header))] if header else []) + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return [indent + "  ".join(c.ljust(w) if i in left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in cells]


# ---- errors --------------------------------------------------------------------------------

@contextlib.contextmanager
def naming_file(path: str):
    """Prefix ``path`` to a NumbaHybridError that does not name it already (tokenizer
    errors, for one, only name the metadata key), so the one error line says which file."""
    try:
        yield
    except NumbaHybridError as exc:
        if str(path) in str(exc):
            raise
        raise type(exc)(f"{path}: {exc}").with_traceback(exc.__traceback__) from None


def _error_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        msg = f"{exc.filename}: {exc.strerror}"
    return " ".join(msg.split())


# ---- argument types ------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _n_predict(text: str) -> int:
    value = _int(text)
    if value < 1 and value != -1:
        raise argparse.ArgumentTypeError(f"must be at least 1, or -1 for no limit, got {value}")
    return value


# ---- shared options ------------------------------------------------------------------------

def add_model_argument(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-m", "--model", required=required, default=None, metavar="FILE",
                   help="path of the GGUF model file (qwen3next, qwen35 or qwen35moe)"
                        + ("" if required else "; default: the bundled model"))


def _add_verbose(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="on an error, print the full traceback too")


def _add_runtime_arguments(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    from ..backend import DEFAULT_PRECISION, DEVICES, PRECISIONS

    add_model_argument(p, required=model_required)
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="compute backend: 'cpu' (Numba kernels; the first run compiles them, "
                        "then they are cached on disk) or 'reference' (float64 NumPy, slow; "
                        "for checking) (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="'fast' rounds activations to 8-bit blocks before quantized "
                        "products, as ggml does, and multiplies in integers; 'exact' keeps "
                        "them in float32 (slower, closer to the float64 math) (default: "
                        "%(default)s)")
    p.add_argument("-t", "--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for the kernels, 1 .. the machine's cores (default: all)")


def _add_batch_arguments(p: argparse.ArgumentParser, ubatch: int, what: str) -> None:
    p.add_argument("-b", "--batch-size", type=_positive_int, default=2048, metavar="N",
                   help="logical batch size; caps -ub (default: %(default)s)")
    p.add_argument("-ub", "--ubatch-size", type=_positive_int, default=ubatch, metavar="N",
                   help=f"physical batch size: the most tokens in one model step; {what} "
                        f"(default: %(default)s)")


def _batch_budget(args: argparse.Namespace) -> int:
    """Tokens per model step: -ub, capped at -b (as llama.cpp caps n_ubatch)."""
    return min(args.ubatch_size, args.batch_size)


# ---- shared by the commands that run a model -----------------------------------------------

class Progress:
    """A tqdm bar on stderr when stderr is a terminal (and tqdm is installed); ``write``
    prints around it without breaking it."""

    def __init__(self, total: int, desc: str, unit: str = "it"):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = (tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None,
                         leave=False, dynamic_ncols=True) if tqdm else None)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None and not self.bar.disable:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def write(self, text: str, file=None) -> None:
        file = file or sys.stdout
        active = self.bar is not None and not self.bar.disable
        if active:
            self.bar.clear()
        file.write(text)
        file.flush()
        if active:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_threads(n: int | None) -> None:
    if n is None:
        return
    import numba

    top = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= top:
        raise NumbaHybridError(f"-t {n}: this machine runs at most {top} threads")


def _model_path(args: argparse.Namespace) -> str:
    """The -m file, or the bundled default model (a clear error if it is not installed)."""
    if args.model is not None:
        return args.model
    from ..default_model import default_model_path

    return str(default_model_path())


def _load(args: argparse.Namespace, n_slots: int, n_ctx: int):
    from ..model import load

    _check_threads(args.threads)
    path = _model_path(args)
    with naming_file(path):
        model = load(path, device=args.device, n_slots=n_slots, n_ctx=n_ctx,
                     precision=args.precision, threads=args.threads)
    if args.device == "cpu":
        # The kernels load (or, the first time, compile) now, before any timed work: the
        # speeds a command reports are then those of the work itself (a warm run of the
        # bundled model otherwise counted ~0.4 s of loading cached code in its first tokens).
        from ..cpu import warmup

        first = not warmup.is_compiled(model.precision)
        if first:
            print("numba-hybrid: compiling the CPU kernels for this machine. This happens "
                  "once: they are cached for later runs.", file=sys.stderr, flush=True)
        t = time.perf_counter()
        warmup.warm_up(model)
        if first:
            print(f"numba-hybrid: compiled in {time.perf_counter() - t:.0f} s.",
                  file=sys.stderr, flush=True)
    return model


def _read_text(path: str, what: str = "text file") -> str:
    """A user's UTF-8 text file; a clear error when it is missing, not text, or empty."""
    with open(path, "rb") as fh:  # a missing file: OSError, reported as "path: reason"
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NumbaHybridError(f"{path}: the {what} is not UTF-8 text (byte {exc.start})") \
            from None
    if not text.strip():
        raise NumbaHybridError(f"{path}: the {what} is empty")
    return text


class DeferredInterrupt:
    """Ctrl-C as a request the command honours at its next safe point (``check``, between
    decode steps), not as a KeyboardInterrupt raised wherever Python happens to be. Raised
    inside a compiled kernel's call back into Python (numba unpickling a constant while it
    returns arrays), a KeyboardInterrupt turns into a SystemError, or into a failure that
    numba's compiler swallows, and the command would crash or carry on. A second Ctrl-C
    raises at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def checking(self, callback):
        """callback, then check: a progress callback as a safe point."""
        def call(*args, **kwargs):
            callback(*args, **kwargs)
            self.check()
        return call

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def deferring_interrupts(body):
    """A command ``body(args, interrupt)`` as ``cmd(args)``, run under a DeferredInterrupt
    whose ``check`` it calls at its safe points."""
    def cmd(args):
        with DeferredInterrupt() as interrupt:
            return body(args, interrupt)
    return cmd
