import numpy as np
import pytest

from archive.image import Exposure, ExposureInfo, GaussianPSF
from archive.image.psf import PixelPSF
from archive.process.quality import QualityConfig, check_exposure, check_image, check_psf
from synthetic import star_field


@pytest.fixture(scope="module")
def field():
    return star_field((256, 256), n_stars=80, seed=2)


def test_good_exposure_passes(field):
    exp = Exposure(field.image, variance=field.variance, psf=GaussianPSF(sigma=1.3),
                   info=ExposureInfo(saturation=60000.0))
    rep = check_exposure(exp)
    assert rep.ok, rep.reason
    assert rep.metrics["noise_ratio"] == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("make,flag", [
    (lambda img: np.full_like(img, np.nan), "EMPTY"),
    (lambda img: np.full_like(img, 7.0), "CONSTANT"),
    (lambda img: img[:100], "WRONG_SHAPE"),
    (lambda img: img + 1e5, "HIGH_BACKGROUND"),
    (lambda img: np.where(np.arange(img.size).reshape(img.shape) % 10 == 0, 42.0, img), "STUCK_VALUES"),
    (lambda img: np.where(np.arange(img.size).reshape(img.shape) % 7 == 0, img - 5000, img), "HISTOGRAM_ANOMALY"),
    (lambda img: np.where(np.arange(img.size).reshape(img.shape) % 9 == 0, 65535.0, img), "MANY_SATURATED"),
    (lambda img: np.where(np.arange(img.size).reshape(img.shape) % 3 == 0, np.nan, img), "MANY_NODATA"),
    (lambda img: img[:, :, None], "WRONG_SHAPE"),
])
def test_bad_images_are_flagged_not_raised(field, make, flag):
    img = make(field.image.copy())
    rep = check_image(img, saturation=65000.0,
                      config=QualityConfig(expected_shape=(256, 256), max_background=5000.0))
    assert not rep.ok
    assert flag in rep.flags, rep.reason
    assert rep.reason


def test_noise_mismatch_with_variance_plane(field):
    rep = check_image(field.image, variance=field.variance * 9)
    assert "HISTOGRAM_ANOMALY" in rep.flags


def test_bad_and_double_psf_flagged():
    assert check_psf(GaussianPSF(sigma=1.3)).ok
    assert "BAD_PSF" in check_psf(GaussianPSF(sigma=20.0)).flags
    assert "BAD_PSF" in check_psf(GaussianPSF(sigma=0.3)).flags
    # a doubled PSF (two images 6 px apart): a PixelPSF with a secondary peak
    g = GaussianPSF(fwhm=3.0)
    k = g.stamps(np.array([20.0]), np.array([20.0]), 41)[0] + 0.6 * g.stamps(np.array([26.0]), np.array([20.0]), 41, np.array([20]), np.array([20]))[0]
    rep = check_psf(PixelPSF(k / k.sum()))
    assert "DOUBLE_PSF" in rep.flags
    # an elongated PSF
    e = GaussianPSF(fwhm=4.0 * np.sqrt(0.5), ellipticity=0.5)  # FWHM 4 px along the major axis
    k = e.stamps(np.array([20.0]), np.array([20.0]), 41)[0]
    assert "BAD_PSF" in check_psf(PixelPSF(k / k.sum())).flags


def test_checks_never_raise_on_garbage():
    rep = check_image("not an image")
    assert not rep.ok
    rep = check_psf(object())
    assert rep.flags == ["CHECK_ERROR"]
