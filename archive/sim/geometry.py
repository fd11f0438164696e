"""Focal-plane layout, tangent-plane projections and the simulated WCSs.

Focal-plane pixel coordinates ``(X, Y)`` have their origin at the optical axis
(the pointing).  Detector ``d``'s pixel ``(x, y)`` (0-based, imaging section)
sits at ``(X, Y) = (x, y) + origin[d]``.  The true WCS of a detector is TAN
around the pointing with a radial cubic SIP distortion about the optical axis,
so all detectors share one distortion field.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.wcs import WCS, Sip

from archive.sim.config import SimConfig


def detector_origins(config: SimConfig) -> np.ndarray:
    """``(n_detectors, 2)`` focal-plane position (X, Y) of each detector's pixel (0, 0).

    Detectors form a grid of ``ceil(sqrt(n))`` columns, ``detector_gap`` pixels
    apart, centred on the optical axis.
    """
    n = config.n_detectors
    ncols = int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    pitch_x = config.nx + config.detector_gap
    pitch_y = config.ny + config.detector_gap
    out = np.empty((n, 2))
    for d in range(n):
        col, row = d % ncols, d // ncols
        cx = (col - (ncols - 1) / 2.0) * pitch_x
        cy = (row - (nrows - 1) / 2.0) * pitch_y
        out[d] = (cx - (config.nx - 1) / 2.0, cy - (config.ny - 1) / 2.0)
    return out


def focal_plane_radius(config: SimConfig) -> float:
    """Distance (pixels) from the optical axis to the farthest detector corner."""
    o = detector_origins(config)
    xs = np.concatenate([o[:, 0], o[:, 0] + config.nx - 1])
    ys = np.concatenate([o[:, 1], o[:, 1] + config.ny - 1])
    return float(math.hypot(np.abs(xs).max(), np.abs(ys).max()))


def focal_plane_half_size(config: SimConfig) -> tuple[float, float]:
    """Half extent (X, Y) of the detector mosaic in pixels."""
    o = detector_origins(config)
    return (float(np.abs(np.concatenate([o[:, 0], o[:, 0] + config.nx - 1])).max()),
            float(np.abs(np.concatenate([o[:, 1], o[:, 1] + config.ny - 1])).max()))


def tangent_to_sky(xi, eta, ra0: float, dec0: float):
    """Inverse gnomonic projection: standard coordinates (deg) -> (ra, dec) (deg)."""
    x = np.radians(np.asarray(xi, dtype=float))
    y = np.radians(np.asarray(eta, dtype=float))
    d0 = math.radians(dec0)
    denom = math.cos(d0) - y * math.sin(d0)
    ra = math.radians(ra0) + np.arctan2(x, denom)
    dec = np.arctan2(math.sin(d0) + y * math.cos(d0), np.hypot(x, denom))
    return np.mod(np.degrees(ra), 360.0), np.degrees(dec)


def sky_to_tangent(ra, dec, ra0: float, dec0: float):
    """Gnomonic projection: (ra, dec) (deg) -> standard coordinates (xi, eta) (deg)."""
    a = np.radians(np.asarray(ra, dtype=float)) - math.radians(ra0)
    d = np.radians(np.asarray(dec, dtype=float))
    d0 = math.radians(dec0)
    cosc = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a)
    xi = np.cos(d) * np.sin(a) / cosc
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a)) / cosc
    return np.degrees(xi), np.degrees(eta)


def sip_coefficient(config: SimConfig) -> float:
    """Radial cubic SIP coefficient ``k`` (1/pixel^2): shift ``k r^3`` = distortion_px at the mosaic corner."""
    r = focal_plane_radius(config)
    return config.distortion_px / r**3 if r > 0 else 0.0


def make_wcs(config: SimConfig, detector: int, ra: float, dec: float, rotation_deg: float,
             sip: bool = True) -> WCS:
    """TAN(-SIP) WCS of ``detector`` for a pointing (deg) and sky rotation (deg, east of north).

    ``sip=False`` gives the undistorted TAN WCS (as written in raw headers).
    """
    origin = detector_origins(config)[detector]
    th = math.radians(rotation_deg)
    s = config.pixel_scale / 3600.0
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(ra), float(dec)]
    # optical axis (X, Y) = (0, 0) -> detector pixel -origin (0-based) -> CRPIX is 1-based
    w.wcs.crpix = [float(-origin[0] + 1.0), float(-origin[1] + 1.0)]
    w.wcs.cd = np.array([[-s * math.cos(th), s * math.sin(th)], [s * math.sin(th), s * math.cos(th)]])
    w.wcs.radesys = "ICRS"
    if sip:
        k = sip_coefficient(config)
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        # radial: dx = k x (x^2 + y^2), dy = k y (x^2 + y^2) with (x, y) relative to CRPIX
        a[3, 0] = a[1, 2] = k
        b[0, 3] = b[2, 1] = k
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    w.pixel_shape = (config.nx, config.ny)
    return w
