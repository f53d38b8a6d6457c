"""ModelHost: one llama.cpp model, loaded once, and the loop that generates from it.

The loop runs token by token (llama-cpp-python's `Llama.generate`) so that farm controls
what a farm needs between two tokens: streaming each piece, stop strings, the time limit,
cooperative cancel, and exact token counts.
"""

from __future__ import annotations

import codecs
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.errors import JobFailed, WorkerStartError
from farm.request import SAMPLING_FIELDS, Message, Request, Stopping

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSpec:
    """How to load one model: what the registry records for it."""

    name: str
    path: str
    n_ctx: int = 4096
    n_gpu_layers: int = -1
    chat_format: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class Generation:
    text: str
    finish_reason: str  # stop, length, time, cancelled
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    generation_ms: float


# Farm's sampling names -> Llama.generate's keyword names.
_GENERATE_ARGS = {
    "temperature": "temp",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "mirostat_mode": "mirostat_mode",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}
DEFAULT_PENALTY_LAST_N = 64


class ModelHost:
    """Holds one loaded model. Not thread-safe: a worker runs one job at a time on it."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.llm: Any = None
        self.device = "cpu"
        self.chat_source = ""

    # -- loading ------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the GGUF (all layers on the GPU when llama.cpp has one). WorkerStartError if not."""
        path = Path(self.spec.path)
        check_gguf(path, self.spec.name)
        import llama_cpp

        gpu = bool(llama_cpp.llama_supports_gpu_offload()) and self.spec.n_gpu_layers != 0
        started = time.perf_counter()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=self.spec.n_ctx,
                n_gpu_layers=self.spec.n_gpu_layers if gpu else 0,
                verbose=False,
                last_n_tokens_size=DEFAULT_PENALTY_LAST_N,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise WorkerStartError(
                f"llama.cpp could not load model '{self.spec.name}' from {path}: {e}"
            ) from e
        self.device = "cuda" if gpu else "cpu"
        self._choose_chat_format()
        log.info(
            "loaded model %s (%s) on %s in %.2fs; chat: %s",
            self.spec.name,
            path.name,
            self.device,
            time.perf_counter() - started,
            self.chat_source,
        )

    def _choose_chat_format(self) -> None:
        # The GGUF's own template when it has one; else the format recorded in the registry.
        # llama-cpp-python would otherwise guess "llama-2" and return empty chat replies.
        if "tokenizer.chat_template" in self.llm.metadata:
            self.chat_source = "the GGUF's chat template"
            return
        if self.spec.chat_format:
            self.llm.chat_format = self.spec.chat_format
            self.chat_source = f"registry chat format '{self.spec.chat_format}'"
        else:
            self.chat_source = (
                "llama-cpp-python's guess (set a chat format with `farm models add --chat-format`)"
            )

    def warm_up(self) -> None:
        """One short generation, so the first real job does not pay for first-use costs."""
        self.generate(
            Request(model=self.spec.name, prompt="Hello", stopping=Stopping(max_tokens=1))
        )

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    # -- generating ----------------------------------------------------------------------------
    def generate(
        self,
        request: Request,
        *,
        on_text: Callable[[str], None] = lambda _: None,
        should_cancel: Callable[[], bool] = lambda: False,
        time_limit_s: float | None = None,
    ) -> Generation:
        """Run one request to its end. JobFailed when it cannot be served (prompt too long)."""
        llm = self.llm
        started = time.perf_counter()
        tokens, template_stops = self._prompt_tokens(request)
        n_ctx = llm.n_ctx()
        if len(tokens) >= n_ctx:
            raise JobFailed(
                f"the prompt is {len(tokens)} tokens but model '{self.spec.name}' holds "
                f"{n_ctx}; shorten it, or register the model with a larger context (--n-ctx)"
            )
        sampling = self._sampling(request)
        llm.last_n_tokens_size = sampling.pop("penalty_last_n", DEFAULT_PENALTY_LAST_N)
        seed = sampling.pop("seed", None)
        llm.set_seed(seed if seed is not None else random.randrange(2**31))
        kwargs = {_GENERATE_ARGS[k]: v for k, v in sampling.items() if k in _GENERATE_ARGS}

        stopping = request.stopping
        limits = [
            s for s in (stopping.max_time_ms and stopping.max_time_ms / 1000, time_limit_s) if s
        ]
        deadline = started + min(limits) if limits else None
        max_tokens = min(stopping.max_tokens, n_ctx - len(tokens))
        text = _TextAssembler(tuple(stopping.stop) + template_stops, on_text)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        finish, count, ttft = "length", 0, None
        generator = llm.generate(tokens, reset=True, **kwargs)
        try:
            for token in generator:
                if ttft is None:
                    ttft = (time.perf_counter() - started) * 1000
                count += 1
                if self._ends_turn(token, text.stops):
                    count -= 1  # like EOS, the end-of-turn token is not part of the reply
                    finish = "stop"
                    break
                if text.add(decoder.decode(llm.detokenize([token]))):
                    finish = "stop"
                    break
                if count >= max_tokens:
                    break
                if deadline is not None and time.perf_counter() >= deadline:
                    finish = "time"
                    break
                if should_cancel():
                    finish = "cancelled"
                    break
        finally:
            generator.close()
        text.add(decoder.decode(b"", final=True))
        text.flush()
        return Generation(
            text=text.text,
            finish_reason=finish,
            prompt_tokens=len(tokens),
            completion_tokens=count,
            ttft_ms=ttft,
            generation_ms=(time.perf_counter() - started) * 1000,
        )

    def _ends_turn(self, token: int, stops: tuple[str, ...]) -> bool:
        """End of generation, or a control token that starts a stop string (<end_of_turn>).

        Control tokens detokenize to nothing, so a chat template's stop string such as
        "<end_of_turn>\n" would never match the text; match the token's own name instead.
        """
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            return True
        if not llama_cpp.llama_vocab_is_control(vocab, token):
            return False
        name = self.llm.detokenize([token], special=True).decode("utf-8", "replace")
        return bool(name) and any(stop.startswith(name) for stop in stops)

    def _sampling(self, request: Request) -> dict[str, Any]:
        defaults = {k: v for k, v in self.spec.defaults.items() if k in SAMPLING_FIELDS}
        given = request.sampling.model_dump(exclude_none=True)
        return {**defaults, **given}

    def _prompt_tokens(self, request: Request) -> tuple[list[int], tuple[str, ...]]:
        if request.messages is None:
            assert request.prompt is not None
            return self.llm.tokenize(request.prompt.encode("utf-8"), add_bos=True, special=True), ()
        return chat_prompt(self.llm, request.messages)


# Chat formats in llama-cpp-python that drop system messages; Gemma's own template folds the
# system text into the first user turn, so farm does that instead of losing it.
_FOLD_SYSTEM = frozenset({"gemma"})


def _fold_system(messages: Sequence[Message]) -> list[Message]:
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    rest = [m for m in messages if m.role != "system"]
    if not system:
        return rest
    for i, m in enumerate(rest):
        if m.role == "user":
            rest[i] = Message(role="user", content=f"{system}\n\n{m.content}")
            return rest
    return [Message(role="user", content=system), *rest]


def chat_prompt(llm: Any, messages: Sequence[Message]) -> tuple[list[int], tuple[str, ...]]:
    """The prompt tokens and extra stop strings llama-cpp-python's chat handler would use.

    The handler for the model's chat format formats the messages, tokenizes them, then calls
    `create_completion`; a stand-in Llama catches that call, so farm uses exactly the
    template llama-cpp-python would, for every format it knows, and runs its own loop.
    """
    from llama_cpp import llama_chat_format

    handler = llm.chat_handler or llm._chat_handlers.get(llm.chat_format)
    if handler is None:
        handler = llama_chat_format.get_chat_completion_handler(llm.chat_format)
    if llm.chat_format in _FOLD_SYSTEM and llm.chat_handler is None:
        messages = _fold_system(messages)
    stand_in = _CapturingLlama(llm)
    try:
        handler(llama=stand_in, messages=[m.model_dump() for m in messages], stream=False)
    except _Captured as captured:
        stop = captured.stop
        stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
        return list(captured.prompt), tuple(s for s in stops if s)
    raise JobFailed(f"chat format '{llm.chat_format}' is not supported by farm's worker")


class _Captured(Exception):
    def __init__(self, prompt: Sequence[int], stop: Any):
        self.prompt, self.stop = prompt, stop


class _CapturingLlama:
    def __init__(self, llm: Any):
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, prompt: Sequence[int], stop: Any = None, **_: Any) -> Any:
        raise _Captured(prompt, stop)


class _TextAssembler:
    """Collects generated text, cuts it at the first stop string, and streams what is safe.

    Text that could be the start of a stop string is held back until it is clearly not.
    """

    def __init__(self, stops: tuple[str, ...], emit: Callable[[str], None]):
        self.stops = stops
        self.emit = emit
        self.text = ""
        self.sent = 0

    def add(self, piece: str) -> bool:
        """Add text; True when a stop string was reached (the text ends before it)."""
        if not piece:
            return False
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        self.text += piece
        cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.flush()
            return True
        self._send(len(self.text) - self._held_back())
        return False

    def flush(self) -> None:
        self._send(len(self.text))

    def _held_back(self) -> int:
        held = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:n]):
                    held = n
                    break
        return held

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.emit(self.text[self.sent : upto])
            self.sent = upto


def check_gguf(path: Path, name: str) -> None:
    """WorkerStartError unless `path` is a readable GGUF file."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except FileNotFoundError as e:
        raise WorkerStartError(
            f"model '{name}': file {path} does not exist; fix the path with "
            f"`farm models remove {name}` and `farm models add {name} PATH.gguf`"
        ) from e
    except OSError as e:
        raise WorkerStartError(f"model '{name}': cannot read {path}: {e}") from e
    if magic != GGUF_MAGIC:
        raise WorkerStartError(
            f"model '{name}': {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
            "convert it with llama.cpp's convert_hf_to_gguf.py"
        )
