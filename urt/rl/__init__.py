"""GRPO maths as pure functions (advantages, KL estimators, the policy objective)."""

from urt.rl.objective import (
    ADVANTAGE_MODES,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    completion_mask,
    group_advantages,
    kl_penalty,
    policy_loss,
    zero_variance_groups,
)

__all__ = [
    "ADVANTAGE_MODES",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "completion_mask",
    "group_advantages",
    "kl_penalty",
    "policy_loss",
    "zero_variance_groups",
]
