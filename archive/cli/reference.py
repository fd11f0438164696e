"""Reference commands that need no archive: ``archive flags`` and ``archive names``."""

from __future__ import annotations

from archive.api import Archive
from archive.cli.output import add_format_options, emit
from archive.errors import ArchiveError

FLAG_COLUMNS = ("source.flags", "dia_source.flags", "exposure.quality_flags")


def cmd_flags(args) -> int:
    if args.markdown:
        print(Archive.flags_markdown())
        return 0
    if args.action is None:
        df = Archive.flag_bits()
        if args.column:
            df = df[df["column"] == args.column].reset_index(drop=True)
        emit(df, args)
        return 0
    if args.action != "decode" or args.value is None:
        raise ArchiveError("usage: archive flags [--column COLUMN] | archive flags decode VALUE [--column COLUMN]")
    from archive.flags import parse_value

    try:
        value = parse_value(args.value)
    except ValueError as exc:
        raise ArchiveError(str(exc)) from None
    emit(Archive.decode_flags(value, args.column), args)
    return 0


def cmd_names(args) -> int:
    print(Archive.column_mapping_markdown())
    return 0


def register(sub) -> None:
    p = sub.add_parser("flags", help="what the bits of source.flags, dia_source.flags and exposure.quality_flags "
                                     "mean; `archive flags decode N` names the bits set in N",
                       description="Without arguments: every bit of the flag columns (docs/flags.md).  "
                                   "`decode N` (decimal, 0x hex or 0b binary): the bits set in N, per column.")
    p.add_argument("action", nargs="?", choices=["decode"], help="decode a value")
    p.add_argument("value", nargs="?", metavar="N", help="the flag value to decode")
    p.add_argument("--column", choices=FLAG_COLUMNS, default=None,
                   help="only this flag column (default: all three)")
    p.add_argument("--markdown", action="store_true", help="print docs/flags.md")
    add_format_options(p, names=False)
    p.set_defaults(func=cmd_flags)

    p = sub.add_parser("names", help="our column names beside Rubin's and ZTF alerts' (docs/column_mapping.md)")
    p.set_defaults(func=cmd_names)
