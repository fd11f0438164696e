"""``ra_err`` is an error on the sky (of ra*cos(dec), degrees of arc) everywhere (issue 15, item 3).

process/characterize.py writes it so, LSST's raErr is so, the schema says so.  Before the
fix association, the DIAObject summaries and matched-source summaries multiplied it by
cos(dec) once more: position weights x1.6 at dec 60 and x2 near the pole for sources with
ra_err = dec_err, east-west offsets over-penalised by 1/cos^2(dec).  Each check below is
against an analytic value at dec 60 and near the pole.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from archive.catalog.association import _LOG_2PI, associate, tangent_offsets
from archive.catalog.matched import summarize
from archive.catalog.summaries import new_objects, position_weights, recompute

ARCSEC = 1.0 / 3600.0
DECS = [60.0, 89.9]


def _east(ra0: float, dec0: float, arcsec: float) -> tuple[float, float]:
    """The point ``arcsec`` due east of (ra0, dec0) along the great circle (deg)."""
    d = np.radians(dec0)
    a = np.radians(ra0)
    north = np.array([np.cos(a) * np.cos(d), np.sin(a) * np.cos(d), np.sin(d)])
    east = np.array([-np.sin(a), np.cos(a), 0.0])
    t = arcsec * ARCSEC * np.pi / 180.0
    v = np.cos(t) * north + np.sin(t) * east
    return float(np.degrees(np.arctan2(v[1], v[0])) % 360.0), float(np.degrees(np.arcsin(v[2])))


@pytest.mark.parametrize("dec0", DECS)
def test_position_weight_uses_on_sky_errors(dec0):
    src = pd.DataFrame({"ra": [10.0], "dec": [dec0], "ra_err": [0.3 * ARCSEC],
                        "dec_err": [0.1 * ARCSEC]})
    # sigma^2 = (0.3^2 + 0.1^2) / 2 arcsec^2, whatever the declination
    assert position_weights(src)[0] == pytest.approx(1.0 / (0.05 * ARCSEC ** 2), rel=1e-12)


def _pair(dec0: float) -> pd.DataFrame:
    """Two detections 1" apart east-west: A precise in RA, B precise in Dec (equal total
    variance, so equal weights)."""
    ra_b, dec_b = _east(10.0, dec0, 1.0)
    return pd.DataFrame({
        "dia_object_id": [7, 7], "matched_source_id": [7, 7], "exposure_id": [1, 2],
        "visit": [1, 2], "mjd": [60000.0, 60001.0], "band": ["r", "r"],
        "ra": [10.0, ra_b], "dec": [dec0, dec_b],
        "ra_err": [0.1 * ARCSEC, 0.3 * ARCSEC], "dec_err": [0.3 * ARCSEC, 0.1 * ARCSEC],
        "psf_flux": [1000.0, 1000.0], "psf_flux_err": [10.0, 10.0]})


@pytest.mark.parametrize("dec0", DECS)
@pytest.mark.parametrize("how", ["incremental", "recompute", "matched"])
def test_weighted_mean_position_and_error(dec0, how):
    src = _pair(dec0)
    if how == "incremental":
        obj = new_objects(src, 61000.0).iloc[0]
    elif how == "recompute":
        obj = recompute(src).iloc[0]
    else:
        obj = summarize(src).iloc[0]
    # equal weights: the mean lies half-way, 0.5" east of A, on A's parallel (to 1e-6")
    dx, dy = tangent_offsets(np.array([obj["ra"]]), np.array([obj["dec"]]),
                             np.array([10.0]), np.array([dec0]))
    assert dx[0] == pytest.approx(0.5, abs=1e-6)
    assert dy[0] == pytest.approx(0.0, abs=1e-4)  # the great circle bends off the parallel
    # error of the mean: 1/sqrt(sum w), w = 1/0.05 arcsec^-2 each; ra_err on the sky too
    err = np.sqrt(1.0 / (2.0 / 0.05)) * ARCSEC
    assert obj["dec_err"] == pytest.approx(err, rel=1e-6)
    assert obj["ra_err"] == pytest.approx(err, rel=1e-6)


@pytest.mark.parametrize("dec0", DECS)
def test_association_chi2_uses_on_sky_errors(dec0):
    """A source 0.3" east of an object, both with 0.1" errors per axis on the sky: the
    likelihood cost is that of chi^2 = 0.3^2 / (2 * 0.1^2) = 4.5 under det = (0.02)^2."""
    objects = pd.DataFrame({"dia_object_id": [1], "ra": [10.0], "dec": [dec0],
                            "ra_err": [0.1 * ARCSEC], "dec_err": [0.1 * ARCSEC]})
    ra_s, dec_s = _east(10.0, dec0, 0.3)
    sources = pd.DataFrame({"ra": [ra_s], "dec": [dec_s], "ra_err": [0.1 * ARCSEC],
                            "dec_err": [0.1 * ARCSEC], "visit": [1]})
    res = associate(sources, objects, radius_arcsec=1.0, id_factory=lambda n: np.arange(n) + 100)
    assert res.dia_object_id.tolist() == [1] and res.scoring == "likelihood"
    expected = 0.5 * 4.5 + 0.5 * np.log(0.02 ** 2) + _LOG_2PI
    assert res.cost[0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dec0", DECS)
def test_east_west_offsets_not_over_penalised(dec0):
    """Object A 0.45" east and object B 0.46" north of a source, both objects with 0.15"
    errors per axis on the sky: A is the nearer in sigma and wins.  With ra_err shrunk by
    cos(dec) A's east offset looked 2x (dec 60) to 570x (pole) more significant, and B won."""
    ra_a, dec_a = _east(10.0, dec0, 0.45)
    objects = pd.DataFrame({"dia_object_id": [1, 2], "ra": [ra_a, 10.0],
                            "dec": [dec_a, dec0 + 0.46 * ARCSEC],
                            "ra_err": [0.15 * ARCSEC] * 2, "dec_err": [0.15 * ARCSEC] * 2})
    sources = pd.DataFrame({"ra": [10.0], "dec": [dec0], "ra_err": [0.01 * ARCSEC],
                            "dec_err": [0.01 * ARCSEC], "visit": [1]})
    res = associate(sources, objects, radius_arcsec=1.0, id_factory=lambda n: np.arange(n) + 100)
    assert res.dia_object_id.tolist() == [1]


def test_migration_0003_makes_stored_ra_err_on_sky(pg_url):
    """Objects written before (ra_err = dec_err / cos(dec), an RA-coordinate error) get the
    on-sky ra_err (= dec_err, their errors are isotropic) when the database is upgraded."""
    import uuid

    import sqlalchemy as sa

    from archive.catalog.migrate import upgrade

    server, _ = pg_url.rsplit("/", 1)
    name = f"archive_mig_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(server + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as con:
        con.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = f"{server}/{name}"
    engine = sa.create_engine(url)
    try:
        upgrade(url, "0002")
        err = 0.05 * ARCSEC
        with engine.begin() as con:
            for oid, dec in ((1, 60.0), (2, 89.9)):
                con.execute(sa.text(
                    "INSERT INTO dia_object (dia_object_id, validity_start, ra, dec, ra_err, dec_err, "
                    "healpix29, n_dia_sources) VALUES (:i, 61000, 10, :d, :re, :de, 0, 1)"),
                    {"i": oid, "d": dec, "re": err / np.cos(np.radians(dec)), "de": err})
        upgrade(url, "0003")
        with engine.connect() as con:
            rows = con.execute(sa.text("SELECT ra_err, dec_err FROM dia_object")).all()
        assert [r[0] for r in rows] == pytest.approx([err, err], rel=1e-6)
    finally:
        engine.dispose()
        with admin.connect() as con:
            con.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
