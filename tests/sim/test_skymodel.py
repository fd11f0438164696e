import numpy as np
import pytest

from archive.image.calib import njy_to_mag
from archive.sim.config import SimConfig
from archive.sim.skymodel import (field_half_width_deg, make_reference_catalog, make_sky, mean_magnitudes,
                                  object_fluxes, object_positions, sample_power_law_mags)


def _fit_slope(mags, lo, hi):
    edges = np.arange(lo, hi + 1e-9, 0.5)
    n, _ = np.histogram(mags, edges)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w = np.sqrt(n)  # weights 1/sigma of log N ~ sqrt(N)
    return np.polyfit(centres, np.log10(n), 1, w=w)[0]


def test_power_law_sampler():
    rng = np.random.default_rng(0)
    m = sample_power_law_mags(rng, 200000, 16.0, 25.0, 0.3)
    assert m.min() >= 16.0 and m.max() < 25.0
    assert _fit_slope(m, 16.0, 25.0) == pytest.approx(0.3, abs=0.01)


def test_sky_number_counts_densities_and_colours():
    cfg = SimConfig(size=2048, n_detectors=2, seed=11)
    sky = make_sky(cfg)
    area = (2 * field_half_width_deg(cfg) * 60) ** 2
    stars = sky[sky.kind.isin(["star", "variable"])]
    gals = sky[sky.kind == "galaxy"]
    # densities within 5 Poisson sigma
    for df, dens in ((stars, cfg.star_density), (gals, cfg.galaxy_density)):
        expected = dens * area
        assert abs(len(df) - expected) < 5 * np.sqrt(expected)
    # number-count slopes as configured
    assert _fit_slope(stars.mag_r.to_numpy(), *cfg.star_mag_range) == pytest.approx(cfg.star_count_slope, abs=0.03)
    assert _fit_slope(gals.mag_r.to_numpy(), *cfg.galaxy_mag_range) == pytest.approx(cfg.galaxy_count_slope,
                                                                                    abs=0.03)
    # stellar locus: r-i rises with g-r
    gr = stars.mag_g - stars.mag_r
    ri = stars.mag_r - stars.mag_i
    assert 0.15 - 1e-9 <= gr.min() and gr.max() <= 1.6 + 1e-9
    assert np.corrcoef(gr, ri)[0, 1] > 0.9
    # fluxes and magnitudes agree (1 nJy = AB 31.4)
    np.testing.assert_allclose(njy_to_mag(sky.flux_r.to_numpy()), sky.mag_r.to_numpy(), atol=1e-9)
    # variables only among brighter stars, at the configured fraction
    var = sky[sky.kind == "variable"]
    assert (var.mag_r < cfg.variable_mag_limit).all()
    bright = stars[stars.mag_r < cfg.variable_mag_limit]
    assert len(var) / len(bright) == pytest.approx(cfg.variable_fraction, abs=0.03)
    # transients: hosted ones point at galaxies and lie near them
    tr = sky[sky.kind == "transient"]
    assert len(tr) == cfg.n_transients * cfg.n_detectors
    hosted = tr[tr.host_id > 0]
    hosts = sky.set_index("object_id").loc[hosted.host_id]
    assert (hosts.kind == "galaxy").all()
    sep = np.hypot((hosted.ra.to_numpy() - hosts.ra.to_numpy()) * np.cos(np.radians(hosts.dec.to_numpy())),
                   hosted.dec.to_numpy() - hosts.dec.to_numpy()) * 3600
    assert np.all(sep <= hosts.r_eff_arcsec.to_numpy() + 1e-6)
    assert (sky.object_id.diff().dropna() == 1).all()


def test_deterministic_from_seed():
    a = make_sky(SimConfig(size=512, seed=5))
    b = make_sky(SimConfig(size=512, seed=5))
    c = make_sky(SimConfig(size=512, seed=6))
    assert a.equals(b)
    assert len(a) != len(c) or not np.allclose(a.ra, c.ra)


def test_fluxes_follow_light_curves_and_moving_object_moves():
    cfg = SimConfig(size=512, seed=2, n_epochs=10)
    sky = make_sky(cfg)
    static = (sky.kind == "star").to_numpy()
    f1 = object_fluxes(sky, "r", 60001.0)
    np.testing.assert_array_equal(f1[static], sky.flux_r.to_numpy()[static])
    var = (sky.kind == "variable").to_numpy()
    period = sky.period.to_numpy()[var]
    np.testing.assert_allclose(object_fluxes(sky, "r", 60001.0)[var],
                               [object_fluxes(sky.iloc[np.flatnonzero(var)], "r", 60001.0 + p)[i]
                                for i, p in enumerate(period)], rtol=1e-9)
    tr = (sky.kind == "transient").to_numpy()
    at_peak = np.array([object_fluxes(sky.iloc[[i]], "r", sky.t_peak.iloc[i])[0] for i in np.flatnonzero(tr)])
    np.testing.assert_allclose(at_peak, sky.flux_r.to_numpy()[tr], rtol=1e-9)
    mv = (sky.kind == "moving").to_numpy()
    ra0, dec0 = object_positions(sky, 60000.0, cfg)
    ra1, dec1 = object_positions(sky, 60001.0, cfg)
    speed = np.hypot(sky.rate_ra.to_numpy()[mv], sky.rate_dec.to_numpy()[mv])
    moved = np.hypot((ra1 - ra0)[mv] * np.cos(np.radians(dec0[mv])), (dec1 - dec0)[mv])
    np.testing.assert_allclose(moved, speed, rtol=1e-3)
    np.testing.assert_array_equal(ra1[~mv], ra0[~mv])


def test_reference_catalog_errors_are_realistic():
    cfg = SimConfig(size=2048, n_detectors=4, seed=4)
    sky = make_sky(cfg)
    ref = make_reference_catalog(cfg, sky)
    assert len(ref) > 300
    assert ref.r.between(14.5, 22.0).all()
    truth = sky.set_index("object_id").loc[ref.object_id]
    for b in "gri":
        true_mean = mean_magnitudes(truth.reset_index(), b)
        pull = (ref[b].to_numpy() - true_mean) / ref[f"{b}_err"].to_numpy()
        assert abs(pull.mean()) < 0.15 and pull.std() == pytest.approx(1.0, abs=0.1)
    dra = (ref.ra.to_numpy() - truth.ra.to_numpy()) * np.cos(np.radians(truth.dec.to_numpy())) * 3.6e6
    assert (dra / ref.ra_err.to_numpy()).std() == pytest.approx(1.0, abs=0.1)
    # colour terms: the catalog's system differs from the camera's by c (g - r)
    cfg_ct = SimConfig(size=2048, n_detectors=4, seed=4, color_terms={"g": 0.1, "r": -0.05, "i": 0.0})
    ref_ct = make_reference_catalog(cfg_ct, sky)
    gr = mean_magnitudes(truth.reset_index(), "g") - mean_magnitudes(truth.reset_index(), "r")
    np.testing.assert_allclose(ref_ct.g - ref.g, -0.1 * gr, atol=1e-9)
    np.testing.assert_allclose(ref_ct.r - ref.r, 0.05 * gr, atol=1e-9)
    np.testing.assert_allclose(ref_ct.i, ref.i, atol=1e-12)
    # errors grow toward faint magnitudes
    true_r = mean_magnitudes(truth.reset_index(), "r")
    order = np.argsort(true_r)
    assert np.all(np.diff(ref.r_err.to_numpy()[order]) >= 0)
    assert ref.r_err.min() == pytest.approx(0.003, abs=5e-4) and ref.r_err.max() > 0.05
