"""In-memory calibrated exposures with known answers (no raw frames, no ISR).

:func:`make_calexp` turns one rendered epoch into an :class:`~archive.image.Exposure`
as a perfect instrument-signature removal would produce it: image in adu,
Poisson + read noise, exact variance, the true TAN-SIP WCS, the true PSF and
the true photometric calibration.  Handy for testing detection, measurement,
astrometry, coadds and difference imaging against the truth without running
the calibration chain.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from archive.image.calib import PhotoCalib
from archive.image.exposure import Exposure, ExposureInfo
from archive.image.mask import bits, default_mask_planes
from archive.sim.config import SimConfig
from archive.sim.render import EpochModel, plan_epochs, render_epoch
from archive.sim.skymodel import make_sky, rng_for


def make_calexp(config: SimConfig, model: EpochModel, *, noise: bool = True, subtract_sky: bool = False,
                cosmic_rays: bool = False) -> Exposure:
    """Calibrated exposure (adu) of a rendered epoch.

    ``image = (model_e [+ cosmic-ray charge] + noise) / gain`` (minus the true
    sky when ``subtract_sky``); ``variance = (model_e / gain + (read_noise /
    gain)^2) / gain`` in adu^2, the exact expected variance; noise is drawn
    from it (deterministic from the seed).  Mask: ``CR`` on cosmic-ray pixels
    when they are included, ``SAT`` where the model exceeds the full well (the
    model is not clipped there).  WCS, PSF and PhotoCalib are the truth.
    """
    ep = model.epoch
    gain = model.gain
    var_adu = (model.model_e / gain + (config.read_noise / gain) ** 2) / gain
    img = model.model_e / gain
    if noise:
        rng = rng_for(config, 20, ep.index, model.detector)
        img = img + rng.standard_normal(img.shape) * np.sqrt(var_adu)
    planes = default_mask_planes()
    mask = np.zeros(img.shape, dtype=np.int32)
    if cosmic_rays:
        img = img + model.cosmic_e / gain
        mask[model.cosmic_e > 0] |= bits(planes, "CR")
    mask[model.model_e > config.full_well] |= bits(planes, "SAT")
    if subtract_sky:
        img = img - model.sky_e / gain
    info = ExposureInfo(visit=ep.visit, detector=model.detector, band=ep.band, mjd=ep.mjd, exp_time=ep.exp_time,
                        airmass=ep.airmass, gain=gain, read_noise=config.read_noise,
                        saturation=config.full_well / gain,
                        extras={"sim_seed": int(config.seed), "quality": ep.quality, "sky_subtracted": subtract_sky})
    return Exposure(img.astype(np.float32), mask, var_adu.astype(np.float32), wcs=model.wcs, psf=model.psf,
                    photo_calib=PhotoCalib(model.njy_per_adu), info=info, mask_planes=planes)


def simulate_calexps(config: SimConfig, *, detector: int = 0, noise: bool = True,
                     subtract_sky: bool = False) -> tuple[list[Exposure], pd.DataFrame, pd.DataFrame]:
    """All epochs of one detector as calexps, with the per-epoch source truth and the object table.

    Returns ``(exposures, sources, objects)``; ``sources`` has the columns of
    :func:`archive.sim.render.render_epoch` for every epoch.
    """
    sky = make_sky(config)
    exposures, sources = [], []
    for ep in plan_epochs(config):
        model = render_epoch(config, sky, ep, detector)
        exposures.append(make_calexp(config, model, noise=noise, subtract_sky=subtract_sky))
        sources.append(model.sources)
    return exposures, pd.concat(sources, ignore_index=True), sky
