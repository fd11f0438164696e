"""Small FITS helpers shared by the image model: exact float cards and exact WCS headers.

Astropy formats a float card with at most 20 characters, which can lose the last
digits of a double.  :func:`set_exact` writes the shortest round-tripping
representation (``repr``) instead, so values read back bit-identically.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from archive.errors import ValidationError


def set_exact(header: fits.Header, key: str, value, comment: str = "") -> None:
    """Set ``header[key] = value`` so that it reads back bit-identically.

    Floats are written with ``repr`` (17 significant digits at most); non-finite
    floats cannot be represented in FITS and remove the card instead.  Other
    types go through astropy unchanged.
    """
    if key in header:
        del header[key]
    if isinstance(value, (bool, np.bool_)):
        header[key] = (bool(value), comment)
        return
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return
        text = repr(v).upper()
        if "E" not in text and "." not in text:
            text += ".0"
        if len(key) > 8:
            raise ValidationError(f"header keyword {key!r} is longer than 8 characters")
        image = f"{key:<8s}= {text:>20s}"
        if comment:
            image += f" / {comment}"
        header.append(fits.Card.fromstring(image[:80]))
        return
    header[key] = (value, comment)


def get_float(header: fits.Header, key: str, default: float = math.nan) -> float:
    """A float card, or ``default`` when absent."""
    if key not in header:
        return default
    return float(header[key])


_FLOAT_KEYS = re.compile(r"^(CRPIX|CRVAL|CDELT)(\d)$|^PC(\d)_(\d)$|^CD(\d)_(\d)$|^(A|B|AP|BP)_(\d+)_(\d+)$"
                         r"|^PV(\d)_(\d+)$")


def wcs_to_header(wcs: WCS) -> fits.Header:
    """FITS header cards of a celestial WCS (TAN, TAN-SIP, TPV, ...), with exact floats.

    The header comes from ``wcs.to_header(relax=True)``; every numeric card that
    wcslib rounds (CRPIX, CRVAL, CDELT, PC, CD, SIP coefficients, PV
    parameters, LONPOLE, LATPOLE) is then rewritten from the WCS's own double
    values.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = wcs.to_header(relax=True)
    pc = wcs.wcs.get_pc()
    cdelt = wcs.wcs.get_cdelt()
    pv = {(int(i), int(m)): float(v) for i, m, v in wcs.wcs.get_pv()}
    out = fits.Header()
    for card in src.cards:
        key = card.keyword
        m = _FLOAT_KEYS.match(key)
        value = None
        if m:
            if m.group(1):
                i = int(m.group(2)) - 1
                arr = {"CRPIX": wcs.wcs.crpix, "CRVAL": wcs.wcs.crval, "CDELT": cdelt}[m.group(1)]
                value = float(arr[i])
            elif m.group(3):
                value = float(pc[int(m.group(3)) - 1, int(m.group(4)) - 1])
            elif m.group(5):  # CD written only when wcslib chose to
                value = float(wcs.wcs.cd[int(m.group(5)) - 1, int(m.group(6)) - 1])
            elif m.group(7) and wcs.sip is not None:
                coeffs = {"A": wcs.sip.a, "B": wcs.sip.b, "AP": wcs.sip.ap, "BP": wcs.sip.bp}[m.group(7)]
                if coeffs is not None:
                    value = float(coeffs[int(m.group(8)), int(m.group(9))])
            elif m.group(10):  # TPV/ZPN/... projection parameters
                value = pv.get((int(m.group(10)), int(m.group(11))))
        elif key == "LONPOLE":
            value = float(wcs.wcs.lonpole)
        elif key == "LATPOLE":
            value = float(wcs.wcs.latpole)
        if value is not None and math.isfinite(value):
            set_exact(out, key, value, card.comment)
        else:
            out.append(card)
    return out


def wcs_from_header(header: fits.Header) -> WCS | None:
    """The celestial WCS described by ``header``, or None when it has no CTYPE1."""
    if "CTYPE1" not in header:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header, relax=True, naxis=2)
    return wcs


def shift_wcs(wcs: WCS | None, dx: float, dy: float) -> WCS | None:
    """WCS of an array whose pixel (0, 0) is pixel (dx, dy) of ``wcs``'s array.

    CRPIX (and the SIP reference point) move by ``(-dx, -dy)``; sky positions of
    the same physical pixels are unchanged.
    """
    if wcs is None:
        return None
    new = wcs.deepcopy()
    new.wcs.crpix = wcs.wcs.crpix - np.array([dx, dy], dtype=float)
    if wcs.sip is not None:
        from astropy.wcs import Sip

        new.sip = Sip(wcs.sip.a, wcs.sip.b, wcs.sip.ap, wcs.sip.bp, new.wcs.crpix)
    new.wcs.set()
    return new
