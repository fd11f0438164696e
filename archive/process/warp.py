"""Resampling an Exposure onto another pixel grid (a sky tile, or another exposure), with
mask and variance, and PSF-matching a warp to a wider Gaussian PSF.

Resampling
    Each output pixel centre is mapped to the input grid through the two WCSs
    (computed exactly on a coarse grid every ``grid_step`` pixels and
    interpolated between: the mapping is smooth), and the input is
    interpolated there with a separable Lanczos-3 kernel (6 x 6 taps) or,
    the cheaper option, bilinearly (2 x 2).  The taps of each axis are
    normalised to sum 1, and the value is multiplied by the local area ratio
    of an output pixel to an input pixel (the Jacobian of the mapping), so
    flux is conserved: a source has the same total counts on both grids.

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
    evaluations of the mapping; fill_planes: input planes replaced by an interpolation of
    their surroundings before resampling; block_rows: output rows resampled at once (memory)."""

    kernel: str = dataclasses.field(default="lanczos3", metadata={"choices": ("lanczos3", "bilinear")})
    grid_step: int = dataclasses.field(default=16, metadata={"min": 1, "max": 256})
    fill_planes: tuple[str, ...] = ("BAD", "SAT", "CR", "NO_DATA")
    block_rows: int = dataclasses.field(default=256, metadata={"min": 8})


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


def fill_masked(image: np.ndarray, bad: np.ndarray, sigma: float = 2.0, max_rounds: int = 3) -> np.ndarray:
    """``image`` with the ``bad`` pixels replaced by a Gaussian-weighted mean of the good
    pixels around them (normalised convolution, ``max_rounds`` rounds of doubling width);
    what is left (the inside of large holes, which only needs to be quiet, as its pixels
    stay masked) gets the median of the good pixels."""
    out = np.array(image, dtype=np.float32, copy=True)
    bad = np.asarray(bad, bool) | ~np.isfinite(out)
    if not bad.any():
        return out
    good = (~bad).astype(np.float32)
    data = np.where(bad, 0.0, out).astype(np.float32)
    todo = bad.copy()
    s = float(sigma)
    for _ in range(max_rounds):
        num = ndimage.gaussian_filter(data, s, mode="nearest")
        den = ndimage.gaussian_filter(good, s, mode="nearest")
        ok = todo & (den > 1e-3)
        out[ok] = num[ok] / den[ok]
        todo &= ~ok
        if not todo.any():
            break
        s *= 2.0
    out[todo] = float(np.median(out[~bad])) if (~bad).any() else 0.0
    return out


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


def pixel_map(source_wcs: WCS, target_wcs: WCS, target_shape: tuple[int, int],
              bbox: tuple[int, int, int, int] | None = None, step: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Source-grid pixel coordinates (x, y; origin 0) of every target pixel centre in ``bbox``
    (x0, y0, x1, y1; half open, target pixels), exact every ``step`` pixels and interpolated
    bilinearly between (the WCS mappings are smooth)."""
    x0, y0, x1, y1 = bbox if bbox is not None else (0, 0, target_shape[1], target_shape[0])
    nx, ny = x1 - x0, y1 - y0
    gx = np.unique(np.concatenate([np.arange(0, nx, step), [nx - 1]])).astype(float)
    gy = np.unique(np.concatenate([np.arange(0, ny, step), [ny - 1]])).astype(float)
    mx, my = np.meshgrid(gx + x0, gy + y0)
    ra, dec = target_wcs.all_pix2world(mx.ravel(), my.ravel(), 0)
    sx, sy = source_wcs.all_world2pix(ra, dec, 0)
    sx, sy = sx.reshape(mx.shape), sy.reshape(mx.shape)
    if len(gx) == nx and len(gy) == ny:
        return sx, sy
    # bilinear interpolation of the coarse grid onto every pixel (separable: rows then columns)
    px, py = np.arange(nx, dtype=float), np.arange(ny, dtype=float)
    ix = np.clip(np.searchsorted(gx, px, side="right") - 1, 0, len(gx) - 2)
    iy = np.clip(np.searchsorted(gy, py, side="right") - 1, 0, len(gy) - 2)
    fx = ((px - gx[ix]) / (gx[ix + 1] - gx[ix]))[None, :]
    fy = ((py - gy[iy]) / (gy[iy + 1] - gy[iy]))[:, None]

    def expand(grid):
        rows = grid[:, ix] * (1 - fx) + grid[:, ix + 1] * fx  # (len(gy), nx)
        return rows[iy] * (1 - fy) + rows[iy + 1] * fy

    return expand(sx), expand(sy)


def _area_ratio(sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """|det d(source)/d(target)|: source pixels per target pixel, per target pixel."""
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
    sx, sy = pixel_map(exposure.wcs, target_wcs, target_shape, (x0, y0, x1, y1), cfg.grid_step)
    area = _area_ratio(sx, sy)  # a target pixel's area in source pixels: the flux and variance scale
    img_in = exposure.image
    fill = [p for p in cfg.fill_planes if p in exposure.mask_planes]
    bad = exposure.mask_of(*fill) if fill else np.zeros(exposure.shape, bool)
    bad |= ~np.isfinite(img_in)
    img_in = fill_masked(img_in, bad)
    var_in = exposure.variance
    var_bad = bad | ~np.isfinite(var_in)
    var_in = fill_masked(var_in, var_bad) if var_bad.any() else var_in.astype(np.float32)

    ny_in, nx_in = exposure.shape
    lo, _ = _taps(np.zeros(1), cfg.kernel)
    n_taps = 2 if cfg.kernel == "bilinear" else 6
    pad = n_taps
    img_p = np.pad(img_in, pad, mode="edge").ravel()
    var_p = np.pad(var_in, pad, mode="edge").ravel()
    msk_p = np.pad(exposure.mask, pad, mode="constant", constant_values=0).ravel()
    row = nx_in + 2 * pad

    ny, nx = y1 - y0, x1 - x0
    out_img = np.zeros((ny, nx), np.float32)
    out_var = np.zeros((ny, nx), np.float32)
    out_msk = np.zeros((ny, nx), np.int32)
    ratio_sum = 0.0
    no_data = exposure.mask_planes.get("NO_DATA")
    edge = exposure.mask_planes.get("EDGE")
    for r0 in range(0, ny, cfg.block_rows):
        r1 = min(ny, r0 + cfg.block_rows)
        bx, by = sx[r0:r1], sy[r0:r1]
        outside = ~((bx > -0.5) & (bx < nx_in - 0.5) & (by > -0.5) & (by < ny_in - 0.5))
        ixf, iyf = np.floor(bx), np.floor(by)
        fx, fy = (bx - ixf), (by - iyf)
        ix = np.clip(ixf, -pad + 2, nx_in + pad - 4).astype(np.int64)
        iy = np.clip(iyf, -pad + 2, ny_in + pad - 4).astype(np.int64)
        _, wx = _taps(fx, cfg.kernel)
        _, wy = _taps(fy, cfg.kernel)
        base = (iy + pad + lo) * row + (ix + pad + lo)
        acc_i = np.zeros(bx.shape, np.float32)
        acc_v = np.zeros(bx.shape, np.float32)
        for j in range(n_taps):
            ri = np.zeros(bx.shape, np.float32)
            rv = np.zeros(bx.shape, np.float32)
            rbase = base + j * row
            for k in range(n_taps):
                idx = rbase + k
                ri += wx[k] * img_p[idx]
                rv += wx[k] * var_p[idx]
            acc_i += wy[j] * ri
            acc_v += wy[j] * rv
        a = area[r0:r1].astype(np.float32)
        out_img[r0:r1] = acc_i * a
        out_var[r0:r1] = acc_v * a
        # mask: the 2 x 2 input pixels around the position
        b2 = (iy + pad) * row + (ix + pad)
        m = msk_p[b2] | msk_p[b2 + 1] | msk_p[b2 + row] | msk_p[b2 + row + 1]
        reach = (n_taps // 2)
        near_edge = (ixf < reach - 1) | (ixf > nx_in - 1 - reach) | (iyf < reach - 1) | (iyf > ny_in - 1 - reach)
        if edge is not None:
            m = np.where(near_edge & ~outside, m | (1 << edge), m)
        if no_data is not None:
            m = np.where(outside, 1 << no_data, m)
        out_msk[r0:r1] = m
        out_img[r0:r1][outside] = 0.0
        out_var[r0:r1][outside] = np.inf
        inside = ~outside
        if inside.any():
            ratio_sum += float(((wx ** 2).sum(axis=0) * (wy ** 2).sum(axis=0))[inside].sum())
    n_in = int(np.isfinite(out_var).sum())
    sub_wcs = target_wcs.deepcopy()
    sub_wcs.wcs.crpix = [target_wcs.wcs.crpix[0] - x0, target_wcs.wcs.crpix[1] - y0]
    psf = warp_psf(exposure.psf, exposure.wcs, sub_wcs, (ny, nx)) if exposure.psf is not None else None
    info = exposure.info.copy()
    info.extras = dict(info.extras)
    info.extras["warp"] = {"kernel": cfg.kernel, "pixel_variance_ratio": ratio_sum / max(n_in, 1),
                           "bbox": [int(x0), int(y0), int(x1), int(y1)],
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
    img = fill_masked(warp.image, bad)
    var = fill_masked(warp.variance, bad)
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
