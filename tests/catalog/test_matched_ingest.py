"""Matched sources in the store (both backends): incremental matching of per-epoch
source rows, re-ingest/replace, relative photometry, rms-vs-mag, epoch matrices."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest

from archive.catalog import matched as M
from archive.catalog.matched_ingest import (export_epoch_matrix, field_epoch_matrix, field_epochs,
                                            ingest_sources, relative_photometry, rms_curve)
from archive.errors import ArchiveError, NotFoundError, ValidationError
from archive.sky.regions import Cone

N_STAR, N_EP = 200, 8
# the field straddles RA 0/360 (and the HEALPix base-pixel border there)
RA0, DEC0, HALF = 359.98, 1.0, 0.12
ARCSEC = 1.0 / 3600.0


def make_field(seed: int = 11, n_star: int = N_STAR, n_ep: int = N_EP):
    """Seeded truth: stars (>= 6" apart), per-epoch zero-point offsets, a few variables."""
    rng = np.random.default_rng(seed)
    ra, dec = [], []
    while len(ra) < n_star:  # rejection sampling keeps the truth grouping unambiguous
        r = RA0 + rng.uniform(-HALF, HALF) / np.cos(np.radians(DEC0))
        d = DEC0 + rng.uniform(-HALF, HALF)
        if ra:
            dx = (np.asarray(ra) - r) * np.cos(np.radians(DEC0))
            if np.min(np.hypot(dx, np.asarray(dec) - d)) < 6 * ARCSEC:
                continue
        ra.append(r)
        dec.append(d)
    ra = np.mod(np.asarray(ra), 360.0)
    dec = np.asarray(dec)
    mag0 = rng.uniform(15.0, 19.5, n_star)
    variable = np.zeros(n_star, bool)
    variable[rng.choice(n_star, 6, replace=False)] = True
    phase = rng.uniform(0, 2 * np.pi, n_star)
    zp_true = rng.normal(0.0, 0.1, n_ep)
    seen = rng.random((n_ep, n_star)) < 0.93
    epochs = []
    for j in range(n_ep):
        m = mag0 + zp_true[j] + np.where(variable, 0.3 * np.sin(1.7 * j + phase), 0.0)
        flux = 10 ** (-0.4 * (m - 31.4))
        err = np.sqrt(33.0 * flux + 4000.0 ** 2)  # photon + sky noise (nJy)
        s = seen[j]
        n = int(s.sum())
        epochs.append(pd.DataFrame({
            "source_id": (j + 1) * 1_000_000 + np.flatnonzero(s),
            "exposure_id": np.full(n, 100 + j, np.int64), "visit": np.full(n, 100 + j, np.int64),
            "detector": np.zeros(n, np.int32), "band": "r", "mjd": np.full(n, 60000.0 + 0.5 * j),
            "ra": np.mod(ra[s] + rng.normal(0, 0.1, n) * ARCSEC / np.cos(np.radians(dec[s])), 360.0),
            "dec": dec[s] + rng.normal(0, 0.1, n) * ARCSEC,
            "ra_err": np.full(n, 0.1 * ARCSEC, np.float32), "dec_err": np.full(n, 0.1 * ARCSEC, np.float32),
            "psf_flux": (flux + rng.normal(0, err))[s], "psf_flux_err": err[s],
            "flags": np.zeros(n, np.int64)}))
    return {"epochs": epochs, "zp": zp_true, "variable": variable, "seen": seen, "mag0": mag0}


@pytest.fixture(scope="module")
def truth():
    return make_field()


def star_of(source_id) -> np.ndarray:
    return np.asarray(source_id, np.int64) % 1_000_000


REGION = Cone(RA0, DEC0, 0.25)


def ingest_all(store, truth):
    ep = truth["epochs"]
    # out of time order; single epochs and batches of several epochs
    for js in ((3,), (0, 5), (1, 7), (2, 4, 6)):
        rep = ingest_sources(store, pd.concat([ep[j] for j in js], ignore_index=True))
        assert rep.n_sources == sum(len(ep[j]) for j in js)
    return rep


def _assert_summaries_equal_recompute(store):
    stored = store.read_table("matched_source").sort_values("matched_source_id").reset_index(drop=True)
    src = store.read_table("source")
    assert src["matched_source_id"].notna().all()
    full = M.summarize(src.assign(matched_source_id=src["matched_source_id"].astype(np.int64)))
    full = full.sort_values("matched_source_id").reset_index(drop=True)
    assert stored["matched_source_id"].tolist() == full["matched_source_id"].tolist()
    for col in ["n_epochs", "r_n", "first_mjd", "last_mjd", "healpix29"]:
        np.testing.assert_array_equal(stored[col].to_numpy(float), full[col].to_numpy(float), err_msg=col)
    for col in ["ra", "dec", "r_flux_mean", "r_flux_mean_err", "r_flux_sigma", "r_flux_chi2", "r_mag_rms"]:
        np.testing.assert_allclose(stored[col].to_numpy(float), full[col].to_numpy(float),
                                   rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=col)


def test_matched_objects_equal_truth(store, truth):
    ingest_all(store, truth)
    src = store.read_table("source")
    assert len(src) == int(truth["seen"].sum())
    star = star_of(src["source_id"])
    msid = src["matched_source_id"].to_numpy(np.int64)
    # each matched source holds one star, each star is one matched source
    assert (pd.Series(star).groupby(msid).nunique() == 1).all()
    assert (pd.Series(msid).groupby(star).nunique() == 1).all()
    ms = store.read_table("matched_source")
    assert len(ms) == N_STAR and ms["matched_source_id"].is_unique
    # n_epochs per matched source = truth detections of its star
    per = pd.Series(star).groupby(msid).first()
    n_truth = truth["seen"].sum(axis=0)[per.reindex(ms["matched_source_id"]).to_numpy()]
    np.testing.assert_array_equal(ms["n_epochs"].to_numpy(), n_truth)
    # the field straddles RA 0/360: both sides are present and matched together
    assert (ms["ra"] > 359).any() and (ms["ra"] < 1).any()
    _assert_summaries_equal_recompute(store)


def test_reingest_refused_then_replaced(store, truth):
    ep = truth["epochs"]
    for j in range(4):
        ingest_sources(store, ep[j])
    n_src, n_ms = store.count("source"), store.count("matched_source")
    with pytest.raises(ArchiveError, match=r"exposure\(s\) \[102\] already ingested"):
        ingest_sources(store, ep[2])
    assert (store.count("source"), store.count("matched_source")) == (n_src, n_ms)
    # a changed version of exposure 102: doubled fluxes, some stars missing and a spurious
    # source 1 arcmin from any star, which founds a matched source of its own
    bad = ep[2].iloc[:150].copy()
    bad["psf_flux"] *= 2.0
    spur = bad.iloc[:1].assign(source_id=9_999_999, ra=(RA0 + 0.3) % 360, dec=DEC0 + 0.3)
    rep = ingest_sources(store, pd.concat([bad, spur], ignore_index=True), replace=True)
    assert rep.n_replaced_sources == len(ep[2]) and rep.n_new == 1
    assert store.count("matched_source") == n_ms + 1
    _assert_summaries_equal_recompute(store)
    # replacing again with the original rows removes the spurious matched source and
    # restores exactly the clean state (nothing counted twice)
    rep = ingest_sources(store, ep[2], replace=True)
    assert rep.n_removed == 1 and rep.n_new == 0 and rep.n_replaced_sources == 151
    assert (store.count("source"), store.count("matched_source")) == (n_src, n_ms)
    _assert_summaries_equal_recompute(store)
    src = store.read_table("source")
    assert (pd.Series(star_of(src["source_id"])).groupby(src["matched_source_id"].to_numpy()).nunique()
            == 1).all()
    # invalid rows: nothing written
    with pytest.raises(ValidationError):
        ingest_sources(store, ep[5].drop(columns=["mjd"]))
    assert store.count("source") == n_src
    # rows written without matching (a plain catalog load) are matched by a replace
    store.write("source", ep[5])
    rep = ingest_sources(store, ep[5], replace=True)
    assert rep.n_replaced_sources == len(ep[5]) and rep.n_updated + rep.n_new == len(ep[5])
    _assert_summaries_equal_recompute(store)


def test_relative_photometry_and_rms_curve(store, truth, tmp_path):
    ingest_all(store, truth)
    rp = relative_photometry(store, REGION, "r")
    zps = rp.zero_points.sort_values("exposure_id")
    assert zps["exposure_id"].tolist() == list(range(100, 100 + N_EP))
    fit = zps["zp"].to_numpy()
    true = truth["zp"] - np.median(truth["zp"])
    # offsets of 0.1 mag rms recovered to better than 5 mmag (their errors are ~1 mmag)
    np.testing.assert_allclose(fit - np.median(fit - true), true, atol=0.005)
    assert np.abs(np.median(fit)) < 1e-12
    assert (zps["zp_err"] < 0.003).all() and (zps["n_stars"] > 100).all()
    assert rp.rms_before > 0.05 and rp.rms_after < 0.02
    # no variable is used as a reference star
    ms_star = pd.Series(star_of(rp.light_curves["source_id"]),
                        index=rp.light_curves["matched_source_id"].to_numpy()).groupby(level=0).first()
    assert not truth["variable"][ms_star.reindex(rp.reference).to_numpy()].any()
    # corrected light curves of a bright constant star are flat to ~1%
    lc = rp.light_curves
    bright = np.flatnonzero((truth["mag0"] < 16) & ~truth["variable"])[0]
    one = lc[star_of(lc["source_id"]) == bright]
    assert one["psf_flux"].std() / one["psf_flux"].mean() < 0.015
    assert set(lc.columns) >= {"psf_flux", "psf_flux_err", "zp", "mjd", "exposure_id"}

    png = tmp_path / "rms.png"
    table = rms_curve(store, REGION, "r", plot=png)
    assert png.stat().st_size > 5000
    star = ms_star.reindex(table["matched_source_id"]).to_numpy()
    is_var = truth["variable"][star]
    assert is_var.sum() == 6
    flagged = table["outlier"].to_numpy(bool)
    assert flagged[is_var].all()                 # every variable stands out
    assert flagged[~is_var].mean() < 0.02        # few constant stars do
    # the noise-limited curve rises toward faint magnitudes
    model = table["rms_model"].to_numpy()
    assert model[table["mean_mag"] > 19].mean() > 3 * model[table["mean_mag"] < 16].mean()
    raw = rms_curve(store, REGION, "r", relative=False)
    # without the zero points every star scatters by ~0.1 mag
    assert raw["rms_mag"].median() > 0.05 > table["rms_mag"].median()
    with pytest.raises(ValidationError, match="unknown band"):
        rms_curve(store, REGION, "q")
    with pytest.raises(NotFoundError):
        rms_curve(store, Cone(180.0, 0.0, 0.1), "r")


def test_epoch_matrix_and_export(store, truth, tmp_path):
    ingest_all(store, truth)
    mat = field_epoch_matrix(store, REGION, "r", "psf_flux")
    assert mat.shape == (N_EP, N_STAR)
    assert mat.index.tolist() == list(range(100, 100 + N_EP))  # time order
    src, matched = field_epochs(store, REGION, "r")
    star = pd.Series(star_of(src["source_id"]), index=src["matched_source_id"].to_numpy())
    star = star.groupby(level=0).first().reindex(mat.columns).to_numpy()
    np.testing.assert_array_equal(np.isfinite(mat.to_numpy()), truth["seen"][:, star])
    # values are the stored fluxes
    for j in range(N_EP):
        row = truth["epochs"][j]
        want = pd.Series(row["psf_flux"].to_numpy(), index=star_of(row["source_id"]))
        got = mat.iloc[j].to_numpy()
        ok = np.isfinite(got)
        np.testing.assert_allclose(got[ok], want.reindex(star[ok]).to_numpy(), rtol=1e-12)
    rel = field_epoch_matrix(store, REGION, "r", "psf_flux", relative=True)
    assert np.array_equal(np.isfinite(rel.to_numpy()), np.isfinite(mat.to_numpy()))

    pq_path, m1 = export_epoch_matrix(store, REGION, "r", "psf_flux", tmp_path / "m.parquet")
    back = pd.read_parquet(pq_path).set_index("exposure_id")
    assert back.columns.tolist() == [str(c) for c in m1.columns]
    np.testing.assert_array_equal(back.to_numpy(), m1.to_numpy())
    h5_path, m2 = export_epoch_matrix(store, REGION, "r", "mjd", tmp_path / "m.h5")
    with h5py.File(h5_path) as f:
        np.testing.assert_array_equal(f["values"][...], m2.to_numpy())
        np.testing.assert_array_equal(f["exposure_id"][...], m2.index.to_numpy())
        np.testing.assert_array_equal(f["matched_source_id"][...], m2.columns.to_numpy())
    # an epoch's mjd column is constant where seen
    vals = m2.to_numpy()
    assert np.allclose(np.nanmax(vals, axis=1), np.nanmin(vals, axis=1))
    with pytest.raises(ValidationError, match="must end in"):
        export_epoch_matrix(store, REGION, "r", "psf_flux", tmp_path / "m.csv")
    with pytest.raises(ValidationError, match="no column"):
        field_epoch_matrix(store, REGION, "r", "nope")


def _cap_field(n, ra0, dec0, radius_deg, n_ep, seed):
    """Stars in a cap (works at the poles), >= 6" apart; epochs with 0.1" jitter."""
    from archive.sky.healpix import radec_to_vec

    rng = np.random.default_rng(seed)
    c = radec_to_vec(ra0, dec0)
    a = np.cross(c, [0.0, 0.0, 1.0] if abs(c[2]) < 0.9 else [1.0, 0.0, 0.0])
    a /= np.linalg.norm(a)
    b = np.cross(c, a)
    pts = []
    while len(pts) < n:
        x, y = rng.uniform(-1, 1, 2) * np.radians(radius_deg)
        v = c + x * a + y * b
        v /= np.linalg.norm(v)
        if all(np.degrees(np.arccos(min(1.0, v @ p))) * 3600 > 6 for p in pts):
            pts.append(v)
    pts = np.array(pts)

    def radec(u):
        return np.degrees(np.arctan2(u[:, 1], u[:, 0])) % 360, np.degrees(np.arcsin(np.clip(u[:, 2], -1, 1)))

    out = []
    for j in range(n_ep):
        u = pts + rng.normal(0, np.radians(0.1 / 3600), pts.shape)
        ra, dec = radec(u / np.linalg.norm(u, axis=1)[:, None])
        out.append(pd.DataFrame({
            "source_id": (j + 1) * 1_000_000 + np.arange(n), "exposure_id": 500 + j, "visit": 500 + j,
            "detector": 0, "band": "i", "mjd": 60200.0 + j, "ra": ra, "dec": dec,
            "psf_flux": 1e5, "psf_flux_err": 1e3, "flags": 0}))
    return out


def test_matching_at_the_pole(store):
    epochs = _cap_field(40, 123.0, 89.995, 0.01, 3, seed=5)
    assert np.ptp(epochs[0]["ra"]) > 180  # the cap holds the pole: stars at all right ascensions
    for e in epochs:
        ingest_sources(store, e)
    src = store.read_table("source")
    star = star_of(src["source_id"])
    msid = src["matched_source_id"].to_numpy(np.int64)
    assert (pd.Series(star).groupby(msid).nunique() == 1).all()
    assert store.count("matched_source") == 40
    assert (store.read_table("matched_source")["n_epochs"] == 3).all()
    lc, ms = field_epochs(store, Cone(0.0, 90.0, 0.03), "i")
    assert len(ms) == 40 and len(lc) == 120


def test_parquet_second_writer_refused(tmp_path, truth):
    from archive.catalog.backends import open_store
    from archive.errors import StoreLockedError

    st = open_store(str(tmp_path / "arc"), create=True)
    tx = st.transaction()
    try:
        with pytest.raises(StoreLockedError, match="locked"):
            ingest_sources(st, truth["epochs"][0])
    finally:
        tx.rollback()
    ingest_sources(st, truth["epochs"][0])
    assert st.count("source") == len(truth["epochs"][0])
    st.close()


def test_concurrent_ingest_postgres(pg_store_url, truth):
    """Three sessions at once on one field: two epochs and a duplicate of the first.
    The footprint locks serialize them: no duplicate matched sources, and the
    duplicate exposure is refused (whichever of the two comes second)."""
    import threading

    import sqlalchemy as sa

    from archive.catalog.schema import load_schema
    from archive.catalog.backends import open_store

    eng = sa.create_engine(pg_store_url)
    with eng.begin() as con:
        con.execute(sa.text("TRUNCATE " + ", ".join(t.name for t in load_schema())))
    eng.dispose()
    ep = truth["epochs"]
    barrier = threading.Barrier(3)
    errors: list[Exception] = []

    def work(df):
        st = open_store(pg_store_url)
        try:
            barrier.wait()
            ingest_sources(st, df)
        except ArchiveError as exc:
            errors.append(exc)
        finally:
            st.close()

    threads = [threading.Thread(target=work, args=(df,)) for df in (ep[0], ep[1], ep[0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) == 1 and "already ingested" in str(errors[0])
    st = open_store(pg_store_url)
    try:
        src = st.read_table("source")
        ms = st.read_table("matched_source")
    finally:
        st.close()
    assert len(src) == len(ep[0]) + len(ep[1])
    assert len(ms) == int((truth["seen"][0] | truth["seen"][1]).sum())
    assert (pd.Series(src["matched_source_id"].to_numpy()).groupby(star_of(src["source_id"])).nunique()
            == 1).all()
