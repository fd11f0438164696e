"""Pipeline commands: ingest images / refcat, run, status."""

from __future__ import annotations

import os
import sys

from archive.api import Archive
from archive.cli.common import comma_list, expand_paths, int_list, note, repo_option
from archive.cli.output import add_format_options, emit
from archive.cli.progress import Stages


def cmd_ingest_images(args) -> int:
    with Archive.open(args.repo) as arc, Stages(["read and register"]) as st:
        with st.stage("read and register"):
            rep = arc.ingest_images(expand_paths(args.files))
    note(f"registered {len(rep.registered)} file(s): {rep.science} science, {rep.calibration} calibration; "
         f"{len(rep.duplicates)} already registered (same contents), skipped; {st.seconds:.1f} s")
    for path, twin in sorted(rep.duplicates.items()):
        print(f"  already registered: {path}" + (f" (same contents as {twin})" if twin != path else ""),
              file=sys.stderr)
    return 0


def cmd_ingest_refcat(args) -> int:
    with Archive.open(args.repo) as arc:
        path = arc.ingest_refcat(args.file, products=args.products)
    note(f"reference catalog registered as {path}")
    return 0


def _config(args) -> dict | None:
    return Archive.read_run_config(args.config) if args.config else None


def cmd_run(args) -> int:
    with Archive.open(args.repo) as arc:
        reports = arc.run(until=args.until, visits=args.visits, bands=args.bands, config=_config(args),
                          products=args.products, jobs=args.jobs, executor=args.executor,
                          scheduler=args.scheduler, retry_failed=args.retry_failed)
    failed = done = skipped = 0
    seconds = 0.0
    for name, rep in reports.items():
        print(f"{name}: {len(rep.done)} done, {len(rep.skipped)} up to date, {len(rep.failed)} failed "
              f"({rep.seconds:.1f} s)", file=sys.stderr)
        for key, why in sorted(rep.failed.items()):
            print(f"  failed {key}: {why}", file=sys.stderr)
        for key, note_ in sorted(rep.notes.items()):
            if note_.startswith(("rejected", "uncalibrated")):
                print(f"  {key} {note_}", file=sys.stderr)
        failed += len(rep.failed)
        done += len(rep.done)
        skipped += len(rep.skipped)
        seconds += rep.seconds
    note(f"run: {len(reports)} step(s), {done} unit(s) done, {skipped} up to date, {failed} failed "
         f"in {seconds:.1f} s")
    return 1 if failed else 0


def cmd_status(args) -> int:
    with Archive.open(args.repo) as arc:
        df = arc.status(config=_config(args), products=args.products, units=args.units or bool(args.step),
                        step=args.step)
    emit(df, args)
    return 0


def _run_options(p) -> None:
    repo_option(p)
    p.add_argument("--products", metavar="DIR",
                   help="image product directory (default: ARCHIVE/products; required for a Postgres archive)")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON: step name -> settings (default: all defaults)")


def register(sub) -> None:
    ingest = sub.choices["ingest"].kinds
    p = ingest.add_parser("images", help="register raw science/calibration frames or other pipelines' calibrated "
                                         "IMAGE/MASK/VARIANCE exposures (files or directories)")
    repo_option(p)
    p.add_argument("files", metavar="FILE", nargs="+")
    p.set_defaults(func=cmd_ingest_images)

    p = ingest.add_parser("refcat", help="register the reference catalog (ra, dec, band magnitudes) later runs use")
    repo_option(p)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--products", metavar="DIR", help="image product directory (default: ARCHIVE/products)")
    p.set_defaults(func=cmd_ingest_refcat)

    p = sub.add_parser("run", help="run every pending unit of every pipeline step, in order (resumable)")
    _run_options(p)
    p.add_argument("--until", metavar="STEP", help="stop after this step (default: run them all)")
    p.add_argument("--visits", type=int_list, metavar="V,V,...", help="only units of these visits (default: all)")
    p.add_argument("--bands", type=comma_list, metavar="B,B,...", help="only units of these bands (default: all)")
    p.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1),
                   help="worker processes of the local executor (default: the number of cores)")
    p.add_argument("--executor", choices=["local", "dask"], default="local",
                   help="local processes, or a dask.distributed cluster")
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address (tcp://host:8786)")
    p.add_argument("--retry-failed", action="store_true", dest="retry_failed",
                   help="run failed units again even when nothing changed")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="per step: units registered, done, pending, stale, failed (with reasons)")
    _run_options(p)
    p.add_argument("--units", action="store_true", help="one line per unit (e.g. per tile and band)")
    p.add_argument("--step", metavar="STEP", help="the units of this step only (implies --units)")
    add_format_options(p, names=False)
    p.set_defaults(func=cmd_status)
