"""Several processes: DDP over gloo on 2 CPU processes (trainer=ddp_cpu) computes what one process computes
on the same global batch.

- GRPO: the gradients of every optimizer step equal the single-process run's (atol 1e-6) while the ranks
  hold different numbers of kept sequences — a zero-variance group filtered on one rank and a short group on
  the other, or no kept sequence at all on one rank (token aggregation, two mini-batches, unequal
  micro-batch counts); rollouts are sharded by prompt, a group never split; the one shard of 5 prompts
  splits by sample (3 / 2) and the epoch ends for both ranks together, the extra prompt counted.
- SFT: `urt.train.train` for 2 steps, then resumed for a third: every step's gradient and the final
  weights equal one process accumulating the same samples; the HF folder is written by rank 0 only.
- The data module's rank split (by shard / by sample) and the equal batch counts, simulated in threads;
  the trainer configs build their strategies; the FSDP layer classes exist in every family's model.

The 2-process runs are started by the test itself (torch.multiprocessing, fork): each process sets the
environment a launcher would (LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), so Lightning joins the group
instead of starting processes; a hang fails the test after a deadline instead of blocking the suite.
"""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from data_fixtures import vqa_image
from urt.data.schema import Sample
from urt.data.shards import write_shards

DEADLINE_S = 240  # a 2-process run takes ~15 s here; past this it hangs


pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models: one thread beats two on 2 cores


# ------------------------------------------------------------------------------------------ processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, args: tuple) -> None:
    # what torchrun / srun would set: Lightning then joins this process group instead of launching
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fn(rank, *args)


def run_two_processes(fn, *args) -> None:
    """fn(rank, *args) in 2 spawned processes; a failure in either re-raises here, a hang fails."""
    import torch.multiprocessing as mp

    # fork: the children start with torch, transformers and urt already imported (spawn re-imports them:
    # ~10 s per run on a busy 2-core machine); nothing here has started a thread pool that forking breaks
    ctx = mp.start_processes(_entry, args=(fn, _free_port(), args), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the 2-process run did not finish within {DEADLINE_S} s (a collective hangs)")


class GradDump(Callback):
    """The gradient of every optimizer step (as the optimizer sees it) and the step's loss, saved to
    `path` when fit ends (appending to what an earlier fit of the same process saved)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.grads: list[dict[str, torch.Tensor]] = torch.load(self.path) if self.path.exists() else []
        self.losses: list[float] = []
        self.module = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.module = pl_module
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()
                           if p.requires_grad and p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_train_end(self, trainer, pl_module):
        torch.save(self.grads, self.path)


def assert_same_grads(a: list[dict], b: list[dict], atol: float = 1e-6):
    assert len(a) == len(b) and a, (len(a), len(b))
    for step, (ga, gb) in enumerate(zip(a, b)):
        assert ga.keys() == gb.keys(), step
        for name in ga:
            torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=1e-5, msg=f"step {step}: {name}")
    assert any(float(g.abs().max()) > 1e-4 for g in a[0].values())  # not a comparison of zeros


# ------------------------------------------------------------------------------------------ GRPO
def _prompt_shards(d: Path, n: int) -> str:
    """n image-generation prompts p-0 … p-{n-1} (labels 1/2) in ONE shard: on 2 ranks the shards do not
    divide evenly, so the ranks split it by sample (p-0, p-2, p-4 / p-1, p-3)."""
    out = [Sample(f"p-{j}", "image_generation", 1 + j % 2, [vqa_image(2 * j + 1), vqa_image(2 * j + 2)],
                  caption=f"picture {j}", source="fixture") for j in range(n)]
    write_shards(out, d, maxcount=n)
    return str(d)


def _completions(kind: str, answer: str) -> list[str]:
    """Canned completions with paper rewards (format + accuracy): distinct = 2, 1, 0; flat = all 0 (a
    zero-variance group); short = 2 of the 3 completions (a short group)."""
    distinct = [f"<think>a</think><answer>{answer}</answer>", "<think>b</think><answer>x</answer>", "plain words"]
    return {"distinct": distinct, "flat": ["none", "none", "none"], "short": distinct[:2]}[kind]


def _canned_generate(plan: dict[str, str]):
    def generate(bundle, prompts, cfg, **kw):
        from urt.prompts import answer_string

        return [_completions(plan[p.key], answer_string(p.task, int(p.label)))[: cfg.num_return_sequences]
                for p in prompts]
    return generate


def _grpo_cfg(root: Path, shards: str, name: str, *overrides):
    from urt.config import compose_config

    base = ["stage=grpo", "logger=csv", "model=tiny_qwen2_5_vl", f"paths.root={root}", f"stage.run_name={name}",
            f"data.train_shards={shards}", "data.val_shards=null", "data.num_workers=0", "data.max_length=4096",
            "data.min_pixels=null", "data.max_pixels=12544", "data.shuffle=false", "data.on_error=raise",
            "data.order=keep", "stage.num_generations=3", "stage.max_new_tokens=16", "stage.loss.beta=0",
            "stage.filter_zero_variance=true", "stage.checkpoint.every_n_steps=1", "optimizer.lr=1e-3",
            "scheduler=constant"]
    return compose_config(base + list(overrides))


def _grpo_worker(rank: int, root: str, shards: str, plan: dict, overrides: list[str], out: str) -> None:
    import urt.generation
    from urt.train import train

    urt.generation.generate = _canned_generate(plan)  # this process's monkeypatch
    # each rank: 2 prompts per step; one epoch: the ranks' shares (3 / 2 prompts) end together after a step
    cfg = _grpo_cfg(Path(root), shards, "ddp", "trainer=ddp_cpu", "data.batch_size=2", "trainer.max_steps=-1",
                    "trainer.max_epochs=1", *overrides)
    dump = GradDump(Path(out) / f"grpo-rank{rank}.pt")
    train(cfg, callbacks=[dump])
    dm = dump.module.trainer.datamodule
    torch.save({"losses": dump.losses, "skipped": dict(dm.skip_stats.skipped), "steps": dump.module.rollout_step},
               Path(out) / f"grpo-rank{rank}-info.pt")


GRPO_CASES = {  # plan (completions per prompt key), overrides, kept sequences per rank
    # rank 0 keeps 3 sequences (p-0 filtered) in 1 micro-batch, rank 1 keeps 5 (p-3 short) in 2: paper
    # aggregation, clipping on
    "filtered_and_short": ({"p-0": "flat", "p-1": "distinct", "p-2": "distinct", "p-3": "short", "p-4": "distinct"},
                           ["stage.micro_batch_size=4"], {0: 3, 1: 5}),
    # rank 0 keeps nothing; rank 1 keeps 5 in 2 mini-batches of 3 + 2 micro-batches of 2: token aggregation
    "rank_without_sequences": ({"p-0": "flat", "p-1": "distinct", "p-2": "flat", "p-3": "short", "p-4": "flat"},
                               ["stage.micro_batch_size=2", "stage.num_mini_batches=2", "stage.loss.aggregation=token",
                                "stage.max_grad_norm=null"], {0: 0, 1: 5}),
    # advantage "batch": the std over the global batch, not over each rank's (theirs differ here)
    "batch_advantage": ({"p-0": "flat", "p-1": "distinct", "p-2": "distinct", "p-3": "distinct", "p-4": "flat"},
                        ["stage.advantage=batch", "stage.filter_zero_variance=false", "stage.max_grad_norm=null"],
                        {0: 6, 1: 6}),
}


@pytest.mark.parametrize("case", sorted(GRPO_CASES))
def test_grpo_two_processes_equal_one(tmp_path, monkeypatch, case):
    import pyarrow.parquet as pq

    import urt.generation
    from urt.train import train

    plan, overrides, kept_per_rank = GRPO_CASES[case]
    shards = _prompt_shards(tmp_path / "shards", 5)
    # one process, the global batch of 4 prompts (p-0 … p-3)
    monkeypatch.setattr(urt.generation, "generate", _canned_generate(plan))
    one = GradDump(tmp_path / "grpo-one.pt")
    cfg1 = _grpo_cfg(tmp_path, shards, "one", "trainer=cpu", "data.batch_size=4", "trainer.max_steps=1", *overrides)
    train(cfg1, callbacks=[one])
    assert one.module.rollout_step == 1

    run_two_processes(_grpo_worker, str(tmp_path), shards, plan, overrides, str(tmp_path))
    ranks = [torch.load(tmp_path / f"grpo-rank{r}.pt") for r in (0, 1)]
    info = [torch.load(tmp_path / f"grpo-rank{r}-info.pt") for r in (0, 1)]
    # one rollout step on each rank, as many optimizer steps as one process, the same gradients everywhere
    assert [i["steps"] for i in info] == [1, 1]
    assert_same_grads(one.grads, ranks[0])
    assert_same_grads(ranks[0], ranks[1], atol=0)
    assert info[0]["losses"] == info[1]["losses"] and info[0]["losses"][0] == pytest.approx(one.losses[0], abs=1e-6)
    # the extra prompt of rank 0 (p-4) is counted, not trained on: both ranks' epochs ended after one step
    assert info[0]["skipped"] == {"uneven_ranks": 1} and info[1]["skipped"] == {}

    # rollouts sharded by prompt, groups whole on one rank; rank 0's table holds both ranks' rows
    df = pq.read_table(tmp_path / "runs" / "ddp" / "rollouts" / "step-000001.parquet").to_pydict()
    rank_of = {}
    for key, r in zip(df["prompt_key"], df["rank"]):
        assert rank_of.setdefault(key, r) == r, key
    assert rank_of == {"p-0": 0, "p-2": 0, "p-1": 1, "p-3": 1}
    ref = pq.read_table(tmp_path / "runs" / "one" / "rollouts" / "step-000001.parquet").to_pydict()
    rows = lambda t: sorted(zip(t["prompt_key"], t["sample"], t["reward"], t["advantage"], t["kept"]))  # noqa: E731
    assert rows(df) == rows(ref)
    kept = {r: sum(k for k, rr in zip(df["kept"], df["rank"]) if rr == r) for r in (0, 1)}
    assert kept == kept_per_rank


# ------------------------------------------------------------------------------------------ SFT
def _sft_shards(d: Path) -> str:
    """8 image-generation pairs with CoTs, in ONE shard (2 ranks split it by sample: the case that used to
    leave rank 1 without data)."""
    out = [Sample(f"s-{j}", "image_generation", 1 + j % 2, [vqa_image(2 * j + 1), vqa_image(2 * j + 2)],
                  caption=f"picture {j}" + " and more" * j, source="fixture",
                  cot=f"<think>Image 1: {j}/10</think>\n<answer>Image {1 + j % 2} is better</answer>")
           for j in range(8)]
    write_shards(out, d, maxcount=8)
    return str(d)


def _sft_cfg(root: Path, shards: str, name: str, steps: int, *overrides):
    from urt.config import compose_config

    # 2 samples per optimizer step: one process accumulates 2 batches of 1, two processes take 1 each
    base = ["stage=sft", "logger=csv", "model=tiny_qwen2_5_vl", f"paths.root={root}", f"stage.run_name={name}",
            f"data.train_shards={shards}", "data.val_shards=null", "data.num_workers=0", "data.batch_size=1",
            "data.max_length=4096", "data.min_pixels=null", "data.max_pixels=12544", "data.shuffle=false",
            "data.order=keep", "data.on_error=raise", "stage.effective_batch_size=2", f"trainer.max_steps={steps}",
            "stage.checkpoint.every_n_steps=null", "stage.gen_eval.every_n_epochs=0", "scheduler=constant",
            "optimizer.lr=1e-3"]
    return compose_config(base + list(overrides))


def _sft_worker(rank: int, root: str, shards: str, out: str) -> None:
    from urt.stages.callbacks import HFExport
    from urt.train import train

    dump = Path(out) / f"sft-rank{rank}.pt"
    written = []
    for steps in (2, 3):  # 2 steps, then resumed from checkpoints/last.ckpt for a third
        cfg = _sft_cfg(Path(root), shards, "ddp", steps, "trainer=ddp_cpu")
        cb = GradDump(dump)
        train(cfg, callbacks=[cb])
        export = next(c for c in cb.module.trainer.callbacks if isinstance(c, HFExport))
        written.append([str(p) for p in export.written])
        assert cb.module.trainer.global_step == steps
    torch.save({"written": written, "accumulate": cb.module.trainer.accumulate_grad_batches},
               Path(out) / f"sft-rank{rank}-info.pt")


def test_sft_two_processes_equal_one(tmp_path):
    from safetensors.torch import load_file

    from urt.train import train

    shards = _sft_shards(tmp_path / "shards")
    one = GradDump(tmp_path / "sft-one.pt")
    train(_sft_cfg(tmp_path, shards, "one", 3, "trainer=cpu"), callbacks=[one])
    assert one.module.trainer.accumulate_grad_batches == 2

    run_two_processes(_sft_worker, str(tmp_path), shards, str(tmp_path))
    info = [torch.load(tmp_path / f"sft-rank{r}-info.pt") for r in (0, 1)]
    assert [i["accumulate"] for i in info] == [1, 1]  # effective batch 2 = 1 sample x 2 devices
    final = (tmp_path / "runs" / "ddp" / "hf" / "final").resolve()
    written = [[[Path(p).resolve() for p in fit] for fit in i["written"]] for i in info]
    assert written == [[[final], [final]], [[], []]]  # rank 0 writes, once per fit
    # DDP averages the ranks' gradients = one process averaging its 2 accumulated batches (same samples:
    # one process reads s-0, s-1, …; rank 0 gets s-0, s-2, …, rank 1 s-1, s-3, …), steps 1-2 and, after the
    # resume, step 3 (the data position of each rank restored exactly)
    ranks = [torch.load(tmp_path / f"sft-rank{r}.pt") for r in (0, 1)]
    assert len(ranks[0]) == 3
    assert_same_grads(one.grads, ranks[0])
    assert_same_grads(ranks[0], ranks[1], atol=0)
    a, b = load_file(tmp_path / "runs" / "one" / "hf" / "final" / "model.safetensors"), \
        load_file(final / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    state = torch.load(tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)
    pos = state["RewardDataModule"]["ranks"]
    assert state["global_step"] == 3 and {r: p["batches"] for r, p in pos.items()} == {"0": 3, "1": 3}


# ------------------------------------------------------------------------------------------ data split
@pytest.fixture(scope="module")
def tiny_bundle():
    from urt.models import load_model

    return load_model("tiny", family="qwen2_5_vl")


def _dm(shards, bundle, **kw):
    from urt.data.datamodule import RewardDataModule

    opts = dict(batch_size=1, num_workers=0, mode="prompt", order="keep", min_pixels=None, max_pixels=12544,
                max_length=4096, shuffle_buffer=3, on_error="raise")
    opts.update(kw)
    return RewardDataModule(train_shards=shards, bundle=bundle, **opts)


def _keys_of(dm, rank: int, world: int) -> list[str]:
    dm._rank_world = lambda: (rank, world)
    return [k for b in dm.train_dataloader() for k in b["keys"]]


@pytest.mark.parametrize("n_shards,by_sample", [(1, True), (3, True), (2, False), (4, False)])
def test_ranks_partition_the_samples(tmp_path, tiny_bundle, n_shards, by_sample):
    """Every sample on exactly one rank, shares within one sample when splitting by sample; by shard when
    the shards divide evenly (each rank reads only its own), else by sample."""
    samples = [Sample(f"k-{j}", "image_generation", 1, [vqa_image(j), vqa_image(j + 1)], caption=f"c {j}",
                      source="x") for j in range(12)]
    write_shards(samples, tmp_path, maxcount=-(-12 // n_shards))
    shards = str(tmp_path)
    got = [_keys_of(_dm(shards, tiny_bundle, seed=5), r, 2) for r in (0, 1)]
    assert sorted(got[0] + got[1]) == sorted(s.key for s in samples) and not set(got[0]) & set(got[1])
    assert abs(len(got[0]) - len(got[1])) <= 1
    ds = _dm(shards, tiny_bundle)._dataset("train")
    ds.world = 2
    assert ds.by_sample == by_sample
    # one process reads everything, in its own order
    assert sorted(_keys_of(_dm(shards, tiny_bundle, seed=5), 0, 1)) == sorted(s.key for s in samples)


class _LockstepStrategy:
    """`reduce_boolean_decision` of two ranks simulated by two threads (a barrier per call)."""

    def __init__(self):
        self.barrier = threading.Barrier(2, timeout=60)
        self.flags = {}

    def for_rank(self, rank: int):
        def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:
            self.flags[rank] = bool(decision)
            self.barrier.wait()
            out = self.flags[0] and self.flags[1]
            self.barrier.wait()
            return out
        return SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision)


def test_ranks_take_the_same_number_of_batches(tmp_path, tiny_bundle):
    """5 samples, 1 shard, 2 ranks: 3 / 2 batches of one. Under a trainer both ranks stop after 2; rank 0's
    third sample is counted as skipped ('uneven_ranks'), the epoch complete; the next epoch starts over."""
    samples = [Sample(f"u-{j}", "image_generation", 1, [vqa_image(j), vqa_image(j + 1)], caption=f"c {j}",
                      source="x") for j in range(5)]
    write_shards(samples, tmp_path, maxcount=5)
    lock = _LockstepStrategy()
    # a bundle each: the threads must not share one tokenizer (HF fast tokenizers are not re-entrant)
    dms = [_dm(str(tmp_path), copy.deepcopy(tiny_bundle), shuffle=False) for _ in (0, 1)]
    for r, dm in enumerate(dms):
        dm.trainer = SimpleNamespace(global_rank=r, world_size=2, strategy=lock.for_rank(r), logger=None,
                                     current_epoch=0, global_step=0)
    got: dict[int, list] = {}

    def epoch(r):
        keys = []
        for b in dms[r].train_dataloader():
            b = dms[r].on_before_batch_transfer(b, 0)  # what the trainer does with each batch it takes
            keys += b["keys"]
        got[r] = keys

    threads = [threading.Thread(target=epoch, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {0: ["u-0", "u-2"], 1: ["u-1", "u-3"]}
    assert dms[0].skip_stats.skipped == {"uneven_ranks": 1} and dms[0].skip_stats.ok == 2
    assert "rank 0: 1 sample(s) in 1 batch(es)" in dms[0].skip_stats.examples["uneven_ranks"]
    assert dms[1].skip_stats.total_skipped == 0
    assert [dm.position["complete"] for dm in dms] == [True, True]
    assert [dm.position["batches"] for dm in dms] == [2, 2]


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("trainer", ["ddp", "ddp_cpu", "fsdp", "fsdp_cpu"])
def test_trainer_configs_build_their_strategy(trainer):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    from urt.config import compose_config

    cfg = compose_config([f"trainer={trainer}", "model=tiny_qwen3_vl"])
    strategy = instantiate(cfg.trainer.strategy)
    if trainer.startswith("fsdp"):  # FSDP2: urt.stages.sharded (mixed precision is the strategy's)
        from urt.stages.sharded import ShardedStrategy

        assert isinstance(strategy, ShardedStrategy) and cfg.trainer.precision == "32-true"
        assert strategy._save_distributed_checkpoint and strategy.reshard_after_forward
        assert (strategy.param_dtype, strategy.reduce_dtype) == (("bf16", "fp32") if trainer == "fsdp" else
                                                                 ("fp32", "fp32"))
        assert strategy._process_group_backend == ("gloo" if trainer == "fsdp_cpu" else "nccl")
    else:
        assert isinstance(strategy, DDPStrategy)
        assert strategy._ddp_kwargs["broadcast_buffers"] is False and not strategy._ddp_kwargs["static_graph"]
        assert strategy._process_group_backend == ("gloo" if trainer == "ddp_cpu" else "nccl")
        gpu = compose_config(["trainer=gpu"]).trainer
        if trainer == "ddp":  # gpu.yaml made explicit
            assert (cfg.trainer.precision, cfg.trainer.devices, gpu.strategy) == (gpu.precision, gpu.devices, "ddp")
        else:
            assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("cpu", 2)


def test_fsdp_layer_classes_are_the_models_blocks():
    """Every family's decoder-layer and vision-block classes occur in its model and are among the modules
    transformers keeps whole (`_no_split_modules`); a model without them is refused."""
    from urt.errors import UrtError
    from urt.models import FAMILIES, load_model
    from urt.models.sharding import check_wrapping, layer_classes

    for family, spec in FAMILIES.items():
        if not spec.supported:
            continue
        model = load_model("tiny", family=family).model
        present = {type(m) for m in model.modules()}
        for part in ("decoder", "vision"):
            (cls,) = layer_classes(family, [part])
            assert cls in present and cls.__name__ in set(model._no_split_modules), (family, part)
        check_wrapping(model, family)
    with pytest.raises(UrtError, match="shard nothing"):
        check_wrapping(load_model("tiny", family="qwen2_5_vl").model, "llava_onevision")
    with pytest.raises(UrtError, match="no FSDP layer classes"):
        layer_classes("nope")


def test_grpo_refuses_fsdp1_and_a_sharded_trainable_vision_tower():
    """FSDP1 (Lightning's FSDPStrategy) is refused; the sharded strategy (FSDP2) is taken, but not with a
    trained vision tower (tests/test_fsdp.py runs GRPO under it)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from urt.errors import UrtError
    from urt.models import load_model
    from urt.rl.objective import PolicyLoss
    from urt.stages.grpo import GRPOModule
    from urt.stages.sharded import ShardedStrategy

    module = GRPOModule(load_model("tiny", family="qwen2_5_vl"), loss=PolicyLoss(beta=0), num_generations=2)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(UrtError, match="GRPO runs on one device, with DDP .* or sharded"):
        module.setup("fit")
    module._trainer = SimpleNamespace(strategy=ShardedStrategy())
    module.setup("fit")
    module = GRPOModule(load_model("tiny", family="qwen2_5_vl", freeze_vision=False), loss=PolicyLoss(beta=0),
                        num_generations=2)
    module._trainer = SimpleNamespace(strategy=ShardedStrategy())
    with pytest.raises(UrtError, match="model.freeze_vision=true"):
        module.setup("fit")
