"""`urt` command line. Each layer registers its own subcommands (`register(subparsers)` in
`urt/<layer>/cli.py`); a handler returns an exit code and raises UrtError for bad input."""

from __future__ import annotations

import argparse
import importlib
import sys

from urt.errors import UrtError

# Layers whose subcommands are registered, in the order `urt --help` lists them.
LAYERS = ("urt.models.cli", "urt.prompts.cli", "urt.data.cli", "urt.eval.cli", "urt.distill_cli", "urt.judge_cli", "urt.serve.cli", "urt.sample_cli", "urt.train_cli", "urt.config_cli",
          "urt.pipeline_cli", "urt.plan.cli", "urt.demo.cli", "urt.sweeps_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="urt",
        description="Unified multimodal chain-of-thought reward models (UnifiedReward-Think).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in LAYERS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UrtError as err:
        print(f"urt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
