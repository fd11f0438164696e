"""The catalog store interface shared by the Parquet and Postgres backends.

A store holds the schema's tables.  Reads return pandas DataFrames; writes go
through a :class:`Transaction` that appends validated Arrow tables and deletes
rows by key, and becomes visible all at once on commit (or not at all).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from archive.catalog.schema import Schema, Table, load_schema
from archive.catalog.validate import conform
from archive.errors import ArchiveError, NotFoundError
from archive.sky.healpix import angular_separation_deg
from archive.sky.regions import Cone


class Transaction(abc.ABC):
    """A write transaction: appends and deletes that commit atomically.

    Use as a context manager; leaving the block without an exception commits,
    an exception rolls back and leaves the store as it was.
    """

    #: The store this transaction writes to (set by the backend).
    store: CatalogStore

    @abc.abstractmethod
    def append(self, table: str, rows: pa.Table, check_keys: bool = True) -> None:
        """Append rows that already conform to the table's Arrow schema."""

    @abc.abstractmethod
    def delete(self, table: str, column: str, values: Sequence, partitions: Iterable[int] | None = None) -> int:
        """Delete rows whose ``column`` is in ``values``; return how many were deleted.

        ``partitions`` (order-K pixels) is a hint that the rows can only be there.
        """

    @abc.abstractmethod
    def query_region(self, table: str, region, columns: Sequence[str] | None = None,
                     current_only: bool = False) -> pd.DataFrame:
        """Region query that sees this transaction's committed base state.

        ``current_only``: versioned tables only, rows with a null ``validity_end``."""

    @abc.abstractmethod
    def select_in(self, table: str, column: str, values: Sequence, partitions: Iterable[int] | None = None,
                  columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Rows whose ``column`` is in ``values`` (``partitions``: optional order-K hint;
        ``columns``: a subset of columns, default all)."""

    def current_versions(self, table: str, ids: Sequence, healpix29: Sequence | None = None,
                         partitions: Iterable[int] | None = None,
                         columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The current (open: null ``validity_end``) versions of the rows whose id is in ``ids``.

        ``healpix29`` (the rows' current order-29 pixels) and ``partitions``
        (order-K pixels) are hints a backend may use to find them faster.  This
        default selects every version by id and keeps the open ones.
        """
        t = self.store.table(table)
        rows = self.select_in(table, t.id_column, ids, partitions, columns=None)
        rows = rows[rows["validity_end"].isna()].reset_index(drop=True)
        return rows if columns is None else rows[list(columns)]

    @abc.abstractmethod
    def close_versions(self, table: str, ids: Sequence, end: float, partitions: Iterable[int] | None = None) -> int:
        """Set ``validity_end = end`` on the current (open) versions of ``ids``; returns how many."""

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def rollback(self) -> None: ...

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


class CatalogStore(abc.ABC):
    """Common behaviour of the backends; subclasses implement the storage."""

    #: Short name of the backend ("parquet" or "postgres").
    backend: str = ""

    def __init__(self, schema: Schema | None = None) -> None:
        self.schema = schema or load_schema()

    # -- writing -----------------------------------------------------------
    @abc.abstractmethod
    def transaction(self) -> Transaction:
        """Open a write transaction (takes the store's write lock where it has one)."""

    def write(self, table: str, data, where: str | None = None) -> int:
        """Validate ``data`` against ``table`` and append it in one atomic batch.

        Returns the number of rows written.  Nothing is written if validation
        fails or a key already exists.
        """
        return self.write_many({table: data}, where=where)

    def write_many(self, batches: dict, where: str | None = None) -> int:
        """Validate and append several tables' rows in one atomic transaction."""
        arrows = {name: conform(self.schema[name], data, where) for name, data in batches.items()}
        with self.transaction() as tx:
            for name, arrow in arrows.items():
                if arrow.num_rows:
                    tx.append(name, arrow)
        return sum(a.num_rows for a in arrows.values())

    # -- reading -----------------------------------------------------------
    @abc.abstractmethod
    def query_region(self, table: str, region, columns: Sequence[str] | None = None,
                     current_only: bool = False) -> pd.DataFrame:
        """Rows of a positional table whose (ra, dec) lies in ``region`` (exact).

        ``current_only``: versioned tables only, rows with a null ``validity_end``."""

    def _cone_request(self, table: str, ra: float, dec: float, radius_arcsec: float,
                      columns: Sequence[str] | None) -> tuple[Table, Cone, list[str]]:
        """Check a cone search's arguments; returns (table, region, columns to read)."""
        t = self.table(table)
        if not t.positional:
            raise ArchiveError(f"table {table!r} has no positions; cone search needs ra/dec")
        if not (np.isfinite(ra) and np.isfinite(dec) and -90 <= dec <= 90):
            raise ArchiveError(f"cone centre must have finite ra and dec in [-90, 90]; got ({ra}, {dec})")
        if not (np.isfinite(radius_arcsec) and radius_arcsec > 0):
            raise ArchiveError(f"cone radius must be a positive number of arcsec; got {radius_arcsec}")
        if radius_arcsec > 180 * 3600:
            raise ArchiveError(f"cone radius {radius_arcsec} arcsec is larger than the sky")
        cols = self._columns(t, columns, need=("ra", "dec"))
        return t, Cone(ra % 360.0, dec, radius_arcsec / 3600.0), cols

    def cone(self, table: str, ra: float, dec: float, radius_arcsec: float,
             columns: Sequence[str] | None = None, current_only: bool = False) -> pd.DataFrame:
        """Rows within ``radius_arcsec`` of (ra, dec) [deg], with a ``distance_arcsec`` column, nearest first.

        ``current_only``: versioned tables only, rows with a null ``validity_end``."""
        _, region, cols = self._cone_request(table, ra, dec, radius_arcsec, columns)
        df = self.query_region(table, region, cols, current_only=current_only)
        dist = cone_distance_arcsec(region, df["ra"].to_numpy(), df["dec"].to_numpy())
        order = np.argsort(dist, kind="stable")
        out = (df[list(columns)] if columns else df).take(order)
        out.index = pd.RangeIndex(len(out))
        out["distance_arcsec"] = dist[order]
        return out

    @abc.abstractmethod
    def get(self, table: str, ids: Sequence, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Rows whose id column (first primary-key column) is in ``ids``."""

    #: Default limit on one user SQL query, in seconds (``sql(timeout=...)`` overrides it).
    sql_timeout: float = 300.0

    @abc.abstractmethod
    def sql(self, query: str, timeout: float | None = None) -> pd.DataFrame:
        """Run one read-only SQL query; anything else is refused (see :mod:`archive.catalog.sqlguard`).

        ``timeout``: seconds before the query is cancelled (default ``sql_timeout``).
        """

    @abc.abstractmethod
    def count(self, table: str) -> int:
        """Number of rows in ``table``."""

    def close(self) -> None:
        """Release connections and temporary files."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------
    def table(self, name: str) -> Table:
        try:
            return self.schema[name]
        except KeyError as exc:
            raise NotFoundError(str(exc.args[0])) from None

    def _columns(self, t: Table, columns: Sequence[str] | None, need: Sequence[str] = ()) -> list[str]:
        if columns is None:
            return t.column_names
        unknown = [c for c in columns if c not in t]
        if unknown:
            raise NotFoundError(f"table {t.name!r} has no column{'s' if len(unknown) > 1 else ''} "
                                f"{', '.join(map(repr, unknown))}")
        return list(dict.fromkeys(list(columns) + list(need)))


#: Arrow types whose pandas conversion loses nulls (int -> float64, bool -> object)
#: and the nullable pandas dtypes used instead when a column holds nulls.
_NULLABLE = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype(), pa.int16(): pd.Int16Dtype(),
             pa.bool_(): pd.BooleanDtype()}


def frame_from_arrow(arrow: pa.Table) -> pd.DataFrame:
    """Arrow -> pandas; integer and bool columns holding nulls become nullable
    pandas dtypes (a float64 would silently corrupt 64-bit ids)."""
    # threads pay off for large tables only; for a cone's few rows they cost more than the work
    df = arrow.to_pandas(ignore_metadata=True, use_threads=arrow.num_rows > 100_000)
    for i, field in enumerate(arrow.schema):  # by position: a query may name two columns alike
        if field.type in _NULLABLE and arrow.column(i).null_count:
            df.isetitem(i, arrow.column(i).to_pandas(types_mapper=_NULLABLE.get).array)
    return df


def cone_distance_arcsec(region: Cone, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Great-circle distance (arcsec) of (ra, dec) [deg] from the cone's centre."""
    return angular_separation_deg(region.ra, region.dec, ra, dec) * 3600.0


def nearest_first(rows: pa.Table, region: Cone, columns: Sequence[str] | None = None) -> pa.Table:
    """Cone rows (Arrow, with ``ra``/``dec``) ordered by distance from the centre, with a
    ``distance_arcsec`` column (float64, arcsec) appended; ``columns``: keep only those
    (plus the distance).  Ties keep their order (stable)."""
    dist = cone_distance_arcsec(region, rows.column("ra").to_numpy(), rows.column("dec").to_numpy())
    if rows.num_rows > 1:
        order = np.argsort(dist, kind="stable")
        if (np.diff(order) != 1).any():
            rows, dist = rows.take(pa.array(order)), dist[order]
    if columns:
        rows = rows.select(list(columns))
    return rows.append_column(pa.field("distance_arcsec", pa.float64()), pa.array(dist, type=pa.float64()))
