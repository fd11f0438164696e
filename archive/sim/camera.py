"""The simulated camera: per-detector defects, flat field, bias structure, dark current; readout.

A raw frame in adu is

    raw = round( N / gain + bias_level_frame + bias_ramp(row) + bias_pattern + read_noise / gain * z )

over the imaging section, where ``N`` is the number of electrons collected:
Poisson of ``incident * flat[band] + dark_rate * dark_time`` plus cosmic-ray
charge, with charge above the full well bled along the column (bloom).  The
serial overscan (``overscan_width`` columns to the right) holds
``bias_level_frame + bias_ramp(row)`` plus read noise only.  Frames are stored
as uint16.

Calibrating a raw frame therefore takes: subtract the overscan row median,
subtract the master bias (which holds ``bias_pattern``), subtract the master
dark rate times DARKTIME, divide by the normalised master flat; the result, in
adu, times the gain is the incident electrons (``EpochModel.model_e``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.io import fits

from archive.image.fitsutil import set_exact, wcs_to_header
from archive.image.raw import RawFrame
from archive.sim.config import KNOWN_BANDS, SimConfig
from archive.sim.render import EpochModel, detector_gain
from archive.sim.skymodel import rng_for

#: Value of a dead (bad) column in the flat field.
BAD_COLUMN_QE = 0.03


@dataclass
class DetectorModel:
    """Fixed properties of one detector.

    ``flat[band]``: response (mean 1 over the detector; vignetting, pixel QE
    and bad columns); ``dark_rate``: e-/s per pixel (hot pixels included);
    ``bias_pattern``: adu, fixed 2-D bias structure with zero mean;
    ``defects``: truth table of hot pixels and bad columns.
    """

    detector: int
    gain: float
    read_noise: float
    flat: dict[str, np.ndarray]
    dark_rate: np.ndarray
    bias_pattern: np.ndarray
    defects: pd.DataFrame


def make_detector(config: SimConfig, detector: int) -> DetectorModel:
    """Build detector ``detector``'s fixed properties (deterministic from the seed)."""
    rng = rng_for(config, 11, detector)
    nx, ny = config.nx, config.ny
    u = ((np.arange(nx) - (nx - 1) / 2.0) / ((nx - 1) / 2.0))[None, :]
    v = ((np.arange(ny) - (ny - 1) / 2.0) / ((ny - 1) / 2.0))[:, None]
    vign = 1.0 - config.vignetting * (u**2 + v**2) / 2.0
    qe = vign * (1.0 + rng.normal(0.0, config.flat_pixel_rms, (ny, nx)))
    bad_cols = np.sort(rng.choice(np.arange(5, nx - 5), size=min(config.n_bad_columns, nx - 10), replace=False))
    flat = {}
    for b in KNOWN_BANDS:
        # weak band dependence: a gentle colour term across the detector
        tilt = {"g": 0.01, "r": 0.0, "i": -0.01}[b]
        f = qe * (1.0 + tilt * u)
        f[:, bad_cols] = BAD_COLUMN_QE
        flat[b] = f / f.mean()
    n_hot = int(rng.poisson(config.hot_pixel_fraction * nx * ny))
    hx = rng.integers(0, nx, n_hot)
    hy = rng.integers(0, ny, n_hot)
    dark = np.full((ny, nx), config.dark_current)
    hot_rate = rng.uniform(20.0, 300.0, n_hot)
    dark[hy, hx] = hot_rate
    col_pattern = rng.normal(0.0, 2.0, nx)
    row_pattern = 1.5 * np.sin(2 * np.pi * np.arange(ny) / max(ny, 1) * 3.0)
    pattern = (col_pattern - col_pattern.mean())[None, :] + (row_pattern - row_pattern.mean())[:, None]
    defects = pd.DataFrame({
        "detector": np.full(n_hot + bad_cols.size, detector, dtype=np.int64),
        "kind": ["hot_pixel"] * n_hot + ["bad_column"] * bad_cols.size,
        "x": np.concatenate([hx, bad_cols]).astype(np.int64),
        "y": np.concatenate([hy, np.full(bad_cols.size, -1)]).astype(np.int64),
        "value": np.concatenate([hot_rate, np.full(bad_cols.size, BAD_COLUMN_QE)]),
    })
    return DetectorModel(detector=detector, gain=detector_gain(config, detector), read_noise=config.read_noise,
                         flat=flat, dark_rate=dark, bias_pattern=np.ascontiguousarray(pattern), defects=defects)


def bloom(electrons: np.ndarray, full_well: float) -> np.ndarray:
    """Cap pixels at ``full_well`` and bleed the excess charge up and down their column.

    Charge is conserved (except what runs off the detector ends): each
    column's over-full runs spread their excess into the neighbouring pixels,
    half upwards and half downwards, filling them to the full well.  Loops
    over affected columns only.
    """
    e = np.asarray(electrons, dtype=float)
    over = e > full_well
    if not over.any():
        return e
    out = e.copy()
    for col in np.flatnonzero(over.any(axis=0)):
        c = out[:, col]
        rows = np.flatnonzero(c > full_well)
        breaks = np.flatnonzero(np.diff(rows) > 1)
        for run in np.split(rows, breaks + 1):  # contiguous over-full runs
            lo, hi = int(run[0]), int(run[-1])
            excess = float((c[lo:hi + 1] - full_well).sum())
            c[lo:hi + 1] = full_well
            _spill(c, np.arange(hi + 1, c.size), 0.5 * excess, full_well)
            _spill(c, np.arange(lo - 1, -1, -1), 0.5 * excess, full_well)
        out[:, col] = c
    return out


def _spill(col: np.ndarray, order: np.ndarray, amount: float, full_well: float) -> None:
    """Fill pixels ``col[order]`` in turn up to the full well with ``amount`` electrons (vectorised)."""
    if amount <= 0 or order.size == 0:
        return
    room = np.maximum(full_well - col[order], 0.0)
    cum = np.cumsum(room)
    k = int(np.searchsorted(cum, amount))
    filled = order[:k]
    col[filled] = np.maximum(col[filled], full_well)
    if k < order.size:
        col[order[k]] += amount - (cum[k - 1] if k > 0 else 0.0)


#: Above this mean the Poisson draw uses its normal approximation (rounded to whole electrons).
POISSON_NORMAL_ABOVE = 50.0


def poisson_counts(rng: np.random.Generator, expected: np.ndarray) -> np.ndarray:
    """Photon/charge noise: Poisson draws of ``expected`` electrons (float64 array).

    Pixels with mean above :data:`POISSON_NORMAL_ABOVE` use the normal
    approximation ``round(mean + sqrt(mean) z)`` (same mean and variance,
    much faster); the rest are exact Poisson draws.
    """
    lam = np.asarray(expected, dtype=float)
    if not lam.any():
        return np.zeros(lam.shape)
    if lam.max() <= POISSON_NORMAL_ABOVE:
        return rng.poisson(np.maximum(lam, 0.0)).astype(float)
    out = rng.standard_normal(lam.shape)
    out *= np.sqrt(np.maximum(lam, 0.0))
    out += lam
    np.rint(out, out=out)
    small = np.flatnonzero(lam <= POISSON_NORMAL_ABOVE)
    if small.size:
        out.flat[small] = rng.poisson(np.maximum(lam.flat[small], 0.0))
    return out


def readout(config: SimConfig, det: DetectorModel, electrons: np.ndarray, rng: np.random.Generator,
            header: fits.Header) -> RawFrame:
    """Digitise collected electrons (noise-free expectation already Poisson-sampled) into a RawFrame."""
    ny, nx = electrons.shape
    nover = config.overscan_width
    level = config.bias_level + rng.normal(0.0, 3.0)
    ramp = rng.normal(0.0, 1.0) * np.linspace(-1.0, 1.0, ny)[:, None]
    rn_adu = np.float32(det.read_noise / det.gain)
    data = rng.standard_normal((ny, nx + nover), dtype=np.float32)
    data *= rn_adu
    data += (level + ramp).astype(np.float32)
    data[:, :nx] += (electrons / det.gain + det.bias_pattern).astype(np.float32)
    np.rint(data, out=data)
    np.clip(data, 0, 65535, out=data)
    raw = data.astype(np.uint16)
    return RawFrame(data=raw, header=header, datasec=(slice(0, ny), slice(0, nx)),
                    biassec=(slice(0, ny), slice(nx, nx + nover)))


def base_header(config: SimConfig, det: DetectorModel, imagetyp: str) -> fits.Header:
    """Cards common to every raw frame of ``det``."""
    h = fits.Header()
    h["IMAGETYP"] = (imagetyp, "OBJECT, BIAS, DARK or FLAT")
    h["INSTRUME"] = ("ARCHSIM", "archive.sim simulated camera")
    h["DETECTOR"] = (det.detector, "detector id")
    set_exact(h, "GAIN", det.gain, "[e-/adu] gain")
    set_exact(h, "RDNOISE", det.read_noise, "[e-] read noise")
    set_exact(h, "SATURATE", float(np.floor(config.bias_level + 0.97 * config.full_well / det.gain)),
              "[adu] raw level above which pixels are saturated (bias included)")
    h["TIMESYS"] = ("TAI", "time scale of MJD cards")
    h["SIMSEED"] = (int(config.seed), "archive.sim seed")
    return h


def expose_object(config: SimConfig, det: DetectorModel, model: EpochModel) -> RawFrame:
    """Raw science frame of ``model`` (noise, dark, flat, cosmic rays, bloom, bias, overscan)."""
    ep = model.epoch
    rng = rng_for(config, 12, ep.index, det.detector)
    expected = model.model_e * det.flat[ep.band] + det.dark_rate * ep.exp_time
    electrons = poisson_counts(rng, expected) + model.cosmic_e
    electrons = bloom(electrons, config.full_well)
    h = base_header(config, det, "OBJECT")
    h["VISIT"] = (ep.visit, "visit id")
    h["BAND"] = (ep.band, "filter band")
    h["FILTER"] = (ep.band, "filter band")
    set_exact(h, "MJD-OBS", ep.mjd_start, "[d] MJD (TAI) at exposure start")
    set_exact(h, "MJD-AVG", ep.mjd, "[d] MJD (TAI) at mid-exposure")
    set_exact(h, "EXPTIME", ep.exp_time, "[s] exposure time")
    set_exact(h, "DARKTIME", ep.exp_time, "[s] dark time")
    set_exact(h, "AIRMASS", ep.airmass, "airmass")
    hw = model.wcs_header
    set_exact(h, "RA", float(hw.wcs.crval[0]), "[deg] telescope pointing RA (approximate)")
    set_exact(h, "DEC", float(hw.wcs.crval[1]), "[deg] telescope pointing Dec (approximate)")
    set_exact(h, "ROTANG", ep.rotation_deg + ep.wcs_drot_deg, "[deg] sky rotation (approximate)")
    h.extend(wcs_to_header(hw).cards)
    return readout(config, det, electrons, rng, h)


def expose_calibration(config: SimConfig, det: DetectorModel, imagetyp: str, k: int, band: str | None = None,
                       mjd: float | None = None) -> RawFrame:
    """The ``k``-th bias, dark or flat frame of ``det`` (flat: per band)."""
    kinds = {"BIAS": 0, "DARK": 1, "FLAT": 2}
    if imagetyp not in kinds:
        raise ValueError(imagetyp)
    band_key = KNOWN_BANDS.index(band) if band is not None else 0
    rng = rng_for(config, 13, kinds[imagetyp], band_key, k, det.detector)
    ny, nx = config.ny, config.nx
    if imagetyp == "BIAS":
        exp_time = dark_time = 0.0
        expected = np.zeros((ny, nx))
    elif imagetyp == "DARK":
        exp_time = dark_time = config.dark_exp_time
        expected = det.dark_rate * dark_time
    else:
        exp_time = dark_time = 5.0
        expected = config.flat_level * det.flat[band] + det.dark_rate * dark_time
    electrons = bloom(poisson_counts(rng, expected), config.full_well)
    h = base_header(config, det, imagetyp)
    set_exact(h, "EXPTIME", exp_time, "[s] exposure time")
    set_exact(h, "DARKTIME", dark_time, "[s] dark time")
    if mjd is not None:
        set_exact(h, "MJD-OBS", mjd, "[d] MJD (TAI) at exposure start")
    if band is not None:
        h["BAND"] = (band, "filter band")
        h["FILTER"] = (band, "filter band")
    return readout(config, det, electrons, rng, h)
