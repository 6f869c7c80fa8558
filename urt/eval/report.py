"""results.json / results.md writers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DASH = "–"


def pct(x: Any) -> str:
    """A rate as a percentage with one decimal, None as an en dash."""
    return DASH if x is None else f"{100.0 * float(x):.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def markdown(res: dict) -> str:
    c = res["counts"]
    lines = [f"# urt eval: {res.get('benchmark') or 'shards'} ({res['mode']})", ""]
    for k in ("benchmark_file", "shards", "predictions", "model"):
        if res.get(k):
            lines.append(f"- {k.replace('_', ' ')}: `{res[k]}`")
    lines.append(f"- items: {c['items']}, predicted: {c['items_predicted']}, judgements: {c['judgements']} "
                 f"(original order {c['orders']['original']}, swapped {c['orders']['swapped']})")
    if c["missing"]:
        lines.append(f"- **INCOMPLETE: {c['missing']} item(s) have no prediction** (first: "
                     f"{', '.join(c['missing_keys'][:5])}); metrics are over predicted items; accuracy counting "
                     f"missing as wrong: {pct(res['accuracy_missing_as_wrong'])}")
    if c["unknown"]:
        lines.append(f"- {c['unknown']} prediction(s) with keys not in the benchmark were ignored (first: "
                     f"{', '.join(c['unknown_keys'][:5])})")
    lines.append("")
    head = ["metric", "value"]
    rows = [["accuracy", pct(res["accuracy"])]]
    if "diff" in res:
        rows += [["tau", pct(res.get("tau"))], ["diff", pct(res["diff"])]]
    rows += [["format valid", pct(res["format_valid_rate"])], ["answer parsed", pct(res["answer_parsed_rate"])]]
    lines += _table(head, rows)
    vl = res.get("vl_rewardbench")
    if vl:
        lines += ["", "## VL-RewardBench", ""]
        rows = []
        for scheme in ("official", "official_script"):
            b = vl[scheme]
            g = b["groups"]
            rows.append([scheme, pct(b["overall"]), pct(b["macro"])]
                        + [f"{pct(g[n]['accuracy'])} ({g[n]['n']})" for n in ("general", "hallucination", "reasoning")])
        lines += _table(["grouping", "overall", "macro", "general (n)", "hallucination (n)", "reasoning (n)"], rows)
        lines += ["", vl["note"]]
    if res.get("by_vote"):
        lines += ["", "## By vote", ""]
        lines += _table(["vote", "n", "accuracy"],
                        [[v, b["n"], pct(b["accuracy"])] for v, b in res["by_vote"].items()])
    if res.get("by_task"):
        lines += ["", "## By task", ""]
        rows = [[t, b["n"], pct(b["accuracy"]), pct(b.get("tau")) if "diff" in b else "", pct(b.get("diff")) if "diff" in b
                 else "", pct(b["format_valid_rate"])] for t, b in res["by_task"].items()]
        lines += _table(["task", "n", "accuracy", "tau", "diff", "format valid"], rows)
    p = res["position"]
    lines += ["", "## Position", ""]
    lines += _table(["said 1", "said 2", "said tie", "no answer", "gold 1", "gold 2", "gold tie", "consistency (pairs)"],
                    [[pct(p["pred_1_rate"]), pct(p["pred_2_rate"]), pct(p["pred_tie_rate"]), pct(p["pred_none_rate"]),
                      pct(p["gold_1_rate"]), pct(p["gold_2_rate"]), pct(p["gold_tie_rate"]),
                      f"{pct(p['consistency']['rate'])} ({p['consistency']['pairs']})"]])
    lines += ["", "Position rates are in the order shown to the model; consistency = same winner in both orders."]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(res: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `results.json` and `results.md` into `out_dir` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "results.json", out / "results.md"
    _atomic_write(j, json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(m, markdown(res))
    return j, m
