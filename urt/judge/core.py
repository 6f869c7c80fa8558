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

Groups: `win_rates(caption, candidates)` judges the pairs of N candidates (both orders by default) and returns
per-candidate win rates, counts and diagnostics (`urt.judge.group.GroupResult`; docs/judge-as-reward.md);
`judge_groups` does several groups in one batched pass. Each candidate's visual features are computed once
per group and fed to every pair that shows it (`urt.rl.visual_cache.VisualCache.compose`, reaching the
prefill as `mm_encoder_outputs`): the vision tower sees N images, not 2·N(N−1).
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
from urt.judge.group import GroupResult, PairVerdict, schedule, tally

MODES = ("cot", "implicit")
DEFAULT_TINY_FAMILY = "qwen2_5_vl"
KINDS = ("images", "videos", "answers")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v")


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


@dataclass
class Group:
    """One group to judge pairwise (`Judge.group` builds it from paths / images / strings): a caption and
    N generated images or videos, or a question, its reference image / video and N answers. `candidates`
    are loaded visuals (PIL images, decoded `Video`s) or answer strings."""

    kind: str  # "images" | "videos" | "answers"
    candidates: list
    caption: str | None = None
    question: str | None = None
    reference: Any = None  # the image / Video the question is about (kind "answers")
    key: str = "group"

    @property
    def task(self) -> str:
        if self.kind == "answers":
            return "video_understanding" if isinstance(self.reference, Video) else "image_understanding"
        return "image_generation" if self.kind == "images" else "video_generation"

    def sample(self, a: int, b: int) -> Sample:
        """The pair sample showing candidate `a` first and `b` second."""
        key = f"{self.key}:{a}-{b}"
        if self.kind == "answers":
            return Sample(key, self.task, 1, [self.reference], question=self.question,
                          answers=(self.candidates[a], self.candidates[b]))
        return Sample(key, self.task, 1, [self.candidates[a], self.candidates[b]], caption=self.caption)


@dataclass
class PreparedGroups:
    """`Judge.encode_groups`' output: the groups, per pair prompt (group, i, j, candidate shown first), the
    pair samples and their encodings."""

    groups: list
    shown: list
    samples: list
    encoded: list


def _is_video(x) -> bool:
    if isinstance(x, (Video, list, tuple)):
        return True
    return isinstance(x, (str, Path)) and Path(x).suffix.lower() in VIDEO_SUFFIXES


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

    # -------------------------------------------------------------------------------- groups

    def group(self, prompt: str, candidates: Sequence, *, kind: str | None = None, image=None, video=None,
              key: str = "group") -> Group:
        """A `Group` with its candidates loaded: `prompt` is the caption (images / videos) or the question
        (answers: `candidates` are strings, `image=` or `video=` the reference). `kind` defaults to
        "answers" when a reference is given, else "videos" when every candidate is a video (a `Video`, a
        list of frames or a path ending .mp4/.webm/.mov/.avi/.mkv/.m4v), else "images". A candidate that
        cannot be loaded raises a UrtError naming it (`key`, its index and the file)."""
        candidates = list(candidates)
        if kind is None:
            kind = ("answers" if image is not None or video is not None
                    else "videos" if candidates and all(_is_video(c) for c in candidates) else "images")
        if kind not in KINDS:
            raise UrtError(f"group {key!r}: unknown kind {kind!r}; known: {', '.join(KINDS)}")
        if len(candidates) < 2:
            raise UrtError(f"group {key!r}: a group needs at least 2 candidates, got {len(candidates)}")
        prompt = _text(prompt, f"group {key!r}: the {'question' if kind == 'answers' else 'caption'}")
        if kind == "answers":
            if (image is None) == (video is None):
                raise UrtError(f"group {key!r}: answers need exactly one of image= or video= (the reference)")
            ref = (_image(image, f"group {key!r}: reference image") if image is not None
                   else _video(video, f"group {key!r}: reference video", self.frames))
            answers = [_text(c, f"group {key!r}: candidate {i}") for i, c in enumerate(candidates)]
            return Group("answers", answers, question=prompt, reference=ref, key=key)
        if image is not None or video is not None:
            raise UrtError(f"group {key!r}: image=/video= (a reference) are for kind 'answers', not {kind!r}")
        load = ((lambda c, w: _image(c, w)) if kind == "images" else (lambda c, w: _video(c, w, self.frames)))
        loaded = [load(c, f"group {key!r}: candidate {i}" + (f" ({c})" if isinstance(c, (str, Path)) else ""))
                  for i, c in enumerate(candidates)]
        return Group(kind, loaded, caption=prompt, key=key)

    def load(self, kind: str, x, what: str):
        """One candidate loaded for a group of `kind` "images" (a PIL image) or "videos" (a decoded
        `Video`, `frames` frames); a UrtError starting with `what` when it cannot be read."""
        if kind == "images":
            return _image(x, what)
        if kind == "videos":
            return _video(x, what, self.frames)
        raise UrtError(f"{what}: candidates of kind {kind!r} are not files")

    def win_rates(self, prompt: str, candidates: Sequence, *, kind: str | None = None, image=None, video=None,
                  both_orders: bool = True, pairs_per_candidate: int | None = None, ties: str = "half",
                  reuse_visuals: bool = True, progress: bool = False) -> GroupResult:
        """Per-candidate win rates of one group (urt.judge.group defines them): every pair (or
        `pairs_per_candidate` opponents each) judged in both orders (`both_orders=False`: candidate with
        the lower index first), each candidate's visual features computed once and reused in all its pairs
        (`reuse_visuals`), pairs batched. `prompt`, `candidates`, `kind`, `image`, `video`: see `group`."""
        g = self.group(prompt, candidates, kind=kind, image=image, video=video)
        return self.judge_groups([g], both_orders=both_orders, pairs_per_candidate=pairs_per_candidate,
                                 ties=ties, reuse_visuals=reuse_visuals, progress=progress)[0]

    def judge_groups(self, groups: Sequence[Group], *, both_orders: bool = True,
                     pairs_per_candidate: int | None = None, ties: str = "half", reuse_visuals: bool = True,
                     progress: bool = False) -> list[GroupResult]:
        """`win_rates` for several groups at once: the pairs of all groups go through one batched
        `generate` call (what `urt rank` and the server's `/v1/rewards` batch concurrent groups with).
        `encode_groups` then `judge_encoded`, for callers that encode and generate under different locks."""
        prepared = self.encode_groups(groups, both_orders=both_orders, pairs_per_candidate=pairs_per_candidate)
        return self.judge_encoded(prepared, ties=ties, reuse_visuals=reuse_visuals, progress=progress)

    def encode_groups(self, groups: Sequence[Group], *, both_orders: bool = True,
                      pairs_per_candidate: int | None = None) -> "PreparedGroups":
        """The pair prompts of `groups`, encoded (processor and tokenizer; no model call)."""
        groups = list(groups)
        shown: list[tuple[int, int, int, int]] = []  # (group, i, j, first)
        samples: list[Sample] = []
        for gi, g in enumerate(groups):
            if not isinstance(g, Group):
                raise UrtError(f"judge_groups takes Group objects (Judge.group); item {gi} is a {type(g).__name__}")
            for i, j in schedule(len(g.candidates), pairs_per_candidate):
                for a, b in ((i, j), (j, i)) if both_orders else ((i, j),):
                    shown.append((gi, i, j, a))
                    samples.append(g.sample(a, b))
        encoded = [self.encoder(s) for s in samples]
        return PreparedGroups(groups, shown, samples, encoded)

    def judge_encoded(self, prepared: "PreparedGroups", *, ties: str = "half", reuse_visuals: bool = True,
                      progress: bool = False) -> list[GroupResult]:
        """Verdicts and win rates of `encode_groups`' pairs (the model runs here)."""
        groups, shown, samples, encoded = prepared.groups, prepared.shown, prepared.samples, prepared.encoded
        cache, encoded_items = (self._pair_features(groups, shown, encoded) if reuse_visuals
                                else (None, [None] * len(groups)))
        cfg = dataclasses.replace(self.generation, num_return_sequences=1)
        texts = generate(self.bundle, encoded, cfg, visual_cache=cache, progress=progress,
                         desc=f"judging {len(encoded)} pairs")
        per_group: list[list[PairVerdict]] = [[] for _ in groups]
        for (gi, i, j, first), s, t in zip(shown, samples, texts):
            v = verdict_from_text(t[0], s.task, mode=self.mode, swapped=first != i)
            winner = i if v.winner == 1 else j if v.winner == 2 else v.winner
            per_group[gi].append(PairVerdict(i=i, j=j, first=first, winner=winner, verdict=v))
        out = []
        for gi, g in enumerate(groups):
            r = tally(len(g.candidates), per_group[gi], ties=ties)
            r.meta = {"key": g.key, "task": g.task, "verdicts": len(per_group[gi]),
                      "visual_items_encoded": encoded_items[gi]}
            out.append(r)
        return out

    def _pair_features(self, groups: list[Group], shown: list, encoded: list) -> tuple[Any, list]:
        """A VisualCache in which each candidate's (or the reference's) visual features are computed once
        per group and every pair's features are composed from them; also, per group, how many images /
        videos went through the vision tower. (None, ...) when this model's features cannot be cached (the
        reason logged once): the pairs then run the tower as `judge` does."""
        from urt.models.compat import warn_once
        from urt.rl.visual_cache import VisualCache, cache_blocker

        reason = cache_blocker(self.bundle.model, self.family, inference=True)
        if reason is not None:
            warn_once(f"judge: candidate visual features are not reused ({reason}); each pair runs the vision tower")
            return None, [None] * len(groups)
        cache = VisualCache(self.bundle.model, self.family, inference=True,
                            batch_size=max(1, int(self.generation.batch_size)))
        by_group: dict[int, list[tuple[int, int, Any]]] = {}
        for (gi, i, j, first), e in zip(shown, encoded):
            by_group.setdefault(gi, []).append((first, j if first == i else i, e))
        plans = []  # (group, sources, items per candidate) with sources[c] = (Encoded, position 0/1)
        todo: list = []
        for gi, pres in by_group.items():
            g = groups[gi]
            n_img, n_vid = _visual_counts(self.family, pres[0][2])
            if g.kind == "answers":  # one reference shared by every pair: encode it in the first one
                plans.append((gi, pres[0][2], (n_img, n_vid)))
                todo.append(pres[0][2])
                continue
            if n_img % 2 or n_vid % 2:  # e.g. the qwen3 set sends a video pair as one video: no per-candidate split
                warn_once(f"judge: {self.family} {g.task} pairs do not hold the two candidates as separate "
                          f"visuals; each pair runs the vision tower")
                plans.append((gi, None, None))
                continue
            src: dict[int, tuple[Any, int]] = {}
            for a, b, e in pres:  # a matching over the judged pairs covers (nearly) every candidate once
                if a not in src and b not in src:
                    src[a], src[b] = (e, 0), (e, 1)
            left = [c for c in range(len(g.candidates)) if c not in src]
            while len(left) >= 2:  # candidates the matching missed: pair them up in pairs of their own
                a, b = left.pop(0), left.pop(0)
                e = self.encoder(g.sample(a, b))
                src[a], src[b] = (e, 0), (e, 1)
            if left:  # an odd one out: any of its pairs (its partner is encoded a second time)
                a, b, e = next((a, b, e) for a, b, e in pres if left[0] in (a, b))
                src[left[0]] = (e, 0 if a == left[0] else 1)
            plans.append((gi, src, (n_img // 2, n_vid // 2)))
            todo += [e for e, _ in src.values()]
        unique = list({id(e.visual): e for e in todo}.values())
        cache.add(unique)
        counted: dict[int, int] = {}
        for gi, src, per in plans:
            if src is None:
                counted[gi] = None
                continue
            pres = by_group[gi]
            if groups[gi].kind == "answers":
                ref = src
                for _, _, e in pres:
                    cache.compose(e, images=[(ref, k) for k in range(per[0])],
                                  videos=[(ref, k) for k in range(per[1])])
                counted[gi] = sum(per)
                continue
            for a, b, e in pres:
                imgs, vids = [], []
                for c in (a, b):
                    se, pos = src[c]
                    imgs += [(se, pos * per[0] + k) for k in range(per[0])]
                    vids += [(se, pos * per[1] + k) for k in range(per[1])]
                cache.compose(e, images=imgs, videos=vids)
            mine = {id(e.visual): e for e, _ in src.values()}
            counted[gi] = sum(sum(_visual_counts(self.family, e)) for e in mine.values())
        return cache, [counted.get(gi) for gi in range(len(groups))]



def _visual_counts(family: str, e) -> tuple[int, int]:
    from urt.rl.visual_cache import item_counts

    return item_counts(family, e.visual) if e.visual else (0, 0)


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
