"""A request turned into the engine's input: one Sequence from a farm Request.

The prompt's tokens (through the model's chat template), sampling over the model's
defaults, the grammar, stops and deadline. A request with tools gets a ToolPlan first
(`farm.tools.formats`): it shapes the messages and tools the template renders, and gives
the grammar that holds the reply to the calls.

    Request -> tool_plan (tools, tool_choice, the model's chat template)
            -> prompt_tokens (raw prompt, or messages through the chat handler)
            -> sequence_for: context check, sampling, stops, grammar, deadline -> Sequence
    Request with `input` -> embedding_job: each input's tokens -> EmbeddingJob
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from llama_cpp import llama_chat_format
from llama_cpp.llama_grammar import JSON_GBNF

from farm.errors import JobFailed
from farm.request import SAMPLING_FIELDS, Message, Request
from farm.tools.formats import SchemaToGbnf, ToolPlan, plan
from workers.engine import EmbeddingJob
from workers.engine import Sequence as EngineSequence
from workers.json_grammar import json_schema_to_gbnf
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
    tools: ToolPlan | None = None,
    markers: dict[str, int] | None = None,
    streamed: bool = True,
) -> EngineSequence:
    """The engine's Sequence for `request` on model `spec`, its prompt already tokenized;
    `tools`: its tool plan, `markers`: the token ids of the plan's special markers;
    `streamed`: its text is read as it comes (a reply with tool calls always is: they are
    parsed as they come).

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
    markers = markers or {}
    grammar: dict[str, Any] = {"grammar": request_grammar(request)}
    if tools is not None and tools.grammar is not None:
        grammar = {
            "grammar": tools.grammar,
            "grammar_lazy": tools.lazy,
            "grammar_patterns": tools.lazy_patterns,
            "grammar_tokens": tuple(markers[m] for m in tools.lazy_tokens if m in markers),
        }
    calls = tools is not None and tools.calls
    sampling = sampling_for(request, spec)
    return EngineSequence(
        tokens=tokens,
        max_tokens=stopping.max_tokens,
        sampling=sampling,
        draft_max=sampling.pop("draft_max", None),
        stops=tuple(stopping.stop) + template_stops,
        **grammar,
        shown=frozenset(markers.values()) if calls else frozenset(),
        deadline=started + min(limits) if limits else None,
        started=started,
        label=label,
        logprobs=request.logprobs,
        prompt_logprobs=request.echo and request.logprobs is not None,
        streamed=streamed or bool(calls),
    )


def embedding_job(request: Request, spec: ModelSpec, llm: Any, *, label: str = "") -> EmbeddingJob:
    """The embedder's job for an embeddings request: each text tokenized as llama-server
    tokenizes what it embeds (the model's BOS/EOS added, special tokens parsed); token
    arrays as given. JobFailed for `dimensions` the model does not allow."""
    assert request.input is not None
    if request.dimensions is not None and request.dimensions not in (spec.dimensions or ()):
        raise JobFailed(
            f"invalid 'dimensions': model '{spec.name}' allows "
            f"{', '.join(map(str, spec.dimensions)) if spec.dimensions else 'no dimensions'}"
        )
    inputs = [
        llm.tokenize(item.encode("utf-8"), add_bos=True, special=True)
        if isinstance(item, str)
        else list(item)
        for item in request.input
    ]
    return EmbeddingJob(
        inputs=inputs, normalize=spec.normalize, dimensions=request.dimensions, label=label
    )


def sampling_for(request: Request, spec: ModelSpec) -> dict[str, Any]:
    """The request's sampling fields over the model's registered defaults."""
    defaults = {k: v for k, v in spec.defaults.items() if k in SAMPLING_FIELDS}
    given = request.sampling.model_dump(exclude_none=True)
    return {**defaults, **given}


def request_grammar(request: Request) -> str | None:
    """The request's GBNF grammar for llama.cpp's grammar sampler, or None.

    `grammar` is used as given; `response_format` `json_object` is llama-cpp-python's JSON
    grammar, and `json_schema` is converted by llama-cpp-python's schema converter (with
    integer bounds: workers/json_grammar.py).
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


def tool_plan(
    request: Request, template: str | None, to_gbnf: SchemaToGbnf | None = json_schema_to_gbnf
) -> ToolPlan | None:
    """The request's tool plan on a model whose chat template is `template` (None: it has
    none), or None for a request with no tools or tool messages in it."""
    messages = request.messages or ()
    if not request.tools and not any(m.tool_calls or m.role == "tool" for m in messages):
        return None
    try:
        return plan(
            request.tools or (),
            request.tool_choice,
            parallel=request.parallel_tool_calls,
            template=template,
            to_gbnf=to_gbnf,
        )
    except Exception as e:  # the converter raises plain Exceptions for unsupported schemas
        raise JobFailed(
            f"invalid 'tools': a function's JSON schema cannot be turned into a grammar: {e}"
        ) from e


def marker_tokens(llm: Any, tools: ToolPlan | None) -> dict[str, int]:
    """The token ids of the plan's special markers that are single tokens of this model."""
    found: dict[str, int] = {}
    for name in tools.family.special if tools is not None else ():
        ids = llm.tokenize(name.encode("utf-8"), add_bos=False, special=True)
        if len(ids) == 1:
            found[name] = ids[0]
    return found


def prompt_tokens(llm: Any, request: Request, tools: ToolPlan | None = None) -> PromptTokens:
    """The request's (first) prompt's tokens on llama-cpp-python's `Llama` `llm`, and the
    chat template's stop strings (none for a raw prompt); `tools`: the request's tool plan."""
    if request.messages is None:
        prompt = request.prompts[0]  # a request of several prompts is run one by one
        return llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True), ()
    return chat_prompt(llm, request.messages, tools)


# Chat formats in llama-cpp-python that drop system messages; Gemma's own template folds the
# system text into the first user turn, so farm does that instead of losing it.
_FOLD_SYSTEM = frozenset({"gemma"})


def _fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {**m, "content": f"{system}\n\n{m['content']}"}
            return rest
    return [{"role": "user", "content": system}, *rest]


def chat_prompt(
    llm: Any, messages: Sequence[Message], tools: ToolPlan | None = None
) -> PromptTokens:
    """The prompt tokens and extra stop strings llama-cpp-python's chat handler would use.

    The handler for the model's chat format formats the messages, tokenizes them, then calls
    `create_completion`; a stand-in Llama catches that call, so farm uses exactly the
    template llama-cpp-python would, for every format it knows, and runs its own loop.
    With a tool plan, the messages and tools are the plan's (its family's shape).
    """
    handler = llm.chat_handler or llm._chat_handlers.get(llm.chat_format)
    if handler is None:
        handler = llama_chat_format.get_chat_completion_handler(llm.chat_format)
    given = (
        tools.messages(messages)
        if tools is not None
        else [m.model_dump(exclude_none=True) for m in messages]
    )
    if llm.chat_format in _FOLD_SYSTEM and llm.chat_handler is None:
        given = _fold_system(given)
    extra: dict[str, Any] = {}
    if tools is not None and tools.template_tools:
        extra["tools"] = tools.template_tools
    stand_in = _CapturingLlama(llm)
    try:
        handler(llama=stand_in, messages=given, stream=False, **extra)
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
