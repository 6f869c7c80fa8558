"""Shared machinery of the data converters: the lightweight `Record` (a sample whose visuals are
still references), `materialize` (record -> `Sample`), per-item errors and skip statistics, and
streaming readers for JSON lists, JSON lines, parquet and CSV files.

A converter is a generator of `Record`s. Nothing is loaded until `materialize` is called, so a
benchmark file can be checked (counts, labels, order) without its images or videos, and a file of
millions of rows streams in constant memory.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from urt.data.schema import (
    GENERATION_TASKS,
    Sample,
    Video,
    load_image,
    violation,
)
from urt.errors import UrtError

ON_ERROR = ("raise", "skip")


# ------------------------------------------------------------------------------------------ errors
class ItemError(UrtError):
    """One item of an input file is unusable. `reason` is a short category used to count skips
    ("missing field", "bad label", "missing file", …); the message says what is wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class ConvertStats:
    """What a conversion saw: items read, records produced, and skips per reason (with the first
    few messages of each reason as examples). Skips are never silent: when a converter runs with
    `on_error="skip"` and no stats object, it warns at the end instead."""

    read: int = 0
    converted: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    by_task: Counter = field(default_factory=Counter)
    by_label: Counter = field(default_factory=Counter)  # (task, label) -> n

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(message)

    def count(self, task: str, label: Any) -> None:
        self.converted += 1
        self.by_task[task] += 1
        self.by_label[(task, label)] += 1

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        parts = [f"{self.converted} converted"]
        if self.skipped:
            parts.append(f"{self.n_skipped} skipped (" + ", ".join(
                f"{r}: {n}" for r, n in sorted(self.skipped.items())) + ")")
        return ", ".join(parts)


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise UrtError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")


# -------------------------------------------------------------------------------------- references
@dataclass(frozen=True)
class ImageRef:
    """An image not loaded yet: a file path (absolute, or relative to the folder given to
    `materialize`) or embedded encoded bytes (parquet exports of HF image columns)."""

    path: str | None = None
    data: bytes | None = field(default=None, repr=False)

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        return f"<{len(self.data or b'')} embedded image bytes>"


@dataclass(frozen=True)
class VideoRef:
    """A video not loaded yet: an encoded file (`path` or embedded `data`, container `format`), or
    the paths of its frames in time order (`frames`)."""

    path: str | None = None
    frames: tuple[ImageRef, ...] | None = None
    data: bytes | None = field(default=None, repr=False)
    format: str | None = None

    def describe(self) -> str:
        if self.frames is not None:
            first = self.frames[0].describe() if self.frames else "-"
            return f"{len(self.frames)} frames ({first}, …)"
        if self.path is not None:
            return self.path
        return f"<{len(self.data or b'')} embedded video bytes>"


VisualRef = ImageRef | VideoRef


@dataclass
class Record:
    """A `Sample` whose visuals are references (`ImageRef` / `VideoRef`) instead of pixels. Same
    fields, same meaning; `materialize` turns it into a `Sample`."""

    key: str
    task: str
    label: Any
    visuals: list[VisualRef]
    caption: str | None = None
    question: str | None = None
    answers: tuple[str, str] | None = None
    cot: str | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # "FILE: item N (id …)", for error messages; not part of the Sample

    def fields(self) -> dict[str, str]:
        if self.task in GENERATION_TASKS:
            return {"caption": self.caption}
        return {"question": self.question, "answer1": self.answers[0], "answer2": self.answers[1]}

    def visual_paths(self) -> list[Any]:
        """Per visual: its path, or the list of frame paths (None for embedded bytes)."""
        out: list[Any] = []
        for v in self.visuals:
            if isinstance(v, VideoRef) and v.frames is not None:
                out.append([f.path for f in v.frames])
            else:
                out.append(v.path)
        return out


def check_record(r: Record) -> None:
    """The schema's rules (`urt.data.schema.violation`) applied to a record; raises ItemError."""
    bad = violation(r, image_type=ImageRef, video_type=VideoRef)
    if bad is not None:
        raise ItemError(*bad)
    for v in r.visuals:
        if isinstance(v, VideoRef) and v.frames is not None and len(v.frames) == 0:
            raise ItemError("bad visuals", "a video given as frames needs at least one frame")


# ------------------------------------------------------------------------------------- materialize
VIDEO_FORMATS = {"mp4", "webm", "mkv", "avi", "mov", "gif", "m4v", "mpeg", "mpg", "flv", "ts"}


def video_format(path: str | None, default: str = "mp4") -> str:
    ext = os.path.splitext(path or "")[1].lower().lstrip(".")
    return ext if ext in VIDEO_FORMATS else default


def _resolve(path: str, root: str | Path | None) -> Path:
    p = Path(path)
    if p.is_absolute() or root is None:
        return p
    return Path(root) / p


def _load_image(ref: ImageRef, root) -> Any:
    if ref.data is not None:
        try:
            return load_image(ref.data, where=f"embedded image {ref.path or ''}".strip())
        except UrtError as err:
            raise ItemError("bad image", str(err)) from None
    p = _resolve(ref.path, root)
    if not p.is_file():
        raise ItemError("missing file", f"image file not found: {p}")
    try:
        return load_image(p)
    except UrtError as err:
        raise ItemError("bad image", str(err)) from None


def _load_video(ref: VideoRef, root, verify: bool) -> Video:
    if ref.frames is not None:
        return Video(frames=[_load_image(f, root) for f in ref.frames])
    if ref.data is not None:
        data, where = ref.data, f"embedded video {ref.path or ''}".strip()
    else:
        p = _resolve(ref.path, root)
        if not p.is_file():
            raise ItemError("missing file", f"video file not found: {p}")
        data, where = p.read_bytes(), str(p)
    if not data:
        raise ItemError("bad video", f"{where}: empty video file")
    if verify:
        from urt.data.video import probe_video

        try:
            probe_video(data, where=where)
        except UrtError as err:
            raise ItemError("bad video", str(err)) from None
    return Video(data=data, format=ref.format or video_format(ref.path))


def materialize(record: Record, root: str | Path | None = None, *, verify_videos: bool = True) -> Sample:
    """Load a record's visuals and return the `Sample`. Relative paths resolve against `root`
    (default: the current directory; converters store paths already joined with their image/video
    folder). Images go through `schema.load_image` (8-bit RGB); video files are kept encoded
    (`Video(data=…)`, checked to open as a video when `verify_videos`), frame lists become
    `Video(frames=[…])`. Raises ItemError ("missing file", "bad image", "bad video") naming the file."""
    visuals = []
    for ref in record.visuals:
        if isinstance(ref, VideoRef):
            visuals.append(_load_video(ref, root, verify_videos))
        else:
            visuals.append(_load_image(ref, root))
    try:
        return Sample(record.key, record.task, record.label, visuals, caption=record.caption,
                      question=record.question, answers=record.answers, cot=record.cot,
                      source=record.source, meta=dict(record.meta))
    except ItemError:
        raise
    except UrtError as err:
        raise ItemError("invalid sample", str(err)) from None


# ---------------------------------------------------------------------------------------- driving
def item_where(file: str | Path, index: int, ident: Any = None) -> str:
    s = f"{file}: item {index}"
    if ident is not None and ident != "":
        s += f" (id {ident!r})"
    return s


def drive(items: Iterable[tuple[int, Any]], parse: Callable[[int, Any], Record], file: str | Path, *,
          on_error: str, stats: ConvertStats, ident: Callable[[Any], Any] = lambda it: None,
          ) -> Iterator[Record]:
    """Parse each `(index, raw item)` into a checked Record. On ItemError: raise a UrtError naming
    file, item index and id, or (on_error="skip") count the skip and go on."""
    for index, item in items:
        stats.read += 1
        try:
            if isinstance(item, _BadItem):
                raise ItemError(item.reason, item.message)
            rec = parse(index, item)
            check_record(rec)
            rec.origin = item_where(file, index, _safe_ident(ident, item))
        except ItemError as err:
            where = item_where(file, index, _safe_ident(ident, item))
            if on_error == "raise":
                raise UrtError(f"{where}: {err.message}") from None
            stats.skip(err.reason, f"{where}: {err.message}")
            continue
        yield rec


def _safe_ident(ident, item):
    try:
        return ident(item)
    except Exception:
        return None


def finish(records: Iterator[Record], *, load_visuals: bool, on_error: str, stats: ConvertStats,
           warn: bool = False, root: str | Path | None = None, verify_videos: bool = True
           ) -> Iterator[Any]:
    """The tail every converter shares: materialize (or not), count, and report skips (with
    `warn`, a warning at the end lists the skips: for callers that passed no stats object)."""
    try:
        for rec in records:
            if load_visuals:
                try:
                    out = materialize(rec, root, verify_videos=verify_videos)
                except ItemError as err:
                    where = rec.origin or f"record {rec.key!r}"
                    if on_error == "raise":
                        raise UrtError(f"{where}: {err.message}") from None
                    stats.skip(err.reason, f"{where}: {err.message}")
                    continue
            else:
                out = rec
            stats.count(rec.task, rec.label)
            yield out
    finally:
        if warn and stats.skipped:
            warnings.warn(f"conversion skipped {stats.n_skipped} item(s): " + ", ".join(
                f"{r}: {n}" for r, n in sorted(stats.skipped.items())), stacklevel=2)


# ---------------------------------------------------------------------------------------- readers
class _BadItem:
    """Stands in for a row that could not even be parsed (a bad JSON line), so the skip logic
    handles it like any other bad item."""

    def __init__(self, reason: str, message: str):
        self.reason, self.message = reason, message


def iter_json_list(path: str | Path, chunk: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """Stream the elements of a top-level JSON array without loading the whole file (each element
    is decoded on its own). Raises UrtError naming the file if it is not a JSON array."""
    dec = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def more(n: int = chunk) -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            data = f.read(n)
            if not data:
                eof = True
                return False
            buf = buf[pos:] + data
            pos = 0
            return True

        more()
        if buf.startswith("\ufeff"):
            pos = 1
        while True:
            pos = ws.match(buf, pos).end()
            if pos < len(buf) or not more():
                break
        if pos >= len(buf) or buf[pos] != "[":
            raise UrtError(f"{path}: expected a JSON list (file starting with '['), "
                           f"got {buf[pos:pos + 20]!r}")
        pos += 1
        index, need_comma = 0, False
        while True:
            pos = ws.match(buf, pos).end()
            while pos >= len(buf):
                if not more():
                    raise UrtError(f"{path}: truncated JSON list (no closing ']') after item {index - 1}")
                pos = ws.match(buf, pos).end()
            c = buf[pos]
            if c == "]":
                pos += 1
                break
            if need_comma:
                if c != ",":
                    raise UrtError(f"{path}: invalid JSON after item {index - 1}: expected ',' or ']', "
                                   f"got {buf[pos:pos + 20]!r}")
                pos += 1
                need_comma = False
                continue
            step = chunk
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                    # a number/literal at the very end of the buffer may continue in the next chunk
                    if end >= len(buf) and not eof and not isinstance(obj, (dict, list, str)):
                        raise json.JSONDecodeError("maybe incomplete", buf, end)
                    break
                except json.JSONDecodeError as err:
                    if eof or not more(step):
                        raise UrtError(f"{path}: invalid JSON in item {index}: {err.msg}") from None
                    step *= 2
            yield index, obj
            index += 1
            pos = end
            need_comma = True
        pos = ws.match(buf, pos).end()
        if pos < len(buf):
            raise UrtError(f"{path}: unexpected data after the JSON list: {buf[pos:pos + 20]!r}")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON-lines file (blank lines ignored; index = row number among non-blank lines).
    A line that is not valid JSON becomes a bad item ("bad json") so it can be skipped."""
    with open(path, encoding="utf-8") as f:
        index = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                obj = _BadItem("bad json", f"line {lineno} is not valid JSON ({err.msg})")
            yield index, obj
            index += 1


def iter_parquet(path: str | Path, batch_size: int = 256) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except Exception as err:
        raise UrtError(f"{path}: cannot read parquet file ({type(err).__name__}: {err})") from None
    index = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            yield index, row
            index += 1


def iter_csv(path: str | Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        for index, row in enumerate(csv.DictReader(f)):
            yield index, row


def iter_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Rows of a table-like file, by extension: .json (list), .jsonl/.ndjson, .parquet, .csv."""
    p = Path(path)
    if not p.is_file():
        raise UrtError(f"{p}: input file not found")
    ext = p.suffix.lower()
    if ext == ".json":
        return iter_json_list(p)
    if ext in (".jsonl", ".ndjson"):
        return iter_jsonl(p)
    if ext == ".parquet":
        return iter_parquet(p)
    if ext == ".csv":
        return iter_csv(p)
    raise UrtError(f"{p}: unsupported file type {ext!r}; expected .json, .jsonl, .parquet or .csv")


def count_rows(path: str | Path) -> int:
    p = Path(path)
    if p.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(str(p)).metadata.num_rows
    return sum(1 for _ in iter_rows(p))


# ---------------------------------------------------------------------------------------- helpers
def require(item: Any, name: str, kind: type | tuple = str) -> Any:
    if not isinstance(item, dict):
        raise ItemError("bad item", f"expected a JSON object, got {type(item).__name__}")
    if name not in item or item[name] is None:
        raise ItemError("missing field", f"missing field {name!r}")
    v = item[name]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ItemError("missing field", f"field {name!r} must be {want}, got {type(v).__name__}")
    return v


def folder_of(src: str | Path, folder: str | Path | None) -> Path:
    """The folder relative visual paths resolve against: the given one, else the input file's."""
    return Path(folder) if folder is not None else Path(src).resolve().parent


def join(folder: Path | None, rel: str) -> str:
    if not isinstance(rel, str) or not rel:
        raise ItemError("bad visuals", f"visual path must be a non-empty string, got {rel!r}")
    p = Path(rel)
    return str(p if p.is_absolute() or folder is None else folder / p)


def image_ref(value: Any, folder: Path | None, what: str = "image") -> ImageRef:
    """An ImageRef from a path string or an HF image dict {"bytes": …, "path": …}."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return ImageRef(path=path, data=bytes(data))
        if path:
            return ImageRef(path=join(folder, path))
        raise ItemError("bad visuals", f"{what}: image dict has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value))
    if isinstance(value, str) and value:
        return ImageRef(path=join(folder, value))
    raise ItemError("missing field" if value in (None, "") else "bad visuals",
                    f"{what}: expected an image path, got {value!r}")


def video_ref(value: Any, folder: Path | None, what: str = "video") -> VideoRef:
    """A VideoRef from a file path, a list of frame paths, or a dict {"bytes": …, "path": …}."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ItemError("bad visuals", f"{what}: empty list of frames")
        return VideoRef(frames=tuple(image_ref(v, folder, f"{what} frame {i}") for i, v in enumerate(value)))
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return VideoRef(path=path, data=bytes(data), format=video_format(path))
        if path:
            return VideoRef(path=join(folder, path), format=video_format(path))
        raise ItemError("bad visuals", f"{what}: video dict has neither bytes nor path")
    if isinstance(value, str) and value:
        return VideoRef(path=join(folder, value), format=video_format(value))
    raise ItemError("missing field" if value in (None, "") else "bad visuals",
                    f"{what}: expected a video path or a list of frame paths, got {value!r}")


def scalar_meta(row: dict, skip: Iterable[str]) -> dict[str, Any]:
    """The row's other scalar columns (str/int/float/bool/None), kept as meta."""
    skip = set(skip)
    return {k: v for k, v in row.items()
            if k not in skip and (v is None or isinstance(v, (str, int, float, bool)))}
