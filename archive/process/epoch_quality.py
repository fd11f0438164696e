"""Quality of an epoch judged against the other epochs of a run: clouds and bad focus.

A single frame cannot tell thin cloud from a faint field, nor a defocused image
from a night of poor seeing; next to the other exposures of the same band it can.
An exposure whose photometric zero point (AB magnitude of 1 count per second, so
exposure times compare) lies far below the median of its band, or whose seeing is
far above it, is flagged with the reason. Pure: a table in, reasons out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from archive.errors import ValidationError


@dataclass
class EpochQualityConfig:
    """Configuration of :func:`check_epochs`.

    max_zp_deficit_mag: a zero point this far below its band's median is rejected
        (0.75 mag: less than half the usual transparency).
    max_seeing_ratio: a seeing this many times its band's median is rejected.
    min_epochs: a band with fewer exposures is not judged (no meaningful median).
    """

    max_zp_deficit_mag: float = 0.75
    max_seeing_ratio: float = 1.5
    min_epochs: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


#: Flag names of :func:`check_epochs` (``exposure.quality_flags`` bits in the pipeline).
LOW_TRANSPARENCY = "LOW_TRANSPARENCY"
POOR_SEEING = "POOR_SEEING"


def check_epochs(epochs: pd.DataFrame, config: EpochQualityConfig | None = None) -> pd.DataFrame:
    """Judge each exposure against the others of its band.

    ``epochs``: one row per exposure with ``band``, ``zero_point`` (AB mag of 1 count/s)
    and ``seeing`` (arcsec; NaN where unknown). Returns a frame on the same index with
    ``flags`` (list of flag names) and ``reason`` (``""`` when the exposure is fine).
    """
    cfg = config or EpochQualityConfig()
    for c in ("band", "zero_point", "seeing"):
        if c not in epochs:
            raise ValidationError(f"check_epochs: the epoch table lacks column {c!r}")
    out = pd.DataFrame({"flags": [[] for _ in range(len(epochs))], "reason": ""}, index=epochs.index)
    for band, grp in epochs.groupby("band", sort=False):
        if len(grp) < cfg.min_epochs:
            continue
        zp = grp["zero_point"].to_numpy(np.float64)
        see = grp["seeing"].to_numpy(np.float64)
        zp_med = float(np.nanmedian(zp)) if np.isfinite(zp).any() else np.nan
        see_med = float(np.nanmedian(see)) if np.isfinite(see).any() else np.nan
        deficit = zp_med - zp
        ratio = see / see_med
        for idx, d, r, s in zip(grp.index, deficit, ratio, see):
            why = []
            if np.isfinite(d) and d > cfg.max_zp_deficit_mag:
                out.at[idx, "flags"] = out.at[idx, "flags"] + [LOW_TRANSPARENCY]
                why.append(f"zero point {d:.2f} mag below the median of the {len(grp)} {band}-band exposures "
                           f"(clouds or poor transparency)")
            if np.isfinite(r) and r > cfg.max_seeing_ratio:
                out.at[idx, "flags"] = out.at[idx, "flags"] + [POOR_SEEING]
                why.append(f"seeing {s:.2f} arcsec is {r:.2f} times the median of the {len(grp)} {band}-band "
                           f"exposures (bad focus or seeing)")
            if why:
                out.at[idx, "reason"] = "quality: " + "; ".join(why)
    return out
