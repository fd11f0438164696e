"""The robust (median absolute deviation) estimate of a Gaussian scatter, written once.

``mad_sigma(x) = MAD_TO_SIGMA * median(|x - median(x)|)``: for Gaussian data it estimates
the standard deviation, and outliers barely move it. Processing modules clip with it
(overscan levels, master frames, PSF stars, photometric and streak fits, image noise).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

#: median absolute deviation -> Gaussian sigma. The exact factor is 1 / Phi^-1(3/4) =
#: 1.482602...; the archive's clipping thresholds were set with 1.4826, which is kept so that
#: results do not move (``astropy.stats.mad_std`` uses the exact factor: 1.5e-6 relative higher).
MAD_TO_SIGMA = 1.4826


def mad_sigma(x: ArrayLike, *, center: ArrayLike | float | None = None, axis: int | None = None,
              ignore_nan: bool = False):
    """``MAD_TO_SIGMA * median(|x - center|)`` along ``axis`` (all of ``x`` when None).

    ``center``: the median of ``x`` along ``axis`` when None (pass it when the caller has
    it already, or 0 for residuals about a known zero); ``ignore_nan``: NaN-aware medians
    (``np.nanmedian``), else a NaN in ``x`` gives NaN. Same units as ``x``; a numpy scalar
    for ``axis=None``, else an array.
    """
    a = np.asarray(x)
    median = np.nanmedian if ignore_nan else np.median
    if center is None:
        center = median(a, axis=axis, keepdims=axis is not None)
    elif axis is not None and np.ndim(center) == a.ndim - 1:
        center = np.expand_dims(center, axis)
    return MAD_TO_SIGMA * median(np.abs(a - center), axis=axis)
