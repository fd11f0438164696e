"""Frames as another pipeline's image generator would write them (not archive.sim, not synthetic.py).

Stars are astropy ``Moffat2D`` profiles evaluated at pixel centres (no pixel integration),
galaxies astropy ``Sersic2D`` profiles convolved with the same Moffat by FFT, on a flat or
gently sloped sky that is *not* subtracted, with Poisson noise in electrons and Gaussian read
noise, written in ADU with a known gain and a known zero point (``MAGZERO``: AB magnitude of
one ADU of total flux). Magnitudes follow rising number counts, so most objects are far below
the detection limit and their light sits under the sky, as on a real deep frame.

Every number the tests compare against is kept: the true sky (ADU), the variance the generator
expects (ADU^2, from the noiseless model), the total flux of every object (ADU) and, for stars,
the exact light of the star itself inside circular apertures (:func:`true_aperture_flux`,
photutils' exact pixel overlap on the star's own noiseless profile).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.modeling.functional_models import Moffat2D, Sersic2D
from scipy.signal import fftconvolve


@dataclass
class ForeignFrame:
    """image, variance (ADU, ADU^2; sky included); sky: true sky (ADU); truth: one row per object
    (``x, y`` px 0-based, ``flux`` total ADU, ``mag`` AB, ``kind`` star/galaxy, ``r_eff`` px);
    psf_fwhm (px), beta: the Moffat; gain (e-/ADU), read_noise (e-), zero_point (AB mag of 1 ADU);
    model: the noiseless image (ADU) of the objects alone."""

    image: np.ndarray
    variance: np.ndarray
    sky: np.ndarray
    truth: pd.DataFrame
    psf_fwhm: float
    beta: float
    gain: float
    read_noise: float
    zero_point: float
    model: np.ndarray

    @property
    def gamma(self) -> float:
        """Moffat core width (px) of the PSF."""
        return moffat_gamma(self.psf_fwhm, self.beta)


def moffat_gamma(fwhm: float, beta: float) -> float:
    """Core width gamma (px) of a Moffat of FWHM ``fwhm`` (px) and power ``beta``."""
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def moffat_stamps(x: np.ndarray, y: np.ndarray, half: int, fwhm: float, beta: float) -> np.ndarray:
    """Unit-total-flux Moffat stamps ``(n, 2 half + 1, 2 half + 1)`` centred on the integer pixels
    nearest ``(x, y)``, evaluated at pixel centres with astropy's ``Moffat2D``."""
    g = moffat_gamma(fwhm, beta)
    amp = (beta - 1.0) / (np.pi * g * g)  # total flux 1 over the plane
    xc = np.floor(x + 0.5)
    yc = np.floor(y + 0.5)
    off = np.arange(-half, half + 1, dtype=np.float64)
    px = (xc[:, None, None] + off[None, None, :])
    py = (yc[:, None, None] + off[None, :, None])
    return Moffat2D.evaluate(px, py, amp, x[:, None, None], y[:, None, None], g, beta)


def _add_stamps(img: np.ndarray, x: np.ndarray, y: np.ndarray, stamps: np.ndarray) -> None:
    ny, nx = img.shape
    half = stamps.shape[1] // 2
    off = np.arange(-half, half + 1)
    iy = (np.floor(y + 0.5).astype(np.int64)[:, None, None] + off[None, :, None])
    ix = (np.floor(x + 0.5).astype(np.int64)[:, None, None] + off[None, None, :])
    iy, ix = np.broadcast_arrays(iy, ix)
    ok = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
    np.add.at(img, (iy[ok], ix[ok]), stamps[ok])


def render(truth: pd.DataFrame, shape: tuple[int, int], fwhm: float, beta: float) -> np.ndarray:
    """Noiseless image (float64, ADU) of the objects in ``truth`` (columns of :class:`ForeignFrame.truth`)."""
    model = np.zeros(shape, dtype=np.float64)
    st = truth[truth["kind"] == "star"]
    sx, sy, sf = (st[c].to_numpy(np.float64) for c in ("x", "y", "flux"))
    # bright stars on wide stamps (their Moffat wings matter), the rest on smaller ones
    bright = sf > 2e4
    for sel, half in ((bright, 60), (~bright, 20)):
        idx = np.flatnonzero(sel)
        for k in range(0, idx.size, 256):
            j = idx[k:k + 256]
            _add_stamps(model, sx[j], sy[j], sf[j, None, None] * moffat_stamps(sx[j], sy[j], half, fwhm, beta))
    ga = truth[truth["kind"] == "galaxy"]
    if len(ga):
        gal = np.zeros(shape, dtype=np.float64)
        half = 40
        off = np.arange(-half, half + 1, dtype=np.float64)
        gx, gy, gf, re, ns, el, th = (ga[c].to_numpy(np.float64)[:, None, None]
                                       for c in ("x", "y", "flux", "r_eff", "n_sersic", "ellip", "theta"))
        for k in range(0, len(ga), 128):
            j = slice(k, k + 128)
            px = np.floor(gx[j] + 0.5) + off[None, None, :]
            py = np.floor(gy[j] + 0.5) + off[None, :, None]
            s = Sersic2D.evaluate(px, py, 1.0, re[j], ns[j], gx[j], gy[j], el[j], th[j])
            s = s / s.sum(axis=(1, 2), keepdims=True) * gf[j]
            _add_stamps(gal, gx[j, 0, 0], gy[j, 0, 0], s)
        kh = int(np.ceil(8 * fwhm))
        ker = moffat_stamps(np.zeros(1), np.zeros(1), kh, fwhm, beta)[0]
        model += fftconvolve(gal, ker / ker.sum(), mode="same")
    return model


def foreign_frame(shape: tuple[int, int] = (1024, 1024), *, fwhm: float = 4.0, beta: float = 2.5,
                  sky_e: float = 1000.0, slope: float = 0.0, gain: float = 1.6, read_noise: float = 5.0,
                  zero_point: float = 28.0, star_density: float = 1.5e-3, galaxy_density: float = 1.5e-3,
                  mag_range: tuple[float, float] = (17.0, 26.0), count_slope: float = 0.3,
                  n_bright: int = 600, bright_flux: tuple[float, float] = (2e3, 3e5),
                  galaxies: bool = True, seed: int = 1) -> ForeignFrame:
    """A seeded frame (see the module doc).

    fwhm (px), beta: the Moffat PSF; sky_e: sky level (e-/px) at the centre; slope: fractional sky
    change across the frame (x and half of it in y); gain (e-/ADU); read_noise (e-);
    zero_point: AB magnitude of 1 ADU; star_density, galaxy_density: objects per px^2 over
    ``mag_range`` (AB), drawn from ``dN/dm ~ 10^(count_slope m)``; n_bright: further stars with
    log-uniform total fluxes over ``bright_flux`` (ADU), the measurable ones.
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    area = float(nx * ny)
    lo, hi = mag_range

    def mags(n):
        # inverse CDF of dN/dm ~ 10^(a m) on [lo, hi]
        a = count_slope * np.log(10.0)
        u = rng.uniform(0, 1, n)
        return np.log(np.exp(a * lo) + u * (np.exp(a * hi) - np.exp(a * lo))) / a

    ns = rng.poisson(star_density * area)
    sx = rng.uniform(-10, nx + 10, ns + n_bright)
    sy = rng.uniform(-10, ny + 10, ns + n_bright)
    lf = np.log(np.asarray(bright_flux, float))
    sf = np.concatenate([10.0 ** (-0.4 * (mags(ns) - zero_point)), np.exp(rng.uniform(lf[0], lf[1], n_bright))])
    rows = [pd.DataFrame({"x": sx, "y": sy, "flux": sf, "kind": "star", "r_eff": 0.0, "n_sersic": 0.0,
                          "ellip": 0.0, "theta": 0.0})]
    if galaxies:
        ng = rng.poisson(galaxy_density * area)
        rows.append(pd.DataFrame({
            "x": rng.uniform(-10, nx + 10, ng), "y": rng.uniform(-10, ny + 10, ng),
            "flux": 10.0 ** (-0.4 * (mags(ng) - zero_point)), "kind": "galaxy",
            "r_eff": np.exp(rng.uniform(np.log(1.5), np.log(8.0), ng)), "n_sersic": rng.choice([1.0, 1.0, 2.0, 4.0], ng),
            "ellip": rng.uniform(0.0, 0.6, ng), "theta": rng.uniform(0, np.pi, ng)}))
    truth = pd.concat(rows, ignore_index=True)
    truth["mag"] = zero_point - 2.5 * np.log10(truth["flux"].to_numpy())
    model = render(truth, shape, fwhm, beta)
    yy, xx = np.mgrid[0:ny, 0:nx]
    sky = (sky_e / gain) * (1.0 + slope * (xx / nx - 0.5) + 0.5 * slope * (yy / ny - 0.5))
    expected_e = (sky + model) * gain
    img = (rng.poisson(expected_e) + rng.normal(0.0, read_noise, shape)) / gain
    var = expected_e / gain ** 2 + (read_noise / gain) ** 2
    return ForeignFrame(img.astype(np.float32), var.astype(np.float32), sky.astype(np.float32), truth, fwhm, beta,
                        gain, read_noise, zero_point, model.astype(np.float32))


def true_aperture_flux(frame: ForeignFrame, x: np.ndarray, y: np.ndarray, flux: np.ndarray, r: float) -> np.ndarray:
    """Light (ADU) of stars of total ``flux`` at ``(x, y)`` inside circular apertures of radius
    ``r`` px centred on them: photutils' exact aperture overlap times the star's own noiseless
    profile (as rendered: Moffat at pixel centres)."""
    from photutils.aperture import CircularAperture

    half = int(np.ceil(r)) + 2
    st = moffat_stamps(np.asarray(x, float), np.asarray(y, float), half, frame.psf_fwhm, frame.beta)
    # aperture masks on the stamp grid: the star sits at (dx, dy) from the stamp centre
    dx = np.asarray(x) - np.floor(np.asarray(x) + 0.5) + half
    dy = np.asarray(y) - np.floor(np.asarray(y) + 0.5) + half
    out = np.empty(len(st))
    for i, m in enumerate(CircularAperture(np.column_stack([dx, dy]), r).to_mask(method="exact")):
        out[i] = m.get_values(st[i]).sum()
    return out * np.asarray(flux, float)
