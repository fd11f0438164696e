"""What every command module shares: the parser class, ``--repo``, path and list arguments.

Light on purpose: the command modules import this (and only this and
:mod:`archive.cli.output`) at the top, so that ``archive --help`` and a usage
error never load numpy, pandas or a store.
"""

from __future__ import annotations

import argparse
import glob
import pathlib
import sys

#: Environment variable naming the default archive (the same as archive.api.REPO_ENV).
REPO_ENV = "ARCHIVE_REPO"

REPO_HELP = (f"archive directory or postgresql+psycopg:// URL (default: ${REPO_ENV}; a relative path is "
             "read against the current directory)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False) or
    the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower():
            return text
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


class ArchiveParser(argparse.ArgumentParser):
    """An argument parser whose sub-parsers share its help formatter and whose usage
    errors are one line on stderr (exit status 2), as every other error of the command."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def repo_option(p: argparse.ArgumentParser) -> None:
    """``--repo`` on a command.  It may also come before the command (``archive --repo X cone ...``),
    so here it has no default of its own: the top-level one (None) stays unless it is given."""
    p.add_argument("--repo", metavar="PATH|URL", default=argparse.SUPPRESS, help=REPO_HELP)


def columns_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--columns", type=comma_list, metavar="COL,COL,...",
                   help="only these columns, in this order (default: all)")


def comma_list(text: str) -> list[str]:
    """``a,b,c`` -> ['a', 'b', 'c'] (an argparse type)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def int_list(text: str) -> list[int]:
    """``1,2,3`` -> [1, 2, 3] (an argparse type)."""
    items = comma_list(text)
    try:
        return [int(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def expand_paths(patterns) -> list[pathlib.Path]:
    """Command-line files: a directory stands for the FITS files under it, a glob pattern
    for its matches (sorted), anything else for itself (so a missing file is named later)."""
    out = []
    for pat in patterns:
        p = pathlib.Path(pat)
        if p.is_dir():
            out += sorted(p.rglob("*.fits"))
        else:
            hits = sorted(glob.glob(str(pat)))
            out += [pathlib.Path(h) for h in hits] if hits else [p]
    return out


def note(text: str) -> None:
    """A line for the user on stderr (results go to stdout)."""
    print(text, file=sys.stderr)
