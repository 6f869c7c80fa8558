"""The callbacks every training stage's trainer runs with: the HF export (`HFExport`: plain transformers
folders written under a temporary name and renamed, the full weights gathered onto rank 0 under the sharded
strategy), the end-of-fit checkpoint, log flushing at each checkpoint, and `stage_callbacks`, which puts
them together with the periodic ModelCheckpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from urt.errors import UrtError
from urt.stages.run import CKPT_DIR, FINAL, HF_DIR, ResumableCSVLogger

log = logging.getLogger(__name__)


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

