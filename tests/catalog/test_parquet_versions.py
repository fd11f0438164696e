"""Parquet close_versions: exactly the open versions of the given ids are closed, nothing else moves."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from archive.catalog import parquet_store
from archive.catalog.backends import open_store
from archive.errors import ArchiveError
from archive.sky.regions import Cone


def _objects(store, make_dia_sources, n: int, start_mjd: float, seed: int = 0) -> pa.Table:
    """``n`` dia_object versions (ids 1..n, one source each) starting at ``start_mjd``."""
    from archive.catalog.summaries import new_objects
    from archive.catalog.validate import conform

    rng = np.random.default_rng(seed)
    src = make_dia_sources(n, seed=seed, ra=rng.uniform(148, 152, n), dec=rng.uniform(-2, 2, n))
    src["dia_object_id"] = np.arange(1, n + 1, dtype=np.int64)
    src["healpix29"] = 0  # recomputed by conform
    return conform(store.table("dia_object"), new_objects(src, start_mjd), "test objects")


@pytest.fixture
def pstore(tmp_path, monkeypatch):
    monkeypatch.setattr(parquet_store, "ROW_GROUP_ROWS", 16)  # many groups: statistics pruning is exercised
    s = open_store(str(tmp_path / "arc"), create=True)
    yield s
    s.close()


def _all(store) -> pd.DataFrame:
    return store.read_table("dia_object").sort_values(["dia_object_id", "validity_start"]).reset_index(drop=True)


def _files(store) -> dict:
    return json.loads((store.root / "manifest.json").read_text())["tables"]["dia_object"]["files"]


def test_closes_exactly_the_open_versions(pstore, make_dia_sources):
    v1 = _objects(pstore, make_dia_sources, 600, 60000.0)
    with pstore.transaction() as tx:
        tx.append("dia_object", v1)
    some = np.arange(1, 601, 4)
    with pstore.transaction() as tx:  # a second version of some objects, the first one closed
        assert tx.close_versions("dia_object", some, 60010.0) == some.size
        tx.append("dia_object", v1.filter(pa.array(np.isin(np.arange(1, 601), some))).set_column(
            1, "validity_start", pa.array(np.full(some.size, 60010.0))), check_keys=False)
    before = _all(pstore)
    ids = np.concatenate([np.arange(1, 601, 3), [10_000]])  # includes ids with history and an unknown id
    with pstore.transaction() as tx:
        n = tx.close_versions("dia_object", ids, 60020.0)
    after = _all(pstore)
    was_open = before["validity_end"].isna() & before["dia_object_id"].isin(ids)
    assert n == int(was_open.sum()) == 200
    expected = before.copy()
    expected.loc[was_open, "validity_end"] = 60020.0
    pd.testing.assert_frame_equal(after, expected)
    # every id has at most one open version, and the closed ones are no longer current
    cur = after[after["validity_end"].isna()]
    assert cur["dia_object_id"].is_unique and not cur["dia_object_id"].isin(ids).any()
    with pstore.transaction() as tx:
        assert tx.close_versions("dia_object", ids, 60030.0) == 0  # nothing open left to close
        assert tx.close_versions("dia_object", [], 60030.0) == 0
    pd.testing.assert_frame_equal(_all(pstore), after)
    # SQL (DuckDB over the manifest's files) and region reads see the same state
    n_open = pstore.sql("SELECT count(*) AS n FROM dia_object WHERE validity_end IS NULL")["n"].iloc[0]
    assert n_open == len(cur)
    with pstore.transaction() as tx:
        region = tx.query_region("dia_object", Cone(150.0, 0.0, 3.0), columns=["dia_object_id"], current_only=True)
    assert sorted(region["dia_object_id"]) == sorted(cur["dia_object_id"])


def test_touched_files_of_a_partition_become_one(pstore, make_dia_sources):
    """Each visit closes some versions and appends new ones: the files of a
    partition that held a closed version are rewritten as one file, so a
    partition gains at most one file per visit beyond those it leaves alone."""
    import pyarrow.parquet as pq

    v = _objects(pstore, make_dia_sources, 300, 60000.0)
    with pstore.transaction() as tx:
        tx.append("dia_object", v)
    rng = np.random.default_rng(1)
    start = 60000.0
    for visit in range(8):
        start += 1.0
        ids = np.unique(rng.choice(np.arange(1, 301), 60, replace=False))
        before = _files(pstore)
        untouched = []  # files without an open version of these ids (files of closed versions are left alone)
        for rel, m in before.items():
            f = pq.read_table(pstore.root / "dia_object" / "dataset" / rel, columns=["dia_object_id", "validity_end"])
            if not (np.isin(f["dia_object_id"].to_numpy(), ids) & f["validity_end"].is_null().to_numpy()).any():
                untouched.append(m["npix"])
        untouched = pd.Series(untouched, dtype="int64").value_counts()
        with pstore.transaction() as tx:
            assert tx.close_versions("dia_object", ids, start) == ids.size
            new = v.filter(pa.array(np.isin(np.arange(1, 301), ids)))
            new = new.set_column(1, "validity_start", pa.array(np.full(ids.size, start)))
            tx.append("dia_object", new, check_keys=False)
        after = pd.Series([m["npix"] for m in _files(pstore).values()]).value_counts()
        for npix, n in after.items():
            assert n <= untouched.get(npix, 0) + 2, (visit, npix)  # one rewritten file + the new versions
    cur = _all(pstore).query("validity_end != validity_end")
    assert sorted(cur["dia_object_id"]) == list(range(1, 301))
    assert len(_all(pstore)) == 300 + 8 * 60


def test_close_versions_written_in_the_same_transaction(pstore, make_dia_sources):
    v = _objects(pstore, make_dia_sources, 100, 60000.0)
    with pstore.transaction() as tx:
        tx.append("dia_object", v)
        assert tx.close_versions("dia_object", [1, 2, 3], 60001.0) == 3
        written = [rel for t, rel, _ in tx._new if t == "dia_object"]
    on_disk = {str(p.relative_to(pstore.root / "dia_object" / "dataset"))
               for p in (pstore.root / "dia_object" / "dataset").rglob("*.parquet")}
    assert on_disk == set(_files(pstore)) == set(written)  # the superseded files of the transaction are gone
    got = _all(pstore)
    assert got.loc[got["dia_object_id"] <= 3, "validity_end"].eq(60001.0).all()
    assert got.loc[got["dia_object_id"] > 3, "validity_end"].isna().all()


def test_rollback_keeps_versions_open(pstore, make_dia_sources):
    with pstore.transaction() as tx:
        tx.append("dia_object", _objects(pstore, make_dia_sources, 100, 60000.0))
    before, files = _all(pstore), _files(pstore)
    with pytest.raises(RuntimeError), pstore.transaction() as tx:
        tx.close_versions("dia_object", np.arange(1, 101), 60001.0)
        raise RuntimeError("abort")
    pd.testing.assert_frame_equal(_all(pstore), before)
    assert _files(pstore) == files
    on_disk = {str(p.relative_to(pstore.root / "dia_object" / "dataset"))
               for p in (pstore.root / "dia_object" / "dataset").rglob("*.parquet")}
    assert on_disk == set(files)


def test_unversioned_table_is_refused(pstore):
    with pstore.transaction() as tx, pytest.raises(ArchiveError, match="no versions"):
        tx.close_versions("dia_source", [1], 60000.0)
