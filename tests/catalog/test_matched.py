"""Matched sources over epochs, relative photometry, rms-vs-mag and epoch matrices."""

import h5py
import numpy as np
import pandas as pd
import pytest

from archive.catalog.matched import (apply_zero_points, epoch_matrix, export_matrix,
                                     match_sources, plot_rms_vs_mag, relative_zero_points,
                                     rms_vs_mag, summarize)
from archive.catalog.schema import load_schema

ARCSEC = 1 / 3600


@pytest.fixture(scope="module")
def field():
    rng = np.random.default_rng(7)
    n_star, n_ep = 300, 20
    ra0 = rng.uniform(200.0, 200.1, n_star)
    dec0 = rng.uniform(-30.05, -29.95, n_star)
    mag0 = rng.uniform(14, 20, n_star)
    variable = np.zeros(n_star, bool)
    variable[:10] = True
    zp_true = rng.normal(0, 0.05, n_ep)
    rows = []
    for j in range(n_ep):
        seen = rng.random(n_star) < 0.95
        m = mag0 + zp_true[j] + np.where(variable, 0.4 * np.sin(j * 1.3 + np.arange(n_star)), 0)
        flux = 10 ** (-0.4 * (m - 31.4))
        err = np.sqrt(flux * 20.0 + 2e6)  # photon + sky noise, nJy
        f_obs = flux + rng.normal(0, err)
        rows.append(pd.DataFrame({
            "truth": np.arange(n_star)[seen], "exposure_id": 1000 + j, "visit": 1000 + j,
            "mjd": 60000.0 + j, "band": "r",
            "ra": ra0[seen] + rng.normal(0, 0.05, seen.sum()) * ARCSEC / np.cos(np.radians(-30)),
            "dec": dec0[seen] + rng.normal(0, 0.05, seen.sum()) * ARCSEC,
            "psf_flux": f_obs[seen], "psf_flux_err": err[seen]}))
    return rows, zp_true, variable


def _match_incrementally(rows):
    matched = pd.DataFrame(columns=["matched_source_id", "ra", "dec"])
    done = []
    counter = iter(range(1, 10**6))
    for part in rows:
        res = match_sources(part, matched, 1.0,
                            id_factory=lambda k: np.array([next(counter) for _ in range(k)],
                                                          dtype=np.int64))
        done.append(part.assign(matched_source_id=res.dia_object_id))
        matched = summarize(pd.concat(done, ignore_index=True))
    return pd.concat(done, ignore_index=True), matched


@pytest.fixture(scope="module")
def matched_field(field):
    return _match_incrementally(field[0])


def test_matching_recovers_stars(matched_field):
    src, matched = matched_field
    # every true star is one matched source and vice versa
    pairs = src[["truth", "matched_source_id"]].drop_duplicates()
    assert pairs.truth.is_unique and pairs.matched_source_id.is_unique
    assert len(matched) == src.truth.nunique()
    table = load_schema()["matched_source"]
    assert list(matched.columns) == table.column_names
    n_true = src.groupby("matched_source_id").size().sort_index().to_numpy()
    assert (matched.sort_values("matched_source_id").n_epochs.to_numpy() == n_true).all()


def test_zero_points_and_rms(field, matched_field, tmp_path):
    _, zp_true, variable = field
    src, _ = matched_field
    fit = relative_zero_points(src)
    zp = fit.zero_points.sort_values("exposure_id")
    truth = zp_true - np.median(zp_true)
    # ~290 constant stars per epoch: offsets good to a few mmag
    assert np.max(np.abs(zp.zp.to_numpy() - truth)) < 0.004
    assert (zp.zp_err < 0.002).all() and (zp.n_stars > 50).all()
    # variable stars are not used as reference
    var_ids = set(src.loc[src.truth.isin(np.flatnonzero(variable)), "matched_source_id"])
    assert len(var_ids & set(fit.reference.tolist())) <= 1
    assert fit.rms_after < 0.5 * fit.rms_before
    corrected = apply_zero_points(src, fit.zero_points)
    rv = rms_vs_mag(corrected)
    rv["variable"] = rv.matched_source_id.isin(var_ids)
    bright = rv[(rv.mean_mag < 16) & ~rv.variable]
    assert bright.rms_mag.median() < 0.01
    assert rv[rv.variable].rms_mag.min() > 0.1
    png = plot_rms_vs_mag(rv, tmp_path / "rms.png")
    assert png.stat().st_size > 1000


def test_epoch_matrix_and_export(matched_field, tmp_path):
    src, _ = matched_field
    mat = epoch_matrix(src, "psf_flux")
    assert mat.shape == (20, src.matched_source_id.nunique())
    assert int(mat.notna().to_numpy().sum()) == len(src)
    assert (np.diff(src.groupby("exposure_id").mjd.min().reindex(mat.index)) > 0).all()
    pq = export_matrix(mat, tmp_path / "m.parquet")
    back = pd.read_parquet(pq).set_index("exposure_id")
    np.testing.assert_array_equal(back.to_numpy(), mat.to_numpy())
    h5 = export_matrix(mat, tmp_path / "m.h5")
    with h5py.File(h5) as f:
        np.testing.assert_array_equal(f["values"][...], mat.to_numpy())
        assert f["matched_source_id"][...].tolist() == mat.columns.tolist()
