"""Stage 3: GRPO on the wrongly judged samples (docs/method.md, GRPO).

One training step (`GRPOModule.training_step`), readable top to bottom:

    P prompts ─ generate G completions each (temperature, top_p, seed = f(seed, step): resume-safe)
      → rewards (`cfg.reward`: urt.rewards.build_rewards; each sees the completion, the label's answer
        string and the sample: task, label, key, meta)
      → group advantages over each group's valid completions (urt.rl.advantages)
      → sequences = prompt ids + the sampled completion ids (the loss mask ends at the first stop token)
      → old log-probs (only when μ > 1), reference log-probs (no_grad; none at all when the loss has no KL)
      → μ × num_mini_batches optimizer steps of the loss component (`stage.loss`: urt.rl.objective),
        micro-batches accumulated exactly, gradient clipping, scheduler step
      → metrics, and the step's rollouts left for the rollout log (urt.rl.rollout_log.RolloutLog)

The pieces live below: log-prob passes in urt.rl.logprobs (shared prompts, packed or padded per
`stage.collate`; a frozen vision tower's features cached per step, urt.rl.visual_cache), the collectives
in urt.rl.distributed, the maths in urt.rl.objective.

**Bad input.** A non-finite reward (any weighted reward or their sum) or a non-finite micro-batch loss
(checked before its backward, so no optimizer step applies it) stops the run: the Lightning state is saved
as `checkpoints/failed-step-NNNNNN.ckpt` and a UrtError names the step and the reward and sample key (or
the micro-batch's samples). A reward function that raises is a UrtError naming the reward and the sample
key (the original chained as `__cause__`). A group left with fewer than G valid completions (generate
returned fewer, or one has no tokens) gets its advantages over the valid ones only, or is skipped when
fewer than 2 remain; counted in `train/short_groups` (and `train/skipped_groups`).

**Completion tokens.** The trained ids are the sampled ones (`urt.generation.Completion.ids`, the stop token
included when one was sampled); a completion that arrives as plain text is re-tokenised
(urt.rl.logprobs.text_completion_ids).

**Reference model.** No KL term (loss beta 0): none is built or run. Else a frozen deep copy of the starting
weights, kept out of the LightningModule's state_dict (never checkpointed, moved to the device at fit
start); with LoRA the base model with adapters disabled (peft `disable_adapter()`), no copy.

**Sharded (trainer=fsdp).** The policy and the reference are sharded the same way (urt.models.fsdp: one
unit per decoder layer, the frozen vision tower replicated). Every forward of a sharded model all-gathers
each layer from every rank, so the ranks run their passes in lockstep: generation makes the same number of
generate calls on every rank and keeps their decode steps in step (GenerationConfig.lockstep), and each
log-prob or update loop runs the most micro-batches any rank has, a rank short of them running a padding
pass (a sequence of its own with weight 0: its gradient adds nothing, its reduce-scatter keeps the step).
Gradients are reduce-scattered at every micro-batch's backward (nothing to sync at the end); the loss
weights are the global counts' as under DDP, so the objective is the same.

**Exact resume.** The rollout counter is checkpointed; the generation seed is derived from
(seed, rollout step, rank), the data position comes from the data module's state, so a run stopped at step
k and resumed repeats the uninterrupted run's steps (deterministic CPU).
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from urt.data.encode import IGNORE_INDEX, Encoded
from urt.errors import UrtError
from urt.rewards import RewardSet, build_rewards, solution_for
from urt.rl import distributed as dist
from urt.rl.advantages import global_batch_advantages, grouped_advantages
from urt.rl.logprobs import completion_sequence, pad_rows, sequence_logprobs, text_completion_ids
from urt.rl.objective import PolicyLoss, completion_mask
from urt.rl.rollout_log import ROLLOUT_DIR, RolloutLog, RolloutRecord, parsed_answers
from urt.stages.base import StageModule, StageParts, instantiate_module, make_trainer, optimizer_partials, start
from urt.stages.callbacks import stage_callbacks

log = logging.getLogger(__name__)


class PromptBatch:
    """Data-module collator for GRPO: keeps the prompt-mode `Encoded` samples as they are (generate and
    the log-prob collators need them), plus their keys."""

    def __call__(self, items: list[Encoded]) -> dict:
        return {"prompts": list(items), "keys": [e.key for e in items]}


def generation_seed(seed: int, step: int, rank: int = 0) -> int:
    """Sampling seed of rollout step `step` on data-parallel rank `rank`: a function of these only, so
    resuming is exact (and ranks never share a sampling stream)."""
    return zlib.crc32(f"urt-grpo:{int(seed)}:{int(step)}:{int(rank)}".encode()) & 0x7FFFFFFF


def solution_string(prompt: Encoded) -> str | None:
    """The answer string a prompt's completions are rewarded against (None: a tie under CoT prompts)."""
    return solution_for(prompt.task, prompt.label, (prompt.meta or {}).get("template_set"))


ROLLOUT_WEIGHTS = ("auto", "gather", "copy", "shard")


class GRPOModule(StageModule):
    """GRPO of a `ModelBundle` (see the module docstring). Settings: conf/stage/grpo.yaml, whose keys are
    this constructor's arguments; the loss is a component (conf/stage/loss/), the rewards come from
    `cfg.reward`."""

    def __init__(self, bundle, optimizer=None, scheduler=None, *, loss: PolicyLoss | None = None,
                 num_generations: int = 8, max_new_tokens: int = 2048, temperature: float = 1.0,
                 top_p: float = 1.0, generation_batch_size: int = 8, advantage: str = "paper",
                 num_iterations: int = 1, num_mini_batches: int = 1, micro_batch_size: int = 8,
                 max_grad_norm: float | None = 1.0, filter_zero_variance: bool = False, collate: str = "auto",
                 visual_cache: bool = True, total_steps: int | None = None, rewards: RewardSet | None = None,
                 seed: int = 0, rollout_weights: str = "auto"):
        super().__init__(bundle, optimizer, scheduler, total_steps=total_steps)
        self.automatic_optimization = False
        self.loss_fn = loss if loss is not None else PolicyLoss()
        self.G = int(num_generations)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.generation_batch_size = int(generation_batch_size)
        self.advantage = advantage
        self.num_iterations, self.num_mini_batches = int(num_iterations), int(num_mini_batches)
        self.micro_batch_size = int(micro_batch_size)
        self.max_grad_norm = max_grad_norm
        self.filter_zero_variance = bool(filter_zero_variance)
        self.rewards = rewards if rewards is not None else build_rewards()
        self.seed = int(seed)
        self.visual_cache = bool(visual_cache)  # encode visuals once per step (frozen vision tower only)
        # sharded policy only: "gather" generates from the shards (one layer's bf16 weights gathered at a time,
        # the ranks in lockstep); "copy" keeps an unsharded bf16 copy per rank, refreshed from the shards before
        # each rollout step (2 bytes per parameter per rank; no collective while decoding); "shard" a bf16 copy
        # sharded like the policy on the GPU, refreshed shard by shard (2 bytes per parameter / world; decoding
        # gathers a layer at a time like "gather", without copying an offloaded policy's host shards to the GPU
        # for every token); "auto": shard when the policy is offloaded (trainer.strategy.cpu_offload), else gather
        if rollout_weights not in ROLLOUT_WEIGHTS:
            raise UrtError(f"stage.rollout_weights must be one of {', '.join(ROLLOUT_WEIGHTS)}, got {rollout_weights!r}")
        self.rollout_weights = rollout_weights
        self.__dict__["generation_model"] = None
        self.skipped_ties = 0  # tie prompts left out (CoT prompts have no tie answer)
        if self.G < 2:
            raise UrtError(f"num_generations must be >= 2 (a group of 1 has no advantage), got {self.G}")
        if self.num_iterations < 1 or self.num_mini_batches < 1 or self.micro_batch_size < 1:
            raise UrtError("num_iterations, num_mini_batches and micro_batch_size must be >= 1")
        from urt.generation import stop_token_ids, vision_token_ids
        from urt.rl.shared_prompt import make_logprob_collator

        self.collate = make_logprob_collator(collate, bundle)  # log-prob batches (stage.collate)
        self.stop_ids = stop_token_ids(bundle)
        self.vision_ids = set(vision_token_ids(bundle))
        # The reference policy: kept out of the module's state_dict (never checkpointed); made in
        # configure_model, once the strategy is known (sharded: a skeleton filled from the policy's shards).
        from urt.models.loading import is_peft_model

        self.wants_reference = self.loss_fn.uses_reference and not is_peft_model(self.model)
        self.__dict__["ref_model"] = None
        self.rollout_step = 0  # rollout batches done (checkpointed; seeds generation)
        self.rollout_record: RolloutRecord | None = None  # this step's rollouts, for RolloutLog

    # -------------------------------------------------------------------------------------- step
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        prompts = self._rewardable(batch["prompts"])
        G, step = self.G, self.rollout_step + 1
        self._step_in_progress = step
        t0 = time.perf_counter()

        # 1. rollouts: G completion slots per prompt, laid out group by group (slot i is in group i // G);
        #    a slot is valid when generation returned a completion for it with at least one token
        texts, ids, truncated = self._rollouts(prompts, step, pad=batch["prompts"][0])
        valid = torch.tensor([t is not None for t in texts], dtype=torch.bool)
        t1 = time.perf_counter()

        # 2. rewards (non-finite ones stop the run) and group advantages over each group's valid completions
        scores = self._score(prompts, texts, valid, step)
        rewards = torch.tensor(scores["reward"], dtype=torch.float32)
        advantages, zero_var, usable = grouped_advantages(rewards, valid, G, self.advantage)
        if self.advantage == "batch" and dist.distributed():  # the std of the global batch, not of this rank's
            advantages = global_batch_advantages(rewards, valid, usable, G)
        group_keep = usable & ~zero_var if self.filter_zero_variance else usable
        keep = valid & group_keep.repeat_interleave(G)
        t2 = time.perf_counter()

        # 3. old (μ > 1) and reference log-probs, then μ × num_mini_batches optimizer steps. Every rank takes
        #    the same optimizer steps: the mini-batch count comes from the rank with the most kept
        #    sequences (one process: min(num_mini_batches, kept)); a rank may hold none of a mini-batch.
        seqs = [completion_sequence(prompts[i // G], ids[i], i % G) if valid[i] else None for i in range(len(texts))]
        idx = keep.nonzero().flatten().tolist()
        # sharded: what a rank short of micro-batches runs to keep the collectives in step (weight 0)
        self._pad_seq = next((x for x in seqs if x is not None), None) or \
            completion_sequence(batch["prompts"][0], self.stop_ids[:1], 0)
        losses, stats = [], {"kl": [], "clip_fraction": [], "entropy": []}
        n_minis = min(self.num_mini_batches, dist.max_over_ranks(len(idx), self.device))
        if n_minis:
            # a frozen vision tower's features are constants of the step: encode each prompt's visuals once
            # for the policy, old and reference passes and every μ iteration (urt.rl.visual_cache)
            cache = None
            if self.visual_cache and idx:
                from urt.rl.visual_cache import VisualCache

                cache = VisualCache.for_step(self.model, self.bundle.family, [seqs[i] for i in idx])
            old = self._frozen_logprobs(self.model, seqs, idx, cache) if self.num_iterations > 1 else None
            ref = self._reference_logprobs(seqs, idx, cache) if self.loss_fn.uses_reference else None
            minis = [idx[k::n_minis] for k in range(n_minis)]
            for it in range(self.num_iterations):
                for m in minis:
                    losses.append(self._update(seqs, m, advantages, old, ref, stats, first=it == 0,
                                               visual_cache=cache))
        t3 = time.perf_counter()
        self.rollout_step = step

        # 4. metrics, and the rollouts for the rollout log
        answers, winners = parsed_answers(texts, [prompts[i // G].task for i in range(len(texts))])
        correct = torch.tensor([w is not None and w == str(prompts[i // G].label) for i, w in enumerate(winners)])
        loss = torch.tensor(sum(losses) / len(losses) if losses else float("nan"))
        metrics = self._metrics(prompts, ids, rewards, correct, valid, zero_var, usable, stats, (t0, t1, t2, t3))
        metrics.update({f"train/{k}": sum(x for x, v in zip(vals, valid) if v) / max(1, int(valid.sum()))
                        for k, vals in scores.items() if k.startswith("rewards/")})
        if self.skipped_ties:
            metrics["train/skipped_tie_prompts"] = float(self.skipped_ties)
        if losses:  # (every group filtered out: no update, no loss)
            metrics["train/loss"] = loss
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(prompts))
        self.rollout_record = RolloutRecord(step, prompts, texts, ids, truncated, scores, advantages, keep, valid,
                                            answers, winners)
        return {"loss": loss}

    def _rewardable(self, prompts: list[Encoded]) -> list[Encoded]:
        """The prompts whose completions can be rewarded: a tie has an answer only under the implicit
        prompts; under CoT prompts it is left out, counted and logged."""
        ties = [p for p in prompts if solution_string(p) is None]
        if ties:
            self.skipped_ties += len(ties)
            log.warning("GRPO: %d tie prompt(s) have no CoT answer to reward and are left out (%d so far; first: %r)",
                        len(ties), self.skipped_ties, ties[0].key)
        return [p for p in prompts if solution_string(p) is not None]

    def _rollouts(self, prompts: list[Encoded], step: int, pad: Encoded | None = None
                  ) -> tuple[list, list[list[int]], list[bool]]:
        """(text, sampled ids, truncated) per slot; an empty slot has text None and no ids. `pad`: the
        prompt a sharded rank generates for (dropped) while another rank still has prompts."""
        from urt.generation import GenerationConfig, generate

        G = self.G
        bundle, lockstep = self.bundle, self.lockstep
        if lockstep and self.generation_model is not None:  # rollout_weights=copy | shard: refreshed first
            import dataclasses

            from urt.models.fsdp import is_sharded, refresh_generation_copy, refresh_sharded_copy

            if is_sharded(self.generation_model):  # shard: each rank its own shard; decoding stays in lockstep
                refresh_sharded_copy(self.generation_model, self.model)
            else:  # copy: gathered once here, then no collective while decoding
                refresh_generation_copy(self.generation_model, self.model)
                lockstep = False
            bundle = dataclasses.replace(self.bundle, model=self.generation_model)
        gen = GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                               num_return_sequences=G, batch_size=self.generation_batch_size,
                               seed=generation_seed(self.seed, step, self.global_rank), lockstep=lockstep)
        groups = list(generate(bundle, prompts, gen, **({"pad_prompt": pad} if lockstep else {})))
        if len(groups) != len(prompts):
            raise UrtError(f"GRPO step {step}: generate returned {len(groups)} groups for {len(prompts)} prompts")
        texts, ids, truncated = [], [], []
        for p, group in zip(prompts, groups):
            group = list(group)
            if len(group) > G:
                raise UrtError(f"GRPO step {step}: generate returned {len(group)} completions for prompt "
                               f"{p.key!r}, more than num_generations={G}")
            for t in group + [None] * (G - len(group)):
                c, cut = self._completion_ids(p, t, step, len(texts) % G)
                texts.append(t if c else None)
                ids.append(c)
                truncated.append(cut)
        return texts, ids, truncated

    def _completion_ids(self, prompt: Encoded, text, step: int, sample: int) -> tuple[list[int], bool]:
        """(trained ids, truncated) of one completion: the sampled ids when generation returned them, else the
        text re-tokenised ([] for a slot without a usable completion)."""
        if not isinstance(text, str):
            return [], False
        ids = list(getattr(text, "ids", ()) or ())
        if ids:
            return ids, getattr(text, "finish_reason", "stop") == "length"
        try:
            ids = text_completion_ids(self.bundle.tokenizer, text, prompt.meta.get("assistant_prefix") or "",
                                      self.stop_ids[0], self.max_new_tokens)
        except Exception as e:  # noqa: BLE001 - one bad completion must not stop the run
            log.warning("GRPO step %d: completion %s#%d cannot be encoded (%s); left out of its group",
                        step, prompt.key, sample, e)
            return [], False
        return ids, bool(ids) and ids[-1] not in self.stop_ids

    def _score(self, prompts, texts, valid, step) -> dict[str, list[float]]:
        """The rewards of the valid completions, spread back over every slot (0 where invalid). A reward
        function that raises, or a non-finite reward, is a UrtError naming the reward and sample."""
        G = self.G
        at = valid.nonzero().flatten().tolist()
        comps = [texts[i] for i in at]
        sols = [solution_string(prompts[i // G]) for i in at]
        own = [self._reward_context(prompts[i // G], i % G) for i in at]
        key = lambda i: f"{prompts[i // G].key}#{i % G}"  # noqa: E731 - the sample key (as in the sequences)
        try:
            got = self.rewards(comps, sols, own)
        except UrtError:
            raise
        except Exception as e:
            # find the reward and the sample that raise (the rewards are cheap, pure functions)
            for name, fn in self.rewards.functions.items():
                for i, c, s, o in zip(at, comps, sols, own):
                    try:
                        fn(c, s, **o)
                    except Exception as inner:
                        raise UrtError(f"GRPO step {step}: reward {name!r} raised on sample {key(i)!r}: "
                                       f"{type(inner).__name__}: {inner}") from inner
            raise UrtError(f"GRPO step {step}: scoring the completions failed: {type(e).__name__}: {e}") from e
        bad = next(((name, i) for name, vals in got.items() if name.startswith("rewards/")
                    for i, v in zip(at, vals) if not math.isfinite(v)), None)
        if bad is None:
            bad = next((("reward", i) for i, v in zip(at, got["reward"]) if not math.isfinite(v)), None)
        if dist.any_rank(bad is not None, self.device):
            if bad is None:
                self._fail(step, "a non-finite reward on another rank")
            name, i = bad
            which = f"reward {name.split('/', 1)[-1]!r}" if name != "reward" else "the weighted reward"
            self._fail(step, f"{which} is non-finite on sample {key(i)!r}")
        out: dict[str, list[float]] = {}
        for name, vals in got.items():
            full = [0.0] * len(texts)
            for i, v in zip(at, vals):
                full[i] = float(v)
            out[name] = full
        return out

    @staticmethod
    def _reward_context(prompt: Encoded, sample: int) -> dict:
        """What a reward sees of the sample beside the completion (a user's reward can check a chain
        against metadata it holds): task, label (as presented), the rollout's key and the sample's meta."""
        return {"task": prompt.task, "label": prompt.label, "key": f"{prompt.key}#{sample}",
                "meta": dict((prompt.meta or {}).get("sample_meta") or {})}

    def _update(self, seqs, idx, advantages, old, ref, stats, first: bool, visual_cache=None) -> float:
        """One optimizer step over the sequences `idx` (micro-batches accumulated exactly); returns its loss.

        Data parallel: every rank runs this once per optimizer step, `idx` being its share of the step's
        sequences (possibly none). The loss weights divide by the sequence / completion-token counts summed
        over all ranks, the micro-batches accumulate without any gradient communication, and one all-reduce
        of the gradients (`urt.rl.distributed.sync_gradients`) then gives every rank the gradient of the
        global objective — exactly, whatever the ranks' shares, micro-batch counts or filtered groups."""
        opt = self.optimizers()
        world = dist.world_size()
        # DDP: keep the gradients where DDP's reducer put them (its buckets) and accumulate into them
        opt.zero_grad(set_to_none=world == 1)
        # this step's global counts: sequences, and completion tokens (each loss mask, up to the first stop)
        tokens = {i: float(self._mask(seqs[i].labels[seqs[i].prompt_length:][None]).sum()) for i in idx}
        counts = dist.all_reduce(torch.tensor([float(len(idx)), sum(tokens.values())], dtype=torch.float64,
                                              device=self.device))
        n_seq, n_tok = (float(c) for c in counts.cpu())
        total, bad = 0.0, None
        elsewhere = False  # sharded: another rank's micro-batch loss is non-finite (every rank stops there)
        with dist.no_grad_sync(self._trainer):
            for mb in self._micro_batches(idx):
                if not mb:  # padding pass (sharded): a zero loss whose backward reduce-scatters with the others
                    logp, _ = sequence_logprobs(self.model, self.collate, [self._pad_seq],
                                                visual_cache=visual_cache, lockstep=True)
                    if dist.any_rank(False, self.device):  # a non-finite loss elsewhere: no backward anywhere
                        elsewhere = True
                        break
                    self.manual_backward(torch.cat(logp).sum() * 0.0)
                    continue
                logp, ent = sequence_logprobs(self.model, self.collate, [seqs[i] for i in mb], entropy=first,
                                              visual_cache=visual_cache, lockstep=self.lockstep)
                logp = pad_rows(logp)
                comp = pad_rows([seqs[i].labels[seqs[i].prompt_length:] for i in mb], value=IGNORE_INDEX)
                mask = self._mask(comp).to(logp.device) * (comp != IGNORE_INDEX).to(logp.device)
                loss, m = self.loss_fn(
                    logp, advantages[mb].to(logp.device), mask,
                    old_logp=None if old is None else pad_rows([old[i] for i in mb]).to(logp.device),
                    ref_logp=None if ref is None else pad_rows([ref[i] for i in mb]).to(logp.device),
                    max_completion_length=self.max_new_tokens)
                finite = bool(torch.isfinite(loss.detach()).all())  # checked before its backward
                if self.lockstep and dist.any_rank(not finite, self.device):
                    bad, elsewhere = ((float(loss.detach()), mb) if not finite else None), finite
                    break
                if not finite:
                    bad = (float(loss.detach()), mb)
                    break
                # exact accumulation: token-level losses weigh by tokens, the others by sequences (global
                # counts; x world: DDP's sync averages over the ranks, the objective sums their shares)
                w = sum(tokens[i] for i in mb) / max(1.0, n_tok) if self.loss_fn.token_weighted \
                    else len(mb) / max(1.0, n_seq)
                self.manual_backward(loss * (w * world))
                total += float(loss.detach()) * w
                if first:
                    stats["clip_fraction"].append(m["clip_fraction"].float().cpu())
                    if "kl" in m:
                        stats["kl"].append(m["kl"].float().cpu())
                    stats["entropy"].append(torch.cat([e for e in ent]).mean().cpu())
        # sharded: the gradients were reduce-scattered at each backward, only the loss and the flag move
        total, any_bad = dist.sync_gradients(self, total, bad is not None or elsewhere, reduce=not self.lockstep)
        if any_bad:  # every rank stops here, before any optimizer step applies the bad micro-batch
            step = getattr(self, "_step_in_progress", self.rollout_step + 1)
            if bad is None:
                self._fail(step, "the loss is non-finite on a micro-batch of another rank")
            keys = ", ".join(repr(seqs[i].key) for i in bad[1])
            self._fail(step, f"the loss is non-finite ({bad[0]}) on the micro-batch of samples {keys}")
        if self.max_grad_norm:
            self.clip_gradients(opt, gradient_clip_val=float(self.max_grad_norm), gradient_clip_algorithm="norm")
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        return total

    def _mask(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """The loss mask of completion ids: up to and including the first stop token."""
        return completion_mask(completion_ids, self.stop_ids)

    def _micro_batches(self, idx: list[int]) -> list[list[int]]:
        """`idx` in micro-batches; sharded, padded with empty ones up to the most any rank has (each then a
        padding pass, see the module docstring)."""
        mbs = [idx[s:s + self.micro_batch_size] for s in range(0, len(idx), self.micro_batch_size)]
        if self.lockstep:
            mbs += [[] for _ in range(dist.max_over_ranks(len(mbs), self.device) - len(mbs))]
        return mbs

    @torch.no_grad()
    def _frozen_logprobs(self, model, seqs, idx, visual_cache=None) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for mb in self._micro_batches(idx):
            if not mb:  # padding pass (sharded): the forward's collectives only
                sequence_logprobs(model, self.collate, [self._pad_seq], visual_cache=visual_cache, lockstep=True)
                continue
            lp, _ = sequence_logprobs(model, self.collate, [seqs[i] for i in mb], visual_cache=visual_cache,
                                      lockstep=self.lockstep)
            out.update({i: x.detach() for i, x in zip(mb, lp)})
        return out

    def _reference_logprobs(self, seqs, idx, visual_cache=None) -> dict[int, torch.Tensor]:
        if self.ref_model is not None:
            return self._frozen_logprobs(self.ref_model, seqs, idx, visual_cache)
        if self.wants_reference:
            raise UrtError("GRPO: the reference model is built by configure_model (Trainer.fit calls it); call "
                           "module.configure_model() first when running training steps outside a Trainer")
        with self.model.disable_adapter():  # LoRA: the base model is the reference
            return self._frozen_logprobs(self.model, seqs, idx, visual_cache)

    def _metrics(self, prompts, ids, rewards, correct, valid, zero_var, usable, stats, times) -> dict[str, float]:
        """Step metrics. `all_wrong` / `all_correct`: groups none / all of whose valid completions name the
        label's winner (the parsed verdict, whatever the reward weights)."""
        t0, t1, t2, t3 = times
        G = self.G
        vg, cg, rg = valid.view(-1, G), correct.view(-1, G), rewards.view(-1, G)
        n_valid = vg.sum(dim=1)
        lengths = torch.tensor([float(len(x)) for x, v in zip(ids, valid) if v])
        tokens = float(lengths.sum()) + sum(int(n) * len(p) for n, p in zip(n_valid, prompts))
        seen = [g for g in range(vg.shape[0]) if n_valid[g] > 0]  # groups without any valid completion left out
        stds = [float(rg[g][vg[g]].std()) for g in seen if n_valid[g] > 1]
        nv = max(1, int(valid.sum()))
        return {
            "train/completion_length": float(lengths.mean()) if len(lengths) else 0.0,
            "train/reward": float(rewards[valid].sum()) / nv,
            "train/reward_std": sum(stds) / len(stds) if stds else 0.0,
            "train/all_wrong": sum(float(not cg[g][vg[g]].any()) for g in seen) / max(1, len(seen)),
            "train/all_correct": sum(float(cg[g][vg[g]].all()) for g in seen) / max(1, len(seen)),
            "train/zero_variance_groups": float((zero_var & usable).sum()),
            "train/filtered_groups": float((zero_var & usable).sum()) if self.filter_zero_variance else 0.0,
            "train/short_groups": float((n_valid < G).sum()),
            "train/skipped_groups": float((~usable).sum()),
            "train/tokens_per_s": tokens / max(1e-9, t3 - t0),
            "train/lr": float(self.optimizers().param_groups[0]["lr"]),
            "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2,
            **{f"train/{k}": float(torch.stack(v).mean()) for k, v in stats.items() if v},
        }

    def _fail(self, step: int, what: str):
        """Save the Lightning state under the run's checkpoints folder, then raise a UrtError."""
        tr = self._trainer
        where = "no checkpoint saved (no trainer)"
        if tr is not None:
            cb = tr.checkpoint_callback
            folder = Path(cb.dirpath) if cb is not None and getattr(cb, "dirpath", None) else \
                Path(tr.default_root_dir) / "checkpoints"
            path = folder / f"failed-step-{step:06d}.ckpt"
            try:
                tr.save_checkpoint(str(path))
                where = f"Lightning state saved to {path}"
            except Exception as e:  # noqa: BLE001 - report the original problem, not the save failure
                where = f"saving a checkpoint to {path} failed too ({type(e).__name__}: {e})"
        raise UrtError(f"GRPO step {step}: {what}; run stopped, {where}")

    # -------------------------------------------------------------------------------------- plumbing
    @property
    def lockstep(self) -> bool:
        """Whether the policy is sharded (trainer=fsdp): its forwards are collectives (module docstring)."""
        from urt.models.fsdp import is_sharded

        return is_sharded(self.model)

    def sharded_models(self) -> list:
        return [self.model] + ([self.ref_model] if self.ref_model is not None else []) + \
            ([self.generation_model] if self.rollout_mode == "shard" else [])

    @property
    def rollout_mode(self) -> str:
        """stage.rollout_weights with "auto" resolved against the strategy (gather without a sharded one)."""
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        from urt.stages.sharded import ShardedStrategy

        if not isinstance(strategy, ShardedStrategy):
            return "gather"
        if self.rollout_weights == "auto":
            return "shard" if strategy.cpu_offload else "gather"
        return self.rollout_weights

    def configure_model(self) -> None:
        """The frozen models beside the policy, made before the strategy shards it (Lightning calls this on
        every strategy): the reference (unsharded: a deep copy; sharded: a skeleton the strategy fills from
        the policy's shards) and, sharded with rollout_weights=copy | shard, the generation copy."""
        from urt.models.fsdp import freeze_copy, frozen_skeleton, generation_copy, is_sharded
        from urt.stages.sharded import is_sharded_strategy

        if is_sharded(self.model):  # configured already (a second fit on the same module)
            return super().configure_model()
        sharded = is_sharded_strategy(self._trainer)
        if self.wants_reference and self.ref_model is None:
            self.__dict__["ref_model"] = frozen_skeleton(self.model) if sharded else freeze_copy(self.model)
        mode = self.rollout_mode
        if mode in ("copy", "shard") and self.generation_model is None:
            strategy = self._trainer.strategy
            gen = generation_copy(self.model, strategy.param_dtype).to(strategy.root_device) if mode == "copy" \
                else frozen_skeleton(self.model)  # shard: sharded below with the policy (sharded_models)
            self.__dict__["generation_model"] = gen
            log.info("GRPO rollouts from a %s bf16 copy of the policy (stage.rollout_weights=%s)",
                     "sharded" if mode == "shard" else "full", self.rollout_weights)
        super().configure_model()

    def setup(self, stage: str) -> None:
        """GRPO runs on one device, with DDP or sharded (urt.stages.sharded); FSDP1 is refused before
        anything is built."""
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        from urt.stages.sharded import ShardedStrategy

        strategy = self.trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, ShardedStrategy)):
            raise UrtError(f"GRPO runs on one device, with DDP (trainer=ddp, trainer=ddp_cpu) or sharded "
                           f"(trainer=fsdp, FSDP2), not with {type(strategy).__name__}")
        if isinstance(strategy, ShardedStrategy) and any(p.requires_grad for p in self.model.parameters()
                                                         if id(p) in self._vision_param_ids()):
            raise UrtError("GRPO under trainer=fsdp needs model.freeze_vision=true (the paper's setting): a "
                           "trained, hence sharded, vision tower would make every visual pass a collective, "
                           "and the ranks' image/video passes differ")
        if isinstance(strategy, DDPStrategy) and getattr(strategy, "_ddp_kwargs", {}).get("static_graph"):
            raise UrtError("GRPO needs DDP with static_graph=False: it sums the gradients itself once per "
                           "optimizer step (trainer.strategy.static_graph)")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # Encoded prompts stay on the host; generate / the collators move what they use

    def _vision_param_ids(self) -> set[int]:
        from urt.models.sharding import layer_classes

        classes = tuple(layer_classes(self.bundle.family, ("vision",)))
        return {id(p) for m in self.model.modules() if isinstance(m, classes) for p in m.parameters()}

    def on_fit_start(self) -> None:
        if self.ref_model is not None and not self.lockstep:  # sharded: the strategy placed it
            self.ref_model.to(self.device)

    def steps_per_epoch(self, batches_per_rank: int) -> int:
        return batches_per_rank * self.num_iterations * self.num_mini_batches

    def checkpoint_state(self) -> dict:
        return {"rollout_step": self.rollout_step}

    def load_checkpoint_state(self, state: dict) -> None:
        self.rollout_step = int(state.get("rollout_step", 0))


# ------------------------------------------------------------------------------------------ build
# Stage settings the builder uses (the rollout log), beside the module's own and the shared run settings.
LOG_KEYS = ("rollouts", "rollout_table_rows")


def build(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> StageParts:
    """The GRPO stage's parts from a composed config; nothing is fitted yet."""
    out, ckpt_path, bundle = start(cfg, exclude=LOG_KEYS, given=("bundle", "rewards", "seed", "optimizer", "scheduler"),
                                   data_kwargs={"mode": "prompt"})
    dm = instantiate(cfg.data, mode="prompt")  # rollouts need prompt-only encodings
    dm.attach(bundle)
    dm.collator = PromptBatch()
    st = cfg.stage
    rewards = build_rewards(OmegaConf.to_container(cfg.reward, resolve=True) if cfg.get("reward") else None)
    module = instantiate_module(cfg, exclude=LOG_KEYS, bundle=bundle, rewards=rewards, seed=int(cfg.seed),
                                **optimizer_partials(cfg))
    rollout_log = RolloutLog(out / ROLLOUT_DIR if st.get("rollouts", True) else None,
                             st.get("rollout_table_rows", 16), seed=int(cfg.seed))
    # Manual optimization: clipping (stage.max_grad_norm) and accumulation (micro_batch_size) are ours.
    trainer = make_trainer(cfg, out, stage_callbacks(cfg, bundle, out, [rollout_log, *callbacks]),
                           gradient_clip_val=None, accumulate_grad_batches=1, limit_val_batches=0)
    return StageParts(bundle, dm, module, trainer, ckpt_path)
