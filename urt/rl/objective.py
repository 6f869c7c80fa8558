"""The GRPO objective of UnifiedReward-Think (METHOD.md §2) and the variants researchers ablate.

Shapes: rewards (N,) with N = groups × G, completions laid out group by group (sample i belongs to
group i // G); per-token tensors (N, T) over the completion tokens, with a 0/1 `mask`.

Paper defaults: advantages `(r − mean) / (std + 1e-4)` per group with torch's unbiased std; k3 KL
`exp(d) − d − 1` with d = logπ_ref − logπ clamped to [−10, 10]; per-token loss
`−(ratio·A − β·KL)`; aggregation = mean over sequences of each sequence's token mean. With one policy
update per batch the old log-probs are the detached current ones (ratio ≡ 1, gradient of ratio·A is
A·∇logπ), so clipping never binds; with μ > 1 updates the kept old log-probs make it bind.
"""

from __future__ import annotations

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
    if logp.shape != mask.shape:
        raise UrtError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.to(logp.dtype)
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped)
    metrics: dict[str, torch.Tensor] = {}
    if beta != 0:
        if ref_logp is None:
            raise UrtError("beta != 0 needs reference log-probs (ref_logp)")
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()
    tokens = mask.sum(dim=1)
    if aggregation == "paper":
        loss = ((per_token * mask).sum(dim=1) / tokens.clamp(min=1)).mean()
    elif aggregation == "token":
        loss = (per_token * mask).sum() / tokens.sum().clamp(min=1)
    elif aggregation == "dr_grpo":
        if not max_completion_length:
            raise UrtError("aggregation 'dr_grpo' needs max_completion_length (the constant normaliser)")
        loss = (per_token * mask).sum() / (logp.shape[0] * max_completion_length)
    else:
        raise UrtError(f"unknown loss aggregation {aggregation!r}; known: {', '.join(LOSS_AGGREGATIONS)}")
    is_clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    metrics["clip_fraction"] = ((is_clipped.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)).detach()
    metrics["ratio_mean"] = ((ratio * mask).sum() / mask.sum().clamp(min=1)).detach()
    return loss, metrics
