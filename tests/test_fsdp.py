"""The sharded strategy (trainer=fsdp_cpu: FSDP2 over gloo on 2 CPU processes, fp32) computes what one
process computes on the same global batch, and its checkpoints resume exactly.

- SFT (activation checkpointing on), shards on the device and CPU-offloaded (trainer.strategy.cpu_offload:
  FSDP2's CPUOffloadPolicy, the optimizer stepping on host shards): 2 steps, then a fresh fit resumed from
  the sharded checkpoint folder for a third: every step's loss, full gradient (gathered from the shards) and
  the final weights equal one process's to 1e-6; the gathered hf/ export is a plain transformers folder
  whose logits equal the one-process model's; rank 0's bytes of parameters, gradients and AdamW state are
  the memory plan's (offloaded: all of them the plan's host bytes).
- GRPO (canned rollouts, as tests/test_ddp.py): μ = 2 with clipping on images (qwen2_5_vl), μ = 1 on
  video (qwen3_vl) with a rank that keeps no sequence (so the ranks' forward counts differ and the padding
  passes keep them in lockstep): gradients, losses, updated weights equal one process's; resume repeats the
  uninterrupted run's losses and rewards.
- Negative control: a non-finite loss on one rank stops both at that micro-batch (no hang, no step).
- Generation from the sharded policy (one layer gathered at a time, ranks with different prompt counts in
  lockstep), from an unsharded copy and from a sharded copy filled from an offloaded policy's shards
  (rollout_weights=copy / shard) samples what the full model samples with the same seed.

The 2-process machinery is tests/test_ddp.py's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_ddp import GradDump, _sft_cfg, _sft_shards, run_two_processes
from urt.errors import UrtError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class FullGradDump(GradDump):
    """GradDump whose gradients are the full tensors (gathered from the shards: a collective on every rank)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from urt.models.fsdp import full_tensor

        self.module = pl_module
        self.grads.append({n: full_tensor(p.grad.detach()).clone() for n, p in pl_module.model.named_parameters()
                           if p.requires_grad and p.grad is not None})


class MemoryProbe(GradDump):
    """FullGradDump that also records this rank's bytes of parameters, gradients (at the first optimizer
    step) and optimizer state (after it): what urt.plan counts per rank (tests/test_plan.py compares)."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.bytes: dict[str, int] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from urt.models.fsdp import full_tensor, local_numel

        self.module = pl_module
        self.grads.append({n: full_tensor(p.grad.detach()).clone() for n, p in pl_module.model.named_parameters()
                           if p.requires_grad and p.grad is not None})
        if not self.bytes:
            ps = list(pl_module.model.parameters())
            self.bytes["weights"] = sum(local_numel(p) * p.element_size() for p in ps)
            self.bytes["gradients"] = sum(local_numel(p.grad) * p.grad.element_size() for p in ps if p.grad is not None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from urt.models.fsdp import local_numel

        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if "optimizer" not in self.bytes and trainer.global_step >= 1:
            opt = trainer.optimizers[0]
            self.bytes["optimizer"] = sum(local_numel(v) * v.element_size() for st in opt.state.values()
                                          for v in st.values() if isinstance(v, torch.Tensor))


def _max_diff(a: list[dict], b: list[dict]) -> float:
    assert len(a) == len(b) and a
    out = 0.0
    for ga, gb in zip(a, b):
        assert ga.keys() == gb.keys()
        out = max(out, max(float((ga[k] - gb[k]).abs().max()) for k in ga))
    return out


# ------------------------------------------------------------------------------------------ SFT
SFT_CASES = {"device": (), "offload": ("trainer.strategy.cpu_offload=true",)}


def _sft_worker(rank: int, root: str, shards: str, out: str, case: str) -> None:
    from urt.models.fsdp import is_sharded
    from urt.stages.callbacks import HFExport
    from urt.train import train

    dump = Path(out) / f"fsdp-sft-rank{rank}.pt"
    losses, written = [], []
    probe = {}
    for steps in (2, 3):  # 2 steps, then resumed from checkpoints/last.ckpt (a folder of shards) for a third
        cb = MemoryProbe(dump)
        train(_sft_cfg(Path(root), shards, "fsdp", steps, "trainer=fsdp_cpu", "model.gradient_checkpointing=true",
                       *SFT_CASES[case]), callbacks=[cb])
        model = cb.module.model
        policy = model._get_fsdp_state()._fsdp_param_group.offload_policy if is_sharded(model) else None
        assert type(policy).__name__ == ("CPUOffloadPolicy" if case == "offload" else "OffloadPolicy"), policy
        losses += cb.losses
        probe = probe or cb.bytes
        export = next(c for c in cb.module.trainer.callbacks if isinstance(c, HFExport))
        written.append([str(p) for p in export.written])
        assert cb.module.trainer.global_step == steps
    torch.save({"losses": losses, "written": written, "bytes": probe}, Path(out) / f"fsdp-sft-rank{rank}-info.pt")


@pytest.mark.parametrize("case", sorted(SFT_CASES))
def test_fsdp_sft_two_processes_equal_one(tmp_path, case):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from urt.train import train

    shards = _sft_shards(tmp_path / "shards")
    one = GradDump(tmp_path / "sft-one.pt")
    train(_sft_cfg(tmp_path, shards, "one", 3, "trainer=cpu", "model.gradient_checkpointing=true"), callbacks=[one])

    run_two_processes(_sft_worker, str(tmp_path), shards, str(tmp_path), case)
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
    # the memory plan counts rank 0's shards exactly (parameters, gradients, AdamW state)
    from urt.plan import plan_config

    plan = plan_config(_sft_cfg(tmp_path, shards, "plan", 3, "trainer=fsdp_cpu", *SFT_CASES[case]), "sft", 80 << 30)
    assert plan.setting.strategy == "fsdp" and plan.setting.world == 2 and plan.setting.offload == (case == "offload")
    assert info[0]["bytes"] == {"weights": plan.weights, "gradients": plan.gradients, "optimizer": plan.optimizer}
    # offloaded: every trained shard, its gradient and AdamW state are host bytes (the frozen tower is not)
    frozen_tower = plan.weights - plan.gradients  # fp32 throughout here: trained weights = their gradients
    assert plan.host == (plan.weights - frozen_tower + plan.gradients + plan.optimizer if case == "offload" else 0)
    print(f"fsdp sft {case}: max|dloss|={max(abs(a - b) for a, b in zip(one_steps, two_steps)):.2e} "
          f"max|dgrad|={d_grad:.2e} max|dweight|={d_w:.2e} max|dlogits|={d_logits:.2e}")


# ------------------------------------------------------------------------------------------ GRPO
def _grpo_shards(d: Path, n: int, media: str) -> str:
    """n prompts p-0 … p-{n-1} (labels 1/2) in ONE shard (2 ranks split it by sample: p-0, p-2, … / p-1,
    p-3, …): image-generation pairs, or video-generation pairs of 4-frame clips."""
    from data_fixtures import synthetic_frames, vqa_image
    from urt.data.schema import Sample, Video
    from urt.data.shards import write_shards

    def pair(j):
        if media == "image":
            return [vqa_image(2 * j + 1), vqa_image(2 * j + 2)]
        return [Video(frames=synthetic_frames(4, seed=2 * j + 1), fps=2.0),
                Video(frames=synthetic_frames(4, seed=2 * j + 2), fps=2.0)]

    task = f"{media}_generation"
    out = [Sample(f"p-{j}", task, 1 + j % 2, pair(j), caption=f"clip {j}", source="fixture") for j in range(n)]
    write_shards(out, d, maxcount=n)
    return str(d)


GRPO_CASES = {  # model, media, prompts, plan (completions per prompt key), overrides
    # μ = 2, a sharded reference (beta > 0), clipping, one zero-variance and one short group; 2 rollout steps,
    # the sharded run killed after the first and resumed
    "image_mu2_resume": ("tiny_qwen2_5_vl", "image", 8,
                         {"p-0": "flat", "p-1": "distinct", "p-2": "distinct", "p-3": "short", "p-4": "distinct",
                          "p-5": "distinct", "p-6": "short", "p-7": "flat"},
                         ["stage.num_iterations=2", "stage.loss.beta=0.04", "stage.micro_batch_size=2"]),
    # μ = 1 on video: rank 0 keeps no sequence (its groups all flat) while rank 1 runs 2 mini-batches of 2
    # micro-batches: rank 0's forwards are all padding passes. Padded log-prob batches in both runs: a
    # sharded policy pass with gradients is padded (urt.rl.logprobs), whose pad-token row of the embeddings
    # gets a rounding-noise gradient (~1e-10) where shared prompts give exactly 0, and AdamW turns that
    # into an lr-sized step; the image case compares "auto" layouts (shared prompts in the no-grad passes)
    "video_rank_without_sequences": ("tiny_qwen3_vl", "video", 4,
                                     {"p-0": "flat", "p-1": "distinct", "p-2": "flat", "p-3": "distinct"},
                                     ["stage.micro_batch_size=2", "stage.num_mini_batches=2",
                                      "stage.loss.aggregation=token", "stage.loss.beta=0.04", "stage.collate=padded",
                                      "stage.rollout_weights=copy"]),
    # the policy CPU-offloaded (its shards, gradients and AdamW state on the host; what fits 32B on 8 GPUs),
    # the reference a skeleton filled from the policy's shards, rollout_weights=auto -> a sharded generation
    # copy refreshed shard by shard; μ = 2. trainer.strategy.* applies to the sharded run only
    "image_offload": ("tiny_qwen2_5_vl", "image", 4,
                      {"p-0": "distinct", "p-1": "distinct", "p-2": "short", "p-3": "distinct"},
                      ["stage.num_iterations=2", "stage.loss.beta=0.04", "stage.micro_batch_size=2",
                       "trainer.strategy.cpu_offload=true"]),
}


def _grpo_cfg(root: Path, shards: str, name: str, model: str, *overrides):
    from test_ddp import _grpo_cfg as base

    return base(root, shards, name, f"model={model}", "data.video_max_pixels=3136",
                *overrides)


def _grpo_worker(rank: int, root: str, shards: str, case: str, out: str, run: str = "fsdp", *extra: str) -> None:
    import urt.generation
    from test_ddp import _canned_generate
    from urt.train import train

    model, _, n, plan, overrides = GRPO_CASES[case]
    overrides = [*overrides, *extra]
    urt.generation.generate = _canned_generate(plan)  # this process's monkeypatch
    dump = FullGradDump(Path(out) / f"{run}-grpo-rank{rank}.pt")
    losses = []
    mu = 2 if "stage.num_iterations=2" in overrides else 1
    # 2 prompts per rank and step; resume case: stopped after the first rollout step (μ optimizer steps)
    stops = [f"trainer.max_steps={mu}", "trainer.max_steps=-1"] if n == 8 else ["trainer.max_steps=-1"]
    for stop in stops:
        cb = FullGradDump(dump.path)
        train(_grpo_cfg(Path(root), shards, run, model, "trainer=fsdp_cpu", "data.batch_size=2",
                        "trainer.max_epochs=1", stop, *overrides), callbacks=[cb])
        losses += cb.losses
    module = cb.module
    offload = overrides.count("trainer.strategy.cpu_offload=true") > overrides.count("trainer.strategy.cpu_offload=false")
    # what the run generated from: auto -> a sharded copy when offloaded, else the policy itself
    assert module.rollout_mode == ("shard" if offload else "copy" if "stage.rollout_weights=copy" in overrides
                                   else "gather")
    torch.save({"losses": losses, "steps": module.rollout_step}, Path(out) / f"{run}-grpo-rank{rank}-info.pt")


@pytest.mark.parametrize("case", sorted(GRPO_CASES))
def test_fsdp_grpo_two_processes_equal_one(tmp_path, monkeypatch, case):
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    import urt.generation
    from test_ddp import _canned_generate
    from urt.train import train

    model, media, n, plan, overrides = GRPO_CASES[case]
    shards = _grpo_shards(tmp_path / "shards", n, media)
    monkeypatch.setattr(urt.generation, "generate", _canned_generate(plan))
    one = GradDump(tmp_path / "grpo-one.pt")
    train(_grpo_cfg(tmp_path, shards, "one", model, "trainer=cpu", "data.batch_size=4", "trainer.max_epochs=1",
                    "trainer.max_steps=-1", *[o for o in overrides if not o.startswith("trainer.strategy.")]),
          callbacks=[one])
    assert one.module.rollout_step == n // 4

    run_two_processes(_grpo_worker, str(tmp_path), shards, case, str(tmp_path))
    ranks = [torch.load(tmp_path / f"fsdp-grpo-rank{r}.pt") for r in (0, 1)]
    info = [torch.load(tmp_path / f"fsdp-grpo-rank{r}-info.pt") for r in (0, 1)]
    assert [i["steps"] for i in info] == [n // 4] * 2
    d_grad = _max_diff(one.grads, ranks[0])
    assert d_grad < 1e-6 and _max_diff(ranks[0], ranks[1]) == 0
    assert any(float(g.abs().max()) > 1e-4 for g in one.grads[0].values())
    d_loss = max(abs(a - b) for a, b in zip(info[0]["losses"], one.losses))
    assert len(info[0]["losses"]) == len(one.losses) and d_loss < 1e-6 and info[0]["losses"] == info[1]["losses"]
    # every step's rollouts (rewards, advantages, kept) as one process's, the resumed step's included
    for step in range(1, n // 4 + 1):
        name = f"step-{step:06d}.parquet"
        got, ref = (pq.read_table(tmp_path / "runs" / run / "rollouts" / name).to_pydict() for run in ("fsdp", "one"))
        rows = lambda t: sorted(zip(t["prompt_key"], t["sample"], t["reward"], t["advantage"], t["kept"]))  # noqa: E731
        assert rows(got) == rows(ref), step
    a, b = (load_file(tmp_path / "runs" / run / "hf" / "final" / "model.safetensors") for run in ("one", "fsdp"))
    assert a.keys() == b.keys()
    # AdamW divides by sqrt(v): where the exact gradient is 0 (k_proj.bias: softmax ignores a constant
    # added to every key) the computed one is rounding noise, whose sign AdamW turns into a full lr-sized
    # step; summing over ranks rounds differently from one process, so those few elements differ by up to
    # ~lr x 1e-2. Every other element agrees to 1e-6.
    d_w = max(float((a[k] - b[k]).abs().max()) for k in a)
    off = sum(int(((a[k] - b[k]).abs() > 1e-6).sum()) for k in a)
    where = sorted({k for k in a if float((a[k] - b[k]).abs().max()) > 1e-6})
    if case == "image_offload":
        # CPU offload changes where the shards live, not what is computed: the same sharded run with the
        # shards on the device gives bit-identical losses, gradients and weights (here the few
        # AdamW-amplified elements above reach 1.3e-5 against one process, in both sharded runs alike)
        run_two_processes(_grpo_worker, str(tmp_path), shards, case, str(tmp_path), "device",
                          "trainer.strategy.cpu_offload=false")
        dev = load_file(tmp_path / "runs" / "device" / "hf" / "final" / "model.safetensors")
        assert all(torch.equal(dev[k], b[k]) for k in b)
        assert torch.load(tmp_path / "device-grpo-rank0-info.pt")["losses"] == info[0]["losses"]
        assert _max_diff(torch.load(tmp_path / "device-grpo-rank0.pt"), ranks[0]) == 0
        assert off <= 1e-4 * sum(v.numel() for v in a.values()), (d_w, off, where)
    else:
        assert d_w < 1e-5 and off <= 1e-4 * sum(v.numel() for v in a.values()), (d_w, off, where)
    print(f"fsdp grpo {case}: max|dloss|={d_loss:.2e} max|dgrad|={d_grad:.2e} max|dweight|={d_w:.2e} "
          f"({off} elements > 1e-6)")


# ------------------------------------------------------------------------------------------ generation
def _generate_worker(rank: int, out: str) -> None:
    import copy

    from torch.distributed.device_mesh import init_device_mesh

    from data_fixtures import four_task_samples
    from urt.data.encode import SampleEncoder
    from urt.generation import GenerationConfig, generate
    import dataclasses
    import time

    from urt.models.fsdp import (frozen_skeleton, generation_copy, is_sharded, materialize_from,
                                 refresh_generation_copy, refresh_sharded_copy, shard_model)
    from urt.models import load_model

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same weights on both ranks, as a seeded trainer loads them
    bundle = load_model("tiny", family="qwen2_5_vl")  # vision tower frozen (replicated), as the paper trains
    full = copy.deepcopy(bundle)
    gen_copy = generation_copy(bundle.model, None)  # rollout_weights=copy: made before sharding
    with torch.no_grad():
        for p in gen_copy.parameters():
            p.zero_()  # stale weights: the refresh must bring the policy's
    skeleton = frozen_skeleton(bundle.model)  # rollout_weights=shard: made before sharding, no memory
    assert all(p.is_meta for p in skeleton.parameters())
    mesh = init_device_mesh("cpu", (2,))
    # the policy offloaded (CPUOffloadPolicy): the sharded copy is what decodes, filled from its shards
    shard_model(bundle.model, "qwen2_5_vl", mesh, param_dtype=None, reduce_dtype=None, offload=True)
    shard_model(skeleton, "qwen2_5_vl", mesh, param_dtype=None, reduce_dtype=None, offload=True)
    materialize_from(skeleton, bundle.model, "cpu")
    assert is_sharded(bundle.model) and not is_sharded(full.model)
    with torch.no_grad():
        for p in skeleton.parameters():
            if not p.requires_grad and type(p).__name__ == "DTensor":
                p.to_local().zero_()  # stale shards: the refresh must bring the policy's
    refresh_sharded_copy(skeleton, bundle.model)
    # on a GPU the copy (and GRPO's reference) is bf16: each rank's shard is its fp32 shard rounded, buffers
    # (rotary inv_freq) and the replicated tower copied whole
    half = frozen_skeleton(full.model)
    shard_model(half, "qwen2_5_vl", mesh, param_dtype="bf16", reduce_dtype=None)
    materialize_from(half, bundle.model, "cpu")
    src = dict(bundle.model.named_parameters())
    for name, q in half.named_parameters():
        local = lambda t: t.to_local() if type(t).__name__ == "DTensor" else t  # noqa: E731
        assert q.dtype == torch.bfloat16 and torch.equal(local(q), local(src[name]).detach().to(torch.bfloat16)), name
    bufs = dict(bundle.model.named_buffers())
    assert all(torch.equal(b, bufs[n].to(b.dtype)) for n, b in half.named_buffers())
    enc = SampleEncoder(bundle.processor, "qwen2_5_vl", mode="prompt")
    ps = [enc(s) for s in four_task_samples(video_data=False)]
    # rank 0: 3 prompts (2 generate calls of 2), rank 1: 1 prompt (1 call, then a padding call)
    mine = ps[:3] if rank == 0 else ps[3:]
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, num_return_sequences=2, batch_size=2, seed=7 + rank,
                           lockstep=True)
    t0 = time.perf_counter()
    sharded = generate(bundle, mine, cfg, pad_prompt=ps[0])
    t1 = time.perf_counter()
    refresh_generation_copy(gen_copy, bundle.model)
    copied = generate(dataclasses.replace(bundle, model=gen_copy), mine, dataclasses.replace(cfg, lockstep=False))
    t2 = time.perf_counter()
    shard_copy = generate(dataclasses.replace(bundle, model=skeleton), mine, cfg, pad_prompt=ps[0])
    reference = generate(full, mine, dataclasses.replace(cfg, lockstep=False))
    ids = lambda gs: [[list(c.ids) for c in g] for g in gs]  # noqa: E731
    torch.save({"sharded": ids(sharded), "copy": ids(copied), "full": ids(reference), "shard": ids(shard_copy),
                "seconds": (t1 - t0, t2 - t1),
                "copy_bytes": sum(p.numel() * p.element_size() for p in gen_copy.parameters())},
               Path(out) / f"gen-rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_generation_from_the_sharded_policy_equals_the_full_model(tmp_path):
    """Rollouts from the sharded policy (each layer gathered for its forward, the ranks' generate calls and
    decode steps in lockstep although rank 1 has one prompt and rank 0 three), and from a generation copy
    refreshed from the shards (stage.rollout_weights=copy), sample exactly what the full model samples with
    the same seed."""
    run_two_processes(_generate_worker, str(tmp_path))
    for r in (0, 1):
        got = torch.load(tmp_path / f"gen-rank{r}.pt")
        assert len(got["sharded"]) == (3 if r == 0 else 1)
        assert got["sharded"] == got["full"] == got["copy"] == got["shard"]
        assert any(g[0] != g[1] for g in got["sharded"])  # really sampled
        print(f"rank {r}: gather {got['seconds'][0]:.2f} s, refresh + copy {got['seconds'][1]:.2f} s, "
              f"copy {got['copy_bytes'] / 2**20:.1f} MiB")


# ------------------------------------------------------------------------------------------ negative control
def _nonfinite_worker(rank: int, root: str, shards: str, out: str) -> None:
    import urt.generation
    from test_ddp import _canned_generate
    from urt.rl.objective import PolicyLoss
    from urt.train import train

    urt.generation.generate = _canned_generate({f"p-{j}": "distinct" for j in range(4)})
    if rank == 1:  # only rank 1's loss is non-finite: rank 0 must stop at the same micro-batch, not hang
        real = PolicyLoss.__call__
        PolicyLoss.__call__ = lambda self, *a, **k: (lambda l, m: (l * float("inf"), m))(*real(self, *a, **k))
    cfg = _grpo_cfg(Path(root), shards, "nan", "tiny_qwen2_5_vl", "trainer=fsdp_cpu", "data.batch_size=2",
                    "trainer.max_steps=1", "stage.micro_batch_size=2")
    try:
        train(cfg)
        msg = "no error"
    except UrtError as e:
        msg = str(e)
    Path(out, f"nan-rank{rank}.txt").write_text(msg)


def test_fsdp_grpo_nonfinite_loss_on_one_rank_stops_both(tmp_path):
    """A non-finite micro-batch loss on rank 1 only: both ranks stop before any backward of that
    micro-batch and any optimizer step, with the failed-step checkpoint saved (a collective), no hang."""
    shards = _grpo_shards(tmp_path / "shards", 4, "image")
    run_two_processes(_nonfinite_worker, str(tmp_path), shards, str(tmp_path))
    msgs = [(tmp_path / f"nan-rank{r}.txt").read_text() for r in (0, 1)]
    assert "loss is non-finite on a micro-batch of another rank" in msgs[0]
    assert "loss is non-finite (-inf) on the micro-batch of samples" in msgs[1] and "p-1#" in msgs[1]
    assert (tmp_path / "runs" / "nan" / "checkpoints" / "failed-step-000001.ckpt").is_dir()


# ------------------------------------------------------------------------------------------ loading
def _bf16_checkpoint(d: Path) -> str:
    """A tiny Qwen2.5-VL checkpoint folder stored in bf16, as the released checkpoints are."""
    from urt.models import load_model, save_pretrained

    torch.manual_seed(0)
    bundle = load_model("tiny", family="qwen2_5_vl")
    bundle.model.to(torch.bfloat16)
    save_pretrained(bundle, d)
    return str(d)


def _load_worker(rank: int, root: str, shards: str, ckpt: str, out: str) -> None:
    from torch.distributed.tensor import DTensor

    from urt.train import train

    cb = FullGradDump(Path(out) / f"load-rank{rank}.pt")
    train(_sft_cfg(Path(root), shards, "fsdp_bf16", 2, "trainer=fsdp_cpu", f"model.name_or_path={ckpt}",
                   "model.dtype=float32"), callbacks=[cb])
    module = cb.module
    assert module.bundle.master_dtype == torch.float32  # loaded in bf16, cast unit by unit while sharding
    # the node's first rank read the weights; the other built the architecture on meta and received them
    assert module.bundle.from_rank0 == (rank == 1)
    trained = [p for p in module.model.parameters() if p.requires_grad]
    assert trained and all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in trained)
    torch.save({"losses": cb.losses}, Path(out) / f"load-rank{rank}-info.pt")


def test_fsdp_loads_the_checkpoint_dtype_and_casts_while_sharding(tmp_path):
    """Under the sharded strategy a bf16 checkpoint with model.dtype=float32 is read in bf16 by the node's
    first rank only (the other builds it on the meta device and receives rank 0's weights, buffers
    included, once sharded) and each unit cast to fp32 just before it is sharded: the run equals one
    process that loaded the checkpoint in fp32 (losses and gradients to 1e-6, the same hf/ export)."""
    from test_ddp import GradDump
    from urt.train import train

    shards = _sft_shards(tmp_path / "shards")
    ckpt = _bf16_checkpoint(tmp_path / "ckpt")
    one = GradDump(tmp_path / "load-one.pt")
    train(_sft_cfg(tmp_path, shards, "one_fp32", 2, "trainer=cpu", f"model.name_or_path={ckpt}",
                   "model.dtype=float32"), callbacks=[one])
    assert one.module.bundle.master_dtype is None  # one process: loaded in fp32 as configured
    run_two_processes(_load_worker, str(tmp_path), shards, ckpt, str(tmp_path))
    info = [torch.load(tmp_path / f"load-rank{r}-info.pt") for r in (0, 1)]
    one_steps = [one.losses[2 * s] + one.losses[2 * s + 1] for s in range(2)]
    two_steps = [(a + b) / 2 for a, b in zip(info[0]["losses"], info[1]["losses"])]
    assert max(abs(a - b) for a, b in zip(one_steps, two_steps)) < 1e-6
    assert _max_diff(one.grads, torch.load(tmp_path / "load-rank0.pt")) < 1e-6
    # hf/ says and holds what the fp32-loaded run's says and holds
    import json

    from safetensors.torch import load_file

    a, b = (tmp_path / "runs" / run / "hf" / "final" for run in ("one_fp32", "fsdp_bf16"))
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert (ca["dtype"], ca["text_config"]["dtype"]) == (cb["dtype"], cb["text_config"]["dtype"]) == ("float32",) * 2
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(wa[k].dtype == wb[k].dtype for k in wa)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


# ------------------------------------------------------------------------------------------ real rollouts
def even_share(completion, solution, **_) -> float:
    """A reward random completions differ in (the share of even sampled ids): every group has a spread."""
    ids = list(completion.ids)
    return sum(i % 2 == 0 for i in ids) / max(1, len(ids))


def _rollout_worker(rank: int, root: str, shards: str, mode: str) -> None:
    from urt.train import train

    cb = FullGradDump(Path(root) / f"roll-{mode}-rank{rank}.pt")
    train(_grpo_cfg(Path(root), shards, f"roll_{mode}", "tiny_qwen2_5_vl", "trainer=fsdp_cpu",
                    "trainer.strategy.cpu_offload=true", f"stage.rollout_weights={mode}", "data.batch_size=2",
                    "trainer.max_epochs=1", "trainer.max_steps=-1", "stage.filter_zero_variance=false",
                    "stage.max_new_tokens=8", "stage.temperature=1.0", "+reward.weights.even=1.0",
                    "+reward.components.even={_target_: test_fsdp.even_share, _partial_: true}",
                    "stage.micro_batch_size=3"), callbacks=[cb])
    assert cb.module.rollout_mode == mode and cb.module.rollout_step == 2
    assert (mode == "shard") == (cb.module.generation_model is not None)


def test_offloaded_grpo_rollouts_from_the_sharded_copy_equal_the_policys_own(tmp_path):
    """Real generation, 2 rollout steps, the policy CPU-offloaded: rollouts sampled from the bf16-style
    sharded copy (rollout_weights=shard, refreshed after each optimizer step) are the rollouts sampled from
    the policy's own shards (gather), token for token at both steps, and the runs train alike."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    shards = _grpo_shards(tmp_path / "shards", 8, "image")
    for mode in ("gather", "shard"):
        run_two_processes(_rollout_worker, str(tmp_path), shards, mode)
    for step in (1, 2):
        name = f"step-{step:06d}.parquet"
        a, b = (pq.read_table(tmp_path / "runs" / f"roll_{m}" / "rollouts" / name).to_pydict() for m in ("gather", "shard"))
        rows = lambda t: sorted(zip(t["sample_key"], t["completion"], t["reward"], t["advantage"]))  # noqa: E731
        assert rows(a) == rows(b), step
        assert len(set(a["completion"])) > 1 and any(x != 0 for x in a["advantage"])  # sampled, and trained on
    wa, wb = (load_file(tmp_path / "runs" / f"roll_{m}" / "hf" / "final" / "model.safetensors") for m in ("gather", "shard"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_each_rank_loads_onto_its_own_gpu(monkeypatch):
    """model.device=auto in a multi-process launch is the local rank's GPU (torchrun / Lightning set
    LOCAL_RANK, srun SLURM_LOCALID before the trainer sets the device): not every rank's copy on GPU 0.
    Under the sharded strategy the model is read into host memory instead (the strategy moves each unit's
    shards to the GPU), with the attention chosen for the GPU."""
    from omegaconf import OmegaConf

    from urt.models.bundle import resolve_device
    from urt.stages.sharded import load_settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("SLURM_LOCALID", "5")
    assert resolve_device("auto") == torch.device("cuda", 5)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3) and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "9")  # one GPU visible per task: its own device
    monkeypatch.delenv("SLURM_LOCALID")
    assert resolve_device("auto") == torch.device("cuda", 0)

    fsdp = OmegaConf.create({"strategy": {"_target_": "urt.stages.sharded.ShardedStrategy"}})
    ddp = OmegaConf.create({"strategy": "ddp"})
    model = {"name_or_path": "Qwen/Qwen3-VL-32B-Instruct", "device": "auto", "dtype": "float32",
             "attn_implementation": "auto"}
    kwargs, master = load_settings(model, fsdp)
    assert kwargs["device"] == "cpu" and kwargs["dtype"] == "auto" and master == torch.float32
    assert kwargs["attn_implementation"] != "auto"  # chosen for the GPU, not for the host it is read into
    assert load_settings(model, ddp) == (model, None)
    assert load_settings({**model, "device": "cuda:1"}, fsdp)[0]["device"] == "cuda:1"  # an explicit device stays


def _meta_grpo_worker(rank: int, root: str, shards: str, ckpt: str) -> None:
    import urt.generation
    from test_ddp import _canned_generate
    from urt.train import train

    urt.generation.generate = _canned_generate({f"p-{j}": "distinct" for j in range(4)})
    cb = FullGradDump(Path(root) / f"meta-grpo-rank{rank}.pt")
    train(_grpo_cfg(Path(root), shards, "fsdp_meta", "tiny_qwen2_5_vl", *META_GRPO, "trainer=fsdp_cpu",
                    "data.batch_size=2", f"model.name_or_path={ckpt}"), callbacks=[cb])
    module = cb.module
    assert module.bundle.from_rank0 == (rank == 1) and module.rollout_mode == "copy"
    assert not any(p.is_meta for m in (module.model, module.ref_model, module.generation_model) for p in m.parameters())
    torch.save({"losses": cb.losses}, Path(root) / f"meta-grpo-rank{rank}-info.pt")


META_GRPO = ("model.dtype=float32", "stage.loss.beta=0.04", "stage.rollout_weights=copy", "stage.micro_batch_size=2",
             "trainer.max_epochs=1", "trainer.max_steps=-1")


def test_fsdp_grpo_from_a_meta_built_policy_equals_one_process(tmp_path, monkeypatch):
    """GRPO from a checkpoint folder where rank 1 built the policy on the meta device: its reference
    (a skeleton filled from the policy's shards) and its generation copy (rollout_weights=copy) are built
    from the meta policy and get rank 0's weights; the per-step losses and gradients equal one process's."""
    import urt.generation
    from test_ddp import GradDump, _canned_generate
    from urt.train import train

    shards = _grpo_shards(tmp_path / "shards", 4, "image")
    ckpt = _bf16_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(urt.generation, "generate", _canned_generate({f"p-{j}": "distinct" for j in range(4)}))
    one = GradDump(tmp_path / "meta-one.pt")
    train(_grpo_cfg(tmp_path, shards, "one_meta", "tiny_qwen2_5_vl", *META_GRPO, "trainer=cpu", "data.batch_size=4",
                    f"model.name_or_path={ckpt}"), callbacks=[one])
    run_two_processes(_meta_grpo_worker, str(tmp_path), shards, ckpt)
    got = torch.load(tmp_path / "meta-grpo-rank0-info.pt")["losses"]
    assert len(got) == len(one.losses) and max(abs(a - b) for a, b in zip(got, one.losses)) < 1e-6
    assert _max_diff(one.grads, torch.load(tmp_path / "meta-grpo-rank0.pt")) < 1e-6

