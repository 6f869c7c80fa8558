"""GRPO rewards: the paper's format and accuracy rewards (docs/method.md §Rewards), an optional consistency
reward, and a registry for user-defined ones."""

from urt.rewards.core import (
    ANSWER_PATTERN,
    DEFAULT_WEIGHTS,
    FORMAT_PATTERN,
    REWARDS,
    RewardFn,
    RewardSet,
    accuracy_reward,
    build_rewards,
    consistency_reward,
    extract_answer,
    format_reward,
    get_reward,
    register_reward,
    score,
    solution_for,
)

__all__ = [
    "ANSWER_PATTERN",
    "DEFAULT_WEIGHTS",
    "FORMAT_PATTERN",
    "REWARDS",
    "RewardFn",
    "RewardSet",
    "accuracy_reward",
    "build_rewards",
    "consistency_reward",
    "extract_answer",
    "format_reward",
    "get_reward",
    "register_reward",
    "score",
    "solution_for",
]
