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
    """The first table HDU of a FITS file; a truncated file or one without a table is refused."""
    import warnings

    from astropy.io import fits
    from astropy.table import Table

    with warnings.catch_warnings():
        # astropy only warns about a truncated file and returns short or garbage data
        warnings.filterwarnings("error", message=".*truncated.*")
        with fits.open(path, memmap=False) as hdul:
            hdul.verify("exception")
            tables = [h for h in hdul if isinstance(h, (fits.BinTableHDU, fits.TableHDU))]
            if not tables:
                raise ArchiveError(f"{path}: no table extension in the FITS file "
                                   f"(HDUs: {', '.join(type(h).__name__ for h in hdul)})")
            t = Table.read(tables[0])
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
    """Read one catalog file; errors name the file and what is wrong with it.

    An empty file, a file with a header but no rows, a FITS file that is
    truncated or has no table extension, and text that is not UTF-8 are refused.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise NotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise ArchiveError(f"{path}: is a directory, expected a catalog file")
    fmt = detect_format(path)
    if path.stat().st_size == 0:
        raise ArchiveError(f"{path}: empty file")
    try:
        if fmt == "parquet":
            table = pq.read_table(path)
        elif fmt == "csv":
            table = pacsv.read_csv(path)
        else:
            table = _fits_to_arrow(path)
        table.column_names  # noqa: B018 -- names are decoded lazily: a non-UTF-8 header fails here
    except ArchiveError:
        raise
    except UnicodeDecodeError as exc:
        raise ArchiveError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start} of a column "
                           "name or value); save the file as UTF-8") from None
    except (pa.ArrowException, OSError, ValueError, TypeError, EOFError, Warning) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArchiveError(f"{path}: cannot read as {fmt}: {first}") from None
    if table.num_rows == 0:
        raise ArchiveError(f"{path}: no rows")
    return table
