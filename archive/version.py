"""The version of the archive package (recorded in every provenance row)."""

__version__ = "0.1.0"
