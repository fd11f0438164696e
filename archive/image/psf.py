"""Point-spread-function models.

Stamp convention (all classes)
------------------------------
Pixel centres sit at integer coordinates (pixel ``[iy, ix]`` of a numpy array
covers ``ix - 0.5 <= x < ix + 0.5``).  ``psf.image(x, y, size)`` returns a
``size x size`` float64 array (``size`` odd) whose **centre pixel**
``[size // 2, size // 2]`` corresponds to the image pixel that contains
``(x, y)``, namely ``(ix, iy) = (floor(x + 0.5), floor(y + 0.5))``.  Inside the
stamp the PSF centroid sits at stamp coordinates
``(size // 2 + dx, size // 2 + dy)`` with ``dx = x - ix`` and ``dy = y - iy`` in
``[-0.5, 0.5)``.  Values are the PSF **integrated over each pixel** (the
pixel-convolved or "effective" PSF), normalised so the stamp sums to exactly 1
(the part of the profile outside the stamp is dropped and the rest rescaled).
The stamp's lower-left pixel lies at image pixel :meth:`PSF.stamp_origin`.

To add a star of flux F at (x, y) to an image: ``x0, y0 = psf.stamp_origin(x, y, s)``
then ``image[y0:y0+s, x0:x0+s] += F * psf.image(x, y, s)`` (see
:func:`add_point_sources` for a vectorised, edge-safe version).

Positions given to a PSF are pixel coordinates of the image it belongs to.  A
PSF taken from a sub-image (``Exposure.subimage``) carries the offset of that
sub-image (:meth:`PSF.shifted`), so it keeps describing the same physical pixels.

FWHM: :meth:`PSF.fwhm` is the FWHM of the model's own profile - the
continuous profile for Gaussian and Moffat, the pixel-integrated (effective)
profile for :class:`PixelPSF`, which samples nothing else.  To compare models
of different kinds use :meth:`PSF.effective_fwhm`, measured the same way on
every class from an oversampled stamp (for a Gaussian it is
``2.3548 sqrt(sigma^2 + 1/12)``).

Every class round-trips through FITS: :meth:`PSF.to_hdu` writes a one-row
binary table (EXTNAME ``PSF``, card ``PSFTYPE`` naming the class) and
:func:`PSF.from_hdu` reads any registered class back with bit-identical
parameters.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import numpy as np
from astropy.io import fits
from astropy.table import Table
from scipy import ndimage, special

from archive.errors import ValidationError

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


# --------------------------------------------------------------------------- base class
class PSF:
    """Base class: see the module docstring for the stamp convention."""

    #: Name written in the PSFTYPE card; registered automatically.
    kind: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type["PSF"]]] = {}

    #: offset added to positions before evaluating the model (see :meth:`shifted`)
    x_offset: float = 0.0
    y_offset: float = 0.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            PSF._registry[cls.kind] = cls

    # ---- to implement
    def _pixel_response(self, xm, ym, u, v) -> np.ndarray:
        """Pixel-integrated PSF at offsets (u, v) (pixels) from its centre at model position (xm, ym).

        Arrays broadcast together; the result need not be normalised.
        """
        raise NotImplementedError

    def _fwhm_at(self, xm, ym):
        """FWHM (pixels) at model-frame positions (vectorised)."""
        raise NotImplementedError

    def _reference_position(self) -> tuple[float, float]:
        """Model-frame position used when ``fwhm()`` is called without a position."""
        return (0.0, 0.0)

    def _params(self) -> dict:
        raise NotImplementedError

    @classmethod
    def _from_params(cls, params: dict) -> "PSF":
        raise NotImplementedError

    # ---- public API
    def image(self, x: float, y: float, size: int | None = None) -> np.ndarray:
        """Normalised ``size x size`` stamp (float64, sum 1) of the PSF at pixel (x, y).

        ``size`` must be odd; default :meth:`default_size`.  See the module
        docstring for where the stamp sits.
        """
        if size is None:
            size = self.default_size(x, y)
        return self.render_stamps(np.array([float(x)]), np.array([float(y)]), size)[0]

    def render_stamps(self, xs, ys, size: int) -> np.ndarray:
        """Stamps ``(N, size, size)`` for N positions, same convention as :meth:`image`."""
        size = _check_size(size)
        xs = np.atleast_1d(np.asarray(xs, dtype=float))
        ys = np.atleast_1d(np.asarray(ys, dtype=float))
        if xs.shape != ys.shape or xs.ndim != 1:
            raise ValidationError("render_stamps: xs and ys must be 1-D arrays of equal length")
        if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
            raise ValidationError("render_stamps: positions must be finite")
        dx = xs - np.floor(xs + 0.5)
        dy = ys - np.floor(ys + 0.5)
        g = np.arange(size, dtype=float) - size // 2
        u = g[None, None, :] - dx[:, None, None]
        v = g[None, :, None] - dy[:, None, None]
        xm = (xs + self.x_offset)[:, None, None]
        ym = (ys + self.y_offset)[:, None, None]
        vals = np.asarray(self._pixel_response(xm, ym, u, v), dtype=float)
        vals = np.broadcast_to(vals, (xs.size, size, size)).copy()
        total = vals.sum(axis=(1, 2), keepdims=True)
        if np.any(~(total > 0)):
            raise ValidationError(f"{type(self).__name__}: PSF stamp has no positive flux")
        return vals / total

    @staticmethod
    def stamp_origin(x: float, y: float, size: int) -> tuple[int, int]:
        """Image pixel ``(x0, y0)`` of a stamp's lower-left pixel for a source at (x, y)."""
        half = int(size) // 2
        return int(math.floor(x + 0.5)) - half, int(math.floor(y + 0.5)) - half

    def fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """Full width at half maximum in pixels at (x, y); model reference position when omitted."""
        if x is None or y is None:
            xm, ym = self._reference_position()
        else:
            xm, ym = float(x) + self.x_offset, float(y) + self.y_offset
        return float(np.asarray(self._fwhm_at(np.asarray(xm), np.asarray(ym))))

    def effective_fwhm(self, x: float | None = None, y: float | None = None) -> float:
        """FWHM (pixels) of the pixel-integrated PSF, measured on a stamp (comparable across classes)."""
        if x is None or y is None:
            xm, ym = self._reference_position()
            x, y = xm - self.x_offset, ym - self.y_offset
        size = max(self.default_size(x, y), 2 * int(math.ceil(3.0 * self.fwhm(x, y))) + 1)
        return fwhm_from_image(self.image(float(np.floor(x + 0.5)), float(np.floor(y + 0.5)), size))

    def fwhm_at(self, xs, ys) -> np.ndarray:
        """Vectorised :meth:`fwhm` (pixels) at arrays of positions."""
        xm = np.asarray(xs, dtype=float) + self.x_offset
        ym = np.asarray(ys, dtype=float) + self.y_offset
        return np.broadcast_to(np.asarray(self._fwhm_at(xm, ym), dtype=float), np.broadcast(xm, ym).shape).copy()

    def default_size(self, x: float | None = None, y: float | None = None) -> int:
        """Odd stamp size holding the profile out to ~4 FWHM (at least 15)."""
        f = self.fwhm(x, y)
        return max(15, 2 * int(math.ceil(4.0 * f)) + 1)

    def shifted(self, dx: float, dy: float) -> "PSF":
        """Copy for an image whose pixel (0, 0) is pixel (dx, dy) of this PSF's image."""
        new = copy.deepcopy(self)
        new.x_offset = self.x_offset + float(dx)
        new.y_offset = self.y_offset + float(dy)
        return new

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


def _check_size(size) -> int:
    s = int(size)
    if s != size or s < 1 or s % 2 == 0:
        raise ValidationError(f"PSF stamp size must be a positive odd integer, got {size!r}")
    return s


# --------------------------------------------------------------------------- Gaussian
class GaussianPSF(PSF):
    """Circular Gaussian of standard deviation ``sigma`` pixels (FWHM = 2.3548 sigma)."""

    kind = "gaussian"

    def __init__(self, sigma: float):
        s = float(sigma)
        if not (math.isfinite(s) and s > 0):
            raise ValidationError(f"GaussianPSF sigma must be finite and > 0, got {sigma!r}")
        self.sigma = s

    def _pixel_response(self, xm, ym, u, v):
        k = 1.0 / (math.sqrt(2.0) * self.sigma)
        fx = 0.5 * (special.erf((u + 0.5) * k) - special.erf((u - 0.5) * k))
        fy = 0.5 * (special.erf((v + 0.5) * k) - special.erf((v - 0.5) * k))
        return fx * fy

    def _fwhm_at(self, xm, ym):
        return np.full(np.broadcast(xm, ym).shape, FWHM_PER_SIGMA * self.sigma)

    def _params(self):
        return {"sigma": self.sigma}

    @classmethod
    def _from_params(cls, p):
        return cls(p["sigma"])

    def __repr__(self):
        return f"GaussianPSF(sigma={self.sigma!r})"


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
        self.ellipticity = e
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

    def _reference_position(self):
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    def _pixel_response(self, xm, ym, u, v):
        fwhm = self._fwhm_at(xm, ym)
        if np.any(~(fwhm > 0)):
            raise ValidationError("MoffatPSF: spatial variation makes the FWHM non-positive here")
        alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / self.beta) - 1.0))
        inv_a2 = 1.0 / alpha**2
        norm = (self.beta - 1.0) / math.pi * inv_a2
        n = self.oversample
        sub = (np.arange(n) + 0.5) / n - 0.5
        out = None
        if self.ellipticity == 0.0:
            for sy in sub:
                vv = (v + sy) ** 2
                for sx in sub:
                    term = (1.0 + ((u + sx) ** 2 + vv) * inv_a2) ** (-self.beta)
                    out = term if out is None else out + term
            return out * (norm / (n * n))
        # area-preserving ellipse: r^2 = q x'^2 + y'^2 / q along the major (x') and minor (y') axes
        q = 1.0 - self.ellipticity
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
            "ellipticity": self.ellipticity,
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
                f"ellipticity={self.ellipticity!r}, theta={self.theta!r})")


# --------------------------------------------------------------------------- pixelized
class PixelPSF(PSF):
    """Pixelized, spatially varying effective PSF.

    The model at position (x, y) is ``M(x, y) = sum_k w_k(x, y) * basis[k]`` with
    ``w_k(x, y) = sum_t coeffs[k, t] * term_t(u, v)`` (monomials of
    :func:`poly_terms` up to ``degree`` over ``bbox`` mapped to [-1, 1]).

    ``basis`` images (``K x S x S``, S odd) sample the **pixel-integrated** PSF
    (what one native pixel would collect) at a spacing of ``1 / oversample``
    native pixels (``oversample`` may be fractional, as PSFEx's PSF_SAMP),
    centred on element ``[(S-1)/2, (S-1)/2]``.  A native stamp
    samples ``M`` at the native pixel-centre offsets with cubic-spline
    interpolation and is normalised to sum 1.

    With ``coeffs=None`` the basis has one image per monomial
    (``K = n_poly_terms(degree)``) and ``coeffs`` is the identity - the natural
    output of a per-pixel polynomial fit (see :meth:`from_psf`).
    """

    kind = "pixel"

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
        xm = (gx + psf.x_offset)[:, None, None]
        ym = (gy + psf.y_offset)[:, None, None]
        samples = np.asarray(psf._pixel_response(xm, ym, g[None, None, :], g[None, :, None]))
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
        """The oversampled model image ``M(x, y)`` (``S x S``)."""
        w = poly_design(float(x) + self.x_offset, float(y) + self.y_offset, self.degree, self.bbox)
        weights = self.coeffs @ w
        return np.tensordot(weights, self.basis, axes=(0, 0))

    def default_size(self, x=None, y=None) -> int:
        half = int(((self.basis.shape[1] - 1) / 2) / self.oversample)
        return 2 * half + 1

    #: zero padding (samples) around the basis before the spline prefilter
    _PAD = 4

    def _spline_coefficients(self) -> np.ndarray:
        """Cubic B-spline coefficients of the zero-padded basis images (cached)."""
        coef = getattr(self, "_coef_cache", None)
        if coef is None:
            P = self._PAD
            padded = np.pad(self.basis, ((0, 0), (P, P), (P, P)))
            coef = np.stack([ndimage.spline_filter(b, order=3, mode="mirror") for b in padded])
            self._coef_cache = coef
        return coef

    @staticmethod
    def _bspline3(t: np.ndarray) -> np.ndarray:
        a = np.abs(t)
        return np.where(a < 1.0, 2.0 / 3.0 - a**2 + 0.5 * a**3, np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))

    def render_stamps(self, xs, ys, size: int) -> np.ndarray:
        """Vectorised stamps: cubic B-spline interpolation of the (zero-padded) model at the pixel centres.

        The model is linear in the basis, so the spline coefficients of the
        basis are computed once and combined per star; the separable spline
        weights turn each stamp into two small matrix products.
        """
        size = _check_size(size)
        xs = np.atleast_1d(np.asarray(xs, dtype=float))
        ys = np.atleast_1d(np.asarray(ys, dtype=float))
        if xs.shape != ys.shape or xs.ndim != 1:
            raise ValidationError("render_stamps: xs and ys must be 1-D arrays of equal length")
        if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
            raise ValidationError("render_stamps: positions must be finite")
        coef = self._spline_coefficients()
        n_pad = coef.shape[1]
        c = (self.basis.shape[1] - 1) / 2.0 + self._PAD
        half = size // 2
        g = np.arange(size, dtype=float) - half
        # spline coefficients any star can touch (|offset| <= 0.5 pixel, 4-tap kernel)
        lo = max(int(math.floor(c - (half + 0.5) * self.oversample)) - 2, 0)
        hi = min(int(math.ceil(c + (half + 0.5) * self.oversample)) + 2, n_pad - 1)
        crop = np.ascontiguousarray(coef[:, lo:hi + 1, lo:hi + 1])
        n_c = hi - lo + 1
        taps = np.arange(4)
        out = np.empty((xs.size, size, size))
        step = max(1, 2_000_000 // (n_c * n_c))
        for start in range(0, xs.size, step):
            sl = slice(start, start + step)
            x, y = xs[sl], ys[sl]
            n = x.size
            dx = x - np.floor(x + 0.5)
            dy = y - np.floor(y + 0.5)
            design = poly_design(x + self.x_offset, y + self.y_offset, self.degree, self.bbox)  # (n, T)
            cm = np.tensordot(design @ self.coeffs.T, crop, axes=(1, 0))  # (n, R, R) cropped model coefficients
            # sample positions (in cropped coefficient indices) and their 4 spline taps
            px = c - lo + (g[None, :] - dx[:, None]) * self.oversample  # (n, size)
            py = c - lo + (g[None, :] - dy[:, None]) * self.oversample
            ix = np.floor(px).astype(np.int64)[:, :, None] - 1 + taps  # (n, size, 4) spline taps
            iy = np.floor(py).astype(np.int64)[:, :, None] - 1 + taps
            wx = np.where((ix >= 0) & (ix < n_c), self._bspline3(px[:, :, None] - ix), 0.0)
            wy = np.where((iy >= 0) & (iy < n_c), self._bspline3(py[:, :, None] - iy), 0.0)
            ix = np.clip(ix, 0, n_c - 1)
            iy = np.clip(iy, 0, n_c - 1)
            # along x for every cropped row: (n, R, size); then along y: (n, size, size)
            gx = np.take_along_axis(cm, np.broadcast_to(ix.reshape(n, 1, size * 4), (n, n_c, size * 4)), axis=2)
            tmp = np.einsum("nrjb,njb->nrj", gx.reshape(n, n_c, size, 4), wx)
            gy = np.take_along_axis(tmp, np.broadcast_to(iy.reshape(n, size * 4, 1), (n, size * 4, size)), axis=1)
            out[sl] = np.einsum("niaj,nia->nij", gy.reshape(n, size, 4, size), wy)
        total = out.sum(axis=(1, 2), keepdims=True)
        if np.any(~(total > 0)):
            bad = int(np.flatnonzero(~(total.ravel() > 0))[0])
            raise ValidationError(f"PixelPSF: stamp at ({xs[bad]}, {ys[bad]}) has no positive flux")
        return out / total

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_coef_cache", None)
        return state

    def _fwhm_at(self, xm, ym):
        xs = np.atleast_1d(xm).ravel()
        ys = np.atleast_1d(ym).ravel()
        vals = [fwhm_from_image(self.model(x - self.x_offset, y - self.y_offset), self.oversample)
                for x, y in zip(xs, ys)]
        return np.asarray(vals).reshape(np.shape(xm)) if np.ndim(xm) else vals[0]

    def _reference_position(self):
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

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

    Stamps are rendered in vectorised chunks and accumulated with ``bincount``;
    the parts falling outside the image are dropped.  Returns ``image``.
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
    if size is None:
        fw = float(np.max(psf.fwhm_at(xs, ys))) if not isinstance(psf, PixelPSF) else None
        size = max(15, 2 * int(math.ceil(4.0 * fw)) + 1) if fw is not None else psf.default_size()
    size = _check_size(size)
    half = size // 2
    keep = (xs > -half - 1) & (xs < nx + half) & (ys > -half - 1) & (ys < ny + half)
    xs, ys, fl = xs[keep], ys[keep], fl[keep]
    step = max(1, chunk * 225 // (size * size))
    acc = StampAccumulator(img.shape)
    for start in range(0, xs.size, step):
        sl = slice(start, start + step)
        acc.add(psf.render_stamps(xs[sl], ys[sl], size) * fl[sl, None, None], xs[sl], ys[sl])
    acc.finish(img)
    return image


class StampAccumulator:
    """Collects stamps (each centred as :meth:`PSF.image` places it) and adds them to an image in one pass.

    ``add`` only records flat pixel indices and values; ``finish`` sums them with
    a single ``bincount`` (cheaper than one full-image pass per chunk).
    """

    def __init__(self, shape: tuple[int, int]):
        self.shape = (int(shape[0]), int(shape[1]))
        self._idx: list[np.ndarray] = []
        self._val: list[np.ndarray] = []

    def add(self, stamps: np.ndarray, xs, ys) -> None:
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


def add_stamps(image: np.ndarray, stamps: np.ndarray, xs, ys) -> np.ndarray:
    """Add ``stamps`` (N, S, S; S odd) to ``image`` in place, each centred as :meth:`PSF.image` places it.

    Stamp ``n``'s centre pixel lands on image pixel ``(floor(xs[n] + 0.5), floor(ys[n] + 0.5))``;
    pixels outside the image are dropped.  Returns ``image``.
    """
    acc = StampAccumulator(np.shape(image))
    acc.add(stamps, xs, ys)
    return acc.finish(image)
