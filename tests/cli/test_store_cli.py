"""The `archive` command on both backends: init, ingest catalog, cone, sql, formats, errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from astropy.io.votable import parse_single_table
from astropy.table import Table

from archive.cli.main import main


def _rows(n=50, seed=1, start=1):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "dia_source_id": np.arange(start, start + n, dtype=np.int64),
        "exposure_id": np.full(n, 7, np.int64), "visit": np.full(n, 7, np.int64),
        "detector": np.zeros(n, np.int32), "band": rng.choice(["g", "r"], n),
        "mjd": np.full(n, 60000.5), "ra": 30 + rng.uniform(-0.01, 0.01, n),
        "dec": -5 + rng.uniform(-0.01, 0.01, n), "psf_flux": rng.normal(500, 10, n),
        "psf_flux_err": np.full(n, 5.0), "flags": np.zeros(n, np.int64)})


def run_subprocess(*args):
    """The command in a subprocess, exactly as a user runs it."""
    return subprocess.run([sys.executable, "-m", "archive", *args], capture_output=True, text=True)


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run(capsys):
    """The command in this process (an escaping exception would fail the test, so
    a user mistake reaching a traceback is caught just the same)."""
    def _run(*args):
        capsys.readouterr()
        rc = main(list(args))
        out = capsys.readouterr()
        return _Result(rc, out.out, out.err)
    return _run


def test_ingest_three_formats_then_query(repo, tmp_path, capsys):
    a, b, c = _rows(20, 1, 1), _rows(20, 2, 21), _rows(20, 3, 41)
    a.to_parquet(tmp_path / "a.parquet")
    b.to_csv(tmp_path / "b.csv", index=False)
    Table.from_pandas(c).write(tmp_path / "c.fits")
    assert main(["ingest", "catalog", "--repo", repo, "dia_source", str(tmp_path / "a.parquet"),
                 str(tmp_path / "b.csv"), str(tmp_path / "c.fits")]) == 0
    capsys.readouterr()
    assert main(["sql", "--repo", repo, "--format", "csv", "SELECT count(*) AS n FROM dia_source"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == ["n", "60"]
    assert main(["cone", "--repo", repo, "dia_source", "30", "-5", "60", "--format", "jsonl"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 60 and {"dia_source_id", "distance_arcsec"} <= set(lines[0])


def test_output_formats(repo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ARCHIVE_REPO", repo)
    _rows(5).to_parquet(tmp_path / "a.parquet")
    assert main(["ingest", "catalog", "dia_source", str(tmp_path / "a.parquet")]) == 0
    q = "SELECT dia_source_id, ra, band FROM dia_source ORDER BY dia_source_id"
    assert main(["sql", q]) == 0
    out = capsys.readouterr().out
    assert "dia_source_id" in out and len(out.strip().splitlines()) == 6
    assert main(["sql", "--format", "parquet", "-o", str(tmp_path / "o.parquet"), q]) == 0
    assert pq.read_table(tmp_path / "o.parquet").column("dia_source_id").to_pylist() == [1, 2, 3, 4, 5]
    assert main(["sql", "--format", "votable", "-o", str(tmp_path / "o.xml"), q]) == 0
    vt = parse_single_table(str(tmp_path / "o.xml")).to_table()
    assert list(vt["dia_source_id"]) == [1, 2, 3, 4, 5]
    assert main(["cone", "dia_source", "30", "-5", "3600", "--columns", "dia_source_id,band",
                 "--format", "csv"]) == 0
    df = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(df.columns) == ["dia_source_id", "band", "distance_arcsec"] and len(df) == 5


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.assign(mag=1.0), "unknown column 'mag'"),
    (lambda d: d.drop(columns=["mjd"]), "missing required column 'mjd'"),
    (lambda d: d.assign(ra=d["ra"] + 400), r"ra outside \[0, 360\)"),
    (lambda d: d.assign(dec=np.where(d.index == 2, np.nan, d["dec"])), "NaN or missing ra/dec at row 2"),
    (lambda d: d.assign(exposure_id="abc"), "column 'exposure_id' has type"),
])
def test_bad_files_one_line_error_nothing_written(run, repo, tmp_path, mutate, message):
    good = tmp_path / "good.csv"
    _rows(10, start=100).to_csv(good, index=False)
    bad = tmp_path / "bad.csv"
    mutate(_rows(10)).to_csv(bad, index=False)
    proc = run("ingest", "catalog", "--repo", repo, "dia_source", str(good), str(bad))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "bad.csv" in err
    import re

    assert re.search(message, err), err
    assert run("sql", "--repo", repo, "--format", "csv", "SELECT count(*) AS n FROM dia_source").stdout.split() == ["n", "0"]


def test_user_mistakes_are_one_line(run, repo, tmp_path):
    cases = [
        (["ingest", "catalog", "--repo", repo, "dia_source", str(tmp_path / "missing.csv")], "no such file"),
        (["ingest", "catalog", "--repo", repo, "nope", str(tmp_path / "x.csv")], "unknown table 'nope'"),
        (["sql", "--repo", repo, "DROP TABLE dia_source"], "read-only"),
        (["sql", "--repo", repo, "SELECT nothing FROM dia_source"], "SQL error"),
        (["cone", "--repo", repo, "dia_source", "10", "95", "1"], "dec"),
        (["cone", "--repo", repo, "dia_source", "10", "5", "1", "--columns", "zz"], "no column 'zz'"),
    ]
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    cases.append((["ingest", "catalog", "--repo", repo, "dia_source", str(tmp_path / "corrupt.parquet")],
                  "cannot read as parquet"))
    for args, needle in cases:
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert needle in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_no_repo_and_bad_url(run, monkeypatch, tmp_path):
    monkeypatch.delenv("ARCHIVE_REPO", raising=False)
    proc = run_subprocess("sql", "SELECT 1")
    assert proc.returncode == 2 and "ARCHIVE_REPO" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("sql", "SELECT 1")
    assert proc.returncode == 2 and "ARCHIVE_REPO" in proc.stderr
    proc = run("sql", "--repo", str(tmp_path / "nowhere"), "SELECT 1")
    assert proc.returncode == 2 and "no archive at" in proc.stderr
    proc = run("sql", "--repo", "postgresql+psycopg://postgres@127.0.0.1:1/none", "SELECT 1")
    assert proc.returncode == 2 and "cannot connect" in proc.stderr


def test_db_upgrade(run, pg_url, tmp_path):
    proc = run_subprocess("db", "upgrade", "--repo", pg_url)
    assert proc.returncode == 0, proc.stderr
    assert "revision" in proc.stdout
    proc = run("db", "upgrade", "--repo", str(tmp_path))
    assert proc.returncode == 2 and "needs a PostgreSQL URL" in proc.stderr


def test_schema_command(capsys):
    assert main(["schema", "dia_object"]) == 0
    assert "g_psf_flux_mean" in capsys.readouterr().out


def test_read_only_role(run, pg_store_url):
    import uuid

    role = f"reader_{uuid.uuid4().hex[:8]}"
    assert run("db", "grant-read-only", "--repo", pg_store_url, role).returncode == 0
    ro_url = pg_store_url.replace("postgres@", f"{role}@")
    engine = sa.create_engine(ro_url)
    try:
        with engine.connect() as con:
            assert con.execute(sa.text("SELECT count(*) FROM dia_source")).scalar() >= 0
            with pytest.raises(sa.exc.DBAPIError, match="read-only transaction|permission denied"):
                con.execute(sa.text("DELETE FROM dia_source"))
        proc = run("sql", "--repo", ro_url, "--format", "csv", "SELECT count(*) AS n FROM dia_object")
        assert proc.returncode == 0 and proc.stdout.startswith("n")
    finally:
        engine.dispose()
        admin = sa.create_engine(pg_store_url)
        with admin.begin() as con:
            con.execute(sa.text(f'DROP OWNED BY "{role}"'))
            con.execute(sa.text(f'DROP ROLE "{role}"'))
        admin.dispose()
    assert run("db", "grant-read-only", "--repo", pg_store_url, "Bad-Name").returncode == 2
