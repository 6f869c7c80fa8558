"""Video decoding (PyAV), deterministic frame sampling, mp4 encoding, and the pixel budget.

Frame sampling is deterministic (no randomness anywhere):

* ``uniform``: N frames at ``numpy.linspace(0, n - 1, N)`` truncated to int, exactly the official
  UnifiedReward-Think inference (``np.linspace(0, total_frame_num - 1, 8, dtype=int)``). When the video has
  no more than N frames every frame is used once (the official code would repeat frames; pass
  ``repeat=True`` to :func:`sample_indices` for that).
* ``fps``: frames at times ``0, 1/fps, 2/fps, …`` (index ``floor(k * video_fps / fps)``) while inside the
  video; if that gives more than ``max_frames`` frames, ``max_frames`` uniform frames are taken instead.
  Without a known source fps, uniform sampling of ``max_frames`` (or the default N) frames is used.

Pixel budget: :func:`fit_pixels` resizes (aspect preserved) so that ``min_pixels <= w*h <= max_pixels``.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from urt.errors import UrtError, describe

FRAME_SAMPLING = ("uniform", "fps")


class VideoDecodeError(UrtError):
    """The data is not a decodable video (corrupt, truncated, no video stream)."""


class EmptyVideoError(VideoDecodeError):
    """The video decodes but holds zero frames."""


# ----------------------------------------------------------------------------------------- sampling
def uniform_indices(n: int, num: int) -> list[int]:
    """The official sampler: ``np.linspace(0, n - 1, num)`` truncated to int (may repeat if n < num)."""
    if n <= 0:
        raise UrtError(f"cannot sample frames from a video with {n} frames")
    if num <= 0:
        raise UrtError(f"number of frames to sample must be positive, got {num}")
    return [int(i) for i in np.linspace(0, n - 1, num).astype(np.int64)]


def fps_indices(n: int, video_fps: float, fps: float, max_frames: int | None = None) -> list[int]:
    """Frames every ``1/fps`` seconds starting at t=0 (index ``floor(k * video_fps / fps)``), capped at
    ``max_frames`` (beyond the cap: ``max_frames`` uniform frames over the whole video)."""
    if n <= 0:
        raise UrtError(f"cannot sample frames from a video with {n} frames")
    if not (fps and fps > 0) or not (video_fps and video_fps > 0):
        raise UrtError(f"fps sampling needs positive fps values, got target {fps!r}, video {video_fps!r}")
    step = Fraction(video_fps).limit_denominator(1_000_000) / Fraction(fps).limit_denominator(1_000_000)
    # number of k with floor(k * step) <= n - 1  <=>  k * step < n
    count = math.ceil(Fraction(n) / step)
    if max_frames is not None and count > max_frames:
        return uniform_indices(n, max_frames)
    return [int(math.floor(k * step)) for k in range(count)]


def sample_indices(n: int, *, frames: int = 8, frame_sampling: str = "uniform", fps: float | None = None,
                   max_frames: int | None = None, video_fps: float | None = None,
                   repeat: bool = False) -> list[int]:
    """Indices of the frames to keep from a video of ``n`` frames (see the module docstring)."""
    if frame_sampling not in FRAME_SAMPLING:
        raise UrtError(f"unknown frame_sampling {frame_sampling!r}; choose one of {', '.join(FRAME_SAMPLING)}")
    if frame_sampling == "fps":
        if fps is None:
            raise UrtError("frame_sampling='fps' needs a target fps")
        if video_fps:
            return fps_indices(n, video_fps, fps, max_frames)
        frames = max_frames or frames
    if n <= frames and not repeat:
        return list(range(n))
    return uniform_indices(n, frames)


# ----------------------------------------------------------------------------------------- decoding
def _open(src: bytes | str | Path):
    import av

    return av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else str(src))


def _label(src, where: str) -> str:
    return where or (str(src) if not isinstance(src, (bytes, bytearray, memoryview)) else "video bytes")


def probe_video(src: bytes | str | Path, *, where: str = "") -> dict:
    """Container facts without decoding: ``{"frames": int (0 if unknown), "fps": float | None,
    "width": int, "height": int}``."""
    label = _label(src, where)
    try:
        with _open(src) as c:
            if not c.streams.video:
                raise VideoDecodeError(f"{label}: no video stream")
            s = c.streams.video[0]
            rate = s.average_rate or s.base_rate
            return {"frames": int(s.frames or 0), "fps": float(rate) if rate else None,
                    "width": s.codec_context.width, "height": s.codec_context.height}
    except UrtError:
        raise
    except Exception as err:
        raise VideoDecodeError(f"{label}: cannot decode video ({describe(err)})") from None


def decode_video(src: bytes | str | Path, *, where: str = "", frames: int | None = 8,
                 frame_sampling: str = "uniform", fps: float | None = None, max_frames: int | None = None,
                 min_pixels: int | None = None, max_pixels: int | None = None, info: dict | None = None
                 ) -> tuple[list[Image.Image], float | None]:
    """Decode a video (bytes or path) into RGB PIL frames, sampled deterministically.

    ``frames=None`` keeps every frame. Returns ``(frames, source_fps)``. Raises UrtError naming ``where``
    (or the path) when the data cannot be decoded or holds no frames. The decoded (YUV) frames are held
    in memory once, and only the sampled ones are converted to RGB. Pass a dict as ``info`` to get
    ``{"total_frames": n, "indices": [...], "fps": source fps}`` filled in.
    """
    label = _label(src, where)
    try:
        with _open(src) as c:
            if not c.streams.video:
                raise VideoDecodeError(f"{label}: no video stream")
            s = c.streams.video[0]
            rate = s.average_rate or s.base_rate
            video_fps = float(rate) if rate else None
            raw = list(c.decode(s))
    except UrtError:
        raise
    except Exception as err:  # av.error.* / OSError for corrupt or truncated data
        raise VideoDecodeError(f"{label}: cannot decode video ({describe(err)})") from None
    if not raw:
        raise EmptyVideoError(f"{label}: video has zero frames")
    if frames is None and frame_sampling == "uniform":
        idx = list(range(len(raw)))
    else:
        idx = sample_indices(len(raw), frames=frames or 8, frame_sampling=frame_sampling, fps=fps,
                             max_frames=max_frames, video_fps=video_fps)
    out = [fit_pixels(raw[i].to_image().convert("RGB"), min_pixels, max_pixels) for i in idx]
    if info is not None:
        info.update(total_frames=len(raw), indices=idx, fps=video_fps)
    return out, video_fps


def encode_video(frames: Sequence[Image.Image], *, fps: float = 8.0, codec: str = "libx264",
                 crf: int = 18, container: str = "mp4") -> bytes:
    """Encode PIL frames into an in-memory video file (default mp4/H.264, yuv420p). Odd widths/heights
    are cropped by one pixel (yuv420p needs even sizes); all frames take the first frame's size."""
    import av

    if not frames:
        raise UrtError("cannot encode a video with zero frames")
    w, h = frames[0].size
    w, h = w - w % 2, h - h % 2
    if w < 2 or h < 2:
        raise UrtError(f"frames too small to encode ({frames[0].size})")
    buf = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        for img in frames:
            img = img.convert("RGB")
            if img.size != (w, h):
                img = img.crop((0, 0, w, h)) if img.size == frames[0].size else img.resize((w, h))
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


# ------------------------------------------------------------------------------------- pixel budget
def fit_pixels(img: Image.Image, min_pixels: int | None = None, max_pixels: int | None = None,
               resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize ``img`` (aspect ratio preserved) so that its area lies in ``[min_pixels, max_pixels]``:
    images above the budget shrink to the largest size with ``w*h <= max_pixels``, images below grow to
    the smallest size with ``w*h >= min_pixels``; images inside it (or with both bounds None) are
    returned unchanged. Each side stays >= 1 pixel."""
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise UrtError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    w, h = img.size
    area = w * h
    if max_pixels is not None and area > max_pixels:
        s = math.sqrt(max_pixels / area)
        nw, nh = max(1, math.floor(w * s)), max(1, math.floor(h * s))
        while nw * nh > max_pixels and (nw > 1 or nh > 1):  # float rounding guard
            if nw >= nh:
                nw -= 1
            else:
                nh -= 1
        return img.resize((nw, nh), resample)
    if min_pixels is not None and area < min_pixels:
        s = math.sqrt(min_pixels / area)
        nw, nh = max(1, math.ceil(w * s)), max(1, math.ceil(h * s))
        return img.resize((nw, nh), resample)
    return img
