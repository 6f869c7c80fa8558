"""`Judge`: a UnifiedReward-Think model as a pairwise judge you can call from Python (re-exported by urt.judge).

    from urt import Judge
    judge = Judge("CodeGoat24/UnifiedReward-Think-qwen-7b")        # or a local folder, or "tiny"
    v = judge.compare_images("a red apple on a table", "a.png", "b.png")
    v.winner, v.totals, v.scores, v.text

A `Verdict` holds what the model's completion says (parsed with `urt.prompts.parse_output`, or
`parse_implicit` in mode "implicit"): the winner (1, 2, "tie" or None when unparseable), the per-dimension
scores and totals from the chain of thought, `format_ok` (the paper's format reward regex) and the raw
text (with the chat template's assistant prefix, as the parser saw it).

Position bias is the main failure of pairwise judges (docs/demo.md §Pitfalls, pitfall 2): `judge(samples,
both_orders=True)` also asks with the candidates swapped and maps that verdict back to the caller's
order (`swapped=True`: winner, scores and totals refer to the caller's candidate 1 and 2, `text` is
the completion as written, about the order the model saw).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from urt.data.schema import Sample, Video, load_image, to_rgb
from urt.errors import UrtError
from urt.generation import GenerationConfig, generate

MODES = ("cot", "implicit")
DEFAULT_TINY_FAMILY = "qwen2_5_vl"


@dataclass(frozen=True)
class Verdict:
    winner: int | str | None  # 1, 2, "tie" or None (unparseable)
    task: str
    scores: tuple  # per-dimension (name, score1, score2) from the CoT
    totals: dict  # {1: total, 2: total} when present
    format_ok: bool
    text: str  # raw completion (with assistant prefix)
    swapped: bool = False  # the candidates were shown in reversed order (winner already mapped back)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (totals keyed "1"/"2", scores as objects)."""
        return {
            "winner": self.winner,
            "task": self.task,
            "scores": [{"dimension": n, "score1": a, "score2": b} for n, a, b in self.scores],
            "totals": {str(k): v for k, v in sorted(self.totals.items())},
            "format_ok": self.format_ok,
            "swapped": self.swapped,
            "text": self.text,
        }


def verdict_from_text(text: str, task: str, *, mode: str = "cot", swapped: bool = False) -> Verdict:
    """Parse a completion into a Verdict. With `swapped` the completion judged the candidates in
    reversed order: winner, scores and totals are mapped back to the original order."""
    from urt.prompts import parse_implicit, parse_output

    j = (parse_implicit if mode == "implicit" else parse_output)(text, task)
    winner, scores, totals = j.winner, tuple(j.dimensions), dict(j.totals)
    if swapped:
        winner = 3 - winner if winner in (1, 2) else winner
        scores = tuple((n, b, a) for n, a, b in scores)
        totals = {3 - k: v for k, v in totals.items() if k in (1, 2)}
    return Verdict(winner=winner, task=task, scores=scores, totals=dict(sorted(totals.items())),
                   format_ok=bool(j.format_ok), text=text, swapped=swapped)


# ------------------------------------------------------------------------------------------ inputs


def _image(x, what: str) -> Image.Image:
    if isinstance(x, Image.Image):
        return to_rgb(x)
    if isinstance(x, (str, Path, bytes)):
        return load_image(x, where=what if not isinstance(x, bytes) else "")
    raise UrtError(f"{what}: expected a PIL image, a path or image bytes, got {type(x).__name__}")


def _video(x, what: str, frames: int) -> Video:
    from urt.data.video import decode_video

    if isinstance(x, Video):
        if x.frames is not None:
            return x
        x = x.data
    if isinstance(x, (list, tuple)):
        if not x:
            raise UrtError(f"{what}: a video given as frames needs at least one frame")
        return Video(frames=[_image(f, f"{what} frame {i}") for i, f in enumerate(x)])
    if isinstance(x, (str, Path, bytes)):
        if not isinstance(x, bytes) and not Path(x).is_file():
            raise UrtError(f"{what}: video file {str(x)!r} not found")
        info: dict = {}
        imgs, src_fps = decode_video(x, where=what, frames=frames, info=info)
        total = info.get("total_frames") or len(imgs)
        fps = src_fps * len(imgs) / total if src_fps and total else None  # rate of the kept frames
        return Video(frames=imgs, fps=fps)
    raise UrtError(f"{what}: expected a video path, video bytes or a list of frames, got {type(x).__name__}")


# ------------------------------------------------------------------------------------------ judge


class Judge:
    """A pairwise judge (see the module docstring). `model`: a ModelBundle, "tiny" (a random tiny
    model, family default qwen2_5_vl: for smoke tests only), a local checkpoint folder or a hub id;
    `load_opts` go to `urt.models.load_model` (device, dtype, attn_implementation, ...). mode "cot"
    uses the family's template set (or `template_set`) and `parse_output`; "implicit" the "w/o CoT"
    prompts and `parse_implicit` (ties possible for generation tasks). `generation` defaults to greedy
    decoding with 1024 new tokens; `frames` frames are sampled uniformly from each video file (None: as
    many as the model was trained with, from its folder's urt.json, else 8). Images are sized by the
    model's processor, whose pixel bounds a urt-trained folder carries from training."""

    def __init__(self, model: Any = "tiny", family: str | None = None, *, template_set: str | None = None,
                 mode: str = "cot", generation: GenerationConfig | None = None, frames: int | None = None,
                 **load_opts):
        from urt.data.encode import SampleEncoder
        from urt.models import ModelBundle, load_model
        from urt.models.preprocessing import exported_frames
        from urt.prompts import default_template_set

        if frames is None:
            frames = exported_frames(model if isinstance(model, (str, Path)) else None)
        if mode not in MODES:
            raise UrtError(f"unknown judge mode {mode!r}; known modes: {', '.join(MODES)}")
        if isinstance(frames, bool) or int(frames) < 1:
            raise UrtError(f"frames must be a positive integer, got {frames!r}")
        if isinstance(model, ModelBundle):
            if family is not None and family != model.family:
                raise UrtError(f"the model bundle is a {model.family} model, but family {family!r} was requested")
            if load_opts:
                raise UrtError(f"loading options {sorted(load_opts)} do not apply to an already loaded ModelBundle")
            bundle = model
        elif isinstance(model, (str, Path)):
            name = str(model)
            if name == "tiny" and family is None:
                family = DEFAULT_TINY_FAMILY
            bundle = load_model(name, family, **load_opts)
        else:
            raise UrtError(f"model must be a name/path or a ModelBundle, got {type(model).__name__}")
        bundle.model.eval()
        self.bundle = bundle
        self.family = bundle.family
        self.mode = mode
        if template_set is None:
            template_set = "implicit" if mode == "implicit" else default_template_set(self.family)
        self.template_set = template_set
        self.generation = dataclasses.replace(generation) if generation is not None else GenerationConfig()
        self.frames = int(frames)
        self.encoder = SampleEncoder(bundle.processor, self.family, template_set=template_set, mode="prompt")

    def __repr__(self) -> str:
        return f"Judge(family={self.family!r}, mode={self.mode!r}, template_set={self.template_set!r})"

    # -------------------------------------------------------------------------------- one pair

    def compare_images(self, caption: str, image1, image2) -> Verdict:
        """Which of two generated images better fits `caption` (paths, bytes or PIL images)."""
        s = Sample("images", "image_generation", 1, [_image(image1, "image1"), _image(image2, "image2")],
                   caption=_text(caption, "caption"))
        return self.judge([s])[0]

    def compare_videos(self, caption: str, video1, video2) -> Verdict:
        """Which of two generated videos better fits `caption`. Videos: paths / bytes (decoded with
        PyAV, `frames` uniform frames) or lists of frames."""
        s = Sample("videos", "video_generation", 1,
                   [_video(video1, "video1", self.frames), _video(video2, "video2", self.frames)],
                   caption=_text(caption, "caption"))
        return self.judge([s])[0]

    def compare_answers(self, question: str, answer1: str, answer2: str, *, image=None, video=None) -> Verdict:
        """Which of two answers to `question` about `image` (or `video`) is better."""
        if (image is None) == (video is None):
            raise UrtError("compare_answers needs exactly one of image= or video=")
        if image is not None:
            task, visual = "image_understanding", _image(image, "image")
        else:
            task, visual = "video_understanding", _video(video, "video", self.frames)
        s = Sample("answers", task, 1, [visual], question=_text(question, "question"),
                   answers=(_text(answer1, "answer1"), _text(answer2, "answer2")))
        return self.judge([s])[0]

    # -------------------------------------------------------------------------------- batched

    def judge(self, samples: Sequence[Sample], *, both_orders: bool = False) -> list[Verdict]:
        """One verdict per sample, in order (batched generation); with `both_orders`, two per sample:
        the given order, then the swapped order mapped back (`swapped=True`). Labels are ignored."""
        samples = list(samples)
        for i, s in enumerate(samples):
            if not isinstance(s, Sample):
                raise UrtError(f"judge takes urt.data.schema.Sample objects; item {i} is a {type(s).__name__}")
        shown: list[tuple[Sample, bool]] = []
        for s in samples:
            shown.append((s, False))
            if both_orders:
                shown.append((s.swapped(), True))
        encoded = [self.encoder(_decoded(s, self.frames)) for s, _ in shown]
        cfg = dataclasses.replace(self.generation, num_return_sequences=1)
        texts = generate(self.bundle, encoded, cfg)
        return [verdict_from_text(t[0], s.task, mode=self.mode, swapped=sw) for t, (s, sw) in zip(texts, shown)]


def _text(x, what: str) -> str:
    if not isinstance(x, str):
        raise UrtError(f"{what} must be a string, got {type(x).__name__}")
    return x


def _decoded(s: Sample, frames: int) -> Sample:
    """The sample with any still-encoded video decoded to `frames` uniform frames."""
    if not any(isinstance(v, Video) and v.frames is None for v in s.visuals):
        return s
    visuals = [_video(v, f"sample {s.key!r}: visual {i}", frames) if isinstance(v, Video) else v
               for i, v in enumerate(s.visuals)]
    return dataclasses.replace(s, visuals=visuals)
