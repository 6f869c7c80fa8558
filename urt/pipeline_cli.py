"""`urt pipeline experiment=NAME [OVERRIDES]`: a whole method pipeline (urt/pipeline.py), e.g.

    urt pipeline experiment=paper/qwen2_5_vl_7b/pipeline
    urt pipeline experiment=paper/qwen2_5_vl_7b/no_cold_start paths.runs=/scratch/runs
    urt pipeline experiment=paper/qwen2_5_vl_7b/pipeline model=tiny_qwen2_5_vl trainer=cpu trainer.max_steps=2 \
        stage.effective_batch_size=null sample.limit=8 "pipeline.eval.after=[]"                   # dry run
"""

from __future__ import annotations

import argparse


def stage_table(results: dict, title: str | None = None):
    """A rich table: one row per evaluated stage, overall / format / per-task accuracy / "1 is better" share."""
    from rich.table import Table

    from urt.data.schema import TASKS

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    t = Table(title=title)
    t.add_column("stage")
    for c in ("overall", "format", *(x.replace("_", " ") for x in TASKS), "answer 1 / gold 1"):
        t.add_column(c, justify="right")
    for name, s in results.get("stages", {}).items():
        tasks = s.get("tasks") or {}
        t.add_row(name, pct(s.get("overall")), pct(s.get("format_rate")), *(pct(tasks.get(x)) for x in TASKS),
                  f"{pct(s.get('answer_1_rate'))} / {pct(s.get('gold_1_rate'))}")
    return t


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from urt.pipeline import run_pipeline

    console = Console()
    pipe, results = run_pipeline(args.overrides, only=args.only, console_log=console.print)
    console.print(stage_table(results, title=f"{pipe.p.name} (held-out accuracy, %)"))
    console.print(str(pipe.dir / "results.json"))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pipeline",
        help="run a method pipeline (cold start -> rejection sampling -> GRPO, eval after each stage)",
        description="Compose conf/config.yaml with a pipeline experiment and overrides and run its steps in "
                    "order, each from the previous step's checkpoint; finished steps are skipped on re-run, an "
                    "interrupted one resumes. Writes <pipeline.dir>/results.json.",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=paper/qwen2_5_vl_7b/pipeline")
    p.add_argument("--only", nargs="+", default=None, metavar="STEP", help="run only these steps")
    p.set_defaults(func=_run)
