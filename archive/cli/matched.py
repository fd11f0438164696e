"""``archive matched``: matched-source light curves over epochs (as LAST's MatchedSources).

    archive matched ingest FILE... [--replace] [--radius ARCSEC]
    archive matched zeropoints --ra --dec --radius-deg --band
    archive matched rms --ra --dec --radius-deg --band [--raw] [--plot FILE.png]
    archive matched matrix --ra --dec --radius-deg --band [--property COL] [--relative] -o FILE.parquet|.h5
"""

from __future__ import annotations

from archive.api import Archive
from archive.cli.common import note, positive_float, repo_option
from archive.cli.output import add_format_options, emit
from archive.cli.progress import read_then


def _region(args):
    from archive.sky.regions import Cone

    return Cone(args.ra, args.dec, args.radius_deg)


def cmd_ingest(args) -> int:
    with Archive.open(args.repo) as arc:
        rep, seconds = read_then(arc, "source", args.files, "match and write",
                                 lambda rows, where: arc.ingest_sources(
                                     rows, radius_arcsec=args.radius, replace=args.replace, where=where))
    note(f"matched {rep.n_sources} source(s) on {len(rep.exposure_ids)} exposure(s): "
         f"{rep.n_new} new matched source(s), {rep.n_updated} updated"
         + (f", {rep.n_replaced_sources} replaced" if rep.n_replaced_sources else "")
         + (f", {rep.n_removed} removed" if rep.n_removed else "") + f" in {seconds:.1f} s")
    return 0


def cmd_zeropoints(args) -> int:
    with Archive.open(args.repo) as arc:
        rp = arc.relative_photometry(_region(args), args.band)
    note(f"{len(rp.zero_points)} epoch(s), {rp.reference.size} reference star(s); "
         f"median rms {rp.rms_before:.4f} -> {rp.rms_after:.4f} mag")
    why = rms_rise_note(rp.rms_before, rp.rms_after, int(rp.reference.size))
    if why:
        note(why)
    emit(rp.zero_points, args)
    return 0


def rms_rise_note(before: float, after: float, n_reference: int) -> str:
    """Why the median rms may rise after relative photometry (empty when it does not)."""
    if not (after > before):
        return ""
    per_epoch = after / max(n_reference, 1) ** 0.5
    return (f"note: the median rms rose ({before:.4f} -> {after:.4f} mag). Each epoch's relative zero point "
            f"is measured from {n_reference} reference star(s) and carries their noise (about "
            f"{per_epoch:.4f} mag per epoch), added to every light curve; when the epochs' own photometric "
            "calibrations already agree better than that (no clouds, no transparency changes), the "
            "correction adds noise instead of removing it. More or brighter reference stars (a larger "
            "field) lower it; `archive matched rms --raw` shows the rms without it.")


def cmd_rms(args) -> int:
    with Archive.open(args.repo) as arc:
        table = arc.rms_curve(_region(args), args.band, relative=not args.raw, min_epochs=args.min_epochs,
                              plot=args.plot)
    if args.plot:
        note(f"wrote {args.plot}")
    note(f"{len(table)} matched source(s), {int(table['outlier'].sum())} above the rms curve")
    emit(table, args)
    return 0


def cmd_matrix(args) -> int:
    with Archive.open(args.repo) as arc:
        path, mat = arc.export_epoch_matrix(_region(args), args.band, args.property, args.output,
                                            relative=args.relative)
    n_seen = int(mat.notna().to_numpy().sum())
    note(f"wrote {path}: {mat.shape[0]} epoch(s) x {mat.shape[1]} matched source(s) of "
         f"{args.property}, {n_seen} measured, {mat.size - n_seen} NaN")
    return 0


def _field_options(p) -> None:
    repo_option(p)
    p.add_argument("--ra", type=float, required=True, help="field centre right ascension (deg)")
    p.add_argument("--dec", type=float, required=True, help="field centre declination (deg)")
    p.add_argument("--radius-deg", dest="radius_deg", type=positive_float, required=True,
                   help="field radius (deg)")
    p.add_argument("--band", required=True, help="filter band")


def register(sub) -> None:
    p = sub.add_parser("matched", help="matched sources over epochs: ingest, zero points, rms curve, matrix")
    msub = p.add_subparsers(dest="matched_command", metavar="ACTION")
    msub.required = True

    q = msub.add_parser("ingest", help="match per-epoch source files (Parquet, CSV, FITS) into matched sources")
    repo_option(q)
    q.add_argument("files", metavar="FILE", nargs="+")
    q.add_argument("--radius", type=positive_float, default=1.0, help="match radius in arcsec")
    q.add_argument("--replace", action="store_true",
                   help="re-ingest exposures already stored, undoing their old contribution")
    q.set_defaults(func=cmd_ingest)

    q = msub.add_parser("zeropoints", help="each epoch's relative zero-point offset (mag) in a field",
                        description="Each epoch's zero-point offset (mag) fitted on the field's constant stars "
                                    "(variables clipped), and the median rms of those stars before and after. "
                                    "The rms can rise: each offset carries the noise of the reference stars, "
                                    "which exceeds what it removes when the epochs were already well "
                                    "calibrated (the command says so when that happens).")
    _field_options(q)
    add_format_options(q, names=False)
    q.set_defaults(func=cmd_zeropoints)

    q = msub.add_parser("rms", help="rms-versus-magnitude diagnostic of a field (table, optional plot)")
    _field_options(q)
    q.add_argument("--raw", action="store_true", help="without relative photometry")
    q.add_argument("--min-epochs", dest="min_epochs", type=int, default=3,
                   help="sources seen on fewer epochs are left out")
    q.add_argument("--plot", metavar="FILE.png", help="also draw rms versus magnitude")
    add_format_options(q, names=False)
    q.set_defaults(func=cmd_rms)

    q = msub.add_parser("matrix", help="epochs x matched sources matrix of a source column (NaN where unseen)")
    _field_options(q)
    q.add_argument("--property", default="psf_flux", help="source column")
    q.add_argument("--relative", action="store_true", help="apply the relative zero points to fluxes")
    q.add_argument("-o", "--output", required=True, metavar="FILE.parquet|FILE.h5",
                   help="output file; the suffix picks Parquet or HDF5")
    q.set_defaults(func=cmd_matrix)
