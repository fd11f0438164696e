import math

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from scipy import ndimage

from archive.image.psf import fwhm_from_image
from archive.sim.camera import bloom, expose_calibration, expose_object, poisson_counts
from archive.sim.render import electrons_per_njy, render_epoch


def _overscan_subtracted(frame):
    return frame.image - np.median(frame.overscan, axis=1)[:, None]


def _masters(cfg, det, band):
    """Master bias, dark rate (adu/s) and normalised flat from the simulator's calibration frames."""
    bias = np.mean([_overscan_subtracted(expose_calibration(cfg, det, "BIAS", k)) for k in range(cfg.n_bias)], axis=0)
    darks = [expose_calibration(cfg, det, "DARK", k) for k in range(cfg.n_dark)]
    dark = np.mean([(_overscan_subtracted(d) - bias) / d.dark_time for d in darks], axis=0)
    flats = [expose_calibration(cfg, det, "FLAT", k, band=band) for k in range(cfg.n_flat)]
    flat = np.mean([_overscan_subtracted(f) - bias - dark * f.dark_time for f in flats], axis=0)
    return bias, dark, flat / flat.mean()


@pytest.fixture(scope="module")
def epoch0(small):
    cfg, sky, ep = small["config"], small["sky"], small["epochs"][0]
    return render_epoch(cfg, sky, ep, 0)


def test_calibrated_raw_matches_model_within_noise(small, epoch0):
    cfg, det = small["config"], small["detector"]
    m = epoch0
    raw = expose_object(cfg, det, m)
    assert raw.data.dtype == np.uint16 and raw.data.shape == (cfg.ny, cfg.nx + cfg.overscan_width)
    bias, dark, flat = _masters(cfg, det, m.epoch.band)
    electrons = (_overscan_subtracted(raw) - bias - dark * raw.dark_time) / flat * det.gain
    # expected noise: Poisson of the flat-fielded signal plus read noise, in flat-corrected electrons
    sigma = np.sqrt(m.model_e / flat + (det.read_noise / flat) ** 2)
    resid = (electrons - m.model_e) / sigma
    defects = (det.dark_rate > 1.0) | (det.flat[m.epoch.band] < 0.5)
    cr = ndimage.binary_dilation(m.cosmic_e > 0, iterations=1)
    # saturated stars: the bloomed columns differ from the model by design
    expected = m.model_e * det.flat[m.epoch.band] + det.dark_rate * raw.dark_time
    bled = ndimage.binary_dilation(bloom(expected, cfg.full_well) != expected, iterations=2)
    if m.sources.saturated.any():
        assert bled.any()
        sat = m.sources[m.sources.saturated].iloc[0]
        col = raw.image[:, int(round(sat.x))]
        assert (col >= raw.header["SATURATE"]).sum() >= 3  # a saturated, bled column in the raw
    good = ~defects & ~cr & ~bled
    assert good.mean() > 0.97
    assert abs(resid[good].mean()) < 0.02
    assert resid[good].std() == pytest.approx(1.0, abs=0.03)  # the stated noise level
    assert np.percentile(np.abs(resid[good]), 99.9) < 4.0
    # cosmic-ray pixels stand out: deposited charge is there
    if m.cosmic_e.any():
        hit = m.cosmic_e > 2000
        assert np.all((electrons - m.model_e)[hit] > 1000)
    # hot pixels stay bright in the raw (before dark subtraction)
    hot = det.dark_rate > 50
    if hot.any():
        raw_e = (_overscan_subtracted(raw) - bias) * det.gain
        assert np.median(raw_e[hot] - m.model_e[hot] * det.flat[m.epoch.band][hot]) > 0.5 * 50 * raw.dark_time


def test_gain_recoverable_from_flat_pair(small):
    cfg, det = small["config"], small["detector"]
    bias = _overscan_subtracted(expose_calibration(cfg, det, "BIAS", 0))
    f1 = _overscan_subtracted(expose_calibration(cfg, det, "FLAT", 0, band="r"))
    f2 = _overscan_subtracted(expose_calibration(cfg, det, "FLAT", 1, band="r"))
    ok = (det.flat["r"] > 0.5) & (det.dark_rate < 1)
    mean = 0.5 * (f1 + f2)[ok].mean() - bias[ok].mean()
    var = np.var((f1 - f2)[ok]) / 2 - det.read_noise**2 / det.gain**2
    assert mean / var == pytest.approx(det.gain, rel=0.03)  # photon transfer: var = mean / gain


def test_truth_positions_fluxes_and_psf(small, epoch0):
    cfg = small["config"]
    m = epoch0
    src = m.sources
    assert {"star", "galaxy"} <= set(src.kind)
    # positions agree with the true WCS
    ra, dec = m.wcs.all_pix2world(src.x.to_numpy(), src.y.to_numpy(), 0)
    np.testing.assert_allclose(ra, src.ra, atol=1e-9)
    np.testing.assert_allclose(dec, src.dec, atol=1e-9)
    # counts = flux * electrons per nJy / gain
    np.testing.assert_allclose(src.counts, src.flux_njy * electrons_per_njy(cfg, m.epoch) / m.gain, rtol=1e-12)
    assert m.njy_per_adu == pytest.approx(m.gain / m.electrons_per_njy)
    # isolated bright stars: aperture sum of the noiseless model equals the true flux, and
    # the measured FWHM equals the PSF's pixel-convolved FWHM
    pts = src[src.kind.isin(["star", "variable"]) & ~src.saturated].sort_values("flux_e", ascending=False)
    model = m.model_e - m.sky_e
    checked = 0
    for _, s in pts.iterrows():
        ix, iy = int(math.floor(s.x + 0.5)), int(math.floor(s.y + 0.5))
        r = 12
        if not (r <= ix < cfg.nx - r and r <= iy < cfg.ny - r):
            continue
        others = src[(np.hypot(src.x - s.x, src.y - s.y) < 30) & (src.object_id != s.object_id)]
        if len(others) or s.flux_e < 2e4:
            continue
        stamp = model[iy - r:iy + r + 1, ix - r:ix + r + 1]
        total = s.flux_e
        assert stamp.sum() == pytest.approx(total, rel=0.03)  # all but the far Moffat wings
        ref = fwhm_from_image(m.psf.image(s.x, s.y, 2 * r + 1))
        assert fwhm_from_image(stamp) == pytest.approx(ref, rel=0.03)
        assert s.psf_fwhm == pytest.approx(m.psf.fwhm(s.x, s.y))
        checked += 1
    assert checked >= 1
    # PSF FWHM follows the epoch's seeing and the configured variation
    assert m.psf.fwhm() == pytest.approx(m.epoch.seeing_px, rel=cfg.psf_variation + 0.01)


def test_point_sources_are_true_psf_times_true_flux():
    """Every point source's image is flux_e x the true PSF (normalised over the plane), faint or bright.

    The reference is the true PSF on a 151 px stamp (all but < 1e-5 of a Moffat there).
    Stamps used to be renormalised inside brightness-dependent sizes, which put the cut
    wings into the core: +0.45% on every star below 2e4 e- (2.5 FWHM stamps), +0.07%
    above (4 FWHM), a 0.4 sigma step at S/N ~ 90 on the tier boundary.
    """
    from archive.sim.config import SimConfig
    from archive.sim.render import WING_NOISE_FRACTION, plan_epochs, point_stamp_half
    from archive.sim.skymodel import make_sky

    cfg = SimConfig(size=384, n_epochs=1, seed=4, star_density=60.0, star_count_slope=0.1, galaxy_density=0.0,
                    n_transients=0, n_moving=0)
    sky = make_sky(cfg)
    m = render_epoch(cfg, sky, plan_epochs(cfg)[0], 0)
    src = m.sources
    pts = src[src.flux_e > 0]
    assert (pts.flux_e < 2e4).sum() > 20 and (pts.flux_e > 2e5).sum() >= 1
    big = 151
    ref = np.zeros((cfg.ny + 2 * big, cfg.nx + 2 * big))  # padded: stamps of sources near the edges fit
    stamps = m.psf.stamps(pts.x.to_numpy(), pts.y.to_numpy(), big, renormalize=True)
    for s, st in zip(pts.itertuples(), stamps):
        x0, y0 = m.psf.stamp_origin(s.x, s.y, big)
        ref[y0 + big:y0 + 2 * big, x0 + big:x0 + 2 * big] += s.flux_e * st
    ref = ref[big:-big, big:-big]
    diff = (m.model_e - m.sky_e) - ref
    # away from the edges (sources off the detector are not in the truth table) the image is the
    # sum of flux x PSF to a tiny fraction of the sky noise, cores included
    inner = np.s_[80:-80, 80:-80]
    assert np.abs(diff[inner]).max() < 5e-3 * np.sqrt(m.sky_e.min())
    # PSF-fit flux of each star on the noiseless image (neighbours' true models removed) is the truth
    fitted = []
    for s, st in zip(pts.itertuples(), stamps):
        ix, iy = int(math.floor(s.x + 0.5)), int(math.floor(s.y + 0.5))
        h = 8
        if not (88 <= ix < cfg.nx - 88 and 88 <= iy < cfg.ny - 88):
            continue
        c = big // 2
        p = st[c - h:c + h + 1, c - h:c + h + 1]
        own = (m.model_e - m.sky_e - ref)[iy - h:iy + h + 1, ix - h:ix + h + 1] + s.flux_e * p
        # error of the fitted flux in units of its noise (the star's and the sky's photons)
        sigma = math.sqrt(s.flux_e + m.sky_e.mean() / (p * p).sum())
        fitted.append(((p * own).sum() / (p * p).sum() - s.flux_e) / sigma)
    assert len(fitted) > 20 and np.abs(fitted).max() < 0.01
    # the wings left outside each stamp hold < WING_NOISE_FRACTION of the source's Poisson noise
    half = point_stamp_half(m.psf, pts.x.to_numpy(), pts.y.to_numpy(), pts.flux_e.to_numpy())
    for s, h, st in zip(pts.itertuples(), half, stamps):
        c = big // 2
        lost = s.flux_e * (1.0 - st[c - h:c + h + 1, c - h:c + h + 1].sum())
        assert lost < WING_NOISE_FRACTION * math.sqrt(s.flux_e)
    # peak_e: the brightest pixel of the source alone
    np.testing.assert_allclose(pts.peak_e, pts.flux_e * stamps.max(axis=(1, 2)), rtol=1e-4)
    ix = np.floor(pts.x.to_numpy() + 0.5).astype(int)
    iy = np.floor(pts.y.to_numpy() + 0.5).astype(int)
    ok = (ix >= 0) & (ix < cfg.nx) & (iy >= 0) & (iy < cfg.ny)
    sat = pts.peak_e.to_numpy()[ok] + m.sky_e[iy[ok], ix[ok]] > cfg.full_well
    np.testing.assert_array_equal(pts.saturated.to_numpy()[ok], sat)


def test_bad_epochs_and_artifacts(small):
    cfg, sky, eps = small["config"], small["sky"], small["epochs"]
    assert [e.quality for e in eps].count("clouds") == 1 and eps[2].quality == "clouds"
    assert eps[5].quality == "focus"
    good_seeing = np.median([e.seeing_px for e in eps if e.quality == "good"])
    assert eps[5].seeing_px > 1.6 * good_seeing
    assert eps[2].transparency < 0.35
    # the streak epoch has a streak along the recorded line
    m = render_epoch(cfg, sky, eps[3], 0)
    assert len(m.streaks) == 1
    st = m.streaks.iloc[0]
    t = np.linspace(0.1, 0.9, 9)
    xs = np.rint(st.x0 + t * (st.x1 - st.x0)).astype(int)
    ys = np.rint(st.y0 + t * (st.y1 - st.y0)).astype(int)
    excess = (m.model_e - m.sky_e)[ys, xs]
    peak = st.line_flux_e / (math.sqrt(2 * math.pi) * st.sigma_px)
    assert np.all(excess > 0.5 * peak)
    ra0, dec0 = m.wcs.all_pix2world([[st.x0, st.y0]], 0)[0]
    assert (ra0, dec0) == pytest.approx((st.ra0, st.dec0), abs=1e-9)
    # cosmic rays: recorded tracks carry charge
    assert len(m.cosmic_rays) > 0
    for _, c in m.cosmic_rays.iterrows():
        assert m.cosmic_e[int(round(c.y0)), int(round(c.x0))] > 0
    # throughput = zero point x extinction at the airmass x transparency (~30% in the cloudy epoch)
    def clear(ep):
        return electrons_per_njy(cfg, ep) / ep.transparency * 10 ** (0.4 * cfg.extinction[ep.band] * (ep.airmass - 1))

    assert clear(eps[2]) == pytest.approx(clear(eps[0]), rel=1e-12)
    assert clear(eps[0]) == pytest.approx(10 ** (-0.4 * (31.4 - cfg.zero_points["r"])) * cfg.exp_time)


def test_header_wcs_is_off_by_the_recorded_error(small):
    cfg, eps = small["config"], small["epochs"]
    from archive.sim.render import header_wcs, true_wcs

    ep = eps[1]
    tw, hw = true_wcs(cfg, ep, 0), header_wcs(cfg, ep, 0)
    c = (cfg.nx - 1) / 2.0
    a = SkyCoord(*tw.all_pix2world([[c, c]], 0)[0], unit="deg")
    b = SkyCoord(*hw.all_pix2world([[c, c]], 0)[0], unit="deg")
    expected = math.hypot(ep.wcs_dra_arcsec, ep.wcs_ddec_arcsec)
    # centre offset ~ pointing error (+ distortion and rotation error, < 0.5")
    assert a.separation(b).arcsec == pytest.approx(expected, abs=0.5)
    assert "SIP" in tw.wcs.ctype[0] and "SIP" not in hw.wcs.ctype[0]


def test_bloom_conserves_charge_along_columns():
    e = np.zeros((50, 4))
    e[20:22, 1] = 4e5
    e[5, 3] = 10.0
    out = bloom(e, 1e5)
    assert out.max() == 1e5
    assert out.sum() == pytest.approx(e.sum())
    assert np.count_nonzero(out[:, 1] == 1e5) == 8
    np.testing.assert_array_equal(out[:, [0, 2, 3]], e[:, [0, 2, 3]])


def test_poisson_counts_statistics():
    rng = np.random.default_rng(0)
    for lam in (3.0, 40.0, 800.0):
        x = poisson_counts(rng, np.full(200000, lam))
        assert x.mean() == pytest.approx(lam, rel=0.01)
        assert x.var() == pytest.approx(lam, rel=0.02)
        assert np.all(x == np.rint(x))


def test_light_curves_in_the_images():
    """Aperture photometry on the noiseless models follows the truth light curves of varying objects."""
    from archive.sim.config import SimConfig
    from archive.sim.render import plan_epochs
    from archive.sim.skymodel import make_sky

    # a sparse field full of variables and hostless transients
    cfg = SimConfig(size=320, n_epochs=6, seed=21, star_density=4.0, galaxy_density=2.0, variable_fraction=1.0,
                    n_transients=6, transient_host_fraction=0.0, bad_epochs={}, dither_arcsec=2.0)
    sky = make_sky(cfg)
    models = [render_epoch(cfg, sky, ep, 0) for ep in plan_epochs(cfg)]
    varying = sky[sky.kind.isin(["transient", "variable"]) & (sky.host_id < 0)].object_id
    checked = 0
    for oid in varying:
        meas, true = [], []
        for m in models:
            src = m.sources
            r = src[src.object_id == oid]
            if len(r) == 0:
                break
            r = r.iloc[0]
            rad = int(math.ceil(3 * r.psf_fwhm))
            ix, iy = int(math.floor(r.x + 0.5)), int(math.floor(r.y + 0.5))
            others = src[(src.object_id != oid) & (np.hypot(src.x - r.x, src.y - r.y) < 2 * rad)]
            if len(others) or not (rad <= ix < cfg.nx - rad and rad <= iy < cfg.ny - rad):
                break
            yy, xx = np.mgrid[iy - rad:iy + rad + 1, ix - rad:ix + rad + 1]
            ap = np.hypot(xx - r.x, yy - r.y) <= rad
            data = (m.model_e - m.sky_e)[iy - rad:iy + rad + 1, ix - rad:ix + rad + 1]
            p = m.psf.image(r.x, r.y, 2 * rad + 1)  # aperture correction from the epoch's PSF
            meas.append(data[ap].sum() / p[ap].sum() / m.gain)
            true.append(r.counts)
        else:
            meas, true = np.array(meas), np.array(true)
            np.testing.assert_allclose(meas, true, rtol=0.01, atol=0.002 * true.max())
            assert true.max() > 1.1 * true.min()  # it really varies over these epochs
            checked += 1
    assert checked >= 1
