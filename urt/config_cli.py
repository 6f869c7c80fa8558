"""`urt config`: print the composed configuration (what a run would use) for a list of overrides."""

from __future__ import annotations

import argparse
import sys

from urt.config import compose_config, group_options, to_yaml


def _show(args: argparse.Namespace) -> int:
    if args.list:
        for group in ("model", "reward"):
            print(f"{group}: {', '.join(group_options(group))}")
        return 0
    sys.stdout.write(to_yaml(compose_config(args.overrides), resolve=not args.unresolved))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "config",
        help="print the composed Hydra config for OVERRIDES (e.g. model=tiny_qwen3_vl)",
        description="Compose conf/config.yaml with Hydra overrides and print it as YAML.",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny_qwen3_vl seed=1")
    p.add_argument("--unresolved", action="store_true", help="keep ${...} interpolations")
    p.add_argument("--list", action="store_true", help="list the options of each config group")
    p.set_defaults(func=_show)
