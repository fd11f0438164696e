"""Pipeline commands: ingest images / refcat, run, status."""

from __future__ import annotations

import os
import sys

from archive.api import Archive
from archive.cli.output import add_format_options, emit
from archive.cli.process import _expand
from archive.cli.store import _repo_option


def cmd_ingest_images(args) -> int:
    with Archive.open(args.repo) as arc:
        rep = arc.ingest_images(_expand(args.files))
    print(f"registered {len(rep.registered)} file(s): {rep.science} science, {rep.calibration} calibration; "
          f"{len(rep.duplicates)} already registered (same contents), skipped", file=sys.stderr)
    for path, twin in sorted(rep.duplicates.items()):
        print(f"  already registered: {path}" + (f" (same contents as {twin})" if twin != path else ""),
              file=sys.stderr)
    return 0


def cmd_ingest_refcat(args) -> int:
    with Archive.open(args.repo) as arc:
        path = arc.ingest_refcat(args.file, products=args.products)
    print(f"reference catalog registered as {path}", file=sys.stderr)
    return 0


def _config(args) -> dict | None:
    from archive.pipeline.chain import load_run_config

    return load_run_config(args.config) if args.config else None


def cmd_run(args) -> int:
    visits = [int(v) for v in args.visits.split(",")] if args.visits else None
    bands = args.bands.split(",") if args.bands else None
    with Archive.open(args.repo) as arc:
        reports = arc.run(until=args.until, visits=visits, bands=bands, config=_config(args),
                          products=args.products, jobs=args.jobs, executor=args.executor,
                          scheduler=args.scheduler, retry_failed=args.retry_failed)
    failed = 0
    for name, rep in reports.items():
        print(f"{name}: {len(rep.done)} done, {len(rep.skipped)} up to date, {len(rep.failed)} failed "
              f"({rep.seconds:.1f} s)", file=sys.stderr)
        for key, why in sorted(rep.failed.items()):
            print(f"  failed {key}: {why}", file=sys.stderr)
        for key, note in sorted(rep.notes.items()):
            if note.startswith(("rejected", "uncalibrated")):
                print(f"  {key} {note}", file=sys.stderr)
        failed += len(rep.failed)
    return 1 if failed else 0


def cmd_status(args) -> int:
    with Archive.open(args.repo) as arc:
        df = arc.status(config=_config(args), products=args.products)
    emit(df, args.format, args.output)
    return 0


def _run_options(p) -> None:
    _repo_option(p)
    p.add_argument("--products", metavar="DIR",
                   help="image product directory (default: ARCHIVE/products; required for a Postgres archive)")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON: step name -> settings (default: all defaults)")


def register(sub) -> None:
    ingest = sub.choices["ingest"].kinds
    p = ingest.add_parser("images", help="register raw science/calibration frames or other pipelines' calibrated "
                                         "IMAGE/MASK/VARIANCE exposures (files or directories)")
    _repo_option(p)
    p.add_argument("files", metavar="FILE", nargs="+")
    p.set_defaults(func=cmd_ingest_images)

    p = ingest.add_parser("refcat", help="register the reference catalog (ra, dec, band magnitudes) later runs use")
    _repo_option(p)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--products", metavar="DIR", help="image product directory (default: ARCHIVE/products)")
    p.set_defaults(func=cmd_ingest_refcat)

    p = sub.add_parser("run", help="run every pending unit of every pipeline step, in order (resumable)")
    _run_options(p)
    p.add_argument("--until", metavar="STEP", help="stop after this step (default: run them all)")
    p.add_argument("--visits", metavar="V,V,...", help="only units of these visits")
    p.add_argument("--bands", metavar="B,B,...", help="only units of these bands")
    p.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1),
                   help="worker processes of the local executor (default: the number of cores)")
    p.add_argument("--executor", choices=["local", "dask"], default="local",
                   help="local processes, or a dask.distributed cluster (default: local)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address (tcp://host:8786)")
    p.add_argument("--retry-failed", action="store_true", dest="retry_failed",
                   help="run failed units again even when nothing changed")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="per step: units registered, done, pending, stale, failed (with reasons)")
    _run_options(p)
    add_format_options(p)
    p.set_defaults(func=cmd_status)
