"""Incremental association in both stores: summaries, re-ingest, history, light curves, concurrency."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pandas as pd
import pytest

from archive.api import Archive
from archive.catalog.association import DUPLICATE_FLAG, associate
from archive.catalog.summaries import recompute
from archive.errors import ArchiveError

BANDS = np.array(["g", "r"])


def _field(n, seed=0, ra0=150.0, dec0=2.0, size=0.2):
    rng = np.random.default_rng(seed)
    return ra0 + rng.uniform(-size, size, n) / np.cos(np.radians(dec0)), dec0 + rng.uniform(-size, size, n)


def _visit(ra, dec, visit, seed, start_id, mjd=None, jitter_arcsec=0.05, flux=None):
    rng = np.random.default_rng(seed)
    n = len(ra)
    jr = rng.normal(0, jitter_arcsec / 3600, n) / np.cos(np.radians(dec))
    jd = rng.normal(0, jitter_arcsec / 3600, n)
    f = flux if flux is not None else rng.normal(1000, 50, n)
    return pd.DataFrame({
        "dia_source_id": np.arange(start_id, start_id + n, dtype=np.int64),
        "exposure_id": np.full(n, visit, np.int64), "visit": np.full(n, visit, np.int64),
        "detector": np.zeros(n, np.int32), "band": BANDS[visit % 2],
        "mjd": np.full(n, 60000.0 + visit if mjd is None else mjd),
        "ra": (ra + jr) % 360, "dec": np.clip(dec + jd, -90, 90),
        "ra_err": np.full(n, 0.05 / 3600, np.float32), "dec_err": np.full(n, 0.05 / 3600, np.float32),
        "psf_flux": f, "psf_flux_err": np.full(n, 20.0), "flags": np.zeros(n, np.int64)})


def _summaries_match_recompute(store):
    objs = store.read_table("dia_object")
    cur = objs[objs["validity_end"].isna()].sort_values("dia_object_id").reset_index(drop=True)
    src = store.read_table("dia_source")
    full = recompute(src).sort_values("dia_object_id").reset_index(drop=True)
    assert cur["dia_object_id"].tolist() == full["dia_object_id"].tolist()
    for col in ["n_dia_sources", "first_mjd", "last_mjd", "g_psf_flux_ndata", "r_psf_flux_ndata"]:
        np.testing.assert_array_equal(cur[col].to_numpy(float), full[col].to_numpy(float), err_msg=col)
    for col in ["ra", "dec", "radec_mjd", "g_psf_flux_mean", "r_psf_flux_mean",
                "r_psf_flux_mean_err", "g_psf_flux_min", "r_psf_flux_max"]:
        np.testing.assert_allclose(cur[col].to_numpy(float), full[col].to_numpy(float),
                                   rtol=1e-9, atol=1e-10, equal_nan=True, err_msg=col)
    # sigma and chi2 come from differences of running sums of f^2 (f ~ 1000 nJy):
    # float64 keeps them to ~1e-6 nJy and ~1e-6 in chi2 absolute
    for col, atol in [("r_psf_flux_sigma", 1e-6), ("r_psf_flux_chi2", 1e-6), ("g_psf_flux_chi2", 1e-6)]:
        np.testing.assert_allclose(cur[col].to_numpy(float), full[col].to_numpy(float),
                                   rtol=1e-9, atol=atol, equal_nan=True, err_msg=col)
    # exactly one current version per object
    assert not cur["dia_object_id"].duplicated().any()


def test_incremental_equals_recompute_out_of_order(store):
    arc = Archive(store, "test")
    ra, dec = _field(300, seed=1)
    order = [3, 1, 4, 2]  # out of time order
    for k, v in enumerate(order):
        rep = arc.ingest_dia_sources(_visit(ra, dec, v, seed=v, start_id=v * 1000), ingest_mjd=61000 + k)
        assert rep.n_sources == 300
        assert rep.n_new_objects == (300 if k == 0 else 0)
    assert store.count("dia_object") == 300 * 4  # one version per visit per object
    cur = arc.cone("dia_object", 150.0, 2.0, 3600)
    assert len(cur) == 300 and (cur["n_dia_sources"] == 4).all()
    # every object's sources came from one truth position
    src = store.read_table("dia_source")
    grouped = src.assign(t=src["dia_source_id"] % 1000).groupby("dia_object_id")["t"].nunique()
    assert (grouped == 1).all()
    _summaries_match_recompute(store)


def test_reingest_refused_or_replaced(store):
    arc = Archive(store, "test")
    ra, dec = _field(100, seed=2)
    arc.ingest_dia_sources(_visit(ra, dec, 1, 1, 1000), ingest_mjd=61000)
    arc.ingest_dia_sources(_visit(ra, dec, 2, 2, 2000), ingest_mjd=61001)
    with pytest.raises(ArchiveError, match=r"exposure\(s\) \[2\] already ingested.*--replace"):
        arc.ingest_dia_sources(_visit(ra, dec, 2, 2, 5000), ingest_mjd=61002)
    assert store.count("dia_source") == 200
    # replace visit 2 with new fluxes (and new ids): nothing counted twice
    redo = _visit(ra, dec, 2, 9, 7000, flux=np.full(100, 5000.0))
    rep = arc.ingest_dia_sources(redo, replace=True, ingest_mjd=61003)
    assert rep.n_replaced_sources == 100 and rep.n_new_objects == 0
    assert store.count("dia_source") == 200
    cur = arc.cone("dia_object", 150.0, 2.0, 3600)
    assert (cur["n_dia_sources"] == 2).all()
    assert np.allclose(cur["g_psf_flux_max"], 5000.0)  # visit 2 is band g
    _summaries_match_recompute(store)


def test_history_as_of(store):
    arc = Archive(store, "test")
    ra, dec = _field(20, seed=3)
    arc.ingest_dia_sources(_visit(ra, dec, 1, 1, 1000), ingest_mjd=61000)
    arc.ingest_dia_sources(_visit(ra, dec, 2, 2, 2000), ingest_mjd=61010)
    now = arc.cone("dia_object", 150, 2, 3600)
    then = arc.cone("dia_object", 150, 2, 3600, as_of=61005)
    before = arc.cone("dia_object", 150, 2, 3600, as_of=60999)
    assert (now["n_dia_sources"] == 2).all() and (then["n_dia_sources"] == 1).all() and before.empty
    # the store's own current-versions filter (large and small cones take different paths on
    # Postgres) equals filtering all versions
    for radius in (3600, 60):
        every = store.cone("dia_object", 150, 2, radius)
        cur = store.cone("dia_object", 150, 2, radius, current_only=True)
        assert len(every) > len(cur) > 0 and cur["validity_end"].isna().all()
        pd.testing.assert_frame_equal(cur, every[every["validity_end"].isna()].reset_index(drop=True))
    oid = int(now["dia_object_id"].iloc[0])
    hist = arc.history(oid)
    assert hist["validity_start"].tolist() == [61000, 61010]
    assert hist["validity_end"].iloc[0] == 61010 and pd.isna(hist["validity_end"].iloc[1])
    with pytest.raises(ArchiveError, match="not later"):
        arc.ingest_dia_sources(_visit(ra, dec, 3, 3, 3000), ingest_mjd=61005)


def test_edges_ra_wrap_and_pole(store):
    arc = Archive(store, "test")
    ra = np.array([359.99999, 0.00001, 10.0, 200.0])
    dec = np.array([5.0, -5.0, 89.99999, -89.99995])
    arc.ingest_dia_sources(_visit(ra, dec, 1, 1, 1000, jitter_arcsec=0), ingest_mjd=61000)
    # the same objects seen from across RA 0/360 and across the pole
    ra2 = np.array([0.00005 - 0.0001, 359.99999 + 0.00002 - 360 + 360, 190.0, 20.0])
    dec2 = np.array([5.0, -5.0, 89.99999, -89.99995])
    ra2 = ra2 % 360
    rep = arc.ingest_dia_sources(_visit(ra2, dec2, 2, 2, 2000, jitter_arcsec=0), ingest_mjd=61001)
    assert rep.n_new_objects == 0, rep
    assert len(arc.region("dia_object", __import__("archive").sky.regions.Cone(0, 0, 180))) == 4


def test_light_curve_and_forced(store):
    arc = Archive(store, "test")
    ra, dec = _field(5, seed=4)
    arc.ingest_dia_sources(_visit(ra, dec, 1, 1, 1000), ingest_mjd=61000)
    arc.ingest_dia_sources(_visit(ra, dec, 2, 2, 2000), ingest_mjd=61001)
    objs = arc.cone("dia_object", 150, 2, 3600)
    oid = int(objs["dia_object_id"].iloc[0])
    forced = pd.DataFrame({
        "dia_forced_source_id": [1, 2], "dia_object_id": [oid, oid], "exposure_id": [3, 4],
        "visit": [3, 4], "detector": [0, 0], "band": ["r", "r"], "mjd": [60003.0, 60004.0],
        "ra": [objs["ra"].iloc[0]] * 2, "dec": [objs["dec"].iloc[0]] * 2,
        "psf_flux": [10.0, 30.0], "psf_flux_err": [5.0, 5.0], "flags": [0, 0]})
    # a forced batch stamped before the version it would close is refused, nothing written
    with pytest.raises(ArchiveError, match="not later than stored object versions"):
        arc.ingest_forced(forced, ingest_mjd=61000.5)
    assert store.count("dia_forced_source") == 0
    assert arc.ingest_forced(forced, ingest_mjd=61002) == 2
    lc = arc.light_curve(oid)
    assert lc["kind"].tolist() == ["detection", "detection", "forced", "forced"]
    assert lc["mjd"].is_monotonic_increasing
    assert lc["exposure_id"].tolist() == [1, 2, 3, 4]
    assert len(arc.light_curve(oid, bands=["r"])) == 3
    obj = arc.get("dia_object", [oid]).iloc[0]
    assert obj["r_forced_flux_ndata"] == 2 and obj["r_forced_flux_mean"] == pytest.approx(20.0)
    with pytest.raises(ArchiveError, match="no dia_object"):
        arc.light_curve(12345)


def _worker(url, visit, barrier, radius=1.0):
    from archive.api import Archive as A

    ra, dec = _field(300, seed=7)
    arc = A.open(url)
    barrier.wait()
    arc.ingest_dia_sources(_visit(ra, dec, visit, visit, visit * 1000), radius_arcsec=radius)  # real clock
    arc.close()


# 900": a footprint coarser than the order-6 lock pixels, which once locked the
# wrong pixel numbers (600 objects from 300 positions).  Most sources of a visit are
# then within the radius of each other: a few objects, the other sources of each visit
# attached to them as duplicates of the visit, as the pure association of both visits in
# time order gives (twice as many objects if the batches ran unlocked).  Both batches use
# the same radius (one configuration per archive: a late batch re-associates stored
# sources with its own).
@pytest.mark.parametrize("radii", [(1.0, 1.0), (900.0, 900.0)])
def test_concurrent_overlapping_batches_postgres(pg_store_url, radii):
    import sqlalchemy as sa

    from archive.catalog.schema import load_schema

    eng = sa.create_engine(pg_store_url)
    with eng.begin() as con:
        con.execute(sa.text("TRUNCATE " + ", ".join(t.name for t in load_schema())))
    eng.dispose()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_worker, args=(pg_store_url, v, barrier, r)) for v, r in zip((1, 2), radii)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    arc = Archive.open(pg_store_url)
    cur = arc.cone("dia_object", 150, 2, 3600)
    src = arc.sql("SELECT dia_object_id, flags FROM dia_source")
    arc.close()
    ra, dec = _field(300, seed=7)
    both = pd.concat([_visit(ra, dec, v, v, v * 1000) for v in (1, 2)], ignore_index=True)
    want = np.unique(associate(both, both.iloc[:0].assign(dia_object_id=np.int64(0)),
                               radius_arcsec=radii[0]).dia_object_id).size
    assert want == 300 if radii[0] == 1.0 else want < 10
    assert len(cur) == want  # no duplicate objects
    assert (cur["n_dia_sources"] == 2).all()
    assert set(src["dia_object_id"]) == set(cur["dia_object_id"])
    assert int(((src["flags"].to_numpy() & DUPLICATE_FLAG) != 0).sum()) == 600 - 2 * len(cur)
