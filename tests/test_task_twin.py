"""The Celery task on a real Celery worker and real Redis, with the engine's in-memory twin
behind `ModelCache(host_factory=...)`: no model, so the job's path (submit, stream, result,
usage row, cancel) is tested in seconds. The end-to-end tests on Gemma stay the proof that
the real engine does the same (test_e2e_infer.py)."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator

import pytest
from celery.contrib.testing.worker import start_worker

import farm
from farm.context import FarmContext, get_context, reset_context
from farm.errors import JobCancelled
from farm.queue import TASK_NAME, queue_name, run_key, stream_key
from farm.registry import queries, transaction, upgrade
from tests.conftest import finished_usage
from workers.heartbeat import Membership
from workers.host import EngineOptions
from workers.models import ModelCache
from workers.spec import ModelSpec
from workers.tasks import JobRunner, register_task
from workers.twin import TwinHost

TWIN = "twin"
WORKER = "twin-worker"
SECONDS_PER_TOKEN = 0.002


@pytest.fixture(scope="module")
def twin_farm(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarmContext]:
    """A registry with model 'twin', served by a real Celery worker (two slots) in this
    process whose model host is the twin; this process's client points at it."""
    home = tmp_path_factory.mktemp("twin-farm")
    db = f"sqlite:///{home / 'registry.db'}"
    upgrade(db)
    with transaction(db) as s:
        queries.add_model(s, name=TWIN, path=str(home / "no-model.gguf"), n_ctx=4096)
    env = {"FARM_HOME": str(home), "FARM_BROKER_URL": redis_url, "FARM_DATABASE_URL": db}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        reset_context()
        ctx = get_context()
        options = EngineOptions(slots=2, threads=1)
        cache = ModelCache(
            [ModelSpec(name=TWIN, path=str(home / "no-model.gguf"))],
            options=options,
            host_factory=functools.partial(TwinHost, seconds_per_token=SECONDS_PER_TOKEN),
        )
        membership = Membership(ctx, WORKER, "cpu")
        membership.options, membership.cache = options, cache
        membership.begin()
        cache.preload()
        register_task(ctx.app, JobRunner(ctx, WORKER, cache))
        try:
            with start_worker(
                ctx.app,
                pool="threads",
                concurrency=options.slots,
                perform_ping_check=False,
                queues=[queue_name(TWIN)],
                loglevel="WARNING",
            ):
                membership.join("cpu")  # leased: the client now accepts jobs for 'twin'
                yield ctx
        finally:
            membership.leave()
            cache.close()
            reset_context()


def usage_row(ctx: FarmContext, job_id: str) -> object:
    [row] = finished_usage(ctx.database_url, job_id)
    return row


def test_a_job_streams_its_text_returns_its_completion_and_writes_one_usage_row(twin_farm):
    job = farm.submit("Hello, twin! ", model=TWIN, max_tokens=100, session="alice")
    pieces = list(job.stream(timeout=30))
    assert "".join(pieces) == "Hello, twin! " and len(pieces) > 1  # streamed, piece by piece
    c = job.completion
    assert c is not None and c.text == "Hello, twin! " and c.finish_reason == "stop"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (14, 13)  # BOS + 13 bytes
    assert c.worker == WORKER and c.timings.ttft_ms is not None
    row = usage_row(twin_farm, job.id)
    assert (row.status, row.session, row.model, row.worker_id) == (  # type: ignore[attr-defined]
        "succeeded",
        "alice",
        TWIN,
        WORKER,
    )
    assert (row.prompt_tokens, row.completion_tokens) == (14, 13)  # type: ignore[attr-defined]


def test_max_tokens_and_stop_strings_end_a_job_as_on_the_real_engine(twin_farm):
    c = farm.infer("abcdef", model=TWIN, max_tokens=3)
    assert (c.text, c.finish_reason, c.usage.completion_tokens) == ("abc", "length", 3)
    c = farm.infer("one, two; three", model=TWIN, max_tokens=100, stop=[";"])
    assert (c.text, c.finish_reason) == ("one, two", "stop")
    chat = farm.infer(model=TWIN, messages=[{"role": "user", "content": "Hi"}], max_tokens=9)
    assert chat.text == "Hi"


def test_cancelling_a_running_job_stops_it_and_its_row_says_cancelled(twin_farm):
    long = "x" * 3000  # 6 s at the twin's pace: cancelled long before its end
    job = farm.submit(long, model=TWIN, max_tokens=3500)
    tokens = job.stream(timeout=30)
    assert next(tokens)  # it runs
    assert job.cancel() is True
    with pytest.raises(JobCancelled):
        for _ in tokens:
            pass
    row = usage_row(twin_farm, job.id)
    assert row.status == "cancelled"  # type: ignore[attr-defined]
    assert 0 < row.completion_tokens < 3000  # type: ignore[attr-defined]
    # The slot it held is free again: the next job runs to its end.
    assert farm.infer("after", model=TWIN, max_tokens=10).text == "after"


def _events_of(ctx: FarmContext, job_id: str) -> list[tuple[str, dict[str, str]]]:
    return [(entry_id, fields) for entry_id, fields in ctx.redis.xrange(stream_key(job_id))]


def test_no_token_is_streamed_after_cancel_returns_and_only_those_before_are_billed(twin_farm):
    for attempt in range(10):
        job = farm.submit("y" * 2000, model=TWIN, max_tokens=2500)
        tokens = job.stream(timeout=30)
        for _ in range(3 + attempt):  # cancel at a different point each time
            next(tokens)
        assert job.cancel() is True
        [(last_before, _)] = twin_farm.redis.xrevrange(stream_key(job.id), count=1)
        with pytest.raises(JobCancelled):
            for _ in tokens:
                pass
        events = _events_of(twin_farm, job.id)
        after = [fields["kind"] for entry_id, fields in events if entry_id > last_before]
        kinds = [fields["kind"] for _, fields in events]
        # Nothing but the final event after cancel() returned (which may itself have come
        # before: the worker can stop and say so within cancel()'s own round trips).
        assert after in ([], ["cancelled"]), (attempt, after)
        assert kinds.count("cancelled") == 1 and kinds[-1] == "cancelled", (attempt, kinds[-3:])
        # One token per byte; count bytes, not events (the worker joins a job's queued
        # tokens into one event when a write round is slow).
        streamed = sum(len(fields["text"]) for _, fields in events if fields["kind"] == "token")
        row = usage_row(twin_farm, job.id)
        assert row.status == "cancelled"  # type: ignore[attr-defined]
        # Billed: what was streamed, plus the few the engine made in the
        # moments between cancel() and the refused write that stopped it (2 ms a token here),
        # not the ~100 it makes in one 0.2 s poll of the cancel flag.
        assert streamed <= row.completion_tokens <= streamed + 8  # type: ignore[attr-defined]


def test_a_second_delivery_of_a_running_job_waits_for_the_first_run_and_does_not_run_it_again(
    twin_farm,
):
    prompt = "z" * 1500  # about 3 s at the twin's pace
    job = farm.submit(prompt, model=TWIN, max_tokens=2000)
    tokens = job.stream(timeout=60)
    first = next(tokens)  # the first run is going
    # What a broker restart does: the same message handed out again while the first run
    # goes on (a streaming job, like the first: a second run would stream too).
    again = farm.Request.model_validate(
        {"model": TWIN, "prompt": prompt, "max_tokens": 2000, "stream_tokens": True}
    )
    twin_farm.app.send_task(
        TASK_NAME, args=[again.to_wire()], task_id=job.id, queue=queue_name(TWIN), priority=0
    )
    text = first + "".join(tokens)
    assert job.completion is not None and job.completion.finish_reason == "stop"
    assert text == prompt  # one run's text, whole, once
    # The second delivery ended once the first run had: it returned that run's result.
    result = twin_farm.app.AsyncResult(job.id).get(timeout=30)
    assert result["text"] == prompt
    events = [fields for _, fields in _events_of(twin_farm, job.id)]
    kinds = [e["kind"] for e in events]
    # One run's text on the stream, once (a piece may carry several tokens' text).
    assert "".join(e["text"] for e in events if e["kind"] == "token") == prompt
    assert (kinds.count("done"), kinds.count("restart"), kinds[-1]) == (1, 0, "done")
    row = usage_row(twin_farm, job.id)
    assert (row.status, row.completion_tokens) == ("succeeded", 1500)  # type: ignore[attr-defined]


def test_a_run_that_lost_its_job_to_another_stops_and_writes_nothing_more(twin_farm):
    # A worker cut off from Redis past the run key's ttl: another worker took the job over
    # (its lease expired, the reaper put the job back). When the first comes back, it must
    # neither stream nor end the job: the run holding the key does.
    job = farm.submit("w" * 1500, model=TWIN, max_tokens=2000)
    tokens = job.stream(timeout=60)
    next(tokens)
    twin_farm.redis.set(run_key(job.id), "another-worker:run", px=60_000)
    [(taken_at, _)] = twin_farm.redis.xrevrange(stream_key(job.id), count=1)
    # An absence, so a bounded watch: left alone the run would end within ~3 s (1500 tokens
    # at 2 ms) with a done event; watch 4 s for anything it writes after losing the job.
    deadline = time.monotonic() + 4
    after: list[str] = []
    while time.monotonic() < deadline and not after:
        after = [f["kind"] for entry_id, f in _events_of(twin_farm, job.id) if entry_id > taken_at]
        time.sleep(0.05)
    assert after == []  # no token, no done, no cancelled: nothing after it lost the job
    with transaction(twin_farm.database_url) as s:
        row = queries.get_usage(s, job.id)
    assert row is not None and row.status == "running"  # left to the run that holds it
    assert twin_farm.redis.get(run_key(job.id)) == "another-worker:run"
    twin_farm.redis.delete(run_key(job.id))
    assert farm.infer("next", model=TWIN, max_tokens=10).text == "next"  # the slot is free


def test_a_gateway_stream_whose_job_starts_over_elsewhere_sends_its_text_once(twin_farm):
    import asyncio

    from farm.context import get_context
    from farm.gateway.app import _events
    from farm.gateway.follow import async_redis

    prompt = "v" * 1200
    job = farm.submit(prompt, model=TWIN, max_tokens=1500)

    async def read() -> str:
        ctx = get_context()
        r = async_redis(ctx.result_url, ctx.settings.connect_timeout)
        events = _events(job, r, TWIN, False, False)
        text, lost = "", False
        async for event in events:
            if not event.startswith("data: {"):
                continue
            body = json.loads(event[6:])
            assert "error" not in body, body
            text += body["choices"][0]["text"] if body["choices"] else ""
            if len(text) > 50 and not lost:
                # Its worker is lost: its run stops writing (another holds the job now), and
                # the job is delivered again and starts over from the beginning.
                lost = True
                # Held by another for 0.5 s (its first run writes a token every 2 ms, so it
                # meets the fence at once), then free for the new delivery to take.
                twin_farm.redis.set(run_key(job.id), "gone-worker:run", px=500)
                again = farm.Request.model_validate(
                    {"model": TWIN, "prompt": prompt, "max_tokens": 1500, "stream_tokens": True}
                )
                twin_farm.app.send_task(
                    TASK_NAME, args=[again.to_wire()], task_id=job.id,
                    queue=queue_name(TWIN), priority=0,
                )  # fmt: skip
        return text

    text = asyncio.run(read())
    kinds = [fields["kind"] for _, fields in _events_of(twin_farm, job.id)]
    assert "restart" in kinds  # the job did start over
    assert text == prompt  # and the client got its text once, whole


def test_a_rerun_with_other_text_ends_the_gateway_stream_with_an_error_not_garbled_text():
    from farm.gateway.app import _Replay

    replay = _Replay()
    assert [replay.new_text(p) for p in ("Once ", "upon")] == ["Once ", "upon"]
    replay.restart()
    assert [replay.new_text(p) for p in ("On", "ce up", "on a time")] == ["", "", " a time"]
    replay.restart()
    assert replay.new_text("Once upon a hill") is None  # differs from what the client has


def test_a_reply_with_a_tool_call_streams_its_deltas_and_the_completion_holds_the_call(
    twin_farm,
):
    # The twin echoes the message: a reply in farm's generic tool-call format.
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    said = 'Sure. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    job = farm.submit(
        model=TWIN, messages=[{"role": "user", "content": said}], tools=tools, max_tokens=200
    )
    pieces = list(job.pieces(timeout=30))
    text = "".join(p.text for p in pieces)
    deltas = [p.tool_call for p in pieces if p.tool_call is not None]
    assert text == "Sure." and deltas[0].name == "add" and deltas[0].id
    assert "".join(d.arguments for d in deltas) == '{"a": 1, "b": 2}'
    c = job.completion
    assert c is not None and c.text == "Sure." and c.tool_calls is not None
    [call] = c.tool_calls
    assert (call.id, call.function.name) == (deltas[0].id, "add")
    assert call.function.parsed_arguments() == {"a": 1, "b": 2}
    assert "".join(job.stream(timeout=5)) == "Sure."  # read again: `stream` gives text alone
