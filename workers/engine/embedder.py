"""The embedder: pooled vectors for embeddings jobs, the inputs of many jobs in one decode.

    loop:  take waiting inputs, one of each job in turn (oldest first), each input a
           sequence of its own, until the batch holds n_batch tokens or n_seq_max sequences
           llama_decode once (every token is an output; llama.cpp pools each sequence)
           read each sequence's pooled vector (llama_get_embeddings_seq), shorten and
           normalise it, hand it to its job; clear the KV cache for the next batch
           a job whose inputs all have their vector ends with ("done", Generation)

Why a context of its own, beside the generation engine's, on the same llama_model: the
weights are loaded once and both contexts read them (llama.cpp allows any number of
contexts on one model), but a pooled embedding context differs from a generation context
in every way that matters to the loop:

- its pooling type is fixed when it is created, and with embeddings on every token of a
  batch is an output (llama.cpp refuses a pooled batch that is not): a generation step,
  which asks for one row of logits per sequence, cannot share its decode;
- an input needs its whole sequence in one ubatch to be pooled right, and its KV cells are
  worthless once its vector is read: the context holds one batch (n_ctx = n_batch) and is
  cleared after each decode, while the generation context's cells are its prompt cache,
  which embedding inputs would otherwise evict;
- an embeddings job takes no generation slot: 64 inputs of one request are 64 sequences of
  one decode here, whatever --parallel is.

Toggling `llama_set_embeddings` on the generation context would keep one context but make
every decode either all-generation or all-embedding anyway, and put embedding inputs in
the prompt cache's cells. The price of two contexts is a second, small KV cache (n_batch
cells) and compute buffer. The embedder runs its own thread, so a batch of embeddings does
not wait for a long generation's tokens, nor they for it; on a CPU the two threads share
its cores when both are busy. Only this thread calls this context.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from workers.engine.job import DONE, FAILED, Generation

log = logging.getLogger(__name__)

# Every decode holds at least this many tokens: a short one is padded with a filler
# sequence whose vector is dropped. llama.cpp's CPU matrix kernels take another path below
# 64 rows, and a vector came out of a 10-token decode at cosine 0.9996 to the same input's
# vector in a 64-input batch; padded, the two are the same to the last bit. So a text's
# vector does not depend on what else was in its batch (the cost: a lone short input
# computes 64 tokens).
MIN_DECODE_TOKENS = 64

POOLING = {
    "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
    "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
}
MAX_SEQUENCES = 256  # llama.cpp's limit on n_seq_max


class EmbedderError(RuntimeError):
    """The embedder's context could not be created."""


@dataclass(eq=False)
class EmbeddingJob:
    """One embeddings job as the embedder sees it: its inputs' tokens, and how to finish
    their vectors. Follows the Sequence boundary: `events`, `cancel()`, `cancelled`."""

    inputs: list[list[int]]
    normalize: bool = True
    dimensions: int | None = None  # keep the first this many components
    started: float = field(default_factory=time.perf_counter)
    label: str = ""
    generated: int = 0  # generation's counter; an embeddings job generates no tokens
    events: queue.SimpleQueue[tuple[str, Any]] = field(default_factory=queue.SimpleQueue)
    vectors: list[list[float] | None] = field(default_factory=list)
    next_input: int = 0  # the first input not yet in a batch
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def prompt_tokens(self) -> int:
        return sum(len(t) for t in self.inputs)


def finish_vector(values: list[float], dimensions: int | None, normalize: bool) -> list[float]:
    """The first `dimensions` components (all without it), scaled to unit length when
    `normalize` (llama-server's default, and what cosine similarity assumes)."""
    if dimensions is not None:
        values = values[:dimensions]
    if normalize:
        norm = math.sqrt(sum(v * v for v in values))
        if norm > 0:
            values = [v / norm for v in values]
    return values


class Embedder:
    """Pooled embeddings over one loaded model. Thread-safe: `submit` from any thread."""

    def __init__(
        self,
        model: Any,
        *,
        pooling: str,
        n_batch: int = 512,
        max_sequences: int = MAX_SEQUENCES,
        threads: int = 1,
        name: str = "",
    ):
        if pooling not in POOLING:
            raise EmbedderError(f"pooling must be one of {', '.join(POOLING)}, not {pooling!r}")
        self.name = name
        self.pooling = pooling
        vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        bos = llama_cpp.llama_vocab_bos(vocab)
        self.filler = bos if 0 <= bos < self.n_vocab else 0
        self.n_embd = int(llama_cpp.llama_model_n_embd_out(model))
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = POOLING[pooling]
        # The KV cache holds one batch: it is cleared after every decode.
        params.n_ctx = params.n_batch = params.n_ubatch = n_batch
        # One sequence more than a batch plans: the filler that pads a short decode.
        params.n_seq_max = max(2, min(max_sequences, MAX_SEQUENCES, n_batch))
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        # Without flash attention a vector does not depend on where its input sits in the
        # batch: with it (llama.cpp's default on the CPU) an input at the third place of a
        # batch came out at cosine 0.99994 to the same input at the first.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise EmbedderError(
                f"llama.cpp could not create an embedding context of {n_batch} tokens "
                "(out of memory?)"
            )
        self.n_batch = min(n_batch, int(llama_cpp.llama_n_batch(self.ctx)))
        self.n_seq_max = int(params.n_seq_max) - 1  # sequences of inputs per decode
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.inputs_embedded = 0  # since start
        self.decodes = 0
        self._waiting: collections.deque[EmbeddingJob] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"embedder-{name}", daemon=True)
        self._thread.start()

    # -- the boundary ---------------------------------------------------------------------------
    def submit(self, job: EmbeddingJob) -> None:
        """Queue a job; its events arrive on `job.events`. A job that cannot be served (an
        input over the batch, a token outside the vocabulary) fails at once."""
        problem = self._problem(job)
        if problem is not None:
            job.events.put((FAILED, problem))
            return
        job.vectors = [None] * len(job.inputs)
        with self._cond:
            if self._stopping:
                job.events.put((FAILED, "the worker is stopping"))
                return
            self._waiting.append(job)
            self._cond.notify()

    def _problem(self, job: EmbeddingJob) -> str | None:
        if not job.inputs:
            return "invalid 'input': nothing to embed"
        for i, tokens in enumerate(job.inputs):
            if not tokens:
                return f"invalid 'input': input {i} has no tokens"
            if len(tokens) > self.n_batch:
                return (
                    f"invalid 'input': input {i} is {len(tokens)} tokens but model "
                    f"'{self.name}' embeds at most {self.n_batch} tokens per input; shorten it"
                )
            bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
            if bad is not None:
                return (
                    f"invalid 'input': token {bad} of input {i} is outside model "
                    f"'{self.name}''s vocabulary (0 to {self.n_vocab - 1})"
                )
        if job.dimensions is not None and job.dimensions > self.n_embd:
            return (
                f"invalid 'dimensions': model '{self.name}' gives vectors of {self.n_embd}, "
                f"not {job.dimensions}"
            )
        return None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the loop (jobs still waiting fail) and free llama.cpp's memory."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        self.ctx = None

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting:
                        self._cond.wait()
                    if self._stopping:
                        break
                    planned = self._plan()
                if planned:
                    self._decode(planned)
        except Exception:
            log.exception("embedder %s stopped on an error", self.name)
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                job.events.put((FAILED, "the worker's embedder stopped"))
            self._waiting.clear()

    def _plan(self) -> list[tuple[EmbeddingJob, int]]:
        """The next batch, as (job, input index) per sequence: one input of each waiting job
        in turn (oldest first), round after round, until no more fit. So a job of a few
        inputs is not held behind one of 2,048, and every job moves each decode. Cancelled
        jobs end here. Holds the lock."""
        planned: list[tuple[EmbeddingJob, int]] = []
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            job.events.put((DONE, self._result(job, "cancelled")))
        tokens, added = 0, True
        while added and len(planned) < self.n_seq_max:
            added = False
            for job in self._waiting:
                if job.next_input >= len(job.inputs):
                    continue
                size = len(job.inputs[job.next_input])
                if tokens + size > self.n_batch:
                    continue  # another job's next input may still fit
                planned.append((job, job.next_input))
                tokens += size
                job.next_input += 1
                added = True
                if len(planned) >= self.n_seq_max:
                    break
        return planned

    def _decode(self, planned: list[tuple[EmbeddingJob, int]]) -> None:
        b, n = self.batch, 0
        for seq_id, (job, index) in enumerate(planned):
            for pos, token in enumerate(job.inputs[index]):
                b.token[n], b.pos[n], b.n_seq_id[n] = token, pos, 1
                b.seq_id[n][0] = seq_id
                b.logits[n] = True  # a pooled context outputs every token
                n += 1
        pad = min(MIN_DECODE_TOKENS, self.n_batch) - n
        for pos in range(max(0, pad)):  # the filler: BOS tokens as a sequence of their own
            b.token[n], b.pos[n], b.n_seq_id[n] = self.filler, pos, 1
            b.seq_id[n][0] = len(planned)
            b.logits[n] = True
            n += 1
        b.n_tokens = n
        ret = llama_cpp.llama_decode(self.ctx, b)
        try:
            if ret != 0:
                self._fail_all({job for job, _ in planned}, f"llama_decode failed with code {ret}")
                return
            failed: set[EmbeddingJob] = set()
            for seq_id, (job, index) in enumerate(planned):
                ptr = llama_cpp.llama_get_embeddings_seq(self.ctx, seq_id)
                if not ptr:
                    failed.add(job)
                    continue
                job.vectors[index] = finish_vector(
                    ptr[: self.n_embd], job.dimensions, job.normalize
                )
        finally:
            llama_cpp.llama_memory_clear(self.mem, True)
        if failed:
            self._fail_all(failed, "llama.cpp gave no pooled vector")
        self.decodes += 1
        self.inputs_embedded += len(planned)
        for job in dict.fromkeys(job for job, _ in planned):
            if job not in failed and all(v is not None for v in job.vectors):
                with self._cond:
                    if job in self._waiting:
                        self._waiting.remove(job)
                job.events.put((DONE, self._result(job, "stop")))

    def _fail_all(self, jobs: set[EmbeddingJob], reason: str) -> None:
        log.warning("embedder %s: %d jobs failed: %s", self.name, len(jobs), reason)
        with self._cond:
            for job in jobs:
                if job in self._waiting:
                    self._waiting.remove(job)
                job.next_input = len(job.inputs)  # nothing more of it is planned
                job.events.put((FAILED, reason))

    @staticmethod
    def _result(job: EmbeddingJob, reason: str) -> Generation:
        done = reason != "cancelled"
        return Generation(
            text="",
            finish_reason=reason,
            prompt_tokens=job.prompt_tokens,
            completion_tokens=0,
            ttft_ms=None,
            generation_ms=(time.perf_counter() - job.started) * 1000,
            embeddings=[v for v in job.vectors if v is not None] if done else None,
        )
