"""Exposure step: background, cosmic rays, detection and measurement -> source table.

``run(exposure, config)`` works on a copy of the exposure: it subtracts a mesh
background, finds cosmic rays (``CR`` plane, interpolated, ``INTRP``), detects and
measures sources with the exposure's PSF (a Gaussian of ``fallback_fwhm`` when it
has none), marks ``DETECTED`` footprints, and returns the source rows with the
``source`` table's columns: positions (and ``ra, dec, healpix29`` when the exposure
has a WCS), fluxes in nJy when it has a PhotoCalib (counts otherwise), ``extendedness``
(0..1, >= 0.5 extended: :mod:`archive.process.extendedness`), flags.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from archive.errors import ValidationError
from archive.image.exposure import Exposure
from archive.image.mask import add_plane
from archive.image.psf import GaussianPSF
from archive.process.background import Background, BackgroundConfig, estimate_background
from archive.process.cosmic import CosmicRayConfig, find_cosmic_rays
from archive.process.measure import ap_column
from archive.process.sources import SourceConfig, detect_and_measure
from archive.sky.healpix import radec_to_healpix29

log = logging.getLogger(__name__)


@dataclass
class CharacterizeConfig:
    """Configuration of :func:`run`.

    background, cosmic_rays, sources: sub-step configs.
    subtract_background: estimate and subtract a background (False when already subtracted).
    find_cosmic_rays: run the CR finder.
    fallback_fwhm: PSF FWHM (px) assumed when the exposure has no PSF.
    """

    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    cosmic_rays: CosmicRayConfig = field(default_factory=CosmicRayConfig)
    sources: SourceConfig = field(default_factory=SourceConfig)
    subtract_background: bool = True
    find_cosmic_rays: bool = True
    fallback_fwhm: float = 3.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CharacterizeResult:
    """exposure: background-subtracted copy with CR/INTRP/DETECTED planes; sources: the
    source rows; background: the subtracted background (None when not estimated);
    model: image of all fitted PSF models (counts)."""

    exposure: Exposure
    sources: pd.DataFrame
    background: Background | None
    model: np.ndarray


FLUX_COLUMNS = ("psf_flux", "psf_flux_err")


def flux_columns(radii) -> list[str]:
    """All flux columns (PSF and apertures, with errors) for aperture ``radii`` px."""
    cols = list(FLUX_COLUMNS)
    for r in radii:
        cols += [ap_column(r), ap_column(r) + "_err"]
    return cols


def add_sky_coordinates(sources: pd.DataFrame, wcs) -> pd.DataFrame:
    """Add ``ra, dec`` (deg), ``ra_err, dec_err`` (deg) and ``healpix29`` from pixel ``x, y`` and a WCS."""
    x = sources["x"].to_numpy(np.float64)
    y = sources["y"].to_numpy(np.float64)
    if len(sources) == 0:
        for c in ("ra", "dec", "ra_err", "dec_err"):
            sources[c] = np.array([], dtype=np.float64)
        sources["healpix29"] = np.array([], dtype=np.int64)
        return sources
    ra, dec = wcs.all_pix2world(x, y, 0)
    ra = np.mod(ra, 360.0)
    # local Jacobian (deg / px) by finite differences for the position errors
    ra1, dec1 = wcs.all_pix2world(x + 1.0, y, 0)
    ra2, dec2 = wcs.all_pix2world(x, y + 1.0, 0)
    cosd = np.cos(np.deg2rad(dec))
    dra_dx = ((ra1 - ra + 180) % 360 - 180) * cosd
    dra_dy = ((ra2 - ra + 180) % 360 - 180) * cosd
    ddec_dx = dec1 - dec
    ddec_dy = dec2 - dec
    sx = sources["x_err"].to_numpy(np.float64)
    sy = sources["y_err"].to_numpy(np.float64)
    sources["ra"] = ra
    sources["dec"] = dec
    # ra_err is the error of ra*cos(dec) expressed in degrees of arc
    sources["ra_err"] = np.sqrt((dra_dx * sx) ** 2 + (dra_dy * sy) ** 2).astype(np.float32)
    sources["dec_err"] = np.sqrt((ddec_dx * sx) ** 2 + (ddec_dy * sy) ** 2).astype(np.float32)
    sources["ra_dec_cov"] = (dra_dx * ddec_dx * sx ** 2 + dra_dy * ddec_dy * sy ** 2).astype(np.float32)
    ok = np.isfinite(ra) & np.isfinite(dec)
    hp = np.zeros(len(sources), dtype=np.int64)
    if ok.any():
        hp[ok] = radec_to_healpix29(ra[ok], dec[ok])
    sources["healpix29"] = hp
    return sources


def calibrate_fluxes(sources: pd.DataFrame, photo_calib, radii) -> pd.DataFrame:
    """Convert count fluxes (and ``sky``) to nJy with a PhotoCalib, in place; returns the frame."""
    s = photo_calib.njy_per_count
    for c in flux_columns(radii):
        if c in sources:
            sources[c] = sources[c].to_numpy(np.float64) * s
    if "sky" in sources:
        sources["sky"] = (sources["sky"].to_numpy(np.float64) * s).astype(np.float32)
    return sources


def run(exposure: Exposure, config: CharacterizeConfig | None = None) -> CharacterizeResult:
    """Background, cosmic rays, detection and measurement of one exposure (see module doc)."""
    cfg = config or CharacterizeConfig()
    if not isinstance(exposure, Exposure):
        raise ValidationError(f"characterize.run expects an Exposure, got {type(exposure).__name__}")
    exp = exposure.copy()
    planes = exp.mask_planes
    for name in ("CR", "INTRP", "DETECTED"):
        add_plane(planes, name)
    img = exp.image.astype(np.float32)
    var = exp.variance.astype(np.float32)
    if not np.isfinite(var).any():
        raise ValidationError("characterize.run: the exposure has no variance plane (all NaN); run ISR first")
    nodata = exp.mask_of("NO_DATA", "BAD") if "NO_DATA" in planes and "BAD" in planes else np.zeros(img.shape, bool)
    bkg = None
    if cfg.subtract_background:
        bkg = estimate_background(img, mask=nodata | ~np.isfinite(img) | exp.mask_of("SAT"), config=cfg.background)
        img = img - bkg.background
    psf = exp.psf
    if psf is None:
        log.warning("exposure has no PSF: measuring with a Gaussian of FWHM %.2f px", cfg.fallback_fwhm)
        psf = GaussianPSF(fwhm=cfg.fallback_fwhm)
    fwhm = float(psf.fwhm())
    if cfg.find_cosmic_rays:
        cr, cleaned = find_cosmic_rays(img, var, fwhm, mask=exp.mask, mask_planes=planes, config=cfg.cosmic_rays)
        exp.mask[cr] |= np.int32(1 << planes["CR"])
        if cfg.cosmic_rays.interpolate and cr.any():
            exp.mask[cr] |= np.int32(1 << planes["INTRP"])
            img = cleaned
    bvar = bkg.variance if bkg is not None else None
    sources, model = detect_and_measure(img, var, psf, mask=exp.mask, mask_planes=planes,
                                        background_variance=bvar,
                                        background=bkg.background if bkg is not None else None,
                                        config=cfg.sources, background_error=bkg.error if bkg is not None else None)
    # DETECTED: pixels where the source models exceed the 1-sigma noise
    with np.errstate(invalid="ignore"):
        det = model > np.sqrt(np.where(np.isfinite(var), var, np.inf))
    exp.mask[det] |= np.int32(1 << planes["DETECTED"])
    exp.image = img.astype(np.float32)
    info = exp.info
    sources["visit"] = np.int64(info.visit)
    sources["detector"] = np.int32(info.detector)
    sources["band"] = pd.array([info.band] * len(sources), dtype="string")
    sources["mjd"] = float(info.mjd)
    if exp.wcs is not None:
        add_sky_coordinates(sources, exp.wcs)
    if exp.photo_calib is not None:
        calibrate_fluxes(sources, exp.photo_calib, cfg.sources.measure.aperture_radii)
    log.info("characterize: %d sources on visit %s detector %s", len(sources), info.visit, info.detector)
    return CharacterizeResult(exposure=exp, sources=sources, background=bkg, model=model)
