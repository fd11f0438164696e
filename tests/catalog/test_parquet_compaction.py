"""Automatic size-tiered compaction of the Parquet store at commit.

Every test compares against something independent: a twin store written with
compaction off, numpy brute force over the generated rows, or the files on
disk read with ``pq.read_table``.  ``COMPACT_BASE_ROWS`` and ``ROW_GROUP_ROWS``
are made small so that a few thousand rows climb several tiers and span many
row groups.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from archive.catalog import parquet_store
from archive.catalog.parquet_store import compaction_tier, plan_merges
from archive.catalog.backends import open_store
from archive.catalog.validate import conform
from archive.errors import ArchiveError, ValidationError
from archive.sky.healpix import angular_separation_deg

FANOUT = 4
BASE = 8  # tier 0: < 32 rows, tier 1: < 128, tier 2: < 512, tier 3: < 2048 ...


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(parquet_store, "COMPACT_BASE_ROWS", BASE)
    monkeypatch.setattr(parquet_store, "ROW_GROUP_ROWS", 16)


def _open(path, **kw):
    return open_store(str(path), create=True, **kw)


def _manifest_files(store, table="dia_source") -> dict:
    return json.loads((store.root / "manifest.json").read_text())["tables"][table]["files"]


def _kept(store, table="dia_source") -> set:
    """The files a dataset folder must hold: exactly the live ones of the manifest."""
    return set(json.loads((store.root / "manifest.json").read_text())["tables"][table]["files"])


def _retired_listed(store, table="dia_source") -> set:
    """Files a commit took out but keeps (in _retired/) for readers of older manifests."""
    manifest = json.loads((store.root / "manifest.json").read_text())
    return {e[1] for e in manifest.get("retired", []) if e[0] == table}


def _disk_files(store, table="dia_source") -> set:
    base = store.root / table / "dataset"
    return {str(p.relative_to(base)) for p in base.rglob("*.parquet")}


def _retired_files(store, table="dia_source") -> set:
    base = store.root / "_retired" / table / "dataset"
    return {str(p.relative_to(base)) for p in base.rglob("*.parquet")}


def _staged_files(store) -> list:
    return [p for p in (store.root / "_txn").rglob("*") if p.is_file()]


def _per_partition(files: dict) -> dict:
    """npix -> [rows of each file]."""
    out: dict = {}
    for meta in files.values():
        out.setdefault(meta["npix"], []).append(meta["rows"])
    return out


def _assert_tiers_bounded(files: dict) -> None:
    """Fewer than FANOUT files per size tier in every partition."""
    for npix, rows in _per_partition(files).items():
        tiers = pd.Series([compaction_tier(r, FANOUT, BASE) for r in rows]).value_counts()
        assert tiers.max() < FANOUT, (npix, sorted(rows))


def _sorted(df: pd.DataFrame, keys=("dia_source_id",)) -> pd.DataFrame:
    return df.sort_values(list(keys)).reset_index(drop=True)


def _batch(make_dia_sources, b: int, n: int, box=(150.0, 0.0, 0.3)) -> pd.DataFrame:
    rng = np.random.default_rng(1000 + b)
    ra0, dec0, half = box
    return make_dia_sources(n, seed=b, start_id=1 + 100_000 * b,
                            ra=rng.uniform(ra0 - half, ra0 + half, n), dec=rng.uniform(dec0 - half, dec0 + half, n))


# -- the plan --------------------------------------------------------------
def test_plan_leaves_fewer_than_fanout_files_per_tier():
    rng = np.random.default_rng(3)
    for trial in range(300):
        rows = rng.integers(1, 5000, rng.integers(0, 40)).tolist()
        files = [(f"f{i}", r) for i, r in enumerate(rows)]
        groups = plan_merges(files, FANOUT, BASE)
        merged = [n for g in groups for n in g]
        assert len(merged) == len(set(merged))  # a file goes into one output at most
        size = dict(files)
        result = [size[n] for n, _ in files if n not in set(merged)] + [sum(size[n] for n in g) for g in groups]
        assert sum(result) == sum(rows)
        tiers = pd.Series([compaction_tier(r, FANOUT, BASE) for r in result], dtype=int).value_counts()
        assert not len(tiers) or tiers.max() < FANOUT
        assert all(len(g) >= FANOUT for g in groups)  # merges only when a tier is full


def test_plan_tiers_and_cascade():
    assert [compaction_tier(r, 4, 8) for r in (0, 1, 31, 32, 127, 128, 511, 512)] == [0, 0, 0, 1, 1, 2, 2, 3]
    assert plan_merges([("a", 10), ("b", 10), ("c", 10)], 4, 8) == []
    # four tier-0 files make a tier-1 file, which completes tier 1: one merge of all seven
    files = [("x", 40), ("y", 40), ("z", 40)] + [(f"s{i}", 10) for i in range(4)]
    (group,) = plan_merges(files, 4, 8)
    assert sorted(group) == sorted(n for n, _ in files)
    # a big file of another tier is left alone
    assert plan_merges([("big", 10_000)] + [(f"s{i}", 10) for i in range(4)], 4, 8) == [[f"s{i}" for i in range(4)]]


def test_plan_never_writes_more_than_max_rows():
    files = [(f"b{i}", 600) for i in range(4)] + [(f"s{i}", 10) for i in range(4)]
    # the four small files merge; the four 600-row files would make 2,400 rows: left alone
    assert plan_merges(files, 4, 8, max_rows=2000) == [[f"s{i}" for i in range(4)]]
    assert sorted(map(sorted, plan_merges(files, 4, 8))) == [[f"b{i}" for i in range(4)], [f"s{i}" for i in range(4)]]
    rng = np.random.default_rng(5)
    for trial in range(200):
        files = [(f"f{i}", int(r)) for i, r in enumerate(rng.integers(1, 3000, rng.integers(0, 30)))]
        size = dict(files)
        assert all(sum(size[n] for n in g) <= 5000 for g in plan_merges(files, 4, 8, max_rows=5000))


# -- many batches ------------------------------------------------------------
def test_many_batches_stay_bounded_and_read_like_an_uncompacted_store(tmp_path, small, make_dia_sources):
    auto = _open(tmp_path / "auto", compact_fanout=FANOUT)
    plain = _open(tmp_path / "plain", auto_compact=False)
    rng = np.random.default_rng(0)
    frames, rewritten, merges = [], 0, 0
    cones = [(150.0, 0.0, 600.0), (150.2, -0.1, 90.0), (149.8, 0.25, 30.0), (150.1, 0.1, 3.0)]
    for b in range(50):
        df = _batch(make_dia_sources, b, int(rng.integers(5, 40)))
        frames.append(df)
        plain.write("dia_source", df)
        with auto.transaction() as tx:
            tx.append("dia_source", conform(auto.table("dia_source"), df))
        rewritten += sum(rows for _, _, _, rows in tx.merges)
        merges += len(tx.merges)
        files = _manifest_files(auto)
        _assert_tiers_bounded(files)
        if b % 10 == 9:  # the same store object between batches: footer cache and new paths agree
            for ra, dec, r in cones:
                pd.testing.assert_frame_equal(_sorted(auto.cone("dia_source", ra, dec, r)),
                                              _sorted(plain.cone("dia_source", ra, dec, r)))
    allrows = pd.concat(frames, ignore_index=True)
    files = _manifest_files(auto)
    per_part = _per_partition(files)
    n_tiers = max(compaction_tier(sum(r), FANOUT, BASE) for r in per_part.values()) + 1
    assert max(len(r) for r in per_part.values()) <= (FANOUT - 1) * n_tiers
    assert len(files) < len(_manifest_files(plain)) / 4
    assert max(compaction_tier(r, FANOUT, BASE) for r in
               (m["rows"] for m in files.values())) >= 2  # files did climb tiers
    # logarithmic write amplification: each row rewritten about once per tier it climbed
    assert merges and rewritten <= len(allrows) * n_tiers
    # every row, exactly; cones against brute force
    pd.testing.assert_frame_equal(_sorted(auto.read_table("dia_source")), _sorted(plain.read_table("dia_source")))
    for ra, dec, r in cones:
        got = auto.cone("dia_source", ra, dec, r)
        truth = angular_separation_deg(ra, dec, allrows["ra"].to_numpy(), allrows["dec"].to_numpy()) <= r / 3600
        assert sorted(got["dia_source_id"]) == sorted(allrows["dia_source_id"][truth])
    # merged files are sorted by healpix29 and their manifest id ranges are right
    for rel, meta in files.items():
        tab = pq.read_table(auto.root / "dia_source" / "dataset" / rel)
        hp = tab.column("healpix29").to_numpy()
        assert (np.diff(hp) >= 0).all() and tab.num_rows == meta["rows"]
        ids = tab.column("dia_source_id").to_numpy()
        assert meta["id"] == [ids.min(), ids.max()] and meta["bytes"] == os.path.getsize(
            auto.root / "dia_source" / "dataset" / rel)
    # nothing on disk that the manifest does not list; SQL and HATS metadata agree
    assert _disk_files(auto) == _kept(auto)
    assert int(auto.sql("SELECT count(*) AS n FROM dia_source")["n"].iloc[0]) == len(allrows)
    import hats

    cat = hats.read_hats(auto.root / "dia_source")
    assert cat.catalog_info.total_rows == len(allrows)
    assert {p.pixel for p in cat.get_healpix_pixels()} == set(per_part)
    assert not list((auto.root / "_txn").glob("*.json"))
    # the key check still sees every stored key
    with pytest.raises(ValidationError, match="already stored"):
        auto.write("dia_source", frames[7].iloc[3:5])
    assert auto.count("dia_source") == len(allrows)
    # compact() still ends at one file per partition, same rows
    auto.compact(["dia_source"])
    assert all(len(r) == 1 for r in _per_partition(_manifest_files(auto)).values())
    pd.testing.assert_frame_equal(_sorted(auto.read_table("dia_source")), _sorted(plain.read_table("dia_source")))
    auto.close()
    plain.close()


def test_switch_store_and_transaction(tmp_path, small, make_dia_sources):
    off = _open(tmp_path / "off", auto_compact=False)
    for b in range(8):
        off.write("dia_source", _batch(make_dia_sources, b, 10))
    parts = _per_partition(_manifest_files(off))
    assert max(len(r) for r in parts.values()) == 8  # one file per batch, nothing merged
    with off.transaction(auto_compact=True) as tx:  # switched on for one transaction
        tx.append("dia_source", conform(off.table("dia_source"), _batch(make_dia_sources, 8, 10)))
    assert tx.merges
    _assert_tiers_bounded(_manifest_files(off))
    on = _open(tmp_path / "on", compact_fanout=FANOUT)
    for b in range(3):
        on.write("dia_source", _batch(make_dia_sources, b, 10))
    with on.transaction(auto_compact=False) as tx:  # switched off for one transaction
        tx.append("dia_source", conform(on.table("dia_source"), _batch(make_dia_sources, 3, 10)))
    assert not tx.merges and max(len(r) for r in _per_partition(_manifest_files(on)).values()) == 4
    capped = _open(tmp_path / "capped", compact_fanout=FANOUT, compact_max_rows=30)
    for b in range(8):  # 10-row files: four make 40 rows, more than the cap: never merged
        capped.write("dia_source", _batch(make_dia_sources, b, 10, box=(150.0, 0.0, 0.01)))
    assert sorted(m["rows"] for m in _manifest_files(capped).values()) == [10] * 8
    with pytest.raises(ArchiveError, match="compact_fanout"):
        open_store(str(tmp_path / "on"), compact_fanout=1)


def test_only_partitions_the_transaction_wrote_are_merged(tmp_path, small, make_dia_sources):
    s = _open(tmp_path / "arc", auto_compact=False)
    for b in range(6):  # two fields in different partitions, six files each
        s.write("dia_source", _batch(make_dia_sources, b, 10, box=(150.0, 0.0, 0.1)))
        s.write("dia_source", _batch(make_dia_sources, 50 + b, 10, box=(30.0, 40.0, 0.1)))
    before = _manifest_files(s)
    near_30 = {m["npix"] for m in before.values() if m["id"][0] > 5_000_000}  # batches 50..55
    with s.transaction(auto_compact=True) as tx:
        tx.append("dia_source", conform(s.table("dia_source"), _batch(make_dia_sources, 6, 10, box=(150.0, 0.0, 0.1))))
    written = {npix for _, npix, _, _ in tx.merges}
    assert written and not written & near_30
    after = _manifest_files(s)
    assert {r: m for r, m in before.items() if m["npix"] in near_30} == \
        {r: m for r, m in after.items() if m["npix"] in near_30}


def test_non_positional_table_is_merged_too(tmp_path, small):
    s = _open(tmp_path / "arc", compact_fanout=FANOUT)
    for b in range(30):
        s.write("provenance", pd.DataFrame({
            "provenance_id": np.arange(b * 10, b * 10 + 10, dtype=np.int64)[::-1],
            "code_version": "0.1", "step": f"s{b}", "config": "{}", "config_hash": "h", "inputs": "[]",
            "created": pd.Timestamp("2024-01-01", tz="UTC")}))
        _assert_tiers_bounded(_manifest_files(s, "provenance"))
    files = _manifest_files(s, "provenance")
    assert len(files) < 10 and _disk_files(s, "provenance") == _kept(s, "provenance")
    assert sorted(s.read_table("provenance")["provenance_id"]) == list(range(300))
    assert s.get("provenance", [0, 155, 299])["step"].tolist() == ["s0", "s15", "s29"]
    with pytest.raises(ValidationError, match="already stored"):
        s.write("provenance", pd.DataFrame({"provenance_id": [42], "code_version": "0.1", "step": "x",
                                            "config": "{}", "config_hash": "h", "inputs": "[]",
                                            "created": pd.Timestamp("2024-01-01", tz="UTC")}))


# -- versions and composite keys ---------------------------------------------
def _objects(store, make_dia_sources, ids: np.ndarray, start_mjd: float) -> pa.Table:
    from archive.catalog.summaries import new_objects
    from archive.catalog.validate import conform

    rng = np.random.default_rng(int(ids[0]))
    src = make_dia_sources(len(ids), seed=int(ids[0]), ra=rng.uniform(149.8, 150.2, len(ids)),
                           dec=rng.uniform(-0.2, 0.2, len(ids)))
    src["dia_object_id"] = ids
    src["healpix29"] = 0
    return conform(store.table("dia_object"), new_objects(src, start_mjd), "test objects")


def test_versioned_objects_keep_validity_intervals(tmp_path, small, make_dia_sources):
    """Visits that add objects and new versions of old ones (close + append, composite key
    (dia_object_id, validity_start)): merged and unmerged stores hold the same versions."""
    stores = [_open(tmp_path / "auto", compact_fanout=FANOUT), _open(tmp_path / "plain", auto_compact=False)]
    rng = np.random.default_rng(1)
    known = np.array([], dtype=np.int64)
    for visit in range(24):
        mjd = 60000.0 + visit
        fresh = np.arange(1 + 20 * visit, 1 + 20 * visit + 20, dtype=np.int64)
        again = rng.choice(known, size=min(8, known.size), replace=False) if known.size else known
        rows_new, rows_again = (_objects(stores[0], make_dia_sources, fresh, mjd),
                                _objects(stores[0], make_dia_sources, again, mjd) if again.size else None)
        for s in stores:
            with s.transaction() as tx:
                if again.size:
                    assert tx.close_versions("dia_object", again, mjd) == again.size
                    tx.append("dia_object", rows_again)  # key check on: same id, new validity_start
                tx.append("dia_object", rows_new)
        known = np.concatenate([known, fresh])
        _assert_tiers_bounded(_manifest_files(stores[0], "dia_object"))
    keys = ("dia_object_id", "validity_start")
    auto, plain = (_sorted(s.read_table("dia_object"), keys) for s in stores)
    pd.testing.assert_frame_equal(auto, plain)
    assert (auto.groupby("dia_object_id")["validity_end"].apply(lambda e: e.isna().sum()) == 1).all()
    assert len(_manifest_files(stores[0], "dia_object")) < len(_manifest_files(stores[1], "dia_object"))
    for current_only in (False, True):
        a, p = (s.cone("dia_object", 150.0, 0.0, 900.0, current_only=current_only) for s in stores)
        pd.testing.assert_frame_equal(_sorted(a, keys), _sorted(p, keys))
        assert len(a) and (a["validity_end"].isna().all() if current_only else a["validity_end"].notna().any())
    # the composite key check: an existing (id, validity_start) is refused, nothing written
    n = stores[0].count("dia_object")
    dup = _objects(stores[0], make_dia_sources, np.array([5], dtype=np.int64), 60000.0)
    with pytest.raises(ValidationError, match="already stored"):
        with stores[0].transaction() as tx:
            tx.append("dia_object", dup)
    assert stores[0].count("dia_object") == n
    for s in stores:
        s.close()


# -- atomicity ---------------------------------------------------------------
#: three fields far apart: a batch puts 10 rows (tier 0) into each of three partitions
CENTRES = [(150.0, 0.0), (30.0, 40.0), (250.0, -30.0)]


def _three_fields(make_dia_sources, b: int) -> pd.DataFrame:
    rng = np.random.default_rng(b)
    ra = np.concatenate([rng.uniform(r - 0.01, r + 0.01, 10) for r, _ in CENTRES])
    dec = np.concatenate([rng.uniform(d - 0.01, d + 0.01, 10) for _, d in CENTRES])
    return make_dia_sources(30, seed=b, start_id=1 + 1000 * b, ra=ra, dec=dec)


def _state(store) -> tuple:
    return (_manifest_files(store), _sorted(store.read_table("dia_source")))


def test_exception_mid_merge_leaves_the_previous_state(tmp_path, small, make_dia_sources, monkeypatch):
    s = _open(tmp_path / "arc", compact_fanout=FANOUT)
    for b in range(3):
        s.write("dia_source", _three_fields(make_dia_sources, b))
    files, rows = _state(s)
    assert sorted(len(r) for r in _per_partition(files).values()) == [3, 3, 3]  # all merge at the next batch
    monkeypatch.setattr(parquet_store, "WRITE_THREADS", 1)
    real = parquet_store.ParquetTransaction._merge_files
    calls = []

    def failing(self, *job):
        if calls:  # the first partition's merged file is written, then the second fails
            raise OSError("disk full (test)")
        calls.append(job)
        real(self, *job)

    monkeypatch.setattr(parquet_store.ParquetTransaction, "_merge_files", failing)
    batch = _three_fields(make_dia_sources, 3)
    with pytest.raises(OSError, match="disk full"):
        s.write("dia_source", batch)
    assert calls
    after_files, after_rows = _state(s)
    assert after_files == files
    pd.testing.assert_frame_equal(after_rows, rows)
    assert _disk_files(s) == _kept(s) == set(files)  # batch files, merged output gone
    assert not list((s.root / "dia_source").rglob(".*.tmp")) and not _staged_files(s)
    monkeypatch.setattr(parquet_store.ParquetTransaction, "_merge_files", real)
    s.write("dia_source", batch)  # lock released; the batch's keys are new again
    assert s.count("dia_source") == len(rows) + len(batch)
    _assert_tiers_bounded(_manifest_files(s))
    assert _disk_files(s) == _kept(s)


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np, pandas as pd
    from archive.catalog import parquet_store
    from archive.catalog.backends import open_store
    where = sys.argv[2]
    parquet_store.COMPACT_BASE_ROWS = 8
    parquet_store.WRITE_THREADS = 1
    T = parquet_store.ParquetTransaction
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "mid-merge":  # after the first merged file is written
        real = T._merge_files
        def merge(self, *job):
            real(self, *job)
            die()
        T._merge_files = merge
    elif where == "before-commit":  # all merged, drops journalled, manifest not replaced
        real_tiers = T._merge_tiers
        def tiers(self):
            real_tiers(self)
            die()
        T._merge_tiers = tiers
    elif where == "mid-publish":  # some files moved aside / into place, manifest not replaced
        real_replace = os.replace
        count = [0]
        def replace(src, dst):
            real_replace(src, dst)
            count[0] += 1
            if count[0] == 4:
                die()
        os.replace = replace
        real_publish = T._publish
        def publish(self, drops):
            assert drops  # the merge drops the partitions' files
            real_publish(self, drops)
            die()
        T._publish = publish
    elif where.startswith("after-commit"):  # manifest replaced, nothing unlinked yet
        T._remove = lambda self, files: die()
    # after-commit-0: dropped files are to be unlinked at once (no retention)
    store = open_store(sys.argv[1], retain_seconds=0.0 if where.endswith("-0") else 60.0)
    n = 30  # 10 rows in each of the test's three fields
    rng = np.random.default_rng(7)
    ids = np.arange(900_000, 900_000 + n, dtype=np.int64)
    ra = np.repeat([150.0, 30.0, 250.0], 10) + rng.uniform(-0.01, 0.01, n)
    dec = np.repeat([0.0, 40.0, -30.0], 10) + rng.uniform(-0.01, 0.01, n)
    store.write("dia_source", pd.DataFrame({"dia_source_id": ids, "exposure_id": ids, "visit": ids,
        "detector": np.zeros(n, np.int32), "band": "g", "mjd": 60000.0,
        "ra": ra, "dec": dec, "flags": np.zeros(n, np.int64)}))
    print("survived", flush=True)
""")


@pytest.mark.parametrize("where", ["mid-merge", "before-commit", "mid-publish", "after-commit", "after-commit-0"])
def test_kill_9_during_merge(tmp_path, small, make_dia_sources, where):
    s = _open(tmp_path / "arc", compact_fanout=FANOUT)
    for b in range(3):
        s.write("dia_source", _three_fields(make_dia_sources, b))
    files, rows = _state(s)
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(s.root), where], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL and "survived" not in proc.stdout, proc.stderr
    committed = where.startswith("after-commit")  # mid-publish: not committed
    # readers see the old state or, once the manifest was replaced, the whole new one
    got_files, got_rows = _state(s)
    assert len(got_rows) == len(rows) + 30 * committed
    assert (got_files == files) != committed
    assert int(s.sql("SELECT count(*) AS n FROM dia_source")["n"].iloc[0]) == len(got_rows)
    pd.testing.assert_frame_equal(got_rows[got_rows["dia_source_id"] < 900_000].reset_index(drop=True), rows)
    if where in ("mid-merge", "before-commit"):
        # nothing uncommitted reached the dataset folder: its files are staged in _txn/
        assert _disk_files(s) == set(got_files) and _staged_files(s)
    else:
        assert list((s.root / "_txn").glob("*.json"))  # a journal names what the writer moved
    with s.transaction():  # the next writer cleans up (or finishes / undoes the publish)
        pass
    assert _disk_files(s) == _kept(s) and _retired_files(s) == _retired_listed(s)
    assert not list((s.root / "dia_source").rglob(".*.tmp")) and not _staged_files(s)
    pd.testing.assert_frame_equal(_sorted(s.read_table("dia_source")), got_rows)
    if committed:
        _assert_tiers_bounded(_manifest_files(s))


# -- retention of dropped files ------------------------------------------------
def test_a_reader_of_the_previous_manifest_still_reads_after_a_merge(tmp_path, small, make_dia_sources):
    s = _open(tmp_path / "arc", compact_fanout=FANOUT)
    for b in range(3):
        s.write("dia_source", _three_fields(make_dia_sources, b))
    old = s.manifest()  # a reader took this manifest and is still reading its files
    t = s.table("dia_source")
    from archive.sky.regions import Cone

    cone = Cone(150.0, 0.0, 120.0 / 3600)
    before = s._region_arrow(old, t, cone, ["dia_source_id"]).column(0).to_pylist()
    s.write("dia_source", _three_fields(make_dia_sources, 3))  # merges every partition
    assert not set(old["tables"]["dia_source"]["files"]) & set(_manifest_files(s))
    assert sorted(s._region_arrow(old, t, cone, ["dia_source_id"]).column(0).to_pylist()) == sorted(before)
    assert len(s.cone("dia_source", 150.0, 0.0, 120.0)) == len(before) + 10


def test_retired_files_are_unlinked_after_the_retention(tmp_path, small, make_dia_sources):
    s = _open(tmp_path / "arc", compact_fanout=FANOUT, retain_seconds=0.5)
    for b in range(4):
        s.write("dia_source", _three_fields(make_dia_sources, b))
    retired = json.loads((s.root / "manifest.json").read_text())["retired"]
    assert len(retired) == 9 and all(e[0] == "dia_source" for e in retired)  # 3 partitions x 3 files
    # out of the dataset folder at once, kept aside for readers of the previous manifest
    assert _disk_files(s) == _kept(s) and len(_disk_files(s)) == 3
    assert _retired_files(s) == _retired_listed(s) and len(_retired_files(s)) == 9
    with s.transaction():  # too early: kept
        pass
    assert len(_retired_files(s)) == 9
    import time

    time.sleep(0.6)
    with s.transaction():  # a commit after the retention unlinks them, even one that writes nothing
        pass
    assert _disk_files(s) == set(_manifest_files(s)) and len(_disk_files(s)) == 3 and not _retired_files(s)
    assert json.loads((s.root / "manifest.json").read_text())["retired"] == []
    s.retain_seconds = 0.0  # no retention: gone at the commit that drops them
    for b in range(4, 8):  # the fourth merges each partition's four new files
        s.write("dia_source", _three_fields(make_dia_sources, b))
    assert _disk_files(s) == set(_manifest_files(s)) and len(_disk_files(s)) == 6 and not _retired_files(s)
    assert json.loads((s.root / "manifest.json").read_text())["retired"] == []
