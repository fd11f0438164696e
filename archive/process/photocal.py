"""Photometric calibration: aperture correction, zero point with a colour term, nJy.

1. Aperture correction to total flux: the median ratio of the ``apcorr_radius``
   aperture flux to the PSF flux over bright, unflagged, isolated stars, times the
   curve of growth from that aperture to the largest one measured
   (``ap_total_ratio``, :func:`archive.process.measure.total_radius`; 6 FWHM, at least
   twice the aperture). The curve of growth is the intercept of
   ``ratio = c + b / F_ap``: an additive error of the background under the annulus
   (per pixel, the same for all stars) shifts faint stars' ratios by ``b / F_ap`` and
   not ``c``. PSF fluxes are multiplied by the product, so they measure total light and
   the zero point is that of total counts: the seeing-dependent light outside the
   aperture (0.3-2% for Moffat PSFs at 12 px) is no longer folded into it.
2. Zero point: for the stars matched to the reference catalog,
   ``m_ref - m_inst = ZP + k * (colour - colour_0)`` with ``m_inst = -2.5 log10(F)``
   (aperture-corrected PSF flux, counts) and ``colour`` the reference colour
   (e.g. g - r), fitted by weighted least squares with sigma clipping. ``colour_0``
   is the median colour of the calibration stars, so ``ZP`` is the zero point of a
   star of that colour; ``k`` is the colour term (0 when ``fit_colour_term`` is off
   or the colour range is too small).
3. :class:`~archive.image.calib.PhotoCalib` ``njy_per_count = 10**(-0.4 (ZP - 31.4))``
   and its error: the fit's, and the aperture correction's (common to all stars) in
   quadrature.
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
from archive.process.measure import TOTAL_RATIO, ap_column, flag_layout
from archive.process.robust import mad_sigma

log = logging.getLogger(__name__)

#: Reference colour used for each band's colour term by default.
DEFAULT_COLOURS = {"g": ("g", "r"), "r": ("g", "r"), "i": ("r", "i"), "z": ("i", "z"), "u": ("u", "g"), "y": ("z", "y")}


@dataclass
class PhotoCalConfig:
    """Configuration of :func:`calibrate_photometry`.

    apcorr_radius: aperture (px) the PSF fluxes are first matched to ...
    total_flux: ... then extended to total flux by the curve of growth (``ap_total_ratio``); off:
        the zero point refers to ``apcorr_radius`` aperture fluxes.
    min_cog_stars: fewer stars with ``ap_total_ratio`` than this: no curve-of-growth step (a warning).
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
    total_flux: bool = True
    min_cog_stars: int = 10
    min_snr: float = 20.0
    fit_colour_term: bool = True
    colours: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(DEFAULT_COLOURS))
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
    fluxes to total flux), ap_corr_err; n_stars used; rms_mag of the fit; stars: the matched table with
    residuals; cog, cog_err: the curve-of-growth factor (largest / calibration aperture) in ap_corr."""

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
    cog: float = 1.0
    cog_err: float = 0.0


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
    """``(ap_corr, error, n)``: the factor that turns PSF fluxes into total fluxes (see the module
    doc; into ``apcorr_radius`` aperture fluxes with ``total_flux`` off), its error and the
    number of stars.

    mask_planes: the mask layout of the ``flags`` bits (default: the table's own,
    :func:`archive.process.measure.flag_layout`)."""
    return _aperture_correction(sources, config or PhotoCalConfig(), mask_planes)[:3]


def _aperture_correction(sources: pd.DataFrame, cfg: PhotoCalConfig, mask_planes: Mapping[str, int] | None):
    """``(ap_corr, error, n, cog, cog_err)`` (see :func:`aperture_correction`, :func:`curve_of_growth`)."""
    col = ap_column(cfg.apcorr_radius)
    if col not in sources:
        raise ValidationError(f"aperture_correction: the source table has no {col} column")
    good = _good_stars(sources, cfg, mask_planes) & np.isfinite(sources[col].to_numpy())
    if good.sum() < cfg.min_stars:
        raise ValidationError(f"aperture_correction: only {int(good.sum())} good stars (need {cfg.min_stars})")
    r = sources[col].to_numpy()[good] / sources["psf_flux"].to_numpy()[good]
    med = float(np.median(r))
    mad = float(mad_sigma(r, center=med))
    err = mad * 1.2533 / np.sqrt(good.sum())
    cog, cog_err = (curve_of_growth(sources, good, col, cfg.min_cog_stars) if cfg.total_flux else (1.0, 0.0))
    return med * cog, float(np.hypot(err * cog, med * cog_err)), int(good.sum()), cog, cog_err


def curve_of_growth(sources: pd.DataFrame, good: np.ndarray, col: str, min_stars: int = 10) -> tuple[float, float]:
    """``(c, error)``: flux in the largest aperture over flux in aperture ``col`` for a star.

    From the stars ``good`` with a finite ``ap_total_ratio`` (:data:`archive.process.measure.TOTAL_RATIO`):
    the weighted, 3-sigma-clipped fit of ``ratio = c + b / F`` (``F`` the ``col`` flux): a
    background error of ``e`` per pixel adds ``e A / F`` (``A`` the annulus area) to every
    ratio, which the slope takes and the intercept does not. ``(1, 0)`` with a warning when
    fewer than ``min_stars`` stars have the ratio.
    """
    if TOTAL_RATIO not in sources:
        log.warning("photocal: no %s column; the zero point refers to %s fluxes", TOTAL_RATIO, col)
        return 1.0, 0.0
    y = sources[TOTAL_RATIO].to_numpy(np.float64)
    e = sources[TOTAL_RATIO + "_err"].to_numpy(np.float64)
    x = 1.0 / sources[col].to_numpy(np.float64)
    use = good & np.isfinite(y) & np.isfinite(e) & (e > 0) & np.isfinite(x) & (x > 0)
    if use.sum() < max(min_stars, 3):
        log.warning("photocal: only %d stars measure the curve of growth beyond %s; the zero point refers to "
                    "%s fluxes", int(use.sum()), col, col)
        return 1.0, 0.0
    # the slope is fitted only where the stars span a range of fluxes
    cov = np.zeros((2, 2))
    c = float(np.median(y[use]))
    for _ in range(5):
        X = np.column_stack([np.ones(use.sum()), x[use]])
        w = 1.0 / e[use] ** 2
        A = (X * w[:, None]).T @ X
        p = np.linalg.solve(A, (X * w[:, None]).T @ y[use])
        chi = (y - p[0] - p[1] * x) / e
        s = max(float(mad_sigma(chi[use], center=0.0)), 1.0)
        cov = np.linalg.inv(A) * s * s
        c = float(p[0])
        new = use & (np.abs(chi) < 3.0 * s)
        if np.array_equal(new, use) or new.sum() < max(min_stars, 3):
            break
        use = new
    return c, float(np.sqrt(cov[0, 0]))


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
    ap, ap_err, _, cog, cog_err = _aperture_correction(sources, cfg, planes)
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
        scale = max(float(mad_sigma(r_use)), float(np.median(sig[use])))
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
    # the aperture correction multiplies every star's flux: its error is the zero point's too
    zp_err = float(np.hypot(np.sqrt(cov[0, 0]), 2.5 / np.log(10.0) * ap_err / ap))
    rms = float(np.sqrt(np.mean((y - zp - k * (col - col0))[use] ** 2)))
    pc = PhotoCalib.from_zero_point(zp, zp_err)
    stars = pd.DataFrame({"src": matches["src"].to_numpy(), "ref": matches["ref"].to_numpy(), "m_ref": ref[band],
                          "m_inst": m_inst, "colour": col, "resid": y - zp - k * (col - col0), "used": use})
    log.info("photocal %s: ZP %.4f +- %.4f, colour term %.4f, ap corr %.4f, %d stars, rms %.4f mag", band, zp, zp_err,
             k, ap, int(use.sum()), rms)
    return PhotoCalResult(photo_calib=pc, zero_point=zp, zero_point_err=zp_err, colour_term=k, colour=colour,
                          colour_0=col0, ap_corr=ap, ap_corr_err=ap_err, n_stars=int(use.sum()), rms_mag=rms,
                          stars=stars, cog=cog, cog_err=cog_err)


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
