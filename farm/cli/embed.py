"""`farm embed`: the vectors of one or more texts, from a model that serves embeddings."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from farm.cli.base import Priority, app, friendly, get_settings


@app.command()
@friendly
def embed(
    texts: Annotated[
        list[str],
        typer.Argument(metavar="TEXT", help="texts to embed ('-' reads one text per line)"),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", metavar="NAME", help="model name (default: FARM_DEFAULT_MODEL)"
        ),
    ] = None,
    dimensions: Annotated[
        int | None,
        typer.Option(metavar="N", help="shorten the vectors (models that allow it)"),
    ] = None,
    priority: Priority = "normal",
    session: Annotated[
        str, typer.Option(metavar="NAME", help="session the usage is billed to")
    ] = "default",
    as_json: Annotated[
        bool, typer.Option("--json", help="print model, usage and vectors as one JSON object")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(metavar="SECONDS", help="seconds to wait for the vectors")
    ] = None,
) -> None:
    """Embed texts; print each vector as a JSON array, one line per text, in order."""
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    import farm

    result = farm.embed(
        texts if len(texts) > 1 else texts[0],
        model=model or get_settings().default_model,
        dimensions=dimensions,
        priority=priority,  # type: ignore[arg-type]
        session=session,
        timeout=timeout,
    )
    if as_json:
        print(
            json.dumps(
                {
                    "job_id": result.job_id,
                    "model": result.model,
                    "dimensions": len(result.vectors[0]) if result.vectors else 0,
                    "usage": {"prompt_tokens": result.usage.prompt_tokens},
                    "vectors": result.vectors,
                }
            )
        )
        return
    for vector in result.vectors:
        print(json.dumps(vector))
