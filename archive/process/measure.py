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
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd

from archive.errors import ValidationError
from archive.image.moments import adaptive_moments
from archive.image.psf import FWHM_PER_SIGMA, PSF
from archive.process import flags as F_
from archive.process.stamps import PaddedFrame, aperture_stamps, chunks, gather, stamp_grid

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
    neighbour_model_error: fractional error of the neighbours' models subtracted inside an aperture
        (PSF-model wings beyond the model's extent, their flux errors): ``e * |sum a N|`` (N the
        neighbours' model light) is added in quadrature to the aperture flux errors.
    total_radius_fwhm, total_min_snr, total_max_blend: sources above ``total_min_snr`` get
        ``ap_total_ratio`` (and ``_err``): the flux in a circular aperture of radius
        ``max(2 max(aperture_radii), total_radius_fwhm FWHM)`` px (:func:`total_radius`) over the
        flux in the largest aperture -- the curve of growth's end, to which photometric
        calibration refers its aperture correction (dimensionless, so no unit to convert); NaN
        for the others, for sources with an unusable pixel in it and for sources whose
        neighbours' models put more than ``total_max_blend`` of their flux inside it.
    total_max_sources: at most this many (the brightest) get ``ap_total_ratio`` per chunk.
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
    neighbour_model_error: float = 0.02
    total_radius_fwhm: float = 6.0
    total_min_snr: float = 100.0
    total_max_blend: float = 0.02
    total_max_sources: int = 250

    def to_dict(self) -> dict:
        return asdict(self)


#: key of ``DataFrame.attrs`` holding the mask layout (plane name -> bit) of a table's ``flags``
MASK_PLANES_ATTR = "mask_planes"


def flag_layout(sources: pd.DataFrame, mask_planes: Mapping[str, int] | None = None) -> Mapping[str, int]:
    """The mask layout to decode the mask bits of ``sources["flags"]`` with: ``mask_planes`` when
    given (the exposure's own), else the layout :func:`measure_sources` recorded in the table's
    ``attrs``, else the default layout (a table from elsewhere, e.g. read back from the store)."""
    if mask_planes is not None:
        return mask_planes
    got = getattr(sources, "attrs", {}).get(MASK_PLANES_ATTR)
    return got if got is not None else F_.DEFAULT_MASK_PLANES


#: column of the ratio of the flux in the ``total_radius`` aperture to the largest aperture's
TOTAL_RATIO = "ap_total_ratio"


def ap_column(r: float) -> str:
    """Column name of an aperture flux of radius ``r`` px (``ap_flux_r3`` for 3)."""
    return f"ap_flux_r{r:g}".replace(".", "p")


@dataclass
class MeasureFrame:
    """Pixel planes of one image prepared for :func:`measure_sources` (flat, padded, float32).

    img: image with unusable pixels set to 0; W: fit weights (1 / background variance), 0
    where unusable; V: full variance, 0 where unusable; U: usable pixels. Built once per
    image by :func:`prepare_frame`. The model plane of :func:`measure_sources` is a scratch
    plane of the frame, handed over to the caller when the model is returned.
    """

    frame: PaddedFrame
    img: np.ndarray
    W: np.ndarray
    V: np.ndarray
    U: np.ndarray

    _buf: np.ndarray | None = None
    _written: list = field(default_factory=list)

    def scratch(self) -> np.ndarray:
        """The zeroed float32 model plane (allocated once; pixels written since the last call are reset)."""
        if self._buf is None:
            self._buf = np.zeros(self.frame.size, np.float32)
        for idx in self._written:
            self._buf[idx] = 0.0
        self._written.clear()
        return self._buf

    def take_scratch(self) -> np.ndarray:
        """The model plane as it is, now the caller's: the frame starts a new one when it needs it."""
        buf = self.scratch() if self._buf is None else self._buf
        self._buf = None
        self._written = []
        return buf


def prepare_frame(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, *,
                  background_variance: np.ndarray | None = None, mask_planes: Mapping[str, int] | None = None,
                  bad_planes: tuple[str, ...] = MeasureConfig.bad_planes, pad: int = 48) -> MeasureFrame:
    """Flat padded planes for :func:`measure_sources` (see :class:`MeasureFrame`).

    A pixel is usable when image and variance are finite, the variance is > 0 and it is in
    none of ``bad_planes``; ``pad`` px of padding (unusable) surround the image.
    """
    image = np.asarray(image)
    variance = np.asarray(variance)
    shape = image.shape
    usable = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    badbits = F_.plane_bits(mask_planes, *bad_planes)
    if mask is not None and badbits:
        usable &= (np.asarray(mask) & badbits) == 0
    bv = variance if background_variance is None else np.asarray(background_variance)
    if bv.shape != shape:
        raise ValidationError(f"measure_sources: background_variance shape {bv.shape} differs from image shape {shape}")
    fr = PaddedFrame(shape, pad)
    U = fr.plane(usable & (bv > 0), bool, False)
    with np.errstate(divide="ignore", invalid="ignore"):
        W = fr.plane(None, np.float32)
        np.reciprocal(bv, out=fr.crop(W), dtype=np.float32)
        V = fr.plane(variance, np.float32)
        img = fr.plane(image, np.float32)
    W[~U] = 0.0
    V[~U] = 0.0
    img[~U] = 0.0
    return MeasureFrame(fr, img, W, V, U)


def add_models(frame: PaddedFrame, plane: np.ndarray, psf: PSF, x, y, flux, half: int, chunk: int = 2048) -> list:
    """Add ``flux * P`` stamps (half-size ``half``) at ``(x, y)`` into a flat padded float32 plane of
    ``frame`` (``np.add.at``: overlapping stamps sum); returns the flat indices written, per chunk."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    flux = np.asarray(flux, np.float64)
    size = 2 * half + 1
    written = []
    for sl in chunks(len(x), chunk):
        xc = np.floor(x[sl] + 0.5).astype(np.int64)
        yc = np.floor(y[sl] + 0.5).astype(np.int64)
        idx = frame.index(xc, yc, size)
        st = psf.stamps(x[sl], y[sl], size, xc, yc) * flux[sl].astype(np.float32)[:, None, None]
        np.add.at(plane, idx.ravel(), st.astype(np.float32).ravel())
        written.append(idx)
    return written


def _model_flat(mf: "MeasureFrame", psf: PSF, x, y, flux, half: int, chunk: int) -> np.ndarray:
    """Padded flat float32 plane of ``flux * P`` stamps (half-size ``half``) at ``(x, y)``.

    The plane is the frame's scratch buffer (overwritten by the next call): only the
    pixels the previous call wrote are reset, and the stamps are added with ``np.add.at``,
    so no full-size plane is allocated or zeroed per iteration.
    """
    buf = mf.scratch()
    mf._written.extend(add_models(mf.frame, buf, psf, x, y, flux, half, chunk))
    return buf


def _solve3(A, D, Ws):
    """Weighted linear fit of stamps ``D`` by the three templates ``A`` (m, 3, S, S): (solution, normal matrix, ok)."""
    WA = A * Ws[:, None]
    N = np.einsum("mapq,mbpq->mab", WA, A, optimize=True).astype(np.float64)
    b = np.einsum("mapq,mpq->ma", WA, D, optimize=True).astype(np.float64)
    good = np.abs(np.linalg.det(N)) > 1e-30 * np.maximum(N[:, 0, 0], 1e-300) ** 3
    N[~good] = np.eye(3)
    sol = np.linalg.solve(N, b[..., None])[..., 0]
    sol[~good] = 0.0
    return sol, N, WA, good


def total_radius(fwhm: float, config: "MeasureConfig") -> float:
    """Radius (px) of the ``ap_flux_total`` aperture for a PSF of FWHM ``fwhm`` px."""
    radii = tuple(float(r) for r in config.aperture_radii)
    return float(max(2.0 * max(radii) if radii else 0.0, config.total_radius_fwhm * float(fwhm)))


def _total_apertures(mf: "MeasureFrame", model: np.ndarray, fixed_model: np.ndarray | None, psf: PSF, xs: np.ndarray,
                     ys: np.ndarray, flux: np.ndarray, hm: int, radius: float, bg_err2: np.ndarray,
                     max_blend: float) -> tuple[np.ndarray, np.ndarray]:
    """Flux (and error) in apertures of ``radius`` px at ``(xs, ys)`` on the neighbour-subtracted image.

    Stamps are read from the image-sized views of the frame's planes (no padding needed);
    ``model``: the flat padded plane of all models (each of half-size ``hm``), the source's own
    included; ``flux``: the sources' fitted fluxes. NaN where an unusable pixel lies inside or
    the neighbours' models hold more than ``max_blend`` of the flux there.
    """
    fr = mf.frame
    ht = int(np.ceil(radius + 1.0))
    size = 2 * ht + 1
    xc = np.floor(xs + 0.5).astype(np.int64)
    yc = np.floor(ys + 0.5).astype(np.int64)
    iy, ix = stamp_grid(xc, yc, size)
    img, _ = gather(fr.crop(mf.img), iy, ix, 0.0)
    if fixed_model is not None:
        img = img - gather(fr.crop(fixed_model), iy, ix, 0.0)[0]
    mod, _ = gather(fr.crop(model), iy, ix, 0.0)
    use, _ = gather(fr.crop(mf.U), iy, ix, False)
    var, _ = gather(fr.crop(mf.V), iy, ix, 0.0)
    # the neighbours' models: all models less the source's own as the plane holds it (half-size hm)
    nb = mod
    h = min(hm, ht)
    nb[:, ht - h:ht + h + 1, ht - h:ht + h + 1] -= (psf.stamps(xs, ys, 2 * h + 1, xc, yc)
                                                     * flux.astype(np.float32)[:, None, None])
    a = aperture_stamps(xs - xc, ys - yc, radius, ht)
    tot = np.einsum("mpq,mpq->m", a, img - nb).astype(np.float64)
    err = np.sqrt(np.einsum("mpq,mpq->m", a * a, var).astype(np.float64) + a.sum(axis=(1, 2), dtype=np.float64) ** 2
                  * bg_err2)
    blend = np.einsum("mpq,mpq->m", a, nb).astype(np.float64)
    bad = ((a > 0) & ~use).any(axis=(1, 2)) | (blend > max_blend * np.abs(flux))
    return np.where(bad, np.nan, tot), np.where(bad, np.nan, err)


def model_half(psf: PSF, config: "MeasureConfig") -> int:
    """Half-size (px) of the model stamps :func:`measure_sources` subtracts (its final model)."""
    fw = float(psf.fwhm())
    hf = max(3, int(np.ceil(config.fit_halfsize_fwhm * fw)))
    radii = tuple(float(r) for r in config.aperture_radii)
    ha = int(np.ceil(max(radii) + 1.0)) if radii else hf
    return max(hf, ha, int(np.ceil(3.0 * fw)))


def model_image(shape: tuple[int, int], psf: PSF, x: np.ndarray, y: np.ndarray, flux: np.ndarray, half: int,
                chunk: int = 2048) -> np.ndarray:
    """Image (float32) of PSF models ``flux * P`` at ``(x, y)``, each on a ``2 half + 1`` stamp."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    xc = np.floor(x + 0.5).astype(np.int64)
    yc = np.floor(y + 0.5).astype(np.int64)
    ny, nx = shape
    # pad enough for every stamp (sources outside the image still reach into it)
    reach = 0 if x.size == 0 else int(max(0, -xc.min(), -yc.min(), xc.max() - nx + 1, yc.max() - ny + 1))
    fr = PaddedFrame(tuple(shape), half + reach + 1)
    mf = MeasureFrame(fr, np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, bool))
    return fr.crop(_model_flat(mf, psf, x, y, np.asarray(flux, np.float64), half, chunk)).copy()


def _central(a: np.ndarray, half: int) -> np.ndarray:
    """Central ``2 half + 1`` square of stamps ``(m, S, S)`` (a view)."""
    c = a.shape[1] // 2
    return a[:, c - half:c + half + 1, c - half:c + half + 1]


def measure_sources(image: np.ndarray, variance: np.ndarray, mask: np.ndarray | None, psf: PSF,
                    x: np.ndarray, y: np.ndarray, *, background_variance: np.ndarray | None = None,
                    background: np.ndarray | None = None, mask_planes: Mapping[str, int] | None = None,
                    flux_guess: np.ndarray | None = None, config: MeasureConfig | None = None,
                    return_model: bool = False, frame: MeasureFrame | None = None,
                    fixed_model: np.ndarray | None = None, background_error: np.ndarray | float | None = None):
    """Measure point sources at starting positions ``(x, y)`` (px, 0-based).

    image: background-subtracted image (counts); variance: its variance (counts^2,
    including the sources' own noise); mask: integer mask plane image or None;
    psf: the :class:`~archive.image.psf.PSF` (its stamps and their gradients); background_variance: smooth
    variance of the background used as fit weights (default ``variance``);
    background: subtracted background (reported as ``sky``); flux_guess: starting
    fluxes; frame: the planes already prepared by :func:`prepare_frame` from these
    arguments (saves the full-image passes when one image is measured repeatedly);
    fixed_model: with ``frame``, a flat padded plane in its layout of other sources' models,
    held fixed and subtracted from the image (a re-measurement of some sources among others);
    background_error: 1-sigma error (image units, a per-pixel map or one number) of the
    subtracted background itself (:attr:`archive.process.background.Background.error`): constant
    over a stamp, it adds ``(sum a)^2 e^2`` to an aperture flux's variance and
    ``(sum w P)^2 e^2 / (sum w P^2)^2`` to a PSF flux's (correlated noise the variance plane
    does not carry).
    Returns a DataFrame with ``x, y, x_err, y_err, psf_flux, psf_flux_err,
    ap_flux_r*, ap_flux_r*_err, ap_total_ratio, ap_total_ratio_err, snr, ixx, iyy, ixy, sky,
    flags`` (fluxes in the image's units) and, with ``return_model``, also the model image (float32) of all sources:
    a ``shape`` view of a flat padded plane in ``frame``'s layout (the frame's model plane,
    handed over; ``model.base`` is that plane).
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
    if not isinstance(psf, PSF):
        raise ValidationError(f"measure_sources: psf must be an archive.image.psf.PSF, got {type(psf).__name__}")
    x = np.asarray(x, dtype=np.float64).copy()
    y = np.asarray(y, dtype=np.float64).copy()
    n = x.size
    shape = image.shape
    ny, nx = shape
    fw = float(psf.fwhm())
    hf = max(3, int(np.ceil(cfg.fit_halfsize_fwhm * fw)))
    radii = tuple(float(r) for r in cfg.aperture_radii)
    ha = int(np.ceil(max(radii) + 1.0)) if radii else hf
    hm = max(hf, ha, int(np.ceil(3.0 * fw)))
    hit = max(hf, int(np.ceil(3.0 * fw)))  # model half-size during the iterations
    hq = max(ha, hf)  # stamps of the final pass
    hmom = min(ha, max(hf, int(np.ceil(2.0 * fw)) + 2))
    flags = np.zeros(n, dtype=np.int64)
    cols = _empty_columns(radii)
    if n == 0:
        df = pd.DataFrame(cols)
        df.attrs[MASK_PLANES_ATTR] = dict(mask_planes if mask_planes is not None else F_.DEFAULT_MASK_PLANES)
        return (df, np.zeros(shape)) if return_model else df
    # the padded planes must hold every stamp wherever a centroid may wander (start + max_shift)
    xc0 = np.floor(x + 0.5).astype(np.int64)
    yc0 = np.floor(y + 0.5).astype(np.int64)
    need = max(hm, hq) + int(np.ceil(cfg.max_shift)) + 2
    if fixed_model is not None and (frame is None or not frame.frame.fits(xc0, yc0, need)):
        raise ValidationError("measure_sources: fixed_model needs a frame that holds every source's stamps")
    if frame is None or not frame.frame.fits(xc0, yc0, need):
        reach = int(max(0, -xc0.min(), -yc0.min(), xc0.max() - nx + 1, yc0.max() - ny + 1))
        frame = prepare_frame(image, variance, mask, background_variance=background_variance,
                              mask_planes=mask_planes, bad_planes=cfg.bad_planes, pad=max(48, need + reach))
    fr = frame.frame

    def img_at(idx):
        """image pixels at flat indices, less the fixed models"""
        return frame.img[idx] if fixed_model is None else frame.img[idx] - fixed_model[idx]

    x0, y0 = x.copy(), y.copy()
    flux = np.zeros(n) if flux_guess is None else np.nan_to_num(np.asarray(flux_guess, dtype=np.float64)).copy()
    chunk = max(64, int(cfg.chunk))
    sf = 2 * hf + 1
    for it in range(max(1, cfg.n_iter)):
        model = _model_flat(frame, psf, x, y, flux, hit, chunk)
        newf = np.empty(n)
        step = 0.7 if it else 1.0
        for sl in chunks(n, chunk):
            xs, ys, fs = x[sl], y[sl], flux[sl]
            xc = np.floor(xs + 0.5).astype(np.int64)
            yc = np.floor(ys + 0.5).astype(np.int64)
            idx = fr.index(xc, yc, sf)
            P, Px, Py = psf.stamps_with_gradient(xs, ys, sf, xc, yc)
            D = img_at(idx) - model[idx] + fs.astype(np.float32)[:, None, None] * P
            sol, _, _, good = _solve3(np.stack([P, Px, Py], axis=1), D, frame.W[idx])
            Fn = sol[:, 0]
            move = good & (Fn > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                dx = np.where(move, sol[:, 1] / np.where(move, Fn, 1.0), 0.0)
                dy = np.where(move, sol[:, 2] / np.where(move, Fn, 1.0), 0.0)
            x[sl] += np.clip(dx, -0.5, 0.5)
            y[sl] += np.clip(dy, -0.5, 0.5)
            # damped flux update keeps the Jacobi iteration of blends stable
            newf[sl] = np.where(good, fs + step * (Fn - fs), fs)
        flux = newf
        far = np.hypot(x - x0, y - y0) > cfg.max_shift
        if far.any():
            x[far], y[far] = x0[far], y0[far]
            flags[far] |= F_.FLAG_CENTROID
    # final pass: flux-only fit, centroid covariance, apertures, moments, flags
    model = _model_flat(frame, psf, x, y, flux, hm, chunk)
    xi = np.clip(np.floor(x + 0.5).astype(np.int64), 0, shape[1] - 1)
    yi = np.clip(np.floor(y + 0.5).astype(np.int64), 0, shape[0] - 1)
    if background_error is None:
        bg_err2 = np.zeros(n)
    else:
        be = np.asarray(background_error, dtype=np.float64)
        bg_err2 = (be[yi, xi] if be.ndim == 2 else np.full(n, float(be))) ** 2
        bg_err2 = np.where(np.isfinite(bg_err2), bg_err2, 0.0)
    out = {k: np.full(n, np.nan) for k in cols}
    r_total = total_radius(fw, cfg)
    sq = 2 * hq + 1
    fwhm_sig2 = (fw / FWHM_PER_SIGMA) ** 2
    for sl in chunks(n, chunk):
        xs, ys, fs = x[sl], y[sl], flux[sl]
        m = xs.size
        xc = np.floor(xs + 0.5).astype(np.int64)
        yc = np.floor(ys + 0.5).astype(np.int64)
        # one PSF evaluation (with gradient) on the largest stamp; the fit uses its centre
        Pq, Pxq, Pyq = psf.stamps_with_gradient(xs, ys, sq, xc, yc)
        idq = fr.index(xc, yc, sq)
        Rq = img_at(idq) - model[idq]
        Uq = frame.U[idq]
        Vq = frame.V[idq]
        P, Px, Py = _central(Pq, hf), _central(Pxq, hf), _central(Pyq, hf)
        Rs, Ws, Vs = _central(Rq, hf), frame.W[fr.index(xc, yc, sf)], _central(Vq, hf)
        f32 = fs.astype(np.float32)[:, None, None]
        D = Rs + f32 * P
        WP = Ws * P
        sw = np.einsum("mpq,mpq->m", WP, P).astype(np.float64)
        ok = sw > 0
        swd = np.einsum("mpq,mpq->m", WP, D).astype(np.float64)
        psf_flux = np.where(ok, swd / np.where(ok, sw, 1.0), np.nan)
        var = np.einsum("mpq,mpq->m", WP * WP, Vs).astype(np.float64) / np.where(ok, sw, 1.0) ** 2
        # the background's own error, common to the whole stamp
        var += (WP.sum(axis=(1, 2), dtype=np.float64) / np.where(ok, sw, 1.0)) ** 2 * bg_err2[sl]
        psf_err = np.where(ok, np.sqrt(var), np.nan)
        fl = np.zeros(m, dtype=np.int64)
        fl[~ok] |= F_.FLAG_PSF_FLUX
        edge = (xc - hf < 0) | (xc + hf > nx - 1) | (yc - hf < 0) | (yc + hf > ny - 1)
        fl[edge] |= F_.FLAG_STAMP_EDGE
        # blendedness: neighbours' model flux seen through the PSF
        nb = model[fr.index(xc, yc, sf)] - f32 * P
        with np.errstate(divide="ignore", invalid="ignore"):
            bl = np.einsum("mpq,mpq->m", P, nb) / (np.abs(fs) * np.einsum("mpq,mpq->m", P, P))
        fl[np.nan_to_num(bl) > cfg.blend_fraction] |= F_.FLAG_BLENDED
        # centroid errors from the 3-parameter sandwich at the final position
        sol, N, WA, good = _solve3(np.stack([P, Px, Py], axis=1), D, Ws)
        Ninv = np.linalg.inv(N)
        M = np.einsum("mapq,mbpq,mpq->mab", WA, WA, Vs, optimize=True).astype(np.float64)
        cov = Ninv @ M @ Ninv
        cov[~good] = np.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            fa = np.abs(np.where(np.isfinite(psf_flux), psf_flux, sol[:, 0]))
            x_err = np.sqrt(np.abs(cov[:, 1, 1])) / fa
            y_err = np.sqrt(np.abs(cov[:, 2, 2])) / fa
        # apertures on the neighbour-subtracted image; masked pixels -> own model
        Pa, Ra, Ua, Va = _central(Pq, ha), _central(Rq, ha), _central(Uq, ha), _central(Vq, ha)
        own = f32 * Pa
        Da = np.where(Ua, Ra + own, own)
        # the neighbours' models subtracted under the aperture stamps (their errors add to the apertures')
        Na = _central(img_at(idq), ha) - Ra - own
        sa = 2 * ha + 1
        off = np.arange(sa) - ha
        ddx = off[None, None, :] - (xs - xc)[:, None, None]
        ddy = off[None, :, None] - (ys - yc)[:, None, None]
        for r in radii:
            # the aperture's own stamp: a pixel k px from the stamp centre is at least k - 1 px
            # from the source (|centre offset| <= 0.5 px), so small apertures use small stamps
            hr = min(ha, int(np.ceil(r + 1.0)))
            c = slice(ha - hr, ha + hr + 1)
            a = aperture_stamps(xs - xc, ys - yc, r, hr)
            name = ap_column(r)
            out[name][sl] = np.einsum("mpq,mpq->m", a, Da[:, c, c])
            nb_err = cfg.neighbour_model_error * np.einsum("mpq,mpq->m", a, Na[:, c, c]).astype(np.float64)
            out[name + "_err"][sl] = np.sqrt(np.einsum("mpq,mpq->m", a * a, Va[:, c, c])
                                             + a.sum(axis=(1, 2), dtype=np.float64) ** 2 * bg_err2[sl]
                                             + nb_err ** 2)
            if r == max(radii):
                bad_in = ((a > 0) & ~Ua[:, c, c]).any(axis=(1, 2))
                fl[bad_in] |= F_.FLAG_APERTURE_EDGE
        # the largest aperture (the curve of growth's end) for the bright sources only
        big = np.flatnonzero(np.isfinite(psf_flux) & (psf_flux > cfg.total_min_snr * psf_err))
        if big.size > cfg.total_max_sources:
            big = np.sort(big[np.argsort(-psf_flux[big])[:cfg.total_max_sources]])
        if big.size:
            t, te = _total_apertures(frame, model, fixed_model, psf, xs[big], ys[big], psf_flux[big], hm, r_total,
                                     bg_err2[sl][big], cfg.total_max_blend)
            if radii:
                # dimensionless: the light beyond the largest aperture, as a ratio to it
                cm = ap_column(max(radii))
                am = out[cm][sl][big]
                em = out[cm + "_err"][sl][big]
                with np.errstate(divide="ignore", invalid="ignore"):
                    out[TOTAL_RATIO][sl.start + big] = t / am
                    # the ratio's noise is the annulus' (the inner part is common to both)
                    out[TOTAL_RATIO + "_err"][sl.start + big] = np.sqrt(np.maximum(te ** 2 - em ** 2, 0.0)) / np.abs(am)
        # adaptive moments on a smaller central stamp
        c0 = ha - hmom
        c1 = ha + hmom + 1
        ixx, iyy, ixy, mok = adaptive_moments(Da[:, c0:c1, c0:c1], Ua[:, c0:c1, c0:c1], ddx[:, :, c0:c1],
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
    out["sky"] = background[yi, xi].astype(np.float64) if background is not None else np.zeros(n)
    if mask is not None:
        flags |= mask_or_within(mask, x, y, cfg.flag_radius)
    out["flags"] = flags
    df = pd.DataFrame(out)
    df.attrs[MASK_PLANES_ATTR] = dict(mask_planes if mask_planes is not None else F_.DEFAULT_MASK_PLANES)
    for c in ("x", "y", "x_err", "y_err", "snr", "ixx", "iyy", "ixy", "sky"):
        df[c] = df[c].astype(np.float32)
    if return_model:
        # the model of the final positions and fit fluxes (the 1-parameter fluxes differ negligibly)
        return df, fr.crop(frame.take_scratch())
    return df


def _empty_columns(radii) -> dict:
    cols = ["x", "y", "x_err", "y_err", "psf_flux", "psf_flux_err"]
    for r in radii:
        cols += [ap_column(r), ap_column(r) + "_err"]
    cols += [TOTAL_RATIO, TOTAL_RATIO + "_err", "snr", "ixx", "iyy", "ixy", "sky", "flags"]
    return {c: np.array([], dtype=np.int64 if c == "flags" else np.float64) for c in cols}


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
