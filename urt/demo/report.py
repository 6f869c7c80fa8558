"""The demo's report: report.json, report.md and report.png in the pipeline directory.

report.json::

    {"stages": {"base": S, "cold_start": S, "rejection_sampling": S, "grpo": S},   # CoT mode
     "implicit": {"base": S, ...},          # direct-answer (implicit prompt) figures beside
     "grpo_curve": [{"step": 1, "reward": r, "accuracy": a, "format": f}, ...],
     "vision": {"heldout_before": {...}, "heldout_after": {...}},  # the vision step's attribute heads, if run
     "transitions": {"grpo_vs_rejection_sampling": {"n": 400, "gained": g, "lost": l, "p_value": p}, ...},
     "data": {...}, "seconds": {...}, "checks": {...}}

where S = {"overall", "format_rate", "answer_1_rate", "gold_1_rate", "tasks": {task: acc}, ...}.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from urt.data.schema import TASKS

REPORT_STAGES = ("base", "cold_start", "rejection_sampling", "grpo")


def grpo_curve(run_dir: Path) -> list[dict]:
    """Per-step GRPO reward / accuracy / format reward from the run's CSV metrics (empty if none)."""
    rows: dict[int, dict] = {}
    for path in sorted(Path(run_dir).glob("csv/**/metrics.csv")):
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                if not r.get("train/reward"):
                    continue
                step = int(float(r.get("step") or 0)) + 1
                rows[step] = {"step": step, "reward": float(r["train/reward"]),
                              "accuracy": _float(r.get("train/rewards/accuracy")),
                              "format": _float(r.get("train/rewards/format"))}
    return [rows[k] for k in sorted(rows)]


def _float(v):
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def checks(stages: dict) -> dict:
    """The ablation shape the demo is meant to show (issue #7), each as a boolean (None: not evaluated)."""
    def acc(s):
        return (stages.get(s) or {}).get("overall")

    cs, rs, gr = acc("cold_start"), acc("rejection_sampling"), acc("grpo")
    fmt = (stages.get("rejection_sampling") or {}).get("format_rate")
    return {
        "rejection_sampling_above_cold_start": None if None in (cs, rs) else rs > cs,
        "grpo_at_or_above_rejection_sampling": None if None in (rs, gr) else gr >= rs,
        "format_rate_after_rejection_sampling_at_least_0.95": None if fmt is None else fmt >= 0.95,
        "final_overall_at_least_0.80": None if gr is None else gr >= 0.80,
    }


def transitions(pipe_dir: Path, stages: list[str], mode: str = "cot") -> dict:
    """Each evaluated stage against the one before it on the same held-out judgements: how many it gets right
    that the previous stage got wrong (gained), the reverse (lost), and the exact McNemar p-value; whether a
    row of the table differs from the one above it by more than a few flipped judgements. Stages whose
    generations are missing are left out."""
    from urt.eval.benchmarks import judgement_outcomes, load_shard_items, paired_comparison
    from urt.eval.runner import read_generations

    outcomes: dict[str, dict] = {}
    items: dict[str, list] = {}
    for name in stages:
        d = Path(pipe_dir) / "eval" / name / f"shards-{mode}"
        gen, res = d / "generations.jsonl", d / "results.json"
        if not (gen.is_file() and res.is_file()):
            continue
        shards = json.loads(res.read_text()).get("shards")
        if not shards or not Path(shards).is_dir():
            shards = str(Path(pipe_dir) / "data" / "test")  # the demo's held-out pairs (the run directory moved)
        if shards not in items:
            items[shards] = load_shard_items(shards)
        outcomes[name] = judgement_outcomes(items[shards], read_generations(gen), mode=mode)
    names = list(outcomes)
    return {f"{b}_vs_{a}": paired_comparison(outcomes[a], outcomes[b]) for a, b in zip(names, names[1:])}


def transition_lines(report: dict) -> list[str]:
    out = []
    for k, t in (report.get("transitions") or {}).items():
        after, before = k.split("_vs_")
        out.append(f"{after.replace('_', ' ')} vs {before.replace('_', ' ')}: +{t['gained']} / -{t['lost']} "
                   f"judgements of {t['n']} (McNemar p = {t['p_value']:.2g})")
    return out


def build_report(pipe_dir: Path, results: dict, *, data_summary: dict | None = None) -> dict:
    stages, implicit = {}, {}
    for name in REPORT_STAGES:
        s = results.get("stages", {}).get(name)
        if not s:
            continue
        modes = s.get("modes", {})
        cot = (modes.get("cot") or {}).get("shards")
        imp = (modes.get("implicit") or {}).get("shards")
        if cot:
            stages[name] = cot
        if imp:
            implicit[name] = imp
    seconds = {}  # per step, in the order the steps finished
    done_files = sorted(Path(pipe_dir).glob("*/DONE"), key=lambda p: p.stat().st_mtime)
    for d in (p.parent for p in done_files):
        done = d / "DONE"
        if done.is_file():
            try:
                seconds[d.name] = round(json.loads(done.read_text()).get("seconds", 0.0), 1)
            except (json.JSONDecodeError, AttributeError):
                pass
    vision = {}
    vj = Path(pipe_dir) / "vision" / "vision.json"
    if vj.is_file():
        v = json.loads(vj.read_text())
        vision = {k: v.get(k) for k in ("heldout_before", "heldout_after")}
    return {"stages": stages, "implicit": implicit, "grpo_curve": grpo_curve(Path(pipe_dir) / "grpo"),
            "vision": vision, "data": data_summary or {}, "seconds": seconds, "checks": checks(stages),
            "transitions": transitions(Path(pipe_dir), list(stages))}


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def markdown(report: dict, title: str = "urt demo") -> str:
    head = ["stage", "overall", "format", *TASKS, "says 1 / gold 1"]
    lines = [f"# {title}", "", "Held-out easy-vqa pairs, both orders of every pair; accuracy in %.", "",
             "## CoT mode", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name, s):
        return ("| " + " | ".join([name, _pct(s.get("overall")), _pct(s.get("format_rate")),
                                   *(_pct((s.get("tasks") or {}).get(t)) for t in TASKS),
                                   f"{_pct(s.get('answer_1_rate'))} / {_pct(s.get('gold_1_rate'))}"]) + " |")

    lines += [row(n, s) for n, s in report["stages"].items()]
    if report.get("implicit"):
        lines += ["", "## Implicit (direct answer) mode", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += [row(n, s) for n, s in report["implicit"].items()]
    lines += ["", "## Checks", ""]
    lines += [f"- {k.replace('_', ' ')}: {'–' if v is None else ('yes' if v else 'NO')}"
              for k, v in report["checks"].items()]
    if report.get("transitions"):
        lines += ["", "## Each stage against the one before (the same held-out judgements, CoT)", ""]
        lines += [f"- {x}" for x in transition_lines(report)]
    if (report.get("vision") or {}).get("heldout_after"):
        v = report["vision"]
        lines += ["", "## Vision pretraining (held-out visuals, attribute heads, %)", "",
                  ", ".join(f"{k.replace('_', ' ')} {_pct((v.get('heldout_before') or {}).get(k))} -> {_pct(a)}"
                            for k, a in v["heldout_after"].items())]
    if report.get("seconds"):
        lines += ["", "## Time per step (s)", "", ", ".join(f"{k} {v}" for k, v in report["seconds"].items())]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(report["stages"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    cols = ["overall", *TASKS]
    width = 0.8 / max(1, len(stages))
    for i, st in enumerate(stages):
        s = report["stages"][st]
        vals = [s.get("overall")] + [(s.get("tasks") or {}).get(t) for t in TASKS]
        ax.bar([c + i * width for c in range(len(cols))], [0 if v is None else v for v in vals], width, label=st)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks([c + width * (len(stages) - 1) / 2 for c in range(len(cols))])
    ax.set_xticklabels([c.replace("_", "\n") for c in cols], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy (CoT)")
    ax.set_title("accuracy per stage and task")
    ax.legend(fontsize=8)
    ax = axes[1]
    curve = report.get("grpo_curve") or []
    if curve:
        steps = [r["step"] for r in curve]
        ax.plot(steps, [r["reward"] for r in curve], label="reward (format + accuracy)")
        if any(r.get("accuracy") is not None for r in curve):
            ax.plot(steps, [r.get("accuracy") for r in curve], label="accuracy reward")
        ax.set_xlabel("GRPO step")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no GRPO steps", ha="center", va="center")
    ax.set_title("GRPO reward (training rollouts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(pipe_dir: Path, results: dict, data_summary: dict | None = None) -> dict:
    pipe_dir = Path(pipe_dir)
    report = build_report(pipe_dir, results, data_summary=data_summary)
    (pipe_dir / "report.json").write_text(json.dumps(report, indent=2))
    (pipe_dir / "report.md").write_text(markdown(report))
    plot(report, pipe_dir / "report.png")
    return report
