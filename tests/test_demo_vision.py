"""The demo's vision pretraining (urt.demo.vision): what it reads off the demo pairs, that it teaches the tower
to tell what a clip does, that it touches only the tower and the merger, and the pipeline step around it."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from urt.data.schema import Sample, Video
from urt.demo.data import build_demo_data, demo_samples, image_attributes
from urt.demo.vision import VOCAB, pretrain_vision, visual_attributes
from urt.errors import UrtError


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_every_candidate_and_understood_visual_gets_its_attributes():
    samples = list(demo_samples("train", 6, seed=1))
    images, clips, counts = visual_attributes(samples)
    attrs, _ = image_attributes("train")
    # image generation: both candidates; image understanding: its image; an image id seen before is not repeated
    ids = [i for s in samples if s.task.startswith("image") for i in s.meta["image_ids"]]
    assert len(images) == len(set(ids)) == counts["images"]
    assert counts["images_repeated"] == len(ids) - len(set(ids))
    seen = {}
    for s in samples:
        if s.task.startswith("image"):
            for i in s.meta["image_ids"]:
                seen.setdefault(i, attrs[i])
    assert [a for _, a in images] == list(seen.values())
    # clips: 2 per video-generation pair, 1 per video-understanding pair, each with its motion
    assert len(clips) == 6 * 2 + 6 == counts["clips"]
    assert all(set(a) == {"color", "shape", "motion"} and len(fr) == 4 for fr, a in clips)
    want = [a for s in samples if s.task.startswith("video") for a in
            (s.meta["attributes"]["candidates"] if s.task == "video_generation" else [s.meta["attributes"]["seen"]])]
    assert [a for _, a in clips] == want
    assert all(a[k] in VOCAB[k] for _, a in [*images, *clips] for k in a)
    # limit: at most that many of each kind
    few_images, few_clips, _ = visual_attributes(samples, limit=3)
    assert len(few_images) == 3 and len(few_clips) == 3


def test_a_pair_without_attributes_is_named():
    s = Sample(key="mine-7", task="video_understanding", label=1, question="q?", answers=("a", "b"),
               visuals=[Video(frames=[Image.new("RGB", (28, 28))])], meta={})
    with pytest.raises(UrtError, match="mine-7.*attributes"):
        visual_attributes([s])
    s.meta = {"attributes": {"seen": {"color": "purple", "shape": "circle"}}}
    with pytest.raises(UrtError, match="mine-7.*purple"):
        visual_attributes([s])


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("vision_data")
    build_demo_data(d, train_per_task=40, test_per_task=10, progress=False)
    return d


def _tiny():
    from urt.models import load_model

    return load_model("tiny", family="qwen2_5_vl", vision_init_std=0.1, seed=0, freeze_vision=False,
                      freeze_projector=False)


def test_pretraining_teaches_motion_and_touches_only_the_tower_and_merger(small_data, tmp_path):
    from urt.models import load_model
    from urt.models.loading import part_parameters

    bundle = _tiny()
    before = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    rep = pretrain_vision(bundle, small_data / "train", tmp_path, test_shards=small_data / "test", steps=150,
                          batch_size=16, lr=3e-3, attributes=("motion",), progress=False)
    # held-out clips (test images): from chance to well above it
    assert rep["heldout_before"]["clip_motion"] < 0.45
    assert rep["heldout_after"]["clip_motion"] >= 0.8, rep["heldout_after"]
    assert set(rep["heldout_after"]) == {"clip_motion"}  # images have no motion
    assert len(rep["loss"]) == 150 and sum(rep["loss"][-10:]) < sum(rep["loss"][:10])
    assert rep["visuals"]["clips"] == 40 * 3
    changed = {n for n, p in bundle.model.named_parameters() if not torch.equal(p, before[n])}
    tower = {n for part in ("vision", "projector") for n, _ in part_parameters(bundle.model, "qwen2_5_vl", part)}
    assert changed and changed <= tower
    assert any("merger" in n for n in changed) and any("patch_embed" in n for n in changed)
    # the saved model is what the next step starts from
    assert json.loads((tmp_path / "vision.json").read_text())["heldout_after"] == rep["heldout_after"]
    again = load_model(str(tmp_path / "hf" / "final"))
    for n, p in again.model.named_parameters():
        assert torch.equal(p, dict(bundle.model.named_parameters())[n]), n


def test_a_head_joins_at_its_step(small_data, tmp_path):
    rep = pretrain_vision(_tiny(), small_data / "train", tmp_path, steps=12, batch_size=8,
                          attributes={"motion": 0, "color": 8}, progress=False)
    assert rep["settings"]["attributes"] == {"motion": 0, "color": 8}
    # the colour head's untrained cross-entropy (~ln 8) is added from step 9 on
    assert rep["loss"][8] > rep["loss"][7] + 1.0
    assert set(rep["heldout_after"]) == set()  # no test shards given


def test_bad_settings_are_refused(small_data, tmp_path):
    bundle = _tiny()
    with pytest.raises(UrtError, match="attributes must be some of"):
        pretrain_vision(bundle, small_data / "train", tmp_path, steps=1, attributes=("size",), progress=False)
    with pytest.raises(UrtError, match="steps >= 1"):
        pretrain_vision(bundle, small_data / "train", tmp_path, steps=0, progress=False)
