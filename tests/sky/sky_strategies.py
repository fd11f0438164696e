"""Hypothesis strategies and point generators for the region tests.

Centres are drawn uniformly, on HEALPix pixel corners and edge midpoints at
orders 0..20 (taken from ``healpy.boundaries``), at and near the poles, and
across RA 0/360. Test points are drawn uniformly around the region, just inside
and just outside its boundary, and on the edges and corners of the pixels of
the covering itself, which is where a covering would lose points.
"""

from __future__ import annotations

import healpy as hp
import numpy as np
from hypothesis import strategies as st

ARCSEC = 1.0 / 3600.0
#: Radii from 0.1 arcsec to 10 degrees, log-uniform.
LOG_RADIUS_MIN = np.log10(0.1 * ARCSEC)
LOG_RADIUS_MAX = np.log10(10.0)


def vec_to_radec(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(v, dtype=float)
    ra = np.mod(np.degrees(np.arctan2(v[..., 1], v[..., 0])), 360.0)
    ra = np.where(ra >= 360.0, 0.0, ra)
    dec = np.degrees(np.arctan2(v[..., 2], np.hypot(v[..., 0], v[..., 1])))
    return ra, np.clip(dec, -90.0, 90.0)


def offset(ra: float, dec: float, sep_deg: np.ndarray, pa_rad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points at angular distance ``sep_deg`` and position angle ``pa_rad`` from (ra, dec)."""
    d1, a1 = np.radians(dec), np.radians(ra)
    s = np.radians(np.asarray(sep_deg, dtype=float))
    pa = np.asarray(pa_rad, dtype=float)
    # Rotate in 3-D: east/north basis at the centre.
    c = np.array([np.cos(d1) * np.cos(a1), np.cos(d1) * np.sin(a1), np.sin(d1)])
    east = np.array([-np.sin(a1), np.cos(a1), 0.0])
    north = np.cross(c, east)
    direction = np.cos(pa)[:, None] * north + np.sin(pa)[:, None] * east
    v = np.cos(s)[:, None] * c + np.sin(s)[:, None] * direction
    return vec_to_radec(v)


@st.composite
def sky_points(draw) -> tuple[float, float]:
    """A position (ra, dec) in degrees, biased towards the hard places."""
    kind = draw(st.sampled_from(["uniform", "corner", "edge", "pole", "ra0"]))
    if kind == "uniform":
        ra = draw(st.floats(0.0, 360.0, exclude_max=True))
        dec = float(np.degrees(np.arcsin(draw(st.floats(-1.0, 1.0)))))
        return ra, dec
    if kind in ("corner", "edge"):
        order = draw(st.integers(0, 20))
        nside = 1 << order
        pix = draw(st.integers(0, 12 * nside * nside - 1))
        step = 1 if kind == "corner" else 2
        b = hp.boundaries(nside, pix, step=step, nest=True)  # (3, 4*step)
        k = draw(st.integers(0, 4 * step - 1))
        ra, dec = vec_to_radec(b[:, k])
        return float(ra), float(dec)
    if kind == "pole":
        sign = draw(st.sampled_from([1.0, -1.0]))
        away = draw(st.sampled_from([0.0, 1e-9, 1e-5, 0.01, 1.0]))
        ra = draw(st.floats(0.0, 360.0, exclude_max=True))
        return ra, sign * (90.0 - away)
    # ra0: just either side of RA 0/360
    ra = draw(st.sampled_from([0.0, 1e-10, 1e-6, 0.001, 359.999, 360.0 - 1e-6, 360.0 - 1e-10]))
    dec = float(np.degrees(np.arcsin(draw(st.floats(-1.0, 1.0)))))
    return ra, dec


radii_deg = st.floats(LOG_RADIUS_MIN, LOG_RADIUS_MAX).map(lambda x: float(10.0**x))


def uniform_around(rng, ra, dec, max_sep_deg, n):
    """n points uniform in area within ``max_sep_deg`` of (ra, dec)."""
    max_sep = min(max_sep_deg, 180.0)
    u = rng.uniform(np.cos(np.radians(max_sep)), 1.0, n)
    sep = np.degrees(np.arccos(u))
    return offset(ra, dec, sep, rng.uniform(0, 2 * np.pi, n))


def pixel_edge_points(ra: np.ndarray, dec: np.ndarray, order: int, step: int = 4, limit: int = 300):
    """Corners and edge points of the order-``order`` pixels holding the given positions."""
    nside = 1 << order
    pix = np.unique(hp.ang2pix(nside, ra, dec, nest=True, lonlat=True))[:limit]
    b = hp.boundaries(nside, pix, step=step, nest=True)  # (n, 3, 4*step) or (3, 4*step)
    if b.ndim == 2:
        b = b[None]
    v = np.transpose(b, (0, 2, 1)).reshape(-1, 3)
    return vec_to_radec(v)
