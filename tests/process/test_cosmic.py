import numpy as np
import pytest
from scipy import ndimage

from archive.errors import ValidationError
from archive.process.background import estimate_background
from archive.process.cosmic import CosmicRayConfig, find_cosmic_rays, interpolate_over
from archive.process.sources import detect_and_measure
from archive.process import flags as F_
from synthetic import star_field


@pytest.mark.parametrize("fwhm", [2.5, 3.5])
def test_cosmic_rays_found_and_stars_left_alone(fwhm):
    f = star_field((512, 512), n_stars=400, seed=7, n_cr=150, fwhm=fwhm)
    b = estimate_background(f.image)
    img = f.image - b.background
    cr, clean = find_cosmic_rays(img, f.variance, fwhm)
    # >= 95% of the CR-hit pixels (all are >= 15 sigma) are flagged
    assert cr[f.cr_mask].mean() >= 0.95
    # flagged pixels away from true hits: at most a handful (halo growth into noise)
    near = ndimage.binary_dilation(f.cr_mask, np.ones((3, 3), bool))
    assert (cr & ~near).sum() <= 5
    # cleaned pixels are back near the sky
    resid = clean[f.cr_mask & cr] / np.sqrt(f.variance[f.cr_mask & cr])
    assert np.median(np.abs(resid)) < 5


def test_cosmic_rays_are_not_catalogued():
    f = star_field((512, 512), n_stars=300, seed=8, n_cr=200, fwhm=3.0)
    b = estimate_background(f.image)
    img = f.image - b.background
    cr, clean = find_cosmic_rays(img, f.variance, 3.0)
    mask = np.where(cr, np.int32(1 << 2), np.int32(0))
    from archive.image.psf import GaussianPSF
    df, _ = detect_and_measure(clean, f.variance, GaussianPSF(fwhm=3.0), mask=mask, background_variance=b.variance)
    # no detection sits on a CR hit unless a true star is there too
    from scipy.spatial import cKDTree
    d_star, _ = cKDTree(np.c_[f.truth.x, f.truth.y]).query(np.c_[df.x, df.y])
    yy, xx = np.nonzero(f.cr_mask)
    d_cr, _ = cKDTree(np.c_[xx, yy]).query(np.c_[df.x, df.y])
    assert ((d_cr < 1.5) & (d_star > 1.5)).sum() == 0
    # and without the CR step they would have been: the test is not vacuous
    df2, _ = detect_and_measure(img, f.variance, GaussianPSF(fwhm=3.0), background_variance=b.variance)
    d_cr2, _ = cKDTree(np.c_[xx, yy]).query(np.c_[df2.x, df2.y])
    d_star2, _ = cKDTree(np.c_[f.truth.x, f.truth.y]).query(np.c_[df2.x, df2.y])
    assert ((d_cr2 < 1.5) & (d_star2 > 1.5)).sum() > 50


def test_saturated_pixels_are_not_cosmic_rays_and_bad_input_raises():
    img = np.zeros((20, 20), np.float32)
    var = np.ones((20, 20), np.float32)
    img[10, 10] = 1000.0
    mask = np.zeros((20, 20), np.int32)
    mask[10, 10] = 1 << 1  # SAT
    cr, _ = find_cosmic_rays(img, var, 3.0, mask=mask)
    assert not cr.any()
    cr, _ = find_cosmic_rays(img, var, 3.0)
    assert cr[10, 10]
    with pytest.raises(ValidationError):
        find_cosmic_rays(img, var[:5], 3.0)
    with pytest.raises(ValidationError):
        find_cosmic_rays(img, var, 0.0)


def test_interpolate_over_fills_from_neighbours():
    img = np.full((9, 9), 5.0, np.float32)
    bad = np.zeros((9, 9), bool)
    bad[4, 4] = True
    img[4, 4] = 1e6
    out = interpolate_over(img, bad)
    assert out[4, 4] == pytest.approx(5.0, rel=1e-5)
    assert img[4, 4] == 1e6  # input untouched
