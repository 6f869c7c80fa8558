"""Hydra composition over the repository's `conf/` tree.

Every urt command composes its configuration here, so an experiment or an ablation is only a list of
overrides (`model=tiny_qwen3_vl reward=paper_consistency seed=3`) and tests compose exactly what users
run. `urt config` (registered below, `register`) prints what a list of overrides composes to."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

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


def root_has_group(group: str) -> bool:
    """Whether conf/config.yaml's defaults list selects `group` (then `group=NAME` picks another option;
    otherwise the group is opt-in, `+group=NAME`)."""
    root = OmegaConf.load(conf_dir() / "config.yaml")
    for item in root.get("defaults", []) or []:
        name = str(next(iter(item))) if OmegaConf.is_dict(item) else str(item)  # {group: option} or "_self_"
        if name.replace("optional ", "").lstrip("+").split("@")[0].strip() == group:
            return True
    return False


def group_override(group: str, option: str) -> str:
    """The override that selects `option` of config group `group` (conf/<group>/<option>.yaml), whether
    the root defaults list the group or not."""
    return f"{'' if root_has_group(group) else '+'}{group}={option}"


_BARE = re.compile(r"[A-Za-z_/][\w./\-]*")  # a string Hydra's override grammar reads back as this same string
_NOT_BARE = {"null", "true", "false", "inf", "nan"}


def override_value(value: Any) -> str:
    """`value` (None, bool, number, string, list, dict: a resolved config value) written in Hydra's
    override grammar, so that `KEY=<it>` sets exactly `value`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("-inf" if value < 0 else "inf")
    if isinstance(value, str):
        if _BARE.fullmatch(value) and value.lower() not in _NOT_BARE:
            return value
        # Hydra's quoted strings: a quote is escaped, and so are the backslashes just before a quote or the end
        quoted = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
        return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, quoted) + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        bad = [k for k in value if not re.fullmatch(r"[A-Za-z_]\w*", str(k))]
        if bad:
            raise UrtError(f"cannot write the key(s) {bad} as Hydra override dict keys (letters, digits, _)")
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    raise UrtError(f"cannot write {value!r} ({type(value).__name__}) as a Hydra override value")


def to_overrides(prefix: str, settings: dict) -> list[str]:
    """`PREFIX.KEY=VALUE` overrides for a mapping of settings (`override_value` per value)."""
    return [f"{prefix}.{k}={override_value(v)}" for k, v in settings.items()]


# ------------------------------------------------------------------------------------------ urt config
def _show(args: argparse.Namespace) -> int:
    if args.list:
        for group in ("model", "reward"):
            print(f"{group}: {', '.join(group_options(group))}")
        return 0
    sys.stdout.write(to_yaml(compose_config(args.overrides), resolve=not args.unresolved))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "config",
        help="print the composed Hydra config for OVERRIDES (e.g. model=tiny_qwen3_vl)",
        description="Compose conf/config.yaml with Hydra overrides and print it as YAML.",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny_qwen3_vl seed=1")
    p.add_argument("--unresolved", action="store_true", help="keep ${...} interpolations")
    p.add_argument("--list", action="store_true", help="list the options of each config group")
    p.set_defaults(func=_show)
