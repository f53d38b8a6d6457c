"""A model's output as text and tool calls, read piece by piece as it streams.

`CallParser(family, new_id)` is fed the raw text (the family's markers included) and gives
back, for each piece, what can be shown: text, and `ToolCallDelta`s in OpenAI's streaming
order (per call: its index, id and name with arguments "", then its arguments in pieces).
Run on the whole text at once it gives the same calls, so a streamed reply and the final
one agree: `arguments` is the model's own JSON text for the arguments, untouched.

Text that looks like the start of a marker is held back until it is known not to be one.
A call whose JSON does not name its function first (a model without a grammar) is read
whole when it closes. A call cut off by max_tokens is not in `calls` (`truncated` says so);
one cut off inside its close marker, its JSON whole, is a call, and the marker's start is
not text, nor is the start of another call's open marker after a call.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable

from farm.tools.formats import Family
from farm.tools.schema import FunctionCall, ToolCall, ToolCallDelta

# What the parser gives back: text to show, or a piece of a call.
Parsed = str | ToolCallDelta
_TEXT, _BEFORE_CALL, _CALL, _AFTER_CALL, _DONE = "text", "before", "call", "after", "done"


def call_id(job_id: str, index: int) -> str:
    """A call's id, `call_` and 24 hex digits: the same for the same job and call (a job
    that runs again names its calls alike), random without a job id."""
    if not job_id:
        return f"call_{secrets.token_hex(12)}"
    return "call_" + hashlib.sha256(f"{job_id}:{index}".encode()).hexdigest()[:24]


def _header(args_key: str) -> re.Pattern[str]:
    return re.compile(
        r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"' + re.escape(args_key) + r'"\s*:\s*'
    )


class CallParser:
    """Splits one reply into text and tool calls; `new_id(index)` names each call."""

    def __init__(self, family: Family, new_id: Callable[[int], str]):
        self.family = family
        self.new_id = new_id
        self.calls: list[ToolCall] = []
        self.truncated = False
        self._text: list[str] = []
        self._buf = ""
        self._state = _TEXT
        self._seen_text = False  # any non-space text yet (a bare-JSON family opens only first)
        self._in_array = False
        self._header = _header(family.args_key)
        self._reset_call()

    @property
    def content(self) -> str:
        """The reply's text outside its calls (stripped when there are calls)."""
        text = "".join(self._text)
        return text.strip() if self.calls else text

    # -- feeding ---------------------------------------------------------------------------------
    def feed(self, piece: str) -> list[Parsed]:
        """The text and call deltas that `piece` (the next raw text) makes certain."""
        self._buf += piece
        out: list[Parsed] = []
        progressed = True
        while progressed and self._buf:
            progressed = self._step(out)
        return out

    def close(self) -> list[Parsed]:
        """The rest, at the end of the reply."""
        out: list[Parsed] = []
        if self._state == _TEXT:
            rest = self._buf
            opening = self.family.open and self.family.open.startswith(rest.strip())
            if self.calls and opening:
                pass  # the next call's open marker, cut off by max_tokens: not text
            elif not self.calls or rest.strip():
                self._emit_text(rest, out)
        elif self._state in (_BEFORE_CALL, _CALL):
            self.truncated = True  # a call was opened and never closed
        elif self._state == _AFTER_CALL and self._closing_cut():
            pass  # the call's own close marker, cut off by max_tokens: not text
        elif self._state in (_AFTER_CALL, _DONE) and self._buf.strip():
            self._emit_text(self._buf, out)
        self._buf = ""
        return out

    # -- states ----------------------------------------------------------------------------------
    def _emit_text(self, text: str, out: list[Parsed]) -> None:
        if text:
            self._text.append(text)
            out.append(text)
            self._seen_text = self._seen_text or bool(text.strip())

    def _step(self, out: list[Parsed]) -> bool:
        if self._state == _TEXT:
            return self._in_text(out)
        if self._state == _BEFORE_CALL:
            return self._before_call(out)
        if self._state == _CALL:
            return self._in_call(out)
        if self._state == _AFTER_CALL:
            return self._after_call()
        # _DONE: what follows the calls is text
        self._state = _TEXT
        return True

    def _in_text(self, out: list[Parsed]) -> bool:
        fam, buf = self.family, self._buf
        if not fam.open:  # the reply itself opens the call, or is text
            stripped = buf.lstrip()
            if not self._seen_text and not self.calls:
                if not stripped:
                    return False
                if stripped.startswith("{"):
                    self._buf = stripped
                    self._state = _BEFORE_CALL
                    return True
            self._emit_text(buf, out)
            self._buf = ""
            return False
        at = buf.find(fam.open)
        if at >= 0:
            self._emit_text(self._shown(buf[:at]), out)
            self._buf = buf[at + len(fam.open) :]
            self._state = _BEFORE_CALL
            self._in_array = False
            return True
        keep = _partial_suffix(buf, fam.open)
        # Trailing spaces wait too: they are dropped when a call follows.
        cut = len(buf) - keep
        while cut > 0 and buf[cut - 1].isspace():
            cut -= 1
        self._emit_text(buf[:cut], out)
        self._buf = buf[cut:]
        return False

    def _shown(self, text: str) -> str:
        """Text before a call, without the spaces that only lead up to the call."""
        return text.rstrip()

    def _before_call(self, out: list[Parsed]) -> bool:
        buf = self._buf.lstrip()
        if not buf:
            self._buf = ""
            return False
        if self.family.array and not self._in_array:
            if buf[0] != "[":
                return self._not_a_call(buf, out)
            self._in_array = True
            buf = buf[1:].lstrip()
            self._buf = buf
            if not buf:
                return False
        if buf[0] != "{":
            return self._not_a_call(buf, out)
        self._buf = buf
        self._reset_call()
        self._state = _CALL
        return True

    def _not_a_call(self, rest: str, out: list[Parsed]) -> bool:
        """The marker was not followed by a call: it and what follows are text."""
        self._emit_text(self.family.open, out)
        self._buf = rest
        self._state = _TEXT
        return True

    def _reset_call(self) -> None:
        self._obj = ""
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._named = False
        self._args_start = -1
        self._args_sent = 0
        self._args_end = -1
        self._id = ""

    def _in_call(self, out: list[Parsed]) -> bool:
        """Scan the call's JSON object; name it as soon as its header is there, then send
        its arguments as they come."""
        index = len(self.calls)
        closed_at = -1
        start = len(self._obj)
        self._obj += self._buf
        for i in range(start, len(self._obj)):
            c = self._obj[i]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
                continue
            if c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    closed_at = i + 1
                    break
            if self._args_start >= 0 and self._args_end < 0 and i >= self._args_start:
                if self._depth == 1 and c == "," and i > self._args_start:
                    self._args_end = i
                elif self._depth == 1 and c in "}]" and i >= self._args_start:
                    self._args_end = i + 1
            if not self._named:
                self._name_call(index, out)
        if closed_at >= 0:
            self._buf = self._obj[closed_at:]
            self._obj = self._obj[:closed_at]
            if self._args_start >= 0 and self._args_end < 0:
                self._args_end = closed_at - 1
        else:
            self._buf = ""
        if self._named:
            self._send_args(index, out, final=closed_at >= 0)
        if closed_at < 0:
            return False
        self._finish_call(index, out)
        self._state = _AFTER_CALL
        return True

    def _name_call(self, index: int, out: list[Parsed]) -> None:
        m = self._header.match(self._obj)
        if m is None:
            return
        try:
            name = json.loads(f'"{m.group(1)}"')
        except ValueError:
            return
        self._named = True
        self._id = self.new_id(index)
        self._name = name
        self._args_start = m.end()
        out.append(ToolCallDelta(index=index, id=self._id, name=name, arguments=""))

    def _send_args(self, index: int, out: list[Parsed], *, final: bool) -> None:
        if self._args_sent == 0:  # the header matched before the spaces that follow it
            while self._args_start < len(self._obj) and self._obj[self._args_start].isspace():
                self._args_start += 1
        end = self._args_end if self._args_end >= 0 else len(self._obj)
        text = self._obj[self._args_start : end]
        text = text.rstrip() if final or self._args_end >= 0 else _upto_last_nonspace(text)
        if len(text) > self._args_sent:
            out.append(ToolCallDelta(index=index, arguments=text[self._args_sent :]))
            self._args_sent = len(text)

    def _finish_call(self, index: int, out: list[Parsed]) -> None:
        if self._named:
            arguments = self._obj[self._args_start : self._args_end].strip()
            self.calls.append(
                ToolCall(id=self._id, function=FunctionCall(name=self._name, arguments=arguments))
            )
            return
        # Not in the usual order: read it whole.
        try:
            obj = json.loads(self._obj)
        except ValueError:
            obj = None
        name = obj.get("name") if isinstance(obj, dict) else None
        if not isinstance(name, str):
            self._emit_text(self._obj, out)
            return
        args = obj.get(self.family.args_key, obj.get("arguments", obj.get("parameters", {})))
        arguments = args if isinstance(args, str) else json.dumps(args)
        call_id = self.new_id(index)
        out.append(ToolCallDelta(index=index, id=call_id, name=name, arguments=""))
        out.append(ToolCallDelta(index=index, arguments=arguments))
        self.calls.append(
            ToolCall(id=call_id, function=FunctionCall(name=name, arguments=arguments))
        )

    def _closing_cut(self) -> bool:
        """What is left after a call is the start of the family's close marker."""
        close, buf = self.family.close, self._buf.strip()
        return bool(close and buf and close.startswith(buf))

    def _after_call(self) -> bool:
        fam, buf = self.family, self._buf.lstrip()
        if not buf:
            self._buf = ""
            return False
        if fam.array:
            if buf[0] == ",":
                self._buf = buf[1:]
                self._state = _BEFORE_CALL
                return True
            if buf[0] == "]":
                self._buf = buf[1:]
                self._state = _DONE
                return True
            self._buf = buf
            self._state = _DONE
            return True
        if fam.close:
            if buf.startswith(fam.close):
                self._buf = buf[len(fam.close) :]
                self._state = _TEXT
                return True
            if fam.close.startswith(buf):
                self._buf = buf
                return False
        self._buf = buf
        self._state = _TEXT
        return True


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _upto_last_nonspace(text: str) -> str:
    return text[: len(text.rstrip())]


def parse_calls(family: Family, text: str, new_id: Callable[[int], str]) -> CallParser:
    """A whole reply, parsed: `.content`, `.calls`, `.truncated`."""
    parser = CallParser(family, new_id)
    parser.feed(text)
    parser.close()
    return parser
