"""The operator's CLI: versions, a fast --help, jobs, logs, config, live job status, usage
that adds up, and Celery's own tools by the package's name."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest

import farm
from tests.conftest import MODEL, run_cli

pytestmark = pytest.mark.e2e


def test_version_names_farm_celery_llama_cpp_and_gpu_offload(live_farm):
    r = live_farm.farm("--version")
    assert r.returncode == 0
    assert r.stdout.startswith("farm 0.")
    assert "celery 5." in r.stdout and "llama-cpp-python 0." in r.stdout
    assert "GPU offload: " in r.stdout


def test_help_and_argument_errors_import_no_heavy_library():
    code = (
        "import sys\n"
        "sys.argv = ['farm', '--help']\n"
        "import farm.cli\n"
        "try:\n    farm.cli.main()\nexcept SystemExit:\n    pass\n"
        "heavy = {'celery', 'kombu', 'sqlalchemy', 'redis', 'llama_cpp', 'pydantic'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_jobs_lists_recent_jobs_with_filters_and_json(farm_client):
    done = [farm.infer(f"hi {i}", model=MODEL, max_tokens=2, session="jobs-cli") for i in range(2)]
    r = farm_client.farm("jobs", "--session", "jobs-cli", "--json")
    assert r.returncode == 0, r.stderr
    listed = [json.loads(line) for line in r.stdout.splitlines()]
    assert {j["job"] for j in listed} == {c.job_id for c in done}
    assert all(j["status"] == "succeeded" and j["completion_tokens"] == 2 for j in listed)
    text = farm_client.farm("jobs", "--session", "jobs-cli", "--status", "succeeded").stdout
    assert all(c.job_id in text for c in done)  # whole ids, to copy
    bad = farm_client.farm("jobs", "--status", "done")
    assert bad.returncode == 2
    assert "'done' is not a job status; use one of: queued, running" in bad.stderr
    typo = farm_client.farm("jobs", "--model", "gemma-270m")  # no jobs, and no such model
    assert typo.returncode == 0 and typo.stdout.strip() == "no jobs yet that match"
    assert "no model 'gemma-270m' is registered; known: " in typo.stderr
    assert MODEL in typo.stderr.split("known: ")[1]  # among the suite's other models
    none = farm_client.farm("jobs", "--model", MODEL, "--session", "nobody-here")
    assert none.stdout.strip() == "no jobs yet that match" and none.stderr == ""


def test_usage_columns_add_up(farm_client):
    farm.infer("hi", model=MODEL, max_tokens=2, session="adds-up")
    blocked = farm.submit("never", model=MODEL, max_tokens=2, session="adds-up", priority="low")
    blocked.cancel()
    r = farm_client.farm("usage", "--session", "adds-up", "--json")
    [row] = json.loads(r.stdout)
    parts = ("succeeded", "failed", "cancelled", "expired", "pending")
    assert row["jobs"] == sum(row[p] for p in parts) == 2


def test_status_of_a_running_job_shows_its_tokens_so_far_and_times(farm_client):
    # Long enough to outlast the CLI calls below on a loaded 2-core VM; cancelled after them.
    job = farm.submit("Tell me a long story.", model=MODEL, max_tokens=2000)
    stream = job.stream(timeout=60)
    for _ in range(5):
        next(stream)
    deadline = time.monotonic() + 10
    while True:
        info = json.loads(farm_client.farm("status", job.id, "--json").stdout)
        if info["status"] == "running" and info["completion_tokens"] > 0:
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.3)
    assert "finished" not in info
    started = datetime.fromisoformat(info["started"])  # ISO 8601, in UTC
    assert started.utcoffset() == timedelta(0)
    shown = farm_client.farm("status", job.id).stdout
    assert re.search(r"tokens  (\d+ prompt, )?[1-9]\d* completion so far", shown), shown
    zone = datetime.now().astimezone().strftime("%Z")
    assert re.search(rf"started  \d\d:\d\d:\d\d {zone}", shown), shown
    # `farm jobs` too: tokens so far, not the registry's 0+0 of a job that has not ended.
    listed = farm_client.farm("jobs", "--status", "running", "--json").stdout.splitlines()
    [mine] = [j for j in map(json.loads, listed) if j["job"] == job.id]
    assert mine["prompt_tokens"] is None and mine["completion_tokens"] > 0
    assert datetime.fromisoformat(mine["submitted"]).utcoffset() == timedelta(0)
    line = farm_client.farm("jobs", "--status", "running").stdout
    assert re.search(rf"{job.id}  running .* [1-9]\d* so far", line), line
    job.cancel()
    deadline = time.monotonic() + 10
    while json.loads(farm_client.farm("status", job.id, "--json").stdout)["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    done = farm_client.farm("status", job.id).stdout
    assert re.search(r"status  cancelled", done) and re.search(r"duration  \d+\.\ds", done), done
    assert re.search(r"tokens  [1-9]\d* prompt, [1-9]\d* completion\n", done), done


def test_a_reader_that_leaves_is_not_called_an_unreachable_redis():
    from farm.cli.base import _unreachable

    assert not _unreachable(BrokenPipeError(32, "Broken pipe"))
    assert _unreachable(ConnectionRefusedError(111, "Connection refused"))


def test_config_shows_each_setting_and_its_source_with_passwords_hidden(farm_client):
    env = {**farm_client.env, "FARM_RESULT_URL": "redis://:Hidden99@127.0.0.1:6379/15"}
    r = run_cli(env, "config", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["broker_url"]["source"] == "environment"
    assert rows["result_url"]["value"] == "redis://:***@127.0.0.1:6379/15"
    assert rows["job_time_limit"]["source"] == "default" and rows["job_time_limit"]["description"]
    assert "Hidden99" not in r.stdout


def test_logs_prints_the_end_of_each_workers_log(farm_client):
    r = farm_client.farm("logs", "-n", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(" INFO " in line or " WARNING " in line for line in lines)
    one = farm_client.farm("logs", "gemma3-270m-0", "-n", "1")
    assert one.returncode == 0 and one.stdout.strip() in r.stdout
    bad = farm_client.farm("logs", "nope")
    assert (
        bad.returncode == 1 and "no log for 'nope'" in bad.stderr and "gemma3-270m-0" in bad.stderr
    )


def test_celery_finds_the_farms_app_by_the_package_name(farm_client):
    r = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "farm", "inspect", "ping", "--json"],
        env=farm_client.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert any(v == {"ok": "pong"} for v in json.loads(r.stdout).values())


def test_usage_per_job_as_csv_for_billing(farm_client):
    import csv
    import io

    c = farm.infer("bill me", model=MODEL, max_tokens=2, session="billing")
    r = farm_client.farm(
        "usage", "--jobs", "--session", "billing", "--since", "2020-01-01", "--csv"
    )
    assert r.returncode == 0, r.stderr
    [row] = list(csv.DictReader(io.StringIO(r.stdout)))
    assert (row["job_id"], row["status"], row["completion_tokens"]) == (c.job_id, "succeeded", "2")
    assert float(row["ttft_ms"]) > 0 and row["queue_wait_ms"]
    bad = farm_client.farm("usage", "--jobs", "--since", "yesterday")
    assert bad.returncode == 1 and "invalid --since 'yesterday'" in bad.stderr
