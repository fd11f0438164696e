"""Science/template pairs made with numpy for the difference-imaging tests: the same static
sky (stars of known flux), different PSFs and noise, transients and variable stars of known
flux change in the science image only; nJy-like units, variance planes that are right."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from astropy.wcs import WCS

from archive.image.exposure import Exposure, ExposureInfo
from archive.image.psf import GaussianPSF, MoffatPSF, add_point_sources


@dataclasses.dataclass
class Pair:
    science: Exposure
    template: Exposure
    stars: pd.DataFrame      # x, y, flux (template), dflux (science - template)
    transients: pd.DataFrame  # x, y, flux (science only)


def tan_wcs(n: int) -> WCS:
    """A TAN grid of n x n pixels of 0.2" centred on (150, +2) deg."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [n / 2 + 0.5, n / 2 + 0.5]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w


def make_pair(n: int = 512, seed: int = 1, n_stars: int = 150, n_transients: int = 12, n_variables: int = 5,
              science_psf=None, template_psf=None, sky_sigma: float = 20.0, template_sigma: float = 8.0,
              change: bool = True) -> Pair:
    rng = np.random.default_rng(seed)
    sci_psf = science_psf or MoffatPSF(fwhm=4.2, beta=3.0)
    tpl_psf = template_psf or GaussianPSF(fwhm=3.0)
    x = rng.uniform(20, n - 20, n_stars)
    y = rng.uniform(20, n - 20, n_stars)
    flux = 10 ** rng.uniform(3.3, 5.6, n_stars)
    dflux = np.zeros(n_stars)
    n_variables = min(n_variables, n_stars)
    if change and n_variables:
        dflux[:n_variables] = flux[:n_variables] * rng.choice([-0.3, 0.3], n_variables)
    stars = pd.DataFrame({"x": x, "y": y, "flux": flux, "dflux": dflux})
    tx = rng.uniform(30, n - 30, n_transients if change else 0)
    ty = rng.uniform(30, n - 30, n_transients if change else 0)
    tflux = 10 ** rng.uniform(3.2, 4.3, len(tx))
    transients = pd.DataFrame({"x": tx, "y": ty, "flux": tflux})

    def render(psf, fl, noise, extra=None):
        img = np.zeros((n, n))
        add_point_sources(img, psf, x, y, fl)
        if extra is not None and len(extra):
            add_point_sources(img, psf, extra["x"].to_numpy(), extra["y"].to_numpy(), extra["flux"].to_numpy())
        var = noise ** 2 + np.clip(img, 0, None) * 0.05  # sky + source photon noise (0.05 nJy per nJy)
        img = img + rng.normal(0, 1, (n, n)) * np.sqrt(var)
        return img.astype(np.float32), var.astype(np.float32)

    s_img, s_var = render(sci_psf, flux + dflux, sky_sigma, transients)
    t_img, t_var = render(tpl_psf, flux, template_sigma)
    info = ExposureInfo(band="r", visit=1, detector=0, mjd=60010.0)
    science = Exposure(s_img, variance=s_var, wcs=tan_wcs(n), psf=sci_psf, info=info)
    template = Exposure(t_img, variance=t_var, wcs=tan_wcs(n), psf=tpl_psf, info=ExposureInfo(band="r"))
    return Pair(science, template, stars, transients)


def psf_flux(exposure: Exposure, x, y, size: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """PSF-fit flux and error at known positions: sum(P D / V) / sum(P^2 / V)."""
    psf = exposure.psf
    stamps = psf.stamps(np.asarray(x, float), np.asarray(y, float), size)
    fl, er = [], []
    for k, (xx, yy) in enumerate(zip(x, y)):
        x0, y0 = psf.stamp_origin(xx, yy, size)
        d = exposure.image[y0:y0 + size, x0:x0 + size].astype(float)
        v = exposure.variance[y0:y0 + size, x0:x0 + size].astype(float)
        p = stamps[k]
        a = (p * p / v).sum()
        fl.append((p * d / v).sum() / a)
        er.append(1 / np.sqrt(a))
    return np.array(fl), np.array(er)
