"""WebDataset shards of :class:`~urt.data.schema.Sample` objects: writer, reader, pipeline pieces.

Layout of one sample in a tar shard (``<tk>`` is the tar-safe key, see :func:`tar_key`)::

    <tk>.json          all metadata (below), utf-8
    <tk>.v0.png        an image visual (png, or jpg with image_format="jpg")
    <tk>.v1.f000.jpg   frame 0 of a video visual stored as frames (…f001, …)
    <tk>.v1.mp4        a video visual stored as its encoded file

``<tk>.json``::

    {"urt_shard_format": 1, "key": "<original key>", "task": "image_generation", "label": 1 | 2 | "tie",
     "caption": str | null, "question": str | null, "answers": [a1, a2] | null, "cot": str | null,
     "source": str, "meta": {...},
     "visuals": [{"kind": "image", "member": "v0.png", "width": W, "height": H},
                 {"kind": "video", "frames": ["v1.f000.png", ...], "fps": 8.0 | null},
                 {"kind": "video", "member": "v1.mp4", "format": "mp4", "fps": 8.0 | null}]}

Each output directory has an ``index.json`` manifest (:data:`INDEX_NAME`) with every shard's name and
sample count plus counts per task, label and source, so readers and ``urt data inspect`` know sizes
without scanning; the reader also uses it to detect shards that silently lost samples.

Bad input never disappears silently: with ``on_error="raise"`` the reader raises :class:`ShardError`
(a UrtError naming shard, key and reason); with ``on_error="skip"`` the sample is skipped and counted per
reason in a :class:`SkipStats`.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import io
import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from PIL import Image
from torch.utils.data import IterableDataset

from urt.data.schema import GENERATION_TASKS, LABELS, TASKS, Sample, Video, load_image, to_rgb
from urt.data.video import (EmptyVideoError, decode_video, encode_video, fit_pixels, sample_indices)
from urt.errors import UrtError

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
PARTIAL = ".partial"  # suffix of a shard still being written (write_shards)
IMAGE_FORMATS = ("png", "jpg")
VIDEO_STORAGE = ("frames", "file")
ON_ERROR = ("raise", "skip")

# Reasons a sample (or a shard) is rejected; SkipStats counts per reason.
REASONS = {
    "truncated_tar": "the tar shard ends early or is damaged (counted once per shard)",
    "unreadable_shard": "the shard file cannot be opened",
    "missing_samples": "the shard holds fewer samples than index.json lists (counted per lost sample)",
    "missing_json": "a sample has no .json member (e.g. cut by a truncated shard)",
    "bad_json": "the .json member is not valid JSON object",
    "missing_field": "a required field is missing from the .json",
    "bad_task": "unknown task",
    "bad_label": "label is not 1, 2 or 'tie'",
    "bad_visuals": "the visuals list is malformed",
    "missing_member": "a member named in the .json is not in the tar",
    "duplicate_member": "a member name occurs twice in one sample (the first copy is used)",
    "corrupt_image": "an image member cannot be decoded",
    "bad_video": "a video member cannot be decoded",
    "empty_video": "a video has zero frames",
    "invalid_sample": "the fields do not form a valid Sample",
}


class ShardError(UrtError):
    """Bad shard data: names the shard, the sample key and a reason from :data:`REASONS`."""

    def __init__(self, shard: str, key: str | None, reason: str, detail: str = ""):
        self.shard, self.key, self.reason, self.detail = str(shard), key, reason, detail
        where = f"{self.shard}: sample {key!r}" if key is not None else f"{self.shard}"
        super().__init__(f"{where}: {reason}" + (f": {detail}" if detail else ""))

    def __reduce__(self):  # picklable across DataLoader workers
        return (ShardError, (self.shard, self.key, self.reason, self.detail))


@dataclass
class SkipStats:
    """What was read and what was skipped (per reason, with a few example ``shard:key`` each)."""

    ok: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    max_examples: int = 3

    def record(self, err: ShardError, n: int = 1) -> None:
        self.skipped[err.reason] += n
        ex = self.examples.setdefault(err.reason, [])
        if len(ex) < self.max_examples:
            ex.append(f"{err.shard}:{err.key}" if err.key is not None else err.shard)
            if err.detail and len(ex) == 1:
                ex[0] += f" ({err.detail[:200]})"

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "SkipStats") -> "SkipStats":
        self.ok += other.ok
        self.skipped.update(other.skipped)
        for r, ex in other.examples.items():
            mine = self.examples.setdefault(r, [])
            new = [e for e in ex if e not in mine]  # the same shard fails the same way in every epoch
            mine.extend(new[: max(0, self.max_examples - len(mine))])
        return self

    def as_dict(self) -> dict:
        return {"ok": self.ok, "skipped": dict(self.skipped), "examples": dict(self.examples)}

    def summary(self) -> str:
        head = f"read {self.ok} sample(s), skipped {self.total_skipped}"
        if not self.skipped:
            return head
        lines = [head + ":"]
        for reason, n in self.skipped.most_common():
            lines.append(f"  {reason}: {n}  e.g. {'; '.join(self.examples.get(reason, []))}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ============================================================================================ writer
_SAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_KEY = 80  # ustar names are <= 100 bytes including ".v1.f000.jpg"


def tar_key(key: str) -> str:
    """A tar-safe sample key: only ``[A-Za-z0-9_-]`` (webdataset splits key/extension at the first dot,
    so dots, slashes etc. are mapped to ``_``), at most 80 characters. Whenever the key had to change, a
    short hash of the original is appended so distinct keys stay distinct. The original key is kept in
    the sample's json."""
    safe = _SAFE.sub("_", key)
    if safe == key and len(key) <= _MAX_KEY and not key.startswith("__"):
        return key
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
    return f"{safe.lstrip('_')[: _MAX_KEY - 11]}_{digest}"


def _encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    img = to_rgb(img)
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _sample_record(s: Sample, *, image_format: str, jpeg_quality: int, video_storage: str,
                   video_frames: int | None) -> tuple[dict, dict[str, bytes]]:
    members: dict[str, bytes] = {}
    visuals = []
    for i, v in enumerate(s.visuals):
        if isinstance(v, Image.Image):
            name = f"v{i}.{image_format}"
            members[name] = _encode_image(v, image_format, jpeg_quality)
            visuals.append({"kind": "image", "member": name, "width": v.width, "height": v.height})
            continue
        fps = v.fps
        if video_storage == "file":
            if v.data is not None:
                fmt = re.sub(r"[^a-z0-9]", "", (v.format or "mp4").lower()) or "mp4"
                data = bytes(v.data)
            else:
                frames = v.frames
                if video_frames is not None and len(frames) > video_frames:
                    idx = sample_indices(len(frames), frames=video_frames)
                    fps = fps * len(idx) / len(frames) if fps else None
                    frames = [frames[j] for j in idx]
                fmt, data = "mp4", encode_video(frames, fps=fps or 8.0)  # no fps known: encoded at 8
            name = f"v{i}.{fmt}"
            members[name] = data
            visuals.append({"kind": "video", "member": name, "format": fmt, "fps": fps})
        else:
            if v.frames is not None:
                frames = v.frames
            else:
                frames, src_fps = decode_video(v.data, where=f"sample {s.key!r}: visual {i}", frames=None)
                fps = fps or src_fps
            if video_frames is not None and len(frames) > video_frames:
                idx = sample_indices(len(frames), frames=video_frames)
                if fps:
                    fps = fps * len(idx) / len(frames)
                frames = [frames[j] for j in idx]
            names = []
            for j, fr in enumerate(frames):
                name = f"v{i}.f{j:03d}.{image_format}"
                members[name] = _encode_image(fr, image_format, jpeg_quality)
                names.append(name)
            visuals.append({"kind": "video", "frames": names, "fps": fps})
    header = {
        "urt_shard_format": FORMAT_VERSION, "key": s.key, "task": s.task, "label": s.label,
        "caption": s.caption, "question": s.question,
        "answers": list(s.answers) if s.answers is not None else None,
        "cot": s.cot, "source": s.source, "meta": s.meta, "visuals": visuals,
    }
    return header, members


def _new_shard_stats(name: str) -> dict:
    return {"name": name, "count": 0, "tasks": {}, "labels": {}, "sources": {}}


def _count(stats: dict, task: str, label, source: str) -> None:
    stats["count"] += 1
    stats["tasks"][task] = stats["tasks"].get(task, 0) + 1
    lab = stats["labels"].setdefault(task, {})
    lab[str(label)] = lab.get(str(label), 0) + 1
    stats["sources"][source] = stats["sources"].get(source, 0) + 1


def _totals(shards: list[dict]) -> dict:
    tot = {"total": 0, "tasks": {}, "labels": {}, "sources": {}}
    for sh in shards:
        tot["total"] += sh["count"]
        for t, n in sh["tasks"].items():
            tot["tasks"][t] = tot["tasks"].get(t, 0) + n
        for t, d in sh["labels"].items():
            lab = tot["labels"].setdefault(t, {})
            for k, n in d.items():
                lab[k] = lab.get(k, 0) + n
        for s, n in sh["sources"].items():
            tot["sources"][s] = tot["sources"].get(s, 0) + n
    return tot


def write_shards(samples: Iterable[Sample], out_dir: str | Path, *, prefix: str = "shard",
                 maxcount: int = 1000, maxsize: float = 3e9, image_format: str = "png",
                 jpeg_quality: int = 95, video_storage: str = "frames", video_frames: int | None = None,
                 overwrite: bool = False) -> list[Path]:
    """Write samples into ``out_dir/<prefix>-000000.tar, …`` (webdataset ``ShardWriter``) and update
    ``out_dir/index.json``. Returns the shard paths written.

    image_format: "png" (lossless) or "jpg" (``jpeg_quality``), for images and video frames.
    video_storage: "frames" stores each video as image members (encoded videos are decoded first, all
    frames unless ``video_frames`` uniformly subsamples them); "file" stores the encoded file as is
    (videos given as frames are encoded to mp4/H.264, lossy). Existing ``<prefix>-*.tar`` files in
    ``out_dir`` are an error unless ``overwrite`` (then they are deleted first).
    """
    import webdataset as wds

    if image_format == "jpeg":
        image_format = "jpg"
    if image_format not in IMAGE_FORMATS:
        raise UrtError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if video_storage not in VIDEO_STORAGE:
        raise UrtError(f"video_storage must be one of {VIDEO_STORAGE}, got {video_storage!r}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", prefix):
        raise UrtError(f"shard prefix must be letters, digits, '_' or '-', got {prefix!r}")
    if maxcount < 1:
        raise UrtError(f"maxcount must be >= 1, got {maxcount}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern_re = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
    existing = sorted(p for p in out.iterdir() if pattern_re.match(p.name))
    if existing and not overwrite:
        raise UrtError(f"{out}: already holds {len(existing)} shard(s) named {prefix}-*.tar "
                       f"(e.g. {existing[0].name}); pass --overwrite (overwrite=True) to replace them, or choose "
                       f"another --prefix or output folder")
    for p in out.glob(f"{prefix}-*.tar{PARTIAL}"):  # left by a write that was killed
        p.unlink()

    # Shards are written as <name>.tar.partial (no reader takes them for shards) and renamed, the index
    # updated, only once every sample is written: a failed or killed write publishes nothing, and shards
    # being replaced (overwrite) are kept until then.
    shard_stats: list[dict] = []
    seen: dict[str, str] = {}

    handles: dict[str, Any] = {}

    def opened(fname: str):
        shard_stats.append(_new_shard_stats(Path(fname).name))
        handles[fname] = open(fname + PARTIAL, "wb")
        return handles[fname]

    def closed(fname: str):  # TarWriter does not close file objects it did not open
        handles.pop(fname).close()

    writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=maxcount, maxsize=maxsize,
                             verbose=0, encoder=False, mtime=0, opener=opened, post=closed)
    ok = False
    try:
        for s in samples:
            if not isinstance(s, Sample):
                raise UrtError(f"write_shards expects Sample objects, got {type(s).__name__}")
            tk = tar_key(s.key)
            if tk in seen:
                raise UrtError(f"duplicate sample key {s.key!r}" + (
                    "" if seen[tk] == s.key else f" (tar key {tk!r} also used by {seen[tk]!r})"))
            seen[tk] = s.key
            header, members = _sample_record(s, image_format=image_format, jpeg_quality=jpeg_quality,
                                             video_storage=video_storage, video_frames=video_frames)
            try:
                js = json.dumps(header, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise UrtError(f"sample {s.key!r}: meta is not JSON-serialisable ({err})") from None
            obj = {"__key__": tk, "json": js.encode("utf-8"), **members}
            # ShardWriter opens the next shard lazily inside write(); count after it is opened.
            writer.write(obj)
            _count(shard_stats[-1], s.task, s.label, s.source)
        ok = True
    finally:
        writer.close()
        for h in handles.values():
            h.close()
        if not ok:
            for st in shard_stats:
                (out / (st["name"] + PARTIAL)).unlink(missing_ok=True)
    # The writer opens its first shard eagerly; an empty one (no samples at all) is removed.
    paths = []
    kept = []
    for st in shard_stats:
        p = out / st["name"]
        if st["count"] == 0:
            (out / (st["name"] + PARTIAL)).unlink(missing_ok=True)
            continue
        paths.append(p)
        kept.append(st)
    for p in existing:  # replaced (overwrite): the old set goes only now that the new one is complete
        if p not in paths:
            p.unlink()
    for p in paths:
        os.replace(str(p) + PARTIAL, p)
    _update_index(out, prefix, kept, {"image_format": image_format, "video_storage": video_storage,
                                      "maxcount": maxcount})
    return paths


def _update_index(out: Path, prefix: str, shards: list[dict], options: dict) -> None:
    path = out / INDEX_NAME
    others: list[dict] = []
    opts = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            pat = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
            others = [sh for sh in old.get("shards", []) if not pat.match(sh.get("name", ""))
                      and (out / sh.get("name", "")).exists()]
            opts = old.get("options", {})
        except (ValueError, AttributeError):
            others = []
    opts[prefix] = options
    all_shards = sorted(others + shards, key=lambda sh: sh["name"])
    index = {"format": "urt-shards", "version": FORMAT_VERSION, **_totals(all_shards),
             "shards": all_shards, "options": opts}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


# ============================================================================================ reader
def read_index(directory: str | Path) -> dict | None:
    """The ``index.json`` manifest of a shard directory, or None when there is none."""
    p = Path(directory) / INDEX_NAME
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as err:
        raise UrtError(f"{p}: not valid JSON ({err})") from None


def resolve_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard paths from a directory (its index.json order, else sorted ``*.tar``), a glob, a brace
    pattern (``shard-{000000..000009}.tar``), a single file, or a list of any of those."""
    if isinstance(spec, (list, tuple)):
        out: list[str] = []
        for s in spec:
            out.extend(resolve_shards(s))
        return out
    s = str(spec)
    p = Path(s)
    if p.is_dir():
        index = read_index(p)
        if index is not None and index.get("shards"):
            urls = [str(p / sh["name"]) for sh in index["shards"]]
            missing = [u for u in urls if not Path(u).exists()]
            if missing:
                raise UrtError(f"{p / INDEX_NAME}: lists shard(s) that do not exist: {', '.join(missing[:3])}")
            return urls
        urls = sorted(str(x) for x in p.glob("*.tar"))
        if not urls and index is not None and not index.get("shards"):
            # write_shards over zero samples writes only the index: a valid, empty set (e.g. the SFT
            # side of rejection sampling when no trace was correct).
            return []
        if not urls:
            partial = sorted(x.name for x in p.glob(f"*.tar{PARTIAL}"))
            if partial:
                raise UrtError(f"{p}: no .tar shards in this directory, only {len(partial)} unfinished one(s) "
                               f"({partial[0]}, ...) from a conversion that did not complete: run it again")
            raise UrtError(f"{p}: no .tar shards in this directory")
        return urls
    if "{" in s and ".." in s:
        import braceexpand

        urls = list(braceexpand.braceexpand(s))
        return urls
    if any(c in s for c in "*?["):
        urls = sorted(_glob.glob(s))
        if not urls:
            raise UrtError(f"{s}: no shards match this pattern")
        return urls
    if p.is_file() or "://" in s:
        return [s]
    raise UrtError(f"{s}: no such shard file or directory")


def expected_counts(urls: Sequence[str]) -> dict[str, int]:
    """Per-shard sample counts from the index.json next to each local shard (where there is one)."""
    counts: dict[str, int] = {}
    by_dir: dict[str, dict[str, int]] = {}
    for u in urls:
        if "://" in u:
            continue
        d = str(Path(u).parent)
        if d not in by_dir:
            try:
                idx = read_index(d) or {}
            except UrtError:
                idx = {}
            by_dir[d] = {sh.get("name"): int(sh.get("count", 0)) for sh in idx.get("shards", [])
                         if isinstance(sh, dict)}
        name = Path(u).name
        if name in by_dir[d]:
            counts[u] = by_dir[d][name]
    return counts


class _Guard:
    """webdataset exception handler + shard-level checks, shared by one pipeline.

    webdataset calls ``handler(exn)`` for tar-level errors (an unreadable file, a truncated or damaged
    tar); a member truncated mid-data reports twice (once from the member read, without the url, then
    from the shard expander, with it), so the first is held until the url is known. ``track`` (used as
    webdataset's ``rename_files``) remembers the last member read, to name where a shard broke.
    ``count_stage`` compares samples per shard with index.json, catching shards cut at a member
    boundary (tarfile ends those silently)."""

    def __init__(self, on_error: str, stats: SkipStats | None, expected: dict[str, int] | None = None):
        if on_error not in ON_ERROR:
            raise UrtError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.stats = stats if stats is not None else SkipStats()
        self.expected = expected or {}
        self.last_member: str | None = None
        self.pending: str | None = None
        self.flagged: set[str] = set()
        self.checked: set[str] = set()  # shards whose count was compared with index.json
        self.current_url: str | None = None

    # -- webdataset hooks
    def track(self, fname: str) -> str:
        self.last_member = fname
        return fname

    def _where(self) -> str | None:
        if self.last_member is None:
            return None
        return self.last_member.split(".", 1)[0]

    def handler(self, exn: Exception) -> bool:
        if isinstance(exn, ShardError):
            return self.fail(exn)
        args = getattr(exn, "args", ()) or ()
        msg = str(args[0]) if args else type(exn).__name__
        if " @ " in msg and len(args) == 1:  # member read failed; url comes with the next report
            self.pending = msg.split(" @ ", 1)[0]
            return True
        if isinstance(exn, (FileNotFoundError, PermissionError, IsADirectoryError)):
            shard = getattr(exn, "filename", None) or (args[-1] if args else "?")
            return self.fail(ShardError(str(shard), None, "unreadable_shard", f"{type(exn).__name__}: {msg}"))
        url = args[-1] if len(args) >= 3 and isinstance(args[-1], str) else (self.current_url or "?")
        if "duplicate file name" in msg:  # webdataset's grouping; the first copy is kept
            return self.fail(ShardError(url, self._where(), "duplicate_member", msg.split(" {", 1)[0]))
        detail = self.pending or msg
        self.pending = None
        unread = url != self.current_url  # not one sample of this shard came through
        after = f" after member {self.last_member!r}" if self.last_member and not unread else ""
        self.fail(ShardError(url, None if unread else self._where(), "truncated_tar",
                             f"{type(exn).__name__}: {detail}{after}; later samples of this shard are lost"),
                  shard_once=True)
        if unread and url in self.expected and url not in self.checked:
            # count_stage never sees this shard: count its lost samples here
            self.checked.add(url)
            self._check(url, 0)
        return True

    def fail(self, err: ShardError, n: int = 1, shard_once: bool = False) -> bool:
        if shard_once:
            if err.shard in self.flagged:
                return True
            self.flagged.add(err.shard)
        if self.on_error == "raise":
            raise err
        self.stats.record(err, n)
        return True

    def count_stage(self, src: Iterable[dict]) -> Iterator[dict]:
        url, n = None, 0
        for raw in src:
            u = raw.get("__url__")
            if u != url:
                self._check(url, n)
                url, n = u, 0
                self.current_url = u
            n += 1
            yield raw
        self._check(url, n)
        if self.pending:
            msg, self.pending = self.pending, None
            self.fail(ShardError(url or "?", self._where(), "truncated_tar", msg), shard_once=True)

    def _check(self, url: str | None, n: int) -> None:
        if url is None or url not in self.expected:
            return
        self.checked.add(url)
        want = self.expected[url]
        if n < want:
            self.fail(ShardError(url, None, "missing_samples",
                                 f"index.json lists {want} sample(s), the shard holds {n}"), n=want - n)

    def map_handler(self, exn: Exception) -> bool:
        if isinstance(exn, ShardError):
            return self.fail(exn)
        raise exn

    def counted(self, sample):
        self.stats.ok += 1
        return sample


def loading_options(frames: int = 8, frame_sampling: str = "uniform", fps: float | None = None,
               max_frames: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
               video_min_pixels: int | None = None, video_max_pixels: int | None = None) -> dict:
    if frame_sampling not in ("uniform", "fps"):
        raise UrtError(f"frame_sampling must be 'uniform' or 'fps', got {frame_sampling!r}")
    if frame_sampling == "fps" and not fps:
        raise UrtError("frame_sampling='fps' needs fps=<target frames per second>")
    if frames < 1:
        raise UrtError(f"frames must be >= 1, got {frames}")
    return dict(frames=frames, frame_sampling=frame_sampling, fps=fps, max_frames=max_frames,
                min_pixels=min_pixels, max_pixels=max_pixels, video_min_pixels=video_min_pixels,
                video_max_pixels=video_max_pixels)


_REQUIRED = ("key", "task", "label", "visuals")


def parse_header(raw: dict) -> dict:
    """The checked ``.json`` of a raw webdataset sample (dict of member bytes with ``__key__`` and
    ``__url__``). Raises ShardError for a missing/invalid json, missing fields, unknown task or label."""
    shard, tk = str(raw.get("__url__", "?")), raw.get("__key__")
    if "json" not in raw:
        others = sorted(k for k in raw if not k.startswith("__"))
        raise ShardError(shard, tk, "missing_json", f"members present: {', '.join(others) or 'none'}")
    try:
        h = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as err:
        raise ShardError(shard, tk, "bad_json", str(err)) from None
    if not isinstance(h, dict):
        raise ShardError(shard, tk, "bad_json", f"expected an object, got {type(h).__name__}")
    key = h.get("key", tk)
    missing = [f for f in _REQUIRED if f not in h or h[f] is None]
    if not missing and h["task"] in GENERATION_TASKS:
        missing += [f for f in ("caption",) if h.get(f) is None]
    elif not missing and h["task"] in TASKS:
        missing += [f for f in ("question", "answers") if h.get(f) is None]
    if missing:
        raise ShardError(shard, key, "missing_field", f"missing {', '.join(missing)}")
    if h["task"] not in TASKS:
        raise ShardError(shard, key, "bad_task", f"unknown task {h['task']!r}")
    if h["label"] not in LABELS or isinstance(h["label"], bool):
        raise ShardError(shard, key, "bad_label", f"label must be 1, 2 or 'tie', got {h['label']!r}")
    if not isinstance(h["visuals"], list) or not all(isinstance(v, dict) and v.get("kind") in ("image", "video")
                                                       for v in h["visuals"]):
        raise ShardError(shard, key, "bad_visuals", f"visuals must be a list of image/video entries, "
                                                    f"got {str(h['visuals'])[:120]}")
    return h


def decode_sample(raw: dict, *, frames: int = 8, frame_sampling: str = "uniform", fps: float | None = None,
                  max_frames: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                  video_min_pixels: int | None = None, video_max_pixels: int | None = None) -> Sample:
    """Rebuild a Sample from a raw webdataset sample (``{"__key__", "__url__", "json", "v0.png", …}``).

    Images are converted to RGB and fitted to ``[min_pixels, max_pixels]``; videos are sampled to
    ``frames`` frames (``frame_sampling`` "uniform", or "fps" with ``fps`` and ``max_frames``; see
    urt.data.video) and fitted to ``[video_min_pixels, video_max_pixels]``. Videos stored as frames with
    no more than ``frames`` frames are kept whole. A returned Video's ``fps`` is the rate of the frames
    it holds (source fps x kept/total). Raises ShardError (shard, key, reason) for any bad input."""
    shard = str(raw.get("__url__", "?"))
    h = parse_header(raw)
    key = h.get("key", raw.get("__key__"))

    def member(name) -> bytes:
        if not isinstance(name, str) or name.lower() not in raw:
            raise ShardError(shard, key, "missing_member", f"{name!r} is named in the json but not in the tar")
        return raw[name.lower()]

    def image(name, lo, hi) -> Image.Image:
        try:
            img = load_image(member(name), where=name)
        except ShardError:
            raise
        except UrtError as err:
            raise ShardError(shard, key, "corrupt_image", str(err)) from None
        return fit_pixels(img, lo, hi)

    visuals: list = []
    for entry in h["visuals"]:
        if entry["kind"] == "image":
            visuals.append(image(entry.get("member"), min_pixels, max_pixels))
            continue
        src_fps = entry.get("fps")
        if "frames" in entry:
            names = entry["frames"]
            if not isinstance(names, list):
                raise ShardError(shard, key, "bad_visuals", "video 'frames' must be a list of member names")
            if not names:
                raise ShardError(shard, key, "empty_video", "video entry lists zero frames")
            for nm in names:
                member(nm)
            idx = sample_indices(len(names), frames=frames, frame_sampling=frame_sampling, fps=fps,
                                 max_frames=max_frames, video_fps=src_fps)
            imgs = [image(names[i], video_min_pixels, video_max_pixels) for i in idx]
            n_total = len(names)
        elif "member" in entry:
            name = entry["member"]
            data = member(name)
            info: dict = {}
            try:
                imgs, probed = decode_video(data, where=name, frames=frames,
                                            frame_sampling=frame_sampling, fps=fps, max_frames=max_frames,
                                            min_pixels=video_min_pixels, max_pixels=video_max_pixels,
                                            info=info)
            except EmptyVideoError as err:
                raise ShardError(shard, key, "empty_video", str(err)) from None
            except UrtError as err:
                raise ShardError(shard, key, "bad_video", str(err)) from None
            src_fps = src_fps or probed
            n_total = info["total_frames"]
        else:
            raise ShardError(shard, key, "bad_visuals", "a video entry needs 'frames' or 'member'")
        out_fps = src_fps  # rate of the kept frames: kept / duration, duration = total / src_fps
        if src_fps and n_total and len(imgs) != n_total:
            out_fps = src_fps * len(imgs) / n_total
        visuals.append(Video(frames=imgs, fps=out_fps))
    try:
        return Sample(key=key, task=h["task"], label=h["label"], visuals=visuals, caption=h.get("caption"),
                      question=h.get("question"), answers=h.get("answers"), cot=h.get("cot"),
                      source=h.get("source") or "", meta=h.get("meta") or {})
    except UrtError as err:
        raise ShardError(shard, key, "invalid_sample", str(err)) from None


def make_pipeline(urls, *, shuffle_buffer: int = 0, seed: int = 0, shardshuffle: int | bool = False,
                  nodesplitter: Callable | None = None, workersplitter: Callable | None = None,
                  on_error: str = "raise", stats: SkipStats | None = None, decode: bool = True,
                  select_files: Callable[[str], bool] | None = None, **load_opts):
    """A ``wds.WebDataset`` over ``urls`` (anything :func:`resolve_shards` takes) that yields Samples:
    ``WebDataset(urls, shardshuffle, nodesplitter, workersplitter, seed, handler)`` → per-shard count
    check → ``.shuffle(shuffle_buffer)`` (if > 0) → ``.map(decode_sample)``.

    For training pass e.g. ``nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
    shardshuffle=100``. ``stats`` collects skips (on_error="skip"); in DataLoader workers each worker has
    its own copy. ``decode=False`` yields the raw webdataset dicts instead (after the checks)."""
    import webdataset as wds

    url_list = resolve_shards(urls)
    if not url_list:  # an empty shard set (index.json with no shards) reads as no samples
        empty = _NoSamples()
        empty.urt_stats = stats if stats is not None else SkipStats()  # as a real pipeline carries (iter_headers)
        return empty
    opts = loading_options(**load_opts)
    guard = _Guard(on_error, stats, expected_counts(url_list))
    ds = wds.WebDataset(url_list, handler=guard.handler, shardshuffle=shardshuffle or False,
                        nodesplitter=nodesplitter, workersplitter=workersplitter, seed=seed,
                        rename_files=guard.track, select_files=select_files, empty_check=False)
    ds = ds.compose(guard.count_stage)
    if shuffle_buffer and shuffle_buffer > 0:
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    if decode:
        ds = ds.map(partial(decode_sample, **opts), handler=guard.map_handler)
    ds = ds.map(guard.counted)
    ds.urt_stats = guard.stats
    return ds


class _NoSamples(IterableDataset):
    def __iter__(self):
        return iter(())


def read_shards(urls_or_dir, *, on_error: str = "raise", frames: int = 8, frame_sampling: str = "uniform",
                fps: float | None = None, max_frames: int | None = None, min_pixels: int | None = None,
                max_pixels: int | None = None, video_min_pixels: int | None = None,
                video_max_pixels: int | None = None, stats: SkipStats | None = None) -> Iterator[Sample]:
    """Iterate the Samples of shards in order (a directory, glob, brace pattern, file or list).
    on_error="raise": the first bad sample/shard raises ShardError (shard, key, reason);
    on_error="skip": bad ones are skipped and counted per reason in ``stats`` (pass a SkipStats to see
    them; ``stats.summary()`` prints them; without one, a warning with the summary is issued at the
    end if anything was skipped)."""
    own = stats is None
    stats = SkipStats() if own else stats
    ds = make_pipeline(urls_or_dir, on_error=on_error, stats=stats, frames=frames,
                       frame_sampling=frame_sampling, fps=fps, max_frames=max_frames, min_pixels=min_pixels,
                       max_pixels=max_pixels, video_min_pixels=video_min_pixels,
                       video_max_pixels=video_max_pixels)
    yield from ds
    if own and stats.total_skipped:
        warnings.warn(f"read_shards({urls_or_dir!s}): {stats.summary()}", stacklevel=2)


def iter_headers(urls_or_dir, *, on_error: str = "skip", stats: SkipStats | None = None
                 ) -> Iterator[tuple[str, dict]]:
    """``(shard, checked json header)`` for every sample, reading only the json members (fast: no
    image or video is decoded). Bad headers and shards are handled as in :func:`read_shards`."""
    ds = make_pipeline(urls_or_dir, on_error=on_error, stats=stats, decode=False,
                       select_files=lambda f: f.endswith(".json"))
    guard_stats = ds.urt_stats
    for raw in ds:
        try:
            h = parse_header(raw)
        except ShardError as err:
            if on_error == "raise":
                raise
            guard_stats.record(err)
            guard_stats.ok -= 1  # `counted` already ran
            continue
        yield str(raw.get("__url__", "?")), h
