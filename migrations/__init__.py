"""Alembic migrations of farm's registry. Run them with `farm db upgrade`."""
