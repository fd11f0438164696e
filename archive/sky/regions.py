"""Sky regions (cone, box, convex polygon) and their HEALPix index ranges.

A region query runs in two steps:

1. ``region.pixel_ranges(order)`` gives sorted, merged, half-open ranges
   ``[lo, hi)`` of nested order-29 indices (``healpix29``) that together cover
   every point of the region. A database turns them into index-range scans;
   :func:`ranges_contain` applies them to arrays.
2. ``region.contains(ra, dec)`` is the exact geometric test applied to the
   candidates.

The covering is conservative by construction, so step 1 never loses a point that
step 2 accepts. It is computed by a hierarchical descent of the nested HEALPix
tree from order 0 to ``order``: a pixel is kept when the disc centred on its
centre with radius ``max_pixrad(order)`` (the largest centre-to-boundary
distance of any pixel at that order, as healpy computes it; checked by the tests)
enlarged by a safety margin could touch the region. Every pixel that holds a
point of the region passes that test at every order, so it is never pruned. The
tests use closed-form distances (atan2 of cross and dot products, signed
distances to great-circle planes), so they stay accurate at every order up to
29, where cosine-based tests (healpy's ``query_disc`` / ``query_polygon``
inclusive mode) lose precision. The margin, ``COVER_MARGIN_RAD`` (1e-11 rad,
2 microarcsec, 0.005 of an order-29 pixel) plus a relative 1e-6 of the pixel
radius, absorbs floating-point error in the tests and in the assignment of a
point lying on a pixel boundary to one side or the other.

Regions:

* :class:`Cone` -- centre and radius in degrees (``Cone.from_arcsec`` takes
  arcsec).
* :class:`Box` -- ``ra_min..ra_max`` x ``dec_min..dec_max``; edges of constant
  RA are great circles (meridians), edges of constant Dec are small circles
  (parallels). ``ra_min > ra_max`` wraps through RA 0/360; ``(0, 360)`` is the
  full circle. A box whose Dec range reaches +/-90 contains that pole.
* :class:`Polygon` -- vertices in order, great-circle edges (the shorter arc).
  Only CONVEX polygons are accepted (either orientation); a non-convex or
  self-intersecting vertex list raises :class:`~archive.errors.ValidationError`.
  Split a concave region into convex pieces and union the results.

All angles in degrees.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import healpy as hp
import numpy as np
from numpy.typing import ArrayLike

from archive.errors import ValidationError
from archive.sky.healpix import (
    ORDER_MAX,
    angular_separation_deg,
    check_order,
    radec_to_vec,
    validate_radec,
)

__all__ = [
    "Region",
    "Cone",
    "Box",
    "Polygon",
    "ranges_contain",
    "pixels_to_ranges",
    "COVER_MARGIN_RAD",
    "DEFAULT_ORDER_MAX",
    "MAX_COVER_PIXELS",
]

#: Absolute safety margin (radians) added to every pixel-vs-region test.
COVER_MARGIN_RAD: float = 1e-11
#: Finest order ``default_order`` picks (order 18 pixels are ~0.8 arcsec).
DEFAULT_ORDER_MAX: int = 18
#: Refuse coverings with more pixels than this at any level of the descent.
MAX_COVER_PIXELS: int = 20_000_000

#: Resolution (deg) of order-0 pixels: sqrt(4 pi / 12) in degrees.
_RESOL0_DEG = math.degrees(math.sqrt(4.0 * math.pi / 12.0))
#: Conservative radius (rad) of a pixel's bounding disc at each order.
_PIX_RADIUS = np.array(
    [hp.max_pixrad(1 << o) * (1.0 + 1e-6) + COVER_MARGIN_RAD for o in range(ORDER_MAX + 1)]
)


def pixels_to_ranges(pixels: ArrayLike, order: int) -> np.ndarray:
    """Nested pixels at ``order`` -> sorted, merged half-open order-29 ranges, shape (n, 2) int64."""
    o = check_order(order)
    pix = np.unique(np.asarray(pixels, dtype=np.int64))
    if pix.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    shift = 2 * (ORDER_MAX - o)
    # Start a new range wherever consecutive pixels are not adjacent.
    breaks = np.flatnonzero(np.diff(pix) != 1) + 1
    starts = np.concatenate(([pix[0]], pix[breaks]))
    ends = np.concatenate((pix[breaks - 1], [pix[-1]])) + 1
    return np.stack([starts << shift, ends << shift], axis=1).astype(np.int64)


def ranges_contain(ranges: ArrayLike, healpix29: ArrayLike) -> np.ndarray:
    """Boolean mask: which ``healpix29`` values lie in any half-open range of ``ranges``.

    ``ranges`` must be sorted and non-overlapping (as ``pixel_ranges`` returns).
    """
    r = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    h = np.asarray(healpix29, dtype=np.int64)
    if r.shape[0] == 0:
        return np.zeros(h.shape, dtype=bool)
    i = np.searchsorted(r[:, 0], h, side="right") - 1
    ok = i >= 0
    ic = np.where(ok, i, 0)
    return ok & (h < r[ic, 1])


def _angle_between(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Angle (rad) between unit vectors u (..., 3) and v (3,) via atan2(|u x v|, u.v)."""
    cross = np.cross(u, v)
    return np.arctan2(np.linalg.norm(cross, axis=-1), u @ v)


def _order_for_size(size_deg: float) -> int:
    """Coarse order whose pixels are about half of ``size_deg`` (a region radius)."""
    if not size_deg > 0:
        return DEFAULT_ORDER_MAX
    k = math.floor(math.log2(_RESOL0_DEG / size_deg)) + 1
    return int(min(max(k, 0), DEFAULT_ORDER_MAX))


class Region(ABC):
    """A region of the sky: exact membership test plus a conservative HEALPix covering."""

    @abstractmethod
    def contains(self, ra: ArrayLike, dec: ArrayLike) -> np.ndarray:
        """Boolean array: which positions (degrees) lie in the region (boundary included)."""

    @abstractmethod
    def _may_touch(self, vec: np.ndarray, radius_rad: float) -> np.ndarray:
        """Conservative test: can the disc (centre ``vec`` (n, 3), radius) touch the region?

        Must be True whenever the disc intersects the region; may be True otherwise.
        """

    @abstractmethod
    def size_deg(self) -> float:
        """Characteristic radius of the region in degrees (to choose a coarse order)."""

    def default_order(self) -> int:
        """A coarse order with pixels about half the region's radius, in [0, DEFAULT_ORDER_MAX].

        Gives a few to a few dozen merged ranges for any region size; regions
        above ~60 degrees use order 0 (at most 12 pixels), regions below ~1
        arcsec use order 18 (0.8 arcsec pixels).
        """
        return _order_for_size(self.size_deg())

    def pixels(self, order: int) -> np.ndarray:
        """Sorted nested pixel indices at ``order`` whose area may intersect the region."""
        o = check_order(order)
        cache = self.__dict__.setdefault("_pixel_cache", {})
        if o in cache:
            return cache[o]
        pix = np.arange(12, dtype=np.int64)
        for level in range(o + 1):
            if level > 0:
                pix = (pix[:, None] * 4 + np.arange(4, dtype=np.int64)).ravel()
                if pix.size > MAX_COVER_PIXELS:
                    raise ValidationError(
                        f"{self!r}: covering at order {o} needs more than {MAX_COVER_PIXELS} "
                        f"pixels (at order {level}); use a coarser order, e.g. {self.default_order()}"
                    )
            x, y, z = hp.pix2vec(1 << level, pix, nest=True)
            vec = np.stack([x, y, z], axis=-1)
            pix = pix[self._may_touch(vec, float(_PIX_RADIUS[level]))]
            if pix.size == 0:
                break
        pix = np.sort(pix)
        cache[o] = pix
        return pix

    def pixel_ranges(self, order: int | None = None) -> np.ndarray:
        """Sorted, merged, half-open ``[lo, hi)`` order-29 index ranges covering the region.

        Every position whose ``contains`` is True has its ``healpix29`` inside one
        of the ranges. ``order`` (default :meth:`default_order`) is the coarse
        order of the covering; each range boundary is a multiple of
        ``4**(29 - order)``. Shape (n, 2), int64.
        """
        o = self.default_order() if order is None else check_order(order)
        return pixels_to_ranges(self.pixels(o), o)


def _check_scalar(value: float, name: str, region: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValidationError(f"{region}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValidationError(f"{region}: {name} must be finite, got {value!r}")
    return v


class Cone(Region):
    """Disc of angular radius ``radius_deg`` around (``ra``, ``dec``), all degrees."""

    def __init__(self, ra: float, dec: float, radius_deg: float):
        ra_v = _check_scalar(ra, "ra", "Cone")
        dec_v = _check_scalar(dec, "dec", "Cone")
        r = _check_scalar(radius_deg, "radius_deg", "Cone")
        if not -90.0 <= dec_v <= 90.0:
            raise ValidationError(f"Cone: dec must be within [-90, 90] degrees, got {dec_v!r}")
        if not 0.0 <= r <= 180.0:
            raise ValidationError(f"Cone: radius_deg must be within [0, 180], got {r!r}")
        self.ra = ra_v % 360.0
        self.dec = dec_v
        self.radius_deg = r
        self._vec = radec_to_vec(self.ra, self.dec)
        self._radius_rad = math.radians(r)

    @classmethod
    def from_arcsec(cls, ra: float, dec: float, radius_arcsec: float) -> Cone:
        """Cone with its radius in arcsec (centre in degrees)."""
        return cls(ra, dec, _check_scalar(radius_arcsec, "radius_arcsec", "Cone") / 3600.0)

    def __repr__(self) -> str:
        return f"Cone(ra={self.ra!r}, dec={self.dec!r}, radius_deg={self.radius_deg!r})"

    def contains(self, ra: ArrayLike, dec: ArrayLike) -> np.ndarray:
        """True where the angular distance to the centre is <= radius (degrees)."""
        ra_w, dec_a = validate_radec(ra, dec, "Cone.contains")
        return angular_separation_deg(ra_w, dec_a, self.ra, self.dec) <= self.radius_deg

    def _may_touch(self, vec: np.ndarray, radius_rad: float) -> np.ndarray:
        return _angle_between(vec, self._vec) <= self._radius_rad + radius_rad

    def size_deg(self) -> float:
        return self.radius_deg
