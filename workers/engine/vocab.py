"""A model's vocabulary as the engine reads it: token text as a reader sees it, turn ends.

Control tokens (<bos>, <start_of_turn>, <end_of_turn>) render as nothing, as llama.cpp's
`special=False` does. Some GGUFs mark a model's markers for non-text input as
user-defined rather than control: Gemma 3's <start_of_image>, <end_of_image> and
[multimodal] have the same type as its <table> and runs of tabs, which are text. A text
engine never shows those markers either (`text.is_marker`). Engine thread only.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp

from workers.engine.text import is_marker


class Vocab:
    """Token text and turn ends for one model's vocabulary (a `llama_vocab` pointer)."""

    def __init__(self, vocab: Any):
        self.ptr = vocab
        self._buf = ctypes.create_string_buffer(256)
        self._hidden: dict[int, bool] = {}  # token -> renders as nothing; filled as sampled
        # token -> the bytes a reader sees, and token -> ends generation: filled as sampled,
        # so that a token costs a dict lookup rather than llama.cpp calls through ctypes.
        self._shown: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._markers: tuple[int, ...] | None = None

    def text(self, token: int, shown: frozenset[int] = frozenset()) -> bytes:
        """The bytes a reader sees for `token`: nothing for a control token or a marker,
        unless it is one of `shown` (a tool-call marker the worker parses), then its name."""
        if token in shown:
            return self.piece(token, special=True)
        text = self._shown.get(token)
        if text is None:
            text = self._shown[token] = b"" if self.hidden(token) else self.piece(token)
        return text

    def hidden(self, token: int) -> bool:
        """True for a token that is not text: a control token or a non-text marker."""
        hidden = self._hidden.get(token)
        if hidden is None:
            attr = int(llama_cpp.llama_vocab_get_attr(self.ptr, token))
            hidden = bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL) or bool(
                attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED and is_marker(self.name(token))
            )
            self._hidden[token] = hidden
        return hidden

    def markers(self) -> tuple[int, ...]:
        """The vocabulary's markers for non-text input (<start_of_image> ...): a text engine
        never samples them (they would cost a token and show nothing). Read once."""
        if self._markers is None:
            n = int(llama_cpp.llama_vocab_n_tokens(self.ptr))
            user_defined = llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
            self._markers = tuple(
                token
                for token in range(n)
                if int(llama_cpp.llama_vocab_get_attr(self.ptr, token)) & user_defined
                and is_marker(self.name(token))
            )
        return self._markers

    def ends_turn(self, token: int, stops: tuple[str, ...]) -> bool:
        """End of generation, or a hidden token that starts a stop string (<end_of_turn>).

        Hidden tokens render as nothing, so a chat template's stop string such as
        "<end_of_turn>\\n" would never match the text; match the token's own name instead.
        """
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.ptr, token))
        if eog:
            return True
        if not self.hidden(token):
            return False
        name = self.name(token)
        return bool(name) and any(stop.startswith(name) for stop in stops)

    def name(self, token: int) -> str:
        """The token as written in the vocabulary (<end_of_turn>, not nothing)."""
        return self.piece(token, special=True).decode("utf-8", "replace")

    def piece(self, token: int, special: bool = False) -> bytes:
        """llama.cpp's text for `token`; with `special`, control tokens by their names."""
        buf = self._buf
        n = llama_cpp.llama_token_to_piece(self.ptr, token, buf, len(buf), 0, special)
        if n < 0:  # a longer piece than the buffer: -n is its length
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.ptr, token, buf, len(buf), 0, special)
        return buf.raw[:n]
