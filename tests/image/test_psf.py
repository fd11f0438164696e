"""The PSF interface (archive.image.psf.PSF) on every model: stamps, kernels, shape, FITS."""

import math

import numpy as np
import pytest
from astropy.io import fits

from archive.errors import ValidationError
from archive.image import Exposure
from archive.image.psf import (FWHM_PER_SIGMA, PSF, GaussianPSF, MoffatPSF, PixelPSF, PsfSummary, add_point_sources,
                               fwhm_from_image, poly_terms)

BBOX = (0.0, 0.0, 511.0, 511.0)


def _centroid(stamp):
    yy, xx = np.indices(stamp.shape)
    return (stamp * xx).sum() / stamp.sum(), (stamp * yy).sum() / stamp.sum()


def _models():
    """One of every model: round and elliptical Gaussians, a varying elliptical Moffat, PixelPSFs
    (pixelized from a varying Moffat, oversampled 2x; and a shifted copy)."""
    m = MoffatPSF(3.2, 3.0, variation=[0.1, -0.05], bbox=BBOX, ellipticity=0.1, theta=40.0)
    p = PixelPSF.from_psf(m, BBOX, degree=2, oversample=2, size=31)
    return {
        "gaussian": GaussianPSF(sigma=1.3),
        "gaussian_elliptical": GaussianPSF(fwhm=3.4, ellipticity=0.25, theta=-20.0),
        "moffat": m,
        "pixel": p,
        "pixel_shifted": p.shifted(40.0, -25.0),
    }


MODELS = _models()


# --------------------------------------------------------------------------- stamps
@pytest.mark.parametrize("psf", [GaussianPSF(sigma=1.3), MoffatPSF(3.2, 3.0),
                                 MoffatPSF(3.0, 2.5, variation=[0.2, -0.1], bbox=BBOX)])
@pytest.mark.parametrize("x, y", [(100.0, 200.0), (10.3, 20.7), (300.49, 0.5)])
def test_stamp_convention(psf, x, y):
    s = 31
    st = psf.image(x, y, s)
    assert st.shape == (s, s) and st.dtype == np.float64
    assert st.sum() == pytest.approx(1.0, abs=1e-12)
    cx, cy = _centroid(st)
    dx = x - math.floor(x + 0.5)
    dy = y - math.floor(y + 0.5)
    # symmetric profiles: centroid at centre pixel + fractional offset (up to the
    # asymmetric truncation of the wings by the stamp edge)
    assert cx == pytest.approx(s // 2 + dx, abs=6e-3)
    assert cy == pytest.approx(s // 2 + dy, abs=6e-3)
    assert psf.stamp_origin(x, y, s) == (math.floor(x + 0.5) - 15, math.floor(y + 0.5) - 15)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stamps_hold_unit_flux_and_renormalize(name):
    psf = MODELS[name]
    x = np.array([100.2, 255.5, 400.9])
    y = np.array([80.7, 255.5, 430.1])
    size = 61 if not name.startswith("pixel") else psf.default_size()
    st = psf.stamps(x, y, size)
    assert st.shape == (3, size, size)
    # the fraction of a unit flux inside the stamp: all of it but the far wings
    np.testing.assert_allclose(st.sum(axis=(1, 2)), 1.0, atol=2e-3)
    small = psf.stamps(x, y, 9)
    assert np.all(small.sum(axis=(1, 2)) < st.sum(axis=(1, 2)))
    np.testing.assert_allclose(psf.stamps(x, y, 9, renormalize=True).sum(axis=(1, 2)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stamps_are_centred_on_the_requested_positions(name):
    """First moments of each stamp equal the sub-pixel position of its source relative to the
    stamp centre, also for stamps centred on another pixel (xc, yc)."""
    psf = MODELS[name]
    rng = np.random.default_rng(11)
    x = rng.uniform(20, 490, 25)
    y = rng.uniform(20, 490, 25)
    xc = np.floor(x + 0.5).astype(int) + rng.integers(-2, 3, 25)
    yc = np.floor(y + 0.5).astype(int) + rng.integers(-2, 3, 25)
    size = 81  # the Moffat's wings (beta = 3) cut at 40 px move its centroid by 1e-4 px
    st = psf.stamps(x, y, size, xc, yc)
    g = np.arange(size) - size // 2
    tot = st.sum(axis=(1, 2))
    mx = (st.sum(axis=1) * g).sum(axis=1) / tot
    my = (st.sum(axis=2) * g).sum(axis=1) / tot
    tol = 2e-3 if name.startswith("pixel") else 3e-4
    np.testing.assert_allclose(mx, x - xc, atol=tol)
    np.testing.assert_allclose(my, y - yc, atol=tol)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stamps_agree_with_the_kernel(name):
    """At a position on the kernel's sampling grid a stamp is the kernel's samples: at whole
    pixels the native kernel, at quarter pixels every 4th sample of the 4x oversampled one."""
    psf = MODELS[name]
    size = 25
    tol = 1e-12 if not name.startswith("pixel") else 2e-4  # PixelPSF stamps: the phase table
    for x, y in [(200.0, 310.0), (200.25, 310.0), (77.75, 401.5)]:
        st = psf.stamps(np.array([x]), np.array([y]), size, renormalize=True)[0]
        k = 4
        os_ = psf.kernel(x, y, size + 2, oversample=k)
        M = os_.shape[0] // 2
        # stamp pixel offset g - f from the source = kernel sample M + k (g - f)
        fx, fy = x - math.floor(x + 0.5), y - math.floor(y + 0.5)
        g = np.arange(size) - size // 2
        ix = np.rint(M + k * (g - fx)).astype(int)
        iy = np.rint(M + k * (g - fy)).astype(int)
        ref = os_[np.ix_(iy, ix)]
        ref = ref / ref.sum()
        assert np.abs(st - ref).max() < tol * ref.max(), (x, y)
        if fx == 0 and fy == 0:
            np.testing.assert_allclose(psf.kernel(x, y, size), ref, rtol=0, atol=1e-14 * ref.max())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_oversampled_kernel_integrates_to_the_native_one(name):
    psf = MODELS[name]
    x, y = 180.4, 333.8
    native = psf.kernel(x, y, 21)
    assert native.shape == (21, 21) and native.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.unravel_index(np.argmax(native), native.shape) == (10, 10)
    for k in (2, 3, 4, 5):
        os_ = psf.kernel(x, y, 21, oversample=k)
        M = (21 * k) // 2
        assert os_.shape == (2 * M + 1, 2 * M + 1)
        # every k-th sample from the centre is the native kernel; the integral is 1
        np.testing.assert_allclose(os_[M % k::k, M % k::k], native, rtol=1e-12, atol=1e-15)
        assert os_.sum() / k ** 2 == pytest.approx(1.0, abs=2e-3)
        cx, cy = _centroid(os_)
        assert (cx, cy) == pytest.approx((M, M), abs=2e-3 * k)


def test_pixel_psf_kernel_is_its_spline_interpolation():
    from scipy import ndimage

    p = MODELS["pixel"]
    c = (p.basis.shape[1] - 1) / 2.0
    for x, y in [(30.0, 40.0), (300.0, 200.0)]:
        model = p.model(x, y)
        for k in (1, 3):
            ker = p.kernel(x, y, 19, oversample=k)
            M = ker.shape[0] // 2
            t = (np.arange(2 * M + 1) - M) / k * p.oversample
            yy, xx = np.meshgrid(c + t, c + t, indexing="ij")
            ref = ndimage.map_coordinates(model, [yy, xx], order=3, mode="constant")
            # the same cubic B-spline; only the treatment beyond the basis edge differs
            ref = ref / ref[M % k::k, M % k::k].sum()
            np.testing.assert_allclose(ker, ref, rtol=0, atol=1e-9 * ref.max())


def test_pixel_psf_native_no_shift_is_exact():
    g = GaussianPSF(sigma=1.5)
    basis = g.kernel(0, 0, 25)
    p = PixelPSF(basis)
    np.testing.assert_allclose(p.kernel(7.0, 9.0, 25), basis, atol=1e-15)
    np.testing.assert_allclose(p.stamps([7.0], [9.0], 25)[0], basis, rtol=0, atol=1e-7 * basis.max())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stamps_are_vectorised(name):
    """Many positions at once give each position's own stamp."""
    psf = MODELS[name]
    rng = np.random.default_rng(3)
    x, y = rng.uniform(0, 511, 500), rng.uniform(0, 511, 500)
    st = psf.stamps(x, y, 15)
    tol = 0 if not name.startswith("pixel") else 1e-6
    for n in (0, 17, 499):
        one = psf.stamps(x[n:n + 1], y[n:n + 1], 15)[0]
        np.testing.assert_allclose(st[n], one, rtol=0, atol=tol * one.max())
    assert psf.stamps(np.zeros(0), np.zeros(0), 15).shape == (0, 15, 15)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stamp_gradients(name):
    psf = MODELS[name]
    x, y = np.array([120.3, 300.8]), np.array([222.6, 40.45])
    P, Px, Py = psf.stamps_with_gradient(x, y, 21)
    np.testing.assert_array_equal(P, psf.stamps(x, y, 21))
    e = 0.01
    nx = (psf.stamps(x + e, y, 21) - psf.stamps(x - e, y, 21)) / (2 * e)
    ny = (psf.stamps(x, y + e, 21) - psf.stamps(x, y - e, 21)) / (2 * e)
    assert np.abs(Px - nx).max() < 0.02 * np.abs(nx).max()
    assert np.abs(Py - ny).max() < 0.02 * np.abs(ny).max()
    # the derivative with respect to the source position moves the light in that direction
    g = np.arange(21) - 10
    np.testing.assert_allclose((Px.sum(axis=1) * g).sum(axis=1), 1.0, atol=0.02)
    np.testing.assert_allclose((Py.sum(axis=2) * g).sum(axis=1), 1.0, atol=0.02)


def test_bad_positions_and_sizes_rejected():
    g = GaussianPSF(sigma=1.0)
    with pytest.raises(ValidationError, match="odd"):
        g.stamps([0.0], [0.0], 10)
    with pytest.raises(ValidationError, match="finite"):
        g.stamps([np.nan], [0.0], 11)
    with pytest.raises(ValidationError, match="equal length"):
        g.stamps([1.0, 2.0], [0.0], 11)
    with pytest.raises(ValidationError, match="oversample"):
        g.kernel(0, 0, 11, oversample=0)
    with pytest.raises(ValidationError, match="both"):
        g.fwhm(1.0, None)


# --------------------------------------------------------------------------- shape
def test_fwhm_values():
    g = GaussianPSF(sigma=2.0)
    assert g.fwhm() == pytest.approx(FWHM_PER_SIGMA * 2.0)
    assert GaussianPSF(fwhm=3.0).fwhm() == 3.0 and GaussianPSF(fwhm=3.0).sigma == 3.0 / FWHM_PER_SIGMA
    # measured from a pixel-integrated kernel: broadened by the pixel (sigma^2 + 1/12)
    assert fwhm_from_image(g.kernel(0, 0, 41)) == pytest.approx(FWHM_PER_SIGMA * math.sqrt(4 + 1 / 12), rel=0.01)
    m = MoffatPSF(4.0, 3.5)
    assert m.fwhm() == 4.0
    assert fwhm_from_image(m.kernel(0, 0, 51)) == pytest.approx(math.hypot(4.0, 0.68), rel=0.03)
    v = MoffatPSF(3.0, 3.0, variation=[0.2, 0.0], bbox=BBOX)
    assert v.fwhm() == pytest.approx(3.0)
    assert v.fwhm(511, 100) == pytest.approx(3.6)
    assert v.fwhm(0, 100) == pytest.approx(2.4)
    np.testing.assert_allclose(v.fwhm([0, 511], [0, 0]), [2.4, 3.6])
    assert v.fwhm(np.zeros((2, 3)), 7.0).shape == (2, 3)


def test_fwhm_and_ellipticity_of_known_models_over_the_field():
    xs, ys = np.meshgrid(np.linspace(0, 511, 4), np.linspace(0, 511, 3))
    g = GaussianPSF(fwhm=3.4, ellipticity=0.25, theta=-20.0)
    np.testing.assert_array_equal(g.fwhm(xs, ys), np.full((3, 4), 3.4))
    np.testing.assert_array_equal(g.ellipticity(xs, ys), np.full((3, 4), 0.25))
    assert isinstance(g.ellipticity(), float)
    # the elliptical Gaussian's second moments: major/minor sigma = sigma / sqrt(q), sigma sqrt(q)
    k = g.kernel(0, 0, 61, oversample=3)
    M = k.shape[0] // 2
    t = (np.arange(2 * M + 1) - M) / 3
    ixx = (k.sum(axis=0) * t ** 2).sum() / k.sum()
    iyy = (k.sum(axis=1) * t ** 2).sum() / k.sum()
    ixy = (k * t[None, :] * t[:, None]).sum() / k.sum()
    tr, d = 0.5 * (ixx + iyy), math.hypot(0.5 * (ixx - iyy), ixy)
    s2 = (3.4 / FWHM_PER_SIGMA) ** 2
    # + the pixel's variance, 1/12 px^2 integrated by the n-point rule: (1 - 1/n^2) / 12
    pix = (1 - 1 / g.oversample ** 2) / 12
    assert tr + d == pytest.approx(s2 / 0.75 + pix, rel=1e-4)
    assert tr - d == pytest.approx(s2 * 0.75 + pix, rel=1e-4)
    assert 0.5 * math.degrees(math.atan2(2 * ixy, ixx - iyy)) == pytest.approx(-20.0, abs=0.1)

    m = MoffatPSF(3.0, 3.0, variation=[0.2, 0.0], bbox=BBOX, ellipticity=0.15, theta=10.0)
    np.testing.assert_allclose(m.fwhm(xs, ys), 3.0 * (1 + 0.2 * (xs / 255.5 - 1)))
    np.testing.assert_array_equal(m.ellipticity(xs, ys), 0.15)
    s = m.summary(n=5)
    assert isinstance(s, PsfSummary) and s.n_positions == 25 and s.bbox == BBOX
    assert (s.fwhm_min, s.fwhm_median, s.fwhm_max) == pytest.approx((2.4, 3.0, 3.6))
    assert s.ellipticity_min == s.ellipticity_max == 0.15
    assert m.shifted(100, 0).summary().bbox == (-100.0, 0.0, 411.0, 511.0)
    one = GaussianPSF(sigma=1.5).summary()
    assert one.n_positions == 1 and one.fwhm_min == one.fwhm_max == pytest.approx(1.5 * FWHM_PER_SIGMA)
    assert GaussianPSF(sigma=1.5).summary((0, 0, 99, 99), n=3).n_positions == 9


def test_pixel_psf_shape_is_that_of_the_pixel_integrated_profile():
    """A PixelPSF sampling elliptical Gaussians whose width varies over the field: its FWHM and
    ellipticity are those of the pixel-integrated profile (sigma^2 + 1/12 on both axes)."""
    sig, q = 2.0, 0.7
    x0, x1 = BBOX[0], BBOX[2]
    p_lo = GaussianPSF(sigma=sig, ellipticity=1 - q, theta=35.0, oversample=9)
    p_hi = GaussianPSF(sigma=1.2 * sig, ellipticity=1 - q, theta=35.0, oversample=9)
    # a degree-1 model interpolating between the two (exact at the bbox ends in x)
    S, os_ = 41, 2
    t = (np.arange(S) - S // 2) / os_
    b_lo = p_lo._evaluate(np.zeros(1), np.zeros(1), t[None], t[None])[0] * os_ ** 2
    b_hi = p_hi._evaluate(np.zeros(1), np.zeros(1), t[None], t[None])[0] * os_ ** 2
    basis = np.stack([(b_lo + b_hi) / 2, (b_hi - b_lo) / 2, np.zeros_like(b_lo)])
    p = PixelPSF(basis, None, oversample=os_, degree=1, bbox=BBOX)
    for x, s in [(x0, sig), (x1, 1.2 * sig)]:
        a2, b2 = s ** 2 / q + 1 / 12, s ** 2 * q + 1 / 12
        assert p.ellipticity(x, 100.0) == pytest.approx(1 - math.sqrt(b2 / a2), abs=3e-3)
        assert p.fwhm(x, 100.0) == pytest.approx(fwhm_from_image(p.kernel(x, 100.0, 41)), rel=0.02)
    e = p.ellipticity(np.array([x0, 255.5, x1]), np.array([9.0, 9.0, 9.0]))
    assert e.shape == (3,)
    s = p.summary(n=3)
    assert s.fwhm_min == pytest.approx(p.fwhm(x0, 0.0)) and s.fwhm_max == pytest.approx(p.fwhm(x1, 0.0))


def test_effective_fwhm_comparable_across_classes():
    g = GaussianPSF(sigma=1.6)
    assert g.effective_fwhm() == pytest.approx(FWHM_PER_SIGMA * math.sqrt(1.6**2 + 1 / 12), rel=0.01)
    m = MoffatPSF(3.5, 3.0, variation=[0.1, 0.0], bbox=BBOX)
    p = PixelPSF.from_psf(m, BBOX, degree=2, oversample=3, size=31)
    for x, y in [(255.5, 255.5), (20, 300), (480, 30)]:
        assert p.effective_fwhm(x, y) == pytest.approx(m.effective_fwhm(x, y), rel=0.02)
        assert m.effective_fwhm(x, y) > m.fwhm(x, y)
    assert p.effective_fwhm() == pytest.approx(p.fwhm(), rel=0.02)


def test_elliptical_moffat_shape():
    p = MoffatPSF(4.0, 3.5, ellipticity=0.2, theta=30.0)
    st = p.kernel(0, 0, 61)
    yy, xx = np.indices(st.shape) - 30
    ixx, iyy, ixy = (st * xx * xx).sum(), (st * yy * yy).sum(), (st * xx * yy).sum()
    angle = 0.5 * math.degrees(math.atan2(2 * ixy, ixx - iyy))
    half = math.hypot(0.5 * (ixx - iyy), ixy)
    axis_ratio = math.sqrt((0.5 * (ixx + iyy) - half) / (0.5 * (ixx + iyy) + half))
    assert angle == pytest.approx(30.0, abs=0.5)
    assert 1 - axis_ratio == pytest.approx(0.2, abs=0.01)  # diluted a little by the pixel
    assert p.ellipticity() == 0.2
    # the FWHM is the geometric mean of the axes: same half-maximum area as the round profile
    assert fwhm_from_image(st) == pytest.approx(fwhm_from_image(MoffatPSF(4.0, 3.5).kernel(0, 0, 61)), rel=0.01)
    with pytest.raises(ValidationError):
        MoffatPSF(3.0, ellipticity=1.0)


def test_shifted_psf_describes_same_pixels():
    v = MoffatPSF(3.0, 3.0, variation=[0.2, 0.1], bbox=BBOX)
    sub = v.shifted(100, 50)
    np.testing.assert_allclose(sub.image(10.2, 20.6, 21), v.image(110.2, 70.6, 21), rtol=1e-12)
    np.testing.assert_allclose(sub.kernel(10.2, 20.6, 21), v.kernel(110.2, 70.6, 21), rtol=1e-12)
    assert sub.fwhm(10, 20) == pytest.approx(v.fwhm(110, 70), rel=1e-14)
    assert sub.reference_position() == (v.reference_position()[0] - 100, v.reference_position()[1] - 50)


def test_pixel_psf_from_moffat_matches():
    m = MoffatPSF(3.0, 3.0, variation=[0.1, -0.05], bbox=BBOX)
    p = PixelPSF.from_psf(m, BBOX, degree=2, oversample=3, size=31)
    for x, y in [(250.3, 260.8), (30.1, 480.4), (500.0, 10.0)]:
        a = p.image(x, y, 21)
        b = m.image(x, y, 21)
        assert a.sum() == pytest.approx(1.0)
        assert np.abs(a - b).max() < 0.01 * b.max()
        cx, cy = _centroid(a)
        assert cx == pytest.approx(10 + x - math.floor(x + 0.5), abs=0.02)
    # pixelized FWHM measures the effective (pixel-convolved) profile
    assert p.fwhm(250, 250) == pytest.approx(fwhm_from_image(m.kernel(250, 250, 41)), rel=0.02)


# --------------------------------------------------------------------------- FITS
ROUND_TRIP = [
    GaussianPSF(sigma=1.234567890123),
    GaussianPSF(fwhm=3.3, ellipticity=0.2, theta=17.5, oversample=5),
    MoffatPSF(3.1, 2.7, variation=[0.1, 0.2, 0.01, 0.02, 0.03], bbox=BBOX),
    MoffatPSF(2.5, 4.0),
    MoffatPSF(3.3, 3.0, ellipticity=0.15, theta=-33.3),
    PixelPSF(np.random.default_rng(1).random((3, 9, 9)), None, oversample=2, degree=1, bbox=BBOX),
    PixelPSF(np.random.default_rng(2).random((2, 7, 7)), np.random.default_rng(3).random((2, 3)), degree=1,
             bbox=BBOX).shifted(12.5, -3),
    MODELS["pixel"],
]


@pytest.mark.parametrize("psf", ROUND_TRIP)
def test_fits_round_trip_exact(tmp_path, psf):
    path = tmp_path / "psf.fits"
    fits.HDUList([fits.PrimaryHDU(), psf.to_hdu()]).writeto(path)
    with fits.open(path) as hdul:
        assert hdul["PSF"].header["PSFTYPE"] == psf.kind
        back = PSF.from_hdu(hdul["PSF"])
    assert type(back) is type(psf) and back == psf
    np.testing.assert_array_equal(back.image(250.3, 260.4, 9), psf.image(250.3, 260.4, 9))
    np.testing.assert_array_equal(back.kernel(250.3, 260.4, 9, oversample=3), psf.kernel(250.3, 260.4, 9, oversample=3))
    assert back.fwhm(100.0, 7.0) == psf.fwhm(100.0, 7.0)
    assert back.ellipticity(100.0, 7.0) == psf.ellipticity(100.0, 7.0)


@pytest.mark.parametrize("psf", ROUND_TRIP)
def test_exposure_keeps_every_psf_model(tmp_path, psf):
    rng = np.random.default_rng(0)
    exp = Exposure(rng.normal(size=(40, 50)).astype(np.float32), psf=psf)
    back = Exposure.read(exp.writeto(tmp_path / "e.fits"))
    assert type(back.psf) is type(psf) and back.psf == psf
    x, y = np.array([3.3, 40.8]), np.array([7.1, 22.5])
    np.testing.assert_array_equal(back.psf.stamps(x, y, 11), psf.stamps(x, y, 11))
    sub = Exposure.read(exp.subimage(10, 5, 50, 40).writeto(tmp_path / "s.fits"))
    np.testing.assert_array_equal(sub.psf.stamps(x - 10, y - 5, 11), psf.stamps(x, y, 11))


def test_gaussian_size_is_given_by_name():
    with pytest.raises(TypeError):
        GaussianPSF(1.5)  # sigma or FWHM? it must be said
    with pytest.raises(ValidationError, match="exactly one"):
        GaussianPSF(fwhm=3.0, sigma=1.0)
    with pytest.raises(ValidationError):
        GaussianPSF(sigma=-1)


def test_unknown_psf_type_is_clear():
    hdu = GaussianPSF(sigma=1.0).to_hdu()
    hdu.header["PSFTYPE"] = "nonsense"
    with pytest.raises(ValidationError, match="nonsense"):
        PSF.from_hdu(hdu)


def test_old_gaussian_hdu_reads_back():
    """A Gaussian written with its sigma alone (before FWHM and ellipticity were columns)."""
    from astropy.table import Table

    hdu = fits.table_to_hdu(Table({"sigma": [1.7], "x_offset": [0.0], "y_offset": [2.0]}))
    hdu.header["EXTNAME"] = "PSF"
    hdu.header["PSFTYPE"] = "gaussian"
    back = PSF.from_hdu(hdu)
    assert back.sigma == 1.7 and back.fwhm() == FWHM_PER_SIGMA * 1.7 and back.ellipticity() == 0.0
    assert back.y_offset == 2.0


# --------------------------------------------------------------------------- rendering
def test_add_point_sources_conserves_flux_and_handles_edges():
    img = np.zeros((100, 120))
    psf = MoffatPSF(3.0, 3.5)
    xs = np.array([50.2, 60.7, 0.0, 119.4])
    ys = np.array([40.1, 80.3, 50.0, 99.6])
    fl = np.array([1000.0, 500.0, 200.0, 300.0])
    add_point_sources(img, psf, xs, ys, fl, size=25)
    # interior stars: the stamp sums to the flux
    assert img[28:53, 38:63].sum() == pytest.approx(1000.0, rel=1e-9)
    # matches a single-stamp placement
    x0, y0 = psf.stamp_origin(60.7, 80.3, 25)
    ref = np.zeros_like(img)
    ref[y0:y0 + 25, x0:x0 + 25] += 500 * psf.image(60.7, 80.3, 25)
    np.testing.assert_allclose(img[y0:y0 + 25, x0:x0 + 25], ref[y0:y0 + 25, x0:x0 + 25], atol=1e-9)
    # edge stars lose flux outside the image, but only that
    assert img.sum() < fl.sum() and img.sum() > 1500


def test_poly_terms_order():
    assert poly_terms(2) == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
