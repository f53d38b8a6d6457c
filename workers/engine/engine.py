"""The engine: one thread owns a model's llama.cpp context and runs every sequence on it.

    loop:  admit waiting sequences into free slots (the slot whose cached tokens share
           the longest prefix with the prompt; only the rest is evaluated)
           build one batch: the next token of every generating slot first, then prompt
           chunks of the slots still reading their prompt, up to n_batch tokens
           llama_decode once
           sample each sequence that produced logits with its own chain (on several
           threads when there are several); stream its text; end it on a stop,
           max_tokens, its time limit or cancel, and free its slot

Prompt-lookup speculation (lookup.py): a generating sequence whose last few tokens appeared
before also feeds the tokens that followed them then (its draft) after its next token, in
the same batch, each with its logits. Its sampler then picks at each position in turn, and
a drafted token is kept only when it is the pick, so a step can yield several tokens, each
the one the sampler picks from its position's logits. The cells of the draft not kept are
removed. A draft that missed shrinks the sequence's next one to 1 token, one fully kept
doubles it, up to `draft_max`. Drafts take at most 64 positions of a batch (a quarter of
a smaller one), and are made only while at most DRAFT_SEQUENCES sequences generate (where
a drafted position costs less than the token it may save).

Sequences sharing a prompt (a request's n > 1) are admitted with their leader when slots
are free: they wait without evaluating anything, and when the leader's prompt is
evaluated its KV cells are shared with them (llama_memory_seq_cp) and each samples its
first token from the leader's logits. The prompt is evaluated once. One that found no
slot then runs on its own later (its prompt mostly in the prompt cache by then).

With `device_sampling` (FARM_DEVICE_SAMPLING=greedy; off by default), a greedy sequence
with no grammar and no logprobs picks its tokens inside the step (llama.cpp's backend
sampling: `llama_set_sampler` attaches a chain to a seq_id, and the token is read with
`llama_get_sampled_token_ith`), so the host takes no argmax over its 1 MiB of logits a
position (Gemma's 262k vocabulary). Every slot gets a plain greedy chain at the first step
and keeps a chain from one sequence to the next: llama.cpp reserves the step's graph again
after each llama_set_sampler. (On an H200, when each sequence attached its chain and took
it back, a cold prompt's first token took 441 ms against 56-81 ms without: bench/README.md;
the reserve is the likely cause, not timed apart there.) The greedy chain's rows of logits
are the raw ones, so every other sequence (sampled, with logprobs, a grammar, a raising
bias) is picked on the host from them as before, and a greedy sequence's bans too where the
device picked a banned token (`Sampler.checked_on_host`). A greedy sequence picks on the
device at every position it outputs, its prompt's last and its drafts' too.

With `device_draws` as well (FARM_DEVICE_SAMPLING=all), the device narrows rows instead of
picking: a sequence whose pick lies among its row's few best tokens by raw logit
(`Sampler.narrowed`: a top-k draw's top_pool, its top_k and its biased tokens; greedy's 1 and
its biased tokens, where no bias raises) has llama.cpp's top-k of that many or more as its
slot's chain. Only those ids and logits come back, not the vocabulary's row (the greedy
chain's comes back whole), and the host picks among them (`Sampler.pick_from`): greedy's
token, or the draw its chain makes among the same best tokens of the whole row, so a seed
repeats its draws, drafts and all (but where logits tie: which of equal logits a top-k keeps
is the device's choice). A slot's top-k keeps NARROW_WIDTH tokens or more, so that greedy
and default draws share it; it stays after the sequence ends (the next one that needs no
more tokens keeps it). Those sharing a prompt (a request's n > 1) draw their first tokens
among the candidates of their leader's last position, its chain wide enough for all. A slot
goes back to the greedy chain for a sequence that needs the raw logits (logprobs, a grammar,
penalties, mirostat, a raising bias, no top-k, a pool over TOP_POOL), or whose prompt is
shared with one that does. On an H200 greedy on the device was slower when
each sequence attached and took back its chain (148-2,046 tok/s at 1-64 sequences against
418-3,230 with the host's argmax); the chains kept are not measured on a GPU yet, so it
stays off.

Logprobs (the log-softmax of the logits) are read only for sequences that ask for them;
a sequence that wants its prompt's logprobs (echo) has every prompt position output, in
chunks of PROMPT_SCORE_CHUNK, and never reuses a cached prefix.

The KV cache is one buffer of `kv_size` cells shared by every slot (`kv_unified`). A slot
keeps its tokens after its sequence ends (the prompt cache) until the cells are needed.
When llama_decode finds no room (it returns 1 and changes nothing), the engine frees the
least recently used idle slot's cache; with none left it stops admitting and lets the
running sequences go on without prompt chunks; if even that does not fit, the newest
sequence is ended. The process never aborts for a full cache.

llama.cpp's low-level calls abort the whole process on misuse (a batch over n_batch, the
logits of a position not marked for output), so every index is checked here before the
call that would use it. Only this thread calls llama.cpp's context, except that the
sampling threads read a step's logits through it (`_pick_apart`) while this thread waits.
"""

from __future__ import annotations

import codecs
import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from workers.engine.batch import Batch
from workers.engine.job import DONE, FAILED, LOGPROBS, TEXT, Generation, Sequence
from workers.engine.logprobs import Logprobs, first_prompt_token
from workers.engine.lookup import PromptLookup
from workers.engine.sampling import (
    GrammarError,
    Lazy,
    LogitBiasError,
    Sampler,
    build_sampler,
    candidates_view,
    greedy_chain,
    top_k_chain,
)
from workers.engine.text import TextAssembler
from workers.engine.vocab import Vocab

log = logging.getLogger(__name__)

MAX_SLOTS = 256  # llama.cpp's limit on n_seq_max
# Prompt positions a scored prompt (echo with logprobs) outputs per step: llama.cpp keeps
# an output buffer of outputs x vocabulary floats (64 x 262k x 4 bytes = 64 MiB on Gemma)
# and never shrinks it.
PROMPT_SCORE_CHUNK = 64
DRAFT_MAX = 8  # prompt-lookup tokens drafted a step, unless a sequence says otherwise
# The share of a batch drafts may take, so that prompts waiting to be read still get most of
# it; and at most PROMPT_SCORE_CHUNK positions, for the same output buffer as echo's.
DRAFT_SHARE = 4
# Drafts only while at most this many sequences generate. Each drafted position costs a
# position of logits; a kept token is worth a step's time over the sequences in it. On this
# project's 2-core CPU (Gemma, 262k vocabulary) a position costs ~5 ms against steps of 23 ms
# (1 sequence) and 57 ms (8): bench/throughput.py lost 12 % of its tokens/s at 8 clients
# with drafts, and gained up to 1.35x at 1; copying at 4 clients gained 1.14-1.50x
# (bench/speculation.py).
DRAFT_SEQUENCES = 4
# A step's sequences are sampled on up to this many threads (at most the engine's own,
# whose cores are idle between decodes): llama.cpp's sampler chain and numpy's argmax run
# without the GIL, and each sequence's sampler is its own. Below SAMPLE_APART sequences a
# step, or for a drafting sequence (its positions are sampled in turn), the engine thread
# samples. Measured on this project's 2-core CPU (bench/engine_host.py --sampled): 2 threads
# took a third off the sampler's time a step at 32 sequences (27 -> 18 ms) and none at 8
# (llama.cpp's threads still spin on the cores just after a decode); the GPU stand-in
# (bench/engine_gpu_standin.py) gained from 64 sequences, not at 16. The threads read the
# logits through the context (llama_get_logits_ith, which synchronizes with the device): on
# the CPU and CUDA backends that only rewrites counters once the engine thread has read
# once; other GPU backends get 1 (workers/host.py).
SAMPLING_THREADS = 8
SAMPLE_APART = 16
# With device draws, a slot's top-k chain narrows its rows to at least this many tokens: a
# sequence's pick lies among its row's best `Sampler.narrowed` (4 for greedy with Gemma's
# bans, 43 for farm's default draw), and any chain of that many or more holds it. So greedy
# and default draws share one chain, and mixed traffic attaches none as its sequences come
# and go (each llama_set_sampler makes llama.cpp reserve the step's graph again); the host
# picks among 64 where 4 would do. A wider chain (a top_k over 60) stays for the slot's
# next sequences while it is at most WIDEST_KEPT times as wide as they need.
NARROW_WIDTH = 64
WIDEST_KEPT = 4


class EngineError(RuntimeError):
    """The engine could not be built (no context could be created for these settings)."""


@dataclass(eq=False)
class Slot:
    seq_id: int
    cache: list[int] = field(default_factory=list)  # the tokens this sequence has in the KV cache
    last_used: float = 0.0
    job: Sequence | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not evaluated yet
    next_token: int = -1  # sampled, to be fed in the next batch
    sampler: Sampler | None = None
    text: TextAssembler | None = None
    decoder: Any = None
    generated: int = 0
    max_tokens: int = 0
    cached: int = 0
    ttft_ms: float | None = None
    admitted: int = 0
    follows: Slot | None = None  # waits for this slot's prompt, to share its KV cells
    logprobs: list[dict[str, Any]] | None = None  # per generated token, when asked for
    prompt_logprobs: list[dict[str, Any]] | None = None  # per prompt token (echo)
    prompt_text: int = 0  # characters of the prompt scored so far (text offsets)
    lookup: PromptLookup | None = None  # the sequence's tokens, when it drafts
    draft: list[int] = field(default_factory=list)  # drafted tokens fed this step
    draft_at: int = 0  # the batch position of the draft's first token
    draft_cap: int = 0  # the most tokens its next draft may have
    drafted: int = 0  # tokens drafted for the sequence, and those kept
    kept: int = 0
    # With device sampling: the chain attached to the context for this seq_id, kept from
    # one sequence to the next (`_place_pickers`); the k of its top-k (`_width`: NARROW_WIDTH
    # or more, maybe an earlier sequence's), or None for the plain greedy chain every slot
    # starts with.
    device_chain: Any = None
    chain_key: Any = None
    device_pick: bool = False  # this step, the token is the one the device picked
    # What the sequence's picks need of its rows, fixed at its start: the best `narrows`
    # tokens (Sampler.narrowed; 0: the raw row, as logprobs need), and whether a greedy
    # chain's token will do (greedy with no grammar, raising bias or logprobs).
    narrows: int = 0
    greedy_on_device: bool = False


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """Continuous batching over one loaded model. Thread-safe: `submit` from any thread."""

    def __init__(
        self,
        model: Any,
        *,
        slots: int,
        n_ctx: int,
        kv_size: int | None = None,
        n_batch: int = 512,
        threads: int = 1,
        name: str = "",
        draft_max: int = DRAFT_MAX,
        async_decode: bool = False,
        sampling_threads: int | None = None,
        device_sampling: bool = False,
        device_draws: bool = False,
    ):
        if not 1 <= slots <= MAX_SLOTS:
            raise EngineError(f"slots must be between 1 and {MAX_SLOTS}, not {slots}")
        self.name = name
        self.n_slots = slots
        # llama_decode returns once the step is queued on the device (a GPU backend: llama.cpp
        # waits for it only when the logits are read), so the previous step's events are put
        # after it, while the device computes; on the CPU it returns when the step is done,
        # and they are put before it, while it computes without the GIL (`_step`).
        self.async_decode = async_decode
        self.device_sampling = device_sampling  # greedy picks on the device (module doc)
        self.device_draws = device_draws  # rows narrowed there instead, with device_sampling
        self.tokens_picked_on_device = 0  # since start
        self.chains_attached = 0  # since start: llama_set_sampler calls that attached one
        self._attached = False  # every slot has a chain attached (`_place_pickers`)
        self.n_ctx = n_ctx  # the most one sequence may hold: prompt and reply together
        self.n_batch = n_batch
        self.threads = threads
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.tokens = Vocab(self.vocab)
        # Read here, not at the first sequence: a scan of the whole vocabulary (~0.2 s on
        # Gemma's 262k tokens) that would otherwise delay the first request's first token.
        self.tokens.markers()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = kv_size or n_ctx * slots
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = slots
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True
        # A full-size sliding-window cache, so a cached prefix stays usable on models with
        # sliding-window attention (Gemma 3): otherwise its early positions are dropped.
        params.swa_full = True
        # With a chain attached (device sampling) a sequence may still output several
        # positions a step (drafts, a scored prompt); without chains this changes nothing.
        params.n_outputs_max_per_seq = n_batch
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise EngineError(
                f"llama.cpp could not create a context of {params.n_ctx} tokens for {slots} "
                "slots (out of memory?); lower --parallel, --kv-size or the model's --n-ctx"
            )
        self.kv_size = int(llama_cpp.llama_n_ctx(self.ctx))
        # llama.cpp lowers n_batch to a smaller KV size: a batch past what it took aborts.
        self.n_batch = min(n_batch, int(llama_cpp.llama_n_batch(self.ctx)))
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = Batch(self.n_batch)
        self.slots = [Slot(i) for i in range(slots)]
        self.tokens_generated = 0  # since start, for tokens/s in the heartbeat
        self.prompt_tokens_evaluated = 0  # since start: prompt tokens llama_decode read
        n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.logprobs = Logprobs(self.ctx, self.tokens, n_vocab)
        self.bos = (
            int(llama_cpp.llama_vocab_bos(self.vocab))
            if llama_cpp.llama_vocab_get_add_bos(self.vocab)
            else None
        )
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._hold = False  # the KV cache was full: admit nothing until a sequence ends
        self._prompt_budget = self.n_batch
        self._admissions = 0
        # A recurrent model's state cannot be cut back to a position: no drafts there.
        recurrent = llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(
            model
        )
        self.draft_max = draft_max  # for a sequence that names none
        self.can_draft = not recurrent
        self._drafts = True  # False while the KV cache had no room for drafts
        self.tokens_drafted = 0  # since start: drafted tokens fed, and those kept
        self.tokens_accepted = 0
        # Events of this step, put on their sequences' queues around the next llama_decode (or
        # before the engine waits): `_send`.
        self._outbox: list[tuple[Sequence, tuple[str, Any]]] = []
        self.sampling_threads = max(
            1, min(threads, SAMPLING_THREADS) if sampling_threads is None else sampling_threads
        )
        self.tokens_picked_apart = 0  # since start: tokens picked on the sampling threads
        self._sampling = (  # the engine thread samples a share itself
            ThreadPoolExecutor(self.sampling_threads - 1, thread_name_prefix=f"sample-{name}")
            if self.sampling_threads > 1
            else None
        )
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # -- the boundary ---------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; its events arrive on `seq.events`."""
        self.submit_all([seq])

    def submit_all(self, seqs: list[Sequence]) -> None:
        """Queue sequences together (a leader and those sharing its prompt arrive in one
        step, so that they can share its evaluation)."""
        with self._cond:
            for seq in seqs:
                if len(seq.tokens) >= self.n_ctx:
                    seq.events.put(
                        (
                            FAILED,
                            f"the prompt is {len(seq.tokens)} tokens but the model holds "
                            f"{self.n_ctx}",
                        )
                    )
                elif self._stopping:
                    seq.events.put((FAILED, "the worker is stopping"))
                else:
                    self._waiting.append(seq)
            self._cond.notify()

    @property
    def busy(self) -> int:
        return sum(1 for s in self.slots if s.job is not None) + len(self._waiting)

    def close(self) -> None:
        """Stop the loop (sequences still running fail) and free llama.cpp's memory."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        if self._sampling is not None:
            self._sampling.shutdown()
        self.batch.free()
        llama_cpp.llama_free(self.ctx)
        self.ctx = None
        for slot in self.slots:  # the context no longer holds them
            if slot.device_chain is not None:
                llama_cpp.llama_sampler_free(slot.device_chain)
                slot.device_chain = None

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if not self._active():
                    self._deliver()
                with self._cond:
                    while not self._stopping and not self._waiting and not self._active():
                        self._cond.wait()
                    if self._stopping:
                        break
                self._admit()
                if self._active():
                    self._step()
        except Exception:
            log.exception("engine %s stopped on an error", self.name)
        self._deliver()
        reason = "the worker's engine stopped"
        for slot in self._active():
            self._fail(slot, reason)
        self._deliver()
        with self._cond:
            self._stopping = True
            for seq in self._waiting:
                seq.events.put((FAILED, reason))
            self._waiting.clear()

    def _active(self) -> list[Slot]:
        return [s for s in self.slots if s.job is not None]

    def _admit(self) -> None:
        while not self._hold:
            free = [s for s in self.slots if s.job is None]
            with self._cond:
                if not free or not self._waiting:
                    return
                seq = self._waiting.popleft()
            if seq.cancelled:
                self._send(seq, (DONE, self._result(seq, "", "cancelled", 0, 0, None)))
                continue
            leader = self._prompting(seq.leader)
            if leader is not None:  # its prompt is being evaluated: share it
                slot = min(free, key=lambda s: (bool(s.cache), s.last_used))
            else:
                # The free slot sharing the longest prefix; among equals the least recently used.
                slot = max(free, key=lambda s: (common_prefix(s.cache, seq.tokens), -s.last_used))
            started = self._start_or_fail(slot, seq)
            if started and leader is not None:
                self._wait_for(slot, leader)
            elif started:
                self._admit_followers(slot)

    def _start_or_fail(self, slot: Slot, seq: Sequence) -> bool:
        try:
            self._start(slot, seq)
            return True
        except GrammarError as e:
            self._send(seq, (FAILED, f"invalid 'grammar': {e}"))
        except LogitBiasError as e:
            self._send(seq, (FAILED, f"invalid 'logit_bias': {e}"))
        except Exception as e:  # this sequence cannot run; the others go on
            log.exception("engine %s: could not start sequence %s", self.name, seq.label)
            self._send(seq, (FAILED, f"the engine could not start it: {type(e).__name__}: {e}"))
        self._release(slot)
        return False

    def _prompting(self, leader: Sequence | None) -> Slot | None:
        """The slot of `leader` while its prompt is still being evaluated."""
        if leader is None:
            return None
        for slot in self.slots:
            if slot.job is leader and slot.pending:
                return slot
        return None

    def _admit_followers(self, slot: Slot) -> None:
        """Take the waiting sequences that share `slot`'s prompt, while slots are free."""
        if not slot.pending:
            return
        while True:
            free = [s for s in self.slots if s.job is None]
            with self._cond:
                seq = next((w for w in self._waiting if w.leader is slot.job), None)
                if seq is None or not free:
                    return
                self._waiting.remove(seq)
            target = min(free, key=lambda s: (bool(s.cache), s.last_used))
            if self._start_or_fail(target, seq):
                self._wait_for(target, slot)

    def _wait_for(self, slot: Slot, leader: Slot) -> None:
        """`slot` evaluates nothing: it gets `leader`'s cells once its prompt is read."""
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.cache.clear()
        slot.pending = []
        slot.cached = 0
        slot.follows = leader

    def _share(self, leader: Slot, slot: Slot) -> None:
        """Give `slot` the prompt `leader` has just evaluated (the same tokens)."""
        n = len(leader.cache)
        llama_cpp.llama_memory_seq_cp(self.mem, leader.seq_id, slot.seq_id, 0, n)
        slot.cache = list(leader.cache)
        slot.cached = n
        slot.follows = None
        if leader.prompt_logprobs is not None and slot.job and slot.job.prompt_logprobs:
            slot.prompt_logprobs = list(leader.prompt_logprobs)

    @property
    def alive(self) -> bool:
        """False once the engine's thread has stopped (closed, or on an error)."""
        return self._thread.is_alive()

    def _start(self, slot: Slot, seq: Sequence) -> None:
        lazy = Lazy(seq.grammar_patterns, seq.grammar_tokens) if seq.grammar_lazy else None
        sampler = build_sampler(
            self.vocab, seq.sampling, seq.grammar, self.tokens.markers(), lazy=lazy
        )
        # A scored prompt needs the logits of every position: nothing of it is reused.
        keep = 0 if seq.prompt_logprobs else common_prefix(slot.cache, seq.tokens)
        if keep == len(seq.tokens):
            keep -= 1  # the last prompt token is evaluated again: its logits start the reply
        if keep < len(slot.cache) and not llama_cpp.llama_memory_seq_rm(
            self.mem, slot.seq_id, keep, -1
        ):
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)  # never fails
            keep = 0
        del slot.cache[keep:]
        sampler.prime(seq.tokens)
        sampler.backend_rows = self.device_sampling or self._attached
        self._admissions += 1
        slot.job, slot.sampler = seq, sampler
        slot.pending = list(seq.tokens[keep:])
        slot.cached = keep
        slot.generated, slot.ttft_ms, slot.next_token = 0, None, -1
        slot.max_tokens = min(seq.max_tokens, self.n_ctx - len(seq.tokens))
        slot.text = TextAssembler(
            seq.stops, (lambda piece: self._send(seq, (TEXT, piece))) if seq.streamed else None
        )
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.admitted = self._admissions
        slot.follows = None
        slot.logprobs = [] if seq.logprobs is not None else None
        slot.prompt_logprobs, slot.prompt_text = None, 0
        # The lookup is built at the first draft (~7 ms for 8,000 prompt tokens, on this
        # thread): a sequence that never drafts never pays for it.
        slot.lookup, slot.draft, slot.draft_cap = None, [], self._draft_most(seq)
        slot.drafted = slot.kept = 0
        if seq.prompt_logprobs:
            first = 1 if self.bos is not None and seq.tokens[0] == self.bos else 0
            slot.prompt_logprobs = []
            if first < len(seq.tokens):
                slot.prompt_logprobs.append(first_prompt_token(seq.tokens[first], self.tokens))
                slot.prompt_text = len(self._text_of(seq.tokens[first]))
        plain = slot.logprobs is None and slot.prompt_logprobs is None
        slot.narrows = sampler.narrowed if plain else 0
        slot.greedy_on_device = (
            sampler.greedy is not None
            and not sampler.greedy[2]  # a raising bias: the host picks (a raw row)
            and sampler.grammar is None
            and slot.logprobs is None
        )

    def _send(self, seq: Sequence, event: tuple[str, Any]) -> None:
        """Queue an event for `seq`'s reader. Putting it at once would wake the reader's
        thread in the middle of the step, and the engine would wait for the GIL back at
        every token of every sequence; they are put together by `_deliver`."""
        self._outbox.append((seq, event))

    def _deliver(self) -> None:
        """Put the queued events, in order, on their sequences' queues."""
        outbox, self._outbox = self._outbox, []
        for seq, event in outbox:
            seq.events.put(event)

    def _text_of(self, token: int) -> str:
        return self.tokens.text(token).decode("utf-8", "replace")

    def _step(self) -> None:
        now = time.perf_counter()
        generating: list[Slot] = []
        prompting: list[Slot] = []
        for slot in self.slots:
            job = slot.job
            if job is None:
                continue
            if job.cancelled:
                self._finish(slot, "cancelled")
            elif job.deadline is not None and now >= job.deadline:
                self._finish(slot, "time")
            elif slot.pending:
                prompting.append(slot)
            elif slot.follows is None:
                generating.append(slot)
        prompting.sort(key=lambda s: s.admitted)
        if not generating and not prompting:
            return
        if self.device_sampling or self._attached:
            self._place_pickers(generating, prompting)
        n = self.batch.each(
            0,
            [s.next_token for s in generating],
            [len(s.cache) for s in generating],
            [s.seq_id for s in generating],
        )
        outputs = [(slot, i) for i, slot in enumerate(generating)]
        if self._drafts and len(generating) <= DRAFT_SEQUENCES:
            n = self._put_drafts(generating, n)
        chunks: list[tuple[Slot, int]] = []
        scored: list[tuple[Slot, int, int, int]] = []  # slot, first position, index, count
        read: list[tuple[Slot, int]] = []  # slots whose prompt this batch ends, and index
        budget = self._prompt_budget
        for slot in prompting:
            take = min(self.n_batch - n, budget, len(slot.pending))
            scoring = slot.prompt_logprobs is not None
            if scoring:
                take = min(take, PROMPT_SCORE_CHUNK)
            if take <= 0:
                break
            budget -= take
            last = take == len(slot.pending)
            start = len(slot.cache)
            if scoring:
                scored.append((slot, start, n, take))
            n = self.batch.run(n, slot.pending[:take], start, slot.seq_id, scoring)
            if last:  # its last prompt token's logits start the reply
                self.batch.logits[n - 1] = True
                outputs.append((slot, n - 1))
                read.append((slot, n - 1))
            chunks.append((slot, take))
        if n == 0:
            self._kv_full(had_prompt=False)
            return
        self.batch.n_tokens = n
        if not self.async_decode:
            self._deliver()  # the readers wake while llama_decode runs without the GIL
        ret = llama_cpp.llama_decode(self.ctx, self.batch.raw)
        if self.async_decode:
            self._deliver()  # the readers wake while the device computes the step
        drafted = [s for s in generating if s.draft]
        if ret != 0:
            for slot in drafted:
                slot.draft = []
        if ret == 1 and drafted:
            self._drafts = False  # the same step again without drafts
            return
        if ret == 1:
            self._kv_full(had_prompt=bool(chunks))
            return
        if ret != 0:
            for slot in {s for s, _ in outputs} | {s for s, _ in chunks}:
                self._fail(slot, f"llama_decode failed with code {ret}")
            return
        for slot, take in chunks:
            slot.cache.extend(slot.pending[:take])
            del slot.pending[:take]
            self.prompt_tokens_evaluated += take
        for slot in generating:
            slot.cache.append(slot.next_token)
        for slot, start, index, take in scored:
            self._score_prompt(slot, start, index, take)
        for leader, index in read:
            for slot in self.slots:
                if slot.follows is leader and slot.job is not None:
                    self._share(leader, slot)
                    outputs.append((slot, index))
        picked = self._pick_apart(outputs)
        for slot, index in outputs:
            try:
                if slot.draft:
                    self._verify(slot, index)
                else:
                    self._sample(slot, index, picked.get(slot.seq_id))
            except Exception as e:  # one sequence's sampling failed: end it, not the engine
                log.exception(
                    "engine %s: sampling failed for %s", self.name, slot.job and slot.job.label
                )
                self._fail(slot, f"sampling failed: {type(e).__name__}: {e}")
        if self._attached and not self.device_sampling:
            self._detach_all()

    def _place_pickers(self, generating: list[Slot], prompting: list[Slot]) -> None:
        """Give each slot of the step the chain it should have, and say which sequences take
        the token the device picks.

        Every slot has a chain attached, from the first step on: a plain greedy one, whose
        rows of logits are the raw ones (the host picks from them for every sequence that
        does not pick on the device), or a top-k one. A chain stays when its sequence
        ends: llama.cpp reserves the step's graph again at each llama_set_sampler, so a
        slot's chain is changed only when a sequence needs another (the raw rows, a top-k
        that keeps too few tokens or far too many: `_width`), never as each sequence comes
        and goes. A greedy sequence with no grammar and no logprobs picks on the device,
        drafts and all (each drafted position's pick); with `device_draws`, its rows and a
        top-k draw's are narrowed there instead, at every position it outputs. A prompt
        others share (a request's n > 1) is narrowed to hold each one's first pick, or
        left raw where one of them needs the raw row."""
        if not self.device_sampling:  # off, or llama.cpp could not: the host picks all
            self._detach_all()
            return
        if not self._attached:
            self._attached = True
            for slot in self.slots:
                if slot.sampler is not None:
                    slot.sampler.backend_rows = True
                if not self._attach(slot, None):
                    return
        # A leader's prompt row is read by those that share it (a request's n > 1): its
        # narrowing must hold each one's pick.
        followers = [other for other in self.slots if other.follows is not None]
        for slot in (*generating, *prompting):
            needed = slot.narrows if self.device_draws else 0
            for other in followers:
                if needed and other.follows is slot:
                    needed = max(needed, other.narrows) if other.narrows else 0
            key = self._width(slot, needed) if needed else None
            if key != slot.chain_key and not self._attach(slot, key):
                return
            slot.device_pick = key is not None or slot.greedy_on_device

    def _width(self, slot: Slot, needed: int) -> int:
        """The k of the top-k chain that narrows `slot`'s rows to `needed` tokens or more:
        the slot's own where it keeps enough and not more than WIDEST_KEPT times the width
        it would get (a chain a top_k of 1,000 left would cost every later sequence there a
        pick among 1,000), else `needed`, at least NARROW_WIDTH."""
        width = max(needed, min(NARROW_WIDTH, self.logprobs.n_vocab // 2))
        if slot.chain_key is not None and needed <= slot.chain_key <= WIDEST_KEPT * width:
            return int(slot.chain_key)
        return width

    def _attach(self, slot: Slot, key: Any) -> bool:
        """Attach a new chain to `slot`: a plain greedy one (key None) or a top-k of `key`
        tokens. New each time: a chain attached once to a context aborts the process when
        attached again. False where llama.cpp refused it: then the host picks every token."""
        chain = greedy_chain() if key is None else top_k_chain(key)
        if not llama_cpp.llama_set_sampler(self.ctx, slot.seq_id, chain):
            llama_cpp.llama_sampler_free(chain)
            log.warning("engine %s: llama.cpp refused backend sampling", self.name)
            self.device_sampling = False
            self._detach_all()
            return False
        self.chains_attached += 1
        if slot.device_chain is not None:
            llama_cpp.llama_sampler_free(slot.device_chain)
        slot.device_chain, slot.chain_key = chain, key
        return True

    def _detach_all(self) -> None:
        for slot in self.slots:
            slot.device_pick = False
            if slot.device_chain is not None:
                llama_cpp.llama_set_sampler(self.ctx, slot.seq_id, None)
                llama_cpp.llama_sampler_free(slot.device_chain)
                slot.device_chain = slot.chain_key = None
        self._attached = False

    def _pick_apart(self, outputs: list[tuple[Slot, int]]) -> dict[int, int | Exception]:
        """The next tokens of the step's sequences that sample one position, picked on the
        sampling threads when there are SAMPLE_APART or more (by seq_id; the error where a
        pick failed); {} when the engine thread is to pick them."""
        if self._sampling is None or len(outputs) < SAMPLE_APART:
            return {}
        plain = [
            (slot, index)
            for slot, index in outputs
            if slot.job is not None
            and not slot.draft
            and slot.max_tokens > 0
            and not slot.device_pick
            and self._row_of(index).chain_key is None  # a raw row, not a leader's narrowed one
        ]
        if len(plain) < SAMPLE_APART:
            return {}
        # llama.cpp waits for the step and puts its outputs in order at the first read of
        # the logits: here, so that the threads only read them.
        llama_cpp.llama_get_logits_ith(self.ctx, plain[0][1])
        self.tokens_picked_apart += len(plain)
        k = min(self.sampling_threads, len(plain))
        shares = [plain[j::k] for j in range(k)]
        futures = [self._sampling.submit(_pick, share, self.ctx) for share in shares[1:]]
        try:
            picked = _pick(shares[0], self.ctx)
        finally:  # no sampler may be freed while a thread still uses it
            wait(futures)
        for future in futures:
            picked.update(future.result())
        return picked

    def _put_drafts(self, generating: list[Slot], n: int) -> int:
        """Each drafting sequence's draft after the next tokens, within 1/DRAFT_SHARE of the
        batch; the batch's new length."""
        end = min(self.n_batch, n + min(self.n_batch // DRAFT_SHARE, PROMPT_SCORE_CHUNK))
        for slot in generating:
            if n >= end or slot.draft_cap <= 0 or slot.job is None:
                continue
            most = min(slot.draft_cap, slot.max_tokens - slot.generated - 1, end - n)
            if most <= 0:
                continue
            if slot.lookup is None:  # its tokens so far (prompt and reply), and the next one
                slot.lookup = PromptLookup([*slot.cache, slot.next_token])
            draft = slot.lookup.draft(most)
            if not draft:
                continue
            slot.draft, slot.draft_at = draft, n
            # after the next token, which takes position len(slot.cache)
            n = self.batch.run(n, draft, len(slot.cache) + 1, slot.seq_id, True)
        return n

    def _verify(self, slot: Slot, index: int) -> None:
        """Sample `slot` at its next token's position, then at each drafted position while
        the draft holds the pick; remove the cells of the rest of the draft."""
        draft, at = slot.draft, slot.draft_at
        slot.draft = []
        slot.drafted += len(draft)  # counted before a sample that may end the sequence
        self.tokens_drafted += len(draft)
        kept = 0
        self._sample(slot, index)
        while kept < len(draft) and slot.job is not None and slot.next_token == draft[kept]:
            slot.cache.append(draft[kept])
            slot.kept += 1
            kept += 1
            self._sample(slot, at + kept - 1)
        self.tokens_accepted += kept
        slot.draft_cap = self._next_cap(slot, kept, len(draft))
        if not llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, len(slot.cache), -1):
            # Not expected of a cache that holds positions (recurrent models draft nothing).
            self.can_draft = False
            for other in self.slots:
                other.lookup, other.draft_cap = None, 0
            if slot.job is not None:
                self._fail(slot, "the KV cache could not remove a draft's cells")
            else:
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
                slot.cache.clear()

    def _next_cap(self, slot: Slot, kept: int, drafted: int) -> int:
        """The most tokens the slot's next draft may have: twice as many after a draft fully
        kept, 1 after one cut short. (Resting a slot after drafts that missed cost a third of
        the gain at 1 client on sampled text, 44.3 against 55-57 tok/s, and gained nothing at
        8: bench/throughput.py.)"""
        if kept == drafted:
            return min(2 * slot.draft_cap, self._draft_most(slot.job))
        return 1

    def _draft_most(self, seq: Sequence | None) -> int:
        """The most tokens `seq` drafts a step: its own limit, else the engine's."""
        if not self.can_draft or seq is None:
            return 0
        return self.draft_max if seq.draft_max is None else seq.draft_max

    def _score_prompt(self, slot: Slot, start: int, index: int, take: int) -> None:
        """The logprobs of the prompt tokens that positions start..start+take-1 predict."""
        job, found = slot.job, slot.prompt_logprobs
        assert job is not None and found is not None
        first = 1 if self.bos is not None and job.tokens[0] == self.bos else 0
        for j in range(take):
            target = start + j + 1  # the token the logits at this position predict
            if target <= first or target >= len(job.tokens):
                continue
            token = job.tokens[target]
            found.append(self.logprobs.entry(index + j, token, job.logprobs or 0, slot.prompt_text))
            slot.prompt_text += len(self._text_of(token))

    def _sample(self, slot: Slot, index: int, picked: int | Exception | None = None) -> None:
        """Take the next token at batch position `index` (`picked` already when given)."""
        job, sampler, text = slot.job, slot.sampler, slot.text
        assert job is not None and sampler is not None and text is not None
        if slot.max_tokens <= 0:  # the prompt alone was to be read (echo, max_tokens=0)
            self._finish(slot, "length")
            return
        if isinstance(picked, Exception):
            raise picked
        if picked is not None:
            token = picked
        elif (row := self._row_of(index)).chain_key is not None:  # narrowed: its own or a leader's
            token = self._device_pick(sampler, index, row.chain_key)
        elif slot.device_pick and row is slot:  # greedy, on the device
            token = self._device_pick(sampler, index, None)
        else:
            token = sampler.sample(self.ctx, index)
        if slot.ttft_ms is None:
            slot.ttft_ms = (time.perf_counter() - job.started) * 1000
        slot.generated += 1
        job.generated = slot.generated
        self.tokens_generated += 1
        if self.tokens.ends_turn(token, text.stops):
            slot.generated -= 1  # like EOS, the end-of-turn token is not part of the reply
            self._finish(slot, "stop")
            return
        if slot.logprobs is not None:
            self._record_logprobs(slot, index, token)
        if text.add(slot.decoder.decode(self.tokens.text(token, job.shown))):
            if slot.logprobs is not None:  # the tokens that began the stop string go too
                slot.logprobs = [e for e in slot.logprobs if e["text_offset"] < len(text.text)]
            self._finish(slot, "stop")
        elif slot.generated >= slot.max_tokens:
            self._finish(slot, "length")
        elif job.deadline is not None and time.perf_counter() >= job.deadline:
            self._finish(slot, "time")
        elif job.cancelled:
            self._finish(slot, "cancelled")
        else:
            slot.next_token = token
            if slot.lookup is not None:
                slot.lookup.add(token)

    def _row_of(self, index: int) -> Slot:
        """The slot whose sequence's row is at batch position `index` (a follower samples its
        first token from its leader's)."""
        return self.slots[self.batch.seq[index]]

    def _device_pick(self, sampler: Sampler, index: int, key: int | None) -> int:
        """The next token of a sequence that picks on the device, at batch position `index`
        (its row narrowed by a top-k chain of `key`, or picked by a greedy chain, key None):
        the greedy chain's (the host's again where a ban decides), or the host's pick among
        the candidates the top-k chain left. Where the backend did not run its chain (no
        token, no candidates: llama_set_sampler took it, but the device lacks a step, as
        CUDA without CUB lacks a top-k over a whole vocabulary), llama.cpp left the whole
        row: the host picks from it, and the engine stops asking the device for that kind
        of pick (a top-k's slots get greedy chains at their next step; greedy's failing,
        every chain goes after this step's picks)."""
        ctx = self.ctx
        if key is not None:
            n = int(llama_cpp.llama_get_sampled_candidates_count_ith(ctx, index))
            if n == key:
                self.tokens_picked_on_device += 1
                ids, logits = candidates_view(
                    llama_cpp.llama_get_sampled_candidates_ith(ctx, index),
                    llama_cpp.llama_get_sampled_logits_ith(ctx, index),
                    n,
                )
                return sampler.pick_from(ids, logits)
            if self.device_draws:
                log.warning(
                    "engine %s: llama.cpp's backend left no top-k candidates; narrowing no "
                    "rows from now on",
                    self.name,
                )
                self.device_draws = False
        else:
            token = int(llama_cpp.llama_get_sampled_token_ith(ctx, index))
            if token >= 0 and not sampler.checked_on_host(token):
                self.tokens_picked_on_device += 1
                return token
            if token < 0 and self.device_sampling:
                log.warning(
                    "engine %s: llama.cpp's backend picked no token; picking on the host",
                    self.name,
                )
                self.device_sampling = False  # the chains go after this step's picks
        if llama_cpp.llama_get_sampled_logits_count_ith(ctx, index) != sampler.n_vocab:
            raise RuntimeError("llama.cpp's backend left neither a token nor the row's logits")
        return sampler.sample(ctx, index)  # from the raw row, bans and all

    def _record_logprobs(self, slot: Slot, index: int, token: int) -> None:
        job, text, found = slot.job, slot.text, slot.logprobs
        assert job is not None and text is not None and found is not None
        entry = self.logprobs.entry(index, token, job.logprobs or 0, len(text.text))
        found.append(entry)
        if job.streamed:
            self._send(job, (LOGPROBS, entry))  # before the text it brings

    # -- ending sequences ---------------------------------------------------------------------------
    def _finish(self, slot: Slot, reason: str) -> None:
        job, text = slot.job, slot.text
        assert job is not None and text is not None
        if reason != "stop":  # a stop string cut the text; nothing may follow it
            text.add(slot.decoder.decode(b"", final=True))
        text.flush()
        result = self._result(
            job, text.text, reason, slot.generated, slot.cached, slot.ttft_ms, len(job.tokens)
        )
        result.logprobs, result.prompt_logprobs = slot.logprobs, slot.prompt_logprobs
        result.drafted_tokens, result.drafted_kept = slot.drafted, slot.kept
        self._release(slot)
        self._send(job, (DONE, result))

    def _fail(self, slot: Slot, reason: str) -> None:
        job = slot.job
        assert job is not None
        log.warning("engine %s: sequence %s failed: %s", self.name, job.label, reason)
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.cache.clear()
        self._release(slot)
        self._send(job, (FAILED, reason))

    def _release(self, slot: Slot) -> None:
        slot.device_pick = False  # its chain stays attached for the next sequence
        if slot.sampler is not None:
            slot.sampler.free()
        slot.job, slot.sampler, slot.text, slot.decoder = None, None, None, None
        slot.pending = []
        slot.follows, slot.logprobs, slot.prompt_logprobs = None, None, None
        slot.lookup, slot.draft = None, []
        for other in self.slots:  # those waiting for this prompt read it themselves now
            if other.follows is slot and other.job is not None:
                other.follows = None
                other.pending = list(other.job.tokens)
        slot.last_used = time.monotonic()
        # A sequence ended: its cells may be reused, so try the full batch again.
        self._hold = False
        self._drafts = True
        self._prompt_budget = self.n_batch

    @staticmethod
    def _result(
        job: Sequence,
        text: str,
        reason: str,
        generated: int,
        cached: int,
        ttft_ms: float | None,
        prompt_tokens: int | None = None,
    ) -> Generation:
        return Generation(
            text=text,
            finish_reason=reason,
            prompt_tokens=len(job.tokens) if prompt_tokens is None else prompt_tokens,
            completion_tokens=generated,
            ttft_ms=ttft_ms,
            generation_ms=(time.perf_counter() - job.started) * 1000,
            cached_tokens=cached,
        )

    def _kv_full(self, *, had_prompt: bool) -> None:
        """llama_decode found no room: free cached cells, then shrink the batch, then end one."""
        self._hold = True
        idle = [s for s in self.slots if s.job is None and s.cache]
        if idle:
            slot = min(idle, key=lambda s: s.last_used)
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            slot.cache.clear()
            return
        if had_prompt:
            self._prompt_budget = 0  # running sequences go on; prompts wait for room
            return
        holding = [s for s in self._active() if s.cache] or self._active()
        newest = max(holding, key=lambda s: s.admitted)
        log.warning(
            "engine %s: the KV cache (%d cells) is full; ending sequence %s",
            self.name,
            self.kv_size,
            newest.job.label if newest.job else "?",
        )
        if newest.pending:
            self._fail(
                newest,
                f"the worker's KV cache ({self.kv_size} tokens shared by {self.n_slots} slots) "
                "had no room for the prompt; submit it again, or give the worker a larger "
                "--kv-size",
            )
        else:
            llama_cpp.llama_memory_seq_rm(self.mem, newest.seq_id, -1, -1)
            newest.cache.clear()
            self._finish(newest, "length")


def _pick(share: list[tuple[Slot, int]], ctx: Any) -> dict[int, int | Exception]:
    """Each slot's next token from its logits at its batch position (a sampling thread)."""
    picked: dict[int, int | Exception] = {}
    for slot, index in share:
        assert slot.sampler is not None
        try:
            picked[slot.seq_id] = slot.sampler.sample(ctx, index)
        except Exception as e:  # that sequence fails, in `_step`
            picked[slot.seq_id] = e
    return picked
