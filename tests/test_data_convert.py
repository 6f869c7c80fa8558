"""Data converters (urt.data.convert): every format from the fixtures in tests/fixtures/convert
(images and videos generated here), every mixing strategy, the two real benchmark files (when
/work/shared/reference is present) in load_visuals=False mode, bad input, and the CLI."""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from urt.data.convert import (
    ConvertStats,
    ImageRef,
    Record,
    VideoRef,
    convert,
    convert_genai_bench_image,
    convert_genai_bench_video,
    convert_grpo_json,
    convert_jsonl,
    convert_mix_yaml,
    convert_sft_json,
    convert_sharegptvideo,
    convert_videogen_rewardbench,
    convert_vl_rewardbench,
    materialize,
    mix_rng,
    register_convert,
    select_indices,
    vl_rewardbench_group,
)
from urt.data.schema import Sample, Video
from urt.errors import UrtError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "convert"
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "benchmarks"

COLORS = {"a": (255, 0, 0), "b": (0, 0, 255), "r": (0, 255, 0)}


def _color(name: str) -> tuple[int, int, int]:
    """A distinct colour per generated frame name (v1_0 … q7), so tests can tell frames apart."""
    h = sum(ord(c) * (i + 1) for i, c in enumerate(name))
    return (h * 37 % 256, h * 91 % 256, h * 53 % 256)


def _mp4(path: Path, color: tuple[int, int, int], n: int = 4) -> None:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        st = out.add_stream("mpeg4", rate=8)
        st.width, st.height, st.pix_fmt = 16, 16, "yuv420p"
        for _ in range(n):
            frame = av.VideoFrame.from_image(Image.new("RGB", (16, 16), color))
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A copy of the fixtures with the images, frames and videos they reference."""
    d = tmp_path_factory.mktemp("convert")
    for f in FIXTURES.iterdir():
        if f.suffix in (".json", ".jsonl", ".yaml"):
            shutil.copy(f, d / f.name)
    (d / "img").mkdir()
    for name, c in COLORS.items():
        Image.new("RGB", (8, 6), c).save(d / "img" / f"{name}.png")
    (d / "frames").mkdir()
    for prefix in ("v1_", "v2_", "q"):
        for i in range(8):
            Image.new("RGB", (8, 6), _color(f"{prefix}{i}")).save(d / "frames" / f"{prefix}{i}.png")
    (d / "vid").mkdir()
    for i, name in enumerate(("l0", "r0", "l1", "r1", "q")):
        _mp4(d / "vid" / f"{name}.mp4", (40 * i, 200 - 30 * i, 90))
    return d


def _px(img: Image.Image) -> tuple:
    return img.convert("RGB").getpixel((0, 0))


# --------------------------------------------------------------------------------------- official
def test_sft_json(data):
    out = list(convert_sft_json(data / "sft.json"))
    assert [s.task for s in out] == ["image_generation", "image_understanding", "video_generation",
                                    "video_understanding", "image_generation", "video_generation",
                                    "image_understanding"]
    assert [s.label for s in out] == [2, 1, 1, 2, "tie", 1, 1]
    assert all(isinstance(s, Sample) for s in out)
    raw = json.loads((data / "sft.json").read_text())
    for s, item in zip(out, raw):
        assert s.cot == item["conversations"][1]["value"]
    assert [s.key for s in out] == [f"sft-{i:07d}" for i in range(7)]

    ig, iu, vg, vu, tie, frames_as_video, crlf = out
    assert ig.caption == "A red bus [double-decker] at night"  # leading "<image>\n <image>\n" stripped
    assert ig.meta["template"] == "paper/image_generation" and ig.meta["template_match"] == "exact"
    assert ig.meta["id"] == "ig-0"
    assert [_px(v) for v in ig.visuals] == [COLORS["a"], COLORS["b"]]
    assert iu.question == "What colour is the bus?" and iu.answers == ("Red.", "Blue, with\ntwo decks.")
    assert _px(iu.visuals[0]) == COLORS["r"]
    # video generation from frames: first half video 1, second half video 2
    assert vg.meta["template"] == "qwen3/video_generation" and vg.caption == "a ball bouncing"
    assert [len(v.frames) for v in vg.visuals] == [4, 4]
    assert [_px(f) for f in vg.visuals[1].frames] == [_color(f"v2_{i}") for i in range(4)]
    assert [_px(f) for f in vg.visuals[0].frames] == [_color(f"v1_{i}") for i in range(4)]
    # video understanding: all frames are the one video
    assert len(vu.visuals) == 1 and len(vu.visuals[0].frames) == 4
    assert vu.question == "What happens?" and vu.answers == ("A ball falls.", "A ball bounces.")
    assert tie.meta["template"] == "implicit/image_generation" and tie.caption == "two cats"
    # an image template over 6 images is read as video frames (LLaVA loader rule), label from "Image 1"
    assert [len(v.frames) for v in frames_as_video.visuals] == [3, 3]
    assert "frames_from" in frames_as_video.meta
    assert crlf.meta["template_match"] == "whitespace"
    assert crlf.question == "Is it day?" and crlf.answers == ("No.", "Yes.")


def test_grpo_json(data):
    out = list(convert_grpo_json(data / "grpo.json"))
    assert [s.task for s in out] == ["image_generation", "image_understanding", "video_understanding",
                                    "video_generation"]
    assert [s.label for s in out] == [1, 2, 2, 2]
    assert all(s.cot is None for s in out)
    assert out[0].caption == "a lighthouse"
    assert out[1].question == "How many?" and out[1].answers == ("3", "4")  # qwen3 template, "image": str
    v = out[2].visuals[0]
    assert isinstance(v, Video) and v.data == (data / "vid" / "q.mp4").read_bytes() and v.format == "mp4"
    assert [len(v.frames) for v in out[3].visuals] == [8, 8]  # all frames kept (sampled at load time)


def test_select_indices_every_strategy():
    rng = lambda: random.Random(5)  # noqa: E731
    assert select_indices("all", 5, rng()) == [0, 1, 2, 3, 4]
    assert select_indices("first:3", 10, rng()) == [0, 1, 2]
    assert select_indices("end:3", 10, rng()) == [7, 8, 9]
    assert select_indices("first:20", 4, rng()) == [0, 1, 2, 3]
    assert select_indices("end:0", 4, rng()) == []
    assert select_indices("first:25%", 10, rng()) == [0, 1, 2]  # ceil(2.5), as the official loader
    assert select_indices("end:10%", 10, rng()) == [9]
    # random: drawn by the generator, returned in file order
    assert select_indices("random:3", 10, rng()) == sorted(random.Random(5).sample(range(10), 3))
    assert select_indices("random:33%", 10, rng()) == sorted(random.Random(5).sample(range(10), 4))
    assert select_indices("random:50", 10, rng()) == list(range(10))
    r1 = select_indices("random:4", 100, mix_rng(0, 2))
    assert r1 == select_indices("random:4", 100, mix_rng(0, 2))  # deterministic given the seed
    assert r1 != select_indices("random:4", 100, mix_rng(1, 2))
    for bad in ("random", "last:3", "first:-1", "random:abc%", "first:3:4", "all:3", "random:150%", ""):
        with pytest.raises(UrtError, match="sampling_strategy"):
            select_indices(bad, 10, rng(), where="mix.yaml: datasets[0]")


def test_mix_yaml(data):
    out = list(convert_mix_yaml(data / "mix.yaml", seed=3))
    by_ds = {}
    for s in out:
        by_ds.setdefault(s.meta["dataset"], []).append(s.meta["index"])
    assert by_ds[0] == [0, 1]  # first:2 of sft.json
    assert by_ds[1] == [3]  # end:1 of grpo.json
    assert by_ds[2] == sorted(random.Random("urt-mix/3/2").sample(range(10), 3))
    assert by_ds[2] == select_indices("random:3", 10, mix_rng(3, 2))
    assert by_ds[3] == select_indices("random:50%", 10, mix_rng(3, 3)) and len(by_ds[3]) == 5
    assert by_ds[4] == list(range(10))
    assert [s.meta["dataset"] for s in out] == sorted(s.meta["dataset"] for s in out)  # YAML order
    assert len({s.key for s in out}) == len(out)
    big = [s for s in out if s.meta["dataset"] == 4]
    assert [s.caption for s in big] == [f"caption {i}" for i in range(10)]
    assert [s.label for s in big] == [1 + i % 2 for i in range(10)]
    assert out[0].cot is not None and big[0].cot is None  # SFT and GRPO items in one mix
    # deterministic given the seed, different for another seed
    again = [(s.meta["dataset"], s.meta["index"]) for s in convert_mix_yaml(data / "mix.yaml", seed=3,
                                                                          load_visuals=False)]
    assert again == [(s.meta["dataset"], s.meta["index"]) for s in out]
    other = [(r.meta["dataset"], r.meta["index"]) for r in convert_mix_yaml(data / "mix.yaml", seed=4,
                                                                          load_visuals=False)]
    assert other != again


def test_mix_yaml_bad_strategy(data, tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text(f"datasets:\n  - json_path: {data / 'grpo.json'}\n    sampling_strategy: sample:3\n")
    with pytest.raises(UrtError, match=r"bad\.yaml.*datasets\[0\].*'sample:3'"):
        list(convert_mix_yaml(y))


# ------------------------------------------------------------------------------------- benchmarks
def test_vl_rewardbench_fixture(data):
    out = list(convert_vl_rewardbench(data / "vl_rewardbench.json"))
    assert [s.key for s in out] == ["hallucination_pair-11", "RLAIF-V-22", "mathverse_33", "mathverse_33#2",
                                    "wildvision-battle-44"]
    assert [s.label for s in out] == [1, 1, 1, 2, 2]
    assert all(s.task == "image_understanding" for s in out)
    assert out[3].answers == ("x = 3", "x = 2") and out[3].meta["id"] == "mathverse_33"
    assert [s.meta["group"] for s in out] == ["hallucination", "hallucination", "reasoning", "reasoning",
                                              "general"]
    assert out[0].meta["group_official_script"] == "general"
    assert [s.source for s in out] == ["POVID_preference_data_for_VLLMs", "COCO", "vl_rewardbench",
                                       "vl_rewardbench", "wildvision-battle"]
    assert _px(out[4].visuals[0]) == COLORS["b"]
    assert out[2].meta["ground_truth"] == "2" and out[4].meta["judge"] == "human"


def test_genai_bench_video(data):
    out = list(convert_genai_bench_video(data / "genai_bench_video.json"))
    assert [s.key for s in out] == ["0", "1", "2", "3"]
    assert [s.label for s in out] == [2, 1, "tie", "tie"]
    assert [s.meta["vote"] for s in out] == ["rightvote", "leftvote", "bothbad_vote", "tievote"]
    assert out[3].caption == "female office employees walking "  # verbatim
    assert all(isinstance(v, Video) and v.data and v.format == "mp4" for s in out for v in s.visuals)
    assert out[0].visuals[0].data == (data / "vid" / "l0.mp4").read_bytes()
    assert out[0].visuals[1].data == (data / "vid" / "r0.mp4").read_bytes()


def _genai_rows():
    return [json.loads(line) for line in (FIXTURES / "genai_bench_image.jsonl").read_text().splitlines()]


def test_genai_bench_image_jsonl_and_parquet(data, tmp_path):
    out = list(convert_genai_bench_image(data / "genai_bench_image.jsonl"))
    assert [s.label for s in out] == [1, "tie", 2]
    assert [s.caption for s in out] == ["a cat wearing a hat", "a dog on the moon", "a teapot"]
    assert [[_px(v) for v in s.visuals] for s in out] == [
        [COLORS["a"], COLORS["b"]], [COLORS["b"], COLORS["a"]], [COLORS["a"], COLORS["r"]]]
    assert out[0].meta["left_model"] == "SDXL" and out[1].meta["vote"] == "bothbad_vote"
    assert [s.key for s in out] == ["genai_image-0000000", "genai_image-0000001", "genai_image-0000002"]

    # an HF parquet export: images embedded as {"bytes", "path"} structs
    import pyarrow as pa
    import pyarrow.parquet as pq

    def emb(name):
        return {"bytes": (data / "img" / f"{name}.png").read_bytes(), "path": f"{name}.png"}

    rows = _genai_rows()
    table = pa.Table.from_pylist([
        {**r, "left_image": emb(Path(r["left_image"]).stem), "right_image": emb(Path(r["right_image"]).stem)}
        for r in rows])
    pq.write_table(table, tmp_path / "genai.parquet")
    pout = list(convert_genai_bench_image(tmp_path / "genai.parquet"))
    assert [s.label for s in pout] == [1, "tie", 2]
    assert [[_px(v) for v in s.visuals] for s in pout] == [[_px(v) for v in s.visuals] for s in out]


def test_videogen_rewardbench_jsonl_and_csv(data):
    out = list(convert_videogen_rewardbench(data / "videogen_rewardbench.jsonl"))
    assert [s.label for s in out] == [1, 2, "tie"]
    assert [s.meta["vote"] for s in out] == ["A", "B", "same"]
    assert out[0].meta["A_model"] == "kling" and out[0].meta["TA"] == "B"
    assert out[2].visuals[0].data == (data / "vid" / "r0.mp4").read_bytes()
    assert all(s.task == "video_generation" for s in out)
    import csv

    rows = [json.loads(line) for line in (data / "videogen_rewardbench.jsonl").read_text().splitlines()]
    with open(data / "videogen.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    recs = list(convert_videogen_rewardbench(data / "videogen.csv", load_visuals=False))
    assert [r.label for r in recs] == [1, 2, "tie"]


def test_sharegptvideo(data):
    out = list(convert_sharegptvideo(data / "sharegptvideo.json"))
    assert [s.label for s in out] == [2, 1, 2]  # "Answer 2 is better", 1, the text of response 2
    assert all(s.task == "video_understanding" for s in out)
    assert len(out[0].visuals[0].frames) == 8 and out[0].meta["n_frames"] == 8
    assert out[0].key == "sgv-1" and out[1].key == "sharegptvideo-0000001"
    assert out[2].question == "What colour is the car?" and out[2].answers == ("Red.", "Green.")


def test_user_jsonl(data):
    out = list(convert_jsonl(data / "user.jsonl"))
    assert [s.task for s in out] == ["image_generation", "video_generation", "image_understanding",
                                    "video_understanding"]
    assert [s.label for s in out] == [1, "tie", 2, 1]
    assert out[1].key == "my-vg" and out[1].source == "mine" and out[1].meta["annotator"] == "x"
    assert out[0].key == "user-0000000" and out[0].source == "user"
    assert out[2].cot.endswith("<answer>Answer 2 is better</answer>")
    assert out[3].answers == ("It falls.", "It flies.") and len(out[3].visuals[0].frames) == 4
    assert isinstance(out[1].visuals[0], Video) and out[1].visuals[0].data


def test_records_and_materialize(data):
    recs = list(convert("genai_bench_image", data / "genai_bench_image.jsonl", load_visuals=False))
    assert all(isinstance(r, Record) for r in recs)
    assert recs[0].visuals == [ImageRef(path=str(data / "img" / "a.png")),
                               ImageRef(path=str(data / "img" / "b.png"))]
    s = materialize(recs[0])
    assert isinstance(s, Sample) and _px(s.visuals[0]) == COLORS["a"]
    # relative references resolve against the root given to materialize
    rel = Record("k", "video_generation", 1, [VideoRef(path="vid/l0.mp4"),
                                              VideoRef(frames=(ImageRef("frames/q0.png"),))], caption="c")
    s2 = materialize(rel, data)
    assert s2.visuals[0].data and _px(s2.visuals[1].frames[0]) == _color("q0")
    assert len(list(convert("genai_bench_image", data / "genai_bench_image.jsonl", limit=2))) == 2


# -------------------------------------------------------------------------------- the real files
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference not present")


@needs_reference
def test_real_vl_rewardbench_without_loss():
    path = REFERENCE / "vl_rewardbench.json"
    raw = json.loads(path.read_text())
    stats = ConvertStats()
    recs = list(convert_vl_rewardbench(path, load_visuals=False, stats=stats))
    assert len(raw) == 1250 and len(recs) == 1250 and stats.n_skipped == 0
    # order and content preserved
    assert [r.meta["id"] for r in recs] == [it["id"] for it in raw]
    assert [r.answers for r in recs] == [tuple(it["response"]) for it in raw]
    assert [r.question for r in recs] == [it["query"] for it in raw]
    assert [r.visual_paths()[0] for r in recs] == [str(REFERENCE / it["image"]) for it in raw]
    # labels against an independent count of the raw rankings
    want = Counter(1 if it["human_ranking"] == [0, 1] else 2 if it["human_ranking"] == [1, 0] else None
                   for it in raw)
    assert Counter(r.label for r in recs) == want == Counter({1: 1245, 2: 5})
    assert stats.by_label == Counter({("image_understanding", 1): 1245, ("image_understanding", 2): 5})
    # keys unique (the file repeats 25 ids: the repeats get "#2")
    keys = [r.key for r in recs]
    assert len(set(keys)) == 1250
    dup_ids = [i for i, n in Counter(it["id"] for it in raw).items() if n > 1]
    assert len(dup_ids) == 25 and sum(k.endswith("#2") for k in keys) == 25
    # METHOD §5 groupings
    assert Counter(r.meta["group"] for r in recs) == {"general": 183, "hallucination": 749, "reasoning": 318}
    assert Counter(r.meta["group_official_script"] for r in recs) == {
        "general": 631, "hallucination": 301, "reasoning": 318}
    assert all(r.meta["group"] == vl_rewardbench_group(r.meta["id"]) for r in recs)


@needs_reference
def test_real_genai_bench_video_without_loss():
    path = REFERENCE / "genai_bench_video.json"
    raw = json.loads(path.read_text())
    stats = ConvertStats()
    recs = list(convert_genai_bench_video(path, load_visuals=False, stats=stats))
    assert len(raw) == 1889 and len(recs) == 1889 and stats.n_skipped == 0
    votes = Counter(it["vote_type"] for it in raw)
    want = Counter({1: votes["leftvote"], 2: votes["rightvote"],
                    "tie": votes["tievote"] + votes["bothbad_vote"]})
    assert Counter(r.label for r in recs) == want == Counter({1: 619, 2: 651, "tie": 619})
    assert Counter(r.meta["vote"] for r in recs) == votes
    assert [r.key for r in recs] == [str(it["id"]) for it in raw]
    assert len({r.key for r in recs}) == 1889
    assert [r.caption for r in recs] == [it["prompt"] for it in raw]
    assert [r.visual_paths() for r in recs] == [
        [str(REFERENCE / it["video_left"]), str(REFERENCE / it["video_right"])] for it in raw]


# ------------------------------------------------------------------------------------- bad input
def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_missing_fields_name_file_and_item(data, tmp_path):
    vl = json.loads((data / "vl_rewardbench.json").read_text())
    del vl[1]["response"]
    f = _write(tmp_path / "vl.json", vl)
    with pytest.raises(UrtError, match=r"vl\.json: item 1 \(id 'RLAIF-V-22'\): missing field 'response'"):
        list(convert_vl_rewardbench(f, data, load_visuals=False))
    st = ConvertStats()
    recs = list(convert_vl_rewardbench(f, data, load_visuals=False, on_error="skip", stats=st))
    assert len(recs) == 4 and st.skipped == Counter({"missing field": 1})

    sft = json.loads((data / "sft.json").read_text())
    del sft[2]["conversations"]
    f = _write(tmp_path / "sft.json", sft)
    with pytest.raises(UrtError, match=r"sft\.json: item 2: missing field 'conversations'"):
        list(convert_sft_json(f, data, load_visuals=False))
    grpo = json.loads((data / "grpo.json").read_text())
    grpo[0]["problem"] = "Which image is nicer?"
    grpo[3]["images"] = grpo[3]["images"][:-1]  # odd frame count
    st = ConvertStats()
    recs = list(convert_grpo_json(_write(tmp_path / "g.json", grpo), data, load_visuals=False,
                                  on_error="skip", stats=st))
    assert len(recs) == 2 and st.skipped == Counter({"unknown prompt": 1, "bad visuals": 1})


def test_labels_out_of_range(data, tmp_path):
    vl = json.loads((data / "vl_rewardbench.json").read_text())
    vl[0]["human_ranking"] = [0, 0]
    with pytest.raises(UrtError, match=r"item 0 .*human_ranking must be \[0, 1\] or \[1, 0\], got \[0, 0\]"):
        list(convert_vl_rewardbench(_write(tmp_path / "vl.json", vl), data, load_visuals=False))
    gv = json.loads((data / "genai_bench_video.json").read_text())
    gv[2]["vote_type"] = "upvote"
    with pytest.raises(UrtError, match=r"item 2 \(id 2\): unknown vote_type 'upvote'"):
        list(convert_genai_bench_video(_write(tmp_path / "gv.json", gv), data, load_visuals=False))
    sg = json.loads((data / "sharegptvideo.json").read_text())
    sg[1]["answer"] = 0
    sg[2]["answer"] = 3
    st = ConvertStats()
    assert len(list(convert_sharegptvideo(_write(tmp_path / "sg.json", sg), data, load_visuals=False,
                                          on_error="skip", stats=st))) == 1
    assert st.skipped == Counter({"bad label": 2})
    lines = (data / "user.jsonl").read_text().splitlines()
    bad = json.loads(lines[0])
    bad["label"] = 3
    (tmp_path / "u.jsonl").write_text("\n".join([json.dumps(bad)] + lines[1:] + ["{not json"]) + "\n")
    with pytest.raises(UrtError, match=r"u\.jsonl: item 0: label must be 1, 2 or 'tie', got 3"):
        list(convert_jsonl(tmp_path / "u.jsonl", data, load_visuals=False))
    st = ConvertStats()
    assert len(list(convert_jsonl(tmp_path / "u.jsonl", data, load_visuals=False, on_error="skip",
                                  stats=st))) == 3
    assert st.skipped == Counter({"bad label": 1, "bad json": 1})
    sft = json.loads((data / "sft.json").read_text())
    sft[0]["conversations"][1]["value"] = "<think>x</think>\n<answer>Video 1 is better</answer>"
    with pytest.raises(UrtError, match=r"item 0 \(id 'ig-0'\): gpt turn: answer 'video 1 is better'"):
        list(convert_sft_json(_write(tmp_path / "s.json", sft), data, load_visuals=False))
    vg = [json.loads(line) for line in (data / "videogen_rewardbench.jsonl").read_text().splitlines()]
    vg[1]["Overall"] = "C"
    (tmp_path / "vg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vg))
    with pytest.raises(UrtError, match=r"item 1: unknown Overall 'C'"):
        list(convert_videogen_rewardbench(tmp_path / "vg.jsonl", data, load_visuals=False))


def test_missing_image_file(data, tmp_path):
    vl = json.loads((data / "vl_rewardbench.json").read_text())
    vl[2]["image"] = "img/nope.png"
    f = _write(tmp_path / "vl.json", vl)
    with pytest.raises(UrtError, match=r"vl\.json: item 2 \(id 'mathverse_33'\): image file not found: "
                                       r".*img/nope\.png"):
        list(convert_vl_rewardbench(f, data))
    st = ConvertStats()
    out = list(convert_vl_rewardbench(f, data, on_error="skip", stats=st))
    assert [s.key for s in out] == ["hallucination_pair-11", "RLAIF-V-22", "mathverse_33#2",
                                    "wildvision-battle-44"]
    assert st.skipped == Counter({"missing file": 1}) and "nope.png" in st.examples["missing file"][0]
    # without a stats object the skip is reported by a warning, never silent
    with pytest.warns(UserWarning, match="skipped 1 item"):
        assert len(list(convert_vl_rewardbench(f, data, on_error="skip"))) == 4
    gv = json.loads((data / "genai_bench_video.json").read_text())
    gv[0]["video_right"] = "vid/missing.mp4"
    with pytest.raises(UrtError, match=r"item 0 \(id 0\): video file not found: .*vid/missing\.mp4"):
        list(convert_genai_bench_video(_write(tmp_path / "gv.json", gv), data))
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    gv[0]["video_right"] = str(tmp_path / "broken.mp4")
    st = ConvertStats()
    assert len(list(convert_genai_bench_video(_write(tmp_path / "gv.json", gv), data, on_error="skip",
                                              stats=st))) == 3
    assert st.skipped == Counter({"bad video": 1})


def test_unreadable_files(tmp_path):
    (tmp_path / "x.json").write_text('{"not": "a list"}')
    with pytest.raises(UrtError, match=r"x\.json: expected a JSON list"):
        list(convert_genai_bench_video(tmp_path / "x.json", load_visuals=False))
    (tmp_path / "y.json").write_text('[{"id": 0}, {"id": ')
    with pytest.raises(UrtError, match=r"y\.json: invalid JSON in item 1"):  # item 0 is skipped first
        list(convert_genai_bench_video(tmp_path / "y.json", load_visuals=False, on_error="skip",
                                       stats=ConvertStats()))
    with pytest.raises(UrtError, match="input file not found"):
        list(convert_jsonl(tmp_path / "none.jsonl"))
    with pytest.raises(UrtError, match="unknown format"):
        convert("nope", tmp_path / "x.json")


def test_streaming_json_reader_small_chunks(tmp_path):
    from urt.data.formats.common import iter_json_list

    items = [{"i": i, "s": "x" * (i * 7) + "]},\"[", "n": [1.5, None, True]} for i in range(40)]
    (tmp_path / "l.json").write_text("\ufeff  " + json.dumps(items, indent=2) + "\n")
    assert [o for _, o in iter_json_list(tmp_path / "l.json", chunk=16)] == items
    (tmp_path / "e.json").write_text("[ ]")
    assert list(iter_json_list(tmp_path / "e.json")) == []


# ------------------------------------------------------------------------------------------- CLI
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="urt data")
    register_convert(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_convert_writes_shards(data, tmp_path, capsys):
    from urt.data.shards import read_shards

    out = tmp_path / "shards"
    assert _cli(["convert", "--format", "sft_json", str(data / "sft.json"), "--out", str(out),
                 "--no-progress", "--video-storage", "frames", "--maxcount", "3"]) == 0
    printed = capsys.readouterr().out
    assert "7 samples written in 3 shard(s)" in printed and "skipped: 0" in printed and "video_generation" in printed
    back = list(read_shards(out))
    assert [s.key for s in back] == [f"sft-{i:07d}" for i in range(7)]
    assert [s.label for s in back] == [2, 1, 1, 2, "tie", 1, 1]
    assert back[2].visuals[1].frames is not None and len(back[2].visuals[1].frames) == 4

    # skip mode reports the skips per reason; --limit stops early
    lines = (data / "user.jsonl").read_text().splitlines()
    bad = json.loads(lines[0])
    bad["images"] = ["img/gone.png", "img/b.png"]
    (data / "u2.jsonl").write_text("\n".join(lines + [json.dumps(bad)]) + "\n")
    out2 = tmp_path / "shards2"
    assert _cli(["convert", "--format", "jsonl", str(data / "u2.jsonl"), "--out", str(out2), "--no-progress",
                 "--on-error", "skip", "--video-storage", "file", "--image-format", "jpg"]) == 0
    printed = capsys.readouterr().out
    assert "missing file" in printed and "gone.png" in printed
    assert len(list(read_shards(out2))) == 4
    out3 = tmp_path / "shards3"
    assert _cli(["convert", "--format", "jsonl", str(data / "user.jsonl"), "--out", str(out3),
                 "--no-progress", "--limit", "2"]) == 0
    assert len(list(read_shards(out3))) == 2
    # nothing converted: exit status 1
    (data / "u3.jsonl").write_text(json.dumps(bad) + "\n")
    assert _cli(["convert", "--format", "jsonl", str(data / "u3.jsonl"), "--out", str(tmp_path / "s5"),
                 "--no-progress", "--on-error", "skip"]) == 1
    assert "no samples converted" in capsys.readouterr().out
    with pytest.raises(UrtError, match=r"u2\.jsonl: item 4: image file not found"):
        _cli(["convert", "--format", "jsonl", str(data / "u2.jsonl"), "--out", str(tmp_path / "s4"),
              "--no-progress"])


# ---------------------------------------------------------------------------------------------- issue #31
def test_failed_convert_publishes_nothing_and_keeps_the_old_shards(data, tmp_path, capsys):
    """#31.7: a convert that fails part-way leaves no shard that looks valid (nothing a training run would
    take), and `--overwrite` replaces the old shards only once the new ones are complete; the refusal to
    overwrite names the CLI flag."""
    from urt.cli import main
    from urt.data.shards import read_index, read_shards

    lines = (data / "user.jsonl").read_text().splitlines()
    bad = json.loads(lines[0])
    bad["images"] = ["img/gone.png", "img/b.png"]
    (data / "late_bad.jsonl").write_text("\n".join(lines + [json.dumps(bad)]) + "\n")
    out = tmp_path / "fresh"
    rc = main(["data", "convert", "--format", "jsonl", str(data / "late_bad.jsonl"), "--out", str(out),
               "--no-progress", "--maxcount", "1"])
    assert rc == 2 and "late_bad.jsonl: item 4: image file not found" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == []  # 4 shards were written before the failure: all gone
    with pytest.raises(UrtError, match="no .tar shards"):  # so a training run has nothing to take
        read_shards(out).__next__()

    good = tmp_path / "good"
    assert main(["data", "convert", "--format", "jsonl", str(data / "user.jsonl"), "--out", str(good),
                 "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    rc = main(["data", "convert", "--format", "jsonl", str(data / "user.jsonl"), "--out", str(good), "--no-progress"])
    assert rc == 2 and "pass --overwrite" in capsys.readouterr().err
    rc = main(["data", "convert", "--format", "jsonl", str(data / "late_bad.jsonl"), "--out", str(good),
               "--no-progress", "--overwrite"])
    assert rc == 2 and {p.name: p.read_bytes() for p in good.iterdir()} == before  # the old set is intact
    assert len(list(read_shards(good))) == read_index(good)["total"] == 4


def test_vl_rewardbench_key_collision_names_file_item_and_scheme(data, tmp_path):
    """#31.11: an id that collides with the '<id>#<n>' key of a repeated id: the error names the file, the
    item and the first holder of the key, and explains the keying."""
    vl = json.loads((data / "vl_rewardbench.json").read_text())
    first = dict(vl[0])
    items = [first, dict(first), dict(first, id=f"{first['id']}#2")]
    f = _write(tmp_path / "vl_dup.json", items)
    with pytest.raises(UrtError) as e:
        list(convert_vl_rewardbench(f, data, load_visuals=False))
    msg = str(e.value)
    assert "vl_dup.json: item 2" in msg and "item 1" in msg and "'<id>#<n>'" in msg
