"""`urt prompts …` subcommands.

`urt prompts render` writes the filled user text to stdout byte-exactly and nothing else — no
trailing newline is added (some templates end with one, some do not, the qwen3 ones end with
indentation), so `urt prompts render … > p.txt` gives exactly the text the model sees, as UTF-8
whatever the locale.
Values starting with "-" must be passed as `--answer1=-5`.
"""

from __future__ import annotations

import argparse
import sys

from urt.prompts.render import TASKS, TEMPLATE_SETS, available_templates, render_text, template_fields


def render_cmd(args: argparse.Namespace) -> int:
    text = render_text(
        args.set,
        args.task,
        caption=args.caption,
        question=args.question,
        answer1=args.answer1,
        answer2=args.answer2,
    )
    _write_exact(text)
    return 0


def _write_exact(text: str) -> None:
    # UTF-8 bytes straight to the binary buffer: no newline translation and no locale encoding
    # (the qwen3 templates contain curly quotes and en dashes). Fall back to text for streams
    # without a buffer (io.StringIO in contextlib.redirect_stdout).
    buf = getattr(sys.stdout, "buffer", None)
    if buf is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    sys.stdout.flush()
    buf.write(text.encode("utf-8"))
    buf.flush()


def list_cmd(args: argparse.Namespace) -> int:
    have = available_templates()
    width = max(len(t) for t in TASKS)
    lines = ["task".ljust(width) + "  " + "  ".join(s.ljust(8) for s in TEMPLATE_SETS)]
    for task in TASKS:
        cells = []
        for s in TEMPLATE_SETS:
            cells.append(("yes" if task in have[s] else "-").ljust(8))
        lines.append(task.ljust(width) + "  " + "  ".join(cells).rstrip())
    lines.append("")
    lines.append("placeholders:")
    for s in TEMPLATE_SETS:
        for task in have[s]:
            lines.append(f"  {s}/{task}: {', '.join(template_fields(s, task))}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prompts", help="show and render the judge prompt templates",
        description="Show and render the UnifiedReward-Think prompt templates.",
    )
    sub = p.add_subparsers(dest="prompts_command", metavar="SUBCOMMAND", required=True)

    r = sub.add_parser(
        "render",
        help="print one filled template (user text only, byte-exact, no trailing newline added)",
    )
    r.add_argument("--set", default="paper", choices=TEMPLATE_SETS, help="template set (default: paper)")
    r.add_argument("--task", required=True, choices=TASKS)
    r.add_argument("--caption", help="caption, for generation tasks")
    r.add_argument("--question", help="question, for understanding tasks")
    r.add_argument("--answer1", help="candidate answer 1, for understanding tasks")
    r.add_argument("--answer2", help="candidate answer 2, for understanding tasks")
    r.set_defaults(func=render_cmd)

    ls = sub.add_parser("list", help="list template sets x tasks and their placeholders")
    ls.set_defaults(func=list_cmd)
