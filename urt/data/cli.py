"""`urt data …`: the data layer's subcommands (`inspect` here; `convert` from urt.data.convert)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _inspect(args: argparse.Namespace) -> int:
    from urt.data.inspect import inspect

    return inspect(args.shards, samples=args.samples, sheet=args.sheet, max_items=args.max_items,
                   progress=not args.no_progress, strict=args.strict)


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="inspect and convert WebDataset shards of samples",
                              description="Data tools: inspect shards, convert raw data into shards.")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    ip = data_sub.add_parser(
        "inspect", help="counts per task/label/source/order, example samples, a contact sheet",
        description="Scan shards (a directory, a glob or a brace pattern): counts per task, label, source "
                    "and candidate order (position bias), a few samples as text, and optionally a "
                    "contact-sheet PNG of the first samples.")
    ip.add_argument("shards", help="shard directory, glob ('out/*.tar') or brace pattern")
    ip.add_argument("--samples", type=int, default=4, help="samples to print (default 4)")
    ip.add_argument("--sheet", default=None, help="write a contact-sheet PNG here")
    ip.add_argument("--max-items", type=int, default=48, help="rows in the contact sheet (default 48)")
    ip.add_argument("--no-progress", action="store_true", help="no progress bar")
    ip.add_argument("--strict", action="store_true", help="decode every image and video; exit 1 if any sample, visual or shard is bad, or "
                                                          "there is no sample")
    ip.set_defaults(func=_inspect)

    # `urt data convert …` lives in urt/data/convert.py (written separately).
    if Path(__file__).with_name("convert.py").exists():
        from urt.data.convert import register_convert

        register_convert(data_sub)
