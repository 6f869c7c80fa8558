"""urt.generation: batched, left-padded, seeded generation with vision tokens suppressed."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from data_fixtures import four_task_samples
from urt.data.encode import SampleEncoder
from urt.errors import UrtError
from urt.generation import GenerationConfig, generate, stop_token_ids, vision_token_ids
from urt.models import build_tiny

VISION = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<image>", "<video>")


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one thread beats two on 2 cores



@pytest.fixture(scope="module")
def qwen():
    return build_tiny("qwen2_5_vl", seed=0)


@pytest.fixture(scope="module")
def prompts(qwen):
    enc = SampleEncoder(qwen.processor, "qwen2_5_vl", mode="prompt")
    out = [enc(s) for s in four_task_samples(video_data=False)]
    assert len({len(e) for e in out}) == len(out)  # distinct lengths: left padding really happens
    return out


@contextlib.contextmanager
def logit_bias(model, bias: dict[int, float]):
    """Add `bias` to the lm_head output (forces the model towards the given tokens)."""
    def hook(_mod, _inp, out):
        out = out.clone()
        for i, b in bias.items():
            out[..., i] += b
        return out

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_ids(model, store: list):
    """Record the new token ids of every model.generate call (decoding drops special tokens)."""
    orig = model.generate

    def wrapped(*args, **kwargs):
        out = orig(*args, **kwargs)
        if kwargs.get("return_dict_in_generate"):  # the shared prefill: its one token is not used
            return out
        width = kwargs["input_ids"].shape[1]
        store.extend(out[:, width:].tolist())
        return out

    model.generate = wrapped
    try:
        yield
    finally:
        del model.generate


def test_counts_order_and_batching(qwen, prompts):
    cfg = GenerationConfig(max_new_tokens=6, batch_size=4)
    batched = generate(qwen, prompts, cfg)
    assert len(batched) == len(prompts) and all(len(r) == 1 and isinstance(r[0], str) for r in batched)
    singles = [generate(qwen, [p], cfg)[0] for p in prompts]
    assert batched == singles  # left-padded batch == one prompt at a time, in input order
    # greedy is deterministic, whatever the batching and input order
    mixed = generate(qwen, prompts[::-1], dataclasses.replace(cfg, batch_size=3))
    assert mixed == batched[::-1]
    # greedy with several return sequences: n identical copies
    three = generate(qwen, prompts[:2], dataclasses.replace(cfg, num_return_sequences=3))
    assert [len(r) for r in three] == [3, 3] and all(r == [r[0]] * 3 for r in three)
    assert [r[0] for r in three] == [b[0] for b in batched[:2]]
    assert generate(qwen, [], cfg) == []


def test_sampling_is_seeded(qwen, prompts):
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, num_return_sequences=2, batch_size=2, seed=7)
    state = torch.random.get_rng_state()
    a = generate(qwen, prompts, cfg)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    b = generate(qwen, prompts, cfg)
    c = generate(qwen, prompts, dataclasses.replace(cfg, seed=8))
    assert a == b and a != c
    assert [len(r) for r in a] == [2] * len(prompts)
    assert any(r[0] != r[1] for r in a)  # the two samples of a prompt differ


def test_categorical_draw_samples_softmax():
    """The inverse-CDF draw samples softmax(scores): frequencies match, zero-probability tokens (the
    suppressed placeholders, first and last here) are never drawn, and the output marks one token per row."""
    from urt.generation import CategoricalDraw

    torch.manual_seed(0)
    probs = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.0])
    scores = probs.log().expand(40000, -1).clone()
    out = CategoricalDraw()(None, scores)
    assert (torch.isfinite(out).sum(-1) == 1).all()
    freq = torch.bincount(out.argmax(-1), minlength=6).float() / len(out)
    assert freq[0] == 0 and freq[-1] == 0
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)  # 4 sigma at n = 40000


def test_low_temperature_and_top_p_sample_the_greedy_completion(qwen, prompts):
    greedy = generate(qwen, prompts, GenerationConfig(max_new_tokens=8, batch_size=4))
    for kw in (dict(temperature=1e-4), dict(temperature=1.0, top_p=1e-6)):
        cfg = GenerationConfig(max_new_tokens=8, num_return_sequences=2, batch_size=4, seed=1, **kw)
        assert generate(qwen, prompts, cfg) == [[g[0]] * 2 for g in greedy]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5", "llava_onevision"])
def test_shared_prefill_gives_the_repeated_prompts_completions(family):
    """Several samples per prompt encode each prompt once (its KV cache repeated): the same completions as
    repeating the prompt in the batch, and the first forward runs one row per prompt (Qwen3.5 too: its
    linear-attention states are repeated with the keys and values)."""
    bundle = build_tiny(family, seed=0)
    enc = SampleEncoder(bundle.processor, family, mode="prompt")
    ps = [enc(s) for s in four_task_samples(video_data=False)]
    if family == "llava_onevision":
        ps = [p for p in ps if p.task.startswith("image")]  # its video path reads 32 frames
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, num_return_sequences=3, batch_size=4, seed=5)
    rows: list[int] = []
    handle = bundle.model.register_forward_pre_hook(
        lambda _m, args, kw: rows.append(int(kw["input_ids"].shape[0])) if len(rows) == 0 else None,
        with_kwargs=True)
    try:
        shared = generate(bundle, ps, cfg)
    finally:
        handle.remove()
    repeated = generate(bundle, ps, dataclasses.replace(cfg, shared_prefill=False))
    assert shared == repeated
    assert any(r[0] != r[1] for r in shared)  # really sampled
    assert rows == [len(ps)]  # one row per prompt in the first forward
    from urt.generation import _SHARED_PREFILL
    assert _SHARED_PREFILL[type(bundle.model)] is True


def test_preallocated_layer_holds_what_dynamic_layer_holds():
    """PreallocatedLayer against HF's DynamicLayer through the operations generate and its callers use:
    a prefill, decode steps, a crop, a batch selection (beam-style), the shared prefill's repeat, and a
    capacity overflow; the keys/values returned and stored are equal at every step, and decode steps
    write into the buffer instead of reallocating it."""
    from transformers.cache_utils import DynamicLayer

    from urt.generation import PreallocatedLayer

    torch.manual_seed(0)
    ours, ref = PreallocatedLayer(capacity=9), DynamicLayer()

    def step(n: int, batch: int) -> None:
        k, v = torch.randn(batch, 2, n, 4), torch.randn(batch, 2, n, 4)
        got, want = ours.update(k, v), ref.update(k.clone(), v.clone())
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)
        assert ours.get_seq_length() == ref.get_seq_length()

    step(5, 2)  # prefill
    buf = ours._kbuf
    step(1, 2)
    step(1, 2)
    assert ours._kbuf is buf and ours.keys.data_ptr() == buf.data_ptr()  # written in place
    ours.crop(-2), ref.crop(-2)
    step(1, 2)
    ours.batch_select_indices(torch.tensor([1])), ref.batch_select_indices(torch.tensor([1]))
    step(1, 1)
    ours.batch_repeat_interleave(3), ref.batch_repeat_interleave(3)
    assert torch.equal(ours.keys, ref.keys)
    for _ in range(6):  # past the capacity of 9: the buffer grows
        step(1, 3)
    assert ours.get_seq_length() == 13 and ours._kbuf.shape[-2] >= 13


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5", "llava_onevision"])
def test_preallocated_cache_gives_the_same_completions(family):
    """The preallocated KV cache only moves where keys and values live: greedy and sampled (shared prefill)
    completions equal those with HF's own cache; for Qwen3.5 its full-attention layers are preallocated,
    its linear-attention layers `LinearStateLayer`s."""
    from urt.generation import PreallocatedLayer, preallocated_cache
    from urt.models.hybrid import LinearStateLayer

    bundle = build_tiny(family, seed=0)
    enc = SampleEncoder(bundle.processor, family, mode="prompt")
    ps = [enc(s) for s in four_task_samples(video_data=False)]
    if family == "llava_onevision":
        ps = [p for p in ps if p.task.startswith("image")]  # its video path reads 32 frames
    cache = preallocated_cache(bundle.model, 64)
    kinds = [type(layer) for layer in cache.layers]
    if family == "qwen3_5":
        assert kinds == [LinearStateLayer] * 3 + [PreallocatedLayer]  # tiny qwen3_5: 3 linear, 1 full attention
    else:
        assert set(kinds) == {PreallocatedLayer}
    for cfg in (GenerationConfig(max_new_tokens=12, batch_size=3),
                GenerationConfig(max_new_tokens=12, temperature=1.0, num_return_sequences=3, batch_size=4, seed=2)):
        fast = generate(bundle, ps, cfg)
        assert fast == generate(bundle, ps, dataclasses.replace(cfg, preallocate=False))


def test_vision_tokens_are_never_generated(qwen, prompts):
    tok = qwen.tokenizer
    ids = {tok.convert_tokens_to_ids(t) for t in VISION}
    assert ids <= set(vision_token_ids(qwen))
    assert qwen.model.config.image_token_id in ids
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    bias = {i: 40.0 for i in ids}
    bias[pad] = 60.0  # image_pad has the highest logit
    cfg = GenerationConfig(max_new_tokens=6, batch_size=4)
    # Sanity: without suppression the biased model does emit the image pad token.
    import urt.generation as g

    seen: list = []
    orig = g.vision_token_ids
    try:
        g.vision_token_ids = lambda bundle: []
        with logit_bias(qwen.model, bias), capture_ids(qwen.model, seen):
            generate(qwen, prompts[:1], cfg)
    finally:
        g.vision_token_ids = orig
    assert seen and seen[0][0] == pad
    # With suppression: never, greedy or sampled.
    seen = []
    with logit_bias(qwen.model, bias), capture_ids(qwen.model, seen):
        generate(qwen, prompts, cfg)
        generate(qwen, prompts, dataclasses.replace(cfg, temperature=1.5, num_return_sequences=3))
    assert len(seen) == len(prompts) * 4
    assert not ids & {t for row in seen for t in row}


def test_max_new_tokens_and_stop(qwen, prompts):
    tok = qwen.tokenizer
    word = tok.convert_tokens_to_ids(tok.tokenize(" cat")[0])
    seen: list = []
    with logit_bias(qwen.model, {word: 50.0}), capture_ids(qwen.model, seen):
        out = generate(qwen, prompts, GenerationConfig(max_new_tokens=5))
    assert all(len(row) == 5 for row in seen)  # never stops, never exceeds
    assert all(len(tok(r[0], add_special_tokens=False)["input_ids"]) == 5 for r in out)
    # A model that ends at once gives empty completions (the stop token is not decoded).
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(qwen)
    with logit_bias(qwen.model, {im_end: 50.0}):
        assert generate(qwen, prompts, GenerationConfig(max_new_tokens=5)) == [[""]] * len(prompts)


def test_assistant_prefix_is_prepended(qwen, prompts):
    p = dataclasses.replace(prompts[0], meta=dict(prompts[0].meta, assistant_prefix="<think>\n"))
    cfg = GenerationConfig(max_new_tokens=4)
    plain = generate(qwen, [prompts[0]], cfg)[0][0]
    assert generate(qwen, [p], cfg)[0][0] == "<think>\n" + plain


def test_rejects_bad_input(qwen, prompts):
    with pytest.raises(UrtError, match="Encoded"):
        generate(qwen, ["text"], GenerationConfig())
    sft = SampleEncoder(qwen.processor, "qwen2_5_vl", mode="sft")(four_task_samples(video_data=False)[0])
    with pytest.raises(UrtError, match="prompt"):
        generate(qwen, [sft], GenerationConfig())
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(batch_size=0),
                dict(num_return_sequences=0)):
        with pytest.raises(UrtError):
            generate(qwen, prompts, GenerationConfig(**bad))


def test_progress_bar(qwen, prompts):
    out = generate(qwen, prompts[:2], GenerationConfig(max_new_tokens=2, batch_size=1), progress=True, desc="x")
    assert len(out) == 2


def test_llava_onevision_batched_equals_single():
    bundle = build_tiny("llava_onevision", seed=0)
    enc = SampleEncoder(bundle.processor, "llava_onevision", mode="prompt")
    ps = [enc(s) for s in four_task_samples(video_data=False) if s.task.startswith("image")]
    cfg = GenerationConfig(max_new_tokens=5, batch_size=4)
    batched = generate(bundle, ps, cfg)
    assert batched == [generate(bundle, [p], cfg)[0] for p in ps]
    ids = {bundle.tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<video>")}
    assert ids <= set(vision_token_ids(bundle))
    seen: list = []
    with logit_bias(bundle.model, {i: 60.0 for i in ids}), capture_ids(bundle.model, seen):
        generate(bundle, ps, cfg)
    assert seen and not ids & {t for row in seen for t in row}


def test_completions_carry_the_sampled_ids():
    """Each completion is its text plus the ids that were sampled: the ids decode to the text (prefix aside),
    end with a stop token exactly when finish_reason is "stop", and survive pickling (DataLoader workers)."""
    import pickle

    from urt.data.encode import SampleEncoder
    from urt.generation import Completion, GenerationConfig, generate, stop_token_ids
    from urt.models import load_model
    from data_fixtures import four_task_samples

    torch.manual_seed(0)
    bundle = load_model("tiny", family="qwen2_5_vl")
    enc = SampleEncoder(bundle.processor, "qwen2_5_vl", mode="prompt", max_length=8192)
    prompts = [enc(s) for s in four_task_samples(video_data=False)[:2]]
    stops = set(stop_token_ids(bundle))
    outs = generate(bundle, prompts, GenerationConfig(max_new_tokens=6, temperature=1.0, num_return_sequences=3,
                                                      seed=1))
    seen = set()
    for p, group in zip(prompts, outs):
        prefix = p.meta.get("assistant_prefix", "") or ""
        for c in group:
            assert isinstance(c, Completion) and isinstance(c, str) and 1 <= len(c.ids) <= 6
            seen.add(c.finish_reason)
            if c.finish_reason == "stop":
                assert c.ids[-1] in stops and not stops & set(c.ids[:-1])
                body = c.ids[:-1]
            else:
                assert c.finish_reason == "length" and len(c.ids) == 6 and not stops & set(c.ids)
                body = c.ids
            assert str(c) == prefix + bundle.tokenizer.decode(list(body), skip_special_tokens=True)
            back = pickle.loads(pickle.dumps(c))
            assert (str(back), back.ids, back.finish_reason) == (str(c), c.ids, c.finish_reason)
    assert "length" in seen  # 6 tokens from a random model: most run to the limit
