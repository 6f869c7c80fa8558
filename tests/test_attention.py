"""urt.models.attention (torch's varlen flash kernel as a transformers attention implementation) on CPU.

The kernel itself runs only on CUDA (benchmarks/mfu_cuda.py checks it there, packed vs padded). Here a
reference kernel written in this file (explicit softmax(QK^T)V per sequence) stands in for it, so what is
tested is urt's side: the sequence boundaries it derives, the layouts it hands over, GQA / scale /
causality in both spellings of torch's signature, the vision towers' one-call-per-block path, and the
calls that must go to sdpa instead (padding masks, decoding with a cache). Packed logits under `VARLEN`
equal each sample's separate forward under plain sdpa."""

from __future__ import annotations

import json

import pytest
import torch

from test_data_collate import BUG, PACKING, TOL, encoded, forward, packed_diff, separate_logits
from urt.data.collate import PackedCollator, make_collator, model_inputs, packing_pays
from urt.models import attention, build_tiny, save_pretrained
from urt.models.attention import VARLEN, VISION_VARLEN, cu_seqlens_from_positions

# torch 2.10 spells causality `is_causal` and has no scale / GQA arguments; 2.11 takes window_size=(-1, 0)
# and scale, and fewer key/value heads without a flag; later releases add enable_gqa. `gqa` is what the
# reference kernel accepts: unexpanded key/value heads (with the flag where the signature has it).
SIGNATURES = {
    "torch_2_10": {"is_causal": True, "window_size": False, "scale": False, "enable_gqa": False, "gqa": False},
    "torch_2_11": {"is_causal": False, "window_size": True, "scale": True, "enable_gqa": False, "gqa": True},
    "torch_2_12": {"is_causal": False, "window_size": True, "scale": True, "enable_gqa": True, "gqa": True},
}


class ReferenceKernel:
    """softmax(scale * Q K^T [+ causal mask]) V for each sequence of a (T, H, D) layout; records calls."""

    def __init__(self, options: dict):
        self.options = options
        self.calls: list[dict] = []

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        allowed = {name for name, ok in self.options.items() if ok and name != "gqa"}
        assert set(kw) <= allowed, f"{set(kw) - allowed} not in this torch's signature"
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and int(cu_q[-1]) == q.shape[0]
        lengths = (cu_q[1:] - cu_q[:-1]).tolist()
        assert max_q == max_k == max(lengths)
        causal = kw.get("is_causal", False) or tuple(kw.get("window_size", (-1, -1))) == (-1, 0)
        heads = {"q_heads": q.shape[1], "kv_heads": k.shape[1], "dtype": q.dtype}
        if k.shape[1] != q.shape[1]:
            assert self.options["gqa"], "this torch needs expanded key/value heads"
            assert kw.get("enable_gqa") or not self.options["enable_gqa"], "enable_gqa missing"
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scale = kw.get("scale") or q.shape[-1] ** -0.5
        self.calls.append({"sequences": len(lengths), "causal": causal, **heads})
        out = torch.empty_like(q)
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * scale
            if causal:
                n = end - start
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[start:end])
        return out


@pytest.fixture(params=sorted(SIGNATURES))
def kernel(request, monkeypatch):
    ref = ReferenceKernel(SIGNATURES[request.param])
    monkeypatch.setattr(attention, "_kernel_for", lambda query: ref)
    monkeypatch.setattr(attention, "_OPTIONS", SIGNATURES[request.param])
    return ref


_VARLEN_BUNDLES: dict = {}


def varlen_bundle(family):
    """The tiny model of test_data_collate (same seed, same weights) under VARLEN, vision tower included."""
    if family not in _VARLEN_BUNDLES:
        b = build_tiny(family, seed=0, attn_implementation=VARLEN)
        assert b.model.config._attn_implementation == VARLEN
        attention.use_varlen_in_vision(b.model)
        _VARLEN_BUNDLES[family] = b
    return _VARLEN_BUNDLES[family]


def test_cu_seqlens_from_positions():
    cu, longest = cu_seqlens_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    # every row starts a sequence, even when its first position continues the previous row's
    cu, longest = cu_seqlens_from_positions(torch.tensor([[0, 1, 2], [3, 0, 1]]))
    assert cu.tolist() == [0, 3, 4, 6] and longest == 3
    # a repeated position (not predecessor + 1) starts a sequence, as transformers' packed detection
    assert cu_seqlens_from_positions(torch.tensor([[0, 1, 1, 2]]))[0].tolist() == [0, 2, 4]


@pytest.mark.parametrize("family", PACKING)
def test_packed_varlen_equals_separate_sdpa(family, kernel):
    b = varlen_bundle(family)
    encs = encoded(family)
    ref = separate_logits(family)  # test_data_collate's model: sdpa, same seed
    assert packing_pays(b)
    collator = make_collator("auto", b)
    assert isinstance(collator, PackedCollator)
    packed = collator(encs)
    d_packed = packed_diff(forward(b.model, packed)[0], encs, ref)
    text_calls = [c for c in kernel.calls if c["causal"]]
    text_cfg = b.model.config.get_text_config()
    kinds = getattr(text_cfg, "layer_types", None) or ["full_attention"] * text_cfg.num_hidden_layers
    n_layers = kinds.count("full_attention")  # qwen3_5: its linear-attention layers call no attention kernel
    assert len(text_calls) == n_layers and all(c["sequences"] == len(encs) for c in text_calls)
    text_cfg = b.model.config.get_text_config()
    assert text_cfg.num_key_value_heads < text_cfg.num_attention_heads  # the tiny models use GQA too
    kv_heads = text_cfg.num_key_value_heads if kernel.options["gqa"] else text_cfg.num_attention_heads
    assert all(c["kv_heads"] == kv_heads and c["q_heads"] == text_cfg.num_attention_heads for c in text_calls)
    assert d_packed <= TOL, d_packed
    if family.startswith("qwen"):
        # one call per vision block per forward of the tower (images, videos), not one per window
        depth = b.model.config.vision_config.depth
        vision_calls = [c for c in kernel.calls if not c["causal"]]
        assert vision_calls and len(vision_calls) % depth == 0 and len(vision_calls) <= 2 * depth
    # negative control: positions running over the whole row -> one sequence, samples see each other
    kernel.calls.clear()
    T = packed["input_ids"].shape[1]
    naive = dict(packed, position_ids=torch.arange(T).expand(packed["position_ids"].shape[:-1] + (T,)).clone())
    assert packed_diff(forward(b.model, naive)[0], encs, ref) > BUG
    assert all(c["sequences"] == 1 for c in kernel.calls if c["causal"])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_padding_and_decoding_go_to_sdpa(family, kernel):
    b = varlen_bundle(family)
    sdpa = build_tiny(family, seed=0)
    encs = encoded(family, "prompt")
    pair = [encs[1], encs[3]]
    left = make_collator("padded", b, padding_side="left")
    batch = left(pair)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        logits = b.model(**model_inputs(batch), use_cache=False).logits
        want = sdpa.model(**model_inputs(batch), use_cache=False).logits
        assert not [c for c in kernel.calls if c["causal"]]  # the padding mask sends the LM to sdpa
        assert (logits - want).abs().max().item() <= TOL
        out = b.model.generate(**model_inputs(batch), **gen)
        assert out.tolist() == sdpa.model.generate(**model_inputs(batch), **gen).tolist()
        # an unpadded prompt prefills on the kernel and decodes (one query, many keys) on sdpa
        kernel.calls.clear()
        single = left([pair[0]])
        out = b.model.generate(**model_inputs(single), **gen)
        assert len([c for c in kernel.calls if c["causal"]]) == b.model.config.get_text_config().num_hidden_layers
        assert out.tolist() == sdpa.model.generate(**model_inputs(single), **gen).tolist()
    with torch.inference_mode():  # as urt.generation runs it: inference tensors keep no version counter
        assert b.model.generate(**model_inputs(single), **gen).tolist() == out.tolist()


def test_without_cuda_everything_is_sdpa():
    b = varlen_bundle("qwen2_5_vl")
    encs = encoded("qwen2_5_vl")
    packed = make_collator("packed", b)(encs)
    assert attention._kernel_for(torch.zeros(1, 1, 2, 4)) is None  # CPU fp32: no kernel
    assert packed_diff(forward(b.model, packed)[0], encs, separate_logits("qwen2_5_vl")) <= TOL


def test_varlen_model_saves_a_plain_checkpoint(tmp_path):
    b = varlen_bundle("qwen2_5_vl")
    assert b.model.config.vision_config._attn_implementation == VISION_VARLEN
    out = save_pretrained(b, tmp_path / "ckpt")
    text = (out / "config.json").read_text()
    assert "urt_" not in text
    json.loads(text)


@pytest.mark.parametrize("signature", sorted(SIGNATURES))
def test_custom_scale_and_gqa_reach_the_kernel(signature, monkeypatch):
    """A scaling other than 1/sqrt(d) and fewer key/value heads, called directly: the kernel's output
    equals explicit attention whichever way this torch takes them."""
    ref = ReferenceKernel(SIGNATURES[signature])
    monkeypatch.setattr(attention, "_kernel_for", lambda query: ref)
    monkeypatch.setattr(attention, "_OPTIONS", SIGNATURES[signature])
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = attention.varlen_attention_forward(module, q, k, v, None, scaling=0.3, position_ids=positions)
    assert out.shape == (1, 7, 4, 8)
    want = torch.empty(1, 7, 4, 8)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    for start, end in ((0, 3), (3, 7)):
        s = torch.einsum("hqd,hkd->hqk", q[0, :, start:end], kk[0, :, start:end]) * 0.3
        s = s.masked_fill(torch.ones(end - start, end - start, dtype=torch.bool).triu(1), float("-inf"))
        want[0, start:end] = torch.einsum("hqk,hkd->qhd", s.softmax(-1), vv[0, :, start:end])
    assert torch.allclose(out, want, atol=1e-5)
    assert ref.calls[0]["kv_heads"] == (2 if SIGNATURES[signature]["gqa"] else 4)


def test_grpo_shared_prompt_logprobs_under_varlen(kernel):
    """GRPO's default log-prob layout stays available under VARLEN (its cached calls go to sdpa, unpadded
    prefills to the kernel) and gives the padded sdpa log-probs."""
    from test_shared_prompt import mixed_rollout
    from test_visual_cache import bundle as vc_bundle
    from urt.rl.shared_prompt import SharedPromptLogprobs, make_logprob_collator
    from urt.rl.logprobs import sequence_logprobs

    sdpa, varlen = vc_bundle("qwen2_5_vl"), vc_bundle("qwen2_5_vl", attn_implementation=VARLEN)
    assert varlen.model.config._attn_implementation == VARLEN
    assert varlen.model.config.vision_config._attn_implementation == VISION_VARLEN  # load_model switched it
    seqs = mixed_rollout(sdpa)
    shared = make_logprob_collator("auto", varlen)
    assert isinstance(shared, SharedPromptLogprobs)
    with torch.no_grad():
        want, _ = sequence_logprobs(sdpa.model.eval(), make_collator("padded", sdpa), seqs)
        got, _ = sequence_logprobs(varlen.model.eval(), shared, seqs)
    assert kernel.calls
    assert max(float((x - y).abs().max()) for x, y in zip(got, want)) <= 1e-5


def test_autocast_runs_the_kernel_in_half_precision(monkeypatch):
    """bf16-mixed training: fp32 weights under autocast, and RoPE's fp32 cos/sin make q and k fp32. The
    kernel (half precision only) must still run, in autocast's dtype, as sdpa would; plain fp32 has no kernel
    (measured on an H200: bf16-mixed SFT at 12.7% MFU before, 32.9% after)."""
    ref = ReferenceKernel(SIGNATURES["torch_2_11"])
    monkeypatch.setattr(attention, "_kernel_for", lambda query: ref if attention.kernel_dtype(query) else None)
    monkeypatch.setattr(attention, "_OPTIONS", SIGNATURES["torch_2_11"])
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2  # what transformers' sdpa reads for GQA
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    want, _ = attention.varlen_attention_forward(module, q, k, v, None, position_ids=positions)  # fp32: sdpa
    assert not ref.calls
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = attention.varlen_attention_forward(module, q, k, v, None, position_ids=positions)
    assert [c["dtype"] for c in ref.calls] == [torch.bfloat16] and got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, atol=3e-2)


def _visual_inputs(b):
    """Three images, two of one size: 112 x 112 (four full windows each) and 84 x 140 (edge windows of other
    lengths), through the family's own image processor."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
              for h, w in ((112, 112), (84, 140), (112, 112))]
    out = b.processor.image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_sdpa_vision_windows_share_sdpa_calls(family, monkeypatch):
    """Under sdpa (the CPU default) load_model points a Qwen vision tower at `VISION_VARLEN`; without the
    kernel, windows of one length share one sdpa call. The tower's features and gradients equal the stock
    tower's, which calls sdpa once per window."""
    from urt.models import load_model

    ours = load_model("tiny", family=family, seed=0, attn_implementation="auto", device="cpu")
    assert ours.model.config._attn_implementation == "sdpa"
    assert ours.model.config.vision_config._attn_implementation == VISION_VARLEN
    stock = build_tiny(family, seed=0)
    assert stock.model.config.vision_config._attn_implementation == "sdpa"
    pixels, grid = _visual_inputs(ours)
    calls = {"n": 0}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls["n"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    feats, grads, n_calls = [], [], []
    for b in (stock, ours):
        visual = b.model.model.visual.train().requires_grad_(True)
        visual.zero_grad(set_to_none=True)
        calls["n"] = 0
        out = visual(pixels, grid_thw=grid).pooler_output
        n_calls.append(calls["n"])
        out.pow(2).sum().backward()
        feats.append(out.detach())
        grads.append({n: p.grad for n, p in visual.named_parameters() if p.grad is not None})
    assert feats[0].shape == feats[1].shape and feats[0].abs().max() > 0
    assert (feats[0] - feats[1]).abs().max().item() <= TOL
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-4, rtol=1e-4), name
    depth = ours.model.config.vision_config.depth
    assert n_calls[1] < n_calls[0]  # fewer calls than windows
    assert n_calls[1] <= depth * 4  # at most one per distinct length (<= 4 window lengths here) per block


def test_grouped_sdpa_equals_attention_per_sequence():
    """`_grouped_sdpa` directly: sequences of mixed lengths in two rows, causal and not, fewer key/value heads;
    each sequence attends only within itself, as explicit softmax(QK^T)V computes it."""
    torch.manual_seed(0)
    lengths = [3, 5, 3, 1, 4, 5, 3]  # rows of 12: 3+5+3+1 | 4+5+3
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    flat = [x.transpose(1, 2).reshape(24, x.shape[1], 8) for x in (q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))]
    for causal in (False, True):
        out, _ = attention._grouped_sdpa(module, q, k, v, cu, causal, scaling=0.3)
        assert out.shape == (2, 12, 4, 8)
        want = torch.empty(24, 4, 8)
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            s = torch.einsum("qhd,khd->hqk", flat[0][start:end], flat[1][start:end]) * 0.3
            if causal:
                s = s.masked_fill(torch.ones(end - start, end - start, dtype=torch.bool).triu(1), float("-inf"))
            want[start:end] = torch.einsum("hqk,khd->qhd", s.softmax(-1), flat[2][start:end])
        assert torch.allclose(out.reshape(24, 4, 8), want, atol=1e-5), causal
