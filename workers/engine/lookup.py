"""Prompt lookup: draft tokens for speculative decoding from a sequence's own tokens.

A reply that quotes its prompt (an extraction, a summary that quotes, a code edit, a RAG
answer) often goes on the way the prompt went the last time the same few tokens appeared.
The draft is the tokens that followed the latest earlier occurrence of the sequence's last
tokens (NGRAMS, the longest first). The engine feeds the draft after the sequence's next
token in the same batch and samples each position in turn: a drafted token is kept only
when it is the token the sampler picks there. The sampler runs once per kept token, in the
same order, so the reply is drawn from the same distribution as without a draft, and it is
the same reply wherever llama.cpp gives a position the same logits in a batch of 1 and of
9 (its CPU kernels differ in the last bits: a near tie can flip, as it can between two
batches without drafts). llama-server's `--spec-type ngram-simple` drafts the same way.

Each token added costs a dict write per n-gram size; a draft costs one lookup per size.
"""

from __future__ import annotations

NGRAMS = (3, 2)  # the n-gram sizes looked up, the longest first


class PromptLookup:
    """The n-grams of one sequence's tokens (prompt, then reply) and where each last ended."""

    def __init__(self, tokens: list[int]):
        self.tokens = list(tokens)
        # Per n-gram size: n-gram -> the position just after its latest occurrence that a
        # token already follows (built in C loops: ~7 ms for 8,000 prompt tokens).
        self._after: dict[int, dict[tuple[int, ...], int]] = {}
        for n in NGRAMS:
            grams = zip(*(tokens[i:] for i in range(n)), strict=False)  # each n-gram in turn
            # the last n-gram has no follower: the shorter range leaves it out
            self._after[n] = dict(zip(grams, range(n, len(tokens)), strict=False))

    def add(self, token: int) -> None:
        """The sequence's next token."""
        tokens = self.tokens
        end = len(tokens)  # the position `token` takes: the n-grams before it now have a follower
        for n, after in self._after.items():
            if end >= n:
                after[tuple(tokens[end - n : end])] = end
        tokens.append(token)

    def draft(self, most: int) -> list[int]:
        """Up to `most` tokens that followed the latest earlier occurrence of the last n-gram."""
        tokens = self.tokens
        if most > 0:
            for n, after in self._after.items():
                at = after.get(tuple(tokens[-n:])) if len(tokens) > n else None
                if at is not None:
                    return tokens[at : at + most]
        return []
