"""Iterative detect-measure-subtract (bright to faint) on a background-subtracted image.

Pass 1 detects on the image (matched filter, peak saddle test and the multi-threshold
deblender of :mod:`archive.process.deblend`), measures every source (simultaneous PSF
fit) and subtracts the models; later passes detect on the residual, whose variance is
inflated by ``model_error`` times the model (PSF-mismatch residuals of bright stars
are then not significant), add the new peaks and re-measure everything together.

Galaxies. A PSF model leaves a galaxy's light outside its core in the residual: lobes
on either side of the centre, point-symmetric like the galaxy. Every source gets an
``extendedness`` (:mod:`archive.process.extendedness`); a residual peak inside the
pass-1 footprint of an extended source is its own structure unless it stands out
against the residual at its mirror point through that source's centre (a star or a
supernova on a galaxy breaks the symmetry, the galaxy's lobes do not): the peak must
exceed the mirror's S/N by the detection threshold and by ``mirror_contrast`` of its
own S/N.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from archive.errors import ValidationError
from archive.image.psf import PSF
from archive.process import flags as F_
from archive.process.detect import DetectionConfig, Footprints, find_peaks, snr_map
from archive.process.extendedness import ExtendednessConfig, measure_extendedness
from archive.process.measure import MeasureConfig, add_models, measure_sources, model_half, prepare_frame
from archive.process.stamps import chunks, gather, stamp_grid

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    """Configuration of :func:`detect_and_measure`.

    detection, measure: configs of the two sub-steps.
    n_passes: detect-measure-subtract passes (1 = single pass).
    model_error: fractional model error added to the residual variance in passes > 1.
    merge_radius: a residual peak closer than this (px) to a known source is ignored.
    saturated_zone_fwhm: residual peaks within this many FWHM of a saturated pixel are ignored
        (the wings of saturated stars are not modelled well enough to find neighbours there).
    residual_zone_planes: the planes that define those zones (saturated, bad columns).
    core_radius_fwhm, core_contrast: residual peaks within this many FWHM of a source more than
        ``core_contrast`` times brighter are ignored (PSF-model error in the bright core).
    extendedness: config of the extendedness measure (column ``extendedness``).
    extended_threshold: sources with ``extendedness`` at or above this are extended (residual peaks
        in their footprints are tested against their mirror point).
    mirror_contrast: a residual peak in an extended source's footprint is a new source only when its
        S/N exceeds the S/N at its mirror point by the detection threshold and by this fraction of its own.
    no_detect_planes: mask planes whose pixels get zero weight in detection.
    """

    detection: DetectionConfig = field(default_factory=DetectionConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    n_passes: int = 2
    model_error: float = 0.05
    merge_radius: float = 2.0
    no_detect_planes: tuple[str, ...] = ("BAD", "SAT", "CR", "NO_DATA", "STREAK")
    saturated_zone_fwhm: float = 3.0
    residual_zone_planes: tuple[str, ...] = ("SAT", "BAD")
    extendedness: ExtendednessConfig = field(default_factory=ExtendednessConfig)
    extended_threshold: float = 0.5
    mirror_contrast: float = 0.3
    core_radius_fwhm: float = 1.0
    core_contrast: float = 50.0

    def to_dict(self) -> dict:
        return asdict(self)


def _flatten(lists) -> tuple[np.ndarray, np.ndarray]:
    """(owner, item) index arrays of a list of index lists (e.g. from ``cKDTree.query_ball_point``)."""
    lens = np.fromiter(map(len, lists), dtype=np.intp, count=len(lists))
    items = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.intp, count=int(lens.sum()))
    return np.repeat(np.arange(len(lists)), lens), items


def _extended_structure(df: pd.DataFrame, fps: Footprints, pk: pd.DataFrame, snr2: np.ndarray,
                        cfg: SourceConfig) -> np.ndarray:
    """Residual peaks ``pk`` that are structure of an extended source (see module doc): inside the
    pass-1 footprint (``fps``) of a source with ``extendedness >= extended_threshold`` and not
    standing out against the residual S/N map ``snr2`` at the mirror point through the nearest
    such source of that footprint."""
    out = np.zeros(len(pk), dtype=bool)
    if len(df) == 0 or len(pk) == 0 or "extendedness" not in df:
        return out
    ext = np.nan_to_num(df["extendedness"].to_numpy(np.float64)) >= cfg.extended_threshold
    if not ext.any():
        return out
    ex = df["x"].to_numpy(np.float64)[ext]
    ey = df["y"].to_numpy(np.float64)[ext]
    elab = fps.label_at(ex, ey)
    px = pk["x"].to_numpy(np.float64)
    py = pk["y"].to_numpy(np.float64)
    plab = fps.label_at(px, py)
    has = np.zeros(int(max(elab.max(initial=0), plab.max(initial=0))) + 1, dtype=bool)
    has[elab[elab > 0]] = True
    cand = np.flatnonzero((plab > 0) & has[plab])
    if cand.size == 0:
        return out
    # the nearest extended source in the same footprint (among the k nearest of all)
    k = min(ex.size, 16)
    _, nb = cKDTree(np.column_stack([ex, ey])).query(np.column_stack([px[cand], py[cand]]), k=k)
    nb = nb.reshape(cand.size, k)
    same = elab[nb] == plab[cand][:, None]
    found = same.any(axis=1)
    e = nb[np.arange(cand.size), np.argmax(same, axis=1)]
    cand, e = cand[found], e[found]
    ny, nx = snr2.shape
    mx = np.floor(2.0 * ex[e] - px[cand] + 0.5).astype(np.int64)
    my = np.floor(2.0 * ey[e] - py[cand] + 0.5).astype(np.int64)
    on = (mx >= 0) & (mx < nx) & (my >= 0) & (my < ny)
    sm = np.where(on, snr2[np.clip(my, 0, ny - 1), np.clip(mx, 0, nx - 1)], 0.0)
    sp = pk["peak_snr"].to_numpy(np.float64)[cand]
    stands_out = sp - np.maximum(sm, 0.0) >= np.maximum(cfg.detection.threshold, cfg.mirror_contrast * sp)
    out[cand] = ~stands_out
    return out


def _with_extendedness(df: pd.DataFrame, frame, plane: np.ndarray, psf: PSF, cfg: SourceConfig) -> pd.DataFrame:
    """``df`` with its ``extendedness`` column measured on the neighbour-subtracted image (the flat
    model ``plane`` of all sources in the layout of the measurement ``frame``)."""
    fr = frame.frame
    x = df["x"].to_numpy(np.float64)
    y = df["y"].to_numpy(np.float64)
    ext = np.full(len(df), np.nan, dtype=np.float32)
    half = max(3, int(np.ceil(cfg.extendedness.half_fwhm * float(psf.fwhm())))) + max(1, cfg.extendedness.annulus) + 1
    xc = np.floor(x + 0.5).astype(np.int64)
    yc = np.floor(y + 0.5).astype(np.int64)
    ok = np.isfinite(x) & np.isfinite(y)
    ny, nx = fr.shape
    p = fr.pad - half
    ok &= (xc >= -p) & (xc < nx + p) & (yc >= -p) & (yc < ny + p)
    if ok.any():
        ext[ok] = measure_extendedness(fr, frame.img, frame.W, frame.V, plane, psf, x[ok], y[ok],
                                       df["psf_flux"].to_numpy(np.float64)[ok], cfg.extendedness)
    df["extendedness"] = ext
    return df


def _in_zone(mask, mask_planes, cfg: SourceConfig, fwhm: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether a pixel of ``residual_zone_planes`` lies within ``saturated_zone_fwhm`` FWHM (a
    square) of the integer pixels ``(x, y)``.

    The mask is read in the squares around the queried peaks only: there are a few hundred
    of them, and a summed-area table (or a maximum filter) of the whole mask costs more.
    """
    out = np.zeros(np.size(x), dtype=bool)
    zbits = F_.plane_bits(mask_planes, *cfg.residual_zone_planes) if mask is not None else 0
    if not zbits or out.size == 0:
        return out
    r = max(1, int(np.ceil(cfg.saturated_zone_fwhm * fwhm)))
    mask = np.asarray(mask)
    for sl in chunks(out.size, 2048):
        iy, ix = stamp_grid(np.asarray(x)[sl], np.asarray(y)[sl], 2 * r + 1)
        ms, _ = gather(mask, iy, ix, 0)
        out[sl] = ((ms & zbits) != 0).any(axis=(1, 2))
    return out


def _core_shadowed(df: pd.DataFrame, cand: np.ndarray, fpk: np.ndarray, radius: float, contrast: float) -> np.ndarray:
    """Residual peaks (``cand`` (m, 2) px, peak flux ``fpk``) within ``radius`` px of a known source
    more than ``contrast`` times brighter: PSF-model error in the bright core, not new sources."""
    kflux = df["psf_flux"].fillna(0).to_numpy(np.float64)
    known = np.column_stack([df["x"].to_numpy(), df["y"].to_numpy()])
    who, nb = _flatten(cKDTree(known).query_ball_point(cand, radius))
    brightest = np.full(len(cand), -np.inf)
    np.maximum.at(brightest, who, kflux[nb])
    return brightest > contrast * np.maximum(fpk, 0.0)


def detect_and_measure(image: np.ndarray, variance: np.ndarray, psf: PSF, *, mask: np.ndarray | None = None,
                       mask_planes: Mapping[str, int] | None = None,
                       background_variance: np.ndarray | None = None, background: np.ndarray | None = None,
                       config: SourceConfig | None = None,
                       background_error: np.ndarray | float | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Detect and measure point sources on a background-subtracted image.

    image: background-subtracted pixels (counts); variance: per-pixel variance
    (counts^2); psf: the :class:`~archive.image.psf.PSF` to measure with; mask: integer mask image (bits per
    ``mask_planes``, default :data:`archive.process.flags.DEFAULT_MASK_PLANES`);
    background_variance: smooth background variance (fit weights; default the
    variance); background: the subtracted background (for the ``sky`` column);
    background_error: its own 1-sigma error (added to the flux errors, see
    :func:`archive.process.measure.measure_sources`). Returns ``(sources, model)``:
    the measured DataFrame (see
    :func:`archive.process.measure.measure_sources`, plus ``peak_snr``) sorted by
    decreasing flux, and the model image of all sources.
    """
    cfg = config or SourceConfig()
    image = np.asarray(image)
    variance = np.asarray(variance)
    if image.ndim != 2 or image.size == 0:
        raise ValidationError(f"detect_and_measure: image must be a non-empty 2-D array, got shape {image.shape}")
    if variance.shape != image.shape:
        raise ValidationError(f"detect_and_measure: variance shape {variance.shape} differs from image shape {image.shape}")
    bits = F_.plane_bits(mask_planes, *cfg.no_detect_planes)
    usable = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    if mask is not None and bits:
        usable &= (np.asarray(mask) & bits) == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.reciprocal(variance, dtype=np.float32)
    w[~usable] = 0.0
    img = np.asarray(image, dtype=np.float32)
    fwhm = float(psf.fwhm())
    snr, norm = snr_map(img, w, fwhm, overwrite_weight=True)
    del w
    peaks, fps = find_peaks(snr, cfg.detection, norm=norm, return_footprints=True)
    xs = peaks["x"].to_numpy()
    ys = peaks["y"].to_numpy()
    yp, xp = peaks["y_peak"].to_numpy(), peaks["x_peak"].to_numpy()
    guess = snr[yp, xp].astype(np.float64) / norm[yp, xp]
    del snr, norm
    peak_snr = peaks["peak_snr"].to_numpy()
    second = np.zeros(xs.size, dtype=bool)
    log.info("detect pass 1: %d sources above %.1f sigma", xs.size, cfg.detection.threshold)
    # the measurement planes are prepared once and shared by all passes
    frame = prepare_frame(image, variance, mask, background_variance=background_variance, mask_planes=mask_planes,
                          bad_planes=cfg.measure.bad_planes)
    df, model = measure_sources(image, variance, mask, psf, xs, ys, background_variance=background_variance,
                                background=background, mask_planes=mask_planes, flux_guess=guess,
                                config=cfg.measure, return_model=True, frame=frame,
                                background_error=background_error)
    # the model image is a view of a padded plane in the frame's layout: later passes update it there
    plane = model.base if model.base is not None and model.base.size == frame.frame.size else None
    if plane is None:
        plane = frame.frame.plane(model, np.float32)
        model = frame.frame.crop(plane)
    df = _with_extendedness(df, frame, plane, psf, cfg)
    residual_detection = dataclasses.replace(cfg.detection, deblend_min_contrast=0.0)
    for p in range(1, max(1, cfg.n_passes)):
        # residual detection: the variance grows by (model_error * model)^2 where sources were subtracted
        resid = np.subtract(img, model, out=np.empty_like(img))
        w2 = np.multiply(model, np.float32(cfg.model_error))
        np.square(w2, out=w2)
        w2 += variance
        with np.errstate(divide="ignore", invalid="ignore"):
            np.reciprocal(w2, out=w2)
        w2[~usable] = 0.0
        snr2, norm2 = snr_map(resid, w2, fwhm, overwrite_image=True, overwrite_weight=True)
        del resid, w2
        # no flux-contrast deblending on the residual: a star beside a galaxy's residual lobes holds
        # little of their flux; residual peaks are judged by the tests below instead
        pk = find_peaks(snr2, residual_detection)
        ypk, xpk = pk["y_peak"].to_numpy(), pk["x_peak"].to_numpy()
        fpk = snr2[ypk, xpk].astype(np.float64) / norm2[ypk, xpk]
        # residual structure of galaxies (tested against the mirror point on this S/N map)
        gal = _extended_structure(df, fps, pk, snr2, cfg)
        del snr2, norm2
        if len(pk) == 0:
            break
        known = np.column_stack([df["x"].to_numpy(), df["y"].to_numpy()])
        cand = np.column_stack([pk["x"].to_numpy(), pk["y"].to_numpy()])
        if len(known):
            d, _ = cKDTree(known).query(cand, k=1)
            new = d > cfg.merge_radius
        else:
            new = np.ones(len(pk), dtype=bool)
        # zones where residual peaks are not trusted: around saturated / bad pixels (their
        # wings and interpolations are not modelled)
        new &= ~_in_zone(mask, mask_planes, cfg, fwhm, xpk, ypk)
        # a faint residual peak inside the core of a much brighter star is PSF-model error
        if len(known) and cfg.core_contrast > 0:
            new &= ~_core_shadowed(df, cand, fpk, cfg.core_radius_fwhm * fwhm, cfg.core_contrast)
        new &= ~gal
        if not new.any():
            break
        pk = pk[new]
        log.info("detect pass %d: %d new sources on the residual", p + 1, len(pk))
        # re-measure only the new sources and the known ones they can touch; the others keep
        # their fits and stay subtracted
        hm = model_half(psf, cfg.measure)
        kx = df["x"].to_numpy(np.float64)
        ky = df["y"].to_numpy(np.float64)
        kf = df["psf_flux"].fillna(0).to_numpy(np.float64)
        dk, _ = cKDTree(cand[new]).query(known, k=1)
        touch = dk < 2 * hm + 1
        # the touched sources' models leave the plane, which then holds the fixed models: the
        # subset is measured against them (in place: no full-image copies of models or images)
        add_models(frame.frame, plane, psf, kx[touch], ky[touch], -kf[touch], hm)
        xs = np.concatenate([kx[touch], pk["x"].to_numpy()])
        ys = np.concatenate([ky[touch], pk["y"].to_numpy()])
        guess = np.concatenate([kf[touch], fpk[new]])
        sub, sub_model = measure_sources(image, variance, mask, psf, xs, ys,
                                         background_variance=background_variance, background=background,
                                         mask_planes=mask_planes, flux_guess=guess, config=cfg.measure,
                                         return_model=True, frame=frame, fixed_model=plane,
                                         background_error=background_error)
        plane += sub_model.base
        del sub_model
        # the extendedness of the re-measured sources (the others' stamps hold the same models)
        sub = _with_extendedness(sub, frame, plane, psf, cfg)
        # a fixed source next to a changed one keeps its old blendedness flag; refitted ones get new flags
        keep_df = df[~touch]
        df = pd.concat([keep_df, sub], ignore_index=True)
        peak_snr = np.concatenate([peak_snr[~touch], peak_snr[touch], pk["peak_snr"].to_numpy()])
        second = np.concatenate([second[~touch], second[touch], np.ones(len(pk), dtype=bool)])
    df["peak_snr"] = peak_snr.astype(np.float32)
    df.loc[second, "flags"] = df.loc[second, "flags"].to_numpy() | F_.FLAG_SECOND_PASS
    return finish_sources(df, image.shape), model


def finish_sources(df: pd.DataFrame, shape: tuple[int, int]) -> pd.DataFrame:
    """A measured table made a catalogue of one image: of two starting points that converged onto
    one star (within 0.5 px) the first is kept, centroids that wandered off the image (a star
    beyond the edge) are dropped, rows are sorted by decreasing ``psf_flux`` (index reset)."""
    if len(df) > 1:
        pts = np.column_stack([df["x"].to_numpy(np.float64), df["y"].to_numpy(np.float64)])
        pairs = cKDTree(pts).query_pairs(0.5, output_type="ndarray")
        if len(pairs):
            drop = np.unique(np.maximum(pairs[:, 0], pairs[:, 1]))
            df = df.drop(index=df.index[drop])
    ny, nx = shape
    inside = (df["x"] >= -0.5) & (df["x"] < nx - 0.5) & (df["y"] >= -0.5) & (df["y"] < ny - 0.5)
    df = df[inside.to_numpy()]
    return df.sort_values("psf_flux", ascending=False, na_position="last").reset_index(drop=True)
