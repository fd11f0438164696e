"""Resampling an Exposure onto another pixel grid (a sky tile, or another exposure), with
mask and variance, and PSF-matching a warp to a wider Gaussian PSF.

Resampling
    Each output pixel centre is mapped to the input grid through the two WCSs
    (computed exactly on a coarse grid every ``grid_step`` pixels and
    interpolated bilinearly between: the mapping is smooth; the step is halved
    until the interpolation is within ``max_map_error`` px of the exact mapping
    at the cells' centres, and the step and error found are recorded), and the
    input is interpolated there with a separable Lanczos-3 kernel (6 x 6 taps)
    or, the cheaper option, bilinearly (2 x 2).  The taps of each axis are
    normalised to sum 1, and the value is multiplied by the local area ratio
    of an output pixel to an input pixel (the Jacobian of the mapping, exact
    at the coarse grid's nodes and interpolated between), so flux is
    conserved: a source has the same total counts on both grids.

    Speed (numpy only): the normalised weights are tabulated at 1024 phases
    per pixel and interpolated linearly (within 1e-6 of the kernel's); image
    and variance are interleaved, so one 8-byte gather fetches both; output
    rows are resampled in blocks of ~40k pixels, whose work arrays stay in
    the CPU's cache.  Filling the masked pixels evaluates the normalised
    convolution at those pixels only when they are few, and otherwise filters
    only blocks of cells around them (they hug the frame's edges or fill a few
    holes), with the whole frame's values; image and variance share weights.

Variance
    The variance plane is interpolated with the *same* weights (sum w V, times
    the area ratio), not with their squares.  A flat input variance therefore
    gives a flat output variance: propagating sum w^2 V instead makes the
    variance beat with the phase of the output pixels on the input grid (the
    grid pattern seen in LSST warps).  The plane so made is the variance an
    *uncorrelated* pixel would need for sums over areas larger than the kernel
    (apertures, PSF fits) to have the right noise, which is what measurements
    use; a single resampled pixel is less noisy than that, because resampling
    correlates neighbouring pixels.  The warp records the factor
    (``info.extras["warp"]["pixel_variance_ratio"]``, the mean of
    (sum w_x^2)(sum w_y^2)) and the kernel.

Masks
    An output pixel carries the OR of the mask bits of the (up to) 2 x 2 input
    pixels around its position, so a masked input pixel marks at most the
    output pixels it overlaps.  Before interpolation, pixels of the planes in
    ``fill_planes`` (BAD, SAT, CR, NO_DATA by default) are replaced by an
    interpolation of their surroundings (:func:`fill_masked`), so a cosmic ray
    of 10^4 counts does not ring through the Lanczos tails into the pixels
    around its mask.  Output pixels that map outside the input are NO_DATA
    (value 0, variance inf); those whose kernel reaches past the input's edge
    are EDGE.

PSF matching (:func:`psf_match`) convolves a warp to a Gaussian of a wider
FWHM with the Gaussian of the difference of squares; masked pixels are
filled first and the mask is carried over unconvolved, so bad pixels and
cosmic rays do not grow into footprints the size of the kernel.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from astropy.wcs import WCS
from scipy import ndimage

from archive.errors import ValidationError
from archive.image.exposure import Exposure
from archive.image.psf import FWHM_PER_SIGMA



@dataclasses.dataclass
class WarpConfig:
    """kernel: ``"lanczos3"`` or ``"bilinear"``; grid_step: output pixels between exact WCS
    evaluations of the mapping (at most: halved until the interpolated mapping is within
    max_map_error px of the exact one); fill_planes: input planes replaced by an
    interpolation of their surroundings before resampling; block_rows: at most this many
    output rows resampled at once (fewer: blocks hold ~40k pixels)."""

    kernel: str = dataclasses.field(default="lanczos3", metadata={"choices": ("lanczos3", "bilinear")})
    grid_step: int = dataclasses.field(default=16, metadata={"min": 1, "max": 256})
    fill_planes: tuple[str, ...] = ("BAD", "SAT", "CR", "NO_DATA")
    block_rows: int = dataclasses.field(default=256, metadata={"min": 8})
    max_map_error: float = dataclasses.field(default=1e-3, metadata={"min": 1e-6})


def in_njy(exposure: Exposure) -> Exposure:
    """A copy of a calibrated exposure with image and variance in nJy per pixel (its
    PhotoCalib becomes 1 nJy per unit): epochs of different transparency and exposure
    time can then be resampled, combined and subtracted as they are.  Raises
    :class:`~archive.errors.ValidationError` for an exposure without calibration."""
    from archive.image.calib import PhotoCalib

    if exposure.photo_calib is None:
        raise ValidationError("the exposure has no photometric calibration: its pixels cannot be put in nJy")
    scale = np.float32(exposure.photo_calib.njy_per_count)
    out = exposure.copy()
    out.image = (exposure.image * scale).astype(np.float32)
    out.variance = (exposure.variance * scale * scale).astype(np.float32)
    rel = exposure.photo_calib.njy_per_count_err / exposure.photo_calib.njy_per_count
    out.photo_calib = PhotoCalib(1.0, rel)
    return out


def _gauss_1d(sigma: float) -> np.ndarray:
    """The 1-D weights of ``ndimage.gaussian_filter`` (truncate 4)."""
    r = int(4.0 * float(sigma) + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _smooth_at(planes: list[np.ndarray], sigma: float, flat: np.ndarray) -> list[np.ndarray]:
    """``ndimage.gaussian_filter(p, sigma, mode="nearest")`` of each plane at the pixels
    ``flat`` (flat indices) only, summed window offset by window offset over those pixels
    (vectorised over them): cheaper than filtering the whole frame when they are few."""
    k = _gauss_1d(sigma)
    r = k.size // 2
    nx = planes[0].shape[1]
    row = nx + 2 * r
    ys, xs = np.divmod(flat, nx)
    base = ys * row + xs  # the window's first pixel in the padded planes
    padded = [np.pad(p, r, mode="edge").ravel() for p in planes]
    sums = [np.zeros(flat.size) for _ in planes]
    tmp = np.empty(flat.size, planes[0].dtype)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            w = k[dy] * k[dx]
            off = dy * row + dx
            for p, s in zip(padded, sums):
                np.take(p[off:], base, out=tmp, mode="clip")
                s += w * tmp
    return sums


def _smooth_blocks(planes: list[np.ndarray], sigma: float, flat: np.ndarray,
                   tile: int) -> tuple[list[np.ndarray], int]:
    """``ndimage.gaussian_filter(p, sigma, mode="nearest")`` of each plane at the pixels
    ``flat`` (flat indices), filtering only blocks around them: the frame is cut into rows of
    ``tile`` x ``tile`` cells, and each run of adjacent cells holding such pixels is filtered
    as one block with a margin of the kernel's radius (so every pixel sees the same taps as
    in the whole frame, and gets the same value, bit for bit).  Returns the values (the
    planes' dtype) and the number of pixels filtered per plane."""
    ny, nx = planes[0].shape
    r = int(4.0 * float(sigma) + 0.5)  # gaussian_filter's radius (truncate 4)
    ys, xs = np.divmod(flat, nx)
    ty, tx = ys // tile, xs // tile
    touched = np.zeros((-(-ny // tile), -(-nx // tile)), bool)
    touched[ty, tx] = True
    outs = [np.empty(flat.size, p.dtype) for p in planes]
    area = 0
    order = np.argsort(ty, kind="stable")
    starts = np.searchsorted(ty[order], np.arange(touched.shape[0] + 1))
    for i in np.flatnonzero(touched.any(axis=1)):
        row = order[starts[i]:starts[i + 1]]  # the pixels in this row of cells
        t = np.concatenate(([False], touched[i], [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(t))
        for j0, j1 in zip(edges[::2], edges[1::2]):  # runs of touched cells
            sel = row[(tx[row] >= j0) & (tx[row] < j1)]
            by0, by1 = max(0, i * tile - r), min(ny, (i + 1) * tile + r)
            bx0, bx1 = max(0, j0 * tile - r), min(nx, j1 * tile + r)
            area += (by1 - by0) * (bx1 - bx0)
            for p, o in zip(planes, outs):
                f = ndimage.gaussian_filter(p[by0:by1, bx0:bx1], sigma, mode="nearest")
                o[sel] = f[ys[sel] - by0, xs[sel] - bx0]
    return outs, area


def _block_area(shape: tuple[int, int], flat: np.ndarray, r: int, tile: int) -> int:
    """Pixels :func:`_smooth_blocks` would filter per plane (its cost, without filtering)."""
    ny, nx = shape
    ys, xs = np.divmod(flat, nx)
    touched = np.zeros((-(-ny // tile), -(-nx // tile)), bool)
    touched[ys // tile, xs // tile] = True
    area = 0
    for i in np.flatnonzero(touched.any(axis=1)):
        t = np.concatenate(([False], touched[i], [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(t))
        h = min(ny, (i + 1) * tile + r) - max(0, i * tile - r)
        for j0, j1 in zip(edges[::2], edges[1::2]):
            area += h * (min(nx, j1 * tile + r) - max(0, j0 * tile - r))
    return area


def fill_masked_planes(planes: list[np.ndarray], bad: np.ndarray, sigma: float = 2.0,
                       max_rounds: int = 3) -> list[np.ndarray]:
    """:func:`fill_masked` of several planes over the same ``bad`` pixels (those not finite
    in any plane included), sharing the weights."""
    outs = [np.array(p, dtype=np.float32, copy=True) for p in planes]
    bad = np.asarray(bad, bool).copy()
    for o in outs:
        bad |= ~np.isfinite(o)
    if not bad.any():
        return outs
    good = (~bad).astype(np.float32)
    data = [np.where(bad, np.float32(0.0), o) for o in outs]
    todo = np.flatnonzero(bad)
    s = float(sigma)
    for _ in range(max_rounds):
        width = 2 * int(4.0 * s + 0.5) + 1
        # the whole frame costs ~6 passes of `width` taps per plane; the pixels alone
        # width^2 gathers each
        if todo.size * width * width < 2 * bad.size:
            *num, den = _smooth_at(data + [good], s, todo)
        else:
            # pixels to fill usually hug the frame's edges (NO_DATA corners, EDGE bands) or
            # sit in a few holes: filtering only the cells around them gives the whole
            # frame's values there for a fraction of the cost
            r = width // 2
            tile = min((32, 64, 128, 256), key=lambda t: _block_area(bad.shape, todo, r, t))
            if _block_area(bad.shape, todo, r, tile) < 0.7 * bad.size:
                (*num, den), _ = _smooth_blocks(data + [good], s, todo, tile)
            else:
                den = ndimage.gaussian_filter(good, s, mode="nearest").ravel()[todo]
                num = [ndimage.gaussian_filter(d, s, mode="nearest").ravel()[todo] for d in data]
        ok = den > 1e-3
        for o, n in zip(outs, num):
            o.ravel()[todo[ok]] = n[ok] / den[ok]
        todo = todo[~ok]
        if not todo.size:
            break
        s *= 2.0
    if todo.size:
        for o in outs:
            o.ravel()[todo] = float(np.median(o[~bad])) if (~bad).any() else 0.0
    return outs


def fill_masked(image: np.ndarray, bad: np.ndarray, sigma: float = 2.0, max_rounds: int = 3) -> np.ndarray:
    """``image`` with the ``bad`` pixels replaced by a Gaussian-weighted mean of the good
    pixels around them (normalised convolution, ``max_rounds`` rounds of doubling width);
    what is left (the inside of large holes, which only needs to be quiet, as its pixels
    stay masked) gets the median of the good pixels.  When the pixels to fill are few, the
    convolution is evaluated at them only (same values)."""
    return fill_masked_planes([image], bad, sigma, max_rounds)[0]


def _lanczos3(t: np.ndarray) -> np.ndarray:
    """The Lanczos-3 kernel sinc(t) sinc(t/3) on |t| < 3."""
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.sinc(t) * np.sinc(t / 3.0)
    return np.where(np.abs(t) < 3.0, w, 0.0)


def _taps(frac: np.ndarray, kernel: str) -> tuple[int, np.ndarray]:
    """(first tap offset, normalised weights (n_taps, ...)) for fractional positions in [0, 1)."""
    if kernel == "bilinear":
        return 0, np.stack([1.0 - frac, frac]).astype(np.float32)
    offs = np.arange(-2, 4, dtype=np.float64).reshape((6,) + (1,) * frac.ndim)
    w = _lanczos3(frac[None] - offs)
    return -2, (w / w.sum(axis=0, keepdims=True)).astype(np.float32)


#: Phases per pixel of the tabulated kernels (linearly interpolated between: the weights so
#: obtained differ from the kernel's by < 1e-6, below float32 resolution of the sums).
KERNEL_PHASES = 1024
_TABLES: dict[str, tuple] = {}


def _kernel_table(kernel: str):
    """(first tap offset, n_taps, T (n_taps, P), D (n_taps, P), T2 (P), D2 (P)): the
    normalised weights at phases i / P and their steps to the next phase; T2, D2 the same
    for the sum of the squared weights."""
    if kernel not in _TABLES:
        ph = np.arange(KERNEL_PHASES + 1, dtype=np.float64) / KERNEL_PHASES
        lo, w = _taps(ph, kernel)
        w = w.astype(np.float64)
        if kernel != "bilinear":  # _taps' float32 rounding is not wanted in the table
            offs = np.arange(-2, 4, dtype=np.float64)[:, None]
            w = _lanczos3(ph[None] - offs)
            w /= w.sum(axis=0, keepdims=True)
        w2 = (w ** 2).sum(axis=0)
        _TABLES[kernel] = (lo, w.shape[0], w[:, :-1].astype(np.float32), np.diff(w, axis=1).astype(np.float32),
                           w2[:-1].astype(np.float32), np.diff(w2).astype(np.float32))
    return _TABLES[kernel]


class _PixelMap:
    """The source-grid position (x, y; origin 0) of every target pixel centre in a box,
    computed exactly on a coarse grid of nodes every ``step`` pixels and interpolated
    bilinearly between; the step is halved until the interpolation misses the exact
    mapping by at most ``max_error`` px at the cells' centres (where a bilinear
    interpolation errs most).  ``area`` is |det d(source)/d(target)|, exact (central
    differences of the WCSs) at the nodes and interpolated the same way."""

    def __init__(self, source_wcs: WCS, target_wcs: WCS, bbox: tuple[int, int, int, int], step: int,
                 max_error: float | None = 1e-3):
        self.src, self.tgt = source_wcs, target_wcs
        self.x0, self.y0, x1, y1 = bbox
        self.nx, self.ny = x1 - self.x0, y1 - self.y0
        step = max(1, int(step))
        while True:
            self._nodes(step)
            self.max_error = self._check() if step > 1 else 0.0
            if step == 1 or max_error is None or not self.max_error > max_error:
                break
            step = max(1, step // 2)
        self.step = step

    def _exact(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ra, dec = self.tgt.all_pix2world(x + self.x0, y + self.y0, 0)
        return self.src.all_world2pix(ra, dec, 0)

    def _nodes(self, step: int) -> None:
        nx, ny = self.nx, self.ny
        self.gx = np.unique(np.concatenate([np.arange(0, nx, step), [nx - 1]])).astype(float)
        self.gy = np.unique(np.concatenate([np.arange(0, ny, step), [ny - 1]])).astype(float)
        mx, my = (a.ravel() for a in np.meshgrid(self.gx, self.gy))
        h = 0.5
        xs = np.concatenate([mx, mx - h, mx + h, mx, mx])
        ys = np.concatenate([my, my, my, my - h, my + h])
        sx, sy = (a.reshape(5, len(self.gy), len(self.gx)) for a in self._exact(xs, ys))
        area = np.abs((sx[2] - sx[1]) * (sy[4] - sy[3]) - (sx[4] - sx[3]) * (sy[2] - sy[1])) / (4 * h * h)
        # interpolation along x done once for every node row; rows() finishes along y
        px = np.arange(nx, dtype=float)
        ix = np.clip(np.searchsorted(self.gx, px, side="right") - 1, 0, max(len(self.gx) - 2, 0))
        if len(self.gx) > 1:
            fx = (px - self.gx[ix]) / (self.gx[ix + 1] - self.gx[ix])
            self._rows = [g[:, ix] * (1 - fx) + g[:, ix + 1] * fx for g in (sx[0], sy[0], area)]
        else:
            self._rows = [g[:, ix] for g in (sx[0], sy[0], area)]
        py = np.arange(ny, dtype=float)
        self._iy = np.clip(np.searchsorted(self.gy, py, side="right") - 1, 0, max(len(self.gy) - 2, 0))
        self._fy = ((py - self.gy[self._iy]) / (self.gy[self._iy + 1] - self.gy[self._iy])
                    if len(self.gy) > 1 else np.zeros(ny))
        self._nodes_exact = (sx[0], sy[0])

    def _check(self) -> float:
        """Largest distance (px) between the interpolated and the exact mapping at the
        centres of the node cells (and of the last row / column of them)."""
        cx = 0.5 * (self.gx[:-1] + self.gx[1:]) if len(self.gx) > 1 else self.gx
        cy = 0.5 * (self.gy[:-1] + self.gy[1:]) if len(self.gy) > 1 else self.gy
        mx, my = np.meshgrid(cx, cy)
        ex, ey = self._exact(mx.ravel(), my.ravel())
        sx, sy = self._nodes_exact
        # bilinear interpolation at a cell centre: the mean of its four nodes
        def centre(g):
            if g.shape[0] > 1:
                g = 0.5 * (g[:-1] + g[1:])
            if g.shape[1] > 1:
                g = 0.5 * (g[:, :-1] + g[:, 1:])
            return g.ravel()
        return float(np.max(np.hypot(centre(sx) - ex, centre(sy) - ey)))

    def rows(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sx, sy, area) of target rows r0:r1 of the box (float64, (r1 - r0, nx))."""
        iy, fy = self._iy[r0:r1], self._fy[r0:r1, None]
        out = []
        for g in self._rows:
            if g.shape[0] > 1:
                out.append(g[iy] * (1 - fy) + g[iy + 1] * fy)
            else:
                out.append(np.repeat(g, r1 - r0, axis=0))
        return tuple(out)


def pixel_map(source_wcs: WCS, target_wcs: WCS, target_shape: tuple[int, int],
              bbox: tuple[int, int, int, int] | None = None, step: int = 16,
              max_error: float | None = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Source-grid pixel coordinates (x, y; origin 0) of every target pixel centre in ``bbox``
    (x0, y0, x1, y1; half open, target pixels), exact every ``step`` pixels and interpolated
    bilinearly between (the WCS mappings are smooth; the step is made finer where that would
    miss the exact mapping by more than ``max_error`` px)."""
    bb = bbox if bbox is not None else (0, 0, target_shape[1], target_shape[0])
    pm = _PixelMap(source_wcs, target_wcs, bb, step, max_error)
    sx, sy, _ = pm.rows(0, pm.ny)
    return sx, sy


def _area_ratio(sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """|det d(source)/d(target)|: source pixels per target pixel, per target pixel (from a
    full map by finite differences; the warp uses :class:`_PixelMap`'s exact nodes)."""
    dxdu = np.gradient(sx, axis=1) if sx.shape[1] > 1 else np.ones_like(sx)
    dxdv = np.gradient(sx, axis=0) if sx.shape[0] > 1 else np.zeros_like(sx)
    dydu = np.gradient(sy, axis=1) if sy.shape[1] > 1 else np.zeros_like(sy)
    dydv = np.gradient(sy, axis=0) if sy.shape[0] > 1 else np.ones_like(sy)
    return np.abs(dxdu * dydv - dxdv * dydu)


def warp_exposure(exposure: Exposure, target_wcs: WCS, target_shape: tuple[int, int],
                  bbox: tuple[int, int, int, int] | None = None, config: WarpConfig | None = None) -> Exposure:
    """``exposure`` resampled onto ``target_wcs`` (see the module docstring).

    ``bbox`` (x0, y0, x1, y1; target pixels, half open) restricts the output to part of the
    target grid: the result's WCS and ``xy0`` describe that part.  The PSF is carried onto
    the new grid (:func:`warp_psf`).  Units of the image follow the input (counts or nJy
    per pixel).
    """
    cfg = config or WarpConfig()
    if exposure.wcs is None:
        raise ValidationError("warp_exposure: the exposure has no WCS")
    x0, y0, x1, y1 = bbox if bbox is not None else (0, 0, target_shape[1], target_shape[0])
    if not (0 <= x0 < x1 <= target_shape[1] and 0 <= y0 < y1 <= target_shape[0]):
        raise ValidationError(f"warp_exposure: bbox {bbox} is not inside the target grid {target_shape}")
    pm = _PixelMap(exposure.wcs, target_wcs, (x0, y0, x1, y1), cfg.grid_step, cfg.max_map_error)
    fill = [p for p in cfg.fill_planes if p in exposure.mask_planes]
    bad = exposure.mask_of(*fill) if fill else np.zeros(exposure.shape, bool)
    # image and variance filled over the same pixels (any not finite in either included)
    img_in, var_in = fill_masked_planes([exposure.image, exposure.variance], bad)

    ny_in, nx_in = exposure.shape
    lo, n_taps, tab, dtab, tab2, dtab2 = _kernel_table(cfg.kernel)
    pad = n_taps
    row = nx_in + 2 * pad
    # image and variance interleaved (one 8-byte gather fetches both), edge-padded
    planes = np.empty((ny_in + 2 * pad, row, 2), np.float32)
    planes[..., 0] = np.pad(img_in, pad, mode="edge")
    planes[..., 1] = np.pad(var_in, pad, mode="edge")
    del img_in, var_in
    flat = planes.reshape(-1).view(np.complex64)
    views = [[flat[(j * row + k):] for k in range(n_taps)] for j in range(n_taps)]
    msk_p = np.pad(exposure.mask, pad, mode="constant", constant_values=0).ravel()

    ny, nx = y1 - y0, x1 - x0
    out_img = np.empty((ny, nx), np.float32)
    out_var = np.empty((ny, nx), np.float32)
    out_msk = np.empty((ny, nx), np.int32)
    ratio_sum = 0.0
    no_data = exposure.mask_planes.get("NO_DATA")
    edge = exposure.mask_planes.get("EDGE")
    reach = n_taps // 2
    # blocks of ~40k output pixels: the per-block arrays stay in the CPU's cache
    step_rows = max(1, min(cfg.block_rows, 40_000 // max(nx, 1)))
    npx_max = step_rows * nx
    wx = np.empty((n_taps, npx_max, 2), np.float32)
    wy = np.empty((n_taps, npx_max, 2), np.float32)
    g = np.empty(npx_max, np.complex64)
    ri = np.empty((npx_max, 2), np.float32)
    acc = np.empty((npx_max, 2), np.float32)
    for r0 in range(0, ny, step_rows):
        r1 = min(ny, r0 + step_rows)
        npx = (r1 - r0) * nx
        bx, by, area = (a.ravel() for a in pm.rows(r0, r1))
        outside = ~((bx > -0.5) & (bx < nx_in - 0.5) & (by > -0.5) & (by < ny_in - 0.5))
        bx = np.where(np.isfinite(bx), bx, -1e6)
        by = np.where(np.isfinite(by), by, -1e6)
        ixf, iyf = np.floor(bx), np.floor(by)
        ix = np.clip(ixf, -pad + 2, nx_in + pad - 4).astype(np.intp)
        iy = np.clip(iyf, -pad + 2, ny_in + pad - 4).astype(np.intp)
        s2 = np.ones(npx, np.float32)
        for frac, w in ((bx - ixf, wx), (by - iyf, wy)):
            t = frac * KERNEL_PHASES
            ip = np.clip(t.astype(np.intp), 0, KERNEL_PHASES - 1)
            rem = (t - ip).astype(np.float32)
            for k in range(n_taps):
                wk = np.take(dtab[k], ip)
                wk *= rem
                wk += np.take(tab[k], ip)
                w[k, :npx, 0] = wk
                w[k, :npx, 1] = wk
            w2 = np.take(dtab2, ip)
            w2 *= rem
            w2 += np.take(tab2, ip)
            s2 *= w2
        base = (iy + pad + lo) * row + (ix + pad + lo)
        gg = g[:npx].view(np.float32).reshape(npx, 2)
        a_acc, a_ri = acc[:npx], ri[:npx]
        for j in range(n_taps):
            for k in range(n_taps):
                np.take(views[j][k], base, out=g[:npx], mode="clip")
                if k == 0:
                    np.multiply(gg, wx[0, :npx], out=a_ri)
                else:
                    gg *= wx[k, :npx]
                    a_ri += gg
            if j == 0:
                np.multiply(a_ri, wy[0, :npx], out=a_acc)
            else:
                a_ri *= wy[j, :npx]
                a_acc += a_ri
        a32 = area.astype(np.float32)
        oi = out_img[r0:r1].reshape(-1)
        ov = out_var[r0:r1].reshape(-1)
        np.multiply(a_acc[:, 0], a32, out=oi)
        np.multiply(a_acc[:, 1], a32, out=ov)
        # mask: the 2 x 2 input pixels around the position
        b2 = (iy + pad) * row + (ix + pad)
        m = msk_p[b2] | msk_p[b2 + 1] | msk_p[b2 + row] | msk_p[b2 + row + 1]
        near_edge = (ixf < reach - 1) | (ixf > nx_in - 1 - reach) | (iyf < reach - 1) | (iyf > ny_in - 1 - reach)
        if edge is not None:
            m[near_edge & ~outside] |= np.int32(1 << edge)
        if no_data is not None:
            m[outside] = np.int32(1 << no_data)
        out_msk[r0:r1] = m.reshape(r1 - r0, nx)
        oi[outside] = 0.0
        ov[outside] = np.inf
        ratio_sum += float(s2[~outside].sum(dtype=np.float64))
    n_in = int(np.isfinite(out_var).sum())
    sub_wcs = target_wcs.deepcopy()
    sub_wcs.wcs.crpix = [target_wcs.wcs.crpix[0] - x0, target_wcs.wcs.crpix[1] - y0]
    psf = warp_psf(exposure.psf, exposure.wcs, sub_wcs, (ny, nx)) if exposure.psf is not None else None
    info = exposure.info.copy()
    info.extras = dict(info.extras)
    info.extras["warp"] = {"kernel": cfg.kernel, "pixel_variance_ratio": ratio_sum / max(n_in, 1),
                           "bbox": [int(x0), int(y0), int(x1), int(y1)],
                           "map_step": int(pm.step), "map_max_error_px": float(pm.max_error),
                           "source_exposure": int(info.visit) * 1000 + int(info.detector)}
    return Exposure(out_img, out_msk, out_var, wcs=sub_wcs, psf=psf, photo_calib=exposure.photo_calib,
                    info=info, mask_planes=dict(exposure.mask_planes), xy0=(int(x0), int(y0)))


def jacobian(target_wcs: WCS, source_wcs: WCS, x: float, y: float, h: float = 0.5) -> np.ndarray:
    """d(source pixel)/d(target pixel) at target pixel (x, y), by central differences."""
    pts = np.array([[x - h, y], [x + h, y], [x, y - h], [x, y + h]])
    ra, dec = target_wcs.all_pix2world(pts[:, 0], pts[:, 1], 0)
    sx, sy = source_wcs.all_world2pix(ra, dec, 0)
    return np.array([[(sx[1] - sx[0]) / (2 * h), (sx[3] - sx[2]) / (2 * h)],
                     [(sy[1] - sy[0]) / (2 * h), (sy[3] - sy[2]) / (2 * h)]])


def warp_psf(psf, source_wcs: WCS, target_wcs: WCS, shape: tuple[int, int], size: int = 25,
             grid: int = 3, degree: int = 1):
    """A source exposure's PSF expressed on a target grid of ``shape``: at each node of a
    ``grid`` x ``grid`` grid the source kernel (where the node falls on the source) is
    resampled with the local Jacobian of the mapping (skipped when scale and orientation
    agree to 0.1 %), and the nodes are fitted as a spatially varying pixel PSF."""
    from archive.image.psf import PixelPSF, poly_design

    ny, nx = shape
    gx = np.linspace(0.0, nx - 1.0, grid) if grid > 1 else np.array([(nx - 1) / 2.0])
    gy = np.linspace(0.0, ny - 1.0, grid) if grid > 1 else np.array([(ny - 1) / 2.0])
    mx, my = (a.ravel() for a in np.meshgrid(gx, gy))
    ra, dec = target_wcs.all_pix2world(mx, my, 0)
    sx, sy = source_wcs.all_world2pix(ra, dec, 0)
    c = (size - 1) / 2.0
    kernels = []
    for tx, ty, px, py in zip(mx, my, sx, sy):
        kern = psf.kernel(float(px), float(py), size)
        jac = jacobian(target_wcs, source_wcs, tx, ty)
        if not np.allclose(jac, np.eye(2), atol=1e-3):
            m = jac[::-1, ::-1]  # (row, col): affine_transform maps output to input coordinates
            kern = ndimage.affine_transform(kern, m, offset=np.array([c, c]) - m @ np.array([c, c]),
                                            order=3, mode="constant")
            kern = kern * abs(np.linalg.det(jac))
        kernels.append(kern / kern.sum())
    bb = (0.0, 0.0, float(max(nx - 1, 1)), float(max(ny - 1, 1)))
    deg = degree if len(mx) >= (degree + 1) * (degree + 2) // 2 else 0
    design = poly_design(mx, my, deg, bb)
    sol, *_ = np.linalg.lstsq(design, np.asarray(kernels).reshape(len(mx), -1), rcond=None)
    return PixelPSF(sol.reshape(-1, size, size), None, oversample=1, degree=deg, bbox=bb)


def footprint_bbox(exposure: Exposure, target_wcs: WCS, target_shape: tuple[int, int],
                   margin: int = 4) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1; half open) on the target grid of the exposure's pixels
    (its edges sampled every 64 px), grown by ``margin``; None when they miss the grid."""
    ny, nx = exposure.shape
    t = np.concatenate([np.arange(0, nx, 64), [nx - 1]]).astype(float)
    s = np.concatenate([np.arange(0, ny, 64), [ny - 1]]).astype(float)
    ex = np.concatenate([t, t, np.zeros_like(s), np.full_like(s, nx - 1)])
    ey = np.concatenate([np.zeros_like(t), np.full_like(t, ny - 1), s, s])
    ra, dec = exposure.wcs.all_pix2world(ex, ey, 0)
    x, y = target_wcs.all_world2pix(ra, dec, 0)
    x0 = max(0, int(np.floor(np.min(x))) - margin)
    y0 = max(0, int(np.floor(np.min(y))) - margin)
    x1 = min(target_shape[1], int(np.ceil(np.max(x))) + margin + 1)
    y1 = min(target_shape[0], int(np.ceil(np.max(y))) + margin + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1


def gaussian_kernel_1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """A normalised, pixel-sampled 1-D Gaussian of ``sigma`` pixels out to ``truncate`` sigma."""
    r = max(1, int(truncate * sigma + 0.5))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def psf_match(warp: Exposure, fwhm: float, target_fwhm: float,
              fill_planes: tuple[str, ...] = ("BAD", "SAT", "CR", "NO_DATA", "EDGE")) -> Exposure:
    """The warp convolved from a PSF of ``fwhm`` to a Gaussian of ``target_fwhm`` (pixels)
    with the Gaussian of sigma^2 = sigma_t^2 - sigma^2; masked pixels (``fill_planes``)
    are filled before and the mask is carried over unconvolved.  The variance plane is
    convolved with the kernel's square (the per-pixel variance of the smoothed image)."""
    if not target_fwhm >= fwhm > 0:
        raise ValidationError(f"psf_match: target FWHM {target_fwhm} must be >= the warp's {fwhm} > 0")
    s = math.sqrt(max(target_fwhm ** 2 - fwhm ** 2, 0.0)) / FWHM_PER_SIGMA
    planes = [p for p in fill_planes if p in warp.mask_planes]
    bad = warp.mask_of(*planes) | ~np.isfinite(warp.image) | ~np.isfinite(warp.variance)
    img, var = fill_masked_planes([warp.image, warp.variance], bad)  # one set of weights for both
    if s > 0.05:
        k = gaussian_kernel_1d(s)
        for axis in (0, 1):
            img = ndimage.correlate1d(img, k, axis=axis, mode="nearest")
            # the variance of a weighted sum of independent pixels: sum k^2 V
            var = ndimage.correlate1d(var, k * k, axis=axis, mode="nearest")
    out = warp.copy()
    out.image, out.variance = img.astype(np.float32), var.astype(np.float32)
    out.info.extras = dict(out.info.extras)
    out.info.extras["psf_match"] = {"fwhm": float(fwhm), "target_fwhm": float(target_fwhm)}
    return out
