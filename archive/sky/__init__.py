"""Sky geometry: HEALPix indexing, regions to index ranges, sky tiles. Pure.

* :mod:`archive.sky.healpix` -- ``healpix29`` (nested order 29, HATS ``_healpix_29``
  convention), partition pixels, angular separation.
* :mod:`archive.sky.regions` -- :class:`Cone`, :class:`Box`, convex
  :class:`Polygon`: exact ``contains`` and conservative ``pixel_ranges`` (sorted,
  merged half-open order-29 ranges) that never lose a point; ``ranges_contain``.
"""

from archive.sky.healpix import (
    ORDER_MAX,
    angular_separation_deg,
    healpix29_to_radec,
    partition_pixel,
    radec_to_healpix29,
)
from archive.sky.regions import Box, Cone, Polygon, Region, ranges_contain

__all__ = [
    "ORDER_MAX",
    "angular_separation_deg",
    "healpix29_to_radec",
    "partition_pixel",
    "radec_to_healpix29",
    "Region",
    "Cone",
    "Box",
    "Polygon",
    "ranges_contain",
]
