"""The same behaviour on both backends: writes, validation, queries, read-only SQL."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from archive.errors import ArchiveError, NotFoundError, ReadOnlyError, ValidationError
from archive.sky.healpix import angular_separation_deg, radec_to_healpix29



def test_write_and_count(make_dia_sources, store):
    df = make_dia_sources(500)
    assert store.write("dia_source", df) == 500
    assert store.count("dia_source") == 500
    back = store.get("dia_source", [1, 2, 500])
    assert sorted(back["dia_source_id"].tolist()) == [1, 2, 500]
    row = back.set_index("dia_source_id").loc[2]
    src = df.set_index("dia_source_id").loc[2]
    assert row["ra"] == src["ra"] and row["band"] == src["band"]
    assert row["healpix29"] == radec_to_healpix29(np.array([src["ra"]]), np.array([src["dec"]]))[0]


def test_nullable_ids_survive(make_dia_sources, store):
    df = make_dia_sources(3)
    df["dia_object_id"] = pd.array([2**62 + 1, None, 2**62 + 3], dtype="Int64")
    store.write("dia_source", df)
    back = store.get("dia_source", [1, 2, 3]).sort_values("dia_source_id")
    vals = back["dia_object_id"].tolist()
    assert vals[0] == 2**62 + 1 and vals[2] == 2**62 + 3 and pd.isna(vals[1])


def test_cone_matches_brute_force(make_dia_sources, store):
    rng = np.random.default_rng(3)
    n = 3000
    ra = (10 + rng.normal(0, 0.3, n)) % 360
    dec = rng.normal(0, 0.3, n)
    store.write("dia_source", make_dia_sources(n, ra=ra, dec=dec))
    for ra0, dec0, r in [(10, 0, 60), (10.2, -0.1, 600), (10, 0, 1800), (9.9, 0.05, 5)]:
        got = store.cone("dia_source", ra0, dec0, r)
        truth = np.flatnonzero(angular_separation_deg(ra0, dec0, ra, dec) * 3600 <= r) + 1
        assert sorted(got["dia_source_id"]) == sorted(truth.tolist())
        assert got["distance_arcsec"].is_monotonic_increasing
        assert (got["distance_arcsec"] <= r).all()


def test_cone_across_ra_zero_and_pole(make_dia_sources, store):
    ra = np.array([359.9999, 0.0001, 0.0, 180.0, 45.0, 0.0])
    dec = np.array([10.0, 10.0, 10.0, 89.9999, 89.9999, -90.0])
    store.write("dia_source", make_dia_sources(6, ra=ra, dec=dec))
    got = store.cone("dia_source", 0.0, 10.0, 1.0)
    assert sorted(got["dia_source_id"]) == [1, 2, 3]
    got = store.cone("dia_source", 270.0, 90.0, 1.0)
    assert sorted(got["dia_source_id"]) == [4, 5]
    got = store.cone("dia_source", 12.0, -89.99995, 1.0)
    assert sorted(got["dia_source_id"]) == [6]


def test_cone_columns_and_bad_args(make_dia_sources, store):
    store.write("dia_source", make_dia_sources(10))
    df = store.cone("dia_source", 0, 0, 180 * 3600, columns=["dia_source_id", "band"])
    assert list(df.columns) == ["dia_source_id", "band", "distance_arcsec"]
    assert len(df) == 10
    with pytest.raises(NotFoundError, match="no column 'nope'"):
        store.cone("dia_source", 0, 0, 1, columns=["nope"])
    with pytest.raises(ArchiveError, match="radius"):
        store.cone("dia_source", 0, 0, -1)
    with pytest.raises(ArchiveError, match="no positions"):
        store.cone("provenance", 0, 0, 1)
    with pytest.raises(NotFoundError, match="unknown table"):
        store.cone("nope", 0, 0, 1)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.assign(colour=1.0), "unknown column 'colour'"),
    (lambda d: d.drop(columns=["band"]), "missing required column 'band'"),
    (lambda d: d.assign(ra=d["ra"].where(d.index != 3, 400.0)), r"ra outside \[0, 360\) deg at row 3"),
    (lambda d: d.assign(dec=d["dec"].where(d.index != 4, -91.0)), r"dec outside \[-90, 90\] deg at row 4"),
    (lambda d: d.assign(dec=d["dec"].where(d.index != 5, np.nan)), "NaN or missing ra/dec at row 5"),
    (lambda d: d.assign(ra=d["ra"].where(d.index != 6, np.inf)), "NaN or infinite ra/dec at row 6"),
    (lambda d: d.assign(visit="seven"), "column 'visit' has type"),
    (lambda d: d.assign(visit=d["visit"] + 0.5), "non-integer values"),
    (lambda d: d.assign(dia_source_id=1), "repeated within the batch"),
    (lambda d: d.assign(flags=pd.array([None] * len(d), dtype="Int64")), "'flags' may not be null"),
])
def test_bad_rows_rejected_and_nothing_written(make_dia_sources, store, mutate, message):
    store.write("dia_source", make_dia_sources(10, start_id=1000))
    with pytest.raises(ValidationError, match=message):
        store.write("dia_source", mutate(make_dia_sources(10)))
    assert store.count("dia_source") == 10


def test_duplicate_key_against_stored_rows(make_dia_sources, store):
    store.write("dia_source", make_dia_sources(10))
    with pytest.raises(ValidationError, match="already stored"):
        store.write("dia_source", make_dia_sources(5, start_id=8))
    assert store.count("dia_source") == 10


def test_multi_table_batch_is_atomic(make_dia_sources, store):
    good = make_dia_sources(5)
    bad = make_dia_sources(5).drop(columns=["band"])
    with pytest.raises(ValidationError):
        store.write_many({"dia_source": good, "dia_forced_source": bad})
    assert store.count("dia_source") == 0


def test_transaction_rollback_and_delete(make_dia_sources, store):
    store.write("dia_source", make_dia_sources(20))
    from archive.catalog.validate import conform

    rows = conform(store.table("dia_source"), make_dia_sources(5, start_id=100))
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            tx.append("dia_source", rows)
            raise RuntimeError("boom")
    assert store.count("dia_source") == 20
    with store.transaction() as tx:
        assert tx.delete("dia_source", "dia_source_id", [1, 2, 3]) == 3
        tx.append("dia_source", rows)
    assert store.count("dia_source") == 22
    assert store.get("dia_source", [1, 2, 3]).empty


def test_sql_reads_with_postgres_table_names(make_dia_sources, store):
    store.write("dia_source", make_dia_sources(100))
    df = store.sql("SELECT band, count(*) AS n FROM dia_source GROUP BY band ORDER BY band")
    assert df["n"].sum() == 100
    assert set(df["band"]) <= {"g", "r", "i"}
    assert store.sql("SELECT count(*) AS n FROM dia_object")["n"].iloc[0] == 0


@pytest.mark.parametrize("query", [
    "DELETE FROM dia_source",
    "DROP TABLE dia_source",
    "INSERT INTO provenance (provenance_id) VALUES (1)",
    "UPDATE dia_source SET band = 'x'",
    "CREATE TABLE evil (a int)",
    "SELECT 1; DROP TABLE dia_source",
])
def test_sql_refuses_writes(make_dia_sources, store, query):
    store.write("dia_source", make_dia_sources(10))
    with pytest.raises(ReadOnlyError, match="read-only|one query"):
        store.sql(query)
    assert store.count("dia_source") == 10


def test_sql_errors_are_clear(make_dia_sources, store):
    with pytest.raises(ArchiveError, match="SQL"):
        store.sql("SELECT nope FROM dia_source")
    with pytest.raises(ArchiveError, match="SQL syntax error"):
        store.sql("SELEC 1")


def test_sql_columns_are_the_schema(make_dia_sources, store):
    """No storage artefacts (e.g. HATS Norder/Dir/Npix path columns) leak into SQL."""
    store.write("dia_source", make_dia_sources(3))
    df = store.sql("SELECT * FROM dia_source")
    assert list(df.columns) == store.table("dia_source").column_names


def test_values_round_trip_exactly(make_dia_sources, store):
    """Timestamps, NaN, nulls, booleans, empty strings and full-precision floats come back as written."""
    from datetime import datetime, timezone

    when = datetime(2026, 11, 23, 18, 1, 2, 345678, tzinfo=timezone.utc)
    store.write("provenance", pd.DataFrame([{
        "provenance_id": 7, "code_version": "0.1", "step": "s", "config": "", "config_hash": "h",
        "inputs": '["a,b", "c\\"d"]', "created": when}]))
    back = store.get("provenance", [7]).iloc[0]
    assert back["created"] == when and back["config"] == "" and back["inputs"] == '["a,b", "c\\"d"]'
    df = make_dia_sources(3)
    df["psf_flux"] = [np.nan, 1 / 3, -0.0]
    df["ra"] = [150.123456789012345, 150.0, 151.0]
    df["is_dipole"] = pd.array([True, None, False], dtype="boolean")
    store.write("dia_source", df)
    got = store.get("dia_source", [1, 2, 3]).sort_values("dia_source_id").reset_index(drop=True)
    assert np.isnan(got["psf_flux"][0]) and got["psf_flux"][1] == 1 / 3
    assert got["ra"][0] == 150.123456789012345
    assert got["is_dipole"][0] == True and pd.isna(got["is_dipole"][1]) and got["is_dipole"][2] == False  # noqa: E712
    assert pd.isna(got["ap_flux"][0])
