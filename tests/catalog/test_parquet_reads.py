"""Parquet read path: footer cache, row-group pruning and two-phase reads never change a result.

Each test compares the store against an independent reference: the files the
manifest lists, read whole with ``pq.read_table`` and filtered with numpy.
Row groups are made tiny (``ROW_GROUP_ROWS`` patched) so that every query
spans many groups and the pruning is really exercised.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from archive.catalog import parquet_store
from archive.catalog.backends import open_store
from archive.catalog.store import frame_from_arrow
from archive.errors import ArchiveError, ValidationError
from archive.sky.healpix import angular_separation_deg
from archive.sky.regions import Box, Cone


def make_objects(store, make_dia_sources, n: int, seed: int = 0, start_mjd: float = 60000.0) -> pa.Table:
    """``n`` valid dia_object versions (one source each) within 2 deg of (150, 0)."""
    from archive.catalog.summaries import new_objects
    from archive.catalog.validate import conform

    rng = np.random.default_rng(seed)
    src = make_dia_sources(n, seed=seed, ra=rng.uniform(148, 152, n), dec=rng.uniform(-2, 2, n))
    src["dia_object_id"] = np.arange(1, n + 1, dtype=np.int64)
    src["healpix29"] = 0  # recomputed by conform
    return conform(store.table("dia_object"), new_objects(src, start_mjd), "test objects")


@pytest.fixture
def small_groups(monkeypatch):
    monkeypatch.setattr(parquet_store, "ROW_GROUP_ROWS", 16)


@pytest.fixture
def loaded(tmp_path, small_groups, make_dia_sources):
    """Four batches over the same field: several files per partition, ~10 row groups per file
    (automatic compaction off: these tests are about reading across files)."""
    s = open_store(str(tmp_path / "arc"), create=True, auto_compact=False)
    for b in range(4):
        s.write("dia_source", make_dia_sources(1500, seed=b, start_id=1 + 10_000 * b))
    yield s
    s.close()


def _reference(store, table="dia_source") -> pd.DataFrame:
    """Every committed row, read without the store's reader."""
    files = json.loads((store.root / "manifest.json").read_text())["tables"][table]["files"]
    parts = [pq.read_table(store.root / table / "dataset" / rel) for rel in files]
    df = frame_from_arrow(pa.concat_tables(parts))  # the store's own Arrow -> pandas conversion
    return df.sort_values(parts[0].schema.names[0]).reset_index(drop=True)


def _sorted(df: pd.DataFrame, key="dia_source_id") -> pd.DataFrame:
    return df.sort_values(key).reset_index(drop=True)


def test_files_have_many_row_groups(loaded):
    files = loaded._files(loaded.manifest(), "dia_source")
    assert len(files) > 4
    assert np.median([pq.read_metadata(f).num_row_groups for f in files]) >= 5


def test_cones_equal_brute_force_full_rows(loaded):
    ref = _reference(loaded)
    ra, dec = ref["ra"].to_numpy(), ref["dec"].to_numpy()
    rng = np.random.default_rng(11)
    nonempty = 0
    for _ in range(60):
        ra0, dec0 = rng.uniform(147.5, 152.5), rng.uniform(-2.5, 2.5)
        r = 10 ** rng.uniform(0.5, 3.7)
        got = _sorted(loaded.cone("dia_source", ra0, dec0, r).drop(columns="distance_arcsec"))
        truth = _sorted(ref[angular_separation_deg(ra0, dec0, ra, dec) * 3600 <= r])
        pd.testing.assert_frame_equal(got, truth[got.columns], check_dtype=False)
        nonempty += len(truth) > 0
    assert nonempty > 20


def test_column_subsets_and_regions(loaded):
    ref = _reference(loaded)
    box = Box(149.0, 150.5, -1.0, 0.7)
    truth = _sorted(ref[box.contains(ref["ra"].to_numpy(), ref["dec"].to_numpy())])
    for cols in (["dia_source_id"], ["psf_flux", "dia_source_id"], ["band", "healpix29", "dia_source_id"]):
        got = _sorted(loaded.query_region("dia_source", box, columns=cols))
        assert list(got.columns) == cols
        pd.testing.assert_frame_equal(got, truth[cols], check_dtype=False)


def test_cached_reads_equal_uncached(loaded):
    queries = [(150.0, 0.0, 900.0), (148.7, 1.2, 120.0), (151.3, -1.9, 2000.0)]
    first = [loaded.cone("dia_source", *q) for q in queries]
    misses = loaded._footers.misses
    again = [loaded.cone("dia_source", *q) for q in queries]
    assert loaded._footers.misses == misses  # every footer came from the cache
    fresh = open_store(str(loaded.root))  # a new store: nothing cached
    cold = [fresh.cone("dia_source", *q) for q in queries]
    assert fresh._footers.misses > 0
    for a, b, c in zip(first, again, cold):
        pd.testing.assert_frame_equal(a, b)
        pd.testing.assert_frame_equal(a, c)
    ids = [5, 10_007, 29_999, 31_500, 123_456]
    pd.testing.assert_frame_equal(_sorted(loaded.get("dia_source", ids)), _sorted(fresh.get("dia_source", ids)))


def test_file_list_change_is_seen(loaded, make_dia_sources):
    before = loaded.cone("dia_source", 150.0, 0.0, 3600.0)
    old_files = set(map(str, loaded._files(loaded.manifest(), "dia_source")))
    loaded.compact(["dia_source"])
    new_files = set(map(str, loaded._files(loaded.manifest(), "dia_source")))
    assert not old_files & new_files
    after = loaded.cone("dia_source", 150.0, 0.0, 3600.0)
    pd.testing.assert_frame_equal(_sorted(before), _sorted(after))
    # a batch written by another store object is seen at once
    other = open_store(str(loaded.root))
    other.write("dia_source", make_dia_sources(200, seed=9, start_id=900_000,
                                               ra=np.full(200, 150.0), dec=np.full(200, 0.0)))
    grown = loaded.cone("dia_source", 150.0, 0.0, 3600.0)
    assert len(grown) == len(before) + 200


def test_tiny_cache_still_exact(loaded):
    loaded._footers.max_files = 2  # constant eviction
    ref = _reference(loaded)
    for ra0, dec0, r in [(150.0, 0.0, 3000.0), (149.0, -1.0, 1500.0), (151.5, 1.5, 2500.0)]:
        got = set(loaded.cone("dia_source", ra0, dec0, r, columns=["dia_source_id"])["dia_source_id"])
        d = angular_separation_deg(ra0, dec0, ref["ra"].to_numpy(), ref["dec"].to_numpy()) * 3600
        assert got == set(ref["dia_source_id"][d <= r])
    assert len(loaded._footers._entries) <= 2


def test_get_and_select_in_prune_but_find_everything(loaded):
    ref = _reference(loaded)
    rng = np.random.default_rng(2)
    ids = np.concatenate([rng.choice(ref["dia_source_id"], 40, replace=False), [0, 10_000_000]])
    got = _sorted(loaded.get("dia_source", ids))
    pd.testing.assert_frame_equal(got, _sorted(ref[ref["dia_source_id"].isin(ids)]), check_dtype=False)
    exposures = [3, 17, 44]
    with loaded.transaction() as tx:
        sel = _sorted(tx.select_in("dia_source", "exposure_id", exposures, columns=["dia_source_id", "band"]))
        by_band = tx.select_in("dia_source", "band", ["g"], columns=["dia_source_id"])
    truth = _sorted(ref[ref["exposure_id"].isin(exposures)])
    pd.testing.assert_frame_equal(sel, truth[["dia_source_id", "band"]], check_dtype=False)
    assert set(by_band["dia_source_id"]) == set(ref["dia_source_id"][ref["band"] == "g"])


def test_current_only_skips_closed_versions(tmp_path, small_groups, make_dia_sources):
    """Row groups whose validity_end has no null hold no current version; the
    null-count pruning must still return every open version."""
    s = open_store(str(tmp_path / "arc"), create=True)
    objs = make_objects(s, make_dia_sources, 400)
    with s.transaction() as tx:
        tx.append("dia_object", objs, check_keys=False)
    closed = objs.column("dia_object_id").to_numpy()[::3]
    with s.transaction() as tx:
        assert tx.close_versions("dia_object", closed, 60001.0) == closed.size
    cone = Cone(150.0, 0.0, 3.0)
    with s.transaction() as tx:
        cur = tx.query_region("dia_object", cone, columns=["dia_object_id", "validity_end"], current_only=True)
        every = tx.query_region("dia_object", cone, columns=["dia_object_id", "validity_end"])
    assert cur["validity_end"].isna().all()
    assert set(cur["dia_object_id"]) == set(objs.column("dia_object_id").to_numpy()) - set(closed)
    assert len(every) == 400


def test_manifest_keeps_id_ranges_and_key_check_skips_files(tmp_path, make_dia_sources):
    s = open_store(str(tmp_path / "arc"), create=True)
    s.write("dia_source", make_dia_sources(3000, seed=1, start_id=1))
    files = s.manifest()["tables"]["dia_source"]["files"]
    for rel, meta in files.items():
        ids = pq.read_table(s.root / "dia_source" / "dataset" / rel, columns=["dia_source_id"])["dia_source_id"]
        assert meta["id"] == [ids.to_numpy().min(), ids.to_numpy().max()]
        assert meta["bytes"] == (s.root / "dia_source" / "dataset" / rel).stat().st_size
    fresh = open_store(str(tmp_path / "arc"))
    fresh.write("dia_source", make_dia_sources(3000, seed=2, start_id=3001))  # new ids: no file opened
    assert fresh._footers.misses == 0
    with pytest.raises(ValidationError, match=r"already stored .*e\.g\. \(2999,\)"):
        fresh.write("dia_source", make_dia_sources(1, seed=3, start_id=2999))
    assert fresh.count("dia_source") == 6000


def test_store_without_id_ranges_still_checks_keys(tmp_path, make_dia_sources):
    """Manifests written before id ranges were kept: every file is a candidate."""
    s = open_store(str(tmp_path / "arc"), create=True)
    s.write("dia_source", make_dia_sources(500, seed=1))
    path = s.root / "manifest.json"
    m = json.loads(path.read_text())
    for meta in m["tables"]["dia_source"]["files"].values():
        del meta["id"], meta["bytes"]
    path.write_text(json.dumps(m))
    old = open_store(str(tmp_path / "arc"))
    with pytest.raises(ValidationError, match="already stored"):
        old.write("dia_source", make_dia_sources(5, seed=2, start_id=498))
    old.write("dia_source", make_dia_sources(5, seed=2, start_id=501))
    assert len(old.cone("dia_source", 150.0, 0.0, 3 * 3600)) == 505


def test_composite_key_check(tmp_path, make_dia_sources):
    s = open_store(str(tmp_path / "arc"), create=True)
    objs = make_objects(s, make_dia_sources, 50)
    with s.transaction() as tx:
        tx.append("dia_object", objs)
    later = objs.set_column(objs.schema.get_field_index("validity_start"), "validity_start",
                            pa.array(np.full(50, 60002.0)))
    with s.transaction() as tx:  # same ids, new validity_start: a new version, allowed
        tx.append("dia_object", later)
    with pytest.raises(ValidationError, match="already stored"), s.transaction() as tx:
        tx.append("dia_object", objs.slice(3, 2))
    assert s.count("dia_object") == 100


def test_damaged_manifest_is_named(tmp_path, make_dia_sources):
    s = open_store(str(tmp_path / "arc"), create=True)
    s.write("dia_source", make_dia_sources(100))
    path = s.root / "manifest.json"
    m = json.loads(path.read_text())
    meta = next(iter(m["tables"]["dia_source"]["files"].values()))
    meta["rows"] += 1
    path.write_text(json.dumps(m))
    with pytest.raises(ArchiveError, match="manifest.json says"):
        open_store(str(tmp_path / "arc")).read_table("dia_source")


def test_reads_files_of_older_writer_settings(tmp_path, make_dia_sources, monkeypatch):
    """zstd files with dictionaries and 4k groups (earlier stores) read the same."""
    monkeypatch.setattr(parquet_store, "COMPRESSION", "zstd")
    monkeypatch.setattr(parquet_store, "_writer_options", lambda schema: {
        "row_group_size": 4096, "compression": "zstd", "write_statistics": True})
    s = open_store(str(tmp_path / "arc"), create=True)
    df = make_dia_sources(2000, seed=4)
    s.write("dia_source", df)
    monkeypatch.undo()
    got = _sorted(open_store(str(tmp_path / "arc")).cone("dia_source", 150.0, 0.0, 2 * 3600))
    d = angular_separation_deg(150.0, 0.0, df["ra"].to_numpy(), df["dec"].to_numpy()) * 3600
    assert got["dia_source_id"].tolist() == sorted(df["dia_source_id"][d <= 2 * 3600])
