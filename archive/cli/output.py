"""Query results as text or files that carry the schema: table, csv, json, jsonl, ecsv, parquet, votable.

* ``votable``, ``ecsv`` and ``parquet`` carry each column's unit, UCD and
  description (VOTable FIELD attributes; ECSV column metadata, read back by
  astropy with units; Parquet field metadata ``unit``/``ucd``/``description``).
* ``json`` is one JSON document (an array of row objects), ``jsonl`` one object per
  line; both write every float at full precision (Python's shortest repr, which
  reads back to the same float64; float32 columns by their float32 repr), NaN and
  missing values as ``null``, times as ISO 8601 UTC.
* ``-o FILE`` picks the format from the suffix unless ``--format`` is given.
* ``--names rubin|ztf`` exports with Rubin's or ZTF alerts' column names
  (docs/column_mapping.md).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys

from archive.errors import ArchiveError

FORMATS = ("table", "csv", "json", "jsonl", "ecsv", "parquet", "votable")

#: -o FILE suffix -> format.
SUFFIXES = {".txt": "table", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".ecsv": "ecsv", ".parquet": "parquet", ".pq": "parquet", ".xml": "votable", ".vot": "votable",
            ".votable": "votable"}

NAMES = ("archive", "rubin", "ztf")


def add_format_options(parser, names: bool = True) -> None:
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="output format (default: from the -o FILE suffix, else table)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="write to FILE instead of standard output; its suffix picks the format "
                             "(" + " ".join(sorted(SUFFIXES)) + ")")
    if names:
        parser.add_argument("--names", choices=NAMES, default="archive",
                            help="column names: the archive's, Rubin's (psfFlux, midpointMjdTai, ...) or ZTF "
                                 "alerts' (candid, jd, magpsf, ...), see docs/column_mapping.md")


def output_format(fmt: str | None, output: str | None) -> str:
    """The format: ``fmt`` if given, else from ``output``'s suffix, else table."""
    if fmt:
        return fmt
    if not output:
        return "table"
    suffix = os.path.splitext(str(output))[1].lower()
    if suffix not in SUFFIXES:
        raise ArchiveError(f"cannot tell the format of {output} from its suffix {suffix or '(none)'!r}: "
                           f"give --format ({', '.join(FORMATS)}) or a suffix: {' '.join(sorted(SUFFIXES))}")
    return SUFFIXES[suffix]


def emit(df, args: argparse.Namespace, table: str | None = None) -> None:
    """Write ``df`` as the command's ``--format``/``-o``/``--names`` ask; ``table``: the schema
    table its columns come from (for units, UCDs and descriptions; None: by column name)."""
    from archive.api import Archive

    fmt = output_format(getattr(args, "format", None), getattr(args, "output", None))
    df, meta = Archive.for_export(df, table, getattr(args, "names", "archive"))
    write(df, fmt, getattr(args, "output", None), meta)


def write(df, fmt: str, output: str | None = None, meta: dict | None = None) -> None:
    """Write ``df`` in ``fmt`` to ``output`` (a path) or stdout; ``meta``: column -> unit, ucd, description."""
    meta = meta or {}
    if fmt == "table":
        text = df.to_string(index=False, max_rows=None) if len(df) else "(no rows)"
        _write_text(text + "\n", output)
    elif fmt == "csv":
        _write_text(df.to_csv(index=False), output)
    elif fmt == "json":
        _write_text(json.dumps(records(df), allow_nan=False) + "\n", output)
    elif fmt == "jsonl":
        _write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records(df)), output)
    elif fmt == "ecsv":
        from archive.api import astropy_table

        buf = io.StringIO()
        astropy_table(df, meta).write(buf, format="ascii.ecsv")
        _write_text(buf.getvalue(), output)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        _refuse_binary_on_terminal(fmt, output)
        buf = io.BytesIO()
        pq.write_table(arrow_table(df, meta), buf)
        _write_bytes(buf.getvalue(), output)
    elif fmt == "votable":
        from astropy.io.votable import from_table

        from archive.api import astropy_table

        buf = io.BytesIO()
        from_table(astropy_table(df, meta)).to_xml(buf)
        _write_bytes(buf.getvalue(), output)
    else:  # argparse restricts choices; this guards programmatic use
        raise ArchiveError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def records(df) -> list[dict]:
    """Rows as JSON-ready dicts, every value exact: floats at full precision (float32 by
    their own shortest repr), NaN/NA as None, times as ISO 8601."""
    cols = [_json_values(df[c]) for c in df.columns]
    names = [str(c) for c in df.columns]
    return [dict(zip(names, row)) for row in zip(*cols)] if names else [{} for _ in range(len(df))]


def _json_values(s) -> list:
    import numpy as np
    import pandas as pd

    kind = s.dtype.kind
    if kind == "f":
        arr = s.to_numpy()
        if arr.dtype == np.float32:  # '0.1' rather than 0.10000000149011612: the same float32
            vals = [float(x) for x in arr.astype(str)]
        else:
            vals = arr.astype(np.float64).tolist()
        return [v if math.isfinite(v) else None for v in vals]
    if kind in "iu" and not isinstance(s.dtype, pd.api.extensions.ExtensionDtype):
        return s.to_numpy().tolist()
    if kind == "b" and not isinstance(s.dtype, pd.api.extensions.ExtensionDtype):
        return s.to_numpy().tolist()
    if kind == "M":
        return [None if pd.isna(v) else v.isoformat() for v in s]
    out = []
    for v in s.tolist():
        if v is None or v is pd.NA or (isinstance(v, float) and not math.isfinite(v)):
            out.append(None)
        elif isinstance(v, (np.integer, np.bool_, np.floating)):
            out.append(v.item())
        elif isinstance(v, pd.Timestamp):
            out.append(v.isoformat())
        else:
            out.append(v)
    return out


def arrow_table(df, meta: dict):
    """``df`` as an Arrow table whose fields carry ``unit``, ``ucd`` and ``description`` metadata."""
    import pyarrow as pa

    tab = pa.Table.from_pandas(df, preserve_index=False)
    fields = []
    for f in tab.schema:
        m = {k: str(v) for k, v in (meta.get(f.name) or {}).items() if v}
        fields.append(f.with_metadata({**(f.metadata or {}), **{k.encode(): v.encode() for k, v in m.items()}})
                      if m else f)
    return tab.cast(pa.schema(fields, metadata=tab.schema.metadata))


def _refuse_binary_on_terminal(fmt: str, output: str | None) -> None:
    if not output and sys.stdout.isatty():
        raise ArchiveError(f"{fmt} output is binary: write it to a file with -o FILE.{fmt} (or pipe it)")


def _write_text(text: str, output: str | None) -> None:
    if output:
        with open(output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)


def _write_bytes(data: bytes, output: str | None) -> None:
    if output:
        with open(output, "wb") as fh:
            fh.write(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
