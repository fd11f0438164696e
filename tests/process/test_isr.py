"""Masters and ISR on a seeded synthetic camera (bias ramp + pattern, hot pixels,
a dead column, vignetting flat, gain, read noise, saturation)."""

import numpy as np
import pytest
from astropy.io import fits

from archive.errors import ValidationError
from archive.image.raw import RawFrame
from archive.process import isr
from archive.process.masters import MasterConfig, clipped_mean, make_master_bias, make_master_dark, make_master_flat

NY, NX, OS = 96, 128, 16
GAIN, RN = 2.0, 6.0


class Camera:
    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.pattern = rng.normal(0, 1.5, (NY, NX))
        self.pattern -= self.pattern.mean()
        yy, xx = np.mgrid[0:NY, 0:NX]
        self.flat = 1 - 0.15 * (((xx - NX / 2) / NX) ** 2 + ((yy - NY / 2) / NY) ** 2)
        self.flat *= 1 + rng.normal(0, 0.01, (NY, NX))
        self.flat[:, 40] = 0.03  # dead column
        self.flat /= np.median(self.flat)
        self.dark = np.full((NY, NX), 0.05)  # e-/s
        self.hot = (rng.random((NY, NX)) < 0.002)
        self.dark[self.hot] = 50.0

    def frame(self, kind, incident_e=0.0, exptime=0.0, darktime=None, level=1000.0):
        darktime = exptime if darktime is None else darktime
        rng = self.rng
        e = rng.poisson(np.maximum(incident_e * self.flat + self.dark * darktime, 0))
        ramp = 3.0 * np.linspace(0, 1, NY)[:, None]
        data = np.empty((NY, NX + OS))
        data[:, :NX] = e / GAIN + level + ramp + self.pattern + rng.normal(0, RN / GAIN, (NY, NX))
        data[:, NX:] = level + ramp + rng.normal(0, RN / GAIN, (NY, OS))
        data = np.clip(np.round(data), 0, 65535).astype(np.uint16)
        h = fits.Header()
        h["IMAGETYP"] = kind
        h["EXPTIME"] = exptime
        h["DARKTIME"] = darktime
        h["GAIN"] = GAIN
        h["RDNOISE"] = RN
        h["SATURATE"] = 60000.0
        h["BAND"] = "r"
        return RawFrame(data, h, (slice(0, NY), slice(0, NX)), (slice(0, NY), slice(NX, NX + OS)))


@pytest.fixture(scope="module")
def masters():
    cam = Camera(3)
    bias = make_master_bias([cam.frame("BIAS") for _ in range(9)])
    dark = make_master_dark([cam.frame("DARK", exptime=300.0) for _ in range(7)], bias)
    flat = make_master_flat([cam.frame("FLAT", incident_e=40000.0, exptime=5.0) for _ in range(7)], bias, dark)
    return cam, bias, dark, flat


def test_master_bias_recovers_the_pattern(masters):
    cam, bias, _, _ = masters
    noise = RN / GAIN / np.sqrt(9)
    d = bias.image - cam.pattern
    assert abs(d.mean()) < 0.2
    assert np.std(d) < 1.6 * noise
    assert np.median(np.sqrt(bias.variance)) == pytest.approx(noise, rel=0.3)
    assert bias.info.extras["calib_type"] == "bias"


def test_master_dark_finds_hot_pixels(masters):
    cam, _, dark, _ = masters
    hot = dark.mask_of("BAD")
    assert hot[cam.hot].all()
    assert (hot & ~cam.hot).sum() <= 3
    assert np.median(dark.image[~cam.hot]) == pytest.approx(0.05 / GAIN, abs=0.01)


def test_master_flat_response_and_dead_column(masters):
    cam, _, _, flat = masters
    good = ~flat.mask_of("BAD")
    assert flat.mask_of("BAD")[:, 40].all()
    rel = flat.image[good] / cam.flat[good]
    assert np.std(rel / np.median(rel)) < 0.006
    assert abs(np.median(rel) - 1) < 0.01


def test_isr_gives_flat_fielded_image_with_right_variance(masters):
    cam, bias, dark, flat = masters
    sky_e = 2000.0
    raw = cam.frame("OBJECT", incident_e=sky_e, exptime=30.0)
    raw.data[10, 10] = 65535  # saturated
    exp = isr.run(raw, bias, dark, flat)
    assert exp.mask_of("SAT")[10, 10]
    assert exp.mask_of("BAD")[:, 40].all() and exp.mask_of("BAD")[cam.hot].all()
    good = ~exp.mask_of("BAD", "SAT")
    expected = sky_e / GAIN
    assert np.median(exp.image[good]) == pytest.approx(expected, rel=0.01)
    # the variance plane matches the actual scatter
    pull = (exp.image[good] - np.median(exp.image[good])) / np.sqrt(exp.variance[good])
    assert 0.9 < np.std(pull) < 1.15
    # gain applied: electrons
    exp_e = isr.run(raw, bias, dark, flat, isr.IsrConfig(apply_gain=True))
    assert np.median(exp_e.image[good]) == pytest.approx(sky_e, rel=0.01)
    assert exp_e.info.gain == 1.0


def test_isr_rejects_mismatched_masters(masters):
    cam, bias, dark, flat = masters
    raw = cam.frame("OBJECT", incident_e=100.0, exptime=30.0)
    with pytest.raises(ValidationError):
        isr.run(raw, bias=flat)
    with pytest.raises(ValidationError):
        make_master_bias([cam.frame("DARK", exptime=1.0)])
    small = bias.subimage(0, 0, 10, 10)
    with pytest.raises(ValidationError):
        isr.run(raw, bias=small)


def test_clipped_mean_rejects_outliers():
    rng = np.random.default_rng(0)
    st = rng.normal(10, 1, (7, 50, 50)).astype(np.float32)
    st[3, 5, 5] = 1000
    mean, var, n = clipped_mean(st)
    assert n[5, 5] == 6
    assert abs(mean[5, 5] - 10) < 1.5
    assert np.median(var) == pytest.approx(1 / 7, rel=0.2)
