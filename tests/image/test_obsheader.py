"""Header conventions of other pipelines, read in one place: time scale, exposure identity,
zero point."""

import math

import pytest
from astropy.io import fits
from astropy.time import Time

from archive.errors import ValidationError
from archive.image.obsheader import exposure_identity, header_zero_point, mid_exposure_mjd_tai


def _h(**cards) -> fits.Header:
    h = fits.Header()
    for k, v in cards.items():
        key = k.replace("_", "-")
        h[key if len(key) <= 8 else f"HIERARCH {key}"] = v
    return h


def test_mid_exposure_cards_and_scales():
    start = 60400.25
    # mid-exposure cards are used as they are (in their scale)
    assert mid_exposure_mjd_tai(_h(MJD_AVG=start, TIMESYS="TAI", EXPTIME=30.0)) == pytest.approx(start, abs=1e-12)
    assert mid_exposure_mjd_tai(_h(MJD_AVG=start)) == pytest.approx(start + 37 / 86400, abs=1e-9)
    # a start + EXPTIME / 2; MJD-END when there is no EXPTIME
    assert mid_exposure_mjd_tai(_h(MJD_OBS=start, TIMESYS="TAI", MJD_END=start + 60 / 86400)) == \
        pytest.approx(start + 30 / 86400, abs=1e-9)
    # TDB / TT differ from TAI by 32.184 s (+ < 2 ms periodic terms for TDB)
    tt = mid_exposure_mjd_tai(_h(MJD_OBS=start, TIMESYS="TT", EXPTIME=0.0))
    assert tt == pytest.approx(start - 32.184 / 86400, abs=1e-9)
    assert mid_exposure_mjd_tai(_h(MJD_OBS=start, TIMESYS="TDB", EXPTIME=0.0)) == pytest.approx(tt, abs=2e-3 / 86400)
    assert math.isnan(mid_exposure_mjd_tai(_h(EXPTIME=30.0)))
    # a date-only DATE-OBS without a clock card is midnight
    assert mid_exposure_mjd_tai(_h(DATE_OBS="2024-04-04", EXPTIME=0.0)) == \
        pytest.approx(Time("2024-04-04", scale="utc").mjd + 37 / 86400, abs=1e-9)


def test_time_errors_name_the_card():
    with pytest.raises(ValidationError, match=r"f\.fits: TIMESYS = 'UT1'"):
        mid_exposure_mjd_tai(_h(MJD_OBS=60400.0, TIMESYS="UT1", EXPTIME=1.0), "f.fits")
    with pytest.raises(ValidationError, match=r"f\.fits: .*no EXPTIME .*add EXPTIME"):
        mid_exposure_mjd_tai(_h(MJD_OBS=60400.0), "f.fits")
    with pytest.raises(ValidationError, match=r"f\.fits: card EXPTIME = -5.0"):
        mid_exposure_mjd_tai(_h(MJD_OBS=60400.0, EXPTIME=-5.0), "f.fits")


def test_exposure_identity_fallbacks():
    assert exposure_identity(_h(VISIT=9, EXPNUM=3, DETECTOR=4)) == (9, 4, "VISIT")
    assert exposure_identity(_h(EXPNUM=3, CCDNUM=28, DETECTOR="S3-111")) == (3, 28, "EXPNUM")
    # a non-integer OBSID is no id; the time is
    ident = exposure_identity(_h(OBSID="ct4m20240404t033600", MJD_OBS=60400.0, EXPTIME=30.0))
    assert (ident.visit, ident.visit_from) == (round((60400.0 + 52 / 86400) * 86400), "MJD")
    # two detectors of one exposure share the visit, two exposures do not
    a = exposure_identity(_h(MJD_OBS=60400.0, EXPTIME=30.0, DETECTOR=1))
    b = exposure_identity(_h(MJD_OBS=60400.0, EXPTIME=30.0, DETECTOR=2))
    c = exposure_identity(_h(MJD_OBS=60400.0 + 40 / 86400, EXPTIME=30.0, DETECTOR=1))
    assert a.visit == b.visit != c.visit and a.detector != b.detector
    assert exposure_identity(_h(EXPTIME=30.0)) == (None, 0, "")


def test_zero_point_conventions():
    zp = 27.9
    h = _h(EXPTIME=10.0)
    assert header_zero_point(h).photo_calib is None
    for cards in ({"MAGZERO": zp}, {"PHOTZP": zp}, {"MAGZP": zp}, {"FLUXMAG0": 10 ** (0.4 * zp)}):
        got = header_zero_point(_h(EXPTIME=10.0, **cards))
        assert got.photo_calib.zero_point == pytest.approx(zp, abs=1e-12), cards
        # nJy per count: 1 count of a ZP-27.9 image is 10**(-0.4 (27.9 - 31.4)) nJy
        assert got.photo_calib.njy_per_count == pytest.approx(10 ** 1.4, rel=1e-12)
    # rate zero point on a count image: + 2.5 log10(EXPTIME); on a rate image: as is
    h = _h(EXPTIME=10.0)
    h["MAGZERO"] = (zp, "AB mag for 1 count/s")
    assert header_zero_point(h).photo_calib.zero_point == pytest.approx(zp + 2.5, abs=1e-12)
    h["BUNIT"] = "electron/s"
    assert header_zero_point(h).photo_calib.zero_point == pytest.approx(zp, abs=1e-12)
    # errors: FLUXMAG0ERR propagates; agreeing cards are fine; Vega is not used
    got = header_zero_point(_h(FLUXMAG0=1e11, FLUXMAG0ERR=1e9, MAGZERO=27.5))
    assert got.card == "FLUXMAG0" and got.photo_calib.zero_point_err == pytest.approx(2.5 / math.log(10) * 0.01)
    vega = header_zero_point(_h(PHOTZP=zp, PHOTSYS="VEGA"))
    assert vega.photo_calib is None and "VEGA" in vega.note
    with pytest.raises(ValidationError, match="f.fits: FLUXMAG0 = -1"):
        header_zero_point(_h(FLUXMAG0=-1.0), "f.fits")
    with pytest.raises(ValidationError, match="f.fits: MAGZERO = 0.0 is not a plausible"):
        header_zero_point(_h(MAGZERO=0.0), "f.fits")
