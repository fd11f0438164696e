"""Shared fixtures: a fresh PostgreSQL database per test session, the real test data.

Postgres tests skip with a visible reason when no server answers, unless
ARCHIVE_REQUIRE_POSTGRES=1 (set by .ci/run), which turns that skip into a failure.
"""

from __future__ import annotations

import os
import pathlib
import uuid

import pytest

#: Server URL (without database) used to create the per-session test database.
PG_SERVER = os.environ.get("ARCHIVE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
#: Small real files copied into the repository (origins and licences: tests/data/README.md).
TEST_DATA = pathlib.Path(__file__).resolve().parent / "data"


def _admin_connect():
    import psycopg

    url = PG_SERVER.replace("postgresql+psycopg://", "postgresql://")
    return psycopg.connect(url + "/postgres", autocommit=True, connect_timeout=3)


@pytest.fixture(scope="session")
def pg_url():
    """URL of a freshly created, empty database; dropped at the end of the session."""
    try:
        admin = _admin_connect()
    except Exception as exc:  # no server: skip, or fail when CI requires Postgres
        msg = f"PostgreSQL not reachable at {PG_SERVER}: {exc}"
        if os.environ.get("ARCHIVE_REQUIRE_POSTGRES") == "1":
            pytest.fail(msg + " (ARCHIVE_REQUIRE_POSTGRES=1)")
        pytest.skip(msg)
    name = f"archive_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def pg_store_url(pg_url):
    """The session database, migrated to head once."""
    from archive.catalog.backends import open_store

    store = open_store(pg_url, create=True)
    store.close()
    return pg_url


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """tests/data: real files (``real/...``) that every clone has, so nothing skips."""
    return TEST_DATA
