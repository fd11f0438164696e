"""The skymap: sky tiles on which warps, coadds and templates live.

A tile is a TAN (gnomonic) pixel grid centred on the centre of a nested HEALPix
pixel of order ``order``, north up, east left, with square pixels of
``pixel_scale_arcsec``.  Its grid covers the HEALPix pixel plus ``overlap_arcsec``
on every side, so neighbouring tiles overlap and a source near a tile border
lies whole on at least one tile.  The tile id is the HEALPix pixel number (at
the skymap's order); a skymap is fully described by its three numbers, which
every tile product records.

Every point of the sky lies in the *core* (its HEALPix pixel) of exactly one
tile; :meth:`SkyMap.tiles_for` lists the tiles whose cores meet a footprint,
which together cover it.
"""

from __future__ import annotations

import dataclasses
import math

import healpy as hp
import numpy as np
from astropy.wcs import WCS
from numpy.typing import ArrayLike

from archive.errors import ValidationError
from archive.sky.healpix import check_order, radec_to_vec, vec_to_radec
from archive.sky.projection import gnomonic


@dataclasses.dataclass(frozen=True)
class Tile:
    """One sky tile: its id (HEALPix pixel at the skymap order), centre (deg), WCS and shape."""

    tile_id: int
    ra: float
    dec: float
    wcs: WCS
    shape: tuple[int, int]  # (ny, nx)

    def contains(self, ra: ArrayLike, dec: ArrayLike) -> np.ndarray:
        """Whether positions (deg) fall on the tile's pixel grid."""
        x, y = self.wcs.all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
        ny, nx = self.shape
        return (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)


@dataclasses.dataclass(frozen=True)
class SkyMap:
    """Tiles centred on nested HEALPix pixels of ``order`` (see the module docstring).

    order: HEALPix order of the tile centres (order 9: pixels of ~6.9', tiles of
    ~2,100 px at 0.2"/px); pixel_scale_arcsec: tile pixel size; overlap_arcsec:
    margin added beyond the HEALPix pixel on every side."""

    order: int = 9
    pixel_scale_arcsec: float = 0.2
    overlap_arcsec: float = 10.0

    def __post_init__(self) -> None:
        check_order(self.order)
        if not self.pixel_scale_arcsec > 0:
            raise ValidationError(f"skymap pixel_scale_arcsec must be positive, got {self.pixel_scale_arcsec}")
        if not self.overlap_arcsec >= 0:
            raise ValidationError(f"skymap overlap_arcsec must be >= 0, got {self.overlap_arcsec}")

    @property
    def nside(self) -> int:
        return 1 << self.order

    def tile(self, tile_id: int) -> Tile:
        """The tile centred on HEALPix pixel ``tile_id``."""
        tid = int(tile_id)
        if not 0 <= tid < hp.nside2npix(self.nside):
            raise ValidationError(f"tile id {tid} is not a HEALPix pixel of order {self.order}")
        ra0, dec0 = (float(v) for v in hp.pix2ang(self.nside, tid, nest=True, lonlat=True))
        # the pixel's boundary, projected about its centre: the grid must hold it plus the overlap
        bnd = hp.boundaries(self.nside, tid, step=8, nest=True)
        bra = np.degrees(np.arctan2(bnd[1], bnd[0])) % 360.0
        bdec = np.degrees(np.arcsin(np.clip(bnd[2], -1, 1)))
        xi, eta = gnomonic(bra, bdec, ra0, dec0)
        scale = self.pixel_scale_arcsec / 3600.0
        half = (np.nanmax(np.abs(np.concatenate([xi, eta]))) + self.overlap_arcsec / 3600.0) / scale
        n = 2 * int(math.ceil(half)) + 1  # odd: the centre falls on a pixel centre
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [ra0, dec0]
        w.wcs.crpix = [(n + 1) / 2.0, (n + 1) / 2.0]  # FITS is 1-based: the central pixel
        w.wcs.cdelt = [-scale, scale]
        w.wcs.cunit = ["deg", "deg"]
        return Tile(tid, ra0, dec0, w, (n, n))

    def tile_of(self, ra: ArrayLike, dec: ArrayLike) -> np.ndarray:
        """Tile ids whose core holds the positions (deg)."""
        return hp.ang2pix(self.nside, np.asarray(ra, float), np.asarray(dec, float), nest=True, lonlat=True)

    def tiles_for(self, corners: ArrayLike) -> list[int]:
        """Tiles whose cores meet a convex footprint given by its corners ([ra, dec] deg,
        in order around the polygon): together they cover the footprint."""
        c = np.asarray(corners, float)
        if c.ndim != 2 or c.shape[1] != 2 or len(c) < 3:
            raise ValidationError("tiles_for: corners must be an (n >= 3, 2) array of [ra, dec] in degrees")
        vec = radec_to_vec(c[:, 0], c[:, 1])
        try:
            pix = hp.query_polygon(self.nside, vec, inclusive=True, nest=True)
        except (ValueError, RuntimeError):  # healpy wants counter-clockwise vertices
            pix = hp.query_polygon(self.nside, vec[::-1], inclusive=True, nest=True)
        # inclusive query over-covers by up to a pixel: keep pixels holding a point of the
        # footprint, sampled finer than the overlap (a sliver missed lies on a neighbour's margin)
        inside = set(self.tile_of(c[:, 0], c[:, 1]).tolist())
        grid = _polygon_samples(c, 32)
        inside |= set(self.tile_of(grid[:, 0], grid[:, 1]).tolist())
        return sorted(int(p) for p in pix if p in inside)

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def _polygon_samples(corners: np.ndarray, n: int) -> np.ndarray:
    """Points spread over a convex sky polygon (its corners, edges and interior), [ra, dec] deg."""
    vec = radec_to_vec(corners[:, 0], corners[:, 1])
    centre = vec.mean(axis=0)
    pts = []
    s = np.linspace(0, 1, n, endpoint=False)[:, None, None]
    t = np.linspace(0, 1, n)[None, :, None]
    for a, b in zip(vec, np.roll(vec, -1, axis=0)):
        edge = a * (1 - s) + b * s
        pts.append((edge * (1 - t) + centre * t).reshape(-1, 3))
    return np.column_stack(vec_to_radec(np.concatenate(pts)))
