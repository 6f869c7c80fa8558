import numpy as np
import pytest
from PIL import Image

from data_fixtures import empty_video_bytes, mp4_bytes, synthetic_frames
from urt.data.video import (EmptyVideoError, VideoDecodeError, decode_video, encode_video, fit_pixels,
                            fps_indices, probe_video, sample_indices, uniform_indices)
from urt.errors import UrtError


def _official(n, num=8):  # UnifiedReward-Think inference: np.linspace(0, total - 1, 8, dtype=int)
    return np.linspace(0, n - 1, num, dtype=int).tolist()


@pytest.mark.parametrize("n", [8, 9, 20, 100, 101, 1000, 3])
def test_uniform_indices_match_official_code(n):
    assert uniform_indices(n, 8) == _official(n)
    assert sample_indices(n, frames=8, repeat=True) == _official(n)


def test_uniform_indices_exact_values():
    assert uniform_indices(100, 8) == [0, 14, 28, 42, 56, 70, 84, 99]
    assert uniform_indices(20, 8) == [0, 2, 5, 8, 10, 13, 16, 19]
    assert uniform_indices(3, 8) == [0, 0, 0, 0, 1, 1, 1, 2]  # the official code repeats short videos
    assert sample_indices(3, frames=8) == [0, 1, 2]  # ours keeps every frame once by default
    assert sample_indices(8, frames=8) == list(range(8))


def test_fps_indices_exact():
    # 20 frames at 10 fps = 2 s; 2 fps -> t = 0, .5, 1, 1.5 s
    assert fps_indices(20, 10.0, 2.0) == [0, 5, 10, 15]
    assert fps_indices(20, 10.0, 3.0) == [0, 3, 6, 10, 13, 16]
    assert fps_indices(30, 30.0, 1.0) == [0]
    assert fps_indices(30, 29.97, 1.0) == [0, 29]  # 30 frames at 29.97 fps last 1.001 s
    assert fps_indices(60, 30.0, 1.0) == [0, 30]
    assert fps_indices(10, 10.0, 20.0) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]
    # above the cap: uniform over the whole video
    assert fps_indices(100, 10.0, 5.0, max_frames=8) == uniform_indices(100, 8)
    assert sample_indices(20, frame_sampling="fps", fps=2.0, video_fps=10.0) == [0, 5, 10, 15]
    # unknown source fps: uniform with max_frames (or frames)
    assert sample_indices(100, frame_sampling="fps", fps=2.0, max_frames=4) == uniform_indices(100, 4)
    with pytest.raises(UrtError, match="needs a target fps"):
        sample_indices(10, frame_sampling="fps")
    with pytest.raises(UrtError, match="unknown frame_sampling"):
        sample_indices(10, frame_sampling="random")


def _brightness(frames):
    # frame i of synthetic_frames has background 10*i; sample a corner away from the moving square
    return [int(round(np.asarray(f)[40:, :, :].mean() / 10)) for f in frames]


def test_decode_uniform_and_fps():
    data = mp4_bytes(20, fps=10.0)
    frames, fps = decode_video(data, frames=8)
    assert fps == 10.0 and len(frames) == 8 and frames[0].mode == "RGB" and frames[0].size == (64, 48)
    assert _brightness(frames) == uniform_indices(20, 8)
    frames, _ = decode_video(data, frame_sampling="fps", fps=2.0)
    assert _brightness(frames) == [0, 5, 10, 15]
    allf, _ = decode_video(data, frames=None)
    assert _brightness(allf) == list(range(20))
    assert probe_video(data) == {"frames": 20, "fps": 10.0, "width": 64, "height": 48}


def test_decode_from_path_and_pixel_budget(tmp_path):
    p = tmp_path / "v.mp4"
    p.write_bytes(mp4_bytes(5, fps=5.0))
    frames, fps = decode_video(p, frames=8, max_pixels=32 * 24)
    assert len(frames) == 5 and fps == 5.0 and frames[0].size == (32, 24)


def test_encode_odd_size_crops_to_even():
    frames = [Image.new("RGB", (33, 21), (i * 20, 0, 0)) for i in range(3)]
    out, _ = decode_video(encode_video(frames, fps=3), frames=None)
    assert len(out) == 3 and out[0].size == (32, 20)


def test_decode_errors_name_the_source(tmp_path):
    with pytest.raises(VideoDecodeError, match="clip.mp4: cannot decode video"):
        decode_video(b"not a video" * 50, where="clip.mp4")
    with pytest.raises(VideoDecodeError, match="cannot decode video"):
        decode_video(mp4_bytes(5)[:200], where="cut")
    with pytest.raises(EmptyVideoError, match="empty.avi: video has zero frames"):
        decode_video(empty_video_bytes(), where="empty.avi")
    with pytest.raises(UrtError, match="missing.mp4"):
        decode_video(tmp_path / "missing.mp4")
    with pytest.raises(UrtError, match="zero frames"):
        encode_video([])


def test_fit_pixels():
    big = Image.new("RGB", (4000, 3000))
    out = fit_pixels(big, None, 147456)
    assert out.width * out.height <= 147456 and out.size == (443, 332)
    assert abs(out.width / out.height - 4 / 3) < 0.01
    tiny = Image.new("RGB", (10, 5))
    up = fit_pixels(tiny, 3136, None)
    assert up.width * up.height >= 3136 and abs(up.width / up.height - 2) < 0.05
    mid = Image.new("RGB", (100, 100))
    assert fit_pixels(mid, 3136, 147456) is mid
    assert fit_pixels(mid) is mid
    line = fit_pixels(Image.new("RGB", (10000, 1)), None, 100)
    assert line.size[1] == 1 and line.width * line.height <= 100
    with pytest.raises(UrtError, match="must not exceed"):
        fit_pixels(mid, 10, 5)
    for w, h in [(1000, 7), (333, 777), (1919, 1081)]:
        o = fit_pixels(Image.new("RGB", (w, h)), 256, 4096)
        assert 1 <= o.width * o.height <= 4096


def test_synthetic_frames_are_distinct():
    fr = synthetic_frames(4)
    assert len({f.tobytes() for f in fr}) == 4
