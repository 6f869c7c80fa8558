"""`urt judge`: judge one pair from the command line (urt.judge.Judge).

    urt judge --model CodeGoat24/UnifiedReward-Think-qwen-7b --images a.png b.png --caption "a red apple"
    urt judge --model ckpt/ --videos a.mp4 b.mp4 --caption "a dog surfing"
    urt judge --model tiny --family llava_onevision --question "What colour?" --answer1 red --answer2 blue --image x.png

Prints the chain of thought and the verdict (winner, totals, per-dimension scores), or with --json one
JSON object (`Verdict.to_dict()` plus the model and mode).

`urt rank`: groups of N candidates (JSONL, one group per line; urt/judge/rank.py) to per-candidate win
rates, rankings and DPO pairs (JSONL and parquet), resumable line by line:

    urt rank groups.jsonl --out ranked/ --model ckpt/ [--pairs-per-candidate 4] [--dpo all --min-margin 0.25]
"""

from __future__ import annotations

import argparse
import json
import sys

from urt.errors import UrtError


def _check(args: argparse.Namespace) -> str:
    """Which comparison the arguments ask for: "images", "videos" or "answers"."""
    kinds = [k for k, given in (("images", args.images), ("videos", args.videos), ("answers", args.question))
             if given is not None]
    if len(kinds) != 1:
        raise UrtError("give exactly one of --images A B, --videos A B or --question Q (with --answer1/--answer2)")
    kind = kinds[0]
    if kind in ("images", "videos"):
        if args.caption is None:
            raise UrtError(f"--{kind} needs --caption")
        extra = [f for f, v in (("--answer1", args.answer1), ("--answer2", args.answer2), ("--image", args.image),
                                ("--video", args.video)) if v is not None]
        if extra:
            raise UrtError(f"--{kind} does not take {', '.join(extra)}")
    else:
        if args.answer1 is None or args.answer2 is None:
            raise UrtError("--question needs --answer1 and --answer2")
        if (args.image is None) == (args.video is None):
            raise UrtError("--question needs exactly one of --image or --video")
        if args.caption is not None:
            raise UrtError("--caption is for --images/--videos; understanding tasks take --question")
    return kind


def _print(verdict, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    console = Console()
    console.print(Panel(escape(verdict.text) or "[dim](empty)[/dim]", title="model output", expand=False))
    noun = {"image_generation": "Image", "video_generation": "Video"}.get(verdict.task, "Answer")
    if verdict.scores:
        table = Table(title="per-dimension scores")
        table.add_column("dimension")
        table.add_column(f"{noun} 1", justify="right")
        table.add_column(f"{noun} 2", justify="right")
        for name, a, b in verdict.scores:
            table.add_row(escape(str(name)), str(a), str(b))
        if verdict.totals:
            table.add_row("[bold]total[/bold]", str(verdict.totals.get(1, "-")), str(verdict.totals.get(2, "-")),
                          end_section=False)
        console.print(table)
    elif verdict.totals:
        console.print(f"totals: {noun} 1 = {verdict.totals.get(1, '-')}, {noun} 2 = {verdict.totals.get(2, '-')}")
    if verdict.winner in (1, 2):
        said = f"{noun} {verdict.winner} is better"
    elif verdict.winner == "tie":
        said = "tie"
    else:
        said = "none (no valid answer in the output)"
    fmt = "ok" if verdict.format_ok else "invalid"
    console.print(f"winner: [bold]{escape(said)}[/bold]   format: {fmt}   task: {verdict.task}")


def _run(args: argparse.Namespace) -> int:
    from urt.generation import GenerationConfig
    from urt.judge.core import Judge

    kind = _check(args)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed, batch_size=1)
    opts = {} if args.device is None else {"device": args.device}
    if args.dtype is not None:
        opts["dtype"] = args.dtype
    judge = Judge(args.model, args.family, template_set=args.template_set, mode=args.mode, generation=gen,
                  frames=args.frames, **opts)
    if kind == "images":
        verdict = judge.compare_images(args.caption, *args.images)
    elif kind == "videos":
        verdict = judge.compare_videos(args.caption, *args.videos)
    else:
        verdict = judge.compare_answers(args.question, args.answer1, args.answer2, image=args.image, video=args.video)
    if args.json:
        out = dict(verdict.to_dict(), model=str(args.model), family=judge.family, mode=judge.mode,
                   template_set=judge.template_set)
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
    else:
        _print(verdict, args)
    return 0


def _add_model_args(p) -> None:
    p.add_argument("--model", default="tiny", help="checkpoint folder, hub id, or 'tiny' (random; needs no download)")
    p.add_argument("--family", default=None, help="model family (required only for 'tiny'; default qwen2_5_vl)")
    p.add_argument("--mode", choices=("cot", "implicit"), default="cot",
                   help="cot: chain-of-thought prompts; implicit: direct-answer ('w/o CoT') prompts")
    p.add_argument("--template-set", default=None, help="prompt template set (default: the family's)")


def _rank(args: argparse.Namespace) -> int:
    from urt.generation import GenerationConfig
    from urt.judge.core import Judge
    from urt.judge.rank import Ranker

    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed, batch_size=args.batch_size)
    opts = {} if args.device is None else {"device": args.device}
    if args.dtype is not None:
        opts["dtype"] = args.dtype
    judge = Judge(args.model, args.family, template_set=args.template_set, mode=args.mode, generation=gen,
                  frames=args.frames, **opts)
    ranker = Ranker(judge, args.out, both_orders=not args.one_order, pairs_per_candidate=args.pairs_per_candidate,
                    ties=args.ties, dpo=args.dpo, min_margin=args.min_margin, on_bad=args.on_bad,
                    groups_per_batch=args.groups_per_batch, verdict_text=not args.no_text,
                    progress=not args.no_progress)
    summary = ranker.run(args.inputs).to_dict()
    summary["out"] = str(args.out)
    sys.stdout.write(json.dumps(summary, ensure_ascii=False) + "\n")
    return 0


def _judge_arguments(p) -> None:
    """How `urt judge` and `urt rank` build their Judge: video frames, generation, device."""
    p.add_argument("--frames", type=int, default=None,
                   help="frames sampled uniformly per video (default: as the model was trained, else 8)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="generation budget (default 1024)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, help="auto (default), bfloat16, float16, float32")


def register_rank(subparsers) -> None:
    p = subparsers.add_parser(
        "rank",
        help="rank groups of N candidates with a judge: win rates, rankings and DPO pairs",
        description="Judge the pairs of each group (a caption + N images/videos, or a question + reference + N "
                    "answers; JSONL, one group per line) and write per-candidate win rates, a ranking and DPO "
                    "pairs (rankings.jsonl/.parquet, dpo.jsonl/.parquet, skipped.jsonl). Resumable: groups "
                    "already in --out are not judged again. Win rate = (wins + ties/2) / (wins + losses + ties) "
                    "over a candidate's verdicts; unparsable verdicts are counted apart.",
    )
    p.add_argument("inputs", nargs="+", help="JSONL files, or folders of *.jsonl shards")
    p.add_argument("--out", required=True, help="output folder")
    _add_model_args(p)
    p.add_argument("--one-order", action="store_true",
                   help="judge each pair once (lower index first) instead of in both orders")
    p.add_argument("--pairs-per-candidate", type=int, default=None,
                   help="opponents per candidate for large groups (default: every pair)")
    p.add_argument("--ties", choices=("half", "apart"), default="half",
                   help="half: a tie counts half a win; apart: ties leave the denominator (wins / (wins+losses))")
    p.add_argument("--dpo", choices=("best-worst", "all"), default="best-worst",
                   help="DPO pairs per group: the top vs the bottom candidate, or every pair over --min-margin")
    p.add_argument("--min-margin", type=float, default=0.0,
                   help="a DPO pair needs a win-rate difference above this (default 0: any preference)")
    p.add_argument("--on-bad", choices=("skip", "drop", "fail"), default="skip",
                   help="a missing / undecodable file: skip its group (default), drop the candidate, or fail")
    p.add_argument("--groups-per-batch", type=int, default=4, help="groups whose pairs are judged together")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per generate call (default 8)")
    _judge_arguments(p)
    p.add_argument("--no-text", action="store_true", help="leave the verdicts' chains of thought out of the output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_rank)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "judge",
        help="judge one pair of images, videos or answers with a UnifiedReward-Think model",
        description="Compare two generated images/videos for a caption, or two answers to a question about an "
                    "image/video, and print the model's chain of thought and verdict.",
    )
    p.add_argument("--model", default="tiny", help="checkpoint folder, hub id, or 'tiny' (random; needs no download)")
    p.add_argument("--family", default=None, help="model family (required only for 'tiny'; default qwen2_5_vl)")
    p.add_argument("--mode", choices=("cot", "implicit"), default="cot",
                   help="cot: chain-of-thought prompts; implicit: direct-answer ('w/o CoT') prompts")
    p.add_argument("--template-set", default=None, help="prompt template set (default: the family's)")
    p.add_argument("--images", nargs=2, metavar=("IMAGE1", "IMAGE2"), help="two generated images")
    p.add_argument("--videos", nargs=2, metavar=("VIDEO1", "VIDEO2"), help="two generated videos")
    p.add_argument("--caption", help="the generation prompt the images/videos were made for")
    p.add_argument("--question", help="a question about --image/--video")
    p.add_argument("--answer1", help="candidate answer 1")
    p.add_argument("--answer2", help="candidate answer 2")
    p.add_argument("--image", help="the image the question is about")
    p.add_argument("--video", help="the video the question is about")
    _judge_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the rich report")
    p.set_defaults(func=_run)
    register_rank(subparsers)
