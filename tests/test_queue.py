"""Queue names, the priority mapping (farm/queue.py) and the Celery app's settings
(farm/broker.py)."""

import pytest

from farm.broker import make_app
from farm.config import Settings
from farm.queue import (
    BATCH_LOW,
    DEFAULT_PRIORITY,
    PRIORITIES,
    PRIORITY_STEPS,
    priority_list_key,
    priority_name,
    priority_number,
    queue_name,
)


def test_high_priority_is_served_first_on_redis():
    # kombu's Redis transport pops the lowest step first.
    assert PRIORITIES["high"] < PRIORITIES["normal"] < PRIORITIES["low"]
    assert PRIORITIES["high"] == 0 and PRIORITIES["low"] == 8


def test_low_batch_lines_queue_behind_every_interactive_job_and_never_age():
    assert priority_number("low", batch=True) == BATCH_LOW > PRIORITIES["low"]
    assert priority_number("high", batch=True) == PRIORITIES["high"]  # as the batch asked
    assert priority_name(BATCH_LOW) == "low"  # farm status counts them as low
    assert BATCH_LOW not in PRIORITIES.values()  # aging moves the named steps only


def test_each_named_priority_has_its_own_step():
    assert set(PRIORITIES.values()) <= set(PRIORITY_STEPS)
    assert list(range(10)) == PRIORITY_STEPS
    assert {priority_name(n) for n in PRIORITIES.values()} == set(PRIORITIES)


def test_queue_names_never_contain_the_transport_separator():
    assert queue_name("gemma3-270m") == "farm.model.gemma3-270m"
    assert ":" not in queue_name("a.b_c-d")
    assert priority_list_key("m", 0) == "farm.model.m"
    assert priority_list_key("m", 9) == "farm.model.m\x06\x169"


def test_app_is_json_only_with_priorities_and_late_acks():
    settings = Settings(home="/tmp/x")
    app = make_app(settings, "redis://127.0.0.1:1/0")
    conf = app.conf
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.task_default_priority == DEFAULT_PRIORITY == PRIORITIES["normal"]
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    opts = conf.broker_transport_options
    assert opts["queue_order_strategy"] == "priority"
    assert opts["priority_steps"] == PRIORITY_STEPS
    assert conf.task_time_limit < opts["visibility_timeout"]


def test_a_time_limit_above_the_visibility_timeout_is_refused():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must be below"):
        Settings(job_time_limit=4000, visibility_timeout=3600)


def test_the_broker_urls_celery_and_farm_print_mask_a_password_only_where_there_is_one():
    from farm.config import masked

    settings = Settings(home="/tmp/x")
    for url, shown, ours in (
        # The embedded farm's broker has no password: kombu printed ':**@' for it anyway.
        ("redis://127.0.0.1:6379/0", "://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:@127.0.0.1:6379/0", "://127.0.0.1:6379/0", "redis://:@127.0.0.1:6379/0"),
        ("redis://bob@127.0.0.1:6379/0", "://bob@127.0.0.1:6379/0", "redis://bob@127.0.0.1:6379/0"),
        ("redis://:pw@127.0.0.1:6379/0", "://:**@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("amqp://bob:pw@127.0.0.1:5672//", "amqp://bob:**@127.0.0.1:5672//", "amqp://bob:***@127.0.0.1:5672//"),
    ):  # fmt: skip
        app = make_app(settings, url)
        # What the worker logs ("Connected to ..."), its banner and its connection errors.
        for conn in (app.connection_for_read(), app.connection_for_write(), app.connection()):
            assert conn.as_uri().endswith(shown), (url, conn.as_uri())
        assert masked(url) == ours


@pytest.mark.parametrize(
    ("setting", "mode"),
    [("true", "greedy"), ("1", "greedy"), ("false", "off"), ("", "off"), ("all", "all")],
)
def test_farm_device_sampling_takes_a_mode_or_the_old_switch(monkeypatch, setting, mode):
    monkeypatch.setenv("FARM_DEVICE_SAMPLING", setting)
    assert Settings(home="/tmp/x").device_sampling == mode
