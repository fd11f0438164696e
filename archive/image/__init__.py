"""The image data model: Exposure (image, mask, variance, WCS, PSF, calibration, metadata) and FITS I/O.

Public names:

- :class:`~archive.image.exposure.Exposure`, :class:`~archive.image.exposure.ExposureInfo`
- :mod:`archive.image.mask` (named bit planes, :func:`~archive.image.mask.bits`)
- :mod:`archive.image.psf`: the PSF interface (:class:`PSF`) and its models (:class:`GaussianPSF`,
  :class:`MoffatPSF`, :class:`PixelPSF`), :data:`FWHM_PER_SIGMA`
- :class:`~archive.image.calib.PhotoCalib`
- :func:`~archive.image.raw.read_raw` / :class:`~archive.image.raw.RawFrame`
"""

from archive.image.calib import PhotoCalib
from archive.image.exposure import Exposure, ExposureInfo
from archive.image.mask import DEFAULT_MASK_PLANES, bits
from archive.image.psf import FWHM_PER_SIGMA, PSF, GaussianPSF, MoffatPSF, PixelPSF, PsfSummary, add_point_sources
from archive.image.raw import RawFrame, read_raw, write_raw

__all__ = [
    "DEFAULT_MASK_PLANES",
    "FWHM_PER_SIGMA",
    "PSF",
    "Exposure",
    "ExposureInfo",
    "GaussianPSF",
    "MoffatPSF",
    "PhotoCalib",
    "PixelPSF",
    "PsfSummary",
    "RawFrame",
    "add_point_sources",
    "bits",
    "read_raw",
    "write_raw",
]
