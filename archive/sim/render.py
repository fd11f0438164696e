"""Epoch planning and noiseless rendering of one detector of one visit.

:func:`plan_epochs` fixes, for every visit, band, time, pointing, seeing,
transparency and quality; :func:`render_epoch` makes the noiseless image of
one detector (incident electrons per pixel, before the flat field) with its
truth: per-object positions and fluxes, the PSF, cosmic rays and streaks.
Everything is deterministic from ``config.seed``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from astropy.wcs import WCS
from scipy import signal

from archive.errors import ValidationError
from archive.image.psf import FWHM_PER_SIGMA, PSF, MoffatPSF, StampAccumulator
from archive.sim.config import SimConfig
from archive.sim.geometry import detector_origins, focal_plane_radius, make_wcs, tangent_to_sky
from archive.sim.skymodel import EXP_B1, object_fluxes, object_positions, rng_for

#: Point sources are drawn out to the radius beyond which their Moffat wings hold less than this
#: fraction of their own Poisson noise ``sqrt(flux_e)`` (see :func:`point_stamp_half`), and are
#: never renormalised inside their stamps: inside it, each image is exactly ``flux_e`` times the
#: true pixel-integrated PSF, and what lies beyond is far below the noise, even summed.
WING_NOISE_FRACTION = 0.05
#: Stamp half-sizes (px) are rounded up to these classes so that batches stay large.  The largest
#: (151 px stamps) caps them: it leaves out 8e-7 of the flux at FWHM 4.25 px, 5e-5 at 10 px (beta 3.5).
STAMP_HALF_CLASSES = (5, 7, 9, 11, 13, 15, 18, 21, 25, 30, 36, 43, 51, 61, 75)
#: Half-size (px) of the largest galaxy stamp (:func:`render_galaxies` ``max_size`` 63).
GALAXY_HALF_MAX = 31


@dataclass
class Epoch:
    """One visit: what the telescope did and the conditions (all detectors share it).

    ``ra``/``dec``/``rotation_deg`` are the *true* pointing; the raw headers
    carry ``ra + wcs_dra_arcsec``, ``dec + wcs_ddec_arcsec`` and
    ``rotation_deg + wcs_drot_deg`` (no distortion).  ``seeing_px`` is the
    Moffat FWHM (pixels) on the optical axis; ``psf_tilt`` its linear
    gradient across the mosaic; ``psf_ellipticity`` (1 - b/a) and
    ``psf_theta`` (deg from +x) the epoch's PSF elongation (tracking/wind
    shake), to which each detector adds a radial astigmatism term.  ``quality`` is ``good``, ``clouds`` or
    ``focus``.  ``sky_mag`` in mag/arcsec^2; ``transparency`` multiplies
    source fluxes; ``sky_tilt`` is the background gradient direction.
    """

    index: int
    visit: int
    band: str
    mjd: float
    exp_time: float
    airmass: float
    ra: float
    dec: float
    rotation_deg: float
    seeing_px: float
    psf_beta: float
    psf_tilt: tuple[float, float]
    psf_ellipticity: float
    psf_theta: float
    transparency: float
    sky_mag: float
    sky_tilt: tuple[float, float]
    quality: str
    streak: bool
    wcs_dra_arcsec: float
    wcs_ddec_arcsec: float
    wcs_drot_deg: float

    @property
    def mjd_start(self) -> float:
        """MJD (TAI) at the start of the exposure."""
        return self.mjd - 0.5 * self.exp_time / 86400.0


def default_bad_epochs(config: SimConfig) -> dict[int, str]:
    """Bad epochs when ``config.bad_epochs`` is None: one cloudy (n >= 4) and one out of focus (n >= 6)."""
    if config.bad_epochs is not None:
        return dict(config.bad_epochs)
    rng = rng_for(config, 5)
    n = config.n_epochs
    out: dict[int, str] = {}
    if n >= 4:
        candidates = list(range(1, n))
        picks = rng.choice(candidates, size=2 if n >= 6 else 1, replace=False)
        out[int(picks[0])] = "clouds"
        if n >= 6:
            out[int(picks[1])] = "focus"
    return out


def default_streak_epochs(config: SimConfig) -> tuple[int, ...]:
    """Streak epochs when ``config.streak_epochs`` is None: one good epoch (n >= 3)."""
    if config.streak_epochs is not None:
        return tuple(config.streak_epochs)
    if config.n_epochs < 3:
        return ()
    bad = default_bad_epochs(config)
    rng = rng_for(config, 6)
    good = [i for i in range(1, config.n_epochs) if i not in bad]
    return (int(rng.choice(good)),) if good else ()


def plan_epochs(config: SimConfig) -> list[Epoch]:
    """The visits of the survey, in time order."""
    rng = rng_for(config, 7)
    bad = default_bad_epochs(config)
    streaks = set(default_streak_epochs(config))
    epochs = []
    for i in range(config.n_epochs):
        band = config.bands[i % len(config.bands)]
        mjd = config.mjd0 + i * config.cadence_days + rng.uniform(-1, 1) * config.cadence_jitter_days
        dxi, deta = rng.normal(0.0, config.dither_arcsec / 3600.0, 2)
        ra, dec = tangent_to_sky(dxi, deta, config.ra0, config.dec0)
        seeing = config.seeing_arcsec * math.exp(rng.normal(0.0, config.seeing_scatter)) / config.pixel_scale
        seeing = max(seeing, 1.5)
        quality = bad.get(i, "good")
        transparency = float(rng.uniform(0.85, 1.0))
        sky_mag = config.sky_mag[band] + rng.normal(0.0, 0.15)
        if quality == "clouds":
            transparency *= 0.3
            sky_mag -= 0.4
        if quality == "focus":
            seeing *= 2.2
        tilt_ang = rng.uniform(0, 2 * np.pi)
        tilt = 0.5 * config.psf_variation * rng.uniform(0, 1)
        sky_ang = rng.uniform(0, 2 * np.pi)
        ell = float(rng.uniform(0.0, 0.08))
        ell_theta = float(rng.uniform(-90.0, 90.0))
        epochs.append(Epoch(
            index=i, visit=i + 1, band=band, mjd=float(mjd), exp_time=config.exp_time,
            airmass=float(rng.uniform(1.0, 1.6)), ra=float(ra), dec=float(dec),
            rotation_deg=float(rng.normal(0.0, config.rotation_deg)), seeing_px=float(seeing),
            psf_beta=config.psf_beta, psf_tilt=(float(tilt * math.cos(tilt_ang)), float(tilt * math.sin(tilt_ang))),
            psf_ellipticity=ell, psf_theta=ell_theta,
            transparency=transparency, sky_mag=float(sky_mag),
            sky_tilt=(float(math.cos(sky_ang)), float(math.sin(sky_ang))), quality=quality, streak=i in streaks,
            wcs_dra_arcsec=float(rng.normal(0.0, config.wcs_offset_arcsec)),
            wcs_ddec_arcsec=float(rng.normal(0.0, config.wcs_offset_arcsec)),
            wcs_drot_deg=float(rng.normal(0.0, config.wcs_rotation_error_deg)),
        ))
    return epochs


def true_wcs(config: SimConfig, epoch: Epoch, detector: int) -> WCS:
    """The true TAN-SIP WCS of ``detector`` in ``epoch`` (imaging-section pixels, origin 0)."""
    return make_wcs(config, detector, epoch.ra, epoch.dec, epoch.rotation_deg, sip=True)


def header_wcs(config: SimConfig, epoch: Epoch, detector: int) -> WCS:
    """The approximate TAN WCS written in the raw header (pointing/rotation errors, no distortion)."""
    dec = epoch.dec + epoch.wcs_ddec_arcsec / 3600.0
    ra = epoch.ra + epoch.wcs_dra_arcsec / 3600.0 / math.cos(math.radians(epoch.dec))
    return make_wcs(config, detector, ra, dec, epoch.rotation_deg + epoch.wcs_drot_deg, sip=False)


def epoch_psf(config: SimConfig, epoch: Epoch, detector: int) -> MoffatPSF:
    """Spatially varying Moffat PSF of ``detector``: FWHM grows quadratically off axis plus a tilt.

    ``FWHM(X, Y) = seeing_px (1 + v (X^2 + Y^2) / R^2 + (tx X + ty Y) / R)`` in
    focal-plane pixels (R: mosaic corner radius, v: ``config.psf_variation``),
    written as a degree-2 polynomial over the detector's bbox.  Ellipticity:
    the epoch's (``psf_ellipticity``, ``psf_theta``) plus a radial
    astigmatism ``0.04 (r / R)^2`` pointing at the detector centre, added as
    spin-2 vectors.
    """
    o = detector_origins(config)[detector]
    R = focal_plane_radius(config)
    hx, hy = (config.nx - 1) / 2.0, (config.ny - 1) / 2.0
    xc, yc = o[0] + hx, o[1] + hy
    v = config.psf_variation
    tx, ty = epoch.psf_tilt

    def rel(X, Y):
        return 1.0 + v * (X**2 + Y**2) / R**2 + (tx * X + ty * Y) / R

    fc = rel(xc, yc)
    # coefficients of u, v, u^2, uv, v^2 (u = (x - xc)/hx in [-1, 1]) relative to the centre value
    cu = (2 * v * xc * hx / R**2 + tx * hx / R) / fc
    cv = (2 * v * yc * hy / R**2 + ty * hy / R) / fc
    cuu = v * hx**2 / R**2 / fc
    cvv = v * hy**2 / R**2 / fc
    # ellipticity as a spin-2 vector: epoch part + radial astigmatism at the detector centre
    t0 = math.radians(2.0 * epoch.psf_theta)
    r2 = (xc**2 + yc**2) / R**2 if R > 0 else 0.0
    phi = math.atan2(yc, xc)
    e1 = epoch.psf_ellipticity * math.cos(t0) + 0.04 * r2 * math.cos(2 * phi)
    e2 = epoch.psf_ellipticity * math.sin(t0) + 0.04 * r2 * math.sin(2 * phi)
    ell = min(math.hypot(e1, e2), 0.5)
    theta = math.degrees(0.5 * math.atan2(e2, e1))
    return MoffatPSF(epoch.seeing_px * fc, epoch.psf_beta, variation=[cu, cv, cuu, 0.0, cvv],
                     bbox=(0.0, 0.0, float(config.nx - 1), float(config.ny - 1)), oversample=3,
                     ellipticity=ell, theta=theta)


def electrons_per_njy(config: SimConfig, epoch: Epoch) -> float:
    """Detected electrons (before the flat field) per nJy of source flux in this epoch."""
    zp = config.zero_points[epoch.band]
    ext = config.extinction[epoch.band] * (epoch.airmass - 1.0)
    return 10.0 ** (-0.4 * (31.4 - zp + ext)) * epoch.exp_time * epoch.transparency


def sky_electrons(config: SimConfig, epoch: Epoch) -> float:
    """Mean sky level in electrons per pixel (before the flat field)."""
    zp = config.zero_points[epoch.band]
    return 10.0 ** (-0.4 * (epoch.sky_mag - zp)) * config.pixel_scale**2 * epoch.exp_time


def njy_per_adu(config: SimConfig, epoch: Epoch, detector: int) -> float:
    """True calibration of a bias/dark-subtracted, flat-fielded image in adu: nJy per adu."""
    return detector_gain(config, detector) / electrons_per_njy(config, epoch)


def detector_gain(config: SimConfig, detector: int) -> float:
    """Gain (e-/adu) of ``detector``: the nominal gain times a fixed per-detector factor (+-3%)."""
    rng = rng_for(config, 100, detector)
    return float(config.gain * (1.0 + rng.uniform(-0.03, 0.03)))


def point_stamp_half(psf: MoffatPSF, xs, ys, flux_e, wing_fraction: float = WING_NOISE_FRACTION) -> np.ndarray:
    """Stamp half-size (px, int) leaving out less than ``wing_fraction * sqrt(flux_e)`` electrons.

    A Moffat (FWHM ``f`` at the position, ``alpha = f / (2 sqrt(2^(1/beta) - 1))``,
    axis ratio ``q = 1 - ellipticity``, isophotes ``r^2 = q x'^2 + y'^2 / q``) holds
    ``(1 + q R^2 / alpha^2) ** (1 - beta)`` of its flux at most outside the disk of
    radius ``R`` (that disk contains the isophote ``r = R sqrt(q)``), and a square stamp
    of half-size ``h`` contains the disk of radius ``h + 0.5``.  Half-sizes are rounded
    up to :data:`STAMP_HALF_CLASSES` (the largest class caps them).
    """
    fw = psf.fwhm(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float))
    beta = psf.beta
    alpha = fw / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    q = 1.0 - psf.ellipticity()
    # largest flux fraction that may lie outside the stamp (1 = none needed)
    t = np.minimum(wing_fraction / np.sqrt(np.maximum(np.asarray(flux_e, dtype=float), 1e-300)), 1.0)
    radius = alpha * np.sqrt((t ** (-1.0 / (beta - 1.0)) - 1.0) / q)
    need = np.ceil(radius - 0.5)
    classes = np.asarray(STAMP_HALF_CLASSES)
    return classes[np.minimum(np.searchsorted(classes, need), classes.size - 1)]


def point_source_stamps(psf: MoffatPSF, xs, ys, size: int) -> np.ndarray:
    """Pixel-integrated PSF stamps ``(N, size, size)`` normalised over the whole plane.

    :meth:`PSF.stamps`, *not* renormalised inside the stamp (that would move the cut
    wings into the core), so each stamp sums to the PSF's flux fraction inside it and
    ``F *`` stamp is exactly a source of total flux ``F`` wherever the stamp reaches.
    """
    return psf.stamps(np.atleast_1d(np.asarray(xs, dtype=float)), np.atleast_1d(np.asarray(ys, dtype=float)), size)


def add_point_source_models(image: np.ndarray, psf: MoffatPSF, xs, ys, flux_e, half,
                            max_pixels: int = 2_000_000) -> np.ndarray:
    """Add point sources of total flux ``flux_e`` at ``(xs, ys)`` to ``image`` in place.

    Each is ``flux_e`` times :func:`point_source_stamps` on a stamp of half-size
    ``half`` (px, per source); stamps are rendered in batches of one size (at most
    ``max_pixels`` stamp pixels each) and summed in one pass.  Returns ``image``.
    """
    xs = np.asarray(xs, dtype=float)
    ys = np.asarray(ys, dtype=float)
    fl = np.asarray(flux_e, dtype=float)
    half = np.asarray(half, dtype=int)
    acc = StampAccumulator(image.shape)
    for h in np.unique(half):
        idx = np.flatnonzero(half == h)
        size = 2 * int(h) + 1
        step = max(1, max_pixels // (size * size))
        for start in range(0, idx.size, step):
            k = idx[start:start + step]
            acc.add(point_source_stamps(psf, xs[k], ys[k], size) * fl[k][:, None, None], xs[k], ys[k])
    acc.finish(image)
    return image


@dataclass
class EpochModel:
    """Noiseless rendering of one detector in one epoch, with its truth.

    ``model_e``: incident electrons per pixel (sky + objects + streak) before
    the flat field (each point source in it is exactly ``flux_e`` times ``psf``
    out to the stamp of :func:`point_stamp_half`); ``sky_e``: the sky part alone; ``cosmic_e``: electrons
    deposited by cosmic rays (not flat-fielded, added after).  ``sources``:
    one row per object whose centre falls on the detector (see
    :func:`render_epoch`).  ``cosmic_rays`` (``x0, y0, x1, y1`` track ends,
    ``e_per_px`` electrons per pixel of length) and ``streaks`` (``x0, y0,
    x1, y1`` where the line crosses the detector edges, the same ends as
    ``ra0, dec0, ra1, dec1``, Gaussian ``sigma_px``, ``line_flux_e``
    electrons per pixel of length) describe the artifacts in detector pixels.
    """

    epoch: Epoch
    detector: int
    model_e: np.ndarray
    sky_e: np.ndarray
    cosmic_e: np.ndarray
    psf: MoffatPSF
    wcs: WCS
    wcs_header: WCS
    sources: pd.DataFrame
    cosmic_rays: pd.DataFrame
    streaks: pd.DataFrame
    electrons_per_njy: float
    gain: float
    extras: dict = field(default_factory=dict)

    @property
    def njy_per_adu(self) -> float:
        """True nJy per adu of the calibrated (bias, dark, flat corrected) image."""
        return self.gain / self.electrons_per_njy


def render_galaxies(image: np.ndarray, psf: PSF, xs, ys, fluxes, r_eff_px, axis_ratio, pa_rad,
                    sub: int = 3, max_size: int = 63) -> np.ndarray:
    """Add PSF-convolved exponential-profile galaxies to ``image`` in place.

    Each galaxy (total flux ``fluxes``, half-light radius ``r_eff_px`` pixels
    along the major axis, axis ratio b/a, major axis at ``pa_rad`` from the +x
    axis) is integrated over pixels with ``sub x sub`` sub-samples, convolved
    (FFT) with the PSF point-sampled at the galaxy's position, normalised to
    its flux inside the stamp and added.  Stamps are ``<= max_size`` pixels.
    """
    xs = np.asarray(xs, dtype=float)
    if xs.size == 0:
        return image
    ys = np.asarray(ys, dtype=float)
    fl = np.asarray(fluxes, dtype=float)
    re = np.asarray(r_eff_px, dtype=float)
    q = np.asarray(axis_ratio, dtype=float)
    pa = np.asarray(pa_rad, dtype=float)
    fw = psf.fwhm(xs, ys)
    half = np.ceil(np.maximum(5.0 * re, 2.5 * fw)).astype(int)
    sizes = np.minimum(2 * half + 1, max_size | 1)
    # round sizes up to a few classes so batches stay large
    classes = np.array([15, 21, 25, 31, 41, 51, 63])
    classes = classes[classes <= (max_size | 1)]
    size_cls = classes[np.minimum(np.searchsorted(classes, sizes), classes.size - 1)]
    point_psf = copy.deepcopy(psf)
    if isinstance(point_psf, MoffatPSF):
        point_psf.oversample = 1  # point-sampled: the galaxy stamp already integrates over pixels
    acc = StampAccumulator(image.shape)
    for s in np.unique(size_cls):
        idx = np.flatnonzero(size_cls == s)
        g = np.arange(s, dtype=float) - s // 2
        for start in range(0, idx.size, 256):
            k = idx[start:start + 256]
            ix = np.floor(xs[k] + 0.5)
            iy = np.floor(ys[k] + 0.5)
            dx = (xs[k] - ix)[:, None, None]
            dy = (ys[k] - iy)[:, None, None]
            c = np.cos(pa[k]).astype(np.float32)[:, None, None]
            sn = np.sin(pa[k]).astype(np.float32)[:, None, None]
            scale = (EXP_B1 / re[k]).astype(np.float32)[:, None, None]
            qq = q[k].astype(np.float32)[:, None, None]
            nsub = sub if float(re[k].min()) < 3.0 else 1  # large galaxies are smooth on the pixel scale
            so = (np.arange(nsub) + 0.5) / nsub - 0.5
            gal = np.zeros((k.size, s, s), dtype=np.float32)
            for oy in so:
                Y = (g[None, :, None] - dy + oy).astype(np.float32)
                for ox in so:
                    X = (g[None, None, :] - dx + ox).astype(np.float32)
                    xr = X * c + Y * sn
                    yr = -X * sn + Y * c
                    gal += np.exp(-scale * np.sqrt(xr**2 + (yr / qq) ** 2))
            kern = point_psf.stamps(ix, iy, int(s), renormalize=True).astype(np.float32)
            conv = signal.fftconvolve(gal, kern, mode="same", axes=(1, 2)).astype(float)
            np.clip(conv, 0.0, None, out=conv)
            conv /= conv.sum(axis=(1, 2), keepdims=True)
            acc.add(conv * fl[k][:, None, None], xs[k], ys[k])
    acc.finish(image)
    return image


def _streak_image(shape, x0, y0, angle, sigma, line_flux):
    """Gaussian-profile line through (x0, y0) at ``angle`` (rad): electrons per pixel."""
    ny, nx = shape
    xx = np.arange(nx, dtype=float)[None, :]
    yy = np.arange(ny, dtype=float)[:, None]
    d = (xx - x0) * math.sin(angle) - (yy - y0) * math.cos(angle)
    return line_flux / (math.sqrt(2 * math.pi) * sigma) * np.exp(-0.5 * (d / sigma) ** 2)


def _clip_line(x0, y0, angle, nx, ny):
    """End points of the line through (x0, y0) at ``angle`` inside [-0.5, n-0.5]; None if it misses."""
    c, s = math.cos(angle), math.sin(angle)
    ts = []
    for lo, hi, p, dp in ((-0.5, nx - 0.5, x0, c), (-0.5, ny - 0.5, y0, s)):
        if abs(dp) < 1e-12:
            if not lo <= p <= hi:
                return None
            continue
        t1, t2 = sorted(((lo - p) / dp, (hi - p) / dp))
        ts.append((t1, t2))
    tmin = max(t[0] for t in ts)
    tmax = min(t[1] for t in ts)
    if tmin >= tmax:
        return None
    return (x0 + tmin * c, y0 + tmin * s, x0 + tmax * c, y0 + tmax * s)


def render_epoch(config: SimConfig, sky: pd.DataFrame, epoch: Epoch, detector: int) -> EpochModel:
    """Noiseless model and truth of ``detector`` in ``epoch``.

    ``sources`` columns: ``visit``, ``detector``, ``object_id``, ``kind``,
    ``ra``, ``dec`` (deg, at the epoch), ``x``, ``y`` (true pixel position,
    origin 0, imaging section), ``flux_njy`` (true flux in the epoch's band),
    ``flux_e`` (electrons before the flat field), ``counts`` (adu in the
    calibrated image = flux_e / gain), ``psf_fwhm`` (pixels at the position),
    ``peak_e`` (brightest pixel of this object alone, electrons),
    ``saturated`` (peak_e + sky above the full well).
    """
    if not 0 <= detector < config.n_detectors:
        raise ValidationError(f"detector {detector} outside 0..{config.n_detectors - 1}")
    nx, ny = config.nx, config.ny
    wcs = true_wcs(config, epoch, detector)
    psf = epoch_psf(config, epoch, detector)
    e_per_njy = electrons_per_njy(config, epoch)
    gain = detector_gain(config, detector)
    ra, dec = object_positions(sky, epoch.mjd, config)
    x, y = wcs.all_world2pix(ra, dec, 0, tolerance=1e-8, maxiter=50, quiet=True)
    flux_njy = object_fluxes(sky, epoch.band, epoch.mjd)
    kind = sky["kind"].to_numpy()
    flux_e = flux_njy * e_per_njy

    def within(margin: float) -> np.ndarray:
        """Objects within ``margin`` px of the detector (whose stamps may reach it)."""
        return (x > -margin) & (x < nx - 1 + margin) & (y > -margin) & (y < ny - 1 + margin)

    # --- sky background with a linear gradient
    sky_level = sky_electrons(config, epoch)
    gx, gy = epoch.sky_tilt
    u = (np.arange(nx) - (nx - 1) / 2.0) / max(nx - 1, 1)
    v = (np.arange(ny) - (ny - 1) / 2.0) / max(ny - 1, 1)
    sky_e = sky_level * (1.0 + config.sky_gradient * (gx * u[None, :] + gy * v[:, None]))
    model = np.zeros((ny, nx))

    # --- point sources (stars, variables, transients, moving objects): stamps large enough that
    # the wings left out are far below the source's own noise, not renormalised
    pts = within(STAMP_HALF_CLASSES[-1] + 1.0) & (kind != "galaxy") & (flux_e > 0)
    if pts.any():
        px, py, pf = x[pts], y[pts], flux_e[pts]
        half = point_stamp_half(psf, px, py, pf)
        reach = (px > -half - 1) & (px < nx + half) & (py > -half - 1) & (py < ny + half)
        add_point_source_models(model, psf, px[reach], py[reach], pf[reach], half[reach])

    # --- galaxies
    gal = within(GALAXY_HALF_MAX + 2.0) & (kind == "galaxy")
    if gal.any():
        r_eff_px = sky["r_eff_arcsec"].to_numpy()[gal] / config.pixel_scale
        # PA east of north on the sky -> angle from +x in pixels: the sky's north is +y (up to rotation)
        pa_pix = np.radians(90.0 + sky["pa_deg"].to_numpy()[gal] - epoch.rotation_deg)
        render_galaxies(model, psf, x[gal], y[gal], flux_e[gal], r_eff_px, sky["axis_ratio"].to_numpy()[gal],
                        pa_pix)

    # --- satellite streak: a line in focal-plane coordinates shared by all detectors
    streak_rows = []
    if epoch.streak:
        srng = rng_for(config, 8, epoch.index)
        o = detector_origins(config)
        centre = o[srng.integers(0, config.n_detectors)] + np.array([nx, ny]) * srng.uniform(0.3, 0.7, 2)
        angle = float(srng.uniform(0.0, np.pi))
        sigma = psf.fwhm() / FWHM_PER_SIGMA
        line_flux = float(srng.uniform(3000.0, 8000.0))  # electrons per pixel of length
        x0, y0 = centre - o[detector]
        ends = _clip_line(float(x0), float(y0), angle, nx, ny)
        if ends is not None:
            model += _streak_image((ny, nx), float(x0), float(y0), angle, sigma, line_flux)
            (ra0, dec0), (ra1, dec1) = wcs.all_pix2world(np.array([ends[:2], ends[2:]]), 0)
            streak_rows.append({"visit": epoch.visit, "detector": detector, "x0": ends[0], "y0": ends[1],
                                "x1": ends[2], "y1": ends[3], "ra0": ra0, "dec0": dec0, "ra1": ra1, "dec1": dec1,
                                "sigma_px": sigma, "line_flux_e": line_flux})

    # --- cosmic rays (deposited charge, not flat-fielded)
    crng = rng_for(config, 9, epoch.index, detector)
    n_cr = int(crng.poisson(config.cosmic_ray_rate * nx * ny / 1e6 * epoch.exp_time / 30.0))
    cosmic = np.zeros((ny, nx))
    cr_rows = {"visit": np.full(n_cr, epoch.visit), "detector": np.full(n_cr, detector)}
    if n_cr:
        cx0 = crng.uniform(0, nx - 1, n_cr)
        cy0 = crng.uniform(0, ny - 1, n_cr)
        length = 1.0 + crng.exponential(5.0, n_cr)
        ang = crng.uniform(0, 2 * np.pi, n_cr)
        cx1 = np.clip(cx0 + length * np.cos(ang), 0, nx - 1)
        cy1 = np.clip(cy0 + length * np.sin(ang), 0, ny - 1)
        e_per_px = crng.uniform(500.0, 5000.0, n_cr)
        step = 0.25
        nstep = np.maximum(1, np.ceil(np.hypot(cx1 - cx0, cy1 - cy0) / step).astype(int)) + 1
        owner = np.repeat(np.arange(n_cr), nstep)
        t = np.concatenate([np.linspace(0.0, 1.0, k) for k in nstep])
        px = np.floor(cx0[owner] + t * (cx1 - cx0)[owner] + 0.5).astype(int)
        py = np.floor(cy0[owner] + t * (cy1 - cy0)[owner] + 0.5).astype(int)
        # each sample carries length/nsamples of the track's charge per pixel length
        seg = np.maximum(np.hypot(cx1 - cx0, cy1 - cy0), 1.0)
        w = (e_per_px * seg / nstep)[owner]
        cosmic += np.bincount(py * nx + px, weights=w, minlength=nx * ny).reshape(ny, nx)
        cr_rows.update({"x0": cx0, "y0": cy0, "x1": cx1, "y1": cy1, "e_per_px": e_per_px})
    else:
        cr_rows.update({k: np.zeros(0) for k in ("x0", "y0", "x1", "y1", "e_per_px")})

    # --- truth per object on the detector
    on = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    idx = np.flatnonzero(on)
    fw_on = psf.fwhm(x[idx], y[idx])
    # peak of a point source: flux times its brightest pixel's PSF fraction; galaxies: the rendered model
    peak = np.zeros(idx.size)
    is_pt = kind[idx] != "galaxy"
    if is_pt.any():
        st = point_source_stamps(psf, x[idx][is_pt], y[idx][is_pt], 3)
        peak[is_pt] = flux_e[idx][is_pt] * st.max(axis=(1, 2))
    ixs = np.clip(np.floor(x[idx] + 0.5).astype(int), 0, nx - 1)
    iys = np.clip(np.floor(y[idx] + 0.5).astype(int), 0, ny - 1)
    peak[~is_pt] = model[iys[~is_pt], ixs[~is_pt]]
    sources = pd.DataFrame({
        "visit": np.full(idx.size, epoch.visit, dtype=np.int64),
        "detector": np.full(idx.size, detector, dtype=np.int64),
        "object_id": sky["object_id"].to_numpy()[idx],
        "kind": kind[idx].astype(str),
        "ra": ra[idx], "dec": dec[idx], "x": x[idx], "y": y[idx],
        "flux_njy": flux_njy[idx], "flux_e": flux_e[idx], "counts": flux_e[idx] / gain,
        "psf_fwhm": fw_on, "peak_e": peak,
        "saturated": peak + sky_e[iys, ixs] > config.full_well,
    })
    model += sky_e
    return EpochModel(
        epoch=epoch, detector=detector, model_e=model, sky_e=sky_e, cosmic_e=cosmic, psf=psf, wcs=wcs,
        wcs_header=header_wcs(config, epoch, detector), sources=sources,
        cosmic_rays=pd.DataFrame(cr_rows),
        streaks=pd.DataFrame(streak_rows, columns=["visit", "detector", "x0", "y0", "x1", "y1", "ra0", "dec0",
                                                   "ra1", "dec1", "sigma_px", "line_flux_e"]),
        electrons_per_njy=e_per_njy, gain=gain,
    )
