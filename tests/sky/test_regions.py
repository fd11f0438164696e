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
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sky_strategies import (
    ARCSEC,
    LOG_RADIUS_MAX,
    LOG_RADIUS_MIN,
    offset,
    vec_to_radec,
    pixel_edge_points,
    radii_deg,
    sky_points,
    uniform_around,
)

from archive.errors import ValidationError
from archive.sky.healpix import NPIX_MAX, angular_separation_deg, radec_to_healpix29
from archive.sky.regions import (
    DEFAULT_ORDER_MAX,
    Box,
    Cone,
    Polygon,
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


def assert_never_misses(region, ra, dec, truth, orders, ambiguous=None) -> None:
    """truth: brute-force membership. Checks contains == truth and coverage at each order.

    ``ambiguous`` marks points within float rounding of the boundary, where an
    independent brute-force formula may legitimately round the other way; there
    both answers must be covered.
    """
    inside = region.contains(ra, dec)
    amb = np.zeros(len(ra), bool) if ambiguous is None else ambiguous
    np.testing.assert_array_equal(inside[~amb], truth[~amb])
    must = inside | truth
    h = radec_to_healpix29(ra, dec)
    for order in orders:
        ranges = region.pixel_ranges(order)
        check_ranges_shape(ranges, order)
        covered = ranges_contain(ranges, h)
        missed = must & ~covered
        assert not missed.any(), (
            f"{region!r} order {order}: {int(missed.sum())} inside point(s) outside the ranges, "
            f"first at ra={ra[missed][0]!r} dec={dec[missed][0]!r}"
        )
        # "ranges, then exact filter" == exact filter alone
        np.testing.assert_array_equal(covered & inside, inside)


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


# ---------------------------------------------------------------------------
# Box


def box_truth(box: Box, ra, dec):
    """Brute force, written independently: unwrap RA above ra_min, compare."""
    ra = np.asarray(ra) % 360.0
    in_dec = (dec >= box.dec_min) & (dec <= box.dec_max)
    if box.ra_width >= 360.0:
        return in_dec
    ra_u = np.where(ra >= box.ra_min, ra, ra + 360.0)
    return in_dec & ((ra_u <= box.ra_min + box.ra_width) | (np.abs(dec) == 90.0))


@st.composite
def boxes(draw):
    ra_c, dec_c = draw(sky_points())
    half_dec = 10.0 ** draw(st.floats(LOG_RADIUS_MIN, LOG_RADIUS_MAX))
    half_ra = 10.0 ** draw(st.floats(LOG_RADIUS_MIN, LOG_RADIUS_MAX))
    half_ra = min(half_ra / max(np.cos(np.radians(dec_c)), 1e-3), 180.0)
    anchor = draw(st.sampled_from(["centre", "lo-lo", "lo-hi", "hi-lo", "hi-hi"]))
    if anchor == "centre":
        ra_min, ra_max = ra_c - half_ra, ra_c + half_ra
        dec_min, dec_max = max(dec_c - half_dec, -90.0), min(dec_c + half_dec, 90.0)
    else:
        # The drawn point (a pixel corner, a pole, RA 0...) is one corner of the box.
        if anchor[0] == "l":
            ra_min, ra_max = ra_c, ra_c + 2 * half_ra
        else:
            ra_min, ra_max = ra_c - 2 * half_ra, ra_c
        if anchor[-1] == "o":
            dec_min, dec_max = dec_c, min(dec_c + 2 * half_dec, 90.0)
        else:
            dec_min, dec_max = max(dec_c - 2 * half_dec, -90.0), dec_c
    pole = draw(st.sampled_from(["none", "none", "none", "north", "south"]))
    if pole == "north":
        dec_max = 90.0
    elif pole == "south":
        dec_min = -90.0
    if draw(st.integers(0, 9)) == 0:
        ra_min, ra_max = 0.0, 360.0
    if ra_max - ra_min < 360.0:
        ra_min, ra_max = ra_min % 360.0, ra_max % 360.0
    return Box(ra_min, ra_max, dec_min, dec_max)


def box_boundary_points(rng, box: Box, n):
    """Points on, just inside and just outside the four edges, and the corners."""
    w = box.ra_width
    rel = 10.0 ** rng.uniform(-13, -3, n) * rng.choice([-1.0, 1.0], n)
    size_dec = max(box.dec_max - box.dec_min, 1e-9)
    size_ra = max(w, 1e-9)
    # RA edges (meridians): ra = edge +/- tiny, dec within range.
    t = rng.uniform(0, 1, n)
    edge_ra = np.where(rng.random(n) < 0.5, box.ra_min, box.ra_min + w) + rel * size_ra
    ra1, dec1 = edge_ra, box.dec_min + t * (box.dec_max - box.dec_min)
    # Dec edges (parallels): dec = edge +/- tiny, ra within range.
    dec_edge = np.where(rng.random(n) < 0.5, box.dec_min, box.dec_max) + rel * size_dec
    ra2, dec2 = box.ra_min + rng.uniform(-0.01, 1.01, n) * w, np.clip(dec_edge, -90, 90)
    corners_ra = np.array([box.ra_min, box.ra_min + w] * 2)
    corners_dec = np.array([box.dec_min] * 2 + [box.dec_max] * 2)
    ra_p = np.concatenate([ra1, ra2, corners_ra]) % 360.0
    dec_p = np.concatenate([dec1, dec2, corners_dec])
    return ra_p, dec_p


@SETTINGS
@given(box=boxes(), seed=st.integers(0, 2**32 - 1))
def test_box_never_misses(box, seed):
    rng = np.random.default_rng(seed)
    ra_b, dec_b = box_boundary_points(rng, box, 200)
    # Uniform points over the box's surroundings (a cone around its centre).
    dec_c = 0.5 * (box.dec_min + box.dec_max)
    ra_c = box.ra_min + 0.5 * box.ra_width
    reach = min(box.size_deg() * 3 + (box.dec_max - box.dec_min) + 2 * ARCSEC, 180.0)
    ra_u, dec_u = uniform_around(rng, ra_c, dec_c, reach, 400)
    k = box.default_order()
    edge = [pixel_edge_points(ra_b, dec_b, o) for o in (k, min(k + 1, 29))]
    ra_p = np.concatenate([ra_b, ra_u] + [e[0] for e in edge])
    dec_p = np.concatenate([dec_b, dec_u] + [e[1] for e in edge])
    truth = box_truth(box, ra_p, dec_p)
    assert_never_misses(box, ra_p, dec_p, truth, orders_around(k))
    assert 1 <= len(box.pixel_ranges()) <= 200


def test_box_known_values():
    b = Box(350.0, 10.0, -1.0, 1.0)  # wraps through RA 0
    assert b.ra_width == pytest.approx(20.0)
    np.testing.assert_array_equal(
        b.contains([355, 5, 0, 360, 350, 10, 20, 180, 0], [0, 0, 1, -1, 0.5, 0.5, 0, 0, 1.0001]),
        [True, True, True, True, True, True, False, False, False],
    )
    b = Box(10.0, 350.0, -1.0, 1.0)  # 340 degrees wide, not through 0
    np.testing.assert_array_equal(b.contains([180, 0, 355, 5, 10, 350], [0] * 6), [1, 0, 0, 0, 1, 1])
    b = Box(0.0, 360.0, 80.0, 90.0)  # polar cap
    assert b.contains(np.arange(0, 360, 7.0), np.full(52, 80.0)).all()
    assert not b.contains([0.0], [79.999]).any()
    b = Box(100.0, 110.0, 80.0, 90.0)  # touches the pole: the pole is inside whatever its RA
    assert b.contains([0.0, 250.0, 105.0], [90.0, 90.0, 85.0]).all()
    assert not b.contains([0.0], [89.999999]).any()
    h = radec_to_healpix29([0.0, 250.0, 105.0], [90.0, 90.0, 85.0])
    for order in (0, 3, 8, 12):
        assert ranges_contain(b.pixel_ranges(order), h).all()
    b = Box(-10.0, 10.0, -90.0, -89.0)
    assert b.ra_min == 350.0 and b.contains([355.0, 0.0, 123.0], [-89.5, -89.5, -90.0]).all()
    np.testing.assert_array_equal(Box(0, 360, -90, 90).pixel_ranges(), [[0, NPIX_MAX]])


def test_box_validation():
    with pytest.raises(ValidationError, match="dec_min"):
        Box(0, 1, 2, 1)
    with pytest.raises(ValidationError, match="dec_max"):
        Box(0, 1, 0, 90.5)
    with pytest.raises(ValidationError, match="ra_min"):
        Box(float("inf"), 1, 0, 1)
    with pytest.raises(ValidationError, match="index 0"):
        Box(0, 1, 0, 1).contains([np.nan], [0])


# ---------------------------------------------------------------------------
# Polygon


def _vec(ra, dec):
    ra, dec = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def polygon_truth(ra_v, dec_v, ra, dec):
    """Brute force, independent of the half-space test: fan triangulation and a
    barycentric solve (x inside spherical triangle abc iff x = s a + t b + u c with
    s, t, u >= 0). Returns (inside, min |coefficient| / |x| to flag boundary points)."""
    v = _vec(ra_v, dec_v)
    x = _vec(ra, dec)
    inside = np.zeros(len(x), bool)
    margin = np.full(len(x), np.inf)
    for i in range(1, len(v) - 1):
        m = np.stack([v[0], v[i], v[i + 1]], axis=1)  # columns a, b, c
        coef = np.linalg.solve(m, x.T).T
        inside |= np.all(coef >= 0, axis=1)
        margin = np.minimum(margin, np.abs(coef).min(axis=1) / np.linalg.norm(coef, axis=1))
    return inside, margin


@st.composite
def polygons(draw):
    if draw(st.integers(0, 3)) == 0:
        # The four corners of a HEALPix pixel (orders 0..20): edges run right along
        # pixel boundaries, the hardest case for a covering.
        order = draw(st.integers(0, 20))
        nside = 1 << order
        pix = draw(st.integers(0, 12 * nside * nside - 1))
        ra_v, dec_v = vec_to_radec(hp.boundaries(nside, pix, step=1, nest=True).T)
        try:
            return Polygon(ra_v, dec_v)
        except ValidationError:
            assume(False)
    ra_c, dec_c = draw(sky_points())
    # 0.1 arcsec to 60 degrees (vertex distance from the centre)
    size = 10.0 ** draw(st.floats(LOG_RADIUS_MIN, np.log10(60.0)))
    n = draw(st.integers(3, 8))
    # Vertices on a small circle at sorted position angles (gaps < 180 deg) form a
    # convex polygon.
    gaps = np.array(draw(st.lists(st.floats(0.2, 1.0), min_size=n, max_size=n)))
    pa = np.cumsum(gaps / gaps.sum() * 2 * np.pi) + draw(st.floats(0, 2 * np.pi))
    if draw(st.booleans()):
        pa = pa[::-1]  # clockwise
    on_vertex = draw(st.booleans())
    if on_vertex:  # put vertex 0 exactly on the drawn point
        centre = offset(ra_c, dec_c, np.array([size]), np.array([draw(st.floats(0, 2 * np.pi))]))
        cra, cdec = float(centre[0][0]), float(centre[1][0])
    else:
        cra, cdec = ra_c, dec_c
    ra_v, dec_v = offset(cra, cdec, np.full(n, size), pa)
    if on_vertex:
        # replace vertex 0 by the exact drawn point (moves it by float rounding only)
        d = angular_separation_deg(ra_v, dec_v, ra_c, dec_c)
        j = int(np.argmin(d))
        if d[j] < 1e-9 * size:
            ra_v[j], dec_v[j] = ra_c, dec_c
    return Polygon(ra_v, dec_v)


def polygon_boundary_points(rng, poly: Polygon, n):
    """Points on each edge pushed in or out by relative 1e-13..1e-3 of the size; the vertices."""
    v = _vec(poly.ra, poly.dec)
    nv = len(v)
    i = rng.integers(0, nv, n)
    a, b = v[i], v[(i + 1) % nv]
    t = rng.uniform(0, 1, n)[:, None]
    p = (1 - t) * a + t * b
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    normal = np.cross(a, b)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    size = np.radians(poly.size_deg())
    push = 10.0 ** rng.uniform(-13, -3, n) * rng.choice([-1.0, 1.0], n) * size
    p = p + push[:, None] * normal
    ra_p, dec_p = vec_to_radec(p)
    return np.concatenate([ra_p, poly.ra]), np.concatenate([dec_p, poly.dec])


@SETTINGS
@given(poly=polygons(), seed=st.integers(0, 2**32 - 1))
def test_polygon_never_misses(poly, seed):
    rng = np.random.default_rng(seed)
    ra_b, dec_b = polygon_boundary_points(rng, poly, 200)
    ra_c, dec_c = vec_to_radec(poly._centre)
    ra_u, dec_u = uniform_around(rng, float(ra_c), float(dec_c), 2 * poly.size_deg() + 2 * ARCSEC, 400)
    k = poly.default_order()
    edge = [pixel_edge_points(ra_b, dec_b, o) for o in (k, min(k + 1, 29))]
    ra_p = np.concatenate([ra_b, ra_u] + [e[0] for e in edge])
    dec_p = np.concatenate([dec_b, dec_u] + [e[1] for e in edge])
    truth, margin = polygon_truth(poly.ra, poly.dec, ra_p, dec_p)
    assert truth.any()
    assert_never_misses(poly, ra_p, dec_p, truth, orders_around(k), ambiguous=margin < 1e-9)
    assert 1 <= len(poly.pixel_ranges()) <= 200


def test_polygon_known_values_and_orientation():
    ccw = Polygon([0, 10, 10, 0], [0, 0, 10, 10])
    cw = Polygon([0, 0, 10, 10], [0, 10, 10, 0])
    ra = np.array([5, 15, 5, 0.0, 9.999, 5, 5, 355])
    dec = np.array([5, 5, -0.001, 5, 9.999, 10.037, 10.039, 5])
    # The top edge is a great circle from (10,10) to (0,10): it bulges north of
    # dec 10, to atan(tan(10)/cos(5)) = 10.0381 deg at ra 5.
    want = np.array([1, 0, 0, 1, 1, 1, 0, 0], bool)
    np.testing.assert_array_equal(ccw.contains(ra, dec), want)
    np.testing.assert_array_equal(cw.contains(ra, dec), want)
    closed = Polygon([0, 10, 10, 0, 0], [0, 0, 10, 10, 0])
    np.testing.assert_array_equal(closed.contains(ra, dec), want)
    # Across RA 0 and around the pole.
    p = Polygon([350, 10, 10, 350], [-5, -5, 5, 5])
    assert p.contains([0.0, 359.0, 9.0], [0.0, 4.0, -4.0]).all()
    assert not p.contains([180.0, 11.0], [0.0, 0.0]).any()
    cap = Polygon([0, 90, 180, 270], [80, 80, 80, 80])
    # Edges bulge poleward: to atan(tan(80)/cos(45)) = 82.893 deg mid-way.
    assert cap.contains([0, 45, 123, 135], [90, 85, 83.5, 82.90]).all()
    assert not cap.contains([45, 135, 123], [80.0, 82.88, 82.0]).any()
    h = radec_to_healpix29([0, 45, 123, 135], [90, 85, 83.5, 82.90])
    for order in (0, 3, 6, 9):
        assert ranges_contain(cap.pixel_ranges(order), h).all()


@pytest.mark.parametrize(
    "ra,dec,match",
    [
        ([0, 10], [0, 0], "at least 3"),
        ([0, 10, 5, 10, 0], [0, 0, 5, 10, 10], "convex"),  # chevron (concave)
        ([0, 10, 0, 10], [0, 10, 10, 0], "convex"),  # bow tie
        ([0, 10, 10, 10], [0, 0, 10, 10], "degenerate"),  # repeated vertex
        ([0, 10, 20], [0, 0, 0], "degenerate"),  # all on one great circle
        ([0, 180, 90], [0, 0, 45], "degenerate"),  # antipodal edge
        ([0, 10, 10, 0, 0, 10, 10, 0], [0, 0, 10, 10, 0, 0, 10, 10], "degenerate|wind"),
        ([0, 10, 10], [0, 0, 95], "dec"),
    ],
)
def test_polygon_validation(ra, dec, match):
    with pytest.raises(ValidationError, match=match):
        Polygon(ra, dec)


def test_polygon_winding_twice_rejected():
    ang = np.linspace(0, 4 * np.pi, 11)[:-1]  # pentagon traversed twice
    ra, dec = offset(20.0, 30.0, np.full(10, 1.0), ang)
    with pytest.raises(ValidationError, match="wind"):
        Polygon(ra, dec)


def test_areas():
    assert Cone(0, 0, 180).area_sr() == pytest.approx(4 * np.pi, rel=1e-14)
    assert Cone(10, 20, 90).area_sr() == pytest.approx(2 * np.pi, rel=1e-14)
    r = np.radians(1.0 / 3600)
    assert Cone(10, 20, 1.0 / 3600).area_sr() == pytest.approx(np.pi * r * r, rel=1e-9)
    assert Box(0, 360, -90, 90).area_sr() == pytest.approx(4 * np.pi, rel=1e-14)
    assert Box(350, 10, 0, 90).area_sr() == pytest.approx(4 * np.pi / 36, rel=1e-12)
    assert Box(0, 360, 0, 90).area_deg2() == pytest.approx(41252.96 / 2, rel=1e-6)
    octant = Polygon([0, 90, 0], [0, 0, 90])
    assert octant.area_sr() == pytest.approx(np.pi / 2, rel=1e-12)
    small = Polygon([0, 0.01, 0.01, 0], [0, 0, 0.01, 0.01])
    assert small.area_deg2() == pytest.approx(1e-4, rel=1e-6)


def test_too_fine_order_fails_fast():
    import time

    t = time.perf_counter()
    with pytest.raises(ValidationError, match="coarser order"):
        Cone(0, 0, 10).pixel_ranges(20)
    with pytest.raises(ValidationError, match="coarser order"):
        Polygon([0, 90, 180, 270], [80, 80, 80, 80]).pixel_ranges(20)
    assert time.perf_counter() - t < 0.5
