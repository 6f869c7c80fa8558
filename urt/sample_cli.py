"""`urt sample`: stage 2 rejection sampling (urt/stages/rejection.py) from Hydra overrides, e.g.

    urt sample model=tiny_qwen2_5_vl sample.shards=DIR sample.out_dir=OUT sample.k=4 sample.keep=all
"""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf


def _root_has_sample() -> bool:
    from urt.config import conf_dir

    root = OmegaConf.load(conf_dir() / "config.yaml")
    for item in root.get("defaults", []) or []:
        name = str(next(iter(item))) if OmegaConf.is_dict(item) else str(item)  # {group: option} or "_self_"
        if name.replace("optional ", "").lstrip("+").split("@")[0].strip() == "sample":
            return True
    return False


def compose_sample_config(overrides: list[str]):
    """The composed config with the `sample` group (added as `+sample=default` while the root defaults
    lack it; a `sample=NAME` override picks another option)."""
    from urt.config import compose_config

    overrides = list(overrides)
    if not _root_has_sample():
        picked = [o for o in overrides if o.split("=", 1)[0].lstrip("+") == "sample"]
        if picked:
            overrides = [("+" + o.lstrip("+")) if o in picked else o for o in overrides]
        else:
            overrides = ["+sample=default", *overrides]
    return compose_config(overrides)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from urt.models import load_model
    from urt.stages.rejection import rejection_sample, summary_table

    cfg = compose_sample_config(args.overrides)
    s = OmegaConf.to_container(cfg.sample, resolve=True)
    model_opts = OmegaConf.to_container(cfg.model, resolve=True)
    console = Console()
    bundle = load_model(**model_opts)
    progress = bool(s.pop("progress", True))
    report = rejection_sample(bundle, s.pop("shards"), s.pop("out_dir"), progress=False if args.quiet else progress,
                              **s)
    if args.quiet or not progress:  # rejection_sample printed the table itself otherwise
        console.print(summary_table(report.summary))
    tot = report.summary["total"]
    console.print(f"judged {tot['pairs']} pair(s) ({report.generated} generated now, {report.resumed} from "
                  f"{report.rollouts})")
    console.print(f"SFT  ({tot['sft_samples']} sample(s) from {tot['sft_pairs']} pair(s)): {report.sft_dir}")
    console.print(f"GRPO ({tot['grpo_pairs']} pair(s)): {report.grpo_dir}")
    console.print(f"summary: {report.out_dir / 'summary.json'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="stage 2 rejection sampling: judge every pair K times, split into SFT / GRPO shards",
        description="Compose conf/config.yaml (+ the `sample` group) with Hydra overrides, load cfg.model and "
                    "run rejection sampling on sample.shards into sample.out_dir (rollouts.jsonl, sft/, grpo/, "
                    "summary.json). Rerunning on the same out_dir resumes.",
    )
    p.add_argument("overrides", nargs="*",
                   help="Hydra overrides, e.g. model=tiny_qwen2_5_vl sample.shards=DIR sample.out_dir=OUT sample.k=4")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
