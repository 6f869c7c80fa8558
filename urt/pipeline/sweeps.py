"""Sweeps: sweep files (one run's Hydra overrides per line) and the collector that turns a sweep's
`results.json` files into one table and one plot.

Sweep file format (`experiments/sweeps/*.txt`)::

    # comment lines and blank lines are ignored; `#` after whitespace starts a trailing comment
    experiment=paper/qwen2_5_vl_7b/pipeline
    experiment=paper/qwen2_5_vl_7b/pipeline "pipeline.steps.grpo.overrides=['stage.loss.beta=0.0','optimizer.lr=1e-6']"

Every other line is one run: its Hydra overrides, split on whitespace with shell quoting (shlex, POSIX
rules: '…' and "…" keep spaces and brackets together). Runs are numbered 0, 1, … over these lines only —
the Slurm array task id (`slurm/array.sbatch`). Each override must parse with Hydra's override grammar
and name one value (a comma sweep `a=1,2` is an error: write one line per value).

`results.json` of a finished pipeline (`<pipeline dir>/results.json`)::

    {"experiment": str, "name": str, "overrides": [str, ...],
     "stages": {STAGE: {"overall": float, "format_rate": float, "answer_1_rate": float,
                        "tasks": {TASK: float | null, ...}}, ...}}

Stages keep the file's order (the pipeline's); rates are fractions in [0, 1]; missing or null values
are empty cells; unknown keys are ignored.

Small sweeps can also go through Hydra's own multirun (`hydra_multirun`, `urt sweep multirun`): comma
sweeps (`seed=0,1,2`) expand into jobs run by a Hydra launcher, e.g. `hydra/launcher=submitit_slurm`
(conf/hydra/launcher/submitit_slurm.yaml, needs `pip install hydra-submitit-launcher`).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from urt.errors import UrtError

log = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
TABLE_MD = "table.md"
TABLE_CSV = "table.csv"
PLOT_PNG = "plot.png"
METRICS = ("overall", "format_rate", "answer_1_rate")
STAGE_ORDER = ("base", "cold_start", "rejection_sampling", "grpo")
TASKS = ("image_generation", "image_understanding", "video_generation", "video_understanding")
BASE_COLUMNS = ("run", "overrides", "stage", *METRICS)
DASH = "–"


# --------------------------------------------------------------------------------------------------
# Sweep files


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep file: its task id (0-based over run lines), 1-based line number, overrides."""

    task_id: int
    line: int
    overrides: tuple[str, ...]

    def shell(self) -> str:
        """The overrides as one shell-quoted line (what `eval "args=($line)"` reads back)."""
        return shell_join(self.overrides)


def shell_quote(token: str) -> str:
    """POSIX-shell quoting that stays readable: bare when safe, '…' when the token has no single quote,
    "…" when it has one but nothing double quotes would expand, else shlex's quoting."""
    quoted = shlex.quote(token)
    if quoted == token or "'" not in token:
        return quoted
    if not any(c in token for c in '"$`\\!'):
        return f'"{token}"'
    return quoted


def shell_join(tokens) -> str:
    return " ".join(shell_quote(t) for t in tokens)


def _check_override(token: str, where: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if "=" not in token and not token.startswith("~"):
        raise UrtError(f"{where}: {token!r} is not a Hydra override (KEY=VALUE, +KEY=VALUE, ++KEY=VALUE or "
                       "~KEY); a sweep line holds only overrides, the command comes from the launcher")
    try:
        parsed = OverridesParser.create().parse_overrides([token])[0]
    except HydraException as err:
        reason = str(err).splitlines()[0]
        hint = ""
        if re.search(r"=\[[^\]'\"]*=", token):
            hint = (" (list elements that contain '=' must be quoted inside the brackets, e.g. "
                    "\"key=['stage.loss.beta=0.0','optimizer.lr=1e-6']\")")
        raise UrtError(f"{where}: {token!r} is not a valid Hydra override: {reason}{hint}") from None
    if parsed.is_sweep_override():
        raise UrtError(f"{where}: {token!r} is a sweep over several values; a sweep file has one run per "
                       "line, so write one line per value")


def parse_sweep_text(text: str, source: str = "<sweep>") -> list[SweepRun]:
    """The runs of a sweep file's text; `source` names the file in errors (`source:LINE: reason`)."""
    runs: list[SweepRun] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        where = f"{source}:{lineno}"
        try:
            tokens = shlex.split(raw, comments=True, posix=True)
        except ValueError as err:  # "No closing quotation", "No escaped character"
            raise UrtError(f"{where}: cannot split the line into overrides ({err}): {raw.strip()!r}") from None
        if not tokens:
            continue
        for token in tokens:
            _check_override(token, where)
        runs.append(SweepRun(task_id=len(runs), line=lineno, overrides=tuple(tokens)))
    return runs


def parse_sweep_file(path: str | Path) -> list[SweepRun]:
    """The runs of a sweep file, in file order. A file without any run is an error."""
    path = Path(path)
    if not path.is_file():
        raise UrtError(f"sweep file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UrtError(f"{path}: not UTF-8 text ({err})") from None
    runs = parse_sweep_text(text, source=str(path))
    if not runs:
        raise UrtError(f"{path}: no runs (every line is blank or a # comment)")
    return runs


def sweep_run(path: str | Path, task_id: int) -> SweepRun:
    """Run `task_id` of a sweep file (the Slurm array task id)."""
    runs = parse_sweep_file(path)
    if not 0 <= task_id < len(runs):
        raise UrtError(f"task id {task_id} is out of range: {path} has {len(runs)} run(s), ids 0-{len(runs) - 1}")
    return runs[task_id]


# --------------------------------------------------------------------------------------------------
# Collector


@dataclass
class CollectReport:
    """What `collect` wrote and read. `skipped`: (file, reason) of unusable results.json files;
    `ignored`: per-benchmark `urt eval` results.json files met on the way (not pipeline results)."""

    table_md: Path
    table_csv: Path
    plot_png: Path
    runs: list[str]
    rows: int
    used: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


@dataclass
class _Run:
    name: str
    path: Path
    overrides: list[str]
    stages: dict[str, dict[str, Any]]  # stage -> {metric or task: float | None}


class _Skip(Exception):
    pass


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _number(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Skip(f"{what} is {value!r}, not a number or null")
    value = float(value)
    return None if math.isnan(value) else value


def _read_run(path: Path, sweep_dir: Path) -> _Run:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _Skip(f"not valid JSON ({err})") from None
    except OSError as err:
        raise _Skip(f"cannot read it ({err})") from None
    if not isinstance(data, dict):
        raise _Skip(f"top level is a {type(data).__name__}, not an object")
    if "stages" not in data:
        raise _Skip('no "stages" (not a finished pipeline\'s results)')
    stages_in = data["stages"]
    if not isinstance(stages_in, dict) or not stages_in:
        raise _Skip('"stages" is not a non-empty object of stage -> metrics')
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise _Skip(f'"overrides" is {overrides!r}, not a list of strings')
    stages: dict[str, dict[str, Any]] = {}
    for stage, metrics in stages_in.items():
        if not isinstance(metrics, dict):
            raise _Skip(f'stages.{stage} is {metrics!r}, not an object')
        row = {m: _number(metrics.get(m), f"stages.{stage}.{m}") for m in METRICS}
        tasks = metrics.get("tasks") or {}
        if not isinstance(tasks, dict):
            raise _Skip(f"stages.{stage}.tasks is {tasks!r}, not an object")
        for task, value in tasks.items():
            row[str(task)] = _number(value, f"stages.{stage}.tasks.{task}")
        stages[str(stage)] = row
    rel = path.parent.relative_to(sweep_dir).as_posix()
    return _Run(name=sweep_dir.name if rel == "." else rel, path=path, overrides=overrides, stages=stages)


def _is_eval_results(path: Path) -> bool:
    """A per-benchmark `urt eval` results.json (schema "urt.eval/…"): found below stage run dirs."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and str(data.get("schema", "")).startswith("urt.eval/")


def _stage_order(runs: list[_Run]) -> list[str]:
    """Union of the runs' stages in pipeline order: every run's own order and the paper order of the
    known stages (STAGE_ORDER) are constraints; ties and unknown stages keep their first appearance
    (contradicting runs fall back to first appearance)."""
    seen: list[str] = []
    after: dict[str, set[str]] = {}
    pairs = [p for r in runs for p in zip(list(r.stages), list(r.stages)[1:])]
    for a, b in [*pairs, *itertools.combinations(STAGE_ORDER, 2)]:
        after.setdefault(b, set()).add(a)
    for run in runs:
        seen += [s for s in run.stages if s not in seen]
    order: list[str] = []
    while len(order) < len(seen):
        ready = [s for s in seen if s not in order and not (after.get(s, set()) & (set(seen) - set(order)))]
        order.append(ready[0] if ready else next(s for s in seen if s not in order))
    return order


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{100.0 * value:.1f}"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _label_tokens(overrides: list[str]) -> list[str]:
    """Overrides for a legend: a list of overrides as value (`pipeline.steps.grpo.overrides=[...]`) is
    opened into its elements, so the per-step values that tell the runs apart show."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    tokens: list[str] = []
    for override in overrides:
        try:
            value = parser.parse_overrides([override])[0].value()
        except HydraException:
            value = None
        if isinstance(value, list) and value and all(isinstance(v, str) and "=" in v for v in value):
            tokens += value
        else:
            tokens.append(override)
    return tokens


def _label(run: _Run, common: set[str]) -> str:
    own = [o for o in _label_tokens(run.overrides) if o not in common]
    text = run.name + (": " + " ".join(own) if own else "")
    return text if len(text) <= 110 else text[:107] + "..."


def _plot(runs: list[_Run], stages: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    common = set.intersection(*(set(_label_tokens(r.overrides)) for r in runs)) if len(runs) > 1 else set()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(stages) + 2.0), 4.5 + 0.22 * len(runs)))
    try:
        for run in runs:
            pts = [(stages.index(s), 100.0 * m["overall"]) for s, m in run.stages.items() if m["overall"] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=_label(run, common))
        ax.set_xticks(range(len(stages)), stages)
        ax.set_xlim(-0.3, len(stages) - 0.7)
        ax.set_xlabel("stage")
        ax.set_ylabel("overall accuracy (%)")
        ax.set_title(f"overall accuracy per stage ({len(runs)} run{'s' if len(runs) != 1 else ''})")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize="small", frameon=False)
        fig.savefig(out, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def collect(sweep_dir: str | Path, out_dir: str | Path | None = None) -> CollectReport:
    """Read every pipeline `results.json` below `sweep_dir` and write `table.md`, `table.csv` (one row
    per run x stage) and `plot.png` (overall accuracy per stage, one line per run) into `out_dir`
    (default: `sweep_dir`). Unusable files are logged, skipped and listed in the report; per-benchmark
    `urt eval` results met below stage dirs are ignored. No usable file at all is an error."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UrtError(f"sweep output directory {sweep_dir} does not exist" if not sweep_dir.exists()
                       else f"{sweep_dir} is not a directory")
    out = Path(out_dir) if out_dir is not None else sweep_dir
    found = sorted(sweep_dir.rglob(RESULTS_NAME), key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))
    runs: list[_Run] = []
    skipped: list[tuple[Path, str]] = []
    ignored: list[Path] = []
    for path in found:
        if not path.is_file():
            continue
        try:
            runs.append(_read_run(path, sweep_dir))
        except _Skip as why:
            if _is_eval_results(path):
                ignored.append(path)
                log.debug("ignoring %s: a per-benchmark urt eval result", path)
                continue
            skipped.append((path, str(why)))
            log.warning("skipping %s: %s", path, why)
    if not runs:
        detail = "; ".join(f"{p}: {why}" for p, why in skipped)
        raise UrtError(f"no usable {RESULTS_NAME} below {sweep_dir} ({len(found)} found, {len(skipped)} skipped"
                       + (f": {detail}" if detail else "") + ")")

    stages = _stage_order(runs)
    extra_tasks = sorted({k for r in runs for m in r.stages.values() for k in m} - set(METRICS) - set(TASKS))
    tasks = [*TASKS, *extra_tasks]
    header = [*BASE_COLUMNS, *tasks]
    rows: list[dict[str, Any]] = []
    for run in runs:
        for stage in sorted(run.stages, key=stages.index):
            m = run.stages[stage]
            rows.append({"run": run.name, "overrides": shell_join(run.overrides), "stage": stage,
                         **{k: m.get(k) for k in (*METRICS, *tasks)}})

    out.mkdir(parents=True, exist_ok=True)
    table_csv, table_md, plot_png = out / TABLE_CSV, out / TABLE_MD, out / PLOT_PNG
    with table_csv.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)

    lines = [f"# Sweep results: {sweep_dir}", "",
             f"{len(runs)} run(s), {len(rows)} row(s); rates in percent, {DASH}: not evaluated.", ""]
    if skipped:
        lines += [f"Skipped {len(skipped)} unusable {RESULTS_NAME}:", ""]
        lines += [f"- `{p}`: {_md_cell(why)}" for p, why in skipped] + [""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if c in ("run", "overrides", "stage") else "---:" for c in header) + "|")
    for row in rows:
        cells = [_md_cell(row["run"]), f"`{_md_cell(row['overrides'])}`" if row["overrides"] else "",
                 _md_cell(row["stage"]), *(_pct(row[c]) for c in header[3:])]
        lines.append("| " + " | ".join(cells) + " |")
    table_md.write_text("\n".join(lines) + "\n", encoding="utf-8")

    _plot(runs, stages, plot_png)
    return CollectReport(table_md=table_md, table_csv=table_csv, plot_png=plot_png, runs=[r.name for r in runs],
                         rows=len(rows), used=[r.path for r in runs], skipped=skipped, ignored=ignored)


# --------------------------------------------------------------------------------------------------
# Hydra multirun (small sweeps through a Hydra launcher, e.g. submitit on Slurm)

DEFAULT_SWEEP_DIR = "${paths.runs}/sweeps/multirun/${now:%Y-%m-%d_%H-%M-%S}"


class SweepJob:
    """The task function of `hydra_multirun`: runs `python -m urt.cli COMMAND <job overrides>
    paths.runs=<job dir>` in a fresh process (a fresh Hydra, torch and CUDA state per job; on Slurm the
    process inherits the task's SLURM_* variables, so Lightning finds its rank). Picklable for submitit."""

    def __init__(self, command: str):
        self.command = command

    def argv(self, overrides: list[str], job_dir: str) -> list[str]:
        kept = [o for o in overrides if _override_key(o) != "paths.runs"]  # the job dir replaces it
        return [sys.executable, "-m", "urt.cli", self.command, *kept, f"paths.runs={job_dir}"]

    def __call__(self, cfg) -> int:  # cfg: composed by Hydra (validates the overrides); the job recomposes
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        argv = self.argv(list(hc.overrides.task), str(hc.runtime.output_dir))
        log.info("running: urt %s", shell_join(argv[3:]))
        returncode = subprocess.run(argv, check=False).returncode
        if returncode != 0:
            raise RuntimeError(f"job {hc.job.num}: `urt {shell_join(argv[3:])}` exited with status {returncode}")
        return returncode


def _override_key(token: str) -> str:
    return token.split("=", 1)[0].lstrip("+~")


def submitit_plugin_installed() -> bool:
    """Whether Hydra's submitit launcher plugin (`pip install hydra-submitit-launcher`) is importable."""
    import importlib.util

    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        return False


def hydra_multirun(overrides: list[str], command: str = "pipeline") -> int:
    """Hydra multirun over `overrides` (comma sweeps expand into jobs; `hydra/launcher=...` picks the
    launcher): each job runs `urt COMMAND <its overrides> paths.runs=<job dir>` and the job dirs are
    `hydra.sweep.dir/<job number>` (default sweep dir: DEFAULT_SWEEP_DIR), so `collect` reads the sweep
    dir. Returns 0 when every job succeeded, 1 otherwise (Hydra prints the failing job's error)."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from urt.config import conf_dir

    launcher = [t.split("=", 1)[1] for t in overrides if _override_key(t) == "hydra/launcher" and "=" in t]
    if any(name.startswith("submitit") for name in launcher) and not submitit_plugin_installed():
        raise UrtError(f"hydra/launcher={launcher[-1]} needs Hydra's submitit plugin, which is not installed: "
                       "pip install hydra-submitit-launcher")
    for token in overrides:
        if "=" not in token and not token.startswith("~"):
            raise UrtError(f"{token!r} is not a Hydra override (KEY=VALUE, +KEY=VALUE, ~KEY)")
    keys = {_override_key(t) for t in overrides}
    defaults = [f"hydra.job.name=urt-{command}"]
    if "hydra.sweep.dir" not in keys:
        defaults.append(f"hydra.sweep.dir='{DEFAULT_SWEEP_DIR}'")
    job = SweepJob(command)
    app = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(job.__call__)
    saved_argv = sys.argv
    sys.argv = [f"urt-sweep-{command}", "--multirun", *defaults, *overrides]
    try:
        app()
    except SystemExit as stop:  # Hydra reports a failed job or a bad override itself, then exits
        return 0 if stop.code in (0, None) else 1
    finally:
        sys.argv = saved_argv
        GlobalHydra.instance().clear()
    return 0
