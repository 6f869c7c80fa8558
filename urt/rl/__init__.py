"""GRPO maths as pure functions (advantages, KL estimators, the policy objective and its variants)."""

from urt.rl.objective import (
    ADVANTAGE_MODES,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSS_VARIANTS,
    PolicyLoss,
    cispo_loss,
    completion_mask,
    group_advantages,
    gspo_loss,
    kl_penalty,
    policy_loss,
    zero_variance_groups,
)

__all__ = [
    "ADVANTAGE_MODES",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSS_VARIANTS",
    "PolicyLoss",
    "cispo_loss",
    "completion_mask",
    "group_advantages",
    "gspo_loss",
    "kl_penalty",
    "policy_loss",
    "zero_variance_groups",
]
