"""`archive sim OUTDIR`: write a simulated survey (raws, calibration frames, truth, reference catalog)."""

from __future__ import annotations

import argparse
import sys

from archive.errors import ArchiveError


def _bands(text: str) -> tuple[str, ...]:
    bands = tuple(b.strip() for b in text.split(",") if b.strip())
    if not bands:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as r or g,r,i")
    return bands


def register(sub) -> None:
    p = sub.add_parser("sim", help="simulate a small survey with truth tables",
                       description="Simulate raw frames, calibration frames, truth tables (Parquet), a reference "
                                   "catalog and a manifest into OUTDIR; deterministic from --seed.")
    p.add_argument("outdir", metavar="OUTDIR", help="output directory (absent or empty unless --overwrite)")
    p.add_argument("--epochs", type=int, default=10, help="number of visits (default 10)")
    p.add_argument("--size", type=int, default=1024, help="imaging pixels per detector side (default 1024)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--detectors", type=int, default=1, help="detectors per visit (default 1)")
    p.add_argument("--bands", type=_bands, default=("r",), help="bands observed in turn, e.g. g,r,i (default r)")
    p.add_argument("--pixel-scale", type=float, default=0.2, help="arcsec per pixel (default 0.2)")
    p.add_argument("--ra", type=float, default=150.0, help="field centre RA, deg (default 150)")
    p.add_argument("--dec", type=float, default=2.0, help="field centre Dec, deg (default 2)")
    p.add_argument("--cadence", type=float, default=1.0, help="days between visits (default 1)")
    p.add_argument("--seeing", type=float, default=0.85, help="median seeing FWHM, arcsec (default 0.85)")
    p.add_argument("--transients", type=int, default=4, help="transients per detector area (default 4)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUTDIR")
    p.set_defaults(func=cmd_sim)


def cmd_sim(args) -> int:
    from archive.sim import SimConfig, simulate_survey

    config = SimConfig(seed=args.seed, n_epochs=args.epochs, size=args.size, n_detectors=args.detectors,
                       bands=args.bands, pixel_scale=args.pixel_scale, ra0=args.ra, dec0=args.dec,
                       cadence_days=args.cadence, seeing_arcsec=args.seeing, n_transients=args.transients)
    tty = sys.stderr.isatty()

    def progress(done: int, total: int, what: str) -> None:
        if tty:
            width = 30
            filled = int(width * done / total)
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what:<32}", end="", file=sys.stderr,
                  flush=True)
            if done == total:
                print(file=sys.stderr)

    try:
        manifest = simulate_survey(args.outdir, config, overwrite=args.overwrite, progress=progress)
    except OSError as exc:
        raise ArchiveError(f"cannot write {args.outdir}: {exc}") from exc
    c = manifest["counts"]
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(c["objects"].items()))
    print(f"wrote {c['raws']} raw frame(s), {c['calib_frames']} calibration frame(s), {c['refcat']} reference "
          f"star(s) and truth for {kinds} to {args.outdir} in {manifest['elapsed_s']:.1f} s")
    return 0
