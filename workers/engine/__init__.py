"""The worker's engine: continuous batching over one loaded llama.cpp model.

    Celery task thread (one per slot)              engine thread (one per loaded model)
      tokenize the request -> Sequence  --submit-->  admit into a free slot (prompt cache)
      follow Sequence.events, publish    <--events--  one llama_decode for every sequence
      text to the job's Redis stream                  sample, stream, stop, free the slot

This package is the only place that calls llama.cpp's low-level API. Its boundary is
`Sequence` in, events out (`job.py`); nothing above it knows about slots or batches, and
it imports nothing from `farm`: what it needs comes in through a Sequence or the Engine's
constructor (tests/test_engine_boundary.py).
"""

from workers.engine.engine import Engine, EngineError
from workers.engine.job import (
    DONE,
    FAILED,
    LOGPROBS,
    TEXT,
    Generation,
    Sequence,
    SequenceRunner,
)

__all__ = [
    "DONE",
    "FAILED",
    "LOGPROBS",
    "TEXT",
    "Engine",
    "EngineError",
    "Generation",
    "Sequence",
    "SequenceRunner",
]
