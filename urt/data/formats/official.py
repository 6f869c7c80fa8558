"""The official UnifiedReward-Think training formats (docs/data.md §Official formats): SFT JSON, GRPO JSON and the
dataset-mixing YAML.

Task and fields come from the prompt text. Each packaged template (`urt.prompts`, sets paper,
qwen3, implicit) is inverted into a pattern: its fixed text must match exactly and every
placeholder (`{caption}`, `{question}`, `{answer1}`, `{answer2}`) captures the text in its place,
e.g. the paper image-generation prompt ends in `Text Caption: [{caption}]`, so the caption is what
stands between `Text Caption: [` and the final `]`. Rule, in order:

1. leading visual tokens (`<image>` / `<video>`, each with the whitespace after it) are removed;
2. the prompt must equal a template with its placeholders filled (byte-exact); the first template
   that matches (sets in order paper, qwen3, implicit) gives the task and the fields;
3. failing that, the same with whitespace relaxed (any run of whitespace in the fixed text matches
   any run of whitespace, leading/trailing whitespace ignored, captured fields stripped) — data
   written on another OS or re-indented still converts; meta["template_match"] says which;
4. a prompt matching no template is an error ("unknown prompt") — the fields cannot be recovered.

When a filled part itself contains the fixed text that follows it (a question containing
"\nAnswer 1: " in the templates without brackets), the split at the first occurrence is taken; such
prompts are ambiguous by construction.

The template fixes the kind of task (generation: caption + two candidates; understanding:
question + two answers + one reference). The modality follows the template, except that an image
template with more than 2 images is read as video frames, as the LLaVA loader does. Visuals:

* image_generation: exactly 2 images; image_understanding: exactly 1 image;
* video_generation: the `images` list is the frames of both videos, first half video 1, second half
  video 2 (an even count is required); video_understanding: all frames are the one video;
* `"video": path` (an encoded file) is the reference video of an understanding task.

Frames are kept in full (the official GRPO loader keeps 4 per video at train time; frame sampling
is a load-time choice here). Labels: the `<answer>` string of the gpt turn (SFT) or the `solution`
(GRPO, with or without `<answer>` tags): "Image/Video/Answer 1 is better" -> 1, "… 2 is better" -> 2,
the implicit prompts' "Both images/videos are equally good" -> "tie"; case and a final period are
ignored, the noun must fit the prompt's template (Image/Video/Answer).
"""

from __future__ import annotations

import math
import random
import re
import string
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from urt.data.formats.common import (
    ConvertStats,
    ItemError,
    Record,
    drive,
    folder_of,
    image_ref,
    iter_json_list,
    iter_jsonl,
    require,
    video_ref,
)
from urt.errors import UrtError

# --------------------------------------------------------------------------------- template match
_VISUAL_TOKENS = re.compile(r"^(?:\s*<(?:image|video)>)+\s*")


@lru_cache(maxsize=1)
def _patterns() -> list[tuple[str, str, re.Pattern, re.Pattern]]:
    from urt.prompts import TEMPLATE_SETS, available_templates, load_template

    have = available_templates()
    out = []
    for tset in TEMPLATE_SETS:
        for task in have.get(tset, ()):
            text = load_template(tset, task)
            out.append((tset, task, _compile(text, relaxed=False), _compile(text, relaxed=True)))
    return out


def _compile(template: str, relaxed: bool) -> re.Pattern:
    parts: list[str] = []
    seen: set[str] = set()
    pieces = list(string.Formatter().parse(template))
    for literal, name, _spec, _conv in pieces:
        if literal:
            if relaxed:
                toks = re.split(r"(\s+)", literal)
                parts.append("".join(r"\s+" if t.isspace() else re.escape(t) for t in toks if t))
            else:
                parts.append(re.escape(literal))
        if name is not None:
            if name in seen:
                parts.append(f"(?P={name})")
            else:
                seen.add(name)
                parts.append(f"(?P<{name}>.*?)")
    body = "".join(parts)
    if relaxed:
        # whitespace at either end of the template is optional
        body = re.sub(r"^(\\s\+)+", "", body)
        body = re.sub(r"(\\s\+)+$", "", body)
        body = r"\s*" + body + r"\s*"
    return re.compile(body, re.DOTALL)


def match_prompt(prompt: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """(task, fields, info) for a filled template text; info = {"template": "set/task",
    "template_match": "exact" | "whitespace"}. Raises ItemError("unknown prompt") otherwise."""
    if not isinstance(prompt, str):
        raise ItemError("missing field", f"prompt must be a string, got {type(prompt).__name__}")
    text = _VISUAL_TOKENS.sub("", prompt, count=1)
    for mode in ("exact", "whitespace"):
        for tset, task, exact, relaxed in _patterns():
            m = (exact if mode == "exact" else relaxed).fullmatch(text)
            if m:
                fields = m.groupdict()
                if mode == "whitespace":
                    fields = {k: v.strip() for k, v in fields.items()}
                return task, fields, {"template": f"{tset}/{task}", "template_match": mode}
    head = text[:80].replace("\n", "\\n")
    raise ItemError("unknown prompt", f"prompt matches none of the packaged templates "
                                      f"(paper, qwen3, implicit): {head!r}…")


# ------------------------------------------------------------------------------------------ label
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_LABEL = re.compile(r"^(image|video|answer)\s+([12])\s+is\s+better$")
_TIE = re.compile(r"^both\s+(images|videos)\s+are\s+equally\s+good$")
_NOUN = {"image_generation": "image", "video_generation": "video",
         "image_understanding": "answer", "video_understanding": "answer"}


def answer_label(text: str, task: str, *, require_tags: bool, what: str) -> int | str:
    """Label from an answer string ("Image 1 is better" -> 1, "Both … equally good" -> "tie")."""
    if not isinstance(text, str):
        raise ItemError("missing field", f"{what} must be a string, got {type(text).__name__}")
    m = _ANSWER.search(text)
    if m is None and require_tags:
        raise ItemError("bad label", f"{what} has no <answer>…</answer>")
    s = (m.group(1) if m else text).strip().rstrip(".").strip().lower()
    noun = _NOUN[task]
    lm = _LABEL.match(s)
    if lm and lm.group(1) == noun:
        return int(lm.group(2))
    tm = _TIE.match(s)
    if tm and tm.group(1) == noun + "s":
        return "tie"
    raise ItemError("bad label", f"{what}: answer {s!r} is not a valid answer for task {task} "
                                 f"(expected '{noun.capitalize()} 1 is better' or '{noun.capitalize()} 2 "
                                 f"is better')")


# ---------------------------------------------------------------------------------------- visuals
def _visual_list(item: dict) -> tuple[list | None, Any]:
    """(images list or None, video value or None) of an official item."""
    images = item.get("images")
    if images is None and "image" in item:
        images = item["image"]
        if isinstance(images, str):
            images = [images]
    if images is not None and not isinstance(images, list):
        raise ItemError("bad visuals", f"'images' must be a list of paths, got {type(images).__name__}")
    return images, item.get("video")


def build_visuals(task: str, images: list | None, video: Any, folder: Path | None
                  ) -> tuple[str, list, dict]:
    """Decide the final task (an image template with >2 images becomes video) and the visual refs."""
    meta: dict[str, Any] = {}
    kind = task.split("_", 1)[1]
    if video not in (None, ""):
        if kind != "understanding":
            raise ItemError("bad visuals", f"task {task}: one 'video' file cannot hold two candidates; "
                                           f"give the frames of both videos in 'images'")
        if images:
            raise ItemError("bad visuals", "item has both 'video' and 'images'")
        return "video_understanding", [video_ref(video, folder)], meta
    if not images:
        raise ItemError("missing field", "missing field 'images' (no visuals)")
    n = len(images)
    if task.startswith("image_") and n > 2:
        task = "video_" + kind
        meta["frames_from"] = f"{n} images with an image template, read as video frames"
    if task == "image_generation":
        if n != 2:
            raise ItemError("bad visuals", f"task image_generation needs 2 images, got {n}")
        return task, [image_ref(images[0], folder, "image 1"), image_ref(images[1], folder, "image 2")], meta
    if task == "image_understanding":
        if n != 1:
            raise ItemError("bad visuals", f"task image_understanding needs 1 image, got {n}")
        return task, [image_ref(images[0], folder)], meta
    if task == "video_generation":
        if n % 2:
            raise ItemError("bad visuals", f"task video_generation needs an even number of frames "
                                           f"(first half video 1, second half video 2), got {n}")
        h = n // 2
        meta["n_frames"] = h
        return task, [video_ref(images[:h], folder, "video 1"), video_ref(images[h:], folder, "video 2")], meta
    meta["n_frames"] = n
    return task, [video_ref(images, folder, "video")], meta


# ------------------------------------------------------------------------------------ SFT / GRPO
def _key(stem: str, index: int, prefix: str = "") -> str:
    return str(f"{prefix}{stem}-{index:07d}")


def parse_sft_item(item: Any, index: int, *, folder: Path | None, stem: str, source: str,
                   key_prefix: str = "") -> Record:
    convs = require(item, "conversations", list)
    human = next((t for t in convs if isinstance(t, dict) and t.get("from") in ("human", "user")), None)
    gpt = next((t for t in convs if isinstance(t, dict) and t.get("from") in ("gpt", "assistant")), None)
    if human is None or gpt is None:
        raise ItemError("missing field", "conversations need a 'human' turn and a 'gpt' turn")
    if len([t for t in convs if isinstance(t, dict) and t.get("from") != "system"]) > 2:
        raise ItemError("bad item", f"multi-turn conversation ({len(convs)} turns) is not a pairwise "
                                    f"judgement")
    prompt, target = human.get("value"), gpt.get("value")
    if not isinstance(prompt, str):
        raise ItemError("missing field", "the human turn has no string 'value'")
    if not isinstance(target, str):
        raise ItemError("missing field", "the gpt turn has no string 'value'")
    template_task, fields, info = match_prompt(prompt)
    # the answer's noun follows the prompt (an image template over frames still says "Image 1 …")
    label = answer_label(target, template_task, require_tags=True, what="gpt turn")
    images, video = _visual_list(item)
    task, visuals, vmeta = build_visuals(template_task, images, video, folder)
    meta = {"format": "sft_json", "index": index, **info, **vmeta}
    if "id" in item:
        meta["id"] = item["id"]
    return _record(task, fields, label, visuals, _key(stem, index, key_prefix), target, source, meta)


def parse_grpo_item(item: Any, index: int, *, folder: Path | None, stem: str, source: str,
                    key_prefix: str = "") -> Record:
    prompt = require(item, "problem", str)
    solution = require(item, "solution", str)
    template_task, fields, info = match_prompt(prompt)
    label = answer_label(solution, template_task, require_tags=False, what="solution")
    images, video = _visual_list(item)
    task, visuals, vmeta = build_visuals(template_task, images, video, folder)
    meta = {"format": "grpo_json", "index": index, **info, **vmeta}
    if "id" in item:
        meta["id"] = item["id"]
    return _record(task, fields, label, visuals, _key(stem, index, key_prefix), None, source, meta)


def parse_official_item(item: Any, index: int, **kw) -> Record:
    """SFT or GRPO, told apart by the item's keys (a mixing YAML may list both kinds)."""
    if isinstance(item, dict) and "conversations" in item:
        return parse_sft_item(item, index, **kw)
    if isinstance(item, dict) and "problem" in item:
        return parse_grpo_item(item, index, **kw)
    raise ItemError("missing field", "item has neither 'conversations' (SFT) nor 'problem' (GRPO)")


def _record(task, fields, label, visuals, key, cot, source, meta) -> Record:
    if task.endswith("_generation"):
        return Record(key, task, label, visuals, caption=fields.get("caption"), cot=cot, source=source,
                      meta=meta)
    return Record(key, task, label, visuals, question=fields.get("question"),
                  answers=(fields.get("answer1"), fields.get("answer2")), cot=cot, source=source, meta=meta)


def iter_items(path: str | Path) -> Iterator[tuple[int, Any]]:
    p = Path(path)
    if not p.is_file():
        raise UrtError(f"{p}: input file not found")
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        return iter_jsonl(p)
    return iter_json_list(p)


def sft_records(path, image_folder=None, *, on_error="raise", stats: ConvertStats) -> Iterator[Record]:
    folder = folder_of(path, image_folder)
    stem = Path(path).stem
    return drive(iter_items(path), lambda i, it: parse_sft_item(it, i, folder=folder, stem=stem,
                                                                source=stem),
                 path, on_error=on_error, stats=stats, ident=lambda it: it.get("id"))


def grpo_records(path, image_folder=None, *, on_error="raise", stats: ConvertStats) -> Iterator[Record]:
    folder = folder_of(path, image_folder)
    stem = Path(path).stem
    return drive(iter_items(path), lambda i, it: parse_grpo_item(it, i, folder=folder, stem=stem,
                                                                 source=stem),
                 path, on_error=on_error, stats=stats, ident=lambda it: it.get("id"))


# ------------------------------------------------------------------------------------- mixing YAML
_STRATEGY = re.compile(r"^(all|first|end|random)(?::(.+))?$")


def select_indices(strategy: str, n: int, rng: random.Random, *, where: str = "") -> list[int]:
    """Indices (in file order) a sampling strategy keeps from `n` items.

    `all`; `first:N` (the first N); `end:N` (the last N); `random:N` (N drawn without replacement
    by `rng`, returned in file order). Any count may be a percentage `P%` = ceil(P*n/100) items, as
    in the official loader. N larger than n keeps everything (as the official slicing does); `end:0`
    keeps nothing (the official `[-0:]` would keep everything)."""
    s = str(strategy).strip()
    m = _STRATEGY.match(s)
    label = f"{where}: " if where else ""
    bad = (f"{label}bad sampling_strategy {strategy!r}; expected all, first:N, end:N, random:N or "
           f"random:P%")
    if not m:
        raise UrtError(bad)
    name, arg = m.group(1), m.group(2)
    if name == "all":
        if arg is not None:
            raise UrtError(bad)
        return list(range(n))
    if arg is None:
        raise UrtError(bad + f" ({name} needs a count)")
    arg = arg.strip()
    try:
        if arg.endswith("%"):
            pct = float(arg[:-1])
            if not (0 <= pct <= 100) or math.isnan(pct):
                raise ValueError
            k = math.ceil(pct * n / 100)
        else:
            k = int(arg)
            if k < 0:
                raise ValueError
    except ValueError:
        raise UrtError(bad + f" (bad count {arg!r})") from None
    k = min(k, n)
    if name == "first":
        return list(range(k))
    if name == "end":
        return list(range(n - k, n))
    return sorted(rng.sample(range(n), k))


def read_mix_yaml(path: str | Path, root: str | Path | None = None) -> list[dict]:
    """The datasets of a mixing YAML, paths resolved: relative `json_path` / `image_folder` are taken
    relative to `root` if given, else to the YAML file's folder. `images_folder` (LLaVA spelling)
    and `video_folder` are accepted as aliases."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UrtError(f"{p}: mixing YAML not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UrtError(f"{p}: invalid YAML ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), list):
        raise UrtError(f"{p}: expected a mapping with a 'datasets' list")
    base = Path(root) if root is not None else p.resolve().parent
    out = []
    for i, d in enumerate(data["datasets"]):
        where = f"{p}: datasets[{i}]"
        if not isinstance(d, dict) or not isinstance(d.get("json_path"), str):
            raise UrtError(f"{where}: needs a 'json_path'")
        folder = d.get("image_folder", d.get("images_folder", d.get("video_folder")))
        jp = Path(d["json_path"])
        jp = jp if jp.is_absolute() else base / jp
        if folder is not None:
            fp = Path(str(folder))
            folder = fp if fp.is_absolute() else base / fp
        strategy = d.get("sampling_strategy", "all")
        if not _STRATEGY.match(str(strategy).strip()):
            raise UrtError(f"{where} ({jp.name}): bad sampling_strategy {strategy!r}; expected all, first:N, "
                           f"end:N, random:N or random:P%")
        out.append({"json_path": jp, "image_folder": folder, "sampling_strategy": str(strategy)})
    return out


def mix_rng(seed: int, dataset_index: int) -> random.Random:
    """The generator `random:` strategies use for dataset `dataset_index` of a mix."""
    return random.Random(f"urt-mix/{seed}/{dataset_index}")


def mix_records(path, root=None, *, seed: int = 0, on_error="raise", stats: ConvertStats
                ) -> Iterator[Record]:
    """Every dataset of the YAML in order, each reduced by its strategy (applied to the raw items,
    before conversion), converted as SFT or GRPO items. Keys: `<k>-<json stem>-<index>` (k = the
    dataset's position in the YAML, index = the item's index in its file); meta["dataset"] = k."""
    datasets = read_mix_yaml(path, root)
    for k, d in enumerate(datasets):
        jp = d["json_path"]
        if not jp.is_file():
            raise UrtError(f"{path}: datasets[{k}]: json_path {jp} not found")
    for k, d in enumerate(datasets):
        jp = d["json_path"]
        n = sum(1 for _ in iter_items(jp))
        keep = select_indices(d["sampling_strategy"], n, mix_rng(seed, k),
                              where=f"{path}: datasets[{k}] ({jp.name})")
        keep_set = set(keep)
        folder = folder_of(jp, d["image_folder"])
        stem = jp.stem

        def parse(i, it, folder=folder, stem=stem, k=k, strategy=d["sampling_strategy"]):
            rec = parse_official_item(it, i, folder=folder, stem=stem, source=stem, key_prefix=f"{k}-")
            rec.meta.update(dataset=k, sampling_strategy=strategy, json_path=str(jp))
            return rec

        items = ((i, it) for i, it in iter_items(jp) if i in keep_set)
        yield from drive(items, parse, jp, on_error=on_error, stats=stats, ident=lambda it: it.get("id"))
