"""The star-finding and builder helpers of psf_estimate against their plain definitions."""

import numpy as np
from scipy import ndimage

from archive.image.psf import FWHM_PER_SIGMA, GaussianPSF, fwhm_from_image
from archive.process import psf_estimate as P
from archive.process.measure import model_image


def test_bin_median_row_table_equals_sorted_samples():
    rng = np.random.default_rng(1)
    n, nbins = 40, 50
    # each star (row) has at most one sample per bin, some bins empty, some rows short
    keep = rng.random((n, nbins)) < 0.7
    rows, bins = np.nonzero(keep)
    vals = np.round(rng.normal(size=rows.size), 1)  # many ties
    m_sort, c_sort = P._bin_median(bins, vals, nbins + 3)
    m_tab, c_tab = P._bin_median(bins, vals, nbins + 3, rows=rows)
    assert np.array_equal(c_sort, c_tab)
    assert np.array_equal(m_sort, m_tab)
    # and the plain per-bin median
    for b in range(nbins):
        if c_sort[b]:
            assert m_tab[b] == np.median(vals[bins == b])


def test_grow3x3_equals_binary_dilation():
    rng = np.random.default_rng(2)
    b = rng.random((5, 9, 11)) < 0.08
    b[0, 0, 0] = b[1, -1, -1] = True  # corners: nothing wraps
    assert np.array_equal(P._grow3x3(b), ndimage.binary_dilation(b, structure=np.ones((1, 3, 3), bool)))


def test_neighbour_stamps_equal_the_model_image():
    rng = np.random.default_rng(3)
    shape, half = (200, 240), 9
    psf = GaussianPSF(fwhm=3.5)
    xs = np.array([30.2, 120.7, 200.4, 3.0])  # the last star's stamp runs off the image
    ys = np.array([40.6, 100.1, 180.9, 150.3])
    x = np.concatenate([xs + rng.uniform(-15, 15, 4), rng.uniform(-5, 245, 40)])
    y = np.concatenate([ys + rng.uniform(-15, 15, 4), rng.uniform(-5, 205, 40)])
    f = rng.uniform(100, 1000, x.size)
    got = P._neighbour_stamps(psf, x, y, f, xs, ys, half)
    # reference: the model image of all sources (padded, so stamps past the edge hold their
    # sources too), read at the stars' stamps
    pad = 3 * half
    ref = model_image((shape[0] + 2 * pad, shape[1] + 2 * pad), psf, x + pad, y + pad, f, half)
    xc = np.floor(xs + 0.5).astype(int) + pad
    yc = np.floor(ys + 0.5).astype(int) + pad
    want = np.stack([ref[b - half:b + half + 1, a - half:a + half + 1] for a, b in zip(xc, yc)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * f.max() * psf.stamps(0.0, 0.0, 3).max())
    assert P._neighbour_stamps(psf, x[:0], y[:0], f[:0], xs, ys, half).shape == (4, 2 * half + 1, 2 * half + 1)


def test_binned_planes_sum_pixels_and_drop_unusable_bins():
    rng = np.random.default_rng(4)
    img = rng.normal(size=(9, 12)).astype(np.float32)  # odd row count: the last row is dropped
    var = rng.uniform(1, 2, size=img.shape).astype(np.float32)
    mask = np.zeros(img.shape, np.int32)
    img[0, 0] = np.nan          # bin (0, 0)
    var[2, 5] = 0.0             # bin (1, 2)
    var[5, 9] = np.inf          # bin (2, 4)
    mask[7, 1] = 0b100          # bin (3, 0): a no-detect plane
    mask[6, 6] = 0b1000         # bin (3, 3): another plane, kept
    ib, wb = P._binned(img, var, mask, 0b100)
    assert ib.shape == wb.shape == (4, 6)
    want_i = img[:8].reshape(4, 2, 6, 2).sum(axis=(1, 3))
    want_w = 1.0 / var[:8].reshape(4, 2, 6, 2).sum(axis=(1, 3))
    bad = np.zeros((4, 6), bool)
    bad[0, 0] = bad[1, 2] = bad[2, 4] = bad[3, 0] = True
    assert np.all(wb[bad] == 0) and np.all(ib[bad] == 0)
    np.testing.assert_allclose(ib[~bad], want_i[~bad], rtol=1e-6)
    np.testing.assert_allclose(wb[~bad], want_w[~bad], rtol=1e-6)


def test_model_fwhm_equals_fwhm_of_the_whole_image():
    g = np.arange(41) - 20
    for fw, os_, q in [(4.0, 1, 1.0), (2.0, 2, 1.2), (1.6, 2, 1.0), (6.0, 1, 0.8)]:
        s = fw * os_ / FWHM_PER_SIGMA
        k = np.exp(-0.5 * (g[None] ** 2 + (q * g[:, None]) ** 2) / s ** 2)
        k += 1e-4 * np.exp(-np.hypot(g[None], g[:, None]) / 6.0)  # faint wide wings
        assert P._model_fwhm(k, os_) == fwhm_from_image(k, os_)


def test_all_peaks_are_measured_when_the_brightest_give_too_few_stars(monkeypatch):
    from archive.process.background import estimate_background
    from synthetic import star_field

    shape = (512, 512)
    f = star_field(shape, n_stars=500, seed=7, psf=GaussianPSF(fwhm=3.0))
    b = estimate_background(f.image)
    calls = []
    orig = P._measure_peaks

    def spy(*a):
        out = orig(*a)
        calls.append((a[-1], len(out[0]), len(out[1])))
        return out

    monkeypatch.setattr(P, "_measure_peaks", spy)
    # a wide isolation radius rejects most of the brightest candidates
    cfg = P.PsfEstimateConfig(max_stars=20, isolation=10.0)
    res = P.estimate_psf(f.image - b.background, f.variance, background_variance=b.variance, config=cfg)
    assert calls[0][0] == 30 and calls[0][2] > 0  # the first pass leaves faint peaks unmeasured
    assert len(calls) == 2 and calls[1][0] is None and calls[1][2] == 0
    assert res.n_stars >= 10 and abs(res.fwhm - 3.0) < 0.3
    assert len(res.stars) == calls[1][1] and res.stars["used"].sum() == res.n_stars
