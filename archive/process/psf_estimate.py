"""Empirical PSF: select stars, build a spatially varying pixelized PSF (``PixelPSF``).

1. Detect bright sources with a Gaussian guess of the PSF and measure them.
2. Keep isolated, unflagged, unsaturated stars with S/N above ``min_snr`` whose
   adaptive-moment size lies within ``size_clip`` robust sigma of the stellar locus.
3. Build the model on a grid oversampled by ``oversample``: every star pixel,
   divided by the star's flux, is a sample of the PSF at offset (pixel - centroid)
   and detector position (x, y). Each oversampled pixel of the model is a
   polynomial of degree ``degree`` in (x, y), fitted by weighted least squares over
   all samples falling in it (all pixels at once with ``bincount`` normal
   equations). Iterations refine it the Anderson-King way: the model is
   interpolated at the exact sample offsets and the binned residuals are added
   back, which removes the blur of binning; samples more than ``clip_sigma`` off
   are rejected (neighbours, cosmic rays).
4. The model is normalised (sum 1 in native pixels everywhere) and recentred; the
   stars are re-measured with it (new centroids and fluxes) and the model rebuilt.

Reports the FWHM (px) and ellipticity ``1 - b/a`` of the model at the detector
centre and over a grid, and the stars used.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from archive.errors import ValidationError
from archive.image.psf import PixelPSF, fwhm_from_image, n_poly_terms, poly_design
from archive.process import flags as F_
from archive.process.measure import MeasureConfig, _adaptive_moments, measure_sources
from archive.process.psfmodel import GaussianPsf, GridStampPsf
from archive.process.sources import SourceConfig, detect_and_measure
from archive.process.detect import DetectionConfig

log = logging.getLogger(__name__)


@dataclass
class PsfEstimateConfig:
    """Configuration of :func:`estimate_psf`.

    initial_fwhm: FWHM guess (px) for the first detection; refined from the stars' moments.
    detect_threshold: detection threshold (sigma) of the star-finding pass.
    min_snr: minimum PSF S/N of a PSF star.
    max_stars: at most this many stars (the brightest) are used.
    isolation: no other source within this many FWHM of a PSF star ...
    isolation_flux: ... brighter than this fraction of it.
    size_clip: stars whose moment size is this many robust sigma off the locus are dropped.
    reject_planes: a star with any of these mask planes within 3 px is dropped.
    oversample: model samples per native pixel.
    half_size_fwhm: native half-size of the model in FWHM (at least 7 px).
    degree: polynomial degree of the spatial variation (lowered until there are ``stars_per_term`` stars per term).
    n_iter: build/refine iterations per outer pass; n_outer: re-centroid + rebuild passes.
    clip_sigma: sample rejection threshold.
    refit_stars: refit the stars' fluxes and centroids inside the builder after every model update
        (off by default: on a 5-star frame and on a defocused epoch the joint fit ran away to a
        too-narrow PSF).
    """

    initial_fwhm: float = 3.0
    detect_threshold: float = 20.0
    min_snr: float = 20.0
    max_stars: int = 400
    isolation: float = 2.5
    isolation_flux: float = 0.1
    size_clip: float = 3.0
    reject_planes: tuple[str, ...] = ("SAT", "BAD", "CR", "NO_DATA", "EDGE", "SUSPECT", "INTRP", "STREAK")
    oversample: int = 2
    half_size_fwhm: float = 3.0
    degree: int = 2
    n_iter: int = 3
    n_outer: int = 3
    clip_sigma: float = 4.0
    stars_per_term: int = 5
    refit_stars: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PsfResult:
    """psf: the PixelPSF; fwhm (px, detector centre); ellipticity (1 - b/a) and theta
    (deg, major axis from +x) at the centre; fwhm_range: (min, max) FWHM over a 3x3
    grid; stars: the candidate table with a ``used`` column; n_stars: stars used."""

    psf: PixelPSF
    fwhm: float
    ellipticity: float
    theta: float
    fwhm_range: tuple[float, float]
    stars: pd.DataFrame
    n_stars: int
    degree: int


def _moments_shape(ixx, iyy, ixy):
    tr = 0.5 * (ixx + iyy)
    d = np.sqrt(0.25 * (ixx - iyy) ** 2 + ixy ** 2)
    a2, b2 = tr + d, max(tr - d, 1e-12)
    e = 1.0 - np.sqrt(b2 / a2)
    theta = 0.5 * np.degrees(np.arctan2(2 * ixy, ixx - iyy))
    return float(e), float(theta)


def select_stars(sources: pd.DataFrame, fwhm: float, config: PsfEstimateConfig,
                 mask_planes=None) -> np.ndarray:
    """Boolean selection of PSF stars in a measured source table (see module doc)."""
    cfg = config
    n = len(sources)
    if n == 0:
        return np.zeros(0, dtype=bool)
    flags = sources["flags"].to_numpy()
    bad = F_.plane_bits(mask_planes, *cfg.reject_planes) | int(
        F_.FLAG_PSF_FLUX | F_.FLAG_CENTROID | F_.FLAG_MOMENTS | F_.FLAG_STAMP_EDGE | F_.FLAG_APERTURE_EDGE)
    ok = ((flags & bad) == 0) & (sources["snr"].to_numpy() > cfg.min_snr)
    ok &= np.isfinite(sources["psf_flux"].to_numpy()) & (sources["psf_flux"].to_numpy() > 0)
    # isolation against every detected source
    pts = np.column_stack([sources["x"].to_numpy(np.float64), sources["y"].to_numpy(np.float64)])
    flux = np.abs(sources["psf_flux"].to_numpy(np.float64))
    pairs = cKDTree(pts).query_pairs(cfg.isolation * fwhm, output_type="ndarray")
    if len(pairs):
        a, b = pairs[:, 0], pairs[:, 1]
        ok[a[flux[b] > cfg.isolation_flux * flux[a]]] = False
        ok[b[flux[a] > cfg.isolation_flux * flux[b]]] = False
    # stellar locus in the moments: robust clip of ixx, iyy and ixy separately
    mom = [sources[c].to_numpy(np.float64) for c in ("ixx", "iyy", "ixy")]
    scale = np.median(0.5 * (mom[0][ok] + mom[1][ok])) if ok.any() else 1.0
    for _ in range(3):
        if ok.sum() < 3:
            break
        for q in mom:
            med = np.median(q[ok])
            sig = max(1.4826 * np.median(np.abs(q[ok] - med)), 0.02 * scale)
            ok &= np.abs(q - med) < cfg.size_clip * sig
    if ok.sum() > cfg.max_stars:
        order = np.argsort(-sources["snr"].to_numpy())
        keep = np.zeros(n, dtype=bool)
        keep[order[np.isin(order, np.nonzero(ok)[0])][: cfg.max_stars]] = True
        ok = keep
    return ok


class _Keys:
    """Bicubic (Keys, a = -0.5) interpolation of S x S model images at every star's pixel grid.

    A star's native pixels sample the model on a separable grid (``cu`` varies along
    columns, ``cv`` along rows), so the values are ``Wy B Wx^T`` per star with dense
    4-tap rows - two matrix products for all stars at once. ``(basis, sel)`` returns
    ``(K, n_sel)`` values in the flattened ``(star, row, column)`` order of the samples.
    """

    def __init__(self, cu: np.ndarray, cv: np.ndarray, S: int):
        # cu: (n, sn, sn) varying along the last axis; cv varying along the middle axis
        self.S = S

        def rows(c):
            n, m = c.shape
            i0 = np.floor(c).astype(np.int64) - 1
            t = c - (i0 + 1)
            d = np.stack([t + 1, t, 1 - t, 2 - t], axis=-1)
            a = -0.5
            ad = np.abs(d)
            w = np.where(ad <= 1, (a + 2) * ad ** 3 - (a + 3) * ad ** 2 + 1,
                         np.where(ad < 2, a * ad ** 3 - 5 * a * ad ** 2 + 8 * a * ad - 4 * a, 0.0))
            idx = i0[..., None] + np.arange(4)
            ok = (idx >= 0) & (idx < S)
            out = np.zeros((n, m, S))
            nn = np.broadcast_to(np.arange(n)[:, None, None], idx.shape)
            mm = np.broadcast_to(np.arange(m)[None, :, None], idx.shape)
            out[nn[ok], mm[ok], idx[ok]] = w[ok]
            return out
        self.wx = rows(cu[:, 0, :])  # (n, sn, S)
        self.wy = rows(cv[:, :, 0])  # (n, sn, S)

    def __call__(self, basis: np.ndarray, sel=None) -> np.ndarray:
        n, sn, S = self.wy.shape
        out = []
        wxT = self.wx.transpose(0, 2, 1)
        for b in basis:
            t = (self.wy.reshape(n * sn, S) @ b).reshape(n, sn, S)
            v = np.matmul(t, wxT).ravel()
            out.append(v if sel is None else v[sel])
        return np.stack(out)


def _fit_bins(bins: np.ndarray, nbins: int, T: np.ndarray, d: np.ndarray, w: np.ndarray, ridge: float) -> np.ndarray:
    """Per-bin weighted polynomial fit: returns (n_terms, nbins) coefficients."""
    nt = T.shape[1]
    A = np.zeros((nbins, nt, nt))
    b = np.zeros((nbins, nt))
    for i in range(nt):
        b[:, i] = np.bincount(bins, weights=w * T[:, i] * d, minlength=nbins)
        for j in range(i, nt):
            v = np.bincount(bins, weights=w * T[:, i] * T[:, j], minlength=nbins)
            A[:, i, j] = v
            A[:, j, i] = v
    # tiny ridge keeps empty / degenerate bins solvable (they come out 0)
    scale = np.maximum(A[:, 0, 0], 1e-300)
    A += ridge * scale[:, None, None] * np.eye(nt)[None] + 1e-300 * np.eye(nt)[None]
    sol = np.linalg.solve(A, b[..., None])[..., 0]
    sol[A[:, 0, 0] <= 1e-250] = 0.0
    return sol.T


def _normalise_and_centre(basis: np.ndarray, os_: int) -> np.ndarray:
    """Sum of the constant term = os^2, others 0; recentre on the constant term's centroid."""
    b = basis.copy()
    s0 = b[0].sum()
    if not s0 > 0:
        raise ValidationError("PSF model has no positive flux")
    for t in range(1, b.shape[0]):
        b[t] -= b[t].sum() / s0 * b[0]
    b[0] *= os_ ** 2 / s0
    for t in range(1, b.shape[0]):
        b[t] *= os_ ** 2 / s0
    S = b.shape[1]
    c = S // 2
    g = np.arange(S) - c
    core = np.clip(b[0], 0, None) * (np.hypot(g[None, :], g[:, None]) <= S / 4)
    tot = core.sum()
    dx = (core * g[None, :]).sum() / tot
    dy = (core * g[:, None]).sum() / tot
    if abs(dx) > 1e-3 or abs(dy) > 1e-3:
        b = np.stack([ndimage.shift(bi, (-dy, -dx), order=3, mode="constant", cval=0.0) for bi in b])
    return b


def _star_fit(psf: PixelPSF, D: np.ndarray, w: np.ndarray, x: np.ndarray, y: np.ndarray, xc: np.ndarray,
              yc: np.ndarray, flux: np.ndarray):
    """Linearised weighted fit of ``F P(x, y)`` to star stamps ``D`` (centred on ``xc, yc``): new (F, x, y, ok)."""
    from archive.process.psfmodel import PixelStampPsf

    sn = D.shape[1]
    P, Px, Py = PixelStampPsf(psf).stamps_with_gradient(x, y, sn, xc, yc)
    A = np.stack([P, Px, Py], axis=1).astype(np.float64)
    WA = A * w[:, None]
    N = np.einsum("mapq,mbpq->mab", WA, A)
    b = np.einsum("mapq,mpq->ma", WA, D)
    ok = np.abs(np.linalg.det(N)) > 1e-30 * np.maximum(N[:, 0, 0], 1e-300) ** 3
    N[~ok] = np.eye(3)
    sol = np.linalg.solve(N, b[..., None])[..., 0]
    F = sol[:, 0]
    ok &= F > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = np.clip(np.where(ok, sol[:, 1] / F, 0.0), -0.5, 0.5)
        dy = np.clip(np.where(ok, sol[:, 2] / F, 0.0), -0.5, 0.5)
    return np.where(ok, F, flux), x + dx, y + dy, ok


def build_pixel_psf(image: np.ndarray, variance: np.ndarray, usable: np.ndarray, x: np.ndarray, y: np.ndarray,
                    flux: np.ndarray, bbox: tuple[float, float, float, float], *, half: int, oversample: int,
                    degree: int, n_iter: int = 3, clip_sigma: float = 4.0, refit_stars: bool = False,
                    neighbours: np.ndarray | None = None) -> tuple[PixelPSF, np.ndarray]:
    """Fit a PixelPSF to stars at (x, y) with fluxes ``flux`` on a background-subtracted image.

    ``half``: native half-size of the model. ``refit_stars``: after every model update
    each star's flux and centroid are refitted with the current model (the measurement's
    own evaluation of it), so the model and the stars' positions and fluxes converge
    together instead of inheriting the errors of the starting (e.g. Gaussian) fits.
    ``neighbours``: optional stamps ``(n, 2 half + 1, 2 half + 1)`` of neighbouring
    sources' models to subtract. Returns the PSF, the per-star fraction of samples
    kept, and the refitted ``(x, y, flux)``.
    """
    n = x.size
    if n == 0:
        raise ValidationError("build_pixel_psf: no stars")
    x = np.asarray(x, np.float64).copy()
    y = np.asarray(y, np.float64).copy()
    flux = np.asarray(flux, np.float64).copy()
    os_ = int(oversample)
    S = 2 * half * os_ + 1
    c = S // 2
    xc = np.floor(x + 0.5).astype(np.int64)
    yc = np.floor(y + 0.5).astype(np.int64)
    sn = 2 * half + 1
    off = np.arange(sn) - half
    iy = yc[:, None] + off
    ix = xc[:, None] + off
    ny, nx = image.shape
    iyc = np.clip(iy, 0, ny - 1)
    ixc = np.clip(ix, 0, nx - 1)
    inside = ((iy >= 0) & (iy < ny))[:, :, None] & ((ix >= 0) & (ix < nx))[:, None, :]
    D = image[iyc[:, :, None], ixc[:, None, :]].astype(np.float64)
    if neighbours is not None:
        D = D - neighbours
    V = variance[iyc[:, :, None], ixc[:, None, :]].astype(np.float64)
    U = usable[iyc[:, :, None], ixc[:, None, :]] & inside & np.isfinite(D) & (V > 0)
    D = np.where(U, D, 0.0)
    w0 = np.where(U, 1.0 / np.where(V > 0, V, 1.0), 0.0)  # per-pixel inverse variance
    star = np.broadcast_to(np.arange(n)[:, None, None], D.shape)
    flat_star = star.ravel()
    T_star = poly_design(x, y, degree, bbox)  # (n, nt)
    nt = T_star.shape[1]

    def geometry():
        # sample offsets (oversampled model coordinates) of every star pixel, their bins and weights
        u = (ix - x[:, None])[:, None, :] + np.zeros((1, sn, 1))
        v = (iy - y[:, None])[:, :, None] + np.zeros((1, 1, sn))
        cu = c + u * os_
        cv = c + v * os_
        bu = np.floor(cu + 0.5).astype(np.int64)
        bv = np.floor(cv + 0.5).astype(np.int64)
        inb = (bu >= 0) & (bu < S) & (bv >= 0) & (bv < S)
        d = D / flux[:, None, None]
        w = w0 * flux[:, None, None] ** 2
        return cu, cv, (bv * S + bu), inb, d, w, _Keys(cu, cv, S)

    cu, cv, bins_all, inb, d, w, keys = geometry()
    keep = U & inb
    mean = np.zeros((1, S, S))
    modes = None
    coefs = np.zeros((3, nt))

    def spatial(sel_, stars_s):
        if modes is None or degree == 0:
            return 0.0
        mv = keys(modes, sel_)  # (3, m)
        return (mv * (coefs @ T_star[stars_s].T)).sum(axis=0)

    def current_psf():
        if degree > 0 and modes is not None:
            cmat = np.zeros((4, nt))
            cmat[0, 0] = 1.0
            cmat[1:] = coefs
            return PixelPSF(np.concatenate([mean, modes]), cmat, oversample=os_, degree=degree, bbox=bbox)
        return PixelPSF(mean, None, oversample=os_, degree=0, bbox=bbox)

    n_round = max(1, n_iter) + 1
    for it in range(n_round):
        sel = keep.ravel()
        bins = bins_all.ravel()[sel]
        st = flat_star[sel]
        d_f, w_f = d.ravel(), w.ravel()
        mean_vals = keys(mean, sel)[0] if it else 0.0
        resid = d_f[sel] - mean_vals - spatial(sel, st)
        mean = mean + _fit_bins(bins, S * S, np.ones((bins.size, 1)), resid, w_f[sel], 1e-9).reshape(1, S, S)
        mean = _normalise_and_centre(mean, os_)
        if degree > 0 and it >= 1:
            # spatial variation as polynomials times three shape modes of the mean:
            # dilation and the two shears (first-order changes of size and ellipticity)
            modes = _shape_modes(mean[0])
            mv = keys(modes, sel)  # (3, m)
            T = T_star[st]
            X = (mv[:, :, None] * T[:, None, :].transpose(1, 0, 2)).transpose(1, 0, 2).reshape(st.size, 3 * nt)
            mvals = keys(mean, sel)[0]
            yv = d_f[sel] - mvals
            ww = w_f[sel]
            A = (X * ww[:, None]).T @ X
            b = (X * ww[:, None]).T @ yv
            A += 1e-9 * np.trace(A) / A.shape[0] * np.eye(A.shape[0])
            coefs = np.linalg.solve(A, b).reshape(3, nt)
        if refit_stars and 0 < it < n_round - 1:
            # new fluxes and centroids with the current model, then the sample geometry again
            F2, x2, y2, ok = _star_fit(current_psf(), D, np.where(keep, w0, 0.0), x, y, xc, yc, flux)
            flux = np.where(ok, F2, flux)
            x = np.where(ok, x2, x)
            y = np.where(ok, y2, y)
            cu, cv, bins_all, inb, d, w, keys = geometry()
        # clip outliers against the current model
        allm = (keys(mean)[0] + spatial(None, flat_star)).reshape(D.shape)
        chi = (d - allm) * np.sqrt(w)
        # the model's own error near the core is larger than the noise of bright stars: scale by a robust sigma
        s_ = 1.4826 * np.median(np.abs(chi[keep])) if keep.any() else 1.0
        keep = U & inb & (np.abs(chi) < clip_sigma * max(s_, 1.0))
    psf = current_psf()
    frac = keep.reshape(n, -1).sum(axis=1) / np.maximum(U.reshape(n, -1).sum(axis=1), 1)
    return psf, frac, (x, y, flux)


def _shape_modes(m: np.ndarray) -> np.ndarray:
    """Dilation and shear modes ``(3, S, S)`` of a centred image (each integrates to ~0)."""
    S = m.shape[0]
    g = np.arange(S) - S // 2
    X = np.broadcast_to(g[None, :], m.shape)
    Y = np.broadcast_to(g[:, None], m.shape)
    gy, gx = np.gradient(m)
    dil = -(2.0 * m + X * gx + Y * gy)
    e1 = X * gx - Y * gy
    e2 = Y * gx + X * gy
    out = np.stack([dil, e1, e2])
    # scale each mode to the mean's peak so the coefficients are comparable
    return out * (m.max() / np.maximum(np.abs(out).max(axis=(1, 2), keepdims=True), 1e-300))


def _neighbour_stamps(shape, psf, x, y, flux, xs, ys, half) -> np.ndarray:
    """Models of the sources ``(x, y, flux)`` seen in the stamps (half-size ``half``) of the
    stars at ``(xs, ys)``: only the sources that reach a star's stamp are rendered, into a
    padded scratch plane that is read back at the stamps (no full-image model)."""
    from archive.process.measure import MeasureFrame, _model_flat
    from archive.process.stamps import PaddedFrame

    sn = 2 * half + 1
    xcs = np.floor(xs + 0.5).astype(np.int64)
    ycs = np.floor(ys + 0.5).astype(np.int64)
    if len(x) == 0:
        return np.zeros((len(xs), sn, sn))
    d, _ = cKDTree(np.column_stack([xs, ys])).query(np.column_stack([x, y]), k=1, p=np.inf)
    near = d < 2 * half + 2
    x, y, flux = x[near], y[near], flux[near]
    xc = np.floor(x + 0.5).astype(np.int64)
    yc = np.floor(y + 0.5).astype(np.int64)
    ny, nx = shape
    allx = np.concatenate([xc, xcs])
    ally = np.concatenate([yc, ycs])
    reach = int(max(0, -allx.min(), -ally.min(), allx.max() - nx + 1, ally.max() - ny + 1))
    fr = PaddedFrame(tuple(shape), half + reach + 2)
    mf = MeasureFrame(fr, np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, bool))
    plane = _model_flat(mf, psf, x, y, flux, half, 4096)
    return plane[fr.index(xcs, ycs, sn)].astype(np.float64)


def estimate_psf(image: np.ndarray, variance: np.ndarray, *, mask: np.ndarray | None = None, mask_planes=None,
                 background_variance: np.ndarray | None = None, config: PsfEstimateConfig | None = None,
                 sources: pd.DataFrame | None = None) -> PsfResult:
    """Estimate a spatially varying PixelPSF from a background-subtracted image.

    image: background-subtracted pixels; variance: per-pixel variance; mask and
    mask_planes: the mask image and its plane layout. ``sources``: an already
    measured table to pick stars from (else a bright detection pass is run).
    """
    from archive.process.measure import prepare_frame
    from archive.process.psfmodel import PixelStampPsf

    cfg = config or PsfEstimateConfig()
    image = np.asarray(image, dtype=np.float32)
    variance = np.asarray(variance, dtype=np.float32)
    if image.ndim != 2 or variance.shape != image.shape:
        raise ValidationError(f"estimate_psf: image {image.shape} and variance {variance.shape} must be equal 2-D shapes")
    ny, nx = image.shape
    bits = F_.plane_bits(mask_planes, "BAD", "SAT", "CR", "NO_DATA")
    usable = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    if mask is not None:
        usable &= (np.asarray(mask) & bits) == 0
    fwhm = float(cfg.initial_fwhm)
    det_cfg = SourceConfig(detection=DetectionConfig(threshold=cfg.detect_threshold), n_passes=1,
                           measure=MeasureConfig(n_iter=2, aperture_radii=()))
    frame = None

    def get_frame():
        nonlocal frame
        if frame is None:
            frame = prepare_frame(image, variance, mask, background_variance=background_variance,
                                  mask_planes=mask_planes, bad_planes=det_cfg.measure.bad_planes)
        return frame
    if sources is None:
        sources, model = detect_and_measure(image, variance, GaussianPsf(fwhm), mask=mask, mask_planes=mask_planes,
                                            background_variance=background_variance, config=det_cfg)
        del model
        # refine the FWHM from the bright, compact sources' moments and measure again
        good = (sources["snr"] > cfg.min_snr) & ((sources["flags"].to_numpy() & F_.plane_bits(mask_planes, "SAT", "CR")) == 0)
        if good.sum() >= 5:
            s2 = np.median(0.5 * (sources.loc[good, "ixx"] + sources.loc[good, "iyy"])) - 1.0 / 12.0
            if s2 > 0.05:
                new = float(np.sqrt(s2) * 2.3548200450309493)
                if abs(new - fwhm) > 0.1 * fwhm:
                    fwhm = new
                    sources = measure_sources(image, variance, mask, GaussianPsf(fwhm),
                                              sources["x"].to_numpy(np.float64), sources["y"].to_numpy(np.float64),
                                              background_variance=background_variance, mask_planes=mask_planes,
                                              flux_guess=sources["psf_flux"].fillna(0).to_numpy(np.float64),
                                              config=det_cfg.measure, frame=get_frame())
    sel = select_stars(sources, fwhm, cfg, mask_planes)
    nsel = int(sel.sum())
    if nsel < 3:
        raise ValidationError(f"estimate_psf: only {nsel} usable PSF stars (need >= 3; S/N > {cfg.min_snr}, isolated, unflagged)")
    degree = cfg.degree
    while degree > 0 and nsel < cfg.stars_per_term * n_poly_terms(degree):
        degree -= 1
    x_all = sources["x"].to_numpy(np.float64).copy()
    y_all = sources["y"].to_numpy(np.float64).copy()
    f_all = sources["psf_flux"].fillna(0.0).to_numpy(np.float64).copy()
    idx = np.nonzero(sel)[0]
    half = max(7, int(np.ceil(cfg.half_size_fwhm * fwhm)))
    bbox = (0.0, 0.0, float(nx - 1), float(ny - 1))
    frac = np.ones(nsel)
    mcfg = MeasureConfig(n_iter=3, fit_halfsize_fwhm=2.0, aperture_radii=())
    sp = GaussianPsf(fwhm)
    others = np.ones(len(x_all), dtype=bool)
    others[idx] = False
    for outer in range(max(1, cfg.n_outer)):
        # neighbours of the PSF stars are subtracted with their current models (the first
        # time with their Gaussian-PSF fits) inside the stars' stamps
        nb = _neighbour_stamps(image.shape, sp, x_all[others], y_all[others], f_all[others], x_all[idx], y_all[idx],
                               half)
        psf, frac, (xs, ys, fs) = build_pixel_psf(image, variance, usable, x_all[idx], y_all[idx], f_all[idx], bbox,
                                                  half=half, oversample=cfg.oversample, degree=degree,
                                                  n_iter=cfg.n_iter, clip_sigma=cfg.clip_sigma, neighbours=nb,
                                                  refit_stars=cfg.refit_stars)
        x_all[idx], y_all[idx], f_all[idx] = xs, ys, fs
        if outer + 1 < max(1, cfg.n_outer):
            # re-measure the PSF stars and their neighbours jointly (blends are refitted) with
            # the new model
            sp = PixelStampPsf(psf)
            pts = np.column_stack([x_all, y_all])
            dmin, _ = cKDTree(pts[idx]).query(pts, k=1)
            near = dmin < 2 * half + 3 * fwhm
            near[idx] = True
            sub = np.nonzero(near)[0]
            m = measure_sources(image, variance, mask, sp, x_all[sub], y_all[sub],
                                background_variance=background_variance, mask_planes=mask_planes,
                                flux_guess=f_all[sub], config=mcfg, frame=get_frame())
            okm = np.isfinite(m["psf_flux"].to_numpy()) & (m["psf_flux"].to_numpy() > 0) & \
                ((m["flags"].to_numpy() & int(F_.FLAG_CENTROID)) == 0)
            # the stars and their neighbours all take these joint fits with the new model
            x_all[sub[okm]] = m["x"].to_numpy(np.float64)[okm]
            y_all[sub[okm]] = m["y"].to_numpy(np.float64)[okm]
            f_all[sub[okm]] = m["psf_flux"].to_numpy(np.float64)[okm]
            # far sources cannot reach the stamps; near ones now carry the new model's fits
            keep_o = others & near
            others = keep_o
    # summary: FWHM and ellipticity over the detector
    fw_c = fwhm_from_image(psf.model((nx - 1) / 2.0, (ny - 1) / 2.0), psf.oversample)
    grid = [(gx, gy) for gy in np.linspace(0, ny - 1, 3) for gx in np.linspace(0, nx - 1, 3)]
    fws = [fwhm_from_image(psf.model(gx, gy), psf.oversample) for gx, gy in grid]
    k = psf.model((nx - 1) / 2.0, (ny - 1) / 2.0)
    S = k.shape[0]
    g = (np.arange(S) - S // 2) / psf.oversample
    ddx = np.broadcast_to(g[None, None, :], (1, S, S))
    ddy = np.broadcast_to(g[None, :, None], (1, S, S))
    s2 = (fw_c / 2.3548200450309493) ** 2
    ixx, iyy, ixy, _ = _adaptive_moments(k[None], np.ones((1, S, S), bool), ddx, ddy, s2, 12, S // (2 * psf.oversample))
    e, theta = _moments_shape(ixx[0], iyy[0], ixy[0])
    stars_all = sources.copy()
    stars_all["used"] = sel
    log.info("PSF from %d stars (degree %d): FWHM %.2f px (%.2f-%.2f), ellipticity %.3f", nsel, degree, fw_c,
             min(fws), max(fws), e)
    return PsfResult(psf=psf, fwhm=float(fw_c), ellipticity=e, theta=theta, fwhm_range=(float(min(fws)), float(max(fws))),
                     stars=stars_all, n_stars=nsel, degree=degree)


def run(exposure, config: PsfEstimateConfig | None = None, background=None):
    """Estimate the PSF of an Exposure; returns ``(exposure_copy_with_psf, PsfResult)``.

    ``background``: a :class:`~archive.process.background.Background` to subtract first
    (estimated when None).
    """
    from archive.process.background import estimate_background

    img = exposure.image.astype(np.float32)
    var = exposure.variance.astype(np.float32)
    bad = exposure.mask_of(*[p for p in ("BAD", "SAT", "NO_DATA") if p in exposure.mask_planes])
    bkg = background if background is not None else estimate_background(img, mask=bad | ~np.isfinite(img))
    res = estimate_psf(img - bkg.background, var, mask=exposure.mask, mask_planes=exposure.mask_planes,
                       background_variance=bkg.variance, config=config)
    out = exposure.copy()
    out.psf = res.psf
    return out, res
