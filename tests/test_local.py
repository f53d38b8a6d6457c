"""farm.local: how other commands on this machine ask a running `farm up` for answers
(`farm status`) instead of loading the libraries that compute them."""

import os
import stat

import pytest

from farm import local


@pytest.fixture()
def home(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("FARM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    return tmp_path


def advertise(home, **fields):
    """A state file as `farm up` writes it, with this test's process as the farm."""
    state = {
        "pid": os.getpid(),
        "broker_url": "redis://127.0.0.1:6390/0",
        "database_url": f"sqlite:///{home / 'registry.db'}",
        **fields,
    }
    local.write_state(home / "farm.json", state)
    return state


def test_a_command_gets_the_running_farms_answer(home):
    calls = []
    server, address = local.serve({"/status": lambda: calls.append(1) or {"models": ["m"]}})
    try:
        advertise(home, local=address)
        assert local.ask("/status") == {"models": ["m"]}
        assert calls == [1]
        assert local.ask("/nothing-here") is None  # 404: the command reads for itself
    finally:
        server.shutdown()
    assert local.ask("/status") is None  # nobody listens any more
    assert stat.S_IMODE((home / "farm.json").stat().st_mode) == 0o600  # it holds the token


def test_no_answer_without_the_token_or_when_the_answer_fails(home):
    def broken():
        raise RuntimeError("registry down")

    server, address = local.serve({"/status": lambda: {"ok": 1}, "/broken": broken})
    try:
        advertise(home, local={**address, "token": "not-the-token"})
        assert local.ask("/status") is None
        advertise(home, local=address)
        assert local.ask("/broken") is None  # the command then meets the error itself
        assert local.ask("/status") == {"ok": 1}
    finally:
        server.shutdown()


def test_a_shell_set_up_for_other_servers_does_not_ask(home, monkeypatch):
    server, address = local.serve({"/status": lambda: {"ok": 1}})
    try:
        state = advertise(home, local=address)
        monkeypatch.setenv("FARM_BROKER_URL", state["broker_url"])  # the same farm
        monkeypatch.setenv("FARM_DATABASE_URL", state["database_url"])
        assert local.ask("/status") == {"ok": 1}
        monkeypatch.setenv("FARM_DATABASE_URL", "postgresql://elsewhere/farm")
        assert local.ask("/status") is None
        monkeypatch.delenv("FARM_DATABASE_URL")
        monkeypatch.setenv("farm_broker_url", "redis://elsewhere:6379/0")  # read in any case
        monkeypatch.delenv("FARM_BROKER_URL")
        assert local.ask("/status") is None
    finally:
        server.shutdown()


def test_a_dead_farms_state_file_is_not_asked(home):
    server, address = local.serve({"/status": lambda: {"ok": 1}})
    try:
        advertise(home, local=address, pid=2**22 + 12345)  # above Linux's pid_max: no such process
        assert local.read_state(home / "farm.json") is None
        assert local.ask("/status") is None
    finally:
        server.shutdown()
