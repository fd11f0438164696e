"""Image quality checks: flag, never crash.

:func:`check_image` (arrays) and :func:`check_exposure` (an Exposure, optionally with
its PSF) run a list of independent checks and return a :class:`QualityReport` with
``ok`` (no rejecting flag raised), the flag names, one human-readable reason per flag
and the measured metrics. A check that itself fails (unexpected input) raises the
``CHECK_ERROR`` flag with the exception text instead of propagating it.

Flags (all rejecting unless noted): ``WRONG_SHAPE``, ``EMPTY`` (no finite pixel),
``CONSTANT``, ``MANY_NODATA``, ``HIGH_BACKGROUND``, ``MANY_SATURATED``,
``STUCK_VALUES`` (many pixels at one value), ``HISTOGRAM_ANOMALY`` (too many pixels
far below the sky, or a noise far from the expected one), ``BAD_PSF`` (FWHM out of
range or too elongated), ``DOUBLE_PSF`` (a secondary peak in the PSF model),
``CHECK_ERROR``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from archive.image.psf import FWHM_PER_SIGMA
from archive.process.robust import mad_sigma

log = logging.getLogger(__name__)


@dataclass
class QualityConfig:
    """Thresholds of the checks (None disables a check).

    expected_shape: (ny, nx) the image must have.
    max_nodata_fraction: largest fraction of non-finite / NO_DATA pixels.
    max_background: largest median sky level (image units).
    max_saturated_fraction: largest fraction of SAT pixels (or pixels >= saturation).
    max_stuck_fraction: largest fraction of pixels sharing one exact value.
    max_low_fraction: largest fraction of pixels more than 5 sigma below the median.
    noise_ratio_range: allowed range of (measured noise / sqrt(median variance)).
    fwhm_range: allowed PSF FWHM range (px).
    max_ellipticity: largest PSF ellipticity 1 - b/a.
    secondary_peak: a PSF-model local maximum above this fraction of the peak, beyond 1 FWHM, is a double PSF.
    """

    expected_shape: tuple[int, int] | None = None
    max_nodata_fraction: float | None = 0.2
    max_background: float | None = None
    max_saturated_fraction: float | None = 0.02
    max_stuck_fraction: float | None = 0.05
    max_low_fraction: float | None = 0.005
    noise_ratio_range: tuple[float, float] | None = (0.7, 1.5)
    fwhm_range: tuple[float, float] | None = (1.2, 15.0)
    max_ellipticity: float | None = 0.3
    secondary_peak: float | None = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QualityReport:
    """ok: no flag raised; flags: flag names; reasons: one sentence per flag; metrics: measured values."""

    ok: bool = True
    flags: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def flag(self, name: str, reason: str) -> None:
        self.flags.append(name)
        self.reasons.append(reason)
        self.ok = False

    @property
    def reason(self) -> str:
        """All reasons joined (empty when ok)."""
        return "; ".join(self.reasons)


def _safe(report: QualityReport, name: str, fn, *args) -> None:
    try:
        fn(report, *args)
    except Exception as exc:  # a check must never crash the pipeline
        report.flag("CHECK_ERROR", f"check {name} failed: {type(exc).__name__}: {exc}")


def check_image(image, *, variance=None, sat_mask=None, nodata_mask=None, saturation: float = math.inf,
                config: QualityConfig | None = None, report: QualityReport | None = None) -> QualityReport:
    """Pixel-level checks of an image (see the module docstring).

    image: 2-D array (sky not subtracted, image units); variance: its variance or
    None; sat_mask / nodata_mask: boolean masks or None; saturation: level at which
    pixels count as saturated when no mask is given.
    """
    cfg = config or QualityConfig()
    rep = report or QualityReport()
    try:
        img = np.asarray(image)
    except Exception as exc:
        rep.flag("CHECK_ERROR", f"image is not an array: {exc}")
        return rep
    if img.ndim != 2 or img.size == 0:
        rep.flag("WRONG_SHAPE", f"image has shape {img.shape}, expected a non-empty 2-D array")
        return rep
    rep.metrics["shape"] = tuple(int(s) for s in img.shape)
    if cfg.expected_shape is not None and tuple(img.shape) != tuple(cfg.expected_shape):
        rep.flag("WRONG_SHAPE", f"image has shape {img.shape}, expected {tuple(cfg.expected_shape)}")
    finite = np.isfinite(img)
    nodata = ~finite
    if nodata_mask is not None:
        nodata = nodata | np.asarray(nodata_mask, dtype=bool)
    good = ~nodata
    if not good.any():
        rep.flag("EMPTY", "no finite, valid pixel")
        return rep
    vals = img[good].astype(np.float64)
    # subsample large images for the statistics
    if vals.size > 2_000_000:
        vals = vals[:: vals.size // 2_000_000 + 1]

    def nodata_check(r):
        frac = float(nodata.mean())
        r.metrics["nodata_fraction"] = frac
        if cfg.max_nodata_fraction is not None and frac > cfg.max_nodata_fraction:
            r.flag("MANY_NODATA", f"{frac:.1%} of the pixels have no data (limit {cfg.max_nodata_fraction:.1%})")

    def constant_check(r):
        lo, hi = float(vals.min()), float(vals.max())
        r.metrics["min"], r.metrics["max"] = lo, hi
        if hi == lo:
            r.flag("CONSTANT", f"all valid pixels equal {lo}")

    def stats_check(r):
        med = float(np.median(vals))
        mad = float(mad_sigma(vals, center=med))
        r.metrics["median"], r.metrics["noise"] = med, mad
        if cfg.max_background is not None and med > cfg.max_background:
            r.flag("HIGH_BACKGROUND", f"median level {med:.4g} exceeds {cfg.max_background:.4g}")
        if mad > 0 and cfg.max_low_fraction is not None:
            low = float(np.mean(vals < med - 5 * mad))
            r.metrics["low_fraction"] = low
            if low > cfg.max_low_fraction:
                r.flag("HISTOGRAM_ANOMALY", f"{low:.2%} of the pixels lie > 5 sigma below the median "
                                            f"(limit {cfg.max_low_fraction:.2%})")
        if variance is not None and cfg.noise_ratio_range is not None and mad > 0:
            v = np.asarray(variance)[good]
            v = v[np.isfinite(v) & (v > 0)]
            if v.size:
                ratio = mad / math.sqrt(float(np.median(v)))
                r.metrics["noise_ratio"] = ratio
                lo, hi = cfg.noise_ratio_range
                if not lo <= ratio <= hi:
                    r.flag("HISTOGRAM_ANOMALY", f"pixel noise is {ratio:.2f} x the variance plane's (allowed {lo}-{hi})")

    def sat_check(r):
        if sat_mask is not None:
            sat = np.asarray(sat_mask, dtype=bool)
        else:
            sat = finite & (img >= saturation)
        frac = float(sat.mean())
        r.metrics["saturated_fraction"] = frac
        if cfg.max_saturated_fraction is not None and frac > cfg.max_saturated_fraction:
            r.flag("MANY_SATURATED", f"{frac:.2%} of the pixels are saturated (limit {cfg.max_saturated_fraction:.2%})")

    def stuck_check(r):
        if cfg.max_stuck_fraction is None:
            return
        u, counts = np.unique(vals, return_counts=True)
        k = int(np.argmax(counts))
        frac = float(counts[k] / vals.size)
        r.metrics["stuck_fraction"] = frac
        r.metrics["stuck_value"] = float(u[k])
        sat_val = math.isfinite(saturation) and u[k] >= saturation
        if frac > cfg.max_stuck_fraction and not sat_val and counts.size > 1:
            r.flag("STUCK_VALUES", f"{frac:.1%} of the pixels equal {u[k]:.6g} (limit {cfg.max_stuck_fraction:.1%})")

    for name, fn in (("nodata", nodata_check), ("constant", constant_check), ("stats", stats_check),
                     ("saturation", sat_check), ("stuck", stuck_check)):
        _safe(rep, name, fn)
    return rep


def check_psf(psf, x: float | None = None, y: float | None = None, *, config: QualityConfig | None = None,
              report: QualityReport | None = None) -> QualityReport:
    """PSF checks: FWHM range, ellipticity, secondary peak (double / trailed PSF)."""
    cfg = config or QualityConfig()
    rep = report or QualityReport()

    def run(r):
        fw = float(psf.fwhm(x, y)) if x is not None else float(psf.fwhm())
        r.metrics["psf_fwhm"] = fw
        if cfg.fwhm_range is not None and not cfg.fwhm_range[0] <= fw <= cfg.fwhm_range[1]:
            r.flag("BAD_PSF", f"PSF FWHM {fw:.2f} px outside {cfg.fwhm_range}")
            return
        size = 2 * int(math.ceil(3 * fw)) + 1
        cx, cy = psf.reference_position() if x is None else (float(x), float(y))
        k = psf.kernel(math.floor(cx + 0.5), math.floor(cy + 0.5), size)
        g = np.arange(size) - size // 2
        kk = np.clip(k, 0, None)
        w = kk * np.exp(-0.5 * (g[None, :] ** 2 + g[:, None] ** 2) / (fw / FWHM_PER_SIGMA) ** 2 / 2.0)
        tot = w.sum()
        ixx = (w * g[None, :] ** 2).sum() / tot
        iyy = (w * g[:, None] ** 2).sum() / tot
        ixy = (w * g[None, :] * g[:, None]).sum() / tot
        tr = 0.5 * (ixx + iyy)
        d = math.sqrt(0.25 * (ixx - iyy) ** 2 + ixy ** 2)
        e = 1.0 - math.sqrt(max(tr - d, 1e-12) / (tr + d))
        r.metrics["psf_ellipticity"] = e
        if cfg.max_ellipticity is not None and e > cfg.max_ellipticity:
            r.flag("BAD_PSF", f"PSF ellipticity {e:.2f} exceeds {cfg.max_ellipticity}")
        if cfg.secondary_peak is not None:
            peak = k.max()
            mx = ndimage.maximum_filter(k, size=3, mode="constant", cval=-np.inf)
            py, px = np.nonzero((k == mx) & (k > cfg.secondary_peak * peak))
            iy, ix = np.unravel_index(np.argmax(k), k.shape)
            dist = np.hypot(py - iy, px - ix)
            far = dist > max(fw, 1.5)
            r.metrics["psf_n_peaks"] = int(len(py))
            if far.any():
                j = int(np.argmax(np.where(far, k[py, px], -np.inf)))
                r.flag("DOUBLE_PSF", f"PSF has a second peak of {k[py[j], px[j]] / peak:.0%} of the maximum "
                                     f"{dist[j]:.1f} px from it")

    _safe(rep, "psf", run)
    return rep


def psf_noise_area(psf, x: float | None = None, y: float | None = None, size: int | None = None) -> float:
    """Noise-equivalent area (px^2) of a PSF: ``1 / sum(p^2)`` of its image ``p`` normalised to
    unit sum.

    A point source of flux F on a background of per-pixel variance V is measured by an optimal
    (PSF-weighted) fit with variance ``V / sum(p^2)`` (sky-limited); for a Gaussian of width
    sigma the area is ``4 pi sigma^2``, for a Moffat of the same FWHM it is larger (1.5x for
    beta = 2.5), so a Gaussian formula makes the limit too deep. ``psf``: an
    :class:`archive.image.psf.PSF`; ``(x, y)``: where (px; default the PSF's
    :meth:`~archive.image.psf.PSF.reference_position`); ``size``: kernel size (odd, px;
    default ~8 FWHM, at least 31).
    """
    if x is None or y is None:
        x, y = psf.reference_position()
    fw = float(psf.fwhm(x, y))
    if size is None:
        size = max(31, 2 * int(math.ceil(4.0 * fw)) + 1)
    p = psf.kernel(float(math.floor(x + 0.5)), float(math.floor(y + 0.5)), size)
    tot = p.sum()
    if not np.isfinite(tot) or tot <= 0:
        raise ValueError("psf_noise_area: the PSF image has no positive flux")
    p = p / tot
    return float(1.0 / np.sum(p * p))


def limiting_magnitude(zero_point: float, background_variance: float, psf, *, nsigma: float = 5.0,
                       ap_corr: float = 1.0, x: float | None = None, y: float | None = None) -> float:
    """``nsigma`` point-source limiting AB magnitude (sky-limited).

    zero_point: AB magnitude of one count of (aperture-corrected) PSF flux; background_variance:
    per-pixel variance of the sky (counts^2, e.g. the median of the variance plane);
    psf: the exposure's PSF, whose own noise-equivalent area (:func:`psf_noise_area`, not a
    Gaussian 4 pi sigma^2) sets the flux error ``sqrt(V A)``; ap_corr: the factor that turns
    PSF fluxes into the fluxes the zero point calibrates.
    """
    area = psf_noise_area(psf, x, y)
    noise = math.sqrt(float(background_variance) * area) * float(ap_corr)
    return float(zero_point - 2.5 * math.log10(nsigma * noise))


def check_exposure(exposure, *, psf=None, config: QualityConfig | None = None) -> QualityReport:
    """All checks on an Exposure: pixels, masks, variance and the PSF (``psf`` or the exposure's)."""
    cfg = config or QualityConfig()
    rep = QualityReport()
    try:
        planes = exposure.mask_planes
        sat = (exposure.mask & (1 << planes["SAT"])) != 0 if "SAT" in planes else None
        nod = (exposure.mask & (1 << planes["NO_DATA"])) != 0 if "NO_DATA" in planes else None
        var = exposure.variance if np.isfinite(exposure.variance).any() else None
        satl = float(exposure.info.saturation)
        check_image(exposure.image, variance=var, sat_mask=sat, nodata_mask=nod, saturation=satl, config=cfg, report=rep)
    except Exception as exc:
        rep.flag("CHECK_ERROR", f"pixel checks failed: {type(exc).__name__}: {exc}")
    p = psf if psf is not None else getattr(exposure, "psf", None)
    if p is not None:
        check_psf(p, config=cfg, report=rep)
    if rep.flags:
        log.warning("quality: exposure rejected: %s", rep.reason)
    return rep
