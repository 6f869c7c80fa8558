import os

import pytest

# Tests never touch a hub: everything is built locally from the real transformers classes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _restore_reward_registry():
    """Tests register their own rewards (GRPO tests, registry tests); the registry is global, so put it
    back after each test rather than let one test's rewards leak into another's."""
    from urt.rewards import REWARDS

    saved = dict(REWARDS)
    yield
    REWARDS.clear()
    REWARDS.update(saved)
