"""Hydra composition over the repository's `conf/` tree.

Every urt command composes its configuration here, so an experiment or an ablation is only a list of
overrides (`model=tiny_qwen3_vl reward=paper_consistency seed=3`) and tests compose exactly what users
run."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from urt.errors import UrtError


def conf_dir() -> Path:
    """The config tree: $URT_CONF_DIR, else `conf/` beside the package (editable install/clone)."""
    path = Path(os.environ.get("URT_CONF_DIR") or Path(__file__).resolve().parents[1] / "conf")
    if not (path / "config.yaml").is_file():
        raise UrtError(
            f"no Hydra config tree at {path} (expected {path / 'config.yaml'}); "
            "install urt from a clone (`pip install -e .`) or set URT_CONF_DIR"
        )
    return path


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> DictConfig:
    """Compose `config_name` with Hydra overrides; bad overrides raise UrtError with Hydra's reason."""
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="urt"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except HydraException as err:
        raise UrtError(f"cannot compose config {config_name!r} with overrides {list(overrides)}: {err}") from None
    return cfg


def group_options(group: str) -> list[str]:
    """Names of the shipped options of a config group (`model`, `reward`, …)."""
    folder = conf_dir() / group
    if not folder.is_dir():
        raise UrtError(f"no config group {group!r} in {conf_dir()}")
    return sorted(p.stem for p in folder.glob("*.yaml"))


def to_yaml(cfg: DictConfig, resolve: bool = True) -> str:
    return OmegaConf.to_yaml(cfg, resolve=resolve)
