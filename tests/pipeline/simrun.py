"""A simulated survey registered in a new archive and run through every step: the fixture
the pipeline tests share (each with its own field and run configuration)."""

from __future__ import annotations

import pathlib

import healpy as hp

from archive.api import Archive
from archive.sim.survey import simulate_survey


def tile_centre(order: int, ra: float = 150.0, dec: float = 2.0) -> tuple[float, float]:
    """(ra, dec) in degrees of the centre of the order-``order`` HEALPix tile holding (ra, dec)."""
    pix = hp.ang2pix(1 << order, ra, dec, nest=True, lonlat=True)
    return tuple(float(v) for v in hp.pix2ang(1 << order, pix, nest=True, lonlat=True))


def register_simulation(arc: Archive, sim: pathlib.Path, products=None) -> None:
    """Register a simulation's raw and calibration frames and its reference catalog."""
    arc.ingest_images([*sorted((sim / "raw").rglob("*.fits")), *sorted((sim / "calib").rglob("*.fits"))])
    arc.ingest_refcat(sim / "refcat.parquet", products=products)


def simulate_and_run(root: pathlib.Path, sim_config, run_config: dict, jobs: int = 2):
    """Simulate ``sim_config`` into root/sim, register it in a new archive root/arc and run
    every step with ``run_config``; returns (repo, the run's reports)."""
    simulate_survey(root / "sim", sim_config)
    repo = root / "arc"
    with Archive.init(repo) as arc:
        register_simulation(arc, root / "sim")
        reports = arc.run(config=run_config, jobs=jobs, progress=False)
    return repo, reports
