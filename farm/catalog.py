"""The model catalog: a TOML file of models and named profiles, and `farm models scan`.

    model_dirs = ["/models"]              # model paths must lie inside these (optional)

    [models.gemma3-270m]
    path = "gemma-3-270m-q4_k_m.gguf"     # relative paths are looked up in model_dirs
    n_ctx = 4096
    chat_format = "gemma"
    defaults = { temperature = 0.7 }
    parallel = 2                          # slots of the worker that serves it (optional)
    embedding = true                      # serves POST /v1/embeddings too (optional)
    pooling = "mean"                      # mean | cls | last (default: the GGUF's own, else mean)
    normalize = true                      # unit-length vectors (the default)

    [profiles.fast]
    models = ["gemma3-270m"]

`farm models apply FILE` checks the whole file first (names, fields, paths inside the model
folders, GGUF headers, profiles naming known models) and applies nothing if anything is
wrong, naming the line and field of each problem. `farm up --profile fast` applies the
file, then starts a worker for each model of the profile.

`parallel` is not a property of the model in the registry but of the worker that serves
it: `farm up`, `farm fleet` and `farm worker` read it from the file (when there is one) and
start the worker with that many slots, unless their own `--parallel` says otherwise.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from farm.errors import InvalidRequest
from farm.gguf_info import read_gguf_info
from farm.registry import queries, transaction
from farm.request import MODEL_NAME_RE, MODEL_NAME_RULE, Sampling

MAX_PARALLEL = 256  # llama.cpp's limit on sequences per context (n_seq_max)


class CatalogError(InvalidRequest):
    """The models file has errors; nothing was applied."""


class CatalogModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    n_ctx: int = Field(default=4096, ge=16, le=1 << 20)
    n_gpu_layers: int = Field(default=-1, ge=-1)
    chat_format: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    # Embeddings (POST /v1/embeddings): served when true; pooled as `pooling` (default:
    # the GGUF's own, else mean); unit vectors when `normalize`; `dimensions`: the shorter
    # sizes a request may ask for (Matryoshka-trained models).
    embedding: bool = Field(default=False, strict=True)
    pooling: Literal["mean", "cls", "last"] | None = None
    normalize: bool = Field(default=True, strict=True)
    dimensions: list[Annotated[int, Field(ge=1, le=65536, strict=True)]] | None = Field(
        default=None, min_length=1
    )
    # Slots of the worker serving it: for `farm up`/`fleet`/`worker`, not the registry.
    parallel: int | None = Field(default=None, ge=1, le=MAX_PARALLEL, strict=True)

    def registry_fields(self) -> dict[str, Any]:
        """What the registry records of this model (all but the worker's `parallel`)."""
        return self.model_dump(exclude={"parallel"})

    @field_validator("defaults")
    @classmethod
    def _sampling_defaults(cls, v: dict[str, Any]) -> dict[str, Any]:
        # Unknown or out-of-range fields fail here; what is stored is the validated form
        # (40, not 40.0 or "40"), which llama.cpp's C calls accept.
        return Sampling.model_validate(v).model_dump(exclude_none=True)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1)


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dirs: list[str] = Field(default_factory=list)
    models: dict[str, CatalogModel] = Field(default_factory=dict)
    profiles: dict[str, Profile] = Field(default_factory=dict)


# -- paths -------------------------------------------------------------------------------------
def confine(path: Path, roots: list[Path]) -> Path:
    """The resolved path, which must lie inside one of `roots` (when any are configured)."""
    resolved = path.expanduser().resolve()
    if roots and not any(resolved.is_relative_to(r.expanduser().resolve()) for r in roots):
        folders = ", ".join(str(r) for r in roots)
        raise InvalidRequest(
            f"{path} is outside the model folders ({folders}); move it there or add its "
            "folder to FARM_MODEL_DIRS"
        )
    return resolved


def _locate(raw: str, roots: list[Path], base: Path) -> Path:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        candidates = [r / path for r in roots] + [base / path]
        path = next((c for c in candidates if c.exists()), candidates[0])
    return path


# -- loading and checking -------------------------------------------------------------------------
def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """The line where `loc` (e.g. ("models", "gemma", "n_ctx")) is written, best effort."""
    lines = text.splitlines()
    if len(loc) >= 2 and loc[0] in ("models", "profiles"):
        header = re.compile(rf'^\s*\[\s*{loc[0]}\s*\.\s*"?{re.escape(str(loc[1]))}"?\s*\]')
        for i, line in enumerate(lines):
            if header.match(line):
                if len(loc) == 2:
                    return i + 1
                key = re.compile(rf"^\s*{re.escape(str(loc[2]))}\s*=")
                for j in range(i + 1, len(lines)):
                    if lines[j].lstrip().startswith("["):
                        break
                    if key.match(lines[j]):
                        return j + 1
                return i + 1
    if not loc:
        return None
    top = re.compile(rf"^\s*{re.escape(str(loc[0]))}\s*=")
    return next((i + 1 for i, line in enumerate(lines) if top.match(line)), None)


class _Problems(list[str]):
    """The problems found in one models file, each with its line."""

    def __init__(self, path: Path, text: str):
        super().__init__()
        self.path, self.text = path, text

    def add(self, loc: tuple[Any, ...], msg: str) -> None:
        line = _line_of(self.text, loc)
        where = f"{self.path}:{line}" if line else str(self.path)
        self.append(f"{where}: {'.'.join(str(p) for p in loc)}: {msg}")

    def error(self) -> CatalogError:
        return CatalogError("the models file has errors; nothing was applied:\n" + "\n".join(self))


def _parse(path: Path) -> tuple[Catalog, _Problems]:
    """The file's fields, checked (but not its model files)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise CatalogError(f"cannot read the models file {path}: {e.strerror}") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"{path}: {e}") from e
    problems = _Problems(path, text)
    try:
        return Catalog.model_validate(data), problems
    except ValidationError as e:
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            problems.add(tuple(err["loc"]), msg)
        raise problems.error() from e


def load_catalog(path: Path, extra_roots: list[Path] | None = None) -> tuple[Catalog, list[Path]]:
    """Parse and check the whole file. CatalogError lists every problem with its line."""
    catalog, problems = _parse(path)
    problem = problems.add
    # The file's model_dirs say where relative paths are looked up. They cannot widen the
    # operator's FARM_MODEL_DIRS (`extra_roots`): each must lie inside them, and model
    # paths are confined to FARM_MODEL_DIRS when it is set, else to the file's folders.
    own = [(path.parent / d).expanduser() for d in catalog.model_dirs]
    allowed = list(extra_roots or [])
    for i, folder in enumerate(own):
        try:
            confine(folder, allowed)
        except InvalidRequest as e:
            problem(("model_dirs", i), str(e))
    roots = allowed or own
    for name, model in catalog.models.items():
        if not MODEL_NAME_RE.match(name):
            problem(("models", name), f"invalid model name: names are {MODEL_NAME_RULE}")
            continue
        try:
            file = confine(_locate(model.path, own + allowed, path.parent), roots)
            if not file.is_file():
                raise InvalidRequest(f"no file at {file}")
            read_gguf_info(file)
            model.path = str(file)
        except InvalidRequest as e:
            problem(("models", name, "path"), str(e))
    for pname, profile in catalog.profiles.items():
        for m in profile.models:
            if m not in catalog.models:
                problem(("profiles", pname, "models"), f"names '{m}', which is not in [models]")
    if problems:
        raise problems.error()
    return catalog, roots


def worker_parallel(path: Path, models: list[str]) -> dict[str, int]:
    """The slots the models file asks for each of `models` that sets `parallel`; nothing
    when there is no file. Only the file's fields are checked here: a worker's host need
    not hold the model files at the paths the file names."""
    if not path.is_file():
        return {}
    catalog, _ = _parse(path)
    return {
        m: slots
        for m in models
        if m in catalog.models and (slots := catalog.models[m].parallel) is not None
    }


def apply_catalog(database_url: str, catalog: Catalog) -> tuple[list[str], list[str]]:
    """Register or update every model of the catalog, in one transaction. (added, updated)"""
    added, updated = [], []
    with transaction(database_url) as s:
        existing = {m.name: m for m in queries.list_models(s)}
        for name, model in catalog.models.items():
            record = existing.get(name)
            if record is None:
                queries.add_model(s, name=name, **model.registry_fields())
                added.append(name)
                continue
            changed = False
            for field, value in model.registry_fields().items():
                if getattr(record, field) != value:
                    setattr(record, field, value)
                    changed = True
            if changed or not record.enabled:
                record.enabled = True
                updated.append(name)
    return added, updated


def scan(folder: Path, roots: list[Path] | None = None) -> tuple[list[Any], list[str]]:
    """GGUF files under `folder` with their metadata, and a reason for each file skipped;
    with `roots` (FARM_MODEL_DIRS), a file that resolves outside them (a link out) is
    skipped."""
    folder = folder.expanduser()
    if not folder.is_dir():
        raise InvalidRequest(f"{folder} is not a folder")
    found, skipped = [], []
    for file in sorted(folder.rglob("*.gguf")):
        try:
            confine(file, roots or [])
            found.append(read_gguf_info(file))
        except InvalidRequest as e:
            skipped.append(str(e))
    return found, skipped


# Architectures whose GGUFs often ship without a chat template, and llama-cpp-python's
# format for them.
CHAT_FORMATS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "qwen2": "chatml",
                "qwen3": "chatml", "llama": "llama-3", "mistral": "mistral-instruct"}  # fmt: skip


def default_chat_format(info: Any) -> str | None:
    """The chat format to record for a GGUF: none when it carries its own template."""
    if info.has_chat_template:
        return None
    return CHAT_FORMATS.get(info.architecture or "")


def suggest_name(file: Path) -> str:
    """A valid model name from a file name: 'Gemma-3-270M.Q4_K_M.gguf' -> 'gemma-3-270m.q4_k_m'."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", file.stem.lower()).strip("-._")
    return (stem or "model")[:64]
