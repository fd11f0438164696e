"""Empirical PSF: select stars, build a spatially varying pixelized PSF (``PixelPSF``).

1. Detect bright sources with a Gaussian guess of the PSF on the 2x2-binned image (PSF stars
   are far above the threshold); the FWHM is refined from the brightest peaks' adaptive
   moments at native resolution (stamps that follow the estimate, so a PSF much wider than
   the guess is measured, not clipped) and the candidates - the ``1.5 max_stars`` brightest
   peaks and the peaks whose stamps reach theirs - measured once, with it (all peaks when
   too few candidates pass). The other peaks count as neighbours with their matched-filter
   fluxes.
2. Keep isolated, unflagged, unsaturated stars with S/N above ``min_snr`` whose
   adaptive-moment size lies within ``size_clip`` robust sigma of the stellar locus.
3. Build the model (:func:`build_pixel_psf`) sampled every ``1 / oversample`` px (1 for a
   well-sampled PSF: a free model has ``oversample^2`` times the pixels to fit from the same
   stars): every star pixel, divided by the star's flux, samples the PSF at offset
   (pixel - centroid) and detector position (x, y). The mean is first the per-pixel median
   of the samples (one contaminated star cannot shape it), then refined the Anderson-King
   way (residuals at the exact sample offsets, interpolated as the model is evaluated,
   binned back). The spatial variation is polynomials of degree ``degree`` (lowered until
   there are ``stars_per_term`` stars per term) times the mean's dilation and shear modes.
   Every star's amplitude is refitted against the model; pixels off by ``clip_sigma``
   (neighbours, cosmic-ray remnants; grown by a pixel) and stars whose core residual is an
   outlier among the stars are rejected.
4. The model is normalised (sum 1 in native pixels) and recentred; neighbours of the stars
   are re-measured with it and subtracted from the stars' stamps, and the model rebuilt.

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
from archive.image.blas import matmul_rows
from archive.image.moments import adaptive_moments, moments_shape
from archive.image.psf import FWHM_PER_SIGMA, GaussianPSF, PixelPSF, fwhm_from_image, n_poly_terms, poly_design
from archive.process import flags as F_
from archive.process.measure import MeasureConfig, mask_or_within, measure_sources, model_half
from archive.process.robust import mad_sigma
from archive.process.sources import SourceConfig, finish_sources
from archive.process.stamps import gather, stamp_grid
from archive.process.detect import DetectionConfig, find_peaks, snr_map

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
    oversample: model samples per native pixel; 0 = automatic: 1 for a PSF of FWHM >= ``min_fwhm_native``
        px (a free oversampled model has four times the pixels to fit from the same stars, and with
        tens of stars their noise is the model's largest error), else 2.
    min_fwhm_native: see ``oversample``.
    half_size_fwhm: native half-size of the model in FWHM (at least 7 px).
    degree: polynomial degree of the spatial variation (lowered until there are ``stars_per_term`` stars per term).
    n_iter: build/refine iterations per outer pass; n_outer: passes of (re-measure the stars'
        neighbours with the model, subtract them, rebuild).
    clip_sigma: sample rejection threshold.
    model_error: fractional error of the model in the builder's amplitude fits and clip (the
        model is not better than this in the core of a bright star).
    star_clip: stars whose core residual is this many robust sigma above the others' are dropped.
    """

    initial_fwhm: float = 3.0
    detect_threshold: float = 20.0
    min_snr: float = 20.0
    max_stars: int = 400
    isolation: float = 2.5
    isolation_flux: float = 0.1
    size_clip: float = 3.0
    reject_planes: tuple[str, ...] = ("SAT", "BAD", "CR", "NO_DATA", "EDGE", "SUSPECT", "INTRP", "STREAK")
    oversample: int = 0
    min_fwhm_native: float = 2.5
    half_size_fwhm: float = 3.0
    degree: int = 2
    n_iter: int = 3
    n_outer: int = 2
    clip_sigma: float = 4.0
    stars_per_term: int = 2
    model_error: float = 0.02
    star_clip: float = 5.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PsfResult:
    """psf: the PixelPSF; fwhm (px, detector centre); ellipticity (1 - b/a) and theta
    (deg, major axis from +x) at the centre; fwhm_range: (min, max) FWHM over a 3x3
    grid; stars: the candidate table with a ``used`` column; n_stars: stars used; degree:
    of the spatial variation; flux_var: ``(nt, nt)`` matrix of the model's flux uncertainty
    (see :meth:`model_flux_error`)."""

    psf: PixelPSF
    fwhm: float
    ellipticity: float
    theta: float
    fwhm_range: tuple[float, float]
    stars: pd.DataFrame
    n_stars: int
    degree: int
    flux_var: np.ndarray = field(default_factory=lambda: np.zeros((1, 1)))

    def model_flux_error(self, x, y) -> np.ndarray:
        """Fractional error of a PSF flux at pixel (x, y) (origin 0) from the PSF model's
        spatial-term uncertainty (:func:`build_pixel_psf`); add it in quadrature to a
        flux's photon error. 0 for a constant model (its error is common to all sources:
        a zero-point offset, which photometric calibration absorbs)."""
        T = poly_design(np.asarray(x, float), np.asarray(y, float), self.degree, self.psf.bbox)
        return np.sqrt(np.clip(np.einsum("...t,tu,...u->...", T, self.flux_var, T), 0, None))


def select_stars(sources: pd.DataFrame, fwhm: float, config: PsfEstimateConfig,
                 mask_planes=None, others: pd.DataFrame | None = None) -> np.ndarray:
    """Boolean selection of PSF stars in a measured source table (see module doc).

    ``others``: further sources (columns ``x``, ``y`` in px, ``psf_flux`` in image units;
    e.g. faint peaks not measured) that count in the isolation test only."""
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
    tabs = [sources] if others is None or len(others) == 0 else [sources, others]
    pts = np.column_stack([np.concatenate([t["x"].to_numpy(np.float64) for t in tabs]),
                           np.concatenate([t["y"].to_numpy(np.float64) for t in tabs])])
    flux = np.abs(np.concatenate([t["psf_flux"].to_numpy(np.float64) for t in tabs]))
    pairs = cKDTree(pts).query_pairs(cfg.isolation * fwhm, output_type="ndarray")
    if len(pairs):
        a, b = pairs[:, 0], pairs[:, 1]
        iso = np.ones(len(pts), dtype=bool)
        iso[a[flux[b] > cfg.isolation_flux * flux[a]]] = False
        iso[b[flux[a] > cfg.isolation_flux * flux[b]]] = False
        ok &= iso[:n]
    # stellar locus in the moments: robust clip of ixx, iyy and ixy separately
    mom = [sources[c].to_numpy(np.float64) for c in ("ixx", "iyy", "ixy")]
    scale = np.median(0.5 * (mom[0][ok] + mom[1][ok])) if ok.any() else 1.0
    for _ in range(3):
        if ok.sum() < 3:
            break
        for q in mom:
            med = np.median(q[ok])
            sig = max(mad_sigma(q[ok], center=med), 0.02 * scale)
            ok &= np.abs(q - med) < cfg.size_clip * sig
    if ok.sum() > cfg.max_stars:
        order = np.argsort(-sources["snr"].to_numpy())
        keep = np.zeros(n, dtype=bool)
        keep[order[np.isin(order, np.nonzero(ok)[0])][: cfg.max_stars]] = True
        ok = keep
    return ok


def _moment_fwhm(image: np.ndarray, usable, x: np.ndarray, y: np.ndarray, fwhm: float,
                 n_iter: int = 3) -> float | None:
    """Gaussian-equivalent FWHM (px) of sources at (x, y) from their adaptive second moments.

    The median over sources of ``FWHM_PER_SIGMA sqrt((ixx + iyy) / 2 - 1/12)`` (the pixel's own
    1/12 px^2 removed). The stamps (half-size 3 FWHM) follow the estimate for up to
    ``n_iter`` rounds, so a PSF several times wider than the guess is measured, not
    clipped to the stamp. Returns None when no source has valid moments.
    """
    xc = np.floor(x + 0.5).astype(np.int64)
    yc = np.floor(y + 0.5).astype(np.int64)
    for _ in range(n_iter):
        h = max(5, int(np.ceil(3.0 * fwhm)))
        iy, ix = stamp_grid(xc, yc, 2 * h + 1)
        pix, inside = gather(image, iy, ix, 0)
        U = gather(usable, iy, ix, False)[0] & inside
        D = np.where(U, pix, 0.0).astype(np.float64)
        ddx = (ix - x[:, None])[:, None, :]
        ddy = (iy - y[:, None])[:, :, None]
        s2 = (fwhm / FWHM_PER_SIGMA) ** 2
        ixx, iyy, _, ok = adaptive_moments(D, U, ddx, ddy, s2, 12, h)
        if not ok.any():
            return None
        q = np.median(0.5 * (ixx[ok] + iyy[ok])) - 1.0 / 12.0
        if not q > 0.05:
            return None
        new = float(np.sqrt(q) * FWHM_PER_SIGMA)
        done = abs(new - fwhm) < 0.03 * fwhm
        fwhm = new
        if done:
            break
    return fwhm


class _Sampler:
    """The model's own interpolation (:meth:`PixelPSF.kernel`: cubic B-spline of the
    zero-padded basis) at every star pixel, for S x S model images.

    A star's native pixels sample the model on a separable grid (``cu`` varies along
    columns, ``cv`` along rows; oversampled model coordinates, centre ``S // 2``), so the
    values are ``Wy C Wx^T`` per star, with ``C`` the spline coefficients of a basis image
    and dense 4-tap rows - two matrix products for all stars at once. ``(basis, sel)``
    returns ``(K, n_sel)`` values in the flattened ``(star, row, column)`` order of the
    samples. The builder fits the model through the same interpolation that evaluates it.
    """

    def __init__(self, cu: np.ndarray, cv: np.ndarray, S: int):
        P = PixelPSF.SPLINE_PAD
        self.S = S
        Sp = S + 2 * P

        def rows(c):
            n, m = c.shape
            c = c + P
            i0 = np.floor(c).astype(np.int64) - 1
            idx = i0[..., None] + np.arange(4)
            w = PixelPSF.bspline3(c[..., None] - idx)
            ok = (idx >= 0) & (idx < Sp)
            out = np.zeros((n, m, Sp))
            nn = np.broadcast_to(np.arange(n)[:, None, None], idx.shape)
            mm = np.broadcast_to(np.arange(m)[None, :, None], idx.shape)
            out[nn[ok], mm[ok], idx[ok]] = w[ok]
            return out
        # float32 products (half the work of float64): the sampled values err by ~1e-7 of the
        # model's peak, far below the stars' noise
        self.wxT = np.ascontiguousarray(rows(cu[:, 0, :]).transpose(0, 2, 1), dtype=np.float32)  # (n, Sp, sn)
        self.wy = rows(cv[:, :, 0]).astype(np.float32)  # (n, sn, Sp)

    def __call__(self, basis: np.ndarray, sel=None) -> np.ndarray:
        P = PixelPSF.SPLINE_PAD
        n, sn, Sp = self.wy.shape
        K = len(basis)
        # all bases in one pair of products: the row weights times the side-by-side
        # coefficient images, then every star's (K sn, Sp) block times its column weights
        coef = np.concatenate([ndimage.spline_filter(np.pad(b, P), order=3, mode="mirror") for b in basis],
                              axis=1).astype(np.float32)
        t = matmul_rows(self.wy.reshape(n * sn, Sp), coef).reshape(n, sn * K, Sp)
        v = np.matmul(t, self.wxT).reshape(n, sn, K, sn)
        v = v.transpose(2, 0, 1, 3).reshape(K, -1).astype(np.float64)
        return v if sel is None else v[:, sel]


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


def _bin_median(bins: np.ndarray, vals: np.ndarray, nbins: int,
                rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin median of ``vals`` (unweighted: one vote per sample) and the sample counts.

    ``rows``: optional group (star) of every sample, where no group has two samples in one
    bin (a star's native pixels fall in distinct model pixels for an integer oversampling):
    the samples are then laid out as a ``(nbins, groups)`` table padded with +inf and sorted
    along its rows (short independent sorts; ~4x faster than one sort of all samples).
    Both paths give the same medians.
    """
    cnt = np.bincount(bins, minlength=nbins)
    has = cnt > 0
    med = np.zeros(nbins)
    if rows is not None and bins.size:
        tab = np.full((nbins, int(rows.max()) + 1), np.inf)
        tab[bins, rows] = vals
        tab.sort(axis=1)
        b = np.nonzero(has)[0]
        med[has] = 0.5 * (tab[b, (cnt[has] - 1) // 2] + tab[b, cnt[has] // 2])
        return med, cnt
    # values sorted, then stably by bin: the same order as lexsort((vals, bins)) up to ties of
    # equal values, with a fast unstable value sort and a radix sort of small bin numbers
    order = np.argsort(vals)
    bt = np.int16 if nbins <= np.iinfo(np.int16).max else np.int64
    order = order[np.argsort(bins[order].astype(bt), kind="stable")]
    v = vals[order]
    start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    lo = start[has] + (cnt[has] - 1) // 2
    hi = start[has] + cnt[has] // 2
    med[has] = 0.5 * (v[lo] + v[hi])
    return med, cnt


def _grow3x3(b: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of every stamp of a ``(n, h, w)`` bool array (outside = False):
    ``ndimage.binary_dilation(b, np.ones((1, 3, 3)))`` as four shifted ORs (separable box)."""
    r = b.copy()
    r[:, 1:, :] |= b[:, :-1, :]
    r[:, :-1, :] |= b[:, 1:, :]
    out = r.copy()
    out[:, :, 1:] |= r[:, :, :-1]
    out[:, :, :-1] |= r[:, :, 1:]
    return out


def build_pixel_psf(image: np.ndarray, variance: np.ndarray, usable, x: np.ndarray, y: np.ndarray,
                    flux: np.ndarray, bbox: tuple[float, float, float, float], *, half: int, oversample: int,
                    degree: int, n_iter: int = 4, clip_sigma: float = 4.0, model_error: float = 0.02,
                    star_clip: float = 5.0, neighbours: np.ndarray | None = None, fit_half: int | None = None):
    """Fit a PixelPSF to stars at (x, y) (px, origin 0) with fluxes ``flux`` on a background-subtracted image.

    ``usable``: bool image of the usable pixels (or anything indexed like one, e.g. :class:`_UsableAt`).
    ``half``: native half-size (px) of the model; ``oversample``: model samples per pixel;
    ``degree``: polynomial degree of the spatial variation (shape modes of the mean).
    ``neighbours``: optional stamps ``(n, 2 half + 1, 2 half + 1)`` of neighbouring sources'
    models to subtract.

    Robustness (a star stamp holds neighbours, undetected faint sources, cosmic-ray
    remnants; few stars put few samples in each model pixel):

    - the first model is the per-pixel *median* of the flux-normalised samples, so one
      contaminated star cannot shape it; later iterations refine it by weighted means of
      the residuals at the exact sample offsets (Anderson-King);
    - every star's amplitude is refitted against the current model (its starting flux,
      e.g. from a Gaussian fit, is ~10% off and varies from star to star; the shape must
      not absorb that); star positions stay fixed (refitting them against the model the
      same stars define aligns their noise and shrinks the model when stars are few);
    - the model is fitted with inverse-variance weights; the amplitudes and the clip use
      ``variance / F^2 + (model_error * model)^2``, so the cores of bright stars are not
      clipped for the model's own few-per-cent error, while neighbours (grown by one pixel)
      are;
    - stars whose core residual chi^2 is a ``star_clip`` robust-sigma outlier among the
      stars (doubles, galaxies, blends) are dropped and the model rebuilt without them.

    Returns ``(psf, frac, flux, good, flux_var)``: the PSF, the per-star fraction of samples
    kept, the refitted fluxes (counts in the stamp, the model summing to 1), the stars kept,
    and the ``(nt, nt)`` matrix ``Q`` of the model's flux uncertainty: a PSF flux fitted (with
    flat weights over the stamp of half-size ``fit_half``, default ``half // 2``) at (x, y)
    has a fractional variance ``T Q T^T`` (``T``: the polynomial terms at x, y) from the
    statistical errors of the spatial coefficients (their covariance from the fit, scaled by
    its reduced chi^2). The mean model's own noise is common to all stars (a zero-point
    offset) and not in it.
    """
    n = x.size
    if n == 0:
        raise ValidationError("build_pixel_psf: no stars")
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
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
    key = (iyc[:, :, None], ixc[:, None, :])
    # (with _UsableAt only its mask test: the pixels' finiteness is tested here anyway)
    U = (usable.mask_ok(key) & np.isfinite(V) if isinstance(usable, _UsableAt) else usable[key])
    U &= inside & np.isfinite(D) & (V > 0)
    D = np.where(U, D, 0.0)
    V = np.where(U, V, 1.0)
    flat_star = np.broadcast_to(np.arange(n)[:, None, None], D.shape).ravel()
    T_star = poly_design(x, y, degree, bbox)  # (n, nt)
    nt = T_star.shape[1]
    # sample offsets in oversampled model coordinates, their nearest model pixel
    cu = c + ((ix - x[:, None])[:, None, :] + np.zeros((1, sn, 1))) * os_
    cv = c + ((iy - y[:, None])[:, :, None] + np.zeros((1, 1, sn))) * os_
    bu = np.floor(cu + 0.5).astype(np.int64)
    bv = np.floor(cv + 0.5).astype(np.int64)
    inb = (bu >= 0) & (bu < S) & (bv >= 0) & (bv < S)
    bins_all = (bv * S + bu).ravel()
    keys = _Sampler(cu, cv, S)
    r2 = ((ix - x[:, None])[:, None, :] ** 2 + (iy - y[:, None])[:, :, None] ** 2)
    core = U & inb & (r2 <= (half / 2.0) ** 2)
    n_core = np.maximum(core.sum(axis=(1, 2)), 1)
    good = np.ones(n, dtype=bool)
    keep = U & inb
    mean = np.zeros((1, S, S))
    modes = None
    coefs = np.zeros((3, nt))
    amp = np.ones(n)

    def current_psf():
        if degree > 0 and modes is not None:
            cmat = np.zeros((4, nt))
            cmat[0, 0] = 1.0
            cmat[1:] = coefs
            return PixelPSF(np.concatenate([mean, modes]), cmat, oversample=os_, degree=degree, bbox=bbox)
        return PixelPSF(mean, None, oversample=os_, degree=0, bbox=bbox)

    def model_all(kmean, kmodes):
        """The current model at every sample from the sampled mean and modes."""
        m = kmean
        if degree > 0 and modes is not None:
            # per-star mode amplitudes applied star by star (no per-sample gather of them)
            m = m.reshape(n, -1) + np.einsum("knp,kn->np", kmodes.reshape(3, n, -1), coefs @ T_star.T)
        return m.reshape(D.shape)

    n_round = max(2, n_iter) + 1
    for it in range(n_round):
        F = flux * amp
        d = D / F[:, None, None]
        use = keep & good[:, None, None]
        sel = use.ravel()
        bins = bins_all[sel]
        if it == 0:
            med, _ = _bin_median(bins, d.ravel()[sel], S * S, rows=flat_star[sel])
            mean = med.reshape(1, S, S)
        else:
            m_s = m.ravel()[sel]  # the previous round's model (the amplitude refit does not change it)
            w_s = F[flat_star[sel]] ** 2 / V.ravel()[sel]
            resid = d.ravel()[sel] - m_s
            mean = mean + _fit_bins(bins, S * S, np.ones((bins.size, 1)), resid, w_s, 1e-9).reshape(1, S, S)
        mean = _normalise_and_centre(mean, os_)
        kmodes = None
        fit_modes = degree > 0 and it >= 1
        if fit_modes:
            # spatial variation as polynomials times three shape modes of the mean (dilation
            # and the two shears: first-order changes of size and ellipticity), with the mean
            # times the same polynomials as nuisance columns: a smooth error of the stars'
            # fluxes changes amplitudes, not shapes, and must not leak into the modes
            modes = _shape_modes(mean[0])
            kall = keys(np.concatenate([mean, modes]))  # the mean and modes sampled together
            kmean, kmodes = kall[0], kall[1:]
        else:
            kmean = keys(mean)[0]
        if fit_modes:
            # the design's columns are M_k T_t (M: the three modes and the mean at the sample,
            # T: the star's polynomial terms), so its normal matrix is sum over stars of
            # (per-star sums of w M_k M_l) (x) T T^T: a few (stars, 4, 4) sums instead of the
            # (samples, 4 nt) design matrix
            # per star (rows) and sample (columns); unused samples weigh 0
            npx = D.shape[1] * D.shape[2]
            M = np.concatenate([kmodes, kmean[None]]).reshape(4, n, npx).transpose(1, 0, 2)  # (n, 4, npx)
            w_s = np.where(use, F[:, None, None] ** 2 / V, 0.0).reshape(n, 1, npx)
            yv = d.reshape(n, npx) - M[:, 3]
            wM = M * w_s
            G = np.matmul(wM, M.transpose(0, 2, 1))  # (n, 4, 4)
            g = np.einsum("nkp,np->nk", wM, yv)
            A = np.einsum("skl,st,su->ktlu", G, T_star, T_star).reshape(4 * nt, 4 * nt)
            bvec = np.einsum("sk,st->kt", g, T_star).reshape(4 * nt)
            A += 1e-9 * np.trace(A) / A.shape[0] * np.eye(A.shape[0])
            sol_all = np.linalg.solve(A, bvec)
            coefs = sol_all[:3 * nt].reshape(3, nt)
            fit_A, fit_dof = A, (M, w_s, yv, sol_all, int(sel.sum()))
        # amplitudes against the current model, then the clip with the new amplitudes
        m = model_all(kmean, kmodes)
        mp = np.clip(m, 0, None)
        W = np.where(use, 1.0 / (V / F[:, None, None] ** 2 + (model_error * mp) ** 2), 0.0)
        den = np.einsum("npq,npq->n", W, m * m)
        num = np.einsum("npq,npq->n", W, m * d)
        a_new = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
        # a star whose amplitude moves by more than a factor 2 is not described by the model
        good &= (a_new > 0.5) & (a_new < 2.0)
        amp = amp * np.where(good, a_new, 1.0)
        F = flux * amp
        d = D / F[:, None, None]
        # the first (median) model is blurred by the binning: a looser model error for its clip
        eps = model_error if it else max(model_error, 0.1)
        sig2 = V / F[:, None, None] ** 2 + (eps * mp) ** 2
        chi2 = (d - m) ** 2 / sig2
        bad = U & inb & (chi2 > clip_sigma ** 2)
        # grow the clipped pixels by one (a neighbour's wings follow its clipped core)
        bad = _grow3x3(bad) & U & inb
        keep = U & inb & ~bad
        # star-level outliers: core (r < half / 2) chi^2 per pixel, clipped pixels included
        q = np.where(core, np.minimum(chi2, 1e4), 0.0).sum(axis=(1, 2)) / n_core
        if good.sum() > 5 and it < n_round - 1:
            qm = np.median(q[good])
            qs = mad_sigma(q[good], center=qm)
            out = good & (q > qm + star_clip * max(qs, 0.1 * qm)) & (q > 2.0)
            # never drop more than a third of the stars at once
            if out.sum() > good.sum() // 3:
                thr = np.sort(q[out])[::-1][good.sum() // 3]
                out &= q > thr
            good &= ~out
    psf = current_psf()
    frac = keep.reshape(n, -1).sum(axis=1) / np.maximum(U.reshape(n, -1).sum(axis=1), 1)
    flux_var = np.zeros((nt, nt))
    if degree > 0 and modes is not None:
        # covariance of the mode coefficients (the nuisance amplitude terms marginalised),
        # scaled by the fit's reduced chi^2
        M, w_s, yv, sol_all, n_used = fit_dof
        # the fit's prediction at each sample: sum_k M_k (T_star . coefficients_k)
        cs = T_star @ sol_all.reshape(4, nt).T  # (n, 4)
        r = yv - np.einsum("nkp,nk->np", M, cs)
        chi2_nu = max(1.0, float((w_s[:, 0] * r * r).sum()) / max(n_used - 4 * nt, 1))
        cov = np.linalg.inv(fit_A)[:3 * nt, :3 * nt] * chi2_nu
        # a flux fitted with model P changes by -sum(P dP) / sum(P^2) for a model error dP
        hf = int(fit_half if fit_half is not None else max(3, half // 2))
        g = (np.arange(S) - c) / os_
        ctr = (np.abs(g)[None, :] <= hf) & (np.abs(g)[:, None] <= hf) & \
            np.isclose(g[None, :] % 1, 0) & np.isclose(g[:, None] % 1, 0)
        m0 = mean[0][ctr]
        sk = -np.array([(m0 * md[ctr]).sum() for md in modes]) / (m0 * m0).sum()  # (3,)
        # sigma^2(x, y) = sum_kk' sk sk' T cov_(k,k') T^T
        cv = cov.reshape(3, nt, 3, nt)
        flux_var = np.einsum("k,ktlu,l->tu", sk, cv, sk)
    return psf, frac, flux * amp, good, flux_var


def _shape_modes(m: np.ndarray) -> np.ndarray:
    """Dilation and shear modes ``(3, S, S)`` of a centred image (each integrates to ~0).

    Central differences (not the exact derivative of the interpolant): they damp the
    model's pixel-scale noise, and the modes' shapes err by much less than the noise
    their coefficients carry (checked on noiseless and noisy simulated stars).
    """
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


def _neighbour_stamps(psf, x, y, flux, xs, ys, half) -> np.ndarray:
    """Models of the sources ``(x, y, flux)`` (px, origin 0; image units) seen in the stamps
    (half-size ``half`` px) of the stars at ``(xs, ys)``: ``(n_stars, 2 half + 1, 2 half + 1)``.

    Every source whose stamp (same size) overlaps a star's is rendered once and its overlap
    added into that star's stamp (one bincount over all star-source pairs): no image-sized
    plane."""
    sn = 2 * half + 1
    out = np.zeros(len(xs) * sn * sn)
    if len(x) == 0 or len(xs) == 0:
        return out.reshape(len(xs), sn, sn)
    xcs = np.floor(xs + 0.5).astype(np.int64)
    ycs = np.floor(ys + 0.5).astype(np.int64)
    xc = np.floor(x + 0.5).astype(np.int64)
    yc = np.floor(y + 0.5).astype(np.int64)
    # pairs whose integer stamp centres are within 2 half (Chebyshev): the stamps overlap
    pr = cKDTree(np.column_stack([xcs, ycs]).astype(np.float64)).sparse_distance_matrix(
        cKDTree(np.column_stack([xc, yc]).astype(np.float64)), 2 * half + 0.5, p=np.inf, output_type="ndarray")
    if pr.size == 0:
        return out.reshape(len(xs), sn, sn)
    si, sj = pr["i"].astype(np.int64), pr["j"].astype(np.int64)
    uj, inv = np.unique(sj, return_inverse=True)
    st = psf.stamps(x[uj], y[uj], sn, xc[uj], yc[uj]) * np.asarray(flux, np.float64)[uj][:, None, None]
    # source-stamp pixel (a, b) lies at (a + dy, b + dx) of the star's stamp
    g = np.arange(sn)
    r = g[None, :] + (yc[sj] - ycs[si])[:, None]
    c = g[None, :] + (xc[sj] - xcs[si])[:, None]
    ok = ((r >= 0) & (r < sn))[:, :, None] & ((c >= 0) & (c < sn))[:, None, :]
    flat = (si[:, None, None] * sn + r[:, :, None]) * sn + c[:, None, :]
    out += np.bincount(flat[ok], weights=st[inv][ok], minlength=out.size)
    return out.reshape(len(xs), sn, sn)


def _pairs_none(r: np.ndarray) -> np.ndarray:
    """Column-pair NOR of a bool image of even width (two adjacent bools read as one uint16)."""
    return np.ascontiguousarray(r).view(np.uint16) == 0


def _binned(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None,
            bits: int) -> tuple[np.ndarray, np.ndarray]:
    """2x2-binned image (sum of the four pixels, counts) and its inverse variance (1 / the
    summed variance, counts^-2; 0 where any of the four pixels is unusable: non-finite,
    variance <= 0, or in a mask plane of ``bits``). An odd last row or column is dropped.
    float32 ``(ny // 2, nx // 2)`` planes; pairs of rows are summed first (contiguous reads)."""
    ny, nx = image.shape
    im = image[:ny - ny % 2, :nx - nx % 2]
    va = variance[:ny - ny % 2, :nx - nx % 2]
    # one row-pair buffer serves every plane in turn (few fresh image-sized allocations)
    r = np.add(im[0::2], im[1::2], dtype=np.float32)
    ib = np.add(r[:, 0::2], r[:, 1::2])
    np.add(va[0::2], va[1::2], out=r, dtype=np.float32)
    vb = np.add(r[:, 0::2], r[:, 1::2])
    # a bin is usable when all its pixels are: per-pixel tests on row pairs, then on column
    # pairs by reading two adjacent bools as one uint16
    np.minimum(va[0::2], va[1::2], out=r, dtype=np.float32)
    bad = r > 0
    np.logical_not(bad, out=bad)  # (True for NaN)
    ok = _pairs_none(bad)
    if mask is not None and bits:
        m = np.asarray(mask)[:ny - ny % 2, :nx - nx % 2]
        mr = np.bitwise_or(m[0::2], m[1::2], out=r.view(np.int32) if m.dtype == np.int32 else None)
        np.bitwise_and(mr, bits, out=mr)
        np.not_equal(mr, 0, out=bad)
        ok &= _pairs_none(bad)
        del mr
    del r, bad
    ok &= np.isfinite(ib)
    ok &= np.isfinite(vb)
    with np.errstate(divide="ignore", invalid="ignore"):
        wb = np.reciprocal(vb, out=vb)
    wb[~ok] = 0.0
    ib[~ok] = 0.0
    return ib, wb


def _binned_fwhm(fwhm: float) -> float:
    """FWHM (binned px) of the matched filter on the 2x2-binned image for a point source of
    Gaussian-equivalent FWHM ``fwhm`` (native px): the 2 px bins add (4 - 1) / 12 px^2 of
    pixel variance to the native sampling's."""
    s2 = (fwhm / FWHM_PER_SIGMA) ** 2 + 0.25
    return float(FWHM_PER_SIGMA * np.sqrt(s2) / 2.0)


def _star_peaks(image: np.ndarray, variance: np.ndarray, usable, mask, mask_planes, fwhm: float,
                cfg: PsfEstimateConfig, det_cfg: SourceConfig) -> tuple[dict, float]:
    """The star-finding pass: bright peaks (``cfg.detect_threshold`` sigma) of the matched filter for a
    Gaussian of FWHM ``fwhm`` (px) and the FWHM refined from the brightest peaks' own moments.
    Returns ``(peaks, fwhm)``: ``peaks`` holds arrays ``x``, ``y`` (native px, origin 0), ``guess``
    (matched-filter flux, counts) and ``peak_snr``, by decreasing ``peak_snr``."""
    # PSF stars are bright (S/N >> the threshold): the search runs on the 2x2-binned image
    # (a quarter of the pixels to filter and label; a point source loses a few per cent of
    # its S/N), the peaks are mapped back to native pixels and measured there
    ib, wb = _binned(image, variance, mask, F_.plane_bits(mask_planes, *det_cfg.no_detect_planes))
    snr, norm = snr_map(ib, wb, _binned_fwhm(fwhm), overwrite_image=True, overwrite_weight=True)
    del ib, wb
    peaks = find_peaks(snr, det_cfg.detection)
    # bin (i, j) covers native pixels 2i, 2i + 1 (centre 2i + 0.5)
    x = 2.0 * peaks["x"].to_numpy() + 0.5
    y = 2.0 * peaks["y"].to_numpy() + 0.5
    yp, xp = peaks["y_peak"].to_numpy(), peaks["x_peak"].to_numpy()
    guess = snr[yp, xp].astype(np.float64) / norm[yp, xp]  # the bins sum the pixels: total counts
    del snr, norm
    psnr = peaks["peak_snr"].to_numpy()
    # refine the FWHM from the bright peaks' own moments (stamps sized by the current estimate,
    # iterated: a PSF much wider than the guess is measured, not clipped) before measuring, so
    # the sources are measured once, with the refined Gaussian
    good = psnr > cfg.min_snr
    if mask is not None:
        good &= (mask_or_within(np.asarray(mask), x, y, det_cfg.measure.flag_radius)
                 & F_.plane_bits(mask_planes, "SAT", "CR")) == 0
    if good.sum() >= 5:
        # the median size of the 300 brightest is as good as that of all of them (peaks are sorted by S/N)
        gi = np.nonzero(good)[0][:300]
        new = _moment_fwhm(image, usable, x[gi], y[gi], fwhm)
        if new is not None and abs(new - fwhm) > 0.1 * fwhm:
            fwhm = new
    log.debug("PSF star finding: %d peaks above %.0f sigma, Gaussian FWHM %.2f px", len(x), det_cfg.detection.threshold,
              fwhm)
    return {"x": x, "y": y, "guess": guess, "peak_snr": psnr}, fwhm


def _measure_peaks(image: np.ndarray, variance: np.ndarray, mask, mask_planes, background_variance, peaks: dict,
                   fwhm: float, det_cfg: SourceConfig, frame, n_bright: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Measure star peaks (:func:`_star_peaks`) with a Gaussian of FWHM ``fwhm`` (px).

    ``n_bright``: only the ``n_bright`` brightest peaks (the star candidates; None: all) and
    the peaks whose model stamps reach theirs (fitted jointly, as in a full measurement)
    are measured. Returns ``(sources, faint)``: the measured table (:func:`finish_sources`)
    and the other peaks (``x``, ``y`` px; ``psf_flux``: their matched-filter flux scaled by
    the measured sources' median ratio of PSF to matched-filter flux), which only serve as
    neighbours (isolation, subtraction)."""
    x, y, guess, psnr = peaks["x"], peaks["y"], peaks["guess"], peaks["peak_snr"]
    meas = np.ones(x.size, dtype=bool)
    if n_bright is not None and x.size > n_bright:
        pts = np.column_stack([x, y])
        reach = 2 * model_half(GaussianPSF(fwhm=fwhm), det_cfg.measure) + 2
        d, _ = cKDTree(pts[:n_bright]).query(pts, k=1, p=np.inf, distance_upper_bound=reach)
        meas = d < reach
        meas[:n_bright] = True
    sources = measure_sources(image, variance, mask, GaussianPSF(fwhm=fwhm), x[meas], y[meas],
                              background_variance=background_variance, mask_planes=mask_planes,
                              flux_guess=guess[meas], config=det_cfg.measure, frame=frame)
    sources["peak_snr"] = psnr[meas].astype(np.float32)
    f = sources["psf_flux"].to_numpy(np.float64)
    okf = np.isfinite(f) & (f > 0) & (guess[meas] > 0)
    ratio = float(np.median(f[okf] / guess[meas][okf])) if okf.any() else 1.0
    faint = pd.DataFrame({"x": x[~meas], "y": y[~meas], "psf_flux": guess[~meas] * ratio})
    return finish_sources(sources, image.shape), faint


def _model_fwhm(model: np.ndarray, oversample: int) -> float:
    """:func:`fwhm_from_image` (native px) of a centred model image, on its central part only:
    the up-sampling costs as the square of the image size, and beyond a few FWHM from the
    peak the model is orders of magnitude below half maximum (its spline prefilter reaches
    the half-maximum contour with weights < 1e-6 from there)."""
    S = model.shape[0]
    c = S // 2
    above = np.nonzero((model >= 0.5 * model.max()).any(axis=0) | (model >= 0.5 * model.max()).any(axis=1))[0]
    # margin of 6 model pixels beyond the half-maximum region (0.27^6 ~ 4e-4 of an already
    # faint value); never larger than the image
    r = int(min(c, max(np.abs(above - c).max() if above.size else c, 1) + 6 + oversample))
    return fwhm_from_image(model[c - r:c + r + 1, c - r:c + r + 1], oversample)


class _UsableAt:
    """The usable-pixel image (finite image and variance, variance > 0, none of the mask
    bits ``bits``), evaluated only where it is indexed: ``u[iy, ix]`` gives the bool array of
    ``image[iy, ix]``'s shape. Stands for a full bool plane where only stamps are read."""

    def __init__(self, image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, bits: int):
        self.image, self.variance, self.bits = image, variance, int(bits)
        self.mask = None if mask is None or not bits else np.asarray(mask)
        self.shape = image.shape

    def __getitem__(self, key) -> np.ndarray:
        v = self.variance[key]
        return np.isfinite(self.image[key]) & np.isfinite(v) & (v > 0) & self.mask_ok(key)

    def mask_ok(self, key) -> np.ndarray:
        """The mask test alone: none of the bits set at ``key``."""
        if self.mask is None:
            return np.ones(np.shape(self.variance[key]), dtype=bool)
        return (self.mask[key] & self.bits) == 0


def estimate_psf(image: np.ndarray, variance: np.ndarray, *, mask: np.ndarray | None = None, mask_planes=None,
                 background_variance: np.ndarray | None = None, config: PsfEstimateConfig | None = None,
                 sources: pd.DataFrame | None = None) -> PsfResult:
    """Estimate a spatially varying PixelPSF from a background-subtracted image.

    image: background-subtracted pixels; variance: per-pixel variance; mask and
    mask_planes: the mask image and its plane layout. ``sources``: an already
    measured table to pick stars from (else a bright detection pass is run).
    """
    from archive.process.measure import prepare_frame

    cfg = config or PsfEstimateConfig()
    image = np.asarray(image, dtype=np.float32)
    variance = np.asarray(variance, dtype=np.float32)
    if image.ndim != 2 or variance.shape != image.shape:
        raise ValidationError(f"estimate_psf: image {image.shape} and variance {variance.shape} must be equal 2-D shapes")
    ny, nx = image.shape
    bits = F_.plane_bits(mask_planes, "BAD", "SAT", "CR", "NO_DATA")
    # read at the star stamps only (no image-sized plane)
    usable = _UsableAt(image, variance, mask, bits)
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
    faint = None
    if sources is None:
        peaks, fwhm = _star_peaks(image, variance, usable, mask, mask_planes, fwhm, cfg, det_cfg)
        # measure the candidates first (the builder takes the max_stars brightest good ones);
        # all peaks only when too few of them pass
        n_bright = 3 * cfg.max_stars // 2
        sources, faint = _measure_peaks(image, variance, mask, mask_planes, background_variance, peaks, fwhm,
                                        det_cfg, get_frame(), n_bright)
        sel = select_stars(sources, fwhm, cfg, mask_planes, others=faint)
        if sel.sum() < cfg.max_stars and len(faint):
            sources, faint = _measure_peaks(image, variance, mask, mask_planes, background_variance, peaks, fwhm,
                                            det_cfg, get_frame(), None)
            sel = select_stars(sources, fwhm, cfg, mask_planes, others=faint)
    else:
        sel = select_stars(sources, fwhm, cfg, mask_planes)
    nsel = int(sel.sum())
    if nsel < 3:
        raise ValidationError(f"estimate_psf: only {nsel} usable PSF stars (need >= 3; S/N > {cfg.min_snr}, isolated, unflagged)")
    degree = cfg.degree
    while degree > 0 and nsel < cfg.stars_per_term * n_poly_terms(degree):
        degree -= 1
    # the unmeasured faint peaks are neighbours too (subtracted from the stars' stamps)
    n_src = len(sources)
    nb_tabs = [sources] if faint is None or len(faint) == 0 else [sources, faint]
    x_all = np.concatenate([t["x"].to_numpy(np.float64) for t in nb_tabs])
    y_all = np.concatenate([t["y"].to_numpy(np.float64) for t in nb_tabs])
    f_all = np.concatenate([t["psf_flux"].fillna(0.0).to_numpy(np.float64) for t in nb_tabs])
    sel = np.concatenate([sel, np.zeros(len(x_all) - n_src, dtype=bool)])
    idx = np.nonzero(sel)[0]
    half = max(7, int(np.ceil(cfg.half_size_fwhm * fwhm)))
    bbox = (0.0, 0.0, float(nx - 1), float(ny - 1))
    os_ = cfg.oversample or (1 if fwhm >= cfg.min_fwhm_native else 2)
    mcfg = MeasureConfig(n_iter=3, fit_halfsize_fwhm=2.0, aperture_radii=())
    sp = GaussianPSF(fwhm=fwhm)
    others = np.ones(len(x_all), dtype=bool)
    others[idx] = False
    for outer in range(max(1, cfg.n_outer)):
        # neighbours of the PSF stars are subtracted with their current models (the first
        # time with their Gaussian-PSF fits) inside the stars' stamps
        nb = _neighbour_stamps(sp, x_all[others], y_all[others], f_all[others], x_all[idx], y_all[idx],
                               half)
        psf, frac, fs, good, flux_var = build_pixel_psf(
            image, variance, usable, x_all[idx], y_all[idx], f_all[idx], bbox, half=half, oversample=os_,
            degree=degree, n_iter=cfg.n_iter, clip_sigma=cfg.clip_sigma, model_error=cfg.model_error,
            star_clip=cfg.star_clip, neighbours=nb, fit_half=max(3, int(np.ceil(MeasureConfig.fit_halfsize_fwhm * fwhm))))
        f_all[idx] = fs
        if not good.all():
            # stars the builder rejected (their residual is an outlier) leave the set
            log.debug("PSF builder dropped %d of %d stars", int((~good).sum()), good.size)
            sel[idx[~good]] = False
            idx = idx[good]
            while degree > 0 and idx.size < cfg.stars_per_term * n_poly_terms(degree):
                degree -= 1
        if outer + 1 < max(1, cfg.n_outer):
            # re-measure the PSF stars and their neighbours jointly (blends are refitted) with
            # the new model
            sp = psf
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
            # the neighbours take these joint fits with the new model; the PSF stars keep
            # their first centroids (see build_pixel_psf)
            take = okm & ~sel[sub]
            x_all[sub[take]] = m["x"].to_numpy(np.float64)[take]
            y_all[sub[take]] = m["y"].to_numpy(np.float64)[take]
            f_all[sub[take]] = m["psf_flux"].to_numpy(np.float64)[take]
            # far sources cannot reach the stamps; near ones now carry the new model's fits
            keep_o = others & near
            others = keep_o
    # summary: FWHM and ellipticity over the detector
    # (the 3x3 grid's middle point is the detector centre)
    grid = [(gx, gy) for gy in np.linspace(0, ny - 1, 3) for gx in np.linspace(0, nx - 1, 3)]
    models = [psf.model(gx, gy) for gx, gy in grid]
    fws = [_model_fwhm(m, psf.oversample) for m in models]
    fw_c = fws[4]
    k = models[4]
    S = k.shape[0]
    g = (np.arange(S) - S // 2) / psf.oversample
    ddx = np.broadcast_to(g[None, None, :], (1, S, S))
    ddy = np.broadcast_to(g[None, :, None], (1, S, S))
    s2 = (fw_c / FWHM_PER_SIGMA) ** 2
    ixx, iyy, ixy, _ = adaptive_moments(k[None], np.ones((1, S, S), bool), ddx, ddy, s2, 12, S // (2 * psf.oversample))
    e, theta = (float(v) for v in moments_shape(ixx[0], iyy[0], ixy[0]))
    stars_all = sources.copy()
    sel = sel[:n_src]
    stars_all["used"] = sel
    log.info("PSF from %d stars (degree %d): FWHM %.2f px (%.2f-%.2f), ellipticity %.3f", int(sel.sum()), degree, fw_c,
             min(fws), max(fws), e)
    return PsfResult(psf=psf, fwhm=float(fw_c), ellipticity=e, theta=theta, fwhm_range=(float(min(fws)), float(max(fws))),
                     stars=stars_all, n_stars=int(sel.sum()), degree=int(psf.degree), flux_var=flux_var)


def add_model_flux_error(sources: pd.DataFrame, result: PsfResult) -> pd.DataFrame:
    """Copy of a source table measured with ``result.psf`` whose ``psf_flux_err`` includes the
    PSF model's flux error (:meth:`PsfResult.model_flux_error`, in quadrature) and whose
    ``snr`` is ``psf_flux / psf_flux_err`` again. Photon noise alone under-states the error
    of bright stars, whose fluxes are limited by the model's knowledge of the PSF across
    the detector (a few 0.1% with tens of PSF stars)."""
    out = sources.copy()
    if len(out) == 0:
        return out
    e = result.model_flux_error(out["x"].to_numpy(np.float64), out["y"].to_numpy(np.float64))
    f = out["psf_flux"].to_numpy(np.float64)
    err = np.hypot(out["psf_flux_err"].to_numpy(np.float64), np.abs(f) * e)
    out["psf_flux_err"] = err
    with np.errstate(divide="ignore", invalid="ignore"):
        out["snr"] = (f / err).astype(out["snr"].dtype)
    return out


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
