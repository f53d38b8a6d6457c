"""The worker's StreamWriter on a real Redis: the running jobs' tokens written from one
thread, a round at a time, each write fenced as a single publish is; a job's queued pieces
of text joined into one event; drain() returns once a job's writes are on its stream."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from farm.queue import cancel_key, run_key, stream_key
from farm.stream import CANCELLED_, LOST, TOKEN, TOOL_CALL, Fenced
from workers.stream import StreamWriter


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


def held_job(r: redis.Redis, token: str = "run") -> Fenced:
    fence = Fenced(r, uuid.uuid4().hex, token, 5)
    assert fence.claim()
    return fence


def events(r: redis.Redis, fence: Fenced) -> list[dict[str, str]]:
    return [fields for _, fields in r.xrange(stream_key(fence.job_id))]


def test_many_jobs_text_reaches_each_stream_whole_and_in_order(r):
    writer = StreamWriter(r)
    jobs = [held_job(r) for _ in range(16)]
    refused: list[int] = []

    def run(fence: Fenced, n: int) -> None:
        for i in range(200):
            writer.write(fence, TOKEN, ttl=60, refused=refused.append, text=f"{n}.{i} ")
        writer.drain(fence)

    threads = [threading.Thread(target=run, args=(f, n)) for n, f in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert refused == []
    for n, fence in enumerate(jobs):
        got = events(r, fence)
        assert "".join(e["text"] for e in got) == "".join(f"{n}.{i} " for i in range(200))
        assert len(got) <= 200 and 0 < r.ttl(stream_key(fence.job_id)) <= 60


def test_queued_pieces_of_one_choice_are_joined_and_others_are_not(r):
    """A round takes what was queued meanwhile: a job's pieces of one choice's text that
    follow one another join (their logprobs too); across another choice's piece, a tool
    call, or between pieces with and without logprobs they do not."""
    client = r
    writer = StreamWriter(client)
    fence = held_job(client)
    writes = [
        (TOKEN, {"text": "a", "index": "0"}),
        (TOKEN, {"text": "b", "index": "0"}),
        (TOKEN, {"text": "x", "index": "1"}),
        (TOKEN, {"text": "c", "index": "0"}),
        (TOOL_CALL, {"delta": "{}", "index": "0"}),
        (TOKEN, {"text": "d", "index": "0", "logprobs": [{"t": "d"}]}),
        (TOKEN, {"text": "e", "index": "0", "logprobs": [{"t": "e"}]}),
        (TOKEN, {"text": "f", "index": "0"}),
    ]
    with writer._cond:  # hold the writer's thread off: the writes make one round
        for kind, fields in writes:
            writer.write(fence, kind, ttl=60, refused=lambda _: None, **fields)
    writer.drain(fence)
    got = [(e["kind"], e.get("text"), e.get("index"), e.get("logprobs")) for e in events(client, fence)]  # fmt: skip
    assert got == [
        ("token", "ab", "0", None),  # joined: the job's pieces one after another
        ("token", "x", "1", None),
        ("token", "c", "0", None),  # not joined to "ab": choice 1's piece came between
        ("tool_call", None, "0", None),
        ("token", "de", "0", '[{"t": "d"}, {"t": "e"}]'),
        ("token", "f", "0", None),
    ]


def test_a_write_the_fence_refuses_tells_its_job_and_writes_nothing(r):
    writer = StreamWriter(r)
    cancelled, taken = held_job(r), held_job(r, "first")
    r.set(cancel_key(cancelled.job_id), "1")
    r.set(run_key(taken.job_id), "second")  # another run holds it now
    outcomes: dict[str, list[int]] = {cancelled.job_id: [], taken.job_id: []}
    for fence in (cancelled, taken):
        writer.write(fence, TOKEN, ttl=60, refused=outcomes[fence.job_id].append, text="late")
        writer.drain(fence)
    assert outcomes == {cancelled.job_id: [CANCELLED_], taken.job_id: [LOST]}
    assert events(r, cancelled) == [] and events(r, taken) == []


def test_drain_of_a_job_that_wrote_nothing_returns_at_once(r):
    StreamWriter(r).drain(held_job(r))


def test_a_round_sent_again_after_a_lost_reply_writes_nothing_twice(r):
    """What a broker restart does mid-round: the pipeline's writes landed, its reply was
    lost, and the round is sent again whole. Each write carries its number in its job."""
    writer = StreamWriter(r)
    fence = held_job(r)
    with writer._cond:  # hold the writer's thread off: the round is sent by hand
        for piece in ("a", "b"):
            writer.write(fence, TOKEN, ttl=60, refused=lambda _: None, text=piece)
        writer.write(fence, TOOL_CALL, ttl=60, refused=lambda _: None, delta="{}")
        writes, writer._queued = writer._queued, []
        writer._waiting[fence] -= len(writes)
    assert writer._round(writes) == [1, 1, 1]
    assert writer._round(writes) == [1, 1, 1]  # sent again: "written", and written once
    writer.write(fence, TOKEN, ttl=60, refused=lambda _: None, text="c")
    writer.drain(fence)
    got = [(e["kind"], e.get("text")) for e in events(r, fence)]
    assert got == [("token", "ab"), ("tool_call", None), ("token", "c")]
