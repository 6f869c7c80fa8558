"""urt.data.encode: exact label boundaries, prompt mode, targets (CoT / answer / tie), Qwen3.5's
`<think>\\n` prefix, video metadata (fps -> timestamps / second_per_grid_ts, no resampling), LLaVA-OV
multi-image handling, and the never-truncate rule. Processors only (no model weights)."""

from __future__ import annotations

import dataclasses
import logging
import pickle

import pytest
import torch

from data_fixtures import four_task_samples, synthetic_frames, mp4_bytes
from urt.data.encode import IGNORE_INDEX, Encoded, OverlongSample, SampleEncoder
from urt.data.schema import Video
from urt.errors import UrtError
from urt.models.tiny import tiny_processor

FAMILIES = ["llava_onevision", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]
COT = "<think>Answer 1: 7/10\nAnswer 2: 4/10</think>\n<answer>Answer 1 is better</answer>"

_PROCESSORS: dict = {}


def proc(family):
    if family not in _PROCESSORS:
        _PROCESSORS[family] = tiny_processor(family)
    return _PROCESSORS[family]


@pytest.fixture(scope="module")
def samples():
    """ig (2 images, CoT), iu (1 image), vg (2 videos, fps 4 / unknown), vu (5 frames at 5 fps); all with CoTs."""
    out = four_task_samples(video_data=False)
    return [dataclasses.replace(s, cot=s.cot or COT) for s in out]


def supervised_text(tok, e: Encoded) -> str:
    return tok.decode(e.input_ids[e.labels != IGNORE_INDEX])


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_exactly_target_and_im_end(family, samples):
    p = proc(family)
    enc = SampleEncoder(p, family)
    prompt_enc = SampleEncoder(p, family, mode="prompt")
    for s in samples:
        e = enc(s)
        assert isinstance(e, Encoded) and e.key == s.key and e.task == s.task and e.label == s.label
        assert e.input_ids.dtype == torch.long and e.labels.shape == e.input_ids.shape and len(e) == e.input_ids.numel()
        sup = (e.labels != IGNORE_INDEX).nonzero().flatten()
        # One contiguous span starting at prompt_length; labels equal the ids there.
        assert sup[0].item() == e.prompt_length and sup[-1].item() - sup[0].item() + 1 == len(sup)
        assert torch.equal(e.labels[sup], e.input_ids[sup])
        prefix = e.meta["assistant_prefix"]
        expected = s.cot[len(prefix):] if s.cot.startswith(prefix) else e.meta["target_text"]
        assert supervised_text(p.tokenizer, e) == expected + "<|im_end|>"
        # the trailing newline after <|im_end|> is in the input but not supervised
        assert p.tokenizer.decode(e.input_ids[sup[-1] + 1:]) == "\n"
        # prompt mode: the same prompt tokens, nothing supervised, ends with the generation prompt
        q = prompt_enc(s)
        assert q.num_supervised == 0 and q.prompt_length == len(q)
        assert torch.equal(q.input_ids, e.input_ids[: e.prompt_length])
        text = p.tokenizer.decode(q.input_ids)
        closed = "<think>\n\n</think>\n\n" if family == "qwen3_5" else ""  # rendered as served: no thinking
        assert text.endswith("<|im_start|>assistant\n" + closed + prefix)
        if family == "llava_onevision":
            assert e.mm_token_type_ids is None
        else:
            assert e.mm_token_type_ids.shape == e.input_ids.shape


def test_qwen3_5_renders_as_served_without_thinking(samples):
    """Qwen3.5 prompts render with enable_thinking=False, as the released checkpoints are served: the template
    closes an empty think block, the model's target (and output) is the paper's whole <think>...</think>
    <answer>...</answer>, so the format reward sees every tag the model wrote; no prefix is prepended."""
    from urt.rewards import format_reward

    p = proc("qwen3_5")
    s = dataclasses.replace(samples[0], cot="<think>\nImage 1: 8/10</think>\n<answer>Image 1 is better</answer>")
    e = SampleEncoder(p, "qwen3_5")(s)
    assert p.tokenizer.decode(e.input_ids[: e.prompt_length]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert e.meta["assistant_prefix"] == "" and "target_normalised" not in e.meta
    assert supervised_text(p.tokenizer, e) == s.cot + "<|im_end|>"
    prompt = SampleEncoder(p, "qwen3_5", mode="prompt")(s)
    assert prompt.meta["assistant_prefix"] == "" and len(prompt) == e.prompt_length
    assert format_reward(supervised_text(p.tokenizer, e)[: -len("<|im_end|>")]) == 1.0


def test_answer_targets_and_ties(samples):
    ig, iu, vg, _ = samples
    p = proc("qwen2_5_vl")
    paper = SampleEncoder(p, "qwen2_5_vl", target="answer")
    assert supervised_text(p.tokenizer, paper(ig)) == "<answer>Image 1 is better</answer><|im_end|>"
    assert supervised_text(p.tokenizer, paper(iu)) == "<answer>Answer 2 is better</answer><|im_end|>"
    with pytest.raises(UrtError, match="vg-0.*tie"):
        paper(vg)  # a tie has no answer string in the paper prompts
    implicit = SampleEncoder(p, "qwen2_5_vl", template_set="implicit", target="answer")
    assert supervised_text(p.tokenizer, implicit(ig)) == "Image 1 is better<|im_end|>"
    assert supervised_text(p.tokenizer, implicit(vg)) == "Both videos are equally good<|im_end|>"
    # Qwen3.5 direct answers: the template's no-think form, so no <think> is expected in the target.
    p35 = proc("qwen3_5")
    e = SampleEncoder(p35, "qwen3_5", target="answer")(iu)
    assert p35.tokenizer.decode(e.input_ids[: e.prompt_length]).endswith("assistant\n<think>\n\n</think>\n\n")
    assert supervised_text(p35.tokenizer, e) == "<answer>Answer 2 is better</answer><|im_end|>"
    assert e.meta["assistant_prefix"] == ""


def test_missing_cot_and_bad_options(samples):
    p = proc("qwen2_5_vl")
    no_cot = dataclasses.replace(samples[1], cot=None)
    with pytest.raises(UrtError, match="iu-0.*CoT"):
        SampleEncoder(p, "qwen2_5_vl")(no_cot)
    assert SampleEncoder(p, "qwen2_5_vl", mode="prompt")(no_cot).num_supervised == 0  # prompts need no target
    for kw in (dict(mode="train"), dict(target="both"), dict(max_length=0)):
        with pytest.raises(UrtError):
            SampleEncoder(p, "qwen2_5_vl", **kw)
    encoded_video = dataclasses.replace(samples[3], visuals=[Video(data=mp4_bytes(4, 4.0))])
    with pytest.raises(UrtError, match="vu-0.*decode"):
        SampleEncoder(p, "qwen2_5_vl")(encoded_video)


def test_overlong_raises_never_truncates(samples):
    p = proc("qwen2_5_vl")
    full = SampleEncoder(p, "qwen2_5_vl")(samples[0])
    n = len(full)
    assert len(SampleEncoder(p, "qwen2_5_vl", max_length=n)(samples[0])) == n
    with pytest.raises(OverlongSample) as info:
        SampleEncoder(p, "qwen2_5_vl", max_length=n - 1)(samples[0])
    err = info.value
    assert isinstance(err, UrtError) and (err.key, err.length, err.max_length) == ("ig.0/a", n, n - 1)
    assert "ig.0/a" in str(err) and str(n) in str(err)
    back = pickle.loads(pickle.dumps(err))  # crosses DataLoader worker boundaries
    assert (back.key, back.length, back.max_length) == (err.key, err.length, err.max_length)


def test_qwen_video_metadata_no_resampling_no_fps_fallback(samples, caplog):
    _, _, vg, vu = samples  # vu: 5 frames at 5 fps; vg: 6 frames at 4 fps + 6 frames fps unknown
    p = proc("qwen3_vl")
    enc = SampleEncoder(p, "qwen3_vl", mode="prompt")
    with caplog.at_level(logging.WARNING):
        e = enc(vu)
    assert "fps=24" not in caplog.text
    assert "assumed_fps" not in e.meta
    # 5 frames -> 3 temporal groups (padded to 6), no resampling; timestamps from fps 5: mean of frame pairs
    assert e.visual["video_grid_thw"].tolist()[0][0] == 3
    text = p.tokenizer.decode(e.input_ids)
    assert "<0.1 seconds>" in text and "<0.5 seconds>" in text and "<0.8 seconds>" in text  # last group repeats frame 4
    # qwen3 set sends the pair as one 12-frame video; the first video's fps (4) dates it.
    e = enc(vg)
    assert e.visual["video_grid_thw"].tolist() == [[6, 4, 4]]
    assert "<0.1 seconds>" in p.tokenizer.decode(e.input_ids) and "<2.6 seconds>" in p.tokenizer.decode(e.input_ids)
    # Unknown fps everywhere: DEFAULT_VIDEO_FPS, recorded, and no fps=24 fallback.
    nofps = dataclasses.replace(vu, visuals=[Video(frames=synthetic_frames(4))])
    with caplog.at_level(logging.WARNING):
        e = enc(nofps)
    assert e.meta["assumed_fps"] == 2.0 and "fps=24" not in caplog.text
    # Qwen2.5-VL: second_per_grid_ts = temporal_patch_size / fps, per video.
    p25 = proc("qwen2_5_vl")
    e = SampleEncoder(p25, "qwen2_5_vl", mode="prompt")(vg)
    assert e.visual["second_per_grid_ts"].tolist() == pytest.approx([2 / 4.0, 2 / 2.0])
    assert e.visual["video_grid_thw"][:, 0].tolist() == [3, 3]
    assert e.meta["assumed_fps"] == 2.0


def test_llava_multi_image_and_frames(samples):
    p = proc("llava_onevision")
    enc = SampleEncoder(p, "llava_onevision", mode="prompt")
    image_id = p.tokenizer.convert_tokens_to_ids("<image>")
    ig, iu, vg, vu = (enc(s) for s in samples)
    # A pair is one multi-image prompt: base view only, 16 + 1 (newline) tokens per image.
    assert ig.visual["batch_num_images"].tolist() == [2] and ig.visual["pixel_values"].shape[:2] == (2, 1)
    assert int((ig.input_ids == image_id).sum()) == 2 * 17
    # A single image goes through anyres (several crops).
    assert iu.visual["batch_num_images"].tolist() == [1] and iu.visual["pixel_values"].shape[1] > 1
    # Video frames are images: 5 frames -> 5 base views.
    assert vu.visual["batch_num_images"].tolist() == [5] and int((vu.input_ids == image_id).sum()) == 5 * 17
    assert vg.visual["batch_num_images"].tolist() == [12]


def test_encoder_pickles_for_workers(samples):
    enc = SampleEncoder(proc("qwen3_vl"), "qwen3_vl", max_length=4096)
    again = pickle.loads(pickle.dumps(enc))
    a, b = enc(samples[3]), again(samples[3])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.visual["pixel_values_videos"], b.visual["pixel_values_videos"])


def test_describe_target_trains_the_grounding_text():
    from data_fixtures import vqa_image
    from urt.data.encode import SampleEncoder
    from urt.data.schema import Sample
    from urt.errors import UrtError
    from urt.models import build_tiny

    b = build_tiny("qwen2_5_vl")
    enc = SampleEncoder(b.processor, "qwen2_5_vl", target="describe")
    s = Sample("g1", "image_generation", 2, [vqa_image(0), vqa_image(1)], caption="a red circle",
               meta={"describe": "Image 1 shows a blue square. Image 2 shows a red circle. Image 2 matches."})
    e = enc(s)
    assert e.meta["template_set"] == "describe"
    supervised = b.tokenizer.decode(e.input_ids[e.labels != -100])
    assert supervised == "Image 1 shows a blue square. Image 2 shows a red circle. Image 2 matches.<|im_end|>"
    assert "Describe Image 1 and Image 2. Which one shows [a red circle]?" in b.tokenizer.decode(e.input_ids[: e.prompt_length])
    s.meta = {}
    try:
        enc(s)
    except UrtError as err:
        assert "meta['describe']" in str(err) and "g1" in str(err)
    else:
        raise AssertionError("a sample without meta['describe'] must be refused")
    try:
        SampleEncoder(b.processor, "qwen2_5_vl", target="describe", template_set="paper")
    except UrtError as err:
        assert "describe" in str(err)
    else:
        raise AssertionError("target describe with another template set must be refused")


def test_reason_target_and_per_sample_targets():
    """target 'reason': urt's describe prompt plus the tag instruction, the description in a think block,
    then the answer. A sample whose meta['target'] names another target is encoded with it, so one shard
    set mixes cold-start CoTs and replayed grounding samples; a swapped pair cannot use the description."""
    from data_fixtures import vqa_image
    from urt.data.encode import SampleEncoder
    from urt.data.schema import Sample
    from urt.errors import UrtError
    from urt.models import build_tiny

    b = build_tiny("qwen2_5_vl")
    desc = "Image 1 shows a blue square: blue vs red no, so Image 1 (5/10) does not match."
    s = Sample("g1", "image_generation", 2, [vqa_image(0), vqa_image(1)], caption="a red circle",
               meta={"describe": desc})
    e = SampleEncoder(b.processor, "qwen2_5_vl", target="reason")(s)
    assert e.meta["template_set"] == "reason"
    assert b.tokenizer.decode(e.input_ids[e.labels != -100]) == (
        f"<think>\n{desc}\n</think>\n<answer>Image 2 is better</answer><|im_end|>")
    prompt = b.tokenizer.decode(e.input_ids[: e.prompt_length])
    assert ("Which one shows [a red circle]? Reason inside <think> </think> tags, then give the answer inside "
            "<answer> </answer> tags.") in prompt
    # mixed targets: the cot encoder hands a meta['target']='reason' sample to a reason encoder
    cot = SampleEncoder(b.processor, "qwen2_5_vl", target="cot")
    s.meta["target"] = "reason"
    mixed = cot(s)
    assert mixed.meta["template_set"] == "reason" and torch.equal(mixed.input_ids, e.input_ids)
    ok = Sample("c1", "image_generation", 1, [vqa_image(0), vqa_image(1)], caption="a red circle",
                cot="<think>\nx\n</think>\n<answer>Image 1 is better</answer>")
    assert cot(ok).meta["template_set"] == "paper"
    s.meta["target"] = "poem"
    with pytest.raises(UrtError, match=r"g1.*meta\['target'\] 'poem'"):
        cot(s)
    s.meta["target"] = "reason"
    with pytest.raises(UrtError, match="g1.*order=keep"):
        cot(s.swapped())
    s.meta["describe_swapped"] = "Image 1 shows a red circle."
    sw = cot(s.swapped())
    assert b.tokenizer.decode(sw.input_ids[sw.labels != -100]) == (
        "<think>\nImage 1 shows a red circle.\n</think>\n<answer>Image 1 is better</answer><|im_end|>")
    # replayed direct answers: meta['template_set'] names the implicit prompts, whose answer is bare
    direct = Sample("d1", "image_generation", 2, [vqa_image(0), vqa_image(1)], caption="a red circle",
                    meta={"target": "answer", "template_set": "implicit"})
    d = cot(direct)
    assert d.meta["template_set"] == "implicit"
    assert b.tokenizer.decode(d.input_ids[d.labels != -100]) == "Image 2 is better<|im_end|>"
    assert "You are given a text caption and two generated images" in b.tokenizer.decode(d.input_ids[: d.prompt_length])
    direct.meta["template_set"] = "paper"  # the CoT prompts with a direct answer: in tags
    assert b.tokenizer.decode(cot(direct).input_ids[cot(direct).labels != -100]) == (
        "<answer>Image 2 is better</answer><|im_end|>")
    s.meta["template_set"] = "implicit"
    with pytest.raises(UrtError, match="g1.*'implicit' with target 'reason', which takes the 'reason' or 'fields'"):
        cot(s)
    # a sample's own instruction before the paper prompts' field lines (the demo's instructed grounding pairs)
    s.meta.update({"template_set": "fields", "preamble": "Reason in <think> tags.\nSay which one shows it.\n"})
    f = cot(s)
    prompt = b.tokenizer.decode(f.input_ids[: f.prompt_length])
    assert f.meta["template_set"] == "fields"
    assert prompt.endswith("Reason in <think> tags.\nSay which one shows it.\nText Caption: [a red circle]"
                           "<|im_end|>\n<|im_start|>assistant\n")
    assert b.tokenizer.decode(f.input_ids[f.labels != -100]) == (
        f"<think>\n{desc}\n</think>\n<answer>Image 2 is better</answer><|im_end|>")
    s.meta["preamble"] = 3
    with pytest.raises(UrtError, match="g1.*preamble must be a string"):
        cot(s)
    with pytest.raises(UrtError, match="target 'reason' uses the 'reason' or 'fields' prompts, not template set 'paper'"):
        SampleEncoder(b.processor, "qwen2_5_vl", template_set="paper", target="reason")
