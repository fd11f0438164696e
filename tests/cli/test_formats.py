"""Output formats carry the schema; json is one document and jsonl lines, both exact; -o picks the
format from the suffix; one query names its columns alike on both backends; Rubin and ZTF names."""

from __future__ import annotations

import json
import pathlib

import fastavro
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.io.votable import parse_single_table
from astropy.table import Table

from archive.cli.main import main

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "real"


def _rows(n=5):
    rng = np.random.default_rng(3)
    return pd.DataFrame({
        "dia_source_id": np.arange(1, n + 1, dtype=np.int64), "exposure_id": 7, "visit": 7, "detector": 0,
        "band": ["g", "r", "r", "i", "r"][:n], "mjd": 60000.123456789012,
        "ra": 30 + rng.uniform(-0.01, 0.01, n), "dec": -5 + rng.uniform(-0.01, 0.01, n),
        "ra_err": np.float32(1.1e-5), "dec_err": np.float32(0.1), "ra_dec_cov": np.float32(1.1225e-12),
        "psf_flux": rng.normal(500, 10, n) / 3.0, "psf_flux_err": 5.0, "flags": 0})


@pytest.fixture
def loaded(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHIVE_REPO", repo)
    df = _rows()
    df.to_parquet(tmp_path / "a.parquet")
    assert main(["ingest", "catalog", "dia_source", str(tmp_path / "a.parquet")]) == 0
    return df


def _out(capsys, *args):
    capsys.readouterr()
    assert main([str(a) for a in args]) == 0
    return capsys.readouterr().out


Q = "SELECT dia_source_id, ra, dec, ra_dec_cov, mjd, psf_flux, band FROM dia_source ORDER BY dia_source_id"


def test_json_is_one_document_and_exact(loaded, capsys):
    doc = json.loads(_out(capsys, "sql", "--format", "json", Q))
    assert isinstance(doc, list) and len(doc) == 5
    lines = [json.loads(x) for x in _out(capsys, "sql", "--format", "jsonl", Q).splitlines()]
    assert lines == doc
    for row, (_, want) in zip(doc, loaded.iterrows()):
        # float64: the very same double; float32: the same float32 (written by its own shortest repr)
        assert row["ra"] == want["ra"] and row["dec"] == want["dec"] and row["psf_flux"] == want["psf_flux"]
        assert row["mjd"] == 60000.123456789012
        assert np.float32(row["ra_dec_cov"]) == np.float32(1.1225e-12) and row["ra_dec_cov"] == 1.1225e-12
    # missing values are null, not NaN (which json.loads of strict readers refuses)
    text = _out(capsys, "sql", "--format", "json", "SELECT dia_source_id, dia_object_id, x FROM dia_source")
    assert "NaN" not in text and all(r["dia_object_id"] is None and r["x"] is None for r in json.loads(text))


def test_self_describing_formats_carry_unit_ucd_description(loaded, capsys, tmp_path):
    out = tmp_path / "c.xml"
    _out(capsys, "cone", "dia_source", 30, -5, 600, "-o", out)  # .xml -> VOTable
    vt = parse_single_table(str(out))
    f = {fl.name: fl for fl in vt.fields}
    assert str(f["ra"].unit) == "deg" and f["ra"].ucd == "pos.eq.ra;meta.main"
    assert f["ra"].description == "Right ascension (ICRS)."
    assert f["psf_flux"].ucd == "phot.flux;arith.diff" and str(f["psf_flux"].unit) == "nJy"
    assert f["mjd"].ucd == "time.epoch" and str(f["mjd"].unit) == "d"
    assert f["distance_arcsec"].ucd == "pos.angDistance" and str(f["distance_arcsec"].unit) == "arcsec"
    assert len(vt.array) == 5

    ecsv = tmp_path / "c.ecsv"
    _out(capsys, "cone", "dia_source", 30, -5, 600, "-o", ecsv)
    t = Table.read(ecsv, format="ascii.ecsv")
    assert t["ra"].unit == "deg" and t["psf_flux"].unit == "nJy" and t["ra_dec_cov"].unit == "deg2"
    assert t["ra"].description == "Right ascension (ICRS)." and t["ra"].meta["ucd"] == "pos.eq.ra;meta.main"
    assert t["ra_dec_cov"].dtype == np.float32
    np.testing.assert_array_equal(np.sort(t["ra"]), np.sort(loaded["ra"].to_numpy()))

    par = tmp_path / "c.parquet"
    _out(capsys, "cone", "dia_source", 30, -5, 600, "-o", par)
    schema = pq.read_schema(par)
    md = schema.field("dec").metadata
    assert md[b"unit"] == b"deg" and md[b"ucd"] == b"pos.eq.dec;meta.main"
    assert md[b"description"] == b"Declination (ICRS)."
    assert schema.field("psf_flux_err").metadata[b"ucd"] == b"stat.error;phot.flux;arith.diff"

    # an SQL result: columns described by what every table agrees on
    _out(capsys, "sql", Q, "-o", tmp_path / "q.xml")
    f = {fl.name: fl for fl in parse_single_table(str(tmp_path / "q.xml")).fields}
    assert f["ra"].ucd == "pos.eq.ra;meta.main" and str(f["ra"].unit) == "deg"


def test_output_suffix_picks_the_format(loaded, capsys, tmp_path):
    for suffix, check in ((".csv", lambda p: pd.read_csv(p)), (".json", lambda p: pd.DataFrame(json.load(open(p)))),
                          (".jsonl", lambda p: pd.read_json(p, lines=True)), (".parquet", pd.read_parquet),
                          (".ecsv", lambda p: Table.read(p).to_pandas()),
                          (".vot", lambda p: parse_single_table(str(p)).to_table().to_pandas())):
        path = tmp_path / f"o{suffix}"
        _out(capsys, "sql", Q, "-o", path)
        assert check(path)["dia_source_id"].tolist() == [1, 2, 3, 4, 5], suffix
    # --format wins over the suffix
    _out(capsys, "sql", Q, "-o", tmp_path / "x.parquet", "--format", "csv")
    assert (tmp_path / "x.parquet").read_text().startswith("dia_source_id,ra")
    capsys.readouterr()
    assert main(["sql", Q, "-o", str(tmp_path / "x.dat")]) == 2
    err = capsys.readouterr().err
    assert "cannot tell the format" in err and "--format" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("query, names", [
    ("SELECT band, count(*) FROM dia_source GROUP BY band ORDER BY band", ["band", "count"]),
    ("SELECT count(*), avg(psf_flux), max(mjd), min(ra), sum(visit) FROM dia_source",
     ["count", "avg", "max", "min", "sum"]),
    ("SELECT count(DISTINCT band), upper(band), dia_source_id + 1, CASE WHEN ra > 30 THEN 1 END, "
     "coalesce(x, 0), dia_source_id::bigint FROM dia_source GROUP BY band, dia_source_id, ra, x",
     ["count", "upper", "?column?", "case", "coalesce", "dia_source_id"]),
    ("SELECT count(*) AS n, max(ra) AS \"max(ra)\" FROM dia_source", ["n", "max(ra)"]),
    ("SELECT ds.band, count(*) FROM dia_source ds GROUP BY ds.band UNION ALL SELECT 'x', 0", ["band", "count"]),
    ("WITH s AS (SELECT * FROM dia_source) SELECT min(mjd), count(*) OVER () FROM s GROUP BY mjd", ["min", "count"]),
])
def test_same_column_names_on_both_backends(loaded, capsys, query, names):
    """Unaliased aggregates and expressions are named as PostgreSQL names them, on DuckDB too."""
    assert _out(capsys, "sql", "--format", "csv", query).splitlines()[0].split(",") == names


def test_rubin_names(loaded, capsys):
    doc = json.loads(_out(capsys, "cone", "dia_source", 30, -5, 600, "--names", "rubin", "--format", "json",
                          "--columns", "dia_source_id,mjd,psf_flux,psf_flux_err,ra,ra_err,ra_dec_cov,band"))
    assert list(doc[0]) == ["diaSourceId", "midpointMjdTai", "psfFlux", "psfFluxErr", "ra", "raErr",
                            "ra_dec_Cov", "band", "distance_arcsec"]
    by_id = loaded.set_index("dia_source_id")
    for r in doc:  # a Rubin export renames; values are unchanged
        assert r["psfFlux"] == by_id.loc[r["diaSourceId"], "psf_flux"]
    # SQL results take the names every table agrees on
    text = _out(capsys, "sql", "--names", "rubin", "--format", "csv",
                "SELECT dia_source_id, psf_flux, healpix29 FROM dia_source")
    assert text.splitlines()[0] == "diaSourceId,psfFlux,healpix29"


def test_rubin_names_are_those_of_real_rubin_files():
    """Every Rubin name we map dia_source/dia_object columns to is a column of real Rubin data:
    an APDB DiaSource table (ap_verify_ci_hits2015) and an lsst.v7 alert's diaSource/diaObject."""
    from archive.catalog.colnames import expanded
    from archive.catalog.schema import load_schema

    apdb = next((DATA / "lsst-apdb-preloads").rglob("*.parq"))
    dia_source_names = set(pq.read_schema(apdb).names)
    alert = pq.read_schema(DATA / "rubin-alerts" / "fink-science" / "rubin_sample_data_10_0.nocutouts.parquet")
    dia_source_names &= set(alert.field("diaSource").type.names) | {"diaSourceId"}
    dia_object_names = set(alert.field("diaObject").type.names)
    rows = expanded(load_schema().bands)
    src = {n.rubin for n in rows if n.table == "dia_source" and n.rubin}
    assert src <= dia_source_names, src - dia_source_names
    obj = {n.rubin for n in rows if n.table == "dia_object" and n.rubin}
    # validityEndMjdTai, radecMjdTai and the chi2 are APDB columns an alert does not carry
    missing = obj - dia_object_names
    assert missing <= {"validityEndMjdTai", "radecMjdTai"} | {f"{b}_psfFluxChi2" for b in "ugrizyw"} \
        | {f"w_{s}" for s in ("psfFluxMean", "psfFluxMeanErr", "psfFluxSigma", "psfFluxNdata", "psfFluxMin",
                              "psfFluxMax")}, missing


def test_ztf_names_give_back_the_alert_values(repo, capsys):
    """A ZTF detection read from a real alert, exported with ZTF names, has the alert's own values."""
    avro = DATA / "ztf-avro-alert" / "data" / "2019_01_10_739260766315010006.avro"
    with open(avro, "rb") as fh:
        cand = next(fastavro.reader(fh))["candidate"]
    assert main(["ingest", "alerts", "--repo", repo, str(avro)]) == 0
    doc = json.loads(_out(capsys, "sql", "--repo", repo, "--names", "ztf", "--format", "json",
                          f"SELECT * FROM dia_source WHERE external_id = '{cand['candid']}'"))
    assert len(doc) == 1
    r = doc[0]
    assert int(r["candid"]) == cand["candid"] and r["pid"] == cand["pid"] and r["rcid"] == cand["rcid"]
    assert r["fid"] == cand["fid"] and r["isdiffpos"] == ("t" if cand["isdiffpos"] in ("t", "1") else "f")
    assert r["ra"] == cand["ra"] and r["dec"] == cand["dec"]
    assert abs(r["magpsf"] - cand["magpsf"]) < 1e-9 and abs(r["sigmapsf"] - cand["sigmapsf"]) < 1e-9
    assert abs(r["xpos"] - cand["xpos"]) < 1e-4 and abs(r["ypos"] - cand["ypos"]) < 1e-4
    # jd: ZTF's start of exposure; ours is mid-exposure TAI; the candidate's exptime is 30 s
    assert cand["exptime"] == 30.0
    assert abs(r["jd"] - cand["jd"]) * 86400 < 1e-3


def test_names_doc_is_generated():
    from archive.api import Archive

    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "column_mapping.md"
    assert doc.read_text() == Archive.column_mapping_markdown() + "\n", \
        "regenerate: archive names > docs/column_mapping.md"


def test_alert_reader_agrees_with_the_mapping():
    """The Rubin alert reader's field names (archive ingest alerts) are the mapping's, the other way round."""
    from archive.catalog.alerts import _RUBIN_MAP
    from archive.catalog.colnames import MAPPING

    ours = {n.rubin: n.column for n in MAPPING if n.table == "dia_source" and n.rubin}
    assert {k: ours.get(k) for k in _RUBIN_MAP} == _RUBIN_MAP
