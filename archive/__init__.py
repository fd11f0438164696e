"""A time-domain astronomy archive.

``archive.open(path_or_url)`` opens a catalog store (a directory of
HEALPix-partitioned Parquet, or a ``postgresql+psycopg://`` URL) and returns an
:class:`archive.api.Archive`.
"""

from __future__ import annotations

from archive.version import __version__  # noqa: F401


def open(target, **kwargs):  # noqa: A001 - the public name is archive.open
    """Open the archive at ``target`` (directory path or Postgres URL)."""
    from archive.api import Archive

    return Archive.open(target, **kwargs)
