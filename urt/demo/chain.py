"""Is a demo chain right for the right reasons? The chain parser, its soundness check, and the `chain` reward.

The demo's chain (docs/demo.md §The chain, `urt.stages.distill.RuleTeacher.chain`) is a fixed grammar, and every
demo sample records what its lines must say (`meta["attributes"]`: what the caption or question asks, each
candidate's colour, shape and motion). So a chain can be checked step by step, in the order the model wrote it,
and the first wrong step names the kind of error:

| kind | the first wrong step |
|---|---|
| `unparsable` | no `<think>…</think><answer>…</answer>` with one of the task's answer strings |
| `broken` | a line that is not one of the chain's lines, a line missing or too many ("Answer 1/10) does not fit.") |
| `reading` | what the prompt says is misread: the caption, the question (what it asks or checks for), an answer |
| `perception` | what a candidate image or clip shows is misdescribed |
| `verdict` | a step computed from the lines before it is wrong: a "vs" check, a score, a (mis)match, the answer |

A chain is *sound* when no step is wrong (its verdict is then the label's); a correct judgement whose chain is not
sound is *lucky*. The `chain` reward (registered here: an example of a user's reward that verifies a chain against
metadata the user holds, not one of the paper's rewards) pays the share of the chain's lines that are right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from urt.data.schema import GENERATION_TASKS
from urt.prompts import parse_output
from urt.rewards.core import register_reward

ERROR_KINDS = ("unparsable", "broken", "reading", "perception", "verdict")
SCORE = (10, 5, 2, 1)  # the teacher's score by the number of failed checks (urt.stages.distill._CHAIN_SCORE)
NOUN = {"image_generation": "Image", "video_generation": "Video",
        "image_understanding": "Answer", "video_understanding": "Answer"}

_W = r"[a-z]+"
_DESC = rf"an? (?:(?P<color>{_W}) )?(?P<shape>{_W})(?: moving (?P<motion>{_W}))?"
_CAPTION_RE = re.compile(rf"The caption asks for {_DESC}\.")
_CHECK_RE = re.compile(rf"({_W}) vs ({_W}) (yes|no)")
_SO_RE = re.compile(r"so (Image|Video|Answer) ([12]) \((\d+)/10\) (matches|does not match|fits|does not fit)\.")
_ANSWERS_RE = re.compile(r"Answer 1 says (?P<a1>.+?)\. Answer 2 says (?P<a2>.+?)\.")
_CHECKS_FOR_RE = re.compile(rf"The question checks for (?P<value>{_W})\. The (?P<visual>image|video) shows "
                            rf"{_DESC}: (?P<got>{_W}) vs (?P<want>{_W}) (?P<yn>yes|no), "
                            rf"so the correct answer says (?P<truth>{_W})\.")
_ASKS_ABOUT_RE = re.compile(rf"The question asks about the (?P<about>{_W})\. The (?P<visual>image|video) shows "
                            rf"{_DESC}, so the correct answer says (?P<truth>{_W})\.")


@dataclass(frozen=True)
class Step:
    line: int          # 0-based line of the think block
    kind: str          # reading | perception | verdict | broken
    ok: bool
    what: str          # what was checked, for reading a report ("Image 2 shows: colour red, said blue")


@dataclass
class ChainCheck:
    """One chain against its sample: the steps in the order written, whether the judgement is correct
    (the parsed winner is the label, as evaluation counts it) and the kind of its first wrong step."""

    correct: bool
    steps: list[Step] = field(default_factory=list)
    unparsable: bool = False
    lines_expected: int = 0
    lines_right: int = 0

    @property
    def first_error(self) -> Step | None:
        """The first wrong step in the order the chain was written (a missing line counts where it is missing)."""
        return next((s for s in sorted(self.steps, key=lambda s: s.line) if not s.ok), None)

    @property
    def kind(self) -> str:
        """"sound", or the error kind of the first wrong step."""
        if self.unparsable:
            return "unparsable"
        e = self.first_error
        return "sound" if e is None else e.kind

    @property
    def sound(self) -> bool:
        return self.kind == "sound"

    @property
    def outcome(self) -> str:
        """sound_correct | lucky_correct | wrong."""
        return ("sound_correct" if self.sound else "lucky_correct") if self.correct else "wrong"


# ------------------------------------------------------------------------------------------- the truth
def _key(a: str) -> str:
    return "color" if a == "colour" else a


def _norm(d: Mapping) -> dict[str, str]:
    return {_key(str(k)): str(v).lower() for k, v in d.items() if v is not None}


def presented(task: str, meta: Mapping[str, Any], swapped: bool | None = None) -> dict:
    """What a sound chain must say about the sample as shown: for generation the caption's attributes and each
    candidate's in the order shown; for understanding what the image/clip shows, what the question asks (and the
    value a yes/no question checks for) and the two answers in the order shown. `swapped` defaults to the
    sample's own `meta["swapped"]` (GRPO's order=random); evaluation passes the prediction's flag. The stored
    attributes are in the stored order; the understanding answers are read off the reference chain
    (`meta["describe"]`, whose first line copies them), the one place the demo's metadata holds them."""
    attrs = meta.get("attributes") or {}
    flip = bool(meta.get("swapped", False)) if swapped is None else bool(swapped)
    if task in GENERATION_TASKS:
        cands = [_norm(c) for c in attrs["candidates"]]
        return {"asks": _norm(attrs["asks"]), "candidates": cands[::-1] if flip else cands}
    m = _ANSWERS_RE.match(str(meta.get("describe", "")).split("\n", 1)[0])
    if not m:
        raise ValueError("an understanding sample's meta['describe'] must open with its answers")
    answers = [m["a1"], m["a2"]]
    out = {"seen": _norm(attrs["seen"]), "asks": _key(str(attrs["asks"])), "answers": answers[::-1] if flip else answers}
    if attrs.get("asks_value") is not None:
        out["asks_value"] = str(attrs["asks_value"]).lower()
    return out


def _desc_of(m: re.Match) -> dict[str, str]:
    return {k: m[k] for k in ("color", "shape", "motion") if m[k]}


def _describe(d: Mapping[str, str]) -> str:
    return " ".join(x for x in (d.get("color"), d.get("shape")) if x) + (f" moving {d['motion']}" if d.get("motion") else "")


# ------------------------------------------------------------------------------------------- the check
def check_chain(text: str, task: str, meta: Mapping[str, Any], label: int, *, swapped: bool | None = None
                ) -> ChainCheck:
    """Check one completion against its sample (`meta` as stored, `label` as shown). Total: never raises on any
    text (a GRPO step scores arbitrary samples); a sample without the demo's attributes raises KeyError."""
    truth = presented(task, meta, swapped)
    j = parse_output(text if isinstance(text, str) else "", task)
    winner = j.winner if j.winner in (1, 2) else None
    chk = ChainCheck(correct=winner is not None and winner == int(label))
    expected = 4 if task in GENERATION_TASKS else 5  # think lines + the answer
    chk.lines_expected = expected
    if not j.format_ok or j.think is None or winner is None:
        chk.unparsable = True
        return chk
    lines = [x.strip() for x in j.think.strip().split("\n") if x.strip()]
    if task in GENERATION_TASKS:
        verdicts = _check_generation(lines, task, truth, chk)
    else:
        verdicts = _check_understanding(lines, truth, chk)
    # the answer follows the chain's verdicts: the one candidate that matches (the teacher's rule: candidate 2's)
    said = None if verdicts is None else (2 if verdicts[1] else 1)
    ok = said is not None and winner == said
    chk.steps.append(Step(len(lines), "verdict", ok, f"answer {winner}, the chain's verdicts say {said}"))
    chk.lines_right += ok
    return chk


def _line_steps(chk: ChainCheck, steps: list[Step]) -> None:
    chk.steps.extend(steps)
    chk.lines_right += all(s.ok for s in steps)


def _broken(chk: ChainCheck, i: int, line: str) -> None:
    chk.steps.append(Step(i, "broken", False, f"not a chain line: {line[:80]!r}"))


def _verdict_steps(i: int, noun: str, k: int, m: re.Match | None, wrong: int, good_word: str
                   ) -> tuple[list[Step], bool | None]:
    """The "so Image k (s/10) matches." tail: its candidate, the score from the number of failed checks, the verdict
    word. Returns its steps and the verdict it states (None: no such tail)."""
    if m is None or m[1] != noun or int(m[2]) != k:
        return [Step(i, "broken", False, f"{noun} {k}: no 'so {noun} {k} (s/10) …' verdict")], None
    steps = [Step(i, "verdict", int(m[3]) == SCORE[min(wrong, 3)], f"{noun} {k}: score {m[3]} after {wrong} failed"),
             Step(i, "verdict", (m[4] == good_word) == (wrong == 0), f"{noun} {k}: '{m[4]}' after {wrong} failed")]
    return steps, m[4] == good_word


def _check_generation(lines: list[str], task: str, truth: dict, chk: ChainCheck) -> list[bool] | None:
    noun, asks = NOUN[task], truth["asks"]
    if len(lines) != 3:
        _broken(chk, min(len(lines), 3), f"{len(lines)} lines, the chain has 3")
    stated: dict[str, str] | None = None  # the caption as the chain read it
    verdicts: list[bool] = []
    for i, line in enumerate(lines[:3]):
        if i == 0:
            m = _CAPTION_RE.fullmatch(line)
            if not m:
                _broken(chk, i, line)
                continue
            stated = _desc_of(m)
            _line_steps(chk, [Step(i, "reading", stated == asks,
                                   f"caption asks for {_describe(asks)}, read {_describe(stated)}")])
            continue
        k = i
        head, sep, rest = line.partition(": ")
        m = re.fullmatch(rf"{noun} {k} shows {_DESC}", head)
        if not (m and sep):
            _broken(chk, i, line)
            continue
        seen, shown = _desc_of(m), truth["candidates"][k - 1]
        steps = [Step(i, "perception", all(seen.get(a) == v for a, v in shown.items()) and set(seen) <= set(shown),
                      f"{noun} {k} shows {_describe(shown)}, described {_describe(seen)}")]
        checks_part, _, so = rest.rpartition(", so ")
        checks = [_CHECK_RE.fullmatch(c) for c in checks_part.split(", ")] if checks_part else []
        if not checks or None in checks or len(checks) != len(asks):
            _broken(chk, i, line)
            continue
        wrong = 0
        for (a, v), c in zip(asks.items(), checks):
            got, want, yn = c[1], c[2], c[3]
            # each check compares the line's own description with the caption (as read in line 0)
            steps.append(Step(i, "verdict", got == seen.get(a), f"{a}: check names {got}, the line said {seen.get(a)}"))
            steps.append(Step(i, "reading", want == v, f"{a}: the caption asks {v}, the check says {want}"))
            steps.append(Step(i, "verdict", (yn == "yes") == (got == want), f"{a}: '{got} vs {want} {yn}'"))
            wrong += yn == "no"
        tail, said = _verdict_steps(i, noun, k, _SO_RE.fullmatch("so " + so) if so else None, wrong, "matches")
        if said is None:
            chk.steps.extend(tail)
            continue
        _line_steps(chk, steps + tail)
        verdicts.append(said)
    return verdicts if len(verdicts) == 2 else None


def _check_understanding(lines: list[str], truth: dict, chk: ChainCheck) -> list[bool] | None:
    if len(lines) != 4:
        _broken(chk, min(len(lines), 4), f"{len(lines)} lines, the chain has 4")
    answers, seen, asked = truth["answers"], truth["seen"], truth["asks"]
    value = truth.get("asks_value")
    said_truth: str | None = None
    verdicts: list[bool] = []
    for i, line in enumerate(lines[:4]):
        if i == 0:
            m = _ANSWERS_RE.fullmatch(line)
            if not m:
                _broken(chk, i, line)
                continue
            _line_steps(chk, [Step(i, "reading", m[f"a{k}"] == answers[k - 1], f"Answer {k} is {answers[k - 1]}, "
                                   f"copied {m[f'a{k}']}") for k in (1, 2)])
            continue
        if i == 1:
            m = _CHECKS_FOR_RE.fullmatch(line) or _ASKS_ABOUT_RE.fullmatch(line)
            if not m:
                _broken(chk, i, line)
                continue
            desc = _desc_of(m)
            steps = []
            if "value" in m.re.groupindex:  # "The question checks for red. … red vs red yes, so … says yes."
                steps.append(Step(i, "reading", value is not None and m["value"] == value,
                                  f"the question checks for {value or 'nothing (asks which)'}, read {m['value']}"))
                steps.append(Step(i, "perception", _same(desc, seen), f"shows {_describe(seen)}, described {_describe(desc)}"))
                steps.append(Step(i, "verdict", m["got"] == desc.get(asked) and m["want"] == m["value"]
                                  and (m["yn"] == "yes") == (m["got"] == m["want"]) and m["truth"] == m["yn"],
                                  f"'{m['got']} vs {m['want']} {m['yn']}, so … says {m['truth']}'"))
            else:  # "The question asks about the colour. The image shows …, so the correct answer says blue."
                steps.append(Step(i, "reading", value is None and _key(m["about"]) == asked,
                                  f"the question asks {asked}{' (yes/no: ' + value + ')' if value else ''}, "
                                  f"read {m['about']}"))
                steps.append(Step(i, "perception", _same(desc, seen), f"shows {_describe(seen)}, described {_describe(desc)}"))
                steps.append(Step(i, "verdict", m["truth"] == desc.get(_key(m["about"])),
                                  f"the correct answer says {m['truth']}, the line described {_describe(desc)}"))
            said_truth = m["truth"]
            _line_steps(chk, steps)
            continue
        k = i - 1
        head, sep, rest = line.partition(": ")
        m = re.fullmatch(r"Answer ([12]) says (.+)", head)
        c = _CHECK_RE.fullmatch(rest.partition(", so ")[0]) if sep else None
        so = rest.partition(", so ")[2]
        if not (m and int(m[1]) == k and c and so):
            _broken(chk, i, line)
            continue
        steps = [Step(i, "reading", m[2] == answers[k - 1], f"Answer {k} is {answers[k - 1]}, said {m[2]}"),
                 Step(i, "verdict", c[1] == m[2] and c[2] == said_truth and (c[3] == "yes") == (c[1] == c[2]),
                      f"'{c[1]} vs {c[2]} {c[3]}' (the chain's correct answer: {said_truth})")]
        # one check: a fitting answer scores SCORE[0] (10), a wrong one SCORE[3] (1), as the teacher writes them
        tail, said = _verdict_steps(i, "Answer", k, _SO_RE.fullmatch("so " + so), 3 * (c[3] == "no"), "fits")
        if said is None:
            chk.steps.extend(tail)
            continue
        _line_steps(chk, steps + tail)
        verdicts.append(said)
    return verdicts if len(verdicts) == 2 else None


def _same(desc: Mapping[str, str], seen: Mapping[str, str]) -> bool:
    return dict(desc) == dict(seen)


# ------------------------------------------------------------------------------------------- the reward
@register_reward("chain")
def chain_reward(completion: str, solution: str | None = None, *, task: str | None = None, label: Any = None,
                 meta: Mapping[str, Any] | None = None, **kwargs: Any) -> float:
    """Ours, the demo's (an example of a user's reward, not the paper's): the share of the chain's lines (and its
    answer) that agree with the sample's attributes — 1.0 for a sound chain, 0.0 for an unparsable one. The
    outcome reward pays a lucky chain as much as a sound one; this one tells them apart. `meta` is the sample's
    (GRPO passes it; `label` is as shown, `meta["swapped"]` says the order). A sample without the demo's
    attributes scores 0.0."""
    if not isinstance(completion, str) or task is None or label not in (1, 2) or not meta:
        return 0.0
    try:
        chk = check_chain(completion, task, meta, int(label))
    except (KeyError, TypeError, ValueError, AttributeError):
        return 0.0
    return 0.0 if chk.unparsable else chk.lines_right / chk.lines_expected


__all__ = ["ERROR_KINDS", "ChainCheck", "Step", "chain_reward", "check_chain", "presented"]
