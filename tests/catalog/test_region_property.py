"""Store region queries against brute force (hypothesis): pixel edges and corners, poles, RA 0/360.

One data set per backend: points scattered around special centres at every
scale from 0.01 arcsec to 20 degrees; hypothesis then draws cone centres near
those places and radii from 0.1 arcsec to 10 degrees.
"""

from __future__ import annotations

import healpy as hp
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive.catalog.backends import open_store
from archive.sky.healpix import angular_separation_deg
from archive.sky.regions import Box, Polygon


def _special_centres() -> list[tuple[float, float]]:
    out = [(0.0, 0.0), (359.9999999, 10.0), (0.0, 90.0), (123.0, -90.0), (45.0, 41.8103149)]
    for order in (3, 9, 17):
        b = hp.boundaries(1 << order, 1000 % (12 << (2 * order)), step=1, nest=True)  # a pixel's corners
        ra, dec = hp.vec2ang(b.T, lonlat=True)
        out += [(float(ra[i]) % 360, float(dec[i])) for i in range(4)]
    return out


CENTRES = _special_centres()


def _offset(ra0, dec0, dist_deg, pa_deg):
    """Point at angular distance ``dist_deg`` and position angle ``pa_deg`` from (ra0, dec0)."""
    if abs(dec0) == 90.0:  # at a pole the position angle is the RA of the great circle
        return np.asarray(pa_deg, float) % 360.0 + 0 * np.asarray(dist_deg), np.sign(dec0) * (90.0 - np.asarray(dist_deg))
    d, pa = np.radians(dist_deg), np.radians(pa_deg)
    dec0r, ra0r = np.radians(dec0), np.radians(ra0)
    sdec = np.sin(dec0r) * np.cos(d) + np.cos(dec0r) * np.sin(d) * np.cos(pa)
    dec = np.arcsin(np.clip(sdec, -1, 1))
    ra = ra0r + np.arctan2(np.sin(pa) * np.sin(d) * np.cos(dec0r), np.cos(d) - np.sin(dec0r) * sdec)
    return np.degrees(ra) % 360.0, np.degrees(dec)


def _points(seed=0, per_centre=1500):
    rng = np.random.default_rng(seed)
    ras, decs = [], []
    for ra0, dec0 in CENTRES:
        dist = 10 ** rng.uniform(np.log10(0.01 / 3600), np.log10(20.0), per_centre)
        ra, dec = _offset(ra0, dec0, dist, rng.uniform(0, 360, per_centre))
        ras.append(ra)
        decs.append(dec)
    ra, dec = np.concatenate(ras), np.concatenate(decs)
    n = ra.size
    return pd.DataFrame({"dia_source_id": np.arange(n, dtype=np.int64), "exposure_id": 1, "visit": 1,
                         "detector": 0, "band": "r", "mjd": 60000.0, "ra": ra, "dec": dec, "flags": 0})


@pytest.fixture(scope="module", params=["parquet", "postgres"])
def loaded(request, tmp_path_factory):
    pts = _points()
    if request.param == "parquet":
        store = open_store(str(tmp_path_factory.mktemp("p") / "arc"), create=True)
    else:
        import sqlalchemy as sa

        from archive.catalog.schema import load_schema

        url = request.getfixturevalue("pg_store_url")
        eng = sa.create_engine(url)
        with eng.begin() as con:
            con.execute(sa.text("TRUNCATE " + ", ".join(t.name for t in load_schema())))
        eng.dispose()
        store = open_store(url)
    store.write("dia_source", pts)
    yield store, pts
    store.close()


def _check_cone(store, pts, ra0, dec0, radius_arcsec):
    got = store.cone("dia_source", ra0, dec0, radius_arcsec, columns=["dia_source_id"])
    d = angular_separation_deg(ra0, dec0, pts["ra"].to_numpy(), pts["dec"].to_numpy()) * 3600
    # points within 1e-9 relative of the edge may round either way between engines
    sure_in = set(pts["dia_source_id"][d <= radius_arcsec * (1 - 1e-9)])
    maybe = set(pts["dia_source_id"][d <= radius_arcsec * (1 + 1e-9)])
    ids = set(got["dia_source_id"])
    assert sure_in <= ids <= maybe, (len(sure_in - ids), len(ids - maybe))


@settings(max_examples=60, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(i=st.integers(0, len(CENTRES) - 1), log_r=st.floats(np.log10(0.1), np.log10(36000.0)),
       jitter=st.floats(0, 1), pa=st.floats(0, 360))
def test_cone_equals_brute_force(loaded, i, log_r, jitter, pa):
    store, pts = loaded
    r = 10 ** log_r
    # centre on the special place itself or a little off it
    ra0, dec0 = _offset(*CENTRES[i], jitter * r / 3600.0 * 0.5, pa)
    _check_cone(store, pts, float(ra0), float(dec0), r)


def test_box_and_polygon_equal_brute_force(loaded):
    store, pts = loaded
    ra, dec = pts["ra"].to_numpy(), pts["dec"].to_numpy()
    for region in [Box(359.0, 1.0, -1.0, 1.0), Box(0.0, 360.0, 85.0, 90.0), Box(100.0, 140.0, -90.0, -80.0),
                   Polygon([359.5, 0.5, 0.5, 359.5], [-0.5, -0.5, 0.5, 0.5]),
                   Polygon([0.0, 120.0, 240.0], [80.0, 80.0, 80.0])]:
        got = set(store.query_region("dia_source", region, columns=["dia_source_id"])["dia_source_id"])
        truth = set(pts["dia_source_id"][region.contains(ra, dec)])
        assert got == truth, region
        assert len(truth) > 0
