"""Alembic head must equal the tables derived from archive/schema/tables.yaml."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from archive.catalog.migrate import current_revision, head_revision
from archive.catalog.schema import sqlalchemy_metadata


def test_head_matches_schema(pg_store_url):
    assert current_revision(pg_store_url) == head_revision()
    engine = sa.create_engine(pg_store_url)
    with engine.connect() as con:
        ctx = MigrationContext.configure(con, opts={"compare_type": True})
        diff = compare_metadata(ctx, sqlalchemy_metadata())
    engine.dispose()
    assert diff == [], f"migrations and schema/ disagree; add a revision: {diff}"


def test_schema_change_is_detected(pg_store_url):
    """The check above can fail: a column added to the schema shows up as a difference."""
    md = sqlalchemy_metadata()
    md.tables["exposure"].append_column(sa.Column("extra_col", sa.Float))
    engine = sa.create_engine(pg_store_url)
    with engine.connect() as con:
        diff = compare_metadata(MigrationContext.configure(con), md)
    engine.dispose()
    assert any(d[0] == "add_column" and d[3].name == "extra_col" for d in diff)


def test_indexes_exist(pg_store_url):
    engine = sa.create_engine(pg_store_url)
    insp = sa.inspect(engine)
    for table in ["dia_source", "dia_object", "source", "exposure"]:
        cols = [tuple(ix["column_names"]) for ix in insp.get_indexes(table)]
        assert ("healpix29",) in cols, table
    engine.dispose()
