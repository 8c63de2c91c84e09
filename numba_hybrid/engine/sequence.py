"""Sequence: one prompt being continued -- its tokens, its slot, its sampler, its stops.

A sequence's tokens are its prompt followed by what it has generated. ``n_cached`` of them
are in its slot's state; the scheduler feeds the rest (a prefill chunk, or the one token
sampled last). Text comes out UTF-8 safe: token bytes go through an incremental decoder,
so a character split over tokens is emitted once complete, and text that may be the start
of a stop string is held back until it is known not to be one.

Stops, in the order they are checked after each sampled token:
``"eog"`` an end-of-generation token of the GGUF (not part of the output),
``"stop"`` a stop string appeared (the text ends before it; the token ids keep every
token sampled), ``"length"`` ``max_tokens`` were generated, ``"context"`` the context is
full. ``"interrupted"`` marks a sequence the caller stopped.
"""

from __future__ import annotations

import codecs
import enum
from dataclasses import dataclass, field

import numpy as np

from .sampler import InvalidParameterError, Sampler

FINISH_REASONS = ("eog", "stop", "length", "context", "interrupted")


class Status(enum.Enum):
    WAITING = "waiting"     # not in a slot yet
    RUNNING = "running"     # holds a slot
    FINISHED = "finished"


@dataclass(frozen=True)
class StopCriteria:
    """When a sequence ends, besides a full context.

    max_tokens   most tokens to generate (None: until the context is full)
    stop         strings that end the text when they appear (not included in it)
    ignore_eos   keep going past end-of-generation tokens
    """

    max_tokens: int | None = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens is not None:
            if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                    or self.max_tokens < 1:
                raise InvalidParameterError(
                    f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InvalidParameterError(f"stop strings must be non-empty strings, "
                                            f"got {s!r}")
        object.__setattr__(self, "stop", stop)


@dataclass
class Completion:
    """What a finished (or interrupted) sequence produced."""

    index: int
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None
    seed: int | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(eq=False)
class Sequence:
    """One sequence; created by the engine, advanced by the scheduler and the runner."""

    index: int                     # its place in the caller's list of prompts
    prompt: list[int]
    sampler: Sampler
    criteria: StopCriteria
    eog_ids: frozenset[int]
    token_bytes: object            # token id -> bytes (the tokenizer's token_to_piece)
    seed: int | None = None
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    n_cached: int = 0              # tokens already in the slot's state
    status: Status = Status.WAITING
    finish_reason: str | None = None
    text: str = ""                 # decoded output so far (cut at a stop string)
    n_emitted: int = 0             # characters of ``text`` already handed out

    def __post_init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tokens = np.array(self.prompt, dtype=np.int64)
        self._max_stop = max((len(s) for s in self.criteria.stop), default=0)

    # ---- tokens ------------------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self.prompt) + len(self.output)

    @property
    def tokens(self) -> np.ndarray:
        """Prompt then output, as one int64 array."""
        if self._tokens.shape[0] != self.n_tokens:
            self._tokens = np.array(self.prompt + self.output, dtype=np.int64)
        return self._tokens

    @property
    def n_pending(self) -> int:
        """Tokens not yet in the slot's state (the prompt's rest, or the last sampled one)."""
        return self.n_tokens - self.n_cached

    @property
    def is_prefilling(self) -> bool:
        return self.n_cached < len(self.prompt)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    # ---- advancing ---------------------------------------------------------------------

    def append(self, token: int, n_ctx: int) -> str:
        """Take a sampled token; check the stops. Returns the text that became final."""
        token = int(token)
        if token in self.eog_ids and not self.criteria.ignore_eos:
            self.finish("eog")
            return self.take_text()
        self.output.append(token)
        before = len(self.text)
        self.text += self._decoder.decode(self.token_bytes(token))
        if self._max_stop and self._cut_at_stop(before):
            self.finish("stop")
        elif self.criteria.max_tokens is not None and len(self.output) >= self.criteria.max_tokens:
            self.finish("length")
        elif self.n_tokens >= n_ctx:
            # The next token would need position n_ctx.
            self.finish("context")
        return self.take_text()

    def finish(self, reason: str) -> None:
        """End the sequence; flushes an incomplete character (as U+FFFD) unless it stopped
        at a stop string."""
        assert reason in FINISH_REASONS, reason
        if self.status is Status.FINISHED:
            return
        if reason != "stop":
            self.text += self._decoder.decode(b"", final=True)
        self.status = Status.FINISHED
        self.finish_reason = reason

    def take_text(self) -> str:
        """Characters not handed out yet, except a tail that may begin a stop string."""
        end = len(self.text)
        if not self.is_finished and self._max_stop:
            end -= self._stop_prefix_len()
        piece = self.text[self.n_emitted:end]
        self.n_emitted = max(self.n_emitted, end)
        return piece

    def completion(self) -> Completion:
        return Completion(self.index, self.text, list(self.output), list(self.prompt),
                          self.finish_reason, self.seed)

    # ---- stop strings ------------------------------------------------------------------

    def _cut_at_stop(self, before: int) -> bool:
        """Cut ``text`` at the first stop string that ends in the new characters."""
        start = max(0, before - self._max_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.criteria.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        return True

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.criteria.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

