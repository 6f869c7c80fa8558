"""Group advantages over the completions a step could use: a group may hold fewer than G valid completions
(generation returned fewer, or one could not be encoded). Full batches are `urt.rl.objective.group_advantages`
exactly; under data parallelism the "batch" mode takes its std over the global batch."""

from __future__ import annotations

import torch

from urt.rl.distributed import all_gather_objects
from urt.rl.objective import PAPER_STD_EPS, group_advantages, zero_variance_groups


def grouped_advantages(rewards: torch.Tensor, valid: torch.Tensor, G: int, mode: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, zero-variance groups, usable groups) of rewards laid out G slots per group, over each
    group's valid slots only: a full batch is `group_advantages` exactly; a group with < 2 valid
    completions is not usable (no spread: its slots get advantage 0 and are skipped)."""
    rewards = rewards.float()
    if bool(valid.all()):
        return (group_advantages(rewards, G, mode), zero_variance_groups(rewards, G),
                torch.ones(rewards.numel() // G, dtype=torch.bool))
    r, v = rewards.view(-1, G), valid.view(-1, G)
    usable = v.sum(dim=1) >= 2
    adv = torch.zeros_like(r)
    zero_var = torch.zeros(r.shape[0], dtype=torch.bool)
    centred = []
    for g in usable.nonzero().flatten().tolist():
        rg = r[g][v[g]]
        zero_var[g] = bool(zero_variance_groups(rg, len(rg))[0])
        if mode == "batch":  # std of the centred values over the whole batch (below)
            centred.append((g, group_advantages(rg, len(rg), "none")))
        else:
            adv[g, v[g]] = group_advantages(rg, len(rg), mode)
    if centred:
        flat = torch.cat([c for _, c in centred])
        std = flat.std() if flat.numel() > 1 else torch.zeros(())
        for g, c in centred:
            adv[g, v[g]] = c / (std + PAPER_STD_EPS)
    return adv.flatten(), zero_var, usable


def global_batch_advantages(rewards: torch.Tensor, valid: torch.Tensor, usable: torch.Tensor, G: int
                            ) -> torch.Tensor:
    """advantage="batch" under data parallelism: the centred rewards scaled by the std over the *global*
    batch (the usable groups' valid slots of every rank, in rank order), as one process holding it would.
    A collective: every rank calls it."""
    centred, _, _ = grouped_advantages(rewards, valid, G, "none")
    sel = valid & usable.repeat_interleave(G)
    every = all_gather_objects(centred[sel].tolist())
    flat = torch.tensor([v for r in every for v in r], dtype=torch.float32)
    std = flat.std() if flat.numel() > 1 else torch.zeros(())
    return torch.where(sel, centred / (std + PAPER_STD_EPS), torch.zeros_like(centred))
