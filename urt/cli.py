"""`urt` command line. Each package registers its own subcommands (`register(subparsers)` in
`urt/<package>/cli.py`); a handler returns an exit code and raises UrtError for bad input."""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Sequence

from urt.errors import UrtError

# The packages' CLI modules whose subcommands are registered, in the order `urt --help` lists them.
LAYERS = ("urt.models.cli", "urt.prompts.cli", "urt.data.cli", "urt.eval.cli", "urt.judge.cli", "urt.serve.cli",
          "urt.stages.cli", "urt.config", "urt.pipeline.cli", "urt.plan.cli",
          "urt.demo.cli")


def build_parser(layers: Sequence[str | ModuleType] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="urt",
        description="Unified multimodal chain-of-thought reward models (UnifiedReward-Think).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for layer in LAYERS if layers is None else layers:
        (importlib.import_module(layer) if isinstance(layer, str) else layer).register(sub)
    return parser


def main(argv: list[str] | None = None, layers: Sequence[str | ModuleType] | None = None) -> int:
    """`urt ARGV`; `layers` (module names or modules) narrows the registered packages, so that
    `python -m urt.pipeline.cli sweep ...` answers without importing the others."""
    args = build_parser(layers).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UrtError as err:
        print(f"urt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
