"""Master calibrations: bias, dark and flat from stacks of raw frames.

Every master is an :class:`~archive.image.exposure.Exposure` (so it is written and
read as FITS like any image) with

- ``image``: the combined frame - bias in adu, dark *rate* in adu/s, flat as the
  response normalised to median 1;
- ``variance``: the variance of that combined value (per pixel);
- ``mask``: ``BAD`` for hot pixels (dark), dead / low- or high-response pixels
  (flat), non-finite results; ``info.extras`` records ``calib_type``, ``n_frames``
  and the pixel counts of each defect class.

Frames are combined with a per-pixel sigma-clipped mean (median and MAD along the
stack, with the image-wide median MAD as a floor so a few frames cannot make a
pixel's sigma tiny), all pixels at once.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from archive.errors import ValidationError
from archive.image.exposure import Exposure, ExposureInfo
from archive.image.mask import default_mask_planes
from archive.image.raw import RawFrame
from archive.process.robust import mad_sigma

log = logging.getLogger(__name__)


@dataclass
class OverscanConfig:
    """Overscan subtraction.

    method: ``"row"`` (per-row median of the overscan, smoothed along the rows with a
    running median of ``smooth_rows``), ``"poly"`` (polynomial of ``order`` in row through
    the row medians) or ``"mean"`` (one clipped value for the frame).
    """

    method: str = "row"
    smooth_rows: int = 31
    order: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


def overscan_level(raw: RawFrame, config: OverscanConfig | None = None) -> np.ndarray:
    """Bias level (adu) per row of the data section, from the serial overscan, shape ``(ny, 1)``."""
    cfg = config or OverscanConfig()
    sy, _ = raw.datasec
    osc = raw.data[raw.biassec].astype(np.float64)
    # overscan rows aligned with the data rows
    oy = raw.biassec[0]
    if oy.start > sy.start or oy.stop < sy.stop:
        raise ValidationError(f"{raw.path}: overscan rows {oy} do not cover the data rows {sy}")
    osc = osc[sy.start - oy.start: sy.stop - oy.start]
    rows = np.median(osc, axis=1)
    if cfg.method == "mean":
        med = np.median(osc)
        sig = mad_sigma(osc, center=med)
        keep = np.abs(osc - med) <= 4 * max(sig, 1e-12)
        level = np.full(rows.shape, osc[keep].mean() if keep.any() else med)
    elif cfg.method == "row":
        k = max(1, int(cfg.smooth_rows)) | 1
        level = ndimage.median_filter(rows, size=k, mode="nearest") if k > 1 else rows
    elif cfg.method == "poly":
        t = np.linspace(-1, 1, rows.size)
        coef = np.polynomial.chebyshev.chebfit(t, rows, int(cfg.order))
        level = np.polynomial.chebyshev.chebval(t, coef)
    else:
        raise ValidationError(f"overscan method must be 'row', 'poly' or 'mean', got {cfg.method!r}")
    return level[:, None]


def trimmed(raw: RawFrame, config: OverscanConfig | None = None) -> np.ndarray:
    """Overscan-subtracted imaging section (adu, float64)."""
    return raw.image - overscan_level(raw, config)


@dataclass
class CombineConfig:
    """Sigma-clipped mean: clip at ``clip_sigma`` around the median for ``clip_iters`` rounds."""

    clip_sigma: float = 3.0
    clip_iters: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


def clipped_mean(stack: np.ndarray, config: CombineConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel sigma-clipped mean of ``stack`` ``(n, ny, nx)``.

    Returns ``(mean, variance_of_mean, n_used)``. The variance is the sample
    variance of the kept values over their number (for two or fewer kept values,
    the image-wide median of the per-pixel variance).
    """
    cfg = config or CombineConfig()
    a = np.asarray(stack, dtype=np.float32)
    if a.ndim != 3 or a.shape[0] < 1:
        raise ValidationError(f"clipped_mean: expected a stack (n, ny, nx) with n >= 1, got shape {a.shape}")
    keep = np.isfinite(a)
    for _ in range(max(1, cfg.clip_iters)):
        x = np.where(keep, a, np.nan)
        med = np.nanmedian(x, axis=0)
        mad = mad_sigma(x, center=med, axis=0, ignore_nan=True)
        floor = np.nanmedian(mad) if np.isfinite(mad).any() else 0.0
        sig = np.fmax(mad, floor)
        new = keep & (np.abs(a - med) <= cfg.clip_sigma * sig)
        # never reject everything
        new = np.where(new.any(axis=0), new, keep)
        if np.array_equal(new, keep):
            break
        keep = new
    n = keep.sum(axis=0)
    s = np.where(keep, a, 0.0).sum(axis=0, dtype=np.float64)
    mean = s / np.maximum(n, 1)
    ss = (np.where(keep, a - mean, 0.0) ** 2).sum(axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        var_pix = ss / np.maximum(n - 1, 1)
    glob = np.nanmedian(var_pix[n > 2]) if (n > 2).any() else np.nanmedian(var_pix)
    var_pix = np.where(n > 2, var_pix, glob)
    var_mean = var_pix / np.maximum(n, 1)
    mean = np.where(n > 0, mean, np.nan)
    return mean.astype(np.float32), var_mean.astype(np.float32), n


@dataclass
class MasterConfig:
    """Configuration of the master builders.

    overscan, combine: sub-configs.
    hot_sigma: dark pixels whose rate exceeds the median by this many robust sigma are hot (BAD) ...
    hot_min_rate: ... and by at least this rate (adu/s).
    low_response: flat pixels below this normalised response are BAD (dead / low response).
    high_response: flat pixels above this are BAD.
    """

    overscan: OverscanConfig = None  # type: ignore[assignment]
    combine: CombineConfig = None  # type: ignore[assignment]
    hot_sigma: float = 5.0
    hot_min_rate: float = 0.0
    low_response: float = 0.5
    high_response: float = 1.5

    def __post_init__(self):
        if self.overscan is None:
            self.overscan = OverscanConfig()
        if self.combine is None:
            self.combine = CombineConfig()

    def to_dict(self) -> dict:
        return asdict(self)


def _check_frames(frames: Sequence[RawFrame], kind: str) -> tuple[int, int]:
    if len(frames) == 0:
        raise ValidationError(f"master {kind}: no frames given")
    shapes = {f.image.shape for f in frames}
    if len(shapes) != 1:
        raise ValidationError(f"master {kind}: frames have different data-section shapes {sorted(shapes)}")
    for f in frames:
        t = f.imagetyp
        if t != kind.upper():
            raise ValidationError(f"master {kind}: frame {f.path} has IMAGETYP {t!r}, expected {kind.upper()!r}")
    return shapes.pop()


def _master(image, variance, bad, kind, n, frames, extras=None) -> Exposure:
    planes = default_mask_planes()
    mask = np.zeros(image.shape, dtype=np.int32)
    bad = bad | ~np.isfinite(image)
    mask[bad] |= np.int32(1 << planes["BAD"])
    info = ExposureInfo(detector=int(frames[0].info.detector), band=frames[0].info.band if kind == "flat" else "",
                        gain=frames[0].info.gain, read_noise=frames[0].info.read_noise)
    info.extras = {"calib_type": kind, "n_frames": int(n), "n_bad": int(bad.sum()), **(extras or {})}
    img = np.where(np.isfinite(image), image, 0.0)
    return Exposure(img.astype(np.float32), mask, variance.astype(np.float32), info=info, mask_planes=planes)


def make_master_bias(frames: Sequence[RawFrame], config: MasterConfig | None = None) -> Exposure:
    """Master bias (adu, overscan-subtracted) from BIAS frames."""
    cfg = config or MasterConfig()
    _check_frames(frames, "bias")
    stack = np.stack([trimmed(f, cfg.overscan) for f in frames]).astype(np.float32)
    mean, var, n = clipped_mean(stack, cfg.combine)
    log.info("master bias from %d frames: median %.3f adu", len(frames), float(np.nanmedian(mean)))
    return _master(mean, var, np.zeros(mean.shape, bool), "bias", len(frames), frames)


def make_master_dark(frames: Sequence[RawFrame], bias: Exposure | None, config: MasterConfig | None = None) -> Exposure:
    """Master dark *rate* (adu/s) from DARK frames: (overscan - bias) / DARKTIME, combined.

    Hot pixels (BAD): rate above the median by ``hot_sigma`` robust sigma and ``hot_min_rate``.
    """
    cfg = config or MasterConfig()
    shape = _check_frames(frames, "dark")
    b = _bias_image(bias, shape)
    rates = []
    for f in frames:
        t = f.dark_time
        if not t > 0:
            raise ValidationError(f"master dark: frame {f.path} has DARKTIME/EXPTIME {t}, expected > 0")
        rates.append((trimmed(f, cfg.overscan) - b) / t)
    mean, var, n = clipped_mean(np.stack(rates).astype(np.float32), cfg.combine)
    if bias is not None:
        # the bias's own noise enters every dark frame identically: add it once
        tmean = float(np.mean([f.dark_time for f in frames]))
        var = var + bias.variance / tmean ** 2
    med = np.nanmedian(mean)
    sig = mad_sigma(mean, center=med, ignore_nan=True)
    hot = (mean > med + cfg.hot_sigma * sig) & (mean > med + cfg.hot_min_rate)
    log.info("master dark from %d frames: median rate %.4g adu/s, %d hot pixels", len(frames), med, int(hot.sum()))
    return _master(mean, var, hot, "dark", len(frames), frames, {"n_hot": int(hot.sum())})


def make_master_flat(frames: Sequence[RawFrame], bias: Exposure | None, dark: Exposure | None,
                     config: MasterConfig | None = None) -> Exposure:
    """Master flat (normalised to median 1) from FLAT frames of one band.

    Each frame is overscan-, bias- and dark-subtracted and divided by its median
    before the clipped combine. BAD: response below ``low_response`` or above
    ``high_response``, and pixels bad in the bias/dark masters.
    """
    cfg = config or MasterConfig()
    shape = _check_frames(frames, "flat")
    bands = {f.info.band for f in frames}
    if len(bands) > 1:
        raise ValidationError(f"master flat: frames from several bands {sorted(bands)}")
    b = _bias_image(bias, shape)
    norm = []
    for f in frames:
        x = trimmed(f, cfg.overscan) - b
        if dark is not None:
            x = x - dark.image * f.dark_time
        m = np.nanmedian(x)
        if not m > 0:
            raise ValidationError(f"master flat: frame {f.path} has non-positive median level {m}")
        norm.append(x / m)
    mean, var, n = clipped_mean(np.stack(norm).astype(np.float32), cfg.combine)
    m = np.nanmedian(mean)
    mean = mean / m
    var = var / m ** 2
    dead = mean < cfg.low_response
    high = mean > cfg.high_response
    bad = dead | high
    for other in (bias, dark):
        if other is not None:
            bad |= other.mask_of("BAD")
    log.info("master flat (%s) from %d frames: %d low-response, %d high-response pixels",
             next(iter(bands)), len(frames), int(dead.sum()), int(high.sum()))
    return _master(mean, var, bad, "flat", len(frames), frames,
                   {"n_low_response": int(dead.sum()), "n_high_response": int(high.sum())})


def _bias_image(bias: Exposure | None, shape) -> np.ndarray:
    if bias is None:
        return np.zeros(shape, dtype=np.float64)
    if bias.shape != tuple(shape):
        raise ValidationError(f"master bias shape {bias.shape} differs from the frames' data section {tuple(shape)}")
    return bias.image.astype(np.float64)
