"""OpenAI's choices and logprobs parameters into farm's Request, and a Completion's choices
back into OpenAI's shapes, without a farm (the gateway tests run them end to end)."""

from __future__ import annotations

import pytest

from farm.completion import Choice, Completion, Timings, Usage
from farm.openai.api import BadBody, chat_response, completion_response, request_fields
from farm.request import make_request

ENTRY = {
    "token": " a", "bytes": [32, 97], "logprob": -0.5, "text_offset": 0,
    "top_logprobs": [{"token": " a", "bytes": [32, 97], "logprob": -0.5},
                     {"token": " b", "bytes": [32, 98], "logprob": -1.5}],
}  # fmt: skip


def completion(choices: list[Choice]) -> Completion:
    return Completion(
        job_id="j", model="m", text=choices[0].text, finish_reason="length",
        usage=Usage(prompt_tokens=3, completion_tokens=4), worker="w", choices=choices,
        timings=Timings(queue_wait_ms=0, ttft_ms=None, generation_ms=1),
    )  # fmt: skip


def test_prompts_n_logprobs_echo_and_logit_bias_become_request_fields():
    fields = request_fields(
        {"model": "m", "prompt": ["a", "b"], "n": 2, "logprobs": 3, "echo": True,
         "best_of": 2, "logit_bias": {"7": -100}},
        chat=False,
    )  # fmt: skip
    request = make_request(fields)
    assert request.prompts == ("a", "b") and request.n == 2 and request.choices == 4
    assert request.logprobs == 3 and request.echo
    assert request.sampling.logit_bias == {7: -100.0}
    chat = request_fields(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
         "top_logprobs": 4},
        chat=True,
    )  # fmt: skip
    assert make_request(chat).logprobs == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [({"n": 3, "best_of": 2}, "best_of"), ({"logprobs": 9}, "logprobs"),
     ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"suffix": "x"}, "suffix"),
     ({"prompt": ["a"] * 40, "n": 2}, "n")],
)  # fmt: skip
def test_what_farm_cannot_do_names_its_param(body, param):
    with pytest.raises(BadBody) as bad:
        request_fields({"model": "m", "prompt": "hi", **body}, chat=False)
    assert bad.value.param == param


def test_choices_come_back_indexed_with_logprobs_in_each_endpoints_shape():
    c = completion(
        [Choice(index=0, text=" a", finish_reason="length", logprobs=[ENTRY]),
         Choice(index=1, text=" a", finish_reason="stop", logprobs=[ENTRY])]
    )  # fmt: skip
    text = completion_response(c)
    assert [x["index"] for x in text["choices"]] == [0, 1]
    assert text["choices"][1]["finish_reason"] == "stop"
    assert text["choices"][0]["logprobs"] == {
        "tokens": [" a"], "token_logprobs": [-0.5], "text_offset": [0],
        "top_logprobs": [{" a": -0.5, " b": -1.5}],
    }  # fmt: skip
    content = chat_response(c)["choices"][0]["logprobs"]["content"]
    assert content[0]["top_logprobs"][1] == {"token": " b", "logprob": -1.5, "bytes": [32, 98]}
    single = completion([Choice(index=0, text="x", finish_reason="length")])
    single.choices = []  # a one-choice job keeps its text and finish reason only
    assert completion_response(single)["choices"][0]["text"] == "x"
