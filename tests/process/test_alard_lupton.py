"""Alard-Lupton subtraction and DIASource detection on pairs made with numpy (Moffat science,
Gaussian template, known transients and variables): the difference's noise is what its
variance plane says, constant stars leave unbiased residuals, changes are recovered with
their flux, and a pair without change gives the Gaussian number of peaks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from archive.image.psf import GaussianPSF, MoffatPSF
from archive.process.diffim.alard_lupton import AlardLuptonConfig, kernel_basis, subtract
from archive.process.diffim.detection import FLAG_DIPOLE, DetectionConfig, detect_dia_sources
from diffim_pairs import make_pair, psf_flux


def _isolated(df, others, r=15.0):
    d, _ = cKDTree(others).query(df[["x", "y"]].to_numpy(), k=2)
    return d[:, 1] > r


@pytest.fixture(scope="module", params=[1, 2])
def pair_and_diff(request):
    p = make_pair(n=640, seed=request.param, n_stars=220, n_transients=25)
    return p, subtract(p.science, p.template)


def test_kernel_basis_sums():
    b = kernel_basis(21, [1.0, 2.0], [2, 1])
    assert b.shape == (9, 21, 21)
    assert b[0].sum() == pytest.approx(1.0) and np.allclose(b[1:].sum(axis=(1, 2)), 0.0, atol=1e-12)


def test_noise_matches_the_variance_plane(pair_and_diff):
    p, res = pair_and_diff
    d = res.difference
    far = np.ones(d.shape, bool)
    for x, y in np.concatenate([p.stars[["x", "y"]].to_numpy(), p.transients[["x", "y"]].to_numpy()]):
        far[max(0, int(y) - 15):int(y) + 16, max(0, int(x) - 15):int(x) + 16] = False
    far &= np.isfinite(d.variance)
    # pixels and apertures: within 10 %
    assert np.std(d.image[far]) / np.sqrt(np.median(d.variance[far])) == pytest.approx(1.0, abs=0.10)
    rng = np.random.default_rng(0)
    for r in (3, 6):
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        ap = xx ** 2 + yy ** 2 <= r * r
        sums, pred = [], []
        for _ in range(3000):
            x, y = rng.integers(r + 1, d.shape[1] - r - 1, 2)
            sl = (slice(y - r, y + r + 1), slice(x - r, x + r + 1))
            if far[sl][ap].all():
                sums.append(d.image[sl][ap].sum())
                pred.append(d.variance[sl][ap].sum())
        assert np.std(sums) / np.sqrt(np.mean(pred)) == pytest.approx(1.0, abs=0.10), r
    # decorrelated: neighbouring pixels nearly independent; the score has unit variance
    both = far[:, 1:] & far[:, :-1]
    assert abs(np.corrcoef(d.image[:, :-1][both], d.image[:, 1:][both])[0, 1]) < 0.1
    assert np.std(res.score[far]) == pytest.approx(1.0, abs=0.10)
    assert res.metadata["convolved"] == "template" and res.metadata["kernel_sum"] == pytest.approx(1.0)


def test_constant_stars_leave_unbiased_residuals(pair_and_diff):
    p, res = pair_and_diff
    allpos = np.concatenate([p.stars[["x", "y"]].to_numpy(), p.transients[["x", "y"]].to_numpy()])
    st = p.stars[(p.stars["dflux"] == 0) & _isolated(p.stars, allpos)]
    flux, err = psf_flux(res.difference, st["x"].to_numpy(), st["y"].to_numpy())
    pull = flux / err
    assert len(st) > 60
    assert abs(pull.mean()) < 3 * pull.std() / np.sqrt(len(pull)) + 0.2
    assert 0.8 <= pull.std() <= 1.25


def test_changes_are_recovered_with_their_flux(pair_and_diff):
    p, res = pair_and_diff
    d = res.difference
    det = detect_dia_sources(d, res.score, p.science, p.template)
    allpos = np.concatenate([p.stars[["x", "y"]].to_numpy(), p.transients[["x", "y"]].to_numpy()])
    tr = p.transients[_isolated(p.transients, allpos)]
    flux, err = psf_flux(d, tr["x"].to_numpy(), tr["y"].to_numpy())
    pull = (flux - tr["flux"].to_numpy()) / err
    assert np.abs(pull).max() < 4 and abs(np.median(pull)) < 1
    # completeness above S/N 7 (truth flux over the measured error) and no false detection
    truth = np.concatenate([p.transients[["x", "y"]].to_numpy(), p.stars[p.stars["dflux"] != 0][["x", "y"]].to_numpy()])
    tflux = np.concatenate([p.transients["flux"].to_numpy(), np.abs(p.stars[p.stars["dflux"] != 0]["dflux"].to_numpy())])
    _, terr = psf_flux(d, truth[:, 0], truth[:, 1])
    bright = tflux / terr >= 7
    dist, _ = cKDTree(det[["x", "y"]].to_numpy()).query(truth)
    assert (dist[bright] < 1.5).mean() >= 0.95
    false = cKDTree(truth).query(det[["x", "y"]].to_numpy())[0] > 2
    assert false.sum() == 0
    # the fading variables are negative detections with negative flux
    fading = p.stars[p.stars["dflux"] < 0]
    dist, idx = cKDTree(det[["x", "y"]].to_numpy()).query(fading[["x", "y"]].to_numpy())
    assert (det["psf_flux"].to_numpy()[idx[dist < 1.5]] < 0).all()


def test_a_pair_without_change_gives_the_gaussian_number_of_peaks():
    p = make_pair(n=768, seed=11, n_stars=250, change=False)
    res = subtract(p.science, p.template)
    # the expected number of peaks of a unit-variance Gaussian field smoothed by the PSF (of
    # sigma s) above u, both signs: the Euler characteristic 2 A u exp(-u^2/2) / (2 s^2 (2 pi)^1.5)
    # (it is ~5x N_elements x P(|z| > u), the count of PSF-sized elements over the threshold)
    s = float(res.difference.psf.fwhm(384, 384)) / 2.3548
    area = res.difference.image.size
    for thr in (3.5, 4.0):
        det = detect_dia_sources(res.difference, res.score, config=DetectionConfig(threshold=thr, min_pixels=1))
        expected = 2 * area * thr * np.exp(-thr ** 2 / 2) / (2 * s * s * (2 * np.pi) ** 1.5)
        assert expected / 2 <= len(det) <= 2 * expected, (thr, len(det), expected)
    assert len(detect_dia_sources(res.difference, res.score)) == 0


def test_sharper_science_convolves_the_science():
    p = make_pair(n=512, seed=4, science_psf=GaussianPSF(fwhm=2.8), template_psf=MoffatPSF(fwhm=3.8, beta=3.5),
                  n_transients=10)
    res = subtract(p.science, p.template)
    assert res.metadata["convolved"] == "science"
    allpos = np.concatenate([p.stars[["x", "y"]].to_numpy(), p.transients[["x", "y"]].to_numpy()])
    tr = p.transients[_isolated(p.transients, allpos)]
    flux, err = psf_flux(res.difference, tr["x"].to_numpy(), tr["y"].to_numpy())
    assert np.abs((flux - tr["flux"].to_numpy()) / err).max() < 4


def test_dipoles_are_paired_and_flagged():
    p = make_pair(n=384, seed=5, n_stars=40, n_transients=0, n_variables=0)
    # a star whose science position moved by 1.5 px: a dipole in the difference
    from archive.image.psf import add_point_sources

    x0, y0 = 200.0, 190.0
    add_point_sources(p.template.image, p.template.psf, [x0], [y0], [4e4])
    add_point_sources(p.science.image, p.science.psf, [x0 + 1.5], [y0], [4e4])
    res = subtract(p.science, p.template)
    det = detect_dia_sources(res.difference, res.score)
    near = det[np.hypot(det["x"] - x0, det["y"] - y0) < 5]
    assert len(near) == 2 and near["is_dipole"].all()
    assert ((near["flags"].to_numpy() & FLAG_DIPOLE) != 0).all()
    assert np.sign(near["psf_flux"]).sum() == 0  # one positive, one negative lobe


def test_configs_are_checked():
    from archive.errors import ValidationError

    p = make_pair(n=128, seed=6, n_stars=3, n_transients=0)
    with pytest.raises(ValidationError, match="usable stars"):
        subtract(p.science, p.template)
    with pytest.raises(ValueError, match="same"):
        AlardLuptonConfig(sigmas=(1.0,), degrees=(1, 2)).validate()


def test_matching_error_is_measured_and_quiets_the_score_at_bright_stars_only(pair_and_diff):
    from archive.process.diffim.alard_lupton import score_image

    p, res = pair_and_diff
    eps = res.metadata["matching_error"]
    assert 0 <= eps < 0.02  # a pair made with known PSFs: the kernel matches its stars to ~1%
    d = res.difference.copy()
    n = d.shape[0]
    # a residual of 5% of a bright template star's flux, and a transient of the same flux on empty sky
    yy, xx = np.mgrid[0:n, 0:n]
    star = np.zeros(d.shape, np.float32)
    blob = lambda x0, y0: np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / (4.0 / 2.3548) ** 2)  # noqa: E731
    star += (2e6 * blob(100, 100) / blob(100, 100).sum()).astype(np.float32)
    res_img = d.image + 0.05 * star + (1e5 * blob(400, 400) / blob(400, 400).sum()).astype(np.float32)
    d.image = res_img
    plain = score_image(d)
    quiet = score_image(d, star, 0.05)
    # the residual is one epsilon of the star's flux: about 1 sigma once epsilon counts
    assert plain[100, 100] > 20 and quiet[100, 100] < 1.5
    # away from the template's light nothing changes: the transient and the empty sky
    assert quiet[400, 400] == pytest.approx(plain[400, 400], rel=1e-3)
    sky = (slice(300, 350), slice(200, 250))
    np.testing.assert_allclose(quiet[sky], plain[sky], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_difference_background_is_estimate_background_of_the_masked_difference(threads):
    """The banded, threaded difference background gives estimate_background's, bit for bit."""
    from scipy import ndimage

    from archive.process.background import BackgroundConfig, estimate_background
    from archive.process.diffim.alard_lupton import _box3_mean, difference_background

    rng = np.random.default_rng(3)
    ny, nx, mesh = 700, 520, 64
    yy, xx = np.mgrid[0:ny, 0:nx]
    var = np.full((ny, nx), 100.0, np.float32)
    diff = (rng.normal(0, 10, (ny, nx)) + 3.0 * np.sin(xx / 150.0) + 0.01 * yy).astype(np.float32)
    for x, y in rng.uniform(0, [nx, ny], (40, 2)):  # residuals and changes
        diff += (rng.choice([-1, 1]) * 400 * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / 2.0)).astype(np.float32)
    bad = np.zeros((ny, nx), bool)
    bad[:, :37] = True
    bad[rng.integers(0, ny, 200), rng.integers(0, nx, 200)] = True
    diff[bad & (rng.random((ny, nx)) < 0.5)] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.abs(diff) / np.sqrt(np.where(var > 0, var, np.inf))
    hot = ndimage.binary_dilation(_box3_mean(np.nan_to_num(z)) > 3.0, iterations=4)
    assert np.allclose(_box3_mean(np.nan_to_num(z)), ndimage.uniform_filter(np.nan_to_num(z), 3), rtol=1e-6, atol=1e-6)
    want = estimate_background(np.where(bad, np.nan, diff), mask=bad | hot,
                               config=BackgroundConfig(mesh_size=mesh, passes=1)).background
    got = difference_background(diff, var, bad, mesh, threads=threads)
    assert np.array_equal(got, want)


def test_results_do_not_depend_on_the_thread_count():
    p = make_pair(n=300, seed=7, n_stars=60, n_transients=5)
    a = subtract(p.science, p.template, AlardLuptonConfig(threads=1, block=128))
    b = subtract(p.science, p.template, AlardLuptonConfig(threads=3, block=128))
    assert np.array_equal(a.difference.image, b.difference.image) and np.array_equal(a.score, b.score)
    assert np.array_equal(a.difference.variance, b.difference.variance)
    assert np.array_equal(a.difference.mask, b.difference.mask)


def test_the_cross_dilation_is_binary_dilations():
    from scipy import ndimage

    from archive.process.diffim.alard_lupton import _dilate_cross

    m = np.random.default_rng(4).random((61, 47)) > 0.97
    m[0, 5] = m[-1, -1] = m[30, 0] = True
    for n in (0, 1, 4, 9):
        assert np.array_equal(_dilate_cross(m, n), ndimage.binary_dilation(m, iterations=n) if n else m)
