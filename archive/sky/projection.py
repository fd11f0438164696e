"""The gnomonic (TAN) projection: sky positions to standard coordinates on a tangent plane and back.

Used wherever the archive works on a small patch of sky as if it were flat:
astrometric fits, footprint overlaps, sky tiles.  All angles in degrees.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def gnomonic(ra: ArrayLike, dec: ArrayLike, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Standard coordinates (xi, eta) in degrees of (ra, dec) about the tangent point (ra0, dec0).

    xi grows to the east, eta to the north.  Points 90 degrees or more from the
    tangent point have no projection: they come back as NaN.
    """
    a, d = np.deg2rad(np.asarray(ra, float)), np.deg2rad(np.asarray(dec, float))
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    cd = np.cos(d)
    den = np.sin(d) * np.sin(d0) + cd * np.cos(d0) * np.cos(a - a0)
    with np.errstate(invalid="ignore", divide="ignore"):
        den = np.where(den > 0, den, np.nan)
        xi = cd * np.sin(a - a0) / den
        eta = (np.sin(d) * np.cos(d0) - cd * np.sin(d0) * np.cos(a - a0)) / den
    return np.rad2deg(xi), np.rad2deg(eta)


def inverse_gnomonic(xi: ArrayLike, eta: ArrayLike, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees, ra in [0, 360), of standard coordinates (xi, eta) in degrees."""
    x, y = np.deg2rad(np.asarray(xi, float)), np.deg2rad(np.asarray(eta, float))
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    rho = np.hypot(x, y)
    c = np.arctan(rho)
    with np.errstate(invalid="ignore", divide="ignore"):
        dec = np.arcsin(np.cos(c) * np.sin(d0) + np.where(rho > 0, y * np.sin(c) * np.cos(d0) / rho, 0.0))
        ra = a0 + np.arctan2(x * np.sin(c), rho * np.cos(d0) * np.cos(c) - y * np.sin(d0) * np.sin(c))
    return np.mod(np.rad2deg(ra), 360.0), np.rad2deg(dec)
