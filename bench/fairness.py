"""Fair share between sessions (farm/fair/): a flood and a late arrival, and two backlogged
sessions' weighted service.

1. flood: session A submits --flood jobs at once, then session B submits --arrivals, one
   every --gap seconds, same priority, same lengths. Prints B's (and A's) median queue wait,
   in ms and in job durations (the median job's start-to-end time). Goal: B <= 2.
   On Gemma (--engine gemma: a whole embedded farm, one worker with --slots slots) or on
   the engine's twin (--engine twin: a real Celery worker in this process on the embedded
   broker, its engine the in-memory twin).
2. shares (twin): sessions A and B each keep a backlog for --seconds, A's jobs long (a
   400-character prompt, 100 tokens out), B's short (40, 10); the weighted service each
   got (input tokens + FARM_FAIR_OUTPUT_WEIGHT x output tokens, of the jobs that ended in
   the window) and its ratio: goal 1 within 10 %; then again with A's weight 2: goal 2.
3. crowd (--crowd, instead of 1 and 2): nine sessions submit --arrivals jobs between them,
   one every --gap seconds in turn, first alone, then again after a tenth session submitted
   --flood jobs at once. Prints the nine's p95 (and median) queue wait in both runs, in ms
   and in job durations: what one session's flood costs the others.

    python bench/fairness.py [--engine gemma|twin] [--flood 200] [--arrivals 20] [--gap 0.5]
                             [--max-tokens 8] [--slots 4] [--seconds 20] [--skip-shares]
                             [--twin-pace 0.01] [--crowd]

FARM_FAIR_QUEUED=N in the environment sets how many jobs of a priority wait in the Celery
queue (default: a quarter of the live slots); a large N (10000) is farm without fair share.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TWIN = "twin"


@contextmanager
def twin_worker(slots: int, seconds_per_token: float) -> Iterator[None]:
    """Model 'twin' in the registry, served by a real Celery worker in this process whose
    engine is the in-memory twin."""
    from celery.contrib.testing.worker import start_worker

    from farm.context import get_context
    from farm.queue import queue_name
    from farm.registry import queries, transaction, upgrade
    from workers.heartbeat import Membership
    from workers.host import EngineOptions
    from workers.models import ModelCache
    from workers.spec import ModelSpec
    from workers.tasks import JobRunner, register_task
    from workers.twin import TwinHost

    ctx = get_context()
    upgrade(ctx.database_url)
    with transaction(ctx.database_url) as s:
        if all(m.name != TWIN for m in queries.list_models(s)):
            queries.add_model(s, name=TWIN, path="/nonexistent/twin.gguf", n_ctx=4096)
    options = EngineOptions(slots=slots, threads=1)
    cache = ModelCache(
        [ModelSpec(name=TWIN, path="/nonexistent/twin.gguf")],
        options=options,
        host_factory=functools.partial(TwinHost, seconds_per_token=seconds_per_token),
    )
    membership = Membership(ctx, "twin-bench", "cpu")
    membership.options, membership.cache = options, cache
    membership.begin()
    cache.preload()
    register_task(ctx.app, JobRunner(ctx, "twin-bench", cache))
    try:
        with start_worker(
            ctx.app,
            pool="threads",
            concurrency=slots,
            perform_ping_check=False,
            queues=[queue_name(TWIN)],
            loglevel="WARNING",
        ):
            membership.join("cpu")
            yield
    finally:
        membership.leave()
        cache.close()


def rows(job_ids: list[str]) -> dict[str, Any]:
    from sqlalchemy import select

    from farm.context import get_context
    from farm.registry import transaction
    from farm.registry.tables import UsageRecord

    ctx = get_context()
    ctx.flush_rows()
    with transaction(ctx.database_url) as s:
        found = s.scalars(select(UsageRecord).where(UsageRecord.job_id.in_(job_ids)))
        return {r.job_id: r for r in found}


def flood(model: str, n: int, arrivals: int, gap: float, max_tokens: int) -> dict[str, float]:
    import farm

    prompt = "Write one sentence about the number {}."
    a = [
        farm.submit(prompt.format(i), model=model, session="A", max_tokens=max_tokens)
        for i in range(n)
    ]
    b = []
    for i in range(arrivals):
        time.sleep(gap)
        b.append(
            farm.submit(prompt.format(1000 + i), model=model, session="B", max_tokens=max_tokens)
        )
    for job in [*a, *b]:
        job.result(timeout=3600)
    time.sleep(0.5)  # the last usage rows
    found = rows([j.id for j in [*a, *b]])
    durations = [
        (found[j.id].finished_at - found[j.id].started_at).total_seconds() * 1000 for j in a
    ]
    took, mean = statistics.median(durations), statistics.fmean(durations)
    first = min(r.submitted_at for r in found.values())
    span = (max(r.finished_at for r in found.values()) - first).total_seconds()
    wait_a = statistics.median(found[j.id].queue_wait_ms for j in a)
    wait_b = statistics.median(found[j.id].queue_wait_ms for j in b)
    return {
        "job_ms": took,
        "wait_a_ms": wait_a,
        "wait_b_ms": wait_b,
        "b_in_jobs": wait_b / took,
        "mean_job_ms": mean,
        "jobs_per_s": len(found) / span,
    }


def trickle(model: str, sessions: list[str], count: int, gap: float, max_tokens: int) -> list[Any]:
    """`count` jobs, one every `gap` seconds, the sessions taking turns."""
    import farm

    jobs = []
    for i in range(count):
        if i:
            time.sleep(gap)
        prompt = f"Write one sentence about the number {2000 + i}."
        jobs.append(
            farm.submit(
                prompt, model=model, session=sessions[i % len(sessions)], max_tokens=max_tokens
            )
        )
    return jobs


def crowd(model: str, n: int, count: int, gap: float, max_tokens: int) -> dict[str, float]:
    """Nine sessions' waits alone, then behind a tenth session's flood of `n` jobs."""
    import farm

    nine = [f"S{i}" for i in range(1, 10)]
    alone = trickle(model, nine, count, gap, max_tokens)
    for job in alone:
        job.result(timeout=3600)
    flooded = [
        farm.submit(
            f"Write one sentence about the number {i}.",
            model=model,
            session="F",
            max_tokens=max_tokens,
        )
        for i in range(n)
    ]
    crowded = trickle(model, nine, count, gap, max_tokens)
    for job in [*crowded, *flooded]:
        job.result(timeout=3600)
    time.sleep(0.5)  # the last usage rows
    found = rows([j.id for j in [*alone, *crowded, *flooded]])
    took = statistics.median(
        (found[j.id].finished_at - found[j.id].started_at).total_seconds() * 1000
        for j in [*alone, *crowded]
    )

    def p95(jobs: list[Any]) -> float:
        return statistics.quantiles([found[j.id].queue_wait_ms for j in jobs], n=20)[18]

    def median(jobs: list[Any]) -> float:
        return statistics.median(found[j.id].queue_wait_ms for j in jobs)

    return {
        "job_ms": took,
        "alone_p95": p95(alone),
        "alone_median": median(alone),
        "crowded_p95": p95(crowded),
        "crowded_median": median(crowded),
        "flood_median": median(flooded),
    }


def backlogged(seconds: float, weight_a: float) -> dict[str, float]:
    """A (long jobs) and B (short jobs) each keep a backlog; their service in the window."""
    import farm
    from farm.context import get_context
    from farm.fair.place import held_per_session
    from farm.queue import PRIORITIES
    from farm.registry import queries, transaction
    from farm.registry.tables import as_utc, utcnow

    NORMAL = PRIORITIES["normal"]

    ctx = get_context()
    with transaction(ctx.database_url) as s:
        queries.set_quota(s, "A", tokens_per_day=None, max_queued=None, weight=weight_a)
    ctx.quotas.clear()
    w = ctx.settings.fair_output_weight
    kinds = {"A": ("y" * 400, 100), "B": ("y" * 40, 10)}
    jobs: dict[str, list[Any]] = {"A": [], "B": []}

    def top_up() -> None:
        held = held_per_session(ctx.broker_redis, TWIN)[NORMAL]
        for session, (text, max_tokens) in kinds.items():
            # Enough held that neither runs dry before the next top-up.
            want = 20 if session == "A" else 200
            for _ in range(max(0, want - held.get(session, 0))):
                jobs[session].append(
                    farm.submit(text, model=TWIN, session=session, max_tokens=max_tokens)
                )

    start = utcnow()
    warm, end = start.timestamp() + 2.0, start.timestamp() + 2.0 + seconds
    while time.time() < end:
        top_up()
        time.sleep(0.5)
    service = dict.fromkeys(kinds, 0.0)
    for job in [j for js in jobs.values() for j in js]:
        job.cancel()
    found = rows([j.id for js in jobs.values() for j in js])
    for r in found.values():
        if (
            r.status == "succeeded"
            and r.finished_at
            and warm <= as_utc(r.finished_at).timestamp() <= end
        ):
            service[r.session] += r.prompt_tokens + w * r.completion_tokens
    with transaction(ctx.database_url) as s:
        queries.remove_quota(s, "A")
    ctx.quotas.clear()
    return {**service, "ratio": service["A"] / max(service["B"], 1.0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=["gemma", "twin"], default="gemma")
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("--arrivals", type=int, default=20)
    parser.add_argument("--gap", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--skip-shares", action="store_true")
    parser.add_argument("--twin-pace", type=float, default=0.01, help="twin: seconds a token")
    parser.add_argument("--crowd", action="store_true", help="nine sessions and a flooding one")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from farm_under_bench import farm_for_bench

    from farm.context import get_context

    home = Path(tempfile.mkdtemp(prefix="farm-bench-fair-"))
    models = ["gemma3-270m"] if args.engine == "gemma" else []
    with farm_for_bench(models, home, parallel=args.slots), contextlib.ExitStack() as stack:
        ctx = get_context()
        print(
            f"fair share: FARM_FAIR_QUEUED={ctx.settings.fair_queued or 'a quarter of the slots'}"
        )
        if args.engine == "twin" or not (args.skip_shares or args.crowd):  # one task per app
            stack.enter_context(twin_worker(args.slots, args.twin_pace))
        model = "gemma3-270m" if args.engine == "gemma" else TWIN
        if args.crowd:
            c = crowd(model, args.flood, args.arrivals, args.gap, args.max_tokens)
            job = c["job_ms"]
            print(
                f"crowd ({args.engine}, {args.slots} slots): nine sessions {args.arrivals} jobs, "
                f"one every {args.gap}s, max_tokens {args.max_tokens}, median job {job:.0f} ms; "
                f"their queue wait alone p95 {c['alone_p95']:.0f} ms = {c['alone_p95'] / job:.2f}"
                f" jobs (median {c['alone_median']:.0f} ms); behind a tenth session's "
                f"{args.flood} p95 {c['crowded_p95']:.0f} ms = {c['crowded_p95'] / job:.2f} jobs "
                f"(median {c['crowded_median']:.0f} ms); the flood's median wait "
                f"{c['flood_median']:.0f} ms"
            )
            return 0
        f = flood(model, args.flood, args.arrivals, args.gap, args.max_tokens)
        print(
            f"flood ({args.engine}, {args.slots} slots): A {args.flood} at once, B "
            f"{args.arrivals} every {args.gap}s, max_tokens {args.max_tokens}: median job "
            f"{f['job_ms']:.0f} ms (mean {f['mean_job_ms']:.0f}); median queue wait A "
            f"{f['wait_a_ms']:.0f} ms, B {f['wait_b_ms']:.0f} ms = {f['b_in_jobs']:.2f} median "
            f"jobs (goal <= 2), {f['wait_b_ms'] / f['mean_job_ms']:.2f} mean jobs; "
            f"{f['jobs_per_s']:.2f} jobs/s"
        )
        if not args.skip_shares:
            for weight in (1.0, 2.0):
                s = backlogged(args.seconds, weight)
                print(
                    f"shares (twin, {args.slots} slots, {args.twin_pace * 1000:g} ms a token, "
                    f"{args.seconds:g}s): A long jobs weight {weight:g}, B short jobs weight "
                    f"1: service A {s['A']:.0f}, B {s['B']:.0f}, A/B {s['ratio']:.3f} "
                    f"(goal {weight:g} within 10 %)"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
