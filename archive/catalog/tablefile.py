"""Read catalog files (Parquet, CSV, FITS tables) into Arrow tables for ingest."""

from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from archive.errors import ArchiveError, NotFoundError

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".fits": "fits", ".fit": "fits",
           ".fits.gz": "fits", ".fts": "fits"}


def detect_format(path: pathlib.Path) -> str:
    name = path.name.lower()
    for suffix, fmt in sorted(FORMATS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    raise ArchiveError(f"{path}: unknown catalog file type (expected .parquet, .csv or .fits)")


def _fits_to_arrow(path: pathlib.Path) -> pa.Table:
    from astropy.table import Table

    t = Table.read(path, hdu=1) if path.suffix.lower() != ".gz" else Table.read(path)
    cols = {}
    for name in t.colnames:
        col = t[name]
        if col.ndim > 1:
            raise ArchiveError(f"{path}: column {name!r} is multidimensional; catalog columns must be scalar")
        data = np.asarray(col)
        if data.dtype.kind == "S":
            data = np.char.decode(data, "ascii")
        if data.dtype.byteorder not in ("=", "|"):
            data = data.astype(data.dtype.newbyteorder("="))
        mask = np.ma.getmaskarray(col) if hasattr(col, "mask") else None
        cols[name] = pa.array(data, mask=mask if mask is not None and mask.any() else None)
    return pa.table(cols)


def read_table_file(path) -> pa.Table:
    """Read one catalog file; errors name the file and what is wrong with it."""
    path = pathlib.Path(path)
    if not path.exists():
        raise NotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise ArchiveError(f"{path}: is a directory, expected a catalog file")
    fmt = detect_format(path)
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        if fmt == "csv":
            return pacsv.read_csv(path)
        return _fits_to_arrow(path)
    except ArchiveError:
        raise
    except (pa.ArrowInvalid, OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArchiveError(f"{path}: cannot read as {fmt}: {first}") from None
