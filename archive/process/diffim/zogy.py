"""ZOGY: proper image subtraction (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27).

The science image N and the template R, already on one pixel grid and in one flux unit,
with PSFs P_n and P_r and background variances s_n^2 and s_r^2, give the proper
difference (hats: Fourier transforms; b = F_n / F_r the flux ratio, 1 for two calibrated
images unless fitted)::

    D^ = (P_r^ N^ - b P_n^ R^) / sqrt(a |P_r^|^2 + c |P_n^|^2),   a = s_n^2 / s,  c = b^2 s_r^2 / s,
    s  = s_n^2 + b^2 s_r^2

This is the paper's D divided by its zero point F_D and multiplied by b: a point source of
flux f (science units) that is absent from the template appears on it with flux f under
the difference PSF ``P_D^ = P_r^ P_n^ / sqrt(a |P_r^|^2 + c |P_n^|^2)`` (unit sum), and on
empty sky its noise is white with variance ``s = b^2 / F_D^2`` per pixel.  The score is the
difference filtered with its own PSF, ``S = D * P_D(-x)`` (the log-likelihood ratio of a
point source), which splits into ``S = k_n * N - k_r * R`` with
``k_n^ = conj(P_n^) |P_r^|^2 / den`` and ``k_r^ = b conj(P_r^) |P_n^|^2 / den``.  Its
corrected version (the paper's eqs. 25-31) divides by the standard deviation the inputs'
noise and the registration error give it::

    S_corr = S / sqrt(V_n * k_n^2 + V_r * k_r^2 + sx^2 [(dS_N/dx)^2 + (dS_R/dx)^2] + sy^2 [..d/dy..])

with the per-pixel variance planes V_n, V_r (source noise included) and the astrometric rms
(sx, sy) (``S_N = k_n * N``, ``S_R = k_r * R``): unit variance on empty sky, and bright
stars' Poisson noise or a small misregistration no longer make false detections.

The difference's variance plane equals ``s`` on empty sky (its noise is white there) and
carries the stars' source noise, which the filters spread and correlate.  ``variance_plane
= "psf"`` (default) gives what PSF-scale measurements need: ``V(S) / sum P_D^2`` (without
the astrometric term), the variance of a PSF flux at that pixel times sum P_D^2, taken as its
maximum over the (2 r + 1)^2 box around each pixel (r = FWHM_D / 4 rounded, at least 1), so that a PSF fit weighted by
``P / V`` weights a star's core evenly and its error (``sum(P^2 / V)^-1/2``) is right on stars
of any brightness (pulls of constant stars 1.00-1.03 at 2e3-2e5 nJy in either PSF order,
against 0.82-1.22 with per-pixel variances).  ``"pixel"`` gives each pixel's own variance,
``V_D = V_n * k_Dn^2 + V_r * k_Dr^2`` with ``k_Dn^ = P_r^ / sqrt(den)``,
``k_Dr^ = b P_n^ / sqrt(den)``.

Spatially varying PSFs: the image is cut into cores of about ``subimage_size`` pixels; each
is transformed with a margin around it (mirrored beyond the image's edges) with its own
background variances, and only the cores are kept.  With ``psf_interpolation="bilinear"``
(default) the PSFs are evaluated at the cores' corners and every pixel's difference is the
bilinear blend of the four corners' differences, i.e. the filter itself varies bilinearly
over the core (continuous from core to core); the score is that difference filtered with
the core's central P_D and the variances use the central filters.  With ``"constant"`` (the
paper's sub-images) each core uses the PSFs at its centre: bright stars then leave
residuals that grow with the PSF's change across a core.  The difference's PSF is P_D at the
core centres and corners fitted as a :class:`~archive.image.psf.PixelPSF` polynomial.

Masked pixels: NO_DATA (of either input) and non-finite pixels are set to the background
level (the median) in *both* images -- flat, since an interpolation would carry the rim's
noise into the hole, correlated and unaccounted for, and inflate the score along the edge;
the other ``fill_planes`` (cosmic rays, bad pixels, saturation, streaks) are replaced, in the
input that has them only, by a Gaussian-weighted mean of their good neighbours.  So neither
a cosmic ray nor a NO_DATA edge rings through the FFT.  Filled pixels carry no variance into
V_D or the score's variance.  Where an interpolation misses light (a hot template pixel on a
star's core: the template's filter is the wide one and would spread the error over the
star) the filled values are then re-solved by least squares so that the difference around
them is flattest (``refine_masked``; only pixels whose first-order correction is
significant).  The output mask is the OR of both inputs' masks (planes matched by name; the
inputs' DETECTED planes are not carried), not grown; NO_DATA pixels get 0 in the difference
and the score and an infinite variance.  A star cut by a NO_DATA edge can leave
a residual on the pixels right beside the edge.

The flux ratio b can be fitted (``fit_flux_ratio``): on the bright static pixels,
``P_r^ N^ / sqrt(den) = b P_n^ R^ / sqrt(den) + const`` (both sides filtered the same way,
so the relation holds whatever den), solved by clipped least squares over all cores.
``fit_background`` removes each core's median of the difference (a background offset
between the inputs), from the score too.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import time

import numpy as np
import scipy.fft as sfft
from scipy import ndimage, signal

from archive.errors import ValidationError
from archive.image import mask as maskmod
from archive.image.exposure import Exposure
from archive.image.psf import FWHM_PER_SIGMA, PixelPSF, poly_design
from archive.process.diffim.common import centred_fft, mark_border, shared_noise_variance, template_smoothing
from archive.process.diffim.result import DifferenceResult
from archive.process.robust import mad_sigma

log = logging.getLogger(__name__)

#: Planes of either input whose pixels are interpolated over before the transforms.
FILL_PLANES = ("NO_DATA", "BAD", "SAT", "CR", "STREAK")
#: Planes of the inputs that are not carried into the difference's mask (they describe the
#: inputs' own detections, not the difference).
DROP_PLANES = ("DETECTED", "DETECTED_NEGATIVE")


@dataclasses.dataclass
class ZogyConfig:
    """Settings of :func:`zogy_difference`.

    subimage_size: side (px) of the cores the image is cut into, each computed with the PSFs
    at its centre; margin: pixels transformed around each core (each side) so that the
    filters' reach and the FFT's wrap-around stay outside the core (None: kernel_size - 1);
    kernel_size: odd side (px) of the PSF kernels and of the difference's PSF (None: the
    larger of the two PSFs' ``default_size`` over the image); flux_ratio: F_n / F_r, the
    science's flux scale over the template's (1 for two calibrated images); fit_flux_ratio:
    fit it on the bright static pixels instead (from ``flux_ratio`` as the first guess);
    flux_ratio_snr: how bright (in sigma of the filtered template) a pixel must be to enter
    that fit; fit_background: subtract each core's median difference (a background offset
    between the inputs); astrometric_rms: registration error per axis, in
    ``astrometric_rms_unit`` ("px", or "arcsec" with the science's WCS), for the score's
    correction; source_noise: propagate the variance planes (source noise) into the score's
    and the difference's variance (False: background noise only); fill_planes: mask planes of
    either input interpolated over before the transforms (NO_DATA always; see the module
    docstring); variance_plane: "psf" or "pixel" (see the module docstring); refine_masked: re-solve the filled values of pixels masked in one input where
    their first-order correction exceeds refine_sigma (at most refine_max_pixels per core);
    psf_interpolation: "bilinear" (filters interpolated between the PSFs at the cores'
    corners) or "constant" (the PSFs at each core's centre); psf_degree: highest polynomial
    degree of the difference PSF's variation over the image; threads: cores used (0: all)."""

    subimage_size: int = dataclasses.field(default=512, metadata={"min": 64, "max": 8192})
    margin: int | None = dataclasses.field(default=None, metadata={"min": 4, "max": 1024})
    kernel_size: int | None = dataclasses.field(default=None, metadata={"min": 5, "max": 255})
    flux_ratio: float = dataclasses.field(default=1.0, metadata={"min": 1e-6, "max": 1e6})
    fit_flux_ratio: bool = False
    flux_ratio_snr: float = dataclasses.field(default=10.0, metadata={"min": 3.0, "max": 1e4})
    fit_background: bool = False
    astrometric_rms: float = dataclasses.field(default=0.0, metadata={"min": 0.0, "max": 10.0})
    astrometric_rms_unit: str = dataclasses.field(default="px", metadata={"choices": ("px", "arcsec")})
    source_noise: bool = True
    fill_planes: tuple[str, ...] = FILL_PLANES
    refine_masked: bool = True
    refine_sigma: float = dataclasses.field(default=3.0, metadata={"min": 1.0, "max": 100.0})
    refine_max_pixels: int = dataclasses.field(default=1500, metadata={"min": 0, "max": 20000})
    psf_interpolation: str = dataclasses.field(default="bilinear", metadata={"choices": ("bilinear", "constant")})
    variance_plane: str = dataclasses.field(default="psf", metadata={"choices": ("psf", "pixel")})
    psf_degree: int = dataclasses.field(default=2, metadata={"min": 0, "max": 4})
    threads: int = dataclasses.field(default=0, metadata={"min": 0, "max": 256})

    def validate(self) -> None:
        if self.kernel_size is not None and self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        for name, lo, hi in (("subimage_size", 64, 8192), ("margin", 4, 1024), ("kernel_size", 5, 255),
                             ("psf_degree", 0, 4), ("threads", 0, 256)):
            v = getattr(self, name)
            if v is not None and not (lo <= v <= hi):
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
        if not (self.flux_ratio > 0 and math.isfinite(self.flux_ratio)):
            raise ValueError(f"flux_ratio must be finite and > 0, got {self.flux_ratio}")
        if not (self.astrometric_rms >= 0 and math.isfinite(self.astrometric_rms)):
            raise ValueError(f"astrometric_rms must be finite and >= 0, got {self.astrometric_rms}")
        if "NO_DATA" not in self.fill_planes:
            raise ValueError("fill_planes must include NO_DATA (pixels without data are always filled)")
        if self.psf_interpolation not in ("bilinear", "constant"):
            raise ValueError(f"psf_interpolation must be 'bilinear' or 'constant', got {self.psf_interpolation!r}")
        if self.variance_plane not in ("psf", "pixel"):
            raise ValueError(f"variance_plane must be 'psf' or 'pixel', got {self.variance_plane!r}")
        if self.astrometric_rms_unit not in ("px", "arcsec"):
            raise ValueError(f"astrometric_rms_unit must be 'px' or 'arcsec', got {self.astrometric_rms_unit!r}")


# --------------------------------------------------------------------------- small helpers
def _extract(arr: np.ndarray, y0: int, x0: int, fy: int, fx: int, dtype) -> np.ndarray:
    """``arr[y0:y0+fy, x0:x0+fx]`` as a new array, the parts beyond the image mirrored."""
    h, w = arr.shape
    ya, yb, xa, xb = max(y0, 0), min(y0 + fy, h), max(x0, 0), min(x0 + fx, w)
    piece = arr[ya:yb, xa:xb]
    pads = ((ya - y0, y0 + fy - yb), (xa - x0, x0 + fx - xb))
    if any(p for pair in pads for p in pair):
        return np.pad(piece, pads, mode="symmetric").astype(dtype, copy=False)
    return np.array(piece, dtype=dtype, copy=True)


def _fill(images: np.ndarray, bad: np.ndarray, sigma: float = 2.0) -> None:
    """Replace the ``bad`` pixels of each image of the stack ``images`` (k, h, w) in place by
    a Gaussian-weighted mean (sigma px, to 3 sigma) of the good pixels around them; pixels with
    (almost) no good pixel within reach take the median of the good pixels."""
    h, w = bad.shape
    r = int(math.ceil(3.0 * sigma))
    iy, ix = np.nonzero(bad)
    if iy.size <= 0.02 * bad.size:
        # few bad pixels (cosmic rays, bad columns, small holes): gather their neighbourhoods
        off = np.arange(-r, r + 1)
        g = np.exp(-0.5 * (off / sigma) ** 2).astype(np.float32)
        wk = (g[:, None] * g[None, :]).ravel()
        dy = np.repeat(off, off.size)
        dx = np.tile(off, off.size)
        ok = np.zeros(iy.size, bool)
        for s in range(0, iy.size, 20000):
            yy = iy[s:s + 20000, None] + dy
            xx = ix[s:s + 20000, None] + dx
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            yy = np.clip(yy, 0, h - 1)
            xx = np.clip(xx, 0, w - 1)
            wt = np.where(inside & ~bad[yy, xx], wk, np.float32(0))
            den = wt.sum(axis=1)
            good = den > 0.02 * wk.sum()
            ok[s:s + 20000] = good
            for im in images:
                im[iy[s:s + 20000][good], ix[s:s + 20000][good]] = \
                    (wt[good] * im[yy[good], xx[good]]).sum(axis=1) / den[good]
        rest = np.zeros_like(bad)
        rest[iy[~ok], ix[~ok]] = True
    else:
        good = (~bad).astype(np.float32)
        data = np.where(bad[None], np.float32(0), images)
        num = ndimage.gaussian_filter(data, (0, sigma, sigma), mode="mirror", truncate=3.0)
        den = ndimage.gaussian_filter(good, sigma, mode="mirror", truncate=3.0)
        ok = bad & (den > 0.02)
        images[:, ok] = num[:, ok] / den[ok]
        rest = bad & ~ok
    if rest.any():
        # deep in a hole: the images' median level (the background), not a copy of the rim,
        # whose noise would be repeated across the hole and reach the filters beside it
        good = ~bad
        g = good[::2, ::2]
        for im in images:
            im[rest] = np.median(im[::2, ::2][g]) if g.sum() >= 100 else (np.median(im[good]) if good.any() else 0.0)


def _embed(kernels: np.ndarray, shape: tuple[int, int], dtype=np.float32) -> np.ndarray:
    """Kernels ``(k, m, m)`` (or one, ``(m, m)``) centred on element ``m // 2``, placed on arrays
    ``(k, *shape)`` with their centres at [0, 0] (wrapped round), as a transform wants them."""
    kern = np.asarray(kernels)
    if kern.ndim == 2:
        kern = kern[None]
    m = kern.shape[-1]
    h = m // 2
    t = m - h
    out = np.zeros((kern.shape[0],) + tuple(shape), dtype)
    out[:, :t, :t] = kern[:, h:, h:]
    if h:
        out[:, :t, -h:] = kern[:, h:, :h]
        out[:, -h:, :t] = kern[:, :h, h:]
        out[:, -h:, -h:] = kern[:, :h, :h]
    return out


def _rfft_power(xh: np.ndarray, nx: int) -> float:
    """sum_x |x|^2 over the full plane from a real FFT's half plane (Parseval), over the count."""
    p = xh.real ** 2 + xh.imag ** 2
    w = np.full(p.shape[-1], 2.0)
    w[0] = 1.0
    if nx % 2 == 0:
        w[-1] = 1.0
    return float((p * w).sum() / (p.shape[0] * nx))


def _spectral_terms(pn: np.ndarray, pr: np.ndarray, a: float, c: float):
    """|P_n|^2, |P_r|^2, 1 / sqrt(den) and 1 / den on a grid (den floored away from 0)."""
    apn = pn.real ** 2 + pn.imag ** 2
    apr = pr.real ** 2 + pr.imag ** 2
    den = a * apr + c * apn
    np.maximum(den, np.finfo(den.dtype).tiny * 1e6, out=den)
    inv = 1.0 / den
    return apn, apr, np.sqrt(inv), inv


def _median_good(v: np.ndarray, good: np.ndarray) -> float:
    """Median of ``v`` over the ``good`` pixels, on every other row and column when there are
    enough of them (the background level of a variance plane; a quarter of the cost)."""
    g = good[::2, ::2]
    if g.sum() >= 1000:
        return float(np.median(v[::2, ::2][g]))
    return float(np.median(v[good]))


@dataclasses.dataclass
class _Sub:
    """One core: its box (half-open, image px), the transformed region's origin, its centre,
    the keys of the PSF nodes whose filters it uses and, for four nodes (bilinear), the
    position of every transformed column (u) and row (v) between them (0 at the first node)."""

    x0: int
    y0: int
    x1: int
    y1: int
    ex: int
    ey: int
    xc: int
    yc: int
    row: int
    nodes: tuple
    u: np.ndarray | None = None
    v: np.ndarray | None = None

    def weight(self, k: int) -> np.ndarray:
        """Bilinear weight (fy, fx) of node k (0: lower left, 1: lower right, 2: upper left, 3: upper right)."""
        wy = self.v if k >= 2 else 1.0 - self.v
        wx = self.u if k % 2 else 1.0 - self.u
        return wy[:, None] * wx[None, :]


class _Nodes:
    """The PSF kernels of both inputs at the nodes (core centres, or core corners for bilinear
    filters) and their transforms on the cores' FFT grid, made a row of nodes at a time and
    dropped when no core needs them any more."""

    def __init__(self, science: Exposure, template: Exposure, positions: dict, ks: int, fshape):
        self.fshape = fshape
        self.positions = positions
        self.kernels = {k: (np.asarray(science.psf.kernel(x, y, ks), np.float32),
                            np.asarray(template.psf.kernel(x, y, ks), np.float32))
                        for k, (x, y) in positions.items()}
        self.hats: dict = {}
        self.power: dict = {}

    def transform(self, key, workers: int = 1) -> None:
        """The node's P_n^, P_r^ on the FFT grid, and |P_n^|^2, |P_r^|^2."""
        kn, kr = self.kernels[key]
        h = sfft.rfft2(_embed(np.stack([kn, kr]), self.fshape), workers=workers)
        self.hats[key] = h
        self.power[key] = h.real ** 2 + h.imag ** 2

    def central(self, sub: _Sub) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The core's kernels at its centre (the mean of its nodes': bilinear interpolation)
        and their transform (the mean of the nodes' transforms)."""
        ks = [self.kernels[k] for k in sub.nodes]
        hs = [self.hats[k] for k in sub.nodes]
        if len(ks) == 1:
            return ks[0][0], ks[0][1], hs[0]
        w = np.float32(1.0 / len(ks))
        h = hs[0] * w
        for other in hs[1:]:
            h += other * w
        return (sum(k[0] for k in ks) * w, sum(k[1] for k in ks) * w, h)


class _Inputs:
    """The two exposures' pixel planes and the per-core preparation shared by both passes.

    ``bad_n`` / ``bad_r``: pixels to fill in the science / the template only (their own
    fill planes); ``both``: pixels filled in both (NO_DATA of either, non-finite values)."""

    def __init__(self, science: Exposure, template: Exposure, bad_n, bad_r, both, fshape: tuple[int, int]):
        self.sci, self.tpl, self.fshape = science, template, fshape
        self.bad_n, self.bad_r, self.both = bad_n, bad_r, both

    def prepare(self, sub: _Sub, with_variance: bool):
        """Filled N, R (float32), their variance planes (0 where filled), the masks
        (bad_n, bad_r, both) and the background variances of the transformed region, or None
        when no pixel of the core is good in both."""
        fy, fx = self.fshape
        both = _extract(self.both, sub.ey, sub.ex, fy, fx, bool)
        bad_n = _extract(self.bad_n, sub.ey, sub.ex, fy, fx, bool)
        bad_r = _extract(self.bad_r, sub.ey, sub.ex, fy, fx, bool)
        fill_n = bad_n | both
        fill_r = bad_r | both
        good = ~(fill_n | fill_r)
        if not good[sub.y0 - sub.ey:sub.y1 - sub.ey, sub.x0 - sub.ex:sub.x1 - sub.ex].any():
            return None
        img = np.empty((2, fy, fx), np.float32)
        img[0] = _extract(self.sci.image, sub.ey, sub.ex, fy, fx, np.float32)
        img[1] = _extract(self.tpl.image, sub.ey, sub.ex, fy, fx, np.float32)
        var = np.empty((2, fy, fx), np.float32)
        var[0] = _extract(self.sci.variance, sub.ey, sub.ex, fy, fx, np.float32)
        var[1] = _extract(self.tpl.variance, sub.ey, sub.ex, fy, fx, np.float32)
        s2n = _median_good(var[0], good)
        s2r = _median_good(var[1], good)
        # pixels masked in one input: interpolated from their neighbours in that input
        for k, f in ((0, fill_n), (1, fill_r)):
            if (f & ~both).any():
                _fill(img[k:k + 1], f)
        # no data: the background level, flat -- an interpolation would carry the rim's noise
        # into the hole, correlated and unaccounted for, and inflate the score along its edge
        if both.any():
            g = good[::2, ::2]
            for k in range(2):
                img[k][both] = np.median(img[k][::2, ::2][g]) if g.sum() >= 100 else np.median(img[k][good])
        var[0][fill_n] = 0.0
        var[1][fill_r] = 0.0
        return img, var if with_variance else None, (bad_n & ~fill_r, bad_r & ~fill_n, ~good), s2n, s2r


# --------------------------------------------------------------------------- masked pixels
def _centred(kernel_wrapped: np.ndarray, m: int) -> np.ndarray:
    """The central m x m (m odd) of a kernel stored with its centre at [0, 0] (wrapped)."""
    h = m // 2
    return np.roll(kernel_wrapped, (h, h), axis=(-2, -1))[..., :m, :m]


def _scatter_add(arr: np.ndarray, py: np.ndarray, px: np.ndarray, windows: np.ndarray) -> None:
    """arr[py + i - h, px + j - h] += windows[:, i, j] (windows (n, m, m)); parts off the array dropped."""
    fy, fx = arr.shape
    m = windows.shape[-1]
    off = np.arange(m) - m // 2
    yy = py[:, None, None] + off[None, :, None]
    xx = px[:, None, None] + off[None, None, :]
    ok = (yy >= 0) & (yy < fy) & (xx >= 0) & (xx < fx)
    flat = np.bincount((yy * fx + xx)[ok], weights=windows[ok], minlength=fy * fx)
    arr += flat.reshape(fy, fx).astype(arr.dtype, copy=False)


def _refine_masked(d, score, sn_sr, only_n, only_r, region, kd, kscore, s: float, sigma: float,
                   max_pixels: int) -> int:
    """Pixels masked in one input only (a cosmic ray, a bad column, a saturated core) were
    interpolated from their neighbours; where that interpolation misses a star's light the
    error would show around them in the difference.  Choose their values instead so that the
    difference around them is flattest: least squares of sum_x D(x)^2 over the values of the
    masked pixels whose first-order estimate ``(K_p * D)(p) / sum K^2`` is significant
    (> ``sigma``), with ``K_p`` the difference's response to a change of that pixel (k_Dn for
    the science, -k_Dr for the template).  Updates D, the score numerator (and S_N, S_R) in
    place; returns the number of pixels changed.

    ``kd``: (2, m, m) D responses [k_Dn, -k_Dr]; ``kscore``: (2, w, w) score responses
    [k_n, -k_r]; ``region``: the transformed pixels whose change matters (the core and the
    filters' reach around it)."""
    fy, fx = d.shape
    m = kd.shape[-1]
    h = m // 2
    inner = np.zeros((fy, fx), bool)
    inner[h:fy - h, h:fx - h] = True
    inner &= region
    py_n, px_n = np.nonzero(only_n & inner)
    py_r, px_r = np.nonzero(only_r & inner)
    if py_n.size + py_r.size == 0:
        return 0
    py = np.concatenate([py_n, py_r])
    px = np.concatenate([px_n, px_r])
    t = np.concatenate([np.zeros(py_n.size, int), np.ones(py_r.size, int)])
    off = np.arange(m) - h
    # first-order estimate: the correlation of D with each pixel's response, in sigma
    g = np.empty(py.size)
    for s0 in range(0, py.size, 4096):
        sl = slice(s0, s0 + 4096)
        win = d[py[sl, None, None] + off[None, :, None], px[sl, None, None] + off[None, None, :]]
        g[sl] = (win * kd[t[sl]]).sum(axis=(1, 2))
    k2 = (kd.astype(np.float64) ** 2).sum(axis=(1, 2))
    z = g / np.sqrt(s * k2[t])
    sel = np.flatnonzero(np.abs(z) > sigma)
    if sel.size == 0:
        return 0
    if sel.size > max_pixels:
        sel = sel[np.argsort(-np.abs(z[sel]))[:max_pixels]]
    py, px, t, g = py[sel], px[sel], t[sel], g[sel]
    # normal matrix: M_pq = sum_y K_p(y) K_q(y + p - q), from the kernels' cross-correlations
    kd64 = kd.astype(np.float64)
    cc = np.empty((2, 2, 2 * m - 1, 2 * m - 1))
    for a in range(2):
        for b in range(2):
            cc[a, b] = signal.fftconvolve(kd64[b], kd64[a][::-1, ::-1])
    dy = py[:, None] - py[None, :]
    dx = px[:, None] - px[None, :]
    near = (np.abs(dy) < m) & (np.abs(dx) < m)
    mat = np.where(near, cc[t[:, None], t[None, :], np.clip(dy + m - 1, 0, 2 * m - 2),
                            np.clip(dx + m - 1, 0, 2 * m - 2)], 0.0)
    mat[np.diag_indices_from(mat)] *= 1.0 + 1e-6
    delta = np.linalg.solve(mat, -g)
    _scatter_add(d, py, px, delta[:, None, None] * kd64[t])
    _scatter_add(score, py, px, delta[:, None, None] * kscore[t].astype(np.float64))
    if sn_sr is not None:
        for k in range(2):
            on = t == k
            if on.any():  # S_N = k_n * N, S_R = k_r * R: a change of R by delta adds delta k_r
                sign = 1.0 if k == 0 else -1.0
                _scatter_add(sn_sr[k], py[on], px[on], sign * delta[on, None, None] * kscore[k].astype(np.float64))
    return int(sel.size)


# --------------------------------------------------------------------------- one core
def _core_difference(inp: _Inputs, sub: _Sub, nodes: _Nodes, b: float, ks: int, gsmall: int, sigma_ast: float,
                     cfg: ZogyConfig, workers: int, out: dict) -> dict | None:
    """Difference, its variance and the corrected score of one core, written into ``out``'s
    arrays; returns the core's record (noise levels, zero points, P_D) or None when empty."""
    prep = inp.prepare(sub, cfg.source_noise)
    if prep is None:
        return None
    img, var, (only_n, only_r, filled), s2n, s2r = prep
    fy, fx = inp.fshape
    s = s2n + b * b * s2r
    a, c = s2n / s, b * b * s2r / s
    a32, c32, b32 = np.float32(a), np.float32(c), np.float32(b)
    cy = slice(sub.y0 - sub.ey, sub.y1 - sub.ey)
    cx = slice(sub.x0 - sub.ex, sub.x1 - sub.ex)
    rfft2 = sfft.rfft2
    irfft2 = sfft.irfft2
    kn_c, kr_c, pc = nodes.central(sub)

    # -- kernels at the centre on a small grid (real space): P_D and the filters of the variances
    ps = rfft2(_embed(np.stack([kn_c, kr_c]), (gsmall, gsmall), np.float64), workers=1)
    apn_s, apr_s, isq_s, iden_s = _spectral_terms(ps[0], ps[1], a, c)
    small = np.stack([ps[1] * ps[0] * isq_s,  # P_D
                      ps[1] * isq_s, b * ps[0] * isq_s,  # k_Dn, k_Dr
                      np.conj(ps[0]) * apr_s * iden_s, b * np.conj(ps[1]) * apn_s * iden_s])  # k_n, k_r
    ksm = irfft2(small, s=(gsmall, gsmall), workers=1)
    psf_nodes = [([sub.xc, sub.yc], _centred(ksm[0], ks))]
    if len(sub.nodes) > 1:  # P_D at the corners too, so that the fitted PSF reaches the image's edges
        pk = rfft2(_embed(np.stack([k for key in sub.nodes for k in nodes.kernels[key]]), (gsmall, gsmall),
                          np.float64), workers=1)
        pdh = np.stack([pk[2 * i + 1] * pk[2 * i] * _spectral_terms(pk[2 * i], pk[2 * i + 1], a, c)[2]
                        for i in range(len(sub.nodes))])
        for key, k in zip(sub.nodes, irfft2(pdh, s=(gsmall, gsmall), workers=1)):
            psf_nodes.append((list(nodes.positions[key]), _centred(k, ks)))

    # -- the difference: the filters at the centre, or blended bilinearly from the corners'
    fh = rfft2(img, workers=workers)  # N^, R^
    pn, pr = pc[0], pc[1]
    apn, apr, isq, iden = _spectral_terms(pn, pr, a32, c32)
    if len(sub.nodes) == 1:
        d = irfft2((pr * fh[0] - b32 * pn * fh[1]) * isq, s=(fy, fx), workers=workers)
    else:
        d = np.zeros((fy, fx), np.float32)
        for k, key in enumerate(sub.nodes):
            hk, pk = nodes.hats[key], nodes.power[key]
            den = a32 * pk[1]
            den += c32 * pk[0]
            np.maximum(den, np.float32(1e-30), out=den)
            isq_k = 1.0 / np.sqrt(den)
            num = hk[1] * fh[0]
            num -= b32 * hk[0] * fh[1]
            num *= isq_k
            d += sub.weight(k) * irfft2(num, s=(fy, fx), workers=workers)
    # -- the score S = D * P_D(-x) = k_n * N - k_r * R
    kn_h = np.conj(pn) * (apr * iden)
    kr_h = np.conj(pr) * (b32 * apn * iden)
    sn_sr = None
    if sigma_ast > 0:
        sn_sr = irfft2(np.stack([kn_h * fh[0], kr_h * fh[1]]), s=(fy, fx), workers=workers)
    if len(sub.nodes) == 1:
        score = (sn_sr[0] - sn_sr[1] if sn_sr is not None
                 else irfft2(kn_h * fh[0] - kr_h * fh[1], s=(fy, fx), workers=workers))
    else:
        score = irfft2(rfft2(d, workers=workers) * np.conj(pr * pn * isq), s=(fy, fx), workers=workers)
    del fh

    # -- masked pixels of one input: values that leave the difference flattest around them
    n_refined = 0
    if cfg.refine_masked and (only_n.any() or only_r.any()):
        kd = np.stack([_centred(ksm[1], ks), -_centred(ksm[2], ks)]).astype(np.float32)
        kscore = np.stack([_centred(ksm[3], gsmall - 1 + gsmall % 2),
                           -_centred(ksm[4], gsmall - 1 + gsmall % 2)]).astype(np.float32)
        region = np.zeros((fy, fx), bool)
        reach = ks
        region[max(cy.start - reach, 0):cy.stop + reach, max(cx.start - reach, 0):cx.stop + reach] = True
        n_refined = _refine_masked(d, score, sn_sr, only_n, only_r, region, kd, kscore, s,
                                   cfg.refine_sigma, cfg.refine_max_pixels)

    # -- variances: of the score (exact), and of the difference (white noise of variance s on
    # empty sky).  "pixel": each pixel's own variance.  "psf" (default): the variance that
    # PSF-scale measurements see, var(S) / sum P_D^2 (the variance of a PSF flux at that pixel
    # times sum P_D^2, including the correlation that the filters give the stars' source
    # noise), taken as its maximum over the 3 x 3 (FWHM_D / 4 px radius) around each pixel so
    # that a P / V weighted PSF fit on a star weights its core evenly and its error is right.
    sum_pd2 = _rfft_power(pr * pn * isq, fx)
    fwhm_d = FWHM_PER_SIGMA / math.sqrt(4.0 * math.pi * sum_pd2)  # of the Gaussian with this sum P^2
    psf_flat_radius = max(1, int(round(fwhm_d / 4.0)))
    if cfg.source_noise:
        pixel = cfg.variance_plane == "pixel"
        which = [0, 1, 2, 3] if pixel else [2, 3]  # k_Dn, k_Dr, k_n, k_r
        spectra = [pr * isq, b32 * pn * isq, kn_h, kr_h]
        sq = ksm[1:][which] ** 2
        # the small-grid kernels' squares scaled to the full grid's exact power (Parseval)
        exact = np.array([_rfft_power(spectra[i], fx) for i in which])
        sq *= (exact / np.maximum(sq.sum(axis=(1, 2)), 1e-300))[:, None, None]
        kh = rfft2(_embed(np.fft.fftshift(sq, axes=(1, 2)), (fy, fx)), workers=workers)
        vh = rfft2(var, workers=workers)
        kh[0::2] *= vh[0]
        kh[1::2] *= vh[1]
        kh[0::2] += kh[1::2]
        vv = irfft2(kh[0::2], s=(fy, fx), workers=workers)
        var_s = np.maximum(vv[-1][cy, cx], 0.0)
        if pixel:
            var_d = np.maximum(vv[0][cy, cx], 0.0)
        else:
            r = psf_flat_radius
            region = vv[-1][cy.start - r:cy.stop + r, cx.start - r:cx.stop + r]
            var_d = ndimage.maximum_filter(np.maximum(region, 0.0), size=2 * r + 1)[r:region.shape[0] - r,
                                                                                   r:region.shape[1] - r]
            var_d /= np.float32(sum_pd2)
    else:
        fs = _rfft_power(kn_h, fx) * s2n + _rfft_power(kr_h, fx) * s2r
        var_d = np.full((sub.y1 - sub.y0, sub.x1 - sub.x0), s, np.float32)  # Parseval: exactly s
        var_s = np.full_like(var_d, fs)
    if sigma_ast > 0:
        ys, xs = slice(cy.start - 1, cy.stop + 1), slice(cx.start - 1, cx.stop + 1)
        for plane in sn_sr:
            gy, gx = np.gradient(plane[ys, xs])
            var_s = var_s + np.float32(sigma_ast ** 2) * (gx[1:-1, 1:-1] ** 2 + gy[1:-1, 1:-1] ** 2)

    dcore = d[cy, cx]
    scoref = score[cy, cx]
    offset = 0.0
    if cfg.fit_background:
        g = ~filled[cy, cx]
        offset = _median_good(dcore, g)
        dcore = dcore - np.float32(offset)
        scoref = scoref - np.float32(offset)  # a constant in D adds itself times sum(P_D) = 1 to S
    floor = np.float32(1e-12 * s)
    oy, ox = slice(sub.y0, sub.y1), slice(sub.x0, sub.x1)
    out["image"][oy, ox] = dcore
    out["variance"][oy, ox] = np.maximum(var_d, floor)
    out["score"][oy, ox] = scoref / np.sqrt(np.maximum(var_s, floor))
    return {
        "box": [sub.x0, sub.y0, sub.x1, sub.y1],
        "center": [sub.xc, sub.yc],
        "sigma_science": math.sqrt(s2n),
        "sigma_template": math.sqrt(s2r),
        "sigma_difference": math.sqrt(s),
        "zero_point_d": b / math.sqrt(s),  # the paper's F_D (with F_r = 1)
        "psf_d_sum_sq": float((ksm[0] ** 2).sum()),  # S = flux * this at a point source; sd(S) = sqrt(s this)
        "background_offset": offset,
        "refined_pixels": n_refined,
        "_psf_d": [(xy, k / k.sum()) for xy, k in psf_nodes],
    }


def _core_flux_ratio_pixels(inp: _Inputs, sub: _Sub, nodes: _Nodes, b0: float, snr: float, workers: int):
    """(x, y) = (P_n^ R^, P_r^ N^) / sqrt(den) at the core's bright good pixels (the centre's
    PSFs), for the fit of y = b x + const."""
    prep = inp.prepare(sub, False)
    if prep is None:
        return None
    img, _, (_, _, filled), s2n, s2r = prep
    fy, fx = inp.fshape
    s = s2n + b0 * b0 * s2r
    fh = sfft.rfft2(img, workers=workers)
    pk = nodes.central(sub)[2]
    isq = _spectral_terms(pk[0], pk[1], np.float32(s2n / s), np.float32(b0 * b0 * s2r / s))[2]
    dn, dr = sfft.irfft2(np.stack([pk[1] * fh[0] * isq, pk[0] * fh[1] * isq]), s=(fy, fx), workers=workers)
    cy = slice(sub.y0 - sub.ey, sub.y1 - sub.ey)
    cx = slice(sub.x0 - sub.ex, sub.x1 - sub.ex)
    near_bad = ndimage.binary_dilation(filled, iterations=3)[cy, cx]
    x, y = dr[cy, cx], dn[cy, cx]
    noise = float(mad_sigma(x[~near_bad]))
    sel = ~near_bad & (x > snr * noise)
    return x[sel].astype(np.float64), y[sel].astype(np.float64)


def _fit_ratio(x: np.ndarray, y: np.ndarray, clip: float = 4.0, n_iter: int = 6) -> tuple[float, float, float, int]:
    """Clipped least squares of y = b x + g: (b, its error, g, pixels kept)."""
    keep = np.ones(x.size, bool)
    b = g = err = float("nan")
    for _ in range(n_iter):
        a = np.stack([x[keep], np.ones(keep.sum())], axis=1)
        sol, *_ = np.linalg.lstsq(a, y[keep], rcond=None)
        b, g = float(sol[0]), float(sol[1])
        r = y - b * x - g
        sig = float(mad_sigma(r[keep], center=0.0))
        new = np.abs(r) < clip * sig
        cov = np.linalg.inv(a.T @ a) * sig ** 2
        err = math.sqrt(cov[0, 0])
        if np.array_equal(new, keep) or new.sum() < 10:
            break
        keep = new
    return b, err, g, int(keep.sum())


# --------------------------------------------------------------------------- the public function
def _check(science: Exposure, template: Exposure) -> None:
    if not isinstance(science, Exposure) or not isinstance(template, Exposure):
        raise ValidationError("zogy_difference: science and template must be Exposures")
    if science.shape != template.shape:
        raise ValidationError(f"zogy_difference: the template's shape {template.shape} differs from the science "
                              f"image's {science.shape}; warp the template onto the science grid first")
    for name, e in (("science", science), ("template", template)):
        if e.psf is None:
            raise ValidationError(f"zogy_difference: the {name} exposure has no PSF")
        v = e.variance
        if not np.any(np.isfinite(v) & (v > 0)):
            raise ValidationError(f"zogy_difference: the {name} exposure's variance plane has no finite "
                                  f"positive value")


def _plane_bits(planes: dict[str, int], names) -> int:
    bits = 0
    for name in names:
        if name in planes:
            bits |= 1 << planes[name]
    return bits


def _merged_mask(science: Exposure, template: Exposure) -> tuple[np.ndarray, dict[str, int]]:
    """OR of both masks in the science's planes (template planes matched by name, new ones
    added), the DROP_PLANES left out."""
    planes = dict(science.mask_planes)
    keep = _plane_bits(science.mask_planes, [n for n in science.mask_planes if n not in DROP_PLANES])
    out = science.mask & np.int32(keep)
    tm = template.mask
    if not tm.any():
        return out, planes
    if all(science.mask_planes.get(n) == bit for n, bit in template.mask_planes.items()):
        out |= tm & np.int32(_plane_bits(template.mask_planes,
                                         [n for n in template.mask_planes if n not in DROP_PLANES]))
        return out, planes
    present = np.bitwise_or.reduce(tm.ravel())
    for name, bit in template.mask_planes.items():
        if name in DROP_PLANES or not (present >> bit) & 1:
            continue
        ob = maskmod.add_plane(planes, name)
        out |= (((tm >> bit) & 1) << ob).astype(np.int32)
    return out, planes


def _layout(h: int, w: int, core: int) -> tuple[np.ndarray, np.ndarray]:
    ny, nx = max(1, math.ceil(h / core)), max(1, math.ceil(w / core))
    return (np.round(np.linspace(0, h, ny + 1)).astype(int), np.round(np.linspace(0, w, nx + 1)).astype(int))


def _map(fn, items, pool):
    if pool is None or len(items) <= 1:
        return [fn(it) for it in items]
    return list(pool.map(fn, items))


def _by_rows(subs: list[_Sub], nodes: _Nodes, fn, pool, workers: int) -> list:
    """fn(sub) for every core, a row of cores at a time, with the node transforms the row needs
    made first (in parallel) and dropped once no later row needs them."""
    results: list = [None] * len(subs)
    rows = sorted({s.row for s in subs})
    for j in rows:
        idx = [i for i, s in enumerate(subs) if s.row == j]
        need = {k for i in idx for k in subs[i].nodes}
        _map(lambda k: nodes.transform(k, workers), [k for k in sorted(need) if k not in nodes.hats], pool)
        for i, r in zip(idx, _map(fn, [subs[i] for i in idx], pool)):
            results[i] = r
        later = {k for s in subs if s.row > j for k in s.nodes}
        for k in [k for k in nodes.hats if k not in later]:
            del nodes.hats[k], nodes.power[k]
    return results


def shared_noise_factor(psf_science: np.ndarray, psf_template: np.ndarray, var_science: float,
                        var_template: float, b: float = 1.0) -> float:
    """What of the science's noise shared with the template cancels in a PSF fit on D, per unit
    of their per-pixel covariance (1: all of it).

    The science's noise n enters D as P_r^ n / sqrt(den) and, through the template (which
    holds it smoothed by G = P_r^ / P_n^, |G| <= 1), as -P_n^ G n / sqrt(den) (b cancels: the
    template's share is in its own units); the cross term of a fit with P_D then scales the
    covariance by  sum |P_D|^2 Re(P_r conj(P_n G)) / den / sum |P_D|^2."""
    n = 1 << int(math.ceil(math.log2(4 * max(psf_science.shape[0], psf_template.shape[0]))))
    pn = centred_fft(psf_science / psf_science.sum(), n)
    pr = centred_fft(psf_template / psf_template.sum(), n)
    s = var_science + b * b * var_template
    den = np.maximum(var_science / s * np.abs(pr) ** 2 + b * b * var_template / s * np.abs(pn) ** 2, 1e-300)
    g = template_smoothing(pn, pr)
    pd2 = np.abs(pr * pn) ** 2 / den
    cross = (pr * np.conj(pn * g)).real / den
    return float(np.clip((pd2 * cross).sum() / pd2.sum(), 0.0, 1.0))


def zogy_difference(science: Exposure, template: Exposure, config: ZogyConfig | None = None,
                    covariance: np.ndarray | None = None) -> DifferenceResult:
    """The ZOGY proper difference of ``science`` minus ``template`` (same grid, same flux units,
    both with variance planes, masks and PSFs), its PSF and the corrected score.

    Returns a :class:`DifferenceResult` with method ``"zogy"``: ``difference`` in the
    science's flux units (a new point source of flux f shows with flux f under
    ``difference.psf``), its variance plane (``sigma_difference^2`` of the core on empty sky,
    more on stars), the OR of both masks; ``score``: S_corr, unit variance on empty sky,
    positive where the science is brighter; ``metadata``: the flux ratio, the astrometric rms
    used (px), kernel size, margin, FFT shape and one record per core (box, centre, background
    sigmas of both inputs and of the difference, F_D, ``psf_d_sum_sq`` = sum P_D^2, background
    offset, masked pixels re-solved).  The difference's values within ``edge_reach_px`` of
    NO_DATA pixels were computed partly from filled pixels: a star cut by the NO_DATA edge can
    leave a residual there, which a detection step should flag as an edge.

    ``covariance``: per pixel (flux units squared), the covariance of the two images' noise
    where the science is one of the template's inputs (as for
    :func:`archive.process.diffim.alard_lupton.subtract`): the variance plane is lowered by
    twice it times :func:`shared_noise_factor` (what of it cancels in a PSF fit on D).
    """
    cfg = config or ZogyConfig()
    try:
        cfg.validate()
    except ValueError as exc:
        raise ValidationError(f"ZogyConfig: {exc}") from None
    _check(science, template)
    t_start = time.perf_counter()
    h, w = science.shape
    threads = cfg.threads or os.cpu_count() or 1

    # -- masks: the output's, and which pixels each input has to be filled at
    mask, planes = _merged_mask(science, template)
    no_data_bit = maskmod.add_plane(planes, "NO_DATA")
    fin_n = np.isfinite(science.image) & np.isfinite(science.variance) & (science.variance >= 0)
    fin_r = np.isfinite(template.image) & np.isfinite(template.variance) & (template.variance >= 0)
    both = ~(fin_n & fin_r)
    mask[both] |= np.int32(1 << no_data_bit)
    both |= science.mask_of("NO_DATA") if "NO_DATA" in science.mask_planes else False
    both |= template.mask_of("NO_DATA") if "NO_DATA" in template.mask_planes else False
    own = [p for p in cfg.fill_planes if p != "NO_DATA"]
    bad_n = (science.mask & np.int32(_plane_bits(science.mask_planes, own))) != 0
    bad_r = (template.mask & np.int32(_plane_bits(template.mask_planes, own))) != 0

    # -- the cores, their transformed regions and the PSF nodes
    ybounds, xbounds = _layout(h, w, cfg.subimage_size)
    ny, nx = len(ybounds) - 1, len(xbounds) - 1
    cxs = (xbounds[:-1] + xbounds[1:] - 1) // 2
    cys = (ybounds[:-1] + ybounds[1:] - 1) // 2
    bilinear = cfg.psf_interpolation == "bilinear"
    if bilinear:  # nodes on the cores' corners (pixel edges)
        positions = {(j, i): (float(xbounds[i]) - 0.5, float(ybounds[j]) - 0.5)
                     for j in range(ny + 1) for i in range(nx + 1)}
    else:
        positions = {(j, i): (float(cxs[i]), float(cys[j])) for j in range(ny) for i in range(nx)}
    px = np.array([p[0] for p in positions.values()])
    py = np.array([p[1] for p in positions.values()])
    if cfg.kernel_size is not None:
        ks = cfg.kernel_size
    else:
        ks = max(int(science.psf.default_size(px, py)), int(template.psf.default_size(px, py)))
        ks += 1 - ks % 2
    # D reaches ks // 2 px, and the score (D filtered with P_D) as far again: the margin holds both
    margin = cfg.margin if cfg.margin is not None else 2 * (ks // 2)
    fshape = (sfft.next_fast_len(int(np.diff(ybounds).max()) + 2 * margin, real=True),
              sfft.next_fast_len(int(np.diff(xbounds).max()) + 2 * margin, real=True))
    gsmall = min(sfft.next_fast_len(2 * ks + 1, real=True), *fshape)
    if cfg.astrometric_rms_unit == "arcsec" and cfg.astrometric_rms > 0:
        if science.wcs is None:
            raise ValidationError("ZogyConfig.astrometric_rms in arcsec needs the science exposure's WCS")
        sigma_ast = cfg.astrometric_rms / science.pixel_scale()
    else:
        sigma_ast = float(cfg.astrometric_rms)
    nodes = _Nodes(science, template, positions, ks, fshape)
    subs = []
    for j in range(ny):
        for i in range(nx):
            x0, x1, y0, y1 = int(xbounds[i]), int(xbounds[i + 1]), int(ybounds[j]), int(ybounds[j + 1])
            ex, ey = x0 - margin, y0 - margin
            if bilinear:
                u = ((ex + np.arange(fshape[1])) - (x0 - 0.5)) / (x1 - x0)
                v = ((ey + np.arange(fshape[0])) - (y0 - 0.5)) / (y1 - y0)
                subs.append(_Sub(x0, y0, x1, y1, ex, ey, int(cxs[i]), int(cys[j]), j,
                                 ((j, i), (j, i + 1), (j + 1, i), (j + 1, i + 1)),
                                 u.astype(np.float32), v.astype(np.float32)))
            else:
                subs.append(_Sub(x0, y0, x1, y1, ex, ey, int(cxs[i]), int(cys[j]), j, ((j, i),)))
    inp = _Inputs(science, template, bad_n, bad_r, both, fshape)
    pool_threads = min(threads, nx)
    fft_workers = max(1, threads // max(pool_threads, 1))
    pool = concurrent.futures.ThreadPoolExecutor(pool_threads) if pool_threads > 1 else None
    try:
        # -- the flux ratio
        b = float(cfg.flux_ratio)
        ratio_meta: dict = {"flux_ratio_fitted": False}
        if cfg.fit_flux_ratio:
            pairs = _by_rows(subs, nodes, lambda sb: _core_flux_ratio_pixels(inp, sb, nodes, b, cfg.flux_ratio_snr,
                                                                             fft_workers), pool, fft_workers)
            pairs = [p for p in pairs if p is not None and p[0].size]
            n_px = sum(p[0].size for p in pairs)
            if n_px >= 50:
                bf, berr, _, n_kept = _fit_ratio(np.concatenate([p[0] for p in pairs]),
                                                 np.concatenate([p[1] for p in pairs]))
                if math.isfinite(bf) and bf > 0:
                    b = bf
                    ratio_meta = {"flux_ratio_fitted": True, "flux_ratio_error": berr, "flux_ratio_pixels": n_kept}
            else:
                log.warning("zogy: only %d bright static pixels; flux ratio kept at %g", n_px, b)
                ratio_meta = {"flux_ratio_fitted": False, "flux_ratio_pixels": n_px}

        # -- the difference, core by core
        out = {"image": np.zeros((h, w), np.float32), "variance": np.full((h, w), np.inf, np.float32),
               "score": np.zeros((h, w), np.float32)}
        records = _by_rows(subs, nodes, lambda sb: _core_difference(inp, sb, nodes, b, ks, gsmall, sigma_ast, cfg,
                                                                    fft_workers, out), pool, fft_workers)
    finally:
        if pool is not None:
            pool.shutdown()
    no_data = (mask & np.int32(1 << no_data_bit)) != 0
    no_data |= both
    mask[no_data] |= np.int32(1 << no_data_bit)
    out["image"][no_data] = 0.0
    out["variance"][no_data] = np.inf
    out["score"][no_data] = 0.0
    uncovered = ~np.isfinite(out["variance"])
    mask[uncovered] |= np.int32(1 << no_data_bit)
    # each image is convolved with the other's PSF, which has nothing beyond the frame: where
    # a PSF reaches past it the difference is biased (a star at the border): EDGE there
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    kn_c, kr_c = science.psf.kernel(cx, cy, ks), template.psf.kernel(cx, cy, ks)  # the PSFs at the centre
    maskmod.add_plane(planes, "EDGE")
    bx, by = mark_border(mask, planes, [kn_c, kr_c])

    # -- the difference's PSF: P_D at the core centres (and corners) fitted by a polynomial
    done = [r for r in records if r is not None]
    if not done:
        raise ValidationError("zogy_difference: no pixel is covered by both the science and the template")
    psf_nodes = [pair for r in done for pair in r.pop("_psf_d")]
    centres = np.array([xy for xy, _ in psf_nodes], float)
    kernels = np.stack([k for _, k in psf_nodes])
    degree = min(cfg.psf_degree, len(np.unique(centres[:, 0])) - 1, len(np.unique(centres[:, 1])) - 1)
    while degree > 0 and len(centres) < (degree + 1) * (degree + 2) // 2:
        degree -= 1
    bb = (0.0, 0.0, float(w - 1), float(h - 1))
    design = poly_design(centres[:, 0], centres[:, 1], degree, bb)
    sol, *_ = np.linalg.lstsq(design, kernels.reshape(len(centres), -1).astype(np.float64), rcond=None)
    psf_d = PixelPSF(sol.reshape(-1, ks, ks), None, oversample=1, degree=degree, bbox=bb)

    rho = None
    if covariance is not None:
        vn = float(np.median([r["sigma_science"] for r in done])) ** 2
        vr = float(np.median([r["sigma_template"] for r in done])) ** 2
        rho = shared_noise_factor(kn_c, kr_c, vn, vr, b)
        good = np.isfinite(out["variance"])
        out["variance"] = np.where(good, shared_noise_variance(np.where(good, out["variance"], 0.0), rho * covariance),
                                   np.inf).astype(np.float32)
    diff = Exposure(out["image"], mask, out["variance"],
                    wcs=science.wcs.deepcopy() if science.wcs is not None else None, psf=psf_d,
                    photo_calib=science.photo_calib, info=science.info.copy(), mask_planes=planes, xy0=science.xy0)
    elapsed = time.perf_counter() - t_start
    meta = {
        "flux_ratio": b,
        **ratio_meta,
        "astrometric_rms_px": sigma_ast,
        "source_noise": cfg.source_noise,
        "psf_interpolation": cfg.psf_interpolation,
        "kernel_size": ks,
        "edge_reach_px": ks // 2,
        "edge_border_px": [int(bx), int(by)],
        "shared_noise_factor": rho,
        "variance_plane": cfg.variance_plane,
        "margin": margin,
        "fft_shape": list(fshape),
        "n_subimages": len(subs),
        "psf_degree": degree,
        "sigma_difference": float(np.median([r["sigma_difference"] for r in done])),
        "refined_pixels": int(sum(r["refined_pixels"] for r in done)),
        "subimages": done,
        "seconds": elapsed,
    }
    log.debug("zogy: %dx%d in %d cores (FFT %s, %s filters), b = %.5g, %.2f s", w, h, len(subs), fshape,
              cfg.psf_interpolation, b, elapsed)
    return DifferenceResult(difference=diff, score=out["score"], method="zogy", metadata=meta)
