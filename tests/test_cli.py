"""The `farm` command line against a live farm, as a user runs it."""

import json
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import select

from farm.registry import transaction
from farm.registry.tables import UsageRecord
from tests.conftest import MODEL

pytestmark = pytest.mark.e2e


def test_submit_streams_the_answer_and_reports_tokens(live_farm):
    r = live_farm.farm(
        "submit",
        "Why is the sky blue?",
        "--model",
        MODEL,
        "--priority",
        "high",
        "--max-tokens",
        "12",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "tokens" in r.stderr and MODEL in r.stderr


def test_submit_json_prints_the_completion(live_farm):
    r = live_farm.farm(
        "submit",
        "Hello",
        "--max-tokens",
        "4",
        "--json",
        "--session",
        "cli",
        "--temperature",
        "0",
        "--seed",
        "3",
        "--stop",
        "\n\n",
    )
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)
    assert c["model"] == MODEL and c["usage"]["completion_tokens"] <= 4


def test_chat_submit(live_farm):
    r = live_farm.farm("submit", "Say hi", "--chat", "--max-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["usage"]["prompt_tokens"] > 4


def test_no_wait_prints_a_job_id_to_follow_with_result_and_status(live_farm):
    r = live_farm.farm("submit", "Hello", "--max-tokens", "4", "--no-wait")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    res = live_farm.farm("result", job_id, "--json", "--timeout", "60")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["job_id"] == job_id
    st = live_farm.farm("status", job_id, "--json")
    assert json.loads(st.stdout)["status"] == "succeeded"


def test_unknown_model_is_one_clear_line_and_exit_1(live_farm):
    r = live_farm.farm("submit", "hi", "--model", "deepsek")
    assert r.returncode == 1
    assert "unknown model 'deepsek'; known: gemma3-270m" in r.stderr
    assert "Traceback" not in r.stderr


def test_out_of_range_flag_is_named_as_the_user_typed_it(live_farm):
    r = live_farm.farm("submit", "hi", "--top-p", "3")
    assert r.returncode == 1 and "invalid --top-p: " in r.stderr


def test_max_tokens_beyond_the_models_context_names_the_flag(live_farm):
    r = live_farm.farm("submit", "hi", "--max-tokens", "5000")
    assert r.returncode == 1
    assert f"invalid --max-tokens: 5000 is more than model '{MODEL}' can hold" in r.stderr


def test_cancel_of_an_unknown_job_says_so(live_farm):
    r = live_farm.farm("cancel", "no-such-job")
    assert r.returncode == 1 and "no job with id 'no-such-job'" in r.stderr


def test_models_list_usage_and_status_show_the_farm(live_farm):
    models = json.loads(live_farm.farm("models", "list", "--json").stdout)
    assert {m["name"]: m["workers"] for m in models}[MODEL] == 1
    alone = live_farm.farm("models")  # the list, as `farm models list` prints it
    assert alone.returncode == 0 and alone.stdout == live_farm.farm("models", "list").stdout
    assert MODEL in alone.stdout
    live_farm.farm("submit", "hi", "--max-tokens", "2", "--session", "usage-cli")
    usage = json.loads(live_farm.farm("usage", "--session", "usage-cli", "--json").stdout)
    assert usage[0]["jobs"] == 1 and usage[0]["model"] == MODEL
    status = json.loads(live_farm.farm("status", "--json").stdout)
    assert {m["name"]: m for m in status["models"]}[MODEL]["workers"]
    assert any(w["state"] in ("ready", "busy") for w in status["workers"])
    table = live_farm.farm("status")
    assert table.returncode == 0 and MODEL in table.stdout


def test_ctrl_c_while_streaming_cancels_the_job_and_exits_cleanly(live_farm):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "farm.cli",
            "submit",
            "Tell me a long story.",
            "--max-tokens",
            "2000",
            "--session",
            "ctrl-c",
        ],
        env=live_farm.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.read(1)  # tokens are arriving
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert b"cancelled" in stderr and b"Traceback" not in stderr
    deadline = time.monotonic() + 15
    while True:
        with transaction(live_farm.database_url) as s:
            row = s.scalar(select(UsageRecord).where(UsageRecord.session == "ctrl-c"))
        if row is not None and row.status == "cancelled":
            break
        assert time.monotonic() < deadline, f"job not cancelled: {row and row.status}"
        time.sleep(0.1)
    assert 0 < row.completion_tokens < 2000


def test_ctrl_c_on_farm_result_stops_waiting_but_leaves_the_job_running(live_farm):
    r = live_farm.farm("submit", "Tell me a long story.", "--max-tokens", "300", "--no-wait")
    job_id = r.stdout.strip()
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", "result", job_id],
        env=live_farm.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.read(1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and b"goes on" in stderr
    status = json.loads(live_farm.farm("status", job_id, "--json").stdout)["status"]
    assert status in ("running", "succeeded")
    live_farm.farm("cancel", job_id)


def test_models_add_refuses_a_context_beyond_what_the_model_was_trained_for(live_farm):
    from tests.conftest import gemma_path

    r = live_farm.farm("models", "add", "too-long", gemma_path(), "--n-ctx", "999999")
    assert r.returncode == 1 and "trained for 32768 tokens; give at most 32768" in r.stderr


def test_models_add_refuses_bad_names_and_non_gguf_files(live_farm, tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello")
    r = live_farm.farm("models", "add", "Bad:Name", str(not_gguf))
    assert r.returncode == 1 and "invalid model name" in r.stderr
    r = live_farm.farm("models", "add", "okname", str(not_gguf))
    assert r.returncode == 1 and "not a GGUF file" in r.stderr
    r = live_farm.farm("models", "add", "okname", str(tmp_path / "missing.gguf"))
    assert r.returncode == 1 and "no file at" in r.stderr
