"""`urt models ...`: list the families, write a tiny random checkpoint, convert LLaVA-NeXT checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from urt.errors import UrtError


def _cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from urt.models.families import FAMILIES

    table = Table(title="urt model families")
    for col in ("family", "HF class", "supported", "example hub ids", "prompt set"):
        table.add_column(col, overflow="fold")
    for spec in FAMILIES.values():
        table.add_row(
            spec.name,
            spec.model_class,
            "yes" if spec.supported else "no",
            "\n".join(spec.hub_ids) or "-",
            spec.prompt_set,
        )
    Console(width=max(160, Console().width)).print(table)
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from urt.models.loading import save_pretrained
    from urt.models.tiny import build_tiny

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UrtError(f"{out}: output folder exists and is not empty (pass --force to overwrite)")
    bundle = build_tiny(args.family, seed=args.seed, vision_init_std=args.vision_init_std)
    path = save_pretrained(bundle, out)
    print(path)
    return 0


def register(subparsers) -> None:
    from urt.models.families import FAMILIES

    parser = subparsers.add_parser("models", help="model families, tiny checkpoints, conversion")
    sub = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)

    p_list = sub.add_parser("list", help="the supported model families")
    p_list.set_defaults(func=_cmd_list)

    p_tiny = sub.add_parser("tiny", help="write a tiny random checkpoint folder (offline)")
    p_tiny.add_argument("--family", required=True, choices=list(FAMILIES))
    p_tiny.add_argument("--out", required=True, help="output folder")
    p_tiny.add_argument("--seed", type=int, default=0)
    p_tiny.add_argument(
        "--vision-init-std", type=float, default=None,
        help="re-initialise the vision tower with this std (e.g. 0.1; HF's default init is blind)",
    )
    p_tiny.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p_tiny.set_defaults(func=_cmd_tiny)

    from urt.models.convert_llava import register_convert

    register_convert(sub)
