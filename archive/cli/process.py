"""`archive process` (raw frames -> calexps + sources) and `archive demo` (the whole chain on a simulated survey)."""

from __future__ import annotations

import os
import pathlib
import sys

from archive.api import Archive
from archive.cli.common import expand_paths, note, repo_option
from archive.errors import ArchiveError


def _summary(rep) -> str:
    uncal = f" ({len(rep.uncalibrated)} without photometric calibration)" if rep.uncalibrated else ""
    return (f"processed {len(rep.processed)} exposure(s){uncal}, rejected {len(rep.rejected)}, "
            f"skipped {len(rep.skipped)} already archived, failed {len(rep.failed)}; "
            f"{rep.n_sources} sources in {rep.seconds:.1f} s")


def cmd_process(args) -> int:
    calib = expand_paths([args.calib]) if args.calib else []
    with Archive.open(args.repo) as arc:
        rep = arc.process_raws(expand_paths(args.raw), calib, refcat=args.refcat,
                               products=args.products, workers=args.workers)
    note(_summary(rep))
    for eid, why in sorted(rep.uncalibrated.items()):
        print(f"  uncalibrated {eid}: {why}", file=sys.stderr)
    for eid, why in sorted(rep.rejected.items()):
        print(f"  rejected {eid}: {why}", file=sys.stderr)
    for eid, why in sorted(rep.failed.items()):
        print(f"  failed {eid}: {why}", file=sys.stderr)
    return 1 if rep.failed else 0


def cmd_demo(args) -> int:
    """Simulate a survey, create an archive, process every raw frame, summarize."""
    from archive.cli.sim import simulate_with_progress
    from archive.sim.config import SimConfig

    out = pathlib.Path(args.directory)
    if out.exists() and any(out.iterdir()):
        raise ArchiveError(f"{out} exists and is not empty; choose a new directory")
    data, repo = out / "data", out / "archive"
    simulate_with_progress(data, SimConfig(seed=args.seed, n_epochs=args.epochs, size=args.size))
    with Archive.init(repo) as arc:
        rep = arc.process_raws(sorted((data / "raw").rglob("*.fits")), sorted((data / "calib").rglob("*.fits")),
                               refcat=data / "refcat.parquet", workers=args.workers)
        note(_summary(rep))
        print(arc.sql("SELECT visit, band, round(mjd_mid, 4) AS mjd, status, round(seeing, 2) AS seeing_arcsec, "
                      "round(zero_point, 3) AS zero_point, round(lim_mag, 2) AS lim_mag FROM exposure ORDER BY visit")
              .to_string(index=False))
        why = arc.sql("SELECT visit, quality_reason FROM exposure WHERE status = 'rejected' ORDER BY visit")
        for v, reason in zip(why["visit"], why["quality_reason"]):
            print(f"visit {v} rejected: {reason}")
        n = arc.sql("SELECT count(*) AS n FROM source")["n"].iloc[0]
        m = arc.sql("SELECT count(*) AS n, avg(n_epochs) AS k FROM matched_source")
        print(f"\n{n} sources, matched into {m['n'].iloc[0]} objects seen on {m['k'].iloc[0]:.1f} epochs "
              f"on average, in {repo}\ntry: archive cone --repo {repo} source "
              f"{arc.sql('SELECT avg(ra) AS a FROM exposure')['a'].iloc[0]:.4f} "
              f"{arc.sql('SELECT avg(dec) AS d FROM exposure')['d'].iloc[0]:.4f} 10")
    return 1 if rep.failed else 0


def register(sub) -> None:
    p = sub.add_parser("process", help="raw frames or calibrated IMAGE/MASK/VARIANCE exposures -> calexps "
                                       "(FITS) + source rows, resumable, parallel")
    repo_option(p)
    p.add_argument("raw", nargs="+", metavar="RAW",
                   help="raw science frames, or other pipelines' calibrated exposures (multi-extension FITS "
                        "with IMAGE, MASK, VARIANCE HDUs: no ISR), files or directories")
    p.add_argument("--calib", metavar="DIR",
                   help="directory of bias/dark/flat frames for the raw frames (not needed for calibrated "
                        "exposures)")
    p.add_argument("--refcat", metavar="FILE", help="reference catalog (Parquet/CSV/FITS: ra, dec, band mags)")
    p.add_argument("--products", metavar="DIR",
                   help="where calexps are written (default: ARCHIVE/products for a directory archive)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="worker processes (default: the number of cores)")
    p.set_defaults(func=cmd_process)

    p = sub.add_parser("demo", help="simulate a small survey and run the whole chain into a new archive")
    p.add_argument("directory", metavar="DIR", help="a new (or empty) directory for the data and the archive")
    p.add_argument("--epochs", type=int, default=4, help="number of visits")
    p.add_argument("--size", type=int, default=1024, help="detector size in pixels")
    p.add_argument("--seed", type=int, default=1, help="random seed of the simulation")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.set_defaults(func=cmd_demo)
