"""Survey simulator with truth tables.

- :class:`~archive.sim.config.SimConfig`: everything that defines a survey (seeded).
- :func:`~archive.sim.skymodel.make_sky`: the object truth table;
  :func:`~archive.sim.skymodel.object_fluxes` fluxes at any epoch.
- :func:`~archive.sim.render.plan_epochs`, :func:`~archive.sim.render.render_epoch`:
  in-memory noiseless model of one detector in one visit and its truth.
- :func:`~archive.sim.camera.make_detector`, :func:`~archive.sim.camera.expose_object`,
  :func:`~archive.sim.camera.expose_calibration`: raw frames (archive.image.raw format).
- :func:`~archive.sim.calexp.make_calexp`, :func:`~archive.sim.calexp.simulate_calexps`:
  perfect-ISR Exposures (true WCS, PSF, PhotoCalib, exact variance) without raw frames.
- :func:`~archive.sim.survey.simulate_survey`: write a whole survey and its manifest
  (layout and truth columns in :mod:`archive.sim.survey`); :func:`truth_psf`,
  :func:`wcs_from_text` rebuild the true PSF and WCSs from ``truth/epochs.parquet``.

Units: fluxes nJy, times MJD TAI (mid-exposure), angles degrees, pixels 0-based
in the imaging section.
"""

from archive.sim.config import SimConfig
from archive.sim.survey import load_manifest, simulate_survey, truth_psf, wcs_from_text

__all__ = ["SimConfig", "load_manifest", "simulate_survey", "truth_psf", "wcs_from_text"]
