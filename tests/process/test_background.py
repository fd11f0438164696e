import numpy as np
import pytest

from archive.errors import ValidationError
from archive.process.background import BackgroundConfig, estimate_background
from synthetic import star_field


def test_background_recovers_sloped_sky_and_noise():
    f = star_field((512, 512), n_stars=300, seed=11)
    b = estimate_background(f.image)
    noise = np.sqrt(200.0 / f.gain + f.read_noise ** 2)
    d = b.background - f.sky
    # mean bias well under a tenth of the noise, worst pixel under a quarter
    assert abs(d.mean()) < 0.03 * noise
    assert np.abs(d).max() < 0.25 * noise
    assert np.median(b.rms) == pytest.approx(noise, rel=0.02)
    # the sources were masked in the second pass
    assert 0.02 < b.source_mask.mean() < 0.6


def test_background_ignores_masked_pixels_and_nans():
    f = star_field((256, 256), n_stars=50, seed=12)
    img = f.image.copy()
    bad = np.zeros(img.shape, dtype=bool)
    bad[100:140, :] = True
    img[bad] = 1e6  # garbage that must not leak in
    img[5, 5] = np.nan
    b = estimate_background(img, mask=bad, config=BackgroundConfig(mesh_size=32))
    assert np.isfinite(b.background).all()
    noise = np.sqrt(200.0 / f.gain + f.read_noise ** 2)
    assert np.abs(b.background - f.sky).max() < 0.5 * noise


def test_background_rejects_bad_input():
    with pytest.raises(ValidationError):
        estimate_background(np.zeros(10))
    with pytest.raises(ValidationError):
        estimate_background(np.zeros((10, 10)), mask=np.zeros((5, 5), bool))
    with pytest.raises(ValidationError):
        estimate_background(np.ones((64, 64)), mask=np.ones((64, 64), bool))
