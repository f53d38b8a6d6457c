"""A run's replies parsed into text and tool calls as they stream, one parser per choice.

The worker parses, not the client: it knows the model's family (its chat template) and
sees the family's markers even where they are control tokens that text never shows
(Sequence.shown), and one Completion with its calls then serves the gateway, batch output
files and `farm.infer` alike. The parser is farm's (`farm.tools.parse`), so streamed
pieces and the final calls agree.
"""

from __future__ import annotations

from collections.abc import Callable

from farm.tools.formats import ToolPlan
from farm.tools.parse import CallParser, Parsed, call_id
from workers.engine import Generation


class ReplyCalls:
    """One CallParser per choice of a job; calls are named `call_...` from the job id
    (`label`) and the choice, the same in a rerun of the job."""

    def __init__(self, tools: ToolPlan, label: str, choices: int):
        self.parsers = [
            CallParser(tools.family, _namer(label if i == 0 else f"{label}#{i}"))
            for i in range(choices)
        ]

    def feed(self, index: int, text: str) -> list[Parsed]:
        """What choice `index`'s next raw text makes certain: text and call pieces."""
        return self.parsers[index].feed(text)

    def close(self, index: int, generation: Generation) -> list[Parsed]:
        """The rest of choice `index`'s reply; its Generation gets the text outside the calls
        and the calls."""
        parser = self.parsers[index]
        rest = parser.close()
        generation.text = parser.content
        generation.tool_calls = parser.calls or None
        return rest


def _namer(job: str) -> Callable[[int], str]:
    return lambda index: call_id(job, index)
