"""Coadding warps of one tile and band: background matching, artifact rejection, combination,
the coadd PSF, and template input selection.

Inputs are warps on a common grid (:mod:`archive.process.warp`; each may cover
part of it: pixels it does not cover are NO_DATA) and, for artifact
rejection, the same warps PSF-matched to a common Gaussian.

Background matching (:func:`match_backgrounds`)
    For every pair of overlapping warps, the sigma-clipped median difference
    of their common good pixels; a least-squares solve gives one offset per
    warp, relative to the warp with most pixels (offset 0).  The offsets are
    recorded; subtracting them is optional.

Artifact rejection (:func:`find_artifacts`, as LSST's CompareWarp)
    A static-sky model is the per-pixel sigma-clipped mean of the PSF-matched
    warps (``model_clip`` sigma, ``model_iter`` rounds).  In each epoch,
    pixels deviating from it by more than ``detect_sigma`` (in that epoch's
    own noise, plus the model's) seed footprints, grown to the pixels above
    ``grow_sigma``.  A pixel deviating in more than max_epochs = min(0.4 N,
    2 + 0.03 N) of the N epochs belongs to something real that changes or
    is hard to match (a variable star, a bright star's PSF residual): the
    temporal threshold.  A footprint is an artifact when no more than
    ``spatial_fraction`` of its pixels are such pixels (the spatial
    threshold); its pixels, grown by ``grow_px``, are marked CLIPPED in that
    epoch, except the frequently deviating ones (so a streak crossing a
    variable star does not take the star with it).  Satellite streaks,
    cosmic rays, moving objects and transients seen once are clipped;
    variables and star cores are not.
    Also offered: ``method="clipped_mean"`` (per-pixel sigma clipping) and
    ``"median"``.

Combination (:func:`combine`)
    The inverse-variance weighted mean of the accepted pixels, with one weight
    per warp (1 / its median variance: per-pixel weights would favour the
    epochs where a star is faint, which biases stars), and the coadd variance
    sum w_i^2 V_i / (sum w_i)^2 over *the same accepted pixels*: a clipped or
    masked input contributes neither flux nor variance, so no high-variance
    relic is left where a cosmic ray was.  The coadd carries ``n_image``
    (accepted inputs per pixel), an input map (bit i: input i used), EDGE /
    NO_DATA masks and a PSF: at each node of a grid over the coadd, the weighted mean of
    the inputs' PSFs over the inputs accepted there, represented as a spatially varying
    pixel PSF.  An input's EDGE pixels (its resampling kernel reached past its edge: a
    star there lost part of its flux) are combined only where no other input covers the
    pixel, and such coadd pixels are EDGE.

Cost
    No full stack of the inputs is built.  The static-sky model and the residuals run in
    row strips of float32 stacks (:data:`STRIP_BYTES`; the model's final sums in float64),
    ``combine`` adds the warps one by one into float64 sums, strip by strip, and each
    pair's background offset is one sort of its differences (:func:`clipped_median`).
    Outputs equal those of float64 full-stack arithmetic to float32 rounding.

Template selection (:func:`select_inputs`, as dia_pipe's best-seeing selector)
    The best-seeing inputs inside a time window, at most ``max_inputs``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
from scipy import ndimage

from archive.errors import ValidationError
from archive.image.exposure import Exposure, ExposureInfo

#: Planes whose pixels are never combined.
REJECT_PLANES = ("NO_DATA", "BAD", "SAT", "CR", "CLIPPED", "STREAK")


@dataclasses.dataclass
class ArtifactConfig:
    """method: ``"compare_warp"`` (default), ``"clipped_mean"`` or ``"median"``; model_clip,
    model_iter: sigma clipping of the static-sky model; detect_sigma: outlier threshold of a
    footprint's seed pixels; grow_sigma: its extent; grow_px: pixels added around a clipped
    footprint; max_epochs_fraction, max_epochs_base, max_epochs_slope: the temporal threshold
    min(f N, base + slope N); spatial_fraction: the spatial threshold; clip_sigma: per-pixel
    threshold of ``clipped_mean``."""

    method: str = dataclasses.field(default="compare_warp",
                                    metadata={"choices": ("compare_warp", "clipped_mean", "median")})
    model_clip: float = dataclasses.field(default=2.5, metadata={"min": 1.0})
    model_iter: int = dataclasses.field(default=3, metadata={"min": 1})
    detect_sigma: float = dataclasses.field(default=7.5, metadata={"min": 1.0})
    grow_sigma: float = dataclasses.field(default=3.0, metadata={"min": 0.5})
    grow_px: int = dataclasses.field(default=2, metadata={"min": 0, "max": 50})
    max_epochs_fraction: float = dataclasses.field(default=0.4, metadata={"min": 0.0, "max": 1.0})
    max_epochs_base: float = 2.0
    max_epochs_slope: float = 0.03
    spatial_fraction: float = dataclasses.field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    model_error: float = dataclasses.field(default=0.05, metadata={"min": 0.0, "max": 1.0})
    clip_sigma: float = dataclasses.field(default=3.0, metadata={"min": 1.0})


@dataclasses.dataclass
class CoaddConfig:
    """artifacts: rejection settings; match_backgrounds / subtract_backgrounds: solve and
    (optionally) remove per-warp offsets; psf_grid: nodes per axis of the coadd PSF; psf_degree:
    polynomial degree of its variation; psf_size: its stamp size (odd, px)."""

    artifacts: ArtifactConfig = dataclasses.field(default_factory=ArtifactConfig)
    match_backgrounds: bool = True
    subtract_backgrounds: bool = False
    psf_grid: int = dataclasses.field(default=5, metadata={"min": 1, "max": 20})
    psf_degree: int = dataclasses.field(default=2, metadata={"min": 0, "max": 4})
    psf_size: int = dataclasses.field(default=25, metadata={"min": 7, "max": 101})


@dataclasses.dataclass
class SelectConfig:
    """Template inputs: seeing at most ``max_seeing_arcsec`` (None: any), taken within
    [mjd_min, mjd_max] (None: open), the ``max_inputs`` best-seeing ones (0: all)."""

    max_inputs: int = dataclasses.field(default=0, metadata={"min": 0})
    max_seeing_arcsec: float | None = None
    mjd_min: float | None = None
    mjd_max: float | None = None


def select_inputs(exposures: pd.DataFrame, config: SelectConfig | None = None) -> pd.DataFrame:
    """Rows of ``exposures`` (columns ``exposure_id``, ``seeing``, ``mjd_mid``) chosen as
    template inputs: best seeing first, within the time window and seeing limit."""
    cfg = config or SelectConfig()
    sel = exposures[np.isfinite(exposures["seeing"].to_numpy(float))]
    if cfg.max_seeing_arcsec is not None:
        sel = sel[sel["seeing"] <= cfg.max_seeing_arcsec]
    if cfg.mjd_min is not None:
        sel = sel[sel["mjd_mid"] >= cfg.mjd_min]
    if cfg.mjd_max is not None:
        sel = sel[sel["mjd_mid"] <= cfg.mjd_max]
    sel = sel.sort_values(["seeing", "exposure_id"], kind="stable")
    if cfg.max_inputs:
        sel = sel.head(cfg.max_inputs)
    return sel.sort_values("exposure_id").reset_index(drop=True)


# -- a common frame for the warps ---------------------------------------------------------
#: Bytes of one float32 row strip of a stack (n inputs x rows x width): the stack-wide steps
#: (static-sky model, residuals) run strip by strip, so their temporaries stay near ten times
#: this, whatever the tile size, instead of ten full float64 stacks.
STRIP_BYTES = 8 << 20


def _union_bbox(warps: list[Exposure]) -> tuple[int, int, int, int]:
    x0 = min(w.xy0[0] for w in warps)
    y0 = min(w.xy0[1] for w in warps)
    x1 = max(w.xy0[0] + w.shape[1] for w in warps)
    y1 = max(w.xy0[1] + w.shape[0] for w in warps)
    return x0, y0, x1, y1


def _box(w: Exposure, bbox) -> tuple[slice, slice]:
    """The slices of the union ``bbox`` that ``w`` covers."""
    ox, oy = w.xy0[0] - bbox[0], w.xy0[1] - bbox[1]
    return slice(oy, oy + w.shape[0]), slice(ox, ox + w.shape[1])


def _usable(w: Exposure, planes) -> np.ndarray:
    """Pixels of ``w`` (its own grid) with none of ``planes`` set and a finite, positive variance."""
    present = [p for p in planes if p in w.mask_planes]
    ok = np.isfinite(w.variance)
    with np.errstate(invalid="ignore"):
        ok &= w.variance > 0
    if present:
        ok &= ~w.mask_of(*present)
    return ok


def _map(fn, items, threads: int) -> list:
    """``[fn(x) for x in items]``, on a pool of ``threads`` threads when more than one (the
    numpy and scipy calls inside release the GIL)."""
    items = list(items)
    if threads <= 1 or len(items) < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def _strip_rows(n: int, nx: int, ny: int) -> int:
    """Rows per strip of an (n, ny, nx) float32 stack (:data:`STRIP_BYTES`)."""
    return int(min(ny, max(16, STRIP_BYTES // max(1, 4 * n * nx))))


def _stack_rows(planes: list[np.ndarray], warps: list[Exposure], bbox, r0: int, r1: int,
                fill, dtype) -> np.ndarray:
    """Rows ``r0:r1`` of the union ``bbox`` of one plane per warp (each on its own grid),
    ``fill`` where a warp does not reach: an (n, r1 - r0, width) stack."""
    out = np.full((len(warps), r1 - r0, bbox[2] - bbox[0]), fill, dtype=dtype)
    for k, (a, w) in enumerate(zip(planes, warps)):
        ys, xs = _box(w, bbox)
        lo, hi = max(r0, ys.start), min(r1, ys.stop)
        if lo < hi:
            out[k, lo - r0:hi - r0, xs] = a[lo - ys.start:hi - ys.start]
    return out


# -- background matching ------------------------------------------------------------------------
def clipped_median(d: np.ndarray, sigma: float = 3.0, maxiters: int = 5) -> float:
    """The median of ``d`` after iterative ``sigma`` clipping about the median (the standard
    deviation as scale; at most ``maxiters`` rounds, stopping when nothing changes): the
    median ``astropy.stats.sigma_clipped_stats(d, sigma=sigma, maxiters=maxiters)`` returns,
    NaN when nothing is left.  Non-finite values are ignored.

    Every round's kept values are a contiguous run of ``d`` sorted, so a round needs only an
    order statistic (its median), two counts (values below and above its bounds) and sums
    over a run of ranks (its standard deviation, float64), never another pass over the data.
    For large ``d`` only what the rounds can touch is ordered: the tails outside a window
    about a guessed centre are sorted (the clipping bounds fall there), the middle is summed
    whole and only its central ranks (where the medians fall) are sorted.  When a bound or a
    median falls outside what is ordered, the whole of ``d`` is sorted instead (same result)."""
    d = np.asarray(d).ravel()
    fin = np.isfinite(d)
    if not fin.all():
        d = d[fin]
    del fin
    if not d.size:
        return float("nan")
    if d.size >= 200_000:
        try:
            return _clip_rounds(_SplitRanks(d), sigma, maxiters)
        except _Unordered:
            pass
    return _clip_rounds(_SortedRanks(d), sigma, maxiters)


class _Unordered(Exception):
    """A rank or a value outside the part of the data that :class:`_SplitRanks` ordered."""


class _SortedRanks:
    """The data sorted: order statistics, counts below a value and sums over rank runs."""

    def __init__(self, d: np.ndarray):
        self.s = np.sort(d)
        self.n, self.dtype = self.s.size, d.dtype
        s64 = self.s.astype(np.float64)
        self.c1 = np.concatenate(([0.0], np.cumsum(s64)))
        self.c2 = np.concatenate(([0.0], np.cumsum(s64 * s64)))

    def value(self, r: int) -> float:
        return float(self.s[r])

    def n_below(self, v) -> int:  # values < v
        return int(np.searchsorted(self.s, v, side="left"))

    def n_upto(self, v) -> int:  # values <= v
        return int(np.searchsorted(self.s, v, side="right"))

    def sums(self, lo: int, hi: int) -> tuple[float, float]:  # sum, sum of squares of ranks lo:hi
        return self.c1[hi] - self.c1[lo], self.c2[hi] - self.c2[lo]


class _SplitRanks:
    """The data as sorted low tail (< a), middle [a, b] and sorted high tail (> b), the
    window a, b = centre -+ 2 sigma guessed from a subsample (its quartiles).  The middle is
    summed whole and ordered only around the ranks a median can have while every clipping
    bound falls in a tail (the values between two quantiles of the subsample, checked to
    hold those ranks); anything else raises :class:`_Unordered`."""

    def __init__(self, d: np.ndarray):
        sub = np.sort(d[:: max(1, d.size // 65536)])

        def quantile(f: float) -> float:
            return float(sub[min(sub.size - 1, max(0, int(f * (sub.size - 1))))])

        q1, q2, q3 = quantile(0.25), quantile(0.5), quantile(0.75)
        scale = (q3 - q1) / 1.349
        if not scale > 0:
            raise _Unordered
        self.a = np.asarray(q2 - 2.0 * scale).astype(d.dtype)
        self.b = np.asarray(q2 + 2.0 * scale).astype(d.dtype)
        low, high = d < self.a, d > self.b
        self.tl, self.th = np.sort(d[low]), np.sort(d[high])
        mid = d[~(low | high)]
        del low, high
        self.n, self.dtype = d.size, d.dtype
        n, nl, nm = d.size, self.tl.size, mid.size
        self.nl, self.nm = nl, nm
        if nm == 0:
            raise _Unordered
        self.sm = float(np.einsum("i->", mid, dtype=np.float64))
        self.sm2 = float(np.einsum("i,i->", mid, mid, dtype=np.float64))
        tl64, th64 = self.tl.astype(np.float64), self.th.astype(np.float64)
        self.cl1, self.cl2 = np.concatenate(([0.0], np.cumsum(tl64))), np.concatenate(([0.0], np.cumsum(tl64 * tl64)))
        self.ch1, self.ch2 = np.concatenate(([0.0], np.cumsum(th64))), np.concatenate(([0.0], np.cumsum(th64 * th64)))
        # with lo <= nl and hi >= nl + nm, the median ranks lo + (hi - lo) // 2 (and one less)
        # lie in [(nl + nm) // 2 - 1, nl + (n - nl) // 2]: take the middle values between
        # the subsample's quantiles of those ranks, widened by 1 % (sampling error ~0.2 %)
        r0, r1 = (nl + nm) // 2 - 1, nl + (n - nl) // 2
        c0 = max(np.asarray(quantile(r0 / n - 0.01)).astype(d.dtype), self.a)
        c1 = min(np.asarray(quantile(r1 / n + 0.01)).astype(d.dtype), self.b)
        centre = (mid >= c0) & (mid <= c1)
        self.ka = nl + int(np.count_nonzero(mid < c0))  # the global rank of central[0]
        self.central = np.sort(mid[centre])
        if not (self.ka <= r0 and r1 < self.ka + self.central.size):
            raise _Unordered

    def value(self, r: int) -> float:
        j = r - self.ka
        if not 0 <= j < self.central.size:
            raise _Unordered
        return float(self.central[j])

    def n_below(self, v) -> int:
        if v > self.a:  # the bound falls in the middle, which is not sorted
            raise _Unordered
        return int(np.searchsorted(self.tl, v, side="left"))

    def n_upto(self, v) -> int:
        if v < self.b:
            raise _Unordered
        return self.nl + self.nm + int(np.searchsorted(self.th, v, side="right"))

    def sums(self, lo: int, hi: int) -> tuple[float, float]:
        if lo > self.nl or hi < self.nl + self.nm:
            raise _Unordered
        h = hi - self.nl - self.nm
        return (self.cl1[self.nl] - self.cl1[lo] + self.sm + self.ch1[h],
                self.cl2[self.nl] - self.cl2[lo] + self.sm2 + self.ch2[h])


def _clip_rounds(r: _SortedRanks | _SplitRanks, sigma: float, maxiters: int) -> float:
    """The rounds of :func:`clipped_median` on ranked data: the kept run of ranks lo:hi."""
    def median(lo: int, hi: int) -> float:
        m = hi - lo
        mid = lo + m // 2
        return r.value(mid) if m % 2 else 0.5 * (r.value(mid - 1) + r.value(mid))

    dtype = r.dtype
    lo, hi = 0, r.n
    for _ in range(maxiters):
        m = hi - lo
        if m == 0:
            break
        med = median(lo, hi)
        s1, s2 = r.sums(lo, hi)
        mean = s1 / m
        std = math.sqrt(max(s2 / m - mean * mean, 0.0))
        # the bounds in the data's precision, as astropy compares them
        vmin = np.asarray(med - std * sigma).astype(dtype)
        vmax = np.asarray(med + std * sigma).astype(dtype)
        nlo = min(max(r.n_below(vmin), lo), hi)
        nhi = min(max(r.n_upto(vmax), lo), hi)
        lo, hi = nlo, max(nlo, nhi)
        if hi - lo == m:
            break
    return median(lo, hi) if hi > lo else float("nan")


def match_backgrounds(warps: list[Exposure], min_overlap: int = 400,
                      clipped: list[np.ndarray] | None = None, *, threads: int = 1) -> np.ndarray:
    """One additive offset per warp (image units) that best aligns their backgrounds,
    relative to the warp with the most usable pixels (offset 0); see the module docstring.
    ``clipped``: per-warp planes (own grids) of pixels also left out (CLIPPED); ``threads``:
    pairs compared at once (same result)."""
    oks = [_usable(w, REJECT_PLANES + ("DETECTED",)) for w in warps]
    if clipped is not None:
        for ok, c in zip(oks, clipped):
            ok &= ~c
    return _match_backgrounds(warps, oks, min_overlap, threads)


def _match_backgrounds(warps: list[Exposure], oks: list[np.ndarray], min_overlap: int = 400,
                       threads: int = 1) -> np.ndarray:
    """:func:`match_backgrounds` with the usable pixels of each warp given (own grids).
    Pairs are compared on the overlap of their boxes only: no stack is built."""
    n = len(warps)
    if n < 2:
        return np.zeros(n)

    def pair(ij: tuple[int, int]) -> float | None:
        """The clipped median of warp i - warp j over their common usable pixels (None
        when fewer than ``min_overlap``)."""
        wi, wj = warps[ij[0]], warps[ij[1]]
        # the overlap of the two boxes, in tile pixels
        x0, y0 = max(wi.xy0[0], wj.xy0[0]), max(wi.xy0[1], wj.xy0[1])
        x1 = min(wi.xy0[0] + wi.shape[1], wj.xy0[0] + wj.shape[1])
        y1 = min(wi.xy0[1] + wi.shape[0], wj.xy0[1] + wj.shape[0])
        if x1 <= x0 or y1 <= y0 or (x1 - x0) * (y1 - y0) < min_overlap:
            return None
        si = (slice(y0 - wi.xy0[1], y1 - wi.xy0[1]), slice(x0 - wi.xy0[0], x1 - wi.xy0[0]))
        sj = (slice(y0 - wj.xy0[1], y1 - wj.xy0[1]), slice(x0 - wj.xy0[0], x1 - wj.xy0[0]))
        both = oks[ij[0]][si] & oks[ij[1]][sj]
        if np.count_nonzero(both) < min_overlap:
            return None
        return clipped_median(wi.image[si][both] - wj.image[sj][both], sigma=3.0, maxiters=5)

    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    rows, rhs = [], []
    for (i, j), med in zip(pairs, _map(pair, pairs, threads)):
        if med is None:
            continue
        r = np.zeros(n)
        r[i], r[j] = 1.0, -1.0
        rows.append(r)
        rhs.append(med)
    ref = int(np.argmax([np.count_nonzero(ok) for ok in oks]))
    r = np.zeros(n)
    r[ref] = 1.0
    rows.append(r * 1e3)  # the reference's offset is 0 (a heavily weighted row)
    rhs.append(0.0)
    sol, *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(rhs), rcond=None)
    return sol


# -- artifact rejection ----------------------------------------------------------------------------
def max_artifact_epochs(n: int, cfg: ArtifactConfig) -> int:
    """The temporal threshold: an artifact appears in at most this many of ``n`` epochs."""
    return max(1, int(math.floor(min(cfg.max_epochs_fraction * n, cfg.max_epochs_base + cfg.max_epochs_slope * n))))


def _median_stack(imgs: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel median of the accepted values of a (n, ny, nx) stack (0 where none) and
    their count: one sort along the stack (missing values as +inf, sorted last) and the
    middle one or two picked by count: the numbers ``np.nanmedian`` gives, several times
    faster for a short stack."""
    a = np.where(ok, imgs, np.float32(np.inf)).astype(np.float32, copy=False)
    a.sort(axis=0)
    cnt = ok.sum(axis=0)
    lo = (np.maximum(cnt, 1) - 1) // 2
    hi = np.maximum(cnt, 1) // 2
    med = np.take_along_axis(a, lo[None], 0)[0]
    med += np.take_along_axis(a, hi[None], 0)[0]
    med *= np.float32(0.5)
    med[cnt == 0] = 0.0
    return med, cnt


def _static_sky_rows(imgs: np.ndarray, vars_: np.ndarray, ok: np.ndarray,
                     cfg: ArtifactConfig) -> tuple[np.ndarray, np.ndarray]:
    """:func:`static_sky_model` of one strip (float32 stacks; the clipping in float32, the
    final sums in float64)."""
    # the first centre is the median: one epoch's bright outlier must not drag the mean so
    # far that the good epochs are the ones clipped
    centre, _ = _median_stack(imgs, ok)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv_sd = np.where(np.isfinite(vars_) & (vars_ > 0), 1.0 / np.sqrt(vars_), 0.0).astype(np.float32)
    use = ok
    for _ in range(cfg.model_iter):
        resid = imgs - centre
        resid *= inv_sd
        np.abs(resid, out=resid)
        keep = ok & (resid <= np.float32(cfg.model_clip))
        # never clip below two inputs: the clip needs something to compare with
        keep |= ok & (keep.sum(axis=0) < 2)[None]
        if np.array_equal(keep, use):
            break
        use = keep
        n = use.sum(axis=0)
        centre = (np.where(use, imgs, np.float32(0.0)).sum(axis=0) / np.maximum(n, 1)).astype(np.float32)
    n = use.sum(axis=0)
    mean = np.where(use, imgs, np.float32(0.0)).sum(axis=0, dtype=np.float64) / np.maximum(n, 1)
    with np.errstate(invalid="ignore"):
        var = np.where(n > 0, np.where(use, vars_, np.float32(0.0)).sum(axis=0, dtype=np.float64)
                       / np.maximum(n, 1) ** 2, np.inf)
    return mean.astype(np.float32), var.astype(np.float32)


def static_sky_model(imgs: np.ndarray, vars_: np.ndarray, ok: np.ndarray, cfg: ArtifactConfig):
    """Per-pixel sigma-clipped mean of an (n, ny, nx) stack (image units) and its variance
    (inf where no input), both float32: the median as first centre, then ``cfg.model_iter``
    rounds of ``cfg.model_clip`` sigma clipping in each input's own noise (never below two
    inputs).  Runs in row strips (:data:`STRIP_BYTES`)."""
    n, ny, nx = imgs.shape
    mean = np.empty((ny, nx), np.float32)
    var = np.empty((ny, nx), np.float32)
    step = _strip_rows(n, nx, ny)
    for r0 in range(0, ny, step):
        r1 = min(ny, r0 + step)
        mean[r0:r1], var[r0:r1] = _static_sky_rows(imgs[:, r0:r1].astype(np.float32, copy=False),
                                                   vars_[:, r0:r1].astype(np.float32, copy=False),
                                                   ok[:, r0:r1], cfg)
    return mean, var


def find_artifacts(psf_warps: list[Exposure], config: ArtifactConfig | None = None, *,
                   threads: int = 1) -> list[np.ndarray]:
    """Per epoch, a bool plane (on that warp's own grid) of pixels to mark CLIPPED.

    The model and residuals are computed strip by strip of the union box (float32; no full
    stack is held); what is kept for the footprints is two bool planes per epoch (pixels
    above ``detect_sigma`` and above ``grow_sigma``) and per-pixel counts.  ``threads``:
    strips, then epochs, processed at once (same result)."""
    cfg = config or ArtifactConfig()
    n = len(psf_warps)
    clipped = [np.zeros(w.shape, bool) for w in psf_warps]
    if n < 3:
        return clipped  # two epochs cannot say which one is wrong
    bbox = _union_bbox(psf_warps)
    ny, nx = bbox[3] - bbox[1], bbox[2] - bbox[0]
    # EDGE pixels were filled before PSF matching: combined, but not judged
    oks = [_usable(w, ("NO_DATA", "BAD", "SAT", "EDGE")) for w in psf_warps]
    imgs_k = [w.image for w in psf_warps]
    vars_k = [w.variance for w in psf_warps]
    simple = cfg.method in ("clipped_mean", "median")
    hi_sigma = cfg.clip_sigma if simple else cfg.detect_sigma
    seeds = np.zeros((n, ny, nx), bool)  # |resid| > detect_sigma (clip_sigma for the simple methods)
    grown = None if simple else np.zeros((n, ny, nx), bool)  # |resid| > grow_sigma
    n_cover = np.zeros((ny, nx), np.int16)
    me = np.float32(cfg.model_error)
    step = _strip_rows(n, nx, ny)

    def strip(r0: int) -> None:
        """Model and residuals of rows r0:r0 + step (written to disjoint rows)."""
        r1 = min(ny, r0 + step)
        imgs = _stack_rows(imgs_k, psf_warps, bbox, r0, r1, 0.0, np.float32)
        vars_ = _stack_rows(vars_k, psf_warps, bbox, r0, r1, np.inf, np.float32)
        ok = _stack_rows(oks, psf_warps, bbox, r0, r1, False, bool)
        n_cover[r0:r1] = ok.sum(axis=0)
        if cfg.method == "median":
            model, cnt = _median_stack(imgs, ok)
            # np.median of the stack with NaN for missing inputs: pixels some input does
            # not cover get no model, so none of their values is judged
            model[cnt < n] = np.nan
            model_var = np.zeros_like(model)
        else:
            model, model_var = _static_sky_rows(imgs, vars_, ok, cfg)
        with np.errstate(invalid="ignore", divide="ignore"):
            sigma = vars_ + model_var[None]
            sigma += ((me * model) ** 2)[None]
            np.sqrt(sigma, out=sigma)
            resid = imgs - model[None]
            resid /= sigma
            np.abs(resid, out=resid)
            resid[~ok] = 0.0
            seeds[:, r0:r1] = resid > hi_sigma
            if grown is not None:
                grown[:, r0:r1] = resid > cfg.grow_sigma

    _map(strip, range(0, ny, step), threads)
    if simple:
        return [seeds[i][_box(w, bbox)].copy() for i, w in enumerate(psf_warps)]
    often = grown.sum(axis=0, dtype=np.int16)  # epochs in which each pixel deviates
    limit = max_artifact_epochs(n, cfg)
    struct = np.ones((3, 3), bool)

    def epoch(i: int) -> None:
        """The artifacts of epoch i (into clipped[i])."""
        # a warp's footprints lie inside its own box (its residuals are 0 elsewhere), and
        # growing them there and cropping is the same as growing them on the union box
        box = _box(psf_warps[i], bbox)
        seed_i = seeds[i][box]
        if not seed_i.any():
            return
        often_i = often[box]
        g = grown[i][box]
        lab, nlab = ndimage.label(g, structure=struct)
        ids = np.unique(lab[seed_i])
        ids = ids[ids > 0]
        if not ids.size:
            return
        # per footprint: the fraction of its pixels that deviate in more epochs than an
        # artifact would (the spatial threshold); a footprint mostly made of such pixels is
        # a variable source or a star's PSF residual, not an artifact.  Counted over the
        # footprints' own pixels (a few % of the box), not the whole box.
        ys, xs = np.nonzero(g)
        lab_at = lab[ys, xs]
        size = np.bincount(lab_at, minlength=nlab + 1)[ids]
        frequent = np.bincount(lab_at, weights=often_i[ys, xs] > limit, minlength=nlab + 1)[ids] / np.maximum(size, 1)
        # judged only where at least 3 inputs cover some pixel of the footprint
        enough = np.bincount(lab_at, weights=n_cover[box][ys, xs] >= 3, minlength=nlab + 1)[ids] > 0
        artifact = (frequent <= cfg.spatial_fraction) & enough
        if not artifact.any():
            return
        is_artifact = np.zeros(nlab + 1, bool)
        is_artifact[ids[artifact]] = True
        hit = is_artifact[lab_at]
        plane = np.zeros(g.shape, bool)
        plane[ys[hit], xs[hit]] = True
        if cfg.grow_px:
            # grow_px dilations by the 3 x 3 square are one by the (2 grow_px + 1)^2 square:
            # a separable running maximum, several times faster than binary_dilation
            plane = ndimage.maximum_filter(plane.view(np.uint8), size=2 * cfg.grow_px + 1,
                                           mode="constant", cval=0).view(bool)
        # the temporal threshold, pixel by pixel: where an artifact crosses a variable star,
        # the star's pixels (deviating in many epochs) are not clipped with it
        clipped[i] = plane & (often_i <= limit)

    _map(epoch, range(n), threads)
    return clipped


# -- combination ---------------------------------------------------------------------------------
@dataclasses.dataclass
class CoaddResult:
    """coadd: the combined Exposure (PSF attached); n_image: accepted inputs per pixel;
    input_map: bit i set where input i was used (int64, up to 63 inputs); weights: one per
    input; offsets: background offsets found (image units; subtracted when configured);
    n_clipped: CLIPPED pixels per input."""

    coadd: Exposure
    n_image: np.ndarray
    input_map: np.ndarray
    weights: np.ndarray
    offsets: np.ndarray
    n_clipped: np.ndarray


def combine(warps: list[Exposure], clipped: list[np.ndarray] | None = None,
            config: CoaddConfig | None = None, target_wcs=None,
            psf_smoothing: list[float] | None = None, *, threads: int = 1) -> CoaddResult:
    """Combine warps of one tile and band into a coadd (see the module docstring).

    ``clipped``: per-warp planes from :func:`find_artifacts` (marked CLIPPED and left out).
    ``target_wcs``: the full tile WCS (pixel origin of the tile); the coadd covers the union
    of the warps' boxes, with ``xy0`` and WCS of that part.  ``psf_smoothing``: per warp, the
    sigma (px) of the Gaussian it was convolved with (:func:`archive.process.warp.psf_match`),
    so that the coadd's PSF is that of the smoothed inputs.

    The warps are accumulated one by one into float64 sums, row strip by row strip of the
    union box (no stack, no copy of the inputs; the inputs are not modified).  ``threads``: background pairs
    compared at once (same result)."""
    cfg = config or CoaddConfig()
    if not warps:
        raise ValidationError("combine: no warps")
    if len(warps) > 63:
        raise ValidationError(f"combine: {len(warps)} inputs; the input map holds at most 63")
    planes = dict(warps[0].mask_planes)
    n = len(warps)
    oks = [_usable(w, REJECT_PLANES) for w in warps]
    if clipped is not None:
        for ok, c in zip(oks, clipped):
            ok &= ~c
    if cfg.match_backgrounds:
        det = [w.mask_of("DETECTED") if "DETECTED" in w.mask_planes else None for w in warps]
        offsets = _match_backgrounds(warps, [ok & ~d if d is not None else ok for ok, d in zip(oks, det)],
                                     threads=threads)
        del det
    else:
        offsets = np.zeros(n)
    bbox = _union_bbox(warps)
    ny, nx = bbox[3] - bbox[1], bbox[2] - bbox[0]
    weights = np.array([1.0 / float(np.median(w.variance[np.isfinite(w.variance) & (w.variance > 0)]))
                        if np.isfinite(w.variance).any() else 0.0 for w in warps])
    img = np.empty((ny, nx), np.float32)
    var = np.empty((ny, nx), np.float32)
    mask = np.zeros((ny, nx), np.int32)
    n_image = np.zeros((ny, nx), np.int16)
    input_map = np.zeros((ny, nx), np.int64)
    no_data, edge_bit = np.int32(1 << planes["NO_DATA"]), np.int32(1 << planes["EDGE"])
    # row strips: the float64 sums exist for one strip at a time (three planes of
    # STRIP_BYTES / 4 / n float64 rows), whatever the tile size
    step = _strip_rows(n, nx, ny)
    for r0 in range(0, ny, step):
        r1 = min(ny, r0 + step)
        # [0]: the inputs' pixels away from their edges; [1]: their EDGE pixels (a resampling
        # kernel that reached past the input's edge: biased, a star there loses part of its
        # flux), used only where no input covers a pixel otherwise, and then marked EDGE
        num = np.zeros((2, r1 - r0, nx))  # sum w_i I_i
        wsum = np.zeros((2, r1 - r0, nx))  # sum w_i
        vnum = np.zeros((2, r1 - r0, nx))  # sum w_i^2 V_i
        nimg = np.zeros((2, r1 - r0, nx), np.int16)
        imap = np.zeros((2, r1 - r0, nx), np.int64)
        covered = np.zeros((r1 - r0, nx), bool)
        for k, (w, ok) in enumerate(zip(warps, oks)):
            ys, xs = _box(w, bbox)
            lo, hi = max(r0, ys.start), min(r1, ys.stop)
            if lo >= hi:
                continue
            src = slice(lo - ys.start, hi - ys.start)  # the strip's rows in w's own grid
            dst = (slice(lo - r0, hi - r0), xs)
            okk = ok[src]
            im = w.image[src]
            if cfg.subtract_backgrounds:
                im = (im - np.float32(offsets[k])).astype(np.float32)
            wk = weights[k]
            edge = ((w.mask[src] & np.int32(w.get_plane_bitmask("EDGE"))) != 0 if "EDGE" in w.mask_planes
                    else np.zeros(okk.shape, bool))
            for j, use in enumerate((okk & ~edge, okk & edge)):
                if j and not use.any():
                    continue
                num[j][dst] += wk * np.where(use, im, np.float32(0.0))
                wsum[j][dst] += wk * use
                vnum[j][dst] += wk ** 2 * np.where(use, w.variance[src], np.float32(0.0))
                nimg[j][dst] += use
                imap[j][dst] |= use.astype(np.int64) << np.int64(k)
            covered[dst] = True
        main = wsum[0] > 0
        fall = ~main & (wsum[1] > 0)
        num, wsum, vnum = (np.where(main, a[0], a[1]) for a in (num, wsum, vnum))
        n_image[r0:r1] = np.where(main, nimg[0], nimg[1])
        input_map[r0:r1] = np.where(main, imap[0], imap[1])
        has = wsum > 0
        den = np.where(has, wsum, 1.0)
        img[r0:r1] = np.where(has, num / den, 0.0)
        var[r0:r1] = np.where(has, vnum / den ** 2, np.inf)
        m = mask[r0:r1]
        m[~has] |= no_data
        m[fall] |= edge_bit
        m[~covered] |= no_data
    wcs = (target_wcs or warps[0].wcs).deepcopy()
    if target_wcs is not None:
        wcs.wcs.crpix = [target_wcs.wcs.crpix[0] - bbox[0], target_wcs.wcs.crpix[1] - bbox[1]]
    else:
        w0 = warps[0]
        wcs.wcs.crpix = [w0.wcs.wcs.crpix[0] + w0.xy0[0] - bbox[0], w0.wcs.wcs.crpix[1] + w0.xy0[1] - bbox[1]]
    first = warps[0].info
    info = ExposureInfo(band=first.band, mjd=float(np.mean([w.info.mjd for w in warps])),
                        exp_time=float(sum(w.info.exp_time for w in warps)), gain=1.0)
    info.extras = {"coadd": {"inputs": [int(w.info.visit) * 1000 + int(w.info.detector) for w in warps],
                             "weights": weights.tolist(), "background_offsets": offsets.tolist(),
                             "backgrounds_subtracted": bool(cfg.subtract_backgrounds),
                             "n_clipped": [int(c.sum()) for c in clipped] if clipped is not None else None}}
    coadd = Exposure(img, mask, var, wcs=wcs, photo_calib=warps[0].photo_calib, info=info,
                     mask_planes=planes, xy0=(bbox[0], bbox[1]))
    coadd.psf = coadd_psf(warps, oks, weights, bbox, cfg, psf_smoothing)
    return CoaddResult(coadd, n_image, input_map, weights, offsets,
                       np.array([int(c.sum()) for c in clipped]) if clipped is not None
                       else np.zeros(len(warps), int))


def coadd_psf(warps: list[Exposure], oks: list[np.ndarray], weights: np.ndarray, bbox, cfg: CoaddConfig,
              smoothing: list[float] | None = None):
    """The coadd's PSF: at each node of a ``psf_grid`` x ``psf_grid`` grid, the weighted mean
    of the PSFs (on the tile grid, see :func:`archive.process.warp.warp_psf`) of the inputs
    accepted there (``oks[k]``: input k's accepted pixels on its own grid; each PSF convolved
    with a Gaussian of ``smoothing[k]`` px where given), fitted as a spatially varying pixel
    PSF in coadd pixels."""
    from archive.image.psf import PixelPSF, poly_design

    x0, y0, x1, y1 = bbox
    nx, ny = x1 - x0, y1 - y0
    size = cfg.psf_size
    g = cfg.psf_grid
    # whole-pixel nodes: each kernel is then centred on its central pixel, as a pixel PSF's
    # basis must be (kernels at mixed sub-pixel phases would blur the fitted model)
    gx = np.round(np.linspace(0.5 * nx / g, nx - 0.5 * nx / g, g))
    gy = np.round(np.linspace(0.5 * ny / g, ny - 0.5 * ny / g, g))
    nodes, kernels = [], []
    for yy in gy:
        for xx in gx:
            ix, iy = int(xx), int(yy)
            acc = np.zeros((size, size))
            wsum = 0.0
            for k, w in enumerate(warps):
                lx, ly = ix + x0 - w.xy0[0], iy + y0 - w.xy0[1]  # the node in w's own pixels
                if (w.psf is None or not (0 <= lx < w.shape[1] and 0 <= ly < w.shape[0])
                        or not oks[k][ly, lx]):
                    continue
                # the warp's PSF is in its own (tile) pixels, origin at its xy0
                kern = w.psf.kernel(xx + x0 - w.xy0[0], yy + y0 - w.xy0[1], size)
                if smoothing is not None and smoothing[k] > 0.05:
                    kern = ndimage.gaussian_filter(kern, smoothing[k], mode="constant", truncate=5.0)
                    kern = kern / kern.sum()
                acc += weights[k] * kern
                wsum += weights[k]
            if wsum > 0:
                nodes.append((xx, yy))
                kernels.append(acc / wsum)
    if not kernels:
        return None
    nodes = np.asarray(nodes)
    samples = np.asarray(kernels)
    bb = (0.0, 0.0, float(nx - 1), float(ny - 1))
    degree = cfg.psf_degree if len(nodes) >= 3 * (cfg.psf_degree + 1) * (cfg.psf_degree + 2) // 2 else 0
    design = poly_design(nodes[:, 0], nodes[:, 1], degree, bb)
    sol, *_ = np.linalg.lstsq(design, samples.reshape(len(nodes), -1), rcond=None)
    return PixelPSF(sol.reshape(-1, size, size), None, oversample=1, degree=degree, bbox=bb)


def target_fwhm(fwhms: list[float], margin: float = 1.05) -> float:
    """The FWHM (px) the PSF-matched warps are convolved to: the widest input's, plus 5 %."""
    return float(max(fwhms)) * margin
