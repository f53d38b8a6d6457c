"""Every error farm raises on purpose, in one tree.

    FarmError                  base of everything below; catch this to catch all of farm's errors
    +-- ConfigError            settings are missing or contradict each other
    +-- FarmUnavailable        the broker or the registry cannot be reached
    +-- InvalidRequest         a request field is unknown, missing or out of range (names the field)
    |   +-- BatchFileError     a batch file has bad lines (lists each as `LINE: field: reason`)
    +-- UnknownModel           the model is not in the registry (lists the known ones)
    +-- ModelExists            `farm models add` for a name that is already registered
    +-- NoLiveWorker           no worker holds a live lease for the model (says how to start one)
    +-- QueueFull              the model's queue holds FARM_MAX_QUEUED jobs already (says how many)
    +-- QuotaExceeded          the session's quota has no room for the job (says the numbers)
    +-- UnknownJob             a job id the farm has no record of
    +-- UnknownBatch           a batch or file id the farm has no record of (or not the caller's)
    +-- UnknownWorker          `farm models load|unload --worker` names no live worker
    +-- ControlFailed          a worker refused a control command, or did not answer
    +-- JobError               base of what happens to a job after it was queued
        +-- JobFailed          the worker could not serve the job (prompt too long, engine error)
        +-- JobCancelled       the job was cancelled before or while it ran
        +-- JobTimeout         the caller stopped waiting; the job may still run
    +-- WorkerStartError       `farm worker` cannot start: model file missing or not a GGUF

Every message says what was wrong and what to do next. Errors raised on a worker travel to
the client through Celery's JSON result backend, which rebuilds them from this module, so the
worker-side errors live here and not in `workers/`.
"""

from __future__ import annotations


class FarmError(Exception):
    """Base class of every error farm raises on purpose."""


class ConfigError(FarmError):
    """Settings are missing or contradict each other."""


class FarmUnavailable(FarmError):
    """The broker or the registry cannot be reached."""


class QueueFull(FarmError):
    """The model's queue already holds the most jobs allowed (FARM_MAX_QUEUED)."""


class QuotaExceeded(FarmError):
    """The session's tokens per day or jobs in flight leave no room for the job."""


class RateLimited(QuotaExceeded):
    """The session's requests or tokens per minute leave no room for the job now;
    `retry_after` is the seconds until it would fit, `limits` the session's rate state."""

    def __init__(self, message: str, retry_after: float, limits: object = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.limits = limits


class InvalidRequest(FarmError):
    """A request field is unknown, missing or out of range."""


class BatchFileError(InvalidRequest):
    """The file has bad lines; nothing was queued. `errors`: each `LINE: field: reason`."""

    SHOWN = 20  # in the message; `errors` keeps them all

    def __init__(self, errors: list[str], total: int, source: str):
        self.errors = errors
        self.total = total
        shown = "\n".join(f"  {e}" for e in errors[: self.SHOWN])
        more = total - min(total, self.SHOWN)
        super().__init__(
            f"{source}: {total} bad line{'s' if total != 1 else ''}; nothing was queued. "
            "Fix them and submit again:\n" + shown + (f"\n  ... and {more} more" if more else "")
        )


class UnknownModel(FarmError):
    """The model is not in the registry."""


class ModelExists(FarmError):
    """A model with this name is already registered."""


class NoLiveWorker(FarmError):
    """No worker holds a live lease for the model."""


class UnknownJob(FarmError):
    """The farm has no record of this job id."""


class UnknownBatch(FarmError):
    """The farm has no record of this batch (or file) id, or it is another session's."""


class UnknownWorker(FarmError):
    """No live worker has this id."""


class ControlFailed(FarmError):
    """A worker refused a control command, or did not answer it in time."""


class JobError(FarmError):
    """Something happened to a job after it was queued."""


class JobFailed(JobError):
    """The worker could not serve the job."""


class JobCancelled(JobError):
    """The job was cancelled."""


class JobTimeout(JobError):
    """The caller stopped waiting for the job; it may still run."""


class WorkerStartError(FarmError):
    """A worker cannot start serving its model."""
