"""One sampler chain per sequence, built from a request's sampling fields, and grammars.

The chain follows llama-cpp-python's own order (penalties, then greedy at temperature 0,
mirostat, or top-k / typical / top-p / min-p / temperature / dist), with its defaults, so
a request samples as it did on `Llama.generate`.

A grammar is kept out of the chain: on Gemma's 262k vocabulary a grammar sampler applied
to every candidate costs about 50 ms a token. As llama.cpp's common sampler does, the
chain picks a token first, the grammar checks that one token, and only when the grammar
rejects it are the candidates filtered by the grammar and the chain run again.
"""

from __future__ import annotations

import ctypes
import functools
import math
import random
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

DEFAULTS: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "typical_p": 1.0,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "penalty_last_n": 64,
    "mirostat_mode": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.1,
}

# Which tokens a grammar filters first when it refused the chain's pick: those whose logit
# is within GRAMMAR_MARGIN of the best, at most GRAMMAR_FIRST of them.
GRAMMAR_MARGIN = 12.0
GRAMMAR_FIRST = 512
# A sampled chain that starts with top-k draws from the best logits only: its pick is made
# among the best top_k + (tokens with a bias) by raw logit, found by a threshold TOP_MARGIN
# below the best (widened until enough pass), not among all of the vocabulary. At most
# TOP_POOL of them; a larger pool goes to the chain.
TOP_MARGIN = 8.0
TOP_POOL = 1024
# A row whose strided sample (every FLAT_STRIDE-th logit) puts more than FLAT_ROW tokens
# within the margin of the best is flat: the margin narrows, in NARROWINGS counts at most.
FLAT_STRIDE = 256
FLAT_ROW = 8192
NARROWINGS = 12
_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


def logits_view(logits: Any, n_vocab: int) -> np.ndarray:
    """The `n_vocab` floats at llama.cpp's logits pointer, as numpy's (not copied). A third
    of np.ctypeslib.as_array's time on a pointer (1.6 against 5.5 us), once a sequence a
    step."""
    return np.frombuffer(_array(ctypes.c_float, n_vocab).from_address(_at(logits)), np.single)


def candidates_view(ids: Any, logits: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The `n` token ids and logits at llama.cpp's pointers (the candidates a device's top-k
    left: llama_get_sampled_candidates_ith, llama_get_sampled_logits_ith), as numpy's (not
    copied)."""
    return (
        np.frombuffer(_array(ctypes.c_int32, n).from_address(_at(ids)), np.intc),
        np.frombuffer(_array(ctypes.c_float, n).from_address(_at(logits)), np.single),
    )


def _at(pointer: Any) -> int:
    return ctypes.addressof(pointer.contents)


@functools.cache
def _array(ctype: Any, n: int) -> Any:
    return ctype * n


class Candidates:
    """A llama_token_data_array over numpy's memory, for a chain to pick among `size`
    tokens at most. Building one (the array, its fields, the ctypes pointer) costs ~3.5 us,
    half of a draw among top-k's 43 candidates: a sampler keeps one for its picks."""

    def __init__(self, size: int) -> None:
        self.data = np.empty(size, dtype=_TOKEN_DATA)
        self.ids, self.logits, self.p = self.data["id"], self.data["logit"], self.data["p"]
        self.array = llama_cpp.llama_token_data_array(
            data=self.data.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=0,
            selected=-1,
            sorted=False,
        )
        self.ref = ctypes.byref(self.array)

    def fill(self, ids: Any, logits: Any) -> Any:
        """The array holding `ids` with their `logits`, unsorted, nothing selected."""
        n = len(ids)
        self.ids[:n] = ids
        self.logits[:n] = logits
        self.p[:n] = 0.0
        array = self.array
        array.size, array.selected, array.sorted = n, -1, False
        return array


class GrammarError(ValueError):
    """llama.cpp could not parse a grammar."""


class LogitBiasError(ValueError):
    """A logit bias names a token the model's vocabulary does not have."""


@dataclass
class Sampler:
    """A sequence's sampler chain, and its grammar when it has one: used by one thread at a
    time (the engine's, or a sampling thread while the engine thread waits)."""

    chain: Any
    grammar: Any
    n_vocab: int
    penalty_last_n: int
    penalties: bool
    # The chain keeps no state that a token it accepts changes (no penalties, no mirostat):
    # its own pick may then be made by llama.cpp, which accepts it, even when the grammar
    # turns it down afterwards, and a pick made on the host need not be accepted (~0.5 us;
    # llama.cpp's dist counts accepted draws only when it draws on a device).
    stateless: bool = False
    # Nothing in the chain raises a token's logit (no penalties, no positive logit_bias): a
    # grammar's pick may look at the best tokens by raw logit first (`_pick`).
    prefilter: bool = False
    # Greedy with no penalties: the logit biases (token ids, biases as float32, and whether
    # one is positive), so that the pick is taken by numpy on llama.cpp's logits in place
    # (`_argmax`, ~0.05 ms on Gemma's 262k tokens) rather than by the chain, which first
    # copies the whole vocabulary into candidates (~0.45 ms a token). The same token.
    greedy: tuple[Any, Any, bool] | None = None
    # A sampled chain whose first step after the (non-positive) logit biases is top-k, with
    # nothing that keeps state (penalties, mirostat) or a grammar: the best `top_pool` tokens
    # by raw logit (top_k and the biased tokens) hold every token the chain could draw, so
    # the chain is run on them alone (`_pick_top`, ~0.09 against ~0.21 ms a token on Gemma's
    # 262k vocabulary: it copies the whole vocabulary into candidates first). The same draws
    # for the same seed, but where logits are exactly equal (llama.cpp's sorts are not
    # stable: tied tokens may come in another order). 0: the chain over the whole vocabulary.
    top_pool: int = 0
    # A chain is attached to the context for this sequence (device sampling): llama.cpp's
    # llama_sampler_sample would return the token it picked there, so the host's chain is
    # run over the row of logits instead (`_whole_chain`).
    backend_rows: bool = False
    # The candidates of the last pick among a few tokens, kept for the next (`_pick_among`).
    _candidates: Candidates | None = field(default=None, repr=False)

    def prime(self, prompt: list[int]) -> None:
        """Let the penalties see the prompt's last tokens, as llama-server does."""
        if self.penalties:
            for token in prompt[-self.penalty_last_n :]:
                llama_cpp.llama_sampler_accept(self.chain, token)

    def sample(self, ctx: Any, index: int) -> int:
        """The next token from the logits at batch position `index` (accepted by the chain)."""
        if self.grammar is None:
            if self.greedy is not None:
                token = self._argmax(llama_cpp.llama_get_logits_ith(ctx, index))
                if token is not None:
                    return token
            elif self.top_pool:
                token = self._pick_top(llama_cpp.llama_get_logits_ith(ctx, index))
                if token is not None:
                    return token  # a top-k draw's chain is stateless: nothing to accept
            return self._whole_chain(ctx, index)
        logits = llama_cpp.llama_get_logits_ith(ctx, index)
        if self.stateless and not self.backend_rows:  # llama.cpp's own pick: no copy in Python
            token = int(llama_cpp.llama_sampler_sample(self.chain, ctx, index))
        else:
            token = self._pick(logits, with_grammar=False)
        if not self._grammar_allows(token):
            token = self._pick(logits, with_grammar=True)
        if not self.stateless:
            llama_cpp.llama_sampler_accept(self.chain, token)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        return token

    def _whole_chain(self, ctx: Any, index: int) -> int:
        """The chain's pick over the whole row at `index`, accepted."""
        if not self.backend_rows:
            return int(llama_cpp.llama_sampler_sample(self.chain, ctx, index))
        view = logits_view(llama_cpp.llama_get_logits_ith(ctx, index), self.n_vocab)
        token = self._pick_among(None, view, with_grammar=False)
        assert token is not None  # None only where a grammar allows nothing
        llama_cpp.llama_sampler_accept(self.chain, token)
        return token

    def _argmax(self, logits: Any) -> int | None:
        """Greedy's pick: the first of the best logits once the biases are added, as
        llama.cpp's logit-bias and greedy samplers pick (float32 sums, the first maximum).
        Without a positive bias the best raw logit stays best unless a bias lowers it: only
        then are the logits copied to add the biases. None when the best is not a finite
        number (a NaN, which numpy would pick and llama.cpp would not, or an infinity a ban
        turns into NaN): the chain picks then."""
        assert self.greedy is not None
        ids, biases, raises = self.greedy
        view = logits_view(logits, self.n_vocab)
        best = int(view.argmax())
        if raises or (len(ids) and best in self._bias_of):
            view = view.copy()
            with np.errstate(invalid="ignore"):  # inf + -inf: NaN, declined below
                view[ids] += biases
            best = int(view.argmax())
        return best if math.isfinite(view[best]) else None

    def _pick_top(self, logits: Any) -> int | None:
        """The chain's draw among the best `top_pool` tokens by raw logit. Biases only lower
        logits, so top-k of the biased vocabulary is top-k of this pool once biased. None
        when the best logit is not a finite number, or the margin finds too few tokens (a
        vocabulary of mostly equal logits, say): the chain draws over all of it then."""
        view = logits_view(logits, self.n_vocab)
        top = float(view.max())
        if not math.isfinite(top):
            return None
        margin, short = TOP_MARGIN, 0.0  # `short`: a margin that lets too few pass, if known
        while True:  # widened (doubled) until top_pool pass, from TOP_MARGIN to 8 times it
            if np.count_nonzero(view[::FLAT_STRIDE] >= top - margin) * FLAT_STRIDE > FLAT_ROW:
                margin = self._narrowed(view, top, margin, short)
            best = np.flatnonzero(view >= top - margin)
            if len(best) >= self.top_pool or margin >= 8 * TOP_MARGIN:
                break
            short, margin = margin, margin * 2
        if len(best) < self.top_pool:
            return None
        if len(best) > 4 * self.top_pool:  # a threshold found the best; a partition trims it
            best = best[np.argpartition(view[best], -self.top_pool)[-self.top_pool :]]
        return self._pick_among(best.astype(np.intc), view[best], with_grammar=False)

    def _narrowed(self, view: Any, top: float, margin: float, short: float) -> float:
        """A narrower margin for a flat row (most of the vocabulary within `margin` of the
        best, as random weights give, or a peaked row's remainder once widened past
        `short`, which lets fewer than top_pool pass): listing those tokens and partitioning
        them costs ~1.3 ms on 262k. The margin is halved, then bisected between the last
        that let too few pass and the last that let enough, by counting (~0.02 ms a pass),
        until at most 4 * top_pool pass, for NARROWINGS passes at most (equal logits at the
        top end it there). It never narrows to a margin that lets fewer than top_pool pass;
        a `margin` that already does comes back as it is (the caller widens it)."""
        count = int(np.count_nonzero(view >= top - margin))
        for _ in range(NARROWINGS):
            if count <= 4 * self.top_pool:
                break
            middle = (short + margin) / 2 if short else margin / 2
            passing = int(np.count_nonzero(view >= top - middle))
            if passing < self.top_pool:
                short = middle
            else:
                margin, count = middle, passing
        return margin

    @property
    def narrowed(self) -> int:
        """How many of a row's best tokens by raw logit hold this sequence's pick, for a
        device to narrow its rows to (device sampling): top_pool for a top-k draw; for greedy
        whose biases only lower, 1 and the biased tokens (one of those is unbiased, and no
        token beyond beats it). 0 where the pick needs the whole row."""
        if self.grammar is not None:
            return 0
        if self.greedy is not None:
            k = 1 + len(self.greedy[0])
            return 0 if self.greedy[2] or k > min(TOP_POOL, self.n_vocab // 2) else k
        return self.top_pool

    def pick_from(self, ids: np.ndarray, logits: np.ndarray) -> int:
        """The pick among the `narrowed` best tokens by raw logit or more, `ids` with their
        `logits` (the candidates a device's top-k left): greedy's, the first of the best
        once biased (`_argmax`: the same token; where that best is not a finite number, the
        chain's pick among them, as the chain picks over the row then), or the chain's draw
        (`_pick_top`'s from the same tokens over the whole row, for the same seed), accepted
        where the chain keeps state."""
        if self.greedy is not None:
            j = int(logits.argmax())  # a NaN's place where there is one
            best, first = logits[j], int(ids[j])
            if (
                math.isfinite(best)
                and first not in self._bias_of
                and np.count_nonzero(logits == best) == 1
            ):
                return first  # no bias lowers the best, and no other token equals it
            values = logits.copy()
            with np.errstate(invalid="ignore"):  # inf + -inf: NaN, left to the chain below
                for j, token in enumerate(ids.tolist()):
                    bias = self._bias_of.get(token)
                    if bias is not None:
                        values[j] += bias  # float32 sums, as llama.cpp's and `_argmax`'s
            best = values.max()
            if math.isfinite(best):
                return int(ids[values == best].min())  # the first of equals, as argmax's
        token = self._pick_among(ids, logits, with_grammar=False)
        assert token is not None  # None only where a grammar allows nothing
        if not self.stateless:
            llama_cpp.llama_sampler_accept(self.chain, token)
        return token

    def checked_on_host(self, token: int) -> bool:
        """Whether a token a device chain picked must be picked again on the host: the plain
        greedy chain (no biases: a greedy sequence whose biases only lower logits picks on
        the device) picked a biased token, so the best once biased may be another. The
        logits it leaves are the raw ones. On the
        device the biases are a step in the graph (a fill, set_rows and add over the whole
        vocabulary) and two synchronous host-to-device copies a sequence a step (llama.cpp
        sets the sampler's inputs with ggml_backend_tensor_set); a model's best logit is
        seldom a banned marker, so the host seldom picks again. (On this CPU the step is
        within the noise of a run: bench/backend_sampling.py --bias; not measured on a GPU.)"""
        return self.greedy is not None and not self.greedy[2] and token in self._bias_of

    @functools.cached_property
    def _bias_of(self) -> dict[int, np.float32]:
        """Greedy's biases by token (and so its biased tokens)."""
        assert self.greedy is not None
        ids, biases, _ = self.greedy
        return dict(zip(ids.tolist(), biases, strict=True))

    def _pick(self, logits: Any, *, with_grammar: bool) -> int:
        view = logits_view(logits, self.n_vocab)
        if with_grammar and self.prefilter:
            # The grammar refused the chain's pick. Filtering the whole vocabulary costs tens
            # of ms on Gemma's 262k tokens: try the tokens near the best logit first (within
            # GRAMMAR_MARGIN, at most GRAMMAR_FIRST). When the grammar allows any of them,
            # the best token it allows is among them (greedy picks exactly as over the whole
            # vocabulary; top-k/top-p draw from the allowed ones among the best, the rest
            # being e^-GRAMMAR_MARGIN as likely); only when it allows none is the rest
            # filtered. A threshold, not a sort: argpartition over 262k costs ~3 ms.
            best = np.flatnonzero(view >= view.max() - GRAMMAR_MARGIN)
            if len(best) > GRAMMAR_FIRST:
                best = best[np.argpartition(view[best], -GRAMMAR_FIRST)[-GRAMMAR_FIRST:]]
            if len(best) < self.n_vocab:
                token = self._pick_among(best.astype(np.intc), view[best], with_grammar=True)
                if token is not None:
                    return token
        token = self._pick_among(None, view, with_grammar=with_grammar)
        if token is None:
            # Accepting a token the grammar forbids would abort llama.cpp.
            raise GrammarError("the grammar allows no token here")
        return token

    def _pick_among(self, ids: Any, logits: Any, *, with_grammar: bool) -> int | None:
        """The chain's pick among the tokens `ids` (None: all) with their `logits`; None
        when the grammar allows none of them."""
        if ids is None:
            candidates = Candidates(self.n_vocab)
            array = candidates.fill(np.arange(self.n_vocab, dtype=np.intc), logits)
        else:
            if self._candidates is None or len(ids) > len(self._candidates.data):
                self._candidates = Candidates(max(len(ids), self.top_pool))
            candidates = self._candidates
            array = candidates.fill(ids, logits)
        if with_grammar:
            llama_cpp.llama_sampler_apply(self.grammar, candidates.ref)
            if not np.isfinite(candidates.logits[: array.size]).any():
                return None
        llama_cpp.llama_sampler_apply(self.chain, candidates.ref)
        if array.selected < 0:
            raise RuntimeError("the sampler chain selected no token")
        chosen = array.data[array.selected]
        if with_grammar and not np.isfinite(chosen.logit):
            return None
        return int(chosen.id)

    def _grammar_allows(self, token: int) -> bool:
        one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 1.0, 0.0))
        array = llama_cpp.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        return bool(np.isfinite(one[0].logit))

    def free(self) -> None:
        for sampler in (self.chain, self.grammar):
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
        self.chain = self.grammar = None


@dataclass(frozen=True)
class Lazy:
    """When a grammar starts to apply: once the text so far fully matches one of `patterns`
    (from the pattern's first group on), or once one of `tokens` is sampled."""

    patterns: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()


def build_sampler(
    vocab: Any,
    sampling: dict[str, Any],
    grammar: str | None,
    banned: tuple[int, ...] = (),
    lazy: Lazy | None = None,
) -> Sampler:
    """A sampler for one sequence that never picks a `banned` token (a non-text marker),
    with the request's `logit_bias` (token id -> bias; -100 bans the token) added to the
    logits first; with `lazy`, its grammar waits for a trigger (tool calls under
    tool_choice auto). GrammarError when llama.cpp rejects the grammar, LogitBiasError for
    a bias on a token the vocabulary does not have."""
    p = {**DEFAULTS, **{k: v for k, v in sampling.items() if v is not None}}
    n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
    biases = _biases(p.pop("logit_bias", None) or {}, banned, n_vocab)
    seed = p.get("seed")
    seed = int(seed) if seed is not None else random.randrange(2**31)
    grammar_sampler = None
    if grammar is not None:
        grammar_sampler = _grammar_sampler(vocab, grammar, lazy)
        if not grammar_sampler:  # NULL: llama.cpp logged why and returned nothing
            raise GrammarError("llama.cpp could not parse the grammar")

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    try:
        _add_logit_bias(chain, n_vocab, list(biases.items()))
        _fill_chain(chain, p, n_vocab, seed)
    except BaseException:
        llama_cpp.llama_sampler_free(chain)  # frees the samplers already added too
        if grammar_sampler:
            llama_cpp.llama_sampler_free(grammar_sampler)
        raise
    penalties = _penalized(p)
    lowers_only = all(b <= 0 for b in biases.values())  # no bias raises a logit
    top_pool = 0
    if (
        grammar_sampler is None
        and not penalties
        and p["temperature"] > 0.0
        and p["mirostat_mode"] == 0
        and p["top_k"] > 0
        and lowers_only
    ):
        top_pool = p["top_k"] + len(biases)
        if top_pool > min(TOP_POOL, n_vocab // 2):
            top_pool = 0
    greedy = None
    if p["temperature"] == 0.0 and not penalties:
        greedy = (
            np.fromiter(biases, dtype=np.intp, count=len(biases)),
            np.fromiter(biases.values(), dtype=np.single, count=len(biases)),
            any(b > 0 for b in biases.values()),
        )
    return Sampler(
        chain,
        grammar_sampler,
        n_vocab,
        int(p["penalty_last_n"]),
        penalties,
        stateless=not penalties and p["mirostat_mode"] == 0,
        prefilter=not penalties and lowers_only,
        greedy=greedy,
        top_pool=top_pool,
    )


def greedy_chain() -> Any:
    """A new chain of llama.cpp's greedy sampler alone, for a context to run inside each step
    (device sampling): the best raw logit of each of its sequence's rows, and the rows
    themselves copied back as they were."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    return chain


def top_k_chain(k: int) -> Any:
    """A new chain of llama.cpp's top-k alone, for a context to run inside each step
    (device sampling): each of its sequence's rows narrowed to its `k` best tokens, whose
    ids and logits alone are copied back; nothing picked there."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(k))
    return chain


def _add_logit_bias(chain: Any, n_vocab: int, biases: list[tuple[int, float]]) -> None:
    """A logit-bias sampler on `chain` for (token, bias) pairs; none when there are none."""
    if biases:
        array = (llama_cpp.llama_logit_bias * len(biases))(
            *(llama_cpp.llama_logit_bias(token, bias) for token, bias in biases)
        )
        llama_cpp.llama_sampler_chain_add(
            chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), array)
        )


def _grammar_sampler(vocab: Any, grammar: str, lazy: Lazy | None) -> Any:
    if lazy is None:
        return llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    patterns = (ctypes.c_char_p * max(1, len(lazy.patterns)))(
        *(p.encode("utf-8") for p in lazy.patterns)
    )
    tokens = (llama_cpp.llama_token * max(1, len(lazy.tokens)))(*lazy.tokens)
    return llama_cpp.llama_sampler_init_grammar_lazy_patterns(
        vocab,
        grammar.encode("utf-8"),
        b"root",
        patterns,
        len(lazy.patterns),
        tokens,
        len(lazy.tokens),
    )


def _biases(requested: dict[Any, float], banned: tuple[int, ...], n_vocab: int) -> dict[int, float]:
    """One bias per token: the request's (-100 bans, as OpenAI's does), then the bans."""
    biases: dict[int, float] = {}
    for key, bias in requested.items():
        token = int(key)
        if not 0 <= token < n_vocab:
            raise LogitBiasError(
                f"token {token} is not in the model's vocabulary (ids 0 to {n_vocab - 1})"
            )
        biases[token] = -math.inf if bias <= -100 else float(bias)
    for token in banned:
        biases[token] = -math.inf
    return biases


def _penalized(p: dict[str, Any]) -> bool:
    changed = (p["repeat_penalty"], p["presence_penalty"], p["frequency_penalty"]) != (
        1.0,
        0.0,
        0.0,
    )
    return changed and p["penalty_last_n"] != 0


def _fill_chain(chain: Any, p: dict[str, Any], n_vocab: int, seed: int) -> None:
    def add(sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    if _penalized(p):
        add(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab,
                p["penalty_last_n"],
                p["repeat_penalty"],
                p["frequency_penalty"],
                p["presence_penalty"],
            )
        )
    temperature = p["temperature"]
    if temperature == 0.0:
        add(llama_cpp.llama_sampler_init_greedy())
    elif p["mirostat_mode"] == 1:
        add(llama_cpp.llama_sampler_init_temp(temperature))
        add(
            llama_cpp.llama_sampler_init_mirostat(
                n_vocab, seed, p["mirostat_tau"], p["mirostat_eta"], 100
            )
        )
    elif p["mirostat_mode"] == 2:
        add(llama_cpp.llama_sampler_init_temp(temperature))
        add(llama_cpp.llama_sampler_init_mirostat_v2(seed, p["mirostat_tau"], p["mirostat_eta"]))
    else:
        add(llama_cpp.llama_sampler_init_top_k(p["top_k"]))
        add(llama_cpp.llama_sampler_init_typical(p["typical_p"], 1))
        add(llama_cpp.llama_sampler_init_top_p(p["top_p"], 1))
        add(llama_cpp.llama_sampler_init_min_p(p["min_p"], 1))
        add(llama_cpp.llama_sampler_init_temp(temperature))
        add(llama_cpp.llama_sampler_init_dist(seed))
