"""Photometric calibration: aperture correction, zero point with a colour term, nJy.

1. Aperture correction: the median ratio of the largest aperture flux to the PSF
   flux over bright, unflagged, isolated stars; PSF fluxes are multiplied by it so
   they measure the same (total) light as the aperture.
2. Zero point: for the stars matched to the reference catalog,
   ``m_ref - m_inst = ZP + k * (colour - colour_0)`` with ``m_inst = -2.5 log10(F)``
   (aperture-corrected PSF flux, counts) and ``colour`` the reference colour
   (e.g. g - r), fitted by weighted least squares with sigma clipping. ``colour_0``
   is the median colour of the calibration stars, so ``ZP`` is the zero point of a
   star of that colour; ``k`` is the colour term (0 when ``fit_colour_term`` is off
   or the colour range is too small).
3. :class:`~archive.image.calib.PhotoCalib` ``njy_per_count = 10**(-0.4 (ZP - 31.4))``
   and its error from the fit.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd

from archive.errors import ValidationError
from archive.image.calib import PhotoCalib
from archive.process import flags as F_
from archive.process.measure import ap_column, flag_layout

log = logging.getLogger(__name__)

#: Reference colour used for each band's colour term by default.
DEFAULT_COLOURS = {"g": ("g", "r"), "r": ("g", "r"), "i": ("r", "i"), "z": ("i", "z"), "u": ("u", "g"), "y": ("z", "y")}


@dataclass
class PhotoCalConfig:
    """Configuration of :func:`calibrate_photometry`.

    apcorr_radius: aperture (px) defining total flux for the aperture correction.
    min_snr: calibration / aperture-correction stars must exceed this S/N.
    fit_colour_term: fit the colour term ``k``.
    colours: band -> (blue, red) reference columns of the colour.
    min_colour_range: the colour term is fitted only if the stars span this range (mag) ...
    min_colour_stars: ... and there are at least this many (a colour term from a handful of
        stars mostly fits their noise and variability).
    clip_sigma, clip_iters: clipping of the zero-point fit, about a robust (median / MAD) start.
    min_stars: fewer calibration stars than this is an error.
    bad_flags_planes: mask planes that exclude a star.
    """

    apcorr_radius: float = 12.0
    min_snr: float = 20.0
    fit_colour_term: bool = True
    colours: dict = field(default_factory=lambda: dict(DEFAULT_COLOURS))
    min_colour_range: float = 0.3
    min_colour_stars: int = 25
    clip_sigma: float = 3.0
    clip_iters: int = 5
    min_stars: int = 5
    bad_flags_planes: tuple[str, ...] = ("SAT", "CR", "BAD", "NO_DATA", "INTRP", "SUSPECT", "STREAK")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PhotoCalResult:
    """photo_calib: counts -> nJy at the reference colour; zero_point, zero_point_err (AB mag of 1 count);
    colour_term k (mag per mag of colour) with colour (blue, red) and colour_0; ap_corr (multiplies PSF
    fluxes), ap_corr_err; n_stars used; rms_mag of the fit; stars: the matched table with residuals."""

    photo_calib: PhotoCalib
    zero_point: float
    zero_point_err: float
    colour_term: float
    colour: tuple[str, str] | None
    colour_0: float
    ap_corr: float
    ap_corr_err: float
    n_stars: int
    rms_mag: float
    stars: pd.DataFrame


def _good_stars(sources: pd.DataFrame, cfg: PhotoCalConfig, mask_planes: Mapping[str, int] | None = None) -> np.ndarray:
    """Stars fit for calibration: none of ``bad_flags_planes`` (decoded with the table's mask layout,
    :func:`archive.process.measure.flag_layout`) or of the measurement failure flags, S/N above
    ``min_snr``, a positive finite PSF flux."""
    bad = F_.plane_bits(flag_layout(sources, mask_planes), *cfg.bad_flags_planes) | int(
        F_.FLAG_PSF_FLUX | F_.FLAG_CENTROID | F_.FLAG_STAMP_EDGE | F_.FLAG_APERTURE_EDGE | F_.FLAG_BLENDED)
    return (((sources["flags"].to_numpy() & bad) == 0) & (sources["snr"].to_numpy() > cfg.min_snr)
            & np.isfinite(sources["psf_flux"].to_numpy()) & (sources["psf_flux"].to_numpy() > 0))


def aperture_correction(sources: pd.DataFrame, config: PhotoCalConfig | None = None, *,
                        mask_planes: Mapping[str, int] | None = None) -> tuple[float, float, int]:
    """``(ap_corr, error, n)``: median of aperture/PSF flux over good stars.

    mask_planes: the mask layout of the ``flags`` bits (default: the table's own,
    :func:`archive.process.measure.flag_layout`)."""
    cfg = config or PhotoCalConfig()
    col = ap_column(cfg.apcorr_radius)
    if col not in sources:
        raise ValidationError(f"aperture_correction: the source table has no {col} column")
    good = _good_stars(sources, cfg, mask_planes) & np.isfinite(sources[col].to_numpy())
    if good.sum() < cfg.min_stars:
        raise ValidationError(f"aperture_correction: only {int(good.sum())} good stars (need {cfg.min_stars})")
    r = sources[col].to_numpy()[good] / sources["psf_flux"].to_numpy()[good]
    med = float(np.median(r))
    mad = 1.4826 * float(np.median(np.abs(r - med)))
    return med, mad * 1.2533 / np.sqrt(good.sum()), int(good.sum())


def calibrate_photometry(sources: pd.DataFrame, refcat: pd.DataFrame, matches: pd.DataFrame, band: str, *,
                         config: PhotoCalConfig | None = None,
                         mask_planes: Mapping[str, int] | None = None) -> PhotoCalResult:
    """Zero point of ``sources`` (fluxes in counts) against ``refcat`` magnitudes in ``band``.

    ``matches``: source/reference index pairs (columns ``src``, ``ref``; e.g.
    :attr:`archive.process.astrometry.AstrometryResult.matches`). ``mask_planes``: the mask
    layout of the ``flags`` bits (default: the table's own,
    :func:`archive.process.measure.flag_layout`).
    """
    cfg = config or PhotoCalConfig()
    if band not in refcat:
        raise ValidationError(f"calibrate_photometry: reference catalog has no magnitude column {band!r}")
    planes = flag_layout(sources, mask_planes)
    ap, ap_err, _ = aperture_correction(sources, cfg, mask_planes=planes)
    src = sources.loc[matches["src"].to_numpy()].reset_index(drop=True)
    ref = refcat.iloc[matches["ref"].to_numpy()].reset_index(drop=True)
    good = _good_stars(src, cfg, planes) & np.isfinite(ref[band].to_numpy(np.float64))
    colour = cfg.colours.get(band)
    col = np.zeros(len(src))
    if colour is not None and all(c in ref for c in colour):
        col = ref[colour[0]].to_numpy(np.float64) - ref[colour[1]].to_numpy(np.float64)
        good &= np.isfinite(col)
    else:
        colour = None
    if good.sum() < cfg.min_stars:
        raise ValidationError(f"calibrate_photometry: only {int(good.sum())} usable matched stars (need {cfg.min_stars})")
    flux = src["psf_flux"].to_numpy(np.float64) * ap
    ferr = src["psf_flux_err"].to_numpy(np.float64) * ap
    m_inst = -2.5 * np.log10(np.where(flux > 0, flux, np.nan))
    e_inst = 2.5 / np.log(10) * ferr / flux
    err_col = f"{band}_err"
    e_ref = ref[err_col].to_numpy(np.float64) if err_col in ref else np.zeros(len(ref))
    y = ref[band].to_numpy(np.float64) - m_inst
    sig = np.sqrt(e_inst ** 2 + np.nan_to_num(e_ref) ** 2 + 0.005 ** 2)
    col0 = float(np.median(col[good])) if colour is not None else 0.0
    fit_k = bool(cfg.fit_colour_term and colour is not None
                 and np.ptp(col[good]) >= cfg.min_colour_range and good.sum() >= max(cfg.min_colour_stars, 2))
    # Robust start: the median offset, then clipping in magnitudes by the larger of the typical
    # error and the MAD of the residuals. Reference magnitudes of variable stars are their means,
    # so on any one epoch they scatter far more than their errors say; a chi-based clip scaled by
    # those same outliers would let them pull the zero point.
    zp, k, cov = float(np.median(y[good])), 0.0, np.zeros((2, 2))
    use = good.copy()
    for _ in range(max(1, cfg.clip_iters)):
        resid = y - zp - k * (col - col0)
        r_use = resid[use]
        scale = max(1.4826 * float(np.median(np.abs(r_use - np.median(r_use)))), float(np.median(sig[use])))
        new = good & (np.abs(resid - np.median(r_use)) < cfg.clip_sigma * scale)
        if new.sum() < cfg.min_stars:
            new = use
        X = np.column_stack([np.ones(new.sum()), col[new] - col0]) if fit_k else np.ones((new.sum(), 1))
        w = 1.0 / sig[new] ** 2
        A = (X * w[:, None]).T @ X
        p = np.linalg.solve(A, (X * w[:, None]).T @ y[new])
        zp = float(p[0])
        k = float(p[1]) if fit_k else 0.0
        chi = (y - zp - k * (col - col0)) / sig
        # error: scale the formal covariance by the reduced chi^2 when it exceeds 1
        dof = max(int(new.sum()) - X.shape[1], 1)
        red = float(np.sum(chi[new] ** 2) / dof)
        cov = np.linalg.inv(A) * max(red, 1.0)
        if np.array_equal(new, use):
            break
        use = new
    zp_err = float(np.sqrt(cov[0, 0]))
    rms = float(np.sqrt(np.mean((y - zp - k * (col - col0))[use] ** 2)))
    pc = PhotoCalib.from_zero_point(zp, zp_err)
    stars = pd.DataFrame({"src": matches["src"].to_numpy(), "ref": matches["ref"].to_numpy(), "m_ref": ref[band],
                          "m_inst": m_inst, "colour": col, "resid": y - zp - k * (col - col0), "used": use})
    log.info("photocal %s: ZP %.4f +- %.4f, colour term %.4f, ap corr %.4f, %d stars, rms %.4f mag", band, zp, zp_err,
             k, ap, int(use.sum()), rms)
    return PhotoCalResult(photo_calib=pc, zero_point=zp, zero_point_err=zp_err, colour_term=k, colour=colour,
                          colour_0=col0, ap_corr=ap, ap_corr_err=ap_err, n_stars=int(use.sum()), rms_mag=rms,
                          stars=stars)


def apply_calibration(sources: pd.DataFrame, result: PhotoCalResult, radii) -> pd.DataFrame:
    """Copy of ``sources`` with fluxes in nJy: PSF fluxes aperture-corrected, apertures as measured."""
    out = sources.copy()
    s = result.photo_calib.njy_per_count
    out["psf_flux"] = out["psf_flux"].to_numpy(np.float64) * result.ap_corr * s
    out["psf_flux_err"] = out["psf_flux_err"].to_numpy(np.float64) * result.ap_corr * s
    for r in radii:
        c = ap_column(r)
        if c in out:
            out[c] = out[c].to_numpy(np.float64) * s
            out[c + "_err"] = out[c + "_err"].to_numpy(np.float64) * s
    if "sky" in out:
        out["sky"] = (out["sky"].to_numpy(np.float64) * s).astype(np.float32)
    return out
