"""The one sample schema every stage, converter and benchmark shares.

A sample is one pairwise judgement for one of the four tasks:

| task                 | text fields                      | visuals                         |
|----------------------|----------------------------------|---------------------------------|
| image_generation     | caption                          | two images (candidate 1, 2)     |
| video_generation     | caption                          | two videos (candidate 1, 2)     |
| image_understanding  | question, answers=(a1, a2)       | one image (the reference)       |
| video_understanding  | question, answers=(a1, a2)       | one video (the reference)       |

`label` is 1 or 2 (the preferred candidate) or "tie" (benchmarks only: tie / both-bad votes).
`cot` is an optional `<think>…</think>\\n<answer>…</answer>` trace (teacher or rejection sampling).
A video is its frames: either decoded frames or the original encoded file, sampled at load time.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from PIL import Image

from urt.errors import UrtError, describe

TASKS = ("image_generation", "video_generation", "image_understanding", "video_understanding")
GENERATION_TASKS = ("image_generation", "video_generation")
UNDERSTANDING_TASKS = ("image_understanding", "video_understanding")
LABELS = (1, 2, "tie")

Label = Union[int, Literal["tie"]]


@dataclass
class Video:
    """A video: decoded `frames` (PIL images, in time order) or the encoded file bytes (`data`, e.g.
    mp4) that are decoded and frame-sampled when the sample is loaded."""

    frames: list[Image.Image] | None = None
    data: bytes | None = None
    format: str = "mp4"
    fps: float | None = None

    def __post_init__(self) -> None:
        if (self.frames is None) == (self.data is None):
            raise UrtError("a Video needs exactly one of `frames` (decoded) or `data` (encoded file bytes)")
        if self.frames is not None and len(self.frames) == 0:
            raise UrtError("a Video needs at least one frame")


Visual = Union[Image.Image, Video]


def task_modality(task: str) -> str:
    return "video" if task.startswith("video") else "image"


@dataclass
class Sample:
    key: str
    task: str
    label: Label
    visuals: list[Visual]
    caption: str | None = None
    question: str | None = None
    answers: tuple[str, str] | None = None
    cot: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.answers, list):
            self.answers = tuple(self.answers)
        validate(self)

    @property
    def modality(self) -> str:
        return task_modality(self.task)

    def swapped(self) -> "Sample":
        """The same judgement with the two candidates presented in the other order (position
        debiasing): candidates swap and the label follows them; a tie stays a tie."""
        label = self.label if self.label == "tie" else 3 - int(self.label)
        meta = dict(self.meta, swapped=not self.meta.get("swapped", False))
        if self.task in GENERATION_TASKS:
            return Sample(self.key, self.task, label, list(reversed(self.visuals)), caption=self.caption,
                          cot=None, source=self.source, meta=meta)
        return Sample(self.key, self.task, label, list(self.visuals), question=self.question,
                      answers=(self.answers[1], self.answers[0]), cot=None, source=self.source, meta=meta)

    def fields(self) -> dict[str, str]:
        """The template placeholders this sample fills ({caption} or {question}/{answer1}/{answer2})."""
        if self.task in GENERATION_TASKS:
            return {"caption": self.caption}
        return {"question": self.question, "answer1": self.answers[0], "answer2": self.answers[1]}


def violation(s, *, image_type=Image.Image, video_type=Video) -> tuple[str, str] | None:
    """The first schema rule that `s` breaks, as (reason, message), or None. Shared by Sample
    (pixels) and the converters' records (visual references: pass their image/video types)."""
    if not s.key or not isinstance(s.key, str):
        return "invalid sample", f"key must be a non-empty string, got {s.key!r}"
    if s.task not in TASKS:
        return "invalid sample", f"unknown task {s.task!r}; known tasks: {', '.join(TASKS)}"
    if s.label not in LABELS or isinstance(s.label, bool):
        return "bad label", f"label must be 1, 2 or 'tie', got {s.label!r}"
    if s.task in GENERATION_TASKS:
        if not isinstance(s.caption, str):
            return "missing field", f"task {s.task} needs a caption (string), got {s.caption!r}"
        want = 2
    else:
        if not isinstance(s.question, str):
            return "missing field", f"task {s.task} needs a question (string), got {s.question!r}"
        if s.answers is None or len(s.answers) != 2 or not all(isinstance(a, str) for a in s.answers):
            return "missing field", f"task {s.task} needs two candidate answers (strings), got {s.answers!r}"
        want = 1
    if len(s.visuals) != want:
        return "bad visuals", f"task {s.task} needs {want} visual(s), got {len(s.visuals)}"
    kind = video_type if task_modality(s.task) == "video" else image_type
    for i, v in enumerate(s.visuals):
        if not isinstance(v, kind):
            return "bad visuals", f"visual {i} of task {s.task} must be {kind.__name__}, got {type(v).__name__}"
    if s.cot is not None and not isinstance(s.cot, str):
        return "invalid sample", f"cot must be a string, got {type(s.cot).__name__}"
    return None


def validate(s: Sample) -> None:
    """Raise UrtError naming the sample and what is wrong with it."""
    bad = violation(s)
    if bad is not None:
        raise UrtError(f"sample {s.key!r}: {bad[1]}")


def load_image(src: str | Path | bytes, *, where: str = "") -> Image.Image:
    """Open an image from a path or bytes as 8-bit RGB (CMYK, RGBA, palette, grayscale and 16-bit
    images are converted; RGBA is composited on white as viewers show it)."""
    label = where or (str(src) if not isinstance(src, bytes) else "image bytes")
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        img.load()
    except FileNotFoundError:
        raise UrtError(f"{label}: image file not found") from None
    except Exception as err:  # PIL raises many types for corrupt data
        raise UrtError(f"{label}: cannot decode image ({describe(err)})") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits rather than clipping everything to white.
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size and a.max() > 0 else 1.0
        img = Image.fromarray((a * (255.0 / hi)).round().astype("uint8"), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")
