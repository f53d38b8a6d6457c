"""Logprobs of a token: the log-softmax of the model's logits at one batch position, before
any sampler truncates or biases them (as OpenAI and llama-server report them).

Only sequences that ask for logprobs pay for this (a log-softmax over the vocabulary, about
a millisecond on Gemma's 262k tokens). Engine thread only.
"""

from __future__ import annotations

from typing import Any

import llama_cpp
import numpy as np

from workers.engine.sampling import logits_view
from workers.engine.vocab import Vocab


class Logprobs:
    """Reads logprobs from a context's logits for one model's vocabulary."""

    def __init__(self, ctx: Any, vocab: Vocab, n_vocab: int):
        self.ctx = ctx
        self.vocab = vocab
        self.n_vocab = n_vocab

    def entry(self, index: int, token: int, top: int, offset: int) -> dict[str, Any]:
        """`token`'s logprob at batch position `index`, with the `top` likeliest tokens
        there (most likely first), and `offset`: where its text starts in the reply."""
        logits = logits_view(llama_cpp.llama_get_logits_ith(self.ctx, index), self.n_vocab)
        high = float(logits.max())
        total = high + float(np.log(np.exp(logits - high, dtype=np.float64).sum()))
        found = self.token(token, float(logits[token]) - total)
        alternatives: list[dict[str, Any]] = []
        if top > 0:
            best = np.argpartition(-logits, top - 1)[:top]
            best = best[np.argsort(-logits[best], kind="stable")]
            alternatives = [self.token(int(t), float(logits[t]) - total) for t in best]
        return {**found, "top_logprobs": alternatives, "text_offset": offset}

    def token(self, token: int, logprob: float) -> dict[str, Any]:
        """A token as OpenAI reports it: its text, its UTF-8 bytes and a logprob."""
        piece = self.vocab.piece(token, special=True)
        return {
            "token": piece.decode("utf-8", "replace"),
            "bytes": list(piece),
            "logprob": max(logprob, -9999.0),  # JSON has no -infinity
            "id": token,
        }


def first_prompt_token(token: int, vocab: Vocab, offset: int = 0) -> dict[str, Any]:
    """The prompt's first token (after a BOS): nothing before it to predict it from."""
    piece = vocab.piece(token, special=True)
    return {
        "token": piece.decode("utf-8", "replace"),
        "bytes": list(piece),
        "logprob": None,
        "id": token,
        "top_logprobs": None,
        "text_offset": offset,
    }
