"""Fixtures that run the same store tests on both backends."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from archive.catalog.schema import load_schema
from archive.catalog.backends import open_store


def _truncate(url: str) -> None:
    engine = sa.create_engine(url)
    names = ", ".join(f'"{t.name}"' for t in load_schema())
    with engine.begin() as con:
        con.execute(sa.text(f"TRUNCATE {names}"))
    engine.dispose()


@pytest.fixture(params=["parquet", "postgres"])
def store(request, tmp_path):
    """An empty store of each backend."""
    if request.param == "parquet":
        s = open_store(str(tmp_path / "arc"), create=True)
    else:
        url = request.getfixturevalue("pg_store_url")
        _truncate(url)
        s = open_store(url)
    yield s
    s.close()


@pytest.fixture
def make_dia_sources():
    """Factory of valid dia_source rows (see _make_dia_sources)."""
    return _make_dia_sources


def _make_dia_sources(n: int, seed: int = 0, ra=None, dec=None, start_id: int = 1) -> pd.DataFrame:
    """Valid dia_source rows at random (or given) positions."""
    rng = np.random.default_rng(seed)
    if ra is None:
        # a survey field, not the whole sky: a batch touches a few partitions
        ra = rng.uniform(148, 152, n)
        dec = rng.uniform(-2, 2, n)
    return pd.DataFrame({
        "dia_source_id": np.arange(start_id, start_id + n, dtype=np.int64),
        "exposure_id": rng.integers(1, 50, n).astype(np.int64),
        "visit": rng.integers(1, 50, n).astype(np.int64),
        "detector": rng.integers(0, 4, n).astype(np.int32),
        "band": rng.choice(["g", "r", "i"], n),
        "mjd": rng.uniform(60000, 60100, n),
        "ra": np.asarray(ra, dtype=float),
        "dec": np.asarray(dec, dtype=float),
        "psf_flux": rng.normal(1000, 100, n),
        "psf_flux_err": np.full(n, 10.0),
        "flags": np.zeros(n, dtype=np.int64),
    })
