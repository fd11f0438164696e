"""Single-epoch processing: raw frame -> calexp + calibrated source table.

ISR -> quality (pixels) -> background -> streaks (masked) -> PSF -> quality (PSF)
-> cosmic rays, detection, measurement -> astrometry -> photometric calibration.

A step that finds the exposure unusable (quality flags, too few PSF stars, no
astrometric or photometric solution) does not raise: the result comes back with
``rejected=True`` and the reason, and nothing after that step runs.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from archive.errors import ArchiveError
from archive.image.exposure import Exposure
from archive.image.mask import add_plane
from archive.image.raw import RawFrame
from archive.process import characterize, isr
from archive.process.astrometry import AstrometryConfig, AstrometryResult, fit_astrometry
from archive.process.background import estimate_background
from archive.process.characterize import CharacterizeConfig, add_sky_coordinates
from archive.process.photocal import PhotoCalConfig, PhotoCalResult, apply_calibration, calibrate_photometry
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
    PhotoCalib (None when rejected before it existed); sources: source rows (fluxes in
    nJy once calibrated, else counts); quality: the quality report; rejected/reason;
    psf, astrometry, photocal: the step results that ran; streaks: the streaks found and masked
    (:func:`archive.process.streaks.find_streaks` table)."""

    calexp: Exposure | None = None
    sources: pd.DataFrame | None = None
    quality: QualityReport = field(default_factory=QualityReport)
    rejected: bool = False
    reason: str = ""
    psf: PsfResult | None = None
    astrometry: AstrometryResult | None = None
    photocal: PhotoCalResult | None = None
    streaks: pd.DataFrame | None = None

    def reject(self, reason: str) -> "SingleFrameResult":
        self.rejected = True
        self.reason = reason
        log.warning("exposure rejected: %s", reason)
        return self


def run(raw: RawFrame, bias: Exposure | None = None, dark: Exposure | None = None, flat: Exposure | None = None,
        refcat: pd.DataFrame | None = None, config: SingleFrameConfig | None = None) -> SingleFrameResult:
    """Process one raw frame with the given masters and reference catalog."""
    cfg = config or SingleFrameConfig()
    exp = isr.run(raw, bias, dark, flat, cfg.isr)
    return process_exposure(exp, refcat, cfg)


def process_exposure(exposure: Exposure, refcat: pd.DataFrame | None = None,
                     config: SingleFrameConfig | None = None) -> SingleFrameResult:
    """Everything after ISR, on an instrument-corrected Exposure."""
    cfg = config or SingleFrameConfig()
    res = SingleFrameResult()
    res.quality = check_exposure(exposure, psf=None, config=cfg.quality)
    if not res.quality.ok:
        return res.reject("quality: " + res.quality.reason)
    exp = exposure.copy()
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
    if refcat is not None and cfg.fit_photometry and res.astrometry is not None:
        try:
            res.photocal = calibrate_photometry(sources, refcat, res.astrometry.matches, band, config=cfg.photocal)
        except ArchiveError as exc:
            return res.reject(f"photometric calibration: {exc}")
        calexp.photo_calib = res.photocal.photo_calib
        res.sources = apply_calibration(sources, res.photocal, cfg.characterize.sources.measure.aperture_radii)
    return res
