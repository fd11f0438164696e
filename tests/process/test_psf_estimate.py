import numpy as np
import pytest

from archive.errors import ValidationError
from archive.image import Exposure
from archive.image.psf import GaussianPSF, MoffatPSF, PixelPSF, fwhm_from_image
from archive.process import psf_estimate
from archive.process.background import estimate_background
from archive.process.psf_estimate import PsfEstimateConfig, estimate_psf
from synthetic import star_field

SHAPE = (768, 768)
BBOX = (0, 0, SHAPE[1] - 1, SHAPE[0] - 1)


@pytest.fixture(scope="module")
def varying():
    truth = MoffatPSF(3.2, beta=3.0, variation=[0.06, 0.03], bbox=BBOX)
    f = star_field(SHAPE, n_stars=900, seed=5, psf=truth)
    b = estimate_background(f.image)
    res = estimate_psf(f.image - b.background, f.variance, background_variance=b.variance)
    return truth, f, res


def test_psf_model_matches_truth_over_the_detector(varying):
    truth, f, res = varying
    assert isinstance(res.psf, PixelPSF)
    assert res.n_stars >= 60 and res.degree >= 1
    for x, y in [(100, 100), (650, 150), (384, 384), (650, 650), (120, 600)]:
        a = res.psf.image(x + 0.3, y - 0.2, 21)
        r = truth.image(x + 0.3, y - 0.2, 21)
        assert np.abs(a - r).max() < 0.025 * r.max(), (x, y)
    # FWHM of the pixel-integrated PSF at the centre, and its variation across the detector
    ref = fwhm_from_image(truth.image(383.5, 383.5, 41))
    assert res.fwhm == pytest.approx(ref, rel=0.03)
    lo, hi = res.fwhm_range
    assert hi - lo > 0.2  # the +-9% variation was seen
    assert res.ellipticity < 0.03
    # the selected stars are isolated, bright and unsaturated
    used = res.stars[res.stars.used]
    assert (used.snr > 50).all()


def test_elliptical_psf_ellipticity_is_reported():
    g = GaussianPSF(fwhm=3.5 * np.sqrt(0.8), ellipticity=0.2, theta=30.0)  # FWHM 3.5 px along the major axis
    f = star_field((512, 512), n_stars=500, seed=9, psf=g)
    b = estimate_background(f.image)
    res = estimate_psf(f.image - b.background, f.variance, background_variance=b.variance,
                       config=PsfEstimateConfig(degree=0))
    # pixel integration rounds the PSF a little: 1 - b/a drops from 0.2 to ~0.18
    assert 0.15 < res.ellipticity < 0.22
    assert res.theta == pytest.approx(30.0, abs=5.0)


def test_exposure_wrapper_sets_the_psf():
    f = star_field((512, 512), n_stars=400, seed=10, fwhm=2.8)
    exp = Exposure(f.image, variance=f.variance)
    out, res = psf_estimate.run(exp, PsfEstimateConfig(degree=0))
    assert exp.psf is None and isinstance(out.psf, PixelPSF)
    assert out.psf.fwhm() == pytest.approx(res.fwhm)
    ref = fwhm_from_image(GaussianPSF(fwhm=2.8).stamps(np.array([20.0]), np.array([20.0]), 41)[0])
    assert res.fwhm == pytest.approx(ref, rel=0.03)


def test_too_few_stars_raises():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 1, (128, 128)).astype(np.float32)
    with pytest.raises(ValidationError):
        estimate_psf(img, np.ones_like(img))


@pytest.mark.parametrize("kw", [dict(seed=11, n_epochs=4, size=768), dict(seed=4, n_epochs=5, size=640, star_density=60)])
def test_good_simulated_epochs_are_not_rejected(tmp_path, kw):
    """Sparse fields (15-40 PSF stars, neighbours in the stamps): every good epoch passes the
    PSF checks end to end, with the model's FWHM on the true one (4 of these 9 epochs
    were rejected for a spurious second PSF peak by the earlier builder)."""
    import pandas as pd

    from archive.image.raw import read_raw
    from archive.process import single_frame
    from archive.process.masters import make_master_bias, make_master_dark, make_master_flat
    from archive.sim import SimConfig, load_manifest, simulate_survey, truth_psf

    simulate_survey(tmp_path, SimConfig(bad_epochs={}, streak_epochs=(), n_bias=3, n_dark=3, n_flat=3, **kw))
    man = load_manifest(tmp_path)
    bias = make_master_bias([read_raw(tmp_path / c["path"]) for c in man["calib"]["bias"]])
    dark = make_master_dark([read_raw(tmp_path / c["path"]) for c in man["calib"]["dark"]], bias)
    flat = make_master_flat([read_raw(tmp_path / c["path"]) for c in man["calib"]["flat"]["r"]], bias, dark)
    epochs = pd.read_parquet(tmp_path / "truth" / "epochs.parquet")
    for raw, (_, ep) in zip(man["raws"], epochs.iterrows()):
        res = single_frame.run(read_raw(tmp_path / raw["path"]), bias, dark, flat, None)
        assert not res.rejected, (raw["path"], res.reason)
        assert res.quality.ok and res.psf.n_stars >= 10
        assert res.psf.fwhm == pytest.approx(truth_psf(ep).effective_fwhm(), rel=0.05), raw["path"]
