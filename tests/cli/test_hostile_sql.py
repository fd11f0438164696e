"""`archive sql` as an attacker uses it, on both backends.

Every hostile query must be refused with one line on stderr and exit status 2,
and leave the store exactly as it was: on the Parquet store every file under
the archive root keeps its bytes (and nothing appears or disappears); on
Postgres the row counts stay, no advisory lock or extra session is left, and
no large object or file was made.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from archive.catalog.dia_ingest import LOCK_KEY
from archive.cli.main import main

#: Hostile queries for both engines; {root} is the archive root (Parquet) or a
#: scratch directory (Postgres), {part} a Parquet file of the archive, {outside}
#: a Parquet file outside the archive.
COMMON = [
    "EXPLAIN ANALYSE COPY (SELECT 'x') TO '{root}/manifest.json' (FORMAT csv, HEADER false)",
    "EXPLAIN ANALYZE SELECT * FROM dia_source",
    "explain /* sneaky */ analyse select 1",
    "EXPLAIN (ANALYZE) SELECT 1",
    "EXPLAIN (ANALYZE true, FORMAT json) SELECT 1",
    "EXPLAIN COPY (SELECT 1) TO '{root}/x.csv'",
    "COPY (SELECT 1) TO '{root}/x.csv'",
    "COPY dia_source FROM '{root}/x.csv'",
    "DELETE FROM dia_source",
    "UPDATE dia_source SET psf_flux = 666",
    "INSERT INTO dia_source (dia_source_id) VALUES (1)",
    "DROP TABLE dia_source",
    "TRUNCATE dia_source",
    "CREATE TABLE evil AS SELECT * FROM dia_source",
    "CREATE VIEW evil AS SELECT 1",
    "SELECT * INTO evil FROM dia_source",
    "SELECT 1; DELETE FROM dia_source",
    "WITH d AS (DELETE FROM dia_source RETURNING *) SELECT count(*) FROM d",
    "ATTACH '{root}/evil.db' AS evil",
    "SET statement_timeout = 0",
    "RESET ALL",
    "CALL pg_sleep(1)",
    "VACUUM",
    "BEGIN",
    "PREPARE p AS SELECT 1",
    "",
    "   ",
    "SELEC nothing",
]
DUCKDB = [
    "COPY (SELECT * REPLACE (666.0::DOUBLE AS psf_flux) FROM read_parquet('{part}')) TO '{part}' (FORMAT parquet)",
    "EXPLAIN ANALYSE COPY (SELECT * REPLACE (666.0::DOUBLE AS psf_flux) FROM read_parquet('{part}')) "
    "TO '{part}' (FORMAT parquet)",
    "SELECT * FROM read_csv('/etc/passwd', header=false)",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM read_text('{root}/manifest.json')",
    "SELECT * FROM '{root}/manifest.json'",
    "SELECT * FROM glob('/root/*')",
    "SELECT * FROM glob('{root}/*')",
    "SELECT * FROM read_parquet('{outside}')",
    "SELECT * FROM '{outside}'",
    "SELECT * FROM read_csv('https://example.com/a.csv')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "SELECT * FROM query('COPY (SELECT 1) TO ''{root}/q.csv''')",
    "INSTALL json",
    "LOAD json",
    "INSTALL httpfs FROM 'https://example.com'",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "PRAGMA enable_profiling",
    "EXPORT DATABASE '{root}/exported'",
    "CHECKPOINT",
    "PIVOT dia_source ON band USING count(*)",
    "SELECT * FROM dia_source FOR SHARE",
]
POSTGRES = [
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT pg_catalog.pg_read_file('postgresql.conf')",
    "SELECT pg_read_binary_file('/etc/passwd')",
    "SELECT * FROM pg_ls_dir('.')",
    "SELECT pg_stat_file('postgresql.conf')",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
    "SELECT pg_cancel_backend(pg_backend_pid())",
    "SELECT pg_reload_conf()",
    "SELECT pg_rotate_logfile()",
    f"SELECT pg_advisory_lock({LOCK_KEY}, 0)",
    f"SELECT pg_try_advisory_lock({LOCK_KEY}, 0)",
    f"SELECT x FROM (SELECT pg_advisory_lock({LOCK_KEY}, p) AS x FROM generate_series(0, 3) p) s",
    "SELECT lo_create(0)",
    "SELECT lo_from_bytea(0, 'x'::bytea)",
    "SELECT lo_import('/etc/passwd')",
    "SELECT lo_export(1, '{root}/lo.txt')",
    "SELECT dblink_exec('dbname=postgres', 'DROP DATABASE test')",
    "SELECT * FROM dblink('dbname=postgres', 'SELECT 1') AS t(a int)",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT query_to_xml('DELETE FROM dia_source RETURNING 1', true, true, '')",
    "SELECT nextval('evil_seq')",
    "SELECT pg_sleep(600)",
    "SELECT pg_notify('x', 'y')",
    "SELECT * FROM dia_source FOR UPDATE",
    "SELECT * FROM dia_source FOR SHARE",
    "DO $$ BEGIN DELETE FROM dia_source; END $$",
    "LOCK TABLE dia_source",
    "LISTEN x",
    "COMMIT; DELETE FROM dia_source",
]


def _rows(n=40):
    rng = np.random.default_rng(3)
    return pd.DataFrame({
        "dia_source_id": np.arange(1, n + 1, dtype=np.int64),
        "exposure_id": np.full(n, 7, np.int64), "visit": np.full(n, 7, np.int64),
        "detector": np.zeros(n, np.int32), "band": rng.choice(["g", "r"], n),
        "mjd": np.full(n, 60000.5), "ra": 30 + rng.uniform(-0.01, 0.01, n),
        "dec": -5 + rng.uniform(-0.01, 0.01, n), "psf_flux": rng.normal(500, 10, n),
        "psf_flux_err": np.full(n, 5.0), "flags": np.zeros(n, np.int64)})


def _tree_digest(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _pg_state(url: str) -> tuple:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as con:
            counts = con.execute(sa.text("SELECT (SELECT count(*) FROM dia_source), "
                                         "(SELECT count(*) FROM dia_object), "
                                         "(SELECT count(*) FROM pg_largeobject_metadata)")).one()
            locks = con.execute(sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")).scalar()
            tables = con.execute(sa.text("SELECT count(*) FROM pg_class WHERE relname IN ('evil', 'evil_seq')")).scalar()
            sessions = con.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()")).scalar()
        return tuple(counts), locks, tables, sessions
    finally:
        engine.dispose()


@pytest.fixture
def loaded(repo, tmp_path):
    src = tmp_path / "rows.parquet"
    _rows().to_parquet(src)
    assert main(["ingest", "catalog", "--repo", repo, "dia_source", str(src)]) == 0
    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"secret": [1, 2, 3]}), outside)
    if "://" in repo:
        root = tmp_path / "scratch"
        root.mkdir()
        return repo, {"root": root, "part": root / "none.parquet", "outside": outside}, "postgres"
    root = pathlib.Path(repo)
    part = next(root.glob("dia_source/**/*.parquet"))
    return repo, {"root": root, "part": part, "outside": outside}, "parquet"


def test_hostile_queries_refused_store_unchanged(loaded, capsys):
    repo, where, backend = loaded
    queries = COMMON + (DUCKDB if backend == "parquet" else POSTGRES)
    before = _tree_digest(where["root"]) if backend == "parquet" else _pg_state(repo)
    scratch_before = sorted(os.listdir(where["root"]))
    accepted = []
    for q in queries:
        query = q.format(**{k: str(v) for k, v in where.items()})
        capsys.readouterr()
        rc = main(["sql", "--repo", repo, "--timeout", "20", query])
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        if rc != 2 or len(lines) != 1 or "Traceback" in out.err:
            accepted.append((query, rc, out.err[:300], out.out[:200]))
    assert not accepted, "hostile queries not refused in one line with exit 2:\n" + "\n".join(map(repr, accepted))
    after = _tree_digest(where["root"]) if backend == "parquet" else _pg_state(repo)
    assert after == before
    assert sorted(os.listdir(where["root"])) == scratch_before
    # and the store still answers
    assert main(["sql", "--repo", repo, "--format", "csv", "SELECT count(*) AS n FROM dia_source"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "40"


VALID = [
    "SELECT count(*) AS n FROM dia_source",
    "  -- a comment first\n SELECT band, count(*) AS n FROM dia_source GROUP BY band ORDER BY band",
    "WITH s AS (SELECT * FROM dia_source WHERE psf_flux > 0) SELECT count(*) AS n FROM s",
    "EXPLAIN SELECT * FROM dia_source",
    "SELECT * FROM (VALUES (1, 'a')) AS t(a, b)",
    "SELECT 'DELETE FROM dia_source; EXPLAIN ANALYZE' AS harmless_text",
    "SELECT 5 % 3 AS m",
]


def test_valid_read_only_queries_run(loaded, capsys):
    repo, _, backend = loaded
    postgres_only = ["SELECT * FROM json_to_record('{\"a\": 1}') AS t(a int)",
                     "SELECT dia_source_id FROM dia_source ORDER BY psf_flux DESC FETCH FIRST 2 ROWS WITH TIES"]
    queries = VALID + (postgres_only if backend == "postgres" else [])
    for q in queries:
        capsys.readouterr()
        rc = main(["sql", "--repo", repo, "--format", "csv", q])
        out = capsys.readouterr()
        assert rc == 0, (q, out.err)


def test_timeout_cancels_a_runaway_query(loaded, capsys):
    repo, _, backend = loaded
    q = ("SELECT count(*) FROM range(1000000000000)" if backend == "parquet"
         else "SELECT count(*) FROM generate_series(1, 1000000000000)")
    capsys.readouterr()
    assert main(["sql", "--repo", repo, "--timeout", "1", q]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "timeout" in err[0]


@pytest.mark.postgres
def test_user_locks_never_block_association(pg_store_url):
    """A query that got a session lock past every guard still cannot keep it:
    the connection is closed after each user query."""
    from archive.catalog.backends import open_store

    store = open_store(pg_store_url)
    try:
        # the guard refuses lock functions by name; prove the connection drop too
        with pytest.raises(Exception):
            store.sql(f"SELECT pg_advisory_lock({LOCK_KEY}, 1)")
        con = store.engine.connect()
        con.exec_driver_sql(f"SELECT pg_advisory_lock({LOCK_KEY}, 1)")  # what a lock would have been
        con.invalidate()
        con.close()
        n = store.sql("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'")["n"].iloc[0]
        assert n == 0
    finally:
        store.close()


# -- the read-only role ----------------------------------------------------------

@pytest.fixture
def reader(pg_store_url):
    role = f"reader_{uuid.uuid4().hex[:8]}"
    yield role, pg_store_url.replace("postgres@", f"{role}@")
    admin = sa.create_engine(pg_store_url)
    with admin.begin() as con:
        exists = con.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).scalar()
        if exists:
            con.execute(sa.text(f'DROP OWNED BY "{role}"'))
            con.execute(sa.text(f'DROP ROLE "{role}"'))
    admin.dispose()


@pytest.mark.postgres
def test_read_only_role_can_only_read(reader, capsys):
    role, ro_url = reader
    admin_url = ro_url.replace(f"{role}@", "postgres@")
    assert main(["db", "grant-read-only", "--repo", admin_url, role]) == 0
    engine = sa.create_engine(ro_url)
    try:
        with engine.connect() as con:
            assert con.execute(sa.text("SELECT count(*) FROM dia_source")).scalar() >= 0
            # the role's default is read-only, but the user may lift that: privileges must hold
            con.execute(sa.text("SET default_transaction_read_only = off"))
            con.commit()
            for stmt in ["DELETE FROM dia_source", "INSERT INTO dia_object (dia_object_id) VALUES (1)",
                         "CREATE TEMP TABLE t (a int)", "SELECT lo_create(0)", "SELECT lo_from_bytea(0, 'x')",
                         f"SELECT pg_advisory_lock({LOCK_KEY}, 0)", "SELECT pg_read_file('/etc/passwd')",
                         "CREATE TABLE t (a int)", "CREATE SCHEMA evil", "SELECT pg_reload_conf()",
                         "TRUNCATE dia_source"]:
                with pytest.raises(sa.exc.DBAPIError, match="permission denied|must be superuser"):
                    con.execute(sa.text(stmt))
                con.rollback()
        capsys.readouterr()
        assert main(["sql", "--repo", ro_url, "--format", "csv", "SELECT count(*) AS n FROM dia_object"]) == 0
        assert capsys.readouterr().out.startswith("n")
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_grant_read_only_refuses_privileged_roles(reader, capsys):
    role, ro_url = reader
    admin_url = ro_url.replace(f"{role}@", "postgres@")
    admin = sa.create_engine(admin_url)
    try:
        with admin.begin() as con:
            con.execute(sa.text(f'CREATE ROLE "{role}" LOGIN SUPERUSER'))
        capsys.readouterr()
        assert main(["db", "grant-read-only", "--repo", admin_url, role]) == 2
        assert "SUPERUSER" in capsys.readouterr().err
        # a plain role that belongs to a writer role: the grants cannot make it read-only
        writer = f"{role}_w"
        with admin.begin() as con:
            con.execute(sa.text(f'ALTER ROLE "{role}" NOSUPERUSER'))
            con.execute(sa.text(f'CREATE ROLE "{writer}"'))
            con.execute(sa.text(f'GRANT DELETE ON dia_source TO "{writer}"'))
            con.execute(sa.text(f'GRANT "{writer}" TO "{role}"'))
        try:
            assert main(["db", "grant-read-only", "--repo", admin_url, role]) == 2
            err = capsys.readouterr().err
            assert "DELETE on table dia_source" in err and len(err.strip().splitlines()) == 1
            with admin.connect() as con:  # nothing changed: the role got no SELECT grant
                assert not con.execute(sa.text("SELECT has_table_privilege(:r, 'dia_object', 'SELECT')"),
                                       {"r": role}).scalar()
        finally:
            with admin.begin() as con:
                con.execute(sa.text(f'DROP OWNED BY "{writer}"'))
                con.execute(sa.text(f'DROP ROLE "{writer}"'))
        assert main(["db", "grant-read-only", "--repo", admin_url, "postgres"]) == 2
    finally:
        admin.dispose()
