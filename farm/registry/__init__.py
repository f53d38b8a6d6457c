"""The registry: which models exist, which workers hold them, and what every job used."""

from farm.registry.db import get_engine, transaction, upgrade

__all__ = ["get_engine", "transaction", "upgrade"]
