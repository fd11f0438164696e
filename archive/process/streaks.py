"""Satellite and aircraft streaks: find long straight trails and mask them (STREAK plane).

A streak crossing the detector contaminates every star it passes (PSF stars
included: a PSF built from them has a second peak) and is not a source. The
finder works on the background-subtracted image:

1. the per-pixel S/N, with bad, saturated and no-data pixels set to zero, is
   smoothed by a Gaussian and rescaled to unit noise;
2. pixels above ``threshold`` form connected components (8-connected); the
   second moments of each component (all components at once, by ``bincount``)
   give its length and width along its principal axes;
3. a component at least ``min_length`` long and ``min_elongation`` times longer
   than wide is a streak; its line is the principal axis through the centroid;
4. its profile across the line is the median S/N (unsmoothed) in 0.5 px bins of
   distance from the line, over the whole chord (the median ignores the stars the
   trail crosses); the mask's half-width is where that profile falls below
   ``profile_floor`` sigma, plus ``margin`` px;
5. every pixel within that half-width of the line is masked across the whole
   detector (a satellite crosses a field in a fraction of a typical exposure, and
   a trail is often broken where it crosses masked stars).

Round things (stars, galaxies), bleed trails and bad columns (masked before the
search) do not qualify. Pure numpy/scipy on whole arrays.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from archive.process import flags as F_
from archive.process.robust import mad_sigma

log = logging.getLogger(__name__)


@dataclass
class StreakConfig:
    """Configuration of :func:`find_streaks`.

    smooth_sigma: Gaussian smoothing of the S/N image (px).
    threshold: detection threshold of the smoothed, unit-noise image (sigma).
    min_length: shortest streak (px, length of the component along its axis) ...
    min_elongation: ... and its least length / width ratio.
    profile_floor: the mask ends where the median S/N across the streak falls below this ...
    margin: ... plus this many px, and is at least ``min_half_width`` px (at most ``max_half_width``).
    max_streaks: at most this many are masked (the longest); more means something else is wrong.
    ignore_planes: mask planes whose pixels are left out of the search.
    """

    smooth_sigma: float = 1.5
    threshold: float = 4.0
    min_length: float = 100.0
    min_elongation: float = 10.0
    profile_floor: float = 0.25
    margin: float = 1.0
    min_half_width: float = 3.0
    max_half_width: float = 40.0
    max_streaks: int = 8
    ignore_planes: tuple[str, ...] = ("BAD", "SAT", "NO_DATA", "CR")

    def to_dict(self) -> dict:
        return asdict(self)


STREAK_COLUMNS = ["x0", "y0", "x1", "y1", "angle_deg", "length", "width", "half_width", "n_pixels", "mean_snr"]


def find_streaks(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None = None,
                 mask_planes: dict | None = None, config: StreakConfig | None = None
                 ) -> tuple[np.ndarray, pd.DataFrame]:
    """Find streaks on a background-subtracted ``image`` (with its ``variance``).

    Returns ``(streak_mask, table)``: a boolean image of the pixels to mask, and one row
    per streak: the ends (``x0, y0, x1, y1``, px, origin 0) of its line across the
    image, ``angle_deg`` from +x, the detected ``length`` and profile ``width`` (sigma,
    px), the masked ``half_width`` (px), ``n_pixels`` above threshold and their ``mean_snr``.
    """
    cfg = config or StreakConfig()
    img = np.asarray(image, dtype=np.float32)
    var = np.asarray(variance, dtype=np.float32)
    ny, nx = img.shape
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = img / np.sqrt(var)
    ok = np.isfinite(snr)
    if mask is not None:
        bad = F_.plane_bits(mask_planes, *[p for p in cfg.ignore_planes if mask_planes is None or p in mask_planes])
        ok &= (mask & bad) == 0
    snr = np.where(ok, snr, 0.0).astype(np.float32)
    # smoothing by a unit-sum Gaussian divides white noise by 2 sqrt(pi) sigma: rescale to unit noise
    sm = ndimage.gaussian_filter(snr, cfg.smooth_sigma) * np.float32(2.0 * np.sqrt(np.pi) * cfg.smooth_sigma)
    lab, n = ndimage.label(sm > cfg.threshold, structure=np.ones((3, 3), dtype=bool))
    out = np.zeros(img.shape, dtype=bool)
    if n == 0:
        return out, pd.DataFrame(columns=STREAK_COLUMNS)
    yy, xx = np.nonzero(lab)
    ll = lab[yy, xx]
    cnt = np.bincount(ll, minlength=n + 1).astype(np.float64)
    # moments of every component at once; only components of enough pixels can be long
    big = cnt >= cfg.min_length
    if not big[1:].any():
        return out, pd.DataFrame(columns=STREAK_COLUMNS)
    keep = big[ll]
    yy, xx, ll = yy[keep], xx[keep], ll[keep]
    c = np.maximum(cnt, 1.0)
    mx = np.bincount(ll, weights=xx, minlength=n + 1) / c
    my = np.bincount(ll, weights=yy, minlength=n + 1) / c
    dx, dy = xx - mx[ll], yy - my[ll]
    sxx = np.bincount(ll, weights=dx * dx, minlength=n + 1) / c
    syy = np.bincount(ll, weights=dy * dy, minlength=n + 1) / c
    sxy = np.bincount(ll, weights=dx * dy, minlength=n + 1) / c
    tr, det = sxx + syy, sxx * syy - sxy ** 2
    disc = np.sqrt(np.maximum(tr ** 2 / 4 - det, 0.0))
    lam1, lam2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 0.0)
    length = np.sqrt(12.0 * lam1)  # a uniform segment of length L has variance L^2 / 12
    width = np.sqrt(12.0 * lam2)
    cand = np.flatnonzero(big & (length >= cfg.min_length) & (length >= cfg.min_elongation * np.maximum(width, 1.0)))
    cand = cand[cand > 0]
    cand = cand[np.argsort(-length[cand])][: cfg.max_streaks]
    rows = []
    gy, gx = np.mgrid[0:ny, 0:nx]
    for k in cand:
        theta = 0.5 * np.arctan2(2 * sxy[k], sxx[k] - syy[k])  # principal axis angle from +x
        s, co = np.sin(theta), np.cos(theta)
        m = ll == k
        # refine the line: offsets of the trail's ridge in 32 px segments along it (S/N-weighted
        # within 3 px of the moment line, weights capped so a crossed star does not dominate),
        # then a straight-line fit to them with one clipping pass
        x_, y_ = mx[k], my[k]
        for _ref in range(2):
            along = (gx - x_) * co + (gy - y_) * s
            perp = (gx - x_) * s - (gy - y_) * co
            near = (np.abs(perp) < 3.0) & ok
            wv = np.clip(snr[near], 0.0, None)
            cap = 3.0 * float(np.median(wv[wv > 0])) if (wv > 0).any() else 1.0
            wv = np.minimum(wv, cap)
            seg = np.floor(along[near] / 32.0).astype(np.int64)
            seg -= seg.min()
            sw_ = np.bincount(seg, weights=wv)
            good = sw_ > 0
            t_seg = (np.bincount(seg, weights=wv * along[near])[good] / sw_[good])
            d_seg = (np.bincount(seg, weights=wv * perp[near])[good] / sw_[good])
            if t_seg.size < 3:
                break
            keep_seg = np.ones(t_seg.size, dtype=bool)
            for _clip in range(2):
                b1, b0 = np.polyfit(t_seg[keep_seg], d_seg[keep_seg], 1)
                r_ = d_seg - (b0 + b1 * t_seg)
                keep_seg = np.abs(r_) < max(3.0 * float(mad_sigma(r_[keep_seg], center=0.0)), 0.05)
            # perp = b0 + b1 * along on the ridge: move the anchor and turn the direction
            x_, y_ = x_ + b0 * s, y_ - b0 * co
            theta -= np.arctan(b1)
            s, co = np.sin(theta), np.cos(theta)
        mx[k], my[k] = x_, y_
        dist = np.abs((gx - mx[k]) * s - (gy - my[k]) * co)
        band = (dist < cfg.max_half_width) & ok
        bins = (dist[band] / 0.5).astype(np.int64)
        nb = int(cfg.max_half_width / 0.5)
        prof = np.asarray(ndimage.median(snr[band], labels=bins, index=np.arange(nb)), dtype=np.float64)
        below = np.flatnonzero(~(prof >= cfg.profile_floor))  # NaN (empty bin) counts as below
        edge = (below[0] if below.size else nb) * 0.5
        half = float(min(max(cfg.min_half_width, edge + cfg.margin), cfg.max_half_width))
        # profile sigma from the central bins' S/N-weighted second moment
        centre = np.arange(nb) * 0.5 + 0.25
        wp = np.where(np.isfinite(prof) & (centre < edge), np.maximum(prof, 0.0), 0.0)
        width = float(np.sqrt(np.sum(wp * centre ** 2) / np.sum(wp))) if wp.sum() > 0 else float("nan")
        out |= dist <= half
        x0, y0, x1, y1 = _chord(mx[k], my[k], co, s, nx, ny)
        rows.append({"x0": x0, "y0": y0, "x1": x1, "y1": y1, "angle_deg": float(np.degrees(theta)),
                     "length": float(length[k]), "width": width, "half_width": half,
                     "n_pixels": int(m.sum()), "mean_snr": float(np.mean(sm[yy[m], xx[m]]))})
    table = pd.DataFrame(rows, columns=STREAK_COLUMNS)
    if len(table):
        log.info("streaks: %d found (lengths %s px), %d pixels masked", len(table),
                 [round(v) for v in table["length"]], int(out.sum()))
    return out, table


def _chord(x: float, y: float, c: float, s: float, nx: int, ny: int) -> tuple[float, float, float, float]:
    """Ends of the line through (x, y) with direction (c, s) inside the image [-0.5, n - 0.5]."""
    ts = []
    for lo, hi, p, d in ((-0.5, nx - 0.5, x, c), (-0.5, ny - 0.5, y, s)):
        if abs(d) > 1e-12:
            ts.append(sorted(((lo - p) / d, (hi - p) / d)))
    t0 = max(t[0] for t in ts)
    t1 = min(t[1] for t in ts)
    return float(x + t0 * c), float(y + t0 * s), float(x + t1 * c), float(y + t1 * s)
