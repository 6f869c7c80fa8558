"""Request -> model input: OpenAI chat messages to a prompt-mode `Encoded`, and the sampling fields.

OpenAI messages (roles system / developer / user / assistant; content a string or a list of
`{"type": "text"}` and `{"type": "image_url"}` parts, images only in user turns, only
`data:image/...;base64,` URLs: nothing is fetched) become

* Qwen families: chat messages with `{"type": "image"}` items and text items in the order given, run
  through the processor's own chat template (no system message added, as `urt.prompts.render_chat`);
* llava_onevision: LLaVA's `qwen_1_5` ChatML, rendered here with the constants of `urt.prompts.render`
  (system turn "You are a helpful assistant." unless the request has one; per user turn the image tokens
  first, `<image>\\n <image>\\n` for exactly two images, else `<image>\\n` per image/frame, then the
  text), images passed to the processor as one nested list (one multi-image prompt).

The result is a prompt-mode `urt.data.encode.Encoded` (all labels -100, `meta["assistant_prefix"]` the
text the chat template opened the assistant turn with, e.g. Qwen3.5's `<think>\\n`), so `generate()`
batches it like any dataset prompt.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from urt.errors import UrtError
from urt.serve.errors import RequestError

ROLES = ("system", "developer", "user", "assistant")
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")
MAX_N = 16
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.DOTALL)
# Request fields we cannot honour: refusing them beats silently ignoring them.
_UNSUPPORTED = {
    "stream": "streaming is not supported; send stream=false (or leave it out)",
    "tools": "tool calls are not supported",
    "functions": "function calls are not supported",
    "logprobs": "logprobs are not supported",
    "stop": "custom stop sequences are not supported (generation stops at <|im_end|> / eos)",
}




def decode_data_url(url: Any, *, where: str = "image_url"):
    """A `data:image/...;base64,...` URL -> RGB PIL image; anything else -> RequestError (400)."""
    from urt.data.schema import load_image

    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}: the image url must be a non-empty string", param=where)
    head = url[:16].lower()
    if head.startswith(("http://", "https://", "file:", "ftp://")):
        raise RequestError(
            f"{where}: only base64 data URLs (data:image/png;base64,...) are accepted; this server fetches "
            f"nothing from the network or disk (got {url[:40]!r}...)", param=where, code="unsupported_image_url")
    m = _DATA_URL.match(url)
    if m is None:
        raise RequestError(f"{where}: not a data URL (expected data:image/<type>;base64,<data>)", param=where)
    mime = m.group("mime").strip().lower()
    params = [p.strip().lower() for p in m.group("params").split(";") if p.strip()]
    if mime and not mime.startswith("image/"):
        raise RequestError(f"{where}: data URL media type {mime!r} is not an image", param=where)
    if "base64" not in params:
        raise RequestError(f"{where}: the data URL must be base64-encoded (data:image/png;base64,...)", param=where)
    data = re.sub(r"\s+", "", m.group("data"))
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"{where}: invalid base64 image data ({err})", param=where,
                           code="invalid_image") from None
    if not raw:
        raise RequestError(f"{where}: empty image data", param=where, code="invalid_image")
    try:
        return load_image(raw, where=where)
    except UrtError as err:
        raise RequestError(str(err), param=where, code="invalid_image") from None


@dataclass
class _Turn:
    role: str
    parts: list  # ("text", str) | ("image", PIL.Image)


def parse_messages(messages: Any, *, max_images: int = 64) -> list[_Turn]:
    """Validate OpenAI chat messages and decode their images."""
    if messages is None:
        raise RequestError("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    turns: list[_Turn] = []
    n_images = 0
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
                elif kind == "image_url":
                    if role != "user":
                        raise RequestError(f"{pw}: images are only accepted in user messages", param=pw)
                    spec = part.get("image_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    n_images += 1
                    if n_images > max_images:
                        raise RequestError(f"too many images in one request (limit {max_images})", param=pw)
                    parts.append(("image", decode_data_url(url, where=f"{pw}.image_url")))
                else:
                    raise RequestError(
                        f"{pw}: content part type {kind!r} is not supported; use 'text' or 'image_url' "
                        f"(send video frames as several image_url parts)", param=pw)
        else:
            raise RequestError(f"{where}.content must be a string or a list of content parts",
                               param=f"{where}.content")
        turns.append(_Turn(role, parts))
    return turns


def _text_of(parts: list) -> str:
    return "\n".join(p for k, p in parts if k == "text")


def _llava_prompt(turns: list[_Turn]) -> tuple[str, list]:
    from urt.prompts.render import IM_END, IM_START, LLAVA_IMAGE, LLAVA_IMAGE_PAIR, LLAVA_SYSTEM

    images: list = []
    text = ""
    if not turns or turns[0].role != "system":
        text += f"{IM_START}system\n{LLAVA_SYSTEM}{IM_END}\n"
    for t in turns:
        imgs = [p for k, p in t.parts if k == "image"]
        tokens = LLAVA_IMAGE_PAIR if len(imgs) == 2 else LLAVA_IMAGE * len(imgs)
        images += imgs
        text += f"{IM_START}{t.role}\n{tokens}{_text_of(t.parts)}{IM_END}\n"
    return text + f"{IM_START}assistant\n", images


def _qwen_messages(turns: list[_Turn]) -> tuple[list, list]:
    messages: list = []
    images: list = []
    for t in turns:
        items = []
        for kind, p in t.parts:
            if kind == "image":
                images.append(p)
                items.append({"type": "image"})
            else:
                items.append({"type": "text", "text": p})
        messages.append({"role": t.role, "content": items})
    return messages, images


def encode_messages(bundle, messages: Any, *, key: str = "request", max_images: int = 64,
                    max_prompt_tokens: int | None = None):
    """OpenAI chat messages -> a prompt-mode `Encoded` for `bundle` (see the module docstring).
    Raises RequestError (400) for anything the client got wrong."""
    import torch

    from urt.data.encode import IGNORE_INDEX, Encoded
    from urt.prompts.render import _assistant_prefix

    turns = parse_messages(messages, max_images=max_images)
    family = bundle.family
    processor = bundle.processor
    kw: dict[str, Any] = {}
    if family == "llava_onevision":
        text, images = _llava_prompt(turns)
        if images:
            kw["images"] = [images]
        prefix = ""
    else:
        msgs, images = _qwen_messages(turns)
        try:
            text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - jinja raises TemplateError etc. for odd conversations
            raise RequestError(f"the {family} chat template rejected these messages "
                               f"({type(err).__name__}: {err})", param="messages") from None
        if images:
            kw["images"] = images
        prefix = _assistant_prefix(text)
    try:
        out = processor(text=[text], return_tensors="pt", **kw)
    except Exception as err:  # noqa: BLE001 - processors raise many types on unusual images
        raise RequestError(f"the {family} processor could not encode this request "
                           f"({type(err).__name__}: {err})", param="messages") from None
    input_ids = out["input_ids"][0].long()
    if max_prompt_tokens is not None and len(input_ids) > max_prompt_tokens:
        raise RequestError(f"the prompt is {len(input_ids)} tokens (images included), more than this server's "
                           f"limit of {max_prompt_tokens}", param="messages", code="context_length_exceeded")
    mm = out.get("mm_token_type_ids")
    mm = mm[0].long() if mm is not None else None
    if mm is None and family in QWEN_FAMILIES:
        mm = torch.zeros_like(input_ids)  # keep every Qwen prompt batchable with every other
    visual = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in out.items()
              if k not in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")}
    return Encoded(key=key, task="chat", label="", input_ids=input_ids,
                   labels=torch.full_like(input_ids, IGNORE_INDEX), visual=visual, mm_token_type_ids=mm,
                   prompt_length=int(input_ids.shape[0]),
                   meta={"assistant_prefix": prefix, "mode": "prompt", "n_images": len(images)})


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


def parse_sampling(body: dict, *, default_max_tokens: int, max_tokens_limit: int, default_temperature: float,
                   default_top_p: float, default_seed: int | None) -> SamplingParams:
    for name, why in _UNSUPPORTED.items():
        v = body.get(name)
        if v not in (None, False, [], ""):
            raise RequestError(f"'{name}': {why}", param=name, code="unsupported_parameter")
    mt = body.get("max_completion_tokens")
    name = "max_completion_tokens" if mt is not None else "max_tokens"
    max_tokens = _number(body, name, default_max_tokens, kind=int, lo=1, hi=max_tokens_limit)
    return SamplingParams(
        max_tokens=int(max_tokens),
        temperature=float(_number(body, "temperature", default_temperature, lo=0.0, hi=2.0)),
        top_p=float(_number(body, "top_p", default_top_p, lo=0.0, hi=1.0, lo_open=True)),
        n=int(_number(body, "n", 1, kind=int, lo=1, hi=MAX_N)),
        seed=_number(body, "seed", default_seed, kind=int, lo=-(2 ** 63), hi=2 ** 64 - 1),
    )


