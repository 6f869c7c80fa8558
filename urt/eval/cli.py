"""`urt eval`: score a predictions file (no model) or run a model on a benchmark / shard set."""

from __future__ import annotations

import argparse
from pathlib import Path

from urt.errors import UrtError
from urt.eval.benchmarks import BENCHMARKS, MODES, load_items, load_shard_items, read_predictions, score
from urt.eval.report import pct, write_results
from urt.eval.runner import ORDERS, run_eval, source_info

_EPILOG = """\
examples:
  urt eval --predictions preds.jsonl --benchmark vl_rewardbench --benchmark-file vl_rewardbench.json --out res/
  urt eval --model tiny --family qwen2_5_vl --benchmark vl_rewardbench --benchmark-file vl_rewardbench.json \\
           --root media/ --order both --limit 100 --out res/
  urt eval --model ckpt/ --shards shards/val --mode implicit --out res/

predictions JSONL: {"key": ..., "output": ..., "swapped": false, "task": ...} per line (swapped: the model saw the
candidates reversed; its winner is mapped back). Writes OUT/results.json and OUT/results.md; a model run also
writes OUT/generations.jsonl (same format, resumable) and OUT/run.json.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a reward model on a benchmark, or re-score a predictions file",
        description="Evaluate pairwise judgements (docs/method.md §Evaluation): accuracy from <answer>, tau/diff "
                    "for GenAI-Bench and VideoGen-RewardBench, VL-RewardBench overall/macro under both groupings.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", help="predictions JSONL to score (no model)")
    src.add_argument("--model", help="model to run: a checkpoint folder, hub id or 'tiny' (with --family)")
    p.add_argument("--family", default=None, help="model family (required for 'tiny')")
    p.add_argument("--benchmark", choices=list(BENCHMARKS), default=None, help="benchmark name")
    p.add_argument("--benchmark-file", default=None, help="the benchmark's own file (JSON list / jsonl / parquet)")
    p.add_argument("--root", default=None, help="folder the benchmark's image/video paths resolve against "
                                                "(default: the benchmark file's folder)")
    p.add_argument("--shards", default=None, help="a shard set (directory) instead of a benchmark")
    p.add_argument("--mode", choices=list(MODES), default="cot",
                   help="cot: parse <answer> of a CoT; implicit: direct answers (ties possible; tau reported)")
    p.add_argument("--order", choices=list(ORDERS), default="random",
                   help="model runs: show each pair in a seeded random order, or in both orders")
    p.add_argument("--seed", type=int, default=0, help="seed of the random order (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="generation budget (default 1024)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames sampled per video (default: as the model was trained, from its folder's urt.json, "
                        "else 8)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval_cmd)


def _items(args):
    if (args.benchmark is None) == (args.shards is None):
        raise UrtError("give either --benchmark NAME with --benchmark-file PATH, or --shards DIR")
    if args.benchmark is not None:
        if not args.benchmark_file:
            raise UrtError(f"--benchmark {args.benchmark} needs --benchmark-file (the benchmark's own file)")
        return load_items(args.benchmark, args.benchmark_file, args.root, limit=args.limit)
    return load_shard_items(args.shards, limit=args.limit)


def _eval_cmd(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    if args.predictions is not None:
        items = _items(args)
        preds = read_predictions(args.predictions)
        src = source_info(args.benchmark, args.benchmark_file, args.shards)
        res = score(items, preds, benchmark=args.benchmark, mode=args.mode,
                    info={**src, "predictions": str(args.predictions)})
        write_results(res, args.out)
    else:
        if args.model == "tiny" and not args.family:
            raise UrtError("--model tiny needs --family")
        res = run_eval(args.out, model=args.model, family=args.family, benchmark=args.benchmark,
                       benchmark_file=args.benchmark_file, root=args.root, shards=args.shards, mode=args.mode,
                       order=args.order, seed=args.seed, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, limit=args.limit, frames=args.frames,
                       progress=not args.no_progress, log=lambda s: console.print(s, highlight=False))
    out = Console()
    c = res["counts"]
    line = f"{res.get('benchmark') or 'shards'} ({res['mode']}): accuracy {pct(res['accuracy'])}"
    if "diff" in res:
        line += f", tau {pct(res.get('tau'))}, diff {pct(res['diff'])}"
    if "vl_rewardbench" in res:
        vl = res["vl_rewardbench"]
        line += (f", macro {pct(vl['official']['macro'])} (official) / {pct(vl['official_script']['macro'])} "
                 f"(official_script)")
    out.print(line, highlight=False)
    out.print(f"{c['judgements']} judgement(s) over {c['items_predicted']}/{c['items']} item(s); missing "
              f"{c['missing']}, unknown keys {c['unknown']}; format valid {pct(res['format_valid_rate'])}", highlight=False)
    if c["missing"]:
        out.print(f"[bold yellow]incomplete:[/] {c['missing']} item(s) without prediction (first: "
                  f"{', '.join(c['missing_keys'][:5])})", highlight=False)
    out.print(f"wrote {Path(args.out) / 'results.json'} and results.md", highlight=False)
    return 0
