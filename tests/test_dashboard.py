"""The operator's view: every query of the Grafana dashboard (compose/grafana/) and of the
KEDA example (compose/keda-scaledobject.yaml) parses as PromQL and reads only metrics that a
real scrape of a farm that ran jobs shows; `farm_jobs_running`, the scaling signal's half
beside the queue depth, counts a job while it runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import farm
from farm.context import get_context
from farm.metrics import render
from tests.conftest import MODEL, finished_usage

pytestmark = pytest.mark.e2e

COMPOSE = Path(__file__).resolve().parent.parent / "compose"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def dashboard_queries() -> list[str]:
    board = json.loads((COMPOSE / "grafana" / "farm-dashboard.json").read_text())
    queries = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":  # label_values(METRIC, LABEL): its metric
            queries.append(variable["query"].removeprefix("label_values(").split(",")[0])
    # Grafana fills its variables in before Prometheus sees a query.
    return [q.replace("$model", ".*") for q in queries]


def keda_queries() -> list[str]:
    scaled = yaml.safe_load((COMPOSE / "keda-scaledobject.yaml").read_text())
    return [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]


def metrics_read(expr: str) -> set[str]:
    """The metric names an expression selects (PromQL's own parser, not a regex)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if type(node).__name__ == "VectorSelector":
            names.add(node.name)
        for attr in ("args", "expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attr, None)
            for c in child if isinstance(child, list) else [child]:
                if c is not None and "promql" in type(c).__module__:
                    walk(c)

    walk(promql_parser.parse(expr))
    return names


def scraped() -> tuple[set[str], dict[tuple[str, str], float]]:
    """The metric names a scrape defines (with their sample names), and each sample's value
    by (name, model label)."""
    names: set[str] = set()
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(render(get_context()).decode()):
        names.add(family.name)
        names.update(family.name + s for s in SUFFIXES.get(family.type, ()))
        for sample in family.samples:
            names.add(sample.name)
            values[(sample.name, sample.labels.get("model", ""))] = sample.value
    return names, values


def test_the_dashboard_and_the_keda_example_read_only_metrics_a_scrape_shows(farm_client):
    done = farm.infer("dashboard", model=MODEL, max_tokens=3)
    finished_usage(farm_client.database_url, done.job_id)
    queries = dashboard_queries() + keda_queries()
    read = set().union(*(metrics_read(q) for q in queries))
    names, _ = scraped()
    assert len(queries) >= 15 and len(read) >= 15
    assert not read - names, f"queried but never scraped: {sorted(read - names)}"


def test_a_running_job_is_counted_by_farm_jobs_running_and_not_after(farm_client):
    job = farm.submit("Tell me a long story.", model=MODEL, max_tokens=400)
    pieces = job.stream(timeout=120)
    next(pieces)  # it runs
    try:
        _, values = scraped()
        assert values[("farm_jobs_running", MODEL)] >= 1
    finally:
        job.cancel()
    finished_usage(farm_client.database_url, job.id)
    _, values = scraped()
    assert values.get(("farm_jobs_running", MODEL), 0) == 0
