"""The sharded strategy (trainer=fsdp_cpu: FSDP2 over gloo on 2 CPU processes, fp32) computes what one
process computes on the same global batch, and its checkpoints resume exactly.

- SFT: 2 steps, killed (a fresh process), resumed from the sharded checkpoint folder for a third: every
  step's loss, full gradient (gathered from the shards) and the final weights equal one process's to 1e-6;
  the gathered hf/ export is a plain transformers folder whose logits equal the one-process model's.
- GRPO (canned rollouts, as tests/test_ddp.py): μ = 2 with clipping on images (qwen2_5_vl), μ = 1 on
  video (qwen3_vl) with a rank that keeps no sequence (so the ranks' forward counts differ and the padding
  passes keep them in lockstep): gradients, losses, updated weights equal one process's; resume repeats the
  uninterrupted run's losses and rewards.
- Generation from the sharded policy (one layer gathered at a time, ranks with different prompt counts in
  lockstep) samples what the full model samples with the same seed.

The 2-process machinery is tests/test_ddp.py's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_ddp import GradDump, _sft_cfg, _sft_shards, run_two_processes

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class FullGradDump(GradDump):
    """GradDump whose gradients are the full tensors (gathered from the shards: a collective on every rank)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from urt.models.fsdp import full_tensor

        self.module = pl_module
        self.grads.append({n: full_tensor(p.grad.detach()).clone() for n, p in pl_module.model.named_parameters()
                           if p.requires_grad and p.grad is not None})


def _max_diff(a: list[dict], b: list[dict]) -> float:
    assert len(a) == len(b) and a
    out = 0.0
    for ga, gb in zip(a, b):
        assert ga.keys() == gb.keys()
        out = max(out, max(float((ga[k] - gb[k]).abs().max()) for k in ga))
    return out


# ------------------------------------------------------------------------------------------ SFT
def _sft_worker(rank: int, root: str, shards: str, out: str) -> None:
    from urt.stages.base import HFExport
    from urt.train import train

    dump = Path(out) / f"fsdp-sft-rank{rank}.pt"
    losses, written = [], []
    for steps in (2, 3):  # 2 steps, then resumed from checkpoints/last.ckpt (a folder of shards) for a third
        cb = FullGradDump(dump)
        train(_sft_cfg(Path(root), shards, "fsdp", steps, "trainer=fsdp_cpu"), callbacks=[cb])
        losses += cb.losses
        export = next(c for c in cb.module.trainer.callbacks if isinstance(c, HFExport))
        written.append([str(p) for p in export.written])
        assert cb.module.trainer.global_step == steps
    torch.save({"losses": losses, "written": written}, Path(out) / f"fsdp-sft-rank{rank}-info.pt")


def test_fsdp_sft_two_processes_equal_one(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from urt.train import train

    shards = _sft_shards(tmp_path / "shards")
    one = GradDump(tmp_path / "sft-one.pt")
    train(_sft_cfg(tmp_path, shards, "one", 3, "trainer=cpu"), callbacks=[one])

    run_two_processes(_sft_worker, str(tmp_path), shards, str(tmp_path))
    info = [torch.load(tmp_path / f"fsdp-sft-rank{r}-info.pt") for r in (0, 1)]
    ranks = [torch.load(tmp_path / f"fsdp-sft-rank{r}.pt") for r in (0, 1)]
    # one process: 2 accumulated micro-batches, each loss already / 2; 2 ranks: the mean of their losses
    one_steps = [one.losses[2 * s] + one.losses[2 * s + 1] for s in range(3)]
    two_steps = [(a + b) / 2 for a, b in zip(info[0]["losses"], info[1]["losses"])]
    assert max(abs(a - b) for a, b in zip(one_steps, two_steps)) < 1e-6
    d_grad = _max_diff(one.grads, ranks[0])
    assert d_grad < 1e-6 and _max_diff(ranks[0], ranks[1]) == 0
    assert any(float(g.abs().max()) > 1e-4 for g in one.grads[0].values())  # not a comparison of zeros

    # the sharded checkpoint is a folder of per-rank shards; hf/final a plain folder written by rank 0
    ckpt = tmp_path / "runs" / "fsdp" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and any(p.suffix == ".distcp" for p in ckpt.iterdir())
    final = tmp_path / "runs" / "fsdp" / "hf" / "final"
    assert [len(w) for w in info[1]["written"]] == [0, 0] and [len(w) for w in info[0]["written"]] == [1, 1]
    a, b = load_file(tmp_path / "runs" / "one" / "hf" / "final" / "model.safetensors"), \
        load_file(final / "model.safetensors")
    assert a.keys() == b.keys(), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    d_w = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert d_w < 1e-6
    # plain transformers loads it and gives the one-process model's logits
    m1 = AutoModelForImageTextToText.from_pretrained(tmp_path / "runs" / "one" / "hf" / "final").eval()
    m2 = AutoModelForImageTextToText.from_pretrained(final).eval()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        d_logits = float((m1(input_ids=ids).logits - m2(input_ids=ids).logits).abs().max())
    assert d_logits < 1e-5
    print(f"fsdp sft: max|dloss|={max(abs(a - b) for a, b in zip(one_steps, two_steps)):.2e} "
          f"max|dgrad|={d_grad:.2e} max|dweight|={d_w:.2e} max|dlogits|={d_logits:.2e}")
