"""What a subtraction returns, whichever method made it."""

from __future__ import annotations

import dataclasses

import numpy as np

from archive.image.exposure import Exposure


@dataclasses.dataclass
class DifferenceResult:
    """difference: science minus the PSF-matched template on the science grid, in the
    science image's flux units, with a variance plane that predicts its noise, a mask (the
    union of both inputs' masks; NO_DATA where the template does not cover) and the PSF of
    a point source on it (``difference.psf``); score: a per-pixel detection significance
    (unit variance on empty sky; ZOGY's corrected score, or the difference filtered with its
    own PSF for Alard-Lupton), or None; method: ``"alard_lupton"`` or ``"zogy"``;
    metadata: method details (kernel solution, which image was convolved, noise levels...)."""

    difference: Exposure
    score: np.ndarray | None
    method: str
    metadata: dict = dataclasses.field(default_factory=dict)
