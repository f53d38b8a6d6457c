"""OpenAI's parameters for several choices and logprobs, and their response shapes.

    n, best_of, echo, suffix, logprobs, top_logprobs, logit_bias, a list of prompts
      -> farm Request fields (`choice_fields`), BadBody naming the parameter otherwise
    a Completion's choices and token logprobs
      -> chat's `logprobs.content[]` or completions' `tokens` / `token_logprobs` /
         `top_logprobs` / `text_offset`

Choices are indexed as OpenAI does: prompt by prompt, n each (choice i*n + j is the j-th
sequence of prompt i).
"""

from __future__ import annotations

import re
from typing import Any

from farm.errors import InvalidRequest
from farm.request import MAX_CHOICES, MAX_LOGIT_BIAS, MAX_N

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
MAX_TOP_LOGPROBS = 20  # and for chat's top_logprobs
# What the two endpoints take here besides the sampling and stopping fields.
CHAT_PARAMS = ("n", "logprobs", "top_logprobs", "logit_bias")
COMPLETION_PARAMS = ("n", "logprobs", "echo", "best_of", "suffix", "logit_bias")


class BadBody(InvalidRequest):
    """The HTTP body is not what the endpoint takes; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadBody(f"invalid '{name}': must be an integer", name)
    return value


def choice_fields(body: dict[str, Any], *, chat: bool, prompts: int) -> dict[str, Any]:
    """The Request fields for the body's choices and logprobs parameters; `prompts`: how
    many prompts the body has (1 for chat)."""
    fields: dict[str, Any] = {}
    n = _int(body, "n")
    if n is not None:
        if not 1 <= n <= MAX_N:
            raise BadBody(f"invalid 'n': must be from 1 to {MAX_N}, not {n}", "n")
        if n * prompts > MAX_CHOICES:
            raise BadBody(
                f"invalid 'n': {prompts} prompts x n={n} is {n * prompts} choices; one request "
                f"makes at most {MAX_CHOICES}",
                "n",
            )
        fields["n"] = n
    if chat:
        fields.update(_chat_logprobs(body))
    else:
        fields.update(_completion_extras(body, n or 1))
    bias = body.get("logit_bias")
    if bias is not None:
        fields["logit_bias"] = logit_bias(bias)
    return fields


def _chat_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    top = _int(body, "top_logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadBody(
            f"invalid 'top_logprobs': must be from 0 to {MAX_TOP_LOGPROBS}, not {top}",
            "top_logprobs",
        )
    if body.get("logprobs") is not True:
        if top is not None:
            raise BadBody("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return {}
    return {"logprobs": top or 0}


def _completion_extras(body: dict[str, Any], n: int) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    logprobs = _int(body, "logprobs")
    if logprobs is not None:
        if not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            raise BadBody(
                f"invalid 'logprobs': must be from 0 to {MAX_COMPLETION_LOGPROBS}, not {logprobs}",
                "logprobs",
            )
        fields["logprobs"] = logprobs
    best_of = _int(body, "best_of")
    if best_of is not None and best_of not in (1, n):
        raise BadBody(
            f"invalid 'best_of': farm returns every sequence it generates, so best_of must be "
            f"1 or equal n ({n}), not {best_of}",
            "best_of",
        )
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise BadBody("invalid 'echo': must be a boolean", "echo")
    if echo:
        fields["echo"] = True
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise BadBody("invalid 'suffix': must be a string", "suffix")
    if suffix:
        raise BadBody(
            "'suffix' asks for text inserted before it (infill): farm's models are served "
            "for completion only; leave it out",
            "suffix",
        )
    return fields


_TOKEN_ID = re.compile(r"[0-9]{1,9}")


def logit_bias(value: Any) -> dict[str, float]:
    """OpenAI's logit_bias: token ids (as strings) to biases from -100 to 100."""
    if not isinstance(value, dict):
        raise BadBody(
            "invalid 'logit_bias': must be an object of token ids to biases", "logit_bias"
        )
    if len(value) > MAX_LOGIT_BIAS:
        raise BadBody(f"invalid 'logit_bias': at most {MAX_LOGIT_BIAS} tokens", "logit_bias")
    for key, bias in value.items():
        if not _TOKEN_ID.fullmatch(key):
            shown = key if len(key) <= 20 else key[:20] + "..."
            raise BadBody(
                f"invalid 'logit_bias': keys are token ids (such as \"1234\"), not '{shown}'",
                "logit_bias",
            )
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise BadBody(
                f"invalid 'logit_bias': the bias of token {key} must be a number from -100 to 100",
                "logit_bias",
            )
    return {k: float(v) for k, v in value.items()}


# -- responses ----------------------------------------------------------------------------------
def _alternative(e: dict[str, Any]) -> dict[str, Any]:
    return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Chat's `choices[].logprobs` for a choice's token entries (None: not asked for)."""
    if entries is None:
        return None
    return {
        "content": [
            {**_alternative(e), "top_logprobs": [_alternative(t) for t in e["top_logprobs"] or ()]}
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Completions' `choices[].logprobs` for a choice's token entries."""
    if entries is None:
        return None
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [
            None
            if e["top_logprobs"] is None
            else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
            for e in entries
        ],
        "text_offset": [e["text_offset"] for e in entries],
    }
