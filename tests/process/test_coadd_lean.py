"""The lean paths of the coadd (float32 row strips, one sort per clipped median, no stacks in
``combine``) give the numbers of the straightforward float64 full-stack computations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS

from archive.image.exposure import Exposure
from archive.process import coadd
from archive.process.coadd import ArtifactConfig, CoaddConfig, clipped_median, combine, find_artifacts, static_sky_model


@pytest.mark.parametrize("n", [1, 2, 1001, 40_000])
def test_clipped_median_is_astropys(n):
    rng = np.random.default_rng(n)
    d = rng.normal(3.0, 10.0, n).astype(np.float32)
    out = rng.random(n) < 0.05  # outliers on one side (stars, cosmic rays)
    d[out] += rng.uniform(50, 5000, out.sum()).astype(np.float32)
    if n > 10:
        d[::97] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = float(sigma_clipped_stats(d, sigma=3.0, maxiters=5)[1])
    assert clipped_median(d, 3.0, 5) == pytest.approx(want, rel=1e-6, abs=1e-5)


@pytest.mark.parametrize("kind", ["gauss", "outliers", "heavy", "bimodal", "uniform", "ties", "spikes"])
def test_clipped_median_of_large_data_is_astropys(kind):
    """Large inputs take the partial ordering (tails sorted, middle summed), or fall back
    to a full sort where the bounds reach the middle: the same median either way."""
    rng = np.random.default_rng(7)
    n = 300_000
    d = rng.normal(-1.0, 12.0, n)
    if kind == "outliers":  # one-sided, as cosmic rays or a star in one epoch
        d[: n // 20] += rng.uniform(40, 4000, n // 20)
    elif kind == "heavy":
        d = rng.standard_t(2, n) * 5.0
    elif kind == "bimodal":
        d = np.where(rng.random(n) < 0.5, -30.0, 30.0) + rng.normal(0, 1, n)
    elif kind == "uniform":
        d = rng.uniform(-10, 10, n)
    elif kind == "ties":
        d = np.round(d)
    elif kind == "spikes":  # a wide interquartile range, a small sd: the bounds fall mid-window
        d = rng.choice([-1.0, 0.0, 1.0], n, p=[0.3, 0.4, 0.3]) + rng.normal(0, 0.01, n)
        with pytest.raises(coadd._Unordered):
            coadd._clip_rounds(coadd._SplitRanks(d.astype(np.float32)), 3.0, 5)
    d = d.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = float(sigma_clipped_stats(d, sigma=3.0, maxiters=5)[1])
    got = clipped_median(d, 3.0, 5)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-5)
    assert got == coadd._clip_rounds(coadd._SortedRanks(d), 3.0, 5)


def test_clipped_median_of_nothing_is_nan():
    assert np.isnan(clipped_median(np.array([np.nan, np.inf], np.float32)))


def test_median_stack_is_nanmedian():
    rng = np.random.default_rng(1)
    imgs = rng.normal(0, 5, (7, 40, 50)).astype(np.float32)
    ok = rng.random(imgs.shape) < 0.7
    ok[:, 0, 0] = False  # no input
    med, cnt = coadd._median_stack(imgs, ok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = np.nan_to_num(np.nanmedian(np.where(ok, imgs, np.nan), axis=0))
    np.testing.assert_allclose(med, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cnt, ok.sum(axis=0))


def _static_sky_float64(imgs, vars_, ok, cfg):
    """The full-stack float64 model this module computed before it ran in float32 strips."""
    use = ok.copy()
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        centre = np.nan_to_num(np.nanmedian(np.where(ok, imgs, np.nan), axis=0))
    sd = np.sqrt(np.where(np.isfinite(vars_) & (vars_ > 0), vars_, np.inf))
    for _ in range(cfg.model_iter):
        keep = ok & (np.abs((imgs - centre) / sd) <= cfg.model_clip)
        keep |= ok & (keep.sum(axis=0) < 2)[None]
        if np.array_equal(keep, use):
            break
        use = keep
        n = use.sum(axis=0)
        centre = np.where(n > 0, np.where(use, imgs, 0.0).sum(axis=0) / np.maximum(n, 1), 0.0)
    n = use.sum(axis=0)
    mean = np.where(n > 0, np.where(use, imgs, 0.0).sum(axis=0) / np.maximum(n, 1), 0.0)
    var = np.where(n > 0, np.where(use, vars_, 0.0).sum(axis=0) / np.maximum(n, 1) ** 2, np.inf)
    return mean, var


def test_static_sky_model_in_strips_matches_float64(monkeypatch):
    monkeypatch.setattr(coadd, "STRIP_BYTES", 1)  # the smallest strips: 16 rows
    rng = np.random.default_rng(2)
    n, ny, nx = 8, 70, 60
    vars_ = rng.uniform(80, 150, (n, 1, 1)).astype(np.float32) * np.ones((1, ny, nx), np.float32)
    imgs = (rng.normal(0, 1, (n, ny, nx)) * np.sqrt(vars_) + 1000.0).astype(np.float32)
    imgs[3, 10:14, 20:23] += 5e4  # a cosmic ray
    imgs[5, 40:60, :] += 300.0  # a streak
    ok = rng.random(imgs.shape) < 0.9
    vars_[0, :5] = np.inf
    ok[0, :5] = False
    cfg = ArtifactConfig()
    mean, var = static_sky_model(imgs, vars_, ok, cfg)
    want_mean, want_var = _static_sky_float64(imgs, vars_, ok, cfg)
    assert mean.dtype == np.float32 and var.dtype == np.float32
    np.testing.assert_allclose(mean, want_mean, rtol=2e-6)
    np.testing.assert_allclose(var, want_var, rtol=2e-6)


def _warps(seed: int = 3) -> list[Exposure]:
    """Five overlapping warps (different boxes on one tile) of flat noise with a star, a
    cosmic ray in warp 1 and a streak in warp 3; DETECTED on the star."""
    rng = np.random.default_rng(seed)
    out = []
    for k, (x0, y0) in enumerate([(0, 0), (7, 3), (2, 9), (11, 5), (4, 4)]):
        ny, nx = 90, 80
        var = np.full((ny, nx), 100.0 + 10 * k, np.float32)
        img = (rng.normal(0, 1, (ny, nx)) * np.sqrt(var) + 2.0 * k).astype(np.float32)
        yy, xx = np.mgrid[:ny, :nx]
        star = 5e3 * np.exp(-0.5 * ((xx + x0 - 40) ** 2 + (yy + y0 - 45) ** 2) / 2.0 ** 2)
        img += star.astype(np.float32)
        var += star.astype(np.float32)
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.crval, wcs.wcs.crpix = [150.0, 2.0], [50.0 - x0, 50.0 - y0]
        wcs.wcs.cd = np.diag([-0.2, 0.2]) / 3600
        w = Exposure(img, None, var, wcs=wcs, xy0=(x0, y0))
        w.mask[star > 10] |= np.int32(w.get_plane_bitmask("DETECTED"))
        w.mask[:, :2] |= np.int32(w.get_plane_bitmask("EDGE"))
        out.append(w)
    out[1].image[30:33, 20:22] += 4e3
    out[3].image[60:62, :] += 600.0
    return out


@pytest.mark.parametrize("method", ["compare_warp", "clipped_mean", "median"])
def test_find_artifacts_does_not_depend_on_the_strips(monkeypatch, method):
    warps = _warps()
    cfg = ArtifactConfig(method=method)
    whole = find_artifacts(warps, cfg)
    monkeypatch.setattr(coadd, "STRIP_BYTES", 1)  # strips of 16 rows
    strips = find_artifacts(warps, cfg)
    for a, b in zip(whole, strips):
        np.testing.assert_array_equal(a, b)
    assert whole[1][30:33, 20:22].all()  # the cosmic ray is found


def test_combine_leaves_its_inputs_alone():
    warps = _warps()
    before = [(w.image.copy(), w.mask.copy(), w.variance.copy()) for w in warps]
    clipped = find_artifacts(warps)
    res = combine(warps, clipped, CoaddConfig(subtract_backgrounds=True))
    for w, (img, msk, var) in zip(warps, before):
        np.testing.assert_array_equal(w.image, img)
        np.testing.assert_array_equal(w.mask, msk)
        np.testing.assert_array_equal(w.variance, var)
    # the offsets found are those put in (2 k), relative to the reference
    off = res.offsets - res.offsets[0]
    np.testing.assert_allclose(off, 2.0 * np.arange(5), atol=0.6)
    assert res.n_clipped[1] >= 6 and res.coadd.image.dtype == np.float32


@pytest.mark.parametrize("sigma", [2.0, 4.0, 8.0])
def test_fill_by_blocks_equals_the_whole_frame_filter(sigma):
    """Masked pixels are filled by filtering only blocks around them (psf_match, warps):
    the values there are the whole frame's, bit for bit."""
    from scipy import ndimage

    from archive.process import warp

    rng = np.random.default_rng(0)
    img = rng.normal(0, 1, (700, 650)).astype(np.float32)
    bad = np.zeros(img.shape, bool)
    bad[:20] = True  # a NO_DATA band, a hole, an EDGE column, scattered pixels
    bad[300:340, 100:400] = True
    bad[:, -7:] = True
    bad[rng.integers(0, 700, 500), rng.integers(0, 650, 500)] = True
    todo = np.flatnonzero(bad)
    want = ndimage.gaussian_filter(img, sigma, mode="nearest").ravel()[todo]
    for tile in (32, 64, 128):
        (got,), area = warp._smooth_blocks([img], sigma, todo, tile)
        np.testing.assert_array_equal(got, want)
        assert area == warp._block_area(img.shape, todo, int(4 * sigma + 0.5), tile)
