"""Forced PSF photometry (archive.process.forced) on images made here with numpy.

Stars of known flux are drawn with the PSF's own unit-flux stamps (``PSF.stamps``, not
renormalised: the image holds exactly ``F P``) at sub-pixel positions, Gaussian noise of a
known variance is added and the same variance is the variance plane.  Pull = (measured -
true) / reported error.  Every test is seeded.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from archive.errors import ValidationError
from archive.image.calib import PhotoCalib
from archive.image.exposure import Exposure
from archive.image.psf import GaussianPSF, MoffatPSF
from archive.process import flags as F_
from archive.process.forced import ForcedConfig, forced_at_sky, forced_photometry
from archive.process.stamps import scatter_add, stamp_grid

SIGMA = 5.0  # sky noise (counts)


def draw(shape, psf, x, y, flux, size=41) -> np.ndarray:
    """Image of point sources ``flux * P`` (the PSF's unit-flux stamps, not renormalised)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    xc = np.floor(x + 0.5).astype(int)
    yc = np.floor(y + 0.5).astype(int)
    st = psf.stamps(x, y, size) * np.asarray(flux, float)[:, None, None]
    return scatter_add(shape, *stamp_grid(xc, yc, size), st)


def exposure_of(model, psf, rng, sigma=SIGMA, variance=None, mask=None, **kw) -> Exposure:
    var = np.full(model.shape, sigma**2) if variance is None else variance
    img = model + rng.normal(0.0, 1.0, model.shape) * np.sqrt(var)
    return Exposure(img, mask=mask, variance=var, psf=psf, **kw)


def random_field(psf, n=600, shape=(1024, 1024), seed=1, flux=(100.0, 2e4), edge=12):
    rng = np.random.default_rng(seed)
    x = rng.uniform(edge, shape[1] - 1 - edge, n)
    y = rng.uniform(edge, shape[0] - 1 - edge, n)
    f = np.exp(rng.uniform(np.log(flux[0]), np.log(flux[1]), n))
    return rng, x, y, f


def pulls(df, truth):
    return (df["psf_flux"].to_numpy() - truth) / df["psf_flux_err"].to_numpy()


def assert_unit_pulls(p, what=""):
    p = p[np.isfinite(p)]
    n = p.size
    assert n >= 200, f"{what}: only {n} sources"
    assert 0.9 <= p.std() <= 1.1, f"{what}: pull sigma {p.std():.3f} over {n}"
    assert abs(p.mean()) < 3.0 / math.sqrt(n), f"{what}: pull mean {p.mean():.3f} over {n}"


PSFS = {
    "gaussian": lambda: GaussianPSF(fwhm=3.0),
    # a Moffat whose FWHM varies by +-8% over the field: every position gets its own PSF
    "moffat": lambda: MoffatPSF(3.5, beta=3.0, variation=[0.08, -0.05], bbox=(0, 0, 1023, 1023), oversample=3),
}


@pytest.mark.parametrize("kind", sorted(PSFS))
def test_pulls_of_stars_of_known_flux(kind):
    """Measured: Gaussian 585 stars with S/N > 5, pull sigma 0.995, mean +0.013; Moffat (varying)
    540 stars, sigma 0.999, mean +0.020; median reduced chi^2 0.995 and 0.996."""
    psf = PSFS[kind]()
    rng, x, y, f = random_field(psf, seed=11)
    exp = exposure_of(draw((1024, 1024), psf, x, y, f), psf, rng)
    df = forced_photometry(exp, x, y)
    assert list(df.columns) == ["x", "y", "psf_flux", "psf_flux_err", "psf_chi2", "psf_ndof", "masked_fraction",
                                "flags", "moved"]
    assert np.array_equal(df["x"], x) and np.array_equal(df["y"], y) and not df["moved"].any()
    snr = f / df["psf_flux_err"].to_numpy()
    assert_unit_pulls(pulls(df, f)[snr > 5], kind)
    red = (df["psf_chi2"] / df["psf_ndof"]).median()
    assert 0.95 < red < 1.05
    # the error is the variance-plane formula 1 / sqrt(sum P^2 / V) for an isolated star
    iso = (df["flags"].to_numpy() & int(F_.FLAG_BLENDED)) == 0
    i = int(np.flatnonzero(iso)[0])
    s = df.attrs["stamp_size"]
    P = psf.stamps(x[i:i + 1], y[i:i + 1], s)[0]
    assert df["psf_flux_err"].iloc[i] == pytest.approx(SIGMA / math.sqrt((P * P).sum()), rel=1e-6)
    assert df.attrs["flux_unit"] == "count"


def test_empty_sky_gives_zero_with_errors_that_match_the_scatter():
    """Measured: 2308 positions, mean flux/err +0.025 (no background fit) and +0.017 (with),
    scatter over median error 0.989 and 0.995."""
    psf = GaussianPSF(fwhm=3.0)
    rng = np.random.default_rng(2)
    sx, sy = np.meshgrid(np.arange(40, 1000, 120.0), np.arange(40, 1000, 120.0))
    sx, sy = sx.ravel(), sy.ravel()
    sf = np.full(sx.size, 5e3)
    exp = exposure_of(draw((1024, 1024), psf, sx, sy, sf), psf, rng)
    # empty positions on a 20 px grid (independent stamps) at least 6 FWHM from every star
    ex, ey = np.meshgrid(np.arange(15, 1010, 20.0), np.arange(15, 1010, 20.0))
    ex = ex.ravel() + rng.uniform(-0.5, 0.5, ex.size)
    ey = ey.ravel() + rng.uniform(-0.5, 0.5, ey.size)
    far = np.min(np.hypot(ex[:, None] - sx[None], ey[:, None] - sy[None]), axis=1) > 18
    ex, ey = ex[far], ey[far]
    for bg in (False, True):
        df = forced_photometry(exp, ex, ey, ForcedConfig(fit_background=bg))
        fl = df["psf_flux"].to_numpy()
        err = df["psf_flux_err"].to_numpy()
        assert abs(np.mean(fl / err)) < 3 / math.sqrt(fl.size)
        assert np.std(fl) / np.median(err) == pytest.approx(1.0, abs=0.1)
        if bg:  # the background costs precision
            assert np.median(err) > 1.02 * np.median(forced_photometry(exp, ex, ey)["psf_flux_err"])


def test_blended_pairs_are_fitted_jointly_without_double_counting():
    """Pairs 1.5 FWHM apart, flux ratios 0.2-1: jointly fitted, the pulls of both members have
    sigma 1.019, mean -0.022 (400 sources); fitted one by one each gains 5.1% of the other's
    flux (pull mean +4.8)."""
    fwhm = 3.0
    psf = GaussianPSF(fwhm=fwhm)
    rng = np.random.default_rng(4)
    cx, cy = np.meshgrid(np.arange(30, 1000, 48.0), np.arange(30, 1000, 48.0))
    cx = cx.ravel()[:200] + rng.uniform(-0.5, 0.5, 200)
    cy = cy.ravel()[:200] + rng.uniform(-0.5, 0.5, 200)
    ang = rng.uniform(0, 2 * np.pi, cx.size)
    d = 1.5 * fwhm / 2
    x = np.r_[cx + d * np.cos(ang), cx - d * np.cos(ang)]
    y = np.r_[cy + d * np.sin(ang), cy - d * np.sin(ang)]
    f1 = rng.uniform(500, 5000, cx.size)
    f = np.r_[f1, f1 * rng.uniform(0.2, 1.0, cx.size)]
    exp = exposure_of(draw((1024, 1024), psf, x, y, f), psf, rng)
    df = forced_photometry(exp, x, y)
    assert (df["flags"].to_numpy() & int(F_.FLAG_BLENDED) != 0).all()
    assert_unit_pulls(pulls(df, f), "joint")
    # the sum of a pair is its total flux
    tot = df["psf_flux"].to_numpy()[:200] + df["psf_flux"].to_numpy()[200:]
    assert abs(np.mean(tot - (f[:200] + f[200:]))) < 3 * np.std(tot - (f[:200] + f[200:])) / math.sqrt(200)
    # fitted alone, each takes up part of the other's light: flux counted twice
    alone = forced_photometry(exp, x, y, ForcedConfig(blend_radius_fwhm=0.0, subtract_bright=False))
    assert np.mean(pulls(alone, f)) > 3.0
    # by the overlap of two pixel-integrated Gaussians d apart: exp(-d^2 / 4 (sigma^2 + 1/12)) = 0.051
    # of the other's flux
    other = np.r_[f[200:], f[:200]]
    excess = alone["psf_flux"].to_numpy() - f
    slope = (excess * other).sum() / (other * other).sum()
    sig2 = (fwhm / 2.35482) ** 2 + 1 / 12
    assert slope == pytest.approx(math.exp(-(1.5 * fwhm) ** 2 / (4 * sig2)), rel=0.1)
    # the joint errors are larger than the single-source ones (the pair's fluxes are correlated)
    assert (df["psf_flux_err"].to_numpy() > alone["psf_flux_err"].to_numpy()).all()


def test_groups_of_three_and_four_and_crowding():
    fwhm = 3.0
    psf = GaussianPSF(fwhm=fwhm)
    rng = np.random.default_rng(8)
    xs, ys, fs = [], [], []
    for gx in np.arange(40, 1000, 60.0):
        for gy in np.arange(40, 1000, 60.0):
            k = 3 if (gx + gy) % 120 == 0 else 4
            a = rng.uniform(0, 2 * np.pi) + np.arange(k) * 2 * np.pi / k
            r = 1.3 * fwhm
            xs += list(gx + r * np.cos(a))
            ys += list(gy + r * np.sin(a))
            fs += list(rng.uniform(1000, 4000, k))
    x, y, f = np.array(xs), np.array(ys), np.array(fs)
    exp = exposure_of(draw((1024, 1024), psf, x, y, f), psf, rng)
    df = forced_photometry(exp, x, y)
    assert_unit_pulls(pulls(df, f), "groups of 3-4")
    assert (df["flags"].to_numpy() & int(F_.FLAG_CROWDED) == 0).all()
    # with room for only one neighbour per fit the others are left out: CROWDED
    few = forced_photometry(exp, x, y, ForcedConfig(max_neighbours=1))
    assert (few["flags"].to_numpy() & int(F_.FLAG_CROWDED) != 0).all()


def test_duplicate_positions_measure_the_light_they_share():
    """Positions closer than min_separation_fwhm are not separated: each measures their common
    light (UNRESOLVED), its neighbours' fits see one of them, and all are BLENDED."""
    psf = GaussianPSF(fwhm=3.0)
    rng = np.random.default_rng(16)
    x = np.array([50.0, 54.0, 100.0])
    y = np.array([50.0, 50.0, 100.0])
    exp = exposure_of(draw((150, 150), psf, x, y, [1000.0, 500.0, 800.0]), psf, rng)
    once = forced_photometry(exp, x, y)
    twice = forced_photometry(exp, np.r_[x, 54.0, 54.05], np.r_[y, 50.0, 50.0])
    tol = 1e-4 * once["psf_flux_err"].to_numpy()  # float32 residual planes round differently
    assert np.all(np.abs(twice["psf_flux"][:3] - once["psf_flux"]) < tol)
    assert abs(twice["psf_flux"].iloc[3] - once["psf_flux"].iloc[1]) < tol[1]
    assert twice["psf_flux"].iloc[4] == pytest.approx(once["psf_flux"].iloc[1], abs=0.1 * once["psf_flux_err"].iloc[1])
    assert (twice["flags"].to_numpy()[[0, 1, 3, 4]] & int(F_.FLAG_BLENDED) != 0).all()
    unresolved = (twice["flags"].to_numpy() & int(F_.FLAG_UNRESOLVED)) != 0
    assert unresolved.tolist() == [False, True, False, True, True]


def test_bright_stars_outside_the_fit_are_modelled():
    """Faint stars 3-4 FWHM from stars 300x brighter (Moffat beta 2.5 wings), outside each
    other's fits: with the bright models subtracted the faint ones' pulls have sigma 0.956, mean
    -0.028 and the bright ones' 0.969, +0.015 (225 each); without, the faint ones carry the
    wings' light (pull mean +42.8)."""
    psf = MoffatPSF(3.0, beta=2.5, oversample=3)
    rng = np.random.default_rng(6)
    bx, by = np.meshgrid(np.arange(40, 1000, 64.0), np.arange(40, 1000, 64.0))
    bx, by = bx.ravel(), by.ravel()
    ang = rng.uniform(0, 2 * np.pi, bx.size)
    r = rng.uniform(3.0, 4.0, bx.size) * 3.0
    fx, fy = bx + r * np.cos(ang), by + r * np.sin(ang)
    x, y = np.r_[bx, fx], np.r_[by, fy]
    f = np.r_[np.full(bx.size, 3e5), np.full(bx.size, 1e3)]
    exp = exposure_of(draw((1024, 1024), psf, x, y, f, size=61), psf, rng)
    cfg = ForcedConfig(blend_radius_fwhm=2.0)
    on = forced_photometry(exp, x, y, cfg)
    off = forced_photometry(exp, x, y, ForcedConfig(blend_radius_fwhm=2.0, subtract_bright=False))
    faint = slice(bx.size, None)
    p_on, p_off = pulls(on, f)[faint], pulls(off, f)[faint]
    assert on.attrs["refit_for_bright"] > 0  # the bright ones' first fluxes held the faint ones' light
    assert abs(p_on.mean()) < 3 / math.sqrt(p_on.size) and 0.85 < p_on.std() < 1.15
    assert p_off.mean() > 20.0
    # and the bright ones lose nothing to their faint neighbours' first (wing-inflated) fluxes
    p_bright = pulls(on, f)[:bx.size]
    assert abs(p_bright.mean()) < 3 / math.sqrt(p_bright.size) and 0.85 < p_bright.std() < 1.15


def test_masked_pixels_are_excluded_and_flagged():
    psf = GaussianPSF(fwhm=3.0)
    rng = np.random.default_rng(3)
    n = 400
    x = np.tile(np.arange(30, 1000, 50.0), 20)[:n] + rng.uniform(-0.5, 0.5, n)
    y = np.repeat(np.arange(30, 1000, 50.0), 20)[:n] + rng.uniform(-0.5, 0.5, n)
    f = rng.uniform(2000, 8000, n)
    model = draw((1024, 1024), psf, x, y, f)
    planes = Exposure(np.zeros((1, 1))).mask_planes
    mask = np.zeros(model.shape, np.int32)
    xc, yc = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    # every star: a saturated pixel one right of the centre, a cosmic ray two above, an
    # interpolated pixel one below (usable), garbage values in the excluded ones
    mask[yc, xc + 1] |= 1 << planes["SAT"]
    mask[yc + 2, xc] |= 1 << planes["CR"]
    mask[yc - 1, xc] |= 1 << planes["INTRP"]
    exp = exposure_of(model, psf, rng, mask=mask)
    exp.image[yc, xc + 1] = 1e7
    exp.image[yc + 2, xc] = -1e6
    # and a variance hole (NaN) beside it: no weight either
    exp.variance[yc, xc - 2] = np.nan
    df = forced_photometry(exp, x, y)
    assert_unit_pulls(pulls(df, f), "masked")
    fl = df["flags"].to_numpy()
    for name in ("SAT", "CR", "INTRP"):
        assert (fl & (1 << planes[name]) != 0).all(), name
    assert (fl & (1 << planes["BAD"]) == 0).all()
    # masked fraction: the PSF flux on the three unusable pixels over the stamp's
    s = df.attrs["stamp_size"]
    P = psf.stamps(x, y, s)
    h = s // 2
    lost = P[:, h, h + 1] + P[:, h + 2, h] + P[:, h, h - 2]
    assert np.allclose(df["masked_fraction"], lost / P.sum(axis=(1, 2)), rtol=1e-9)
    assert (fl & int(F_.FLAG_MASKED_FRACTION) == 0).all()  # ~0.15 < 0.2
    strict = forced_photometry(exp, x, y, ForcedConfig(max_masked_fraction=0.05))
    assert (strict["flags"].to_numpy() & int(F_.FLAG_MASKED_FRACTION) != 0).all()
    # a star whose whole stamp is NO_DATA is not measured
    exp.mask[int(yc[0]) - 10:int(yc[0]) + 11, int(xc[0]) - 10:int(xc[0]) + 11] |= 1 << planes["NO_DATA"]
    one = forced_photometry(exp, x[:1], y[:1])
    assert np.isnan(one["psf_flux"].iloc[0]) and one["masked_fraction"].iloc[0] == 1.0
    assert one["flags"].iloc[0] & int(F_.FLAG_PSF_FLUX) and one["flags"].iloc[0] & (1 << planes["NO_DATA"])


def test_positions_off_the_image_are_flagged_not_raised():
    psf = GaussianPSF(fwhm=3.0)
    rng = np.random.default_rng(9)
    x = np.array([-5.0, 300.0, np.nan, 10.0, 0.3, 128.0, 128.0])
    y = np.array([50.0, 60.0, 70.0, np.inf, 120.0, 1e12, 255.4])
    f = np.array([0, 0, 0, 0, 3000.0, 0, 2000.0])
    exp = exposure_of(draw((256, 256), psf, x[[4, 6]], y[[4, 6]], f[[4, 6]]), psf, rng)
    df = forced_photometry(exp, x, y)
    fl = df["flags"].to_numpy()
    off = np.array([True, True, True, True, False, True, False])
    assert ((fl & int(F_.FLAG_OFF_IMAGE)) != 0).tolist() == off.tolist()
    assert (fl[off] & int(F_.FLAG_PSF_FLUX) != 0).all() and df["psf_flux"][off].isna().all()
    # partly off: measured from the part on the image, unbiased, STAMP_EDGE
    for i in (4, 6):
        assert fl[i] & int(F_.FLAG_STAMP_EDGE) and not fl[i] & int(F_.FLAG_OFF_IMAGE)
        assert 0.2 < df["masked_fraction"].iloc[i] < 0.6  # 0.26 and 0.47 of a Gaussian's flux
        assert fl[i] & int(F_.FLAG_MASKED_FRACTION)
        assert abs(df["psf_flux"].iloc[i] - f[i]) < 4 * df["psf_flux_err"].iloc[i]
    assert len(forced_photometry(exp, [], [])) == 0


def _wcs(n=512, ra0=150.0, dec0=2.0, scale=0.2):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [n / 2 + 0.5, n / 2 + 0.5]
    w.wcs.cd = np.array([[-scale, 0.0], [0.0, scale]]) / 3600.0
    w.pixel_shape = (n, n)
    return w


def test_forced_at_sky_maps_through_the_wcs_and_marks_off_image():
    psf = GaussianPSF(fwhm=3.0)
    rng = np.random.default_rng(10)
    wcs = _wcs()
    x = rng.uniform(10, 500, 200)
    y = rng.uniform(10, 500, 200)
    f = rng.uniform(1000, 5000, 200)
    exp = exposure_of(draw((512, 512), psf, x, y, f), psf, rng, wcs=wcs,
                      photo_calib=PhotoCalib(2.5))
    ra, dec = wcs.all_pix2world(x, y, 0)
    ra = np.r_[ra, 150.2, 330.0, np.nan]  # off the image, on the far side of the sky, not finite
    dec = np.r_[dec, 2.0, -2.0, 1.0]
    df = forced_at_sky(exp, ra, dec)
    assert list(df.columns[:2]) == ["ra", "dec"] and np.array_equal(df["ra"], ra, equal_nan=True)
    assert np.allclose(df["x"][:200], x, atol=1e-6) and np.allclose(df["y"][:200], y, atol=1e-6)
    fl = df["flags"].to_numpy()
    assert (fl[200:] & int(F_.FLAG_OFF_IMAGE) != 0).all() and (fl[:200] & int(F_.FLAG_OFF_IMAGE) == 0).all()
    # calibrated: nJy = counts x nJy per count
    assert df.attrs["flux_unit"] == "nJy"
    assert_unit_pulls(pulls(df.iloc[:200], 2.5 * f), "sky")
    raw = forced_photometry(exp, x, y, ForcedConfig(calibrate=False))
    assert raw.attrs["flux_unit"] == "count"
    # x, y through the WCS (1e-10 px) and float32 residual planes: equal to 1e-4 of the errors
    assert np.all(np.abs(df["psf_flux"][:200] - 2.5 * raw["psf_flux"]) < 1e-4 * df["psf_flux_err"][:200])


def test_recentring_follows_last_rule():
    """A 0.1 px error is corrected (to ~0.002 px on a S/N ~ 400 star); a 1 px error is refused:
    the given position is kept and CENTROID set; without recentring nothing moves."""
    psf = GaussianPSF(fwhm=3.0)
    rng = np.random.default_rng(12)
    tx = np.array([100.3, 200.71, 300.5, 400.0])
    ty = np.array([100.6, 150.2, 300.45, 420.9])
    f = np.full(4, 3e4)
    exp = exposure_of(draw((512, 512), psf, tx, ty, f), psf, rng)
    gx = tx + np.array([0.1, -0.07, 1.0, 0.0])
    gy = ty + np.array([0.0, 0.07, 0.0, -1.0])
    df = forced_photometry(exp, gx, gy, ForcedConfig(recenter=True))
    assert df["moved"].tolist() == [True, True, False, False]
    fl = df["flags"].to_numpy()
    assert ((fl & int(F_.FLAG_CENTROID)) != 0).tolist() == [False, False, True, True]
    assert np.hypot(df["x"][:2] - tx[:2], df["y"][:2] - ty[:2]).max() < 0.01
    assert np.array_equal(df["x"][2:], gx[2:]) and np.array_equal(df["y"][2:], gy[2:])
    # the corrected positions give the true flux
    fixed = forced_photometry(exp, gx, gy)
    assert not fixed["moved"].any() and np.array_equal(fixed["x"], gx)
    assert np.all(np.abs(df["psf_flux"][:2] - f[:2]) < 3 * df["psf_flux_err"][:2])
    # the error of a moved isolated star: the position is orthogonal to the flux, nothing added
    assert np.allclose(df["psf_flux_err"][:2], fixed["psf_flux_err"][:2], rtol=1e-3)
    # a faint star is not recentred (below recenter_min_snr): not moved, not flagged
    faint = forced_photometry(exp, [50.0], [450.0], ForcedConfig(recenter=True))
    assert not faint["moved"].iloc[0] and faint["flags"].iloc[0] == 0


def test_recentring_refuses_every_offset_beyond_the_cap():
    """Stars given 0.3 to 6 px off (FWHM 4.7, S/N ~ 450 at the star): every one is kept at the
    given position with CENTROID set, however far (the linearised shift of the first iteration
    is already past 0.2 px); 0.1 px off, every one moves back.  A second list entry 2 px from a
    star that is listed at its place is fitted jointly with it: the listed one takes the light
    and moves, the other is faint (below recenter_min_snr), neither moved nor flagged."""
    psf = MoffatPSF(4.7, beta=3.5, oversample=3)
    rng = np.random.default_rng(21)
    gx0, gy0 = np.meshgrid(np.arange(8) * 60 + 40.0, np.arange(8) * 60 + 40.0)
    n = gx0.size
    tx = gx0.ravel() + rng.uniform(-0.5, 0.5, n)
    ty = gy0.ravel() + rng.uniform(-0.5, 0.5, n)
    exp = exposure_of(draw((512, 512), psf, tx, ty, np.full(n, 2e4), size=61), psf, rng)
    cfg = ForcedConfig(recenter=True)
    for d in (0.1, 0.3, 1.0, 2.0, 4.0, 6.0):
        ang = rng.uniform(0.0, 2 * np.pi, n)
        gx, gy = tx + d * np.cos(ang), ty + d * np.sin(ang)
        df = forced_photometry(exp, gx, gy, cfg)
        centroid = (df["flags"].to_numpy() & int(F_.FLAG_CENTROID)) != 0
        assert np.hypot(df["x"] - gx, df["y"] - gy).max() <= 0.2 + 1e-12
        if d < 0.2:
            assert df["moved"].all() and not centroid.any(), d
        else:
            assert centroid.all() and not df["moved"].any(), d
            assert np.array_equal(df["x"], gx) and np.array_equal(df["y"], gy)
    twins = forced_photometry(exp, np.r_[tx + 0.1, tx + 2.0], np.r_[ty, ty], cfg)
    centroid = (twins["flags"].to_numpy() & int(F_.FLAG_CENTROID)) != 0
    assert twins["moved"][:n].all() and not centroid[:n].any()
    assert not twins["moved"][n:].any() and not centroid[n:].any()


def test_background_in_the_variance_plane_and_fitted():
    """A calexp-like image: sky 400 counts/px subtracted, leaving a residual of 3 + 4e-3 x
    counts; variance plane = sky + stars.  With the background fitted the pulls (412 stars,
    S/N > 5) have sigma 1.010, mean +0.031; without, the residual biases every flux upward
    (pull mean +1.34)."""
    psf = MoffatPSF(3.0, beta=3.5, oversample=3)
    rng, x, y, f = random_field(psf, n=500, seed=13, flux=(300.0, 3e4))
    model = draw((1024, 1024), psf, x, y, f)
    var = 400.0 + model
    resid = 3.0 + 4e-3 * np.arange(1024)[None, :] * np.ones((1024, 1))
    exp = exposure_of(model + resid, psf, rng, variance=var)
    df = forced_photometry(exp, x, y, ForcedConfig(fit_background=True))
    snr = f / df["psf_flux_err"].to_numpy()
    assert_unit_pulls(pulls(df, f)[snr > 5], "background fitted")
    # without the background term every flux takes up the residual sky: sum(P) / sum(P^2 / V) x b
    plain = forced_photometry(exp, x, y)
    assert np.mean(pulls(plain, f)[snr > 5]) > 1.0


def test_agrees_with_photutils_psf_photometry_at_fixed_positions():
    """Same image, same pixel-integrated Gaussian (photutils' CircularGaussianPRF), same 13 x 13
    fit stamps and weights, 144 stars: fluxes agree to 1.0e-5 of their errors at most (the bright
    stars' models are subtracted in float32), errors to 1.5e-8."""
    from photutils.psf import CircularGaussianPRF, PSFPhotometry

    psf = GaussianPSF(fwhm=3.0)
    rng = np.random.default_rng(14)
    g = np.arange(20, 500, 40.0)
    gx, gy = np.meshgrid(g, g)
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    f = np.exp(rng.uniform(np.log(50.0), np.log(2e4), x.size))
    exp = exposure_of(draw((512, 512), psf, x, y, f), psf, rng)
    ours = forced_photometry(exp, x, y, ForcedConfig(stamp_size=13))
    model = CircularGaussianPRF(fwhm=3.0)
    model.x_0.fixed = True
    model.y_0.fixed = True
    model.fwhm.fixed = True
    phot = PSFPhotometry(model, (13, 13), aperture_radius=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tab = phot(exp.image.astype(float), error=np.sqrt(exp.variance.astype(float)),
                   init_params=Table({"x": x, "y": y, "flux": np.full(x.size, 100.0)}))
    err = ours["psf_flux_err"].to_numpy()
    assert np.max(np.abs(ours["psf_flux"].to_numpy() - np.asarray(tab["flux_fit"])) / err) < 1e-4
    assert np.allclose(np.asarray(tab["flux_err"]), err, rtol=1e-4)


def test_chunking_does_not_change_results_and_bad_input_is_refused():
    psf = GaussianPSF(fwhm=3.0)
    rng, x, y, f = random_field(psf, n=300, shape=(512, 512), seed=15)
    exp = exposure_of(draw((512, 512), psf, x, y, f), psf, rng)
    a = forced_photometry(exp, x, y, ForcedConfig(fit_background=True))
    b = forced_photometry(exp, x, y, ForcedConfig(fit_background=True, chunk_pixels=10_000))
    assert np.allclose(a["psf_flux"], b["psf_flux"], rtol=1e-12, atol=1e-9, equal_nan=True)
    assert np.array_equal(a["flags"], b["flags"])
    with pytest.raises(ValidationError, match="stamp_size"):
        forced_photometry(exp, x, y, ForcedConfig(stamp_size=12))
    with pytest.raises(ValidationError, match="max_shift"):
        forced_photometry(exp, x, y, ForcedConfig(max_shift=-1.0))
    with pytest.raises(ValidationError, match="x and y"):
        forced_photometry(exp, x, y[:-1])
    with pytest.raises(ValidationError, match="no PSF"):
        forced_photometry(Exposure(exp.image, variance=exp.variance), x, y)
    with pytest.raises(ValidationError, match="no WCS"):
        forced_at_sky(exp, [150.0], [2.0])
