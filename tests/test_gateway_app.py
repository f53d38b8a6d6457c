"""The gateway app in this process on a real registry (SQLite and PostgreSQL): who may call
it (the key rule of farm/gateway/keys.py, and `farm serve` beyond loopback in a subprocess),
and input it must refuse with a 4xx naming the parameter, never a 500."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

from farm.config import reset_settings
from farm.context import get_context, reset_context
from farm.gateway import keys
from farm.gateway.app import create_app
from farm.gateway.edge import off_loop
from farm.queue import keys_version_key
from farm.registry import transaction, upgrade
from farm.registry.queries import keys as stored
from tests.conftest import free_port, run_cli


@pytest.fixture
def registry(migrated_db: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This process's farm pointed at an empty, migrated registry and the test Redis."""
    monkeypatch.setenv("FARM_DATABASE_URL", migrated_db)
    monkeypatch.setenv("FARM_BROKER_URL", redis_url)
    monkeypatch.delenv("FARM_GATEWAY_REQUIRE_KEYS", raising=False)
    reset_settings()
    reset_context()
    yield migrated_db
    monkeypatch.undo()
    reset_settings()
    reset_context()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_key(url: str, session: str) -> str:
    with transaction(url) as s:
        return keys.create(s, session)


def revoke(url: str, key: str) -> None:
    """As `farm keys revoke` does it: the registry, then the token gateways watch."""
    assert keys.revoke(url, key, lambda: get_context().redis) == 1


def test_a_remembered_key_costs_no_registry_read_until_the_revocation_token_changes(registry):
    gateway = TestClient(create_app())
    key = new_key(registry, "erin")
    reads: list[str] = []

    def on_read(conn, cursor, statement, *args):
        if "api_keys" in statement:
            reads.append(statement)

    event.listen(Engine, "before_cursor_execute", on_read)
    try:
        assert gateway.get("/v1/models", headers=bearer(key)).status_code == 200
        looked_up = len(reads)
        assert looked_up > 0
        for _ in range(5):
            assert gateway.get("/v1/models", headers=bearer(key)).status_code == 200
        assert len(reads) == looked_up  # remembered: the key's table was not read again
        # Revoked behind farm's back (by SQL, no token changed): still remembered...
        with transaction(registry) as s:
            assert stored.revoke(s, key) == 1
        assert gateway.get("/v1/models", headers=bearer(key)).status_code == 200
        # ...until the token changes: here Redis loses it, as a restarted one would.
        get_context().redis.delete(keys_version_key())
        refused = gateway.get("/v1/models", headers=bearer(key))
        assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]
        assert len(reads) > looked_up
    finally:
        event.remove(Engine, "before_cursor_execute", on_read)


def test_farm_keys_revoke_refuses_a_remembered_key_on_the_next_request(registry, tmp_path):
    gateway = TestClient(create_app())
    key = new_key(registry, "frank")
    other = new_key(registry, "grace")
    for k in (key, other):
        assert gateway.get("/v1/models", headers=bearer(k)).status_code == 200  # remembered
    env = {**os.environ, "FARM_HOME": str(tmp_path)}
    revoked = run_cli(env, "keys", "revoke", key)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
    r = gateway.get("/v1/models", headers=bearer(key))
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert gateway.get("/v1/models", headers=bearer(other)).status_code == 200


def test_farm_keys_revoke_says_what_it_did_and_what_to_do_when_gateways_cannot_be_told(
    registry, tmp_path
):
    key = new_key(registry, "heidi")
    env = {**os.environ, "FARM_HOME": str(tmp_path)}
    unknown = run_cli(env, "keys", "revoke", "farm-nosuchkey")
    assert unknown.returncode != 0 and "no key starts with 'farm-nosuchk'" in unknown.stderr
    redis = get_context().redis
    told = run_cli({**env, "FARM_BROKER_URL": "redis://127.0.0.1:1/0"}, "keys", "revoke", key)
    assert told.returncode == 1
    assert (
        "revoked in the registry" in told.stderr and f"farm keys revoke {key[:12]}" in told.stderr
    )
    with transaction(registry) as s:
        assert stored.counts(s) == (1, 0)  # revoked all the same
    before = redis.get(keys_version_key())
    again = run_cli(env, "keys", "revoke", key[:12])  # as the message says: gateways told now
    assert again.returncode == 0 and "already revoked; gateways told again" in again.stdout
    assert redis.get(keys_version_key()) != before


@contextmanager
def silent_redis() -> Iterator[socket.socket]:
    """A listening socket where Redis would be: it accepts connections, never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        yield silent


def test_a_redis_that_does_not_answer_is_not_waited_for_and_not_asked_again_at_once(registry):
    key = new_key(registry, "ivan")
    check = keys.KeyCheck(lambda: registry, required=False, exposed=False)
    with silent_redis() as silent:

        async def twice() -> tuple[keys.Caller, keys.Caller, float]:
            r = aioredis.Redis(port=silent.getsockname()[1])  # no socket timeout of its own
            t = time.monotonic()
            first = await check.caller(key, r, off_loop)
            waited = time.monotonic() - t
            second = await check.caller(key, r, off_loop)
            await r.aclose()
            return first, second, waited

        first, second, waited = asyncio.run(twice())
        assert first.session == second.session == "ivan"  # from the registry, both times
        assert waited < 3  # the token read gave up (after 0.25 s): it did not hang
        silent.accept()[0].close()  # the first check's connection
        silent.settimeout(0.5)
        with pytest.raises(TimeoutError):
            silent.accept()  # the second did not ask Redis again


def test_a_farm_that_never_had_keys_asks_redis_for_no_token(registry):
    check = keys.KeyCheck(lambda: registry, required=False, exposed=False)
    with silent_redis() as silent:

        async def requests() -> list[keys.Caller]:
            r = aioredis.Redis(port=silent.getsockname()[1])
            found = [await check.caller(token, r, off_loop) for token in ("", "sk-x", "none")]
            await r.aclose()
            return found

        check.counts()  # read a moment ago: no key ever
        assert {c.session for c in asyncio.run(requests())} == {"default"}
        silent.settimeout(0.5)
        with pytest.raises(TimeoutError):
            silent.accept()  # no connection: nothing to remember, no token to read


def test_revoking_the_last_key_leaves_keys_required_and_the_revoked_key_refused(registry):
    gateway = TestClient(create_app())
    assert gateway.get("/v1/models").status_code == 200  # no key ever: a laptop's farm
    key = new_key(registry, "alice")
    assert gateway.get("/v1/models", headers=bearer(key)).status_code == 200
    revoke(registry, key)

    revoked = gateway.get("/v1/models", headers=bearer(key))
    assert revoked.status_code == 401
    assert "revoked" in revoked.json()["error"]["message"]
    assert revoked.json()["error"]["code"] == "invalid_api_key"
    unknown = gateway.get("/v1/models", headers=bearer("none"))
    assert unknown.status_code == 401 and "unknown API key" in unknown.json()["error"]["message"]
    # Without a key the count may be a second old: it may take that long, never more.
    deadline = time.monotonic() + 5
    while (r := gateway.get("/v1/models")).status_code != 401:
        assert r.status_code == 200 and time.monotonic() < deadline
    assert "missing API key" in r.json()["error"]["message"]
    assert gateway.get("/health").json()["keys_required"] is True
    refused = gateway.post("/v1/chat/completions", headers=bearer(key), json={"model": "m"})
    assert refused.status_code == 401  # the revoked key never acts as session 'default'


def test_keys_are_required_before_any_exists_when_the_setting_says_so(registry, monkeypatch):
    monkeypatch.setenv("FARM_GATEWAY_REQUIRE_KEYS", "true")
    reset_settings()
    gateway = TestClient(create_app())
    r = gateway.get("/v1/models", headers=bearer("sk-anything"))
    assert r.status_code == 401 and "farm keys create" in r.json()["error"]["message"]
    assert gateway.get("/health").json()["keys_required"] is True
    key = new_key(registry, "bob")
    assert gateway.get("/v1/models", headers=bearer(key)).status_code == 200


def test_an_exposed_gateway_refuses_every_request_once_no_key_is_live(registry):
    gateway = TestClient(create_app(exposed=True))
    key = new_key(registry, "carol")
    assert gateway.get("/v1/models", headers=bearer(key)).status_code == 200
    revoke(registry, key)
    for headers in (bearer(key), bearer("other"), {}):
        deadline = time.monotonic() + 5
        while (r := gateway.get("/v1/files", headers=headers)).status_code != 503:
            assert r.status_code == 401 and time.monotonic() < deadline
        error = r.json()["error"]
        assert error["code"] == "no_live_key" and "farm keys create" in error["message"]
    assert gateway.get("/health").status_code == 200  # liveness probes still answered


def farm_env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    """A farm on a fresh SQLite registry in `tmp_path` and the test Redis."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    return {
        **os.environ,
        "FARM_HOME": str(tmp_path),
        "FARM_DATABASE_URL": url,
        "FARM_BROKER_URL": redis_url,
    }


@contextmanager
def serving(env: dict[str, str], host: str = "127.0.0.1") -> Iterator[str]:
    """`farm serve` in a subprocess, once /health answers: its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", "serve", "--host", host, "--port", str(port),
         "--no-feeder"],
        env=env,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()


def test_farm_serve_beyond_loopback_stops_serving_when_its_last_key_is_revoked(
    tmp_path: Path, redis_url: str
):
    env = farm_env(tmp_path, redis_url)
    key = run_cli(env, "keys", "create", "--session", "dave").stdout.strip()
    # 127.0.0.2: a loopback address, but not one `farm serve` takes for local
    with serving(env, "127.0.0.2") as base:
        assert httpx.get(f"{base}/v1/models", headers=bearer(key)).status_code == 200
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert run_cli(env, "keys", "revoke", key).returncode == 0
        upload = httpx.post(
            f"{base}/v1/files",
            headers=bearer(key),
            files={"file": ("in.jsonl", b"{}\n")},
            data={"purpose": "batch"},
        )
        assert upload.status_code == 503 and upload.json()["error"]["code"] == "no_live_key"


@pytest.mark.parametrize(
    ("method", "path", "param"),
    [
        ("GET", "/v1/files/file-%00", "file_id"),
        ("GET", "/v1/files/file-%00/content", "file_id"),
        ("DELETE", "/v1/files/file-%00", "file_id"),
        ("GET", "/v1/batches/batch_%00", "batch_id"),
        ("POST", "/v1/batches/batch_%00/cancel", "batch_id"),
        ("GET", "/v1/batches?after=%00", "after"),
    ],
)
def test_a_nul_in_a_file_or_batch_id_is_a_400_naming_it(registry, method, path, param):
    r = TestClient(create_app()).request(method, path)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and "NUL" in r.json()["error"]["message"]


def upload(gateway: TestClient, content: bytes, filename: str = "in.jsonl") -> httpx.Response:
    return gateway.post("/v1/files", files={"file": (filename, content)}, data={"purpose": "batch"})


def test_batch_bodies_and_files_holding_nul_are_refused_naming_the_field(registry):
    gateway = TestClient(create_app())
    form = (  # by hand: httpx would escape the NUL in the file's name
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a\x00.jsonl"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n{}\n\r\n--b--\r\n"
    )
    r = gateway.post(
        "/v1/files", content=form, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "file", r.text
    line = {
        "custom_id": "q\u0000",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "m", "prompt": "hi"},
    }
    file_id = upload(gateway, json.dumps(line).encode() + b"\n").json()["id"]
    for body, param, says in [
        ({"input_file_id": file_id, "endpoint": "/v1/completions"}, "input_file_id", "custom_id"),
        ({"input_file_id": "file-\x00", "endpoint": "/v1/completions"}, "input_file_id", "NUL"),
        (
            {"input_file_id": file_id, "endpoint": "/v1/completions", "metadata": {"k": "\x00"}},
            "metadata.k",
            "NUL",
        ),
        ({"input_file_id": file_id, "endpoint": "/v1/completions", "metadata": {"k": 1}},
         "metadata", "strings"),
    ]:  # fmt: skip
        r = gateway.post("/v1/batches", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and says in r.json()["error"]["message"]
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    r = gateway.post("/v1/batches", content=deep)
    assert r.status_code == 400 and "nests too deep" in r.json()["error"]["message"]


def test_a_503_for_a_model_no_worker_serves_tells_an_http_client_to_retry_not_a_cli_flag():
    from farm.errors import NoLiveWorker
    from farm.openai import api as openai_api

    raised = NoLiveWorker(
        "no worker is serving model 'qwen'; start one with `farm worker --model qwen` (or "
        "`farm up --model qwen`), or pass --wait-for-worker SECONDS to wait for one"
    )
    status, body = openai_api.error(raised)
    assert status == 503 and body["error"]["code"] == "service_unavailable"
    message = body["error"]["message"]
    assert "model 'qwen'" in message and "retry later" in message
    assert "--wait-for-worker" not in message


def test_every_response_has_a_request_id_and_every_request_an_access_log_line(registry, caplog):
    gateway = TestClient(create_app())
    key = new_key(registry, "alice")
    caplog.set_level(logging.INFO, logger="farm.access")
    ok = gateway.get("/v1/models", headers=bearer(key))
    refused = gateway.get("/v1/models", headers={**bearer("wrong"), "x-request-id": "trace-7"})
    bad = gateway.post(
        "/v1/chat/completions",
        headers={**bearer(key), "x-request-id": "not ok\nid"},
        json={"model": "m", "messages": [{"role": "user", "content": "my secret prompt"}],
              "max_tokens": "2"},
    )  # fmt: skip
    assert (ok.status_code, refused.status_code, bad.status_code) == (200, 401, 400)
    assert len(ok.headers["x-request-id"]) == 32  # a new id
    assert refused.headers["x-request-id"] == "trace-7"  # the caller's own, echoed
    assert bad.headers["x-request-id"] != "not ok\nid"  # not plain text: a new one instead
    lines = [r.getMessage() for r in caplog.records if r.name == "farm.access"]
    assert len(lines) == 3
    assert lines[0].startswith("GET /v1/models 200 ") and "session=alice" in lines[0]
    assert lines[1].startswith("GET /v1/models 401 ")
    assert lines[2].startswith("POST /v1/chat/completions 400 ") and "session=alice" in lines[2]
    assert not any("secret" in line for line in lines)  # never the prompt


def test_a_request_without_a_key_is_refused_before_its_body_is_read(registry, monkeypatch):
    monkeypatch.setenv("FARM_GATEWAY_REQUIRE_KEYS", "true")
    reset_settings()
    reset_context()
    gateway = TestClient(create_app())
    junk = b"not json " * 2_000_000  # 18 MB: read and parsed, it would be a 400
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/batches"):
        r = gateway.post(route, content=junk)
        assert r.status_code == 401, (route, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_a_body_over_the_limit_is_a_413_whether_or_not_it_declares_its_length(
    registry, monkeypatch
):
    monkeypatch.setenv("FARM_GATEWAY_MAX_BODY", "4096")
    reset_settings()
    reset_context()
    gateway = TestClient(create_app())
    big = json.dumps({"model": "m", "prompt": "word " * 2000}).encode()
    declared = gateway.post("/v1/completions", content=big)
    chunked = gateway.post("/v1/completions", content=iter([big[:3000], big[3000:]]))
    for r in (declared, chunked):
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "request_too_large" and "4,096 bytes" in error["message"]
    small = gateway.post("/v1/completions", json={"model": "m", "prompt": 7})
    assert small.status_code == 400 and small.json()["error"]["param"] == "prompt"


def test_text_past_max_prompt_chars_is_a_400_naming_the_input_before_the_model_is_looked_up(
    registry, monkeypatch
):
    monkeypatch.setenv("FARM_MAX_PROMPT_CHARS", "2000")
    reset_settings()
    reset_context()
    gateway = TestClient(create_app())
    long = "x" * 2001
    for route, param, body in (
        ("/v1/completions", "prompt", {"prompt": long}),
        ("/v1/completions", "prompt", {"prompt": ["short", long[:1000], long[:1000]]}),
        ("/v1/chat/completions", "messages", {"messages": [{"role": "user", "content": long}]}),
        ("/v1/embeddings", "input", {"input": [long[:1500], long[:1500]]}),
    ):
        # "nosuchmodel" is not registered: the size is refused first (a 400, not a 404).
        r = gateway.post(route, json={"model": "nosuchmodel", **body})
        assert r.status_code == 400, (route, r.text)
        error = r.json()["error"]
        assert error["param"] == param, (route, error)
        assert "more than one request may carry (FARM_MAX_PROMPT_CHARS=2,000)" in error["message"]
    at_the_limit = gateway.post(
        "/v1/completions", json={"model": "nosuchmodel", "prompt": long[1:]}
    )
    # Within the limit: on to the farm, which refuses it for what it is (no farm running
    # here: 503; or, where an earlier test left this process pointed at one, the unknown
    # model: 404), never for its size.
    assert at_the_limit.status_code in (404, 503), at_the_limit.text
    assert "FARM_MAX_PROMPT_CHARS" not in at_the_limit.json()["error"]["message"]


def test_the_farms_status_is_for_admin_keys_only(registry, redis_url, monkeypatch):
    monkeypatch.setenv("FARM_BROKER_URL", redis_url)  # the queues' depths are read there
    reset_settings()
    reset_context()
    gateway = TestClient(create_app())
    laptop = gateway.get("/farm/status")  # no key ever: generation is open, the status not
    assert laptop.status_code == 403 and laptop.json()["error"]["code"] == "not_admin"
    assert gateway.get("/v1/models").status_code == 200
    with transaction(registry) as s:
        admin = keys.create(s, "ops", admin=True)
    user = new_key(registry, "alice")
    assert gateway.get("/farm/status", headers=bearer(admin)).status_code == 200
    refused = gateway.get("/farm/status", headers=bearer(user))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_admin"
    assert "--admin" in refused.json()["error"]["message"]
    assert gateway.get("/farm/status/some-job", headers=bearer(user)).status_code == 403
    assert gateway.get("/v1/models", headers=bearer(user)).status_code == 200  # still a key
    unknown = gateway.get("/farm/status/no-such-job", headers=bearer(admin))
    assert unknown.status_code == 404 and "no job with id 'no-such-job'" in unknown.text
    deadline = time.monotonic() + 5  # without a key, the key count may be a second old
    while (r := gateway.get("/farm/status")).status_code != 401:
        assert r.status_code == 403 and time.monotonic() < deadline


def test_farm_status_reads_a_remote_farm_through_its_gateway_with_an_admin_key(
    tmp_path: Path, redis_url: str
):
    """An operator's machine knows only the gateway's URL and an admin key."""
    env = farm_env(tmp_path, redis_url)
    admin = run_cli(env, "keys", "create", "--session", "ops", "--admin").stdout.strip()
    user = run_cli(env, "keys", "create", "--session", "alice").stdout.strip()
    listed = json.loads(run_cli(env, "keys", "list", "--json").stdout)
    assert [k["admin"] for k in listed] == ["yes", ""]
    with serving(env) as base:
        operator = {  # no registry, no broker: only the gateway
            **{k: v for k, v in os.environ.items() if not k.startswith("FARM_")},
            "FARM_HOME": str(tmp_path / "operator"),
            "FARM_GATEWAY_URL": base,
        }
        shown = run_cli({**operator, "FARM_API_KEY": admin}, "status", "--json")
        assert shown.returncode == 0, shown.stderr
        assert {"models", "workers"} <= json.loads(shown.stdout).keys()
        table = run_cli(operator, "status", "--key", admin)
        assert table.returncode == 0 and "models" in table.stdout.lower(), table.stderr
        refused = run_cli({**operator, "FARM_API_KEY": user}, "status")
        assert (
            refused.returncode == 1 and "has none" in refused.stderr and "--admin" in refused.stderr
        )
        gone = run_cli({**operator, "FARM_API_KEY": admin}, "status", "no-such-job")
        assert gone.returncode == 1 and "no job with id 'no-such-job'" in gone.stderr
        away = run_cli(operator, "status", "--gateway", f"http://127.0.0.1:{free_port()}")
        assert away.returncode == 1 and "cannot reach the gateway" in away.stderr


def test_the_gateways_connections_send_at_once_without_nagles_delay():
    """farm serve binds its own socket (farm/cli/gateway.py `listen`). Made without naming
    TCP, the connections it accepted kept Nagle's algorithm on (asyncio sets TCP_NODELAY
    only on sockets that say TCP), and each response's body waited behind its headers for
    the client's delayed ACK: /health took 44 ms, a one-token chat 40 ms more than farm.infer."""
    import asyncio
    import socket

    from farm.cli.gateway import listen

    sock = listen("127.0.0.1", 0)

    async def accepted_nodelay() -> int:
        loop = asyncio.get_running_loop()
        made: asyncio.Future[asyncio.BaseTransport] = loop.create_future()

        class Accept(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.set_result(transport)

        server = await loop.create_server(Accept, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        transport = await asyncio.wait_for(made, 5)
        conn = transport.get_extra_info("socket")
        nodelay = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        transport.close()
        server.close()
        return int(nodelay)

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_wrong_method_is_a_405_naming_every_method_the_path_takes():
    gateway = TestClient(create_app())
    wrong = gateway.get("/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["message"] == ("/v1/chat/completions takes POST requests, not GET")
    both = gateway.put("/v1/files")  # two routes: Starlette's own Allow named the first's
    assert both.status_code == 405 and both.headers["allow"] == "GET, POST"
    assert both.json()["error"]["message"] == "/v1/files takes GET or POST requests, not PUT"
    nowhere = gateway.get("/v1/nope")
    assert nowhere.status_code == 404 and "allow" not in nowhere.headers
    assert nowhere.json()["error"]["message"].startswith("no endpoint GET /v1/nope: farm serves")
