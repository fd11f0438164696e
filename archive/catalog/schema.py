"""The archive's table definitions, loaded once from ``archive/schema/tables.yaml``.

Everything that needs to know a table's columns derives them from here: the
Arrow schemas used by the Parquet store, the SQLAlchemy tables used by the
Postgres store and by Alembic, input validation and ``docs/schema.md``.
"""

from __future__ import annotations

import functools
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


@dataclass(frozen=True)
class Table:
    """A table: its columns in order, keys, indexes and whether it is positional."""

    name: str
    description: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    indexes: tuple[tuple[str, ...], ...] = ()
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
            indexes=tuple(tuple(ix) for ix in t.get("indexes", [])),
            positional=bool(t.get("positional", False)),
        )
        for needed in list(table.primary_key) + [c for ix in table.indexes for c in ix]:
            table.column(needed)
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
    """SQLAlchemy Core tables for every schema table, with keys and B-tree indexes."""
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
            sa.Index(f"ix_{t.name}_{'_'.join(ix)}", *[table.c[n] for n in ix])
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
                + ("; HEALPix-partitioned." if t.positional else "."), "",
                "| column | type | unit | null | description |", "|---|---|---|---|---|"]
        out += [f"| `{c.name}` | {c.type} | {c.unit or ''} | {'yes' if c.nullable else 'no'} "
                f"| {c.description} |" for c in t.columns]
        out.append("")
    return "\n".join(out)
