import numpy as np
import pytest
from scipy.spatial import cKDTree

from archive.image.psf import FWHM_PER_SIGMA, GaussianPSF
from archive.process import flags as F_
from archive.process.background import estimate_background
from archive.process.measure import MeasureConfig, mask_or_within, measure_sources
from archive.process.sources import detect_and_measure
from archive.process.stamps import aperture_stamps, aperture_weights
from synthetic import star_field


@pytest.fixture(scope="module")
def measured():
    f = star_field((1024, 1024), n_stars=1500, seed=4)
    b = estimate_background(f.image)
    df, model = detect_and_measure(f.image - b.background, f.variance, f.psf,
                                   background_variance=b.variance, background=b.background)
    return f, df


def _match(f, df, radius=1.5):
    tr = f.truth
    d, i = cKDTree(np.c_[df.x, df.y]).query(np.c_[tr.x, tr.y])
    return d < radius, i


def test_completeness_and_purity(measured):
    f, df = measured
    tr = f.truth
    m, _ = _match(f, df)
    assert m[tr.snr > 10].mean() >= 0.95
    d2, _ = cKDTree(np.c_[tr.x, tr.y]).query(np.c_[df.x, df.y])
    bright = df.snr > 10
    assert bright.sum() > 1000
    assert (d2[bright] < 1.5).mean() >= 0.99


def test_centroids_and_fluxes_against_truth(measured):
    f, df = measured
    tr = f.truth
    m, i = _match(f, df)
    sel = m & (tr.snr > 50) & tr.isolated
    assert sel.sum() > 300
    s = df.iloc[i[sel]]
    t = tr[sel]
    dx = s.x.to_numpy() - t.x.to_numpy()
    dy = s.y.to_numpy() - t.y.to_numpy()
    assert np.sqrt(np.mean(dx ** 2 + dy ** 2) / 2) < 0.05
    for d, e in ((dx, s.x_err), (dy, s.y_err)):
        assert 0.9 < np.std(d / e.to_numpy()) < 1.1
    r = s.psf_flux.to_numpy() / t.flux.to_numpy()
    assert abs(np.median(r) - 1) < 0.01
    pull = (s.psf_flux.to_numpy() - t.flux.to_numpy()) / s.psf_flux_err.to_numpy()
    assert 0.9 < np.std(pull) < 1.1
    # apertures of 6 and 12 px hold all the light of a 3 px FWHM Gaussian
    for c in ("ap_flux_r6", "ap_flux_r12"):
        assert abs(np.median(s[c].to_numpy() / t.flux.to_numpy()) - 1) < 0.01
        pull = (s[c].to_numpy() - t.flux.to_numpy()) / s[c + "_err"].to_numpy()
        assert 0.85 < np.std(pull) < 1.2
    # Gaussian-equivalent moments of a pixel-integrated Gaussian: sigma^2 + 1/12
    s2 = (3.0 / FWHM_PER_SIGMA) ** 2 + 1 / 12
    assert np.median(s.ixx) == pytest.approx(s2, rel=0.03)
    assert np.median(s.iyy) == pytest.approx(s2, rel=0.03)
    assert abs(np.median(s.ixy)) < 0.03


def test_output_columns(measured):
    _, df = measured
    for c in ("x", "y", "x_err", "y_err", "psf_flux", "psf_flux_err", "ap_flux_r3", "ap_flux_r3_err",
              "ap_flux_r6", "ap_flux_r6_err", "ap_flux_r12", "ap_flux_r12_err", "snr", "ixx", "iyy", "ixy",
              "sky", "flags", "extendedness"):
        assert c in df.columns
    assert df["flags"].dtype == np.int64
    assert df["extendedness"].dtype == np.float32
    # a field of stars: point-like (the score's 3-sigma significance leaves ~0.1% above 0.5)
    ok = np.isfinite(df.extendedness)
    assert ok.mean() > 0.97
    assert (df.extendedness[ok & (df.snr > 20)] < 0.5).mean() >= 0.98
    assert (df.sky > 150).all()  # the sky level was reported
    assert df.psf_flux.is_monotonic_decreasing


def test_close_pair_is_deblended_and_fitted_jointly():
    rng = np.random.default_rng(0)
    psf = GaussianPSF(fwhm=3.0)
    shape = (64, 64)
    xs = np.array([30.2, 34.9])
    ys = np.array([31.7, 32.4])  # 4.75 px apart = 1.6 FWHM
    fl = np.array([2.0e4, 1.2e4])
    from archive.process.stamps import scatter_add, stamp_grid
    iy, ix = stamp_grid(np.rint(xs).astype(int), np.rint(ys).astype(int), 31)
    img = scatter_add(shape, iy, ix, psf.stamps(xs, ys, 31) * fl[:, None, None])
    var = 25.0 + img
    img = img + rng.normal(0, np.sqrt(var))
    df, _ = detect_and_measure(img, var, psf, background_variance=np.full(shape, 25.0))
    assert len(df) == 2
    d, i = cKDTree(np.c_[df.x, df.y]).query(np.c_[xs, ys])
    assert (d < 0.1).all()
    got = df.psf_flux.to_numpy()[i]
    assert np.all(np.abs(got - fl) < 4 * df.psf_flux_err.to_numpy()[i])
    assert (df["flags"].to_numpy() & F_.FLAG_BLENDED).all()


@pytest.mark.parametrize("min_contrast", [0.001, 0.0])
def test_star_pairs_stay_split(min_contrast):
    """A grid of star pairs 1.5-3 FWHM apart with flux ratios 1-0.05: every star is found, with
    the multi-threshold deblender on (default) as with it off; none is classified extended."""
    from archive.process.detect import DetectionConfig
    from archive.process.sources import SourceConfig
    from archive.process.stamps import scatter_add, stamp_grid

    rng = np.random.default_rng(2)
    psf = GaussianPSF(fwhm=3.0)
    seps = np.array([1.5, 2.0, 2.5, 3.0]) * 3.0
    ratios = np.array([1.0, 0.5, 0.2, 0.1, 0.05])
    S, R = np.meshgrid(seps, ratios)
    S, R = S.ravel(), R.ravel()
    n = S.size
    cx = 40.0 + 60.0 * (np.arange(n) % 5) + rng.uniform(-0.5, 0.5, n)
    cy = 40.0 + 60.0 * (np.arange(n) // 5) + rng.uniform(-0.5, 0.5, n)
    ang = rng.uniform(0, np.pi, n)
    xs = np.concatenate([cx, cx + S * np.cos(ang)])
    ys = np.concatenate([cy, cy + S * np.sin(ang)])
    fl = np.concatenate([np.full(n, 3.0e4), 3.0e4 * R])
    shape = (int(ys.max()) + 40, int(xs.max()) + 40)
    iy, ix = stamp_grid(np.rint(xs).astype(int), np.rint(ys).astype(int), 31)
    img = scatter_add(shape, iy, ix, psf.stamps(xs, ys, 31) * fl[:, None, None])
    var = 25.0 + img
    img = img + rng.normal(0, np.sqrt(var))
    cfg = SourceConfig(detection=DetectionConfig(deblend_min_contrast=min_contrast))
    df, _ = detect_and_measure(img, var, psf, background_variance=np.full(shape, 25.0), config=cfg)
    d, _ = cKDTree(np.c_[df.x, df.y]).query(np.c_[xs, ys])
    assert (d < 1.0).all(), np.c_[xs, ys, fl][d >= 1.0]
    assert len(df) == 2 * n
    assert (df.extendedness < 0.5).mean() >= 0.95


def test_faint_neighbour_found_on_residual_pass():
    rng = np.random.default_rng(1)
    psf = GaussianPSF(fwhm=3.0)
    shape = (64, 64)
    xs = np.array([30.0, 33.6])
    ys = np.array([30.0, 30.4])  # 1.2 FWHM; the faint one is a shoulder of the bright one
    fl = np.array([2.0e5, 3.0e3])
    from archive.process.stamps import scatter_add, stamp_grid
    iy, ix = stamp_grid(np.rint(xs).astype(int), np.rint(ys).astype(int), 31)
    img = scatter_add(shape, iy, ix, psf.stamps(xs, ys, 31) * fl[:, None, None])
    var = 25.0 + img
    img = img + rng.normal(0, np.sqrt(var))
    df, _ = detect_and_measure(img, var, psf, background_variance=np.full(shape, 25.0))
    assert len(df) == 2
    faint = df.iloc[1]
    assert abs(faint.x - 33.6) < 0.5 and abs(faint.y - 30.4) < 0.5
    assert abs(faint.psf_flux - 3.0e3) < 4 * faint.psf_flux_err


def test_mask_bits_are_ored_within_three_pixels():
    mask = np.zeros((40, 40), dtype=np.int32)
    mask[20, 23] = 1 << 1  # SAT, 3 px to the right of source 0
    mask[10, 14] = 1 << 2  # CR, 4 px away from source 1: outside the disk
    got = mask_or_within(mask, np.array([20.0, 10.0]), np.array([20.0, 10.0]), 3)
    assert got[0] == 2 and got[1] == 0


def test_aperture_coverage_is_the_circle_area():
    off = np.arange(-15, 16)
    for r in (3.0, 6.0, 12.0):
        for fx in (0.0, 0.3, -0.45):
            a = aperture_weights(off[None, :] - fx, off[:, None] - 0.2, r)
            assert a.sum() == pytest.approx(np.pi * r * r, rel=3e-3)
            b = aperture_stamps(np.array([fx]), np.array([0.2]), r, 15)[0]
            assert b.sum() == pytest.approx(a.sum(), rel=1e-3)


def test_psf_stamps_are_normalised():
    g = GaussianPSF(fwhm=3.5)
    x = np.array([10.3, 50.0, 77.8])
    y = np.array([12.6, 40.1, 90.49])
    st = g.stamps(x, y, 41)
    assert np.allclose(st.sum(axis=(1, 2)), 1.0, atol=1e-6)
    e = GaussianPSF(fwhm=3.0, ellipticity=0.3, theta=30)
    assert e.stamps(np.array([20.0]), np.array([20.0]), 41).sum() == pytest.approx(1.0, abs=1e-4)


def test_measurement_takes_any_psf_model():
    """The same Moffat stars measured with the analytic model and with its pixelized fit
    (a PixelPSF, the measurement path of estimated PSFs): the same fluxes and positions."""
    from archive.image.psf import MoffatPSF, PixelPSF

    shape = (256, 256)
    m = MoffatPSF(3.5, beta=3.0, variation=[0.1, 0.05], bbox=(0, 0, 255, 255))
    f = star_field(shape, n_stars=60, seed=4, psf=m, flux_range=(2e4, 2e5), min_sep=25.0, edge=15)
    t = f.truth
    b = estimate_background(f.image)
    sub = f.image - b.background
    p = PixelPSF.from_psf(m, (0, 0, 255, 255), degree=2, oversample=2)
    fm = measure_sources(sub, f.variance, None, m, t.x.to_numpy(), t.y.to_numpy(), background_variance=b.variance)
    fp = measure_sources(sub, f.variance, None, p, t.x.to_numpy(), t.y.to_numpy(), background_variance=b.variance)
    assert np.median(fm.psf_flux / t.flux) == pytest.approx(1.0, abs=0.01)
    assert np.abs(fp.psf_flux / fm.psf_flux - 1).max() < 0.01
    assert np.abs(fp.x - fm.x).max() < 0.02 and np.abs(fp.y - fm.y).max() < 0.02


def test_measure_handles_no_sources_and_edges():
    psf = GaussianPSF(fwhm=3.0)
    img = np.zeros((32, 32))
    var = np.ones((32, 32))
    df = measure_sources(img, var, None, psf, np.array([]), np.array([]))
    assert len(df) == 0 and "psf_flux" in df.columns
    img[1, 1] = 0  # source in a corner: stamps run off the image but nothing crashes
    from archive.process.stamps import scatter_add, stamp_grid
    iy, ix = stamp_grid(np.array([1]), np.array([1]), 21)
    img = scatter_add((32, 32), iy, ix, psf.stamps(np.array([1.0]), np.array([1.2]), 21) * 1e4)
    df = measure_sources(img, var + img, None, psf, np.array([1.0]), np.array([1.0]), background_variance=var)
    assert df.psf_flux.iloc[0] == pytest.approx(1e4, rel=0.02)
    assert df["flags"].iloc[0] & F_.FLAG_STAMP_EDGE


def test_pure_noise_and_empty_images_give_empty_tables():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 1, (128, 128)).astype(np.float32)
    df, model = detect_and_measure(img, np.ones_like(img), GaussianPSF(fwhm=3.0))
    assert len(df) <= 1  # at 5 sigma, ~0.01 false peaks expected on 16k pixels / ~20 px beams
    df, model = detect_and_measure(np.zeros((64, 64), np.float32), np.ones((64, 64), np.float32), GaussianPSF(fwhm=3.0))
    assert len(df) == 0 and (model == 0).all()
