"""Relative astrometry across epochs, against known truth."""

import numpy as np
import pandas as pd
import pytest
from astropy.wcs import WCS

from archive.errors import ValidationError
from archive.process.astrometry_relative import RelativeAstrometryConfig, refine_epochs

PIX = 0.2 / 3600.0  # deg per pixel
SHAPE = (1024, 1024)


def _tan(ra0, dec0, rot_deg, scale=1.0):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [512.5, 512.5]
    w.wcs.crval = [ra0, dec0]
    t = np.radians(rot_deg)
    w.wcs.cd = PIX * scale * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    w.wcs.set()
    w.pixel_shape = SHAPE[::-1]
    return w


def _sep_mas(w1, w2, x, y):
    r1, d1 = w1.all_pix2world(x, y, 0)
    r2, d2 = w2.all_pix2world(x, y, 0)
    return np.hypot((r1 - r2) * np.cos(np.radians(d1)), d1 - d2) * 3.6e6


@pytest.fixture(scope="module")
def field():
    """6 dithered epochs of 1500 stars; each epoch's 'reference-fitted' WCS is off by
    ~30 mas (offset, rotation, scale) as a fit to a few noisy reference stars is."""
    rng = np.random.default_rng(3)
    ra0, dec0 = 150.0, 2.0
    n = 2500
    ra = ra0 + rng.uniform(-0.036, 0.036, n) / np.cos(np.radians(dec0))
    dec = dec0 + rng.uniform(-0.036, 0.036, n)
    mag = rng.uniform(16, 22, n)
    snr = 10 ** (-0.4 * (mag - 24.0))
    true, guess, srcs = [], [], []
    for i in range(6):
        dra, ddec = rng.normal(0, 20, 2) / 3600.0
        rot = rng.normal(0, 0.3)
        wt = _tan(ra0 + dra, dec0 + ddec, rot)
        x, y = wt.all_world2pix(ra, dec, 0)
        err = np.hypot(4.0 / (2.35 * snr), 0.002)  # centroid error (px)
        inside = (x > 5) & (x < SHAPE[1] - 5) & (y > 5) & (y < SHAPE[0] - 5) & (snr > 10)
        xo = x + rng.normal(0, 1, n) * err
        yo = y + rng.normal(0, 1, n) * err
        srcs.append(pd.DataFrame({"x": xo[inside], "y": yo[inside], "x_err": err[inside], "y_err": err[inside],
                                  "snr": snr[inside], "flags": np.zeros(inside.sum(), dtype=np.int64)}))
        off = rng.normal(0, 30, 2) / 3.6e6
        wg = _tan(ra0 + dra + off[0] / np.cos(np.radians(dec0)), dec0 + ddec + off[1],
                  rot + rng.normal(0, 2e-3), 1.0 + rng.normal(0, 2e-5))
        true.append(wt)
        guess.append(wg)
    bright = mag < 19.5
    ref_err = np.maximum(1.0, 5.0 * 10 ** (0.2 * (mag[bright] - 17.0)))
    refcat = pd.DataFrame({"ra": ra[bright] + rng.normal(0, 1, bright.sum()) * ref_err / 3.6e6 / np.cos(np.radians(dec0)),
                           "dec": dec[bright] + rng.normal(0, 1, bright.sum()) * ref_err / 3.6e6,
                           "ra_err": ref_err, "dec_err": ref_err})
    return true, guess, srcs, refcat


def test_refinement_recovers_the_true_wcs(field):
    true, guess, srcs, refcat = field
    gx, gy = np.meshgrid(np.linspace(40, 983, 9), np.linspace(40, 983, 9))
    before = np.array([np.sqrt(np.mean(_sep_mas(t, g, gx.ravel(), gy.ravel()) ** 2)) for t, g in zip(true, guess)])
    res = refine_epochs(srcs, guess, [SHAPE] * 6, refcat=refcat)
    after = np.array([np.sqrt(np.mean(_sep_mas(t, w, gx.ravel(), gy.ravel()) ** 2)) for t, w in zip(true, res.wcs)])
    assert res.refined.all() and res.n_stars > 500 and (res.n_used > 400).all()
    # every epoch lands within a few mas of its true WCS (it started ~30-40 mas off)
    assert before.min() > 10 and after.max() < 5.0, (before, after)
    # the epochs agree with each other: residuals to the other epochs' mean drop towards the
    # centroid noise (S/N 10-2500 stars: 1-35 mas)
    assert (res.rms_after_mas < 0.8 * res.rms_before_mas).all()
    # the common catalog sits on the true positions
    assert res.stars["n_epochs"].min() >= 3 and (res.stars["ref"] >= 0).sum() > 100
    # inputs untouched
    assert _sep_mas(guess[0], field[1][0], gx.ravel(), gy.ravel()).max() == 0.0


def test_without_reference_the_epochs_still_agree(field):
    true, guess, srcs, _ = field
    res = refine_epochs(srcs, guess, [SHAPE] * 6, refcat=None)
    assert (res.rms_after_mas < 0.8 * res.rms_before_mas).all()
    # the frame is the mean of the inputs (off by their mean error), but the epochs sit right
    # relative to each other: epoch i minus epoch 0 as in the truth, to a few mas
    gx, gy = np.meshgrid(np.linspace(40, 983, 9), np.linspace(40, 983, 9))
    x, y = gx.ravel(), gy.ravel()

    def offsets(ws, i):
        r0, d0 = ws[0].all_pix2world(x, y, 0)
        ri, di = ws[i].all_pix2world(x, y, 0)
        return np.c_[(ri - r0) * np.cos(np.radians(d0)), di - d0] * 3.6e6

    for i in range(1, 6):
        diff = offsets(true, i) - offsets(res.wcs, i)
        before = offsets(true, i) - offsets(guess, i)
        assert np.sqrt(np.mean(diff ** 2)) < 5.0 < np.sqrt(np.mean(before ** 2))


def test_bad_inputs(field):
    _, guess, srcs, _ = field
    with pytest.raises(ValidationError, match="2 WCSs"):
        refine_epochs(srcs[:3], guess[:2], [SHAPE] * 3)
    with pytest.raises(ValidationError, match="at least 2 epochs"):
        refine_epochs(srcs[:1], guess[:1], [SHAPE])
    with pytest.raises(ValidationError, match="epoch 1 lacks column 'y'"):
        refine_epochs([srcs[0], srcs[1].drop(columns="y")], guess[:2], [SHAPE] * 2)
    with pytest.raises(ValidationError, match="no star is detected"):
        far = srcs[1].assign(x=srcs[1].x + 500.0)  # nothing lines up
        refine_epochs([srcs[0], far], guess[:2], [SHAPE] * 2, config=RelativeAstrometryConfig(min_epochs=2,
                                                                                              match_radius_arcsec=0.01))


def test_simulated_epochs_processed_end_to_end():
    """Simulated calexps -> sources -> reference fits from the header WCS -> joint refinement,
    scored against the simulator's true TAN-SIP WCSs (radial cubic distortion)."""
    from archive.process import characterize
    from archive.process.astrometry import fit_astrometry
    from archive.sim import SimConfig
    from archive.sim.calexp import make_calexp
    from archive.sim.render import header_wcs, plan_epochs, render_epoch, true_wcs
    from archive.sim.skymodel import make_reference_catalog, make_sky

    cfg = SimConfig(seed=13, n_epochs=5, size=640, star_density=60, bad_epochs={}, streak_epochs=())
    sky = make_sky(cfg)
    ref = make_reference_catalog(cfg, sky)
    srcs, fits, trues, shapes = [], [], [], []
    for ep in plan_epochs(cfg):
        exp = make_calexp(cfg, render_epoch(cfg, sky, ep, 0), cosmic_rays=False)
        res = characterize.run(exp)
        fit = fit_astrometry(res.sources, ref, header_wcs(cfg, ep, 0), exp.image.shape, ref_mag="r")
        srcs.append(res.sources)
        fits.append(fit.wcs)
        trues.append(true_wcs(cfg, ep, 0))
        shapes.append(exp.image.shape)
    out = refine_epochs(srcs, fits, shapes, refcat=ref)
    gx, gy = np.meshgrid(np.linspace(30, 610, 9), np.linspace(30, 610, 9))

    def errors(ws):
        e = np.array([np.c_[(a[0] - b[0]) * np.cos(np.radians(b[1])), a[1] - b[1]] * 3.6e6 for a, b in
                      ((w.all_pix2world(gx.ravel(), gy.ravel(), 0), t.all_pix2world(gx.ravel(), gy.ravel(), 0))
                       for w, t in zip(ws, trues))])
        absolute = np.sqrt((e ** 2).mean(axis=(1, 2)))
        relative = np.sqrt(((e - e.mean(axis=0)) ** 2).mean(axis=(1, 2)))  # common error removed
        return absolute, relative

    abs0, rel0 = errors(fits)
    abs1, rel1 = errors(out.wcs)
    assert out.refined.all() and out.n_stars > 80 and out.n_reference > 20
    # measured: absolute 8.7-22.9 -> 5.4-8.7 mas, epoch-to-epoch 9.8-17.0 -> 2.1-6.6 mas
    assert abs1.mean() < 0.7 * abs0.mean() and abs1.max() < abs0.max()
    assert rel1.mean() < 0.5 * rel0.mean()
