"""`urt demo [demo=smoke] [OVERRIDES]`: the whole method on easy-vqa's real images, on a CPU.

Runs the demo pipeline (conf/demo/default.yaml: data -> vision pretraining -> grounding -> stage 0 base -> cold
start -> rejection sampling -> GRPO, evaluation after each stage), prints the stage x task table and writes report.json, report.md
and report.png into the pipeline directory; the last line printed is the path of report.json. Re-running
skips finished stages (an interrupted one resumes).
"""

from __future__ import annotations

import argparse
import json


def demo_overrides(overrides: list[str]) -> list[str]:
    """`demo=NAME` (the preset, conf/demo/) is an opt-in group: compose it as `+demo=NAME`."""
    out, picked = [], False
    for o in overrides:
        if o.lstrip("+").split("=", 1)[0] == "demo":
            o, picked = "+" + o.lstrip("+"), True
        out.append(o)
    return out if picked else ["+demo=default", *out]


def _quiet() -> None:
    """The demo prints its own progress: Lightning's start-up banners and these known-harmless warnings of
    every stage (deprecations inside Lightning, a validation-free run, frozen-by-design eval-mode modules)
    would bury it."""
    import logging
    import warnings

    import importlib

    importlib.import_module("lightning.pytorch")  # sets its loggers to INFO on import: import first, then quieten

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for msg in (".*LeafSpec.*", "Total length of .* across ranks is zero.*", r"Found \d+ module\(s\) in eval mode.*",
                "You passed in a `val_dataloader` but have no `validation_step`.*",
                "You have overridden `transfer_batch_to_device`.*", "Using ModelCheckpoint with manual optimization.*"):
        warnings.filterwarnings("ignore", message=msg)


def _run(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console

    from urt.demo.report import transition_lines, write_report
    from urt.pipeline.core import run_pipeline
    from urt.pipeline.cli import stage_table

    _quiet()
    console = Console()
    t0 = time.perf_counter()
    pipe, results = run_pipeline(demo_overrides(args.overrides), console_log=console.print)
    data = pipe.dir / "data" / "summary.json"
    report = write_report(pipe.dir, results, json.loads(data.read_text()) if data.exists() else None)
    shown = {"stages": report["stages"]}
    console.print(stage_table(shown, title="urt demo: held-out accuracy, CoT mode (%)"))
    if report.get("implicit"):
        console.print(stage_table({"stages": report["implicit"]}, title="implicit (direct answer) mode (%)"))
    for name, c in (report.get("soundness") or {}).items():  # correct judgements right for the right reasons
        console.print(f"  {name.replace('_', ' ')}: sound-correct {c['sound_correct']} / lucky-correct "
                      f"{c['lucky_correct']} of {c['n']} judgements")
    for k, v in report["checks"].items():
        console.print(f"  {k.replace('_', ' ')}: {'-' if v is None else ('yes' if v else 'NO')}")
    for line in transition_lines(report):
        console.print(f"  {line}")
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s; report: {pipe.dir / 'report.md'}, "
                  f"{pipe.dir / 'report.png'}")
    print(pipe.dir / "report.json")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the whole method on easy-vqa images on this CPU (data, base, cold start, RS, GRPO, eval)",
        description="Run the demo pipeline (conf/demo/; `demo=smoke` for a quick run) and write report.json, "
                    "report.md and report.png in its directory (default runs/demo). The last line printed is "
                    "the path of report.json.",
    )
    p.add_argument("overrides", nargs="*", help="demo=smoke, paths.runs=DIR, or any Hydra override")
    p.set_defaults(func=_run)
