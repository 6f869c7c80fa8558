"""Every shipped config composes, and the composed values are the ones a run would use."""

from pathlib import Path

import pytest
import yaml

from urt.cli import main
from urt.config import compose_config, conf_dir, group_options
from urt.errors import UrtError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra" and any(p.rglob("*.yaml")))
# conf/hydra holds launcher configs for `urt sweep multirun` (tests/test_sweeps.py composes them)


def options(group: str) -> list[str]:
    """Every shipped option of a group, nested ones as `paper/llava_ov_7b/cold_start`."""
    return sorted(str(p.relative_to(CONF / group).with_suffix("")) for p in (CONF / group).rglob("*.yaml"))


ROOT_GROUPS = {
    next(iter(d)).split(" ")[-1] if isinstance(d, dict) else d
    for d in yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    if isinstance(d, dict)
}


def override(group: str, option: str) -> str:
    """`group=option` for groups in the root defaults list, `+group=option` for opt-in groups
    (experiment, distill, ...), exactly as a user would type them."""
    return f"{group}={option}" if group in ROOT_GROUPS else f"+{group}={option}"


def test_conf_dir_is_the_repository_tree():
    assert conf_dir() == CONF


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in GROUPS for o in options(g)],
)
def test_every_shipped_option_composes(group, option):
    cfg = compose_config([override(group, option)])
    # Resolving catches broken interpolations, not just YAML syntax.
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert group.split("/")[0] in resolved or group == "experiment"
    if group == "model":
        from urt.models import FAMILIES

        assert resolved["model"]["family"] in FAMILIES
        assert resolved["model"]["name_or_path"]


def test_model_configs_cover_every_family():
    from urt.models import FAMILIES

    families = {compose_config([f"model={o}"]).model.family for o in group_options("model")}
    assert families == set(FAMILIES)


def test_paper_reward_weights_are_equal_format_and_accuracy():
    assert dict(compose_config([]).reward.weights) == {"format": 1.0, "accuracy": 1.0}


def test_bad_override_is_a_clear_error():
    with pytest.raises(UrtError, match="model=no_such_model"):
        compose_config(["model=no_such_model"])


def test_cli_config_prints_composed_yaml(capsys):
    assert main(["config", "model=tiny_qwen3_vl", "seed=7"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["family"] == "qwen3_vl"
    assert out["seed"] == 7


def test_cli_config_bad_override_exits_2(capsys):
    assert main(["config", "reward=nope"]) == 2
    assert "reward=nope" in capsys.readouterr().err


@pytest.mark.parametrize("option", [o for o in group_options("model") if o.startswith("tiny_")])
def test_tiny_model_configs_load_through_the_one_entry_point(option):
    """A model config's keys are exactly load_model's arguments: what users compose is what loads."""
    from omegaconf import OmegaConf

    from urt.models import load_model

    cfg = OmegaConf.to_container(compose_config([f"model={option}"]).model, resolve=True)
    bundle = load_model(**cfg)
    assert bundle.family == cfg["family"]
    assert next(bundle.model.parameters()).device.type == "cpu"
    # freeze_vision / freeze_projector defaults: only the language model trains, as in the paper.
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert trainable and all(bundle.spec.part_of(n) == "language" for n in trainable)
