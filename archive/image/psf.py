"""Point-spread-function models behind one interface.

Every PSF model is a :class:`PSF` and answers the same questions, so measurement,
PSF matching, coadd PSFs and forced photometry work with any of them:

==========================================================  ===========================================
``psf.stamps(x, y, size, xc=None, yc=None)``                 ``(n, size, size)`` PSF images of n sources
``psf.stamps_with_gradient(x, y, size, xc=None, yc=None)``   the same and their derivatives by x and y
``psf.image(x, y, size=None)``                               one source's stamp, renormalised to sum 1
``psf.kernel(x=None, y=None, size=None, oversample=1)``      the PSF at one position, centred, sum 1
``psf.fwhm(x=None, y=None)``                                 FWHM (px) at positions
``psf.ellipticity(x=None, y=None)``                          ``1 - b/a`` at positions
``psf.summary(bbox=None, n=5)``                              min / median / max of both over the field
``psf.to_hdu()`` / ``PSF.from_hdu(hdu)``                     FITS round trip (bit-exact parameters)
==========================================================  ===========================================

Coordinates
-----------
Pixel coordinates have origin 0 and pixel centres at integers: pixel ``[iy, ix]``
of a numpy array covers ``ix - 0.5 <= x < ix + 0.5``.  Positions given to a PSF
are pixel coordinates of the image it belongs to.  A PSF taken from a sub-image
(``Exposure.subimage``) carries the sub-image's offset (:meth:`PSF.shifted`), so it
keeps describing the same physical pixels.  Called without a position, the
position-dependent methods use :meth:`PSF.reference_position` (the centre of a
spatially varying model's bounding box).

Stamps
------
``stamps(x, y, size)`` evaluates the PSF of sources of **unit total flux** at the
sub-pixel positions ``(x, y)`` (arrays of n) on ``size x size`` stamps (``size``
odd) centred on the integer pixels ``(xc, yc)``, by default the pixels holding
the sources, ``(floor(x + 0.5), floor(y + 0.5))``: stamp pixel ``[j, i]`` is image
pixel ``(xc - size // 2 + i, yc - size // 2 + j)`` and holds the fraction of the
source's flux that this pixel collects (the PSF integrated over the pixel, the
"effective" PSF).  A stamp therefore sums to the flux fraction inside it, a
little below 1; ``renormalize=True`` divides each by its own sum instead (the cut
wings moved into the stamp).  To add a source of flux F at (x, y) to an image:
``x0, y0 = psf.stamp_origin(x, y, s)`` and
``image[y0:y0+s, x0:x0+s] += F * psf.stamps(x, y, s)[0]`` (:func:`add_point_sources`
does it vectorised and edge-safe).  Stamps are computed for all positions at once
(no Python loop per source).

Kernels
-------
``kernel(x, y, size, oversample=k)`` is the PSF *at* position ``(x, y)`` with its
centre on the kernel's central element (what PSF matching and coadd PSFs need).
With ``k = 1`` it is a ``size x size`` image summing to 1.  With ``k > 1`` it
samples the same pixel-integrated PSF every ``1 / k`` px: ``2 M + 1`` samples per
axis, ``M = (size k) // 2``, sample ``m`` at offset ``(m - M) / k`` px from the
centre, normalised so that every k-th sample starting at the centre is exactly
the native kernel (``os[M % k::k, M % k::k] == kernel(x, y, size)``); its integral
``os.sum() / k**2`` is then 1 up to sampling and truncation.

Shape
-----
:meth:`PSF.fwhm` is the FWHM of the model's own profile - the continuous profile
for Gaussian and Moffat, the pixel-integrated (effective) profile for
:class:`PixelPSF`, which samples nothing else - and :meth:`PSF.ellipticity` its
``1 - b/a`` likewise (the isophotes' axis ratio for the analytic models; the
adaptive second moments of the pixel-integrated model for :class:`PixelPSF`).
To compare models of different kinds use :meth:`PSF.effective_fwhm`, measured the
same way on every class from a kernel (for a Gaussian it is
``FWHM_PER_SIGMA sqrt(sigma^2 + 1/12)``).

FITS
----
:meth:`PSF.to_hdu` writes a one-row binary table (EXTNAME ``PSF``, card
``PSFTYPE`` naming the class); :meth:`PSF.from_hdu` reads any registered class
back with bit-identical parameters.  ``Exposure.writeto`` / ``Exposure.read``
store the exposure's PSF this way.

Writing a new model: subclass :class:`PSF`, set ``kind``, implement
``_evaluate`` (the pixel-integrated PSF at offsets), ``_fwhm_at``,
``_ellipticity_at``, ``_params`` and ``_from_params``; override ``stamps`` (and
``stamps_with_gradient``) only for speed.
"""

from __future__ import annotations

import abc
import copy
import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
from astropy.io import fits
from astropy.table import Table
from numpy.typing import ArrayLike
from scipy import ndimage, special

from archive.errors import ValidationError
from archive.image.blas import matmul_rows
from archive.image.moments import adaptive_moments, moments_shape

#: FWHM of a Gaussian in units of its standard deviation, ``2 sqrt(2 ln 2) = 2.35482...``;
#: the one place this constant is written (import it from here).
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


# --------------------------------------------------------------------------- polynomials
def poly_terms(degree: int) -> list[tuple[int, int]]:
    """Exponents ``(i, j)`` of the monomials ``u**i * v**j`` of total degree <= ``degree``.

    Order: by total degree, then by increasing power of v:
    ``1, u, v, u^2, u v, v^2, u^3, ...``.
    """
    if degree < 0:
        raise ValidationError(f"polynomial degree must be >= 0, got {degree}")
    return [(n - j, j) for n in range(degree + 1) for j in range(n + 1)]


def n_poly_terms(degree: int) -> int:
    """Number of monomials of total degree <= ``degree``."""
    return (degree + 1) * (degree + 2) // 2


def normalized_coords(x, y, bbox: tuple[float, float, float, float]):
    """Map pixel coordinates to ``u, v`` in [-1, 1] over ``bbox = (x0, y0, x1, y1)``.

    ``x0 -> -1`` and ``x1 -> +1`` (same for y); used by every spatially varying
    model so fitted coefficients stay well conditioned.
    """
    x0, y0, x1, y1 = (float(b) for b in bbox)
    sx = (x1 - x0) / 2.0 or 1.0
    sy = (y1 - y0) / 2.0 or 1.0
    u = (np.asarray(x, dtype=float) - (x0 + x1) / 2.0) / sx
    v = (np.asarray(y, dtype=float) - (y0 + y1) / 2.0) / sy
    return u, v


def poly_design(x, y, degree: int, bbox: tuple[float, float, float, float]) -> np.ndarray:
    """Design matrix ``(..., n_terms)`` of the monomials at positions (x, y) (pixels)."""
    u, v = normalized_coords(x, y, bbox)
    u = np.asarray(u)
    v = np.asarray(v)
    return np.stack([u**i * v**j for i, j in poly_terms(degree)], axis=-1)


def degree_from_n_terms(n: int) -> int:
    """Inverse of :func:`n_poly_terms`; raises when ``n`` is not a triangular count."""
    d = 0
    while n_poly_terms(d) < n:
        d += 1
    if n_poly_terms(d) != n:
        raise ValidationError(f"{n} coefficients do not form a full 2-D polynomial")
    return d


def fwhm_from_image(img: np.ndarray, pixel_scale: float = 1.0) -> float:
    """FWHM (in units of ``1 / pixel_scale`` pixels) of a centred, peaked profile.

    Uses the area above half maximum: ``FWHM = 2 sqrt(area / pi)``, after cubic
    up-sampling to at least 8 samples per unit so it works on coarse images.
    ``pixel_scale`` is the number of samples per (native) pixel of ``img``.
    """
    a = np.asarray(img, dtype=float)
    factor = max(1, int(math.ceil(8.0 / pixel_scale)))
    if factor > 1:
        a = ndimage.zoom(a, factor, order=3, grid_mode=True, mode="grid-constant")
    peak = a.max()
    if not peak > 0:
        raise ValidationError("cannot measure FWHM of an image without a positive peak")
    area = np.count_nonzero(a >= 0.5 * peak) / (pixel_scale * factor) ** 2
    return 2.0 * math.sqrt(area / math.pi)


# --------------------------------------------------------------------------- helpers
def _check_size(size) -> int:
    s = int(size)
    if s != size or s < 1 or s % 2 == 0:
        raise ValidationError(f"PSF stamp size must be a positive odd integer, got {size!r}")
    return s


def _positions(x, y, xc=None, yc=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source positions as 1-D float64 arrays (px) and their stamps' integer centres (int64)."""
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if x.shape != y.shape or x.ndim != 1:
        raise ValidationError(f"PSF stamps: x and y must be 1-D arrays of equal length, got shapes {x.shape}, "
                              f"{y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValidationError("PSF stamps: source positions must be finite pixel coordinates")
    xc = np.floor(x + 0.5).astype(np.int64) if xc is None else np.atleast_1d(np.asarray(xc, dtype=np.int64))
    yc = np.floor(y + 0.5).astype(np.int64) if yc is None else np.atleast_1d(np.asarray(yc, dtype=np.int64))
    if xc.shape != x.shape or yc.shape != y.shape:
        raise ValidationError("PSF stamps: xc and yc must have one entry per source")
    return x, y, xc, yc


def _renormalized(stamps: np.ndarray, who: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each stamp divided by its own sum; an error naming the position when one has no flux."""
    total = stamps.sum(axis=(1, 2), keepdims=True)
    if np.any(~(total > 0)):
        bad = int(np.flatnonzero(~(total.ravel() > 0))[0])
        raise ValidationError(f"{who}: the PSF stamp at ({x[bad]}, {y[bad]}) has no positive flux")
    return stamps / total


@dataclass(frozen=True)
class PsfSummary:
    """FWHM (px) and ellipticity (``1 - b/a``) of a PSF over a grid of positions.

    ``bbox``: ``(x0, y0, x1, y1)`` pixel box the grid spans (image pixels, origin 0);
    ``n_positions``: positions evaluated (1 for a model that is the same everywhere).
    """

    fwhm_min: float
    fwhm_median: float
    fwhm_max: float
    ellipticity_min: float
    ellipticity_median: float
    ellipticity_max: float
    bbox: tuple[float, float, float, float]
    n_positions: int

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- base class
class PSF(abc.ABC):
    """The PSF interface every model implements (see the module docstring).

    Subclasses set :attr:`kind` (registered for :meth:`from_hdu`) and implement
    ``_evaluate``, ``_fwhm_at``, ``_ellipticity_at``, ``_params`` and ``_from_params``.
    """

    #: Name written in the PSFTYPE card; registered automatically.
    kind: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type["PSF"]]] = {}
    #: attributes holding caches (dropped when pickled or copied)
    _caches: ClassVar[tuple[str, ...]] = ()

    #: offset (px) added to positions before evaluating the model (see :meth:`shifted`)
    x_offset: float = 0.0
    y_offset: float = 0.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            PSF._registry[cls.kind] = cls

    # ---- what a model implements
    @abc.abstractmethod
    def _evaluate(self, xm: np.ndarray, ym: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Pixel-integrated PSF of unit total flux, ``(n, my, mx)`` float64.

        ``xm, ym`` (n,): model-frame positions (image px + offset); ``u`` (n, mx) and
        ``v`` (n, my): offsets (px) along x and y from the PSF's centre of the pixel
        centres to evaluate (a separable grid per position).
        """

    @abc.abstractmethod
    def _fwhm_at(self, xm: np.ndarray, ym: np.ndarray) -> np.ndarray:
        """FWHM (px) at model-frame positions (arrays of one shape, or 0-d)."""

    @abc.abstractmethod
    def _ellipticity_at(self, xm: np.ndarray, ym: np.ndarray) -> np.ndarray:
        """``1 - b/a`` at model-frame positions (arrays of one shape, or 0-d)."""

    def _reference_position(self) -> tuple[float, float]:
        """Model-frame position used when no position is given."""
        return (0.0, 0.0)

    def _model_bbox(self) -> tuple[float, float, float, float] | None:
        """Model-frame ``(x0, y0, x1, y1)`` over which the model varies; None when it is the same everywhere."""
        return None

    @abc.abstractmethod
    def _params(self) -> dict:
        """The model's parameters (scalars, strings or arrays) as written to FITS."""

    @classmethod
    @abc.abstractmethod
    def _from_params(cls, params: dict) -> "PSF":
        """Rebuild the model from :meth:`_params` as read back from FITS."""

    # ---- stamps
    def stamps(self, x: ArrayLike, y: ArrayLike, size: int, xc: ArrayLike | None = None, yc: ArrayLike | None = None,
               *, renormalize: bool = False) -> np.ndarray:
        """PSF stamps ``(n, size, size)`` of sources of unit total flux at pixel positions (x, y).

        ``x, y``: arrays of n (px, origin 0); ``size``: odd stamp side (px); ``xc, yc``:
        integer stamp centres (px; default ``floor(x + 0.5)``, ``floor(y + 0.5)``).  Each
        pixel holds the fraction of the source's flux it collects (see the module
        docstring); ``renormalize``: divide each stamp by its sum.  float64 (float32 for
        :class:`PixelPSF`).
        """
        size = _check_size(size)
        x, y, xc, yc = _positions(x, y, xc, yc)
        if x.size == 0:
            return np.zeros((0, size, size))
        g = np.arange(size, dtype=np.float64) - size // 2
        u = (xc[:, None] + g) - x[:, None]
        v = (yc[:, None] + g) - y[:, None]
        st = self._evaluate(x + self.x_offset, y + self.y_offset, u, v)
        return _renormalized(st, type(self).__name__, x, y) if renormalize else st

    def stamps_with_gradient(self, x: ArrayLike, y: ArrayLike, size: int, xc: ArrayLike | None = None,
                             yc: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(P, dP/dx, dP/dy)``: :meth:`stamps` and their derivatives with respect to the
        source position (px^-1), here by central differences of 0.05 px."""
        x, y, xc, yc = _positions(x, y, xc, yc)
        e = 0.05
        P = self.stamps(x, y, size, xc, yc)
        Px = (self.stamps(x + e, y, size, xc, yc) - self.stamps(x - e, y, size, xc, yc)) / (2 * e)
        Py = (self.stamps(x, y + e, size, xc, yc) - self.stamps(x, y - e, size, xc, yc)) / (2 * e)
        return P, Px, Py

    def image(self, x: float, y: float, size: int | None = None) -> np.ndarray:
        """One source's renormalised stamp: ``stamps([x], [y], size, renormalize=True)[0]``
        (default size :meth:`default_size`).  The source sits at its sub-pixel offset from
        the centre pixel; for the PSF centred on the central pixel use :meth:`kernel`."""
        size = self.default_size(x, y) if size is None else size
        return self.stamps(np.array([float(x)]), np.array([float(y)]), size, renormalize=True)[0]

    @staticmethod
    def stamp_origin(x: float, y: float, size: int) -> tuple[int, int]:
        """Image pixel ``(x0, y0)`` of a stamp's lower-left pixel for a source at (x, y) (px)."""
        half = int(size) // 2
        return int(math.floor(x + 0.5)) - half, int(math.floor(y + 0.5)) - half

    # ---- kernels
    def kernel(self, x: float | None = None, y: float | None = None, size: int | None = None,
               oversample: int = 1) -> np.ndarray:
        """The PSF at pixel position (x, y), centred on the kernel's central element (float64).

        ``size``: odd side in native pixels (default :meth:`default_size`); ``oversample``:
        samples per pixel ``k``.  ``k = 1``: ``size x size``, sum 1.  ``k > 1``:
        ``(2 M + 1)^2`` samples every ``1 / k`` px, ``M = (size k) // 2``, every k-th one
        from the centre equal to the native kernel (see the module docstring).
        """
        if (x is None) != (y is None):
            raise ValidationError("PSF.kernel: give both x and y, or neither")
        if x is None:
            x, y = self.reference_position()
        x, y = float(x), float(y)
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValidationError(f"PSF.kernel: position ({x}, {y}) must be finite")
        size = _check_size(self.default_size(x, y) if size is None else size)
        k = int(oversample)
        if k != oversample or k < 1:
            raise ValidationError(f"PSF.kernel: oversample must be an integer >= 1, got {oversample!r}")
        M = (size * k) // 2
        t = (np.arange(2 * M + 1, dtype=np.float64) - M) / k
        e = self._evaluate(np.array([x + self.x_offset]), np.array([y + self.y_offset]), t[None, :], t[None, :])[0]
        norm = e.sum() if k == 1 else np.ascontiguousarray(e[M % k::k, M % k::k]).sum()
        if not norm > 0:
            raise ValidationError(f"{type(self).__name__}: the PSF kernel at ({x}, {y}) has no positive flux")
        return e / norm

    # ---- shape
    def _at(self, fn, x, y):
        if x is None and y is None:
            xm, ym = self._reference_position()
            return float(np.asarray(fn(np.asarray(float(xm)), np.asarray(float(ym)))))
        if x is None or y is None:
            raise ValidationError(f"{type(self).__name__}: give both x and y, or neither")
        xm = np.asarray(x, dtype=float) + self.x_offset
        ym = np.asarray(y, dtype=float) + self.y_offset
        shape = np.broadcast(xm, ym).shape
        xm, ym = np.broadcast_arrays(xm, ym)
        out = np.broadcast_to(np.asarray(fn(xm, ym), dtype=float), shape)
        return float(out) if out.ndim == 0 else out.copy()

    def fwhm(self, x: ArrayLike | None = None, y: ArrayLike | None = None) -> float | np.ndarray:
        """FWHM (px) of the model's profile at pixel positions (x, y) (see the module docstring).

        A float for one position (or none: :meth:`reference_position`), an array of the
        broadcast shape of ``x`` and ``y`` otherwise.
        """
        return self._at(self._fwhm_at, x, y)

    def ellipticity(self, x: ArrayLike | None = None, y: ArrayLike | None = None) -> float | np.ndarray:
        """``1 - b/a`` (0 round) of the model's profile at pixel positions (x, y); float or array as :meth:`fwhm`."""
        return self._at(self._ellipticity_at, x, y)

    def effective_fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """FWHM (px) of the pixel-integrated PSF, measured on its kernel (comparable across classes)."""
        if x is None or y is None:
            x, y = self.reference_position()
        size = max(self.default_size(x, y), 2 * int(math.ceil(3.0 * self.fwhm(x, y))) + 1)
        return fwhm_from_image(self.kernel(x, y, size))

    def summary(self, bbox: tuple[float, float, float, float] | None = None, n: int = 5) -> PsfSummary:
        """FWHM and ellipticity on an ``n x n`` grid spanning ``bbox = (x0, y0, x1, y1)``
        (image px, edges included); default: the model's own box (in this image's pixels),
        or the reference position alone for a model that is the same everywhere."""
        if bbox is None:
            mb = self._model_bbox()
            if mb is None:
                x, y = self.reference_position()
                bbox = (x, y, x, y)
            else:
                bbox = (mb[0] - self.x_offset, mb[1] - self.y_offset, mb[2] - self.x_offset, mb[3] - self.y_offset)
        if len(bbox) != 4 or not all(math.isfinite(float(b)) for b in bbox):
            raise ValidationError(f"PSF.summary: bbox must be (x0, y0, x1, y1) in pixels, got {bbox!r}")
        bbox = tuple(float(b) for b in bbox)
        if bbox[0] == bbox[2] and bbox[1] == bbox[3]:
            xs, ys = np.array([bbox[0]]), np.array([bbox[1]])
        else:
            if int(n) < 1:
                raise ValidationError(f"PSF.summary: n must be >= 1, got {n!r}")
            gx, gy = np.meshgrid(np.linspace(bbox[0], bbox[2], int(n)), np.linspace(bbox[1], bbox[3], int(n)))
            xs, ys = gx.ravel(), gy.ravel()
        fw = np.atleast_1d(self.fwhm(xs, ys))
        el = np.atleast_1d(self.ellipticity(xs, ys))
        return PsfSummary(float(fw.min()), float(np.median(fw)), float(fw.max()), float(el.min()),
                          float(np.median(el)), float(el.max()), bbox, int(xs.size))

    def reference_position(self) -> tuple[float, float]:
        """Image pixel (x, y) used when no position is given: the centre of a spatially varying
        model's box, else (0, 0)."""
        xm, ym = self._reference_position()
        return float(xm) - self.x_offset, float(ym) - self.y_offset

    def default_size(self, x: ArrayLike | None = None, y: ArrayLike | None = None) -> int:
        """Odd stamp size (px) holding the profile out to ~4 FWHM (at least 15); the largest
        over the positions when given arrays."""
        f = float(np.max(self.fwhm(x, y)))
        return max(15, 2 * int(math.ceil(4.0 * f)) + 1)

    def shifted(self, dx: float, dy: float) -> "PSF":
        """Copy for an image whose pixel (0, 0) is pixel (dx, dy) of this PSF's image."""
        new = copy.deepcopy(self)
        new.x_offset = self.x_offset + float(dx)
        new.y_offset = self.y_offset + float(dy)
        return new

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in self._caches:
            state.pop(name, None)
        return state

    # ---- FITS
    def to_hdu(self, extname: str = "PSF") -> fits.BinTableHDU:
        """One-row binary table with the model parameters (exact doubles)."""
        params = dict(self._params())
        params["x_offset"] = float(self.x_offset)
        params["y_offset"] = float(self.y_offset)
        cols = {}
        for name, value in params.items():
            arr = np.asarray(value)
            if arr.dtype.kind == "U":
                cols[name] = [str(value)]
            else:
                cols[name] = arr[None, ...]
        table = Table(cols)
        hdu = fits.table_to_hdu(table)
        hdu.header["EXTNAME"] = extname
        hdu.header["PSFTYPE"] = (self.kind, "archive.image.psf class")
        return hdu

    @staticmethod
    def from_hdu(hdu: fits.BinTableHDU) -> "PSF":
        """Rebuild the PSF written by :meth:`to_hdu` (any registered class)."""
        kind = hdu.header.get("PSFTYPE")
        if kind not in PSF._registry:
            raise ValidationError(
                f"HDU {hdu.name!r}: unknown PSFTYPE {kind!r}; known: {', '.join(sorted(PSF._registry))}"
            )
        table = Table.read(hdu)
        params = {}
        for name in table.colnames:
            value = table[name][0]
            if isinstance(value, (bytes, np.bytes_)):
                value = value.decode()
            elif isinstance(value, np.ndarray):
                value = np.array(value)
            elif isinstance(value, np.generic):
                value = value.item()
            params[name] = value
        x_off = float(params.pop("x_offset", 0.0))
        y_off = float(params.pop("y_offset", 0.0))
        psf = PSF._registry[kind]._from_params(params)
        psf.x_offset = x_off
        psf.y_offset = y_off
        return psf

    def __eq__(self, other) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        a, b = self._params(), other._params()
        if a.keys() != b.keys() or (self.x_offset, self.y_offset) != (other.x_offset, other.y_offset):
            return False
        return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)

    __hash__ = None  # type: ignore[assignment]


# --------------------------------------------------------------------------- Gaussian
class GaussianPSF(PSF):
    """Gaussian PSF, round or elliptical, the same everywhere.

    Its size is given by keyword, as ``fwhm`` or as ``sigma`` (both px;
    ``fwhm = FWHM_PER_SIGMA * sigma``).  For an elliptical profile both are the
    geometric means of the major- and minor-axis values (the round profile of the same
    half-maximum area, as for :class:`MoffatPSF`): ``sigma_major = sigma / sqrt(1 - e)``,
    ``sigma_minor = sigma sqrt(1 - e)``.

    ellipticity: ``e = 1 - b/a`` (0 round); theta: angle of the major axis from +x
    towards +y (deg); oversample: sub-samples per pixel axis integrating an elliptical
    profile over the pixels (a round one is integrated exactly, with erf).
    """

    kind = "gaussian"

    def __init__(self, *, fwhm: float | None = None, sigma: float | None = None, ellipticity: float = 0.0,
                 theta: float = 0.0, oversample: int = 3):
        if (fwhm is None) == (sigma is None):
            raise ValidationError("GaussianPSF: give its size as exactly one of fwhm= or sigma= (px)")
        if fwhm is not None:
            f = float(fwhm)
            if not (math.isfinite(f) and f > 0):
                raise ValidationError(f"GaussianPSF fwhm must be finite and > 0 px, got {fwhm!r}")
            self.fwhm0 = f
            self.sigma = f / FWHM_PER_SIGMA
        else:
            s = float(sigma)
            if not (math.isfinite(s) and s > 0):
                raise ValidationError(f"GaussianPSF sigma must be finite and > 0 px, got {sigma!r}")
            self.sigma = s
            self.fwhm0 = FWHM_PER_SIGMA * s
        e = float(ellipticity)
        if not (math.isfinite(e) and 0.0 <= e < 1.0):
            raise ValidationError(f"GaussianPSF ellipticity must be in [0, 1), got {ellipticity!r}")
        if not math.isfinite(float(theta)):
            raise ValidationError(f"GaussianPSF theta must be finite, got {theta!r}")
        self.ellipticity0 = e
        self.theta = float(theta)
        self.oversample = int(oversample)
        if self.oversample != oversample or self.oversample < 1:
            raise ValidationError(f"GaussianPSF oversample must be an integer >= 1, got {oversample!r}")

    def _evaluate(self, xm, ym, u, v):
        if self.ellipticity0 == 0.0:
            s = self.sigma * np.sqrt(2.0)
            gx = 0.5 * (special.erf((u + 0.5) / s) - special.erf((u - 0.5) / s))
            gy = 0.5 * (special.erf((v + 0.5) / s) - special.erf((v - 0.5) / s))
            return gy[:, :, None] * gx[:, None, :]
        q = 1.0 - self.ellipticity0
        a = self.sigma / math.sqrt(q)
        b = self.sigma * math.sqrt(q)
        t = math.radians(self.theta)
        c, sn = math.cos(t), math.sin(t)
        k = self.oversample
        sub = (np.arange(k) + 0.5) / k - 0.5
        out = np.zeros((u.shape[0], v.shape[1], u.shape[1]))
        for sy in sub:  # one (n, my, mx) plane per sub-sample: memory as for a round profile
            dy = (v + sy)[:, :, None]
            for sx in sub:
                dx = (u + sx)[:, None, :]
                uu = c * dx + sn * dy
                vv = -sn * dx + c * dy
                out += np.exp(-0.5 * (uu * uu / (a * a) + vv * vv / (b * b)))
        return out * (1.0 / (2 * np.pi * a * b * k * k))

    def _fwhm_at(self, xm, ym):
        return np.full(np.broadcast(xm, ym).shape, self.fwhm0)

    def _ellipticity_at(self, xm, ym):
        return np.full(np.broadcast(xm, ym).shape, self.ellipticity0)

    def _params(self):
        return {"fwhm": self.fwhm0, "sigma": self.sigma, "ellipticity": self.ellipticity0, "theta": self.theta,
                "oversample": self.oversample}

    @classmethod
    def _from_params(cls, p):
        psf = cls(sigma=float(p["sigma"]), ellipticity=float(p.get("ellipticity", 0.0)),
                  theta=float(p.get("theta", 0.0)), oversample=int(p.get("oversample", 3)))
        if "fwhm" in p:  # as written: it may have been the given size, sigma derived from it
            psf.fwhm0 = float(p["fwhm"])
        return psf

    def __repr__(self):
        return (f"GaussianPSF(fwhm={self.fwhm0!r}, ellipticity={self.ellipticity0!r}, theta={self.theta!r})")


# --------------------------------------------------------------------------- Moffat
class MoffatPSF(PSF):
    """Moffat profile ``(1 + r^2 / alpha^2) ** -beta``, optionally elliptical and varying over the detector.

    Parameters
    ----------
    fwhm:
        FWHM in pixels at the centre of ``bbox`` (everywhere when ``variation``
        is empty); for an elliptical profile the geometric mean of the major-
        and minor-axis FWHMs (``FWHM_major = fwhm / sqrt(b/a)``).
    beta:
        Moffat exponent (> 1; 2.5-4.5 is typical of seeing).
    variation:
        Relative FWHM change as polynomial coefficients of the non-constant
        terms of :func:`poly_terms` (``u, v, u^2, u v, v^2, ...`` over ``bbox``
        mapped to [-1, 1]): ``FWHM(x, y) = fwhm * (1 + sum_t variation[t] * term_t(u, v))``.
    bbox:
        ``(x0, y0, x1, y1)`` pixel box of the detector, needed with ``variation``.
    oversample:
        sub-samples per pixel axis used to integrate the profile over pixels.
    ellipticity:
        ``1 - b/a`` of the isophotes (0 = round), the same everywhere.
    theta:
        angle of the major axis from the +x axis towards +y, degrees.
    """

    kind = "moffat"

    def __init__(
        self,
        fwhm: float,
        beta: float = 3.5,
        variation=None,
        bbox: tuple[float, float, float, float] | None = None,
        oversample: int = 5,
        ellipticity: float = 0.0,
        theta: float = 0.0,
    ):
        f = float(fwhm)
        e = float(ellipticity)
        if not (math.isfinite(e) and 0.0 <= e < 1.0):
            raise ValidationError(f"MoffatPSF ellipticity must be in [0, 1), got {ellipticity!r}")
        if not math.isfinite(float(theta)):
            raise ValidationError(f"MoffatPSF theta must be finite, got {theta!r}")
        self.ellipticity0 = e
        self.theta = float(theta)
        b = float(beta)
        if not (math.isfinite(f) and f > 0):
            raise ValidationError(f"MoffatPSF fwhm must be finite and > 0, got {fwhm!r}")
        if not (math.isfinite(b) and b > 1):
            raise ValidationError(f"MoffatPSF beta must be finite and > 1, got {beta!r}")
        self.fwhm0 = f
        self.beta = b
        var = np.asarray(variation if variation is not None else [], dtype=float).ravel()
        if var.size:
            degree_from_n_terms(var.size + 1)
            if bbox is None:
                raise ValidationError("MoffatPSF: a spatial variation needs the detector bbox")
        self.variation = var
        self.bbox = tuple(float(v) for v in bbox) if bbox is not None else (0.0, 0.0, 0.0, 0.0)
        self.oversample = int(oversample)
        if self.oversample < 1:
            raise ValidationError("MoffatPSF oversample must be >= 1")

    def _fwhm_at(self, xm, ym):
        if not self.variation.size:
            return np.full(np.broadcast(xm, ym).shape, self.fwhm0)
        deg = degree_from_n_terms(self.variation.size + 1)
        design = poly_design(xm, ym, deg, self.bbox)[..., 1:]
        return self.fwhm0 * (1.0 + design @ self.variation)

    def _ellipticity_at(self, xm, ym):
        return np.full(np.broadcast(xm, ym).shape, self.ellipticity0)

    def _reference_position(self):
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    def _model_bbox(self):
        return self.bbox if self.variation.size else None

    def _evaluate(self, xm, ym, u, v):
        out = self._pixel_response(xm[:, None, None], ym[:, None, None], u[:, None, :], v[:, :, None])
        return np.broadcast_to(out, (u.shape[0], v.shape[1], u.shape[1])).copy()

    def _pixel_response(self, xm, ym, u, v):
        """Pixel-integrated profile (unit total flux) at offsets (u, v) (px) from its centre at
        model position (xm, ym); arrays broadcast together."""
        fwhm = self._fwhm_at(xm, ym)
        if np.any(~(fwhm > 0)):
            raise ValidationError("MoffatPSF: spatial variation makes the FWHM non-positive here")
        alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / self.beta) - 1.0))
        inv_a2 = 1.0 / alpha**2
        norm = (self.beta - 1.0) / math.pi * inv_a2
        n = self.oversample
        sub = (np.arange(n) + 0.5) / n - 0.5
        out = None
        if self.ellipticity0 == 0.0:
            for sy in sub:
                vv = (v + sy) ** 2
                for sx in sub:
                    term = (1.0 + ((u + sx) ** 2 + vv) * inv_a2) ** (-self.beta)
                    out = term if out is None else out + term
            return out * (norm / (n * n))
        # area-preserving ellipse: r^2 = q x'^2 + y'^2 / q along the major (x') and minor (y') axes
        q = 1.0 - self.ellipticity0
        c, sn = math.cos(math.radians(self.theta)), math.sin(math.radians(self.theta))
        for sy in sub:
            vy = v + sy
            for sx in sub:
                ux = u + sx
                xp = ux * c + vy * sn
                yp = -ux * sn + vy * c
                term = (1.0 + (q * xp**2 + yp**2 / q) * inv_a2) ** (-self.beta)
                out = term if out is None else out + term
        return out * (norm / (n * n))

    def _params(self):
        return {
            "fwhm": self.fwhm0,
            "beta": self.beta,
            "variation": self.variation.copy(),
            "bbox": np.array(self.bbox, dtype=float),
            "oversample": self.oversample,
            "ellipticity": self.ellipticity0,
            "theta": self.theta,
        }

    @classmethod
    def _from_params(cls, p):
        var = np.asarray(p["variation"], dtype=float)
        bbox = tuple(np.asarray(p["bbox"], dtype=float))
        return cls(p["fwhm"], p["beta"], variation=var if var.size else None,
                   bbox=bbox if var.size else None, oversample=int(p["oversample"]),
                   ellipticity=float(p.get("ellipticity", 0.0)), theta=float(p.get("theta", 0.0)))

    def __repr__(self):
        return (f"MoffatPSF(fwhm={self.fwhm0!r}, beta={self.beta!r}, variation={self.variation.tolist()!r}, "
                f"ellipticity={self.ellipticity0!r}, theta={self.theta!r})")


# --------------------------------------------------------------------------- pixelized
class PixelPSF(PSF):
    """Pixelized, spatially varying effective PSF.

    The model at position (x, y) is ``M(x, y) = sum_k w_k(x, y) * basis[k]`` with
    ``w_k(x, y) = sum_t coeffs[k, t] * term_t(u, v)`` (monomials of
    :func:`poly_terms` up to ``degree`` over ``bbox`` mapped to [-1, 1]).

    ``basis`` images (``K x S x S``, S odd) sample the **pixel-integrated** PSF
    (what one native pixel would collect) at a spacing of ``1 / oversample``
    native pixels (``oversample`` may be fractional, as PSFEx's PSF_SAMP),
    centred on element ``[(S-1)/2, (S-1)/2]``.  Between samples the model is
    interpolated with a cubic B-spline (of the zero-padded basis); its total flux
    at (x, y) is ``sum(M(x, y)) / oversample^2``, which stamps divide by.

    :meth:`kernel` evaluates the spline exactly.  :meth:`stamps` (many sources, the
    measurement path) reads a table of every basis image's native stamps at
    :attr:`n_phase` + 1 sub-pixel phases per axis, bilinear between phases
    (interpolation error ~ (1 / n_phase)^2 / 8 of the PSF's curvature, < 1e-4 of a
    flux) and in float32 (~1e-7 relative), with each source's own polynomial
    coefficients (no grid of nodes over the detector).

    With ``coeffs=None`` the basis has one image per monomial
    (``K = n_poly_terms(degree)``) and ``coeffs`` is the identity - the natural
    output of a per-pixel polynomial fit (see :meth:`from_psf`).
    """

    kind = "pixel"
    _caches = ("_coef_cache", "_tables", "_fwhm_ref")

    #: sub-pixel phases per pixel of the stamp table (see the class docstring)
    n_phase: ClassVar[int] = 16

    def __init__(self, basis, coeffs=None, *, oversample: float = 1, degree: int = 0,
                 bbox: tuple[float, float, float, float] | None = None):
        b = np.asarray(basis, dtype=float)
        if b.ndim == 2:
            b = b[None]
        if b.ndim != 3 or b.shape[1] != b.shape[2] or b.shape[1] % 2 == 0:
            raise ValidationError(f"PixelPSF basis must be (K, S, S) with S odd, got shape {b.shape}")
        if not np.all(np.isfinite(b)):
            raise ValidationError("PixelPSF basis contains non-finite values")
        self.degree = int(degree)
        nt = n_poly_terms(self.degree)
        if coeffs is None:
            if b.shape[0] != nt:
                raise ValidationError(
                    f"PixelPSF without coeffs needs one basis image per term ({nt}), got {b.shape[0]}"
                )
            c = np.eye(nt)
        else:
            c = np.asarray(coeffs, dtype=float).reshape(b.shape[0], -1)
            if c.shape[1] != nt:
                raise ValidationError(f"PixelPSF coeffs must be (K, {nt}) for degree {degree}, got {c.shape}")
        if self.degree > 0 and bbox is None:
            raise ValidationError("PixelPSF: a spatially varying model needs the detector bbox")
        self.basis = b
        self.coeffs = c
        self.oversample = float(oversample)
        if not (math.isfinite(self.oversample) and self.oversample > 0):
            raise ValidationError(f"PixelPSF oversample must be finite and > 0, got {oversample!r}")
        if self.oversample == int(self.oversample):
            self.oversample = int(self.oversample)
        self.bbox = tuple(float(v) for v in bbox) if bbox is not None else (0.0, 0.0, 0.0, 0.0)

    @classmethod
    def from_psf(cls, psf: PSF, bbox: tuple[float, float, float, float], *, degree: int = 2,
                 oversample: int = 2, size: int | None = None, n_grid: int = 5) -> "PixelPSF":
        """Pixelize an analytic PSF (Gaussian/Moffat) over ``bbox`` with a per-pixel polynomial fit."""
        if isinstance(psf, PixelPSF):
            raise ValidationError("PixelPSF.from_psf needs an analytic PSF")
        x0, y0, x1, y1 = bbox
        if size is None:
            size = 2 * int(math.ceil(max(psf.default_size(x, y) for x in (x0, x1) for y in (y0, y1)) / 2.0)) + 1
        nsamp = 2 * ((_check_size(size) * oversample) // 2) + 1
        g = (np.arange(nsamp) - nsamp // 2) / oversample
        gx, gy = np.meshgrid(np.linspace(x0, x1, n_grid), np.linspace(y0, y1, n_grid))
        gx, gy = gx.ravel(), gy.ravel()
        grid = np.broadcast_to(g, (gx.size, nsamp))
        samples = psf._evaluate(gx + psf.x_offset, gy + psf.y_offset, grid, grid)
        samples = samples / samples.sum(axis=(1, 2), keepdims=True) * oversample**2
        design = poly_design(gx, gy, degree, bbox)
        sol, *_ = np.linalg.lstsq(design, samples.reshape(len(gx), -1), rcond=None)
        return cls(sol.reshape(-1, nsamp, nsamp), None, oversample=oversample, degree=degree, bbox=bbox)

    @classmethod
    def from_psfex(cls, source, row: int = 0) -> "PixelPSF":
        """Read a PSFEx model: a ``.psf`` file / its PSF_DATA HDU, or a legacypipe merged psfex table row.

        PSFEx describes ``PSF(x, y) = sum_k PSF_MASK[k] * X^i_k Y^j_k`` with
        ``X = (x_1 - POLZERO1) / POLSCAL1`` in 1-based image pixels (x_1 = x + 1),
        monomials ordered ``1, X, X^2, .., Y, X Y, .., Y^2, ..`` and basis
        images sampled every PSF_SAMP pixels; all of it maps exactly onto this
        class (``bbox`` chosen so that u = X, v = Y).  Only single-group
        polynomials in X_IMAGE/Y_IMAGE are supported.
        """
        if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
            with fits.open(source) as hdul:
                hdu = next((h for h in hdul if isinstance(h, fits.BinTableHDU)), None)
                if hdu is None:
                    raise ValidationError(f"{source}: no binary table with a PSFEx model")
                return cls.from_psfex(fits.BinTableHDU(data=hdu.data.copy(), header=hdu.header.copy()), row)
        hdu = source
        data, header = hdu.data, hdu.header
        names = {n.lower(): n for n in data.columns.names}

        def get(key, default=None):
            if key.lower() in names:
                v = data[names[key.lower()]][row]
                return v.decode() if isinstance(v, bytes) else v
            return header.get(key.upper(), default)

        if "psf_mask" not in names:
            raise ValidationError("PSFEx table has no PSF_MASK column")
        mask = np.asarray(data[names["psf_mask"]][row], dtype=float)
        if mask.ndim == 2:
            mask = mask[None]
        naxis = int(get("POLNAXIS", 0) or 0)
        samp = float(get("PSF_SAMP", 1.0) or 1.0)
        if naxis == 0:
            return cls(mask[:1], np.ones((1, 1)), oversample=1.0 / samp, degree=0)
        if naxis != 2 or int(get("POLNGRP", 1) or 1) != 1:
            raise ValidationError(f"PSFEx model with POLNAXIS={naxis}, POLNGRP={get('POLNGRP')} is not supported")
        n1, n2 = str(get("POLNAME1", "X_IMAGE")).strip(), str(get("POLNAME2", "Y_IMAGE")).strip()
        if (n1, n2) != ("X_IMAGE", "Y_IMAGE"):
            raise ValidationError(f"PSFEx model depends on {n1}, {n2}; only X_IMAGE, Y_IMAGE are supported")
        deg = int(get("POLDEG1"))
        z1, z2 = float(get("POLZERO1")), float(get("POLZERO2"))
        s1, s2 = float(get("POLSCAL1")), float(get("POLSCAL2"))
        psfex_terms = [(nx, ny) for ny in range(deg + 1) for nx in range(deg + 1 - ny)]
        if mask.shape[0] != len(psfex_terms):
            raise ValidationError(f"PSFEx PSF_MASK has {mask.shape[0]} planes, degree {deg} needs {len(psfex_terms)}")
        ours = poly_terms(deg)
        coeffs = np.zeros((len(psfex_terms), len(ours)))
        for k, t in enumerate(psfex_terms):
            coeffs[k, ours.index(t)] = 1.0
        # u = (x - (x0 + x1)/2) / ((x1 - x0)/2) must equal X = (x + 1 - z) / s
        bbox = (z1 - 1.0 - s1, z2 - 1.0 - s2, z1 - 1.0 + s1, z2 - 1.0 + s2)
        return cls(mask, coeffs, oversample=1.0 / samp, degree=deg, bbox=bbox)

    def model(self, x: float, y: float) -> np.ndarray:
        """The oversampled model image ``M(x, y)`` (``S x S``) at pixel (x, y)."""
        w = poly_design(float(x) + self.x_offset, float(y) + self.y_offset, self.degree, self.bbox)
        weights = self.coeffs @ w
        return np.tensordot(weights, self.basis, axes=(0, 0))

    def default_size(self, x=None, y=None) -> int:
        """The basis images' extent in native pixels (odd), wherever the source is."""
        half = int(((self.basis.shape[1] - 1) / 2) / self.oversample)
        return 2 * half + 1

    #: zero padding (samples) around the basis before the spline prefilter (PSF estimation
    #: fits the basis through the same interpolation: :mod:`archive.process.psf_estimate`)
    SPLINE_PAD: ClassVar[int] = 4

    def _spline_coefficients(self) -> np.ndarray:
        """Cubic B-spline coefficients of the zero-padded basis images (cached)."""
        coef = getattr(self, "_coef_cache", None)
        if coef is None:
            P = self.SPLINE_PAD
            padded = np.pad(self.basis, ((0, 0), (P, P), (P, P)))
            coef = np.stack([ndimage.spline_filter(b, order=3, mode="mirror") for b in padded])
            self._coef_cache = coef
        return coef

    @staticmethod
    def bspline3(t: np.ndarray) -> np.ndarray:
        """The cubic B-spline kernel at offsets ``t`` (in basis samples; zero beyond 2)."""
        a = np.abs(t)
        return np.where(a < 1.0, 2.0 / 3.0 - a**2 + 0.5 * a**3, np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))

    def _basis_totals(self) -> np.ndarray:
        """Total flux of each basis image (its samples' sum over oversample^2), ``(K,)``."""
        return self.basis.sum(axis=(1, 2)) / float(self.oversample) ** 2

    def _evaluate(self, xm, ym, u, v):
        """Cubic B-spline interpolation of the (zero-padded) model at the offsets, divided by its total flux.

        The model is linear in the basis, so the spline coefficients of the basis are
        computed once and combined per position; the separable spline weights turn each
        stamp into two small products.
        """
        coef = self._spline_coefficients()
        n_pad = coef.shape[1]
        c = (self.basis.shape[1] - 1) / 2.0 + self.SPLINE_PAD
        n, mx = u.shape
        my = v.shape[1]
        out = np.empty((n, my, mx))
        if n == 0:
            return out
        # spline coefficients the offsets can touch (4-tap kernel)
        reach = float(max(np.abs(u).max(), np.abs(v).max()))
        lo = max(int(math.floor(c - reach * self.oversample)) - 2, 0)
        hi = min(int(math.ceil(c + reach * self.oversample)) + 2, n_pad - 1)
        crop = np.ascontiguousarray(coef[:, lo:hi + 1, lo:hi + 1])
        n_c = hi - lo + 1
        taps = np.arange(4)
        tot = self._basis_totals()
        step = max(1, 2_000_000 // (n_c * n_c))
        for start in range(0, n, step):
            sl = slice(start, start + step)
            m = xm[sl].size
            w = poly_design(xm[sl], ym[sl], self.degree, self.bbox) @ self.coeffs.T  # (m, K)
            cm = np.tensordot(w, crop, axes=(1, 0))  # (m, R, R) cropped model coefficients
            # sample positions (in cropped coefficient indices) and their 4 spline taps
            px = c - lo + u[sl] * self.oversample  # (m, mx)
            py = c - lo + v[sl] * self.oversample  # (m, my)
            ix = np.floor(px).astype(np.int64)[:, :, None] - 1 + taps  # (m, mx, 4)
            iy = np.floor(py).astype(np.int64)[:, :, None] - 1 + taps
            wx = np.where((ix >= 0) & (ix < n_c), self.bspline3(px[:, :, None] - ix), 0.0)
            wy = np.where((iy >= 0) & (iy < n_c), self.bspline3(py[:, :, None] - iy), 0.0)
            ix = np.clip(ix, 0, n_c - 1)
            iy = np.clip(iy, 0, n_c - 1)
            # along x for every cropped row: (m, R, mx); then along y: (m, my, mx)
            gx = np.take_along_axis(cm, np.broadcast_to(ix.reshape(m, 1, mx * 4), (m, n_c, mx * 4)), axis=2)
            tmp = np.einsum("nrjb,njb->nrj", gx.reshape(m, n_c, mx, 4), wx)
            gy = np.take_along_axis(tmp, np.broadcast_to(iy.reshape(m, my * 4, 1), (m, my * 4, mx)), axis=1)
            total = w @ tot
            total = np.where(np.abs(total) > 1e-12, total, 1.0)
            out[sl] = np.einsum("niaj,nia->nij", gy.reshape(m, my, 4, mx), wy) / total[:, None, None]
        return out

    # ---- the stamp table (measurement path)
    def _coefficients(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-source basis weights ``(n, K)`` at pixel (x, y), normalised to unit total flux."""
        a = poly_design(x + self.x_offset, y + self.y_offset, self.degree, self.bbox) @ self.coeffs.T
        a = np.atleast_2d(a)
        norm = a @ self._basis_totals()
        norm = np.where(np.abs(norm) > 1e-12, norm, 1.0)
        return a / norm[:, None]

    def _table(self, half: int) -> np.ndarray:
        """``(P, P, K * 4, S, S)`` float32: for phase cell (iy, ix) and basis k the bilinear terms
        ``t00, t01 - t00, t10 - t00, t11 - t10 - t01 + t00`` of stamps of half-size ``half``."""
        tables = getattr(self, "_tables", None)
        if tables is None:
            tables = self._tables = {}
        tab = tables.get(half)
        if tab is not None:
            return tab
        coef = self._spline_coefficients()  # (K, Sp, Sp) B-spline coefficients of the padded basis
        K, Sp, _ = coef.shape
        os_ = float(self.oversample)
        c = (self.basis.shape[1] - 1) / 2.0 + self.SPLINE_PAD
        P = self.n_phase
        S = 2 * half + 1
        g = np.arange(S) - half
        ph = -0.5 + np.arange(P + 1) / P
        pos = c + (g[None, :] - ph[:, None]) * os_  # (P+1, S) spline coordinates of each native pixel
        W = self.bspline3(pos[:, :, None] - np.arange(Sp)[None, None, :]).reshape((P + 1) * S, Sp)
        WT = np.ascontiguousarray(W.T)
        T = np.stack([matmul_rows(matmul_rows(W, ck), WT) for ck in coef])  # (K, (P+1) S, (P+1) S)
        T = T.reshape(K, P + 1, S, P + 1, S).transpose(1, 3, 0, 2, 4)  # (P+1, P+1, K, S, S)
        t00 = T[:-1, :-1]
        t01 = T[:-1, 1:]
        t10 = T[1:, :-1]
        t11 = T[1:, 1:]
        tab = np.stack([t00, t01 - t00, t10 - t00, t11 - t10 - t01 + t00], axis=3)  # (P, P, K, 4, S, S)
        tab = np.ascontiguousarray(tab.reshape(P, P, K * 4, S, S), dtype=np.float32)
        tables[half] = tab
        return tab

    def stamps(self, x: ArrayLike, y: ArrayLike, size: int, xc: ArrayLike | None = None, yc: ArrayLike | None = None,
               *, renormalize: bool = False) -> np.ndarray:
        """:meth:`PSF.stamps` from the phase table (float32; see the class docstring)."""
        size = _check_size(size)
        x, y, xc, yc = _positions(x, y, xc, yc)
        st = self._table_stamps(x, y, size, xc, yc, False)[0]
        return _renormalized(st, "PixelPSF", x, y) if renormalize else st

    def stamps_with_gradient(self, x: ArrayLike, y: ArrayLike, size: int, xc: ArrayLike | None = None,
                             yc: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(P, dP/dx, dP/dy)`` from the phase table: the derivatives of its bilinear blend (exact to ~1e-7)."""
        size = _check_size(size)
        x, y, xc, yc = _positions(x, y, xc, yc)
        return self._table_stamps(x, y, size, xc, yc, True)

    def _table_stamps(self, x, y, size, xc, yc, grad: bool):
        n = x.size
        h = size // 2
        if n == 0:
            z = np.zeros((0, size, size), dtype=np.float32)
            return z, z, z
        c0x = np.floor(x + 0.5).astype(np.int64)
        c0y = np.floor(y + 0.5).astype(np.int64)
        kx = xc - c0x
        ky = yc - c0y
        kmax = int(max(np.abs(kx).max(), np.abs(ky).max()))
        th = h + kmax
        tab = self._table(th)
        P = self.n_phase
        tx = (x - c0x + 0.5) * P
        ty = (y - c0y + 0.5) * P
        ix0 = np.clip(np.floor(tx).astype(np.int64), 0, P - 1)
        iy0 = np.clip(np.floor(ty).astype(np.int64), 0, P - 1)
        fx = (tx - ix0).astype(np.float32)
        fy = (ty - iy0).astype(np.float32)
        a = self._coefficients(x, y).astype(np.float32)  # (n, K)
        K = a.shape[1]
        one = np.ones_like(fx)
        # weights of the 4 bilinear terms (value) and of their x / y derivatives (per phase unit)
        wv = np.stack([one, fx, fy, fx * fy], axis=1)
        out = np.empty((n, size, size), dtype=np.float32)
        gx = np.empty((n, size, size), dtype=np.float32) if grad else None
        gy = np.empty((n, size, size), dtype=np.float32) if grad else None
        zero = np.zeros_like(fx)
        if grad:
            wdx = np.stack([zero, one, zero, fy], axis=1) * np.float32(P)
            wdy = np.stack([zero, zero, one, fx], axis=1) * np.float32(P)
        key = (ky + kmax) * (2 * kmax + 1) + (kx + kmax)
        groups = [np.arange(n)] if kmax == 0 else [np.nonzero(key == k)[0] for k in np.unique(key)]
        # sources are grouped by phase cell: each cell's table block (K * 4, size^2) is used
        # as is by one product for all its sources, instead of being gathered per source
        # (the gather, 16 x size^2 floats per source, was most of the cost)
        cell = iy0 * P + ix0
        wts = [wv] + ([wdx, wdy] if grad else [])
        outs = [out] + ([gx, gy] if grad else [])
        for sel in groups:
            oy = int(ky[sel[0]])
            ox = int(kx[sel[0]])
            t = tab if kmax == 0 else tab[..., th + oy - h:th + oy + h + 1, th + ox - h:th + ox + h + 1]
            sel = sel[np.argsort(cell[sel], kind="stable")]
            cs = cell[sel]
            starts = np.flatnonzero(np.r_[True, cs[1:] != cs[:-1]])
            ends = np.r_[starts[1:], sel.size]
            # per-source weights of the K * 4 table planes, in cell order
            Ws = [(a[sel][:, :, None] * wt[sel][:, None, :]).reshape(sel.size, K * 4) for wt in wts]
            Rs = [np.empty((sel.size, size * size), dtype=np.float32) for _ in wts]
            for lo, hi in zip(starts.tolist(), ends.tolist()):
                c = int(cs[lo])
                Tc = t[c // P, c % P].reshape(K * 4, size * size)
                for Wq, Rq in zip(Ws, Rs):
                    matmul_rows(Wq[lo:hi], Tc, out=Rq[lo:hi])
            for o, Rq in zip(outs, Rs):
                o[sel] = Rq.reshape(sel.size, size, size)
        return out, gx, gy

    # ---- shape
    def _fwhm_at(self, xm, ym):
        xs = np.atleast_1d(xm).ravel()
        ys = np.atleast_1d(ym).ravel()
        ref = self._reference_position()
        vals = []
        for x, y in zip(xs, ys):
            if (x, y) == ref:
                # the reference FWHM is asked for often (measurement sizes its stamps by it)
                f = getattr(self, "_fwhm_ref", None)
                if f is None:
                    f = self._fwhm_ref = fwhm_from_image(self.model(x - self.x_offset, y - self.y_offset),
                                                         self.oversample)
            else:
                f = fwhm_from_image(self.model(x - self.x_offset, y - self.y_offset), self.oversample)
            vals.append(f)
        return np.asarray(vals).reshape(np.shape(xm)) if np.ndim(xm) else vals[0]

    def _ellipticity_at(self, xm, ym):
        """From the adaptive second moments of the model image (pixel-integrated) at each position."""
        xs = np.atleast_1d(np.asarray(xm, dtype=float)).ravel()
        ys = np.atleast_1d(np.asarray(ym, dtype=float)).ravel()
        w = poly_design(xs, ys, self.degree, self.bbox) @ self.coeffs.T  # (n, K)
        models = np.tensordot(w, self.basis, axes=(1, 0))  # (n, S, S)
        S = self.basis.shape[1]
        g = (np.arange(S) - S // 2) / self.oversample
        s2 = (np.atleast_1d(self._fwhm_at(xs, ys)) / FWHM_PER_SIGMA) ** 2
        ixx, iyy, ixy, _ = adaptive_moments(models, np.ones(models.shape, bool), g[None, None, :], g[None, :, None],
                                            s2, 12, S // (2 * self.oversample))
        e, _ = moments_shape(ixx, iyy, ixy)
        return e.reshape(np.shape(xm))

    def _reference_position(self):
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    def _model_bbox(self):
        return self.bbox if self.degree > 0 else None

    def _params(self):
        return {
            "basis": self.basis.copy(),
            "coeffs": self.coeffs.copy(),
            "oversample": float(self.oversample),
            "degree": self.degree,
            "bbox": np.array(self.bbox, dtype=float),
        }

    @classmethod
    def _from_params(cls, p):
        return cls(np.asarray(p["basis"], dtype=float), np.asarray(p["coeffs"], dtype=float),
                   oversample=float(p["oversample"]), degree=int(p["degree"]),
                   bbox=tuple(np.asarray(p["bbox"], dtype=float)))

    def __repr__(self):
        return (f"PixelPSF(K={self.basis.shape[0]}, S={self.basis.shape[1]}, oversample={self.oversample}, "
                f"degree={self.degree})")


# --------------------------------------------------------------------------- rendering
def add_point_sources(image: np.ndarray, psf: PSF, xs, ys, fluxes, size: int | None = None,
                      chunk: int = 2048) -> np.ndarray:
    """Add point sources of ``fluxes`` (image units, total flux) at pixel (xs, ys) in place.

    Each is ``flux`` times its renormalised stamp (:meth:`PSF.stamps`, ``renormalize=True``:
    the whole flux inside the stamp, default size :meth:`PSF.default_size` over the
    positions); stamps are rendered in vectorised chunks and accumulated with
    ``bincount``; the parts falling outside the image are dropped.  Returns ``image``.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValidationError("add_point_sources: image must be 2-D")
    xs = np.atleast_1d(np.asarray(xs, dtype=float))
    ys = np.atleast_1d(np.asarray(ys, dtype=float))
    fl = np.broadcast_to(np.asarray(fluxes, dtype=float), xs.shape)
    if xs.size == 0:
        return image
    ny, nx = img.shape
    size = _check_size(psf.default_size(xs, ys) if size is None else size)
    half = size // 2
    keep = (xs > -half - 1) & (xs < nx + half) & (ys > -half - 1) & (ys < ny + half)
    xs, ys, fl = xs[keep], ys[keep], fl[keep]
    step = max(1, chunk * 225 // (size * size))
    acc = StampAccumulator(img.shape)
    for start in range(0, xs.size, step):
        sl = slice(start, start + step)
        acc.add(psf.stamps(xs[sl], ys[sl], size, renormalize=True) * fl[sl, None, None], xs[sl], ys[sl])
    acc.finish(img)
    return image


class StampAccumulator:
    """Collects stamps (each centred as :meth:`PSF.stamps` places it) and adds them to an image in one pass.

    ``add`` only records flat pixel indices and values; ``finish`` sums them with
    a single ``bincount`` (cheaper than one full-image pass per chunk).
    """

    def __init__(self, shape: tuple[int, int]):
        self.shape = (int(shape[0]), int(shape[1]))
        self._idx: list[np.ndarray] = []
        self._val: list[np.ndarray] = []

    def add(self, stamps: np.ndarray, xs, ys) -> None:
        """Record stamps ``(N, S, S)`` (S odd) centred on the pixels holding (xs, ys) (px)."""
        st = np.asarray(stamps, dtype=float)
        if st.ndim != 3 or st.shape[1] != st.shape[2] or st.shape[1] % 2 == 0:
            raise ValidationError(f"stamps must be (N, S, S) with S odd, got {st.shape}")
        ny, nx = self.shape
        half = st.shape[1] // 2
        g = np.arange(st.shape[1]) - half
        ix = np.floor(np.asarray(xs, dtype=float) + 0.5).astype(np.int64)[:, None, None] + g[None, None, :]
        iy = np.floor(np.asarray(ys, dtype=float) + 0.5).astype(np.int64)[:, None, None] + g[None, :, None]
        ix, iy = np.broadcast_arrays(ix, iy)
        ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        self._idx.append(iy[ok] * nx + ix[ok])
        self._val.append(st[ok])

    def finish(self, image: np.ndarray) -> np.ndarray:
        """Add everything collected to ``image`` (in place) and reset; returns ``image``."""
        if self._idx:
            img = np.asarray(image)
            acc = np.bincount(np.concatenate(self._idx), weights=np.concatenate(self._val),
                              minlength=img.size)
            img += acc.reshape(img.shape).astype(img.dtype, copy=False)
        self._idx, self._val = [], []
        return image
