"""The OpenAI-compatible gateway with the official `openai` package, against a real
`farm serve` in front of the live farm's worker."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
from sqlalchemy import delete, func, select

import farm
from farm.admission.quotas import LIMITS_CACHE_S
from farm.registry import transaction
from farm.registry.tables import TERMINAL_STATUSES, ApiKeyRecord, UsageRecord
from tests.conftest import LIVE_SLOTS, MODEL, FarmUnderTest, finished_usage, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway(live_farm: FarmUnderTest) -> Iterator[str]:
    port = free_port()
    log = live_farm.home / "gateway.log"  # a file, not a pipe: the access log never blocks
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", "serve", "--port", str(port)],
        env={**live_farm.env, "FARM_GATEWAY_HEADER_TIMEOUT": "2"},
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(30)


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def test_models_chat_streaming_and_completions_through_the_openai_sdk(gateway, live_farm):
    c = client(gateway)
    assert MODEL in [m.id for m in c.models.list()]
    reply = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, seed=1
    )
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage and reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 5
    job_id = reply.id.removeprefix("chatcmpl-")
    [row] = finished_usage(live_farm.database_url, job_id)
    assert row.session == "default"  # type: ignore[attr-defined]

    pieces, usage = [], None
    for chunk in c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert pieces and usage is not None and usage.completion_tokens > 0

    text = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert text.choices[0].text and text.usage and text.usage.completion_tokens == 5
    assert text.choices[0].finish_reason == "length"


def test_openai_shaped_errors_name_the_problem(gateway):
    c = client(gateway)
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=9
        )
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        c.chat.completions.create(model="deepsek", messages=[{"role": "user", "content": "hi"}])
    assert "unknown model 'deepsek'" in str(missing.value)
    r = httpx.post(f"{gateway}/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{gateway}/v1/moderations", json={"input": "x"}, timeout=30)
    assert r.status_code in (404, 405) and "/v1/chat/completions" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as long:
        c.completions.create(model=MODEL, prompt="word " * 5000, max_tokens=2)
    assert long.value.body["param"] == "prompt"  # type: ignore[index]
    assert long.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as top_p:
        c.completions.create(model=MODEL, prompt="hi", top_p=7)
    assert "'top_p'" in top_p.value.body["message"]  # type: ignore[index]
    assert "sampling." not in top_p.value.body["message"]  # type: ignore[index]


def usage_rows(database_url: str) -> int:
    with transaction(database_url) as s:
        return int(s.scalar(select(func.count()).select_from(UsageRecord)) or 0)


HI = [{"role": "user", "content": "hi"}]
BAD_BODIES = [
    ({"messages": HI, "stream": True, "stream_options": "yes"}, "stream_options"),
    ({"messages": HI, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": HI, "stream": True, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]},
     "messages.0.content.0.text"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     "messages.0.content.0"),
    ({"messages": HI, "n": True}, "n"),
    ({"messages": HI, "stream": "false"}, "stream"),
    ({"messages": HI, "max_tokens": "2"}, "max_tokens"),
    ({"messages": HI, "temperature": "0.5"}, "temperature"),
    ({"messages": HI, "stop": ["a", 1]}, "stop"),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "items": {"$ref": "#/$defs/gone"}}}}},
     "response_format.json_schema.schema"),
    ({"prompt": "hi", "logprobs": True}, "logprobs"),
    ({"prompt": "hi", "max_tokens": 2.0}, "max_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_a_body_of_the_wrong_types_is_a_400_naming_the_param_and_queues_nothing(
    gateway, live_farm, body, param
):
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    before = usage_rows(live_farm.database_url)
    r = httpx.post(f"{gateway}{route}", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert usage_rows(live_farm.database_url) == before  # nothing was queued


def test_a_body_nested_100000_deep_is_a_400(gateway):
    deep = b'{"model":' * 100_000 + b"1" + b"}" * 100_000
    r = httpx.post(f"{gateway}/v1/chat/completions", content=deep, timeout=30)
    assert r.status_code == 400 and "nests too deep" in r.json()["error"]["message"]


def test_a_client_that_disconnects_mid_stream_cancels_its_job(gateway, live_farm):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 2000,
        "stream": True,
    }
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        job_id = json.loads(first[6:])["id"].removeprefix("chatcmpl-")
        for _ in range(5):
            next(lines)
    [row] = finished_usage(live_farm.database_url, job_id, timeout=30)
    assert row.status == "cancelled" and row.completion_tokens < 2000  # type: ignore[attr-defined]


def test_keys_map_to_sessions_and_a_bad_or_revoked_key_is_refused(gateway, live_farm):
    key = live_farm.farm("keys", "create", "--session", "gw-alice").stdout.strip()
    other = live_farm.farm("keys", "create", "--session", "gw-bob").stdout.strip()
    assert key.startswith("farm-") and other.startswith("farm-") and key != other
    try:
        with pytest.raises(openai.AuthenticationError):
            client(gateway, "not-a-key").models.list()
        with pytest.raises(openai.AuthenticationError):
            client(gateway).models.list()  # keys exist now: none is no longer enough
        reply = client(gateway, key).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        [row] = finished_usage(live_farm.database_url, reply.id.removeprefix("cmpl-"))
        assert row.session == "gw-alice"  # type: ignore[attr-defined]
        assert live_farm.farm("keys", "revoke", key).returncode == 0
        with pytest.raises(openai.AuthenticationError):
            client(gateway, key).models.list()  # refused at once
        assert client(gateway, other).models.list()  # the other key still works
    finally:
        with transaction(live_farm.database_url) as s:
            s.execute(delete(ApiKeyRecord))  # other tests' gateways need no key


def batch_file(path, n: int, *, max_tokens: int = 4) -> bytes:
    lines = [
        {
            "custom_id": f"sdk-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"Say a number, {i}."}],
                "max_tokens": max_tokens,
            },
        }
        for i in range(n)
    ]
    path.write_bytes("".join(json.dumps(x) + "\n" for x in lines).encode())
    return path


def test_the_batch_api_through_the_openai_sdk(gateway, live_farm, tmp_path):
    c = client(gateway)
    with batch_file(tmp_path / "in.jsonl", 6).open("rb") as f:
        upload = c.files.create(file=f, purpose="batch")
    assert upload.purpose == "batch" and upload.bytes > 0
    assert c.files.retrieve(upload.id).filename == "in.jsonl"
    assert c.files.content(upload.id).read() == (tmp_path / "in.jsonl").read_bytes()

    # The file's lines are chat lines: a batch for /v1/completions refuses them, naming each.
    with pytest.raises(openai.BadRequestError) as wrong:
        c.batches.create(
            input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
        )
    assert "1: url: must be /v1/completions" in wrong.value.body["message"]  # type: ignore[index]

    batch = c.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 6
    retried = c.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert retried.id == batch.id  # a retried create never queues the file twice
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)
        batch = c.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 6
    assert batch.error_file_id is None and batch.metadata == {"job": "nightly"}
    assert batch.output_file_id is not None
    output = [json.loads(x) for x in c.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in output) == [f"sdk-{i}" for i in range(6)]
    reply = output[0]["response"]["body"]
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"]
    assert batch.id in [b.id for b in c.batches.list(limit=100).data]

    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_000000000000000000000000")
    with pytest.raises(openai.NotFoundError):
        c.files.content("file-nope")
    r = httpx.get(f"{gateway}/v1/batches", params={"limit": "many"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_cancelling_a_batch_through_the_sdk_keeps_what_ran(gateway, live_farm, tmp_path):
    c = client(gateway)
    with batch_file(tmp_path / "big.jsonl", 300, max_tokens=32).open("rb") as f:
        upload = c.files.create(file=f, purpose="batch")
    batch = c.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while c.batches.retrieve(batch.id).request_counts.completed < 3:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    cancelling = c.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    while batch.status != "cancelled":
        assert time.monotonic() < deadline + 60, batch
        time.sleep(0.3)
        batch = c.batches.retrieve(batch.id)
    counts = batch.request_counts
    assert counts.total == 300 and counts.completed >= 3 and counts.failed > 0
    assert counts.completed + counts.failed == 300
    kept = c.files.content(batch.output_file_id).text.splitlines()
    assert len(kept) == counts.completed
    errors = [json.loads(x) for x in c.files.content(batch.error_file_id).text.splitlines()]
    assert len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors if e["error"]} <= {"batch_cancelled"}


def test_a_completion_answers_with_its_job_id_and_leaves_an_access_line_without_the_prompt(
    gateway, live_farm
):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about zebra-kumquat."}],
        "max_tokens": 3,
    }
    r = httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200
    job_id = r.json()["id"].removeprefix("chatcmpl-")
    assert r.headers["x-request-id"] == job_id
    with httpx.stream(
        "POST", f"{gateway}/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as streamed:
        streamed.read()
        streamed_id = streamed.headers["x-request-id"]
    assert finished_usage(live_farm.database_url, streamed_id)  # a job's id, and it ran
    log = (live_farm.home / "gateway.log").read_text(errors="replace")
    deadline = time.monotonic() + 10
    while f"job={streamed_id}" not in log and time.monotonic() < deadline:  # once it ends
        time.sleep(0.1)
        log = (live_farm.home / "gateway.log").read_text(errors="replace")
    assert "POST /v1/chat/completions 200" in log and f"job={job_id}" in log
    assert f"job={streamed_id}" in log and "session=default" in log
    assert "zebra-kumquat" not in log  # never the prompt


# -- under load: waiting holds no thread, and a client that goes away cancels its job ---------
def last_usage_id(database_url: str) -> int:
    with transaction(database_url) as s:
        return int(s.scalar(select(func.max(UsageRecord.id))) or 0)


def rows_after(database_url: str, first: int, *, n: int, timeout: float = 15) -> list[UsageRecord]:
    """The `n` gateway jobs queued after usage row `first`, once all have ended."""
    deadline = time.monotonic() + timeout
    while True:
        with transaction(database_url) as s:
            rows = list(
                s.scalars(
                    select(UsageRecord)
                    .where(UsageRecord.id > first, UsageRecord.session != "filler")
                    .order_by(UsageRecord.id)
                )
            )
            s.expunge_all()
        if len(rows) >= n and all(r.status in TERMINAL_STATUSES for r in rows):
            return rows
        assert time.monotonic() < deadline, [(r.job_id, r.status) for r in rows]
        time.sleep(0.1)


@contextmanager
def every_slot_busy(live_farm: FarmUnderTest) -> Iterator[None]:
    """The live worker's slots all on long jobs, so what is queued now waits."""
    live_farm.activate()
    fillers = [
        farm.submit(
            model=MODEL, prompt=f"Count to a thousand, {i}.", max_tokens=2000, session="filler",
            priority="high",
        )
        for i in range(LIVE_SLOTS)
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while any(job.status() != "running" for job in fillers):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        yield
    finally:
        for job in fillers:
            job.cancel()


def test_closing_a_stream_whose_job_is_queued_cancels_it_before_it_starts(gateway, live_farm):
    body = {"model": MODEL, "messages": HI, "max_tokens": 50, "stream": True}
    with every_slot_busy(live_farm):
        with httpx.stream(
            "POST", f"{gateway}/v1/chat/completions", json=body, timeout=30,
            headers={"X-Farm-Priority": "low"},
        ) as r:  # fmt: skip
            job_id = r.headers["x-request-id"]
            assert farm.job(job_id).status() == "queued"
        [row] = finished_usage(live_farm.database_url, job_id, timeout=5)
        assert row.status == "cancelled" and row.started_at is None  # type: ignore[attr-defined]


def test_a_client_timeout_with_retries_leaves_every_attempts_job_cancelled(gateway, live_farm):
    first = last_usage_id(live_farm.database_url)
    impatient = openai.OpenAI(base_url=f"{gateway}/v1", api_key="none", timeout=2, max_retries=2)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a very long story."}],
            max_tokens=2000,
        )
    rows = rows_after(live_farm.database_url, first, n=3)
    assert len(rows) == 3  # the call and its 2 retries
    assert all(r.status == "cancelled" and r.completion_tokens < 2000 for r in rows)


def test_health_answers_while_more_requests_wait_than_any_pool_has_threads(gateway, live_farm):
    """60 non-streaming requests wait on queued jobs (Starlette's pool has 40 threads, and a
    wait held one each before): /health and /v1/models still answer, and when the 60
    clients go away, their jobs are cancelled without ever starting."""
    waiting = 60
    body = {"model": MODEL, "messages": HI, "max_tokens": 4}

    async def crowd() -> None:
        limits = httpx.Limits(max_connections=waiting + 10)
        async with httpx.AsyncClient(base_url=gateway, timeout=60, limits=limits) as http:
            calls = [
                asyncio.create_task(http.post("/v1/chat/completions", json=body))
                for _ in range(waiting)
            ]
            deadline = time.monotonic() + 30
            while usage_rows(live_farm.database_url) < before + waiting:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            health = await http.get("/health", timeout=5)
            models = await http.get("/v1/models", timeout=5)
            assert health.status_code == 200 and health.json()["status"] == "ok"
            assert MODEL in [m["id"] for m in models.json()["data"]]
            assert not any(call.done() for call in calls)  # all still waiting
            for call in calls:
                call.cancel()  # the clients hang up
            await asyncio.gather(*calls, return_exceptions=True)

    with every_slot_busy(live_farm):
        first = last_usage_id(live_farm.database_url)
        before = usage_rows(live_farm.database_url)
        asyncio.run(crowd())
        rows = rows_after(live_farm.database_url, first, n=waiting)
    assert len(rows) == waiting
    assert all(r.status == "cancelled" and r.started_at is None for r in rows)


def test_a_body_over_the_limit_is_a_413_and_reaches_no_queue(gateway, live_farm):
    before = usage_rows(live_farm.database_url)
    huge = json.dumps({"model": MODEL, "prompt": "word " * 4_000_000}).encode()  # 20 MB
    r = httpx.post(f"{gateway}/v1/completions", content=huge, timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    assert "FARM_GATEWAY_MAX_BODY" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused as it arrives
        yield huge[:1_000_000]
        for i in range(1_000_000, len(huge), 1_000_000):
            yield huge[i : i + 1_000_000]

    r = httpx.post(f"{gateway}/v1/completions", content=chunks(), timeout=60)
    assert r.status_code == 413, r.text
    assert usage_rows(live_farm.database_url) == before


def raw_exchange(url: str, data: bytes, *, wait: float = 10) -> tuple[bytes, float]:
    """What the gateway answers to `data` on a raw connection before closing it, and when."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def test_what_the_http_server_answers_itself_is_json_and_slow_headers_are_cut_off(gateway):
    # Headers that never finish (slow-loris): 408 after FARM_GATEWAY_HEADER_TIMEOUT (2 s here).
    answer, took = raw_exchange(gateway, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and 1.5 < took < 8, (answer, took)
    assert json.loads(body)["error"]["code"] == "request_timeout"
    # Headers over the limit, and bytes that are not HTTP: 400 in OpenAI's shape, not text.
    huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n"
    for data in (huge, b"\x16\x03\x01 not http at all\r\n\r\n"):
        answer, _ = raw_exchange(gateway, data)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), answer[:200]
        assert json.loads(body)["error"]["code"] == "invalid_http_request"
    # The head's limit (64 KiB) holds whether the head comes at once or in pieces, and a
    # head under it, trickled in pieces that each come in time, is answered.
    host, port = gateway.removeprefix("http://").split(":")
    for size, pieces, status in ((70_000, 1, b"400"), (70_000, 7, b"400"), (60_000, 4, b"200")):
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
        step = len(head) // pieces + 1
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            for i in range(0, len(head), step):
                sock.sendall(head[i : i + step])
                time.sleep(0.3 if pieces > 1 else 0)
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 " + status), (size, pieces, answer[:200])
    # A head that grows past the limit without ending is refused as it passes it, not
    # buffered until the header timeout.
    endless = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000
    answer, took = raw_exchange(gateway, endless)
    assert answer.startswith(b"HTTP/1.1 400") and took < 1.5, (answer[:200], took)
    # A connection that keeps its requests coming in time is never cut off.
    with httpx.Client(base_url=gateway, timeout=10) as http:
        for _ in range(3):
            assert http.get("/health").status_code == 200
            time.sleep(1)


def test_pipelined_requests_and_blank_lines_meet_the_connection_rules_as_single_ones(gateway):
    """llhttp parses a connection's requests as they come, pipelined ones included, and
    skips blank lines between them: neither may dodge the header timeout nor trip the head's
    limit, and an error for a later request never cuts into an earlier one's answer."""
    host, port = gateway.removeprefix("http://").split(":")
    # Blank lines are not a request's head: they get the header timeout (2 s here) too.
    answer, took = raw_exchange(gateway, b"\r\n")
    assert answer.startswith(b"HTTP/1.1 408") and 1.5 < took < 8, (answer[:200], took)
    # 2,000 pipelined requests (70 KB) and the next one's first bytes in one write: their
    # bytes are not the next head's, which is answered once it is complete.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 2000 + b"GET /hea")
        time.sleep(0.3)
        sock.sendall(b"lth HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.count(b"HTTP/1.1 200") == 2001 and b"HTTP/1.1 400" not in answer
    # Not HTTP, pipelined behind a stream: the stream is sent whole, then the connection
    # closes (an error written at once went into the middle of the stream).
    body = json.dumps({"model": MODEL, "messages": HI, "max_tokens": 8, "stream": True})
    stream = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    answer, _ = raw_exchange(gateway, stream + b"BOGUS\x01 / HTTP/1.1\r\n\r\n", wait=60)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:400]
    assert b"data: [DONE]" in answer and b"HTTP/1.1 400" not in answer, answer[-400:]


def test_a_rate_limited_session_gets_429_with_retry_after_and_ratelimit_headers(gateway, live_farm):
    assert live_farm.farm("quota", "set", "default", "--rpm", "2").returncode == 0
    # The gateway keeps a session's limits for LIMITS_CACHE_S: an earlier test's request may
    # have left "no limit" there just before the set.
    time.sleep(LIMITS_CACHE_S)
    try:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
        first = httpx.post(f"{gateway}/v1/completions", json=body, timeout=60)
        assert first.status_code == 200, first.text
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert first.headers["x-ratelimit-reset-requests"].endswith("s")
        streamed = httpx.post(
            f"{gateway}/v1/completions", json={**body, "stream": True}, timeout=60
        )
        assert streamed.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError) as refused:
            client(gateway).completions.create(**body)
        response = refused.value.response
        assert response.status_code == 429 and 1 <= int(response.headers["retry-after"]) <= 60
        assert int(response.headers["retry-after-ms"]) > 0
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    finally:
        assert live_farm.farm("quota", "remove", "default").returncode == 0
