"""The model bundle every layer passes around (model, processor, family), and the choice of device and
attention implementation a model is built with (`urt.models.loading` and `urt.models.tiny` both need them)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from urt.models import attention
from urt.models.families import FamilySpec, get_family


@dataclass
class ModelBundle:
    model: Any
    processor: Any
    family: str
    # set when the weights were loaded in the checkpoint's dtype to be cast to this one unit by unit as the
    # sharded strategy shards them (urt.stages.sharded.load_settings): None, they are in it already
    master_dtype: Any = None
    # built on the meta device, its weights to come from rank 0 as the sharded strategy shards it
    from_rank0: bool = False

    @property
    def spec(self) -> FamilySpec:
        return get_family(self.family)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)


# ---------------------------------------------------------------------------------------------- attn


def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return str(device).startswith("cuda")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" -> this process's CUDA device when one is visible, else the CPU. In a multi-process launch
    (torchrun, srun, Lightning's launcher) that is the local rank's GPU: the launchers set LOCAL_RANK /
    SLURM_LOCALID before the trainer sets the device, and a model loaded onto "cuda" would land every
    rank's copy on GPU 0."""
    if device is None or device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local = local_rank()
        if local is not None and local < torch.cuda.device_count():
            return torch.device("cuda", local)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def local_rank() -> int | None:
    """This process's rank on its node as a launcher set it (None outside a multi-process launch)."""
    import os

    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def choose_attn_implementation(requested: str | None = "auto", device: str | torch.device = "cpu") -> str:
    """"auto" on CUDA -> "flash_attention_2" when flash_attn is importable, else torch's own varlen flash
    kernel (`urt.models.attention.VARLEN`) when this torch has it, else "sdpa"; "auto" on CPU -> "sdpa".
    Any other value passes through unchanged ("urt_varlen" included)."""
    chosen = requested
    if requested is None or requested == "auto":
        if not _is_cuda(device):
            chosen = "sdpa"
        elif _flash_attn_available():
            chosen = "flash_attention_2"
        else:
            chosen = attention.VARLEN if attention.varlen_available(device) else "sdpa"
    if chosen in (attention.VARLEN, attention.VISION_VARLEN):
        attention.register()  # before transformers validates the name
    return chosen
