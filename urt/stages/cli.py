"""The stages' commands, each a composed config handed to the function a pipeline step of that kind runs too
(urt.pipeline.steps):

    urt train [OVERRIDES]      urt.train.train(cfg): SFT or GRPO by `stage` (cold start, stage 2, stage 3)
    urt sample [OVERRIDES]     urt.stages.rejection.run_sample(cfg): stage 2 rejection sampling
    urt distill --shards DIR --out DIR [--teacher rule|openai] [FLAGS] [OVERRIDES]
                               urt.stages.distill.run_distill(cfg): teacher CoT -> SFT shards (stage 1 data)

e.g. `urt train experiment=paper/qwen2_5_vl_7b/cold_start`,
`urt sample model=tiny_qwen2_5_vl sample.shards=DIR sample.out_dir=OUT sample.k=4 sample.keep=all`.
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from urt.config import compose_config, conf_dir, group_override, to_yaml
from urt.errors import UrtError


# ------------------------------------------------------------------------------------------ urt train
def _train(args: argparse.Namespace) -> int:
    from urt.stages.run import run_dir
    from urt.train import train

    cfg = compose_config(args.overrides)
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    print(f"run dir: {run_dir(cfg)}", flush=True)
    out = train(cfg)
    print(f"hf folder: {out}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------ urt sample
def compose_sample_config(overrides: list[str]):
    """The composed config with the `sample` group (added as `+sample=default` while the root defaults
    lack it; a `sample=NAME` override picks another option)."""
    picked = [o.split("=", 1)[1] for o in overrides if "=" in o and o.split("=", 1)[0].lstrip("+") == "sample"]
    rest = [o for o in overrides if not ("=" in o and o.split("=", 1)[0].lstrip("+") == "sample")]
    return compose_config([group_override("sample", picked[-1] if picked else "default"), *rest])


def _sample(args: argparse.Namespace) -> int:
    from urt.stages.rejection import run_sample

    cfg = compose_sample_config(args.overrides)
    if args.quiet:
        cfg.sample.progress = False
    run_sample(cfg)
    return 0


# ------------------------------------------------------------------------------------------ urt distill
# Flags that set the cfg.distill setting of the same name (dest), when given.
_DISTILL_FLAGS = ("base_url", "model", "template_set", "concurrency", "timeout", "max_retries", "temperature",
                  "max_tokens", "seed", "batch_size", "shard_maxcount", "limit", "tasks")


def compose_distill_config(args: argparse.Namespace):
    """`+distill=<teacher>` (conf/distill/<teacher>.yaml) and the trailing overrides, then the flags given on the
    command line onto cfg.distill; a flag the teacher's settings lack is an error naming it."""
    teacher = args.teacher or "rule"
    cfg = compose_config([group_override("distill", teacher), *args.overrides])
    named = cfg.distill.get("teacher", teacher)
    if named != teacher:
        raise UrtError(f"conf/distill/{teacher}.yaml names teacher {named!r} (distill.teacher)")
    given = {name: getattr(args, name) for name in _DISTILL_FLAGS if getattr(args, name, None) is not None}
    given.update(shards=args.shards, out_dir=args.out)
    if args.no_agreement:
        given["require_agreement"] = False
    if args.no_resume:
        given["resume"] = False
    if args.retry_failed:
        given["retry_failed"] = True
    if args.no_progress:
        given["progress"] = False
    for key, value in given.items():
        if key not in cfg.distill:
            flag = "--" + {"out_dir": "out"}.get(key, key).replace("_", "-")
            raise UrtError(f"{flag}: the {teacher} teacher has no setting distill.{key} "
                           f"({conf_dir() / 'distill' / f'{teacher}.yaml'})")
        OmegaConf.update(cfg, f"distill.{key}", value)
    return cfg


def _distill(args: argparse.Namespace) -> int:
    from urt.stages.distill import run_distill

    run_distill(compose_distill_config(args))
    return 0


def register(subparsers) -> None:
    from urt.data.schema import TASKS

    p = subparsers.add_parser(
        "train",
        help="train a stage (SFT: cold start / rejection sampling; GRPO) from Hydra OVERRIDES",
        description="Compose the config with Hydra overrides and run its stage (stage.name). Re-running the "
                    "same command resumes from run_dir/checkpoints/last.ckpt (stage.resume=auto).",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=paper/llava_ov_7b/cold_start "
                                                "trainer.max_steps=10")
    p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    p.set_defaults(func=_train)

    p = subparsers.add_parser(
        "sample",
        help="stage 2 rejection sampling: judge every pair K times, split into SFT / GRPO shards",
        description="Compose conf/config.yaml (+ the `sample` group) with Hydra overrides, load cfg.model and "
                    "run rejection sampling on sample.shards into sample.out_dir (rollouts.jsonl, sft/, grpo/, "
                    "summary.json). Rerunning on the same out_dir resumes.",
    )
    p.add_argument("overrides", nargs="*",
                   help="Hydra overrides, e.g. model=tiny_qwen2_5_vl sample.shards=DIR sample.out_dir=OUT sample.k=4")
    p.add_argument("--quiet", action="store_true", help="no progress bar (sample.progress=false)")
    p.set_defaults(func=_sample)

    p = subparsers.add_parser(
        "distill", help="teacher CoT judgements -> SFT shards (stage 1 cold start data)",
        description="Have a teacher (a chat-completions server, e.g. GPT-4o, or the rule teacher) write CoT "
                    "judgements for the samples of --shards, keep the well-formatted ones that agree with "
                    "the human label, and write them (cot set) as shards in --out. Resumable: rerunning "
                    "skips the keys already recorded in OUT/results.jsonl. Settings come from "
                    "conf/distill/<teacher>.yaml; trailing arguments are Hydra overrides of it (e.g. "
                    "distill.temperature=0.7), and a flag given wins over both. API keys are read from "
                    "$URT_TEACHER_API_KEY / $OPENAI_API_KEY, never from a flag.")
    p.add_argument("--shards", required=True, help="input shards (directory, glob or brace pattern)")
    p.add_argument("--out", required=True, help="output directory (shards, results.jsonl, report.json)")
    p.add_argument("--teacher", choices=("rule", "openai"), default=None, help="teacher (default: rule)")
    p.add_argument("--base-url", dest="base_url", default=None,
                   help="chat-completions base URL, e.g. http://127.0.0.1:8000/v1 (default: OpenAI)")
    p.add_argument("--model", default=None, help="teacher model name (default from the config: gpt-4o)")
    p.add_argument("--template-set", dest="template_set", default=None, help="prompt template set (paper)")
    p.add_argument("--concurrency", type=int, default=None, help="parallel requests")
    p.add_argument("--timeout", type=float, default=None, help="seconds per request")
    p.add_argument("--max-retries", dest="max_retries", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="rule teacher / backoff jitter seed")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                   help="samples handed to the teacher at once (default 4 x concurrency)")
    p.add_argument("--shard-maxcount", dest="shard_maxcount", type=int, default=None)
    p.add_argument("--no-agreement", action="store_true",
                   help="keep well-formatted traces even when their answer disagrees with the label")
    p.add_argument("--limit", type=int, default=None, help="only the first N input samples")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None, help="only these tasks")
    p.add_argument("--no-resume", action="store_true", help="start results.jsonl afresh")
    p.add_argument("--retry-failed", action="store_true",
                   help="re-send keys recorded as timeout/unreachable/rate_limited/http_5xx")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / table")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. distill.concurrency=4")
    p.set_defaults(func=_distill)
