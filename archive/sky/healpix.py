"""HEALPix indexing at order 29 (nested), the archive's positional index.

Every positional row carries ``healpix29``: the NESTED HEALPix pixel index at
order 29 (nside = 2**29) of its (ra, dec), the same convention as HATS
``_healpix_29`` (healpy / cdshealpix nested ordering). An order-29 pixel is about
0.39 milliarcsec across. The pixel of a row at a coarser order K is its ancestor,
``healpix29 >> 2*(29 - K)``.

Angles are in degrees throughout.
"""

from __future__ import annotations

import healpy as hp
import numpy as np
from numpy.typing import ArrayLike

from archive.errors import ValidationError

#: Finest HEALPix order; the order of the ``healpix29`` column.
ORDER_MAX: int = 29
#: nside of ORDER_MAX.
NSIDE_MAX: int = 1 << ORDER_MAX
#: Number of pixels at ORDER_MAX (exclusive upper bound of valid healpix29 values).
NPIX_MAX: int = 12 * NSIDE_MAX * NSIDE_MAX

__all__ = [
    "ORDER_MAX",
    "NSIDE_MAX",
    "NPIX_MAX",
    "radec_to_healpix29",
    "healpix29_to_radec",
    "partition_pixel",
    "angular_separation_deg",
    "validate_radec",
    "check_order",
]


def check_order(order: int, name: str = "order") -> int:
    """Return ``order`` as int after checking 0 <= order <= ORDER_MAX."""
    try:
        o = int(order)
    except (TypeError, ValueError):
        raise ValidationError(f"{name} must be an integer in [0, {ORDER_MAX}], got {order!r}") from None
    if o != order or not 0 <= o <= ORDER_MAX:
        raise ValidationError(f"{name} must be an integer in [0, {ORDER_MAX}], got {order!r}")
    return o


def validate_radec(ra: ArrayLike, dec: ArrayLike, what: str = "position") -> tuple[np.ndarray, np.ndarray]:
    """Check and normalise positions in degrees.

    Returns float64 arrays (broadcast to a common shape) with ra wrapped into
    [0, 360). Raises :class:`~archive.errors.ValidationError` (a ``ValueError``)
    naming the first offending index when ra or dec is not finite or dec lies
    outside [-90, 90].
    """
    ra_a = np.asarray(ra, dtype=np.float64)
    dec_a = np.asarray(dec, dtype=np.float64)
    try:
        ra_a, dec_a = np.broadcast_arrays(ra_a, dec_a)
    except ValueError:
        raise ValidationError(
            f"{what}: ra and dec have incompatible shapes {ra_a.shape} and {dec_a.shape}"
        ) from None
    bad_ra = ~np.isfinite(ra_a)
    if bad_ra.any():
        idx = np.argwhere(bad_ra)[0]
        i = tuple(int(v) for v in idx) if idx.size > 1 else (int(idx[0]) if idx.size else ())
        raise ValidationError(
            f"{what}: ra is not finite at index {i} (value {ra_a[bad_ra].flat[0]!r}); "
            f"{int(bad_ra.sum())} bad value(s) in all"
        )
    bad_dec = ~(np.isfinite(dec_a) & (dec_a >= -90.0) & (dec_a <= 90.0))
    if bad_dec.any():
        idx = np.argwhere(bad_dec)[0]
        i = tuple(int(v) for v in idx) if idx.size > 1 else (int(idx[0]) if idx.size else ())
        raise ValidationError(
            f"{what}: dec must be finite and within [-90, 90] degrees; index {i} has "
            f"{dec_a[bad_dec].flat[0]!r}; {int(bad_dec.sum())} bad value(s) in all"
        )
    ra_w = np.mod(ra_a, 360.0)
    # np.mod can return exactly 360.0 for tiny negative inputs; fold it back.
    ra_w = np.where(ra_w >= 360.0, 0.0, ra_w)
    return ra_w, dec_a


def radec_to_healpix29(ra: ArrayLike, dec: ArrayLike) -> np.ndarray:
    """Nested order-29 HEALPix index of positions (ra, dec) in degrees.

    Same convention as HATS ``_healpix_29``: ``healpy.ang2pix(2**29, ra, dec,
    nest=True, lonlat=True)``. ra is wrapped modulo 360. Returns int64 with the
    broadcast shape of the inputs. Raises ValidationError (a ValueError) naming
    the first offending index for non-finite input or dec outside [-90, 90].
    """
    ra_w, dec_a = validate_radec(ra, dec)
    pix = hp.ang2pix(NSIDE_MAX, ra_w, dec_a, nest=True, lonlat=True)
    return np.asarray(pix, dtype=np.int64)


def _check_pixels(h: ArrayLike, order: int, name: str) -> np.ndarray:
    arr = np.asarray(h)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValidationError(f"{name} must be integer HEALPix indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    npix = 12 << (2 * order)
    bad = (arr < 0) | (arr >= npix)
    if bad.any():
        i = int(np.argmax(bad.ravel()))
        raise ValidationError(
            f"{name}: index {i} holds {int(arr.ravel()[i])}, outside [0, {npix}) for order {order}"
        )
    return arr


def healpix29_to_radec(h: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Centres (ra, dec) in degrees of nested order-29 pixels ``h``; ra in [0, 360)."""
    arr = _check_pixels(h, ORDER_MAX, "healpix29")
    ra, dec = hp.pix2ang(NSIDE_MAX, arr, nest=True, lonlat=True)
    return np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)


def partition_pixel(healpix29: ArrayLike, order: int) -> np.ndarray:
    """Ancestor pixel at ``order`` (0..29) of nested order-29 indices: ``h >> 2*(29-order)``."""
    o = check_order(order)
    arr = _check_pixels(healpix29, ORDER_MAX, "healpix29")
    return np.right_shift(arr, 2 * (ORDER_MAX - o))


def angular_separation_deg(
    ra1: ArrayLike, dec1: ArrayLike, ra2: ArrayLike, dec2: ArrayLike
) -> np.ndarray:
    """Great-circle distance in degrees between (ra1, dec1) and (ra2, dec2), all degrees.

    Vincenty's formula (atan2 of the cross and dot products), accurate to
    floating-point precision at all separations, from sub-milliarcsecond to
    antipodal. Broadcasts its inputs. Does not validate ranges.
    """
    a1 = np.radians(np.asarray(ra1, dtype=np.float64))
    d1 = np.radians(np.asarray(dec1, dtype=np.float64))
    a2 = np.radians(np.asarray(ra2, dtype=np.float64))
    d2 = np.radians(np.asarray(dec2, dtype=np.float64))
    dra = a2 - a1
    sin_dra = np.sin(dra)
    cos_dra = np.cos(dra)
    sd1, cd1 = np.sin(d1), np.cos(d1)
    sd2, cd2 = np.sin(d2), np.cos(d2)
    num1 = cd2 * sin_dra
    num2 = cd1 * sd2 - sd1 * cd2 * cos_dra
    den = sd1 * sd2 + cd1 * cd2 * cos_dra
    return np.degrees(np.arctan2(np.hypot(num1, num2), den))


def radec_to_vec(ra: ArrayLike, dec: ArrayLike) -> np.ndarray:
    """Unit vectors, shape (..., 3), of (ra, dec) in degrees (no validation)."""
    a = np.radians(np.asarray(ra, dtype=np.float64))
    d = np.radians(np.asarray(dec, dtype=np.float64))
    cd = np.cos(d)
    return np.stack([cd * np.cos(a), cd * np.sin(a), np.sin(d)], axis=-1)


def vec_to_radec(v: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of vectors of shape (..., 3) (need not be unit); ra in [0, 360)."""
    v = np.asarray(v, dtype=np.float64)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    ra = np.mod(np.degrees(np.arctan2(y, x)), 360.0)
    ra = np.where(ra >= 360.0, 0.0, ra)
    dec = np.degrees(np.arctan2(z, np.hypot(x, y)))
    return ra, dec
