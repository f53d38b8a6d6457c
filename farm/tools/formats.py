"""How a model family is asked for tool calls, and held to them: the plan for one request.

The family comes from the model's chat template. A template that renders `tools` and
writes calls in a known way (Hermes-style `<tool_call>` as Qwen 2.5/3 and Hermes do,
Llama 3.1+'s bare `{"name": ..., "parameters": ...}`, Mistral's `[TOOL_CALLS][...]`) gets
the tools and the history's calls in its own shape. Any other model (Gemma 3 has no tool
format) gets farm's generic one: a system text listing the tools and asking for
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and the history's calls and
results written the same way as text.

The output is held to the calls by a GBNF grammar built from the functions' JSON schemas
(the converter is handed in: llama-cpp-python's on a worker):

- `required`, or a named function: the grammar applies from the first token, so the reply
  is one call (or several, with parallel_tool_calls) whose arguments match the schema;
- `auto`: the same grammar, lazily, from the moment the model opens a call (a trigger
  pattern on its text, or the family's marker token), as llama-server does; before that
  the model writes text freely;
- `none`: no grammar and no tools in the prompt; the history is still rendered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from farm.request import Message
from farm.tools.schema import NamedToolChoice, Tool, ToolChoice

# A JSON schema (as JSON text) to a GBNF grammar whose start rule is `root`.
SchemaToGbnf = Callable[[str], str]


@dataclass(frozen=True)
class Family:
    """How one family of models writes calls.

    open: the text that opens the calls ("" when the reply starts with the call's JSON);
    close: the text after each call; array: the calls are one JSON array after `open`;
    args_key: the key that holds a call's arguments; special: markers that are control
    tokens, which the worker must show as text for the calls to be parsed."""

    name: str
    native: bool
    open: str
    close: str = ""
    array: bool = False
    args_key: str = "arguments"
    special: tuple[str, ...] = ()


GENERIC = Family("generic", native=False, open="<tool_call>", close="</tool_call>")
HERMES = Family("hermes", native=True, open="<tool_call>", close="</tool_call>")
LLAMA3 = Family("llama3", native=True, open="", args_key="parameters")
MISTRAL = Family("mistral", native=True, open="[TOOL_CALLS]", array=True, special=("[TOOL_CALLS]",))
FAMILIES = {f.name: f for f in (GENERIC, HERMES, LLAMA3, MISTRAL)}


def family_for(template: str | None) -> Family:
    """The family a chat template's text belongs to; GENERIC when it does not render
    `tools` or writes calls in a way farm does not know."""
    if not template or not re.search(r"\btools\b", template):
        return GENERIC
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|start_header_id|>" in template and (
        "<|python_tag|>" in template or "ipython" in template
    ):
        return LLAMA3
    return GENERIC


def chosen_tools(tools: Sequence[Tool], choice: ToolChoice) -> list[Tool]:
    """The tools a call may name: all of them, or the one a named choice names."""
    if isinstance(choice, NamedToolChoice):
        return [t for t in tools if t.function.name == choice.function.name]
    return list(tools)


@dataclass(frozen=True)
class ToolPlan:
    """What one request with tools becomes on one model: see the module's docstring."""

    family: Family
    tools: tuple[Tool, ...]
    choice: ToolChoice
    parallel: bool
    grammar: str | None = None
    lazy: bool = False
    # Full-match regular expressions on the text so far; the grammar starts at group 1.
    lazy_patterns: tuple[str, ...] = ()
    # Marker tokens (by name) that start the grammar, for families whose marker is special.
    lazy_tokens: tuple[str, ...] = ()
    template_tools: list[dict[str, Any]] | None = field(default=None)

    @property
    def calls(self) -> bool:
        """Whether the reply may hold calls (to be parsed out of the text)."""
        return self.choice != "none" and bool(self.tools)

    def messages(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        """The messages as the chat template takes them."""
        if self.family.native:
            return [native_message(m, messages) for m in messages]
        out = generic_messages(messages)
        if self.calls:
            preamble = generic_preamble(self.tools, self.choice, self.parallel)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{preamble}\n\n{out[0]['content']}"}
            else:
                out.insert(0, {"role": "system", "content": preamble})
        return out


def plan(
    tools: Sequence[Tool],
    choice: ToolChoice | None,
    *,
    parallel: bool | None = None,
    template: str | None = None,
    to_gbnf: SchemaToGbnf | None = None,
) -> ToolPlan:
    """The plan for a request's `tools` and `tool_choice` on a model whose chat template is
    `template` (None: it has none). `choice` None is OpenAI's default: `auto` with tools,
    `none` without. Without `to_gbnf` the plan has no grammar (the prompt side alone)."""
    if choice is None:
        choice = "auto" if tools else "none"
    parallel = True if parallel is None else parallel
    family = family_for(template)
    calls = choice != "none" and bool(tools)
    template_tools = (
        [t.model_dump(exclude_none=True) for t in tools] if calls and family.native else None
    )
    if not calls or to_gbnf is None:
        return ToolPlan(family, tuple(tools), choice, parallel, template_tools=template_tools)
    grammar = calls_grammar(family, chosen_tools(tools, choice), parallel, to_gbnf)
    lazy = choice == "auto"
    patterns: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    if lazy:
        if family.special and family.open in family.special:
            tokens = (family.open,)
        elif family.open:
            patterns = (r"[\s\S]*?(" + re.escape(family.open) + r")[\s\S]*",)
        else:  # the reply opens with the call's JSON
            # Anchored: llama.cpp matches ^...$ patterns against the whole text, others
            # anywhere in it (the grammar starts at the first group either way).
            patterns = (r"^\s*(\{\s*\"name\")[\s\S]*$",)
    return ToolPlan(
        family,
        tuple(tools),
        choice,
        parallel,
        grammar=grammar,
        lazy=lazy,
        lazy_patterns=patterns,
        lazy_tokens=tokens,
        template_tools=template_tools,
    )


# -- the grammar ---------------------------------------------------------------------------------
def _rebase_refs(node: Any, base: str) -> Any:
    """`node` with every local `$ref` ('#/...') moved under `base`, where the schema now sits."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#"):
                out[k] = base + v[1:]
            else:
                out[k] = _rebase_refs(v, base)
        return out
    if isinstance(node, list):
        return [_rebase_refs(v, base) for v in node]
    return node


def call_schema(tools: Sequence[Tool], args_key: str = "arguments") -> dict[str, Any]:
    """One JSON schema for a call of any of `tools`: `{"name": NAME, ARGS_KEY: {...}}`,
    the arguments held to that function's schema."""

    def one(t: Tool, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, args_key: args},
            "required": ["name", args_key],
        }

    if len(tools) == 1:
        params = tools[0].function.parameters
        return one(tools[0], _rebase_refs(params, f"#/properties/{args_key}"))
    # Each function's schema goes under $defs (the converter's references walk objects, not
    # arrays), its own references moved along.
    defs = {
        f"farm-fn-{i}": _rebase_refs(t.function.parameters, f"#/$defs/farm-fn-{i}")
        for i, t in enumerate(tools)
    }
    return {
        "$defs": defs,
        "anyOf": [one(t, {"$ref": f"#/$defs/farm-fn-{i}"}) for i, t in enumerate(tools)],
    }


_ROOT = re.compile(r"^root(\s*::=)", re.MULTILINE)


def calls_grammar(
    family: Family, tools: Sequence[Tool], parallel: bool, to_gbnf: SchemaToGbnf
) -> str:
    """GBNF for the family's calls of `tools`: one, or with `parallel` one or more."""
    body = _ROOT.sub(r"farm-call\1", to_gbnf(json.dumps(call_schema(tools, family.args_key))))
    ws = "farm-ws ::= [ \\n]{0,2}\n"
    if family.array:
        more = ' ("," farm-ws farm-call)*' if parallel else ""
        root = f'root ::= {json.dumps(family.open)} "[" farm-call{more} "]"\n'
    elif family.open:
        one = f"{json.dumps(family.open)} farm-ws farm-call farm-ws {json.dumps(family.close)}"
        root = "root ::= farm-one (farm-ws farm-one)*\n" if parallel else "root ::= farm-one\n"
        root += f"farm-one ::= {one}\n"
    else:
        root = "root ::= farm-call\n"
    return root + ws + body


# -- the prompt ----------------------------------------------------------------------------------
def _arguments(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _call_names(messages: Sequence[Message]) -> dict[str, str]:
    return {c.id: c.function.name for m in messages for c in m.tool_calls or ()}


def native_message(m: Message, messages: Sequence[Message]) -> dict[str, Any]:
    """A message as chat templates that know tools read it: calls with their arguments as
    objects (templates write them with `tojson`), results with the function's name."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.function.name,
                    "arguments": _arguments(c.function.arguments),
                },
            }
            for c in m.tool_calls
        ]
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
        out["name"] = m.name or _call_names(messages).get(m.tool_call_id or "", "")
    return out


def call_text(family: Family, name: str, arguments: Any) -> str:
    """A call as the family writes it."""
    return f"{family.open}{json.dumps({'name': name, family.args_key: arguments})}{family.close}"


def generic_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages for a template that knows no tools: an assistant's calls as its text in
    farm's generic format, each tool result as user text (one user turn per run of them)."""
    names = _call_names(messages)
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            name = m.name or names.get(m.tool_call_id or "", "")
            text = f"<tool_response>\n{json.dumps({'name': name, 'content': m.content})}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "tool_results": True})
            continue
        content = m.content
        if m.tool_calls:
            calls = "".join(
                call_text(GENERIC, c.function.name, _arguments(c.function.arguments))
                for c in m.tool_calls
            )
            content = f"{content}\n{calls}" if content else calls
        out.append({"role": m.role, "content": content})
    for d in out:
        d.pop("tool_results", None)
    return out


def generic_preamble(tools: Sequence[Tool], choice: ToolChoice, parallel: bool) -> str:
    """The system text that offers `tools` to a model with no tool format of its own."""
    listed = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools)
    lines = [
        "You can call functions. Each is described below by a JSON schema of its arguments:",
        f"<tools>\n{listed}\n</tools>",
        'To call one, write <tool_call>{"name": FUNCTION, "arguments": ARGUMENTS}'
        "</tool_call>, ARGUMENTS being a JSON object that matches the function's schema.",
    ]
    if parallel:
        lines.append("To call several, write one <tool_call> after another.")
    if isinstance(choice, NamedToolChoice):
        lines.append(f"Call the function '{choice.function.name}' now.")
    elif choice == "required":
        lines.append("Call a function now.")
    else:
        lines.append("When no function helps, answer directly.")
    lines.append("The results come back as <tool_response> text; answer the user with them.")
    return "\n".join(lines)
