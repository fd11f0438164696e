"""Cosmic-ray detection: pixels sharper than the PSF allows.

For any point of a Gaussian star image ``f`` and any direction, the mean of the
two pixels at distance ``d`` on either side satisfies
``(f(p + d) + f(p - d)) / 2 >= f(p) * PSF(d) / PSF(0)`` (log-concavity; wider,
Moffat-like wings only raise the left side). A pixel that violates this with a
noise margin, for any of four directions (horizontal, vertical, two diagonals) at
distance 1 or 2, cannot be starlight: it is a cosmic ray (or another sharp
artifact). Tracks one or two pixels wide fail the test across the track.

Flagged pixels are grown into neighbours that are still significantly bright,
set in the ``CR`` mask plane, and (optionally) replaced by a normalised-Gaussian
interpolation of the good pixels around them (``INTRP``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
from scipy import ndimage

from archive.errors import ValidationError
from archive.image.psf import FWHM_PER_SIGMA
from archive.process import flags as F_

log = logging.getLogger(__name__)


@dataclass
class CosmicRayConfig:
    """Configuration of :func:`find_cosmic_rays`.

    min_sigma: a candidate pixel must be this many sigma above the background.
    cond_sigma: noise margin (sigma) applied to both sides of the sharpness test.
    psf_fraction: fraction of the PSF neighbour ratio used as the limit (< 1 for safety against PSF errors).
    grow_sigma: neighbours of CR pixels brighter than this (sigma) join the CR.
    grow_iter: growth iterations.
    interpolate: replace CR pixels in the returned image by an interpolation of their surroundings.
    skip_planes: pixels in these planes are never CR candidates (they are already bad).
    """

    min_sigma: float = 5.0
    cond_sigma: float = 3.0
    psf_fraction: float = 0.7
    grow_sigma: float = 3.0
    grow_iter: int = 1
    interpolate: bool = True
    skip_planes: tuple[str, ...] = ("SAT", "BAD", "NO_DATA")

    def to_dict(self) -> dict:
        return asdict(self)


_DIRS = ((0, 1), (1, 0), (1, 1), (1, -1))  # (dy, dx)


def _shift(a: np.ndarray, dy: int, dx: int, fill: float) -> np.ndarray:
    """``out[y, x] = a[y + dy, x + dx]`` with ``fill`` outside."""
    out = np.full_like(a, fill)
    ny, nx = a.shape
    ys = slice(max(0, -dy), min(ny, ny - dy))
    xs = slice(max(0, -dx), min(nx, nx - dx))
    yt = slice(max(0, dy), min(ny, ny + dy))
    xt = slice(max(0, dx), min(nx, nx + dx))
    out[ys, xs] = a[yt, xt]
    return out


def psf_neighbour_ratio(fwhm: float, distance: float) -> float:
    """``PSF(d) / PSF(0)`` of a pixel-integrated Gaussian of FWHM ``fwhm`` px."""
    s2 = (fwhm / FWHM_PER_SIGMA) ** 2 + 1.0 / 12.0
    return float(np.exp(-0.5 * distance * distance / s2))


def find_cosmic_rays(image: np.ndarray, variance: np.ndarray, fwhm: float, *, mask: np.ndarray | None = None,
                     mask_planes: Mapping[str, int] | None = None,
                     config: CosmicRayConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Find cosmic-ray pixels in a background-subtracted image.

    image: background-subtracted pixels; variance: per-pixel variance (same units
    squared); fwhm: PSF FWHM in px (the narrowest PSF on the image, to be safe).
    Returns ``(cr, cleaned)``: a boolean CR map and the image with CR pixels
    interpolated (a copy; equal to ``image`` when ``interpolate`` is False).
    """
    cfg = config or CosmicRayConfig()
    img = np.asarray(image, dtype=np.float32)
    var = np.asarray(variance, dtype=np.float32)
    if img.ndim != 2 or var.shape != img.shape:
        raise ValidationError(f"find_cosmic_rays: image {img.shape} and variance {var.shape} must be equal 2-D shapes")
    if not np.isfinite(fwhm) or fwhm <= 0:
        raise ValidationError(f"find_cosmic_rays: fwhm must be > 0 px, got {fwhm}")
    ny, nx = img.shape
    bits = F_.plane_bits(mask_planes, *cfg.skip_planes) if mask is not None else 0
    mk = np.asarray(mask) if mask is not None else None

    def usable(yy, xx):
        """finite pixel with a finite, positive variance (gathered at the given pixels)"""
        v, w = img[yy, xx], var[yy, xx]
        return np.isfinite(v) & np.isfinite(w) & (w > 0)

    def skipped(yy, xx):
        return (mk[yy, xx] & bits) != 0 if bits else np.zeros(np.size(yy), dtype=bool)

    # candidates above min_sigma; everything else is evaluated at the candidates only (the
    # full-image maps of sigma, usable and skipped pixels cost more than the test itself)
    with np.errstate(invalid="ignore", over="ignore"):
        cand = np.multiply(img, img) > np.float32(cfg.min_sigma ** 2) * var
        cand &= img > 0
    cy, cx = np.divmod(np.flatnonzero(cand), nx)
    del cand
    keep = usable(cy, cx) & ~skipped(cy, cx)
    cy, cx = cy[keep], cx[keep]
    k = np.float32(cfg.cond_sigma)
    cr = np.zeros(img.shape, dtype=bool)
    if cy.size:
        c = img[cy, cx]
        lhs = c - k * np.sqrt(var[cy, cx])
        hit = np.zeros(cy.size, dtype=bool)
        for dist in (1, 2):
            for dy, dx in _DIRS:
                step = np.hypot(dy, dx) * dist
                ratio = np.float32(cfg.psf_fraction * psf_neighbour_ratio(fwhm, step))
                ya, xa = cy + dy * dist, cx + dx * dist
                yb, xb = cy - dy * dist, cx - dx * dist
                ina = (ya >= 0) & (ya < ny) & (xa >= 0) & (xa < nx)
                inb = (yb >= 0) & (yb < ny) & (xb >= 0) & (xb < nx)
                ya, xa = np.clip(ya, 0, ny - 1), np.clip(xa, 0, nx - 1)
                yb, xb = np.clip(yb, 0, ny - 1), np.clip(xb, 0, nx - 1)
                a, b = img[ya, xa], img[yb, xb]
                va, vb = var[ya, xa], var[yb, xb]
                with np.errstate(invalid="ignore"):
                    # pixels next to an unusable pixel cannot be judged in that direction
                    ok = ina & inb & np.isfinite(a + b) & np.isfinite(va + vb) & (va > 0) & (vb > 0)
                    m = 0.5 * (a + b)
                    sm = 0.5 * np.sqrt(va + vb)
                    hit |= ok & (lhs * ratio > m + k * sm)
        cr[cy[hit], cx[hit]] = True
    # grow into bright neighbours (CR halos, wider tracks): only the 8 neighbours of CR
    # pixels can join, so the dilation is done on their coordinates, not on the whole image
    ry, rx = (cy[hit], cx[hit]) if cy.size else (cy, cx)
    for _ in range(max(0, cfg.grow_iter)):
        if ry.size == 0:
            break
        gy = (ry[:, None] + np.array([-1, -1, -1, 0, 0, 1, 1, 1])[None, :]).ravel()
        gx = (rx[:, None] + np.array([-1, 0, 1, -1, 1, -1, 0, 1])[None, :]).ravel()
        ok = (gy >= 0) & (gy < ny) & (gx >= 0) & (gx < nx)
        gy, gx = gy[ok], gx[ok]
        with np.errstate(invalid="ignore"):
            bright = img[gy, gx] > np.float32(cfg.grow_sigma) * np.sqrt(var[gy, gx])
        add = bright & usable(gy, gx) & ~skipped(gy, gx) & ~cr[gy, gx]
        if not add.any():
            break
        cr[gy[add], gx[add]] = True
        fl = np.unique(np.concatenate([ry * nx + rx, gy[add] * nx + gx[add]]))
        ry, rx = np.divmod(fl, nx)
    cleaned = img
    if cfg.interpolate and ry.size:
        # CR pixels and unusable ones are filled from the usable pixels around them
        bad = ~(np.isfinite(img) & np.isfinite(var) & (var > 0))
        bad[ry, rx] = True
        by, bx = np.divmod(np.flatnonzero(bad), nx)
        cleaned = _fill(img, bad, by, bx, 1.5)
    log.info("find_cosmic_rays: %d CR pixels", int(ry.size))
    return cr, cleaned


def interpolate_over(image: np.ndarray, bad: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Copy of ``image`` with ``bad`` pixels replaced by a normalised Gaussian
    (``sigma`` px, truncated at 4 sigma) average of the good pixels around them.

    When bad pixels are sparse (cosmic rays) the average is computed on stamps around
    them only; two full-image Gaussian filters cost ~10x more there. Otherwise (large
    masked areas) the image is filtered as a whole. Both give the same values.
    """
    img = np.asarray(image, dtype=np.float32)
    by, bx = np.nonzero(bad)
    return _fill(img, bad, by, bx, sigma)


def _fill(img: np.ndarray, bad: np.ndarray, by: np.ndarray, bx: np.ndarray, sigma: float) -> np.ndarray:
    """:func:`interpolate_over` with the bad pixels' rows ``by`` and columns ``bx`` already known."""
    out = img.copy()
    r = int(4.0 * sigma + 0.5)
    if by.size == 0:
        return out
    if by.size * (2 * r + 1) ** 2 > img.size:
        good = ~bad
        num = ndimage.gaussian_filter(np.where(good, img, 0.0).astype(np.float32), sigma, truncate=4.0, mode="constant")
        den = ndimage.gaussian_filter(good.astype(np.float32), sigma, truncate=4.0, mode="constant")
        fill = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0)
        out[bad] = fill[bad]
        return out
    ny, nx = img.shape
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k2 = (k[:, None] * k[None, :] / k.sum() ** 2).astype(np.float32)
    fill = np.empty(by.size, dtype=np.float32)
    off = np.arange(-r, r + 1)
    for lo in range(0, by.size, 8192):
        yy = by[lo:lo + 8192, None] + off[None, :]
        xx = bx[lo:lo + 8192, None] + off[None, :]
        iny = (yy >= 0) & (yy < ny)
        inx = (xx >= 0) & (xx < nx)
        yc = np.clip(yy, 0, ny - 1)[:, :, None]
        xc = np.clip(xx, 0, nx - 1)[:, None, :]
        w = np.where(iny[:, :, None] & inx[:, None, :] & ~bad[yc, xc], k2[None], np.float32(0.0))
        v = np.where(w > 0, img[yc, xc], np.float32(0.0))
        num = np.einsum("npq,npq->n", w, v)
        den = w.sum(axis=(1, 2))
        fill[lo:lo + 8192] = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0)
    out[by, bx] = fill
    return out
