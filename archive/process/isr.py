"""Instrument signature removal: raw frame -> Exposure (image, mask, variance).

Steps, in order: saturation mask on the raw adu (``SATURATE`` card, or the
digitiser maximum), overscan subtraction and trim, master bias, master dark
(rate times DARKTIME), flat division, masks of the masters (``BAD``), non-finite
pixels (``NO_DATA``), optional interpolation over bad pixels (``INTRP``).

The result is in adu (the simulator's and PhotoCalib's "count"); with
``apply_gain`` it is in electrons and ``info.gain`` becomes 1.

Variance (adu^2), per pixel, before the flat:
``max(signal, 0) / gain + (read_noise / gain)^2 + var(bias) + t^2 var(dark rate)``,
then divided by ``flat^2`` and increased by ``image^2 var(flat) / flat^2`` for the
flat's own noise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from archive.errors import ValidationError
from archive.image.exposure import Exposure
from archive.image.mask import default_mask_planes
from archive.image.raw import RawFrame
from archive.process.cosmic import interpolate_over
from archive.process.masters import OverscanConfig, overscan_level

log = logging.getLogger(__name__)


@dataclass
class IsrConfig:
    """Configuration of :func:`run`.

    overscan: overscan subtraction config.
    apply_gain: convert to electrons (info.gain becomes 1).
    saturation: saturation level in raw adu; None = the frame's SATURATE card (else the dtype maximum).
    grow_saturation: grow the SAT mask by this many pixels.
    interpolate_bad: replace BAD pixels by an interpolation of their neighbours (and set INTRP).
    default_gain, default_read_noise: used when the header lacks GAIN / RDNOISE (e-/adu, e-).
    """

    overscan: OverscanConfig = field(default_factory=OverscanConfig)
    apply_gain: bool = False
    saturation: float | None = None
    grow_saturation: int = 0
    interpolate_bad: bool = True
    default_gain: float = 1.0
    default_read_noise: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _check_master(m: Exposure | None, shape, kind: str):
    if m is None:
        return
    if not isinstance(m, Exposure):
        raise ValidationError(f"ISR: master {kind} must be an Exposure, got {type(m).__name__}")
    if m.shape != tuple(shape):
        raise ValidationError(f"ISR: master {kind} has shape {m.shape}, the frame's data section is {tuple(shape)}")
    t = m.info.extras.get("calib_type")
    if t is not None and t != kind:
        raise ValidationError(f"ISR: the master given as {kind} is a {t!r} master")


def run(raw: RawFrame, bias: Exposure | None = None, dark: Exposure | None = None, flat: Exposure | None = None,
        config: IsrConfig | None = None) -> Exposure:
    """Remove the instrument signature from ``raw`` (see the module docstring)."""
    cfg = config or IsrConfig()
    if not isinstance(raw, RawFrame):
        raise ValidationError(f"ISR expects a RawFrame, got {type(raw).__name__}")
    info = raw.info
    shape = raw.image.shape
    for m, kind in ((bias, "bias"), (dark, "dark"), (flat, "flat")):
        _check_master(m, shape, kind)
    if flat is not None and flat.info.band and info.band and flat.info.band != info.band:
        raise ValidationError(f"ISR: flat is for band {flat.info.band!r}, frame {raw.path} is band {info.band!r}")
    gain = info.gain if (math.isfinite(info.gain) and info.gain > 0) else cfg.default_gain
    rn = info.read_noise if (math.isfinite(info.read_noise) and info.read_noise >= 0) else cfg.default_read_noise
    if "GAIN" not in raw.header:
        gain = cfg.default_gain
    if "RDNOISE" not in raw.header:
        rn = cfg.default_read_noise
    planes = default_mask_planes()
    mask = np.zeros(shape, dtype=np.int32)
    bit = {k: np.int32(1 << planes[k]) for k in ("BAD", "SAT", "NO_DATA", "INTRP")}

    raw_data = raw.data[raw.datasec]
    if cfg.saturation is not None:
        sat_level = float(cfg.saturation)
    elif math.isfinite(info.saturation):
        sat_level = float(info.saturation)
    elif raw_data.dtype.kind in "iu":
        sat_level = float(np.iinfo(raw_data.dtype).max)
    else:
        sat_level = math.inf
    sat = raw_data >= sat_level
    if raw_data.dtype.kind in "iu":
        sat |= raw_data >= np.iinfo(raw_data.dtype).max
    if cfg.grow_saturation > 0 and sat.any():
        from scipy import ndimage
        sat = ndimage.binary_dilation(sat, iterations=int(cfg.grow_saturation))
    mask[sat] |= bit["SAT"]

    img = raw.image - overscan_level(raw, cfg.overscan)
    var_cal = np.zeros(shape, dtype=np.float64)
    if bias is not None:
        img = img - bias.image
        var_cal += bias.variance
        mask |= bias.mask & bit["BAD"]
    t = raw.dark_time
    if dark is not None:
        img = img - dark.image * t
        var_cal += (t * t) * dark.variance
        mask |= dark.mask & bit["BAD"]
    var = np.maximum(img, 0.0) / gain + (rn / gain) ** 2 + var_cal
    if flat is not None:
        f = flat.image.astype(np.float64)
        fbad = ~(f > 0) | ~np.isfinite(f)
        f = np.where(fbad, 1.0, f)
        img = img / f
        var = var / (f * f) + img * img * flat.variance / (f * f)
        mask |= flat.mask & bit["BAD"]
        mask[fbad] |= bit["BAD"]
    nodata = ~np.isfinite(img) | ~np.isfinite(var)
    mask[nodata] |= bit["NO_DATA"]
    img = np.where(nodata, 0.0, img)
    var = np.where(nodata, np.inf, var)
    if cfg.interpolate_bad:
        bad = (mask & (bit["BAD"] | bit["NO_DATA"])) != 0
        if bad.any():
            img = interpolate_over(img, bad, sigma=1.5).astype(np.float64)
            mask[bad] |= bit["INTRP"]
    if cfg.apply_gain:
        img = img * gain
        var = var * gain * gain
        info.saturation = info.saturation * gain if math.isfinite(info.saturation) else info.saturation
        info.gain = 1.0
    info.extras = dict(info.extras, isr={"overscan": cfg.overscan.method, "bias": bias is not None,
                                          "dark": dark is not None, "flat": flat is not None,
                                          "apply_gain": cfg.apply_gain})
    exp = Exposure(img.astype(np.float32), mask, var.astype(np.float32), wcs=raw.wcs, info=info, mask_planes=planes)
    log.info("ISR %s: %d SAT, %d BAD pixels", raw.path, int(sat.sum()), int(((mask & bit['BAD']) != 0).sum()))
    return exp
