"""What differs between the transformers versions urt runs under (5.24 here, 5.17 on the GPU machines) and
the small device helpers every layer above needs: one low module, so the layers above import it downward.

* `forward_takes(model, name)`: whether a model's forward accepts an argument (with the version gate for a
  boolean `logits_to_keep`, which 5.17's Qwen2.5-VL forward rejects);
* `cache_kwarg()`: the keyword `generate` takes a cache under (`cache` from 5.2x, `past_key_values` in 5.17);
* `model_device` / `model_dtype` / `to_device`: where a model lives and how inputs move there;
* `warn_once`: a fallback that would otherwise be logged on every step is logged once per process.
"""

from __future__ import annotations

import inspect
import logging

import torch

log = logging.getLogger(__name__)

# The first transformers version whose VLM forwards take a boolean-mask `logits_to_keep`.
BOOL_LOGITS_TO_KEEP = "5.24"


def transformers_at_least(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(version)


def forward_takes(model, name: str) -> bool:
    """Whether `model.forward` accepts the argument `name` (a boolean-mask `logits_to_keep` only where the
    installed transformers supports it: it raises IndexError in 5.17's Qwen2.5-VL forward)."""
    try:
        ok = name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    if ok and name == "logits_to_keep":
        ok = transformers_at_least(BOOL_LOGITS_TO_KEEP)
    return ok


def cache_kwarg() -> str:
    """The name `generate` takes a cache under: `cache` from transformers 5.2x, `past_key_values` before."""
    from transformers.generation.utils import ALL_CACHE_NAMES

    return ALL_CACHE_NAMES[0]


def model_device(model) -> torch.device:
    """Where `model` computes: its first parameter's device, except that an FSDP2 shard kept in host memory
    (CPU offload) computes on its mesh's accelerator."""
    try:
        p = next(model.parameters())
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")
    return compute_device(p)


def compute_device(p: torch.Tensor) -> torch.device:
    """The device a parameter computes on (see `model_device`)."""
    mesh = getattr(p, "device_mesh", None)
    if mesh is not None and p.device.type != mesh.device_type:
        return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())
    return p.device


def model_dtype(model) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def to_device(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors to the model's device; pixel tensors to its dtype (other float inputs such as
    `second_per_grid_ts` keep theirs: bf16 rounding could shift mRoPE time positions)."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            cast = v.is_floating_point() and k.startswith("pixel_values")
            v = v.to(device=device, dtype=dtype) if cast else v.to(device)
        out[k] = v
    return out


_WARNED: set[str] = set()


def warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning(msg)
