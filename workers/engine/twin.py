"""TwinEngine: an in-memory twin of the Engine, with deterministic text and no llama.cpp.

The same boundary (a Sequence in; text, done and failed events out), no model.

Each token is one byte, and a reply echoes the prompt's bytes once (a leading BOS_TOKEN
skipped), then ends with finish reason "stop", as an end-of-generation token would.
Stop strings, max_tokens, the context, deadlines and cancel end a sequence as they do on
the real engine, and at most `slots` sequences run at once. `seconds_per_token` paces
the reply so that a test can follow or cancel a job mid-stream. For fast tests of what
sits above the engine: the Celery task, the gateway, the scheduler.
"""

from __future__ import annotations

import codecs
import collections
import threading
import time
from dataclasses import dataclass

from workers.engine.job import DONE, FAILED, TEXT, Generation, Sequence
from workers.engine.text import TextAssembler

BOS_TOKEN = 256  # outside the byte range: never echoed


def byte_tokens(text: str) -> list[int]:
    """The twin's tokenizer: BOS_TOKEN, then one token per UTF-8 byte."""
    return [BOS_TOKEN, *text.encode("utf-8")]


@dataclass(eq=False)
class _Running:
    seq: Sequence
    reply: bytes
    text: TextAssembler
    decoder: codecs.IncrementalDecoder
    max_tokens: int
    ttft_ms: float | None = None


class TwinEngine:
    """Runs sequences in memory on one thread. Thread-safe: `submit` from any thread."""

    def __init__(
        self, *, slots: int = 4, n_ctx: int = 4096, seconds_per_token: float = 0.0, name: str = ""
    ):
        self.n_slots = slots
        self.n_ctx = n_ctx
        self.kv_size = n_ctx * slots
        self.seconds_per_token = seconds_per_token
        self.name = name
        self.tokens_generated = 0
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[_Running] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"twin-{name}", daemon=True)
        self._thread.start()

    # -- the boundary, as Engine's --------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        if len(seq.tokens) >= self.n_ctx:
            seq.events.put(
                (FAILED, f"the prompt is {len(seq.tokens)} tokens but the model holds {self.n_ctx}")
            )
            return
        with self._cond:
            if self._stopping:
                seq.events.put((FAILED, "the worker is stopping"))
                return
            self._waiting.append(seq)
            self._cond.notify()

    def submit_all(self, seqs: list[Sequence]) -> None:
        """As Engine's: the twin has no KV cache to share, each sequence runs on its own."""
        for seq in seqs:
            self.submit(seq)

    @property
    def busy(self) -> int:
        return len(self._running) + len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    # -- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    break
                while self._waiting and len(self._running) < self.n_slots:
                    self._running.append(self._admit(self._waiting.popleft()))
            for run in list(self._running):
                self._step(run)
            if self.seconds_per_token and self._running:
                with self._cond:  # a close() does not wait for the pause
                    self._cond.wait(self.seconds_per_token)
        for seq in [r.seq for r in self._running] + list(self._waiting):
            seq.events.put((FAILED, "the worker's engine stopped"))

    def _admit(self, seq: Sequence) -> _Running:
        reply = bytes(t for t in seq.tokens if 0 <= t < 256)
        return _Running(
            seq=seq,
            reply=reply,
            text=TextAssembler(
                seq.stops,
                (lambda piece: seq.events.put((TEXT, piece))) if seq.streamed else None,
            ),
            decoder=codecs.getincrementaldecoder("utf-8")(errors="replace"),
            max_tokens=min(seq.max_tokens, self.n_ctx - len(seq.tokens)),
        )

    def _step(self, run: _Running) -> None:
        seq = run.seq
        if seq.cancelled:
            return self._finish(run, "cancelled")
        if seq.deadline is not None and time.perf_counter() >= seq.deadline:
            return self._finish(run, "time")
        if run.max_tokens <= 0:
            return self._finish(run, "length")
        if seq.generated >= len(run.reply):
            return self._finish(run, "stop")  # the end-of-generation token: not counted
        token = run.reply[seq.generated]
        seq.generated += 1
        self.tokens_generated += 1
        if run.ttft_ms is None:
            run.ttft_ms = (time.perf_counter() - seq.started) * 1000
        if run.text.add(run.decoder.decode(bytes([token]))):
            return self._finish(run, "stop")
        if seq.generated >= run.max_tokens:
            return self._finish(run, "length")
        return None

    def _finish(self, run: _Running, reason: str) -> None:
        if reason != "stop":
            run.text.add(run.decoder.decode(b"", final=True))
        run.text.flush()
        seq = run.seq
        self._running.remove(run)
        seq.events.put(
            (
                DONE,
                Generation(
                    text=run.text.text,
                    finish_reason=reason,
                    prompt_tokens=len(seq.tokens),
                    completion_tokens=seq.generated,
                    ttft_ms=run.ttft_ms,
                    generation_ms=(time.perf_counter() - seq.started) * 1000,
                ),
            )
        )
