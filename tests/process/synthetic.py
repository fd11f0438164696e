"""Seeded synthetic star fields for the processing tests (independent of archive.sim).

Stars are pixel-integrated Gaussians (or any PSF model) on a sloped sky with Poisson
noise (gain ``gain`` e-/count) plus read noise; optional cosmic rays (single pixels
and short tracks, much sharper than the PSF). The truth table gives positions and
fluxes in counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from archive.image.psf import GaussianPSF
from archive.process.stamps import scatter_add, stamp_grid


@dataclass
class Field:
    image: np.ndarray  # counts, sky included
    variance: np.ndarray  # expected variance (counts^2)
    sky: np.ndarray  # true sky (counts)
    truth: pd.DataFrame  # x, y, flux (counts), snr (ideal PSF S/N)
    cr_mask: np.ndarray  # pixels hit by a cosmic ray
    psf: object
    gain: float
    read_noise: float


def star_field(shape=(512, 512), n_stars=300, fwhm=3.0, sky=200.0, gradient=0.05, gain=2.0,
               read_noise=5.0, flux_range=(2e2, 3e5), n_cr=0, seed=1, psf=None, min_sep=0.0,
               edge=5) -> Field:
    rng = np.random.default_rng(seed)
    ny, nx = shape
    psf = psf or GaussianPSF(fwhm=fwhm)
    # uniform positions, optionally with a minimum separation
    xs, ys = [], []
    while len(xs) < n_stars:
        x = rng.uniform(edge, nx - 1 - edge)
        y = rng.uniform(edge, ny - 1 - edge)
        if min_sep > 0 and xs:
            d = np.hypot(np.array(xs) - x, np.array(ys) - y)
            if d.min() < min_sep:
                continue
        xs.append(x)
        ys.append(y)
    x = np.array(xs)
    y = np.array(ys)
    lo, hi = flux_range
    # log-uniform fluxes
    flux = np.exp(rng.uniform(np.log(lo), np.log(hi), n_stars))
    size = int(2 * np.ceil(5 * psf.fwhm()) + 1)
    iy, ix = stamp_grid(np.rint(x).astype(int), np.rint(y).astype(int), size)
    st = psf.stamps(x, y, size) * flux[:, None, None]
    stars = scatter_add(shape, iy, ix, st)
    yy, xx = np.mgrid[0:ny, 0:nx]
    skymap = sky * (1 + gradient * (xx / nx - 0.5) + 0.5 * gradient * (yy / ny - 0.5))
    expected = skymap + stars
    electrons = rng.poisson(expected * gain)
    img = electrons / gain + rng.normal(0, read_noise, shape)
    var = expected / gain + read_noise ** 2
    crm = np.zeros(shape, dtype=bool)
    for _ in range(n_cr):
        cx = rng.integers(3, nx - 3)
        cy = rng.integers(3, ny - 3)
        length = rng.integers(1, 6)
        ang = rng.uniform(0, np.pi)
        amp = rng.uniform(30, 200) * np.sqrt(sky / gain + read_noise ** 2)
        for t in range(length):
            px = int(round(cx + t * np.cos(ang)))
            py = int(round(cy + t * np.sin(ang)))
            if 0 <= px < nx and 0 <= py < ny:
                img[py, px] += amp * rng.uniform(0.5, 1.0)
                crm[py, px] = True
    # ideal PSF S/N with the sky-only variance
    ps = psf.stamps(x, y, size)
    p2 = (ps ** 2).sum(axis=(1, 2))
    p3 = (ps ** 3).sum(axis=(1, 2))
    skyvar = sky / gain + read_noise ** 2
    snr = flux / np.sqrt(skyvar / p2 + flux * p3 / (gain * p2 ** 2))
    # distance to the nearest other star brighter than 1% of this one (isolation)
    from scipy.spatial import cKDTree
    tree = cKDTree(np.column_stack([x, y]))
    pairs = tree.query_pairs(4.0 * psf.fwhm(), output_type="ndarray")
    isolated = np.ones(n_stars, dtype=bool)
    if len(pairs):
        a, b = pairs[:, 0], pairs[:, 1]
        isolated[a[flux[b] > 0.01 * flux[a]]] = False
        isolated[b[flux[a] > 0.01 * flux[b]]] = False
    truth = pd.DataFrame({"x": x, "y": y, "flux": flux, "snr": snr, "isolated": isolated})
    return Field(img.astype(np.float32), var.astype(np.float32), skymap.astype(np.float32), truth, crm, psf,
                 gain, read_noise)
