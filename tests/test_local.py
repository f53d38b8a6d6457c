"""farm.local: how other commands on this machine ask a running `farm up` for answers
(`farm status`) instead of loading the libraries that compute them."""

import http.client
import json
import os
import socket
import stat
import time
from contextlib import contextmanager

import pytest

from farm import local


@pytest.fixture()
def home(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("FARM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    return tmp_path


@contextmanager
def serving(routes):
    """local.serve for the length of a block; yields its address."""
    stop, address = local.serve(routes)
    try:
        yield address
    finally:
        stop()


def advertise(home, **fields):
    """A state file as `farm up` writes it, with this test's process as the farm."""
    state = {
        "pid": os.getpid(),
        "broker_url": "redis://127.0.0.1:6390/0",
        "result_url": "redis://127.0.0.1:6390/0",
        "database_url": f"sqlite:///{home / 'registry.db'}",
        **fields,
    }
    local.write_state(home / "farm.json", state)
    return state


def test_a_command_gets_the_running_farms_answer(home):
    calls = []
    with serving({"/status": lambda: calls.append(1) or {"models": ["m"]}}) as address:
        advertise(home, local=address)
        assert local.ask("/status") == {"models": ["m"]}
        assert calls == [1]
        assert local.ask("/nothing-here") is None  # 404: the command reads for itself
    started = time.monotonic()
    assert local.ask("/status") is None  # refused at once once stopped
    assert time.monotonic() - started < 1
    assert [p.name for p in home.iterdir()] == ["farm.json"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((home / "farm.json").stat().st_mode) == 0o666 & ~umask


def get(address, path):
    conn = http.client.HTTPConnection("127.0.0.1", address["port"], timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_route_ending_in_a_slash_takes_the_rest_of_the_path(home):
    with serving({"/jobs/": lambda job: {"job": job}, "/status": lambda: {}}) as address:
        advertise(home, local=address)
        assert local.ask("/jobs/4152130b") == {"job": "4152130b"}
        assert local.ask("/jobs/a%2Fb%20c") == {"job": "a/b c"}  # quoted by the asker
        assert get(address, "/jobs/")[0] == 404  # no id: not a call without one
        assert get(address, "/jobs")[0] == 404
        assert get(address, "/status?verbose=1") == (200, {})


def test_other_shells_use_the_running_farms_result_store(home):
    from farm.config import Settings

    advertise(home, result_url="redis://127.0.0.1:6391/2")
    assert Settings().resolved_result_url() == "redis://127.0.0.1:6391/2"
    assert Settings(result_url="redis://mine:6379/0").resolved_result_url() == (
        "redis://mine:6379/0"
    )
    # A shell on its own broker does not take the local farm's result store.
    assert Settings(broker_url="redis://b:6379/0").resolved_result_url() == "redis://b:6379/0"


def test_no_answer_when_it_fails_or_comes_from_another_process(home):
    def broken():
        raise RuntimeError("registry down")

    with serving({"/status": lambda: {"ok": 1}, "/broken": broken, "/list": list}) as address:
        advertise(home, local=address)
        assert local.ask("/broken") is None  # the command then meets the error itself
        assert local.ask("/list") is None  # not a JSON object
        assert local.ask("/status") == {"ok": 1}
        # A dead farm's pid taken by another process, and its port by another server.
        advertise(home, local=address, pid=os.getppid())
        assert local.ask("/status") is None
        for broken_entry in ({}, {"port": "x"}, {"port": 70000}, None):
            advertise(home, local=broken_entry)
            assert local.ask("/status") is None


def test_a_shell_set_up_for_other_servers_does_not_ask(home, monkeypatch):
    with serving({"/status": lambda: {"ok": 1}}) as address:
        state = advertise(home, local=address)
        monkeypatch.setenv("FARM_BROKER_URL", state["broker_url"])  # the same farm
        monkeypatch.setenv("FARM_DATABASE_URL", state["database_url"])
        assert local.ask("/status") == {"ok": 1}
        monkeypatch.setenv("FARM_RESULT_URL", "redis://elsewhere:6379/1")
        assert local.ask("/status") is None
        monkeypatch.delenv("FARM_RESULT_URL")
        monkeypatch.setenv("FARM_DATABASE_URL", "postgresql://elsewhere/farm")
        assert local.ask("/status") is None
        monkeypatch.delenv("FARM_DATABASE_URL")
        monkeypatch.setenv("farm_broker_url", "redis://elsewhere:6379/0")  # read in any case
        monkeypatch.delenv("FARM_BROKER_URL")
        assert local.ask("/status") is None


def test_a_dead_farms_state_file_is_not_asked(home):
    with serving({"/status": lambda: {"ok": 1}}) as address:
        advertise(home, local=address, pid=2**22 + 12345)  # above Linux's pid_max: no such process
        assert local.read_state(home / "farm.json") is None
        assert local.ask("/status") is None


def test_a_silent_connection_does_not_hold_the_server(home):
    with serving({"/status": lambda: {"ok": 1}}) as address:
        idle = socket.create_connection(("127.0.0.1", address["port"]))  # sends nothing
        conn = http.client.HTTPConnection("127.0.0.1", address["port"], timeout=5)
        conn.request("GET", "/status")
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (200, {"ok": 1})
        assert response.getheader("X-Farm-Pid") == str(os.getpid())
        conn.close()
        idle.settimeout(10)
        assert idle.recv(1) == b""  # closed by the server's timeout, not left open
        idle.close()
