"""GRPO rewards (docs/method.md §Rewards) and a registry so users can add their own.

Every reward has the signature `(completion: str, solution: str | None, **kwargs) -> float` and must
never raise on any completion text (a GRPO step scores arbitrary sampled text). A bad *label* is a
data error and raises UrtError. `completion` is the decoded text with special tokens skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from urt.errors import UrtError
from urt.prompts.parse import direct_answer, parse_output

RewardFn = Callable[..., float]

# The paper's regexes, verbatim: format is anchored at the start (re.match), trailing text allowed.
FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"
ANSWER_PATTERN = r"<answer>(.*?)</answer>"
_FORMAT_RE = re.compile(FORMAT_PATTERN, re.DOTALL)
_ANSWER_RE = re.compile(ANSWER_PATTERN, re.DOTALL)

REWARDS: dict[str, RewardFn] = {}
DEFAULT_WEIGHTS: dict[str, float] = {"format": 1.0, "accuracy": 1.0}


def register_reward(name: str, *, override: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward under `name` (used as `rewards/<name>` in logs and as the key in
    `weights`). Re-registering a name is an error unless `override=True`, so a plugin cannot
    silently replace the paper's rewards."""
    if not isinstance(name, str) or not name:
        raise UrtError(f"reward name must be a non-empty string, got {name!r}")

    def deco(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise UrtError(f"reward {name!r} must be callable, got {type(fn).__name__}")
        if name in REWARDS and not override:
            raise UrtError(
                f"reward {name!r} is already registered ({REWARDS[name].__module__}."
                f"{REWARDS[name].__qualname__}); pass override=True to replace it"
            )
        REWARDS[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except (KeyError, TypeError):
        raise UrtError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}") from None


def extract_answer(completion: str) -> str:
    """The official extraction: first <answer>…</answer> (DOTALL), stripped; no tag → the whole
    completion stripped."""
    m = _ANSWER_RE.search(completion)
    return (m.group(1) if m else completion).strip()


@register_reward("format")
def format_reward(completion: str, solution: str | None = None, **kwargs: Any) -> float:
    """1.0 iff the completion starts with <think>…</think>, optional whitespace, <answer>…</answer>."""
    if not isinstance(completion, str):
        return 0.0
    return 1.0 if _FORMAT_RE.match(completion) else 0.0


@register_reward("accuracy")
def accuracy_reward(completion: str, solution: str | None = None, **kwargs: Any) -> float:
    """1.0 iff the extracted answer equals the label exactly (case and inner whitespace included).

    The label is stripped too. The official code compares to the raw label, which differs only for a
    label with surrounding whitespace, where it could never match a stripped answer (reward always
    0); stripping keeps the method's meaning. An empty completion scores 0.0 as in the official code.
    """
    if not isinstance(solution, str) or not solution.strip():
        raise UrtError(f"accuracy reward needs a non-empty label string as solution, got {solution!r}")
    if not isinstance(completion, str) or not completion:
        return 0.0
    return 1.0 if extract_answer(completion) == solution.strip() else 0.0


@register_reward("accuracy_direct")
def accuracy_direct_reward(completion: str, solution: str | None = None, **kwargs: Any) -> float:
    """Ours, for direct answers (the implicit, "w/o CoT" prompts): `accuracy` that also accepts one trailing
    period on the answer. Those prompts quote their conclusions with one ("Image 1 is better."), and
    evaluation accepts it, so the exact match would score the prompt's own example 0 and GRPO would
    learn to drop a period rather than to judge. Anything else must match exactly, case included."""
    if not isinstance(solution, str) or not solution.strip():
        raise UrtError(f"accuracy_direct reward needs a non-empty label string as solution, got {solution!r}")
    if not isinstance(completion, str) or not completion:
        return 0.0
    return 1.0 if direct_answer(extract_answer(completion)) == direct_answer(solution) else 0.0


@register_reward("consistency")
def consistency_reward(completion: str, solution: str | None = None, **kwargs: Any) -> float:
    """Ours, not the paper's: 1.0 iff the `Total score:` lines inside <think> name the same winner
    as <answer> (higher total wins). Equal totals, a missing total, or an answer that is not one of
    the fixed strings score 0.0 — CoT mode has no tie, so a tied CoT cannot justify any answer."""
    if not isinstance(completion, str):
        return 0.0
    j = parse_output(completion)
    t1, t2 = j.totals.get(1), j.totals.get(2)
    if t1 is None or t2 is None or t1 == t2 or j.winner not in (1, 2):
        return 0.0
    return 1.0 if (1 if t1 > t2 else 2) == j.winner else 0.0


def score(
    completions: Sequence[str],
    solutions: Sequence[str | None] | None = None,
    weights: Mapping[str, float] | None = None,
    *,
    functions: Mapping[str, RewardFn] | None = None,
    per_sample: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> dict[str, list[float]]:
    """Score a batch. Returns `rewards/<name>` (one list per weighted reward, for logging) and
    `reward` (the weighted sum, what GRPO optimises). Default weights: the paper's format +
    accuracy, 1.0 each. `functions` maps names to reward functions ahead of the registry (a run's
    components, `build_rewards`). Extra kwargs are passed to every reward call; `per_sample` gives each
    completion its own as well (GRPO passes the sample's `task`, `label`, `key` and `meta`)."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights.items())
    if not weights:
        raise UrtError("reward weights are empty; name at least one reward")
    given = dict(functions or {})
    fns = {name: given[name] if name in given else get_reward(name) for name in weights}
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise UrtError(f"weight of reward {name!r} must be a number, got {w!r}")
    completions = list(completions)
    sols = [None] * len(completions) if solutions is None else list(solutions)
    if len(sols) != len(completions):
        raise UrtError(
            f"got {len(completions)} completions but {len(sols)} solutions; they must pair up"
        )
    own = [{}] * len(completions) if per_sample is None else list(per_sample)
    if len(own) != len(completions):
        raise UrtError(f"got {len(completions)} completions but {len(own)} per-sample argument sets")
    out: dict[str, list[float]] = {}
    total = [0.0] * len(completions)
    for name, fn in fns.items():
        vals = [float(fn(c, s, **kwargs, **o)) for c, s, o in zip(completions, sols, own)]
        out[f"rewards/{name}"] = vals
        w = float(weights[name])
        total = [t + w * v for t, v in zip(total, vals)]
    out["reward"] = total
    return out


@dataclass
class RewardSet:
    """A run's rewards: the weights and the function each weighted name resolves to."""

    weights: dict[str, float]
    functions: dict[str, RewardFn]

    @property
    def max_total(self) -> float:
        return float(sum(self.weights.values()))

    def __call__(self, completions, solutions, per_sample=None) -> dict[str, list[float]]:
        return score(completions, solutions, self.weights, functions=self.functions, per_sample=per_sample)


def build_rewards(cfg: Mapping[str, Any] | None = None) -> RewardSet:
    """The rewards a config names (`conf/reward/*.yaml`):

        imports: [my_pkg.rewards]     # modules imported first: their @register_reward functions join the registry
        components:                   # rewards built by Hydra (a function as a partial, or a callable object)
          length: {_target_: my_pkg.rewards.length_penalty, _partial_: true, limit: 512}
        weights: {format: 1.0, accuracy: 1.0, length: 0.1}

    Every weighted name must be a component or a registered reward; a component may not take a registered
    reward's name (it would shadow the paper's rewards unnoticed)."""
    import importlib

    cfg = dict(cfg or {})
    for mod in cfg.get("imports") or []:
        try:
            importlib.import_module(str(mod))
        except ImportError as e:
            raise UrtError(f"reward.imports: cannot import {mod!r}: {e}") from None
    components: dict[str, RewardFn] = {}
    for name, spec in (cfg.get("components") or {}).items():
        if name in REWARDS:
            raise UrtError(f"reward.components.{name}: {name!r} is a registered reward "
                           f"({REWARDS[name].__module__}.{REWARDS[name].__qualname__}); pick another name")
        from hydra.utils import instantiate

        try:
            fn = instantiate(spec)
        except Exception as e:  # noqa: BLE001 - Hydra wraps the target's own errors
            raise UrtError(f"reward.components.{name}: cannot build it: {e}") from None
        if not callable(fn):
            raise UrtError(f"reward.components.{name} built a {type(fn).__name__}, not a callable reward "
                           f"(a function needs `_partial_: true`)")
        components[name] = fn
    weights = dict(cfg.get("weights") or DEFAULT_WEIGHTS)
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise UrtError(f"reward.weights.{name} must be a number, got {w!r}")
    return RewardSet(weights, {name: components[name] if name in components else get_reward(name)
                               for name in weights})


def solution_for(task: str, label, template_set: str | None = None) -> str | None:
    """The answer string a completion is rewarded against: the label's, a tie's only under the implicit
    prompts (the one template set that offers a tie), None otherwise (a tie under CoT prompts has no answer)."""
    from urt.prompts import TIE_STRINGS, answer_string

    if label == "tie":
        return TIE_STRINGS.get(task) if template_set == "implicit" else None
    return answer_string(task, int(label))
