"""DIA commands end to end on both backends: ingest dia-sources/alerts/forced, lightcurve, object."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd

from archive.cli.main import main


def _visit_file(path, visit, n=10, flux=1000.0):
    rng = np.random.default_rng(0)
    ra = 80 + rng.uniform(0, 0.01, n)
    dec = -30 + rng.uniform(0, 0.01, n)
    pd.DataFrame({
        "dia_source_id": np.arange(n) + 100 * visit, "exposure_id": visit, "visit": visit, "detector": 0,
        "band": "r", "mjd": 60000.0 + visit, "ra": ra, "dec": dec, "psf_flux": flux + visit,
        "psf_flux_err": 10.0, "flags": 0}).to_parquet(path)
    return str(path)


def test_dia_workflow(repo, tmp_path, capsys):
    f1 = _visit_file(tmp_path / "v1.parquet", 1)
    f2 = _visit_file(tmp_path / "v2.parquet", 2)
    assert main(["ingest", "dia-sources", "--repo", repo, f1]) == 0
    assert "10 new DIAObject(s)" in capsys.readouterr().err
    assert main(["ingest", "dia-sources", "--repo", repo, f2]) == 0
    assert "0 new DIAObject(s), 10 updated" in capsys.readouterr().err
    # re-ingest: refused with a clear line, then replaced
    assert main(["ingest", "dia-sources", "--repo", repo, f2]) == 2
    assert "already ingested" in capsys.readouterr().err
    f2b = _visit_file(tmp_path / "v2b.parquet", 2, flux=5000.0)
    assert main(["ingest", "dia-sources", "--repo", repo, "--replace", f2b]) == 0
    assert "10 replaced" in capsys.readouterr().err
    assert main(["cone", "--repo", repo, "dia_object", "80.005", "-29.995", "60", "--format", "json",
                 "--columns", "dia_object_id,n_dia_sources,r_psf_flux_max"]) == 0
    objs = json.loads(capsys.readouterr().out)  # one JSON document
    assert len(objs) == 10 and all(o["n_dia_sources"] == 2 for o in objs)
    assert all(o["r_psf_flux_max"] == 5002.0 for o in objs)
    oid = objs[0]["dia_object_id"]
    # history: three versions (visit 1, visit 2, the replacement)
    assert main(["object", "--repo", repo, str(oid), "--history", "--format", "csv"]) == 0
    hist = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(hist) == 3 and hist["validity_end"].isna().sum() == 1
    t_mid = float(hist["validity_start"].iloc[1])
    assert main(["object", "--repo", repo, str(oid), "--as-of", str(t_mid), "--format", "csv"]) == 0
    assert pd.read_csv(io.StringIO(capsys.readouterr().out))["r_psf_flux_max"].iloc[0] == 1002.0
    # light curve, with a plot
    png = tmp_path / "lc.png"
    assert main(["lightcurve", "--repo", repo, str(oid), "--plot", str(png), "--format", "csv"]) == 0
    lc = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert lc["mjd"].tolist() == [60001.0, 60002.0] and set(lc["kind"]) == {"detection"}
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["lightcurve", "--repo", repo, "42"]) == 2
    assert "no dia_object with id 42" in capsys.readouterr().err


def test_ingest_alerts_real_packets(repo, data_dir, capsys):
    files = sorted(str(p) for p in (data_dir / "real" / "fink" / "fink-client" / "datatest").glob("*.avro"))
    assert files
    # ZTF groups its detections within 1.5 arcsec; use the same radius to compare
    assert main(["ingest", "alerts", "--repo", repo, "--radius", "1.5", *files]) == 0
    first = capsys.readouterr().err
    assert "DIASource(s)" in first
    # the same packets again: every detection is already known, nothing is counted twice
    n1 = main(["sql", "--repo", repo, "--format", "csv", "SELECT count(*) AS n FROM dia_source"])
    out1 = capsys.readouterr().out
    assert main(["ingest", "alerts", "--repo", repo, "--radius", "1.5", *files]) == 0
    assert "associated 0 DIASource(s)" in capsys.readouterr().err
    assert main(["sql", "--repo", repo, "--format", "csv", "SELECT count(*) AS n FROM dia_source"]) == n1
    assert capsys.readouterr().out == out1
    # objects we form vs ZTF's objectId: every ZTF object maps to one of ours
    # (an object takes one source per visit, so a ZTF object with two detections in
    # one visit is necessarily split; all the others must agree exactly)
    assert main(["sql", "--repo", repo, "--format", "csv",
                 "SELECT external_object_id, count(DISTINCT dia_object_id) AS k, count(*) AS n, "
                 "count(DISTINCT visit) AS nv FROM dia_source GROUP BY external_object_id"]) == 0
    per = pd.read_csv(io.StringIO(capsys.readouterr().out))
    one_per_visit = per["n"] == per["nv"]
    assert one_per_visit.sum() >= 10
    assert (per.loc[one_per_visit, "k"] == 1).all(), per
    assert (per.loc[~one_per_visit, "k"] <= per.loc[~one_per_visit, "n"] - per.loc[~one_per_visit, "nv"] + 1).all()
