"""The shared-server store: PostgreSQL through SQLAlchemy Core and psycopg 3.

Bulk writes use COPY (CSV produced by Arrow, no per-row Python), one
transaction per batch.  Region queries turn into a set of healpix29 index
ranges that Postgres scans with the B-tree (one range scan per range, through
``unnest`` + ``LATERAL``), followed by an exact haversine distance filter in SQL.
User SQL runs in a READ ONLY transaction.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import sqlalchemy as sa

from archive.catalog.migrate import current_revision, head_revision, upgrade
from archive.catalog.schema import Schema, Table
from archive.catalog.sqlguard import check_read_only
from archive.catalog.store import CatalogStore, Transaction, frame_from_arrow
from archive.errors import ArchiveError, ReadOnlyError, ValidationError
from archive.sky.regions import Cone

log = logging.getLogger(__name__)


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver whatever postgres URL form was given."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise ArchiveError(f"not a PostgreSQL URL: {url!r}")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _select_list(t: Table, columns: Sequence[str], alias: str = "") -> str:
    """Quoted select list; timestamps as ISO 8601 UTC text so Arrow parses them."""
    out = []
    for c in columns:
        ref = f"{alias}{_quote(c)}"
        if t.column(c).type == "timestamp":
            ref = (f"to_char({ref} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') "
                   f"AS {_quote(c)}")
        out.append(ref)
    return ", ".join(out)


#: ``:name`` parameters outside single-quoted literals.
_PARAM = re.compile(r"'[^']*'|(?<!:):([A-Za-z_]\w*)")


def _fetch(connection, sql: str, params: dict, t: Table, columns: Sequence[str]) -> pd.DataFrame:
    """Run a SELECT through ``COPY (...) TO STDOUT`` and parse the CSV with Arrow.

    Fetching rows as Python tuples costs microseconds per value; COPY plus
    Arrow's CSV reader is vectorized end to end (the same reason writes use COPY).
    ``sql`` uses ``:name`` parameters, bound client-side by psycopg.
    """
    bound = _PARAM.sub(lambda m: m.group(0) if m.group(1) is None else f"%({m.group(1)})s", sql)
    stmt = "COPY (" + bound + ") TO STDOUT (FORMAT csv)"
    cur = connection.connection.driver_connection.cursor()
    buf = bytearray()
    try:
        # short indexed reads: JIT compilation would cost more than the query
        cur.execute("SET LOCAL jit = off")
        with cur.copy(stmt, params) as cp:
            for block in cp:
                buf += block
    finally:
        cur.close()
    schema = pa.schema([t.arrow_schema.field(c) for c in columns])
    if not buf:
        return frame_from_arrow(schema.empty_table())
    types = {f.name: f.type for f in schema}
    arrow = pacsv.read_csv(
        io.BytesIO(bytes(buf)),
        read_options=pacsv.ReadOptions(column_names=list(columns)),
        convert_options=pacsv.ConvertOptions(column_types=types, null_values=[""], true_values=["t"],
                                             false_values=["f"], quoted_strings_can_be_null=False,
                                             strings_can_be_null=True))
    return frame_from_arrow(arrow.cast(schema))


class PostgresStore(CatalogStore):
    """Catalog store on a PostgreSQL database (schema managed by Alembic)."""

    backend = "postgres"

    def __init__(self, url: str, create: bool = False, schema: Schema | None = None,
                 check_revision: bool = True) -> None:
        super().__init__(schema)
        self.url = normalize_url(url)
        self.engine = sa.create_engine(self.url, pool_pre_ping=True)
        try:
            with self.engine.connect() as con:
                con.execute(sa.text("SELECT 1"))
        except sa.exc.OperationalError as exc:
            self.engine.dispose()
            raise ArchiveError(f"cannot connect to {self.safe_url}: "
                               f"{str(exc.orig).strip().splitlines()[0]}") from None
        if create:
            upgrade(self.url)
        elif check_revision:
            have, want = current_revision(self.url), head_revision()
            if have != want:
                self.engine.dispose()
                raise ArchiveError(f"database {self.safe_url} is at schema revision {have or 'none'}, "
                                   f"this code needs {want}: run `archive db upgrade --repo {self.safe_url}`")
        self.metadata = sa.MetaData()
        self.metadata.reflect(self.engine, only=[t.name for t in self.schema])

    @property
    def safe_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    # -- reading -------------------------------------------------------------
    def _region_sql(self, t: Table, region, columns: list[str], current_only: bool = False) -> tuple[str, dict]:
        """SELECT for a region: the covering's healpix29 ranges as literal predicates.

        Literal ``(healpix29 >= lo AND healpix29 < hi) OR ...`` lets the planner
        estimate each range from the column histogram and choose a BitmapOr of
        B-tree range scans (the plan shape of Q3C).  Ranges passed as arrays
        (unnest + LATERAL) are estimated at a default selectivity, which at 10M
        rows made Postgres pick a parallel full scan (300x slower).  The ranges
        are integers computed here, never user text.
        """
        ranges = region.pixel_ranges(region.default_order())
        cols = _select_list(t, columns)
        if len(ranges) == 0:
            return f"SELECT {cols} FROM {_quote(t.name)} WHERE false", {}
        cover = " OR ".join(f"(healpix29 >= {int(lo)} AND healpix29 < {int(hi)})" for lo, hi in ranges)
        where = [f"({cover})"]
        params: dict = {}
        if current_only:
            where.append("validity_end IS NULL")
        if isinstance(region, Cone):
            # haversine: exact for tiny and large radii alike
            where.append("2 * asin(least(1.0, sqrt(power(sin(radians(dec - :dec0) / 2), 2) "
                         "+ cos(radians(dec)) * cos(radians(:dec0)) * power(sin(radians(ra - :ra0) / 2), 2))))"
                         " <= radians(:rad)")
            params.update(ra0=float(region.ra), dec0=float(region.dec), rad=float(region.radius_deg))
        return f"SELECT {cols} FROM {_quote(t.name)} WHERE " + " AND ".join(where), params

    def query_region(self, table: str, region, columns: Sequence[str] | None = None,
                     current_only: bool = False, connection=None) -> pd.DataFrame:
        t = self.table(table)
        if not t.positional:
            raise ArchiveError(f"table {table!r} has no positions")
        cols = self._columns(t, columns)
        need = list(dict.fromkeys(cols + ["ra", "dec"]))
        sql, params = self._region_sql(t, region, need, current_only)
        if connection is None:
            with self.engine.connect() as con:
                df = _fetch(con, sql, params, t, need)
        else:
            df = _fetch(connection, sql, params, t, need)
        if not isinstance(region, Cone) and len(df):
            df = df[region.contains(df["ra"].to_numpy(), df["dec"].to_numpy())]
        return df[cols].reset_index(drop=True)

    def get(self, table: str, ids: Sequence, columns: Sequence[str] | None = None) -> pd.DataFrame:
        t = self.table(table)
        cols = self._columns(t, columns)
        sql = (f"SELECT {_select_list(t, cols)} FROM {_quote(t.name)} "
               f"WHERE {_quote(t.id_column)} = ANY(:ids)")
        ids = [int(i) if t.column(t.id_column).numpy_kind == "i" else i for i in np.asarray(ids).tolist()]
        with self.engine.connect() as con:
            return _fetch(con, sql, {"ids": ids}, t, cols)

    def read_table(self, table: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        t = self.table(table)
        cols = self._columns(t, columns)
        with self.engine.connect() as con:
            return _fetch(con, f"SELECT {_select_list(t, cols)} FROM {_quote(t.name)}", {}, t, cols)

    def count(self, table: str) -> int:
        t = self.table(table)
        with self.engine.connect() as con:
            return int(con.execute(sa.text(f"SELECT count(*) FROM {_quote(t.name)}")).scalar())

    def sql(self, query: str) -> pd.DataFrame:
        check_read_only(query)
        with self.engine.connect() as con:
            con.exec_driver_sql("SET TRANSACTION READ ONLY")
            try:
                result = con.exec_driver_sql(query.replace("%", "%%"))
                df = pd.DataFrame.from_records(result.fetchall(), columns=list(result.keys()))
            except sa.exc.DBAPIError as exc:
                msg = str(exc.orig).strip().splitlines()[0]
                if "read-only transaction" in msg:
                    raise ReadOnlyError(f"archive SQL is read-only: {msg}") from None
                raise ArchiveError(f"SQL error: {msg}") from None
            finally:
                con.rollback()
        return df

    def close(self) -> None:
        self.engine.dispose()

    # -- writing -------------------------------------------------------------
    def transaction(self) -> PostgresTransaction:
        return PostgresTransaction(self)


def arrow_to_csv(rows: pa.Table) -> bytes:
    """CSV for COPY: NULL is an unquoted empty field, strings are quoted."""
    sink = io.BytesIO()
    opts = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    # timestamps: Arrow writes ISO 8601, which Postgres reads
    pacsv.write_csv(rows, sink, write_options=opts)
    return sink.getvalue()


class PostgresTransaction(Transaction):
    """One database transaction; COPY for appends, DELETE ... = ANY for deletes."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.connection = store.engine.connect()
        self._tx = self.connection.begin()
        self._done = False

    @property
    def driver_connection(self):
        return self.connection.connection.driver_connection

    def lock_partitions(self, key: int, partitions: Iterable[int]) -> None:
        """Transaction-level advisory locks on (key, pixel) pairs, taken in sorted order (no deadlock)."""
        for p in sorted({int(p) for p in partitions}):
            self.connection.execute(sa.text("SELECT pg_advisory_xact_lock(:k, :p)"),
                                    {"k": int(key), "p": int(p)})

    def append(self, table: str, rows: pa.Table, check_keys: bool = True) -> None:
        t = self.store.table(table)
        if rows.num_rows == 0:
            return
        cols = ", ".join(map(_quote, rows.column_names))
        data = arrow_to_csv(rows)
        cur = self.driver_connection.cursor()
        try:
            with cur.copy(f"COPY {_quote(t.name)} ({cols}) FROM STDIN WITH (FORMAT csv)") as cp:
                view = memoryview(data)
                for i in range(0, len(view), 1 << 20):
                    cp.write(view[i:i + (1 << 20)])
        except Exception as exc:  # psycopg errors: turn key clashes into a clear message
            import psycopg

            if isinstance(exc, psycopg.errors.UniqueViolation):
                detail = (exc.diag.message_detail or "").strip()
                raise ValidationError(f"table {t.name!r}: row(s) already stored with the same key "
                                      f"({', '.join(t.primary_key)}): {detail}; nothing written") from None
            if isinstance(exc, psycopg.Error):
                raise ArchiveError(f"table {t.name!r}: COPY failed: "
                                   f"{str(exc).strip().splitlines()[0]}") from None
            raise
        finally:
            cur.close()

    def delete(self, table: str, column: str, values: Sequence, partitions=None) -> int:
        t = self.store.table(table)
        t.column(column)
        vals = np.asarray(values).tolist()
        if not vals:
            return 0
        res = self.connection.execute(
            sa.text(f"DELETE FROM {_quote(t.name)} WHERE {_quote(column)} = ANY(:v)"), {"v": vals})
        return int(res.rowcount)

    def query_region(self, table: str, region, columns: Sequence[str] | None = None,
                     current_only: bool = False) -> pd.DataFrame:
        return self.store.query_region(table, region, columns, current_only, connection=self.connection)

    def select_in(self, table: str, column: str, values: Sequence, partitions=None,
                  columns: Sequence[str] | None = None) -> pd.DataFrame:
        t = self.store.table(table)
        t.column(column)
        cols = self.store._columns(t, columns)
        sql = f"SELECT {_select_list(t, cols)} FROM {_quote(t.name)} WHERE {_quote(column)} = ANY(:v)"
        return _fetch(self.connection, sql, {"v": np.asarray(values).tolist()}, t, cols)

    def close_versions(self, table: str, ids: Sequence, end: float, partitions=None) -> int:
        t = self.store.table(table)
        res = self.connection.execute(sa.text(
            f"UPDATE {_quote(t.name)} SET validity_end = :end "
            f"WHERE {_quote(t.id_column)} = ANY(:ids) AND validity_end IS NULL"),
            {"end": float(end), "ids": np.asarray(ids, dtype=np.int64).tolist()})
        return int(res.rowcount)

    def execute(self, sql: str, params: dict | None = None):
        return self.connection.execute(sa.text(sql), params or {})

    def commit(self) -> None:
        if self._done:
            return
        try:
            self._tx.commit()
        finally:
            self._done = True
            self.connection.close()

    def rollback(self) -> None:
        if self._done:
            return
        try:
            self._tx.rollback()
        finally:
            self._done = True
            self.connection.close()
