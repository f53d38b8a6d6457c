"""Weight repacking, and the machines where llama.cpp's AMX kernels crash.

llama.cpp loads a model's weights into "extra" CPU buffers where it has faster kernels for
them: repacked for AVX2/AVX-512, or for AMX on Intel Sapphire Rapids and later. On some of
those machines the AMX matrix multiply crashes the process at the first decode
(ggml-org/llama.cpp#20824, open, Q4_K_M models among them; this project's 2-core CI VM is
one). llama-cpp-python builds for the machine it is installed on, so `pip install` there
gives a build with AMX in it.

Where llama.cpp reports AMX, farm loads models without the extra buffers, as llama-server's
`--no-repack` does (llama_model_params.use_extra_bufts); FARM_REPACK=true turns them back
on, FARM_REPACK=false off everywhere. llama-cpp-python's `Llama` takes no such parameter, so its
call to llama_model_default_params is wrapped while one model loads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import llama_cpp
import llama_cpp.llama_cpp as llama_c

from farm.config import get_settings

_lock = threading.Lock()


def amx() -> bool:
    """llama.cpp was built with AMX and this CPU has it."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def default_repack() -> bool:
    """FARM_REPACK when set, else on unless llama.cpp would use AMX."""
    setting = get_settings().repack
    return not amx() if setting is None else setting


@contextlib.contextmanager
def model_params(*, repack: bool) -> Iterator[None]:
    """Models loaded inside take `repack` as llama_model_params.use_extra_bufts."""
    with _lock:
        if repack:
            yield
            return
        default = llama_c.llama_model_default_params

        def without_extra_buffers() -> llama_c.llama_model_params:
            params = default()
            params.use_extra_bufts = False
            return params

        llama_c.llama_model_default_params = without_extra_buffers
        try:
            yield
        finally:
            llama_c.llama_model_default_params = default
