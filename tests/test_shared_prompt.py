"""urt.rl.shared_prompt: GRPO log-probs with each prompt run once per micro-batch equal the padded path.

Tiny real-architecture models (fp32, sdpa, CPU) of every family (Qwen3.5's hybrid cache included: its
linear-attention states selected per completion), prompts with an image
pair, one image, a video pair and one video (G completions each, of different lengths, some ending in
EOS), sequences shuffled so a micro-batch mixes groups: per-token log-probs, entropies and the gradients
of the trainable parameters equal those of right-padded batches, with and without the visual cache. The
layout choice (`stage.collate`) and its fallbacks (flash-attention, gradient checkpointing) are
checked, and a GRPO run with shared prompts (reference model or LoRA reference, μ = 2, mini-batches
that split groups; and qwen3_5) has the padded run's losses over two steps."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from grpo_fixtures import grpo_cfg, write_grpo_prompts
import test_visual_cache
from test_visual_cache import FEEDS_ENCODER_OUTPUTS, assert_same, bundle, grads, rollout
from urt.data.collate import PackedCollator, PaddedCollator, make_collator
from urt.rl.shared_prompt import SharedPromptLogprobs, make_logprob_collator, shared_prompt_blocker
from urt.rl.visual_cache import VisualCache
from urt.rl.logprobs import completion_sequence, sequence_logprobs

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llava_onevision", "qwen3_5"]
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def mixed_rollout(b):
    """The visual-cache test's rollout (4 prompts x 3 completions of 3-9 tokens) plus one EOS-ended
    completion per prompt, shuffled."""
    from urt.generation import stop_token_ids

    prompts, seqs = rollout(b)
    eos = stop_token_ids(b)[0]
    seqs += [completion_sequence(p, [11, 12, eos], 9) for p in prompts]
    random.Random(0).shuffle(seqs)
    return seqs


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompt_logprobs_and_grads_equal_padded(family):
    b = bundle(family)
    model = b.model.train()  # as in GRPO: the policy is in training mode
    seqs = mixed_rollout(b)
    shared, padded = make_logprob_collator("shared_prompt", b), make_collator("padded", b)
    assert isinstance(shared, SharedPromptLogprobs)
    calls = []
    forward = shared.forward
    shared.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)  # the shared path really runs
    with torch.no_grad():
        want, want_ent = sequence_logprobs(model, padded, seqs, entropy=True)
        got, got_ent = sequence_logprobs(model, shared, seqs, entropy=True)
        # transformers without mm_encoder_outputs (5.17): no visual cache, the shared path alone
        cache = VisualCache(model, family, seqs) if FEEDS_ENCODER_OUTPUTS else None
        cached = sequence_logprobs(model, shared, seqs, visual_cache=cache)[0] if cache else None
    assert calls == ([1, 1] if cache else [1])
    assert [len(x) for x in got] == [len(s) - s.prompt_length for s in seqs]
    assert_same(got, want)
    assert_same(got_ent, want_ent)
    g_pad, g_shared = grads(model, padded, seqs), grads(model, shared, seqs)
    assert g_pad.keys() == g_shared.keys() and g_pad
    for name in g_pad:
        torch.testing.assert_close(g_shared[name], g_pad[name], atol=1e-4, rtol=1e-4)
    if cache is not None:
        assert cache.lookups > 0
        assert_same(cached, want)
        g_cached = grads(model, shared, seqs, cache)
        for name in g_pad:
            torch.testing.assert_close(g_cached[name], g_pad[name], atol=1e-4, rtol=1e-4)


def test_old_transformers_is_refused_with_its_reason():
    """Where transformers cannot be fed cached visual features (5.17), cache_blocker names the missing
    argument (GRPO then runs the vision tower in every pass)."""
    from urt.rl.visual_cache import cache_blocker

    if FEEDS_ENCODER_OUTPUTS:
        pytest.skip("this transformers takes mm_encoder_outputs")
    reason = cache_blocker(bundle("qwen2_5_vl").model, "qwen2_5_vl")
    assert reason is not None and "mm_encoder_outputs" in reason


def test_shared_prompt_is_checked_against_a_wrong_position():
    """The comparison can fail: completion positions 100 too far change the log-probs far beyond ATOL."""
    b = bundle("qwen2_5_vl")
    model = b.model.eval()
    seqs = mixed_rollout(b)[:4]
    shared = SharedPromptLogprobs(b)
    positions = shared._positions

    def shifted(*a):
        p, c = positions(*a)
        return p, c + 100

    shared._positions = shifted
    with torch.no_grad():
        want, _ = sequence_logprobs(model, make_collator("padded", b), seqs)
        got, _ = sequence_logprobs(model, shared, seqs)
    assert max(float((x - y).abs().max()) for x, y in zip(got, want)) > 100 * 1e-5


def test_layout_choice_and_fallbacks(monkeypatch, caplog):
    import urt.rl.shared_prompt as sp

    b = bundle("qwen2_5_vl")
    assert isinstance(make_logprob_collator("auto", b), SharedPromptLogprobs)  # sdpa: shared prompts
    assert isinstance(make_logprob_collator("padded", b), PaddedCollator)
    assert isinstance(make_logprob_collator("packed", b), PackedCollator)
    with pytest.raises(Exception, match="unknown GRPO log-prob layout"):
        make_logprob_collator("ragged", b)
    # qwen3_5 (hybrid linear attention): shared prompts too, with no warning
    q35 = bundle("qwen3_5")
    assert shared_prompt_blocker(q35) is None
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert isinstance(make_logprob_collator("auto", q35), SharedPromptLogprobs)
        assert isinstance(make_logprob_collator("shared_prompt", q35), SharedPromptLogprobs)
    assert not [r for r in caplog.records if r.name.startswith("urt")]
    # flash-attention: auto packs (its variable-length kernels), as before
    monkeypatch.setattr(sp, "_attn_implementation", lambda model: "flash_attention_2")
    monkeypatch.setattr(sp, "packing_pays", lambda bundle: True)
    assert "flash_attention_2" in shared_prompt_blocker(b)
    assert isinstance(make_logprob_collator("auto", b), PackedCollator)


def test_hybrid_prompts_right_padded_would_leak():
    """Negative control for qwen3_5: with its prompts right-padded (the attention families' layout) a shorter
    prompt's linear-attention state runs on through the padding and the log-probs move far beyond ATOL;
    left-padded (the layout used) they are the padded path's."""
    b = bundle("qwen3_5")
    model = b.model.eval()
    seqs = mixed_rollout(b)
    assert len({s.prompt_length for s in seqs}) > 1
    shared = SharedPromptLogprobs(b)
    assert shared.hybrid and shared.prompt_side == "left"
    with torch.no_grad():
        want, _ = sequence_logprobs(model, make_collator("padded", b), seqs)
        got, _ = sequence_logprobs(model, shared, seqs)
        shared.prompt_side, shared.collate_prompts = "right", PaddedCollator(shared.pad_token_id, padding_side="right")
        leaked, _ = sequence_logprobs(model, shared, seqs)
    assert_same(got, want)
    assert max(float((x - y).abs().max()) for x, y in zip(leaked, want)) > 100 * 1e-5


def test_gradient_checkpointing_pass_falls_back_to_padded():
    """Gradient checkpointing drops the KV cache in passes with gradients: those run padded (same values),
    the no-grad passes still share prompts."""
    b = bundle("qwen2_5_vl", gradient_checkpointing=True)
    model = b.model.train()
    seqs = mixed_rollout(b)[:6]
    shared = SharedPromptLogprobs(b)
    assert shared.pass_blocker(model, seqs) is not None
    with torch.no_grad():
        assert shared.pass_blocker(model, seqs) is None
        nograd, _ = sequence_logprobs(model, shared, seqs)
    withgrad, _ = sequence_logprobs(model, shared, seqs)
    assert_same([x.detach() for x in withgrad], nograd)


def test_cache_dropped_without_gradients_falls_back_to_padded(monkeypatch, caplog):
    """transformers 5.17 drops the KV cache of a checkpointed model in training mode even without
    gradients: the prompt pass comes back without one, that pass runs padded (same values, reason
    logged) and later passes of the model in that state go padded at once."""
    from urt.models import compat
    from urt.rl.visual_cache import hf_model

    b = bundle("qwen2_5_vl", gradient_checkpointing=True)
    model = b.model.train()
    seqs = mixed_rollout(b)[:6]
    with torch.no_grad():
        want, _ = sequence_logprobs(model, make_collator("padded", b), seqs)
    lm = hf_model(model).model.language_model
    forward = lm.forward
    monkeypatch.setattr(lm, "forward", lambda *a, **k: forward(*a, **{**k, "use_cache": False}))  # as 5.17 does
    monkeypatch.setattr(compat, "_WARNED", set())
    shared = SharedPromptLogprobs(b)
    with torch.no_grad(), caplog.at_level("WARNING"):
        got, _ = sequence_logprobs(model, shared, seqs)
        assert "returned no KV cache" in caplog.text
        assert shared.pass_blocker(model, seqs) == ("gradient checkpointing drops the KV cache in training mode "
                                                    "(this transformers version)")
        again, _ = sequence_logprobs(model, shared, seqs)
    assert_same(got, want)
    assert_same(again, want)
    model.eval()  # out of training mode the cache is kept: shared prompts again
    with torch.no_grad():
        assert shared.pass_blocker(model, seqs) is None


# ------------------------------------------------------------------------------------------ a GRPO run
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_grpo_prompts(tmp_path_factory.mktemp("shared_prompt_shards"))


class Losses(Callback):
    def __init__(self):
        self.losses, self.module = {}, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.module = pl_module
        self.losses[pl_module.rollout_step] = float(outputs["loss"])


@pytest.mark.parametrize("variant,steps", [  # trainer.max_steps counts optimizer steps: 2 rollout steps each
    (["stage.loss.beta=0.04", "stage.num_iterations=2", "stage.num_mini_batches=2", "stage.micro_batch_size=2"], 8),
    (["+model.lora={r: 4, alpha: 8, dropout: 0.0}", "stage.loss.beta=0.04", "stage.micro_batch_size=4"], 2),
    (["model=tiny_qwen3_5", "stage.loss.beta=0.04", "stage.num_iterations=2", "stage.micro_batch_size=4"], 4),
], ids=["reference_mu2_minibatches", "lora_reference", "qwen3_5"])
def test_grpo_run_with_shared_prompts_equals_padded(tmp_path, shards, monkeypatch, variant, steps):
    import urt.generation
    from urt.prompts import answer_string
    from urt.train import train

    def canned(bundle, prompts, cfg, **kw):  # distinct rewards in every group, different lengths
        return [[f"<think>a</think><answer>{answer_string(p.task, int(p.label))}</answer>", "<think>bb</think>",
                 "some plain words"][: cfg.num_return_sequences] for p in prompts]

    monkeypatch.setattr(urt.generation, "generate", canned)
    runs = {}
    for layout in ("padded", "shared_prompt"):
        rec = Losses()
        cfg = grpo_cfg(tmp_path / layout, shards, f"stage.collate={layout}", f"stage.run_name={layout}", *variant,
                       steps=steps)
        train(cfg, callbacks=[rec])
        want = SharedPromptLogprobs if layout == "shared_prompt" else PaddedCollator
        assert isinstance(rec.module.collate, want)
        runs[layout] = rec.losses
        assert (Path(cfg.stage.run_dir) / "rollouts" / "step-000002.parquet").is_file()
    l_pad, l_sh = runs["padded"], runs["shared_prompt"]
    print("GRPO losses padded", l_pad, "shared prompts", l_sh)
    assert l_pad.keys() == l_sh.keys() == {1, 2}
    for k in l_pad:  # step 2's loss is computed with the weights step 1's update left
        assert l_sh[k] == pytest.approx(l_pad[k], abs=1e-5)
