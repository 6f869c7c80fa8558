#!/usr/bin/env python
"""The sharded strategy on one GPU: issue #27's device checks in one run of about 6 minutes.

1. parity: world size 1 under `trainer=fsdp` computes what the single-device path computes (fp32, the tiny
   Qwen2.5-VL, 2 GRPO steps with real generation): the same sampled rollouts and rewards, per-step losses
   to 1e-5. A reward that pays for even token ids gives every group a spread, so the losses are not the
   KL term alone.
2. memory: one GRPO step of a random Qwen2.5-VL-7B-shaped model (`--mem-layers` of its 28 decoder
   layers, so that it fits one GPU) under `trainer=fsdp` with `cpu_offload` (fp32 master shards, gradients
   and AdamW state on the host; a bf16 sharded generation copy; the CUDA path of everything the CPU tests
   cover): `torch.cuda.max_memory_allocated` per phase next to `urt plan`'s prediction for the same config.
3. throughput: GRPO steps of a random Qwen2.5-VL-3B-sized model (G = 8, 1,024 new tokens, 8 prompts, bf16)
   on one GPU, generation included: generated tokens/s and all tokens (prompt + completion)/s, for the
   README beside EasyR1's published ~1,800 tokens/s/GPU for Qwen2.5-VL-3B.

Random weights never stop, so every completion runs to `max_new_tokens` (the worst case). The random
checkpoints are written to --work (bf16 safetensors with urt's offline tokenizer and processor; 7B-shaped
at 14 layers ~10 GB, 3B ~7.5 GB) and loaded back through `urt train` as a user's would be.

    python benchmarks/sharded_gpu.py --out results/              # a CUDA machine
    python benchmarks/sharded_gpu.py --cpu --out /tmp/sg         # the same logic on CPU, tiny sizes

The device machine has torch, transformers, lightning, safetensors, pyarrow, scikit-image; carry the rest
as wheels (/work/.library/device/README.md): hydra-core omegaconf antlr4-python3-runtime webdataset
braceexpand. Writes `sharded_gpu.json` under --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from lightning.pytorch.callbacks import Callback  # noqa: E402

from urt.rewards import register_reward  # noqa: E402


@register_reward("even_ids")
def even_ids(completion, solution, **_) -> float:
    """The share of even token ids: random completions differ in it, so every group has a spread."""
    ids = list(getattr(completion, "ids", []) or [])
    return sum(i % 2 == 0 for i in ids) / max(1, len(ids))


class Probe(Callback):
    """Per training batch (one GRPO rollout step): wall time, prompt tokens, the GPU's peak and the losses;
    the rollouts themselves are read back from the run's rollout log (`rollouts(run_dir)`)."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.prompt_tokens = sum(len(p.input_ids) for p in batch["prompts"]) * pl_module.G
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()  # the step's values, not its timing
                   if k.startswith("train/") and "per_s" not in k and "time" not in k}
        self.steps.append({"seconds": time.perf_counter() - self.t0, "prompt_tokens": self.prompt_tokens,
                           "metrics": metrics,
                           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None})


def rollouts(run_dir: Path) -> list[dict]:
    """Each step's rollouts from the run's rollout log: completions, rewards, sampled token counts."""
    import pyarrow.parquet as pq

    out = []
    for f in sorted((run_dir / "rollouts").glob("step-*.parquet")):
        t = pq.read_table(f).to_pydict()
        order = sorted(range(len(t["sample_key"])), key=lambda i: t["sample_key"][i])
        out.append({k: [t[k][i] for i in order] for k in ("sample_key", "completion", "reward", "completion_length")})
    return out


def photos(k: int = 6) -> list:
    """k real RGB photos at 224 x 224: scikit-image's bundled ones (on the device machine), else easy-vqa's
    (urt's dev install)."""
    import numpy as np
    from PIL import Image

    try:
        from skimage import data as sk

        arrays = [f() for f in (sk.astronaut, sk.coffee, sk.chelsea, sk.rocket, sk.camera, sk.logo)][:k]
    except ImportError:
        import easy_vqa

        paths = easy_vqa.get_train_image_paths()
        arrays = [np.asarray(Image.open(paths[i]).convert("RGB")) for i in sorted(paths)[:k]]
    return [Image.fromarray((np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]).astype("uint8")).resize((224, 224))
            for a in arrays]


def photo_shards(out: Path, n: int) -> str:
    """n image-generation pairs of real photos, one shard."""
    from urt.data.schema import Sample
    from urt.data.shards import write_shards

    photos_ = photos()
    samples = [Sample(f"p-{j}", "image_generation", 1 + j % 2, [photos_[j % 6], photos_[(j + 1) % 6]],
                      caption=f"a photo, number {j}", source="skimage") for j in range(n)]
    write_shards(samples, out, maxcount=n, overwrite=True)
    return str(out)


def random_checkpoint(out: Path, size: str, layers: int | None, device: str) -> str:
    """A random-weight Qwen2.5-VL checkpoint folder (bf16) of `size` ("3b" | "7b" | "tiny") with `layers`
    decoder layers, urt's offline tokenizer and processor."""
    import mfu_cuda
    import transformers

    from urt.models.tiny import tiny_processor
    from urt.models.tokenizer import load_tiny_tokenizer

    if (out / "config.json").exists():
        return str(out)
    tok = load_tiny_tokenizer("qwen2_5_vl")
    cfg = mfu_cuda.model_config(tok, tiny=size == "tiny", layers=layers)
    if size == "7b":  # Qwen2.5-VL-7B-Instruct's language model (the vision tower is the 3B's, as released)
        t = cfg.text_config
        t.hidden_size, t.num_attention_heads, t.num_key_value_heads = 3584, 28, 4
        t.intermediate_size, t.vocab_size = 18944, 152064
        cfg.vision_config.out_hidden_size = 3584
        cfg.tie_word_embeddings = t.tie_word_embeddings = False
    cfg.use_cache = cfg.text_config.use_cache = True
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tiny_processor("qwen2_5_vl", tok).save_pretrained(out)
    del model
    return str(out)


def grpo_cfg(root: Path, shards: str, name: str, *overrides):
    from urt.config import compose_config

    base = ["stage=grpo", "logger=csv", "model=tiny_qwen2_5_vl", f"paths.root={root}", f"stage.run_name={name}",
            f"data.train_shards={shards}", "data.val_shards=null", "data.num_workers=0", "data.shuffle=false",
            "data.order=keep", "data.on_error=raise", "stage.checkpoint.every_n_steps=null", "scheduler=constant",
            "+reward.weights.even_ids=1.0", "stage.filter_zero_variance=false", "trainer.max_epochs=1",
            "+plan.check=false"]
    return compose_config(base + list(overrides))


def run(cfg) -> tuple[Probe, list[dict]]:
    from urt.train import train

    probe = Probe()
    train(cfg, callbacks=[probe])
    return probe, rollouts(Path(cfg.paths.runs) / cfg.stage.run_name)


def parity(args, shards: str) -> dict:
    gpu = not args.cpu
    common = ["data.batch_size=2", "trainer.max_steps=2", "stage.num_generations=4", "stage.max_new_tokens=32",
              "stage.micro_batch_size=4", "stage.loss.beta=0.04", "model.dtype=float32", "trainer.deterministic=true"]
    single = ["trainer=gpu" if gpu else "trainer=cpu", "trainer.devices=1", "trainer.precision=32-true"]  # DDP x1
    sharded = ["trainer=fsdp" if gpu else "trainer=fsdp_cpu", "trainer.devices=1", "trainer.strategy.param_dtype=fp32"]
    (a, ra), (b, rb) = (run(grpo_cfg(args.work, shards, name, *common, *ov))
                        for name, ov in (("parity_single", single), ("parity_fsdp", sharded)))
    same = [r["completion"] for r in ra] == [r["completion"] for r in rb]
    d_reward = max(abs(x - y) for r1, r2 in zip(ra, rb) for x, y in zip(r1["reward"], r2["reward"]))
    d_loss = max(abs(x - sb["metrics"][k]) for sa, sb in zip(a.steps, b.steps) for k, x in sa["metrics"].items())
    return {"steps": len(ra), "same_completions": same, "max_abs_reward_diff": d_reward,
            "max_abs_metric_diff": d_loss, "metrics": [s["metrics"] for s in a.steps],
            "ok": same and d_reward < 1e-6 and d_loss < 1e-5}


def memory(args, shards: str) -> dict:
    from urt.plan import GiB, plan_config

    ckpt = random_checkpoint(args.work / f"ckpt_7b_{args.mem_layers}", "tiny" if args.cpu else "7b",
                             None if args.cpu else args.mem_layers, "cpu" if args.cpu else "cuda")
    ov = [f"model.name_or_path={ckpt}", "model.dtype=float32", "model.gradient_checkpointing=true",
          "trainer=fsdp_cpu" if args.cpu else "trainer=fsdp", "trainer.devices=1", "trainer.strategy.cpu_offload=true",
          "data.batch_size=8", "trainer.max_steps=1", "stage.num_generations=8",
          f"stage.max_new_tokens={16 if args.cpu else 256}", "stage.generation_batch_size=4",
          "stage.micro_batch_size=4", "stage.loss.beta=0.04", "data.max_pixels=50176"]
    cfg = grpo_cfg(args.work, shards, "memory", *ov)
    plan = plan_config(cfg, "grpo", int(args.gpu_gib * GiB), gpus=1)
    probe, _ = run(cfg)
    measured = probe.steps[-1]["peak_gib"]
    return {"layers": args.mem_layers, "plan_peak_gib": round(plan.peak / GiB, 2),
            "plan_without_reserve_gib": round((plan.peak - plan.setting.reserve) / GiB, 2),
            "plan_kv_gib": round(plan.kv_cache / GiB, 2), "plan_act_gib": round(plan.activations / GiB, 2),
            "plan_host_gib": round(plan.host / GiB, 2), "measured_peak_gib": measured,
            "seconds": round(probe.steps[-1]["seconds"], 1)}


def throughput(args, shards: str) -> dict:
    ckpt = random_checkpoint(args.work / "ckpt_3b", "tiny" if args.cpu else "3b", None,
                             "cpu" if args.cpu else "cuda")
    new = 16 if args.cpu else args.new_tokens
    ov = [f"model.name_or_path={ckpt}", "model.gradient_checkpointing=true", "trainer=cpu" if args.cpu else "trainer=gpu",
          "trainer.devices=1", "data.batch_size=8", f"trainer.max_steps={args.steps}",
          "stage.num_generations=8", f"stage.max_new_tokens={new}", "stage.generation_batch_size=8",
          "stage.micro_batch_size=8", "stage.loss.beta=0.04", "data.max_pixels=50176"]
    probe, rolled = run(grpo_cfg(args.work, shards, "throughput", *ov))
    first = 1 if len(probe.steps) > 1 else 0  # the first step warms up (allocator, kernels)
    timed = probe.steps[first:]
    sec = sum(s["seconds"] for s in timed)
    gen = sum(sum(r["completion_length"]) for r in rolled[first:])
    every = gen + sum(s["prompt_tokens"] for s in timed)
    return {"steps_timed": len(timed), "seconds_per_step": round(sec / len(timed), 2),
            "generated_tokens_per_s": round(gen / sec, 1), "tokens_per_s": round(every / sec, 1),
            "peak_gib": max((s["peak_gib"] or 0) for s in probe.steps), "new_tokens": new}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/urt_sharded_gpu"), help="checkpoints and runs")
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on CPU (a smoke run of the logic)")
    ap.add_argument("--mem-layers", type=int, default=14, help="decoder layers of the 7B-shaped model (28: all)")
    ap.add_argument("--gpu-gib", type=float, default=None, help="the GPU's GiB for the plan (default: measured)")
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2, help="throughput: GRPO steps (the first is not timed)")
    ap.add_argument("--only", nargs="*", default=["parity", "memory", "throughput"])
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device (use --cpu for the smoke run)")
    if args.gpu_gib is None:
        args.gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if not args.cpu else 80.0
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    shards = photo_shards(args.work / "shards", 8)
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    results = {"device": device, "torch": torch.__version__}
    for name in args.only:
        t0 = time.perf_counter()
        results[name] = {"parity": parity, "memory": memory, "throughput": throughput}[name](args, shards)
        results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        (args.out / "sharded_gpu.json").write_text(json.dumps(results, indent=1))
    return 0 if results.get("parity", {}).get("ok", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
