"""Calibrated multi-extension FITS epochs as other pipelines write them (LSST-style
IMAGE/MASK/VARIANCE with ``MP_*`` mask keys), made here with numpy and astropy only
-- not with :mod:`archive.sim` -- so the archive meets files it did not write.

Each epoch: Moffat stars (pixel-integrated by sub-sampling) of a fixed truth
catalogue on an unsubtracted sky, Poisson + read noise, a variance plane, a mask
in the LSST bit layout (which differs from the archive's default layout), a TAN
WCS with a small pointing offset per epoch, and the primary-header cards the
caller chooses (time, zero point, ...).  There is no ``VISIT`` card unless the
caller adds one.  Fluxes in the truth table are nJy.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS

#: The LSST afw mask-plane layout (not the archive's default).
LSST_PLANES = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5, "DETECTED_NEGATIVE": 6,
               "SUSPECT": 7, "NO_DATA": 8}

RA0, DEC0 = 150.10, 2.20
PIXSCALE = 0.4  # arcsec / px


def truth_catalog(seed: int = 7, n: int = 160, size_px: int = 512) -> pd.DataFrame:
    """Stars over the field: ra, dec (deg), mag (AB), flux (nJy)."""
    rng = np.random.default_rng(seed)
    half = 0.5 * (size_px - 40) * PIXSCALE / 3600.0
    dec = DEC0 + rng.uniform(-half, half, n)
    ra = RA0 + rng.uniform(-half, half, n) / np.cos(np.radians(DEC0))
    mag = rng.uniform(16.5, 21.5, n)
    return pd.DataFrame({"ra": ra, "dec": dec, "mag": mag, "flux": 10.0 ** (-0.4 * (mag - 31.4))})


@dataclass
class Epoch:
    """What one written epoch holds (for the tests' truth)."""

    path: pathlib.Path
    njy_per_count: float  # truth: nJy of one count of the IMAGE plane
    truth: pd.DataFrame  # the stars inside the frame, with x, y (0-based px)
    cards: dict = field(default_factory=dict)


def _moffat_stamps(dx: np.ndarray, dy: np.ndarray, fwhm_px: float, beta: float, half: int, sub: int = 5):
    """Pixel-integrated, unit-sum Moffat stamps (n, 2 half + 1, 2 half + 1) at sub-pixel offsets."""
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    g = (np.arange(sub) + 0.5) / sub - 0.5
    pix = np.arange(-half, half + 1, dtype=float)
    xs = (pix[:, None] + g[None, :]).ravel()  # (npix * sub)
    out = []
    for ddx, ddy in zip(dx, dy):
        rx = xs[None, :] - ddx
        ry = xs[:, None] - ddy
        prof = (1.0 + (rx ** 2 + ry ** 2) / alpha ** 2) ** (-beta)
        m = prof.reshape(2 * half + 1, sub, 2 * half + 1, sub).mean(axis=(1, 3))
        out.append(m)
    stamps = np.array(out)
    # normalise to the analytic total (the light beyond the stamp is lost, as in a real image)
    total = np.pi * alpha ** 2 / (beta - 1.0)
    return stamps / total


def write_epoch(path: pathlib.Path, cards: dict, *, seed: int, truth: pd.DataFrame, njy_per_count: float,
                size_px: int = 512, fwhm_arcsec: float = 1.2, beta: float = 3.0, sky: float = 250.0,
                gain: float = 2.0, read_noise: float = 5.0, shift_arcsec: tuple[float, float] = (0.0, 0.0),
                rotation_deg: float = 0.3, per_second: float | None = None) -> Epoch:
    """Write one IMAGE/MASK/VARIANCE epoch; ``cards`` go to the primary header as given.

    ``njy_per_count`` is the truth for one count of the exposure; with ``per_second``
    (the exposure time, s) the planes are written as rates (counts/s, variance / t^2) and
    the returned ``njy_per_count`` is per unit of the stored data (count/s)."""
    rng = np.random.default_rng(seed)
    ny = nx = size_px
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [RA0 + shift_arcsec[0] / 3600.0 / np.cos(np.radians(DEC0)), DEC0 + shift_arcsec[1] / 3600.0]
    w.wcs.crpix = [nx / 2.0 + 0.5, ny / 2.0 + 0.5]
    th = np.radians(rotation_deg)
    s = PIXSCALE / 3600.0
    w.wcs.cd = s * np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]])
    w.wcs.set()
    x, y = w.all_world2pix(truth["ra"].to_numpy(), truth["dec"].to_numpy(), 0)
    half = 15
    inside = (x > half) & (x < nx - 1 - half) & (y > half) & (y < ny - 1 - half)
    t = truth[inside].copy()
    t["x"], t["y"] = x[inside], y[inside]
    counts = t["flux"].to_numpy() / njy_per_count
    ix, iy = np.rint(t["x"].to_numpy()).astype(int), np.rint(t["y"].to_numpy()).astype(int)
    stamps = _moffat_stamps(t["x"].to_numpy() - ix, t["y"].to_numpy() - iy, fwhm_arcsec / PIXSCALE, beta, half)
    model = np.full((ny, nx), sky, dtype=np.float64)
    for k in range(len(t)):
        model[iy[k] - half:iy[k] + half + 1, ix[k] - half:ix[k] + half + 1] += counts[k] * stamps[k]
    variance = model / gain + (read_noise / gain) ** 2
    image = model + rng.normal(size=model.shape) * np.sqrt(variance)
    mask = np.zeros((ny, nx), dtype=np.int32)
    bad_col = int(rng.integers(40, nx - 40))
    mask[:, bad_col] |= 1 << LSST_PLANES["BAD"]
    image[:, bad_col] = 0.0
    mask[:2, :] |= 1 << LSST_PLANES["EDGE"]
    mask[-2:, :] |= 1 << LSST_PLANES["EDGE"]

    if per_second:
        image, variance = image / per_second, variance / per_second ** 2
        njy_per_count = njy_per_count * per_second
    primary = fits.PrimaryHDU()
    for key, value in cards.items():
        primary.header[key if len(key) <= 8 else f"HIERARCH {key}"] = value
    wcs_cards = w.to_header()
    hdus = [primary]
    for name, data in (("IMAGE", image.astype(np.float32)), ("MASK", mask), ("VARIANCE", variance.astype(np.float32))):
        hdu = fits.ImageHDU(data, header=wcs_cards.copy(), name=name)
        if name == "MASK":
            for plane, bit in LSST_PLANES.items():
                hdu.header[f"HIERARCH MP_{plane}"] = bit
        hdus.append(hdu)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return Epoch(path=pathlib.Path(path), njy_per_count=njy_per_count, truth=t.reset_index(drop=True),
                 cards=dict(cards))


def njy_per_count_of_zp(zp_mag: float) -> float:
    """nJy of one count for an AB zero point (mag of one count)."""
    return 10.0 ** (-0.4 * (zp_mag - 31.4))
