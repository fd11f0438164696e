"""Background and background-noise maps on a mesh, with sources masked.

The image is cut into ``mesh_size`` cells. In each cell the good pixels (not masked,
not in a source) are sorted once; iterative sigma clipping then only moves two
indices in the sorted array, and the clipped mean and standard deviation come from
cumulative sums, so every cell is clipped at once without Python loops. The cell
estimate is the SExtractor-style mode ``2.5 median - 1.5 mean`` (the median when the
cell is too skewed). Cells with too few good pixels are filled from their nearest
good neighbour, the mesh is median-filtered, and a bicubic spline through the cell
centres gives the smooth full-resolution maps.

Two passes: the first (on every other pixel) finds the pixels to exclude, the second
estimates without them. Excluded are: pixels of sources (3x3-smoothed residual above
``source_sigma`` times the noise, grown by ``source_grow`` px); the wider surroundings of
bright sources, grown further the brighter they are (``bright_levels``: where the smoothed
residual exceeds ``factor`` times that threshold, ``grow`` px more; the Moffat-like wings of
bright stars otherwise leak into the mesh); and blocks of ``block_sizes`` px whose mean
residual is ``block_sigma`` above its noise (faint extended light: galaxies, wings, crowds of
faint stars). Without the last two the background of a frame of Moffat stars and galaxies
sat 0.2-0.4 e-/px above the true sky (issue 15 item 6).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, asdict

import numpy as np
from scipy import ndimage
from scipy.interpolate import BSpline, RectBivariateSpline
from scipy.special import erf

from archive.errors import ValidationError
from archive.image.blas import matmul_rows

log = logging.getLogger(__name__)


@dataclass
class BackgroundConfig:
    """Configuration of :func:`estimate_background`.

    mesh_size: cell size in px (background features smaller than this are not followed).
    clip_sigma: sigma-clipping threshold within a cell.
    clip_iters: clipping iterations.
    min_good_fraction: a cell with fewer usable pixels than this fraction is interpolated.
    filter_size: size (cells) of the median filter applied to the mesh.
    source_sigma: pass-1 threshold (in noise sigma, on a 3x3-smoothed image) for source pixels.
    source_grow: dilation radius (px) of the source mask.
    passes: number of estimation passes (1 = no source masking).
    block_sizes: sizes (px, divisors of the mesh size) of blocks masked when their mean residual
        is ``block_sigma`` sigma above zero (faint extended light; each grown by one block).
    block_sigma: threshold of those blocks, in sigma of the block mean.
    estimator: cell statistic: ``"mode"`` (2.5 median - 1.5 mean, the median when skewed;
        robust to the light left unmasked but ~0.35 e- below the mean of a Poisson sky),
        ``"median"`` or ``"mean"`` (of the clipped pixels).
    bright_levels: ``(factor, grow)`` pairs: pixels within ``grow`` px (a square, on a 4 px grid)
        of a source pixel above ``factor`` times the source threshold are masked as well.
    """

    mesh_size: int = 64
    clip_sigma: float = 3.0
    clip_iters: int = 4
    min_good_fraction: float = 0.25
    filter_size: int = 3
    source_sigma: float = 3.5
    source_grow: int = 6
    passes: int = 2

    block_sizes: tuple[int, ...] = (16, 32)
    block_sigma: float = 3.0
    estimator: str = "mode"
    smooth_size: int = 3
    bright_levels: tuple[tuple[float, int], ...] = ((10.0, 8), (100.0, 16), (1000.0, 28))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Background:
    """Result of :func:`estimate_background` (maps in the image's units, per pixel).

    background: smooth background level; rms: smooth background noise (1 sigma);
    mesh_background, mesh_rms: the cell values; source_mask: pixels excluded as sources.
    """

    background: np.ndarray
    rms: np.ndarray
    mesh_background: np.ndarray
    mesh_rms: np.ndarray
    source_mask: np.ndarray
    mesh_error: np.ndarray | None = None

    @property
    def error(self) -> np.ndarray | None:
        """Per-pixel 1-sigma error of :attr:`background` itself (image units; float32, constant per
        mesh cell): the noise that subtracting the background adds, the same over the scale of an
        aperture, so a flux summed over a pixels gains ``(sum a)^2 error^2`` of variance. None
        when not estimated."""
        if self.mesh_error is None:
            return None
        ny, nx = self.background.shape
        my, mx = self.mesh_error.shape
        f = -(-ny // my)
        return np.repeat(np.repeat(self.mesh_error.astype(np.float32), f, 0), -(-nx // mx), 1)[:ny, :nx]

    @property
    def variance(self) -> np.ndarray:
        return self.rms ** 2


def _count_below(cells: np.ndarray, n: np.ndarray, t: np.ndarray, inclusive: bool) -> np.ndarray:
    """Per row of the row-sorted ``cells`` (first ``n`` entries valid), how many are ``< t``
    (``<= t`` when ``inclusive``): a binary search run on all rows at once, O(rows log(cols))."""
    rows = np.arange(cells.shape[0])
    lo = np.zeros(cells.shape[0], dtype=np.int64)
    hi = n.astype(np.int64).copy()
    while True:
        act = lo < hi
        if not act.any():
            return lo
        mid = (lo + hi) // 2
        v = cells[rows, np.minimum(mid, cells.shape[1] - 1)]
        right = (v <= t) if inclusive else (v < t)
        lo = np.where(act & right, mid + 1, lo)
        hi = np.where(act & ~right, mid, hi)


class _PrefixSums:
    """``at(k)``: per row of ``vals ** power`` (its first ``n`` entries used), the sum of the first ``k[row]``.

    Clipping only moves the clip indices through the tails of each sorted cell, so the sums are
    kept for the first and the last ``window`` used values of each row (plus the row totals):
    a quarter of the work of cumulative sums over whole rows. Rows whose index leaves the
    windows (a cell dominated by a source) get their full cumulative sums when asked.
    """

    def __init__(self, vals: np.ndarray, n: np.ndarray, power: int = 1):
        R, ncol = vals.shape
        L = min(ncol, max(16, ncol // 8))
        self.vals, self.n, self.L, self.power = vals, n.astype(np.int64), L, power
        self.rows = np.arange(R)
        # float32 sums (pairwise totals) of values about the cell median, as before
        self.total = (vals.sum(axis=1) if power == 1 else np.einsum("ij,ij->i", vals, vals)).astype(np.float64)
        self.head = np.zeros((R, L + 1))
        self.head[:, 1:] = np.cumsum(vals[:, :L] ** power, axis=1)
        # the last L used values summed from the end: tail[r, j] = sum of vals[r, n - j:n] ** power
        win = vals[:, ncol - 1:ncol - L - 1 if ncol > L else None:-1].copy()
        part = np.nonzero(self.n < ncol)[0]
        if part.size:
            idx = np.clip(self.n[part, None] - 1 - np.arange(L)[None, :], 0, ncol - 1)
            win[part] = vals[part[:, None], idx]
        self.tail = np.zeros((R, L + 1))
        self.tail[:, 1:] = np.cumsum(win ** power, axis=1)

    def at(self, k: np.ndarray) -> np.ndarray:
        k = np.asarray(k, np.int64)
        out = np.empty(k.size)
        head = k <= self.L
        out[head] = self.head[self.rows[head], k[head]]
        back = self.n - k
        tail = ~head & (back >= 0) & (back <= self.L) & (self.n >= self.L)
        out[tail] = self.total[tail] - self.tail[self.rows[tail], back[tail]]
        rest = np.nonzero(~head & ~tail)[0]
        if rest.size:
            c = np.zeros((rest.size, self.vals.shape[1] + 1))
            c[:, 1:] = np.cumsum(self.vals[rest] ** self.power, axis=1)
            out[rest] = c[np.arange(rest.size), k[rest]]
        return out


def _cell_stats(image: np.ndarray, good: np.ndarray, mesh: int, clip_sigma: float, clip_iters: int,
                estimator: str = "mode"):
    ny, nx = image.shape
    my = -(-ny // mesh)
    mx = -(-nx // mesh)
    pad = np.full((my * mesh, mx * mesh), np.inf, dtype=np.float32)
    pad[:ny, :nx] = np.where(good, image, np.inf)
    cells = pad.reshape(my, mesh, mx, mesh).transpose(0, 2, 1, 3).reshape(my * mx, mesh * mesh)
    cells.sort(axis=1)
    rows = np.arange(cells.shape[0])
    ncol = cells.shape[1]
    # usable values per cell: the +inf of unusable pixels sort to the end of each row
    n = _count_below(cells, np.full(rows.size, ncol), np.float32(np.inf), False)
    # sums about each cell's median (float32 keeps full precision for values near it)
    ref = cells[rows, np.clip((n - 1) // 2, 0, ncol - 1)]
    ref = np.where(np.isfinite(ref), ref, 0.0).astype(np.float32)
    vals = cells - ref[:, None]
    vals[~np.isfinite(vals)] = 0.0
    s1 = _PrefixSums(vals, n)
    s2 = _PrefixSums(vals, n, power=2)

    def moments(lo, hi):
        cnt = np.maximum(hi - lo, 1)
        m = (s1.at(hi) - s1.at(lo)) / cnt
        v = (s2.at(hi) - s2.at(lo)) / cnt - m ** 2
        return m + ref, np.maximum(v, 0.0)

    def median(lo, hi):
        a = cells[rows, np.clip((lo + hi) // 2, 0, ncol - 1)].astype(np.float64)
        return np.where(np.isfinite(a), a, 0.0)

    lo = np.zeros_like(n)
    hi = n.copy()
    for _ in range(max(1, clip_iters)):
        mean, var = moments(lo, hi)
        std = np.sqrt(var)
        med = median(lo, hi)
        # rows are sorted (+inf for unusable pixels at the end): the new clip indices are
        # the numbers of values below the thresholds
        lo_new = np.minimum(_count_below(cells, n, (med - clip_sigma * std).astype(np.float32), False), n)
        hi_new = np.minimum(_count_below(cells, n, (med + clip_sigma * std).astype(np.float32), True), n)
        same = (lo_new == lo) & (hi_new == hi)
        lo, hi = lo_new, np.maximum(hi_new, lo_new)
        if same.all():
            break
    mean, var = moments(lo, hi)
    # a clip at +-k sigma truncates the distribution; undo that for a Gaussian
    k = clip_sigma
    trunc = erf(k / np.sqrt(2)) - 2 * k * np.exp(-0.5 * k * k) / np.sqrt(2 * np.pi)
    trunc /= erf(k / np.sqrt(2))
    std = np.sqrt(var / trunc)
    med = median(lo, hi)
    # even counts: average the two middle values
    even = ((hi - lo) % 2 == 0) & (hi > lo)
    med2 = cells[rows, np.clip((lo + hi) // 2 - 1, 0, ncol - 1)].astype(np.float64)
    med2 = np.where(np.isfinite(med2), med2, 0.0)
    med = np.where(even, 0.5 * (med + med2), med)
    if estimator == "median":
        mode = med
    elif estimator == "mean":
        mode = mean
    else:
        mode = np.where(np.abs(mean - med) < 0.3 * std, 2.5 * med - 1.5 * mean, med)
    # pixels actually inside the image per cell
    ry = np.minimum(mesh, ny - np.arange(my) * mesh)
    rx = np.minimum(mesh, nx - np.arange(mx) * mesh)
    cell_pix = ry[:, None] * rx[None, :]
    return mode.reshape(my, mx), std.reshape(my, mx), n.reshape(my, mx), cell_pix


def _smooth_mesh(values: np.ndarray, size: int) -> np.ndarray:
    """``size x size`` box mean of a mesh, edges extended by odd reflection (a linear gradient is
    kept exactly, up to the edge)."""
    if size <= 1:
        return values
    h = size // 2
    v = values.astype(np.float64)
    for axis in (0, 1):
        if v.shape[axis] > 1:
            p = np.pad(v, [(h, h) if a == axis else (0, 0) for a in (0, 1)], mode="reflect", reflect_type="odd")
            c = np.cumsum(p, axis=axis)
            c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
            n = v.shape[axis]
            v = (np.take(c, np.arange(size, size + n), axis=axis) - np.take(c, np.arange(n), axis=axis)) / size
    return v


def _fill_and_filter(values: np.ndarray, ok: np.ndarray, filter_size: int, smooth_size: int = 1) -> np.ndarray:
    if not ok.any():
        raise ValidationError("background: no mesh cell has enough usable pixels (image fully masked?)")
    if not ok.all():
        _, (iy, ix) = ndimage.distance_transform_edt(~ok, return_indices=True)
        values = values[iy, ix]
    if filter_size > 1 and min(values.shape) >= 1:
        values = ndimage.median_filter(values, size=filter_size, mode="nearest")
    if smooth_size > 1:
        values = _smooth_mesh(values, smooth_size)
    return values


def _interpolate(mesh_vals: np.ndarray, shape: tuple[int, int], mesh: int) -> np.ndarray:
    ny, nx = shape
    my, mx = mesh_vals.shape
    if my == 1 and mx == 1:
        return np.full(shape, mesh_vals[0, 0], dtype=np.float32)
    # cell centres (the last cell may be partial), plus one linearly extrapolated
    # cell on every side so the spline covers the whole image without clamping
    cy = np.minimum((np.arange(my) + 0.5) * mesh, (np.arange(my) * mesh + ny) / 2.0) - 0.5
    cx = np.minimum((np.arange(mx) + 0.5) * mesh, (np.arange(mx) * mesh + nx) / 2.0) - 0.5
    vals = mesh_vals.astype(np.float64)
    if my > 1:
        vals = np.pad(vals, ((1, 1), (0, 0)), mode="reflect", reflect_type="odd")
        cy = np.concatenate([[2 * cy[0] - cy[1]], cy, [2 * cy[-1] - cy[-2]]])
    else:
        vals = np.vstack([vals, vals])
        cy = np.array([-0.5, ny - 0.5])
    if mx > 1:
        vals = np.pad(vals, ((0, 0), (1, 1)), mode="reflect", reflect_type="odd")
        cx = np.concatenate([[2 * cx[0] - cx[1]], cx, [2 * cx[-1] - cx[-2]]])
    else:
        vals = np.hstack([vals, vals])
        cx = np.array([-0.5, nx - 0.5])
    ky = min(3, len(cy) - 1)
    kx = min(3, len(cx) - 1)
    spl = RectBivariateSpline(cy, cx, vals, kx=ky, ky=kx, s=0)
    # the tensor-product spline on the pixel grid is By C Bx^T: two (float32) matrix products
    # with the B-spline design matrices, ~4x faster than evaluating it pointwise
    ty, tx = spl.get_knots()
    coef = spl.get_coeffs().reshape(len(ty) - ky - 1, len(tx) - kx - 1)
    By = BSpline.design_matrix(np.arange(ny, dtype=np.float64), ty, ky).toarray().astype(np.float32)
    Bx = BSpline.design_matrix(np.arange(nx, dtype=np.float64), tx, kx).toarray().astype(np.float32)
    return matmul_rows(matmul_rows(By, coef.astype(np.float32)), np.ascontiguousarray(Bx.T))


def _box3(a: np.ndarray) -> np.ndarray:
    """3x3 mean with reflected edges (``ndimage.uniform_filter(a, 3)``) as shifted sums: ndimage's
    double-precision line buffers cost ~5x more for this small box."""
    p = np.pad(a, 1, mode="symmetric")
    r = p[:, :-2] + p[:, 1:-1]
    r += p[:, 2:]
    out = r[:-2] + r[1:-1]
    out += r[2:]
    out *= np.float32(1.0 / 9.0)
    return out


def _dilate_square(b: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2 r + 1)^2 square (``ndimage.maximum_filter`` of a mask) as shifted
    ORs along each axis, ~4x cheaper than the generic filter."""
    h = b.copy()
    for d in range(1, r + 1):
        h[:, d:] |= b[:, :-d]
        h[:, :-d] |= b[:, d:]
    v = h.copy()
    for d in range(1, r + 1):
        v[d:] |= h[:-d]
        v[:-d] |= h[d:]
    return v


def _block_reduce(a: np.ndarray, b: int, op: str = "sum") -> np.ndarray:
    """``op`` (``"sum"`` or ``"max"``) of ``a`` over ``b x b`` blocks (last partial blocks padded with 0),
    inner (contiguous) axis first."""
    ny, nx = a.shape
    my, mx = -(-ny // b), -(-nx // b)
    if my * b != ny or mx * b != nx:
        p = np.zeros((my * b, mx * b), dtype=a.dtype)
        p[:ny, :nx] = a
        a = p
    f = np.add if op == "sum" else np.maximum
    if b & (b - 1) == 0:
        # a power of two: pairwise halving along each axis (elementwise ops on strided views are
        # several times faster than a reduction over a short axis)
        while a.shape[1] > mx:
            a = f(a[:, 0::2], a[:, 1::2])
        while a.shape[0] > my:
            a = f(a[0::2], a[1::2])
        return a
    return f.reduce(f.reduce(a.reshape(my * b, mx, b), axis=2).reshape(my, b, mx), axis=1)


def _upsample(cells: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour ``f``-fold upsampling of a per-cell map, cropped to ``shape``."""
    return np.repeat(np.repeat(cells, f, 0), f, 1)[:shape[0], :shape[1]]


def _grow_bright(sm: np.ndarray, cell_thresh: np.ndarray, mesh_p: int, levels, step: int,
                 cell: int = 4) -> np.ndarray:
    """Mask of the wider surroundings of bright sources, on a grid of ``cell`` (full-image) px.

    For every ``(factor, grow)`` of ``levels``: the grid cells within ``grow`` px (a square) of a
    cell whose smoothed residual ``sm`` (sampled every ``step`` px) exceeds ``factor`` times the
    source threshold (``cell_thresh``, one value per mesh cell of ``mesh_p`` sampled px). The
    maximum of ``sm`` per grid cell is taken once; the levels and the growth then run on the
    coarse grid, so the cost does not depend on the radii.
    """
    ny, nx = sm.shape
    c = max(1, cell // step)
    while mesh_p % c:
        c //= 2
    cmax = _block_reduce(sm, c, "max")
    thr = _upsample(cell_thresh, mesh_p // c, cmax.shape)
    coarse = np.zeros(cmax.shape, dtype=bool)
    for factor, grow in levels:
        seed = cmax > np.float32(factor) * thr
        if not seed.any():
            break
        r = int(np.ceil(grow / (c * step)))
        coarse |= _dilate_square(seed, r) if r > 0 else seed
    return _upsample(coarse, c, (ny, nx))


def _faint_blocks(resid: np.ndarray, use: np.ndarray, cell_rms: np.ndarray, mesh_p: int, sizes, step: int,
                  nsigma: float) -> np.ndarray:
    """Pixels of blocks whose mean residual over the ``use`` pixels (sampled every ``step`` px) is
    ``nsigma`` above its noise: the light of faint sources and of wings beyond the pixel mask.

    ``sizes``: block sizes (full-image px), each a divisor of the mesh; the blocks found are
    grown by one block. ``cell_rms``: the noise per mesh cell (``mesh_p`` sampled px).
    """
    ny, nx = resid.shape
    out = None
    sizes = sorted({max(1, int(B) // step) for B in sizes if mesh_p % max(1, int(B) // step) == 0})
    if not sizes:
        return np.zeros((ny, nx), dtype=bool)
    b0 = sizes[0]
    r = resid * use
    s_prev = _block_reduce(r, b0)
    n_prev = _block_reduce(use.view(np.uint8), b0).astype(np.float32)
    b_prev = b0
    for b in sizes:
        if b != b_prev:
            # coarser blocks from the finer ones
            k = b // b_prev
            s_prev = _block_reduce(s_prev, k)
            n_prev = _block_reduce(n_prev, k)
            b_prev = b
        noise = _upsample(cell_rms, mesh_p // b, s_prev.shape) * np.sqrt(np.maximum(n_prev, 1.0))
        hit = (n_prev >= 0.2 * b * b) & (s_prev > nsigma * noise)
        if hit.any():
            g = _upsample(_dilate_square(hit, 1), b, (ny, nx))
            out = g if out is None else out | g
    return out if out is not None else np.zeros((ny, nx), dtype=bool)


#: standard error of the cell statistic in units of sigma / sqrt(n) for Gaussian noise clipped at
#: 3 sigma: the mean 1, the median sqrt(pi / 2), the mode 2.5 median - 1.5 mean (its variance
#: 6.25 pi / 2 + 2.25 - 7.5 = 4.57 times the mean's)
_ESTIMATOR_ERROR = {"mean": 1.0, "median": 1.2533, "mode": 2.138}


def _filter_gain(shape: tuple[int, int], filter_size: int, smooth_size: int, n_sim: int = 4) -> float:
    """rms of unit-variance independent cell values after the mesh filters (median, then box mean),
    from a few seeded simulated meshes of ``shape``: how much the filters reduce a cell's error."""
    rng = np.random.default_rng(12345)
    out = []
    for _ in range(n_sim):
        v = rng.standard_normal(shape)
        v = _fill_and_filter(v, np.ones(shape, dtype=bool), filter_size, smooth_size)
        out.append(np.mean(v * v))
    return float(np.sqrt(np.mean(out)))


def _mesh_error(std: np.ndarray, n: np.ndarray, ok: np.ndarray, cfg: BackgroundConfig) -> np.ndarray:
    """Per-cell 1-sigma error of the smooth background (image units): each cell's statistic has
    error ``k std / sqrt(n)`` (``k`` of the estimator, ``n`` its usable pixels), averaged over the
    3x3 cells the median filter draws on, times the filters' gain (:func:`_filter_gain`)."""
    raw = _ESTIMATOR_ERROR.get(cfg.estimator, _ESTIMATOR_ERROR["mode"]) * std / np.sqrt(np.maximum(n, 1))
    raw = _fill_and_filter(np.where(ok, raw, np.nan), ok, 1)
    local = _smooth_mesh(raw, 3) if min(raw.shape) >= 3 else raw
    gain = _filter_gain(raw.shape, cfg.filter_size, cfg.smooth_size)
    return np.maximum(local, 0.0) * gain


def estimate_background(image: np.ndarray, mask: np.ndarray | None = None,
                        config: BackgroundConfig | None = None) -> Background:
    """Estimate smooth background and noise maps of ``image``.

    image: 2-D array (counts or any linear unit); mask: boolean array, True where a
    pixel must not be used (bad, saturated, no data), or None. Non-finite pixels are
    always excluded. Returns a :class:`Background` whose maps are float32 in the
    image's units.
    """
    cfg = config or BackgroundConfig()
    image = np.asarray(image)
    if image.ndim != 2 or image.size == 0:
        raise ValidationError(f"background: image must be a non-empty 2-D array, got shape {image.shape}")
    if cfg.mesh_size < 4:
        raise ValidationError(f"background: mesh_size must be >= 4 px, got {cfg.mesh_size}")
    good = np.isfinite(image)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.shape:
            raise ValidationError(f"background: mask shape {mask.shape} differs from image shape {image.shape}")
        good &= ~mask
    mesh = int(cfg.mesh_size)
    src = np.zeros(image.shape, dtype=bool)
    npass = max(1, cfg.passes)
    for p in range(npass):
        last = p + 1 == npass
        # the source-finding passes run on every other pixel (4x cheaper)
        step = 1 if (last or mesh < 16) else 2
        img_p = image[::step, ::step]
        use = (good & ~src)[::step, ::step]
        mesh_p = mesh // step
        mode, std, n, cell_pix = _cell_stats(img_p, use, mesh_p, cfg.clip_sigma, cfg.clip_iters, cfg.estimator)
        ok = (n >= cfg.min_good_fraction * cell_pix) & np.isfinite(mode) & (std > 0)
        if not ok.any():
            # fall back to any cell with a handful of pixels
            ok = (n >= 8) & (std > 0)
        mesh_bkg = _fill_and_filter(mode, ok, cfg.filter_size, cfg.smooth_size if last else 1)
        mesh_rms = _fill_and_filter(std, ok, cfg.filter_size)
        if not last:
            # source mask from the blocky (per-cell) maps: cheap and good enough
            ny, nx = img_p.shape
            bkg0 = np.repeat(np.repeat(mesh_bkg, mesh_p, 0), mesh_p, 1)[:ny, :nx]
            rms0 = np.repeat(np.repeat(mesh_rms, mesh_p, 0), mesh_p, 1)[:ny, :nx]
            resid = np.where(good[::step, ::step], img_p - bkg0, 0.0).astype(np.float32)
            # 3x3 box smoothing reduces the noise by 3, so the threshold is scaled
            sm = _box3(resid)
            s_p = sm > (cfg.source_sigma / 3.0) * rms0
            grow = max(1, cfg.source_grow // step)
            s_p = _dilate_square(s_p, grow)
            if cfg.bright_levels:
                s_p |= _grow_bright(sm, (mesh_rms * (cfg.source_sigma / 3.0)).astype(np.float32), mesh_p,
                                    cfg.bright_levels, step)
            if cfg.block_sizes:
                s_p |= _faint_blocks(resid, good[::step, ::step] & ~s_p, mesh_rms.astype(np.float32), mesh_p,
                                     cfg.block_sizes, step, cfg.block_sigma)
            if step > 1:
                s_p = np.repeat(np.repeat(s_p, step, 0), step, 1)[:image.shape[0], :image.shape[1]]
            src = s_p
    bkg = _interpolate(mesh_bkg, image.shape, mesh)
    rms = _interpolate(mesh_rms, image.shape, mesh)
    floor = np.float32(np.min(mesh_rms[mesh_rms > 0])) if (mesh_rms > 0).any() else np.float32(1e-30)
    rms = np.maximum(rms, 0.5 * floor)
    log.debug("background: %dx%d mesh, median level %.4g, median rms %.4g", *mesh_bkg.shape,
              float(np.median(mesh_bkg)), float(np.median(mesh_rms)))
    mesh_err = _mesh_error(std, n, ok, cfg)
    return Background(background=bkg, rms=rms, mesh_background=mesh_bkg, mesh_rms=mesh_rms, source_mask=src,
                      mesh_error=mesh_err)

