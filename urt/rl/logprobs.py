"""Per-token log-probs of sampled completions under a policy (or the frozen reference): the passes every
GRPO step runs for the old, reference and trained log-probs.

Each (prompt + completion) is one `Encoded` whose labels are the completion ids (`completion_sequence`),
batched per `stage.collate` (`urt.rl.shared_prompt.make_logprob_collator`): shared prompts (each distinct
prompt of a micro-batch runs once with the KV cache on, its completions then run on that cache), packed
(padding-free, per-sequence mRoPE positions) or right-padded. Only the positions that predict a completion
token are projected onto the vocabulary (`logits_to_keep` as a boolean mask) before the fp32 log_softmax.

The completion ids are the ones that were sampled (`urt.generation.Completion.ids`). `text_completion_ids`
re-tokenises a completion that arrives as plain text (a rollout engine that returns no ids): there the
trained path is the canonical split of the text, which can differ from the sampled one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from urt.data.collate import model_inputs
from urt.data.encode import IGNORE_INDEX, Encoded, supervised_mask
from urt.models.compat import forward_takes, model_device, to_device, warn_once


def text_completion_ids(tokenizer, text: str, prefix: str, eos_id: int, max_new_tokens: int) -> list[int]:
    """Token ids of a completion given as text: the text minus the assistant `prefix` (which belongs to the
    prompt), re-tokenised with special tokens split (a literal "<|image_pad|>" in the text never becomes a
    vision placeholder), then EOS unless that fills `max_new_tokens` (a cut completion has no EOS)."""
    body = text[len(prefix):] if prefix and text.startswith(prefix) else text
    ids = list(tokenizer(body, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    if len(ids) >= max_new_tokens:
        return ids[:max_new_tokens]
    return ids + [int(eos_id)]


def completion_sequence(prompt: Encoded, ids: Sequence[int], index: int) -> Encoded:
    """prompt + completion as one `Encoded` whose labels are the completion tokens."""
    comp = torch.as_tensor(list(ids), dtype=torch.long)
    n = len(prompt)
    mm = prompt.mm_token_type_ids
    return Encoded(
        key=f"{prompt.key}#{index}", task=prompt.task, label=prompt.label,
        input_ids=torch.cat([prompt.input_ids, comp]),
        labels=torch.cat([torch.full((n,), IGNORE_INDEX, dtype=torch.long), comp]),
        visual=prompt.visual,
        mm_token_type_ids=None if mm is None else torch.cat([mm, torch.zeros(len(comp), dtype=torch.long)]),
        prompt_length=n, meta=prompt.meta)


def pad_rows(rows: Sequence[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    width = max(int(r.shape[0]) for r in rows)
    return torch.stack([F.pad(r, (0, width - int(r.shape[0])), value=value) for r in rows])


def sequence_logprobs(model, collate: Callable, seqs: list[Encoded], *, entropy: bool = False,
                      visual_cache=None, lockstep: bool = False
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-token log-probs (fp32) of each sequence's completion tokens (one 1-D tensor per sequence, in
    order) and, when asked, the per-token entropies (detached). `collate` is a packed or padded collator,
    or a `urt.rl.shared_prompt.SharedPromptLogprobs` (each prompt run once per micro-batch; the padded
    path, with the reason logged, when it cannot serve this pass).
    `visual_cache` (a `urt.rl.visual_cache.VisualCache` of this step's prompts): the model is fed the
    cached visual features instead of running its vision tower on every sequence's pixels (the normal path,
    with the reason logged, when the cache cannot feed this model). `lockstep` (a sharded model, whose
    forwards are collectives): every rank calls this together and they agree on the layout, so each runs
    the same number of forwards."""
    from urt.rl.shared_prompt import PromptCacheDropped, SharedPromptLogprobs

    if isinstance(collate, SharedPromptLogprobs):
        reason = collate.pass_blocker(model, seqs)
        if lockstep:
            from urt.rl.distributed import any_rank

            if reason is None and torch.is_grad_enabled():
                # FSDP2 re-gathers a layer for backward from hooks on the tensors its forward returns; the
                # prompt pass's KV cache reaches the completion pass around them (held in the cache object)
                reason = "a sharded policy's passes with gradients run padded (FSDP2 cannot follow the KV cache)"
            if any_rank(reason is not None, model_device(model)) and reason is None:
                reason = "another rank's pass cannot share prompts (sharded ranks run the same passes)"
        if reason is None:
            try:
                logits, targets = collate.forward(model, seqs, visual_cache=visual_cache)
                return token_logprobs(logits, targets, seqs, entropy)
            except PromptCacheDropped as e:
                reason = str(e)
        warn_once(f"GRPO log-probs: a pass runs on padded batches instead of shared prompts: {reason}")
        collate = collate.fallback
    batch = collate(seqs)
    labels = batch["labels"]
    inputs = model_inputs(batch)
    param = next(model.parameters())
    device = model_device(model)
    inputs = to_device(inputs, device, getattr(model, "dtype", param.dtype))
    if visual_cache is not None:
        inputs = visual_cache.inputs_for(model, seqs, inputs)
    labels = labels.to(device)
    keep = supervised_mask(labels)  # positions whose next token is a completion token
    targets = labels[:, 1:][keep[:, :-1]]
    if forward_takes(model, "logits_to_keep"):
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        logits = logits.reshape(-1, logits.shape[-1])
    else:
        logits = model(**inputs, use_cache=False).logits[keep]
    return token_logprobs(logits, targets, seqs, entropy)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, seqs: list[Encoded], entropy: bool
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """fp32 log-probs of `targets` under `logits` (one row per completion token, sequence by sequence),
    split per sequence, and the detached entropies when asked."""
    logsm = logits.float().log_softmax(-1)
    logp = logsm.gather(-1, targets[:, None]).squeeze(-1)
    lens = [int((s.labels != IGNORE_INDEX).sum()) for s in seqs]
    ent = None
    if entropy:
        with torch.no_grad():
            e = -(logsm.detach().exp() * logsm.detach()).sum(-1)
        ent = list(e.split(lens))
    return list(logp.split(lens)), ent
