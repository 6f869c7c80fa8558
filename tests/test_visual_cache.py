"""urt.rl.visual_cache: GRPO log-prob passes fed cached visual features equal the normal path.

For every supported family (tiny real-architecture models, fp32, sdpa, CPU), on a batch of prompts with
G completions each (image pair, single image, video pair, video question: Qwen3-VL then mixes image and
video DeepStack features), with packed and padded collation: per-token log-probs with the cache equal
those of the normal path (vision tower on every sequence), and so do the gradients of the trainable
language-model parameters; the vision tower runs once per distinct prompt, not in the passes. The frozen
deep-copied reference and the LoRA-disabled reference are served by the policy's cache. A trainable
vision tower or projector is refused; a model whose encoder differs from the cache's falls back. The
test is shown to detect a wrong cache (features of the wrong prompt)."""

from __future__ import annotations

import copy

import pytest
import torch

from data_fixtures import synthetic_frames, vqa_image, vqa_question
from urt.data.collate import make_collator
from urt.data.encode import SampleEncoder
from urt.data.schema import Sample, Video
from urt.errors import UrtError
from urt.models import load_model
from urt.rl.visual_cache import SUPPORTED_FAMILIES, VisualCache, cache_blocker, hf_model
from urt.rl.logprobs import completion_sequence, sequence_logprobs

ATOL = 1e-5
G = 3
PACKING = ["llava_onevision", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]
CASES = [(f, "packed") for f in PACKING] + [(f, "padded") for f in SUPPORTED_FAMILIES]


def _feeds_encoder_outputs() -> bool:
    """Whether the installed transformers takes precomputed visual features (`mm_encoder_outputs`, 5.2x)."""
    import inspect

    from transformers import Qwen2_5_VLForConditionalGeneration

    return "mm_encoder_outputs" in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters


FEEDS_ENCODER_OUTPUTS = _feeds_encoder_outputs()
pytestmark = [pytest.mark.usefixtures("torch_one_thread"),  # tiny models: one thread beats two on 2 cores
              pytest.mark.skipif(not FEEDS_ENCODER_OUTPUTS, reason="this transformers has no mm_encoder_outputs: "
                                 "urt runs without a visual cache")]


def bundle(family, **kw):
    # vision_init_std: a tower at HF's default init barely tells images apart; a wrong feature must show
    return load_model("tiny", family=family, vision_init_std=0.2, device="cpu", **kw)


def prompt_samples() -> list[Sample]:
    q, a, img = vqa_question(0)
    return [
        Sample("ig-0", "image_generation", 1, [vqa_image(1), vqa_image(2)], caption="a blue circle", source="t"),
        Sample("iu-0", "image_understanding", 2, [img], question=q, answers=("no idea", a), source="t"),
        Sample("vg-0", "video_generation", 1,
               [Video(frames=synthetic_frames(4, seed=1), fps=4.0), Video(frames=synthetic_frames(4, seed=7), fps=4.0)],
               caption="a red square moves right", source="t"),
        Sample("vu-0", "video_understanding", 2, [Video(frames=synthetic_frames(4, seed=3), fps=4.0)],
               question="what moves?", answers=("a red square", "a blue circle"), source="t"),
    ]


def rollout(b, n_prompts=4, seed=0):
    """(prompts, sequences): G completions of random tokens per prompt, laid out group by group."""
    enc = SampleEncoder(b.processor, b.family, mode="prompt")
    prompts = [enc(s) for s in prompt_samples()[:n_prompts]]
    gen = torch.Generator().manual_seed(seed)
    seqs = [completion_sequence(p, torch.randint(10, 400, (3 + (i * 5 + j * 3) % 7,), generator=gen).tolist(), j)
            for i, p in enumerate(prompts) for j in range(G)]
    return prompts, seqs


class TowerCalls:
    """Counts forward calls of the vision tower (Qwen `model.visual`, LLaVA-OV `model.vision_tower`)."""

    def __init__(self, model, family):
        inner = hf_model(model).model
        tower = inner.vision_tower if family == "llava_onevision" else inner.visual
        self.n = 0
        self.handle = tower.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1


def logps(model, collate, seqs, cache=None):
    lp, _ = sequence_logprobs(model, collate, seqs, visual_cache=cache)
    return lp


def assert_same(a, b, atol=ATOL):
    assert [len(x) for x in a] == [len(x) for x in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def grads(model, collate, seqs, cache=None):
    """Gradients of a fixed weighting of the log-probs w.r.t. the trainable parameters."""
    model.zero_grad(set_to_none=True)
    lp = logps(model, collate, seqs, cache)
    w = torch.Generator().manual_seed(1)
    loss = sum((x * torch.randn(x.shape, generator=w)).sum() for x in lp)
    loss.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("family,collation", CASES)
def test_cached_logprobs_and_grads_equal_normal_path(family, collation):
    b = bundle(family)
    model = b.model.train()  # as in GRPO: the policy is in training mode
    collate = make_collator(collation, b)
    expect = "PackedCollator" if collation == "packed" else "PaddedCollator"
    assert type(collate).__name__ == expect
    prompts, seqs = rollout(b)
    # urt feeds LLaVA-OV videos as frames (images, as the official code); its native video input: below
    kinds = {"pixel_values"} | ({"pixel_values_videos"} if family != "llava_onevision" else set())
    assert {k for p in prompts for k in p.visual if k.startswith("pixel_values")} == kinds

    calls = TowerCalls(model, family)
    with torch.no_grad():
        normal = logps(model, collate, seqs)
    assert calls.n == len(kinds)  # one call per modality per pass on the normal path

    cache = VisualCache(model, family, prompts, batch_size=3)
    assert cache.encoded == len(prompts) and len(cache) == len(prompts)
    calls.n = 0
    with torch.no_grad():
        cached = logps(model, collate, seqs, cache)
        cached_again = logps(model, collate, seqs, cache)  # a second pass (e.g. old policy, then reference)
    assert calls.n == 0, "the vision tower ran although every prompt was cached"
    assert cache.lookups == 2 * len(seqs) and cache.fallbacks == 0
    assert_same(normal, cached)
    assert_same(cached, cached_again, atol=0)

    # the policy pass with grad: the whole batch, and a micro-batch that splits a group (as _update may)
    calls.n = 0
    for part in (seqs, seqs[:5]):
        g_normal, g_cached = grads(model, collate, part), grads(model, collate, part, cache)
        assert g_normal.keys() == g_cached.keys() and len(g_normal) > 0
        assert not any(n.startswith(("model.visual.", "model.vision_tower.", "model.multi_modal_projector"))
                       for n in g_normal)
        for n in g_normal:
            torch.testing.assert_close(g_cached[n], g_normal[n], atol=ATOL, rtol=0, msg=n)
    # only the normal-path passes ran the tower: one call per modality present in a pass
    assert calls.n == sum(len({k for e in part for k in e.visual if k.startswith("pixel_values")})
                          for part in (seqs, seqs[:5]))
    calls.handle.remove()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_wrong_cache_is_detected(family):
    """The comparison above is sensitive: serving one prompt's features to another's sequences (same
    placeholder count) changes the log-probs by far more than the tolerance."""
    b = bundle(family)
    model = b.model.eval()
    collate = make_collator("padded", b)
    enc = SampleEncoder(b.processor, family, mode="prompt")
    pair = [enc(Sample(f"ig-{j}", "image_generation", 1, [vqa_image(2 * j + 1), vqa_image(2 * j + 2)],
                       caption="same caption", source="t")) for j in range(2)]
    assert len(pair[0]) == len(pair[1])
    seqs = [completion_sequence(p, list(range(20, 32)), 0) for p in pair]
    cache = VisualCache(model, family, pair)
    with torch.no_grad():
        right = logps(model, collate, seqs, cache)
        swapped_cache = VisualCache(model, family, pair)
        e0, e1 = swapped_cache._entries[id(pair[0].visual)], swapped_cache._entries[id(pair[1].visual)]
        e0.images, e1.images = e1.images, e0.images
        wrong = logps(model, collate, seqs, swapped_cache)
        normal = logps(model, collate, seqs)
    assert_same(normal, right)
    assert max(float((a - c).abs().max()) for a, c in zip(right, wrong)) > 100 * ATOL


def test_qwen3_vl_deepstack_features_are_fed():
    """Qwen3-VL's cached DeepStack features reach the LM: zeroing them changes the log-probs."""
    b = bundle("qwen3_vl")
    model = b.model.eval()
    collate = make_collator("packed", b)
    prompts, seqs = rollout(b, n_prompts=3)
    cache = VisualCache(model, "qwen3_vl", prompts)
    entries = [cache._entries[id(p.visual)] for p in prompts]
    assert all(e.image_deepstack or e.video_deepstack for e in entries)
    with torch.no_grad():
        right = logps(model, collate, seqs, cache)
        for e in entries:
            e.image_deepstack = [[torch.zeros_like(x) for x in d] for d in e.image_deepstack]
            e.video_deepstack = [[torch.zeros_like(x) for x in d] for d in e.video_deepstack]
        wrong = logps(model, collate, seqs, cache)
    assert max(float((a - c).abs().max()) for a, c in zip(right, wrong)) > 100 * ATOL


def test_llava_native_video_input():
    """LLaVA-OV's own video path (`pixel_values_videos`, pooled features) is cached too, next to images."""
    from urt.data.encode import IGNORE_INDEX, Encoded

    b = bundle("llava_onevision")
    model = b.model.train()
    tok = b.tokenizer
    prompts = []
    for j, n_frames in enumerate((4, 4)):
        text = f"<|im_start|>user\n<video>\nwhat moves in clip {j}?<|im_end|>\n<|im_start|>assistant\n"
        out = b.processor(text=[text], videos=[synthetic_frames(n_frames, size=(56, 56), seed=j)], return_tensors="pt")
        ids = out["input_ids"][0]
        prompts.append(Encoded(key=f"v{j}", task="video_understanding", label=1, input_ids=ids,
                               labels=torch.full_like(ids, IGNORE_INDEX),
                               visual={"pixel_values_videos": out["pixel_values_videos"]},
                               mm_token_type_ids=None, prompt_length=len(ids)))
    enc = SampleEncoder(b.processor, "llava_onevision", mode="prompt")
    prompts.append(enc(prompt_samples()[0]))  # an image pair in the same batch
    assert int((prompts[0].input_ids == tok.convert_tokens_to_ids("<video>")).sum()) > 0
    seqs = [completion_sequence(p, [40 + i, 41, 42 + j], j) for i, p in enumerate(prompts) for j in range(G)]
    cache = VisualCache(model, "llava_onevision", prompts)
    for collation in ("packed", "padded"):
        collate = make_collator(collation, b)
        with torch.no_grad():
            assert_same(logps(model, collate, seqs), logps(model, collate, seqs, cache))
        g_n, g_c = grads(model, collate, seqs), grads(model, collate, seqs, cache)
        for n in g_n:
            torch.testing.assert_close(g_c[n], g_n[n], atol=ATOL, rtol=0, msg=n)
    assert cache.encoded == 3 and cache.fallbacks == 0


# ------------------------------------------------------------------------------------------ references
@pytest.mark.parametrize("family", ["qwen3_vl", "llava_onevision"])
def test_frozen_copy_reference_uses_policy_cache(family):
    """GRPOModule's reference is a frozen deep copy of the starting policy: its encoder is bitwise equal,
    so the policy's cache serves it (no tower call); after a language-model change the reference's
    log-probs still equal its own normal path."""
    b = bundle(family)
    policy = b.model.train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    with torch.no_grad():  # the policy's LM moves away from the reference (as after an update)
        for n, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    collate = make_collator("packed", b)
    prompts, seqs = rollout(b)
    cache = VisualCache(policy, family, prompts)
    calls = TowerCalls(ref, family)
    with torch.no_grad():
        cached = logps(ref, collate, seqs, cache)
        assert calls.n == 0 and cache.usable_for(ref) is None
        normal = logps(ref, collate, seqs)
        policy_lp = logps(policy, collate, seqs, cache)
    assert_same(normal, cached)
    assert max(float((a - c).abs().max()) for a, c in zip(cached, policy_lp)) > 100 * ATOL


def test_lora_reference_uses_policy_cache():
    """With LoRA the reference is the policy with adapters disabled: same encoder, same cache."""
    b = bundle("qwen2_5_vl", lora={"r": 4, "alpha": 8})
    model = b.model
    with torch.no_grad():  # non-zero adapters (peft zero-initialises lora_B)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    collate = make_collator("packed", b)
    prompts, seqs = rollout(b)
    assert cache_blocker(model, "qwen2_5_vl") is None
    cache = VisualCache.for_step(model, "qwen2_5_vl", prompts)
    assert cache is not None
    with torch.no_grad():
        with model.disable_adapter():
            ref_cached = logps(model, collate, seqs, cache)
            ref_normal = logps(model, collate, seqs)
        pol_cached = logps(model, collate, seqs, cache)
        pol_normal = logps(model, collate, seqs)
    assert_same(ref_normal, ref_cached)
    assert_same(pol_normal, pol_cached)
    g_n, g_c = grads(model, collate, seqs), grads(model, collate, seqs, cache)
    assert g_n.keys() == g_c.keys() and all("lora_" in n for n in g_n)
    for n in g_n:
        torch.testing.assert_close(g_c[n], g_n[n], atol=ATOL, rtol=0, msg=n)


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("flags,part", [({"freeze_vision": False}, "model.visual.patch_embed"),
                                        ({"freeze_projector": False}, "model.visual.merger")])
def test_trainable_encoder_is_refused(caplog, flags, part):
    b = bundle("qwen3_vl", **flags)
    prompts, seqs = rollout(b, n_prompts=2)
    reason = cache_blocker(b.model, "qwen3_vl")
    assert reason is not None and "trainable" in reason and part in reason
    with pytest.raises(UrtError, match="cannot cache the visual features.*trainable"):
        VisualCache(b.model, "qwen3_vl", prompts)
    with caplog.at_level("WARNING"):
        assert VisualCache.for_step(b.model, "qwen3_vl", prompts) is None
    assert "not cached" in caplog.text and "trainable" in caplog.text


def test_encoder_unfrozen_after_building_falls_back():
    b = bundle("qwen2_5_vl")
    collate = make_collator("padded", b)
    prompts, seqs = rollout(b, n_prompts=2)
    cache = VisualCache(b.model, "qwen2_5_vl", prompts)
    for n, p in b.model.named_parameters():
        if n.startswith("model.visual.blocks.0."):
            p.requires_grad_(True)
    inputs = {"pixel_values": torch.zeros(1), "input_ids": torch.zeros(1)}
    assert cache.inputs_for(b.model, seqs, inputs) is inputs and cache.fallbacks == 1
    assert "trainable" in cache.usable_for(b.model)
    with torch.no_grad():
        assert_same(logps(b.model, collate, seqs, cache), logps(b.model, collate, seqs))


def test_different_encoder_falls_back(caplog):
    """A cache built from one model never feeds a model whose visual encoder differs: that pass runs its own
    vision tower (and gives that model's own log-probs)."""
    b = bundle("llava_onevision")
    other = load_model("tiny", family="llava_onevision", vision_init_std=0.2, seed=1, device="cpu").model.eval()
    collate = make_collator("packed", b)
    prompts, seqs = rollout(b, n_prompts=2)
    cache = VisualCache(b.model, "llava_onevision", prompts)
    assert "differs" in cache.usable_for(other)
    calls = TowerCalls(other, "llava_onevision")
    with torch.no_grad(), caplog.at_level("WARNING"):
        got = logps(other, collate, seqs, cache)
        want = logps(other, collate, seqs)
    assert calls.n == 2 and cache.fallbacks == 1 and "visual cache not used" in caplog.text
    assert_same(want, got, atol=0)


def test_dropout_in_encoder_is_refused():
    b = bundle("llava_onevision")
    b.model.config.vision_config.attention_dropout = 0.1
    b.model.train()
    assert "dropout" in cache_blocker(b.model, "llava_onevision")
    b.model.eval()  # eval mode: no dropout, cacheable
    assert cache_blocker(b.model, "llava_onevision") is None


def test_unknown_family_and_bad_batch_size():
    b = bundle("qwen2_5_vl")
    assert "no visual cache" in cache_blocker(b.model, "not_a_family")
    with pytest.raises(UrtError, match="batch_size"):
        VisualCache(b.model, "qwen2_5_vl", batch_size=0)


# ------------------------------------------------------------------------------------------ bookkeeping
def test_lazy_encoding():
    """Visuals not passed at build time are encoded on first use, once each; a batch without pixel tensors
    is returned unchanged."""
    b = bundle("qwen2_5_vl")
    model = b.model.eval()
    collate = make_collator("packed", b)
    prompts, seqs = rollout(b, n_prompts=3)
    cache = VisualCache(model, "qwen2_5_vl", prompts[:1])
    assert len(cache) == 1
    with torch.no_grad():
        got = logps(model, collate, seqs, cache)
        logps(model, collate, seqs, cache)
        want = logps(model, collate, seqs)
    assert cache.encoded == 3 and len(cache) == 3
    assert_same(want, got)
    inputs = {"input_ids": torch.zeros(1, 3, dtype=torch.long)}
    assert cache.inputs_for(model, seqs, inputs) is inputs
