"""Print query results as table, csv, json, parquet or votable."""

from __future__ import annotations

import io
import sys

import pandas as pd

FORMATS = ["table", "csv", "json", "parquet", "votable"]


def add_format_options(parser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="output format (default: table)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="write to FILE instead of standard output (required for parquet on a terminal)")


def emit(df: pd.DataFrame, fmt: str, output: str | None = None) -> None:
    """Write ``df`` in ``fmt`` to ``output`` (a path) or stdout."""
    if fmt == "table":
        text = df.to_string(index=False, max_rows=None) if len(df) else "(no rows)"
        _write_text(text + "\n", output)
    elif fmt == "csv":
        _write_text(df.to_csv(index=False), output)
    elif fmt == "json":
        _write_text(df.to_json(orient="records", lines=True, double_precision=15), output)
    elif fmt == "parquet":
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        _write_bytes(buf.getvalue(), output)
    elif fmt == "votable":
        from astropy.io.votable import from_table
        from astropy.table import Table

        buf = io.BytesIO()
        from_table(Table.from_pandas(df)).to_xml(buf)
        _write_bytes(buf.getvalue(), output)
    else:  # argparse restricts choices; this guards programmatic use
        raise ValueError(f"unknown format {fmt!r}")


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
