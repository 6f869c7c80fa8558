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

**Log-probs.** Each (prompt + completion) is one `Encoded` whose labels are the completion ids; the
data layer's collators batch them: packed (padding-free, one segment per sequence, per-sequence mRoPE
positions, no attention_mask, `use_cache=False`) for packing-safe families, right-padded otherwise.
Only the positions that predict a completion token are projected onto the vocabulary
(`logits_to_keep` as a boolean mask) before the fp32 log_softmax.

**Reference model.** β = 0: none is built or run. Else a frozen deep copy of the starting weights,
kept out of the LightningModule's state_dict (never checkpointed, moved to the device at fit start);
with LoRA the base model with adapters disabled (peft `disable_adapter()`), no copy.

**Exact resume.** The rollout counter is checkpointed; the generation seed is derived from
(seed, rollout step), the data position comes from the data module's state, so a run stopped at step k
and resumed repeats the uninterrupted run's steps (deterministic CPU).
"""

from __future__ import annotations

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

from urt.data.collate import make_collator, model_inputs
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


def pad_rows(rows: Sequence[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    width = max(int(r.shape[0]) for r in rows)
    return torch.stack([F.pad(r, (0, width - int(r.shape[0])), value=value) for r in rows])


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    from urt.generation import _to_device as move

    return move(batch, device, dtype)


def sequence_logprobs(model, collate: Callable, seqs: list[Encoded], *, entropy: bool = False
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-token log-probs (fp32) of each sequence's completion tokens (one 1-D tensor per sequence, in
    order) and, when asked, the per-token entropies (detached). `collate` is a packed or padded collator."""
    batch = collate(seqs)
    labels = batch["labels"]
    inputs = model_inputs(batch)
    param = next(model.parameters())
    inputs = _to_device(inputs, param.device, getattr(model, "dtype", param.dtype))
    labels = labels.to(param.device)
    keep = supervised_mask(labels)  # positions whose next token is a completion token
    targets = labels[:, 1:][keep[:, :-1]]
    if _forward_takes(model, "logits_to_keep"):
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        logits = logits.reshape(-1, logits.shape[-1])
    else:
        logits = model(**inputs, use_cache=False).logits[keep]
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


# ------------------------------------------------------------------------------------------ module
class GRPOModule(L.LightningModule):
    """GRPO of a `ModelBundle` (see the module docstring). Hyper-parameters: conf/stage/grpo.yaml."""

    def __init__(self, bundle, optimizer: Callable | None = None, scheduler: Callable | None = None, *,
                 num_generations: int = 8, max_new_tokens: int = 2048, temperature: float = 1.0,
                 top_p: float = 1.0, generation_batch_size: int = 8, beta: float = 0.04,
                 kl_estimator: str = "k3", advantage: str = "paper", aggregation: str = "paper",
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, num_iterations: int = 1,
                 num_mini_batches: int = 1, micro_batch_size: int = 8, max_grad_norm: float | None = 1.0,
                 filter_zero_variance: bool = False, collate: str = "packed", reward_weights: dict | None = None,
                 seed: int = 0, total_steps: int | None = None, rollout_dir: str | Path | None = None):
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
        if self.G < 2:
            raise UrtError(f"num_generations must be >= 2 (a group of 1 has no advantage), got {self.G}")
        if self.mu < 1 or self.num_mini_batches < 1 or self.micro_batch_size < 1:
            raise UrtError("num_iterations, num_mini_batches and micro_batch_size must be >= 1")
        self.collate = make_collator(collate, bundle)
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
        group_keep = usable & ~zero_var if self.filter_zero_variance else usable
        keep = valid & group_keep.repeat_interleave(G)
        t2 = time.perf_counter()

        seqs = [completion_sequence(prompts[i // G], ids[i], i % G) if valid[i] else None for i in range(len(texts))]
        idx = keep.nonzero().flatten().tolist()

        # 4. old (μ > 1) and reference (β ≠ 0) log-probs, then μ × num_mini_batches optimizer steps
        losses, stats = [], {"kl": [], "clip_fraction": [], "entropy": []}
        if idx:
            old = self._frozen_logprobs(self.model, seqs, idx) if self.mu > 1 else None
            ref = self._reference_logprobs(seqs, idx) if self.beta != 0 else None
            minis = [m for m in (idx[k::self.num_mini_batches] for k in range(self.num_mini_batches)) if m]
            for it in range(self.mu):
                for m in minis:
                    losses.append(self._update(seqs, m, advantages, old, ref, stats, first=it == 0))
        t3 = time.perf_counter()
        self.rollout_step = step

        # 5. metrics and the rollout table
        loss = torch.tensor(sum(losses) / len(losses) if losses else float("nan"))
        metrics = self._metrics(prompts, ids, scores, rewards, valid, zero_var, usable, stats, times=(t0, t1, t2, t3))
        if losses:  # (every group filtered out: no update, no loss)
            metrics["train/loss"] = loss
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(prompts))
        self._write_rollouts(step, prompts, texts, ids, scores, advantages, keep, valid)
        return {"loss": loss}

    def _score(self, prompts, texts, valid, step) -> dict[str, list[float]]:
        """`urt.rewards.score` of the valid completions, spread back over every slot (0 where invalid). A
        reward function that raises, or a non-finite reward, is a UrtError naming the reward and sample."""
        from urt.prompts import answer_string
        from urt.rewards import get_reward, score

        G = self.G
        at = valid.nonzero().flatten().tolist()
        comps = [texts[i] for i in at]
        sols = [answer_string(prompts[i // G].task, int(prompts[i // G].label)) for i in at]
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
        """`flag` or'ed over the data-parallel ranks (so every rank stops together)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            return bool(t.item() > 0)
        return bool(flag)

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

    def _update(self, seqs, idx, advantages, old, ref, stats, first: bool) -> float:
        """One optimizer step over the sequences `idx` (micro-batches accumulated exactly); returns its loss."""
        opt = self.optimizers()
        opt.zero_grad()
        n_seq = len(idx)
        n_tok = sum(len(seqs[i].labels) - seqs[i].prompt_length for i in idx)
        total = 0.0
        for s in range(0, n_seq, self.micro_batch_size):
            mb = idx[s:s + self.micro_batch_size]
            logp, ent = sequence_logprobs(self.model, self.collate, [seqs[i] for i in mb], entropy=first)
            logp = pad_rows(logp)
            comp = pad_rows([seqs[i].labels[seqs[i].prompt_length:] for i in mb], value=IGNORE_INDEX)
            mask = completion_mask(comp, self.eos_id).to(logp.device) * (comp != IGNORE_INDEX).to(logp.device)
            loss, m = policy_loss(
                logp, advantages[mb].to(logp.device), mask,
                old_logp=None if old is None else pad_rows([old[i] for i in mb]).to(logp.device),
                ref_logp=None if ref is None else pad_rows([ref[i] for i in mb]).to(logp.device),
                beta=self.beta, kl_estimator=self.kl_estimator, aggregation=self.aggregation,
                eps_low=self.eps_low, eps_high=self.eps_high, max_completion_length=self.max_new_tokens)
            if self._any_rank(not bool(torch.isfinite(loss.detach()).all())):
                step = getattr(self, "_step_in_progress", self.rollout_step + 1)
                keys = ", ".join(repr(seqs[i].key) for i in mb)
                self._fail(step, f"the loss is non-finite ({float(loss.detach())}) on the micro-batch of samples "
                                 f"{keys}")
            # exact accumulation: token aggregation weighs by tokens, the others by sequences
            mb_tok = float(mask.sum())
            w = mb_tok / max(1, n_tok) if self.aggregation == "token" else len(mb) / n_seq
            self.manual_backward(loss * w)
            total += float(loss.detach()) * w
            if first:
                stats["clip_fraction"].append(m["clip_fraction"].float().cpu())
                if "kl" in m:
                    stats["kl"].append(m["kl"].float().cpu())
                stats["entropy"].append(torch.cat([e for e in ent]).mean().cpu())
        if self.max_grad_norm:
            self.clip_gradients(opt, gradient_clip_val=float(self.max_grad_norm), gradient_clip_algorithm="norm")
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        return total

    @torch.no_grad()
    def _frozen_logprobs(self, model, seqs, idx) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for s in range(0, len(idx), self.micro_batch_size):
            mb = idx[s:s + self.micro_batch_size]
            lp, _ = sequence_logprobs(model, self.collate, [seqs[i] for i in mb])
            out.update({i: x.detach() for i, x in zip(mb, lp)})
        return out

    def _reference_logprobs(self, seqs, idx) -> dict[int, torch.Tensor]:
        if self.ref_model is not None:
            return self._frozen_logprobs(self.ref_model, seqs, idx)
        with self.model.disable_adapter():  # LoRA: the base model is the reference
            return self._frozen_logprobs(self.model, seqs, idx)

    def _max_reward(self) -> float:
        from urt.rewards import DEFAULT_WEIGHTS

        return float(sum((self.reward_weights or DEFAULT_WEIGHTS).values()))

    def _write_rollouts(self, step, prompts, texts, ids, scores, advantages, keep, valid=None) -> None:
        if self.rollout_dir is None:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        G = self.G
        rank = self.global_rank
        users = [_user_text(self.bundle.tokenizer, p, self.vision_ids) for p in prompts]
        cols: dict[str, list] = {
            "step": [step] * len(texts), "rank": [rank] * len(texts),
            "prompt_key": [prompts[i // G].key for i in range(len(texts))],
            "group": [i // G for i in range(len(texts))], "sample": [i % G for i in range(len(texts))],
            "task": [prompts[i // G].task for i in range(len(texts))],
            "label": [str(prompts[i // G].label) for i in range(len(texts))],
            "prompt": [users[i // G] for i in range(len(texts))], "completion": [t or "" for t in texts],
        }
        for name, vals in scores.items():
            if name.startswith("rewards/"):
                cols[f"reward_{name.split('/', 1)[1]}"] = [float(v) for v in vals]
        cols["reward"] = [float(v) for v in scores["reward"]]
        cols["advantage"] = [float(a) for a in advantages]
        cols["completion_length"] = [len(x) for x in ids]
        cols["kept"] = [bool(k) for k in keep]
        if valid is not None and not bool(valid.all()):  # slots generate left empty have no row
            rows_at = [i for i, t in enumerate(texts) if t is not None]
            cols = {k: [v[i] for i in rows_at] for k, v in cols.items()}
        rows = [cols]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rows = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(rows, cols)
        if rank == 0:
            merged = {k: [v for r in rows for v in r[k]] for k in cols}
            self.rollout_dir.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(merged), self.rollout_dir / f"step-{step:06d}.parquet")

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
        total_steps=st.get("total_steps"), rollout_dir=out / ROLLOUT_DIR if st.get("rollouts", True) else None)

    cbs = stage_callbacks(cfg, bundle, out, callbacks)
    # Manual optimization: clipping (stage.max_grad_norm) and accumulation (micro_batch_size) are ours.
    trainer = instantiate(cfg.trainer, callbacks=cbs, logger=_loggers(cfg, out) or False,
                          default_root_dir=str(out), gradient_clip_val=None, accumulate_grad_batches=1,
                          limit_val_batches=0)
    return bundle, dm, module, trainer, ckpt_path


def run_grpo(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> Path:
    """Fit a GRPO stage from a composed config; returns the final HF folder (`run_dir/hf/final`)."""
    from urt.train import final_hf_dir, run_dir

    bundle, dm, module, trainer, ckpt_path = build_grpo(cfg, callbacks)
    if trainer.is_global_zero:
        (run_dir(cfg) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return final_hf_dir(cfg)
