"""urt.models.hybrid: Qwen3.5's linear-attention layers on packed rows and in a selectable cache.

The tiny real-architecture qwen3_5 (fp32, sdpa, CPU; three gated-DeltaNet layers, convolution window 4,
the delta rule chunked by 64, and one full-attention layer). A packed row of the four tasks' samples (two
images, one image, two videos, one video) plus text-only samples placed so that sample boundaries fall
exactly on a convolution-window and delta-rule-chunk boundary (packed offset 64) and one sample is shorter
than the convolution window gives each sample's own logits (max |Δ| <= 1e-5) and gradients; the same row
on the same weights without urt's hooks lets the linear-attention state run on from sample to sample and
fails by far (the negative control)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from data_fixtures import four_task_samples
from urt.data.collate import PackedCollator, make_collator, model_inputs
from urt.data.encode import IGNORE_INDEX, Encoded, SampleEncoder
from urt.errors import UrtError
from urt.models import build_tiny
from urt.models import hybrid

pytestmark = pytest.mark.usefixtures("torch_one_thread")
COT = "<think>Answer 1: 7/10\nAnswer 2: 4/10</think>\n<answer>Answer 1 is better</answer>"
TOL = 1e-5
MEASURED: dict = {}


def text_sample(key: str, n: int, seed: int) -> Encoded:
    """A text-only sample of `n` tokens (ids clear of the special / vision tokens), all supervised."""
    ids = torch.randint(10, 200, (n,), generator=torch.Generator().manual_seed(seed))
    return Encoded(key=key, task="image_understanding", label=1, input_ids=ids, labels=ids.clone(), visual={},
                   mm_token_type_ids=torch.zeros(n, dtype=torch.long), prompt_length=0)


def samples(b) -> list[Encoded]:
    enc = SampleEncoder(b.processor, "qwen3_5", mode="sft")
    visual = [enc(dataclasses.replace(s, cot=s.cot or COT)) for s in four_task_samples(video_data=False)]
    # offsets 0 | 64 (a window and chunk boundary) | 67 (a 3-token sample, shorter than the window) | ...
    return [text_sample("t64", 64, 0), text_sample("t3", 3, 1), *visual[:2], text_sample("t130", 130, 2),
            *visual[2:]]


@torch.no_grad()
def separate(model, encs):
    out = []
    for e in encs:
        out.append(model(input_ids=e.input_ids[None], mm_token_type_ids=e.mm_token_type_ids[None], use_cache=False,
                         **e.visual).logits[0])
    return out


def packed_diff(logits_row, encs, ref) -> float:
    off, d = 0, 0.0
    for e, r in zip(encs, ref):
        d = max(d, (logits_row[off: off + len(e)] - r).abs().max().item())
        off += len(e)
    return d


def test_packed_rows_equal_separate_samples_and_leak_without_the_hooks(caplog):
    b = build_tiny("qwen3_5", seed=0)
    encs = samples(b)
    lens = [len(e) for e in encs]
    assert lens[:2] == [64, 3] and len(set(lens)) == len(lens)
    assert b.model.config.text_config.linear_conv_kernel_dim == 4 and 64 % 4 == 0
    ref = separate(b.model, encs)
    stock = build_tiny("qwen3_5", seed=0)  # same weights, no hooks: transformers' own packed forward
    caplog.clear()
    with caplog.at_level("WARNING", logger="urt"):
        collator = make_collator("packed", b)
    assert isinstance(collator, PackedCollator)
    assert not [r for r in caplog.records if r.name.startswith("urt")]  # packed, no fallback warning
    assert len(hybrid.linear_attention_layers(b.model)) == 3
    assert all(getattr(layer, hybrid._HOOKED) for layer in hybrid.linear_attention_layers(b.model))
    batch = model_inputs(collator(encs))
    with torch.no_grad():
        d_packed = packed_diff(b.model(**batch, use_cache=False).logits[0], encs, ref)
        d_leak = packed_diff(stock.model(**batch, use_cache=False).logits[0], encs, ref)
    MEASURED.update(packed=d_packed, leak_without_hooks=d_leak)
    print("qwen3_5 packed", MEASURED)
    assert d_packed <= TOL, d_packed
    assert d_leak > 1e-2, d_leak


def test_load_model_hooks_a_hybrid_model_before_any_collator():
    """A Qwen3.5 model from load_model is already hooked (packed rows fed by any code stay isolated); other
    families have no linear-attention layer to hook."""
    from urt.models import load_model

    layers = hybrid.linear_attention_layers(load_model("tiny", family="qwen3_5").model)
    assert len(layers) == 3 and all(getattr(layer, hybrid._HOOKED, False) for layer in layers)
    assert hybrid.linear_attention_layers(load_model("tiny", family="qwen3_vl").model) == []


def test_packed_gradients_equal_separate_gradients():
    """The loss summed over packed samples has the gradients of the per-sample losses' sum (the hooks'
    gather and scatter are differentiable), with and without gradient checkpointing."""
    b = build_tiny("qwen3_5", seed=1)
    hybrid.isolate_packed_samples(b.model)
    model = b.model.train()
    encs = [text_sample("a", 64, 3), text_sample("b", 3, 4), text_sample("c", 77, 5)]

    def grads(loss_fn):
        model.zero_grad()
        loss_fn().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def separate_loss():
        return sum(model(input_ids=e.input_ids[None], labels=e.labels[None], use_cache=False).loss * (len(e) - 1)
                   for e in encs)

    packed = make_collator("packed", b)(encs)
    n_pred = int((packed["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert n_pred == sum(len(e) - 1 for e in encs)

    def packed_loss():
        return model(**model_inputs(packed, labels=True), use_cache=False).loss * n_pred

    g_sep, g_pack = grads(separate_loss), grads(packed_loss)
    linear = [n for n in g_sep if "linear_attn" in n]
    assert linear and g_sep.keys() == g_pack.keys()
    for name in g_sep:
        torch.testing.assert_close(g_pack[name], g_sep[name], atol=1e-5, rtol=1e-4)
    # under gradient checkpointing the layer's forward is recomputed; the hooks sit outside it
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g_ckpt = grads(packed_loss)
    for name in g_sep:
        torch.testing.assert_close(g_ckpt[name], g_pack[name], atol=1e-6, rtol=1e-5)


def _layer_and_row(lengths):
    b = build_tiny("qwen3_5", seed=0)
    layer = hybrid.linear_attention_layers(b.model)[0]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    hidden = torch.randn(1, pos.shape[1], b.model.config.text_config.hidden_size)
    return layer, hidden, pos


def test_variable_length_kernels_get_the_boundaries(monkeypatch):
    """Where flash-linear-attention and causal-conv1d run (CUDA), the row is not split: the layer gets
    `cu_seq_lens_q` (transformers hands it to the chunked delta rule as `cu_seqlens`) and `seq_idx`
    (causal_conv1d_fn's per-token sequence index)."""
    layer, hidden, pos = _layer_and_row([5, 3, 4])
    monkeypatch.setattr(hybrid, "_varlen_kernels", lambda h: True)
    args, kwargs = hybrid._before(layer, (hidden,), {"position_ids": pos, "attention_mask": None, "cache": None})
    assert args[0] is hidden
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 5, 8, 12] and kwargs["cu_seq_lens_q"].dtype == torch.long
    assert kwargs["seq_idx"].tolist() == [[0] * 5 + [1] * 3 + [2] * 4] and kwargs["seq_idx"].dtype == torch.int32
    # CPU / the torch fallback: one right-padded row per sample
    monkeypatch.setattr(hybrid, "_varlen_kernels", lambda h: False)
    args, kwargs = hybrid._before(layer, (hidden,), {"position_ids": pos, "attention_mask": None, "cache": None})
    rows = args[0]
    assert rows.shape == (3, 5, hidden.shape[-1]) and "cu_seq_lens_q" not in kwargs
    assert torch.equal(rows[1, :3], hidden[0, 5:8]) and not rows[1, 3:].any()
    assert torch.equal(hybrid._after(layer, args, kwargs, rows), hidden)


def test_unpacked_forwards_are_left_alone_and_a_packed_row_with_a_cache_is_refused():
    layer, hidden, pos = _layer_and_row([5, 3, 4])
    one = torch.arange(12)[None]
    assert hybrid._before(layer, (hidden,), {"position_ids": one, "attention_mask": None}) is None
    assert hybrid._before(layer, (hidden,), {"position_ids": pos, "attention_mask": torch.ones(1, 12)}) is None
    with pytest.raises(UrtError, match="use_cache=False"):
        hybrid._before(layer, (hidden,), {"position_ids": pos, "attention_mask": None, "cache": object()})


def test_hybrid_cache_holds_what_transformers_cache_holds():
    """`hybrid_cache` against transformers' own cache for the model: a left-padded prefill of two prompts and
    decode steps give equal logits and states; selecting and repeating rows gives each row's own states
    (what the shared prompts and the shared prefill rely on)."""
    from transformers.cache_utils import DynamicCache

    b = build_tiny("qwen3_5", seed=0)
    model = b.model.eval()
    ours, ref = hybrid.hybrid_cache(model), DynamicCache(config=model.config)
    assert [type(x).__name__ for x in ours.layers] == ["LinearStateLayer"] * 3 + ["DynamicLayer"]
    assert hybrid.hybrid_cache(build_tiny("qwen2_5_vl", seed=0).model) is None  # no linear attention
    ids = torch.randint(10, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # the second prompt is 5 tokens, left-padded
    with torch.no_grad():
        for step in range(4):
            kw = dict(input_ids=ids, attention_mask=mask, use_cache=True)
            a = model(**kw, cache=ours).logits
            r = model(**kw, cache=ref).logits
            torch.testing.assert_close(a, r, atol=1e-6, rtol=0)
            nxt = r[:, -1].argmax(-1, keepdim=True)
            ids, mask = nxt, torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        for i in range(3):
            torch.testing.assert_close(ours.layers[i].recurrent_states[0], ref.layers[i].recurrent_states[0])
            torch.testing.assert_close(ours.layers[i].conv_states[0], ref.layers[i].conv_states[0])
        rec = [ours.layers[i].recurrent_states[0].clone() for i in range(3)]
        ours.batch_select_indices(torch.tensor([1, 0, 1]))
        ours.batch_repeat_interleave(2)
        for i in range(3):
            assert torch.equal(ours.layers[i].recurrent_states[0], rec[i][[1, 1, 0, 0, 1, 1]])
        assert ours.layers[3].keys.shape[0] == 6 and ours.get_seq_length() == 12


def test_hooks_leave_generation_and_unpacked_forwards_alone():
    """The hooked model generates what the stock model generates (unpadded and left-padded prefills with a
    cache, decode steps, the shared prefill): only rows whose positions restart are touched."""
    from urt.generation import GenerationConfig, generate

    stock, hooked = build_tiny("qwen3_5", seed=0), build_tiny("qwen3_5", seed=0)
    hybrid.isolate_packed_samples(hooked.model)
    enc = SampleEncoder(stock.processor, "qwen3_5", mode="prompt")
    ps = [enc(s) for s in four_task_samples(video_data=False)][:3]
    for cfg in (GenerationConfig(max_new_tokens=5, batch_size=1),
                GenerationConfig(max_new_tokens=5, temperature=1.0, num_return_sequences=2, batch_size=3, seed=1)):
        assert generate(hooked, ps, cfg) == generate(stock, ps, cfg)


def test_sft_loss_packed_equals_padded():
    """data.collate=packed for qwen3_5: the SFT loss of a packed batch is the padded batch's."""
    from urt.stages.sft import SFTModule

    b = build_tiny("qwen3_5", seed=0)
    encs = samples(b)
    module = SFTModule(b)
    with torch.no_grad():
        packed_loss, n_packed = module(make_collator("packed", b)(encs))
        padded_loss, n_padded = module(make_collator("padded", b)(encs))
    assert int(n_packed) == int(n_padded) > 0
    assert float(packed_loss) == pytest.approx(float(padded_loss), rel=1e-6)
