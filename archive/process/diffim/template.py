"""The template of a calexp: the template coadds of every sky tile the calexp overlaps,
resampled onto the calexp's pixel grid and joined into one image.

Each tile's template is warped onto the calexp grid (:func:`archive.process.warp.warp_exposure`,
over the box it covers); the tiles' backgrounds are aligned in their overlaps (their
margins; :func:`archive.process.coadd.match_backgrounds`), and where tiles overlap the
pixels are the inverse-variance mean of the tiles that cover them.  Pixels no tile covers are NO_DATA
(value 0, variance inf); a tile's EDGE pixels (its warp's kernel reached past the tile)
count only where no tile covers the place otherwise, and are EDGE there; where tiles
overlap, the variance is that of the tiles' pixels
(their noise is the same inputs' noise, not independent).  The PSF is that of the tile covering most of the calexp,
carried onto the calexp grid; templates of neighbouring tiles share their inputs, so
their PSFs differ little.

A calexp may itself be one of a template's inputs: its noise is then in both images and
partly cancels in the difference.  :func:`input_fraction` gives, per template pixel, the
share of the template's weight that one input carries (from the coadd's INPUT_MAP and
INPUTS weights); :func:`join_templates` carries those planes onto the calexp grid, where
``fraction x calexp variance`` is the covariance of the two images' noise (the template
being the weighted mean of its inputs), which the subtraction takes off the difference's
variance.
"""

from __future__ import annotations

import numpy as np

import dataclasses

from archive.errors import ValidationError
from archive.image.exposure import Exposure, ExposureInfo
from archive.process.coadd import match_backgrounds
from archive.process.warp import WarpConfig, footprint_bbox, pixel_map, warp_exposure


#: The weight of a tile's EDGE pixel relative to a pixel away from its edge (tiny: such a pixel
#: counts only where no tile covers the place otherwise).
EDGE_WEIGHT = 1e-6


def input_fraction(input_map: np.ndarray, weights, index: int) -> np.ndarray:
    """Per pixel of a coadd, the share of its weight that input ``index`` carries
    (``weights[index]`` over the sum of the weights of the inputs combined there, read from
    ``input_map``'s bits; 0 where that input was not combined).  float32, the map's shape."""
    w = np.asarray(weights, np.float64)
    if not 0 <= index < len(w) or index > 62:
        raise ValidationError(f"input_fraction: no input {index} among {len(w)}")
    bits = np.asarray(input_map, np.int64)
    total = np.zeros(bits.shape, np.float64)
    for k in range(min(len(w), 63)):  # a loop over the few inputs, each a whole-array operation
        total += np.where((bits >> k) & 1, w[k], 0.0)
    mine = np.where((bits >> index) & 1, w[index], 0.0)
    return np.where(total > 0, mine / np.where(total > 0, total, 1.0), 0.0).astype(np.float32)


@dataclasses.dataclass
class JoinedTemplate:
    """exposure: the templates on the calexp's grid; fraction: per pixel, the share of that
    template's weight carried by the calexp itself (None when no fraction plane was given)."""

    exposure: Exposure
    fraction: np.ndarray | None = None


def template_on_grid(calexp: Exposure, templates: list[Exposure], config: WarpConfig | None = None) -> Exposure:
    """The templates joined on ``calexp``'s grid (see the module docstring); the result has
    the calexp's shape and WCS, and ``info.extras["template"]["coverage"]`` the fraction of
    its pixels covered."""
    return join_templates(calexp, templates, config).exposure


def join_templates(calexp: Exposure, templates: list[Exposure], config: WarpConfig | None = None,
                   fractions: list[np.ndarray | None] | None = None) -> JoinedTemplate:
    """:func:`template_on_grid`, and with ``fractions`` (per template, its
    :func:`input_fraction` plane for the calexp, or None where the calexp is not one of its
    inputs) that plane on the calexp grid, joined with the same weights as the pixels
    (nearest template pixel: the plane is piecewise constant)."""
    if calexp.wcs is None:
        raise ValidationError("template_on_grid: the calexp has no WCS")
    if fractions is not None and len(fractions) != len(templates):
        raise ValidationError(f"join_templates: {len(fractions)} fraction planes for {len(templates)} templates")
    ny, nx = calexp.shape
    num = np.zeros((ny, nx), np.float64)
    wsum = np.zeros((ny, nx), np.float64)
    sigsum = np.zeros((ny, nx), np.float64)
    mask = np.zeros((ny, nx), np.int32)
    planes = dict(calexp.mask_planes)
    no_data = np.int32(1 << planes["NO_DATA"])
    psf, best = None, -1
    used = []
    warped, shares = [], []
    for k, t in enumerate(templates):
        bb = footprint_bbox(t, calexp.wcs, (ny, nx))
        if bb is not None:
            warped.append(warp_exposure(t, calexp.wcs, (ny, nx), bb, config))
            frac = fractions[k] if fractions is not None else None
            if frac is not None:
                if frac.shape != t.shape:
                    raise ValidationError(f"join_templates: fraction plane {frac.shape} and template {t.shape} differ")
                sx, sy = pixel_map(t.wcs, calexp.wcs, (ny, nx), bb)
                ix, iy = np.rint(sx).astype(np.int64), np.rint(sy).astype(np.int64)
                inside = (ix >= 0) & (iy >= 0) & (ix < t.shape[1]) & (iy < t.shape[0])
                frac = np.where(inside, frac[np.clip(iy, 0, t.shape[0] - 1), np.clip(ix, 0, t.shape[1] - 1)], 0.0)
            shares.append(frac)
    # tiles are coadded independently: their backgrounds may differ by a little, which would
    # show in the difference as steps at the tile borders; align them in their overlaps
    offsets = match_backgrounds(warped) if len(warped) > 1 else np.zeros(len(warped))
    share = np.zeros((ny, nx), np.float64) if fractions is not None else None
    # a tile's EDGE pixels (its warp's kernel reached past the tile: biased) count only where no
    # tile covers the pixel otherwise: their weight is scaled down by EDGE_WEIGHT
    edge_bit = np.int32(1 << planes["EDGE"]) if "EDGE" in planes else np.int32(0)
    best_edge = np.ones((ny, nx), bool)  # no tile covers the pixel away from its edge (yet)
    for w, off, frac in zip(warped, offsets, shares):
        x0, y0 = w.xy0
        w.image = (w.image - np.float32(off)).astype(np.float32)
        sl = (slice(y0, y0 + w.shape[0]), slice(x0, x0 + w.shape[1]))
        ok = np.isfinite(w.variance) & (w.variance > 0) & ((w.mask & (1 << w.mask_planes["NO_DATA"])) == 0)
        edge = ((w.mask & (1 << w.mask_planes["EDGE"])) != 0) if "EDGE" in w.mask_planes else np.zeros(ok.shape, bool)
        weight = np.where(ok, 1.0 / np.where(ok, w.variance, 1.0), 0.0) * np.where(edge, EDGE_WEIGHT, 1.0)
        num[sl] += weight * np.where(ok, w.image, 0.0)
        wsum[sl] += weight
        sigsum[sl] += weight * np.sqrt(np.where(ok, w.variance, 0.0))
        best_edge[sl] &= ~(ok & ~edge)
        if share is not None and frac is not None:
            share[sl] += weight * frac
        # mask bits of the covering tiles, translated to the calexp's layout (EDGE: below)
        for name, bit in w.mask_planes.items():
            if name in planes and name not in ("NO_DATA", "EDGE"):
                mask[sl] |= np.where(ok & ((w.mask & (1 << bit)) != 0), np.int32(1 << planes[name]), 0)
        cover = int(ok.sum())
        used.append(cover)
        if cover > best and w.psf is not None:
            psf, best = w.psf.shifted(-x0, -y0), cover
    has = wsum > 0
    mask[has & best_edge] |= edge_bit  # only EDGE pixels of tiles there
    image = np.where(has, num / np.where(has, wsum, 1.0), 0.0).astype(np.float32)
    # overlapping tiles' templates are made of the same inputs: their noise is one noise, not
    # independent draws, so the weighted mean keeps the weighted mean sigma (a variance of
    # 1 / sum(1/V) would claim sqrt(n tiles) less noise than the pixels have)
    variance = np.where(has, (sigsum / np.where(has, wsum, 1.0)) ** 2, np.inf).astype(np.float32)
    mask[~has] |= no_data
    info = ExposureInfo(band=calexp.info.band)
    info.extras = {"template": {"tiles": len(used), "coverage": float(has.mean()),
                                "tile_offsets": [float(o) for o in offsets]}}
    joined = Exposure(image, mask, variance, wcs=calexp.wcs.deepcopy(), psf=psf, photo_calib=calexp.photo_calib,
                      info=info, mask_planes=planes)
    if share is not None:
        share = np.where(has, share / np.where(has, wsum, 1.0), 0.0).astype(np.float32)
    return JoinedTemplate(joined, share)
