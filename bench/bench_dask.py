"""Dask scaling: the same simulated survey run three ways, same rows, wall time of each.

Simulates ``archive demo``'s survey once (``--size`` pixels, ``--epochs`` visits), then, each
in a fresh process on a fresh embedded archive registered from the same files, runs every
step of ``archive run``:

* ``local1``: the local executor with one job (units in the driver process),
* ``local2``: the local pool with 2 worker processes,
* ``dask2``: a ``dask.distributed`` LocalCluster of 2 worker processes, 1 thread each
  (cluster start-up timed apart from the run).

It checks that ``local2`` and ``dask2`` give the rows of ``local1`` (row counts of every
table, exposure outcomes, and the key columns of source, dia_source, dia_object and
dia_forced_source, as tests/pipeline/test_kill_resume.py does) and prints the wall time of
each run, per step, and the scaling efficiency t1 / (2 t2).  BLAS/OpenMP threads are 1 in
every mode, so one process is one core.  Exit 1 if the rows differ.

    python bench/bench_dask.py --size 1024 --epochs 6
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import git_rev, machine_line  # noqa: E402

MODES = ("local1", "local2", "dask2")
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                               "NUMEXPR_NUM_THREADS", "NUMBA_NUM_THREADS")}


def simulate(data: pathlib.Path, size: int, epochs: int, seed: int) -> None:
    from archive.demo import demo_config
    from archive.sim import simulate_survey

    simulate_survey(data, demo_config(epochs, size, seed))


def snapshot(arc) -> dict:
    """Rows that must be equal between executors (ids left out where they are assigned in
    completion order; values rounded to what the text round trip keeps)."""
    def rows(sql, nd=6):
        df = arc.sql(sql)
        return [[round(float(v), nd) if isinstance(v, float) else (None if v is None else str(v)) for v in r]
                for r in df.itertuples(index=False)]

    from archive.catalog.schema import load_schema

    out = {"counts": {t.name: int(arc.count(t.name)) for t in load_schema()}}
    out["rows exposures"] = rows("SELECT visit, status, quality_flags FROM exposure ORDER BY visit")
    out["rows source"] = rows("SELECT exposure_id, round(x, 3), round(y, 3), round(psf_flux, 2), round(ra, 8), "
                         "round(dec, 8) FROM source ORDER BY exposure_id, 2, 3")
    out["rows dia_source"] = rows("SELECT visit, round(ra, 8), round(dec, 8), round(psf_flux, 2), round(snr, 2) "
                             "FROM dia_source ORDER BY visit, 2, 3")
    out["rows dia_object"] = rows("SELECT round(ra, 8), round(dec, 8), n_dia_sources FROM dia_object "
                             "WHERE validity_end IS NULL ORDER BY 1, 2")
    out["rows dia_forced_source"] = rows("SELECT visit, count(*), round(sum(psf_flux), 1) FROM dia_forced_source "
                                    "GROUP BY visit ORDER BY visit")
    return out


def child(mode: str, work: pathlib.Path, data: pathlib.Path) -> dict:
    from archive.api import Archive
    from archive.demo import TEMPLATE_SHARE

    repo = work / mode
    with Archive.init(str(repo)) as arc:
        arc.ingest_images([*sorted((data / "raw").rglob("*.fits")), *sorted((data / "calib").rglob("*.fits"))])
        manifest = json.loads((data / "manifest.json").read_text())
        arc.ingest_refcat(data / manifest["refcat"])
        mjds = sorted(r["mjd"] for r in manifest["raws"])  # the template: the demo's first epochs
        config = {"template": {"select": {"mjd_max": float(mjds[0] + TEMPLATE_SHARE * (mjds[-1] - mjds[0]))}}}
        cluster, t_cluster, kw = None, 0.0, {"jobs": 1}
        if mode == "local2":
            kw = {"jobs": 2}
        elif mode == "dask2":
            import distributed

            t0 = time.perf_counter()
            cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                               dashboard_address=None)
            t_cluster = time.perf_counter() - t0
            kw = {"executor": "dask", "scheduler": cluster.scheduler_address}
        try:
            t0 = time.perf_counter()
            reports = arc.run(config=config, progress=False, **kw)
            wall = time.perf_counter() - t0
        finally:
            if cluster is not None:
                cluster.close()
        failed = {s: r.failed for s, r in reports.items() if r.failed}
        steps = {s: [len(r.done), round(float(r.seconds), 2)] for s, r in reports.items()}
        snap = snapshot(arc)
    return {"mode": mode, "wall": wall, "cluster_start": t_cluster, "steps": steps, "failed": failed,
            "snapshot": snap}


def first_difference(got: dict, want: dict) -> str | None:
    for key in want:
        g, w = got.get(key), want[key]
        if g == w:
            continue
        if isinstance(w, dict):
            return f"{key}: " + ", ".join(f"{k} {g.get(k)} vs {v}" for k, v in w.items() if g.get(k) != v)
        if isinstance(w, list):
            i = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            return (f"{key}: {len(g)} rows vs {len(w)}; first difference at row {i}: "
                    f"{g[i] if i < len(g) else None} vs {w[i] if i < len(w) else None}")
        return f"{key}: {g} vs {w}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "WORK", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, work, data = args.child
        print(json.dumps(child(mode, pathlib.Path(work), pathlib.Path(data))))
        return 0
    print(machine_line(), f"commit={git_rev()}")
    env = {**os.environ, **ONE_THREAD}
    with tempfile.TemporaryDirectory(prefix="bench_dask_") as tmp:
        work, data = pathlib.Path(tmp), pathlib.Path(tmp) / "data"
        t0 = time.perf_counter()
        simulate(data, args.size, args.epochs, args.seed)
        print(f"simulation {args.size}^2 x {args.epochs} visits: {time.perf_counter() - t0:.1f} s")
        res = {}
        for mode in args.modes:
            load0, cpu0 = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_CHILDREN)
            done = subprocess.run([sys.executable, __file__, "--child", mode, str(work), str(data)],
                                  capture_output=True, text=True, env=env)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            r = res[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
            print(f"{mode:7s} run {r['wall']:7.1f} s wall (cluster start {r['cluster_start']:.1f} s), "
                  f"CPU of its process tree {cpu:.0f} s (with ingest and checks), "
                  f"load(1m) {load0:.2f} before / {os.getloadavg()[0]:.2f} after; failed units: {r['failed'] or 0}")
    print(f"\n{'step':16s} " + " ".join(f"{m:>14s}" for m in res))
    for step in next(iter(res.values()))["steps"]:
        print(f"{step:16s} " + " ".join(f"{r['steps'][step][0]:4d} u {r['steps'][step][1]:7.1f} s" for r in res.values()))
    ok = True
    base = res.get("local1")
    if base:
        print("\nrows (local1): " + ", ".join(f"{t} {n}" for t, n in base["snapshot"]["counts"].items()))
        for mode, r in res.items():
            if mode == "local1":
                continue
            diff = first_difference(r["snapshot"], base["snapshot"])
            ok &= diff is None and not r["failed"]
            eff = base["wall"] / (2 * r["wall"])
            print(f"{mode}: rows {'same as local1' if diff is None else 'DIFFER: ' + diff}; speed-up "
                  f"{base['wall'] / r['wall']:.2f}, scaling efficiency t1/(2 t2) = {eff:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
