import numpy as np
import pytest
from astropy.io import fits

from archive.errors import NotFoundError, ValidationError
from archive.image.fitsutil import wcs_to_header
from archive.image.raw import RawFrame, format_section, parse_section, read_raw, write_raw

from .test_exposure import make_wcs


def test_sections():
    assert parse_section("[1:100,1:50]") == (slice(0, 50), slice(0, 100))
    assert format_section((slice(0, 50), slice(0, 100))) == "[1:100,1:50]"
    with pytest.raises(ValidationError, match="malformed"):
        parse_section("1:100,1:50")
    with pytest.raises(ValidationError, match="reversed"):
        parse_section("[10:5,1:50]")
    with pytest.raises(ValidationError, match="exceeds"):
        parse_section("[1:100,1:50]", shape=(40, 100))


def test_write_read_raw(tmp_path):
    ny, nx, nover = 60, 80, 16
    rng = np.random.default_rng(0)
    data = rng.integers(0, 65535, (ny, nx + nover), dtype=np.uint16)
    h = fits.Header()
    h["IMAGETYP"] = "OBJECT"
    h["VISIT"] = 7
    h["DETECTOR"] = 2
    h["FILTER"] = "g"
    h["MJD-OBS"] = 60000.5
    h["EXPTIME"] = 30.0
    h["GAIN"] = 1.5
    w = make_wcs(sip=False, shape=(ny, nx))
    h.extend(wcs_to_header(w).cards)
    frame = RawFrame(data, h, (slice(0, ny), slice(0, nx)), (slice(0, ny), slice(nx, nx + nover)))
    path = write_raw(tmp_path / "raw.fits", frame)
    with fits.open(path) as hdul:
        assert len(hdul) == 1 and hdul[0].header["DATASEC"] == "[1:80,1:60]"
        assert hdul[0].header["BIASSEC"] == "[81:96,1:60]"
    raw = read_raw(path)
    assert raw.data.dtype == np.uint16
    np.testing.assert_array_equal(raw.data, data)
    assert raw.image.shape == (ny, nx) and raw.overscan.shape == (ny, nover)
    assert raw.imagetyp == "OBJECT"
    info = raw.info
    assert info.visit == 7 and info.detector == 2 and info.band == "g" and info.gain == 1.5
    assert info.mjd == pytest.approx(60000.5 + 15 / 86400)
    np.testing.assert_allclose(raw.wcs.all_pix2world([[3.0, 4.0]], 0), w.all_pix2world([[3.0, 4.0]], 0))


def test_prescan_shifts_wcs(tmp_path):
    # data section starting at x=10 (prescan): raw.wcs refers to the trimmed array
    w = make_wcs(sip=False)
    h = fits.Header()
    h.extend(wcs_to_header(w).cards)
    data = np.zeros((20, 50), dtype=np.uint16)
    frame = RawFrame(data, h, (slice(0, 20), slice(10, 40)), (slice(0, 20), slice(40, 50)))
    raw = read_raw(write_raw(tmp_path / "r.fits", frame))
    np.testing.assert_allclose(raw.wcs.all_pix2world([[0.0, 0.0]], 0), w.all_pix2world([[10.0, 0.0]], 0))


def test_raw_errors(tmp_path):
    with pytest.raises(NotFoundError):
        read_raw(tmp_path / "missing.fits")
    fits.PrimaryHDU(np.zeros((4, 4), dtype=np.uint16)).writeto(tmp_path / "nosec.fits")
    with pytest.raises(ValidationError, match="DATASEC"):
        read_raw(tmp_path / "nosec.fits")
