"""The image data model: Exposure (image, mask, variance, WCS, PSF, calibration, metadata) and FITS I/O."""
