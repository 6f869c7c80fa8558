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
    import sys

    from urt.rewards import REWARDS

    saved, modules = dict(REWARDS), set(sys.modules)
    yield
    # a module first imported in this test whose import registered rewards (urt.demo.chain) is forgotten with them:
    # a later `reward.imports` of it would otherwise find it loaded and register nothing
    for name, fn in REWARDS.items():
        if name not in saved and fn.__module__ not in modules:
            sys.modules.pop(fn.__module__, None)
    REWARDS.clear()
    REWARDS.update(saved)


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread for a module of tiny-model tests (faster on 2 cores than two fighting threads);
    request it with `pytestmark = pytest.mark.usefixtures("torch_one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
