"""Reading real DECam Community Pipeline products and PSFEx models (legacypipe test data)."""

import math

import numpy as np
import pytest
from astropy.io import fits

from archive.image import Exposure
from archive.image.foreign import read_decam_cp, read_plain_image
from archive.image.psf import PixelPSF

CASE6 = "real/legacypipe/testcase6"
OOI = CASE6 + "/images/decam/CP/V4.8.2a/CP20171112/c4d_171113_061941_ooi_r_ls9.S4.fits"
PSFEX = CASE6 + "/calib/psfex/decam/CP/V4.8.2a/CP20171112/c4d_171113_061941_ooi_r_ls9-psfex.fits"


@pytest.fixture
def decam(shared_data):
    path = shared_data / OOI
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def test_read_decam_cp(decam, shared_data, tmp_path):
    exp = read_decam_cp(decam, psfex_path=shared_data / PSFEX)
    raw_img = fits.getdata(decam, 1)
    w = fits.getdata(str(decam).replace("_ooi_", "_oow_"), 1)
    dq = fits.getdata(str(decam).replace("_ooi_", "_ood_"), 1)
    assert exp.shape == raw_img.shape
    np.testing.assert_array_equal(exp.image, raw_img.astype(np.float32))
    good = w > 0
    np.testing.assert_allclose(exp.variance[good], 1.0 / w[good], rtol=1e-6)
    assert np.all(np.isnan(exp.variance[~good]))
    assert np.all(exp.mask_of("NO_DATA")[~good])
    # CP V4.8 integer codes: 3 saturated, 4 bleed -> SAT; 5 cosmic ray -> CR
    assert np.array_equal(exp.mask_of("SAT"), np.isin(dq, [3, 4]))
    assert np.array_equal(exp.mask_of("CR"), dq == 5)
    i = exp.info
    assert i.band == "r" and i.visit == 695773 and i.detector == 28
    h0 = fits.getheader(decam, 0)
    # MJD-OBS (UTC, start) -> TAI mid-exposure: + 37 s (2017) + EXPTIME / 2
    assert i.mjd == pytest.approx(h0["MJD-OBS"] + (37.0 + h0["EXPTIME"] / 2) / 86400, abs=1e-8)
    assert i.gain == pytest.approx(3.884, abs=0.01) and i.saturation > 40000
    # TPV WCS: same sky as astropy reading the file directly
    from astropy.wcs import WCS

    ref = WCS(fits.getheader(decam, 1))
    xy = np.array([[0.0, 0.0], [50.0, 50.0], [100.0, 99.0]])
    np.testing.assert_allclose(exp.wcs.all_pix2world(xy, 0), ref.all_pix2world(xy, 0), atol=1e-10)
    # PSF from PSFEx; round trip of everything through our format
    assert isinstance(exp.psf, PixelPSF) and 2.0 < exp.psf.fwhm(50, 50) < 8.0
    back = Exposure.read(exp.writeto(tmp_path / "decam.fits"))
    assert back.image.tobytes() == exp.image.tobytes() and back.mask.tobytes() == exp.mask.tobytes()
    assert back.psf == exp.psf
    np.testing.assert_allclose(back.wcs.all_pix2world(xy, 0), ref.all_pix2world(xy, 0), atol=1e-10)


def test_psfex_mapping_is_exact(shared_data):
    path = shared_data / PSFEX
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    t = fits.getdata(path, 1)
    m = t["psf_mask"][0].astype(float)  # (6, 63, 63): 1, X, X^2, Y, XY, Y^2
    z1, z2, s1, s2 = (float(t[c][0]) for c in ("polzero1", "polzero2", "polscal1", "polscal2"))
    p = PixelPSF.from_psfex(path)
    # at X = Y = 0 (x = POLZERO1 - 1 in 0-based pixels) the model is the constant basis image
    np.testing.assert_allclose(p.model(z1 - 1, z2 - 1), m[0], atol=1e-12)
    np.testing.assert_allclose(p.model(z1 - 1 + s1, z2 - 1), m[0] + m[1] + m[2], atol=1e-12)
    np.testing.assert_allclose(p.model(z1 - 1, z2 - 1 + s2), m[0] + m[3] + m[5], atol=1e-12)
    np.testing.assert_allclose(p.model(z1 - 1 + s1, z2 - 1 + s2), m.sum(axis=0), atol=1e-12)
    # a stamp at an integer position reproduces the normalised model there
    st = p.image(round(z1 - 1), round(z2 - 1), 63)
    ref = p.model(round(z1 - 1), round(z2 - 1))
    np.testing.assert_allclose(st, ref / ref.sum(), atol=1e-12)
    # FWHM of the PSFEx model; PSFEx's own PSF_FWHM (from SExtractor sizes) is larger
    assert 0.6 * t["psf_fwhm"][0] < p.fwhm(50, 50) < 1.1 * t["psf_fwhm"][0]


def test_read_plain_image(decam):
    exp = read_plain_image(decam, zero_point=30.0)
    assert exp.wcs is not None and exp.photo_calib.zero_point == pytest.approx(30.0)
    assert math.isnan(float(exp.variance[0, 0])) and exp.info.exp_time > 0
