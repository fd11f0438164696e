"""Result column names as PostgreSQL gives them, for queries DuckDB ran.

The two engines name an unaliased expression differently: ``count(*)`` is
``count_star()`` on DuckDB and ``count`` on PostgreSQL, ``avg(x)`` is ``avg(x)``
and ``avg``, ``x + 1`` is ``(x + 1)`` and ``?column?``.  So that one query gives
one set of names on both stores, the Parquet store renames DuckDB's result
columns with :func:`postgres_names`: DuckDB's own parser (``json_serialize_sql``)
says which select items carry no alias, and those take PostgreSQL's name
(its ``FigureColname`` rules: a column's name, a function's name, ``case``,
``coalesce``, else ``?column?``).  Aliased columns and anything the rules do not
cover keep DuckDB's name.
"""

from __future__ import annotations

import json
import re
import threading

import duckdb

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
#: DuckDB function names PostgreSQL spells differently.
_RENAMED = {"count_star": "count"}

_lock = threading.Lock()
_parser: duckdb.DuckDBPyConnection | None = None


def _parse(query: str) -> dict | None:
    global _parser
    with _lock:
        if _parser is None:
            _parser = duckdb.connect(":memory:")
        try:
            text = _parser.execute("SELECT json_serialize_sql(?::VARCHAR)", [query]).fetchone()[0]
        except duckdb.Error:
            return None
    tree = json.loads(text)
    if tree.get("error") or len(tree.get("statements", [])) != 1:
        return None
    return tree["statements"][0].get("node")


def _select_list(node: dict | None) -> list | None:
    while node is not None and node.get("type") in ("SET_OPERATION_NODE", "SETOP_NODE"):
        node = node.get("left") or (node.get("children") or [None])[0]
    if node is None or node.get("type") != "SELECT_NODE":
        return None
    return node.get("select_list")


def _pg_name(expr: dict) -> str | None:
    """PostgreSQL's name of an unaliased select item, or None to keep DuckDB's."""
    cls = expr.get("class")
    if cls == "COLUMN_REF":
        return expr["column_names"][-1]
    if cls in ("FUNCTION", "AGGREGATE", "WINDOW"):
        name = str(expr.get("function_name", ""))
        name = _RENAMED.get(name, name)
        return name if _IDENT.fullmatch(name) else "?column?"
    if cls == "CAST":
        inner = _pg_name(expr.get("child") or {})
        return inner if inner not in (None, "?column?") else None
    if cls == "CASE":
        return "case"
    if cls == "OPERATOR" and expr.get("type") == "OPERATOR_COALESCE":
        return "coalesce"
    if cls in ("CONSTANT", "COMPARISON", "CONJUNCTION", "OPERATOR", "BETWEEN"):
        return "?column?"
    return None


def postgres_names(query: str, names: list[str]) -> list[str]:
    """``names`` (DuckDB's result columns of ``query``) with unaliased select items named
    as PostgreSQL names them; unchanged where the query's select list cannot be matched
    to the result (e.g. more than one ``*``)."""
    items = _select_list(_parse(query))
    if not items:
        return list(names)
    stars = [i for i, e in enumerate(items) if e.get("class") in ("STAR", "COLUMNS")]
    if len(stars) > 1 or (not stars and len(items) != len(names)):
        return list(names)
    if stars:  # items before the star name the first columns, items after it the last ones
        k = stars[0]
        n_star = len(names) - (len(items) - 1)
        if n_star < 0:
            return list(names)
        pairs = list(zip(range(k), items[:k])) + [(len(names) - (len(items) - 1 - j), e)
                                                   for j, e in enumerate(items[k + 1:])]
    else:
        pairs = list(enumerate(items))
    out = list(names)
    for pos, expr in pairs:
        if expr.get("alias"):
            continue
        name = _pg_name(expr)
        if name is not None:
            out[pos] = name
    return out
