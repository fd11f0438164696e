"""Processing steps: arrays and Exposures in, Exposures and columnar tables out. Never touches the store.

Single-epoch processing (each step a config dataclass plus a function):

- :mod:`~archive.process.masters` - master bias / dark / flat with defect masks and variance.
- :mod:`~archive.process.isr` - raw frame -> Exposure (overscan, bias, dark, flat, SAT/BAD, variance).
- :mod:`~archive.process.quality` - flags with reasons (never raises).
- :mod:`~archive.process.background` - mesh background and noise maps.
- :mod:`~archive.process.cosmic` - cosmic rays (sharper than the PSF), interpolation.
- :mod:`~archive.process.psf_estimate` - empirical spatially varying PixelPSF.
- :mod:`~archive.process.detect`, :mod:`~archive.process.measure`, :mod:`~archive.process.sources` -
  matched-filter detection, deblending, simultaneous PSF fits, apertures, moments, flags,
  iterative detect-measure-subtract.
- :mod:`~archive.process.characterize` - the Exposure-level source step (-> ``source`` rows).
- :mod:`~archive.process.astrometry` - reference matching and TAN-SIP fit.
- :mod:`~archive.process.photocal` - aperture correction, zero point with colour term, nJy.
- :mod:`~archive.process.single_frame` - raw -> calexp + calibrated sources, with rejection reasons.
"""
