"""A calexp that is one of its template's inputs shares noise with it: the difference's
variance must say so (else its pulls are ~0.7); overlapping tiles' templates, made of the
same inputs, must not claim less noise when joined; stamps of stars that varied must not
steer the matching kernel."""

from __future__ import annotations

import numpy as np
import pytest

from archive.image.exposure import Exposure, ExposureInfo
from archive.image.psf import GaussianPSF, add_point_sources
from archive.process.diffim.alard_lupton import AlardLuptonConfig, same_flux, subtract
from archive.process.diffim.template import input_fraction, join_templates
from archive.process.diffim.zogy import zogy_difference
from diffim_pairs import psf_flux, tan_wcs

N = 384


def _epochs(seed: int, n_epochs: int = 3, sky_sigma: float = 20.0):
    """n_epochs noisy images of one static field (Gaussian PSF, FWHM 3 px); star positions."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(20, N - 20, 60), rng.uniform(20, N - 20, 60)
    flux = 10 ** rng.uniform(4.0, 5.3, 60)
    model = np.zeros((N, N))
    psf = GaussianPSF(fwhm=3.0)
    add_point_sources(model, psf, x, y, flux)
    var = (sky_sigma ** 2 + np.clip(model, 0, None) * 0.05).astype(np.float32)
    imgs = [(model + rng.normal(0, 1, (N, N)) * np.sqrt(var)).astype(np.float32) for _ in range(n_epochs)]
    return imgs, var, psf, np.c_[x, y]


def _empty_grid(stars: np.ndarray, step: int = 11) -> np.ndarray:
    g = np.arange(20, N - 20, step, dtype=float)
    pts = np.array([(a, b) for b in g for a in g])
    d = np.min(np.hypot(pts[:, None, 0] - stars[None, :, 0], pts[:, None, 1] - stars[None, :, 1]), axis=1)
    return pts[d > 12]


def test_input_fraction_reads_the_input_map():
    imap = np.array([[0b011, 0b001], [0b110, 0]], np.int64)
    f = input_fraction(imap, [1.0, 3.0, 1.0], 1)
    assert f.ravel().tolist() == pytest.approx([0.75, 0.0, 0.75, 0.0])
    with pytest.raises(Exception, match="no input 5 among 3"):
        input_fraction(imap, [1.0, 3.0, 1.0], 5)


@pytest.mark.parametrize("seed,method", [(3, "al"), (4, "al"), (3, "zogy")])
def test_a_template_input_differenced_has_pulls_of_one_with_the_covariance(seed, method):
    imgs, var, psf, stars = _epochs(seed)
    science = Exposure(imgs[0], variance=var, wcs=tan_wcs(N), psf=psf, info=ExposureInfo(band="r", visit=1))
    tile = Exposure(np.mean(imgs, axis=0).astype(np.float32), variance=(var / 3).astype(np.float32),
                    wcs=tan_wcs(N), psf=psf, info=ExposureInfo(band="r"))
    imap = np.full((N, N), 0b111, np.int64)
    joined = join_templates(science, [tile], fractions=[input_fraction(imap, [1.0, 1.0, 1.0], 0)])
    assert np.median(joined.fraction) == pytest.approx(1 / 3, rel=1e-3)
    pts = _empty_grid(stars)
    pulls = {}
    for shared in (False, True):
        cov = joined.fraction * science.variance if shared else None
        if method == "zogy":
            res = zogy_difference(science, joined.exposure, covariance=cov)
        else:
            res = subtract(science, joined.exposure, AlardLuptonConfig(), covariance=cov)
        f, e = psf_flux(res.difference, pts[:, 0], pts[:, 1])
        pulls[shared] = f / e
        if shared:
            assert 0.9 <= res.metadata["shared_noise_factor"] <= 1.0  # same PSF: nearly all of it cancels
    assert len(pts) > 400
    # independent noise assumed: the true variance (V - 2V/3 + V/3) is half of what is claimed
    assert pulls[False].std() == pytest.approx(np.sqrt(0.5), abs=0.08)
    assert pulls[True].std() == pytest.approx(1.0, abs=0.1)


def test_overlapping_tiles_of_the_same_inputs_keep_their_noise():
    imgs, var, psf, _ = _epochs(5, n_epochs=1)
    calexp = Exposure(imgs[0], variance=var, wcs=tan_wcs(N), psf=psf, info=ExposureInfo(band="r"))
    tile = Exposure(imgs[0].copy(), variance=var.copy(), wcs=tan_wcs(N), psf=psf, info=ExposureInfo(band="r"))
    frac = np.full((N, N), 0.5, np.float32)
    joined = join_templates(calexp, [tile, tile.copy()], fractions=[frac, None])
    inner = (slice(40, -40), slice(40, -40))
    # two tiles holding the same pixels: one noise, not two independent draws
    assert np.median(joined.exposure.variance[inner] / var[inner]) == pytest.approx(1.0, rel=0.05)
    # the calexp's share: 0.5 in the first tile, 0 in the second, equal weights
    assert np.median(joined.fraction[inner]) == pytest.approx(0.25, rel=0.02)
    with pytest.raises(Exception, match="fraction planes for 2 templates"):
        join_templates(calexp, [tile, tile], fractions=[frac])


def test_a_star_that_varied_is_no_kernel_stamp():
    imgs, var, psf, stars = _epochs(6, n_epochs=2)
    inside = (stars[:, 0] > 25) & (stars[:, 0] < N - 25) & (stars[:, 1] > 25) & (stars[:, 1] < N - 25)
    xy = np.rint(stars[inside]).astype(np.int64)
    src = Exposure(imgs[0], variance=var, wcs=tan_wcs(N), psf=psf)
    tgt_img = imgs[1].copy()
    add_point_sources(tgt_img, psf, xy[:1, 0].astype(float), xy[:1, 1].astype(float), np.array([4e4]))  # one varied
    tgt = Exposure(tgt_img, variance=var, wcs=tan_wcs(N), psf=psf)
    keep = same_flux(src, tgt, xy, 12, 0.05)
    assert not keep[0]
    assert keep[1:].mean() > 0.8  # the others (a few with that star as a neighbour) stay
