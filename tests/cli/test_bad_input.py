"""Bad input files: one line on stderr, exit status 2, nothing written, on both backends.

The files are written here the way a user or another pipeline might produce
them by mistake: Latin-1 CSV headers, empty or garbage FITS, truncated FITS
and tar.gz, header-only CSV, values that overflow, batches whose files
disagree on a column's type.  Also a corrupt Parquet manifest, and its recovery.
"""

from __future__ import annotations

import gzip
import io
import pathlib
import tarfile

import numpy as np
import pandas as pd
import pytest
from astropy.table import Table

from archive.api import Archive
from archive.cli.main import main


def _rows(n=3, start=1):
    return pd.DataFrame({
        "dia_source_id": np.arange(start, start + n, dtype=np.int64), "exposure_id": 7, "visit": 7,
        "detector": 0, "band": "g", "mjd": 60000.5, "ra": 30.0 + 0.001 * np.arange(n), "dec": -5.0,
        "psf_flux": 500.0, "psf_flux_err": 5.0, "flags": 0})


def _bad_files(d: pathlib.Path) -> dict[str, tuple[list[pathlib.Path], str]]:
    """name -> (files of one command, a word the error must contain)."""
    out = {}
    latin = d / "latin.csv"
    latin.write_bytes(",".join(_rows().columns).encode() + ",caf\xe9\n".encode("latin-1")
                      + b"1,7,7,0,g,60000.5,30,-5,500,5,0,1\n")
    out["latin-1 header"] = ([latin], "UTF-8")
    (d / "empty.fits").write_bytes(b"")
    out["empty fits"] = ([d / "empty.fits"], "empty")
    (d / "garbage.fits").write_bytes(b"hello world " * 300)
    out["garbage fits"] = ([d / "garbage.fits"], "fits")
    Table.from_pandas(_rows(200)).write(d / "good.fits")
    data = (d / "good.fits").read_bytes()
    (d / "trunc.fits").write_bytes(data[: len(data) - 2880])
    out["truncated fits"] = ([d / "trunc.fits"], "truncated")
    (d / "image.fits").write_bytes(_image_only_fits())
    out["fits without a table"] = ([d / "image.fits"], "no table")
    _rows().head(0).to_csv(d / "header.csv", index=False)
    out["header-only csv"] = ([d / "header.csv"], "no rows")
    for name, col, value in [("snr", "snr", 1e300), ("x", "x", 3.4e39), ("mjd", "mjd", np.inf),
                             ("flux", "psf_flux", 1e308), ("neginf", "psf_flux_err", -np.inf)]:
        df = _rows()
        df[col] = value
        df.loc[1, col] = 1.0
        df.to_csv(d / f"{name}.csv", index=False)
        out[f"{col}={value}"] = ([d / f"{name}.csv"], col)
    a = _rows()
    a.to_csv(d / "a.csv", index=False)
    b = _rows(start=10)
    b["band"] = [1, 2, 3]
    b.to_parquet(d / "b.parquet")
    out["types differ across files"] = ([d / "a.csv", d / "b.parquet"], "b.parquet")
    c = _rows(start=20)
    c["psf_flux"] = ["a", "b", "c"]
    c.to_parquet(d / "c.parquet")
    out["string fluxes"] = ([d / "a.csv", d / "c.parquet"], "c.parquet")
    return out


def _image_only_fits() -> bytes:
    from astropy.io import fits

    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(np.zeros((4, 4)))]).writeto(buf)
    return buf.getvalue()


def _bad_alert_files(d: pathlib.Path) -> dict[str, pathlib.Path]:
    (d / "empty.tar.gz").write_bytes(b"")
    (d / "junk.tar.gz").write_bytes(gzip.compress(b"x" * 5000)[:100])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        payload = b"Obj\x01" + bytes(range(256)) * 40
        info = tarfile.TarInfo("a.avro")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    (d / "trunc.tar.gz").write_bytes(data[: len(data) // 2])
    return {"empty": d / "empty.tar.gz", "junk": d / "junk.tar.gz", "truncated": d / "trunc.tar.gz"}


def _counts(repo) -> dict[str, int]:
    with Archive.open(repo) as arc:
        return {t: arc.store.count(t) for t in ("dia_source", "dia_object", "dia_forced_source", "source")}


def _one_line_error(run, *args) -> str:
    rc, out, err = run(*args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (args, rc, err)
    return lines[0]


@pytest.fixture
def run(capsys):
    def _run(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return rc, out.out, out.err
    return _run


def test_bad_catalog_files_refused(repo, tmp_path, run):
    bad = _bad_files(tmp_path)
    before = _counts(repo)
    for name, (files, word) in bad.items():
        for command in (["ingest", "catalog", "--repo", repo, "dia_source"],
                        ["ingest", "dia-sources", "--repo", repo]):
            line = _one_line_error(run, *command, *files)
            assert word.lower() in line.lower(), (name, command[1], line)
            assert str(files[-1].name) in line or str(files[0].name) in line, (name, line)
    assert _counts(repo) == before
    # row and column named for overflowing values
    line = _one_line_error(run, "ingest", "catalog", "--repo", repo, "dia_source", tmp_path / "snr.csv")
    assert "'snr'" in line and "rows 0, 2" in line
    # the good files of those batches still go in
    rc, _, err = run("ingest", "catalog", "--repo", repo, "dia_source", tmp_path / "a.csv")
    assert rc == 0, err
    assert _counts(repo)["dia_source"] == before["dia_source"] + 3


def test_nan_is_missing_not_a_value(repo, tmp_path, run):
    df = _rows()
    df["snr"] = [np.nan, 5.0, np.nan]
    df.to_parquet(tmp_path / "nan.parquet")
    rc, _, err = run("ingest", "catalog", "--repo", repo, "dia_source", tmp_path / "nan.parquet")
    assert rc == 0, err
    rc, out, err = run("sql", "--repo", repo, "--format", "csv",
                       "SELECT count(*) AS n FROM dia_source WHERE snr IS NULL")
    assert rc == 0 and out.splitlines()[1] == "2"
    df["ra"] = [np.nan, 30.0, 30.1]
    df["dia_source_id"] += 100
    df.to_parquet(tmp_path / "nanpos.parquet")
    assert "ra/dec" in _one_line_error(run, "ingest", "catalog", "--repo", repo, "dia_source",
                                       tmp_path / "nanpos.parquet")


def test_bad_alert_files_refused(repo, tmp_path, run):
    before = _counts(repo)
    for name, path in _bad_alert_files(tmp_path).items():
        line = _one_line_error(run, "ingest", "alerts", "--repo", repo, path)
        assert path.name in line, (name, line)
    assert _counts(repo) == before


def test_corrupt_manifest_explains_and_recovers(tmp_path, run):
    repo = tmp_path / "arc"
    assert run("init", repo)[0] == 0
    _rows().to_csv(tmp_path / "a.csv", index=False)
    _rows(start=10).to_csv(tmp_path / "b.csv", index=False)
    assert run("ingest", "catalog", "--repo", repo, "dia_source", tmp_path / "a.csv")[0] == 0
    assert run("ingest", "catalog", "--repo", repo, "dia_source", tmp_path / "b.csv")[0] == 0
    manifest = repo / "manifest.json"
    for garbage in (b"x\n", b"", b'{"format": "something else"}', manifest.read_bytes()[:50], b"\xff\xfe"):
        manifest.write_bytes(garbage)
        line = _one_line_error(run, "cone", "--repo", repo, "dia_source", 30.0, -5.0, 60)
        assert "manifest.json" in line and "archive recover" in line, line
        rc, _, err = run("recover", "--repo", repo)
        assert rc == 0, err
        rc, out, _ = run("sql", "--repo", repo, "--format", "csv", "SELECT count(*) AS n FROM dia_source")
        assert rc == 0 and out.splitlines()[1] == "6"
    manifest.unlink()
    assert "archive recover" in _one_line_error(run, "cone", "--repo", repo, "dia_source", 30.0, -5.0, 60)
    assert run("recover", "--repo", repo)[0] == 0
    # a backup whose files are gone is passed over; none intact: a clear error
    for backup in (repo / "_manifests").glob("*.json"):
        backup.write_bytes(b"{}")
    manifest.write_bytes(b"{")
    assert "no intact manifest" in _one_line_error(run, "recover", "--repo", repo)
