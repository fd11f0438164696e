"""Order-29 HEALPix index, partition pixels and angular separation."""

from __future__ import annotations

import healpy as hp
import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archive.errors import ValidationError
from archive.sky.healpix import (
    NPIX_MAX,
    NSIDE_MAX,
    ORDER_MAX,
    angular_separation_deg,
    healpix29_to_radec,
    partition_pixel,
    radec_to_healpix29,
)

MAS = 1.0 / 3.6e6  # one milliarcsecond in degrees
# Largest centre-to-corner distance of an order-29 pixel, in degrees (~0.45 mas).
PIXRAD29_DEG = np.degrees(hp.max_pixrad(NSIDE_MAX))


def _random_sky(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    return ra, dec


def test_constants():
    assert ORDER_MAX == 29
    assert NSIDE_MAX == 2**29
    assert NPIX_MAX == 12 * 4**29


def test_matches_healpy_nested_order29_on_random_and_special_points():
    rng = np.random.default_rng(1)
    ra, dec = _random_sky(rng, 20000)
    special_ra = np.array([0.0, 360.0 - 1e-12, 90.0, 180.0, 270.0, 45.0, 0.0, 123.4])
    special_dec = np.array([0.0, 0.0, 90.0, -90.0, 41.8103148958, -41.8103148958, 89.9999999, -0.0])
    ra = np.concatenate([ra, special_ra])
    dec = np.concatenate([dec, special_dec])
    h = radec_to_healpix29(ra, dec)
    assert h.dtype == np.int64
    expected = hp.ang2pix(2**29, ra % 360.0, dec, nest=True, lonlat=True)
    np.testing.assert_array_equal(h, expected)
    assert np.all((h >= 0) & (h < NPIX_MAX))


def test_known_values():
    # The north pole belongs to the last pixel (index 4**29 - 1 within base pixel 3)
    # of base pixels 0..3 in the nested scheme; healpy puts (0, 90) in base pixel 0..3.
    base = partition_pixel(radec_to_healpix29([45.0, 135.0, 225.0, 315.0], [60.0] * 4), 0)
    np.testing.assert_array_equal(base, [0, 1, 2, 3])
    base = partition_pixel(radec_to_healpix29([0.0, 90.0, 180.0, 270.0], [0.0] * 4), 0)
    np.testing.assert_array_equal(base, [4, 5, 6, 7])
    base = partition_pixel(radec_to_healpix29([45.0, 135.0, 225.0, 315.0], [-60.0] * 4), 0)
    np.testing.assert_array_equal(base, [8, 9, 10, 11])
    # Centre of base pixel 4 is (0, 0): the point (1 mas, 0) is in its last-but... subtree.
    ra_c, dec_c = healpix29_to_radec(radec_to_healpix29(0.5 * MAS, 0.1 * MAS))
    assert abs(ra_c - 0.5 * MAS) < 1 * MAS and abs(dec_c - 0.1 * MAS) < 1 * MAS


def test_ra_is_wrapped_mod_360():
    rng = np.random.default_rng(2)
    ra, dec = _random_sky(rng, 1000)
    h = radec_to_healpix29(ra, dec)
    for k in (-2, -1, 1, 3):
        np.testing.assert_array_equal(radec_to_healpix29(ra + 360.0 * k, dec), h)
    assert radec_to_healpix29(360.0, 10.0) == radec_to_healpix29(0.0, 10.0)
    assert radec_to_healpix29(-1e-300, 10.0) == radec_to_healpix29(0.0, 10.0)


@pytest.mark.parametrize(
    "ra,dec,where",
    [
        ([10.0, 20.0, 30.0], [0.0, 90.0000001, 0.0], "index 1"),
        ([10.0, 20.0, 30.0], [0.0, 0.0, -91.0], "index 2"),
        ([10.0, 20.0, 30.0], [np.nan, 0.0, 0.0], "index 0"),
        ([10.0, np.inf, 30.0], [0.0, 0.0, 0.0], "index 1"),
        ([10.0, 20.0, np.nan], [0.0, 0.0, 0.0], "index 2"),
    ],
)
def test_bad_positions_raise_naming_index(ra, dec, where):
    with pytest.raises(ValueError, match=where) as info:
        radec_to_healpix29(ra, dec)
    assert isinstance(info.value, ValidationError)


def test_roundtrip_pixel_centres():
    rng = np.random.default_rng(3)
    h = rng.integers(0, NPIX_MAX, 20000, dtype=np.int64)
    h = np.concatenate([h, [0, NPIX_MAX - 1, 4**29 - 1, 4 * 4**29]])
    ra, dec = healpix29_to_radec(h)
    assert np.all((ra >= 0) & (ra < 360) & (dec >= -90) & (dec <= 90))
    np.testing.assert_array_equal(radec_to_healpix29(ra, dec), h)


def test_roundtrip_positions_within_one_pixel():
    rng = np.random.default_rng(4)
    ra, dec = _random_sky(rng, 20000)
    ra2, dec2 = healpix29_to_radec(radec_to_healpix29(ra, dec))
    sep = angular_separation_deg(ra, dec, ra2, dec2)
    assert sep.max() <= PIXRAD29_DEG * (1 + 1e-6)
    assert sep.max() < 0.5 * MAS


def test_healpix29_to_radec_rejects_out_of_range():
    with pytest.raises(ValidationError, match="index 1"):
        healpix29_to_radec([0, NPIX_MAX])
    with pytest.raises(ValidationError, match="index 0"):
        healpix29_to_radec([-1])


def test_partition_pixel_is_ancestor_and_matches_coarse_ang2pix():
    rng = np.random.default_rng(5)
    ra, dec = _random_sky(rng, 20000)
    h = radec_to_healpix29(ra, dec)
    for order in (0, 1, 3, 5, 8, 12, 20, 28, 29):
        p = partition_pixel(h, order)
        assert p.dtype == np.int64
        np.testing.assert_array_equal(p, h >> (2 * (29 - order)))
        coarse = hp.ang2pix(2**order, ra, dec, nest=True, lonlat=True)
        # Equal except for points within float error of a pixel edge.
        assert np.mean(p == coarse) > 0.9999
    np.testing.assert_array_equal(partition_pixel(h, 29), h)
    with pytest.raises(ValidationError):
        partition_pixel(h, 30)
    with pytest.raises(ValidationError):
        partition_pixel(h, -1)


def _mp_sep_deg(ra1, dec1, ra2, dec2) -> float:
    """High-precision haversine (50 digits) for reference."""
    mpmath.mp.dps = 50
    r1, d1, r2, d2 = (mpmath.radians(mpmath.mpf(float(v))) for v in (ra1, dec1, ra2, dec2))
    hav = mpmath.sin((d2 - d1) / 2) ** 2 + mpmath.cos(d1) * mpmath.cos(d2) * mpmath.sin((r2 - r1) / 2) ** 2
    return float(mpmath.degrees(2 * mpmath.asin(mpmath.sqrt(hav))))


def test_separation_known_values():
    assert angular_separation_deg(0, 0, 0, 0) == 0
    np.testing.assert_allclose(angular_separation_deg(0, 0, 180, 0), 180.0, rtol=1e-15)
    np.testing.assert_allclose(angular_separation_deg(10, 90, 200, -90), 180.0, rtol=1e-15)
    np.testing.assert_allclose(angular_separation_deg(0, 0, 90, 0), 90.0, rtol=1e-15)
    np.testing.assert_allclose(angular_separation_deg(359.5, 0, 0.5, 0), 1.0, rtol=1e-13)
    # Poles: RA is irrelevant there.
    np.testing.assert_allclose(angular_separation_deg(0, 90, 123, 90), 0.0, atol=1e-14)
    np.testing.assert_allclose(angular_separation_deg(0, 89, 180, 89), 2.0, rtol=1e-12)
    # 0.01 arcsec along a meridian and along the equator.
    tiny = 0.01 / 3600.0
    np.testing.assert_allclose(angular_separation_deg(10, 20, 10, 20 + tiny), tiny, rtol=1e-9)
    np.testing.assert_allclose(angular_separation_deg(10, 0, 10 + tiny, 0), tiny, rtol=1e-9)


@settings(derandomize=True, deadline=None, max_examples=150)
@given(
    ra=st.floats(0.0, 360.0),
    dec=st.floats(-90.0, 90.0),
    log_sep=st.floats(-8.0, np.log10(179.0)),  # 3.6e-5 arcsec .. 179 deg
    pa=st.floats(0.0, 2 * np.pi),
)
def test_separation_accuracy_against_mpmath(ra, dec, log_sep, pa):
    sep = 10.0**log_sep
    # Second point: move from the first by ``sep`` along position angle pa.
    d1, a1, s = np.radians(dec), np.radians(ra), np.radians(sep)
    d2 = np.arcsin(np.sin(d1) * np.cos(s) + np.cos(d1) * np.sin(s) * np.cos(pa))
    a2 = a1 + np.arctan2(np.sin(pa) * np.sin(s) * np.cos(d1), np.cos(s) - np.sin(d1) * np.sin(d2))
    ra2, dec2 = np.degrees(a2), np.degrees(d2)
    ref = _mp_sep_deg(ra, dec, ra2, dec2)
    got = float(angular_separation_deg(ra, dec, ra2, dec2))
    # Relative 1e-12, or 1e-13 deg (0.4 nano-arcsec, the float64 floor for angles
    # of order 360 deg) absolute, whichever is larger.
    assert abs(got - ref) <= max(1e-12 * ref, 1e-13)
    # Symmetric and broadcasting.
    assert float(angular_separation_deg(ra2, dec2, ra, dec)) == pytest.approx(got, rel=1e-12, abs=1e-13)


def test_separation_broadcasts():
    out = angular_separation_deg(np.zeros((3, 1)), 0.0, np.array([0.0, 1.0]), 0.0)
    assert out.shape == (3, 2)
    np.testing.assert_allclose(out[:, 1], 1.0, rtol=1e-14)
