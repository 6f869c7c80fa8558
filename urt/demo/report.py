"""The demo's report: report.json, report.md and report.png in the pipeline directory.

report.json::

    {"stages": {"base": S, "cold_start": S, "rejection_sampling": S, "grpo": S,   # CoT mode
                "grpo_paper_reward": S},             # the outcome-only ablation (demo=paper_reward), if run
     "implicit": {"base": S, ...},          # direct-answer (implicit prompt) figures beside
     "soundness": {stage: C},               # CoT chains checked against the samples' attributes (urt/demo/chain.py)
     "grpo_curve": [{"step": 1, "reward": r, "accuracy": a, "format": f, "chain": c}, ...],
     "grpo_paper_reward_curve": [...],
     "rollouts": {"grpo": R, "grpo_paper_reward": R},   # what each GRPO run's reward paid for (rollout_soundness)
     "rejection_sampling_data": {"n", "sound", "tasks": {task: {"n", "sound"}}},  # its SFT traces (trace_soundness)
     "vision": {"heldout_before": {...}, "heldout_after": {...}},  # the vision step's attribute heads, if run
     "transitions": {"grpo_vs_rejection_sampling": {"n": 400, "gained": g, "lost": l, "p_value": p,
                                                    "sound_correct": {"n", "gained", "lost", "p_value"}}, ...},
     "data": {...}, "seconds": {...}, "checks": {...}}

where S = {"overall", "format_rate", "answer_1_rate", "gold_1_rate", "tasks": {task: acc}, ...} and
C = {"n", "sound_correct", "lucky_correct", "wrong", "kinds": {"sound": n, "unparsable": n, "broken": n,
"reading": n, "perception": n, "verdict": n}, "tasks": {task: {the same counts}}}: counts of judgements; a chain's
kind is "sound" or the kind of its first wrong step, over right and wrong judgements alike.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from urt.data.schema import TASKS

REPORT_STAGES = ("base", "cold_start", "rejection_sampling", "grpo", "grpo_paper_reward")
# (after, before) pairs compared on the same held-out judgements: each stage against the one before it, the
# outcome-only ablation against the model it starts from, and the demo's GRPO against that ablation
COMPARISONS = (("cold_start", "base"), ("rejection_sampling", "cold_start"), ("grpo", "rejection_sampling"),
               ("grpo_paper_reward", "rejection_sampling"), ("grpo", "grpo_paper_reward"))


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
                if r.get("train/rewards/chain"):
                    rows[step]["chain"] = _float(r["train/rewards/chain"])
    return [rows[k] for k in sorted(rows)]


def _float(v):
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def checks(stages: dict, transitions: dict | None = None, soundness: dict | None = None) -> dict:
    """The ablation shape the demo is meant to show (issues #7, #32), each as a boolean (None: not evaluated)."""
    def acc(s):
        return (stages.get(s) or {}).get("overall")

    cs, rs, gr = acc("cold_start"), acc("rejection_sampling"), acc("grpo")
    fmt = (stages.get("rejection_sampling") or {}).get("format_rate")
    out = {
        "rejection_sampling_above_cold_start": None if None in (cs, rs) else rs > cs,
        "grpo_at_or_above_rejection_sampling": None if None in (rs, gr) else gr >= rs,
        "format_rate_after_rejection_sampling_at_least_0.95": None if fmt is None else fmt >= 0.95,
        "final_overall_at_least_0.80": None if gr is None else gr >= 0.80,
    }
    t = (transitions or {}).get("grpo_vs_rejection_sampling")
    out["grpo_above_rejection_sampling_mcnemar_p_below_0.05"] = (
        None if t is None else t["gained"] > t["lost"] and t["p_value"] < 0.05)
    snd = soundness or {}
    out["grpo_more_sound_correct_than_rejection_sampling"] = (
        None if not ("grpo" in snd and "rejection_sampling" in snd)
        else snd["grpo"]["sound_correct"] > snd["rejection_sampling"]["sound_correct"])
    return out


def judgements(pipe_dir: Path, name: str, mode: str = "cot") -> list[tuple[tuple[str, bool], str, object]] | None:
    """Stage `name`'s held-out judgements: ((key, swapped), task, ChainCheck) each, the chain checked against the
    sample as shown (urt.demo.chain.check_chain); None if its generations are missing."""
    from urt.demo.chain import check_chain
    from urt.eval.benchmarks import load_shard_items
    from urt.eval.runner import read_generations

    d = Path(pipe_dir) / "eval" / name / f"shards-{mode}"
    gen, res = d / "generations.jsonl", d / "results.json"
    if not (gen.is_file() and res.is_file()):
        return None
    shards = json.loads(res.read_text()).get("shards")
    if not shards or not Path(shards).is_dir():
        shards = str(Path(pipe_dir) / "data" / "test")  # the demo's held-out pairs (the run directory moved)
    items = {it.key: it for it in load_shard_items(shards)}
    out = []
    for pr in read_generations(gen):
        it = items[pr.key]
        label = 3 - int(it.label) if pr.swapped else int(it.label)  # as shown
        out.append(((pr.key, pr.swapped), it.task, check_chain(pr.output, it.task, it.meta, label, swapped=pr.swapped)))
    return out


def _counts(checks: list) -> dict:
    from urt.demo.chain import ERROR_KINDS

    kinds = {k: 0 for k in ("sound", *ERROR_KINDS)}
    out = {"n": len(checks), "sound_correct": 0, "lucky_correct": 0, "wrong": 0}
    for c in checks:
        out[c.outcome] += 1
        kinds[c.kind] += 1
    return {**out, "kinds": kinds}


def soundness(judged: dict[str, list]) -> dict:
    """Per stage and task: how many judgements are sound-correct (right, every step of the chain agrees with the
    sample's attributes), lucky-correct (right, some step wrong) or wrong, and the kind of each chain's first
    wrong step."""
    out = {}
    for name, js in judged.items():
        by_task: dict[str, list] = {}
        for _, task, c in js:
            by_task.setdefault(task, []).append(c)
        out[name] = {**_counts([c for _, _, c in js]),
                     "tasks": {t: _counts(by_task[t]) for t in TASKS if t in by_task}}
    return out


def rollout_soundness(run_dir: Path, shards: Path) -> dict | None:
    """What a GRPO run's reward paid for: its rollouts' chains checked against their samples (`shards`: the run's
    training pairs) — correct and sound-correct completions, the share of the positive advantage that went to
    completions that were not sound-correct, and how many groups held a sound-correct completion, in all and over
    the first and last quarter of the steps. None without rollout tables."""
    from urt.data.shards import iter_headers
    from urt.demo.chain import check_chain
    from urt.rollouts import load_rollouts

    if not any(Path(run_dir).glob("rollouts/step-*.parquet")) or not Path(shards).is_dir():
        return None
    df = load_rollouts(run_dir)
    metas = {h["key"]: h["meta"] for _, h in iter_headers(shards, on_error="raise")}
    rows = []
    for r in df.itertuples():
        c = check_chain(r.completion if isinstance(r.completion, str) else "", r.task, metas[r.prompt_key],
                        int(r.label), swapped=bool(r.swapped))
        rows.append((int(r.step), int(r.group), c.correct, c.outcome == "sound_correct", float(r.advantage)))

    def summary(rs: list) -> dict:
        groups: dict = {}
        for st, g, _, sc, _ in rs:
            groups[(st, g)] = groups.get((st, g), False) or sc
        pos = sum(a for *_, a in rs if a > 0)
        return {"n": len(rs), "correct": sum(r[2] for r in rs), "sound_correct": sum(r[3] for r in rs),
                "positive_advantage_not_sound_correct": (sum(a for *_, sc, a in rs if a > 0 and not sc) / pos
                                                         if pos else None),
                "groups": len(groups), "groups_with_sound_correct": sum(groups.values())}

    steps = sorted({r[0] for r in rows})
    q = max(1, len(steps) // 4)
    return {**summary(rows), "first_quarter": summary([r for r in rows if r[0] in set(steps[:q])]),
            "last_quarter": summary([r for r in rows if r[0] in set(steps[-q:])])}


def trace_soundness(shards: Path) -> dict | None:
    """How many of the traces rejection sampling kept as SFT data (`rs_sample/sft`: correct by construction) are
    sound, in all and per task; None without the shards."""
    from urt.data.shards import iter_headers
    from urt.demo.chain import check_chain

    if not Path(shards).is_dir():
        return None
    out: dict = {"n": 0, "sound": 0, "tasks": {}}
    for _, h in iter_headers(shards, on_error="raise"):
        ok = check_chain(h.get("cot") or "", h["task"], h["meta"], int(h["label"])).sound  # meta["swapped"]: as shown
        t = out["tasks"].setdefault(h["task"], {"n": 0, "sound": 0})
        for d in (out, t):
            d["n"] += 1
            d["sound"] += ok
    return out


def transitions(judged: dict[str, list]) -> dict:
    """Stages compared on the same held-out judgements (COMPARISONS, those both evaluated): how many the later one
    gets right that the earlier got wrong (gained), the reverse (lost), and the exact McNemar p-value; the same for
    sound-correct judgements (`sound_correct`): whether a row differs from the one it is compared with by more
    than a few flipped judgements, and whether the gain is in chains that are right for the right reasons."""
    from urt.eval.benchmarks import paired_comparison

    out = {}
    for after, before in COMPARISONS:
        if after not in judged or before not in judged:
            continue
        a, b = ({k: c for k, _, c in judged[n]} for n in (after, before))
        t = paired_comparison({k: c.correct for k, c in b.items()}, {k: c.correct for k, c in a.items()})
        t["sound_correct"] = paired_comparison({k: c.outcome == "sound_correct" for k, c in b.items()},
                                               {k: c.outcome == "sound_correct" for k, c in a.items()})
        out[f"{after}_vs_{before}"] = t
    return out


def transition_lines(report: dict) -> list[str]:
    out = []
    for k, t in (report.get("transitions") or {}).items():
        after, before = k.split("_vs_")
        line = (f"{after.replace('_', ' ')} vs {before.replace('_', ' ')}: +{t['gained']} / -{t['lost']} "
                f"judgements of {t['n']} (McNemar p = {t['p_value']:.2g})")
        sc = t.get("sound_correct")
        if sc:
            line += f"; sound-correct +{sc['gained']} / -{sc['lost']} (p = {sc['p_value']:.2g})"
        out.append(line)
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
    judged = {n: j for n in stages if (j := judgements(Path(pipe_dir), n)) is not None}
    sound, trans = soundness(judged), transitions(judged)
    rep = {"stages": stages, "implicit": implicit, "soundness": sound,
           "grpo_curve": grpo_curve(Path(pipe_dir) / "grpo"), "vision": vision, "data": data_summary or {},
           "seconds": seconds, "checks": checks(stages, trans, sound), "transitions": trans}
    if (Path(pipe_dir) / "grpo_paper_reward").is_dir():
        rep["grpo_paper_reward_curve"] = grpo_curve(Path(pipe_dir) / "grpo_paper_reward")
    rollouts = {n: r for n in ("grpo", "grpo_paper_reward")
                if (r := rollout_soundness(Path(pipe_dir) / n, Path(pipe_dir) / "rs_sample" / "grpo"))}
    if rollouts:
        rep["rollouts"] = rollouts
    traces = trace_soundness(Path(pipe_dir) / "rs_sample" / "sft")
    if traces:
        rep["rejection_sampling_data"] = traces
    return rep


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
    if report.get("soundness"):
        kinds = ("unparsable", "broken", "reading", "perception", "verdict")
        lines += ["", "## Soundness (CoT chains checked against the samples' attributes; judgements)", "",
                  "A chain is sound when every step agrees with what the caption/question asks and what each "
                  "candidate shows; lucky: a right verdict after a wrong step. Error kinds: the first wrong step "
                  "(right and wrong verdicts alike).", "",
                  "| stage | sound-correct | lucky-correct | wrong | " + " | ".join(kinds) + " | "
                  + " | ".join(f"{t} sound-correct" for t in TASKS) + " |",
                  "|" + "---|" * (4 + len(kinds) + len(TASKS))]
        for n, c in report["soundness"].items():
            per_task = [f"{(c['tasks'].get(t) or {}).get('sound_correct', 0)}/{(c['tasks'].get(t) or {}).get('n', 0)}"
                        for t in TASKS]
            lines.append("| " + " | ".join([n, f"{c['sound_correct']}/{c['n']}", str(c["lucky_correct"]), str(c["wrong"]),
                                             *(str(c["kinds"][k]) for k in kinds), *per_task]) + " |")
    if report.get("rollouts"):
        lines += ["", "## What the GRPO reward paid for (training rollouts, chains checked)", "",
                  "| run | rollouts | correct | sound-correct | positive advantage to the rest | groups with a "
                  "sound-correct completion | sound-correct, first → last quarter |", "|" + "---|" * 7]
        for n, r in report["rollouts"].items():
            pa = r["positive_advantage_not_sound_correct"]
            f, last = r["first_quarter"], r["last_quarter"]
            lines.append(f"| {n} | {r['n']} | {r['correct']} | {r['sound_correct']} | "
                         f"{'–' if pa is None else f'{100 * pa:.0f}%'} | {r['groups_with_sound_correct']}/{r['groups']} | "
                         f"{_pct(f['sound_correct'] / f['n'] if f['n'] else None)} → "
                         f"{_pct(last['sound_correct'] / last['n'] if last['n'] else None)}% |")
    if report.get("rejection_sampling_data"):
        d = report["rejection_sampling_data"]
        lines += ["", f"Rejection sampling's SFT traces (all correct): {d['sound']} of {d['n']} sound ("
                  + ", ".join(f"{t} {v['sound']}/{v['n']}" for t, v in d["tasks"].items()) + ")."]
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
        ax.plot(steps, [r["reward"] for r in curve], label="reward (weighted sum)")
        if any(r.get("accuracy") is not None for r in curve):
            ax.plot(steps, [r.get("accuracy") for r in curve], label="accuracy reward")
        if any(r.get("chain") is not None for r in curve):
            ax.plot(steps, [r.get("chain") for r in curve], label="chain reward")
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
