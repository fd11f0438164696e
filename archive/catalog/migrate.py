"""Alembic migrations of the Postgres schema, driven from Python (no alembic.ini needed).

The revisions live in ``archive/migrations/versions``; ``tests/catalog`` checks
that applying them all yields exactly the tables derived from the schema YAML.
"""

from __future__ import annotations

from importlib import resources

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("archive.migrations")))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision id shipped with this code."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(url: str) -> str | None:
    """The revision a database is at (None when it has never been migrated)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as con:
            return MigrationContext.configure(con).get_current_revision()
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> str:
    """Bring the database at ``url`` to ``revision``; returns the revision reached."""
    command.upgrade(alembic_config(url), revision)
    return current_revision(url)
