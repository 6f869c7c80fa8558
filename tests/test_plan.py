"""The memory plan (urt.plan): exact bytes for what can be counted, the released recipes fit 8x80 GB (the
32B/27B ones with CPU offload), and a stage that cannot fit stops before its model is loaded.

The sharded per-rank counts are checked against rank 0's shards in tests/test_fsdp.py (the SFT run)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from urt.errors import UrtError

PIPELINES = ["qwen2_5_vl_7b", "qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b", "qwen3_vl_32b", "qwen3_5_4b", "qwen3_5_9b",
             "qwen3_5_27b", "llava_ov_7b"]
GPU = 80 << 30


def _plans(overrides: list[str], gpus: int = 8):
    from urt.config import compose_config
    from urt.plan import model_sizes, plan_config, stage_configs

    cfg = compose_config(overrides)
    out, sizes = [], None
    for label, c, base in stage_configs(cfg, overrides):
        if sizes is None:
            mc = OmegaConf.to_container(c.model, resolve=True)
            mc["name_or_path"] = base or mc["name_or_path"]
            sizes = model_sizes(mc)  # every step of a pipeline: the same model settings
        out.append(plan_config(c, label, GPU, gpus, model=base, sizes=sizes))
    return out


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_plan_counts_weights_gradients_and_optimizer_state_exactly(family):
    """One process, a tiny model: the plan's bytes of parameters, gradients and AdamW state are those the
    model and optimizer hold after a step (the frozen vision tower included in the weights only)."""
    from urt.config import compose_config
    from urt.models import load_model
    from urt.plan import plan_config

    plan = plan_config(compose_config(["stage=sft", f"model=tiny_{family}", "trainer=cpu"]), "sft", GPU)
    assert (plan.setting.strategy, plan.setting.world, plan.setting.master) == ("single", 1, 4)
    torch.manual_seed(0)
    model = load_model("tiny", family=family).model
    params = [p for p in model.parameters() if p.requires_grad]
    assert 0 < len(params) < len(list(model.parameters()))  # a frozen vision tower: not all trained
    opt = torch.optim.AdamW(params, lr=1e-3)
    model(input_ids=torch.arange(3, 30)[None]).logits.float().pow(2).mean().backward()
    opt.step()
    measured = {"weights": sum(p.numel() * p.element_size() for p in model.parameters()),
                "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params),
                "optimizer": sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())}
    assert measured == {"weights": plan.weights, "gradients": plan.gradients, "optimizer": plan.optimizer}


@pytest.mark.parametrize("size", PIPELINES)
def test_every_released_recipe_fits_8x80gb(size):
    """Every training stage of each released size's pipeline fits 80 GB per GPU on 8 GPUs under its shipped
    defaults (the 32B and 27B recipes with their fp32 state offloaded to host memory), planned offline from
    the shipped configs; GRPO's 128 prompts per rollout step (8 ranks x 16)."""
    plans = _plans([f"experiment=paper/{size}/pipeline"])
    assert [p.label for p in plans] == ["cold_start", "rejection_sampling", "grpo"]
    big = size in ("qwen3_vl_32b", "qwen3_5_27b")
    for p in plans:
        assert p.setting.strategy == "fsdp" and p.fits, (p.label, p.peak / 2 ** 30)
        assert p.setting.world == 8 and p.setting.offload == big
        # offloaded: the fp32 shards, gradients and AdamW state are host bytes, not GPU bytes
        assert (p.host > 0) == big
        if big:
            assert p.static == p.weights + p.gradients + p.optimizer + p.reference - p.host < 20 << 30
            assert p.host > p.gradients + p.optimizer
        # one rank per node reads the bf16 checkpoint (the others receive it from rank 0) and casts unit by
        # unit while sharding: every recipe's host memory stays under 512 GiB per node of 8, loading and
        # offloaded; without offload a node holds one bf16 copy while loading
        assert p.setting.load == 2 and p.setting.readers == 1
        assert p.host_load_per_node < 512 << 30 and p.host_per_node < 512 << 30
        assert p.host_load_per_node == p.host_load + (p.host_weights * 8 if big else 0)
    grpo = plans[-1]
    assert grpo.setting.reference and grpo.reference > 0 and grpo.kv_cache > 0
    assert grpo.setting.rollout_mode == ("shard" if big else "gather")


def test_without_offload_32b_does_not_fit_8_gpus_and_the_plan_names_offload():
    """Negative control: the 32B recipe with cpu_offload off does not fit 8 x 80 GB (its fp32 state alone is
    ~61 GiB per rank) and the plan names the override that fits; on 2 nodes of 8 it fits without, with 2
    prompts per generate call instead of 4."""
    from urt.plan import table

    plans = _plans(["experiment=paper/qwen3_vl_32b/pipeline", "pipeline.cpu_offload=false"])
    assert not any(p.setting.offload for p in plans) and not all(p.fits for p in plans)
    bad = [p for p in plans if not p.fits]
    assert all(p.alternatives and p.alternatives[0].setting.offload for p in bad)
    assert "trainer.strategy.cpu_offload=true" in table(plans)
    sft, _, grpo = _plans(["experiment=paper/qwen3_vl_32b/pipeline", "pipeline.cpu_offload=false", "trainer.num_nodes=2"])
    assert sft.fits and sft.setting.world == 16 and not grpo.fits  # 4 prompts per generate call: offload's
    alt = grpo.alternatives[0].setting
    assert (alt.world, alt.offload, alt.gen_batch) == (16, False, 2)


def test_offload_strategy_settings():
    """trainer.strategy.cpu_offload: NCCL gets a gloo backend beside it for host tensors; the GRPO rollout
    weights `auto` resolve to a sharded copy when offloaded."""
    from urt.stages.sharded import ShardedStrategy

    assert ShardedStrategy(cpu_offload=True, process_group_backend="nccl").process_group_backend == \
        "cuda:nccl,cpu:gloo"
    assert ShardedStrategy(process_group_backend="nccl").process_group_backend == "nccl"
    assert ShardedStrategy(cpu_offload=True, process_group_backend="gloo").process_group_backend == "gloo"


def test_ddp_7b_does_not_fit_and_the_plan_names_fsdp():
    """Negative control: the 7B recipe under DDP (every rank the full fp32 weights, gradients and AdamW
    state: ~16 bytes per parameter) does not fit, and the plan names the setting that does."""
    from urt.plan import table

    plans = _plans(["experiment=paper/qwen2_5_vl_7b/pipeline", "trainer=gpu"])
    assert all(not p.fits and p.setting.strategy == "ddp" for p in plans)
    assert plans[0].static > 100 << 30  # 8.3B params x 16 bytes
    assert all(p.alternatives and p.alternatives[0].setting.strategy == "fsdp" for p in plans)
    text = table(plans)
    assert "fits with fsdp x8" in text and "(trainer=fsdp)" in text


def test_pipeline_steps_are_planned_as_the_pipeline_composes_them():
    """The plan's expansion of a pipeline (urt.plan.stage_configs) gives each training step the settings
    urt.pipeline composes for it (what memory depends on)."""
    from urt.config import compose_config
    from urt.pipeline import Pipeline
    from urt.plan import stage_configs

    ov = ["experiment=paper/qwen3_vl_32b/pipeline", "trainer.gradient_clip_val=0.5"]
    cfg = compose_config(ov)
    pipe = Pipeline(cfg, ov)
    for label, c, base in stage_configs(cfg, ov):
        real = pipe.compose(label)
        for key in ("trainer", "stage", "data"):
            a, b = OmegaConf.to_container(c[key], resolve=False), OmegaConf.to_container(real[key], resolve=False)
            a.pop("run_dir", None), b.pop("run_dir", None), a.pop("train_shards", None), b.pop("train_shards", None)
            assert a == b, (label, key)
        assert base == "Qwen/Qwen3-VL-32B-Instruct"
    assert c.data.batch_size == 16 and c.stage.generation_batch_size == 4 and c.trainer.gradient_clip_val == 0.5
    assert c.trainer.strategy.cpu_offload is True and c.stage.rollout_weights == "auto"


def test_a_stage_that_cannot_fit_stops_before_loading(monkeypatch):
    """urt train's preflight: on a (declared) 80 GB GPU, the 32B cold start under DDP stops with the plan's
    table, naming the stage and the bytes, before load_model runs."""
    import urt.models
    import urt.models.loading
    from urt.config import compose_config
    from urt.train import build

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the memory check")

    monkeypatch.setattr(urt.models, "load_model", no_loading)
    monkeypatch.setattr(urt.models.loading, "load_model", no_loading)
    cfg = compose_config(["experiment=paper/qwen3_vl/cold_start", "model=qwen3_vl_32b", "trainer=gpu",
                          "trainer.devices=8",
                          "+plan.gpu_memory_gib=80"])
    with pytest.raises(UrtError, match=r"stage sft needs \d+\.\d GiB per rank under ddp x\d+") as e:
        build(cfg)
    assert "weights" in str(e.value) and "does not fit" in str(e.value)


def test_a_stage_that_cannot_fit_the_host_stops_before_loading(monkeypatch):
    """The offloaded 32B cold start fits the GPUs but not a node of 256 GiB (the offloaded fp32 shards,
    gradients and AdamW state of 8 ranks: ~488 GiB): urt train stops before load_model, naming the host
    memory; with the node's memory declared large enough it passes the check."""
    import urt.models
    import urt.models.loading
    from urt.config import compose_config
    from urt.plan import preflight

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the memory check")

    monkeypatch.setattr(urt.models, "load_model", no_loading)
    monkeypatch.setattr(urt.models.loading, "load_model", no_loading)
    base = ["experiment=paper/qwen3_vl/cold_start", "model=qwen3_vl_32b", "trainer.devices=8",
            "trainer.strategy.cpu_offload=true", "+plan.gpu_memory_gib=80"]
    from urt.train import build

    with pytest.raises(UrtError, match=r"stage sft needs 488\.\d GiB of host memory per node of 8 ranks for the "
                                       r"offloaded state, more than the node's 256\.0 GiB") as e:
        build(compose_config([*base, "+plan.host_memory_gib=256"]))
    assert "host memory per node" in str(e.value) and "does not fit" in str(e.value)
    plan = preflight(compose_config([*base, "+plan.host_memory_gib=1024"]))
    assert plan.fits and plan.fits_host and plan.host_node_bytes == 1024 << 30


def test_plan_cli(capsys):
    from urt.cli import main

    assert main(["plan", "experiment=paper/qwen2_5_vl_7b/pipeline"]) == 0
    out = capsys.readouterr().out
    assert "cold_start" in out and "grpo" in out and "fsdp x8" in out
    # --check: exits with the error naming the stage when one does not fit
    assert main(["plan", "experiment=paper/qwen2_5_vl_7b/pipeline", "trainer=gpu", "--check"]) == 2
    assert "stage cold_start needs" in capsys.readouterr().err
    # --host-memory: the host columns checked against a node's memory
    assert main(["plan", "experiment=paper/qwen3_vl_32b/pipeline", "--host-memory", "1024", "--check"]) == 0
    assert "(node: 1024.0 GiB)" in capsys.readouterr().out
    assert main(["plan", "experiment=paper/qwen3_vl_32b/pipeline", "--host-memory", "256", "--check"]) == 2
    assert "GiB of host memory per node of 8 ranks" in capsys.readouterr().err


def test_plan_needs_a_config():
    from urt.plan.model import model_config

    with pytest.raises(UrtError, match="model.name_or_path='/nowhere/run/hf/final': no config to plan from"):
        model_config("/nowhere/run/hf/final")
    assert model_config("/runs/x/UnifiedReward-Think-7b-hf").model_type == "llava_onevision"
    assert model_config("Qwen/Qwen3.5-27B").model_type == "qwen3_5"

