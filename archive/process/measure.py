"""Source measurement, all sources at once: PSF-fit centroids and fluxes, aperture
fluxes, adaptive second moments and flags.

PSF fit. Every source is modelled as ``F * P(x - x0, y - y0)``. Each iteration
subtracts the current models of *all* sources from the image, adds back the
source's own model and solves the linearised 3-parameter problem

    D ~ F P + (F dx) dP/dx0 + (F dy) dP/dy0

by weighted least squares for every source at once (batched 3x3 solves), so
overlapping sources are fitted together (a Jacobi iteration of the simultaneous
fit). The final flux is the 1-parameter weighted fit at the converged centroid.
Weights are the inverse *background* variance (smooth; using a variance that
contains the source's own noise would bias the fit), and the errors are the exact
"sandwich" variances with the full variance plane: ``var(F) = sum(w^2 P^2 V) /
(sum(w P^2))^2``; centroid errors come from the same sandwich on the 3x3 problem.

Apertures (radii in px) are summed on the neighbour-subtracted image; masked
pixels inside an aperture are replaced by the source's PSF model and flagged.
Second moments are adaptive (elliptical Gaussian weight iterated to the source's
own moments), i.e. the Gaussian-equivalent ``ixx, iyy, ixy`` in px^2.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
import pandas as pd

from archive.errors import ValidationError
from archive.process import flags as F_
from archive.process.stamps import aperture_stamps, chunks, gather, scatter_add, stamp_grid

log = logging.getLogger(__name__)


@dataclass
class MeasureConfig:
    """Configuration of :func:`measure_sources`.

    aperture_radii: aperture radii in px (columns ``ap_flux_r{r:g}``).
    fit_halfsize_fwhm: half-size of the PSF-fit stamp in units of the FWHM (at least 3 px).
    n_iter: centroid/flux iterations of the simultaneous fit.
    max_shift: largest allowed centroid move from the starting position (px); beyond it the start is kept and CENTROID flagged.
    flag_radius: radius (px) within which mask bits are OR-ed into ``flags``.
    blend_fraction: BLENDED is set when neighbours add more than this fraction of the source's own PSF-weighted flux.
    moments_iter: iterations of the adaptive moments.
    bad_planes: mask planes whose pixels get zero weight in fits and apertures.
    chunk: sources processed per vectorized batch (bounds memory).
    """

    aperture_radii: tuple[float, ...] = (3.0, 6.0, 12.0)
    fit_halfsize_fwhm: float = 1.5
    n_iter: int = 3
    max_shift: float = 2.0
    flag_radius: int = 3
    blend_fraction: float = 0.01
    moments_iter: int = 8
    bad_planes: tuple[str, ...] = ("BAD", "SAT", "CR", "NO_DATA")
    chunk: int = 2048

    def to_dict(self) -> dict:
        return asdict(self)


def ap_column(r: float) -> str:
    """Column name of an aperture flux of radius ``r`` px (``ap_flux_r3`` for 3)."""
    return f"ap_flux_r{r:g}".replace(".", "p")


@dataclass
class _Ctx:
    shape: tuple[int, int]
    img: np.ndarray      # image with unusable pixels set to 0
    W: np.ndarray        # fit weights (1/background variance), 0 where unusable
    V: np.ndarray        # full variance, 0 where unusable
    usable: np.ndarray
    psf: object
    hf: int
    hm: int


def _model_image(ctx: _Ctx, x, y, flux, chunk) -> np.ndarray:
    sm = 2 * ctx.hm + 1
    ny, nx = ctx.shape
    idx_parts, val_parts = [], []
    pending = 0
    out = None
    for sl in chunks(len(x), chunk):
        xc = np.floor(x[sl] + 0.5).astype(np.int64)
        yc = np.floor(y[sl] + 0.5).astype(np.int64)
        iy, ix = stamp_grid(xc, yc, sm)
        st = ctx.psf.stamps(x[sl], y[sl], sm, xc, yc) * flux[sl][:, None, None]
        yy = np.broadcast_to(iy[:, :, None], st.shape)
        xx = np.broadcast_to(ix[:, None, :], st.shape)
        ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        idx_parts.append(yy[ok] * nx + xx[ok])
        val_parts.append(st[ok])
        pending += idx_parts[-1].size
        # one bincount per ~8M stamp pixels instead of one full-image pass per chunk
        if pending > 8_000_000:
            part = np.bincount(np.concatenate(idx_parts), weights=np.concatenate(val_parts), minlength=ny * nx)
            out = part if out is None else out + part
            idx_parts, val_parts, pending = [], [], 0
    if idx_parts:
        part = np.bincount(np.concatenate(idx_parts), weights=np.concatenate(val_parts), minlength=ny * nx)
        out = part if out is None else out + part
    if out is None:
        return np.zeros(ctx.shape)
    return out.reshape(ctx.shape)


def _fit_chunk(ctx: _Ctx, R, x, y, flux, want_cov: bool):
    """One linearised 3-parameter PSF fit for a batch; returns (F, dx, dy, cov or None, nusable)."""
    sf = 2 * ctx.hf + 1
    xc = np.floor(x + 0.5).astype(np.int64)
    yc = np.floor(y + 0.5).astype(np.int64)
    iy, ix = stamp_grid(xc, yc, sf)
    Rs, _ = gather(R, iy, ix, 0.0)
    Ws, _ = gather(ctx.W, iy, ix, 0.0)
    P, Px, Py = psf_with_gradient(ctx.psf, x, y, sf, xc, yc)
    D = Rs + flux[:, None, None] * P
    A = np.stack([P, Px, Py], axis=1)  # (m, 3, S, S)
    WA = A * Ws[:, None]
    N = np.einsum("mapq,mbpq->mab", WA, A, optimize=True)
    b = np.einsum("mapq,mpq->ma", WA, D, optimize=True)
    good = np.abs(np.linalg.det(N)) > 1e-30 * np.maximum(N[:, 0, 0], 1e-300) ** 3
    N[~good] = np.eye(3)
    sol = np.linalg.solve(N, b[..., None])[..., 0]
    sol[~good] = 0.0
    Fn = sol[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = np.where(Fn > 0, sol[:, 1] / Fn, 0.0)
        dy = np.where(Fn > 0, sol[:, 2] / Fn, 0.0)
    cov = None
    if want_cov:
        Vs, _ = gather(ctx.V, iy, ix, 0.0)
        Ninv = np.linalg.inv(N)
        M = np.einsum("mapq,mbpq,mpq->mab", WA, WA, Vs, optimize=True)
        cov = Ninv @ M @ Ninv
        cov[~good] = np.nan
    return Fn, dx, dy, cov, good


def model_half(psf, config: "MeasureConfig") -> int:
    """Half-size (px) of the model stamps :func:`measure_sources` subtracts (its final model)."""
    fw = float(psf.fwhm())
    hf = max(3, int(np.ceil(config.fit_halfsize_fwhm * fw)))
    radii = tuple(float(r) for r in config.aperture_radii)
    ha = int(np.ceil(max(radii) + 1.0)) if radii else hf
    return max(hf, ha, int(np.ceil(3.0 * fw)))


def model_image(shape: tuple[int, int], psf, x: np.ndarray, y: np.ndarray, flux: np.ndarray, half: int,
                chunk: int = 2048) -> np.ndarray:
    """Image (float64) of PSF models ``flux * P`` at ``(x, y)``, each on a ``2 half + 1`` stamp."""
    ctx = _Ctx(tuple(shape), None, None, None, None, psf, half, half)
    return _model_image(ctx, np.asarray(x, np.float64), np.asarray(y, np.float64), np.asarray(flux, np.float64),
                        chunk)


def psf_with_gradient(psf, x, y, size, xc, yc):
    """PSF stamps and their derivatives with respect to the source position (px^-1).

    Uses the PSF's own ``stamps_with_gradient`` when it has one, else central
    differences of 0.05 px.
    """
    f = getattr(psf, "stamps_with_gradient", None)
    if f is not None:
        return f(x, y, size, xc, yc)
    e = 0.05
    P = psf.stamps(x, y, size, xc, yc)
    Px = (psf.stamps(x + e, y, size, xc, yc) - psf.stamps(x - e, y, size, xc, yc)) / (2 * e)
    Py = (psf.stamps(x, y + e, size, xc, yc) - psf.stamps(x, y - e, size, xc, yc)) / (2 * e)
    return P, Px, Py


def measure_sources(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, psf,
                    x: np.ndarray, y: np.ndarray, *, background_variance: np.ndarray | None = None,
                    background: np.ndarray | None = None, mask_planes: Mapping[str, int] | None = None,
                    flux_guess: np.ndarray | None = None, config: MeasureConfig | None = None,
                    return_model: bool = False):
    """Measure point sources at starting positions ``(x, y)`` (px, 0-based).

    image: background-subtracted image (counts); variance: its variance (counts^2,
    including the sources' own noise); mask: integer mask plane image or None;
    psf: a stamp PSF (:mod:`archive.process.psfmodel`); background_variance: smooth
    variance of the background used as fit weights (default ``variance``);
    background: subtracted background (reported as ``sky``); flux_guess: starting
    fluxes. Returns a DataFrame with ``x, y, x_err, y_err, psf_flux, psf_flux_err,
    ap_flux_r*, ap_flux_r*_err, snr, ixx, iyy, ixy, sky, flags`` (fluxes in the
    image's units) and, with ``return_model``, also the model image of all sources.
    """
    cfg = config or MeasureConfig()
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2:
        raise ValidationError(f"measure_sources: image must be 2-D, got shape {image.shape}")
    if variance.shape != image.shape:
        raise ValidationError(f"measure_sources: variance shape {variance.shape} differs from image shape {image.shape}")
    if mask is not None and mask.shape != image.shape:
        raise ValidationError(f"measure_sources: mask shape {mask.shape} differs from image shape {image.shape}")
    x = np.asarray(x, dtype=np.float64).copy()
    y = np.asarray(y, dtype=np.float64).copy()
    n = x.size
    shape = image.shape
    badbits = F_.plane_bits(mask_planes, *cfg.bad_planes)
    usable = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    if mask is not None and badbits:
        usable &= (mask & badbits) == 0
    bv = variance if background_variance is None else np.asarray(background_variance)
    if bv.shape != shape:
        raise ValidationError(f"measure_sources: background_variance shape {bv.shape} differs from image shape {shape}")
    W = np.where(usable & (bv > 0), 1.0 / np.where(bv > 0, bv, 1.0), 0.0).astype(np.float32)
    V = np.where(usable, variance, 0.0).astype(np.float32)
    img = np.where(usable, image, 0.0).astype(np.float32)
    fw = float(psf.fwhm())
    hf = max(3, int(np.ceil(cfg.fit_halfsize_fwhm * fw)))
    radii = tuple(float(r) for r in cfg.aperture_radii)
    ha = int(np.ceil(max(radii) + 1.0)) if radii else hf
    hm = max(hf, ha, int(np.ceil(3.0 * fw)))
    hit = max(hf, int(np.ceil(3.0 * fw)))  # model half-size during the iterations
    hmom = min(ha, max(hf, int(np.ceil(2.0 * fw)) + 2))
    ctx = _Ctx(shape, img, W, V, usable, psf, hf, hit)
    flags = np.zeros(n, dtype=np.int64)
    cols = _empty_columns(radii)
    if n == 0:
        df = pd.DataFrame(cols)
        return (df, np.zeros(shape)) if return_model else df

    x0, y0 = x.copy(), y.copy()
    flux = np.zeros(n) if flux_guess is None else np.nan_to_num(np.asarray(flux_guess, dtype=np.float64)).copy()
    chunk = max(64, int(cfg.chunk))
    for it in range(max(1, cfg.n_iter)):
        model = _model_image(ctx, x, y, flux, chunk)
        R = img - model
        newf = np.empty(n)
        for sl in chunks(n, chunk):
            Fn, dx, dy, _, good = _fit_chunk(ctx, R, x[sl], y[sl], flux[sl], False)
            move = good & (Fn > 0)
            step = 0.7 if it else 1.0
            x[sl] += np.where(move, np.clip(dx, -0.5, 0.5), 0.0)
            y[sl] += np.where(move, np.clip(dy, -0.5, 0.5), 0.0)
            # damped flux update keeps the Jacobi iteration of blends stable
            newf[sl] = np.where(good, flux[sl] + step * (Fn - flux[sl]), flux[sl])
        flux = newf
        far = np.hypot(x - x0, y - y0) > cfg.max_shift
        if far.any():
            x[far], y[far] = x0[far], y0[far]
            flags[far] |= F_.FLAG_CENTROID
    # final pass: flux-only fit, centroid covariance, apertures, moments, flags
    ctx.hm = hm
    model = _model_image(ctx, x, y, flux, chunk)
    R = img - model
    out = {k: np.full(n, np.nan) for k in cols}
    sf = 2 * hf + 1
    sa = 2 * ha + 1
    fwhm_sig2 = (fw / 2.3548200450309493) ** 2
    for sl in chunks(n, chunk):
        xs, ys, fs = x[sl], y[sl], flux[sl]
        m = xs.size
        xc = np.floor(xs + 0.5).astype(np.int64)
        yc = np.floor(ys + 0.5).astype(np.int64)
        # PSF flux at the fixed centroid
        iy, ix = stamp_grid(xc, yc, sf)
        Rs, inside = gather(R, iy, ix, 0.0)
        Ws, _ = gather(W, iy, ix, 0.0)
        Vs, _ = gather(V, iy, ix, 0.0)
        Ms, _ = gather(model, iy, ix, 0.0)
        P = psf.stamps(xs, ys, sf, xc, yc)
        D = Rs + fs[:, None, None] * P
        sw = np.einsum("mpq,mpq->m", Ws, P * P)
        ok = sw > 0
        swd = np.einsum("mpq,mpq->m", Ws * P, D)
        psf_flux = np.where(ok, swd / np.where(ok, sw, 1.0), np.nan)
        var = np.einsum("mpq,mpq->m", (Ws * P) ** 2, Vs) / np.where(ok, sw, 1.0) ** 2
        psf_err = np.where(ok, np.sqrt(var), np.nan)
        fl = np.zeros(m, dtype=np.int64)
        fl[~ok] |= F_.FLAG_PSF_FLUX
        fl[~inside.all(axis=(1, 2))] |= F_.FLAG_STAMP_EDGE
        # blendedness: neighbours' model flux seen through the PSF
        nb = Ms - fs[:, None, None] * P
        with np.errstate(divide="ignore", invalid="ignore"):
            bl = np.einsum("mpq,mpq->m", P, nb) / (np.abs(fs) * np.einsum("mpq,mpq->m", P, P))
        fl[np.nan_to_num(bl) > cfg.blend_fraction] |= F_.FLAG_BLENDED
        # centroid errors from the 3-parameter sandwich at the final position
        Fn, _, _, cov, good = _fit_chunk(ctx, R, xs, ys, fs, True)
        with np.errstate(divide="ignore", invalid="ignore"):
            fa = np.abs(np.where(np.isfinite(psf_flux), psf_flux, Fn))
            x_err = np.sqrt(np.abs(cov[:, 1, 1])) / fa
            y_err = np.sqrt(np.abs(cov[:, 2, 2])) / fa
        # apertures on the neighbour-subtracted image; masked pixels -> own model
        iya, ixa = stamp_grid(xc, yc, sa)
        Ra, ins_a = gather(R, iya, ixa, 0.0)
        Ua, _ = gather(usable, iya, ixa, False)
        Va, _ = gather(V, iya, ixa, 0.0)
        Pa = psf.stamps(xs, ys, sa, xc, yc)
        own = fs[:, None, None] * Pa
        Da = np.where(Ua, Ra + own, own)
        off = np.arange(sa) - ha
        ddx = off[None, None, :] - (xs - xc)[:, None, None]
        ddy = off[None, :, None] - (ys - yc)[:, None, None]
        for r in radii:
            a = aperture_stamps(xs - xc, ys - yc, r, ha)
            name = ap_column(r)
            out[name][sl] = np.einsum("mpq,mpq->m", a, Da)
            out[name + "_err"][sl] = np.sqrt(np.einsum("mpq,mpq->m", a * a, Va))
            if r == max(radii):
                bad_in = ((a > 0) & ~Ua).any(axis=(1, 2))
                fl[bad_in] |= F_.FLAG_APERTURE_EDGE
        # adaptive moments on a smaller central stamp
        c0 = ha - hmom
        c1 = ha + hmom + 1
        ixx, iyy, ixy, mok = _adaptive_moments(Da[:, c0:c1, c0:c1], Ua[:, c0:c1, c0:c1], ddx[:, :, c0:c1],
                                               ddy[:, c0:c1, :], fwhm_sig2, cfg.moments_iter, hmom)
        fl[~mok] |= F_.FLAG_MOMENTS
        out["x"][sl] = xs
        out["y"][sl] = ys
        out["x_err"][sl] = x_err
        out["y_err"][sl] = y_err
        out["psf_flux"][sl] = psf_flux
        out["psf_flux_err"][sl] = psf_err
        out["ixx"][sl] = ixx
        out["iyy"][sl] = iyy
        out["ixy"][sl] = ixy
        flags[sl] |= fl
    with np.errstate(divide="ignore", invalid="ignore"):
        out["snr"] = out["psf_flux"] / out["psf_flux_err"]
    xi = np.clip(np.floor(x + 0.5).astype(np.int64), 0, shape[1] - 1)
    yi = np.clip(np.floor(y + 0.5).astype(np.int64), 0, shape[0] - 1)
    out["sky"] = background[yi, xi].astype(np.float64) if background is not None else np.zeros(n)
    if mask is not None:
        flags |= mask_or_within(mask, x, y, cfg.flag_radius)
    out["flags"] = flags
    df = pd.DataFrame(out)
    for c in ("x", "y", "x_err", "y_err", "snr", "ixx", "iyy", "ixy", "sky"):
        df[c] = df[c].astype(np.float32)
    if return_model:
        # the model of the last fit iteration (the final 1-parameter fluxes differ negligibly)
        return df, model
    return df


def _empty_columns(radii) -> dict:
    cols = ["x", "y", "x_err", "y_err", "psf_flux", "psf_flux_err"]
    for r in radii:
        cols += [ap_column(r), ap_column(r) + "_err"]
    cols += ["snr", "ixx", "iyy", "ixy", "sky", "flags"]
    return {c: np.array([], dtype=np.int64 if c == "flags" else np.float64) for c in cols}


def _adaptive_moments(D, U, ddx, ddy, s2, n_iter, half):
    """Adaptive second moments of stamps ``D`` about their centre offsets (px^2)."""
    m = D.shape[0]
    mxx = np.full(m, s2)
    myy = np.full(m, s2)
    mxy = np.zeros(m)
    ok = np.ones(m, dtype=bool)
    lim = (half / 2.0) ** 2
    for _ in range(max(1, n_iter)):
        det = mxx * myy - mxy * mxy
        ok &= det > 0
        det = np.where(det > 0, det, 1.0)
        ixx_, iyy_, ixy_ = myy / det, mxx / det, -mxy / det
        q = ixx_[:, None, None] * ddx ** 2 + iyy_[:, None, None] * ddy ** 2 + 2 * ixy_[:, None, None] * ddx * ddy
        w = np.exp(-0.5 * np.minimum(q, 50.0)) * U
        I = w * D
        s0 = I.sum(axis=(1, 2))
        ok &= s0 > 0
        s0 = np.where(s0 > 0, s0, 1.0)
        qxx = (I * ddx * ddx).sum(axis=(1, 2)) / s0
        qyy = (I * ddy * ddy).sum(axis=(1, 2)) / s0
        qxy = (I * ddx * ddy).sum(axis=(1, 2)) / s0
        # weighted moments Q of a Gaussian C under weight M satisfy Q^-1 = C^-1 + M^-1
        nxx, nyy, nxy = 2 * qxx, 2 * qyy, 2 * qxy
        bad = (nxx <= 0) | (nyy <= 0) | (nxx * nyy - nxy ** 2 <= 0) | (nxx > lim) | (nyy > lim) | ~np.isfinite(nxx + nyy + nxy)
        ok &= ~bad
        mxx = np.where(ok, nxx, mxx)
        myy = np.where(ok, nyy, myy)
        mxy = np.where(ok, nxy, mxy)
    mxx = np.where(ok, mxx, s2)
    myy = np.where(ok, myy, s2)
    mxy = np.where(ok, mxy, 0.0)
    return mxx, myy, mxy, ok


def mask_or_within(mask: np.ndarray, x: np.ndarray, y: np.ndarray, radius: int) -> np.ndarray:
    """OR of the mask bits within ``radius`` px (a disk) of each position; int64."""
    r = int(radius)
    s = 2 * r + 1
    off = np.arange(s) - r
    disk = (off[:, None] ** 2 + off[None, :] ** 2) <= r * r
    xc = np.floor(np.asarray(x) + 0.5).astype(np.int64)
    yc = np.floor(np.asarray(y) + 0.5).astype(np.int64)
    out = np.zeros(xc.size, dtype=np.int64)
    for sl in chunks(xc.size, 65536):
        iy, ix = stamp_grid(xc[sl], yc[sl], s)
        ms, _ = gather(mask, iy, ix, 0)
        ms = np.where(disk[None], ms, 0).astype(np.int64)
        out[sl] = np.bitwise_or.reduce(ms.reshape(ms.shape[0], -1), axis=1)
    return out
