"""Sample -> model tokens: render the prompt for a family, run the family's processor once, and mark
which tokens are supervised.

`SampleEncoder(processor, family, mode=..., target=..., max_length=...)(sample)` gives an `Encoded`:
`input_ids`, `labels` (-100 except the assistant target and its closing `<|im_end|>`), the processor's
visual tensors for this one sample, `mm_token_type_ids` (Qwen families), `prompt_length`.

Two rules that peers got wrong and we design out:

* **Never truncate.** A sample longer than `max_length` raises `OverlongSample` (key, length); the data
  layer filters and counts those. Cutting a sequence can cut visual placeholder tokens, after which
  the model's "image features and image tokens do not match" (or, worse, silently wrong mRoPE).
* **Exact label boundary.** The prompt length is not guessed from string lengths: the prompt-only text
  and the full text are tokenised (placeholders unexpanded, which is how the tokenizer sees everything
  but the visual placeholders) and the prompt ids must be a prefix of the full ids; the processor
  expands placeholders inside the prompt only, so the target's token ids are checked to be the tail
  of the processor's `input_ids`. Any disagreement raises instead of mislabelling.

Videos arrive decoded (`Video(frames=...)`, `fps` = rate of the kept frames, see
`urt.data.shards`). Qwen families get them as videos with `VideoMetadata(fps=Video.fps,
frames_indices=0..n-1)` and `do_sample_frames=False`, so the processor neither resamples them nor
falls back to fps=24 for Qwen3-VL's timestamps; a video without fps is taken to be `DEFAULT_VIDEO_FPS`
(recorded in `meta["assumed_fps"]`). llava_onevision gets video frames as images (the prompt layer
writes `<image>\\n` per frame, as the official scripts do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from urt.data.schema import Sample, Video
from urt.errors import UrtError
from urt.prompts import (
    TIE_STRINGS,
    answer_string,
    assistant_suffix,
    default_template_set,
    render_chat,
)

MODES = ("sft", "prompt")
TARGETS = ("cot", "answer", "describe", "reason")
IGNORE_INDEX = -100


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: positions t whose next label (t+1) is supervised (the positions that get a loss)."""
    nxt = labels[:, 1:] != IGNORE_INDEX
    return torch.cat([nxt, torch.zeros_like(nxt[:, :1])], dim=1)


IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Frame rate assumed for a video whose `fps` is unknown (Qwen2-VL's video processor default).
DEFAULT_VIDEO_FPS = 2.0
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")
# Processor outputs that are text-side; everything else the processor returns is a visual tensor.
_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class OverlongSample(UrtError):
    """A sample longer than `max_length` tokens. Raised instead of truncating (truncation can cut
    visual placeholder tokens); the data layer filters and counts these."""

    def __init__(self, key: str, length: int, max_length: int):
        self.key = key
        self.length = int(length)
        self.max_length = int(max_length)
        super().__init__(
            f"sample {key!r}: {self.length} tokens is longer than max_length={self.max_length}; "
            f"samples are never truncated (that would cut visual tokens): filter it or raise max_length"
        )

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.key, self.length, self.max_length))


@dataclass
class Encoded:
    key: str
    task: str
    label: int | str
    input_ids: torch.LongTensor  # (L,)
    labels: torch.LongTensor  # (L,) -100 except the supervised target tokens
    visual: dict[str, torch.Tensor]  # the processor's non-text outputs for this sample
    mm_token_type_ids: torch.LongTensor | None  # (L,) Qwen families: 0 text, 1 image, 2 video
    prompt_length: int  # tokens before the target (== L in prompt mode)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


# Targets with prompts of their own: "describe" its set; "reason" its set, or the bare `fields` after a sample's
# own instruction (meta["preamble"]).
_OWN_SETS = {"describe": ("describe",), "reason": ("reason", "fields")}


def _tie_string(task: str, template_set: str) -> str | None:
    """The tie answer string when the template set offers one (only the implicit generation prompts)."""
    if template_set == "implicit" and task in TIE_STRINGS:
        return TIE_STRINGS[task]
    return None


class SampleEncoder:
    """Encode `Sample`s for one model family (see the module docstring).

    mode "sft": prompt + target, labels on the target tokens and the closing `<|im_end|>` (not the
    newline after it). mode "prompt": the generation prompt only (rollouts, evaluation), no labels.
    target "cot": `sample.cot` is the target (UrtError naming the key if missing); "answer": the answer
    string for the label (direct-answer / implicit training): the bare string with the `implicit`
    template set (whose prompts ask for it bare), `<answer>…</answer>` with the CoT sets; a "tie" label
    needs a set that offers a tie string (implicit, generation tasks); "describe" (visual grounding): the
    `describe` prompts ("Describe the image.") and `sample.meta["describe"]` as the target; "reason": the
    `reason` prompts (the describe prompt plus an instruction to use <think>/<answer> tags) and
    "<think>\n{meta['describe']}\n</think>\n<answer>{answer}</answer>". A sample whose `meta["target"]`
    names another target is encoded with that target (and its prompts), one whose `meta["template_set"]`
    names another template set with those prompts: one shard set can mix, e.g., cold-start CoTs with
    replayed grounding samples and replayed direct answers under the implicit prompts. `meta["preamble"]` is
    text put before the filled template (a "reason" sample may use the bare `fields` set after it: the demo's
    instructed grounding pairs).

    Qwen3.5 renders as its released checkpoints are served, `enable_thinking=False`
    (`urt.prompts.render.CHAT_TEMPLATE_KWARGS`): the template closes an empty think block and the target is
    the whole `<think>…</think><answer>…</answer>`. A thinking template that opens the assistant turn with
    `<think>\\n` (`ChatPrompt.assistant_prefix`) makes a CoT target start with that prefix (a target starting
    `<think>` without the newline is accepted: the prefix replaces `<think>` plus any whitespace after it,
    recorded in `meta["target_normalised"]`), and "answer"/"describe" targets then use its no-think form.
    `meta["assistant_prefix"]` is what generated text must be prefixed with before parsing."""

    def __init__(self, processor, family: str, *, template_set: str | None = None, mode: str = "sft",
                 target: str = "cot", max_length: int | None = None):
        if mode not in MODES:
            raise UrtError(f"unknown encoding mode {mode!r}; known modes: {', '.join(MODES)}")
        if target not in TARGETS:
            raise UrtError(f"unknown target {target!r}; known targets: {', '.join(TARGETS)}")
        if max_length is not None and (isinstance(max_length, bool) or int(max_length) < 1):
            raise UrtError(f"max_length must be a positive integer or None, got {max_length!r}")
        self.processor = processor
        self.family = family
        if target in _OWN_SETS and template_set not in (None, *_OWN_SETS[target]):
            raise UrtError(f"target {target!r} uses the {' or '.join(repr(x) for x in _OWN_SETS[target])} prompts, "
                           f"not template set {template_set!r}")
        self.template_set = template_set or (target if target in ("describe", "reason") else default_template_set(family))
        self.mode = mode
        self.target = target
        self.max_length = None if max_length is None else int(max_length)
        self._by_target: dict[tuple[str, str | None], SampleEncoder] = {}
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.im_end_id = self.tokenizer.convert_tokens_to_ids(IM_END)
        start_id = self.tokenizer.convert_tokens_to_ids(IM_START)
        self._split_at_im_start = start_id is not None and start_id != self.tokenizer.unk_token_id  # _target_span
        if self.im_end_id is None or self.im_end_id == self.tokenizer.unk_token_id:
            raise UrtError(f"the {family} tokenizer has no {IM_END} token; urt's families all speak ChatML")

    # ------------------------------------------------------------------------------------- target

    def target_text(self, sample: Sample) -> str:
        """The assistant completion this sample is trained on (before the chat template's prefix is
        removed and `<|im_end|>` added)."""
        if self.target in ("describe", "reason"):
            text = sample.meta.get("describe") if isinstance(sample.meta, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise UrtError(f"sample {sample.key!r}: target {self.target!r} needs meta['describe'] (what the "
                               f"visuals show, e.g. 'The image shows a red circle.'), but the sample has none")
            if sample.meta.get("swapped"):  # the description names positions: the swapped pair needs its own
                text = sample.meta.get("describe_swapped")
                if not isinstance(text, str) or not text.strip():
                    raise UrtError(f"sample {sample.key!r}: presented swapped, but it has no meta['describe_swapped'] "
                                   f"(meta['describe'] names the candidates in their stored order); use order=keep")
            if self.target == "describe":
                return text
            if sample.label not in (1, 2):
                raise UrtError(f"sample {sample.key!r}: target 'reason' needs label 1 or 2, got {sample.label!r}")
            return f"<think>\n{text}\n</think>\n<answer>{answer_string(sample.task, int(sample.label))}</answer>"
        if self.target == "cot":
            if not isinstance(sample.cot, str) or not sample.cot.strip():
                raise UrtError(f"sample {sample.key!r}: target 'cot' needs a CoT trace, but the sample has none "
                               f"(use target='answer' for direct-answer training, or distill CoTs first)")
            return sample.cot
        if sample.label == "tie":
            tie = _tie_string(sample.task, self.template_set)
            if tie is None:
                raise UrtError(
                    f"sample {sample.key!r}: label 'tie' has no answer string with template set "
                    f"{self.template_set!r} and task {sample.task!r} (only the 'implicit' generation "
                    f"prompts offer a tie); drop ties from training data or use template_set='implicit'"
                )
            ans = tie
        else:
            ans = answer_string(sample.task, int(sample.label))
        return ans if self.template_set == "implicit" else f"<answer>{ans}</answer>"

    # ------------------------------------------------------------------------------------- visuals

    @staticmethod
    def _video_rates(sample: Sample, n_videos: int) -> tuple[list[float], float | None]:
        """Frame rate of each of the prompt's videos and the rate assumed for unknown ones (or None)."""
        src = [v for v in sample.visuals if isinstance(v, Video)]
        if n_videos == len(src):
            rates = [v.fps for v in src]
        else:  # qwen3 set: a video pair was sent as one video (video 1 then video 2)
            known = [v.fps for v in src if v.fps]
            rates = [known[0] if known else None] * n_videos
        if all(r and r > 0 for r in rates):
            return [float(r) for r in rates], None
        return [float(r) if r and r > 0 else DEFAULT_VIDEO_FPS for r in rates], DEFAULT_VIDEO_FPS

    def _processor_inputs(self, sample: Sample, prompt) -> tuple[dict, dict]:
        kw: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        if prompt.images:
            # One nested list = one sample's images: LLaVA-OV's processor then knows a pair / the frames
            # are a multi-image prompt (base view, 1 crop each, as the model expects), not n separate
            # single-image prompts (anyres crops each).
            kw["images"] = [list(prompt.images)] if self.family == "llava_onevision" else list(prompt.images)
        if prompt.videos:
            from transformers.video_utils import VideoMetadata

            rates, assumed = self._video_rates(sample, len(prompt.videos))
            videos = [list(v) for v in prompt.videos]
            kw["videos"] = videos
            kw["video_metadata"] = [
                VideoMetadata(total_num_frames=len(v), fps=r, frames_indices=list(range(len(v))),
                              width=v[0].width, height=v[0].height, duration=len(v) / r)
                for v, r in zip(videos, rates)
            ]
            kw["do_sample_frames"] = False
            if assumed is not None:
                meta["assumed_fps"] = assumed
        return kw, meta

    # ------------------------------------------------------------------------------------- encode

    def _render(self, sample: Sample):
        visuals = [v.frames if isinstance(v, Video) else v for v in sample.visuals]
        for v in sample.visuals:
            if isinstance(v, Video) and v.frames is None:
                raise UrtError(f"sample {sample.key!r}: video is still encoded ({v.format} bytes); decode and "
                               f"sample its frames before encoding (urt.data.shards does this when reading)")
        try:
            preamble = sample.meta.get("preamble", "") if isinstance(sample.meta, dict) else ""
            prompt = render_chat(self.family, self.template_set, sample.task, fields=sample.fields(),
                                 visuals=visuals, processor=self.processor, add_generation_prompt=True,
                                 preamble=preamble)
        except UrtError as err:
            raise UrtError(f"sample {sample.key!r}: {err}") from None
        if self.target in ("answer", "describe") and prompt.assistant_prefix and prompt.messages is not None:
            # A thinking template opens "<think>\n"; direct answers use its no-think form.
            text = self.processor.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True,
                                                      enable_thinking=False)
            opened = text[text.rfind("<|im_start|>assistant\n") + len("<|im_start|>assistant\n"):]
            if opened.strip() and not opened.strip().endswith("</think>"):
                raise UrtError(f"sample {sample.key!r}: the {self.family} chat template opens {opened!r} for the "
                               f"assistant even with enable_thinking=False; it cannot train direct answers")
            prompt.text = text
            prompt.assistant_prefix = ""
        if not isinstance(prompt.text, str):
            raise UrtError(f"sample {sample.key!r}: the {self.family} processor rendered no prompt text")
        return prompt

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _for_sample(self, sample: Sample) -> "SampleEncoder":
        """The encoder for this sample: itself, or a cached one for the target and/or template set the sample
        names in ``meta["target"]`` / ``meta["template_set"]`` (e.g. replayed grounding samples, or the base's
        direct-answer pairs under the implicit prompts, mixed into cold-start CoT shards)."""
        meta = sample.meta if isinstance(sample.meta, dict) else {}
        want, tset = meta.get("target"), meta.get("template_set")
        if (want is None or want == self.target) and (tset is None or tset == self.template_set):
            return self
        want = want or self.target
        if want not in TARGETS:
            raise UrtError(f"sample {sample.key!r}: meta['target'] {want!r} is not a target; known targets: "
                           f"{', '.join(TARGETS)}")
        own = want in ("describe", "reason")  # these targets have their own prompts ("reason" also the `fields`)
        if own and tset is not None and tset not in _OWN_SETS[want]:
            raise UrtError(f"sample {sample.key!r}: meta['template_set'] {tset!r} with target {want!r}, which takes "
                           f"the {' or '.join(repr(x) for x in _OWN_SETS[want])} prompts")
        template_set = (tset if own and tset is not None else None) if own else (tset or self.template_set)
        sub = self._by_target.get((want, template_set))
        if sub is None:
            sub = self._by_target[want, template_set] = SampleEncoder(
                self.processor, self.family, template_set=template_set, mode=self.mode, target=want,
                max_length=self.max_length)
        return sub

    def __call__(self, sample: Sample) -> Encoded:
        enc = self._for_sample(sample)
        if enc is not self:
            return enc(sample)
        key = sample.key
        prompt = self._render(sample)
        meta: dict[str, Any] = {"source": sample.source, "template_set": self.template_set, "mode": self.mode,
                                "assistant_prefix": prompt.assistant_prefix, "sample_meta": dict(sample.meta)}
        full_text = prompt.text
        suffix = ""
        if self.mode == "sft":
            target = self.target_text(sample)
            prefix = prompt.assistant_prefix
            if prefix and not target.startswith(prefix) and target.startswith(prefix.strip()):
                # "<think>Image 1..." under a template that already wrote "<think>\n".
                target = prefix + target[len(prefix.strip()):].lstrip()
                meta["target_normalised"] = True
            try:
                suffix = assistant_suffix(self.family, target, prefix=prefix)
            except UrtError as err:
                raise UrtError(f"sample {key!r}: {err}") from None
            meta["target_text"] = suffix[: -len(f"{IM_END}\n")]
            full_text = prompt.text + suffix

        kw, vmeta = self._processor_inputs(sample, prompt)
        meta.update(vmeta)
        try:
            out = self.processor(text=[full_text], return_tensors="pt", **kw)
        except Exception as err:  # processors raise ValueError/TypeError/RuntimeError on bad visuals
            raise UrtError(f"sample {key!r}: the {self.family} processor failed "
                           f"({type(err).__name__}: {err})") from None
        input_ids = out["input_ids"][0].long()
        L = int(input_ids.shape[0])
        if self.max_length is not None and L > self.max_length:
            raise OverlongSample(key, L, self.max_length)

        labels = torch.full_like(input_ids, IGNORE_INDEX)
        prompt_length = L
        if self.mode == "sft":
            prompt_length, end = self._target_span(key, prompt.text, full_text, input_ids)
            labels[prompt_length:end] = input_ids[prompt_length:end]

        mm = out.get("mm_token_type_ids")
        mm = mm[0].long() if mm is not None else None
        visual = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v))
                  for k, v in out.items() if k not in _TEXT_KEYS}
        return Encoded(key=key, task=sample.task, label=sample.label, input_ids=input_ids, labels=labels,
                       visual=visual, mm_token_type_ids=mm, prompt_length=prompt_length, meta=meta)

    def _target_span(self, key: str, prompt_text: str, full_text: str, input_ids: torch.Tensor) -> tuple[int, int]:
        """(prompt_length, end) of the supervised span in the processor's `input_ids`: the target tokens
        and the closing `<|im_end|>`; verified against plain tokenisation, raising on any mismatch.

        Only the text from the prompt's last `<|im_start|>` on is tokenised: the tokenizer splits on its added
        tokens before anything else, so the tokens after one do not depend on the text before it (the long
        prompt, visual placeholders included, would cost two more full tokenisations per sample)."""
        cut = max(prompt_text.rfind(IM_START), 0) if self._split_at_im_start else 0
        p_ids = self._tokenize(prompt_text[cut:])
        f_ids = self._tokenize(full_text[cut:])
        if f_ids[: len(p_ids)] != p_ids:
            raise UrtError(
                f"sample {key!r}: the prompt's tokens are not a prefix of the prompt+target tokens (the "
                f"target merges with the end of the prompt in tokenisation); cannot place the label boundary"
            )
        tail = f_ids[len(p_ids):]
        n_tail = len(tail)
        L = int(input_ids.shape[0])
        if n_tail == 0 or n_tail > L or input_ids[L - n_tail:].tolist() != tail:
            raise UrtError(
                f"sample {key!r}: the processor's input_ids do not end with the target's tokens; cannot "
                f"place the label boundary exactly"
            )
        prompt_length = L - n_tail
        ends = [i for i, t in enumerate(tail) if t == self.im_end_id]
        if not ends:
            raise UrtError(f"sample {key!r}: the target has no {IM_END} token after tokenisation")
        end = prompt_length + ends[-1] + 1
        rest = self.tokenizer.decode(tail[ends[-1] + 1:])
        if rest.strip():
            raise UrtError(f"sample {key!r}: unexpected text after the target's {IM_END}: {rest!r}")
        return prompt_length, end
