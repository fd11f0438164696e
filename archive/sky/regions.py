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
    radec_to_healpix29,
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
MAX_COVER_PIXELS: int = 10_000_000

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

    @abstractmethod
    def area_sr(self) -> float:
        """Solid angle of the region in steradians."""

    def area_deg2(self) -> float:
        """Solid angle of the region in square degrees."""
        return self.area_sr() * (180.0 / math.pi) ** 2

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
        # Every pixel of the covering is needed to tile the area: fail fast.
        at_least = self.area_sr() / (4.0 * math.pi / (12 << (2 * o)))
        if at_least > MAX_COVER_PIXELS:
            raise ValidationError(
                f"{self!r}: covering at order {o} needs at least {at_least:.3g} pixels "
                f"(limit {MAX_COVER_PIXELS}); use a coarser order, e.g. {self.default_order()}"
            )
        pix = np.arange(12, dtype=np.int64)
        for level in range(o + 1):
            if level > 0:
                pix = (pix[:, None] * 4 + np.arange(4, dtype=np.int64)).ravel()
                if pix.size > MAX_COVER_PIXELS:
                    raise ValidationError(
                        f"{self!r}: covering at order {o} needs more than {MAX_COVER_PIXELS} "
                        f"pixels (at order {level}); use a coarser order, e.g. {self.default_order()}"
                    )
            vec = np.column_stack(hp.pix2vec(1 << level, pix, nest=True))
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
        # Compare chord lengths |c - c0| = 2 sin(angle / 2): the vector difference
        # is accurate at every scale (no 1 - cos cancellation) and needs no trig.
        reach = self._radius_rad + radius_rad
        if reach >= math.pi:
            return np.ones(len(vec), dtype=bool)
        d = vec - self._vec
        return np.einsum("ij,ij->i", d, d) <= (2.0 * math.sin(0.5 * reach)) ** 2

    def size_deg(self) -> float:
        return self.radius_deg

    def area_sr(self) -> float:
        return 4.0 * math.pi * math.sin(self._radius_rad / 2.0) ** 2  # = 2 pi (1 - cos r)


class Box(Region):
    """RA/Dec box: ``ra_min <= ra <= ra_max`` (wrapping) and ``dec_min <= dec <= dec_max``, degrees.

    Constant-RA edges are meridians (great circles), constant-Dec edges are
    parallels (small circles). ``ra_min > ra_max`` (after wrapping both into
    [0, 360)) means the box runs through RA 0/360, e.g. ``Box(350, 10, ...)`` is
    20 degrees wide. ``ra_max - ra_min == 360`` (e.g. ``Box(0, 360, ...)``) is the
    full circle; ``ra_min == ra_max`` is a single meridian. A box whose Dec range
    reaches +90 or -90 contains that pole (where RA is undefined). Bounds are
    inclusive.
    """

    def __init__(self, ra_min: float, ra_max: float, dec_min: float, dec_max: float):
        r0 = _check_scalar(ra_min, "ra_min", "Box")
        r1 = _check_scalar(ra_max, "ra_max", "Box")
        d0 = _check_scalar(dec_min, "dec_min", "Box")
        d1 = _check_scalar(dec_max, "dec_max", "Box")
        for name, d in (("dec_min", d0), ("dec_max", d1)):
            if not -90.0 <= d <= 90.0:
                raise ValidationError(f"Box: {name} must be within [-90, 90] degrees, got {d!r}")
        if d0 > d1:
            raise ValidationError(f"Box: dec_min ({d0!r}) must not exceed dec_max ({d1!r})")
        if r1 - r0 >= 360.0:
            width = 360.0
        else:
            width = (r1 - r0) % 360.0
        self.ra_min = r0 % 360.0
        self.ra_max = (self.ra_min + width) % 360.0 if width < 360.0 else self.ra_min
        self.ra_width = width
        self.dec_min = d0
        self.dec_max = d1
        self._full_ra = width >= 360.0
        # Lune(s) of width <= 180 whose union is the RA range; each lune is the
        # intersection of two hemispheres {x : n . x >= 0}.
        if self._full_ra:
            pieces: list[tuple[float, float]] = []
        elif width <= 180.0:
            pieces = [(self.ra_min, width)]
        else:
            pieces = [(self.ra_min, width / 2.0), (self.ra_min + width / 2.0, width / 2.0)]
        self._lunes = []
        for a0_deg, w_deg in pieces:
            a0 = math.radians(a0_deg)
            a1 = math.radians(a0_deg + w_deg)
            n_start = np.array([-math.sin(a0), math.cos(a0), 0.0])  # n.x = cos(dec) sin(ra - a0)
            n_end = np.array([math.sin(a1), -math.cos(a1), 0.0])  # n.x = cos(dec) sin(a1 - ra)
            self._lunes.append(np.stack([n_start, n_end]))

    def __repr__(self) -> str:
        return (
            f"Box(ra_min={self.ra_min!r}, "
            f"ra_max={self.ra_min + 360.0 if self._full_ra else self.ra_max!r}, "
            f"dec_min={self.dec_min!r}, dec_max={self.dec_max!r})"
        )

    def contains(self, ra: ArrayLike, dec: ArrayLike) -> np.ndarray:
        """True inside the box (bounds inclusive; a pole inside the Dec range is inside)."""
        ra_w, dec_a = validate_radec(ra, dec, "Box.contains")
        in_dec = (dec_a >= self.dec_min) & (dec_a <= self.dec_max)
        if self._full_ra:
            return in_dec
        in_ra = np.mod(ra_w - self.ra_min, 360.0) <= self.ra_width
        return in_dec & (in_ra | (np.abs(dec_a) == 90.0))

    def _may_touch(self, vec: np.ndarray, radius_rad: float) -> np.ndarray:
        # Dec range of a disc is exactly [dec_c - r, dec_c + r] (clipped at the poles).
        dec_c = np.arctan2(vec[:, 2], np.hypot(vec[:, 0], vec[:, 1]))
        ok = (dec_c - radius_rad <= math.radians(self.dec_max)) & (
            dec_c + radius_rad >= math.radians(self.dec_min)
        )
        if self._full_ra:
            return ok
        # A disc touches a hemisphere {n.x >= 0} iff n.c >= -sin(r); requiring it
        # for both hemispheres of a lune is necessary (hence conservative).
        s = -math.sin(min(radius_rad, math.pi / 2))
        in_lune = np.zeros(len(vec), dtype=bool)
        for normals in self._lunes:
            d = vec @ normals.T
            in_lune |= (d[:, 0] >= s) & (d[:, 1] >= s)
        return ok & in_lune

    def size_deg(self) -> float:
        half_dec = 0.5 * (self.dec_max - self.dec_min)
        if self.dec_min <= 0.0 <= self.dec_max:
            cos_max = 1.0
        else:
            cos_max = math.cos(math.radians(min(abs(self.dec_min), abs(self.dec_max))))
        rect = max(half_dec, 0.5 * self.ra_width * cos_max)
        # A box touching a pole lies in the polar cap of radius 90 - |dec| of its other edge.
        return min(rect, 90.0 + self.dec_max, 90.0 - self.dec_min)

    def area_sr(self) -> float:
        d0, d1 = math.radians(self.dec_min), math.radians(self.dec_max)
        # sin(d1) - sin(d0) written without cancellation for thin boxes
        dsin = 2.0 * math.cos(0.5 * (d1 + d0)) * math.sin(0.5 * (d1 - d0))
        return math.radians(self.ra_width) * dsin


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class Polygon(Region):
    """Convex spherical polygon with great-circle edges; vertices (degrees) in order.

    Either orientation is accepted. Each edge is the shorter great-circle arc
    between consecutive vertices (the last vertex joins the first; a repeated
    closing vertex is dropped). Only convex polygons (every vertex on the inner
    side of every edge's great circle, winding once) are accepted; anything else
    raises :class:`~archive.errors.ValidationError`. A convex polygon lies within
    a hemisphere. Points on an edge are inside (up to float rounding).
    """

    def __init__(self, ra: Sequence[float], dec: Sequence[float]):
        ra_a = np.atleast_1d(np.asarray(ra, dtype=np.float64))
        dec_a = np.atleast_1d(np.asarray(dec, dtype=np.float64))
        if ra_a.ndim != 1 or ra_a.shape != dec_a.shape:
            raise ValidationError(
                f"Polygon: ra and dec must be 1-D sequences of equal length, got shapes "
                f"{ra_a.shape} and {dec_a.shape}"
            )
        ra_w, dec_w = validate_radec(ra_a, dec_a, "Polygon vertices")
        v = radec_to_vec(ra_w, dec_w)
        if len(v) >= 2 and np.allclose(v[0], v[-1], rtol=0.0, atol=1e-15):
            v, ra_w, dec_w = v[:-1], ra_w[:-1], dec_w[:-1]
        n = len(v)
        if n < 3:
            raise ValidationError(f"Polygon: needs at least 3 distinct vertices, got {n}")
        nxt = np.roll(v, -1, axis=0)
        # (a - b) x (a + b) = 2 a x b, with the difference taken first for accuracy.
        cross = np.cross(v - nxt, v + nxt)
        norm = np.linalg.norm(cross, axis=1)
        dots = np.einsum("ij,ij->i", v, nxt)
        bad = (norm < 1e-15) | (dots < -1.0 + 1e-12)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValidationError(
                f"Polygon: edge {i} from vertex {i} to vertex {(i + 1) % n} is degenerate "
                "(repeated or antipodal vertices)"
            )
        normals = cross / norm[:, None]
        side = normals @ v.T  # side[i, j]: vertex j relative to edge i
        tol = 1e-14
        if np.all(side >= -tol):
            pass
        elif np.all(side <= tol):
            normals = -normals  # clockwise: flip so that inside is n.x >= 0
            side = -side
        else:
            raise ValidationError(
                "Polygon: vertices do not form a convex polygon (some vertex lies outside "
                "the great circle of an edge); split it into convex pieces"
            )
        centre = v.sum(axis=0)
        if np.linalg.norm(centre) < 1e-12 or not np.all(side.sum(axis=1) > tol):
            raise ValidationError("Polygon: degenerate (all vertices on one great circle or spanning a hemisphere)")
        centre = _unit(centre)
        # Winding: the angle swept around the centre must be exactly one turn.
        e1 = _unit(np.cross(centre, [0.0, 0.0, 1.0]) if abs(centre[2]) < 0.9 else np.cross(centre, [1.0, 0.0, 0.0]))
        e2 = np.cross(centre, e1)
        ang = np.arctan2(v @ e2, v @ e1)
        turn = np.sum(np.angle(np.exp(1j * (np.roll(ang, -1) - ang))))
        if not abs(abs(turn) - 2 * math.pi) < 1e-6:
            raise ValidationError(
                f"Polygon: the vertices wind {abs(turn) / (2 * math.pi):.2f} times around the "
                "centre; a simple convex polygon winds once"
            )
        self.ra = ra_w
        self.dec = dec_w
        self._normals = normals
        self._centre = centre
        self._vertices = v

    def __repr__(self) -> str:
        pts = ", ".join(f"({a:.8g}, {d:.8g})" for a, d in zip(self.ra, self.dec))
        return f"Polygon([{pts}])"

    def contains(self, ra: ArrayLike, dec: ArrayLike) -> np.ndarray:
        """True where the position is on the inner side of every edge's great circle."""
        ra_w, dec_a = validate_radec(ra, dec, "Polygon.contains")
        x = radec_to_vec(ra_w, dec_a)
        return np.all(x @ self._normals.T >= 0.0, axis=-1)

    def _may_touch(self, vec: np.ndarray, radius_rad: float) -> np.ndarray:
        # Disc touches polygon => disc touches every edge hemisphere (n.c >= -sin r).
        s = -math.sin(min(radius_rad, math.pi / 2))
        return np.all(vec @ self._normals.T >= s, axis=-1)

    def size_deg(self) -> float:
        return float(np.degrees(_angle_between(self._vertices, self._centre).max()))

    def area_sr(self) -> float:
        # Girard: area = 2 pi - sum of exterior (turning) angles, the angles between
        # consecutive edge normals.
        n0, n1 = np.roll(self._normals, 1, axis=0), self._normals
        turn = np.arctan2(np.linalg.norm(np.cross(n0, n1), axis=1), np.einsum("ij,ij->i", n0, n1))
        return float(max(2.0 * math.pi - turn.sum(), 0.0))


class PixelSet:
    """The union of nested HEALPix pixels at one order (e.g. a batch's footprint plus a margin).

    Duck-types the region interface the stores use (``pixel_ranges``,
    ``default_order``, ``contains``).
    """

    def __init__(self, order: int, pixels: ArrayLike):
        self.order = check_order(order)
        self.pixels = np.unique(np.asarray(pixels, dtype=np.int64))

    @classmethod
    def around(cls, ra: ArrayLike, dec: ArrayLike, order: int) -> PixelSet:
        """Pixels holding the positions and all their neighbours: every point within
        one pixel size of a position is inside."""
        o = check_order(order)
        pix = np.unique(hp.ang2pix(1 << o, np.asarray(ra, float), np.asarray(dec, float),
                                   nest=True, lonlat=True))
        neigh = hp.get_all_neighbours(1 << o, pix, nest=True).ravel()
        return cls(o, np.concatenate([pix, neigh[neigh >= 0]]))

    def __repr__(self) -> str:
        return f"PixelSet(order={self.order}, n={self.pixels.size})"

    def default_order(self) -> int:
        return self.order

    def pixels_at(self, order: int) -> np.ndarray:
        """The sorted unique pixels at ``order`` that cover this set exactly or more:
        the ancestors when ``order`` is coarser, all descendants when it is finer."""
        shift = 2 * (self.order - check_order(order))
        if shift >= 0:
            return np.unique(self.pixels >> shift)
        children = np.arange(1 << -shift, dtype=np.int64)
        return ((self.pixels << -shift)[:, None] + children[None, :]).ravel()

    def pixel_ranges(self, order: int | None = None) -> np.ndarray:
        return pixels_to_ranges(self.pixels, self.order)

    def contains(self, ra: ArrayLike, dec: ArrayLike) -> np.ndarray:
        h = radec_to_healpix29(ra, dec) >> (2 * (ORDER_MAX - self.order))
        return np.isin(h, self.pixels)
