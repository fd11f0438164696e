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
def decam(data_dir):
    return data_dir / OOI


def test_read_decam_cp(decam, data_dir, tmp_path):
    exp = read_decam_cp(decam, psfex_path=data_dir / PSFEX)
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


def test_psfex_mapping_is_exact(data_dir):
    path = data_dir / PSFEX
    t = fits.getdata(path, 1)
    m = t["psf_mask"][0].astype(float)  # (6, 63, 63): 1, X, X^2, Y, XY, Y^2
    z1, z2, s1, s2 = (float(t[c][0]) for c in ("polzero1", "polzero2", "polscal1", "polscal2"))
    p = PixelPSF.from_psfex(path)
    # at X = Y = 0 (x = POLZERO1 - 1 in 0-based pixels) the model is the constant basis image
    np.testing.assert_allclose(p.model(z1 - 1, z2 - 1), m[0], atol=1e-12)
    np.testing.assert_allclose(p.model(z1 - 1 + s1, z2 - 1), m[0] + m[1] + m[2], atol=1e-12)
    np.testing.assert_allclose(p.model(z1 - 1, z2 - 1 + s2), m[0] + m[3] + m[5], atol=1e-12)
    np.testing.assert_allclose(p.model(z1 - 1 + s1, z2 - 1 + s2), m.sum(axis=0), atol=1e-12)
    # the kernel at an integer position reproduces the normalised model there
    st = p.kernel(round(z1 - 1), round(z2 - 1), 63)
    ref = p.model(round(z1 - 1), round(z2 - 1))
    np.testing.assert_allclose(st, ref / ref.sum(), atol=1e-12)
    # FWHM of the PSFEx model; PSFEx's own PSF_FWHM (from SExtractor sizes) is larger
    assert 0.6 * t["psf_fwhm"][0] < p.fwhm(50, 50) < 1.1 * t["psf_fwhm"][0]


def test_read_plain_image(decam):
    exp = read_plain_image(decam, zero_point=30.0)
    assert exp.wcs is not None and exp.photo_calib.zero_point == pytest.approx(30.0)
    assert math.isnan(float(exp.variance[0, 0])) and exp.info.exp_time > 0


#: LSST afw mask layout (differs from the archive's default)
LSST_PLANES = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5, "SUSPECT": 7, "NO_DATA": 8}


def _write_mef(path, primary_cards: dict, order=("VARIANCE", "IMAGE", "MASK"), mp_cards=True, shape=(40, 50)):
    """An IMAGE/MASK/VARIANCE file written with astropy alone, HDUs in ``order``."""
    from astropy.wcs import WCS

    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 5.0, shape).astype(np.float32)
    image[3, 4] = np.nan
    variance = np.full(shape, 25.0, np.float32)
    variance[5, 6] = 0.0
    mask = np.zeros(shape, np.int32)
    mask[:, 7] = 1 << LSST_PLANES["BAD"]
    mask[10, 10] = 1 << LSST_PLANES["SAT"] | 1 << LSST_PLANES["CR"]
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [25.0, 20.0]
    w.wcs.cdelt = [-1e-4, 1e-4]
    planes = {"IMAGE": image, "MASK": mask, "VARIANCE": variance}
    hdus = [fits.PrimaryHDU()]
    for k, v in primary_cards.items():
        hdus[0].header[k] = v
    for name in order:
        h = fits.ImageHDU(planes[name], header=w.to_header(), name=name.lower() if name == "VARIANCE" else name)
        if name == "MASK" and mp_cards:
            for plane, bit in LSST_PLANES.items():
                h.header[f"HIERARCH MP_{plane}"] = bit
        hdus.append(h)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return image, mask, variance, w


def test_read_calibrated_mef(tmp_path):
    """Another pipeline's calibrated exposure: planes by EXTNAME in any order, its own mask
    layout kept, time in TAI from DATE-OBS + TIMESYS, zero point from FLUXMAG0, visit from
    the time when there is no VISIT card."""
    from astropy.time import Time

    from archive.image.foreign import is_calibrated_mef, read_calibrated_mef

    path = tmp_path / "calexp.fits"
    cards = {"FILTER": "i", "EXPTIME": 60.0, "DATE-OBS": "2024-04-04T03:36:00", "TIMESYS": "UTC",
             "FLUXMAG0": 10 ** (0.4 * 27.5), "DETECTOR": 12, "GAIN": 1.7, "SATURATE": 60000.0}
    image, mask, variance, w = _write_mef(path, cards)
    assert is_calibrated_mef(path) and not is_calibrated_mef(tmp_path / "missing.fits")
    exp = read_calibrated_mef(path)
    np.testing.assert_array_equal(exp.image, image)
    np.testing.assert_array_equal(exp.variance, variance)
    assert exp.mask_planes["SAT"] == 1 and exp.mask_planes["CR"] == 3 and exp.mask_planes["NO_DATA"] == 8
    assert exp.mask_of("BAD")[:, 7].all() and exp.mask_of("CR")[10, 10] and exp.mask_of("SAT")[10, 10]
    # non-finite image and zero variance: NO_DATA (in the file's own layout)
    assert exp.mask_of("NO_DATA")[3, 4] and exp.mask_of("NO_DATA")[5, 6] and exp.mask_of("NO_DATA").sum() == 2
    mjd = Time("2024-04-04T03:36:00", scale="utc").mjd + (37.0 + 30.0) / 86400.0
    i = exp.info
    assert i.mjd == pytest.approx(mjd, abs=1e-9) and i.band == "i" and i.exp_time == 60.0
    assert i.visit == round(mjd * 86400) and i.detector == 12 and i.extras["visit_from"] == "MJD"
    assert i.gain == 1.7 and i.saturation == 60000.0
    assert exp.photo_calib.zero_point == pytest.approx(27.5, abs=1e-12)
    np.testing.assert_allclose(exp.wcs.all_pix2world([[3.0, 4.0]], 0), w.all_pix2world([[3.0, 4.0]], 0))


def test_read_calibrated_mef_refuses_what_it_cannot_read(tmp_path):
    from archive.errors import ValidationError
    from archive.image.foreign import is_calibrated_mef, read_calibrated_mef

    p = tmp_path / "a.fits"
    _write_mef(p, {"FILTER": "r"}, order=("IMAGE", "MASK"))
    assert not is_calibrated_mef(p)
    with pytest.raises(ValidationError, match=r"a\.fits: no VARIANCE HDU"):
        read_calibrated_mef(p)
    _write_mef(p, {"FILTER": "r"}, mp_cards=False)
    with pytest.raises(ValidationError, match=r"a\.fits: HDU MASK has bits set but no MP_"):
        read_calibrated_mef(p)
    _write_mef(p, {"FILTER": "r", "MAGZERO": 28.0, "PHOTZP": 28.2})
    with pytest.raises(ValidationError, match=r"a\.fits: zero-point cards disagree.*PHOTZP.*MAGZERO"):
        read_calibrated_mef(p)
    _write_mef(p, {"FILTER": "r", "MJD-OBS": 60400.0})
    with pytest.raises(ValidationError, match=r"a\.fits: .*no EXPTIME"):
        read_calibrated_mef(p)
