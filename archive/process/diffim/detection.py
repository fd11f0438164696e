"""DIASources: detection and measurement on a difference image.

Detection
    Peaks of the score image (a per-pixel point-source S/N: ZOGY's corrected score,
    or the difference filtered with its PSF) above ``threshold`` sigma, positive
    (brightening) and negative (fading): each connected region gives its highest peak, and
    each further peak that the score dips before (a saddle test), so two changes a few PSFs
    apart are two detections.  Each position then moves uphill to the peak of the
    PSF-filtered difference (a score lowered by source noise peaks off a varying star's
    centre) and is refined to sub-pixel by a parabola there.  Peaks are not looked for on
    NO_DATA or EDGE pixels (no difference, or a biased one, there), and a peak that lands on
    a pixel of ``masked_centre`` (filled or interpolated in the science or the template), or
    within ``edge_clearance_fwhm`` FWHM of a NO_DATA or EDGE pixel, is dropped; a region
    needs ``min_pixels`` pixels.
Measurement
    PSF flux and error on the difference (:func:`archive.process.forced.forced_photometry`
    at the detected position; neighbours fitted jointly), aperture flux in a circle of
    ``aperture_fwhm`` FWHM, the PSF flux on the science image, S/N, centroid errors
    (sqrt(2) sigma_PSF / S/N per axis), sky position and its error.
Flags
    The mask bits within the PSF core (from both images: SAT, BAD, CR, EDGE, NO_DATA,
    STREAK...), NEAR_BRIGHT_STAR where a template pixel within ``bright_radius_fwhm`` FWHM
    has an S/N above ``bright_snr`` or is saturated (SAT in either image), or a template
    source there is more than ``bright_ratio`` times brighter than the detection; and
    DIPOLE for pairs of a positive and a negative detection closer
    than ``dipole_fwhm`` FWHM with fluxes of comparable size.
Dipoles
    A dipole's two lobes are fitted jointly (two PSFs of free flux at the lobes'
    positions); both rows carry ``is_dipole`` and the joint fluxes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from archive.errors import ValidationError
from archive.image.exposure import Exposure
from archive.image.psf import FWHM_PER_SIGMA

FLAG_NEAR_BRIGHT_STAR = np.int64(1) << 44  #: DIASource within the PSF of a bright template source
FLAG_DIPOLE = np.int64(1) << 45            #: DIASource is a lobe of a dipole (a positive/negative pair)
DIA_FLAGS = {"NEAR_BRIGHT_STAR": FLAG_NEAR_BRIGHT_STAR, "DIPOLE": FLAG_DIPOLE}


@dataclasses.dataclass
class DetectionConfig:
    """threshold: score sigma; min_pixels: pixels above threshold a detection needs;
    aperture_fwhm: aperture radius in FWHM; bright_snr, bright_radius_fwhm, bright_ratio: a
    template pixel of S/N above bright_snr, or a template source brighter than bright_ratio
    times the detection (0: no such test), within bright_radius_fwhm FWHM makes a detection
    NEAR_BRIGHT_STAR; dipole_fwhm: the largest lobe separation of a dipole;
    dipole_ratio: the lobes' |flux| ratio must lie within [1/r, r]; negative: also detect
    fading sources; refine: move each position to the peak of the PSF-filtered difference
    (:func:`refine_on_difference`); masked_centre: mask planes of the difference (the
    science's and the template's) on which a peak is no detection (its pixel was filled or
    interpolated: a star under a satellite streak or a cosmic ray, a saturated core);
    edge_clearance_fwhm: a peak within this many FWHM of a NO_DATA or EDGE pixel is dropped
    (the rim of a template hole or of the frame: half the PSF core on it)."""

    threshold: float = dataclasses.field(default=5.0, metadata={"min": 2.0})
    min_pixels: int = dataclasses.field(default=2, metadata={"min": 1})
    aperture_fwhm: float = dataclasses.field(default=1.0, metadata={"min": 0.3, "max": 5.0})
    bright_snr: float = dataclasses.field(default=100.0, metadata={"min": 1.0})
    bright_ratio: float = dataclasses.field(default=20.0, metadata={"min": 0.0})
    bright_radius_fwhm: float = dataclasses.field(default=3.0, metadata={"min": 0.0})
    dipole_fwhm: float = dataclasses.field(default=1.5, metadata={"min": 0.1})
    dipole_ratio: float = dataclasses.field(default=4.0, metadata={"min": 1.0})
    negative: bool = True
    refine: bool = True
    masked_centre: tuple[str, ...] = ("NO_DATA", "EDGE", "BAD", "SAT", "CR", "STREAK", "INTRP")
    edge_clearance_fwhm: float = dataclasses.field(default=0.5, metadata={"min": 0.0})

    def validate(self) -> None:
        """Raise ValueError naming a mask plane of ``masked_centre`` that no image has."""
        from archive.image.mask import DEFAULT_MASK_PLANES

        unknown = [p for p in self.masked_centre if p not in DEFAULT_MASK_PLANES]
        if unknown:
            raise ValueError(f"masked_centre: unknown mask plane(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(sorted(DEFAULT_MASK_PLANES))}")


def _peaks(score: np.ndarray, usable: np.ndarray, sign: int, cfg: DetectionConfig,
           separation: float = 1.5):
    """Peaks of ``sign * score`` above the threshold: (N, 2) sub-pixel x, y and their scores.

    Every connected region above the threshold gives its highest peak; a fainter peak of the
    same region is a detection of its own when the score dips between them (the saddle test
    of :func:`archive.process.detect.find_peaks`): two changes a few PSFs apart, or a
    transient beside a variable star, are two DIASources, not one.  Peaks closer than
    ``separation`` px to a brighter one are merged into it."""
    from archive.process.detect import DetectionConfig as PeakConfig, find_peaks

    s = np.where(usable, sign * score, -np.inf).astype(np.float32, copy=False)
    with np.errstate(invalid="ignore"):  # a peak beside an unusable (-inf) pixel: no sub-pixel step
        pk = find_peaks(s, PeakConfig(threshold=cfg.threshold, min_pixels=cfg.min_pixels, deblend=True,
                                      min_separation=separation, deblend_min_contrast=0.0))
    if not len(pk):
        return np.empty((0, 2)), np.empty(0)
    return pk[["x", "y"]].to_numpy(float), pk["peak_snr"].to_numpy(float)


def _windows(shape: tuple[int, int], xy: np.ndarray, half: int, radius: float | None = None):
    """Pixel indices of the (2 half + 1)^2 windows centred on the pixels nearest to ``xy``:
    ``yy, xx`` (n, w, w), clipped into the frame, and ``inside`` (n, w, w): on the frame
    (and, with ``radius``, within ``radius`` px of the centre pixel)."""
    ny, nx = shape
    g = np.arange(-half, half + 1)
    ix0, iy0 = np.floor(xy[:, 0] + 0.5).astype(np.int64), np.floor(xy[:, 1] + 0.5).astype(np.int64)
    yy, xx = iy0[:, None, None] + g[None, :, None], ix0[:, None, None] + g[None, None, :]
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    if radius is not None:
        inside &= ((g[:, None] ** 2 + g[None, :] ** 2) <= radius * radius)[None]
    return np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1), inside


def _any_within(mask: np.ndarray, bits: int, xy: np.ndarray, radius: float) -> np.ndarray:
    """Whether any pixel with ``bits`` set lies within ``radius`` px of each position's pixel
    (off the frame counts as not set; 0: that pixel alone); only those pixels are read."""
    yy, xx, inside = _windows(mask.shape, xy, max(0, int(np.ceil(radius))), radius)
    return (((mask[yy, xx] & np.int32(bits)) != 0) & inside).any(axis=(1, 2))


def _distinct(xy: np.ndarray, sign: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions (and signs) with each same-sign pair closer than ``radius`` px kept once
    (the first: detections come brightest first within each sign)."""
    from scipy.spatial import cKDTree

    keep = np.ones(len(xy), bool)
    for s in np.unique(sign):
        idx = np.flatnonzero(sign == s)
        for i, j in sorted(cKDTree(xy[idx]).query_pairs(radius)):
            if keep[idx[i]]:
                keep[idx[j]] = False
    return xy[keep], sign[keep]


def refine_on_difference(difference: Exposure, xy: np.ndarray, sign: np.ndarray, fwhm: float) -> np.ndarray:
    """Positions of peaks moved to the peak of the PSF-filtered difference (matched filter).

    A score that includes the template's source noise or a matching-error term (ZOGY's
    S_corr, AL's score) is lowered most at the centre of a star, so a varying star's score
    peaks in its wings, a pixel or two off; the PSF-filtered difference peaks at the change
    itself (the maximum-likelihood position of a point source in white noise).  From each
    score peak, uphill on ``sign`` x the filtered difference, at most ``ceil(fwhm)`` px,
    then a parabola through the 3 x 3 pixels there.  Returns (N, 2) x, y (0-based px)."""
    n = len(xy)
    if n == 0:
        return np.asarray(xy, float).reshape(0, 2)
    ny, nx = difference.shape
    kern = difference.psf.kernel((nx - 1) / 2.0, (ny - 1) / 2.0, 2 * int(np.ceil(1.5 * fwhm)) + 1)
    kern = (kern / kern.sum()).astype(np.float64)
    kh = kern.shape[0] // 2
    reach = int(np.ceil(fwhm))
    fh = reach + 1  # the filtered grid: offsets -fh..fh, so the parabola has its 3 x 3 at the edge
    h = fh + kh
    ix0 = np.floor(xy[:, 0] + 0.5).astype(np.int64)
    iy0 = np.floor(xy[:, 1] + 0.5).astype(np.int64)
    yy, xx, inside = _windows(difference.shape, xy, h)
    img = difference.image[yy, xx].astype(np.float64)
    good = inside & np.isfinite(img) & np.isfinite(difference.variance[yy, xx])
    img = np.where(good, img, 0.0) * np.asarray(sign, float)[:, None, None]
    win = np.lib.stride_tricks.sliding_window_view(img, kern.shape, axis=(1, 2))  # (n, 2fh+1, 2fh+1, k, k)
    filt = np.einsum("nabuv,uv->nab", win, kern)
    cy = np.full(n, fh)
    cx = np.full(n, fh)
    rows = np.arange(n)
    for _ in range(reach):  # steepest ascent over the 3 x 3 neighbourhood
        nb = np.stack([filt[rows, cy + dy, cx + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=1)
        best = np.argmax(nb, axis=1)
        ny_, nx_ = cy + best // 3 - 1, cx + best % 3 - 1
        ok = (np.abs(ny_ - fh) <= reach) & (np.abs(nx_ - fh) <= reach)
        cy, cx = np.where(ok, ny_, cy), np.where(ok, nx_, cx)
    c = filt[rows, cy, cx]
    l, r = filt[rows, cy, cx - 1], filt[rows, cy, cx + 1]
    d, u = filt[rows, cy - 1, cx], filt[rows, cy + 1, cx]
    with np.errstate(invalid="ignore", divide="ignore"):
        dx = np.where(l + r - 2 * c < 0, 0.5 * (l - r) / (l + r - 2 * c), 0.0)
        dy = np.where(d + u - 2 * c < 0, 0.5 * (d - u) / (d + u - 2 * c), 0.0)
    dx, dy = np.clip(np.nan_to_num(dx), -0.5, 0.5), np.clip(np.nan_to_num(dy), -0.5, 0.5)
    return np.column_stack([ix0 + (cx - fh) + dx, iy0 + (cy - fh) + dy])


def find_dia_peaks(difference: Exposure, score: np.ndarray, config: DetectionConfig | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The detection step of :func:`detect_dia_sources` (see the module docstring): (N, 2)
    positions x, y (0-based px) and their signs (+1 brightening, -1 fading), positive ones
    first, each sign brightest first."""
    cfg = config or DetectionConfig()
    not_data = [p for p in ("NO_DATA", "EDGE") if p in difference.mask_planes]
    usable = ~difference.mask_of(*not_data) & np.isfinite(difference.variance) & np.isfinite(score)
    fwhm = float(difference.psf.fwhm((difference.shape[1] - 1) / 2.0, (difference.shape[0] - 1) / 2.0))
    parts, signs = [], []
    for sign in ((1, -1) if cfg.negative else (1,)):
        xy, _ = _peaks(score, usable, sign, cfg, separation=fwhm)
        parts.append(xy)
        signs.append(np.full(len(xy), sign))
    xy, sign = np.concatenate(parts), np.concatenate(signs)
    if cfg.refine and len(xy):
        xy = refine_on_difference(difference, xy, sign, fwhm)
    if len(xy) > 1:  # two peaks of one sign that climbed to the same place are one detection
        xy, sign = _distinct(xy, sign, 0.5)
    drop = [p for p in cfg.masked_centre if p in difference.mask_planes]
    if drop and len(xy):  # a peak on masked pixels is the mask's doing (filled, interpolated): no detection
        on = _any_within(difference.mask, difference.get_plane_bitmask(*drop), xy, 0.0)
        xy, sign = xy[~on], sign[~on]
    if not_data and len(xy) and cfg.edge_clearance_fwhm > 0:
        # within a PSF core of pixels without (or with a biased) difference: the rim of a hole
        # in the template or of the frame, where filled pixels and convolutions meet
        near = _any_within(difference.mask, difference.get_plane_bitmask(*not_data), xy,
                           cfg.edge_clearance_fwhm * fwhm)
        xy, sign = xy[~near], sign[~near]
    return xy, sign


def detect_dia_sources(difference: Exposure, score: np.ndarray, science: Exposure | None = None,
                       template: Exposure | None = None, config: DetectionConfig | None = None) -> pd.DataFrame:
    """DIASources of a difference image (see the module docstring): one row per detection with
    ``x, y, x_err, y_err, ra, dec, ra_err, dec_err, psf_flux, psf_flux_err, ap_flux,
    ap_flux_err, science_flux, science_flux_err, snr, is_dipole, flags`` (fluxes in the
    difference's units: nJy for calibrated inputs; positions 0-based pixels, degrees)."""
    from archive.process.forced import ForcedConfig, forced_photometry

    cfg = config or DetectionConfig()
    if difference.psf is None:
        raise ValidationError("detect_dia_sources: the difference image has no PSF")
    if score.shape != difference.shape:
        raise ValidationError("detect_dia_sources: score and difference shapes differ")
    xy, sign = find_dia_peaks(difference, score, cfg)
    cols = ["x", "y", "x_err", "y_err", "ra", "dec", "ra_err", "dec_err", "psf_flux", "psf_flux_err", "ap_flux",
            "ap_flux_err", "science_flux", "science_flux_err", "snr", "is_dipole", "flags"]
    if len(xy) == 0:
        return pd.DataFrame({c: pd.Series(dtype=bool if c == "is_dipole" else ("int64" if c == "flags" else float))
                             for c in cols})
    x, y = xy[:, 0], xy[:, 1]
    fc = ForcedConfig(bad_planes=("BAD", "SAT", "NO_DATA"))
    meas = forced_photometry(difference, x, y, fc)
    flux = meas["psf_flux"].to_numpy(float, copy=True)
    err = meas["psf_flux_err"].to_numpy(float, copy=True)
    flags = meas["flags"].to_numpy(np.int64, copy=True)
    fwhm = float(np.median(difference.psf.fwhm(x, y)))
    snr = flux / err
    sig_psf = fwhm / FWHM_PER_SIGMA
    pos_err = np.sqrt(2.0) * sig_psf / np.maximum(np.abs(snr), 1e-3)
    ap, ap_err = aperture_flux(difference, x, y, cfg.aperture_fwhm * fwhm)
    if science is not None:
        sci = forced_photometry(science, x, y, fc)
        sflux, serr = sci["psf_flux"].to_numpy(float), sci["psf_flux_err"].to_numpy(float)
    else:
        sflux = serr = np.full(len(x), np.nan)
    if template is not None:
        near = near_bright(template, difference, x, y, np.abs(flux), fwhm, cfg)
        flags = np.where(near, flags | FLAG_NEAR_BRIGHT_STAR, flags)
    is_dipole = np.zeros(len(x), bool)
    pairs = dipole_pairs(x, y, sign, flux, fwhm * cfg.dipole_fwhm, cfg.dipole_ratio)
    if len(pairs):
        f1, f2, e1, e2 = fit_dipoles(difference, x, y, pairs)
        for (i, j), a, b, ea, eb in zip(pairs, f1, f2, e1, e2):
            flux[i], flux[j], err[i], err[j] = a, b, ea, eb
            is_dipole[[i, j]] = True
        flags = np.where(is_dipole, flags | FLAG_DIPOLE, flags)
        snr = flux / err
    ra, dec = difference.wcs.all_pix2world(x, y, 0) if difference.wcs is not None else (np.full(len(x), np.nan),) * 2
    scale = difference.pixel_scale() / 3600.0 if difference.wcs is not None else np.nan
    return pd.DataFrame({"x": x, "y": y, "x_err": pos_err, "y_err": pos_err, "ra": np.asarray(ra) % 360.0,
                         "dec": np.asarray(dec), "ra_err": pos_err * scale, "dec_err": pos_err * scale,
                         "psf_flux": flux, "psf_flux_err": err, "ap_flux": ap, "ap_flux_err": ap_err,
                         "science_flux": sflux, "science_flux_err": serr, "snr": snr, "is_dipole": is_dipole,
                         "flags": flags})


def near_bright(template: Exposure, difference: Exposure, x, y, flux, fwhm: float,
                cfg: DetectionConfig) -> np.ndarray:
    """Which detections at (x, y) (0-based px) of |PSF flux| ``flux`` lie within
    ``bright_radius_fwhm`` FWHM of a bright template source: a template pixel of S/N above
    ``bright_snr``, a saturated pixel (SAT in either image), or a source whose flux
    (its peak pixel over the PSF's peak fraction) is more than ``bright_ratio`` times the
    detection's -- a residual of a few percent of a star's light (PSF matching, alignment)
    looks like a change of that size.  Only the pixels around each detection are read."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) == 0:
        return np.zeros(0, bool)
    ny, nx = template.shape
    r = max(1, int(round(cfg.bright_radius_fwhm * fwhm)))
    yy, xx, inside = _windows(template.shape, np.column_stack([x, y]), r, r)
    img = template.image[yy, xx].astype(np.float64)
    var = template.variance[yy, xx].astype(np.float64)
    good = inside & np.isfinite(img) & np.isfinite(var) & (var > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.where(good, img / np.sqrt(np.where(good, var, 1.0)), 0.0)
    bright = snr.max(axis=(1, 2)) > cfg.bright_snr
    if "SAT" in difference.mask_planes:
        bright |= (inside & ((difference.mask[yy, xx] & difference.get_plane_bitmask("SAT")) != 0)).any(axis=(1, 2))
    if template.psf is not None and cfg.bright_ratio > 0:
        peak = float(np.max(template.psf.kernel((nx - 1) / 2.0, (ny - 1) / 2.0, None)))
        brightest = np.where(good, img, 0.0).max(axis=(1, 2)) / max(peak, 1e-6)
        bright |= brightest > cfg.bright_ratio * np.where(np.isfinite(flux), flux, np.inf)
    return bright


def aperture_flux(exposure: Exposure, x, y, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Sum and error (from the variance plane) in circles of ``radius`` px (exact pixel overlap
    approximated by 5 x 5 sub-sampling), vectorised; NaN where the circle leaves the image."""
    r = float(radius)
    h = int(np.ceil(r + 1))
    g = np.arange(-h, h + 1)
    sub = (np.arange(5) + 0.5) / 5 - 0.5
    ny, nx = exposure.shape
    x, y = np.asarray(x, float), np.asarray(y, float)
    xc, yc = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    dx = (xc - x)[:, None, None, None, None] + g[None, None, :, None, None] + sub[None, None, None, None, :]
    dy = (yc - y)[:, None, None, None, None] + g[None, :, None, None, None] + sub[None, None, None, :, None]
    frac = ((dx ** 2 + dy ** 2) <= r * r).mean(axis=(3, 4))  # (n, 2h+1, 2h+1)
    yy = yc[:, None, None] + g[None, :, None]
    xx = xc[:, None, None] + g[None, None, :]
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    yy, xx = np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)
    img = exposure.image[yy, xx].astype(float)
    var = exposure.variance[yy, xx].astype(float)
    ok = (inside | (frac == 0)).all(axis=(1, 2)) & np.isfinite(np.where(frac > 0, var, 0)).all(axis=(1, 2))
    flux = (frac * img).sum(axis=(1, 2))
    err = np.sqrt((frac * frac * np.where(frac > 0, var, 0)).sum(axis=(1, 2)))
    return np.where(ok, flux, np.nan), np.where(ok, err, np.nan)


def dipole_pairs(x, y, sign, flux, max_sep: float, ratio: float) -> list[tuple[int, int]]:
    """(positive, negative) index pairs closer than ``max_sep`` px with |flux| ratio in [1/r, r],
    each detection in at most one pair (closest first)."""
    from scipy.spatial import cKDTree

    pos, neg = np.flatnonzero(sign > 0), np.flatnonzero(sign < 0)
    if not len(pos) or not len(neg):
        return []
    tree = cKDTree(np.column_stack([x[neg], y[neg]]))
    cand = []
    for i in pos:
        for j in tree.query_ball_point([x[i], y[i]], max_sep):
            k = neg[j]
            q = abs(flux[i]) / max(abs(flux[k]), 1e-30)
            if 1.0 / ratio <= q <= ratio:
                cand.append((float(np.hypot(x[i] - x[k], y[i] - y[k])), int(i), int(k)))
    used, out = set(), []
    for _, i, k in sorted(cand):
        if i not in used and k not in used:
            used |= {i, k}
            out.append((i, k))
    return out


def fit_dipoles(diff: Exposure, x, y, pairs) -> tuple[np.ndarray, ...]:
    """Joint least-squares fluxes (and errors) of the two lobes of each dipole: two PSFs at
    the lobes' positions, weighted by the variance plane."""
    psf = diff.psf
    size = 2 * int(np.ceil(2.5 * float(psf.fwhm(x[0], y[0])))) + 1
    f1, f2, e1, e2 = [], [], [], []
    ny, nx = diff.shape
    for i, j in pairs:
        cx, cy = 0.5 * (x[i] + x[j]), 0.5 * (y[i] + y[j])
        xc, yc = int(np.floor(cx + 0.5)), int(np.floor(cy + 0.5))
        st = psf.stamps(np.array([x[i], x[j]]), np.array([y[i], y[j]]), size, xc=np.array([xc, xc]),
                        yc=np.array([yc, yc]))
        h = size // 2
        y0, x0 = yc - h, xc - h
        if y0 < 0 or x0 < 0 or y0 + size > ny or x0 + size > nx:
            f1.append(np.nan), f2.append(np.nan), e1.append(np.nan), e2.append(np.nan)
            continue
        d = diff.image[y0:y0 + size, x0:x0 + size].astype(float).ravel()
        v = diff.variance[y0:y0 + size, x0:x0 + size].astype(float).ravel()
        w = np.where(np.isfinite(v) & (v > 0), 1.0 / v, 0.0)
        a = st.reshape(2, -1)
        n = (a * w) @ a.T
        try:
            cov = np.linalg.inv(n)
        except np.linalg.LinAlgError:
            f1.append(np.nan), f2.append(np.nan), e1.append(np.nan), e2.append(np.nan)
            continue
        sol = cov @ ((a * w) @ d)
        f1.append(sol[0]), f2.append(sol[1]), e1.append(np.sqrt(cov[0, 0])), e2.append(np.sqrt(cov[1, 1]))
    return tuple(np.asarray(v, float) for v in (f1, f2, e1, e2))
