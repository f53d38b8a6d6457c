"""The OpenAI-compatible gateway with the official `openai` package, against a real
`farm serve` in front of the live farm's worker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from sqlalchemy import delete, func, select

from farm.registry import transaction
from farm.registry.tables import ApiKeyRecord, UsageRecord
from tests.conftest import MODEL, FarmUnderTest, finished_usage, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway(live_farm: FarmUnderTest) -> Iterator[str]:
    port = free_port()
    log = live_farm.home / "gateway.log"  # a file, not a pipe: the access log never blocks
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", "serve", "--port", str(port)],
        env=live_farm.env,
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
    r = httpx.post(f"{gateway}/v1/embeddings", json={"input": "x"}, timeout=30)
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
