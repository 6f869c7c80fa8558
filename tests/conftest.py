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
    import urt.demo.chain  # noqa: F401 - registers `chain` on its first import only: had a test imported it first,
    #   the restore below would drop it for good (a later `reward.imports` is a no-op on a module already loaded)
    from urt.rewards import REWARDS

    saved = dict(REWARDS)
    yield
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
