"""The demo's preference data: all four tasks built from easy-vqa's real images (a PyPI package).

easy-vqa ships 5,000 real 64x64 images of one coloured shape each (4,000 train, 1,000 test) with ~48k
question/answer pairs. Each image's attributes (colour, shape) are read off its own QA pairs
("what color is the shape?" -> colour, "what shape is in the image?" -> shape); images whose pairs do
not name both are counted and left out. Pairs are built per split from that split's images only (test
pairs use test images), so held-out evaluation never sees a training image:

| task | built from |
|---|---|
| image_understanding | an easy-vqa question about the image: its answer vs a wrong one of the same kind (another colour / shape, yes vs no); negated questions ("does the image not contain…") are left out |
| image_generation | "a {colour} {shape}" + the image vs an image that differs in colour, shape or both |
| video_understanding | a clip of the image's shape moving left/right/up/down; asks the direction, colour or shape |
| video_generation | "a {colour} {shape} moving {direction}" + that clip vs a clip differing in colour, shape or direction |

The preferred candidate's position is drawn per pair (seeded), so a constant verdict scores 0.5.
`meta["attributes"]` records what the rule teacher (urt.stages.distill.RuleTeacher) needs to write
CoT (for yes/no questions also the value asked about, `asks_value`); `meta["describe"]` and
`meta["describe_swapped"]` are the grounding targets for the stored and the swapped order: the teacher's chain
("The caption asks for a red circle. / Image 1 shows a red circle: red vs red yes, circle vs circle yes, so
Image 1 (10/10) matches. / …", SampleEncoder targets "describe" and "reason", under urt's short prompts that
name the caption or the question and answers). The optional `replay` split holds more train-image pairs marked
`meta["target"] = "reason"`, and `replay_direct` the first train pairs again marked `meta["target"] = "answer"`,
`meta["template_set"] = "implicit"` (the base's own direct-answer pairs, rehearsed), to mix into a later stage's
shards. `instructed_share` of the replay pairs are prompted by a varied instruction instead (`instructed`), and
`example_share` of those also hold a format example (`example_block`).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from urt.data.schema import Sample, Video
from urt.errors import UrtError

log = logging.getLogger(__name__)

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
MOTIONS = ("left", "right", "up", "down")
_SHIFT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_NEGATED = re.compile(r"\b(not|no)\b")


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - a dependency of the demo
        raise UrtError("the demo data needs the easy-vqa package: pip install easy-vqa") from e
    return easy_vqa


@lru_cache(maxsize=2)
def split_data(split: str) -> tuple[dict[int, str], list[tuple[str, str, int]]]:
    """({image id: png path}, [(question, answer, image id)]) of easy-vqa's `split` (train | test)."""
    ev = _easy_vqa()
    if split == "train":
        paths, (qs, ans, ids) = ev.get_train_image_paths(), ev.get_train_questions()
    elif split == "test":
        paths, (qs, ans, ids) = ev.get_test_image_paths(), ev.get_test_questions()
    else:
        raise UrtError(f"easy-vqa split must be train or test, got {split!r}")
    return dict(paths), list(zip(qs, ans, ids))


def image_attributes(split: str) -> tuple[dict[int, dict[str, str]], Counter]:
    """{image id: {"color": c, "shape": s}} from the split's QA pairs, and counts of images left out."""
    paths, qa = split_data(split)
    seen: dict[int, dict[str, str]] = {}
    for q, a, i in qa:
        q = q.lower().strip()
        words = set(re.findall(r"[a-z]+", q))
        if a in ("yes", "no") and (a == "yes") != bool(_NEGATED.search(q)):  # the named attribute is present
            for c in words & set(COLORS):
                seen.setdefault(i, {})["color"] = c
            for sh in words & set(SHAPES):
                seen.setdefault(i, {})["shape"] = sh
        elif q.startswith("what color") and a in COLORS:
            seen.setdefault(i, {})["color"] = a
        elif (q.startswith("what shape") or q.startswith("what is the")) and a in SHAPES:
            seen.setdefault(i, {})["shape"] = a
            m = re.match(r"what is the (\w+) shape", q)
            if m and m.group(1) in COLORS:
                seen[i]["color"] = m.group(1)
    skipped: Counter = Counter()
    out = {}
    for i in sorted(paths):
        at = seen.get(i, {})
        if "color" in at and "shape" in at:
            out[i] = {"color": at["color"], "shape": at["shape"]}
        else:
            skipped["attributes_not_named_by_qa"] += 1
    return out, skipped


def load_image(split: str, image_id: int) -> Image.Image:
    paths, _ = split_data(split)
    with Image.open(paths[image_id]) as im:
        return im.convert("RGB")


@lru_cache(maxsize=8192)
def _source(split: str, image_id: int, size: int | None) -> Image.Image:
    """An easy-vqa image, decoded (and resized to size x size) once: the pairs reuse each image ~3 times.
    Shared: callers copy or only read it."""
    img = load_image(split, image_id)
    return img if size is None else img.resize((size, size), Image.BICUBIC)


def moving_clip(img: Image.Image, direction: str, frames: int = 4, step: int = 6) -> list[Image.Image]:
    """`frames` frames of the image's content translated `step` px per frame in `direction` (centred on
    the original position), the uncovered border filled with the background colour (corner pixel)."""
    if direction not in _SHIFT:
        raise UrtError(f"direction must be one of {MOTIONS}, got {direction!r}")
    a = np.asarray(img.convert("RGB"))
    h, w, _ = a.shape
    bg = a[0, 0]
    dx, dy = _SHIFT[direction]
    out = []
    for f in range(frames):
        off = int(round((f - (frames - 1) / 2) * step))
        ox, oy = dx * off, dy * off
        canvas = np.empty_like(a)
        canvas[:] = bg
        src = a[max(0, -oy):h - max(0, oy), max(0, -ox):w - max(0, ox)]
        canvas[max(0, oy):max(0, oy) + src.shape[0], max(0, ox):max(0, ox) + src.shape[1]] = src
        out.append(Image.fromarray(canvas))
    return out


def _describe(at: dict[str, str]) -> str:
    text = f"a {at['color']} {at['shape']}"
    return text + (f" moving {at['motion']}" if "motion" in at else "")


def _with_describe(s: Sample) -> Sample:
    """The grounding targets (SampleEncoder targets "describe"/"reason"; the prompt names the caption or
    the question): the rule teacher's chain-style reasoning without tags — what each candidate shows, one
    check per asked attribute, a score and verdict per candidate (urt.stages.distill.RuleTeacher.chain) —
    for the pair as stored (`describe`) and swapped (`describe_swapped`, for order=random training)."""
    from urt.stages.distill import RuleTeacher

    teacher = RuleTeacher(style="chain")
    sw = s.swapped()
    attrs = dict(s.meta["attributes"])
    if "candidates" in attrs:
        attrs["candidates"] = list(reversed(attrs["candidates"]))
    sw.meta["attributes"] = attrs
    texts = [teacher.chain(x, x.label) for x in (s, sw)]
    if any(t is None for t in texts):  # pragma: no cover - every demo sample names its attributes
        raise UrtError(f"demo sample {s.key}: its attributes give no reasoning chain")
    s.meta["describe"], s.meta["describe_swapped"] = ("\n".join(t) for t in texts)
    return s


def _understanding_attributes(question: str, answer: str, seen: dict[str, str]) -> dict:
    """What an image-understanding question asks: the attribute, and for yes/no questions the value
    it names ("is there a red shape?" -> color, red)."""
    asks = _asks(question, answer)
    out = {"seen": dict(seen), "asks": asks}
    if answer in ("yes", "no"):
        vocab = COLORS if asks == "color" else SHAPES
        named = [w for w in re.findall(r"[a-z]+", question.lower()) if w in vocab]
        if named:
            out["asks_value"] = named[0]
    return out


@dataclass
class _Pool:
    """The images of one split grouped by attributes, for drawing non-matching candidates."""

    attrs: dict[int, dict[str, str]]

    def __post_init__(self) -> None:
        self.ids = sorted(self.attrs)
        self.by: dict[tuple[str, str], list[int]] = {}
        for i in self.ids:
            self.by.setdefault((self.attrs[i]["color"], self.attrs[i]["shape"]), []).append(i)

    def draw(self, rng: random.Random, color: str, shape: str) -> int | None:
        ids = self.by.get((color, shape))
        return rng.choice(ids) if ids else None


def _differ(rng: random.Random, at: dict[str, str], kinds: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    kind = rng.choice(kinds)
    other = dict(at)
    if kind in ("color", "both"):
        other["color"] = rng.choice([c for c in COLORS if c != at["color"]])
    if kind in ("shape", "both"):
        other["shape"] = rng.choice([s for s in SHAPES if s != at["shape"]])
    if kind == "motion":
        other["motion"] = rng.choice([m for m in MOTIONS if m != at["motion"]])
    return kind, other


def _place(rng: random.Random, good, bad) -> tuple[int, list]:
    """(label, [candidate 1, candidate 2]) with the preferred one at a random position."""
    return (1, [good, bad]) if rng.random() < 0.5 else (2, [bad, good])


def _understanding_qas(split: str, attrs: dict[int, dict[str, str]]) -> list[tuple[str, str, tuple[str, ...], int]]:
    """(question, right answer, the wrong answers of its kind, image id) from easy-vqa's own QA pairs
    (negations left out)."""
    _, qa = split_data(split)
    out = []
    for q, a, i in qa:
        if i not in attrs or _NEGATED.search(q):
            continue
        if a in COLORS:
            wrong_pool = tuple(c for c in COLORS if c != a)
        elif a in SHAPES:
            wrong_pool = tuple(s for s in SHAPES if s != a)
        elif a in ("yes", "no"):
            wrong_pool = ("no" if a == "yes" else "yes",)
        else:
            continue
        out.append((q, a, wrong_pool, i))
    return out


def _asks(question: str, answer: str) -> str:
    """The attribute a question asks about: the answer's kind, or for yes/no the kind of word it names
    ("what is the red shape?" asks the shape)."""
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    words = set(re.findall(r"[a-z]+", question.lower()))
    return "color" if "color" in words or words & set(COLORS) else "shape"


def demo_samples(split: str, n_per_task: int, *, seed: int = 0, frames: int = 4, step: int = 6,
                 image_size: int = 112, video_size: int = 84, tasks: tuple[str, ...] | None = None,
                 stats: Counter | None = None) -> Iterator[Sample]:
    """`n_per_task` pairs of each task from easy-vqa's `split`, interleaved task by task (seeded).
    Images are resized to `image_size`² and video frames to `video_size`² (multiples of 28 keep every
    Qwen2.5-VL patch: 112 px = 16 visual tokens per image, 84 px = 9 per two frames)."""
    from urt.data.schema import TASKS

    tasks = tuple(tasks or TASKS)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UrtError(f"unknown task(s) {bad}; known: {', '.join(TASKS)}")
    if n_per_task < 0:
        raise UrtError(f"n_per_task must be >= 0, got {n_per_task}")
    attrs, skipped = image_attributes(split)
    if stats is not None:
        stats.update(skipped)
    if not attrs:
        raise UrtError(f"easy-vqa {split}: no image has both a colour and a shape named by its QA pairs")
    pool = _Pool(attrs)
    qas = _understanding_qas(split, attrs)
    rng = random.Random(f"urt-demo:{split}:{seed}")
    sizes = (int(image_size), int(video_size))
    gens = {t: _task_stream(t, split, pool, qas, rng, frames, step, sizes) for t in tasks}
    made = Counter()
    while any(made[t] < n_per_task for t in tasks):
        for t in tasks:
            if made[t] < n_per_task:
                made[t] += 1
                yield _with_describe(next(gens[t]))


def _task_stream(task, split, pool, qas, rng, frames, step, sizes) -> Iterator[Sample]:
    isz, vsz = sizes

    def image(i: int) -> Image.Image:
        return _source(split, i, isz).copy()

    def clip(i: int, motion: str) -> Video:
        # move at the source resolution (whole pixels), then resize each frame
        return Video(frames=[f.resize((vsz, vsz), Image.BICUBIC)
                             for f in moving_clip(_source(split, i, None), motion, frames, step)])

    n = 0
    while True:
        n += 1
        key = f"evqa-{split}-{task}-{n:06d}"
        if task == "image_generation":
            i = rng.choice(pool.ids)
            at = pool.attrs[i]
            for _ in range(20):
                kind, want = _differ(rng, at, ("color", "shape", "both"))
                j = pool.draw(rng, want["color"], want["shape"])
                if j is not None:
                    break
            else:  # pragma: no cover - every colour/shape combination exists in both splits
                continue
            label, cands = _place(rng, i, j)
            ca = [pool.attrs[c] for c in cands]
            yield Sample(key=key, task=task, label=label, caption=_describe(at),
                         visuals=[image(c) for c in cands], source=f"easy-vqa/{split}",
                         meta={"attributes": {"asks": dict(at), "candidates": ca}, "differs_in": kind,
                               "image_ids": cands})
        elif task == "image_understanding":
            q, a, wrong, i = rng.choice(qas)
            w = rng.choice(wrong)
            label, answers = _place(rng, a, w)
            yield Sample(key=key, task=task, label=label, question=q, answers=tuple(answers),
                         visuals=[image(i)], source=f"easy-vqa/{split}",
                         meta={"attributes": _understanding_attributes(q, a, pool.attrs[i]), "image_ids": [i]})
        elif task == "video_understanding":
            i = rng.choice(pool.ids)
            at = dict(pool.attrs[i], motion=rng.choice(MOTIONS))
            kind = rng.choice(("motion", "color", "shape"))
            if kind == "motion":
                q, a = "in which direction does the shape move?", at["motion"]
                w = rng.choice([m for m in MOTIONS if m != a])
            elif kind == "color":
                q, a = "what color is the moving shape?", at["color"]
                w = rng.choice([c for c in COLORS if c != a])
            else:
                q, a = "what shape is moving?", at["shape"]
                w = rng.choice([s for s in SHAPES if s != a])
            label, answers = _place(rng, a, w)
            yield Sample(key=key, task=task, label=label, question=q, answers=tuple(answers),
                         visuals=[clip(i, at["motion"])], source=f"easy-vqa/{split}",
                         meta={"attributes": {"seen": at, "asks": kind}, "image_ids": [i]})
        elif task == "video_generation":
            i = rng.choice(pool.ids)
            at = dict(pool.attrs[i], motion=rng.choice(MOTIONS))
            for _ in range(20):
                kind, want = _differ(rng, at, ("color", "shape", "motion"))
                j = i if kind == "motion" else pool.draw(rng, want["color"], want["shape"])
                if j is not None:
                    break
            else:  # pragma: no cover
                continue
            good, bad = clip(i, at["motion"]), clip(j, want["motion"])
            label, cands = _place(rng, good, bad)
            ca = [at, want] if label == 1 else [want, at]
            yield Sample(key=key, task=task, label=label, caption=_describe(at), visuals=cands,
                         source=f"easy-vqa/{split}",
                         meta={"attributes": {"asks": dict(at), "candidates": [dict(c) for c in ca]},
                               "differs_in": kind, "image_ids": [i, j] if label == 1 else [j, i]})
        else:  # pragma: no cover - checked by demo_samples
            raise UrtError(f"unknown task {task!r}")


# The replayed grounding pairs as varied instruction data (stage 0's stand-in for a VLM's instruction tuning): a
# 1M-parameter model trained on one short prompt per task follows it only at that length and only when the tag
# instruction comes last; under a long rubric ending in the field lines (the paper prompts) it answered directly.
# So `instructed_share` of the replayed pairs get a preamble: a random run of lines from urt's implicit-prompt
# bodies (no tags there) with one of several tag instructions somewhere in it and the request (last for half of
# them, anywhere for the rest: the paper prompts have no request line before their fields), then the `fields`
# set's field lines. The tag instruction is then the one cue that separates them from the implicit prompts.
_TAG_ASKS = (
    "Reason inside <think> </think> tags, then give the answer inside <answer> </answer> tags.",
    "Put your reasoning in <think> and </think>, and the final answer in <answer> and </answer>.",
    "Think step by step within <think> </think> tags and answer within <answer> </answer> tags.",
)
_REQUESTS = {
    "image_generation": "Describe Image 1 and Image 2, then say which one shows the caption.",
    "video_generation": "Describe Video 1 and Video 2, then say which one shows the caption.",
    "image_understanding": "Describe the image, then say which answer fits the question.",
    "video_understanding": "Describe the video, then say which answer fits the question.",
}


@lru_cache(maxsize=None)
def _rubric_lines() -> tuple[str, ...]:
    """The instruction lines of urt's implicit prompts (all tasks), without their field lines."""
    from urt.prompts import TASKS, load_template

    lines: list[str] = []
    for task in TASKS:
        for line in load_template("implicit", task).splitlines():
            if line.strip() and "{" not in line:
                lines.append(line)
    return tuple(lines)


def example_block(task: str, rng: random.Random) -> list[str]:
    """A format example as judging instructions show one: placeholder scores per dimension for both candidates,
    their totals and a verdict, in tags. Its "Answer 1 (7/10)" and "Answer 1: 7+5=12" lines are what a chain has
    to look past when it copies the candidates from the field lines."""
    from urt.stages.distill import DIMENSIONS, NOUN

    noun, dims = NOUN[task], DIMENSIONS[task][: rng.randint(1, 3)]
    scores = [[rng.randint(3, 10) for _ in dims] for _ in (1, 2)]
    return ["Example format:", "<think>",
            *(f"{d}. {name}: {noun} 1 ({a}/10) - ...; {noun} 2 ({b}/10) - ..."
              for d, (name, a, b) in enumerate(zip(dims, *scores), 1)),
            "Total score:", *(f"{noun} {k}: {'+'.join(map(str, sc))}={sum(sc)}" for k, sc in ((1, scores[0]), (2, scores[1]))),
            "</think>", f"<answer>{noun} {rng.randint(1, 2)} is better</answer>"]


def instructed(s: Sample, rng: random.Random, example_share: float = 0.0) -> Sample:
    """Mark a grounding pair to be prompted by a varied instruction (see `_TAG_ASKS`): `meta["preamble"]`, the
    `fields` template set, target "reason"; `example_share` of them also hold a format example (`example_block`)."""
    pool = _rubric_lines()
    n = rng.randint(0, 12)
    start = rng.randrange(len(pool))
    units = [[pool[(start + i) % len(pool)]] for i in range(n)]  # the example block is one unit: kept whole
    units.insert(rng.randint(0, len(units)), [rng.choice(_TAG_ASKS)])
    if example_share and rng.random() < example_share:
        units.insert(rng.randint(0, len(units)), example_block(s.task, rng))
    units.insert(len(units) if rng.random() < 0.5 else rng.randint(0, len(units)), [_REQUESTS[s.task]])
    lines = [line for unit in units for line in unit]
    s.meta.update({"target": "reason", "template_set": "fields", "preamble": "\n".join(lines) + "\n"})
    return s


def build_demo_data(out_dir: str | Path, *, train_per_task: int, test_per_task: int, replay_per_task: int = 0,
                    direct_replay_per_task: int = 0, instructed_share: float = 0.0, example_share: float = 0.0,
                    seed: int = 0, frames: int = 4, step: int = 6,
                    image_size: int = 112, video_size: int = 84, progress: bool = True,
                    overwrite: bool = False) -> dict:
    """Write `out_dir/train` (easy-vqa train images) and `out_dir/test` (test images) shard sets and
    `out_dir/summary.json`; returns the summary. A finished build (summary.json with the same settings)
    is reused. `replay_per_task` > 0 also writes `out_dir/replay`: further pairs from the train images
    marked ``meta["target"] = "reason"`` (the grounding prompts and target, urt.data.encode), for mixing
    into a later stage's shards so that training on one task does not erase the others (the demo's cold
    start). `direct_replay_per_task` > 0 writes `out_dir/replay_direct`: the first that many train pairs of
    each task again, read back from `out_dir/train` and marked ``meta["target"] = "answer"``,
    ``meta["template_set"] = "implicit"`` (the base's own direct-answer training pairs, rehearsed), so that a
    stage learning CoT under the paper prompts still sees the implicit prompts answered directly."""
    from urt.data.shards import read_shards, write_shards

    out = Path(out_dir)
    for name, n in (("replay_per_task", replay_per_task), ("direct_replay_per_task", direct_replay_per_task)):
        if n < 0:
            raise UrtError(f"{name} must be >= 0, got {n}")
    if not 0.0 <= instructed_share <= 1.0:
        raise UrtError(f"instructed_share is the share of replayed grounding pairs given a varied instruction: "
                       f"between 0 and 1, got {instructed_share}")
    if not 0.0 <= example_share <= 1.0:
        raise UrtError(f"example_share is the share of instructed replay pairs whose preamble holds a format "
                       f"example: between 0 and 1, got {example_share}")
    if direct_replay_per_task > train_per_task:
        raise UrtError(f"direct_replay_per_task ({direct_replay_per_task}) replays train pairs: at most "
                       f"train_per_task ({train_per_task})")
    settings = {"train_per_task": train_per_task, "test_per_task": test_per_task, "replay_per_task": replay_per_task,
                "direct_replay_per_task": direct_replay_per_task, "instructed_share": instructed_share,
                "example_share": example_share, "seed": seed, "frames": frames, "step": step,
                "image_size": image_size, "video_size": video_size, "version": 9}
    summary_path = out / "summary.json"
    if summary_path.exists() and not overwrite:
        try:
            old = json.loads(summary_path.read_text())
        except json.JSONDecodeError as e:
            raise UrtError(f"{summary_path} is not valid JSON ({e}); delete {out} to rebuild") from e
        if old.get("settings") == settings:
            return old
        raise UrtError(f"{out} holds demo data built with other settings ({old.get('settings')}); "
                       f"pick another directory or delete it")
    summary: dict = {"settings": settings, "splits": {}}
    # replay pairs continue the train stream (same images, new pairs, keys after the train ones); the
    # stream is round-robin over the tasks, so its first 4 * train_per_task pairs are exactly the train set
    left_out = {"train": Counter(), "test": Counter()}  # images without usable attributes (image_attributes)
    streams = {split: demo_samples(split, n, seed=seed, frames=frames, step=step, image_size=image_size,
                                   video_size=video_size, stats=left_out[split])
               for split, n in (("train", train_per_task + replay_per_task), ("test", test_per_task))}
    # the base's own pairs again: the train stream's first pairs, read back as written (round-robin over tasks)
    streams["train_again"] = read_shards(out / "train", frames=frames)
    parts = [("train", "train", train_per_task), ("replay", "train", replay_per_task),
             ("replay_direct", "train_again", direct_replay_per_task), ("test", "test", test_per_task)]
    marks = {"replay": {"target": "reason"}, "replay_direct": {"target": "answer", "template_set": "implicit"}}
    for name, split, n in parts:
        if name in marks and not n:
            continue
        counts: Counter = Counter()
        labels: Counter = Counter()

        instruct_rng = random.Random(f"{seed}-instructed")

        def counted(it):
            for s in it:
                s.meta.update(marks.get(name, {}))
                if name == "replay" and instruct_rng.random() < instructed_share:
                    instructed(s, instruct_rng, example_share)
                counts[s.task] += 1
                labels[s.label] += 1
                yield s

        samples = counted(itertools.islice(streams[split], 4 * n))
        if progress:
            from rich.progress import track

            samples = track(samples, total=4 * n, description=f"demo data ({name})", transient=True)
        write_shards(samples, out / name, prefix="demo", maxcount=500, overwrite=True)
        summary["splits"][name] = {"pairs": sum(counts.values()), "tasks": dict(counts),
                                   "labels": {str(k): v for k, v in labels.items()}}
    for split, st in left_out.items():
        summary["splits"][split]["images_left_out"] = dict(st)
        if st:
            log.info("easy-vqa %s: %s image(s) left out (%s)", split, sum(st.values()), dict(st))
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary
