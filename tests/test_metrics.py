"""The farm's Prometheus metrics, scraped after jobs whose numbers the test knows."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

import farm
from farm.context import get_context
from farm.metrics import render
from tests.conftest import LIVE_SLOTS, MODEL, finished_usage

pytestmark = pytest.mark.e2e


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = render(get_context()).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_scrape_counts_the_jobs_tokens_and_latencies_of_known_jobs(farm_client):
    before = scrape()
    done = [farm.infer(f"metrics {i}", model=MODEL, max_tokens=3) for i in range(2)]
    for c in done:
        finished_usage(farm_client.database_url, c.job_id)
    after = scrape()
    key = {"model": MODEL, "priority": "normal", "status": "succeeded"}
    assert value(after, "farm_jobs_total", **key) - value(before, "farm_jobs_total", **key) == 2
    generated = sum(c.usage.completion_tokens for c in done)
    gen = "farm_generation_tokens_total"
    assert value(after, gen, model=MODEL) - value(before, gen, model=MODEL) == generated
    prompt = sum(c.usage.prompt_tokens for c in done)
    p = "farm_prompt_tokens_total"
    assert value(after, p, model=MODEL) - value(before, p, model=MODEL) == prompt
    ttft = "farm_time_to_first_token_seconds_count"
    assert value(after, ttft, model=MODEL) - value(before, ttft, model=MODEL) == 2
    inf = {"model": MODEL, "le": "+Inf"}
    wait = "farm_queue_wait_seconds_bucket"
    assert value(after, wait, **inf) - value(before, wait, **inf) == 2
    assert value(after, "farm_queue_depth", model=MODEL, priority="high") == 0
    assert value(after, "farm_workers_live", model=MODEL) == 1
    [slots] = [v for (name, _), v in after.items() if name == "farm_worker_slots"]
    assert slots == LIVE_SLOTS


def test_the_metrics_command_prints_a_scrape(farm_client):
    r = farm_client.farm("metrics", "--once")
    assert r.returncode == 0, r.stderr
    assert "# TYPE farm_queue_depth gauge" in r.stdout and "farm_jobs_total{" in r.stdout
