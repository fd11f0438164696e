"""Light-curve shapes of the simulated variable objects (fluxes in nJy, times MJD)."""

from __future__ import annotations

import numpy as np

#: Band-dependent amplitude scaling of periodic variables (relative to r).
VARIABLE_AMP_SCALE = {"g": 1.25, "r": 1.0, "i": 0.8}
#: Band-dependent decline-time scaling of transients (bluer bands fade faster).
TRANSIENT_FALL_SCALE = {"g": 0.75, "r": 1.0, "i": 1.3}

#: Fraction of the period spent rising for the "sawtooth" (RR Lyrae-like) shape.
SAWTOOTH_RISE = 0.15


def periodic_shape(phase, shape):
    """Shape ``s`` in [0, 1] of a periodic variable at ``phase`` (cycles; any real).

    ``shape`` (array of str or str): ``"sine"`` -> ``0.5 (1 + sin(2 pi phase))``;
    ``"sawtooth"`` -> linear rise over the first 15% of the cycle, linear decline
    over the rest (maximum at phase 0.15, minimum at phase 0).
    """
    ph = np.mod(np.asarray(phase, dtype=float), 1.0)
    sine = 0.5 * (1.0 + np.sin(2.0 * np.pi * ph))
    saw = np.where(ph < SAWTOOTH_RISE, ph / SAWTOOTH_RISE, (1.0 - ph) / (1.0 - SAWTOOTH_RISE))
    return np.where(np.asarray(shape) == "sawtooth", saw, sine)


def periodic_flux(t, flux_min, amplitude_mag, period, t0, shape):
    """Flux (nJy) of a periodic variable: ``flux_min * 10**(0.4 * amplitude_mag * s(phase))``.

    ``phase = (t - t0) / period``; ``amplitude_mag`` is the peak-to-peak
    amplitude in magnitudes; all arguments broadcast.
    """
    s = periodic_shape((np.asarray(t, dtype=float) - t0) / period, shape)
    return np.asarray(flux_min, dtype=float) * 10.0 ** (0.4 * np.asarray(amplitude_mag, dtype=float) * s)


def bazin_peak_offset(tau_rise, tau_fall):
    """Time from ``t0`` to the maximum of the Bazin function (days); needs ``tau_fall > tau_rise``."""
    tr = np.asarray(tau_rise, dtype=float)
    tf = np.asarray(tau_fall, dtype=float)
    return tr * np.log(tf / tr - 1.0)


def bazin_flux(t, peak_flux, t_peak, tau_rise, tau_fall):
    """Supernova-like light curve (Bazin et al. 2009) scaled to ``peak_flux`` (nJy) at ``t_peak``.

    ``f(t) = A exp(-(t - t0) / tau_fall) / (1 + exp(-(t - t0) / tau_rise))`` with
    ``t0`` chosen so the maximum falls at ``t_peak`` and ``A`` so that it
    equals ``peak_flux``.  Needs ``tau_fall > tau_rise``.
    """
    t = np.asarray(t, dtype=float)
    tr = np.asarray(tau_rise, dtype=float)
    tf = np.asarray(tau_fall, dtype=float)
    t0 = np.asarray(t_peak, dtype=float) - bazin_peak_offset(tr, tf)

    def raw(tt):
        x = (tt - t0)
        # exp(-x/tf) / (1 + exp(-x/tr)) computed stably for large |x|
        return np.exp(-x / tf - np.logaddexp(0.0, -x / tr))

    return np.asarray(peak_flux, dtype=float) * raw(t) / raw(np.asarray(t_peak, dtype=float))
