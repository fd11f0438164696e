"""Alembic revisions for the Postgres store (see archive.catalog.migrate)."""
