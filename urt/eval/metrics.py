"""Evaluation metrics as torchmetrics `Metric`s (docs/method.md §Evaluation).

Every metric keeps integer *counts* in states registered with `dist_reduce_fx="sum"`, so a metric
updated on several DDP ranks computes the same numbers as one updated with everything.

Winners and gold labels travel as integer codes (`encode_winners`): 1 and 2 are the candidates,
`TIE` (0) a tie, `NONE` (-1) no parseable answer. A missing or malformed answer is simply a
prediction that equals no gold label, so it counts as wrong everywhere; nothing is matched by
substring.

| metric             | counts                                      | compute()                                   |
|--------------------|---------------------------------------------|---------------------------------------------|
| PairwiseAccuracy   | correct, total                              | correct / total                             |
| TauDiff            | correct/total over all pairs and non-ties   | {"tau": all pairs incl. ties, "diff": non-tied pairs} |
| GroupedAccuracy    | correct[g], total[g]                        | per-group accuracy (tensor of G)            |
| Rate               | hits, total                                 | hits / total (format-valid rate, …)         |
| PositionStats      | predicted[4], gold[4] (none, 1, 2, tie)     | {"pred_1_rate", …, "gold_1_rate", …}        |
| PositionConsistency| pairs, consistent                           | consistent / pairs                          |

An empty metric computes NaN (`as_float` turns it into None for reports).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torchmetrics import Metric

NONE, TIE = -1, 0
_CODE = {1: 1, 2: 2, "tie": TIE, None: NONE}


def encode_winner(w: Any) -> int:
    """1 / 2 / "tie" / None (anything else: None) -> integer code."""
    if isinstance(w, bool):
        return NONE
    if isinstance(w, torch.Tensor):
        w = int(w)
    return _CODE.get(w, NONE)


def encode_winners(ws: Iterable[Any] | torch.Tensor) -> torch.Tensor:
    if isinstance(ws, torch.Tensor):
        return ws.long().flatten()
    return torch.tensor([encode_winner(w) for w in ws], dtype=torch.long)


def _nan_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return torch.where(b > 0, a / b.clamp(min=1), torch.full_like(a, float("nan")))


def as_float(x: Any) -> float | None:
    """A 0-d tensor / number as a float, NaN (empty metric) as None."""
    if x is None:
        return None
    v = float(x)
    return None if math.isnan(v) else v


def _pair(pred, gold) -> tuple[torch.Tensor, torch.Tensor]:
    p, g = encode_winners(pred), encode_winners(gold)
    if p.shape != g.shape:
        raise ValueError(f"predictions and gold labels differ in length: {p.numel()} vs {g.numel()}")
    return p, g


def _correct(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (p == g) & (p != NONE)


class PairwiseAccuracy(Metric):
    """Share of judgements whose parsed winner equals the gold label (a tie is correct only when the
    model says tie; no answer is wrong)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred, gold) -> None:
        p, g = _pair(pred, gold)
        self.correct += _correct(p, g).sum().to(self.correct.device)
        self.total += torch.tensor(g.numel(), device=self.total.device)

    def compute(self) -> torch.Tensor:
        return _nan_div(self.correct, self.total)


class TauDiff(Metric):
    """GenAI-Bench / VideoGen-RewardBench: tau = accuracy over all pairs including ties (gold tie
    and both-bad are ties), diff = accuracy over the pairs whose gold label is not a tie."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("tau_correct", "tau_total", "diff_correct", "diff_total"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred, gold) -> None:
        p, g = _pair(pred, gold)
        ok = _correct(p, g)
        nontie = g != TIE
        dev = self.tau_total.device
        self.tau_correct += ok.sum().to(dev)
        self.tau_total += torch.tensor(g.numel(), device=dev)
        self.diff_correct += (ok & nontie).sum().to(dev)
        self.diff_total += nontie.sum().to(dev)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"tau": _nan_div(self.tau_correct, self.tau_total),
                "diff": _nan_div(self.diff_correct, self.diff_total)}


class GroupedAccuracy(Metric):
    """Accuracy per group (group index 0..num_groups-1 per judgement); `macro()` is the mean of the
    groups' accuracies (NaN when any group is empty)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_groups: int, **kwargs):
        super().__init__(**kwargs)
        self.num_groups = int(num_groups)
        self.add_state("correct", torch.zeros(self.num_groups, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(self.num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred, gold, group: Sequence[int] | torch.Tensor) -> None:
        p, g = _pair(pred, gold)
        idx = torch.as_tensor(group, dtype=torch.long).flatten()
        if idx.shape != g.shape:
            raise ValueError("one group index per judgement expected")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_groups):
            raise ValueError(f"group index out of range 0..{self.num_groups - 1}")
        ok = _correct(p, g).long()
        self.correct += torch.bincount(idx, weights=ok, minlength=self.num_groups).long().to(self.correct.device)
        self.total += torch.bincount(idx, minlength=self.num_groups).to(self.total.device)

    def compute(self) -> torch.Tensor:
        return _nan_div(self.correct, self.total)

    def macro(self) -> torch.Tensor:
        acc = self.compute()
        return acc.mean() if bool((self.total > 0).all()) else torch.tensor(float("nan"), dtype=torch.double)


class Rate(Metric):
    """Share of True flags (format-valid rate, answer-parsed rate)."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("hits", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, flags) -> None:
        f = torch.as_tensor(list(flags) if not isinstance(flags, torch.Tensor) else flags, dtype=torch.bool).flatten()
        self.hits += f.sum().to(self.hits.device)
        self.total += torch.tensor(f.numel(), device=self.total.device)

    def compute(self) -> torch.Tensor:
        return _nan_div(self.hits, self.total)


_SLOTS = {NONE: 0, 1: 1, 2: 2, TIE: 3}
_SLOT_NAMES = ("none", "1", "2", "tie")


class PositionStats(Metric):
    """Position bias, in the order the candidates were *presented*: how often the model answered
    "1 is better" (2, tie, nothing) and how often the presented gold was 1. A model that always says
    1 scores exactly `gold_1_rate`."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("pred", torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("gold", torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def _slots(codes: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(codes)
        for code, slot in _SLOTS.items():
            out[codes == code] = slot
        return out

    def update(self, pred_presented, gold_presented) -> None:
        p, g = _pair(pred_presented, gold_presented)
        self.pred += torch.bincount(self._slots(p), minlength=4).to(self.pred.device)
        self.gold += torch.bincount(self._slots(g), minlength=4).to(self.gold.device)

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.pred.sum()
        out = {f"pred_{s}_rate": _nan_div(self.pred[i], n) for i, s in enumerate(_SLOT_NAMES)}
        out.update({f"gold_{s}_rate": _nan_div(self.gold[i], n) for i, s in enumerate(_SLOT_NAMES) if s != "none"})
        return out


class PositionConsistency(Metric):
    """For items judged in both orders: share whose two judgements (mapped back to the original
    order) name the same winner. A missing answer in either order is inconsistent."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("pairs", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("consistent", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, winner_original, winner_swapped_mapped_back) -> None:
        a, b = _pair(winner_original, winner_swapped_mapped_back)
        self.pairs += torch.tensor(a.numel(), device=self.pairs.device)
        self.consistent += ((a == b) & (a != NONE)).sum().to(self.consistent.device)

    def compute(self) -> torch.Tensor:
        return _nan_div(self.consistent, self.pairs)
