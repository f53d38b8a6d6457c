"""What a newcomer met in the CLI's first hour (issue 16): the import order of its modules,
argument errors before any of the farm loads, whole values in piped tables, `farm status`
without a running farm, and errors that name the flags the user typed."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
        "submit", "hi", "--top-p", "3", "--max-tokens", "0", env={"FARM_HOME": str(tmp_path)}
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
