"""Joining the template tiles that cover a calexp: a tile's EDGE pixels (its warp's kernel
reached past the tile; biased) are used only where no other tile covers the place."""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS

from archive.image.exposure import Exposure, ExposureInfo
from archive.image.psf import GaussianPSF
from archive.process.diffim.template import join_templates


def _wcs(ny: int, nx: int, row0: int = 0) -> WCS:
    """A TAN grid of 0.2"/px whose pixel (x, y) is the calexp's pixel (x, y + row0)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [40.5, 40.5 - row0]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


def test_edge_pixels_of_one_tile_give_way_to_another_tile():
    yy, xx = np.mgrid[0:80, 0:80]
    sky = (100.0 + 0.5 * xx + 0.3 * yy).astype(np.float32)  # the true template on the calexp grid
    calexp = Exposure(np.zeros((80, 80), np.float32), variance=np.ones((80, 80), np.float32), wcs=_wcs(80, 80),
                      psf=GaussianPSF(fwhm=3.0), info=ExposureInfo(band="r"))
    tiles = []
    for row0, rows in ((0, 60), (30, 50)):  # tile A: calexp rows 0-59; tile B: rows 30-79
        t = Exposure(sky[row0:row0 + rows].copy(), variance=np.full((rows, 80), 4.0, np.float32),
                     wcs=_wcs(rows, 80, row0), psf=GaussianPSF(fwhm=3.0), info=ExposureInfo(band="r"))
        tiles.append(t)
    b = tiles[1]
    b.image[:10] += 50.0  # B's first 10 rows (calexp rows 30-39) are biased and EDGE
    b.mask[:10] |= np.int32(b.get_plane_bitmask("EDGE"))
    j = join_templates(calexp, tiles).exposure
    edge = (j.mask & j.get_plane_bitmask("EDGE")) != 0
    inner = (slice(4, 76), slice(4, 76))  # away from the calexp's own border
    assert np.abs(j.image - sky)[inner].max() < 1e-2  # the biased rows of B gave way to A
    assert not edge[inner].any()  # every place had a tile away from its edge
