"""The sharded strategy every stage runs under with `trainer=fsdp` (CUDA, NCCL) or `trainer=fsdp_cpu`
(2 CPU processes over gloo, the tests): FSDP2 over all ranks, applied by urt.models.fsdp.

Why a thin subclass of Lightning's `ModelParallelStrategy` rather than it as it is or `FSDPStrategy`:
- `FSDPStrategy` is FSDP1 (flat parameters, its own precision plugin that refuses norm clipping, state-dict
  context managers); FSDP2 is torch's maintained API, a DTensor per parameter.
- `ModelParallelStrategy` runs FSDP2 and already writes distributed checkpoints (one shard per rank,
  `torch.distributed.checkpoint`), restores them after the model is sharded, and moves the optimizer
  state; but it builds a 2-D mesh whose tensor-parallel size defaults to the GPUs of a node and needs every
  LightningModule to shard itself in `configure_model`. Here the mesh is 1-D data parallel over every
  rank, and the strategy shards what the stage module hands it (`StageModule.sharded_models`: the policy,
  GRPO's reference) with the family's units, so the stage modules stay strategy-agnostic.

Mixed precision is the strategy's (param_dtype / reduce_dtype), so the trainer's `precision` must be
`32-true` (Lightning's autocast on top would round what FSDP2 keeps in fp32): the master weights, the
gradients and the AdamW state are fp32 shards. Gradient clipping (`trainer.gradient_clip_val`, GRPO's
`stage.max_grad_norm`) is torch's `clip_grad_norm_` over the DTensor gradients: the global norm over every
shard. The `hf/` export gathers the full weights onto rank 0 (urt.models.fsdp.full_state_dict).

`cpu_offload=True` keeps the policy's fp32 shards, gradients and AdamW state in host memory (urt.models.fsdp):
the strategy then leaves the shards where FSDP2 put them instead of moving the module to the GPU (only the
buffers and the replicated frozen tower go there), and the process group gets a gloo backend for CPU tensors
beside NCCL (`cuda:nccl,cpu:gloo`): the global gradient norm is reduced over host-resident gradients, and
the optimizer steps on the CPU.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from lightning.pytorch.strategies import ModelParallelStrategy

from urt.errors import UrtError

log = logging.getLogger(__name__)


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 data parallel over every rank (see the module docstring).

    Args:
        param_dtype: the dtype units compute in (bf16 | fp16 | fp32; CPU tests: fp32).
        reduce_dtype: the dtype gradients are reduce-scattered in (fp32: exact sums).
        reshard_after_forward: free a unit's gathered weights after its forward (ZeRO-3); False keeps them
            until backward (ZeRO-2-like: less communication, a full bf16 copy of the layers alive).
        save_distributed_checkpoint: checkpoints as folders of per-rank shards (False: gathered onto rank 0
            into one file, weights + AdamW state ~12 bytes per parameter in rank 0's host memory).
        cpu_offload: the trained model's shards, gradients and optimizer state in host memory (see the
            module docstring); frozen models (GRPO's reference, its generation copy) stay on the GPU.
    """

    def __init__(self, param_dtype: str | None = "bf16", reduce_dtype: str | None = "fp32",
                 reshard_after_forward: bool = True, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, timeout_s: float = 1800.0, cpu_offload: bool = False):
        self.cpu_offload = bool(cpu_offload)
        if self.cpu_offload and process_group_backend == "nccl":
            # host-resident gradients are reduced (the clipping norm) and gathered (checkpoints) on the CPU
            process_group_backend = "cuda:nccl,cpu:gloo"
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timedelta(seconds=timeout_s))
        from urt.models.fsdp import dtype_of

        dtype_of(param_dtype), dtype_of(reduce_dtype)  # a typo fails here, not after the model is loaded
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.reshard_after_forward = bool(reshard_after_forward)

    def setup_environment(self) -> None:
        # 1-D data parallel over every process of every node (the parent's "auto" is nodes x GPUs per node TP)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup(self, trainer) -> None:
        from lightning.pytorch.plugins.precision import Precision

        if type(self.precision_plugin) is not Precision or \
                str(getattr(trainer, "precision", "32-true")) not in ("32-true", "32"):
            raise UrtError(f"trainer=fsdp: set trainer.precision=32-true (got {trainer.precision}); the sharded "
                           f"strategy's param_dtype={self.param_dtype} / reduce_dtype={self.reduce_dtype} is the "
                           f"mixed precision (trainer.strategy.param_dtype)")
        super().setup(trainer)

    def model_to_device(self) -> None:
        if not self.cpu_offload:
            return super().model_to_device()
        from lightning.fabric.utilities.device_dtype_mixin import _update_properties

        from urt.models.fsdp import place_unsharded

        # the host shards stay put; buffers and the replicated tower go to the GPU, and the LightningModule's
        # `device` (where its batches and collectives' tensors go) says the GPU
        place_unsharded(self.model, self.root_device)
        _update_properties(self.model, device=self.root_device)

    def reduce_any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (a collective on every rank)."""
        import torch

        if not torch.distributed.is_initialized():
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.root_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    @property
    def mesh(self):
        return self.device_mesh["data_parallel"]

    def shard(self, model, family: str, master_dtype=None):
        """FSDP2 on `model` with this strategy's mesh and precision (urt.models.fsdp.shard_model)."""
        from urt.models.fsdp import shard_model

        return shard_model(model, family, self.mesh, param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype,
                           reshard_after_forward=self.reshard_after_forward, offload=self.cpu_offload,
                           master_dtype=master_dtype)

    def shard_stage(self, module) -> None:
        """Shard every model a stage module trains or runs frozen (`module.sharded_models()`)."""
        from urt.models.loading import is_peft_model

        family = module.bundle.family
        if is_peft_model(module.model):
            raise UrtError("trainer=fsdp: LoRA is not supported under the sharded strategy (the adapters' "
                           "frozen base would be replicated and the hf/ export merges on one rank); train LoRA "
                           "with trainer=ddp (model.lora=null for full training)")
        from urt.models.fsdp import broadcast_from_rank0, has_meta, materialize_from

        for model in module.sharded_models():  # the policy first: the frozen skeletons are filled from it
            if model is module.model:
                # some rank built it on meta (load_settings): rank 0 keeps its full (bf16) state to send
                send = self.reduce_any(has_meta(model))
                full = dict(model.state_dict()) if send and self.global_rank == 0 else None
                self.shard(model, family, module.bundle.master_dtype)
                if send:
                    broadcast_from_rank0(model, full, "cpu" if self.cpu_offload else self.root_device)
                del full
                continue
            self.shard(model, family)
            if any(p.is_meta for p in model.parameters()):  # a frozen_skeleton (GRPO's reference, its copy)
                materialize_from(model, module.model, self.root_device)
            else:
                # fully_shard moves the shards to the mesh's device; a frozen model outside the LightningModule
                # still needs its replicated vision tower and its buffers moved
                model.to(self.root_device)


def is_sharded_strategy(trainer) -> bool:
    return trainer is not None and isinstance(getattr(trainer, "strategy", None), ShardedStrategy)


def load_settings(model: dict, trainer) -> tuple[dict, object]:
    """(the `load_model` arguments, the master dtype to cast to while sharding, or None) for a stage whose
    trainer runs this strategy:
    - the model is read into host memory (`model.device: auto` -> cpu, with the attention implementation
      chosen for the GPU it will run on): the strategy moves each unit's shards to the GPU as it shards it,
      so no GPU ever holds the whole model;
    - only the first rank of each node reads the weights; the others build the architecture on the meta
      device and receive the weights from rank 0 once sharded (`shard_stage`): one copy per node in host
      memory, not one per GPU;
    - a checkpoint is read in its own dtype (bf16 for the released ones) and each unit cast to `model.dtype`
      (fp32 master weights) just before it is sharded: the reader holds the bf16 model, not the fp32 one
      (Qwen3-VL-32B: 62 instead of 124 GiB). Tiny random models (each rank builds the same from its seed)
      and LoRA load as configured.
    Other strategies load as configured."""
    import torch

    from urt.models.bundle import choose_attn_implementation, resolve_device

    strategy = trainer.get("strategy") if hasattr(trainer, "get") else None
    target = str(strategy.get("_target_", "")) if hasattr(strategy, "get") else ""
    if not target.endswith("ShardedStrategy"):
        return model, None
    if model.get("device", "auto") in (None, "auto"):
        attn = choose_attn_implementation(model.get("attn_implementation", "auto"), resolve_device("auto"))
        model = {**model, "device": "cpu", "attn_implementation": attn}
    from urt.models.bundle import local_rank

    if str(model.get("name_or_path")) != "tiny" and not model.get("lora") and local_rank() not in (None, 0):
        model = {**model, "meta": True}  # one reader per node; the weights come from rank 0 (shard_stage)
    dtype = model.get("dtype", "auto")
    if str(model.get("name_or_path")) == "tiny" or dtype in (None, "auto") or model.get("lora"):
        return model, None
    master = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(master, torch.dtype):
        return model, None  # load_model names the bad dtype
    return {**model, "dtype": "auto"}, master
