import math

import numpy as np
import pytest
from astropy.io import fits

from archive.errors import ValidationError
from archive.image.psf import (PSF, GaussianPSF, MoffatPSF, PixelPSF, add_point_sources, fwhm_from_image,
                               poly_terms)

BBOX = (0.0, 0.0, 511.0, 511.0)


def _centroid(stamp):
    yy, xx = np.indices(stamp.shape)
    return (stamp * xx).sum() / stamp.sum(), (stamp * yy).sum() / stamp.sum()


@pytest.mark.parametrize("psf", [GaussianPSF(1.3), MoffatPSF(3.2, 3.0),
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


def test_fwhm_values():
    g = GaussianPSF(2.0)
    assert g.fwhm() == pytest.approx(2 * math.sqrt(2 * math.log(2)) * 2.0)
    # measured from a pixel-integrated stamp: broadened by the pixel (sigma^2 + 1/12)
    assert fwhm_from_image(g.image(0, 0, 41)) == pytest.approx(2.3548 * math.sqrt(4 + 1 / 12), rel=0.01)
    m = MoffatPSF(4.0, 3.5)
    assert m.fwhm() == 4.0
    assert fwhm_from_image(m.image(0, 0, 51)) == pytest.approx(math.hypot(4.0, 0.68), rel=0.03)
    v = MoffatPSF(3.0, 3.0, variation=[0.2, 0.0], bbox=BBOX)
    assert v.fwhm() == pytest.approx(3.0)
    assert v.fwhm(511, 100) == pytest.approx(3.6)
    assert v.fwhm(0, 100) == pytest.approx(2.4)
    np.testing.assert_allclose(v.fwhm_at([0, 511], [0, 0]), [2.4, 3.6])


def test_effective_fwhm_comparable_across_classes():
    g = GaussianPSF(1.6)
    assert g.effective_fwhm() == pytest.approx(2.3548 * math.sqrt(1.6**2 + 1 / 12), rel=0.01)
    m = MoffatPSF(3.5, 3.0, variation=[0.1, 0.0], bbox=BBOX)
    p = PixelPSF.from_psf(m, BBOX, degree=2, oversample=3, size=31)
    for x, y in [(255.5, 255.5), (20, 300), (480, 30)]:
        assert p.effective_fwhm(x, y) == pytest.approx(m.effective_fwhm(x, y), rel=0.02)
        assert m.effective_fwhm(x, y) > m.fwhm(x, y)
    assert p.effective_fwhm() == pytest.approx(p.fwhm(), rel=0.02)


def test_elliptical_moffat_shape():
    p = MoffatPSF(4.0, 3.5, ellipticity=0.2, theta=30.0)
    st = p.image(0, 0, 61)
    yy, xx = np.indices(st.shape) - 30
    ixx, iyy, ixy = (st * xx * xx).sum(), (st * yy * yy).sum(), (st * xx * yy).sum()
    angle = 0.5 * math.degrees(math.atan2(2 * ixy, ixx - iyy))
    half = math.hypot(0.5 * (ixx - iyy), ixy)
    axis_ratio = math.sqrt((0.5 * (ixx + iyy) - half) / (0.5 * (ixx + iyy) + half))
    assert angle == pytest.approx(30.0, abs=0.5)
    assert 1 - axis_ratio == pytest.approx(0.2, abs=0.01)  # diluted a little by the pixel
    # the FWHM is the geometric mean of the axes: same half-maximum area as the round profile
    assert fwhm_from_image(st) == pytest.approx(fwhm_from_image(MoffatPSF(4.0, 3.5).image(0, 0, 61)), rel=0.01)
    with pytest.raises(ValidationError):
        MoffatPSF(3.0, ellipticity=1.0)


def test_shifted_psf_describes_same_pixels():
    v = MoffatPSF(3.0, 3.0, variation=[0.2, 0.1], bbox=BBOX)
    sub = v.shifted(100, 50)
    np.testing.assert_allclose(sub.image(10.2, 20.6, 21), v.image(110.2, 70.6, 21), rtol=1e-12)
    assert sub.fwhm(10, 20) == pytest.approx(v.fwhm(110, 70), rel=1e-14)


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
    assert p.fwhm(250, 250) == pytest.approx(fwhm_from_image(m.image(250, 250, 41)), rel=0.02)


def test_pixel_psf_vectorised_stamps_equal_spline_interpolation():
    from scipy import ndimage

    m = MoffatPSF(3.0, 3.0, variation=[0.1, -0.05], bbox=BBOX, ellipticity=0.1, theta=40.0)
    p = PixelPSF.from_psf(m, BBOX, degree=2, oversample=2, size=27)
    rng = np.random.default_rng(3)
    xs, ys = rng.uniform(0, 511, 40), rng.uniform(0, 511, 40)
    stamps = p.render_stamps(xs, ys, 19)
    c = (p.basis.shape[1] - 1) / 2.0
    g = np.arange(19) - 9
    for n in range(0, 40, 7):
        dx = xs[n] - math.floor(xs[n] + 0.5)
        dy = ys[n] - math.floor(ys[n] + 0.5)
        yy, xx = np.meshgrid(c + (g - dy) * 2, c + (g - dx) * 2, indexing="ij")
        ref = ndimage.map_coordinates(p.model(xs[n], ys[n]), [yy, xx], order=3, mode="constant")
        # same cubic B-spline; only the treatment beyond the basis edge differs (zero padding)
        np.testing.assert_allclose(stamps[n], ref / ref.sum(), rtol=0, atol=1e-9 * ref.max() / ref.sum())
        np.testing.assert_allclose(p.image(xs[n], ys[n], 19), stamps[n], rtol=1e-12, atol=1e-18)


def test_pixel_psf_native_no_shift_is_exact():
    g = GaussianPSF(1.5)
    basis = g.image(0, 0, 25)
    p = PixelPSF(basis)
    np.testing.assert_allclose(p.image(7.0, 9.0, 25), basis, atol=1e-15)


@pytest.mark.parametrize("psf", [
    GaussianPSF(1.234567890123),
    MoffatPSF(3.1, 2.7, variation=[0.1, 0.2, 0.01, 0.02, 0.03], bbox=BBOX),
    MoffatPSF(2.5, 4.0),
    MoffatPSF(3.3, 3.0, ellipticity=0.15, theta=-33.3),
    PixelPSF(np.random.default_rng(1).random((3, 9, 9)), None, oversample=2, degree=1, bbox=BBOX),
    PixelPSF(np.random.default_rng(2).random((2, 7, 7)), np.random.default_rng(3).random((2, 3)), degree=1,
             bbox=BBOX).shifted(12.5, -3),
])
def test_fits_round_trip_exact(tmp_path, psf):
    path = tmp_path / "psf.fits"
    fits.HDUList([fits.PrimaryHDU(), psf.to_hdu()]).writeto(path)
    with fits.open(path) as hdul:
        assert hdul["PSF"].header["PSFTYPE"] == psf.kind
        back = PSF.from_hdu(hdul["PSF"])
    assert type(back) is type(psf) and back == psf
    np.testing.assert_array_equal(back.image(250.3, 260.4, 9), psf.image(250.3, 260.4, 9))


def test_unknown_psf_type_is_clear():
    hdu = GaussianPSF(1.0).to_hdu()
    hdu.header["PSFTYPE"] = "nonsense"
    with pytest.raises(ValidationError, match="nonsense"):
        PSF.from_hdu(hdu)


def test_bad_sizes_rejected():
    with pytest.raises(ValidationError, match="odd"):
        GaussianPSF(1.0).image(0, 0, 10)
    with pytest.raises(ValidationError):
        GaussianPSF(-1)


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
