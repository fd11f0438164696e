"""The Exposure: image, mask, variance, WCS, PSF, photometric calibration and metadata.

FITS layout written by :meth:`Exposure.writeto` (every HDU readable by plain
astropy and ds9):

=====  ==========  =========================================================
HDU    EXTNAME     content
=====  ==========  =========================================================
0      (primary)   no data; metadata cards (VISIT, DETECTOR, BAND, MJD-AVG
                   [TAI, mid-exposure], EXPTIME, AIRMASS, GAIN, RDNOISE,
                   SATURATE, LTV-style offsets XY0_X/XY0_Y, EXTRAS JSON) and
                   the PhotoCalib cards (NJYPCNT, NJYPCERR, MAGZERO)
1      IMAGE       float32 image, WCS cards
2      MASK        int32 mask, WCS cards, ``MP_<NAME> = bit`` plane cards
3      VARIANCE    float32 variance (image units squared), WCS cards
4      PSF         optional; one-row binary table (see archive.image.psf)
=====  ==========  =========================================================

Floats in cards are written exactly, so a read gives back bit-identical
pixels, WCS parameters, PSF parameters, calibration and metadata.  Every HDU
carries CHECKSUM/DATASUM cards.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from dataclasses import dataclass, field, fields, replace

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from archive.errors import NotFoundError, ValidationError
from archive.image import mask as maskmod
from archive.image.calib import PhotoCalib
from archive.image.fitsutil import get_float, set_exact, shift_wcs, wcs_from_header, wcs_to_header
from archive.image.psf import PSF

#: Format version written as card ARCHFMT in the primary header.
FORMAT_VERSION = 1


@dataclass
class ExposureInfo:
    """Metadata of one exposure (one detector of one visit).

    Attributes: ``visit`` and ``detector`` ids; ``band`` (e.g. ``"r"``);
    ``mjd`` MJD (TAI) at mid-exposure; ``exp_time`` seconds; ``airmass``;
    ``gain`` electrons per adu; ``read_noise`` electrons (rms);
    ``saturation`` adu (level above which pixels are unusable; ``inf`` when
    unknown); ``extras`` a JSON-serialisable dict for anything else.
    """

    visit: int = 0
    detector: int = 0
    band: str = ""
    mjd: float = math.nan
    exp_time: float = math.nan
    airmass: float = math.nan
    gain: float = 1.0
    read_noise: float = 0.0
    saturation: float = math.inf
    extras: dict = field(default_factory=dict)

    _CARDS = (
        ("visit", "VISIT", "visit id"),
        ("detector", "DETECTOR", "detector id"),
        ("band", "BAND", "filter band"),
        ("mjd", "MJD-AVG", "[d] MJD (TAI) at mid-exposure"),
        ("exp_time", "EXPTIME", "[s] exposure time"),
        ("airmass", "AIRMASS", "airmass at mid-exposure"),
        ("gain", "GAIN", "[e-/adu] gain"),
        ("read_noise", "RDNOISE", "[e-] read noise"),
        ("saturation", "SATURATE", "[adu] saturation level"),
    )

    def to_header(self, header: fits.Header) -> fits.Header:
        """Write the metadata cards (floats exact; non-finite floats omitted)."""
        for attr, key, comment in self._CARDS:
            value = getattr(self, attr)
            if attr in ("visit", "detector"):
                header[key] = (int(value), comment)
            elif attr == "band":
                header[key] = (str(value), comment)
            else:
                set_exact(header, key, float(value), comment)
        header["TIMESYS"] = ("TAI", "time scale of MJD-AVG")
        if self.extras:
            try:
                text = json.dumps(self.extras, sort_keys=True)
            except TypeError as exc:
                raise ValidationError(f"ExposureInfo.extras must be JSON-serialisable: {exc}") from exc
            header["EXTRAS"] = text  # JSON; long values continue on CONTINUE cards
        return header

    @classmethod
    def from_header(cls, header: fits.Header) -> "ExposureInfo":
        """Read the cards written by :meth:`to_header` (missing cards take defaults)."""
        defaults = cls()
        kwargs = {}
        for attr, key, _ in cls._CARDS:
            if key not in header:
                continue
            if attr in ("visit", "detector"):
                kwargs[attr] = int(header[key])
            elif attr == "band":
                kwargs[attr] = str(header[key])
            else:
                kwargs[attr] = get_float(header, key, getattr(defaults, attr))
        if "EXTRAS" in header:
            kwargs["extras"] = json.loads(header["EXTRAS"])
        return cls(**kwargs)

    def copy(self) -> "ExposureInfo":
        return replace(self, extras=json.loads(json.dumps(self.extras)) if self.extras else {})

    def __eq__(self, other) -> bool:  # NaN-aware equality
        if not isinstance(other, ExposureInfo):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
                continue
            if a != b:
                return False
        return True


class Exposure:
    """One calibrated (or to-be-calibrated) image with everything needed to measure it.

    Parameters
    ----------
    image:
        2-D pixel values (converted to float32; no copy when already float32).
    mask:
        int32 bit planes (zeros when omitted).
    variance:
        float32 per-pixel variance in image units squared (NaN = unknown when omitted).
    wcs:
        celestial astropy WCS for *this* array's pixel grid (origin 0), or None.
    psf:
        :class:`~archive.image.psf.PSF` in this array's pixel coordinates, or None.
    photo_calib:
        :class:`~archive.image.calib.PhotoCalib`, or None.
    info:
        :class:`ExposureInfo` (defaults when omitted).
    mask_planes:
        name -> bit mapping (a copy of the defaults when omitted).
    xy0:
        position of pixel (0, 0) in the parent image (non-zero for sub-images).
    """

    def __init__(self, image, mask=None, variance=None, wcs: WCS | None = None, psf: PSF | None = None,
                 photo_calib: PhotoCalib | None = None, info: ExposureInfo | None = None,
                 mask_planes: dict[str, int] | None = None, xy0: tuple[int, int] = (0, 0)):
        img = np.asarray(image)
        if img.ndim != 2:
            raise ValidationError(f"Exposure image must be 2-D, got shape {img.shape}")
        self.image = img.astype(np.float32, copy=False)
        if mask is None:
            self.mask = np.zeros(img.shape, dtype=np.int32)
        else:
            m = np.asarray(mask)
            if m.shape != img.shape:
                raise ValidationError(f"Exposure mask shape {m.shape} != image shape {img.shape}")
            if m.dtype.kind not in "iu":
                raise ValidationError(f"Exposure mask must be an integer array, got {m.dtype}")
            self.mask = m.astype(np.int32, copy=False)
        if variance is None:
            self.variance = np.full(img.shape, np.nan, dtype=np.float32)
        else:
            v = np.asarray(variance)
            if v.shape != img.shape:
                raise ValidationError(f"Exposure variance shape {v.shape} != image shape {img.shape}")
            self.variance = v.astype(np.float32, copy=False)
        if wcs is not None and not isinstance(wcs, WCS):
            raise ValidationError(f"Exposure wcs must be an astropy WCS or None, got {type(wcs).__name__}")
        if psf is not None and not isinstance(psf, PSF):
            raise ValidationError(f"Exposure psf must be an archive.image.psf.PSF or None, got {type(psf).__name__}")
        if photo_calib is not None and not isinstance(photo_calib, PhotoCalib):
            raise ValidationError("Exposure photo_calib must be a PhotoCalib or None")
        self.wcs = wcs
        self.psf = psf
        self.photo_calib = photo_calib
        self.info = info if info is not None else ExposureInfo()
        self.mask_planes = maskmod.validate_planes(mask_planes if mask_planes is not None
                                                   else maskmod.DEFAULT_MASK_PLANES)
        self.xy0 = (int(xy0[0]), int(xy0[1]))

    # ---- geometry
    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.image.shape  # type: ignore[return-value]

    @property
    def width(self) -> int:
        return self.image.shape[1]

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` half-open box of this array in parent pixel coordinates."""
        return (self.xy0[0], self.xy0[1], self.xy0[0] + self.width, self.xy0[1] + self.height)

    def subimage(self, x0: int, y0: int, x1: int, y1: int) -> "Exposure":
        """View of the half-open pixel box ``[x0, x1) x [y0, y1)`` (local coordinates).

        Pixel arrays are numpy views (writes go to the parent); the WCS and PSF
        are shifted so that they describe the same sky and the same PSF at the
        same physical pixels; ``xy0`` accumulates the offset.
        """
        x0, y0, x1, y1 = (int(v) for v in (x0, y0, x1, y1))
        if not (0 <= x0 < x1 <= self.width and 0 <= y0 < y1 <= self.height):
            raise ValidationError(
                f"subimage box ({x0}, {y0}, {x1}, {y1}) is empty or outside the image (width {self.width}, "
                f"height {self.height})"
            )
        wcs = shift_wcs(self.wcs, x0, y0)
        if wcs is not None:
            wcs.pixel_shape = (x1 - x0, y1 - y0)
        return Exposure(
            self.image[y0:y1, x0:x1], self.mask[y0:y1, x0:x1], self.variance[y0:y1, x0:x1],
            wcs=wcs, psf=self.psf.shifted(x0, y0) if self.psf is not None else None,
            photo_calib=self.photo_calib, info=self.info, mask_planes=self.mask_planes,
            xy0=(self.xy0[0] + x0, self.xy0[1] + y0),
        )

    # ---- sky geometry
    def _need_wcs(self) -> WCS:
        if self.wcs is None:
            raise ValidationError(f"{self!r} has no WCS")
        return self.wcs

    def center_sky(self) -> tuple[float, float]:
        """(ra, dec) in degrees of the array's centre."""
        ra, dec = self._need_wcs().all_pix2world([[(self.width - 1) / 2.0, (self.height - 1) / 2.0]], 0)[0]
        return float(ra), float(dec)

    def corners_sky(self) -> np.ndarray:
        """``(4, 2)`` (ra, dec) in degrees of the outer pixel corners, counter-clockwise from (-0.5, -0.5)."""
        w, h = self.width - 0.5, self.height - 0.5
        return self._need_wcs().all_pix2world(np.array([[-0.5, -0.5], [w, -0.5], [w, h], [-0.5, h]]), 0)

    def pixel_scale(self) -> float:
        """Mean pixel size at the centre in arcsec (square root of the local pixel area)."""
        cx, cy = (self.width - 1) / 2.0, (self.height - 1) / 2.0
        pts = self._need_wcs().all_pix2world(np.array([[cx, cy], [cx + 1.0, cy], [cx, cy + 1.0]]), 0)
        dec0 = np.radians(pts[0, 1])
        d = (pts[1:] - pts[0]) * np.array([np.cos(dec0), 1.0])
        d[:, 0] = (d[:, 0] + 180.0 * np.cos(dec0)) % (360.0 * np.cos(dec0)) - 180.0 * np.cos(dec0)  # RA wrap
        return float(np.sqrt(abs(d[0, 0] * d[1, 1] - d[0, 1] * d[1, 0])) * 3600.0)

    def contains(self, ra, dec) -> np.ndarray:
        """Boolean: which (ra, dec) (deg) fall on this array's pixels."""
        x, y = self._need_wcs().all_world2pix(np.asarray(ra, dtype=float), np.asarray(dec, dtype=float), 0,
                                              quiet=True)
        return (x >= -0.5) & (x < self.width - 0.5) & (y >= -0.5) & (y < self.height - 0.5)

    # ---- pickling (dask, multiprocessing): keep the WCS exact
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.wcs is not None:
            state["wcs"] = ("exact-header", wcs_to_header(self.wcs).tostring(), self.wcs.pixel_shape)
        return state

    def __setstate__(self, state: dict) -> None:
        w = state.get("wcs")
        if isinstance(w, tuple) and w and w[0] == "exact-header":
            wcs = wcs_from_header(fits.Header.fromstring(w[1]))
            if wcs is not None and w[2] is not None:
                wcs.pixel_shape = w[2]
            state = {**state, "wcs": wcs}
        self.__dict__.update(state)

    # ---- masks
    def add_mask_plane(self, name: str) -> int:
        """Add a named plane (if absent); return its bit number."""
        return maskmod.add_plane(self.mask_planes, name)

    def get_plane_bitmask(self, *names: str) -> int:
        """OR of the named planes' bit values."""
        return maskmod.bits(self.mask_planes, *names)

    def mask_of(self, *names: str) -> np.ndarray:
        """Boolean array: pixels with any of the named planes set."""
        return (self.mask & self.get_plane_bitmask(*names)) != 0

    # ---- copies
    def copy(self) -> "Exposure":
        """Deep copy (new pixel arrays)."""
        import copy as _copy

        return Exposure(self.image.copy(), self.mask.copy(), self.variance.copy(),
                        wcs=self.wcs.deepcopy() if self.wcs is not None else None,
                        psf=_copy.deepcopy(self.psf), photo_calib=self.photo_calib,
                        info=self.info.copy(), mask_planes=dict(self.mask_planes), xy0=self.xy0)

    # ---- FITS
    def to_hdulist(self) -> fits.HDUList:
        """The multi-extension FITS representation (see module docstring)."""
        primary = fits.PrimaryHDU()
        h = primary.header
        h["ARCHFMT"] = (FORMAT_VERSION, "archive.image.exposure format version")
        self.info.to_header(h)
        h["XY0_X"] = (self.xy0[0], "parent x of pixel (0, 0)")
        h["XY0_Y"] = (self.xy0[1], "parent y of pixel (0, 0)")
        if self.photo_calib is not None:
            self.photo_calib.to_header(h)
        wcs_cards = wcs_to_header(self.wcs) if self.wcs is not None else fits.Header()

        def image_hdu(data, name, extra: fits.Header | None = None):
            hdr = fits.Header()
            hdr.extend(wcs_cards.cards)
            if extra is not None:
                hdr.extend(extra.cards)
            hdu = fits.ImageHDU(data=data, header=hdr, name=name)
            return hdu

        mask_hdr = maskmod.planes_to_header(self.mask_planes, fits.Header())
        hdus = [
            primary,
            image_hdu(np.ascontiguousarray(self.image), "IMAGE"),
            image_hdu(np.ascontiguousarray(self.mask), "MASK", mask_hdr),
            image_hdu(np.ascontiguousarray(self.variance), "VARIANCE"),
        ]
        if self.psf is not None:
            hdus.append(self.psf.to_hdu("PSF"))
        return fits.HDUList(hdus)

    def writeto(self, path: str | os.PathLike, overwrite: bool = True) -> pathlib.Path:
        """Write the multi-extension FITS file atomically (temporary file + rename)."""
        path = pathlib.Path(path)
        if path.exists() and not overwrite:
            raise ValidationError(f"{path} exists and overwrite=False")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".fits", dir=path.parent)
        os.close(fd)
        try:
            hdul = self.to_hdulist()
            for hdu in hdul:  # fixed comments (not the time of writing): same exposure -> same bytes
                hdu.add_checksum(when="archive.image checksum")
            hdul.writeto(tmp, overwrite=True, output_verify="exception")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def from_hdulist(cls, hdul: fits.HDUList, source: str = "<hdulist>") -> "Exposure":
        """Inverse of :meth:`to_hdulist`."""
        names = [h.name for h in hdul]
        for needed in ("IMAGE", "MASK", "VARIANCE"):
            if needed not in names:
                raise ValidationError(f"{source}: missing HDU {needed!r} (found {names})")
        h0 = hdul[0].header
        img_hdu = hdul["IMAGE"]
        image = np.asarray(img_hdu.data).astype(np.float32)
        mask = np.asarray(hdul["MASK"].data).astype(np.int32)
        variance = np.asarray(hdul["VARIANCE"].data).astype(np.float32)
        wcs = wcs_from_header(img_hdu.header)
        if wcs is not None:
            wcs.pixel_shape = (image.shape[1], image.shape[0])
        psf = PSF.from_hdu(hdul["PSF"]) if "PSF" in names else None
        return cls(image, mask, variance, wcs=wcs, psf=psf, photo_calib=PhotoCalib.from_header(h0),
                   info=ExposureInfo.from_header(h0),
                   mask_planes=maskmod.planes_from_header(hdul["MASK"].header),
                   xy0=(int(h0.get("XY0_X", 0)), int(h0.get("XY0_Y", 0))))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Exposure":
        """Read a file written by :meth:`writeto`."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise NotFoundError(f"exposure file {path} does not exist")
        try:
            with fits.open(path, memmap=False) as hdul:
                return cls.from_hdulist(hdul, source=str(path))
        except OSError as exc:
            raise ValidationError(f"{path}: not a readable FITS file ({exc})") from exc

    @staticmethod
    def read_info(path: str | os.PathLike) -> ExposureInfo:
        """Only the metadata of a file written by :meth:`writeto` (reads the primary header)."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise NotFoundError(f"exposure file {path} does not exist")
        try:
            return ExposureInfo.from_header(fits.getheader(path, 0))
        except OSError as exc:
            raise ValidationError(f"{path}: not a readable FITS file ({exc})") from exc

    def __repr__(self) -> str:
        i = self.info
        return (f"Exposure({self.width}x{self.height}, visit={i.visit}, detector={i.detector}, band={i.band!r}, "
                f"xy0={self.xy0}, psf={self.psf!r}, calib={self.photo_calib!r})")
