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
    NO_DATA masks and a PSF: at each node of a grid over the coadd, the
    weighted mean of the inputs' PSFs over the inputs accepted there,
    represented as a spatially varying pixel PSF.

Template selection (:func:`select_inputs`, as dia_pipe's best-seeing selector)
    The best-seeing inputs inside a time window, at most ``max_inputs``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

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
def _union_bbox(warps: list[Exposure]) -> tuple[int, int, int, int]:
    x0 = min(w.xy0[0] for w in warps)
    y0 = min(w.xy0[1] for w in warps)
    x1 = max(w.xy0[0] + w.shape[1] for w in warps)
    y1 = max(w.xy0[1] + w.shape[0] for w in warps)
    return x0, y0, x1, y1


def _place(a: np.ndarray, w: Exposure, bbox, fill) -> np.ndarray:
    """``a`` (on ``w``'s grid) placed on the union bbox, ``fill`` elsewhere."""
    x0, y0, x1, y1 = bbox
    out = np.full((y1 - y0, x1 - x0), fill, dtype=a.dtype)
    ox, oy = w.xy0[0] - x0, w.xy0[1] - y0
    out[oy:oy + a.shape[0], ox:ox + a.shape[1]] = a
    return out


def _stack(warps: list[Exposure], bbox, planes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, variances, usable) stacks (n, ny, nx) on the union bbox."""
    imgs = np.stack([_place(w.image, w, bbox, 0.0) for w in warps])
    vars_ = np.stack([_place(w.variance, w, bbox, np.inf) for w in warps])
    ok = []
    for w in warps:
        present = [p for p in planes if p in w.mask_planes]
        bad = w.mask_of(*present) if present else np.zeros(w.shape, bool)
        ok.append(_place(~bad & np.isfinite(w.variance) & (w.variance > 0), w, bbox, False))
    return imgs, vars_, np.stack(ok)


# -- background matching ------------------------------------------------------------------------
def match_backgrounds(warps: list[Exposure], min_overlap: int = 400) -> np.ndarray:
    """One additive offset per warp (image units) that best aligns their backgrounds,
    relative to the warp with the most usable pixels (offset 0); see the module docstring."""
    from astropy.stats import sigma_clipped_stats

    n = len(warps)
    if n < 2:
        return np.zeros(n)
    bbox = _union_bbox(warps)
    imgs, _, ok = _stack(warps, bbox, REJECT_PLANES + ("DETECTED",))
    rows, rhs = [], []
    for i in range(n):
        for j in range(i + 1, n):
            both = ok[i] & ok[j]
            if both.sum() < min_overlap:
                continue
            d = imgs[i][both] - imgs[j][both]
            med = float(sigma_clipped_stats(d, sigma=3.0, maxiters=5)[1])
            r = np.zeros(n)
            r[i], r[j] = 1.0, -1.0
            rows.append(r)
            rhs.append(med)
    ref = int(np.argmax(ok.reshape(n, -1).sum(axis=1)))
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


def static_sky_model(imgs: np.ndarray, vars_: np.ndarray, ok: np.ndarray, cfg: ArtifactConfig):
    """Per-pixel sigma-clipped mean of the stack and its variance (inf where no input)."""
    use = ok.copy()
    # the first centre is the median: one epoch's bright outlier must not drag the mean so
    # far that the good epochs are the ones clipped
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pixels no input covers: centre 0
        centre = np.nan_to_num(np.nanmedian(np.where(ok, imgs, np.nan), axis=0))
    sd = np.sqrt(np.where(np.isfinite(vars_) & (vars_ > 0), vars_, np.inf))
    for _ in range(cfg.model_iter):
        resid = (imgs - centre) / sd
        keep = ok & (np.abs(resid) <= cfg.model_clip)
        # never clip below two inputs: the clip needs something to compare with
        keep |= ok & (keep.sum(axis=0) < 2)[None]
        if np.array_equal(keep, use):
            break
        use = keep
        n = use.sum(axis=0)
        centre = np.where(n > 0, np.where(use, imgs, 0.0).sum(axis=0) / np.maximum(n, 1), 0.0)
    n = use.sum(axis=0)
    mean = np.where(n > 0, np.where(use, imgs, 0.0).sum(axis=0) / np.maximum(n, 1), 0.0)
    var = np.where(n > 0, np.where(use, vars_, 0.0).sum(axis=0) / np.maximum(n, 1) ** 2, np.inf)
    return mean.astype(np.float32), var.astype(np.float32)


def find_artifacts(psf_warps: list[Exposure], config: ArtifactConfig | None = None) -> list[np.ndarray]:
    """Per epoch, a bool plane (on that warp's own grid) of pixels to mark CLIPPED."""
    cfg = config or ArtifactConfig()
    n = len(psf_warps)
    clipped = [np.zeros(w.shape, bool) for w in psf_warps]
    if n < 3:
        return clipped  # two epochs cannot say which one is wrong
    bbox = _union_bbox(psf_warps)
    # EDGE pixels were filled before PSF matching: combined, but not judged
    imgs, vars_, ok = _stack(psf_warps, bbox, ("NO_DATA", "BAD", "SAT", "EDGE"))
    n_cover = ok.sum(axis=0)
    if cfg.method == "median":
        med = np.median(np.where(ok, imgs, np.nan), axis=0)
        model, model_var = med, np.zeros_like(med)
    else:
        model, model_var = static_sky_model(imgs, vars_, ok, cfg)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = np.sqrt(vars_ + model_var[None] + (cfg.model_error * model[None]) ** 2)
        resid = np.where(ok, (imgs - model[None]) / sigma, 0.0)
    if cfg.method in ("clipped_mean", "median"):
        hit = np.abs(resid) > cfg.clip_sigma
        return [_crop(hit[i], psf_warps[i], bbox) for i in range(n)]
    seeds = np.abs(resid) > cfg.detect_sigma
    grown = np.abs(resid) > cfg.grow_sigma
    often = grown.sum(axis=0)  # epochs in which each pixel deviates
    limit = max_artifact_epochs(n, cfg)
    struct = np.ones((3, 3), bool)
    for i in range(n):
        if not seeds[i].any():
            continue
        lab, _ = ndimage.label(grown[i], structure=struct)
        ids = np.unique(lab[seeds[i]])
        ids = ids[ids > 0]
        if not ids.size:
            continue
        # per footprint: the fraction of its pixels that deviate in more epochs than an
        # artifact would (the spatial threshold); a footprint mostly made of such pixels is
        # a variable source or a star's PSF residual, not an artifact
        flat = lab.ravel()
        sel = np.isin(flat, ids)
        order = np.searchsorted(ids, flat[sel])
        size = np.bincount(order, minlength=ids.size)
        frequent = np.bincount(order, weights=(often.ravel()[sel] > limit), minlength=ids.size) / np.maximum(size, 1)
        enough = np.zeros(ids.size)
        np.maximum.at(enough, order, n_cover.ravel()[sel])
        artifact = (frequent <= cfg.spatial_fraction) & (enough >= 3)
        if not artifact.any():
            continue
        plane = np.isin(lab, ids[artifact])
        if cfg.grow_px:
            plane = ndimage.binary_dilation(plane, structure=struct, iterations=cfg.grow_px)
        # the temporal threshold, pixel by pixel: where an artifact crosses a variable star,
        # the star's pixels (deviating in many epochs) are not clipped with it
        clipped[i] = _crop(plane & (often <= limit), psf_warps[i], bbox)
    return clipped


def _crop(plane: np.ndarray, w: Exposure, bbox) -> np.ndarray:
    ox, oy = w.xy0[0] - bbox[0], w.xy0[1] - bbox[1]
    return plane[oy:oy + w.shape[0], ox:ox + w.shape[1]].copy()


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
            psf_smoothing: list[float] | None = None) -> CoaddResult:
    """Combine warps of one tile and band into a coadd (see the module docstring).

    ``clipped``: per-warp planes from :func:`find_artifacts` (marked CLIPPED and left out).
    ``target_wcs``: the full tile WCS (pixel origin of the tile); the coadd covers the union
    of the warps' boxes, with ``xy0`` and WCS of that part.  ``psf_smoothing``: per warp, the
    sigma (px) of the Gaussian it was convolved with (:func:`archive.process.warp.psf_match`),
    so that the coadd's PSF is that of the smoothed inputs."""
    cfg = config or CoaddConfig()
    if not warps:
        raise ValidationError("combine: no warps")
    if len(warps) > 63:
        raise ValidationError(f"combine: {len(warps)} inputs; the input map holds at most 63")
    planes = dict(warps[0].mask_planes)
    warps = [w.copy() for w in warps]
    if clipped is not None:
        bit = planes.get("CLIPPED")
        for w, c in zip(warps, clipped):
            w.mask[c] |= np.int32(1 << bit)
    offsets = match_backgrounds(warps) if cfg.match_backgrounds else np.zeros(len(warps))
    if cfg.subtract_backgrounds:
        for w, off in zip(warps, offsets):
            w.image = (w.image - np.float32(off)).astype(np.float32)
    bbox = _union_bbox(warps)
    imgs, vars_, ok = _stack(warps, bbox, REJECT_PLANES)
    weights = np.array([1.0 / float(np.median(w.variance[np.isfinite(w.variance) & (w.variance > 0)]))
                        if np.isfinite(w.variance).any() else 0.0 for w in warps])
    wk = weights[:, None, None] * ok
    wsum = wk.sum(axis=0)
    has = wsum > 0
    img = np.where(has, (wk * np.where(ok, imgs, 0.0)).sum(axis=0) / np.where(has, wsum, 1.0), 0.0)
    var = np.where(has, (wk ** 2 * np.where(ok, vars_, 0.0)).sum(axis=0) / np.where(has, wsum, 1.0) ** 2, np.inf)
    n_image = ok.sum(axis=0).astype(np.int16)
    input_map = (ok.astype(np.int64) << np.arange(len(warps), dtype=np.int64)[:, None, None]).sum(axis=0)
    mask = np.zeros(img.shape, np.int32)
    covered = np.stack([_place(np.ones(w.shape, bool), w, bbox, False) for w in warps]).any(axis=0)
    mask[~has] |= np.int32(1 << planes["NO_DATA"])
    edge_any = np.zeros(img.shape, bool)
    for w in warps:  # within reach of an input's edge: the coadd's depth changes there
        if "EDGE" in w.mask_planes:
            edge_any |= _place(w.mask_of("EDGE"), w, bbox, False)
    mask[has & edge_any] |= np.int32(1 << planes["EDGE"])
    mask[~covered] |= np.int32(1 << planes["NO_DATA"])
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
    coadd = Exposure(img.astype(np.float32), mask, var.astype(np.float32), wcs=wcs,
                     photo_calib=warps[0].photo_calib, info=info, mask_planes=planes, xy0=(bbox[0], bbox[1]))
    coadd.psf = coadd_psf(warps, ok, weights, bbox, cfg, psf_smoothing)
    return CoaddResult(coadd, n_image, input_map, weights, offsets,
                       np.array([int(c.sum()) for c in clipped]) if clipped is not None
                       else np.zeros(len(warps), int))


def coadd_psf(warps: list[Exposure], ok: np.ndarray, weights: np.ndarray, bbox, cfg: CoaddConfig,
              smoothing: list[float] | None = None):
    """The coadd's PSF: at each node of a ``psf_grid`` x ``psf_grid`` grid, the weighted mean
    of the PSFs (on the tile grid, see :func:`archive.process.warp.warp_psf`) of the inputs
    accepted there (each convolved with a Gaussian of ``smoothing[k]`` px where given), fitted
    as a spatially varying pixel PSF in coadd pixels."""
    from scipy import ndimage

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
                if w.psf is None or not ok[k, iy, ix]:
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
