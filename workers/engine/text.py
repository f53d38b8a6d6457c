"""From sampled tokens to the text a caller sees: UTF-8 pieces, stop strings, streaming.

Text that could be the start of a stop string is held back until it is clearly not, so a
streaming reader never sees the beginning of a stop string that ends the reply.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# A token that stands for non-text input (an image, audio, video) rather than for text:
# <start_of_image>, <end_of_image>, [multimodal], <image_soft_token>. HTML tags (<img>,
# <table>) and tool-call tags (<tool_call>) name no such input and stay text.
_MARKER = re.compile(
    r"<[^<>\s]*(?:image|audio|video|vision|multimodal)[^<>\s]*>"
    r"|\[[^\[\]\s]*(?:image|audio|video|vision|multimodal)[^\[\]\s]*\]",
    re.IGNORECASE,
)


def is_marker(name: str) -> bool:
    """True when a user-defined token's name marks non-text input (never shown as text)."""
    return _MARKER.fullmatch(name) is not None


class TextAssembler:
    """Collects generated text, cuts it at the first stop string, and streams what is safe."""

    def __init__(self, stops: tuple[str, ...], emit: Callable[[str], None] | None):
        """`emit` gets each piece that is safe to show; None: nobody reads the text as it
        comes (`text` holds it all at the end)."""
        self.stops = stops
        self.emit = emit
        self.text = ""
        self.sent = 0
        self._longest = max((len(s) for s in stops), default=0)

    def add(self, piece: str) -> bool:
        """Add text; True when a stop string was reached (the text ends before it)."""
        if not piece:
            return False
        start = max(0, self.sent - self._longest)
        self.text += piece
        cut = -1  # where the first stop string begins
        for stop in self.stops:
            at = self.text.find(stop, start)
            if at >= 0 and (cut < 0 or at < cut):
                cut = at
        if cut >= 0:
            self.text = self.text[:cut]
            self.flush()
            return True
        self._send(len(self.text) - self._held_back())
        return False

    def flush(self) -> None:
        self._send(len(self.text))

    def _held_back(self) -> int:
        """How much of the text's end could begin a stop string: the longest stop prefix
        it ends with. Only prefixes ending in the text's last character are tried."""
        if not self.text:
            return 0
        last, held = self.text[-1], 0
        for stop in self.stops:
            n = stop.rfind(last, 0, len(stop) - 1) + 1  # the longest prefix ending in `last`
            while n > held:
                if self.text.endswith(stop[:n]):
                    held = n
                    break
                n = stop.rfind(last, 0, n - 1) + 1
        return held

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            if self.emit is not None:
                self.emit(self.text[self.sent : upto])
            self.sent = upto
