"""Regions -> HEALPix index ranges: a region query must never miss a point.

The central property, checked for every region type on hypothesis-drawn regions
(centres on pixel corners/edges, at the poles, across RA 0/360; sizes 0.1 arcsec
to 10 deg and larger) and points (uniform, just inside/outside the boundary, on
the pixel edges of the covering): every point the exact test accepts has its
healpix29 inside ``pixel_ranges(order)``, for several orders; so "ranges, then
exact filter" equals brute force.
"""

from __future__ import annotations

import healpy as hp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sky_strategies import (
    ARCSEC,
    offset,
    pixel_edge_points,
    radii_deg,
    sky_points,
    uniform_around,
)

from archive.errors import ValidationError
from archive.sky.healpix import NPIX_MAX, angular_separation_deg, radec_to_healpix29
from archive.sky.regions import (
    DEFAULT_ORDER_MAX,
    Cone,
    pixels_to_ranges,
    ranges_contain,
)

SETTINGS = settings(derandomize=True, deadline=None, max_examples=150)


def check_ranges_shape(ranges: np.ndarray, order: int) -> None:
    """Sorted, merged (non-adjacent), non-empty half-open ranges aligned to ``order``."""
    assert ranges.dtype == np.int64 and ranges.ndim == 2 and ranges.shape[1] == 2
    if len(ranges) == 0:
        return
    lo, hi = ranges[:, 0], ranges[:, 1]
    assert np.all(lo < hi)
    assert np.all(lo[1:] > hi[:-1]), "ranges must be sorted and adjacent ranges merged"
    assert lo[0] >= 0 and hi[-1] <= NPIX_MAX
    unit = 4 ** (29 - order)
    assert np.all(lo % unit == 0) and np.all(hi % unit == 0)


def assert_never_misses(region, ra, dec, truth, orders) -> None:
    """truth: brute-force membership. Checks contains == truth and coverage at each order."""
    np.testing.assert_array_equal(region.contains(ra, dec), truth)
    h = radec_to_healpix29(ra, dec)
    for order in orders:
        ranges = region.pixel_ranges(order)
        check_ranges_shape(ranges, order)
        covered = ranges_contain(ranges, h)
        missed = truth & ~covered
        assert not missed.any(), (
            f"{region!r} order {order}: {int(missed.sum())} inside point(s) outside the ranges, "
            f"first at ra={ra[missed][0]!r} dec={dec[missed][0]!r}"
        )
        # "ranges, then exact filter" == brute force
        np.testing.assert_array_equal(covered & region.contains(ra, dec), truth)


def orders_around(k: int) -> list[int]:
    return sorted({0, max(k - 3, 0), max(k - 1, 0), k, min(k + 1, 29), min(k + 2, 29)})


# ---------------------------------------------------------------------------
# ranges utilities


def test_pixels_to_ranges_merges_and_shifts():
    r = pixels_to_ranges([5, 3, 4, 9, 11, 10, 4], order=28)
    np.testing.assert_array_equal(r, [[3 * 4, 6 * 4], [9 * 4, 12 * 4]])
    assert pixels_to_ranges([], 5).shape == (0, 2)
    r0 = pixels_to_ranges(np.arange(12), 0)
    np.testing.assert_array_equal(r0, [[0, NPIX_MAX]])


def test_ranges_contain_edges():
    r = np.array([[10, 20], [30, 31], [100, 200]], dtype=np.int64)
    h = np.array([0, 9, 10, 19, 20, 29, 30, 31, 99, 100, 199, 200, 10**12])
    np.testing.assert_array_equal(
        ranges_contain(r, h),
        [False, False, True, True, False, False, True, False, False, True, True, False, False],
    )
    assert not ranges_contain(np.empty((0, 2), np.int64), h).any()


# ---------------------------------------------------------------------------
# Cone


def cone_points(rng, ra, dec, r, n_uniform=400, n_edge=200):
    """Uniform points within 2r (+ a few arcsec), near-boundary points, pixel edge points."""
    pts = [uniform_around(rng, ra, dec, 2 * r + 2 * ARCSEC, n_uniform)]
    # Just inside and just outside the circle: relative offsets 1e-12 .. 1e-3.
    rel = 10.0 ** rng.uniform(-12, -3, n_edge) * rng.choice([-1.0, 1.0], n_edge)
    pts.append(offset(ra, dec, np.clip(r * (1 + rel), 0, 180), rng.uniform(0, 2 * np.pi, n_edge)))
    pts.append(offset(ra, dec, np.full(20, r), rng.uniform(0, 2 * np.pi, 20)))
    ra_p = np.concatenate([p[0] for p in pts])
    dec_p = np.concatenate([p[1] for p in pts])
    # Corners/edges of the pixels, at the coarse order and one finer, that hold
    # boundary points: the places where a covering loses points.
    k = Cone(ra, dec, r).default_order()
    edge = [pixel_edge_points(ra_p[-n_edge - 20 :], dec_p[-n_edge - 20 :], o) for o in (k, min(k + 1, 29))]
    ra_p = np.concatenate([ra_p] + [e[0] for e in edge] + [[ra]])
    dec_p = np.concatenate([dec_p] + [e[1] for e in edge] + [[dec]])
    return ra_p, dec_p


@SETTINGS
@given(centre=sky_points(), radius=radii_deg, seed=st.integers(0, 2**32 - 1))
def test_cone_never_misses(centre, radius, seed):
    ra, dec = centre
    rng = np.random.default_rng(seed)
    cone = Cone(ra, dec, radius)
    ra_p, dec_p = cone_points(rng, ra, dec, radius)
    truth = angular_separation_deg(ra_p, dec_p, ra, dec) <= radius
    assert truth.any()
    assert_never_misses(cone, ra_p, dec_p, truth, orders_around(cone.default_order()))


@settings(derandomize=True, deadline=None, max_examples=40)
@given(centre=sky_points(), radius=st.floats(10.0, 180.0), seed=st.integers(0, 2**32 - 1))
def test_large_cone_never_misses(centre, radius, seed):
    ra, dec = centre
    rng = np.random.default_rng(seed)
    cone = Cone(ra, dec, radius)
    ra_p, dec_p = cone_points(rng, ra, dec, radius, n_uniform=1000)
    truth = angular_separation_deg(ra_p, dec_p, ra, dec) <= radius
    assert_never_misses(cone, ra_p, dec_p, truth, orders_around(cone.default_order()))


@settings(derandomize=True, deadline=None, max_examples=60)
@given(centre=sky_points(), radius=radii_deg)
def test_cone_covering_is_tight_and_contains_healpy_centre_pixels(centre, radius):
    """Kept pixels are near the disc, and every pixel whose centre is inside is kept."""
    ra, dec = centre
    cone = Cone(ra, dec, radius)
    k = cone.default_order()
    pix = cone.pixels(k)
    nside = 1 << k
    vec = hp.ang2vec(ra, dec, lonlat=True)
    inner = hp.query_disc(nside, vec, np.radians(radius), inclusive=False, nest=True)
    assert np.isin(inner, pix).all()
    pra, pdec = hp.pix2ang(nside, pix, nest=True, lonlat=True)
    pixrad = np.degrees(hp.max_pixrad(nside))
    assert np.all(angular_separation_deg(pra, pdec, ra, dec) <= radius + pixrad * (1 + 1e-5))
    # A few dozen ranges at most at the default order.
    assert 1 <= len(cone.pixel_ranges()) <= 64


@pytest.mark.parametrize("radius_arcsec", [0.1, 1.0, 2.0, 60.0, 3600.0, 36000.0])
@pytest.mark.parametrize("dec", [-90.0, -45.0, 0.0, 30.0, 89.99, 90.0])
def test_cone_default_order_range_counts(radius_arcsec, dec):
    cone = Cone.from_arcsec(0.0, dec, radius_arcsec)
    k = cone.default_order()
    assert 0 <= k <= DEFAULT_ORDER_MAX
    n = len(cone.pixel_ranges())
    assert 1 <= n <= 64
    # covered area at most ~40x the disc for discs larger than the finest default pixel
    area_cov = cone.pixel_ranges()[:, 1].sum() - cone.pixel_ranges()[:, 0].sum()
    area_cov_sr = area_cov / NPIX_MAX * 4 * np.pi
    area_disc = 2 * np.pi * (1 - np.cos(np.radians(radius_arcsec / 3600)))
    if radius_arcsec >= 2.0:
        assert area_cov_sr <= 40 * area_disc


def test_cone_pole_and_ra_wrap_examples():
    # Cone at the north pole: every RA at dec > 90 - r is inside.
    cone = Cone(123.0, 90.0, 1.0)
    ra = np.linspace(0, 360, 721)
    dec = np.full_like(ra, 89.0 + 1e-9)
    assert cone.contains(ra, dec).all()
    assert ranges_contain(cone.pixel_ranges(), radec_to_healpix29(ra, dec)).all()
    assert not cone.contains(ra, np.full_like(ra, 88.999)).any()
    # Cone straddling RA 0/360.
    cone = Cone(359.9999, 0.0, 1.0 * ARCSEC)
    assert cone.contains([0.0001 - 0.5 * ARCSEC, 359.9999 + 0.9 * ARCSEC], [0.0, 0.0]).all()
    assert not cone.contains([0.0001 + 0.5 * ARCSEC], [0.0]).any()
    inside_ra = np.array([359.99995, 0.0, 359.99990, 360.0 - 1e-12])
    inside_dec = np.array([0.0, 0.0, 0.9 * ARCSEC, 0.0])
    inside_ra = np.where(cone.contains(inside_ra, inside_dec), inside_ra, np.nan)
    ok = ~np.isnan(inside_ra)
    h = radec_to_healpix29(inside_ra[ok], inside_dec[ok])
    assert ranges_contain(cone.pixel_ranges(), h).all()
    # Whole sky.
    np.testing.assert_array_equal(Cone(10, 10, 180).pixel_ranges(), [[0, NPIX_MAX]])


def test_cone_validation():
    with pytest.raises(ValidationError, match="dec"):
        Cone(0, 91, 1)
    with pytest.raises(ValidationError, match="radius"):
        Cone(0, 0, -1)
    with pytest.raises(ValidationError, match="radius"):
        Cone(0, 0, 181)
    with pytest.raises(ValidationError, match="ra"):
        Cone(float("nan"), 0, 1)
    with pytest.raises(ValidationError, match="index 1"):
        Cone(0, 0, 1).contains([0, 0], [0, 95])
    with pytest.raises(ValidationError, match="order"):
        Cone(0, 0, 1).pixel_ranges(30)
    c = Cone(-10.0, 0.0, 1.0)
    assert c.ra == 350.0
    with pytest.raises(ValidationError, match="coarser order"):
        Cone(0, 0, 90).pixel_ranges(15)
