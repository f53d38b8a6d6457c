"""Models load without llama.cpp's repacked (AMX) weight buffers where its AMX kernels
would run: they crash the process on some CPUs (workers/repack.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from farm.config import reset_settings

llama_cpp = pytest.importorskip("llama_cpp")

from workers.repack import amx, default_repack, model_params  # noqa: E402


@pytest.fixture
def settings_from_env() -> Iterator[None]:
    reset_settings()
    yield
    reset_settings()


@pytest.mark.parametrize(("setting", "repack"), [("true", True), ("1", True), ("false", False)])
def test_farm_repack_decides_when_set(monkeypatch, settings_from_env, setting, repack):
    monkeypatch.setenv("FARM_REPACK", setting)
    assert default_repack() is repack


def test_without_the_setting_repacking_is_off_exactly_where_llama_cpp_has_amx(
    monkeypatch, settings_from_env
):
    monkeypatch.delenv("FARM_REPACK", raising=False)
    assert default_repack() is not amx()


def test_models_loaded_inside_take_no_extra_buffers_and_the_default_comes_back():
    import llama_cpp.llama_cpp as llama_c

    with model_params(repack=False):
        assert llama_c.llama_model_default_params().use_extra_bufts is False
    assert llama_c.llama_model_default_params().use_extra_bufts is True
    with model_params(repack=True):
        assert llama_c.llama_model_default_params().use_extra_bufts is True
