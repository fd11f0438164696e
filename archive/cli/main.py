"""Entry point of the ``archive`` command.

Each sub-command lives in a small module of ``archive.cli`` that exposes
``register(subparsers)``; the module list below is the whole command set.
The modules import only :mod:`archive.cli.common`, :mod:`archive.cli.output` and
:mod:`archive.api` (all light) at the top; numpy, pandas, the stores and the
pipeline load inside the command that needs them, so ``archive --help`` and
usage errors return at once.

User mistakes (:class:`archive.errors.ArchiveError`, missing files, bad
arguments) print one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys

from archive.cli.common import REPO_HELP, ArchiveParser
from archive.errors import ArchiveError
from archive.version import __version__

#: Modules that add sub-commands, in help order.
COMMAND_MODULES = [
    "archive.cli.store",
    "archive.cli.dia",
    "archive.cli.matched",
    "archive.cli.process",
    "archive.cli.run",
    "archive.cli.sim",
    "archive.cli.reference",
    "archive.cli.images",
]


def build_parser() -> ArchiveParser:
    parser = ArchiveParser(
        prog="archive",
        description="Time-domain archive: ingest, process, associate and query survey data.",
        epilog="Every command that opens an archive takes --repo, before or after the command name.",
    )
    parser.add_argument("--version", action="version", version=f"archive {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--repo", metavar="PATH|URL", default=None, help=REPO_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    name = " ".join(w for w in (args.command, *[getattr(args, k, None) for k in
                                                 ("ingest_command", "db_command", "matched_command",
                                                  "image_command")]) if w)
    try:
        rc = args.func(args)
    except (ArchiveError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"archive {name}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `archive sql ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except OSError as exc:  # disk full, device errors: the environment, not a bug
        print(f"archive {name}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("archive: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # a database that went away mid-command is an environment problem, not a bug
        if "sqlalchemy" in sys.modules:
            import sqlalchemy.exc

            if isinstance(exc, sqlalchemy.exc.OperationalError):
                first = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
                print(f"archive {name}: error: database unavailable: {first}", file=sys.stderr)
                return 2
        raise
    return int(rc or 0)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(line.strip() for line in text.splitlines()) if text else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
