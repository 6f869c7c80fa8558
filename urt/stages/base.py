"""What every training stage shares: the `StageModule` base (the length of the lr schedule, the optimizer
set-up, sharding and checkpoint hooks), the config checks and `start` every build begins with, the module
built from `cfg.stage._target_`, and the build-then-fit runner. The run folder, resume and loggers live in
urt/stages/run.py, the trainer's callbacks (HF export, checkpoints) in urt/stages/callbacks.py. A stage
file (`sft.py`, `grpo.py`) holds its LightningModule (a `StageModule`) and its
`build(cfg, callbacks) -> StageParts`; `urt/train.py` maps a stage name to that builder.

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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from urt.errors import UrtError
from urt.stages.callbacks import ensure_final_export, model_checkpoint
from urt.stages.run import check_writable, final_hf_dir, finish_loggers, loggers, resume_path, run_dir

log = logging.getLogger(__name__)


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


