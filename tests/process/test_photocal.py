"""Zero point, colour term and aperture correction against known inputs."""

import numpy as np
import pandas as pd
import pytest

from archive.errors import ValidationError
from archive.process.photocal import PhotoCalConfig, calibrate_photometry


def _field(n, zp=28.0, k=0.0, seed=1, variables=()):
    """n calibration stars: reference g, r (with errors), instrumental PSF/aperture fluxes."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(16.5, 20.5, n)
    gr = rng.uniform(0.2, 1.4, n)
    err = np.hypot(0.003, 0.02 * 10 ** (0.4 * (r - 20)))
    true_inst = r - zp - k * (gr - np.median(gr))
    m_inst = true_inst + rng.normal(0, 1, n) * err
    for i, dm in variables:  # a variable star: the catalogue holds its mean, this epoch differs
        m_inst[i] += dm
    flux = 10 ** (-0.4 * m_inst)
    src = pd.DataFrame({"psf_flux": flux, "psf_flux_err": flux * err / 1.0857, "ap_flux_r12": flux,
                        "snr": 1.0857 / err, "flags": np.zeros(n, dtype=np.int64)})
    ref = pd.DataFrame({"r": r + rng.normal(0, 1, n) * err, "r_err": err, "g": r + gr, "g_err": err})
    matches = pd.DataFrame({"src": np.arange(n), "ref": np.arange(n)})
    return src, ref, matches


def test_zero_point_and_colour_term_recovered():
    src, ref, m = _field(200, zp=28.3, k=0.12)
    res = calibrate_photometry(src, ref, m, "r")
    assert res.zero_point == pytest.approx(28.3, abs=0.005)
    assert res.colour_term == pytest.approx(0.12, abs=0.01) and res.colour == ("g", "r")
    assert res.ap_corr == pytest.approx(1.0) and res.n_stars > 190


def test_few_stars_with_variables_do_not_bias_the_zero_point():
    """Eleven stars, two of them variables caught 0.25 and 0.35 mag from their catalogue mean
    (the case that once put a simulated epoch's fluxes 9% off): no colour term is fitted from
    so few stars, and the variables are clipped."""
    src, ref, m = _field(11, zp=27.5, seed=4, variables=[(3, -0.25), (7, -0.35)])
    res = calibrate_photometry(src, ref, m, "r")
    assert res.colour_term == 0.0
    assert res.zero_point == pytest.approx(27.5, abs=0.01)
    assert not res.stars["used"].iloc[[3, 7]].any() and res.stars["used"].sum() >= 8
    # with the colour term forced on, the clipping still protects the zero point
    res2 = calibrate_photometry(src, ref, m, "r", config=PhotoCalConfig(min_colour_stars=2))
    assert res2.zero_point == pytest.approx(27.5, abs=0.02)


def test_too_few_stars_is_a_clear_error():
    src, ref, m = _field(4)
    with pytest.raises(ValidationError, match="only 4 good stars"):
        calibrate_photometry(src, ref, m, "r")
    with pytest.raises(ValidationError, match="no magnitude column 'z'"):
        calibrate_photometry(src, ref, m, "z")


def test_curve_of_growth_to_total_flux_and_its_error():
    """PSF and 12 px fluxes hold 1/1.02 of the total light (a Moffat's wings); the stars' ratio of
    the largest aperture to the 12 px one is 1.02 plus a background term ``b / F`` (300 counts of
    background error under every annulus): the curve of growth is the fit's intercept (a plain
    median would say ~1.03 here) and the zero point is that of total counts."""
    from archive.process.measure import TOTAL_RATIO

    src, ref, m = _field(300, zp=28.0, seed=8)
    rng = np.random.default_rng(8)
    total = src["psf_flux"].to_numpy().copy()
    f12 = total / 1.02
    src["psf_flux"] = f12
    src["psf_flux_err"] = src["psf_flux_err"] / 1.02
    src["ap_flux_r12"] = f12
    err = 0.002 + 200.0 / f12
    src[TOTAL_RATIO] = 1.02 + 300.0 / f12 + rng.normal(0, 1, len(src)) * err
    src[TOTAL_RATIO + "_err"] = err
    res = calibrate_photometry(src, ref, m, "r", config=PhotoCalConfig(fit_colour_term=False))
    assert res.cog == pytest.approx(1.02, abs=0.002)
    assert np.median(src[TOTAL_RATIO]) > 1.025
    assert res.ap_corr == pytest.approx(1.02, abs=0.002)
    assert res.zero_point == pytest.approx(28.0, abs=0.004)
    # the aperture correction's error is in the zero point's
    assert res.zero_point_err >= 2.5 / np.log(10) * res.ap_corr_err / res.ap_corr > 0
    # with the curve of growth off, the zero point refers to 12 px fluxes: 2.5 log10(1.02) lower
    off = calibrate_photometry(src, ref, m, "r", config=PhotoCalConfig(fit_colour_term=False, total_flux=False))
    assert off.zero_point - res.zero_point == pytest.approx(-2.5 * np.log10(1.02), abs=0.002)
