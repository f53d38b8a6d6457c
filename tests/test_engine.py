"""The engine on the real Gemma model, in this process: many sequences in one batch, each
with its own sampling and stops, the prompt cache, constrained output and a full KV cache.

The model is a 270M base model: these tests check mechanics, not the quality of answers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from farm.errors import JobFailed
from farm.request import Request, make_request
from tests.conftest import MODEL, gemma_path

pytestmark = pytest.mark.e2e

llama_cpp = pytest.importorskip("llama_cpp")

from workers.engine import DONE, FAILED, LOGPROBS, TEXT, Generation, Sequence  # noqa: E402
from workers.engine import engine as engine_module  # noqa: E402
from workers.engine import sampling as sampling_module  # noqa: E402
from workers.host import EngineOptions, ModelHost  # noqa: E402
from workers.spec import ModelSpec  # noqa: E402

SLOTS = 8


@pytest.fixture(scope="module")
def host() -> Iterator[ModelHost]:
    h = ModelHost(
        ModelSpec(name=MODEL, path=gemma_path(), chat_format="gemma"),
        EngineOptions(slots=SLOTS, threads=2),
    )
    h.load()
    h.warm_up()
    yield h
    h.close()


def request(prompt: str, **fields: object) -> Request:
    return make_request({"model": MODEL, "prompt": prompt, **fields})


def run_together(host: ModelHost, requests: list[Request]) -> tuple[list[Generation], int]:
    """Generate all at once from threads, as a worker's task threads do. Returns the
    generations and the most slots seen busy at one time."""
    results: list[Generation | BaseException] = [None] * len(requests)  # type: ignore[list-item]
    done = threading.Event()
    peak = [0]

    def watch() -> None:
        assert host.engine is not None
        while not done.is_set():
            peak[0] = max(peak[0], sum(s.job is not None for s in host.engine.slots))
            time.sleep(0.005)

    def one(i: int) -> None:
        try:
            results[i] = host.generate(requests[i])
        except BaseException as e:
            results[i] = e

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    watcher.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results, peak[0]  # type: ignore[return-value]


def submit_at_once(host: ModelHost, seqs: list[Sequence]) -> list[Generation]:
    """Hand sequences to the engine so that it admits them in the same step."""
    engine = host.engine
    assert engine is not None
    with engine._cond:  # the engine admits nothing until all are in
        for seq in seqs:
            engine.submit(seq)
    out = []
    for seq in seqs:
        while True:
            kind, value = seq.events.get(timeout=120)
            if kind == DONE:
                out.append(value)
                break
            assert kind != FAILED, value
    return out


def fresh_slots(host: ModelHost) -> None:
    """Every slot empty and equally old (the engine idle): the sequences of the next batch
    take the same slots in the same order as the last batch submitted after this did, and
    so read the same batches. (A sequence's logits move in the last bits with its place in
    a batch and with the batches its cached prefix was read in: bench/README.md.)"""
    engine = host.engine
    assert engine is not None
    with engine._cond:  # an idle engine waits on it, and admits nothing meanwhile
        for slot in engine.slots:
            assert slot.job is None
            llama_cpp.llama_memory_seq_rm(engine.mem, slot.seq_id, -1, -1)
            slot.cache.clear()
            slot.last_used = 0.0


def tokens(host: ModelHost, text: str) -> list[int]:
    return host.llm.tokenize(text.encode(), add_bos=True, special=True)  # type: ignore[no-any-return]


def test_eight_sequences_share_the_batch_each_with_its_own_sampling(host):
    samplings: list[dict[str, object]] = [
        {"temperature": 0},
        {"temperature": 0.7, "seed": 1},
        {"temperature": 1.2, "top_k": 5, "seed": 2},
        {"top_p": 0.5, "min_p": 0.1, "seed": 3},
        {"typical_p": 0.8, "seed": 4},
        {"repeat_penalty": 1.3, "penalty_last_n": 32, "presence_penalty": 0.5, "seed": 5},
        {"frequency_penalty": 1.0, "seed": 6},
        {"mirostat_mode": 2, "mirostat_tau": 4.0, "mirostat_eta": 0.2, "seed": 7},
    ]
    reqs = [
        request(f"Write a list of {i + 3} fruits:", max_tokens=24 + i, **s)
        for i, s in enumerate(samplings)
    ]
    gens, peak = run_together(host, reqs)
    assert peak == SLOTS  # all eight were in the batch at once
    for i, g in enumerate(gens):
        assert g.finish_reason in ("length", "stop")
        assert 0 < g.completion_tokens <= 24 + i
        if g.finish_reason == "length":
            assert g.completion_tokens == 24 + i
        assert g.prompt_tokens == len(tokens(host, f"Write a list of {i + 3} fruits:"))


def test_the_same_seed_gives_the_same_text_and_greedy_alone_is_deterministic(host):
    seeded = request("Once upon a time", max_tokens=24, temperature=0.9, seed=42)
    assert host.generate(seeded).text == host.generate(seeded).text
    greedy = request("The capital of France is", max_tokens=24, temperature=0)
    assert host.generate(greedy).text == host.generate(greedy).text


def test_greedy_output_batched_among_others_starts_as_it_does_alone(host):
    """llama.cpp's kernels are not batch-invariant: a sequence's logits differ in the last
    bits when other sequences share its batch, and a near-tie can then flip a greedy choice
    later on. What holds: the first tokens agree; measured divergence points are printed
    (`pytest -s`) and stated in bench/README.md."""
    prompts = [
        "The capital of France is",
        "Once upon a time",
        "def fibonacci(n):",
        "The best way to learn",
        "Water boils at",
        "In 1492,",
        "My favourite food is",
        "The quick brown fox",
    ]

    def seq(p: str) -> Sequence:
        return Sequence(tokens=tokens(host, p), max_tokens=32, sampling={"temperature": 0})

    alone = [submit_at_once(host, [seq(p)])[0].text for p in prompts]
    batched = [g.text for g in submit_at_once(host, [seq(p) for p in prompts])]
    agree = []
    for a, b in zip(alone, batched, strict=True):
        ta = host.llm.tokenize(a.encode(), add_bos=False)
        tb = host.llm.tokenize(b.encode(), add_bos=False)
        same = next(
            (i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y),
            min(len(ta), len(tb)),
        )
        agree.append(same)
    print(f"\ngreedy tokens agreeing before divergence (of 32), per prompt: {agree}")
    assert all(n >= 1 for n in agree)


def test_cancel_stop_and_max_tokens_mid_batch_leave_the_others_running(host):
    long = [Sequence(tokens=tokens(host, f"Story {i}:"), max_tokens=40) for i in range(3)]
    cancelled = Sequence(tokens=tokens(host, "Tell me a long story."), max_tokens=200)
    stopped = Sequence(
        tokens=tokens(host, "Count: 1, 2, 3,"),
        max_tokens=60,
        sampling={"temperature": 0},
        stops=("7",),
    )
    short = Sequence(tokens=tokens(host, "Hello"), max_tokens=3)
    engine = host.engine
    assert engine is not None
    seqs = [*long, cancelled, stopped, short]
    with engine._cond:
        for s in seqs:
            engine.submit(s)
    # Cancel once it has produced some text, while the others still run.
    while cancelled.events.get(timeout=60)[0] != TEXT:
        pass
    cancelled.cancel()
    results = {}
    for s in seqs:
        while True:
            kind, value = s.events.get(timeout=120)
            if kind == DONE:
                results[id(s)] = value
                break
            assert kind != FAILED, value
    c = results[id(cancelled)]
    assert c.finish_reason == "cancelled" and 0 < c.completion_tokens < 200
    st = results[id(stopped)]
    assert st.finish_reason == "stop" and "7" not in st.text and st.text
    assert results[id(short)].finish_reason == "length"
    assert results[id(short)].completion_tokens == 3
    for s in long:
        g = results[id(s)]
        assert g.finish_reason in ("length", "stop")
        assert g.finish_reason == "stop" or g.completion_tokens == 40


def test_a_chats_second_turn_reuses_the_cached_history(host):
    facts = " ".join(f"Fact {i}: the number {i} follows {i - 1}." for i in range(1, 120))
    history = [{"role": "user", "content": f"Remember these facts. {facts}"}]
    first_req = make_request({"model": MODEL, "messages": history, "max_tokens": 8})
    first = host.generate(first_req)
    assert first.prompt_tokens > 1400
    second_req = make_request(
        {
            "model": MODEL,
            "messages": [
                *history,
                {"role": "assistant", "content": first.text},
                {"role": "user", "content": "What follows 41?"},
            ],
            "max_tokens": 8,
        }
    )
    second = host.generate(second_req)
    assert second.cached_tokens >= first.prompt_tokens - 1
    assert second.cached_tokens < second.prompt_tokens
    assert first.ttft_ms is not None and second.ttft_ms is not None
    print(f"\ncold TTFT {first.ttft_ms:.0f} ms, cached TTFT {second.ttft_ms:.0f} ms")
    assert second.ttft_ms < first.ttft_ms / 3


def test_a_json_schema_reply_parses_and_satisfies_the_schema(host):
    schema = {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["color", "count"],
        "additionalProperties": False,
    }
    req = request(
        "Describe an apple as JSON:",
        max_tokens=60,
        temperature=0.8,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "apple", "schema": schema}},
    )
    g = host.generate(req)
    value = json.loads(g.text)
    assert set(value) == {"color", "count"}
    assert value["color"] in ("red", "green", "blue") and 0 <= value["count"] <= 99


def test_a_json_object_reply_parses(host):
    g = host.generate(
        request(
            "A JSON object:", max_tokens=80, temperature=0, response_format={"type": "json_object"}
        )
    )
    if g.finish_reason == "stop":
        assert isinstance(json.loads(g.text), dict)
    else:  # cut by max_tokens: still a JSON object's beginning
        assert g.text.lstrip().startswith("{")


def test_a_gbnf_grammar_limits_the_reply_while_others_sample_freely(host):
    constrained = request("Is the sky blue?", max_tokens=8, grammar='root ::= "yes" | "no"')
    free = request("Is the sky blue?", max_tokens=8, seed=1)
    (g, f), _ = run_together(host, [constrained, free])
    assert g.text in ("yes", "no") and g.finish_reason == "stop"
    assert f.completion_tokens > 0


def test_a_grammar_llama_cpp_rejects_fails_that_sequence_only(host):
    bad = Sequence(tokens=tokens(host, "Hi"), max_tokens=4, grammar="root ::= [a-")
    ok = Sequence(tokens=tokens(host, "Hi"), max_tokens=4)
    engine = host.engine
    assert engine is not None
    engine.submit(bad)
    engine.submit(ok)
    kind, value = bad.events.get(timeout=60)
    assert kind == FAILED and "grammar" in value
    while (event := ok.events.get(timeout=60))[0] == TEXT:
        pass
    assert event[0] == DONE and event[1].completion_tokens == 4


def marker_prompt(host: ModelHost, marker: str, n: int = 20) -> list[int]:
    """<bos> then `marker` n times: greedy, the model goes on writing the marker."""
    ids = host.llm.tokenize(marker.encode(), add_bos=False, special=True)
    assert len(ids) == 1  # one token, user-defined in this GGUF (like <table>, unlike <bos>)
    attr = llama_cpp.llama_vocab_get_attr(llama_cpp.llama_model_get_vocab(host.llm.model), ids[0])
    assert attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    return host.llm.tokenize(b"", add_bos=True, special=True) + ids * n


def test_the_engine_never_samples_an_image_marker_and_writes_text_instead(host):
    # The base model's first answer once began with a literal <start_of_image>; after 20 of
    # them, greedy, it goes on writing markers unless they are barred from sampling. Hidden
    # from the text they would still cost tokens: an answer of nothing (`farm up --ask`).
    seq = Sequence(
        tokens=marker_prompt(host, "<start_of_image>"), max_tokens=6, sampling={"temperature": 0}
    )
    streamed: list[str] = []
    host.engine.submit(seq)
    while (event := seq.events.get(timeout=60))[0] == TEXT:
        streamed.append(event[1])
    assert event[0] == DONE, event
    g = event[1]
    assert (g.completion_tokens, g.finish_reason) == (6, "length")
    # Text, if only whitespace (what greedy writes here depends on the cache's state): a
    # sampled marker would show as nothing at all.
    assert g.text and "".join(streamed) == g.text and "image>" not in g.text


def test_text_after_an_image_marker_is_kept_without_the_marker(host):
    prompt = host.llm.tokenize(b"<start_of_image><end_of_image>" * 10, add_bos=True, special=True)
    seq = Sequence(tokens=prompt, max_tokens=8, sampling={"temperature": 0})
    [g] = submit_at_once(host, [seq])
    assert g.completion_tokens == 8
    assert "image>" not in g.text and g.text  # no marker; what it writes instead is text


def test_the_markers_barred_from_sampling_are_the_vocabularys_non_text_markers(host):
    from workers.engine.vocab import Vocab

    vocab = Vocab(llama_cpp.llama_model_get_vocab(host.llm.model))
    names = sorted(vocab.name(token) for token in vocab.markers())
    assert names == ["<end_of_image>", "<start_of_image>", "[multimodal]"]


def test_html_tags_in_the_vocabulary_are_still_text(host):
    from workers.engine.vocab import Vocab

    vocab = Vocab(llama_cpp.llama_model_get_vocab(host.llm.model))
    for tag in ("<table>", "</td>", "<img>", "\t\t"):
        [token] = host.llm.tokenize(tag.encode(), add_bos=False, special=True)
        assert vocab.text(token) == tag.encode()
    for hidden in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "[multimodal]"):
        [token] = host.llm.tokenize(hidden.encode(), add_bos=False, special=True)
        assert vocab.text(token) == b"" and vocab.name(token) == hidden


def test_a_prompt_longer_than_the_context_fails_with_the_numbers(host):
    with pytest.raises(JobFailed, match="tokens but model 'gemma3-270m' holds 4096"):
        host.generate(request("word " * 5000, max_tokens=4))


def test_a_full_kv_cache_ends_sequences_and_the_engine_goes_on():
    h = ModelHost(
        ModelSpec(name=MODEL, path=gemma_path(), chat_format="gemma"),
        EngineOptions(slots=4, threads=2, kv_size=256),
    )
    h.load()
    try:
        prompt = "Tell me a very long story about the sea and its ships."
        gens, _ = run_together(h, [request(prompt, max_tokens=150, seed=i) for i in range(4)])
        # 4 x (prompt + 150) tokens cannot fit 256 cells: some sequences end early ...
        assert sum(g.completion_tokens for g in gens) < 4 * 150
        assert all(g.finish_reason in ("length", "stop") for g in gens)
        # A prompt larger than the whole cache fails alone (llama.cpp lowered n_batch to the
        # 256 cells: a larger batch would have aborted the process) ...
        with pytest.raises(JobFailed, match="KV cache .* had no room for the prompt"):
            h.generate(request("word " * 300, max_tokens=4))
        # ... and the engine still serves.
        assert h.engine is not None and h.engine.n_batch == 256
        assert h.generate(request("Hello", max_tokens=4)).completion_tokens == 4
    finally:
        h.close()


def test_n_sequences_share_one_evaluation_of_their_prompt(host):
    engine = host.engine
    prompt = "A long time ago, in a kingdom by the sea, there lived"
    before = engine.prompt_tokens_evaluated
    out = host.generate(request(prompt, n=4, max_tokens=6, temperature=1.0, seed=9))
    evaluated = engine.prompt_tokens_evaluated - before
    assert len(out.choices) == 4 and all(c.completion_tokens > 0 for c in out.choices)
    assert out.prompt_tokens == len(tokens(host, prompt))  # counted once
    assert evaluated == out.prompt_tokens - out.cached_tokens  # read once, not four times
    assert [c.cached_tokens for c in out.choices[1:]] == [out.prompt_tokens] * 3
    assert out.completion_tokens == sum(c.completion_tokens for c in out.choices)


def test_echo_scores_every_prompt_token_after_the_first(host):
    prompt = "Paris is the capital of France"
    out = host.generate(request(prompt, echo=True, logprobs=2, max_tokens=0))
    [choice] = out.choices
    assert choice.text == prompt and choice.completion_tokens == 0
    entries = choice.logprobs
    assert entries is not None and len(entries) == len(tokens(host, prompt)) - 1  # no BOS
    assert entries[0]["logprob"] is None
    assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in entries[1:])


def test_greedy_picks_exactly_the_token_llama_cpps_chain_picks_with_biases_and_ties(host):
    """Greedy without penalties picks by numpy on llama.cpp's logits (the chain would copy
    the whole vocabulary first): the same token as the chain, over real logits, with a bias
    that lowers the best token, one that raises another, a ban, and a tie."""
    import ctypes

    import numpy as np

    from workers.engine.sampling import build_sampler

    engine = host.engine
    assert engine is not None
    vocab, n_vocab = engine.vocab, engine.logprobs.n_vocab
    prompt = tokens(host, "The capital of France is")
    # A context of our own for the logits: the engine's belongs to its thread.
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.no_perf = 256, 256, True
    own = llama_cpp.llama_init_from_model(host.llm.model, params)
    try:
        ids = (llama_cpp.llama_token * len(prompt))(*prompt)  # alive while the batch is used
        batch = llama_cpp.llama_batch_get_one(ids, len(prompt))
        assert llama_cpp.llama_decode(own, batch) == 0
        raw = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(own, -1), shape=(n_vocab,))
        top = [int(t) for t in np.argsort(raw)[::-1][:3]]
        cases = [
            {},
            {str(top[0]): -100},  # the best is banned: the second wins
            {str(top[0]): -5.0, str(top[1]): -5.0},  # lowered, maybe below the third
            {str(top[2]): 3.0},  # a raise
            {str(top[1]): float(raw[top[0]] - raw[top[1]])},  # a tie with the best, maybe
        ]
        for bias in cases:
            fast = build_sampler(
                vocab, {"temperature": 0.0, "logit_bias": bias}, None, engine.tokens.markers()
            )
            chain = build_sampler(
                vocab, {"temperature": 0.0, "logit_bias": bias}, None, engine.tokens.markers()
            )
            chain.greedy = None  # llama.cpp's chain alone
            try:
                assert fast.greedy is not None
                picked = fast.sample(own, -1)
                assert picked == chain.sample(own, -1), bias
                # Narrowed (FARM_DEVICE_SAMPLING=all): among the row's best 1 + biased
                # tokens, as a device's top-k leaves them, or more of them (a chain of
                # NARROW_WIDTH), the same token; a raise needs the whole row.
                k = fast.narrowed
                assert (k == 0) == any(b > 0 for b in bias.values()), bias
                for width in (k, 64) if k else ():
                    best = np.argsort(raw)[::-1][:width].astype(np.intc)
                    assert fast.pick_from(best, raw[best].copy()) == picked, (bias, width)
            finally:
                fast.free()
                chain.free()
    finally:
        llama_cpp.llama_free(own)
    # A NaN (numpy's argmax would take it, llama.cpp's greedy not), or an infinity on a
    # banned marker (NaN once banned): the fast path declines, and the chain picks.
    markers = engine.tokens.markers()
    fast = build_sampler(vocab, {"temperature": 0.0}, None, markers)
    try:
        for poison in (float("nan"), float("inf")):
            row = np.zeros(n_vocab, dtype=np.float32)
            row[markers[0] if poison == float("inf") else 7] = poison
            pointer = row.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            assert fast._argmax(pointer) is None, poison
        row = np.zeros(n_vocab, dtype=np.float32)
        row[42] = 1.0
        assert fast._argmax(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float))) == 42
        # Narrowed candidates with a NaN: the chain picks among them, as over a row.
        ids = np.array([5, 42, markers[0], 9], dtype=np.intc)
        logits = np.array([0.5, float("nan"), 2.0, 1.0], dtype=np.float32)
        assert fast.pick_from(ids, logits) == 9
        # Ties among the best: the least id, as argmax's first; a banned one is out.
        tied = np.array([2.0, 2.0, 1.0], dtype=np.float32)
        assert fast.pick_from(np.array([9, 3, 7], dtype=np.intc), tied) == 3
        assert fast.pick_from(np.array([markers[0], 9, 11], dtype=np.intc), tied) == 9
    finally:
        fast.free()
    penalized = build_sampler(vocab, {"temperature": 0.0, "repeat_penalty": 1.3}, None)
    sampled = build_sampler(vocab, {"temperature": 0.7}, None)
    assert penalized.greedy is None and sampled.greedy is None  # the chain keeps those
    penalized.free()
    sampled.free()


def test_a_top_k_draw_among_the_best_logits_is_the_chains_draw_for_the_same_seed(host):
    """A sampled top-k chain is run on the best top_k (+ biased) tokens by raw logit, not on
    the whole vocabulary: over real logits, with the engine's bans, a ban of the best token,
    lowered ones, top-p/min-p and temperatures, a k past llama.cpp's partial sort (128), and
    over flat rows (most of the vocabulary within the pool's margin of the best, at once or
    once widened: the margin narrows), the same seed draws the same tokens as llama.cpp's
    chain over everything.
    Positive biases, penalties, mirostat and top_k=0 keep the chain. (Exactly equal logits
    may be ordered otherwise, and draw another of the tied tokens: none here.)"""
    import ctypes

    import numpy as np

    from workers.engine.sampling import build_sampler

    engine = host.engine
    assert engine is not None
    vocab, n_vocab = engine.vocab, engine.logprobs.n_vocab
    markers = engine.tokens.markers()
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.no_perf = 256, 256, True
    own = llama_cpp.llama_init_from_model(host.llm.model, params)  # the engine's is its thread's
    try:
        rows = []
        for text in ("The capital of France is", "Once upon a time, in a small"):
            prompt = tokens(host, text)
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(own), True)
            ids = (llama_cpp.llama_token * len(prompt))(*prompt)
            assert llama_cpp.llama_decode(own, llama_cpp.llama_batch_get_one(ids, len(prompt))) == 0
            raw = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(own, -1), shape=(n_vocab,))
            rows.append(raw.copy())
        # A flat row, as a model with random weights gives: every logit within TOP_MARGIN.
        rng = np.random.default_rng(0)
        rows.append((rng.standard_normal(n_vocab) * 0.7).astype(np.float32))
        # One whose margin, halved once too often, lets fewer than 40 pass: 30 tokens within
        # 0.3 of the best, 200,000 between 0.6 and 1.0 below it, the rest 5 below.
        stair = np.full(n_vocab, -5.0, dtype=np.float32)
        stair[:30] = -0.01 * np.arange(30)
        stair[30:200_030] = -0.6 - 0.4 * np.arange(200_000) / 200_000  # no two equal
        rows.append(stair)
        # A peaked row with a flat remainder: 11 tokens within 5 of the best, every other one
        # between 12 and 30 below it (the margin widens past 8, then narrows again).
        peak = np.empty(n_vocab, dtype=np.float32)
        peak[:11] = -0.5 * np.arange(11)
        peak[11:] = -12.0 - 18.0 * np.arange(n_vocab - 11) / (n_vocab - 11)
        rows.append(peak)
        for raw in rows:
            top = [int(t) for t in np.argsort(raw)[::-1][:3]]
            cases = [
                {"temperature": 0.8, "seed": 3},
                {"temperature": 1.5, "seed": 4, "top_k": 100, "top_p": 1.0, "min_p": 0.0},
                {"temperature": 0.8, "seed": 5, "logit_bias": {str(top[0]): -100}},
                {"temperature": 1.0, "seed": 6, "logit_bias": {str(top[1]): -2.0}, "top_k": 5},
                # top-k's edge itself: the best lowered below others, no top-p or min-p cut
                {"temperature": 2.0, "seed": 7, "logit_bias": {str(top[0]): -30.0}, "top_k": 60,
                 "top_p": 1.0, "min_p": 0.0},
                {"temperature": 2.0, "seed": 8, "top_k": 300, "top_p": 1.0, "min_p": 0.0},
            ]  # fmt: skip
            pointer = raw.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            for fields in cases:
                pool = build_sampler(vocab, fields, None, markers)
                chain = build_sampler(vocab, fields, None, markers)
                chain.top_pool = 0  # llama.cpp's chain over the whole vocabulary
                try:
                    assert pool.top_pool >= int(fields.get("top_k", 40))
                    fast = [pool._pick_top(pointer) for _ in range(200)]
                    assert None not in fast
                    slow = [chain._pick_among(None, raw, with_grammar=False) for _ in range(200)]
                    assert fast == slow, fields
                    assert len(set(fast)) > 1 or fields.get("top_k") == 5  # it does sample
                    banned = [int(t) for t, b in fields.get("logit_bias", {}).items() if b <= -100]
                    assert not set(fast) & (set(banned) | set(markers))
                finally:
                    pool.free()
                    chain.free()
        # Through Sampler.sample, on the context's last logits: the pool's picks, accepted,
        # are those of llama_sampler_sample over the whole vocabulary.
        fields = {"temperature": 1.2, "seed": 9, "top_p": 1.0, "min_p": 0.0}
        pool = build_sampler(vocab, fields, None, markers)
        chain = build_sampler(vocab, fields, None, markers)
        chain.top_pool = 0
        try:
            picks = [pool.sample(own, -1) for _ in range(100)]
            assert picks == [chain.sample(own, -1) for _ in range(100)]
            assert len(set(picks)) > 1
        finally:
            pool.free()
            chain.free()
    finally:
        llama_cpp.llama_free(own)
    for fields in (
        {"temperature": 0.8, "logit_bias": {"42": 1.0}},  # a raise: the pool may miss it
        {"temperature": 0.8, "repeat_penalty": 1.2},
        {"temperature": 0.8, "mirostat_mode": 2},
        {"temperature": 0.8, "top_k": 0},
        {"temperature": 0.0},
    ):
        kept = build_sampler(vocab, fields, None, markers)
        assert kept.top_pool == 0, fields
        kept.free()
    # Logits with no finite best, or too few near it: the chain draws instead.
    pool = build_sampler(vocab, {"temperature": 0.8}, None, markers)
    try:
        row = np.full(n_vocab, -1000.0, dtype=np.float32)
        row[:3] = 0.0
        assert pool._pick_top(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float))) is None
        row[:] = float("nan")
        assert pool._pick_top(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float))) is None
        # Every logit equal: the narrowing ends (after NARROWINGS) and a token is drawn.
        row[:] = 0.0
        assert pool._pick_top(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float))) is not None
    finally:
        pool.free()


def test_greedy_picked_on_the_device_is_the_hosts_pick_token_for_token(host, monkeypatch):
    """With device sampling (llama.cpp's backend sampling, off by default; for a model
    wholly on a GPU), a greedy sequence picks each token inside the step: the same text as
    picked on the host, with and without a ban. Every slot gets its chain once: none is
    attached or taken back as sequences come and go (each would make llama.cpp reserve the
    step's graph again)."""
    engine = host.engine
    assert engine is not None
    prompt = tokens(host, "Count: 1, 2, 3,")
    attached = engine.chains_attached

    def run(on: bool, grammar: str | None = None, **sampling: object) -> tuple[Generation, int]:
        monkeypatch.setattr(engine, "device_sampling", on)
        before = engine.tokens_picked_on_device
        seq = Sequence(
            tokens=prompt, max_tokens=24, sampling=sampling, draft_max=0, grammar=grammar
        )
        [gen] = submit_at_once(host, [seq])
        return gen, engine.tokens_picked_on_device - before

    seeded = {"temperature": 0.9, "seed": 5}
    # Sequences the host picks for through its whole chain (penalties) or a grammar: beside
    # the chains they must not take the token the device's greedy chain picked for their row.
    penalized = {"temperature": 0.7, "seed": 3, "repeat_penalty": 1.3}
    numbers = 'root ::= [0-9]+ (", " [0-9]+)*'
    greedy = {"temperature": 0}
    picked_kinds = [({}, penalized), ({"grammar": numbers}, seeded), ({"grammar": numbers}, greedy)]
    # First the prompt into a slot's cache: every run after it evaluates its last token
    # alone (greedy text may change with the batch's shape: bench/README.md).
    run(False, temperature=0)
    host_gen, none = run(False, temperature=0)
    second = host.llm.tokenize(host_gen.text.encode(), add_bos=False, special=False)[1]
    ban = {"temperature": 0, "logit_bias": {str(second): -100}}
    raised = {"temperature": 0, "logit_bias": {str(second): 5}}
    host_ban, host_raised, host_seeded = (run(False, **x)[0] for x in (ban, raised, seeded))
    host_kinds = [run(False, **g, **x)[0].text for g, x in picked_kinds]
    assert none == 0 and host_gen.finish_reason == "length"
    assert host_ban.text != host_gen.text

    device_gen, picked = run(True, temperature=0)
    assert device_gen.text == host_gen.text
    assert picked == 24  # every token, the first (from the prompt's last position) too
    # A ban (a logit bias that lowers) stays off the device: where the device's pick is a
    # banned token, the host picks again from the raw logits, as it would have.
    device_ban, picked = run(True, **ban)
    assert device_ban.text == host_ban.text
    assert 0 < picked < device_ban.completion_tokens  # the banned token's step: the host
    # A bias that raises a token: the host picks, from the raw logits the chain leaves.
    device_raised, picked = run(True, **raised)
    assert device_raised.text == host_raised.text and picked == 0
    # A sampled sequence beside the chains: drawn on the host from those raw logits, as
    # without them (its seed repeats its text).
    assert run(True, **seeded)[0].text == host_seeded.text
    assert [run(True, **g, **x)[0].text for g, x in picked_kinds] == host_kinds
    assert host_kinds[0] != host_gen.text  # not greedy: the device's pick would show
    assert all(s.device_chain for s in engine.slots)  # kept as each sequence ended
    assert engine.chains_attached == attached + len(engine.slots)  # one a slot, once
    # A backend that cannot run the chain picks no token (-1) though it took the chain:
    # the host picks from the chain instead, and the engine stops asking the device.
    monkeypatch.setattr(llama_cpp, "llama_get_sampled_token_ith", lambda ctx, i: -1)
    fallen, picked = run(True, temperature=0)
    assert fallen.text == host_gen.text and picked == 0
    assert engine.device_sampling is False
    assert not any(s.device_chain for s in engine.slots)  # all taken back


def test_top_k_draws_narrowed_on_the_device_are_the_hosts_draws_for_the_same_seed(
    host, monkeypatch
):
    """With FARM_DEVICE_SAMPLING=all a sampled sequence whose chain starts with top-k has
    each row narrowed inside the step to its top_pool best tokens (top_k and the biased
    ones), a greedy one to its best and its biased ones: only their ids and logits come
    back, and the host picks among them with the sequence's own chain. So a seed gives the
    host's text token for token (with a ban, typical-p, min-p 1 too), greedy gives the
    host's (with a ban; a raising bias stays on the host), top_k=1 is the greedy text, and
    unseeded draws differ."""
    engine = host.engine
    assert engine is not None
    prompt = tokens(host, "Write one line about rivers:")
    bans = len(engine.tokens.markers())  # the engine bans the non-text markers

    def run(on: bool, **sampling: object) -> tuple[Generation, int]:
        """Picked on the host, or narrowed on the device (FARM_DEVICE_SAMPLING=all)."""
        monkeypatch.setattr(engine, "device_sampling", on)
        monkeypatch.setattr(engine, "device_draws", on)
        return run_greedy_only(**sampling)

    def run_greedy_only(**sampling: object) -> tuple[Generation, int]:
        """As the engine's switches stand (greedy unless `sampling` says otherwise)."""
        before = engine.tokens_picked_on_device
        seq = Sequence(
            tokens=prompt, max_tokens=16, sampling=sampling or {"temperature": 0}, draft_max=0
        )
        [gen] = submit_at_once(host, [seq])
        return gen, engine.tokens_picked_on_device - before

    run(False, temperature=0)  # the prompt into a slot's cache: the runs below read alike
    greedy, _ = run(False, temperature=0)
    wide = {"temperature": 1.5, "top_k": 5, "seed": 11}
    greedy_tokens = host.llm.tokenize(greedy.text.encode(), add_bos=False, special=False)
    settings: list[dict[str, object]] = [
        {"temperature": 0.8, "seed": 3},  # farm's default chain
        wide,
        {**wide, "logit_bias": {str(greedy_tokens[1]): -100}},
        {"temperature": 0.9, "typical_p": 0.9, "seed": 4},
        {"temperature": 0.8, "min_p": 1.0, "seed": 5},
        # greedy: narrowed to its best and its bans; a ban of the text's second token
        {"temperature": 0},
        {"temperature": 0, "logit_bias": {str(greedy_tokens[1]): -100}},
        {"temperature": 0, "logit_bias": {str(greedy_tokens[1]): -2.5, str(greedy_tokens[2]): -1}},
    ]
    on_host = [run(False, **x)[0] for x in settings]
    wider = {"temperature": 0.8, "top_k": 100, "seed": 8}  # a pool over NARROW_WIDTH
    host_wider, _ = run(False, **wider)
    seen: list[tuple[int, int]] = []  # candidates a pick found, and the k asked
    count = llama_cpp.llama_get_sampled_candidates_count_ith

    def spy(ctx: object, index: int) -> int:
        n = int(count(ctx, index))
        seen.append((n, engine.slots[engine.batch.seq[index]].chain_key))
        return n

    monkeypatch.setattr(llama_cpp, "llama_get_sampled_candidates_count_ith", spy)
    for x, host_gen in zip(settings, on_host, strict=True):
        device_gen, picked = run(True, **x)
        assert device_gen.text == host_gen.text, x
        assert picked == device_gen.completion_tokens  # every token, the first too
    # Each pick found exactly the candidates its chain asked: one width for every setting
    # above (pools of 4 to 43 tokens), so greedy and draws share their slots' chains.
    assert {k for _, k in seen} == {engine_module.NARROW_WIDTH}
    assert all(n == k for n, k in seen)
    assert on_host[1].text != on_host[2].text  # the ban changed the draw
    assert on_host[5].text == greedy.text != on_host[6].text
    # A bias that raises a token: greedy's pick may lie anywhere in the row, so its slot has
    # the greedy chain (the raw row) and the host picks.
    raised = {"temperature": 0, "logit_bias": {str(greedy_tokens[1]): 5}}
    host_raised, _ = run(False, **raised)
    device_raised, picked = run(True, **raised)
    assert device_raised.text == host_raised.text and picked == 0
    one, picked = run(True, temperature=0.8, top_k=1)
    assert one.text == greedy.text and picked == one.completion_tokens
    # A pool over NARROW_WIDTH (top_k 100 and the bans) widens its slot's chain to it once;
    # draws that need fewer keep that chain: nothing attached.
    attached = engine.chains_attached
    device_wider, picked = run(True, **wider)
    assert device_wider.text == host_wider.text and picked == device_wider.completion_tokens
    assert seen[-1] == (100 + bans, 100 + bans)
    texts = {run(True, temperature=1.5, top_k=5)[0].text for _ in range(2)}
    assert len(texts) == 2  # 2 x 16 draws among 5 at temperature 1.5: not the same twice
    assert engine.chains_attached == attached + 1  # widened once, then kept
    assert seen[-1] == (100 + bans, 100 + bans)
    # A chain over WIDEST_KEPT times the width a sequence needs goes back to NARROW_WIDTH.
    run(True, temperature=0.8, top_k=300, seed=1)
    assert engine.chains_attached == attached + 2 and seen[-1] == (300 + bans, 300 + bans)
    assert run(True, **settings[0])[0].text == on_host[0].text
    assert engine.chains_attached == attached + 3
    assert seen[-1] == (engine_module.NARROW_WIDTH, engine_module.NARROW_WIDTH)

    # A backend that took the chain but could not run its top-k (llama.cpp runs a chain's
    # steps there up to the first the device lacks; typical-p has none) leaves the whole
    # row and no candidates: the host draws from the row, the same text, and the engine
    # narrows no rows from then on; greedy still picks on the device (its argmax chain).
    def unrun(k: int) -> object:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_typical(0.9, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(k))
        return chain

    fewer = {"temperature": 0.8, "top_k": 30, "seed": 3}
    host_fewer, _ = run(False, **fewer)
    monkeypatch.setattr(engine_module, "top_k_chain", unrun)
    fallen, picked = run(True, **fewer)
    assert fallen.text == host_fewer.text and picked == 0
    assert engine.device_sampling is True and engine.device_draws is False
    greedy_after, picked = run_greedy_only()
    assert greedy_after.text == greedy.text and picked == greedy_after.completion_tokens
    monkeypatch.setattr(engine_module, "top_k_chain", sampling_module.top_k_chain)
    # A prompt others share (a request's n > 1): each draws its first token among the
    # candidates of the leader's last position, so the leader's slot keeps its top-k chain
    # (a chain wide enough for them all; the replies are the host's: the test below).
    engine.device_draws = True  # as a restarted worker's
    run(True, **wide)  # the prompt's slot now holds a top-k chain
    [lead_slot] = [s for s in engine.slots if s.cache[: len(prompt)] == prompt]
    assert lead_slot.chain_key == engine_module.NARROW_WIDTH
    at_share: list[object] = []
    attached_to: list[int] = []
    share, attach = engine_module.Engine._share, engine_module.Engine._attach

    def spy_share(self: object, leader: object, slot: object) -> None:
        at_share.append(leader.chain_key)  # type: ignore[attr-defined]
        share(self, leader, slot)  # type: ignore[arg-type]

    def spy_attach(self: object, slot: object, key: object) -> bool:
        attached_to.append(slot.seq_id)  # type: ignore[attr-defined]
        return attach(self, slot, key)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module.Engine, "_share", spy_share)
    monkeypatch.setattr(engine_module.Engine, "_attach", spy_attach)
    lead = Sequence(tokens=prompt, max_tokens=8, sampling=wide, draft_max=0)
    others = [
        Sequence(tokens=prompt, max_tokens=8, sampling=wide, draft_max=0, leader=lead)
        for _ in range(2)
    ]
    before = engine.tokens_picked_on_device
    shared = submit_at_once(host, [lead, *others])
    assert at_share == [engine_module.NARROW_WIDTH] * 2
    assert lead_slot.seq_id not in attached_to
    assert all(g.completion_tokens == 8 and g.cached_tokens > 0 for g in shared[1:])
    picked = sum(g.completion_tokens for g in shared)  # and an end of turn each, at most
    assert picked <= engine.tokens_picked_on_device - before <= picked + 3


def test_device_greedy_verifies_drafts_and_leaves_logprobs_and_sampled_chains_to_the_host(
    host, monkeypatch
):
    """A greedy sequence that drafts picks on the device at each drafted position (several
    outputs a step for its seq_id): the host's text. Beside greedy ones, a sequence that
    wants logprobs and a sampled one pick on the host from the raw logits the greedy chains
    leave; every sequence ends as asked, and no chain is attached or taken back meanwhile."""
    engine = host.engine
    assert engine is not None
    repeats = tokens(host, "a b c d e f g a b c d e f g a b c d e f g a b c")
    alone = Sequence(tokens=repeats, max_tokens=16, sampling={"temperature": 0})
    [on_host] = submit_at_once(host, [alone])
    monkeypatch.setattr(engine, "device_sampling", True)
    before = engine.tokens_picked_on_device, engine.tokens_drafted, engine.tokens_accepted
    alone = Sequence(tokens=repeats, max_tokens=16, sampling={"temperature": 0})
    [drafted] = submit_at_once(host, [alone])
    assert drafted.text == on_host.text and drafted.completion_tokens == 16
    assert engine.tokens_drafted > before[1] and engine.tokens_accepted > before[2]
    # each token, the drafted ones kept among them, was the device's pick
    assert engine.tokens_picked_on_device - before[0] >= 16

    def mixed() -> list[Generation]:
        """Five greedy sequences, one that wants logprobs and a sampled one, together."""
        greedy = [
            Sequence(tokens=tokens(host, f"Count to {i + 20}: 1, 2,"), max_tokens=20)
            for i in range(5)
        ]
        for seq in greedy:
            seq.sampling = {"temperature": 0}
        scored = Sequence(
            tokens=tokens(host, "Count: 1, 2,"),
            max_tokens=20,
            sampling={"temperature": 0},
            logprobs=1,
        )
        sampled = Sequence(
            tokens=tokens(host, "Count: 1, 2,"), max_tokens=20, sampling={"temperature": 0.8}
        )
        return submit_at_once(host, [*greedy, scored, sampled])

    monkeypatch.setattr(engine, "device_sampling", False)
    mixed()  # their prompts into the cache: the two runs below read the same batches
    on_host = mixed()
    monkeypatch.setattr(engine, "device_sampling", True)
    attached, before_picks = engine.chains_attached, engine.tokens_picked_on_device
    gens = mixed()
    for gen in gens:
        assert gen.finish_reason in ("length", "stop")
        assert gen.finish_reason == "stop" or gen.completion_tokens == 20
    # The logprobs, read from the rows the greedy chains leave: the host's, as without them.
    assert gens[5].text == on_host[5].text
    assert gens[5].logprobs is not None and on_host[5].logprobs is not None
    assert len(gens[5].logprobs) == gens[5].completion_tokens == on_host[5].completion_tokens
    for device_entry, host_entry in zip(gens[5].logprobs, on_host[5].logprobs, strict=True):
        assert device_entry["token"] == host_entry["token"]
        assert device_entry["logprob"] == pytest.approx(host_entry["logprob"], abs=1e-3)
    on_device = engine.tokens_picked_on_device - before_picks
    # the greedy five's tokens (an end of turn picked there is not a completion token)
    assert sum(g.completion_tokens for g in gens[:5]) <= on_device <= 5 * 21
    assert engine.chains_attached == attached + len(engine.slots)  # the first step's alone


def test_narrowed_draws_beside_shared_prompts_logprobs_and_echo_give_the_hosts_replies(
    host, monkeypatch
):
    """With FARM_DEVICE_SAMPLING=all, one batch of seeded sequences: a request of n=3 (its
    leader's prompt shared), one that wants logprobs, one that echoes its prompt's, and
    three plain draws. Those that need whole rows get them (greedy chains), the rest are
    narrowed, the followers' first draws among their leader's candidates: every reply,
    logprob and prompt logprob is the host's."""
    engine = host.engine
    assert engine is not None
    prompt = tokens(host, "Write one line about rivers:")

    def batch(on: bool) -> list[Generation]:
        monkeypatch.setattr(engine, "device_sampling", on)
        monkeypatch.setattr(engine, "device_draws", on)
        fresh_slots(host)
        wide = {"temperature": 1.0, "top_k": 20}
        lead = Sequence(tokens=prompt, max_tokens=10, sampling={**wide, "seed": 5}, draft_max=0)
        followers = [
            Sequence(
                tokens=prompt,
                max_tokens=10,
                sampling={**wide, "seed": 6 + i},
                draft_max=0,
                leader=lead,
            )
            for i in range(2)
        ]
        scored = Sequence(
            tokens=tokens(host, "Count: 1, 2,"),
            max_tokens=10,
            sampling={"temperature": 0.9, "seed": 9},
            logprobs=2,
        )
        echo = Sequence(
            tokens=tokens(host, "Echo this please"),
            max_tokens=5,
            sampling={"temperature": 0.9, "seed": 10},
            logprobs=1,
            prompt_logprobs=True,
        )
        draws = [
            Sequence(
                tokens=tokens(host, f"Story {i} of a fox:"),
                max_tokens=12,
                sampling={"temperature": 0.9, "seed": 100 + i},
                draft_max=0,
            )
            for i in range(3)
        ]
        return submit_at_once(host, [lead, *followers, scored, echo, *draws])

    on_host = batch(False)
    before = engine.tokens_picked_on_device
    on_device = batch(True)
    assert [g.text for g in on_device] == [g.text for g in on_host]
    assert len({g.text for g in on_host[:3]}) == 3  # the n=3 request's own draws
    for device_gen, host_gen in zip(on_device[3:5], on_host[3:5], strict=True):
        assert device_gen.logprobs is not None and host_gen.logprobs is not None
        assert [e["token"] for e in device_gen.logprobs] == [e["token"] for e in host_gen.logprobs]
    device_prompt, host_prompt = on_device[4].prompt_logprobs, on_host[4].prompt_logprobs
    assert device_prompt is not None and host_prompt is not None
    assert [e["logprob"] for e in device_prompt] == pytest.approx(
        [e["logprob"] for e in host_prompt], abs=1e-3
    )
    # narrowed: every token of the n=3 request (the followers' first among the leader's
    # candidates) and of the three draws, and an end of turn each at most
    narrowed = engine.tokens_picked_on_device - before
    plain = sum(g.completion_tokens for g in [*on_device[:3], *on_device[5:]])
    assert plain <= narrowed <= plain + 6


def test_followers_draw_among_their_leaders_candidates_as_on_the_host(host, monkeypatch):
    """With FARM_DEVICE_SAMPLING=all, the sequences of requests of n > 1 draw their first
    tokens from their leader's last prompt row: narrowed wide enough for each (a follower
    with a wider top_k widens it), or raw where a follower wants logprobs, and read where
    the leader ended at its first token. Their picks made on the sampling threads read raw
    rows only. Every reply is the host's."""
    engine = host.engine
    assert engine is not None
    monkeypatch.setattr(engine_module, "SAMPLE_APART", 2)  # the step's host picks on threads
    at_share: list[object] = []
    share = engine_module.Engine._share

    def spy_share(self: object, leader: object, slot: object) -> None:
        at_share.append(leader.chain_key)  # type: ignore[attr-defined]
        share(self, leader, slot)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module.Engine, "_share", spy_share)

    def batch(on: bool) -> list[Generation]:
        monkeypatch.setattr(engine, "device_sampling", on)
        monkeypatch.setattr(engine, "device_draws", on)
        fresh_slots(host)
        at_share.clear()

        def request(text: str, *samplings: dict[str, object], **fields: object) -> list[Sequence]:
            prompt = tokens(host, text)
            lead = Sequence(tokens=prompt, sampling=samplings[0], draft_max=0, **fields)  # type: ignore[arg-type]
            return (
                [lead]
                + [
                    Sequence(tokens=prompt, sampling=x, draft_max=0, leader=lead, **fields)  # type: ignore[arg-type]
                    for x in samplings[1:]
                ]
            )

        draw = {"temperature": 1.0, "top_k": 20}
        ended = request(  # the leader ends at its first token; two read its row after
            "A list of birds:", *({**draw, "seed": i} for i in (1, 2, 3)), max_tokens=6
        )
        ended[0].max_tokens = 1
        wider = request(  # a follower's top_k 100 widens its leader's chain
            "A list of fish:", {**draw, "seed": 4}, {**draw, "top_k": 100, "seed": 5}, max_tokens=6
        )
        scored = request("A list of trees:", {**draw, "seed": 6}, {**draw, "seed": 7}, max_tokens=6)
        scored[1].logprobs = 1  # it wants logprobs: its leader's row stays raw
        plain = Sequence(
            tokens=tokens(host, "A list of stars:"),
            max_tokens=6,
            sampling={"temperature": 0.9, "seed": 8},
            draft_max=0,
            logprobs=1,  # picked on the host, on a thread, beside them
        )
        return submit_at_once(host, [*ended, *wider, *scored, plain])

    on_host = batch(False)
    assert at_share == [None] * 4
    on_device = batch(True)
    assert [g.text for g in on_device] == [g.text for g in on_host]
    assert on_device[0].completion_tokens == 1 and on_device[1].completion_tokens > 1
    bans = len(engine.tokens.markers())
    width = engine_module.NARROW_WIDTH
    assert sorted(map(str, at_share)) == sorted(map(str, [width, width, 100 + bans, None]))


def test_device_draws_keep_their_chains_and_check_drafts_on_the_narrowed_rows(host, monkeypatch):
    """With FARM_DEVICE_SAMPLING=all, six sampled sequences of one setting, drafts allowed,
    keep their slots' top-k chains as they come and go: six more attach nothing (each
    attach: a reserve of the step's graph). A seeded draw and a greedy sequence that draft
    pick at each drafted position among its narrowed candidates: the host's text, drafts
    kept as on the host."""
    engine = host.engine
    assert engine is not None
    monkeypatch.setattr(engine, "device_sampling", True)
    monkeypatch.setattr(engine, "device_draws", True)

    def six() -> list[Generation]:
        seqs = [
            Sequence(
                tokens=tokens(host, f"Tell story {i} about a fox:"),
                max_tokens=6 + 3 * i,  # they end one after another
                sampling={"temperature": 0.8},
            )
            for i in range(6)
        ]
        return submit_at_once(host, seqs)

    six()
    attached, picked = engine.chains_attached, engine.tokens_picked_on_device
    gens = six()
    assert engine.chains_attached == attached
    assert engine.tokens_picked_on_device - picked == sum(g.completion_tokens for g in gens)
    assert sum(g.finish_reason == "length" for g in gens) >= 3

    repeats = tokens(host, "a b c d e f g a b c d e f g a b c d e f g a b c")

    def copy(on: bool, **sampling: object) -> Generation:
        monkeypatch.setattr(engine, "device_sampling", on)
        seq = Sequence(tokens=repeats, max_tokens=16, sampling=sampling)
        [gen] = submit_at_once(host, [seq])
        return gen

    for sampling in ({"temperature": 0.3, "seed": 9}, {"temperature": 0}):  # drawn, greedy
        copy(False, **sampling)  # the prompt into a slot's cache
        on_host = copy(False, **sampling)
        drafted, picked = engine.tokens_drafted, engine.tokens_picked_on_device
        on_device = copy(True, **sampling)
        assert on_device.text == on_host.text, sampling
        assert on_device.drafted_kept == on_host.drafted_kept > 0
        assert engine.tokens_drafted > drafted
        assert engine.tokens_picked_on_device - picked >= on_device.completion_tokens


def test_events_put_after_an_asynchronous_llama_decode_give_the_same_streams(host, monkeypatch):
    """On a GPU llama_decode returns once the step is queued, and the engine puts the last
    step's events after it (async_decode): every piece still arrives, in order, and the
    replies are those of the CPU order (events put before llama_decode)."""
    engine = host.engine
    assert engine is not None and engine.async_decode is False  # CPU: before llama_decode
    waiting: list[int] = []  # events not yet put when each llama_decode starts
    decode = llama_cpp.llama_decode

    def recorded(ctx: object, batch: object) -> int:
        waiting.append(len(engine._outbox))
        return decode(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recorded)

    def streamed() -> list[tuple[str, str]]:
        seqs = [
            Sequence(
                tokens=tokens(host, f"Count from {i} to {i + 20}:"),
                max_tokens=40,
                sampling={"temperature": 0},
                draft_max=0,
            )
            for i in range(4)
        ]
        with engine._cond:  # admitted in one step
            engine.submit_all(seqs)
        out = []
        for seq in seqs:
            pieces = []
            while (event := seq.events.get(timeout=120))[0] == TEXT:
                pieces.append(event[1])
            kind, gen = event
            assert kind == DONE, gen
            out.append(("".join(pieces), gen.text))
        return out

    streamed()  # the prompts into the slots' caches, so that both runs read the same batches
    del waiting[:]
    before = streamed()
    assert waiting and not any(waiting)  # put before each llama_decode
    engine.async_decode = True
    del waiting[:]
    try:
        after = streamed()
    finally:
        engine.async_decode = False
    assert sum(n > 0 for n in waiting) >= 30  # most steps' events were put after it
    assert all(text for text, _ in after)
    assert all(joined == text for joined, text in after)  # every piece, in order
    assert after == before


def test_sequences_sampled_on_the_sampling_threads_get_the_tokens_the_engine_thread_picks(
    host, monkeypatch
):
    """With SAMPLE_APART or more sequences a step (8 here), each one's next token is picked
    on the sampling threads (the engine's threads: 2 here). Every kind of chain, seeded,
    gives the same replies as when the engine thread picks them all, in the same batches."""
    monkeypatch.setattr(engine_module, "SAMPLE_APART", 8)
    engine = host.engine
    assert engine is not None and engine.sampling_threads == 2 and engine._sampling is not None
    samplings: list[dict[str, object]] = [
        {"temperature": 0},
        {"temperature": 0.9, "seed": 11},
        {"temperature": 1.1, "top_k": 8, "top_p": 0.9, "seed": 12},
        {"repeat_penalty": 1.3, "presence_penalty": 0.4, "seed": 13},
        {"mirostat_mode": 2, "seed": 14},
        {"temperature": 0.7, "seed": 15, "logit_bias": {1: -100}},
        {"temperature": 0.8, "seed": 16},
        {"temperature": 0},
    ]
    grammar = 'root ::= ("yes" | "no") " " [a-z ]{1,30}'

    def replies() -> list[tuple[str, str]]:
        seqs = [
            Sequence(
                tokens=tokens(host, f"Question {i}: name a colour and a fruit."),
                max_tokens=20,
                sampling=s,
                grammar=grammar if i == 6 else None,
                logprobs=2 if i == 7 else None,
                draft_max=0,
            )
            for i, s in enumerate(samplings)
        ]
        return [(g.text, g.finish_reason) for g in submit_at_once(host, seqs)]

    replies()  # the prompts into the slots' caches: the runs compared below read the same
    # batches (llama.cpp's logits vary a little with how a batch is made up)
    picked = engine.tokens_picked_apart
    apart = replies()
    assert engine.tokens_picked_apart - picked >= 8 * 10  # most steps had 8 apart
    pool, engine._sampling = engine._sampling, None  # the engine thread picks every token
    try:
        picked = engine.tokens_picked_apart
        together = replies()
        assert engine.tokens_picked_apart == picked
    finally:
        engine._sampling = pool
    assert apart == together
    assert all(text for text, _ in apart)
    assert apart[6][0].split(" ")[0] in ("yes", "no")  # the grammar held on its thread


def test_a_sequence_nobody_streams_gets_only_its_end_with_the_streamed_text_and_logprobs(host):
    """Unstreamed (a job nobody streams), a sequence's reader is woken once, at its end:
    no text or logprobs events. Its Generation is the streamed one's: the same text, cut
    at the same stop string, and the same logprobs."""
    engine = host.engine
    assert engine is not None

    def run(streamed: bool) -> list[tuple[list[str], Generation]]:
        seqs = [
            Sequence(
                tokens=tokens(host, prompt),
                max_tokens=30,
                sampling={"temperature": 0},
                stops=stops,
                logprobs=logprobs,
                draft_max=0,
                streamed=streamed,
            )
            for prompt, stops, logprobs in [
                ("Count from 1 to 30: 1, 2,", (" 9,",), None),
                ("The capital of France is", (), 2),
            ]
        ]
        out = []
        for seq in seqs:  # one at a time: greedy text alone is deterministic
            engine.submit(seq)
            kinds = []
            while (event := seq.events.get(timeout=120))[0] not in (DONE, FAILED):
                kinds.append(event[0])
            assert event[0] == DONE, event
            out.append((kinds, event[1]))
        return out

    streamed, quiet = run(True), run(False)
    assert streamed[0][0] and set(streamed[1][0]) == {TEXT, LOGPROBS}  # the streamed events
    assert [kinds for kinds, _ in quiet] == [[], []]  # none: only the end
    for (_, loud), (_, silent) in zip(streamed, quiet, strict=True):
        assert silent.text == loud.text and silent.finish_reason == loud.finish_reason
        assert silent.completion_tokens == loud.completion_tokens
        assert silent.logprobs == loud.logprobs
    assert quiet[0][1].finish_reason == "stop" and quiet[0][1].text.endswith("8,")
    assert quiet[1][1].logprobs and len(quiet[1][1].logprobs) == quiet[1][1].completion_tokens
