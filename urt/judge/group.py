"""Win rates of a group of N candidates from pairwise verdicts: the arithmetic behind `Judge.win_rates`,
`urt rank` and `POST /v1/rewards` (pure Python: no model, no torch).

A pairwise judge (UnifiedReward-Think) gives no score per candidate. Within a group (N images a generator
made for one caption, N answers to one question) the pairs are judged and each candidate's **win rate** is

    win_rate = (wins + ties / 2) / (wins + losses + ties)        (ties="half", the default)
    win_rate = wins / (wins + losses)                            (ties="apart")

counted over the verdicts the candidate took part in, each presentation order being one verdict. Unparsable
verdicts (no valid `<answer>`) are never in the denominator: they are counted apart (`unparsable`), and a
candidate with no decided verdict gets 0.5 (no information; `decided == 0` says so). Pref-GRPO counts an
unparsed verdict as half a win for both; excluding it keeps a parser failure from pulling every candidate
towards 0.5.

Diagnostics:

* `position_consistency`: over the pairs judged in both orders with both verdicts parsed, the fraction whose
  two verdicts agree (same winner, or both ties) once the swapped one is mapped back (None: no such pair);
* `intransitive_triples`: the number of triples {a, b, c} whose pair outcomes form a cycle (a beats b, b
  beats c, c beats a), where a pair's outcome is the sign of (verdicts won by one − by the other); a pair
  with no decided majority (tie, disagreement, unparsable) gives no edge and closes no cycle.

`schedule(n, pairs_per_candidate)` chooses the pairs: all n(n−1)/2 by default; with a budget k, a circulant
design (candidate i against i+1, …, i+⌈k/2⌉ mod n) in which every candidate meets at least k others.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

from urt.errors import UrtError

TIE_POLICIES = ("half", "apart")
DPO_POLICIES = ("best-worst", "all")


def schedule(n: int, pairs_per_candidate: int | None = None) -> list[tuple[int, int]]:
    """The unordered pairs (i < j) to judge among `n` candidates (see the module docstring)."""
    if isinstance(n, bool) or int(n) < 2:
        raise UrtError(f"a group needs at least 2 candidates, got {n!r}")
    n = int(n)
    if pairs_per_candidate is None or int(pairs_per_candidate) >= n - 1:
        return list(itertools.combinations(range(n), 2))
    k = int(pairs_per_candidate)
    if isinstance(pairs_per_candidate, bool) or k < 1:
        raise UrtError(f"pairs_per_candidate must be a positive integer, got {pairs_per_candidate!r}")
    pairs = set()
    for d in range(1, (k + 1) // 2 + 1):  # offset d gives every candidate 2 opponents (1 when d = n/2)
        for i in range(n):
            j = (i + d) % n
            pairs.add((min(i, j), max(i, j)))
    return sorted(pairs)


@dataclass(frozen=True)
class PairVerdict:
    """One verdict on candidates (i, j): `first` is the candidate shown first; `winner` is the candidate
    index that won, "tie", or None (unparsable); `verdict` the `Verdict` (or None for stubs)."""

    i: int
    j: int
    first: int
    winner: int | str | None
    verdict: Any = None

    @property
    def swapped(self) -> bool:
        return self.first != self.i

    def to_dict(self, *, text: bool = True) -> dict:
        out = {"i": self.i, "j": self.j, "first": self.first, "winner": self.winner}
        if self.verdict is not None:
            v = self.verdict.to_dict()
            if not text:
                v.pop("text", None)
            out["verdict"] = v
        return out


@dataclass
class GroupResult:
    """What `Judge.win_rates` returns for one group (see the module docstring for the definitions)."""

    n: int
    win_rates: list[float]
    wins: list[int]
    losses: list[int]
    ties: list[int]
    unparsable: list[int]
    pairs: list[PairVerdict]
    position_consistency: float | None
    intransitive_triples: int
    ties_policy: str = "half"
    meta: dict = field(default_factory=dict)  # e.g. vision-tower images encoded, pairs judged

    @property
    def decided(self) -> list[int]:
        return [w + lo + t for w, lo, t in zip(self.wins, self.losses, self.ties)]

    @property
    def ranking(self) -> list[int]:
        """Candidate indices, best first (higher win rate; equal rates keep the input order)."""
        return sorted(range(self.n), key=lambda c: (-self.win_rates[c], c))

    def to_dict(self, *, text: bool = True) -> dict:
        return {
            "n": self.n,
            "win_rates": self.win_rates,
            "ranking": self.ranking,
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
            "unparsable": self.unparsable,
            "decided": self.decided,
            "ties_policy": self.ties_policy,
            "position_consistency": self.position_consistency,
            "intransitive_triples": self.intransitive_triples,
            "pairs": [p.to_dict(text=text) for p in self.pairs],
            **({"meta": self.meta} if self.meta else {}),
        }


def tally(n: int, pairs: Sequence[PairVerdict], *, ties: str = "half") -> GroupResult:
    """Win rates, counts and diagnostics of `n` candidates from their pair verdicts."""
    if ties not in TIE_POLICIES:
        raise UrtError(f"unknown ties policy {ties!r}; known: {', '.join(TIE_POLICIES)}")
    wins, losses, tie_n, bad = [0] * n, [0] * n, [0] * n, [0] * n
    by_pair: dict[tuple[int, int], list[PairVerdict]] = {}
    for p in pairs:
        if not (0 <= p.i < n and 0 <= p.j < n) or p.i == p.j:
            raise UrtError(f"pair ({p.i}, {p.j}) is not a pair of {n} candidates")
        if p.winner is None:
            bad[p.i] += 1
            bad[p.j] += 1
        elif p.winner == "tie":
            tie_n[p.i] += 1
            tie_n[p.j] += 1
        elif p.winner in (p.i, p.j):
            loser = p.j if p.winner == p.i else p.i
            wins[p.winner] += 1
            losses[loser] += 1
        else:
            raise UrtError(f"pair ({p.i}, {p.j}): winner {p.winner!r} is neither candidate, 'tie' nor None")
        by_pair.setdefault((min(p.i, p.j), max(p.i, p.j)), []).append(p)

    rates = []
    for c in range(n):
        if ties == "half":
            den, num = wins[c] + losses[c] + tie_n[c], wins[c] + tie_n[c] / 2
        else:
            den, num = wins[c] + losses[c], wins[c]
        rates.append(num / den if den else 0.5)

    # position consistency: pairs seen in both orders, both verdicts parsed
    agree = seen = 0
    for (a, b), vs in by_pair.items():
        fwd = [v for v in vs if v.first == a and v.winner is not None]
        rev = [v for v in vs if v.first == b and v.winner is not None]
        if fwd and rev:
            seen += 1
            agree += fwd[0].winner == rev[0].winner

    # majority edges, then directed 3-cycles
    beats: dict[tuple[int, int], int] = {}
    for (a, b), vs in by_pair.items():
        net = sum(1 if v.winner == a else -1 if v.winner == b else 0 for v in vs)
        if net:
            beats[(a, b)] = 1 if net > 0 else -1

    def edge(x: int, y: int) -> int:  # +1: x beats y, -1: y beats x, 0: no edge
        return beats.get((x, y), 0) if x < y else -beats.get((y, x), 0)

    cycles = 0
    for a, b, c in itertools.combinations(range(n), 3):
        e1, e2, e3 = edge(a, b), edge(b, c), edge(c, a)
        if e1 and e1 == e2 == e3:  # a>b>c>a or a<b<c<a
            cycles += 1

    return GroupResult(n=n, win_rates=rates, wins=wins, losses=losses, ties=tie_n, unparsable=bad,
                       pairs=list(pairs), position_consistency=(agree / seen) if seen else None,
                       intransitive_triples=cycles, ties_policy=ties)


def dpo_pairs(result: GroupResult, *, policy: str = "best-worst",
              min_margin: float = 0.0) -> list[tuple[int, int, float]]:
    """(chosen, rejected, margin) candidate pairs for DPO, margin = the win-rate difference. "best-worst":
    the top candidate against the bottom one; "all": every pair whose margin is over `min_margin`, largest
    margin first. A pair with margin <= `min_margin` (always including 0: no preference) is never made."""
    if policy not in DPO_POLICIES:
        raise UrtError(f"unknown DPO pair policy {policy!r}; known: {', '.join(DPO_POLICIES)}")
    r = result.win_rates
    rank = result.ranking
    if policy == "best-worst":
        cands = [(rank[0], rank[-1])]
    else:
        cands = [(a, b) for a, b in itertools.permutations(range(result.n), 2) if r[a] > r[b]]
    out = [(a, b, r[a] - r[b]) for a, b in cands if r[a] - r[b] > max(float(min_margin), 0.0)]
    return sorted(out, key=lambda t: (-t[2], t[0], t[1]))


def advantages(win_rates: Sequence[float], *, eps: float = 1e-4) -> list[float]:
    """GRPO advantages of one group, as urt's GRPO "paper" mode computes them
    (`urt.rl.objective.group_advantages`): (r − group mean) / (unbiased group std + eps). A group of one,
    or all-equal win rates, gives all-zero advantages."""
    n = len(win_rates)
    if n == 0:
        return []
    mean = sum(win_rates) / n
    std = (sum((x - mean) ** 2 for x in win_rates) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return [(x - mean) / (std + eps) for x in win_rates]
