"""One CLI: fast help and errors, defaults in every --help, --version, --repo anywhere,
one-line errors, missing ids alike, --columns, `archive get`, relative $ARCHIVE_REPO,
progress on a terminal."""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pandas as pd
from archive.cli.main import build_parser, main


def _archive(*args, cwd=None, env=None):
    """The command in a subprocess, exactly as a user runs it."""
    return subprocess.run([sys.executable, "-m", "archive", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


def _rows(n=6, start=1, visit=7, mjd=60000.5):
    rng = np.random.default_rng(start)
    return pd.DataFrame({
        "dia_source_id": np.arange(start, start + n, dtype=np.int64), "exposure_id": visit, "visit": visit,
        "detector": 0, "band": "r", "mjd": mjd, "ra": 30 + rng.uniform(-0.001, 0.001, n),
        "dec": -5 + rng.uniform(-0.001, 0.001, n), "psf_flux": 500.0, "psf_flux_err": 5.0, "flags": 0})


def _run(capsys, *args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- help, version, parsing -----------------------------------------------------------
def test_help_and_usage_errors_are_fast_and_light():
    """`archive --help` and a usage error return well under 0.5 s: no numpy, pandas or store loads.
    (Times are the best of 3, as the machine may be busy with other work.)"""
    code = ("import sys, time; t = time.perf_counter(); from archive.cli.main import build_parser; "
            "p = build_parser(); print(time.perf_counter() - t); "
            "print(sorted(m for m in ('numpy', 'pandas', 'pyarrow', 'duckdb', 'sqlalchemy', 'healpy', 'astropy') "
            "if m in sys.modules))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
            for _ in range(3)]
    assert all(r[1] == "[]" for r in runs)
    assert min(float(r[0]) for r in runs) < 0.2
    for args in (["--help"], ["cone", "--help"], ["cone"], ["schema", "nosuch"], ["sql", "SELECT 1"],
                 ["sql", "--repo", "/nonexistent/arc", "SELECT 1"], ["flags", "decode", "x"]):
        walls = []
        for _ in range(3):
            t0 = time.perf_counter()
            proc = _archive(*args, env={**os.environ, "ARCHIVE_REPO": ""})
            walls.append(time.perf_counter() - t0)
        assert min(walls) < 0.5, (args, walls)  # the interpreter's own start included; ~0.1 s when idle
        if args[-1] != "--help":
            assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
            assert "Traceback" not in proc.stderr


def test_version():
    from archive.version import __version__

    proc = _archive("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"archive {__version__}"


def _parsers(parser, path=("archive",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_option_with_a_default_shows_it_in_help():
    n = 0
    for path, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert "usage:" in text
        for action in parser._actions:
            if action.default in (None, False, argparse.SUPPRESS) or action.help in (None, argparse.SUPPRESS):
                continue
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            shown = parser._get_formatter()._get_help_string(action) % {"default": action.default}
            assert "default" in shown.lower(), (path, action.dest, shown)
            n += 1
    assert n >= 15
    cone = dict(_parsers(build_parser()))[("archive", "cone")].format_help()
    assert "(default: archive)" in " ".join(cone.split()) and "--names" in cone


def test_sim_help_defaults_are_simconfigs():
    """The sim options' help says the SimConfig defaults (written out: parsing must not load the simulator)."""
    import re

    from archive.cli.sim import _FIELDS
    from archive.sim import SimConfig

    sim = dict(_parsers(build_parser()))[("archive", "sim")]
    cfg = SimConfig()
    for action in sim._actions:
        if action.dest in _FIELDS:
            said = re.search(r"\(default:? ([^)]+)\)", action.help).group(1)
            want = getattr(cfg, _FIELDS[action.dest])
            want = ",".join(want) if isinstance(want, tuple) else want
            assert said == str(want) or float(said) == float(want), (action.dest, said, want)


def test_no_traceback_for_schema_mistakes():
    for args in (["schema", "nosuch"], ["schema", "docs"]):
        proc = _archive(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "unknown table" in proc.stderr and "Traceback" not in proc.stderr
    proc = _archive("schema", "dia_object", "--format", "csv")
    df = pd.read_csv(io.StringIO(proc.stdout))
    assert proc.returncode == 0 and list(df.columns) == ["name", "type", "unit", "ucd", "nullable", "description"]
    assert df.set_index("name").loc["ra", "ucd"] == "pos.eq.ra;meta.main"


def test_repo_before_or_after_the_command(repo, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ARCHIVE_REPO", raising=False)
    _rows().to_parquet(tmp_path / "a.parquet")
    assert _run(capsys, "--repo", repo, "ingest", "catalog", "dia_source", tmp_path / "a.parquet")[0] == 0
    before = _run(capsys, "--repo", repo, "cone", "dia_source", 30, -5, 60, "--format", "csv")
    after = _run(capsys, "cone", "dia_source", 30, -5, 60, "--format", "csv", "--repo", repo)
    assert before[0] == after[0] == 0 and before[1] == after[1]
    assert len(pd.read_csv(io.StringIO(before[1]))) == 6
    # given twice, the one after the command wins
    assert _run(capsys, "--repo", str(tmp_path / "nowhere"), "sql", "--repo", repo, "SELECT 1 AS one")[0] == 0


def test_relative_archive_repo_from_another_directory(tmp_path):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    assert _archive("init", "arc", cwd=home).returncode == 0
    env = {**os.environ, "ARCHIVE_REPO": "./arc"}
    assert _archive("sql", "SELECT count(*) AS n FROM exposure", cwd=home, env=env).returncode == 0
    proc = _archive("sql", "SELECT 1", cwd=elsewhere, env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    err = proc.stderr
    assert str(elsewhere / "arc") in err and "relative" in err and "absolute" in err
    assert "archive init" not in err  # never suggest creating one in the wrong place
    # an explicit path that is not there: named absolutely, with how to create it there
    proc = _archive("sql", "--repo", "nothere", "SELECT 1", cwd=elsewhere)
    assert proc.returncode == 2 and f"no archive at {elsewhere / 'nothere'}" in proc.stderr


# -- ids, columns ------------------------------------------------------------------------
def _visit(path, visit, n=4, flux=1000.0):
    rng = np.random.default_rng(0)
    pd.DataFrame({
        "dia_source_id": np.arange(n) + 100 * visit, "exposure_id": visit, "visit": visit, "detector": 0,
        "band": "r", "mjd": 60000.0 + visit, "ra": 80 + rng.uniform(0, 0.01, n),
        "dec": -30 + rng.uniform(0, 0.01, n), "psf_flux": flux + visit, "psf_flux_err": 10.0,
        "flags": 0}).to_parquet(path)
    return path


def test_missing_ids_alike_columns_and_get(repo, tmp_path, capsys):
    for v in (1, 2, 3):
        assert _run(capsys, "ingest", "dia-sources", "--repo", repo, _visit(tmp_path / f"v{v}.parquet", v))[0] == 0
    rc, out, _ = _run(capsys, "cone", "--repo", repo, "dia_object", 80.005, -29.995, 120, "--format", "json",
                      "--columns", "dia_object_id,n_dia_sources")
    objs = json.loads(out)
    assert rc == 0 and len(objs) == 4 and set(objs[0]) == {"dia_object_id", "n_dia_sources", "distance_arcsec"}
    oid = objs[0]["dia_object_id"]
    # a missing id: the same one line and exit status in object, lightcurve and get
    errs = []
    for args in (["object", 42], ["lightcurve", 42], ["get", "dia_object", 42], ["object", 42, "--history"]):
        rc, out, err = _run(capsys, *args, "--repo", repo)
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, (args, err)
        errs.append(err.split("error: ", 1)[1])
    assert len(set(errs)) == 1 and errs[0].strip() == "no dia_object with id 42"
    # --columns on object and get, in the order given
    rc, out, _ = _run(capsys, "object", "--repo", repo, oid, "--columns", "n_dia_sources,dia_object_id",
                      "--format", "csv")
    assert rc == 0 and out.splitlines() == ["n_dia_sources,dia_object_id", f"3,{oid}"]
    rc, out, _ = _run(capsys, "get", "--repo", repo, "dia_source", 100, 201, 302, "--columns", "mjd,visit",
                      "--format", "csv")
    got = pd.read_csv(io.StringIO(out))
    assert rc == 0 and list(got.columns) == ["mjd", "visit"] and sorted(got["visit"]) == [1, 2, 3]
    rc, _, err = _run(capsys, "get", "--repo", repo, "dia_source", 100, 999, 998)
    assert rc == 2 and "no dia_source with id 999, 998" in err
    rc, _, err = _run(capsys, "object", "--repo", repo, oid, "--columns", "nope")
    assert rc == 2 and "no column 'nope'" in err
    rc, _, err = _run(capsys, "get", "--repo", repo, "dia_source", "x1")
    assert rc == 2 and "'x1' is not an integer" in err


def test_as_of_and_observed_before(repo, tmp_path, capsys):
    """--as-of picks by when rows were written; --observed-before by when the sky was observed."""
    for v in (1, 2, 3):  # visits observed at MJD 60001, 60002, 60003 (fluxes 1001, 1002, 1003)
        assert _run(capsys, "ingest", "dia-sources", "--repo", repo, _visit(tmp_path / f"v{v}.parquet", v))[0] == 0
    rc, out, _ = _run(capsys, "sql", "--repo", repo, "--format", "json",
                      "SELECT dia_object_id FROM dia_object WHERE validity_end IS NULL ORDER BY dia_object_id")
    oid = json.loads(out)[0]["dia_object_id"]
    rc, out, _ = _run(capsys, "object", "--repo", repo, oid, "--observed-before", 60002.5, "--format", "json")
    obj = json.loads(out)[0]
    assert rc == 0 and obj["n_dia_sources"] == 2 and obj["r_psf_flux_max"] == 1002.0
    assert obj["first_mjd"] == 60001.0 and obj["last_mjd"] == 60002.0
    rc, out, _ = _run(capsys, "lightcurve", "--repo", repo, oid, "--observed-before", 60002.5, "--format", "json")
    assert rc == 0 and [r["mjd"] for r in json.loads(out)] == [60001.0, 60002.0]
    rc, _, err = _run(capsys, "object", "--repo", repo, oid, "--observed-before", 60000)
    assert rc == 2 and "no detection observed before MJD 60000" in err
    # the rows were written now (validity_start is the ingest time), long after 2023: nothing then
    rc, _, err = _run(capsys, "object", "--repo", repo, oid, "--as-of", 60001.5)
    assert rc == 2 and "had no version at MJD 60001.5" in err and "written, not observed" in err
    help_text = dict(_parsers(build_parser()))[("archive", "object")].format_help()
    assert "written" in help_text and "observed" in help_text


# -- progress ------------------------------------------------------------------------------
def _on_terminal(args, cwd):
    """Run the command with stderr on a pseudo-terminal; returns (exit status, what the terminal showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 lines x 100 columns
    proc = subprocess.Popen([sys.executable, "-m", "archive", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, cwd=cwd)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_progress_stages_on_a_terminal_quiet_elsewhere(tmp_path):
    repo = tmp_path / "arc"
    assert _archive("init", repo).returncode == 0
    files = []
    for k in range(3):
        files.append(tmp_path / f"f{k}.parquet")
        _rows(5, start=1 + 10 * k).to_parquet(files[-1])
    rc, shown = _on_terminal(["ingest", "catalog", "--repo", repo, "dia_source", *files], tmp_path)
    assert rc == 0, shown
    assert "[1/2] read" in shown and "3/3" in shown and "[2/2] write" in shown
    assert "wrote 15 row(s) to dia_source from 3 file(s)" in shown
    files2 = []
    for k in range(2):
        files2.append(tmp_path / f"g{k}.parquet")
        _rows(5, start=100 + 10 * k).to_parquet(files2[-1])
    proc = _archive("ingest", "catalog", "--repo", repo, "dia_source", *files2)  # stderr a pipe: no bars
    assert proc.returncode == 0
    assert proc.stderr.strip().splitlines() == [l for l in proc.stderr.strip().splitlines() if l.startswith("wrote")]
    assert len(proc.stderr.strip().splitlines()) == 1


def test_sim_stages_on_a_terminal(tmp_path):
    rc, shown = _on_terminal(["sim", tmp_path / "sim", "--epochs", "2", "--size", "64", "--seed", "3"], tmp_path)
    assert rc == 0, shown
    for stage in ("[1/3] calibration frames", "[2/3] raw frames", "[3/3] truth tables"):
        assert stage in shown, shown
    assert "2/2" in shown


# -- import archive ------------------------------------------------------------------------
def test_import_archive_reaches_regions_without_a_store():
    code = ("import sys, archive; heavy = 'pandas' in sys.modules or 'archive.sky' in sys.modules; "
            "b = archive.sky.regions.Box(10, 20, -5, 5); print(heavy, type(b).__name__, "
            "'archive.catalog.store' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "Box", "False"]


def test_from_archive_import_archive_loads_the_api_on_first_use():
    code = ("import sys, archive; light = 'archive.api' not in sys.modules; "
            "from archive import Archive; print(light, Archive.__module__, 'Archive' in dir(archive))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "archive.api", "True"]
