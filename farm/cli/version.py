"""`farm --version`: farm's, Celery's and llama-cpp-python's versions, and whether llama.cpp
has GPU offload. Below `base.py`, which calls it from the root callback."""

from __future__ import annotations

import typer


def version_callback(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    llama = of("llama-cpp-python")
    gpu = "-"
    if llama != "not installed":
        try:
            import llama_cpp

            gpu = "yes" if llama_cpp.llama_supports_gpu_offload() else "no (CPU only)"
        except Exception as e:  # a broken build still gets its version printed
            gpu = f"unknown ({type(e).__name__})"
    print(f"farm {of('farm')}")
    print(f"celery {of('celery')}, kombu {of('kombu')}")
    print(f"llama-cpp-python {llama}; GPU offload: {gpu}")
    raise typer.Exit()
