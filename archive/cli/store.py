"""Store commands: init, db upgrade / grant-read-only, ingest catalog, cone, get, sql, compact,
recover, schema."""

from __future__ import annotations

from archive.api import Archive
from archive.cli.common import columns_option, note, positive_float, repo_option
from archive.cli.output import add_format_options, emit
from archive.cli.progress import read_then
from archive.errors import ArchiveError

AS_OF_HELP = ("dia_object: the versions the archive held at this MJD (TAI) -- when rows were *written*, not "
              "when the sky was observed (see --observed-before on `archive object`); default: current")


def cmd_init(args) -> int:
    with Archive.init(args.target, **({"order": args.order} if args.order is not None else {})) as arc:
        print(f"initialised {arc.backend} archive at {arc.location}")
    return 0


def cmd_db_upgrade(args) -> int:
    before, after = Archive.upgrade(args.repo, args.revision)
    print(f"database at revision {after} (was {before or 'empty'})")
    return 0


def cmd_db_grant_read_only(args) -> int:
    for line in Archive.grant_read_only(args.role, args.repo):
        print(line)
    print(f"role {args.role} can read (SELECT) every archive table and write none")
    return 0


def cmd_ingest_catalog(args) -> int:
    with Archive.open(args.repo) as arc:
        n, seconds = read_then(arc, args.table, args.files, "write",
                               lambda rows, where: arc.write(args.table, rows, where=where))
    note(f"wrote {n} row(s) to {args.table} from {len(args.files)} file(s) in {seconds:.1f} s")
    return 0


def cmd_cone(args) -> int:
    with Archive.open(args.repo) as arc:
        df = arc.cone(args.table, args.ra, args.dec, args.radius, columns=args.columns, as_of=args.as_of)
    emit(df, args, args.table)
    return 0


def _ids(texts) -> list[int]:
    try:
        return [int(t) for t in texts]
    except ValueError:
        bad = next(t for t in texts if not t.lstrip("-").isdigit())
        raise ArchiveError(f"id {bad!r} is not an integer") from None


def cmd_get(args) -> int:
    with Archive.open(args.repo) as arc:
        df = arc.get(args.table, _ids(args.ids), columns=args.columns, as_of=args.as_of, require_all=True)
    emit(df, args, args.table)
    return 0


def cmd_sql(args) -> int:
    with Archive.open(args.repo) as arc:
        df = arc.sql(args.query, timeout=args.timeout)
    emit(df, args)
    return 0


def cmd_compact(args) -> int:
    with Archive.open(args.repo) as arc:
        removed = arc.compact(args.tables)
    note(f"merged away {sum(removed.values())} file(s)"
         + "".join(f", {k} {v}" for k, v in removed.items() if v))
    return 0


def cmd_recover(args) -> int:
    with Archive.open(args.repo) as arc:
        gen = arc.recover()
    note(f"manifest restored at generation {gen}")
    return 0


def cmd_schema(args) -> int:
    if args.table:
        emit(Archive.describe_table(args.table), args)
    else:
        print(Archive.schema_markdown())
    return 0


def register(sub) -> None:
    p = sub.add_parser("init", help="create an empty archive (directory) or set up a Postgres database")
    p.add_argument("target", metavar="PATH|URL")
    p.add_argument("--order", type=int, default=None,
                   help="HEALPix partition order of a Parquet store (default: 5)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("db", help="database maintenance (Postgres)")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION")
    dbsub.required = True
    up = dbsub.add_parser("upgrade", help="bring a Postgres database to the newest schema revision")
    repo_option(up)
    up.add_argument("--revision", default="head", help="target Alembic revision")
    up.set_defaults(func=cmd_db_upgrade)
    ro = dbsub.add_parser("grant-read-only", help="create a login role with SELECT-only grants (for SQL users)")
    repo_option(ro)
    ro.add_argument("role", metavar="ROLE")
    ro.set_defaults(func=cmd_db_grant_read_only)

    p = sub.add_parser("ingest", help="ingest data into the archive")
    isub = p.add_subparsers(dest="ingest_command", metavar="KIND")
    isub.required = True
    p.kinds = isub  # other command modules add their ingest kinds here
    cat = isub.add_parser("catalog", help="validated bulk load of catalog files (Parquet, CSV, FITS) into a table")
    repo_option(cat)
    cat.add_argument("table", metavar="TABLE")
    cat.add_argument("files", metavar="FILE", nargs="+")
    cat.set_defaults(func=cmd_ingest_catalog)

    p = sub.add_parser("cone", help="cone search: rows of TABLE within RADIUS arcsec of RA DEC (deg), nearest first")
    repo_option(p)
    p.add_argument("table", metavar="TABLE")
    p.add_argument("ra", type=float, metavar="RA", help="right ascension of the centre (deg)")
    p.add_argument("dec", type=float, metavar="DEC", help="declination of the centre (deg)")
    p.add_argument("radius", type=positive_float, metavar="RADIUS", help="radius (arcsec)")
    columns_option(p)
    p.add_argument("--as-of", type=float, dest="as_of", metavar="MJD", help=AS_OF_HELP)
    add_format_options(p)
    p.set_defaults(func=cmd_cone)

    p = sub.add_parser("get", help="rows of TABLE by id (its first primary-key column); a missing id is an error")
    repo_option(p)
    p.add_argument("table", metavar="TABLE")
    p.add_argument("ids", metavar="ID", nargs="+")
    columns_option(p)
    p.add_argument("--as-of", type=float, dest="as_of", metavar="MJD", help=AS_OF_HELP)
    add_format_options(p)
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("sql", help="run one read-only SQL query (a single SELECT; see README)",
                       description="Run one read-only SQL query: PostgreSQL's dialect on a PostgreSQL archive, "
                                   "DuckDB's on a Parquet archive.  Unaliased aggregates are named as "
                                   "PostgreSQL names them on both (count(*) -> count).")
    repo_option(p)
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                   help="cancel the query after S seconds (default: 300)")
    add_format_options(p)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("compact", help="Parquet archive: merge each partition's files into one")
    repo_option(p)
    p.add_argument("tables", nargs="*", metavar="TABLE", help="tables to compact (default: all)")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("recover", help="Parquet archive: restore a corrupt manifest.json from its "
                                       "newest intact committed copy")
    repo_option(p)
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("schema", help="the schema as Markdown, or one table's columns (type, unit, UCD)",
                       description="Without TABLE: the whole schema as Markdown (docs/schema.md is "
                                   "`archive schema > docs/schema.md`).  With TABLE: its columns.")
    p.add_argument("table", nargs="?", metavar="TABLE", help="one table (default: the whole schema)")
    add_format_options(p, names=False)
    p.set_defaults(func=cmd_schema)
