"""The request type: both forms accepted, every bad field named, nothing else let through."""

import pytest

from farm.errors import InvalidRequest
from farm.request import make_request


def test_flat_and_nested_forms_build_the_same_request():
    flat = make_request({"model": "m", "prompt": "hi", "temperature": 0.2, "max_tokens": 9})
    nested = make_request(
        {
            "model": "m",
            "prompt": "hi",
            "sampling": {"temperature": 0.2},
            "stopping": {"max_tokens": 9},
        }
    )
    assert flat == nested
    assert flat.sampling.temperature == 0.2
    assert flat.stopping.max_tokens == 9


def test_every_sampling_and_stopping_field_is_accepted():
    req = make_request(
        {
            "model": "m",
            "prompt": "hi",
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 20,
            "min_p": 0.1,
            "typical_p": 0.95,
            "repeat_penalty": 1.1,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "penalty_last_n": 32,
            "mirostat_mode": 2,
            "mirostat_tau": 4.0,
            "mirostat_eta": 0.2,
            "seed": 7,
            "stop": ["\n\n"],
            "max_tokens": 5,
            "max_time_ms": 1000,
            "priority": "high",
            "session": "alice",
        }
    )
    wire = req.to_wire()
    assert wire["sampling"]["mirostat_mode"] == 2
    assert wire["stopping"] == {"stop": ["\n\n"], "max_tokens": 5, "max_time_ms": 1000}
    assert wire["priority"] == "high" and wire["session"] == "alice"


def test_routing_fields_are_kept_apart_from_sampling():
    wire = make_request({"model": "m", "prompt": "hi", "priority": "low"}).to_wire()
    assert "priority" not in wire["sampling"] and "session" not in wire["sampling"]


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("temperature", 7, "sampling.temperature"),
        ("top_p", 0, "sampling.top_p"),
        ("top_k", -1, "sampling.top_k"),
        ("mirostat_mode", 3, "sampling.mirostat_mode"),
        ("seed", -5, "sampling.seed"),
        ("max_tokens", 0, "stopping.max_tokens"),
        ("max_tokens", 10**6, "stopping.max_tokens"),
        ("stop", [""], "stopping.stop"),
        ("priority", "urgent", "priority"),
        ("session", "", "session"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(field, value, named):
    with pytest.raises(InvalidRequest, match=f"'{named}'"):
        make_request({"model": "m", "prompt": "hi", field: value})


def test_unknown_fields_are_refused_by_name():
    with pytest.raises(InvalidRequest, match="unknown field 'temprature'"):
        make_request({"model": "m", "prompt": "hi", "temprature": 0.5})
    with pytest.raises(InvalidRequest, match="unknown field 'sampling.nucleus'"):
        make_request({"model": "m", "prompt": "hi", "sampling": {"nucleus": 0.5}})


def test_a_field_given_flat_and_nested_is_refused():
    with pytest.raises(InvalidRequest, match="temperature given both flat and inside 'sampling'"):
        make_request(
            {"model": "m", "prompt": "hi", "temperature": 1, "sampling": {"temperature": 1}}
        )


def test_exactly_one_of_prompt_and_messages():
    with pytest.raises(InvalidRequest, match="exactly one of 'prompt' or 'messages'"):
        make_request({"model": "m"})
    with pytest.raises(InvalidRequest, match="exactly one"):
        make_request({"model": "m", "prompt": "a", "messages": [{"role": "user", "content": "b"}]})
    chat = make_request({"model": "m", "messages": [{"role": "user", "content": "b"}]})
    assert chat.is_chat


def test_model_names_that_would_break_queue_names_are_refused():
    for bad in ("Model", "a:b", "a b", "", "-x"):
        with pytest.raises(InvalidRequest, match="'model'"):
            make_request({"model": bad, "prompt": "hi"})


def test_error_messages_do_not_echo_whole_prompts():
    secret = "x" * 500
    with pytest.raises(InvalidRequest) as info:
        make_request({"model": "m", "prompt": secret, "temperature": 99})
    assert secret not in str(info.value)
