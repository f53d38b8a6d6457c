"""Prometheus metrics for the whole farm, read at scrape time from the broker and the registry.

One scrape target serves a fleet of any size: queue depth comes from Redis (Flower's
`/metrics` has none), jobs, tokens and timings from the usage rows every worker writes,
slots from the workers' rows. Names follow vLLM's and llama-server's where they have one
(prompt and generation tokens, time to first token, time per output token). Sessions are
a label only on the fair-share gauges, and only the SESSIONS_MOST sessions served most in
the last five minutes (or queued now): their number is otherwise unbounded.

    farm metrics --port 9101        # then scrape http://HOST:9101/metrics
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from farm.batches import store
from farm.context import FarmContext
from farm.depth import queue_depths
from farm.fair.share import session_shares
from farm.queue import PRIORITIES, rejections_key
from farm.registry import queries, transaction

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

# Seconds. Queue waits reach an hour for batches; generations a few minutes.
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0)
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class FarmCollector(Collector):
    """Everything a Prometheus scrape of the farm shows, built afresh on each scrape."""

    def __init__(self, ctx: FarmContext):
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        with transaction(self.ctx.database_url) as s:
            models = [m.name for m in queries.list_models(s)]
            yield from _jobs_and_tokens(s)
            yield from _histograms(s)
            yield from _workers(s)
            yield from _batches(s)
        depth = GaugeMetricFamily(
            "farm_queue_depth", "Jobs waiting in a model's queue", labels=["model", "priority"]
        )
        for model, per in queue_depths(self.ctx, models).items():
            for priority in PRIORITIES:
                depth.add_metric([model, priority], per[priority])
        yield depth
        rejected = CounterMetricFamily(
            "farm_rejections", "Submits refused before queuing", labels=["model", "reason"]
        )
        reasons = ("queue_full", "quota", "rate")
        pipe = self.ctx.redis.pipeline(transaction=False)
        for model in models:
            for reason in reasons:
                pipe.get(rejections_key(model, reason))
        counts = iter(pipe.execute())
        for model in models:
            for reason in reasons:
                rejected.add_metric([model, reason], float(next(counts) or 0))
        yield rejected
        yield from _sessions(self.ctx, models)


SESSIONS_MOST = 50


def _sessions(ctx: FarmContext, models: list[str]) -> Iterator[Metric]:
    queued = GaugeMetricFamily(
        "farm_session_queued", "Jobs of a session waiting (held or queued)", labels=["session"]
    )
    served = GaugeMetricFamily(
        "farm_session_served_tokens",
        "Weighted tokens (input + FARM_FAIR_OUTPUT_WEIGHT x output) served to a session in "
        "the last five minutes",
        labels=["session"],
    )
    share = GaugeMetricFamily(
        "farm_session_share", "A session's share of the tokens served lately", labels=["session"]
    )
    for row in session_shares(ctx, models)[:SESSIONS_MOST]:
        queued.add_metric([row["session"]], row["queued"])
        served.add_metric([row["session"]], row["served_tokens"])
        share.add_metric([row["session"]], row["share"])
    yield from (queued, served, share)


def _jobs_and_tokens(s: Session) -> Iterator[Metric]:
    jobs = CounterMetricFamily(
        "farm_jobs", "Jobs by model, priority and status", labels=["model", "priority", "status"]
    )
    running = GaugeMetricFamily(
        "farm_jobs_running",
        "Jobs running on a worker now, by model (with farm_queue_depth: the work a model's "
        "workers have, the signal to scale them on)",
        labels=["model"],
    )
    now: dict[str, int] = {}
    for model, priority, status, n in queries.job_counts(s):
        jobs.add_metric([model, priority, status], n)
        if status == "running":
            now[model] = now.get(model, 0) + n
    for model, n in sorted(now.items()):
        running.add_metric([model], n)
    yield jobs
    yield running
    prompt = CounterMetricFamily("farm_prompt_tokens", "Prompt tokens", labels=["model"])
    cached = CounterMetricFamily(
        "farm_prompt_cached_tokens", "Prompt tokens found in the prompt cache", labels=["model"]
    )
    generated = CounterMetricFamily("farm_generation_tokens", "Tokens generated", labels=["model"])
    for model, p, c, g in queries.token_totals(s):
        prompt.add_metric([model], float(p))
        cached.add_metric([model], float(c))
        generated.add_metric([model], float(g))
    yield from (prompt, cached, generated)


def _histograms(s: Session) -> Iterator[Metric]:
    series = (
        ("farm_queue_wait_seconds", "Time from submit to start", "queue_wait", QUEUE_WAIT_BUCKETS),
        ("farm_time_to_first_token_seconds", "Time to the first token", "ttft", TTFT_BUCKETS),
        ("farm_time_per_output_token_seconds", "Generation time per token", "tpot", TPOT_BUCKETS),
        ("farm_job_duration_seconds", "Generation time of a job", "generation", DURATION_BUCKETS),
    )
    for name, doc, measure, buckets in series:
        family = HistogramMetricFamily(name, doc, labels=["model"])
        for model, counts, total, summed_ms in queries.histogram(
            s, measure, [b * 1000 for b in buckets]
        ):
            points = [(str(b), float(c)) for b, c in zip(buckets, counts, strict=True)]
            points.append(("+Inf", float(total)))
            family.add_metric([model], points, summed_ms / 1000)
        yield family


def _workers(s: Session) -> Iterator[Metric]:
    leases = queries.live_leases(s)
    running = queries.running_jobs(s)
    live = {lease.worker_id for lease in leases}
    slots = GaugeMetricFamily("farm_worker_slots", "Slots of a live worker", labels=["worker"])
    busy = GaugeMetricFamily("farm_worker_slots_busy", "Slots running a job", labels=["worker"])
    for w in queries.list_workers(s):
        if w.id in live:
            slots.add_metric([w.id], w.slots)
            busy.add_metric([w.id], len(running.get(w.id, [])))
    yield from (slots, busy)
    per_model = GaugeMetricFamily(
        "farm_workers_live", "Workers holding a live lease on a model", labels=["model"]
    )
    counts: dict[str, int] = {}
    for lease in leases:
        counts[lease.model] = counts.get(lease.model, 0) + 1
    for model, n in sorted(counts.items()):
        per_model.add_metric([model], n)
    yield per_model


def _batches(s: Session) -> Iterator[Metric]:
    batches = GaugeMetricFamily("farm_batches", "Batches by status", labels=["status"])
    for status, n in store.status_counts(s):
        batches.add_metric([status], n)
    yield batches
    lines = GaugeMetricFamily(
        "farm_batch_lines",
        "Lines of the batches in progress, by status (pending: not queued yet)",
        labels=["model", "status"],
    )
    for model, status, n in store.active_line_counts(s):
        lines.add_metric([model, status], n)
    yield lines


def render(ctx: FarmContext) -> bytes:
    """One scrape's text, as Prometheus reads it."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(ctx))
    return generate_latest(registry)


def serve(ctx: FarmContext, port: int, address: str) -> None:
    """Serve /metrics until interrupted."""
    import threading

    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(ctx))
    start_http_server(port, addr=address, registry=registry)
    threading.Event().wait()
