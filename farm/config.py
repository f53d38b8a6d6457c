"""farm's settings: one typed object, read from `FARM_*` environment variables.

With nothing set, farm runs on the embedded default: `farm up` starts a local
Redis-compatible server and writes its address to `<home>/farm.json`; every other command
finds it there. `FARM_BROKER_URL` and `FARM_DATABASE_URL` switch every command to real
servers instead.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from farm.errors import ConfigError, FarmUnavailable
from farm.local import STATE_FILE, default_home, read_state


class Settings(BaseSettings):
    """Everything farm can be configured with. Each field is `FARM_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="FARM_", extra="ignore")

    home: Path = Field(
        default_factory=default_home,
        description="Folder for the embedded farm: its state file, broker data and SQLite registry.",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker (Redis): redis://host:6379/0, or through Redis Sentinel "
        "sentinel://host1:26379;sentinel://host2:26379/0?master_name=NAME (farm follows the "
        "master across failovers). Unset: use the farm that `farm up` started here.",
    )
    result_url: str | None = Field(
        default=None,
        description="Celery result backend and token streams (Redis, or Sentinel as for "
        "FARM_BROKER_URL). Unset: the broker's URL.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the registry. Unset: SQLite at <home>/registry.db.",
    )
    models_file: Path | None = Field(
        default=None,
        description="TOML catalog of models and profiles. Unset: <home>/models.toml if it exists.",
    )
    model_dirs: list[Path] = Field(
        default_factory=list,
        description="Folders model files must lie in (JSON list). Empty: any path is allowed.",
    )
    default_model: str = Field(
        default="gemma3-270m", description="Model used when a command names none."
    )
    flower_user: str = Field(default="farm", description="Flower's basic-auth user.")
    flower_password: str | None = Field(
        default=None,
        description="Flower's basic-auth password. Unset: Flower serves localhost only, "
        "without a password.",
    )
    connect_timeout: float = Field(
        default=3.0, gt=0, description="Seconds to wait for the broker before giving up."
    )
    visibility_timeout: int = Field(
        default=3600,
        gt=0,
        description="Seconds before Redis redelivers an unacknowledged job. Must exceed "
        "job_time_limit, or long generations run twice.",
    )
    job_time_limit: int = Field(
        default=1800, gt=0, description="Hard limit in seconds on one job's generation."
    )
    job_expires: int = Field(
        default=3600,
        gt=0,
        description="Seconds a queued job may wait before it is dropped instead of run.",
    )
    max_wait_low: float = Field(
        default=600.0,
        ge=0,
        description="Seconds a low job may wait before it moves up to normal (and then to "
        "high at once): the bound on a low job's wait. 0: never moves.",
    )
    max_wait_normal: float = Field(
        default=120.0,
        ge=0,
        description="Seconds a normal job may wait before it moves up to high. 0: never moves.",
    )
    max_queued: int = Field(
        default=100_000,
        ge=0,
        description="Most jobs queued for one model, all priorities together; past it a "
        "submit is refused with QueueFull and nothing is queued. 0: no limit.",
    )
    max_prompt_chars: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Characters of text one request may carry in (its prompts, messages "
        "and tools, or texts to embed); past it a submit is refused with InvalidRequest "
        "before anything is read from the registry or queued. The default, about a million "
        "tokens, is beyond any model's context and matches FARM_GATEWAY_MAX_BODY.",
    )
    batch_window: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Most batch lines queued or running per model at once; the batch "
        "feeder tops each model's queue up to it, so a batch of any size holds this many "
        "messages in Redis.",
    )
    fair_queued: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="Jobs of each priority kept waiting in a model's Celery queue; the rest "
        "wait in per-session lists and are dispatched to the session served least (fair "
        "share). 0: a quarter of the model's live slots, at least 1. Fewer: finer fairness; "
        "more: a slot waits less often for the dispatch of its next job.",
    )
    fair_output_weight: float = Field(
        default=2.0,
        gt=0,
        le=100,
        description="Weight of an output token against an input token in a session's "
        "served tokens (fair share: input tokens + this x output tokens).",
    )
    stream_ttl: int = Field(
        default=3600, gt=0, description="Seconds a job's token stream is kept after it ends."
    )
    heartbeat_interval: float = Field(
        default=5.0, gt=0, description="Seconds between a worker's lease renewals."
    )
    lease_ttl: float = Field(
        default=20.0,
        gt=0,
        description="Seconds a lease lives without renewal; after that the worker counts as lost.",
    )
    registry_wait: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a worker holds a job while the registry is unreachable at its "
        "start, retrying, before putting it back in its queue.",
    )
    repack: bool | None = Field(
        default=None,
        description="Workers load weights into llama.cpp's repacked CPU buffers (true) or "
        "not (false). Unset: not where llama.cpp would run its AMX kernels, which crash on "
        "some CPUs (llama.cpp#20824), else yes.",
    )
    device_sampling: Literal["off", "greedy", "all"] = Field(
        default="off",
        description="Workers let a sequence pick its token on the device inside the step "
        "(llama.cpp's backend sampling, experimental there): 'greedy' for greedy sequences; "
        "'all' narrows a sequence's logits there instead, to its 64 best tokens (more where a "
        "top-k draw's top-k and the tokens it bans need more), among which the "
        "worker picks (the same draws for the same seed, but where logits tie); true means 'greedy', false 'off'. Off by "
        "default: bench/README.md, 'On a GPU', has what greedy gave on an H200.",
    )

    @field_validator("device_sampling", mode="before")
    @classmethod
    def _device_sampling_switch(cls, value: object) -> object:
        """FARM_DEVICE_SAMPLING=true/false (a switch before it had modes) still works."""
        if isinstance(value, bool):
            return "greedy" if value else "off"
        if not isinstance(value, str):
            return value
        word = value.strip().lower()
        if word in ("true", "1", "yes", "on"):
            return "greedy"
        if word in ("false", "0", "no", ""):
            return "off"
        return word

    log_prompts: bool = Field(
        default=False, description="Show prompts in logs and Flower. Off: prompts are user data."
    )
    database_pool_size: int = Field(
        default=1,
        ge=1,
        description="Connections a process keeps open to a PostgreSQL registry (SQLite: "
        "not used): a hundred idle workers keep a hundred.",
    )
    database_max_overflow: int = Field(
        default=1,
        ge=0,
        description="Connections a process may open beyond FARM_DATABASE_POOL_SIZE under "
        "load, each closed once its transaction ends; more threads wait their turn (farm's "
        "transactions take milliseconds). PostgreSQL's max_connections (100 by default), "
        "or a PgBouncer in front, must hold (pool + overflow) x processes: 50 workers of 4 "
        "slots ran at 0 (bench/fleet.py); give a busy gateway more.",
    )
    gateway_require_keys: bool = Field(
        default=False,
        description="Require an API key on every gateway request even before any key was "
        "created. Once one was created (revoked or not), keys are required anyway.",
    )
    gateway_max_body: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Bytes a gateway request body may have (file uploads excepted); a "
        "larger one is refused with 413 before it is read.",
    )
    gateway_url: str | None = Field(
        default=None,
        description="A farm's gateway (http://host:8000) for `farm status` to ask, with an "
        "admin key in FARM_API_KEY, instead of reading its registry and broker: an "
        "operator's view of a remote farm.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="The API key `farm status --gateway` sends (an admin key: `farm keys "
        "create --session NAME --admin`).",
    )
    gateway_header_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds the gateway waits for a request's headers before closing the "
        "connection (a client that never finishes them holds nothing for long).",
    )
    gateway_recycle_growth: float = Field(
        default=0.10,
        ge=0,
        description="`farm serve` replaces its gateway process with a fresh one on the same "
        "socket once the process has had no request in flight for FARM_GATEWAY_RECYCLE_IDLE "
        "seconds and its RSS is this fraction above what it was when it started (a load's "
        "peak stays in the allocators: bench/README.md). 0: one process, never replaced.",
    )
    gateway_recycle_idle: float = Field(
        default=10.0,
        gt=0,
        description="Seconds without a request in flight before `farm serve` may replace a "
        "grown gateway process (FARM_GATEWAY_RECYCLE_GROWTH).",
    )

    @model_validator(mode="after")
    def _limits_agree(self) -> Settings:
        if self.job_time_limit >= self.visibility_timeout:
            raise ValueError(
                f"FARM_JOB_TIME_LIMIT ({self.job_time_limit}s) must be below "
                f"FARM_VISIBILITY_TIMEOUT ({self.visibility_timeout}s), or Redis hands a long "
                "job to a second worker while the first still runs it"
            )
        if self.lease_ttl <= self.heartbeat_interval:
            raise ValueError("FARM_LEASE_TTL must be longer than FARM_HEARTBEAT_INTERVAL")
        return self

    # -- derived --------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        """Where a running `farm up` records its broker's address."""
        return self.home / STATE_FILE

    def resolved_models_file(self) -> Path:
        return self.models_file or self.home / "models.toml"

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'registry.db'}"

    def existing_database_url(self) -> str:
        """The registry to read: like resolved_database_url, but on the embedded default it
        must have been created (by `farm up` or `farm db upgrade`) already. A running
        `farm up` that was given FARM_DATABASE_URL tells other shells its registry."""
        if self.database_url:
            return self.database_url
        state = read_state(self.state_file)
        if state is not None and state.get("database_url"):
            return str(state["database_url"])
        if not (self.home / "registry.db").exists():
            raise FarmUnavailable(
                f"no farm has been set up in {self.home}: start one with `farm up`, or set "
                "FARM_DATABASE_URL (and FARM_BROKER_URL) to your farm's servers"
            )
        return self.resolved_database_url()

    def resolved_broker_url(self) -> str:
        """The broker to use: FARM_BROKER_URL, else the embedded farm running here.
        ConfigError when FARM_BROKER_URL is a Sentinel URL farm cannot use."""
        if self.broker_url:
            # Checked here, not by a pydantic validator: its error would show the URL,
            # password and all.
            _check_redis_url(self.broker_url, "FARM_BROKER_URL")
            return self.broker_url
        state = read_state(self.state_file)
        if state is None:
            raise FarmUnavailable(
                "no farm is running here: start one with `farm up` in another shell, "
                "or set FARM_BROKER_URL to your Redis (e.g. redis://host:6379/0)"
            )
        return str(state["broker_url"])

    def resolved_result_url(self) -> str:
        """The result store: FARM_RESULT_URL, else the running embedded farm's when this
        shell uses its broker (`farm up` given FARM_RESULT_URL tells other shells), else
        the broker."""
        if self.result_url:
            _check_redis_url(self.result_url, "FARM_RESULT_URL")
            return self.result_url
        if not self.broker_url:
            state = read_state(self.state_file)
            if state is not None and state.get("result_url"):
                return str(state["result_url"])
        return self.resolved_broker_url()


def _check_redis_url(url: str, setting: str) -> None:
    # Imported here: redis (~40 ms) only for the commands that reach the broker, not for
    # `farm config` or `farm jobs` (the CLI's start time).
    from farm import redis_url

    redis_url.check(url, setting)


def masked(url: str) -> str:
    """A URL fit to print: its password replaced by '***' (broker, result and database URLs;
    each of a Sentinel URL's sentinels)."""
    if ";" in url:
        return ";".join(masked(part) for part in url.split(";"))
    parts = urlsplit(url)
    if not parts.password:  # none, or empty ("redis://:@host"): nothing to hide
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    try:
        return Settings()
    except ValidationError as e:
        raise ConfigError(
            "invalid farm settings: " + "; ".join(_named(x) for x in e.errors())
        ) from e
    except ValueError as e:
        raise ConfigError(f"invalid farm settings: {e}") from e


def _named(error: Any) -> str:
    """One setting's error, named as the user set it: FARM_X='value': what was wrong."""
    field = ".".join(str(part) for part in error.get("loc", ()))
    name = f"FARM_{field.upper()}" if field else "a setting"
    given = f"={error['input']!r}" if field and isinstance(error.get("input"), str) else ""
    return f"{name}{given}: {error.get('msg', 'invalid')}"


def reset_settings() -> None:
    """Forget the cached settings (tests and `farm up` change the environment)."""
    get_settings.cache_clear()
