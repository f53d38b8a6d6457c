"""Whatever reaches `farm.submit` becomes a validated request or an InvalidRequest naming
the field: never another exception, and never something the registry or the worker would
refuse later (NUL bytes, lone surrogates, absurd timestamps, non-object groups)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.enqueue import build, check_seconds
from farm.errors import InvalidRequest
from farm.request import Request

FIELDS = [
    "model", "prompt", "messages", "sampling", "stopping", "priority", "session", "grammar",
    "response_format", "temperature", "top_p", "top_k", "max_tokens", "stop", "seed",
    "penalty_last_n", "mirostat_mode", "submitted_at", "stream_tokens", "", "bogus",
]  # fmt: skip

junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["\x00", "\ud800", "a\udcffb", "high", "gemma3-270m", 'root ::= "a"']),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=junk, fields=st.dictionaries(st.sampled_from(FIELDS), junk, max_size=5))
def test_any_input_is_a_valid_request_or_an_invalid_request_error(prompt, fields):
    fields.setdefault("model", "gemma3-270m")
    fields.pop("prompt", None)  # farm.submit's first argument, never a keyword as well
    try:
        request = build(prompt if isinstance(prompt, str) else None, **fields)
    except InvalidRequest as e:
        assert str(e) and len(str(e)) < 4000  # says what was wrong, without echoing it all
        return
    wire = request.to_wire()
    encoded = json.dumps(wire).encode("utf-8")  # what crosses the wire encodes
    assert b"\\u0000" not in encoded
    assert Request.model_validate(json.loads(encoded)) == request


@given(value=junk)
def test_wait_and_timeout_seconds_are_numbers_or_refused(value):
    try:
        check_seconds("wait_for_worker", value)
    except InvalidRequest as e:
        assert "invalid 'wait_for_worker'" in str(e)
    else:
        assert isinstance(value, int | float) and 0 <= value <= 86400
