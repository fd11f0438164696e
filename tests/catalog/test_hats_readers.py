"""What the field's own readers see in a Parquet archive: hats, LSDB and DuckDB's
``read_parquet`` on the dataset folders count the archive's rows and find its cones,
after ingest, replace, association updates and compaction; LSDB cross-matches near
partition edges find the pairs the archive finds (margin catalogs); the HATS
metadata is valid (hats' strict validation) and current after every commit."""

from __future__ import annotations

import json
import shutil

import duckdb
import hats
import healpy
import lsdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hats.io.validation import is_valid_catalog, is_valid_collection
from hats.pixel_math import get_margin

from archive.catalog import parquet_store
from archive.catalog.backends import open_store
from archive.catalog.dia_ingest import ingest_dia_sources
from archive.catalog.matched_ingest import ingest_sources
from archive.catalog.validate import conform
from archive.sky.healpix import radec_to_healpix29
from archive.sky.regions import Cone

ARCSEC = 1.0 / 3600.0
ORDER = 5
# the field straddles RA 0/360, the equator and so HEALPix base-pixel (and order-5
# partition) borders: many rows lie within the margin threshold of another partition
RA0, DEC0, HALF = 0.0, 0.0, 0.15


def _field_positions(rng, n, half=HALF):
    ra = np.mod(RA0 + rng.uniform(-half, half, n), 360.0)
    dec = DEC0 + rng.uniform(-half, half, n)
    return ra, dec


def _exposures(ids, seed):
    rng = np.random.default_rng(seed)
    n = len(ids)
    ra, dec = _field_positions(rng, n, 0.05)
    return pd.DataFrame({"exposure_id": np.asarray(ids, np.int64), "visit": np.asarray(ids, np.int64),
                         "detector": np.zeros(n, np.int32), "band": "r", "mjd_mid": 60000.0 + np.arange(n),
                         "exp_time": np.full(n, 30.0 + seed), "ra": ra, "dec": dec, "status": "ok",
                         "quality_flags": np.zeros(n, np.int64)})


def _stars(seed=3, n=150):
    rng = np.random.default_rng(seed)
    return _field_positions(rng, n)


def _epoch(stars, j, seed, shift=0.0):
    """One epoch of ``source`` rows of the stars (exposure 100 + j)."""
    ra, dec = stars
    rng = np.random.default_rng(seed)
    n = len(ra)
    return pd.DataFrame({
        "source_id": (j + 1) * 1_000_000 + np.arange(n) + int(shift * 1000), "exposure_id": np.full(n, 100 + j),
        "visit": np.full(n, 100 + j), "detector": np.zeros(n, np.int32), "band": "r",
        "mjd": np.full(n, 60000.0 + j), "ra": np.mod(ra + rng.normal(0, 0.1, n) * ARCSEC + shift * ARCSEC, 360.0),
        "dec": dec + rng.normal(0, 0.1, n) * ARCSEC, "ra_err": np.full(n, 0.1 * ARCSEC, np.float32),
        "dec_err": np.full(n, 0.1 * ARCSEC, np.float32), "psf_flux": rng.normal(1e4, 100, n),
        "psf_flux_err": np.full(n, 100.0), "flags": np.zeros(n, np.int64)})


def _visit(stars, v, start_id, mjd):
    """DIASources of a visit: most stars detected again (1 in 10 missing)."""
    ra, dec = stars
    rng = np.random.default_rng(v)
    keep = rng.random(len(ra)) > 0.1
    n = int(keep.sum())
    return pd.DataFrame({
        "dia_source_id": np.arange(start_id, start_id + n, dtype=np.int64), "exposure_id": np.full(n, 500 + v),
        "visit": np.full(n, 500 + v), "detector": np.zeros(n, np.int32), "band": "g", "mjd": np.full(n, mjd),
        "ra": np.mod(ra[keep] + rng.normal(0, 0.05, n) * ARCSEC, 360.0),
        "dec": dec[keep] + rng.normal(0, 0.05, n) * ARCSEC,
        "psf_flux": rng.normal(500, 20, n), "psf_flux_err": np.full(n, 20.0), "flags": np.zeros(n, np.int64)})


def _key(t) -> list[str]:
    return list(t.primary_key)


def _rows(df: pd.DataFrame, cols) -> list[tuple]:
    """The rows' values of ``cols`` as Python tuples (no common dtype: ids stay exact)."""
    return list(zip(*(pd.Series(df[c]).tolist() for c in cols)))


def _sorted_keys(df: pd.DataFrame, cols) -> list[tuple]:
    return sorted(_rows(df, cols))


def _glob(store, table: str) -> str:
    return f"{store.root}/{table}/dataset/**/*.parquet"


def _duck(store, table: str, cols) -> pd.DataFrame:
    sel = ", ".join(f'"{c}"' for c in cols)
    return duckdb.sql(f"SELECT {sel} FROM read_parquet('{_glob(store, table)}')").df()


def _cones(store, table: str):
    """Cones around the first and last stored rows, at a corner of the first row's
    partition, and across RA 0 (empty unless the rows are there)."""
    rows = store.read_table(table, columns=["ra", "dec", "healpix29"])
    if not len(rows):
        return []
    npix = int(rows["healpix29"].iloc[0]) >> (2 * (29 - store.order))
    corner = healpy.vec2ang(healpy.boundaries(1 << store.order, npix, step=1, nest=True)[:, 0], lonlat=True)
    return [(float(corner[0][0]), float(corner[1][0]), 300.0), (359.95, 0.05, 200.0),
            (float(rows["ra"].iloc[0]), float(rows["dec"].iloc[0]), 30.0),
            (float(rows["ra"].iloc[-1]), float(rows["dec"].iloc[-1]), 120.0)]


def _sep_arcsec(ra1, dec1, ra2, dec2):
    ra1, dec1, ra2, dec2 = map(np.radians, (ra1, dec1, ra2, dec2))
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.minimum(h, 1.0)))) * 3600


def _expected_margin(store, table: str) -> set[tuple]:
    """(margin partition, key) pairs by hats' own definition: the rows of other
    partitions whose margin-order pixel is one of ``get_margin(K, P, m - K)``."""
    t = store.table(table)
    rows = store.read_table(table, columns=_key(t) + ["healpix29"])
    hp29 = rows["healpix29"].to_numpy()
    m, k = store.margin_order, store.order
    part = hp29 >> (2 * (29 - k))
    mpix = hp29 >> (2 * (29 - m))
    occupied = np.unique(part)
    candidates = np.unique(np.concatenate([occupied, healpy.get_all_neighbours(1 << k, occupied, nest=True).ravel()]))
    keys = _rows(rows, _key(t))
    out = set()
    for p in candidates[candidates >= 0]:
        hit = np.flatnonzero(np.isin(mpix, get_margin(k, int(p), m - k)) & (part != p))
        out |= {(int(p),) + keys[i] for i in hit}
    return out


def _assert_hats_consistent(cdir, nrows: int) -> None:
    """hats accepts the catalog, and its metadata agrees with itself and with the folders:
    partition_info.csv == the Npix folders == the partitions of _metadata's files, and
    the row counts agree.  hats' strict validation checks the same but counts one file
    per partition in _metadata, so it passes only where each partition holds one file
    (checked then too)."""
    assert is_valid_catalog(cdir, strict=False)
    cat = hats.read_hats(cdir)
    pixels = {(p.order, p.pixel) for p in cat.get_healpix_pixels()}
    folders = {(int(d.parent.parent.name.split("=")[1]), int(d.name.split("=")[1]))
               for d in (cdir / "dataset").glob("Norder=*/Dir=*/Npix=*")}
    assert pixels == folders
    assert cat.catalog_info.total_rows == nrows
    files = [p for p in (cdir / "dataset").rglob("*.parquet")]
    assert sum(pq.read_metadata(f).num_rows for f in files) == nrows
    meta_file = cdir / "dataset" / "_metadata"
    if meta_file.exists():
        md = pq.read_metadata(meta_file)
        paths = {md.row_group(i).column(0).file_path for i in range(md.num_row_groups)}
        assert md.num_rows == nrows
        assert paths == {str(f.relative_to(cdir / "dataset")) for f in files}
    if len(files) == len(folders):
        assert is_valid_catalog(cdir, strict=True)


def check_readers(store) -> dict:
    """Every positional table, opened by hats, LSDB and DuckDB, gives the archive's rows
    and cone results; its HATS metadata (and margin catalog) is valid and current.
    Non-positional tables carry no HATS properties and DuckDB counts their rows."""
    checked = {}
    manifest = store.manifest()
    for t in store.schema:
        n = store.count(t.name)
        cols = _key(t)
        tdir = store.root / t.name
        glob_rows = _duck(store, t.name, cols) if n else pd.DataFrame(columns=cols)
        assert len(glob_rows) == n, f"{t.name}: DuckDB read_parquet counts {len(glob_rows)}, the archive {n}"
        if not t.positional:
            assert not (tdir / "hats.properties").exists() and not (tdir / "properties").exists()
            assert not (tdir / "partition_info.csv").exists()
            continue
        if not n:
            continue
        want = _sorted_keys(store.read_table(t.name, columns=cols), cols)
        assert _sorted_keys(glob_rows, cols) == want
        # hats: properties, partition_info, _metadata and the Npix folders agree
        _assert_hats_consistent(tdir, n)
        assert (tdir / "dataset" / "_metadata").exists()  # a small table: kept by every commit
        cat = hats.read_hats(tdir)
        assert {p.pixel for p in cat.get_healpix_pixels()} == {m["npix"] for m in manifest["tables"][t.name]["files"].values()}
        # LSDB: all rows, and the cones
        got = lsdb.open_catalog(tdir, columns=cols + ["ra", "dec"]).compute()
        assert _sorted_keys(got, cols) == want, t.name
        allrows = store.read_table(t.name, columns=cols + ["ra", "dec"])
        found = 0
        for ra, dec, r in _cones(store, t.name):
            mine = store.query_region(t.name, Cone(ra, dec, r / 3600.0), columns=cols)
            found += len(mine)
            # no row sits at the cone's edge (the readers' rounding could differ there)
            sep = _sep_arcsec(ra, dec, allrows["ra"].to_numpy(), allrows["dec"].to_numpy())
            assert not np.any(np.abs(sep - r) < 1e-6)
            lcone = lsdb.open_catalog(tdir, columns=cols + ["ra", "dec"], search_filter=lsdb.ConeSearch(ra, dec, r),
                                      error_empty_filter=False).compute()
            assert _sorted_keys(lcone, cols) == _sorted_keys(mine, cols), (t.name, ra, dec, r)
            drows = _duck(store, t.name, cols + ["ra", "dec"])
            dcone = drows[_sep_arcsec(ra, dec, drows["ra"].to_numpy(), drows["dec"].to_numpy()) <= r]
            assert _sorted_keys(dcone, cols) == _sorted_keys(mine, cols)
        assert found, t.name
        # the margin catalog: hats' margin rows exactly, opened with the collection
        coll = store.root / "collections" / t.name
        assert is_valid_collection(coll), t.name
        mdir = coll / f"{t.name}_{store.margin_arcsec:g}arcs"
        if any((mdir / "dataset").rglob("*.parquet")):
            mrows = duckdb.sql(f"SELECT Npix, {', '.join(cols)} FROM read_parquet('{mdir}/dataset/**/*.parquet', "
                               "hive_partitioning=true)").df()
        else:  # no row within the margin of another partition
            mrows = pd.DataFrame(columns=["Npix"] + cols)
        assert set(_rows(mrows, ["Npix"] + cols)) == _expected_margin(store, t.name)
        _assert_hats_consistent(mdir, len(mrows))
        with_margin = lsdb.open_catalog(coll, columns=cols + ["ra", "dec"])
        assert with_margin.margin is not None and len(with_margin.margin.compute()) == len(mrows)
        checked[t.name] = n
    return checked


@pytest.fixture
def arc(tmp_path):
    s = open_store(str(tmp_path / "arc"), create=True, order=ORDER)
    yield s
    s.close()


def test_readers_agree_after_ingest_replace_association_and_compact(arc):
    stars = _stars()
    # ingest: exposures, sources matched across epochs, DIASources associated into DIAObjects
    arc.write("exposure", _exposures([100, 101, 102, 103], seed=0))
    ingest_sources(arc, pd.concat([_epoch(stars, j, seed=j) for j in range(3)]), radius_arcsec=1.0)
    for v in range(3):
        ingest_dia_sources(arc, _visit(stars, v, 10_000 * (v + 1), 60100.0 + v), ingest_mjd=61000.0 + v)
    seen = check_readers(arc)
    assert set(seen) >= {"exposure", "source", "matched_source", "dia_source", "dia_object"}
    # replace: exposure rows rewritten, an epoch of sources and a visit of DIASources re-ingested
    with arc.transaction() as tx:
        tx.delete("exposure", "exposure_id", [101, 102])
        tx.append("exposure", conform(arc.table("exposure"), _exposures([101, 102], 7)))
    ingest_sources(arc, _epoch(stars, 1, seed=99), radius_arcsec=1.0, replace=True)
    ingest_dia_sources(arc, _visit(stars, 1, 50_000, 60101.0), replace=True, ingest_mjd=61010.0)
    assert arc.count("exposure") == 4
    check_readers(arc)
    # association updates: a late visit (older than the stored ones) re-associates objects
    ingest_dia_sources(arc, _visit(stars, 7, 70_000, 60050.0), ingest_mjd=61020.0)
    check_readers(arc)
    # compact: every partition down to one file; the merged-away files leave the folders
    arc.compact()
    for name in seen:
        per_part = {}
        for meta in arc.manifest()["tables"][name]["files"].values():
            per_part[meta["npix"]] = per_part.get(meta["npix"], 0) + 1
        assert set(per_part.values()) == {1}, name
    check_readers(arc)


def test_lsdb_crossmatch_near_partition_edges_finds_the_archives_pairs(arc, make_dia_sources):
    """Pairs 1-4" apart, many of them split by a partition border: LSDB with the margin
    catalog finds exactly the nearest neighbours the archive's own cone searches find;
    without the margin it misses some (so the margin is what makes it complete)."""
    rng = np.random.default_rng(5)
    n = 400
    # points on the borders of the order-5 partitions around (0, 0) (diagonal lines near
    # the equator), moved up to 6" off them
    home = int(radec_to_healpix29(np.array([0.01]), np.array([0.01]))[0] >> (2 * (29 - ORDER)))
    pixels = np.append(healpy.get_all_neighbours(1 << ORDER, home, nest=True), home)
    edge = np.concatenate([healpy.boundaries(1 << ORDER, int(p), step=64, nest=True).T for p in pixels])
    pick = edge[rng.integers(0, len(edge), n)]
    ra, dec = healpy.vec2ang(pick, lonlat=True)
    pa0, off = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 6, n) * ARCSEC
    ra, dec = np.mod(ra + off * np.sin(pa0) / np.cos(np.radians(dec)), 360.0), dec + off * np.cos(pa0)
    pa_, sep = rng.uniform(0, 2 * np.pi, n), rng.uniform(1.0, 4.0, n) * ARCSEC
    ra2 = np.mod(ra + sep * np.sin(pa_) / np.cos(np.radians(dec)), 360.0)
    dec2 = dec + sep * np.cos(pa_)
    left = _epoch((ra, dec), 0, seed=1)
    left["ra"], left["dec"] = ra, dec
    arc.write("source", left)
    arc.write("dia_source", make_dia_sources(n, seed=2, ra=ra2, dec=dec2))
    radius = 5.0
    src = arc.read_table("source", columns=["source_id", "ra", "dec"])
    want = set()
    for sid, r, d in src.itertuples(index=False):
        near = arc.query_region("dia_source", Cone(r, d, radius / 3600.0), columns=["dia_source_id", "ra", "dec"])
        if len(near):
            s = _sep_arcsec(r, d, near["ra"].to_numpy(), near["dec"].to_numpy())
            want.add((int(sid), int(near["dia_source_id"].iloc[int(np.argmin(s))])))
    assert len(want) == n
    shift = 2 * (29 - arc.order)
    split = (radec_to_healpix29(ra, dec) >> shift) != (radec_to_healpix29(ra2, dec2) >> shift)
    assert split.sum() > 50  # pairs whose two sides lie in different partitions
    left_cat = lsdb.open_catalog(arc.root / "source", columns=["source_id", "ra", "dec"])
    right_cat = lsdb.open_catalog(arc.root / "collections" / "dia_source", columns=["dia_source_id", "ra", "dec"])
    assert right_cat.margin is not None
    xm = left_cat.crossmatch(right_cat, radius_arcsec=radius, n_neighbors=1, suffix_method="all_columns").compute()
    got = set(zip(xm["source_id_source"].astype(int), xm["dia_source_id_dia_source"].astype(int)))
    assert got == want
    bare = lsdb.open_catalog(arc.root / "dia_source", columns=["dia_source_id", "ra", "dec"])
    with pytest.warns(Warning):  # LSDB says the right side has no margin
        xm0 = left_cat.crossmatch(bare, radius_arcsec=radius, n_neighbors=1, suffix_method="all_columns").compute()
    assert len(xm0) < len(want)
    print(f"pairs {len(want)}, split by a border {int(split.sum())}, found without the margin {len(xm0)}")


def test_replaced_files_leave_the_folders_at_the_commit(tmp_path, make_dia_sources):
    """No retention window in the dataset folders: right after each commit they hold
    exactly the live files, while readers of the previous manifest still read the
    replaced ones (moved aside to _retired/)."""
    s = open_store(str(tmp_path / "arc"), create=True, compact_fanout=2)
    for b in range(4):
        old = s.manifest()
        s.write("dia_source", make_dia_sources(300, seed=b, start_id=1 + 1000 * b))
        live = set(s.manifest()["tables"]["dia_source"]["files"])
        base = s.root / "dia_source" / "dataset"
        assert {str(p.relative_to(base)) for p in base.rglob("*.parquet")} == live
        assert int(duckdb.sql(f"SELECT count(*) FROM read_parquet('{_glob(s, 'dia_source')}')").fetchall()[0][0]) \
            == s.count("dia_source") == 300 * (b + 1)
        gone = set(old["tables"]["dia_source"]["files"]) - live
        if b:
            assert gone  # fanout 2: every batch merges
        t = s.table("dia_source")
        assert len(s._read(t, s._entries(old, "dia_source"), ["dia_source_id"])) == 300 * b
    s.close()


def test_metadata_is_current_or_absent(tmp_path, make_dia_sources, monkeypatch):
    s = open_store(str(tmp_path / "arc"), create=True)
    s.write("dia_source", make_dia_sources(3000, seed=1))
    meta_file = s.root / "dia_source" / "dataset" / "_metadata"
    md = pq.read_metadata(meta_file)
    files = s.manifest()["tables"]["dia_source"]["files"]
    assert md.num_rows == 3000
    assert {md.row_group(i).column(0).file_path for i in range(md.num_row_groups)} == set(files)
    monkeypatch.setattr(parquet_store, "HATS_METADATA_MAX_CHUNKS", 10)
    s.write("dia_source", make_dia_sources(100, seed=2, start_id=10_000))
    assert not meta_file.exists()  # too large to keep at each commit: removed, never stale
    assert is_valid_catalog(s.root / "dia_source", strict=True)
    s.compact()  # writes it whatever the size
    assert pq.read_metadata(meta_file).num_rows == 3100
    s.close()


def test_store_of_the_previous_layout_is_brought_up_to_date(tmp_path, make_dia_sources):
    """A store written before files were moved aside (replaced files in the dataset
    folders, HATS properties on non-positional tables, no margins): its next
    transaction moves the replaced files out; compact adds the margin catalogs."""
    s = open_store(str(tmp_path / "arc"), create=True, compact_fanout=2)
    for b in range(3):
        s.write("dia_source", make_dia_sources(400, seed=b, start_id=1 + 1000 * b, ra=None))
    s.close()
    root = s.root
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["retired"]
    for e in manifest["retired"]:  # back where the old layout kept them
        (root / "dia_source" / "dataset" / e[1]).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(root / "_retired" / "dia_source" / "dataset" / e[1], root / "dia_source" / "dataset" / e[1])
    for meta in manifest["tables"]["dia_source"]["files"].values():
        meta.pop("margin")
    manifest.pop("layout")
    (root / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(root / "collections")
    (root / "provenance" / "hats.properties").write_text("obs_collection=provenance\ndataproduct_type=source\n")
    s = open_store(str(root))
    assert _duck(s, "dia_source", ["dia_source_id"]).shape[0] > s.count("dia_source")  # the old defect
    with s.transaction():
        pass
    assert _duck(s, "dia_source", ["dia_source_id"]).shape[0] == s.count("dia_source") == 1200
    assert not (root / "provenance" / "hats.properties").exists()
    assert is_valid_catalog(root / "dia_source", strict=True)
    assert not (root / "collections" / "dia_source" / "dia_source_10arcs" / "hats.properties").exists()
    assert lsdb.open_catalog(root / "collections" / "dia_source").margin is None  # incomplete: not offered
    s.compact()
    check_readers(s)
    s.close()


def test_bulk_write_defers_margins_until_completed(tmp_path, monkeypatch):
    """A transaction writing more files than MARGIN_MAX_FILES leaves their margin rows
    out: the margin catalog is then not offered (LSDB opens the table without one)
    rather than incomplete, until write_hats_margins (or compact) completes it."""
    monkeypatch.setattr(parquet_store, "MARGIN_MAX_FILES", 3)
    s = open_store(str(tmp_path / "arc"), create=True)
    stars = _stars(seed=4, n=300)
    s.write("source", _epoch(stars, 0, seed=1))  # the field spans more than 3 partitions
    files = s.manifest()["tables"]["source"]["files"]
    assert len(files) > 3 and not any("margin" in m for m in files.values())
    coll = s.root / "collections" / "source"
    assert lsdb.open_catalog(coll).margin is None
    assert not (coll / "source_10arcs" / "hats.properties").exists()
    assert s.write_hats_margins() == len(files)
    assert s.manifest()["tables"]["source"]["files"].keys() == files.keys()  # data files untouched
    check_readers(s)
    s.close()


_MARGIN_KILLER = """
import os, signal, sys
from archive.catalog import parquet_store
from archive.catalog.backends import open_store
real = os.replace
count = [0]
def replace(src, dst):
    real(src, dst)
    count[0] += 1
    if count[0] == 3:  # the journal, then two margin files moved into place
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
open_store(sys.argv[1]).write_hats_margins()
print("survived")
"""


def test_kill_9_while_publishing_margins(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setattr(parquet_store, "MARGIN_MAX_FILES", 3)
    s = open_store(str(tmp_path / "arc"), create=True)
    s.write("source", _epoch(_stars(seed=4, n=300), 0, seed=1))
    before = s.manifest()["tables"]["source"]["files"]
    proc = subprocess.run([sys.executable, "-c", _MARGIN_KILLER, str(s.root)], capture_output=True, text=True)
    assert proc.returncode == -9 and "survived" not in proc.stdout, proc.stderr
    mdata = s.root / "collections" / "source" / "source_10arcs" / "dataset"
    assert list(mdata.rglob("*.parquet"))  # some margin files reached their place, uncommitted
    with s.transaction():  # the next writer undoes them: the manifest has no margins
        pass
    assert s.manifest()["tables"]["source"]["files"] == before
    assert not list(mdata.rglob("*.parquet")) and lsdb.open_catalog(s.root / "collections" / "source").margin is None
    assert not [p for p in (s.root / "_txn").rglob("*") if p.is_file()]
    s.write_hats_margins()
    check_readers(s)
    s.close()
