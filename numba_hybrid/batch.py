"""Batch validation and the BatchPlan every stateful kernel runs on.

A batch is four parallel arrays (llama_decode style): ``tokens[T]``, ``positions[T]``,
``seq_ids[T]``, ``want_logits[T]``. Tokens of different sequences may come in any order.
The plan groups them into *runs*, one per sequence present, each position-ascending and
continuing exactly from what its slot holds (or starting at 0, which resets the slot).
Slot = sequence id.

Plan arrays (R runs, T tokens, "grouped order" = the tokens sorted into runs):

| array       | shape | meaning                                              |
|-------------|-------|------------------------------------------------------|
| perm        | [T]   | grouped index -> batch index                          |
| tokens      | [T]   | token ids in grouped order                            |
| positions   | [T]   | positions in grouped order                            |
| run_start   | [R]   | first grouped index of each run                       |
| run_len     | [R]   | tokens in each run                                    |
| run_slot    | [R]   | state slot of each run (distinct)                     |
| run_reset   | [R]   | 1 where the run starts at position 0                  |
| out_rows    | [n_out] | grouped indices whose logits are returned, in batch order |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BatchError


@dataclass(frozen=True)
class BatchPlan:
    perm: np.ndarray
    tokens: np.ndarray
    positions: np.ndarray
    run_start: np.ndarray
    run_len: np.ndarray
    run_slot: np.ndarray
    run_reset: np.ndarray
    out_rows: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_runs(self) -> int:
        return int(self.run_start.shape[0])

    @property
    def run_last_pos(self) -> np.ndarray:
        return self.positions[self.run_start + self.run_len - 1]


_INT64_MAX = np.iinfo(np.int64).max


def _as_array(name: str, values) -> np.ndarray:
    try:
        return np.asarray(values)
    except (ValueError, TypeError) as exc:  # ragged nested lists, unconvertible objects
        raise BatchError(f"{name} is not a 1-D array ({exc})") from None


def _as_int_array(name: str, values, n: int | None) -> np.ndarray:
    arr = _as_array(name, values)
    if arr.ndim != 1:
        raise BatchError(f"{name} must be a 1-D sequence, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        # Whole floats are accepted; anything beyond int64 would wrap when cast.
        if (arr.dtype.kind == "f" and np.all(np.abs(arr) < 2.0**63)
                and np.all(arr == np.round(arr))):
            arr = arr.astype(np.int64)
        else:
            raise BatchError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "u" and arr.max() > _INT64_MAX:
        raise BatchError(f"{name} holds {arr.max()}, which is out of range")
    if n is not None and arr.shape[0] != n:
        raise BatchError(f"{name} has {arr.shape[0]} entries, tokens has {n}")
    return arr.astype(np.int64)


def plan_batch(tokens, positions, seq_ids, want_logits, slot_pos: np.ndarray,
               n_ctx: int, n_vocab: int) -> BatchPlan:
    """Validate a batch against the slots' last positions and decompose it into runs.
    Raises BatchError (and touches nothing) if the batch is invalid."""
    tok = _as_int_array("tokens", tokens, None)
    T = tok.shape[0]
    if T == 0:
        raise BatchError("empty batch: no tokens")
    pos = _as_int_array("positions", positions, T)
    seq = _as_int_array("seq_ids", seq_ids, T)
    if want_logits is None:
        want = np.ones(T, dtype=bool)
    else:
        want = _as_array("logits flags", want_logits)
        if want.ndim != 1 or want.shape[0] != T:
            raise BatchError(f"logits flags must have {T} entries, got shape {want.shape}")
        if T and want.dtype.kind not in "biu":  # "False" or None would silently cast
            raise BatchError(f"logits flags must be booleans, got dtype {want.dtype}")
        want = want.astype(bool)
    n_slots = slot_pos.shape[0]
    err, perm, starts, lens, out_rows = _planner()(tok, pos, seq, want, slot_pos, n_ctx,
                                                    n_vocab)
    code, i, a, b = (int(v) for v in err)
    if code == _BAD_TOKEN:
        raise BatchError(f"token id {tok[i]} at batch index {i} is outside the vocabulary "
                         f"0..{n_vocab - 1}")
    if code == _BAD_SEQ:
        raise BatchError(f"sequence id {seq[i]} at batch index {i} is outside "
                         f"0..{n_slots - 1}")
    if code == _BAD_POS:
        raise BatchError(f"position {pos[i]} at batch index {i} is outside the context "
                         f"0..{n_ctx - 1}")
    if code == _BAD_START:          # i: the slot, a: its first position, b: the expected
        if b == 0:
            raise BatchError(f"sequence {i} is empty, so its first position must be 0,"
                             f" got {a}")
        raise BatchError(f"sequence {i} continues at position {b} (or "
                         f"restarts at 0), got {a}")
    if code == _BAD_STEP:           # i: the slot, a: the position, b: 0 repeated, else missing
        what = "repeated" if b == 0 else "missing"
        raise BatchError(f"sequence {i}: position {a} is {what} in the batch")
    g_pos = pos[perm]
    return BatchPlan(
        perm=perm,
        tokens=tok[perm],
        positions=g_pos,
        run_start=starts,
        run_len=lens,
        run_slot=seq[perm[starts]],
        run_reset=(g_pos[starts] == 0).astype(np.uint8),
        out_rows=out_rows,
    )


_OK, _BAD_TOKEN, _BAD_SEQ, _BAD_POS, _BAD_START, _BAD_STEP = range(6)


def _plan(tok, pos, seq, want, slot_pos, n_ctx, n_vocab):
    """The checks and the grouping of plan_batch, compiled (a step's Python work runs
    with cold caches after the weights have streamed through them; this is one call).
    Returns (err [code, index or slot, a, b], perm, run starts, run lengths, out_rows);
    the checks go in the order of their messages, each reporting its first offender."""
    T = tok.size
    err = np.zeros(4, np.int64)
    empty = np.empty(0, np.int64)
    checks = ((_BAD_TOKEN, tok, n_vocab), (_BAD_SEQ, seq, slot_pos.size), (_BAD_POS, pos, n_ctx))
    for code, values, limit in checks:
        for i in range(T):
            if values[i] < 0 or values[i] >= limit:
                err[0], err[1] = code, i
                return err, empty, empty, empty, empty
    # Group by slot, then by position; stable, so the plan is a pure function of the batch.
    perm = np.argsort(seq * n_ctx + pos, kind="mergesort")
    n_runs = 1
    for j in range(1, T):
        n_runs += seq[perm[j]] != seq[perm[j - 1]]
    starts = np.empty(n_runs, np.int64)
    lens = np.empty(n_runs, np.int64)
    r = 0
    for j in range(T):
        if j == 0 or seq[perm[j]] != seq[perm[j - 1]]:
            starts[r] = j
            r += 1
    for r in range(n_runs):
        lens[r] = (starts[r + 1] if r + 1 < n_runs else T) - starts[r]
        slot, first = seq[perm[starts[r]]], pos[perm[starts[r]]]
        expect = slot_pos[slot] + 1
        if first != 0 and first != expect:
            err[0], err[1], err[2], err[3] = _BAD_START, slot, first, expect
            return err, empty, empty, empty, empty
        for j in range(starts[r] + 1, starts[r] + lens[r]):
            step = pos[perm[j]] - pos[perm[j - 1]]
            if step != 1:
                err[0], err[1], err[3] = _BAD_STEP, slot, step
                err[2] = pos[perm[j - 1]] + (0 if step == 0 else 1)
                return err, empty, empty, empty, empty
    inv = np.empty(T, np.int64)
    for j in range(T):
        inv[perm[j]] = j
    n_out = 0
    for i in range(T):
        n_out += want[i]
    out_rows = np.empty(n_out, np.int64)
    k = 0
    for i in range(T):
        if want[i]:
            out_rows[k] = inv[i]
            k += 1
    return err, perm, starts, lens, out_rows


_compiled = None


def _planner():
    """_plan compiled on first use (numba loads when a batch is first planned, not on
    import)."""
    global _compiled
    if _compiled is None:
        import numba

        _compiled = numba.njit(cache=True, nogil=True)(_plan)
    return _compiled
