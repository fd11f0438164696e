"""Readers for calibrated images made by other pipelines, into :class:`~archive.image.Exposure`.

- :func:`read_decam_cp`: NOIRLab DECam Community Pipeline "InstCal" products
  (``*_ooi_*`` image, ``*_oow_*`` inverse-variance weight, ``*_ood_*`` data
  quality), optionally with a PSFEx model (``*-psfex.fits``).
- :func:`read_plain_image`: any single image HDU with a celestial WCS.

Times are converted to MJD TAI at mid-exposure (DECam's MJD-OBS is UTC at the start).
"""

from __future__ import annotations

import math
import os
import pathlib
import warnings

import numpy as np
import astropy.units as u
from astropy.io import fits
from astropy.time import Time

from archive.errors import NotFoundError, ValidationError
from archive.image import mask as maskmod
from archive.image.calib import PhotoCalib
from archive.image.exposure import Exposure, ExposureInfo
from archive.image.fitsutil import wcs_from_header
from archive.image.psf import PixelPSF

#: CP data-quality bit values (older CP versions) -> our planes.
CP_DQ_BITS = {1: "BAD", 2: "SAT", 4: "INTRP", 16: "CR", 64: "SAT", 128: "SUSPECT", 256: "EDGE", 512: "EDGE"}
#: CP data-quality integer codes (CP >= V3.5, e.g. V4.8) -> our planes:
#: 1 bad, 2 no data, 3 saturated, 4 bleed trail, 5 cosmic ray, 6 low weight,
#: 7 multi-exposure transient, 8 long streak.
CP_DQ_CODES = {1: "BAD", 2: "NO_DATA", 3: "SAT", 4: "SAT", 5: "CR", 6: "SUSPECT", 7: "SUSPECT", 8: "STREAK"}


def _image_hdu(path: pathlib.Path, hdu: int | str | None):
    if not path.is_file():
        raise NotFoundError(f"image file {path} does not exist")
    try:
        hdul = fits.open(path, memmap=False)
    except OSError as exc:
        raise ValidationError(f"{path}: not a readable FITS file ({exc})") from exc
    with hdul:
        if hdu is None:
            found = next((h for h in hdul if h.is_image and h.data is not None and h.data.ndim == 2), None)
            if found is None:
                raise ValidationError(f"{path}: no 2-D image HDU")
        else:
            try:
                found = hdul[hdu]
            except (KeyError, IndexError) as exc:
                raise NotFoundError(f"{path}: no HDU {hdu!r}") from exc
            if found.data is None or found.data.ndim != 2:
                raise ValidationError(f"{path}: HDU {hdu!r} is not a 2-D image")
        header = found.header.copy()
        primary = hdul[0].header.copy()
        data = np.array(found.data)
    # inherit primary cards the extension lacks (FITS INHERIT convention)
    for card in primary.cards:
        if card.keyword and card.keyword not in header and card.keyword not in ("SIMPLE", "EXTEND", "COMMENT",
                                                                                "HISTORY", "NEXTEND"):
            header.append(card)
    return data, header


def _mid_mjd_tai(header: fits.Header) -> float:
    if "MJD-OBS" not in header:
        return math.nan
    scale = str(header.get("TIMESYS", "UTC")).strip().lower()
    if scale not in ("utc", "tai", "tt", "tdb"):
        scale = "utc"
    t = Time(float(header["MJD-OBS"]), format="mjd", scale=scale)
    exp = float(header.get("EXPTIME", 0.0) or 0.0)
    return float((t.tai + (exp / 2.0) * u.s).mjd)


def _mean_card(header: fits.Header, *keys: str, default: float = math.nan) -> float:
    vals = [float(header[k]) for k in keys if k in header]
    return float(np.mean(vals)) if vals else default


def read_plain_image(path: str | os.PathLike, hdu: int | str | None = None,
                     zero_point: float | None = None) -> Exposure:
    """A single image HDU (first 2-D one by default) with its WCS and header metadata.

    Variance is unknown (NaN); metadata from EXPTIME, MJD-OBS (+ EXPTIME/2,
    converted to TAI), FILTER/BAND, AIRMASS, GAIN, RDNOISE, SATURATE.
    ``zero_point`` (AB mag of one count), if given, sets the PhotoCalib.
    """
    path = pathlib.Path(path)
    data, header = _image_hdu(path, hdu)
    info = _info_from_header(header)
    return Exposure(data.astype(np.float32), wcs=wcs_from_header(header), info=info,
                    photo_calib=PhotoCalib.from_zero_point(zero_point) if zero_point is not None else None)


def _info_from_header(header: fits.Header) -> ExposureInfo:
    band = str(header.get("BAND", header.get("FILTER", ""))).strip().split(" ")[0]
    visit = header.get("EXPNUM", header.get("VISIT", 0))
    det = header.get("CCDNUM", header.get("DETECTOR", 0))
    return ExposureInfo(
        visit=int(visit) if str(visit).strip().lstrip("-").isdigit() else 0,
        detector=int(det) if str(det).strip().lstrip("-").isdigit() else 0,
        band=band, mjd=_mid_mjd_tai(header), exp_time=float(header.get("EXPTIME", math.nan) or math.nan),
        airmass=float(header.get("AIRMASS", math.nan) or math.nan),
        gain=_mean_card(header, "GAINA", "GAINB", default=float(header.get("GAIN", 1.0) or 1.0)),
        read_noise=_mean_card(header, "RDNOISEA", "RDNOISEB", default=float(header.get("RDNOISE", 0.0) or 0.0)),
        saturation=float(header.get("SATURATE", math.inf) or math.inf),
        extras={k.lower(): header[k] for k in ("DETPOS", "INSTRUME", "PLVER", "OBJECT") if k in header
                and isinstance(header[k], (str, int, float))},
    )


def _dq_to_mask(dq: np.ndarray, fmt: str, planes: dict[str, int]) -> np.ndarray:
    mask = np.zeros(dq.shape, dtype=np.int32)
    if fmt == "codes":
        for code, name in CP_DQ_CODES.items():
            mask[dq == code] |= maskmod.bits(planes, name)
        unknown = (dq > 8) | (dq < 0)
    else:
        known = 0
        for bit, name in CP_DQ_BITS.items():
            mask[(dq & bit) != 0] |= maskmod.bits(planes, name)
            known |= bit
        unknown = (dq & ~known) != 0
    mask[unknown] |= maskmod.bits(planes, "BAD")
    return mask


def read_decam_cp(image_path: str | os.PathLike, weight_path: str | os.PathLike | None = None,
                  dq_path: str | os.PathLike | None = None, hdu: int | str | None = None,
                  psfex_path: str | os.PathLike | None = None, zero_point: float | None = None,
                  dq_format: str = "auto") -> Exposure:
    """A DECam CP InstCal CCD (image + weight + data quality [+ PSFEx]) as an Exposure.

    ``weight_path``/``dq_path`` default to the image name with ``_ooi_``
    replaced by ``_oow_``/``_ood_`` when those files exist.  Variance is
    ``1 / weight`` (NaN and NO_DATA where the weight is 0).  ``dq_format``:
    ``"codes"`` (CP >= V3.5 integer codes), ``"bits"`` (older bit masks) or
    ``"auto"`` (codes when PLVER >= V3.5).  ``zero_point`` (AB mag of one
    count of this image) sets the PhotoCalib; the image stays in CP units.
    """
    image_path = pathlib.Path(image_path)
    data, header = _image_hdu(image_path, hdu)
    name = image_path.name
    if weight_path is None and "_ooi_" in name:
        cand = image_path.with_name(name.replace("_ooi_", "_oow_"))
        weight_path = cand if cand.is_file() else None
    if dq_path is None and "_ooi_" in name:
        cand = image_path.with_name(name.replace("_ooi_", "_ood_"))
        dq_path = cand if cand.is_file() else None
    planes = maskmod.default_mask_planes()
    mask = np.zeros(data.shape, dtype=np.int32)
    variance = np.full(data.shape, np.nan, dtype=np.float32)
    if weight_path is not None:
        w, _ = _image_hdu(pathlib.Path(weight_path), hdu)
        if w.shape != data.shape:
            raise ValidationError(f"{weight_path}: weight shape {w.shape} != image shape {data.shape}")
        with np.errstate(divide="ignore"):
            variance = np.where(w > 0, 1.0 / w, np.nan).astype(np.float32)
        mask[~(w > 0)] |= maskmod.bits(planes, "NO_DATA")
    if dq_path is not None:
        dq, dqh = _image_hdu(pathlib.Path(dq_path), hdu)
        if dq.shape != data.shape:
            raise ValidationError(f"{dq_path}: data-quality shape {dq.shape} != image shape {data.shape}")
        fmt = dq_format
        if fmt == "auto":
            plver = str(header.get("PLVER", dqh.get("PLVER", "V0"))).strip().lstrip("Vv")
            try:
                major_minor = tuple(int(p) for p in plver.split(".")[:2] if p.isdigit())
            except ValueError:
                major_minor = (0,)
            fmt = "codes" if major_minor >= (3, 5) else "bits"
        if fmt not in ("codes", "bits"):
            raise ValidationError(f"dq_format must be 'auto', 'codes' or 'bits', got {dq_format!r}")
        mask |= _dq_to_mask(dq.astype(np.int64), fmt, planes)
    mask[~np.isfinite(data)] |= maskmod.bits(planes, "NO_DATA")
    psf = PixelPSF.from_psfex(psfex_path) if psfex_path is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wcs = wcs_from_header(header)
    if wcs is not None:
        wcs.pixel_shape = (data.shape[1], data.shape[0])
    return Exposure(data.astype(np.float32), mask, variance, wcs=wcs, psf=psf,
                    photo_calib=PhotoCalib.from_zero_point(zero_point) if zero_point is not None else None,
                    info=_info_from_header(header), mask_planes=planes)
