"""Looking at what a GRPO run's policy wrote: loaders, per-step summaries and plots over the rollout
tables (`run_dir/rollouts/step-NNNNNN.parquet`, written by `urt.rl.rollout_log`),
the CSV metrics (`run_dir/csv/**/metrics.csv`) and, when present, the offline wandb run
(`run_dir/wandb/offline-run-*`). `experiments/notebooks/inspect_rollouts.ipynb` is these functions plus
prose.

    df = load_rollouts(run_dir)        # one row per rollout, all steps; adds `accuracy`
    step_summary(df)                   # per step: rewards, accuracy, lengths, truncated share
    task_accuracy(df)                  # step x task accuracy
    zero_variance(df)                  # per step: groups with equal rewards, all correct / all wrong
    group_view(df, run_dir, step=3)    # a few groups with their completions, rewards and images
    load_metrics(run_dir)              # the logged metrics, one row per step
    load_wandb(run_dir)                # the offline wandb run's history and rollout tables (or None)

**Accuracy** is the accuracy reward (`reward_accuracy`, 1 when the parsed answer is the label's answer
string) when the run used it; otherwise whether the parsed winner equals the label.
"""

from __future__ import annotations

import json
import re
import struct
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd

from urt.errors import UrtError

ROLLOUT_GLOB = "rollouts/step-*.parquet"
METRICS_GLOB = "csv/**/metrics.csv"
GROUP_KEYS = ["step", "group"]


# ------------------------------------------------------------------------------------------ rollouts
def _run(run_dir: str | Path) -> Path:
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise UrtError(f"run directory {run} does not exist")
    return run


def load_rollouts(run_dir: str | Path) -> pd.DataFrame:
    """Every rollout of a GRPO run, one row each, sorted by (step, group, sample). Adds the column
    `accuracy` (see the module docstring). Raises UrtError when the run has no rollout files."""
    run = _run(run_dir)
    files = sorted(run.glob(ROLLOUT_GLOB))
    if not files:
        raise UrtError(f"no rollout tables in {run / 'rollouts'} (step-*.parquet): is {run} a GRPO run "
                       f"directory, trained with stage.rollouts=true?")
    frames = []
    for f in files:
        try:
            frames.append(pd.read_parquet(f))
        except Exception as e:  # noqa: BLE001 - name the file (a run killed while writing one)
            raise UrtError(f"cannot read rollout table {f}: {type(e).__name__}: {e}") from e
    df = pd.concat(frames, ignore_index=True)
    missing = [c for c in ("step", "group", "sample", "reward") if c not in df.columns]
    if missing:
        raise UrtError(f"rollout tables in {run / 'rollouts'} lack the columns {missing}")
    df = df.sort_values(["step", "group", "sample"], kind="stable").reset_index(drop=True)
    df["accuracy"] = _accuracy(df)
    return df


def _accuracy(df: pd.DataFrame) -> pd.Series:
    if "reward_accuracy" in df.columns:
        return df["reward_accuracy"].astype(float)
    if "winner" in df.columns and "label" in df.columns:
        return (df["winner"].astype("string") == df["label"].astype("string")).fillna(False).astype(float)
    raise UrtError("the rollouts have neither a reward_accuracy column nor parsed winners: accuracy is unknown")


def reward_columns(df: pd.DataFrame) -> list[str]:
    """The per-reward columns (`reward_<name>`, unweighted), in table order."""
    return [c for c in df.columns if c.startswith("reward_")]


def step_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per step: rollouts, groups, reward (mean weighted reward), reward_std (mean over groups
    of the within-group std, as train/reward_std), each reward_<name> mean, accuracy, completion length
    (mean, max), truncated (share of completions cut at max_new_tokens) and kept (share trained on)."""
    _need(df, "step", "group", "reward", "accuracy")
    by = df.groupby("step")
    out = pd.DataFrame({"rollouts": by.size(), "groups": by["group"].nunique(), "reward": by["reward"].mean()})
    out["reward_std"] = df.groupby(GROUP_KEYS)["reward"].std(ddof=1).groupby("step").mean()
    for c in reward_columns(df):
        out[c] = by[c].mean()
    out["accuracy"] = by["accuracy"].mean()
    if "completion_length" in df.columns:
        out["completion_length"] = by["completion_length"].mean()
        out["completion_length_max"] = by["completion_length"].max()
    for c in ("truncated", "kept"):
        if c in df.columns:
            out[c] = by[c].apply(lambda s: s.astype(float).mean())
    return out


def task_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per step (rows) and task (columns); NaN where a step had no prompt of a task."""
    _need(df, "step", "task", "accuracy")
    return df.pivot_table(index="step", columns="task", values="accuracy", aggfunc="mean").rename_axis(
        columns=None)


def group_stats(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (step, group): prompt_key, task, label, n (completions), reward mean and std,
    accuracy mean, zero_variance (all rewards equal: no GRPO signal), all_correct / all_wrong (by
    accuracy)."""
    _need(df, "step", "group", "reward", "accuracy")
    first = [c for c in ("prompt_key", "task", "label") if c in df.columns]
    g = df.groupby(GROUP_KEYS)
    out = g[first].first() if first else pd.DataFrame(index=g.size().index)
    out["n"] = g.size()
    out["reward_mean"] = g["reward"].mean()
    out["reward_std"] = g["reward"].std(ddof=1).fillna(0.0)
    out["accuracy"] = g["accuracy"].mean()
    out["zero_variance"] = g["reward"].nunique() == 1
    out["all_correct"] = g["accuracy"].min() >= 1.0
    out["all_wrong"] = g["accuracy"].max() <= 0.0
    return out


def zero_variance(df: pd.DataFrame) -> pd.DataFrame:
    """Per step: groups, zero_variance (groups whose rewards are all equal, so every advantage is 0),
    all_correct and all_wrong (groups judged right / wrong by every completion: no accuracy signal),
    and zero_variance_share."""
    gs = group_stats(df)
    by = gs.groupby("step")
    out = pd.DataFrame({"groups": by.size(), "zero_variance": by["zero_variance"].sum(),
                        "all_correct": by["all_correct"].sum(), "all_wrong": by["all_wrong"].sum()})
    out = out.astype(int)
    out["zero_variance_share"] = out["zero_variance"] / out["groups"]
    return out


def _need(df: pd.DataFrame, *cols: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UrtError(f"the rollout frame lacks the columns {missing} (load it with load_rollouts)")


# ------------------------------------------------------------------------------------------ metrics
def load_metrics(run_dir: str | Path, *, missing_ok: bool = False) -> pd.DataFrame:
    """The run's CSV metrics (every `csv/**/metrics.csv`) as one row per logged `step`, the last
    non-empty value of each column winning (a resumed run appends rows for the steps it repeats).
    No metrics file: UrtError, or an empty frame with `missing_ok`."""
    run = _run(run_dir)
    files = sorted(run.glob(METRICS_GLOB))
    if not files:
        if missing_ok:
            return pd.DataFrame(index=pd.Index([], name="step"))
        raise UrtError(f"no metrics.csv under {run / 'csv'} (was the run logged with logger=csv or wandb?)")
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    if "step" not in df.columns:
        raise UrtError(f"{files[0]} has no 'step' column")
    return df.groupby("step").last()


# ------------------------------------------------------------------------------------------ wandb
@dataclass
class WandbRun:
    """An offline wandb run read from disk: its folders, the logged history (one row per log call, as
    written; None when the history could not be read) and the rollout Tables by step."""

    folders: list[Path]
    history: pd.DataFrame | None
    tables: dict[int, pd.DataFrame] = field(default_factory=dict)
    note: str = ""


_TABLE_RE = re.compile(r"step_(\d+)_.*\.table\.json$")


def load_wandb(run_dir: str | Path) -> WandbRun | None:
    """The run's wandb folders (`run_dir/wandb/offline-run-*` and `run-*`, oldest first; several
    when the run was resumed): history from the `.wandb` record files and the `rollouts/step_*` Tables
    from `files/media/table/`. None when the run has no wandb folder."""
    root = _run(run_dir) / "wandb"
    folders = sorted(p for p in root.glob("*run-*") if p.is_dir() and not p.name.startswith("latest"))
    if not folders:
        return None
    tables: dict[int, pd.DataFrame] = {}
    for f in folders:
        for t in sorted((f / "files" / "media" / "table" / "rollouts").glob("step_*.table.json")):
            m = _TABLE_RE.search(t.name)
            if m:
                d = json.loads(t.read_text())
                tables[int(m.group(1))] = pd.DataFrame(d.get("data", []), columns=d.get("columns"))
    rows, notes = [], []
    for f in folders:
        for rec in f.glob("*.wandb"):
            try:
                rows += list(wandb_history(rec))
            except Exception as e:  # noqa: BLE001 - the history is optional: say why it is missing
                notes.append(f"{rec.name}: {type(e).__name__}: {e}")
    history = pd.DataFrame(rows) if rows else None
    return WandbRun(folders=folders, history=history, tables=dict(sorted(tables.items())), note="; ".join(notes))


_LOG_HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: str | Path) -> Iterator[bytes]:
    """The serialized records of a `.wandb` file (LevelDB log layout: 32 KiB blocks, each chunk with a
    7-byte header of checksum, length and type, records split over blocks as first/middle/last
    chunks). A record cut off by a killed run ends the iteration."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise UrtError(f"{path} is not a wandb record file (no ':W&B' header)")
    pos, pending = _LOG_HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length or kind not in (_FULL, _FIRST, _MIDDLE, _LAST):
            return
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        else:
            yield pending + chunk
            pending = b""


def wandb_history(path: str | Path) -> Iterator[dict]:
    """The history rows (`run.log` calls) of a `.wandb` file; a logged Table appears as its reference
    dict (`{"_type": "table-file", "path": ..., "nrows": ...}`)."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in wandb_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in rec.history.item:
            value = json.loads(item.value_json)
            if item.key:
                row[item.key] = value
                continue
            *parents, leaf = list(item.nested_key)  # a dict value, flattened by wandb: rebuild it
            node = row
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = value
        yield row


# ------------------------------------------------------------------------------------------ groups
@dataclass
class GroupView:
    """One group of one step: the prompt as the model saw it, its completions (`rows`) and the source
    sample (`sample`, visuals in presented order; None with `note` when it could not be found)."""

    step: int
    group: int
    prompt_key: str
    task: str
    label: str
    prompt: str
    rows: pd.DataFrame
    sample: Any = None
    note: str = ""

    def pair_text(self, max_chars: int = 300) -> str:
        """What is judged: the caption, or the question and the two answers (from the sample, else the
        prompt text), cut to `max_chars`."""
        s = self.sample
        if s is not None and s.caption is not None:
            text = f"caption: {s.caption}"
        elif s is not None and s.question is not None:
            text = f"question: {s.question} | answer 1: {s.answers[0]} | answer 2: {s.answers[1]}"
        else:
            text = f"prompt: {' '.join(self.prompt.split())}"
        return text if len(text) <= max_chars else text[:max_chars] + " …"

    def visuals(self, frames_per_video: int = 4) -> list[tuple[str, Any]]:
        """(title, PIL image) pairs to show: each image, or up to `frames_per_video` frames of a video."""
        from urt.data.schema import Video

        if self.sample is None:
            return []
        out = []
        gen = self.task.endswith("generation")
        for i, v in enumerate(self.sample.visuals):
            name = f"{'Video' if 'video' in self.task else 'Image'} {i + 1}" if gen else "reference"
            if isinstance(v, Video):
                frames = v.frames or []
                pick = sorted({round(j * (len(frames) - 1) / max(1, frames_per_video - 1))
                               for j in range(min(frames_per_video, len(frames)))})
                out += [(f"{name} f{j}", frames[j]) for j in pick]
            else:
                out.append((name, v))
        return out


VIEW_COLUMNS = ("sample", "answer", "winner", "reward", "advantage", "completion_length", "truncated",
                "completion")


def group_view(df: pd.DataFrame, run_dir: str | Path | None = None, *, step: int | None = None,
               groups: Sequence[int] | None = None, n: int = 3, shards: Any = None,
               frames: int = 4) -> list[GroupView]:
    """Up to `n` groups of `step` (default: the last step) — `groups` by id, else the groups with the
    largest reward spread first (where GRPO learns most) — with their completions and rewards, and the
    source samples found by key in the training shards (`shards`, else `data.train_shards` of
    `run_dir/config.yaml`; the pair shown in the order the model saw it)."""
    _need(df, "step", "group", "sample", "reward")
    step = int(df["step"].max()) if step is None else int(step)
    at = df[df["step"] == step]
    if at.empty:
        raise UrtError(f"no rollouts at step {step}; steps present: {sorted(df['step'].unique().tolist())}")
    if groups is None:
        spread = at.groupby("group")["reward"].std(ddof=0).fillna(0.0)
        groups = sorted(spread.index, key=lambda g: (-spread[g], g))[:n]
    else:
        unknown = sorted(set(groups) - set(at["group"]))
        if unknown:
            raise UrtError(f"step {step} has no groups {unknown}; it has {sorted(at['group'].unique().tolist())}")
    cols = [c for c in VIEW_COLUMNS[:4] if c in at.columns] + reward_columns(at) + \
        [c for c in VIEW_COLUMNS[4:] if c in at.columns]
    views = []
    for g in groups:
        rows = at[at["group"] == g].sort_values("sample")
        r0 = rows.iloc[0]
        views.append(GroupView(step=step, group=int(g), prompt_key=str(r0.get("prompt_key", "")),
                               task=str(r0.get("task", "")), label=str(r0.get("label", "")),
                               prompt=str(r0.get("prompt", "")), rows=rows[cols].reset_index(drop=True)))
    _attach_samples(views, at, run_dir, shards, frames)
    return views


def _attach_samples(views: list[GroupView], at: pd.DataFrame, run_dir, shards, frames: int) -> None:
    if shards is None and run_dir is not None:
        shards = train_shards(run_dir)
    if shards is None:
        for v in views:
            v.note = "no shards given and no data.train_shards in the run's config.yaml: images not shown"
        return
    try:
        found = find_samples(shards, {v.prompt_key for v in views}, frames=frames)
    except UrtError as e:
        for v in views:
            v.note = f"the training shards could not be read ({e}): images not shown"
        return
    for v in views:
        s = found.get(v.prompt_key)
        if s is None:
            v.note = f"sample {v.prompt_key!r} not found in the training shards"
            continue
        swapped = "swapped" in at.columns and bool(at.loc[at["group"] == v.group, "swapped"].iloc[0])
        v.sample = s.swapped() if swapped else s


def train_shards(run_dir: str | Path) -> Any:
    """`data.train_shards` of the run's resolved `config.yaml` (None when absent)."""
    import yaml

    cfg = _run(run_dir) / "config.yaml"
    if not cfg.is_file():
        return None
    data = (yaml.safe_load(cfg.read_text()) or {}).get("data") or {}
    return data.get("train_shards")


def find_samples(shards: Any, keys: Iterable[str], *, frames: int = 4) -> dict[str, Any]:
    """{key: Sample} for the `keys` found in `shards` (anything `urt.data.shards.resolve_shards` takes).
    Only those samples are decoded (images at full size, videos at `frames` frames); reading stops when
    all are found. Bad samples are skipped."""
    from urt.data.shards import ShardError, decode_sample, make_pipeline, parse_header

    wanted = set(keys)
    out: dict[str, Any] = {}
    if not wanted:
        return out
    for raw in make_pipeline(shards, on_error="skip", decode=False):
        try:
            key = parse_header(raw).get("key", raw.get("__key__"))
            if key in wanted and key not in out:
                out[key] = decode_sample(raw, frames=frames)
        except ShardError:
            continue
        if len(out) == len(wanted):
            break
    return out


# ------------------------------------------------------------------------------------------ plots
def _missing(v) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # a list or dict value
        return False


def _shown(v):
    """A table value for display: "-" when missing."""
    return "-" if _missing(v) else v


def _figure(nrows: int = 1, ncols: int = 1, size=(6.0, 3.5)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_curves(summary: pd.DataFrame, metrics: pd.DataFrame | None = None):
    """Left: mean reward, each reward_<name> and accuracy per rollout step (from the rollouts).
    Right: the logged train/reward, train/kl and train/loss per optimizer step (when `metrics` has them)."""
    logged = [c for c in ("train/reward", "train/kl", "train/loss") if metrics is not None and c in metrics.columns]
    fig, axes = _figure(1, 2 if logged else 1)
    ax = axes[0][0]
    for c in ["reward", *[c for c in summary.columns if c.startswith("reward_")], "accuracy"]:
        if c in summary.columns:
            ax.plot(summary.index, summary[c], marker="o", label=c)
    ax.set(xlabel="rollout step", ylabel="mean over rollouts", title="rewards and accuracy")
    _integer_steps(ax)
    ax.legend(fontsize="small")
    if logged:
        ax = axes[0][1]
        for c in logged:
            s = metrics[c].dropna()
            ax.plot(s.index, s.values, marker=".", label=c)
        ax.set(xlabel="optimizer step", title="logged metrics (csv)")
        _integer_steps(ax)
        ax.legend(fontsize="small")
    return fig


def plot_task_accuracy(acc: pd.DataFrame):
    """Accuracy per task over steps (`task_accuracy(df)`)."""
    fig, axes = _figure()
    ax = axes[0][0]
    for task in acc.columns:
        s = acc[task].dropna()
        ax.plot(s.index, s.values, marker="o", label=task)
    ax.set(xlabel="rollout step", ylabel="accuracy", ylim=(-0.05, 1.05), title="accuracy per task")
    _integer_steps(ax)
    ax.legend(fontsize="small")
    return fig


def plot_zero_variance(zv: pd.DataFrame):
    """Per step (`zero_variance(df)`): stacked bars of groups all correct / all wrong / mixed by accuracy
    (disjoint), and a line with the zero-variance groups (equal rewards: no advantage at all)."""
    fig, axes = _figure()
    ax = axes[0][0]
    mixed = zv["groups"] - zv["all_correct"] - zv["all_wrong"]
    bottom = pd.Series(0, index=zv.index)
    for name, vals, color in (("all correct", zv["all_correct"], "tab:green"),
                              ("all wrong", zv["all_wrong"], "tab:red"), ("mixed", mixed, "tab:gray")):
        ax.bar(zv.index, vals, bottom=bottom, label=name, color=color, alpha=0.7)
        bottom = bottom + vals
    ax.plot(zv.index, zv["zero_variance"], color="black", marker="D", label="zero variance (no advantage)")
    ax.set(xlabel="rollout step", ylabel="groups", title="groups by accuracy; zero-variance groups",
           ylim=(0, max(1, int(zv["groups"].max())) * 1.2))
    _integer_steps(ax)
    ax.legend(fontsize="small")
    return fig


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_lengths(df: pd.DataFrame, steps: Sequence[int] | None = None):
    """Completion length histograms (tokens) for a few steps (default: first, middle, last), with the
    truncated share in the legend."""
    _need(df, "step", "completion_length")
    all_steps = sorted(df["step"].unique().tolist())
    if steps is None:
        steps = sorted({all_steps[0], all_steps[len(all_steps) // 2], all_steps[-1]})
    fig, axes = _figure()
    ax = axes[0][0]
    hi = int(df["completion_length"].max())
    bins = range(0, hi + 2, max(1, (hi + 1) // 40 or 1))
    for s in steps:
        d = df[df["step"] == s]
        cut = f", {d['truncated'].astype(float).mean():.0%} truncated" if "truncated" in d.columns else ""
        ax.hist(d["completion_length"], bins=bins, alpha=0.5, label=f"step {s}{cut}")
    ax.set(xlabel="completion length (tokens)", ylabel="completions", title="completion lengths")
    ax.legend(fontsize="small")
    return fig


def plot_group(view: GroupView, *, width: int = 90, max_chars: int = 400):
    """The group's visuals in a row (as presented to the model), then each completion (cut to
    `max_chars`) with its parsed winner, reward and advantage."""
    vis = view.visuals()
    ncols = max(1, len(vis))
    lines = [f"step {view.step} group {view.group}  key {view.prompt_key}  task {view.task}  label {view.label}"]
    lines += textwrap.wrap(view.pair_text(), width)
    if view.note:
        lines.append(f"({view.note})")
    lines.append("")
    for _, r in view.rows.iterrows():
        head = (f"#{r['sample']}  winner={_shown(r.get('winner'))}  reward={r['reward']:.2f}  "
                f"adv={r.get('advantage', float('nan')):+.2f}  len={_shown(r.get('completion_length'))}"
                f"{'  TRUNCATED' if not _missing(r.get('truncated')) and bool(r.get('truncated')) else ''}")
        text = str(r.get("completion", ""))
        text = text if len(text) <= max_chars else text[:max_chars] + " …"
        lines += [head] + textwrap.wrap(text.replace("\n", " ⏎ "), width) + [""]
    from matplotlib.figure import Figure

    text_h = 0.17 * len(lines)
    img_h = 2.2 if vis else 0.0
    fig = Figure(figsize=(max(7.0, 2.2 * ncols), img_h + text_h + 0.3), layout="constrained")
    grid = fig.add_gridspec(2 if vis else 1, ncols, height_ratios=[img_h, text_h] if vis else [1])
    for i, (title, img) in enumerate(vis):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(img)
        ax.set_title(title, fontsize="small")
        ax.axis("off")
    ax = fig.add_subplot(grid[-1, :])
    ax.axis("off")
    ax.text(0, 1, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=7, transform=ax.transAxes)
    return fig
