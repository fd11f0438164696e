"""PSF models as seen by the measurement code: vectorized stamps at many positions.

A *stamp PSF* is any object with

``stamps(x, y, size, xc=None, yc=None) -> ndarray (n, size, size)``

returning the PSF (unit total flux, pixel-integrated) centred at the fractional
positions ``(x, y)`` and sampled on the pixel grid of stamps centred on the integer
pixels ``(xc, yc)`` (default: ``floor(x + 0.5)``, the convention of
:mod:`archive.image.psf`), and ``fwhm(x=None, y=None)`` in pixels.

:class:`GaussianPsf` is analytic. :class:`PixelStampPsf` evaluates a ``PixelPSF``'s
polynomial at every source and interpolates its basis images to the sub-pixel phase
(cubic B-spline, tabulated). :class:`GridStampPsf` holds oversampled kernels on a grid
over the detector and interpolates them to every fractional position with separable
Lanczos-3 rows. :func:`stamp_psf` turns any image-model PSF into one of these.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
from scipy.special import erf

from archive.errors import ValidationError
from archive.process.stamps import matmul_rows

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
    xc = np.floor(x + 0.5).astype(np.int64) if xc is None else np.atleast_1d(np.asarray(xc, dtype=np.int64))
    yc = np.floor(y + 0.5).astype(np.int64) if yc is None else np.atleast_1d(np.asarray(yc, dtype=np.int64))
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


def _lanczos_rows(u: np.ndarray, lo: int, hi: int, ks: int, a: int = 3) -> np.ndarray:
    """Interpolation weights ``(n, m, hi - lo)`` of kernel samples ``lo..hi-1`` at positions ``u`` ``(n, m)``.

    Lanczos-``a`` (2a taps per row, normalised to unit sum); taps that fall outside
    the kernel ``0..ks-1`` are dropped, so a position beyond the kernel gets zeros.
    """
    j0 = np.floor(u).astype(np.int64) - (a - 1)
    taps = j0[..., None] + np.arange(2 * a)
    d = u[..., None] - taps
    w = np.sinc(d) * np.sinc(d / a)
    w /= w.sum(axis=-1, keepdims=True)
    w[(taps < 0) | (taps >= ks)] = 0.0
    out = np.zeros(u.shape + (hi - lo,))
    t = taps - lo
    ok = (t >= 0) & (t < hi - lo)
    ii = np.broadcast_to(np.arange(u.shape[0])[:, None, None], t.shape)
    jj = np.broadcast_to(np.arange(u.shape[1])[None, :, None], t.shape)
    out[ii[ok], jj[ok], t[ok]] = w[ok]
    return out


class GridStampPsf:
    """Stamp PSF from oversampled kernels sampled on a grid over the detector.

    ``kernels``: ``(ngy, ngx, ks, ks)`` samples of the pixel-integrated PSF at a
    spacing of ``1 / oversample`` px, centred on element ``ks // 2``, at detector
    positions ``grid_x`` (``ngx``) by ``grid_y`` (``ngy``). Each source's kernel is
    the bilinear blend of its four grid neighbours; its native-pixel stamp is
    ``Wy K Wx^T`` with Lanczos-3 interpolation rows (all sources at once, einsum).
    Kernels are normalised so a native stamp sums to 1 (before truncation).
    """

    def __init__(self, kernels: np.ndarray, grid_x, grid_y, oversample: int = 1, fwhm=None, nearest: bool = False):
        self.nearest = bool(nearest)
        k = np.asarray(kernels, dtype=np.float64)
        if k.ndim == 2:
            k = k[None, None]
        if k.ndim != 4 or k.shape[2] != k.shape[3] or k.shape[2] % 2 == 0:
            raise ValidationError(f"GridStampPsf kernels must be (ngy, ngx, S, S) with S odd, got {k.shape}")
        self.oversample = int(oversample)
        tot = k.sum(axis=(2, 3), keepdims=True)
        if not np.all(np.isfinite(tot)) or np.any(tot <= 0):
            raise ValidationError("GridStampPsf: a kernel has non-positive or non-finite total flux")
        self._kernels = k / tot * self.oversample ** 2
        self._gx = np.atleast_1d(np.asarray(grid_x, dtype=np.float64))
        self._gy = np.atleast_1d(np.asarray(grid_y, dtype=np.float64))
        if self._gx.size != k.shape[1] or self._gy.size != k.shape[0]:
            raise ValidationError("GridStampPsf: grid_x/grid_y lengths do not match the kernel grid")
        self._fwhm = fwhm

    @classmethod
    def from_callable(cls, psf_model, shape: tuple[int, int], ngrid: int = 3, oversample: int = 1,
                      fwhm=None, nearest: bool = False) -> "GridStampPsf":
        """Sample ``psf_model(x, y) -> (S, S)`` (centred, oversampled) on an ngrid^2 grid over ``shape``.

        ``nearest``: nodes at the centres of ngrid^2 cells, each source uses its cell's
        kernel (4x cheaper than the bilinear blend of the corner nodes otherwise used).
        """
        ny, nx = shape
        ngrid = max(1, int(ngrid))
        if nearest:
            gx = (np.arange(ngrid) + 0.5) * nx / ngrid - 0.5
            gy = (np.arange(ngrid) + 0.5) * ny / ngrid - 0.5
        else:
            gx = np.linspace(0, nx - 1, ngrid) if ngrid > 1 else np.array([(nx - 1) / 2.0])
            gy = np.linspace(0, ny - 1, ngrid) if ngrid > 1 else np.array([(ny - 1) / 2.0])
        ks = np.asarray(psf_model(float(gx[0]), float(gy[0]))).shape[0]
        kern = np.empty((gy.size, gx.size, ks, ks))
        for j, yy in enumerate(gy):
            for i, xx in enumerate(gx):
                kern[j, i] = psf_model(float(xx), float(yy))
        return cls(kern, gx, gy, oversample=oversample, fwhm=fwhm, nearest=nearest)

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        if self._fwhm is not None:
            return float(self._fwhm(x, y))
        k = self._kernels[self._kernels.shape[0] // 2, self._kernels.shape[1] // 2]
        return _fwhm_from_kernel(k) / self.oversample

    def _node_weights(self, x, y):
        if self.nearest:
            i = np.abs(x[:, None] - self._gx[None, :]).argmin(axis=1)
            j = np.abs(y[:, None] - self._gy[None, :]).argmin(axis=1)
            w = np.zeros((x.size, self._gy.size, self._gx.size))
            w[np.arange(x.size), j, i] = 1.0
            return w

        def axis(g, v):
            if g.size == 1:
                z = np.zeros(v.size, dtype=np.int64)
                return z, z, np.zeros(v.size)
            i = np.clip(np.searchsorted(g, v) - 1, 0, g.size - 2)
            t = np.clip((v - g[i]) / (g[i + 1] - g[i]), 0.0, 1.0)
            return i, i + 1, t
        i0, i1, tx = axis(self._gx, x)
        j0, j1, ty = axis(self._gy, y)
        w = np.zeros((x.size, self._gy.size, self._gx.size))
        r = np.arange(x.size)
        np.add.at(w, (r, j0, i0), (1 - ty) * (1 - tx))
        np.add.at(w, (r, j0, i1), (1 - ty) * tx)
        np.add.at(w, (r, j1, i0), ty * (1 - tx))
        np.add.at(w, (r, j1, i1), ty * tx)
        return w

    #: sub-pixel phases per pixel in the lookup table
    n_phase: int = 8

    def _table(self, half: int) -> np.ndarray:
        """Native stamps ``(ngy, ngx, P+1, P+1, 2 half + 1, 2 half + 1)`` of every grid node at
        sub-pixel phases ``-0.5 + k / P`` (built with two matrix products per node)."""
        tab = getattr(self, "_tab", None)
        if tab is not None and self._tab_half >= half:
            return tab
        half = max(half, 15)
        P = self.n_phase
        ks = self._kernels.shape[2]
        kc = ks // 2
        S = 2 * half + 1
        g = np.arange(S) - half
        ph = -0.5 + np.arange(P + 1) / P
        # position in kernel samples of output pixel g for a source at phase f: kc + (g - f) * os
        u = kc + (g[None, :] - ph[:, None]) * self.oversample  # (P+1, S)
        W = _lanczos_rows(u, 0, ks, ks).reshape((P + 1) * S, ks)  # rows: (phase, pixel)
        ngy, ngx = self._kernels.shape[:2]
        tab = np.empty((ngy, ngx, P + 1, P + 1, S, S))
        for j in range(ngy):
            for i in range(ngx):
                full = W @ self._kernels[j, i] @ W.T  # ((P+1) S, (P+1) S): [phy, y, phx, x]
                tab[j, i] = full.reshape(P + 1, S, P + 1, S).transpose(0, 2, 1, 3)
        self._tab = tab
        self._tab_half = half
        return tab

    def stamps(self, x, y, size, xc=None, yc=None) -> np.ndarray:
        return self._eval(x, y, size, xc, yc, False)[0]

    def stamps_with_gradient(self, x, y, size, xc=None, yc=None):
        """``(P, dP/dx0, dP/dy0)`` stamps: the PSF and its derivatives with respect to the source position."""
        return self._eval(x, y, size, xc, yc, True)

    def _eval(self, x, y, size, xc, yc, grad: bool):
        x, y, xc, yc = _centres(x, y, xc, yc)
        n = x.size
        if n == 0:
            z = np.zeros((0, size, size))
            return z, z, z
        c0x = np.floor(x + 0.5).astype(np.int64)
        c0y = np.floor(y + 0.5).astype(np.int64)
        kx = xc - c0x
        ky = yc - c0y
        h = size // 2
        tab = self._table(h + int(max(np.abs(kx).max(), np.abs(ky).max())))
        th = self._tab_half
        P = self.n_phase
        tx = (x - c0x + 0.5) * P
        ty = (y - c0y + 0.5) * P
        ix0 = np.clip(np.floor(tx).astype(np.int64), 0, P - 1)
        iy0 = np.clip(np.floor(ty).astype(np.int64), 0, P - 1)
        fx = (tx - ix0)[:, None, None]
        fy = (ty - iy0)[:, None, None]
        wn = self._node_weights(x, y)
        out = np.zeros((n, size, size))
        gx = np.zeros((n, size, size)) if grad else None
        gy = np.zeros((n, size, size)) if grad else None
        # group by integer stamp offset so the table is read with slices (block copies)
        key = (ky + 1) * 1000 + (kx + 1)
        for kk in np.unique(key):
            grp = key == kk
            oy = int(ky[grp][0])
            ox = int(kx[grp][0])
            r0 = th + oy - h
            c0 = th + ox - h
            for j in range(self._gy.size):
                for i in range(self._gx.size):
                    sel = np.nonzero(grp & (wn[:, j, i] > 0))[0]
                    if sel.size == 0:
                        continue
                    t = tab[j, i, :, :, r0:r0 + size, c0:c0 + size]
                    a, b = iy0[sel], ix0[sel]
                    ffx, ffy = fx[sel], fy[sel]
                    t00 = t[a, b]
                    t01 = t[a, b + 1]
                    t10 = t[a + 1, b]
                    t11 = t[a + 1, b + 1]
                    w = wn[sel, j, i][:, None, None]
                    out[sel] += w * ((1 - ffy) * ((1 - ffx) * t00 + ffx * t01) + ffy * ((1 - ffx) * t10 + ffx * t11))
                    if grad:
                        # moving the source by +dx moves the phase by +dx * P
                        gx[sel] += w * P * ((1 - ffy) * (t01 - t00) + ffy * (t11 - t10))
                        gy[sel] += w * P * ((1 - ffx) * (t10 - t00) + ffx * (t11 - t01))
        return out, gx, gy


class PixelStampPsf:
    """Stamp PSF that evaluates a :class:`~archive.image.psf.PixelPSF` exactly at every source.

    The PixelPSF is ``M(x, y) = sum_k a_k(x, y) B_k`` (basis images ``B_k`` sampled at
    ``1 / oversample`` px, polynomial coefficients ``a_k``). Each basis image is
    interpolated with the same cubic B-spline as ``PixelPSF.render_stamps`` and tabulated
    once at ``n_phase + 1`` sub-pixel phases per axis; a source's stamp is then
    ``sum_k a_k(x, y) bilinear_phase(T_k)``, with its own polynomial coefficients (no grid
    of nodes over the detector, whose interpolation errs by the PSF's change between
    nodes). The table holds, per phase cell, the four bilinear terms of every basis image
    contiguously, so the sources of one phase cell are evaluated together by one product
    with that cell's block (float32: stamps sum ~1e3 pixels; the gradients and the bilinear
    blend are exact to ~1e-7 relative).
    Kernels are normalised per source so a native stamp sums to 1 before truncation.
    """

    #: sub-pixel phases per pixel in the lookup table (bilinear between them: the
    #: interpolation error is ~ (1 / n_phase)^2 / 8 of the PSF's curvature, < 1e-4 of a flux)
    n_phase: int = 16

    def __init__(self, psf):
        from archive.image.psf import PixelPSF

        if not isinstance(psf, PixelPSF):
            raise ValidationError(f"PixelStampPsf needs a PixelPSF, got {type(psf).__name__}")
        self.psf = psf
        self._fw = float(psf.fwhm())
        self._tables: dict = {}
        os_ = float(psf.oversample)
        tot = psf.basis.sum(axis=(1, 2)) / os_ ** 2
        self._tot = tot

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        return self._fw

    def _coefficients(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-source basis weights ``(n, K)``, normalised to a unit native sum."""
        from archive.image.psf import poly_design

        p = self.psf
        a = poly_design(x + p.x_offset, y + p.y_offset, p.degree, p.bbox) @ p.coeffs.T
        a = np.atleast_2d(a)
        norm = a @ self._tot
        norm = np.where(np.abs(norm) > 1e-12, norm, 1.0)
        return a / norm[:, None]

    def _table(self, half: int) -> np.ndarray:
        """``(P, P, K * 4, S, S)`` float32: for phase cell (iy, ix) and basis k the bilinear terms
        ``t00, t01 - t00, t10 - t00, t11 - t10 - t01 + t00`` of stamps of half-size ``half``."""
        tab = self._tables.get(half)
        if tab is not None:
            return tab
        from archive.image.psf import PixelPSF

        p = self.psf
        coef = p._spline_coefficients()  # (K, Sp, Sp) B-spline coefficients of the padded basis
        K, Sp, _ = coef.shape
        os_ = float(p.oversample)
        c = (p.basis.shape[1] - 1) / 2.0 + p._PAD
        P = self.n_phase
        S = 2 * half + 1
        g = np.arange(S) - half
        ph = -0.5 + np.arange(P + 1) / P
        pos = c + (g[None, :] - ph[:, None]) * os_  # (P+1, S) spline coordinates of each native pixel
        W = PixelPSF._bspline3(pos[:, :, None] - np.arange(Sp)[None, None, :]).reshape((P + 1) * S, Sp)
        WT = np.ascontiguousarray(W.T)
        T = np.stack([matmul_rows(matmul_rows(W, ck), WT) for ck in coef])  # (K, (P+1) S, (P+1) S)
        T = T.reshape(K, P + 1, S, P + 1, S).transpose(1, 3, 0, 2, 4)  # (P+1, P+1, K, S, S)
        t00 = T[:-1, :-1]
        t01 = T[:-1, 1:]
        t10 = T[1:, :-1]
        t11 = T[1:, 1:]
        tab = np.stack([t00, t01 - t00, t10 - t00, t11 - t10 - t01 + t00], axis=3)  # (P, P, K, 4, S, S)
        tab = np.ascontiguousarray(tab.reshape(P, P, K * 4, S, S), dtype=np.float32)
        self._tables[half] = tab
        return tab

    def stamps(self, x, y, size, xc=None, yc=None) -> np.ndarray:
        return self._eval(x, y, size, xc, yc, False)[0]

    def stamps_with_gradient(self, x, y, size, xc=None, yc=None):
        """``(P, dP/dx0, dP/dy0)`` stamps: the PSF and its derivatives with respect to the source position."""
        return self._eval(x, y, size, xc, yc, True)

    def _eval(self, x, y, size, xc, yc, grad: bool):
        x, y, xc, yc = _centres(x, y, xc, yc)
        n = x.size
        h = size // 2
        if n == 0:
            z = np.zeros((0, size, size), dtype=np.float32)
            return z, z, z
        c0x = np.floor(x + 0.5).astype(np.int64)
        c0y = np.floor(y + 0.5).astype(np.int64)
        kx = xc - c0x
        ky = yc - c0y
        kmax = int(max(np.abs(kx).max(), np.abs(ky).max()))
        th = h + kmax
        tab = self._table(th)
        P = self.n_phase
        tx = (x - c0x + 0.5) * P
        ty = (y - c0y + 0.5) * P
        ix0 = np.clip(np.floor(tx).astype(np.int64), 0, P - 1)
        iy0 = np.clip(np.floor(ty).astype(np.int64), 0, P - 1)
        fx = (tx - ix0).astype(np.float32)
        fy = (ty - iy0).astype(np.float32)
        a = self._coefficients(x, y).astype(np.float32)  # (n, K)
        K = a.shape[1]
        one = np.ones_like(fx)
        # weights of the 4 bilinear terms (value) and of their x / y derivatives (per phase unit)
        wv = np.stack([one, fx, fy, fx * fy], axis=1)
        out = np.empty((n, size, size), dtype=np.float32)
        gx = np.empty((n, size, size), dtype=np.float32) if grad else None
        gy = np.empty((n, size, size), dtype=np.float32) if grad else None
        zero = np.zeros_like(fx)
        if grad:
            wdx = np.stack([zero, one, zero, fy], axis=1) * np.float32(P)
            wdy = np.stack([zero, zero, one, fx], axis=1) * np.float32(P)
        key = (ky + kmax) * (2 * kmax + 1) + (kx + kmax)
        groups = [np.arange(n)] if kmax == 0 else [np.nonzero(key == k)[0] for k in np.unique(key)]
        # sources are grouped by phase cell: each cell's table block (K * 4, size^2) is used
        # as is by one product for all its sources, instead of being gathered per source
        # (the gather, 16 x size^2 floats per source, was most of the cost)
        cell = iy0 * P + ix0
        wts = [wv] + ([wdx, wdy] if grad else [])
        outs = [out] + ([gx, gy] if grad else [])
        for sel in groups:
            oy = int(ky[sel[0]])
            ox = int(kx[sel[0]])
            t = tab if kmax == 0 else tab[..., th + oy - h:th + oy + h + 1, th + ox - h:th + ox + h + 1]
            sel = sel[np.argsort(cell[sel], kind="stable")]
            cs = cell[sel]
            starts = np.flatnonzero(np.r_[True, cs[1:] != cs[:-1]])
            ends = np.r_[starts[1:], sel.size]
            # per-source weights of the K * 4 table planes, in cell order
            Ws = [(a[sel][:, :, None] * wt[sel][:, None, :]).reshape(sel.size, K * 4) for wt in wts]
            Rs = [np.empty((sel.size, size * size), dtype=np.float32) for _ in wts]
            for lo, hi in zip(starts.tolist(), ends.tolist()):
                c = int(cs[lo])
                Tc = t[c // P, c % P].reshape(K * 4, size * size)
                for Wq, Rq in zip(Ws, Rs):
                    matmul_rows(Wq[lo:hi], Tc, out=Rq[lo:hi])
            for o, Rq in zip(outs, Rs):
                o[sel] = Rq.reshape(sel.size, size, size)
        return out, gx, gy


def stamp_psf(psf, shape: tuple[int, int], ngrid: int = 5, oversample: int = 2, nearest: bool = True,
              exact: bool = True):
    """A stamp PSF for measurement from an image-model PSF (or a stamp PSF, returned as is).

    GaussianPSF -> analytic :class:`GaussianPsf`; PixelPSF -> :class:`PixelStampPsf`
    (its polynomial evaluated at every source), or with ``exact=False`` a
    :class:`GridStampPsf` sampling it on ``ngrid`` x ``ngrid`` nodes (``nearest``: cells);
    any other image-model PSF is first pixelized with ``PixelPSF.from_psf`` (degree 2,
    ``oversample``) over the detector of ``shape``.
    """
    if hasattr(psf, "stamps"):
        return psf
    from archive.image.psf import PSF, GaussianPSF, PixelPSF

    if not isinstance(psf, PSF):
        raise ValidationError(f"stamp_psf: expected an archive.image.psf.PSF, got {type(psf).__name__}")
    if isinstance(psf, GaussianPSF) and psf.x_offset == 0 and psf.y_offset == 0:
        return GaussianPsf(psf.sigma * FWHM_PER_SIGMA)
    ny, nx = shape
    if not isinstance(psf, PixelPSF):
        psf = PixelPSF.from_psf(psf, (0.0, 0.0, float(nx - 1), float(ny - 1)), degree=2, oversample=oversample)
    pp = psf
    if exact:
        return PixelStampPsf(pp)
    fw = pp.fwhm()
    return GridStampPsf.from_callable(pp.model, shape, ngrid=ngrid if pp.degree > 0 else 1,
                                      oversample=pp.oversample, fwhm=lambda x=None, y=None: fw, nearest=nearest)


def _fwhm_from_kernel(k: np.ndarray) -> float:
    """FWHM (px) of a centred kernel from its second moments, Gaussian-equivalent."""
    ks = k.shape[0]
    c = np.arange(ks) - ks // 2
    kk = np.clip(k, 0, None)
    tot = kk.sum()
    ixx = (kk * c[None, :] ** 2).sum() / tot
    iyy = (kk * c[:, None] ** 2).sum() / tot
    return float(FWHM_PER_SIGMA * np.sqrt(0.5 * (ixx + iyy)))
