"""`archive run` killed with SIGKILL at random moments, then run again, ends exactly where an
uninterrupted run ends: same rows, same exposure ids and outcomes, same product files and
checksums, and every registered file whole.  Also on Postgres, and on a Dask cluster."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from archive.api import Archive
from archive.pipeline.products import sha256_file
from archive.sim.config import SimConfig
from archive.sim.survey import simulate_survey
from simrun import register_simulation

TABLES = ("input_file", "exposure", "image_product", "provenance", "source", "matched_source", "pipeline_unit",
          "dia_source", "dia_object", "dia_forced_source")


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """Six small epochs (one of them cloudy: rejected by the epoch comparison)."""
    root = tmp_path_factory.mktemp("killsim")
    simulate_survey(root, SimConfig(seed=5, n_epochs=6, size=512, star_density=80, streak_epochs=(),
                                    n_bias=2, n_dark=2, n_flat=2))
    return root


@pytest.fixture(scope="module")
def reference(survey, tmp_path_factory):
    """The snapshot of one uninterrupted `archive run` (one job)."""
    root = tmp_path_factory.mktemp("killref")
    repo, products = str(root / "arc"), root / "products"
    Archive.init(repo).close()
    _register(repo, survey, products)
    # the same command the interrupted runs use, so both compute in the same kind of process
    done = subprocess.run(_run_cmd(repo, products), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return snapshot(repo, products)


def _register(repo: str, survey: pathlib.Path, products: pathlib.Path) -> None:
    with Archive.open(repo) as arc:
        register_simulation(arc, survey, products)


def snapshot(repo: str, products: pathlib.Path) -> dict:
    """What must be equal between runs: rows, outcomes, files (checksums verified on disk)."""
    with Archive.open(repo) as arc:
        out = {t: arc.count(t) for t in TABLES}
        out["exposures"] = arc.sql("SELECT exposure_id, status, quality_flags FROM exposure ORDER BY exposure_id") \
            .to_dict("records")
        prods = arc.sql("SELECT kind, exposure_id, path, sha256, size_bytes FROM image_product "
                        "ORDER BY kind, path")
        for p in prods.itertuples():  # a registered file is whole: its checksum is that of the file
            assert sha256_file(products / p.path) == p.sha256, p.path
            assert not pathlib.Path(p.path).name.startswith(".")
        out["products"] = [{**r, "exposure_id": None if pd.isna(r["exposure_id"]) else int(r["exposure_id"])}
                           for r in prods.to_dict("records")]
        units = arc.sql("SELECT step, unit_key, status, inputs_hash, config_hash FROM pipeline_unit "
                        "ORDER BY step, unit_key")
        out["units"] = units.to_dict("records")
        src = arc.sql("SELECT exposure_id, x, y, psf_flux, ra, dec FROM source ORDER BY exposure_id, y, x")
        # x, y are float32 columns: compared as float32 (Postgres hands them back as shortest text)
        out["sources"] = [(int(e), float(np.float32(x)), float(np.float32(y)), round(float(f), 3),
                           round(float(r), 9), round(float(d), 9))
                          for e, x, y, f, r, d in src.itertuples(index=False)]
        ms = arc.sql("SELECT n_epochs, count(*) AS n FROM matched_source GROUP BY n_epochs ORDER BY n_epochs")
        out["matched"] = ms.to_dict("records")
    return out


def assert_same(got: dict, want: dict, where: str) -> None:
    """Equal snapshots, or an error naming the first differing row of the first differing part."""
    for key in want:
        g, w = got[key], want[key]
        if g == w:
            continue
        if isinstance(w, list) and isinstance(g, list):
            i = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            raise AssertionError(f"{where}: {key} differ at row {i} of {len(g)} (want {len(w)}): "
                                 f"got {g[i] if i < len(g) else None} want {w[i] if i < len(w) else None}")
        raise AssertionError(f"{where}: {key}: got {g} want {w}")


def _run_cmd(repo: str, products: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "archive", "run", "--repo", repo, "--products", str(products), "--jobs", "1",
            *extra]


def _kill_and_resume(repo: str, products: pathlib.Path, kills: int, seed: int) -> int:
    """Start ``archive run`` and SIGKILL it (and any worker) at a random moment (start-up
    takes ~2 s of imports, so the moments fall from the start-up into the first units),
    until it was killed ``kills`` times or finished; then let a last run finish.  Returns
    how many runs were killed."""
    rng = np.random.default_rng(seed)
    killed = 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for _ in range(3 * kills):
        if killed == kills:
            break
        proc = subprocess.Popen(_run_cmd(repo, products), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env=env)
        try:
            proc.wait(timeout=float(rng.uniform(1.0, 7.0)))
            break  # it finished: nothing left to interrupt
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed += 1
    done = subprocess.run(_run_cmd(repo, products), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return killed


def test_parquet_kill_at_random_moments_then_resume(survey, reference, tmp_path):
    """Rounds on a fresh archive until 10 runs were killed: in each, runs are killed at
    random moments until one finishes, and the final state must equal the reference."""
    want = reference
    assert want["exposure"] == 6 and want["source"] > 100
    assert sum(e["status"] == "rejected" for e in want["exposures"]) >= 1
    killed, rounds = 0, 0
    while killed < 10:
        rounds += 1
        assert rounds <= 5, f"only {killed} kills in {rounds - 1} rounds"
        repo, products = str(tmp_path / f"arc{rounds}"), tmp_path / f"products{rounds}"
        Archive.init(repo).close()
        _register(repo, survey, products)
        killed += _kill_and_resume(repo, products, kills=10 - killed, seed=7 + rounds)
        # product paths are relative to each run's product directory
        assert_same(snapshot(repo, products), want, f"round {rounds}")


@pytest.mark.postgres
def test_postgres_kill_then_resume(survey, reference, tmp_path, pg_store_url):
    import sqlalchemy as sa

    from archive.catalog.schema import load_schema

    want, pg_url = reference, pg_store_url
    engine = sa.create_engine(pg_url)
    with engine.begin() as con:
        con.execute(sa.text("TRUNCATE " + ", ".join(t.name for t in load_schema())))
    engine.dispose()
    products = tmp_path / "products"
    _register(pg_url, survey, products)
    assert _kill_and_resume(pg_url, products, kills=3, seed=11) == 3
    assert_same(snapshot(pg_url, products), want, "postgres")


def test_dask_cluster_gives_the_rows_of_the_local_pool(survey, reference, tmp_path):
    import distributed

    want = reference
    repo, products = str(tmp_path / "arc"), tmp_path / "products"
    Archive.init(repo).close()
    _register(repo, survey, products)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with Archive.open(repo) as arc:
            reports = arc.run(products=products, executor="dask", scheduler=cluster.scheduler_address,
                              progress=False)
    assert not any(r.failed for r in reports.values())
    assert_same(snapshot(repo, products), want, "dask")
