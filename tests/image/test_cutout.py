"""Cutouts of an Exposure: sizes in arcsec or pixels, the box centred on the position, WCS, mask,
variance and PSF carried over, edges filled with NaN / NO_DATA and said so, hostile sizes and
positions refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from archive.errors import ValidationError
from archive.image.cutout import MAX_CUTOUT_PIXELS, Size, check_position, cutout, cutout_box, extract
from archive.image.exposure import Exposure
from archive.image.psf import GaussianPSF


def _exposure(nx=200, ny=150, scale=0.2):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [nx / 2 + 0.3, ny / 2 - 0.2]
    w.wcs.cdelt = [-scale / 3600, scale / 3600]
    w.pixel_shape = (nx, ny)
    rng = np.random.default_rng(4)
    img = rng.normal(size=(ny, nx)).astype(np.float32)
    mask = (rng.random((ny, nx)) < 0.05).astype(np.int32) << 2  # some CR bits
    var = rng.uniform(1, 2, (ny, nx)).astype(np.float32)
    psf = GaussianPSF(fwhm=3.0)
    return Exposure(img, mask, var, wcs=w, psf=psf)


@pytest.mark.parametrize("text, want", [
    ("10", Size(10.0, "arcsec")), ("10arcsec", Size(10.0, "arcsec")), ('10"', Size(10.0, "arcsec")),
    ("1.5arcmin", Size(90.0, "arcsec")), ("64px", Size(64, "pix")), (" 33 pix ", Size(33, "pix")),
    (12.5, Size(12.5, "arcsec")),
])
def test_sizes(text, want):
    assert Size.parse(text) == want


@pytest.mark.parametrize("text, message", [
    ("-3", "positive"), ("0", "positive"), ("nan", "positive"), ("inf", "positive"), ("1e400px", "positive"),
    ("abc", "a number"), ("10.5px", "whole number"), ("", "a number"), ("-0px", "positive"),
])
def test_bad_sizes(text, message):
    with pytest.raises(ValidationError, match=message):
        Size.parse(text)


def test_size_cap_in_pixels_and_arcsec():
    assert Size(MAX_CUTOUT_PIXELS, "pix").pixels(0.2) == MAX_CUTOUT_PIXELS
    with pytest.raises(ValidationError, match=f"limit of {MAX_CUTOUT_PIXELS} px"):
        Size(MAX_CUTOUT_PIXELS + 1, "pix").pixels(0.2)
    with pytest.raises(ValidationError, match="410 arcsec here"):
        Size(1e300).pixels(0.2)
    assert Size(20.0).pixels(0.19997) == 100 and Size(0.01).pixels(0.2) == 1


@pytest.mark.parametrize("ra, dec", [(float("nan"), 0), (0, float("nan")), (float("inf"), 0), (10, 90.5),
                                     (10, -91), ("x", 0)])
def test_bad_positions(ra, dec):
    with pytest.raises(ValidationError):
        check_position(ra, dec)


def test_ra_wraps():
    assert check_position(-10, 5) == (350.0, 5.0) and check_position(360, 0) == (0.0, 0.0)


def test_box_is_centred():
    assert cutout_box(50.0, 60.0, 5, 5) == (48, 58)   # odd: the position in the central pixel
    assert cutout_box(50.4, 60.6, 5, 5) == (48, 59)
    assert cutout_box(50.6, 60.1, 4, 4) == (49, 59)   # even: the box centre (50.5, 60.5) nearest


def test_cutout_keeps_pixels_wcs_mask_variance_psf():
    e = _exposure()
    ra, dec = (float(v) for v in e.wcs.all_pix2world([[120.2, 40.7]], 0)[0])
    c = cutout(e, ra, dec, "21px")
    s = c.exposure
    assert s.shape == (21, 21) and c.n_outside == 0 and not c.partial
    x0, y0 = s.xy0
    assert (x0, y0) == (110, 31)
    np.testing.assert_array_equal(s.image, e.image[31:52, 110:131])
    np.testing.assert_array_equal(s.mask, e.mask[31:52, 110:131])
    np.testing.assert_array_equal(s.variance, e.variance[31:52, 110:131])
    # the same sky at the same physical pixel
    x, y = s.wcs.all_world2pix([[ra, dec]], 0)[0]
    assert abs(x - (120.2 - x0)) < 1e-6 and abs(y - (40.7 - y0)) < 1e-6 and abs(c.x - x) < 1e-6
    np.testing.assert_allclose(s.psf.kernel(c.x, c.y), e.psf.kernel(120.2, 40.7))
    s.image[0, 0] = 99.0  # a copy, not a view
    assert e.image[31, 110] != 99.0


def test_cutout_in_arcsec_uses_the_pixel_scale():
    e = _exposure(scale=0.25)
    ra, dec = e.center_sky()
    assert cutout(e, ra, dec, 5.0).exposure.shape == (20, 20)
    assert cutout(e, ra, dec, "0.5arcmin").exposure.shape == (120, 120)


def test_edge_cutout_is_filled_and_says_so(tmp_path):
    e = _exposure()
    ra, dec = (float(v) for v in e.wcs.all_pix2world([[2.0, 147.0]], 0)[0])  # near the top-left corner
    c = cutout(e, ra, dec, "11px")
    s = c.exposure
    assert s.shape == (11, 11) and s.xy0 == (-3, 142)
    off = np.zeros((11, 11), bool)
    off[:, :3] = True   # x < 0
    off[8:, :] = True   # y >= 150
    assert c.n_outside == int(off.sum()) == 3 * 11 + 3 * 8 and c.partial
    assert np.isnan(s.image[off]).all() and np.isnan(s.variance[off]).all()
    assert ((s.mask[off] & (1 << s.mask_planes["NO_DATA"])) != 0).all()
    np.testing.assert_array_equal(s.image[~off], e.image[142:150, 0:8].ravel())
    path = c.writeto(tmp_path / "edge.fits")
    with fits.open(path, checksum=True) as hdul:
        h = hdul[0].header
        assert h["PARTIAL"] is True and h["NOFFIMG"] == c.n_outside and "NaN" in str(h["COMMENT"])
        assert hdul["IMAGE"].header["LTV1"] == 3.0 and hdul["IMAGE"].header["LTV2"] == -142.0
        assert hdul["MASK"].header["MP_NO_DATA"] == 4 and hdul["MASK"].header["MP_CR"] == 2
        psf = hdul["PSF_IMAGE"].data
        assert psf.shape[0] % 2 == 1 and abs(psf.sum() - 1) < 1e-5
        assert np.unravel_index(np.argmax(psf), psf.shape) == (psf.shape[0] // 2, psf.shape[1] // 2)
        w = WCS(hdul["IMAGE"].header)
        x, y = w.all_world2pix([[ra, dec]], 0)[0]
        assert abs(x - 5.0) < 1e-6 and abs(y - 5.0) < 1e-6
    back = Exposure.read(path)
    assert back.xy0 == (-3, 142) and back.psf is not None
    with pytest.raises(ValidationError, match="exists"):
        c.writeto(path)


def test_position_off_the_image_is_refused():
    e = _exposure()
    ra, dec = (float(v) for v in e.wcs.all_pix2world([[-3.0, 20.0]], 0)[0])
    with pytest.raises(ValidationError, match="not on the image"):
        cutout(e, ra, dec, "11px")


def test_extract_refuses_huge_or_empty_boxes():
    e = _exposure()
    for nx, ny in ((0, 5), (5, -1), (MAX_CUTOUT_PIXELS + 1, 3)):
        with pytest.raises(ValidationError):
            extract(e, 0, 0, nx, ny)
    s, n = extract(e, 1000, 1000, 4, 4)  # entirely off: all filled
    assert n == 16 and np.isnan(s.image).all() and math.isnan(float(s.variance[0, 0]))
