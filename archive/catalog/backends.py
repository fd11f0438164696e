"""Open a catalog store by its location: the one module that knows both backends.

:mod:`archive.catalog.store` defines the interface the backends implement and
imports neither of them; each backend imports the interface.  This factory sits
above all three, so there is no import cycle.
"""

from __future__ import annotations

from archive.errors import ArchiveError

#: URL prefixes of a PostgreSQL store.
POSTGRES_PREFIXES = ("postgresql://", "postgresql+psycopg://", "postgres://")


def is_postgres_url(target) -> bool:
    return str(target).startswith(POSTGRES_PREFIXES)


def open_store(target, create: bool = False, **kwargs):
    """Open a store: a ``postgresql://`` / ``postgresql+psycopg://`` URL or a directory path.

    ``create=True`` initialises an empty store (a new directory, or the schema
    in an empty database).  Returns a :class:`archive.catalog.store.CatalogStore`.
    """
    target = str(target)
    if is_postgres_url(target):
        from archive.catalog.postgres_store import PostgresStore

        return PostgresStore(target, create=create, **kwargs)
    if "://" in target:
        raise ArchiveError(f"unsupported store URL {target!r}: use a directory path or postgresql+psycopg://...")
    from archive.catalog.parquet_store import ParquetStore

    return ParquetStore(target, create=create, **kwargs)
