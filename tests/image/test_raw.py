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


def _raw_with_time(tmp_path, cards: dict, name: str = "t.fits"):
    h = fits.Header()
    h["IMAGETYP"] = "OBJECT"
    h["EXPTIME"] = 30.0
    for k, v in cards.items():
        h[k] = v
    data = np.zeros((10, 14), dtype=np.uint16)
    frame = RawFrame(data, h, (slice(0, 10), slice(0, 10)), (slice(0, 10), slice(10, 14)))
    return read_raw(write_raw(tmp_path / name, frame))


@pytest.mark.parametrize("timesys, tai_minus_scale", [
    (None, 37.0), ("UTC", 37.0), ("TAI", 0.0), ("TT", -32.184), ("GPS", 19.0)])
def test_raw_mjd_obs_is_read_in_its_timesys(tmp_path, timesys, tai_minus_scale):
    """MJD-OBS is the exposure start in TIMESYS (UTC when absent, as the FITS standard says);
    info.mjd is TAI at mid-exposure.  Before: MJD-OBS was taken as TAI whatever TIMESYS said,
    37 s early for UTC (2024: TAI - UTC = 37 s)."""
    cards = {"MJD-OBS": 60400.25}
    if timesys is not None:
        cards["TIMESYS"] = timesys
    raw = _raw_with_time(tmp_path, cards)
    assert raw.info.mjd == pytest.approx(60400.25 + (tai_minus_scale + 15.0) / 86400.0, abs=1e-9)


def test_raw_date_obs_and_leap_seconds(tmp_path):
    """DATE-OBS (ISO, start) when there is no MJD-OBS; TAI - UTC from astropy's leap-second
    table: 36 s in 2016, 37 s from 2017."""
    from astropy.time import Time

    for date, leap in (("2016-03-01T02:00:00", 36.0), ("2024-04-04T03:36:00.5", 37.0)):
        raw = _raw_with_time(tmp_path, {"DATE-OBS": date, "TIMESYS": "UTC"})
        assert raw.info.mjd == pytest.approx(Time(date, scale="utc").mjd + (leap + 15.0) / 86400.0, abs=1e-9)
    # a date without time takes TIME-OBS
    raw = _raw_with_time(tmp_path, {"DATE-OBS": "2024-04-04", "TIME-OBS": "03:36:00.5"})
    assert raw.info.mjd == pytest.approx(Time("2024-04-04T03:36:00.5", scale="utc").mjd + 52.0 / 86400.0, abs=1e-9)


def test_raw_and_foreign_readers_agree_on_time(tmp_path):
    """One conversion for both readers (archive.image.obsheader): the raw reader and the
    foreign reader give the same TAI mid-exposure for the same cards.  Before: 37 s apart."""
    from archive.image.foreign import read_plain_image

    for cards in ({"MJD-OBS": 60400.25}, {"MJD-OBS": 60400.25, "TIMESYS": "TAI"},
                  {"DATE-OBS": "2024-04-04T03:36:00", "TIMESYS": "utc"}, {"MJD-AVG": 60400.2502}):
        raw = _raw_with_time(tmp_path, cards)
        assert read_plain_image(raw.path).info.mjd == raw.info.mjd


def test_raw_bad_time_cards_name_file_and_card(tmp_path):
    with pytest.raises(ValidationError, match=r"t\.fits.*TIMESYS = 'LOCAL'"):
        _ = _raw_with_time(tmp_path, {"MJD-OBS": 60400.25, "TIMESYS": "LOCAL"}).info
    with pytest.raises(ValidationError, match=r"t\.fits.*DATE-OBS = 'yesterday'"):
        _ = _raw_with_time(tmp_path, {"DATE-OBS": "yesterday"}).info


def test_raw_visit_without_visit_card(tmp_path):
    """No VISIT card: EXPNUM, else the visit derived from the mid-exposure time (TAI seconds
    since MJD 0); the card used is in info.extras["visit_from"]."""
    raw = _raw_with_time(tmp_path, {"MJD-OBS": 60400.25, "EXPNUM": 123, "CCDNUM": 7})
    assert (raw.info.visit, raw.info.detector, raw.info.extras["visit_from"]) == (123, 7, "EXPNUM")
    raw = _raw_with_time(tmp_path, {"MJD-OBS": 60400.25})
    assert raw.info.visit == round((60400.25 + 52.0 / 86400.0) * 86400.0)
    assert raw.info.extras["visit_from"] == "MJD"
    raw = _raw_with_time(tmp_path, {})
    assert raw.info.visit == 0 and raw.info.extras["visit_from"] == ""
