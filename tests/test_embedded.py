"""`farm up` with nothing configured: its own broker, a SQLite registry, a Gemma worker;
other `farm` commands find it with no flags; Ctrl-C stops it all."""

import json
import os
import signal
import time

import openai
import pytest

from tests.conftest import free_port, run_cli, start_farm

pytestmark = pytest.mark.e2e


def bare_env(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update({"FARM_HOME": str(home), "PYTHONUNBUFFERED": "1"})
    return env


farm = run_cli


def steady(fleet):
    """`farm status --json` without what moves between two calls (ages, rates)."""
    for w in fleet["workers"]:
        for key in ("uptime_s", "heartbeat_age_s", "tokens_per_s"):
            w.pop(key)
    return fleet


def test_farm_up_ask_once_answers_a_prompt_and_stops(tmp_path):
    # --port 0: no gateway (a test must not need port 8000 free)
    r = farm(bare_env(tmp_path), "up", "--port", "0", "--ask", "Why is the sky blue?", "--once",
             timeout=180)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()  # the streamed answer
    assert "farm is up" in r.stderr and "farm stopped" in r.stderr
    assert not (tmp_path / "farm.json").exists()


def test_other_shells_find_the_running_farm_and_ctrl_c_stops_it(tmp_path):
    env = bare_env(tmp_path)
    r = farm(env, "submit", "hi")
    assert r.returncode == 1 and "no farm is running here: start one with `farm up`" in r.stderr
    for command in (["status"], ["usage"], ["models", "list"], ["result", "some-id"]):
        r = farm(env, *command)
        assert r.returncode == 1 and "start one with `farm up`" in r.stderr, command
    assert not (tmp_path / "registry.db").exists()  # asking created nothing

    port = free_port()
    up = start_farm(env, "up", "--port", str(port))
    try:
        state = json.loads((tmp_path / "farm.json").read_text())
        assert state["broker_url"].startswith("redis://127.0.0.1:")

        r = farm(env, "submit", "Hello", "--max-tokens", "4", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["usage"]["completion_tokens"] > 0
        # Out of the box the default model answers embeddings too (mean pooling), from the
        # CLI and through the gateway with the openai SDK.
        r = farm(env, "embed", "Hello", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["dimensions"] == 640
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        got = sdk.embeddings.create(model="gemma3-270m", input=["Hello", "World"])
        assert len(got.data) == 2 and len(got.data[0].embedding) == 640

        # `farm status` asks the running farm (farm.local): no SQLAlchemy, redis or Celery
        # to import; a shell that names the servers another way reads them itself. The
        # same document either way.
        direct_env = {
            **env,
            "FARM_BROKER_URL": state["broker_url"].replace("127.0.0.1", "localhost"),
        }
        job_id = json.loads(r.stdout)["job_id"]
        for command in (["status", "--json"], ["status", job_id, "--json"]):
            fast = farm({**env, "PYTHONPROFILEIMPORTTIME": "1"}, *command)
            assert fast.returncode == 0, fast.stderr
            assert "import time:" in fast.stderr
            loaded = {line.split("|")[-1].strip() for line in fast.stderr.splitlines()}
            assert not {m for m in loaded if m.split(".")[0] in ("sqlalchemy", "redis", "celery")}
            direct = farm({**direct_env, "PYTHONPROFILEIMPORTTIME": "1"}, *command)
            assert direct.returncode == 0, direct.stderr
            assert "sqlalchemy" in direct.stderr
            answers = [json.loads(r.stdout) for r in (fast, direct)]
            if command[1] == "--json":
                answers = [steady(a) for a in answers]
                assert [m["name"] for m in answers[0]["models"]] == ["gemma3-270m"]
                assert [(w["id"].split("@")[0], w["state"]) for w in answers[0]["workers"]] == [
                    ("gemma3-270m", "ready")
                ]
            else:
                assert answers[0]["status"] == "succeeded"
            assert answers[0] == answers[1]
        shown = farm(env, "status", job_id)
        assert shown.returncode == 0 and "succeeded" in shown.stdout, shown.stderr
        unknown = farm(env, "status", "no-such-job")
        assert unknown.returncode == 1 and "no job with id 'no-such-job'" in unknown.stderr

        second = farm(env, "up", "--port", str(free_port()))
        assert second.returncode == 1 and "a farm is already running here" in second.stderr
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    assert up.returncode == 0
    assert not (tmp_path / "farm.json").exists()
    deadline = time.monotonic() + 5
    while farm(env, "submit", "hi").returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "no farm is running here" in farm(env, "submit", "hi").stderr
