"""What every training stage shares: the run folder, resume, loggers, callbacks, the HF export, the length
of the lr schedule, the optimizer set-up and the build-then-fit runner. A stage file (`sft.py`, `grpo.py`)
holds its LightningModule (a `StageModule`) and its `build(cfg, callbacks) -> StageParts`; `urt/train.py`
maps a stage name to that builder.

Everything a run writes lives in `cfg.stage.run_dir`::

    run_dir/config.yaml          the composed config (resolved)
    run_dir/checkpoints/         Lightning state for exact resume (model, optimizer, scheduler, loop and
                                 data position): step-NNNNNN.ckpt every stage.checkpoint.every_n_steps,
                                 last.ckpt (also written at the end of fit)
    run_dir/hf/final/            plain transformers folder (model + processor, urt.json: the step it holds and
                                 the training preprocessing) at the end of fit, or after it when the run ended
                                 without one (an interrupted export); written under hf/.final.tmp and renamed
    run_dir/hf/step-NNNNNN/      the same every stage.hf.every_n_steps (optional)
    run_dir/csv/, run_dir/wandb/ loggers
    run_dir/data_summary.json    samples read and skipped per reason over the run

Resume (`stage.resume`): "auto" continues from `run_dir/checkpoints/last.ckpt` when it exists (a damaged
one is set aside and the newest intact checkpoint beside it used, with a warning), "never" starts fresh
(an existing last.ckpt is then an error, so a run is never silently overwritten), a path resumes from
that checkpoint. Guarantees: docs/reliability.md.

**The module from the config.** `cfg.stage` names its LightningModule by `_target_`; its other keys are the
module's constructor arguments, except the run settings every stage shares (`RUN_KEYS`: name, run_name,
run_dir, resume, checkpoint, hf, effective_batch_size). A key the module does not take is an error naming
the key and the keys it takes (a typo such as `+stage.betaa=0.1` is never silently ignored).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as _CSVWriter
from omegaconf import DictConfig, OmegaConf

from urt.errors import UrtError

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
HF_DIR = "hf"
FINAL = "final"


def run_dir(cfg: DictConfig) -> Path:
    return Path(str(cfg.stage.run_dir)).expanduser().resolve()


def final_hf_dir(cfg: DictConfig) -> Path:
    return run_dir(cfg) / HF_DIR / FINAL


def is_fsdp(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def is_sharded(trainer: L.Trainer) -> bool:
    """Whether the trainer runs urt's FSDP2 strategy (trainer=fsdp / fsdp_cpu; urt.stages.sharded)."""
    from urt.stages.sharded import is_sharded_strategy

    return is_sharded_strategy(trainer)


def full_model_state(trainer: L.Trainer) -> dict:
    """FSDP: the full (unsharded) state dict of the HF model, gathered from every rank onto rank 0's CPU
    (a collective: every rank calls it; ranks > 0 get {}). Whatever the strategy's own `state_dict_type`
    (sharded checkpoints included), this is FSDP's FULL_STATE_DICT with `rank0_only` and CPU offload, so
    no rank ever holds more than one full copy, in host memory. Keys are the HF model's (the
    LightningModule's `model.` prefix removed; FSDP and activation-checkpoint wrappers leave no trace).
    FSDP2 (`is_sharded`): the same, parameter by parameter (urt.models.fsdp.full_state_dict)."""
    if is_sharded(trainer):
        from urt.models.fsdp import full_state_dict

        return full_state_dict(trainer.lightning_module.model)
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(trainer.strategy.model, StateDictType.FULL_STATE_DICT, cfg):
        state = trainer.strategy.model.state_dict()
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def save_full_state(bundle, state: dict, out_dir: str | Path) -> Path:
    """`urt.models.save_pretrained` for a model whose weights live elsewhere (FSDP shards): the HF folder
    from `state` (the full HF state dict) plus the bundle's config and processor."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = bundle.model
    was_cache = getattr(model.config, "use_cache", None)
    if was_cache is False:
        model.config.use_cache = True  # a saved checkpoint is for inference by default
    from urt.models.fsdp import plain_class

    try:
        with plain_class(model):  # FSDP2's subclass would hide the checkpoint's key renames
            model.save_pretrained(out, state_dict=state)
    finally:
        if was_cache is False:
            model.config.use_cache = False
    bundle.processor.save_pretrained(out)
    return out


class HFExport(Callback):
    """Writes `save_pretrained` folders (model + processor, loadable by plain transformers) under
    `run_dir/hf/`: `final/` when fit ends, and `step-NNNNNN/` every `every_n_steps` optimizer steps.

    Several ranks: rank 0 decides and writes, the others wait at a barrier (so no rank races ahead on a
    half-written folder). FSDP: every rank first takes part in gathering the full weights onto rank 0
    (`full_model_state`), which then writes them; a LoRA model is refused there at setup (merging needs
    the full base weights on one rank: train LoRA with DDP)."""

    def __init__(self, bundle, out_dir: str | Path, every_n_steps: int | None = None,
                 preprocessing: dict | None = None):
        self.bundle = bundle
        self.out_dir = Path(out_dir)
        self.every = int(every_n_steps or 0)
        self.preprocessing = preprocessing  # the data module's pixel budgets / frames (urt.models.preprocessing)
        self.written: list[Path] = []
        self._last = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        from urt.models.loading import is_peft_model

        if is_sharded(trainer):
            return  # the strategy checks LoRA and the units when it shards (urt.stages.sharded)
        if not is_fsdp(trainer):
            return
        if is_peft_model(self.bundle.model):
            raise UrtError("LoRA with FSDP is not supported (the HF export merges the adapters into the full "
                           "base weights on one rank): train LoRA with trainer=ddp")
        from urt.models.sharding import check_wrapping

        check_wrapping(self.bundle.model, self.bundle.family)

    def _save(self, trainer: L.Trainer, name: str) -> None:
        state = full_model_state(trainer) if is_fsdp(trainer) or is_sharded(trainer) else None
        if trainer.is_global_zero:
            self.write(name, trainer.global_step, state)
        trainer.strategy.barrier("urt_hf_export")

    def write(self, name: str, step: int, state: dict | None = None) -> Path:
        """Rank 0's part of an export: the folder is written under a temporary sibling name and renamed into
        place when complete, so an `hf/<name>` folder that exists is always whole (a run killed mid-export
        leaves only the temporary folder, which the next export replaces)."""
        from urt.models import save_pretrained
        from urt.models.preprocessing import export_bundle, write_export_record

        dest = self.out_dir / name
        tmp = dest.with_name(f".{name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        bundle = export_bundle(self.bundle, self.preprocessing)
        save_pretrained(bundle, tmp) if state is None else save_full_state(bundle, state, tmp)
        write_export_record(tmp, step=step, preprocessing=self.preprocessing)
        publish_folder(tmp, dest)
        self.written.append(dest)
        log.info("wrote %s", dest)
        return dest

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step counts optimizer steps: under accumulation it stays at a multiple for the following
        # micro-batches, so each step is exported once (and not again after a resume).
        step = trainer.global_step
        if self.every and step > 0 and step % self.every == 0 and step != self._last:
            self._last = step
            name = f"step-{step:06d}"
            # rank 0 decides (a rank checking on its own could see rank 0's folder appear and skip the
            # barrier rank 0 then waits at)
            if trainer.strategy.broadcast(not (self.out_dir / name).exists(), src=0):
                self._save(trainer, name)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, FINAL)


def publish_folder(tmp: Path, dest: Path) -> None:
    """Move the complete folder `tmp` to `dest` (a rename on the same file system). An older `dest` is moved
    aside first and removed after, so `dest` is at every moment either the old or the new folder, or absent
    for the instant between the two renames."""
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


class LastCheckpoint(Callback):
    """Writes `last.ckpt` at the end of fit when the periodic checkpointing did not just write this step
    (so a run stopped by max_steps can be extended, and every finished run is resumable)."""

    def __init__(self, ckpt: ModelCheckpoint):
        self.ckpt = ckpt

    def on_train_end(self, trainer, pl_module) -> None:
        last = Path(self.ckpt.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        # rank 0 decides: saving is a collective (every rank must join it or none)
        done = self.ckpt._last_global_step_saved == trainer.global_step and last.exists()
        if trainer.strategy.broadcast(done, src=0):
            return
        if trainer.is_global_zero and last.is_symlink():
            last.unlink()
        trainer.save_checkpoint(str(last))
        self.ckpt._last_global_step_saved = trainer.global_step


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


class FlushLogsAtCheckpoint(Callback):
    """Before every checkpoint file is written: the CSV rows still buffered go to disk, and so does the row
    of the step being checkpointed when the checkpoint is taken in `on_train_batch_end` (Lightning logs that
    row after the hook; a kill just after the checkpoint would otherwise lose it for good, since the resumed
    run starts at the next step)."""

    def __init__(self):
        self._in_batch_end = False

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self._in_batch_end = False

    def on_train_batch_end(self, *args, **kwargs) -> None:
        # Lightning runs checkpoint callbacks after every other callback's hook: the periodic checkpoint
        # of this step comes after this
        self._in_batch_end = True

    def on_validation_start(self, *args, **kwargs) -> None:
        self._in_batch_end = False

    def on_train_end(self, *args, **kwargs) -> None:
        self._in_batch_end = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        csv = [lg for lg in trainer.loggers if isinstance(lg, ResumableCSVLogger)]
        if not csv:
            return
        pending = None
        conn = trainer._logger_connector
        # every rank computes the row (as Lightning does), rank 0 writes it
        if self._in_batch_end and conn.should_update_logs:
            from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars

            metrics = convert_tensors_to_scalars(dict(conn.metrics["log"]))
            if metrics:  # what Lightning's update_train_step_metrics is about to log, at the same step
                metrics.setdefault("epoch", trainer.current_epoch)
                pending = (metrics, trainer.fit_loop.epoch_loop._batches_that_stepped)
        if not trainer.is_global_zero:
            return
        for lg in csv:
            if pending is not None:
                lg.write_ahead(*pending)
            else:
                lg.save()


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


def accumulation(cfg: DictConfig) -> int | None:
    """stage.effective_batch_size -> trainer.accumulate_grad_batches (samples per optimizer step =
    data.batch_size x devices x num_nodes x accumulation)."""
    eff = cfg.stage.get("effective_batch_size")
    if not eff:
        return None
    devices = cfg.trainer.get("devices", 1)
    n_dev = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else devices
    if not isinstance(n_dev, int) or n_dev < 1:
        import torch

        n_dev = max(1, torch.cuda.device_count()) if cfg.trainer.get("accelerator") != "cpu" else 1
    per_step = int(cfg.data.batch_size) * n_dev * int(cfg.trainer.get("num_nodes", 1) or 1)
    if int(eff) % per_step:
        raise UrtError(f"stage.effective_batch_size={eff} is not a multiple of data.batch_size x devices x nodes "
                       f"= {per_step}")
    return int(eff) // per_step


def model_checkpoint(cfg: DictConfig, out: Path) -> ModelCheckpoint:
    """The periodic checkpointing of `stage.checkpoint` (every_n_steps, keep, save_last)."""
    ck = cfg.stage.get("checkpoint") or {}
    try:
        return ModelCheckpoint(dirpath=str(out / CKPT_DIR), filename="step-{step:06d}", auto_insert_metric_name=False,
                               every_n_train_steps=ck.get("every_n_steps") or None, save_top_k=int(ck.get("keep", 1)),
                               monitor=None, save_last=ck.get("save_last", True), save_on_train_epoch_end=False)
    except Exception as err:  # noqa: BLE001 - Lightning's MisconfigurationException, int() of a bad value
        raise UrtError(f"stage.checkpoint={OmegaConf.to_container(ck) if OmegaConf.is_config(ck) else ck}: {err} "
                       f"(keep: 1 = the latest periodic checkpoint, -1 = all, 0 = none)") from None


def stage_callbacks(cfg: DictConfig, bundle, out: Path, extra: Sequence[Callback] = ()) -> list[Callback]:
    """The callbacks every training stage runs: Lightning checkpoints for resume (periodic + last.ckpt),
    plain transformers exports under hf/, any `callbacks:` from the config, then the caller's."""
    st = cfg.stage
    ckpt = model_checkpoint(cfg, out)
    from urt.models.preprocessing import training_preprocessing

    cbs: list[Callback] = [ckpt, LastCheckpoint(ckpt), FlushLogsAtCheckpoint(),
                           HFExport(bundle, out / HF_DIR, st.get("hf", {}).get("every_n_steps"),
                                    preprocessing=training_preprocessing(cfg.get("data")))]
    if cfg.get("callbacks"):
        cbs += [instantiate(c) for c in cfg.callbacks.values() if c is not None and "_target_" in c]
    return cbs + list(extra)



# ------------------------------------------------------------------------------------------ the module
def num_batches(dm) -> int | None:
    """Train batches in one pass over the shards, from the shard index counts (None when unknown)."""
    from urt.data.shards import expected_counts, read_index, resolve_shards

    try:
        urls = resolve_shards(dm.train_shards)
    except UrtError:
        return None
    counts = expected_counts(urls)
    if len(counts) != len(urls):
        return None
    if dm.tasks:  # per-task counts from the index
        n = 0
        for u in urls:
            idx = read_index(Path(u).parent) or {}
            sh = next((s for s in idx.get("shards", []) if s.get("name") == Path(u).name), None)
            if sh is None or "tasks" not in sh:
                return None
            n += sum(int(sh["tasks"].get(t, 0)) for t in dm.tasks)
    else:
        n = sum(counts.values())
    units = n * (2 if dm.order == "both" else 1)
    return max(1, math.ceil(units / dm.batch_size))


class StageModule(L.LightningModule):
    """The LightningModule base of every training stage: the bundle's model is trained, the optimizer and
    scheduler are Hydra partials (`conf/optimizer`, `conf/scheduler`) bound in `configure_optimizers`
    (the scheduler stepped every optimizer step over `schedule_steps`), and every checkpoint records the
    family and the schedule length (plus `checkpoint_state()`, a stage's own resumable state)."""

    def __init__(self, bundle, optimizer: Callable | None = None, scheduler: Callable | None = None, *,
                 total_steps: int | None = None):
        super().__init__()
        self.bundle = bundle
        self.model = bundle.model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.total_steps = total_steps
        self.schedule_steps: int | None = None

    # -------------------------------------------------------------------------------------- schedule
    def steps_per_epoch(self, batches_per_rank: int) -> int:
        """Optimizer steps one epoch of `batches_per_rank` batches takes on each rank."""
        return batches_per_rank

    def unknown_schedule_steps(self) -> int:
        """The schedule length when neither stage.total_steps, trainer.max_steps nor the shard index tell."""
        raise UrtError("cannot tell how many optimizer steps the schedule spans: the train shards have no "
                       "index.json counts; set trainer.max_steps or stage.total_steps")

    def _schedule_steps(self) -> int:
        if self.total_steps:
            return int(self.total_steps)
        tr = self.trainer
        if tr.max_steps and tr.max_steps > 0:
            return int(tr.max_steps)
        dm = getattr(tr, "datamodule", None)
        per_epoch = num_batches(dm) if dm is not None and hasattr(dm, "train_shards") else None
        if per_epoch is not None and tr.max_epochs and tr.max_epochs > 0:
            per_rank = math.ceil(per_epoch / max(1, tr.world_size))
            return max(1, self.steps_per_epoch(per_rank) * tr.max_epochs)
        return self.unknown_schedule_steps()

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise UrtError("no trainable parameters (check the model's freeze_* flags)")
        if self.optimizer_factory is None:
            raise UrtError(f"{type(self).__name__} needs an optimizer partial (conf/optimizer)")
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        self.schedule_steps = self._schedule_steps()
        sched = self.scheduler_factory(opt, num_training_steps=self.schedule_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # -------------------------------------------------------------------------------------- sharding
    def sharded_models(self) -> list:
        """The models the sharded strategy (trainer=fsdp) shards: the policy; GRPO adds its reference."""
        return [self.model]

    def configure_model(self) -> None:
        # Lightning calls this on every strategy; only urt's FSDP2 one shards (urt.stages.sharded)
        shard = getattr(self._trainer.strategy, "shard_stage", None) if self._trainer is not None else None
        if shard is not None:
            shard(self)

    # -------------------------------------------------------------------------------------- checkpoint
    def checkpoint_state(self) -> dict:
        """A stage's own state to resume exactly (GRPO: its rollout counter)."""
        return {}

    def load_checkpoint_state(self, state: dict) -> None:
        pass

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Frozen weights (vision tower, projector) never change; they are kept anyway so a Lightning
        # checkpoint is self-contained (the HF folders are the deliverable for inference).
        checkpoint["urt"] = {"family": self.bundle.family, "schedule_steps": self.schedule_steps,
                             **self.checkpoint_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.load_checkpoint_state(checkpoint.get("urt", {}))


# ------------------------------------------------------------------------------------------ building
RUN_KEYS = ("name", "run_name", "run_dir", "resume", "checkpoint", "hf", "effective_batch_size")


@dataclass
class StageParts:
    """What a stage's `build` returns: nothing is fitted yet."""

    bundle: Any
    datamodule: Any
    module: L.LightningModule
    trainer: L.Trainer
    ckpt_path: str | None

    def __iter__(self):  # (bundle, dm, module, trainer, ckpt_path) = build(cfg)
        return iter((self.bundle, self.datamodule, self.module, self.trainer, self.ckpt_path))


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


def _instantiate_error(what: str, err: Exception) -> UrtError:
    """A UrtError for a config part Hydra could not build (Hydra wraps the builder's own error)."""
    cause = err
    while getattr(cause, "__cause__", None) is not None and not isinstance(cause, UrtError):
        cause = cause.__cause__
    if isinstance(cause, UrtError):
        return UrtError(f"{what}: {cause}")
    return UrtError(f"{what}: {type(cause).__name__}: {cause}")


# Trainer settings that must be whole numbers (or null) and what a value means.
_TRAINER_INTS = ("max_steps", "min_steps", "max_epochs", "min_epochs", "accumulate_grad_batches",
                 "log_every_n_steps", "num_nodes", "num_sanity_val_steps", "check_val_every_n_epoch")


def check_trainer_config(cfg: DictConfig, out: Path) -> None:
    """`cfg.trainer` builds a Trainer (accelerator present, devices, strategy, numbers): checked with a
    throwaway Trainer before the model loads (the real one needs the model's callbacks)."""
    tr = cfg.get("trainer")
    if tr is None:
        raise UrtError("no trainer in the config: add `trainer=cpu` (or gpu, ddp, fsdp; conf/trainer/)")
    for key in _TRAINER_INTS:
        v = tr.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise UrtError(f"trainer.{key}={v!r}: expected a whole number (or null)")
    accel = str(tr.get("accelerator", "auto") or "auto").lower()
    if accel in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UrtError(f"trainer.accelerator={accel} but this machine has no usable CUDA GPU "
                           f"(torch.cuda.is_available() is False): use trainer=cpu, or run where a GPU is")
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)  # the throwaway Trainer's "GPU available" lines would print twice
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            instantiate(tr, callbacks=[], logger=False, enable_checkpointing=False, default_root_dir=str(out))
    except UrtError:
        raise
    except Exception as err:  # noqa: BLE001 - Lightning raises several types for a bad setting
        raise _instantiate_error("trainer config (conf/trainer, trainer.* overrides)", err) from None
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)


def check_data_config(cfg: DictConfig, **data_kwargs) -> None:
    """`cfg.data` builds its data module (batch size, orders, tasks, pixel budgets...): the module's own
    checks, run before the model loads."""
    if cfg.get("data") is None:
        raise UrtError("no data in the config (conf/data)")
    try:
        instantiate(cfg.data, **data_kwargs)
    except Exception as err:  # noqa: BLE001 - Hydra wraps the data module's UrtError
        raise _instantiate_error("data config (conf/data, data.* overrides)", err) from None
    if cfg.stage.get("effective_batch_size"):
        accumulation(cfg)


def start(cfg: DictConfig, *, exclude: Sequence[str] = (), given: Sequence[str] = (),
          data_kwargs: dict | None = None):
    """The set-up every stage begins with: the run folder (created and writable), the config (the trainer,
    the data module and the stage's module settings, `exclude`/`given` as for `instantiate_module`), the
    seed, the checkpoint to resume from, all checked before anything heavy is loaded, then the model bundle.
    Returns (run folder, ckpt_path, bundle)."""
    from urt.models import load_model

    out = run_dir(cfg)
    check_writable(out)
    check_trainer_config(cfg, out)
    check_data_config(cfg, **(data_kwargs or {}))
    module_class(cfg, exclude, given)
    model_checkpoint(cfg, out)
    L.seed_everything(int(cfg.seed), workers=True)
    ckpt_path = resume_path(cfg)
    from urt.stages.sharded import load_settings

    kwargs, master = load_settings(OmegaConf.to_container(cfg.model, resolve=True), cfg.trainer)
    bundle = load_model(**kwargs)
    bundle.from_rank0 = bool(kwargs.get("meta"))
    if master is not None and any(p.dtype != master for p in bundle.model.parameters() if p.requires_grad):
        bundle.master_dtype = master  # the strategy casts unit by unit as it shards (load_settings)
        config = bundle.model.config  # what hf/ exports say, as if loaded in the master dtype
        for c in [config, *(getattr(config, k, None) for k in getattr(config, "sub_configs", {}))]:
            if c is not None:
                c.dtype = master
    return out, ckpt_path, bundle


def module_settings(cfg: DictConfig, exclude: Sequence[str] = ()) -> DictConfig:
    """`cfg.stage` without the shared run settings (and a stage's own `exclude`d builder settings): the
    module's `_target_` and constructor arguments."""
    st = cfg.stage
    if "_target_" not in st:
        raise UrtError(f"stage {st.get('name')!r} names no LightningModule: conf/stage/*.yaml sets `_target_`")
    skip = set(RUN_KEYS) | set(exclude)
    return OmegaConf.create({k: v for k, v in st.items() if k not in skip})


def module_class(cfg: DictConfig, exclude: Sequence[str] = (), given: Sequence[str] = ()):
    """The stage's LightningModule class, its settings checked against its constructor (`given`: the
    argument names the builder passes itself)."""
    spec = module_settings(cfg, exclude)
    target = spec._target_
    from hydra.utils import get_class

    try:
        cls = get_class(str(target))
    except Exception as e:  # noqa: BLE001 - Hydra wraps import errors in several types
        raise UrtError(f"stage._target_={target!r} cannot be imported: {e}") from None
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in spec if k != "_target_" and k not in params]
    clash = [k for k in spec if k in given]
    if clash:  # e.g. the seed (cfg.seed) or the rewards (cfg.reward)
        raise UrtError(f"stage.{clash[0]} is not a stage setting: urt passes {clash[0]} from another part of "
                       f"the config")
    if unknown and not takes_any:
        known = sorted(k for k, p in params.items() if k not in ("self", "bundle", "optimizer", "scheduler")
                       and p.kind is not inspect.Parameter.VAR_POSITIONAL)
        raise UrtError(f"stage.{unknown[0]} is not a setting of {cls.__name__} (stage={cfg.stage.get('name')}); "
                       f"its settings: {', '.join(k for k in known if k not in given)}; the run settings: "
                       f"{', '.join((*RUN_KEYS, *exclude))}")
    return cls


def instantiate_module(cfg: DictConfig, exclude: Sequence[str] = (), **given) -> L.LightningModule:
    """The stage's LightningModule from `cfg.stage` (see the module docstring), with `given` (the bundle,
    optimizer and scheduler partials, whatever the builder computes) passed as well."""
    cls = module_class(cfg, exclude, tuple(given))
    spec = module_settings(cfg, exclude)
    # Components among the settings (the GRPO loss) are built by Hydra; what the builder computed (the bundle,
    # a RewardSet, ...) goes to the constructor as it is (Hydra would copy it into an OmegaConf node).
    kwargs = {k: instantiate(v, _convert_="all") if isinstance(v, dict) and "_target_" in v else v
              for k, v in OmegaConf.to_container(spec, resolve=True).items() if k != "_target_"}
    try:
        return cls(**kwargs, **given)
    except TypeError as e:
        raise UrtError(f"stage ({cls.__name__}): {e}") from None


def optimizer_partials(cfg: DictConfig) -> dict:
    return {"optimizer": instantiate(cfg.optimizer),
            "scheduler": instantiate(cfg.scheduler) if cfg.get("scheduler") else None}


def make_trainer(cfg: DictConfig, out: Path, callbacks: Sequence[Callback], **overrides) -> L.Trainer:
    """`cfg.trainer` with the stage's callbacks, the configured loggers and the run folder as root."""
    return instantiate(cfg.trainer, callbacks=list(callbacks), logger=loggers(cfg, out) or False,
                       default_root_dir=str(out), **overrides)


def fit(cfg: DictConfig, parts: StageParts) -> Path:
    """Fit built stage parts; writes run_dir/config.yaml first and returns the final HF folder."""
    trainer = parts.trainer
    if trainer.is_global_zero:
        (run_dir(cfg) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if parts.ckpt_path:
        log.info("resuming from %s", parts.ckpt_path)
    try:
        trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=parts.ckpt_path)
    finally:
        finish_loggers(trainer)
    report_data(cfg, parts.datamodule, trainer)
    ensure_final_export(trainer)
    return final_hf_dir(cfg)


def report_data(cfg: DictConfig, dm, trainer: L.Trainer) -> None:
    """The run's read/skip counts per reason: logged (a warning when anything was skipped, so a CLI user
    sees it) and written to run_dir/data_summary.json."""
    summary = getattr(dm, "summary", None)
    if not callable(summary):
        return
    stats = getattr(dm, "run_skip_stats", None)
    skipped = bool(stats is not None and stats.total_skipped)
    log.log(logging.WARNING if skipped else logging.INFO, "data: %s", summary())
    if stats is not None and trainer.is_global_zero:
        rec = {"train": stats.as_dict(), "position": getattr(dm, "position", None),
               "eval": {k: v.as_dict() for k, v in getattr(dm, "eval_skip_stats", {}).items()}}
        (run_dir(cfg) / "data_summary.json").write_text(json.dumps(rec, indent=1) + "\n")


def ensure_final_export(trainer: L.Trainer) -> None:
    """Export hf/final when the run ended without one for its last step: a run whose export was interrupted
    (or whose hf/ was deleted) restores last.ckpt at max_steps, where Lightning skips the training loop and
    with it `on_train_end`. The weights are the restored ones."""
    from urt.models.preprocessing import exported_step

    export = next((c for c in trainer.callbacks if isinstance(c, HFExport)), None)
    if export is None:
        return
    final = export.out_dir / FINAL
    if exported_step(final) == trainer.global_step:
        return
    if is_fsdp(trainer):  # the sharded weights are gone with the strategy's teardown
        raise UrtError(f"{final} does not hold the run's last step ({trainer.global_step}) and an FSDP run cannot "
                       f"export after fit; re-run with trainer.max_steps raised by one to export")
    if trainer.is_global_zero:
        log.warning("%s is missing or older than the run's last step (%d): exporting it now", final,
                    trainer.global_step)
        export.write(FINAL, trainer.global_step)
