"""PSF models as seen by the measurement code: vectorized stamps at many positions.

A *stamp PSF* is any object with

``stamps(x, y, size, xc=None, yc=None) -> ndarray (n, size, size)``

returning the PSF (unit total flux, pixel-integrated) centred at the fractional
positions ``(x, y)`` and sampled on the pixel grid of stamps centred on the integer
pixels ``(xc, yc)`` (default: ``round(x), round(y)``), and ``fwhm(x=None, y=None)``
in pixels.

:class:`GaussianPsf` is analytic. :class:`GridStampPsf` wraps any PSF that can draw
a centred image at a position (the image model's ``psf.image(x, y, size)``): it
samples that PSF on a coarse grid over the detector once, and shifts the nearest
grid kernel to each fractional position with separable Lanczos-3 interpolation,
all sources at once.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
from scipy.special import erf

from archive.errors import ValidationError

log = logging.getLogger(__name__)

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


class StampPsf(Protocol):
    """What measurement needs from a PSF (see module docstring)."""

    def stamps(self, x: np.ndarray, y: np.ndarray, size: int, xc: np.ndarray | None = None,
               yc: np.ndarray | None = None) -> np.ndarray: ...

    def fwhm(self, x: float | None = None, y: float | None = None) -> float: ...


def _centres(x, y, xc, yc):
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    xc = np.rint(x).astype(np.int64) if xc is None else np.atleast_1d(np.asarray(xc, dtype=np.int64))
    yc = np.rint(y).astype(np.int64) if yc is None else np.atleast_1d(np.asarray(yc, dtype=np.int64))
    return x, y, xc, yc


class GaussianPsf:
    """Elliptical Gaussian PSF, pixel-integrated.

    ``fwhm_px``: full width at half maximum in pixels along the major axis;
    ``ellipticity`` ``e = 1 - b/a``; ``theta_deg`` position angle of the major axis
    from +x towards +y. Circular Gaussians are integrated exactly with ``erf``;
    elliptical ones are sampled on a 3x3 sub-pixel grid.
    """

    def __init__(self, fwhm_px: float, ellipticity: float = 0.0, theta_deg: float = 0.0):
        if not np.isfinite(fwhm_px) or fwhm_px <= 0:
            raise ValidationError(f"GaussianPsf fwhm_px must be > 0, got {fwhm_px}")
        if not 0 <= ellipticity < 1:
            raise ValidationError(f"GaussianPsf ellipticity must be in [0, 1), got {ellipticity}")
        self.fwhm_px = float(fwhm_px)
        self.ellipticity = float(ellipticity)
        self.theta_deg = float(theta_deg)
        self.sigma = self.fwhm_px / FWHM_PER_SIGMA

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """FWHM in pixels (geometric mean of the axes)."""
        return self.fwhm_px * np.sqrt(1.0 - self.ellipticity)

    def stamps(self, x, y, size, xc=None, yc=None) -> np.ndarray:
        x, y, xc, yc = _centres(x, y, xc, yc)
        h = size // 2
        off = np.arange(size) - h
        if self.ellipticity == 0.0:
            s = self.sigma * np.sqrt(2.0)
            ex = (xc[:, None] + off - x[:, None])
            ey = (yc[:, None] + off - y[:, None])
            gx = 0.5 * (erf((ex + 0.5) / s) - erf((ex - 0.5) / s))
            gy = 0.5 * (erf((ey + 0.5) / s) - erf((ey - 0.5) / s))
            return gy[:, :, None] * gx[:, None, :]
        a = self.sigma
        b = self.sigma * (1.0 - self.ellipticity)
        t = np.deg2rad(self.theta_deg)
        c, sn = np.cos(t), np.sin(t)
        sub = (np.arange(3) - 1) / 3.0
        dx = (xc[:, None] + off - x[:, None])[:, None, :, None, None] + sub[None, None, None, None, :]
        dy = (yc[:, None] + off - y[:, None])[:, :, None, None, None] + sub[None, None, None, :, None]
        u = c * dx + sn * dy
        v = -sn * dx + c * dy
        g = np.exp(-0.5 * (u * u / (a * a) + v * v / (b * b))) / (2 * np.pi * a * b)
        return g.mean(axis=(3, 4))

    def moments(self) -> tuple[float, float, float]:
        """Second moments (ixx, iyy, ixy) in px^2, without pixelization."""
        a2 = self.sigma ** 2
        b2 = (self.sigma * (1.0 - self.ellipticity)) ** 2
        t = np.deg2rad(self.theta_deg)
        c, s = np.cos(t), np.sin(t)
        return (a2 * c * c + b2 * s * s, a2 * s * s + b2 * c * c, (a2 - b2) * c * s)


def lanczos_weights(frac: np.ndarray, size: int, a: int = 3) -> np.ndarray:
    """1-D Lanczos-``a`` interpolation matrices shifting a ``size`` sample by ``frac``.

    Returns ``(n, size, size)`` with ``out[k, i, j]`` the weight of input sample
    ``j`` in output sample ``i`` of a signal shifted by ``+frac[k]`` pixels.
    Rows are normalised to unit sum so flux is preserved.
    """
    i = np.arange(size)
    d = i[None, :, None] - i[None, None, :] - np.asarray(frac, dtype=np.float64)[:, None, None]
    w = np.sinc(d) * np.sinc(d / a)
    w[np.abs(d) >= a] = 0.0
    w /= w.sum(axis=2, keepdims=True)
    return w


class GridStampPsf:
    """Stamp PSF built from a callable ``image(x, y, size)`` drawing a centred PSF.

    ``psf_image(x, y, size)`` must return a ``(size, size)`` array with the PSF at
    detector position ``(x, y)`` centred on the middle pixel. The callable is sampled
    once on an ``ngrid x ngrid`` grid over a detector of ``shape``; each source uses
    the nearest sample, shifted by its sub-pixel offset (Lanczos-3) and renormalised.
    """

    def __init__(self, psf_image, shape: tuple[int, int], ngrid: int = 4, kernel_size: int = 41,
                 fwhm=None):
        ny, nx = shape
        self.shape = (int(ny), int(nx))
        self.ngrid = max(1, int(ngrid))
        self.kernel_size = int(kernel_size) | 1
        gx = (np.arange(self.ngrid) + 0.5) * nx / self.ngrid - 0.5
        gy = (np.arange(self.ngrid) + 0.5) * ny / self.ngrid - 0.5
        self._gx, self._gy = gx, gy
        ks = self.kernel_size
        kern = np.empty((self.ngrid, self.ngrid, ks, ks))
        for j, yy in enumerate(gy):
            for i, xx in enumerate(gx):
                k = np.asarray(psf_image(float(xx), float(yy), ks), dtype=np.float64)
                if k.shape != (ks, ks):
                    raise ValidationError(f"PSF image at ({xx:.0f}, {yy:.0f}) has shape {k.shape}, expected {(ks, ks)}")
                tot = k.sum()
                if not np.isfinite(tot) or tot <= 0:
                    raise ValidationError(f"PSF image at ({xx:.0f}, {yy:.0f}) has non-positive or non-finite sum {tot}")
                kern[j, i] = k / tot
        self._kernels = kern
        self._fwhm = fwhm

    @classmethod
    def from_psf(cls, psf, shape: tuple[int, int], ngrid: int = 4, kernel_size: int = 41) -> "GridStampPsf":
        """Wrap an image-model PSF object with ``.image(x, y, size)`` and ``.fwhm()``."""
        fw = getattr(psf, "fwhm", None)
        return cls(psf.image, shape, ngrid=ngrid, kernel_size=kernel_size, fwhm=fw)

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        if self._fwhm is not None:
            try:
                return float(self._fwhm(x, y)) if x is not None else float(self._fwhm())
            except TypeError:
                return float(self._fwhm())
        k = self._kernels[self.ngrid // 2, self.ngrid // 2]
        return _fwhm_from_kernel(k)

    def stamps(self, x, y, size, xc=None, yc=None) -> np.ndarray:
        x, y, xc, yc = _centres(x, y, xc, yc)
        n = x.size
        ks = self.kernel_size
        gi = np.clip(np.searchsorted(self._gx, x) - 1, 0, self.ngrid - 1)
        gi = np.where((gi + 1 < self.ngrid) & (np.abs(x - self._gx[np.minimum(gi + 1, self.ngrid - 1)]) < np.abs(x - self._gx[gi])), gi + 1, gi)
        gj = np.clip(np.searchsorted(self._gy, y) - 1, 0, self.ngrid - 1)
        gj = np.where((gj + 1 < self.ngrid) & (np.abs(y - self._gy[np.minimum(gj + 1, self.ngrid - 1)]) < np.abs(y - self._gy[gj])), gj + 1, gj)
        k = self._kernels[gj, gi]  # (n, ks, ks)
        # The kernel centre is at kernel index ks//2; place it at (x, y) on a stamp grid
        # centred at (xc, yc): offset of the PSF centre from the stamp centre.
        ox = x - xc
        oy = y - yc
        ix = np.floor(ox).astype(np.int64)
        iy = np.floor(oy).astype(np.int64)
        fx = ox - ix
        fy = oy - iy
        wx = lanczos_weights(fx, ks)
        wy = lanczos_weights(fy, ks)
        shifted = np.einsum("nij,njk,nlk->nil", wy, k, wx, optimize=True)
        # integer part: place shifted kernel (centre at ks//2 + (iy, ix)) into the stamp
        out = np.zeros((n, size, size))
        h = size // 2
        hk = ks // 2
        # stamp index s corresponds to kernel index s - h + hk - i_off
        sidx = np.arange(size)
        ky = sidx[None, :] - h + hk - iy[:, None]
        kx = sidx[None, :] - h + hk - ix[:, None]
        vy = (ky >= 0) & (ky < ks)
        vx = (kx >= 0) & (kx < ks)
        vals = shifted[np.arange(n)[:, None, None], np.clip(ky, 0, ks - 1)[:, :, None], np.clip(kx, 0, ks - 1)[:, None, :]]
        out = np.where(vy[:, :, None] & vx[:, None, :], vals, 0.0)
        return out


def _fwhm_from_kernel(k: np.ndarray) -> float:
    """FWHM (px) of a centred kernel from its second moments, Gaussian-equivalent."""
    ks = k.shape[0]
    c = np.arange(ks) - ks // 2
    kk = np.clip(k, 0, None)
    tot = kk.sum()
    ixx = (kk * c[None, :] ** 2).sum() / tot
    iyy = (kk * c[:, None] ** 2).sum() / tot
    return float(FWHM_PER_SIGMA * np.sqrt(0.5 * (ixx + iyy)))
