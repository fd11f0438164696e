"""Single-epoch processing: raw frame -> calexp + calibrated source table.

ISR -> quality (pixels) -> background -> streaks (masked) -> PSF -> quality (PSF)
-> cosmic rays, detection, measurement -> astrometry -> photometric calibration.

A step that finds the exposure unusable (quality flags, too few PSF stars, no
astrometric or photometric solution) does not raise: the result comes back with
``rejected=True`` and the reason, and nothing after that step runs.

Photometric calibration, in order:

1. a reference catalog is given (and astrometry ran): the zero point fitted
   against it (:func:`archive.process.photocal.calibrate_photometry`);
2. otherwise the zero point the input states (``exposure.photo_calib``: the
   header's ``FLUXMAG0``/``PHOTZP``/``MAGZERO``/``MAGZP``, read by
   :mod:`archive.image.obsheader`), with the aperture correction measured on the
   exposure's own stars (``result.calibration = "header"``);
3. otherwise none: the flux columns (psf, aperture, sky; nJy in the schema) are
   NaN (stored as null), every source carries
   :data:`~archive.process.flags.FLAG_NOT_CALIBRATED`, the calexp has no
   PhotoCalib, and ``result.calibration = "none"`` with the reason in
   ``result.calibration_note``.  Counts are never returned under an nJy name.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from archive.errors import ArchiveError
from archive.image.exposure import Exposure
from archive.image.mask import add_plane
from archive.image.calib import PhotoCalib
from archive.image.raw import RawFrame
from archive.process import characterize, isr
from archive.process import flags as F_
from archive.process.astrometry import AstrometryConfig, AstrometryResult, fit_astrometry
from archive.process.background import estimate_background
from archive.process.characterize import CharacterizeConfig, add_sky_coordinates, flux_columns
from archive.process.photocal import (PhotoCalConfig, PhotoCalResult, aperture_correction, apply_calibration,
                                      calibrate_photometry)
from archive.process.psf_estimate import PsfEstimateConfig, PsfResult, add_model_flux_error, estimate_psf
from archive.process.quality import QualityConfig, QualityReport, check_exposure, check_psf
from archive.process.streaks import StreakConfig, find_streaks

log = logging.getLogger(__name__)


@dataclass
class SingleFrameConfig:
    """Configs of every step; ``fit_psf``/``fit_astrometry``/``fit_photometry`` switch steps off."""

    isr: isr.IsrConfig = field(default_factory=isr.IsrConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    psf: PsfEstimateConfig = field(default_factory=PsfEstimateConfig)
    characterize: CharacterizeConfig = field(default_factory=CharacterizeConfig)
    astrometry: AstrometryConfig = field(default_factory=AstrometryConfig)
    photocal: PhotoCalConfig = field(default_factory=PhotoCalConfig)
    streaks: StreakConfig = field(default_factory=StreakConfig)
    find_streaks: bool = True
    fit_psf: bool = True
    fit_astrometry: bool = True
    fit_photometry: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SingleFrameResult:
    """calexp: background-subtracted exposure with mask, variance, PSF, fitted WCS and
    PhotoCalib (None when rejected before it existed, or when uncalibrated); sources: source
    rows, fluxes in nJy, or NaN with FLAG_NOT_CALIBRATED when there is no calibration (never
    counts); quality: the quality report; rejected/reason; psf, astrometry, photocal: the step
    results that ran; streaks: the streaks found and masked
    (:func:`archive.process.streaks.find_streaks` table); calibration: ``"refcat"``,
    ``"header"`` or ``"none"`` (see the module doc) and calibration_note: where the zero
    point came from, or why there is none."""

    calexp: Exposure | None = None
    sources: pd.DataFrame | None = None
    quality: QualityReport = field(default_factory=QualityReport)
    rejected: bool = False
    reason: str = ""
    psf: PsfResult | None = None
    astrometry: AstrometryResult | None = None
    photocal: PhotoCalResult | None = None
    streaks: pd.DataFrame | None = None
    calibration: str = ""
    calibration_note: str = ""

    def reject(self, reason: str) -> "SingleFrameResult":
        self.rejected = True
        self.reason = reason
        log.warning("exposure rejected: %s", reason)
        return self


def run(raw: RawFrame, bias: Exposure | None = None, dark: Exposure | None = None, flat: Exposure | None = None,
        refcat: pd.DataFrame | None = None, config: SingleFrameConfig | None = None) -> SingleFrameResult:
    """Process one raw frame with the given masters and reference catalog."""
    cfg = config or SingleFrameConfig()
    return process_exposure(isr_exposure(raw, bias, dark, flat, cfg.isr), refcat, cfg)


def isr_exposure(raw: RawFrame, bias: Exposure | None = None, dark: Exposure | None = None,
                 flat: Exposure | None = None, config: isr.IsrConfig | None = None) -> Exposure:
    """ISR (:func:`archive.process.isr.run`), with the zero point of the raw header (for one raw
    adu), if any, as the exposure's PhotoCalib (per electron when ISR applied the gain)."""
    exp = isr.run(raw, bias, dark, flat, config)
    calib = raw.photo_calib
    if calib is not None:
        if exp.info.extras.get("isr", {}).get("apply_gain"):
            gain = raw.info.gain if raw.info.gain > 0 else 1.0
            calib = PhotoCalib(calib.njy_per_count / gain, calib.njy_per_count_err / gain)
        exp.photo_calib = calib
    return exp


def process_exposure(exposure: Exposure, refcat: pd.DataFrame | None = None,
                     config: SingleFrameConfig | None = None) -> SingleFrameResult:
    """Everything after ISR, on an instrument-corrected Exposure."""
    cfg = config or SingleFrameConfig()
    res = SingleFrameResult()
    res.quality = check_exposure(exposure, psf=None, config=cfg.quality)
    if not res.quality.ok:
        return res.reject("quality: " + res.quality.reason)
    exp = exposure.copy()
    # the input's own calibration (header zero point) is applied at the end, after the
    # aperture correction, and only when no reference-catalog fit replaces it; measurement
    # runs in counts
    header_calib, exp.photo_calib = exp.photo_calib, None
    bad = exp.mask_of(*[p for p in ("BAD", "SAT", "NO_DATA") if p in exp.mask_planes]) | ~np.isfinite(exp.image)
    bkg = None
    if cfg.find_streaks or cfg.fit_psf:
        bkg = estimate_background(exp.image, mask=bad, config=cfg.characterize.background)
    if cfg.find_streaks:
        streak, res.streaks = find_streaks(exp.image - bkg.background, exp.variance, exp.mask, exp.mask_planes,
                                           cfg.streaks)
        if streak.any():
            add_plane(exp.mask_planes, "STREAK")
            exp.mask[streak] |= np.int32(1 << exp.mask_planes["STREAK"])
            bkg = estimate_background(exp.image, mask=bad | streak, config=cfg.characterize.background)
    if cfg.fit_psf:
        try:
            res.psf = estimate_psf(exp.image - bkg.background, exp.variance, mask=exp.mask,
                                   mask_planes=exp.mask_planes, background_variance=bkg.variance, config=cfg.psf)
        except ArchiveError as exc:
            return res.reject(f"psf: {exc}")
        check_psf(res.psf.psf, config=cfg.quality, report=res.quality)
        if not res.quality.ok:
            return res.reject("quality: " + res.quality.reason)
        exp.psf = res.psf.psf
    try:
        ch = characterize.run(exp, cfg.characterize)
    except ArchiveError as exc:
        return res.reject(f"measurement: {exc}")
    calexp = ch.exposure
    sources = ch.sources
    if res.psf is not None:
        # PSF-flux errors include the PSF model's own (spatial-term) uncertainty
        sources = add_model_flux_error(sources, res.psf)
    res.calexp = calexp
    res.sources = sources
    band = calexp.info.band
    if refcat is not None and cfg.fit_astrometry and calexp.wcs is not None:
        try:
            res.astrometry = fit_astrometry(sources, refcat, calexp.wcs, calexp.shape,
                                            ref_mag=band if band in refcat else None, config=cfg.astrometry)
        except ArchiveError as exc:
            return res.reject(f"astrometry: {exc}")
        calexp.wcs = res.astrometry.wcs
        add_sky_coordinates(sources, calexp.wcs)
    radii = cfg.characterize.sources.measure.aperture_radii
    if refcat is not None and cfg.fit_photometry and res.astrometry is not None:
        try:
            res.photocal = calibrate_photometry(sources, refcat, res.astrometry.matches, band, config=cfg.photocal)
        except ArchiveError as exc:
            return res.reject(f"photometric calibration: {exc}")
        calexp.photo_calib = res.photocal.photo_calib
        res.sources = apply_calibration(sources, res.photocal, radii)
        res.calibration, res.calibration_note = "refcat", f"reference catalog, {res.photocal.n_stars} stars"
    elif header_calib is not None:
        res.photocal = _header_calibration(sources, header_calib, cfg.photocal)
        calexp.photo_calib = header_calib
        res.sources = apply_calibration(sources, res.photocal, radii)
        res.calibration = "header"
        res.calibration_note = str(exposure.info.extras.get("zero_point", "zero point of the input header"))
    else:
        why = "no reference catalog" if refcat is None else "no reference-catalog fit"
        res.sources = uncalibrated(sources, radii)
        calexp.photo_calib = None
        res.calibration = "none"
        res.calibration_note = (f"not photometrically calibrated ({why} and no zero-point card "
                                "FLUXMAG0/PHOTZP/MAGZERO/MAGZP); fluxes not stored")
        log.warning("exposure visit %s detector %s: %s", calexp.info.visit, calexp.info.detector,
                    res.calibration_note)
    return res


def _header_calibration(sources: pd.DataFrame, calib: PhotoCalib, config: PhotoCalConfig) -> PhotoCalResult:
    """A PhotoCalResult for a zero point given by the input: ``calib`` with the aperture
    correction of the exposure's own bright stars (1 with a warning when too few)."""
    try:
        ap, ap_err, n = aperture_correction(sources, config)
    except ArchiveError as exc:
        log.warning("header zero point used without aperture correction: %s", exc)
        ap, ap_err, n = 1.0, float("nan"), 0
    return PhotoCalResult(photo_calib=calib, zero_point=calib.zero_point, zero_point_err=calib.zero_point_err,
                          colour_term=0.0, colour=None, colour_0=0.0, ap_corr=ap, ap_corr_err=ap_err, n_stars=n,
                          rms_mag=float("nan"), stars=pd.DataFrame())


def uncalibrated(sources: pd.DataFrame, radii) -> pd.DataFrame:
    """Copy of ``sources`` with every flux column (PSF, apertures, their errors, ``sky``) NaN
    and :data:`~archive.process.flags.FLAG_NOT_CALIBRATED` set: what is stored when there is
    no calibration to nJy."""
    out = sources.copy()
    for c in [*flux_columns(radii), "sky"]:
        if c in out:
            out[c] = np.full(len(out), np.nan, dtype=out[c].dtype if out[c].dtype.kind == "f" else np.float64)
    out["flags"] = out["flags"].to_numpy(np.int64) | F_.FLAG_NOT_CALIBRATED
    return out
