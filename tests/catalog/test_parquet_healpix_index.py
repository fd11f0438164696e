"""The in-memory healpix29 index of the Parquet store never changes a result."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from archive.catalog import parquet_store
from archive.catalog.parquet_store import _FileInfo, _HealpixIndex, _rows_in_ranges
from archive.catalog.backends import open_store
from archive.sky.regions import Box, Cone


@pytest.fixture
def store(tmp_path, monkeypatch, make_dia_sources):
    monkeypatch.setattr(parquet_store, "ROW_GROUP_ROWS", 16)  # many row groups per file
    s = open_store(str(tmp_path / "arc"), create=True, auto_compact=False)
    for b in range(4):
        s.write("dia_source", make_dia_sources(1500, seed=b, start_id=1 + 10_000 * b))
    yield s
    s.close()


def _without_index(store):
    real = store._healpix.get
    store._healpix.get = lambda *a: None
    return real


def _sorted(df):
    return df.sort_values("dia_source_id").reset_index(drop=True)


def test_rows_in_ranges_equals_brute_force():
    rng = np.random.default_rng(3)
    hp = np.sort(rng.integers(0, 1000, 500))
    for _ in range(50):
        edges = np.sort(rng.choice(1001, 2 * rng.integers(0, 6), replace=False)).reshape(-1, 2)
        got = _rows_in_ranges(hp, edges)
        inside = np.zeros(hp.size, bool)
        for lo, hi in edges:
            inside |= (hp >= lo) & (hp < hi)
        np.testing.assert_array_equal(got, np.flatnonzero(inside))


def test_indexed_cones_and_regions_equal_the_row_group_path(store):
    rng = np.random.default_rng(5)
    queries = [Cone(rng.uniform(147.5, 152.5), rng.uniform(-2.5, 2.5), 10 ** rng.uniform(-3, 0)) for _ in range(40)]
    queries += [Box(149.0, 150.5, -1.0, 0.7)]
    indexed = [_sorted(store.query_region("dia_source", q)) for q in queries]
    assert store._healpix._rows > 0  # the index was used and holds the files' healpix29
    real = _without_index(store)
    plain = [_sorted(store.query_region("dia_source", q)) for q in queries]
    store._healpix.get = real
    assert sum(len(a) for a in indexed) > 200
    for a, b in zip(indexed, plain):
        pd.testing.assert_frame_equal(a, b)
    # column subsets, healpix29 among them, come out in the asked order
    cols = ["band", "healpix29", "dia_source_id"]
    got = _sorted(store.query_region("dia_source", queries[-1], columns=cols))
    pd.testing.assert_frame_equal(got, plain[-1][cols])


def test_current_only_through_the_index(tmp_path, make_dia_sources):
    from tests.catalog.test_parquet_reads import make_objects

    s = open_store(str(tmp_path / "arc"), create=True)
    objs = make_objects(s, make_dia_sources, 400)
    s.write("dia_object", objs)
    with s.transaction() as tx:
        tx.close_versions("dia_object", np.arange(1, 201), 60010.0)
    cone = Cone(150.0, 0.0, 1.5)
    cur = _sorted_obj(s.query_region("dia_object", cone, current_only=True))
    every = _sorted_obj(s.query_region("dia_object", cone))
    assert len(every) > len(cur) > 0 and cur["validity_end"].isna().all()
    pd.testing.assert_frame_equal(cur, every[every["validity_end"].isna()].reset_index(drop=True))
    s.close()


def _sorted_obj(df):
    return df.sort_values(["dia_object_id", "validity_start"]).reset_index(drop=True)


def test_budget_is_kept_and_unsorted_files_fall_back(tmp_path, store):
    files = store._files(store.manifest(), "dia_source")
    schema = store._schema(store.table("dia_source"))
    entries = store.manifest()["tables"]["dia_source"]["files"]
    rows = [pq.read_metadata(f).num_rows for f in files]
    idx = _HealpixIndex(max_rows=2 * max(rows))  # room for two files: older ones are evicted
    for f, rel in zip(files, entries):
        meta = entries[rel]
        hp = idx.get(f, meta, _FileInfo(pq.read_metadata(f), schema))
        assert hp is not None and np.all(np.diff(hp) >= 0) and hp.size == meta["rows"]
        assert idx._rows <= idx.max_rows
    assert len(idx._entries) < len(files)  # older files were evicted to keep the budget
    # a file larger than the whole budget is not indexed
    assert _HealpixIndex(max_rows=1).get(files[0], entries[next(iter(entries))], _FileInfo(pq.read_metadata(files[0]), schema)) is None
    # a file not sorted by healpix29 is remembered as such (None): the caller reads it normally
    t = pq.read_table(files[0])
    shuffled = tmp_path / "shuffled.parquet"
    pq.write_table(t.take(pa.array(np.random.default_rng(1).permutation(t.num_rows))), shuffled)
    info = _FileInfo(pq.read_metadata(shuffled), schema)
    assert idx.get(shuffled, {"rows": t.num_rows}, info) is None
