"""What a newcomer met in the CLI's first hour (issue 16): the import order of its modules,
argument errors before any of the farm loads, whole values in piped tables, `farm status`
without a running farm, and errors that name the flags the user typed."""

from __future__ import annotations

import ast
from pathlib import Path

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
