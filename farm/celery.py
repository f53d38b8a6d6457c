"""`celery -A farm ...`: Celery looks for `farm.celery` and finds the farm's app here.

celery -A farm status
celery -A farm inspect active
"""

from farm.app import app

__all__ = ["app"]
