"""The Hydra-composed training entry point (`urt train [OVERRIDES...]`).

`run_sft(cfg)` builds, from one composed config: the model bundle (`cfg.model` -> load_model), the data
module (`cfg.data`, attached to the bundle), the `SFTModule` (optimizer / scheduler partials from
`cfg.optimizer` / `cfg.scheduler`), the Trainer (`cfg.trainer`, loggers from `cfg.logger`) and its
callbacks, then fits and writes the final HF folder. Everything a run writes lives in
`cfg.stage.run_dir`::

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
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.fabric.loggers.logger import rank_zero_experiment
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


def _fsdp(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def full_model_state(trainer: L.Trainer) -> dict:
    """FSDP: the full (unsharded) state dict of the HF model, gathered from every rank onto rank 0's CPU
    (a collective: every rank calls it; ranks > 0 get {}). Whatever the strategy's own `state_dict_type`
    (sharded checkpoints included), this is FSDP's FULL_STATE_DICT with `rank0_only` and CPU offload, so
    no rank ever holds more than one full copy, in host memory. Keys are the HF model's (the
    LightningModule's `model.` prefix removed; FSDP and activation-checkpoint wrappers leave no trace)."""
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
    try:
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

        if not _fsdp(trainer):
            return
        if is_peft_model(self.bundle.model):
            raise UrtError("LoRA with FSDP is not supported (the HF export merges the adapters into the full "
                           "base weights on one rank): train LoRA with trainer=ddp")
        from urt.models.sharding import check_wrapping

        check_wrapping(self.bundle.model, self.bundle.family)

    def _save(self, trainer: L.Trainer, name: str) -> None:
        state = full_model_state(trainer) if _fsdp(trainer) else None
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


def _loggers(cfg: DictConfig, out: Path) -> list:
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


def _accumulation(cfg: DictConfig) -> int | None:
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


def build(cfg: DictConfig, callbacks: Sequence[Callback] = ()):
    """(bundle, datamodule, module, trainer, ckpt_path) for an SFT config; nothing is fitted yet."""
    from urt.models import load_model
    from urt.stages.sft import SFTModule

    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)
    ckpt_path = resume_path(cfg)

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    bundle = load_model(**model_cfg)
    dm = instantiate(cfg.data)
    dm.attach(bundle)
    st = cfg.stage
    module = SFTModule(bundle, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler)
                       if cfg.get("scheduler") else None, total_steps=st.get("total_steps"),
                       selected_logits=st.get("selected_logits", True),
                       gen_eval=OmegaConf.to_container(st.gen_eval, resolve=True) if st.get("gen_eval") else None)

    cbs = stage_callbacks(cfg, bundle, out, callbacks)

    tkw = {}
    acc = _accumulation(cfg)
    if acc is not None:
        tkw["accumulate_grad_batches"] = acc
    trainer = instantiate(cfg.trainer, callbacks=cbs, logger=_loggers(cfg, out) or False,
                          default_root_dir=str(out), **tkw)
    return bundle, dm, module, trainer, ckpt_path


def run_sft(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> Path:
    """Fit an SFT stage from a composed config; returns the final HF folder (`run_dir/hf/final`)."""
    out = run_dir(cfg)
    bundle, dm, module, trainer, ckpt_path = build(cfg, callbacks)
    if trainer.is_global_zero:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    finally:
        finish_loggers(trainer)
    log.info("data: %s", dm.summary())
    return final_hf_dir(cfg)


# Stage name (cfg.stage.name) -> runner. Other stages register theirs here.
from urt.stages.grpo import run_grpo  # noqa: E402
STAGES = {"sft": run_sft, "grpo": run_grpo}


def train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> Path:
    """Run the stage `cfg.stage.name`; returns what it writes last (SFT: the final HF folder)."""
    if cfg.get("stage") is None or "name" not in cfg.stage:
        raise UrtError("no stage in the config: add `stage=sft` (conf/stage/) to the overrides")
    name = str(cfg.stage.name)
    if name not in STAGES:
        raise UrtError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    return STAGES[name](cfg, callbacks)
