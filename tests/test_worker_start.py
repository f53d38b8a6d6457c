"""A worker whose model cannot load exits non-zero with the reason and holds no lease."""

import pytest

from farm.registry import queries, transaction, upgrade
from tests.conftest import gemma_path, run_worker


@pytest.fixture
def env(tmp_path, redis_url):
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(db)
    return db, {
        "FARM_HOME": str(tmp_path),
        "FARM_BROKER_URL": redis_url,
        "FARM_DATABASE_URL": db,
        "PATH": "/usr/bin:/bin",
    }


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "does not exist"), (b"not a model at all", "is not a GGUF file")],
)
def test_a_missing_or_non_gguf_model_file_stops_the_worker(env, tmp_path, content, expected):
    db, environ = env
    path = tmp_path / "broken.gguf"
    if content is not None:
        path.write_bytes(content)
    with transaction(db) as s:
        queries.add_model(s, name="broken", path=str(path))
    r = run_worker(environ, "--model", "broken")
    assert r.returncode == 2
    assert expected in r.stderr and "Traceback" not in r.stderr
    with transaction(db) as s:
        assert queries.live_leases(s) == []
        assert all(w.state == "stopped" for w in queries.list_workers(s))


def test_a_model_missing_from_the_registry_stops_the_worker(env):
    _, environ = env
    r = run_worker(environ, "--model", "nope")
    assert r.returncode == 2 and "unknown model 'nope'" in r.stderr


def test_a_setting_that_does_not_parse_stops_the_worker_naming_it(env):
    _, environ = env
    r = run_worker({**environ, "FARM_JOB_TIME_LIMIT": "soon"}, "--model", "gemma3-270m")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "FARM_JOB_TIME_LIMIT='soon': Input should be a valid integer" in r.stderr


def test_a_truncated_gguf_is_refused_by_llama_cpp(env, tmp_path):
    db, environ = env
    path = tmp_path / "truncated.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with transaction(db) as s:
        queries.add_model(s, name="truncated", path=str(path))
    r = run_worker(environ, "--model", "truncated")
    assert r.returncode == 2 and "could not load model 'truncated'" in r.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--parallel", "0"], "--parallel must be at least 1, not 0"),
        (["--parallel", "300"], "--parallel must be at most 256, not 300"),
        (["--threads", "two"], "--threads must be a whole number, not 'two'"),
    ],
)
def test_impossible_slot_or_thread_counts_are_refused_before_loading(env, args, expected):
    _, environ = env
    r = run_worker(environ, "--model", "gemma3-270m", *args)
    assert r.returncode == 2 and expected in r.stderr


def test_a_kv_cache_larger_than_free_memory_stops_the_worker_with_the_numbers(env):
    db, environ = env
    with transaction(db) as s:
        queries.add_model(s, name="gemma3-270m", path=gemma_path(), chat_format="gemma")
    r = run_worker(environ, "--model", "gemma3-270m", "--parallel", "8", "--kv-size", "400000000")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "a KV cache of 400000000 tokens (8 slots) needs about" in r.stderr
    assert "lower --parallel, --kv-size" in r.stderr
    with transaction(db) as s:
        assert queries.live_leases(s) == []
