"""Stage 3: GRPO on the wrongly judged samples (METHOD.md §2, rewards §3).

One training step (`GRPOModule.training_step`), readable top to bottom:

    P prompts ─ generate G completions each (temperature, top_p, seed = f(seed, step): resume-safe)
      → rewards (urt.rewards.score against answer_string(task, label); weights from cfg.reward.weights)
      → group advantages (urt.rl.objective.group_advantages; optional zero-variance-group filter)
      → sequences = prompt ids + completion ids (mask up to and including the first EOS)
      → old log-probs (only when μ > 1), reference log-probs (no_grad; none at all when β = 0)
      → μ × num_mini_batches optimizer steps with policy_loss (micro-batches accumulated exactly),
        gradient clipping, scheduler step
      → metrics + one parquet of every rollout under run_dir/rollouts/step-NNNNNN.parquet

**Bad input.** A non-finite reward (any weighted reward or their sum) or a non-finite micro-batch loss
(checked before its backward, so no optimizer step applies it) stops the run: the Lightning state is saved
as `checkpoints/failed-step-NNNNNN.ckpt` and a UrtError names the step and the reward and sample key (or
the micro-batch's samples). A reward function that raises is a UrtError naming the reward and the sample
key (the original chained as `__cause__`). A group left with fewer than G valid completions (generate
returned fewer strings, or one cannot be tokenised) gets its advantages over the valid ones only, or is
skipped when fewer than 2 remain; counted in `train/short_groups` (and `train/skipped_groups`).

**Completion tokens.** `urt.generation.generate` returns text (special tokens skipped, the assistant
prefix prepended). The completion ids are that text (minus the prefix) re-tokenised with special tokens
split (so a literal "<|image_pad|>" in the text can never become a vision placeholder, DEMO-NOTES
pitfall 5), followed by `<|im_end|>` unless the completion used up `max_new_tokens` (cut: no EOS, so
the mask covers every token, as the paper's). Re-tokenising can differ from the sampled token path for
rare non-canonical BPE splits; log-probs are then those of the canonical split of the same text.

**Log-probs.** Each (prompt + completion) is one `Encoded` whose labels are the completion ids, batched
per `stage.collate` (`urt.rl.shared_prompt.make_logprob_collator`): shared prompts (the default on
sdpa/eager: each distinct prompt of a micro-batch runs once with the KV cache on, its G completions then
run on that cache; `urt.rl.shared_prompt`), packed (padding-free, one segment per sequence, per-sequence
mRoPE positions, no attention_mask, `use_cache=False`; the default under flash-attention) or right-padded.
Only the positions that predict a completion token are projected onto the vocabulary (`logits_to_keep` as
a boolean mask) before the fp32 log_softmax.

**Reference model.** β = 0: none is built or run. Else a frozen deep copy of the starting weights,
kept out of the LightningModule's state_dict (never checkpointed, moved to the device at fit start);
with LoRA the base model with adapters disabled (peft `disable_adapter()`), no copy.

**Exact resume.** The rollout counter is checkpointed; the generation seed is derived from
(seed, rollout step), the data position comes from the data module's state, so a run stopped at step k
and resumed repeats the uninterrupted run's steps (deterministic CPU).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from urt.data.collate import model_inputs
from urt.data.encode import IGNORE_INDEX, Encoded
from urt.errors import UrtError
from urt.rl.objective import (PAPER_STD_EPS, completion_mask, group_advantages, policy_loss,
                                zero_variance_groups)
from urt.stages.sft import _forward_takes, _num_batches, supervised_mask

log = logging.getLogger(__name__)

ROLLOUT_DIR = "rollouts"


# ------------------------------------------------------------------------------------------ helpers
class PromptBatch:
    """Data-module collator for GRPO: keeps the prompt-mode `Encoded` samples as they are (generate and
    the log-prob collators need them), plus their keys."""

    def __call__(self, items: list[Encoded]) -> dict:
        return {"prompts": list(items), "keys": [e.key for e in items]}


def _distributed() -> bool:
    """Whether this process is one of several data-parallel ranks (an initialised process group > 1)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def generation_seed(seed: int, step: int, rank: int = 0) -> int:
    """Sampling seed of rollout step `step` on data-parallel rank `rank`: a function of these only, so
    resuming is exact (and ranks never share a sampling stream)."""
    return zlib.crc32(f"urt-grpo:{int(seed)}:{int(step)}:{int(rank)}".encode()) & 0x7FFFFFFF


def completion_ids(tokenizer, text: str, prefix: str, eos_id: int, max_new_tokens: int) -> list[int]:
    """Token ids of a generated completion (see the module docstring): EOS-terminated unless cut."""
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


def grouped_advantages(rewards: torch.Tensor, valid: torch.Tensor, G: int, mode: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, zero-variance groups, usable groups) of rewards laid out G slots per group, over each
    group's valid slots only: a full batch is `group_advantages` exactly; a group with < 2 valid
    completions is not usable (no spread: its slots get advantage 0 and are skipped)."""
    rewards = rewards.float()
    if bool(valid.all()):
        return (group_advantages(rewards, G, mode), zero_variance_groups(rewards, G),
                torch.ones(rewards.numel() // G, dtype=torch.bool))
    r, v = rewards.view(-1, G), valid.view(-1, G)
    usable = v.sum(dim=1) >= 2
    adv = torch.zeros_like(r)
    zero_var = torch.zeros(r.shape[0], dtype=torch.bool)
    centred = []
    for g in usable.nonzero().flatten().tolist():
        rg = r[g][v[g]]
        zero_var[g] = bool(zero_variance_groups(rg, len(rg))[0])
        if mode == "batch":  # std of the centred values over the whole batch (below)
            centred.append((g, group_advantages(rg, len(rg), "none")))
        else:
            adv[g, v[g]] = group_advantages(rg, len(rg), mode)
    if centred:
        flat = torch.cat([c for _, c in centred])
        std = flat.std() if flat.numel() > 1 else torch.zeros(())
        for g, c in centred:
            adv[g, v[g]] = c / (std + PAPER_STD_EPS)
    return adv.flatten(), zero_var, usable


def solution_string(prompt: Encoded) -> str | None:
    """The answer string a completion is rewarded against: the label's (a tie's only under the implicit
    prompts, the one set that offers a tie; None otherwise)."""
    from urt.prompts import TIE_STRINGS, answer_string

    if prompt.label == "tie":
        implicit = (prompt.meta or {}).get("template_set") == "implicit"
        return TIE_STRINGS.get(prompt.task) if implicit else None
    return answer_string(prompt.task, int(prompt.label))


def pad_rows(rows: Sequence[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    width = max(int(r.shape[0]) for r in rows)
    return torch.stack([F.pad(r, (0, width - int(r.shape[0])), value=value) for r in rows])


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    from urt.generation import _to_device as move

    return move(batch, device, dtype)


def sequence_logprobs(model, collate: Callable, seqs: list[Encoded], *, entropy: bool = False,
                      visual_cache=None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-token log-probs (fp32) of each sequence's completion tokens (one 1-D tensor per sequence, in
    order) and, when asked, the per-token entropies (detached). `collate` is a packed or padded collator,
    or a `urt.rl.shared_prompt.SharedPromptLogprobs` (each prompt run once per micro-batch; the padded
    path, with the reason logged, when it cannot serve this pass).
    `visual_cache` (a `urt.rl.visual_cache.VisualCache` of this step's prompts): the model is fed the
    cached visual features instead of running its vision tower on every sequence's pixels (the normal path,
    with the reason logged, when the cache cannot feed this model)."""
    from urt.rl.shared_prompt import PromptCacheDropped, SharedPromptLogprobs
    from urt.rl.visual_cache import _warn_once

    if isinstance(collate, SharedPromptLogprobs):
        reason = collate.pass_blocker(model, seqs)
        if reason is None:
            try:
                logits, targets = collate.forward(model, seqs, visual_cache=visual_cache)
                return _token_logprobs(logits, targets, seqs, entropy)
            except PromptCacheDropped as e:
                reason = str(e)
        _warn_once(f"GRPO log-probs: a pass runs on padded batches instead of shared prompts: {reason}")
        collate = collate.fallback
    batch = collate(seqs)
    labels = batch["labels"]
    inputs = model_inputs(batch)
    param = next(model.parameters())
    inputs = _to_device(inputs, param.device, getattr(model, "dtype", param.dtype))
    if visual_cache is not None:
        inputs = visual_cache.inputs_for(model, seqs, inputs)
    labels = labels.to(param.device)
    keep = supervised_mask(labels)  # positions whose next token is a completion token
    targets = labels[:, 1:][keep[:, :-1]]
    if _forward_takes(model, "logits_to_keep"):
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        logits = logits.reshape(-1, logits.shape[-1])
    else:
        logits = model(**inputs, use_cache=False).logits[keep]
    return _token_logprobs(logits, targets, seqs, entropy)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, seqs: list[Encoded], entropy: bool
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


def _user_text(tokenizer, prompt: Encoded, skip_ids: set[int]) -> str:
    """The last user turn of a prompt, vision placeholders removed (for the rollout table)."""
    ids = [i for i in prompt.input_ids.tolist() if i not in skip_ids]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    start = text.rfind("<|im_start|>user\n")
    if start < 0:
        return text
    text = text[start + len("<|im_start|>user\n"):]
    return text.split("<|im_end|>", 1)[0].strip()


ROLLOUT_TABLE_KEY = "rollouts/step_{step:06d}"  # the wandb Table of one rollout step


def is_truncated(ids: Sequence[int], eos_id: int, max_new_tokens: int) -> bool:
    """Whether a completion hit `max_new_tokens` without an EOS, from its `completion_ids` (which end
    with EOS exactly when the completion was not cut). An empty (invalid) completion is not truncated."""
    return len(ids) >= max_new_tokens and (not ids or int(ids[-1]) != int(eos_id))


def parsed_answers(texts: Sequence[str | None], tasks: Sequence[str]) -> tuple[list, list]:
    """(answer text, winner) of each completion by `urt.prompts.parse_output`: the `<answer>` content
    (None without one) and "1" / "2" / "tie" (None when the answer is not one of the task's strings)."""
    from urt.prompts import parse_output

    answers, winners = [], []
    for t, task in zip(texts, tasks):
        j = parse_output(t, task)
        answers.append(j.answer)
        winners.append(None if j.winner is None else str(j.winner))
    return answers, winners


def rollout_arrow_table(cols: dict[str, list]):
    """A pyarrow Table of rollout columns with stable types (so every step's parquet has one schema,
    also when a string column is all null in a step)."""
    import pyarrow as pa

    types = {"step": pa.int64(), "rank": pa.int64(), "group": pa.int64(), "sample": pa.int64(),
             "completion_length": pa.int64(), "truncated": pa.bool_(), "kept": pa.bool_(), "swapped": pa.bool_(),
             "advantage": pa.float64(), "reward": pa.float64()}
    out = {}
    for k, v in cols.items():
        t = types.get(k, pa.float64() if k.startswith("reward_") else pa.string())
        out[k] = pa.array(v, type=t)
    return pa.table(out)


def sample_table_rows(groups: Sequence[int], n: int, seed: str | int) -> list[int]:
    """Row indices for the per-step wandb Table: whole groups in a seeded random order until `n` rows
    (the last group possibly cut), returned in row order. n <= 0: none."""
    import random

    if n <= 0:
        return []
    rows_of: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        rows_of.setdefault(int(g), []).append(i)
    order = sorted(rows_of)
    random.Random(seed).shuffle(order)
    picked: list[int] = []
    for g in order:
        picked += rows_of[g]
        if len(picked) >= n:
            break
    return sorted(picked[:n])


def wandb_loggers(trainer) -> list:
    """The trainer's WandbLoggers (none without a trainer)."""
    if trainer is None:
        return []
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


# ------------------------------------------------------------------------------------------ module
class GRPOModule(L.LightningModule):
    """GRPO of a `ModelBundle` (see the module docstring). Hyper-parameters: conf/stage/grpo.yaml."""

    def __init__(self, bundle, optimizer: Callable | None = None, scheduler: Callable | None = None, *,
                 num_generations: int = 8, max_new_tokens: int = 2048, temperature: float = 1.0,
                 top_p: float = 1.0, generation_batch_size: int = 8, beta: float = 0.04,
                 kl_estimator: str = "k3", advantage: str = "paper", aggregation: str = "paper",
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, num_iterations: int = 1,
                 num_mini_batches: int = 1, micro_batch_size: int = 8, max_grad_norm: float | None = 1.0,
                 filter_zero_variance: bool = False, collate: str = "auto", reward_weights: dict | None = None,
                 seed: int = 0, total_steps: int | None = None, rollout_dir: str | Path | None = None,
                 rollout_table_rows: int = 16, visual_cache: bool = True):
        super().__init__()
        self.automatic_optimization = False
        self.bundle = bundle
        self.model = bundle.model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.G = int(num_generations)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.generation_batch_size = int(generation_batch_size)
        self.beta, self.kl_estimator = float(beta), kl_estimator
        self.advantage, self.aggregation = advantage, aggregation
        self.eps_low, self.eps_high = float(epsilon_low), float(epsilon_high)
        self.mu, self.num_mini_batches = int(num_iterations), int(num_mini_batches)
        self.micro_batch_size = int(micro_batch_size)
        self.max_grad_norm = max_grad_norm
        self.filter_zero_variance = bool(filter_zero_variance)
        self.reward_weights = dict(reward_weights) if reward_weights else None
        self.seed, self.total_steps = int(seed), total_steps
        self.rollout_dir = Path(rollout_dir) if rollout_dir else None
        self.rollout_table_rows = int(rollout_table_rows or 0)  # rows of the per-step wandb Table
        self.visual_cache = bool(visual_cache)  # encode visuals once per step (frozen vision tower only)
        self.skipped_ties = 0  # tie prompts left out (CoT prompts have no tie answer)
        if self.G < 2:
            raise UrtError(f"num_generations must be >= 2 (a group of 1 has no advantage), got {self.G}")
        if self.mu < 1 or self.num_mini_batches < 1 or self.micro_batch_size < 1:
            raise UrtError("num_iterations, num_mini_batches and micro_batch_size must be >= 1")
        from urt.rl.shared_prompt import make_logprob_collator

        self.collate = make_logprob_collator(collate, bundle)  # log-prob batches (stage.collate)
        from urt.generation import stop_token_ids, vision_token_ids

        self.eos_id = stop_token_ids(bundle)[0]
        self.vision_ids = set(vision_token_ids(bundle))
        # The reference policy: kept out of the module's state_dict (never checkpointed).
        ref = None
        if self.beta != 0:
            from urt.models.loading import is_peft_model

            if not is_peft_model(self.model):
                ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.__dict__["ref_model"] = ref
        self.rollout_step = 0  # rollout batches done (checkpointed; seeds generation)
        self.schedule_steps: int | None = None

    # -------------------------------------------------------------------------------------- step
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        from urt.generation import GenerationConfig, generate

        prompts: list[Encoded] = batch["prompts"]
        # a tie has an answer only in the implicit prompts; under CoT prompts it cannot be rewarded: counted out
        ties = [p for p in prompts if solution_string(p) is None]
        if ties:
            self.skipped_ties += len(ties)
            log.warning("GRPO: %d tie prompt(s) have no CoT answer to reward and are left out (%d so far; first: %r)",
                        len(ties), self.skipped_ties, ties[0].key)
            prompts = [p for p in prompts if solution_string(p) is not None]
        G, step = self.G, self.rollout_step + 1
        self._step_in_progress = step
        t0 = time.perf_counter()

        # 1. rollouts: G completion slots per prompt, laid out group by group (slot i is in group i // G);
        #    a slot is valid when generate returned a string for it and that string tokenises
        gen = GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                               num_return_sequences=G, batch_size=self.generation_batch_size,
                               seed=generation_seed(self.seed, step, self.global_rank))
        groups = list(generate(self.bundle, prompts, gen))
        if len(groups) != len(prompts):
            raise UrtError(f"GRPO step {step}: generate returned {len(groups)} groups for {len(prompts)} prompts")
        texts: list[str | None] = []
        for p, group in zip(prompts, groups):
            group = list(group)
            if len(group) > G:
                raise UrtError(f"GRPO step {step}: generate returned {len(group)} completions for prompt "
                               f"{p.key!r}, more than num_generations={G}")
            texts += [t if isinstance(t, str) else None for t in group] + [None] * (G - len(group))
        t1 = time.perf_counter()

        # 2. completion ids (the loss mask ends at the first EOS); a completion that cannot be encoded is invalid
        ids: list[list[int]] = []
        for i, t in enumerate(texts):
            c = None
            if t is not None:
                try:
                    c = completion_ids(self.bundle.tokenizer, t, prompts[i // G].meta.get("assistant_prefix") or "",
                                       self.eos_id, self.max_new_tokens)
                except Exception as e:  # noqa: BLE001 - one bad completion must not stop the run
                    log.warning("GRPO step %d: completion %s#%d cannot be encoded (%s); left out of its group",
                                step, prompts[i // G].key, i % G, e)
            if t is not None and not c:
                texts[i] = None
            ids.append(list(c) if c else [])
        valid = torch.tensor([t is not None for t in texts], dtype=torch.bool)

        # 3. rewards (non-finite ones stop the run) and group advantages over each group's valid completions
        scores = self._score(prompts, texts, valid, step)
        rewards = torch.tensor(scores["reward"], dtype=torch.float32)
        advantages, zero_var, usable = grouped_advantages(rewards, valid, G, self.advantage)
        if self.advantage == "batch" and _distributed():  # the std of the global batch, not of this rank's
            advantages = self._global_batch_advantages(rewards, valid, usable)
        group_keep = usable & ~zero_var if self.filter_zero_variance else usable
        keep = valid & group_keep.repeat_interleave(G)
        t2 = time.perf_counter()

        seqs = [completion_sequence(prompts[i // G], ids[i], i % G) if valid[i] else None for i in range(len(texts))]
        idx = keep.nonzero().flatten().tolist()

        # 4. old (μ > 1) and reference (β ≠ 0) log-probs, then μ × num_mini_batches optimizer steps
        #    Every rank takes the same optimizer steps (DDP): the mini-batch count comes from the largest
        #    rank's kept sequences (one process: min(num_mini_batches, kept)), a rank may hold none of a
        #    mini-batch; no rank keeps anything -> no update anywhere.
        losses, stats = [], {"kl": [], "clip_fraction": [], "entropy": []}
        n_minis = min(self.num_mini_batches, self._max_over_ranks(len(idx)))
        if n_minis:
            # a frozen vision tower's features are constants of the step: encode each prompt's visuals once
            # for the policy, old and reference passes and every μ iteration (urt.rl.visual_cache)
            cache = None
            if self.visual_cache and idx:
                from urt.rl.visual_cache import VisualCache

                cache = VisualCache.for_step(self.model, self.bundle.family, [seqs[i] for i in idx])
            old = self._frozen_logprobs(self.model, seqs, idx, cache) if self.mu > 1 else None
            ref = self._reference_logprobs(seqs, idx, cache) if self.beta != 0 else None
            minis = [idx[k::n_minis] for k in range(n_minis)]
            for it in range(self.mu):
                for m in minis:
                    losses.append(self._update(seqs, m, advantages, old, ref, stats, first=it == 0,
                                               visual_cache=cache))
        t3 = time.perf_counter()
        self.rollout_step = step

        # 5. metrics and the rollout table
        loss = torch.tensor(sum(losses) / len(losses) if losses else float("nan"))
        metrics = self._metrics(prompts, ids, scores, rewards, valid, zero_var, usable, stats, times=(t0, t1, t2, t3))
        if self.skipped_ties:
            metrics["train/skipped_tie_prompts"] = float(self.skipped_ties)
        if losses:  # (every group filtered out: no update, no loss)
            metrics["train/loss"] = loss
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(prompts))
        self._write_rollouts(step, prompts, texts, ids, scores, advantages, keep, valid)
        return {"loss": loss}

    def _score(self, prompts, texts, valid, step) -> dict[str, list[float]]:
        """`urt.rewards.score` of the valid completions, spread back over every slot (0 where invalid). A
        reward function that raises, or a non-finite reward, is a UrtError naming the reward and sample."""
        from urt.rewards import get_reward, score

        G = self.G
        at = valid.nonzero().flatten().tolist()
        comps = [texts[i] for i in at]
        sols = [solution_string(prompts[i // G]) for i in at]
        key = lambda i: f"{prompts[i // G].key}#{i % G}"  # noqa: E731 - the sample key (as in the sequences)
        try:
            got = score(comps, sols, self.reward_weights)
        except UrtError:
            raise
        except Exception as e:
            # find the reward and the sample that raise (the rewards are cheap, pure functions)
            from urt.rewards import DEFAULT_WEIGHTS

            for name in (self.reward_weights or DEFAULT_WEIGHTS):
                fn = get_reward(name)
                for i, c, s in zip(at, comps, sols):
                    try:
                        fn(c, s)
                    except Exception as inner:
                        raise UrtError(f"GRPO step {step}: reward {name!r} raised on sample {key(i)!r}: "
                                       f"{type(inner).__name__}: {inner}") from inner
            raise UrtError(f"GRPO step {step}: scoring the completions failed: {type(e).__name__}: {e}") from e
        bad = next(((name, i) for name, vals in got.items() if name.startswith("rewards/")
                    for i, v in zip(at, vals) if not math.isfinite(v)), None)
        if bad is None:
            bad = next((("reward", i) for i, v in zip(at, got["reward"]) if not math.isfinite(v)), None)
        if self._any_rank(bad is not None):
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

    def _any_rank(self, flag: bool) -> bool:
        """`flag` or'ed over the data-parallel ranks (so every rank stops together). A collective: every
        rank must call it at the same point of the step."""
        if not _distributed():
            return bool(flag)
        return bool(self._all_reduce(torch.tensor([1.0 if flag else 0.0], device=self.device), "max").item() > 0)

    # -------------------------------------------------------------------------------------- data parallel
    # Under DDP (trainer=ddp / ddp_cpu) every rank runs the same step on its own prompts: the same number of
    # `_update` calls (so of optimizer steps) and the same collectives in the same order, whatever its
    # share of kept sequences (none included). The micro-batches accumulate without DDP's sync (else one
    # all-reduce each, and a hang as soon as the ranks' micro-batch counts differ); `_sync_gradients` then
    # has DDP all-reduce once per optimizer step, the loss weights having divided by the global counts.
    def _all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`t` reduced in place over the data-parallel ranks (sum or max); `t` itself on one process."""
        if _distributed():
            ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
            torch.distributed.all_reduce(t, op=ops[op])
        return t

    def _max_over_ranks(self, n: int) -> int:
        """`n` maxed over the data-parallel ranks (a collective)."""
        if not _distributed():
            return int(n)
        return int(self._all_reduce(torch.tensor([float(n)], device=self.device), "max").item())

    def _no_grad_sync(self):
        """Context in which backward passes accumulate local gradients only: the strategy's
        `block_backward_sync` (DDP's `no_sync`); nothing to block on one device."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        block = getattr(strategy, "block_backward_sync", None)
        return block() if block is not None else contextlib.nullcontext()

    def _sync_gradients(self, opt, loss: float, bad: bool) -> tuple[float, bool]:
        """Average the optimizer's accumulated gradients over the ranks (in place) and return (the loss
        summed over the ranks, whether any rank saw a non-finite loss). On one process: (loss, bad), nothing
        moves.

        One small collective first carries the loss and the non-finite flag (on a non-finite loss every rank
        stops there, before any gradient moves). Then one backward pass *with* DDP's sync of a zero that
        touches every trainable parameter: its gradient adds nothing, but it fires DDP's hooks, so DDP's
        reducer all-reduces the accumulated gradients in its buckets as it would after a plain backward
        (bucketed, comm hooks honoured; with `gradient_as_bucket_view` the gradients then live in those
        buckets and accumulate there, no second copy). DDP divides by the world size: the loss weights of
        `_update` multiply by it. Every trainable parameter ends with a gradient (zero where no rank's
        sequences reached it), on every rank, also on one without sequences."""
        if not _distributed():
            return loss, bad
        head = self._all_reduce(torch.tensor([loss, 1.0 if bad else 0.0], dtype=torch.float64, device=self.device))
        if bool(head[1] > 0):
            return float(head[0]), True
        params = [p for p in self.parameters() if p.requires_grad]  # exactly the parameters DDP reduces
        zero = sum(p.reshape(-1)[0].float() for p in params) * 0.0
        self.manual_backward(zero)  # outside `_no_grad_sync`: DDP all-reduces now
        return float(head[0]), False

    def _global_batch_advantages(self, rewards: torch.Tensor, valid: torch.Tensor, usable: torch.Tensor
                                 ) -> torch.Tensor:
        """advantage="batch" under DDP: the centred rewards scaled by the std over the *global* batch (the
        usable groups' valid slots of every rank, in rank order), as one process holding it would."""
        centred, _, _ = grouped_advantages(rewards, valid, self.G, "none")
        sel = valid & usable.repeat_interleave(self.G)
        mine = centred[sel].tolist()
        every: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, mine)
        flat = torch.tensor([v for r in every for v in r], dtype=torch.float32)
        std = flat.std() if flat.numel() > 1 else torch.zeros(())
        return torch.where(sel, centred / (std + PAPER_STD_EPS), torch.zeros_like(centred))

    def setup(self, stage: str) -> None:
        """GRPO runs on one device or with DDP; other strategies are refused before anything is built."""
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        strategy = self.trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise UrtError(f"GRPO runs on one device or with DDP (trainer=ddp, trainer=ddp_cpu), not with "
                           f"{type(strategy).__name__}: generation, the frozen reference and the gradient sum "
                           f"need every rank to hold the full weights (use FSDP for the SFT stages)")
        if isinstance(strategy, DDPStrategy) and getattr(strategy, "_ddp_kwargs", {}).get("static_graph"):
            raise UrtError("GRPO needs DDP with static_graph=False: it sums the gradients itself once per "
                           "optimizer step (trainer.strategy.static_graph)")

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

    def _metrics(self, prompts, ids, scores, rewards, valid, zero_var, usable, stats, times) -> dict[str, float]:
        t0, t1, t2, t3 = times
        G = self.G
        vg = valid.view(-1, G)
        n_valid = vg.sum(dim=1)
        lengths = torch.tensor([float(len(x)) for x, v in zip(ids, valid) if v])
        tokens = float(lengths.sum()) + sum(int(n) * len(p) for n, p in zip(n_valid, prompts))
        if bool(valid.all()):
            grouped = rewards.view(-1, G)
            reward_std = float(grouped.std(dim=1).mean())
            all_wrong = float((grouped <= 1).all(dim=1).float().mean())
            all_correct = float((grouped >= self._max_reward()).all(dim=1).float().mean())
        else:  # over each group's valid completions (groups without any left out)
            rs = [rewards.view(-1, G)[g][vg[g]] for g in range(vg.shape[0]) if n_valid[g] > 0]
            stds = [float(r.std()) for r in rs if len(r) > 1]
            reward_std = sum(stds) / len(stds) if stds else 0.0
            all_wrong = sum(float((r <= 1).all()) for r in rs) / max(1, len(rs))
            all_correct = sum(float((r >= self._max_reward()).all()) for r in rs) / max(1, len(rs))
        nv = max(1, int(valid.sum()))
        out = {
            "train/completion_length": float(lengths.mean()) if len(lengths) else 0.0,
            "train/reward": float(rewards[valid].sum()) / nv,
            "train/reward_std": reward_std,
            "train/all_wrong": all_wrong,
            "train/all_correct": all_correct,
            "train/zero_variance_groups": float((zero_var & usable).sum()),
            "train/filtered_groups": float((zero_var & usable).sum()) if self.filter_zero_variance else 0.0,
            "train/short_groups": float((n_valid < G).sum()),
            "train/skipped_groups": float((~usable).sum()),
            "train/tokens_per_s": tokens / max(1e-9, t3 - t0),
            "train/lr": float(self.optimizers().param_groups[0]["lr"]),
            "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2,
        }
        out.update({f"train/{k}": sum(x for x, v in zip(vals, valid) if v) / nv
                    for k, vals in scores.items() if k.startswith("rewards/")})
        out.update({f"train/{k}": float(torch.stack(v).mean()) for k, v in stats.items() if v})
        return out

    def _update(self, seqs, idx, advantages, old, ref, stats, first: bool, visual_cache=None) -> float:
        """One optimizer step over the sequences `idx` (micro-batches accumulated exactly); returns its loss.

        Data parallel: every rank runs this once per optimizer step, `idx` being its share of the step's
        sequences (possibly none). The loss weights divide by the sequence / completion-token counts summed
        over all ranks, the micro-batches accumulate without any gradient communication, and one all-reduce
        of the gradients (`_sync_gradients`) then gives every rank the gradient of the global objective —
        exactly, whatever the ranks' shares, micro-batch counts or filtered groups."""
        opt = self.optimizers()
        world = torch.distributed.get_world_size() if _distributed() else 1
        # DDP: keep the gradients where DDP's reducer put them (its buckets) and accumulate into them
        opt.zero_grad(set_to_none=world == 1)
        # this step's global counts: sequences, and completion tokens (each loss mask, up to the first EOS)
        tokens = {i: float(completion_mask(seqs[i].labels[seqs[i].prompt_length:][None], self.eos_id).sum())
                  for i in idx}
        counts = self._all_reduce(torch.tensor([float(len(idx)), sum(tokens.values())], dtype=torch.float64,
                                               device=self.device))
        n_seq, n_tok = (float(c) for c in counts.cpu())
        total, bad = 0.0, None
        with self._no_grad_sync():
            for s in range(0, len(idx), self.micro_batch_size):
                mb = idx[s:s + self.micro_batch_size]
                logp, ent = sequence_logprobs(self.model, self.collate, [seqs[i] for i in mb], entropy=first,
                                              visual_cache=visual_cache)
                logp = pad_rows(logp)
                comp = pad_rows([seqs[i].labels[seqs[i].prompt_length:] for i in mb], value=IGNORE_INDEX)
                mask = completion_mask(comp, self.eos_id).to(logp.device) * (comp != IGNORE_INDEX).to(logp.device)
                loss, m = policy_loss(
                    logp, advantages[mb].to(logp.device), mask,
                    old_logp=None if old is None else pad_rows([old[i] for i in mb]).to(logp.device),
                    ref_logp=None if ref is None else pad_rows([ref[i] for i in mb]).to(logp.device),
                    beta=self.beta, kl_estimator=self.kl_estimator, aggregation=self.aggregation,
                    eps_low=self.eps_low, eps_high=self.eps_high, max_completion_length=self.max_new_tokens)
                if not bool(torch.isfinite(loss.detach()).all()):  # checked before its backward
                    bad = (float(loss.detach()), mb)
                    break
                # exact accumulation: token aggregation weighs by tokens, the others by sequences (global
                # counts; x world: DDP's sync averages over the ranks, the objective sums their shares)
                w = sum(tokens[i] for i in mb) / max(1.0, n_tok) if self.aggregation == "token" \
                    else len(mb) / max(1.0, n_seq)
                self.manual_backward(loss * (w * world))
                total += float(loss.detach()) * w
                if first:
                    stats["clip_fraction"].append(m["clip_fraction"].float().cpu())
                    if "kl" in m:
                        stats["kl"].append(m["kl"].float().cpu())
                    stats["entropy"].append(torch.cat([e for e in ent]).mean().cpu())
        total, any_bad = self._sync_gradients(opt, total, bad is not None)
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

    @torch.no_grad()
    def _frozen_logprobs(self, model, seqs, idx, visual_cache=None) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for s in range(0, len(idx), self.micro_batch_size):
            mb = idx[s:s + self.micro_batch_size]
            lp, _ = sequence_logprobs(model, self.collate, [seqs[i] for i in mb], visual_cache=visual_cache)
            out.update({i: x.detach() for i, x in zip(mb, lp)})
        return out

    def _reference_logprobs(self, seqs, idx, visual_cache=None) -> dict[int, torch.Tensor]:
        if self.ref_model is not None:
            return self._frozen_logprobs(self.ref_model, seqs, idx, visual_cache)
        with self.model.disable_adapter():  # LoRA: the base model is the reference
            return self._frozen_logprobs(self.model, seqs, idx, visual_cache)

    def _max_reward(self) -> float:
        from urt.rewards import DEFAULT_WEIGHTS

        return float(sum((self.reward_weights or DEFAULT_WEIGHTS).values()))

    def _write_rollouts(self, step, prompts, texts, ids, scores, advantages, keep, valid=None) -> None:
        """Every rollout of the step, one row each: `rollout_dir/step-NNNNNN.parquet` (rank 0 writes all
        ranks' rows) and, when a WandbLogger is attached, `rollout_table_rows` of them as a wandb Table
        under `rollouts/step_NNNNNN`. Columns: step, rank, prompt_key, group (unique within the step
        across ranks), sample (index in the group), sample_key (`key#sample`), task, label, swapped (the
        pair was presented in swapped order; label is the presented one), prompt (last user turn, no
        vision placeholders), completion, answer (the parsed `<answer>` text), winner ("1"/"2"/"tie"
        parsed, else null), reward_<name> per reward (unweighted), reward (weighted sum), advantage,
        completion_length (tokens in the loss mask, EOS included), truncated (hit max_new_tokens without
        EOS), kept (trained on). Slots `generate` left empty have no row."""
        tables = wandb_loggers(self._trainer) if self.rollout_table_rows > 0 else []
        if self.rollout_dir is None and not tables:
            return
        G, n = self.G, len(texts)
        rank = self.global_rank
        users = [_user_text(self.bundle.tokenizer, p, self.vision_ids) for p in prompts]
        of = [prompts[i // G] for i in range(n)]
        answers, winners = parsed_answers(texts, [p.task for p in of])
        cols: dict[str, list] = {
            "step": [step] * n, "rank": [rank] * n,
            "prompt_key": [p.key for p in of],
            "group": [i // G for i in range(n)], "sample": [i % G for i in range(n)],
            "sample_key": [f"{p.key}#{i % G}" for i, p in enumerate(of)],
            "task": [p.task for p in of], "label": [str(p.label) for p in of],
            "swapped": [bool((p.meta.get("sample_meta") or {}).get("swapped", False)) for p in of],
            "prompt": [users[i // G] for i in range(n)], "completion": [t or "" for t in texts],
            "answer": answers, "winner": winners,
        }
        for name, vals in scores.items():
            if name.startswith("rewards/"):
                cols[f"reward_{name.split('/', 1)[1]}"] = [float(v) for v in vals]
        cols["reward"] = [float(v) for v in scores["reward"]]
        cols["advantage"] = [float(a) for a in advantages]
        cols["completion_length"] = [len(x) for x in ids]
        cols["truncated"] = [is_truncated(x, self.eos_id, self.max_new_tokens) for x in ids]
        cols["kept"] = [bool(k) for k in keep]
        if valid is not None and not bool(valid.all()):  # slots generate left empty have no row
            rows_at = [i for i, t in enumerate(texts) if t is not None]
            cols = {k: [v[i] for i in rows_at] for k, v in cols.items()}
        parts = [(cols, len(prompts))]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, (cols, len(prompts)))
        if rank != 0:
            return
        merged: dict[str, list] = {k: [] for k in cols}
        offset = 0  # group ids: rank r's groups follow those of ranks < r
        for part, n_groups in parts:
            for k in cols:
                merged[k] += [g + offset for g in part[k]] if k == "group" else part[k]
            offset += n_groups
        if self.rollout_dir is not None:
            self.rollout_dir.mkdir(parents=True, exist_ok=True)
            import pyarrow.parquet as pq

            pq.write_table(rollout_arrow_table(merged), self.rollout_dir / f"step-{step:06d}.parquet")
        if tables:
            at = sample_table_rows(merged["group"], self.rollout_table_rows, f"urt-rollout-table:{self.seed}:{step}")
            names = list(merged)
            data = [[merged[k][i] for k in names] for i in at]
            for lg in tables:
                lg.log_table(key=ROLLOUT_TABLE_KEY.format(step=step), columns=names, data=data,
                             step=self.trainer.global_step)

    # -------------------------------------------------------------------------------------- plumbing
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # Encoded prompts stay on the host; generate / the collators move what they use

    def on_fit_start(self) -> None:
        if self.ref_model is not None:
            self.ref_model.to(self.device)

    def _schedule_steps(self) -> int:
        if self.total_steps:
            return int(self.total_steps)
        tr = self.trainer
        if tr.max_steps and tr.max_steps > 0:
            return int(tr.max_steps)
        dm = getattr(tr, "datamodule", None)
        per_epoch = _num_batches(dm) if dm is not None and hasattr(dm, "train_shards") else None
        if per_epoch is None or not (tr.max_epochs and tr.max_epochs > 0):
            raise UrtError("cannot tell how many optimizer steps the schedule spans: set trainer.max_steps or "
                           "stage.total_steps")
        per_rank = math.ceil(per_epoch / max(1, tr.world_size))
        return max(1, per_rank * tr.max_epochs * self.mu * self.num_mini_batches)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params or self.optimizer_factory is None:
            raise UrtError("GRPO needs trainable parameters and an optimizer partial (conf/optimizer)")
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        self.schedule_steps = self._schedule_steps()
        sched = self.scheduler_factory(opt, num_training_steps=self.schedule_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["urt"] = {"family": self.bundle.family, "schedule_steps": self.schedule_steps,
                             "rollout_step": self.rollout_step}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.rollout_step = int(checkpoint.get("urt", {}).get("rollout_step", 0))


# ------------------------------------------------------------------------------------------ runner
def build_grpo(cfg: DictConfig, callbacks: Sequence[Callback] = ()):
    """(bundle, datamodule, module, trainer, ckpt_path) for a GRPO config; nothing is fitted yet."""
    from hydra.utils import instantiate

    from urt.models import load_model
    from urt.train import _loggers, resume_path, run_dir, stage_callbacks

    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)
    ckpt_path = resume_path(cfg)
    bundle = load_model(**OmegaConf.to_container(cfg.model, resolve=True))
    dm = instantiate(cfg.data, mode="prompt")  # rollouts need prompt-only encodings
    dm.attach(bundle)
    dm.collator = PromptBatch()
    st = cfg.stage
    weights = cfg.get("reward", {}).get("weights") if cfg.get("reward") else None
    module = GRPOModule(
        bundle, optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        num_generations=st.num_generations, max_new_tokens=st.max_new_tokens, temperature=st.temperature,
        top_p=st.top_p, generation_batch_size=st.generation_batch_size, beta=st.beta,
        kl_estimator=st.kl_estimator, advantage=st.advantage, aggregation=st.aggregation,
        epsilon_low=st.epsilon_low, epsilon_high=st.epsilon_high, num_iterations=st.num_iterations,
        num_mini_batches=st.num_mini_batches, micro_batch_size=st.micro_batch_size,
        max_grad_norm=st.max_grad_norm, filter_zero_variance=st.filter_zero_variance, collate=st.collate,
        reward_weights=OmegaConf.to_container(weights, resolve=True) if weights else None, seed=int(cfg.seed),
        total_steps=st.get("total_steps"), rollout_dir=out / ROLLOUT_DIR if st.get("rollouts", True) else None,
        rollout_table_rows=st.get("rollout_table_rows", 16), visual_cache=st.get("visual_cache", True))

    cbs = stage_callbacks(cfg, bundle, out, callbacks)
    # Manual optimization: clipping (stage.max_grad_norm) and accumulation (micro_batch_size) are ours.
    trainer = instantiate(cfg.trainer, callbacks=cbs, logger=_loggers(cfg, out) or False,
                          default_root_dir=str(out), gradient_clip_val=None, accumulate_grad_batches=1,
                          limit_val_batches=0)
    return bundle, dm, module, trainer, ckpt_path


def run_grpo(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> Path:
    """Fit a GRPO stage from a composed config; returns the final HF folder (`run_dir/hf/final`)."""
    from urt.train import final_hf_dir, finish_loggers, run_dir

    bundle, dm, module, trainer, ckpt_path = build_grpo(cfg, callbacks)
    if trainer.is_global_zero:
        (run_dir(cfg) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    finally:
        finish_loggers(trainer)
    return final_hf_dir(cfg)
