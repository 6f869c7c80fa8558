"""Prompt templates and chat rendering for UnifiedReward-Think (docs/method.md §Prompts).

The templates under `templates/<set>/<task>.txt` are byte-exact copies of the released prompts; a
model judges best on exactly the text it was trained on, so nothing here normalises whitespace or
line endings. Placeholders are filled with `str.format` semantics (the templates contain no other
braces; values are never re-parsed, so a caption containing `{x}` is inserted verbatim).
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping, Sequence

from urt.errors import UrtError

TASKS = ("image_generation", "video_generation", "image_understanding", "video_understanding")
TEMPLATE_SETS = ("paper", "qwen3", "implicit", "describe", "reason", "fields")
FAMILIES = ("llava_onevision", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
FIELDS = ("caption", "question", "answer1", "answer2")

# The fixed <answer> strings, per task: index 0 is candidate 1, index 1 candidate 2.
ANSWER_STRINGS: dict[str, tuple[str, str]] = {
    "image_generation": ("Image 1 is better", "Image 2 is better"),
    "video_generation": ("Video 1 is better", "Video 2 is better"),
    "image_understanding": ("Answer 1 is better", "Answer 2 is better"),
    "video_understanding": ("Answer 1 is better", "Answer 2 is better"),
}
# Templates urt adds to the released ones (not byte-checked against a reference): UnifiedReward's implicit set
# has no video-understanding prompt, so `implicit/video_understanding` is its image-understanding prompt with
# "image" read as "video" (the demo's stage-0 base model answers all four tasks directly).
# The `describe` set (visual grounding: "Describe the image." -> "The image shows a red circle.", the SampleEncoder's
# target "describe") is urt's own too: a short prompt that teaches perception cheaply before judging; `reason` is
# the same prompt asking for <think>/<answer> tags (target "reason": the description in a think block, then the
# answer), the stand-in for an instruct model's general format following. `fields` is only the field lines that
# end the paper prompts (their layout, brackets as each paper prompt has them): a sample's own instruction goes
# before them (`render_chat(preamble=...)`, the encoder's `meta["preamble"]`), as in varied instruction data.
URT_AUTHORED = (("implicit", "video_understanding"),
                *((s, t) for s in ("describe", "reason", "fields") for t in ("image_generation", "video_generation",
                                                                            "image_understanding",
                                                                            "video_understanding")))
# Only the implicit ("w/o CoT") generation prompts offer a tie; CoT mode has no tie string.
TIE_STRINGS: dict[str, str] = {
    "image_generation": "Both images are equally good",
    "video_generation": "Both videos are equally good",
}
ALL_ANSWER_STRINGS = tuple(sorted({s for pair in ANSWER_STRINGS.values() for s in pair}))

_DEFAULT_SET = {
    "llava_onevision": "paper",
    "qwen2_5_vl": "paper",
    "qwen3_vl": "qwen3",
    "qwen3_5": "qwen3",
}

# ChatML pieces. All four families speak ChatML; LLaVA's `qwen_1_5` conversation adds this system turn.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
LLAVA_SYSTEM = "You are a helpful assistant."
LLAVA_IMAGE = "<image>\n"
# The official LLaVA scripts write an image pair as "<image>\n <image>\n" (with the space); frames of a
# video are plain "<image>\n" * n_frames (infer_cot_video_*.py).
LLAVA_IMAGE_PAIR = "<image>\n <image>\n"


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise UrtError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise UrtError(f"unknown model family {family!r}; known families: {', '.join(FAMILIES)}")


def answer_string(task: str, winner: int) -> str:
    """The exact <answer> string saying candidate `winner` (1 or 2) is better for `task`."""
    _check_task(task)
    if isinstance(winner, bool) or winner not in (1, 2):
        raise UrtError(f"winner must be 1 or 2, got {winner!r}")
    return ANSWER_STRINGS[task][winner - 1]


def default_template_set(family: str) -> str:
    """The template set each released model family was trained with."""
    _check_family(family)
    return _DEFAULT_SET[family]


def _template_root():
    return resources.files("urt.prompts").joinpath("templates")


def available_templates() -> dict[str, tuple[str, ...]]:
    """{set: tasks that set has a template for}, in TEMPLATE_SETS / TASKS order."""
    root = _template_root()
    return {
        s: tuple(t for t in TASKS if root.joinpath(s, f"{t}.txt").is_file()) for s in TEMPLATE_SETS
    }


@lru_cache(maxsize=None)
def load_template(template_set: str, task: str) -> str:
    """Raw template text, byte-exact (decoded from bytes so no newline translation can happen)."""
    if template_set not in TEMPLATE_SETS:
        raise UrtError(
            f"unknown template set {template_set!r}; known sets: {', '.join(TEMPLATE_SETS)}"
        )
    _check_task(task)
    path = _template_root().joinpath(template_set, f"{task}.txt")
    if not path.is_file():
        have = available_templates()[template_set]
        raise UrtError(
            f"template set {template_set!r} has no template for task {task!r}; "
            f"it has: {', '.join(have)}"
        )
    return path.read_bytes().decode("utf-8")


def template_fields(template_set: str, task: str) -> tuple[str, ...]:
    """Placeholder names of a template, in order of first appearance."""
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(load_template(template_set, task)):
        if name is not None and name not in names:
            names.append(name)
    return tuple(names)


def render_text(
    template_set: str,
    task: str,
    *,
    caption: str | None = None,
    question: str | None = None,
    answer1: str | None = None,
    answer2: str | None = None,
) -> str:
    """Fill a template (the user text, without visual tokens). Values the template does not use are
    ignored, so one call signature serves all tasks; None means "not given" (an empty string is a
    legitimate value)."""
    given = {"caption": caption, "question": question, "answer1": answer1, "answer2": answer2}
    needed = template_fields(template_set, task)
    missing = [n for n in needed if given.get(n) is None]
    if missing:
        raise UrtError(
            f"template {template_set}/{task}.txt needs a value for placeholder(s) "
            f"{', '.join('{' + m + '}' for m in missing)}"
        )
    return load_template(template_set, task).format(**{n: given[n] for n in needed})


@dataclass
class ChatPrompt:
    """A rendered prompt. `text` is the full model input text (None for Qwen families when no
    processor was given: their chat template lives in the processor); `images`/`videos` are the
    visuals in the order their placeholders appear; `messages` are the chat messages for processor
    families (None for llava_onevision, whose text we render ourselves); `user_text` is the filled
    template alone. `assistant_prefix` is text the chat template already put after the assistant
    header (Qwen3.5-style templates end the generation prompt with "<think>\n"): the model's output
    continues it, so prepend it to generated text before parsing/scoring (`full_completion`) and
    remove it from SFT targets (`assistant_suffix(..., prefix=...)`)."""

    text: str | None
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    messages: list | None = None
    user_text: str = ""
    assistant_prefix: str = ""

    def full_completion(self, generated: str) -> str:
        """The completion as the rewards and parser must see it: prefix + generated text."""
        return self.assistant_prefix + generated


def _is_video(v: Any) -> bool:
    return isinstance(v, (list, tuple))


def _check_visuals(task: str, visuals: Sequence[Any]) -> list:
    if not isinstance(visuals, (list, tuple)):
        raise UrtError(f"visuals must be a list, got {type(visuals).__name__}")
    want = 2 if task.endswith("_generation") else 1
    if len(visuals) != want:
        raise UrtError(f"task {task!r} takes exactly {want} visual(s), got {len(visuals)}")
    video = task.startswith("video_")
    for i, v in enumerate(visuals, 1):
        if video:
            if not _is_video(v):
                raise UrtError(
                    f"visual {i} of task {task!r} must be a video given as a list of frames, "
                    f"got {type(v).__name__}"
                )
            if len(v) == 0:
                raise UrtError(f"visual {i} of task {task!r} is a video with no frames")
        else:
            if v is None or _is_video(v) or isinstance(v, Mapping):
                raise UrtError(
                    f"visual {i} of task {task!r} must be an image (PIL.Image or path), "
                    f"got {type(v).__name__}"
                )
            if isinstance(v, (str, os.PathLike)) and not str(v):
                raise UrtError(f"visual {i} of task {task!r} is an empty path")
    return list(visuals)


def _check_fields(fields: Mapping[str, Any]) -> dict:
    if not isinstance(fields, Mapping):
        raise UrtError(f"fields must be a dict, got {type(fields).__name__}")
    unknown = [k for k in fields if k not in FIELDS]
    if unknown:
        # A typo ("answer_1") would otherwise surface as a confusing "missing placeholder" error.
        raise UrtError(f"unknown prompt field(s) {unknown}; known fields: {', '.join(FIELDS)}")
    return dict(fields)


def render_chat(
    family: str,
    template_set: str,
    task: str,
    *,
    fields: Mapping[str, Any],
    visuals: Sequence[Any],
    processor: Any = None,
    add_generation_prompt: bool = True,
    preamble: str = "",
) -> ChatPrompt:
    """Render the model input for one judgement, the way each released family expects it.

    Visuals: generation tasks take two (images, or videos as lists of frames), understanding tasks
    one. Qwen families put visual items before the text in one user message and use the processor's
    chat template (we add no system message; Qwen2.5-VL's own template inserts its default one, as
    it did for the released model); with the `qwen3` set a video pair is sent as ONE video whose
    first half is video 1 and second half video 2, as the qwen3 prompt says. llava_onevision is
    rendered here as LLaVA's `qwen_1_5` ChatML conversation with `<image>` tokens per image/frame
    (`processor` is not needed and ignored; the HF processor expands each `<image>`). `preamble` is text put
    before the filled template (a sample's own instruction, e.g. before the `fields` set's field lines).
    """
    _check_family(family)
    if not isinstance(preamble, str):
        raise UrtError(f"preamble must be a string, got {type(preamble).__name__}")
    user_text = preamble + render_text(template_set, task, **_check_fields(fields))
    vis = _check_visuals(task, visuals)
    video = task.startswith("video_")

    if family == "llava_onevision":
        if video:
            images = [frame for v in vis for frame in v]
            tokens = LLAVA_IMAGE * len(images)
        else:
            images = vis
            tokens = LLAVA_IMAGE_PAIR if len(vis) == 2 else LLAVA_IMAGE
        text = (
            f"{IM_START}system\n{LLAVA_SYSTEM}{IM_END}\n"
            f"{IM_START}user\n{tokens}{user_text}{IM_END}\n"
        )
        if add_generation_prompt:
            text += f"{IM_START}assistant\n"
        return ChatPrompt(text=text, images=images, videos=[], messages=None, user_text=user_text)

    images: list = []
    videos: list = []
    if video:
        if template_set == "qwen3" and len(vis) == 2:
            if len(vis[0]) != len(vis[1]):
                raise UrtError(
                    f"template set 'qwen3' sends a video pair as one video split in halves, so both "
                    f"videos need the same number of frames; got {len(vis[0])} and {len(vis[1])}"
                )
            videos = [list(vis[0]) + list(vis[1])]
        else:
            videos = [list(v) for v in vis]
        items = [{"type": "video"} for _ in videos]
    else:
        images = vis
        items = [{"type": "image"} for _ in images]
    messages = [{"role": "user", "content": [*items, {"type": "text", "text": user_text}]}]
    text = None
    prefix = ""
    if processor is not None:
        text = processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **chat_template_kwargs(family)
        )
        if add_generation_prompt:
            prefix = assistant_prefix(text)
    return ChatPrompt(
        text=text, images=images, videos=videos, messages=messages, user_text=user_text,
        assistant_prefix=prefix,
    )


_ASSISTANT_HEADER = f"{IM_START}assistant\n"
# Chat-template options per family, as the released checkpoints are served. UnifiedReward-Think-qwen35's
# official serving config passes enable_thinking: false: the template then closes an empty think block
# ("<think>\n\n</think>\n\n") and the model writes the paper's whole "<think>…</think><answer>…</answer>"
# itself, so the rewards and the parser see every tag it wrote (with thinking on, the template would open the
# block and the completion would be a tag short).
CHAT_TEMPLATE_KWARGS: dict[str, dict] = {"qwen3_5": {"enable_thinking": False}}
_CLOSED_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")


def chat_template_kwargs(family: str) -> dict:
    return dict(CHAT_TEMPLATE_KWARGS.get(family, {}))


def assistant_prefix(text: str) -> str:
    """What a chat template wrote after the final assistant header of a generation prompt that the model's
    output continues (an opened `<think>\n`). A closed, empty think block (a no-thinking template) is part of
    the prompt, not of the answer: the model writes its own block after it, so the prefix is empty."""
    if not isinstance(text, str):
        return ""
    i = text.rfind(_ASSISTANT_HEADER)
    opened = "" if i < 0 else text[i + len(_ASSISTANT_HEADER):]
    return "" if _CLOSED_EMPTY_THINK.fullmatch(opened) else opened


def assistant_suffix(family: str, completion: str, *, prefix: str = "") -> str:
    """Text appended after a generation prompt to form an SFT target: the completion and the ChatML
    end-of-turn. All four families close a turn with `<|im_end|>\\n`; the `<|im_end|>` is part of the
    target so the model learns to stop. Processor chat templates that rewrite assistant turns (e.g.
    Qwen3-style templates that move a `<think>` block or open one in the generation prompt)
    are not modelled here beyond `prefix`: pass `ChatPrompt.assistant_prefix`, and the target,
    which must start with it, is returned without it (the prompt text already holds it)."""
    _check_family(family)
    if not isinstance(completion, str):
        raise UrtError(f"completion must be a string, got {type(completion).__name__}")
    if prefix:
        if not completion.startswith(prefix):
            raise UrtError(
                f"SFT target must start with the chat template's assistant prefix {prefix!r}; "
                f"it starts with {completion[:len(prefix) + 10]!r}"
            )
        completion = completion[len(prefix):]
    return f"{completion}{IM_END}\n"
