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


def grant_read_only(url: str, role: str) -> None:
    """Create (if needed) a login role that can only SELECT the archive's tables.

    Point ``archive sql`` users at ``postgresql+psycopg://ROLE@host/db``: even a
    statement that got past the read-only transaction could not write.
    """
    import re

    from archive.catalog.schema import load_schema
    from archive.errors import ArchiveError

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", role):
        raise ArchiveError(f"role name {role!r}: use lower-case letters, digits and _ (max 63)")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as con:
            exists = con.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).scalar()
            if not exists:
                con.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
            db = con.execute(sa.text("SELECT current_database()")).scalar()
            con.execute(sa.text(f'GRANT CONNECT ON DATABASE "{db}" TO "{role}"'))
            con.execute(sa.text(f'GRANT USAGE ON SCHEMA public TO "{role}"'))
            con.execute(sa.text(f'REVOKE CREATE ON SCHEMA public FROM "{role}"'))
            for name in [t.name for t in load_schema()] + ["alembic_version"]:
                con.execute(sa.text(f'REVOKE ALL ON "{name}" FROM "{role}"'))
                con.execute(sa.text(f'GRANT SELECT ON "{name}" TO "{role}"'))
    finally:
        engine.dispose()
