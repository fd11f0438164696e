"""Photometric calibration: image counts -> nJy.

``PhotoCalib.njy_per_count`` is the flux density in nJy of one count of the
image it belongs to (one adu of a calexp, or one unit of a coadd).  The AB
zero point is the magnitude of one count: ``zero_point = 31.4 - 2.5 log10(njy_per_count)``
because 1 nJy is AB 31.4 (AB: m = -2.5 log10(f / 3631 Jy) = 8.90 - 2.5 log10(f / Jy)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.io import fits

from archive.errors import ValidationError
from archive.image.fitsutil import get_float, set_exact

#: AB magnitude of a 1 nJy source.
AB_NJY_ZERO = 31.4


def njy_to_mag(flux_njy):
    """AB magnitude of a flux density in nJy (NaN for flux <= 0)."""
    f = np.asarray(flux_njy, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(f > 0, AB_NJY_ZERO - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)
    return out if out.ndim else float(out)


def mag_to_njy(mag):
    """Flux density in nJy of an AB magnitude."""
    m = np.asarray(mag, dtype=float)
    out = 10.0 ** (-0.4 * (m - AB_NJY_ZERO))
    return out if out.ndim else float(out)


@dataclass(frozen=True)
class PhotoCalib:
    """Linear photometric calibration of one image.

    Attributes
    ----------
    njy_per_count:
        nJy per count (adu) of the image; must be finite and > 0.
    njy_per_count_err:
        1-sigma uncertainty of ``njy_per_count`` (nJy per count), a systematic
        that :meth:`to_njy_err` can add in quadrature.
    """

    njy_per_count: float
    njy_per_count_err: float = 0.0

    def __post_init__(self) -> None:
        v = float(self.njy_per_count)
        if not (math.isfinite(v) and v > 0):
            raise ValidationError(f"PhotoCalib.njy_per_count must be finite and > 0, got {self.njy_per_count!r}")
        e = float(self.njy_per_count_err)
        if not (math.isfinite(e) and e >= 0):
            raise ValidationError(f"PhotoCalib.njy_per_count_err must be finite and >= 0, got {self.njy_per_count_err!r}")
        object.__setattr__(self, "njy_per_count", v)
        object.__setattr__(self, "njy_per_count_err", e)

    @classmethod
    def from_zero_point(cls, zero_point: float, zero_point_err: float = 0.0) -> "PhotoCalib":
        """From an AB zero point (magnitude of one count) and its error (mag)."""
        scale = 10.0 ** (-0.4 * (float(zero_point) - AB_NJY_ZERO))
        return cls(scale, scale * 0.4 * math.log(10.0) * float(zero_point_err))

    @property
    def zero_point(self) -> float:
        """AB magnitude of one count."""
        return AB_NJY_ZERO - 2.5 * math.log10(self.njy_per_count)

    @property
    def zero_point_err(self) -> float:
        """1-sigma error of :attr:`zero_point` (mag)."""
        return 2.5 / math.log(10.0) * self.njy_per_count_err / self.njy_per_count

    def to_njy(self, counts):
        """Counts -> nJy."""
        return np.asarray(counts, dtype=float) * self.njy_per_count if np.ndim(counts) else float(counts) * self.njy_per_count

    def to_njy_err(self, counts, counts_err, include_calib: bool = False):
        """Error in nJy of a measurement ``counts +- counts_err``.

        With ``include_calib`` the calibration error is added in quadrature.
        """
        c = np.asarray(counts, dtype=float)
        e = np.asarray(counts_err, dtype=float) * self.njy_per_count
        if include_calib:
            e = np.hypot(e, c * self.njy_per_count_err)
        return e if e.ndim else float(e)

    def to_mag(self, counts):
        """Counts -> AB magnitude (NaN for counts <= 0)."""
        return njy_to_mag(np.asarray(counts, dtype=float) * self.njy_per_count)

    def to_header(self, header: fits.Header) -> fits.Header:
        """Write NJYPCNT/NJYPCERR (exact) and MAGZERO (informational) cards."""
        set_exact(header, "NJYPCNT", self.njy_per_count, "nJy per count (PhotoCalib)")
        set_exact(header, "NJYPCERR", self.njy_per_count_err, "error of NJYPCNT")
        set_exact(header, "MAGZERO", self.zero_point, "AB mag of 1 count")
        return header

    @classmethod
    def from_header(cls, header: fits.Header) -> "PhotoCalib | None":
        """Read cards written by :meth:`to_header`; None when absent."""
        if "NJYPCNT" not in header:
            return None
        return cls(float(header["NJYPCNT"]), get_float(header, "NJYPCERR", 0.0))
