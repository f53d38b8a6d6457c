"""Embeddings end to end: the official openai SDK's `client.embeddings.create` against a real
`farm serve` in front of the live farm's real Gemma worker, `farm.embed`, `farm embed`, a
batch file of /v1/embeddings lines, and the embedder batching the inputs of many jobs in
one decode."""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import func, select

import farm
from farm.openai.api import BadBody
from farm.openai.embeddings import embedding_fields
from farm.registry import queries, transaction
from farm.registry.tables import UsageRecord
from tests.conftest import MODEL, FarmUnderTest, finished_usage, free_port, gemma_path

pytestmark = pytest.mark.e2e

NO_EMBEDDINGS = "gemma-chat-only"  # the same GGUF, registered without embeddings
TEXTS = [f"Sentence number {i} is about {w}." for i, w in enumerate(["cats", "tea", "rain"] * 22)]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
def gateway(live_farm: FarmUnderTest) -> Iterator[str]:
    with transaction(live_farm.database_url) as s:
        if not any(m.name == NO_EMBEDDINGS for m in queries.list_models(s)):
            queries.add_model(s, name=NO_EMBEDDINGS, path=gemma_path(), chat_format="gemma")
    port = free_port()
    log = live_farm.home / "gateway-embeddings.log"
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


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def test_a_vector_is_the_same_alone_and_among_64_inputs_and_the_same_again(gateway):
    c = client(gateway)
    alone = c.embeddings.create(model=MODEL, input=TEXTS[5], encoding_format="float")
    many = c.embeddings.create(model=MODEL, input=TEXTS[:64], encoding_format="float")
    again = c.embeddings.create(model=MODEL, input=TEXTS[5], encoding_format="float")
    assert alone.model == MODEL and len(alone.data) == 1 and len(many.data) == 64
    assert [d.index for d in many.data] == list(range(64))
    vector = alone.data[0].embedding
    assert len(vector) == 640 and abs(math.sqrt(sum(v * v for v in vector)) - 1) < 1e-4
    assert cosine(vector, many.data[5].embedding) > 1 - 1e-4  # batching does not change it
    assert again.data[0].embedding == vector  # deterministic
    assert cosine(many.data[0].embedding, many.data[1].embedding) < 0.9999  # inputs differ
    assert alone.usage.prompt_tokens > 3 and alone.usage.total_tokens == alone.usage.prompt_tokens
    assert many.usage.prompt_tokens > 60 * 5


def test_base64_decodes_to_the_same_floats_and_the_sdk_default_reads_it(gateway, live_farm):
    body = {"model": MODEL, "input": ["a red apple", "a green pear"]}
    floats = httpx.post(f"{gateway}/v1/embeddings", json=body, timeout=120).json()
    packed = httpx.post(
        f"{gateway}/v1/embeddings", json=body | {"encoding_format": "base64"}, timeout=120
    )
    assert packed.status_code == 200
    for f, b in zip(floats["data"], packed.json()["data"], strict=True):
        raw = base64.b64decode(b["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == f["embedding"]
    # The SDK asks for base64 when no encoding_format is given, and decodes it.
    sdk = client(gateway).embeddings.create(model=MODEL, input=body["input"])
    assert sdk.data[1].embedding == floats["data"][1]["embedding"]
    # The job is a farm job: its usage row has the tokens, billed to the session.
    job_id = packed.headers["x-request-id"]
    [row] = finished_usage(live_farm.database_url, job_id)
    assert row.status == "succeeded"  # type: ignore[attr-defined]
    assert row.prompt_tokens == packed.json()["usage"]["prompt_tokens"]  # type: ignore[attr-defined]
    assert row.completion_tokens == 0  # type: ignore[attr-defined]


def test_token_arrays_embed_like_the_text_they_tokenize_to(gateway):
    c = client(gateway)
    text = c.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    tokens = c.embeddings.create(model=MODEL, input=[2, 23391, 1902], encoding_format="float")
    both = c.embeddings.create(
        model=MODEL, input=[[2, 23391, 1902], [2, 7]], encoding_format="float"
    )
    assert tokens.usage.prompt_tokens == 3 and both.usage.prompt_tokens == 5
    assert cosine(tokens.data[0].embedding, both.data[0].embedding) > 1 - 1e-4
    assert len(text.data[0].embedding) == len(tokens.data[0].embedding)


BAD = [
    ({"input": ["x"] * 2049}, "input"),
    ({"input": ""}, "input"),
    ({"input": ["fine", ""]}, "input"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": ["a", 3]}, "input"),
    ({"input": [[1, 2], []]}, "input"),
    ({"input": [-1]}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "dimensions": "64"}, "dimensions"),
    ({"input": "x", "dimensions": 64}, "dimensions"),  # Gemma allows no dimensions
    ({"input": "x", "model": NO_EMBEDDINGS}, "model"),
    ({"input": "x", "model": 7}, "model"),
    ({"input": "x", "temperature": 0.5}, "temperature"),
    ({}, "input"),
]


def queued_jobs(database_url: str) -> int:
    with transaction(database_url) as s:
        return int(s.scalar(select(func.count()).select_from(UsageRecord)) or 0)


@pytest.mark.parametrize(("body", "param"), BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_param_and_nothing_is_queued(gateway, live_farm, body, param):
    before = queued_jobs(live_farm.database_url)
    r = httpx.post(f"{gateway}/v1/embeddings", json={"model": MODEL} | body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert queued_jobs(live_farm.database_url) == before


def test_the_sdk_raises_a_bad_request_naming_the_input(gateway):
    with pytest.raises(openai.BadRequestError) as e:
        client(gateway).embeddings.create(model=MODEL, input=["x"] * 2049)
    assert e.value.param == "input"  # type: ignore[attr-defined]


def test_farm_embed_and_the_cli(farm_client: FarmUnderTest):
    e = farm.embed(["a cat", "a dog"], model=MODEL, session="emb")
    assert len(e.vectors) == 2 and len(e.vectors[0]) == 640 and e.usage.prompt_tokens > 4
    one = farm.embed("a cat", model=MODEL)
    assert cosine(one.vectors[0], e.vectors[0]) > 1 - 1e-4
    with pytest.raises(farm.InvalidRequest, match="'input'"):
        farm.embed([""], model=MODEL)
    r = farm_client.farm("embed", "a cat", "--model", MODEL)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout.strip())
    assert cosine(printed, e.vectors[0]) > 1 - 1e-4
    r = farm_client.farm("embed", "a cat", "a dog", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dimensions"] == 640
    r = farm_client.farm("embed", "x", "--model", NO_EMBEDDINGS)
    assert r.returncode == 1 and "does not serve embeddings" in r.stderr


def test_an_embeddings_batch_file_runs_to_results_in_openai_batch_output_shape(
    gateway, live_farm: FarmUnderTest, tmp_path: Path
):
    lines = [
        {
            "custom_id": f"doc-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": MODEL, "input": TEXTS[i : i + 3]}
            | ({"encoding_format": "base64"} if i == 1 else {}),
        }
        for i in range(4)
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    submitted = live_farm.farm("batch", "submit", str(path), "--name", f"emb-{time.time()}")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    waited = live_farm.farm("batch", "wait", batch_id, "--timeout", "180")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    out = tmp_path / "out.jsonl"
    assert live_farm.farm("batch", "results", batch_id, "-o", str(out)).returncode == 0
    results = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(results) == [f"doc-{i}" for i in range(4)]
    body = results["doc-2"]["response"]["body"]
    assert results["doc-2"]["response"]["status_code"] == 200 and body["object"] == "list"
    assert len(body["data"]) == 3 and body["usage"]["prompt_tokens"] > 0
    direct = farm.embed(TEXTS[2], model=MODEL).vectors[0]
    assert cosine(body["data"][0]["embedding"], direct) > 1 - 1e-4
    raw = base64.b64decode(results["doc-1"]["response"]["body"]["data"][1]["embedding"])
    assert cosine(list(struct.unpack(f"<{len(raw) // 4}f", raw)), direct) > 1 - 1e-4

    # Through the gateway's /v1/batches too: OpenAI's batch API takes embeddings lines.
    c = client(gateway)
    f = c.files.create(file=path.open("rb"), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    deadline = time.monotonic() + 180
    while (b := c.batches.retrieve(b.id)).status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert b.status == "completed" and b.output_file_id
    text = c.files.content(b.output_file_id).text
    assert len(text.splitlines()) == 4 and '"object": "embedding"' in text


def test_a_bad_embeddings_line_is_refused_with_the_file_and_nothing_is_queued(
    live_farm: FarmUnderTest, tmp_path: Path
):
    path = tmp_path / "bad.jsonl"
    good = {"custom_id": "a", "url": "/v1/embeddings", "body": {"model": MODEL, "input": "x"}}
    bad = {"custom_id": "b", "url": "/v1/embeddings", "body": {"model": MODEL, "input": ""}}
    no = {"custom_id": "c", "url": "/v1/embeddings", "body": {"model": NO_EMBEDDINGS, "input": "x"}}
    path.write_text("\n".join(json.dumps(x) for x in (good, bad, no)) + "\n")
    r = live_farm.farm("batch", "submit", str(path))
    assert r.returncode == 1
    assert "2: body.input" in r.stderr and "3: body.model" in r.stderr, r.stderr


def test_the_embedder_puts_the_inputs_of_many_jobs_in_one_decode_fairly():
    from llama_cpp import Llama

    from workers.engine import DONE, Embedder, EmbeddingJob
    from workers.repack import default_repack, model_params

    with model_params(repack=default_repack()):  # no AMX kernels: workers/repack.py
        llm = Llama(model_path=gemma_path(), n_ctx=64, verbose=False)
    embedder = Embedder(llm.model, pooling="mean", n_batch=512, threads=2, name="gemma")
    try:
        tokens = [llm.tokenize(t.encode(), add_bos=True, special=True) for t in TEXTS[:24]]
        jobs = [EmbeddingJob(inputs=tokens[i : i + 3]) for i in range(0, 24, 3)]
        for job in jobs:
            embedder.submit(job)
        results = [job.events.get(timeout=60) for job in jobs]
        assert all(kind == DONE for kind, _ in results)
        # 24 inputs of 8 jobs: far fewer decodes than inputs (batched, not one at a time).
        assert embedder.inputs_embedded == 24 and embedder.decodes <= 3
        alone = EmbeddingJob(inputs=[tokens[4]])
        embedder.submit(alone)
        kind, gen = alone.events.get(timeout=60)
        assert cosine(gen.embeddings[0], results[1][1].embeddings[1]) > 1 - 1e-4
        cancelled = EmbeddingJob(inputs=tokens)
        cancelled.cancel()
        embedder.submit(cancelled)
        kind, gen = cancelled.events.get(timeout=60)
        assert kind == DONE and gen.finish_reason == "cancelled"
        # Fair: a one-input job submitted behind one of 192 inputs ends long before it.
        big, small = EmbeddingJob(inputs=tokens * 8), EmbeddingJob(inputs=[tokens[0]])
        embedder.submit(big)
        embedder.submit(small)
        assert small.events.get(timeout=60)[0] == DONE
        assert big.events.empty() and big.next_input < len(big.inputs)
        assert big.events.get(timeout=300)[0] == DONE
        too_long = EmbeddingJob(inputs=[[2] * 600])
        embedder.submit(too_long)
        kind, reason = too_long.events.get(timeout=5)
        assert kind == "failed" and "invalid 'input'" in reason
    finally:
        embedder.close()
        llm.close()


def test_embedding_fields_refuse_what_openai_refuses_without_a_farm():
    assert embedding_fields({"model": "m", "input": [1, 2]})["input"] == [[1, 2]]
    assert embedding_fields({"model": "m", "input": "x"})["input"] == ["x"]
    for body, param in BAD[:10]:
        with pytest.raises(BadBody) as e:
            embedding_fields({"model": "m"} | body)
        assert e.value.param == param


def test_embeddings_count_against_the_session_quota_in_tokens(farm_client: FarmUnderTest):
    from farm.admission.quotas import standing
    from farm.context import get_context

    session = f"emb-quota-{time.time_ns()}"
    r = farm_client.farm("quota", "set", session, "--tokens-per-day", "200")
    assert r.returncode == 0, r.stderr
    get_context().quotas.clear()  # this process's one-second cache of the limits
    done = farm.embed(["one short text", "and another"], model=MODEL, session=session)
    with pytest.raises(farm.QuotaExceeded):  # 64 texts reserve far more than what is left
        farm.embed(TEXTS[:64], model=MODEL, session=session)
    deadline = time.monotonic() + 10  # the worker settles the reservation after the result
    while (now := standing(get_context(), session))["reserved"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now["used_today"] == done.usage.prompt_tokens and now["reserved"] == 0
