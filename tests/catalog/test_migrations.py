"""Alembic head must equal the tables derived from archive/schema/tables.yaml."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from archive.catalog.migrate import current_revision, head_revision
from archive.catalog.schema import load_schema, sqlalchemy_metadata


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


def _reflected_indexes(url: str) -> dict[str, dict[str, tuple]]:
    """{table: {index name: (key columns, include columns, predicate)}} of the database."""
    engine = sa.create_engine(url)
    insp = sa.inspect(engine)
    out = {}
    for t in load_schema():
        out[t.name] = {}
        for ix in insp.get_indexes(t.name):
            opts = ix.get("dialect_options", {})
            where = opts.get("postgresql_where")
            out[t.name][ix["name"]] = (tuple(ix["column_names"]), tuple(opts.get("postgresql_include") or ()),
                                       None if where is None else where.strip("()"))
    engine.dispose()
    return out


def test_head_indexes_match_schema_exactly(pg_store_url):
    """Alembic's compare does not look at INCLUDE columns or partial predicates; check them
    here, and that the head has no index the schema does not name."""
    have = _reflected_indexes(pg_store_url)
    for t in load_schema():
        want = {ix.sql_name(t.name): (ix.columns, ix.include, ix.where) for ix in t.indexes}
        assert have[t.name] == want, t.name


def test_dia_object_current_index_is_partial_and_covering():
    t = load_schema()["dia_object"]
    cover = [ix for ix in t.indexes if ix.where == "validity_end IS NULL"]
    assert len(cover) == 1 and cover[0].columns == ("healpix29",)
    # everything association reads from the current versions is in the index
    from archive.catalog.dia_ingest import ASSOCIATION_COLUMNS

    assert set(ASSOCIATION_COLUMNS) <= set(cover[0].all_columns)
