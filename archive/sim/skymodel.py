"""The simulated sky: stars, galaxies, periodic variables, transients and moving objects.

:func:`make_sky` returns one pandas DataFrame, one row per object (the truth
``objects`` table).  Fluxes are in nJy, magnitudes AB, angles in degrees,
times MJD (TAI).  :func:`object_fluxes` gives every object's flux at any epoch.

Columns: ``object_id``, ``kind`` (``star``, ``variable``, ``galaxy``,
``transient``, ``moving``), ``ra``, ``dec`` (for moving objects: at
``t_ref``), ``mag_g/r/i`` and ``flux_g/r/i`` (static or mean; a periodic
variable's *minimum*; a transient's *peak*), ``r_eff_arcsec``, ``axis_ratio``,
``pa_deg`` (galaxies; PA east of north of the major axis), ``var_shape``,
``period``, ``amplitude`` (r band, mag), ``t0`` (variables), ``t_peak``,
``tau_rise``, ``tau_fall`` (transients, r band; other bands scale by
:data:`~archive.sim.lightcurves.TRANSIENT_FALL_SCALE`), ``host_id`` (-1 when
hostless), ``rate_ra``/``rate_dec`` (moving: deg/day in the tangent plane, RA
component already times cos dec), ``t_ref``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from archive.image.calib import mag_to_njy, njy_to_mag
from archive.sim import lightcurves as lc
from archive.sim.config import KNOWN_BANDS, SimConfig
from archive.sim.geometry import focal_plane_half_size, sky_to_tangent, tangent_to_sky

#: Exponential-profile constant: half the light within r_eff.
EXP_B1 = 1.6783469900166608


def rng_for(config: SimConfig, *keys: int) -> np.random.Generator:
    """Independent, order-free random stream for a purpose (keys are small ints)."""
    return np.random.default_rng(np.random.SeedSequence([int(config.seed), *[int(k) for k in keys]]))


def sample_power_law_mags(rng: np.random.Generator, n: int, m1: float, m2: float, slope: float) -> np.ndarray:
    """``n`` magnitudes in [m1, m2) with ``dN/dm`` proportional to ``10**(slope * m)``."""
    u = rng.random(n)
    if slope == 0:
        return m1 + u * (m2 - m1)
    a1 = 10.0 ** (slope * m1)
    a2 = 10.0 ** (slope * m2)
    return np.log10(a1 + u * (a2 - a1)) / slope


def survey_span_days(config: SimConfig) -> float:
    """Time from the first to the last visit (at least one cadence)."""
    return max(config.cadence_days, (config.n_epochs - 1) * config.cadence_days)


def field_half_width_deg(config: SimConfig) -> float:
    """Half width (deg) of the square tangent-plane patch that is populated.

    Covers the mosaic, 4 sigma of dithers and rotations, and a margin.
    """
    hx, hy = focal_plane_half_size(config)
    half_px = math.hypot(hx, hy)
    return (half_px * config.pixel_scale + 4.0 * config.dither_arcsec + 60.0) / 3600.0


def star_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(g-r, r-i) along the stellar locus: a blue disk/halo sequence plus red M dwarfs."""
    red = rng.random(n) < 0.3
    gr = np.where(red, rng.normal(1.35, 0.12, n), rng.normal(0.55, 0.18, n))
    gr = np.clip(gr, 0.15, 1.6)
    ri = 0.37 * gr - 0.05 + 1.6 * np.clip(gr - 1.2, 0.0, None) + rng.normal(0.0, 0.03, n)
    return gr, ri


def galaxy_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(g-r, r-i) of galaxies: blue cloud and red sequence."""
    red = rng.random(n) < 0.35
    gr = np.where(red, rng.normal(0.95, 0.08, n), rng.normal(0.45, 0.15, n))
    ri = np.where(red, 0.42, 0.25) + 0.2 * (gr - 0.6) + rng.normal(0.0, 0.05, n)
    return gr, ri


def _mags_from_colours(r, gr, ri) -> dict[str, np.ndarray]:
    return {"g": r + gr, "r": r, "i": r - ri}


def make_sky(config: SimConfig) -> pd.DataFrame:
    """Generate the full object truth table for ``config`` (deterministic from the seed)."""
    half = field_half_width_deg(config)
    area_arcmin2 = (2.0 * half * 60.0) ** 2
    rng = rng_for(config, 1)
    span = survey_span_days(config)
    frames = []

    # --- stars and variables
    n_star = int(rng.poisson(config.star_density * area_arcmin2))
    xi = rng.uniform(-half, half, n_star)
    eta = rng.uniform(-half, half, n_star)
    r = sample_power_law_mags(rng, n_star, *config.star_mag_range, config.star_count_slope)
    gr, ri = star_colours(rng, n_star)
    mags = _mags_from_colours(r, gr, ri)
    is_var = (r < config.variable_mag_limit) & (rng.random(n_star) < config.variable_fraction)
    period = np.exp(rng.uniform(math.log(0.3), math.log(5.0), n_star))
    amp = rng.uniform(0.15, 0.8, n_star)
    shape = np.where(rng.random(n_star) < 0.5, "sawtooth", "sine")
    t0 = config.mjd0 + rng.random(n_star) * period
    stars = pd.DataFrame({"kind": np.where(is_var, "variable", "star"), "xi": xi, "eta": eta})
    for b in KNOWN_BANDS:
        stars[f"mag_{b}"] = mags[b]
    stars["var_shape"] = np.where(is_var, shape, "")
    stars["period"] = np.where(is_var, period, np.nan)
    stars["amplitude"] = np.where(is_var, amp, np.nan)
    stars["t0"] = np.where(is_var, t0, np.nan)
    frames.append(stars)

    # --- galaxies
    n_gal = int(rng.poisson(config.galaxy_density * area_arcmin2))
    r = sample_power_law_mags(rng, n_gal, *config.galaxy_mag_range, config.galaxy_count_slope)
    gr, ri = galaxy_colours(rng, n_gal)
    mags = _mags_from_colours(r, gr, ri)
    # size-magnitude relation: r_eff ~ 1.0" at r = 20, shrinking by 0.1 dex per mag, 0.2 dex scatter
    reff = 10.0 ** (0.0 - 0.1 * (r - 20.0) + rng.normal(0.0, 0.2, n_gal))
    gals = pd.DataFrame({
        "kind": "galaxy",
        "xi": rng.uniform(-half, half, n_gal),
        "eta": rng.uniform(-half, half, n_gal),
        "r_eff_arcsec": np.clip(reff, 0.15, 4.0),
        "axis_ratio": rng.uniform(0.3, 1.0, n_gal),
        "pa_deg": rng.uniform(0.0, 180.0, n_gal),
    })
    for b in KNOWN_BANDS:
        gals[f"mag_{b}"] = mags[b]
    frames.append(gals)

    # --- transients: inside the mosaic footprint (so they are observed)
    hx, hy = focal_plane_half_size(config)
    fx = 0.85 * hx * config.pixel_scale / 3600.0
    fy = 0.85 * hy * config.pixel_scale / 3600.0
    n_tr = int(config.n_transients * config.n_detectors)
    trng = rng_for(config, 2)
    gal_in = np.flatnonzero((np.abs(gals["xi"].to_numpy()) < fx) & (np.abs(gals["eta"].to_numpy()) < fy)
                            & (gals["mag_r"].to_numpy() < 23.0))
    hosted = trng.random(n_tr) < config.transient_host_fraction
    tr_xi = trng.uniform(-fx, fx, n_tr)
    tr_eta = trng.uniform(-fy, fy, n_tr)
    host = np.full(n_tr, -1, dtype=np.int64)
    if gal_in.size:
        pick = trng.choice(gal_in, n_tr)
        off = gals["r_eff_arcsec"].to_numpy()[pick] / 3600.0 * trng.uniform(0.0, 1.0, n_tr)
        ang = trng.uniform(0.0, 2.0 * np.pi, n_tr)
        tr_xi = np.where(hosted, gals["xi"].to_numpy()[pick] + off * np.cos(ang), tr_xi)
        tr_eta = np.where(hosted, gals["eta"].to_numpy()[pick] + off * np.sin(ang), tr_eta)
        host = np.where(hosted, pick, -1)  # index into gals; turned into an object id below
    peak_r = trng.uniform(19.0, 22.0, n_tr)
    trans = pd.DataFrame({
        "kind": "transient", "xi": tr_xi, "eta": tr_eta,
        "mag_g": peak_r + trng.uniform(-0.25, 0.1, n_tr), "mag_r": peak_r,
        "mag_i": peak_r - trng.uniform(-0.2, 0.1, n_tr),
        "t_peak": config.mjd0 + span * trng.uniform(0.2, 0.8, n_tr),
        "tau_rise": np.maximum(0.3, span * trng.uniform(0.04, 0.08, n_tr)),
        "tau_fall": np.maximum(2.0, span * trng.uniform(0.25, 0.45, n_tr)),
        "_host_index": host,
    })
    frames.append(trans)

    # --- moving objects: cross ~80% of the mosaic during the survey
    mrng = rng_for(config, 3)
    n_mv = int(config.n_moving)
    speed = 0.8 * 2.0 * max(fx, fy) / span  # deg/day
    ang = mrng.uniform(0.0, 2.0 * np.pi, n_mv)
    mr = mrng.uniform(19.5, 21.0, n_mv)
    moving = pd.DataFrame({
        "kind": "moving",
        "xi": mrng.uniform(-0.3 * fx, 0.3 * fx, n_mv), "eta": mrng.uniform(-0.3 * fy, 0.3 * fy, n_mv),
        "mag_g": mr + 0.6, "mag_r": mr, "mag_i": mr - 0.2,
        "rate_ra": speed * np.cos(ang), "rate_dec": speed * np.sin(ang),
        "t_ref": config.mjd0 + 0.5 * span,
    })
    frames.append(moving)

    sky = pd.concat(frames, ignore_index=True)
    sky.insert(0, "object_id", np.arange(1, len(sky) + 1, dtype=np.int64))
    n_static = n_star  # galaxies start after the stars
    host_idx = sky.pop("_host_index").fillna(-1).to_numpy().astype(np.int64)
    sky["host_id"] = np.where(host_idx >= 0, host_idx + n_static + 1, -1).astype(np.int64)
    ra, dec = tangent_to_sky(sky["xi"].to_numpy(), sky["eta"].to_numpy(), config.ra0, config.dec0)
    sky.insert(2, "ra", ra)
    sky.insert(3, "dec", dec)
    sky = sky.drop(columns=["xi", "eta"])
    for b in KNOWN_BANDS:
        sky[f"flux_{b}"] = mag_to_njy(sky[f"mag_{b}"].to_numpy())
    defaults = {"var_shape": "", "host_id": -1}
    for col in ("r_eff_arcsec", "axis_ratio", "pa_deg", "period", "amplitude", "t0", "t_peak", "tau_rise",
                "tau_fall", "rate_ra", "rate_dec", "t_ref"):
        if col not in sky:
            sky[col] = np.nan
    sky["var_shape"] = sky["var_shape"].fillna(defaults["var_shape"]).astype(str)
    sky["kind"] = sky["kind"].astype(str)
    return sky


def object_positions(sky: pd.DataFrame, mjd: float, config: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in deg of every object at ``mjd`` (only moving objects move)."""
    ra = sky["ra"].to_numpy().copy()
    dec = sky["dec"].to_numpy().copy()
    mv = (sky["kind"] == "moving").to_numpy()
    if mv.any():
        xi, eta = sky_to_tangent(ra[mv], dec[mv], config.ra0, config.dec0)
        dt = mjd - sky["t_ref"].to_numpy()[mv]
        xi = xi + sky["rate_ra"].to_numpy()[mv] * dt
        eta = eta + sky["rate_dec"].to_numpy()[mv] * dt
        ra[mv], dec[mv] = tangent_to_sky(xi, eta, config.ra0, config.dec0)
    return ra, dec


def object_fluxes(sky: pd.DataFrame, band: str, mjd: float) -> np.ndarray:
    """True flux (nJy) of every object in ``band`` at ``mjd``."""
    base = sky[f"flux_{band}"].to_numpy().astype(float)
    out = base.copy()
    kind = sky["kind"].to_numpy()
    var = kind == "variable"
    if var.any():
        out[var] = lc.periodic_flux(mjd, base[var], sky["amplitude"].to_numpy()[var] * lc.VARIABLE_AMP_SCALE[band],
                                    sky["period"].to_numpy()[var], sky["t0"].to_numpy()[var],
                                    sky["var_shape"].to_numpy()[var])
    tr = kind == "transient"
    if tr.any():
        out[tr] = lc.bazin_flux(mjd, base[tr], sky["t_peak"].to_numpy()[tr], sky["tau_rise"].to_numpy()[tr],
                                sky["tau_fall"].to_numpy()[tr] * lc.TRANSIENT_FALL_SCALE[band])
    return out


def mean_magnitudes(sky: pd.DataFrame, band: str) -> np.ndarray:
    """Time-averaged AB magnitude per object (periodic variables averaged over a cycle)."""
    mags = sky[f"mag_{band}"].to_numpy().astype(float).copy()
    var = (sky["kind"] == "variable").to_numpy()
    if var.any():
        phase = np.linspace(0.0, 1.0, 200, endpoint=False)
        amp = sky["amplitude"].to_numpy()[var] * lc.VARIABLE_AMP_SCALE[band]
        s = lc.periodic_shape(phase[None, :], sky["var_shape"].to_numpy()[var][:, None])
        mean_flux = (10.0 ** (0.4 * amp[:, None] * s)).mean(axis=1) * sky[f"flux_{band}"].to_numpy()[var]
        mags[var] = njy_to_mag(mean_flux)
    return mags


def make_reference_catalog(config: SimConfig, sky: pd.DataFrame) -> pd.DataFrame:
    """Reference catalog of stars (and variables at their mean) with Gaia/PS1-like errors.

    Keeps stars with 15 <= r < 21.5.  Magnitude errors
    ``sqrt(0.003^2 + (0.02 * 10**(0.4 (m - 20)))^2)``; positional errors
    ``5 mas * 10**(0.2 (r - 17))`` (>= 1 mas) per axis.  Observed values are
    the truth plus Gaussian noise of those sizes, in the catalog's own system:
    ``m_ref,b = m_b - color_terms[b] * (g - r)`` (mean magnitudes).  Columns: ``ref_id``,
    ``ra``, ``dec`` (deg), ``ra_err``, ``dec_err`` (mas), ``g``, ``g_err``,
    ``r``, ``r_err``, ``i``, ``i_err`` (AB mag), ``object_id`` (truth link).
    """
    rng = rng_for(config, 4)
    stars = sky[sky["kind"].isin(["star", "variable"])]
    mean = {b: mean_magnitudes(stars, b) for b in KNOWN_BANDS}
    keep = (mean["r"] >= 15.0) & (mean["r"] < 21.5)
    stars = stars[keep]
    n = len(stars)
    out = pd.DataFrame({"ref_id": np.arange(1, n + 1, dtype=np.int64)})
    pos_err = np.maximum(1.0, 5.0 * 10.0 ** (0.2 * (mean["r"][keep] - 17.0)))  # mas
    dec = stars["dec"].to_numpy()
    out["ra"] = stars["ra"].to_numpy() + rng.normal(0.0, 1.0, n) * pos_err / 3.6e6 / np.cos(np.radians(dec))
    out["dec"] = dec + rng.normal(0.0, 1.0, n) * pos_err / 3.6e6
    out["ra_err"] = pos_err
    out["dec_err"] = pos_err
    gr = (mean["g"] - mean["r"])[keep]
    for b in KNOWN_BANDS:
        err = np.hypot(0.003, 0.02 * 10.0 ** (0.4 * (mean[b][keep] - 20.0)))
        m = mean[b][keep] - config.color_terms[b] * gr
        out[b] = m + rng.normal(0.0, 1.0, n) * err
        out[f"{b}_err"] = err
    out["object_id"] = stars["object_id"].to_numpy()
    return out
