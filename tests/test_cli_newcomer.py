"""What a newcomer met in the CLI's first hour (issue 16): the import order of its modules,
argument errors before any of the farm loads, whole values in piped tables, `farm status`
without a running farm, and errors that name the flags the user typed."""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import finished_usage, free_port, run_cli

CLI = Path(__file__).resolve().parent.parent / "farm" / "cli"


def _cli_imports(path: Path) -> set[str]:
    """The farm.cli modules a file imports, at its top or inside its functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "farm.cli":
                found.update(f"farm.cli.{a.name}" for a in node.names)
            elif node.module.startswith("farm.cli."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("farm.cli."))
    return found


def test_the_cli_modules_import_each_other_without_a_cycle():
    graph = {f"farm.cli.{p.stem}": _cli_imports(p) for p in CLI.glob("*.py")}
    graph.pop("farm.cli.__init__")  # the package gathers every command module
    graph.pop("farm.cli.__main__")
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for target in graph.get(module, ()):
            visit(target, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


# -- argument errors come before the farm loads ----------------------------------------------
HEAVY = ("celery", "kombu", "sqlalchemy", "redis", "llama_cpp")


def farm_in_process(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, list[str]]:
    """`farm ARGS` run in a fresh interpreter: its exit status, its stderr, and which of the
    heavy libraries it had loaded by the time it exited."""
    code = (
        "import sys, json\n"
        "from farm.cli import main\n"
        f"sys.argv = ['farm', *{list(args)!r}]\n"
        "try:\n    main()\n    code = 0\nexcept SystemExit as e:\n    code = e.code\n"
        f"loaded = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "print(json.dumps([code, loaded]))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    code_, loaded = json.loads(r.stdout.strip().splitlines()[-1])
    return code_, r.stderr, loaded


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("submit", "x", "--priority", "urgent"), "--priority"),
        (("submit", "x", "--bogus"), "--bogus"),
        (("submit", "x", "--max-tokens", "many"), "--max-tokens"),
        (("jobs", "--status", "done"), "--status"),
        (("batch", "submit", "lines.jsonl", "--priority", "urgent"), "--priority"),
    ],
)
def test_a_typod_option_is_refused_naming_it_before_the_farm_loads(args, option):
    code, stderr, loaded = farm_in_process(*args)
    assert code == 2, stderr
    assert option in stderr and "Traceback" not in stderr
    assert loaded == []


def test_the_priority_names_the_cli_accepts_are_the_queues():
    from farm.cli.base import JOB_STATUSES, priority_level
    from farm.queue import PRIORITIES
    from farm.registry.tables import JOB_STATUSES as RECORDED

    assert [priority_level(p) for p in PRIORITIES] == list(PRIORITIES)
    assert JOB_STATUSES == RECORDED


def test_an_out_of_range_value_is_refused_naming_its_flag_before_celery_loads(tmp_path):
    code, stderr, loaded = farm_in_process(
        "submit", "hi", "--top-p", "3", "--max-tokens", "-1", env={"FARM_HOME": str(tmp_path)}
    )
    assert code == 1
    assert "invalid --top-p: " in stderr and "invalid --max-tokens: " in stderr
    assert "sampling" not in stderr and "stopping" not in stderr
    assert loaded == []


@pytest.mark.parametrize(
    ("message", "said"),
    [
        ("invalid 'stopping.max_tokens': 5000 is more", "invalid --max-tokens: 5000 is more"),
        ("invalid 'sampling.repeat_penalty': no", "invalid --repeat-penalty: no"),
        ("invalid 'stopping.stop.0': empty", "invalid --stop: empty"),
        ("invalid 'model': model names are", "invalid --model: model names are"),
        ("unknown model 'model'; known: a", "unknown model 'model'; known: a"),
        ("give 'grammar' or a JSON 'response_format', not both", "give --grammar or --json-schema, not both"),
    ],
)  # fmt: skip
def test_submit_errors_name_the_flags_the_user_typed(message, said):
    from farm.cli.jobs import as_flags

    assert as_flags(message) == said


# -- tables: whole values when piped, sensible folding on a terminal --------------------------
def usage_like_table(*rows: tuple[str, ...]) -> Any:
    from farm.cli.tables import FoldTable

    table = FoldTable(
        "session", "model", "jobs", "succeeded", "failed", "cancelled", "expired",
        "in flight", "prompt tok", "completion tok", "note", whole=("session", "model"),
    )  # fmt: skip
    for row in rows:
        table.add_row(*row)
    return table


ROW = ("bar-alice", "gemma3-270m", "12", "10", "1", "1", "0", "0", "123456", "5678")
NOTE = "a long free text note that goes on and on and does not fit beside the numbers"


def printed(table: Any, *, terminal: bool, width: int = 80) -> list[str]:
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(
        file=buffer, width=width, soft_wrap=True, force_terminal=terminal, color_system=None
    )
    console.print(table)
    return buffer.getvalue().splitlines()


def test_a_piped_table_prints_each_row_whole_on_one_line_under_its_header():
    lines = printed(usage_like_table((*ROW, NOTE), (*ROW[:9], "1", "-")), terminal=False)
    assert lines[0].split() == [
        "session", "model", "jobs", "succeeded", "failed", "cancelled", "expired", "in",
        "flight", "prompt", "tok", "completion", "tok", "note",
    ]  # fmt: skip
    rows = lines[2:]
    assert len(rows) == 2 and len(rows[0]) > 80
    assert rows[0].split()[:10] == list(ROW) and rows[0].endswith(NOTE)
    assert [line for line in lines if line != line.rstrip()] == []  # no padding to cut


def test_on_an_80_column_terminal_names_stay_whole_and_free_text_folds():
    lines = printed(usage_like_table((*ROW, NOTE)), terminal=True)
    assert all(len(line) <= 80 for line in lines)
    assert any(line.split()[:2] == ["bar-alice", "gemma3-270m"] for line in lines)
    assert "123456" in "\n".join(lines)  # numbers are not split either
    assert NOTE not in "\n".join(lines)  # the note folds (at its spaces)
    assert " ".join(w for line in lines for w in line.split() if w in NOTE.split()).endswith(
        "beside the numbers"
    )


def test_every_option_of_submit_says_what_it_does_in_its_help(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "farm.cli", "submit", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "FARM_HOME": str(tmp_path), "COLUMNS": "200"},
        check=True,
    ).stdout
    options = [line.split() for line in help_text.splitlines() if line.lstrip().startswith("-")]
    assert len(options) > 25
    bare = [words[0] for words in options if len(words) < 3 and words[0] != "--chat"]
    assert bare == []  # flag, metavar, and at least a word of help (--chat: a flag alone)
    assert any(words[:2] == ["--top-k", "N"] and "likeliest" in words for words in options)


@pytest.mark.parametrize("args", [("config",), ("config", "--json")])
def test_a_reader_that_leaves_the_pipe_early_ends_the_command_quietly_with_status_0(tmp_path, args):
    """`farm config | head -1`: the reader has what it wanted (rich's own answer is status 1,
    which `set -o pipefail` scripts took for a failure)."""
    farm = subprocess.Popen(
        [sys.executable, "-m", "farm.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "FARM_HOME": str(tmp_path)},
    )
    assert farm.stdout is not None and farm.stderr is not None
    farm.stdout.close()  # before the command has written anything: its first write fails
    with farm.stderr:
        stderr = farm.stderr.read().decode()
    assert farm.wait(timeout=60) == 0, stderr
    assert stderr == ""


def test_a_short_print_to_a_reader_that_left_ends_quietly_too(tmp_path):
    """A `--json` line that sits in Python's buffer fails at its flush, not at its print."""
    code = (
        "import typer\n"
        "from farm.cli.base import friendly\n"
        "app = typer.Typer()\n"
        "app.command()(friendly(lambda: print('{\"a\": 1}')))\n"
        "app()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    farm = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**env, "FARM_HOME": str(tmp_path)},
    )
    assert farm.stdout is not None and farm.stderr is not None
    farm.stdout.close()
    with farm.stderr:
        stderr = farm.stderr.read().decode()
    assert farm.wait(timeout=60) == 0, stderr
    assert stderr == ""


def test_a_column_of_empty_cells_keeps_its_header_beside_a_long_id():
    from farm.cli.tables import FoldTable

    table = FoldTable("worker", "state", "loaded", whole=("worker",))
    table.add_row("w-" + "a" * 45 + "@host", "idle", "")  # all the room, but for a floor
    lines = printed(table, terminal=True, width=60)
    assert all(len(line) <= 60 for line in lines)
    assert all(column.width and column.width >= 1 for column in table.columns)
    assert "l" in "".join(line.split()[-1][:1] for line in lines[:3] if line.split())


def test_job_ids_stay_whole_on_an_80_column_terminal_and_names_too_when_wider():
    from farm.cli.tables import FoldTable

    job = "9f8afd52-fe63-4e58-8612-d2e112181ede"
    table = FoldTable(
        "job", "status", "model", "session", "priority", "tokens", "took", "submitted",
        whole=("job", "model", "session"),
    )  # fmt: skip
    table.add_row(
        job, "succeeded", "gemma3-270m", "alice-long-session", "normal", "12+64", "1.2s",
        "2026-12-05 02:10:11",
    )  # fmt: skip

    def first_row(width: int) -> list[str]:  # the words of the row's first line
        lines = printed(table, terminal=True, width=width)
        assert all(len(line) <= width for line in lines)
        return next(lines[i + 1] for i, line in enumerate(lines) if set(line) == {"─"}).split()

    assert first_row(80)[0] == job  # the others fold beside it
    names = [job, "gemma3-270m", "alice-long-session"]
    assert [w for w in first_row(100) if w in names] == names


def test_a_table_that_fits_the_terminal_is_printed_as_it_is():
    from farm.cli.tables import FoldTable

    table = FoldTable("job", "model", whole=("job",))
    table.add_row("4f1c-9e", "gemma3-270m")
    assert printed(table, terminal=True)[2].split() == ["4f1c-9e", "gemma3-270m"]


# -- farm status JOB ------------------------------------------------------------------------------
def test_status_of_a_job_answers_from_the_registry_when_no_farm_runs(tmp_path):
    """`farm up` stopped: no broker to ask, but the registry still knows the job."""
    from farm.registry import queries, transaction, upgrade

    upgrade(f"sqlite:///{tmp_path / 'registry.db'}")  # where `farm up` keeps it
    with transaction(f"sqlite:///{tmp_path / 'registry.db'}") as s:
        queries.record_queued(
            s, job_id="job-left-queued", session="alice", model="gemma3-270m",
            priority="high", submitted_at=datetime.now(UTC),
        )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FARM_")}
    env["FARM_HOME"] = str(tmp_path)
    r = run_cli(env, "status", "job-left-queued", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["job"], info["status"], info["session"]) == ("job-left-queued", "queued", "alice")
    assert "registry's view" in info["note"]
    shown = run_cli(env, "status", "job-left-queued", timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "queued" in shown.stdout and "`farm up` starts one" in shown.stdout


def test_submit_with_the_broker_down_prints_one_line_naming_it_whoever_serves_the_model(
    tmp_path,
):
    """A farm whose Redis is down: its workers' leases lapse, but the error is the broker,
    not "no worker is serving"; a session with a quota hears of Redis too, in one line."""
    from farm.registry import queries, transaction, upgrade
    from farm.registry.queries.workers import LeaseSpec

    db = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(db)
    with transaction(db) as s:
        for name in ("served", "idle"):
            queries.add_model(s, name=name, path="/models/tiny.gguf", n_ctx=512)
        queries.register_worker(s, worker_id="w", host="h", pid=1, device="cpu", versions={})
        queries.set_leases(s, worker_id="w", device="cpu", leases=[LeaseSpec("served")], ttl=600)
        queries.set_quota(s, "capped", tokens_per_day=1000, max_queued=None)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FARM_")}
    down = f"redis://:secret@127.0.0.1:{free_port()}/0"
    env.update(FARM_HOME=str(tmp_path), FARM_DATABASE_URL=db, FARM_BROKER_URL=down)
    shown = down.replace("secret", "***")
    for model, session, says in (
        ("idle", "default", f"error: cannot reach the broker at {shown}: "),
        ("served", "default", f"error: cannot reach the broker at {shown}: "),
        ("served", "capped", f"error: cannot reach the farm's Redis at {shown} to reserve the "),
    ):
        r = run_cli(env, "submit", "-m", model, "--session", session, "hi", timeout=60)
        assert r.returncode == 1, r.stderr
        [line] = r.stderr.splitlines()  # one line: no quota or traceback noise above it
        assert line.startswith(says), line
        assert "is `farm up` running" in line and "secret" not in line


def test_status_right_after_cancel_says_cancelled(farm_client):
    import farm
    from farm.status import job_status
    from tests.conftest import MODEL

    job = farm.submit("Tell me a long story.", model=MODEL, max_tokens=300)
    next(job.stream(timeout=120))  # running: it has produced a token
    assert job.cancel()
    assert job_status(job.id)["status"] == "cancelled"
    [row] = finished_usage(farm_client.database_url, job.id, timeout=30)
    assert row.status == "cancelled"  # what the registry says once the worker stopped it


def test_piped_jobs_usage_and_batch_tables_have_headers_and_whole_rows(farm_client):
    session = "bar-alice-with-a-long-session-name"
    r = farm_client.farm("submit", "hi", "--max-tokens", "2", "--session", session, "--no-wait")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    farm_client.farm("result", job_id, "--timeout", "60")
    env = {**farm_client.env, "COLUMNS": "80"}
    for args, header in [
        (("jobs", "--session", session), ["job", "status", "model", "session", "priority"]),
        (("usage", "--session", session), ["session", "model", "jobs", "succeeded"]),
        (("usage", "--jobs", "--session", session), ["job", "session", "model", "priority"]),
    ]:
        out = run_cli(env, *args, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].split()[: len(header)] == header, out.stdout
        [row] = [line for line in lines if session in line.split()]  # grep finds it whole
        assert "gemma3-270m" in row.split()
        if args[0] != "usage" or "--jobs" in args:
            assert job_id in row.split()


# -- the README --------------------------------------------------------------------------------
def readme_block(section: str, language: str) -> str:
    """The first fenced `language` block under the README's `## section` heading."""
    text = (CLI.parent.parent / "README.md").read_text()
    body = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    return body.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_readmes_sample_batch_file_is_one_the_batches_endpoint_takes():
    """/v1/batches, like OpenAI's, takes a file whose lines all go to its endpoint."""
    from farm.batches.lines import check

    sample = readme_block("Batch jobs", "json").encode()
    first_url = json.loads(sample.splitlines()[0])["url"]
    lines = check(sample, {"gemma3-270m": 4096}, endpoint=first_url)
    assert len(lines) == len(sample.splitlines()) == 2
