import numpy as np
import pytest

from archive.errors import ValidationError
from archive.sim import lightcurves as lc
from archive.sim.config import SimConfig


def test_config_round_trip_and_validation():
    cfg = SimConfig(size=300, n_epochs=4, bands=("g", "r"), bad_epochs={1: "focus"}, streak_epochs=(2,))
    back = SimConfig.from_dict(cfg.to_dict())
    assert back == cfg
    assert cfg.nx == cfg.ny == 300
    for bad in ({"n_epochs": 0}, {"bands": ("z",)}, {"size": 8}, {"gain": -1.0}, {"bad_epochs": {10: "clouds"}},
                {"bad_epochs": {1: "rain"}}, {"full_well": 2e5}):
        with pytest.raises(ValidationError, match="SimConfig"):
            SimConfig(**bad)
    with pytest.raises(ValidationError, match="unknown"):
        SimConfig.from_dict({"nonsense": 1})


def test_periodic_light_curve_shape():
    t = np.linspace(60000, 60010, 2001)
    for shape in ("sine", "sawtooth"):
        f = lc.periodic_flux(t, 1000.0, 0.5, 1.7, 60000.3, shape)
        np.testing.assert_allclose(lc.periodic_flux(t + 1.7, 1000.0, 0.5, 1.7, 60000.3, shape), f, rtol=1e-9)
        assert f.min() == pytest.approx(1000.0, rel=1e-3)
        assert f.max() == pytest.approx(1000.0 * 10 ** (0.2), rel=1e-3)  # 0.5 mag peak to peak
    # sawtooth: maximum at phase 0.15, fast rise then slow decline
    ph = np.array([0.0, 0.075, 0.15, 0.5, 0.99])
    s = lc.periodic_shape(ph, "sawtooth")
    np.testing.assert_allclose(s, [0.0, 0.5, 1.0, 0.5 / 0.85, 0.01 / 0.85], atol=1e-12)


def test_bazin_light_curve_shape():
    t = np.linspace(59990, 60060, 7001)
    f = lc.bazin_flux(t, 5000.0, 60010.0, 3.0, 20.0)
    assert t[np.argmax(f)] == pytest.approx(60010.0, abs=0.02)
    assert f.max() == pytest.approx(5000.0, rel=1e-6)
    rise, fall = t < 60010, t > 60010
    assert np.all(np.diff(f[rise]) > 0) and np.all(np.diff(f[fall]) < 0)
    # late decline is exponential with tau_fall
    late = lc.bazin_flux(np.array([60050.0, 60070.0]), 5000.0, 60010.0, 3.0, 20.0)
    assert late[1] / late[0] == pytest.approx(np.exp(-20 / 20.0), rel=1e-6)
    # long before: essentially nothing
    assert lc.bazin_flux(59900.0, 5000.0, 60010.0, 3.0, 20.0) < 1e-6
