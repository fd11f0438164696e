"""Store commands: init, db upgrade, ingest catalog, cone, sql, schema."""

from __future__ import annotations

import argparse
import sys

from archive.api import REPO_ENV, Archive, resolve_repo
from archive.cli.output import add_format_options, emit
from archive.errors import ArchiveError


def _repo_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", metavar="PATH|URL",
                   help=f"archive directory or postgresql+psycopg:// URL (default: ${REPO_ENV})")


def cmd_init(args) -> int:
    with Archive.init(args.target, **({"order": args.order} if args.order is not None else {})) as arc:
        print(f"initialised {arc.backend} archive at {arc.location}")
    return 0


def cmd_db_upgrade(args) -> int:
    from archive.catalog.migrate import current_revision, upgrade
    from archive.catalog.postgres_store import normalize_url

    url = resolve_repo(args.repo)
    if "://" not in url:
        raise ArchiveError(f"`archive db upgrade` needs a PostgreSQL URL; {url!r} is a directory store")
    url = normalize_url(url)
    before = _safe(lambda: current_revision(url), url)
    after = _safe(lambda: upgrade(url, args.revision), url)
    print(f"database at revision {after} (was {before or 'empty'})")
    return 0


def cmd_db_grant_read_only(args) -> int:
    from archive.catalog.migrate import grant_read_only
    from archive.catalog.postgres_store import normalize_url

    url = resolve_repo(args.repo)
    if "://" not in url:
        raise ArchiveError("`archive db grant-read-only` needs a PostgreSQL URL")
    url = normalize_url(url)
    for line in _safe(lambda: grant_read_only(url, args.role), url):
        print(line)
    print(f"role {args.role} can read (SELECT) every archive table and write none")
    return 0


def _safe(fn, url):
    import sqlalchemy as sa

    try:
        return fn()
    except sa.exc.OperationalError as exc:
        raise ArchiveError(f"cannot connect to {sa.engine.make_url(url).render_as_string(True)}: "
                           f"{str(exc.orig).strip().splitlines()[0]}") from None


def cmd_ingest_catalog(args) -> int:
    with Archive.open(args.repo) as arc:
        n = arc.ingest_files(args.table, args.files)
    print(f"wrote {n} row(s) to {args.table} from {len(args.files)} file(s)", file=sys.stderr)
    return 0


def cmd_cone(args) -> int:
    cols = args.columns.split(",") if args.columns else None
    with Archive.open(args.repo) as arc:
        df = arc.cone(args.table, args.ra, args.dec, args.radius, columns=cols, as_of=args.as_of)
    emit(df, args.format, args.output)
    return 0


def cmd_sql(args) -> int:
    with Archive.open(args.repo) as arc:
        df = arc.sql(args.query, timeout=args.timeout)
    emit(df, args.format, args.output)
    return 0


def cmd_compact(args) -> int:
    with Archive.open(args.repo) as arc:
        if arc.backend != "parquet":
            raise ArchiveError("compact applies to a Parquet archive (Postgres manages its own storage)")
        removed = arc.store.compact(args.tables or None)
    print(f"merged away {sum(removed.values())} file(s): "
          + ", ".join(f"{k} {v}" for k, v in removed.items() if v), file=sys.stderr)
    return 0


def cmd_recover(args) -> int:
    with Archive.open(args.repo) as arc:
        gen = arc.recover()
    print(f"manifest restored at generation {gen}", file=sys.stderr)
    return 0


def cmd_schema(args) -> int:
    from archive.catalog.schema import load_schema, markdown_docs

    if args.table:
        t = load_schema()[args.table]
        for c in t.columns:
            print(f"{c.name:32s} {c.type:9s} {c.unit or '':8s} {c.description}")
    else:
        print(markdown_docs())
    return 0


def register(sub) -> None:
    p = sub.add_parser("init", help="create an empty archive (directory) or set up a Postgres database")
    p.add_argument("target", metavar="PATH|URL")
    p.add_argument("--order", type=int, default=None,
                   help="HEALPix partition order of a Parquet store (default 5)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("db", help="database maintenance (Postgres)")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION")
    dbsub.required = True
    up = dbsub.add_parser("upgrade", help="bring a Postgres database to the newest schema revision")
    _repo_option(up)
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    up.set_defaults(func=cmd_db_upgrade)
    ro = dbsub.add_parser("grant-read-only", help="create a login role with SELECT-only grants (for SQL users)")
    _repo_option(ro)
    ro.add_argument("role", metavar="ROLE")
    ro.set_defaults(func=cmd_db_grant_read_only)

    p = sub.add_parser("ingest", help="ingest data into the archive")
    isub = p.add_subparsers(dest="ingest_command", metavar="KIND")
    isub.required = True
    p.kinds = isub  # other command modules add their ingest kinds here
    cat = isub.add_parser("catalog", help="validated bulk load of catalog files (Parquet, CSV, FITS) into a table")
    _repo_option(cat)
    cat.add_argument("table", metavar="TABLE")
    cat.add_argument("files", metavar="FILE", nargs="+")
    cat.set_defaults(func=cmd_ingest_catalog)

    p = sub.add_parser("cone", help="cone search: rows of TABLE within RADIUS arcsec of RA DEC (deg)")
    _repo_option(p)
    p.add_argument("table", metavar="TABLE")
    p.add_argument("ra", type=float, metavar="RA")
    p.add_argument("dec", type=float, metavar="DEC")
    p.add_argument("radius", type=float, metavar="RADIUS", help="arcsec")
    p.add_argument("--columns", help="comma-separated column list")
    p.add_argument("--as-of", type=float, dest="as_of", metavar="MJD",
                   help="dia_object: the versions the archive held at this MJD (TAI); default: current")
    add_format_options(p)
    p.set_defaults(func=cmd_cone)

    p = sub.add_parser("sql", help="run one read-only SQL query (a single SELECT; see README)")
    _repo_option(p)
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="cancel the query after S seconds (default: 300)")
    add_format_options(p)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("compact", help="Parquet archive: merge each partition's files into one")
    _repo_option(p)
    p.add_argument("tables", nargs="*", metavar="TABLE")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("recover", help="Parquet archive: restore a corrupt manifest.json from its "
                                       "newest intact committed copy")
    _repo_option(p)
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("schema", help="print the schema (Markdown) or one table's columns")
    p.add_argument("table", nargs="?", metavar="TABLE")
    p.set_defaults(func=cmd_schema)
