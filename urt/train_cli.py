"""`urt train [OVERRIDES...]`: compose conf/config.yaml with Hydra overrides and run the stage it names
(`stage=sft`: SFT, e.g. `urt train experiment=paper/qwen2_5_vl_7b/cold_start`)."""

from __future__ import annotations

import argparse
import sys

from urt.config import compose_config, to_yaml


def _train(args: argparse.Namespace) -> int:
    from urt.stages.base import run_dir
    from urt.train import train

    cfg = compose_config(args.overrides)
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    print(f"run dir: {run_dir(cfg)}", flush=True)
    out = train(cfg)
    print(f"hf folder: {out}", flush=True)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a stage (SFT: cold start / rejection sampling) from Hydra OVERRIDES",
        description="Compose the config with Hydra overrides and run its stage (stage.name). Re-running the "
                    "same command resumes from run_dir/checkpoints/last.ckpt (stage.resume=auto).",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=paper/llava_ov_7b/cold_start "
                                                "trainer.max_steps=10")
    p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    p.set_defaults(func=_train)
