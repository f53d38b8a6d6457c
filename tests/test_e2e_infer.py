"""End to end: farm.infer and farm.submit through real Redis, a real worker and real llama.cpp.

The model is a 270M base model: these tests check mechanics (text arrives, token counts,
stop strings, finish reasons, usage rows), not the quality of its answers.
"""

import time

import pytest
from sqlalchemy import func, select

import farm
from farm.context import get_context
from farm.queue import TASK_NAME, queue_name
from farm.registry import queries, transaction
from farm.registry.tables import UsageRecord
from tests.conftest import MODEL, fill_slots, finished_usage

pytestmark = pytest.mark.e2e


def usage_rows(db_url: str, job_id: str) -> list[UsageRecord]:
    return finished_usage(db_url, job_id)  # type: ignore[return-value]


def test_infer_returns_text_token_counts_and_timings(farm_client):
    c = farm.infer(
        "Why is the sky blue?",
        model=MODEL,
        priority="high",
        session="alice",
        max_tokens=16,
        timeout=60,
    )
    assert c.text.strip()
    assert c.usage.prompt_tokens > 0
    assert 0 < c.usage.completion_tokens <= 16
    assert c.finish_reason in ("stop", "length")
    assert c.timings.generation_ms > 0 and c.timings.queue_wait_ms >= 0
    assert c.worker.startswith(MODEL)
    [row] = usage_rows(farm_client.database_url, c.job_id)
    assert (row.status, row.session, row.priority) == ("succeeded", "alice", "high")
    assert (row.prompt_tokens, row.completion_tokens) == (
        c.usage.prompt_tokens,
        c.usage.completion_tokens,
    )


def test_a_reply_that_copies_its_prompt_reports_the_drafted_tokens_it_kept(farm_client):
    text = "one two three four five six seven eight nine ten eleven twelve"
    prompt = f"List: {text}\nThe same list again: one two three"
    drafted = farm.infer(prompt, model=MODEL, max_tokens=12, temperature=0, timeout=60)
    assert drafted.text.startswith(" four five six"), drafted.text
    assert 0 < drafted.timings.drafted_kept <= drafted.timings.drafted_tokens
    plain = farm.infer(prompt, model=MODEL, max_tokens=12, temperature=0, draft_max=0, timeout=60)
    assert plain.timings.drafted_tokens == 0 and plain.text.startswith(" four five six")


def test_streamed_tokens_arrive_one_by_one_and_add_up_to_the_text(farm_client):
    stream = farm.infer("Count to five:", model=MODEL, stream=True, max_tokens=24, timeout=60)
    pieces = list(stream)
    assert len(pieces) > 1
    assert stream.completion is not None
    assert "".join(pieces) == stream.completion.text


def test_chat_messages_use_the_models_chat_format(farm_client):
    c = farm.infer(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16,
        temperature=0,
        timeout=60,
    )
    assert c.usage.prompt_tokens > 5  # the template's turn markers are part of the prompt
    assert c.usage.completion_tokens > 0 and c.text.strip()


def test_a_system_message_is_kept_even_where_the_chat_format_has_no_system_role(farm_client):
    user = [{"role": "user", "content": "Say hello."}]
    system = [{"role": "system", "content": "You are a pirate who answers in rhymes."}]
    plain = farm.infer(model=MODEL, messages=user, max_tokens=1, timeout=60)
    with_system = farm.infer(model=MODEL, messages=system + user, max_tokens=1, timeout=60)
    # llama-cpp-python's gemma format drops system messages; farm folds them into the turn.
    assert with_system.usage.prompt_tokens > plain.usage.prompt_tokens + 5


def test_generation_stops_at_a_stop_string_which_is_not_returned(farm_client):
    c = farm.infer(
        "Count: 1, 2, 3,", model=MODEL, temperature=0, max_tokens=48, stop=["6"], timeout=60
    )
    assert c.finish_reason == "stop"
    assert "6" not in c.text and c.text


def test_max_tokens_ends_with_finish_reason_length(farm_client):
    c = farm.infer("Once upon a time", model=MODEL, max_tokens=3, timeout=60, temperature=0)
    assert c.finish_reason == "length" and c.usage.completion_tokens == 3


def test_submit_returns_at_once_with_a_job_to_follow(farm_client):
    job = farm.submit("Summarise: the sky is blue.", model=MODEL, priority="low", max_tokens=8)
    assert job.status() in ("queued", "running", "succeeded")
    c = job.result(timeout=60)
    assert c.job_id == job.id and job.status() == "succeeded"
    assert farm.job(job.id).result(timeout=5).text == c.text


def test_a_malformed_job_from_another_producer_fails_and_the_worker_goes_on(farm_client):
    bad = get_context().app.send_task(
        TASK_NAME, args=[{"model": MODEL, "temperature": 99}], queue=queue_name(MODEL)
    )
    with pytest.raises(farm.JobFailed, match="invalid request"):
        farm.Job(bad.id).result(timeout=60)
    assert farm.infer("Hello", model=MODEL, max_tokens=2, timeout=60).usage.completion_tokens > 0


def test_a_prompt_longer_than_the_context_fails_and_the_worker_serves_the_next(farm_client):
    job = farm.submit("word " * 6000, model=MODEL, max_tokens=4)
    with pytest.raises(farm.JobFailed, match="tokens but model 'gemma3-270m' holds 4096"):
        job.result(timeout=60)
    assert job.status() == "failed"
    assert farm.infer("Hello", model=MODEL, max_tokens=2, timeout=60).usage.completion_tokens > 0


def test_unknown_model_lists_the_known_ones_and_queues_nothing(farm_client):
    before = _count(farm_client.database_url)
    with pytest.raises(farm.UnknownModel, match="unknown model 'deepsek'; known: gemma3-270m"):
        farm.submit("hi", model="deepsek")
    assert _count(farm_client.database_url) == before


def test_a_bad_parameter_is_named_and_nothing_is_queued(farm_client):
    before = _count(farm_client.database_url)
    with pytest.raises(farm.InvalidRequest, match="'sampling.temperature'"):
        farm.submit("hi", model=MODEL, temperature=9)
    with pytest.raises(farm.InvalidRequest, match="context 4096"):
        farm.submit("hi", model=MODEL, max_tokens=5000)
    assert _count(farm_client.database_url) == before
    assert get_context().redis.llen(queue_name(MODEL) + "\x06\x165") == 0


def test_an_unreachable_broker_is_a_clear_error_within_seconds(farm_client, monkeypatch):
    from farm.context import reset_context

    before = _count(farm_client.database_url)
    monkeypatch.setenv("FARM_BROKER_URL", "redis://127.0.0.1:1/0")
    reset_context()
    started = time.monotonic()
    try:
        with pytest.raises(farm.FarmUnavailable, match="cannot reach the broker"):
            farm.submit("hi", model=MODEL, max_tokens=2)
    finally:
        monkeypatch.undo()
        farm_client.activate()
    assert time.monotonic() - started < 10
    assert _count(farm_client.database_url) == before  # nothing was recorded


def test_a_job_delivered_twice_leaves_one_usage_row_and_is_not_run_twice(farm_client):
    c = farm.infer("Hello there", model=MODEL, max_tokens=6, timeout=60)
    ctx = get_context()
    [first] = usage_rows(farm_client.database_url, c.job_id)
    # Deliver the very same job again, as Redis does after a lost acknowledgement.
    request = farm.Request.model_validate(
        {"model": MODEL, "prompt": "Hello there", "max_tokens": 6}
    )
    again = ctx.app.send_task(
        TASK_NAME, args=[request.to_wire()], task_id=c.job_id, queue=queue_name(MODEL)
    )
    assert again.get(timeout=60)["text"] == c.text
    [row] = usage_rows(farm_client.database_url, c.job_id)
    assert row.completion_tokens == first.completion_tokens
    assert row.finished_at == first.finished_at


def test_cancelling_a_running_job_stops_it_between_tokens(farm_client):
    job = farm.submit("Tell me a long story.", model=MODEL, max_tokens=2000)
    stream = job.stream(timeout=60)
    next(stream)  # it is generating
    assert job.cancel()
    with pytest.raises(farm.JobCancelled):
        for _ in stream:
            pass
    assert job.status() == "cancelled"
    [row] = usage_rows(farm_client.database_url, job.id)
    assert 0 < row.completion_tokens < 2000


def test_a_cancelled_queued_job_never_runs(farm_client):
    blockers = fill_slots(max_tokens=100)  # every slot busy: the next job waits
    waiting = farm.submit("Never run me", model=MODEL, max_tokens=4)
    assert waiting.cancel()
    assert waiting.status() == "cancelled"
    with pytest.raises(farm.JobCancelled):
        waiting.result(timeout=5)
    for blocker in blockers:
        blocker.result(timeout=120)
    after = farm.infer("Hello", model=MODEL, max_tokens=2, timeout=60)  # the worker moved on
    assert after.usage.completion_tokens > 0
    [row] = usage_rows(farm_client.database_url, waiting.id)
    assert row.status == "cancelled" and row.worker_id is None and row.completion_tokens == 0


def _count(db_url: str) -> int:
    with transaction(db_url) as s:
        return int(s.scalar(select(func.count()).select_from(UsageRecord)) or 0)


def test_usage_totals_reflect_finished_jobs(farm_client):
    for _ in range(2):
        c = farm.infer("Hi", model=MODEL, session="usage-test", max_tokens=3, timeout=60)
        finished_usage(farm_client.database_url, c.job_id)
    with transaction(farm_client.database_url) as s:
        [total] = queries.usage_totals(s, session="usage-test")
    assert total.jobs == 2 and total.succeeded == 2 and total.completion_tokens > 0


def test_a_prompt_far_beyond_the_context_is_refused_at_submit_and_nothing_is_queued(farm_client):
    before = _count(farm_client.database_url)
    # Raised by submit itself (a worker's refusal would come as JobFailed from result()).
    with pytest.raises(farm.InvalidRequest, match="invalid 'prompt': 1,000,000 bytes cannot fit"):
        farm.submit("x" * 1_000_000, model=MODEL, max_tokens=4)
    # Past FARM_MAX_PROMPT_CHARS (4 MiB) whatever the model: refused before the registry.
    with pytest.raises(farm.InvalidRequest, match="20,000,000 characters of text, more than one"):
        farm.submit("x" * 20_000_000, model=MODEL, max_tokens=4)
    with pytest.raises(farm.InvalidRequest, match="invalid 'messages'"):
        farm.submit(model=MODEL, messages=[{"role": "user", "content": "y" * 300_000}])
    assert _count(farm_client.database_url) == before
