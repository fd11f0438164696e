"""The Python face of the archive.

>>> import archive
>>> arc = archive.open("./my-archive")            # or "postgresql+psycopg://host/db"
>>> arc.cone("dia_object", 150.1, 2.2, 5.0)       # DataFrame, nearest first
>>> arc.sql("SELECT band, count(*) FROM dia_source GROUP BY band")
>>> arc.write("dia_source", frame)                 # validated, atomic

Reads return pandas DataFrames (``as_table=True`` gives an astropy Table with
units from the schema).  Angles in degrees, radii in arcseconds, fluxes in nJy,
times MJD (TAI).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd

from archive.catalog.schema import Schema
from archive.catalog.store import CatalogStore, open_store
from archive.errors import ArchiveError

#: Environment variable naming the default archive (path or URL).
REPO_ENV = "ARCHIVE_REPO"


def resolve_repo(target: str | os.PathLike | None) -> str:
    """The archive location: ``target`` if given, else ``$ARCHIVE_REPO``."""
    if target:
        return os.fspath(target)
    env = os.environ.get(REPO_ENV)
    if env:
        return env
    raise ArchiveError(f"no archive given: pass --repo PATH|URL or set {REPO_ENV}")


def _to_astropy(df: pd.DataFrame, schema: Schema, table: str | None):
    from astropy.table import Table as AstropyTable
    import astropy.units as u

    out = AstropyTable.from_pandas(df)
    if table is not None:
        t = schema[table]
        for name in out.colnames:
            if name in t and t.column(name).unit:
                try:
                    out[name].unit = u.Unit(t.column(name).unit.replace("deg2", "deg**2"), parse_strict="silent")
                except ValueError:
                    pass
            if name in t:
                out[name].description = t.column(name).description
        if "distance_arcsec" in out.colnames:
            out["distance_arcsec"].unit = u.arcsec
    return out


class Archive:
    """An open archive: query and write the catalog store."""

    def __init__(self, store: CatalogStore, location: str) -> None:
        self.store = store
        self.location = location

    @classmethod
    def open(cls, target: str | os.PathLike | None = None, create: bool = False, **kwargs) -> Archive:
        """Open (or with ``create=True`` initialise) the archive at a directory or Postgres URL."""
        location = resolve_repo(target)
        return cls(open_store(location, create=create, **kwargs), location)

    @classmethod
    def init(cls, target: str | os.PathLike, **kwargs) -> Archive:
        """Create a new, empty archive (directory) or bring a database to the schema head."""
        return cls.open(target, create=True, **kwargs)

    @property
    def schema(self) -> Schema:
        return self.store.schema

    @property
    def backend(self) -> str:
        return self.store.backend

    def _out(self, df: pd.DataFrame, as_table: bool, table: str | None):
        return _to_astropy(df, self.schema, table) if as_table else df

    def cone(self, table: str, ra: float, dec: float, radius_arcsec: float,
             columns: Sequence[str] | None = None, as_table: bool = False):
        """Rows of ``table`` within ``radius_arcsec`` of (``ra``, ``dec``) in degrees, nearest first.

        Adds ``distance_arcsec``.  Exact at HEALPix pixel edges, the poles and RA 0/360.
        """
        return self._out(self.store.cone(table, ra, dec, radius_arcsec, columns), as_table, table)

    def region(self, table: str, region, columns: Sequence[str] | None = None, as_table: bool = False):
        """Rows inside an :mod:`archive.sky.regions` region (Cone, Box, Polygon)."""
        return self._out(self.store.query_region(table, region, columns), as_table, table)

    def get(self, table: str, ids, columns: Sequence[str] | None = None, as_table: bool = False):
        """Rows whose id (first primary-key column) is in ``ids``."""
        if isinstance(ids, (int, str)):
            ids = [ids]
        return self._out(self.store.get(table, list(ids), columns), as_table, table)

    def sql(self, query: str, as_table: bool = False):
        """Run one read-only SQL query (PostgreSQL dialect; DuckDB on the Parquet store).

        Statements that would change data are refused with :class:`~archive.errors.ReadOnlyError`.
        """
        return self._out(self.store.sql(query), as_table, None)

    def write(self, table: str, data, where: str | None = None) -> int:
        """Validate rows (DataFrame, Arrow or astropy Table) against the schema and append them atomically.

        Returns the number of rows written; on any error nothing is written.
        """
        return self.store.write(table, data, where=where)

    def ingest_files(self, table: str, paths: Sequence[str | os.PathLike]) -> int:
        """Read catalog files (Parquet, CSV, FITS) and write them as ONE atomic batch.

        Every file is read and validated before anything is written; an error
        names the file, column and rows, and leaves the archive untouched.
        """
        from archive.catalog.tablefile import read_table_file
        from archive.catalog.validate import conform

        t = self.store.table(table)
        arrows = [conform(t, read_table_file(p), where=os.fspath(p)) for p in paths]
        if not arrows:
            raise ArchiveError("no files given")
        import pyarrow as pa

        return self.store.write(table, pa.concat_tables(arrows), where=", ".join(map(os.fspath, paths)))

    def count(self, table: str) -> int:
        return self.store.count(table)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Archive({self.location!r}, backend={self.backend!r})"
