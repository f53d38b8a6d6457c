"""Prompt-lookup speculation on the real Gemma model: a reply that copies its prompt is
drafted from it, and every kept token is the one the sequence would have produced alone.

Each test runs the same request with drafts off (draft_max 0) and on, and compares. The
engine's counters show that drafts were made and kept, so a test cannot pass by drafting
nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from farm.request import Request, make_request
from tests.conftest import MODEL, gemma_path

pytestmark = pytest.mark.e2e

llama_cpp = pytest.importorskip("llama_cpp")

from workers.engine import DONE, FAILED, Generation, Sequence  # noqa: E402
from workers.engine.lookup import PromptLookup  # noqa: E402
from workers.host import EngineOptions, ModelHost  # noqa: E402
from workers.spec import ModelSpec  # noqa: E402

PASSAGE = (
    "The farm keeps one queue per model. Each job waits in its queue until a worker that "
    "holds the model has a free slot. A worker runs many jobs together, one token of each "
    "in every step, and writes each piece of text to the job's stream as it comes. When a "
    "worker stops, its jobs go back to their queues and another worker takes them."
)


@pytest.fixture(scope="module")
def host() -> Iterator[ModelHost]:
    h = ModelHost(
        ModelSpec(name=MODEL, path=gemma_path(), chat_format="gemma"),
        EngineOptions(slots=4, threads=2),
    )
    h.load()
    h.warm_up()
    yield h
    h.close()


def copy_request(draft_max: int, **fields: object) -> Request:
    message = f"Copy this text exactly, changing nothing:\n\n{PASSAGE}"
    return make_request(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": message}],
            "max_tokens": 80,
            "temperature": 0,
            "draft_max": draft_max,
            **fields,
        }
    )


def with_and_without(host: ModelHost, **fields: object) -> tuple[Generation, Generation, int]:
    """The request without drafts, then with: both generations and the drafted tokens kept."""
    engine = host.engine
    assert engine is not None
    plain = host.generate(copy_request(0, **fields))
    kept = engine.tokens_accepted
    drafted = host.generate(copy_request(8, **fields))
    return plain, drafted, engine.tokens_accepted - kept


def test_greedy_output_is_the_same_with_drafts_and_most_of_a_copy_is_drafted(host):
    plain, drafted, kept = with_and_without(host)
    assert drafted.text == plain.text and drafted.text
    assert drafted.completion_tokens == plain.completion_tokens
    assert drafted.finish_reason == plain.finish_reason
    assert "one queue per model" in drafted.text  # the model copies: drafts have something to hit
    assert kept >= drafted.completion_tokens // 2
    # The generation reports its own drafts (the Completion's timings carry them).
    assert drafted.drafted_kept == kept and drafted.drafted_tokens >= kept
    assert plain.drafted_tokens == plain.drafted_kept == 0


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0.9, "seed": 7},
        {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "seed": 11},
        {"temperature": 0.6, "repeat_penalty": 1.2, "penalty_last_n": 32, "seed": 3},
        {"temperature": 0.8, "mirostat_mode": 2, "seed": 5},
    ],
)
def test_a_seeded_sampled_reply_with_drafts_repeats(host, sampling):
    """The sampler runs once per kept token, in order, so a fixed seed draws the same
    reply again (penalties and mirostat keep state across the kept tokens). Against the
    same request without drafts it agrees only as far as llama.cpp's kernels give the same
    logits to a position in a batch of 1 and of 9: they do not, in the last bits (an echo's
    prompt logprobs differ from the generated ones as much), and a sampled token can flip."""
    engine = host.engine
    assert engine is not None
    kept = engine.tokens_accepted
    first = host.generate(copy_request(8, **sampling))
    again = host.generate(copy_request(8, **sampling))
    assert again.text == first.text and first.text
    assert again.completion_tokens == first.completion_tokens
    assert engine.tokens_accepted > kept


def test_a_requests_draft_max_holds_above_the_default_and_0_turns_drafts_off(host):
    engine = host.engine
    assert engine is not None
    assert engine._draft_most(Sequence(tokens=[2], max_tokens=1, draft_max=32)) == 32
    assert engine._draft_most(Sequence(tokens=[2], max_tokens=1)) == engine.draft_max == 8
    drafted = engine.tokens_drafted
    host.generate(copy_request(0))
    assert engine.tokens_drafted == drafted


def test_top_k_1_with_drafts_is_greedy(host):
    greedy = host.generate(copy_request(0))
    top_1 = host.generate(copy_request(8, temperature=1.0, top_k=1, seed=1))
    assert top_1.text == greedy.text


@pytest.mark.parametrize("max_tokens", [1, 2, 9, 33])
def test_a_draft_past_max_tokens_is_cut_exactly_there(host, max_tokens):
    plain, drafted, _ = with_and_without(host, max_tokens=max_tokens)
    assert drafted.completion_tokens == plain.completion_tokens == max_tokens
    assert drafted.finish_reason == "length"
    assert drafted.text == plain.text


def test_a_draft_that_runs_into_a_stop_string_ends_just_before_it(host):
    plain, drafted, kept = with_and_without(host, stop=["free slot"])
    assert plain.finish_reason == drafted.finish_reason == "stop"
    assert drafted.text == plain.text
    assert drafted.text.endswith("has a ") and "free slot" not in drafted.text
    assert drafted.completion_tokens == plain.completion_tokens
    assert kept > 0


def test_a_grammar_ends_the_same_reply_at_the_same_token_with_drafts(host):
    grammar = 'root ::= [A-Za-z .,\'\\n]+ "."'
    plain, drafted, kept = with_and_without(host, grammar=grammar, max_tokens=40)
    assert drafted.text == plain.text and drafted.text
    assert drafted.completion_tokens == plain.completion_tokens
    assert drafted.finish_reason == plain.finish_reason
    assert kept > 0


def test_logprobs_with_drafts_match_those_without(host):
    plain, drafted, kept = with_and_without(host, logprobs=2, max_tokens=30)
    assert kept > 0
    assert plain.logprobs is not None and drafted.logprobs is not None
    assert [e["token"] for e in drafted.logprobs] == [e["token"] for e in plain.logprobs]
    # Kernel differences between a batch of 1 and of 9 (see above): measured <= 0.02 here.
    for a, b in zip(plain.logprobs, drafted.logprobs, strict=True):
        assert b["logprob"] == pytest.approx(a["logprob"], abs=0.1)


def test_the_cells_of_a_rejected_draft_are_gone_from_the_prompt_cache(host):
    """Requests reusing the slot's cache after drafts were cut back continue from the right
    cells: llama.cpp refuses a batch whose positions do not follow a sequence's last cell,
    and a stale cell would change the reply."""
    first = host.generate(copy_request(8))
    again = host.generate(copy_request(8))
    plain = host.generate(copy_request(0))
    assert again.cached_tokens > 0 and plain.cached_tokens > 0
    assert again.text == first.text == plain.text


def test_cancel_mid_draft_ends_the_sequence_and_the_next_one_runs(host):
    cancelled = host.generate(copy_request(8, max_tokens=200), should_cancel=lambda n: n >= 10)
    assert cancelled.finish_reason == "cancelled" and 10 <= cancelled.completion_tokens < 200
    assert host.generate(copy_request(8, max_tokens=20)).completion_tokens == 20


def test_sequences_drafting_together_each_get_their_own_reply(host):
    """Four copies at once: every one drafts in the same batch and copies its prompt."""
    engine = host.engine
    assert engine is not None
    prompt = host.llm.tokenize(
        f"Text: {PASSAGE}\nThe same text again: The farm".encode(), add_bos=True
    )
    seqs = [
        Sequence(tokens=prompt, max_tokens=40, sampling={"temperature": 0}, draft_max=8)
        for _ in range(4)
    ]
    kept = engine.tokens_accepted
    with engine._cond:
        for seq in seqs:
            engine.submit(seq)
    texts = []
    for seq in seqs:
        while True:
            kind, value = seq.events.get(timeout=120)
            assert kind != FAILED, value
            if kind == DONE:
                texts.append(value.text)
                break
    assert engine.tokens_accepted - kept > 40
    assert all(t.startswith(" keeps one queue") for t in texts), texts


# -- the lookup itself, without a model -------------------------------------------------------
def test_the_draft_is_what_followed_the_latest_occurrence_of_the_last_tokens():
    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 0, 1, 2, 3])
    assert lookup.draft(4) == [7, 8, 0, 1]  # the later of the two earlier 1 2 3
    assert lookup.draft(1) == [7]
    assert lookup.draft(0) == []


def test_the_longest_n_gram_is_tried_first_and_a_shorter_one_after():
    lookup = PromptLookup([5, 2, 3, 6, 7, 1, 2, 3, 4])
    lookup.add(2)
    lookup.add(3)  # ... 4 2 3: no earlier "4 2 3"; "2 3" last went on with 4
    assert lookup.draft(3) == [4, 2, 3]
    lookup.add(4)  # "2 3 4" seen before: then followed by 2
    assert lookup.draft(2) == [2, 3]


def test_no_draft_without_an_earlier_occurrence():
    lookup = PromptLookup([1, 2, 3, 4])
    assert lookup.draft(8) == []
    lookup.add(5)
    assert lookup.draft(8) == []
    assert PromptLookup([]).draft(4) == []
    assert PromptLookup([7]).draft(4) == []
