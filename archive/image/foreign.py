"""Readers for calibrated images made by other pipelines, into :class:`~archive.image.Exposure`.

- :func:`read_decam_cp`: NOIRLab DECam Community Pipeline "InstCal" products
  (``*_ooi_*`` image, ``*_oow_*`` inverse-variance weight, ``*_ood_*`` data
  quality), optionally with a PSFEx model (``*-psfex.fits``).
- :func:`read_plain_image`: any single image HDU with a celestial WCS.
- :func:`read_calibrated_mef`: calibrated exposures of other pipelines as
  multi-extension FITS with ``IMAGE``, ``MASK`` and ``VARIANCE`` HDUs (found by
  EXTNAME, any order) and the mask bit names in ``MP_*`` cards (the LSST
  convention); :func:`is_calibrated_mef` tells such a file from a raw frame.

Time, visit and zero-point cards are read by :mod:`archive.image.obsheader`:
MJD (TAI) at mid-exposure from ``MJD-AVG``/``DATE-AVG``, or ``MJD-OBS``/``DATE-OBS``
(start) + ``EXPTIME``/2, in the scale of ``TIMESYS`` (UTC when absent; DECam's
MJD-OBS is UTC at the start); the zero point from ``FLUXMAG0``/``PHOTZP``/
``MAGZERO``/``MAGZP``.
"""

from __future__ import annotations

import math
import os
import pathlib
import warnings

import numpy as np
from astropy.io import fits

from archive.errors import NotFoundError, ValidationError
from archive.image import mask as maskmod
from archive.image.calib import PhotoCalib
from archive.image.exposure import Exposure, ExposureInfo
from archive.image.fitsutil import wcs_from_header
from archive.image.obsheader import exposure_identity, header_zero_point, mid_exposure_mjd_tai
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
    info = _info_from_header(header, path)
    return Exposure(data.astype(np.float32), wcs=wcs_from_header(header), info=info,
                    photo_calib=PhotoCalib.from_zero_point(zero_point) if zero_point is not None else None)


def _info_from_header(header: fits.Header, where=None) -> ExposureInfo:
    """Metadata of a foreign image: band (first word of BAND/FILTER), visit/detector and
    MJD (TAI) at mid-exposure by :mod:`archive.image.obsheader` (the card the visit came
    from in ``extras["visit_from"]``, ``""`` when none: visit 0), EXPTIME, AIRMASS, GAIN
    (mean of GAINA/GAINB), RDNOISE, SATURATE."""
    band = str(header.get("BAND", header.get("FILTER", ""))).strip().split(" ")[0]
    mjd = mid_exposure_mjd_tai(header, where)
    ident = exposure_identity(header, mjd, where)
    extras = {k.lower(): header[k] for k in ("DETPOS", "INSTRUME", "PLVER", "OBJECT") if k in header
              and isinstance(header[k], (str, int, float))}
    extras["visit_from"] = ident.visit_from
    return ExposureInfo(
        visit=ident.visit if ident.visit is not None else 0, detector=ident.detector,
        band=band, mjd=mjd, exp_time=float(header.get("EXPTIME", math.nan) or math.nan),
        airmass=float(header.get("AIRMASS", math.nan) or math.nan),
        gain=_mean_card(header, "GAINA", "GAINB", default=float(header.get("GAIN", 1.0) or 1.0)),
        read_noise=_mean_card(header, "RDNOISEA", "RDNOISEB", default=float(header.get("RDNOISE", 0.0) or 0.0)),
        saturation=float(header.get("SATURATE", math.inf) or math.inf),
        extras=extras,
    )


#: EXTNAMEs of the planes of a calibrated multi-extension exposure.
MEF_PLANES = ("IMAGE", "MASK", "VARIANCE")


def is_calibrated_mef(path: str | os.PathLike) -> bool:
    """True when ``path`` is a FITS file with ``IMAGE``, ``MASK`` and ``VARIANCE`` HDUs
    (a calibrated exposure, ours or another pipeline's), False for anything else
    (e.g. a raw single-HDU frame); reads the headers only."""
    try:
        with fits.open(path, memmap=True, lazy_load_hdus=False) as hdul:
            names = {str(h.header.get("EXTNAME", "")).strip().upper() for h in hdul}
    except (OSError, ValueError):
        return False
    return set(MEF_PLANES) <= names


def read_calibrated_mef(path: str | os.PathLike) -> Exposure:
    """A calibrated exposure written by another pipeline as IMAGE/MASK/VARIANCE extensions.

    - ``IMAGE``, ``MASK``, ``VARIANCE`` HDUs found by EXTNAME (case-insensitive, any
      order, same shape); the WCS from the IMAGE header; primary cards the IMAGE header
      lacks are inherited (FITS INHERIT convention).  A ``PSF`` HDU is not read (the PSF
      is measured again).
    - Mask bit names from the ``MP_<NAME> = bit`` cards of the MASK header, kept in the
      file's own layout (``exposure.mask_planes``); a MASK with bits set but no ``MP_*``
      card is refused (its bits cannot be decoded).  Non-finite image or variance
      pixels, and variance <= 0, get the ``NO_DATA`` plane (added when missing).
    - Metadata as :func:`_info_from_header` reads it; the sky may still be in the image.
    - ``photo_calib``: our own ``NJYPCNT`` card, else the header zero point
      (:func:`archive.image.obsheader.header_zero_point`; its note in
      ``info.extras["zero_point"]``); None without one.

    Raises :class:`~archive.errors.ValidationError` naming the file and the HDU or card.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise NotFoundError(f"image file {path} does not exist")
    try:
        hdul = fits.open(path, memmap=False)
    except OSError as exc:
        raise ValidationError(f"{path}: not a readable FITS file ({exc})") from exc
    with hdul:
        by_name = {}
        for h in hdul:
            name = str(h.header.get("EXTNAME", "")).strip().upper()
            if name in MEF_PLANES and name not in by_name:
                by_name[name] = h
        missing = [n for n in MEF_PLANES if n not in by_name]
        if missing:
            raise ValidationError(f"{path}: no {', '.join(missing)} HDU (a calibrated exposure needs "
                                  f"EXTNAME = {', '.join(MEF_PLANES)})")
        arrays = {}
        for name, h in by_name.items():
            if h.data is None or h.data.ndim != 2:
                raise ValidationError(f"{path}: HDU {name} is not a 2-D image")
            arrays[name] = np.array(h.data)
        header = by_name["IMAGE"].header.copy()
        mask_header = by_name["MASK"].header.copy()
        primary = hdul[0].header
        for card in primary.cards:
            if card.keyword and card.keyword not in header and card.keyword not in (
                    "SIMPLE", "EXTEND", "COMMENT", "HISTORY", "NEXTEND", "BITPIX", "NAXIS"):
                header.append(card)
    shape = arrays["IMAGE"].shape
    for name in ("MASK", "VARIANCE"):
        if arrays[name].shape != shape:
            raise ValidationError(f"{path}: HDU {name} has shape {arrays[name].shape}, IMAGE has {shape}")
    if arrays["MASK"].dtype.kind not in "iu":
        raise ValidationError(f"{path}: HDU MASK holds {arrays['MASK'].dtype}, expected integers")
    mask = arrays["MASK"].astype(np.int64)
    try:
        planes = maskmod.planes_from_header(mask_header)
    except ValidationError as exc:
        raise ValidationError(f"{path}: HDU MASK: {exc}") from None
    if not planes:
        if mask.any():
            raise ValidationError(f"{path}: HDU MASK has bits set but no MP_<NAME> = bit cards naming them")
        planes = maskmod.default_mask_planes()
    if (mask < 0).any() or (mask >= 1 << (maskmod.MAX_BIT + 1)).any():
        raise ValidationError(f"{path}: HDU MASK has values outside bits 0..{maskmod.MAX_BIT}")
    mask = mask.astype(np.int32)
    image = arrays["IMAGE"].astype(np.float32)
    variance = arrays["VARIANCE"].astype(np.float32)
    with np.errstate(invalid="ignore"):
        nodata = ~np.isfinite(image) | ~np.isfinite(variance) | ~(variance > 0)
    if nodata.any():
        mask[nodata] |= np.int32(1 << maskmod.add_plane(planes, "NO_DATA"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wcs = wcs_from_header(header)
    if wcs is not None:
        wcs.pixel_shape = (shape[1], shape[0])
    info = _info_from_header(header, path)
    calib = PhotoCalib.from_header(header)
    if calib is None:
        zp = header_zero_point(header, path)
        calib = zp.photo_calib
        info.extras["zero_point"] = zp.note
    return Exposure(image, mask, variance, wcs=wcs, info=info, mask_planes=planes, photo_calib=calib)


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
                    info=_info_from_header(header, image_path), mask_planes=planes)
