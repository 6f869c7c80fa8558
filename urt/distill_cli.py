"""`urt distill`: teacher CoT → SFT shards (stage 1 cold start data; urt.stages.distill).

Settings come from `conf/distill/<teacher>.yaml` (composed with Hydra, so `distill.concurrency=4`
style overrides work as trailing arguments), then any flag given on the command line wins. API keys
are read from $URT_TEACHER_API_KEY / $OPENAI_API_KEY, never from a flag.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from urt.errors import UrtError

_TEACHER_OPTS = ("base_url", "model", "template_set", "concurrency", "timeout", "max_retries", "backoff_base",
                 "backoff_max", "temperature", "max_tokens", "image_format", "frames", "max_pixels", "seed")


def _settings(args: argparse.Namespace) -> dict:
    from omegaconf import OmegaConf

    from urt.config import compose_config

    teacher = args.teacher or "rule"
    cfg = compose_config([f"+distill={teacher}", *args.overrides])
    conf = OmegaConf.to_container(cfg.distill, resolve=True)
    if conf.get("teacher", teacher) != teacher:
        raise UrtError(f"conf/distill/{teacher}.yaml names teacher {conf.get('teacher')!r}")
    conf["teacher"] = teacher
    for name in _TEACHER_OPTS + ("batch_size", "shard_maxcount"):
        v = getattr(args, name, None)
        if v is not None:
            conf[name] = v
    if args.no_agreement:
        conf["require_agreement"] = False
    return conf


def _distill(args: argparse.Namespace) -> int:
    from urt.data.shards import SkipStats, iter_headers, read_shards
    from urt.stages.distill import distill, make_teacher

    conf = _settings(args)
    src, out = Path(args.shards), Path(args.out)
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise UrtError("--out must not be the input shard directory (its shards are rewritten)")
    kind = conf.pop("teacher")
    teacher_opts = {k: conf.get(k) for k in _TEACHER_OPTS if k in conf}
    if kind == "rule":
        teacher_opts = {k: teacher_opts.get(k) for k in ("template_set", "seed")}
    teacher = make_teacher(kind, **teacher_opts)

    tasks = args.tasks or None
    total = None
    if not args.no_progress:
        total = sum(1 for _, h in iter_headers(str(src), on_error="skip") if not tasks or h.get("task") in tasks)
        if args.limit is not None:
            total = min(total, args.limit)
    stats = SkipStats()
    samples = read_shards(str(src), on_error="skip", stats=stats, frames=int(conf.get("frames") or 8))
    report = distill(samples, teacher, out, require_agreement=bool(conf.get("require_agreement", True)),
                     shard_maxcount=int(conf.get("shard_maxcount") or 1000), progress=not args.no_progress,
                     resume=not args.no_resume, retry_failed=args.retry_failed, tasks=tasks, limit=args.limit,
                     batch_size=conf.get("batch_size"), total=total)
    if stats.total_skipped:
        print(f"urt distill: unreadable input samples skipped: {stats.summary()}")
    if args.no_progress:
        print(f"kept {report.kept} of {report.total}: "
              + ", ".join(f"{k}={v}" for k, v in report.counts.items()))
    return 0


def register(subparsers) -> None:
    from urt.data.schema import TASKS

    p = subparsers.add_parser(
        "distill", help="teacher CoT judgements -> SFT shards (stage 1 cold start data)",
        description="Have a teacher (a chat-completions server, e.g. GPT-4o, or the rule teacher) write CoT "
                    "judgements for the samples of --shards, keep the well-formatted ones that agree with "
                    "the human label, and write them (cot set) as shards in --out. Resumable: rerunning "
                    "skips the keys already recorded in OUT/results.jsonl. Trailing arguments are Hydra "
                    "overrides of conf/distill/<teacher>.yaml, e.g. distill.temperature=0.7.")
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
