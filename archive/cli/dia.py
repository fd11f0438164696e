"""DIA commands: ingest dia-sources / alerts / forced, reassociate, lightcurve, object."""

from __future__ import annotations

from archive.api import Archive
from archive.cli.common import columns_option, comma_list, note, repo_option
from archive.cli.output import add_format_options, emit
from archive.cli.progress import Stages, read_then
from archive.cli.store import AS_OF_HELP

RADIUS_HELP = "match radius in arcsec (default: 1; ZTF rows 1.5)"
OBSERVED_BEFORE_HELP = ("only what was observed before this MJD (TAI): detections and forced photometry with "
                        "mjd < MJD (unlike --as-of, which is about when rows were written)")


def _report(rep, seconds: float) -> None:
    note(f"associated {rep.n_sources} DIASource(s): {rep.n_new_objects} new DIAObject(s), "
         f"{rep.n_updated_objects} updated"
         + (f", {rep.n_replaced_sources} replaced" if rep.n_replaced_sources else "")
         + (f", {rep.n_reassociated} stored re-associated (late data)" if rep.n_reassociated else "")
         + (f", {rep.n_duplicates} duplicate(s) of a visit" if rep.n_duplicates else "")
         + f" in {seconds:.1f} s")


def cmd_ingest_dia(args) -> int:
    with Archive.open(args.repo) as arc:
        rep, seconds = read_then(arc, "dia_source", args.files, "associate and write",
                                 lambda rows, where: arc.ingest_dia_sources(
                                     rows, radius_arcsec=args.radius, replace=args.replace, where=where))
    _report(rep, seconds)
    return 0


def cmd_ingest_forced(args) -> int:
    with Archive.open(args.repo) as arc:
        n, seconds = read_then(arc, "dia_forced_source", args.files, "write and summarise",
                               lambda rows, where: arc.ingest_forced(rows))
    note(f"wrote {n} forced source(s) in {seconds:.1f} s")
    return 0


def cmd_ingest_alerts(args) -> int:
    with Archive.open(args.repo) as arc, Stages(["read, associate and write"]) as st:
        with st.stage("read, associate and write"):
            rep = arc.ingest_alerts(args.files, radius_arcsec=args.radius)
    _report(rep, st.seconds)
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
    note(f"re-associated {rep.n_reassociated} DIASource(s): {rep.n_updated_objects} DIAObject(s) "
         f"rebuilt, {rep.n_new_objects} new, {rep.n_closed_objects} closed, "
         f"{rep.n_duplicates} duplicate(s) of a visit")
    return 0


def cmd_lightcurve(args) -> int:
    with Archive.open(args.repo) as arc:
        if args.list is not None:
            lc = arc.list_light_curve(args.id, list_id=args.list, bands=args.bands,
                                      observed_before=args.observed_before)
        else:
            lc = arc.light_curve(args.id, bands=args.bands, observed_before=args.observed_before)
    if args.plot and args.list is not None:
        from archive.errors import ArchiveError

        raise ArchiveError("--plot draws DIAObject light curves; a list's rows print with --format")
    if args.plot:
        plot_light_curve(lc, args.id, args.plot, units=args.plot_units)
        note(f"wrote {args.plot}")
    emit(lc, args)
    return 0


#: Plot colours per band.
COLOURS = {"u": "tab:purple", "g": "tab:green", "r": "tab:red", "i": "tab:orange", "z": "tab:brown",
           "y": "black", "w": "tab:gray"}
#: matplotlib date numbers are days since 1970-01-01, which is MJD 40587.
_MJD_UNIX_EPOCH = 40587.0


def light_curve_figure(lc, object_id: int, units: str = "mag"):
    """Per-band light curve (a matplotlib Figure).

    ``units="mag"``: AB magnitudes, brighter up; detections filled circles, forced
    photometry of at least 5 sigma open squares, fainter forced (and detection) fluxes
    as 5-sigma upper limits (downward triangles).  ``units="flux"``: difference flux
    (nJy) with error bars.  The x axis is MJD (TAI) written out in full, with the UTC
    calendar date along the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for band, grp in lc.groupby("band", sort=True):
        colour = COLOURS.get(band, "tab:blue")
        for kind, marker, face in (("detection", "o", None), ("forced", "s", "none")):
            g = grp[grp["kind"] == kind]
            if units == "flux":
                if len(g):
                    ax.errorbar(g["mjd"], g["flux"], yerr=g["flux_err"], fmt=marker, ms=5, color=colour,
                                mfc=face, capsize=2, label=f"{band} {kind}")
                continue
            m = g[g["mag"].notna()]
            if len(m):
                ax.errorbar(m["mjd"], m["mag"], yerr=m["mag_err"], fmt=marker, ms=5, color=colour, mfc=face,
                            capsize=2, label=f"{band} {kind}")
            lim = g[g["mag"].isna() & g["mag_limit"].notna()]
            if len(lim):
                ax.plot(lim["mjd"], lim["mag_limit"], "v", ms=6, color=colour, mfc="none", alpha=0.8,
                        label=f"{band} {kind} 5\u03c3 upper limit", gid=f"limit-{band}-{kind}")
    if units == "flux":
        ax.axhline(0, color="0.7", lw=0.8)
        ax.set_ylabel("difference flux [nJy]")
    else:
        if not ax.yaxis_inverted():
            ax.invert_yaxis()
        ax.set_ylabel("difference-flux AB magnitude")
    fmt = ScalarFormatter(useOffset=False)
    fmt.set_scientific(False)
    ax.xaxis.set_major_formatter(fmt)
    ax.set_xlabel("MJD (TAI)")
    top = ax.secondary_xaxis("top", functions=(lambda m: m - _MJD_UNIX_EPOCH, lambda d: d + _MJD_UNIX_EPOCH))
    loc = mdates.AutoDateLocator(minticks=3, maxticks=7)
    top.xaxis.set_major_locator(loc)
    top.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
    top.set_xlabel("date (UTC)")
    ax.set_title(f"DIAObject {object_id}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_light_curve(lc, object_id: int, path: str, units: str = "mag") -> None:
    import matplotlib.pyplot as plt

    fig = light_curve_figure(lc, object_id, units)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_forced(args) -> int:
    with Archive.open(args.repo) as arc:
        config = Archive.read_run_config(args.config) if args.config else None
        list_id, new, rep = arc.forced_list(args.list_file, images=args.images, recenter=args.recenter,
                                            name=args.name, id_column=args.id_column, config=config,
                                            products=args.products, jobs=args.jobs)
        n = sum(int(str(v).split()[0]) for v in rep.notes.values() if str(v).split()[:1] and
                str(v).split()[0].isdigit())
    note(f"list {list_id} ({'registered' if new else 'already registered'}): {len(rep.done)} exposure(s) "
         f"measured, {n} row(s) written, {len(rep.skipped)} up to date"
         + (f", {len(rep.failed)} failed: " + "; ".join(f"{k}: {v}" for k, v in list(rep.failed.items())[:3])
            if rep.failed else ""))
    return 0 if not rep.failed else 1


def cmd_object(args) -> int:
    with Archive.open(args.repo) as arc:
        df = arc.object(args.id, as_of=args.as_of, history=args.history, observed_before=args.observed_before,
                        columns=args.columns)
    emit(df, args, "dia_object")
    return 0


def register(sub) -> None:
    ingest = sub.choices["ingest"].kinds
    p = ingest.add_parser("dia-sources", help="associate DIASource files with DIAObjects (incremental)")
    repo_option(p)
    p.add_argument("files", metavar="FILE", nargs="+")
    p.add_argument("--radius", type=float, default=None, help=RADIUS_HELP)
    p.add_argument("--replace", action="store_true",
                   help="re-ingest exposures already stored, undoing their old contribution")
    p.set_defaults(func=cmd_ingest_dia)

    p = ingest.add_parser("forced", help="store forced photometry and update DIAObject forced-flux summaries")
    repo_option(p)
    p.add_argument("files", metavar="FILE", nargs="+")
    p.set_defaults(func=cmd_ingest_forced)

    p = ingest.add_parser("alerts", help="ingest ZTF / LSST alert packets (Avro, Parquet, tar.gz) and associate")
    repo_option(p)
    p.add_argument("files", metavar="FILE", nargs="+")
    p.add_argument("--radius", type=float, default=None, help=RADIUS_HELP)
    p.set_defaults(func=cmd_ingest_alerts)

    p = sub.add_parser("reassociate", help="rebuild the DIAObjects of a region from its DIASources, "
                                           "in time order")
    repo_option(p)
    p.add_argument("region", metavar="REGION", nargs="?", default=None,
                   help="cone:RA,DEC,RADIUS_ARCSEC | box:RA_MIN,RA_MAX,DEC_MIN,DEC_MAX | "
                        "polygon:RA1,DEC1,RA2,DEC2,RA3,DEC3,... (degrees); default: everything")
    p.add_argument("--radius", type=float, default=None, help=RADIUS_HELP)
    p.set_defaults(func=cmd_reassociate)

    p = sub.add_parser("lightcurve", help="detections and forced photometry of one DIAObject (flux and AB mag)")
    repo_option(p)
    p.add_argument("id", type=int, metavar="ID", help="dia_object_id (with --list: the id in that list)")
    p.add_argument("--bands", type=comma_list, metavar="B,B,...", help="only these bands (default: all)")
    p.add_argument("--observed-before", type=float, dest="observed_before", metavar="MJD",
                   help=OBSERVED_BEFORE_HELP)
    p.add_argument("--list", metavar="LIST", default=None,
                   help="ID is an id of this forced list (its list_id or name; `archive forced --list`): its "
                        "forced photometry on calexps and differences")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the light curve per band")
    p.add_argument("--plot-units", dest="plot_units", choices=["mag", "flux"], default="mag",
                   help="plot AB magnitudes with 5-sigma upper limits, or difference flux (nJy) with error bars")
    add_format_options(p)
    p.set_defaults(func=cmd_lightcurve)

    p = sub.add_parser("forced", help="register a list of positions (ra, dec, an integer id) and measure it "
                                      "on every calexp (and difference) now and in later runs")
    repo_option(p)
    p.add_argument("--list", dest="list_file", metavar="FILE", required=True,
                   help="Parquet, CSV or FITS table with ra, dec (deg) and an integer id column")
    p.add_argument("--on", dest="images", choices=["calexp", "diff", "both"], default="calexp",
                   help="images to measure: calexps, differences or both")
    p.add_argument("--recentre", "--recenter", dest="recenter", action="store_true",
                   help="let a position move at most 0.2 px in at most two iterations (LAST's rule); default fixed")
    p.add_argument("--id-column", dest="id_column", metavar="NAME",
                   help="the id column (default: id, list_object_id, object_id, source_id or objid)")
    p.add_argument("--name", metavar="NAME", help="the list's name (default: the file's stem)")
    p.add_argument("--products", metavar="DIR", help="image product directory (default: ARCHIVE/products)")
    p.add_argument("--config", metavar="FILE", help="run config (YAML/JSON); its forced_list settings apply")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.set_defaults(func=cmd_forced)

    p = sub.add_parser("object", help="one DIAObject: current version, --as-of MJD, --history, or "
                                      "--observed-before MJD")
    repo_option(p)
    p.add_argument("id", type=int, metavar="ID", help="dia_object_id")
    columns_option(p)
    when = p.add_mutually_exclusive_group()
    when.add_argument("--as-of", type=float, dest="as_of", metavar="MJD", help=AS_OF_HELP)
    when.add_argument("--history", action="store_true", help="every version with its validity interval")
    when.add_argument("--observed-before", type=float, dest="observed_before", metavar="MJD",
                      help="the summaries recomputed from the DIASources and forced photometry observed "
                           "before this MJD (TAI), with today's association")
    add_format_options(p)
    p.set_defaults(func=cmd_object)
