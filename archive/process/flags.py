"""Measurement flag bits of the ``flags`` column and the default mask-plane layout.

The low bits of ``flags`` are the image mask bits (OR within a radius of the source);
measurement flags live from bit 32 up so they never collide with mask planes.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from archive.image.mask import DEFAULT_MASK_PLANES  # noqa: F401  (the layout used when none is given)

FLAG_STAMP_EDGE = np.int64(1) << 32       #: the PSF-fit stamp runs off the image
FLAG_CENTROID = np.int64(1) << 33         #: centroid fit did not converge / hit the shift limit
FLAG_PSF_FLUX = np.int64(1) << 34         #: PSF fit failed (no usable pixels)
FLAG_MOMENTS = np.int64(1) << 35          #: adaptive moments failed; PSF moments reported
FLAG_BLENDED = np.int64(1) << 36          #: another source's model overlaps this one
FLAG_APERTURE_EDGE = np.int64(1) << 37    #: the largest aperture runs off the image or over masked pixels
FLAG_SECOND_PASS = np.int64(1) << 38      #: found on the residual image (detect-measure-subtract pass > 1)
#: no photometric calibration (no reference-catalog fit and no header zero point): the flux
#: columns (nJy) are null, never counts.  Calibration flags start at bit 48.
FLAG_NOT_CALIBRATED = np.int64(1) << 48

MEASUREMENT_FLAGS: dict[str, np.int64] = {
    "STAMP_EDGE": FLAG_STAMP_EDGE, "CENTROID": FLAG_CENTROID, "PSF_FLUX": FLAG_PSF_FLUX,
    "MOMENTS": FLAG_MOMENTS, "BLENDED": FLAG_BLENDED, "APERTURE_EDGE": FLAG_APERTURE_EDGE,
    "SECOND_PASS": FLAG_SECOND_PASS, "NOT_CALIBRATED": FLAG_NOT_CALIBRATED,
}

# Forced photometry (archive.process.forced) sets, besides the mask bits under the PSF core,
# STAMP_EDGE (the fit stamp runs off the image), CENTROID (recentring refused: the position
# would move more than the limit; the given position was kept), PSF_FLUX (no measurement),
# BLENDED (fitted jointly with neighbours) and these four of its own.  They are not in
# MEASUREMENT_FLAGS: source.flags and dia_source.flags never carry them.
FLAG_OFF_IMAGE = np.int64(1) << 39        #: forced position off the image (or not finite): not measured
FLAG_MASKED_FRACTION = np.int64(1) << 40  #: forced fit: too much of the PSF's flux on masked or off-image pixels
FLAG_CROWDED = np.int64(1) << 41          #: forced fit: more neighbours within the blend radius than fitted jointly
#: forced: another position too close to separate (min_separation_fwhm); the flux is their common light
FLAG_UNRESOLVED = np.int64(1) << 42

#: The bits a forced-photometry ``flags`` value may carry above the mask bits (bit 32 up).
FORCED_FLAGS: dict[str, np.int64] = {
    "STAMP_EDGE": FLAG_STAMP_EDGE, "CENTROID": FLAG_CENTROID, "PSF_FLUX": FLAG_PSF_FLUX,
    "BLENDED": FLAG_BLENDED, "OFF_IMAGE": FLAG_OFF_IMAGE, "MASKED_FRACTION": FLAG_MASKED_FRACTION,
    "CROWDED": FLAG_CROWDED, "UNRESOLVED": FLAG_UNRESOLVED,
}


def plane_bits(mask_planes: Mapping[str, int] | None, *names: str) -> int:
    """OR of ``1 << bit`` for the named planes present in ``mask_planes`` (default layout if None)."""
    planes = DEFAULT_MASK_PLANES if mask_planes is None else mask_planes
    out = 0
    for n in names:
        if n in planes:
            out |= 1 << int(planes[n])
    return out
