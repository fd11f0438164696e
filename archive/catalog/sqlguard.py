"""Refuse user SQL that is not a plain query before it reaches an engine.

This is the first of several guards.  Each statement is parsed by its own
engine's parser (DuckDB's for the Parquet store, PostgreSQL's via ``pglast``
for the server), and only a single SELECT (or an EXPLAIN of one, without
ANALYZE) passes.  The engines add their own barriers behind it:

* DuckDB: the connection may read only the snapshot's Parquet files
  (``allowed_paths``), external access, extension install/auto-load are off
  and the configuration is locked (see ``ParquetStore.sql``);
* PostgreSQL: a READ ONLY transaction with statement and lock timeouts, on a
  connection that is closed after the query (no session state, advisory lock
  or temp table survives it), and functions that read server files, signal
  backends, take advisory locks, run SQL given as text or reach other servers
  are refused here (see ``PostgresStore.sql``).

The parse is structural, not a keyword search: ``EXPLAIN ANALYSE``, a
data-modifying CTE or ``SELECT ... INTO`` are recognised as what they are.
"""

from __future__ import annotations

import re

import duckdb

from archive.errors import ArchiveError, ReadOnlyError

_WRITE_HINT = "write through `archive ingest` or Archive.write"


def _empty(query: str) -> None:
    if not query or not query.strip():
        raise ArchiveError("empty SQL query")


# -- DuckDB (the Parquet store) ----------------------------------------------

def check_duckdb_query(query: str) -> None:
    """Raise :class:`ReadOnlyError` unless ``query`` is one SELECT, or ``EXPLAIN`` + one SELECT.

    DuckDB's own parser decides the statement type.  ``EXPLAIN`` is allowed
    only when what follows it parses, on its own, as a single SELECT: so
    ``EXPLAIN ANALYZE ...`` (which executes its statement), ``EXPLAIN (…)``
    options and ``EXPLAIN COPY ...`` are refused.
    """
    _empty(query)
    kind = _duckdb_kind(query)
    if kind == "EXPLAIN":
        tokens = duckdb.tokenize(query)
        words = [(pos, typ) for pos, typ in tokens if typ != duckdb.token_type.comment]
        if len(words) < 2:
            raise ArchiveError("SQL syntax error: EXPLAIN of nothing")
        rest = query[words[1][0]:]
        inner = _duckdb_kind(rest, explained=True)
        if inner != "SELECT":
            raise ReadOnlyError(f"archive SQL is read-only: EXPLAIN is allowed of a plain SELECT only "
                                f"(not of {inner}; EXPLAIN ANALYZE executes its statement)")
        return
    if kind != "SELECT":
        raise ReadOnlyError(f"archive SQL is read-only: {kind} statements are refused ({_WRITE_HINT})")


def _duckdb_kind(query: str, explained: bool = False) -> str:
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        if explained:  # e.g. "EXPLAIN (ANALYZE) ...": not a statement of its own
            return first_word(query) or "an empty statement"
        raise ArchiveError(f"SQL syntax error: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise ReadOnlyError(f"archive SQL runs exactly one query at a time; got {len(statements)} statements")
    return statements[0].type.name


def first_word(query: str) -> str:
    m = re.match(r"\s*\(?\s*([A-Za-z_]+)", query)
    return m.group(1).upper() if m else ""


# -- PostgreSQL ----------------------------------------------------------------

#: Functions a user query may not call on the server, by name (any schema), as
#: regular expressions.  Grouped by what they would let a query do.
_PG_DENIED = {
    "read or write server files": r"pg_read_file|pg_read_binary_file|pg_stat_file|pg_ls_\w+|pg_file_\w+"
                                  r"|pg_logdir_ls|pg_current_logfile",
    "create or move large objects (server files)": r"lo_\w+|loread|lowrite",
    "signal or manage server processes": r"pg_terminate_backend|pg_cancel_backend|pg_reload_conf"
                                         r"|pg_rotate_logfile\w*|pg_promote|pg_switch_wal|pg_log_backend_\w+"
                                         r"|pg_stat_reset\w*|pg_stat_statements_reset|pg_wal_replay_\w+"
                                         r"|pg_backup_\w+|pg_start_backup|pg_stop_backup|pg_create_\w+"
                                         r"|pg_drop_\w+|pg_copy_\w+|pg_replication_\w+|pg_logical_\w+"
                                         r"|pg_sync_replication_slots|pg_import_system_collations",
    "take locks that outlive the query": r"pg_advisory_\w+|pg_try_advisory_\w+",
    "reach other servers": r"dblink\w*|postgres_fdw_\w+",
    "change settings or sequences": r"set_config|nextval|setval|pg_notify",
    "run SQL given as text": r"\w+_to_xml\w*|\w+_to_xmlschema",
    "sleep": r"pg_sleep\w*",
}
_PG_DENIED_RE = {why: re.compile(rf"(?:{pat})\Z") for why, pat in _PG_DENIED.items()}

#: Statement nodes that change data or state, wherever they appear (a CTE may hold one).
_PG_WRITE_NODES = {"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"}


def check_postgres_query(query: str) -> None:
    """Raise unless ``query`` is one read-only SELECT (or EXPLAIN of one) in PostgreSQL's grammar.

    The query is parsed by PostgreSQL's own parser (``pglast``), so any valid
    read-only query passes (``FOR SHARE``, ``FETCH ... WITH TIES``, column
    definition lists).  Refused: any other statement, ``SELECT ... INTO``,
    data-modifying CTEs, ``EXPLAIN ANALYZE`` and calls to the functions in
    ``_PG_DENIED`` (file access, large objects, signals, advisory locks,
    dblink, settings, SQL passed as text).
    """
    import pglast
    from pglast import parser as pg_parser

    _empty(query)
    try:
        statements = pglast.parse_sql(query)
    except pg_parser.ParseError as exc:
        raise ArchiveError(f"SQL syntax error: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise ReadOnlyError(f"archive SQL runs exactly one query at a time; got {len(statements)} statements")
    tree = statements[0].stmt(depth=None, skip_none=True)
    kind = tree.get("@")
    if kind == "ExplainStmt":
        options = {o.get("defname", "").lower() for o in tree.get("options") or ()}
        if "analyze" in options or "analyse" in options:
            raise ReadOnlyError("archive SQL is read-only: EXPLAIN ANALYZE executes its statement and is refused")
        tree = tree.get("query") or {}
        kind = tree.get("@")
    if kind != "SelectStmt":
        name = (kind or "unknown").removesuffix("Stmt")
        raise ReadOnlyError(f"archive SQL is read-only: {name} statements are refused ({_WRITE_HINT})")
    for node in _walk(tree):
        what = node.get("@")
        if what in _PG_WRITE_NODES:
            raise ReadOnlyError(f"archive SQL is read-only: a {what.removesuffix('Stmt').upper()} inside "
                                f"the query is refused ({_WRITE_HINT})")
        if what == "SelectStmt" and node.get("intoClause"):
            raise ReadOnlyError("archive SQL is read-only: SELECT ... INTO creates a table and is refused")
        if what == "FuncCall":
            name = str(node["funcname"][-1].get("sval", "")).lower()
            for why, pattern in _PG_DENIED_RE.items():
                if pattern.match(name):
                    raise ReadOnlyError(f"archive SQL refuses {name}(): it would {why}")


def _walk(node):
    """Every node (a dict with an '@' type key) of a pglast tree as plain data."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "@" in item:
                yield item
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def check_read_only(query: str, dialect: str = "duckdb") -> None:
    """Check ``query`` for ``dialect`` ("duckdb" or "postgresql")."""
    if dialect == "postgresql":
        check_postgres_query(query)
    else:
        check_duckdb_query(query)
