"""`Judge`: a UnifiedReward-Think model as a pairwise judge (urt/judge/core.py), and `urt judge`
(urt/judge/cli.py).

    from urt.judge import Judge, Verdict
"""

from urt.lazy import lazy_exports

# Resolved on first use: the judge imports torch through urt.generation, which `urt --help` never needs.
__getattr__, __all__ = lazy_exports(__name__, {
    "urt.judge.core": ("DEFAULT_TINY_FAMILY", "MODES", "Group", "Judge", "Verdict", "verdict_from_text"),
    "urt.judge.group": ("GroupResult", "PairVerdict", "advantages", "dpo_pairs", "schedule", "tally"),
})
