"""Entry point of the ``archive`` command.

Each sub-command lives in a small module of ``archive.cli`` that exposes
``register(subparsers)``; the module list below is the whole command set.
User mistakes (:class:`archive.errors.ArchiveError`, missing files) print one
line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from archive.errors import ArchiveError

#: Modules that add sub-commands, in help order.
COMMAND_MODULES = [
    "archive.cli.store",
    "archive.cli.dia",
    "archive.cli.matched",
    "archive.cli.process",
    "archive.cli.run",
    "archive.cli.sim",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="archive",
        description="Time-domain archive: ingest, process, associate and query survey data.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
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
    try:
        rc = args.func(args)
    except (ArchiveError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"archive {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, device errors: the environment, not a bug
        print(f"archive {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # a database that went away mid-command is an environment problem, not a bug
        import sqlalchemy.exc

        if isinstance(exc, sqlalchemy.exc.OperationalError):
            first = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
            print(f"archive {args.command}: error: database unavailable: {first}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("archive: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
