import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip

from archive.errors import NotFoundError, ValidationError
from archive.image import Exposure, ExposureInfo, GaussianPSF, MoffatPSF, PhotoCalib, PixelPSF
from archive.image.fitsutil import wcs_to_header


def make_wcs(sip=True, shape=(300, 400)):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.123456789012345, 2.2345678901234567]
    w.wcs.crpix = [201.123456789, 150.987654321]
    th = math.radians(0.37)
    s = 0.2 / 3600
    w.wcs.cd = np.array([[-s * math.cos(th), s * math.sin(th)], [s * math.sin(th), s * math.cos(th)]])
    if sip:
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0] = 1.234567890123e-6
        a[0, 2] = -3.3e-7 / 3
        b[1, 1] = 2.2e-6 / 7
        b[3, 0] = 1e-10 / 3
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    w.pixel_shape = (shape[1], shape[0])
    return w


def make_exposure(seed=0, psf=None, shape=(300, 400)):
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, shape).astype(np.float32)
    image[5, 7] = np.nan
    image[6, 7] = np.float32(np.inf)
    mask = rng.integers(0, 1 << 11, shape, dtype=np.int32)
    var = rng.uniform(50, 150, shape).astype(np.float32)
    info = ExposureInfo(visit=1234, detector=3, band="r", mjd=60123.123456789012, exp_time=30.0,
                        airmass=1.2345678901234, gain=1.7, read_noise=5.1 / 3, saturation=60000.0,
                        extras={"seeing": 0.8, "note": "x" * 150, "nested": {"a": [1, 2.5, None]}})
    planes = None
    exp = Exposure(image, mask, var, wcs=make_wcs(shape=shape),
                   psf=psf if psf is not None else MoffatPSF(3.1, 2.9, variation=[0.1, -0.2], bbox=(0, 0, 399, 299)),
                   photo_calib=PhotoCalib(0.123456789012345678, 1e-3 / 3), info=info, mask_planes=planes)
    exp.add_mask_plane("GHOST")
    return exp


@pytest.mark.parametrize("psf", [None, GaussianPSF(sigma=1.7),
                                 PixelPSF(np.random.default_rng(5).random((3, 11, 11)), None, oversample=2,
                                          degree=1, bbox=(0, 0, 399, 299))])
def test_round_trip_bit_exact(tmp_path, psf):
    exp = make_exposure(psf=psf)
    path = exp.writeto(tmp_path / "calexp.fits")
    back = Exposure.read(path)
    for name in ("image", "mask", "variance"):
        a, b = getattr(exp, name), getattr(back, name)
        assert a.dtype == b.dtype
        assert a.tobytes() == b.tobytes(), name  # bit-identical, NaN/inf included
    assert back.info == exp.info == Exposure.read_info(path)
    assert back.photo_calib == exp.photo_calib
    assert back.psf == exp.psf and type(back.psf) is type(exp.psf)
    assert back.mask_planes == exp.mask_planes and back.mask_planes["GHOST"] == 11
    w0, w1 = exp.wcs, back.wcs
    np.testing.assert_array_equal(w1.wcs.crval, w0.wcs.crval)
    np.testing.assert_array_equal(w1.wcs.crpix, w0.wcs.crpix)
    np.testing.assert_array_equal(w1.wcs.get_pc() * w1.wcs.get_cdelt()[:, None],
                                  w0.wcs.get_pc() * w0.wcs.get_cdelt()[:, None])
    np.testing.assert_array_equal(w1.sip.a, w0.sip.a)
    np.testing.assert_array_equal(w1.sip.b, w0.sip.b)
    xy = np.array([[0, 0], [399, 299], [123.4, 56.7]])
    np.testing.assert_array_equal(w1.all_pix2world(xy, 0), w0.all_pix2world(xy, 0))
    # writing the read-back exposure gives the same bytes (checksums included)
    back.writeto(tmp_path / "again.fits")
    assert (tmp_path / "again.fits").read_bytes() == path.read_bytes()


def test_every_hdu_opens_with_plain_astropy(tmp_path):
    exp = make_exposure()
    path = exp.writeto(tmp_path / "e.fits")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checksum mismatch would warn
        with fits.open(path, checksum=True) as hdul:
            hdul.verify("exception")
            assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
    with fits.open(path, checksum=True) as hdul:
        assert all("CHECKSUM" in h.header and "DATASUM" in h.header for h in hdul)
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
        assert hdul[0].data is None
        assert hdul[0].header["VISIT"] == 1234 and hdul[0].header["BAND"] == "r"
        assert hdul[0].header["TIMESYS"] == "TAI"
        assert hdul[0].header["MAGZERO"] == pytest.approx(exp.photo_calib.zero_point)
        assert hdul["IMAGE"].header["BITPIX"] == -32 and hdul["IMAGE"].data.shape == (300, 400)
        assert hdul["VARIANCE"].header["BITPIX"] == -32
        mh = hdul["MASK"].header
        assert mh["BITPIX"] == 32
        assert mh["MP_BAD"] == 0 and mh["MP_SAT"] == 1 and mh["MP_CR"] == 2 and mh["MP_GHOST"] == 11
        assert mh["MP_DETECTED_NEGATIVE"] == 10
        np.testing.assert_array_equal(hdul["MASK"].data, exp.mask)
        for name in ("IMAGE", "MASK", "VARIANCE"):  # every image HDU carries the WCS
            w = WCS(hdul[name].header)
            assert w.has_celestial and "SIP" in w.wcs.ctype[0]
        assert hdul["PSF"].header["PSFTYPE"] == "moffat"
        assert hdul["PSF"].data["fwhm"][0] == 3.1


def test_subimage_view_keeps_wcs_and_psf():
    exp = make_exposure()
    sub = exp.subimage(50, 30, 250, 200)
    assert sub.shape == (170, 200) and sub.xy0 == (50, 30) and sub.bbox == (50, 30, 250, 200)
    assert np.shares_memory(sub.image, exp.image)
    sub.mask[0, 0] |= 4
    assert exp.mask[30, 50] & 4
    xy_local = np.array([[0.0, 0.0], [10.5, 20.25], [199.0, 169.0]])
    sky_sub = sub.wcs.all_pix2world(xy_local, 0)
    sky_par = exp.wcs.all_pix2world(xy_local + [50, 30], 0)
    np.testing.assert_allclose(sky_sub, sky_par, rtol=0, atol=1e-11)
    np.testing.assert_allclose(sub.psf.image(10.3, 20.6, 21), exp.psf.image(60.3, 50.6, 21), rtol=1e-12)
    # nested sub-image
    sub2 = sub.subimage(10, 10, 50, 60)
    assert sub2.xy0 == (60, 40)
    np.testing.assert_allclose(sub2.wcs.all_pix2world([[1.0, 2.0]], 0), exp.wcs.all_pix2world([[61.0, 42.0]], 0),
                               atol=1e-11)
    with pytest.raises(ValidationError, match="outside"):
        exp.subimage(0, 0, 401, 10)


def test_subimage_round_trip(tmp_path):
    sub = make_exposure().subimage(100, 100, 164, 132)
    back = Exposure.read(sub.writeto(tmp_path / "s.fits"))
    assert back.xy0 == (100, 100)
    assert back.image.tobytes() == sub.image.tobytes()
    np.testing.assert_array_equal(back.psf.image(3.3, 4.4, 15), sub.psf.image(3.3, 4.4, 15))
    np.testing.assert_array_equal(back.wcs.all_pix2world([[3.0, 4.0]], 0), sub.wcs.all_pix2world([[3.0, 4.0]], 0))


def test_sky_geometry():
    exp = make_exposure()
    assert exp.pixel_scale() == pytest.approx(0.2, rel=1e-3)  # 0.2"/px CD matrix (+ small SIP terms)
    ra, dec = exp.center_sky()
    assert exp.contains(ra, dec)
    corners = exp.corners_sky()
    assert corners.shape == (4, 2)
    inside = corners.mean(axis=0)
    assert exp.contains(inside[0], inside[1])
    assert not exp.contains(ra + 1.0, dec).any()
    np.testing.assert_array_equal(exp.contains([ra, ra + 1.0], [dec, dec]), [True, False])
    sub = exp.subimage(0, 0, 10, 10)
    np.testing.assert_allclose(sub.corners_sky()[0], corners[0], atol=1e-12)
    with pytest.raises(ValidationError, match="no WCS"):
        Exposure(np.zeros((3, 3))).center_sky()


def test_pickle_keeps_everything_exact():
    import pickle

    exp = make_exposure()
    back = pickle.loads(pickle.dumps(exp))
    assert back.image.tobytes() == exp.image.tobytes() and back.psf == exp.psf and back.info == exp.info
    xy = np.array([[0.0, 0.0], [123.4, 56.7]])
    np.testing.assert_array_equal(back.wcs.all_pix2world(xy, 0), exp.wcs.all_pix2world(xy, 0))
    assert back.wcs.pixel_shape == exp.wcs.pixel_shape


def test_minimal_exposure_defaults_and_errors(tmp_path):
    exp = Exposure(np.zeros((10, 12)))
    assert exp.image.dtype == np.float32 and exp.mask.dtype == np.int32
    assert np.isnan(exp.variance).all()
    back = Exposure.read(exp.writeto(tmp_path / "m.fits"))
    assert back.wcs is None and back.psf is None and back.photo_calib is None
    assert back.info == ExposureInfo()
    assert math.isinf(back.info.saturation)
    assert exp.mask_of("SAT").sum() == 0
    with pytest.raises(ValidationError, match="mask shape"):
        Exposure(np.zeros((4, 4)), mask=np.zeros((3, 4), dtype=np.int32))
    with pytest.raises(ValidationError, match="integer"):
        Exposure(np.zeros((4, 4)), mask=np.zeros((4, 4)))
    with pytest.raises(NotFoundError):
        Exposure.read(tmp_path / "nope.fits")
    (tmp_path / "bad.fits").write_bytes(b"not fits")
    with pytest.raises(ValidationError):
        Exposure.read(tmp_path / "bad.fits")


def test_wcs_header_is_exact_for_hard_values():
    w = make_wcs()
    h = fits.Header.fromstring(wcs_to_header(w).tostring())
    assert h["CRVAL1"] == w.wcs.crval[0] and h["CRVAL2"] == w.wcs.crval[1]
    assert h["A_2_0"] == w.sip.a[2, 0] and h["B_3_0"] == w.sip.b[3, 0]
