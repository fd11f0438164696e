"""Warping: flat variance stays flat (no grid pattern), flux is conserved, the variance plane
predicts the noise in apertures, masks do not grow, PSF matching; sky tiles."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from archive.image.exposure import Exposure, ExposureInfo
from archive.process.warp import (WarpConfig, _PixelMap, fill_masked, fill_masked_planes, footprint_bbox, pixel_map,
                                  psf_match, warp_exposure)
from archive.sky.tiles import SkyMap


def _wcs(ra0=150.0, dec0=2.0, n=512, scale=0.2, rot_deg=0.0, crpix_shift=(0.0, 0.0)) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [n / 2 + 0.5 + crpix_shift[0], n / 2 + 0.5 + crpix_shift[1]]
    t = np.radians(rot_deg)
    s = scale / 3600
    w.wcs.cd = s * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    return w


def _noise_exposure(n=512, sigma=10.0, seed=1, **wcs_kw) -> Exposure:
    rng = np.random.default_rng(seed)
    return Exposure(rng.normal(0, sigma, (n, n)).astype(np.float32), variance=np.full((n, n), sigma ** 2, np.float32),
                    wcs=_wcs(n=n, **wcs_kw), info=ExposureInfo(band="r", visit=1, detector=0))


@pytest.mark.parametrize("kernel", ["lanczos3", "bilinear"])
def test_flat_variance_stays_flat_without_a_grid(kernel):
    src = _noise_exposure(rot_deg=0.3)
    target = _wcs(n=400, rot_deg=0.0, crpix_shift=(-37.3, 11.6))
    out = warp_exposure(src, target, (400, 400), config=WarpConfig(kernel=kernel))
    inner = out.variance[20:-20, 20:-20]
    assert np.isfinite(inner).all()
    assert inner.std() / inner.mean() < 1e-3 and abs(inner.mean() / 100.0 - 1) < 1e-3
    # no peak at the beat frequency of the grids: the power spectrum of the variance is flat
    p = np.abs(np.fft.rfft2(inner - inner.mean())) ** 2
    assert p.max() < 1e-6 * inner.size * inner.mean() ** 2
    # propagating sum w^2 V instead (the defect) would beat with the pixel phase
    sx, sy = pixel_map(src.wcs, target, (400, 400))
    if kernel == "bilinear":
        fx, fy = sx % 1, sy % 1
        w2 = ((1 - fx) ** 2 + fx ** 2) * ((1 - fy) ** 2 + fy ** 2)
        assert w2[20:-20, 20:-20].std() / w2[20:-20, 20:-20].mean() > 0.1


def test_variance_plane_predicts_aperture_noise_and_records_the_correlation():
    src = _noise_exposure(n=600, seed=3, rot_deg=0.2)
    target = _wcs(n=560, crpix_shift=(0.31, -0.27))
    out = warp_exposure(src, target, (560, 560))
    ratio = out.info.extras["warp"]["pixel_variance_ratio"]
    inner = out.image[20:-20, 20:-20]
    # a single pixel is less noisy than the plane says, by the recorded factor
    assert inner.var() / 100.0 == pytest.approx(ratio, rel=0.03)
    rng = np.random.default_rng(0)
    for r in (2, 4, 8, 12):
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        ap = (xx ** 2 + yy ** 2) <= r * r
        sums, pred = [], []
        for _ in range(1500):
            x, y = rng.integers(30, 530, 2)
            sl = (slice(y - r, y + r + 1), slice(x - r, x + r + 1))
            sums.append(out.image[sl][ap].sum())
            pred.append(out.variance[sl][ap].sum())
        assert np.std(sums) / np.sqrt(np.mean(pred)) == pytest.approx(1.0, abs=0.10), r


@pytest.mark.parametrize("scale_ratio", [1.0, 1.25])
def test_flux_is_conserved(scale_ratio):
    from archive.image.psf import GaussianPSF

    n = 256
    src = _noise_exposure(n=n, sigma=1e-3, seed=2, rot_deg=0.7)
    stamp = GaussianPSF(sigma=1.7).image(100.3, 140.6, 31)
    src.image[140 - 15:140 + 16, 100 - 15:100 + 16] += 5e4 * stamp.astype(np.float32)
    target = _wcs(n=240, scale=0.2 * scale_ratio, crpix_shift=(3.2, -4.7))
    out = warp_exposure(src, target, (240, 240))
    ra, dec = src.wcs.all_pix2world([100.3], [140.6], 0)
    x, y = (int(round(float(v[0]))) for v in target.all_world2pix(ra, dec, 0))
    total = out.image[y - 20:y + 21, x - 20:x + 21].sum()
    assert total == pytest.approx(5e4, rel=0.005)  # Lanczos-3 interpolation of a sigma = 1.7 px star


def test_masked_pixels_do_not_ring_or_grow():
    src = _noise_exposure(n=200, seed=4)
    clean = src.copy()
    cr = src.get_plane_bitmask("CR")
    src.image[100, 80] += 2e4  # a one-pixel cosmic ray, masked
    src.mask[100, 80] |= cr
    target = _wcs(n=200, crpix_shift=(0.4, 0.45))
    a = warp_exposure(src, target, (200, 200))
    b = warp_exposure(clean, target, (200, 200))
    hit = (a.mask & cr) != 0
    assert 1 <= hit.sum() <= 4  # the 2 x 2 output pixels around it at most
    # outside the masked pixels the values are those of the clean image: no Lanczos ringing
    diff = np.abs(a.image - b.image)[~hit]
    assert diff.max() < 0.2 * 10  # well below the noise (the filled pixel differs from the noise it replaced)


def test_outside_the_input_is_no_data_and_bbox():
    src = _noise_exposure(n=100)
    tile_wcs = _wcs(n=400)
    bb = footprint_bbox(src, tile_wcs, (400, 400))
    x0, y0, x1, y1 = bb
    assert 140 <= x0 <= 150 and 250 <= x1 <= 260
    out = warp_exposure(src, tile_wcs, (400, 400), bb)
    assert out.shape == (y1 - y0, x1 - x0) and out.xy0 == (x0, y0)
    nodata = (out.mask & out.get_plane_bitmask("NO_DATA")) != 0
    assert nodata[0, 0] and not nodata[out.shape[0] // 2, out.shape[1] // 2]
    assert np.isinf(out.variance[nodata]).all()
    # the sub-image's WCS places sky positions where the full grid does, shifted by xy0
    ra, dec = tile_wcs.all_pix2world([200.0], [210.0], 0)
    x, y = out.wcs.all_world2pix(ra, dec, 0)
    assert (x[0] + x0, y[0] + y0) == pytest.approx((200.0, 210.0), abs=1e-6)


def test_psf_match_gives_the_target_width_without_growing_masks():
    from archive.image.psf import GaussianPSF, fwhm_from_image
    from archive.image.psf import FWHM_PER_SIGMA

    n = 101
    img = np.zeros((n, n), np.float32)
    img[50 - 15:50 + 16, 50 - 15:50 + 16] = 1e4 * GaussianPSF(sigma=2.0).image(50, 50, 31)
    exp = Exposure(img, variance=np.ones((n, n), np.float32), wcs=_wcs(n=n))
    bad = exp.get_plane_bitmask("BAD")
    exp.mask[10, 10] |= bad
    exp.image[10, 10] = 1e6
    out = psf_match(exp, 2.0 * FWHM_PER_SIGMA, 7.0)
    assert fwhm_from_image(out.image[20:81, 20:81]) == pytest.approx(7.0, rel=0.02)
    assert ((out.mask & bad) != 0).sum() == 1  # not grown
    assert out.image[:25, :25].max() < 1.0  # the bad pixel was filled, not smeared
    # the variance plane is that of the smoothed noise
    rng = np.random.default_rng(5)
    noise = Exposure(rng.normal(0, 1, (300, 300)).astype(np.float32), variance=np.ones((300, 300), np.float32),
                     wcs=_wcs(n=300))
    sm = psf_match(noise, 3.0, 6.0)
    assert sm.image[20:-20, 20:-20].var() == pytest.approx(float(np.median(sm.variance)), rel=0.05)


def test_fill_masked_interpolates_holes():
    yy, xx = np.mgrid[0:64, 0:64]
    img = (0.5 * xx + 0.2 * yy).astype(np.float32)
    bad = np.zeros_like(img, bool)
    bad[20:30, 20:30] = True
    filled = fill_masked(np.where(bad, 1e6, img), bad)
    # nothing of the masked values leaks, and the hole follows its surroundings (a smooth
    # mean: within a few pixels' worth of the gradient)
    assert np.abs(filled[bad] - img[bad]).max() < 2.0
    np.testing.assert_array_equal(filled[~bad], img[~bad])


def test_fill_masked_at_few_pixels_equals_the_whole_frame_convolution():
    from scipy import ndimage

    rng = np.random.default_rng(11)
    img = rng.normal(0, 10, (300, 280)).astype(np.float32)
    bad = np.zeros(img.shape, bool)
    bad[rng.integers(0, 300, 200), rng.integers(0, 280, 200)] = True  # few: filled pixel by pixel
    bad[0:3, 100:140] = True  # at the frame's edge (mode "nearest")
    bad[150:175, 50:80] = True  # a hole that needs the wider rounds
    # the normalised convolution done on whole frames, round by round
    ref, todo, s = img.copy(), bad.copy(), 2.0
    data, good = np.where(bad, 0, img).astype(np.float32), (~bad).astype(np.float32)
    for _ in range(3):
        num, den = (ndimage.gaussian_filter(a, s, mode="nearest") for a in (data, good))
        ok = todo & (den > 1e-3)
        ref[ok] = num[ok] / den[ok]
        todo &= ~ok
        s *= 2
    out = fill_masked(img, bad)
    np.testing.assert_allclose(out[bad & ~todo], ref[bad & ~todo], rtol=0, atol=2e-5)
    np.testing.assert_array_equal(out[~bad], img[~bad])
    # several planes over the same pixels share the weights and give each plane's fill
    a, b = fill_masked_planes([img, 2 * img + 3], bad)
    np.testing.assert_allclose(b[bad], 2 * a[bad] + 3, atol=1e-4)


def test_pixel_map_refines_its_grid_until_within_the_error_bound():
    from astropy.wcs import Sip

    src = _wcs(n=1000, rot_deg=0.4)
    src.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[2, 0], a[0, 2], b[1, 1], a[3, 0] = 2e-5, 1e-5, 2e-5, 1e-8  # ~10 px of distortion at the corners
    src.sip = Sip(a, b, None, None, src.wcs.crpix)
    target = _wcs(n=900, crpix_shift=(13.3, -7.7))
    pm = _PixelMap(src, target, (0, 0, 900, 900), step=64, max_error=1e-3)
    assert pm.step < 64 and pm.max_error <= 1e-3
    sx, sy = pixel_map(src, target, (900, 900), step=64, max_error=1e-3)
    rng = np.random.default_rng(2)
    r, c = rng.integers(0, 900, (2, 3000))
    ra, dec = target.all_pix2world(c.astype(float), r.astype(float), 0)
    ex, ey = src.all_world2pix(ra, dec, 0)
    assert np.hypot(sx[r, c] - ex, sy[r, c] - ey).max() < 1.5e-3
    # the warp records the grid it used
    exp = Exposure(np.zeros((1000, 1000), np.float32), variance=np.ones((1000, 1000), np.float32), wcs=src,
                   info=ExposureInfo(band="r", visit=1, detector=0))
    out = warp_exposure(exp, target, (900, 900), config=WarpConfig(grid_step=64))
    assert out.info.extras["warp"]["map_step"] == pm.step
    assert out.info.extras["warp"]["map_max_error_px"] <= 1e-3


def test_skymap_tiles_cover_footprints():
    sm = SkyMap(order=10, pixel_scale_arcsec=0.2, overlap_arcsec=10)
    rng = np.random.default_rng(7)
    for ra0, dec0 in [(150.0, 2.0), (0.01, -30.0), (359.99, 60.0), (45.0, 89.9)]:
        c = np.array([[ra0 - 0.02, dec0 - 0.02], [ra0 + 0.02, dec0 - 0.02], [ra0 + 0.02, dec0 + 0.02],
                      [ra0 - 0.02, dec0 + 0.02]])
        c[:, 0] = (c[:, 0] - ra0) / np.cos(np.radians(dec0)) + ra0
        c[:, 0] %= 360
        ids = sm.tiles_for(c)
        # every point of the footprint lies on one of the tiles (its core's tile)
        pts = np.column_stack([(ra0 + rng.uniform(-0.02, 0.02, 300) / np.cos(np.radians(dec0))) % 360,
                               dec0 + rng.uniform(-0.02, 0.02, 300)])
        assert set(sm.tile_of(pts[:, 0], pts[:, 1]).tolist()) <= set(ids)
        for tid in ids:
            tile = sm.tile(tid)
            assert tile.shape[0] % 2 == 1 and tile.contains([tile.ra], [tile.dec]).all()
    # a tile reaches past its HEALPix pixel by the overlap: neighbours share a strip
    t = sm.tile(int(sm.tile_of(150.0, 2.0)))
    ny, nx = t.shape
    ra, dec = t.wcs.all_pix2world([0, nx - 1], [ny // 2, ny // 2], 0)
    assert len(set(sm.tile_of(ra, dec).tolist()) - {t.tile_id}) >= 1
