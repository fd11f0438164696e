"""Extendedness: is a source broader than the PSF at its position?

A source that is the PSF convolved with a small Gaussian of variance ``s2`` px^2 (per
axis) is, to first order in ``s2`` (the heat equation),

    D ~ a (P + s2 Q),   Q = (1/2) laplacian(P)

so the weighted least-squares fit ``D = a P + b Q`` on the source's neighbour-subtracted
stamp measures its *size excess* ``s2 = b / a`` (px^2): 0 for a point source, > 0 for
a resolved one (large for galaxies well beyond the linear regime). Before the fit the
stamp loses the light of neighbours that their (PSF) models left behind: a local
pedestal, the median of a ring just outside the stamp (a star on a galaxy's wing would
otherwise look broad), and residual light that is not point-symmetric about the source
(more than ``symmetric_clip`` sigma above its mirror image through the source's
centre). The fit is linear in the pixels, so its error follows from the variance plane
(sandwich covariance of ``(a, b)`` with the full variance plus the pedestal's error,
then the ratio's first-order error); it uses the PSF model itself (Moffat wings
included), as SExtractor's SPREAD_MODEL does with a broadened PSF. In the linear
regime ``s2`` is the extra Gaussian variance (within 10% at 0.13 sigma_psf^2, 20% at
0.27 sigma_psf^2 for a Gaussian PSF); beyond it grows more slowly than the true size.

``extendedness`` (0..1, stored in the ``source`` table) turns the size excess, in
units of the PSF's Gaussian-equivalent variance ``sigma_psf^2 = (FWHM / FWHM_PER_SIGMA)^2``,
``e = s2 / sigma_psf^2``, with error ``de``, into a score:

    extendedness = Phi((e - max(min_excess, n_sigma * de)) / de)

``Phi`` the standard normal CDF. A source is **extended when extendedness >= 0.5**:
its size excess is both significant (``n_sigma``, default 3) and above ``min_excess``
(default 0.1 sigma_psf^2: a floor for PSF-model errors that dominate at high S/N).
Point sources sit near 0 (a fraction ``1 - Phi(n_sigma)`` of isolated stars scatters
above 0.5 at any S/N; unresolved pairs and stars on a bright galaxy's light more),
resolved galaxies near 1, marginal cases in between. NaN where the fit fails (an unusable pixel
in the central 3 x 3, e.g. a saturated core; non-positive amplitude).

Conventions: pixel coordinates 0-based; fluxes in the image's units.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import ndtr

from archive.image.psf import FWHM_PER_SIGMA, PSF
from archive.process.stamps import PaddedFrame, chunks


@dataclass
class ExtendednessConfig:
    """Configuration of :func:`measure_extendedness`.

    half_fwhm: half-size of the fit stamp in FWHM (at least 3 px).
    min_excess: smallest size excess called extended, in units of sigma_psf^2 (PSF-model floor).
    n_sigma: the size excess must also exceed this many of its own errors.
    symmetric_clip: residual light exceeding its mirror (through the source's centre) by more
        than this many sigma belongs to a neighbour and is left out of the fit.
    annulus: width (px) of the ring outside the fit stamp whose median residual is subtracted.
    chunk: sources per vectorized batch.
    """

    half_fwhm: float = 1.5
    min_excess: float = 0.1
    n_sigma: float = 3.0
    symmetric_clip: float = 3.0
    annulus: int = 4
    chunk: int = 2048

    def to_dict(self) -> dict:
        return asdict(self)


def size_excess(frame: PaddedFrame, img: np.ndarray, W: np.ndarray, V: np.ndarray, model: np.ndarray, psf: PSF,
                x: np.ndarray, y: np.ndarray, flux: np.ndarray, half: int, clip: float = 3.0, annulus: int = 4,
                chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Size excess ``s2`` (px^2) of sources over the PSF and its 1-sigma error (see module doc).

    frame: the padded layout of the flat planes ``img`` (image), ``W`` (fit weights, 0 where
    unusable), ``V`` (full variance) and ``model`` (all sources' models, each source's own
    included with flux ``flux``); x, y: positions (px, 0-based); half: fit stamp half-size (px).
    clip: asymmetric residual light beyond this many sigma (pixel and its mirror through the
    source's centre) is a neighbour's and left out. annulus: width (px) of the ring outside the
    fit stamp whose median residual is the local pedestal. The stamps (half + annulus + 1) must
    lie inside the padded frame.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    n = x.size
    s2 = np.full(n, np.nan)
    err = np.full(n, np.nan)
    S = 2 * half + 1
    ha = half + max(1, int(annulus))
    Sa = 2 * ha + 1
    off = np.arange(Sa) - ha
    rr = np.hypot(off[:, None], off[None, :])
    # the ring's pixels of one parity (a checkerboard): half the reads, a robust median still
    par = (off[:, None] + off[None, :]) % 2 == 0
    ring = ((rr > half + 0.5) & (rr <= ha + 0.5) & par).ravel()
    ring_off = frame.offsets(Sa).ravel()[ring]  # flat offsets of the ring pixels
    c1 = slice(2, S + 2)  # the fit stamp inside the stamp 2 px wider (read for the mirror)
    for sl in chunks(n, chunk):
        xs, ys = x[sl], y[sl]
        m = xs.size
        xc = np.floor(xs + 0.5).astype(np.int64)
        yc = np.floor(ys + 0.5).astype(np.int64)
        Pb = psf.stamps(xs, ys, S + 2, xc, yc).astype(np.float32)
        P = Pb[:, 1:-1, 1:-1]
        Q = 0.5 * (Pb[:, :-2, 1:-1] + Pb[:, 2:, 1:-1] + Pb[:, 1:-1, :-2] + Pb[:, 1:-1, 2:] - 4.0 * P)
        ib = frame.index(xc, yc, S + 4)
        Rb = img[ib] - model[ib]
        idx = ib[:, c1, c1]
        R, w, Vs = Rb[:, c1, c1], W[idx], V[idx]
        # local pedestal: median residual of the usable ring pixels (light of a galaxy the source
        # sits on, left by the background mesh), its error that of a median of that many pixels
        ir = ib[:, S // 2 + 2, S // 2 + 2][:, None] + ring_off[None, :]
        wr = W[ir] > 0
        rv = np.where(wr, img[ir] - model[ir], np.nan)
        nv = wr.sum(axis=1)
        rv.sort(axis=1)
        r_ = np.arange(m)
        lo_i = np.maximum((nv - 1) // 2, 0)
        hi_i = np.maximum(nv // 2, 0)
        ped = np.where(nv > 0, 0.5 * (rv[r_, lo_i] + rv[r_, hi_i]), 0.0)
        vring = np.where(wr, V[ir], 0.0).sum(axis=1, dtype=np.float64)
        ped_var = np.where(nv > 0, 0.5 * np.pi * vring / np.maximum(nv, 1) ** 2, 0.0)
        own = np.nan_to_num(flux[sl]).astype(np.float32)[:, None, None] * P
        Rm = _mirror(Rb, xs - xc, ys - yc)
        # neighbours' light that their models left behind is not point-symmetric about the
        # source: where the residual exceeds its mirror by more than ``clip`` sigma, the excess
        # is removed (a source's own extension is symmetric)
        sig = np.sqrt(Vs + Vs[:, ::-1, ::-1])
        excess = R - Rm - np.float32(clip) * sig
        both = (w > 0) & (w[:, ::-1, ::-1] > 0)
        D = own + R - np.where(both, np.maximum(excess, 0), 0) - ped.astype(np.float32)[:, None, None]
        # templates: the PSF and its broadening
        A = np.stack([P, Q], axis=1)
        WA = A * w[:, None]
        N = np.einsum("mapq,mbpq->mab", WA, A, optimize=True).astype(np.float64)
        b = np.einsum("mapq,mpq->ma", WA, D, optimize=True).astype(np.float64)
        M = np.einsum("mapq,mbpq,mpq->mab", WA, WA, Vs, optimize=True).astype(np.float64)
        det = N[:, 0, 0] * N[:, 1, 1] - N[:, 0, 1] ** 2
        good = np.isfinite(det) & (det > 1e-12 * np.maximum(N[:, 0, 0] * N[:, 1, 1], 1e-300))
        N[~good] = np.eye(2)
        Ni = np.linalg.inv(N)
        sol = np.einsum("mab,mb->ma", Ni, b)
        # the pedestal's error moves the solution along Ni A^T W 1
        g = np.einsum("mab,mb->ma", Ni, WA.sum(axis=(2, 3), dtype=np.float64))
        cov = Ni @ M @ Ni + ped_var[:, None, None] * g[:, :, None] * g[:, None, :]
        a, c = sol[:, 0], sol[:, 1]
        # a masked core (saturation, cosmic ray) leaves only wings: no size measured
        good &= (a > 0) & (w[:, half - 1:half + 2, half - 1:half + 2] > 0).all(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            r = c / a
            v = (cov[:, 1, 1] - 2.0 * r * cov[:, 0, 1] + r * r * cov[:, 0, 0]) / (a * a)
        s2[sl] = np.where(good, r, np.nan)
        err[sl] = np.where(good & (v > 0), np.sqrt(np.abs(v)), np.nan)
    return s2, err


def _mirror(Rb: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """Stamps ``(m, S, S)`` of ``R(2 c - p)``: the residual mirrored through the source centre ``c``
    (``(fx, fy)`` px from the stamp's centre pixel, |f| <= 0.5), bilinearly interpolated from
    stamps ``Rb`` of the same centre 2 px wider on every side (``(m, S + 4, S + 4)``).

    ``R(2 f - o) = Rf(o - 2 f)`` with ``Rf`` the stamp turned by 180 degrees: a shift by less than
    one pixel per axis, i.e. a weighted sum of the nine whole-pixel shifts (slices, no gathers).
    """
    m, Sb, _ = Rb.shape
    S = Sb - 4
    Rf = Rb[:, ::-1, ::-1]

    def weights(s):
        # linear-interpolation weights of whole-pixel shifts -1, 0, +1 for a shift s in [-1, 1]
        s = np.clip(np.asarray(s, dtype=np.float64), -1.0, 1.0)
        return np.stack([np.maximum(-s, 0.0), 1.0 - np.abs(s), np.maximum(s, 0.0)]).astype(np.float32)

    wx = weights(-2.0 * np.asarray(fx))
    wy = weights(-2.0 * np.asarray(fy))
    out = np.zeros((m, S, S), dtype=np.float32)
    for i in range(3):
        for j in range(3):
            wij = (wy[i] * wx[j])[:, None, None]
            out += wij * Rf[:, 1 + i:1 + i + S, 1 + j:1 + j + S]
    return out


def extendedness_score(s2: np.ndarray, err: np.ndarray, fwhm: float,
                       config: ExtendednessConfig | None = None) -> np.ndarray:
    """The 0..1 score of the module doc from size excesses ``s2`` and errors ``err`` (px^2) for a
    PSF of FWHM ``fwhm`` px (>= 0.5: extended); float32, NaN where ``s2`` or ``err`` is NaN."""
    cfg = config or ExtendednessConfig()
    sig2 = (float(fwhm) / FWHM_PER_SIGMA) ** 2
    e = np.asarray(s2, dtype=np.float64) / sig2
    de = np.maximum(np.asarray(err, dtype=np.float64) / sig2, 1e-6)
    with np.errstate(invalid="ignore"):
        z = (e - np.maximum(cfg.min_excess, cfg.n_sigma * de)) / de
    return ndtr(z).astype(np.float32)


def measure_extendedness(frame: PaddedFrame, img: np.ndarray, W: np.ndarray, V: np.ndarray, model: np.ndarray,
                         psf: PSF, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                         config: ExtendednessConfig | None = None) -> np.ndarray:
    """``extendedness`` (float32, 0..1, NaN where unmeasured) of sources at ``(x, y)`` with model
    fluxes ``flux`` (see :func:`size_excess` for the planes; the module doc for the score)."""
    cfg = config or ExtendednessConfig()
    fw = float(psf.fwhm())
    half = max(3, int(np.ceil(cfg.half_fwhm * fw)))
    s2, err = size_excess(frame, img, W, V, model, psf, x, y, flux, half, cfg.symmetric_clip, cfg.annulus,
                          cfg.chunk)
    return extendedness_score(s2, err, fw, cfg)
