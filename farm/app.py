"""The farm's Celery app as a module, for Celery's own tools:

    celery -A farm.app inspect active_queues
    celery -A farm.app flower

It is built from the same settings (and transport options) as clients and workers.
"""

from farm.context import get_context

app = get_context().app
