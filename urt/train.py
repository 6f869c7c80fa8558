"""`urt train`: run the stage a composed config names (`cfg.stage.name`).

Each stage file under `urt/stages/` holds its LightningModule and its `build(cfg, callbacks) -> StageParts`;
this module only maps a stage name to that builder, and `urt.stages.base.fit` fits what it built. What a
run writes (run_dir/config.yaml, checkpoints/, hf/final/, csv/, ...) and how it resumes: urt/stages/base.py
(the layout), urt/stages/run.py, urt/stages/callbacks.py.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Sequence

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from urt.errors import UrtError

# Stage name (cfg.stage.name) -> the module whose `build(cfg, callbacks)` builds it.
STAGES = {"sft": "urt.stages.sft", "grpo": "urt.stages.grpo"}


def builder(cfg: DictConfig):
    """The `build` function of the stage `cfg.stage.name`."""
    if cfg.get("stage") is None or "name" not in cfg.stage:
        raise UrtError("no stage in the config: add `stage=sft` (conf/stage/) to the overrides")
    name = str(cfg.stage.name)
    if name not in STAGES:
        raise UrtError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name]).build


def build(cfg: DictConfig, callbacks: Sequence[Callback] = ()):
    """The stage's parts (bundle, datamodule, module, trainer, ckpt_path); nothing is fitted yet. On a GPU
    the memory plan (urt.plan.preflight) is checked first: a stage that cannot fit stops here, with the
    plan's table, before its model is loaded."""
    from urt.plan import preflight

    build_stage = builder(cfg)
    preflight(cfg)
    return build_stage(cfg, callbacks)


def train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> Path:
    """Run the stage `cfg.stage.name`; returns its final HF folder (`run_dir/hf/final`)."""
    from urt.stages.base import fit

    parts = build(cfg, callbacks)
    return fit(cfg, parts)
