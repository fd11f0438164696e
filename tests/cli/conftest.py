"""Fixtures for CLI tests: an empty archive of each backend."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from archive.catalog.schema import load_schema
from archive.cli.main import main


@pytest.fixture(params=["parquet", "postgres"])
def repo(request, tmp_path):
    if request.param == "parquet":
        path = str(tmp_path / "arc")
        assert main(["init", path]) == 0
        return path
    url = request.getfixturevalue("pg_store_url")
    engine = sa.create_engine(url)
    with engine.begin() as con:
        con.execute(sa.text("TRUNCATE " + ", ".join(t.name for t in load_schema())))
    engine.dispose()
    return url


