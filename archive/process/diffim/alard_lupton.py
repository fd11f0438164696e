"""Alard-Lupton PSF matching and subtraction, with the decorrelation afterburner.

Both images are on one pixel grid and in the same flux units (nJy).  The sharper one
(by PSF FWHM; or as configured) is convolved with a kernel that makes its PSF the
other's:

Kernel basis
    Gaussians of a few widths (``sigmas``, in units of the width that matches the two
    PSFs, sqrt(sigma_wide^2 - sigma_sharp^2), floored at ``min_sigma_px``) times
    polynomials u^i v^j of degree ``degrees`` (one per Gaussian), all separable.  The
    first basis function has sum 1 and every other sum 0, so the kernel's sum (the flux
    ratio) is the first coefficient alone.
Spatial variation
    Each coefficient is a polynomial of degree ``spatial_degree`` in the position;
    a differential background, of degree ``background_degree``, is fitted with it.
Fit
    On stamps around bright, isolated, unmasked, unsaturated stars found on both images
    (at most ``max_stamps``), by weighted least squares (weights 1 / (V_target + V_source)),
    repeated with the stamps whose residual chi^2 is an outlier (``clip_sigma``) removed.
Convolution
    The spatially varying kernel is applied block by block (``block`` px): the kernel at
    each block's centre, by FFT, on the block and a margin (the kernel varies little
    across a block); the image and its variance (with the kernel's square) in one float32
    transform per block, the background polynomial and the difference in the same pass,
    blocks spread over ``threads`` threads (the result does not depend on their number).  Masked pixels (``FILL_PLANES``) of both images are filled from
    their neighbours first, so neither the kernel nor the decorrelation spreads them (a
    science cosmic ray would otherwise be a bright "change"); they keep their mask bits.
Decorrelation (Reiss & Lupton 2016)
    Convolving one image correlates its noise.  The difference is filtered with
    phi(k) = sqrt((s_t^2 + s_c^2) / (s_t^2 + s_c^2 |K(k)|^2)), s_c and s_t the noise of the
    convolved and the other image, K the kernel normalised to sum 1, so the difference
    has white noise of variance s_t^2 + s_c^2 per pixel, which its variance plane then
    says (with the local variances: source Poisson noise included).  The difference PSF
    is the target's PSF filtered by phi.

The result is science - template in both cases (:class:`DifferenceResult`); the score
is the difference filtered with its own PSF over its noise (unit variance on sky).
Matching error
    No kernel matches every star to better than a percent or two (the PSFs of both
    images vary in ways a smooth kernel does not follow), so a bright constant star
    leaves a residual of a fixed fraction of its flux. That fraction, ``epsilon``, is
    measured on the stamps (the PSF-weighted residual over the PSF-weighted flux of each,
    clipped ones included; 1.4826 MAD), and the score counts it as noise: its variance
    gets (epsilon x the template's PSF flux there)^2 besides the pixels' noise, as ZOGY's
    score counts astrometric and source noise, scaled by ``model_error_scale``. On empty
    sky the score is unchanged; on a star it needs a larger change. The scale trades false
    detections at bright stars against changes on bright hosts: on the simulated demo
    field (8 differences of 1024 px, 35 changes at S/N >= 7; 2026-12-06 detection) scale
    0 / 0.3 / 0.5 / 1 found 35 / 35 / 33 / 31 of them, with 1 / 0 / 0 / 0 false DIASources
    away from bright stars and 32 / 16 / 9 / 5 flagged NEAR_BRIGHT_STAR (transients on bright
    hosts are the changes lost). ``model_error=False`` leaves the score without it; the
    variance plane and the fluxes never include it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os

import numpy as np
import scipy.fft as sfft
from scipy import ndimage, signal
from threadpoolctl import threadpool_limits

from archive.errors import ValidationError
from archive.image.exposure import Exposure
from archive.image.psf import FWHM_PER_SIGMA, PixelPSF, normalized_coords, poly_design, poly_terms
from archive.process.diffim.common import centred_fft, mark_border, shared_noise_variance, template_smoothing
from archive.process.diffim.result import DifferenceResult
from archive.process.warp import fill_masked, fill_masked_planes

#: Mask planes whose pixels may not enter a kernel-fit stamp.
STAMP_BAD = ("BAD", "SAT", "CR", "NO_DATA", "EDGE", "STREAK", "INTRP", "SUSPECT")
#: Mask planes filled before convolution (so they do not spread), and carried to the difference.
FILL_PLANES = ("BAD", "SAT", "CR", "NO_DATA", "STREAK")
#: How far (px) a filled pixel's value reaches for its neighbours' (:func:`fill_masked`'s
#: three rounds of Gaussian widths 2, 4, 8 px, truncated at 4 sigma).
FILL_REACH = 33
#: binary_dilation's default (cross) structure, for a stack of 2-D masks.
_CROSS3 = ndimage.generate_binary_structure(2, 1)[None]


@dataclasses.dataclass
class AlardLuptonConfig:
    """See the module docstring.  kernel_size: odd side (px), 0: from the PSFs (about five
    times the wider FWHM); convolve: ``"auto"`` (the sharper image), ``"template"`` or
    ``"science"``; stamp_snr: least peak S/N of a kernel-fit star; stamp_isolation: no
    other peak within this many stamp half-widths (0: neighbours are allowed: the kernel
    maps every static source, and stamps holding something that changed are clipped by
    their chi^2); stamp_flux_tolerance: with a kernel of sum 1, a stamp whose flux differs
    between the images by more than 3 sigma plus this fraction is left out (a star that
    varied: see :func:`same_flux`); decorrelate: apply the afterburner; fit_flux_ratio: fit the kernel's
    sum; by default it is 1 (both images calibrated in nJy: what the difference is for),
    which keeps a kernel too small for a PSF's far wings from scaling the template instead;
    background_mesh: cell size (px) of a smooth background estimated on the difference and
    removed (the two images' background subtractions differ on scales the kernel fit's
    polynomial does not follow); 0: none; threads: cores used (0: all; the result does not
    depend on it)."""

    kernel_size: int = dataclasses.field(default=0, metadata={"min": 0, "max": 101})
    sigmas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    degrees: tuple[int, ...] = (4, 2, 2, 1)
    min_sigma_px: float = dataclasses.field(default=0.7, metadata={"min": 0.1})
    spatial_degree: int = dataclasses.field(default=1, metadata={"min": 0, "max": 4})
    background_degree: int = dataclasses.field(default=1, metadata={"min": 0, "max": 4})
    convolve: str = dataclasses.field(default="auto", metadata={"choices": ("auto", "template", "science")})
    max_stamps: int = dataclasses.field(default=250, metadata={"min": 5})
    stamp_snr: float = dataclasses.field(default=20.0, metadata={"min": 5.0})
    stamp_isolation: float = dataclasses.field(default=0.0, metadata={"min": 0.0})
    stamp_flux_tolerance: float = dataclasses.field(default=0.05, metadata={"min": 0.0})
    clip_sigma: float = dataclasses.field(default=4.0, metadata={"min": 1.0})
    clip_rounds: int = dataclasses.field(default=2, metadata={"min": 0, "max": 10})
    block: int = dataclasses.field(default=512, metadata={"min": 64})
    decorrelate: bool = True
    model_error: bool = True
    model_error_scale: float = dataclasses.field(default=0.3, metadata={"min": 0.0})
    fit_flux_ratio: bool = False
    background_mesh: int = dataclasses.field(default=128, metadata={"min": 0, "max": 4096})
    threads: int = dataclasses.field(default=0, metadata={"min": 0, "max": 256})

    def validate(self) -> None:
        if len(self.sigmas) != len(self.degrees) or not self.sigmas:
            raise ValueError("sigmas and degrees must have the same (non-zero) length")
        if any(s <= 0 for s in self.sigmas) or any(d < 0 for d in self.degrees):
            raise ValueError("sigmas must be positive and degrees non-negative")
        if self.kernel_size and self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")


# -- the kernel basis ---------------------------------------------------------------------------
def kernel_basis(size: int, sigmas_px: list[float], degrees: list[int]) -> np.ndarray:
    """(n, size, size) basis images: Gaussians times monomials; the first sums to 1, the others to 0."""
    h = size // 2
    u = np.arange(-h, h + 1, dtype=np.float64)
    uu, vv = np.meshgrid(u, u)
    out = []
    for s, d in zip(sigmas_px, degrees):
        g = np.exp(-0.5 * (uu ** 2 + vv ** 2) / s ** 2)
        for i in range(d + 1):
            for j in range(d + 1 - i):
                b = g * (uu / s) ** i * (vv / s) ** j
                out.append(b)
    basis = np.asarray(out)
    basis[0] /= basis[0].sum()
    for k in range(1, len(basis)):
        basis[k] -= basis[k].sum() * basis[0]  # zero sum: flux is carried by the first alone
        norm = np.sqrt((basis[k] ** 2).sum())
        if norm > 0:
            basis[k] /= norm
    return basis


# -- stamp selection --------------------------------------------------------------------------
def _bad_pixels(e: Exposure, planes, sl=None) -> np.ndarray:
    """Pixels (of the slice ``sl``) with any of ``planes`` set or a value or variance not finite."""
    sl = sl if sl is not None else (slice(None), slice(None))
    names = [p for p in planes if p in e.mask_planes]
    img, var = e.image[sl], e.variance[sl]
    bad = ~np.isfinite(img) | ~np.isfinite(var)
    if names:
        bad |= (e.mask[sl] & e.get_plane_bitmask(*names)) != 0
    return bad


def select_stamps(a: Exposure, b: Exposure, half: int, cfg: AlardLuptonConfig) -> np.ndarray:
    """Centres (x, y) of bright, isolated, unmasked stars on both images, brightest first."""
    ny, nx = a.shape
    bad = _bad_pixels(a, STAMP_BAD) | _bad_pixels(b, STAMP_BAD) | (a.variance <= 0) | (b.variance <= 0)
    snr = np.where(bad, 0.0, a.image / np.sqrt(np.where(bad, 1.0, a.variance)))
    smooth = ndimage.gaussian_filter(snr, 1.0)
    # local maxima (of 5 x 5) of the smoothed S/N above the threshold: tested at the pixels
    # above it only (the same test as a whole-frame maximum filter there)
    ys, xs = np.nonzero(snr > cfg.stamp_snr)
    inside = (xs >= half) & (xs < nx - half) & (ys >= half) & (ys < ny - half)
    xs, ys = xs[inside], ys[inside]
    if len(xs):
        top = smooth[ys, xs]
        peak = np.ones(len(xs), bool)
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                if dy or dx:
                    peak &= smooth[ys + dy, xs + dx] <= top
        xs, ys = xs[peak], ys[peak]
    # isolation: no other (fainter) peak above 5 sigma within the stamp radius
    if len(xs) and cfg.stamp_isolation > 0:
        faint = (smooth == ndimage.maximum_filter(smooth, size=3)) & (snr > 5.0)
        fy, fx = np.nonzero(faint)
        if len(fx):
            from scipy.spatial import cKDTree

            tree = cKDTree(np.column_stack([fx, fy]))
            counts = np.array([len(n) for n in tree.query_ball_point(np.column_stack([xs, ys]),
                                                                     r=max(1.0, cfg.stamp_isolation * half))])
            keep = counts <= 1
            xs, ys = xs[keep], ys[keep]
    # no masked pixel in the star's core (elsewhere in the stamp masked pixels get no weight)
    if len(xs):
        core = max(2, half // 4)
        d = np.arange(-core, core + 1)
        n_bad = bad[ys[:, None, None] + d[None, :, None], xs[:, None, None] + d[None, None, :]].sum(axis=(1, 2))
        xs, ys = xs[n_bad == 0], ys[n_bad == 0]
    order = np.argsort(-snr[ys, xs])[: cfg.max_stamps]
    return np.column_stack([xs[order], ys[order]]).astype(np.int64)


def same_flux(source: Exposure, target: Exposure, stamps: np.ndarray, half: int, tolerance: float) -> np.ndarray:
    """Which stamps hold the same flux on both images: |F_t - F_s| <= 3 sigma + tolerance x |F_t|,
    F the sum over the stamp's disk of radius ``half`` (pixels unmasked on both; a kernel of
    sum 1 keeps that sum), sigma from both variance planes.  A star that varied between the
    two images (or a changed neighbour) fails: a kernel of fixed sum cannot fit it, and
    bright ones would otherwise bend the kernel's shape to take their change (with a few
    stamps, a chi^2 clip does not single them out)."""
    keep = np.zeros(len(stamps), bool)
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    disk = xx ** 2 + yy ** 2 <= half ** 2
    bad_planes = [p for p in STAMP_BAD if p in source.mask_planes]
    for k, (x, y) in enumerate(stamps):  # a few hundred stamps at most, each a whole-array sum
        sl = (slice(y - half, y + half + 1), slice(x - half, x + half + 1))
        ok = disk & np.isfinite(source.image[sl]) & np.isfinite(target.image[sl]) \
            & np.isfinite(source.variance[sl]) & np.isfinite(target.variance[sl])
        if bad_planes:  # the stamp's own mask pixels only (a whole-frame mask per stamp costs seconds at 4k)
            ok &= ((source.mask[sl] & source.get_plane_bitmask(*bad_planes)) == 0) \
                & ((target.mask[sl] & target.get_plane_bitmask(*[p for p in bad_planes if p in target.mask_planes])) == 0)
        fs, ft = float(source.image[sl][ok].sum()), float(target.image[sl][ok].sum())
        sigma = math.sqrt(float(source.variance[sl][ok].sum() + target.variance[sl][ok].sum()))
        keep[k] = abs(ft - fs) <= 3.0 * sigma + tolerance * abs(ft)
    return keep


# -- fit ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class KernelSolution:
    """coeffs: (n_basis, n_spatial) polynomial coefficients of each basis; bg: background
    polynomial coefficients; basis: (n_basis, K, K); bbox: the domain of the spatial
    polynomials (x0, y0, x1, y1); spatial_degree, background_degree; stamps: centres used;
    chi2: reduced chi^2 of the stamps used."""

    coeffs: np.ndarray
    bg: np.ndarray
    basis: np.ndarray
    bbox: tuple[float, float, float, float]
    spatial_degree: int
    background_degree: int
    stamps: np.ndarray
    chi2: float

    def kernel(self, x: float, y: float) -> np.ndarray:
        w = poly_design(float(x), float(y), self.spatial_degree, self.bbox)
        return np.tensordot(self.coeffs @ w, self.basis, axes=(0, 0))

    def background(self, shape, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """The background polynomial on the frame of ``shape`` (or its ``rows`` x ``cols``), as
        outer products: sum over j of v^j (a column) times sum over i of c_ij u^i (a row)."""
        ny, nx = shape
        ys = np.arange(ny, dtype=float)[rows]
        xs = np.arange(nx, dtype=float)[cols]
        u, _ = normalized_coords(xs, np.zeros_like(xs), self.bbox)
        _, v = normalized_coords(np.zeros_like(ys), ys, self.bbox)
        terms = poly_terms(self.background_degree)
        out = np.zeros((len(ys), len(xs)))
        for j in sorted({j for _, j in terms}):
            row = sum(c * u ** i for c, (i, jj) in zip(self.bg, terms) if jj == j)
            out += np.multiply.outer(v ** j, row)
        return out.astype(np.float32)


def fit_kernel(source: Exposure, target: Exposure, basis: np.ndarray, cfg: AlardLuptonConfig,
               stamps: np.ndarray, half: int, threads: int = 1) -> KernelSolution:
    """Least-squares kernel taking ``source`` to ``target`` on (2 half + 1)^2 stamps centred on
    ``stamps`` (see the module docstring)."""
    ny, nx = source.shape
    kh = basis.shape[-1] // 2
    bbox = (0.0, 0.0, float(nx - 1), float(ny - 1))
    ns = len(stamps)
    if ns < 3:
        raise ValidationError(f"PSF matching: only {ns} usable stars for the kernel fit (need 3 or more)")
    side = 2 * half + 1
    first = 0 if cfg.fit_flux_ratio else 1  # with a known flux ratio the first basis is fixed at 1
    nb = len(basis)
    # every stamp's source region (the stamp and the kernel's reach), its masked pixels filled
    # (they must not spread), and which of its pixels are masked on either image: all from the
    # regions alone (the fill at a pixel sees FILL_REACH px around it, the frame's own edges
    # where the window meets them)
    rs = side + 2 * kh
    r0 = half + kh
    regions = np.empty((ns, rs, rs))
    bad_src = np.empty((ns, rs, rs), bool)
    bad_tgt = np.empty((ns, side, side), bool)
    for i, (x, y) in enumerate(stamps):
        sl = (slice(y - r0, y + r0 + 1), slice(x - r0, x + r0 + 1))
        bs = _bad_pixels(source, STAMP_BAD, sl)
        bad_src[i] = bs
        bad_tgt[i] = _bad_pixels(target, STAMP_BAD, (slice(y - half, y + half + 1), slice(x - half, x + half + 1)))
        if bs.any():
            wy0, wy1 = max(0, y - r0 - FILL_REACH), min(ny, y + r0 + 1 + FILL_REACH)
            wx0, wx1 = max(0, x - r0 - FILL_REACH), min(nx, x + r0 + 1 + FILL_REACH)
            win = (slice(wy0, wy1), slice(wx0, wx1))
            filled = fill_masked(source.image[win], _bad_pixels(source, STAMP_BAD, win))
            regions[i] = filled[y - r0 - wy0:y + r0 + 1 - wy0, x - r0 - wx0:x + r0 + 1 - wx0]
        else:
            regions[i] = source.image[sl]
    # every stamp's region convolved with every basis image, by batched FFTs (circular of a size
    # of at least the region: the stamp's pixels are those the kernel does not wrap at)
    fs = sfft.next_fast_len(rs, real=True)
    fr = sfft.rfft2(regions, (fs, fs), workers=threads)
    fb = sfft.rfft2(basis, (fs, fs), workers=threads)
    conv = np.empty((ns, nb, side * side))
    for b in range(nb):  # per basis: the (ns, ...) product stays small
        full = sfft.irfft2(fr * fb[b][None], (fs, fs), workers=threads)
        conv[:, b] = full[:, 2 * kh:2 * kh + side, 2 * kh:2 * kh + side].reshape(ns, -1)
    tgt = np.stack([target.image[y - half:y + half + 1, x - half:x + half + 1] for x, y in stamps]).reshape(ns, -1)
    var = np.stack([target.variance[y - half:y + half + 1, x - half:x + half + 1]
                    + source.variance[y - half:y + half + 1, x - half:x + half + 1] for x, y in stamps])
    # no weight where either image is masked (around a masked source pixel: the kernel's reach;
    # the dilation of a region reaches its stamp's pixels from inside the region only)
    near_bad = ndimage.binary_dilation(bad_src, structure=_CROSS3, iterations=kh)[:, kh:kh + side, kh:kh + side] \
        if kh else bad_src
    nb_st = near_bad | bad_tgt
    w = np.where(nb_st | ~(np.isfinite(var) & (var > 0)), 0.0, 1.0 / np.where(var > 0, var, 1.0)).reshape(ns, -1)
    ws = poly_design(stamps[:, 0].astype(float), stamps[:, 1].astype(float), cfg.spatial_degree, bbox)  # (ns, nt)
    wb = poly_design(stamps[:, 0].astype(float), stamps[:, 1].astype(float), cfg.background_degree, bbox)
    nt, nbt = ws.shape[1], wb.shape[1]
    c = conv[:, first:]
    nbk = nb - first
    rhs = tgt - (conv[:, 0] if first else 0.0)
    cw = c * w[:, None, :]
    # per-stamp normal-equation pieces; the spatial terms are constant over a stamp
    with threadpool_limits(limits=1, user_api="blas"):  # small products: BLAS threads only spin (seconds, loaded)
        gram = cw @ c.transpose(0, 2, 1)          # (ns, nbk, nbk)
    cr = (cw @ rhs[:, :, None])[:, :, 0]          # (ns, nbk)
    cbg = cw.sum(axis=2)                          # (ns, nbk)
    wsum = w.sum(axis=1)
    wr = (w * rhs).sum(axis=1)
    use = np.ones(ns, bool)
    for _ in range(cfg.clip_rounds + 1):
        u = use
        a_kk = np.einsum("sbc,st,su->btcu", gram[u], ws[u], ws[u]).reshape(nbk * nt, nbk * nt)
        a_kb = np.einsum("sb,st,sv->btv", cbg[u], ws[u], wb[u]).reshape(nbk * nt, nbt)
        a_bb = np.einsum("s,sv,sz->vz", wsum[u], wb[u], wb[u])
        a = np.block([[a_kk, a_kb], [a_kb.T, a_bb]])
        r = np.concatenate([np.einsum("sb,st->bt", cr[u], ws[u]).ravel(), np.einsum("s,sv->v", wr[u], wb[u])])
        sol = np.linalg.lstsq(a, r, rcond=None)[0]
        coef = sol[:nbk * nt].reshape(nbk, nt)
        per_stamp = ws @ coef.T                    # (ns, nbk): each stamp's basis coefficients
        model = np.einsum("sb,sbp->sp", per_stamp, c) + (wb @ sol[nbk * nt:])[:, None]
        chi = ((rhs - model) ** 2 * w).sum(axis=1) / np.maximum((w > 0).sum(axis=1), 1)
        med = np.median(chi[use])
        mad = 1.4826 * np.median(np.abs(chi[use] - med))
        new = chi <= med + cfg.clip_sigma * max(mad, 1e-3 * med)
        if new.sum() < 3 or np.array_equal(new, use):
            break
        use = new
    coeffs = sol[:nbk * nt].reshape(nbk, nt)
    if first:
        fixed = np.zeros((1, nt))
        fixed[0, 0] = 1.0  # the constant monomial: the kernel sums to 1 everywhere
        coeffs = np.vstack([fixed, coeffs])
    return KernelSolution(coeffs, sol[nbk * nt:], basis, bbox, cfg.spatial_degree, cfg.background_degree,
                          stamps[use], float(np.median(chi[use])))


# -- applying a spatially varying kernel -------------------------------------------------------------
def _blocks(shape, block: int):
    ny, nx = shape
    for y0 in range(0, ny, block):
        for x0 in range(0, nx, block):
            yield y0, min(ny, y0 + block), x0, min(nx, x0 + block)


#: Floating type of the per-block FFTs: float32 leaves the difference within ~2e-4 sigma of float64's
#: (measured on the bench and test pairs; float64 itself is within float32's rounding, ~3e-5 sigma).
BLOCK_FFT_DTYPE = np.float32


def _block_convolve(planes: list[np.ndarray], kernels: list[np.ndarray], y0: int, y1: int, x0: int, x1: int,
                    dtype=BLOCK_FFT_DTYPE, mode: str = "edge", cache: dict | None = None) -> np.ndarray:
    """(n, y1 - y0, x1 - x0): each plane's block convolved with its kernel (odd squares of one
    size), from the block and a margin of the kernel's half-width (beyond the frame: its edge
    pixels repeated, ``mode="edge"``, or zeros, ``"constant"``), by one real FFT of all planes
    (circular, of at least the region's size: the block's pixels are those the kernels do not
    wrap at).  ``cache``: a dict keeping the kernels' transforms by size (kernels that are the
    same for every block)."""
    ny, nx = planes[0].shape
    h = kernels[0].shape[0] // 2
    ya, yb = max(0, y0 - h), min(ny, y1 + h)
    xa, xb = max(0, x0 - h), min(nx, x1 + h)
    pad = ((h - (y0 - ya), h - (yb - y1)), (h - (x0 - xa), h - (xb - x1)))
    regions = np.stack([np.pad(p[ya:yb, xa:xb], pad, mode=mode) for p in planes]).astype(dtype, copy=False)
    shape = (sfft.next_fast_len(regions.shape[1], real=True), sfft.next_fast_len(regions.shape[2], real=True))
    kf = cache.get(shape) if cache is not None else None
    if kf is None:
        kf = sfft.rfft2(np.stack(kernels).astype(dtype, copy=False), shape)
        if cache is not None:
            cache[shape] = kf
    spec = sfft.rfft2(regions, shape)
    spec *= kf
    return sfft.irfft2(spec, shape)[:, 2 * h:2 * h + (y1 - y0), 2 * h:2 * h + (x1 - x0)]


def _each_block(shape, block: int, fn, threads: int) -> None:
    """``fn(y0, y1, x0, x1)`` for every block of the frame, on ``threads`` threads (numpy and
    scipy.fft release the GIL; each block writes its own pixels only)."""
    boxes = list(_blocks(shape, block))
    if threads <= 1 or len(boxes) <= 1:
        for box in boxes:
            fn(*box)
        return
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(boxes))) as pool:
        for f in [pool.submit(fn, *box) for box in boxes]:
            f.result()


def convolve_varying(image: np.ndarray, kernel_at, block: int, square: bool = False, threads: int = 1) -> np.ndarray:
    """``image`` convolved with ``kernel_at(x, y)`` (the kernel at each block's centre), block by
    block; ``square``: convolve with the kernel's square (to propagate a variance plane)."""
    out = np.empty(image.shape, np.float32)

    def one(y0, y1, x0, x1):
        k = kernel_at(0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1))
        out[y0:y1, x0:x1] = _block_convolve([image], [k * k if square else k], y0, y1, x0, x1)[0]

    _each_block(image.shape, block, one, threads)
    return out


def decorrelation_kernel(kernel: np.ndarray, var_target: float, var_convolved: float, size: int) -> np.ndarray:
    """The real-space afterburner phi (``size`` x ``size``, sum 1) for a matching kernel."""
    n = 4 * size
    kn = kernel / kernel.sum()
    pad = np.zeros((n, n))
    h = kn.shape[0] // 2
    pad[:kn.shape[0], :kn.shape[1]] = kn
    pad = np.roll(pad, (-h, -h), axis=(0, 1))
    kf = np.fft.fft2(pad)
    phi_f = np.sqrt((var_target + var_convolved) / (var_target + var_convolved * np.abs(kf) ** 2))
    phi = np.real(np.fft.ifft2(phi_f))
    phi = np.roll(phi, (size // 2, size // 2), axis=(0, 1))[:size, :size]
    return phi / phi.sum()


def psf_from_kernels(nodes: np.ndarray, kernels: np.ndarray, shape, degree: int = 1) -> PixelPSF:
    """A spatially varying pixel PSF fitted to centred kernels at whole-pixel ``nodes`` (x, y)."""
    ny, nx = shape
    bb = (0.0, 0.0, float(max(nx - 1, 1)), float(max(ny - 1, 1)))
    deg = degree if len(nodes) >= (degree + 1) * (degree + 2) // 2 else 0
    design = poly_design(nodes[:, 0].astype(float), nodes[:, 1].astype(float), deg, bb)
    sol, *_ = np.linalg.lstsq(design, kernels.reshape(len(nodes), -1), rcond=None)
    size = kernels.shape[-1]
    return PixelPSF(sol.reshape(-1, size, size), None, oversample=1, degree=deg, bbox=bb)


def _median_var(e: Exposure, ok: np.ndarray) -> float:
    v = e.variance[ok]
    return float(np.median(v)) if v.size else float("nan")


def subtract(science: Exposure, template: Exposure, config: AlardLuptonConfig | None = None,
             covariance: np.ndarray | None = None) -> DifferenceResult:
    """science - PSF-matched template (see the module docstring).

    ``covariance``: per pixel (science grid, flux units squared), the covariance of the two
    images' noise where the science is one of the template's inputs (its share of the
    template's weight times its variance: :func:`archive.process.diffim.template.join_templates`).
    That noise is in both images and cancels in part, so the difference's variance is
    lowered by twice it (on PSF scales, where measurements are made), never below
    :data:`~archive.process.diffim.common.MIN_VARIANCE_FRACTION` of the independent-noise value."""
    cfg = config or AlardLuptonConfig()
    if science.shape != template.shape:
        raise ValidationError(f"subtract: science {science.shape} and template {template.shape} grids differ")
    if science.psf is None or template.psf is None:
        raise ValidationError("subtract: both images need a PSF")
    threads = cfg.threads or os.cpu_count() or 1
    ny, nx = science.shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    f_sci, f_tpl = float(science.psf.fwhm(cx, cy)), float(template.psf.fwhm(cx, cy))
    convolve = cfg.convolve if cfg.convolve != "auto" else ("template" if f_tpl <= f_sci else "science")
    source, target = (template, science) if convolve == "template" else (science, template)
    f_src, f_tgt = (f_tpl, f_sci) if convolve == "template" else (f_sci, f_tpl)
    match_sigma = max(math.sqrt(max(f_tgt ** 2 - f_src ** 2, 0.0)) / FWHM_PER_SIGMA, cfg.min_sigma_px)
    # the kernel must reach the far wings of a Moffat-like PSF (~4 FWHM)
    size = cfg.kernel_size or 2 * int(math.ceil(4.0 * max(f_sci, f_tpl))) + 1
    basis = kernel_basis(size, [s * match_sigma for s in cfg.sigmas], list(cfg.degrees))
    half = size // 2 + int(math.ceil(1.5 * f_tgt))  # the kernel's reach plus the star's core
    stamps = select_stamps(target, source, half + size // 2, cfg)
    if not cfg.fit_flux_ratio:
        stamps = stamps[same_flux(source, target, stamps, half, cfg.stamp_flux_tolerance)]
    sol = fit_kernel(source, target, basis, cfg, stamps, half, threads)

    # fill masked pixels of the convolved image so they do not spread; keep their masks
    planes = [p for p in FILL_PLANES if p in source.mask_planes]
    bad_src = (source.mask_of(*planes) if planes else np.zeros(source.shape, bool)) | ~np.isfinite(source.image)
    var_bad = ~np.isfinite(source.variance)
    if (var_bad & ~bad_src).any():
        src_img = fill_masked(source.image, bad_src)
        src_var = fill_masked(np.where(var_bad, np.nan, source.variance), bad_src | var_bad)
    else:  # the same pixels to fill in both: one pass, the same values
        src_img, src_var = fill_masked_planes([source.image, source.variance], bad_src)
    # the target's masked pixels (a science cosmic ray, a bad column) are filled too: the
    # decorrelation would spread them, and a masked pixel is not a change (its mask stays set)
    planes_t = [p for p in FILL_PLANES if p in target.mask_planes]
    bad_tgt = (target.mask_of(*planes_t) if planes_t else np.zeros(target.shape, bool)) | ~np.isfinite(target.image)
    tgt_img = fill_masked(target.image, bad_tgt) if bad_tgt.any() else target.image
    # per block: the source and its variance convolved with the kernel there (and its square),
    # plus the background polynomial, and the difference with the target
    conv = np.empty(source.shape, np.float32)
    conv_var = np.empty(source.shape, np.float32)
    diff = np.empty(source.shape, np.float32)

    def match(y0, y1, x0, x1):
        k = sol.kernel(0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1))
        c = _block_convolve([src_img, src_var], [k, k * k], y0, y1, x0, x1)
        box = (slice(y0, y1), slice(x0, x1))
        conv[box], conv_var[box] = c[0], c[1]
        matched = conv[box] + sol.background(source.shape, box[0], box[1])
        diff[box] = (tgt_img[box] - matched) if convolve == "template" else (matched - tgt_img[box])

    _each_block(source.shape, cfg.block, match, threads)
    ok = ~bad_src & ~bad_tgt & np.isfinite(target.variance) & np.isfinite(source.variance)
    if cfg.background_mesh:
        diff = diff - difference_background(diff, target.variance + conv_var, ~ok, cfg.background_mesh, threads)
    var_t = target.variance.astype(np.float32)
    # per-pixel variance before decorrelation (correlated noise); after it: white, s_t^2 + s_c^2
    if cfg.decorrelate:
        vt, vc = _median_var(target, ok), _median_var(source, ok)

        def phi_at(x, y):
            return decorrelation_kernel(sol.kernel(x, y), vt, vc, size)

        diff = convolve_varying(np.where(np.isfinite(diff), diff, np.float32(0.0)).astype(np.float32), phi_at,
                                cfg.block, threads=threads)
        variance = var_t + np.where(np.isfinite(source.variance), source.variance, np.inf).astype(np.float32)
    else:
        phi_at = None
        variance = var_t + conv_var
    # the difference's PSF: the target's, filtered by phi (or as it is)
    gx = np.unique(np.round(np.linspace(0, nx - 1, 3)))
    gy = np.unique(np.round(np.linspace(0, ny - 1, 3)))
    nodes = np.array([(x, y) for y in gy for x in gx])
    psf_size = max(size, 2 * int(math.ceil(2.5 * max(f_sci, f_tpl))) + 1)
    kernels = []
    for x, y in nodes:
        k = target.psf.kernel(float(x), float(y), psf_size)
        if phi_at is not None:
            k = signal.fftconvolve(k, phi_at(x, y), mode="same")
        kernels.append(k / k.sum())
    psf = psf_from_kernels(nodes, np.asarray(kernels), science.shape)
    rho = None
    if covariance is not None:
        rho = shared_noise_factor(science.psf.kernel(cx, cy, psf_size), template.psf.kernel(cx, cy, psf_size),
                                  sol.kernel(cx, cy), phi_at(cx, cy) if phi_at is not None else None, convolve)
        variance = shared_noise_variance(variance, rho * covariance)
    mask = science.mask | _translate(template, science.mask_planes)
    no_data = ~np.isfinite(template.variance) | ((template.mask & template.get_plane_bitmask("NO_DATA")) != 0)
    if no_data.any():  # the convolutions reach that far from the filled pixels: not a difference there
        no_data = _dilate_within(no_data, size)
    mask[no_data] |= np.int32(science.get_plane_bitmask("NO_DATA"))
    # the convolved image has nothing beyond the frame: where the kernel reaches past it, the
    # difference is biased (a star at the border loses flux in one image only): EDGE there
    mark_border(mask, science.mask_planes, [sol.kernel(cx, cy)])
    variance = np.where(no_data, np.inf, variance).astype(np.float32)
    diff = np.where(no_data, 0.0, diff).astype(np.float32)
    out = Exposure(diff, mask, variance, wcs=science.wcs, psf=psf, photo_calib=science.photo_calib,
                   info=science.info.copy(), mask_planes=dict(science.mask_planes))
    eps = cfg.model_error_scale * matching_error(source, target, sol, stamps, half, convolve) \
        if cfg.model_error else 0.0
    tpl_side = conv if convolve == "template" else target.image  # the template's light, matched
    score = score_image(out, np.where(no_data, np.float32(0.0), tpl_side), eps, threads, cfg.block)
    meta = {"convolved": convolve, "kernel_size": size, "n_basis": int(len(basis)), "n_stamps": int(len(sol.stamps)),
            "kernel_chi2": sol.chi2, "kernel_sum": float(sol.kernel(cx, cy).sum()), "fwhm_science": f_sci,
            "fwhm_template": f_tpl, "background": sol.bg.tolist(), "decorrelated": bool(cfg.decorrelate),
            "matching_error": eps, "shared_noise_factor": rho}
    return DifferenceResult(out, score, "alard_lupton", meta)


def shared_noise_factor(psf_science: np.ndarray, psf_template: np.ndarray, kernel: np.ndarray,
                        phi: np.ndarray | None, convolve: str) -> float:
    """How much of the science's noise, shared with the template, cancels in a PSF-fit flux on
    the difference, per unit of their per-pixel covariance (1: all of it).

    The science's noise n enters the difference as (phi K) n and, through the template, as
    -f (phi G) n (science convolved; phi n and -f phi K G n when the template is), G the
    smoothing that took the science to the template's PSF (G = P_t / P_s in Fourier space:
    a PSF-homogenized template; |G| <= 1).  The cross term of a PSF fit with the difference's
    PSF P_d then scales the covariance by  int |P_d|^2 |phi|^2 Re(K conj G) / int |P_d|^2
    (conj K G for a convolved template): one for identical PSFs, less where the template
    smoothed the science's noise on scales the fit weighs."""
    n = 1 << int(math.ceil(math.log2(4 * max(psf_science.shape[0], psf_template.shape[0], kernel.shape[0]))))
    ps, pt = centred_fft(psf_science / psf_science.sum(), n), centred_fft(psf_template / psf_template.sum(), n)
    kf = centred_fft(kernel / kernel.sum(), n)
    ph = centred_fft(phi / phi.sum(), n) if phi is not None else np.ones((n, n))
    g = template_smoothing(ps, pt)
    target = pt if convolve == "science" else ps
    pd2 = np.abs(target * ph) ** 2
    cross = (kf * np.conj(g)) if convolve == "science" else np.conj(kf * g)
    return float(np.clip((pd2 * np.abs(ph) ** 2 * cross.real).sum() / pd2.sum(), 0.0, 1.0))


def difference_background(diff: np.ndarray, variance: np.ndarray, bad: np.ndarray, mesh: int,
                          threads: int = 1) -> np.ndarray:
    """A smooth background of a difference image (cells of ``mesh`` px), leaving out ``bad``
    pixels and everything within a few pixels of a 3-sigma excursion (real changes,
    residuals of bright sources).

    :func:`archive.process.background.estimate_background` (one pass) of the difference with
    those pixels masked, its ``background`` only; the cells' statistics (and the excursion
    mask they need) are computed in bands of cell rows on ``threads`` threads (a cell's
    statistics are its own pixels'; the excursion mask of a band from the band and 5 px
    around it), then joined, filled, filtered and interpolated as there.  The excursions:
    the 3 x 3 mean of |diff| / sigma above 3, grown by 4 px (a cross, 4 times)."""
    from archive.process import background as bgm

    cfg = bgm.BackgroundConfig(mesh_size=int(mesh), passes=1)
    ny, nx = diff.shape
    mesh = int(mesh)
    my = -(-ny // mesh)
    per = max(1, -(-my // (4 * max(threads, 1))))
    bands = [(j * mesh, min(ny, (j + per) * mesh)) for j in range(0, my, per)]
    reach = 5  # the 3 x 3 box filter (1 px) and the 4 dilations (4 px)
    stats: list = [None] * len(bands)

    def one(i):
        r0, r1 = bands[i]
        a0, a1 = max(0, r0 - reach), min(ny, r1 + reach)
        with np.errstate(invalid="ignore", divide="ignore"):
            v = variance[a0:a1]
            z = np.abs(diff[a0:a1]) / np.sqrt(np.where(v > 0, v, np.inf))
        hot = _dilate_cross(_box3_mean(np.nan_to_num(z, copy=False)) > 3.0, 4)[r0 - a0:r1 - a0]
        d = diff[r0:r1]
        good = np.isfinite(d) & ~bad[r0:r1] & ~hot
        stats[i] = bgm._cell_stats(d, good, mesh, cfg.clip_sigma, cfg.clip_iters, cfg.estimator)

    if threads > 1 and len(bands) > 1:
        with concurrent.futures.ThreadPoolExecutor(min(threads, len(bands))) as pool:
            list(pool.map(one, range(len(bands))))
    else:
        for i in range(len(bands)):
            one(i)
    mode, std, n, cell_pix = (np.concatenate([st[k] for st in stats]) for k in range(4))
    ok = (n >= cfg.min_good_fraction * cell_pix) & np.isfinite(mode) & (std > 0)
    if not ok.any():
        ok = (n >= 8) & (std > 0)
    return bgm._interpolate(bgm._fill_and_filter(mode, ok, cfg.filter_size, cfg.smooth_size), diff.shape, mesh)


def _box3_mean(z: np.ndarray) -> np.ndarray:
    """``ndimage.uniform_filter(z, 3)`` (mirrored edges) as sums of shifted slices in float32:
    the same values but for rounding (the filter's running sums are in float64)."""
    p = np.pad(z, 1, mode="symmetric")
    rows = p[:-2] + p[1:-1]
    rows += p[2:]
    out = rows[:, :-2] + rows[:, 1:-1]
    out += rows[:, 2:]
    out *= np.float32(1.0 / 9.0)
    return out


def _dilate_cross(mask: np.ndarray, n: int) -> np.ndarray:
    """``ndimage.binary_dilation(mask, iterations=n)`` (the 3 x 3 cross, nothing beyond the
    edges) by shifted ORs of whole rows and columns: the same pixels, ~8x faster."""
    out = mask.copy()
    for _ in range(n):
        prev = out.copy()
        out[1:] |= prev[:-1]
        out[:-1] |= prev[1:]
        out[:, 1:] |= prev[:, :-1]
        out[:, :-1] |= prev[:, 1:]
    return out


def _dilate_within(bad: np.ndarray, n: int) -> np.ndarray:
    """``binary_dilation(bad, 3 x 3 square, iterations=n)``, computed on the box around the
    ``bad`` pixels that it can reach (n px beyond them) only: the same pixels."""
    rows, cols = np.flatnonzero(bad.any(axis=1)), np.flatnonzero(bad.any(axis=0))
    ny, nx = bad.shape
    y0, y1 = max(0, rows[0] - n), min(ny, rows[-1] + n + 1)
    x0, x1 = max(0, cols[0] - n), min(nx, cols[-1] + n + 1)
    out = np.zeros_like(bad)
    out[y0:y1, x0:x1] = ndimage.binary_dilation(bad[y0:y1, x0:x1], structure=np.ones((3, 3), bool), iterations=n)
    return out


def _translate(template: Exposure, planes: dict[str, int]) -> np.ndarray:
    """The template's mask bits in the science image's layout (planes both have)."""
    pairs = [(bit, planes[name]) for name, bit in template.mask_planes.items()
             if name in planes and name not in ("DETECTED", "DETECTED_NEGATIVE")]
    same = sum(1 << a for a, b in pairs if a == b)  # planes on the same bit in both: one AND
    out = template.mask & np.int32(same) if same else np.zeros(template.shape, np.int32)
    for a, b in pairs:
        if a != b:
            out |= np.where((template.mask & (1 << a)) != 0, np.int32(1 << b), 0)
    return out.astype(np.int32, copy=False)


def matching_error(source: Exposure, target: Exposure, sol: KernelSolution, stamps: np.ndarray, half: int,
                   convolve: str) -> float:
    """The kernel's fractional matching error on the stars of ``stamps`` (all candidates,
    clipped ones too): 1.4826 MAD of sum P (model - target) / sum P target over the stamps,
    P the target's PSF there (0 with fewer than 3 stamps)."""
    if len(stamps) < 3:
        return 0.0
    kh = sol.basis.shape[-1] // 2
    side = 2 * half + 1
    fr = []
    for x, y in stamps:
        region = source.image[y - half - kh:y + half + kh + 1, x - half - kh:x + half + kh + 1].astype(np.float64)
        tgt = target.image[y - half:y + half + 1, x - half:x + half + 1].astype(np.float64)
        if region.shape != (side + 2 * kh, side + 2 * kh) or not (np.isfinite(region).all()
                                                                   and np.isfinite(tgt).all()):
            continue
        model = signal.fftconvolve(region, sol.kernel(x, y), mode="valid")
        p = target.psf.kernel(float(x), float(y), side)
        flux = float((p * tgt).sum())
        if flux > 0:
            fr.append(float((p * (model - tgt)).sum()) / flux)
    if len(fr) < 3:
        return 0.0
    fr = np.asarray(fr)
    return float(min(0.2, 1.4826 * np.median(np.abs(fr - np.median(fr))) + abs(np.median(fr))))


def score_image(diff: Exposure, template: np.ndarray | None = None, epsilon: float = 0.0,
                threads: int = 1, block: int = 512) -> np.ndarray:
    """The difference filtered with its own PSF over the noise of that sum: a per-pixel S/N of
    a point source there (unit variance on empty sky when the variance plane is right).
    ``template`` (the template's light on the difference's grid and units) and ``epsilon``:
    a matching error of ``epsilon`` times the template's PSF flux counted as noise too.
    The filters (the PSF at the frame's centre, zero beyond the frame) by float32 FFTs of
    ``block`` px blocks, on ``threads`` threads."""
    ny, nx = diff.shape
    k = diff.psf.kernel((nx - 1) / 2.0, (ny - 1) / 2.0, None)
    kf = k[::-1, ::-1]
    fin = np.isfinite(diff.variance)
    planes = [diff.image, np.where(fin, diff.variance, np.float32(0.0))]
    kernels = [kf, kf * kf]
    with_tpl = template is not None and epsilon > 0
    if with_tpl:
        planes.append(np.where(np.isfinite(template), template, np.float32(0.0)))
        kernels.append(kf)
    out = np.empty((ny, nx), np.float32)
    cache: dict = {}
    eps2 = np.float32(epsilon) ** 2

    def one(y0, y1, x0, x1):
        c = _block_convolve(planes, kernels, y0, y1, x0, x1, np.float32, "constant", cache)
        num, den = c[0], c[1]
        if with_tpl:
            den = den + eps2 * c[2] ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            s = num / np.sqrt(den)  # sum k D over its noise sqrt(sum k^2 V)
        out[y0:y1, x0:x1] = np.where(fin[y0:y1, x0:x1] & (den > 0), s, np.float32(0.0))

    _each_block((ny, nx), block, one, threads)
    return out
