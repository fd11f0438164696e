"""The shared-server store: PostgreSQL through SQLAlchemy Core and psycopg 3.

Bulk writes use COPY (CSV produced by Arrow, no per-row Python), one
transaction per batch, rows sorted by healpix29 so a batch's rows of one sky
area share heap pages.  Region queries turn into the covering's healpix29
ranges as literal predicates (a BitmapOr of B-tree range scans), followed by
an exact haversine distance filter in SQL; a query for current versions that
needs only the columns of a partial covering index (``dia_object``'s
``ix_dia_object_current``) reads that index alone (index-only scans).

Round trips are kept to the minimum: reads run on their own pool of
autocommit connections with ``jit = off`` set once per connection (no BEGIN,
no ROLLBACK, no per-query SET, no pre-ping), so a cone search is one round
trip.  A connection found dead (server restart) is discarded and the read
retried once on a fresh one.  Small results (cones up to
``SMALL_CONE_ARCSEC``) are fetched in binary and put into Arrow column by
column; larger ones come through ``COPY (...) TO STDOUT`` parsed by Arrow's CSV
reader.  User SQL runs in a READ ONLY transaction.
"""

from __future__ import annotations

import io
import logging
import operator
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import sqlalchemy as sa

from archive.catalog.migrate import current_revision, head_revision, upgrade
from archive.catalog.schema import Schema, Table
from archive.catalog.sqlguard import check_postgres_query
from archive.catalog.store import CatalogStore, Transaction, cone_distance_arcsec, frame_from_arrow, nearest_first
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


#: Cones up to this radius (arcsec) are fetched as binary rows (one round trip,
#: no CSV reader set-up: faster for the usual few to hundreds of rows); larger
#: ones through COPY + Arrow CSV.  The two cost the same at ~1,000-2,500 rows
#: (measured: 3.4 vs 3.6 ms for 100 rows, 21.7 vs 20.6 ms for 2,500); a 5' cone
#: holds ~2,200 rows at 100,000 rows/deg^2.
SMALL_CONE_ARCSEC = 300.0

#: Seconds after which a pooled connection is replaced (server-side idle limits).
POOL_RECYCLE_S = 1800

#: Longest a user SQL query waits for a lock, in ms (writers hold theirs briefly).
SQL_LOCK_TIMEOUT_MS = 10_000

#: ``:name`` parameters outside single-quoted literals.
_PARAM = re.compile(r"'[^']*'|(?<!:):([A-Za-z_]\w*)")


def _float(x: float) -> str:
    """A float8 SQL literal that parses back to exactly ``x`` (shortest round-trip repr)."""
    return f"{float(x)!r}::float8"


def _copy_arrow(driver_connection, sql: str, params: dict, schema: pa.Schema) -> pa.Table:
    """Run a SELECT through ``COPY (...) TO STDOUT`` and parse the CSV with Arrow.

    Fetching rows as Python tuples costs microseconds per value; COPY plus
    Arrow's CSV reader is vectorized end to end (the same reason writes use COPY).
    ``sql`` uses ``:name`` parameters, bound client-side by psycopg.  Timestamp
    columns must be selected as ISO 8601 text (:func:`_select_list`).
    """
    bound = _PARAM.sub(lambda m: m.group(0) if m.group(1) is None else f"%({m.group(1)})s", sql)
    stmt = "COPY (" + bound + ") TO STDOUT (FORMAT csv)"
    buf = bytearray()
    with driver_connection.cursor() as cur, cur.copy(stmt, params or None) as cp:
        for block in cp:
            buf += block
    if not buf:
        return schema.empty_table()
    arrow = pacsv.read_csv(
        io.BytesIO(bytes(buf)),
        read_options=pacsv.ReadOptions(column_names=schema.names),
        convert_options=pacsv.ConvertOptions(column_types={f.name: f.type for f in schema}, null_values=[""],
                                             true_values=["t"], false_values=["f"],
                                             quoted_strings_can_be_null=False, strings_can_be_null=True))
    return arrow.cast(schema)


def _binary_columns(driver_connection, sql: str) -> list[tuple]:
    """Run a SELECT (no parameters) with binary results; the values column by column.

    For small results this beats COPY: no CSV text, no CSV reader set-up, one
    round trip.  Values arrive exactly (float4/float8 in binary, NaN kept, NULL
    as None).  Timestamp columns must be selected as they are (not as text).
    """
    with driver_connection.cursor(binary=True) as cur:
        cur.execute(sql)
        rows = cur.fetchall()
    return list(zip(*rows))  # transposed in C


def _lost(exc: BaseException, driver_connection) -> bool:
    """Whether ``exc`` means the connection is gone (server restarted, network cut)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, (psycopg.OperationalError, sa.exc.OperationalError)):
        return False
    return driver_connection is None or bool(driver_connection.closed or driver_connection.broken)


def _jit_off(dbapi_connection, _record) -> None:
    """Connect event of the read pool: JIT off for the session (short indexed reads,
    where compiling would cost more than the query), set once per connection."""
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True  # a SET inside a transaction that rolls back would be undone
    dbapi_connection.execute("SET jit = off")
    dbapi_connection.autocommit = autocommit


class PostgresStore(CatalogStore):
    """Catalog store on a PostgreSQL database (schema managed by Alembic)."""

    backend = "postgres"

    def __init__(self, url: str, create: bool = False, schema: Schema | None = None,
                 check_revision: bool = True) -> None:
        super().__init__(schema)
        self.url = normalize_url(url)
        # no pool_pre_ping: it costs a round trip per checkout; a dead connection is
        # detected when used, discarded, and the operation retried (see _read, transaction)
        self.engine = sa.create_engine(self.url, pool_recycle=POOL_RECYCLE_S)
        #: reads: autocommit (no BEGIN/ROLLBACK round trips), JIT off once per connection
        self._reader = sa.create_engine(self.url, pool_recycle=POOL_RECYCLE_S, isolation_level="AUTOCOMMIT")
        sa.event.listen(self._reader, "connect", _jit_off)
        self._schemas: dict[tuple[str, tuple[str, ...]], pa.Schema] = {}
        self._empty_cones: dict[tuple[str, tuple[str, ...]], pd.DataFrame] = {}
        try:
            with self.engine.connect() as con:
                con.execute(sa.text("SELECT 1"))
        except sa.exc.OperationalError as exc:
            self.close()
            raise ArchiveError(f"cannot connect to {self.safe_url}: "
                               f"{str(exc.orig).strip().splitlines()[0]}") from None
        if create:
            upgrade(self.url)
        elif check_revision:
            have, want = current_revision(self.url), head_revision()
            if have != want:
                self.close()
                raise ArchiveError(f"database {self.safe_url} is at schema revision {have or 'none'}, "
                                   f"this code needs {want}: run `archive db upgrade --repo {self.safe_url}`")
        self.metadata = sa.MetaData()
        self.metadata.reflect(self.engine, only=[t.name for t in self.schema])

    @property
    def safe_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    # -- reading -------------------------------------------------------------
    def _schema_of(self, t: Table, columns: Sequence[str]) -> pa.Schema:
        """Arrow schema of a column subset (cached: building it per query costs ~1 ms)."""
        key = (t.name, tuple(columns))
        schema = self._schemas.get(key)
        if schema is None:
            full = t.arrow_schema
            schema = self._schemas[key] = pa.schema([full.field(c) for c in columns])
        return schema

    def _read(self, fn):
        """``fn(driver_connection)`` on a pooled read connection (autocommit, JIT off).

        No pre-ping: if the connection turns out dead (server restarted), it is
        discarded with the rest of the pool and ``fn`` runs once more on a fresh one.
        """
        for attempt in range(2):
            pooled = self._reader.raw_connection()
            driver = pooled.driver_connection
            try:
                return fn(driver)
            except Exception as exc:
                if attempt or not _lost(exc, driver):
                    raise
                log.info("read connection to %s lost (%s); retrying on a new one", self.safe_url,
                         str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                pooled.invalidate()
                self._reader.dispose()
            finally:
                pooled.close()

    @staticmethod
    def _covering_index(t: Table, columns: Sequence[str], current_only: bool):
        """A healpix29-keyed covering index holding every one of ``columns`` (and,
        when partial, exactly the rows asked for), or None."""
        for ix in t.indexes:
            if ix.columns != ("healpix29",) or not ix.include:
                continue
            if ix.where is not None and not (current_only and ix.where == "validity_end IS NULL"):
                continue
            if set(columns) <= set(ix.all_columns):
                return ix
        return None

    def _region_sql(self, t: Table, region, columns: list[str], current_only: bool = False,
                    as_text: bool = True) -> tuple[str, dict]:
        """SELECT for a region: the covering's healpix29 ranges as literal predicates.

        Literal ``(healpix29 >= lo AND healpix29 < hi) OR ...`` lets the planner
        estimate each range from the column histogram and choose a BitmapOr of
        B-tree range scans (the plan shape of Q3C).  Ranges passed as arrays
        (unnest + LATERAL) are estimated at a default selectivity, which at 10M
        rows made Postgres pick a parallel full scan (300x slower).  When a
        partial covering index holds every column asked for, the query is a
        UNION ALL of one literal range scan per range instead: each can then be an
        index-only scan (a BitmapOr never is), which reads no heap pages.

        The ranges and cone parameters are numbers computed here, inlined as
        literals (never user text), so the statement has no parameters and can
        be sent as is or wrapped in COPY.  ``as_text``: timestamps as ISO 8601
        text (for the CSV reader); otherwise as they are (binary fetch).
        """
        ranges = region.pixel_ranges(region.default_order())
        cols = _select_list(t, columns) if as_text else ", ".join(map(_quote, columns))
        if len(ranges) == 0:
            return f"SELECT {cols} FROM {_quote(t.name)} WHERE false", {}
        extra = []
        if current_only:
            extra.append("validity_end IS NULL")
        if isinstance(region, Cone):
            # haversine: exact for tiny and large radii alike
            ra0, dec0, rad = _float(region.ra), _float(region.dec), _float(region.radius_deg)
            extra.append(f"2 * asin(least(1.0, sqrt(power(sin(radians(dec - {dec0}) / 2), 2) "
                         f"+ cos(radians(dec)) * cos(radians({dec0})) * power(sin(radians(ra - {ra0}) / 2), 2))))"
                         f" <= radians({rad})")
        if self._covering_index(t, columns, current_only) is not None:
            branches = [f"SELECT {cols} FROM {_quote(t.name)} WHERE healpix29 >= {int(lo)} "
                        f"AND healpix29 < {int(hi)}" + "".join(f" AND {e}" for e in extra)
                        for lo, hi in ranges]
            return " UNION ALL ".join(branches), {}
        cover = " OR ".join(f"(healpix29 >= {int(lo)} AND healpix29 < {int(hi)})" for lo, hi in ranges)
        return f"SELECT {cols} FROM {_quote(t.name)} WHERE " + " AND ".join([f"({cover})"] + extra), {}

    def _region_arrow(self, t: Table, region, columns: list[str], current_only: bool = False,
                      driver_connection=None) -> pa.Table:
        """Rows of ``region`` (exact) as Arrow, through COPY."""
        sql, params = self._region_sql(t, region, columns, current_only)
        schema = self._schema_of(t, columns)

        def run(driver):
            return _copy_arrow(driver, sql, params, schema)

        arrow = run(driver_connection) if driver_connection is not None else self._read(run)
        if not isinstance(region, Cone) and arrow.num_rows:
            keep = region.contains(arrow.column("ra").to_numpy(), arrow.column("dec").to_numpy())
            if not keep.all():
                arrow = arrow.filter(pa.array(keep))
        return arrow

    def query_region(self, table: str, region, columns: Sequence[str] | None = None,
                     current_only: bool = False, connection=None) -> pd.DataFrame:
        t = self.table(table)
        if not t.positional:
            raise ArchiveError(f"table {table!r} has no positions")
        cols = self._columns(t, columns)
        need = list(dict.fromkeys(cols + ["ra", "dec"]))
        driver = None if connection is None else connection.connection.driver_connection
        arrow = self._region_arrow(t, region, need, current_only, driver)
        return frame_from_arrow(arrow.select(cols))

    def cone(self, table: str, ra: float, dec: float, radius_arcsec: float,
             columns: Sequence[str] | None = None, current_only: bool = False) -> pd.DataFrame:
        """Rows within ``radius_arcsec`` of (ra, dec) [deg], with a ``distance_arcsec`` column, nearest first.

        ``current_only``: versioned tables only, rows with a null ``validity_end``.

        One round trip.  Cones up to ``SMALL_CONE_ARCSEC``: binary rows, ordered
        by distance column by column, then Arrow, then one conversion to pandas;
        larger ones through COPY and :func:`nearest_first` on the Arrow table.
        """
        t, region, cols = self._cone_request(table, ra, dec, radius_arcsec, columns)
        if radius_arcsec > SMALL_CONE_ARCSEC:
            return frame_from_arrow(nearest_first(self._region_arrow(t, region, cols, current_only), region, columns))
        keep = list(columns) if columns else cols
        sql, _ = self._region_sql(t, region, cols, current_only, as_text=False)
        values = self._read(lambda d: _binary_columns(d, sql))
        if not values:
            key = (t.name, tuple(keep))
            if key not in self._empty_cones:
                schema = self._schema_of(t, keep).append(pa.field("distance_arcsec", pa.float64()))
                self._empty_cones[key] = frame_from_arrow(schema.empty_table())
            return self._empty_cones[key].copy()
        ra_v = np.array(values[cols.index("ra")], dtype=np.float64)
        dec_v = np.array(values[cols.index("dec")], dtype=np.float64)
        dist = cone_distance_arcsec(region, ra_v, dec_v)
        if dist.size > 1:
            order = np.argsort(dist, kind="stable")
            pick = operator.itemgetter(*order.tolist())  # gathers a tuple in C
            values, dist = [pick(v) for v in values], dist[order]
        schema = self._schema_of(t, cols)
        arrays = [pa.array(values[cols.index(c)], type=schema.field(c).type) for c in keep]
        arrays.append(pa.array(dist, type=pa.float64()))
        out = pa.Table.from_arrays(arrays, schema=self._schema_of(t, keep).append(
            pa.field("distance_arcsec", pa.float64())))
        return frame_from_arrow(out)

    def get(self, table: str, ids: Sequence, columns: Sequence[str] | None = None) -> pd.DataFrame:
        t = self.table(table)
        cols = self._columns(t, columns)
        sql = (f"SELECT {_select_list(t, cols)} FROM {_quote(t.name)} "
               f"WHERE {_quote(t.id_column)} = ANY(:ids)")
        ids = [int(i) if t.column(t.id_column).numpy_kind == "i" else i for i in np.asarray(ids).tolist()]
        schema = self._schema_of(t, cols)
        return frame_from_arrow(self._read(lambda d: _copy_arrow(d, sql, {"ids": ids}, schema)))

    def read_table(self, table: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        t = self.table(table)
        cols = self._columns(t, columns)
        sql = f"SELECT {_select_list(t, cols)} FROM {_quote(t.name)}"
        schema = self._schema_of(t, cols)
        return frame_from_arrow(self._read(lambda d: _copy_arrow(d, sql, {}, schema)))

    def count(self, table: str) -> int:
        t = self.table(table)
        sql = f"SELECT count(*) FROM {_quote(t.name)}"
        return int(self._read(lambda d: d.execute(sql).fetchone()[0]))

    def sql(self, query: str, timeout: float | None = None) -> pd.DataFrame:
        """One read-only query on the server.

        Behind the parser guard (:func:`check_postgres_query`: one SELECT, no
        file, signal, lock, dblink or SQL-as-text functions), the query runs in
        a READ ONLY transaction with a statement timeout and a lock timeout,
        and its connection is closed afterwards, so nothing it could leave in
        the session (an advisory lock, a temp table, a setting) outlives it."""
        check_postgres_query(query)
        limit_ms = max(1, int(1000 * (self.sql_timeout if timeout is None else float(timeout))))
        for attempt in range(2):
            con = self.engine.connect()
            try:
                con.exec_driver_sql("SET TRANSACTION READ ONLY")
                con.exec_driver_sql(f"SET LOCAL statement_timeout = {limit_ms}")
                con.exec_driver_sql(f"SET LOCAL lock_timeout = {min(limit_ms, SQL_LOCK_TIMEOUT_MS)}")
                result = con.exec_driver_sql(query.replace("%", "%%"))
                return pd.DataFrame.from_records(result.fetchall(), columns=list(result.keys()))
            except sa.exc.DBAPIError as exc:
                if not attempt and exc.connection_invalidated:
                    self.engine.dispose()  # server restarted: the pooled connections are all dead
                    continue
                msg = str(exc.orig).strip().splitlines()[0]
                if isinstance(exc.orig, psycopg.errors.QueryCanceled):
                    raise ArchiveError(f"SQL query cancelled after {limit_ms / 1000:g} s (timeout): {msg}") from None
                if isinstance(exc.orig, psycopg.errors.LockNotAvailable):
                    raise ArchiveError(f"SQL query waited too long for a lock: {msg}") from None
                if "read-only transaction" in msg:
                    raise ReadOnlyError(f"archive SQL is read-only: {msg}") from None
                if isinstance(exc.orig, psycopg.errors.InsufficientPrivilege):
                    raise ReadOnlyError(f"archive SQL: {msg}") from None
                raise ArchiveError(f"SQL error: {msg}") from None
            finally:
                con.invalidate()  # never back to the pool: the session dies with the query
                con.close()

    def close(self) -> None:
        self.engine.dispose()
        self._reader.dispose()

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


#: PostgreSQL binary COPY: file header (signature, flags, no extension) and trailer.
_PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8
_PGCOPY_TRAILER = b"\xff\xff"
#: Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
_PG_EPOCH_US = 946_684_800_000_000
#: Bytes per binary COPY chunk (at the widest row layout): caps memory and lets
#: the server work on one chunk while the next is encoded.
COPY_CHUNK_BYTES = 16 << 20


def _row_bytes_bound(rows: pa.Table) -> int:
    """A rough upper bound of a row's binary COPY size (bytes), to size chunks."""
    size = 2
    for field in rows.schema:
        width = getattr(field.type, "bit_width", 0) // 8 if not pa.types.is_string(field.type) else 0
        if pa.types.is_string(field.type):
            col = rows.column(field.name)
            width = int(pc.max(pc.utf8_length(col)).as_py() or 0) if len(col) and col.null_count < len(col) else 0
        size += 4 + max(width, 1)
    return size


def _binary_field(column: pa.ChunkedArray | pa.Array):
    """One column in PostgreSQL's binary wire format, vectorized.

    Returns (valid mask, data length per row [bytes], values): fixed-width
    values as big-endian (n, width) uint8, or for text the tuple (utf-8 bytes,
    start offset per row).
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    valid = np.ones(n, bool) if arr.null_count == 0 else ~np.asarray(arr.is_null(), dtype=bool)
    typ = arr.type
    if pa.types.is_string(typ):
        offsets = np.frombuffer(arr.buffers()[1], np.int32, count=n + 1, offset=4 * arr.offset).astype(np.int64)
        data = arr.buffers()[2]
        data = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
        return valid, np.where(valid, np.diff(offsets), 0), (data, offsets[:-1])
    if pa.types.is_timestamp(typ):
        us = pc.cast(arr, pa.timestamp("us", tz=typ.tz)).cast(pa.int64()).fill_null(0).to_numpy()
        big = (us - _PG_EPOCH_US).astype(">i8")
    elif pa.types.is_boolean(typ):
        big = np.asarray(arr.fill_null(False), dtype=np.uint8)
    elif pa.types.is_integer(typ) or pa.types.is_floating(typ):
        vals = (arr.fill_null(0) if arr.null_count else arr).to_numpy(zero_copy_only=False)
        big = vals.astype(vals.dtype.newbyteorder(">"))
    else:
        raise ArchiveError(f"binary COPY: no encoding for Arrow type {typ}")
    width = big.dtype.itemsize
    return valid, np.where(valid, width, 0), big.view(np.uint8).reshape(n, width)


def arrow_to_copy_binary(rows: pa.Table) -> bytes:
    """Rows (already of the table's Arrow types) as PostgreSQL binary COPY tuples
    (no header or trailer), built column by column with numpy.

    Binary COPY sends numbers as their bytes: no text to format here and none for
    the server to parse, and floats arrive exactly.  Every row is first laid out
    at the widest (each field at a fixed offset, text at its column's longest
    value); a NULL field has no data bytes, and text only its own length, so a
    byte mask then squeezes the unused bytes out in one pass.
    """
    n, ncol = rows.num_rows, rows.num_columns
    fields = [_binary_field(rows.column(j)) for j in range(ncol)]
    widths = [int(length.max(initial=0)) for _, length, _ in fields]
    row_width = 2 + sum(4 + w for w in widths)
    wide = np.zeros((n, row_width), np.uint8)
    keep = None
    wide[:, 0:2] = np.array([ncol], ">i2").view(np.uint8)
    at = 2
    for (valid, length, values), w in zip(fields, widths):
        wide[:, at:at + 4] = np.where(valid, length, -1).astype(">i4").view(np.uint8).reshape(n, 4)
        if isinstance(values, tuple):  # text: copy each value's bytes to the start of its slot
            data, first = values
            total = int(length.sum())
            if total:
                row = np.repeat(np.arange(n), length)
                within = np.arange(total) - np.repeat(np.cumsum(length) - length, length)
                wide[row, at + 4 + within] = data[first[row] + within]
        elif w:  # (an all-NULL column has no data bytes at all)
            wide[:, at + 4:at + 4 + w] = values
        if w and not (length == w).all():
            if keep is None:
                keep = np.ones((n, row_width), bool)
            keep[:, at + 4:at + 4 + w] = np.arange(w) < length[:, None]
        at += 4 + w
    return (wide if keep is None else wide[keep]).tobytes()


class PostgresTransaction(Transaction):
    """One database transaction; COPY for appends, DELETE ... = ANY for deletes."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self._done = False
        for attempt in range(2):
            self.connection = store.engine.connect()
            self._tx = self.connection.begin()
            try:
                # the first statement (BEGIN goes with it) also proves the pooled
                # connection alive; JIT off: the transaction's reads are short indexed scans
                self.connection.exec_driver_sql("SET LOCAL jit = off")
                break
            except sa.exc.DBAPIError as exc:
                self.connection.close()
                if attempt or not exc.connection_invalidated:
                    raise
                store.engine.dispose()  # server restarted: every pooled connection is dead

    @property
    def driver_connection(self):
        return self.connection.connection.driver_connection

    def lock_partitions(self, key: int, partitions: Iterable[int]) -> None:
        """Transaction-level advisory locks on (key, pixel) pairs, taken in sorted order (no deadlock)."""
        for p in sorted({int(p) for p in partitions}):
            self.connection.execute(sa.text("SELECT pg_advisory_xact_lock(:k, :p)"),
                                    {"k": int(key), "p": int(p)})

    def append(self, table: str, rows: pa.Table, check_keys: bool = True) -> None:
        """COPY the rows in; positional rows sorted by healpix29 first, so the rows of
        one sky area share heap pages (a cone or a footprint then reads few pages)."""
        t = self.store.table(table)
        if rows.num_rows == 0:
            return
        if t.positional and rows.num_rows > 1:
            hp = rows.column("healpix29").to_numpy()
            if (np.diff(hp) < 0).any():
                rows = rows.take(pc.sort_indices(rows.column("healpix29")))
        want = self.store._schema_of(t, rows.column_names)
        if not rows.schema.equals(want, check_metadata=False):
            # binary COPY needs each column in exactly its SQL type's width
            rows = rows.cast(want)
        cols = ", ".join(map(_quote, rows.column_names))
        cur = self.driver_connection.cursor()
        try:
            with cur.copy(f"COPY {_quote(t.name)} ({cols}) FROM STDIN WITH (FORMAT binary)") as cp:
                cp.write(_PGCOPY_HEADER)
                # encode chunk by chunk: the server works on one while the next is encoded
                step = max(1024, COPY_CHUNK_BYTES // _row_bytes_bound(rows))
                for i in range(0, rows.num_rows, step):
                    cp.write(arrow_to_copy_binary(rows.slice(i, step)))
                cp.write(_PGCOPY_TRAILER)
        except Exception as exc:  # psycopg errors: turn key clashes into a clear message
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
        return self._fetch(sql, {"v": np.asarray(values).tolist()}, t, cols)

    def _fetch(self, sql: str, params: dict, t: Table, columns: list[str]) -> pd.DataFrame:
        schema = self.store._schema_of(t, columns)
        return frame_from_arrow(_copy_arrow(self.driver_connection, sql, params, schema))

    def current_versions(self, table: str, ids: Sequence, healpix29: Sequence | None = None,
                         partitions=None, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Current versions of ``ids``.  With ``healpix29`` (their current pixels) the
        rows are found through the partial index of current versions, so only those
        rows are visited, not every old version the primary key would lead to."""
        t = self.store.table(table)
        cols = self.store._columns(t, columns)
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if ids.size == 0:
            return frame_from_arrow(self.store._schema_of(t, cols).empty_table())
        where = f"{_quote(t.id_column)} = ANY(:v) AND validity_end IS NULL"
        params: dict = {"v": ids.tolist()}
        if healpix29 is not None and t.positional:
            where = "healpix29 = ANY(:h) AND " + where
            params["h"] = np.unique(np.asarray(healpix29, dtype=np.int64)).tolist()
        sql = f"SELECT {_select_list(t, cols)} FROM {_quote(t.name)} WHERE {where}"
        return self._fetch(sql, params, t, cols)

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
