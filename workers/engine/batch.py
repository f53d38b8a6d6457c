"""A llama_batch filled through numpy views, a run of positions at a time.

Writing a batch field by field through ctypes costs about a microsecond per token: 0.5 ms
for a 512-token prompt chunk, and tens of microseconds a step at 32 sequences. Here the
token, position and logits arrays of llama.cpp's batch are numpy views, and each position's
sequence id points into one numpy array of ours (llama_batch_init allocates one small array
per position; they are put back before llama_batch_free frees them). Every position holds
exactly one sequence.

Indices are checked before writing: llama.cpp aborts the process on a batch past n_batch.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np

_SEQ_ID_P = ctypes.POINTER(llama_cpp.llama_seq_id)


class Batch:
    """`size` positions; `n_tokens` of them are decoded (set it before llama_decode)."""

    def __init__(self, size: int):
        self.size = size
        self.raw = llama_cpp.llama_batch_init(size, 0, 1)
        raw = self.raw
        self.token = np.ctypeslib.as_array(raw.token, shape=(size,))
        self.pos = np.ctypeslib.as_array(raw.pos, shape=(size,))
        self.logits = np.ctypeslib.as_array(raw.logits, shape=(size,))
        self.seq = np.zeros(size, dtype=np.int32)
        # llama_batch_init's arrays, to put back for llama_batch_free: their addresses (an
        # item of a ctypes pointer array is a view of the array, not a copy).
        self._own = [ctypes.cast(raw.seq_id[i], ctypes.c_void_p).value or 0 for i in range(size)]
        item = ctypes.sizeof(ctypes.c_int32)
        base = self.seq.ctypes.data
        for i in range(size):
            raw.seq_id[i] = ctypes.cast(base + i * item, _SEQ_ID_P)
            raw.n_seq_id[i] = 1

    @property
    def n_tokens(self) -> int:
        return int(self.raw.n_tokens)

    @n_tokens.setter
    def n_tokens(self, n: int) -> None:
        self._check(0, n)
        self.raw.n_tokens = n

    def run(self, at: int, tokens: Sequence[int], pos: int, seq_id: int, output: bool) -> int:
        """Positions at.. hold `tokens` of sequence `seq_id` at positions pos, pos+1, ...,
        each with logits or not; the index after them."""
        end = at + len(tokens)
        self._check(at, end)
        self.token[at:end] = tokens
        self.pos[at:end] = np.arange(pos, pos + len(tokens))
        self.seq[at:end] = seq_id
        self.logits[at:end] = output
        return end

    def each(
        self, at: int, tokens: Sequence[int], pos: Sequence[int], seq_ids: Sequence[int]
    ) -> int:
        """One token of each of several sequences, each with logits; the index after them."""
        end = at + len(tokens)
        self._check(at, end)
        self.token[at:end] = tokens
        self.pos[at:end] = pos
        self.seq[at:end] = seq_ids
        self.logits[at:end] = True
        return end

    def _check(self, at: int, end: int) -> None:
        if not 0 <= at <= end <= self.size:  # past n_batch llama.cpp would abort the process
            raise IndexError(f"batch positions {at}..{end} outside n_batch {self.size}")

    def free(self) -> None:
        raw: Any = self.raw
        for i, own in enumerate(self._own):
            raw.seq_id[i] = ctypes.cast(own, _SEQ_ID_P)
        llama_cpp.llama_batch_free(raw)
