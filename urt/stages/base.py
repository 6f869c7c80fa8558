"""What every training stage shares: the run folder, resume, loggers, callbacks, the HF export, the length
of the lr schedule, the optimizer set-up and the build-then-fit runner. A stage file (`sft.py`, `grpo.py`)
holds its LightningModule (a `StageModule`) and its `build(cfg, callbacks) -> StageParts`; `urt/train.py`
maps a stage name to that builder.

Everything a run writes lives in `cfg.stage.run_dir`::

    run_dir/config.yaml          the composed config (resolved)
    run_dir/checkpoints/         Lightning state for exact resume (model, optimizer, scheduler, loop and
                                 data position): step-NNNNNN.ckpt every stage.checkpoint.every_n_steps,
                                 last.ckpt (also written at the end of fit)
    run_dir/hf/final/            plain transformers folder (model + processor) at the end of fit
    run_dir/hf/step-NNNNNN/      the same every stage.hf.every_n_steps (optional)
    run_dir/csv/, run_dir/wandb/ loggers

Resume (`stage.resume`): "auto" continues from `run_dir/checkpoints/last.ckpt` when it exists,
"never" starts fresh (an existing last.ckpt is then an error, so a run is never silently
overwritten), a path resumes from that checkpoint.

**The module from the config.** `cfg.stage` names its LightningModule by `_target_`; its other keys are the
module's constructor arguments, except the run settings every stage shares (`RUN_KEYS`: name, run_name,
run_dir, resume, checkpoint, hf, effective_batch_size). A key the module does not take is an error naming
the key and the keys it takes (a typo such as `+stage.betaa=0.1` is never silently ignored).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
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

    def __init__(self, bundle, out_dir: str | Path, every_n_steps: int | None = None):
        self.bundle = bundle
        self.out_dir = Path(out_dir)
        self.every = int(every_n_steps or 0)
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
            from urt.models import save_pretrained

            path = save_pretrained(self.bundle, self.out_dir / name) if state is None else \
                save_full_state(self.bundle, state, self.out_dir / name)
            self.written.append(path)
            log.info("wrote %s", path)
        trainer.strategy.barrier("urt_hf_export")

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
    checkpoint of a crashed run appear twice, the later ones being the resumed run's)."""

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def resume_path(cfg: DictConfig) -> str | None:
    mode = str(cfg.stage.get("resume", "auto") or "auto")
    last = run_dir(cfg) / CKPT_DIR / "last.ckpt"
    if mode == "auto":
        # Lightning's Slurm plugin writes run_dir/hpc_ckpt_N.ckpt when the job is signalled before its time
        # limit (USR1, slurm/*.sbatch): resume from whichever of those and last.ckpt is newest
        found = [p for p in [last, *run_dir(cfg).glob("hpc_ckpt_*.ckpt")] if p.exists()]
        return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None
    if mode == "never":
        if last.exists():
            raise UrtError(f"{last} exists and stage.resume=never: pick another stage.run_dir (or "
                           f"stage.run_name), delete the old run, or use stage.resume=auto to continue it")
        return None
    path = Path(mode).expanduser()
    if not path.exists():  # a file, or a folder (FSDP's sharded checkpoints)
        raise UrtError(f"stage.resume={mode!r}: no such checkpoint (use auto, never or a .ckpt path)")
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


def stage_callbacks(cfg: DictConfig, bundle, out: Path, extra: Sequence[Callback] = ()) -> list[Callback]:
    """The callbacks every training stage runs: Lightning checkpoints for resume (periodic + last.ckpt),
    plain transformers exports under hf/, any `callbacks:` from the config, then the caller's."""
    st = cfg.stage
    ck = st.checkpoint
    ckpt = ModelCheckpoint(dirpath=str(out / CKPT_DIR), filename="step-{step:06d}", auto_insert_metric_name=False,
                           every_n_train_steps=ck.get("every_n_steps") or None, save_top_k=int(ck.get("keep", 1)),
                           monitor=None, save_last=ck.get("save_last", True), save_on_train_epoch_end=False)
    cbs: list[Callback] = [ckpt, LastCheckpoint(ckpt),
                           HFExport(bundle, out / HF_DIR, st.get("hf", {}).get("every_n_steps"))]
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


def start(cfg: DictConfig):
    """The set-up every stage begins with: the run folder, the seed, the checkpoint to resume from (checked
    before anything heavy is loaded) and the model bundle. Returns (run folder, ckpt_path, bundle)."""
    from urt.models import load_model

    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)
    ckpt_path = resume_path(cfg)
    bundle = load_model(**OmegaConf.to_container(cfg.model, resolve=True))
    return out, ckpt_path, bundle


def module_settings(cfg: DictConfig, exclude: Sequence[str] = ()) -> DictConfig:
    """`cfg.stage` without the shared run settings (and a stage's own `exclude`d builder settings): the
    module's `_target_` and constructor arguments."""
    st = cfg.stage
    if "_target_" not in st:
        raise UrtError(f"stage {st.get('name')!r} names no LightningModule: conf/stage/*.yaml sets `_target_`")
    skip = set(RUN_KEYS) | set(exclude)
    return OmegaConf.create({k: v for k, v in st.items() if k not in skip})


def instantiate_module(cfg: DictConfig, exclude: Sequence[str] = (), **given) -> L.LightningModule:
    """The stage's LightningModule from `cfg.stage` (see the module docstring), with `given` (the bundle,
    optimizer and scheduler partials, whatever the builder computes) passed as well."""
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
    summary = getattr(parts.datamodule, "summary", None)
    if callable(summary):
        log.info("data: %s", summary())
    return final_hf_dir(cfg)
