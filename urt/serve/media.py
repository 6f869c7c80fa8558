"""Images and videos of a chat request, decoded under the server's limits.

A visual is given as an `image_url` part (`{"type": "image_url", "image_url": {"url": URL}}`) or, as vLLM
accepts, a `video_url` part (`{"type": "video_url", "video_url": {"url": URL}}`); URL is either

* a base64 data URL: `data:image/png;base64,...`, `data:video/mp4;base64,...`, or
* a path on the server: `file:///abs/path.png` (percent-encoded) or `/abs/path.png`, accepted only when the
  operator gave `--media-root` directories and the path lies inside one of them. Without a media root
  path inputs are refused: nothing is read from disk, and nothing is ever fetched from the network.

Path checks, in order: absolute, no `..` component (403), the path with every symlink resolved inside a
media root (403: a symlink out of the root is refused), then opened component by component from the root
with O_NOFOLLOW (a component swapped for a symlink after the check fails instead of being followed), a
regular file only (a FIFO, device or directory is refused; O_NONBLOCK so a FIFO cannot hang the open), at
most `max_media_bytes` by fstat before reading and by the read itself.

Decoding is bounded before it starts: an image's size is read from its header and charged to the
request's pixel budget before its pixels are decoded; a video's frames are counted from its packets
(nothing decoded) against `max_video_frames`, its `video_frames` kept frames x the stream's frame size are
charged to the budget, and only then are the kept frames decoded.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable
from urllib.parse import unquote, urlsplit

from urt.errors import UrtError, describe
from urt.serve.errors import RequestError
from urt.serve.limits import Limits

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.DOTALL)
# Frame rate assumed for a video whose container gives none (Qwen2-VL's video processor default).
DEFAULT_VIDEO_FPS = 2.0


@dataclass
class Clip:
    """A decoded video: its kept frames (RGB PIL images, in time order) and their frame rate."""

    frames: list
    fps: float


class PixelBudget:
    """The decoded pixels one request may still take (`Limits.max_pixels` in all)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.used = 0

    def take(self, pixels: int, where: str) -> None:
        if self.used + pixels > self.limits.max_pixels:
            raise self.limits.refuse("max_pixels", f"{where}: the request's images and video frames come to "
                                     f"{self.used + pixels} pixels", status=413, param=where)
        self.used += pixels


def media_roots(dirs: Iterable[str | Path]) -> list[Path]:
    """`--media-root` directories, resolved (symlinks followed once, here, by the operator's choice)."""
    roots = []
    for d in dirs:
        p = Path(d).expanduser()
        if not p.is_dir():
            raise UrtError(f"--media-root {str(d)!r} is not a directory")
        roots.append(Path(os.path.realpath(p)))
    return roots


class MediaReader:
    """Turns image / video URLs into decoded visuals under `limits`, reading paths only inside `roots`."""

    def __init__(self, limits: Limits | None = None, roots: Iterable[str | Path] = ()):
        self.limits = limits or Limits()
        self.roots = media_roots(roots)

    # ------------------------------------------------------------------------------ bytes

    def _bytes(self, url, where: str, kind: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise RequestError(f"{where}: the {kind} url must be a non-empty string", param=where)
        head = url[:16].lower()
        if head.startswith("data:"):
            return self._data_url(url, where, kind)
        if head.startswith(("http://", "https://", "ftp://")):
            raise RequestError(
                f"{where}: this server fetches nothing from the network; send a base64 data URL "
                f"(data:{kind}/...;base64,...) or a path under its --media-root (got {url[:40]!r}...)",
                param=where, code=f"unsupported_{kind}_url")
        if head.startswith("file:") or url.startswith("/"):
            return self._path(url, where)
        raise RequestError(f"{where}: expected a data URL (data:{kind}/<type>;base64,<data>), a file:/// URL or "
                           f"an absolute path, got {url[:40]!r}", param=where, code=f"unsupported_{kind}_url")

    def _data_url(self, url: str, where: str, kind: str) -> bytes:
        m = _DATA_URL.match(url)
        if m is None:
            raise RequestError(f"{where}: not a data URL (expected data:{kind}/<type>;base64,<data>)", param=where)
        mime = m.group("mime").strip().lower()
        params = [p.strip().lower() for p in m.group("params").split(";") if p.strip()]
        if mime and not mime.startswith(f"{kind}/"):
            raise RequestError(f"{where}: data URL media type {mime!r} is not an {kind}" if kind == "image" else
                               f"{where}: data URL media type {mime!r} is not a {kind}", param=where)
        if "base64" not in params:
            raise RequestError(f"{where}: the data URL must be base64-encoded (data:{kind}/...;base64,...)",
                               param=where)
        data = re.sub(r"\s+", "", m.group("data"))
        size = len(data) * 3 // 4 - (len(data) % 4 == 0) * data[-2:].count("=")  # decoded size, before decoding
        if size > self.limits.max_media_bytes:
            raise self.limits.refuse("max_media_bytes", f"{where}: the data URL holds {size} bytes", status=413,
                                     param=where)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(f"{where}: invalid base64 {kind} data ({err})", param=where,
                               code=f"invalid_{kind}") from None
        if not raw:
            raise RequestError(f"{where}: empty {kind} data", param=where, code=f"invalid_{kind}")
        return raw

    def _path(self, url: str, where: str) -> bytes:
        if url[:5].lower() == "file:":
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise RequestError(f"{where}: file URL host {parts.netloc!r} is not this machine; use file:///path",
                                   param=where, code="invalid_media_path")
            path = unquote(parts.path)
        else:
            path = url
        if not self.roots:
            raise RequestError(f"{where}: path inputs are disabled on this server (no --media-root); send a base64 "
                               f"data URL", param=where, code="media_paths_disabled")
        if "\x00" in path or not path.startswith("/"):
            raise RequestError(f"{where}: a media path must be absolute (file:///path or /path), got {path!r}",
                               param=where, code="invalid_media_path")
        if ".." in PurePosixPath(path).parts:
            raise RequestError(f"{where}: '..' is not allowed in a media path ({path!r})", status=403, param=where,
                               code="media_path_forbidden")
        real = Path(os.path.realpath(path))
        root = next((r for r in self.roots if real.is_relative_to(r)), None)
        if root is None:
            raise RequestError(f"{where}: {path!r} is outside this server's media roots (symlinks resolved)",
                               status=403, param=where, code="media_path_forbidden")
        rel = real.relative_to(root).parts
        if not rel:
            raise RequestError(f"{where}: {path!r} is a directory, not a regular file", param=where,
                               code="invalid_media_path")
        fd = self._open_below(root, rel, path, where)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RequestError(f"{where}: {path!r} is not a regular file", param=where, code="invalid_media_path")
            cap = self.limits.max_media_bytes
            if st.st_size > cap:
                raise self.limits.refuse("max_media_bytes", f"{where}: {path!r} is {st.st_size} bytes", status=413,
                                         param=where)
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read(cap + 1)  # the file may have grown since fstat
        finally:
            os.close(fd)
        if len(raw) > cap:
            raise self.limits.refuse("max_media_bytes", f"{where}: {path!r} is more than {cap} bytes", status=413,
                                     param=where)
        if not raw:
            raise RequestError(f"{where}: {path!r} is empty", param=where, code="invalid_media_path")
        return raw

    @staticmethod
    def _open_below(root: Path, rel: tuple[str, ...], path: str, where: str) -> int:
        """Open `root/rel` without following any symlink below the root (the walk repeats the resolved path
        with O_NOFOLLOW, so a component replaced by a symlink after resolution makes it fail)."""
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        nofollow = getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(root, flags | getattr(os, "O_DIRECTORY", 0))
        try:
            for part in rel[:-1]:
                nxt = os.open(part, flags | getattr(os, "O_DIRECTORY", 0) | nofollow, dir_fd=fd)
                os.close(fd)
                fd = nxt
            return os.open(rel[-1], flags | nofollow | getattr(os, "O_NONBLOCK", 0), dir_fd=fd)
        except FileNotFoundError:
            raise RequestError(f"{where}: {path!r} not found", param=where, code="invalid_media_path") from None
        except OSError as err:
            if err.errno == errno.ELOOP:  # the path was resolved above: this symlink was swapped in, or loops
                raise RequestError(f"{where}: {path!r} leads through a symlink that was swapped in after the check "
                                   f"or loops", status=403, param=where, code="media_path_forbidden") from None
            if err.errno == errno.ENOTDIR:
                raise RequestError(f"{where}: {path!r}: a component of the path is not a directory", param=where,
                                   code="invalid_media_path") from None
            raise RequestError(f"{where}: cannot open {path!r} ({err.strerror})", param=where,
                               code="invalid_media_path") from None
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------ decoding

    def image(self, url, where: str, budget: PixelBudget):
        """One RGB PIL image; its pixels are charged to `budget` before they are decoded."""
        from PIL import Image

        from urt.data.schema import to_rgb

        raw = self._bytes(url, where, "image")
        try:
            img = Image.open(io.BytesIO(raw))
        except Image.DecompressionBombError:
            raise self.limits.refuse("max_pixels", f"{where}: the image is larger than PIL's decompression-bomb "
                                     f"limit", status=413, param=where) from None
        except Exception as err:  # noqa: BLE001 - PIL raises many types for data that is no image
            raise RequestError(f"{where}: cannot decode image ({describe(err)})", param=where,
                               code="invalid_image") from None
        budget.take(img.width * img.height, where)
        try:
            img.load()
            return to_rgb(img)
        except Exception as err:  # noqa: BLE001
            raise RequestError(f"{where}: cannot decode image ({describe(err)})", param=where,
                               code="invalid_image") from None

    def video(self, url, where: str, budget: PixelBudget) -> Clip:
        """`video_frames` uniformly spaced RGB frames (every frame of a shorter video) and their rate."""
        raw = self._bytes(url, where, "video")
        try:
            return self._decode_video(raw, where, budget)
        except RequestError:
            raise
        except Exception as err:  # noqa: BLE001 - av raises many types for corrupt or truncated data
            raise RequestError(f"{where}: cannot decode video ({type(err).__name__}: {err})", param=where,
                               code="invalid_video") from None

    def _decode_video(self, raw: bytes, where: str, budget: PixelBudget) -> Clip:
        import av

        from urt.data.video import sample_indices

        lim = self.limits
        with av.open(io.BytesIO(raw)) as c:  # count frames from packets: nothing is decoded yet
            if not c.streams.video:
                raise RequestError(f"{where}: no video stream", param=where, code="invalid_video")
            s = c.streams.video[0]
            rate = s.average_rate or s.base_rate
            src_fps = float(rate) if rate else None
            width, height = s.codec_context.width, s.codec_context.height
            n = 0
            for pkt in c.demux(s):
                if pkt.size:
                    n += 1
                    if n > lim.max_video_frames:
                        raise lim.refuse("max_video_frames", f"{where}: the video has more than "
                                         f"{lim.max_video_frames} frames", status=413, param=where)
        if n == 0:
            raise RequestError(f"{where}: the video has no frames", param=where, code="invalid_video")
        keep = sample_indices(n, frames=lim.video_frames)
        budget.take(len(keep) * width * height, where)
        frames, decoded = self._frames(raw, keep)
        if len(frames) < len(keep):  # fewer decodable frames than packets: resample over those that decode
            keep = sample_indices(decoded, frames=lim.video_frames) if decoded else []
            frames, _ = self._frames(raw, keep)
        if not frames:
            raise RequestError(f"{where}: no frame of the video decodes", param=where, code="invalid_video")
        extra = sum(f.width * f.height for f in frames) - len(keep) * width * height
        if extra > 0:  # frames larger than the stream header said
            budget.take(extra, where)
        fps = (len(frames) * src_fps / n) if src_fps else DEFAULT_VIDEO_FPS
        return Clip(frames=frames, fps=fps)

    @staticmethod
    def _frames(raw: bytes, keep: list[int]) -> tuple[list, int]:
        """(the frames at indices `keep` as RGB images, how many frames were decoded): decoding stops at
        the last kept frame, so the count is the video's length only when some kept frame was missing."""
        import av

        wanted, last = set(keep), max(keep, default=-1)
        out = []
        decoded = 0
        with av.open(io.BytesIO(raw)) as c:
            for i, frame in enumerate(c.decode(c.streams.video[0])):
                decoded = i + 1
                if i in wanted:
                    out.append(frame.to_image().convert("RGB"))
                if i >= last:
                    break
        return out, decoded
