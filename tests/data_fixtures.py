"""Shared builders for data tests: tiny real images (easy-vqa), synthetic videos encoded with PyAV,
samples of all four tasks, and raw tar shards for bad-input cases."""

from __future__ import annotations

import io
import json
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from urt.data.schema import Sample, Video
from urt.data.video import encode_video


@lru_cache(maxsize=1)
def _vqa():
    import easy_vqa

    paths = easy_vqa.get_train_image_paths()  # {image id: png path}
    questions, answers, ids = easy_vqa.get_train_questions()
    return paths, questions, answers, ids


def vqa_image(i: int = 0) -> Image.Image:
    """A real 64x64 RGB image from easy-vqa (deterministic by index)."""
    paths = _vqa()[0]
    img = Image.open(paths[sorted(paths)[i]])
    img.load()
    return img.convert("RGB")


def vqa_question(i: int = 0) -> tuple[str, str, Image.Image]:
    """(question, answer, image) of the i-th easy-vqa training question."""
    paths, qs, ans, ids = _vqa()
    img = Image.open(paths[ids[i]])
    img.load()
    return qs[i], ans[i], img.convert("RGB")


def synthetic_frames(n: int, size: tuple[int, int] = (64, 48), seed: int = 0) -> list[Image.Image]:
    """n distinct frames: brightness encodes the frame index (10*i mod 250) plus a moving square."""
    w, h = size
    out = []
    for i in range(n):
        a = np.full((h, w, 3), (10 * i + seed) % 250, np.uint8)
        x = (4 * i) % max(1, w - 8)
        a[8:16, x : x + 8] = (255, 0, 0)
        out.append(Image.fromarray(a))
    return out


def mp4_bytes(n: int = 20, fps: float = 10.0, size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    return encode_video(synthetic_frames(n, size, seed), fps=fps)


def empty_video_bytes() -> bytes:
    """A valid AVI container with one video stream and zero frames."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="avi") as out:
        s = out.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        out.start_encoding()
    return buf.getvalue()


def four_task_samples(video_data: bool = True) -> list[Sample]:
    """One sample per task, every field set: image gen (2 easy-vqa images), image understanding
    (easy-vqa question), video gen (two 6-frame videos as frames), video understanding (an encoded mp4
    of 20 frames at 10 fps if ``video_data`` else 5 frames)."""
    q, a, img = vqa_question(0)
    v_und = Video(data=mp4_bytes(20, 10.0), fps=10.0) if video_data else Video(frames=synthetic_frames(5), fps=5.0)
    return [
        Sample("ig.0/a", "image_generation", 1, [vqa_image(1), vqa_image(2)], caption="a blue circle",
               cot="<think>Image 1: 8/10\nImage 2: 3/10</think>\n<answer>Image 1 is better</answer>",
               source="easy_vqa", meta={"pair": [1, 2], "swapped": False}),
        Sample("iu-0", "image_understanding", 2, [img], question=q, answers=("no idea", a),
               source="easy_vqa", meta={"swapped": True, "nested": {"x": 1.5}}),
        Sample("vg-0", "video_generation", "tie",
               [Video(frames=synthetic_frames(6, seed=1), fps=4.0), Video(frames=synthetic_frames(6, seed=7))],
               caption="a red square moves right", source="synthetic"),
        Sample("vu-0", "video_understanding", 1, [v_und], question="what moves?",
               answers=("a red square", "a blue circle"), cot="<think>x</think>\n<answer>Answer 1 is better</answer>",
               source="synthetic", meta={}),
    ]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def header(key: str, **over) -> dict:
    """A valid image_generation json header for raw shards (override any field; None removes it)."""
    h = {"urt_shard_format": 1, "key": key, "task": "image_generation", "label": 1, "caption": "c",
         "question": None, "answers": None, "cot": None, "source": "raw", "meta": {},
         "visuals": [{"kind": "image", "member": "v0.png"}, {"kind": "image", "member": "v1.png"}]}
    for k, v in over.items():
        if v is None:
            h.pop(k, None)
        else:
            h[k] = v
    return h


def raw_sample(key: str, members: dict | None = None, **over) -> tuple[str, dict[str, bytes]]:
    """(key, {member: bytes}) with a json header and two small PNGs unless ``members`` overrides them."""
    m = {"json": json.dumps(header(key, **over)).encode(), "v0.png": png_bytes(vqa_image(3)),
         "v1.png": png_bytes(vqa_image(4))}
    m.update(members or {})
    return key, {k: v for k, v in m.items() if v is not None}


def write_raw_shard(path: str | Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar shard written by hand (members in the given order), for malformed-data tests."""
    path = Path(path)
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for name, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{name}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path
