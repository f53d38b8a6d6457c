"""Build `llama-server` from the llama.cpp sources that the installed llama-cpp-python vendors.

The benchmark compares farm with llama-server built from the very same llama.cpp, so the
comparison is between schedulers, not between llama.cpp versions. The sdist comes from the
package registry (pip download); the binary goes to a cache folder and is never committed.

    python bench/llama_server.py          # prints the binary's path, building it if needed
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "farm-bench"


def repack_args() -> list[str]:
    """llama-server's --no-repack where farm's workers load without repacked weights (its
    AMX kernels crash on some CPUs: workers/repack.py), so both run the same kernels."""
    from workers.repack import default_repack

    return [] if default_repack() else ["--no-repack"]


@contextlib.contextmanager
def serving(path: str, args: list[str]) -> Iterator[str]:
    """llama-server on `path` (a GGUF) with `args`, on a free loopback port, loading without
    repacked weights where farm's workers do: its URL once /health answers; stopped after."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [str(llama_server()), "-m", path, "--port", str(port), "--host", "127.0.0.1",
             "--no-webui", *repack_args(), *args],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"llama-server did not start with {' '.join(args)}:\n{tail}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


def llama_server() -> Path:
    """$LLAMA_SERVER when set, else the cached build for this llama-cpp-python version."""
    if os.environ.get("LLAMA_SERVER"):
        return Path(os.environ["LLAMA_SERVER"])
    v = version("llama-cpp-python")
    binary = CACHE / f"llama-server-{v}" / "bin" / "llama-server"
    if binary.exists():
        return binary
    build(v, binary.parent.parent)
    return binary


def build(v: str, dest: Path) -> None:
    print(f"building llama-server from llama-cpp-python {v}'s sdist (minutes)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", f"llama-cpp-python=={v}", "-d", tmp],
            check=True,
        )  # fmt: skip
        [sdist] = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build_dir = Path(tmp) / "build"
        subprocess.run(
            ["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
             "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             *os.environ.get("CMAKE_ARGS", "").split()],
            check=True,
        )  # fmt: skip
        jobs = str(os.cpu_count() or 2)
        subprocess.run(
            ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", jobs],
            check=True,
        )
        (dest / "bin").mkdir(parents=True, exist_ok=True)
        target = dest / "bin" / "llama-server"
        target.write_bytes((build_dir / "bin" / "llama-server").read_bytes())
        target.chmod(0o755)


if __name__ == "__main__":
    print(llama_server())
