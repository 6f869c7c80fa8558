"""Request -> model input: OpenAI chat messages to a prompt-mode `Encoded`, and the sampling fields.

OpenAI messages (roles system / developer / user / assistant; content a string or a list of
`{"type": "text"}`, `{"type": "image_url"}` and `{"type": "video_url"}` parts, visuals only in user turns;
see `urt.serve.media` for the URLs accepted and how they are read) become

* Qwen families: chat messages with `{"type": "image"}` / `{"type": "video"}` items and text items in the
  order given, run through the processor's own chat template (no system message added, as
  `urt.prompts.render_chat`); a video goes to the processor with its kept frames' rate and
  `do_sample_frames=False`, as `urt.data.encode` passes dataset videos;
* llava_onevision: LLaVA's `qwen_1_5` ChatML, rendered here with the constants of `urt.prompts.render`
  (system turn "You are a helpful assistant." unless the request has one; per user turn the image tokens
  first, `<image>\\n <image>\\n` for exactly two images, else `<image>\\n` per image/frame, then the
  text; a video's frames count as images, as the official video scripts send them), images passed to the
  processor as one nested list (one multi-image prompt).

The result is a prompt-mode `urt.data.encode.Encoded` (all labels -100, `meta["assistant_prefix"]` the
text the chat template opened the assistant turn with, e.g. Qwen3.5's `<think>\\n`), so `generate()`
batches it like any dataset prompt. Every count and size limit (`urt.serve.limits.Limits`) is checked
while parsing, before anything is decoded or tokenised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from urt.serve.errors import RequestError
from urt.serve.limits import Limits
from urt.serve.media import Clip, MediaReader, PixelBudget

ROLES = ("system", "developer", "user", "assistant")
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")
# Request fields we cannot honour: refusing them beats silently ignoring them.
_UNSUPPORTED = {
    "stream": "streaming is not supported; send stream=false (or leave it out)",
    "tools": "tool calls are not supported",
    "functions": "function calls are not supported",
    "logprobs": "logprobs are not supported",
    "stop": "custom stop sequences are not supported (generation stops at <|im_end|> / eos)",
}


@dataclass
class _Turn:
    role: str
    parts: list  # ("text", str) | ("image", PIL.Image) | ("video", Clip)


def parse_messages(messages: Any, *, limits: Limits | None = None, media: MediaReader | None = None) -> list[_Turn]:
    """Validate OpenAI chat messages and decode their visuals with `media` (default: data URLs only,
    under `limits`)."""
    limits = limits or (media.limits if media is not None else Limits())
    media = media or MediaReader(limits)
    if messages is None:
        raise RequestError("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    for kind, name in (("image_url", "max_images"), ("video_url", "max_videos")):
        count = _count_parts(messages, kind)
        if count > getattr(limits, name):  # counted before any visual is decoded
            raise limits.refuse(name, f"{count} {kind} parts in one request", param="messages")
    budget = PixelBudget(limits)
    turns: list[_Turn] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", param=where)
        role = msg.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role {role!r} is not supported; use one of {', '.join(ROLES)}",
                               param=f"{where}.role")
        role = "system" if role == "developer" else role
        content = msg.get("content")
        parts: list = []
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            parts.append(("text", content))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                if not isinstance(part, dict):
                    raise RequestError(f"{pw} must be an object with a 'type'", param=pw)
                kind = part.get("type")
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise RequestError(f"{pw}.text must be a string", param=pw)
                    parts.append(("text", text))
                elif kind in ("image_url", "video_url"):
                    visual = kind.removesuffix("_url")
                    if role != "user":
                        raise RequestError(f"{pw}: {visual}s are only accepted in user messages", param=pw)
                    spec = part.get(kind)
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    if kind == "image_url":
                        parts.append(("image", media.image(url, f"{pw}.image_url", budget)))
                    else:
                        parts.append(("video", media.video(url, f"{pw}.video_url", budget)))
                else:
                    raise RequestError(
                        f"{pw}: content part type {kind!r} is not supported; use 'text', 'image_url' or "
                        f"'video_url' (or send video frames as several image_url parts)", param=pw)
        else:
            raise RequestError(f"{where}.content must be a string or a list of content parts",
                               param=f"{where}.content")
        turns.append(_Turn(role, parts))
    return turns


def _count_parts(messages: list, kind: str) -> int:
    return sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") == kind)


def _text_of(parts: list) -> str:
    return "\n".join(p for k, p in parts if k == "text")


def _llava_prompt(turns: list[_Turn]) -> tuple[str, list]:
    from urt.prompts.render import IM_END, IM_START, LLAVA_IMAGE, LLAVA_IMAGE_PAIR, LLAVA_SYSTEM

    images: list = []
    text = ""
    if not turns or turns[0].role != "system":
        text += f"{IM_START}system\n{LLAVA_SYSTEM}{IM_END}\n"
    for t in turns:
        imgs = [f for k, p in t.parts if k in ("image", "video") for f in (p.frames if k == "video" else [p])]
        tokens = LLAVA_IMAGE_PAIR if len(imgs) == 2 else LLAVA_IMAGE * len(imgs)
        images += imgs
        text += f"{IM_START}{t.role}\n{tokens}{_text_of(t.parts)}{IM_END}\n"
    return text + f"{IM_START}assistant\n", images


def _qwen_messages(turns: list[_Turn]) -> tuple[list, list, list[Clip]]:
    messages: list = []
    images: list = []
    videos: list[Clip] = []
    for t in turns:
        items = []
        for kind, p in t.parts:
            if kind == "image":
                images.append(p)
                items.append({"type": "image"})
            elif kind == "video":
                videos.append(p)
                items.append({"type": "video"})
            else:
                items.append({"type": "text", "text": p})
        messages.append({"role": t.role, "content": items})
    return messages, images, videos


def _video_kwargs(videos: list[Clip]) -> dict:
    from transformers.video_utils import VideoMetadata

    frames = [list(v.frames) for v in videos]
    return {"videos": frames, "do_sample_frames": False, "video_metadata": [
        VideoMetadata(total_num_frames=len(f), fps=v.fps, frames_indices=list(range(len(f))),
                      width=f[0].width, height=f[0].height, duration=len(f) / v.fps)
        for f, v in zip(frames, videos)]}


def encode_messages(bundle, messages: Any, *, key: str = "request", limits: Limits | None = None,
                    media: MediaReader | None = None):
    """OpenAI chat messages -> a prompt-mode `Encoded` for `bundle` (see the module docstring).
    Raises RequestError (4xx) for anything the client got wrong or that is over `limits`."""
    import torch

    from urt.data.encode import IGNORE_INDEX, Encoded
    from urt.prompts.render import assistant_prefix, chat_template_kwargs

    limits = limits or (media.limits if media is not None else Limits())
    turns = parse_messages(messages, limits=limits, media=media)
    family = bundle.family
    processor = bundle.processor
    kw: dict[str, Any] = {}
    n_videos = 0
    if family == "llava_onevision":
        text, images = _llava_prompt(turns)
        if images:
            kw["images"] = [images]
        prefix = ""
    else:
        msgs, images, videos = _qwen_messages(turns)
        try:
            text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                 **chat_template_kwargs(family))
        except Exception as err:  # noqa: BLE001 - jinja raises TemplateError etc. for odd conversations
            raise RequestError(f"the {family} chat template rejected these messages "
                               f"({type(err).__name__}: {err})", param="messages") from None
        if images:
            kw["images"] = images
        if videos:
            kw.update(_video_kwargs(videos))
            n_videos = len(videos)
        prefix = assistant_prefix(text)
    try:
        out = processor(text=[text], return_tensors="pt", **kw)
    except Exception as err:  # noqa: BLE001 - processors raise many types on unusual images
        raise RequestError(f"the {family} processor could not encode this request "
                           f"({type(err).__name__}: {err})", param="messages") from None
    input_ids = out["input_ids"][0].long()
    if limits.max_prompt_tokens is not None and len(input_ids) > limits.max_prompt_tokens:
        raise limits.refuse("max_prompt_tokens", f"the prompt is {len(input_ids)} tokens (images and videos "
                            f"included)", param="messages", code="context_length_exceeded")
    mm = out.get("mm_token_type_ids")
    mm = mm[0].long() if mm is not None else None
    if mm is None and family in QWEN_FAMILIES:
        mm = torch.zeros_like(input_ids)  # keep every Qwen prompt batchable with every other
    visual = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in out.items()
              if k not in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")}
    return Encoded(key=key, task="chat", label="", input_ids=input_ids,
                   labels=torch.full_like(input_ids, IGNORE_INDEX), visual=visual, mm_token_type_ids=mm,
                   prompt_length=int(input_ids.shape[0]),
                   meta={"assistant_prefix": prefix, "mode": "prompt", "n_images": len(images),
                         "n_videos": n_videos})


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    seed: int | None

    def group_key(self) -> tuple:
        # Greedy decoding ignores top_p and the seed: all greedy requests of a length batch together.
        if self.temperature == 0.0:
            return (self.max_tokens, 0.0, 1.0, self.n, None)
        return (self.max_tokens, self.temperature, self.top_p, self.n, self.seed)


def _number(body: dict, name: str, default, *, kind=float, lo=None, hi=None, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                           param=name)
    value = kind(value)
    if value != value or (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise RequestError(f"'{name}' must be in {rng}, got {value!r}", param=name)
    return value


def parse_sampling(body: dict, *, default_max_tokens: int, default_temperature: float, default_top_p: float,
                   default_seed: int | None, limits: Limits | None = None) -> SamplingParams:
    limits = limits or Limits()
    for name, why in _UNSUPPORTED.items():
        v = body.get(name)
        if v not in (None, False, [], ""):
            raise RequestError(f"'{name}': {why}", param=name, code="unsupported_parameter")
    mt = body.get("max_completion_tokens")
    name = "max_completion_tokens" if mt is not None else "max_tokens"
    max_tokens = int(_number(body, name, default_max_tokens, kind=int, lo=1))
    if max_tokens > limits.max_tokens:
        raise limits.refuse("max_tokens", f"'{name}' is {max_tokens}", param=name)
    n = int(_number(body, "n", 1, kind=int, lo=1))
    if n > limits.max_n:
        raise limits.refuse("max_n", f"'n' is {n}", param="n")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", default_temperature, lo=0.0, hi=2.0)),
        top_p=float(_number(body, "top_p", default_top_p, lo=0.0, hi=1.0, lo_open=True)),
        n=n,
        seed=_number(body, "seed", default_seed, kind=int, lo=-(2 ** 63), hi=2 ** 64 - 1),
    )
