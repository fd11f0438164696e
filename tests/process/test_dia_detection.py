"""DIASource detection on differences of numpy-made pairs: masked science pixels (a cosmic
ray) are no change, two changes a few PSFs apart are two DIASources, and a varying star is
found at the star itself, not in its wings (where a score that includes the template's
source noise peaks)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from archive.image import mask as maskmod
from archive.process.diffim.alard_lupton import subtract
from archive.process.diffim.detection import DetectionConfig, detect_dia_sources
from archive.process.diffim.zogy import zogy_difference
from diffim_pairs import Pair, make_pair
from archive.image.psf import add_point_sources

METHODS = {"al": lambda p: subtract(p.science, p.template), "zogy": lambda p: zogy_difference(p.science, p.template)}


def _with_cosmic_rays(p: Pair, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ny, nx = p.science.shape
    yx = rng.integers(40, ny - 40, (n, 2))
    p.science.image[yx[:, 0], yx[:, 1]] += rng.uniform(3e3, 3e4, n).astype(np.float32)
    p.science.mask[yx[:, 0], yx[:, 1]] |= np.int32(1 << maskmod.CR)
    return yx[:, ::-1].astype(float)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_masked_cosmic_rays_of_the_science_are_not_changes(method):
    p = make_pair(n=384, seed=5, n_stars=60, n_transients=0, n_variables=0)
    crs = _with_cosmic_rays(p, 40, seed=6)
    res = METHODS[method](p)
    det = detect_dia_sources(res.difference, res.score)
    if len(det):
        d, _ = cKDTree(crs).query(det[["x", "y"]].to_numpy())
        assert (d > 3).all(), det[d <= 3]
    cr_bit = res.difference.get_plane_bitmask("CR")
    xi, yi = crs[:, 0].astype(int), crs[:, 1].astype(int)
    assert ((res.difference.mask[yi, xi] & cr_bit) != 0).all()  # the pixels stay masked


def _pair_with(changes: pd.DataFrame, seed: int = 3) -> Pair:
    # stars for the kernel fit, kept 25 px clear of the changes
    p = make_pair(n=256, seed=seed, n_stars=40, n_transients=0, n_variables=0)
    near = cKDTree(changes[["x", "y"]].to_numpy()).query(p.stars[["x", "y"]].to_numpy())[0] < 25
    img = np.zeros(p.science.shape)
    st = p.stars[near]
    for e in (p.science, p.template):  # take those stars out of both images
        img[:] = 0.0
        add_point_sources(img, e.psf, st["x"].to_numpy(), st["y"].to_numpy(), st["flux"].to_numpy())
        e.image[:] -= img.astype(np.float32)
    img = np.zeros(p.science.shape)
    add_point_sources(img, p.science.psf, changes["x"].to_numpy(), changes["y"].to_numpy(), changes["flux"].to_numpy())
    p.science.image[:] += img.astype(np.float32)
    return p


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_changes_a_few_psfs_apart_are_two_diasources(method):
    # pairs 12 px (2.9 FWHM) apart, a fainter one beside a brighter one: their regions above
    # 5 sigma touch (one region, two peaks)
    x0 = np.array([60.0, 130.0, 190.0])
    ch = pd.DataFrame({"x": np.r_[x0, x0 + 12.3], "y": np.r_[[70.2, 140.6, 190.4], [70.2, 140.6, 190.4]],
                       "flux": np.r_[[3e4, 2e4, 4e4], [1e4, 1.2e4, 1.5e4]]})
    p = _pair_with(ch)
    res = METHODS[method](p)
    det = detect_dia_sources(res.difference, res.score)
    d, _ = cKDTree(det[["x", "y"]].to_numpy()).query(ch[["x", "y"]].to_numpy())
    assert (d < 0.5).all(), d
    d, _ = cKDTree(ch[["x", "y"]].to_numpy()).query(det[["x", "y"]].to_numpy())
    assert (d < 0.5).all(), det  # nothing else


@pytest.mark.parametrize("method", sorted(METHODS))
def test_varying_stars_are_found_at_the_star(method):
    p = make_pair(n=512, seed=8, n_stars=120, n_transients=0, n_variables=40)
    res = METHODS[method](p)
    det = detect_dia_sources(res.difference, res.score)
    var = p.stars[p.stars["dflux"] != 0]
    d, i = cKDTree(det[["x", "y"]].to_numpy()).query(var[["x", "y"]].to_numpy())
    snr = np.abs(det["snr"].to_numpy()[i])
    near = d < 3
    ok = near & (snr > 10)
    assert ok.sum() >= 20
    assert np.median(d[ok]) < 0.25 and d[ok].max() < 0.8, np.sort(d[ok])
    # and without the refinement the score's own peak is further off (why it exists)
    raw = detect_dia_sources(res.difference, res.score, config=DetectionConfig(refine=False))
    d0, _ = cKDTree(raw[["x", "y"]].to_numpy()).query(var[["x", "y"]].to_numpy()[ok])
    assert np.median(d0) >= np.median(d[ok])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_star_under_a_masked_streak_is_no_diasource(method):
    p = make_pair(n=384, seed=11, n_stars=80, n_transients=0, n_variables=0)
    # a 5 px wide satellite trail across the science, masked STREAK (the calexp's own step)
    yy, xx = np.mgrid[0:384, 0:384]
    trail = np.abs((yy - 0.6 * xx - 40.0) / np.hypot(1.0, 0.6)) < 2.5
    p.science.image[trail] += np.float32(800.0)
    p.science.mask[trail] |= np.int32(p.science.get_plane_bitmask("STREAK"))
    res = METHODS[method](p)
    det = detect_dia_sources(res.difference, res.score, p.science, p.template)
    if len(det):
        ix = np.floor(det["x"].to_numpy() + 0.5).astype(int)
        iy = np.floor(det["y"].to_numpy() + 0.5).astype(int)
        assert not trail[iy, ix].any(), det[trail[iy, ix]]
    # and with no plane dropped, the stars under the trail are there (what the rule removes)
    keep_all = detect_dia_sources(res.difference, res.score, p.science, p.template,
                                  DetectionConfig(masked_centre=("NO_DATA", "EDGE")))
    ix = np.floor(keep_all["x"].to_numpy() + 0.5).astype(int)
    iy = np.floor(keep_all["y"].to_numpy() + 0.5).astype(int)
    assert trail[iy, ix].any()


def test_a_saturated_core_makes_its_neighbours_near_a_bright_star():
    p = make_pair(n=256, seed=12, n_stars=40, n_transients=0, n_variables=0)
    x, y = 128, 128
    sat = (np.abs(np.arange(256)[:, None] - y) <= 2) & (np.abs(np.arange(256)[None, :] - x) <= 2)
    p.template.mask[sat] |= np.int32(p.template.get_plane_bitmask("SAT"))  # sky pixels: only the bit says "bright"
    ch = pd.DataFrame({"x": [x + 9.0], "y": [y + 0.3], "flux": [8e3]})
    img = np.zeros(p.science.shape)
    add_point_sources(img, p.science.psf, ch["x"].to_numpy(), ch["y"].to_numpy(), ch["flux"].to_numpy())
    p.science.image[:] += img.astype(np.float32)
    res = subtract(p.science, p.template)
    det = detect_dia_sources(res.difference, res.score, p.science, p.template)
    d, i = cKDTree(det[["x", "y"]].to_numpy()).query([[x + 9.0, y + 0.3]])
    from archive.process.diffim.detection import FLAG_NEAR_BRIGHT_STAR
    assert d[0] < 1.0 and (int(det["flags"].iloc[int(i[0])]) & int(FLAG_NEAR_BRIGHT_STAR))


def test_the_convolution_border_is_edge_and_not_searched():
    from archive.image.psf import GaussianPSF
    from archive.process.diffim.common import convolution_border

    # the science is the sharper image: it is convolved, and has nothing beyond its frame
    p = make_pair(n=256, seed=13, n_stars=60, n_transients=0, n_variables=0,
                  science_psf=GaussianPSF(fwhm=2.6), template_psf=GaussianPSF(fwhm=4.4))
    for e in (p.science, p.template):  # bright stars right at the left and top borders
        img = np.zeros(e.shape)
        add_point_sources(img, e.psf, np.array([1.5, 130.0]), np.array([120.0, 254.0]), np.array([6e4, 6e4]))
        e.image[:] += img.astype(np.float32)
    res = subtract(p.science, p.template)
    assert res.metadata["convolved"] == "science"
    edge = res.difference.mask_of("EDGE")
    ny, nx = edge.shape
    assert edge[:, 0].all() and edge[0, :].all() and not edge[40:-40, 40:-40].any()
    bx = int(edge[ny // 2, :nx // 2].sum())
    assert bx >= 2  # a kernel widening 2.6 px to 4.4 px reaches a few pixels
    det = detect_dia_sources(res.difference, res.score, p.science, p.template)
    if len(det):
        assert (det["x"] > bx - 0.5).all() and (det["y"] < ny - bx - 0.5).all()
    assert convolution_border(np.pad(np.ones((1, 1)), 3)) == (0, 0)


def test_a_few_percent_residual_of_a_star_is_near_bright_and_a_transient_beside_a_faint_one_is_not():
    from archive.process.diffim.detection import FLAG_NEAR_BRIGHT_STAR, near_bright

    p = make_pair(n=256, seed=14, n_stars=30, n_transients=0, n_variables=0)
    res = subtract(p.science, p.template)
    st = p.stars.sort_values("flux")
    faint, bright = st.iloc[0], st.iloc[-1]
    cfg = DetectionConfig(bright_snr=1e9)  # the flux-ratio test alone
    fwhm = 4.2
    # 3% of the bright star's flux at its position: a residual; the same flux beside the faintest star: not
    near = near_bright(p.template, res.difference, [bright.x, faint.x + 6], [bright.y, faint.y],
                       np.array([0.03 * bright.flux, 0.03 * bright.flux]), fwhm, cfg)
    assert near.tolist() == [True, bright.flux * 0.03 * 20 < faint.flux]
    off = near_bright(p.template, res.difference, [bright.x], [bright.y], np.array([0.03 * bright.flux]), fwhm,
                      DetectionConfig(bright_snr=1e9, bright_ratio=0.0))
    assert not off[0]
    assert FLAG_NEAR_BRIGHT_STAR > 0


def test_a_peak_on_the_rim_of_a_template_hole_is_dropped():
    from archive.image.exposure import Exposure
    from archive.image.psf import GaussianPSF
    from archive.process.diffim.alard_lupton import score_image

    rng = np.random.default_rng(15)
    n, psf = 200, GaussianPSF(fwhm=4.0)
    img = np.zeros((n, n))
    add_point_sources(img, psf, np.array([60.3, 150.2]), np.array([102.0, 60.7]), np.array([3e3, 3e3]))
    img += rng.normal(0, 10, (n, n))
    diff = Exposure(img.astype(np.float32), variance=np.full((n, n), 100.0, np.float32), psf=psf)
    hole = np.zeros((n, n), bool)
    hole[:, :60] = True  # a template hole 0.3 px from the first source (its core half on the rim)
    diff.mask[hole] |= np.int32(diff.get_plane_bitmask("NO_DATA"))
    diff.variance[hole] = np.inf
    diff.image[hole] = 0.0
    score = score_image(diff)
    det = detect_dia_sources(diff, score)
    assert len(det) == 1 and abs(det["x"].iloc[0] - 150.2) < 0.5
    kept = detect_dia_sources(diff, score, config=DetectionConfig(edge_clearance_fwhm=0.0))
    assert len(kept) == 2


def test_detection_config_names_an_unknown_mask_plane():
    from archive.errors import ValidationError
    from archive.pipeline.config import config_from_dict

    with pytest.raises(ValidationError, match="masked_centre: unknown mask plane.*'STREEK'"):
        config_from_dict(DetectionConfig, {"masked_centre": ["STREAK", "STREEK"]}, "difference.detection")
    ok = config_from_dict(DetectionConfig, {"masked_centre": ["NO_DATA", "SAT"]}, "difference.detection")
    assert ok.masked_centre == ("NO_DATA", "SAT")
