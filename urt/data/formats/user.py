"""The plain JSON-lines format for users' own pairs (`--format jsonl`).

The format is documented in the docstring of `urt.data.convert`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from urt.data.formats.common import (
    ConvertStats,
    ItemError,
    Record,
    drive,
    folder_of,
    image_ref,
    video_ref,
)
from urt.data.formats.official import iter_items
from urt.data.schema import GENERATION_TASKS, TASKS


def _label(v: Any) -> Any:
    if isinstance(v, bool):
        raise ItemError("bad label", f"label must be 1, 2 or 'tie', got {v!r}")
    if v in (1, 2, "tie"):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "2", "tie"):
        s = v.strip().lower()
        return s if s == "tie" else int(s)
    raise ItemError("bad label", f"label must be 1, 2 or 'tie', got {v!r}")


def parse_user_item(it: Any, index: int, *, folder: Path | None, stem: str) -> Record:
    if not isinstance(it, dict):
        raise ItemError("bad item", f"expected a JSON object, got {type(it).__name__}")
    task = it.get("task")
    if task not in TASKS:
        raise ItemError("missing field" if task is None else "bad item",
                        f"'task' must be one of {', '.join(TASKS)}, got {task!r}")
    if "label" not in it:
        raise ItemError("missing field", "missing field 'label'")
    label = _label(it["label"])
    video = task.startswith("video")
    field = "videos" if video else "images"
    raw = it.get(field)
    if raw is None:
        other = "images" if video else "videos"
        hint = f" (task {task} takes '{field}', not '{other}')" if other in it else ""
        raise ItemError("missing field", f"missing field {field!r}{hint}")
    if not isinstance(raw, list):
        raise ItemError("bad visuals", f"{field!r} must be a list, got {type(raw).__name__}")
    mk = video_ref if video else image_ref
    visuals = [mk(v, folder, f"{field}[{i}]") for i, v in enumerate(raw)]
    key = it.get("key")
    key = str(key) if key not in (None, "") else str(f"{stem}-{index:07d}")
    meta = it.get("meta") or {}
    if not isinstance(meta, dict):
        raise ItemError("bad item", f"'meta' must be an object, got {type(meta).__name__}")
    meta = {**meta, "format": "jsonl", "index": index}
    common = dict(cot=it.get("cot"), source=str(it.get("source") or stem), meta=meta)
    if task in GENERATION_TASKS:
        return Record(key, task, label, visuals, caption=it.get("caption"), **common)
    answers = it.get("answers")
    if answers is None and ("answer1" in it or "answer2" in it):
        answers = [it.get("answer1"), it.get("answer2")]
    if isinstance(answers, list):
        answers = tuple(answers)
    return Record(key, task, label, visuals, question=it.get("question"), answers=answers, **common)


def jsonl_records(path, root=None, *, on_error="raise", stats: ConvertStats) -> Iterator[Record]:
    folder = folder_of(path, root)
    stem = Path(path).stem
    return drive(iter_items(path), lambda i, it: parse_user_item(it, i, folder=folder, stem=stem),
                 path, on_error=on_error, stats=stats,
                 ident=lambda it: it.get("key"))
