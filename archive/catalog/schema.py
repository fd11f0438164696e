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

#: The schema's type names.  The Arrow and SQL types they stand for are built on
#: first use (:func:`arrow_types`, :func:`sql_types`), so that reading the schema
#: (``archive schema``, one-line errors) needs neither pyarrow nor SQLAlchemy.
TYPES = ("int16", "int32", "int64", "float32", "float64", "string", "bool", "timestamp")

#: Keys a column may carry in tables.yaml.
COLUMN_KEYS = ("type", "unit", "ucd", "nullable", "description")

#: A UCD: words of letters, digits, '.', '-' and '_' separated by ';' (the IVOA
#: UCD1+ syntax; the words themselves are checked against the controlled
#: vocabulary by the tests, with astropy).
_UCD = re.compile(r"[A-Za-z][\w.\-]*(;[A-Za-z][\w.\-]*)*")


@functools.lru_cache(maxsize=1)
def arrow_types() -> dict:
    """Schema type name -> Arrow type."""
    import pyarrow as pa

    return {"int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(), "float32": pa.float32(),
            "float64": pa.float64(), "string": pa.string(), "bool": pa.bool_(),
            "timestamp": pa.timestamp("us", tz="UTC")}


@functools.lru_cache(maxsize=1)
def sql_types() -> dict:
    """Schema type name -> SQLAlchemy type."""
    import sqlalchemy as sa

    return {"int16": sa.SmallInteger, "int32": sa.Integer, "int64": sa.BigInteger, "float32": sa.REAL,
            "float64": sa.Float(precision=53), "string": sa.Text, "bool": sa.Boolean,
            "timestamp": sa.DateTime(timezone=True)}


def astropy_unit(unit: str | None):
    """The astropy unit of a schema unit string (FITS syntax: ``deg2``, ``nJy-1``,
    ``d deg-2``), or None."""
    if not unit:
        return None
    import astropy.units as u

    return u.Unit(unit, format="fits")


@dataclass(frozen=True)
class Column:
    """One column: name, schema type name, unit, UCD, nullability, description."""

    name: str
    type: str
    unit: str | None = None
    nullable: bool = True
    description: str = ""
    #: IVOA Unified Content Descriptor (e.g. ``pos.eq.ra;meta.main``), for VOTable
    #: and other self-describing formats; None where no standard word fits.
    ucd: str | None = None

    @property
    def arrow_type(self):
        return arrow_types()[self.type]

    @property
    def meta(self) -> dict:
        """``{"unit", "ucd", "description"}`` of this column (None where absent)."""
        return {"unit": self.unit, "ucd": self.ucd, "description": self.description or None}

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
    def arrow_schema(self):
        import pyarrow as pa

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

    def column_meta(self, names, table: str | None = None) -> dict[str, dict]:
        """Unit, UCD and description of result columns, by name.

        A column of ``table`` takes that table's; any other name takes what every
        schema column of that name agrees on (``ra`` has one unit and UCD in
        every table, but not one description), so SQL results are described
        too.  Names the schema does not know are left out."""
        own = self.tables.get(table) if table else None
        out: dict[str, dict] = {}
        for name in names:
            if own is not None and name in own:
                out[name] = own.column(name).meta
                continue
            metas = [t.column(name).meta for t in self if name in t]
            if metas:
                out[name] = {k: (metas[0][k] if all(m[k] == metas[0][k] for m in metas) else None)
                             for k in metas[0]}
        return out


def _column(table: str, name: str, spec: dict) -> Column:
    unknown = sorted(set(spec) - set(COLUMN_KEYS))
    if unknown:
        raise ValueError(f"schema column {table}.{name}: unknown key(s) {unknown}; "
                         f"a column takes {', '.join(COLUMN_KEYS)}")
    col = Column(name=name, **spec)
    if col.type not in TYPES:
        raise ValueError(f"schema column {table}.{name} has unknown type {col.type!r}")
    if col.ucd is not None and not _UCD.fullmatch(str(col.ucd)):
        raise ValueError(f"schema column {table}.{name}: {col.ucd!r} is not a UCD "
                         "(words such as pos.eq.ra;meta.main separated by ';')")
    return col


def _parse(doc: dict) -> Schema:
    bands = tuple(doc["bands"])
    tables: dict[str, Table] = {}
    for tname, t in doc["tables"].items():
        cols = [_column(tname, n, spec) for n, spec in t["columns"].items()]
        for template, spec in (t.get("per_band") or {}).items():
            desc = spec.get("description", "")
            for band in bands:
                cols.append(_column(tname, template.format(band=band),
                                    {**spec, "description": f"{desc} Band {band}."}))
        names = [c.name for c in cols]
        if len(set(names)) != len(names):
            raise ValueError(f"schema table {tname!r} repeats a column name")
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
    import yaml

    text = resources.files("archive.schema").joinpath("tables.yaml").read_text()
    return _parse(yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def sqlalchemy_metadata(schema: Schema | None = None) -> sa.MetaData:
    """SQLAlchemy Core tables for every schema table, with keys and B-tree indexes
    (covering columns as ``INCLUDE``, partial predicates as ``WHERE`` on PostgreSQL)."""
    import sqlalchemy as sa

    schema = schema or load_schema()
    types = sql_types()
    md = sa.MetaData()
    for t in schema:
        cols = [
            sa.Column(c.name, types[c.type], nullable=c.nullable,
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
           "Generated from `archive/schema/tables.yaml` by `archive schema` (`archive schema > docs/schema.md`).",
           "Angles in degrees, fluxes in nJy, times MJD (TAI), pixels 0-based.", ""]
    for t in schema:
        out += [f"## `{t.name}`", "", t.description, "",
                f"Primary key: `{', '.join(t.primary_key)}`"
                + ("; HEALPix-partitioned." if t.positional else "."), ""]
        if t.indexes:
            out += ["Indexes (PostgreSQL): " + "; ".join(f"`{ix.describe()}`" for ix in t.indexes) + ".", ""]
        out += ["| column | type | unit | UCD | null | description |", "|---|---|---|---|---|---|"]
        out += [f"| `{c.name}` | {c.type} | {c.unit or ''} | {c.ucd or ''} | {'yes' if c.nullable else 'no'} "
                f"| {c.description} |" for c in t.columns]
        out.append("")
    return "\n".join(out)
