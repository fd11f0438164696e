"""Validate incoming rows against the schema and turn them into a typed Arrow table.

Every write path goes through :func:`conform`: unknown or missing columns,
values that cannot be represented in the column's type, nulls in non-nullable
columns, and out-of-range or NaN positions are refused with an error that
names the table, the column and the first offending rows.  Nothing is written
when validation fails.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from archive.catalog.schema import Table
from archive.errors import ValidationError
from archive.sky.healpix import radec_to_healpix29

_MAX_ROWS_SHOWN = 5

#: Largest magnitude accepted in a floating-point column.  Well above any physical
#: value in the schema (a -30 mag source is ~4e24 nJy), and low enough that the
#: squares and sums the summaries take of it stay finite.
MAX_ABS_FLOAT = 1e30


def _rows(mask: np.ndarray) -> str:
    idx = np.flatnonzero(mask)
    shown = ", ".join(str(i) for i in idx[:_MAX_ROWS_SHOWN])
    more = f" and {len(idx) - _MAX_ROWS_SHOWN} more" if len(idx) > _MAX_ROWS_SHOWN else ""
    return f"row{'s' if len(idx) > 1 else ''} {shown}{more}"


def _as_arrow(data, where: str) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pd.DataFrame):
        frame = data.reset_index(drop=True) if not isinstance(data.index, pd.RangeIndex) else data
        return pa.Table.from_pandas(frame, preserve_index=False)
    try:  # astropy Table and other column mappings
        return pa.table({name: np.asarray(data[name]) for name in data.colnames})
    except AttributeError:
        pass
    raise ValidationError(f"{where}: expected a pandas DataFrame, an Arrow table or an astropy "
                          f"Table, got {type(data).__name__}")


def _cast_column(col: pa.ChunkedArray, column, where: str) -> pa.ChunkedArray:
    target = column.arrow_type
    if col.type == target:
        return col
    src = col.type
    kind = column.numpy_kind
    ok_source = (
        (kind in "if" and (pa.types.is_integer(src) or pa.types.is_floating(src)
                           or pa.types.is_boolean(src) or pa.types.is_null(src)))
        or (kind == "b" and (pa.types.is_boolean(src) or pa.types.is_integer(src)
                             or pa.types.is_null(src)))
        or (kind == "U" and (pa.types.is_string(src) or pa.types.is_large_string(src)
                             or pa.types.is_dictionary(src) or pa.types.is_null(src)))
        or (kind == "M" and (pa.types.is_timestamp(src) or pa.types.is_null(src)))
    )
    if not ok_source:
        raise ValidationError(f"{where}: column {column.name!r} has type {src}, expected "
                              f"{column.type}")
    if kind == "i" and pa.types.is_floating(src):
        # Float input for an integer column is accepted only when every value is integral.
        values = col.to_numpy(zero_copy_only=False)
        finite = np.isfinite(values) | np.isnan(values)
        bad = ~np.isnan(values) & (~finite | (values != np.round(values)))
        if bad.any():
            raise ValidationError(f"{where}: column {column.name!r} ({column.type}) has "
                                  f"non-integer values at {_rows(bad)}")
        col = pa.chunked_array([pa.array(values, from_pandas=True)])
    try:
        return pc.cast(col, target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValidationError(f"{where}: column {column.name!r} cannot be stored as "
                              f"{column.type}: {exc}") from None


def _finite_or_null(source: pa.ChunkedArray, col: pa.ChunkedArray, column, where: str) -> pa.ChunkedArray:
    """Refuse infinite values and values beyond ``MAX_ABS_FLOAT`` (also those that a
    float32 column could not hold); NaN becomes null (a missing value)."""
    given = source.to_numpy(zero_copy_only=False)
    if given.dtype.kind not in "fiu":
        given = col.to_numpy(zero_copy_only=False)
    given = np.asarray(given, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = np.isinf(given) | (np.abs(given) > MAX_ABS_FLOAT)
    if bad.any():
        raise ValidationError(f"{where}: column {column.name!r} has infinite or overflowing values at "
                              f"{_rows(bad)} (first value {float(given[bad][0])!r}; |value| must be at most "
                              f"{MAX_ABS_FLOAT:g})")
    nan = np.isnan(given)
    if nan.any():
        values = col.to_numpy(zero_copy_only=False)
        col = pa.chunked_array([pa.array(values, mask=nan, type=column.arrow_type)])
    return col


def conform(table: Table, data, where: str | None = None,
            fill_healpix: bool = True) -> pa.Table:
    """Validate ``data`` against ``table`` and return it as an Arrow table in schema order.

    Parameters
    ----------
    table : the schema table to conform to.
    data : pandas DataFrame, Arrow table/record batch or astropy Table.
    where : text naming the input (a file name) used in error messages.
    fill_healpix : compute ``healpix29`` from ra/dec when the column is absent.
        When present it must agree with ra/dec.

    Nullable columns that are absent are filled with nulls; absent non-nullable
    columns, unknown columns, failed casts, nulls in non-nullable columns,
    ra outside [0, 360), dec outside [-90, 90] and NaN positions raise
    :class:`~archive.errors.ValidationError`.
    """
    where = f"{where}: table {table.name!r}" if where else f"table {table.name!r}"
    arrow = _as_arrow(data, where)
    names = arrow.column_names
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValidationError(f"{where}: duplicate columns {dup}")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValidationError(f"{where}: unknown column{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))} (not in the schema)")
    derived = {"healpix29"} if (table.positional and fill_healpix) else set()
    missing = [c.name for c in table.columns
               if not c.nullable and c.name not in names and c.name not in derived]
    if missing:
        raise ValidationError(f"{where}: missing required column{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(map(repr, missing))}")
    n = arrow.num_rows
    cols: dict[str, pa.ChunkedArray] = {}
    for c in table.columns:
        if c.name in names:
            col = _cast_column(arrow.column(c.name), c, where)
            if c.numpy_kind == "f" and not (table.positional and c.name in ("ra", "dec")):
                col = _finite_or_null(arrow.column(c.name), col, c, where)
            if not c.nullable and col.null_count:
                bad = np.asarray(col.is_null().to_numpy(zero_copy_only=False))
                if table.positional and c.name in ("ra", "dec"):
                    raise ValidationError(f"{where}: NaN or missing ra/dec at {_rows(bad)}")
                raise ValidationError(f"{where}: column {c.name!r} may not be null; nulls at "
                                      f"{_rows(bad)}")
            cols[c.name] = col
    if table.positional:
        ra = cols["ra"].to_numpy().astype(np.float64)
        dec = cols["dec"].to_numpy().astype(np.float64)
        bad = ~np.isfinite(ra) | ~np.isfinite(dec)
        if bad.any():
            raise ValidationError(f"{where}: NaN or infinite ra/dec at {_rows(bad)}")
        bad = (ra < 0) | (ra >= 360)
        if bad.any():
            raise ValidationError(f"{where}: ra outside [0, 360) deg at {_rows(bad)} "
                                  f"(first value {ra[bad][0]!r})")
        bad = (dec < -90) | (dec > 90)
        if bad.any():
            raise ValidationError(f"{where}: dec outside [-90, 90] deg at {_rows(bad)} "
                                  f"(first value {dec[bad][0]!r})")
        hpx = radec_to_healpix29(ra, dec)
        if "healpix29" in cols:
            given = cols["healpix29"].to_numpy()
            bad = given != hpx
            if bad.any():
                raise ValidationError(f"{where}: healpix29 does not match ra/dec at {_rows(bad)}")
        cols["healpix29"] = pa.chunked_array([pa.array(hpx, type=pa.int64())])
    out = []
    for c in table.columns:
        out.append(cols[c.name] if c.name in cols else pa.nulls(n, c.arrow_type))
    result = pa.Table.from_arrays(out, schema=table.arrow_schema)
    _check_unique_keys(table, result, where)
    return result


def _check_unique_keys(table: Table, arrow: pa.Table, where: str) -> None:
    """Refuse a batch that repeats a primary key within itself."""
    if arrow.num_rows < 2:
        return
    keys = pd.DataFrame({k: arrow.column(k).to_numpy(zero_copy_only=False)
                         for k in table.primary_key})
    dup = keys.duplicated(keep="first").to_numpy()
    if dup.any():
        first = keys[dup].iloc[0].to_dict()
        raise ValidationError(f"{where}: primary key ({', '.join(table.primary_key)}) repeated "
                              f"within the batch at {_rows(dup)} (e.g. {first})")
