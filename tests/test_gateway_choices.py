"""Completions and chat as SDKs and evaluation harnesses send them, through the official
`openai` package against a real `farm serve` and the live farm's Gemma worker: n > 1, lists
of prompts, logprobs, echo, logit_bias, GET /v1/models/{id}, and what farm refuses."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from tests import test_gateway
from tests.conftest import MODEL, finished_usage
from tests.test_gateway import client, usage_rows

gateway = test_gateway.gateway  # the same `farm serve` fixture, in front of the live farm

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox jumps over the lazy dog"


def test_n_3_gives_three_choices_from_one_prompt_counted_once(gateway, live_farm):
    c = client(gateway)
    one = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, seed=5)
    three = c.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=4, n=3, seed=5, temperature=1.0
    )
    assert [x.index for x in three.choices] == [0, 1, 2]
    assert all(x.text for x in three.choices)
    assert len({x.text for x in three.choices}) > 1  # each sequence draws with its own seed
    assert three.usage is not None and one.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt, once
    [row] = finished_usage(live_farm.database_url, three.id.removeprefix("cmpl-"))
    assert row.completion_tokens == three.usage.completion_tokens  # type: ignore[attr-defined]
    assert row.prompt_tokens == one.usage.prompt_tokens  # type: ignore[attr-defined]

    chat = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], n=2, max_tokens=3
    )
    assert [x.index for x in chat.choices] == [0, 1]
    assert all(x.message.content is not None for x in chat.choices)


def test_a_list_of_prompts_gives_a_choice_each_as_each_prompt_alone(gateway):
    c = client(gateway)
    prompts = ["One, two, three,", "Roses are red,", "The capital of France is"]
    together = c.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    assert [x.index for x in together.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, together.choices, strict=True):
        alone = c.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
        assert choice.text == alone.choices[0].text
    both = c.completions.create(model=MODEL, prompt=prompts[:2], n=2, max_tokens=3, temperature=0)
    assert [x.index for x in both.choices] == [0, 1, 2, 3]  # prompt by prompt, n each
    assert both.choices[0].text == both.choices[1].text  # greedy: the same text twice


def test_echo_with_logprobs_and_no_tokens_scores_the_prompt(gateway):
    c = client(gateway)
    scored = c.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    choice = scored.choices[0]
    assert choice.text == PROMPT
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.text_offset is not None
    assert "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs and lp.top_logprobs[0] is None
    rest = lp.token_logprobs[1:]
    assert len(rest) == len(lp.tokens) - 1
    assert all(x is not None and math.isfinite(x) and x <= 0 for x in rest)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    # The prompt's last tokens, scored, are what generating them from the rest gives.
    head = PROMPT.removesuffix(" lazy dog")
    generated = c.completions.create(
        model=MODEL, prompt=head, max_tokens=2, temperature=0, logprobs=1
    ).choices[0]
    assert generated.text == " lazy dog" and generated.logprobs is not None
    assert generated.logprobs.token_logprobs is not None
    for scored_lp, made_lp in zip(rest[-2:], generated.logprobs.token_logprobs, strict=True):
        assert scored_lp == pytest.approx(made_lp, abs=0.1)
    for i, token in enumerate(lp.tokens[1:], start=1):
        top = lp.top_logprobs[i]
        assert top is not None and len(top) == 1
        best, best_lp = next(iter(top.items()))
        if best == token:  # the token was the likeliest: its own logprob is the top one
            assert best_lp == pytest.approx(lp.token_logprobs[i])


def test_chat_logprobs_give_the_top_alternatives_sorted(gateway):
    reply = client(gateway).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs and reply.choices[0].logprobs.content
    assert content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0 and t.bytes
        values = [a.logprob for a in t.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert t.top_logprobs[0].token == t.token  # greedy picks the likeliest
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)


def test_streaming_several_choices_carries_each_chunks_index_and_logprobs(gateway):
    c = client(gateway)
    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    logprobs = 0
    for chunk in c.completions.create(
        model=MODEL, prompt=["Hello", "Goodbye"], n=2, max_tokens=4, stream=True, logprobs=2
    ):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
            if choice.logprobs and choice.logprobs.tokens:
                logprobs += len(choice.logprobs.tokens)
    assert sorted(finished) == [0, 1, 2, 3] and all(texts.values())
    assert logprobs > 0
    roles = set()
    for chunk in c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=3, stream=True
    ):
        roles |= {x.index for x in chunk.choices if x.delta.role == "assistant"}
    assert roles == {0, 1}


def test_logit_bias_minus_100_bans_the_token_greedy_decoding_picks(gateway):
    c = client(gateway)
    plain = c.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=3, temperature=0, logprobs=0
    )
    first = plain.choices[0]
    assert first.logprobs is not None and first.logprobs.tokens
    token_id = _token_id(first.logprobs.tokens[0])
    banned = c.completions.create(
        model=MODEL,
        prompt="The quick brown fox",
        max_tokens=3,
        temperature=0,
        logit_bias={str(token_id): -100},
    )
    assert banned.choices[0].text != first.text
    assert not banned.choices[0].text.startswith(first.logprobs.tokens[0])


def _token_id(token: str) -> int:
    """The id of `token` in Gemma's vocabulary, read from the GGUF by llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tests.conftest import gemma_path

    llm = llama_cpp.Llama(model_path=gemma_path(), n_ctx=16, verbose=False, vocab_only=True)
    try:
        ids = llm.tokenize(token.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    assert len(ids) == 1
    return int(ids[0])


def test_get_model_by_id_is_openais_model_object_and_404_names_model(gateway):
    c = client(gateway)
    model = c.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by == "farm"
    with pytest.raises(openai.NotFoundError) as missing:
        c.models.retrieve("no-such-model")
    assert missing.value.body["param"] == "model"  # type: ignore[index]
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]


BAD = [
    ("/v1/completions", {"prompt": "hi", "best_of": 3, "n": 1}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, "n"),
    ("/v1/completions", {"prompt": ["a"] * 10, "n": 10}, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 1.5}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"12": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "suffix": "and the end"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, "echo"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "logprobs": 3}, "logprobs"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body", "param"), BAD)
def test_what_farm_cannot_do_is_a_400_naming_the_param_and_queues_nothing(
    gateway, live_farm, route, body, param
):
    before = usage_rows(live_farm.database_url)
    r = httpx.post(f"{gateway}{route}", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert usage_rows(live_farm.database_url) == before


def test_a_logit_bias_past_the_vocabulary_is_a_400_naming_it(gateway):
    with pytest.raises(openai.BadRequestError) as bad:
        client(gateway).completions.create(
            model=MODEL, prompt="hi", max_tokens=1, logit_bias={"999999999": 5}
        )
    assert bad.value.body["param"] == "logit_bias"  # type: ignore[index]
