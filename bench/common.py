"""Shared helpers of the catalog-store benchmarks (not part of the package).

* :func:`make_dia_sources` -- vectorised, seeded ``dia_source`` rows with every
  APDB-style column filled (so row width is realistic), positions either
  uniform over the full sky or uniform over a dense square region.
* :func:`random_positions` -- seeded cone centres drawn from the same sky area.
* Postgres helpers: a fresh database created and dropped around a benchmark.
* :class:`StageTimers` -- wraps named functions with wall-clock accumulators,
  so a store call can be broken down into stages without editing the store.

Benchmarks print their results (they are scripts, not library code).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict

import numpy as np
import pandas as pd

#: Server URL (no database) of the benchmark's PostgreSQL.
PG_SERVER = os.environ.get("ARCHIVE_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")

#: Dense-region variant: a square of this side (deg) centred at (RA, Dec) = DENSE_CENTRE.
DENSE_SIDE_DEG = 10.0
DENSE_CENTRE = (150.0, 2.0)


def sky_positions(n: int, rng: np.random.Generator, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions in degrees: ``layout`` = "fullsky" (uniform on the sphere) or
    "dense" (uniform on the sphere within a DENSE_SIDE_DEG square around DENSE_CENTRE)."""
    if layout == "fullsky":
        ra = rng.uniform(0.0, 360.0, n)
        dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    elif layout == "dense":
        ra0, dec0 = DENSE_CENTRE
        h = DENSE_SIDE_DEG / 2
        s0, s1 = np.sin(np.radians(dec0 - h)), np.sin(np.radians(dec0 + h))
        ra = (ra0 - h + rng.uniform(0.0, DENSE_SIDE_DEG, n)) % 360.0
        dec = np.degrees(np.arcsin(rng.uniform(s0, s1, n)))
    else:
        raise ValueError(f"unknown layout {layout!r} (fullsky or dense)")
    return ra, dec


def layout_area_deg2(layout: str) -> float:
    """Sky area (deg^2) the rows of ``layout`` cover."""
    if layout == "fullsky":
        return 4 * np.pi * np.degrees(1.0) ** 2
    dec0, h = DENSE_CENTRE[1], DENSE_SIDE_DEG / 2
    return float(np.radians(DENSE_SIDE_DEG) * (np.sin(np.radians(dec0 + h)) - np.sin(np.radians(dec0 - h)))
                 * np.degrees(1.0) ** 2)


def make_dia_sources(n: int, seed: int = 0, layout: str = "fullsky", start_id: int = 1) -> pd.DataFrame:
    """``n`` valid dia_source rows (every column except healpix29, which the store
    derives), vectorised and seeded.  ``external_id`` / ``external_object_id`` stay null."""
    rng = np.random.default_rng(seed)
    ra, dec = sky_positions(n, rng, layout)
    psf = rng.normal(2000.0, 800.0, n)
    err = np.abs(rng.normal(150.0, 20.0, n)) + 1.0
    pos_err = (np.abs(rng.normal(0.05, 0.01, n)) / 3600.0).astype(np.float32)
    ids = np.arange(start_id, start_id + n, dtype=np.int64)
    return pd.DataFrame({
        "dia_source_id": ids,
        "dia_object_id": (ids // 3).astype(np.int64),
        "exposure_id": rng.integers(1, 20_000, n).astype(np.int64),
        "visit": rng.integers(1, 20_000, n).astype(np.int64),
        "detector": rng.integers(0, 189, n).astype(np.int32),
        "band": rng.choice(np.array(["u", "g", "r", "i", "z", "y"]), n),
        "mjd": rng.uniform(60000.0, 61000.0, n),
        "ra": ra,
        "dec": dec,
        "ra_err": pos_err,
        "dec_err": pos_err,
        "ra_dec_cov": (pos_err * pos_err * 0.1).astype(np.float32),
        "x": rng.uniform(0, 4096, n).astype(np.float32),
        "y": rng.uniform(0, 4096, n).astype(np.float32),
        "x_err": rng.uniform(0.01, 0.3, n).astype(np.float32),
        "y_err": rng.uniform(0.01, 0.3, n).astype(np.float32),
        "psf_flux": psf,
        "psf_flux_err": err,
        "ap_flux": psf + rng.normal(0, 50.0, n),
        "ap_flux_err": err * 1.1,
        "science_flux": psf + rng.normal(5000.0, 1000.0, n),
        "science_flux_err": err * 1.3,
        "snr": (psf / err).astype(np.float32),
        "ixx": rng.uniform(2, 6, n).astype(np.float32),
        "iyy": rng.uniform(2, 6, n).astype(np.float32),
        "ixy": rng.normal(0, 0.5, n).astype(np.float32),
        "is_dipole": rng.random(n) < 0.02,
        "flags": (rng.random(n) < 0.1).astype(np.int64) * rng.integers(1, 1 << 20, n),
    })


def random_positions(n: int, seed: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Seeded cone centres drawn uniformly over the area the rows of ``layout`` cover."""
    return sky_positions(n, np.random.default_rng(seed), layout)


# -- PostgreSQL ---------------------------------------------------------------
def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def admin_connect():
    import psycopg

    return psycopg.connect(_libpq(PG_SERVER) + "/postgres", autocommit=True, connect_timeout=5)


@contextlib.contextmanager
def fresh_database(prefix: str = "archive_bench"):
    """Create an empty database, yield its SQLAlchemy URL, drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin_connect() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin_connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_connect(url: str, autocommit: bool = True):
    import psycopg

    return psycopg.connect(_libpq(url), autocommit=autocommit)


# -- timing -------------------------------------------------------------------
def percentiles_ms(seconds) -> tuple[float, float, float]:
    """(median, p95, mean) in milliseconds."""
    a = np.asarray(seconds, dtype=float) * 1e3
    return float(np.median(a)), float(np.percentile(a, 95)), float(a.mean())


class StageTimers:
    """Accumulate wall-clock time spent inside named functions.

    ``wrap("archive.catalog.store", "conform", "validate/conform")`` replaces the
    module attribute with a timing wrapper (undone by :meth:`restore`).  Nested
    stages are both counted, so report them as such.
    """

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._patched: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, label: str) -> None:
        if isinstance(owner, str):
            owner = importlib.import_module(owner)
        original = getattr(owner, attr)
        timers = self

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers.total[label] += time.perf_counter() - t0
                timers.calls[label] += 1

        self._patched.append((owner, attr, original))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched.clear()

    def reset(self) -> None:
        self.total.clear()
        self.calls.clear()

    def report(self, wall: float) -> list[tuple[str, float, float, int]]:
        """[(label, seconds, share of wall, calls)]"""
        return [(k, v, v / wall if wall else float("nan"), self.calls[k]) for k, v in self.total.items()]


def machine_line() -> str:
    """nproc, CPU model, load, date: printed with every result table."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return (f"nproc={os.cpu_count()} cpu={cpu!r} load(1m)={load[0]:.2f} python={sys.version.split()[0]} "
            f"date={time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def pg_version(url: str) -> str:
    with pg_connect(url) as con:
        return con.execute("SHOW server_version").fetchone()[0]


def git_rev() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    return "?"


def vmhwm_mb() -> float:
    """Peak resident memory of this process so far (VmHWM), MB."""
    return _proc_status_mb("VmHWM:")


def vmrss_mb() -> float:
    """Resident memory of this process now (VmRSS), MB."""
    return _proc_status_mb("VmRSS:")


def _proc_status_mb(key: str) -> float:
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return float(line.split()[1]) / 1024.0
    return float("nan")
