"""Named mask bit planes.

A mask image is ``int32``; every pixel is the OR of ``1 << bit`` for the planes
that apply to it.  The mapping *plane name -> bit number* travels with the
exposure (``Exposure.mask_planes``) and is written into the mask HDU header as
``MP_<NAME> = <bit>`` cards, so any FITS reader can decode the mask.

Default planes (bit numbers):

======================  ===  =====================================================
BAD                      0   bad detector pixel (hot, dead, bad column)
SAT                      1   saturated (or bled into by a saturated neighbour)
CR                       2   cosmic ray
EDGE                     3   too close to the image edge to measure
NO_DATA                  4   no data (outside the detector / no inputs in a coadd)
INTRP                    5   value interpolated over
DETECTED                 6   inside a positive detection footprint
CLIPPED                  7   rejected as an artifact when coadding
STREAK                   8   satellite / aircraft streak
SUSPECT                  9   near saturation or otherwise doubtful
DETECTED_NEGATIVE       10   inside a negative detection footprint
======================  ===  =====================================================
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import numpy as np
from astropy.io import fits

from archive.errors import ValidationError

BAD = 0
SAT = 1
CR = 2
EDGE = 3
NO_DATA = 4
INTRP = 5
DETECTED = 6
CLIPPED = 7
STREAK = 8
SUSPECT = 9
DETECTED_NEGATIVE = 10

#: Default plane name -> bit number.  Copy it (``dict(DEFAULT_MASK_PLANES)``) before adding planes.
DEFAULT_MASK_PLANES: dict[str, int] = {
    "BAD": BAD,
    "SAT": SAT,
    "CR": CR,
    "EDGE": EDGE,
    "NO_DATA": NO_DATA,
    "INTRP": INTRP,
    "DETECTED": DETECTED,
    "CLIPPED": CLIPPED,
    "STREAK": STREAK,
    "SUSPECT": SUSPECT,
    "DETECTED_NEGATIVE": DETECTED_NEGATIVE,
}

#: Highest usable bit of an int32 mask (bit 31 is the sign bit; we leave it free).
MAX_BIT = 30

#: Header keyword prefix of the plane cards.
HEADER_PREFIX = "MP_"


def default_mask_planes() -> dict[str, int]:
    """A fresh, mutable copy of the default plane mapping."""
    return dict(DEFAULT_MASK_PLANES)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValidationError(f"mask plane name must be a non-empty string, got {name!r}")
    up = name.upper()
    if not all(c.isalnum() or c == "_" for c in up):
        raise ValidationError(f"mask plane name {name!r} may only contain letters, digits and '_'")
    return up


def bits(mask_planes: Mapping[str, int], *names: str) -> int:
    """OR of ``1 << bit`` for the named planes.

    Raises :class:`~archive.errors.ValidationError` naming an unknown plane.
    ``bits(planes)`` with no names is 0.
    """
    value = 0
    for name in names:
        key = name.upper()
        if key not in mask_planes:
            raise ValidationError(
                f"unknown mask plane {name!r}; known planes: {', '.join(sorted(mask_planes))}"
            )
        value |= 1 << int(mask_planes[key])
    return value


def add_plane(mask_planes: MutableMapping[str, int], name: str) -> int:
    """Add a plane (if absent) at the lowest free bit; return its bit number."""
    key = _check_name(name)
    if key in mask_planes:
        return int(mask_planes[key])
    used = {int(b) for b in mask_planes.values()}
    for bit in range(MAX_BIT + 1):
        if bit not in used:
            mask_planes[key] = bit
            return bit
    raise ValidationError(f"no free mask bit left for plane {name!r} (all {MAX_BIT + 1} used)")


def validate_planes(mask_planes: Mapping[str, int]) -> dict[str, int]:
    """Check names and bits (unique, 0..30); return a normalised upper-case copy."""
    out: dict[str, int] = {}
    seen: dict[int, str] = {}
    for name, bit in mask_planes.items():
        key = _check_name(name)
        b = int(bit)
        if not 0 <= b <= MAX_BIT:
            raise ValidationError(f"mask plane {name!r} has bit {bit}, expected 0..{MAX_BIT}")
        if b in seen:
            raise ValidationError(f"mask planes {seen[b]!r} and {name!r} share bit {b}")
        seen[b] = key
        out[key] = b
    return out


def planes_to_header(mask_planes: Mapping[str, int], header: fits.Header) -> fits.Header:
    """Write ``MP_<NAME> = bit`` cards into ``header`` (in bit order) and return it."""
    for name, bit in sorted(validate_planes(mask_planes).items(), key=lambda kv: kv[1]):
        key = HEADER_PREFIX + name
        if len(key) > 8:
            key = "HIERARCH " + key
        header[key] = (bit, f"mask bit {bit}: value {1 << bit}")
    return header


def planes_from_header(header: fits.Header) -> dict[str, int]:
    """Read the ``MP_*`` cards of a mask HDU header into a plane mapping."""
    planes: dict[str, int] = {}
    for card in header.cards:
        key = card.keyword
        if key.upper().startswith(HEADER_PREFIX):
            planes[key[len(HEADER_PREFIX):].upper()] = int(card.value)
    return validate_planes(planes)


def describe(mask: np.ndarray, mask_planes: Mapping[str, int]) -> dict[str, int]:
    """Number of pixels that have each plane set (for logging and tests)."""
    m = np.asarray(mask)
    return {name: int(np.count_nonzero(m & (1 << bit))) for name, bit in mask_planes.items()}
