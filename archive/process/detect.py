"""Matched-filter detection with a peak-based deblend.

The background-subtracted image is correlated with a Gaussian of the PSF's FWHM,
weighting every pixel by its inverse variance (masked pixels weigh zero):

    flux(x)  = sum(P D w) / sum(P^2 w),   S/N(x) = sum(P D w) / sqrt(sum(P^2 w))

Both sums are Gaussian filters (P^2 of a Gaussian is a narrower Gaussian), so the
detection map costs two separable convolutions. Pixels above ``threshold`` sigma form
footprints (8-connected, :func:`scipy.ndimage.label`); every local maximum of the
S/N map in a footprint is a candidate peak, and a fainter peak survives the deblend
only if it rises ``deblend_nsigma`` sigma (and ``deblend_contrast`` of its own S/N)
above the lowest point on the straight line to the nearest brighter peak (a noise
test), and if the multi-threshold deblender (:mod:`archive.process.deblend`) finds
that its branch and its sibling's each hold ``deblend_min_contrast`` of the
footprint's flux (SExtractor's criterion: clumps and noise bumps of a galaxy stay
part of it).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from archive.errors import ValidationError
from archive.image.blas import TILE_MNK
from archive.image.psf import FWHM_PER_SIGMA
from archive.process.deblend import multi_threshold_separate

log = logging.getLogger(__name__)


@dataclass
class DetectionConfig:
    """Configuration of :func:`detect_sources`.

    threshold: detection threshold in sigma of the matched-filter S/N map.
    min_pixels: minimum number of above-threshold pixels in a footprint.
    deblend: split footprints with several significant peaks.
    deblend_nsigma: a secondary peak must exceed the saddle towards a brighter peak by this (sigma).
    deblend_contrast: ... and by this fraction of its own peak S/N.
    min_separation: peaks closer than this (px) to a brighter one are merged into it.
    n_saddle_samples: samples along the peak-to-peak segment used to find the saddle.
    deblend_levels: thresholds per secondary peak of the multi-threshold deblender (exponentially spaced).
    deblend_min_contrast: a secondary peak's branch (and its sibling's) must hold this fraction of
        the footprint's flux (0 turns the multi-threshold test off).
    """

    threshold: float = 5.0
    min_pixels: int = 3
    deblend: bool = True
    deblend_nsigma: float = 3.0
    deblend_contrast: float = 0.1
    min_separation: float = 1.5
    n_saddle_samples: int = 12
    deblend_levels: int = 16
    deblend_min_contrast: float = 0.001

    def to_dict(self) -> dict:
        return asdict(self)


def _gauss_taps(sigma: float, truncate: float) -> np.ndarray:
    """The normalised 1-D Gaussian taps of ``scipy.ndimage.gaussian_filter1d`` (radius ``int(truncate sigma + 0.5)``)."""
    r = int(truncate * float(sigma) + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / float(sigma)) ** 2)
    return k / k.sum()


def _band(k: np.ndarray, n: int) -> np.ndarray:
    """``(n, n + len(k) - 1)`` float32 Toeplitz matrix whose row ``i`` holds the taps ``k`` at columns ``i .. i + len(k) - 1``."""
    B = np.zeros((n, n + k.size - 1), dtype=np.float32)
    i = np.arange(n)
    B[i[:, None], i[:, None] + np.arange(k.size)[None, :]] = k.astype(np.float32)
    return B


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices of scipy's ``mode="reflect"`` (``d c b a | a b c d | d c b a``) for ``-n <= idx < 2 n``."""
    return np.where(idx < 0, -idx - 1, np.where(idx >= n, 2 * n - idx - 1, idx))


#: output rows (columns) per band block in :func:`gaussian_blur` (fastest of 16-96 on a 4k image; the
#: products do ``(_BLOCK + 2 r) / (2 r + 1)`` times the taps' work for a kernel of radius r)
_BLOCK = 24


def gaussian_blur(a: np.ndarray, sigma: float, truncate: float = 4.0, out: np.ndarray | None = None,
                  work: np.ndarray | None = None) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(a, sigma, truncate=truncate)`` in float32 (reflect edges).

    Written here rather than calling ndimage because ndimage's 1-D correlation (double
    line buffers, one tap at a time) is ~5x slower on a 4k x 4k image: each pass is a
    product with a banded Toeplitz matrix of the taps, done tile by tile (``_BLOCK``
    output rows or columns, plus the kernel's halo; at most
    :data:`~archive.image.blas.TILE_MNK` multiply-adds each) in single-threaded BLAS sgemm.
    The halo beyond the image is reflected like ndimage's ``mode="reflect"``; results
    agree with ndimage to float32 rounding (~3e-7 relative). ``out``: a float32 array of
    ``a``'s shape for the result; it may be ``a`` itself (filtered in place). ``work``: a
    float32 array of that shape for the intermediate (row-filtered) image, distinct from both.
    """
    a = np.asarray(a, dtype=np.float32)
    k = _gauss_taps(sigma, truncate)
    r = k.size // 2
    ny, nx = a.shape
    H = _BLOCK
    if min(ny, nx) < max(2 * H, 2 * r + 1):
        res = ndimage.gaussian_filter(a, sigma, truncate=truncate)
        if out is None:
            return res
        out[...] = res
        return out
    B = _band(k, H)
    BT = np.ascontiguousarray(B.T)
    # the other dimension of a tile: as many as keep m n k under TILE_MNK
    L = max(8, TILE_MNK // (H * (H + 2 * r)))
    tmp = np.empty_like(a) if work is None else work
    # along x (rows): column blocks of the image times B^T
    for x0 in range(0, nx, H):
        w = min(H, nx - x0)
        lo, hi = x0 - r, x0 + w + r
        cols = slice(lo, hi) if lo >= 0 and hi <= nx else _reflect(np.arange(lo, hi), nx)
        bt = BT[:w + 2 * r, :w]
        for y0 in range(0, ny, L):
            np.matmul(a[y0:y0 + L, cols], bt, out=tmp[y0:y0 + L, x0:x0 + w])
    # (the input is not read again: the result may overwrite it)
    out = np.empty_like(a) if out is None else out
    # along y (columns): B times row blocks of the row-filtered image
    for y0 in range(0, ny, H):
        h = min(H, ny - y0)
        lo, hi = y0 - r, y0 + h + r
        blk = tmp[lo:hi] if lo >= 0 and hi <= ny else tmp[_reflect(np.arange(lo, hi), ny)]
        b = B[:h, :h + 2 * r]
        for x0 in range(0, nx, L):
            np.matmul(b, blk[:, x0:x0 + L], out=out[y0:y0 + h, x0:x0 + L])
    return out


def snr_map(image: np.ndarray, weight: np.ndarray, fwhm: float, *, overwrite_image: bool = False,
            overwrite_weight: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """S/N map of point sources of Gaussian FWHM ``fwhm`` (px) and its normalisation.

    image: background-subtracted image; weight: inverse variance per pixel (0 where
    masked). Returns float32 maps ``(snr, norm)`` with ``norm = sqrt(sum(P^2 w))``: the
    flux estimate at a pixel is ``snr / norm`` (image units), its error ``1 / norm``
    (callers that need the flux at a few peaks divide there, not over the whole image).
    ``overwrite_image``, ``overwrite_weight``: the (float32) image / weight may be
    overwritten (their buffers become the two maps, so that no full-size planes beyond
    one work plane are allocated).
    """
    if fwhm <= 0 or not np.isfinite(fwhm):
        raise ValidationError(f"snr_map: fwhm must be > 0 px, got {fwhm}")
    s = fwhm / FWHM_PER_SIGMA
    w = np.asarray(weight, dtype=np.float32)
    image = np.asarray(image, dtype=np.float32)
    iw = np.multiply(image, w, out=image if overwrite_image else None)
    iw[~(w > 0)] = 0.0
    # one work plane serves both blurs; the numerator is filtered in place
    work = np.empty_like(iw)
    num = gaussian_blur(iw, s, out=iw, work=work)
    den = gaussian_blur(w, s / np.sqrt(2.0), work=work, out=w if overwrite_weight else None)
    del work
    den *= np.float32(1.0 / (4.0 * np.pi * s * s))
    bad = ~(den > 1e-29)
    np.maximum(den, np.float32(1e-30), out=den)
    np.sqrt(den, out=den)
    snr = np.divide(num, den, out=num)
    snr[bad] = 0.0
    return snr, den


def _refine(snr: np.ndarray, py: np.ndarray, px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel peak positions by a separable parabola through the 3x3 neighbourhood."""
    ny, nx = snr.shape
    y0 = np.clip(py, 1, ny - 2)
    x0 = np.clip(px, 1, nx - 2)
    c = snr[y0, x0]
    l, r = snr[y0, x0 - 1], snr[y0, x0 + 1]
    d, u = snr[y0 - 1, x0], snr[y0 + 1, x0]
    denx = l - 2 * c + r
    deny = d - 2 * c + u
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = np.where(denx < 0, 0.5 * (l - r) / denx, 0.0)
        dy = np.where(deny < 0, 0.5 * (d - u) / deny, 0.0)
    dx = np.clip(np.nan_to_num(dx), -0.5, 0.5)
    dy = np.clip(np.nan_to_num(dy), -0.5, 0.5)
    return x0 + dx, y0 + dy


@dataclass
class Footprints:
    """The above-threshold pixels of a :func:`find_peaks` call: ``flat`` (sorted flat indices
    ``y * nx + x``) and ``label`` (their footprint, > 0) in an image of ``shape``."""

    flat: np.ndarray
    label: np.ndarray
    shape: tuple[int, int]

    def label_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Footprint label of the pixels nearest to ``(x, y)`` (0 where below threshold or off the image)."""
        ny, nx = self.shape
        xi = np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)
        yi = np.floor(np.asarray(y, dtype=np.float64) + 0.5).astype(np.int64)
        on = (xi >= 0) & (xi < nx) & (yi >= 0) & (yi < ny)
        f = np.where(on, yi * nx + xi, -1)
        out = np.zeros(f.shape, dtype=np.int64)
        if self.flat.size == 0:
            return out
        k = np.clip(np.searchsorted(self.flat, f), 0, self.flat.size - 1)
        hit = on & (self.flat[k] == f)
        out[hit] = self.label[k[hit]]
        return out


def find_peaks(snr: np.ndarray, config: DetectionConfig | None = None, *, norm: np.ndarray | None = None,
               return_footprints: bool = False):
    """Footprints and deblended peaks of an S/N map.

    norm: the normalisation map of :func:`snr_map` (flux = snr / norm): the multi-threshold
    deblender then splits by flux (else by S/N). Returns a DataFrame with one row per
    accepted peak: ``x``, ``y`` (sub-pixel, 0-based), ``x_peak``, ``y_peak`` (integer),
    ``peak_snr``, ``footprint`` (label), ``footprint_npix``, ``n_peaks`` (accepted peaks in
    the footprint), sorted by decreasing ``peak_snr``; with ``return_footprints`` also the
    :class:`Footprints` (the pixels of every footprint, whatever its size).
    """
    cfg = config or DetectionConfig()
    det = snr > cfg.threshold
    labels, nlab = ndimage.label(det, structure=np.ones((3, 3), dtype=bool))
    if nlab == 0:
        empty = Footprints(np.zeros(0, np.int64), np.zeros(0, np.int64), snr.shape)
        return (_empty_peaks(), empty) if return_footprints else _empty_peaks()
    # the above-threshold pixels once (flat indices); footprint sizes from their labels only
    flat = np.flatnonzero(det)
    lab_flat = labels.ravel()[flat]
    del labels
    npix = np.bincount(lab_flat, minlength=nlab + 1)
    big = npix >= cfg.min_pixels
    big[0] = False
    # local maxima inside footprints: only above-threshold pixels are compared with their
    # 8 neighbours (a full-image maximum filter would cost ~10x more); ties go to the later pixel
    ny, nx = snr.shape
    is_max = _local_maxima(snr, flat)
    fl = flat[is_max]
    lab = lab_flat[is_max]
    keep = big[lab]
    fl, lab = fl[keep], lab[keep]
    py, px = np.divmod(fl, nx)
    val = snr.ravel()[fl]
    # footprints whose maximum is not a strict local max (e.g. edge plateaus): use the max pixel
    have = np.zeros(nlab + 1, dtype=bool)
    have[lab] = True
    missing = np.nonzero(big & ~have)[0]
    if missing.size:
        pos = ndimage.maximum_position(snr, _relabel(flat, lab_flat, snr.shape), missing)
        my = np.array([p[0] for p in pos], dtype=np.int64)
        mxx = np.array([p[1] for p in pos], dtype=np.int64)
        py = np.concatenate([py, my])
        px = np.concatenate([px, mxx])
        lab = np.concatenate([lab, missing])
        val = np.concatenate([val, snr[my, mxx]])
    order = np.argsort(-val, kind="stable")
    py, px, lab, val = py[order], px[order], lab[order], val[order]
    accept = np.ones(py.size, dtype=bool)
    # brightest peak of each footprint is always accepted
    first = np.zeros(py.size, dtype=bool)
    _, first_idx = np.unique(lab, return_index=True)
    first[first_idx] = True
    cand = ~first
    if cand.any():
        if not cfg.deblend:
            accept[cand] = False
        else:
            accept &= _deblend_test(snr, px, py, lab, val, cand, cfg)
            if cfg.deblend_min_contrast > 0:
                accept &= _multi_threshold(snr, norm, flat, lab_flat, px, py, lab, accept, cfg) | first
    py, px, lab, val = py[accept], px[accept], lab[accept], val[accept]
    fps = Footprints(flat, lab_flat, snr.shape)
    if py.size == 0:
        return (_empty_peaks(), fps) if return_footprints else _empty_peaks()
    xs, ys = _refine(snr, py, px)
    npk = np.bincount(lab, minlength=nlab + 1)[lab]
    out = pd.DataFrame({
        "x": xs, "y": ys, "x_peak": px.astype(np.int64), "y_peak": py.astype(np.int64),
        "peak_snr": val.astype(np.float64), "footprint": lab.astype(np.int64),
        "footprint_npix": npix[lab].astype(np.int64), "n_peaks": npk.astype(np.int64),
    })
    log.debug("find_peaks: %d footprints above %.1f sigma, %d peaks", int(big.sum()), cfg.threshold, len(out))
    return (out, fps) if return_footprints else out


def _relabel(flat: np.ndarray, lab_flat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The label image of footprint pixels ``flat`` (labels ``lab_flat``; 0 elsewhere)."""
    labels = np.zeros(shape, dtype=np.int32)
    labels.ravel()[flat] = lab_flat
    return labels


def _multi_threshold(snr, norm, flat, lab_flat, px, py, lab, accept, cfg: DetectionConfig) -> np.ndarray:
    """The multi-threshold test (:func:`archive.process.deblend.multi_threshold_separate`) of the
    accepted peaks of footprints that still hold several; deblends the flux map ``snr / norm``
    when ``norm`` is given (else the S/N map). Returns a bool per peak (True where not tested)."""
    ok = np.ones(px.size, dtype=bool)
    a = np.flatnonzero(accept)
    if a.size < 2:
        return ok
    nlab = int(lab_flat.max()) + 1
    multi = np.bincount(lab[a], minlength=nlab) >= 2
    if not multi.any():
        return ok
    a = a[multi[lab[a]]]
    pix = multi[lab_flat]
    f = flat[pix]
    ny, nx = snr.shape
    vals = snr.ravel()[f].astype(np.float64)
    pf = py[a].astype(np.int64) * nx + px[a]
    pv = snr.ravel()[pf].astype(np.float64)
    if norm is not None:
        nr = norm.ravel()
        vals /= nr[f]
        pv /= nr[pf]
    ok[a] = multi_threshold_separate(f, lab_flat[pix], vals, snr.shape, pf, lab[a], pv,
                                     n_levels=cfg.deblend_levels, min_contrast=cfg.deblend_min_contrast)
    return ok


def _local_maxima(snr: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Which of the pixels ``flat`` (flat indices into ``snr``) are local maxima of ``snr``
    (3x3; outside the image = -inf).

    Of equal neighbours the one with the larger flat index is the maximum, so a plateau
    gives one peak per connected tie (as a maximum filter of slightly jittered values would).
    """
    ny, nx = snr.shape
    keep = np.ones(flat.size, dtype=bool)
    if flat.size == 0:
        return keep
    sf = snr.ravel()
    v = sf[flat]
    cy, cx = np.divmod(flat, nx)
    inside = {-1: (cy > 0, cx > 0), 1: (cy < ny - 1, cx < nx - 1)}
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            nb = np.clip(flat + dy * nx + dx, 0, sf.size - 1)
            nv = sf[nb]
            ok = None
            if dy:
                ok = inside[dy][0]
            if dx:
                ok = inside[dx][1] if ok is None else ok & inside[dx][1]
            later = (dy > 0) or (dy == 0 and dx > 0)  # neighbour's flat index is larger
            beaten = (nv >= v) if later else (nv > v)
            keep &= ~(beaten & ok)
    return keep


def _empty_peaks() -> pd.DataFrame:
    f = np.array([], dtype=np.float64)
    i = np.array([], dtype=np.int64)
    return pd.DataFrame({"x": f, "y": f, "x_peak": i, "y_peak": i, "peak_snr": f, "footprint": i,
                         "footprint_npix": i, "n_peaks": i})


def _deblend_test(snr, px, py, lab, val, cand, cfg: DetectionConfig) -> np.ndarray:
    """For every candidate (non-brightest) peak, the saddle test against the nearest
    brighter peak of the same footprint. Peaks are sorted by decreasing S/N."""
    n = px.size
    ok = np.ones(n, dtype=bool)
    pts = np.column_stack([px, py]).astype(np.float64)
    tree = cKDTree(pts)
    k = min(n, 16)
    dist, idx = tree.query(pts[cand], k=k)
    dist = np.atleast_2d(dist)
    idx = np.atleast_2d(idx)
    ci = np.nonzero(cand)[0]
    valid = (idx < n)
    idx_c = np.where(valid, idx, 0)
    brighter = valid & (idx_c < ci[:, None]) & (lab[idx_c] == lab[ci][:, None])
    dist = np.where(brighter, dist, np.inf)
    j = np.argmin(dist, axis=1)
    nearest = idx_c[np.arange(ci.size), j]
    has = np.isfinite(dist[np.arange(ci.size), j])
    # fall back to the brightest peak of the footprint when none of the k nearest is brighter
    _, fi = np.unique(lab, return_index=True)
    brightest = np.zeros(lab.max() + 1, dtype=np.int64)
    brightest[lab[fi]] = fi
    nearest = np.where(has, nearest, brightest[lab[ci]])
    d = np.hypot(px[ci] - px[nearest], py[ci] - py[nearest])
    t = np.linspace(0.0, 1.0, cfg.n_saddle_samples)
    sx = px[ci][:, None] + (px[nearest] - px[ci])[:, None] * t[None, :]
    sy = py[ci][:, None] + (py[nearest] - py[ci])[:, None] * t[None, :]
    prof = ndimage.map_coordinates(snr, [sy.ravel(), sx.ravel()], order=1, mode="nearest").reshape(sx.shape)
    saddle = prof.min(axis=1)
    rise = val[ci] - saddle
    good = (d >= cfg.min_separation) & (rise >= cfg.deblend_nsigma) & (rise >= cfg.deblend_contrast * val[ci])
    ok[ci] = good
    return ok
