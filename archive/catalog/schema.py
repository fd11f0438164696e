"""The archive's table definitions, loaded once from ``archive/schema/tables.yaml``.

Everything that needs to know a table's columns derives them from here: the
Arrow schemas used by the Parquet store, the SQLAlchemy tables used by the
Postgres store and by Alembic, input validation and ``docs/schema.md``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources

import pyarrow as pa
import sqlalchemy as sa
import yaml

#: Arrow and SQL types for each schema type name.
_ARROW_TYPES: dict[str, pa.DataType] = {
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}
_SQL_TYPES = {
    "int16": sa.SmallInteger,
    "int32": sa.Integer,
    "int64": sa.BigInteger,
    "float32": sa.REAL,
    "float64": sa.Float(precision=53),
    "string": sa.Text,
    "bool": sa.Boolean,
    "timestamp": sa.DateTime(timezone=True),
}


@dataclass(frozen=True)
class Column:
    """One column: name, schema type name, unit, nullability, description."""

    name: str
    type: str
    unit: str | None = None
    nullable: bool = True
    description: str = ""

    @property
    def arrow_type(self) -> pa.DataType:
        return _ARROW_TYPES[self.type]

    @property
    def numpy_kind(self) -> str:
        """``'i'`` integer, ``'f'`` float, ``'b'`` bool, ``'U'`` string, ``'M'`` time."""
        return {"int16": "i", "int32": "i", "int64": "i", "float32": "f", "float64": "f",
                "string": "U", "bool": "b", "timestamp": "M"}[self.type]


#: Partial-index predicates the schema may use: ``<column> IS [NOT] NULL``.
_WHERE = re.compile(r"(\w+) IS (NOT )?NULL")


@dataclass(frozen=True)
class Index:
    """A B-tree index: key columns, optional covering (``INCLUDE``) columns and an
    optional partial-index predicate (``<column> IS [NOT] NULL``).

    A covering index lets Postgres answer a query that needs only its columns
    with an index-only scan (no heap page visits); a partial one holds only the
    rows matching ``where`` (e.g. the current versions of a versioned table).
    """

    columns: tuple[str, ...]
    include: tuple[str, ...] = ()
    where: str | None = None
    name: str | None = None

    def sql_name(self, table: str) -> str:
        """``ix_<table>_<name>``, or ``ix_<table>_<key columns>`` for an unnamed index."""
        return f"ix_{table}_{self.name or '_'.join(self.columns)}"

    @property
    def where_column(self) -> str | None:
        """The column the partial-index predicate tests (None: not partial)."""
        return None if self.where is None else _WHERE.fullmatch(self.where).group(1)

    @property
    def all_columns(self) -> tuple[str, ...]:
        """Key and covering columns: what an index-only scan can return."""
        return self.columns + self.include

    def describe(self) -> str:
        """One-line description for the docs: ``(healpix29) INCLUDE (...) WHERE ...``."""
        out = f"({', '.join(self.columns)})"
        if self.include:
            out += f" INCLUDE ({', '.join(self.include)})"
        if self.where:
            out += f" WHERE {self.where}"
        return out


def _parse_index(spec, table: str) -> Index:
    """An index entry of the YAML: a list of key columns, or a mapping with
    ``columns`` and optional ``include``, ``where`` and ``name``."""
    if isinstance(spec, list):
        return Index(columns=tuple(spec))
    if not isinstance(spec, dict) or "columns" not in spec:
        raise ValueError(f"schema table {table!r}: an index is a list of columns or a mapping with "
                         f"'columns' (and optional include, where, name); got {spec!r}")
    unknown = set(spec) - {"columns", "include", "where", "name"}
    if unknown:
        raise ValueError(f"schema table {table!r}: unknown index key(s) {sorted(unknown)}")
    where = spec.get("where")
    if where is not None and not _WHERE.fullmatch(str(where)):
        raise ValueError(f"schema table {table!r}: index predicate {where!r} is not of the form "
                         "'<column> IS NULL' or '<column> IS NOT NULL'")
    return Index(columns=tuple(spec["columns"]), include=tuple(spec.get("include") or ()),
                 where=None if where is None else str(where), name=spec.get("name"))


@dataclass(frozen=True)
class Table:
    """A table: its columns in order, keys, indexes and whether it is positional."""

    name: str
    description: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    indexes: tuple[Index, ...] = ()
    positional: bool = False
    _by_name: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({c.name: c for c in self.columns})

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"table {self.name!r} has no column {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field(c.name, c.arrow_type, nullable=c.nullable) for c in self.columns],
            metadata={"archive.table": self.name},
        )

    @property
    def id_column(self) -> str:
        """The column that identifies a row (first primary-key column)."""
        return self.primary_key[0]


@dataclass(frozen=True)
class Schema:
    """All tables, plus the band list used to expand per-band columns."""

    version: int
    bands: tuple[str, ...]
    tables: dict[str, Table]

    def __getitem__(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            known = ", ".join(sorted(self.tables))
            raise KeyError(f"unknown table {name!r}; the tables are: {known}") from None

    def __iter__(self):
        return iter(self.tables.values())


def _parse(doc: dict) -> Schema:
    bands = tuple(doc["bands"])
    tables: dict[str, Table] = {}
    for tname, t in doc["tables"].items():
        cols = [Column(name=n, **spec) for n, spec in t["columns"].items()]
        for template, spec in (t.get("per_band") or {}).items():
            desc = spec.get("description", "")
            for band in bands:
                cols.append(Column(name=template.format(band=band),
                                   **{**spec, "description": f"{desc} Band {band}."}))
        names = [c.name for c in cols]
        if len(set(names)) != len(names):
            raise ValueError(f"schema table {tname!r} repeats a column name")
        for c in cols:
            if c.type not in _ARROW_TYPES:
                raise ValueError(f"schema column {tname}.{c.name} has unknown type {c.type!r}")
        table = Table(
            name=tname,
            description=t.get("description", ""),
            columns=tuple(cols),
            primary_key=tuple(t["primary_key"]),
            indexes=tuple(_parse_index(ix, tname) for ix in t.get("indexes", [])),
            positional=bool(t.get("positional", False)),
        )
        for needed in list(table.primary_key) + [c for ix in table.indexes for c in ix.all_columns]:
            table.column(needed)
        for ix in table.indexes:
            if ix.where is not None:
                table.column(ix.where_column)
        if table.positional:
            for needed in ("ra", "dec", "healpix29"):
                table.column(needed)
        tables[tname] = table
    return Schema(version=int(doc["version"]), bands=bands, tables=tables)


@functools.lru_cache(maxsize=1)
def load_schema() -> Schema:
    """Load and cache the archive schema from the packaged YAML file."""
    text = resources.files("archive.schema").joinpath("tables.yaml").read_text()
    return _parse(yaml.safe_load(text))


def sqlalchemy_metadata(schema: Schema | None = None) -> sa.MetaData:
    """SQLAlchemy Core tables for every schema table, with keys and B-tree indexes
    (covering columns as ``INCLUDE``, partial predicates as ``WHERE`` on PostgreSQL)."""
    schema = schema or load_schema()
    md = sa.MetaData()
    for t in schema:
        cols = [
            sa.Column(c.name, _SQL_TYPES[c.type], nullable=c.nullable,
                      primary_key=c.name in t.primary_key, autoincrement=False,
                      comment=(f"[{c.unit}] " if c.unit else "") + c.description)
            for c in t.columns
        ]
        table = sa.Table(t.name, md, *cols, comment=t.description)
        for ix in t.indexes:
            opts = {}
            if ix.include:
                opts["postgresql_include"] = list(ix.include)
            if ix.where is not None:
                opts["postgresql_where"] = sa.text(ix.where)
            sa.Index(ix.sql_name(t.name), *[table.c[n] for n in ix.columns], **opts)
    return md


def markdown_docs(schema: Schema | None = None) -> str:
    """The schema as a Markdown document (one section per table)."""
    schema = schema or load_schema()
    out = ["# Archive schema", "",
           "Generated from `archive/schema/tables.yaml` by `archive schema docs`.",
           "Angles in degrees, fluxes in nJy, times MJD (TAI), pixels 0-based.", ""]
    for t in schema:
        out += [f"## `{t.name}`", "", t.description, "",
                f"Primary key: `{', '.join(t.primary_key)}`"
                + ("; HEALPix-partitioned." if t.positional else "."), ""]
        if t.indexes:
            out += ["Indexes (PostgreSQL): " + "; ".join(f"`{ix.describe()}`" for ix in t.indexes) + ".", ""]
        out += [
                "| column | type | unit | null | description |", "|---|---|---|---|---|"]
        out += [f"| `{c.name}` | {c.type} | {c.unit or ''} | {'yes' if c.nullable else 'no'} "
                f"| {c.description} |" for c in t.columns]
        out.append("")
    return "\n".join(out)
