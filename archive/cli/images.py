"""Image commands: image get / list (stored products as FITS files), cutout (stamps at a position)."""

from __future__ import annotations

import argparse
import pathlib

from archive.api import Archive
from archive.cli.common import note, repo_option
from archive.cli.output import add_format_options, emit
from archive.errors import ArchiveError

IMAGE_KINDS = ("calexp", "warp", "psf_warp", "coadd", "template", "diff", "score")
CUTOUT_KINDS = ("calexp", "diff", "template", "coadd", "all")
FITS_SUFFIXES = (".fits", ".fit", ".fts")
PRODUCTS_HELP = "image product directory (default: ARCHIVE/products; required for a Postgres archive)"


def _kind(choices):
    def check(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown kind {text!r}; expected one of {', '.join(choices)}")
        return text
    return check


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def cmd_image_get(args) -> int:
    with Archive.open(args.repo) as arc:
        out = arc.save_image(args.kind, args.output or ".", visit=args.visit, detector=args.detector,
                             tile=args.tile, band=args.band, products=args.products, overwrite=args.overwrite)
    print(out)
    return 0


def cmd_image_list(args) -> int:
    with Archive.open(args.repo) as arc:
        q = ("SELECT p.kind, p.band, p.exposure_id, p.tile_id, e.mjd_mid, p.ra, p.dec, p.size_bytes, p.path "
             "FROM image_product p LEFT JOIN exposure e ON e.exposure_id = p.exposure_id WHERE p.kind <> 'src'")
        df = arc.sql(q)
    if args.kind:
        df = df[df["kind"] == args.kind]
    if args.band:
        df = df[df["band"] == args.band]
    if args.tile is not None:
        df = df[df["tile_id"] == args.tile]
    visit = (df["exposure_id"] // 1000).astype("Int64")
    df.insert(2, "visit", visit)
    df.insert(3, "detector", (df["exposure_id"] % 1000).astype("Int64"))
    if args.visit is not None:
        df = df[df["visit"] == args.visit]
    df = df.sort_values(["kind", "band", "mjd_mid", "exposure_id", "tile_id"], na_position="last")
    emit(df.reset_index(drop=True), args)
    return 0


def _position_and_size(args):
    vals = args.position
    if args.dia_source is not None:
        if len(vals) == 1:
            return None, None, vals[0]
        if len(vals) == 3:
            return _deg(vals[0], "RA"), _deg(vals[1], "Dec"), vals[2]
        raise ArchiveError("with --dia-source give SIZE (and optionally RA DEC before it)")
    if len(vals) != 3:
        raise ArchiveError(f"expected RA DEC SIZE, got {len(vals)} value(s): {' '.join(vals)}")
    return _deg(vals[0], "RA"), _deg(vals[1], "Dec"), vals[2]


def _deg(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ArchiveError(f"{what} {text!r} is not a number (degrees)") from None


def _targets(stamps, output: str, overwrite: bool):
    from archive.pipeline.images import stamp_name

    out = pathlib.Path(output)
    if out.suffix.lower() in FITS_SUFFIXES:
        if len(stamps) > 1:
            raise ArchiveError(f"{len(stamps)} stamps ({', '.join(stamp_name(s) for s in stamps[:4])}"
                               f"{', ...' if len(stamps) > 4 else ''}) do not fit in one file {out}: "
                               "give -o a directory")
        paths = [out]
    else:
        if out.exists() and not out.is_dir():
            raise ArchiveError(f"{out} exists and is not a directory")
        paths = [out / stamp_name(s) for s in stamps]
        if len(set(paths)) < len(paths):
            raise ArchiveError("two stamps would get the same file name")
    if not overwrite:
        there = [p for p in paths if p.exists()]
        if there:
            raise ArchiveError(f"{there[0]} exists (use --overwrite to replace it)")
    return paths


def cmd_cutout(args) -> int:
    ra, dec, size = _position_and_size(args)
    with Archive.open(args.repo) as arc:
        stamps = arc.cutouts(ra, dec, size, kind=args.kind, visit=args.visit, detector=args.detector,
                             tile=args.tile, band=args.band, dia_source_id=args.dia_source, products=args.products)
    paths = _targets(stamps, args.output or ".", args.overwrite)
    if len(paths) > 1 or paths[0].suffix.lower() not in FITS_SUFFIXES:
        paths[0].parent.mkdir(exist_ok=True)
    for stamp, path in zip(stamps, paths):
        stamp.writeto(path, overwrite=args.overwrite)
        print(path)
    partial = sum(s.partial for s in stamps)
    e = stamps[0].exposure
    note(f"wrote {len(stamps)} stamp(s) of {e.width} x {e.height} px"
         + (f"; {partial} run(s) off the image (NaN / NO_DATA there)" if partial else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("image", help="stored image products: get one as FITS, list them")
    isub = p.add_subparsers(dest="image_command", metavar="ACTION")
    isub.required = True

    g = isub.add_parser("get", help="write one stored image product (FITS, as stored, checksum verified)",
                        description="Write one stored image product as its FITS file: calexp, diff, score by "
                                    "--visit (and --detector); coadd, template by --tile; warp by both.")
    repo_option(g)
    g.add_argument("kind", type=_kind(IMAGE_KINDS), metavar="KIND", help=f"one of {', '.join(IMAGE_KINDS)}")
    g.add_argument("--visit", type=_nonneg_int, metavar="V")
    g.add_argument("--detector", type=_nonneg_int, metavar="D", help="default: the visit's only detector")
    g.add_argument("--tile", type=_nonneg_int, metavar="T", help="sky tile (coadd, template, warp)")
    g.add_argument("--band", metavar="B", help="default: the only band there is")
    g.add_argument("-o", "--output", metavar="PATH",
                   help="file to write, or a directory for the product's own file name (default: .)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing file")
    g.add_argument("--products", metavar="DIR", help=PRODUCTS_HELP)
    g.set_defaults(func=cmd_image_get)

    ls = isub.add_parser("list", help="registered image products (kind, band, visit, detector, tile, path)")
    repo_option(ls)
    ls.add_argument("--kind", type=_kind(IMAGE_KINDS), metavar="KIND", help=f"one of {', '.join(IMAGE_KINDS)}")
    ls.add_argument("--visit", type=_nonneg_int, metavar="V")
    ls.add_argument("--tile", type=_nonneg_int, metavar="T")
    ls.add_argument("--band", metavar="B")
    add_format_options(ls, names=False)
    ls.set_defaults(func=cmd_image_list)

    c = sub.add_parser(
        "cutout", help="FITS stamps around a position: IMAGE, MASK (MP_* names), VARIANCE, WCS, PSF",
        description="FITS stamps (IMAGE, MASK with its MP_* plane names, VARIANCE, WCS, the PSF model and "
                    "PSF_IMAGE at the centre where the product has a PSF) around RA DEC (degrees).  SIZE is "
                    "in arcsec (10, 10arcsec, 1.5arcmin) or pixels (64px), at most 2048 px a side.  A stamp "
                    "that runs off the image keeps its size: the pixels beyond are NaN and NO_DATA, and "
                    "its header says so (PARTIAL, NOFFIMG).  --kind all (the default with --dia-source): "
                    "the science (calexp), template and difference stamps of one exposure on one pixel "
                    "grid, as alert brokers carry them.  Read-only.")
    repo_option(c)
    c.add_argument("position", nargs="+", metavar="RA DEC SIZE",
                   help="RA and Dec (deg) and the side; with --dia-source only SIZE")
    c.add_argument("--kind", type=_kind(CUTOUT_KINDS), default=None, metavar="KIND",
                   help="calexp, diff, template, coadd or all (default: calexp; all with --dia-source)")
    c.add_argument("--visit", type=_nonneg_int, metavar="V",
                   help="this exposure's stamp (default: every exposure covering the position)")
    c.add_argument("--detector", type=_nonneg_int, metavar="D", help="default: the visit's only detector")
    c.add_argument("--tile", type=_nonneg_int, metavar="T", help="template / coadd of this tile")
    c.add_argument("--band", metavar="B", help="default: every band")
    c.add_argument("--dia-source", dest="dia_source", type=_nonneg_int, metavar="ID",
                   help="the position, exposure and band of this DIASource")
    c.add_argument("-o", "--output", metavar="PATH",
                   help="a .fits file for one stamp, else a directory (created) for one file per stamp, "
                        "named KIND_vVISIT_dDET.fits or KIND_tTILE.fits (default: .)")
    c.add_argument("--overwrite", action="store_true", help="replace existing files")
    c.add_argument("--products", metavar="DIR", help=PRODUCTS_HELP)
    c.set_defaults(func=cmd_cutout)
