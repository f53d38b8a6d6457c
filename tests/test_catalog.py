"""The models file, GGUF metadata and `farm models scan`: every problem named with its line,
nothing applied when anything is wrong, paths kept inside the model folders."""

import json
import os
import shutil
from pathlib import Path

import pytest

from farm.catalog import CatalogError, apply_catalog, load_catalog, suggest_name, worker_parallel
from farm.cli.fleet import _with_parallel
from farm.config import reset_settings
from farm.errors import InvalidRequest
from farm.gguf_info import read_gguf_info
from farm.registry import queries, transaction, upgrade
from tests.conftest import gemma_path, run_cli


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    try:  # a real file inside the folder (a symbolic link out of it would be refused)
        os.link(gemma_path(), folder / "gemma.gguf")
    except OSError:
        shutil.copy(gemma_path(), folder / "gemma.gguf")
    (folder / "linked-out.gguf").symlink_to(gemma_path())
    (folder / "junk.gguf").write_text("not a model")
    return folder


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


GOOD = """\
model_dirs = ["models"]

[models.gemma-small]
path = "gemma.gguf"
n_ctx = 2048
chat_format = "gemma"
defaults = { temperature = 0.5 }

[profiles.fast]
models = ["gemma-small"]
"""


def test_gguf_metadata_is_read_from_the_header():
    info = read_gguf_info(Path(gemma_path()))
    assert (info.architecture, info.quantization, info.size_label) == ("gemma3", "Q4_K_M", "270M")
    assert info.context_length == 32768 and info.parameters == 268_098_176
    assert not info.has_chat_template  # the base model ships none: farm uses the registry's


def test_a_truncated_or_foreign_file_is_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00")
    with pytest.raises(InvalidRequest, match="not a readable GGUF file"):
        read_gguf_info(bad)
    bad.write_text("hello")
    with pytest.raises(InvalidRequest, match="is not a GGUF file"):
        read_gguf_info(bad)


def test_a_good_models_file_is_applied_and_its_profile_read(tmp_path, model_dir):
    catalog, _ = load_catalog(write(tmp_path, GOOD))
    assert catalog.profiles["fast"].models == ["gemma-small"]
    db = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(db)
    assert apply_catalog(db, catalog) == (["gemma-small"], [])
    assert apply_catalog(db, catalog) == ([], [])  # applying again changes nothing
    with transaction(db) as s:
        record = queries.get_model(s, "gemma-small")
        assert record.n_ctx == 2048 and record.defaults == {"temperature": 0.5}
        assert Path(record.path) == (model_dir / "gemma.gguf").resolve()


def test_every_error_is_named_with_its_line_and_nothing_is_applied(tmp_path, model_dir):
    outside = tmp_path / "elsewhere.gguf"
    outside.symlink_to(gemma_path())
    text = f"""\
model_dirs = ["models"]

[models.ok]
path = "gemma.gguf"

[models.Bad_Name]
path = "gemma.gguf"

[models.wrong]
path = "gemma.gguf"
n_ctx = 4
temprature = 1

[models.junk]
path = "junk.gguf"

[models.escaped]
path = "{outside}"

[profiles.fast]
models = ["ok", "missing"]
"""
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert f"{path}:11: models.wrong.n_ctx: Input should be greater than or equal to 16" in message
    assert f"{path}:12: models.wrong.temprature: unknown field" in message
    # Field errors stop before the file checks; fix them and the rest are reported.
    text = text.replace("n_ctx = 4\ntemprature = 1\n", "")
    with pytest.raises(CatalogError) as info:
        load_catalog(write(tmp_path, text))
    message = str(info.value)
    assert f"{path}:6: models.Bad_Name: invalid model name" in message
    assert f"{path}:13: models.junk.path:" in message and "is not a GGUF file" in message
    assert f"{path}:16: models.escaped.path:" in message and "outside the model folders" in message
    assert f"{path}:19: profiles.fast.models: names 'missing'" in message
    assert "nothing was applied" in message


def test_a_toml_syntax_error_names_its_line(tmp_path):
    with pytest.raises(CatalogError, match="line 2"):
        load_catalog(write(tmp_path, "[models.a]\npath = \n"))


def test_scan_finds_gguf_files_and_adds_them(tmp_path, model_dir):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    env = {**os.environ, "FARM_HOME": str(tmp_path), "FARM_DATABASE_URL": db}
    upgrade(db)
    r = run_cli(env, "models", "scan", str(model_dir), "--json", "--add", timeout=60)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout.split("\nadded")[0])
    assert [f["name"] for f in found] == ["gemma", "linked-out"]
    assert found[0]["quantization"] == "Q4_K_M"
    with transaction(db) as s:
        assert [m.name for m in queries.list_models(s)] == ["gemma", "linked-out"]


def test_model_paths_outside_the_model_folders_are_refused(tmp_path, model_dir):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(db)
    env = {
        **os.environ,
        "FARM_HOME": str(tmp_path),
        "FARM_DATABASE_URL": db,
        "FARM_MODEL_DIRS": json.dumps([str(model_dir)]),
    }
    r = run_cli(env, "models", "add", "g", gemma_path(), timeout=60)
    assert r.returncode == 1 and "outside the model folders" in r.stderr
    r = run_cli(env, "models", "add", "g", str(model_dir / "linked-out.gguf"), timeout=60)
    assert r.returncode == 1 and "outside the model folders" in r.stderr  # a link out counts
    r = run_cli(env, "models", "add", "g", str(model_dir / "gemma.gguf"), timeout=60)
    assert r.returncode == 0, r.stderr


def test_suggested_names_are_valid_model_names():
    assert suggest_name(Path("/m/Gemma-3-270M.Q4_K_M.gguf")) == "gemma-3-270m.q4_k_m"
    assert suggest_name(Path("/m/My Model (v2).gguf")) == "my-model-v2"


def test_parallel_is_read_for_the_workers_and_kept_out_of_the_registry(tmp_path, model_dir):
    path = write(
        tmp_path, GOOD.replace('chat_format = "gemma"\n', 'chat_format = "gemma"\nparallel = 2\n')
    )
    catalog, _ = load_catalog(path)
    assert catalog.models["gemma-small"].parallel == 2
    db = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(db)
    assert apply_catalog(db, catalog) == (["gemma-small"], [])
    assert apply_catalog(db, catalog) == ([], [])
    assert worker_parallel(path, ["gemma-small", "other"]) == {"gemma-small": 2}
    assert worker_parallel(tmp_path / "none.toml", ["gemma-small"]) == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "Input should be greater than or equal to 1"),
        ("257", "Input should be less than or equal to 256"),
        ('"4"', "Input should be a valid integer"),
        ("2.5", "Input should be a valid integer"),
    ],
)
def test_a_bad_parallel_is_named_with_its_line(tmp_path, model_dir, value, message):
    path = write(tmp_path, GOOD.replace("n_ctx = 2048\n", f"n_ctx = 2048\nparallel = {value}\n"))
    for read in (lambda: load_catalog(path), lambda: worker_parallel(path, ["gemma-small"])):
        with pytest.raises(CatalogError) as info:
            read()
        assert f"{path}:6: models.gemma-small.parallel: {message}" in str(info.value)


def test_farm_worker_takes_parallel_from_the_models_file_unless_told(tmp_path, monkeypatch):
    path = write(
        tmp_path,
        f'[models.a]\npath = "{gemma_path()}"\nparallel = 2\n\n'
        f'[models.b]\npath = "{gemma_path()}"\nparallel = 3\n\n'
        f'[models.c]\npath = "{gemma_path()}"\n',
    )
    monkeypatch.setenv("FARM_MODELS_FILE", str(path))
    reset_settings()
    try:
        assert _with_parallel(["--model", "a"]) == ["--model", "a", "--parallel", "2"]
        assert _with_parallel(["--model", "a", "--parallel", "5"]) == [
            "--model", "a", "--parallel", "5"
        ]  # fmt: skip
        assert _with_parallel(["--model", "c"]) == ["--model", "c"]  # the worker's default
    finally:
        reset_settings()
    # Models that ask for different slots cannot share a worker: said before it starts.
    env = {**os.environ, "FARM_MODELS_FILE": str(path), "FARM_HOME": str(tmp_path)}
    r = run_cli(env, "worker", "--models", "a,b")
    assert r.returncode == 1
    assert "sets different `parallel` for the models of this worker (a 2, b 3)" in r.stderr
    assert "pass --parallel N, or serve them from separate workers" in r.stderr


def test_scan_with_model_folders_skips_a_link_out_of_them_and_adds_only_what_lies_inside(
    tmp_path, model_dir
):
    db = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(db)
    env = {
        **os.environ,
        "FARM_HOME": str(tmp_path),
        "FARM_DATABASE_URL": db,
        "FARM_MODEL_DIRS": json.dumps([str(model_dir)]),
    }
    r = run_cli(env, "models", "scan", str(model_dir), "--json", "--add", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "linked-out.gguf is outside the model folders" in r.stderr
    with transaction(db) as s:
        assert [m.name for m in queries.list_models(s)] == ["gemma"]


def test_a_models_file_cannot_widen_the_model_folders_the_operator_set(tmp_path, model_dir):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(model_dir / "gemma.gguf", outside / "stray.gguf")
    path = write(tmp_path, f'model_dirs = ["/"]\n\n[models.stray]\npath = "{outside}/stray.gguf"\n')
    with pytest.raises(CatalogError) as e:
        load_catalog(path, [model_dir])
    message = str(e.value)
    assert "models.toml:1: model_dirs.0: / is outside the model folders" in message
    assert "models.toml:4: models.stray.path:" in message
    assert "stray.gguf is outside the model folders" in message
    # Without FARM_MODEL_DIRS the file's own folders are the bound (here "/": anything).
    catalog, _ = load_catalog(path)
    assert catalog.models["stray"].path == str((outside / "stray.gguf").resolve())


def test_the_models_file_flags_a_model_that_serves_embeddings(tmp_path, model_dir, migrated_db):
    catalog, _ = load_catalog(
        write(
            tmp_path,
            GOOD.replace(
                'chat_format = "gemma"',
                'chat_format = "gemma"\nembedding = true\npooling = "mean"\nnormalize = false\n'
                "dimensions = [256, 128]",
            ),
        )
    )
    apply_catalog(migrated_db, catalog)
    with transaction(migrated_db) as s:
        [m] = queries.list_models(s)
        assert (m.embedding, m.pooling, m.normalize, m.dimensions) == (
            True,
            "mean",
            False,
            [256, 128],
        )
    bad = write(tmp_path, GOOD.replace('chat_format = "gemma"', 'pooling = "max"\nembedding = 1'))
    with pytest.raises(CatalogError) as e:
        load_catalog(bad)
    assert "pooling" in str(e.value) and "embedding" in str(e.value)
    assert read_gguf_info(Path(gemma_path())).pooling is None  # a decoder: no pooling of its own
