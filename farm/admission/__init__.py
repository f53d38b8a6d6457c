"""Admission: what a job must pass before it is queued, and what keeps the queues fair.

    quotas.py    tokens per day and jobs in flight per session, reserved at submit
    aging.py     bounded waits: a job past its priority's limit moves up

The bound on a model's queue (FARM_MAX_QUEUED) is checked in `farm/enqueue.py`; the farm's
Prometheus metrics are in `farm/metrics.py`.
"""
