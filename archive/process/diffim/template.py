"""The template of a calexp: the template coadds of every sky tile the calexp overlaps,
resampled onto the calexp's pixel grid and joined into one image.

Each tile's template is warped onto the calexp grid (:func:`archive.process.warp.warp_exposure`,
over the box it covers); the tiles' backgrounds are aligned in their overlaps (their
margins; :func:`archive.process.coadd.match_backgrounds`), and where tiles overlap the
pixels are the inverse-variance mean of the tiles that cover them.  Pixels no tile covers are NO_DATA
(value 0, variance inf).  The PSF is that of the tile covering most of the calexp,
carried onto the calexp grid; templates of neighbouring tiles share their inputs, so
their PSFs differ little.
"""

from __future__ import annotations

import numpy as np

from archive.errors import ValidationError
from archive.image.exposure import Exposure, ExposureInfo
from archive.process.coadd import match_backgrounds
from archive.process.warp import WarpConfig, footprint_bbox, warp_exposure


def template_on_grid(calexp: Exposure, templates: list[Exposure], config: WarpConfig | None = None) -> Exposure:
    """The templates joined on ``calexp``'s grid (see the module docstring); the result has
    the calexp's shape and WCS, and ``info.extras["template"]["coverage"]`` the fraction of
    its pixels covered."""
    if calexp.wcs is None:
        raise ValidationError("template_on_grid: the calexp has no WCS")
    ny, nx = calexp.shape
    num = np.zeros((ny, nx), np.float64)
    wsum = np.zeros((ny, nx), np.float64)
    mask = np.zeros((ny, nx), np.int32)
    planes = dict(calexp.mask_planes)
    no_data = np.int32(1 << planes["NO_DATA"])
    psf, best = None, -1
    used = []
    warped = []
    for t in templates:
        bb = footprint_bbox(t, calexp.wcs, (ny, nx))
        if bb is not None:
            warped.append(warp_exposure(t, calexp.wcs, (ny, nx), bb, config))
    # tiles are coadded independently: their backgrounds may differ by a little, which would
    # show in the difference as steps at the tile borders; align them in their overlaps
    offsets = match_backgrounds(warped) if len(warped) > 1 else np.zeros(len(warped))
    for w, off in zip(warped, offsets):
        x0, y0 = w.xy0
        w.image = (w.image - np.float32(off)).astype(np.float32)
        sl = (slice(y0, y0 + w.shape[0]), slice(x0, x0 + w.shape[1]))
        ok = np.isfinite(w.variance) & (w.variance > 0) & ((w.mask & (1 << w.mask_planes["NO_DATA"])) == 0)
        weight = np.where(ok, 1.0 / np.where(ok, w.variance, 1.0), 0.0)
        num[sl] += weight * np.where(ok, w.image, 0.0)
        wsum[sl] += weight
        # mask bits of the covering tiles, translated to the calexp's layout
        for name, bit in w.mask_planes.items():
            if name in planes and name != "NO_DATA":
                mask[sl] |= np.where(ok & ((w.mask & (1 << bit)) != 0), np.int32(1 << planes[name]), 0)
        cover = int(ok.sum())
        used.append(cover)
        if cover > best and w.psf is not None:
            psf, best = w.psf.shifted(-x0, -y0), cover
    has = wsum > 0
    image = np.where(has, num / np.where(has, wsum, 1.0), 0.0).astype(np.float32)
    variance = np.where(has, 1.0 / np.where(has, wsum, 1.0), np.inf).astype(np.float32)
    mask[~has] |= no_data
    info = ExposureInfo(band=calexp.info.band)
    info.extras = {"template": {"tiles": len(used), "coverage": float(has.mean()),
                                "tile_offsets": [float(o) for o in offsets]}}
    return Exposure(image, mask, variance, wcs=calexp.wcs.deepcopy(), psf=psf, photo_calib=calexp.photo_calib,
                    info=info, mask_planes=planes)
