"""DIA commands: ingest dia-sources / alerts / forced, lightcurve, object history."""

from __future__ import annotations

import os
import sys

from archive.api import Archive
from archive.cli.output import add_format_options, emit
from archive.cli.store import _repo_option


def _report(rep) -> None:
    print(f"associated {rep.n_sources} DIASource(s): {rep.n_new_objects} new DIAObject(s), "
          f"{rep.n_updated_objects} updated"
          + (f", {rep.n_replaced_sources} replaced" if rep.n_replaced_sources else "")
          + (f", {rep.n_reassociated} stored re-associated (late data)" if rep.n_reassociated else "")
          + (f", {rep.n_duplicates} duplicate(s) of a visit" if rep.n_duplicates else ""), file=sys.stderr)


def cmd_ingest_dia(args) -> int:
    with Archive.open(args.repo) as arc:
        rows = arc.read_files("dia_source", args.files)
        rep = arc.ingest_dia_sources(rows, radius_arcsec=args.radius, replace=args.replace,
                                     where=", ".join(map(os.fspath, args.files)))
    _report(rep)
    return 0


def cmd_ingest_forced(args) -> int:
    with Archive.open(args.repo) as arc:
        n = arc.ingest_forced(arc.read_files("dia_forced_source", args.files))
    print(f"wrote {n} forced source(s)", file=sys.stderr)
    return 0


def cmd_ingest_alerts(args) -> int:
    with Archive.open(args.repo) as arc:
        rep = arc.ingest_alerts(args.files, radius_arcsec=args.radius)
    _report(rep)
    return 0


def parse_region(text: str | None):
    """A region from the command line (degrees; cone radius in arcsec), or None (everything):
    ``cone:RA,DEC,RADIUS_ARCSEC``, ``box:RA_MIN,RA_MAX,DEC_MIN,DEC_MAX`` or
    ``polygon:RA1,DEC1,RA2,DEC2,RA3,DEC3[,...]``."""
    from archive.errors import ValidationError
    from archive.sky.regions import Box, Cone, Polygon

    if text is None:
        return None
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    try:
        vals = [float(v) for v in rest.split(",")] if rest.strip() else []
    except ValueError:
        raise ValidationError(f"region {text!r}: the values after '{kind}:' must be numbers "
                              "separated by commas") from None
    if kind == "cone" and len(vals) == 3:
        if not vals[2] > 0:
            raise ValidationError(f"region {text!r}: the cone radius (arcsec) must be positive")
        return Cone(vals[0], vals[1], vals[2] / 3600.0)
    if kind == "box" and len(vals) == 4:
        return Box(*vals)
    if kind == "polygon" and len(vals) >= 6 and len(vals) % 2 == 0:
        return Polygon(vals[0::2], vals[1::2])
    raise ValidationError(f"region {text!r}: expected cone:RA,DEC,RADIUS_ARCSEC, "
                          "box:RA_MIN,RA_MAX,DEC_MIN,DEC_MAX or polygon:RA1,DEC1,RA2,DEC2,RA3,DEC3,...")


def cmd_reassociate(args) -> int:
    region = parse_region(args.region)
    with Archive.open(args.repo) as arc:
        rep = arc.reassociate(region, radius_arcsec=args.radius)
    print(f"re-associated {rep.n_reassociated} DIASource(s): {rep.n_updated_objects} DIAObject(s) "
          f"rebuilt, {rep.n_new_objects} new, {rep.n_closed_objects} closed, "
          f"{rep.n_duplicates} duplicate(s) of a visit", file=sys.stderr)
    return 0


def cmd_lightcurve(args) -> int:
    bands = args.bands.split(",") if args.bands else None
    with Archive.open(args.repo) as arc:
        lc = arc.light_curve(args.id, bands=bands)
    if args.plot:
        plot_light_curve(lc, args.id, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    emit(lc, args.format, args.output)
    return 0


def plot_light_curve(lc, object_id: int, path: str) -> None:
    """Per-band light curve with error bars: detections filled, forced photometry open."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"u": "tab:purple", "g": "tab:green", "r": "tab:red", "i": "tab:orange",
               "z": "tab:brown", "y": "black", "w": "tab:gray"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for band, grp in lc.groupby("band", sort=True):
        for kind, marker, face in (("detection", "o", None), ("forced", "s", "none")):
            g = grp[grp["kind"] == kind]
            if len(g):
                ax.errorbar(g["mjd"], g["flux"], yerr=g["flux_err"], fmt=marker, ms=5,
                            color=colours.get(band, "tab:blue"), mfc=face, capsize=2,
                            label=f"{band} {kind}")
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_xlabel("MJD (TAI)")
    ax.set_ylabel("difference flux [nJy]")
    ax.set_title(f"DIAObject {object_id}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_object(args) -> int:
    with Archive.open(args.repo) as arc:
        df = arc.history(args.id) if args.history else arc.get("dia_object", [args.id], as_of=args.as_of)
    emit(df, args.format, args.output)
    return 0


def register(sub) -> None:
    ingest = sub.choices["ingest"].kinds
    p = ingest.add_parser("dia-sources", help="associate DIASource files with DIAObjects (incremental)")
    _repo_option(p)
    p.add_argument("files", metavar="FILE", nargs="+")
    p.add_argument("--radius", type=float, default=None,
                   help="match radius in arcsec (default 1; ZTF rows 1.5)")
    p.add_argument("--replace", action="store_true",
                   help="re-ingest exposures already stored, undoing their old contribution")
    p.set_defaults(func=cmd_ingest_dia)

    p = ingest.add_parser("forced", help="store forced photometry and update DIAObject forced-flux summaries")
    _repo_option(p)
    p.add_argument("files", metavar="FILE", nargs="+")
    p.set_defaults(func=cmd_ingest_forced)

    p = ingest.add_parser("alerts", help="ingest ZTF / LSST alert packets (Avro, Parquet, tar.gz) and associate")
    _repo_option(p)
    p.add_argument("files", metavar="FILE", nargs="+")
    p.add_argument("--radius", type=float, default=None,
                   help="match radius in arcsec (default 1; ZTF rows 1.5)")
    p.set_defaults(func=cmd_ingest_alerts)

    p = sub.add_parser("reassociate", help="rebuild the DIAObjects of a region from its DIASources, "
                                           "in time order")
    _repo_option(p)
    p.add_argument("region", metavar="REGION", nargs="?", default=None,
                   help="cone:RA,DEC,RADIUS_ARCSEC | box:RA_MIN,RA_MAX,DEC_MIN,DEC_MAX | "
                        "polygon:RA1,DEC1,RA2,DEC2,RA3,DEC3,... (degrees); default: everything")
    p.add_argument("--radius", type=float, default=None,
                   help="match radius in arcsec (default 1; ZTF rows 1.5)")
    p.set_defaults(func=cmd_reassociate)

    p = sub.add_parser("lightcurve", help="detections and forced photometry of one DIAObject")
    _repo_option(p)
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--bands", help="comma-separated bands")
    p.add_argument("--plot", metavar="FILE.png", help="also draw a per-band plot with error bars")
    add_format_options(p)
    p.set_defaults(func=cmd_lightcurve)

    p = sub.add_parser("object", help="one DIAObject: current version, --as-of MJD, or --history")
    _repo_option(p)
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--as-of", type=float, dest="as_of", metavar="MJD",
                   help="the version the archive held at this MJD (TAI)")
    p.add_argument("--history", action="store_true", help="every version with its validity interval")
    add_format_options(p)
    p.set_defaults(func=cmd_object)
