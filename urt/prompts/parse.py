"""Reading a judgement back out of model output.

Everything here is total: model output is arbitrary text (truncated, malformed, adversarial), and a
parser that raises would crash an evaluation or a GRPO step, so every function returns "not found"
(None / empty) instead. The tag regexes are the paper's (docs/method.md §Rewards) so that `format_ok` and
`answer` agree exactly with the rewards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union

from urt.prompts.render import ANSWER_STRINGS, TASKS, TIE_STRINGS

Winner = Union[int, str, None]  # 1, 2, "tie" or None

FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)

_NUM = r"\d+(?:\.\d+)?"
# One candidate's score for one dimension: "Image 1 (9/10)", "Answer 2 ( 7 / 10 )" (the templates'
# layout) or "Image 1: 8/10" (the paper prompt's inline example).
_SCORE_RE = re.compile(
    rf"\b(?:Image|Video|Answer)[ \t]*([12])[ \t]*"
    rf"(?:\([ \t]*({_NUM})[ \t]*/[ \t]*10[ \t]*\)|[:=\-\u2013][ \t]*({_NUM})[ \t]*/[ \t]*10\b)"
)
# A dimension header: optional bullet/numbering, a name, a colon, then the rest of the line.
_HEADER_RE = re.compile(r"^[ \t]*(?:[-*•][ \t]*)?(?:\d+[.)][ \t]*)?(?P<name>[^:\n]{1,120}?)[ \t]*:(?P<rest>.*)$")
_CANDIDATE_NAME_RE = re.compile(r"^(?:Image|Video|Answer)[ \t]*[12]$")
# Only at the start of a line (after bullets/markdown), so "the total score reflects ..." in a
# rationale does not end the dimension list.
_TOTAL_HEADER_RE = re.compile(r"^[ \t*#>-]*total[ \t]+scores?\b", re.IGNORECASE | re.MULTILINE)
# "Image 1: 9+8+8+6=31" (number after the last '='), or "Image 1: 31".
_TOTAL_RE = re.compile(
    rf"\b(?:Image|Video|Answer)[ \t]*([12])[ \t]*:[ \t]*(?:[0-9.+ \t()]*=[ \t]*)?({_NUM})(?![0-9.+])"
)

_WINNER_OF: dict[str, Winner] = {}
for _pair in ANSWER_STRINGS.values():
    _WINNER_OF[_pair[0]], _WINNER_OF[_pair[1]] = 1, 2
for _tie in TIE_STRINGS.values():
    _WINNER_OF[_tie] = "tie"


@dataclass(frozen=True)
class Judgement:
    """What a model output says. `dimensions` holds (name, score of candidate 1, score of candidate
    2) per dimension whose two scores were both found; `totals` maps candidate (1, 2) to the total
    written in the `Total score:` section (a candidate is absent if its line was not found)."""

    think: str | None = None
    answer: str | None = None
    format_ok: bool = False
    winner: Winner = None
    dimensions: tuple = ()
    totals: dict = field(default_factory=dict)


def _num(s: str):
    f = float(s)
    return int(f) if f.is_integer() else f


def direct_answer(text: str) -> str:
    """An answer string as it is matched: surrounding whitespace and one trailing period off (the implicit
    prompts quote their strings with a period). Shared by `winner_of` and the `accuracy_direct` reward, so
    evaluation and GRPO without CoT agree on what counts."""
    s = text.strip()
    return s[:-1].rstrip() if s.endswith(".") else s


def winner_of(answer: str | None, task: str | None = None) -> Winner:
    """Map an answer string to 1, 2 or "tie". Accepts surrounding whitespace and one trailing period
    (the implicit prompts quote their strings with a period); otherwise the text must be exact,
    case included — a fuzzy match would credit outputs the accuracy reward calls wrong. With `task`,
    only that task's strings count ("Video 1 is better" is not an answer to an image pair)."""
    if not isinstance(answer, str):
        return None
    s = direct_answer(answer)
    if task is not None:
        allowed = set(ANSWER_STRINGS.get(task, ())) | ({TIE_STRINGS[task]} if task in TIE_STRINGS else set())
        if s not in allowed:
            return None
    return _WINNER_OF.get(s)


def parse_dimensions(think: str | None) -> tuple:
    """Per-dimension scores from CoT text, in the order written. Handles the paper's one-line layout
    (`1. Aesthetics: Image 2 (8/10) - ...; Image 1 (8/10) - ...`, either candidate first) and the
    qwen3 layout (header line, then one `Image k (x/10)` line per candidate). Stops at `Total score`."""
    if not isinstance(think, str):
        return ()
    out: list = []
    name: str | None = None
    scores: dict = {}

    def flush() -> None:
        if name is not None and 1 in scores and 2 in scores:
            out.append((name, scores[1], scores[2]))

    for line in think.splitlines():
        if _TOTAL_HEADER_RE.search(line):
            break
        header = _HEADER_RE.match(line)
        if header is not None:
            cand = header.group("name").strip().strip("*").strip()
            # "Image 1: ..." or "Image 1 (9/10) - rationale: ..." are score lines, not headers.
            if cand and not _CANDIDATE_NAME_RE.match(cand) and not _SCORE_RE.search(cand):
                flush()
                name, scores = cand, {}
                line = header.group("rest")
        if name is None:
            continue
        for m in _SCORE_RE.finditer(line):
            scores.setdefault(int(m.group(1)), _num(m.group(2) or m.group(3)))
    flush()
    return tuple(out)


def parse_totals(think: str | None) -> dict:
    """{1: total, 2: total} from the `Total score:` section (text after the first `Total score`);
    the first line per candidate wins. Empty when there is no such section."""
    if not isinstance(think, str):
        return {}
    head = _TOTAL_HEADER_RE.search(think)
    if head is None:
        return {}
    totals: dict = {}
    for m in _TOTAL_RE.finditer(think, head.end()):
        totals.setdefault(int(m.group(1)), _num(m.group(2)))
    return totals


def _judge(text: str, answer: str | None, task: str | None) -> Judgement:
    tm = THINK_RE.search(text)
    think = tm.group(1) if tm else None
    return Judgement(
        think=think,
        answer=answer,
        format_ok=FORMAT_RE.match(text) is not None,
        winner=winner_of(answer, task),
        dimensions=parse_dimensions(think),
        totals=parse_totals(think),
    )


def parse_output(text: str, task: str | None = None) -> Judgement:
    """Parse a CoT judgement (`<think>…</think><answer>…</answer>`). Never raises; non-string input
    gives an empty Judgement. `task` (optional) restricts which answer strings count."""
    try:
        if not isinstance(text, str):
            return Judgement()
        if task is not None and task not in TASKS:
            task = None
        am = ANSWER_RE.search(text)
        return _judge(text, am.group(1).strip() if am else None, task)
    except Exception:  # pragma: no cover - defensive: a parser bug must not kill a training run
        return Judgement()


def parse_implicit(text: str, task: str | None = None) -> Judgement:
    """Parse a direct ("w/o CoT") answer: the <answer> tag if there is one, else the whole output
    must be one of the answer/tie strings (optionally with a trailing period). No substring search:
    the official scripts' substring matching credits outputs that mention both candidates."""
    try:
        if not isinstance(text, str):
            return Judgement()
        if task is not None and task not in TASKS:
            task = None
        am = ANSWER_RE.search(text)
        answer = am.group(1).strip() if am else text.strip()
        return _judge(text, answer, task)
    except Exception:  # pragma: no cover
        return Judgement()
