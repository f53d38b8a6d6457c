"""TwinHost: an in-memory twin of ModelHost, for `ModelCache(host_factory=...)`.

The real host's start and follow over a TwinEngine, one token per UTF-8 byte, no model
file, no llama.cpp.

    cache = ModelCache(specs, host_factory=functools.partial(TwinHost, seconds_per_token=0.01))

A job's reply echoes its prompt (a chat's message contents, one per line) and ends with
finish reason "stop"; max_tokens, stop strings, the context, time limits and cancel end
it as on the real engine. The request-to-Sequence translation is the real one
(`workers.prepare.sequence_for`), so sampling defaults, stops and the context check are
exercised too; only the tokenizer and the engine are stand-ins.
"""

from __future__ import annotations

from farm.request import Request
from farm.tools.formats import ToolPlan
from workers.engine.twin import TwinEngine, byte_tokens
from workers.host import EngineOptions, ModelHost
from workers.prepare import PromptTokens, tool_plan
from workers.spec import ModelSpec


class TwinHost(ModelHost):
    """A ModelHost whose engine is a TwinEngine: `load` reads no file."""

    def __init__(
        self, spec: ModelSpec, options: EngineOptions | None = None, seconds_per_token: float = 0.0
    ):
        super().__init__(spec, options)
        self.seconds_per_token = seconds_per_token

    def load(self) -> None:
        self.engine = TwinEngine(
            slots=self.options.slots,
            n_ctx=self.spec.n_ctx,
            seconds_per_token=self.seconds_per_token,
            name=self.spec.name,
        )
        self.chat_source = "the twin's (message contents, one per line)"

    def tokenize(self, request: Request, tools: ToolPlan | None = None) -> PromptTokens:
        if request.messages is None:
            return byte_tokens(request.prompts[0]), ()
        return byte_tokens("\n".join(m.content for m in request.messages)), ()

    def plan_tools(self, request: Request) -> ToolPlan | None:
        # farm's generic format, with no grammar: a message holding a generic call
        # (<tool_call>{...}</tool_call>) echoes back as that call.
        return tool_plan(request, None, to_gbnf=None) if request.is_chat else None

    def markers(self, tools: ToolPlan | None) -> dict[str, int]:
        return {}
