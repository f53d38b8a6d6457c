"""ModelHost: one llama.cpp model, loaded once, and the engine that generates from it.

The host owns what is per model: the weights, the tokenizer and chat template (through
llama-cpp-python's `Llama`, kept with a tiny context of its own), and an `Engine` that runs
every sequence of that model in one continuous batch. `generate` is the job thread's view:
the request as a Sequence (`workers.prepare`), handed to the engine, its events followed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import llama_cpp

from farm.config import get_settings
from farm.errors import JobFailed, WorkerStartError
from farm.request import Request, Stopping
from farm.tools.formats import ToolPlan
from farm.tools.parse import Parsed
from farm.tools.schema import ToolCallDelta
from workers.choices import Outcome, Run, outcome
from workers.engine import (
    DONE,
    FAILED,
    LOGPROBS,
    TEXT,
    Embedder,
    EmbedderError,
    EmbeddingJob,
    Engine,
    EngineError,
    Generation,
    SequenceRunner,
)
from workers.engine import Sequence as EngineSequence  # noqa: F401
from workers.prepare import (
    PromptTokens,
    embedding_job,
    marker_tokens,
    prompt_tokens,
    sequence_for,
    tool_plan,
)
from workers.repack import default_repack, model_params
from workers.spec import ModelSpec
from workers.toolcalls import ReplyCalls

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# The host's own Llama context only serves tokenization and chat templates.
_TOKENIZER_CTX = 64


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def available_memory() -> int | None:
    """Bytes of memory free for new allocations (Linux's MemAvailable), if known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class EngineOptions:
    """How a worker runs each model it loads: a worker's options, not the model's."""

    slots: int = 4
    threads: int = field(default_factory=available_cores)
    kv_size: int | None = None  # cells shared by the slots; None: n_ctx x slots
    n_batch: int = 512
    # Weights in llama.cpp's repacked CPU buffers: off where its AMX kernels would run (repack.py)
    repack: bool = field(default_factory=default_repack)
    # Picks on the device: off, greedy or all (the engine's doc; FARM_DEVICE_SAMPLING)
    device_sampling: Literal["off", "greedy", "all"] = field(
        default_factory=lambda: get_settings().device_sampling
    )


class ModelHost:
    """Holds one loaded model and its engine. `generate` may be called from many threads."""

    def __init__(self, spec: ModelSpec, options: EngineOptions | None = None):
        self.spec = spec
        self.options = options or EngineOptions()
        self.llm: Any = None
        self.engine: SequenceRunner | None = None
        self.device = "cpu"
        self.chat_source = ""
        self.embedder: Embedder | None = None  # when the model serves embeddings, once asked
        self._embedder_lock = threading.Lock()
        # The tool plans of started sequences whose replies `follow` parses into calls.
        self._tool_plans: weakref.WeakKeyDictionary[Run, ToolPlan] = weakref.WeakKeyDictionary()

    # -- loading ------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the GGUF (all layers on the GPU when llama.cpp has one) and start its engine.

        WorkerStartError when the file cannot be loaded or the engine's context not created."""
        path = Path(self.spec.path)
        check_gguf(path, self.spec.name)
        gpu = bool(llama_cpp.llama_supports_gpu_offload()) and self.spec.n_gpu_layers != 0
        started = time.perf_counter()
        if not self.options.repack and not gpu:
            log.info(
                "loading model %s without llama.cpp's repacked weights (its AMX kernels crash on "
                "some CPUs; FARM_REPACK=true uses them): workers/repack.py",
                self.spec.name,
            )
        try:
            with model_params(repack=self.options.repack):
                self.llm = llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=_TOKENIZER_CTX,
                    n_batch=_TOKENIZER_CTX,
                    n_gpu_layers=self.spec.n_gpu_layers if gpu else 0,
                    verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as e:
            raise WorkerStartError(
                f"llama.cpp could not load model '{self.spec.name}' from {path}: {e}"
            ) from e
        opts = self.options
        try:
            self._check_kv_memory()
            self.engine = Engine(
                self.llm.model,
                slots=opts.slots,
                n_ctx=self.spec.n_ctx,
                kv_size=opts.kv_size,
                n_batch=opts.n_batch,
                threads=opts.threads,
                name=self.spec.name,
                async_decode=gpu and self._all_layers_offloaded(),
                sampling_threads=opts.threads if not gpu or cuda_only() else 1,
                device_sampling=opts.device_sampling != "off",
                device_draws=opts.device_sampling == "all",
            )
        except (EngineError, EmbedderError) as e:
            self.close()
            raise WorkerStartError(f"model '{self.spec.name}': {e}") from e
        except WorkerStartError:
            self.close()
            raise
        self.device = "cuda" if gpu else "cpu"
        self._choose_chat_format()
        log.info(
            "loaded model %s (%s) on %s in %.2fs: %d slots, %d KV cells, %d threads; chat: %s",
            self.spec.name,
            path.name,
            self.device,
            time.perf_counter() - started,
            opts.slots,
            self.engine.kv_size,
            opts.threads,
            self.chat_source,
        )

    def pooling(self) -> str | None:
        """How this model pools embeddings: the registry's choice, else the GGUF's own
        pooling type (an embedding model's), else mean for a model flagged `embedding`;
        None when it serves no embeddings."""
        if self.spec.pooling:
            return self.spec.pooling
        meta = self.llm.metadata
        own = meta.get(f"{meta.get('general.architecture', '')}.pooling_type")
        found = {"1": "mean", "2": "cls", "3": "last"}.get(str(own))
        if found:
            return found
        return "mean" if self.spec.embedding else None

    def _start_embedder(self) -> None:
        """The embedder, made on the first embeddings job, not at load: a worker that
        restarts takes its jobs back without building a context it may not need."""
        pooling = self.pooling()
        if pooling is None:
            return
        opts = self.options
        self.embedder = Embedder(
            self.llm.model,
            pooling=pooling,
            n_batch=opts.n_batch,
            threads=opts.threads,
            name=self.spec.name,
        )

    def kv_bytes_per_token(self) -> int:
        """Bytes one KV cell takes (f16 keys and values over every layer), from the GGUF."""
        meta = self.llm.metadata
        arch = meta.get("general.architecture", "")

        def number(key: str, default: int) -> int:
            try:
                return int(meta.get(f"{arch}.{key}", default))
            except ValueError:
                return default

        layers = number("block_count", 32)
        heads = number("attention.head_count", 32)
        kv_heads = number("attention.head_count_kv", heads)
        head_dim = number("embedding_length", 4096) // max(1, heads)
        k = number("attention.key_length", head_dim)
        v = number("attention.value_length", head_dim)
        return layers * kv_heads * (k + v) * 2

    def _check_kv_memory(self) -> None:
        """Refuse, with the numbers, a KV cache that this machine's free memory cannot hold.

        On the CPU llama.cpp would allocate it and the kernel kill the worker later; on a
        GPU llama.cpp itself refuses (EngineError)."""
        opts = self.options
        cells = opts.kv_size or self.spec.n_ctx * opts.slots
        need = cells * self.kv_bytes_per_token()
        free = available_memory()
        if self.device_is_cpu and free is not None and need > free:
            raise WorkerStartError(
                f"model '{self.spec.name}': a KV cache of {cells} tokens ({opts.slots} slots) "
                f"needs about {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free; lower "
                "--parallel, --kv-size or the model's --n-ctx"
            )

    def _all_layers_offloaded(self) -> bool:
        """Every layer on the GPU: llama_decode then returns once the step is queued (with
        some on the CPU it computes those first)."""
        n = self.spec.n_gpu_layers
        return n < 0 or n >= int(llama_cpp.llama_model_n_layer(self.llm.model))

    @property
    def device_is_cpu(self) -> bool:
        return not llama_cpp.llama_supports_gpu_offload() or self.spec.n_gpu_layers == 0

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
        """One short generation, so the first real job does not pay for first-use costs.
        Not an embedding: a worker restarted after a crash must take its jobs back fast
        (an embedding of Gemma's is a padded decode with full logits, seconds on a loaded
        CPU), and the first embeddings job pays that once instead."""
        self.generate(
            Request(model=self.spec.name, prompt="Hello", stopping=Stopping(max_tokens=1))
        )

    def close(self) -> None:
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    # -- generating ----------------------------------------------------------------------------
    def generate(
        self,
        request: Request,
        *,
        on_text: OnText = lambda *_: None,
        should_cancel: Callable[[int], bool] = lambda _: False,
        time_limit_s: float | None = None,
        label: str = "",
    ) -> Outcome:
        """Run one request to its end on the engine, alongside whatever else it runs."""
        run = self.start(request, time_limit_s=time_limit_s, label=label)
        return self.follow(run, on_text=on_text, should_cancel=should_cancel)

    def start(
        self,
        request: Request,
        *,
        time_limit_s: float | None = None,
        label: str = "",
        streamed: bool = True,
    ) -> Run | EmbeddingJob:
        """Tokenize the request and hand its sequences (one per choice) to the engine (an
        embeddings job: its inputs to the embedder); follow them with `follow`. With
        `streamed=False`, the engine sends no text before the end (`follow` passes on none).

        JobFailed when it cannot be served (a prompt longer than the context, embeddings
        from a model that serves none)."""
        if request.is_embedding:
            with self._embedder_lock:
                if self.embedder is None and self.llm is not None:
                    try:
                        self._start_embedder()
                    except EmbedderError as e:
                        raise JobFailed(f"model '{self.spec.name}': {e}") from e
            if self.embedder is None:
                raise JobFailed(
                    f"model '{self.spec.name}' does not serve embeddings on this worker; "
                    "register it with embedding = true"
                )
            job = embedding_job(request, self.spec, self.llm, label=label)
            self.embedder.submit(job)
            return job
        engine = self.engine
        assert engine is not None, "start() before load()"
        started = time.perf_counter()
        tools = self.plan_tools(request)
        markers = self.markers(tools)
        one = [request] if len(request.prompts) <= 1 else [
            request.model_copy(update={"prompt": p}) for p in request.prompts
        ]  # fmt: skip
        groups = [
            (
                sequence_for(
                    r, self.spec, self.tokenize(r, tools), started=started,
                    time_limit_s=time_limit_s, label=label, tools=tools, markers=markers,
                    streamed=streamed,
                ),
                r.prompts[0] if r.prompts else "",
            )
            for r in one
        ]  # fmt: skip
        run = Run.of(groups, request.n, request.echo)
        if tools is not None and tools.calls:
            self._tool_plans[run] = tools  # `follow` parses the replies' calls
        engine.submit_all(run.seqs)
        return run

    def tokenize(self, request: Request, tools: ToolPlan | None = None) -> PromptTokens:
        """The request's prompt tokens on this model, and its chat template's stops."""
        return prompt_tokens(self.llm, request, tools)

    def plan_tools(self, request: Request) -> ToolPlan | None:
        """The request's tool plan on this model (its GGUF's chat template, if it is used)."""
        if not request.is_chat:
            return None
        meta = self.llm.metadata
        used = self.llm.chat_handler is None and "tokenizer.chat_template" in meta
        return tool_plan(request, meta["tokenizer.chat_template"] if used else None)

    def markers(self, tools: ToolPlan | None) -> dict[str, int]:
        """Token ids of the plan's special markers."""
        return marker_tokens(self.llm, tools)

    def follow(
        self,
        run: Run | EmbeddingJob,
        *,
        on_text: OnText = lambda *_: None,
        should_cancel: Callable[[int], bool] = lambda _: False,
        poll_s: float = 0.2,
        on_tool_call: Callable[[ToolCallDelta, int], None] = lambda *_: None,
    ) -> Outcome:
        """Follow a started run to its end: `on_text(piece, choice, logprobs)` gets each
        piece of text, with the logprobs of the tokens it brings when they were asked for;
        `should_cancel` is polled every `poll_s` with the tokens generated so far. For a
        request with tools each reply is parsed as it comes: `on_tool_call(delta, choice)`
        gets the pieces of its calls, `on_text` the text outside them, and each Generation
        holds its calls. JobFailed when the engine fails one of its sequences (the others
        are cancelled)."""
        if isinstance(run, EmbeddingJob):
            return self._follow_embedding(run, should_cancel, poll_s)
        tools = self._tool_plans.pop(run, None)
        calls = None if tools is None else ReplyCalls(tools, run.seqs[0].label, len(run.seqs))

        def send(index: int, pieces: list[Parsed], logprobs: Any) -> None:
            for piece in pieces:
                if isinstance(piece, str):
                    on_text(piece, index, logprobs)
                    logprobs = None
                else:
                    on_tool_call(piece, index)

        next_check = time.monotonic() + poll_s
        done: dict[int, Generation] = {}
        pending: dict[int, list[dict[str, Any]]] = {}
        for index, echo in enumerate(run.echoes):
            if echo:
                on_text(echo, index, None)
        while len(done) < len(run.seqs):
            try:
                index, kind, value = run.events.get(timeout=poll_s)
            except queue.Empty:
                index, kind, value = 0, "", None
            if kind == TEXT:
                logprobs = pending.pop(index, None)
                if calls is None:
                    on_text(value, index, logprobs)
                else:
                    send(index, calls.feed(index, value), logprobs)
            elif kind == LOGPROBS:
                shift = len(run.echoes[index])
                entry = {**value, "text_offset": value["text_offset"] + shift}
                pending.setdefault(index, []).append(entry)
            elif kind == DONE:
                if calls is not None:
                    send(index, calls.close(index, value), None)
                done[index] = value
            elif kind == FAILED:
                run.cancel()
                raise JobFailed(value)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + poll_s
                if not run.cancelled and should_cancel(run.generated):
                    run.cancel()
                if kind == "" and run.events.empty() and not self._engine_alive():
                    raise JobFailed("the worker's engine for this model stopped; see its log")
        return outcome(run, [done[i] for i in range(len(run.seqs))])

    def _follow_embedding(
        self, job: EmbeddingJob, should_cancel: Callable[[int], bool], poll_s: float
    ) -> Outcome:
        """Follow an embeddings job to its vectors (one Generation, no text)."""
        while True:
            try:
                kind, value = job.events.get(timeout=poll_s)
            except queue.Empty:
                kind, value = "", None
            if kind == DONE:
                gen: Generation = value
                return Outcome(**{f.name: getattr(gen, f.name) for f in fields(Generation)})
            if kind == FAILED:
                raise JobFailed(value)
            if not job.cancelled and should_cancel(0):
                job.cancel()
            if kind == "" and not self._engine_alive():
                raise JobFailed("the worker's embedder for this model stopped; see its log")

    def _engine_alive(self) -> bool:
        alive = self.engine is not None and self.engine.alive
        return alive and (self.embedder is None or self.embedder.alive)


# What follow calls with each piece of text: the piece, its choice, the logprobs of the
# tokens it brings (None unless asked for).
OnText = Callable[[str, int, list[dict[str, Any]] | None], None]


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


def cuda_only() -> bool:
    """llama.cpp was built with CUDA as its only GPU backend. Several threads may read a
    step's logits on CUDA (a stream synchronize); Vulkan's synchronize resets a command
    pool, which threads may not share, and other backends are unchecked."""
    info = llama_cpp.llama_print_system_info()
    others = (b"Vulkan", b"Metal", b"SYCL", b"OpenCL", b"CANN", b"MUSA", b"HIP", b"RPC")
    return b"CUDA" in info and not any(name in info for name in others)
