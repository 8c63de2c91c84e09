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

    bad = np.flatnonzero((tok < 0) | (tok >= n_vocab))
    if bad.size:
        i = bad[0]
        raise BatchError(f"token id {tok[i]} at batch index {i} is outside the vocabulary "
                         f"0..{n_vocab - 1}")
    bad = np.flatnonzero((seq < 0) | (seq >= n_slots))
    if bad.size:
        i = bad[0]
        raise BatchError(f"sequence id {seq[i]} at batch index {i} is outside "
                         f"0..{n_slots - 1}")
    bad = np.flatnonzero((pos < 0) | (pos >= n_ctx))
    if bad.size:
        i = bad[0]
        raise BatchError(f"position {pos[i]} at batch index {i} is outside the context "
                         f"0..{n_ctx - 1}")

    # Group by slot, then by position; stable, so the plan is a pure function of the batch.
    perm = np.lexsort((pos, seq))
    g_seq, g_pos = seq[perm], pos[perm]
    starts = np.flatnonzero(np.r_[True, g_seq[1:] != g_seq[:-1]])
    lens = np.diff(np.r_[starts, T])
    for s, n in zip(starts, lens):
        slot = g_seq[s]
        p = g_pos[s:s + n]
        expect_first = int(slot_pos[slot]) + 1
        if p[0] != 0 and p[0] != expect_first:
            if expect_first == 0:
                raise BatchError(f"sequence {slot} is empty, so its first position must be 0,"
                                 f" got {p[0]}")
            raise BatchError(f"sequence {slot} continues at position {expect_first} (or "
                             f"restarts at 0), got {p[0]}")
        steps = np.diff(p)
        if np.any(steps != 1):
            k = int(np.flatnonzero(steps != 1)[0])
            what = "repeated" if steps[k] == 0 else "missing"
            pp = p[k] + (0 if steps[k] == 0 else 1)
            raise BatchError(f"sequence {slot}: position {pp} is {what} in the batch")

    out_rows_batch = np.flatnonzero(want)
    inv = np.empty(T, dtype=np.int64)
    inv[perm] = np.arange(T)
    return BatchPlan(
        perm=perm.astype(np.int64),
        tokens=tok[perm],
        positions=g_pos,
        run_start=starts.astype(np.int64),
        run_len=lens.astype(np.int64),
        run_slot=g_seq[starts].astype(np.int64),
        run_reset=(g_pos[starts] == 0).astype(np.uint8),
        out_rows=inv[out_rows_batch],
    )
