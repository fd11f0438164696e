"""Alert packets (real ZTF, Fink, AMPEL, Rubin) into dia_source rows; association vs survey ids.

The real files are small copies in tests/data/real (origins, commits and licences in
tests/data/README.md), so a clone needs nothing outside the repository.
"""

import io
import logging
import pathlib
import tarfile

import fastavro
import numpy as np
import pandas as pd
import pytest

from archive.catalog.alerts import (compare_grouping, jd_utc_to_mjd_tai, mag_to_njy,
                                    read_alert_files)
from archive.catalog.association import DUPLICATE_FLAG, associate
from archive.catalog.dia_ingest import AssociationConfig
from archive.catalog.schema import load_schema
from archive.errors import ValidationError

log = logging.getLogger(__name__)
EMPTY = pd.DataFrame({"dia_object_id": np.empty(0, np.int64), "ra": [], "dec": []})


#: Real alert samples copied into the repository (see tests/data/README.md).
REAL = pathlib.Path(__file__).resolve().parents[1] / "data" / "real"
RUBIN = REAL / "rubin-alerts" / "fink-science" / "rubin_sample_data_10_0.nocutouts.parquet"


@pytest.fixture(scope="module")
def real():
    return REAL


def _ztf_files(real):
    fink = [p for p in (real / "fink").rglob("*")
            if p.is_file() and p.suffix in (".avro", ".parquet")]
    return sorted(fink) + sorted((real / "ampel-ztf").glob("*.tar.gz")) + [
        real / "ampel-ztf" / "ZTF20abyfpze.avro"] + sorted(
        (real / "ztf-avro-alert" / "data").glob("*.avro"))


def test_conversions():
    f, e = mag_to_njy(np.array([31.4, 23.9]), np.array([0.1, 0.0]), np.array([False, True]))
    np.testing.assert_allclose(f, [1.0, -1000.0], rtol=1e-12)  # 23.9 AB = 1 uJy
    # the zero point is AB: 3631 Jy at magnitude 0
    assert mag_to_njy(np.array([0.0]))[0][0] == pytest.approx(3631e9, rel=2e-4)
    assert e[0] == pytest.approx(0.4 * np.log(10) * 0.1)
    # 2019-01-10: TAI - UTC = 37 s
    assert jd_utc_to_mjd_tai(np.array([2458493.5]))[0] == pytest.approx(
        58493.0 + 37 / 86400, abs=1e-9)


def test_ztf_official_sample(real):
    path = real / "ztf-avro-alert" / "data" / "2019_01_10_739260766315010006.avro"
    df = read_alert_files([path])
    assert list(df.columns) == load_schema()["dia_source"].column_names
    # candidate + 22 prv detections (6 prv upper limits skipped)
    assert len(df) == 23
    assert df.external_object_id.unique().tolist() == ["ZTF17aaacxxf"]
    assert df.dia_source_id.is_unique and (df.dia_source_id > 0).all()
    assert df.dia_object_id.isna().all()
    row = df[df.external_id == "739260766315010006"].iloc[0]
    # isdiffpos 'f': negative difference flux; magpsf 15.3711338, sigmapsf 0.0444930
    flux = -(10 ** (-0.4 * (15.371133804321289 - 31.4)))
    assert row.psf_flux == pytest.approx(flux, rel=1e-12)
    assert row.psf_flux_err == pytest.approx(-flux * 0.4 * np.log(10) * 0.044493019580841064,
                                             rel=1e-9)
    # jd (UTC, start of a 30 s exposure) -> mid-exposure TAI MJD: +15 s +37 s
    assert row.mjd == pytest.approx(2458493.7607639 - 2400000.5 + 52 / 86400, abs=2e-9)
    assert row.band == "r" and row.visit == 739260766315 and row.detector == 63
    assert (row.ra, row.dec) == (75.2007803, 35.3613954)
    assert row.x == pytest.approx(2469.45654296875 - 1)
    assert np.isnan(row.ra_err)
    # prv 't' detection: positive flux
    prv = df[df.external_id == "710243366315015036"].iloc[0]
    assert prv.psf_flux == pytest.approx(10 ** (-0.4 * (19.122499465942383 - 31.4)), rel=1e-12)
    assert (np.diff(df.mjd) >= 0).all()


def _independent_ztf_detections(paths):
    """(candid, objectId) of detections decoded directly (not via archive code)."""
    from archive.catalog.alerts import _ensure_snappy  # codec only
    import pyarrow.parquet as pq

    _ensure_snappy()
    keys = set()

    def add(alert):
        for c in [alert["candidate"]] + list(alert.get("prv_candidates") or []):
            if c and c.get("candid") is not None and c.get("magpsf") is not None:
                # two Fink files hold prv candid as double: compare at float64 precision
                keys.add((float(c["candid"]), c["pid"], c["ra"], c["dec"], alert["objectId"]))

    for p in paths:
        if p.suffix == ".parquet":
            for a in pq.read_table(p, columns=["objectId", "candidate",
                                               "prv_candidates"]).to_pylist():
                add(a)
        elif p.name.endswith(".tar.gz"):
            with tarfile.open(p) as tar:
                for m in tar.getmembers():
                    if m.isfile():
                        for a in fastavro.reader(io.BytesIO(tar.extractfile(m).read())):
                            add(a)
        else:
            with open(p, "rb") as fh:
                for a in fastavro.reader(fh):
                    add(a)
    return keys


def test_ztf_bulk_counts_and_dedup(real):
    paths = _ztf_files(real)
    df = read_alert_files(paths)
    keys = _independent_ztf_detections(paths)
    assert len(df) == len(keys)
    assert set(zip(df.external_id.astype(float), df.visit, df.ra, df.dec,
                   df.external_object_id)) == keys
    assert df.external_id.is_unique
    # reading files twice changes nothing (deduplicated)
    again = read_alert_files(paths[:3] + paths[:3])
    assert len(again) == len(read_alert_files(paths[:3]))
    # AMPEL archive of 4 alerts of one object: 4 + 9 prv detections, overlapping
    one = read_alert_files([real / "ampel-ztf" / "ZTF18abxhyqv.tar.gz"])
    assert one.external_object_id.unique().tolist() == ["ZTF18abxhyqv"]
    assert one.external_id.is_unique and len(one) <= 13


def test_rubin_parquet(real):
    path = RUBIN
    df = read_alert_files([path])
    assert len(df) == 25 + 16 + 22 + 2
    row = df[df.external_id == "169813006131658851"].iloc[0]
    assert row.psf_flux == pytest.approx(1549.57861328125)
    assert row.psf_flux_err == pytest.approx(281.33355712890625)
    assert row.mjd == pytest.approx(61041.22124337929)
    assert row.exposure_id == 2025123100240 * 1000 + 151
    assert row.band == "i" and row.external_object_id == "169645854020337671"
    assert row.ra_err == pytest.approx(2.32413258345332e-05, rel=1e-6)
    assert bool(row.is_dipole) is False
    # diaObjectId 0 (solar-system sources) is not a survey object id
    assert df.external_object_id.isna().sum() == 3


def test_rubin_avro_round_trip(real, tmp_path):
    """The Avro path reads the same LSST records as the Parquet path."""
    path = RUBIN
    raw = pd.read_parquet(path, columns=["diaSource", "prvDiaSources"])
    fields = [("diaSourceId", "long"), ("diaObjectId", ["null", "long"]), ("visit", "long"),
              ("detector", "int"), ("band", "string"), ("midpointMjdTai", "double"),
              ("ra", "double"), ("dec", "double"), ("raErr", ["null", "float"]),
              ("decErr", ["null", "float"]), ("psfFlux", ["null", "float"]),
              ("psfFluxErr", ["null", "float"])]
    src_schema = {"type": "record", "name": "diaSource", "namespace": "lsst.v10_0",
                  "fields": [{"name": n, "type": t} for n, t in fields]}
    schema = {"type": "record", "name": "alert", "namespace": "lsst.v10_0", "fields": [
        {"name": "diaSourceId", "type": "long"},
        {"name": "diaSource", "type": src_schema},
        {"name": "prvDiaSources", "type": ["null", {"type": "array",
                                                    "items": "lsst.v10_0.diaSource"}]}]}

    def rec(d):
        return {n: (None if d.get(n) is None or (isinstance(d.get(n), float)
                                                 and np.isnan(d[n])) else d[n])
                for n, _ in fields}

    records = [{"diaSourceId": int(s["diaSourceId"]), "diaSource": rec(s),
                "prvDiaSources": None if p is None or len(p) == 0 else [rec(x) for x in p]}
               for s, p in zip(raw.diaSource, raw.prvDiaSources)]
    out = tmp_path / "rubin.avro"
    with open(out, "wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema(schema), records, codec="deflate")
    a = read_alert_files([out]).sort_values("external_id").reset_index(drop=True)
    b = read_alert_files([path]).sort_values("external_id").reset_index(drop=True)
    for c in ("external_id", "external_object_id", "visit", "detector", "band", "exposure_id"):
        assert a[c].tolist() == b[c].tolist(), c
    for c in ("mjd", "ra", "dec", "psf_flux", "psf_flux_err", "ra_err"):
        np.testing.assert_allclose(a[c], b[c], rtol=1e-6, err_msg=c)


def test_unreadable_files_are_named(tmp_path, real):
    junk = tmp_path / "junk.avro"
    junk.write_bytes(b"this is not avro")
    with pytest.raises(ValidationError, match="junk.avro"):
        read_alert_files([junk])
    trunc = tmp_path / "trunc.avro"
    data = (real / "ztf-avro-alert" / "data" / "472263571115115000.avro").read_bytes()
    trunc.write_bytes(data[:5000])
    with pytest.raises(ValidationError, match="trunc.avro"):
        read_alert_files([trunc])
    other = tmp_path / "other.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(other)
    with pytest.raises(ValidationError, match="other.parquet.*neither"):
        read_alert_files([other])
    with pytest.raises(ValidationError, match="no such alert file"):
        read_alert_files([tmp_path / "missing.avro"])
    with pytest.raises(ValidationError, match="no files"):
        read_alert_files([])


def test_association_agrees_with_ztf_object_ids(real):
    """ZTF groups detections within 1.5" and keeps a second candidate of one image in the
    same object; so do we (issue 15 items 12 and 15), and we never merge two ZTF objects.

    Measured on the 509 unique detections of 53 ZTF objects in tests/data (8 objects
    with two candidates from one difference image): before, exactly grouped as ZTF
    groups them were 63.9 % of the detections with the default 1" (71.5 % at 1.5":
    the second candidate of an image founded a twin object, later detections split
    between the two); now 100 % with the defaults (ZTF rows 1.5", duplicates of a
    visit attached), 85.7 % if forced to 1" (detections scatter up to 1.4").
    """
    df = read_alert_files(_ztf_files(real))
    theirs = df.external_object_id.to_numpy()
    multi = set(df.external_object_id[df.duplicated(["visit", "external_object_id"],
                                                    keep=False)])
    assert len(df) == 509 and len(multi) == 8
    res = AssociationConfig().associate(df, EMPTY)  # per-survey radius: 1.5" for ZTF rows
    stats = compare_grouping(res.dia_object_id, theirs)
    log.info("ZTF agreement %s", stats)
    print(f"ZTF: {len(df)} detections: {stats}; {res.n_duplicates} duplicates of a visit")
    assert stats == {"exact": 1.0, "completeness": 1.0, "purity": 1.0, "n_ours": 53, "n_theirs": 53}
    # every same-image multiplet is one object with one detection per image in its summaries
    assert res.n_duplicates == int(df.duplicated(["visit", "external_object_id"]).sum())
    # forcing 1" splits the objects whose detections scatter farther
    one = compare_grouping(associate(df, EMPTY, radius_arcsec=1.0).dia_object_id, theirs)
    assert one["purity"] == 1.0 and one["exact"] < 0.9


@pytest.mark.parametrize("how", ["reverse", "shuffle"])
def test_ztf_objects_in_the_store_any_arrival_order(store, real, how):
    """Real ZTF detections ingested through the archive in 8 time slices, newest first or
    shuffled, end in exactly the objects of the time-ordered association (and in ZTF's
    grouping).  Before (issue 15 item 14) reversed slices changed 10 of the 63 objects of
    the time-ordered ingest at 1.5" (14 of 66 at the old default 1"), shuffled ones 4."""
    from archive.api import Archive

    df = read_alert_files(_ztf_files(real)).sort_values(["mjd", "visit"], kind="stable")
    ref = AssociationConfig().associate(df, EMPTY).dia_object_id
    slices = np.array_split(np.arange(len(df)), 8)
    order = slices[::-1] if how == "reverse" else [slices[i] for i in
                                                  np.random.default_rng(5).permutation(8)]
    arc = Archive(store, "test")
    for k, rows in enumerate(order):
        arc.ingest_dia_sources(df.iloc[rows], ingest_mjd=61000 + k)
    src = arc.sql("SELECT dia_source_id, dia_object_id, external_object_id, flags FROM dia_source")
    assert len(src) == len(df) == 509
    mine = pd.Series(ref, index=df.dia_source_id.to_numpy()).reindex(src.dia_source_id).to_numpy()
    same = compare_grouping(src.dia_object_id.to_numpy(), mine)
    assert same["exact"] == 1.0 and same["n_ours"] == 53, same
    stats = compare_grouping(src.dia_object_id.to_numpy(), src.external_object_id.to_numpy())
    assert stats["exact"] == 1.0, stats
    # one current version per object; the counts leave duplicates of a visit out
    cur = arc.sql("SELECT dia_object_id, n_dia_sources FROM dia_object WHERE validity_end IS NULL")
    dup = (src["flags"].to_numpy() & DUPLICATE_FLAG) != 0
    n = src[~dup].groupby("dia_object_id").size()
    assert len(cur) == 53 and dict(zip(cur.dia_object_id, cur.n_dia_sources)) == n.to_dict()
    assert arc.count("dia_object") > 53  # history: late slices made new versions


def test_association_agrees_with_rubin_object_ids(real):
    df = read_alert_files([RUBIN])
    res = associate(df, EMPTY, radius_arcsec=1.0)
    stats = compare_grouping(res.dia_object_id, df.external_object_id.to_numpy())
    print(f"Rubin alerts: {stats}")
    assert stats["purity"] == 1.0 and stats["exact"] >= 0.95


def test_association_agrees_with_lsst_hits_grouping(real):
    """LSST's pipeline grouped the 627 HiTS DIASources into 551 DIAObjects; we match it."""
    files = sorted((real / "lsst-apdb-preloads" / "hits2015" / "preloaded_dia_source").rglob(
        "*.parq"))
    h = pd.concat([pd.read_parquet(f).reset_index(drop=True) for f in files])
    h = h.drop_duplicates("diaSourceId").reset_index(drop=True)
    assert len(h) == 627 and h.diaObjectId.nunique() == 551
    src = pd.DataFrame({"ra": h.ra, "dec": h.dec, "ra_err": h.raErr, "dec_err": h.decErr,
                        "ra_dec_cov": h.ra_dec_Cov, "visit": h.visit,
                        "mjd": h.midpointMjdTai})
    res = associate(src, EMPTY, radius_arcsec=1.0)
    stats = compare_grouping(res.dia_object_id, h.diaObjectId.to_numpy())
    print(f"HiTS: {stats}")
    assert stats["n_ours"] == 551
    assert stats["exact"] >= 0.99  # measured: 1.0


def test_rubin_summaries_equal_rubin_dia_object(real):
    """Our summaries of an alert's history equal the diaObject Rubin sent with it."""
    from archive.catalog.summaries import new_objects

    path = RUBIN
    raw = pd.read_parquet(path, columns=["diaSource", "diaObject"])
    df = read_alert_files([path])
    checked = 0
    for s, o in zip(raw.diaSource, raw.diaObject):
        oid = str(s["diaObjectId"])
        mine = df[df.external_object_id == oid]
        if o is None or len(mine) != o["nDiaSources"] or len(mine) < 3:
            continue
        ob = new_objects(mine.assign(dia_object_id=1), 0.0).iloc[0]
        for b in "ugrizy":
            nd = o[f"{b}_psfFluxNdata"]
            if not nd or np.isnan(nd):
                continue
            assert ob[f"{b}_psf_flux_ndata"] == nd
            for ours, theirs in (("mean", "Mean"), ("mean_err", "MeanErr"),
                                 ("sigma", "Sigma"), ("min", "Min"), ("max", "Max")):
                assert ob[f"{b}_psf_flux_{ours}"] == pytest.approx(
                    o[f"{b}_psfFlux{theirs}"], rel=1e-5), (oid, b, ours)
        checked += 1
    assert checked >= 3
