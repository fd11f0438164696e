"""Exceptions the archive raises for bad input or refused operations.

The CLI prints any :class:`ArchiveError` as one line and exits non-zero; other
exceptions are bugs and keep their traceback.
"""


class ArchiveError(Exception):
    """Base class for errors caused by the user's input or the store's state."""


class ValidationError(ArchiveError, ValueError):
    """Input rows or files do not match the schema (names the field and row)."""


class StoreLockedError(ArchiveError):
    """Another process holds the write lock of the store."""


class ReadOnlyError(ArchiveError):
    """A read-only query tried to change data."""


class NotFoundError(ArchiveError, KeyError):
    """A requested table, row, file or product does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
