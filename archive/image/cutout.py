"""Cutouts: a box of an Exposure around a sky position, as a new Exposure.

A cutout keeps everything a measurement needs: the pixels, the mask with its
named planes, the variance, the WCS and the PSF, each shifted so that it
describes the same sky and the same PSF at the same physical pixels (``xy0``
says where pixel (0, 0) lies in the parent).  A box that runs off the parent
image is still the size asked for: the pixels outside the parent are NaN in
image and variance and ``NO_DATA`` in the mask, and :class:`Cutout` says how
many there are, so a stamp near an edge is never silently smaller or shifted.

Pure: Exposures in, Exposures out; nothing here reads or writes the store.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import uuid

import numpy as np
from astropy.io import fits

from archive.errors import ValidationError
from archive.image.exposure import Exposure
from archive.image.fitsutil import shift_wcs

#: Largest cutout side in pixels (a 2048 x 2048 stamp is 16 MiB per float plane).
MAX_CUTOUT_PIXELS = 2048

_ARCSEC = {"arcsec": 1.0, "asec": 1.0, '"': 1.0, "arcmin": 60.0, "amin": 60.0, "'": 60.0, "deg": 3600.0}
_PIXELS = ("px", "pix", "pixel", "pixels")


@dataclasses.dataclass(frozen=True)
class Size:
    """A cutout side: ``value`` in ``unit`` (``"arcsec"`` or ``"pix"``)."""

    value: float
    unit: str = "arcsec"

    def __post_init__(self) -> None:
        if self.unit not in ("arcsec", "pix"):
            raise ValidationError(f"cutout size unit {self.unit!r}: use arcsec or pix")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValidationError(f"cutout size must be a number, got {v!r}")
        if not math.isfinite(float(v)) or not float(v) > 0:
            raise ValidationError(f"cutout size must be a positive finite number, got {v!r}")

    @classmethod
    def parse(cls, text) -> Size:
        """``"10"`` or ``"10arcsec"`` (arcsec), ``"1.5arcmin"``, ``"64px"`` (pixels)."""
        if isinstance(text, Size):
            return text
        if not isinstance(text, str):
            return cls(text)
        t = text.strip().lower()
        for suffix in sorted((*_ARCSEC, *_PIXELS), key=len, reverse=True):
            if t.endswith(suffix):
                num, unit = t[: -len(suffix)].strip(), suffix
                break
        else:
            num, unit = t, "arcsec"
        try:
            value = float(num)
        except ValueError:
            raise ValidationError(f"cutout size {text!r}: a number of arcsec, or with a unit: 10arcsec, "
                                  "1.5arcmin, 64px") from None
        if unit in _PIXELS:
            if math.isfinite(value) and value != int(value):
                raise ValidationError(f"cutout size {text!r}: a whole number of pixels")
            return cls(value, "pix")
        return cls(value * _ARCSEC[unit], "arcsec")

    def pixels(self, pixel_scale: float) -> int:
        """The side in whole pixels on an image of ``pixel_scale`` arcsec per pixel
        (arcsec sizes to the nearest pixel); refused above :data:`MAX_CUTOUT_PIXELS`."""
        n = float(self.value) if self.unit == "pix" else float(self.value) / float(pixel_scale)
        if not math.isfinite(n) or n > MAX_CUTOUT_PIXELS:
            shown = f"{self.value:g} px" if self.unit == "pix" else f"{self.value:g} arcsec ({n:.0f} px)"
            raise ValidationError(f"cutout size {shown} is larger than the limit of {MAX_CUTOUT_PIXELS} px "
                                  f"per side" + ("" if self.unit == "pix" else
                                                 f" ({MAX_CUTOUT_PIXELS * pixel_scale:.0f} arcsec here)"))
        return max(1, int(math.floor(n + 0.5)))


def check_position(ra, dec) -> tuple[float, float]:
    """(ra in [0, 360), dec) in degrees, or a ValidationError for a non-finite or impossible one."""
    try:
        ra, dec = float(ra), float(dec)
    except (TypeError, ValueError):
        raise ValidationError(f"position ({ra!r}, {dec!r}): RA and Dec must be numbers (degrees)") from None
    if not (math.isfinite(ra) and math.isfinite(dec)):
        raise ValidationError(f"position ({ra}, {dec}): RA and Dec must be finite (degrees)")
    if not -90.0 <= dec <= 90.0:
        raise ValidationError(f"position ({ra}, {dec}): Dec must be within [-90, 90] degrees")
    return ra % 360.0, dec


def pixel_of(exposure: Exposure, ra: float, dec: float) -> tuple[float, float]:
    """Pixel (x, y), 0-based, of a sky position on ``exposure`` (NaN when the WCS cannot map it)."""
    if exposure.wcs is None:
        raise ValidationError(f"{exposure!r} has no WCS: no cutout at a sky position")
    x, y = exposure.wcs.all_world2pix(np.array([ra], float), np.array([dec], float), 0, quiet=True)
    return float(x[0]), float(y[0])


def on_image(exposure: Exposure, x: float, y: float) -> bool:
    return bool(math.isfinite(x) and math.isfinite(y) and -0.5 <= x < exposure.width - 0.5
                and -0.5 <= y < exposure.height - 0.5)


@dataclasses.dataclass
class Cutout:
    """A stamp: ``exposure`` (the box), where it came from and what it lacks.

    ``ra``, ``dec``: the position asked for (deg); ``x``, ``y``: its pixel in the stamp;
    ``n_outside``: stamp pixels beyond the parent image (NaN / ``NO_DATA``);
    ``source``: a mapping of FITS cards naming the product (kind, path, checksum ...)."""

    exposure: Exposure
    ra: float
    dec: float
    x: float
    y: float
    n_outside: int
    source: dict = dataclasses.field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return self.n_outside > 0

    def to_hdulist(self) -> fits.HDUList:
        """The exposure's FITS layout (IMAGE, MASK with ``MP_*`` names, VARIANCE, PSF when there is
        one) with cutout cards in the primary header, ``LTV1``/``LTV2`` (parent pixel = cutout pixel
        - LTV, as ds9 shows as physical coordinates) and, where the parent has a PSF, ``PSF_IMAGE``:
        the PSF at the stamp's centre position (sum 1, centred on its central pixel)."""
        e = self.exposure
        hdul = e.to_hdulist()
        h = hdul[0].header
        h["CUTRA"] = (float(self.ra), "[deg] RA asked for")
        h["CUTDEC"] = (float(self.dec), "[deg] Dec asked for")
        h["CUTX"] = (float(self.x), "[pix] its x in this stamp (0-based)")
        h["CUTY"] = (float(self.y), "[pix] its y in this stamp (0-based)")
        h["CUTNX"] = (e.width, "[pix] stamp width")
        h["CUTNY"] = (e.height, "[pix] stamp height")
        h["PARTIAL"] = (self.partial, "stamp runs off the parent image")
        h["NOFFIMG"] = (int(self.n_outside), "stamp pixels outside the parent image")
        if self.partial:
            h["COMMENT"] = "Off-image pixels: NaN in IMAGE and VARIANCE, NO_DATA in MASK."
        for key, (value, comment) in self.source.items():
            h[key] = (value, comment)
        for hdu in hdul[1:4]:
            hdu.header["LTV1"] = (float(-e.xy0[0]), "cutout pixel - parent pixel (x)")
            hdu.header["LTV2"] = (float(-e.xy0[1]), "cutout pixel - parent pixel (y)")
            hdu.header["LTM1_1"] = 1.0
            hdu.header["LTM2_2"] = 1.0
        if e.psf is not None and math.isfinite(self.x) and math.isfinite(self.y):
            kernel = e.psf.kernel(self.x, self.y).astype(np.float32)
            ph = fits.Header()
            ph["PSFX"] = (float(self.x), "[pix] stamp position the PSF is evaluated at")
            ph["PSFY"] = (float(self.y), "[pix] stamp position the PSF is evaluated at")
            hdul.append(fits.ImageHDU(kernel, ph, name="PSF_IMAGE"))
        return hdul

    def writeto(self, path: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
        """Write the stamp as FITS (checksums on every HDU) atomically: the file appears whole or
        not at all; an existing file is refused unless ``overwrite``."""
        return write_hdulist(self.to_hdulist(), path, overwrite)


def write_hdulist(hdul: fits.HDUList, path: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
    """Write ``hdul`` to ``path`` through a temporary file in the same directory (renamed into place)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise ValidationError(f"{path} is a directory, not a file name")
    if path.exists() and not overwrite:
        raise ValidationError(f"{path} exists (pass overwrite to replace it)")
    if not path.parent.is_dir():
        raise ValidationError(f"{path.parent}: no such directory")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        for hdu in hdul:
            hdu.add_checksum(when="archive cutout checksum")
        hdul.writeto(tmp, output_verify="exception")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def cutout_box(x: float, y: float, nx: int, ny: int) -> tuple[int, int]:
    """Lower-left pixel of an ``nx`` x ``ny`` box centred on pixel position (x, y): for odd sides
    the position falls in the central pixel, for even ones between the two central pixels."""
    return int(math.floor(x - (nx - 1) / 2.0 + 0.5)), int(math.floor(y - (ny - 1) / 2.0 + 0.5))


def cutout(exposure: Exposure, ra: float, dec: float, size: Size | float | str, source: dict | None = None,
           grid: tuple[int, int, int, int] | None = None) -> Cutout:
    """The box of ``exposure`` around (``ra``, ``dec``) (deg), ``size`` on a side (a :class:`Size`;
    a plain number is arcsec).  ``grid``: an explicit box ``(x0, y0, nx, ny)`` instead.

    The position must fall on the image (else ValidationError); the box may run off it (filled
    with NaN and NO_DATA, counted in ``n_outside``).  Pixels are copies, not views."""
    ra, dec = check_position(ra, dec)
    x, y = pixel_of(exposure, ra, dec)
    if not on_image(exposure, x, y):
        raise ValidationError(f"position ({ra:.7f}, {dec:.7f}) is not on the image "
                              f"({exposure.width} x {exposure.height} px; it maps to pixel ({x:.1f}, {y:.1f}))")
    if grid is None:
        n = Size.parse(size).pixels(exposure.pixel_scale())
        x0, y0 = cutout_box(x, y, n, n)
        nx = ny = n
    else:
        x0, y0, nx, ny = (int(v) for v in grid)
    stamp, n_out = extract(exposure, x0, y0, nx, ny)
    return Cutout(stamp, ra, dec, x - x0, y - y0, n_out, dict(source or {}))


def extract(exposure: Exposure, x0: int, y0: int, nx: int, ny: int) -> tuple[Exposure, int]:
    """The half-open box ``[x0, x0+nx) x [y0, y0+ny)`` (local pixels, may run off the image) as a
    new Exposure, and the number of its pixels outside the image."""
    if nx < 1 or ny < 1 or nx > MAX_CUTOUT_PIXELS or ny > MAX_CUTOUT_PIXELS:
        raise ValidationError(f"cutout box {nx} x {ny} px: each side 1 to {MAX_CUTOUT_PIXELS} px")
    planes = dict(exposure.mask_planes)
    if "NO_DATA" not in planes:
        from archive.image import mask as maskmod

        maskmod.add_plane(planes, "NO_DATA")
    image = np.full((ny, nx), np.nan, np.float32)
    variance = np.full((ny, nx), np.nan, np.float32)
    mask = np.full((ny, nx), np.int32(1 << planes["NO_DATA"]), np.int32)
    ax0, ay0 = max(x0, 0), max(y0, 0)
    ax1, ay1 = min(x0 + nx, exposure.width), min(y0 + ny, exposure.height)
    inside = 0
    if ax1 > ax0 and ay1 > ay0:
        dst = (slice(ay0 - y0, ay1 - y0), slice(ax0 - x0, ax1 - x0))
        src = (slice(ay0, ay1), slice(ax0, ax1))
        image[dst] = exposure.image[src]
        variance[dst] = exposure.variance[src]
        mask[dst] = exposure.mask[src]
        inside = (ax1 - ax0) * (ay1 - ay0)
    wcs = shift_wcs(exposure.wcs, x0, y0)
    if wcs is not None:
        wcs.pixel_shape = (nx, ny)
    psf = exposure.psf.shifted(x0, y0) if exposure.psf is not None else None
    stamp = Exposure(image, mask, variance, wcs=wcs, psf=psf, photo_calib=exposure.photo_calib,
                     info=exposure.info.copy(), mask_planes=planes,
                     xy0=(exposure.xy0[0] + x0, exposure.xy0[1] + y0))
    return stamp, nx * ny - inside
