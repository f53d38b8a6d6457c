"""The house rules that keep farm readable, checked on the source itself: imports run
downward with no cycle (imports inside functions count too), SQL stays in the registry and
the batch store, and every module says in its first line what it owns."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("farm", "workers")
# Where SQLAlchemy may be imported: the registry, and the batch store and the feeder's
# queries beside it. Everything else calls their named queries.
SQL_HOMES = ("farm/registry/", "farm/batches/store.py", "farm/batches/feed_queries.py")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(path: Path, name: str) -> Iterator[str]:
    """Every module this one imports at run time, anywhere in it (TYPE_CHECKING excluded)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def graph() -> dict[str, set[str]]:
    known = modules()

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = {resolve(t) for t in imports(path, name)}
        edges[name] = {t for t in targets if t and t != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_of_farm_or_workers_is_part_of_an_import_cycle():
    # A package's __init__ importing its own submodules is how packages work, not a cycle
    # between concepts: count only edges between modules that are not one's own package.
    edges = graph()
    for name, targets in edges.items():
        edges[name] = {t for t in targets if not name.startswith(t + ".")}
    assert cycles(edges) == []


def test_farm_never_imports_workers():
    offenders = {
        name: sorted(t for t in targets if t.split(".")[0] == "workers")
        for name, targets in graph().items()
        if name.split(".")[0] == "farm"
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_sqlalchemy_is_imported_only_by_the_registry_and_the_batch_store():
    outside = []
    for name, path in modules().items():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(SQL_HOMES):
            continue
        if any(t.split(".")[0] == "sqlalchemy" for t in imports(path, name)):
            outside.append(rel)
    assert outside == []


def test_every_module_says_in_its_first_line_what_it_owns():
    silent = [
        path.relative_to(ROOT).as_posix()
        for path in modules().values()
        if path.read_text().strip() and not (ast.get_docstring(ast.parse(path.read_text())) or "")
    ]
    assert silent == []


def test_the_readme_layout_names_only_paths_that_exist():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set()
    for line in layout.splitlines():
        for word in line.replace(",", " ").split():
            if word.startswith(("farm/", "workers/", "compose/", "bench/", "migrations/")):
                named.add(word.rstrip(":"))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert named and missing == []
