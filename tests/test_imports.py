"""Clients need no llama.cpp: importing farm loads neither llama_cpp nor workers."""

import subprocess
import sys


def test_import_farm_does_not_load_llama_cpp_or_workers():
    code = (
        "import sys, farm, farm.cli, farm.enqueue, farm.results, farm.status, farm.embedded\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'workers'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
