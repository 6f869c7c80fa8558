"""Supervised fine-tuning: stage 1 (cold start on teacher CoTs) and stage 2 (rejection-sampled CoTs).

Both stages are this one LightningModule with different configs (docs/method.md §Stages): next-token
cross-entropy on the assistant tokens only, AdamW (lr 2.5e-6, weight decay 0), cosine schedule with 3 %
linear warmup, bf16, gradient checkpointing, only the language model trained (the model config's freeze
flags). The optimiser and scheduler are Hydra partials (`conf/optimizer`, `conf/scheduler`) bound in
`configure_optimizers`; precision and gradient accumulation are the Trainer's.

**Loss.** Labels come from the encoder (`urt.data.encode`): -100 everywhere except the target tokens
and the closing `<|im_end|>`; they are *unshifted* (HF convention), and the collator sets the first label
of every sample to -100, so in a packed row no position predicts the next sample's first token. We
compute the loss ourselves: position t predicts label t+1; only positions whose next label is supervised
are projected onto the vocabulary (`logits_to_keep` as a boolean mask, so a 13k-token multimodal prompt
does not materialise 13k x 152k logits), cross-entropy in fp32, mean over the supervised tokens of the
micro-batch. With gradient accumulation / DDP the step loss is the mean of the micro-batches' token
means (Lightning's convention), not a token mean over the whole effective batch.

**Logged** (every `trainer.log_every_n_steps`): `train/loss`, `train/lr`, `train/tokens_per_s` (input
tokens, padding excluded, per second of wall time per device), `train/supervised_tokens`; per validation:
`val/loss` (token-weighted over the whole val set, a torchmetrics MeanMetric) and, every
`gen_eval.every_n_epochs` validations, `val/gen_accuracy` and `val/gen_format_rate` from greedy
generation on held-out samples (urt.generation.generate + urt.prompts.parse_output).
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torchmetrics import MeanMetric

from urt.data.collate import model_inputs
from urt.data.encode import supervised_mask
from urt.errors import UrtError
from urt.models.compat import forward_takes
from urt.stages.base import (StageModule, StageParts, accumulation, instantiate_module, make_trainer,
                             optimizer_partials, start)
from urt.stages.callbacks import stage_callbacks

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ schedule
def _cosine_lambda(step: int, *, warmup: int, total: int, min_lr_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, *, num_training_steps: int, warmup_ratio: float = 0.03,
                       warmup_steps: int | None = None, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 then cosine decay to `min_lr_ratio * lr` at `num_training_steps` (the
    transformers `get_cosine_schedule_with_warmup` shape, as the paper's HF Trainer). Warmup steps:
    `warmup_steps`, else `ceil(warmup_ratio * num_training_steps)` (HF Trainer's rule)."""
    total = int(num_training_steps)
    if total < 1:
        raise UrtError(f"num_training_steps must be >= 1, got {num_training_steps}")
    warm = int(warmup_steps) if warmup_steps is not None else math.ceil(float(warmup_ratio) * total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(_cosine_lambda, warmup=warm, total=total, min_lr_ratio=float(min_lr_ratio)))


# ------------------------------------------------------------------------------------------ loss
def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loss from full (B, L, V) logits: mean CE (fp32) over supervised next-token positions,
    and their count. `SFTModule` computes the same from the selected positions only."""
    mask = supervised_mask(labels)
    targets = labels[:, 1:][mask[:, :-1]]
    n = mask.sum()
    if n == 0:
        return logits.sum() * 0.0, n
    return F.cross_entropy(logits[mask].float(), targets, reduction="sum") / n, n


class SFTModule(StageModule):
    """Assistant-only next-token SFT of a `ModelBundle` (see the module docstring).

    Args:
        bundle: the `urt.models.ModelBundle` (its `model` is trained; trainable = requires_grad).
        optimizer: a partial taking the parameters (`conf/optimizer/adamw.yaml`).
        scheduler: a partial taking (optimizer, num_training_steps=...) (`conf/scheduler/cosine.yaml`),
            stepped every optimizer step; None: constant lr.
        total_steps: optimizer steps the schedule spans; None: `trainer.max_steps` when set, else
            epochs x batches per epoch from the shard index (÷ accumulation and world size), else
            `trainer.estimated_stepping_batches`.
        selected_logits: project only the supervised positions onto the vocabulary (memory); False:
            full logits (reference / models without `logits_to_keep`).
        gen_eval: None, or a dict: every_n_epochs (validations between generation evals; 0 = off),
            max_samples, max_new_tokens, batch_size. Uses the val shards, prompt-mode encoding.
    """

    def __init__(self, bundle, optimizer: Callable | None = None, scheduler: Callable | None = None, *,
                 total_steps: int | None = None, selected_logits: bool = True, gen_eval: dict | None = None):
        super().__init__(bundle, optimizer, scheduler, total_steps=total_steps)
        self.selected_logits = bool(selected_logits) and forward_takes(self.model, "logits_to_keep")
        self.gen_eval = dict(gen_eval or {})
        self.val_loss = MeanMetric()
        self._t_last: float | None = None
        self._tokens = 0

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning refuses norm clipping through gradient_clip_val under FSDP: the sharded module clips itself
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.strategy.model.clip_grad_norm_(float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -------------------------------------------------------------------------------------- steps
    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, number of supervised tokens) of a collated batch."""
        labels = batch["labels"]
        inputs = model_inputs(batch)
        if self.selected_logits:
            mask = supervised_mask(labels)
            out = self.model(**inputs, use_cache=False, logits_to_keep=mask)
            logits = out.logits.reshape(-1, out.logits.shape[-1])
            targets = labels[:, 1:][mask[:, :-1]]
            n = mask.sum()
            if n == 0:
                return logits.sum() * 0.0, n
            return F.cross_entropy(logits.float(), targets, reduction="sum") / n, n
        out = self.model(**inputs, use_cache=False)
        return token_ce(out.logits, labels)

    def model_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self(batch)

    def _input_tokens(self, batch: dict) -> int:
        am = batch.get("attention_mask")
        return int(am.sum()) if am is not None else int(batch["input_ids"].numel())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n = self.model_step(batch)
        bs = len(batch.get("keys", [])) or int(batch["input_ids"].shape[0])
        self._tokens += self._input_tokens(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=bs)
        self.log("train/supervised_tokens", n.float(), on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._t_last is None:
            self._t_last = time.perf_counter()

    def on_before_optimizer_step(self, optimizer) -> None:
        now = time.perf_counter()
        dt = now - (self._t_last or now)
        if dt > 0:
            self.log("train/tokens_per_s", self._tokens / dt, on_step=True, on_epoch=False)
        self._t_last, self._tokens = now, 0
        self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False, prog_bar=True)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n = self.model_step(batch)
        if n > 0:
            self.val_loss.update(loss.detach(), weight=n.float())
        return loss

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=False)
        self.val_loss.reset()
        every = int(self.gen_eval.get("every_n_epochs") or 0)
        if every > 0 and not self.trainer.sanity_checking and (self.trainer.current_epoch + 1) % every == 0:
            for k, v in self.generation_metrics().items():
                self.log(f"val/{k}", v)

    def generation_metrics(self) -> dict[str, float]:
        """Greedy generation on up to `gen_eval.max_samples` val samples (prompt mode): accuracy (parsed
        winner == label) and format rate (`<think>…</think><answer>…</answer>`)."""
        from torchmetrics import MeanMetric as _Mean

        from urt.data.encode import SampleEncoder
        from urt.data.shards import read_shards
        from urt.generation import GenerationConfig, generate
        from urt.prompts import parse_output

        dm = self.trainer.datamodule
        cfg = self.gen_eval
        enc = SampleEncoder(self.bundle.processor, self.bundle.family, template_set=dm.template_set, mode="prompt",
                            max_length=dm.max_length)
        prompts, samples = [], []
        for s in read_shards(dm.val_shards, on_error="skip", **dm.load_opts):
            if dm.tasks and s.task not in dm.tasks:
                continue
            try:
                prompts.append(enc(s))
            except UrtError:
                continue
            samples.append(s)
            if len(samples) >= int(cfg.get("max_samples", 64)):
                break
        if not samples:
            return {}
        was_training = self.model.training
        self.model.eval()
        try:
            outs = generate(self.bundle, prompts, GenerationConfig(
                max_new_tokens=int(cfg.get("max_new_tokens", 1024)), temperature=0.0,
                batch_size=int(cfg.get("batch_size", 8))))
        finally:
            self.model.train(was_training)
        acc, fmt = _Mean(), _Mean()
        for s, texts in zip(samples, outs):
            j = parse_output(texts[0], s.task)
            acc.update(float(j.winner == s.label))
            fmt.update(float(j.format_ok))
        return {"gen_accuracy": float(acc.compute()), "gen_format_rate": float(fmt.compute())}

    # -------------------------------------------------------------------------------------- schedule
    def steps_per_epoch(self, batches_per_rank: int) -> int:
        return math.ceil(batches_per_rank / self.trainer.accumulate_grad_batches)

    def unknown_schedule_steps(self) -> int:
        est = self.trainer.estimated_stepping_batches
        if not math.isfinite(est):
            return super().unknown_schedule_steps()
        return int(est)


# ------------------------------------------------------------------------------------------ build
def build(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> StageParts:
    """The SFT stage's parts from a composed config (cfg.model, cfg.data, cfg.stage, cfg.optimizer,
    cfg.scheduler, cfg.trainer, cfg.logger); nothing is fitted yet."""
    out, ckpt_path, bundle = start(cfg, given=("bundle", "optimizer", "scheduler"))
    dm = instantiate(cfg.data)
    dm.attach(bundle)
    module = instantiate_module(cfg, bundle=bundle, **optimizer_partials(cfg))
    extra = {}
    acc = accumulation(cfg)
    if acc is not None:
        extra["accumulate_grad_batches"] = acc
    trainer = make_trainer(cfg, out, stage_callbacks(cfg, bundle, out, callbacks), **extra)
    return StageParts(bundle, dm, module, trainer, ckpt_path)
