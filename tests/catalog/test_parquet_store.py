"""Parquet-store specifics: HATS layout, the writer lock, crash safety, atomic visibility."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from archive.catalog.parquet_store import ParquetStore
from archive.catalog.backends import open_store
from archive.errors import ArchiveError, NotFoundError, StoreLockedError


@pytest.fixture
def pstore(tmp_path):
    s = open_store(str(tmp_path / "arc"), create=True)
    yield s
    s.close()


def _dataset_files(root, table):
    base = root / table / "dataset"
    return sorted(str(p.relative_to(base)) for p in base.rglob("*.parquet"))


def _kept(root, table):
    """What a dataset folder must hold: exactly the live files of the manifest."""
    return sorted(json.loads((root / "manifest.json").read_text())["tables"][table]["files"])


def test_layout_is_hats(pstore, make_dia_sources):
    pstore.write("dia_source", make_dia_sources(2000))
    root = pstore.root
    props = (root / "dia_source" / "hats.properties").read_text()
    assert "hats_col_healpix=healpix29" in props and "hats_nrows=2000" in props
    files = _dataset_files(root, "dia_source")
    assert files and all(f.startswith(f"Norder={pstore.order}/Dir=") for f in files)
    listed = json.loads((root / "manifest.json").read_text())["tables"]["dia_source"]["files"]
    assert sorted(listed) == files
    import hats

    cat = hats.read_hats(root / "dia_source")
    assert cat.catalog_info.total_rows == 2000
    assert len(cat.get_healpix_pixels()) == len({f.split("/")[2] for f in files})


def test_lsdb_reads_a_table(pstore, make_dia_sources):
    lsdb = pytest.importorskip("lsdb")
    df = make_dia_sources(500, seed=5)
    pstore.write("dia_source", df)
    got = lsdb.open_catalog(pstore.root / "dia_source").compute()
    assert sorted(got["dia_source_id"].tolist()) == df["dia_source_id"].tolist()


def test_open_errors(tmp_path):
    with pytest.raises(NotFoundError, match="no archive at"):
        open_store(str(tmp_path / "missing"))
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "x").write_text("x")
    with pytest.raises(NotFoundError, match="not an archive store"):
        open_store(str(tmp_path / "notastore"))
    with pytest.raises(ArchiveError, match="not empty"):
        open_store(str(tmp_path / "notastore"), create=True)
    open_store(str(tmp_path / "ok"), create=True)
    with pytest.raises(ArchiveError, match="already exists"):
        open_store(str(tmp_path / "ok"), create=True)


def test_second_writer_is_refused(pstore, make_dia_sources):
    with pstore.transaction():
        with pytest.raises(StoreLockedError, match=f"locked by PID {os.getpid()}"):
            pstore.write("dia_source", make_dia_sources(3))
        # a second process gets the same clear refusal through the CLI
        csv = pstore.root.parent / "rows.csv"
        make_dia_sources(3).to_csv(csv, index=False)
        proc = subprocess.run([sys.executable, "-m", "archive", "ingest", "catalog", "--repo",
                               str(pstore.root), "dia_source", str(csv)], capture_output=True, text=True)
        assert proc.returncode == 2
        assert f"locked by PID {os.getpid()}" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert pstore.count("dia_source") == 0
    pstore.write("dia_source", make_dia_sources(3))  # lock released
    assert pstore.count("dia_source") == 3


_WRITER = textwrap.dedent("""
    import sys, numpy as np, pandas as pd
    from archive.catalog.backends import open_store
    store = open_store(sys.argv[1])
    start = int(sys.argv[2]); n = int(sys.argv[3])
    rng = np.random.default_rng(start)
    for b in range(1000):
        ids = np.arange(start + b * n, start + (b + 1) * n, dtype=np.int64)
        df = pd.DataFrame({"dia_source_id": ids, "exposure_id": ids, "visit": ids,
            "detector": np.zeros(n, np.int32), "band": "g", "mjd": 60000.0,
            "ra": rng.uniform(10, 14, n), "dec": rng.uniform(-2, 2, n), "flags": np.zeros(n, np.int64)})
        store.write("dia_source", df)
        print(b, flush=True)
""")


def test_kill_9_mid_write_leaves_store_readable(pstore):
    n = 20000
    for trial, delay in enumerate([0.0, 0.03, 0.1]):
        before = pstore.count("dia_source")
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(pstore.root), str(10**9 * (trial + 1)),
                                 str(n)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one batch committed: the writer is in its write loop now
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        after = pstore.count("dia_source")
        assert after >= before and (after - before) % n == 0
        # every committed row is readable; SQL and the manifest agree
        assert pstore.sql("SELECT count(*) AS n FROM dia_source")["n"].iloc[0] == after
        # the next writer cleans up whatever the killed one left behind
        with pstore.transaction():
            pass
        assert _dataset_files(pstore.root, "dia_source") == _kept(pstore.root, "dia_source")
        assert not list((pstore.root / "dia_source").rglob(".*.tmp"))
        assert not [p for p in (pstore.root / "_txn").rglob("*") if p.is_file()]


def test_readers_see_whole_batches(pstore):
    n = 5000
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(pstore.root), "1", str(n)],
                            stdout=subprocess.PIPE, text=True)
    try:
        seen = set()
        proc.stdout.readline()
        deadline = time.time() + 60
        while time.time() < deadline and len(seen) < 4:
            c = pstore.count("dia_source")
            s = int(pstore.sql("SELECT count(*) AS n FROM dia_source")["n"].iloc[0])
            r = len(pstore.cone("dia_source", 12, 0, 3 * 3600, columns=["dia_source_id"]))
            for v in (c, s, r):
                assert v % n == 0, v
            seen.add(c)
        assert len(seen) > 1  # the writer did make progress while we read
    finally:
        proc.kill()
        proc.wait()


def test_partition_order_option(tmp_path, make_dia_sources):
    s = ParquetStore(tmp_path / "a", create=True, order=3)
    s.write("dia_source", make_dia_sources(100))
    assert all(f.startswith("Norder=3/") for f in _dataset_files(s.root, "dia_source"))
    with pytest.raises(ArchiveError, match="partition order"):
        ParquetStore(tmp_path / "b", create=True, order=20)


def test_compact_merges_partitions_and_keeps_rows(pstore, make_dia_sources):
    for b in range(4):
        pstore.write("dia_source", make_dia_sources(300, seed=b, start_id=1 + 1000 * b))
    def listed():
        return sorted(json.loads((pstore.root / "manifest.json").read_text())["tables"]["dia_source"]["files"])

    before = listed()
    rows = pstore.read_table("dia_source").sort_values("dia_source_id").reset_index(drop=True)
    removed = pstore.compact(["dia_source"])
    after = listed()
    assert removed["dia_source"] == len(before) - len(after) > 0
    assert len(after) == len({f.rsplit("/", 1)[0] for f in before})  # one file per partition
    again = pstore.read_table("dia_source").sort_values("dia_source_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(rows, again)
    from archive.sky.healpix import angular_separation_deg

    got = pstore.cone("dia_source", 150, 0, 3600)
    truth = angular_separation_deg(150, 0, rows["ra"], rows["dec"]) <= 1.0
    assert sorted(got["dia_source_id"]) == sorted(rows["dia_source_id"][truth]) and truth.sum() > 0
    import hats

    assert hats.read_hats(pstore.root / "dia_source").catalog_info.total_rows == 1200
