"""`archive process` (raw frames -> calexps + sources) and `archive demo` (the whole chain on a simulated survey)."""

from __future__ import annotations

import os
import sys

from archive.api import Archive
from archive.cli.common import expand_paths, note, repo_option


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
    """Simulate a survey, run the whole chain into a new archive, report what changed."""
    from archive.cli.sim import simulate_with_progress
    from archive.demo import run_demo

    rep = run_demo(args.directory, repo=args.repo, epochs=args.epochs, size=args.size, seed=args.seed,
                   jobs=args.workers, simulate=simulate_with_progress, method=args.method)
    print_demo(rep)
    if not rep.counts["diff"]:
        print("demo: no difference image was made (see the rejected visits above)", file=sys.stderr)
        return 1
    return 0


def print_demo(rep) -> None:
    """The demo's report: exposures, steps, what the differences found against the truth,
    light curves drawn, and lines to explore the result."""
    import shlex

    from archive.cli.dia import plot_light_curve

    pd_opts = {"index": False}
    ex = rep.exposures
    print(f"simulated survey in {rep.directory / 'data'} ({rep.seconds['simulation']} s); archive: {rep.repo}\n")
    print(ex.drop(columns=["quality_reason"]).round({"mjd_mid": 4, "seeing": 2, "zero_point": 3, "lim_mag": 2})
          .to_string(**pd_opts))
    for v, reason in zip(ex["visit"], ex["quality_reason"]):
        if isinstance(reason, str) and reason:
            print(f"visit {v} rejected: {reason}")
    print(f"\nsteps ({rep.seconds['run']} s in all):")
    print(rep.steps.to_string(**pd_opts))
    s = rep.score
    c = rep.counts
    print(f"\n{c['source']} sources; {c['dia_source']} DIASources grouped into {c['dia_object']} DIAObjects; "
          f"{c['dia_forced_source']} forced measurements")
    print("against the simulator's truth (variables, transients, the moving object on each difference image):")
    if s.n_expected:
        ch = s.changes
        n_blend = int((ch["blended"] & (ch["snr_true"].abs() >= s.snr_min)).sum()) if "blended" in ch else 0
        print(f"  found {s.n_found} of the {s.n_expected} changes with S/N >= {s.snr_min:g} in the difference "
              f"(completeness {s.completeness:.1%})"
              + (f"; {n_blend} of them blended with another change on that visit (within 0.5\")" if n_blend else ""))
    else:
        print(f"  no change reached S/N >= {s.snr_min:g} on a difference image")
    if s.n_objects:
        print(f"  {s.n_real_objects} of {s.n_objects} DIAObjects are real changes; {s.n_false_objects} are not "
              f"(not counting those near bright stars): {s.false_per_4k:.0f} per 4k x 4k of sky; "
              f"{s.n_false_sources} such DIASources")
    for row in s.missed.itertuples():
        print(f"  missed: {row.kind} {row.object_id} on visit {row.visit}: true difference flux "
              f"{row.delta_flux:.0f} +- {row.delta_flux_err:.0f} nJy")
    ra, dec, radius = rep.field
    repo = shlex.quote(str(rep.repo))
    with Archive.open(rep.repo) as arc:
        for oid, (kind, sim_id) in rep.examples.items():
            lc = arc.light_curve(oid)
            png = rep.directory / f"lightcurve_{kind}_{oid}.png"
            plot_light_curve(lc, oid, str(png))
            print(f"  {kind} (simulated object {sim_id}) is DIAObject {oid}: {len(lc)} points, drawn in {png}")
    first = next(iter(rep.examples), None)
    print("\nexplore it:")
    print(f"  archive cone --repo {repo} dia_object {ra:.4f} {dec:.4f} {radius:.0f}")
    if first is not None:
        print(f"  archive lightcurve --repo {repo} {first} --plot lc.png")
        print(f"  archive object --repo {repo} {first}")
    print(f"  archive sql --repo {repo} "
          "'SELECT visit, count(*) AS n, max(snr) AS best FROM dia_source GROUP BY visit ORDER BY visit'")
    print(f"  archive status --repo {repo}" + (f" --products {shlex.quote(str(rep.products))}"
                                                if "://" in str(rep.repo) else ""))
    print(f"  python -c \"from archive import Archive; a = Archive.open({str(rep.repo)!r}); "
          f"print(a.cone('dia_object', {ra:.4f}, {dec:.4f}, {radius:.0f}))\"")


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

    p = sub.add_parser("demo", help="simulate a small survey and run the whole chain (calexps, templates, "
                                    "differences, DIAObjects, forced photometry) into a new archive")
    p.add_argument("directory", metavar="DIR", nargs="?", default="demo",
                   help="a new (or empty) directory for the simulation, the archive and its images")
    p.add_argument("--repo", metavar="URL", default=None,
                   help="a PostgreSQL URL (an empty database) instead of the embedded archive in DIR/archive")
    p.add_argument("--epochs", type=int, default=10, help="number of visits (at least 5)")
    p.add_argument("--size", type=int, default=1024, help="detector size in pixels")
    p.add_argument("--seed", type=int, default=1, help="random seed of the simulation")
    p.add_argument("--method", choices=["alard_lupton", "zogy"], default="alard_lupton",
                   help="difference imaging: Alard-Lupton (default) or ZOGY")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                   help="worker processes (default: the number of cores)")
    p.set_defaults(func=cmd_demo)
