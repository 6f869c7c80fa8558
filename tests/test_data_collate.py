"""urt.data.collate on the tiny real-architecture models (fp32, sdpa, CPU).

THE invariant: a packed batch (image pair, single image, video pair, video question: four tasks of
different lengths) gives the same logits as each sample's separate unpadded forward and as the
padded batch at real positions, for every packing family; and the test is shown to catch the peer
bugs (plain arange positions over the packed row; 1-D positions instead of mRoPE rows). Qwen3.5 packs
too (its linear-attention states isolated per sample: tests/test_hybrid.py has the tighter check and the
negative control); its padded logits match per-sample ones with right and left padding. Visual
placeholder counts equal the visual features the model computes. Left-padded generation equals
per-prompt generation."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from data_fixtures import four_task_samples
from urt.data.collate import (
    PackedCollator,
    PaddedCollator,
    make_collator,
    model_inputs,
    rope_positions,
)
from urt.data.encode import IGNORE_INDEX, SampleEncoder
from urt.errors import UrtError
from urt.models import build_tiny

PACKING = ["llava_onevision", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]
QWEN_PACKING = ["qwen2_5_vl", "qwen3_vl", "qwen3_5"]
COT = "<think>Answer 1: 7/10\nAnswer 2: 4/10</think>\n<answer>Answer 1 is better</answer>"
TOL = 1e-4
BUG = 1e-3

_BUNDLES: dict = {}
_ENCODED: dict = {}
_SEPARATE: dict = {}
MEASURED: dict = {}  # family -> {packed, padded, naive, ...} max |Δlogit| (printed with -s)


def bundle(family):
    if family not in _BUNDLES:
        _BUNDLES[family] = build_tiny(family, seed=0)
    return _BUNDLES[family]


def samples():
    return [dataclasses.replace(s, cot=s.cot or COT) for s in four_task_samples(video_data=False)]


def encoded(family, mode="sft"):
    if (family, mode) not in _ENCODED:
        b = bundle(family)
        enc = SampleEncoder(b.processor, family, mode=mode)
        _ENCODED[family, mode] = [enc(s) for s in samples()]
    return _ENCODED[family, mode]


@torch.no_grad()
def forward(model, batch):
    return model(**model_inputs(batch), use_cache=False).logits


@torch.no_grad()
def separate_logits(family):
    """Each sample alone: batch of one, no padding, no attention mask, no position ids (the model
    computes its own, e.g. Qwen's get_rope_index on that sample)."""
    if family not in _SEPARATE:
        b = bundle(family)
        out = []
        for e in encoded(family):
            kw = dict(e.visual)
            if e.mm_token_type_ids is not None:
                kw["mm_token_type_ids"] = e.mm_token_type_ids[None]
            out.append(b.model(input_ids=e.input_ids[None], use_cache=False, **kw).logits[0])
        _SEPARATE[family] = out
    return _SEPARATE[family]


def packed_diff(logits_row, encs, ref):
    off, d = 0, 0.0
    for e, r in zip(encs, ref):
        d = max(d, (logits_row[off: off + len(e)] - r).abs().max().item())
        off += len(e)
    return d


def padded_diff(logits, encs, ref, side="right"):
    width = logits.shape[1]
    d = 0.0
    for i, (e, r) in enumerate(zip(encs, ref)):
        rows = logits[i, : len(e)] if side == "right" else logits[i, width - len(e):]
        d = max(d, (rows - r).abs().max().item())
    return d


# ------------------------------------------------------------------------------------------ invariant


@pytest.mark.parametrize("family", PACKING)
def test_packed_equals_separate_and_padded(family):
    b = bundle(family)
    encs = encoded(family)
    assert len({len(e) for e in encs}) >= 3  # different lengths
    ref = separate_logits(family)
    collator = make_collator("packed", b)
    assert isinstance(collator, PackedCollator)
    packed = collator(encs)
    d_packed = packed_diff(forward(b.model, packed)[0], encs, ref)
    padded = make_collator("padded", b)(encs)
    d_padded = padded_diff(forward(b.model, padded), encs, ref)

    # The peer bug: positions as plain arange over the whole packed row (samples see each other).
    T = packed["input_ids"].shape[1]
    naive = dict(packed, position_ids=torch.arange(T).expand(packed["position_ids"].shape[:-1] + (T,)).clone())
    d_naive = packed_diff(forward(b.model, naive)[0], encs, ref)
    MEASURED[family] = dict(packed=d_packed, padded=d_padded, naive_arange=d_naive)
    if family in QWEN_PACKING:
        # Second peer bug: restarting text positions but 1-D positions in the mRoPE rows.
        pos = packed["position_ids"].clone()
        pos[1:] = pos[0]
        d_1d = packed_diff(forward(b.model, dict(packed, position_ids=pos))[0], encs, ref)
        MEASURED[family]["text_positions_as_mrope"] = d_1d
        assert d_1d > BUG, d_1d
    print(family, MEASURED[family])
    assert d_packed <= TOL, d_packed
    assert d_padded <= TOL, d_padded
    assert d_naive > BUG, d_naive


@pytest.mark.parametrize("family", PACKING)
def test_packed_batch_layout(family):
    b = bundle(family)
    encs = encoded(family)
    packed = make_collator("packed", b)(encs)
    lens = [len(e) for e in encs]
    T = sum(lens)
    assert packed["input_ids"].shape == (1, T) and packed["labels"].shape == (1, T)
    assert "attention_mask" not in packed
    assert packed["seq_lens"] == lens and packed["max_seqlen"] == max(lens)
    assert packed["cu_seqlens"].dtype == torch.int32
    assert packed["cu_seqlens"].tolist() == [0] + torch.cumsum(torch.tensor(lens), 0).tolist()
    assert packed["keys"] == [e.key for e in encs] and packed["tasks"] == [e.task for e in encs]
    assert packed["labels_judgement"] == [1, 2, "tie", 1]
    starts = packed["cu_seqlens"][:-1].long()
    assert (packed["labels"][0, starts] == IGNORE_INDEX).all()
    assert torch.equal(packed["labels"][0], torch.cat([e.labels for e in encs]))  # first labels were -100 anyway
    text_pos = torch.cat([torch.arange(n) for n in lens])
    if family in QWEN_PACKING:
        assert packed["position_ids"].shape == (4, 1, T)
        assert torch.equal(packed["position_ids"][0, 0], text_pos)
        assert packed["mm_token_type_ids"].shape == (1, T)
        # vision tokens carry real 3-D positions (rows differ), text tokens equal rows
        mm = packed["mm_token_type_ids"][0]
        rows = packed["position_ids"][1:, 0]
        assert (rows[:, mm == 0] == rows[0, mm == 0]).all() and not (rows[1, mm > 0] == rows[2, mm > 0]).all()
    else:
        assert torch.equal(packed["position_ids"], text_pos[None])
        assert packed["pixel_values"].shape[0] == sum(e.visual["pixel_values"].shape[0] for e in encs)
        assert packed["pixel_values"].shape[1] == max(e.visual["pixel_values"].shape[1] for e in encs)
        assert packed["batch_num_images"].tolist() == [2, 1, 12, 5]
    # the packed model loss equals the mean per-token loss over the samples' supervised tokens
    with torch.no_grad():
        loss = b.model(**model_inputs(packed, labels=True), use_cache=False).loss
        ref = separate_logits(family)
        nll, n = 0.0, 0
        for e, r in zip(encs, ref):
            lab = e.labels[1:]
            nll += torch.nn.functional.cross_entropy(r[:-1], lab, ignore_index=IGNORE_INDEX, reduction="sum").item()
            n += int((lab != IGNORE_INDEX).sum())
    assert loss.item() == pytest.approx(nll / n, abs=1e-4)


@pytest.mark.parametrize("family", QWEN_PACKING)
def test_rope_positions_match_model_and_pickle(family):
    b = bundle(family)
    for e in encoded(family):
        mine = rope_positions(family, b.model.config, e)
        kw = {k: e.visual.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
        theirs, _ = b.model.model.get_rope_index(e.input_ids[None], mm_token_type_ids=e.mm_token_type_ids[None], **kw)
        assert mine.shape == (3, len(e)) and torch.equal(mine, theirs[:, 0])
    collator = pickle.loads(pickle.dumps(make_collator("packed", b)))  # DataLoader workers
    again = collator(encoded(family))
    assert torch.equal(again["position_ids"], make_collator("packed", b)(encoded(family))["position_ids"])


@pytest.mark.parametrize("family", PACKING)
def test_placeholder_count_equals_visual_features(family):
    """Placeholder tokens in input_ids == rows of visual features the model computes, per sample."""
    b = bundle(family)
    inner = b.model.model
    cfg = b.model.config
    for e in encoded(family, "prompt"):
        v = e.visual
        with torch.no_grad():
            if family == "llava_onevision":
                feats = inner.get_image_features(
                    pixel_values=v["pixel_values"], image_sizes=v["image_sizes"],
                    vision_feature_layer=cfg.vision_feature_layer,
                    vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                    batch_num_images=v["batch_num_images"],
                ).pooler_output
                n_feat = sum(f.shape[0] for f in feats)
                assert int((e.input_ids == cfg.image_token_index).sum()) == n_feat > 0
                continue
            if "pixel_values" in v:
                feats = inner.get_image_features(v["pixel_values"], v["image_grid_thw"]).pooler_output
                n_img = int((e.input_ids == cfg.image_token_id).sum())
                assert n_img == sum(f.shape[0] for f in feats) > 0
                assert n_img == int((e.mm_token_type_ids == 1).sum())
            if "pixel_values_videos" in v:
                feats = inner.get_video_features(v["pixel_values_videos"], v["video_grid_thw"]).pooler_output
                n_vid = int((e.input_ids == cfg.video_token_id).sum())
                assert n_vid == sum(f.shape[0] for f in feats) > 0
                assert n_vid == int((e.mm_token_type_ids == 2).sum())


# ------------------------------------------------------------------------------------------ qwen3_5


def test_qwen3_5_padding_is_exact():
    b = bundle("qwen3_5")
    encs = encoded("qwen3_5")
    ref = separate_logits("qwen3_5")
    right = make_collator("padded", b)
    d_right = padded_diff(forward(b.model, right(encs)), encs, ref)
    # Linear-attention layers: right padding cannot leak (pads come after every real token); left
    # padding is masked by the model (zeroed pad states) - both checked.
    left = PaddedCollator(right.pad_token_id, padding_side="left")
    d_left = padded_diff(forward(b.model, left(encs)), encs, ref, "left")
    MEASURED["qwen3_5"] = dict(MEASURED.get("qwen3_5", {}), padded_right=d_right, padded_left=d_left)
    print("qwen3_5", MEASURED["qwen3_5"])
    assert d_right <= TOL and d_left <= TOL


# ------------------------------------------------------------------------------------------ padded


def test_padded_layout_llava_crops_and_qwen_mm():
    encs = encoded("llava_onevision")
    batch = PaddedCollator(7)(encs)
    W = max(len(e) for e in encs)
    assert batch["input_ids"].shape == (4, W) and batch["attention_mask"].sum(1).tolist() == [len(e) for e in encs]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 7).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    crops = [e.visual["pixel_values"].shape[1] for e in encs]
    assert batch["pixel_values"].shape[:2] == (sum(e.visual["pixel_values"].shape[0] for e in encs), max(crops))
    assert batch["image_sizes"].shape == (2 + 1 + 12 + 5, 2) and batch["batch_num_images"].tolist() == [2, 1, 12, 5]
    assert "mm_token_type_ids" not in batch
    q = PaddedCollator(0, padding_side="left")(encoded("qwen2_5_vl"))
    assert q["mm_token_type_ids"].shape == q["input_ids"].shape
    assert (q["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with a real token
    assert q["video_grid_thw"].shape == (3, 3) and q["second_per_grid_ts"].shape == (3,)
    with pytest.raises(UrtError):
        PaddedCollator(0, padding_side="middle")
    with pytest.raises(UrtError):
        PaddedCollator(0)([])
    with pytest.raises(UrtError, match="mm_token_type_ids"):
        PaddedCollator(0)([encs[0], encoded("qwen2_5_vl")[0]])
    with pytest.raises(UrtError):
        make_collator("ragged", bundle("qwen2_5_vl"))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_left_padded_generation_equals_single(family):
    b = bundle(family)
    encs = encoded(family, "prompt")
    pair = [encs[1], encs[3]]  # single image + video question: different lengths and modalities
    assert len(pair[0]) != len(pair[1])
    left = make_collator("padded", b, padding_side="left")
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        batch = left(pair)
        out = b.model.generate(**model_inputs(batch), **gen)[:, batch["input_ids"].shape[1]:]
        for i, e in enumerate(pair):
            single = left([e])
            alone = b.model.generate(**model_inputs(single), **gen)[:, single["input_ids"].shape[1]:]
            assert out[i].tolist() == alone[0].tolist()


def test_auto_packs_only_under_flash_attention():
    from urt.data.collate import PackedCollator, PaddedCollator, make_collator, packing_pays

    bundle = build_tiny("qwen2_5_vl")
    assert bundle.model.config._attn_implementation == "sdpa"
    assert not packing_pays(bundle)
    assert isinstance(make_collator("auto", bundle), PaddedCollator)
    bundle.model.config._attn_implementation = "flash_attention_2"  # what load_model picks on CUDA with flash-attn
    assert packing_pays(bundle)
    assert isinstance(make_collator("auto", bundle), PackedCollator)
    with pytest.raises(UrtError, match="'auto', 'padded' or 'packed'"):
        make_collator("ragged", bundle)
