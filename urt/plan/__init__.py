"""The memory plan: per rank and per stage, the bytes of weights, gradients, optimizer state, reference,
activations and generation KV cache, and the peak, against the GPU's memory, from the composed config
alone (no weight is read). `urt plan <overrides>` prints it (urt.plan.cli); `urt train` and `urt pipeline`
run the same check first (`preflight`) and stop with the table when a stage cannot fit.

The sizes come from the model's config (urt.plan.model), the bytes from the formula of urt.plan.memory
(written out in docs/scaling.md).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from urt.errors import UrtError
from urt.plan.memory import PROMPT_TEXT, GiB, Plan, Setting, check, fit, table
from urt.plan.model import ModelSizes, model_config, model_sizes

log = logging.getLogger(__name__)

__all__ = ["GiB", "Plan", "Setting", "check", "fit", "host_memory", "model_sizes", "plan_config", "preflight",
           "setting_of", "stage_configs", "table"]

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2}


def strategy_of(trainer: DictConfig) -> str:
    """single | ddp | fsdp, from `cfg.trainer`."""
    st = trainer.get("strategy")
    target = str(st.get("_target_", "")) if isinstance(st, DictConfig) else str(st or "")
    if "ShardedStrategy" in target or "ModelParallel" in target or "FSDP" in target or target == "fsdp":
        return "fsdp"
    if "DDP" in target or target.startswith("ddp"):
        return "ddp"
    return "single"


def world_of(trainer: DictConfig, gpus: int | None) -> int:
    """Ranks: trainer.devices (a count or a list; `auto`: `gpus`, else every visible GPU) x num_nodes."""
    devices = trainer.get("devices", 1)
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int) and devices > 0:
        n = devices
    elif gpus:
        n = int(gpus)
    else:
        import torch

        n = max(1, torch.cuda.device_count())
    return n * int(trainer.get("num_nodes", 1) or 1)


def _master_bytes(model: DictConfig, config) -> int:
    dtype = str(model.get("dtype", "auto") or "auto")
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    if str(model.get("name_or_path")) == "tiny":
        return 4  # tiny models are float32
    stored = getattr(config, "dtype", None)  # transformers 5 reads a config.json torch_dtype into dtype
    return _DTYPE_BYTES.get(str(stored).replace("torch.", ""), 2)  # released checkpoints: bf16


def _load_bytes(cfg: DictConfig, strategy: str, config, master: int) -> int:
    """Bytes per parameter while a rank loads the model: the checkpoint's own dtype under FSDP2 (the units
    are cast to the master dtype as they are sharded: urt.stages.sharded.load_settings), else the master's."""
    if strategy != "fsdp" or str(cfg.model.get("name_or_path")) == "tiny" or cfg.model.get("lora"):
        return master
    stored = getattr(config, "dtype", None)  # transformers 5 reads a config.json torch_dtype into dtype
    return _DTYPE_BYTES.get(str(stored).replace("torch.", ""), 2)


def _compute_bytes(cfg: DictConfig, strategy: str, master: int) -> int:
    if strategy == "fsdp" and isinstance(cfg.trainer.get("strategy"), DictConfig):
        pdt = cfg.trainer.strategy.get("param_dtype", "bf16")
        return _DTYPE_BYTES.get(str(pdt), master) if pdt else master
    precision = str(cfg.trainer.get("precision", "32-true"))
    return 2 if precision.startswith(("bf16", "16")) else master


def prompt_tokens(cfg: DictConfig, config) -> int:
    """Prompt tokens of a GRPO rollout at most: the template's text plus two visuals at the data module's
    pixel budgets (an image pair, or a video pair of `data.frames` frames), capped at data.max_length."""
    vc = getattr(config, "vision_config", None)
    patch = int(getattr(vc, "patch_size", 14) or 14)
    merge = int(getattr(vc, "spatial_merge_size", 2) or 2)
    data = cfg.data
    per = (patch * merge) ** 2
    if getattr(config, "model_type", "") == "llava_onevision":
        image = 10 * 729  # anyres_max_9: the base view + up to 9 crops of 27 x 27 tokens
        video = int(data.get("frames", 8) or 8) * 196
    else:
        image = -(-int(data.get("max_pixels") or 147456) // per)
        t = int(getattr(vc, "temporal_patch_size", 2) or 2)
        video = -(-int(data.get("frames", 8) or 8) // t) * -(-int(data.get("video_max_pixels") or 16384) // per)
    return min(int(data.get("max_length") or 13000), PROMPT_TEXT + 2 * max(image, video))



def setting_of(cfg: DictConfig, config, gpus: int | None = None) -> Setting:
    """The memory-relevant `Setting` of a composed stage config."""
    stage = str(cfg.stage.get("name", "sft"))
    strategy = strategy_of(cfg.trainer)
    world = world_of(cfg.trainer, gpus)
    if world == 1 and strategy == "ddp":
        strategy = "single"  # FSDP2 at world 1 still casts, offloads and copies as configured
    trainer_strategy = cfg.trainer.get("strategy")
    offload = strategy == "fsdp" and isinstance(trainer_strategy, DictConfig) and \
        bool(trainer_strategy.get("cpu_offload", False))
    per_node = world // int(cfg.trainer.get("num_nodes", 1) or 1)
    master = _master_bytes(cfg.model, config)
    compute = _compute_bytes(cfg, strategy, master)
    load = _load_bytes(cfg, strategy, config, master)
    # FSDP2 from a checkpoint: one reader per node (urt.stages.sharded.load_settings); else every rank
    readers = 1 if strategy == "fsdp" and str(cfg.model.get("name_or_path")) != "tiny" and not cfg.model.get("lora") \
        else 0
    ckpt = bool(cfg.model.get("gradient_checkpointing", False))
    max_length = int(cfg.data.get("max_length") or 13000)
    if stage == "grpo":
        st = cfg.stage
        loss = st.get("loss") or {}
        beta = loss.get("beta")
        variant = str(loss.get("variant", "grpo") or "grpo")
        uses_ref = (float(beta) if beta is not None else (0.04 if variant == "grpo" else 0.0)) > 0
        prompt = prompt_tokens(cfg, config)
        new = int(st.get("max_new_tokens", 2048))
        return Setting("grpo", strategy, world, master, compute, ckpt, int(st.get("micro_batch_size", 8)),
                       prompt + new, new, reference=uses_ref, generations=int(st.get("num_generations", 8)),
                       gen_batch=int(st.get("generation_batch_size", 8)), gen_len=prompt + new,
                       rollout=str(st.get("rollout_weights", "auto")), offload=offload, ranks_per_node=per_node,
                       load=load, readers=readers)
    from urt.plan.memory import SFT_PREDICTED

    return Setting(stage, strategy, world, master, compute, ckpt, int(cfg.data.get("batch_size", 1)), max_length,
                   min(max_length, SFT_PREDICTED), offload=offload, ranks_per_node=per_node, load=load,
                   readers=readers)


def plan_config(cfg: DictConfig, label: str, gpu_bytes: int, gpus: int | None = None,
                model: str | None = None, sizes: ModelSizes | None = None) -> Plan:
    """The plan of one composed stage config. `model`: plan with this checkpoint's config instead of
    model.name_or_path (an earlier stage's output that does not exist yet)."""
    mc = OmegaConf.to_container(cfg.model, resolve=True)
    if model:
        mc["name_or_path"] = model
    config = model_config(mc["name_or_path"], mc.get("family"))
    sizes = sizes or model_sizes(mc)
    return fit(sizes, setting_of(cfg, config, gpus), label, gpu_bytes)


def stage_configs(cfg: DictConfig, overrides: list[str]) -> list[tuple[str, DictConfig, str | None]]:
    """(label, composed config, model to plan with) per training stage: the stage itself, or each `train`
    step of a pipeline config. A pipeline step is composed as urt.pipeline.Pipeline.compose composes it
    for what memory depends on (its experiment, the pipeline's overrides, the command line's, the step's),
    and planned with the pipeline's base model (every step starts from it or from a step trained from it:
    the same architecture)."""
    from urt.config import compose_config

    p = cfg.get("pipeline")
    if p is None:
        if cfg.get("stage") is None:
            raise UrtError("nothing to plan: the config has no stage (stage=sft / grpo, or an experiment)")
        return [(str(cfg.stage.get("name")), cfg, None)]
    own = [o for o in overrides if not o.startswith(("experiment=", "pipeline."))]
    out = []
    for name, st in (p.get("steps") or {}).items():
        if st is None or st.get("kind") != "train" or not st.get("enabled", True):
            continue
        ov = [*([f"experiment={st.experiment}"] if st.get("experiment") else []), *list(p.get("overrides") or []),
              *own, *list(st.get("overrides") or []), *list(st.get("extra_overrides") or [])]
        out.append((str(name), compose_config(ov), str(cfg.model.name_or_path)))
    return out


def gpu_memory() -> int | None:
    """Bytes of GPU 0, or None without CUDA (CPU runs are not checked)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)


def host_memory() -> int:
    """Bytes of this machine's physical memory (a node's, where urt train runs)."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def preflight(cfg: DictConfig, label: str | None = None) -> Plan | None:
    """`urt train`'s check before anything is loaded: on a GPU, the stage's plan against the GPU's memory
    (`+plan.gpu_memory_gib` overrides it) and the node's host memory (`+plan.host_memory_gib`); UrtError
    with the table when it does not fit. Skipped on CPU, with `+plan.check=false`, or when the model's
    config cannot be found (logged)."""
    plans = preflight_stages([(label or str(cfg.stage.get("name", "stage")), cfg, None)]) \
        if cfg.get("stage") is not None else []
    return plans[0] if plans else None


def preflight_stages(stages: list[tuple[str, DictConfig, str | None]]) -> list[Plan]:
    """`preflight` of several stages at once (`urt pipeline`: every training step before the first runs):
    (label, composed config, model to plan with or None). Returns the plans checked."""
    plans = []
    for label, cfg, model in stages:
        opts = cfg.get("plan") or {}
        if not opts.get("check", True) or str(cfg.trainer.get("accelerator", "")) == "cpu":
            continue
        gib = opts.get("gpu_memory_gib")
        total = int(float(gib) * GiB) if gib else gpu_memory()
        if total is None:
            continue
        try:
            plan = plan_config(cfg, label, total, model=model)
        except UrtError as e:
            log.warning("memory plan of %s skipped: %s", label, e)
            continue
        host = opts.get("host_memory_gib")
        plan.host_node_bytes = int(float(host) * GiB) if host else host_memory()
        plans.append(plan)
    check(plans)
    for p in plans:
        log.info("memory plan: %s needs %.1f GiB per rank of %.1f", p.label, p.peak / GiB, p.gpu_bytes / GiB)
    return plans
