"""The GRPO objective of UnifiedReward-Think (docs/method.md §GRPO objective) and the variants researchers ablate.

Shapes: rewards (N,) with N = groups × G, completions laid out group by group (sample i belongs to
group i // G); per-token tensors (N, T) over the completion tokens, with a 0/1 `mask`.

Paper defaults: advantages `(r − mean) / (std + 1e-4)` per group with torch's unbiased std; k3 KL
`exp(d) − d − 1` with d = logπ_ref − logπ clamped to [−10, 10]; per-token loss
`−(ratio·A − β·KL)`; aggregation = mean over sequences of each sequence's token mean. With one policy
update per batch the old log-probs are the detached current ones (ratio ≡ 1, gradient of ratio·A is
A·∇logπ), so clipping never binds; with μ > 1 updates the kept old log-probs make it bind.

Variants of the policy loss (`PolicyLoss`, built from conf/stage/loss/*.yaml): grpo (`policy_loss`, the
paper's), gspo (`gspo_loss`: one clipped importance ratio per sequence) and cispo (`cispo_loss`: the
clipped importance weight detached, every token keeps its gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from urt.errors import UrtError

ADVANTAGE_MODES = ("paper", "none", "batch")
KL_ESTIMATORS = ("k3", "k1")
LOSS_AGGREGATIONS = ("paper", "token", "dr_grpo")
PAPER_STD_EPS = 1e-4
KL_CLAMP = 10.0


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise UrtError(f"rewards must be 1-D (groups × group_size), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise UrtError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, mode: str = "paper", eps: float = PAPER_STD_EPS
) -> torch.Tensor:
    """Per-completion advantages.

    paper: (r − group mean) / (group unbiased std + eps)   — GRPO as in the paper's code
    none:  r − group mean                                   — Dr.GRPO (no std normalisation)
    batch: (r − group mean) / (unbiased std of those centred values over the batch + eps)
    A group of size 1 has no spread: its advantage is 0 (torch's unbiased std would be NaN).
    """
    g = _grouped(rewards.float(), group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if mode == "paper":
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        adv = centred / (std + eps)
    elif mode == "none":
        adv = centred
    elif mode == "batch":
        flat = centred.flatten()
        std = flat.std() if flat.numel() > 1 else torch.zeros(())
        adv = centred / (std + eps)
    else:
        raise UrtError(f"unknown advantage mode {mode!r}; known: {', '.join(ADVANTAGE_MODES)}")
    return adv.flatten()


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups,) bool: groups whose rewards are all equal (std 0, not mean-based): they carry no
    learning signal under group normalisation and are what the optional filter drops."""
    g = _grouped(rewards.float(), group_size)
    return (g.max(dim=1).values - g.min(dim=1).values) == 0


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int | list[int]) -> torch.Tensor:
    """(N, T) 0/1 mask over completion tokens up to and including the first EOS (all tokens when a
    completion never emits EOS), as the paper's code masks its loss."""
    eos_ids = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                              device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos_ids)
    n, t = completion_ids.shape
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full((n,), t, device=completion_ids.device))
    positions = torch.arange(t, device=completion_ids.device).expand(n, t)
    return (positions <= first.unsqueeze(1)).float()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate. k3 (paper): exp(d) − d − 1 with d = logπ_ref − logπ clamped to
    [−10, 10] (always ≥ 0, unbiased); k1: logπ − logπ_ref."""
    if estimator == "k3":
        d = torch.clamp(ref_logp - logp, -KL_CLAMP, KL_CLAMP)
        return torch.exp(d) - d - 1
    if estimator == "k1":
        return logp - ref_logp
    raise UrtError(f"unknown KL estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")


def _check_shapes(logp: torch.Tensor, mask: torch.Tensor) -> None:
    if logp.shape != mask.shape:
        raise UrtError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} differ in shape")


def _token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached mean of x over every completion token of the batch (the diagnostics)."""
    return ((x * mask).sum() / mask.sum().clamp(min=1)).detach()


def _clip_binds(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """Where the clipped branch of −min(ratio·A, clip(ratio)·A) is taken and removes the gradient."""
    return ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))


def _add_kl(per_token: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor | None,
            beta: float, estimator: str, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """per_token + β·KL(π‖π_ref); records the KL's token mean in metrics. β = 0 needs no reference."""
    if beta == 0:
        return per_token
    if ref_logp is None:
        raise UrtError("beta != 0 needs reference log-probs (ref_logp)")
    kl = kl_penalty(logp, ref_logp, estimator)
    metrics["kl"] = _token_mean(kl, mask)
    return per_token + beta * kl


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str,
               max_completion_length: int | None) -> torch.Tensor:
    """The scalar loss from (N, T) per-token terms (the aggregations of `policy_loss`)."""
    tokens = mask.sum(dim=1)
    if aggregation == "paper":
        return ((per_token * mask).sum(dim=1) / tokens.clamp(min=1)).mean()
    if aggregation == "token":
        return (per_token * mask).sum() / tokens.sum().clamp(min=1)
    if aggregation == "dr_grpo":
        if not max_completion_length:
            raise UrtError("aggregation 'dr_grpo' needs max_completion_length (the constant normaliser)")
        return (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    raise UrtError(f"unknown loss aggregation {aggregation!r}; known: {', '.join(LOSS_AGGREGATIONS)}")


def policy_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.04,
    kl_estimator: str = "k3",
    aggregation: str = "paper",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss and its diagnostics.

    logp/old_logp/ref_logp: (N, T) per-token log-probs of the sampled completion tokens; advantages
    (N,); mask (N, T). old_logp None → detached logp (one update per batch: the paper). ref_logp may be
    None only when beta == 0. Per token: −min(ratio·A, clip(ratio, 1−eps_low, 1+eps_high)·A) + β·KL.
    Aggregation: paper = mean over sequences of (masked token sum / that sequence's token count);
    token = masked sum / all masked tokens (DAPO); dr_grpo = masked sum / (N × max_completion_length).
    Returns (loss, metrics) with metrics kl (masked token mean), clip_fraction, ratio_mean.
    """
    _check_shapes(logp, mask)
    mask = mask.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    metrics: dict[str, torch.Tensor] = {}
    per_token = _add_kl(per_token, logp, mask, ref_logp, beta, kl_estimator, metrics)
    loss = _aggregate(per_token, mask, aggregation, max_completion_length)
    metrics["clip_fraction"] = _token_mean(_clip_binds(ratio, adv, eps_low, eps_high).to(mask.dtype), mask)
    metrics["ratio_mean"] = _token_mean(ratio, mask)
    return loss, metrics


def gspo_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Group Sequence Policy Optimization, Qwen 2025): one importance ratio per sequence,
    s_i = exp(mean over its completion tokens of logπ − logπ_old), clipped to [1−eps_low, 1+eps_high];
    loss = mean over sequences of −min(s_i·A_i, clip(s_i)·A_i) (+ β × the sequence's token-mean KL).

    Written in the GSPO-token form, as verl's `gspo` loss (EasyR1's `gspo_token`): per token
    s_i,t = sg[s_i]·π_t/sg[π_t], whose value is s_i and gradient s_i·∇logπ_t, so each sequence's token
    mean gives the sequence form's value and gradient (s_i·mean_t ∇logπ_t) for per-sequence advantages;
    TRL's importance_sampling_level="sequence" with loss_type="grpo" (its GSPO recipe) computes the same.
    Always aggregated per sequence (the paper's 1/G Σ_i; verl forces seq-mean-token-mean). Unlike verl,
    the log-ratio is not capped at 10 (the grpo variant does not cap it either). Same shapes and metrics
    as `policy_loss`; clip_fraction counts the completion tokens of clipped sequences, as the GSPO paper
    reports it.
    """
    _check_shapes(logp, mask)
    mask = mask.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp
    log_s = ((logp - old) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    ratio = torch.exp(log_s.detach().unsqueeze(1) + logp - logp.detach())
    adv = advantages.to(logp.dtype).unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    metrics: dict[str, torch.Tensor] = {}
    per_token = _add_kl(per_token, logp, mask, ref_logp, beta, kl_estimator, metrics)
    loss = _aggregate(per_token, mask, "paper", None)
    metrics["clip_fraction"] = _token_mean(_clip_binds(ratio, adv, eps_low, eps_high).to(mask.dtype), mask)
    metrics["ratio_mean"] = _token_mean(ratio, mask)
    return loss, metrics


def cispo_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    aggregation: str = "token",
    eps_low: float = 1.0,
    eps_high: float = 4.0,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, 2025): per token −sg(clip(r_t, 1−eps_low, 1+eps_high))·A·logπ_t + β·KL, with
    r_t = π/π_old. The clipped importance weight is detached, so every token keeps a gradient
    (weight·A·∇logπ_t): clipping bounds its size instead of dropping it as GRPO's min does.

    Bounds as verl's and EasyR1's `cispo` (two-sided, additive epsilons). MiniMax-M1 bounds only the
    upper side: eps_low = 1 (lower bound 0, below any ratio) gives that. TRL's `cispo` instead caps at
    epsilon_high taken as the ratio itself (its ε_max = 5 is eps_high = 4 here) with no lower bound.
    Aggregations as `policy_loss` (token, the paper's 1/Σ|o_i|, by default). Same metrics as
    `policy_loss`; clip_fraction counts the tokens whose weight is truncated.
    """
    _check_shapes(logp, mask)
    mask = mask.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old).detach()
    weight = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    per_token = -weight * adv * logp
    metrics: dict[str, torch.Tensor] = {}
    per_token = _add_kl(per_token, logp, mask, ref_logp, beta, kl_estimator, metrics)
    loss = _aggregate(per_token, mask, aggregation, max_completion_length)
    metrics["clip_fraction"] = _token_mean((weight != ratio).to(mask.dtype), mask)
    metrics["ratio_mean"] = _token_mean(ratio, mask)
    return loss, metrics


class _Variant(NamedTuple):
    aggregations: tuple[str, ...]  # the first is the default
    beta: float
    epsilon_low: float
    epsilon_high: float


# Defaults from each method's paper (CISPO's upper bound: TRL's recommended ratio cap 5, from ScaleRL).
_VARIANTS = {
    "grpo": _Variant(LOSS_AGGREGATIONS, 0.04, 0.2, 0.2),
    "gspo": _Variant(("paper",), 0.0, 3e-4, 4e-4),
    "cispo": _Variant(("token", "paper", "dr_grpo"), 0.0, 1.0, 4.0),
}
POLICY_LOSS_VARIANTS = tuple(_VARIANTS)


def _number(name: str, value, default: float) -> float:
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UrtError(f"{name} must be a number, got {value!r}") from None


class PolicyLoss:
    """The GRPO stage's policy objective as a component built from config (conf/stage/loss/*.yaml).

    variant: grpo (the paper's: `policy_loss`) | gspo (`gspo_loss`) | cispo (`cispo_loss`). beta,
    aggregation, epsilon_low and epsilon_high left None take the variant's defaults (grpo: 0.04, paper,
    0.2, 0.2; gspo: 0, paper, 3e-4, 4e-4; cispo: 0, token, 1.0, 4.0). Calling it returns (loss, metrics)
    as `policy_loss` does: metrics clip_fraction, ratio_mean, and kl when beta != 0.
    """

    def __init__(self, variant: str = "grpo", beta: float | None = None, kl_estimator: str = "k3",
                 aggregation: str | None = None, epsilon_low: float | None = None,
                 epsilon_high: float | None = None):
        if variant not in _VARIANTS:
            raise UrtError(f"unknown loss variant {variant!r}; known: {', '.join(POLICY_LOSS_VARIANTS)}")
        spec = _VARIANTS[variant]
        aggregation = spec.aggregations[0] if aggregation is None else aggregation
        if aggregation not in spec.aggregations:
            raise UrtError(f"loss variant {variant!r} does not support aggregation {aggregation!r}; "
                           f"it supports: {', '.join(spec.aggregations)}")
        if kl_estimator not in KL_ESTIMATORS:
            raise UrtError(f"unknown KL estimator {kl_estimator!r}; known: {', '.join(KL_ESTIMATORS)}")
        self.variant, self.kl_estimator, self.aggregation = variant, kl_estimator, aggregation
        self.beta = _number("beta", beta, spec.beta)
        self.epsilon_low = _number("epsilon_low", epsilon_low, spec.epsilon_low)
        self.epsilon_high = _number("epsilon_high", epsilon_high, spec.epsilon_high)
        if self.beta < 0:
            raise UrtError(f"beta must be >= 0 (the KL weight), got {self.beta}")
        # 1 − epsilon_low is the ratio's lower bound: 1 already removes it (ratios are positive)
        if not 0 <= self.epsilon_low <= 1:
            raise UrtError(f"epsilon_low must lie in [0, 1], got {self.epsilon_low}")
        if self.epsilon_high < 0:
            raise UrtError(f"epsilon_high must be >= 0, got {self.epsilon_high}")

    @property
    def uses_reference(self) -> bool:
        """Whether the loss needs the reference policy's log-probs (a KL term)."""
        return self.beta != 0

    @property
    def token_weighted(self) -> bool:
        """How micro-batches accumulate exactly into one step: token aggregation divides the whole step
        by its completion-token count, so each micro-batch weighs by its share of tokens; paper and
        dr_grpo (and gspo, always per sequence) average per-sequence terms, weighed by sequence share."""
        return self.aggregation == "token"

    def __call__(self, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                 old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                 max_completion_length: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        common = dict(old_logp=old_logp, ref_logp=ref_logp, beta=self.beta, kl_estimator=self.kl_estimator,
                      eps_low=self.epsilon_low, eps_high=self.epsilon_high)
        if self.variant == "gspo":
            return gspo_loss(logp, advantages, mask, **common)
        fn = policy_loss if self.variant == "grpo" else cispo_loss
        return fn(logp, advantages, mask, aggregation=self.aggregation,
                  max_completion_length=max_completion_length, **common)

    def __repr__(self) -> str:
        return (f"PolicyLoss(variant={self.variant!r}, beta={self.beta}, kl_estimator={self.kl_estimator!r}, "
                f"aggregation={self.aggregation!r}, epsilon_low={self.epsilon_low}, "
                f"epsilon_high={self.epsilon_high})")
