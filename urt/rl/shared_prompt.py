"""GRPO log-probs with each prompt computed once per group instead of once per completion.

A rollout step scores P prompts × G completions; every log-prob pass (policy with gradients, the old
policy when μ > 1, the reference) used to feed all P·G (prompt + completion) sequences through the
model, so every prompt went through it G times per pass. The prompt is most of each sequence (the
paper template with two images: ~500 tokens before a completion), and its hidden states do not depend
on the completion after it (causal attention). `SharedPromptLogprobs` runs, per micro-batch:

1. **prompt pass**: the micro-batch's distinct prompts, minus their last token, as one right-padded batch
   with the KV cache on (`use_cache=True`), their visuals included (or the step's `VisualCache`
   features). A hybrid model's (qwen3_5) prompts are left-padded instead: its linear-attention layers
   (gated DeltaNet) carry a state along the row instead of per-token keys and values, and a right-padded
   prompt's state would run on through the padding after it; with the padding first (zeroed by the model,
   so the state stays zero through it) every prompt's state is its own. Its cache is
   `urt.models.hybrid.hybrid_cache`: key/value layers for the full-attention layers, `LinearStateLayer`s
   (recurrent state + convolution window) for the linear-attention ones;
2. the cache's rows are selected per completion (`Cache.batch_select_indices`: row j holds its own
   prompt's keys and values, or its own prompt's linear-attention states — an indexing op, so in the
   policy pass the gradients of the G completions flow back and sum into the one prompt computation);
3. **completion pass**: per sequence, the prompt's last token followed by its completion tokens,
   right-padded to the longest, on top of the selected cache, with an attention mask over
   [prompt (padded) | this row (right-padded)] and explicit positions: for Qwen's mRoPE families
   the (temporal, height, width) rows that `urt.data.collate.RopeIndex` gives the full prompt +
   completion sequence, sliced to the completion part (text positions continue after the vision
   grid's); for LLaVA-OneVision plain positions continuing the prompt's. Logits are kept only at the
   positions that predict a completion token (`logits_to_keep` as a boolean mask), so the first
   completion token is predicted by the prompt's last token inside the completion pass and the prompt
   pass projects nothing onto the vocabulary.

The log-probs are those of the padded path up to float rounding (same tokens, same positions, same
attention; only the batching of the matmuls differs), gradients included (tests/test_shared_prompt.py).

**When it is used** (`stage.collate`, conf/stage/grpo.yaml): "shared_prompt", or "auto" when nothing
below blocks it. `shared_prompt_blocker(bundle)` (checked once, at module construction) refuses:

* flash-attention (`attn_implementation` flash_*): its unpadded path with a cache and a right-padded
  query against a key mask with holes is not verified here (no GPU with flash-attn in this project's
  tests); there `auto` packs instead (variable-length kernels: no padding and no dense mask);
* a family urt does not know.

Per pass (`pass_blocker`), the padded path runs instead (the reason logged once) when the model uses
gradient checkpointing and the pass needs gradients (transformers then drops the cache in every
checkpointed layer; transformers 5.17 drops it in training mode even without gradients: learnt from the
first such pass, `PromptCacheDropped`, which then runs padded too), or when a sequence is not laid out as
`urt.stages.grpo.completion_sequence` lays it out (labels exactly the tokens after `prompt_length`, a prompt
of >= 2 tokens ending in a text token).

**What it saves** (`benchmarks/grpo_vs_trl.py`, docs/performance.md §GRPO step vs TRL): the tokens through the model per
pass go from P·G·(prompt + completion) to P·prompt + P·G·completion; with the paper template's ~500-token
prompts, 64-token completions and G = 4 that is a third of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from urt.data.collate import PaddedCollator, RopeIndex, make_collator, model_inputs, packing_pays, pad_id
from urt.data.encode import IGNORE_INDEX, QWEN_FAMILIES, Encoded
from urt.errors import UrtError
from urt.models.compat import forward_takes, model_device, to_device, warn_once
from urt.models.hybrid import hybrid_cache, is_hybrid
from urt.rl.visual_cache import hf_model


# Families whose language model continues a cached prefix exactly with a multi-token forward.
SHARED_PROMPT_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava_onevision", "qwen3_5")
# The layouts of GRPO's log-prob batches (stage.collate).
LOGPROB_LAYOUTS = ("auto", "shared_prompt", "packed", "padded")


def _attn_implementation(model) -> str:
    return str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "")


def shared_prompt_blocker(bundle) -> str | None:
    """Why a model cannot compute GRPO log-probs with shared prompts (None: it can); see the module
    docstring."""
    if bundle.family not in SHARED_PROMPT_FAMILIES:
        return f"family {bundle.family!r} is not one of {', '.join(SHARED_PROMPT_FAMILIES)}"
    impl = _attn_implementation(bundle.model)
    if impl.startswith("flash"):
        return f"attn_implementation {impl!r}: the cached-prompt path is verified with sdpa and eager only"
    return None


def make_logprob_collator(kind: str, bundle):
    """The log-prob batching of a GRPO stage (`stage.collate`): "shared_prompt" -> `SharedPromptLogprobs`
    (or, when `shared_prompt_blocker` refuses the model, a warning and what "auto" picks then); "auto" ->
    shared prompts when the model allows them, else packed under flash-attention (its variable-length
    kernels make packing the fast layout there), else padded; "packed" / "padded" -> the data layer's
    collators (`urt.data.collate.make_collator`)."""
    if kind not in LOGPROB_LAYOUTS:
        raise UrtError(f"unknown GRPO log-prob layout (stage.collate) {kind!r}; use one of {', '.join(LOGPROB_LAYOUTS)}")
    if kind in ("auto", "shared_prompt"):
        reason = shared_prompt_blocker(bundle)
        if reason is None:
            return SharedPromptLogprobs(bundle)
        fallback = "packed" if packing_pays(bundle) and bundle.spec.packing_safe else "padded"
        if kind == "shared_prompt":
            warn_once(f"GRPO log-probs: shared prompts are not available for this {bundle.family} model ({reason}); "
                       f"using {fallback} batches")
        kind = fallback
    return make_collator(kind, bundle)


def _forward_takes(model, name: str) -> bool:
    """Whether the transformers model inside `model` (peft passes extra keywords through) takes `name`."""
    return forward_takes(hf_model(model), name)


def _gradient_checkpointing(model) -> bool:
    m = hf_model(model)
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the newer name first
        if hasattr(type(m), name):
            return bool(getattr(m, name))
    return False


class PromptCacheDropped(UrtError):
    """The prompt pass came back without a KV cache because gradient checkpointing is on (transformers 5.17
    drops the cache of a checkpointed model in training mode even without gradients): the caller runs
    this pass, and every later one of the model in that state, on padded batches."""


class SharedPromptLogprobs:
    """Computes GRPO log-probs with each distinct prompt of a micro-batch run once (see the module
    docstring). Used through `urt.stages.grpo.sequence_logprobs`, which calls `pass_blocker` and then
    `forward`, or the padded `fallback` collator with the reason logged."""

    def __init__(self, bundle):
        reason = shared_prompt_blocker(bundle)
        if reason is not None:
            raise UrtError(f"shared-prompt log-probs are not available for this {bundle.family} model: {reason}")
        self.family = bundle.family
        self.pad_token_id = pad_id(bundle)
        self.rope = RopeIndex(bundle.family, bundle.model.config) if bundle.family in QWEN_FAMILIES else None
        # a linear-attention state runs on through right padding: hybrid prompts are left-padded
        self.hybrid = is_hybrid(bundle.model)
        self.prompt_side = "left" if self.hybrid else "right"
        self.collate_prompts = PaddedCollator(self.pad_token_id, padding_side=self.prompt_side)
        self.fallback = PaddedCollator(self.pad_token_id, padding_side="right")
        self.checkpointing_drops_cache = False  # learnt when a no-grad pass of a checkpointed model got none

    def __call__(self, batch: list[Encoded]) -> dict:
        """A padded batch of `batch` (this object stands in for a collator where one is expected)."""
        return self.fallback(batch)

    # ------------------------------------------------------------------------------------ checks
    def pass_blocker(self, model, seqs: Sequence[Encoded]) -> str | None:
        """Why this pass cannot share prompts (None: it can): gradient checkpointing with gradients, or a
        sequence not laid out prompt + completion."""
        if model.training and _gradient_checkpointing(model):
            if torch.is_grad_enabled():
                return "gradient checkpointing drops the KV cache in passes with gradients"
            if self.checkpointing_drops_cache:
                return "gradient checkpointing drops the KV cache in training mode (this transformers version)"
        for s in seqs:
            n = s.prompt_length
            if n < 2 or n > len(s):
                return f"sequence {s.key!r} has prompt_length {n} of {len(s)} tokens"
            if bool((s.labels[:n] != IGNORE_INDEX).any()) or not torch.equal(s.labels[n:], s.input_ids[n:]):
                return f"sequence {s.key!r}: its labels are not exactly the tokens after its prompt"
            if s.mm_token_type_ids is not None and int(s.mm_token_type_ids[n - 1]) != 0:
                return f"sequence {s.key!r}: its prompt ends with a vision token"
        return None

    # ------------------------------------------------------------------------------------ the passes
    def _prompts(self, seqs: Sequence[Encoded]) -> tuple[list[Encoded], list[int]]:
        """The distinct prompts of `seqs` (minus their last token) and each sequence's prompt index. Two
        sequences share a prompt when they share the visual dict object (as `completion_sequence` makes
        a prompt's completions do) and the prompt token ids."""
        index: dict[tuple, int] = {}
        prompts: list[Encoded] = []
        rows: list[int] = []
        for s in seqs:
            n = s.prompt_length
            key = (id(s.visual), n, tuple(s.input_ids[:n].tolist()))
            if key not in index:
                index[key] = len(prompts)
                mm = s.mm_token_type_ids
                prompts.append(dataclasses.replace(
                    s, key=s.key.rsplit("#", 1)[0], input_ids=s.input_ids[:n - 1], labels=s.labels[:n - 1],
                    mm_token_type_ids=None if mm is None else mm[:n - 1], prompt_length=n - 1))
            rows.append(index[key])
        return prompts, rows

    def _positions(self, prompts: list[Encoded], rows: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids of the prompt pass ((3, P, Lp) mRoPE rows or (P, Lp)) and of the completion pass
        ((3, N, width) or (N, width)); right-padding columns continue the positions, left-padding ones
        repeat the first (they are masked out either way)."""
        lp = max(len(p) for p in prompts)
        left = self.prompt_side == "left"
        if self.rope is None:
            prompt_pos = torch.stack([(torch.arange(lp) - (lp - len(p) if left else 0)).clamp(min=0) for p in prompts])
            comp_pos = torch.stack([len(prompts[r]) + torch.arange(width) for r in rows])
            return prompt_pos, comp_pos
        full = []  # per prompt: the (3, Lp + width) positions of the prompt followed by `width` text tokens
        for p in prompts:
            ext = dataclasses.replace(
                p, input_ids=torch.cat([p.input_ids, torch.full((width + 1,), self.pad_token_id, dtype=torch.long)]),
                labels=torch.full((len(p) + width + 1,), IGNORE_INDEX, dtype=torch.long),
                mm_token_type_ids=torch.cat([p.mm_token_type_ids, torch.zeros(width + 1, dtype=torch.long)]))
            full.append(self.rope(ext))
        prompt_pos = torch.zeros(3, len(prompts), lp, dtype=torch.long)
        for i, (p, pos) in enumerate(zip(prompts, full)):
            n = len(p)
            if left:
                prompt_pos[:, i, lp - n:] = pos[:, :n]
                prompt_pos[:, i, :lp - n] = pos[:, :1]
            else:
                prompt_pos[:, i, :n] = pos[:, :n]
                prompt_pos[:, i, n:] = pos[:, n:n + 1] + torch.arange(lp - n)
        comp_pos = torch.stack([full[r][:, len(prompts[r]):len(prompts[r]) + width] for r in rows], dim=1)
        return prompt_pos, comp_pos

    def forward(self, model, seqs: Sequence[Encoded], *, visual_cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits at the positions that predict a completion token, (K, V), in sequence order then token
        order; the matching target ids (K,)). The caller checked `pass_blocker`."""
        prompts, rows = self._prompts(seqs)
        comps = [s.input_ids[s.prompt_length:] for s in seqs]
        width = 1 + max(len(c) for c in comps)  # the prompt's last token, then the completion
        prompt_pos, comp_pos = self._positions(prompts, rows, width)
        param = next(model.parameters())
        dtype, dev = getattr(model, "dtype", param.dtype), model_device(model)
        cache_arg = "cache" if _forward_takes(model, "cache") else "past_key_values"  # renamed in transformers 5.2x

        # 1. the prompt pass: each distinct prompt once, right-padded, KV cache on
        inputs = model_inputs(self.collate_prompts(prompts))
        inputs["position_ids"] = prompt_pos
        prompt_mask = inputs["attention_mask"]
        inputs = to_device(inputs, dev, dtype)
        if visual_cache is not None:
            inputs = visual_cache.inputs_for(model, prompts, inputs)
        mine = hybrid_cache(hf_model(model)) if self.hybrid else None
        if self.hybrid and mine is None:
            raise UrtError(f"the {self.family} model's cache layers are not the plain key/value and "
                           f"linear-attention layers urt.models.hybrid.hybrid_cache selects rows of")
        out = model(**inputs, use_cache=True, logits_to_keep=1, **({cache_arg: mine} if mine is not None else {}))
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if cache is not None and cache.get_seq_length() == 0:  # ours came back unfilled: dropped as well
            cache = None
        if cache is None:
            if model.training and _gradient_checkpointing(model):
                self.checkpointing_drops_cache = True
                raise PromptCacheDropped(f"the {self.family} model in training mode with gradient checkpointing "
                                         f"returned no KV cache from the prompt pass")
            raise UrtError(f"the {self.family} model returned no KV cache from the prompt pass")
        del out
        # 2. one cache row per sequence (its prompt's): an index, so gradients sum back into the prompt pass
        cache.batch_select_indices(torch.tensor(rows, device=dev))

        # 3. the completion pass: last prompt token + completion, right-padded, on the cached prompts
        n = len(seqs)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        own = torch.zeros(n, width, dtype=torch.long)
        keep = torch.zeros(n, width, dtype=torch.bool)
        for j, (s, c) in enumerate(zip(seqs, comps)):
            ids[j, 0] = s.input_ids[s.prompt_length - 1]
            ids[j, 1:1 + len(c)] = c
            own[j, :1 + len(c)] = 1
            keep[j, :len(c)] = True
        mask = torch.cat([prompt_mask[rows], own], dim=1)
        ids, mask, keep, comp_pos = ids.to(dev), mask.to(dev), keep.to(dev), comp_pos.to(dev)
        targets = torch.cat(comps).to(dev)
        kw: dict[str, Any] = {cache_arg: cache}
        if _forward_takes(model, "logits_to_keep"):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=comp_pos, use_cache=False,
                           logits_to_keep=keep, **kw).logits
            logits = logits.reshape(-1, logits.shape[-1])
        else:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=comp_pos, use_cache=False, **kw).logits[keep]
        return logits, targets
