"""A request turned into the engine's input: one Sequence from a farm Request.

The prompt's tokens (through the model's chat template), sampling over the model's
defaults, the grammar, stops and deadline.

    Request -> prompt_tokens (raw prompt, or messages through the chat handler)
            -> sequence_for: context check, sampling, stops, grammar, deadline -> Sequence
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from llama_cpp import llama_chat_format
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from farm.errors import JobFailed
from farm.request import SAMPLING_FIELDS, Message, Request
from workers.engine import Sequence as EngineSequence
from workers.spec import ModelSpec

# What a tokenizer gives for a request: the prompt's tokens and the chat template's stops.
PromptTokens = tuple[list[int], tuple[str, ...]]


def sequence_for(
    request: Request,
    spec: ModelSpec,
    prompt: PromptTokens,
    *,
    started: float,
    time_limit_s: float | None = None,
    label: str = "",
) -> EngineSequence:
    """The engine's Sequence for `request` on model `spec`, its prompt already tokenized.

    JobFailed when it cannot be served (a prompt longer than the context)."""
    tokens, template_stops = prompt
    if len(tokens) >= spec.n_ctx:
        raise JobFailed(
            f"the prompt is {len(tokens)} tokens but model '{spec.name}' holds "
            f"{spec.n_ctx}; shorten it, or register the model with a larger context "
            "(--n-ctx)"
        )
    stopping = request.stopping
    limits = [s for s in (stopping.max_time_ms and stopping.max_time_ms / 1000, time_limit_s) if s]
    return EngineSequence(
        tokens=tokens,
        max_tokens=stopping.max_tokens,
        sampling=sampling_for(request, spec),
        stops=tuple(stopping.stop) + template_stops,
        grammar=request_grammar(request),
        deadline=started + min(limits) if limits else None,
        started=started,
        label=label,
        logprobs=request.logprobs,
        prompt_logprobs=request.echo and request.logprobs is not None,
    )


def sampling_for(request: Request, spec: ModelSpec) -> dict[str, Any]:
    """The request's sampling fields over the model's registered defaults."""
    defaults = {k: v for k, v in spec.defaults.items() if k in SAMPLING_FIELDS}
    given = request.sampling.model_dump(exclude_none=True)
    return {**defaults, **given}


def request_grammar(request: Request) -> str | None:
    """The request's GBNF grammar for llama.cpp's grammar sampler, or None.

    `grammar` is used as given; `response_format` `json_object` is llama-cpp-python's JSON
    grammar, and `json_schema` is converted by llama-cpp-python's schema converter.
    JobFailed when the schema cannot be converted."""
    if request.grammar is not None:
        return request.grammar
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object" or fmt.json_schema is None:
        return JSON_GBNF
    try:
        return json_schema_to_gbnf(json.dumps(fmt.json_schema.schema_))
    except Exception as e:  # the converter raises plain Exceptions for unsupported schemas
        raise JobFailed(
            f"invalid 'response_format': the JSON schema cannot be turned into a grammar: {e}"
        ) from e


def prompt_tokens(llm: Any, request: Request) -> PromptTokens:
    """The request's (first) prompt's tokens on llama-cpp-python's `Llama` `llm`, and the
    chat template's stop strings (none for a raw prompt)."""
    if request.messages is None:
        prompt = request.prompts[0]  # a request of several prompts is run one by one
        return llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True), ()
    return chat_prompt(llm, request.messages)


# Chat formats in llama-cpp-python that drop system messages; Gemma's own template folds the
# system text into the first user turn, so farm does that instead of losing it.
_FOLD_SYSTEM = frozenset({"gemma"})


def _fold_system(messages: Sequence[Message]) -> list[Message]:
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    rest = [m for m in messages if m.role != "system"]
    if not system:
        return rest
    for i, m in enumerate(rest):
        if m.role == "user":
            rest[i] = Message(role="user", content=f"{system}\n\n{m.content}")
            return rest
    return [Message(role="user", content=system), *rest]


def chat_prompt(llm: Any, messages: Sequence[Message]) -> PromptTokens:
    """The prompt tokens and extra stop strings llama-cpp-python's chat handler would use.

    The handler for the model's chat format formats the messages, tokenizes them, then calls
    `create_completion`; a stand-in Llama catches that call, so farm uses exactly the
    template llama-cpp-python would, for every format it knows, and runs its own loop.
    """
    handler = llm.chat_handler or llm._chat_handlers.get(llm.chat_format)
    if handler is None:
        handler = llama_chat_format.get_chat_completion_handler(llm.chat_format)
    if llm.chat_format in _FOLD_SYSTEM and llm.chat_handler is None:
        messages = _fold_system(messages)
    stand_in = _CapturingLlama(llm)
    try:
        handler(llama=stand_in, messages=[m.model_dump() for m in messages], stream=False)
    except _Captured as captured:
        stop = captured.stop
        stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
        return list(captured.prompt), tuple(s for s in stops if s)
    raise JobFailed(f"chat format '{llm.chat_format}' is not supported by farm's worker")


class _Captured(Exception):
    def __init__(self, prompt: Sequence[int], stop: Any):
        self.prompt, self.stop = prompt, stop


class _CapturingLlama:
    def __init__(self, llm: Any):
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, prompt: Sequence[int], stop: Any = None, **_: Any) -> Any:
        raise _Captured(prompt, stop)
