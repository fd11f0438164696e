"""Observation metadata from the FITS cards other pipelines write, read in one place.

Every reader of exposures (raw camera frames in :mod:`archive.image.raw`,
other pipelines' calibrated images in :mod:`archive.image.foreign`) takes
time, exposure identity and photometric zero point from here, so the
conventions below hold for all of them.

Time -> MJD (TAI) at mid-exposure (:func:`mid_exposure_mjd_tai`)
    The time scale is ``TIMESYS``; without it **UTC**, as the FITS standard
    (4.0, sec. 9.2.1) prescribes.  Accepted: UTC (also ``UT``, read as UTC),
    TAI (also ``IAT``), TT (also ``TDT``, ``ET``), TDB, TCG, TCB and GPS (TAI -
    19 s); anything else (``LOCAL``, ``UT1``, typos) is refused with the file
    and card named.  The conversion to TAI is astropy.time's (leap seconds
    included: TAI - UTC = 37 s since 2017).

    Cards, first found wins:

    - a mid-exposure time: ``MJD-AVG``, then ``DATE-AVG`` (ISO 8601);
    - else an exposure **start** plus half the exposure time: ``MJD-BEG``,
      ``MJD-OBS``, ``DATE-BEG``, ``DATE-OBS`` (a date without a time part
      takes ``TIME-OBS`` or ``UTSTART`` when present).  ``MJD-OBS`` and
      ``DATE-OBS`` are the start of the exposure, as the FITS standard
      recommends and as DECam, ZTF, HSC and LSST write them.  The duration is
      ``EXPTIME`` (s), else ``MJD-END`` - start; a start without either is
      refused (the mid-exposure time would be unknown).

Exposure identity (:func:`exposure_identity`)
    ``visit`` is the first integer of ``VISIT``, ``EXPNUM`` (NOIRLab, DECam),
    ``EXPID`` or ``OBSID`` (when it is an integer).  Without any of them the
    visit is **derived from the time**: the number of TAI seconds from MJD 0 to
    mid-exposure, rounded (e.g. 5,218,568,640 for MJD 60400.1).  Two
    exposures of one camera cannot share a mid-exposure second, and the
    detectors of one exposure share it, so ``visit * 1000 + detector`` stays
    unique; the pipeline still refuses two files of one run that end with the
    same id.  A frame with neither an id card nor a time gets no visit
    (``None``); the pipeline refuses it with a message naming ``VISIT``.
    ``detector`` is ``DETECTOR``, else ``CCDNUM``, else 0.

Photometric zero point (:func:`header_zero_point`)
    Cards, first found wins (two that disagree by more than 0.005 mag are
    refused): ``FLUXMAG0`` (counts of a magnitude-0 source, the LSST/HSC
    convention; ``ZP = 2.5 log10 FLUXMAG0``, error from ``FLUXMAG0ERR``), then
    ``PHOTZP`` (ESO; error ``PHOTZPER``), ``MAGZERO`` (error ``MAGZERR``) and
    ``MAGZP`` (ZTF/PTF; error ``MAGZPUNC``), each the AB magnitude of a source
    giving **one unit of the data as stored**: ``m_AB = ZP - 2.5 log10(sum of
    pixel values)``.  That is counts for an image in counts and counts/s for an
    image whose ``BUNIT`` is a rate (``.../s``); ``EXPTIME`` is then not
    applied.  The one exception: a zero point whose card comment says it is
    for a rate (``1 ADU/s``, ``counts per second``, ...) on an image whose
    ``BUNIT`` is not a rate is converted to counts with
    ``ZP + 2.5 log10(EXPTIME)``.  ``PHOTSYS`` other than AB (e.g. VEGA) means
    no usable zero point (these are AB calibrations only).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import astropy.units as u
from astropy.io import fits
from astropy.time import Time, TimeDelta

from archive.errors import ValidationError
from archive.image.calib import PhotoCalib

log = logging.getLogger(__name__)

#: TIMESYS values -> astropy time scale (GPS is handled as TAI - 19 s).
TIME_SCALES = {"UTC": "utc", "UT": "utc", "TAI": "tai", "IAT": "tai", "TT": "tt", "TDT": "tt", "ET": "tt",
               "TDB": "tdb", "TCG": "tcg", "TCB": "tcb", "GPS": "gps"}
#: Mid-exposure time cards, in order of preference.
MID_CARDS = ("MJD-AVG", "DATE-AVG")
#: Exposure-start time cards, in order of preference.
START_CARDS = ("MJD-BEG", "MJD-OBS", "DATE-BEG", "DATE-OBS")
#: Integer exposure-id cards, in order of preference.
VISIT_CARDS = ("VISIT", "EXPNUM", "EXPID", "OBSID")
#: Detector-number cards, in order of preference.
DETECTOR_CARDS = ("DETECTOR", "CCDNUM")
#: Zero-point cards, in order of preference, with their error cards.
ZERO_POINT_CARDS = (("FLUXMAG0", "FLUXMAG0ERR"), ("PHOTZP", "PHOTZPER"), ("MAGZERO", "MAGZERR"),
                    ("MAGZP", "MAGZPUNC"))
GPS_TAI_SECONDS = 19.0

_RATE = re.compile(r"(/\s*s(ec(ond)?)?\b|\bs\s*\*\*\s*-1\b|\bs\^?-1\b|per\s+s(ec(ond)?)?\b)", re.IGNORECASE)


def _name(where) -> str:
    return str(where) if where else "header"


def time_scale(header: fits.Header, where=None) -> str:
    """The astropy scale named by ``TIMESYS`` (``"utc"`` when absent), or ``"gps"``."""
    raw = header.get("TIMESYS")
    if raw is None or str(raw).strip() == "":
        return "utc"
    key = str(raw).strip().upper()
    if key not in TIME_SCALES:
        raise ValidationError(f"{_name(where)}: TIMESYS = {raw!r} is not a time scale the archive converts "
                              f"(expected one of {', '.join(sorted(TIME_SCALES))})")
    return TIME_SCALES[key]


def _to_time(header: fits.Header, key: str, scale: str, where) -> Time:
    """The time of card ``key`` (MJD-* number or DATE-* ISO string) in ``scale``."""
    value = header[key]
    ascale = "tai" if scale == "gps" else scale
    try:
        if key.startswith("MJD"):
            t = Time(float(value), format="mjd", scale=ascale)
        else:
            text = str(value).strip().rstrip("Zz")
            if "T" not in text and key == "DATE-OBS":
                clock = next((str(header[c]).strip() for c in ("TIME-OBS", "UTSTART") if c in header), None)
                if clock:
                    text = f"{text}T{clock}"
            t = Time(text, format="isot" if "T" in text else "iso", scale=ascale)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{_name(where)}: card {key} = {value!r} is not a valid time ({exc})") from None
    if scale == "gps":  # GPS runs 19 s behind TAI
        t = t + TimeDelta(GPS_TAI_SECONDS * u.s)
    return t.tai


def _exposure_seconds(header: fits.Header, start: Time, scale: str, where) -> float:
    for key in ("EXPTIME", "EXPOSURE"):
        if key in header and header[key] is not None and str(header[key]).strip() != "":
            try:
                value = float(header[key])
            except (TypeError, ValueError):
                raise ValidationError(f"{_name(where)}: card {key} = {header[key]!r} is not a number "
                                      "of seconds") from None
            if not (math.isfinite(value) and value >= 0):
                raise ValidationError(f"{_name(where)}: card {key} = {value!r}; expected seconds >= 0")
            return value
    if "MJD-END" in header:
        return float((_to_time(header, "MJD-END", scale, where) - start).to_value(u.s))
    raise ValidationError(f"{_name(where)}: the header gives the exposure start but no EXPTIME (or MJD-END); "
                          "the mid-exposure time is unknown; add EXPTIME = <seconds>")


def mid_exposure_mjd_tai(header: fits.Header, where=None) -> float:
    """MJD (TAI) at mid-exposure from the header's time cards (see the module doc).

    Returns NaN when the header has no time card at all.  Raises
    :class:`ValidationError`, naming ``where`` (the file) and the card, for an
    unknown ``TIMESYS``, an unreadable time, or a start time without a duration.
    """
    scale = None
    for key in MID_CARDS:
        if key in header:
            scale = time_scale(header, where)
            return float(_to_time(header, key, scale, where).mjd)
    for key in START_CARDS:
        if key in header:
            scale = time_scale(header, where)
            start = _to_time(header, key, scale, where)
            seconds = _exposure_seconds(header, start, scale, where)
            return float((start + TimeDelta(0.5 * seconds * u.s)).mjd)
    return math.nan


def _int_card(header: fits.Header, key: str) -> int | None:
    value = header.get(key)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    text = str(value).strip()
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    return int(text) if text.lstrip("-").isdigit() else None


class ExposureIdentity(NamedTuple):
    """``visit`` (None when the header gives neither an id nor a time), ``detector``, and the
    card the visit came from (``"VISIT"``, ``"EXPNUM"``, ... or ``"MJD"`` when derived from
    the mid-exposure time)."""

    visit: int | None
    detector: int
    visit_from: str


def visit_from_time(mjd_tai: float) -> int:
    """The visit derived from a mid-exposure time: TAI seconds from MJD 0, rounded."""
    return int(round(float(mjd_tai) * 86400.0))


def exposure_identity(header: fits.Header, mjd_tai: float | None = None, where=None) -> ExposureIdentity:
    """Visit and detector numbers of a frame (see the module doc for the cards and fallbacks).

    ``mjd_tai``: the mid-exposure MJD (TAI) if already known (else read from the header).
    """
    det = next((v for v in (_int_card(header, k) for k in DETECTOR_CARDS) if v is not None), 0)
    for key in VISIT_CARDS:
        v = _int_card(header, key)
        if v is not None:
            return ExposureIdentity(v, det, key)
    mjd = mid_exposure_mjd_tai(header, where) if mjd_tai is None else mjd_tai
    if mjd is not None and math.isfinite(mjd):
        return ExposureIdentity(visit_from_time(mjd), det, "MJD")
    return ExposureIdentity(None, det, "")


def _is_rate(text) -> bool:
    return bool(text) and bool(_RATE.search(str(text)))


@dataclass(frozen=True)
class HeaderZeroPoint:
    """A zero point read from the header.

    photo_calib: nJy per unit of the data as stored (None when there is no usable card);
    card: the card it came from; note: how it was read (or why there is none), for logs and
    the exposure row."""

    photo_calib: PhotoCalib | None
    card: str
    note: str


def header_zero_point(header: fits.Header, where=None) -> HeaderZeroPoint:
    """The AB photometric calibration a header states (see the module doc for the conventions)."""
    names = "/".join(k for k, _ in ZERO_POINT_CARDS)
    found: list[tuple[str, float, float, str]] = []
    for key, err_key in ZERO_POINT_CARDS:
        if key not in header or header[key] is None or str(header[key]).strip() == "":
            continue
        try:
            value = float(header[key])
            err = float(header.get(err_key, 0.0) or 0.0)
        except (TypeError, ValueError):
            raise ValidationError(f"{_name(where)}: card {key} = {header[key]!r} is not a number") from None
        if key == "FLUXMAG0":
            if not (math.isfinite(value) and value > 0):
                raise ValidationError(f"{_name(where)}: FLUXMAG0 = {value!r}; expected counts > 0")
            zp = 2.5 * math.log10(value)
            zp_err = 2.5 / math.log(10.0) * abs(err) / value if math.isfinite(err) else 0.0
            note = f"FLUXMAG0 = {value:.6g} counts for mag 0"
        else:
            if not (math.isfinite(value) and 0.0 < value < 50.0):
                raise ValidationError(f"{_name(where)}: {key} = {value!r} is not a plausible AB zero point "
                                      "(expected a magnitude between 0 and 50)")
            zp, zp_err = value, abs(err) if math.isfinite(err) else 0.0
            note = f"{key} = {value:.4f}"
            if _is_rate(header.comments[key]) and not _is_rate(header.get("BUNIT", "")):
                exptime = header.get("EXPTIME")
                try:
                    exptime = float(exptime)
                except (TypeError, ValueError):
                    exptime = math.nan
                if not (math.isfinite(exptime) and exptime > 0):
                    raise ValidationError(f"{_name(where)}: {key} is a zero point for a rate "
                                          f"({header.comments[key]!r}) but EXPTIME is missing or not > 0")
                zp += 2.5 * math.log10(exptime)
                note += f" for 1 count/s, + 2.5 log10(EXPTIME = {exptime:g} s)"
        found.append((key, zp, zp_err, note))
    if not found:
        return HeaderZeroPoint(None, "", f"no zero-point card ({names})")
    key, zp, zp_err, note = found[0]
    for other, zp2, _, note2 in found[1:]:
        if abs(zp2 - zp) > 0.005:
            raise ValidationError(f"{_name(where)}: zero-point cards disagree: {note} gives AB {zp:.4f}, "
                                  f"{note2} gives {zp2:.4f}; remove the wrong one")
    system = str(header.get("PHOTSYS", "AB")).strip().upper()
    if system and system != "AB":
        log.warning("%s: PHOTSYS = %s; its zero point %s is not used (AB only)", _name(where), system, key)
        return HeaderZeroPoint(None, key, f"{key} is on PHOTSYS = {system}, not AB")
    return HeaderZeroPoint(PhotoCalib.from_zero_point(zp, zp_err), key, f"{note} (AB mag of 1 count: {zp:.4f})")
