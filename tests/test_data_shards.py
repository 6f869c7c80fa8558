import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_fixtures import (empty_video_bytes, four_task_samples, header, mp4_bytes, png_bytes, raw_sample,
                           synthetic_frames, vqa_image, write_raw_shard)
from urt.data.schema import Sample, Video
from urt.data.shards import (ShardError, SkipStats, decode_sample, make_pipeline, read_index,
                             read_shards, resolve_shards, tar_key, write_shards)
from urt.data.video import decode_video, uniform_indices
from urt.errors import UrtError


def _px(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _same_fields(a: Sample, b: Sample):
    for f in ("key", "task", "label", "caption", "question", "answers", "cot", "source", "meta"):
        assert getattr(a, f) == getattr(b, f), f
    assert len(a.visuals) == len(b.visuals)


def _brightness(frames):
    return [int(round(np.asarray(f)[40:, :, :].mean() / 10)) for f in frames]


@pytest.fixture(scope="module")
def samples():
    return four_task_samples()


def test_round_trip_png_frames_pixel_exact(tmp_path, samples):
    paths = write_shards(samples, tmp_path, image_format="png", video_storage="frames")
    assert [p.name for p in paths] == ["shard-000000.tar"]
    back = list(read_shards(tmp_path))
    assert [s.key for s in back] == [s.key for s in samples]
    for a, b in zip(samples, back):
        _same_fields(a, b)
        for va, vb in zip(a.visuals, b.visuals):
            if isinstance(va, Image.Image):
                assert vb.mode == "RGB" and np.array_equal(_px(va), _px(vb))
            elif va.frames is not None:  # 6 stored frames <= 8: kept whole, pixel exact, fps kept
                assert len(vb.frames) == len(va.frames) and vb.fps == va.fps
                assert all(np.array_equal(_px(x), _px(y)) for x, y in zip(va.frames, vb.frames))
            else:  # mp4 decoded at write (20 frames, png), 8 uniform frames at read
                want, _ = decode_video(va.data, frames=8)
                assert len(vb.frames) == 8 and vb.fps == pytest.approx(10.0 * 8 / 20)
                assert all(np.array_equal(_px(x), _px(y)) for x, y in zip(want, vb.frames))


def test_round_trip_jpg_and_video_files(tmp_path, samples):
    write_shards(samples, tmp_path, image_format="jpg", jpeg_quality=95, video_storage="file")
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        names = tf.getnames()
        assert "vu-0.v0.mp4" in names and "iu-0.v0.jpg" in names and "vg-0.v0.mp4" in names
        assert tf.extractfile("vu-0.v0.mp4").read() == samples[3].visuals[0].data  # original file kept
        meta = json.loads(tf.extractfile("vu-0.json").read())
    assert meta["visuals"] == [{"kind": "video", "member": "v0.mp4", "format": "mp4", "fps": 10.0}]
    back = {s.key: s for s in read_shards(tmp_path)}
    for a in samples:
        b = back[a.key]
        _same_fields(a, b)
        for va, vb in zip(a.visuals, b.visuals):
            if isinstance(va, Image.Image):
                assert vb.size == va.size and np.abs(_px(va) - _px(vb)).mean() < 3
            elif va.frames is not None:  # encoded to mp4 at write (lossy): same count and content
                assert len(vb.frames) == len(va.frames)
                assert _brightness(vb.frames) == _brightness(va.frames)
            else:
                assert len(vb.frames) == 8 and _brightness(vb.frames) == uniform_indices(20, 8)


def test_read_fps_sampling_and_frame_cap(tmp_path, samples):
    write_shards(samples, tmp_path, video_storage="file")
    back = {s.key: s for s in read_shards(tmp_path, frame_sampling="fps", fps=2.0)}
    v = back["vu-0"].visuals[0]
    assert _brightness(v.frames) == [0, 5, 10, 15] and v.fps == pytest.approx(2.0)
    back = {s.key: s for s in read_shards(tmp_path, frames=3)}
    assert _brightness(back["vu-0"].visuals[0].frames) == uniform_indices(20, 3)
    # frames stored as frames are subsampled too (6 -> 3), with the kept frames' rate
    tmp2 = tmp_path / "frames"
    write_shards(samples, tmp2, video_storage="frames")
    vg = {s.key: s for s in read_shards(tmp2, frames=3)}["vg-0"].visuals[0]
    assert len(vg.frames) == 3 and vg.fps == pytest.approx(4.0 * 3 / 6)
    want = [synthetic_frames(6, seed=1)[i] for i in uniform_indices(6, 3)]
    assert all(np.array_equal(_px(x), _px(y)) for x, y in zip(want, vg.frames))
    vg = {s.key: s for s in read_shards(tmp2, frame_sampling="fps", fps=2.0)}["vg-0"].visuals[0]
    assert len(vg.frames) == 3  # 6 frames at 4 fps = 1.5 s -> t = 0, .5, 1


def test_write_time_frame_subsampling(tmp_path):
    s = Sample("v", "video_understanding", 1, [Video(data=mp4_bytes(20, 10.0))], question="q", answers=("a", "b"))
    write_shards([s], tmp_path, video_frames=4)
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        meta = json.loads(tf.extractfile("v.json").read())
    assert len(meta["visuals"][0]["frames"]) == 4 and meta["visuals"][0]["fps"] == pytest.approx(2.0)


def test_keys_are_sanitised_and_kept(tmp_path):
    keys = ["a.b/c", "a_b_c", "x" * 300, "__meta__", "ünï.cödé"]
    ss = [Sample(k, "image_generation", 1, [vqa_image(0), vqa_image(1)], caption="c") for k in keys]
    write_shards(ss, tmp_path)
    tks = [tar_key(k) for k in keys]
    assert len(set(tks)) == len(keys) and tks[1] == "a_b_c"
    assert all("." not in t and len(t) <= 80 and not t.startswith("__") for t in tks)
    assert [s.key for s in read_shards(tmp_path)] == keys
    dup = Sample("k", "image_generation", 1, [vqa_image(0), vqa_image(1)], caption="c")
    with pytest.raises(UrtError, match="duplicate sample key 'k'"):
        write_shards([dup, dup], tmp_path / "dup")


def test_sharding_index_and_overwrite(tmp_path):
    ss = [Sample(f"s{i}", "image_generation", 1 + i % 2, [vqa_image(i), vqa_image(i + 1)], caption=f"c{i}",
                 source="a" if i < 3 else "b") for i in range(5)]
    paths = write_shards(ss, tmp_path, maxcount=2)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    idx = read_index(tmp_path)
    assert idx["total"] == 5 and [sh["count"] for sh in idx["shards"]] == [2, 2, 1]
    assert idx["labels"] == {"image_generation": {"1": 3, "2": 2}} and idx["sources"] == {"a": 3, "b": 2}
    assert idx["tasks"] == {"image_generation": 5}
    with pytest.raises(UrtError, match="already holds 3 shard"):
        write_shards(ss, tmp_path)
    write_shards(ss[:1], tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000000.tar"]
    write_shards(ss[1:3], tmp_path, prefix="more")
    idx = read_index(tmp_path)
    assert idx["total"] == 3 and [sh["name"] for sh in idx["shards"]] == ["more-000000.tar", "shard-000000.tar"]
    assert sorted(s.key for s in read_shards(tmp_path)) == ["s0", "s1", "s2"]
    assert write_shards([], tmp_path / "empty") == [] and read_index(tmp_path / "empty")["total"] == 0
    assert len(resolve_shards(str(tmp_path / "*.tar"))) == 2
    assert len(resolve_shards(str(tmp_path / "shard-{000000..000000}.tar"))) == 1


def test_meta_must_be_json(tmp_path):
    s = Sample("m", "image_generation", 1, [vqa_image(0), vqa_image(1)], caption="c", meta={"x": {1, 2}})
    with pytest.raises(UrtError, match="sample 'm': meta is not JSON"):
        write_shards([s], tmp_path)


def test_pipeline_shuffle_is_seeded_and_complete(tmp_path):
    ss = [Sample(f"s{i:02d}", "image_understanding", 1, [vqa_image(i)], question="q", answers=("a", "b"))
          for i in range(20)]
    write_shards(ss, tmp_path, maxcount=5)

    def keys(seed):
        return [s.key for s in make_pipeline(tmp_path, shuffle_buffer=10, seed=seed, shardshuffle=4)]

    k1, k2, k3 = keys(1), keys(1), keys(2)
    assert sorted(k1) == [s.key for s in ss] and k1 == k2 and k1 != k3
    # decode_sample works on the raw webdataset dicts the DataModule maps over
    raw = next(iter(make_pipeline(tmp_path, decode=False)))
    assert raw["__key__"] == "s00" and "json" in raw and "v0.png" in raw
    s = decode_sample(raw, max_pixels=32 * 32)
    assert s.key == "s00" and s.visuals[0].size == (32, 32)


# --------------------------------------------------------------------------------- bad input
def _five(tmp_path):
    ss = [Sample(f"s{i}", "image_generation", 1, [vqa_image(i), vqa_image(i + 1)], caption="c") for i in range(5)]
    write_shards(ss, tmp_path)
    return tmp_path / "shard-000000.tar"


def test_truncated_tar_mid_member(tmp_path):
    shard = _five(tmp_path)
    data = shard.read_bytes()
    with tarfile.open(shard) as tf:
        m = tf.getmember("s2.v0.png")
    shard.write_bytes(data[: m.offset_data + 100])  # cut inside s2's first image
    with pytest.raises(ShardError, match=r"shard-000000.tar: sample 's2': truncated_tar") as ei:
        list(read_shards(tmp_path))
    assert ei.value.reason == "truncated_tar" and ei.value.key == "s2"
    st = SkipStats()
    got = [s.key for s in read_shards(tmp_path, on_error="skip", stats=st)]
    assert got == ["s0", "s1"]
    # the shard once, the partial sample s2 (json but no images), and s3, s4 that never arrived
    assert st.skipped == {"truncated_tar": 1, "missing_member": 1, "missing_samples": 2}
    assert st.ok == 2 and "truncated_tar" in st.summary() and "shard-000000.tar" in st.summary()


def test_truncated_tar_at_member_boundary_caught_by_index(tmp_path):
    shard = _five(tmp_path)
    with tarfile.open(shard) as tf:
        cut = tf.getmember("s3.json").offset  # tarfile ends such an archive silently
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(ShardError, match="missing_samples: index.json lists 5 sample.s., the shard holds 3"):
        list(read_shards(tmp_path))
    st = SkipStats()
    assert len(list(read_shards(tmp_path, on_error="skip", stats=st))) == 3
    assert st.skipped == {"missing_samples": 2}


def test_unreadable_or_missing_shards(tmp_path):
    with pytest.raises(UrtError, match="no such shard"):
        list(read_shards(tmp_path / "nope.tar"))
    with pytest.raises(UrtError, match="no .tar shards"):
        list(read_shards(tmp_path))
    _five(tmp_path)
    (tmp_path / "shard-000000.tar").unlink()
    with pytest.raises(UrtError, match="lists shard.s. that do not exist"):
        list(read_shards(tmp_path))
    garbage = tmp_path / "g.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    st = SkipStats()
    assert list(read_shards(garbage, on_error="skip", stats=st)) == []
    assert st.skipped == {"truncated_tar": 1}


def _bad_cases():
    und = dict(task="video_understanding", caption=None, question="q", answers=["a", "b"])
    return {
        "missing_member": (raw_sample("k", {"v1.png": None}), "'v1.png' is named in the json but not in the tar"),
        "corrupt_image": (raw_sample("k", {"v0.png": b"\x89PNG\r\n\x1a\n garbage"}), "v0.png: cannot decode image"),
        "bad_video": (raw_sample("k", {"v0.png": None, "v1.png": None, "v0.mp4": b"junk" * 100},
                                 visuals=[{"kind": "video", "member": "v0.mp4"}], **und), "v0.mp4"),
        "empty_video": (raw_sample("k", {"v0.png": None, "v1.png": None, "v0.avi": empty_video_bytes()},
                                   visuals=[{"kind": "video", "member": "v0.avi"}], **und), "zero frames"),
        "missing_field": (raw_sample("k", caption=None), "missing caption"),
        "bad_label": (raw_sample("k", label=3), "got 3"),
        "bad_json": (raw_sample("k", {"json": b"{not json"}), ""),
        "bad_task": (raw_sample("k", task="image_editing"), "image_editing"),
        "missing_json": (raw_sample("k", {"json": None}), "members present: v0.png, v1.png"),
        "bad_visuals": (raw_sample("k", visuals=[{"kind": "audio"}]), ""),
        "invalid_sample": (raw_sample("k", visuals=[{"kind": "image", "member": "v0.png"}]), "needs 2 visual"),
    }


@pytest.mark.parametrize("reason", list(_bad_cases()))
def test_bad_sample_raises_naming_shard_key_reason(tmp_path, reason):
    sample, detail = _bad_cases()[reason]
    shard = write_raw_shard(tmp_path / "bad.tar", [raw_sample("good0"), sample])
    with pytest.raises(ShardError) as ei:
        list(read_shards(shard))
    err = ei.value
    assert err.reason == reason and err.key == "k" and err.shard == str(shard)
    assert str(err).startswith(f"{shard}: sample 'k': {reason}") and detail in str(err)


def test_bad_samples_skipped_and_counted(tmp_path):
    cases = _bad_cases()
    rows = [raw_sample("good0")]
    for i, (reason, (sample, _)) in enumerate(cases.items()):
        rows.append((f"{reason}{i}", sample[1]))
    rows.append(raw_sample("good1"))
    write_raw_shard(tmp_path / "bad.tar", rows)
    write_raw_shard(tmp_path / "ok.tar", [raw_sample("good2")])
    st = SkipStats()
    got = [s.key for s in read_shards(tmp_path, on_error="skip", stats=st)]
    assert got == ["good0", "good1", "good2"]
    assert st.ok == 3 and st.skipped == {r: 1 for r in cases}
    text = st.summary()
    assert text.startswith(f"read 3 sample(s), skipped {len(cases)}:")
    assert all(r in text for r in cases) and "bad.tar:k" in text


def test_label_variants_rejected(tmp_path):
    for bad in ("1", True, 0, None):
        shard = write_raw_shard(tmp_path / "l.tar", [raw_sample("k", label=bad) if bad is not None
                                                     else raw_sample("k", label=None)])
        with pytest.raises(ShardError, match="bad_label|missing_field"):
            list(read_shards(shard))


def test_image_modes_converted_to_rgb(tmp_path):
    def enc(img, fmt="PNG"):
        b = io.BytesIO()
        img.save(b, format=fmt)
        return b.getvalue()

    cmyk = enc(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")  # red in CMYK
    rgba = enc(Image.new("RGBA", (8, 8), (255, 0, 0, 0)))  # fully transparent -> white
    gray = enc(Image.new("L", (8, 8), 100))
    i16 = enc(Image.fromarray(np.full((8, 8), 4000, np.uint16)))  # 16-bit grayscale, max -> 255
    pal = enc(Image.new("RGB", (8, 8), (0, 0, 255)).convert("P"))
    members = {"v0.png": cmyk, "v1.png": rgba}
    members2 = {"v0.png": gray, "v1.png": i16}
    rows = [raw_sample("a", members), raw_sample("b", members2),
            raw_sample("c", {"v0.png": pal, "v1.png": pal})]
    shard = write_raw_shard(tmp_path / "modes.tar", rows)
    a, b, c = list(read_shards(shard))
    for s in (a, b, c):
        assert all(v.mode == "RGB" for v in s.visuals)
    r, g, bl = np.asarray(a.visuals[0])[0, 0]
    assert r > 200 and g < 60 and bl < 60
    assert tuple(np.asarray(a.visuals[1])[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(b.visuals[0])[0, 0]) == (100, 100, 100)
    assert tuple(np.asarray(b.visuals[1])[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(c.visuals[0])[0, 0]) == (0, 0, 255)


def test_huge_and_tiny_images_fit_budget(tmp_path):
    a = np.zeros((2000, 3000, 3), np.uint8)
    a[:, :, 0] = np.linspace(0, 255, 3000, dtype=np.uint8)[None, :]
    huge = png_bytes(Image.fromarray(a))
    tiny = png_bytes(Image.new("RGB", (10, 5), (9, 9, 9)))
    shard = write_raw_shard(tmp_path / "big.tar", [raw_sample("h", {"v0.png": huge, "v1.png": tiny})])
    (s,) = list(read_shards(shard, min_pixels=3136, max_pixels=147456))
    big, small = s.visuals
    assert big.width * big.height <= 147456 and abs(big.width / big.height - 1.5) < 0.01
    assert small.width * small.height >= 3136 and abs(small.width / small.height - 2) < 0.05
    frames = [Image.new("RGB", (640, 480), (i * 30, 0, 0)) for i in range(4)]
    v = Sample("v", "video_understanding", 1, [Video(frames=frames, fps=4)], question="q", answers=("a", "b"))
    write_shards([v], tmp_path / "vid")
    (s,) = list(read_shards(tmp_path / "vid", video_max_pixels=16384, max_pixels=10))
    assert all(f.width * f.height <= 16384 and f.size == (147, 110) for f in s.visuals[0].frames)


def test_video_frames_entry_errors(tmp_path):
    und = dict(task="video_understanding", caption=None, question="q", answers=["a", "b"])
    rows = [raw_sample("e", {"v0.png": None, "v1.png": None}, visuals=[{"kind": "video", "frames": []}], **und),
            raw_sample("m", {"v1.png": None}, visuals=[{"kind": "video", "frames": ["v0.png", "v1.png"]}], **und)]
    shard = write_raw_shard(tmp_path / "f.tar", rows)
    st = SkipStats()
    assert list(read_shards(shard, on_error="skip", stats=st)) == []
    assert st.skipped == {"empty_video": 1, "missing_member": 1}
    with pytest.raises(UrtError, match="on_error must be"):
        list(read_shards(shard, on_error="ignore"))
    with pytest.raises(UrtError, match="needs fps"):
        list(read_shards(shard, frame_sampling="fps"))


def test_header_helper_is_valid():
    assert header("k")["task"] == "image_generation" and "caption" not in header("k", caption=None)


def test_dataloader_workers_split_shards(tmp_path):
    import torch
    import webdataset as wds

    ss = [Sample(f"s{i}", "image_understanding", 1, [vqa_image(i)], question="q", answers=("a", "b"))
          for i in range(8)]
    write_shards(ss, tmp_path, maxcount=2)
    ds = make_pipeline(tmp_path, workersplitter=wds.split_by_worker, nodesplitter=wds.split_by_node,
                       shuffle_buffer=4, seed=0)
    dl = torch.utils.data.DataLoader(ds, num_workers=2, batch_size=None, collate_fn=lambda x: x)
    got = [s.key for s in dl]
    assert sorted(got) == sorted(s.key for s in ss)


def test_skip_without_stats_warns(tmp_path):
    shard = write_raw_shard(tmp_path / "w.tar", [raw_sample("good0"), raw_sample("k", label=7)])
    with pytest.warns(UserWarning, match="skipped 1:\n  bad_label: 1"):
        assert [s.key for s in read_shards(shard, on_error="skip")] == ["good0"]


def test_duplicate_member_reported(tmp_path):
    key, members = raw_sample("k")
    rows = [raw_sample("good0"), (key, members), (key, {"v1.png": members["v1.png"]}), raw_sample("good1")]
    shard = write_raw_shard(tmp_path / "d.tar", rows)
    st = SkipStats()
    assert [s.key for s in read_shards(shard, on_error="skip", stats=st)] == ["good0", "k", "good1"]
    assert st.skipped == {"duplicate_member": 1}
    with pytest.raises(ShardError, match=r"d.tar: sample 'k': duplicate_member: k.v1.png: duplicate file name"):
        list(read_shards(shard))


def test_empty_shard_set_reads_as_no_samples(tmp_path):
    """write_shards over zero samples leaves only index.json: a valid empty set, not an error (the SFT
    side of rejection sampling when no trace was correct)."""
    assert write_shards([], tmp_path) == []
    assert list(read_shards(tmp_path)) == []
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UrtError, match="no .tar shards"):  # no index either: surely a wrong path
        list(read_shards(bare))
