"""Coadds without the known artifacts, on epochs made here with numpy (dithered, rotated grids,
Gaussian PSFs of different widths): cosmic rays, a satellite streak and a transient seen once
are clipped and leave no trace in the variance; variables and bright stars are kept; the
variance plane is flat and predicts the noise; the coadd PSF matches its stars."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from archive.image.exposure import Exposure, ExposureInfo
from archive.image.psf import GaussianPSF, fwhm_from_image
from archive.process.coadd import (ArtifactConfig, CoaddConfig, SelectConfig, combine, find_artifacts,
                                   match_backgrounds, max_artifact_epochs, select_inputs, target_fwhm)
from archive.process.warp import footprint_bbox, psf_match, warp_exposure

N_EP = 8
SIZE = 300
SKY_SIGMA = 10.0


def _wcs(n, dx=0.0, dy=0.0, rot_deg=0.0, ra0=150.0, dec0=2.0):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [n / 2 + 0.5 + dx, n / 2 + 0.5 + dy]
    t = np.radians(rot_deg)
    w.wcs.cd = (0.2 / 3600) * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    return w


@dataclasses.dataclass
class Field:
    epochs: list[Exposure]
    stars: pd.DataFrame            # ra, dec, flux (mean), kind: star | variable
    fluxes: np.ndarray             # (epoch, star) true flux
    transient: tuple[float, float]  # ra, dec (epoch 2 only)
    crs: list[list[tuple[float, float]]]  # per epoch: ra, dec of unmasked cosmic rays
    streak_epoch: int
    streak: tuple[float, float, float, float]  # ra0, dec0, ra1, dec1


def _add(img, psf, x, y, flux):
    size = 31
    stamp = psf.image(x, y, size)
    x0, y0 = int(np.floor(x + 0.5)) - size // 2, int(np.floor(y + 0.5)) - size // 2
    ys, xs = slice(max(y0, 0), min(y0 + size, img.shape[0])), slice(max(x0, 0), min(x0 + size, img.shape[1]))
    img[ys, xs] += flux * stamp[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]


@pytest.fixture(scope="module")
def field() -> Field:
    rng = np.random.default_rng(42)
    ref = _wcs(SIZE)
    pts = []
    while len(pts) < 40:  # isolated stars (25 px apart): their stamps measure one star each
        p = rng.uniform(30, SIZE - 30, 2)
        if all(np.hypot(*(p - q)) > 25 for q in pts) and np.hypot(p[0] - 150, p[1] - 110) > 25:
            pts.append(p)
    n_star = len(pts)
    sx, sy = np.array(pts).T
    flux = 10 ** rng.uniform(3.0, 5.3, n_star)
    kind = np.array(["star"] * n_star, dtype=object)
    kind[:3] = "variable"
    sra, sdec = ref.all_pix2world(sx, sy, 0)
    stars = pd.DataFrame({"ra": sra, "dec": sdec, "flux": flux, "kind": kind})
    fluxes = np.tile(flux, (N_EP, 1))
    fluxes[:, :3] *= 1 + 0.4 * np.sin(np.arange(N_EP)[:, None] * 1.3 + np.arange(3)[None])
    tra, tdec = ref.all_pix2world([150.0], [110.0], 0)
    epochs, crs = [], []
    streak_epoch = 4
    s_ra, s_dec = ref.all_pix2world([20.0, 280.0], [250.0, 205.0], 0)
    for e in range(N_EP):
        w = _wcs(SIZE, dx=rng.uniform(-6, 6), dy=rng.uniform(-6, 6), rot_deg=rng.uniform(-0.5, 0.5))
        psf = GaussianPSF(sigma=1.2 + 0.08 * e)
        img = rng.normal(0, SKY_SIGMA, (SIZE, SIZE)).astype(np.float64)
        x, y = w.all_world2pix(sra, sdec, 0)
        for k in range(n_star):
            _add(img, psf, x[k], y[k], fluxes[e, k])
        if e == 2:
            tx, ty = w.all_world2pix(tra, tdec, 0)
            _add(img, psf, tx[0], ty[0], 3e4)
        cr_here = []
        for _ in range(3):  # unmasked cosmic rays: sharp, 1-3 px
            cx, cy = rng.integers(20, SIZE - 20, 2)
            img[cy, cx:cx + rng.integers(1, 4)] += rng.uniform(3e3, 2e4)
            a, d = w.all_pix2world([cx], [cy], 0)
            cr_here.append((float(a[0]), float(d[0])))
        crs.append(cr_here)
        if e == streak_epoch:  # an unmasked satellite streak
            lx, ly = w.all_world2pix(s_ra, s_dec, 0)
            t = np.linspace(0, 1, 2000)
            px, py = lx[0] + t * (lx[1] - lx[0]), ly[0] + t * (ly[1] - ly[0])
            yy, xx = np.mgrid[0:SIZE, 0:SIZE]
            for xi, yi in zip(px[::20], py[::20]):
                d2 = (xx - xi) ** 2 + (yy - yi) ** 2
                img += 40.0 * np.exp(-0.5 * d2 / 1.5 ** 2) * (d2 < 36)
        var = np.full((SIZE, SIZE), SKY_SIGMA ** 2) + np.clip(img, 0, None)  # sky + source Poisson (gain 1)
        epochs.append(Exposure(img.astype(np.float32), variance=var.astype(np.float32), wcs=w, psf=psf,
                               info=ExposureInfo(band="r", visit=e + 1, detector=0, mjd=60000.0 + e,
                                                 exp_time=30.0)))
    return Field(epochs, stars, fluxes, (float(tra[0]), float(tdec[0])), crs, streak_epoch,
                 (float(s_ra[0]), float(s_dec[0]), float(s_ra[1]), float(s_dec[1])))


@pytest.fixture(scope="module")
def coadded(field):
    tile_wcs, shape = _wcs(360), (360, 360)
    warps = [warp_exposure(e, tile_wcs, shape, footprint_bbox(e, tile_wcs, shape)) for e in field.epochs]
    fw = [w.psf.fwhm(w.shape[1] / 2, w.shape[0] / 2) for w in warps]
    matched = [psf_match(w, f, target_fwhm(fw)) for w, f in zip(warps, fw)]
    clipped = find_artifacts(matched)
    res = combine(warps, clipped, target_wcs=tile_wcs)
    return warps, clipped, res


def _at(exp: Exposure, ra, dec):
    x, y = exp.wcs.all_world2pix(np.atleast_1d(ra), np.atleast_1d(dec), 0)
    return np.round(x).astype(int), np.round(y).astype(int)


def test_single_epoch_artifacts_are_clipped(field, coadded):
    warps, clipped, res = coadded
    # the transient of epoch 2 and every cosmic ray
    x, y = _at(warps[2], *field.transient)
    assert clipped[2][y[0], x[0]]
    for e, crs in enumerate(field.crs):
        for ra, dec in crs:
            x, y = _at(warps[e], ra, dec)
            if 3 <= x[0] < warps[e].shape[1] - 3 and 3 <= y[0] < warps[e].shape[0] - 3:
                assert clipped[e][y[0], x[0]], (e, ra, dec)
    # the streak's core along its length
    ra0, dec0, ra1, dec1 = field.streak
    t = np.linspace(0.1, 0.9, 40)
    x, y = _at(warps[field.streak_epoch], ra0 + t * (ra1 - ra0), dec0 + t * (dec1 - dec0))
    assert clipped[field.streak_epoch][y, x].mean() > 0.95
    # and nothing of the static sky: variable stars and bright stars' cores stay in every epoch
    # (a variable even where the streak crosses it; a constant star under the streak goes with it)
    sx, sy = _at(warps[field.streak_epoch], np.array([ra0, ra1]), np.array([dec0, dec1]))
    for _, s in field.stars.iterrows():
        for e, w in enumerate(warps):
            x, y = _at(w, s.ra, s.dec)
            if e == field.streak_epoch and s.kind == "star":
                d = abs((sx[1] - sx[0]) * (sy[0] - y[0]) - (sx[0] - x[0]) * (sy[1] - sy[0])) / np.hypot(
                    sx[1] - sx[0], sy[1] - sy[0])
                if d < 12:  # a constant star under the streak is clipped with it
                    continue
            cx, cy = _at(w, np.array([c[0] for c in field.crs[e]]), np.array([c[1] for c in field.crs[e]]))
            if np.hypot(cx - x[0], cy - y[0]).min() < 10:  # and one hit by a cosmic ray, in that epoch
                continue
            assert not clipped[e][y[0], x[0]], (s.kind, s.flux, e)
    assert max_artifact_epochs(N_EP, ArtifactConfig()) == 2


def test_artifacts_leave_no_trace_in_image_or_variance(field, coadded):
    _, _, res = coadded
    co = res.coadd
    sigma = np.sqrt(co.variance)
    positions = [field.transient] + [p for crs in field.crs for p in crs]
    ra0, dec0, ra1, dec1 = field.streak
    positions += [(ra0 + t * (ra1 - ra0), dec0 + t * (dec1 - dec0)) for t in np.linspace(0.1, 0.9, 9)]
    bright = field.stars[field.stars["flux"] > 5e3]
    for ra, dec in positions:
        x, y = _at(co, ra, dec)
        x, y = x[0], y[0]
        bx, by = _at(co, bright["ra"].to_numpy(), bright["dec"].to_numpy())
        if np.hypot(bx - x, by - y).min() < 15:  # on a star: its own photon noise dominates there
            continue
        # no relic: where the artifact was, the variance is what the inputs accepted there give
        # (scaled to the same number of inputs, it is within 20 % of its surroundings) ...
        scaled = np.where(res.n_image > 0, co.variance * res.n_image, np.nan)
        near = scaled[y - 12:y + 13, x - 12:x + 13]
        inner = scaled[y - 2:y + 3, x - 2:x + 3]
        assert inner.max() < 1.2 * np.median(near) and inner.min() > 0.8 * np.median(near), (ra, dec)
        # ... and at most that of one input fewer (8/7) plus the weights' spread: never a relic
        raw = co.variance[y - 12:y + 13, x - 12:x + 13]
        assert co.variance[y - 2:y + 3, x - 2:x + 3].max() < 1.5 * np.median(raw), (ra, dec)
        # and the image shows the static sky there (nothing of the artifact's flux)
        assert abs(co.image[y, x]) < 5 * sigma[y, x] or any(
            np.hypot(*((field.stars[["ra", "dec"]].to_numpy() - [ra, dec]) * [np.cos(np.radians(dec)), 1]).T)
            < 3 / 3600), (ra, dec)


def test_variable_stars_keep_their_mean_flux(field, coadded):
    warps, _, res = coadded
    co = res.coadd
    w = res.weights
    for k in np.flatnonzero(field.stars["kind"] == "variable"):
        s = field.stars.iloc[k]
        x, y = _at(co, s.ra, s.dec)
        sl = (slice(y[0] - 12, y[0] + 13), slice(x[0] - 12, x[0] + 13))
        got = co.image[sl].sum()
        err = np.sqrt(co.variance[sl].sum())
        used = (res.input_map[y[0], x[0]] >> np.arange(N_EP)) & 1 == 1  # the epochs combined there
        want = float((w * field.fluxes[:, k])[used].sum() / w[used].sum())  # their weighted mean
        assert abs(got - want) < 4 * err + 0.01 * want, (k, got, want, err)


def test_coadd_psf_predicts_the_stars(field, coadded):
    _, clipped, res = coadded
    co = res.coadd
    bright = field.stars[(field.stars["flux"] > 3e4)]
    checked = 0
    for _, s in bright.iterrows():
        xf, yf = (float(v[0]) for v in co.wcs.all_world2pix([s.ra], [s.dec], 0))
        x, y = int(np.floor(xf + 0.5)), int(np.floor(yf + 0.5))
        if not (20 < x < co.shape[1] - 20 and 20 < y < co.shape[0] - 20) or co.mask[y, x]:
            continue
        stamp = co.image[y - 12:y + 13, x - 12:x + 13]
        model = co.psf.image(xf, yf, 25)  # at the star's own sub-pixel position (same pixel phase)
        assert fwhm_from_image(stamp) == pytest.approx(fwhm_from_image(model), rel=0.03), (s.ra, s.dec)
        checked += 1
    assert checked >= 5
    # where an input was clipped (the transient's epoch), the model still holds
    x, y = _at(co, *field.transient)
    assert res.n_image[y[0], x[0]] == N_EP - 1


def test_flat_variance_and_noise_predicted_by_the_plane():
    rng = np.random.default_rng(9)
    tile_wcs, shape = _wcs(300), (300, 300)
    epochs = [Exposure(rng.normal(0, 10, (280, 280)).astype(np.float32), variance=np.full((280, 280), 100, np.float32),
                       wcs=_wcs(280, dx=rng.uniform(-3, 3), dy=rng.uniform(-3, 3), rot_deg=rng.uniform(-0.4, 0.4)),
                       psf=GaussianPSF(sigma=1.5), info=ExposureInfo(band="r", visit=k + 1))
              for k in range(6)]
    warps = [warp_exposure(e, tile_wcs, shape, footprint_bbox(e, tile_wcs, shape)) for e in epochs]
    co = combine(warps, None, CoaddConfig(match_backgrounds=False), target_wcs=tile_wcs).coadd
    full = co.variance[(co.mask == 0)]
    inner = co.variance[40:-40, 40:-40]
    assert inner.std() / inner.mean() < 0.01 and inner.mean() == pytest.approx(100 / 6, rel=0.01)
    p = np.abs(np.fft.rfft2(inner - inner.mean())) ** 2
    assert p.max() < 1e-4 * inner.size * inner.mean() ** 2
    assert np.isfinite(full).all()
    for r in (2, 4, 8, 12):
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        ap = (xx ** 2 + yy ** 2) <= r * r
        sums, pred = [], []
        for _ in range(1200):
            x, y = rng.integers(50, co.shape[1] - 50, 2)
            sl = (slice(y - r, y + r + 1), slice(x - r, x + r + 1))
            sums.append(co.image[sl][ap].sum())
            pred.append(co.variance[sl][ap].sum())
        assert np.std(sums) / np.sqrt(np.mean(pred)) == pytest.approx(1.0, abs=0.10), r


def test_mask_planes_open_in_astropy(coadded, tmp_path):
    _, _, res = coadded
    res.coadd.writeto(tmp_path / "coadd.fits")
    with fits.open(tmp_path / "coadd.fits") as hdul:
        names = [h.name for h in hdul]
        assert {"IMAGE", "MASK", "VARIANCE"} <= set(names)
        hdr = hdul["MASK"].header
        assert hdr["MP_CLIPPED"] == res.coadd.mask_planes["CLIPPED"] and hdr["MP_NO_DATA"] == 4
        assert hdul["MASK"].data.dtype.kind == "i"


@pytest.mark.parametrize("method", ["clipped_mean", "median"])
def test_simpler_rejections_also_remove_the_transient(field, coadded, method):
    warps, _, _ = coadded
    fw = [w.psf.fwhm(w.shape[1] / 2, w.shape[0] / 2) for w in warps]
    matched = [psf_match(w, f, target_fwhm(fw)) for w, f in zip(warps, fw)]
    clipped = find_artifacts(matched, ArtifactConfig(method=method, clip_sigma=5.0))
    x, y = _at(warps[2], *field.transient)
    assert clipped[2][y[0], x[0]]


def test_template_selection_by_seeing_and_time():
    exp = pd.DataFrame({"exposure_id": [1, 2, 3, 4, 5], "seeing": [1.2, 0.8, np.nan, 0.9, 0.7],
                        "mjd_mid": [60000, 60001, 60002, 60003, 60010]})
    assert select_inputs(exp)["exposure_id"].tolist() == [1, 2, 4, 5]
    assert select_inputs(exp, SelectConfig(max_inputs=2))["exposure_id"].tolist() == [2, 5]
    assert select_inputs(exp, SelectConfig(max_inputs=2, mjd_max=60005))["exposure_id"].tolist() == [2, 4]
    assert select_inputs(exp, SelectConfig(max_seeing_arcsec=0.85))["exposure_id"].tolist() == [2, 5]


def test_background_offsets_are_solved_recorded_and_subtracted_on_request(coadded):
    warps, clipped, _ = coadded
    added = np.array([0.0, 7.5, -4.0, 12.0, 3.0, -9.0, 5.5, 1.0, -2.0, 6.0][:len(warps)])
    shifted = [Exposure(w.image + np.float32(a), w.mask.copy(), w.variance.copy(), wcs=w.wcs, psf=w.psf, info=w.info,
                        mask_planes=dict(w.mask_planes), xy0=w.xy0) for w, a in zip(warps, added)]
    found = match_backgrounds(shifted, clipped=clipped)
    base = match_backgrounds(warps, clipped=clipped)  # the inputs' own small offsets (noise)
    # the added offsets, up to one constant (offsets are relative to a reference warp, whose is 0)
    rel = found - base - added
    assert np.ptp(rel) < 0.05 * SKY_SIGMA and np.min(np.abs(found)) < 1e-6
    kept = combine(shifted, clipped, CoaddConfig(match_backgrounds=True, subtract_backgrounds=False))
    sub = combine(shifted, clipped, CoaddConfig(match_backgrounds=True, subtract_backgrounds=True))
    plain = combine(warps, clipped, CoaddConfig(match_backgrounds=False))
    assert np.allclose(sub.offsets, kept.offsets) and np.abs(sub.offsets - found).max() < 0.05 * SKY_SIGMA
    meta = sub.coadd.info.extras["coadd"]
    assert meta["background_offsets"] == pytest.approx(list(sub.offsets)) and meta["backgrounds_subtracted"]
    assert not kept.coadd.info.extras["coadd"]["backgrounds_subtracted"]
    good = (plain.coadd.mask == 0) & (sub.coadd.mask == 0)
    # kept: the coadd carries the weighted mean of the added offsets; subtracted: every epoch is
    # brought to the reference's level (the added offsets and the inputs' own, less the reference's)
    d_kept = np.median((kept.coadd.image - plain.coadd.image)[good])
    d_sub = np.median((sub.coadd.image - plain.coadd.image)[good])
    assert d_kept == pytest.approx(np.average(added, weights=kept.weights), abs=0.05 * SKY_SIGMA)
    assert d_sub == pytest.approx(np.average(added - sub.offsets, weights=sub.weights), abs=0.05 * SKY_SIGMA)


def test_an_inputs_edge_through_a_star_does_not_bias_the_coadd():
    # three epochs cover the tile; a fourth ends 1.3 px past a row of stars: the resampling
    # kernel of its last columns reaches past its edge (EDGE), where those stars lose flux
    rng = np.random.default_rng(4)
    n, psf = 120, GaussianPSF(fwhm=3.0)
    tile_wcs = _wcs(n)
    ys = np.array([20.3, 45.7, 70.1, 95.4])
    xs = np.full(4, 60.2)
    epochs = []
    for k, width in enumerate((n, n, n, 62)):
        w = _wcs(n, dx=0.37 * k, dy=-0.21 * k)
        x, y = w.all_world2pix(*tile_wcs.all_pix2world(xs, ys, 0), 0)
        img = np.zeros((n, width))
        for xi, yi in zip(x, y):
            _add(img, psf, xi, yi, 2e4)
        var = np.full(img.shape, 25.0) + img
        img = img + rng.normal(0, 1, img.shape) * np.sqrt(var)
        w.wcs.crpix = list(w.wcs.crpix)  # the cut frame keeps the same sky (crpix unchanged)
        epochs.append(Exposure(img.astype(np.float32), variance=var.astype(np.float32), wcs=w, psf=psf,
                               info=ExposureInfo(band="r", visit=k + 1, detector=0, mjd=60000.0 + k)))
    warps = [warp_exposure(e, tile_wcs, (n, n), footprint_bbox(e, tile_wcs, (n, n))) for e in epochs]
    assert ((warps[3].mask & warps[3].get_plane_bitmask("EDGE")) != 0).any()
    co = combine(warps, None, CoaddConfig(match_backgrounds=False), target_wcs=tile_wcs).coadd
    edge = (co.mask & co.get_plane_bitmask("EDGE")) != 0
    assert not edge[5:-5, 5:-5].any()  # other inputs cover those pixels: not EDGE, not biased
    for xi, yi in zip(xs, ys):
        sl = (slice(int(yi) - 6, int(yi) + 7), slice(int(xi) - 6, int(xi) + 7))
        assert co.image[sl].sum() == pytest.approx(2e4 * 0.99, rel=0.02)  # 13 x 13 px hold 99% of it
