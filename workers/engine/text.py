"""From sampled tokens to the text a caller sees: UTF-8 pieces, stop strings, streaming.

Text that could be the start of a stop string is held back until it is clearly not, so a
streaming reader never sees the beginning of a stop string that ends the reply.
"""

from __future__ import annotations

from collections.abc import Callable


class TextAssembler:
    """Collects generated text, cuts it at the first stop string, and streams what is safe."""

    def __init__(self, stops: tuple[str, ...], emit: Callable[[str], None]):
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
        cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.flush()
            return True
        self._send(len(self.text) - self._held_back())
        return False

    def flush(self) -> None:
        self._send(len(self.text))

    def _held_back(self) -> int:
        held = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:n]):
                    held = n
                    break
        return held

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.emit(self.text[self.sent : upto])
            self.sent = upto
