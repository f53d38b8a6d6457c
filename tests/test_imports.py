"""Clients need no llama.cpp: importing farm loads neither llama_cpp nor workers."""

import subprocess
import sys
from pathlib import Path


def test_import_farm_does_not_load_llama_cpp_or_workers():
    code = (
        "import sys, farm, farm.cli, farm.enqueue, farm.results, farm.status, farm.embedded\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'workers'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_script_beside_a_folder_named_farm_imports_the_installed_package(tmp_path):
    """A clone named `farm` next to the user's script must not shadow the package."""
    (tmp_path / "farm").mkdir()
    (tmp_path / "farm" / "README.md").write_text("a clone's files\n")
    (tmp_path / "script.py").write_text("import farm\nprint(farm.__file__, farm.submit)\n")
    r = subprocess.run(
        [sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(Path(__file__).resolve().parent.parent / "farm" / "__init__.py"))
