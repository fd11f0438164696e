"""Packaged schema files (tables.yaml)."""
