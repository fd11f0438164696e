"""`archive demo`: a small simulated survey through the whole chain, scored against its truth.

Simulates a field (stars, galaxies, variable stars, transients, a moving object,
cosmic rays, a satellite streak, one cloudy and one out-of-focus epoch), registers
the raw frames and the reference catalog in a new archive (the embedded Parquet
store, or a Postgres database), runs every step of ``archive run`` (calexps ->
epoch comparison -> astrometry -> sources -> warps -> coadds -> templates from the
first epochs -> differences -> DIASources and DIAObjects -> forced photometry)
and scores what the differences found against the simulator's truth
(:mod:`archive.demo_truth`). The command line prints the report and draws light
curves; this module holds no printing.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import pandas as pd

from archive.api import Archive
from archive.errors import ArchiveError

#: The share of the survey's time span whose epochs make the template (the rest are "new").
TEMPLATE_SHARE = 0.35


@dataclasses.dataclass
class DemoReport:
    """What ``run_demo`` made and measured.

    ``directory``: the demo's folder (``data/``: the simulation and its truth);
    ``repo``: the archive (a directory or Postgres URL); ``products``: image products;
    ``exposures``: one row per exposure (visit, band, mjd, status, quality reason, seeing,
    zero point, limiting magnitude); ``steps``: per step units done / failed and seconds;
    ``counts``: rows per table; ``score``: :class:`archive.sim.scoring.ChangeScore`;
    ``changes``: the expected changes with ``found``; ``examples``: DIAObject id -> what the
    truth says it is (kind and simulated object id), for light curves; ``field``: (ra, dec,
    radius_arcsec) of the field; ``seconds``: simulation and run wall times.
    """

    directory: pathlib.Path
    repo: str
    products: pathlib.Path
    exposures: pd.DataFrame
    steps: pd.DataFrame
    counts: dict
    score: object
    changes: pd.DataFrame
    examples: dict
    field: tuple[float, float, float]
    seconds: dict


def demo_config(epochs: int, size: int, seed: int):
    """The simulation of the demo: ``epochs`` visits of one ``size``-pixel detector in r."""
    from archive.sim.config import SimConfig

    if epochs < 5:
        raise ArchiveError(f"demo: --epochs {epochs}: at least 5 visits are needed (template epochs, one bad "
                           "epoch of each kind, and new epochs to difference)")
    if not 256 <= size <= 4096:
        raise ArchiveError(f"demo: --size {size}: use 256 to 4096 pixels")
    # as many stars as on the default 1024-px field, so that a small field still calibrates
    return SimConfig(seed=seed, n_epochs=epochs, size=size, star_density=12.0 * max(1.0, (1024 / size) ** 2))


def run_demo(directory, repo: str | None = None, epochs: int = 10, size: int = 1024, seed: int = 1,
             jobs: int | None = None, simulate=None, progress: bool | None = None,
             method: str = "alard_lupton") -> DemoReport:
    """Simulate into ``directory``/data, run the whole chain into a new archive, score it.

    ``repo``: a Postgres URL (its database must hold no exposure yet) or None for an
    embedded archive in ``directory``/archive (image products in its ``products`` folder); the
    image products of a Postgres archive go to ``directory``/products.
    ``simulate(outdir, config)``: the simulation function (default
    :func:`archive.sim.simulate_survey`; the command line passes one with a progress bar).
    ``jobs``: worker processes (default: the number of cores).  ``method``: the difference
    imaging, ``"alard_lupton"`` or ``"zogy"``.
    """
    from archive.demo_truth import score_archive

    out = pathlib.Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArchiveError(f"{out} exists and is not an empty directory; choose a new directory")
    if method not in ("alard_lupton", "zogy"):
        raise ArchiveError(f"demo: method {method!r}: use alard_lupton or zogy")
    cfg = demo_config(epochs, size, seed)
    if repo is not None and "://" not in str(repo):
        raise ArchiveError(f"demo: --repo {repo!r}: give a PostgreSQL URL (the embedded archive goes in DIR)")
    jobs = max(1, int(jobs or os.cpu_count() or 1))
    location = str(repo) if repo is not None else str(out / "archive")
    if repo is not None:  # before anything is written
        with Archive.init(location) as arc:
            if arc.count("exposure"):
                raise ArchiveError(f"demo: the database at --repo already holds {arc.count('exposure')} "
                                   "exposures; give an empty database")
    if simulate is None:
        from archive.sim import simulate_survey as simulate
    t0 = time.perf_counter()
    data = out / "data"
    manifest = simulate(data, cfg)
    t_sim = time.perf_counter() - t0
    products = out / "products" if repo is not None else None  # embedded: the archive's own folder
    with Archive.init(location) as arc:
        raws = sorted((data / "raw").rglob("*.fits"))
        arc.ingest_images([*raws, *sorted((data / "calib").rglob("*.fits"))])
        arc.ingest_refcat(data / manifest["refcat"], products=products)
        mjds = sorted(r["mjd"] for r in manifest["raws"])
        # the template: the first epochs only, so that what happens later is a change
        mjd_max = mjds[0] + TEMPLATE_SHARE * (mjds[-1] - mjds[0])
        config = {"template": {"select": {"mjd_max": float(mjd_max)}}, "difference": {"method": method}}
        t1 = time.perf_counter()
        reports = arc.run(config=config, products=products, jobs=jobs, progress=progress)
        t_run = time.perf_counter() - t1
        steps = pd.DataFrame([{"step": name, "done": len(r.done), "skipped": len(r.skipped),
                               "failed": len(r.failed), "seconds": round(float(r.seconds), 1)}
                              for name, r in reports.items()])
        failed = {name: r.failed for name, r in reports.items() if r.failed}
        if failed:
            raise ArchiveError("demo: units failed: " + "; ".join(f"{s}: {f}" for s, f in failed.items()))
        exposures = arc.sql("SELECT visit, band, mjd_mid, status, quality_reason, seeing, zero_point, lim_mag "
                            "FROM exposure ORDER BY visit")
        counts = {t: arc.count(t) for t in ("exposure", "source", "image_product", "dia_source",
                                            "dia_forced_source")}
        counts["diff"] = int(arc.sql("SELECT count(*) AS n FROM image_product WHERE kind = 'diff'").iloc[0, 0])
        counts["dia_object"] = int(arc.sql("SELECT count(*) AS n FROM dia_object WHERE validity_end IS NULL")
                                   .iloc[0, 0])
        score, changes = score_archive(arc, data, products=products)
        examples = _examples(arc, changes)
        field = (float(arc.sql("SELECT avg(ra) AS a FROM exposure").iloc[0, 0]),
                 float(arc.sql("SELECT avg(dec) AS d FROM exposure").iloc[0, 0]),
                 round(0.5 * cfg.nx * cfg.pixel_scale, 1))
        products = arc.products_root(products)
    return DemoReport(out, location, products, exposures, steps, counts, score, changes, examples, field,
                      {"simulation": round(t_sim, 1), "run": round(t_run, 1)})


def _examples(arc, changes: pd.DataFrame, per_kind: int = 1) -> dict:
    """DIAObjects whose DIASources match simulated changes: the one with most matches of each
    kind (transient, variable, moving): {dia_object_id: (kind, simulated object id)}."""
    from archive.sim.scoring import match_to_changes

    dia = arc.sql("SELECT dia_object_id, visit, ra, dec FROM dia_source")
    if dia.empty:
        return {}
    _, d = match_to_changes(dia, changes)
    d = d[d["real"]]
    kinds = changes.drop_duplicates("object_id").set_index("object_id")["kind"]
    d = d.assign(kind=d["object_id"].map(kinds))
    out = {}
    for kind in ("transient", "variable", "moving"):
        g = d[d["kind"] == kind].groupby(["dia_object_id", "object_id"]).size().sort_values(ascending=False)
        for (oid, sim_id), _n in g.head(per_kind).items():
            out[int(oid)] = (kind, int(sim_id))
    return out

