"""Engine: the generation loop -- schedule a step, run it, sample, stop, free slots.

``generate`` and ``chat`` (behind ``Model.generate`` and ``Model.chat``) build an Engine for
one call, add a sequence per prompt and drive it. Each sequence samples with its own
generator seeded from its seed alone, so its tokens depend only on its prompt, its
parameters and its seed -- never on what else runs, in which batch, or where it stands in
the list of prompts. (To draw different samples of one prompt, give each its own seed, or
none: every sequence without a seed gets a fresh one.)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import NumbaHybridError
from .runner import Runner
from .sampler import InvalidParameterError, Sampler, SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, StopCriteria

# (sequence, logits [V]) -> new logits or None (changed in place, or only looked at).
LogitsProcessor = Callable[[Sequence, np.ndarray], "np.ndarray | None"]


@dataclass(frozen=True)
class Event:
    """A sequence sampled ``token``; ``text`` is what became final with it (may be "")."""

    seq: Sequence
    token: int
    text: str

    @property
    def finished(self) -> bool:
        return self.seq.is_finished


def fresh_seed() -> int:
    """A random seed (from the OS entropy pool), to report so a run can be repeated."""
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))


class Engine:
    """Continuous batching over a model's slots. Slots must be free when it starts; it
    leaves them free (reset) when its sequences end or are aborted."""

    def __init__(self, model, max_batch_tokens: int = 512,
                 logits_processors: Iterable[LogitsProcessor] = ()):
        self.model = model
        self.tokenizer = model.tokenizer
        self.scheduler = Scheduler(model.n_slots, model.n_ctx, int(max_batch_tokens))
        self.runner = Runner(model)
        self.logits_processors = list(logits_processors)
        self.sequences: list[Sequence] = []

    @property
    def stats(self):
        return self.runner.stats

    def add(self, prompt: Iterable[int], sampling: SamplingParams | None = None,
            criteria: StopCriteria | None = None, index: int | None = None,
            seed: int | None = None) -> Sequence:
        """Queue a prompt (token ids). ``seed`` overrides ``sampling.seed``; with neither, a
        fresh one is drawn (greedy sampling needs none). Raises on an empty or too long
        prompt, or a token outside the vocabulary, before anything runs."""
        sampling = sampling or SamplingParams()
        ids = [int(t) for t in prompt]
        n_vocab = self.model.args.n_vocab
        bad = [t for t in ids if not 0 <= t < n_vocab]
        if bad:
            raise NumbaHybridError(f"token id {bad[0]} is outside the vocabulary "
                                   f"0..{n_vocab - 1}")
        index = len(self.sequences) if index is None else int(index)
        seed = sampling.seed if seed is None else seed
        rng = None
        if not sampling.is_greedy:
            seed = fresh_seed() if seed is None else seed
            rng = np.random.default_rng(seed)
        seq = Sequence(index, ids, Sampler(sampling, rng), criteria or StopCriteria(),
                       self.tokenizer.eog_ids, self.tokenizer.token_to_piece,
                       seed if rng is not None else None)
        self.scheduler.add(seq)
        self.sequences.append(seq)
        return seq

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[Event]:
        """Run one batch; one event per sequence that sampled a token."""
        step = self.scheduler.schedule()
        if step is None:
            # Every running sequence has a pending token and waiting ones get free slots,
            # so work left with nothing to schedule is a bug, not a state to spin in.
            assert not self.has_work, "the scheduler has work but scheduled nothing"
            return []
        logits = self.runner.forward(step)
        self.scheduler.advance(step)
        events = []
        for row, seq in zip(logits, step.samples):
            for process in self.logits_processors:
                changed = process(seq, row)
                row = row if changed is None else changed
            token = seq.sampler.sample(row, seq.tokens)
            text = seq.append(token, self.model.n_ctx)
            if seq.is_finished:
                self._release(seq)
            events.append(Event(seq, token, text))
        return events

    def events(self) -> Iterator[Event]:
        while self.has_work:
            yield from self.step()

    def abort(self, reason: str = "interrupted") -> None:
        """End every unfinished sequence and free its slot (safe to call at any time)."""
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            seq.finish(reason)
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        slot = self.scheduler.release(seq)
        if slot is not None:
            self.runner.release(slot)


# ---- the calls behind Model.generate / Model.chat ----------------------------------------

def _is_token_list(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim == 1 and x.dtype.kind in "iu"
    return (isinstance(x, (list, tuple)) and len(x) > 0
            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in x))


def _prompt_list(prompt) -> tuple[bool, list]:
    """(single?, prompts) where each prompt is a str or a list of token ids."""
    if isinstance(prompt, str) or _is_token_list(prompt):
        return True, [prompt]
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise InvalidParameterError("no prompts given")
        for i, p in enumerate(prompt):
            if not (isinstance(p, str) or _is_token_list(p)):
                raise InvalidParameterError(f"prompt {i} is neither a string nor a list of "
                                            f"token ids: {p!r:.60}")
        return False, list(prompt)
    raise InvalidParameterError(f"a prompt must be a string, a list of token ids or a list "
                                f"of those, got {type(prompt).__name__}")


def _sampling_list(sampling, n: int) -> list[SamplingParams]:
    if sampling is None or isinstance(sampling, SamplingParams):
        return [sampling or SamplingParams()] * n
    if isinstance(sampling, (list, tuple)) and all(isinstance(s, SamplingParams)
                                                   for s in sampling):
        if len(sampling) != n:
            raise InvalidParameterError(f"{len(sampling)} SamplingParams for {n} prompts")
        return list(sampling)
    raise InvalidParameterError(f"sampling must be a SamplingParams or a list of them, got "
                                f"{type(sampling).__name__}")


def encode_prompt(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special=True)
    return [int(t) for t in prompt]


def generate(model, prompt, max_tokens: int | None = 256,
             sampling: SamplingParams | None = None, stream: bool = False,
             stop: str | Iterable[str] | None = None, ignore_eos: bool = False,
             max_batch_tokens: int = 512,
             logits_processors: Iterable[LogitsProcessor] = ()):
    """Continue one prompt or several (concurrently, on the model's slots).

    ``prompt``: a string, a list of token ids, or a list of those. ``sampling``: one
    SamplingParams for all, or a list with one per prompt. Returns a Completion (a list of
    them for a list of prompts). With ``stream=True`` returns a generator of text pieces
    instead -- ``str`` for one prompt, ``(index, str)`` for several -- each made of whole
    UTF-8 characters; the generator's return value is the Completion(s).
    """
    single, prompts = _prompt_list(prompt)
    params = _sampling_list(sampling, len(prompts))
    criteria = StopCriteria(max_tokens, stop if stop is not None else (), bool(ignore_eos))
    engine = Engine(model, max_batch_tokens, logits_processors)
    seqs = [engine.add(encode_prompt(model.tokenizer, p), sp, criteria, index=i)
            for i, (p, sp) in enumerate(zip(prompts, params))]
    if stream:
        return _stream(engine, seqs, single)
    try:
        for _ in engine.events():
            pass
    finally:
        engine.abort()
    results = [s.completion() for s in seqs]
    return results[0] if single else results


def _stream(engine: Engine, seqs: list[Sequence], single: bool):
    try:
        for ev in engine.events():
            if ev.text:
                yield ev.text if single else (ev.seq.index, ev.text)
    finally:
        # Closed early, interrupted or failed: free the slots of what is still running.
        engine.abort()
    results = [s.completion() for s in seqs]
    return results[0] if single else results


def render_chat(tokenizer, messages) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template, ready for
    the assistant's reply."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidParameterError("messages must be a non-empty list of "
                                    "{'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InvalidParameterError(f"message {i} must be a dict with 'role' and "
                                        f"'content', got {m!r:.60}")
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    bos = tokenizer.bos_id
    has_bos = bos is not None and text.startswith(
        tokenizer.token_to_piece(bos).decode("utf-8", "replace"))
    return tokenizer.encode(text, add_special=not has_bos)


def chat(model, messages, **kwargs):
    """Continue a conversation (a list of {'role', 'content'} dicts), or several (a list
    of such lists), through the GGUF's chat template. Same options and results as
    :func:`generate`."""
    several = (isinstance(messages, (list, tuple)) and messages
               and all(isinstance(m, (list, tuple)) for m in messages))
    convs = list(messages) if several else [messages]
    ids = [render_chat(model.tokenizer, c) for c in convs]
    return generate(model, ids if several else ids[0], **kwargs)


__all__ = ["Engine", "Event", "LogitsProcessor", "chat", "generate"]
