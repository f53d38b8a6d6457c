"""The engine's boundary is narrow: `workers/engine/` imports nothing from `farm`, at the
top of a file or inside a function. What it needs comes in through a Sequence or the
Engine's constructor, so an in-memory twin can stand in for it and it can be reused
under another front end."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "workers" / "engine"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (function bodies included), as an
    absolute dotted name."""
    package = "workers.engine"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the engine package up `level - 1` packages
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                found.add(".".join([*base, *([node.module] if node.module else [])]))
            else:
                found.add(node.module or "")
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", ""))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.add(str(node.args[0].value))
    return found


def test_no_module_of_the_engine_imports_farm_not_even_inside_a_function():
    files = sorted(ENGINE.rglob("*.py"))
    assert len(files) >= 4  # the package is where this test thinks it is
    offenders = sorted(
        f"{path.relative_to(ENGINE.parent.parent)} imports {module}"
        for path in files
        for module in imported_modules(path)
        if module.split(".")[0] == "farm"
    )
    assert offenders == []


def test_importing_every_engine_module_loads_no_farm_module():
    code = (
        "import pkgutil, sys, importlib, workers.engine\n"
        "for m in pkgutil.walk_packages(workers.engine.__path__, 'workers.engine.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'farm')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == ""
