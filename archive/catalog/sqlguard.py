"""Refuse SQL that is not a plain query before it reaches an engine.

This is the first of two guards: the engines also run user SQL read-only
(a read-only DuckDB connection; a READ ONLY transaction on Postgres), so a
statement that slips past this parser still cannot change data.
"""

from __future__ import annotations

import duckdb

from archive.errors import ArchiveError, ReadOnlyError

_ALLOWED = {"SELECT", "EXPLAIN"}


def check_read_only(query: str) -> None:
    """Raise :class:`ReadOnlyError` unless ``query`` is exactly one SELECT (or EXPLAIN of one).

    The query is parsed with DuckDB's parser, which understands the
    PostgreSQL dialect used by both backends.
    """
    if not query or not query.strip():
        raise ArchiveError("empty SQL query")
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.ParserException as exc:
        raise ArchiveError(f"SQL syntax error: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise ReadOnlyError(f"archive SQL runs exactly one query at a time; got {len(statements)} statements")
    kind = statements[0].type.name
    if kind not in _ALLOWED:
        raise ReadOnlyError(f"archive SQL is read-only: {kind} statements are refused "
                            "(write through `archive ingest` or Archive.write)")
    if kind == "EXPLAIN" and "ANALYZE" in query.upper():
        raise ReadOnlyError("archive SQL is read-only: EXPLAIN ANALYZE executes its statement and is refused")
