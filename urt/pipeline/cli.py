"""`urt pipeline` and `urt sweep`: a whole method pipeline (urt/pipeline/core.py) and sweeps of pipelines
(urt/pipeline/sweeps.py), e.g.

    urt pipeline experiment=paper/qwen2_5_vl_7b/pipeline
    urt pipeline experiment=paper/qwen2_5_vl_7b/no_cold_start paths.runs=/scratch/runs
    urt pipeline experiment=paper/qwen2_5_vl_7b/pipeline model=tiny_qwen2_5_vl trainer=cpu trainer.max_steps=2 \
        stage.effective_batch_size=null sample.limit=8 "pipeline.eval.after=[]"                   # dry run

    urt sweep show experiments/sweeps/paper_ablations.txt            # every run with its task id
    urt sweep show experiments/sweeps/paper_ablations.txt --task-id 2 --shell   # what slurm/array.sbatch runs
    urt sweep collect runs/sweeps/paper_ablations                     # table.md, table.csv, plot.png
    urt sweep multirun hydra/launcher=submitit_slurm experiment=paper/qwen2_5_vl_7b/pipeline seed=0,1,2

`python -m urt.pipeline.cli sweep show FILE --task-id N --shell` answers like `urt sweep ...` without
importing the other packages' commands (nor torch).
"""

from __future__ import annotations

import argparse
import os
import sys


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

    from urt.pipeline.core import run_pipeline

    console = Console()
    pipe, results = run_pipeline(args.overrides, only=args.only, console_log=console.print)
    console.print(stage_table(results, title=f"{pipe.p.name} (held-out accuracy, %)"))
    console.print(str(pipe.dir / "results.json"))
    return 0


def _show(args: argparse.Namespace) -> int:
    from urt.pipeline.sweeps import parse_sweep_file, sweep_run

    if args.task_id is not None:
        run = sweep_run(args.sweep_file, args.task_id)
        print(run.shell() if args.shell else f"{run.task_id}\t{args.sweep_file}:{run.line}\t{run.shell()}")
        return 0
    for run in parse_sweep_file(args.sweep_file):
        print(run.shell() if args.shell else f"{run.task_id}\t{args.sweep_file}:{run.line}\t{run.shell()}")
    return 0


def _collect(args: argparse.Namespace) -> int:
    from urt.pipeline.sweeps import collect

    report = collect(args.sweep_dir, args.out)
    print(f"collected {len(report.runs)} run(s) ({report.rows} row(s)) from {args.sweep_dir}")
    for path, why in report.skipped:
        print(f"skipped {path}: {why}")
    if report.skipped:
        print(f"skipped {len(report.skipped)} unusable results.json file(s)")
    if report.ignored:
        print(f"ignored {len(report.ignored)} per-benchmark urt eval results.json file(s)")
    for path in (report.table_md, report.table_csv, report.plot_png):
        print(f"wrote {path}")
    return 0


def _multirun(args: argparse.Namespace) -> int:
    from urt.pipeline.sweeps import hydra_multirun

    return hydra_multirun(args.overrides, command=args.urt_command)


def _task_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"task id must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"task id must be >= 0, got {value}")
    return value


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

    p = subparsers.add_parser(
        "sweep",
        help="sweep files (one run's Hydra overrides per line) and the sweep results collector",
        description="Sweep files list one run per line (Hydra overrides, shell quoting, # comments); task ids "
                    "count the run lines from 0 (the Slurm array index of slurm/array.sbatch).",
    )
    sub = p.add_subparsers(dest="sweep_command", metavar="SWEEP_COMMAND", required=True)

    show = sub.add_parser("show", help="print the runs of a sweep file (or run N) with their task ids",
                          description="Print every run as `ID<TAB>FILE:LINE<TAB>OVERRIDES`, or only run N with "
                                      "--task-id N. With --shell only the shell-quoted overrides are printed "
                                      "(slurm/array.sbatch reads them with eval).")
    show.add_argument("sweep_file", metavar="SWEEP_FILE")
    show.add_argument("--task-id", type=_task_id, default=None, metavar="N",
                      help="only run N (0-based over the non-comment, non-blank lines)")
    show.add_argument("--shell", action="store_true", help="print only the shell-quoted overrides, one run per line")
    show.set_defaults(func=_show)

    col = sub.add_parser("collect", help="turn a sweep's results.json files into table.md, table.csv and plot.png",
                         description="Find every pipeline results.json below SWEEP_OUT_DIR and write table.md, "
                                     "table.csv (one row per run x stage) and plot.png (overall accuracy per "
                                     "stage, one line per run). Unusable files are skipped and listed.")
    col.add_argument("sweep_dir", metavar="SWEEP_OUT_DIR")
    col.add_argument("--out", default=None, metavar="DIR", help="where to write the table and plot (default: SWEEP_OUT_DIR)")
    col.set_defaults(func=_collect)

    mr = sub.add_parser("multirun", help="a small sweep through Hydra's multirun and a Hydra launcher "
                                         "(hydra/launcher=submitit_slurm: Slurm)",
                        description="Expand comma sweeps (seed=0,1,2) into Hydra multirun jobs; each runs `urt "
                                    "COMMAND <its overrides> paths.runs=<job dir>` in a fresh process, job dirs "
                                    "hydra.sweep.dir/<n> (default ${paths.runs}/sweeps/multirun/<date_time>). "
                                    "hydra/launcher=submitit_slurm submits the jobs to Slurm (pip install "
                                    "hydra-submitit-launcher). Collect with `urt sweep collect SWEEP_DIR`.")
    mr.add_argument("overrides", nargs="+", metavar="OVERRIDE",
                    help="Hydra overrides with comma sweeps, hydra/launcher=..., hydra.launcher.*=..., "
                         "hydra.sweep.dir=...")
    mr.add_argument("--command", dest="urt_command", default=os.environ.get("URT_COMMAND", "pipeline"),
                    help="the urt command every job runs (default: $URT_COMMAND, else pipeline)")
    mr.set_defaults(func=_multirun)


def main(argv: list[str] | None = None) -> int:
    """`python -m urt.pipeline.cli COMMAND ...` = `urt COMMAND ...` (pipeline, sweep) with only this package's
    commands registered: slurm scripts read sweep files with it without loading the other layers."""
    from urt.cli import main as urt_main

    return urt_main(argv, layers=["urt.pipeline.cli"])  # by name: under `python -m` this file is __main__


if __name__ == "__main__":
    sys.exit(main())
