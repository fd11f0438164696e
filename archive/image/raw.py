"""Raw camera frames: single-HDU FITS with an overscan region.

Format (written by :func:`write_raw`, read by :func:`read_raw`): one image HDU
(primary, or the first image extension) holding the full readout including
overscan, stored as unsigned 16-bit integers (BITPIX 16, BZERO 32768) or any
numeric type.  Header cards:

- ``DATASEC`` / ``BIASSEC``: FITS sections ``[x1:x2,y1:y2]`` (1-based,
  inclusive) of the imaging pixels and the serial overscan.
- ``IMAGETYP``: ``OBJECT``, ``BIAS``, ``DARK`` or ``FLAT``.
- ``VISIT``, ``DETECTOR``, ``BAND`` (also ``FILTER``), ``EXPTIME`` (s), ``DARKTIME`` (s),
  ``AIRMASS``, ``GAIN`` (e-/adu), ``RDNOISE`` (e-), ``SATURATE`` (adu).
- Time: ``MJD-AVG`` (mid-exposure) or ``MJD-OBS`` / ``DATE-OBS`` (start of
  exposure) in the scale of ``TIMESYS`` (UTC when absent, as the FITS standard
  says; the simulator writes TAI); :attr:`RawFrame.info` gives MJD (TAI) at
  mid-exposure through :mod:`archive.image.obsheader`, which also derives the
  visit from ``EXPNUM`` or the time when there is no ``VISIT`` card.
- Optionally a zero point (``MAGZERO``, ``PHOTZP``, ``FLUXMAG0``, ``MAGZP``) for
  the raw adu: :attr:`RawFrame.photo_calib`.
- A celestial WCS for **the full readout array** (frames of type OBJECT);
  :attr:`RawFrame.wcs` returns it shifted to the trimmed data section.
"""

from __future__ import annotations

import os
import pathlib
import re
import tempfile
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from archive.errors import NotFoundError, ValidationError
from archive.image.calib import PhotoCalib
from archive.image.exposure import ExposureInfo
from archive.image.fitsutil import get_float, shift_wcs, wcs_from_header
from archive.image.obsheader import exposure_identity, header_zero_point, mid_exposure_mjd_tai

_SECTION = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")

Section = tuple[slice, slice]


def parse_section(text: str, shape: tuple[int, int] | None = None, what: str = "section") -> Section:
    """``'[x1:x2,y1:y2]'`` (FITS, 1-based inclusive) -> numpy ``(slice_y, slice_x)``.

    Raises :class:`ValidationError` for malformed or reversed sections, or ones
    outside ``shape`` (``(ny, nx)``) when given.
    """
    m = _SECTION.match(str(text))
    if not m:
        raise ValidationError(f"{what}: malformed FITS section {text!r}, expected '[x1:x2,y1:y2]'")
    x1, x2, y1, y2 = (int(g) for g in m.groups())
    if x1 < 1 or y1 < 1 or x2 < x1 or y2 < y1:
        raise ValidationError(f"{what}: section {text!r} is empty or reversed")
    if shape is not None and (y2 > shape[0] or x2 > shape[1]):
        raise ValidationError(f"{what}: section {text!r} exceeds the array of shape {shape}")
    return (slice(y1 - 1, y2), slice(x1 - 1, x2))


def format_section(sec: Section) -> str:
    """numpy ``(slice_y, slice_x)`` -> ``'[x1:x2,y1:y2]'``."""
    sy, sx = sec
    return f"[{sx.start + 1}:{sx.stop},{sy.start + 1}:{sy.stop}]"


@dataclass
class RawFrame:
    """A raw readout: pixel data with overscan, its sections and header.

    ``data`` is the full array as stored (uint16 for simulator frames);
    ``datasec``/``biassec`` are ``(slice_y, slice_x)`` into it.
    """

    data: np.ndarray
    header: fits.Header
    datasec: Section
    biassec: Section
    path: pathlib.Path | None = None

    @property
    def image(self) -> np.ndarray:
        """The imaging section as float64 (adu, bias not subtracted)."""
        return self.data[self.datasec].astype(np.float64)

    @property
    def overscan(self) -> np.ndarray:
        """The overscan section as float64 (adu)."""
        return self.data[self.biassec].astype(np.float64)

    @property
    def imagetyp(self) -> str:
        return str(self.header.get("IMAGETYP", "OBJECT")).strip().upper()

    @property
    def exp_time(self) -> float:
        return get_float(self.header, "EXPTIME", 0.0)

    @property
    def dark_time(self) -> float:
        """Seconds of dark-current accumulation (DARKTIME, else EXPTIME)."""
        return get_float(self.header, "DARKTIME", self.exp_time)

    @property
    def info(self) -> ExposureInfo:
        """Metadata as an :class:`ExposureInfo`: ``mjd`` is MJD (TAI) at mid-exposure, from
        the time cards in their ``TIMESYS`` (:func:`~archive.image.obsheader.mid_exposure_mjd_tai`);
        ``visit``/``detector`` from :func:`~archive.image.obsheader.exposure_identity` (visit 0
        when the header has neither an id card nor a time) with the card the visit came from in
        ``extras["visit_from"]`` (``""`` when none)."""
        header = self.header
        info = ExposureInfo.from_header(header)
        info.mjd = mid_exposure_mjd_tai(header, self.path)
        ident = exposure_identity(header, info.mjd, self.path)
        info.visit = ident.visit if ident.visit is not None else 0
        info.detector = ident.detector
        info.extras = dict(info.extras, visit_from=ident.visit_from)
        if not info.band and "FILTER" in header:
            info.band = str(header["FILTER"]).strip()
        return info

    @property
    def photo_calib(self) -> PhotoCalib | None:
        """The calibration of one raw adu stated by the header's zero-point card, or None
        (:func:`~archive.image.obsheader.header_zero_point`)."""
        return header_zero_point(self.header, self.path).photo_calib

    @property
    def wcs(self) -> WCS | None:
        """Header WCS shifted to the trimmed data section (None without WCS cards)."""
        w = wcs_from_header(self.header)
        if w is None:
            return None
        sy, sx = self.datasec
        w = shift_wcs(w, sx.start, sy.start)
        w.pixel_shape = (sx.stop - sx.start, sy.stop - sy.start)
        return w


def read_raw(path: str | os.PathLike) -> RawFrame:
    """Read a raw single-HDU camera FITS file (see module docstring for the format)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise NotFoundError(f"raw file {path} does not exist")
    try:
        with fits.open(path, memmap=False) as hdul:
            hdu = next((h for h in hdul if h.is_image and h.data is not None and h.data.ndim == 2), None)
            if hdu is None:
                raise ValidationError(f"{path}: no 2-D image HDU")
            data = np.array(hdu.data)
            header = hdu.header.copy()
            if hdu is not hdul[0]:
                for card in hdul[0].header.cards:
                    if card.keyword not in header and card.keyword not in ("SIMPLE", "EXTEND", "COMMENT", "HISTORY", ""):
                        header.append(card)
    except OSError as exc:
        raise ValidationError(f"{path}: not a readable FITS file ({exc})") from exc
    for key in ("DATASEC", "BIASSEC"):
        if key not in header:
            raise ValidationError(f"{path}: header card {key} is missing")
    datasec = parse_section(header["DATASEC"], data.shape, f"{path} DATASEC")
    biassec = parse_section(header["BIASSEC"], data.shape, f"{path} BIASSEC")
    if data.dtype.byteorder not in ("=", "|"):
        data = data.astype(data.dtype.newbyteorder("="))
    return RawFrame(data=data, header=header, datasec=datasec, biassec=biassec, path=path)


def write_raw(path: str | os.PathLike, frame: RawFrame, overwrite: bool = True) -> pathlib.Path:
    """Write ``frame`` as a single primary HDU (DATASEC/BIASSEC cards set from the slices), atomically."""
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise ValidationError(f"{path} exists and overwrite=False")
    header = frame.header.copy()
    header["DATASEC"] = (format_section(frame.datasec), "imaging section")
    header["BIASSEC"] = (format_section(frame.biassec), "serial overscan section")
    path.parent.mkdir(parents=True, exist_ok=True)
    # uint16 data is stored by astropy as BITPIX 16 + BZERO 32768 and reads back as uint16.
    hdu = fits.PrimaryHDU(data=frame.data, header=header)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".fits", dir=path.parent)
    os.close(fd)
    try:
        hdu.writeto(tmp, overwrite=True, output_verify="exception")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
