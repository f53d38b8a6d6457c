"""farm: an inference farm for llama.cpp models built on Celery.

A request's path, module by module:

    farm.infer() / farm.submit() / farm.embed() / `farm submit`   (no llama.cpp needed)
      -> request.py   validate fields and ranges into one Request
      -> enqueue.py   model known? fits its context? a live worker? record usage "queued",
                      then Celery send_task to the model's queue at the request's priority
      -> queue.py     queue names, priority mapping, the Celery app and transport options
           ... Redis ...
      -> workers/main.py   `farm worker`: loads the model, warms it up, then consumes
      -> workers/tasks.py  the Celery task: runs one job, streams tokens, records usage once
      -> workers/host.py   ModelHost: the loaded model, its tokenizer and chat template
      -> workers/engine/   the engine: every running sequence of a model in one batch
      -> results.py   Job.stream() / Job.result(): tokens and the Completion come back
      -> registry/    tables, migrations and queries: models, workers, leases, usage

Example:

    import farm
    c = farm.infer("Why is the sky blue?", model="gemma3-270m", priority="high")
    print(c.text, c.usage.completion_tokens)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal, overload

from farm.errors import (
    FarmError,
    FarmUnavailable,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobTimeout,
    NoLiveWorker,
    QueueFull,
    QuotaExceeded,
    RateLimited,
    UnknownJob,
    UnknownModel,
)

if TYPE_CHECKING:
    from farm.completion import Completion, Embeddings, Timings, Usage
    from farm.request import Message, Request
    from farm.results import Job

# Loaded on first use, so that `import farm` (and the CLI's --help) stays fast: these pull
# in pydantic, Celery, Redis and SQLAlchemy.
_LAZY = {
    "Message": "farm.request",
    "Request": "farm.request",
    "Completion": "farm.completion",
    "Embeddings": "farm.completion",
    "Job": "farm.results",
    "Timings": "farm.completion",
    "Usage": "farm.completion",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'farm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Completion",
    "Embeddings",
    "FarmError",
    "FarmUnavailable",
    "InvalidRequest",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobTimeout",
    "Message",
    "NoLiveWorker",
    "QueueFull",
    "QuotaExceeded",
    "RateLimited",
    "Request",
    "Stream",
    "Timings",
    "UnknownJob",
    "UnknownModel",
    "Usage",
    "embed",
    "infer",
    "job",
    "submit",
    "submit_many",
]


class Stream:
    """Tokens of a running job as they are generated; `.completion` is set at the end."""

    def __init__(self, job: Job, timeout: float | None):
        self.job = job
        self._tokens = job.stream(timeout)

    def __iter__(self) -> Iterator[str]:
        return self._tokens

    @property
    def completion(self) -> Completion | None:
        return self.job.completion


def submit(
    prompt: str | None = None,
    *,
    model: str | None = None,
    messages: list[dict[str, str]] | None = None,
    priority: Literal["high", "normal", "low"] = "normal",
    session: str = "default",
    wait_for_worker: float = 0.0,
    **params: Any,
) -> Job:
    """Queue a prompt (or chat `messages`) for `model` and return its Job at once.

    `model` defaults to FARM_DEFAULT_MODEL (gemma3-270m).

    `params` are sampling and stopping fields, flat (`temperature=0.2, max_tokens=64`) or
    nested (`sampling={...}, stopping={...}`), and an output constraint: `grammar` (GBNF
    text) or `response_format` (OpenAI's shape: `{"type": "json_object"}` or
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`).

    Raises InvalidRequest, UnknownModel, NoLiveWorker, QueueFull, QuotaExceeded or
    FarmUnavailable; in each case nothing was queued.
    """
    from farm.config import get_settings
    from farm.enqueue import build, submit_request

    model = model or get_settings().default_model
    request = build(
        prompt, model=model, messages=messages, priority=priority, session=session, **params
    )
    return submit_request(request, wait_for_worker=wait_for_worker)


def submit_many(requests: Iterable[Request | dict[str, Any]]) -> list[Job | FarmError]:
    """Queue many requests at once; returns a Job, or the error, for each, in order.

    Each item is a Request or a dict of `farm.submit`'s fields (`{"model": ...,
    "prompt": ..., "max_tokens": 8}`). An item that is invalid, names an unknown model or
    one no worker serves gets its error and is not queued; the others are published in
    pipelined batches and recorded in one registry transaction.

        results = farm.submit_many({"prompt": p, "max_tokens": 1} for p in prompts)
        jobs = [r for r in results if isinstance(r, farm.Job)]
    """
    from farm.config import get_settings
    from farm.enqueue import submit_many as submit_all

    default = get_settings().default_model

    def with_model(item: Request | dict[str, Any]) -> Request | dict[str, Any]:
        return {"model": default, **item} if isinstance(item, dict) else item

    return submit_all(with_model(item) for item in requests)


@overload
def infer(
    prompt: str | None = ..., *, stream: Literal[False] = ..., **kwargs: Any
) -> Completion: ...
@overload
def infer(prompt: str | None = ..., *, stream: Literal[True], **kwargs: Any) -> Stream: ...
def infer(
    prompt: str | None = None,
    *,
    stream: bool = False,
    timeout: float | None = None,
    **kwargs: Any,
) -> Completion | Stream:
    """Run a prompt and wait for it: the Completion, or with `stream=True` its tokens.

    Takes the same arguments as `submit`. Raises what `submit` raises, then JobFailed,
    JobCancelled, or JobTimeout after `timeout` seconds.

        for token in farm.infer("Count to five", model="gemma3-270m", stream=True):
            print(token, end="", flush=True)
    """
    from farm.enqueue import check_seconds

    check_seconds("timeout", timeout, optional=True)
    # Without a reader for them, the worker skips writing each token to Redis.
    job_ = submit(prompt, stream_tokens=stream, **kwargs)
    if stream:
        return Stream(job_, timeout)
    return job_.result(timeout)


def embed(
    input: str | list[str] | list[int] | list[list[int]],
    *,
    model: str | None = None,
    dimensions: int | None = None,
    priority: Literal["high", "normal", "low"] = "normal",
    session: str = "default",
    timeout: float | None = None,
    wait_for_worker: float = 0.0,
) -> Embeddings:
    """Embed a text, a list of up to 2,048 texts, a token array or a list of them; wait for
    the vectors (one per input, in order).

    The job goes on the model's queue like a completion (priorities, quotas, usage); the
    worker batches its inputs with other jobs' in one decode. `dimensions` shortens the
    vectors, for models registered with the sizes they allow.

        e = farm.embed(["a cat", "a dog"], model="gemma3-270m")
        len(e.vectors), len(e.vectors[0]), e.usage.prompt_tokens

    Raises InvalidRequest (naming `input`, `model`, `dimensions`; nothing queued) or what
    `farm.infer` raises.
    """
    from farm.completion import Embeddings
    from farm.config import get_settings
    from farm.enqueue import build, check_seconds, submit_request
    from farm.openai.embeddings import embedding_inputs

    check_seconds("timeout", timeout, optional=True)
    inputs = embedding_inputs(input)  # the gateway's rules and words (an InvalidRequest)
    request = build(
        None,
        model=model or get_settings().default_model,
        input=inputs,
        dimensions=dimensions,
        priority=priority,
        session=session,
        stream_tokens=False,
    )
    job_ = submit_request(request, wait_for_worker=wait_for_worker)
    return Embeddings.from_completion(job_.result(timeout))


def job(job_id: str) -> Job:
    """The Job with this id (to check its status, wait for it or cancel it)."""
    from farm.results import Job

    j = Job(job_id)
    j.status()  # raises UnknownJob for an id the registry has never seen
    return j
