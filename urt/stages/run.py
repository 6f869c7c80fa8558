"""The run folder of a training stage and resuming it: where a run writes (`run_dir`, `final_hf_dir`), the
checks that it can, which checkpoint a run continues from (`resume_path`: a damaged last.ckpt is set aside
for the newest intact one) and the loggers that continue their files on resume. The layout and the resume
rules: urt/stages/base.py's docstring, docs/reliability.md.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from pathlib import Path

from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as _CSVWriter
from omegaconf import DictConfig

from urt.errors import UrtError

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
HF_DIR = "hf"
FINAL = "final"


def run_dir(cfg: DictConfig) -> Path:
    return Path(str(cfg.stage.run_dir)).expanduser().resolve()


def final_hf_dir(cfg: DictConfig) -> Path:
    return run_dir(cfg) / HF_DIR / FINAL


class _AppendingWriter(_CSVWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run appends to it instead."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            import csv

            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(_CSVLogger):
    """CSVLogger whose metrics.csv survives a resume (rows keep their `step`; rows logged after the last
    checkpoint of a crashed run appear twice, the later ones being the resumed run's). No row is lost:
    `FlushLogsAtCheckpoint` writes every buffered row, and the row of the step being checkpointed (which
    Lightning logs only after the checkpoint hook), to disk before each checkpoint file is written."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._early: dict[int, set] = {}  # step -> metric names written ahead of Lightning (`write_ahead`)

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def write_ahead(self, metrics: dict, step: int) -> None:
        """Write the row of `step` now (and flush): Lightning sends it again after the checkpoint, and
        `log_metrics` then writes only what was not in it."""
        done = self._early.setdefault(step, set())
        new = {k: v for k, v in metrics.items() if k not in done}
        if set(new) - {"epoch"}:  # (the periodic and the last checkpoint of one step both come here)
            super().log_metrics(new, step)
            done.update(new)
        self.save()

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        done = self._early.pop(step, None) if step is not None else None
        if done is not None:
            metrics = {k: v for k, v in metrics.items() if k not in done}
            if not set(metrics) - {"epoch"}:
                return
        super().log_metrics(metrics, step)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint file `path` cannot be loaded, or None when it looks whole. torch writes a zip
    whose directory comes last, so a file cut short (a kill or a full disk mid-write) has none; this reads
    only that directory, not the weights. A folder (FSDP's sharded checkpoint) is left to its loader."""
    if path.is_dir():
        return None
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        size = path.stat().st_size if path.exists() else 0
        return f"not a complete torch checkpoint ({size} bytes; {type(err).__name__}: {err})"
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return "not a torch checkpoint (its zip holds no data.pkl)"
    return None


def _set_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint out of the way (kept, not deleted: the next save would overwrite it)."""
    n = 0
    while (dest := path.with_name(f"{path.name}.corrupt{'' if n == 0 else f'-{n}'}")).exists():
        n += 1
    os.replace(path, dest)
    return dest


def resume_path(cfg: DictConfig) -> str | None:
    mode = str(cfg.stage.get("resume", "auto") or "auto")
    ckpts = run_dir(cfg) / CKPT_DIR
    last = ckpts / "last.ckpt"
    if mode == "auto":
        # Lightning's Slurm plugin writes run_dir/hpc_ckpt_N.ckpt when the job is signalled before its time
        # limit (USR1, slurm/*.sbatch): resume from whichever of those and last.ckpt is newest
        found = [p for p in [last, *run_dir(cfg).glob("hpc_ckpt_*.ckpt")] if p.exists()]
        if not found:
            return None
        newest = max(found, key=lambda p: p.stat().st_mtime)
        why = checkpoint_problem(newest)
        if why is None:
            return str(newest)
        # The newest is damaged: fall back to the newest intact one beside it (periodic step-*.ckpt, other
        # hpc checkpoints) rather than fail, or silently start over.
        others = sorted((p for p in [*found, *ckpts.glob("step-*.ckpt")] if p != newest and p.exists()),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        fallback = next((p for p in others if checkpoint_problem(p) is None), None)
        if fallback is None:
            raise UrtError(f"cannot resume: {newest} is {why}, and no intact checkpoint is beside it "
                           f"(checked {len(others)} other(s)); delete it to start over, or pass stage.resume=PATH "
                           f"to resume from another checkpoint")
        aside = _set_aside(newest)
        msg = (f"{newest} is {why} (kept as {aside.name}); resuming from the newest intact checkpoint, {fallback} "
               f"(stage.resume=PATH picks another)")
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)
        return str(fallback)
    if mode == "never":
        if last.exists():
            raise UrtError(f"{last} exists and stage.resume=never: pick another stage.run_dir (or "
                           f"stage.run_name), delete the old run, or use stage.resume=auto to continue it")
        return None
    path = Path(mode).expanduser()
    if not path.exists():  # a file, or a folder (FSDP's sharded checkpoints)
        raise UrtError(f"stage.resume={mode!r}: no such checkpoint (use auto, never or a .ckpt path)")
    why = checkpoint_problem(path)
    if why is not None:
        step_ckpts = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
        raise UrtError(f"stage.resume={mode!r}: {path} is {why}" + (
            f"; other checkpoints beside it: {', '.join(step_ckpts[-3:])}" if step_ckpts else ""))
    return str(path)


def loggers(cfg: DictConfig, out: Path) -> list:
    lg = cfg.get("logger")
    if not lg:
        return []
    if "_target_" in lg:
        lg = {"logger": lg}
    loggers = []
    for name, spec in lg.items():
        if spec is None or "_target_" not in spec:
            continue
        if "wandb" in str(spec._target_).lower():
            for var, sub in (("WANDB_DIR", "wandb"), ("WANDB_CACHE_DIR", "wandb/cache"),
                             ("WANDB_CONFIG_DIR", "wandb/config"), ("WANDB_DATA_DIR", "wandb/data")):
                (out / sub).mkdir(parents=True, exist_ok=True)
                os.environ[var] = str(out / sub)  # per run: a second run in one process writes its own
        loggers.append(instantiate(spec))
    return loggers


def finish_loggers(trainer) -> None:
    """Close a wandb run at the end of fit (Lightning's WandbLogger leaves it open: within one Python
    process — notebooks, the pipeline — the next stage would log into it)."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in trainer.loggers) and trainer.is_global_zero:
        import wandb

        wandb.finish()


def check_writable(out: Path) -> None:
    """The run folder (and the folders a run writes into it) can be created and written: found now, not at
    the first checkpoint after the training it would lose."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UrtError(f"cannot create the run folder {out} (stage.run_dir): {err.strerror or err}; pick another "
                       f"paths.root or stage.run_dir") from None
    for d in [out, *(out / sub for sub in (CKPT_DIR, HF_DIR, "csv") if (out / sub).exists())]:
        probe = d / f".urt-write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise UrtError(f"cannot write in {d} ({err.strerror or err}): a run writes its checkpoints, hf/ export "
                           f"and logs under stage.run_dir; fix the permissions or pick another paths.root or "
                           f"stage.run_dir") from None

