"""A time-domain astronomy archive.

``archive.open(path_or_url)`` (or ``archive.Archive.open``) opens a catalog store (a directory of
HEALPix-partitioned Parquet, or a ``postgresql+psycopg://`` URL) and returns an
:class:`archive.api.Archive`.  ``archive.sky.regions`` (Cone, Box, Polygon) and
the other parts are reachable as attributes without importing them first; each
loads on first use, so ``import archive`` stays light.
"""

from __future__ import annotations

import importlib

from archive.version import __version__  # noqa: F401

#: Subpackages loaded on first attribute access (``archive.sky.regions.Box``), with the
#: modules of theirs that load along (a package does not import its modules itself).
_LAZY = {"sky": ("regions", "healpix"), "api": (), "errors": (), "flags": ()}


def open(target, **kwargs):  # noqa: A001 - the public name is archive.open
    """Open the archive at ``target`` (directory path or Postgres URL)."""
    from archive.api import Archive

    return Archive.open(target, **kwargs)


def __getattr__(name: str):
    if name == "Archive":  # ``from archive import Archive``, loaded on first use
        from archive.api import Archive

        return Archive
    if name in _LAZY:
        module = importlib.import_module(f"archive.{name}")
        for sub in _LAZY[name]:
            importlib.import_module(f"archive.{name}.{sub}")
        return module
    raise AttributeError(f"module 'archive' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + ["Archive"])
